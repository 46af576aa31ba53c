"""Inference time (paper Tab 4): seconds per sample and per denoising step.

The paper times 50-step, 49-frame generation of the stock CogVideoX 5B beside UDPDiff on one A100.
:func:`time_calls` times any generation callable the same way: one untimed warm-up call (CUDA
context, kernel autotuning, allocator growth), then ``trials`` timed calls with the device
synchronised before and after each, reporting the median. The sample stage applies it to the stock
pipeline and to ours with the same prompt, seed, size and steps.

:func:`measure_calls` is the one timer of the project (the benchmarks use it too): the clock and the
statistics are ``torch.utils.benchmark``'s, the loop is ours because ``Timer.timeit`` adds hidden
warm-up calls and ``blocked_autorange`` chooses the call count itself, which a 60-second sample or
a training step cannot afford.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch.utils.benchmark import Measurement, TaskSpec
from torch.utils.benchmark import timer as synchronized_clock  # waits for the accelerator before reading

logger = logging.getLogger(__name__)


def measure_calls(fn: Callable[[], object], repeats: int, warmup: int = 1, *, label: str = "",
                  before_timed: Callable[[], object] | None = None, progress: bool = False) -> Measurement:
    """``warmup`` untimed calls of ``fn``, then ``repeats`` timed ones, each between two reads of a clock
    that synchronises the accelerator first (host work and device work are both counted).

    ``before_timed`` runs once between the warm-up and the timed calls (e.g. to reset peak-memory
    statistics). Returns a ``torch.utils.benchmark.Measurement``: ``.times``, ``.median``, ``.iqr``,
    printable beside other measurements with ``torch.utils.benchmark.Compare``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    name = label or getattr(fn, "__qualname__", type(fn).__name__)
    for i in range(warmup):
        start = synchronized_clock()
        fn()
        if progress:
            logger.info("%s: warm-up %d/%d %.3f s", name, i + 1, warmup, synchronized_clock() - start)
    if before_timed is not None:
        before_timed()
    times = []
    for _ in range(repeats):
        start = synchronized_clock()
        fn()
        times.append(synchronized_clock() - start)
        if progress:
            logger.info("%s: call %d/%d %.3f s", name, len(times), repeats, times[-1])
    return Measurement(number_per_run=1, raw_times=times, task_spec=TaskSpec(stmt=name, setup="", label=name))


def time_calls(fn: Callable[[], object], trials: int, steps: int, warmup: int = 1) -> dict[str, float]:
    """Median wall-clock seconds of ``fn()`` over ``trials`` calls after ``warmup`` untimed ones.

    Returns ``{"seconds_per_sample", "seconds_per_step", "trials"}``; ``seconds_per_step`` divides by
    ``steps`` (the denoising steps of one call), so it includes the per-sample overheads (text
    encoding, VAE decoding) spread over the steps, as a per-step figure of a full sample does.
    """
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    median = measure_calls(fn, trials, warmup).median
    return {"seconds_per_sample": median, "seconds_per_step": median / steps, "trials": float(trials)}
