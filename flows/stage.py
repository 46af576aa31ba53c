"""The Prefect flow each DVC stage runs (`python -m flows stage <name>`): the stage's library module
(``udpdiff.stages.<name>``) as a Prefect task inside the stage's MLflow run, its result logged and
its metrics JSON written for DVC."""

from __future__ import annotations

import importlib
import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.common import REPO_ROOT, load
from flows.curation import shard_mapper
from flows.subflows import PARENT_ENV
from flows.tracking import log_result, log_step_artifact, log_step_metrics, stage_run
from udpdiff.distributed import launched, top_level_env
from udpdiff.stages import STAGES, stage_launcher
from udpdiff.stages.common import StepResult, write_json

logger = logging.getLogger(__name__)

STREAMS_METRICS = {"autoencoder", "train"}  # these take a per-step MLflow callback


@flow(name="udpdiff-stage", flow_run_name="{stage}")
def stage_flow(stage: str, profile: str | None = None) -> dict[str, float]:
    """Run one DVC stage: ``udpdiff.stages.<stage>.run`` as a task, inside its own MLflow run
    (nested under the pipeline's parent run)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {list(STAGES)}")
    p, paths = load(profile)
    if not launched() and (launcher := stage_launcher(p, stage)) is not None:
        return launch_stage(p, stage, launcher)
    run_fn = importlib.import_module(f"udpdiff.stages.{stage}").run
    kwargs = {"log_fn": log_step_metrics} if stage in STREAMS_METRICS else {}
    if stage == "train":
        kwargs["artifact_fn"] = log_step_artifact
    if stage == "data" and (map_shards := shard_mapper(p)) is not None:
        kwargs["map_shards"] = map_shards  # curation shards on Dask workers (flows/curation.py)
    with stage_run(stage, p) as run:
        try:
            result = task(run_fn, name=stage, cache_policy=NO_CACHE)(p, paths, **kwargs)
        except Exception as err:
            # a failing step may leave evidence (the GX report of a broken contract): keep it
            log_result(StepResult(artifacts=list(getattr(err, "artifacts", []))))
            mlflow.set_tag("failure", str(err)[:5000])
            raise
        log_result(result)
        write_json(paths.metrics / f"{stage}.json", result.metrics)
        get_run_logger().info("%s done (MLflow run %s): %s", stage, run.info.run_id,
                              ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items()))
    return result.metrics


def launch_stage(p, stage: str, launcher: str) -> dict[str, float]:
    """Run ``stage`` under its launcher (``train_launcher``, ``inference_launcher``: several GPUs or
    nodes). Its rank 0 runs this same flow (a flow run and MLflow run of its own); the other ranks
    run the bare step (flows/__main__.py)."""
    cmd = [*shlex.split(launcher), "flows", "stage", stage, "--profile", p.profile]
    logger.info("launching %s: %s", stage, " ".join(cmd))
    # the launcher's own `python` must be this environment's
    env = top_level_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    # rank 0 re-enters this flow: it must not show up as a second subflow of the job
    env.pop(PARENT_ENV, None)
    code = subprocess.call(cmd, cwd=REPO_ROOT, env=env)
    if code != 0:
        raise RuntimeError(f"{stage} under {launcher!r} failed with exit code {code}; see its log above")
    _, paths = load(p.profile)
    return json.loads((paths.metrics / f"{stage}.json").read_text())
