"""The latent cache's records: several clips encoded in one VAE and text call give each clip's own record."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLCogVideoX

from udpdiff.latents import (
    DIGEST_FILE,
    ClipInputs,
    cache_digest,
    encode_clips,
    encode_record,
    encode_records,
    load_record,
    record_path,
    save_record,
)
from udpdiff.models.text import build_text_encoder, encode_text


@pytest.fixture
def models():
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 2,
                                 up_block_types=("CogVideoXUpBlock3D",) * 2, block_out_channels=(8, 8),
                                 latent_channels=16, layers_per_block=1, norm_num_groups=4).eval()
    tokenizer, encoder = build_text_encoder({"config": {"d_model": 32, "d_ff": 32, "num_layers": 1, "num_heads": 2,
                                                        "d_kv": 16}}, seed=0)
    return vae, lambda prompts: encode_text(tokenizer, encoder, prompts, 8)


def _clips(n: int, tasks=("segmentation", "depth")) -> list[ClipInputs]:
    rng = np.random.default_rng(1)
    return [ClipInputs(clip_id=f"c{i}", rgb=rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8),
                       dense={t: rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8) for t in tasks},
                       caption_long=f"a long caption number {i}", caption_short=f"short {i}") for i in range(n)]


@pytest.mark.parametrize("text_prompt_tasks", [False, True])
def test_batched_records_equal_one_clip_at_a_time(models, text_prompt_tasks):
    vae, text_fn = models
    tasks = ["segmentation", "depth"]
    clips = _clips(3)
    batched = encode_records(clips, vae, text_fn, tasks, text_prompt_tasks)
    for clip, record in zip(clips, batched, strict=True):
        single = encode_record(clip, vae, text_fn, tasks, text_prompt_tasks)
        assert record.keys() == single.keys() and record["clip_id"] == clip.clip_id
        for key, value in single.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(record[key], value, rtol=1e-4, atol=1e-5)  # batch-size rounding only
    assert ("text:long:depth" in batched[0]) == text_prompt_tasks


def test_encode_clips_writes_every_clip_in_batches(models, tmp_path):
    vae, text_fn = models
    clips = _clips(5, tasks=("depth",))
    written = encode_clips(iter(clips), vae, text_fn, tmp_path, ["depth"], batch_size=2)  # 2 + 2 + 1
    assert written == [record_path(tmp_path, c.clip_id) for c in clips]
    last = load_record(written[-1])
    assert last["rgb_mean"].shape == (16, 3, 8, 8) and last["depth_std"].min() > 0  # (C, F, h, w)
    torch.testing.assert_close(last["text:short"], encode_record(clips[-1], vae, text_fn, ["depth"])["text:short"])


def test_cache_digest_names_the_records_bytes(models, tmp_path):
    """The digest written with the cache equals the one computed from its files (older caches have
    none), and changes when any record does: training keys its checkpoints on it."""
    vae, text_fn = models
    encode_clips(_clips(3, tasks=("depth",)), vae, text_fn, tmp_path, ["depth"])
    written = (tmp_path / DIGEST_FILE).read_text().strip()
    assert cache_digest(tmp_path) == written
    (tmp_path / DIGEST_FILE).unlink()
    assert cache_digest(tmp_path) == written  # recomputed from the files
    record = load_record(record_path(tmp_path, "c1"))
    record["depth_mean"] = record["depth_mean"] + 1e-4
    save_record(record_path(tmp_path, "c1"), record)
    assert cache_digest(tmp_path) != written
