"""Throughput of the Pixelplanes encoders/decoders (udpdiff.pixelplanes), in frames per second.

For each video size and backend (numpy, torch on CPU, and torch on CUDA when available) it times
segmentation encode (palette drawn / given) and decode (with / without palette, on noisy
colormaps as a generated output would be) and depth encode and decode ("nearest" = paper
Appendix C, "continuous"), after warm-up, as the median of ``--repeats`` runs (CUDA runs are
synchronised). It also measures the depth round-trip errors and segmentation decode accuracy
quoted in the README. Prints a table and writes JSON (atomically) to ``--out``.

    python benchmarks/bench_pixelplanes.py                       # 49x480x720 and 9x60x90
    python benchmarks/bench_pixelplanes.py --sizes 13x240x360 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from udpdiff import pixelplanes as pp  # noqa: E402
from udpdiff.evaluation.runtime import measure_calls  # noqa: E402
from udpdiff.io.atomic import write_text  # noqa: E402

logger = logging.getLogger("bench_pixelplanes")


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        t, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"size must look like 49x480x720, got {text!r}") from exc
    if min(t, h, w) < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return t, h, w


# --------------------------------------------------------------------------------------------
# synthetic inputs
# --------------------------------------------------------------------------------------------


def synthetic_ids(t: int, h: int, w: int, n: int, seed: int) -> np.ndarray:
    """(t, h, w) int32: n ellipses moving linearly over a background (later ones on top)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((t, h, w), np.int32)
    yy = np.arange(h, dtype=np.float32)[None, :, None]
    xx = np.arange(w, dtype=np.float32)[None, None, :]
    tt = np.arange(t, dtype=np.float32)[:, None, None]
    for e in range(n):  # one vectorised paint per entity
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        vy, vx = rng.normal(0, 0.01 * h), rng.normal(0, 0.01 * w)
        ry, rx = rng.uniform(0.04, 0.15) * h, rng.uniform(0.04, 0.15) * w
        inside = ((yy - cy - vy * tt) / ry) ** 2 + ((xx - cx - vx * tt) / rx) ** 2 <= 1.0
        ids[inside] = e + 1
    return ids


def synthetic_depth(t: int, h: int, w: int, seed: int) -> np.ndarray:
    """(t, h, w) float32 in [0, 1]: a tilted plane plus moving waves (smooth, all values used)."""
    rng = np.random.default_rng(seed)
    yy = np.linspace(0, 1, h, dtype=np.float32)[None, :, None]
    xx = np.linspace(0, 1, w, dtype=np.float32)[None, None, :]
    tt = np.arange(t, dtype=np.float32)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi)
    d = 0.6 * yy + 0.2 * xx + 0.2 * np.sin(6 * xx + 0.2 * tt + phase) * np.cos(4 * yy)
    d = (d - d.min()) / (d.max() - d.min())
    return d.astype(np.float32)


def add_noise(colormap: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    if sigma <= 0:
        return colormap
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, sigma, colormap.shape).astype(np.float32)
    return np.clip(np.rint(colormap.astype(np.float32) + noise), 0, 255).astype(np.uint8)


def backends(include_cuda: bool) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = [("numpy", None), ("torch-cpu", "cpu")]
    if include_cuda and torch.cuda.is_available():
        out.append(("torch-cuda", "cuda"))
    return out


def make_cases(
    x_ids: Any, x_seg: Any, x_depth: Any, x_dnoisy: Any, pal: pp.Palette, min_pixels: int
) -> dict[str, Callable[[], Any]]:
    """The timed calls, on inputs already on the backend's device."""
    return {
        "seg_encode(seed)": lambda: pp.encode_segmentation(x_ids, seed=0),
        "seg_encode(palette)": lambda: pp.encode_segmentation(x_ids, palette=pal),
        "seg_decode(palette)": lambda: pp.decode_segmentation(x_seg, pal),
        "seg_decode(no palette)": lambda: pp.decode_segmentation(x_seg, min_pixels=min_pixels),
        "depth_encode": lambda: pp.encode_depth(x_depth),
        "depth_decode(nearest)": lambda: pp.decode_depth(x_dnoisy, "nearest"),
        "depth_decode(continuous)": lambda: pp.decode_depth(x_dnoisy, "continuous"),
    }


def bench_size(
    size: tuple[int, int, int], args: argparse.Namespace, include_cuda: bool
) -> list[dict[str, Any]]:
    t, h, w = size
    ids = synthetic_ids(t, h, w, args.entities, seed=0)
    cm, pal = pp.encode_segmentation(ids, seed=0)
    seg_noisy = add_noise(cm, args.seg_noise, seed=1)
    depth = synthetic_depth(t, h, w, seed=0)
    depth_noisy = add_noise(pp.encode_depth(depth), args.depth_noise, seed=2)

    rows = []
    for name, device in backends(include_cuda):
        if device is None:
            conv: Callable[[np.ndarray], Any] = lambda a: a  # noqa: E731
        else:
            conv = lambda a, d=device: torch.from_numpy(a).to(d)  # noqa: E731
        cases = make_cases(
            conv(ids), conv(seg_noisy), conv(depth), conv(depth_noisy), pal, args.min_pixels
        )
        for case, fn in cases.items():
            times = measure_calls(fn, args.repeats, args.warmup).times
            med = statistics.median(times)
            row = {
                "size": f"{t}x{h}x{w}",
                "backend": name,
                "case": case,
                "median_s": med,
                "min_s": min(times),
                "fps": t / med,
                "repeats": len(times),
            }
            rows.append(row)
            logger.info(
                "%-11s %-10s %-25s %9.4f s %10.1f fps", row["size"], name, case, med, row["fps"]
            )
    return rows


# --------------------------------------------------------------------------------------------
# accuracy (noise-free and noisy round trips)
# --------------------------------------------------------------------------------------------


def depth_errors(sigmas: list[float]) -> dict[str, Any]:
    """Depth encode->decode errors on a dense grid of 255*64+1 values plus 100k random ones."""
    rng = np.random.default_rng(0)
    v = np.concatenate([np.linspace(0, 1, 255 * 64 + 1), rng.random(100_000)]).astype(np.float32)
    clean = pp.encode_depth(v)
    out: dict[str, Any] = {"n_values": int(v.size)}
    for sigma in sigmas:
        cm = add_noise(clean, sigma, seed=3)
        for method in ("nearest", "continuous"):
            err = np.abs(pp.decode_depth(cm, method) - v)
            out[f"sigma={sigma:g}/{method}"] = {
                "mean_abs": float(err.mean()),
                "max_abs": float(err.max()),
            }
    return out


def segmentation_accuracy(sigmas: list[float], args: argparse.Namespace) -> dict[str, Any]:
    """Pixel accuracy of decoding (palette: exact ids; no palette: after mapping each decoded id
    to the true id it overlaps most) on a 16x120x180 video, for a paper palette (random) and a
    min_distance=60 palette."""
    ids = synthetic_ids(16, 120, 180, args.entities, seed=0)
    out: dict[str, Any] = {"video": "16x120x180", "entities": int(len(np.unique(ids)) - 1)}
    for label, min_distance in (("random", 0.0), ("min_distance=60", 60.0)):
        pal = pp.make_palette(ids, seed=0, min_distance=min_distance)
        cm, _ = pp.encode_segmentation(ids, palette=pal)
        for sigma in sigmas:
            noisy = add_noise(cm, sigma, seed=4)
            with_pal = float((pp.decode_segmentation(noisy, pal) == ids).mean())
            free = pp.decode_segmentation(noisy, min_pixels=args.min_pixels)
            free25 = pp.decode_segmentation(noisy, min_pixels=args.min_pixels, merge_radius=25.0)
            out[f"{label}/sigma={sigma:g}"] = {
                "palette": with_pal,
                "no_palette": matched_accuracy(ids, free),
                "no_palette_entities_found": int(free.max()),
                "no_palette_merge25": matched_accuracy(ids, free25),
                "no_palette_merge25_entities_found": int(free25.max()),
            }
    return out


def matched_accuracy(true: np.ndarray, pred: np.ndarray) -> float:
    n_pred, n_true = int(pred.max()) + 1, int(true.max()) + 1
    joint = np.bincount(
        pred.ravel().astype(np.int64) * n_true + true.ravel(), minlength=n_pred * n_true
    )
    joint = joint.reshape(n_pred, n_true)
    # each decoded id counts as the true id it overlaps most; 0 must map to 0
    best = joint.max(axis=1)
    best[0] = joint[0, 0]
    return float(best.sum() / true.size)


# --------------------------------------------------------------------------------------------


def print_table(rows: list[dict[str, Any]]) -> None:
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    names = list(dict.fromkeys(r["backend"] for r in rows))
    cases = list(dict.fromkeys(r["case"] for r in rows))
    for size in sizes:
        print(f"\nframes/s at {size} (median)")
        print(f"{'case':<26}" + "".join(f"{n:>14}" for n in names))
        for case in cases:
            cells = []
            for n in names:
                hit = [
                    r for r in rows if r["size"] == size and r["backend"] == n and r["case"] == case
                ]
                cells.append(f"{hit[0]['fps']:>14.1f}" if hit else f"{'-':>14}")
            print(f"{case:<26}" + "".join(cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        type=parse_size,
        nargs="+",
        default=[(49, 480, 720), (9, 60, 90)],
        help="video sizes TxHxW (default: 49x480x720 9x60x90)",
    )
    parser.add_argument("--entities", type=int, default=50, help="entities in the synthetic video")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per case")
    parser.add_argument(
        "--seg-noise", type=float, default=6.0, help="Gaussian sigma on seg colormaps"
    )
    parser.add_argument(
        "--depth-noise", type=float, default=3.0, help="Gaussian sigma on depth colormaps"
    )
    parser.add_argument(
        "--min-pixels", type=int, default=20, help="min_pixels for palette-free decode"
    )
    parser.add_argument("--no-cuda", action="store_true", help="skip CUDA even if available")
    parser.add_argument("--skip-accuracy", action="store_true", help="only time")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default benchmarks/results/pixelplanes-<hostname>.json)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    host = socket.gethostname()
    out_path = args.out or ROOT / "benchmarks" / "results" / f"pixelplanes-{host}.json"

    include_cuda = not args.no_cuda
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for size in args.sizes:
        rows.extend(bench_size(size, args, include_cuda))
    print_table(rows)

    accuracy: dict[str, Any] = {}
    if not args.skip_accuracy:
        accuracy["depth"] = depth_errors([0.0, 3.0])
        accuracy["segmentation"] = segmentation_accuracy([0.0, 6.0, 8.0], args)
        print("\naccuracy:")
        print(json.dumps(accuracy, indent=2))

    result = {
        "benchmark": "pixelplanes",
        "host": host,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0)
        if include_cuda and torch.cuda.is_available()
        else None,
        "config": {
            "sizes": [f"{t}x{h}x{w}" for t, h, w in args.sizes],
            "entities": args.entities,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "seg_noise_sigma": args.seg_noise,
            "depth_noise_sigma": args.depth_noise,
            "min_pixels": args.min_pixels,
        },
        "results": rows,
        "accuracy": accuracy,
        "wall_s": time.perf_counter() - t_start,
    }
    write_text(out_path, json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out_path} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
