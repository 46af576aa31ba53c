"""The paper's Fig 8 across runs: each run's validation scores over training steps in one chart.

The train stage draws one run's curves (``validation_scores.png``); an ablation's parent run and the
``small`` GPU runs' figures draw every variant's together. Apart from ``udpdiff.viz`` because no stage
reads it: a change here reruns no DVC stage.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from udpdiff.viz import plot_curves

# each task's dense prediction of the held-out real clips against exact ground truth
VALIDATION_SCORES = {"val/segmentation/gt_miou": "seg mIoU", "val/depth/gt_delta1_depth": "depth δ1"}


def plot_validation_scores(
    path: str | os.PathLike,
    histories: Mapping[str, Any],
    title: str = "Fig 8: held-out real clips vs exact ground truth",
) -> Path | None:
    """Each run's dense-prediction scores (``VALIDATION_SCORES``) over training steps, to a PNG.

    ``histories`` maps a run's name to its validation history: a ``step`` column and ``val/...``
    columns (the train stage's ``validation_history.csv`` as a DataFrame, or a dict of sequences).
    A run without a score draws no curve for it; None, and no file, when no run has any.
    """
    series = {}
    for name, history in histories.items():
        for key, label in VALIDATION_SCORES.items():
            if "step" in history and key in history and np.isfinite(np.asarray(history[key], np.float64)).any():
                series[f"{name}: {label}"] = (history["step"], history[key])
    if not series:
        return None
    return plot_curves(path, series, title=title, ylabel="score (higher is better)")
