"""Guard against DeepSpeed's JIT op builds hanging forever on a stale lock.

DeepSpeed compiles some ops on first use with ``torch.utils.cpp_extension.load``: on a CPU-only
machine its shared-memory communication op (``deepspeed_shm_comm``, built by
``deepspeed.init_distributed``) and, for the ``*-offload`` configs, CPU Adam (``cpu_adam``).
Each build folder (``$TORCH_EXTENSIONS_DIR/<op>`` or ``~/.cache/torch_extensions/py311_cpu/<op>``)
gets a ``lock`` file (torch's ``FileBaton``: no pid inside) for as long as the build runs, and every
later load of the op (even a cached one) takes it. A process killed with ``kill -9`` mid-build leaves
the file behind, and every later training then waits on it forever, silently.

``before_deepspeed_build`` runs before DeepSpeed may build anything:

1. No CPU run here needs the shared-memory op: it backs only DeepSpeed inference's
   ``inference_all_reduce``, while training's collectives go through ``torch.distributed``.
   DeepSpeed is told it is unavailable, so a CPU run on any number of ranks compiles nothing for
   it (the tiny pipeline compiles nothing at all: zero2 uses ``torch.optim.AdamW``).
2. Every ``lock`` in the build root is checked. While a build is running on this host (a process,
   ninja or the compiler, works in that folder) we wait for it, bounded, reporting progress. A lock
   with no build process behind it that is older than ``grace_s`` is stale: the baton only exists
   while ``ninja`` runs in that folder, so nobody will ever release it. We remove it and log that
   (the next load rebuilds whatever the killed build left unfinished: ninja's log has no entry for
   an interrupted command). We remove rather than raise because the remedy is always the same
   ``rm`` and a killed training should just resume on the next ``dvc repro``. On several nodes
   sharing the folder a build on another node is invisible from here, so there (or with
   ``remove_stale=False``) a stale-looking lock raises ``StaleExtensionLockError`` naming the file
   and the command that removes it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

SHM_OP = "deepspeed_shm_comm"


class StaleExtensionLockError(RuntimeError):
    """A torch extension build lock that nobody will release (or a build that takes too long)."""


def extensions_root() -> Path:
    """Where torch builds JIT extensions for this interpreter and torch build (as
    ``torch.utils.cpp_extension._get_build_directory`` decides, without creating anything)."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accel = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accel = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accel = "cpu"
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{py}_{accel}"


def find_locks(root: Path) -> list[Path]:
    """``<root>/<op>/lock`` files (a missing root has none)."""
    try:
        return sorted(p for p in Path(root).glob("*/lock") if p.is_file())
    except OSError:
        return []


def build_processes(folder: Path) -> list[int] | None:
    """Pids of processes on this host working in ``folder`` (ninja and the compiler run there), or
    None where that cannot be seen (no /proc)."""
    proc = Path("/proc")
    if not (proc / "self" / "cwd").exists():
        return None
    folder = str(Path(folder).resolve())
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:  # gone, or not ours to look at
            continue
        if cwd == folder or cwd.startswith(folder + os.sep):
            pids.append(int(entry.name))
    return pids


def _age(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


def _rm_hint(lock: Path) -> str:
    return (f"If no training or other DeepSpeed/torch extension build is running (on any machine sharing "
            f"{lock.parent.parent}), it was left by a killed build: remove it with  rm {lock}")


def wait_for_lock(lock: Path, *, grace_s: float = 120.0, max_wait_s: float = 1800.0, poll_s: float = 2.0,
                  report_every_s: float = 30.0, remove_stale: bool = True,
                  log: Callable[[str], None] | None = None) -> str:
    """Resolve one lock file: ``"released"`` (its build finished while we waited), ``"removed"``
    (stale, deleted) or raises ``StaleExtensionLockError``. Never waits longer than ``max_wait_s``."""
    log = log or logger.warning
    start = time.monotonic()
    last_report = -report_every_s
    op = lock.parent.name
    while True:
        age = _age(lock)
        if age is None:
            return "released"
        waited = time.monotonic() - start
        builders = build_processes(lock.parent)
        if builders:
            what = f"a build of the torch extension {op} is running (pids {builders[:5]}) and holds {lock}"
        elif age < grace_s:
            what = f"{lock} is {age:.0f} s old with no build process here yet (another node, or one starting)"
        else:
            why = (f"{lock} is {age / 60:.1f} min old and no process on this host is building in {lock.parent}"
                   if builders is not None else
                   f"{lock} is {age / 60:.1f} min old (processes cannot be inspected here)")
            if remove_stale and builders is not None:
                try:
                    lock.unlink()
                except FileNotFoundError:
                    return "released"
                log(f"removed a stale torch extension build lock: {why}; it was left by a killed build "
                    f"(kill -9 during DeepSpeed's first build of {op}); the op is rebuilt if needed")
                return "removed"
            raise StaleExtensionLockError(f"stale torch extension build lock: {why}. Every DeepSpeed run would "
                                          f"wait on it forever. {_rm_hint(lock)}")
        if waited > max_wait_s:
            raise StaleExtensionLockError(f"waited {waited:.0f} s for {lock}: {what}. {_rm_hint(lock)}")
        if waited - last_report >= report_every_s:
            log(f"waiting for the DeepSpeed op build lock ({waited:.0f} s so far, at most {max_wait_s:.0f} s): {what}")
            last_report = waited
        time.sleep(poll_s)


def check_extension_locks(root: Path | None = None, *, remove_stale: bool | None = None,
                          log: Callable[[str], None] | None = None, **wait_kw) -> dict[str, str]:
    """Resolve every build lock under the extensions root (``extensions_root()`` by default); returns
    ``{lock path: "released" | "removed"}``. ``remove_stale`` defaults to True on one node, False on
    several (another node's build would be invisible from here)."""
    root = Path(root) if root is not None else extensions_root()
    if remove_stale is None:
        remove_stale = not _several_nodes()
    return {str(lock): wait_for_lock(lock, remove_stale=remove_stale, log=log, **wait_kw) for lock in find_locks(root)}


def _several_nodes() -> bool:
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", str(world))))
    except ValueError:
        return False
    return world > local


def skip_shm_op_on_cpu() -> bool:
    """Tell DeepSpeed its shared-memory comm op is unavailable on the CPU accelerator, so
    ``deepspeed.init_distributed`` does not compile it (~30 s on 2 cores, once per machine). The op
    serves one collective, ``inference_all_reduce`` (DeepSpeed inference's tensor-parallel layers),
    which nothing here calls: training's and sharded sampling's collectives go through
    ``torch.distributed`` (gloo) whatever the rank count. Returns whether it was skipped."""
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cpu":
            return False
        compatible = deepspeed.ops.__compatible_ops__  # probed lazily by DeepSpeed; a plain dict
        if compatible.get(SHM_OP):
            compatible[SHM_OP] = False
            logger.info("CPU: DeepSpeed's shared-memory comm op serves only inference_all_reduce; not building it")
        return True
    except Exception as err:  # an older/newer DeepSpeed layout: the lock check below still protects
        logger.debug("could not skip DeepSpeed's shm op build: %s", err)
        return False


def before_deepspeed_build(**kw) -> dict[str, str]:
    """Call before ``deepspeed.init_distributed``/``deepspeed.initialize``: skips the build a CPU run
    does not need, then clears stale build locks (waits, bounded, for live builds)."""
    skip_shm_op_on_cpu()
    return check_extension_locks(**kw)
