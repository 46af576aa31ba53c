"""benchmarks/bench_eval.py: the logic on tiny models and videos (``--smoke``, CPU), not the timings.

The real figures come from the device machine (benchmarks/results/eval-h100.*); here every section
must run through the project's metric code and write positive timings into the JSON and table.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_eval.py"
SECTIONS = ("fvd", "sc", "bc", "ms_amt", "suite", "ms_flow", "depth_anything", "sam2", "depthcrafter")


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_smoke_run_times_every_section(tmp_path):
    out = tmp_path / "eval.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--cpu", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["settings"]["smoke"] and r["machine"]["versions"]["torch"]
    assert any("RANDOM WEIGHTS" in n for n in r["notes"])
    sec = r["sections"]
    assert set(sec) == set(SECTIONS)
    for name in SECTIONS:
        assert "status" not in sec[name], (name, sec[name])
    for name in ("sc", "bc", "ms_amt", "suite", "ms_flow", "depth_anything", "depthcrafter"):
        assert _positive(sec[name]["s_per_video"]) and _positive(sec[name]["median_s"]), name
        assert all(_positive(t) for t in sec[name]["times_s"]), name
    assert sec["suite"]["keys"] == sorted(
        ["background_consistency", "motion_smoothness", "pixel_frame_consistency", "subject_consistency"]
    )
    assert _positive(sec["fvd"]["features"]["s_per_video"]) and _positive(sec["fvd"]["features"]["flops_per_video"])
    assert _positive(sec["fvd"]["frechet"]["median_s"]) and math.isfinite(sec["fvd"]["frechet"]["value"])
    assert _positive(sec["sam2"]["grid"]["s_per_video"]) and _positive(sec["sam2"]["per_video_s"])
    assert any(
        k.startswith("propagate_") and _positive(v["s_per_video"])
        for k, v in sec["sam2"].items()
        if isinstance(v, dict) and "s_per_video" in v
    )
    p = r["projection"]
    for key in (
        "per_set_without_annotators_h",
        "depth_set_with_annotators_h",
        "segmentation_set_with_annotators_h",
        "three_sets_plus_real_h",
    ):
        assert _positive(p[key]), key
    assert p["three_sets_plus_real_h"] > p["three_sets_plus_real_without_annotators_h"]
    table = out.with_suffix(".md").read_text()
    assert "SMOKE RUN" in table and "DepthCrafter" in table and "Projection" in table
