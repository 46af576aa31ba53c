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
* **compiled VAE training** (``compile_vae``): ``torch.compile`` of the VAE's encoder and decoder
  while the autoencoder stage trains it, then back to eager (:func:`compiled_while_training`).
  On an H200 it took the ``small`` VAE's step from 0.194 to 0.126 s and its peak memory from 20.0
  to 10.7 GiB (``benchmarks/results/vae-train-modes-h200.md``): Inductor fuses autocast's casts,
  the group norms and the elementwise kernels around the convolutions.
* **batched VAE decode**: ``UDPDiffPipeline`` decodes the RGB and the dense half in one VAE call;
  ``vae_decode: sequential`` turns on diffusers' VAE slicing, which decodes one video at a time
  (the memory of two separate decodes, the same frames).

Everything above is lossless. ``acceleration.approximate`` is not: opt-in approximate sampling,
applied by :func:`accelerate_pipeline` only (sampling, ``udpdiff generate``, the benchmark; training
never calls it, and :func:`check_inference` refuses a transformer in training mode):

* **float8** (:func:`use_float8`): torchao's dynamic float8 (e4m3) activations and weights with one
  scale per row (``rowwise``) or per tensor (``tensorwise``: cuBLAS's scalar-scaled GEMM, usually
  faster, a larger quality cost), in the transformer blocks' ``nn.Linear`` layers only
  (``quantize_`` swaps their weights for float8 tensors in place; the patch embedding, time
  embedding and output head stay bf16). Applied before the blocks are compiled, so Inductor fuses
  the activation quantisation. CUDA sm89+ (Ada, Hopper) with bf16 weights and the optional
  ``torchao`` extra.
* **float8 attention** (``float8_attention``): FlashAttention-3's e4m3 forward kernel, q/k/v scaled
  per sample and head (:mod:`udpdiff.attention`); Hopper and the fa3-fwd wheel.
* **step caches** (:func:`use_cache`): diffusers' ``CacheMixin.enable_cache`` with First-Block
  Cache, FasterCache or Pyramid Attention Broadcast. Their hooks keep state across the steps of
  one sample; diffusers' CogVideoX loop runs each step in ``transformer.cache_context`` and resets
  the hooks when the loop ends, and ``UDPDiffPipeline`` resets them again before each sample (a
  sample interrupted half way leaves nothing behind). First-Block Cache's hooks wrap whole blocks
  and decide per step, on the host, whether to skip: the blocks are then compiled *beneath* the
  hooks (each block's ``forward``, the same one shared graph), never around them. FasterCache and
  PAB hook each block's attention layer, inside the block, and branch on Python state per step: a
  fullgraph-compiled block cannot hold them, so with them the blocks stay eager (``auto``) or the
  combination is refused (``compile_blocks: true``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

if TYPE_CHECKING:
    from udpdiff.config import AccelerationParams, ApproximateParams, CacheParams

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
    float8: str = "none"  # approximate: float8 linears in the blocks (rowwise, tensorwise) or none
    cache: str | None = None  # approximate: the diffusers step cache in use (first-block, faster, pab)


def wants_compile(setting: bool | str, device: torch.device | str) -> bool:
    """``compile_blocks`` or ``compile_vae`` resolved for ``device``: ``auto`` is on for CUDA only."""
    if setting == "auto":
        return torch.device(device).type == "cuda"
    return bool(setting)


def _repeated_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    names = set(getattr(transformer, "_repeated_blocks", None) or ())
    return [m for m in transformer.modules() if type(m).__name__ in names]


def compiled_blocks(transformer: torch.nn.Module) -> bool:
    """Whether any of the transformer's repeated blocks runs compiled: around its call
    (``nn.Module.compile``) or beneath its cache hooks (its ``forward``, :func:`_compile_forwards`)."""
    return any(getattr(m, "_compiled_call_impl", None) is not None or getattr(m, "_udpdiff_compiled_forward", False)
               for m in _repeated_blocks(transformer))


# caches whose hooks sit inside each block (on its attention layer) and branch on Python state per step
_CACHES_INSIDE_BLOCKS = ("faster", "pab")


def accelerate(transformer: torch.nn.Module, settings: AccelerationParams, device: torch.device | str, *,
               sharded_parameters: bool = False, cache: CacheParams | None = None) -> Acceleration:
    """Apply ``settings`` to ``transformer`` in place (before it is wrapped by DeepSpeed or used by
    a pipeline); returns what was done.

    ``sharded_parameters``: the blocks' weights are gathered by hooks around each module (ZeRO-3).
    Those hooks run inside the block's call, so a compiled block would have to trace DeepSpeed's
    collectives: ``auto`` then stays eager, and an explicit ``true`` is refused.
    ``cache``: the step cache :func:`use_cache` will add (sampling only): first-block compiles the
    blocks beneath its hooks; faster and pab keep them eager (``auto``) or are refused (``true``).
    """
    # both keys are read whatever the outcome: they are the stage's inputs either way (dvc.yaml)
    setting, mode = settings.compile_blocks, settings.compile_mode
    if not wants_compile(setting, device):
        why = "off on the CPU (auto)" if setting == "auto" else "compile_blocks: false"
        return Acceleration(compiled_blocks=False, reason=why)
    if sharded_parameters:
        if setting == "auto":
            return Acceleration(compiled_blocks=False, reason="ZeRO-3 gathers each block's weights in hooks (auto)")
        raise AccelerationError("acceleration.compile_blocks: true cannot compile blocks whose weights ZeRO-3 "
                                "gathers in hooks around them; use auto or false with ZeRO-3")
    if cache is not None and cache.type in _CACHES_INSIDE_BLOCKS:
        if setting == "auto":
            return Acceleration(compiled_blocks=False, reason=f"the {cache.type} cache hooks attention inside the "
                                                              "blocks, which a compiled block cannot run (auto)")
        raise AccelerationError(f"acceleration.approximate.cache: {cache.type} hooks each block's attention layer "
                                "and branches on Python state every step, which a fullgraph-compiled block cannot "
                                "run; use compile_blocks: auto or false with it (or the first-block cache)")
    if not getattr(transformer, "_repeated_blocks", None):
        raise AccelerationError(f"{type(transformer).__name__} declares no _repeated_blocks to compile")
    if compiled_blocks(transformer):
        return Acceleration(compiled_blocks=True, compile_mode=mode, reason="already compiled")
    # dynamic=False: a new batch size (CFG-parallel's half batch, a last smaller batch) compiles its
    # own static graph instead of turning every later call into a slower symbolic-shape graph
    options = dict(fullgraph=True, dynamic=False, mode=None if mode == "default" else mode, backend=BACKEND)
    _allow_static_recompiles()
    if cache is not None:  # first-block: its hooks wrap each block's forward, outside the graph
        _compile_forwards(transformer, **options)
    else:
        transformer.compile_repeated_blocks(**options)
    logger.info("compiled %s's %s blocks (torch.compile, fullgraph, mode %s%s): the first forward compiles",
                type(transformer).__name__, "/".join(transformer._repeated_blocks), mode,
                ", beneath the cache hooks" if cache is not None else "")
    return Acceleration(compiled_blocks=True, compile_mode=mode)


@contextlib.contextmanager
def compiled_while_training(modules: Sequence[torch.nn.Module], enabled: bool = True) -> Iterator[bool]:
    """``torch.compile`` each module's call in place (``nn.Module.compile``: same parameters, same
    state-dict keys) for the ``with`` block, then eager again. For the VAE's training loop: its
    batches have one shape, compiled once, while the calls after it (scaling-factor calibration,
    reconstructions, encoding every clip) are eval-mode, gradient-free and of other shapes, and would
    each compile anew for a handful of calls. Yields whether the modules run compiled."""
    if not enabled:
        yield False
        return
    for module in modules:
        module.compile(backend=BACKEND)
    try:
        yield True
    finally:
        for module in modules:
            module._compiled_call_impl = None  # nn.Module has no public way back to eager


# Static graphs per shape: one process may train (micro-batch, last batch), validate, then sample at
# CFG batch 2 and, at guidance 1, batch 1 (always its own graph), each with and without gradients.
# That passes torch's default of 8 graphs per code object, and a fullgraph block then raises
# instead of falling back. Every block shares the one code object, so the count is per shape only.
STATIC_GRAPHS_PER_BLOCK = 64


def _allow_static_recompiles() -> None:
    import torch._dynamo

    config = torch._dynamo.config
    if config.recompile_limit < STATIC_GRAPHS_PER_BLOCK:
        config.recompile_limit = STATIC_GRAPHS_PER_BLOCK
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * STATIC_GRAPHS_PER_BLOCK)


def _compile_forwards(transformer: torch.nn.Module, **options) -> None:
    """Regional compilation of each repeated block's ``forward`` rather than of its whole call: a
    cache hook registered afterwards (diffusers' ``HookRegistry`` wraps ``forward``) runs eagerly and
    calls the compiled forward. One code object, so every block shares the one compiled graph."""
    for block in _repeated_blocks(transformer):
        block.forward = torch.compile(block.forward, **options)
        block._udpdiff_compiled_forward = True


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


def bf16_parameters(module: torch.nn.Module) -> None:
    """``module``'s parameters in bf16, its buffers as they are (as DeepSpeed's bf16 mode casts):
    the weights themselves are what the optimizer updates (``train.master_weights: bf16``)."""
    for param in module.parameters():
        param.data = param.data.to(torch.bfloat16)


def adamw8bit(parameters, device: torch.device | str, *, bf16_stochastic_round: bool = False,
              **kwargs: Any) -> torch.optim.Optimizer:
    """torchao's AdamW8bit: AdamW with both moments stored block-wise in 8 bits (a quarter of the
    fp32 states' memory). ``bf16_stochastic_round`` rounds each update of bf16 weights stochastically,
    so that updates smaller than bf16's spacing still count on average (``train.master_weights: bf16``).
    Not lossless: the moments are quantised."""
    try:
        from torchao.optim import AdamW8bit
    except ImportError as exc:
        raise AccelerationError("train.optimizer: adamw8bit needs torchao (pip install -e \".[lowbit]\")") from exc

    class CheckpointableAdamW8bit(AdamW8bit):
        # DeepSpeed loads checkpoints with a callable map_location, which torch cannot apply to
        # tensor subclasses such as torchao's 8-bit states: they are saved as their plain parts
        def state_dict(self) -> dict:
            return _with_subclasses_flattened(super().state_dict())

        def load_state_dict(self, state_dict: dict) -> None:
            super().load_state_dict(_with_subclasses_restored(state_dict))

    optimizer = CheckpointableAdamW8bit(parameters, bf16_stochastic_round=bf16_stochastic_round, **kwargs)
    if torch.device(device).type != "cuda":
        # torchao compiles its per-tensor update; on the CPU that compile costs ~30 s for the same maths,
        # so the step runs it eagerly (a bound method still: torch's LR schedulers wrap ``step.__func__``)
        eager = torch.compiler.set_stance("force_eager")(type(optimizer).step)
        optimizer.step = types.MethodType(eager, optimizer)
    return optimizer


def optimizer(kind: str, parameters, device: torch.device | str, *, bf16_weights: bool = False,
              fused: bool | None = None, **kwargs: Any) -> torch.optim.Optimizer:
    """``train.optimizer``'s optimizer: ``adamw`` (:func:`adamw`) or ``adamw8bit`` (:func:`adamw8bit`,
    stochastically rounded on ``bf16_weights``: ``train.master_weights: bf16``)."""
    if kind == "adamw8bit":
        return adamw8bit(parameters, device, bf16_stochastic_round=bf16_weights, **kwargs)
    return adamw(parameters, device, fused=fused, **kwargs)


_FLATTENED = "tensor_subclass"


def _with_subclasses_flattened(state_dict: dict) -> dict:
    """An optimizer state dict whose tensor-subclass states are ``{tensor_subclass: class path,
    tensors: {name: tensor}, attributes: [...]}`` (their ``__tensor_flatten__``), plain tensors elsewhere."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    state = {}
    for index, entries in state_dict["state"].items():
        state[index] = {}
        for key, value in entries.items():
            if is_traceable_wrapper_subclass(value):
                names, attributes = value.__tensor_flatten__()
                cls = type(value)
                value = {_FLATTENED: f"{cls.__module__}:{cls.__qualname__}",
                         "tensors": {n: getattr(value, n) for n in names}, "attributes": list(attributes)}
            state[index][key] = value
    return {**state_dict, "state": state}


def _with_subclasses_restored(state_dict: dict) -> dict:
    """The inverse of :func:`_with_subclasses_flattened`."""
    import importlib

    state = {}
    for index, entries in state_dict["state"].items():
        state[index] = {}
        for key, value in entries.items():
            if isinstance(value, dict) and _FLATTENED in value:
                module, name = value[_FLATTENED].split(":")
                cls = getattr(importlib.import_module(module), name)
                value = cls.__tensor_unflatten__(value["tensors"], value["attributes"], None, None)
            state[index][key] = value
    return {**state_dict, "state": state}


def accelerate_pipeline(pipe, settings: AccelerationParams) -> Acceleration:
    """``accelerate`` for a pipeline's transformer (on the pipeline's device), its attention kernel
    (:func:`use_attention`), its VAE decode (batched: one call for the video and the colormap, or
    sequential: VAE slicing; whole frames or tiles) and the opt-in approximations of
    ``settings.approximate`` (float8 linears before the compile, a step cache after it)."""
    if settings.vae_decode == "sequential":
        pipe.vae.enable_slicing()
    else:
        pipe.vae.disable_slicing()
    if settings.vae_tiling:
        pipe.vae.enable_tiling()
    else:
        pipe.vae.disable_tiling()
    approx = settings.approximate
    check_inference(pipe.transformer, approx)
    kernel = use_attention(pipe.transformer, settings)
    use_float8(pipe.transformer, approx.float8)
    done = accelerate(pipe.transformer, settings, pipe.transformer.device, cache=approx.cache)
    cache = use_cache(pipe, approx.cache)
    return Acceleration(done.compiled_blocks, done.compile_mode, done.reason, attention=kernel, float8=approx.float8,
                        cache=cache)


# -- approximate sampling (acceleration.approximate): changes the outputs ---------------------------------
def check_inference(transformer: torch.nn.Module, approx: ApproximateParams) -> None:
    """Refuse approximations on a transformer in training mode: they are for sampling only (float8
    here is inference quantisation, and diffusers' caches skip work across denoising steps)."""
    if approx.active and transformer.training:
        raise AccelerationError("acceleration.approximate (float8, float8_attention, cache) changes what the "
                                "transformer computes and is for sampling only; this transformer is in training "
                                "mode (training ignores the setting; for sampling call .eval() first)")


def float8_unavailable(transformer: torch.nn.Module) -> str | None:
    """Why float8 linears cannot run for ``transformer`` here (None: they can)."""
    import importlib.util

    device = next(transformer.parameters()).device
    if device.type != "cuda":
        return f"a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper); the transformer is on {device.type}"
    if torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        return f"a GPU of compute capability 8.9 or newer (Ada, Hopper); this one is sm{major}{minor}"
    if importlib.util.find_spec("torchao") is None:
        return "torchao (pip install -e \".[float8]\")"
    dtypes = {m.weight.dtype for m in _block_linears(transformer)}
    if dtypes != {torch.bfloat16}:
        # rowwise scales need bf16 (torch._scaled_mm); tensorwise is held to it too (what the GPU tests run)
        return f"bf16 weights in the blocks' linear layers; they are {sorted(map(str, dtypes))}"
    return None


def _block_linears(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for name, m in transformer.named_modules() if _is_block_linear(m, name)]


def _is_block_linear(module: torch.nn.Module, name: str) -> bool:
    """The blocks' token-wise linears: attention projections and feed-forward. Not the AdaLN
    modulation linears under ``norm1``/``norm2``: they map one timestep embedding per sample (a
    2-D matrix-vector product float8 cannot speed up, and one torchao has no eager kernel for)."""
    return isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks.") and ".norm" not in name


def use_float8(transformer: torch.nn.Module, setting: str) -> None:
    """``float8: rowwise`` / ``tensorwise``: torchao's float8 dynamic activation + weight
    quantisation, one scale per row / per tensor, on the blocks' linear layers, in place. Inductor's
    global settings are left alone (``set_inductor_config=False``: torchao's would turn on
    coordinate-descent tuning for every later compile in the process)."""
    if setting == "none":
        return
    why = float8_unavailable(transformer)
    if why is not None:
        raise AccelerationError(f"acceleration.approximate.float8: {setting} needs {why}; use float8: none here")
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    scales = {"rowwise": PerRow, "tensorwise": PerTensor}[setting]()  # one scale per row or per tensor
    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=scales, set_inductor_config=False),
              filter_fn=_is_block_linear)
    logger.info("float8 (torchao, %s dynamic activation + weight) in %d block linear layers", setting,
                len(_block_linears(transformer)))


def use_cache(pipe, cache: CacheParams | None) -> str | None:
    """Enable ``cache`` (diffusers' ``CacheMixin.enable_cache``) on the pipeline's transformer, after
    :func:`accelerate` (which compiled the blocks beneath first-block's hooks, or kept them eager
    for faster and pab); returns its type, or None."""
    if cache is None:
        return None
    transformer = pipe.transformer
    if cache.type == "first-block" and any(getattr(m, "_compiled_call_impl", None) is not None
                                           for m in _repeated_blocks(transformer)):
        raise AccelerationError("acceleration.approximate.cache: first-block needs the blocks compiled beneath its "
                                "hooks (accelerate(..., cache=...)), not around their call")
    if transformer.is_cache_enabled:
        transformer.disable_cache()
    transformer.enable_cache(diffusers_cache_config(cache, lambda: pipe.current_timestep))
    logger.info("step cache: %s (diffusers CacheMixin; changes the outputs)", cache)
    return cache.type


def diffusers_cache_config(cache: CacheParams, current_timestep):
    """``cache`` as diffusers' config object; ``current_timestep`` returns the denoising loop's timestep."""
    from diffusers.hooks import FasterCacheConfig, FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

    if cache.type == "first-block":
        return FirstBlockCacheConfig(threshold=cache.threshold)
    if cache.type == "pab":
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=cache.attention_skip_range,
                                               spatial_attention_timestep_skip_range=cache.timesteps,
                                               current_timestep_callback=current_timestep)
    weight = cache.attention_weight
    # CogVideoX's latents are (B, F, C, H, W): the frequency split runs over each frame's channels
    return FasterCacheConfig(spatial_attention_block_skip_range=cache.attention_skip_range,
                             spatial_attention_timestep_skip_range=cache.attention_timesteps,
                             attention_weight_callback=lambda _: weight,
                             unconditional_batch_skip_range=cache.uncond_skip_range,
                             unconditional_batch_timestep_skip_range=cache.uncond_timesteps,
                             tensor_format="BFCHW", current_timestep_callback=current_timestep)


def use_attention(transformer: torch.nn.Module, settings: AccelerationParams) -> str:
    """Give an inference transformer the attention kernel ``settings.attention`` asks for; returns
    the kernel used (``fa3``, ``fa3-fp8`` or ``sdpa``). ``auto`` picks FA3 where it can run;
    ``approximate.float8_attention`` asks for FA3's e4m3 kernel and is refused where FA3 cannot run."""
    from udpdiff.attention import flash_attention3_available, use_flash_attention3

    wanted, fp8 = settings.attention, settings.approximate.float8_attention
    if fp8 and (wanted == "sdpa" or not flash_attention3_available()):
        raise AccelerationError("acceleration.approximate.float8_attention runs FlashAttention-3's float8 kernel: it "
                                "needs acceleration.attention fa3 or auto, a Hopper (sm90) GPU and the fa3-fwd wheel "
                                "(pip install fa3-fwd); use float8_attention: false here")
    if wanted == "sdpa" or (wanted == "auto" and not flash_attention3_available()):
        return "sdpa"
    if not flash_attention3_available():
        raise AccelerationError("acceleration.attention: fa3 needs a Hopper (sm90) GPU and the fa3-fwd wheel "
                                "(pip install fa3-fwd); use auto or sdpa")
    use_flash_attention3(transformer, fp8=fp8)
    logger.info("attention: FlashAttention-3 forward%s (udpdiff.attention)", ", float8 e4m3" if fp8 else "")
    return "fa3-fp8" if fp8 else "fa3"
