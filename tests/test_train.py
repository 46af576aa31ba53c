"""The training loop: it learns, resumes exactly after an interruption, and stops cleanly on NaN."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from udpdiff.config import load_params
from udpdiff.latents import EMPTY_PROMPT_FILE
from udpdiff.models.scheduler import build_scheduler
from udpdiff.train import TrainingDivergedError, latest_checkpoint, make_batch, run_fingerprint, train

REPO = Path(__file__).resolve().parents[1]
CLIPS = [f"clip{i}" for i in range(6)]


def _params(tmp_path: Path, **train_overrides):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    tiny = raw["profiles"]["tiny"]
    tiny["transformer"]["config"].update(sample_height=4, sample_width=4, num_layers=1, max_text_seq_length=8)
    tiny["train"].update({"steps": 6, "micro_batch_size": 2, "checkpoint_every": 2, "keep_last": 2, "log_every": 2,
                          "warmup_steps": 2, **train_overrides})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_params(path)


def _latents(tmp_path: Path, text_dim: int = 64) -> Path:
    """A latent cache as the latents stage writes it, with random contents."""
    g = torch.Generator().manual_seed(0)
    d = tmp_path / "latents"
    d.mkdir()
    for cid in CLIPS:
        rec = {"clip_id": cid}
        for prefix in ("rgb", "segmentation", "depth"):
            rec[f"{prefix}_mean"] = torch.randn(16, 3, 4, 4, generator=g)
            rec[f"{prefix}_std"] = torch.rand(16, 3, 4, 4, generator=g) * 0.1
        for key in ("long", "short", "long:segmentation", "short:segmentation", "long:depth", "short:depth"):
            rec[f"text:{key}"] = torch.randn(8, text_dim, generator=g)
        torch.save(rec, d / f"{cid}.pt")
    torch.save({"text:empty": torch.zeros(8, text_dim)}, d / EMPTY_PROMPT_FILE)
    return d


def _run(p, latents: Path, ckpt: Path, **kw):
    return train(p, latents, CLIPS, ckpt, scaling_factor=1.0, vae_scale_spatial=4,
                 scheduler=build_scheduler(p.active.scheduler.model_dump()), **kw)


def test_batches_are_a_pure_function_of_seed_and_step(tmp_path):
    from udpdiff.latents import LatentDataset

    p = _params(tmp_path)
    data = LatentDataset(_latents(tmp_path), CLIPS)
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


@pytest.mark.slow
def test_interrupted_run_resumes_with_identical_losses(tmp_path):
    p = _params(tmp_path)
    latents = _latents(tmp_path)
    _, full = _run(p, latents, tmp_path / "full")
    assert full.steps_done == 6 and len(full.history) == 6
    # first run "killed" after 3 steps: its last checkpoint is step 2, so step 3 is redone
    _, part = _run(p, latents, tmp_path / "split", max_steps_this_run=3)
    assert part.steps_done == 3
    run_dir = tmp_path / "split" / run_fingerprint(p)
    assert latest_checkpoint(run_dir)[1] == 2
    model, resumed = _run(p, latents, tmp_path / "split")
    assert resumed.resumed_from == 2 and resumed.steps_done == 6
    full_losses = [h["loss"] for h in full.history]
    resumed_losses = [h["loss"] for h in resumed.history]
    assert resumed_losses == pytest.approx(full_losses, rel=1e-5, abs=1e-7)
    # only the last `keep_last` checkpoints remain
    assert sorted(x.name for x in run_dir.glob("step-*")) == ["step-00000004", "step-00000006"]


@pytest.mark.slow
def test_changed_settings_do_not_resume_from_old_checkpoints(tmp_path):
    latents = _latents(tmp_path)
    _run(_params(tmp_path), latents, tmp_path / "ck", max_steps_this_run=2)
    other = _params(tmp_path, lr=5e-4)
    _, result = _run(other, latents, tmp_path / "ck", max_steps_this_run=1)
    assert result.resumed_from == 0
    # ...while a longer run with the same settings does resume
    longer = _params(tmp_path, steps=8)
    _, resumed = _run(longer, latents, tmp_path / "ck", max_steps_this_run=1)
    assert resumed.resumed_from == 2 and run_fingerprint(longer) == run_fingerprint(_params(tmp_path))


@pytest.mark.slow
def test_training_reduces_the_loss(tmp_path):
    p = _params(tmp_path, steps=40, lr=3e-3, checkpoint_every=40, caption_dropout_prob=0.0)
    latents = _latents(tmp_path)
    _, result = _run(p, latents, tmp_path / "ck")
    first = sum(h["loss"] for h in result.history[:5]) / 5
    last = sum(h["loss"] for h in result.history[-5:]) / 5
    assert last < first * 0.9, (first, last)
    assert {"loss_dense_segmentation", "loss_dense_depth"} & set().union(*result.history)


@pytest.mark.slow
def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path):
    p = _params(tmp_path)
    latents = _latents(tmp_path)
    _run(p, latents, tmp_path / "ck", max_steps_this_run=2)
    good = tmp_path / "ck" / run_fingerprint(p) / "step-00000002"
    before = sorted(f.name for f in good.rglob("*"))
    poisoned = torch.load(latents / f"{CLIPS[0]}.pt", weights_only=True)
    for k in [k for k in poisoned if k.endswith("_mean")]:
        poisoned[k] = torch.full_like(poisoned[k], float("nan"))
    for cid in CLIPS:
        torch.save({**poisoned, "clip_id": cid}, latents / f"{cid}.pt")
    with pytest.raises(TrainingDivergedError, match=r"step 3.*step-00000002"):
        _run(p, latents, tmp_path / "ck")
    assert latest_checkpoint(good.parent)[1] == 2
    assert sorted(f.name for f in good.rglob("*")) == before
