"""The training loop: it learns, resumes exactly after an interruption, and stops cleanly on NaN."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import DEEPSPEED_DIR, TRAIN_CLIPS, random_latent_cache, tiny_train_params, train_tiny
from udpdiff.latents import load_record, record_path, save_record
from udpdiff.models.scheduler import build_scheduler
from udpdiff.train import (
    DeepSpeedConfigError,
    TrainingDivergedError,
    _free_port,
    latest_checkpoint,
    load_deepspeed_config,
    lr_factors,
    make_batch,
    prefetched,
    run_fingerprint,
    zero_stage,
)

REPO = Path(__file__).resolve().parents[1]


def test_batches_are_a_pure_function_of_seed_and_step(tmp_path):
    from udpdiff.latents import LatentDataset

    p = tiny_train_params(tmp_path)
    data = LatentDataset(random_latent_cache(tmp_path), TRAIN_CLIPS)
    alphas = build_scheduler({"type": "ddim"}).alphas_cumprod
    a = make_batch(data, p, step=3, micro=0, scaling_factor=1.0, alphas_cumprod=alphas)
    b = make_batch(data, p, step=3, micro=0, scaling_factor=1.0, alphas_cumprod=alphas)
    c = make_batch(data, p, step=4, micro=0, scaling_factor=1.0, alphas_cumprod=alphas)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["noisy"], c["noisy"])
    assert a["noisy"].shape == (2, 3, 32, 4, 4)  # (B, F, RGB 16 + dense 16, h, w)
    # v target consistent with the noisy input: x_t = sqrt(a) x0 + sqrt(1-a) eps, v = sqrt(a) eps - sqrt(1-a) x0
    assert a["v_target"].shape == a["noisy"].shape


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
def test_lr_schedule_is_diffusers_one_update_on(tmp_path, name):
    from diffusers.optimization import get_scheduler

    p = tiny_train_params(tmp_path, steps=50, warmup_steps=10, lr_schedule=name).active.train
    factors = [lr_factors(p)(s) for s in range(p.steps)]
    # diffusers' scheduler, stepped as training steps it: update s runs at its factor for step s + 1
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    ref = get_scheduler(name if name != "constant" else "constant_with_warmup", opt, num_warmup_steps=10,
                        num_training_steps=51)
    expected = []
    for _ in range(p.steps):
        opt.step()
        ref.step()
        expected.append(ref.get_last_lr()[0])
    assert factors == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # linear warmup from 1/10 (the first update moves) to 1 at update 9
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    if name == "constant":  # what training always used before the option: tiny's runs are unchanged
        assert factors == [min(1.0, (s + 1) / 10) for s in range(p.steps)]
    else:  # a decay to (almost) 0 at the last update, never negative, never rising
        assert all(a >= b for a, b in zip(factors[9:], factors[10:], strict=False))
        assert 0 < factors[-1] < 0.03


def test_prefetched_batches_come_in_order_from_a_worker_and_errors_reach_the_loop():
    import threading

    made = []

    def make(step, micro):
        made.append(threading.get_ident())
        if (step, micro) == (4, 1):
            raise ValueError("clip 7: unreadable")
        return {"key": (step, micro)}

    keys = [(s, m) for s in range(2, 4) for m in range(2)]
    assert [b["key"] for b in prefetched(make, range(2, 4), 2, ahead=False)] == keys
    assert set(made) == {threading.get_ident()}
    made.clear()
    ready = []
    batches = prefetched(make, range(2, 5), 2, ahead=2, worker_init=lambda: ready.append(threading.get_ident()))
    assert [next(batches)["key"] for _ in keys] == keys   # in order, though two workers build them
    # built by the workers, each set up once (a worker may be set up and not yet have taken a batch)
    assert made and threading.get_ident() not in made and set(made) <= set(ready)
    assert len(ready) == len(set(ready)) <= 2
    assert next(batches)["key"] == (4, 0)
    with pytest.raises(ValueError, match="clip 7"):   # the worker's error, raised where the batch is taken
        next(batches)
    assert list(prefetched(make, range(0), 2, ahead=True)) == []


@pytest.mark.slow
def test_batches_built_ahead_train_exactly_as_batches_built_in_turn(tmp_path):
    """On a GPU each batch is built while the previous one trains; the run is the same computation."""
    p = tiny_train_params(tmp_path, gradient_accumulation_steps=2, rgb_given_prob=0.5)
    latents = random_latent_cache(tmp_path)
    _, in_turn = train_tiny(p, latents, tmp_path / "a", max_steps_this_run=3, prefetch=False)
    _, ahead = train_tiny(p, latents, tmp_path / "b", max_steps_this_run=3, prefetch=True)
    assert [h["loss"] for h in ahead.history] == [h["loss"] for h in in_turn.history]
    assert [h["grad_norm"] for h in ahead.history] == [h["grad_norm"] for h in in_turn.history]


@pytest.mark.slow
def test_interrupted_run_resumes_with_identical_losses(tmp_path):
    # a decaying learning rate: the resumed run must restore the schedule's position, not restart it
    p = tiny_train_params(tmp_path, lr_schedule="cosine")
    latents = random_latent_cache(tmp_path)
    _, full = train_tiny(p, latents, tmp_path / "full")
    assert full.steps_done == 6 and len(full.history) == 6
    # first run "killed" after 3 steps: its last checkpoint is step 2, so step 3 is redone
    _, part = train_tiny(p, latents, tmp_path / "split", max_steps_this_run=3)
    assert part.steps_done == 3
    run_dir = tmp_path / "split" / run_fingerprint(p)
    assert latest_checkpoint(run_dir)[1] == 2
    model, resumed = train_tiny(p, latents, tmp_path / "split")
    assert resumed.resumed_from == 2 and resumed.steps_done == 6
    full_losses = [h["loss"] for h in full.history]
    resumed_losses = [h["loss"] for h in resumed.history]
    assert resumed_losses == pytest.approx(full_losses, rel=1e-5, abs=1e-7)
    lrs = [h["lr"] for h in full.history]
    assert [h["lr"] for h in resumed.history] == pytest.approx(lrs, rel=1e-12)
    assert lrs == pytest.approx([p.active.train.lr * lr_factors(p.active.train)(s) for s in range(6)], rel=1e-12)
    # only the last `keep_last` checkpoints remain
    assert sorted(x.name for x in run_dir.glob("step-*")) == ["step-00000004", "step-00000006"]


@pytest.mark.slow
def test_changed_settings_do_not_resume_from_old_checkpoints(tmp_path):
    latents = random_latent_cache(tmp_path)
    train_tiny(tiny_train_params(tmp_path), latents, tmp_path / "ck", max_steps_this_run=2)
    other = tiny_train_params(tmp_path, lr=5e-4)
    _, result = train_tiny(other, latents, tmp_path / "ck", max_steps_this_run=1)
    assert result.resumed_from == 0
    # ...while a longer run with the same settings does resume
    longer = tiny_train_params(tmp_path, steps=8)
    _, resumed = train_tiny(longer, latents, tmp_path / "ck", max_steps_this_run=1)
    assert resumed.resumed_from == 2 and run_fingerprint(longer) == run_fingerprint(tiny_train_params(tmp_path))
    # ...and the same settings over other data (a changed latent cache) start afresh
    _, other_data = train_tiny(tiny_train_params(tmp_path), latents, tmp_path / "ck", max_steps_this_run=1,
                               data_digest="0" * 64)
    assert other_data.resumed_from == 0


def test_a_checkpoint_that_other_code_wrote_restarts_or_resumes_as_on_code_change_says(tmp_path):
    """DVC reruns the train stage when its code changes. A finished run of the same settings must not
    then hand back the old code's model: by default it is set aside (nothing deleted) and training
    starts again; ``on_code_change: resume`` continues it and names the changed files. A checkpoint
    from before checkpoints recorded their code resumes."""
    latents = random_latent_cache(tmp_path)
    p = tiny_train_params(tmp_path)
    old = {"udpdiff/train.py": "1" * 64, "udpdiff/viz.py": "2" * 64}
    new = {**old, "udpdiff/train.py": "3" * 64}
    _, first = train_tiny(p, latents, tmp_path / "ck", code=old)
    assert json.loads((first.checkpoint / "code.json").read_text()) == old
    _, same = train_tiny(p, latents, tmp_path / "ck", code=old)
    assert (same.resumed_from, same.steps_done, same.code_changed) == (6, 6, [])

    _, resumed = train_tiny(tiny_train_params(tmp_path, on_code_change="resume"), latents, tmp_path / "ck", code=new)
    assert (resumed.resumed_from, resumed.code_changed) == (6, ["udpdiff/train.py"])

    _, fresh = train_tiny(p, latents, tmp_path / "ck", code=new)
    assert (fresh.resumed_from, fresh.steps_done, fresh.code_changed) == (0, 6, [])
    assert fresh.run_dir == first.run_dir
    # the same settings and data train the same model again (the code here did not really change)
    assert [h["loss"] for h in fresh.history] == pytest.approx([h["loss"] for h in first.history], rel=1e-5)
    assert json.loads((fresh.checkpoint / "code.json").read_text()) == new
    aside = sorted((tmp_path / "ck").glob(f"{first.run_dir.name}.code-*"))
    assert len(aside) == 1 and latest_checkpoint(aside[0])[1] == 6
    assert json.loads((aside[0] / "step-00000006" / "code.json").read_text()) == old

    (fresh.checkpoint / "code.json").unlink()  # as written before checkpoints recorded their code
    _, unrecorded = train_tiny(p, latents, tmp_path / "ck", code=old)
    assert (unrecorded.resumed_from, unrecorded.code_changed) == (6, [])


@pytest.mark.slow
def test_training_reduces_the_loss(tmp_path):
    p = tiny_train_params(tmp_path, steps=40, lr=3e-3, checkpoint_every=40, caption_dropout_prob=0.0)
    latents = random_latent_cache(tmp_path)
    _, result = train_tiny(p, latents, tmp_path / "ck")
    first = sum(h["loss"] for h in result.history[:5]) / 5
    last = sum(h["loss"] for h in result.history[-5:]) / 5
    assert last < first * 0.9, (first, last)
    assert {"loss_dense_segmentation", "loss_dense_depth"} & set().union(*result.history)


def test_a_single_process_run_leaves_no_master_port_behind(monkeypatch):
    """The one-rank group's store keeps the port it picked: a subprocess inheriting MASTER_PORT would
    fail with EADDRINUSE (it did, in CI, for the benchmark smoke run after an in-process training
    test). The init itself sees the port; the environment does not keep it. (DeepSpeed's init is
    faked: a real second group in this process would clash with the one other tests keep.)"""
    import deepspeed
    import torch.distributed as dist

    from udpdiff.train import init_distributed

    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: seen.update(port=os.environ.get("MASTER_PORT")))
    monkeypatch.delenv("MASTER_PORT", raising=False)
    init_distributed(torch.device("cpu"))
    assert seen["port"] and int(seen["port"]) > 0 and "MASTER_PORT" not in os.environ
    monkeypatch.setenv("MASTER_PORT", "29999")  # a launcher's port stays as the launcher set it
    init_distributed(torch.device("cpu"))
    assert seen["port"] == "29999" and os.environ["MASTER_PORT"] == "29999"


def test_bf16_training_runs_and_learns(tmp_path):
    """precision: bf16 (both paper profiles): DeepSpeed casts the weights, the loop casts its inputs."""
    p = tiny_train_params(tmp_path, steps=20, lr=3e-3, checkpoint_every=20, caption_dropout_prob=0.0, precision="bf16")
    _, result = train_tiny(p, random_latent_cache(tmp_path), tmp_path / "ck")
    losses = [h["loss"] for h in result.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < sum(losses[:5]), losses


@pytest.mark.slow
def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path):
    p = tiny_train_params(tmp_path)
    latents = random_latent_cache(tmp_path)
    train_tiny(p, latents, tmp_path / "ck", max_steps_this_run=2)
    good = tmp_path / "ck" / run_fingerprint(p) / "step-00000002"
    before = sorted(f.name for f in good.rglob("*"))
    poisoned = load_record(record_path(latents, TRAIN_CLIPS[0]))
    for k in [k for k in poisoned if k.endswith("_mean")]:
        poisoned[k] = torch.full_like(poisoned[k], float("nan"))
    for cid in TRAIN_CLIPS:
        save_record(record_path(latents, cid), {**poisoned, "clip_id": cid})
    with pytest.raises(TrainingDivergedError, match=r"step 3.*step-00000002"):
        train_tiny(p, latents, tmp_path / "ck")
    assert latest_checkpoint(good.parent)[1] == 2
    assert sorted(f.name for f in good.rglob("*")) == before


@pytest.mark.slow
def test_a_non_finite_gradient_behind_a_finite_loss_stops_at_that_step(tmp_path, monkeypatch):
    """bf16 under the shipped ZeRO-2 JSON, whose DeepSpeed overflow check is off (it cost a third of a
    `small` step): a non-finite gradient is not skipped silently, nor trained on from there; the run
    stops at that step and keeps its last good checkpoint."""
    import udpdiff.train as train_module

    p = tiny_train_params(tmp_path, precision="bf16")
    latents = random_latent_cache(tmp_path)
    train_tiny(p, latents, tmp_path / "ck", max_steps_this_run=2)
    good = tmp_path / "ck" / run_fingerprint(p) / "step-00000002"
    before = sorted(f.name for f in good.rglob("*"))
    real_load = train_module.load_transformer

    def load_with_a_poisoned_gradient(*args, **kwargs):  # the first backward of the resumed run: step 3
        model = real_load(*args, **kwargs)
        next(model.parameters()).register_hook(lambda g: torch.full_like(g, float("inf")))
        return model

    monkeypatch.setattr(train_module, "load_transformer", load_with_a_poisoned_gradient)
    with pytest.raises(TrainingDivergedError, match=r"gradient norm is (inf|nan) at step 3 .*step-00000002"):
        train_tiny(p, latents, tmp_path / "ck")
    assert latest_checkpoint(good.parent)[1] == 2
    assert sorted(f.name for f in good.rglob("*")) == before


# -- DeepSpeed configs and distributed training ------------------------------------------------------
DS_CONFIGS = sorted((REPO / "infra" / "deepspeed").glob("*.json"))


def _autos(node) -> list:
    if isinstance(node, dict):
        return [a for v in node.values() for a in _autos(v)]
    return ["auto"] if node == "auto" else []


@pytest.mark.parametrize("path", DS_CONFIGS, ids=[p.name for p in DS_CONFIGS])
def test_shipped_deepspeed_configs_take_their_values_from_params(tmp_path, path):
    p = tiny_train_params(tmp_path, precision="bf16", micro_batch_size=3, gradient_accumulation_steps=2,
                          max_grad_norm=0.5)
    cfg = load_deepspeed_config(path, p, world_size=4)
    assert _autos(cfg) == []
    assert cfg["train_micro_batch_size_per_gpu"] == 3 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert zero_stage(cfg) == int(path.name[len("zero")])  # zeroN...json is stage N
    if "optimizer" in cfg:
        assert cfg["optimizer"]["params"]["lr"] == p.active.train.lr


def test_deepspeed_config_errors_name_the_file_and_the_problem(tmp_path):
    p = tiny_train_params(tmp_path)
    with pytest.raises(DeepSpeedConfigError, match=r"nope\.json: DeepSpeed config not found"):
        load_deepspeed_config(tmp_path / "nope.json", p)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DeepSpeedConfigError, match=r"bad\.json: not valid JSON"):
        load_deepspeed_config(bad, p)
    clash = tmp_path / "clash.json"
    clash.write_text(json.dumps({"train_micro_batch_size_per_gpu": 7, "zero_optimization": {"stage": 2}}))
    with pytest.raises(DeepSpeedConfigError, match=r"clash\.json: train_micro_batch_size_per_gpu is 7 but params"):
        load_deepspeed_config(clash, p)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero3.json", "zero2-offload.json"])
def test_zero3_and_offload_train_the_same_model_as_zero2(tmp_path, name, monkeypatch):
    # a ZeRO-3 engine leaves its own linear in torch.nn.functional: put the original back afterwards
    monkeypatch.setattr(torch.nn.functional, "linear", torch.nn.functional.linear)
    p = tiny_train_params(tmp_path)
    latents = random_latent_cache(tmp_path)
    ref_model, ref = train_tiny(p, latents, tmp_path / "zero2",
                                ds_config=load_deepspeed_config(DEEPSPEED_DIR / "zero2.json", p))
    cfg = load_deepspeed_config(DEEPSPEED_DIR / name, p)
    model, result = train_tiny(p, latents, tmp_path / name, ds_config=cfg)
    assert [h["loss"] for h in result.history] == pytest.approx([h["loss"] for h in ref.history], rel=1e-5)
    # the returned module holds full weights (ZeRO-3's shards gathered), equal to ZeRO-2's
    ours, theirs = model.state_dict(), ref_model.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        if k.endswith("norm_k.bias"):
            # softmax is blind to a bias shared by all keys: its gradient is 0 up to rounding
            # noise, which Adam scales up to lr-sized steps that differ between ZeRO stages
            continue
        assert torch.allclose(ours[k], theirs[k], atol=1e-5), k
    if name == "zero3.json":  # and a killed ZeRO-3 run resumes exactly
        train_tiny(p, latents, tmp_path / "z3split", ds_config=cfg, max_steps_this_run=3)
        _, resumed = train_tiny(p, latents, tmp_path / "z3split", ds_config=cfg)
        assert resumed.resumed_from == 2
        assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in ref.history], rel=1e-5)


def test_selective_checkpointing_is_refused_under_zero3(tmp_path):
    p = tiny_train_params(tmp_path, gradient_checkpointing="selective")
    with pytest.raises(DeepSpeedConfigError, match="ZeRO stage 3 with train.gradient_checkpointing: selective"):
        train_tiny(p, random_latent_cache(tmp_path), tmp_path / "ck",
                   ds_config=load_deepspeed_config(DEEPSPEED_DIR / "zero3.json", p))


def _torchrun(work: Path, out: Path, nproc: int, *extra: str) -> dict:
    import subprocess
    import sys

    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun) if torchrun.exists() else shutil.which("torchrun"), "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()), str(REPO / "tests" / "dist_worker.py"), str(work), str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="with CUDA each rank takes its own GPU: needs 2")
def test_two_ranks_equal_one_rank_with_double_accumulation_and_resume_exactly(tmp_path):
    two = tmp_path / "two"
    two.mkdir()
    p2 = tiny_train_params(two)
    random_latent_cache(two)
    full = _torchrun(two, two / "full.json", 2)
    assert full["world"] == 2 and full["steps_done"] == 6
    # the ranks split each step's global batch: read rank after rank, step after step, they walk
    # each epoch's permutation once (6 clips, global batch 2 ranks x 2)
    walked = [i for step in range(3) for rank in range(2) for i in full["clips"][rank][step]]
    assert sorted(walked[:6]) == sorted(walked[6:12]) == list(range(6)), walked
    # the same computation as one rank accumulating two micro-batches
    one = tmp_path / "one"
    one.mkdir()
    p1 = tiny_train_params(one, gradient_accumulation_steps=2)
    _, ref = train_tiny(p1, random_latent_cache(one), one / "ck")
    assert full["losses"] == pytest.approx([h["loss"] for h in ref.history], rel=1e-4)
    # a two-rank run killed after 3 steps resumes from its step-2 checkpoint with the same losses
    shutil.rmtree(two / "ck")
    _torchrun(two, two / "part.json", 2, "3")
    resumed = _torchrun(two, two / "resumed.json", 2)
    assert resumed["resumed_from"] == 2 and resumed["losses"] == pytest.approx(full["losses"], rel=1e-5)
    assert p2.active.train.steps == 6


def _bf16_8bit(tmp_path: Path, **overrides):
    """tiny with 8-bit AdamW states updating the bf16 weights themselves (no fp32 copy)."""
    return tiny_train_params(tmp_path, optimizer="adamw8bit", master_weights="bf16", precision="bf16",
                             deepspeed_config=str(DEEPSPEED_DIR / "zero0.json"), **overrides)


@pytest.mark.slow
def test_8bit_states_on_bf16_weights_train_and_resume_exactly(tmp_path):
    """train.optimizer: adamw8bit with master_weights: bf16: the module is bf16, the checkpoints hold
    8-bit moments, the gradient norm is reported, and a killed run resumes bit for bit (stochastic
    rounding is seeded per update)."""
    p = _bf16_8bit(tmp_path, lr_schedule="cosine")
    latents = random_latent_cache(tmp_path)
    model, full = train_tiny(p, latents, tmp_path / "full")
    assert {q.dtype for q in model.parameters()} == {torch.bfloat16}
    assert all(math.isfinite(h["grad_norm"]) and h["grad_norm"] > 0 for h in full.history)
    saved = torch.load(next((full.run_dir / "step-00000006").glob("*model_states.pt")), weights_only=False)
    moments = [s["exp_avg"] for s in saved["optimizer"]["state"].values()]
    quantised = [m for m in moments if isinstance(m, dict)]
    assert quantised and all(m["tensors"]["codes"].dtype == torch.uint8 for m in quantised)
    # the big matrices are the 8-bit ones (torchao keeps tensors under 4,096 elements in full precision)
    assert sum(m["tensors"]["codes"].numel() for m in quantised) > 0.9 * sum(q.numel() for q in model.parameters())
    _, part = train_tiny(p, latents, tmp_path / "split", max_steps_this_run=3)
    resumed_model, resumed = train_tiny(p, latents, tmp_path / "split")
    assert resumed.resumed_from == 2
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for (name, a), b in zip(model.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="with CUDA each rank takes its own GPU: needs 2")
def test_8bit_bf16_ranks_keep_identical_weights(tmp_path):
    """Under ZeRO-0 every rank updates its own copy of the weights from its own batches: the gradients
    must be averaged over ranks and the stochastic rounding drawn alike, or the copies drift apart."""
    _bf16_8bit(tmp_path)
    random_latent_cache(tmp_path)
    out = _torchrun(tmp_path, tmp_path / "run.json", 2)
    assert out["world"] == 2 and out["steps_done"] == 6
    assert len(set(out["weights_sha256"])) == 1, out["weights_sha256"]


def test_bf16_weights_need_the_8bit_optimizer_and_zero_0(tmp_path):
    with pytest.raises(ValueError, match="master_weights: bf16 needs precision: bf16 and optimizer: adamw8bit"):
        tiny_train_params(tmp_path, master_weights="bf16", precision="bf16")
    with pytest.raises(ValueError, match="master_weights: bf16 needs"):
        tiny_train_params(tmp_path, master_weights="bf16", optimizer="adamw8bit")
    p = _bf16_8bit(tmp_path)
    with pytest.raises(ValueError, match="adamw8bit with precision bf16 needs master_weights: bf16"):
        tiny_train_params(tmp_path, optimizer="adamw8bit", precision="bf16")
    p = _bf16_8bit(tmp_path)
    with pytest.raises(DeepSpeedConfigError, match=r"zero2\.json: ZeRO stage 2 keeps flat fp32 copies"):
        load_deepspeed_config(DEEPSPEED_DIR / "zero2.json", p)
    cfg = load_deepspeed_config(DEEPSPEED_DIR / "zero0.json", p)
    assert cfg["bf16"]["enabled"] is False and zero_stage(cfg) == 0  # DeepSpeed's bf16 mode would add fp32 master
    mixed = tiny_train_params(tmp_path, precision="bf16")
    assert load_deepspeed_config(DEEPSPEED_DIR / "zero0.json", mixed)["bf16"]["enabled"] is True
    eight = tiny_train_params(tmp_path, optimizer="adamw8bit")  # fp32 weights, 8-bit moments
    with pytest.raises(DeepSpeedConfigError, match="zero2-offload.json: ZeRO stage 2"):
        load_deepspeed_config(DEEPSPEED_DIR / "zero2-offload.json", eight)
    named = {**json.loads((DEEPSPEED_DIR / "zero0.json").read_text()), "optimizer": {"type": "AdamW"}}
    (tmp_path / "named.json").write_text(json.dumps(named))
    with pytest.raises(DeepSpeedConfigError, match="named.json: names DeepSpeed's optimizer"):
        load_deepspeed_config(tmp_path / "named.json", eight)
    assert run_fingerprint(tiny_train_params(tmp_path)) != run_fingerprint(eight)  # never resumes the other's


@pytest.mark.slow
def test_fixed_draw_loss_is_the_training_loss_of_those_draws(tmp_path):
    """``fixed_draw_loss`` on the training clips with one draw each is training's first step (a
    global batch of all 6 clips), before any update: the same number. Called again it returns the
    same figure; after training, a lower one."""
    from udpdiff.latents import LatentDataset
    from udpdiff.models.transformer import load_transformer
    from udpdiff.tasks import task_id
    from udpdiff.train import fixed_draw_loss

    p = tiny_train_params(tmp_path, micro_batch_size=6, rgb_given_prob=0.5, steps=4)
    latents = random_latent_cache(tmp_path)
    trained, result = train_tiny(p, latents, tmp_path / "ck")
    t = p.active.train
    num_tasks = max(task_id(x) for x in t.tasks) + 1  # as train() builds it
    initial = load_transformer(p.active.transformer.model_dump(), num_tasks=num_tasks, seed=p.seed).eval()
    data = LatentDataset(latents, TRAIN_CLIPS)
    alphas = build_scheduler(p.active.scheduler.model_dump()).alphas_cumprod
    before = fixed_draw_loss(initial, data, p, 1.0, alphas, vae_scale_spatial=4, draws_per_clip=1)
    assert before["loss"] == pytest.approx(result.history[0]["loss"], rel=1e-5)
    assert before["loss_dense"] == pytest.approx(result.history[0]["loss_dense"], rel=1e-5)
    assert fixed_draw_loss(initial, data, p, 1.0, alphas, 4, draws_per_clip=1) == before
    after = fixed_draw_loss(trained.eval(), data, p, 1.0, alphas, 4, draws_per_clip=1)
    assert after["loss"] < before["loss"] and t.steps == 4


def test_rgb_given_samples_carry_their_clean_rgb_and_no_rgb_loss(tmp_path):
    """train.rgb_given_prob: a given sample's RGB half is its clean latent, its weight on the RGB
    half is 0 and everything else of the batch is the joint batch's, number for number."""
    from udpdiff.latents import LatentDataset
    from udpdiff.models.transformer import LATENT_CHANNELS as C
    from udpdiff.train import weighted_mean

    data = LatentDataset(random_latent_cache(tmp_path), TRAIN_CLIPS)
    alphas = build_scheduler({}).alphas_cumprod
    joint = make_batch(data, tiny_train_params(tmp_path, micro_batch_size=6), 0, 0, 1.0, alphas)
    (tmp_path / "g").mkdir()
    given_params = tiny_train_params(tmp_path / "g", micro_batch_size=6, rgb_given_prob=0.5)
    given = make_batch(data, given_params, 0, 0, 1.0, alphas)
    assert "loss_weight" not in joint
    w = given["loss_weight"]
    assert w.shape == (6, 1, 2 * C, 1, 1) and torch.all(w[:, :, C:] == 1)
    is_given = w[:, 0, 0, 0, 0] == 0
    assert 0 < int(is_given.sum()) < 6  # this seed gives some and not all
    for k in ("v_target", "timesteps", "text", "task_ids", "clip_index"):
        assert torch.equal(joint[k], given[k]), k
    assert torch.equal(given["noisy"][~is_given], joint["noisy"][~is_given])
    assert torch.equal(given["noisy"][is_given, :, C:], joint["noisy"][is_given, :, C:])
    # x0 from the joint batch: x0 = sqrt(a) x_t - sqrt(1-a) v
    a = alphas[joint["timesteps"]].view(-1, 1, 1, 1, 1)
    x0 = a.sqrt() * joint["noisy"] - (1 - a).sqrt() * joint["v_target"]
    torch.testing.assert_close(given["noisy"][is_given, :, :C], x0[is_given, :, :C].to(given["noisy"].dtype),
                               rtol=0, atol=1e-5)
    # the loss counts exactly the weighted elements
    err = torch.rand(6, 3, 2 * C, 4, 4)
    kept = torch.cat([err[~is_given].flatten(), err[is_given][:, :, C:].flatten()])
    torch.testing.assert_close(weighted_mean(err, w), kept.mean())
    with pytest.raises(ValueError, match="rgb_given_prob needs a dense task"):
        tiny_train_params(tmp_path, tasks=[], task_ratio=[], task_conditioning="none", rgb_given_prob=0.5)


def test_rgb_only_batches_have_16_channels(tmp_path):
    from udpdiff.latents import LatentDataset

    p = tiny_train_params(tmp_path, tasks=[], task_ratio=[], task_conditioning="none")
    data = LatentDataset(random_latent_cache(tmp_path), TRAIN_CLIPS)
    batch = make_batch(data, p, step=0, micro=0, scaling_factor=1.0, alphas_cumprod=build_scheduler({}).alphas_cumprod)
    assert batch["noisy"].shape == (2, 3, 16, 4, 4) and batch["task_ids"].tolist() == [-1, -1]
    with pytest.raises(ValueError, match="needs task_conditioning: none"):
        tiny_train_params(tmp_path, tasks=[], task_ratio=[], task_conditioning="embedding")


@pytest.mark.slow
def test_rgb_only_baseline_trains_a_16_channel_model(tmp_path):
    p = tiny_train_params(tmp_path, tasks=[], task_ratio=[], task_conditioning="none", steps=4)
    model, result = train_tiny(p, random_latent_cache(tmp_path), tmp_path / "ck")
    assert model.config.in_channels == 16 and model.config.num_tasks == 0
    assert result.steps_done == 4 and all("loss_dense" not in h for h in result.history)
    assert all(h["loss"] == pytest.approx(h["loss_rgb"]) for h in result.history)


@pytest.mark.slow
def test_previews_and_checkpoints_are_reported_while_training(tmp_path):
    p = tiny_train_params(tmp_path, sample_every=3, log_checkpoints="references")
    calls, artifacts = [], []

    def preview(module, step, path):
        calls.append((step, module.training))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"grid {step}")
        return path

    _, result = train_tiny(p, random_latent_cache(tmp_path), tmp_path / "ck", preview_fn=preview,
                     artifact_fn=lambda path, where: artifacts.append((Path(path), where)))
    assert calls == [(3, False), (6, False)]  # every sample_every steps, the model in eval mode
    grids = sorted(x.name for x in (result.run_dir / "train_samples").iterdir())
    assert grids == ["step-00000003.gif", "step-00000006.gif"]
    assert [w for _, w in artifacts] == ["checkpoints/step-00000002", "train_samples", "checkpoints/step-00000004",
                                         "checkpoints/step-00000006", "train_samples"]
    ref = json.loads(artifacts[-2][0].read_text())  # a reference: where the checkpoint is and how big
    assert ref["step"] == 6 and ref["bytes"] > 0 and Path(ref["checkpoint"]) == result.run_dir / "step-00000006"
    # a run resumed after the end trains nothing, but its grids are still there to publish
    _, again = train_tiny(p, tmp_path / "latents", tmp_path / "ck", preview_fn=preview)
    assert again.resumed_from == 6 and len(calls) == 2
    assert len(list((again.run_dir / "train_samples").iterdir())) == 2


@pytest.mark.slow
def test_online_encoding_trains_exactly_like_the_latent_cache(tmp_path):
    """train.latents: online computes each record when a batch needs it; the batches, and so the
    losses, are those of training on the latents stage's cache."""
    import numpy as np
    from diffusers import AutoencoderKLCogVideoX

    from udpdiff.latents import ClipInputs, OnlineLatentDataset, encode_clips
    from udpdiff.models.text import build_text_encoder, encode_text

    p = tiny_train_params(tmp_path, latents="online")
    rng = np.random.default_rng(0)
    clips = [ClipInputs(clip_id=c, rgb=rng.integers(0, 256, (9, 16, 16, 3), dtype=np.uint8),
                        dense={t: rng.integers(0, 256, (9, 16, 16, 3), dtype=np.uint8) for t in p.active.train.tasks},
                        caption_long=f"a long caption {c}", caption_short=f"short {c}") for c in TRAIN_CLIPS]
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 3,
                                 up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 8, 8),
                                 latent_channels=16, layers_per_block=1, norm_num_groups=4).eval()
    tokenizer, encoder = build_text_encoder({"config": {"d_model": 64, "d_ff": 64, "num_layers": 1, "num_heads": 2,
                                                        "d_kv": 16}}, seed=0)

    def text_fn(prompts):
        return encode_text(tokenizer, encoder, prompts, 8)

    encode_clips(clips, vae, text_fn, tmp_path / "cache", p.active.train.tasks)
    _, cached = train_tiny(p, tmp_path / "cache", tmp_path / "ck-cached")
    online = OnlineLatentDataset(lambda i: clips[i], len(clips), vae, text_fn, p.active.train.tasks)
    _, live = train_tiny(p, online, tmp_path / "ck-online")
    assert [h["loss"] for h in live.history] == pytest.approx([h["loss"] for h in cached.history], rel=1e-5)
