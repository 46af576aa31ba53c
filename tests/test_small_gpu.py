"""benchmarks/small_gpu.py: the small profile's stages and Tab 1/2 variants without the orchestration
tools, here on the CPU with sizes a test can afford (the architecture, stages and files are the GPU run's)."""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import small_gpu  # noqa: E402

# the small profile shrunk to CPU seconds: fewer, smaller clips and a one-block transformer
CPU_SIZES = [
    "data.num_clips=12", "data.num_frames=9", "data.height=32", "data.width=32", "data.val_fraction=0.25",
    "vae.config={block_out_channels: [16, 32, 32], layers_per_block: 1, norm_num_groups: 8, latent_channels: 16,"
    " temporal_compression_ratio: 4}",
    "vae.train.steps=2", "vae.train.batch_size=2",
    "transformer.config={num_attention_heads: 2, attention_head_dim: 16, time_embed_dim: 32, text_embed_dim: 256,"
    " num_layers: 1, sample_height: 8, sample_width: 8, sample_frames: 9, patch_size: 2, max_text_seq_length: 96,"
    " use_rotary_positional_embeddings: true}",
    "train.steps=2", "train.micro_batch_size=2", "train.sample_every=2", "train.validation_clips=1",
    "train.checkpoint_every=2", "train.precision=fp32", "sample.num_samples=1", "sample.num_inference_steps=2",
    "sample.gallery_size=1", "sample.runtime_trials=0", "evaluate.batch_size=2",
]


@pytest.mark.slow
def test_prepare_variants_and_pack(tmp_path):
    root = tmp_path / "run"
    overrides = [a for kv in CPU_SIZES for a in ("--set", kv)]
    names = ["udpdiff-multi-task", "cogvideox"]
    assert small_gpu.main(["all", "--root", str(root), "--out", str(tmp_path / "out.tar.gz"), "--gpus", "1",
                           "--per-gpu", "2", "--variants", *names, *overrides]) == 0
    for stage in small_gpu.PREPARE:
        assert (root / "outputs/small/gpu_run" / f"{stage}.done.json").exists()
    for name in names:
        v = root / "variants" / name
        assert (v / "data/small").resolve() == (root / "data/small").resolve()  # shared, not redone
        for stage in small_gpu.PER_VARIANT:
            record = json.loads((v / "outputs/small/gpu_run" / f"{stage}.done.json").read_text())
            assert record["seconds"] > 0 and record["gpu"] == "cpu"
        scores = json.loads((v / "outputs/small/evaluation/metrics.json").read_text())["metrics"]
        assert set(scores) == ({"segmentation", "depth", "real"} if name == "udpdiff-multi-task" else {"rgb", "real"})
        steps = [json.loads(line) for line in (v / "outputs/small/gpu_run/train_steps.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in steps if "loss" in r) == 2  # the per-step series reached the last step
        assert any(k.startswith("val/") for r in steps for k in r)  # the Fig 8 scores at the preview
    with tarfile.open(tmp_path / "out.tar.gz") as tar:
        packed = set(tar.getnames())
    assert "variants/udpdiff-multi-task/outputs/small/evaluation/metrics.json" in packed
    assert "variants/cogvideox/outputs/small/metrics/train_history.csv" in packed
    assert not any(n.endswith((".pt", ".safetensors", ".npz", ".mp4")) for n in packed)  # small files only

    # a second run finds every stage done and redoes nothing
    before = {f: f.stat().st_mtime_ns for f in (root / "variants").rglob("*.done.json")}
    assert small_gpu.main(["variants", "--root", str(root), "--gpus", "1", "--variants", *names, *overrides]) == 0
    assert {f: f.stat().st_mtime_ns for f in (root / "variants").rglob("*.done.json")} == before
