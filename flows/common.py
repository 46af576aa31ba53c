"""What every flow shares: locating the repo, loading params, and one MLflow run per stage."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Prefect's server would otherwise phone home and race on its telemetry row; set before import.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
# The synthetic clips are tiny: more torch threads than cores only adds contention.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import mlflow  # noqa: E402

from udpdiff.config import Params, ParamsError, load_params  # noqa: E402
from udpdiff.paths import ProjectPaths  # noqa: E402
from udpdiff.steps import StepResult  # noqa: E402

logger = logging.getLogger(__name__)

REPO_ROOT = Path(os.environ.get("UDPDIFF_ROOT", Path(__file__).resolve().parents[1]))


def load(profile: str | None = None, variant: str | None = None) -> tuple[Params, ProjectPaths]:
    """Params and paths of the active profile; ``variant`` applies that sweep's overrides."""
    p = load_params(REPO_ROOT / "params.yaml", profile=profile)
    if variant is not None:
        if variant not in p.sweeps:
            raise ParamsError(f"sweep variant {variant!r} is not defined in params.yaml; defined: {sorted(p.sweeps)}")
        p = p.with_overrides(p.sweeps[variant])
    return p, ProjectPaths(REPO_ROOT, p.profile, variant)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out


def tracking_uri(p: Params) -> str:
    """Relative sqlite/file URIs in params.yaml are relative to the repo, not the cwd."""
    uri = p.mlflow.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{REPO_ROOT / uri.removeprefix('sqlite:///')}"
    return uri


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def mlflow_run(stage: str, p: Params, extra_tags: dict[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """One MLflow run per stage, in the experiment ``<experiment>-<profile>``, with the profile's
    parameters flattened (``train.lr``) and tags that tie runs of one pipeline together."""
    mlflow.set_tracking_uri(tracking_uri(p))
    name = f"{p.mlflow.experiment}-{p.profile}"
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=(REPO_ROOT / p.mlflow.artifact_location / name).as_uri())
    mlflow.set_experiment(name)
    profile_params = p.active.model_dump()
    params_hash = hashlib.sha256(json.dumps(profile_params, sort_keys=True, default=str).encode()).hexdigest()[:12]
    tags = {"stage": stage, "profile": p.profile, "git_commit": _git_commit(), "params_hash": params_hash,
            **(extra_tags or {})}
    with mlflow.start_run(run_name=stage, tags=tags) as run:
        mlflow.log_params({"seed": p.seed, "profile": p.profile, **_flatten(profile_params)})
        yield run


def log_result(result: StepResult, artifact_path: str | None = None) -> None:
    if result.metrics:
        mlflow.log_metrics({k.replace("/", "."): float(v) for k, v in result.metrics.items()})
    for path in result.artifacts:
        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path or path.name)
        elif path.exists():
            mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_step_metrics(metrics: dict[str, float], step: int) -> None:
    """Per-step callback the library's loops call while an MLflow run is active."""
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_step_artifact(path: Path, artifact_dir: str) -> None:
    """Callback for files a loop produces while it runs (preview grids, checkpoints)."""
    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_dir)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_dir)
