"""Curation cost on the CPU: seconds per clip of each Panda-Dense curation step (udpdiff.data.cut/filters).

For each source size it encodes a synthetic source video the way downloaded videos are encoded
(H.264, CRF 23, a keyframe every 2 s, B-frames; a procedurally textured canvas panning a few pixels
per frame, 8 s at 30 fps), then times, as the median of ``--repeats`` runs after one warm-up:

* ``probe+plan``  — header probe (PyAV) and window/crop placement, nothing decoded;
* ``cut``         — seek, decode the window, pick ``num_frames`` frames at ``fps``, crop and area-resize;
* ``write``       — ``write_video`` of the clip (H.264 qp 10, preset medium, as curation writes it);
* ``source``, ``scene_cut(content)``, ``scene_cut(histogram)``, ``motion``, ``quality(classical)`` —
  each filter on the cut clip, with the default parameters;
* ``total``       — ``curate_clips`` on one clip with the default filters (content detector), which is
  the per-clip cost of a curation run on one core.

The clip geometry defaults to the paper's CogVideoX setting (49 frames at 8 fps, 480x720). Prints a
table and writes JSON (and a markdown table beside it) with the machine record.

    python benchmarks/bench_curation.py                                  # 720p and 1080p sources
    python benchmarks/bench_curation.py --sources 360x640 --repeats 1 --out /tmp/c.json
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import av  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import machine_info, write_outputs  # noqa: E402
from udpdiff.data.curation_params import FilterParams, QualityFilterParams, SceneCutParams  # noqa: E402
from udpdiff.data.cut import ClipCutter, ClipSpec  # noqa: E402
from udpdiff.data.filters import (  # noqa: E402
    MotionFilter,
    QualityFilter,
    SceneCutFilter,
    SourceFilter,
    build_filters,
    curate_clips,
)
from udpdiff.evaluation.runtime import measure_calls  # noqa: E402

logger = logging.getLogger("bench_curation")
PACKAGES = ["av", "opencv-python-headless", "scenedetect-headless", "numpy", "decord"]


def parse_hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"size must look like 720x1280 (HxW), got {text!r}") from exc
    if h < 16 or w < 16 or h % 2 or w % 2:
        raise argparse.ArgumentTypeError(f"size must be even and at least 16x16, got {text!r}")
    return h, w


def make_source(path: Path, h: int, w: int, fps: int, seconds: float, seed: int = 0) -> None:
    """A textured canvas panning 3 px/frame (plus slow brightness drift), encoded like a download."""
    rng = np.random.default_rng(seed)
    n = round(fps * seconds)
    dx = 3
    cw = w + dx * n
    coarse = cv2.resize(rng.random((max(2, h // 24), max(2, cw // 24)), np.float32), (cw, h),
                        interpolation=cv2.INTER_CUBIC)
    fine = cv2.GaussianBlur(rng.random((h, cw), np.float32), (0, 0), 1.2)
    base = np.clip(0.6 * coarse + 0.8 * (fine - 0.5) + 0.2, 0, 1)
    canvas = np.clip(base[..., None] * np.array([255, 215, 170], np.float32), 0, 255).astype(np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps, options={
            "crf": "23", "preset": "veryfast", "g": str(2 * fps), "bf": "2"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(canvas[:, i * dx: i * dx + w]), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def bench_source(hw: tuple[int, int], args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    h, w = hw
    src = work / f"src{h}x{w}.mp4"
    t0 = time.perf_counter()
    make_source(src, h, w, args.src_fps, args.seconds)
    logger.info("encoded %s (%.1f s to make)", src.name, time.perf_counter() - t0)
    cutter = ClipCutter(args.num_frames, args.fps, args.height, args.width, window="center")
    spec = ClipSpec(f"{src.stem}_00000", src.stem, 0.5, args.seconds - 0.5, "bench")
    plan = cutter.plan(spec, src)
    clip = cutter.cut(plan)
    defaults = FilterParams()
    cases: dict[str, Callable[[], Any]] = {
        "probe+plan": lambda: cutter.plan(spec, src),
        "cut": lambda: cutter.cut(plan),
        "write": lambda: cutter.write(clip, work / "clip.mp4"),
        "source": lambda: SourceFilter.from_params(defaults.source).evaluate(plan),
        "scene_cut(content)": lambda: SceneCutFilter.from_params(SceneCutParams()).evaluate(clip),
        "scene_cut(histogram)": lambda: SceneCutFilter.from_params(SceneCutParams(detector="histogram")).evaluate(clip),
        "motion": lambda: MotionFilter.from_params(defaults.motion).evaluate(clip),
        "quality(classical)": lambda: QualityFilter.from_params(QualityFilterParams()).evaluate(clip),
        "total": lambda: curate_clips([spec], work, work / "out", cutter, build_filters(defaults)),
    }
    rows = []
    for name, fn in cases.items():
        times = measure_calls(fn, args.repeats, label=name).times
        row = {"source": f"{h}x{w}@{args.src_fps}",
               "clip": f"{args.num_frames}x{args.height}x{args.width}@{args.fps:g}", "step": name,
               "median_s": statistics.median(times), "min_s": min(times), "repeats": len(times)}
        rows.append(row)
        logger.info("%-14s %-22s %8.3f s", row["source"], name, row["median_s"])
    res = curate_clips([spec], work, work / "out", cutter, build_filters(defaults))
    rows.append({"source": f"{h}x{w}@{args.src_fps}", "step": "scores (default filters)",
                 "scores": (res.records or res.rejects)[0], "drops": dict(res.drops)})
    return rows


def render_markdown(r: dict[str, Any]) -> str:
    timed = [x for x in r["results"] if "median_s" in x]
    sources = list(dict.fromkeys(x["source"] for x in timed))
    steps = list(dict.fromkeys(x["step"] for x in timed))
    cell = {(x["source"], x["step"]): x["median_s"] for x in timed}
    lines = [f"# Curation cost per clip ({r['config']['clip']}), CPU: {r['machine'].get('cpu_count')} cores, "
             f"cv2 threads {r['config']['cv2_threads']}", "",
             "| step | " + " | ".join(f"{s} source" for s in sources) + " |",
             "|---|" + "---:|" * len(sources)]
    for step in steps:
        lines.append(f"| {step} | " + " | ".join(f"{cell.get((s, step), float('nan')):.3f} s" for s in sources) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", type=parse_hw, nargs="+", default=[(720, 1280), (1080, 1920)],
                   help="source sizes HxW (default 720x1280 1080x1920)")
    p.add_argument("--src-fps", type=int, default=30)
    p.add_argument("--seconds", type=float, default=8.0, help="source length; the clip is [0.5, seconds-0.5)")
    p.add_argument("--num-frames", type=int, default=49)
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "curation-cpu.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result: dict[str, Any] = {
        "benchmark": "curation",
        "machine": machine_info(torch.device("cpu"), PACKAGES),
        "config": {"sources": [f"{h}x{w}" for h, w in args.sources], "src_fps": args.src_fps,
                   "seconds": args.seconds, "clip": f"{args.num_frames}x{args.height}x{args.width}@{args.fps:g}fps",
                   "repeats": args.repeats, "cv2_threads": cv2.getNumThreads()},
        "results": [],
    }
    # the load other processes put on the machine while it ran (timings scale with it)
    result["machine"]["loadavg_1_5_15_at_start"] = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="bench_curation_") as tmp:
        for hw in args.sources:
            result["results"] += bench_source(hw, args, Path(tmp))
            write_outputs(result, args.out, render_markdown)  # keep what was measured so far
    result["machine"]["loadavg_1_5_15_at_end"] = list(os.getloadavg())
    write_outputs(result, args.out, render_markdown)
    print(render_markdown(result))
    return result


if __name__ == "__main__":
    main()
