"""Seconds per VAE training step for several widths and batch sizes (issue 12's segmentation ceiling).

Attempt 5 found the ``small`` VAE, not the transformer, capping segmentation (mIoU 0.707 for exact
colormaps through it) with its loss still falling at step 1,000 of batch 8: the lever is more
videos seen or more width. Whether a bigger batch or a wider VAE costs proportionally more time
depends on whether the step is compute-bound or launch-bound, which only a measurement says. Each
row times :class:`udpdiff.models.vae.VaeTrainStep` (the stage's own step) on random videos of the
``small`` clip size; the JSON (+ markdown) is rewritten after each row.

``--modes`` times the same step under other execution settings (the VAE is ~9 of a ``small`` run's ~22
GPU minutes): ``eager`` (the stage's), ``cudnn-benchmark`` (cuDNN picks its conv3d algorithms by timing),
``channels-last`` (``channels_last_3d`` weights and input), ``compile`` (``torch.compile`` of the encoder
and decoder). ``--profile-steps N`` adds the eager step's top operators by device time (``profile.txt``
beside ``--out``): where the step spends it.

    python benchmarks/bench_vae_train.py --out benchmarks/results/vae-train-h200.json     # a GPU
    python benchmarks/bench_vae_train.py --widths 32,64,64 --batches 8 --profile-steps 3 --out vae-modes.json \
        --modes eager cudnn-benchmark channels-last compile                      # the execution settings, a GPU
    python benchmarks/bench_vae_train.py --widths 32,64,64 --batches 2 --frames 9 --size 32 --repeats 2  # CPU check
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import machine_info, n_params, write_outputs  # noqa: E402
from udpdiff.acceleration import compiled_while_training  # noqa: E402
from udpdiff.config import load_params  # noqa: E402
from udpdiff.evaluation.runtime import measure_calls  # noqa: E402
from udpdiff.models.vae import VaeTrainStep, build_vae  # noqa: E402

MODES = ("eager", "cudnn-benchmark", "channels-last", "compile")


def vae_and_batch(widths: list[int], batch: int, frames: int, size: int,
                  device: torch.device) -> tuple[torch.nn.Module, torch.Tensor]:
    """The ``small`` VAE config with ``widths`` as ``block_out_channels`` (seed 0, training mode) and a batch of
    random videos in [-1, 1]."""
    spec = load_params(ROOT / "params.yaml", profile="small").active.vae.model_dump()
    spec["config"]["block_out_channels"] = widths
    vae = build_vae(spec, seed=0).to(device).train()
    return vae, torch.rand((batch, 3, frames, size, size), device=device).mul(2).sub(1)


def measure(widths: list[int], batch: int, frames: int, size: int, repeats: int, device: torch.device,
            mode: str = "eager") -> dict:
    """One row: the ``small`` VAE config with ``widths`` as ``block_out_channels``, trained on ``batch`` random
    videos of ``frames`` x ``size`` x ``size``, under the execution setting ``mode`` (``MODES``)."""
    vae, x = vae_and_batch(widths, batch, frames, size, device)
    torch.backends.cudnn.benchmark = mode == "cudnn-benchmark"
    if mode == "channels-last":
        for param in vae.parameters():  # only the conv3d kernels are 5-D
            if param.dim() == 5:
                param.data = param.data.contiguous(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    train_step = VaeTrainStep(vae, steps=1000, lr=1e-4, kl_weight=1e-6)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # compile as the autoencoder stage does (acceleration.compile_vae); its first calls build the
    # kernels: a third warm-up call keeps them out of the timed ones
    with compiled_while_training([vae.encoder, vae.decoder], enabled=mode == "compile"):
        m = measure_calls(lambda: train_step(x)["vae_loss"].item(), repeats, warmup=3 if mode == "compile" else 2,
                          label=f"{widths} b{batch} {mode}")
    torch.backends.cudnn.benchmark = False
    row = {"block_out_channels": widths, "batch": batch, "mode": mode, "params": n_params(vae), "median_s": m.median,
           "videos_per_s": batch / m.median, "iqr_s": m.iqr}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def profile_step(widths: list[int], batch: int, frames: int, size: int, steps: int, device: torch.device) -> str:
    """The eager step's operators by device time (CPU time on a CPU) over ``steps`` steps after two warm-up ones."""
    vae, x = vae_and_batch(widths, batch, frames, size, device)
    train_step = VaeTrainStep(vae, steps=1000, lr=1e-4, kl_weight=1e-6)
    for _ in range(2):
        train_step(x)["vae_loss"].item()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            train_step(x)["vae_loss"].item()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return (f"VAE {widths} batch {batch}, {frames}x{size}x{size}, {steps} steps, eager, by {sort}\n"
            + prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60))


def render_markdown(result: dict[str, Any]) -> str:
    head = (f"# VAE training step ({result['machine'].get('gpu', {}).get('name', result['machine']['device'])}, "
            f"{result['frames']}x{result['size']}x{result['size']} videos, bf16 autocast on a GPU)\n\n")
    if not result["rows"]:
        return head + "no rows yet\n"
    df = pd.DataFrame(result["rows"])
    df["block_out_channels"] = df["block_out_channels"].map(lambda w: "[" + ", ".join(map(str, w)) + "]")
    return head + df.to_markdown(index=False, floatfmt=".3f") + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", nargs="+", default=["32,64,64", "64,128,128"],
                    help="block_out_channels per VAE, comma-separated")
    ap.add_argument("--batches", default="8,16,32", help="batch sizes, comma-separated")
    ap.add_argument("--frames", type=int, default=None, help="default: the small profile's")
    ap.add_argument("--size", type=int, default=None, help="height = width; default: the small profile's")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--modes", nargs="+", default=["eager"], choices=MODES, help="execution settings to time")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="also profile this many eager steps of the first width and batch (profile.txt beside --out)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    data = load_params(ROOT / "params.yaml", profile="small").active.data
    frames, size = args.frames or data.num_frames, args.size or data.height
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict[str, Any] = {"machine": machine_info(device, ["diffusers"]), "frames": frames, "size": size,
                              "rows": []}
    batches = [int(b) for b in args.batches.split(",")]
    if args.profile_steps:
        table = profile_step([int(w) for w in args.widths[0].split(",")], batches[0], frames, size,
                             args.profile_steps, device)
        print(table, flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            (args.out.parent / "profile.txt").write_text(table)
    for widths in args.widths:
        for batch in batches:
            for mode in args.modes:
                row = measure([int(w) for w in widths.split(",")], batch, frames, size, args.repeats, device, mode)
                print(row, flush=True)
                result["rows"].append(row)
                if args.out:
                    write_outputs(result, args.out, render_markdown)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
