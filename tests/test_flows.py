"""Orchestration wiring: the Prefect flow names and deployments users call, and the DVC graph."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_udpdiff_flow_has_the_documented_deployments():
    spec = importlib.util.spec_from_file_location("serve", REPO / "infra" / "prefect" / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    deployments = serve.deployments()
    assert {d.name for d in deployments} == {"pipeline", "curate", "train", "evaluate", "sweep"}
    assert all(d.flow_name == "udpdiff" for d in deployments)
    assert {d.name: d.parameters["job"] for d in deployments}["train"] == "train"


def test_jobs_target_dvc_stages_and_every_stage_has_a_module():
    import importlib

    from flows.jobs import JOBS
    from udpdiff.stages import STAGES

    stages = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert list(STAGES) == stages
    for job, targets in JOBS.items():
        assert targets is None or set(targets) <= set(stages), job
    for stage in stages:
        assert callable(importlib.import_module(f"udpdiff.stages.{stage}").run)


def test_library_imports_no_orchestration():
    code = ("import sys, pkgutil, importlib, udpdiff\n"
            "for m in pkgutil.walk_packages(udpdiff.__path__, 'udpdiff.'):\n"
            "    importlib.import_module(m.name)\n"
            "bad = [m for m in ('prefect', 'dvc', 'mlflow') if m in sys.modules]\n"
            "print(bad); sys.exit(1 if bad else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["stage", "data", "--profile", "does-not-exist"], "profile 'does-not-exist' is not defined"),
    (["run", "train", "--profile", "does-not-exist"], "profile 'does-not-exist' is not defined"),
    (["ablation", "tab5", "--profile", "does-not-exist"], "profile 'does-not-exist' is not defined"),
    (["stage", "trian"], "unknown stage 'trian'; stages: data, validate"),
    (["run", "trian"], "unknown job 'trian'"),
])
def test_bad_arguments_fail_the_cli_with_a_clear_message_before_any_prefect_server(args, message):
    proc = subprocess.run([sys.executable, "-m", "flows", *args], cwd=REPO, env={**os.environ, "PREFECT_API_URL": ""},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr
    assert "prefect" not in proc.stderr.lower(), proc.stderr  # no server started (or log line) for nothing


def test_broken_data_contract_fails_the_stage_and_logs_the_report(tmp_path):
    """A dataset that breaks the contract: the validate stage exits non-zero, names the problem,
    and its MLflow run is FAILED with the GX report attached."""
    import os
    import shutil
    import sqlite3

    from udpdiff.data.synthetic import synthesize_dataset

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    manifest = synthesize_dataset(tmp_path / "data" / "tiny" / "clips", num_clips=3, num_frames=9, height=48,
                                  width=48, fps=8, seed=0, val_fraction=0.34)
    victim = sorted((manifest.parent / "depth").glob("*.npz"))[0]
    victim.unlink()
    env = {**os.environ, "UDPDIFF_ROOT": str(tmp_path), "PREFECT_HOME": str(tmp_path / ".prefect")}
    proc = subprocess.run([sys.executable, "-m", "flows", "stage", "validate"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    output = proc.stderr + proc.stdout
    assert proc.returncode != 0
    assert "data contract failed" in output and victim.stem in output, output[-4000:]
    assert (tmp_path / "data" / "tiny" / "validation" / "report.json").exists()
    db = sqlite3.connect(tmp_path / "mlruns.db")
    assert db.execute("SELECT status FROM runs WHERE name='validate'").fetchone()[0] == "FAILED"
    assert list((tmp_path / "mlartifacts").rglob("report.json"))


def test_a_stage_gives_prefects_ephemeral_server_two_minutes_to_start(monkeypatch):
    """A stage run on its own starts Prefect's ephemeral API server, which by default gets 20 s: less
    than creating a fresh PREFECT_HOME's database took on CI's 2 cores (the stage then failed before it
    began). The CLI sets the allowance, for itself and the stage processes DVC starts, unless the user
    set one."""
    import os

    import flows.__main__ as cli
    import flows.subflows

    var = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    seen = []
    monkeypatch.setattr(flows.subflows, "run_stage_flow", lambda flow, parameters: seen.append(os.environ.get(var)))
    # main() leaves the process group on its way out (a stage process's last act); here that would
    # destroy the one-rank group earlier training tests left for this pytest process, under DeepSpeed
    monkeypatch.setattr(cli, "leave_process_group", lambda: None)
    monkeypatch.delenv(var, raising=False)
    assert cli.main(["stage", "validate"]) == 0
    monkeypatch.setenv(var, "7")
    assert cli.main(["stage", "validate"]) == 0
    assert seen == ["120", "7"]


@pytest.mark.parametrize(("stage", "key"), [("train", "train_launcher"), ("sample", "inference_launcher"),
                                            ("evaluate", "inference_launcher")])
def test_stages_start_under_the_configured_launcher(tmp_path, monkeypatch, stage, key):
    """With ``train_launcher`` (train) or ``inference_launcher`` (sample, evaluate) set, the stage runs
    itself under that launcher (whose rank 0 does the flow and MLflow work) and returns the metrics
    rank 0 wrote; ``python -m`` and the other stages run in the flow's own process."""
    import json

    import flows.stage as fp
    from udpdiff.config import load_params
    from udpdiff.stages import stage_launcher

    plain = load_params(REPO / "params.yaml")
    assert all(stage_launcher(plain, s) is None for s in ("train", "sample", "evaluate", "report"))
    p = plain.model_copy(update={key: "torchrun --nproc_per_node 2 -m"})
    assert stage_launcher(p, stage) == "torchrun --nproc_per_node 2 -m" and stage_launcher(p, "report") is None
    calls = []

    class Paths:
        metrics = tmp_path

    (tmp_path / f"{stage}.json").write_text(json.dumps({"final_loss": 0.25}))
    monkeypatch.setattr(fp, "load", lambda profile: (p, Paths))
    monkeypatch.setattr(fp.subprocess, "call", lambda cmd, **kw: calls.append((cmd, kw["env"])) or 0)
    monkeypatch.delenv("RANK", raising=False)
    assert fp.stage_flow.fn(stage) == {"final_loss": 0.25}  # the flow's body: launches, runs nothing itself
    (cmd, env), = calls
    assert cmd == ["torchrun", "--nproc_per_node", "2", "-m", "flows", "stage", stage, "--profile", "tiny"]
    assert env["PATH"].startswith(str(Path(sys.executable).parent))
    monkeypatch.setattr(fp.subprocess, "call", lambda cmd, **kw: 3)
    with pytest.raises(RuntimeError, match="exit code 3"):
        fp.launch_stage(p, stage, stage_launcher(p, stage))


def test_worker_ranks_run_only_the_launched_stages():
    import os

    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2"}
    proc = subprocess.run([sys.executable, "-m", "flows", "stage", "report"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "only the train, sample, evaluate stages run under a multi-process launcher" in proc.stderr


def test_the_cli_runs_the_exit_handlers_and_keeps_the_exit_code_when_it_skips_teardown(tmp_path):
    """`python -m flows` leaves with os._exit after main (Python's teardown costs seconds per stage
    process): the exit handlers still run, logs reach their files, and the code is main's."""
    log = tmp_path / "stage.log"
    code = ("import atexit, logging, sys\n"
            "from flows.__main__ import exit_without_teardown\n"
            f"logging.basicConfig(filename={str(log)!r}, level=logging.INFO)\n"
            "logging.getLogger('x').info('written before exit')\n"
            "atexit.register(lambda: print('handler ran', flush=True))\n"
            "sys.stdout.write('buffered, not flushed')\n"
            "exit_without_teardown(3)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "handler ran" in proc.stdout and "buffered, not flushed" in proc.stdout
    assert "written before exit" in log.read_text()


def test_a_stage_outside_the_venv_says_how_to_activate_it():
    """dvc.yaml's commands say `python`; run by an interpreter without the project's packages
    (here: ours with site-packages switched off) the stage names the problem instead of failing
    deep inside with ModuleNotFoundError."""
    proc = subprocess.run([sys.executable, "-S", "-m", "flows", "stage", "data"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "lacks mlflow" in proc.stderr and "source " in proc.stderr and "bin/activate" in proc.stderr
    assert "Traceback" not in proc.stderr
