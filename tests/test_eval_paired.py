"""udpdiff.evaluation.paired: variants minus a reference, clip by clip, on per-clip score frames laid out as
the evaluate step's per_video.csv, with differences known by construction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from udpdiff.evaluation.paired import (
    COLUMNS,
    paired_differences,
    paired_views,
    render_markdown,
    render_views_markdown,
    views_frame,
)

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


def test_tabs_1_and_2_are_read_against_both_references_in_one_frame(scores):
    # Tab 2 against the multi-task model, Tab 1 against the RGB-only one; a reference without scores is skipped
    views = paired_views(scores, ["udpdiff-multi-task", "cogvideox", "udpdiff-joint"])
    assert list(views) == ["udpdiff-multi-task", "cogvideox"]
    tab1 = views["cogvideox"].set_index(["variant", "sets", "metric"])
    seg_vs_rgb = tab1.loc[("udpdiff-segmentation", "rgb / segmentation", "motion_smoothness_flow")]
    assert seg_vs_rgb["difference"] == pytest.approx((5 * 0.001 - 0.004) / 6, abs=1e-9)
    assert (seg_vs_rgb["variant_better"], seg_vs_rgb["variant_worse"]) == (5, 1)
    # the depth-only model generated no videos here: no text-to-video row, and the RGB-only one predicts no depth
    assert not any(v == "udpdiff-depth" for v, _, _ in tab1.index)

    frame = views_frame(views)
    assert list(frame.columns) == ["reference", *COLUMNS]
    assert len(frame) == len(views["udpdiff-multi-task"]) + len(views["cogvideox"])
    assert set(frame.reference) == {"udpdiff-multi-task", "cogvideox"}
    assert views_frame({}).empty and list(views_frame({}).columns) == ["reference", *COLUMNS]

    text = render_views_markdown(views)
    assert text.index("minus `udpdiff-multi-task`") < text.index("minus `cogvideox`")
    assert "+0.0002 ± 0.0008" in text  # the Tab 1 row above: segmentation-only minus RGB-only
