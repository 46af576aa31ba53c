"""CFG-parallel sampling: one sample's classifier-free-guidance batch split over the ranks of a launcher.

With guidance, every denoising step runs the transformer on a batch of two (unconditional,
conditional) per prompt. Those halves are independent until the guidance mix, so rank ``r`` of
``N`` runs the ``r``-th slice of the batch and the slices are all-gathered: every rank gets the
whole noise prediction and takes the same scheduler step on the same latents (same seed, same
arithmetic), so no other state is exchanged. The pipeline's batched VAE decode (video and
colormap) is split the same way. On two GPUs a sample costs about half the transformer time of one.

It is a diffusers hook (:class:`diffusers.hooks.ModelHook`) on the pipeline's transformer, so
the pipeline's loop is untouched; a batch that does not divide by the rank count (no guidance,
say) runs whole on every rank. The data-parallel alternative, many samples split over ranks
(``udpdiff.distributed``), is what the sample stage uses: it needs no communication at all.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

logger = logging.getLogger(__name__)

HOOK_NAME = "udpdiff_batch_split"
FASTER_CACHE_HOOK = "faster_cache_denoiser"  # diffusers.hooks.faster_cache's hook on the transformer
# the transformer's per-sample inputs (CogVideoXTransformer3DModel.forward); everything else is shared
BATCHED_INPUTS = ("hidden_states", "encoder_hidden_states", "timestep", "ofs", "task_id")


@dataclass
class BatchSplit:
    """Rank ``rank`` of ``world`` in ``group``: its slice of a batch, and the whole batch back."""

    rank: int
    world: int
    group: Any = None
    splits: int = field(default=0, compare=False)  # calls split so far (a check that the split happened)

    def divides(self, batch: int) -> bool:
        return self.world > 1 and batch % self.world == 0

    def local(self, x: torch.Tensor) -> torch.Tensor:
        return x.chunk(self.world)[self.rank]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts)

    def __call__(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``fn(x)`` with the batch split over the ranks (whole on every rank if it does not divide)."""
        if not self.divides(x.shape[0]):
            return fn(x)
        self.splits += 1
        return self.gather(fn(self.local(x)))


class BatchSplitHook(ModelHook):
    """Runs the transformer on this rank's slice of its batched inputs and all-gathers the output."""

    def __init__(self, split: BatchSplit):
        super().__init__()
        self.split = split
        self._active = False

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._positional = _positional_names(module)
        return module

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        bound = dict(zip(self._positional, args, strict=False)) | kwargs
        batch = bound["hidden_states"].shape[0]
        self._active = self.split.divides(batch)
        if not self._active:
            return args, kwargs
        self.split.splits += 1
        for name in BATCHED_INPUTS:
            value = bound.get(name)
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
                bound[name] = self.split.local(value)
        return (), bound

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        if not self._active:
            return output
        if isinstance(output, tuple):
            return (self.split.gather(output[0]), *output[1:])
        output.sample = self.split.gather(output.sample)
        return output


def _positional_names(module: torch.nn.Module) -> list[str]:
    """The names of ``module.forward``'s positional parameters, from the first class in its MRO
    that spells them out (ours takes ``*args`` and passes them on to diffusers')."""
    for cls in type(module).__mro__:
        fn = cls.__dict__.get("forward")
        if fn is None:
            continue
        params = list(inspect.signature(fn).parameters.values())[1:]
        if not any(p.kind is p.VAR_POSITIONAL for p in params):
            return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    raise TypeError(f"{type(module).__name__}.forward names no positional parameters")


def tensor_group(device: torch.device):
    """A process group that can all-gather tensors on ``device``: the default group when its
    backend serves that device, else (CUDA tensors beside a gloo default group, as
    ``udpdiff.distributed.inference_ranks`` makes) a NCCL group over the same ranks. Every rank
    must call it (``new_group`` is collective)."""
    import torch.distributed as dist

    if device.type != "cuda" or dist.get_backend() == "nccl":
        return None
    return dist.new_group(backend="nccl")


def split_cfg_batch(pipe, ranks) -> BatchSplit | None:
    """Split ``pipe``'s transformer batch (and its batched VAE decode) over ``ranks``
    (``udpdiff.distributed.Ranks``; every rank calls this, with the same pipeline, seed and
    prompt). Returns the split, or ``None`` for one rank."""
    if ranks.world <= 1:
        return None
    registry = getattr(pipe.transformer, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(FASTER_CACHE_HOOK) is not None:
        raise ValueError("CFG-parallel gives each rank half of the guidance batch, but FasterCache "
                         "(acceleration.approximate.cache: faster) approximates the unconditional half from the "
                         "whole batch: use one or the other")
    split = BatchSplit(ranks.rank, ranks.world, tensor_group(pipe.transformer.device))
    HookRegistry.check_if_exists_or_initialize(pipe.transformer).register_hook(BatchSplitHook(split), HOOK_NAME)
    pipe.batch_split = split
    logger.info("CFG-parallel: rank %d of %d runs its slice of each transformer batch", ranks.rank, ranks.world)
    return split


def remove_cfg_split(pipe) -> None:
    """Undo :func:`split_cfg_batch`: the pipeline computes whole batches again."""
    registry = getattr(pipe.transformer, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK_NAME) is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)
    pipe.batch_split = None
