"""benchmarks/small_tab12_paired.py: the Tab 1/2 variants compared clip by clip with the full method, on
run folders laid out as unpacked GPU tarballs, with per-clip scores whose differences are known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

CLIPS = [f"synth-1234-{i:05d}" for i in (33, 44, 65, 69, 107, 130)]


def _variant(run: Path, name: str, sets: dict[str, dict[str, list[float]]], losses: dict[str, list[float]]) -> None:
    out = run / "variants" / name / "outputs" / "small"
    rows = [{"set": s, "clip_id": c, **{m: v[i] for m, v in metrics.items()}}
            for s, metrics in sets.items() for i, c in enumerate(CLIPS)]
    (out / "evaluation").mkdir(parents=True)
    (out / "metrics").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(out / "evaluation" / "per_video.csv", index=False)
    steps = len(next(iter(losses.values())))
    pd.DataFrame({"step": np.arange(1, steps + 1), **losses}).to_csv(out / "metrics" / "train_history.csv", index=False)


@pytest.fixture
def tab12_run(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    ms = 0.99 + 0.001 * rng.random(len(CLIPS))
    miou = 0.6 + 0.1 * rng.random(len(CLIPS))
    # the clips a shuffled order in one file: pairing must go by clip id, not by row
    _variant(tmp_path, "udpdiff-multi-task",
             {"segmentation": {"motion_smoothness_flow": ms, "gt_miou": miou},
              "depth": {"motion_smoothness_flow": ms + 0.002, "gt_delta1_depth": np.full(len(CLIPS), 0.9)},
              "real": {"motion_smoothness_flow": np.full(len(CLIPS), 0.995)}},
             {"loss_rgb": np.full(800, 0.07), "loss_dense": np.full(800, 0.03)})
    _variant(tmp_path, "cogvideox",
             {"rgb": {"motion_smoothness_flow": ms - [0.001, 0.001, 0.001, 0.001, 0.001, -0.004]}},
             {"loss_rgb": np.r_[np.full(400, 1.0), np.full(400, 0.06)]})
    # a single-task variant: worse mIoU on every clip but one
    _variant(tmp_path, "udpdiff-segmentation",
             {"segmentation": {"motion_smoothness_flow": ms, "gt_miou": miou - [0.05, 0.05, 0.05, 0.05, 0.05, -0.05]}},
             {"loss_rgb": np.full(800, 0.07), "loss_dense": np.full(800, 0.02)})
    frame = pd.read_csv(tmp_path / "variants" / "cogvideox" / "outputs" / "small" / "evaluation" / "per_video.csv")
    frame.iloc[::-1].to_csv(tmp_path / "variants" / "cogvideox" / "outputs" / "small" / "evaluation" / "per_video.csv",
                            index=False)
    return tmp_path


def test_differences_are_paired_by_clip_and_by_task(tab12_run: Path, benchmark_script):
    paired = benchmark_script("small_tab12_paired")
    pairs, losses = paired.compare(tab12_run, "udpdiff-multi-task")
    rows = pairs.set_index(["variant", "sets", "metric"])

    # the RGB-only baseline's one set against each of the multi-task's two
    rgb_vs_seg = rows.loc[("cogvideox", "segmentation / rgb", "motion_smoothness_flow")]
    assert rgb_vs_seg["difference"] == pytest.approx(-0.00016667, abs=1e-7)  # (5 × -0.001 + 0.004) / 6
    assert rgb_vs_seg["difference_se"] == pytest.approx(np.std([-0.001] * 5 + [0.004], ddof=1) / np.sqrt(6))
    assert (rgb_vs_seg["variant_better"], rgb_vs_seg["variant_worse"]) == (1, 5)
    rgb_vs_depth = rows.loc[("cogvideox", "depth / rgb", "motion_smoothness_flow")]
    assert rgb_vs_depth["difference"] == pytest.approx(-0.00016667 - 0.002, abs=1e-7)
    assert rgb_vs_depth["n"] == 6

    # a single-task variant meets the multi-task on its own task only; no dense row for the baseline
    seg = rows.loc[("udpdiff-segmentation", "segmentation", "gt_miou")]
    assert seg["difference"] == pytest.approx((5 * -0.05 + 0.05) / 6)
    assert (seg["variant_better"], seg["variant_worse"]) == (1, 5)
    assert ("udpdiff-segmentation", "segmentation / segmentation", "motion_smoothness_flow") in rows.index
    assert not any(v == "cogvideox" and s in ("segmentation", "depth") for v, s, _ in rows.index)

    # what the real clips score, beside
    assert rows.loc[("real clips", "real", "motion_smoothness_flow")]["variant_mean"] == pytest.approx(0.995)

    # losses: the last 400 steps only
    by = losses.set_index(["variant", "loss"])
    assert by.loc[("cogvideox", "loss_rgb")]["mean, last 400 steps"] == pytest.approx(0.06)
    assert by.loc[("udpdiff-segmentation", "loss_dense")]["se"] == pytest.approx(0.0)
    assert ("cogvideox", "loss_dense") not in by.index


def test_cli_writes_json_and_markdown_and_names_a_missing_reference(tab12_run: Path, tmp_path: Path, benchmark_script):
    paired = benchmark_script("small_tab12_paired")
    out = tmp_path / "paired.json"
    assert paired.main([str(tab12_run), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["reference"] == "udpdiff-multi-task"
    assert {r["variant"] for r in report["pairs"]} == {"cogvideox", "udpdiff-segmentation", "real clips"}
    assert "-0.0002 ± " in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match="no variant 'udpdiff-depth'.*found: cogvideox"):
        paired.main([str(tab12_run), "--reference", "udpdiff-depth"])
    with pytest.raises(SystemExit, match="no variants/<name>"):
        paired.main([str(tmp_path / "empty")])
