"""GPU benchmarks: UDPDiff's 32-channel transformer beside stock CogVideoX, same run, same GPU.

Sections (``--sections``, any subset, in this order):

* ``gemm``   — the bf16 matrix-product ceiling of this GPU (best of a few large products); every
  MFU below is measured against it.
* ``step``   — one denoising step: a transformer forward with CFG batch 2 (latents, 226x4096
  prompt embeddings, timesteps; rotary tables for 5B as the pipeline makes them) under
  ``torch.no_grad()``, stock diffusers ``CogVideoXTransformer3DModel`` (16 ch) and ours
  (``UDPDiffTransformer3DModel``, 32 ch + task embedding) timed alternately (A B B A ...) so clock
  drift hits both alike; median of ``--step-iters`` after ``--step-warmup``.
* ``sample`` — a full sample: ``CogVideoXPipeline`` (stock) and ``UDPDiffPipeline`` (ours; its VAE
  decodes the RGB and the dense half, then Pixelplanes decodes the depth colormap), the diffusers
  scheduler (DPM for 5B, DDIM for 2B), CFG 6, then the VAE decode (``AutoencoderKLCogVideoX``,
  tiling + slicing as the CogVideoX docs recommend). Prompt embeddings are precomputed random
  tensors: T5-XXL text encoding is *excluded*. Reported as total, denoising, VAE decode and the
  rest (post-processing to numpy/uint8, Pixelplanes).
* ``train``  — fwd+bwd+optimizer under DeepSpeed ZeRO-2 (the shipped ``infra/deepspeed/zero2.json``
  with its "auto" fields filled: micro batch 1, no accumulation, clipping 1.0, bf16), gradient
  checkpointing, torch AdamW as the client optimizer, v-prediction MSE; 2B stock and ours on this
  process's GPUs. 5B ZeRO-2 needs two GPUs (fp32 master weights + Adam alone are 67 GB): launched
  with ``torchrun --nproc_per_node 2`` it runs; on one GPU it is recorded as not run, and a 5B
  fwd+bwd without optimizer (the reference figure's setting) is measured instead.
* ``step_fast``, ``sample_fast``, ``train_fast`` — the fast path (``udpdiff.acceleration``, what
  training and sampling use on CUDA by default) against ours eager, same weights and inputs:
  ``step_fast`` times the step with Inductor-compiled blocks (alternating with eager), the first
  compiled call (the compile) on its own, and the output's distance from eager's and from an fp32
  forward of the same weights; ``sample_fast`` runs the whole sample eager (two VAE decodes one at
  a time) and fast (compiled blocks + one batched decode of the video and the colormap) and
  compares their final latents, frames and depth; ``train_fast`` runs the ZeRO-2 training step
  as ``--train-variants`` (eager; compiled blocks; + selective checkpointing and fused AdamW; no
  checkpointing) and compares the loss of every step with eager's. ``--compile-mode`` picks the mode.
* ``sample_parallel`` — under ``torchrun --nproc_per_node N``: one fast-path sample with its CFG
  batch split over the N GPUs (``udpdiff.parallel``), then the same sample on one GPU; times and
  the difference between the two.
* ``approx`` — the opt-in approximate sampling modes (``acceleration.approximate``: float8 block
  linears with rowwise (``float8``) or tensorwise (``float8-tensorwise``) scales, FA3's float8
  attention alone (``float8-attention``) or with tensorwise linears (``float8-tensorwise-attention``;
  both need ``--attention fa3``), the first-block / faster / pab step caches; ``--approx-modes``)
  against the lossless fast path (compiled blocks,
  ``--attention``), ours, one GPU: per mode a whole sample of
  ``--approx-steps`` steps with the same prompt embedding, seed and weights, its seconds per CFG-2
  step and total, and its quality cost against the lossless sample: final-latent PSNR and relative
  L2, and the decoded video's and colormap's uint8 differences. float8 rows where it cannot run
  (CPU, pre-sm89, no torchao, no FA3) are recorded as skipped with the reason.

Models have random weights and are built directly on the GPU in bf16; each is freed before the
next. FLOPs are counted analytically from the config (see ``forward_flops``). The JSON is written
after every section, so a run stopped by a time limit keeps what it measured.

    python benchmarks/bench_gpu.py --out benchmarks/results/gpu-h100.json
    python benchmarks/bench_gpu.py --sections gemm,step --archs 5b --out /tmp/x.json
    python benchmarks/bench_gpu.py --sections gemm,step_fast:5b,sample_fast:5b --out /tmp/fast.json
    python benchmarks/bench_gpu.py --sections approx:5b --attention fa3 --approx-steps 30 --out /tmp/approx.json
    python benchmarks/bench_gpu.py --smoke --out /tmp/smoke.json        # tiny, CPU ok, seconds
    python benchmarks/bench_gpu.py --merge a.json b.json --out all.json # combine runs' sections
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import functools
import gc
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import GIB, n_params, write_outputs  # noqa: E402
from benchmarks.common import machine_info as common_machine_info  # noqa: E402
from udpdiff.evaluation.runtime import measure_calls  # noqa: E402

logger = logging.getLogger("bench_gpu")

SECTIONS = ("gemm", "step", "step_fast", "sample", "sample_fast", "sample_parallel", "approx", "train", "train_fast")
APPROX_MODES = ("float8", "float8-tensorwise", "float8-attention", "float8-tensorwise-attention", "first-block",
                "faster", "pab")
# approx mode -> acceleration.approximate's float8 keys; "float8" stays rowwise, as in results written before
# tensorwise; the *-attention modes add FA3's float8 attention (float8_attention, needs --attention fa3)
APPROX_FLOAT8 = {"float8": {"float8": "rowwise"}, "float8-tensorwise": {"float8": "tensorwise"},
                 "float8-attention": {"float8_attention": True},
                 "float8-tensorwise-attention": {"float8": "tensorwise", "float8_attention": True}}

# Published CogVideoX 1.0 transformer configs (THUDM/CogVideoX-{2b,5b}/transformer/config.json).
COMMON = dict(attention_head_dim=64, time_embed_dim=512, text_embed_dim=4096, patch_size=2, max_text_seq_length=226,
              sample_frames=49, sample_height=60, sample_width=90, activation_fn="gelu-approximate",
              attention_bias=True, flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5, temporal_compression_ratio=4,
              spatial_interpolation_scale=1.875, temporal_interpolation_scale=1.0)
ARCHS: dict[str, dict[str, Any]] = {
    "2b": {"transformer": dict(COMMON, num_attention_heads=30, num_layers=30, use_rotary_positional_embeddings=False),
           "scheduler": "ddim", "scheduler_config": {"snr_shift_scale": 3.0}, "vae_scaling_factor": 1.15258426},
    "5b": {"transformer": dict(COMMON, num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True),
           "scheduler": "dpm", "scheduler_config": {"snr_shift_scale": 1.0}, "vae_scaling_factor": 0.7},
}
# CogVideoX's 3D VAE (AutoencoderKLCogVideoX's defaults are the released config).
VAE_CONFIG: dict[str, Any] = {}
FULL_SIZE = dict(frames=49, height=480, width=720)

# --smoke: the same code paths on toy sizes (seconds on a CPU)
SMOKE_COMMON = dict(COMMON, attention_head_dim=32, time_embed_dim=32, text_embed_dim=32, max_text_seq_length=16,
                    sample_frames=5, sample_height=4, sample_width=4)
SMOKE_ARCHS: dict[str, dict[str, Any]] = {
    "2b": dict(ARCHS["2b"], transformer=dict(SMOKE_COMMON, num_attention_heads=2, num_layers=2,
                                             use_rotary_positional_embeddings=False)),
    "5b": dict(ARCHS["5b"], transformer=dict(SMOKE_COMMON, num_attention_heads=2, num_layers=3,
                                             use_rotary_positional_embeddings=True)),
}
SMOKE_VAE = dict(down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
                 block_out_channels=(8, 8, 8, 8), latent_channels=16, layers_per_block=1, norm_num_groups=4)
SMOKE_SIZE = dict(frames=5, height=32, width=32)

H100_SXM_DENSE_BF16_TFLOPS = 989.4  # datasheet, for reference only; MFU uses the measured ceiling


# --------------------------------------------------------------------------------------------
# bookkeeping
# --------------------------------------------------------------------------------------------


class Bench:
    """Shared state: device, settings, the result dict and where it goes."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.smoke = args.smoke
        cuda = torch.cuda.is_available() and not args.cpu
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        self.cuda = cuda
        # bf16 throughout; only a smoke run on the CPU uses fp32 (CPU bf16 convolutions are very slow)
        self.dtype = torch.float32 if args.smoke and not cuda else torch.bfloat16
        self.archs = SMOKE_ARCHS if args.smoke else ARCHS
        self.vae_config = SMOKE_VAE if args.smoke else VAE_CONFIG
        self.size = SMOKE_SIZE if args.smoke else FULL_SIZE
        self.t_start = time.perf_counter()
        if cuda and args.memory_cap_gib:  # behave like a smaller GPU (the memory study: 5B on one 80 GB GPU)
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total), self.device)
        self.result: dict[str, Any] = {}
        # archs whose compiled block this process holds (torch._dynamo.reset() forgets them)
        self.compiled_archs: set[str] = set()
        if args.smoke and not cuda:
            # a CPU smoke run checks the code paths, not Inductor's C++ code generation (tens of
            # seconds per compile on a small CPU): the same graph capture, run by aot_eager
            from udpdiff import acceleration

            acceleration.BACKEND = "aot_eager"

    # -- time and memory -----------------------------------------------------------------------
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def timed(self, fn: Callable[[], Any]) -> float:
        """Seconds of one call of ``fn``, device work included (the project's one clock)."""
        return measure_calls(fn, 1, warmup=0).median

    # -- output --------------------------------------------------------------------------------
    def save(self) -> None:
        if self.rank != 0 or self.args.out is None:
            return
        self.result["wall_s"] = self.elapsed()
        write_outputs(self.result, self.args.out, render_markdown)


def gib(n: int | float | None) -> float | None:
    return None if n is None else n / GIB


def param_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


PACKAGES = ("torch", "diffusers", "deepspeed", "transformers", "numpy", "torchao")


def machine_info(bench: Bench) -> dict[str, Any]:
    return common_machine_info(bench.device, PACKAGES)


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------


def token_counts(cfg: dict[str, Any], size: dict[str, int]) -> dict[str, int]:
    lat_f = (size["frames"] - 1) // cfg["temporal_compression_ratio"] + 1
    lat_h, lat_w = size["height"] // 8, size["width"] // 8  # CogVideoX's VAE: 8x spatial
    p = cfg["patch_size"]
    video = lat_f * (lat_h // p) * (lat_w // p)
    return {"latent_frames": lat_f, "latent_height": lat_h, "latent_width": lat_w, "video_tokens": video,
            "text_tokens": cfg["max_text_seq_length"], "tokens": video + cfg["max_text_seq_length"]}


def forward_flops(cfg: dict[str, Any], size: dict[str, int], in_channels: int, out_channels: int,
                  batch: int) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of one transformer forward, from the config.

    Counted: the patch embedding (a p x p conv = 2·N_vid·(C·p²)·d) and text projection
    (2·N_txt·4096·d); per block the q, k, v, out projections (4 · 2·N·d²) and the feed-forward
    d -> 4d -> d (2 · 2·N·d·4d), i.e. 24·N·d², plus attention scores and values over the joint
    text+video sequence (QKᵀ and PV: 2 · 2·N²·d); the output projection (2·N_vid·d·p²·C_out).
    Not counted (<0.1%): the timestep MLP, the AdaLN modulation linears (per sample, not per
    token), layer norms, activations, softmax, rotary and the residual adds.
    """
    tc = token_counts(cfg, size)
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    p, n_vid, n_txt = cfg["patch_size"], tc["video_tokens"], tc["text_tokens"]
    n = n_vid + n_txt
    embed = 2 * n_vid * in_channels * p * p * d + 2 * n_txt * cfg["text_embed_dim"] * d
    linear = cfg["num_layers"] * 24 * n * d * d
    attention = cfg["num_layers"] * 4 * n * n * d
    out = 2 * n_vid * d * p * p * out_channels
    per_sample = embed + linear + attention + out
    return {"total": float(batch * per_sample), "per_sample": float(per_sample), "embed_and_out": float(embed + out),
            "linear": float(linear), "attention": float(attention), "batch": batch, **tc}


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


def build_transformer(bench: Bench, arch: str, ours: bool) -> torch.nn.Module:
    """Random weights, built on the device (fast even for 5B) and cast to bf16."""
    from diffusers import CogVideoXTransformer3DModel

    from udpdiff.models.transformer import LATENT_CHANNELS, UDPDiffTransformer3DModel

    cfg = dict(bench.archs[arch]["transformer"])
    torch.manual_seed(0 if not ours else 1)
    with torch.device(bench.device):
        if ours:
            model = UDPDiffTransformer3DModel(**cfg, in_channels=2 * LATENT_CHANNELS,
                                              out_channels=2 * LATENT_CHANNELS, num_tasks=2)
            # zero-initialised in the model; random here so the sum does real work
            torch.nn.init.normal_(model.task_embedding.weight, std=0.02)
        else:
            model = CogVideoXTransformer3DModel(**cfg, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS)
    return model.to(dtype=bench.dtype)


def model_channels(model: torch.nn.Module) -> int:
    return int(model.config.in_channels)


def rotary_tables(bench: Bench, model: torch.nn.Module, latent_frames: int):
    """The rotary tables CogVideoX-5B uses, as the training loop makes them (None for 2B)."""
    from udpdiff.train import rotary_embeddings

    return rotary_embeddings(model, 8, bench.size["height"], bench.size["width"], latent_frames,
                             torch.device(bench.device))


def step_inputs(bench: Bench, arch: str, channels: int, batch: int, seed: int) -> dict[str, Any]:
    cfg = bench.archs[arch]["transformer"]
    tc = token_counts(cfg, bench.size)
    g = torch.Generator(device=bench.device).manual_seed(seed)
    shape = (batch, tc["latent_frames"], channels, tc["latent_height"], tc["latent_width"])
    return {
        "hidden_states": torch.randn(shape, generator=g, device=bench.device, dtype=bench.dtype),
        "encoder_hidden_states": torch.randn((batch, cfg["max_text_seq_length"], cfg["text_embed_dim"]), generator=g,
                                             device=bench.device, dtype=bench.dtype),
        "timestep": torch.randint(0, 1000, (batch,), generator=g, device=bench.device),
    }


# --------------------------------------------------------------------------------------------
# gemm
# --------------------------------------------------------------------------------------------


def run_gemm(bench: Bench) -> None:
    a = bench.args
    shapes = [(256, 256, 256)] if bench.smoke else [(4096, 4096, 4096), (8192, 8192, 8192), (16384, 8192, 8192)]
    # a product the 5B model itself does: CFG batch 2 x (17550+226) tokens, d=3072 -> 4d
    if not bench.smoke:
        shapes.append((2 * 17776, 3072, 12288))
    rows = []
    for m, k, n in shapes:
        g = torch.Generator(device=bench.device).manual_seed(m + n)
        pairs = [(torch.randn((m, k), generator=g, device=bench.device, dtype=bench.dtype),
                  torch.randn((k, n), generator=g, device=bench.device, dtype=bench.dtype)) for _ in range(2)]
        for x, y in pairs * a.gemm_warmup:
            x @ y
        # each timed call runs a block of products: one ~0.2 ms product would mostly time the clock's sync
        block = pairs * max(1, a.gemm_iters // 2)

        def products(block=block) -> None:
            for x, y in block:
                x @ y

        times = [t / len(block) for t in measure_calls(products, 3, warmup=0).times]
        med = statistics.median(times)
        tflops = 2 * m * k * n / med / 1e12
        rows.append({"m": m, "k": k, "n": n, "median_s": med, "tflops": tflops,
                     "products_per_call": len(block), "calls": len(times)})
        logger.info("gemm %5d x %5d x %5d bf16: %8.1f TFLOP/s", m, k, n, tflops)
        del pairs
    square = [r for r in rows if r["m"] == r["k"] == r["n"] or bench.smoke] or rows
    best = max(square, key=lambda r: r["tflops"])
    bench.result["gemm"] = {"dtype": "bfloat16", "shapes": rows, "ceiling_tflops": best["tflops"],
                            "ceiling_shape": [best["m"], best["k"], best["n"]],
                            "note": "ceiling = best median over the square/large shapes (random inputs, torch.matmul, "
                                    "synchronised clock over blocks of products); the model-shaped row is for "
                                    "reference"}
    bench.free()


def ceiling_tflops(bench: Bench) -> float | None:
    g = bench.result.get("gemm")
    return g["ceiling_tflops"] if g else None


def mfu(bench: Bench, flops: float, seconds: float) -> dict[str, float | None]:
    achieved = flops / seconds / 1e12
    ceil = ceiling_tflops(bench)
    return {"tflops": achieved, "mfu": achieved / ceil if ceil else None,
            "mfu_vs_datasheet": achieved / H100_SXM_DENSE_BF16_TFLOPS if bench.cuda and not bench.smoke else None}


# --------------------------------------------------------------------------------------------
# step
# --------------------------------------------------------------------------------------------


def interleaved(bench: Bench, fns: dict[str, Callable[[], Any]], other_bytes: dict[str, int], warmup: int,
                iters: int) -> dict[str, dict[str, Any]]:
    """Time each of ``fns`` ``iters`` times, alternating A B / B A rounds; peak memory per call
    with the other models' resident bytes taken off (= as if the model ran alone)."""
    names = list(fns)
    for i in range(warmup):
        for name in names:
            logger.info("  warm-up %d/%d %s", i + 1, warmup, name)
            fns[name]()
    bench.sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, int | None] = {n: None for n in names}
    for i in range(iters):
        for name in (names if i % 2 == 0 else names[::-1]):
            bench.reset_peak()
            times[name].append(bench.timed(fns[name]))
            peak = bench.peak_bytes()
            if peak is not None:
                peaks[name] = max(peaks[name] or 0, peak - other_bytes.get(name, 0))
        logger.info("  round %d/%d: %s", i + 1, iters, ", ".join(f"{n} {times[n][-1]:.4f} s" for n in names))
    return {n: {"median_s": statistics.median(times[n]), "min_s": min(times[n]), "max_s": max(times[n]),
                "times_s": times[n], "peak_gib": gib(peaks[n])} for n in names}


def paired_overhead_pct(stock: dict[str, Any], ours: dict[str, Any]) -> float | None:
    """Median over rounds of ours/stock - 1, each pair timed back to back (cancels slow drift)."""
    a, b = stock.get("times_s"), ours.get("times_s")
    if not a or not b or len(a) != len(b):
        return None
    return 100 * statistics.median(y / x - 1 for x, y in zip(a, b, strict=True))


def run_step(bench: Bench, arch: str) -> None:
    a = bench.args
    logger.info("step %s: building stock and ours", arch)
    models = {"stock": build_transformer(bench, arch, ours=False).eval(),
              "ours": build_transformer(bench, arch, ours=True).eval()}
    sizes = {k: param_bytes(m) for k, m in models.items()}
    tc = token_counts(bench.archs[arch]["transformer"], bench.size)
    rotary = rotary_tables(bench, models["stock"], tc["latent_frames"])
    inputs = {k: step_inputs(bench, arch, model_channels(m), batch=2, seed=7) for k, m in models.items()}
    # CFG batch: [uncond, cond], one task id for both halves, as the pipeline passes it
    extra = {"stock": {}, "ours": {"task_id": torch.tensor([1])}}

    def call(name: str) -> Callable[[], Any]:
        def fn() -> Any:
            with torch.no_grad():
                return models[name](**inputs[name], image_rotary_emb=rotary, return_dict=False, **extra[name])[0]
        return fn

    other = {"stock": sizes["ours"], "ours": sizes["stock"]}
    res = interleaved(bench, {n: call(n) for n in models}, other, a.step_warmup, a.step_iters)
    cfg = bench.archs[arch]["transformer"]
    for name, m in models.items():
        ch = model_channels(m)
        fl = forward_flops(cfg, bench.size, ch, ch, batch=2)
        res[name].update(params=n_params(m), weights_gib=gib(sizes[name]), channels=ch, flops=fl["total"],
                         **mfu(bench, fl["total"], res[name]["median_s"]))
    entry = {
        "config": cfg, "batch": 2, "tokens": tc,
        "stock": res["stock"], "ours": res["ours"],
        "overhead_pct": 100 * (res["ours"]["median_s"] / res["stock"]["median_s"] - 1),
        "overhead_paired_pct": paired_overhead_pct(res["stock"], res["ours"]),
        "flops_breakdown_stock": forward_flops(cfg, bench.size, 16, 16, 2),
        "extra_flops_ours_pct": 100 * (res["ours"]["flops"] / res["stock"]["flops"] - 1),
        "warmup": a.step_warmup, "iters": a.step_iters, "gemm_ceiling_tflops": ceiling_tflops(bench),
    }
    bench.result.setdefault("step", {})[arch] = entry
    logger.info("step %s: stock %.4f s, ours %.4f s (%+.2f%%), MFU %.1f%% / %.1f%%", arch,
                res["stock"]["median_s"], res["ours"]["median_s"], entry["overhead_pct"],
                100 * (res["stock"]["mfu"] or 0), 100 * (res["ours"]["mfu"] or 0))


def acceleration_backend() -> str:
    from udpdiff import acceleration

    return acceleration.BACKEND


def run_step_fast(bench: Bench, arch: str) -> None:
    """Ours, one denoising step, eager against compiled blocks (``udpdiff.acceleration``: diffusers'
    regional compilation, fullgraph), same weights (a copy) and inputs, timed alternately. The
    first compiled call is timed on its own (compile + one step, after ``torch._dynamo.reset()``;
    Inductor's disk cache is cold only on a fresh machine: recorded). Both outputs are compared
    with each other and with an fp32 forward of the same bf16 weights, so "lossless" reads as:
    compiled is as far from fp32 as eager is."""
    from udpdiff.acceleration import accelerate
    from udpdiff.config import AccelerationParams

    a = bench.args
    torch._dynamo.reset()
    bench.compiled_archs = {arch}
    cache = inductor_cache_state()
    logger.info("step_fast %s: building ours (eager, fp32 reference, compiled copy); Inductor cache %s", arch, cache)
    eager = build_transformer(bench, arch, ours=True).eval()
    size = param_bytes(eager)
    tc = token_counts(bench.archs[arch]["transformer"], bench.size)
    rotary = rotary_tables(bench, eager, tc["latent_frames"])
    inputs = step_inputs(bench, arch, model_channels(eager), batch=2, seed=7)
    extra = {"task_id": torch.tensor([1])}

    def forward(model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
        kw = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in inputs.items()}
        with torch.no_grad():
            return model(**kw, image_rotary_emb=rotary, return_dict=False, **extra)[0]

    reference, reference_note = None, "skipped (--no-fp32-reference)"
    if not a.no_fp32_reference:
        try:
            with full_fp32():
                wide = copy.deepcopy(eager).float()
                reference = forward(wide, torch.float32).float()
            reference_note = "the bf16 weights run in fp32 (TF32 off)"
        except torch.cuda.OutOfMemoryError as exc:  # the comparison with eager still stands
            reference_note = f"not measured: out of memory ({str(exc)[:200]})"
        wide = None
        bench.free()
    eager_out = forward(eager)
    fast = copy.deepcopy(eager)
    done = accelerate(fast, AccelerationParams(compile_blocks=True, compile_mode=a.compile_mode), bench.device)
    bench.sync()
    t0 = time.perf_counter()
    fast_out = forward(fast)
    bench.sync()
    first_call_s = time.perf_counter() - t0
    logger.info("step_fast %s: first compiled call %.1f s (compile + one step)", arch, first_call_s)
    recompute = forward(fast)
    models = {"eager": eager, "compiled": fast}
    res = interleaved(bench, {n: functools.partial(forward, m) for n, m in models.items()},
                      {"eager": size, "compiled": size}, a.step_warmup, a.step_iters)
    cfg = bench.archs[arch]["transformer"]
    fl = forward_flops(cfg, bench.size, model_channels(eager), model_channels(eager), batch=2)["total"]
    for name in models:
        res[name].update(flops=fl, **mfu(bench, fl, res[name]["median_s"]))
    paired = paired_overhead_pct(res["eager"], res["compiled"])
    entry = {
        "config": cfg, "batch": 2, "tokens": tc, "eager": res["eager"], "compiled": res["compiled"],
        "speedup": res["eager"]["median_s"] / res["compiled"]["median_s"],
        "saving_pct": 100 * (1 - res["compiled"]["median_s"] / res["eager"]["median_s"]),
        "paired_saving_pct": None if paired is None else -paired,
        "first_call_s": first_call_s, "compile_s_estimate": first_call_s - res["compiled"]["median_s"],
        "compile": {"backend": acceleration_backend(), "mode": done.compile_mode, "fullgraph": True,
                    "blocks": type(eager.transformer_blocks[0]).__name__, "dynamo_reset": True,
                    "inductor_cache_at_start": cache},
        "compiled_vs_eager": tensor_differences(fast_out, eager_out),
        "compiled_rerun_identical": bool(torch.equal(fast_out, recompute)),
        "vs_fp32": None if reference is None else {"eager": tensor_differences(eager_out, reference),
                                                   "compiled": tensor_differences(fast_out, reference)},
        "fp32_reference": reference_note,
        "warmup": a.step_warmup, "iters": a.step_iters, "gemm_ceiling_tflops": ceiling_tflops(bench),
    }
    bench.result.setdefault("step_fast", {})[arch] = entry
    d = entry["compiled_vs_eager"]
    logger.info("step_fast %s: eager %.4f s, compiled %.4f s (-%.1f%%); compiled vs eager max |d| %.3g, rel L2 %.2e",
                arch, res["eager"]["median_s"], res["compiled"]["median_s"], entry["saving_pct"], d["max_abs"],
                d["rel_l2"])


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """fp32 matrix products and convolutions without TF32 (cuDNN allows it by default)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def inductor_cache_state() -> str:
    """Whether Inductor's on-disk cache already held compiled code when this section started."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        folder = Path(cache_dir())
    except Exception as exc:  # a private API: its absence must not stop a benchmark
        return f"unknown ({type(exc).__name__})"
    return f"{'warm' if folder.is_dir() and any(folder.iterdir()) else 'cold'} ({folder})"


# --------------------------------------------------------------------------------------------
# sample
# --------------------------------------------------------------------------------------------


def build_scheduler(bench: Bench, arch: str):
    from udpdiff.models.scheduler import build_scheduler as build

    spec = bench.archs[arch]
    return build({"type": spec["scheduler"], "config": spec["scheduler_config"]})


def build_vae(bench: Bench, arch: str):
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(2)
    with torch.device(bench.device):
        vae = AutoencoderKLCogVideoX(**bench.vae_config, scaling_factor=bench.archs[arch]["vae_scaling_factor"])
    vae = vae.to(dtype=bench.dtype).eval()
    vae.enable_tiling()
    vae.enable_slicing()
    return vae


def sample_steps(bench: Bench, arch: str, decode_estimate_s: float, section: str = "sample") -> tuple[int, str]:
    """Steps to time for this arch: ``--sample-steps`` unless the time budget cannot hold them
    (two samples per section: stock and ours, or ours eager and fast)."""
    a = bench.args
    steps = a.sample_steps
    if a.budget_s is None:
        return steps, "as asked"
    step_section, names = ("step", ("stock", "ours")) if section == "sample" else ("step_fast", ("eager", "compiled"))
    step = bench.result.get(step_section, {}).get(arch)
    per_step = sum(step[n]["median_s"] for n in names) if step else None
    if per_step is None:
        return steps, "as asked (no step timing to budget with)"
    left = a.budget_s - bench.elapsed() - 3 * decode_estimate_s - 45
    if section == "sample_fast":  # its untimed 2-step compile warm-up (the compile itself mostly cached)
        left -= 2 * per_step + 30
    fit = int(left // (per_step * 1.05))
    if fit >= steps:
        return steps, "as asked"
    return max(3, fit), f"reduced from {steps} to fit --budget-s={a.budget_s:.0f} (time left {left:.0f} s)"


class SampleTimer:
    """Instruments pipelines for a timed sample: precomputed prompt embeddings stand in for T5-XXL
    (excluded from the timing), every VAE decode is timed (and the videos it decodes counted), the
    end of denoising is marked, and the final latents can be kept for comparisons."""

    def __init__(self, bench: Bench, arch: str, steps: int):
        cfg = bench.archs[arch]["transformer"]
        g = torch.Generator(device=bench.device).manual_seed(11)
        text = torch.randn((2, cfg["max_text_seq_length"], cfg["text_embed_dim"]), generator=g, device=bench.device,
                           dtype=bench.dtype)
        self.bench, self.arch, self.steps = bench, arch, steps
        self.prompt_embeds, self.negative_embeds = text[1:], text[:1]
        self.decodes: list[tuple[float, int]] = []  # (seconds, videos) per decode_latents call
        self.marks: dict[str, float] = {}
        self.latents: torch.Tensor | None = None

    def instrument(self, pipe) -> None:
        pipe.set_progress_bar_config(disable=True)
        pipe.encode_prompt = lambda *args, **kwargs: (self.prompt_embeds, self.negative_embeds)
        inner = pipe.decode_latents

        def decode(latents, inner=inner):
            self.bench.sync()
            t0 = time.perf_counter()
            out = inner(latents)
            self.bench.sync()
            self.decodes.append((time.perf_counter() - t0, int(latents.shape[0])))
            return out

        pipe.decode_latents = decode

    def on_step(self, pipe, i, t, tensors):
        if (i + 1) % 10 == 0 or i + 1 == self.steps:
            logger.info("  step %d/%d", i + 1, self.steps)
        if i + 1 == self.steps:
            self.bench.sync()
            self.marks["denoised"] = time.perf_counter()
            if "latents" in tensors:
                self.latents = tensors["latents"].detach().float().clone()
        return {}

    def warm_vae(self, pipe, batch: int = 1) -> float:
        """One VAE decode of 3 latent frames at full resolution (every tile shape and the
        frame-batch path), untimed in the rows; the transformer is warmed by other sections."""
        tc = token_counts(self.bench.archs[self.arch]["transformer"], self.bench.size)
        with torch.no_grad():
            warm = torch.randn((batch, min(3, tc["latent_frames"]), 16, tc["latent_height"], tc["latent_width"]),
                               device=self.bench.device, dtype=self.bench.dtype)
            seconds = self.bench.timed(lambda: pipe.decode_latents(warm))
        self.decodes.clear()
        return seconds

    def warm_denoise(self, pipe) -> float:
        """Two untimed denoising steps through the pipeline's own loop (the call signature of the
        timed sample, so that one compiles nothing: this compiles, or reuses this process's
        compiled block); their seconds."""
        from diffusers import CogVideoXPipeline

        from udpdiff.tasks import task_id

        size, bench = self.bench.size, self.bench
        generator = torch.Generator(device=bench.device).manual_seed(0)
        bench.sync()
        t0 = time.perf_counter()
        with pipe.transformer.task_context(task_id("depth")):
            CogVideoXPipeline.__call__(pipe, "benchmark prompt", num_frames=size["frames"], height=size["height"],
                                       width=size["width"], guidance_scale=6.0, num_inference_steps=2,
                                       output_type="latent", generator=generator)
        bench.sync()
        return time.perf_counter() - t0

    def run(self, pipe, name: str, other_bytes: int, keep_latents: bool = False, **call_kwargs) -> tuple[dict, Any]:
        """One timed sample: total, denoising, VAE decode and the rest (to numpy, Pixelplanes)."""
        bench, size, steps = self.bench, self.bench.size, self.steps
        kwargs = dict(num_frames=size["frames"], height=size["height"], width=size["width"], guidance_scale=6.0,
                      num_inference_steps=steps, callback_on_step_end=self.on_step,
                      generator=torch.Generator(device=bench.device).manual_seed(0), **call_kwargs)
        if keep_latents:
            kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
        bench.free()
        bench.reset_peak()
        self.decodes.clear()
        self.marks.clear()
        self.latents = None
        logger.info("sample %s %s: %d steps + decode", self.arch, name, steps)
        bench.sync()
        t0 = time.perf_counter()
        result = pipe("benchmark prompt", **kwargs)
        bench.sync()
        total = time.perf_counter() - t0
        peak = bench.peak_bytes()
        denoise = self.marks["denoised"] - t0
        decode = sum(s for s, _ in self.decodes)
        row = {"steps": steps, "total_s": total, "denoise_s": denoise, "denoise_per_step_s": denoise / steps,
               "vae_decode_s": decode, "vae_decodes": sum(n for _, n in self.decodes),
               "vae_decode_calls": len(self.decodes), "post_s": total - denoise - decode,
               "peak_gib": gib(None if peak is None else peak - other_bytes)}
        target = bench.args.sample_steps
        if steps != target:
            row["scaled_total_s"] = row["total_s"] + (target / steps - 1) * denoise
            row["scaled_denoise_s"] = denoise * target / steps
        logger.info("sample %s %s: total %.1f s = denoise %.1f + VAE decode %.1f (%d calls, %d videos) + post %.1f; "
                    "peak %s GiB", self.arch, name, total, denoise, decode, len(self.decodes), row["vae_decodes"],
                    row["post_s"], f"{row['peak_gib']:.1f}" if row["peak_gib"] is not None else "-")
        return row, result


def run_sample(bench: Bench, arch: str) -> None:
    from diffusers import CogVideoXPipeline

    from udpdiff.pipeline import UDPDiffPipeline

    a = bench.args
    prior = [e for e in bench.result.get("sample", {}).values() if isinstance(e, dict) and "stock" in e]
    decode_est = prior[-1]["stock"]["vae_decode_s"] if prior else a.decode_guess_s
    steps, why = sample_steps(bench, arch, decode_est)
    logger.info("sample %s: %d steps (%s)", arch, steps, why)

    vae = build_vae(bench, arch)
    transformers = {"stock": build_transformer(bench, arch, ours=False).eval(),
                    "ours": build_transformer(bench, arch, ours=True).eval()}
    sizes = {k: param_bytes(m) for k, m in transformers.items()}
    pipes = {
        "stock": CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformers["stock"],
                                   scheduler=build_scheduler(bench, arch)),
        "ours": UDPDiffPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformers["ours"],
                                scheduler=build_scheduler(bench, arch)),
    }
    timer = SampleTimer(bench, arch, steps)
    for pipe in pipes.values():
        timer.instrument(pipe)
    t_warm = timer.warm_vae(pipes["stock"])
    logger.info("sample %s: VAE warm-up decode (3 latent frames) %.2f s", arch, t_warm)

    out: dict[str, Any] = {}
    for name, pipe in pipes.items():
        # stock decodes one latent; ours the RGB and the dense half, one video at a time here: the
        # VAE's slicing is on (the eager reference; sample_fast measures the batched decode)
        extra = {"output_type": "np"} if name == "stock" else {"task": "depth"}
        out[name], result = timer.run(pipe, name, sizes["ours" if name == "stock" else "stock"], **extra)
        del result
    entry = {
        "steps": steps, "steps_note": why, "target_steps": a.sample_steps,
        "scheduler": type(pipes["stock"].scheduler).__name__, "guidance_scale": 6.0,
        "size": bench.size, "vae": "AutoencoderKLCogVideoX, CogVideoX config, random weights, bf16, tiling+slicing",
        "vae_warmup_s": t_warm, "stock": out["stock"], "ours": out["ours"],
        "denoise_overhead_pct": 100 * (out["ours"]["denoise_s"] / out["stock"]["denoise_s"] - 1),
        "note": "text encoding (T5-XXL) excluded: random precomputed prompt embeddings; stock decodes one latent "
                "(output_type=np), ours decodes the RGB and the dense half (two VAE decodes: one call, sliced by the "
                "VAE into one video at a time) and Pixelplanes-decodes the depth colormap on the GPU (in post_s); "
                "one run each, after warm-up",
    }
    bench.result.setdefault("sample", {})[arch] = entry


def frame_differences(a: Any, b: Any) -> dict[str, float]:
    """uint8 videos (or float maps) of two runs: max and mean absolute difference, and the share of
    values more than 8 levels apart (uint8) or 0.05 (float maps)."""
    import numpy as np

    x, y = np.asarray(a), np.asarray(b)
    integer = np.issubdtype(x.dtype, np.integer)
    d = np.abs(x.astype(np.float64) - y.astype(np.float64))
    if not integer and np.issubdtype(x.dtype, np.floating):
        return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "share_over_0.05": float((d > 0.05).mean())}
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "share_over_8": float((d > 8).mean())}


def tensor_differences(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """How far ``out`` is from ``ref``: max and mean absolute difference, relative L2 error, and
    the reference's scale (max |ref|) to read them against."""
    o, r = out.detach().float(), ref.detach().float()
    d = (o - r).abs()
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "rel_l2": float((o - r).norm() / r.norm().clamp_min(1e-30)), "ref_max_abs": float(r.abs().max())}


def sample_differences(out, ref, out_latents: torch.Tensor, ref_latents: torch.Tensor) -> dict[str, dict]:
    """How far one sample (a ``UDPDiffPipelineOutput`` and its final latents) is from a reference
    sample of the same seed: latents, decoded video, colormap and decoded depth."""
    return {"latents": tensor_differences(out_latents, ref_latents),
            "videos": frame_differences(out.videos, ref.videos),
            "colormaps": frame_differences(out.colormaps, ref.colormaps),
            "depth": frame_differences(out.dense, ref.dense)}


def run_sample_fast(bench: Bench, arch: str) -> None:
    """Ours, the whole sample, eager (blocks eager, two VAE decodes one at a time: the old path)
    and fast (compiled blocks + the video and the colormap in one batched VAE call), same seed:
    times, and how far the fast sample's final latents, frames and depth are from eager's."""

    from udpdiff.acceleration import accelerate_pipeline
    from udpdiff.config import AccelerationParams
    from udpdiff.pipeline import UDPDiffPipeline

    a = bench.args
    cache = inductor_cache_state()
    prior = [e for e in bench.result.get("sample", {}).values() if isinstance(e, dict) and "stock" in e]
    decode_est = prior[-1]["stock"]["vae_decode_s"] if prior else a.decode_guess_s
    steps, why = sample_steps(bench, arch, decode_est, section="sample_fast")
    logger.info("sample_fast %s: %d steps (%s)", arch, steps, why)

    vae = build_vae(bench, arch)  # tiling + slicing; the fast path turns slicing off (batched decode)
    transformer = build_transformer(bench, arch, ours=True).eval()
    pipe = UDPDiffPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                           scheduler=build_scheduler(bench, arch))
    timer = SampleTimer(bench, arch, steps)
    timer.instrument(pipe)
    t_warm = {"sequential": timer.warm_vae(pipe), "batched": None}
    vae.disable_slicing()
    t_warm["batched"] = timer.warm_vae(pipe, batch=2)
    vae.enable_slicing()
    logger.info("sample_fast %s: VAE warm-up decodes %s", arch, t_warm)

    rows, results, latents = {}, {}, {}
    rows["eager"], results["eager"] = timer.run(pipe, "eager", 0, keep_latents=True, task="depth")
    latents["eager"] = timer.latents

    settings = AccelerationParams(compile_blocks=True, compile_mode=a.compile_mode, vae_decode="batched")
    compiled_before = arch in bench.compiled_archs
    bench.compiled_archs.add(arch)
    if a.attention == "fa3":  # FlashAttention-3 forward in every attention layer (udpdiff.attention)
        from udpdiff.attention import use_flash_attention3

        use_flash_attention3(transformer)
    done = accelerate_pipeline(pipe, settings)
    warmup_s = timer.warm_denoise(pipe)
    rows["fast"], results["fast"] = timer.run(pipe, "fast", 0, keep_latents=True, task="depth")
    latents["fast"] = timer.latents
    rows["fast"]["compile_warmup_s"] = warmup_s
    rows["fast"]["compile_s_estimate"] = warmup_s - 2 * rows["fast"]["denoise_per_step_s"]
    entry = {
        "steps": steps, "steps_note": why, "target_steps": a.sample_steps,
        "scheduler": type(pipe.scheduler).__name__, "guidance_scale": 6.0, "size": bench.size,
        "eager": {**rows["eager"], "decode": "sequential (VAE slicing: one video at a time)", "blocks": "eager"},
        "fast": {**rows["fast"], "decode": "batched (one VAE call, whole frames: no tiling)",
                 "blocks": f"compiled ({acceleration_backend()}, mode {done.compile_mode})"},
        "speedup_total": rows["eager"]["total_s"] / rows["fast"]["total_s"],
        "speedup_denoise": rows["eager"]["denoise_s"] / rows["fast"]["denoise_s"],
        "vae_warmup_s": t_warm,
        "compile_cache": "warm: step_fast compiled the same block earlier in this process" if compiled_before else
                         f"this section's own compile; Inductor cache at start: {cache}",
        "vs_eager": sample_differences(results["fast"], results["eager"], latents["fast"], latents["eager"]),
        "note": "ours only, same seed and weights; eager = eager blocks + two VAE decodes one at a time (tiling + "
                "slicing); fast = compiled blocks + one batched decode (no tiling, no slicing); compile_warmup_s = an "
                "untimed 2-step denoise before the fast sample (compile + 2 steps); text encoding excluded",
    }
    bench.result.setdefault("sample_fast", {})[arch] = entry
    v = entry["vs_eager"]
    logger.info("sample_fast %s: eager %.1f s, fast %.1f s (x%.3f); latents rel L2 %.2e, videos max |d| %.0f "
                "mean %.3f", arch, rows["eager"]["total_s"], rows["fast"]["total_s"], entry["speedup_total"],
                v["latents"]["rel_l2"], v["videos"]["max_abs"], v["videos"]["mean_abs"])


def run_sample_parallel(bench: Bench, arch: str) -> None:
    """Ours, fast path (compiled blocks, ``--attention``, batched decode), one sample split over this
    launch's ranks (``udpdiff.parallel``: each rank its slice of every CFG batch and of the VAE
    decode), then the same sample on rank 0 alone (the one-GPU reference; the other ranks wait):
    times, and how far the split sample's latents and frames are from the one-GPU sample's."""
    import torch.distributed as dist

    from udpdiff.acceleration import accelerate_pipeline
    from udpdiff.config import AccelerationParams
    from udpdiff.distributed import Ranks
    from udpdiff.parallel import remove_cfg_split, split_cfg_batch
    from udpdiff.pipeline import UDPDiffPipeline

    a = bench.args
    init_distributed(bench)
    ranks = Ranks(dist.get_rank(), dist.get_world_size())
    steps = a.sample_steps
    transformer = build_transformer(bench, arch, ours=True).eval()
    pipe = UDPDiffPipeline(tokenizer=None, text_encoder=None, vae=build_vae(bench, arch), transformer=transformer,
                           scheduler=build_scheduler(bench, arch))
    timer = SampleTimer(bench, arch, steps)
    timer.instrument(pipe)
    done = accelerate_pipeline(pipe, AccelerationParams(compile_blocks=True, compile_mode=a.compile_mode,
                                                        vae_decode="batched", attention=a.attention))

    def warm(label: str) -> float:
        """Two denoising steps through the pipeline's loop (compiles this batch size) + a VAE decode."""
        seconds = timer.warm_denoise(pipe) + timer.warm_vae(pipe, batch=2)
        logger.info("sample_parallel %s: %s warm-up %.1f s", arch, label, seconds)
        return seconds

    split = split_cfg_batch(pipe, ranks)
    rows, results, latents = {}, {}, {}
    warmups = {"split": warm("split")}
    rows["split"], results["split"] = timer.run(pipe, f"split over {ranks.world} GPUs", 0, keep_latents=True,
                                                task="depth")
    latents["split"] = timer.latents
    rows["split"]["calls_split"] = split.splits if split else 0  # transformer and VAE calls, warm-ups included
    remove_cfg_split(pipe)
    if ranks.is_main:  # the one-GPU reference, same weights, seed and compiled block (batch 2 compiles once)
        warmups["one_gpu"] = warm("one GPU")
        rows["one_gpu"], results["one_gpu"] = timer.run(pipe, "one GPU", 0, keep_latents=True, task="depth")
        latents["one_gpu"] = timer.latents
    ranks.barrier()
    if not ranks.is_main:
        return
    key = f"{arch}_{ranks.world}gpu"
    entry = bench.result.setdefault("sample_parallel", {})[key] = {
        "arch": arch, "gpus": ranks.world, "steps": steps, "scheduler": type(pipe.scheduler).__name__,
        "guidance_scale": 6.0, "size": bench.size, "attention": done.attention,
        "blocks": f"compiled ({acceleration_backend()}, mode {done.compile_mode})", "warmup_s": warmups,
        "split": rows["split"], "one_gpu": rows["one_gpu"],
        "speedup": rows["one_gpu"]["total_s"] / rows["split"]["total_s"],
        "vs_one_gpu": sample_differences(results["split"], results["one_gpu"], latents["split"],
                                         latents["one_gpu"]),
        "note": "CFG-parallel (udpdiff.parallel): each rank runs its half of every CFG-2 transformer batch and of "
                "the batched VAE decode, all-gathered over NCCL; the one-GPU reference runs on rank 0 afterwards "
                "with the same weights and seed; text encoding excluded",
    }
    logger.info("sample_parallel %s: %d GPUs %.1f s, one GPU %.1f s (x%.2f); latents rel L2 %.2e", arch, ranks.world,
                rows["split"]["total_s"], rows["one_gpu"]["total_s"], entry["speedup"],
                entry["vs_one_gpu"]["latents"]["rel_l2"])


def approx_settings(bench: Bench, mode: str):
    """``acceleration`` for one row of the approx section: the lossless fast path (compiled blocks,
    ``--attention``, batched decode) plus the mode; faster and pab keep the blocks eager (auto)."""
    from udpdiff.config import AccelerationParams

    a = bench.args
    base = {"compile_blocks": True, "compile_mode": a.compile_mode, "vae_decode": "batched", "attention": a.attention}
    approximate = (APPROX_FLOAT8[mode] if mode in APPROX_FLOAT8 else {} if mode == "lossless"
                   else {"cache": {"type": mode}})
    if mode in ("faster", "pab"):
        base["compile_blocks"] = "auto"
    return AccelerationParams.model_validate({**base, "approximate": approximate})


@contextlib.contextmanager
def first_block_decisions() -> Iterator[list[bool]]:
    """The first-block cache's per-step decisions (True = the other blocks ran), as they are made."""
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook

    decide = FBCHeadBlockHook._should_compute_remaining_blocks
    seen: list[bool] = []

    def spy(self, residual):
        seen.append(decide(self, residual))
        return seen[-1]

    FBCHeadBlockHook._should_compute_remaining_blocks = spy
    try:
        yield seen
    finally:
        FBCHeadBlockHook._should_compute_remaining_blocks = decide


def latent_psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR (dB) of ``out`` against ``ref``, the peak being the reference's value range."""
    o, r = out.detach().float(), ref.detach().float()
    mse = float((o - r).pow(2).mean())
    peak = float(r.max() - r.min())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def approx_one(bench: Bench, arch: str, mode: str, vae, timer: SampleTimer) -> tuple[dict, Any, Any]:
    """One mode: a fresh transformer (same seed, same weights), the fast path + the mode, an untimed
    2-step warm-up when the blocks are compiled, then the timed sample."""

    from udpdiff.acceleration import AccelerationError, accelerate_pipeline
    from udpdiff.pipeline import UDPDiffPipeline

    transformer = build_transformer(bench, arch, ours=True).eval()
    pipe = UDPDiffPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                           scheduler=build_scheduler(bench, arch))
    timer.instrument(pipe)
    try:
        done = accelerate_pipeline(pipe, approx_settings(bench, mode))
    except AccelerationError as exc:
        return {"status": "skipped", "reason": str(exc)}, None, None
    warmup_s = timer.warm_denoise(pipe) if done.compiled_blocks else None
    with first_block_decisions() as decisions:
        row, result = timer.run(pipe, mode, 0, keep_latents=True, task="depth")
    row.update(status="measured", compile_warmup_s=warmup_s, attention=done.attention, float8=done.float8,
               cache=done.cache, blocks="compiled" if done.compiled_blocks else f"eager ({done.reason})")
    if mode == "first-block":
        row["first_block_full_steps"] = sum(decisions)
    return row, result, timer.latents


def run_approx(bench: Bench, arch: str) -> None:
    """The approximate modes against the lossless fast path, same prompt embedding, seed and weights:
    speed per mode and its quality cost (latent PSNR / relative L2, decoded frames)."""
    a = bench.args
    modes = [m for m in a.approx_modes.split(",") if m]
    unknown = set(modes) - set(APPROX_MODES)
    if unknown:
        raise SystemExit(f"--approx-modes: unknown {sorted(unknown)}; choose from {APPROX_MODES}")
    steps = a.approx_steps or a.sample_steps
    vae = build_vae(bench, arch)
    timer = SampleTimer(bench, arch, steps)
    entry: dict[str, Any] = {
        "steps": steps, "target_steps": a.sample_steps,
        "steps_note": "as asked" if steps == a.sample_steps else f"--approx-steps {steps} (not {a.sample_steps}): "
                      f"totals are also scaled to {a.sample_steps} steps (scaled_total_s); quality is at {steps}",
        "scheduler": None, "guidance_scale": 6.0, "size": bench.size, "attention": a.attention, "modes": {},
        "note": "ours, random weights; every row a fresh transformer of the same seed (the same weights), the same "
                "precomputed prompt embedding and seed; lossless = compiled blocks + --attention + batched decode; "
                "float8 (rowwise), float8-tensorwise, float8-attention (FA3's e4m3 kernel), "
                "float8-tensorwise-attention (both) and first-block add to it (first-block compiles the blocks "
                "beneath its hooks); faster and pab run eager blocks (their attention hooks cannot sit in a compiled "
                "block). Quality vs lossless: latent PSNR (peak = the lossless latents' range) and relative L2 of the "
                "final latents, uint8 differences of the decoded video and colormap. Random weights make the caches' "
                "skip decisions unrepresentative of a trained model: the figures bound cost, not quality on real "
                "prompts",
    }
    bench.result.setdefault("approx", {})[arch] = entry
    ref_row, ref, ref_latents = approx_one(bench, arch, "lossless", vae, timer)
    entry["lossless"] = ref_row
    entry["scheduler"] = build_scheduler(bench, arch).__class__.__name__
    bench.free()
    bench.save()
    for mode in modes:
        logger.info("approx %s: %s", arch, mode)
        row, result, latents = approx_one(bench, arch, mode, vae, timer)
        if result is not None:
            row["vs_lossless"] = {
                "latents": {**tensor_differences(latents, ref_latents), "psnr_db": latent_psnr(latents, ref_latents)},
                "videos": frame_differences(result.videos, ref.videos),
                "colormaps": frame_differences(result.colormaps, ref.colormaps)}
            row["speedup_denoise"] = ref_row["denoise_s"] / row["denoise_s"]
        entry["modes"][mode] = row
        result = latents = None
        bench.free()
        bench.save()  # a run stopped by a time limit keeps every mode it measured


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------


def init_distributed(bench: Bench) -> None:
    """The training loop's own process-group setup (one rank here; launchers set the env)."""
    from udpdiff.train import init_distributed as init

    init(torch.device(bench.device))


def zero2_config(bf16: bool = True, path: Path | str = "infra/deepspeed/zero2.json", optimizer: str = "adamw",
                 master_weights: str = "fp32") -> dict[str, Any]:
    """A shipped DeepSpeed JSON (``--deepspeed-config``; infra/deepspeed/zero2.json by default) with
    its "auto" fields filled by the training code itself, from the paper profile's settings (micro
    batch 1, no accumulation, clipping 1.0, lr 1e-5) and ``train.optimizer`` / ``train.master_weights``
    (refused as training refuses them: adamw8bit needs ZeRO-0, bf16 weights need adamw8bit)."""
    from pydantic import ValidationError

    from udpdiff.config import load_params
    from udpdiff.train import DeepSpeedConfigError, load_deepspeed_config

    p = load_params(ROOT / "params.yaml", profile="cogvideox-2b")
    try:
        p = p.with_overrides({"train.precision": "bf16" if bf16 else "fp32", "train.optimizer": optimizer,
                              "train.master_weights": master_weights})
        return load_deepspeed_config(ROOT / path, p)
    except (ValidationError, DeepSpeedConfigError) as exc:
        raise SystemExit(f"train_fast: {exc}") from None


def train_batch(bench: Bench, arch: str, channels: int, seed: int) -> dict[str, torch.Tensor]:
    """One v-prediction batch (micro batch 1) on the device."""
    cfg = bench.archs[arch]["transformer"]
    tc = token_counts(cfg, bench.size)
    g = torch.Generator(device=bench.device).manual_seed(seed)
    shape = (1, tc["latent_frames"], channels, tc["latent_height"], tc["latent_width"])
    x0 = torch.randn(shape, generator=g, device=bench.device)
    noise = torch.randn(shape, generator=g, device=bench.device)
    alphas = build_scheduler(bench, arch).alphas_cumprod.to(bench.device)
    t = torch.randint(0, len(alphas), (1,), generator=g, device=bench.device)
    a = alphas[t].view(-1, 1, 1, 1, 1)
    return {
        "noisy": (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(bench.dtype),
        "v_target": a.sqrt() * noise - (1 - a).sqrt() * x0,
        "timestep": t,
        "text": torch.randn((1, cfg["max_text_seq_length"], cfg["text_embed_dim"]), generator=g, device=bench.device,
                            dtype=bench.dtype),
    }


def zero2_one(bench: Bench, arch: str, name: str, ds_config: dict[str, Any], world: int,
              compiled: bool = False, checkpointing: bool | str = "full", fused: bool = False,
              optimizer_kind: str = "adamw", master_weights: str = "fp32") -> dict[str, Any]:
    """Build, wrap in a DeepSpeed engine, time; everything is freed when this returns. ``name`` is
    stock or ours; ``compiled``: ours with compiled blocks; ``checkpointing``: full, selective or
    off; ``fused``: fused AdamW. All three as training applies them (``udpdiff.acceleration``:
    checkpointing, then compiled blocks, then DeepSpeed); ``optimizer_kind`` adamw8bit and
    ``master_weights`` bf16 as ``train.optimizer`` / ``train.master_weights`` do."""
    import deepspeed

    from udpdiff.acceleration import accelerate, bf16_parameters, checkpoint_activations
    from udpdiff.acceleration import optimizer as build_optimizer
    from udpdiff.config import AccelerationParams

    a = bench.args
    cfg = bench.archs[arch]["transformer"]
    tc = token_counts(cfg, bench.size)
    logger.info("train %s %s (%s blocks, %s checkpointing, %s AdamW): ZeRO-2 on %d GPU(s), building", arch, name,
                "compiled" if compiled else "eager", checkpointing,
                "DeepSpeed's" if "optimizer" in ds_config else "fused" if fused else "foreach", world)
    model = build_transformer(bench, arch, ours=name == "ours")
    if master_weights == "bf16":
        bf16_parameters(model)
    checkpoint_activations(model, checkpointing)
    model.train()
    if compiled:
        accelerate(model, AccelerationParams(compile_blocks=True, compile_mode=a.compile_mode), bench.device)
    ch = model_channels(model)
    params = n_params(model)
    # as training does: DeepSpeed builds the optimizer when the JSON names one (CPU Adam for ZeRO-Offload)
    optimizer = None if "optimizer" in ds_config else \
        build_optimizer(optimizer_kind, model.parameters(), bench.device, bf16_weights=master_weights == "bf16",
                        fused=fused, lr=1e-5, weight_decay=1e-4)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), optimizer=optimizer,
                                           config=copy.deepcopy(ds_config))
    batch = train_batch(bench, arch, ch, seed=3 + bench.rank)
    rotary = rotary_tables(bench, model, tc["latent_frames"])
    extra = {"task_id": torch.tensor([1])} if name == "ours" else {}
    losses: list[torch.Tensor] = []

    def step() -> None:
        pred = engine(hidden_states=batch["noisy"], encoder_hidden_states=batch["text"], timestep=batch["timestep"],
                      image_rotary_emb=rotary, return_dict=False, **extra)[0]
        loss = (pred.float() - batch["v_target"]).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())

    # the warm-up steps are timed too: the first one's excess over the median is the compile cost
    warmup_times = measure_calls(step, a.train_warmup, warmup=0, label="train warm-up", progress=True).times \
        if a.train_warmup else []
    times = measure_calls(step, a.train_iters, warmup=0, label="train step", before_timed=bench.reset_peak,
                          progress=True).times
    med = statistics.median(times)
    fl = forward_flops(cfg, bench.size, ch, ch, batch=1)["total"]
    ceil = ceiling_tflops(bench)
    loss_values = [float(x) for x in losses]
    row = {
        "median_s": med, "min_s": min(times), "max_s": max(times), "times_s": times,
        "tokens_per_s_per_gpu": tc["video_tokens"] / med, "samples_per_s": world / med,
        "params": params, "channels": ch, "fwd_flops": fl,
        "model_tflops": 3 * fl / med / 1e12, "mfu_3x": 3 * fl / med / 1e12 / ceil if ceil else None,
        "hw_tflops_4x": 4 * fl / med / 1e12, "mfu_4x": 4 * fl / med / 1e12 / ceil if ceil else None,
        "peak_gib": gib(bench.peak_bytes()),
        "reserved_peak_gib": gib(torch.cuda.max_memory_reserved(bench.device)) if bench.cuda else None,
        "loss_first_last": [loss_values[0], loss_values[-1]],
        "loss_finite": all(math.isfinite(x) for x in loss_values),
        "losses": loss_values, "warmup_times_s": warmup_times,
    }
    logger.info("train %s %s: %.3f s/step, %.0f tokens/s/GPU, MFU %s, peak %s GiB", arch, name, med,
                row["tokens_per_s_per_gpu"], _pct(row["mfu_3x"]), _f(row["peak_gib"], "{:.1f}"))
    if hasattr(engine, "destroy"):
        engine.destroy()
    return row


def run_train_zero2(bench: Bench, arch: str) -> None:
    """fwd+bwd+optimizer under ZeRO-2 on this process group's GPUs; stock then ours (they do not
    both fit beside their optimizer states, so this one is sequential, not interleaved)."""
    import torch.distributed as dist

    a = bench.args
    init_distributed(bench)
    world = dist.get_world_size()
    ds_config = zero2_config(bf16=bench.dtype == torch.bfloat16)
    rows: dict[str, Any] = {}
    for name in ("stock", "ours"):
        rows[name] = zero2_one(bench, arch, name, ds_config, world)
        bench.free()
    key = f"{arch}_zero2_{world}gpu"
    bench.result.setdefault("train", {})[key] = {
        "arch": arch, "gpus": world, "deepspeed_config": ds_config, "optimizer": "torch.optim.AdamW (client)",
        "gradient_checkpointing": True, "micro_batch": 1, "loss": "v-prediction MSE (fp32)",
        "stock": rows["stock"], "ours": rows["ours"],
        "overhead_pct": 100 * (rows["ours"]["median_s"] / rows["stock"]["median_s"] - 1),
        "warmup": a.train_warmup, "iters": a.train_iters, "gemm_ceiling_tflops": ceiling_tflops(bench),
        "order": "sequential (stock, then ours): both with optimizer states do not fit at once",
        "conventions": "tokens = video tokens per sample (text tokens not counted); MFU 3x = model FLOPs "
                       "(fwd + 2x fwd for bwd) / time / GEMM ceiling; 4x counts the recomputed forward of "
                       "gradient checkpointing too",
    }


def run_fwd_bwd(bench: Bench, arch: str) -> None:
    """fwd+bwd (no optimizer) at batch 1 with gradient checkpointing, stock and ours interleaved:
    the setting of the reference figure (5B: 3.7 s, 28 GiB on one H100)."""
    a = bench.args
    cfg = bench.archs[arch]["transformer"]
    models = {"stock": build_transformer(bench, arch, ours=False), "ours": build_transformer(bench, arch, ours=True)}
    sizes = {k: param_bytes(m) for k, m in models.items()}
    tc = token_counts(cfg, bench.size)
    rotary = rotary_tables(bench, models["stock"], tc["latent_frames"])
    batches = {}
    for name, m in models.items():
        m.enable_gradient_checkpointing()
        m.train()
        batches[name] = train_batch(bench, arch, model_channels(m), seed=5)
    extra = {"stock": {}, "ours": {"task_id": torch.tensor([1])}}

    def call(name: str) -> Callable[[], None]:
        def fn() -> None:
            for m in models.values():  # only this model's grads live during its call
                m.zero_grad(set_to_none=True)
            b = batches[name]
            pred = models[name](hidden_states=b["noisy"], encoder_hidden_states=b["text"], timestep=b["timestep"],
                                image_rotary_emb=rotary, return_dict=False, **extra[name])[0]
            (pred.float() - b["v_target"]).pow(2).mean().backward()
        return fn

    other = {"stock": sizes["ours"], "ours": sizes["stock"]}
    fns = {name: call(name) for name in models}
    res = interleaved(bench, fns, other, a.train_warmup, a.train_iters)
    for name, m in models.items():
        ch = model_channels(m)
        fl = forward_flops(cfg, bench.size, ch, ch, batch=1)["total"]
        med = res[name]["median_s"]
        ceil = ceiling_tflops(bench)
        res[name].update(channels=ch, params=n_params(m), fwd_flops=fl, tokens_per_s_per_gpu=tc["video_tokens"] / med,
                         model_tflops=3 * fl / med / 1e12, mfu_3x=(3 * fl / med / 1e12) / ceil if ceil else None,
                         hw_tflops_4x=4 * fl / med / 1e12, mfu_4x=(4 * fl / med / 1e12) / ceil if ceil else None)
    bench.result.setdefault("train", {})[f"{arch}_fwd_bwd_1gpu"] = {
        "arch": arch, "what": "fwd+bwd, no optimizer, batch 1, gradient checkpointing, bf16 weights and grads "
                              "(reference: stock 5B 3.7 s, 28 GiB on one H100)",
        "stock": res["stock"], "ours": res["ours"],
        "overhead_pct": 100 * (res["ours"]["median_s"] / res["stock"]["median_s"] - 1),
        "overhead_paired_pct": paired_overhead_pct(res["stock"], res["ours"]),
        "warmup": a.train_warmup, "iters": a.train_iters, "gemm_ceiling_tflops": ceiling_tflops(bench),
    }
    logger.info("fwd+bwd %s: stock %.3f s, ours %.3f s", arch, res["stock"]["median_s"], res["ours"]["median_s"])


def run_train(bench: Bench, arch: str) -> None:
    gpus = torch.cuda.device_count() if bench.cuda else 1
    if arch == "5b" and bench.world < 2:
        reason = (f"5B ZeRO-2 needs 2 GPUs (bf16 weights+grads 22 GB, fp32 master + Adam 67 GB); this run has "
                  f"{bench.world} process(es) on {gpus} visible GPU(s)"
                  + ("" if gpus >= 2 else "; no multi-GPU machine kind was lent for this run"))
        if bench.smoke:
            reason += " (smoke run)"
        bench.result.setdefault("train", {})["5b_zero2_2gpu"] = {"status": "not run", "reason": reason}
        logger.info("train 5b ZeRO-2: not run (%s); measuring fwd+bwd on one GPU instead", reason)
        if bench.world == 1:
            run_fwd_bwd(bench, arch)
        return
    run_train_zero2(bench, arch)


# the training variants of train_fast: (compiled blocks, activation checkpointing, fused AdamW)
TRAIN_VARIANTS = {
    "eager": (False, "full", False),        # the eager baseline: diffusers' full checkpointing, foreach AdamW
    "compiled": (True, "full", False),      # + compiled blocks
    "fast": (True, "selective", True),      # + selective checkpointing + fused AdamW (the CUDA default)
    "fast-nockpt": (True, False, True),     # no checkpointing at all (memory permitting)
}


def optimizer_offload(ds_config: dict[str, Any]) -> str:
    """Where a DeepSpeed JSON keeps the optimizer states: ``none`` (the GPU), ``cpu`` or ``nvme``."""
    return (ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")


def train_fast_key(arch: str, world: int, ds_config: dict[str, Any], memory_cap_gib: float | None,
                   optimizer: str = "adamw", master_weights: str = "fp32") -> str:
    """The result's key: the ZeRO stage and offload the JSON actually sets (``2b_zero1_1gpu`` for a
    stage-1 config, not the default's name), an optimizer other than AdamW, bf16 weights, and the
    memory cap."""
    offload = optimizer_offload(ds_config)
    return (f"{arch}_zero{ds_config.get('zero_optimization', {}).get('stage', 0)}_{world}gpu"
            + ("" if offload == "none" else f"_offload-{offload}")
            + ("" if optimizer == "adamw" else f"_{optimizer}")
            + ("" if master_weights == "fp32" else f"_{master_weights}-weights")
            + (f"_cap{memory_cap_gib:g}gib" if memory_cap_gib else ""))


def run_train_fast(bench: Bench, arch: str) -> None:
    """Ours under ``--deepspeed-config`` (ZeRO-2 by default, as ``train``: micro batch 1, bf16), one
    row per ``--train-variants`` entry (``TRAIN_VARIANTS``), same initial weights and batch: seconds
    per step, the compile (the first step's excess over the median), peak memory and the loss of
    every step beside the eager row's (step 1 compares forwards of equal weights; later steps include
    the updates' drift). The JSON is written after each variant; a variant that runs out of memory
    is recorded as such."""
    import torch.distributed as dist

    a = bench.args
    ds_config = zero2_config(bf16=bench.dtype == torch.bfloat16, path=a.deepspeed_config,
                             optimizer=a.train_optimizer, master_weights=a.master_weights)
    offload = optimizer_offload(ds_config)
    if arch == "5b" and bench.world < 2 and offload == "none" and a.master_weights == "fp32":
        reason = (f"5B ZeRO-2 needs 2 GPUs (see train), an optimizer offload (--deepspeed-config "
                  f"infra/deepspeed/zero2-offload.json) or 8-bit states on bf16 weights (--train-optimizer "
                  f"adamw8bit --master-weights bf16); this run has {bench.world} process(es)"
                  + (" (smoke run)" if bench.smoke else ""))
        bench.result.setdefault("train_fast", {})["5b_zero2_2gpu"] = {"status": "not run", "reason": reason}
        logger.info("train_fast 5b: not run (%s)", reason)
        return
    init_distributed(bench)
    world = dist.get_world_size()
    torch._dynamo.reset()  # training compiles its own graphs (forward, backward); time them cold
    bench.compiled_archs.clear()
    key = train_fast_key(arch, world, ds_config, a.memory_cap_gib, a.train_optimizer, a.master_weights)
    entry = bench.result.setdefault("train_fast", {})[key] = {
        "arch": arch, "gpus": world, "deepspeed_config": ds_config, "deepspeed_config_file": a.deepspeed_config,
        "optimizer_offload": offload, "memory_cap_gib": a.memory_cap_gib, "micro_batch": 1,
        "loss": "v-prediction MSE (fp32)",
        "optimizer": "DeepSpeed's (from the JSON)" if "optimizer" in ds_config else
                     "torchao AdamW8bit (client; 8-bit moments)" if a.train_optimizer == "adamw8bit" else
                     "torch.optim.AdamW (client; foreach or fused)",
        "master_weights": a.master_weights,
        "compile": {"backend": acceleration_backend(), "mode": a.compile_mode, "fullgraph": True,
                    "dynamo_reset": True, "inductor_cache_at_start": inductor_cache_state()},
        "variants": {}, "warmup": a.train_warmup, "iters": a.train_iters, "gemm_ceiling_tflops": ceiling_tflops(bench),
        "order": "sequential, in --train-variants order: two engines with optimizer states do not fit at once",
    }
    for name in a.train_variants:
        compiled, checkpointing, fused = TRAIN_VARIANTS[name]
        by_deepspeed = "optimizer" in ds_config
        setting = {"compiled_blocks": compiled, "checkpointing": checkpointing or "off",
                   "fused_adamw": fused and not by_deepspeed and a.train_optimizer == "adamw",
                   "optimizer": f"DeepSpeed AdamW (offload: {offload})" if by_deepspeed else
                                "torchao AdamW8bit" + (", bf16 weights" if a.master_weights == "bf16" else "")
                                if a.train_optimizer == "adamw8bit" else "torch AdamW"}
        try:
            row = zero2_one(bench, arch, "ours", ds_config, world, compiled=compiled, checkpointing=checkpointing,
                            fused=fused, optimizer_kind=a.train_optimizer, master_weights=a.master_weights)
        except torch.OutOfMemoryError as exc:
            logger.error("train_fast %s %s: out of memory", arch, name)
            row = {"status": "failed", "reason": f"OOM: {exc}"[:300]}
        bench.free()
        row = entry["variants"][name] = {"setting": setting, **row}
        eager = entry["variants"].get("eager")
        if name != "eager" and eager and "median_s" in eager and "median_s" in row:
            rel = [abs(f - e) / abs(e) for e, f in zip(eager["losses"], row["losses"], strict=True)]
            row.update(speedup_vs_eager=eager["median_s"] / row["median_s"],
                       saving_pct=100 * (1 - row["median_s"] / eager["median_s"]),
                       loss_rel_diff={"first_step": rel[0], "max": max(rel), "last": rel[-1], "steps": len(rel)})
        if compiled and "median_s" in row:
            row["compile_s_estimate"] = row["warmup_times_s"][0] - row["median_s"]
        bench.save()
        if "median_s" in row:
            logger.info("train_fast %s %s: %.3f s/step, MFU %s, peak %s GiB", arch, name, row["median_s"],
                        _pct(row["mfu_3x"]), _f(row["peak_gib"], "{:.1f}"))


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------



def _difference_cells(v: dict) -> str:
    """Table cells of one :func:`sample_differences` result: latents rel. L2 · max abs, videos and
    colormaps max · mean abs (uint8), depth mean abs."""
    return (f"{v['latents']['rel_l2']:.2e} · {v['latents']['max_abs']:.3g} | "
            f"{v['videos']['max_abs']:.0f} · {v['videos']['mean_abs']:.3f} | "
            f"{v['colormaps']['max_abs']:.0f} · {v['colormaps']['mean_abs']:.3f} | {v['depth']['mean_abs']:.4f}")

def _f(v: Any, fmt: str = "{:.3f}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return fmt.format(v)


def _pct(v: Any) -> str:
    return _f(None if v is None else 100 * v, "{:.1f}%")


def _size(r: dict[str, Any]) -> str:
    size = r.get("settings", {}).get("size") or FULL_SIZE
    text = f"{size['frames']}x{size['height']}x{size['width']}"
    return text + (" (latent 13x60x90: 17550 video + 226 text tokens)" if size == FULL_SIZE else "")


def render_markdown(r: dict[str, Any]) -> str:
    m = r.get("machine", {})
    lines = [f"# GPU benchmarks ({r.get('date', '?')})", ""]
    gpu = m.get("gpu", {})
    v = m.get("versions", {})
    lines.append(f"Device: {gpu.get('name', m.get('device', '?'))}; torch {v.get('torch')}, diffusers "
                 f"{v.get('diffusers')}, deepspeed {v.get('deepspeed')}; CUDA {v.get('cuda')}. "
                 f"{'SMOKE RUN (toy sizes): numbers mean nothing. ' if r.get('settings', {}).get('smoke') else ''}"
                 f"Random weights, {r.get('settings', {}).get('dtype')}, {_size(r)}.")
    lines.append("")
    if "gemm" in r:
        g = r["gemm"]
        lines += ["## bf16 GEMM ceiling", "", "| m | k | n | TFLOP/s |", "|---:|---:|---:|---:|"]
        lines += [f"| {s['m']} | {s['k']} | {s['n']} | {s['tflops']:.4g} |" for s in g["shapes"]]
        lines += ["", f"Ceiling used for MFU: **{g['ceiling_tflops']:.4g} TFLOP/s** "
                      f"({'x'.join(map(str, g['ceiling_shape']))}).", ""]
        per_run = [f"{x['file']} {x['gemm']['ceiling_tflops']:.1f}" for x in r.get("runs", []) if x.get("gemm")]
        if len(per_run) > 1:
            lines += [f"Each section's MFU uses the ceiling measured in its own run: {'; '.join(per_run)} TFLOP/s.",
                      ""]
    if "step" in r:
        lines += ["## Denoising step (transformer forward, CFG batch 2, no_grad)", "",
                  "| arch | model | s/step (median) | overhead vs stock | TFLOP/s | MFU | peak GiB |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for arch, e in r["step"].items():
            for name in ("stock", "ours"):
                x = e[name]
                ov = ""
                if name == "ours":
                    ov = _f(e["overhead_pct"], "{:+.2f}%") + (f" (paired {e['overhead_paired_pct']:+.2f}%)"
                                                            if e.get("overhead_paired_pct") is not None else "")
                lines.append(f"| {arch} | {name} ({x['channels']} ch) | {_f(x['median_s'], '{:.4f}')} | {ov} | "
                             f"{_f(x['tflops'], '{:.0f}')} | {_pct(x['mfu'])} | {_f(x['peak_gib'], '{:.1f}')} |")
        lines += ["", "Stock and ours timed alternately in the same process (A B, B A, ...); overhead = ratio of "
                      "medians - 1, paired = median of per-round ratios - 1. MFU = analytic forward "
                      "FLOPs (linears 24·N·d² per block + attention 4·N²·d per block + patch/text/out projections) "
                      "/ time / GEMM ceiling. Peak = max allocated during the call minus the other model's weights.",
                  ""]
    if "sample" in r:
        lines += ["## Sample (denoising loop + VAE decode; T5 text encoding excluded)", "",
                  "| arch | model | steps | total s | denoise s | per step s | VAE decode s (n) | post s | peak GiB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for arch, e in r["sample"].items():
            if "stock" not in e:
                continue
            for name in ("stock", "ours"):
                x = e[name]
                lines.append(f"| {arch} ({e['scheduler']}) | {name} | {x['steps']} | {_f(x['total_s'], '{:.1f}')} | "
                             f"{_f(x['denoise_s'], '{:.1f}')} | {_f(x['denoise_per_step_s'], '{:.3f}')} | "
                             f"{_f(x['vae_decode_s'], '{:.1f}')} ({x['vae_decodes']}) | {_f(x['post_s'], '{:.1f}')} | "
                             f"{_f(x['peak_gib'], '{:.1f}')} |")
            scaled = [f"{n} ≈ {e[n]['scaled_total_s']:.1f} s" for n in ("stock", "ours") if "scaled_total_s" in e[n]]
            if scaled:
                lines.append(f"| {arch} | scaled to {e['target_steps']} steps | | {'; '.join(scaled)} | | | | | |")
        notes = {e["note"] for e in r["sample"].values() if "note" in e}
        steps_notes = [f"{a}: {e['steps_note']}" for a, e in r["sample"].items() if "steps_note" in e]
        lines += ["", *sorted(notes), "Steps: " + "; ".join(steps_notes) + ".", ""]
    if "train" in r:
        lines += ["## Training step (micro batch 1, gradient checkpointing, bf16)", "",
                  "| setting | model | s/step | tokens/s/GPU | MFU (3x fwd) | MFU (4x, recompute) | peak GiB |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for key, e in r["train"].items():
            if "stock" not in e:
                lines.append(f"| {key} | {e.get('status', '')}: {e.get('reason', '')} | | | | | |")
                continue
            for name in ("stock", "ours"):
                x = e[name]
                ov = f" ({e['overhead_pct']:+.2f}%)" if name == "ours" else ""
                lines.append(f"| {key} | {name} ({x['channels']} ch) | {_f(x['median_s'])}{ov} | "
                             f"{_f(x['tokens_per_s_per_gpu'], '{:.0f}')} | {_pct(x['mfu_3x'])} | {_pct(x['mfu_4x'])} | "
                             f"{_f(x['peak_gib'], '{:.1f}')} |")
        lines += ["", "ZeRO-2 rows: DeepSpeed with infra/deepspeed/zero2.json (auto fields: micro batch 1, no "
                      "accumulation, clipping 1.0, bf16), torch AdamW; fwd_bwd rows: no optimizer. Tokens = video "
                      "tokens (17550/sample).", ""]
    if "step_fast" in r:
        lines += ["## Fast path: denoising step, ours, eager vs compiled blocks (CFG batch 2, no_grad)", "",
                  "| arch | blocks | s/step (median) | saving | MFU | first call s (compile + step) | peak GiB |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for arch, e in r["step_fast"].items():
            for name in ("eager", "compiled"):
                x = e[name]
                saving = "" if name == "eager" else (
                    _f(e["saving_pct"], "{:.1f}%") + (f" (paired {e['paired_saving_pct']:.1f}%)"
                                                      if e.get("paired_saving_pct") is not None else ""))
                first = "" if name == "eager" else _f(e["first_call_s"], "{:.1f}")
                lines.append(f"| {arch} | {name} | {_f(x['median_s'], '{:.4f}')} | {saving} | {_pct(x['mfu'])} | "
                             f"{first} | {_f(x['peak_gib'], '{:.1f}')} |")
        lines += ["", "| arch | compiled vs eager: max abs · rel L2 (of max abs ref) | vs fp32, eager: rel L2 | "
                      "vs fp32, compiled: rel L2 | compile |", "|---|---|---:|---:|---|"]
        for arch, e in r["step_fast"].items():
            d, f32 = e["compiled_vs_eager"], e.get("vs_fp32") or {}
            c = e["compile"]
            lines.append(f"| {arch} | {d['max_abs']:.3g} · {d['rel_l2']:.2e} (of {d['ref_max_abs']:.3g}) | "
                         f"{_f((f32.get('eager') or {}).get('rel_l2'), '{:.2e}')} | "
                         f"{_f((f32.get('compiled') or {}).get('rel_l2'), '{:.2e}')} | {c['backend']}, mode "
                         f"{c['mode']}, fullgraph; Inductor cache at start: {c['inductor_cache_at_start']} |")
        lines += ["", "Same weights (a copy) and inputs; eager and compiled timed alternately. The fp32 columns run "
                      "the same bf16 weights in fp32: compiled is lossless when its distance from fp32 matches "
                      "eager's. First call = compile after torch._dynamo.reset() + one step.", ""]
    if "sample_fast" in r:
        lines += ["## Fast path: full sample, ours, eager vs compiled blocks + batched VAE decode", "",
                  "| arch | path | steps | total s | denoise s | per step s | VAE decode s (calls, videos) | post s | "
                  "peak GiB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for arch, e in r["sample_fast"].items():
            if "eager" not in e:
                continue
            for name in ("eager", "fast"):
                x = e[name]
                lines.append(f"| {arch} ({e['scheduler']}) | {name}: {x['blocks']}, {x['decode']} | {x['steps']} | "
                             f"{_f(x['total_s'], '{:.1f}')} | {_f(x['denoise_s'], '{:.1f}')} | "
                             f"{_f(x['denoise_per_step_s'], '{:.3f}')} | {_f(x['vae_decode_s'], '{:.1f}')} "
                             f"({x['vae_decode_calls']}, {x['vae_decodes']}) | {_f(x['post_s'], '{:.1f}')} | "
                             f"{_f(x['peak_gib'], '{:.1f}')} |")
            scaled = [f"{n} ≈ {e[n]['scaled_total_s']:.1f} s" for n in ("eager", "fast") if "scaled_total_s" in e[n]]
            if scaled:
                lines.append(f"| {arch} | scaled to {e['target_steps']} steps | | {'; '.join(scaled)} | | | | | |")
        lines += ["", "| arch | speed-up total · denoise | compile warm-up s | latents vs eager: rel L2 · max abs | "
                      "videos: max · mean abs (uint8) | colormaps: max · mean | depth: mean abs |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for arch, e in r["sample_fast"].items():
            if "eager" not in e:
                continue
            v = e["vs_eager"]
            lines.append(f"| {arch} | x{e['speedup_total']:.3f} · x{e['speedup_denoise']:.3f} | "
                         f"{_f(e['fast'].get('compile_warmup_s'), '{:.1f}')} | {_difference_cells(v)} |")
        notes = {e["note"] for e in r["sample_fast"].values() if "note" in e}
        caches = [f"{a}: {e['compile_cache']}" for a, e in r["sample_fast"].items() if "compile_cache" in e]
        lines += ["", *sorted(notes), "Compile: " + "; ".join(caches) + ".", ""]
    if "sample_parallel" in r:
        lines += ["## CFG-parallel: one sample over several GPUs (ours, fast path)", "",
                  "| setting | GPUs | steps | total s | denoise s | per step s | VAE decode s | post s | "
                  "peak GiB/GPU |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key, e in r["sample_parallel"].items():
            for name, gpus in (("one_gpu", 1), ("split", e["gpus"])):
                x = e[name]
                lines.append(f"| {key} ({e['attention']}) | {gpus} | {x['steps']} | {_f(x['total_s'], '{:.1f}')} | "
                             f"{_f(x['denoise_s'], '{:.1f}')} | {_f(x['denoise_per_step_s'], '{:.3f}')} | "
                             f"{_f(x['vae_decode_s'], '{:.1f}')} | {_f(x['post_s'], '{:.1f}')} | "
                             f"{_f(x['peak_gib'], '{:.1f}')} |")
        lines += ["", "| setting | speed-up | latents vs one GPU: rel L2 · max abs | videos: max · mean abs (uint8) | "
                      "colormaps: max · mean | depth: mean abs |", "|---|---:|---:|---:|---:|---:|"]
        for key, e in r["sample_parallel"].items():
            v = e["vs_one_gpu"]
            lines.append(f"| {key} | x{e['speedup']:.2f} | {_difference_cells(v)} |")
        lines += ["", *sorted({e["note"] for e in r["sample_parallel"].values()}), ""]
    if "approx" in r:
        lines += ["## Approximate sampling modes against the lossless fast path (ours, same seed and weights)", "",
                  "| arch | mode | blocks | steps | s/step | total s | total s scaled | latents vs lossless: PSNR dB · "
                  "rel L2 | videos: max · mean abs | colormaps: max · mean abs |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for arch, e in r["approx"].items():
            for name, x in [("lossless", e.get("lossless", {})), *e.get("modes", {}).items()]:
                if x.get("status") != "measured":
                    lines.append(f"| {arch} | {name} | {x.get('status', '?')}: {x.get('reason', '')} | | | | | | | |")
                    continue
                v = x.get("vs_lossless")
                q = ("reference", "", "") if v is None else (
                    f"{_f(v['latents']['psnr_db'], '{:.1f}')} · {v['latents']['rel_l2']:.2e}",
                    f"{v['videos']['max_abs']:.0f} · {v['videos']['mean_abs']:.2f}",
                    f"{v['colormaps']['max_abs']:.0f} · {v['colormaps']['mean_abs']:.2f}")
                lines.append(f"| {arch} | {name} | {x['blocks']} | {x['steps']} | "
                             f"{_f(x['denoise_per_step_s'])} | {_f(x['total_s'], '{:.1f}')} | "
                             f"{_f(x.get('scaled_total_s'), '{:.1f}')} | {q[0]} | {q[1]} | {q[2]} |")
        notes = {e["note"] for e in r["approx"].values() if "note" in e}
        steps_notes = [f"{a}: {e['steps_note']}" for a, e in r["approx"].items() if "steps_note" in e]
        lines += ["", *sorted(notes), "Steps: " + "; ".join(steps_notes) + ".", ""]
    if "train_fast" in r:
        lines += ["## Fast path: training step, ours (DeepSpeed, micro batch 1; the key names the ZeRO stage, "
                  "optimizer and memory cap)", "",
                  "| setting | variant: blocks, checkpointing, AdamW | s/step | saving | tokens/s/GPU | MFU (3x fwd) | "
                  "peak GiB | first step s | loss vs eager (rel.): first · max over steps |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for key, e in r["train_fast"].items():
            if "variants" not in e and "eager" not in e:
                lines.append(f"| {key} | {e.get('status', '')}: {e.get('reason', '')} | | | | | | | |")
                continue
            variants = e.get("variants") or {  # results written before the variants existed
                "eager": {"setting": {"compiled_blocks": False, "checkpointing": "full", "fused_adamw": False},
                          **e["eager"]},
                "compiled": {"setting": {"compiled_blocks": True, "checkpointing": "full", "fused_adamw": False},
                             **e["compiled"], "saving_pct": e["saving_pct"], "loss_rel_diff": e["loss_rel_diff"]}}
            for name, x in variants.items():
                st = x["setting"]
                optimizer = st.get("optimizer", "")
                if optimizer in ("", "torch AdamW"):
                    optimizer = "fused" if st["fused_adamw"] else "foreach"
                what = f"{name}: {'compiled' if st['compiled_blocks'] else 'eager'}, {st['checkpointing']}, {optimizer}"
                if "median_s" not in x:
                    lines.append(f"| {key} | {what} | {x.get('status', '')}: {x.get('reason', '')[:80]} | | | | | | |")
                    continue
                d = x.get("loss_rel_diff")
                loss = f"{d['first_step']:.1e} · {d['max']:.1e} ({d['steps']} steps)" if d else ""
                lines.append(f"| {key} | {what} | {_f(x['median_s'])} | {_f(x.get('saving_pct'), '{:.1f}%')} | "
                             f"{_f(x['tokens_per_s_per_gpu'], '{:.0f}')} | {_pct(x['mfu_3x'])} | "
                             f"{_f(x['peak_gib'], '{:.1f}')} | {_f(x['warmup_times_s'][0], '{:.1f}')} | {loss} |")
        lines += ["", "Same initial weights and batch; variants one after another in one process. First step = the "
                      "compile of the forward, backward and recomputation graphs + one step. Checkpointing: full "
                      "recomputes each block in the backward; selective keeps matmul and attention outputs "
                      "(udpdiff.acceleration). MFU counts 3x the forward's FLOPs whatever is recomputed.", ""]
    for note in r.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def merge(paths: list[Path], notes: list[str] | None = None) -> dict[str, Any]:
    """Sections of several runs in one result (later files win per arch/key); each run's meta
    is kept under ``runs``."""
    merged: dict[str, Any] = {"benchmark": "gpu", "runs": []}
    for path in paths:
        r = json.loads(path.read_text())
        for key in ("date", "machine", "settings"):
            merged.setdefault(key, copy.deepcopy(r.get(key)))
        versions = (merged.get("machine") or {}).get("versions")
        if versions is not None:  # a run that did not import DeepSpeed records it as None
            for name, version in ((r.get("machine") or {}).get("versions") or {}).items():
                if versions.get(name) is None:
                    versions[name] = version
        merged["runs"].append({"file": path.name, "date": r.get("date"), "plan": r.get("settings", {}).get("plan"),
                               "wall_s": r.get("wall_s"), "argv": r.get("settings", {}).get("argv"),
                               "gemm": r.get("gemm")})
        if r.get("gemm") and "gemm" not in merged:
            merged["gemm"] = r["gemm"]  # the first run's; each section's MFU uses its own run's ceiling
        for section in SECTIONS[1:]:
            for key, value in r.get(section, {}).items():
                merged.setdefault(section, {})[key] = value
        merged.setdefault("notes", [])
        merged["notes"] += [n for n in r.get("notes", []) if n not in merged["notes"]]
    for section in ("step", "train"):  # runs made before the paired figure existed
        for entry in merged.get(section, {}).values():
            if isinstance(entry, dict) and "stock" in entry and "overhead_paired_pct" not in entry:
                entry["overhead_paired_pct"] = paired_overhead_pct(entry["stock"], entry["ours"])
    merged["notes"] += [n for n in notes or [] if n not in merged["notes"]]
    return merged


def parse_sections(text: str, archs: list[str]) -> dict[str, list[str]]:
    """``gemm,step,sample:5b,train:2b+5b`` -> {section: archs}; a section without ``:`` takes
    ``--archs``. Sections always run in the order of ``SECTIONS`` (gemm, step, step_fast, sample,
    sample_fast, train, train_fast)."""
    plan: dict[str, list[str]] = {}
    for token in filter(None, text.split(",")):
        name, _, which = token.partition(":")
        plan[name] = [a for a in which.split("+") if a] if which else list(archs)
    unknown = set(plan) - set(SECTIONS)
    bad_archs = {a for v in plan.values() for a in v} - set(ARCHS)
    if unknown or bad_archs:
        raise SystemExit(f"unknown sections {sorted(unknown)} or archs {sorted(bad_archs)}")
    return {k: plan[k] for k in SECTIONS if k in plan}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="JSON path (a .md table is written beside it)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma list of {SECTIONS}; 'sample:2b' or 'train:2b+5b' picks archs per section")
    p.add_argument("--archs", default="5b,2b", help="comma list of 2b,5b (order = run order)")
    p.add_argument("--smoke", action="store_true", help="toy configs and sizes, few iterations (CPU ok)")
    p.add_argument("--cpu", action="store_true", help="use the CPU even if CUDA is available")
    p.add_argument("--gemm-warmup", type=int, default=3)
    p.add_argument("--gemm-iters", type=int, default=20)
    p.add_argument("--step-warmup", type=int, default=3)
    p.add_argument("--step-iters", type=int, default=8, help="timed calls per model (median)")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--decode-guess-s", type=float, default=25.0, help="VAE decode estimate before one is measured")
    p.add_argument("--train-warmup", type=int, default=3)
    p.add_argument("--train-iters", type=int, default=8)
    p.add_argument("--train-variants", type=lambda v: v.split(","), default=["eager", "compiled", "fast"],
                   help=f"train_fast's rows, comma list of {list(TRAIN_VARIANTS)} (eager first: the others are "
                        "compared with it)")
    p.add_argument("--deepspeed-config", default="infra/deepspeed/zero2.json",
                   help="train_fast: the shipped DeepSpeed JSON (zero2-offload.json: optimizer states on the CPU)")
    p.add_argument("--train-optimizer", default="adamw", choices=["adamw", "adamw8bit"],
                   help="train_fast: train.optimizer (adamw8bit: torchao's 8-bit moments; needs a ZeRO-0 JSON, "
                        "infra/deepspeed/zero0.json)")
    p.add_argument("--master-weights", default="fp32", choices=["fp32", "bf16"],
                   help="train_fast: train.master_weights (bf16: no fp32 copy, with --train-optimizer adamw8bit)")
    p.add_argument("--memory-cap-gib", type=float, default=None,
                   help="cap this process's GPU memory (torch's per-process fraction): a smaller GPU's budget")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "fa3"],
                   help="sample_fast, approx: the fast path's attention (fa3: udpdiff.attention, needs fa3-fwd and "
                        "sm90)")
    p.add_argument("--compile-mode", default="default", choices=["default", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode of the *_fast sections' blocks (params.yaml acceleration.compile_mode)")
    p.add_argument("--approx-modes", default=",".join(APPROX_MODES),
                   help=f"approx: comma list of {APPROX_MODES}, each measured against the lossless fast path")
    p.add_argument("--approx-steps", type=int, default=None,
                   help="approx: denoising steps per sample (default --sample-steps; totals are scaled to it)")
    p.add_argument("--no-fp32-reference", action="store_true",
                   help="step_fast: skip the fp32 forward that eager and compiled bf16 outputs are measured against")
    p.add_argument("--budget-s", type=float, default=None,
                   help="whole-run time budget; sample steps are reduced (and scaled, marked) to fit it")
    p.add_argument("--merge", type=Path, nargs="+", default=None, help="combine result JSONs into --out; no runs")
    p.add_argument("--note", action="append", default=[], help="with --merge: a note to add (repeatable)")
    args = p.parse_args(argv)
    unknown = set(args.train_variants) - set(TRAIN_VARIANTS)
    if unknown:
        p.error(f"--train-variants: unknown {sorted(unknown)}; choose from {list(TRAIN_VARIANTS)}")
    if args.smoke:
        for name, value in (("gemm_warmup", 1), ("gemm_iters", 2), ("step_warmup", 1), ("step_iters", 2),
                            ("sample_steps", 2), ("train_warmup", 1), ("train_iters", 2)):
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    if args.merge:
        if args.out is None:
            raise SystemExit("--merge needs --out")
        result = merge(args.merge, args.note)
        write_outputs(result, args.out, render_markdown)
        print(render_markdown(result))
        return 0
    archs = [a for a in args.archs.split(",") if a]
    plan = parse_sections(args.sections, archs)
    sections = list(plan)
    bench = Bench(args)
    if bench.world > 1 and set(sections) - {"gemm", "sample_parallel", "train", "train_fast"}:
        raise SystemExit("a multi-process launch runs only --sections gemm,sample_parallel,train,train_fast")
    for noisy in ("diffusers", "deepspeed", "DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    bench.result.update({
        "benchmark": "gpu",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(bench),
        "settings": {"sections": sections, "plan": plan, "archs": archs, "smoke": args.smoke, "size": bench.size,
                     "dtype": str(bench.dtype).removeprefix("torch."), "argv": sys.argv[1:] if argv is None else argv,
                     "iterations": {k: getattr(args, k) for k in ("gemm_warmup", "gemm_iters", "step_warmup",
                                                                  "step_iters", "sample_steps", "train_warmup",
                                                                  "train_iters")},
                     "budget_s": args.budget_s, "compile_mode": args.compile_mode, "attention": args.attention,
                     "approx_modes": args.approx_modes, "approx_steps": args.approx_steps,
                     "compile_backend": acceleration_backend()},
        "notes": ["random weights; models built on the device and cast to bf16; eager PyTorch (no torch.compile) "
                  "except the *_fast sections' compiled blocks; diffusers' default attention processor (SDPA)"],
    })
    logger.info("device %s, sections %s, archs %s", bench.device, sections, archs)
    runners: dict[str, Callable[[Bench, str], None]] = {
        "step": run_step, "step_fast": run_step_fast, "sample": run_sample, "sample_fast": run_sample_fast,
        "sample_parallel": run_sample_parallel, "approx": run_approx, "train": run_train, "train_fast": run_train_fast}
    if "gemm" in sections:  # every rank measures its own GPU; rank 0 writes
        run_gemm(bench)
        bench.save()
    for section in SECTIONS[1:]:
        for arch in plan.get(section, []):
            logger.info("== %s %s (t=%.0f s)", section, arch, bench.elapsed())
            try:
                runners[section](bench, arch)
            except torch.cuda.OutOfMemoryError as exc:
                logger.error("%s %s: out of memory: %s", section, arch, exc)
                bench.result.setdefault(section, {})[arch] = {"status": "failed", "reason": f"OOM: {exc}"[:500]}
            bench.free()
            bench.save()
    if bench.rank == 0:
        print(render_markdown(bench.result))
        if args.out:
            print(f"wrote {args.out} and {args.out.with_suffix('.md')} ({bench.elapsed():.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
