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
