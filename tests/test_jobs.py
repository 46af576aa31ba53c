"""Prefect drives DVC (flows/jobs.py, flows/dvc.py, flows/subflows.py), checked on a throwaway DVC repo
with `echo` stages; the real pipeline behind real deployments is tests/test_prefect_deployments.py."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import types
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from flows import dvc as fdvc
from flows import jobs

REPO = Path(__file__).resolve().parents[1]

DVC_REPRO_OUTPUT = """\
'data.dvc' didn't change, skipping
Stage 'data' didn't change, skipping
Stage 'validate' didn't change, skipping
Running stage 'train':
> python -m flows stage train
train:  40%|####      | 400/1000 [00:20<00:30, 20.0it/s]
Stage 'sample' is cached - skipping run, checking out outputs
Running stage 'evaluate':
> python -m flows stage evaluate
Updating lock file 'dvc.lock'
"""


def test_dvc_output_is_parsed_into_ran_skipped_and_restored():
    r = fdvc.parse_output(DVC_REPRO_OUTPUT.splitlines())
    assert r.ran == ["train", "evaluate"]
    assert r.skipped == ["data.dvc", "data", "validate"]
    assert r.restored == ["sample"]
    assert fdvc.parse_line("> python -m flows stage train") is None


def test_every_job_target_is_a_dvc_stage_and_sweep_is_not_a_dvc_job():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(jobs.JOBS) == {"pipeline", "curate", "train", "evaluate", "sweep"}
    assert jobs.JOBS["pipeline"] == [] and jobs.JOBS["sweep"] is None
    for job, targets in jobs.JOBS.items():
        for target in targets or []:
            assert target in stages, f"job {job}: {target} is not a stage of dvc.yaml"


def test_dvc_env_puts_this_interpreter_first_on_path():
    env = fdvc.dvc_env({"X_EXTRA": "1"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["X_EXTRA"] == "1"


# ----------------------------------------------------------------------------- a throwaway DVC repo

DVC_YAML = """\
stages:
  a:
    cmd: echo "a=${x.a}" > a.txt
    params: [x.a]
    outs: [a.txt]
  b:
    cmd: cat a.txt > b.txt && echo "b=${x.b}" >> b.txt
    deps: [a.txt]
    params: [x.b]
    outs: [b.txt]
  c:
    cmd: cat b.txt > c.txt
    deps: [b.txt]
    outs: [c.txt]
  slow:
    cmd: sleep ${x.sleep} && echo done > slow.txt
    params: [x.sleep]
    outs: [slow.txt]
  broken:
    cmd: echo "something went wrong here" && exit 3
    deps: [a.txt]
    outs: [never.txt]
"""


def _set_params(repo: Path, **x) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text()) if (repo / "params.yaml").exists() else {"x": {}}
    params["x"].update(x)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture
def dvc_repo(tmp_path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    env = fdvc.dvc_env({"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t.invalid", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t.invalid"})
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, timeout=30, env=env)
    subprocess.run([*fdvc.dvc_command(), "init", "-q"], cwd=repo, check=True, timeout=60, env=env)
    subprocess.run([*fdvc.dvc_command(), "config", "core.analytics", "false"], cwd=repo, check=True, timeout=60,
                   env=env)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    _set_params(repo, a=1, b=1, sleep=30)
    return repo


def _run(repo: Path, *args: str, **kw) -> tuple[fdvc.DvcResult, list[str]]:
    lines: list[str] = []
    return fdvc.run_dvc(list(args), fdvc.dvc_env(), lines.append, cwd=repo, **kw), lines


def test_repro_runs_stale_stages_only_and_status_tells_clean_from_dirty(dvc_repo):
    env = fdvc.dvc_env()
    first, lines = _run(dvc_repo, "repro", "c")
    assert first.ok, lines
    assert first.ran == ["a", "b", "c"] and first.skipped == []
    assert any("Running stage 'a'" in line for line in lines)  # streamed as it came
    assert fdvc.status_clean(["c"], env, cwd=dvc_repo) == (True, "Data and pipelines are up to date.")

    again, _ = _run(dvc_repo, "repro", "c")
    assert again.ok and again.ran == [] and again.skipped == ["a", "b", "c"]

    _set_params(dvc_repo, b=2)
    clean, what = fdvc.status_clean(["c"], env, cwd=dvc_repo)
    assert not clean and "b" in what and "x.b" in what
    # status of a target covers what it depends on (b is upstream of c)
    assert fdvc.status_clean(["a"], env, cwd=dvc_repo)[0]
    after, _ = _run(dvc_repo, "repro", "c")
    assert after.ran == ["b", "c"] and after.skipped == ["a"]
    assert fdvc.status_clean(["c"], env, cwd=dvc_repo)[0]


def test_a_failing_stage_returns_its_last_lines(dvc_repo):
    result, _ = _run(dvc_repo, "repro", "broken")
    assert not result.ok
    assert result.ran == ["a", "broken"]
    assert any("something went wrong here" in line for line in result.tail)


def test_a_silent_stage_gets_heartbeats_and_the_timeout_kills_it(dvc_repo):
    start = time.monotonic()
    result, lines = _run(dvc_repo, "repro", "slow", timeout_s=4, heartbeat_s=1)
    assert time.monotonic() - start < 30
    assert result.returncode == 124
    assert any("'slow' still running" in line for line in lines), lines
    left = subprocess.run(["pgrep", "-f", "sleep 30 && echo done"], capture_output=True, text=True, timeout=10)
    assert left.stdout.strip() == "", "the stage's process outlived the timeout"


# ----------------------------------------------------------------------------- the udpdiff flow's logic


@pytest.fixture
def job_env(dvc_repo, monkeypatch):
    """jobs.udpdiff's body (``.fn``) against the throwaway repo, MLflow's parent run faked."""
    monkeypatch.setattr(fdvc, "REPO_ROOT", dvc_repo)
    monkeypatch.setattr(jobs, "JOBS", {"pipeline": [], "train": ["b"], "sweep": None})
    monkeypatch.setattr(jobs, "get_run_logger", lambda: logging.getLogger("test-jobs"))
    opened: list[dict] = []
    recorded: list[tuple] = []

    @contextlib.contextmanager
    def fake_pipeline_run(p, name, trigger, tags=None):
        opened.append({"name": name, "trigger": trigger, "tags": tags})
        yield types.SimpleNamespace(info=types.SimpleNamespace(run_id="run-1")), {"UDPDIFF_MLFLOW_PARENT_RUN_ID": "r1"}

    monkeypatch.setitem(sys.modules, "flows.tracking", types.SimpleNamespace(pipeline_run=fake_pipeline_run))
    monkeypatch.setitem(sys.modules, "flows.common", types.SimpleNamespace(
        load=lambda profile=None: (types.SimpleNamespace(profile=profile or "tiny"), None)))
    monkeypatch.setattr(jobs, "_record", lambda p, run, result, targets: recorded.append((result.ran, targets)))
    return types.SimpleNamespace(repo=dvc_repo, opened=opened, recorded=recorded)


def test_a_job_reproduces_its_target_through_dvc_and_is_a_noop_the_second_time(job_env):
    assert jobs.udpdiff.fn("train") == {"ran": ["a", "b"], "skipped": [], "restored": []}
    assert job_env.opened == [{"name": "train (prefect)", "trigger": "prefect", "tags": {"job": "train"}}]
    assert (job_env.repo / "dvc.lock").exists() and not (job_env.repo / "c.txt").exists()  # c is not a target
    assert jobs.udpdiff.fn("train") == {"ran": [], "skipped": ["a", "b"], "restored": []}
    _set_params(job_env.repo, b=5)
    assert jobs.udpdiff.fn("train")["ran"] == ["b"]
    assert job_env.recorded == [(["a", "b"], ["b"]), ([], ["b"]), (["b"], ["b"])]


def test_a_failing_dvc_fails_the_job_with_dvcs_output(job_env, monkeypatch):
    monkeypatch.setitem(jobs.JOBS, "train", ["broken"])
    with pytest.raises(jobs.DvcJobError, match="something went wrong here"):
        jobs.udpdiff.fn("train")


def test_another_profile_is_refused_with_what_to_run_instead(job_env):
    with pytest.raises(ValueError, match=r"dvc exp run -S profile=cogvideox-2b"):
        jobs.udpdiff.fn("train", profile="cogvideox-2b")
    assert job_env.opened == []
    with pytest.raises(ValueError, match="unknown job"):
        jobs.udpdiff.fn("nope")


def test_the_sweep_job_hands_over_to_the_ablation_flow(job_env, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "flows.ablation",
                        types.SimpleNamespace(ablation_flow=lambda ablation, profile: calls.append((ablation, profile))
                                              or {"tab5": {}}))
    assert jobs.udpdiff.fn("sweep", ablation="tab5") == {"tab5": {}}
    assert calls == [("tab5", None)]
    with pytest.raises(ValueError, match="sweep job only"):
        jobs.udpdiff.fn("train", ablation="tab5")


def test_the_flow_keeps_its_name_and_parameters():
    import inspect

    assert jobs.udpdiff.name == "udpdiff"
    assert list(inspect.signature(jobs.udpdiff.fn).parameters) == ["job", "profile", "ablation"]


# ----------------------------------------------------------------------------- stage flows as subflows


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _child_flow():
    from prefect import flow

    @flow(name="udpdiff-stage-test", flow_run_name="{stage}")
    def child(stage: str, profile: str | None = None) -> str:
        return f"{stage}:{profile}"

    return child


def test_without_a_parent_the_stage_flow_is_just_called(monkeypatch):
    from flows.subflows import PARENT_ENV, run_stage_flow

    monkeypatch.delenv(PARENT_ENV, raising=False)
    called = []

    class FakeFlow:
        name = "x"

        def __call__(self, **kw):
            called.append(kw)
            return 7

    assert run_stage_flow(FakeFlow(), {"stage": "data"}) == 7 and called == [{"stage": "data"}]


def test_a_stage_flow_in_another_process_is_linked_as_a_subflow(prefect_api, monkeypatch):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from flows.subflows import PARENT_ENV, run_stage_flow

    @flow(name="udpdiff-test-parent")
    def parent():
        pass

    child = _child_flow()
    with get_client(sync_client=True) as client:
        parent_run = client.create_flow_run(parent, state=Running())
    monkeypatch.setenv(PARENT_ENV, str(parent_run.id))
    assert run_stage_flow(child, {"stage": "train", "profile": "tiny"}) == "train:tiny"
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        mine = [r for r in runs if r.parent_task_run_id]
        assert len(mine) == 1 and mine[0].name == "train" and mine[0].state.is_completed()
        tracking = client.read_task_run(mine[0].parent_task_run_id)
        assert tracking.flow_run_id == parent_run.id
        assert tracking.state.is_completed()  # the server mirrors the subflow's state onto it
        assert tracking.state.state_details.child_flow_run_id == mine[0].id


def test_a_parent_that_does_not_exist_never_stops_the_stage(prefect_api, monkeypatch, caplog):
    from flows.subflows import PARENT_ENV, run_stage_flow

    monkeypatch.setenv(PARENT_ENV, str(uuid.uuid4()))
    with caplog.at_level(logging.WARNING, logger="flows.subflows"):
        assert run_stage_flow(_child_flow(), {"stage": "data"}) == "data:None"
    assert "running it unlinked" in caplog.text


def test_a_terminated_command_interrupts_its_processes_and_stops_the_server(tmp_path):
    """`kill` (SIGTERM) of `python -m flows repro` unwinds as Ctrl-C does: the command gets SIGINT (dvc then
    stops its stage and leaves dvc.lock alone) and the local Prefect server stops. Python's default would
    have ended the parent alone and left both running."""
    child = ("import os, signal, sys, time\n"
             "def stop(signum, frame):\n"
             "    open(os.environ['X_OUT'] + '.signal', 'w').write(str(signum)); sys.exit(130)\n"
             "signal.signal(signal.SIGINT, stop)\n"
             "open(os.environ['X_OUT'], 'w').write(os.environ['PREFECT_API_URL'] + ' ' + str(os.getpid()))\n"
             "time.sleep(600)\n")
    parent = ("import sys\nfrom flows import jobs\n"
              f"sys.exit(jobs.run_with_prefect_server([sys.executable, '-c', {child!r}]))\n")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), X_OUT=str(tmp_path / "child"), PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "child").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=10)[0][-2000:]
            time.sleep(0.2)
        time.sleep(0.5)  # the file is written: the child's handler is in place
        url, pid = (tmp_path / "child").read_text().split()
        proc.terminate()
        proc.wait(timeout=60)
        assert (tmp_path / "child.signal").read_text() == str(int(signal.SIGINT))
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)
        with pytest.raises(OSError):  # the server is gone with it
            urllib.request.urlopen(url + "/health", timeout=2)
    finally:  # without the fix the child and the server outlive the parent: stop them here
        if proc.poll() is None:
            proc.kill()
        if (tmp_path / "child").exists():
            url, pid = (tmp_path / "child").read_text().split()
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
            port = url.rsplit(":", 1)[1].split("/")[0]
            subprocess.run(["pkill", "-f", f"prefect server start --host 127.0.0.1 --port {port} "], check=False)


def test_one_prefect_server_serves_the_whole_command_and_is_stopped(monkeypatch, tmp_path):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    probe = ("import os, urllib.request; url = os.environ['PREFECT_API_URL']; "
             "assert os.environ['X_EXTRA'] == '1'; "
             "assert os.environ['PATH'].startswith(os.path.dirname(os.environ['X_PY'])); "
             "urllib.request.urlopen(url + '/health', timeout=5); open(os.environ['X_OUT'], 'w').write(url)")
    code = jobs.run_with_prefect_server([sys.executable, "-c", probe],
                                        env={"X_EXTRA": "1", "X_PY": sys.executable, "X_OUT": str(tmp_path / "url")})
    assert code == 0
    url = (tmp_path / "url").read_text()
    with pytest.raises(OSError):  # stopped with the command
        urllib.request.urlopen(url + "/health", timeout=2)
