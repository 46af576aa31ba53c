"""benchmarks/small_tab12_paired.py: the Tab 1/2 variants against the full method and the RGB-only one (the
pairing itself is tests/test_eval_paired.py's), on a run folder laid out as unpacked GPU tarballs: the CLI's
files, the losses of each variant's last steps, and the errors that name what is missing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

CLIPS = [f"synth-1234-{i:05d}" for i in (33, 44, 65)]


def _variant(run: Path, name: str, sets: dict[str, dict[str, float]], losses: dict[str, np.ndarray]) -> None:
    out = run / "variants" / name / "outputs" / "small"
    (out / "evaluation").mkdir(parents=True)
    (out / "metrics").mkdir(parents=True)
    rows = [{"set": s, "clip_id": c, **metrics} for s, metrics in sets.items() for c in CLIPS]
    pd.DataFrame(rows).to_csv(out / "evaluation" / "per_video.csv", index=False)
    steps = len(next(iter(losses.values())))
    pd.DataFrame({"step": np.arange(1, steps + 1), **losses}).to_csv(out / "metrics" / "train_history.csv", index=False)


@pytest.fixture
def tab12_run(tmp_path: Path) -> Path:
    _variant(tmp_path, "udpdiff-multi-task", {"segmentation": {"motion_smoothness_flow": 0.992},
                                              "depth": {"motion_smoothness_flow": 0.993}},
             {"loss_rgb": np.full(800, 0.07), "loss_dense": np.r_[np.full(400, 0.9), np.tile([0.02, 0.04], 200)],
              "loss_dense_segmentation": np.full(800, 0.04), "loss_dense_depth": np.full(800, 0.02)})
    # the first 400 of 800 steps far off: only the last 400 count
    _variant(tmp_path, "cogvideox", {"rgb": {"motion_smoothness_flow": 0.991}},
             {"loss_rgb": np.r_[np.full(400, 1.0), np.full(400, 0.06)]})
    return tmp_path


def test_cli_writes_the_pairs_and_the_last_steps_losses(tab12_run: Path, tmp_path: Path, benchmark_script):
    paired = benchmark_script("small_tab12_paired")
    out = tmp_path / "paired.json"
    assert paired.main([str(tab12_run), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    # params.yaml's tab1-2 references: the multi-task model (Tab 2), then the RGB-only one (Tab 1)
    assert report["references"] == ["udpdiff-multi-task", "cogvideox"]
    differences = {(r["reference"], r["variant"], r["sets"]): r["difference"] for r in report["pairs"]
                   if r["metric"] == "motion_smoothness_flow"}
    assert differences == pytest.approx({
        ("udpdiff-multi-task", "cogvideox", "depth / rgb"): -0.002,
        ("udpdiff-multi-task", "cogvideox", "segmentation / rgb"): -0.001,
        ("cogvideox", "udpdiff-multi-task", "rgb / depth"): 0.002,
        ("cogvideox", "udpdiff-multi-task", "rgb / segmentation"): 0.001})
    losses = {(r["variant"], r["loss"]): r for r in report["losses"]}
    assert losses[("cogvideox", "loss_rgb")]["mean, last 400 steps"] == pytest.approx(0.06)
    dense = losses[("udpdiff-multi-task", "loss_dense")]
    assert dense["mean, last 400 steps"] == pytest.approx(0.03) and dense["se"] == pytest.approx(0.0)
    assert ("cogvideox", "loss_dense") not in losses
    # the multi-task model's dense loss split by the task each sample drew
    assert losses[("udpdiff-multi-task", "loss_dense_segmentation")]["mean, last 400 steps"] == pytest.approx(0.04)
    assert losses[("udpdiff-multi-task", "loss_dense_depth")]["mean, last 400 steps"] == pytest.approx(0.02)
    md = out.with_suffix(".md").read_text()
    assert "-0.0020 ± 0.0000" in md and "+0.0020 ± 0.0000" in md and "minus `cogvideox`" in md
    # one reference named: that view alone
    assert paired.main([str(tab12_run), "--reference", "cogvideox", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["references"] == ["cogvideox"]


def test_cli_names_a_missing_reference_or_run(tab12_run: Path, tmp_path: Path, benchmark_script):
    paired = benchmark_script("small_tab12_paired")
    with pytest.raises(SystemExit, match="no variant 'udpdiff-depth'.*found: cogvideox, udpdiff-multi-task"):
        paired.main([str(tab12_run), "--reference", "udpdiff-depth"])
    with pytest.raises(SystemExit, match="no variants/<name>"):
        paired.main([str(tmp_path / "empty")])


def test_losses_of_a_variant_without_its_history_come_from_an_earlier_report(tab12_run: Path, tmp_path: Path,
                                                                           benchmark_script):
    paired = benchmark_script("small_tab12_paired")
    earlier = tmp_path / "earlier.json"
    assert paired.main([str(tab12_run), "--out", str(earlier)]) == 0
    # a later folder: the RGB-only model's history gone (its tarball not kept), the multi-task one's trained further
    (tab12_run / "variants" / "cogvideox" / "outputs" / "small" / "metrics" / "train_history.csv").unlink()
    history = tab12_run / "variants" / "udpdiff-multi-task" / "outputs" / "small" / "metrics" / "train_history.csv"
    frame = pd.read_csv(history)
    frame["loss_rgb"] = 0.05
    frame.to_csv(history, index=False)
    out = tmp_path / "later.json"
    assert paired.main([str(tab12_run), "--losses-from", str(earlier), "--out", str(out)]) == 0
    losses = {(r["variant"], r["loss"]): r["mean, last 400 steps"] for r in json.loads(out.read_text())["losses"]}
    assert losses[("cogvideox", "loss_rgb")] == pytest.approx(0.06)  # from the earlier report
    assert losses[("udpdiff-multi-task", "loss_rgb")] == pytest.approx(0.05)  # the folder's own, not the earlier 0.07
    assert len(losses) == 5
    # a variant the folders no longer hold brings no losses from the earlier report
    (tab12_run / "variants" / "cogvideox" / "outputs" / "small" / "evaluation" / "per_video.csv").unlink()
    assert paired.main([str(tab12_run), "--reference", "udpdiff-multi-task", "--losses-from", str(earlier),
                        "--out", str(out)]) == 0
    assert {r["variant"] for r in json.loads(out.read_text())["losses"]} == {"udpdiff-multi-task"}


def test_committed_variants_and_a_new_sessions_tarball_merge(tab12_run: Path, tmp_path: Path, benchmark_script):
    """benchmarks/results/small-h200-tab12/'s layout (<name>/per_video.csv, no training history) beside an
    unpacked tarball's: one table, Fig 8 across both, and a variant in both folders refused."""
    paired = benchmark_script("small_tab12_paired")
    committed = tmp_path / "committed"
    (committed / "cogvideox").mkdir(parents=True)
    rgb_only = tab12_run / "variants" / "cogvideox" / "outputs" / "small"
    (rgb_only / "evaluation" / "per_video.csv").rename(committed / "cogvideox" / "per_video.csv")
    pd.DataFrame({"step": [1750, 3500], "val/loss/held_out": [0.1, 0.09]}).to_csv(
        committed / "cogvideox" / "validation_history.csv", index=False)
    pd.DataFrame({"step": [1750, 3500], "val/segmentation/gt_miou": [0.4, 0.6],
                  "val/depth/gt_delta1_depth": [0.6, 0.8]}).to_csv(
        tab12_run / "variants" / "udpdiff-multi-task" / "outputs" / "small" / "metrics" / "validation_history.csv",
        index=False)
    out, fig8 = tmp_path / "paired.json", tmp_path / "fig8.png"
    assert paired.main([str(committed), str(tab12_run), "--out", str(out), "--fig8", str(fig8)]) == 0
    report = json.loads(out.read_text())
    differences = {(r["reference"], r["variant"], r["sets"]): r["difference"] for r in report["pairs"]
                   if r["metric"] == "motion_smoothness_flow"}
    assert differences[("udpdiff-multi-task", "cogvideox", "depth / rgb")] == pytest.approx(-0.002)
    # the committed RGB-only variant has no history here: only the tarball's variant has losses
    assert {r["variant"] for r in report["losses"]} == {"udpdiff-multi-task"}
    assert fig8.stat().st_size > 0
    (committed / "udpdiff-multi-task").mkdir()
    (committed / "udpdiff-multi-task" / "per_video.csv").write_text("set,clip_id\n")
    with pytest.raises(SystemExit, match="'udpdiff-multi-task' is in two folders"):
        paired.main([str(committed), str(tab12_run)])
