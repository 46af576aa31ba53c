"""One module per DVC stage (``udpdiff.stages.<stage>.run(params, paths) -> StepResult``), so a
stage's dvc.yaml ``deps`` are exactly the modules it imports and its ``params`` the keys it reads
(``tests/test_dvc_graph.py`` derives both and compares them with dvc.yaml). Nothing here knows
about Prefect, DVC or MLflow."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from udpdiff.config import Params

STAGES = ("data", "validate", "encode", "autoencoder", "latents", "train", "sample", "evaluate", "report")

# the stages that run under a multi-process launcher, and the params.yaml key naming it
LAUNCHERS = {"train": "train_launcher", "sample": "inference_launcher", "evaluate": "inference_launcher"}


def stage_launcher(p: Params, stage: str) -> str | None:
    """The launcher ``stage`` runs under, or ``None`` for one plain process (``python -m``)."""
    key = LAUNCHERS.get(stage)
    launcher = getattr(p, key) if key else None
    return None if launcher is None or launcher.split() == ["python", "-m"] else launcher
