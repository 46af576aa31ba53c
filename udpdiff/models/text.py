"""T5 text encoder and tokenizer (CogVideoX conditions on T5-XXL hidden states).

Large profiles load both from a CogVideoX directory or hub id with ``from_pretrained``. The
``tiny`` and ``small`` profiles build a small randomly initialised ``T5EncoderModel`` of the same
class, with a tokenizer that needs no download: ByT5's byte-level one (``byt5``), or a word-level
one whose vocabulary is the training captions' words (``words``; the ``tokenizers`` library). At
``max_length`` 96, bytes cover the first ~95 characters of a caption: the synthetic long captions
(200-500 bytes) would lose their ground, sky and camera, which words keep (46-105 tokens).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    ByT5Tokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

logger = logging.getLogger(__name__)


RANDOM_ENCODER_TOKENIZERS = ("byt5", "words")
# T5's special-token ids (T5Config's pad_token_id 0 and eos_token_id 1), then the unknown word
WORD_SPECIALS = ("<pad>", "</s>", "<unk>")


def build_text_encoder(spec: dict, seed: int,
                       captions: Iterable[str] | None = None) -> tuple[PreTrainedTokenizerBase, T5EncoderModel]:
    """``spec`` is params.yaml ``text_encoder``: ``pretrained`` (a CogVideoX dir/id with
    ``tokenizer/`` and ``text_encoder/`` subfolders, or a folder we saved) or a T5 ``config`` and a
    ``tokenizer`` (``byt5``, or ``words``, which learns its vocabulary from ``captions``)."""
    pretrained = spec.get("pretrained")
    if pretrained:
        tokenizer = _load_tokenizer(pretrained)
        encoder = T5EncoderModel.from_pretrained(pretrained, subfolder=_subfolder(pretrained, "text_encoder"))
        return tokenizer, encoder.eval().requires_grad_(False)
    kind = spec.get("tokenizer", "byt5")
    if kind == "words":
        if captions is None:
            raise ValueError("text_encoder.tokenizer 'words' learns its vocabulary from the training captions: "
                             "none were given")
        tokenizer = word_tokenizer(captions)
    elif kind == "byt5":
        tokenizer = ByT5Tokenizer()
    else:
        raise ValueError(f"text_encoder.tokenizer {kind!r}: a randomly initialised text encoder pairs with one of "
                         f"{', '.join(RANDOM_ENCODER_TOKENIZERS)}")
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), **spec.get("config", {}))
    encoder = T5EncoderModel(config)
    logger.info("built a random T5 encoder (%d parameters)", sum(p.numel() for p in encoder.parameters()))
    return tokenizer, encoder.eval().requires_grad_(False)


def word_tokenizer(captions: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``captions``' words and punctuation, lower-cased, with T5's
    ``<pad>`` 0, ``</s>`` 1 (appended to every sequence) and ``<unk>`` 2 for words it never saw. The
    vocabulary is sorted, so the same captions give the same ids."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    normalizer, pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    words = sorted({w for text in captions for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))}
                   - set(WORD_SPECIALS))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate([*WORD_SPECIALS, *words])}, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def unknown_words(tokenizer: PreTrainedTokenizerBase, text: str) -> list[str]:
    """The words of ``text`` that ``tokenizer`` encodes as its unknown token (a ``words`` tokenizer's
    words absent from the training captions); [] for tokenizers that never produce it (bytes)."""
    if not tokenizer.is_fast or tokenizer.unk_token_id is None:
        return []
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    return [text[a:b] for i, (a, b) in zip(enc.input_ids, enc.offset_mapping, strict=True)
            if i == tokenizer.unk_token_id]


def _subfolder(root: str, name: str) -> str | None:
    path = Path(root)
    if path.is_dir() and not (path / name).is_dir():
        return None  # a folder holding the model directly
    return name


def _load_tokenizer(pretrained: str) -> PreTrainedTokenizerBase:
    sub = _subfolder(pretrained, "tokenizer")
    if sub:
        return AutoTokenizer.from_pretrained(pretrained, subfolder=sub)
    return AutoTokenizer.from_pretrained(pretrained)


@torch.no_grad()
def encode_text(
    tokenizer: PreTrainedTokenizerBase,
    encoder: T5EncoderModel,
    prompts: list[str],
    max_length: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """T5 last hidden states, padded to ``max_length`` as CogVideoX's pipeline does."""
    tokens = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
        return_tensors="pt",
    )
    return encoder(tokens.input_ids.to(device))[0]
