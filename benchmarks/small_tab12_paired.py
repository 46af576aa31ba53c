"""The small-scale Tab 1/2 as paired differences: each variant against a reference variant (the full
method), clip by clip, from the unpacked tarballs of a ``small`` GPU run (``small_gpu.py``; several
sessions' variants in one folder, as ``python -m flows import-run`` merges them).

    python benchmarks/small_tab12_paired.py RUN_DIR [--reference udpdiff-multi-task] [--out paired.json]

Every variant generates from the same prompts and seeds, and predicts the same held-out clips, so a
difference is read per clip (``evaluation/per_video.csv``): its mean, its standard error over the clips,
and on how many clips the variant is better. The ablation table's means alone cannot tell a 0.001
difference in MS† from noise. Rows:
- ``text-to-video``: the generated videos' RGB scores (MS†, pixel consistency, caption following). A
  variant that generates with several tasks (the multi-task) has one set per task; each is compared
  with the other variant's sets of the same task, or with its only set (the RGB-only baseline's
  ``rgb``).
- ``dense prediction``: the held-out real clips' scores against exact ground truth (RGB half given),
  for the tasks both variants predict.
- ``training``: the mean of each loss half over the last ``--last-steps`` steps of training (its
  standard error over blocks of 40 steps; not paired: the draws differ).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from udpdiff.io.atomic import write_text

GENERATED_SETS = ("rgb", "segmentation", "depth")
# metric -> +1 when higher is better, -1 when lower is
VIDEO_METRICS = {"motion_smoothness_flow": 1, "pixel_frame_consistency": 1, "caption_sky": 1, "caption_ground": 1}
DENSE_METRICS = {
    "segmentation": {"gt_miou": 1, "gt_miou_single": 1, "gt_temporal_id_consistency": 1},
    "depth": {"gt_delta1_depth": 1, "gt_delta1_depth_single": 1, "gt_abs_rel_depth": -1, "gt_delta1": 1,
              "gt_rmse": -1},
}
LOSS_BLOCK = 40


def variant_dirs(run: Path) -> dict[str, Path]:
    found = {d.name: d / "outputs" / "small" for d in sorted((run / "variants").glob("*"))
             if (d / "outputs" / "small" / "evaluation" / "per_video.csv").is_file()}
    if not found:
        raise SystemExit(f"{run}: no variants/<name>/outputs/small/evaluation/per_video.csv: unpack the tarballs there")
    return found


def paired(ref: pd.Series, other: pd.Series, sign: int) -> dict[str, float]:
    both = pd.concat([ref.rename("ref"), other.rename("var")], axis=1).dropna()
    diff = both["var"] - both["ref"]
    n = len(diff)
    return {"n": n, "reference_mean": both["ref"].mean(), "variant_mean": both["var"].mean(), "difference": diff.mean(),
            "difference_se": diff.std(ddof=1) / np.sqrt(n) if n > 1 else float("nan"),
            "variant_better": int((sign * diff > 0).sum()), "variant_worse": int((sign * diff < 0).sum())}


def generated_pairs(ref_sets: set[str], var_sets: set[str]) -> list[tuple[str, str]]:
    """(reference set, variant set) pairs of generated videos compared: same task where both have it, else
    every set against the other side's only one."""
    common = sorted(ref_sets & var_sets)
    if common:
        return [(s, s) for s in common]
    if len(var_sets) == 1:
        return [(s, next(iter(var_sets))) for s in sorted(ref_sets)]
    if len(ref_sets) == 1:
        return [(next(iter(ref_sets)), s) for s in sorted(var_sets)]
    return []


def loss_summary(history: Path, last_steps: int) -> dict[str, dict[str, float]]:
    frame = pd.read_csv(history).tail(last_steps)
    out = {}
    for column in ("loss_rgb", "loss_dense"):
        if column in frame:
            blocks = frame[column].groupby(np.arange(len(frame)) // LOSS_BLOCK).mean()
            out[column] = {"mean": float(frame[column].mean()),
                           "se": float(blocks.std(ddof=1) / np.sqrt(len(blocks))) if len(blocks) > 1 else float("nan")}
    return out


def compare(run: Path, reference: str, last_steps: int = 400) -> tuple[pd.DataFrame, pd.DataFrame]:
    dirs = variant_dirs(run)
    if reference not in dirs:
        raise SystemExit(f"{run}: no variant {reference!r} to compare with (found: {', '.join(dirs)})")
    videos = {name: pd.read_csv(d / "evaluation" / "per_video.csv").set_index(["set", "clip_id"])
              for name, d in dirs.items()}
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
            if task not in sets[reference] or task not in sets[name]:
                continue
            for metric, sign in metrics.items():
                if metric in ref and metric in var:
                    rows.append({"variant": name, "part": "dense prediction", "sets": task, "metric": metric,
                                 **paired(ref.loc[task, metric], var.loc[task, metric], sign)})
    real = ref.loc["real"] if "real" in ref.index.get_level_values("set") else None
    if real is not None:  # what the real clips score: MS† and pixel consistency also reward a still video
        for metric in VIDEO_METRICS:
            if metric in real:
                rows.append({"variant": "real clips", "part": "text-to-video", "sets": "real", "metric": metric,
                             "n": int(real[metric].notna().sum()), "reference_mean": float("nan"),
                             "variant_mean": real[metric].mean(), "difference": float("nan"),
                             "difference_se": float("nan"), "variant_better": 0, "variant_worse": 0})
    losses = []
    for name, d in dirs.items():
        history = d / "metrics" / "train_history.csv"
        if history.is_file():
            for column, s in loss_summary(history, last_steps).items():
                losses.append({"variant": name, "loss": column, f"mean, last {last_steps} steps": s["mean"],
                               "se": s["se"]})
    return pd.DataFrame(rows), pd.DataFrame(losses)


def render(pairs: pd.DataFrame, losses: pd.DataFrame, reference: str) -> str:
    text = [f"Paired over clips, each variant minus `{reference}` (same prompts, seeds and held-out clips):", ""]
    if len(pairs):
        shown = pairs.assign(difference=["" if np.isnan(d) else f"{d:+.4f} ± {se:.4f}"
                                         for d, se in zip(pairs.difference, pairs.difference_se, strict=True)])
        text.append(shown.drop(columns=["difference_se"]).to_markdown(index=False, floatfmt=".4f"))
    else:
        text.append("(no other variant)")
    text += ["", "Training losses (not paired; ± the standard error over blocks of "
             f"{LOSS_BLOCK} steps):", "", losses.to_markdown(index=False, floatfmt=".4f")]
    return "\n".join(text) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="holds variants/<name>/outputs/small/")
    ap.add_argument("--reference", default="udpdiff-multi-task")
    ap.add_argument("--last-steps", type=int, default=400)
    ap.add_argument("--out", type=Path, default=None, help="JSON of the rows (a .md beside it)")
    args = ap.parse_args(argv)
    pairs, losses = compare(args.run, args.reference, args.last_steps)
    text = render(pairs, losses, args.reference)
    print(text)
    if args.out:
        report = {"run": str(args.run), "reference": args.reference, "pairs": pairs.to_dict(orient="records"),
                  "losses": losses.to_dict(orient="records")}
        write_text(args.out, json.dumps(report, indent=1, default=float) + "\n")
        write_text(args.out.with_suffix(".md"), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
