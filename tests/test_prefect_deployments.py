"""Prefect drives DVC, end to end on loopback: a real Prefect server, the served deployments of
infra/prefect/serve.py, `prefect deployment run`. After `make repro` a job re-runs nothing and leaves
`dvc status` clean; after a train parameter changes it re-runs exactly train and what follows."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from flows.dvc import status_clean

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
UPSTREAM = ["data", "validate", "encode", "autoencoder", "latents"]
DOWNSTREAM_OF_TRAIN = ["train", "sample", "evaluate", "report"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, path: str, body: dict | None = None, timeout: float = 10):
    req = urllib.request.Request(f"{url}{path}", method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@contextmanager
def _background(cmd: list[str], cwd: Path, env: dict[str, str], log: Path):
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        yield proc
    finally:
        _stop(proc)


def _wait_for(what: str, check, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what}: the process exited ({proc.returncode}):\n{_tail(log)}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{what}: not ready within {timeout:.0f} s:\n{_tail(log)}")


def _run_deployment(ws_path: Path, env: dict[str, str], url: str, name: str, timeout: int = 600) -> dict:
    """`prefect deployment run <name> --watch`; returns the flow run, its state and its `stages` line."""
    proc = subprocess.run([str(VENV_BIN / "prefect"), "deployment", "run", name, "--watch", "--watch-timeout",
                           str(timeout)], cwd=ws_path, env=env, capture_output=True, text=True, timeout=timeout + 60)
    out = proc.stdout + proc.stderr
    m = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert m, f"no flow run created:\n{out[-4000:]}"
    run_id = m.group(1)
    logs = _api(url, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC",
                                      "limit": 200})
    messages = [entry["message"] for entry in logs]
    assert proc.returncode == 0, f"{name} did not complete:\n{out[-3000:]}\n" + "\n".join(messages[-60:])
    flow_run = _api(url, f"/flow_runs/{run_id}")
    assert flow_run["state"]["type"] == "COMPLETED", flow_run["state"]
    stage_lines = [msg for msg in messages if msg.startswith("stages: ")]
    assert stage_lines, "the job logged no `stages:` line:\n" + "\n".join(messages[-60:])
    return {"id": run_id, "stages": json.loads(stage_lines[-1].removeprefix("stages: ")), "logs": messages}


def test_deployments_bring_targets_up_to_date_through_dvc(repro_workspace, tmp_path):
    ws = repro_workspace.copy(tmp_path / "ws")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**ws.env, "PREFECT_API_URL": url, "PREFECT_RUNNER_POLL_FREQUENCY": "2",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    lock_before = (ws.path / "dvc.lock").read_bytes()
    started = time.monotonic()
    with _background([str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                      "--no-ui"], ws.path, env, tmp_path / "server.log") as server:
        _wait_for("prefect server", lambda: _api(url, "/health", timeout=2) is not None, server,
                  tmp_path / "server.log", 120)
        # the venv is not activated (as `make repro` sees it): the job puts its bin on dvc's PATH itself
        with _background([sys.executable, "infra/prefect/serve.py"], ws.path, env, tmp_path / "serve.log") as serve:
            jobs = {"pipeline", "curate", "train", "evaluate", "sweep"}
            # serve.py registers the deployments one after another: wait for all of them
            _wait_for("served deployments", lambda: {d["name"] for d in _api(url, "/deployments/filter", {}, timeout=2)}
                      >= jobs or None, serve, tmp_path / "serve.log", 120)
            deployments = _api(url, "/deployments/filter", {})
            assert {d["name"] for d in deployments} == jobs

            # 1. after `make repro` nothing is stale: the train job runs no stage
            noop = _run_deployment(ws.path, env, url, "udpdiff/train")
            assert noop["stages"]["ran"] == [], noop["stages"]
            assert set(noop["stages"]["skipped"]) == {*UPSTREAM, "train"}
            assert (ws.path / "dvc.lock").read_bytes() == lock_before
            assert status_clean([], env, cwd=ws.path)[0]
            noop_s = time.monotonic() - started

            # 2. a train parameter changes: exactly train and its downstream stages run
            params = yaml.safe_load((ws.path / "params.yaml").read_text())
            params["profiles"]["tiny"]["train"].update(steps=40, lr=2.0e-3)  # new run fingerprint, 40 steps
            (ws.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            rerun = _run_deployment(ws.path, env, url, "udpdiff/evaluate", timeout=900)
            assert rerun["stages"]["ran"] == DOWNSTREAM_OF_TRAIN, rerun["stages"]
            assert set(rerun["stages"]["skipped"]) == set(UPSTREAM)
            clean, what = status_clean([], env, cwd=ws.path)
            assert clean, what
            assert (ws.path / "dvc.lock").read_bytes() != lock_before

            # each stage DVC ran is a subflow of the job's flow run
            children = _api(url, "/flow_runs/filter",
                            {"flow_runs": {"parent_flow_run_id": {"any_": [rerun["id"]]}}, "sort": "START_TIME_ASC"})
            assert [c["name"] for c in children] == DOWNSTREAM_OF_TRAIN
            assert all(c["state"]["type"] == "COMPLETED" for c in children)
    print(f"no-op train job after {noop_s:.0f} s, whole test {time.monotonic() - started:.0f} s")
