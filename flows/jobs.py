"""The jobs people and deployments run, and how: Prefect drives DVC.

``JOBS`` is the one job list (``infra/prefect/serve.py`` makes one deployment per job,
``python -m flows run <job>`` runs one here). A DVC job brings its targets up to date *through*
DVC: ``dvc repro <targets>`` (the targets and every stage they depend on), so nothing that is up
to date runs again, dvc.lock is updated, and ``dvc status`` is clean afterwards (checked). Each
stage DVC runs is still the ``udpdiff-stage`` flow (``python -m flows stage <name>``); it shows up
as a subflow of the job's flow run (``flows/subflows.py``), and its MLflow run nests under the
job's MLflow parent run "<job> (prefect)".

    python -m flows repro                 # make repro: one Prefect server + MLflow parent, dvc repro
    python -m flows run train             # the train job (a flow run; ephemeral Prefect API if unset)
    prefect deployment run udpdiff/train  # the same through a served deployment (infra/README.md)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from prefect import flow, get_run_logger

from flows import PREFECT_SERVER_START_TIMEOUT_S
from flows.dvc import DvcResult, dvc_command, dvc_env, run_dvc, status_clean, stop_session
from flows.subflows import PARENT_ENV

# job -> `dvc repro` targets ([] = every stage of dvc.yaml); None = not a DVC job (sweep: the ablations)
JOBS: dict[str, list[str] | None] = {
    "pipeline": [],
    "curate": ["encode"],      # data -> validate -> encode
    "train": ["train"],        # + autoencoder, latents and train
    "evaluate": ["report"],    # + sample, evaluate and report (everything, as report needs it all)
    "sweep": None,             # paper ablations (flows/ablation.py); parameter `ablation` picks the table
}
PARENT_FLOW_RUN_ENV = PARENT_ENV  # the job's flow run id, read by flows/subflows.py in each stage
# a wall-clock limit for one `dvc repro` of a job (a 40k-step training takes days); 0 = none
TIMEOUT_ENV = "UDPDIFF_DVC_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 7 * 24 * 3600


class DvcJobError(RuntimeError):
    """``dvc repro`` failed, or left ``dvc status`` dirty."""


def _timeout() -> float | None:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    value = float(raw) if raw else DEFAULT_TIMEOUT_S
    return value if value > 0 else None


def _check_profile(profile: str | None) -> None:
    """A job brings the workspace's DVC pipeline up to date, and that pipeline follows params.yaml's
    ``profile``: ``dvc repro`` cannot override a parameter. Another profile is refused, not faked."""
    if profile is None:
        return
    from flows.common import load

    active = load(None)[0].profile
    if profile != active:
        raise ValueError(
            f"profile {profile!r} is not params.yaml's profile ({active!r}): a job runs `dvc repro`, which follows "
            f"params.yaml. Set `profile: {profile}` in params.yaml (then run the job), or run an experiment "
            f"without touching the workspace: `dvc exp run -S profile={profile} <targets>` "
            "(add --temp to run it in a temporary copy)")


def reproduce(targets: list[str], env: dict[str, str], log, cwd: Path | None = None) -> DvcResult:
    """``dvc repro <targets>`` then ``dvc status`` of the same targets; raises DvcJobError with dvc's
    last lines if it fails or leaves anything stale."""
    result = run_dvc(["repro", *targets], env, log, cwd=cwd, timeout_s=_timeout())
    what = " ".join(targets) or "(all stages)"
    if not result.ok:
        tail = "\n".join(result.tail[-25:])
        raise DvcJobError(f"`dvc repro {what}` failed (exit {result.returncode}); stages run: {result.ran or 'none'}. "
                          f"Its last output:\n{tail}")
    clean, status = status_clean(targets, env, cwd=cwd)
    if not clean:
        raise DvcJobError(f"`dvc repro {what}` finished but `dvc status` is not clean:\n{status}")
    log(f"dvc: ran {result.ran or 'nothing'}; up to date {result.skipped or 'nothing'}"
        + (f"; restored from the run cache {result.restored}" if result.restored else "") + "; `dvc status` is clean")
    return result


def _record(p, run, result: DvcResult, targets: list[str]) -> None:
    """What the job did, on its MLflow parent run (tags stages_ran, stages_skipped, stages_restored,
    dvc_targets; metric stages_ran = how many)."""
    from mlflow.tracking import MlflowClient

    from flows.tracking import tracking_uri

    client = MlflowClient(tracking_uri(p))
    run_id = run.info.run_id
    for key, value in (("stages_ran", result.ran), ("stages_skipped", result.skipped),
                       ("stages_restored", result.restored), ("dvc_targets", targets or ["(all)"])):
        client.set_tag(run_id, key, ",".join(value) if value else "-")
    client.log_metric(run_id, "stages_ran", len(result.ran))


@flow(name="udpdiff", flow_run_name="{job}")
def udpdiff(job: str = "pipeline", profile: str | None = None, ablation: str | None = None) -> dict:
    """Bring a job's DVC targets up to date through ``dvc repro`` (``JOBS``); ``sweep`` runs the paper's
    ablations (``ablation``: one table such as ``tab5``; all by default).

    Returns ``{"ran": [...], "skipped": [...], "restored": [...]}`` for a DVC job: nothing ran when
    nothing changed."""
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}; jobs: {sorted(JOBS)}")
    targets = JOBS[job]
    if targets is None:
        from flows.ablation import ablation_flow  # the lead's module; imports this one's neighbours

        return ablation_flow(ablation, profile)
    if ablation is not None:
        raise ValueError(f"`ablation` applies to the sweep job only, not {job!r}")
    log = get_run_logger()
    _check_profile(profile)
    from prefect.runtime import flow_run

    from flows.common import load
    from flows.tracking import pipeline_run

    p = load(profile)[0]
    with pipeline_run(p, name=f"{job} (prefect)", trigger="prefect", tags={"job": job}) as (run, env):
        child_env = dvc_env({**env, PARENT_FLOW_RUN_ENV: str(flow_run.id)} if flow_run.id else env)
        _add_prefect_api(child_env)
        log.info("job %s: dvc repro %s (MLflow parent run %s)", job, " ".join(targets) or "(all stages)",
                 run.info.run_id)
        result = reproduce(targets, child_env, log.info)
        _record(p, run, result, targets)
    stages = {"ran": result.ran, "skipped": result.skipped, "restored": result.restored}
    log.info("stages: %s", json.dumps(stages))
    return stages


def _add_prefect_api(env: dict[str, str]) -> None:
    """Stages talk to the same Prefect API as this flow (set in a profile rather than the env, too)."""
    if env.get("PREFECT_API_URL"):
        return
    with contextlib.suppress(Exception):
        from prefect.settings import get_current_settings

        url = get_current_settings().api.url
        if url:
            env["PREFECT_API_URL"] = str(url)


# ------------------------------------------------------------------------------- make repro


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def prefect_server(timeout_s: float = PREFECT_SERVER_START_TIMEOUT_S) -> Iterator[dict[str, str]]:
    """A local Prefect server for the block, unless PREFECT_API_URL is set; yields the env to add.
    Raises RuntimeError if it does not become healthy within ``timeout_s``; always stopped."""
    if os.environ.get("PREFECT_API_URL"):
        yield {}
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    prefect = Path(sys.executable).with_name("prefect")
    server = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None:
                raise RuntimeError(f"prefect server exited: {server.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not become healthy within {timeout_s:.0f} s")
            time.sleep(0.5)
        yield {"PREFECT_API_URL": url}
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (``kill``, a scheduler stopping the job) unwinds the block as Ctrl-C does, so that its
    ``finally`` clauses run: Python's default would end the process at once and leave the local
    Prefect server and the command's processes behind. Only the main thread can install it."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_with_prefect_server(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``cmd`` with one Prefect server shared by every flow it starts (its exit code).

    Without PREFECT_API_URL each stage would start (and stop) its own ephemeral server, several
    seconds apiece; one server for the whole `dvc repro` saves that and keeps all runs in one
    place. An existing PREFECT_API_URL is used as is. ``env``: extra variables for ``cmd``.
    Interrupted (Ctrl-C or SIGTERM), the command's processes get SIGINT as from a terminal, then
    SIGTERM and SIGKILL if they linger, and the server is stopped: nothing is left running."""
    # dvc.yaml's commands say `python`: make it this environment's, activated or not
    base = dvc_env(env)
    try:
        with sigterm_interrupts(), prefect_server() as server_env:
            # its own session, so that one signal reaches dvc and the stage it runs, however it came
            proc = subprocess.Popen(cmd, env={**base, **server_env}, start_new_session=True)
            try:
                return proc.wait()
            finally:
                stop_session(proc, interrupt_first=True)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def repro(dvc_args: list[str]) -> int:
    """``python -m flows repro [dvc repro args]`` (what ``make repro`` runs): ``dvc repro`` with one
    local Prefect server and one MLflow parent run ("make repro" under make, else "dvc repro")
    that every stage run nests under. Returns dvc's exit code."""
    from flows.common import load
    from flows.tracking import pipeline_run

    p = load(None)[0]
    name = "make repro" if os.environ.get("MAKELEVEL") else "dvc repro"
    code = 1
    with contextlib.suppress(DvcJobError):
        with pipeline_run(p, name=name, trigger="make", tags={"dvc_args": " ".join(dvc_args) or None}) as (_, env):
            code = run_with_prefect_server([*dvc_command(), "repro", *dvc_args], env=env)
            if code != 0:  # the parent run ends FAILED
                raise DvcJobError(f"dvc repro exited with {code}")
    return code
