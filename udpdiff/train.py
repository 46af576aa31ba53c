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

import collections
import contextlib
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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from udpdiff.acceleration import accelerate, bf16_parameters, checkpoint_activations
from udpdiff.acceleration import optimizer as build_optimizer
from udpdiff.config import Params, TrainParams, unrecorded
from udpdiff.extensions_lock import before_deepspeed_build
from udpdiff.io.atomic import write_text
from udpdiff.latents import LatentDataset, OnlineLatentDataset
from udpdiff.models.transformer import LATENT_CHANNELS, UDPDiffTransformer3DModel, load_transformer
from udpdiff.stage_code import changed_files
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
    run_dir: Path | None = None  # this run's checkpoints, and its preview grids in train_samples/
    # resumed (train.on_code_change: resume) from a checkpoint that other code wrote: these files differ
    code_changed: list[str] = field(default_factory=list)


# -- distributed / DeepSpeed -----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: torch.device) -> None:
    """Single-process runs get a one-rank process group; launchers (deepspeed, torchrun) set the
    env vars themselves. Every caller (training, the benchmarks) goes through here first."""
    import deepspeed
    import torch.distributed as dist

    # DeepSpeed JIT-builds ops from here on (init_distributed: its CPU shm comm op, ~30 s on 2 cores):
    # skip the one no CPU run uses and never hang on a lock left by a killed build
    before_deepspeed_build()
    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    own_port = "MASTER_PORT" not in os.environ
    if own_port:
        os.environ["MASTER_PORT"] = str(_free_port())
    try:
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    finally:
        if own_port:
            # the store is bound now; a process started later from this one (a test's subprocess, a
            # launcher) must pick its own port, not inherit this one while it is still in use
            os.environ.pop("MASTER_PORT", None)


class DeepSpeedConfigError(ValueError):
    """The DeepSpeed JSON is missing, not JSON, or contradicts params.yaml."""


def rank_and_world() -> tuple[int, int]:
    """This process's data-parallel rank and the number of ranks (0, 1 outside a launcher)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def load_deepspeed_config(path: str | Path, p: Params, world_size: int = 1) -> dict:
    """The shipped (or a user's) DeepSpeed JSON with its ``"auto"`` values filled from params.yaml.

    params.yaml stays the one source of batch size, accumulation, clipping and precision (they
    shape the data order and the run fingerprint): an explicit value in the JSON that disagrees
    is an error naming the file and key, never a silent override.
    """
    t = p.active.train
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise DeepSpeedConfigError(f"{path}: DeepSpeed config not found (train.deepspeed_config)") from None
    except json.JSONDecodeError as e:
        raise DeepSpeedConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("zero_optimization", {}), dict):
        raise DeepSpeedConfigError(f"{path}: expected a JSON object with a zero_optimization object")
    wanted = {
        ("train_micro_batch_size_per_gpu",): t.micro_batch_size,
        ("gradient_accumulation_steps",): t.gradient_accumulation_steps,
        ("train_batch_size",): t.micro_batch_size * t.gradient_accumulation_steps * world_size,
        ("gradient_clipping",): t.max_grad_norm,
        # DeepSpeed's bf16 mode keeps an fp32 master copy; master_weights: bf16 trains the bf16 module itself
        ("bf16", "enabled"): t.precision == "bf16" and t.master_weights == "fp32",
        ("fp16", "enabled"): t.precision == "fp16",
    }
    if t.optimizer == "adamw8bit" and zero_stage(cfg) != 0:
        # ZeRO partitions flat fp32 copies of the weights, whose moments torchao keeps in full precision
        raise DeepSpeedConfigError(f"{path}: ZeRO stage {zero_stage(cfg)} keeps flat fp32 copies of the weights; "
                                   "train.optimizer: adamw8bit needs stage 0 (infra/deepspeed/zero0.json)")
    if "optimizer" in cfg:  # DeepSpeed builds it (DeepSpeedCPUAdam under ZeRO-Offload)
        if t.optimizer != "adamw":
            raise DeepSpeedConfigError(f"{path}: names DeepSpeed's optimizer, but train.optimizer is {t.optimizer}; "
                                       "use a JSON without an optimizer section")
        if not isinstance(cfg["optimizer"], dict) or str(cfg["optimizer"].get("type", "")).lower() != "adamw":
            raise DeepSpeedConfigError(f"{path}: optimizer.type must be AdamW (the paper's optimizer)")
        wanted[("optimizer", "params", "lr")] = t.lr
        wanted[("optimizer", "params", "weight_decay")] = t.weight_decay
    for keys, value in wanted.items():
        node = cfg
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        current = node.get(keys[-1], "auto")
        if current == "auto":
            if keys != ("train_batch_size",):  # DeepSpeed derives it; only checked when given
                node[keys[-1]] = value
        elif current != value:
            raise DeepSpeedConfigError(f"{path}: {'.'.join(keys)} is {current!r} but params.yaml implies {value!r}; "
                                       "set it to \"auto\" or change train.* in params.yaml")
    if not torch.cuda.is_available():  # pinned host memory needs CUDA
        for key in ("offload_optimizer", "offload_param"):
            if isinstance(cfg["zero_optimization"].get(key), dict):
                cfg["zero_optimization"][key]["pin_memory"] = False
    return cfg


def resolve_config_path(path: str | Path, root: Path | None = None) -> Path:
    """A repo-relative config path: against ``root`` (the project), else the working directory,
    else the checkout this package lives in."""
    path = Path(path)
    if path.is_absolute():
        return path
    for base in ([root] if root is not None else []) + [Path.cwd(), Path(__file__).resolve().parents[1]]:
        if (base / path).exists():
            return base / path
    return (root or Path.cwd()) / path


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


# -- checkpoints ------------------------------------------------------------------------------------
# settings a resumed run may change without invalidating its checkpoints
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "keep_last", "log_every", "sample_every", "validation_videos",
                     "log_checkpoints", "deepspeed_config", "latents", "on_code_change"}
CODE_FILE = "code.json"  # in each checkpoint: {file: sha256} of the code that wrote it
# settings added after runs existed, at the value those runs had: left out of the fingerprint there,
# so that their checkpoints keep resuming
FINGERPRINT_SILENT_DEFAULTS = {"optimizer": "adamw", "master_weights": "fp32"}


def _ignore_approximate(p: Params, rank: int) -> None:
    """``acceleration.approximate`` is for sampling only: training ignores it (it is no input of the
    train stage, so it is read unrecorded) and says so when it is set."""
    with unrecorded():
        approx = p.active.acceleration.approximate
        if approx.active and rank == 0:
            logger.warning("acceleration.approximate (%s) is for sampling only: training ignores it", approx)


def run_fingerprint(p: Params, ds_config: dict | None = None, world_size: int = 1, data_digest: str = "") -> str:
    """Hash of the settings a checkpoint depends on (not the ones a resumed run may change).

    The ZeRO stage and the number of ranks count too: ZeRO shards optimizer state per rank, and
    the data order follows the global batch; the JSON's tuning knobs (buckets, offload) do not.
    ``data_digest`` names the training data itself (``udpdiff.latents.cache_digest``): equal
    params over other data (new clips, a retrained VAE) must not resume the old run's checkpoints."""
    with unrecorded():
        a = p.active
        state = {"seed": p.seed, "data": a.data.model_dump(), "pixelplanes": a.pixelplanes.model_dump(),
                 "vae": a.vae.model_dump(), "text_encoder": a.text_encoder.model_dump(),
                 "transformer": a.transformer.model_dump(), "scheduler": a.scheduler.model_dump(),
                 "train": {k: v for k, v in a.train.model_dump().items() if k not in RESUMABLE_CHANGES
                           and FINGERPRINT_SILENT_DEFAULTS.get(k, object()) != v}}
    zero = (ds_config or {}).get("zero_optimization", {"stage": 2})
    state["distributed"] = {"zero_stage": int(zero.get("stage", 0)), "world_size": world_size,
                            "optimizer_by_deepspeed": "optimizer" in (ds_config or {}),
                            "offload_optimizer": (zero.get("offload_optimizer") or {}).get("device", "none")}
    if data_digest:
        state["data_digest"] = data_digest
    return "run-" + hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()[:12]


def lr_factors(train: TrainParams) -> Callable[[int], float]:
    """The factor on ``train.lr`` at each update (0-based): diffusers.optimization's schedule
    ``train.lr_schedule`` with ``train.warmup_steps`` of linear warmup, one step on, so that the first
    update already moves (diffusers' step 0 has lr 0) and the last one, at ``steps - 1``, is not 0."""
    from diffusers.optimization import SchedulerType, get_scheduler

    name = {"constant": SchedulerType.CONSTANT_WITH_WARMUP}.get(train.lr_schedule, SchedulerType(train.lr_schedule))
    # diffusers builds a LambdaLR around the function; a throwaway optimizer hands it over untouched
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    factor = get_scheduler(name, probe, num_warmup_steps=train.warmup_steps,
                           num_training_steps=train.steps + 1).lr_lambdas[0]
    return lambda update: factor(update + 1)


def lr_schedule(optimizer: torch.optim.Optimizer, train: TrainParams) -> torch.optim.lr_scheduler.LambdaLR:
    """``train``'s learning-rate schedule on ``optimizer`` (DeepSpeed calls this with its optimizer and
    saves and restores the scheduler's step with each checkpoint)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factors(train))


def latest_checkpoint(ckpt_dir: Path) -> tuple[str, int] | None:
    latest = ckpt_dir / "latest"
    if not latest.exists():
        return None
    tag = latest.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        logger.warning("%s names %s, which does not exist; starting fresh", latest, tag)
        return None
    return tag, int(tag.split("-")[-1])


def save_checkpoint(engine, ckpt_dir: Path, step: int, history: list[dict], keep_last: int,
                    code: dict[str, str] | None = None) -> Path:
    """Every rank writes its ZeRO shards into a hidden tag folder; rank 0 then renames it into
    place and replaces ``latest`` atomically: a kill at any point leaves the previous checkpoint
    usable. (Multi-node runs need ``ckpt_dir`` on a shared filesystem, as DeepSpeed does.)
    ``code`` (file digests, see :func:`resume_point`) is written beside the shards."""
    rank, _ = rank_and_world()
    tag = f"step-{step:08d}"
    tmp_tag = f".tmp-{tag}"
    if rank == 0:
        shutil.rmtree(ckpt_dir / tmp_tag, ignore_errors=True)
    _barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state={"step": step, "history": history},
                           save_latest=False)
    _barrier()
    final = ckpt_dir / tag
    if rank == 0:
        if code is not None:
            write_text(ckpt_dir / tmp_tag / CODE_FILE, json.dumps(code, indent=1, sort_keys=True) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(ckpt_dir / tmp_tag, final)
        write_text(ckpt_dir / "latest", tag)
        for old in sorted(d for d in ckpt_dir.glob("step-*") if d.is_dir())[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def resume_point(ckpt_dir: Path, code: dict[str, str] | None, on_code_change: str) -> tuple[str | None, list[str]]:
    """The checkpoint tag a run resumes from (None: start fresh), and the files whose code differs
    from what wrote it.

    A run's folder is named by its settings and data (:func:`run_fingerprint`), not its code, so
    that an interrupted run resumes. But DVC reruns the train stage when the code it imports
    changes, and resuming then (a finished run: at once) would hand back the old code's model
    under the new code's name. So each checkpoint records ``code`` (``{file: sha256}``,
    ``udpdiff.stage_code.stage_code_digests``), and when it differs ``on_code_change`` decides:
    ``restart`` sets the old run's folder aside (``<run>.code-<digest>``: the last run of each code is kept) and
    trains from step 0; ``resume`` continues it (a fix that does not change what was learnt) and
    says so. Called on every rank; rank 0 moves the folder. Checkpoints from before this record
    (no code.json) resume."""
    found = latest_checkpoint(ckpt_dir)
    if found is None or code is None:
        return (found[0] if found else None), []
    tag = found[0]
    record = ckpt_dir / tag / CODE_FILE
    if not record.exists():
        logger.info("%s records no code (written before checkpoints did); resuming it", ckpt_dir / tag)
        return tag, []
    recorded = json.loads(record.read_text())
    changed = changed_files(recorded, code)
    if not changed:
        return tag, []
    listed = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
    if on_code_change == "resume":
        logger.warning("resuming %s, which other code wrote (changed since: %s) — train.on_code_change: resume",
                       ckpt_dir / tag, listed)
        return tag, changed
    digest = hashlib.sha256(json.dumps(recorded, sort_keys=True).encode()).hexdigest()[:8]
    aside = ckpt_dir.with_name(f"{ckpt_dir.name}.code-{digest}")
    _barrier()  # every rank has read the record before it moves
    if rank_and_world()[0] == 0:
        shutil.rmtree(aside, ignore_errors=True)  # the same old code set aside before: the newer run
        os.replace(ckpt_dir, aside)
        ckpt_dir.mkdir()
    _barrier()
    logger.warning("not resuming: the code changed since %s was written (%s); training from step 0. The old "
                   "run is kept in %s; train.on_code_change: resume would have continued it", tag, listed, aside)
    return None, []


# -- batches ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0xDA7A]).permutation(n)


# batches built ahead on CUDA, one worker thread each: a `small` batch's CPU draws (~40 ms) are half
# of its 88 ms step on an H200, so two keep up with room to spare
PREFETCH_AHEAD = 2


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device`` without a host synchronisation on CUDA: a copy from pageable memory waits
    for the stream to drain, and a batch built that way in the prefetch thread drained the training's
    kernel queue ~200 times a step (benchmarks/results/train-host-overhead-h200.md)."""
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def make_batch(
    data: LatentDataset,
    p: Params,
    step: int,
    micro: int,
    scaling_factor: float,
    alphas_cumprod: torch.Tensor,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s micro-batch of optimizer step ``step``: a pure function of its arguments.
    Its random numbers come from CPU generators (so a batch is the same on any device and rank
    count); the arithmetic on them runs on ``device`` (on the CPU it costs a small model's step
    more than the model does: tens of ms per 16 clips, and far more under thread contention).

    The global batch of a step is ``world_size`` consecutive micro-batches of the epoch
    permutation, one per rank, so ranks never see the same clip in a step, and a run on N GPUs
    is the same computation as one on a single GPU with N times the accumulation."""
    t = p.active.train
    seed = p.seed
    b = t.micro_batch_size
    position = ((step * t.gradient_accumulation_steps + micro) * world_size + rank) * b
    idx = []
    for k in range(position, position + b):
        epoch, offset = divmod(k, len(data))
        idx.append(int(epoch_order(seed, epoch, len(data))[offset]))
    # streams keyed by the micro-batch's place in the global batch: N ranks with accumulation A
    # draw exactly what one rank with accumulation N·A draws (same data, noise and timesteps)
    rng = np.random.default_rng([seed, step, micro * world_size + rank])
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    dense = bool(t.tasks)  # no tasks: the RGB-only baseline, 16-channel latents
    tasks = rng.choice(len(t.tasks), size=b, p=t.task_ratio) if dense else [None] * b
    long_caption = rng.random(b) < t.long_caption_prob
    drop_caption = rng.random(b) < t.caption_dropout_prob
    # the draws on the CPU, clip by clip in a fixed order; then one copy per tensor and the arithmetic
    # on ``device`` (the same elementwise kernels whatever the batch size: the same numbers)
    mean, std, eps, text, task_ids, clip_idx = [], [], [], [], [], []
    for j, i in enumerate(idx):
        rec = data[i]
        task = t.tasks[tasks[j]] if dense else None
        halves = ("rgb", task) if dense else ("rgb",)  # (32|16, F, h, w): RGB ‖ dense
        mean.append(torch.cat([rec[f"{x}_mean"] for x in halves]))
        std.append(torch.cat([rec[f"{x}_std"] for x in halves]))
        eps.append(torch.cat([torch.randn(rec[f"{x}_mean"].shape, generator=gen) for x in halves]))
        key = "long" if long_caption[j] else "short"
        if t.task_conditioning == "text-prompt":
            key = f"{key}:{task}"
        text.append(data.empty_text if drop_caption[j] else rec[f"text:{key}"])
        task_ids.append(task_id(task) if dense else -1)
        clip_idx.append(i)
    device = torch.device(device)
    # a sample of each clip's cached VAE posterior N(mean, std^2)
    mean, std, eps = (_to_device(torch.stack(x), device) for x in (mean, std, eps))
    x0 = mean + std * eps
    x0_t = x0.permute(0, 2, 1, 3, 4) * scaling_factor  # (B, F, C, h, w) as CogVideoX
    noise = _to_device(torch.randn(x0_t.shape, generator=gen), device)
    timesteps = torch.randint(0, len(alphas_cumprod), (b,), generator=gen)
    a = _to_device(alphas_cumprod[timesteps].view(-1, 1, 1, 1, 1), device)
    noisy = a.sqrt() * x0_t + (1 - a).sqrt() * noise
    v_target = a.sqrt() * noise - (1 - a).sqrt() * x0_t
    batch = {
        "noisy": noisy,
        "v_target": v_target,
        "timesteps": _to_device(timesteps, device),
        "text": _to_device(torch.stack(text), device),
        "task_ids": _to_device(torch.tensor(task_ids), device),
        "clip_index": torch.tensor(clip_idx),
    }
    if dense and t.rgb_given_prob > 0:
        # drawn after every other number of the batch, so the rest of it is what it is without;
        # a mask and torch.where, not boolean indexing, which would wait for the GPU to count the mask
        given = torch.zeros(b, 1, x0_t.shape[2], 1, 1, dtype=torch.bool)
        given[torch.from_numpy(rng.random(b) < t.rgb_given_prob), :, :LATENT_CHANNELS] = True
        given = _to_device(given, device)
        batch["noisy"] = torch.where(given, x0_t.to(noisy.dtype), noisy)
        batch["loss_weight"] = (~given).float()  # a given half has nothing to predict
    return batch


def prefetched(make: Callable[[int, int], dict], steps: range, micro_batches: int, ahead: int,
               worker_init: Callable[[], object] | None = None) -> Iterator[dict]:
    """``make(step, micro)`` for every micro-batch of ``steps``, in order; with ``ahead`` > 0, the next
    ``ahead`` ones are built in as many worker threads (each set up by ``worker_init``) while the
    model trains on this one. On a GPU a batch's CPU work (its random draws: ~40 ms per step for
    `small`) then overlaps the model's step instead of idling the GPU between steps, and two workers
    keep up with a step shorter than one batch's draws. The batches are the same either way:
    ``make_batch`` is a pure function."""
    keys = [(step, micro) for step in steps for micro in range(micro_batches)]
    if not ahead:
        yield from (make(*key) for key in keys)
        return
    with ThreadPoolExecutor(max_workers=int(ahead), thread_name_prefix="udpdiff-batches",
                            initializer=worker_init) as pool:
        pending: collections.deque = collections.deque()
        for key in keys:
            pending.append(pool.submit(make, *key))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def weighted_mean(err: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The mean of ``err`` over the elements ``weight`` (broadcast) counts; the plain mean without one."""
    if weight is None:
        return err.mean()
    weight = weight.expand_as(err)
    return (err * weight).sum() / weight.sum().clamp_min(1)


def squared_error(model, batch: dict[str, torch.Tensor], rotary, task_ids: bool, dtype: torch.dtype) -> torch.Tensor:
    """(v̂ − v)² per element of ``batch`` (:func:`make_batch`), ``model`` the DeepSpeed engine or its
    module. DeepSpeed casts the weights to bf16/fp16, not the inputs: latents and text come as fp32."""
    kwargs = {"task_id": batch["task_ids"]} if task_ids else {}
    pred = model(hidden_states=batch["noisy"].to(dtype), encoder_hidden_states=batch["text"].to(dtype),
                 timestep=batch["timesteps"], image_rotary_emb=rotary, return_dict=False, **kwargs)[0]
    return (pred.float() - batch["v_target"]).pow(2)


@torch.no_grad()
def fixed_draw_loss(module: UDPDiffTransformer3DModel, data, p: Params, scaling_factor: float,
                    alphas_cumprod: torch.Tensor, vae_scale_spatial: int, draws_per_clip: int = 4) -> dict[str, float]:
    """The training loss of ``data``'s clips (a :class:`LatentDataset` or online one) at fixed draws:
    the noise, timesteps, tasks and captions of :func:`make_batch`'s first steps over these clips,
    each clip about ``draws_per_clip`` times. The same draws at every call, so the figure moves with
    the weights alone: held-out clips beside training clips tell memorisation (a widening gap) from
    underfitting. ``loss`` as training weighs it; ``loss_dense`` the dense half alone."""
    t = p.active.train
    device = next(module.parameters()).device
    dtype = next(module.parameters()).dtype
    frames, h, w = data[0]["rgb_mean"].shape[1:]
    rotary = rotary_embeddings(module, vae_scale_spatial, h * vae_scale_spatial, w * vae_scale_spatial, frames,
                               device)
    per_step = t.micro_batch_size * t.gradient_accumulation_steps
    alphas = alphas_cumprod.float()
    sums = {"loss": 0.0, "loss_dense": 0.0} if t.tasks else {"loss": 0.0}
    batches = 0
    for step in range(math.ceil(draws_per_clip * len(data) / per_step)):
        for micro in range(t.gradient_accumulation_steps):
            batch = make_batch(data, p, step, micro, scaling_factor, alphas, device=device)
            err = squared_error(module, batch, rotary, bool(module.config.num_tasks), dtype)
            sums["loss"] += float(weighted_mean(err, batch.get("loss_weight")))
            if t.tasks:
                sums["loss_dense"] += float(err[:, :, LATENT_CHANNELS:].mean())
            batches += 1
    return {k: v / batches for k, v in sums.items()}


def rotary_embeddings(transformer: UDPDiffTransformer3DModel, vae_scale: int, height: int, width: int,
                      latent_frames: int, device: torch.device):
    """The rotary tables CogVideoX-5B needs; reuses the pipeline's own construction."""
    if not transformer.config.use_rotary_positional_embeddings:
        return None
    from diffusers import CogVideoXPipeline

    shim = type("_Shim", (), {"vae_scale_factor_spatial": vae_scale, "transformer": transformer})()
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(shim, height, width, latent_frames, device)


def _mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalars over data-parallel ranks (NaN-aware: a rank without a task adds nothing)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    keys = sorted(values)
    v = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    have = torch.isfinite(v)
    stacked = torch.stack([torch.where(have, v, torch.zeros_like(v)), have.to(v.dtype)])
    dist.all_reduce(stacked)
    mean = stacked[0] / stacked[1].clamp_min(1)
    mean[stacked[1] == 0] = float("nan")
    return dict(zip(keys, mean.tolist(), strict=True))


@contextlib.contextmanager
def full_weights(engine, zero: int) -> Iterator[torch.nn.Module]:
    """The module with its full parameters: as is under ZeRO 0–2; gathered on every rank (a
    collective: all ranks must enter) under ZeRO-3, whose ranks hold only shards."""
    if zero == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            yield engine.module
    else:
        yield engine.module


# -- the loop ---------------------------------------------------------------------------------------
PreviewFn = Callable[[torch.nn.Module, int, Path], "Path | None"]
ArtifactFn = Callable[[Path, str], None]


def train_device() -> torch.device:
    """This rank's device: its GPU (``LOCAL_RANK`` under a launcher), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def train(
    p: Params,
    latents: Path | LatentDataset | OnlineLatentDataset,
    train_ids: list[str],
    ckpt_dir: Path,
    scaling_factor: float,
    vae_scale_spatial: int,
    scheduler,
    log_fn: LogFn | None = None,
    max_steps_this_run: int | None = None,
    ds_config: dict | str | Path | None = None,
    preview_fn: PreviewFn | None = None,
    artifact_fn: ArtifactFn | None = None,
    data_digest: str = "",
    prefetch: bool | None = None,
    code: dict[str, str] | None = None,
) -> tuple[UDPDiffTransformer3DModel, TrainResult]:
    """Train (or resume) the transformer; returns the trained module and what happened.

    ``latents`` is the latents stage's cache folder (read for ``train_ids``) or a dataset object
    (``OnlineLatentDataset`` encodes clips as batches need them). Runs as one process, or as one
    rank of ``deepspeed``/``torchrun`` (see infra/README.md):
    every rank calls this; rank 0 alone logs, writes previews and reports artifacts.
    ``ds_config`` is a DeepSpeed config (``load_deepspeed_config``) or its JSON file; by default
    ``train.deepspeed_config``, relative to the working directory. ``preview_fn(module, step)``
    renders a sample grid every ``train.sample_every`` steps (called on all ranks, since under
    ZeRO-3 a forward pass is collective); rank 0 writes it to the path given, inside the run's
    checkpoint folder so that a resumed run keeps the earlier grids, and returns it; ``artifact_fn(path,
    artifact_dir)`` receives previews and checkpoints. ``max_steps_this_run`` stops early (as a
    kill would) — used by resume tests. ``prefetch`` builds each batch while the previous one trains
    (:func:`prefetched`); by default on CUDA with cached latents only: on the CPU the worker would take
    the model's cores, and an online dataset would run the VAE beside training (its memory on top).
    ``code`` (``{file: sha256}`` of the code training runs) goes into each checkpoint; a checkpoint
    that other code wrote is resumed or set aside as ``train.on_code_change`` says (:func:`resume_point`).
    """
    import deepspeed
    from tqdm.auto import tqdm

    t = p.active.train
    device = train_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_distributed(device)
    rank, world = rank_and_world()
    if not isinstance(ds_config, dict):  # a path (or None: params' own), read once the world size is known
        ds_config = load_deepspeed_config(resolve_config_path(ds_config or t.deepspeed_config), p, world)
    zero = zero_stage(ds_config)
    if zero == 3 and t.gradient_checkpointing == "selective":
        # ZeRO-3 puts its own autograd function in place of torch.nn.functional.linear, and selective
        # recomputation through it gives other gradients than none (tests/test_acceleration.py)
        raise DeepSpeedConfigError("ZeRO stage 3 with train.gradient_checkpointing: selective computes wrong "
                                   "gradients; use true (full recomputation) or false with ZeRO-3, or ZeRO-2")
    data = LatentDataset(latents, train_ids) if isinstance(latents, str | Path) else latents
    alphas_cumprod = scheduler.alphas_cumprod.float()
    # the embedding table is indexed by the global task ids, so it spans up to the largest one used
    num_tasks = max(task_id(x) for x in t.tasks) + 1 if t.task_conditioning == "embedding" else 0
    dense = bool(t.tasks)
    transformer = load_transformer(p.active.transformer.model_dump(), num_tasks=num_tasks, seed=p.seed, dense=dense)
    if t.master_weights == "bf16":  # no fp32 copy anywhere: the optimizer updates these weights
        bf16_parameters(transformer)
    checkpointing = checkpoint_activations(transformer, t.gradient_checkpointing)
    transformer.train()
    # compiled blocks (on CUDA by default): before DeepSpeed wraps the model, in place, so the state
    # dict and its checkpoints keep their keys; not in run_fingerprint (a run resumes across a change)
    acceleration = accelerate(transformer, p.active.acceleration, device, sharded_parameters=zero == 3)
    _ignore_approximate(p, rank)
    if rank == 0:
        logger.info("transformer blocks: %s; activation checkpointing: %s", "compiled" if acceleration.compiled_blocks
                    else f"eager ({acceleration.reason})", checkpointing)

    # AdamW, built by DeepSpeed when the config names it (its CPU Adam for ZeRO-Offload), else here
    # (fused on CUDA; or 8-bit)
    optimizer = None if "optimizer" in ds_config else \
        build_optimizer(t.optimizer, transformer.parameters(), device, bf16_weights=t.master_weights == "bf16",
                        lr=t.lr, weight_decay=t.weight_decay)
    engine, _, _, lr_scheduler = deepspeed.initialize(model=transformer, model_parameters=transformer.parameters(),
                                                     optimizer=optimizer,
                                                     lr_scheduler=functools.partial(lr_schedule, train=t),
                                                     config=ds_config)
    is_main = rank == 0
    log_fn = log_fn if is_main else None
    artifact_fn = artifact_fn if is_main else None

    # checkpoints live under a fingerprint of everything that shapes the run, so a run with other
    # settings or data never resumes from them (extending `steps` keeps the fingerprint and resumes)
    ckpt_dir = ckpt_dir / run_fingerprint(p, ds_config, world, data_digest)
    if is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        others = [d.name for d in ckpt_dir.parent.iterdir() if d.is_dir() and d != ckpt_dir]
        if others:
            logger.info("not resuming the other runs (other settings, data or code) in %s: %s", ckpt_dir.parent, others)
    _barrier()
    start, history, last_ckpt = 0, [], None
    tag, code_changed = resume_point(ckpt_dir, code, t.on_code_change)
    if tag is not None:
        _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        start, history, last_ckpt = client["step"], list(client["history"]), ckpt_dir / tag
        logger.info("resumed from %s at step %d", last_ckpt, start)
    resumed_from = start

    sample0 = data[0]["rgb_mean"]  # (16, F, h, w)
    latent_frames, h, w = sample0.shape[1:]
    rotary = rotary_embeddings(transformer, vae_scale_spatial, h * vae_scale_spatial, w * vae_scale_spatial,
                               latent_frames, device)
    tokens_per_sample = latent_frames * (h // transformer.config.patch_size) * (w // transformer.config.patch_size)
    end = t.steps if max_steps_this_run is None else min(t.steps, start + max_steps_this_run)
    bar = tqdm(range(start, end), desc="train", initial=start, total=t.steps, leave=False, disable=not is_main)
    tick = time.perf_counter()
    model_dtype = next(engine.module.parameters()).dtype
    on_gpu = device.type == "cuda"
    build_ahead = on_gpu and isinstance(data, LatentDataset) if prefetch is None else prefetch
    batches = prefetched(functools.partial(make_batch, data, p, scaling_factor=scaling_factor,
                                           alphas_cumprod=alphas_cumprod, rank=rank, world_size=world, device=device),
                         range(start, end), t.gradient_accumulation_steps, ahead=PREFETCH_AHEAD if build_ahead else 0,
                         # a new thread's current GPU is 0: rank k's worker would open a context there
                         worker_init=functools.partial(torch.cuda.set_device, device) if on_gpu else None)
    for step in bar:
        sums = {"loss": 0.0, "loss_rgb": 0.0, **({"loss_dense": 0.0} if dense else {})}
        per_task: dict[str, list[float]] = {}
        lr = lr_scheduler.get_last_lr()[0]  # this update's: engine.step() moves the schedule on
        for micro in range(t.gradient_accumulation_steps):
            batch = next(batches)  # make_batch(data, p, step, micro, ...)
            err = squared_error(engine, batch, rotary, bool(num_tasks), model_dtype)
            weight = batch.get("loss_weight")
            loss = weighted_mean(err, weight)
            engine.backward(loss)
            own_norm = grad_norm_unreported(engine) if micro == t.gradient_accumulation_steps - 1 else None
            if t.master_weights == "bf16":
                # stochastic rounding draws from the global generator: seeded per update, so that a
                # resumed run and every rank (each updates its own copy under ZeRO-0) round alike
                torch.manual_seed(hash((p.seed, step, micro)) % 2**63)
            engine.step()
            # the loss is read once the update is queued: a read before the backward left the GPU idle
            # while the backward was launched (~4 ms of a `small` step). Every rank must agree to stop,
            # or the others would wait forever in the next collective.
            finite = _mean_over_ranks({"finite": float(torch.isfinite(loss))}, device)["finite"] == 1.0
            if not finite:
                raise TrainingDivergedError(
                    f"loss is {loss.item()} on rank {rank} at step {step + 1} (micro-batch {micro}) or another rank's "
                    f"is not finite; stopped without saving. Last good checkpoint: {last_ckpt or 'none yet'}. "
                    "Lower train.lr or check the inputs."
                )
            sums["loss"] += loss.item() / t.gradient_accumulation_steps
            rgb_weight = None if weight is None else weight[:, :, :LATENT_CHANNELS]
            loss_rgb = weighted_mean(err[:, :, :LATENT_CHANNELS], rgb_weight)
            sums["loss_rgb"] += loss_rgb.item() / t.gradient_accumulation_steps
            if not dense:
                continue
            sums["loss_dense"] += err[:, :, LATENT_CHANNELS:].mean().item() / t.gradient_accumulation_steps
            per_sample = err[:, :, LATENT_CHANNELS:].mean(dim=(1, 2, 3, 4))
            for tid_, ls in zip(batch["task_ids"].tolist(), per_sample.tolist(), strict=True):
                name = next(k for k in t.tasks if task_id(k) == tid_)
                per_task.setdefault(name, []).append(ls)
        done = step + 1
        grad_norm = engine.get_global_grad_norm() if own_norm is None else own_norm
        if grad_norm is not None and not math.isfinite(float(grad_norm)) and t.precision != "fp16":
            # bf16/fp32 have no loss scale to back off: the shipped ZeRO-2 JSON leaves DeepSpeed's per-tensor
            # overflow check off (a third of a `small` step), so a non-finite gradient stops the run here
            # (the norm is the same on every rank) instead of being skipped silently; fp16 skips by design
            raise TrainingDivergedError(
                f"the gradient norm is {float(grad_norm)} at step {done} with a finite loss; stopped without saving. "
                f"Last good checkpoint: {last_ckpt or 'none yet'}. Lower train.lr or check the inputs.")
        local = {**sums, **{f"loss_dense_{k}": float(np.mean(per_task[k])) if k in per_task else float("nan")
                            for k in t.tasks}}
        row = {"step": done, **{k: v for k, v in _mean_over_ranks(local, device).items() if not math.isnan(v)},
               "lr": lr,
               "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        if done % t.log_every == 0 or done == end:
            elapsed = time.perf_counter() - tick
            tick = time.perf_counter()
            n_steps = t.log_every if done % t.log_every == 0 else (done - start) % t.log_every or t.log_every
            samples = n_steps * t.micro_batch_size * t.gradient_accumulation_steps * world
            metrics = {k: v for k, v in row.items() if k != "step"}
            metrics.update(samples_per_s=samples / elapsed, tokens_per_s=samples * tokens_per_sample / elapsed,
                           tokens_per_s_per_gpu=samples * tokens_per_sample / elapsed / world,
                           peak_memory_gb=_peak_memory_gb(device))
            if log_fn is not None:
                log_fn(metrics, done)
            if is_main:
                logger.info("step %d/%d loss %.4f (rgb %.4f%s)", done, t.steps, row["loss"], row["loss_rgb"],
                            f", dense {row['loss_dense']:.4f}" if dense else "")
        if done % t.checkpoint_every == 0 or done == t.steps:
            last_ckpt = save_checkpoint(engine, ckpt_dir, done, history, t.keep_last, code)
            if artifact_fn is not None:
                _report_checkpoint(last_ckpt, t.log_checkpoints, artifact_fn)
        if preview_fn is not None and t.sample_every and (done % t.sample_every == 0 or done == t.steps):
            engine.module.eval()
            with full_weights(engine, zero) as module:
                picture = preview_fn(module, done, ckpt_dir / "train_samples" / f"step-{done:08d}.gif")
            engine.module.train()
            if picture is not None and artifact_fn is not None:
                artifact_fn(picture, "train_samples")
    bar.close()
    with full_weights(engine, zero) as module:
        # a plain module with full weights, detached from DeepSpeed (ZeRO-3 would otherwise hand
        # back empty shards), for the pipeline export
        trained = module if zero != 3 else _copy_module(module)
    return trained, TrainResult(steps_done=end, resumed_from=resumed_from, history=history, checkpoint=last_ckpt,
                                run_dir=ckpt_dir, code_changed=code_changed)


def grad_norm_unreported(engine) -> float | None:
    """The gradients' global norm, before clipping, where DeepSpeed reports none: ZeRO-0 without its
    mixed precision (``master_weights: bf16``) clips the module's gradients and keeps no norm. Read
    before ``engine.step()``, which zeroes them (they are already averaged over ranks); else None."""
    if engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    grads = [q.grad for q in engine.module.parameters() if q.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else None


def _copy_module(module: torch.nn.Module) -> UDPDiffTransformer3DModel:
    first = next(module.parameters())
    copy = UDPDiffTransformer3DModel.from_config(module.config).to(first.device, first.dtype)
    copy.load_state_dict({k: v.detach().clone() for k, v in module.state_dict().items()})
    return copy


def _report_checkpoint(path: Path, mode: str, artifact_fn: ArtifactFn) -> None:
    """Hand a checkpoint to the tracker: its files (``artifacts``) or a JSON reference with its
    location and size (``references``: large checkpoints stay where they are)."""
    if mode == "artifacts":
        artifact_fn(path, f"checkpoints/{path.name}")
        return
    files = [f for f in path.rglob("*") if f.is_file()]
    ref = {"checkpoint": str(path.resolve()), "step": int(path.name.split("-")[-1]),
           "files": len(files), "bytes": sum(f.stat().st_size for f in files)}
    ref_file = path / "reference.json"  # pruned together with its checkpoint
    write_text(ref_file, json.dumps(ref, indent=2) + "\n")
    artifact_fn(ref_file, f"checkpoints/{path.name}")


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
    return {f"final_{k}": float(np.mean([r[k] for r in last])) for k in ("loss", "loss_rgb", "loss_dense")
            if all(k in r for r in last)}


def dump_json(obj: dict, path: Path) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
