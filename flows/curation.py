"""Curation shards as Prefect tasks on a Dask cluster (prefect-dask): the data stage's scale-out.

``udpdiff.stages.data.curate_sources`` splits the selected clips into shards and hands them to a
``map_shards`` function; with ``data.panda70m.curation.runner.type: dask`` this module's
:func:`shard_mapper` is that function. It runs a Prefect subflow of the stage (``curate-shards``)
whose task runner is a ``DaskTaskRunner``: a ``LocalCluster`` started for the run, or the
scheduler at ``runner.address``. Each shard is one task run, retried ``runner.retries`` times
(a lost worker, an out-of-memory); a clip's own failure is a reject inside the shard's result and
never fails the task. Shards that load models ask for one Dask ``GPU`` resource when workers own
GPUs, and each worker puts its models on its own GPU. Results come back in the shards' order.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

if TYPE_CHECKING:
    from udpdiff.config import Params
    from udpdiff.data.curation_params import RunnerParams
    from udpdiff.data.shards import ShardResult

logger = logging.getLogger(__name__)


def worker_device(gpus_per_worker: int) -> str | None:
    """The device of this Dask worker's models: LocalCluster worker ``i`` (named ``i``) owns GPUs
    ``i * gpus_per_worker ...`` (mod the count); a worker with another name (started by hand, e.g.
    with ``CUDA_VISIBLE_DEVICES`` set) uses ``cuda``. ``None`` (the library's default) without GPUs."""
    if gpus_per_worker <= 0:
        return None
    import torch
    from distributed import get_worker

    count = torch.cuda.device_count()
    if count == 0:
        return None
    name = str(get_worker().name)
    return f"cuda:{int(name) * gpus_per_worker % count}" if name.isdigit() else "cuda"


#: errors a retry cannot fix: missing weights or packages, bad parameters (a lost worker, an
#: out-of-memory or a CUDA fault are worth another try)
PERMANENT_ERRORS = ("MetricModelUnavailable", "ImportError", "ModuleNotFoundError", "ValueError", "TypeError")


def worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except Exception as exc:  # the shard's exception, re-raised from its state
        return not any(cls.__name__ in PERMANENT_ERRORS for cls in type(exc).__mro__)
    return True


@task(name="curate-shard", task_run_name="shard {index}", cache_policy=NO_CACHE)
def curate_shard_task(work: Callable[..., ShardResult], index: int, shard: Sequence[Any],
                      gpus_per_worker: int) -> ShardResult:
    return work(list(shard), device=worker_device(gpus_per_worker))


@flow(name="curate-shards", flow_run_name="{name}", validate_parameters=False)  # shards are dataclasses
def curate_shards(work: Callable[..., ShardResult], shards: list[list[Any]], retries: int, gpus_per_worker: int,
                  needs_gpu: bool, name: str = "curate shards") -> list[ShardResult]:
    """Every shard as a task on the flow's (Dask) task runner; logs each as it finishes."""
    import dask

    log = get_run_logger()
    run = curate_shard_task.with_options(retries=retries, retry_delay_seconds=5, retry_condition_fn=worth_retrying)
    resources = {"GPU": 1} if needs_gpu and gpus_per_worker > 0 else None
    with dask.annotate(resources=resources) if resources else contextlib.nullcontext():
        futures = [run.submit(work, i, shard, gpus_per_worker) for i, shard in enumerate(shards)]
    clips = done = 0
    total = sum(len(s) for s in shards)
    for future in as_completed(futures):
        result = future.result()  # a shard that failed every retry stops the stage here, naming it
        done += 1
        clips += len(result.records) + len(result.rejects)
        log.info("curation: %d/%d shards, %d/%d clips (this shard: %d kept, %d dropped)",
                 done, len(shards), clips, total, len(result.records), len(result.rejects))
    return [f.result() for f in futures]


def shard_mapper(p: Params) -> Callable[[Callable[..., ShardResult], list], list] | None:
    """The data stage's ``map_shards`` for ``p``'s curation runner; ``None`` runs shards in-process."""
    cur = p.active.data.panda70m.curation
    if p.active.data.source != "panda70m" or cur is None or cur.runner.type == "local":
        return None
    runner = cur.runner
    needs_gpu = bool(p.active.data.panda70m.segmentation_annotator or p.active.data.panda70m.depth_annotator
                     or cur.recaption)

    def map_shards(work: Callable[..., ShardResult], shards: list) -> list:
        task_runner = dask_task_runner(runner)
        return curate_shards.with_options(task_runner=task_runner)(
            work, shards, runner.retries, runner.gpus_per_worker, needs_gpu,
            name=f"{len(shards)} shards on {runner.address or f'{local_workers(runner)} local Dask workers'}")

    return map_shards


def local_workers(runner: RunnerParams) -> int:
    """``runner.workers``, or by default one worker per GPU (``gpus_per_worker`` each), else half the cores."""
    if runner.workers is not None:
        return runner.workers
    if runner.gpus_per_worker > 0:
        import torch

        if torch.cuda.device_count() >= runner.gpus_per_worker:
            return torch.cuda.device_count() // runner.gpus_per_worker
    return max(1, (os.cpu_count() or 2) // 2)


def dask_task_runner(runner: RunnerParams):
    """A DaskTaskRunner on ``runner.address``, or on a LocalCluster whose workers report to this
    process's Prefect API (an ephemeral server's too, so their task runs land in the same flow run)."""
    from prefect.client.orchestration import get_client
    from prefect_dask import DaskTaskRunner

    if runner.address:
        return DaskTaskRunner(address=runner.address)
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url)
    cluster: dict[str, Any] = {"n_workers": local_workers(runner), "threads_per_worker": runner.threads_per_worker,
                               "processes": True, "dashboard_address": ":0", "silence_logs": logging.WARNING,
                               "env": {"PREFECT_API_URL": api_url}}
    if runner.gpus_per_worker > 0:
        cluster["resources"] = {"GPU": runner.gpus_per_worker}
    return DaskTaskRunner(cluster_kwargs=cluster)


__all__ = ["curate_shard_task", "curate_shards", "dask_task_runner", "shard_mapper", "worker_device"]
