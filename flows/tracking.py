"""All MLflow code of the flows: where runs go, how they nest, what they carry.

MLflow is the place to browse, so the run tree mirrors how the work was started:

- a **pipeline** run per execution (``make repro``, ``dvc repro``, a Prefect deployment run) with one
  child **stage** run per DVC stage;
- an **ablation** run per paper table ("Tab 5 — task conditioning") with one child **variant** run
  per row: the variant's overrides as params, its final metrics, and (nested below it) the runs of
  the stages that produced them. Filtered to the ablation run, the runs table *is* the paper's table.

How a stage run finds its parent (first that applies):

1. ``UDPDIFF_MLFLOW_PARENT_RUN_ID`` in the environment (``pipeline_run``, ``ablation_run`` and
   ``variant_run`` set it for the duration of their block and return it in ``env`` for subprocesses);
2. the nearest ancestor process that runs ``dvc`` (a plain ``dvc repro`` in a shell): every stage
   that one ``dvc`` process starts shares one parent run "dvc repro", found by the tag
   ``udpdiff.pipeline_key`` = ``<dvc pid>-<its create time>`` and created by the first stage;
3. otherwise the stage run is a top-level run.

Environment variables (a contract with the rest of the code; keep the names):
``UDPDIFF_MLFLOW_TRACKING_URI``, ``UDPDIFF_MLFLOW_ARTIFACT_ROOT``, ``UDPDIFF_MLFLOW_PARENT_RUN_ID``,
``UDPDIFF_MLFLOW_TAGS`` (a JSON object of extra tags for every run).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, Run, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags

from flows import common  # REPO_ROOT is read at call time (tests and UDPDIFF_ROOT may move it)
from udpdiff.config import Params
from udpdiff.stages.common import StepResult

logger = logging.getLogger(__name__)

ENV_TRACKING_URI = "UDPDIFF_MLFLOW_TRACKING_URI"
ENV_ARTIFACT_ROOT = "UDPDIFF_MLFLOW_ARTIFACT_ROOT"
ENV_PARENT_RUN_ID = "UDPDIFF_MLFLOW_PARENT_RUN_ID"
ENV_TAGS = "UDPDIFF_MLFLOW_TAGS"

PARENT_TAG = "mlflow.parentRunId"
PIPELINE_KEY_TAG = "udpdiff.pipeline_key"
VIEW_URL_TAG = "udpdiff.view_url"  # on parent runs: their children in the MLflow UI, relative to the UI root
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3's UI: the model-training view of an experiment
EXPERIMENT_NOTE = (
    "UDPDiff runs. **Pipeline** runs (`kind=pipeline`: `make repro`, `dvc repro`, a Prefect deployment) "
    "hold one child run per DVC stage (`kind=stage`). **Ablation** runs (`kind=ablation`, named after the "
    "paper's table) hold one child run per variant (`kind=variant`): its overrides as params and its final "
    "metrics; filter on `tags.mlflow.parentRunId = '<ablation run id>'` to see the table. Tags on every run: "
    "profile, git_commit, params_hash, and variant / table where they apply."
)
_MAX_ANCESTORS = 64
_GIT_COMMIT: dict[str, str] = {}


# ---------------------------------------------------------------------------------------------- where


def _repo_root() -> Path:
    return Path(common.REPO_ROOT)


def tracking_uri(p: Params) -> str:
    """``UDPDIFF_MLFLOW_TRACKING_URI`` if set, else params' ``mlflow.tracking_uri`` with a relative
    sqlite path (``sqlite:///mlruns.db``) or plain path made absolute against the repo root."""
    env = os.environ.get(ENV_TRACKING_URI, "").strip()
    if env:
        return env
    uri = p.mlflow.tracking_uri.strip()
    if not uri:
        raise ValueError("mlflow.tracking_uri in params.yaml is empty")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{_repo_root() / uri.removeprefix('sqlite:///')}"
    if "://" not in uri and not uri.startswith("file:"):
        return str(_absolute(uri))
    return uri


def artifact_root(p: Params) -> str:
    """Root under which each experiment gets its artifact folder: ``UDPDIFF_MLFLOW_ARTIFACT_ROOT`` if
    set, else params' ``mlflow.artifact_location``; a local path is made absolute (repo root)."""
    root = os.environ.get(ENV_ARTIFACT_ROOT, "").strip() or p.mlflow.artifact_location.strip()
    if not root:
        raise ValueError("mlflow.artifact_location in params.yaml is empty")
    if root.startswith("file:"):
        root = root.removeprefix("file://").removeprefix("file:")
    if "://" in root:
        return root.rstrip("/")
    return str(_absolute(root))


def _absolute(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else _repo_root() / p


def experiment_name(p: Params) -> str:
    return f"{p.mlflow.experiment}-{p.profile}"


def use_experiment(p: Params) -> str:
    """Point MLflow at this project's store and experiment (created on first use, in the model-training
    view, with a description); returns the experiment id."""
    uri = tracking_uri(p)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    name = experiment_name(p)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        root = artifact_root(p)
        location = f"{root}/{name}" if "://" in root else (Path(root) / name).as_uri()
        try:
            client.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException as err:  # another stage process created it first
            if "already exists" not in str(err).lower() and "unique" not in str(err).lower():
                raise
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise RuntimeError(f"MLflow experiment {name!r} could not be created in {uri}")
    if exp.lifecycle_stage == "deleted":
        raise RuntimeError(f"MLflow experiment {name!r} in {uri} is deleted: restore it (`mlflow experiments restore "
                           f"--experiment-id {exp.experiment_id}`) or delete it for good (`mlflow gc`)")
    for key, value in (("mlflow.experimentKind", EXPERIMENT_KIND), ("mlflow.note.content", EXPERIMENT_NOTE)):
        if exp.tags.get(key) != value:
            client.set_experiment_tag(exp.experiment_id, key, value)
    mlflow.set_experiment(experiment_id=exp.experiment_id)
    return exp.experiment_id


# ---------------------------------------------------------------------------------------------- tags


def _git_commit() -> str:
    root = str(_repo_root())
    if root not in _GIT_COMMIT:
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
            _GIT_COMMIT[root] = out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
        except (OSError, subprocess.SubprocessError):
            _GIT_COMMIT[root] = "unknown"
    return _GIT_COMMIT[root]


def params_hash(p: Params) -> str:
    dump = json.dumps(p.active.model_dump(), sort_keys=True, default=str)
    return hashlib.sha256(dump.encode()).hexdigest()[:12]


def _env_tags() -> dict[str, str]:
    raw = os.environ.get(ENV_TAGS, "").strip()
    if not raw:
        return {}
    try:
        tags = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{ENV_TAGS} must be a JSON object of tags, got {raw[:200]!r}: {err}") from None
    if not isinstance(tags, dict):
        raise ValueError(f"{ENV_TAGS} must be a JSON object of tags, got {type(tags).__name__}: {raw[:200]!r}")
    return {str(k): _tag_value(v) for k, v in tags.items() if v is not None}


def _tag_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def base_tags(p: Params, **extra: Any) -> dict[str, str]:
    """profile, git_commit, params_hash, the JSON object in ``UDPDIFF_MLFLOW_TAGS`` (if set), then
    ``extra`` (variant, table, stage, kind …; ``None`` values are left out). Later ones win."""
    tags = {"profile": p.profile, "git_commit": _git_commit(), "params_hash": params_hash(p)}
    tags.update(_env_tags())
    tags.update({k: _tag_value(v) for k, v in extra.items() if v is not None})
    return tags


# ---------------------------------------------------------------------------------------------- runs


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out


def _parent_from_env() -> str | None:
    return os.environ.get(ENV_PARENT_RUN_ID, "").strip() or None


def _check_parent(client: MlflowClient, parent_run_id: str) -> Run:
    try:
        run = client.get_run(parent_run_id)
    except mlflow.exceptions.MlflowException as err:
        raise ValueError(f"parent MLflow run {parent_run_id!r} ({ENV_PARENT_RUN_ID}?) not found in "
                         f"{mlflow.get_tracking_uri()}: {err}") from None
    if run.info.lifecycle_stage == "deleted":
        raise ValueError(f"parent MLflow run {parent_run_id!r} is deleted")
    return run


def _create_run(client: MlflowClient, experiment_id: str, name: str, tags: dict[str, str],
                parent_run_id: str | None) -> Run:
    tags = dict(tags)
    if parent_run_id:
        _check_parent(client, parent_run_id)
        tags[PARENT_TAG] = parent_run_id
    tags["mlflow.runName"] = name
    return client.create_run(experiment_id, tags=resolve_tags(tags), run_name=name)


def _create_parent(client: MlflowClient, experiment_id: str, name: str, tags: dict[str, str],
                   parent_run_id: str | None) -> Run:
    run = _create_run(client, experiment_id, name, tags, parent_run_id)
    client.set_tag(run.info.run_id, VIEW_URL_TAG, children_view_url(experiment_id, run.info.run_id))
    return run


def children_view_url(experiment_id: str, run_id: str) -> str:
    """URL fragment (relative to the MLflow UI's root) of the runs table filtered to a run's children,
    oldest first, in the model-training view; expand the parent row to see them."""
    from urllib.parse import quote, urlencode

    query = urlencode({"searchFilter": f"tags.`{PARENT_TAG}` = '{run_id}'", "orderByKey": "attributes.start_time",
                       "orderByAsc": "true", "workflowType": "machine_learning"}, quote_via=quote)
    return f"#/experiments/{experiment_id}/runs?{query}"


def _child_env(run_id: str, p: Params, tags: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {ENV_PARENT_RUN_ID: run_id, ENV_TRACKING_URI: tracking_uri(p), ENV_ARTIFACT_ROOT: artifact_root(p)}
    merged = {**_env_tags(), **(tags or {})}
    if merged:  # the tags of enclosing runs (table, variant) travel down to the stage runs
        env[ENV_TAGS] = json.dumps(merged, sort_keys=True)
    return env


@contextlib.contextmanager
def _environ(env: Mapping[str, str]) -> Iterator[None]:
    """Set ``env`` in this process for the block (stage runs started in-process nest too), then restore."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _end_status(exc: BaseException | None) -> str:
    """FINISHED, KILLED (Ctrl-C) or FAILED (an exception, ``sys.exit`` with an error)."""
    if exc is None or isinstance(exc, SystemExit) and exc.code in (None, 0):
        return RunStatus.to_string(RunStatus.FINISHED)
    return RunStatus.to_string(RunStatus.KILLED if isinstance(exc, KeyboardInterrupt) else RunStatus.FAILED)


@contextlib.contextmanager
def _parent_run(p: Params, name: str, tags: dict[str, str], parent_run_id: str | None,
                child_tags: Mapping[str, str] | None = None) -> Iterator[tuple[Run, dict[str, str]]]:
    """A run that other runs nest under. It is *not* made the active run (children may be in other
    processes or in this one); it ends FINISHED, or FAILED/KILLED when the block raises."""
    experiment_id = use_experiment(p)
    client = MlflowClient(tracking_uri(p))
    run = _create_parent(client, experiment_id, name, tags, parent_run_id)
    env = _child_env(run.info.run_id, p, child_tags)
    error: BaseException | None = None
    try:
        with _environ(env):
            yield run, env
    except BaseException as err:
        error = err
        raise
    finally:
        if error is None:
            client.set_terminated(run.info.run_id, _end_status(None))
        else:
            with contextlib.suppress(Exception):  # never hide the block's own error behind a store error
                client.set_terminated(run.info.run_id, _end_status(error))


@contextlib.contextmanager
def pipeline_run(p: Params, name: str, trigger: str, tags: dict[str, Any] | None = None
                 ) -> Iterator[tuple[Run, dict[str, str]]]:
    """Parent run of one pipeline execution (``trigger``: make, dvc, prefect, ablation). Yields the run
    and the env vars that nest stage runs of child processes under it (also set in this process for
    the block). Nested itself under ``UDPDIFF_MLFLOW_PARENT_RUN_ID`` when that is set."""
    if not name:
        raise ValueError("pipeline_run needs a name")
    run_tags = base_tags(p, **{**(tags or {}), "kind": "pipeline", "trigger": trigger, "name": name})
    with _parent_run(p, name, run_tags, _parent_from_env()) as out:
        yield out


@contextlib.contextmanager
def ablation_run(p: Params, table: str, title: str) -> Iterator[tuple[Run, dict[str, str]]]:
    """Parent run of one ablation, named after the paper's table ("Tab 5 — task conditioning")."""
    if not table or not title:
        raise ValueError(f"ablation_run needs a table id and a title, got table={table!r} title={title!r}")
    run_tags = base_tags(p, kind="ablation", table=table, ablation=title)
    with _parent_run(p, title, run_tags, _parent_from_env(), child_tags={"table": table}) as out:
        yield out


def _param_value(v: Any) -> str:
    return json.dumps(v, sort_keys=True) if isinstance(v, (list, dict, tuple)) else str(v)


@contextlib.contextmanager
def variant_run(p: Params, parent_run_id: str, table: str, variant: str, overrides: Mapping[str, Any]
                ) -> Iterator[tuple[Run, dict[str, str]]]:
    """Child run of an ablation for one variant: its overrides as params (dotted key → value), tags
    kind=variant, table, variant. The yielded env nests the variant's stage runs under it (and tags
    them with the table and variant)."""
    if not parent_run_id:
        raise ValueError("variant_run needs the ablation run's id (parent_run_id)")
    if not variant:
        raise ValueError("variant_run needs a variant name")
    if not isinstance(overrides, Mapping):
        raise TypeError(f"overrides of variant {variant!r} must be a mapping, got {type(overrides).__name__}")
    run_tags = base_tags(p, kind="variant", table=table, variant=variant)
    child_tags = {"table": table, "variant": variant}
    with _parent_run(p, variant, run_tags, parent_run_id, child_tags=child_tags) as (run, env):
        params = _flatten({str(k): v for k, v in overrides.items()})
        if params:
            MlflowClient(tracking_uri(p)).log_batch(
                run.info.run_id, params=[Param(k, _param_value(v)) for k, v in params.items()])
        yield run, env


# ---------------------------------------------------------------------------------------------- stages


def _dvc_ancestor() -> Any | None:
    """The nearest ancestor process that runs dvc (``dvc …``, ``python …/bin/dvc …``, ``python -m dvc``)."""
    import psutil

    try:
        proc = psutil.Process().parent()
    except psutil.Error:
        return None
    for _ in range(_MAX_ANCESTORS):
        if proc is None or proc.pid in (0, 1):
            return None
        try:
            if _runs_dvc(proc.cmdline()):
                return proc
            proc = proc.parent()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return None
        except psutil.AccessDenied:
            try:
                proc = proc.parent()
            except psutil.Error:
                return None
    return None


def _runs_dvc(cmdline: list[str]) -> bool:
    names = [Path(a).name.lower().removesuffix(".exe") for a in cmdline[:2]]
    if "dvc" in names:
        return True
    return any(a == "-m" and b == "dvc" for a, b in zip(cmdline, cmdline[1:], strict=False))


def _dvc_parent(client: MlflowClient, experiment_id: str, p: Params) -> str | None:
    """The run "dvc repro" shared by all stages of the dvc process above this one (created if missing)."""
    proc = _dvc_ancestor()
    if proc is None:
        return None
    key = f"{proc.pid}-{proc.create_time()}"
    query = f"tags.`{PIPELINE_KEY_TAG}` = '{key}'"

    def find() -> list[Run]:
        return client.search_runs([experiment_id], query, max_results=10, order_by=["attributes.start_time ASC"])

    found = find()
    if not found:
        try:
            command = " ".join(proc.cmdline())
        except Exception:
            command = "dvc"
        tags = base_tags(p, kind="pipeline", trigger="dvc", name="dvc repro", **{PIPELINE_KEY_TAG: key})
        tags["dvc_command"] = command[:5000]
        mine = _create_parent(client, experiment_id, "dvc repro", tags, None)
        found = find()
        if found and found[0].info.run_id != mine.info.run_id:  # another stage won the race: keep the first
            client.delete_run(mine.info.run_id)
        found = found or [mine]
    return found[0].info.run_id


@contextlib.contextmanager
def stage_run(stage: str, p: Params, tags: dict[str, Any] | None = None) -> Iterator[mlflow.ActiveRun]:
    """The active MLflow run of one DVC stage, with the profile's parameters flattened (``train.lr``).

    Named after the stage (``"train · single-task-depth"`` for a variant); nested under the run in
    ``UDPDIFF_MLFLOW_PARENT_RUN_ID``, else under the "dvc repro" run of the dvc process that started
    it, else top-level. If the block raises, the run and a "dvc repro" parent end FAILED."""
    if not stage:
        raise ValueError("stage_run needs a stage name")
    experiment_id = use_experiment(p)
    client = MlflowClient(tracking_uri(p))
    run_tags = base_tags(p, **{**(tags or {}), "kind": "stage", "stage": stage})
    variant = run_tags.get("variant")
    name = f"{stage} · {variant}" if variant else stage

    parent_id, dvc_parent = _parent_from_env(), None
    if parent_id is None:
        parent_id = dvc_parent = _dvc_parent(client, experiment_id, p)
        if dvc_parent is not None:
            _set_status(client, dvc_parent, "RUNNING")
    active = mlflow.active_run()
    if parent_id is None and active is not None:
        parent_id = active.info.run_id
    run = _create_run(client, experiment_id, name, run_tags, parent_id)

    error: BaseException | None = None
    try:
        with mlflow.start_run(run_id=run.info.run_id, nested=active is not None) as active_run:
            mlflow.log_params({"seed": p.seed, "profile": p.profile, **_flatten(p.active.model_dump())})
            yield active_run
    except BaseException as err:
        error = err
        raise
    finally:
        if dvc_parent is not None:
            with contextlib.suppress(Exception):
                status = client.get_run(dvc_parent).info.status
                # a failure sticks: a later stage (dvc repro --keep-going) does not turn it FINISHED
                _set_status(client, dvc_parent, "FAILED" if status == "FAILED" else _end_status(error))


def _set_status(client: MlflowClient, run_id: str, status: str) -> None:
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status, end_time=int(time.time() * 1000))


# ---------------------------------------------------------------------------------------------- logging


def log_result(result: StepResult, artifact_path: str | None = None) -> None:
    """A step's metrics and artifacts (files or folders) on the active run."""
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


def log_variant_metrics(run_id: str, metrics: Mapping[str, float]) -> None:
    """A variant's final metrics on its run, keys as evaluate writes them (``depth/subject_consistency``).
    ``None`` values (a metric not computed) are left out; anything else must be a number."""
    if not run_id:
        raise ValueError("log_variant_metrics needs a run id")
    now = int(time.time() * 1000)
    batch = []
    for key, value in metrics.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
            raise TypeError(f"metric {key!r} of run {run_id} must be a number, got {value!r}")
        batch.append(Metric(str(key), float(value), now, 0))
    if batch:
        _client().log_batch(run_id, metrics=batch)


def _client() -> MlflowClient:
    """For the functions that take a run id: the store of ``UDPDIFF_MLFLOW_TRACKING_URI`` or the current one."""
    return MlflowClient(os.environ.get(ENV_TRACKING_URI, "").strip() or mlflow.get_tracking_uri())


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._").lower()
    return slug or "ablation"


def log_paired_differences(run_id: str, table: str, references: list[str], per_video: dict[str, Any],
                           out_dir: Path) -> Path | None:
    """Beside the ablation table: each variant minus each reference in turn (``AblationParams.references``)
    clip by clip, from the variants' per-clip scores (``per_video``: variant -> its ``per_video.csv``
    frame; ``udpdiff.evaluation.paired``): ``ablation_paired.json`` (MLflow's table view, a ``reference``
    column first) and ``out_dir/<table>-paired.md`` (a section per reference; also under ``ablation/``).
    None when no reference has scores or no other variant does."""
    from udpdiff.evaluation.paired import paired_views, render_views_markdown, views_frame
    from udpdiff.io.atomic import write_text

    missing = [r for r in references if r not in per_video]
    if missing:
        logger.info("%s: no paired differences against %s (no per-clip scores; have %s)", table,
                    ", ".join(missing), ", ".join(per_video) or "none")
    views = paired_views(per_video, references) if len(per_video) >= 2 else {}
    if not views:
        return None
    md = Path(out_dir) / f"{_slug(table)}-paired.md"
    write_text(md, render_views_markdown(views))
    client = _client()
    with _tracking(client.tracking_uri):
        mlflow.log_table(views_frame(views), artifact_file="ablation_paired.json", run_id=run_id)
    client.log_artifact(run_id, str(md), artifact_path="ablation")
    return md


def log_validation_curves(run_id: str, table: str, histories: dict[str, Any], out_dir: Path) -> Path | None:
    """Beside the ablation table, the paper's Fig 8 across its variants: each variant's validation scores
    over training steps (``histories``: variant -> its ``validation_history.csv`` frame;
    ``udpdiff.evaluation.validation_curves``), as ``out_dir/<table>-validation.png`` (also under
    ``ablation/``). None when no variant has a score."""
    from udpdiff.evaluation.validation_curves import plot_validation_scores

    png = plot_validation_scores(Path(out_dir) / f"{_slug(table)}-validation.png", histories,
                                 title=f"{table}: validation scores (Fig 8), held-out real clips")
    if png is None:
        logger.info("%s: no validation scores to plot (histories of %s)", table, ", ".join(histories) or "no variant")
        return None
    _client().log_artifact(run_id, str(png), artifact_path="ablation")
    return png


def log_ablation_table(run_id: str, title: str, df: Any, out_dir: Path) -> list[Path]:
    """The ablation's table on its parent run: ``ablation_table.json`` (``mlflow.log_table``, MLflow's
    table view), and ``out_dir/<table>.md``, ``.html`` and a grouped bar chart ``.png`` (also logged
    as artifacts under ``ablation/``). Returns the files written."""
    import pandas as pd

    from udpdiff import viz
    from udpdiff.evaluation import tables

    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"log_ablation_table expects a pandas DataFrame, got {type(df).__name__}")
    if df.empty or "variant" not in df.columns:
        raise ValueError(f"ablation table {title!r} needs one row per variant and a 'variant' column; "
                         f"got columns {list(df.columns)} and {len(df)} rows")
    client = _client()
    table = client.get_run(run_id).data.tags.get("table") or title
    stem = _slug(table)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    notes = [str(n) for n in df.attrs.get("notes", [])]

    rendered = [tables.Table.from_frame("", df, footnotes=notes)]
    md = out_dir / f"{stem}.md"
    md.write_text(tables.markdown_document(title, rendered))
    html_path = out_dir / f"{stem}.html"
    html_path.write_text(tables.html_document(title, rendered))
    written = [md, html_path]

    numeric = [c for c in df.columns if c != "variant" and pd.api.types.is_numeric_dtype(df[c])
               and df[c].notna().any()]
    # scores in [0, 1] and distances (FVD, RMSE > 1) do not share an axis: one chart each
    small = [c for c in numeric if df[c].abs().max() <= 1.5]
    large = [c for c in numeric if c not in small]
    for cols, suffix in ((small, ""), (large, "-large")):
        if not cols:
            continue
        groups = {str(r["variant"]): {c: float(r[c]) for c in cols if not _nan(r[c])} for _, r in df.iterrows()}
        written.append(viz.plot_grouped_bars(out_dir / f"{stem}{suffix}.png", groups, cols, title=title))

    with _tracking(client.tracking_uri):
        mlflow.log_table(df, artifact_file="ablation_table.json", run_id=run_id)
    for path in written:
        client.log_artifact(run_id, str(path), artifact_path="ablation")
    client.set_tag(run_id, VIEW_URL_TAG, share_ablation_view(client, run_id, df.attrs.get("keys", {}).values()))
    return written


def share_ablation_view(client: MlflowClient, run_id: str, metric_order: Iterable[str] = ()) -> str:
    """Save the runs-table view of this ablation (its variant runs, their metric and override columns)
    as an MLflow *shared view* (what the UI's Share button stores: an experiment tag
    ``mlflow.sharedViewState.<key>``) and return its URL fragment, relative to the MLflow UI's root.

    The override columns are the params whose values differ between the variants (a variant run that
    holds every flattened param, as an imported GPU run does, would otherwise put ~200 equal columns
    in the view); the view is cut, last columns first and with a warning, to MLflow's tag limit."""
    from mlflow.utils.validation import MAX_EXPERIMENT_TAG_VAL_LENGTH

    run = client.get_run(run_id)
    experiment_id = run.info.experiment_id
    children = client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{run_id}'", max_results=1000)
    metrics = {k for c in children for k in c.data.metrics}
    every = {k for c in children for k in c.data.params}
    params = sorted(k for k in every if len({c.data.params.get(k) for c in children}) > 1) \
        if len(children) > 1 else sorted(every)
    first = [k for k in dict.fromkeys(metric_order) if k in metrics]
    ordered = first + sorted(metrics - set(first))
    columns = [f"metrics.`{k}`" for k in ordered] + [f"params.`{k}`" for k in params]

    def view(columns: list[str]) -> str:
        return json.dumps({
            "searchFilter": f"tags.`{PARENT_TAG}` = '{run_id}'", "orderByKey": "attributes.start_time",
            "orderByAsc": True, "selectedColumns": ["attributes.`Run Name`", *columns],
            # the UI applies widths through the column order: run name first, then the table's columns
            "columnOrder": ["attributes.`Run Name`", *columns],
            "columnWidths": {c: min(260, 7 * len(c.split(".", 1)[1]) + 16) for c in columns}})  # names unclipped

    state, kept = view(columns), len(columns)
    while len(state) > MAX_EXPERIMENT_TAG_VAL_LENGTH:
        kept -= 1
        state = view(columns[:kept])
    if kept < len(columns):
        logger.warning("ablation view of run %s: %d of %d columns fit MLflow's %d-character tag; left out: %s",
                       run_id, kept, len(columns), MAX_EXPERIMENT_TAG_VAL_LENGTH, ", ".join(columns[kept:])[:500])
    key = f"{_slug(run.data.tags.get('table') or run.info.run_name or 'ablation')}-{run_id[:8]}"
    client.set_experiment_tag(experiment_id, f"{SHARED_VIEW_PREFIX}{key}", state)
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={key}&workflowType=machine_learning"


@contextlib.contextmanager
def _tracking(uri: str) -> Iterator[None]:
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def _nan(v: Any) -> bool:
    try:
        return v is None or not math.isfinite(float(v))
    except (TypeError, ValueError):
        return True
