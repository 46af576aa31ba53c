"""udpdiff.evaluation.paired: variants minus a reference, clip by clip, on per-clip score frames laid out as
the evaluate step's per_video.csv, with differences known by construction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from udpdiff.evaluation.paired import COLUMNS, paired_differences, render_markdown

CLIPS = [f"synth-1234-{i:05d}" for i in (33, 44, 65, 69, 107, 130)]


def per_video(sets: dict[str, dict[str, list[float]]]) -> pd.DataFrame:
    return pd.DataFrame([{"set": s, "clip_id": c, **{m: v[i] for m, v in metrics.items()}}
                         for s, metrics in sets.items() for i, c in enumerate(CLIPS)])


@pytest.fixture
def scores() -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(0)
    ms = 0.99 + 0.001 * rng.random(len(CLIPS))
    miou = 0.6 + 0.1 * rng.random(len(CLIPS))
    rgb_only = per_video({"rgb": {"motion_smoothness_flow": ms - np.array([0.001] * 5 + [-0.004])}})
    return {
        "udpdiff-multi-task": per_video({
            "segmentation": {"motion_smoothness_flow": ms, "gt_miou": miou},
            "depth": {"motion_smoothness_flow": ms + 0.002, "gt_delta1_depth": np.full(len(CLIPS), 0.9),
                      "gt_abs_rel_depth": np.full(len(CLIPS), 0.10)},
            "real": {"motion_smoothness_flow": np.full(len(CLIPS), 0.995)}}),
        # the rows in another order: pairing goes by clip id, not by row
        "cogvideox": rgb_only.iloc[::-1],
        # a single-task variant: worse mIoU on every clip but one
        "udpdiff-segmentation": per_video({"segmentation": {"motion_smoothness_flow": ms,
                                                            "gt_miou": miou - np.array([0.05] * 5 + [-0.05])}}),
        "udpdiff-depth": per_video({"depth": {"gt_delta1_depth": np.full(len(CLIPS), 0.9),
                                              "gt_abs_rel_depth": np.full(len(CLIPS), 0.12)}}),
    }


def test_differences_are_paired_by_clip_and_by_task(scores):
    pairs = paired_differences(scores, "udpdiff-multi-task")
    assert list(pairs.columns) == COLUMNS
    rows = pairs.set_index(["variant", "sets", "metric"])

    # the RGB-only baseline's one set against each of the multi-task's two
    rgb_vs_seg = rows.loc[("cogvideox", "segmentation / rgb", "motion_smoothness_flow")]
    assert rgb_vs_seg["difference"] == pytest.approx((5 * -0.001 + 0.004) / 6, abs=1e-9)
    assert rgb_vs_seg["difference_se"] == pytest.approx(np.std([-0.001] * 5 + [0.004], ddof=1) / np.sqrt(6))
    assert (rgb_vs_seg["variant_better"], rgb_vs_seg["variant_worse"], rgb_vs_seg["n"]) == (1, 5, 6)
    rgb_vs_depth = rows.loc[("cogvideox", "depth / rgb", "motion_smoothness_flow")]
    assert rgb_vs_depth["difference"] == pytest.approx((5 * -0.001 + 0.004) / 6 - 0.002, abs=1e-9)

    # a single-task variant meets the multi-task on its own task only, generated videos and dense scores
    seg = rows.loc[("udpdiff-segmentation", "segmentation", "gt_miou")]
    assert seg["difference"] == pytest.approx((5 * -0.05 + 0.05) / 6)
    assert (seg["variant_better"], seg["variant_worse"]) == (1, 5)
    assert ("udpdiff-segmentation", "segmentation / segmentation", "motion_smoothness_flow") in rows.index
    assert not any(v == "cogvideox" and s in ("segmentation", "depth") for v, s, _ in rows.index)
    # lower is better for AbsRel: a larger error is the variant's loss on every clip
    abs_rel = rows.loc[("udpdiff-depth", "depth", "gt_abs_rel_depth")]
    assert abs_rel["difference"] == pytest.approx(0.02)
    assert (abs_rel["variant_better"], abs_rel["variant_worse"]) == (0, 6)
    # equal on every clip: neither better nor worse
    assert tuple(rows.loc[("udpdiff-depth", "depth", "gt_delta1_depth"), ["variant_better", "variant_worse"]]) == (0, 0)

    # what the real clips score, beside
    real = rows.loc[("real clips", "real", "motion_smoothness_flow")]
    assert real["variant_mean"] == pytest.approx(0.995) and np.isnan(real["difference"])


def test_the_reference_must_have_scores_and_alone_it_compares_nothing(scores):
    with pytest.raises(KeyError, match="'udpdiff-joint'.*have: udpdiff-multi-task, cogvideox"):
        paired_differences(scores, "udpdiff-joint")
    alone = paired_differences({"udpdiff-multi-task": scores["udpdiff-multi-task"]}, "udpdiff-multi-task")
    assert alone.empty and list(alone.columns) == COLUMNS
    assert "no other variant" in render_markdown(alone, "udpdiff-multi-task")
    text = render_markdown(paired_differences(scores, "udpdiff-multi-task"), "udpdiff-multi-task")
    assert "| cogvideox " in text and "-0.0002 ± 0.0008" in text  # mean ± its standard error
