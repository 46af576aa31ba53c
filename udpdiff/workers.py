"""Per-clip work spread over this machine's cores: ``concurrent.futures`` worker processes, in order
(``map_clips``), or reading ahead while a GPU consumes (``read_ahead``).

The data and encode stages render or encode thousands of independent clips (the ``small`` profile:
2,000, about 0.1 s each), which one core would take minutes over. Each item's result depends on the
item alone (per-clip seeds), so a pool gives the same bytes as the plain loop; a small job (``tiny``)
stays in this process. Workers are *spawned*, not forked: a fork of a process holding torch's
thread pools can deadlock. Curation shards go to Dask instead (flows/curation.py): they need
GPUs, retries and a cluster; this does not.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
R = TypeVar("R")

ITEMS_PER_WORKER = 32  # below this a worker's start (imports: about a second) costs more than it saves


def available_cores() -> int:
    """The cores this process may run on (its affinity, as taskset or a container limit it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_count(num_items: int, workers: int | None = None) -> int:
    """How many processes share ``num_items``: ``workers`` if given, else one per core, but no more
    than one per :data:`ITEMS_PER_WORKER` items (and at least one)."""
    if workers is not None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        return workers
    return max(1, min(available_cores(), num_items // ITEMS_PER_WORKER))


def map_clips(fn: Callable[[T], R], items: Sequence[T], desc: str, workers: int | None = None) -> list[R]:
    """``[fn(item) for item in items]`` with a progress bar, on :func:`worker_count` processes.

    ``fn`` must be a module-level function (it is pickled by name) whose result depends on its item
    alone. A worker's exception is raised here, with its traceback, once the items before it are done.
    """
    n = worker_count(len(items), workers)
    return list(tqdm(read_ahead(fn, items, n), total=len(items), desc=desc if n == 1 else f"{desc} ({n} processes)",
                     unit="clip", disable=None))


def read_ahead(fn: Callable[[T], R], items: Sequence[T], workers: int | None = None, ahead: int | None = None
               ) -> Iterator[R]:
    """``fn(item) for item in items``, in order, with up to ``ahead`` items read in advance by
    :func:`worker_count` spawned processes: the reads of the next clips overlap the GPU work on
    this one (the latents stage read 2,000 clips at 9/s one at a time). Memory stays bounded by
    ``ahead`` items, whatever the dataset's size. Processes, not threads: ``np.load`` parses
    headers with ``ast.literal_eval``, which CPython 3.11 does not make thread-safe
    ("AST constructor recursion depth mismatch"). ``fn`` must pickle (a module-level function or
    a ``functools.partial`` of one)."""
    n = worker_count(len(items), workers)
    if n == 1:
        yield from map(fn, items)
        return
    ahead = ahead or 4 * n
    source = iter(items)
    with ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = deque(pool.submit(fn, item) for _, item in zip(range(ahead), source, strict=False))
        while pending:
            result = pending.popleft().result()
            for item in source:  # one more in flight for the one handed out
                pending.append(pool.submit(fn, item))
                break
            yield result
