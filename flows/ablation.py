"""The paper's ablations (params.yaml ``ablations``, one entry per table) as DVC experiments.

    python -m flows ablation tab5                     # one table; several: tab5 tab7; none: all
    prefect deployment run udpdiff/sweep -p ablation=tab5

Each variant is ``dvc exp run --temp -n <table>-<variant> -S <overrides>`` of this very pipeline:
DVC runs only the stages its overrides touch (a ``data.*`` override re-curates and re-encodes, a
``train.*`` one retrains from the cached latents), ``dvc exp show`` lists the variants with their
metrics, and a variant whose experiment already exists on this commit with the same params is not
run again. MLflow gets one parent run named after the table with one child run per variant (its
overrides as params, its final metrics), which holds that variant's stage runs; the parent logs the
table (``mlflow.log_table``, markdown, HTML, a bar chart) and, beside it, each variant minus each of the
table's references clip by clip (``compare_with``, else the profile as it stands; ``ablation_paired.json``,
``<table>-paired.md``), from the per-clip scores each experiment committed, and the variants' validation
scores over training steps in one chart (Fig 8, ``<table>-validation.png``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import subprocess
from typing import Any

import yaml
from prefect import flow, get_run_logger

from flows.common import REPO_ROOT, load
from flows.dvc import dvc_command, dvc_env, run_dvc
from flows.tracking import (
    ablation_run,
    log_ablation_table,
    log_paired_differences,
    log_validation_curves,
    log_variant_metrics,
    use_experiment,
    variant_run,
)
from udpdiff.config import Params, ParamsError
from udpdiff.evaluation.tables import ablation_frame

EXPERIMENT_TIMEOUT_S = 6 * 3600.0  # one variant of a large profile; tiny takes about two minutes


def hydra_value(value: Any) -> str:
    """A value in the override grammar of ``dvc exp run -S`` (Hydra's): strings quoted, lists and
    mappings spelled out, ``null`` for None."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise ParamsError(f"override value {value!r} ({type(value).__name__}) cannot be passed to dvc exp run -S")


def dvc_set_args(p: Params, overrides: dict[str, Any]) -> list[str]:
    """``-S`` arguments of one variant: ``profile`` switches profile, every other key is a dotted
    key of the (possibly switched) active profile."""
    profile = overrides.get("profile", p.profile)
    args = ["-S", f"profile={hydra_value(profile)}"] if "profile" in overrides else []
    for key, value in overrides.items():
        if key != "profile":
            args += ["-S", f"profiles.{profile}.{key}={hydra_value(value)}"]
    return args


def expected_params(raw: dict, overrides: dict[str, Any]) -> dict:
    """params.yaml as the variant's experiment must have it (what DVC's ``-S`` writes)."""
    out = copy.deepcopy(raw)
    out["profile"] = overrides.get("profile", out["profile"])
    for key, value in overrides.items():
        if key == "profile":
            continue
        node = out["profiles"][out["profile"]]
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def plan(p: Params, tables: list[str] | None, variants: list[str] | None) -> list[tuple[str, str, dict]]:
    """``(table, variant, overrides)`` to run, checked before any work: unknown names, invalid values
    and overrides that could not take effect under the active profile are one error listing all."""
    tables = list(p.ablations) if not tables else tables
    unknown = [t for t in tables if t not in p.ablations]
    if unknown:
        raise ParamsError(f"unknown ablation {unknown}; params.yaml defines {sorted(p.ablations)}")
    todo, problems = [], []
    for table in tables:
        names = list(p.ablations[table].variants)
        chosen = [v for v in names if variants is None or v in variants]
        if variants is not None and not chosen:
            problems.append(f"{table}: none of {variants} is a variant; it has {names}")
        for name in chosen:
            overrides = p.ablations[table].variants[name]
            try:
                why = p.ineffective_overrides(overrides)
            except ParamsError as e:
                why = [str(e)]
            problems += [f"ablations.{table}.variants.{name}: override {w}" for w in why]
            todo.append((table, name, overrides))
    if problems:
        raise ParamsError(f"ablation cannot run as configured (profile {p.profile!r}):\n  - " + "\n  - ".join(problems))
    return todo


def experiment_name(table: str, variant: str) -> str:
    return f"{table}-{variant}"


def existing_experiments(env: dict[str, str]) -> dict[str, dict]:
    """The experiments of the current commit: name -> {"rev", "params", "metrics"} (``dvc exp show``)."""
    proc = subprocess.run([*dvc_command(), "exp", "show", "--json"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"`dvc exp show --json` failed: {(proc.stderr or proc.stdout)[-2000:]}")
    found = {}
    for baseline in json.loads(proc.stdout or "[]"):
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                if rev.get("name") and not rev.get("error"):
                    found[rev["name"]] = {"rev": rev.get("rev"), "params": _files(data.get("params")),
                                          "metrics": _files(data.get("metrics"))}
    return found


def _files(section: dict | None) -> dict[str, Any]:
    return {path: (v or {}).get("data") for path, v in (section or {}).items()}


def variant_metrics(metrics_files: dict[str, Any], profile: str) -> dict[str, float]:
    """A variant's final scores as the table wants them (``depth/subject_consistency``)."""
    evaluation = metrics_files.get(f"outputs/{profile}/evaluation/metrics.json") or {}
    return {f"{s}/{k}": float(v) for s, m in (evaluation.get("metrics") or {}).items() for k, v in m.items()
            if isinstance(v, int | float)}


def experiment_csv(revs: dict[str, str], overrides_of: dict[str, dict[str, Any]], profile: str,
                   env: dict[str, str], relative: str) -> dict[str, Any]:
    """Each experiment's ``outputs/<profile>/<relative>`` CSV as a frame, from its commit: the per-clip
    scores (``evaluation/per_video.csv``) and the validation history (``metrics/validation_history.csv``)
    are in git (``cache: false``), so ``dvc exp run`` committed them with the experiment. A variant
    without one is left out."""
    import io

    import pandas as pd

    found = {}
    for name, rev in revs.items():
        path = f"outputs/{overrides_of.get(name, {}).get('profile', profile)}/{relative}"
        proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)
        if proc.returncode == 0 and proc.stdout.strip():
            found[name] = pd.read_csv(io.StringIO(proc.stdout))
        else:
            _run_logger().info("%s: no %s in experiment %s", name, path, rev)
    return found


def _require_git_commit(env: dict[str, str]) -> None:
    proc = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"{REPO_ROOT}: DVC experiments branch off a git commit and this repository has none; "
                           "commit first (git add -A && git commit)")
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "dvc.lock", "params.yaml", "outputs", "udpdiff",
                            "flows", "infra"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    if dirty.stdout.strip():
        logging.getLogger(__name__).warning(
            "uncommitted changes (%s): the experiments start from the last commit, so they may rerun stages the "
            "workspace already reproduced, or miss code changes; commit first (git add -A && git commit)",
            ", ".join(line[3:] for line in dirty.stdout.splitlines()[:8]))


@flow(name="udpdiff-ablation")
def ablation_flow(tables: list[str] | str | None = None, profile: str | None = None,
                  variants: list[str] | None = None, force: bool = False) -> dict[str, dict[str, dict[str, float]]]:
    """Run the given tables' variants (all tables when none), each a DVC experiment; returns
    table -> variant -> final metrics."""
    log = _run_logger()
    p, _ = load(profile)
    tables = [tables] if isinstance(tables, str) else tables
    if not tables:  # every table that can run on this profile; the others are named, not run
        tables = []
        for table in p.ablations:
            if any("profile" in v for v in p.ablations[table].variants.values()):
                log.warning("%s compares profiles (its variants switch profile): run it by name", table)
                continue
            try:
                plan(p, [table], None)
                tables.append(table)
            except ParamsError as err:
                log.warning("%s is left out on profile %r: %s", table, p.profile, err)
        if not tables:
            raise ParamsError(f"no ablation of params.yaml can run on profile {p.profile!r}")
    todo = plan(p, tables, variants)
    env = dvc_env()
    _require_git_commit(env)
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    if profile is not None:
        raw["profile"] = profile
    existing = existing_experiments(env)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for table in dict.fromkeys(t for t, _, _ in todo):
        spec = p.ablations[table]
        variants_here = [(v, o) for t, v, o in todo if t == table]
        up_to_date = {}
        for v, o in variants_here:
            e = existing.get(experiment_name(table, v))
            if not force and e and e["params"].get("params.yaml") == expected_params(raw, dict(o)):
                up_to_date[v] = e
        key = _ablation_key(p, table, variants_here, {v: e["rev"] for v, e in up_to_date.items()})
        if len(up_to_date) == len(variants_here) and _logged(p, key):
            log.info("%s: every variant is up to date (DVC experiments %s) and logged; nothing to run", spec.title,
                     ", ".join(experiment_name(table, v) for v, _ in variants_here))
            results[table] = {v: variant_metrics(e["metrics"], dict(o).get("profile", p.profile))
                              for (v, o), e in zip(variants_here, up_to_date.values(), strict=True)}
            continue
        rows, overrides_of, revs = [], {}, {}
        with ablation_run(p, table, spec.title) as (parent, parent_env):
            for name, overrides in variants_here:
                exp = experiment_name(table, name)
                with variant_run(p, parent.info.run_id, table, name, overrides) as (vrun, venv):
                    if name in up_to_date:
                        log.info("%s / %s: experiment %s is up to date; not rerun", spec.title, name, exp)
                        found = up_to_date[name]
                    else:
                        log.info("%s / %s: dvc exp run %s %s", spec.title, name, exp, json.dumps(overrides))
                        if exp in existing:  # the same name from other params or code: replace it
                            run_dvc(["exp", "remove", exp], env, log.info, timeout_s=600)
                        args = ["exp", "run", "--temp", "-n", exp, *(["--force"] if force else []),
                                *dvc_set_args(p, dict(overrides))]
                        result = run_dvc(args, dvc_env({**parent_env, **venv}), log.info,
                                         timeout_s=EXPERIMENT_TIMEOUT_S)
                        if not result.ok:
                            raise RuntimeError(f"{spec.title} / {name}: `dvc exp run` failed (exit "
                                               f"{result.returncode}):\n" + "\n".join(result.tail[-25:]))
                        found = existing_experiments(env).get(exp)
                        if found is None:
                            raise RuntimeError(f"{exp}: dvc exp run finished but `dvc exp show` does not list it")
                    metrics = variant_metrics(found["metrics"], dict(overrides).get("profile", p.profile))
                    log_variant_metrics(vrun.info.run_id, metrics)
                    revs[name] = found["rev"]
                rows.append({"variant": name, **metrics})
                overrides_of[name] = dict(overrides)
                results.setdefault(table, {})[name] = metrics
            frame = ablation_frame(rows, overrides_of)
            out_dir = REPO_ROOT / "outputs" / p.profile / "ablations"
            log_ablation_table(parent.info.run_id, spec.title, frame, out_dir)
            log_paired_differences(parent.info.run_id, table, spec.references,
                                   experiment_csv(revs, overrides_of, p.profile, env, "evaluation/per_video.csv"),
                                   out_dir)
            log_validation_curves(parent.info.run_id, table, experiment_csv(
                revs, overrides_of, p.profile, env, "metrics/validation_history.csv"), out_dir)
            # the experiments this table now stands on: an unchanged rerun finds this key and does nothing
            _mark_logged(parent.info.run_id, _ablation_key(p, table, variants_here, revs))
            log.info("%s:\n%s", spec.title, frame.drop(columns=["overrides"], errors="ignore").to_string(index=False))
    return results


def _run_logger():
    """The flow run's logger (its lines show in the Prefect UI), or this module's outside a run."""
    try:
        return get_run_logger()
    except Exception:  # MissingContextError: called as a plain function (tests, notebooks)
        return logging.getLogger(__name__)


# -- "already logged" bookkeeping: rerunning an unchanged ablation adds no MLflow runs ------------------
_KEY_TAG = "udpdiff.ablation_key"


def _ablation_key(p: Params, table: str, variants: list[tuple[str, dict]], revs: dict[str, str]) -> str:
    payload = json.dumps({"profile": p.profile, "table": table, "variants": variants, "revs": revs},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _logged(p: Params, key: str) -> bool:
    import mlflow

    experiment_id = use_experiment(p)
    runs = mlflow.search_runs([experiment_id], filter_string=f"tags.`{_KEY_TAG}` = '{key}'", max_results=1,
                              output_format="list")
    return bool(runs)


def _mark_logged(run_id: str, key: str) -> None:
    import mlflow

    mlflow.MlflowClient().set_tag(run_id, _KEY_TAG, key)
