"""The small-scale Tab 1/2 as paired differences: each variant against each reference variant, clip by
clip (``udpdiff.evaluation.paired``), from the unpacked tarballs of a ``small`` GPU run (``small_gpu.py``;
several sessions' variants in one folder, as ``python -m flows import-run`` merges them), with each
variant's training losses beside.

    python benchmarks/small_tab12_paired.py RUN_DIR [--reference NAME ...] [--out paired.json]
        [--losses-from EARLIER_PAIRED_JSON]

The references are params.yaml's ``tab1-2`` ``compare_with`` unless ``--reference`` names others (the
multi-task model for Tab 2 and multi-task vs single-task, the RGB-only one for Tab 1); a default one the
run lacks is left out. The losses are the mean of each half (and of the dense half per task) over the
last ``--last-steps`` steps of training, with its standard error over blocks of 40 steps; they are not
paired (the draws differ). A variant whose ``train_history.csv`` the folder lacks (a session's tarball
no longer kept: only its per-clip CSVs are committed) takes its loss rows from ``--losses-from``, an
earlier run of this script over a folder that had it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from udpdiff.config import load_params
from udpdiff.evaluation.paired import paired_views, render_views_markdown, views_frame
from udpdiff.io.atomic import write_text

LOSS_BLOCK = 40
PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def variant_dirs(run: Path) -> dict[str, Path]:
    found = {d.name: d / "outputs" / "small" for d in sorted((run / "variants").glob("*"))
             if (d / "outputs" / "small" / "evaluation" / "per_video.csv").is_file()}
    if not found:
        raise SystemExit(f"{run}: no variants/<name>/outputs/small/evaluation/per_video.csv: unpack the tarballs there")
    return found


def loss_summary(history: Path, last_steps: int) -> dict[str, dict[str, float]]:
    frame = pd.read_csv(history).tail(last_steps)
    out = {}
    for column in ("loss_rgb", "loss_dense", *sorted(c for c in frame if c.startswith("loss_dense_"))):
        if column in frame and frame[column].notna().any():
            blocks = frame[column].groupby(np.arange(len(frame)) // LOSS_BLOCK).mean()
            out[column] = {"mean": float(frame[column].mean()),
                           "se": float(blocks.std(ddof=1) / np.sqrt(len(blocks))) if len(blocks) > 1 else float("nan")}
    return out


def compare(run: Path, references: list[str] | None = None,
            last_steps: int = 400) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """(reference -> its paired differences, the losses); ``references`` None: params.yaml's for tab1-2,
    those the run has."""
    dirs = variant_dirs(run)
    if references is None:
        references = [r for r in load_params(PARAMS).ablations["tab1-2"].references if r in dirs]
        if not references:
            raise SystemExit(f"{run}: none of tab1-2's references (params.yaml compare_with) ran "
                             f"(found: {', '.join(dirs)}); name one with --reference")
    for reference in references:
        if reference not in dirs:
            raise SystemExit(f"{run}: no variant {reference!r} to compare with (found: {', '.join(dirs)})")
    views = paired_views({name: pd.read_csv(d / "evaluation" / "per_video.csv") for name, d in dirs.items()},
                         references)
    losses = []
    for name, d in dirs.items():
        history = d / "metrics" / "train_history.csv"
        if history.is_file():
            for column, s in loss_summary(history, last_steps).items():
                losses.append({"variant": name, "loss": column, f"mean, last {last_steps} steps": s["mean"],
                               "se": s["se"]})
    return views, pd.DataFrame(losses)


def earlier_losses(losses: pd.DataFrame, earlier: Path) -> pd.DataFrame:
    """``losses`` with the rows of ``earlier`` (this script's JSON) for variants ``losses`` lacks."""
    rows = pd.DataFrame(json.loads(earlier.read_text())["losses"])
    missing = rows[~rows.variant.isin(set(losses.variant) if len(losses) else set())]
    return pd.concat([losses, missing], ignore_index=True).sort_values(["variant", "loss"], ignore_index=True)


def render(views: dict[str, pd.DataFrame], losses: pd.DataFrame) -> str:
    return (render_views_markdown(views) + "\nTraining losses (not paired; ± the standard error over blocks of "
            f"{LOSS_BLOCK} steps):\n\n" + losses.to_markdown(index=False, floatfmt=".4f") + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="holds variants/<name>/outputs/small/")
    ap.add_argument("--reference", action="append", default=None,
                    help="a variant to read the others against (repeat for several; default: params.yaml's tab1-2)")
    ap.add_argument("--last-steps", type=int, default=400)
    ap.add_argument("--out", type=Path, default=None, help="JSON of the rows (a .md beside it)")
    ap.add_argument("--losses-from", type=Path, default=None,
                    help="an earlier --out JSON: loss rows of the variants whose train_history.csv RUN_DIR lacks")
    args = ap.parse_args(argv)
    views, losses = compare(args.run, args.reference, args.last_steps)
    if args.losses_from:
        losses = earlier_losses(losses, args.losses_from)
    text = render(views, losses)
    print(text)
    if args.out:
        report = {"run": str(args.run), "references": list(views),
                  "pairs": views_frame(views).to_dict(orient="records"),
                  "losses": losses.to_dict(orient="records")}
        write_text(args.out, json.dumps(report, indent=1, default=float) + "\n")
        write_text(args.out.with_suffix(".md"), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
