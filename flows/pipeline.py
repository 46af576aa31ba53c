"""Prefect flows. One flow per stage (what each DVC stage runs) and the flow named ``udpdiff``
whose deployments (``infra/prefect/serve.py``) are ``curate``, ``train``, ``evaluate``,
``sweep`` and ``pipeline``: ``prefect deployment run udpdiff/train``.

Flows are thin: each stage calls one ``udpdiff.steps`` function inside an MLflow run, logs what
it returns, and writes the stage's metrics JSON for DVC.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Literal

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.common import load, log_result, log_step_metrics, mlflow_run
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
    fn = STEP_FUNCTIONS[step]
    kwargs = {"log_fn": log_step_metrics} if step in STREAMS_METRICS else {}
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


@flow(name="udpdiff")
def udpdiff(job: Literal["pipeline", "curate", "train", "evaluate", "sweep"] = "pipeline",
            profile: str | None = None) -> dict[str, dict[str, float]]:
    """The whole system's entry point; ``job`` picks which stages run, in order."""
    if job == "sweep":
        from flows.sweep import sweep_flow  # imports this module: keep the import here

        return sweep_flow(profile=profile)
    return {stage: stage_flow(stage, profile) for stage in JOBS[job]}
