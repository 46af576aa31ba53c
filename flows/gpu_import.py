"""A run made where the orchestration tools are absent, logged to MLflow here.

    python -m flows import-run small.tar.gz     # the tarball benchmarks/small_gpu.py packed on a GPU machine
                                                # (its volumes small-2.tar.gz, ... beside it come along)

The lent GPU machines have no MLflow, so ``benchmarks/small_gpu.py`` writes what the stage flows would
have logged to files: per workspace, ``outputs/<profile>/gpu_run/<stage>.done.json`` (final metrics,
seconds, GPU, artifact paths), ``<stage>_steps.jsonl`` (the per-step series) and the stage's small
files. This replays them into the same shape a local ``python -m flows ablation`` gives: one parent
run named after the table, a stage run per shared stage beneath it, a child run per variant holding
that variant's stage runs, the variants' final metrics and the ablation table. A stage that never
finished (the machine went back) is logged with what it reached and the tag ``finished=false``;
the table is logged only when at least two variants were evaluated. Beside it, the variants minus each
reference variant (the table's ``compare_with``, else the profile as it stands) clip by clip, from their
per-clip scores
(``ablation_paired.json``, ``ablation/<table>-paired.md``: ``udpdiff.evaluation.paired``), and the
variants' validation scores over training steps in one chart (Fig 8, ``ablation/<table>-validation.png``,
with the curve of a variant the machine took back before its evaluation).

Importing is idempotent: the parents carry the tarballs' SHA-256 (``tarball_sha256``), and a tarball
imported before is not logged twice; ``--replace`` deletes the earlier import and logs it again (after
the importer itself changed, say).

Runs of several lent sessions are one table when imported together (``import-run a/small.tar.gz
b/small.tar.gz``): a 30-minute session on one GPU trains one ``small`` variant, so Tabs 1-2 take four.
Each session's variants join the first's, provided the sessions prepared the same data, colormaps and
VAE (their ``data``, ``encode`` and ``autoencoder`` records and the profile's overrides are compared, and
a difference is refused, naming both tarballs: such variants would not be comparable). The text encoder's
pretraining (``latents``) runs again in each session; where its loss differs, that is logged.

A session whose tarball is gone joins from what ``benchmarks/results`` keeps of it: a folder of
``<variant>/`` folders, each with ``per_video.csv`` (the evaluate stage's per-clip scores; the variant's
final metrics are their means per set, as that stage computes them), ``validation_history.csv`` (Fig 8)
and ``variant.json`` (the run's record: variant, overrides, tables, profile overrides), imported beside
tarballs or alone (``import-run benchmarks/results/small-h200-tab12 new/small.tar.gz``). Such a variant
has no stage runs, and its preparation cannot be compared with the tarballs' (its parent is tagged so);
its profile overrides are compared.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tarfile
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import Metric

from flows.common import REPO_ROOT, load
from flows.tracking import (
    ablation_run,
    log_ablation_table,
    log_paired_differences,
    log_result,
    log_validation_curves,
    log_variant_metrics,
    stage_run,
    use_experiment,
    variant_run,
)
from udpdiff.config import Params, parse_overrides
from udpdiff.evaluation.tables import ablation_frame
from udpdiff.stages.common import StepResult

logger = logging.getLogger(__name__)

#: a variant workspace's record of its tables and overrides (benchmarks/small_gpu.py ``variant_info``)
VARIANT_RECORD = "outputs/*/gpu_run/variant.json"
#: a kept variant's files in a results folder (module docstring); the validation history is optional
KEPT_SCORES, KEPT_HISTORY, KEPT_RECORD = "per_video.csv", "validation_history.csv", "variant.json"
SERIES_BATCH = 1000  # MLflow's log_batch takes at most 1,000 metrics per call


def import_run(sources: Path | list[Path], profile: str | None = None, table_dir: Path | None = None,
               replace: bool = False) -> str:
    """Log the packed run ``sources`` (``small.tar.gz`` and its volumes ``small-2.tar.gz``, ...; and/or
    results folders of kept variants, module docstring) to MLflow, a parent run per ablation table in
    them; returns the first's id. The tables' files go to ``table_dir`` (default
    ``outputs/<profile>/ablations``, as the ablation flow's). A run imported before returns its first
    parent's id and logs nothing, unless ``replace`` (module docstring)."""
    sources = [Path(t) for t in (sources if isinstance(sources, list | tuple) else [sources])]
    for t in sources:
        if not t.exists():
            raise FileNotFoundError(f"{t}: no such file (the tarball benchmarks/small_gpu.py packs) or folder "
                                    f"(of <variant>/{KEPT_SCORES} and {KEPT_RECORD})")
    kept = {ws: info for folder in sources if folder.is_dir() for ws, info in _kept_variants(folder).items()}
    tarballs = [t for t in sources if t.is_file()]
    sessions = _sessions(_with_volumes(tarballs)) if tarballs else {}
    tarballs = [t for members in sessions.values() for t in members]  # the digest's order: the sessions'
    # the run's name: small.tar.gz, not small-2.tar.gz; runs of several sessions by their folders too
    packed = (next(iter(sessions)).name if len(sessions) == 1
              else ", ".join(f"{t.parent.name}/{t.name}" for t in sessions))
    names = [f"{t.parent.name}/{t.name}" for t in sessions] + [str(f) for f in sources if f.is_dir()]
    tarball = packed if len(names) == 1 and sessions else ", ".join(names)
    digest = _sha256(tarballs, [f for ws in kept for f in ws.iterdir() if f.is_file()])
    with tempfile.TemporaryDirectory() as tmp:
        root = _merged(sessions, Path(tmp)) if sessions else Path(tmp) / "run"
        variants = sorted(d for d in (root / "variants").glob("*") if d.is_dir())
        infos = {ws: json.loads(_only(ws.glob(VARIANT_RECORD), tarball).read_text())
                 for ws in variants}
        if sessions and not infos:
            raise ValueError(f"{packed}: no variants/<name>/ workspace inside; is this a small_gpu.py tarball?")
        for ws, info in kept.items():
            twin = next((w for w, i in infos.items() if i["variant"] == info["variant"]), None)
            if twin is not None:
                raise ValueError(f"variant {info['variant']} is in both {ws} and {_source(twin, root, packed)}: "
                                 "import them apart, or leave one of them out")
            infos[ws] = info
        infos = dict(sorted(infos.items(), key=lambda item: item[1]["variant"]))  # the table's row order
        profile_overrides = {_source(ws, root, packed): i.get("profile_overrides") for ws, i in infos.items()}
        if len({json.dumps(o) for o in profile_overrides.values()}) > 1:
            raise ValueError("the variants ran the profile with other overrides (" + "; ".join(
                f"{where}: {o}" for where, o in profile_overrides.items()) + "): they are not comparable; "
                "import them apart")
        base = _params(profile, next(iter(infos.values()))["profile_overrides"])
        earlier = _earlier_imports(base, digest)
        if earlier and not replace:
            logger.info("%s was imported before as MLflow run %s: nothing logged (--replace imports it again)",
                        tarball, earlier[0])
            return earlier[0]
        for run_id in earlier:
            _delete_with_children(run_id)
            logger.info("deleted the earlier import of %s, MLflow run %s", tarball, run_id)
        # a workspace can serve several tables (the full method is in Tabs 1-2 and in ours): a parent each
        tables = dict.fromkeys(t for info in infos.values() for t in _tables(info))
        run_ids = [_import_table(root, tarball, digest, base, table,
                                 {ws: i for ws, i in infos.items() if table in _tables(i)}, table_dir,
                                 kept=set(kept))
                   for table in tables]
        return run_ids[0]


def _kept_variants(folder: Path) -> dict[Path, dict]:
    """A results folder's kept variants (module docstring): ``<variant>/`` -> its ``variant.json``."""
    found = {}
    for ws in sorted(d for d in folder.iterdir() if d.is_dir()):
        if not (ws / KEPT_SCORES).exists():
            continue
        if not (ws / KEPT_RECORD).exists():
            raise ValueError(f"{ws}: {KEPT_SCORES} without {KEPT_RECORD} (the GPU run's record of the variant: "
                             "its name, overrides, tables and profile overrides)")
        info = json.loads((ws / KEPT_RECORD).read_text())
        missing = [k for k in ("variant", "overrides", "tables", "profile_overrides") if k not in info]
        if missing or info["variant"] != ws.name:
            raise ValueError(f"{ws / KEPT_RECORD}: " + (f"lacks {', '.join(missing)}" if missing else
                             f"names variant {info['variant']!r}, not its folder's {ws.name!r}"))
        found[ws] = info
    if not found:
        raise ValueError(f"{folder}: no <variant>/{KEPT_SCORES} inside; is this a folder of kept variants "
                         "(benchmarks/results/small-h200-tab12/)?")
    return found


def _source(workspace: Path, root: Path, packed: str) -> str:
    """Where a variant came from, for messages: its kept folder, or the tarball(s)."""
    return packed if workspace.is_relative_to(root) else str(workspace)


def _with_volumes(tarballs: list[Path]) -> list[Path]:
    """``tarballs`` and the volumes beside them (``small-2.tar.gz``, ... next to ``small.tar.gz``) not
    named: a run's big files (its predictions) travel in those, and an import without them is short."""
    named, found = {t.resolve() for t in tarballs}, []
    for t in tarballs:
        stem, dot, ext = t.name.partition(".")  # as benchmarks/small_gpu.py's volume_path names them
        volume = re.compile(rf"{re.escape(stem)}-\d+{re.escape(dot + ext)}")
        for v in sorted(t.parent.iterdir()):
            if volume.fullmatch(v.name) and v.resolve() not in named:
                named.add(v.resolve())
                found.append(v)
    if found:
        logger.info("importing the volumes beside it as well: %s", ", ".join(v.name for v in found))
    return tarballs + found


def _sessions(tarballs: list[Path]) -> dict[Path, list[Path]]:
    """The tarballs grouped by the run that packed them: ``small.tar.gz`` with its volumes
    ``small-2.tar.gz``, ... in one folder is one session; the first of each group names it."""
    groups: dict[tuple[Path, str], list[Path]] = {}
    for t in tarballs:
        stem, dot, ext = t.name.partition(".")
        groups.setdefault((t.resolve().parent, re.sub(r"-\d+$", "", stem) + dot + ext), []).append(t)
    # in folder order, so that the same sessions named in another order are the same import
    return {min(members, key=lambda t: len(t.name)): members for _, members in sorted(groups.items())}


#: the shared stages whose records must agree for two sessions' variants to share a table
SHARED_RECORDS = ("data.done.json", "encode.done.json", "autoencoder.done.json", "autoencoder.inputs.json")


def _merged(sessions: dict[Path, list[Path]], tmp: Path) -> Path:
    """Extract the sessions into one run folder under ``tmp``: the first whole, the others' variant
    workspaces beside its own, their logs prefixed ``session-<n>-`` (module docstring)."""
    root = tmp / "run"
    for n, (name, members) in enumerate(sessions.items(), start=1):
        target = root if n == 1 else tmp / f"session-{n}"
        for t in members:
            with tarfile.open(t) as tar:
                tar.extractall(target, filter="data")
        if n == 1:
            first = name
            continue
        _check_same_preparation(root, first, target, name)
        for workspace in sorted((target / "variants").glob("*")):
            if (root / "variants" / workspace.name).exists():
                raise ValueError(f"variant {workspace.name} is in both {first} and {name}: "
                                 "import them apart, or leave one of them out")
            (root / "variants").mkdir(parents=True, exist_ok=True)
            workspace.rename(root / "variants" / workspace.name)
        for log in sorted((target / "logs").glob("*.log")):
            (root / "logs").mkdir(exist_ok=True)
            log.rename(root / "logs" / f"session-{n}-{log.name}")
    return root


def _check_same_preparation(root: Path, first: Path, other: Path, name: Path) -> None:
    def overrides(run: Path) -> list | None:
        found = sorted(run.glob(f"variants/*/{VARIANT_RECORD}"))
        return json.loads(found[0].read_text()).get("profile_overrides") if found else None

    if overrides(root) != overrides(other):
        raise ValueError(f"{first} and {name} ran the profile with other overrides ({overrides(root)} there, "
                         f"{overrides(other)} here): their variants are not comparable; import them apart")
    for record in sorted(other.glob("outputs/*/gpu_run/*.json")):
        mine = root / record.relative_to(other)
        if not mine.exists():
            continue
        a, b = json.loads(mine.read_text()), json.loads(record.read_text())
        if record.name in SHARED_RECORDS:
            a, b = a.get("metrics", a), b.get("metrics", b)  # the inputs record has no metrics: all of it
            if a != b:
                key = next((k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)), "?")
                raise ValueError(f"{first} and {name} prepared different runs: {record.name}'s {key} is "
                                 f"{a.get(key)} there and {b.get(key)} here; their variants are not comparable, "
                                 "import them apart")
        elif record.name == "latents.done.json" and a.get("metrics") != b.get("metrics"):
            logger.info("the text encoder pretrained again in %s: latents %s there, %s here", name,
                        a.get("metrics"), b.get("metrics"))


def _sha256(tarballs: list[Path], kept_files: list[Path] = ()) -> str:
    """One digest of the run's tarballs (its volumes in name order) and kept variants' files (by variant
    and name, in any order given): what identifies an import."""
    h = hashlib.sha256()
    for t in sorted(tarballs, key=lambda t: t.name):
        with t.open("rb") as f:
            for block in iter(lambda: f.read(2**20), b""):
                h.update(block)
    for f in sorted(kept_files, key=lambda f: (f.parent.name, f.name)):
        h.update(f"{f.parent.name}/{f.name}".encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _earlier_imports(p: Params, digest: str) -> list[str]:
    """The parent runs (one per table, oldest first) of an earlier import of the same tarballs."""
    experiment = use_experiment(p)
    runs = mlflow.MlflowClient().search_runs([experiment], f"tags.tarball_sha256 = '{digest}'",
                                            order_by=["attributes.start_time ASC"])
    return [r.info.run_id for r in runs]


def _delete_with_children(run_id: str) -> None:
    client = mlflow.MlflowClient()
    experiment = client.get_run(run_id).info.experiment_id
    for child in client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{run_id}'"):
        _delete_with_children(child.info.run_id)
    client.delete_run(run_id)


def _tables(info: dict) -> list[str]:
    """The tables a variant workspace serves (tarballs before 2026-11-30 name one: "table")."""
    return info.get("tables") or [info["table"]]


def _import_table(root: Path, tarball: str, digest: str, base: Params, table: str, infos: dict[Path, dict],
                  table_dir: Path | None, kept: set[Path] = frozenset()) -> str:
    spec = base.ablations[table]
    packed, kept_here = [ws for ws in infos if ws not in kept], [ws for ws in infos if ws in kept]
    machine = " and ".join(([_machine(root)] if packed else []) + (["kept results"] if kept_here else []))
    rows, overrides_of, per_video, histories = [], {}, {}, {}
    with ablation_run(base, table, f"{spec.title} · {machine}") as (parent, _):
        _set_tags(parent.info.run_id, {"source": "gpu-run", "machine": machine, "tarball": tarball,
                                       "tarball_sha256": digest})
        if kept_here:
            _set_tags(parent.info.run_id, {"kept_variants": ", ".join(infos[ws]["variant"] for ws in kept_here),
                                           "kept_variants_preparation": "not compared (no stage records kept)"})
        _log_workspace(base, root, None, tag_variant=False)
        for workspace, info in infos.items():
            p = base.with_overrides(info["overrides"])
            with variant_run(p, parent.info.run_id, table, info["variant"], info["overrides"]) as (vrun, _):
                if workspace in kept:
                    final, scores, history = _log_kept_variant(vrun.info.run_id, workspace)
                else:
                    final = _log_workspace(p, workspace, info["variant"])
                    scores = workspace / "outputs" / p.profile / "evaluation" / "per_video.csv"
                    history = workspace / "outputs" / p.profile / "metrics" / "validation_history.csv"
                # Fig 8 takes a variant's curve even when the machine went back before its evaluation
                if history.exists():
                    histories[info["variant"]] = history
                if final:
                    log_variant_metrics(vrun.info.run_id, final)
                    rows.append({"variant": info["variant"], **final})
                    overrides_of[info["variant"]] = info["overrides"]
                    if scores.exists():
                        per_video[info["variant"]] = scores
        for log_file in sorted((root / "logs").glob("*.log")) if (root / "logs").exists() else []:
            mlflow.MlflowClient().log_artifact(parent.info.run_id, str(log_file), "logs")
        out_dir = table_dir or REPO_ROOT / "outputs" / base.profile / "ablations"
        log_validation_curves(parent.info.run_id, table, {name: pd.read_csv(path) for name, path in histories.items()},
                              out_dir)
        if len(rows) >= 2:
            frame = ablation_frame(rows, overrides_of)
            log_ablation_table(parent.info.run_id, spec.title, frame, out_dir)
            log_paired_differences(parent.info.run_id, table, spec.references,
                                   {name: pd.read_csv(path) for name, path in per_video.items()}, out_dir)
        else:
            mlflow.MlflowClient().set_tag(parent.info.run_id, "incomplete",
                                          f"{len(rows)} of {len(infos)} variants evaluated: no table")
    logger.info("imported %s (%s) as MLflow run %s (%d variants, %d evaluated)", tarball, table, parent.info.run_id,
                len(infos), len(rows))
    return parent.info.run_id


def _params(profile: str | None, overrides: list[str]) -> Params:
    p, _ = load(profile or "small")
    return p.with_overrides(parse_overrides(overrides))


def _only(found, tarball: str) -> Path:
    found = list(found)
    if len(found) != 1:
        raise ValueError(f"{tarball}: expected one outputs/<profile>/gpu_run/variant.json per workspace, found "
                         f"{len(found)}")
    return found[0]


def _machine(root: Path) -> str:
    for record in sorted(root.rglob("gpu_run/*.done.json")):
        gpu = json.loads(record.read_text()).get("gpu")
        if gpu:
            return gpu
    return "unknown machine"


#: what a GPU run packs beside a stage's own artifacts (under outputs/<profile>/), logged with that stage's
#: run: the validation previews (Fig 8's pictures) and the real clips' predictions with their diagnosis
PACKED_BESIDE = {"train": ("train_samples/*.gif",),
                 "evaluate": ("metrics/dense_predictions.npz", "metrics/depth_errors.*",
                              "metrics/tolerance_sweep.json")}


def _log_workspace(p: Params, workspace: Path, variant: str | None, tag_variant: bool = True) -> dict[str, float]:
    """A stage run per stage this workspace ran (its own, not the shared ones it links); returns the
    evaluate stage's final metrics ({} when it never finished)."""
    outputs = workspace / "outputs" / p.profile
    gpu_run = outputs / "gpu_run"
    stages = dict.fromkeys(f.name.split(".")[0] for f in sorted(gpu_run.glob("*.done.json")))
    stages.update(dict.fromkeys(f.name.removesuffix("_steps.jsonl") for f in sorted(gpu_run.glob("*_steps.jsonl"))))
    final: dict[str, float] = {}
    for stage in stages:
        done = gpu_run / f"{stage}.done.json"
        record: dict[str, Any] = json.loads(done.read_text()) if done.exists() else {}
        tags = {"variant": variant} if variant and tag_variant else {}
        with stage_run(stage, p, tags={**tags, "imported": "gpu-run"}) as run:
            client = mlflow.MlflowClient()
            _log_series(client, run.info.run_id, gpu_run / f"{stage}_steps.jsonl")
            artifacts = [workspace / a for a in record.get("artifacts", [])]
            artifacts += [f for pattern in PACKED_BESIDE.get(stage, ()) for f in sorted(outputs.glob(pattern))]
            log_result(StepResult(metrics=record.get("metrics", {}), artifacts=[a for a in artifacts if a.exists()]))
            _set_tags(run.info.run_id, {"finished": str(bool(record)).lower(),
                                        **({"seconds": f"{record['seconds']:.1f}", "gpu": record["gpu"]}
                                           if record else {})})
            if record:
                client.log_metric(run.info.run_id, "stage_seconds", float(record["seconds"]))
        if stage == "evaluate" and record:
            final = {k: float(v) for k, v in record["metrics"].items()}
    return final


def _log_kept_variant(run_id: str, folder: Path) -> tuple[dict[str, float], Path, Path]:
    """A kept variant (module docstring) on its run: its files, Fig 8's series as metric histories, and
    its final metrics, the per-set means of its per-clip scores (NaN skipped, as the evaluate stage takes
    them, with ``<set>/num_videos``; a score no clip of a set has is left out). Returns those metrics and
    the paths of its scores and validation history."""
    scores, history = folder / KEPT_SCORES, folder / KEPT_HISTORY
    frame = pd.read_csv(scores)
    if not {"set", "clip_id"} <= set(frame.columns):
        raise ValueError(f"{scores}: no set and clip_id columns; is this an evaluate stage's per_video.csv?")
    final: dict[str, float] = {}
    for name, clips in frame.groupby("set", sort=False):
        means = clips.drop(columns=["set", "clip_id"]).mean(numeric_only=True, skipna=True).dropna()
        final.update({f"{name}/{k}": float(v) for k, v in means.items()})
        final[f"{name}/num_videos"] = float(len(clips))
    client = mlflow.MlflowClient()
    for f in (scores, history, folder / KEPT_RECORD):
        if f.exists():
            client.log_artifact(run_id, str(f), "kept")
    if history.exists():  # a CSV row's empty cells are scores not taken at that step
        _log_steps(client, run_id, ({k: v for k, v in row.items() if pd.notna(v)}
                                    for row in pd.read_csv(history).to_dict("records")))
    _set_tags(run_id, {"imported": "kept-results", "kept_folder": str(folder)})
    return final, scores, history


def _set_tags(run_id: str, tags: dict[str, str]) -> None:
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def _log_series(client: mlflow.MlflowClient, run_id: str, path: Path) -> None:
    """The per-step series of a stage (one JSON object per logged step) as MLflow metric histories."""
    if path.exists():
        _log_steps(client, run_id, map(json.loads, path.read_text().splitlines()))


def _log_steps(client: mlflow.MlflowClient, run_id: str, rows: Iterable[dict]) -> None:
    """Rows of ``{"step": n, name: value, ...}`` as MLflow metric histories (the numbers in them)."""
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, int(row["step"]))
               for row in rows for k, v in row.items() if k != "step" and isinstance(v, int | float)]
    for i in range(0, len(metrics), SERIES_BATCH):
        client.log_batch(run_id, metrics=metrics[i:i + SERIES_BATCH])
