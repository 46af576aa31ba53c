"""udpdiff.models.text: the random encoders' tokenizers, here the word-level one learnt from captions."""

from __future__ import annotations

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
