"""udpdiff.models.text: the random encoders' tokenizers, here the word-level one learnt from captions."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from udpdiff.data.synthetic import render_clip
from udpdiff.models.text import build_text_encoder, encode_text, unknown_words, word_tokenizer

CONFIG = {"d_model": 32, "d_ff": 64, "num_layers": 1, "num_heads": 2, "d_kv": 16}


@pytest.fixture(scope="module")
def captions() -> list[str]:
    clips = [render_clip(seed, num_frames=3, height=32, width=32) for seed in range(12)]
    return [c.caption_long for c in clips] + [c.caption_short for c in clips]


def test_a_long_synthetic_caption_fits_whole_in_words_where_bytes_cut_its_scene(captions):
    words, _ = build_text_encoder({"tokenizer": "words", "config": CONFIG}, 0, captions=captions)
    byt5, _ = build_text_encoder({"tokenizer": "byt5", "config": CONFIG}, 0)
    long = max(captions, key=len)
    assert long.index(" ground") > 96  # at 96 bytes the ground (and the sky, the camera) would be cut
    ids = words(long).input_ids
    assert len(ids) < 128 < len(byt5(long).input_ids)
    assert ids[-1] == words.eos_token_id == 1 and words.unk_token_id not in ids and words.pad_token_id == 0
    assert words.decode(ids, skip_special_tokens=True).replace(" ", "") == long.lower().replace(" ", "")


def test_the_vocabulary_is_the_captions_words_in_a_fixed_order(captions):
    a, b = word_tokenizer(captions), word_tokenizer(list(reversed(captions)))
    assert a.get_vocab() == b.get_vocab()
    assert a("The RED zebra.").input_ids == [a.convert_tokens_to_ids(w) for w in ("the", "red")] + [
        a.unk_token_id, a.convert_tokens_to_ids("."), a.eos_token_id]


def test_words_needs_captions_and_other_names_are_refused():
    with pytest.raises(ValueError, match="'words' learns its vocabulary from the training captions"):
        build_text_encoder({"tokenizer": "words", "config": CONFIG}, 0)
    with pytest.raises(ValueError, match="tokenizer 'bpe'"):
        build_text_encoder({"tokenizer": "bpe", "config": CONFIG}, 0)


def test_a_saved_words_tokenizer_loads_back_the_same(tmp_path, captions):
    """(A pipeline holding one round-trips in tests/test_models.py.)"""
    tokenizer, encoder = build_text_encoder({"tokenizer": "words", "config": CONFIG}, 0, captions=captions)
    tokenizer.save_pretrained(tmp_path)
    encoder.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    before, after = (encode_text(t, encoder, captions[:3], 128) for t in (tokenizer, loaded))
    assert torch.equal(before, after)


def test_unknown_words_are_named_and_bytes_have_none(captions):
    words, _ = build_text_encoder({"tokenizer": "words", "config": CONFIG}, 0, captions=captions)
    byt5, _ = build_text_encoder({"tokenizer": "byt5", "config": CONFIG}, 0)
    assert unknown_words(words, "A red zebra grazes, Quietly.") == ["zebra", "grazes", "Quietly"]
    assert unknown_words(words, captions[0]) == [] and unknown_words(byt5, "A red zebra") == []


def test_generate_names_the_prompt_words_the_pipeline_never_saw(tmp_path, tiny_pipeline, caplog):
    from udpdiff import cli

    tiny_pipeline(tokenizer="words").save_pretrained(tmp_path / "pipeline")
    args = ["generate", "--prompt", "a red zebra slides left", "--pipeline", str(tmp_path / "pipeline"), "--steps", "1",
            "--height", "32", "--width", "32", "--num-frames", "9", "--out", str(tmp_path / "out")]
    with caplog.at_level("WARNING", logger="udpdiff.cli"):
        assert cli.main(args) == 0
    assert "never saw 'zebra' in training; encoded as <unk>" in caplog.text
    assert (tmp_path / "out" / "depth-seed0.mp4").exists()


PRETRAIN = {"steps": 60, "batch_size": 16, "lr": 3e-3, "mask_probability": 0.15}


def _pretrained_words(captions, seed=0, **pretrain):
    from udpdiff.models.text import pretrain_masked_lm

    pretrain = {**PRETRAIN, **pretrain}
    tokenizer, encoder = build_text_encoder({"tokenizer": "words", "config": CONFIG, "pretrain": pretrain}, 0,
                                            captions=captions)
    losses = pretrain_masked_lm(tokenizer, encoder, captions, **pretrain, max_length=128, seed=seed)
    return tokenizer, encoder, losses


@pytest.fixture(scope="module")
def pretrained(captions):
    """(tokenizer, encoder, losses) after 60 steps: enough to leave uniform guessing, not to learn
    context (that takes hundreds of steps; benchmarks/results/text-pretraining-probe-vm.md)."""
    return _pretrained_words(captions)


def test_masked_word_pretraining_learns_and_keeps_every_word_id(captions, pretrained):
    plain, _ = build_text_encoder({"tokenizer": "words", "config": CONFIG}, 0, captions=captions)
    tokenizer, encoder, losses = pretrained
    # the mask is one id past the words: a caption encodes to the same ids with or without it
    assert tokenizer.mask_token_id == len(plain) == len(tokenizer) - 1 == encoder.config.vocab_size - 1
    assert tokenizer(captions[0]).input_ids == plain(captions[0]).input_ids
    # from a guess over the whole vocabulary (log V) to the captions' word frequencies, well under it
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert first > 0.9 * math.log(len(tokenizer)) and last < 0.9 * first
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


def test_masked_word_pretraining_replays_for_a_seed_and_differs_for_another(captions):
    states = [_pretrained_words(captions, seed=seed, steps=5)[1].state_dict() for seed in (0, 0, 1)]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not torch.equal(states[0]["shared.weight"], states[2]["shared.weight"])


def test_a_pretrained_encoder_saves_and_loads_back_with_its_mask_token(tmp_path, captions, pretrained):
    from transformers import T5EncoderModel

    tokenizer, encoder, _ = pretrained
    tokenizer.save_pretrained(tmp_path)
    encoder.save_pretrained(tmp_path)
    loaded_tok, loaded = AutoTokenizer.from_pretrained(tmp_path), T5EncoderModel.from_pretrained(tmp_path)
    assert loaded_tok.mask_token == "<mask>" and loaded_tok.mask_token_id == tokenizer.mask_token_id
    assert torch.equal(encode_text(tokenizer, encoder, captions[:3], 128),
                       encode_text(loaded_tok, loaded, captions[:3], 128))


def test_pretraining_refuses_a_tokenizer_without_a_mask_and_a_pretrained_encoder(captions):
    from udpdiff.config import TextEncoderParams
    from udpdiff.models.text import pretrain_masked_lm

    tokenizer, encoder = build_text_encoder({"tokenizer": "words", "config": CONFIG}, 0, captions=captions)
    with pytest.raises(ValueError, match="needs a tokenizer with a mask token"):
        pretrain_masked_lm(tokenizer, encoder, captions, **PRETRAIN, max_length=128, seed=0)
    with pytest.raises(ValueError, match="is trained already"):
        TextEncoderParams(pretrained="THUDM/CogVideoX-2b", pretrain={"steps": 10})
