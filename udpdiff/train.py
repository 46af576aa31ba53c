"""Training loop for UDPDiff — one file, top to bottom, no framework magic.

Objective (paper eq. 2, CogVideoX's): v-prediction on the channel-concatenated latent
z = [z_rgb ‖ z_dense] (32 channels). We regress v directly; CogVideoX's loss on the implied x0
weighted by 1/(1-ᾱ_t) is the same quantity, since x̂0 - x0 = -sqrt(1-ᾱ_t)·(v̂ - v).

Reproducibility and resume: every random draw of step ``s`` (clip order, task, caption, noise,
timestep, latent sample) comes from generators seeded by (seed, s), and the clip order of each
epoch from (seed, epoch). A resumed run therefore replays exactly the batches an uninterrupted
run would, with no RNG state to save; model, optimizer and LR-scheduler state come from the
DeepSpeed checkpoint, and the loss history from its client state.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from udpdiff.config import Params
from udpdiff.io.atomic import write_text
from udpdiff.latents import LatentDataset
from udpdiff.models.transformer import LATENT_CHANNELS, UDPDiffTransformer3DModel, load_transformer
from udpdiff.tasks import task_id

logger = logging.getLogger(__name__)

LogFn = Callable[[dict[str, float], int], None]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is left untouched."""


@dataclass
class TrainResult:
    steps_done: int
    resumed_from: int
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None


# -- distributed / DeepSpeed -----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: torch.device) -> None:
    """Single-process runs get a one-rank process group; launchers (deepspeed, torchrun) set the
    env vars themselves."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def deepspeed_config(p: Params) -> dict:
    t = p.active.train
    zero: dict = {"stage": t.zero_stage}
    if t.zero_stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        "steps_per_print": 10**9,  # our own logging reports progress
        "wall_clock_breakdown": False,
    }


# -- checkpoints ------------------------------------------------------------------------------------
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "keep_last", "log_every"}


def run_fingerprint(p: Params) -> str:
    """Hash of the settings a checkpoint depends on (not the ones a resumed run may change)."""
    a = p.active
    state = {"seed": p.seed, "data": a.data.model_dump(), "pixelplanes": a.pixelplanes.model_dump(),
             "vae": a.vae.model_dump(), "text_encoder": a.text_encoder.model_dump(),
             "transformer": a.transformer.model_dump(), "scheduler": a.scheduler.model_dump(),
             "train": {k: v for k, v in a.train.model_dump().items() if k not in RESUMABLE_CHANGES}}
    return "run-" + hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()[:12]


def latest_checkpoint(ckpt_dir: Path) -> tuple[str, int] | None:
    latest = ckpt_dir / "latest"
    if not latest.exists():
        return None
    tag = latest.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        logger.warning("%s names %s, which does not exist; starting fresh", latest, tag)
        return None
    return tag, int(tag.split("-")[-1])


def save_checkpoint(engine, ckpt_dir: Path, step: int, history: list[dict], keep_last: int) -> Path:
    """DeepSpeed writes into a hidden tag folder that is renamed into place, then ``latest`` is
    replaced atomically: a kill at any point leaves the previous checkpoint usable."""
    tag = f"step-{step:08d}"
    tmp_tag = f".tmp-{tag}"
    shutil.rmtree(ckpt_dir / tmp_tag, ignore_errors=True)
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state={"step": step, "history": history},
                           save_latest=False)
    final = ckpt_dir / tag
    shutil.rmtree(final, ignore_errors=True)
    os.replace(ckpt_dir / tmp_tag, final)
    write_text(ckpt_dir / "latest", tag)
    for old in sorted(ckpt_dir.glob("step-*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# -- batches ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0xDA7A]).permutation(n)


def _draw_latent(rec: dict, prefix: str, gen: torch.Generator) -> torch.Tensor:
    """A sample of the cached VAE posterior N(mean, std^2)."""
    mean, std = rec[f"{prefix}_mean"], rec[f"{prefix}_std"]
    return mean + std * torch.randn(mean.shape, generator=gen)


def make_batch(
    data: LatentDataset,
    p: Params,
    step: int,
    micro: int,
    scaling_factor: float,
    alphas_cumprod: torch.Tensor,
) -> dict[str, torch.Tensor]:
    t = p.active.train
    seed = p.seed
    b = t.micro_batch_size
    # walk the per-epoch permutations in order: a pure function of (seed, step, micro)
    position = (step * t.gradient_accumulation_steps + micro) * b
    idx = []
    for k in range(position, position + b):
        epoch, offset = divmod(k, len(data))
        idx.append(int(epoch_order(seed, epoch, len(data))[offset]))
    rng = np.random.default_rng([seed, step, micro])
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    tasks = rng.choice(len(t.tasks), size=b, p=t.task_ratio)
    long_caption = rng.random(b) < t.long_caption_prob
    drop_caption = rng.random(b) < t.caption_dropout_prob
    x0, text, task_ids = [], [], []
    for j, i in enumerate(idx):
        rec = data.records[i]
        task = t.tasks[tasks[j]]

        x0.append(torch.cat([_draw_latent(rec, "rgb", gen), _draw_latent(rec, task, gen)], dim=0))  # (32, F, h, w)
        key = "long" if long_caption[j] else "short"
        if t.task_conditioning == "text-prompt":
            key = f"{key}:{task}"
        text.append(data.empty_text if drop_caption[j] else rec[f"text:{key}"])
        task_ids.append(task_id(task))
    x0_t = torch.stack(x0).permute(0, 2, 1, 3, 4) * scaling_factor  # (B, F, 32, h, w) as CogVideoX
    noise = torch.randn(x0_t.shape, generator=gen)
    timesteps = torch.randint(0, len(alphas_cumprod), (b,), generator=gen)
    a = alphas_cumprod[timesteps].view(-1, 1, 1, 1, 1)
    noisy = a.sqrt() * x0_t + (1 - a).sqrt() * noise
    v_target = a.sqrt() * noise - (1 - a).sqrt() * x0_t
    return {
        "noisy": noisy,
        "v_target": v_target,
        "timesteps": timesteps,
        "text": torch.stack(text),
        "task_ids": torch.tensor(task_ids),
    }


def rotary_embeddings(transformer: UDPDiffTransformer3DModel, vae_scale: int, height: int, width: int,
                      latent_frames: int, device: torch.device):
    """The rotary tables CogVideoX-5B needs; reuses the pipeline's own construction."""
    if not transformer.config.use_rotary_positional_embeddings:
        return None
    from diffusers import CogVideoXPipeline

    shim = type("_Shim", (), {"vae_scale_factor_spatial": vae_scale, "transformer": transformer})()
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(shim, height, width, latent_frames, device)


# -- the loop ---------------------------------------------------------------------------------------
def train(
    p: Params,
    latents_dir: Path,
    train_ids: list[str],
    ckpt_dir: Path,
    scaling_factor: float,
    vae_scale_spatial: int,
    scheduler,
    log_fn: LogFn | None = None,
    max_steps_this_run: int | None = None,
) -> tuple[UDPDiffTransformer3DModel, TrainResult]:
    """Train (or resume) the transformer; returns the trained module and what happened.

    ``max_steps_this_run`` stops early (as a kill would) — used by resume tests.
    """
    import deepspeed
    from tqdm.auto import tqdm

    t = p.active.train
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = LatentDataset(latents_dir, train_ids)
    alphas_cumprod = scheduler.alphas_cumprod.float()
    # the embedding table is indexed by the global task ids, so it spans up to the largest one used
    num_tasks = max(task_id(x) for x in t.tasks) + 1 if t.task_conditioning == "embedding" else 0
    transformer = load_transformer(p.active.transformer.model_dump(), num_tasks=num_tasks, seed=p.seed)
    if t.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()

    init_distributed(device)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    warmup = max(t.warmup_steps, 1)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    engine, _, _, _ = deepspeed.initialize(model=transformer, optimizer=optimizer, lr_scheduler=lr_schedule,
                                           config=deepspeed_config(p))

    # checkpoints live under a fingerprint of everything that shapes the run, so a run with other
    # settings never resumes from them (extending `steps` keeps the fingerprint and resumes)
    ckpt_dir = ckpt_dir / run_fingerprint(p)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    others = [d.name for d in ckpt_dir.parent.iterdir() if d.is_dir() and d != ckpt_dir]
    if others:
        logger.info("not resuming from checkpoints of other settings in %s: %s", ckpt_dir.parent, others)
    start, history, last_ckpt = 0, [], None
    found = latest_checkpoint(ckpt_dir)
    if found is not None:
        tag, _ = found
        _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        start, history, last_ckpt = client["step"], list(client["history"]), ckpt_dir / tag
        logger.info("resumed from %s at step %d", last_ckpt, start)
    resumed_from = start

    sample0 = data.records[0]["rgb_mean"]  # (16, F, h, w)
    latent_frames, h, w = sample0.shape[1:]
    rotary = rotary_embeddings(transformer, vae_scale_spatial, h * vae_scale_spatial, w * vae_scale_spatial,
                               latent_frames, device)
    tokens_per_sample = latent_frames * (h // transformer.config.patch_size) * (w // transformer.config.patch_size)
    end = t.steps if max_steps_this_run is None else min(t.steps, start + max_steps_this_run)
    bar = tqdm(range(start, end), desc="train", initial=start, total=t.steps, leave=False)
    tick = time.perf_counter()
    for step in bar:
        sums = {"loss": 0.0, "loss_rgb": 0.0, "loss_dense": 0.0}
        per_task: dict[str, list[float]] = {}
        for micro in range(t.gradient_accumulation_steps):
            batch = make_batch(data, p, step, micro, scaling_factor, alphas_cumprod)
            batch = {k: v.to(device) for k, v in batch.items()}
            kwargs = {"task_id": batch["task_ids"]} if num_tasks else {}
            pred = engine(hidden_states=batch["noisy"], encoder_hidden_states=batch["text"],
                          timestep=batch["timesteps"], image_rotary_emb=rotary, return_dict=False, **kwargs)[0]
            err = (pred.float() - batch["v_target"]).pow(2)
            loss = err.mean()
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"loss is {loss.item()} at step {step + 1} (micro-batch {micro}); stopped without saving. "
                    f"Last good checkpoint: {last_ckpt or 'none yet'}. Lower train.lr or check the inputs."
                )
            engine.backward(loss)
            engine.step()
            sums["loss"] += loss.item() / t.gradient_accumulation_steps
            sums["loss_rgb"] += err[:, :, :LATENT_CHANNELS].mean().item() / t.gradient_accumulation_steps
            sums["loss_dense"] += err[:, :, LATENT_CHANNELS:].mean().item() / t.gradient_accumulation_steps
            per_sample = err[:, :, LATENT_CHANNELS:].mean(dim=(1, 2, 3, 4))
            for tid_, ls in zip(batch["task_ids"].tolist(), per_sample.tolist(), strict=True):
                name = next(k for k in t.tasks if task_id(k) == tid_)
                per_task.setdefault(name, []).append(ls)
        done = step + 1
        grad_norm = engine.get_global_grad_norm()
        row = {"step": done, **sums, "lr": lr_schedule.get_last_lr()[0],
               "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}
        row.update({f"loss_dense_{k}": float(np.mean(v)) for k, v in per_task.items()})
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        if done % t.log_every == 0 or done == end:
            elapsed = time.perf_counter() - tick
            tick = time.perf_counter()
            n_steps = t.log_every if done % t.log_every == 0 else (done - start) % t.log_every or t.log_every
            samples = n_steps * t.micro_batch_size * t.gradient_accumulation_steps
            metrics = {k: v for k, v in row.items() if k != "step"}
            metrics.update(samples_per_s=samples / elapsed, tokens_per_s=samples * tokens_per_sample / elapsed,
                           peak_memory_gb=_peak_memory_gb(device))
            if log_fn is not None:
                log_fn(metrics, done)
            logger.info("step %d/%d loss %.4f (rgb %.4f, dense %.4f)", done, t.steps, row["loss"], row["loss_rgb"],
                        row["loss_dense"])
        if done % t.checkpoint_every == 0 or done == t.steps:
            last_ckpt = save_checkpoint(engine, ckpt_dir, done, history, t.keep_last)
    bar.close()
    return engine.module, TrainResult(steps_done=end, resumed_from=resumed_from, history=history, checkpoint=last_ckpt)


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def write_history(history: list[dict[str, float]], path: Path) -> None:
    """CSV for DVC plots: one row per optimizer step."""
    if not history:
        return
    cols = list(dict.fromkeys(k for row in history for k in row))
    lines = [",".join(cols)] + [",".join("" if (v := row.get(c)) is None or (isinstance(v, float) and math.isnan(v))
                                         else f"{v:.6g}" for c in cols) for row in history]
    write_text(path, "\n".join(lines) + "\n")


def summary(history: list[dict[str, float]], window: int = 20) -> dict[str, float]:
    last = history[-window:]
    return {f"final_{k}": float(np.mean([r[k] for r in last if k in r])) for k in ("loss", "loss_rgb", "loss_dense")}


def dump_json(obj: dict, path: Path) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
