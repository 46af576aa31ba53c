"""Inference time (paper Tab 4): seconds per sample and per denoising step.

The paper times 50-step, 49-frame generation of the stock CogVideoX 5B beside UDPDiff on one A100.
:func:`time_calls` times any generation callable the same way: one untimed warm-up call (CUDA
context, kernel autotuning, allocator growth), then ``trials`` timed calls with the device
synchronised before and after each, reporting the median. The sample stage applies it to the stock
pipeline and to ours with the same prompt, seed, size and steps.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(trials):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"seconds_per_sample": median, "seconds_per_step": median / steps, "trials": float(trials)}
