"""The UDPDiff transformer: CogVideoX with doubled latent channels and a learned task embedding.

Paper §3.3–3.4: the RGB latent (16 channels) and the dense-prediction latent (16 channels) are
concatenated channel-wise, so ``patch_embed.proj`` and ``proj_out`` see 32 channels; a learned
task embedding ``E_task(id)`` is added to the timestep embedding (eq. 1) before the blocks.

We subclass diffusers' ``CogVideoXTransformer3DModel`` instead of forking it: the task embedding
is added by a forward hook on ``time_embedding``, so the stock forward runs unchanged and every
diffusers feature (gradient checkpointing, attention processors, caching) keeps working.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Literal

import torch

# diffusers' pipeline loader looks up the component's base classes in the module that defines it
# (model_index.json names "udpdiff.models.transformer"); this name makes that lookup succeed.
from diffusers import (
    CogVideoXTransformer3DModel,
    ModelMixin,  # noqa: F401
)
from diffusers.configuration_utils import register_to_config
from torch import nn

logger = logging.getLogger(__name__)

ChannelExpansion = Literal["duplicate", "random", "duplicate-preserving"]
LATENT_CHANNELS = 16  # CogVideoX's VAE latent width; the dense latent has the same width.


class UDPDiffTransformer3DModel(CogVideoXTransformer3DModel):
    """CogVideoX transformer with ``num_tasks`` learned task embeddings (0 = no task embedding:
    single-task models, the RGB-only baseline and the text-prompt ablation)."""

    # diffusers' regional compilation (``compile_repeated_blocks``, used by udpdiff.acceleration):
    # the blocks are compiled, one graph shared by all of them; the task embedding (a hook on
    # ``time_embedding``) and the patch embedding / output head stay eager around them
    _repeated_blocks = ["CogVideoXBlock"]

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 30,
        attention_head_dim: int = 64,
        in_channels: int = 2 * LATENT_CHANNELS,
        out_channels: int | None = 2 * LATENT_CHANNELS,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        time_embed_dim: int = 512,
        ofs_embed_dim: int | None = None,
        text_embed_dim: int = 4096,
        num_layers: int = 30,
        dropout: float = 0.0,
        attention_bias: bool = True,
        sample_width: int = 90,
        sample_height: int = 60,
        sample_frames: int = 49,
        patch_size: int = 2,
        patch_size_t: int | None = None,
        temporal_compression_ratio: int = 4,
        max_text_seq_length: int = 226,
        activation_fn: str = "gelu-approximate",
        timestep_activation_fn: str = "silu",
        norm_elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
        spatial_interpolation_scale: float = 1.875,
        temporal_interpolation_scale: float = 1.0,
        use_rotary_positional_embeddings: bool = False,
        use_learned_positional_embeddings: bool = False,
        patch_bias: bool = True,
        num_tasks: int = 2,
    ):
        super().__init__(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            flip_sin_to_cos=flip_sin_to_cos,
            freq_shift=freq_shift,
            time_embed_dim=time_embed_dim,
            ofs_embed_dim=ofs_embed_dim,
            text_embed_dim=text_embed_dim,
            num_layers=num_layers,
            dropout=dropout,
            attention_bias=attention_bias,
            sample_width=sample_width,
            sample_height=sample_height,
            sample_frames=sample_frames,
            patch_size=patch_size,
            patch_size_t=patch_size_t,
            temporal_compression_ratio=temporal_compression_ratio,
            max_text_seq_length=max_text_seq_length,
            activation_fn=activation_fn,
            timestep_activation_fn=timestep_activation_fn,
            norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps,
            spatial_interpolation_scale=spatial_interpolation_scale,
            temporal_interpolation_scale=temporal_interpolation_scale,
            use_rotary_positional_embeddings=use_rotary_positional_embeddings,
            use_learned_positional_embeddings=use_learned_positional_embeddings,
            patch_bias=patch_bias,
        )
        self.task_embedding: nn.Embedding | None = None
        if num_tasks > 0:
            self.task_embedding = nn.Embedding(num_tasks, time_embed_dim)
            # Zero init: at step 0 the model is exactly its initialisation (stock weights when
            # fine-tuning), and the embedding still receives gradients through the sum.
            nn.init.zeros_(self.task_embedding.weight)
            self.time_embedding.register_forward_hook(self._add_task_embedding)
        self._pending_task_ids: torch.Tensor | None = None
        self._context_task_ids: torch.Tensor | None = None

    # -- task conditioning -------------------------------------------------------------------
    def _add_task_embedding(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        ids = self._pending_task_ids
        if ids is None:
            raise ValueError(
                "this UDPDiff transformer has a task embedding: pass task_id= to forward() or "
                "wrap the call in `with transformer.task_context(task_id):`"
            )
        ids = ids.to(device=output.device)
        if ids.ndim == 0:
            ids = ids.expand(output.shape[0])
        elif ids.shape[0] != output.shape[0]:
            if output.shape[0] % ids.shape[0]:
                raise ValueError(f"{ids.shape[0]} task ids for a batch of {output.shape[0]}")
            # classifier-free guidance doubles the batch: [uncond..., cond...]
            ids = ids.repeat(output.shape[0] // ids.shape[0])
        return output + self.task_embedding(ids).to(output.dtype)

    @contextlib.contextmanager
    def task_context(self, task_id: int | torch.Tensor) -> Iterator[None]:
        """Make every forward inside the block use ``task_id`` (used by the pipeline, whose
        denoising loop is diffusers' own and does not know about tasks)."""
        previous = self._context_task_ids
        self._context_task_ids = torch.as_tensor(task_id, dtype=torch.long)
        try:
            yield
        finally:
            self._context_task_ids = previous

    def forward(self, hidden_states: torch.Tensor, *args, task_id: int | torch.Tensor | None = None, **kwargs):
        if self.task_embedding is None:
            if task_id is not None:
                raise ValueError("task_id given, but this transformer has no task embedding (num_tasks=0)")
            return super().forward(hidden_states, *args, **kwargs)
        ids = torch.as_tensor(task_id, dtype=torch.long) if task_id is not None else self._context_task_ids
        if ids is not None and bool((ids < 0).any() or (ids >= self.config.num_tasks).any()):
            raise ValueError(f"task ids {ids.tolist()} out of range for num_tasks={self.config.num_tasks}")
        self._pending_task_ids = ids
        try:
            return super().forward(hidden_states, *args, **kwargs)
        finally:
            self._pending_task_ids = None


# -- building from a stock CogVideoX checkpoint -------------------------------------------------
def _expand_in(weight: torch.Tensor, factor: int, mode: ChannelExpansion, generator: torch.Generator) -> torch.Tensor:
    """Expand the input-channel axis (dim 1) of ``patch_embed.proj``'s weight ``factor`` times.

    Both CogVideoX 1.0 (Conv2d, dim 1 = channels) and 1.5 (Linear over a channel-major
    (C, p_t, p, p) flattening) keep channels outermost, so a reshape to (out, C, rest) is exact.
    """
    out_dim, in_dim = weight.shape[0], weight.shape[1]
    w = weight.reshape(out_dim, LATENT_CHANNELS, -1)
    if mode == "random":
        extra = torch.randn((out_dim, LATENT_CHANNELS * (factor - 1), w.shape[2]), generator=generator)
        new = torch.cat([w, extra.to(w) * w.std()], dim=1)
    else:
        new = torch.cat([w] * factor, dim=1)
        if mode == "duplicate-preserving":
            # the same latent in every block sums to factor * W x; dividing restores W x exactly
            new = new / factor
    return new.reshape(out_dim, in_dim * factor, *weight.shape[2:])


def _expand_out(weight: torch.Tensor, bias: torch.Tensor, factor: int, mode: ChannelExpansion,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand ``proj_out`` (Linear inner -> C*patch) on its output axis, channel-major too."""
    out_dim, inner = weight.shape
    w = weight.reshape(LATENT_CHANNELS, -1, inner)
    b = bias.reshape(LATENT_CHANNELS, -1)
    if mode == "random":
        extra_w = torch.randn((LATENT_CHANNELS * (factor - 1), w.shape[1], inner), generator=generator)
        new_w = torch.cat([w, extra_w.to(w) * w.std()], dim=0)
        new_b = torch.cat([b, torch.zeros_like(b).repeat(factor - 1, 1)], dim=0)
    else:  # both duplicate modes copy the output head: each half predicts what the stock model does
        new_w = torch.cat([w] * factor, dim=0)
        new_b = torch.cat([b] * factor, dim=0)
    return new_w.reshape(out_dim * factor, inner), new_b.reshape(out_dim * factor)


def from_cogvideox(
    stock: CogVideoXTransformer3DModel,
    num_tasks: int = 2,
    channel_expansion: ChannelExpansion = "duplicate",
    seed: int = 0,
) -> UDPDiffTransformer3DModel:
    """Build a 32-channel UDPDiff transformer initialised from a 16-channel CogVideoX one.

    ``duplicate`` is the paper's choice (Appendix D), ``random`` its ablation, and
    ``duplicate-preserving`` ours: with the same latent in both halves the expanded model
    reproduces the stock model's output in both output halves.
    """
    if stock.config.in_channels != LATENT_CHANNELS:
        raise ValueError(f"expected a {LATENT_CHANNELS}-channel CogVideoX, got in_channels={stock.config.in_channels}")
    factor = 2
    config = {k: v for k, v in stock.config.items() if not k.startswith("_")}
    config.update(in_channels=LATENT_CHANNELS * factor, out_channels=LATENT_CHANNELS * factor, num_tasks=num_tasks)
    model = UDPDiffTransformer3DModel.from_config(config)
    state = stock.state_dict()
    generator = torch.Generator().manual_seed(seed)
    state["patch_embed.proj.weight"] = _expand_in(state["patch_embed.proj.weight"], factor, channel_expansion,
                                                  generator)
    state["proj_out.weight"], state["proj_out.bias"] = _expand_out(
        state["proj_out.weight"], state["proj_out.bias"], factor, channel_expansion, generator
    )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"task_embedding.weight"}:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    dtype = next(stock.parameters()).dtype
    return model if dtype == torch.float32 else model.to(dtype=dtype)


def load_transformer(spec: dict, num_tasks: int, seed: int, dense: bool = True) -> UDPDiffTransformer3DModel:
    """Build the transformer a profile asks for.

    ``spec`` (params.yaml ``model.transformer``) either names ``pretrained`` — a local CogVideoX
    directory (its ``transformer/`` subfolder) or hub id loaded with ``from_pretrained`` — plus
    ``channel_expansion``, or gives a ``config`` for random initialisation (the ``tiny`` profile).
    ``dense=False`` keeps CogVideoX's 16 channels: the RGB-only baseline, identical to the stock
    model (same class as ours so that training and saving need no special case).
    """
    pretrained = spec.get("pretrained")
    channels = 2 * LATENT_CHANNELS if dense else LATENT_CHANNELS
    if pretrained:
        stock = CogVideoXTransformer3DModel.from_pretrained(pretrained, subfolder=spec.get("subfolder", "transformer"))
        wrong = {k: (v, stock.config.get(k)) for k, v in (spec.get("config") or {}).items() if stock.config.get(k) != v}
        if wrong:  # the profile describes another model than the weights it names
            raise ValueError(f"{pretrained}: its transformer config disagrees with params.yaml's transformer.config: "
                             + ", ".join(f"{k}: params {a!r} vs weights {b!r}" for k, (a, b) in wrong.items()))
        if not dense:
            return rgb_only(stock)
        logger.info("expanding %s to 32 channels (%s)", pretrained, spec.get("channel_expansion", "duplicate"))
        return from_cogvideox(stock, num_tasks, spec.get("channel_expansion", "duplicate"), seed)
    torch.manual_seed(seed)
    config = dict(spec["config"])
    config.update(in_channels=channels, out_channels=channels, num_tasks=num_tasks if dense else 0)
    return UDPDiffTransformer3DModel.from_config(config)


def rgb_only(stock: CogVideoXTransformer3DModel) -> UDPDiffTransformer3DModel:
    """The stock 16-channel model, weights unchanged, as a ``UDPDiffTransformer3DModel``."""
    config = {k: v for k, v in stock.config.items() if not k.startswith("_")}
    config.update(num_tasks=0)
    model = UDPDiffTransformer3DModel.from_config(config)
    model.load_state_dict(stock.state_dict(), strict=True)
    return model.to(dtype=next(stock.parameters()).dtype)
