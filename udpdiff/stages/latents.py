"""The `latents` stage: cached VAE posteriors and T5 embeddings (and the tiny text encoder)."""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace
from typing import TYPE_CHECKING

from udpdiff.devices import default_device
from udpdiff.io.manifest import read_manifest
from udpdiff.stages.common import (
    StepResult,
    fresh_tmp_dir,
    replace_dir,
    write_json,
)
from udpdiff.stages.loading import clip_inputs, load_vae
from udpdiff.workers import read_ahead

if TYPE_CHECKING:
    import pandas as pd

    from udpdiff.config import Params
    from udpdiff.paths import ProjectPaths

logger = logging.getLogger(__name__)


def run(p: Params, paths: ProjectPaths) -> StepResult:
    """Cache VAE posteriors and T5 embeddings for every clip (and save the tiny text encoder).
    With ``train.latents: online`` only the empty-prompt embedding is written: training encodes
    the clips itself."""
    from udpdiff.latents import encode_clips
    from udpdiff.models.text import build_text_encoder, encode_text, pretrain_masked_lm

    te = p.active.text_encoder
    df = read_manifest(paths.manifest)
    words = te.tokenizer == "words" and not te.pretrained  # a vocabulary to learn from the captions
    texts = _vocabulary_texts(df)  # the words' source and the masked-word pretraining's text
    tokenizer, encoder = build_text_encoder(te.model_dump(), p.seed, captions=texts if words else None)
    device = default_device()
    encoder, metrics = encoder.to(device), {}
    if te.pretrain.steps:
        losses = pretrain_masked_lm(tokenizer, encoder, texts, **te.pretrain.model_dump(),
                                    max_length=te.max_length, seed=p.seed)
        tail = max(1, len(losses) // 10)  # the first and last tenth: one step's loss is one batch's noise
        metrics = {"text_pretrain_loss_first": sum(losses[:tail]) / tail,
                   "text_pretrain_loss_last": sum(losses[-tail:]) / tail}
    tmp_te = fresh_tmp_dir(paths.text_encoder)
    if te.pretrained:
        write_json(tmp_te / "SOURCE.json", {"pretrained": te.pretrained})
    else:
        encoder.save_pretrained(tmp_te)
        tokenizer.save_pretrained(tmp_te)
    replace_dir(tmp_te, paths.text_encoder)
    vae = load_vae(p, paths).to(device)
    if p.active.train.latents == "online":
        df = df.iloc[:0]
    tmp = fresh_tmp_dir(paths.latents)
    written = encode_clips(read_ahead(functools.partial(clip_inputs, p, paths),
                                      [SimpleNamespace(**row) for row in df.to_dict("records")]), vae,
                           lambda prompts: encode_text(tokenizer, encoder, prompts, te.max_length, device), tmp,
                           p.active.train.tasks, text_prompt_tasks=p.active.train.task_conditioning == "text-prompt",
                           total=len(df))
    replace_dir(tmp, paths.latents)
    return StepResult(metrics={"cached_clips": float(len(written)), **metrics})


def _vocabulary_texts(df: pd.DataFrame) -> list[str]:
    """What a word-level tokenizer learns its words from: the training split's captions and the
    task-named prompts (Tab 5). Validation captions stay out; a word only they use is ``<unk>``."""
    from udpdiff.tasks import TASK_IDS, task_prompt

    train = df[df.split == "train"]
    return [*train.caption_long, *train.caption_short, *(task_prompt(t, "") for t in TASK_IDS)]
