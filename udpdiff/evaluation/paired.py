"""An ablation's variants against a reference variant, clip by clip.

Every variant of an ablation generates from the same prompts and seeds and predicts the same held-out
clips, so a difference can be read per clip (the evaluate step's ``per_video.csv``): its mean, its
standard error over the clips, and on how many clips the variant is better. The ablation table's means
alone cannot tell a 0.001 difference in MS† from noise.

- ``text-to-video`` rows: the generated videos' scores. A variant that generates with several tasks
  (the multi-task model) has one set per task; each is compared with the other variant's set of the same
  task, or with its only set (the RGB-only baseline's ``rgb``).
- ``dense prediction`` rows: the held-out real clips' scores against ground truth, for the tasks both
  variants predict.
- ``real clips`` rows: what the real videos themselves score (MS† and pixel consistency also reward a
  video that moves less, so the real clips' level is the one to read a difference against).

An ablation may be read against several references (``AblationParams.compare_with``): Tabs 1-2 in one
table compare the single-task models with the RGB-only one (Tab 1) and with the multi-task one (Tab 2).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

GENERATED_SETS = ("rgb", "segmentation", "depth")
# metric -> +1 where higher is better, -1 where lower is; a metric a run lacks is left out
VIDEO_METRICS = {"subject_consistency": 1, "background_consistency": 1, "motion_smoothness": 1,
                 "motion_smoothness_flow": 1, "pixel_frame_consistency": 1, "caption_sky": 1, "caption_ground": 1}
DENSE_METRICS = {
    "segmentation": {"gt_miou": 1, "gt_miou_single": 1, "gt_temporal_id_consistency": 1},
    "depth": {"gt_delta1_depth": 1, "gt_delta1_depth_single": 1, "gt_abs_rel_depth": -1, "gt_delta1": 1,
              "gt_rmse": -1},
}
COLUMNS = ["variant", "part", "sets", "metric", "n", "reference_mean", "variant_mean", "difference",
           "difference_se", "variant_better", "variant_worse"]


def paired(reference: pd.Series, variant: pd.Series, sign: int) -> dict[str, float]:
    """``variant - reference`` over the clips both scored (aligned on the index: the clip id)."""
    both = pd.concat([reference.rename("ref"), variant.rename("var")], axis=1).dropna()
    diff = both["var"] - both["ref"]
    n = len(diff)
    return {"n": n, "reference_mean": both["ref"].mean(), "variant_mean": both["var"].mean(),
            "difference": diff.mean(), "difference_se": diff.std(ddof=1) / np.sqrt(n) if n > 1 else float("nan"),
            "variant_better": int((sign * diff > 0).sum()), "variant_worse": int((sign * diff < 0).sum())}


def generated_pairs(reference_sets: set[str], variant_sets: set[str]) -> list[tuple[str, str]]:
    """(reference set, variant set) pairs of generated videos compared: the same task where both have it,
    else every set against the other side's only one."""
    common = sorted(reference_sets & variant_sets)
    if common:
        return [(s, s) for s in common]
    if len(variant_sets) == 1:
        return [(s, next(iter(variant_sets))) for s in sorted(reference_sets)]
    if len(reference_sets) == 1:
        return [(next(iter(reference_sets)), s) for s in sorted(variant_sets)]
    return []


def paired_differences(per_video: Mapping[str, pd.DataFrame], reference: str) -> pd.DataFrame:
    """Each variant of ``per_video`` (variant -> its ``per_video.csv`` frame) minus ``reference``, one row
    per compared set and metric (``COLUMNS``), and the real clips' own scores. Empty when no other
    variant has scores."""
    if reference not in per_video:
        raise KeyError(f"no per-clip scores of the reference variant {reference!r} (have: {', '.join(per_video)})")
    videos = {name: frame.set_index(["set", "clip_id"]) for name, frame in per_video.items()}
    ref = videos[reference]
    sets = {name: set(v.index.get_level_values("set")) & set(GENERATED_SETS) for name, v in videos.items()}
    rows = []
    for name, var in videos.items():
        if name == reference:
            continue
        for ref_set, var_set in generated_pairs(sets[reference], sets[name]):
            for metric, sign in VIDEO_METRICS.items():
                if metric in ref and metric in var:
                    rows.append({"variant": name, "part": "text-to-video", "sets": f"{ref_set} / {var_set}",
                                 "metric": metric, **paired(ref.loc[ref_set, metric], var.loc[var_set, metric], sign)})
        for task, metrics in DENSE_METRICS.items():
            if task in sets[reference] and task in sets[name]:
                for metric, sign in metrics.items():
                    if metric in ref and metric in var:
                        rows.append({"variant": name, "part": "dense prediction", "sets": task, "metric": metric,
                                     **paired(ref.loc[task, metric], var.loc[task, metric], sign)})
    if rows and "real" in ref.index.get_level_values("set"):
        real = ref.loc["real"]
        for metric in VIDEO_METRICS:
            if metric in real and real[metric].notna().any():
                rows.append({"variant": "real clips", "part": "text-to-video", "sets": "real", "metric": metric,
                             "n": int(real[metric].notna().sum()), "variant_mean": real[metric].mean(),
                             "variant_better": 0, "variant_worse": 0})
    return pd.DataFrame(rows, columns=COLUMNS)


def render_markdown(pairs: pd.DataFrame, reference: str) -> str:
    """``pairs`` as a markdown table, each difference as ``mean ± standard error``."""
    head = f"Paired over clips, each variant minus `{reference}` (same prompts, seeds and held-out clips):\n\n"
    if pairs.empty:
        return head + "(no other variant has per-clip scores)\n"
    shown = pairs.assign(difference=["" if pd.isna(d) else f"{d:+.4f} ± {se:.4f}"
                                     for d, se in zip(pairs.difference, pairs.difference_se, strict=True)])
    return head + shown.drop(columns=["difference_se"]).to_markdown(index=False, floatfmt=".4f") + "\n"


def paired_views(per_video: Mapping[str, pd.DataFrame], references: list[str]) -> dict[str, pd.DataFrame]:
    """:func:`paired_differences` against each reference that has per-clip scores, in order."""
    return {ref: paired_differences(per_video, ref) for ref in references if ref in per_video}


def views_frame(views: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The views as one frame, a ``reference`` column first (MLflow's table view)."""
    frames = [v.assign(reference=ref) for ref, v in views.items() if not v.empty]
    if not frames:
        return pd.DataFrame(columns=["reference", *COLUMNS])
    return pd.concat(frames, ignore_index=True)[["reference", *COLUMNS]]


def render_views_markdown(views: Mapping[str, pd.DataFrame]) -> str:
    """Each view's :func:`render_markdown`, one after the other."""
    return "\n".join(render_markdown(pairs, ref) for ref, pairs in views.items())
