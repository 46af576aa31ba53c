"""Seconds per VAE training step for several widths and batch sizes (issue 12's segmentation ceiling).

Attempt 5 found the ``small`` VAE, not the transformer, capping segmentation (mIoU 0.707 for exact
colormaps through it) with its loss still falling at step 1,000 of batch 8: the lever is more
videos seen or more width. Whether a bigger batch or a wider VAE costs proportionally more time
depends on whether the step is compute-bound or launch-bound, which only a measurement says. Each
row times :class:`udpdiff.models.vae.VaeTrainStep` (the stage's own step) on random videos of the
``small`` clip size; the JSON (+ markdown) is rewritten after each row.

    python benchmarks/bench_vae_train.py --out benchmarks/results/vae-train-h200.json     # a GPU
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
from udpdiff.config import load_params  # noqa: E402
from udpdiff.evaluation.runtime import measure_calls  # noqa: E402
from udpdiff.models.vae import VaeTrainStep, build_vae  # noqa: E402


def measure(widths: list[int], batch: int, frames: int, size: int, repeats: int, device: torch.device) -> dict:
    """One row: the ``small`` VAE config with ``widths`` as ``block_out_channels``, trained on ``batch`` random
    videos of ``frames`` x ``size`` x ``size``."""
    spec = load_params(ROOT / "params.yaml", profile="small").active.vae.model_dump()
    spec["config"]["block_out_channels"] = widths
    vae = build_vae(spec, seed=0).to(device).train()
    train_step = VaeTrainStep(vae, steps=1000, lr=1e-4, kl_weight=1e-6)
    x = torch.rand((batch, 3, frames, size, size), device=device).mul(2).sub(1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    m = measure_calls(lambda: train_step(x)["vae_loss"].item(), repeats, warmup=2, label=f"{widths} b{batch}")
    row = {"block_out_channels": widths, "batch": batch, "params": n_params(vae), "median_s": m.median,
           "videos_per_s": batch / m.median, "iqr_s": m.iqr}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


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
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    data = load_params(ROOT / "params.yaml", profile="small").active.data
    frames, size = args.frames or data.num_frames, args.size or data.height
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict[str, Any] = {"machine": machine_info(device, ["diffusers"]), "frames": frames, "size": size,
                              "rows": []}
    for widths in args.widths:
        for batch in (int(b) for b in args.batches.split(",")):
            row = measure([int(w) for w in widths.split(",")], batch, frames, size, args.repeats, device)
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
