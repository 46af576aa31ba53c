"""FlashAttention-3 forward against SDPA for CogVideoX-5B's attention, alone and inside the compiled step.

Issue 11's next lever after compiled blocks: attention is about half of the 5B step's FLOPs at
17,776 tokens. Two measurements, JSON (+ markdown) written after each:

* ``op``   — one attention call, (2, 48, 17776, 64) bf16 (CFG batch 2, 5B's heads, 226 text + 17,550
  video tokens): PyTorch SDPA (its default backend choice) vs FA3's forward kernel
  (``udpdiff.attention``; the ``fa3-fwd`` wheel); TFLOP/s = 4·B·H·N²·d / time; FA3 vs SDPA difference.
* ``step`` — the 5B denoising step (ours, CFG batch 2, random weights), compiled blocks with SDPA vs
  compiled blocks + :class:`udpdiff.attention.FlashAttention3CogVideoXProcessor`, timed alternately;
  the output difference between them and against eager SDPA.

    python benchmarks/bench_attention.py --out benchmarks/results/attention-h200.json   # a Hopper GPU
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import bench_gpu  # noqa: E402
from benchmarks.common import write_outputs  # noqa: E402
from udpdiff.evaluation.runtime import measure_calls  # noqa: E402

logger = logging.getLogger("bench_attention")


def run_op(result: dict[str, Any], iters: int) -> None:
    from udpdiff.attention import SdpaToFlashAttention3

    b, h, n, d = 2, 48, 226 + 17550, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn((b, h, n, d), generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * b * h * n * n * d
    with torch.no_grad():
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v)
        mode = SdpaToFlashAttention3()

        def fa3():
            with mode:
                return F.scaled_dot_product_attention(q, k, v)

        ref, out = sdpa(), fa3()
        rows = {}
        for name, fn in (("sdpa", sdpa), ("fa3", fa3)):
            t = measure_calls(fn, iters, warmup=3).times
            rows[name] = {"median_s": statistics.median(t), "tflops": flops / statistics.median(t) / 1e12}
            logger.info("op %s: %.2f ms, %.0f TFLOP/s", name, 1e3 * rows[name]["median_s"], rows[name]["tflops"])
    result["op"] = {"shape_bhnd": [b, h, n, d], "flops": flops, **rows,
                    "fa3_vs_sdpa": bench_gpu.tensor_differences(out.float(), ref.float())}


def run_step(result: dict[str, Any], args: argparse.Namespace) -> None:
    from udpdiff.acceleration import accelerate
    from udpdiff.attention import use_flash_attention3
    from udpdiff.config import AccelerationParams

    ns = argparse.Namespace(smoke=False, cpu=False, out=None)
    bench = bench_gpu.Bench(ns)
    eager = bench_gpu.build_transformer(bench, "5b", ours=True).eval()
    tc = bench_gpu.token_counts(bench.archs["5b"]["transformer"], bench.size)
    rotary = bench_gpu.rotary_tables(bench, eager, tc["latent_frames"])
    inputs = bench_gpu.step_inputs(bench, "5b", bench_gpu.model_channels(eager), batch=2, seed=7)

    def forward(model):
        with torch.no_grad():
            return model(**inputs, image_rotary_emb=rotary, return_dict=False, task_id=torch.tensor([1]))[0]

    eager_out = forward(eager)
    sdpa = copy.deepcopy(eager)
    accelerate(sdpa, AccelerationParams(compile_blocks=True), bench.device)
    fa3 = copy.deepcopy(eager)
    use_flash_attention3(fa3)
    accelerate(fa3, AccelerationParams(compile_blocks=True), bench.device)
    del eager
    bench.free()
    outs = {"compiled_sdpa": forward(sdpa), "compiled_fa3": forward(fa3)}  # compiles both
    size = bench_gpu.param_bytes(sdpa)
    res = bench_gpu.interleaved(bench, {"compiled_sdpa": functools.partial(forward, sdpa),
                                        "compiled_fa3": functools.partial(forward, fa3)},
                                {"compiled_sdpa": size, "compiled_fa3": size}, 2, args.step_iters)
    result["step"] = {
        **res,
        "saving_pct": 100 * (1 - res["compiled_fa3"]["median_s"] / res["compiled_sdpa"]["median_s"]),
        "fa3_vs_sdpa_compiled": bench_gpu.tensor_differences(outs["compiled_fa3"].float(),
                                                             outs["compiled_sdpa"].float()),
        "sdpa_compiled_vs_eager": bench_gpu.tensor_differences(outs["compiled_sdpa"].float(), eager_out.float()),
        "fa3_compiled_vs_eager": bench_gpu.tensor_differences(outs["compiled_fa3"].float(), eager_out.float()),
    }
    logger.info("step: compiled sdpa %.4f s, compiled fa3 %.4f s (-%.1f%%)", res["compiled_sdpa"]["median_s"],
                res["compiled_fa3"]["median_s"], result["step"]["saving_pct"])


def render(r: dict[str, Any]) -> str:
    lines = [f"# Attention: FlashAttention-3 forward vs SDPA ({r['machine'].get('gpu', '?')})", ""]
    if "op" in r:
        o = r["op"]
        d = o["fa3_vs_sdpa"]
        lines += ["## One attention call, (B, H, N, d) = " + " × ".join(map(str, o["shape_bhnd"])) + ", bf16", "",
                  "| kernel | ms | TFLOP/s |", "|---|---:|---:|",
                  *[f"| {k} | {1e3 * o[k]['median_s']:.2f} | {o[k]['tflops']:.0f} |" for k in ("sdpa", "fa3")],
                  "", f"FA3 vs SDPA: max abs {d['max_abs']:.3g}, rel L2 {d['rel_l2']:.2e}", ""]
    if "step" in r:
        s = r["step"]
        lines += ["## 5B denoising step, ours, CFG batch 2, compiled blocks", "",
                  "| attention | s/step (median) | peak GiB |", "|---|---:|---:|",
                  *[f"| {k} | {s[k]['median_s']:.4f} | {s[k]['peak_gib'] or 0:.1f} |"
                    for k in ("compiled_sdpa", "compiled_fa3")], "",
                  f"saving {s['saving_pct']:.1f} %; rel L2: FA3 vs SDPA (both compiled) "
                  f"{s['fa3_vs_sdpa_compiled']['rel_l2']:.2e}, SDPA compiled vs eager "
                  f"{s['sdpa_compiled_vs_eager']['rel_l2']:.2e}, FA3 compiled vs eager "
                  f"{s['fa3_compiled_vs_eager']['rel_l2']:.2e}", ""]
    for e in r.get("errors", []):
        lines.append(f"- error: {e}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--op-iters", type=int, default=20)
    p.add_argument("--step-iters", type=int, default=6)
    p.add_argument("--sections", default="op,step")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    from udpdiff.attention import flash_attention3_available

    if not flash_attention3_available():
        raise SystemExit("needs a Hopper GPU and the fa3-fwd wheel (pip install fa3-fwd)")
    result: dict[str, Any] = {"benchmark": "attention", "errors": [],
                              "machine": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}}
    for name, fn in (("op", lambda: run_op(result, args.op_iters)), ("step", lambda: run_step(result, args))):
        if name not in args.sections.split(","):
            continue
        try:
            fn()
        except Exception as exc:  # one failing measurement must not lose the other
            logger.exception("%s failed", name)
            result["errors"].append(f"{name}: {type(exc).__name__}: {exc}"[:1000])
        write_outputs(result, args.out, render)
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
