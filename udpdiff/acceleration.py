"""The fast path: how the transformer and the VAE run, never what they compute.

One place applies params.yaml's ``acceleration`` section, so training, the sample stage,
``udpdiff generate`` and the GPU benchmark cannot drift apart:

* **compiled blocks**: ``torch.compile`` on each ``CogVideoXBlock`` through diffusers' own regional
  compilation (``ModelMixin.compile_repeated_blocks``, driven by the transformer's
  ``_repeated_blocks``). Every block shares one compiled graph (parameters are graph inputs), so
  a 42-block 5B model compiles one block, once per process; Inductor's on-disk cache makes the
  next process's compile a cache hit. ``nn.Module.compile`` swaps the block's call in place: the
  state dict keeps its keys (checkpoints and exports are unchanged), the task-embedding hook on
  ``time_embedding`` stays outside the compiled region, and diffusers' gradient checkpointing
  (``_gradient_checkpointing_func(block, ...)`` calls ``block.__call__``) checkpoints the compiled
  block.
* **activation checkpointing** (training): ``full`` recomputes each block's forward in the backward
  (diffusers' default); ``selective`` keeps what is expensive to recompute (matmul and attention
  outputs) and recomputes only the cheap pointwise work (norms, modulation, GELU, RoPE), so the
  backward costs ~2 forwards instead of 3 for a fraction of the memory of keeping everything.
  Eager blocks get it from a ``torch.utils.checkpoint`` selective policy; a compiled block's own
  AOTAutograd partitioner already makes that choice (it saves the outputs of matmuls and attention
  and rematerialises fused pointwise chains), so a compiled block is called as it is.
* **batched VAE decode**: ``UDPDiffPipeline`` decodes the RGB and the dense half in one VAE call;
  ``vae_decode: sequential`` turns on diffusers' VAE slicing, which decodes one video at a time
  (the memory of two separate decodes, the same frames).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

if TYPE_CHECKING:
    from udpdiff.config import AccelerationParams

logger = logging.getLogger(__name__)

# torch.compile's backend for the blocks. Tests swap in "aot_eager": the same graph capture
# (fullgraph, AOTAutograd for the backward) without Inductor's C++/Triton code generation.
BACKEND = "inductor"


class AccelerationError(ValueError):
    """An acceleration setting this model or run cannot honour (asked for explicitly)."""


@dataclass(frozen=True)
class Acceleration:
    """What ``accelerate`` did (logged, and recorded beside timings)."""

    compiled_blocks: bool
    compile_mode: str | None = None
    reason: str = ""
    attention: str = "sdpa"


def wants_compiled_blocks(setting: bool | str, device: torch.device | str) -> bool:
    """``compile_blocks`` resolved for ``device``: ``auto`` is on for CUDA only."""
    if setting == "auto":
        return torch.device(device).type == "cuda"
    return bool(setting)


def compiled_blocks(transformer: torch.nn.Module) -> bool:
    """Whether any of the transformer's repeated blocks runs compiled (``nn.Module.compile``)."""
    names = set(getattr(transformer, "_repeated_blocks", None) or ())
    return any(type(m).__name__ in names and getattr(m, "_compiled_call_impl", None) is not None
               for m in transformer.modules())


def accelerate(transformer: torch.nn.Module, settings: AccelerationParams, device: torch.device | str, *,
               sharded_parameters: bool = False) -> Acceleration:
    """Apply ``settings`` to ``transformer`` in place (before it is wrapped by DeepSpeed or used by
    a pipeline); returns what was done.

    ``sharded_parameters``: the blocks' weights are gathered by hooks around each module (ZeRO-3).
    Those hooks run inside the block's call, so a compiled block would have to trace DeepSpeed's
    collectives: ``auto`` then stays eager, and an explicit ``true`` is refused.
    """
    # both keys are read whatever the outcome: they are the stage's inputs either way (dvc.yaml)
    setting, mode = settings.compile_blocks, settings.compile_mode
    if not wants_compiled_blocks(setting, device):
        why = "off on the CPU (auto)" if setting == "auto" else "compile_blocks: false"
        return Acceleration(compiled_blocks=False, reason=why)
    if sharded_parameters:
        if setting == "auto":
            return Acceleration(compiled_blocks=False, reason="ZeRO-3 gathers each block's weights in hooks (auto)")
        raise AccelerationError("acceleration.compile_blocks: true cannot compile blocks whose weights ZeRO-3 "
                                "gathers in hooks around them; use auto or false with ZeRO-3")
    if not getattr(transformer, "_repeated_blocks", None):
        raise AccelerationError(f"{type(transformer).__name__} declares no _repeated_blocks to compile")
    if compiled_blocks(transformer):
        return Acceleration(compiled_blocks=True, compile_mode=mode, reason="already compiled")
    # dynamic=False: a new batch size (CFG-parallel's half batch, a last smaller batch) compiles its
    # own static graph instead of turning every later call into a slower symbolic-shape graph
    transformer.compile_repeated_blocks(fullgraph=True, dynamic=False, mode=None if mode == "default" else mode,
                                        backend=BACKEND)
    logger.info("compiled %s's %s blocks (torch.compile, fullgraph, mode %s): the first forward compiles",
                type(transformer).__name__, "/".join(transformer._repeated_blocks), mode)
    return Acceleration(compiled_blocks=True, compile_mode=mode)


# ops whose outputs selective checkpointing keeps: the matmuls (nn.Linear dispatches to mm/addmm)
# and every SDPA backend (their outputs include what the backward needs, e.g. logsumexp)
_SAVED_OPS = frozenset(
    getattr(torch.ops.aten, name).default
    for name in ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable")
    if hasattr(torch.ops.aten, name))


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint(module: torch.nn.Module, *args: Any) -> Any:
    """diffusers' ``gradient_checkpointing_func`` for ``selective``: keep matmul and attention
    outputs, recompute the rest. A compiled block runs as it is (its partitioner does the same)."""
    if getattr(module, "_compiled_call_impl", None) is not None:
        return module(*args)
    return checkpoint(module.__call__, *args, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, _keep_matmuls))


def checkpoint_activations(transformer: torch.nn.Module, mode: bool | str) -> str:
    """Turn on the training transformer's activation checkpointing: ``True``/``"full"`` (diffusers'
    default, whole blocks recomputed), ``"selective"`` (:func:`selective_checkpoint`) or off;
    returns the mode in words."""
    if mode in (True, "full"):
        transformer.enable_gradient_checkpointing()
        return "full"
    if mode == "selective":
        transformer.enable_gradient_checkpointing(gradient_checkpointing_func=selective_checkpoint)
        return "selective"
    if mode is not False:
        raise AccelerationError(f"gradient_checkpointing must be true, false or selective, got {mode!r}")
    return "off"


def adamw(parameters, device: torch.device | str, *, fused: bool | None = None, **kwargs: Any) -> torch.optim.AdamW:
    """torch's AdamW, fused into one kernel per step on CUDA unless ``fused=False`` (the default
    foreach path launches a kernel per op per tensor group); the same update up to rounding."""
    fused = torch.device(device).type == "cuda" if fused is None else fused
    return torch.optim.AdamW(parameters, fused=fused, **kwargs)


def accelerate_pipeline(pipe, settings: AccelerationParams) -> Acceleration:
    """``accelerate`` for a pipeline's transformer (on the pipeline's device), its attention kernel
    (:func:`use_attention`) and its VAE decode: batched (one call for the video and the colormap)
    or sequential (VAE slicing)."""
    if settings.vae_decode == "sequential":
        pipe.vae.enable_slicing()
    else:
        pipe.vae.disable_slicing()
    kernel = use_attention(pipe.transformer, settings)
    done = accelerate(pipe.transformer, settings, pipe.transformer.device)
    return Acceleration(done.compiled_blocks, done.compile_mode, done.reason, attention=kernel)


def use_attention(transformer: torch.nn.Module, settings: AccelerationParams) -> str:
    """Give an inference transformer the attention kernel ``settings.attention`` asks for; returns
    the kernel used (``fa3`` or ``sdpa``). ``auto`` picks FA3 where it can run."""
    from udpdiff.attention import flash_attention3_available, use_flash_attention3

    wanted = settings.attention
    if wanted == "sdpa" or (wanted == "auto" and not flash_attention3_available()):
        return "sdpa"
    if not flash_attention3_available():
        raise AccelerationError("acceleration.attention: fa3 needs a Hopper (sm90) GPU and the fa3-fwd wheel "
                                "(pip install fa3-fwd); use auto or sdpa")
    use_flash_attention3(transformer)
    logger.info("attention: FlashAttention-3 forward (udpdiff.attention)")
    return "fa3"
