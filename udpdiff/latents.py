"""Pre-encoded training inputs: VAE latent distributions and T5 embeddings, one file per clip.

Training then never runs the VAE or T5 (as finetrainers' precomputation does). We store the
posterior's mean and std rather than one sample, so every training step draws a fresh latent
sample exactly as on-the-fly encoding would.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLCogVideoX
from tqdm.auto import tqdm

from udpdiff.io.atomic import atomic_path, write_text
from udpdiff.models.vae import to_model_input
from udpdiff.tasks import task_prompt

logger = logging.getLogger(__name__)

EMPTY_PROMPT_FILE = "_empty_prompt.safetensors"
# safetensors, not torch.save: torch's zip writer stamps every file with a random serialization id,
# so re-encoding identical clips would give new bytes and DVC would retrain for nothing
RECORD_SUFFIX = ".safetensors"
DIGEST_FILE = "_digest.txt"  # a hash over every record's bytes (cache_digest)


def record_path(cache_dir: Path, clip_id: str) -> Path:
    return cache_dir / f"{clip_id}{RECORD_SUFFIX}"


def save_record(path: Path, record: dict) -> str:
    """One clip's latents and embeddings, written atomically and byte-identically for equal inputs;
    returns the SHA-256 of the bytes written."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().clone() for k, v in record.items() if isinstance(v, torch.Tensor)}
    meta = {k: v for k, v in record.items() if isinstance(v, str)}
    data = save(tensors, metadata=meta)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def cache_digest(cache_dir: Path) -> str:
    """What the cache holds, in one hash: the latents stage's ``DIGEST_FILE`` (a hash over every
    record's bytes, computed as they were written), or, for a cache written before it existed,
    the same hash computed from the files. Training keys its checkpoints on it, so a model is never
    resumed from a checkpoint of other data."""
    digest_file = cache_dir / DIGEST_FILE
    if digest_file.exists():
        return digest_file.read_text().strip()
    logger.info("%s has no %s (written before digests existed): hashing its files; rerun the latents stage to "
                "skip this", cache_dir, DIGEST_FILE)
    return files_digest(sorted(cache_dir.glob(f"*{RECORD_SUFFIX}")))


def files_digest(paths: Iterable[Path]) -> str:
    """One SHA-256 over the files' names and contents, in the given order."""
    return _combined((path.name, hashlib.sha256(path.read_bytes()).hexdigest()) for path in paths)


def _combined(named_digests: Iterable[tuple[str, str]]) -> str:
    combined = hashlib.sha256()
    for name, digest in named_digests:
        combined.update(f"{name} {digest}\n".encode())
    return combined.hexdigest()


def load_record(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        record: dict = dict(f.metadata() or {})
        record.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open has no __iter__)
    return record


@dataclass
class ClipInputs:
    """What the encode stage hands over per clip (uint8 videos, captions)."""

    clip_id: str
    rgb: np.ndarray
    dense: dict[str, np.ndarray]  # task -> colormap video
    caption_long: str
    caption_short: str


@torch.no_grad()
def _posteriors(vae: AutoencoderKLCogVideoX, videos: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior of each of ``videos`` (uint8, (B, T, H, W, 3)), float32 on the CPU."""
    dist = vae.encode(to_model_input(videos, vae.device).to(vae.dtype)).latent_dist
    return dist.mean.float().cpu(), dist.std.float().cpu()


TextFn = Callable[[list[str]], torch.Tensor]

WRITES_IN_FLIGHT = 32  # records waiting for the writer thread (about 2 MB each for the small profile)
ENCODE_BATCH = 8  # clips per VAE call: one clip at a time, the 3D VAE's many small kernels (launch
# overhead) set the pace: 9 clips/s on an H200 for 17x128x128 clips (benchmarks/results/small-h200x2-attempt1.md)


def _prompts(clip: ClipInputs, tasks: Sequence[str], text_prompt_tasks: bool) -> dict[str, str]:
    prompts = {"long": clip.caption_long, "short": clip.caption_short}
    if text_prompt_tasks:
        for task in tasks:
            prompts[f"long:{task}"] = task_prompt(task, clip.caption_long)
            prompts[f"short:{task}"] = task_prompt(task, clip.caption_short)
    return prompts


@torch.no_grad()
def encode_records(clips: Sequence[ClipInputs], vae: AutoencoderKLCogVideoX, text_fn: TextFn, tasks: Sequence[str],
                   text_prompt_tasks: bool = False) -> list[dict[str, torch.Tensor | str]]:
    """Clips' training inputs: VAE posteriors of each video and of each task's colormap, and the T5
    embeddings of their captions (``text_prompt_tasks``: also the task-named prompts of the Tab 5
    ablation), with one VAE call per kind and one text-encoder call for all of ``clips`` (which share
    a shape, as the data contract guarantees). The cache stores exactly this; online training
    computes it on the fly."""
    records: list[dict[str, torch.Tensor | str]] = [{"clip_id": clip.clip_id} for clip in clips]
    for kind in ["rgb", *tasks]:
        means, stds = _posteriors(vae, np.stack([clip.rgb if kind == "rgb" else clip.dense[kind] for clip in clips]))
        for record, mean, std in zip(records, means, stds, strict=True):
            # clones: a record's tensors must not be views of the batch's (safetensors refuses shared memory)
            record[f"{kind}_mean"], record[f"{kind}_std"] = mean.clone(), std.clone()
    prompts = [_prompts(clip, tasks, text_prompt_tasks) for clip in clips]
    embeds = text_fn([text for p in prompts for text in p.values()]).cpu()
    start = 0
    for record, p in zip(records, prompts, strict=True):
        for i, key in enumerate(p):
            record[f"text:{key}"] = embeds[start + i].clone()
        start += len(p)
    return records


def encode_record(clip: ClipInputs, vae: AutoencoderKLCogVideoX, text_fn: TextFn, tasks: Sequence[str],
                  text_prompt_tasks: bool = False) -> dict[str, torch.Tensor | str]:
    """One clip's training inputs (:func:`encode_records` of one clip)."""
    return encode_records([clip], vae, text_fn, tasks, text_prompt_tasks)[0]


def encode_clips(
    clips: Iterable[ClipInputs],
    vae: AutoencoderKLCogVideoX,
    text_fn: TextFn,
    out_dir: Path,
    tasks: Sequence[str],
    text_prompt_tasks: bool = False,
    total: int | None = None,
    batch_size: int = ENCODE_BATCH,
) -> list[Path]:
    """Write ``<out_dir>/<clip_id>.safetensors`` for every clip (read as they come, encoded
    ``batch_size`` at a time) and the empty-prompt embedding."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written, digests = [], {}
    source = iter(clips)
    # records are serialised, hashed and written on a thread while the next batch encodes (about
    # 13 ms per 2 MB record: a fifth of the stage on a GPU machine); at most WRITES_IN_FLIGHT wait
    in_flight: collections.deque[tuple[str, Future[str]]] = collections.deque()
    with tqdm(desc="latents", total=total, leave=False) as bar, ThreadPoolExecutor(1) as writer:
        while batch := list(itertools.islice(source, batch_size)):
            for record in encode_records(batch, vae, text_fn, tasks, text_prompt_tasks):
                path = record_path(out_dir, str(record["clip_id"]))
                in_flight.append((path.name, writer.submit(save_record, path, record)))
                written.append(path)
            while len(in_flight) > WRITES_IN_FLIGHT:
                name, done = in_flight.popleft()
                digests[name] = done.result()
            bar.update(len(batch))
        for name, done in in_flight:
            digests[name] = done.result()
    empty = out_dir / EMPTY_PROMPT_FILE
    digests[empty.name] = save_record(empty, {"text:empty": text_fn([""]).cpu()[0]})
    # in the order cache_digest reads the files: the same hash as files_digest of the cache
    write_text(out_dir / DIGEST_FILE, _combined(sorted(digests.items())) + "\n")
    return written


class LatentDataset:
    """The cached clips of a split, loaded on demand: ``dataset[i]`` reads one clip's file and
    keeps the most recent ``cache_size`` in memory (all of them for the tiny set; a bounded
    window for a 300K-clip set, whose cache would not fit in RAM)."""

    def __init__(self, cache_dir: Path, clip_ids: Sequence[str], cache_size: int = 256):
        if not clip_ids:
            raise ValueError(f"{cache_dir}: no clips to train on")
        self.paths = [record_path(cache_dir, cid) for cid in clip_ids]
        for cid, path in zip(clip_ids, self.paths, strict=True):
            if not path.exists():
                raise FileNotFoundError(f"{path}: latent cache missing for clip {cid}; rerun the latents stage")
        empty = cache_dir / EMPTY_PROMPT_FILE
        if not empty.exists():
            raise FileNotFoundError(f"{empty}: empty-prompt embedding missing; rerun the latents stage")
        self.empty_text = load_record(empty)["text:empty"]
        self._load = functools.lru_cache(maxsize=cache_size)(self._read)

    def _read(self, i: int) -> dict:
        try:
            return load_record(self.paths[i])
        except Exception as e:  # a truncated or foreign file: name it
            raise ValueError(f"{self.paths[i]}: unreadable latent cache ({e}); rerun the latents stage") from e

    def __getitem__(self, i: int) -> dict:
        return self._load(i)

    def __len__(self) -> int:
        return len(self.paths)


class OnlineLatentDataset:
    """The same records as ``LatentDataset``, computed when read: ``load_clip(i)`` gives the
    clip, the VAE and text encoder run in the training process, and no cache is written (the
    finetrainers-style choice between pre-encoding and encoding on the fly). Slower per step,
    but a new dataset trains without a pre-encoding pass and its disk space."""

    def __init__(self, load_clip: Callable[[int], ClipInputs], size: int, vae: AutoencoderKLCogVideoX,
                 text_fn: TextFn, tasks: Sequence[str], text_prompt_tasks: bool = False):
        if size == 0:
            raise ValueError("no clips to train on")
        self.load_clip, self.size, self.vae, self.text_fn = load_clip, size, vae, text_fn
        self.tasks, self.text_prompt_tasks = list(tasks), text_prompt_tasks
        with torch.no_grad():
            self.empty_text = text_fn([""]).cpu()[0]

    def __getitem__(self, i: int) -> dict:
        with torch.no_grad():
            return encode_record(self.load_clip(i), self.vae, self.text_fn, self.tasks, self.text_prompt_tasks)

    def __len__(self) -> int:
        return self.size
