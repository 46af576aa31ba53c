"""DeepSpeed's JIT builds never hang training on a lock left by a killed build (udpdiff.extensions_lock)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from udpdiff import extensions_lock as xl


def _old_lock(root: Path, op: str = "deepspeed_shm_comm", age_s: float = 3600) -> Path:
    lock = root / op / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    past = time.time() - age_s
    os.utime(lock, (past, past))
    return lock


def test_extensions_root_follows_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert xl.extensions_root() == tmp_path
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    root = xl.extensions_root()
    assert root.name.startswith(f"py{sys.version_info.major}{sys.version_info.minor}")  # py311_cpu, py311_cu124…


def test_a_stale_lock_is_removed_and_reported(tmp_path):
    lock = _old_lock(tmp_path)
    messages: list[str] = []
    start = time.monotonic()
    assert xl.check_extension_locks(tmp_path, remove_stale=True, log=messages.append) == {str(lock): "removed"}
    assert time.monotonic() - start < 5
    assert not lock.exists()
    assert any("stale" in m and str(lock) in m for m in messages)


def test_a_stale_lock_raises_with_the_file_and_the_fix_when_removal_is_off(tmp_path):
    lock = _old_lock(tmp_path, "cpu_adam")
    with pytest.raises(xl.StaleExtensionLockError) as err:
        xl.check_extension_locks(tmp_path, remove_stale=False, log=lambda m: None)
    assert str(lock) in str(err.value) and f"rm {lock}" in str(err.value)
    assert lock.exists()


def test_several_nodes_never_remove_a_lock_on_their_own(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    _old_lock(tmp_path)
    with pytest.raises(xl.StaleExtensionLockError):
        xl.check_extension_locks(tmp_path, log=lambda m: None)


def test_a_young_lock_without_a_build_is_given_its_grace_then_removed(tmp_path):
    lock = _old_lock(tmp_path, age_s=0)
    start = time.monotonic()
    out = xl.check_extension_locks(tmp_path, remove_stale=True, grace_s=1.0, poll_s=0.1, log=lambda m: None)
    assert out == {str(lock): "removed"}
    assert 0.5 < time.monotonic() - start < 10


def test_a_running_build_is_waited_for_with_progress_and_its_release_seen(tmp_path):
    lock = _old_lock(tmp_path, age_s=0)
    # a "build" working in the op's folder (as ninja does) that releases the lock after a second
    build = subprocess.Popen(["sh", "-c", "sleep 1.5; rm lock; sleep 30"], cwd=lock.parent, start_new_session=True)
    try:
        messages: list[str] = []
        start = time.monotonic()
        out = xl.check_extension_locks(tmp_path, grace_s=0, poll_s=0.1, report_every_s=0.5, max_wait_s=30,
                                       log=messages.append)
        assert out == {str(lock): "released"}
        assert time.monotonic() - start < 15
        assert any("waiting" in m and str(build.pid) in m for m in messages), messages
    finally:
        os.killpg(build.pid, signal.SIGKILL)
        build.wait(timeout=10)


def test_the_wait_for_a_running_build_is_bounded(tmp_path):
    lock = _old_lock(tmp_path, age_s=0)
    build = subprocess.Popen(["sleep", "60"], cwd=lock.parent, start_new_session=True)
    try:
        start = time.monotonic()
        with pytest.raises(xl.StaleExtensionLockError, match="waited"):
            xl.check_extension_locks(tmp_path, grace_s=0, poll_s=0.1, max_wait_s=1.5, log=lambda m: None)
        assert time.monotonic() - start < 10
        assert lock.exists()  # a live build's lock is never removed
    finally:
        build.kill()
        build.wait(timeout=10)


def test_a_build_killed_with_kill_9_no_longer_blocks_torch(tmp_path):
    """The reported hang: torch's FileBaton taken by a process that is then SIGKILLed."""
    op = tmp_path / "deepspeed_shm_comm"
    op.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from torch.utils.file_baton import FileBaton
        assert FileBaton({str(op / 'lock')!r}).try_acquire()
        print("held", flush=True)
        time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
    finally:
        holder.kill()
        holder.wait(timeout=10)
    from torch.utils.file_baton import FileBaton

    assert not FileBaton(str(op / "lock")).try_acquire()  # what every later training hit, forever
    xl.check_extension_locks(tmp_path, grace_s=0, remove_stale=True, log=lambda m: None)
    assert FileBaton(str(op / "lock")).try_acquire()


@pytest.mark.parametrize("entry,ranks", [("before_deepspeed_build", 2), ("udpdiff.train.init_distributed", 1)])
def test_a_cpu_run_builds_no_deepspeed_op(tmp_path, entry, ranks):
    """The CPU path compiles nothing (ZeRO-2 with torch's AdamW; the shm comm op serves only
    DeepSpeed inference): no lock to go stale, no build time. Two ranks initialise and all-reduce
    over gloo without it; one process goes through the process-group setup that training and
    benchmarks/bench_gpu.py call (which once built the shm op, 25-30 s of every CI run)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    calls = {
        "before_deepspeed_build": f"""
            os.environ.update(LOCAL_RANK=os.environ["RANK"], MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}")
            from udpdiff.extensions_lock import before_deepspeed_build
            before_deepspeed_build()
            import deepspeed
            import torch
            deepspeed.init_distributed(dist_backend="gloo")
            x = torch.ones(3)
            deepspeed.comm.all_reduce(x)
            assert x.tolist() == [{ranks}.0] * 3, x
            # as udpdiff.distributed does at the end: a gloo rank that exits with its group alive can
            # abort in the group's threads ("terminate called without an active exception", CI once)
            torch.distributed.destroy_process_group()
            """,
        "udpdiff.train.init_distributed": """
            import torch
            from udpdiff.train import init_distributed
            init_distributed(torch.device("cpu"))
            """,
    }
    script = textwrap.dedent("import os\n") + textwrap.dedent(calls[entry]) + "print('ok')\n"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "DS_ACCELERATOR": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", script], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**env, "RANK": str(r), "WORLD_SIZE": str(ranks)} if ranks > 1 else env)
             for r in range(ranks)]
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err[-3000:]
            assert "ok" in out
    finally:  # a rank that failed leaves its peer waiting in init_distributed
        for proc in procs:
            proc.kill()
    built = list((tmp_path / "ext").glob("*")) if (tmp_path / "ext").exists() else []
    assert built == [], f"DeepSpeed built {built}"
