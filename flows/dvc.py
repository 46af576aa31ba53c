"""DVC from a flow: ``dvc repro`` as a subprocess whose output is streamed line by line (progress,
never a silent wait), which stages ran or were skipped, and whether ``dvc status`` is clean.

Used by the ``udpdiff`` flow's jobs (``flows/jobs.py``) and the ablation flow. No Prefect, MLflow
or project imports here: callers pass a ``log`` callable (a Prefect run logger's ``info``, or
``print``)."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(os.environ.get("UDPDIFF_ROOT", Path(__file__).resolve().parents[1]))
BIN_DIR = Path(sys.executable).parent

# what `dvc repro` prints per stage (dvc/stage/run.py, dvc/stage/__init__.py, dvc/stage/cache.py)
_RAN = re.compile(r"^Running stage '([^']+)'")
_SKIPPED = re.compile(r"^(?:Stage )?'([^']+)' didn't change, skipping")
_RESTORED = re.compile(r"^Stage '([^']+)' is cached - skipping run")
# tqdm bars of the stages' own output: logged at most every PROGRESS_EVERY_S seconds
_PROGRESS = re.compile(r"\d+%\||\d+/\d+ \[\d")
PROGRESS_EVERY_S = 15.0


@dataclass
class DvcResult:
    returncode: int
    ran: list[str] = field(default_factory=list)        # stages whose command ran
    skipped: list[str] = field(default_factory=list)    # stages that were up to date
    tail: list[str] = field(default_factory=list)       # the last output lines (for error messages)
    restored: list[str] = field(default_factory=list)   # restored from DVC's run cache (command not run)

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def dvc_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for ``dvc`` and the stages it starts: this one, plus ``extra``, with this
    interpreter's bin folder first on PATH (dvc.yaml's commands say ``python``; the venv need not
    be activated)."""
    env = {**os.environ, **(extra or {})}
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")  # stage output arrives as it is printed
    return env


def dvc_command() -> list[str]:
    exe = BIN_DIR / "dvc"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("dvc")
    return [found] if found else [sys.executable, "-m", "dvc"]


def parse_line(line: str) -> tuple[str, str] | None:
    """``("ran" | "skipped" | "restored", stage)`` for DVC's per-stage lines, else None."""
    line = line.strip()
    for kind, pattern in (("ran", _RAN), ("skipped", _SKIPPED), ("restored", _RESTORED)):
        m = pattern.match(line)
        if m:
            return kind, m.group(1)
    return None


def parse_output(lines: Sequence[str]) -> DvcResult:
    """Which stages ran, were skipped or restored, from ``dvc repro``'s output (returncode 0)."""
    result = DvcResult(0)
    for line in lines:
        hit = parse_line(line)
        if hit:
            _add(result, *hit)
    return result


def _add(result: DvcResult, kind: str, stage: str) -> None:
    bucket = getattr(result, kind)
    if stage not in bucket:
        bucket.append(stage)


def stop_session(proc: subprocess.Popen, grace_s: float = 15.0, interrupt_first: bool = False) -> None:
    """Stop ``proc`` and everything it started (its own session): SIGTERM, then SIGKILL. With
    ``interrupt_first``, SIGINT before them: what Ctrl-C would have sent the session (dvc stops its
    stage and leaves dvc.lock as it was, a stage's flow ends its runs as interrupted)."""
    if proc.poll() is not None:
        return
    signals = ((signal.SIGINT, grace_s),) if interrupt_first else ()
    for sig, wait in (*signals, (signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_dvc(args: Sequence[str], env: dict[str, str], log: Callable[[str], None], *, cwd: Path | None = None,
            timeout_s: float | None = None, heartbeat_s: float = 60.0, tail_lines: int = 40) -> DvcResult:
    """Run ``dvc <args>``; every output line goes to ``log`` as it comes (progress bars throttled),
    a line every ``heartbeat_s`` of silence says which stage is still running. Past ``timeout_s``
    dvc and its stages are killed (returncode 124). The process group is always gone on return."""
    cmd = [*dvc_command(), *args]
    log(f"$ dvc {' '.join(args)}  (in {cwd or REPO_ROOT})")
    proc = subprocess.Popen(cmd, cwd=cwd or REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1, start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:  # text mode: "\r" of progress bars ends a line too
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, name="dvc-output", daemon=True)
    reader.start()
    result = DvcResult(0)
    tail: deque[str] = deque(maxlen=tail_lines)
    start = last_output = time.monotonic()
    last_progress, pending_progress = 0.0, None
    current = None
    try:
        while True:
            now = time.monotonic()
            if timeout_s is not None and now - start > timeout_s:
                log(f"dvc {' '.join(args)} still running after {timeout_s:.0f} s: stopping it")
                stop_session(proc)
                result.returncode = 124
                tail.append(f"(stopped after {timeout_s:.0f} s; stage running: {current or 'none'})")
                break
            wait = heartbeat_s if timeout_s is None else max(0.1, min(heartbeat_s, timeout_s - (now - start)))
            try:
                line = lines.get(timeout=wait)
            except queue.Empty:
                if pending_progress:
                    log(pending_progress)
                    pending_progress = None
                log(f"... {'stage ' + repr(current) if current else 'dvc'} still running "
                    f"({time.monotonic() - last_output:.0f} s without output, {time.monotonic() - start:.0f} s in all)")
                continue
            if line is None:
                break
            last_output = time.monotonic()
            line = line.rstrip()
            if not line.strip():
                continue
            tail.append(line)
            hit = parse_line(line)
            if hit:
                _add(result, *hit)
                current = hit[1] if hit[0] == "ran" else current
            if _PROGRESS.search(line) and not hit:
                if last_output - last_progress < PROGRESS_EVERY_S:
                    pending_progress = line
                    continue
                last_progress = last_output
            pending_progress = None
            log(line)
        if result.returncode == 0:
            try:
                result.returncode = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:  # output closed but the process lingers
                stop_session(proc)
                result.returncode = proc.returncode if proc.returncode else 1
    finally:
        stop_session(proc)
        reader.join(timeout=5)
        if proc.stdout:
            proc.stdout.close()
    result.tail = list(tail)
    return result


def status_clean(targets: Sequence[str], env: dict[str, str], *, cwd: Path | None = None,
                 timeout_s: float = 300.0) -> tuple[bool, str]:
    """``(clean, what)``: whether ``dvc status`` of ``targets`` and every stage they depend on
    (all stages for no targets) reports nothing; ``what`` is DVC's description otherwise."""
    cmd = [*dvc_command(), "status", "--json", *(["--with-deps", *targets] if targets else [])]
    proc = subprocess.Popen(cmd, cwd=cwd or REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False, f"`dvc status` did not finish within {timeout_s:.0f} s"
    finally:
        stop_session(proc)
    if proc.returncode != 0:
        return False, f"`dvc status` failed (exit {proc.returncode}): {(err or out).strip()[-2000:]}"
    try:
        status = json.loads(out.strip() or "{}")
    except json.JSONDecodeError:
        text = out.strip()
        return "up to date" in text, text
    if not status:
        return True, "Data and pipelines are up to date."
    return False, json.dumps(status, indent=1, sort_keys=True)[-4000:]
