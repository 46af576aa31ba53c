"""Prefect flows. One flow per stage (what each DVC stage runs) and the flow named ``udpdiff``
whose deployments (``infra/prefect/serve.py``) are ``curate``, ``train``, ``evaluate``,
``sweep`` and ``pipeline``: ``prefect deployment run udpdiff/train``.

Flows are thin: each stage calls one ``udpdiff.steps`` function inside an MLflow run, logs what
it returns, and writes the stage's metrics JSON for DVC.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.common import REPO_ROOT, load, log_result, log_step_artifact, log_step_metrics, mlflow_run
from udpdiff import steps
from udpdiff.io.atomic import write_text

logger = logging.getLogger(__name__)

Stage = Literal["data", "synthesize", "curate", "validate", "encode", "autoencoder", "latents", "train", "sample",
                "evaluate", "report"]

STEP_FUNCTIONS: dict[str, Callable[..., steps.StepResult]] = {
    "synthesize": steps.synthesize,
    "curate": steps.curate,
    "validate": steps.validate,
    "encode": steps.encode_pixelplanes,
    "autoencoder": steps.train_autoencoder,
    "latents": steps.build_latents,
    "train": steps.train_transformer,
    "sample": steps.sample,
    "evaluate": steps.evaluate,
    "report": steps.report,
}
STREAMS_METRICS = {"autoencoder", "train"}  # these take a per-step MLflow callback

JOBS: dict[str, list[str]] = {
    "curate": ["data", "validate", "encode"],  # "data": synthesize or curate, per data.source
    "train": ["autoencoder", "latents", "train"],
    "evaluate": ["sample", "evaluate", "report"],
}
JOBS["pipeline"] = JOBS["curate"] + JOBS["train"] + JOBS["evaluate"]


@flow(name="udpdiff-stage", flow_run_name="{stage}")
def stage_flow(stage: Stage, profile: str | None = None, variant: str | None = None) -> dict[str, float]:
    """Run one stage: the library step as a Prefect task, inside its own MLflow run.

    ``variant`` names a sweep entry of params.yaml: its overrides apply and its outputs go to
    the variant's own folders."""
    p, paths = load(profile, variant)
    step = stage
    if stage == "data":  # the dataset stage follows the profile's source
        step = "synthesize" if p.active.data.source == "synthetic" else "curate"
    if step == "train" and not under_launcher() and p.train_launcher.split() != ["python", "-m"]:
        return launch_training(p, variant)
    fn = STEP_FUNCTIONS[step]
    kwargs = {"log_fn": log_step_metrics} if step in STREAMS_METRICS else {}
    if step == "train":
        kwargs["artifact_fn"] = log_step_artifact
    with mlflow_run(step, p, {"variant": variant} if variant else None) as run:
        try:
            result = task(fn, name=step, cache_policy=NO_CACHE)(p, paths, **kwargs)
        except Exception as err:
            # a failing step may leave evidence (the GX report of a broken contract): keep it
            log_result(steps.StepResult(artifacts=list(getattr(err, "artifacts", []))))
            mlflow.set_tag("failure", str(err)[:5000])
            raise
        log_result(result)
        write_text(paths.metrics / f"{stage}.json", json.dumps(result.metrics, indent=2, sort_keys=True) + "\n")
        get_run_logger().info("%s done (MLflow run %s): %s", stage, run.info.run_id,
                              ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items()))
    return result.metrics


def under_launcher() -> bool:
    """True in a process started by torchrun/deepspeed (they set the rank variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_training(p, variant: str | None) -> dict[str, float]:
    """Run the train stage under ``train_launcher`` (several GPUs or nodes). Its rank 0 runs this
    same flow (a flow run and MLflow run of its own); the other ranks run the bare step."""
    cmd = [*shlex.split(p.train_launcher), "flows", "stage", "train", "--profile", p.profile]
    if variant:
        cmd += ["--variant", variant]
    logger.info("launching training: %s", " ".join(cmd))
    # the launcher's own `python` must be this environment's
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    code = subprocess.call(cmd, cwd=REPO_ROOT, env=env)
    if code != 0:
        raise RuntimeError(f"training under {p.train_launcher!r} failed with exit code {code}; see its log above")
    _, paths = load(p.profile, variant)
    return json.loads((paths.metrics / "train.json").read_text())


@flow(name="udpdiff")
def udpdiff(job: Literal["pipeline", "curate", "train", "evaluate", "sweep"] = "pipeline",
            profile: str | None = None) -> dict[str, dict[str, float]]:
    """The whole system's entry point; ``job`` picks which stages run, in order."""
    if job == "sweep":
        from flows.sweep import sweep_flow  # imports this module: keep the import here

        return sweep_flow(profile=profile)
    return {stage: stage_flow(stage, profile) for stage in JOBS[job]}
