"""benchmarks/small_depth_sensitivity.py: controlled errors on the small profile's exact disparity, scored
as predictions. The orderings are properties of the scenes and the metric, not of any model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import small_depth_sensitivity as sds  # noqa: E402

CLIPS = ["synth-1234-00033", "synth-1234-00044"]  # held-out clips of the small profile's data set


def test_depth_scores_rank_controlled_errors(tmp_path: Path):
    clips = tmp_path / "clips.json"
    clips.write_text(json.dumps({"clips": CLIPS}))
    out = tmp_path / "sensitivity.json"
    names = ["exact", "colormap noise, iid, sigma 3", "colormap noise, iid, sigma 20", "ground slope halved",
             "ground flat (its per-frame mean)", "entities flat (each at its mean)",
             "entities at depths drawn from the prior"]
    assert sds.main([str(clips), "--only", *names, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {k: v["delta1_depth"] for k, v in result["degradations"].items()}
    assert list(rows) == names and result["clips"] == CLIPS
    assert rows["exact"] > 0.999  # the colormap round trip itself loses nothing the metric sees
    # more noise, less δ1; a flat ground costs more than a halved slope, which costs more than nothing
    assert rows["colormap noise, iid, sigma 3"] > rows["colormap noise, iid, sigma 20"]
    assert rows["exact"] > rows["ground slope halved"] > rows["ground flat (its per-frame mean)"]
    # entities are flat-faced and nearer than the ground: flattening them changes almost nothing
    assert rows["entities flat (each at its mean)"] > 0.99
    # entities at depths the pixels did not give (a sampler's guess where depth cannot be seen) cost δ1
    assert rows["entities at depths drawn from the prior"] < rows["exact"] - 0.01
    assert len(result["degradations"]["exact"]["delta1_depth_per_clip"]) == len(CLIPS)
    shares = result["scene"]["ground_share_of_scored_pixels"]
    assert all(0.3 < s < 1.0 for s in shares)  # the ground is most of what the depth scores see
