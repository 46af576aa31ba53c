"""The small-scale Tab 1/2 as paired differences: each variant against each reference variant, clip by
clip (``udpdiff.evaluation.paired``), with each variant's training losses beside and, with ``--fig8``,
every variant's validation scores over steps (the paper's Fig 8) in one chart.

    python benchmarks/small_tab12_paired.py RUN_DIR [RUN_DIR ...] [--reference NAME ...] [--out paired.json]
        [--losses-from EARLIER_PAIRED_JSON] [--fig8 fig8_validation.png]

Each RUN_DIR holds variants as a ``small`` GPU run's unpacked tarballs lay them out
(``variants/<name>/outputs/small/``: ``evaluation/per_video.csv``, ``metrics/train_history.csv`` and
``metrics/validation_history.csv``), or as ``benchmarks/results/small-h200-tab12/`` keeps them
(``<name>/per_video.csv``, ``<name>/validation_history.csv``, ``<name>/train_history.csv`` where kept).
Several folders merge: the committed variants and a new session's tarball, say; a variant in two of
them is refused.

The references are params.yaml's ``tab1-2`` ``compare_with`` unless ``--reference`` names others (the
multi-task model for Tab 2 and multi-task vs single-task, the RGB-only one for Tab 1); a default one the
run lacks is left out. The losses are the mean of each half (and of the dense half per task) over the
last ``--last-steps`` steps of training, with its standard error over blocks of 40 steps; they are not
paired (the draws differ). A variant without its ``train_history.csv`` (a session's tarball no longer
kept: only its per-clip CSVs are committed) takes its loss rows from ``--losses-from``, an earlier run
of this script over a folder that had it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from udpdiff.config import load_params
from udpdiff.evaluation.paired import paired_views, render_views_markdown, views_frame
from udpdiff.evaluation.validation_curves import plot_validation_scores
from udpdiff.io.atomic import write_text

LOSS_BLOCK = 40
PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


class VariantFiles(NamedTuple):
    per_video: Path
    train_history: Path
    validation_history: Path


def _files(run: Path) -> dict[str, VariantFiles]:
    unpacked = {d.name: VariantFiles(d / "outputs/small/evaluation/per_video.csv",
                                     d / "outputs/small/metrics/train_history.csv",
                                     d / "outputs/small/metrics/validation_history.csv")
                for d in sorted((run / "variants").glob("*"))}
    committed = {d.name: VariantFiles(d / "per_video.csv", d / "train_history.csv", d / "validation_history.csv")
                 for d in sorted(run.glob("*")) if d.is_dir() and d.name != "variants"}
    return {name: f for name, f in {**committed, **unpacked}.items() if f.per_video.is_file()}


def variant_files(runs: list[Path]) -> dict[str, VariantFiles]:
    found: dict[str, VariantFiles] = {}
    for run in runs:
        for name, files in _files(run).items():
            if name in found:
                raise SystemExit(f"variant {name!r} is in two folders: {found[name].per_video} and {files.per_video}")
            found[name] = files
    if not found:
        raise SystemExit(f"{', '.join(map(str, runs))}: no variants/<name>/outputs/small/evaluation/per_video.csv "
                         "nor <name>/per_video.csv: unpack the tarballs there")
    return dict(sorted(found.items()))


def loss_summary(history: Path, last_steps: int) -> dict[str, dict[str, float]]:
    frame = pd.read_csv(history).tail(last_steps)
    out = {}
    for column in ("loss_rgb", "loss_dense", *sorted(c for c in frame if c.startswith("loss_dense_"))):
        if column in frame and frame[column].notna().any():
            blocks = frame[column].groupby(np.arange(len(frame)) // LOSS_BLOCK).mean()
            out[column] = {"mean": float(frame[column].mean()),
                           "se": float(blocks.std(ddof=1) / np.sqrt(len(blocks))) if len(blocks) > 1 else float("nan")}
    return out


def compare(dirs: dict[str, VariantFiles], references: list[str] | None = None,
            last_steps: int = 400) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """(reference -> its paired differences, the losses) of :func:`variant_files`' variants;
    ``references`` None: params.yaml's for tab1-2, those the variants include."""
    run = ", ".join(sorted({str(f.per_video.parent) for f in dirs.values()}))
    if references is None:
        references = [r for r in load_params(PARAMS).ablations["tab1-2"].references if r in dirs]
        if not references:
            raise SystemExit(f"{run}: none of tab1-2's references (params.yaml compare_with) ran "
                             f"(found: {', '.join(dirs)}); name one with --reference")
    for reference in references:
        if reference not in dirs:
            raise SystemExit(f"{run}: no variant {reference!r} to compare with (found: {', '.join(dirs)})")
    views = paired_views({name: pd.read_csv(f.per_video) for name, f in dirs.items()}, references)
    losses = []
    for name, f in dirs.items():
        if f.train_history.is_file():
            for column, s in loss_summary(f.train_history, last_steps).items():
                losses.append({"variant": name, "loss": column, f"mean, last {last_steps} steps": s["mean"],
                               "se": s["se"]})
    return views, pd.DataFrame(losses)


def earlier_losses(losses: pd.DataFrame, earlier: Path, variants: set[str]) -> pd.DataFrame:
    """``losses`` with the rows of ``earlier`` (this script's JSON) for the ``variants`` it lacks."""
    rows = pd.DataFrame(json.loads(earlier.read_text())["losses"])
    missing = rows[rows.variant.isin(variants - (set(losses.variant) if len(losses) else set()))]
    return pd.concat([losses, missing], ignore_index=True).sort_values("variant", kind="stable", ignore_index=True)


def plot_fig8(dirs: dict[str, VariantFiles], path: Path) -> Path | None:
    """Every variant's validation scores over steps (those with a ``validation_history.csv``)."""
    histories = {name: pd.read_csv(f.validation_history) for name, f in dirs.items()
                 if f.validation_history.is_file()}
    return plot_validation_scores(path, histories)


def render(views: dict[str, pd.DataFrame], losses: pd.DataFrame) -> str:
    return (render_views_markdown(views) + "\nTraining losses (not paired; ± the standard error over blocks of "
            f"{LOSS_BLOCK} steps):\n\n" + losses.to_markdown(index=False, floatfmt=".4f") + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR",
                    help="holds variants/<name>/outputs/small/ or <name>/per_video.csv")
    ap.add_argument("--reference", action="append", default=None,
                    help="a variant to read the others against (repeat for several; default: params.yaml's tab1-2)")
    ap.add_argument("--last-steps", type=int, default=400)
    ap.add_argument("--out", type=Path, default=None, help="JSON of the rows (a .md beside it)")
    ap.add_argument("--losses-from", type=Path, default=None,
                    help="an earlier --out JSON: loss rows of the variants whose train_history.csv RUN_DIR lacks")
    ap.add_argument("--fig8", type=Path, default=None, help="a PNG of every variant's validation scores over steps")
    args = ap.parse_args(argv)
    dirs = variant_files(args.runs)
    views, losses = compare(dirs, args.reference, args.last_steps)
    if args.losses_from:
        losses = earlier_losses(losses, args.losses_from, set(dirs))
    text = render(views, losses)
    print(text)
    if args.out:
        report = {"runs": [str(r) for r in args.runs], "references": list(views),
                  "pairs": views_frame(views).to_dict(orient="records"),
                  "losses": losses.to_dict(orient="records")}
        write_text(args.out, json.dumps(report, indent=1, default=float) + "\n")
        write_text(args.out.with_suffix(".md"), text)
    if args.fig8:
        print(f"Fig 8 -> {plot_fig8(dirs, args.fig8)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
