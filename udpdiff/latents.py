"""Pre-encoded training inputs: VAE latent distributions and T5 embeddings, one file per clip.

Training then never runs the VAE or T5 (as finetrainers' precomputation does). We store the
posterior's mean and std rather than one sample, so every training step draws a fresh latent
sample exactly as on-the-fly encoding would.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLCogVideoX
from tqdm.auto import tqdm

from udpdiff.io.atomic import atomic_path
from udpdiff.models.vae import to_model_input
from udpdiff.tasks import task_prompt

logger = logging.getLogger(__name__)

EMPTY_PROMPT_FILE = "_empty_prompt.pt"


@dataclass
class ClipInputs:
    """What the encode stage hands over per clip (uint8 videos, captions)."""

    clip_id: str
    rgb: np.ndarray
    dense: dict[str, np.ndarray]  # task -> colormap video
    caption_long: str
    caption_short: str


@torch.no_grad()
def _posterior(vae: AutoencoderKLCogVideoX, video: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    dist = vae.encode(to_model_input(video[None]).to(vae.device, vae.dtype)).latent_dist
    return dist.mean[0].float().cpu(), dist.std[0].float().cpu()


def encode_clips(
    clips: Sequence[ClipInputs],
    vae: AutoencoderKLCogVideoX,
    text_fn: Callable[[list[str]], torch.Tensor],
    out_dir: Path,
    tasks: Sequence[str],
    text_prompt_tasks: bool = False,
) -> list[Path]:
    """Write ``<out_dir>/<clip_id>.pt`` for every clip and the empty-prompt embedding.

    ``text_prompt_tasks`` also caches the task-named prompts of the Tab 5 ablation.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for clip in tqdm(clips, desc="latents", leave=False):
        record: dict[str, torch.Tensor | str] = {"clip_id": clip.clip_id}
        record["rgb_mean"], record["rgb_std"] = _posterior(vae, clip.rgb)
        for task in tasks:
            record[f"{task}_mean"], record[f"{task}_std"] = _posterior(vae, clip.dense[task])
        prompts = {"long": clip.caption_long, "short": clip.caption_short}
        if text_prompt_tasks:
            for task in tasks:
                prompts[f"long:{task}"] = task_prompt(task, clip.caption_long)
                prompts[f"short:{task}"] = task_prompt(task, clip.caption_short)
        embeds = text_fn(list(prompts.values())).cpu()
        for i, key in enumerate(prompts):
            record[f"text:{key}"] = embeds[i]
        path = out_dir / f"{clip.clip_id}.pt"
        with atomic_path(path) as tmp:
            torch.save(record, tmp)
        written.append(path)
    empty = text_fn([""]).cpu()[0]
    with atomic_path(out_dir / EMPTY_PROMPT_FILE) as tmp:
        torch.save({"text:empty": empty}, tmp)
    return written


class LatentDataset:
    """The cached clips of a split, loaded on demand: ``dataset[i]`` reads one clip's file and
    keeps the most recent ``cache_size`` in memory (all of them for the tiny set; a bounded
    window for a 300K-clip set, whose cache would not fit in RAM)."""

    def __init__(self, cache_dir: Path, clip_ids: Sequence[str], cache_size: int = 256):
        if not clip_ids:
            raise ValueError(f"{cache_dir}: no clips to train on")
        self.paths = [cache_dir / f"{cid}.pt" for cid in clip_ids]
        for cid, path in zip(clip_ids, self.paths, strict=True):
            if not path.exists():
                raise FileNotFoundError(f"{path}: latent cache missing for clip {cid}; rerun the latents stage")
        empty = cache_dir / EMPTY_PROMPT_FILE
        if not empty.exists():
            raise FileNotFoundError(f"{empty}: empty-prompt embedding missing; rerun the latents stage")
        self.empty_text = torch.load(empty, weights_only=True)["text:empty"]
        self._load = functools.lru_cache(maxsize=cache_size)(self._read)

    def _read(self, i: int) -> dict:
        try:
            return torch.load(self.paths[i], map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: name it
            raise ValueError(f"{self.paths[i]}: unreadable latent cache ({e}); rerun the latents stage") from e

    def __getitem__(self, i: int) -> dict:
        return self._load(i)

    def __len__(self) -> int:
        return len(self.paths)
