"""benchmarks/bench_curation_models.py: the logic on tiny configs of the same model classes (``--size tiny``, CPU),
not the timings.

The real figures come from a GPU run at ``--size full``; here every step must run through the project's
annotator/captioner code and write one row with positive seconds into the JSON, plus the markdown table.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_curation_models.py"
MODEL_STEPS = (
    "entities_m2f_384",
    "entities_m2f_800",
    "sam2_grid_8x8",
    "sam2_grid_12x12",
    "sam2_propagate_k8",
    "sam2_propagate_k24",
    "depthcrafter",
    "depth_anything_v2",
    "recaption",
)
TOTAL = {"cpu:total", "entities_m2f_384", "sam2_propagate_k24", "depthcrafter", "recaption"}


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_tiny_run_times_every_step(tmp_path):
    out = tmp_path / "curation-models.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "tiny", "--device", "cpu", "--repeats", "1", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["config"]["size"] == "tiny" and r["machine"]["versions"]["torch"]
    assert any("RANDOM WEIGHTS" in n for n in r["notes"])
    rows = r["rows"]
    steps = [x["step"] for x in rows]
    assert len(steps) == len(set(steps)), steps  # one row per step
    assert set(MODEL_STEPS) <= set(steps) and "cpu:total" in steps and "cpu:cut" in steps
    for x in rows:
        assert "status" not in x, x
        assert _positive(x["median_s"]) and _positive(x["s_per_clip"]) and _positive(x["clips_per_min"]), x["step"]
        assert x["in_total"] == (x["step"] in TOTAL), x["step"]
    by = {x["step"]: x for x in rows}
    cap = by["recaption"]  # forced length: exactly max_new_tokens, prefill + decode reported
    assert cap["new_tokens"] == cap["max_new_tokens"] == r["config"]["max_new_tokens"]
    assert _positive(cap["prefill_s"]) and _positive(cap["decode_s"]) and _positive(cap["decode_tokens_per_s"])
    assert by["sam2_propagate_k24"]["entities"] == 24
    s = r["summary"]
    assert _positive(s["total_s_per_clip"]) and not s["missing"]
    assert {x["step"] for x in s["shares"]} == TOTAL
    assert math.isclose(sum(x["share"] for x in s["shares"]), 1.0)
    table = out.with_suffix(".md").read_text()
    assert "TINY RUN" in table and "| step | s/clip | clips/min | peak GiB | notes |" in table
    assert "Where the time goes" in table and all(f"| {step}" in table for step in MODEL_STEPS)


def test_full_size_is_refused_on_the_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "full", "--device", "cpu", "--out", str(tmp_path / "x.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "refused off the GPU" in proc.stderr
    assert not (tmp_path / "x.json").exists()
