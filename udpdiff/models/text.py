"""T5 text encoder and tokenizer (CogVideoX conditions on T5-XXL hidden states).

Large profiles load both from a CogVideoX directory or hub id with ``from_pretrained``. The
``tiny`` and ``small`` profiles build a small randomly initialised ``T5EncoderModel`` of the same
class, with a tokenizer that needs no download: ByT5's byte-level one (``byt5``), or a word-level
one whose vocabulary is the training captions' words (``words``; the ``tokenizers`` library). At
``max_length`` 96, bytes cover the first ~95 characters of a caption: the synthetic long captions
(200-500 bytes) would lose their ground, sky and camera, which words keep (46-105 tokens).

A random encoder knows which words a caption holds but not how they bind: read without positions (CogVideoX
rotates only the video tokens), "a teal sphere ... over a brown ground" and "a brown sphere ... over a teal
ground" look alike. ``pretrain`` stands in for T5's own pretraining on text: masked-word prediction over the
training captions (:func:`pretrain_masked_lm`), so each word's state says what surrounds it.
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
    if (spec.get("pretrain") or {}).get("steps"):
        tokenizer.add_special_tokens({"mask_token": "<mask>"})  # the last id: every other id stays
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), **spec.get("config", {}))
    encoder = T5EncoderModel(config)
    logger.info("built a random T5 encoder (%d parameters)", sum(p.numel() for p in encoder.parameters()))
    return tokenizer, encoder.eval().requires_grad_(False)


def pretrain_masked_lm(tokenizer: PreTrainedTokenizerBase, encoder: T5EncoderModel, texts: list[str], *,
                       steps: int, batch_size: int, lr: float, mask_probability: float, max_length: int, seed: int,
                       log_every: int | None = None) -> list[float]:
    """Train ``encoder`` in place to predict masked words of ``texts`` (BERT's 80/10/10 masking by
    transformers' collator) through an output head tied to its input embeddings, scaled by
    ``d_model ** -0.5`` as T5 scales its tied head. Returns the loss of every step; deterministic
    for a given ``seed`` on one device. Logs the mean loss every ``log_every`` steps (a tenth of them)."""
    from diffusers.optimization import get_constant_schedule_with_warmup
    from tqdm.auto import tqdm
    from transformers import DataCollatorForLanguageModeling

    if tokenizer.mask_token_id is None:
        raise ValueError("masked-word pretraining needs a tokenizer with a mask token: build the encoder with "
                         "text_encoder.pretrain.steps > 0")
    device = encoder.device
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mask_probability, seed=seed)
    order = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=0.0)
    sched = get_constant_schedule_with_warmup(opt, num_warmup_steps=steps // 10)
    scale = encoder.config.d_model ** -0.5
    log_every = log_every or max(1, steps // 10)
    encoder.train().requires_grad_(True)
    losses = []
    bar = tqdm(range(steps), desc="text encoder", leave=False)
    for step in bar:
        pick = torch.randint(len(ids), (batch_size,), generator=order).tolist()
        batch = collator([{"input_ids": ids[i]} for i in pick])
        x, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        hidden = encoder(input_ids=x, attention_mask=batch["attention_mask"].to(device))[0]
        masked = labels != -100
        logits = (hidden[masked] * scale) @ encoder.shared.weight.T
        loss = torch.nn.functional.cross_entropy(logits.float(), labels[masked])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            logger.info("text encoder pretraining: step %d/%d, masked-word loss %.3f", step + 1, steps,
                        sum(losses[-log_every:]) / len(losses[-log_every:]))
    encoder.eval().requires_grad_(False)
    return losses


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
