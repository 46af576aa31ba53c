"""The project's one timer (udpdiff.evaluation.runtime): call order, counts and the clock's readings."""

import statistics
import time

import pytest

from udpdiff.evaluation.runtime import measure_calls, time_calls


def test_measure_calls_warms_up_then_times_each_call_after_the_hook():
    events: list[str] = []
    naps = iter([0.0, 0.0, 0.01, 0.03, 0.02])  # two warm-ups, then three timed calls of known length

    def fn() -> None:
        nap = next(naps)
        events.append(f"call {nap}")
        time.sleep(nap)

    m = measure_calls(fn, repeats=3, warmup=2, label="nap", before_timed=lambda: events.append("hook"))
    assert events == ["call 0.0", "call 0.0", "hook", "call 0.01", "call 0.03", "call 0.02"]
    assert len(m.times) == 3
    for measured, slept in zip(m.times, (0.01, 0.03, 0.02), strict=True):
        assert slept <= measured < slept + 0.5  # the clock brackets the call, not the loop
    assert m.median == pytest.approx(statistics.median(m.times))
    assert m.times[1] > m.times[0] and m.task_spec.label == "nap"


def test_time_calls_spreads_a_sample_over_its_steps():
    r = time_calls(lambda: time.sleep(0.02), trials=2, steps=4)
    assert r["trials"] == 2.0
    assert r["seconds_per_sample"] >= 0.02
    assert r["seconds_per_step"] == pytest.approx(r["seconds_per_sample"] / 4)


@pytest.mark.parametrize("kwargs, match", [({"repeats": 0}, "repeats"), ({"repeats": 1, "warmup": -1}, "warmup")])
def test_measure_calls_refuses_bad_counts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        measure_calls(lambda: None, **kwargs)
