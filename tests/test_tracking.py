"""flows.tracking against a real MLflow store (sqlite in tmp_path): how runs nest and what they carry."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from flows import common, tracking
from udpdiff.config import Params, load_params

REPO = Path(__file__).resolve().parents[1]
ENV_VARS = ("UDPDIFF_MLFLOW_TRACKING_URI", "UDPDIFF_MLFLOW_ARTIFACT_ROOT", "UDPDIFF_MLFLOW_PARENT_RUN_ID",
            "UDPDIFF_MLFLOW_TAGS", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")


def _params() -> Params:
    return load_params(REPO / "params.yaml", profile="tiny")


@pytest.fixture
def store(tmp_path, monkeypatch) -> MlflowClient:
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("UDPDIFF_MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("UDPDIFF_MLFLOW_ARTIFACT_ROOT", str(tmp_path / "mlartifacts"))
    yield MlflowClient(uri)
    while mlflow.active_run() is not None:  # a failing test must not leak a run into the next one
        mlflow.end_run()


def _runs(client: MlflowClient, query: str = "") -> list:
    exp = client.get_experiment_by_name("udpdiff-tiny")
    return client.search_runs([exp.experiment_id], query, max_results=1000)


def test_uris_are_absolute_against_the_repo_and_env_wins(tmp_path, monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(common, "REPO_ROOT", tmp_path)
    p = _params()
    assert tracking.tracking_uri(p) == f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert tracking.artifact_root(p) == str(tmp_path / "mlartifacts")
    monkeypatch.setenv("UDPDIFF_MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    monkeypatch.setenv("UDPDIFF_MLFLOW_ARTIFACT_ROOT", "/elsewhere/artifacts")
    assert tracking.tracking_uri(p) == "sqlite:////elsewhere/x.db"
    assert tracking.artifact_root(p) == "/elsewhere/artifacts"


def test_experiment_opens_in_the_model_training_view(store, tmp_path):
    p = _params()
    exp_id = tracking.use_experiment(p)
    assert tracking.use_experiment(p) == exp_id  # get-or-create
    exp = store.get_experiment(exp_id)
    assert exp.name == "udpdiff-tiny"
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "ablation" in exp.tags["mlflow.note.content"].lower()
    assert exp.artifact_location == (tmp_path / "mlartifacts" / "udpdiff-tiny").as_uri()


def test_base_tags(store, monkeypatch):
    p = _params()
    monkeypatch.setenv("UDPDIFF_MLFLOW_TAGS", json.dumps({"deployment": "nightly", "variant": "from-env"}))
    tags = tracking.base_tags(p, variant="explicit", stage=None, kind="stage")
    assert tags["profile"] == "tiny" and tags["kind"] == "stage" and "stage" not in tags
    assert tags["deployment"] == "nightly" and tags["variant"] == "explicit"  # explicit beats the env
    assert len(tags["params_hash"]) == 12 and int(tags["params_hash"], 16) >= 0
    assert tags["git_commit"]
    monkeypatch.setenv("UDPDIFF_MLFLOW_TAGS", "not json")
    with pytest.raises(ValueError, match="UDPDIFF_MLFLOW_TAGS"):
        tracking.base_tags(p)


def test_stage_runs_nest_under_the_pipeline_run(store):
    p = _params()
    with tracking.pipeline_run(p, "make repro", "make") as (parent, env):
        assert env["UDPDIFF_MLFLOW_PARENT_RUN_ID"] == parent.info.run_id
        assert env["UDPDIFF_MLFLOW_TRACKING_URI"].startswith("sqlite:////")
        assert os.environ["UDPDIFF_MLFLOW_PARENT_RUN_ID"] == parent.info.run_id  # in-process stages nest too
        for stage in ("data", "train"):
            with tracking.stage_run(stage, p) as run:
                mlflow.log_metric("loss", 0.5)
                assert mlflow.active_run().info.run_id == run.info.run_id
    assert "UDPDIFF_MLFLOW_PARENT_RUN_ID" not in os.environ
    assert mlflow.active_run() is None
    parent = store.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "make repro"
    assert parent.data.tags["kind"] == "pipeline" and parent.data.tags["trigger"] == "make"
    view = parent.data.tags["udpdiff.view_url"]  # the runs table filtered to its stages, for the UI
    assert view.startswith(f"#/experiments/{parent.info.experiment_id}/runs?") and parent.info.run_id in view
    children = _runs(store, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["data", "train"]
    for c in children:
        assert c.info.status == "FINISHED"
        assert c.data.tags["kind"] == "stage" and c.data.tags["profile"] == "tiny"
        assert c.data.params["profile"] == "tiny" and "train.lr" in c.data.params
        assert c.data.metrics == {"loss": 0.5}


def test_env_parent_from_another_process(store, monkeypatch):
    """What a child process sees: only the env the parent handed over."""
    p = _params()
    with tracking.pipeline_run(p, "prefect run", "prefect") as (parent, env):
        pass
    monkeypatch.setenv("UDPDIFF_MLFLOW_PARENT_RUN_ID", parent.info.run_id)
    with tracking.stage_run("sample", p, {"variant": "text-prompt"}) as run:
        pass
    child = store.get_run(run.info.run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.info.run_name == "sample · text-prompt" and child.data.tags["variant"] == "text-prompt"
    monkeypatch.setenv("UDPDIFF_MLFLOW_PARENT_RUN_ID", "0" * 32)
    with pytest.raises(ValueError, match="parent MLflow run"), tracking.stage_run("sample", p):
        pass


def test_a_failing_stage_fails_its_pipeline(store):
    p = _params()
    with pytest.raises(RuntimeError, match="boom"), tracking.pipeline_run(p, "make repro", "make") as (parent, _):
        with tracking.stage_run("train", p) as run:
            raise RuntimeError("boom")
    assert store.get_run(run.info.run_id).info.status == "FAILED"
    assert store.get_run(parent.info.run_id).info.status == "FAILED"
    assert mlflow.active_run() is None


def test_without_dvc_or_parent_a_stage_run_is_top_level(store, monkeypatch):
    monkeypatch.setattr(tracking, "_dvc_ancestor", lambda: None)
    with tracking.stage_run("report", _params()) as run:
        pass
    assert "mlflow.parentRunId" not in store.get_run(run.info.run_id).data.tags


@pytest.mark.parametrize(("cmdline", "expected"), [
    (["/usr/bin/dvc", "repro"], True),
    (["/work/.venv/bin/python3.11", "/work/.venv/bin/dvc", "repro"], True),
    (["python", "-m", "dvc", "exp", "run"], True),
    (["/bin/sh", "/tmp/x/dvc"], True),
    (["/bin/sh", "-c", "python -m flows stage data"], False),
    (["python", "-m", "flows", "repro"], False),
    (["/usr/bin/dvcx"], False),
    ([], False),
])
def test_recognises_dvc_processes(cmdline, expected):
    assert tracking._runs_dvc(cmdline) is expected


STAGE_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import mlflow
from flows import tracking
from udpdiff.config import load_params

stage, fail = sys.argv[1], len(sys.argv) > 2
with tracking.stage_run(stage, load_params({params!r}, profile="tiny")) as run:
    mlflow.log_metric("done", 1.0)
    if fail:
        raise SystemExit("stage " + stage + " failed")
"""


def _fake_dvc(tmp_path: Path, stages: list[str], fail_last: bool = False) -> Path:
    """A program named ``dvc`` that, as ``dvc repro`` does, runs each stage's command in a child process."""
    script = tmp_path / "stage.py"
    script.write_text(STAGE_SCRIPT.format(repo=str(REPO), params=str(REPO / "params.yaml")))
    lines = ["#!/bin/sh", "set -e"]
    for i, stage in enumerate(stages):
        extra = " fail" if fail_last and i == len(stages) - 1 else ""
        lines.append(f'"{sys.executable}" "{script}" {stage}{extra}')
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    dvc = bindir / "dvc"
    dvc.write_text("\n".join(lines) + "\n")
    dvc.chmod(dvc.stat().st_mode | stat.S_IXUSR)
    return dvc


def _run_fake_dvc(dvc: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "UDPDIFF_MLFLOW_PARENT_RUN_ID"}
    env["PATH"] = f"{dvc.parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(["dvc", "repro"], env=env, capture_output=True, text=True, timeout=300)


def test_stages_of_one_dvc_process_share_one_parent(store, tmp_path):
    dvc = _fake_dvc(tmp_path, ["data", "validate"])
    for _ in range(2):  # two `dvc repro`: two parents
        proc = _run_fake_dvc(dvc)
        assert proc.returncode == 0, proc.stderr[-3000:]
    parents = _runs(store, "tags.kind = 'pipeline'")
    assert len(parents) == 2
    keys = {r.data.tags["udpdiff.pipeline_key"] for r in parents}
    assert len(keys) == 2
    for parent in parents:
        assert parent.info.run_name == "dvc repro" and parent.data.tags["trigger"] == "dvc"
        assert parent.info.status == "FINISHED" and parent.info.end_time >= parent.info.start_time
        children = _runs(store, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert sorted(c.info.run_name for c in children) == ["data", "validate"]
        last_child_end = max(c.info.end_time for c in children)
        assert parent.info.end_time >= last_child_end - 1000  # the parent's end moves with each stage


def test_a_failing_stage_under_dvc_fails_the_dvc_parent(store, tmp_path):
    proc = _run_fake_dvc(_fake_dvc(tmp_path, ["data", "train"], fail_last=True))
    assert proc.returncode != 0
    (parent,) = _runs(store, "tags.kind = 'pipeline'")
    assert parent.info.status == "FAILED"
    children = {c.info.run_name: c.info.status for c in _runs(store, "tags.kind = 'stage'")}
    assert children == {"data": "FINISHED", "train": "FAILED"}


def test_ablation_parent_variant_children_and_table(store, tmp_path):
    p = _params()
    overrides = {"text-prompt": {"train.task_conditioning": "text"},
                 "task-embedding": {"train.task_conditioning": "embedding", "train.tasks": ["depth", "segmentation"]}}
    rows = []
    with tracking.ablation_run(p, "tab5", "Tab 5 — task conditioning") as (ablation, env):
        assert env["UDPDIFF_MLFLOW_PARENT_RUN_ID"] == ablation.info.run_id
        for i, (variant, ov) in enumerate(overrides.items()):
            with tracking.variant_run(p, ablation.info.run_id, "tab5", variant, ov) as (run, venv):
                assert venv["UDPDIFF_MLFLOW_PARENT_RUN_ID"] == run.info.run_id
                assert json.loads(venv["UDPDIFF_MLFLOW_TAGS"]) == {"table": "tab5", "variant": variant}
                with tracking.pipeline_run(p, "sweep variant", "ablation") as (pipe, _):
                    with tracking.stage_run("train", p):
                        pass
                metrics = {"depth/subject_consistency": 0.9 + i / 100, "depth/motion_smoothness_flow": 0.95,
                           "segmentation/gt_miou": None}
                tracking.log_variant_metrics(run.info.run_id, metrics)
                rows.append({"variant": variant, **metrics})
        df = pd.DataFrame([{"variant": r["variant"], "depth SC": r["depth/subject_consistency"]} for r in rows])
        files = tracking.log_ablation_table(ablation.info.run_id, "Tab 5 — task conditioning", df, tmp_path / "out")
    assert mlflow.active_run() is None

    parent = store.get_run(ablation.info.run_id)
    assert parent.info.run_name == "Tab 5 — task conditioning" and parent.info.status == "FINISHED"
    assert parent.data.tags["kind"] == "ablation" and parent.data.tags["table"] == "tab5"
    assert parent.data.metrics == {}  # metrics belong on the variants
    variants = {r.info.run_name: r for r in _runs(store, f"tags.mlflow.parentRunId = '{ablation.info.run_id}'")}
    assert set(variants) == set(overrides)
    emb = variants["task-embedding"]
    assert emb.data.params == {"train.task_conditioning": "embedding", "train.tasks": '["depth", "segmentation"]'}
    assert emb.data.metrics == {"depth/subject_consistency": 0.91, "depth/motion_smoothness_flow": 0.95}
    assert emb.data.tags["kind"] == "variant" and emb.data.tags["variant"] == "task-embedding"
    assert emb.data.tags["table"] == "tab5" and emb.data.tags["git_commit"]
    # the variant's pipeline and its stages nest below the variant, tagged with table and variant
    (pipe_run,) = _runs(store, f"tags.mlflow.parentRunId = '{emb.info.run_id}'")
    (stage,) = _runs(store, f"tags.mlflow.parentRunId = '{pipe_run.info.run_id}'")
    assert stage.info.run_name == "train · task-embedding" and stage.data.tags["table"] == "tab5"

    assert [f.name for f in files] == ["tab5.md", "tab5.html", "tab5.png"]
    assert all(f.stat().st_size > 0 for f in files)
    assert "| text-prompt" in files[0].read_text()
    artifacts = {a.path for a in store.list_artifacts(ablation.info.run_id)}
    assert {"ablation_table.json", "ablation"} <= artifacts
    assert {a.path for a in store.list_artifacts(ablation.info.run_id, "ablation")} == {
        "ablation/tab5.md", "ablation/tab5.html", "ablation/tab5.png"}
    logged = store.download_artifacts(ablation.info.run_id, "ablation_table.json", str(tmp_path))
    table = json.loads(Path(logged).read_text())
    assert table["columns"] == ["variant", "depth SC"] and len(table["data"]) == 2
    # a shared runs-table view of the ablation (its variants, their metric columns), linked from the run
    view = parent.data.tags["udpdiff.view_url"]
    key = view.split("viewStateShareKey=")[1].split("&")[0]
    state = json.loads(store.get_experiment(parent.info.experiment_id).tags[f"mlflow.sharedViewState.{key}"])
    assert ablation.info.run_id in state["searchFilter"]
    assert "metrics.`depth/subject_consistency`" in state["selectedColumns"]


def _view_key(fragment: str) -> str:
    return fragment.split("viewStateShareKey=")[1].split("&")[0]


def test_ablation_view_shows_the_params_that_differ_and_fits_mlflow_s_tag_limit(store):
    """Variant runs holding every flattened param (an imported GPU run's) put only the params that
    differ between them in the shared view, and a view with more columns than MLflow's 20,000-character
    experiment tag holds is cut to fit instead of failing the ablation's logging."""
    from mlflow.entities import Metric, Param

    exp = store.create_experiment("views")
    parent = store.create_run(exp).info.run_id
    for i, patch in enumerate((1, 2)):
        child = store.create_run(exp, tags={tracking.PARENT_TAG: parent}).info.run_id
        params = [Param(f"profile.section_{k}.setting", "same") for k in range(300)]
        store.log_batch(child, params=[*params, Param("transformer.config.patch_size", str(patch))],
                        metrics=[Metric("segmentation/gt_miou", 0.5 + i, 0, 0)])
    fragment = tracking.share_ablation_view(store, parent)
    state = json.loads(store.get_experiment(exp).tags[tracking.SHARED_VIEW_PREFIX + _view_key(fragment)])
    assert state["selectedColumns"] == ["attributes.`Run Name`", "metrics.`segmentation/gt_miou`",
                                        "params.`transformer.config.patch_size`"]
    # 600 metric columns: more than the tag holds; the first ones (the table's order) are kept
    many = store.create_run(exp, tags={tracking.PARENT_TAG: parent}).info.run_id
    store.log_batch(many, metrics=[Metric(f"val/metric_number_{k:04d}/with_a_long_name", 1.0, 0, 0)
                                   for k in range(600)])
    fragment = tracking.share_ablation_view(store, parent, ["segmentation/gt_miou"])
    tag = store.get_experiment(exp).tags[tracking.SHARED_VIEW_PREFIX + _view_key(fragment)]
    state = json.loads(tag)
    assert len(tag) <= 20000 and state["selectedColumns"][1] == "metrics.`segmentation/gt_miou`"
    assert 100 < len(state["selectedColumns"]) < 602


def test_bad_input_is_reported(store, tmp_path):
    p = _params()
    with pytest.raises(ValueError, match="parent_run_id"), tracking.variant_run(p, "", "tab5", "v", {}):
        pass
    with tracking.ablation_run(p, "tab5", "Tab 5") as (ablation, _):
        with tracking.variant_run(p, ablation.info.run_id, "tab5", "v", {}) as (run, _):
            with pytest.raises(TypeError, match="must be a number"):
                tracking.log_variant_metrics(run.info.run_id, {"depth/fvd": "high"})
        with pytest.raises(ValueError, match="'variant' column"):
            tracking.log_ablation_table(ablation.info.run_id, "Tab 5", pd.DataFrame({"x": [1.0]}), tmp_path)
    with pytest.raises(ValueError, match="needs a name"), tracking.pipeline_run(p, "", "make"):
        pass

