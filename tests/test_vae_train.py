"""udpdiff.models.vae.VaeTrainStep (the autoencoder stage's step) and the benchmark that times it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from udpdiff.models.vae import VaeTrainStep, build_vae

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_vae_train  # noqa: E402

TINY = {"config": {"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
                   "latent_channels": 4, "temporal_compression_ratio": 4}}


def test_steps_on_one_batch_fit_it_and_follow_the_cosine_schedule():
    vae = build_vae(TINY, seed=0).train()
    x = torch.rand((2, 3, 5, 16, 16), generator=torch.Generator().manual_seed(0)).mul(2).sub(1)
    step = VaeTrainStep(vae, steps=30, lr=3e-3, kl_weight=1e-6)
    losses = [step(x)["vae_loss"].item() for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0]
    assert abs(step.opt.param_groups[0]["lr"] - 3e-3 * 0.05) < 1e-12  # the cosine ends at 5 % of lr


def test_benchmark_writes_a_row_per_width_and_batch(tmp_path):
    out = tmp_path / "vae.json"
    assert bench_vae_train.main(["--widths", "32,32", "32,64", "--batches", "1,2", "--frames", "5", "--size", "16",
                                 "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["block_out_channels"], r["batch"]) for r in rows] == [([32, 32], 1), ([32, 32], 2), ([32, 64], 1),
                                                                      ([32, 64], 2)]
    assert all(r["median_s"] > 0 and abs(r["videos_per_s"] - r["batch"] / r["median_s"]) < 1e-9 for r in rows)
    assert rows[2]["params"] > rows[0]["params"]
    assert "| [32, 32]" in out.with_suffix(".md").read_text()


def test_random_crops_are_parts_of_their_own_videos_placed_anywhere():
    import numpy as np

    from udpdiff.models.vae import random_crops

    rng = np.random.default_rng(0)
    videos = rng.integers(0, 255, (3, 9, 16, 24, 3), dtype=np.uint8)
    seen = set()
    for _ in range(40):
        crops = random_crops(videos, (5, 8, 8), rng)
        assert crops.shape == (3, 5, 8, 8, 3)
        for v, c in zip(videos, crops, strict=True):  # each crop is a window of its own video
            hits = [(a, b, d) for a in range(5) for b in range(9) for d in range(17)
                    if np.array_equal(v[a:a + 5, b:b + 8, d:d + 8], c)]
            assert hits
            seen.add(hits[0])
    assert len(seen) > 30  # placed anywhere, not at one corner


def test_a_vae_trained_on_crops_reconstructs_whole_clips(tmp_path):
    """vae.train.crop: the VAE fits on random crops and is then used on whole clips (it is convolutional):
    after training on crops its whole-clip reconstruction beats the untrained one's."""
    import numpy as np

    from udpdiff.models.vae import psnr, reconstruct, train_vae

    rng = np.random.default_rng(1)
    # smooth videos: colour blobs drifting, so that a small VAE can learn them in a few steps
    yy, xx = np.mgrid[:24, :24]
    videos = []
    for _ in range(6):
        cy, cx, r = rng.uniform(6, 18, 2).tolist() + [rng.uniform(4, 8)]
        frames = [np.where(((yy - cy - t) ** 2 + (xx - cx) ** 2 < r * r)[..., None], rng.integers(0, 255, 3), 40)
                  for t in range(9)]
        videos.append(np.stack(frames).astype(np.uint8))
    vae = build_vae(TINY, seed=0)
    before = np.mean([psnr(reconstruct(vae.eval(), v), v) for v in videos])
    history = train_vae(vae, videos, steps=15, batch_size=2, lr=3e-3, kl_weight=1e-6, seed=0, crop=(5, 16, 16))
    after = np.mean([psnr(reconstruct(vae, v), v) for v in videos])
    assert len(history) == 15 and after > before + 3  # 9 -> 16 dB


def test_a_crop_larger_than_the_clips_is_refused():
    import numpy as np
    import pytest

    from udpdiff.config import load_params
    from udpdiff.models.vae import train_vae

    with pytest.raises(ValueError, match="larger than the videos"):
        train_vae(build_vae(TINY, seed=0), [np.zeros((5, 16, 16, 3), np.uint8)], steps=1, batch_size=1, lr=1e-3,
                  kl_weight=0, seed=0, crop=(9, 16, 16))
    p = load_params(ROOT / "params.yaml", profile="tiny")
    with pytest.raises(ValueError, match="larger than the clips"):
        p.with_overrides({"vae.train.crop": [9, 64, 48]})
    with pytest.raises(ValueError, match="1 \\+ 8k"):  # 5 frames: 2 latent frames, decoded to 8
        p.with_overrides({"vae.train.crop": [5, 16, 16]})
    with pytest.raises(ValueError, match="multiples of 8"):
        p.with_overrides({"vae.train.crop": [9, 20, 24]})
    assert p.with_overrides({"vae.train.crop": [9, 24, 24]}).active.vae.train.crop == (9, 24, 24)


def test_compiled_training_matches_eager_and_leaves_the_vae_eager(monkeypatch):
    """acceleration.compile_vae: the encoder and decoder train compiled (the same losses as eager, to
    float rounding) and are eager again afterwards, with the state dict's keys unchanged."""
    import numpy as np
    from torch._dynamo.testing import CompileCounterWithBackend

    from udpdiff import acceleration
    from udpdiff.acceleration import compiled_while_training
    from udpdiff.models.vae import reconstruct, train_vae

    videos = list(np.random.default_rng(2).integers(0, 255, (4, 5, 16, 16, 3), dtype=np.uint8))
    kwargs = dict(steps=3, batch_size=2, lr=3e-3, kl_weight=1e-6, seed=0)
    eager = build_vae(TINY, seed=0)
    eager_history = train_vae(eager, videos, **kwargs)

    counter = CompileCounterWithBackend("aot_eager")  # graph capture without code generation
    monkeypatch.setattr(acceleration, "BACKEND", counter)
    torch._dynamo.reset()
    compiled = build_vae(TINY, seed=0)
    keys = list(compiled.state_dict())
    try:
        with compiled_while_training([compiled.encoder, compiled.decoder]):  # as the autoencoder stage does
            history = train_vae(compiled, videos, **kwargs)
        frames = counter.frame_count
        assert frames >= 2  # the encoder's and the decoder's calls ran compiled
        np.testing.assert_allclose([h["vae_loss"] for h in history], [h["vae_loss"] for h in eager_history],
                                   rtol=1e-4)
        reconstruct(compiled, videos[0][:5])
        assert counter.frame_count == frames  # eager after training: nothing more compiled
        assert compiled.encoder._compiled_call_impl is None and compiled.decoder._compiled_call_impl is None
        assert list(compiled.state_dict()) == keys
        for a, b in zip(compiled.parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    finally:
        torch._dynamo.reset()
