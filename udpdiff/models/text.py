"""T5 text encoder and tokenizer (CogVideoX conditions on T5-XXL hidden states).

Large profiles load both from a CogVideoX directory or hub id with ``from_pretrained``. The
``tiny`` profile builds a small randomly initialised ``T5EncoderModel`` of the same class and
pairs it with ByT5's byte-level tokenizer, which needs no vocabulary file and so no download.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerBase, T5Config, T5EncoderModel

logger = logging.getLogger(__name__)


def build_text_encoder(spec: dict, seed: int) -> tuple[PreTrainedTokenizerBase, T5EncoderModel]:
    """``spec`` is params.yaml ``text_encoder``: ``pretrained`` (a CogVideoX dir/id with
    ``tokenizer/`` and ``text_encoder/`` subfolders, or a folder we saved) or a T5 ``config``."""
    pretrained = spec.get("pretrained")
    if pretrained:
        tokenizer = _load_tokenizer(pretrained)
        encoder = T5EncoderModel.from_pretrained(pretrained, subfolder=_subfolder(pretrained, "text_encoder"))
        return tokenizer, encoder.eval().requires_grad_(False)
    if spec.get("tokenizer", "byt5") != "byt5":
        raise ValueError("a randomly initialised text encoder pairs with the offline 'byt5' tokenizer only")
    tokenizer = ByT5Tokenizer()
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), **spec.get("config", {}))
    encoder = T5EncoderModel(config)
    logger.info("built a random T5 encoder (%d parameters)", sum(p.numel() for p in encoder.parameters()))
    return tokenizer, encoder.eval().requires_grad_(False)


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
