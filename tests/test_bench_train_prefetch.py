"""benchmarks/bench_train_prefetch.py: the training step timed with the batch prefetch on and off."""

import json

import pytest

from benchmarks.bench_train_prefetch import main, measure
from tests.conftest import TRAIN_CLIPS, random_latent_cache, tiny_train_params


@pytest.mark.slow
def test_alternating_runs_report_both_modes_and_identical_losses(tmp_path):
    from udpdiff.models.scheduler import build_scheduler

    p = tiny_train_params(tmp_path, steps=6, log_every=2)
    latents = random_latent_cache(tmp_path)
    out = tmp_path / "prefetch.json"
    result = measure(p, latents, TRAIN_CLIPS, repeats=2, skip=2, out=out, scaling_factor=1.0, vae_scale_spatial=4,
                     scheduler=build_scheduler(p.active.scheduler.model_dump()))
    assert [r["prefetch"] for r in result["runs"]] == [True, False, False, True]  # drift falls on both alike
    for run in result["runs"]:
        assert len(run["windows"]) == 2                        # steps 4 and 6: the window ending at 2 is skipped
        assert len(run["losses"]) == 6 and run["seconds_per_step"] > 0
    s = result["summary"]
    assert s["on"]["runs"] == [result["runs"][0]["seconds_per_step"], result["runs"][3]["seconds_per_step"]]
    assert s["loss_max_abs_diff"] == 0.0                       # the same batches: the same computation
    assert s["saving_pct"] == pytest.approx(100 * (1 - s["on"]["seconds_per_step"] / s["off"]["seconds_per_step"]))
    assert json.loads(out.read_text())["summary"] == json.loads(json.dumps(s))  # written after the last run
    assert result["deepspeed_config"] == p.active.train.deepspeed_config      # named, for runs under other ZeRO stages
    md = out.with_suffix(".md").read_text()
    assert "Saving:" in md and f"`{p.active.train.deepspeed_config}`" in md


def test_a_root_without_latents_is_refused_with_its_path(tmp_path):
    with pytest.raises(SystemExit, match=f"{tmp_path}.*no latent cache"):
        main(["--root", str(tmp_path), "--profile", "tiny"])


def test_a_skip_past_every_window_is_refused(tmp_path):
    from udpdiff.models.scheduler import build_scheduler

    p = tiny_train_params(tmp_path, steps=2, log_every=2)
    with pytest.raises(SystemExit, match="no timing window after step 2"):
        measure(p, random_latent_cache(tmp_path), TRAIN_CLIPS, repeats=1, skip=2, out=None, scaling_factor=1.0,
                vae_scale_spatial=4, scheduler=build_scheduler(p.active.scheduler.model_dump()))


@pytest.mark.slow
def test_one_mode_runs_repeat_it_and_the_profiled_run_writes_where_the_step_goes(tmp_path):
    from benchmarks.bench_train_prefetch import profiled_run
    from udpdiff.models.scheduler import build_scheduler

    p = tiny_train_params(tmp_path, steps=6, log_every=2)
    latents = random_latent_cache(tmp_path)
    kw = {"scaling_factor": 1.0, "vae_scale_spatial": 4, "scheduler": build_scheduler(p.active.scheduler.model_dump())}
    result = measure(p, latents, TRAIN_CLIPS, repeats=2, skip=2, out=None, modes=(True,), **kw)
    assert [r["prefetch"] for r in result["runs"]] == [True, True] and "off" not in result["summary"]
    out = tmp_path / "profile.json"
    (tmp_path / "work").mkdir()
    r = profiled_run(p, latents, TRAIN_CLIPS, tmp_path / "work", skip=2, active=3, out=out, **kw)
    assert json.loads(out.read_text()) == r and r["active_steps"] == 3
    assert r["wall_ms_per_step"] > 0 and r["device_ms_per_step"] == 0 and r["gpu_busy"] == 0  # the CPU: no device
    ops = [o["op"] for o in r["top_cpu"]]
    assert "aten::mm" in ops or "aten::addmm" in ops   # the model's matmuls were recorded
    assert out.with_suffix(".trace.json.gz").stat().st_size > 0 and "GPU busy" in out.with_suffix(".md").read_text()
