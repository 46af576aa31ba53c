"""The `report` stage: the evaluation's tables in the paper's layouts, as markdown and HTML."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from udpdiff.io.atomic import write_text
from udpdiff.stages.common import (
    StepResult,
    sample_sets,
)

if TYPE_CHECKING:
    from udpdiff.config import Params
    from udpdiff.paths import ProjectPaths

logger = logging.getLogger(__name__)


def run(p: Params, paths: ProjectPaths) -> StepResult:
    """The run's report (markdown and HTML): the evaluation's tables in the paper's layouts, the
    training and VAE loss curves, and the sample galleries."""
    from udpdiff.evaluation import tables

    ev = json.loads((paths.evaluation / "metrics.json").read_text())
    runtime_file = paths.metrics / "runtime.json"  # the sample stage's timings (Tab 4), a metric
    runtime = json.loads(runtime_file.read_text()) if runtime_file.exists() else {}
    tabs = tables.all_tables(ev["metrics"], [t for t in sample_sets(p) if t in ev["metrics"]], ev.get("models", {}),
                             runtime)
    models = [f"{k}: {v}" for k, v in ev.get("models", {}).items()]
    notes = [*ev["notes"], *(f"model for {m}" for m in models),
             "`gt_*` scores are dense predictions *of* real validation clips (RGB half fixed to the clip) against "
             "their ground truth; depth after least-squares scale-and-shift alignment per video."]
    title = f"UDPDiff report — profile `{p.profile}`"
    out = paths.report
    write_text(out / "report.md", tables.markdown_document(title, tabs, notes))
    write_text(out / "report.html", tables.html_document(title, tabs, notes))
    plots = [q for q in (paths.metrics / "train_loss.png", paths.metrics / "vae_loss.png") if q.exists()]
    return StepResult(artifacts=[out / "report.md", out / "report.html", *plots])
