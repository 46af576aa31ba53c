"""Orchestration wiring: the Prefect flow names and deployments users call, and the DVC graph."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

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


def test_jobs_cover_every_dvc_stage_in_order():
    from flows.pipeline import JOBS, STEP_FUNCTIONS

    stages = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert JOBS["pipeline"] == stages
    assert set(stages) - {"data"} <= set(STEP_FUNCTIONS)


def test_library_imports_no_orchestration():
    code = ("import sys, pkgutil, importlib, udpdiff\n"
            "for m in pkgutil.walk_packages(udpdiff.__path__, 'udpdiff.'):\n"
            "    importlib.import_module(m.name)\n"
            "bad = [m for m in ('prefect', 'dvc', 'mlflow') if m in sys.modules]\n"
            "print(bad); sys.exit(1 if bad else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bad_params_fail_the_cli_with_a_clear_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flows", "stage", "data", "--profile", "does-not-exist"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "profile 'does-not-exist' is not defined" in proc.stderr
