"""FlashAttention-3 forward for CogVideoX's attention, as an opt-in processor (issue 11).

CogVideoX's attention processor (diffusers' ``CogVideoXAttnProcessor2_0``) ends in
``F.scaled_dot_product_attention`` on ``(B, heads, N, 64)`` bf16 tensors with no mask, no dropout
and no causal mask: the case FlashAttention-3's Hopper forward kernel is fastest at (about 1.3x
cuDNN SDPA at 18k tokens on an H200). We do not copy the processor to swap that one call:
:class:`FlashAttention3CogVideoXProcessor` subclasses diffusers' processor and runs it under
:class:`SdpaToFlashAttention3`, a ``TorchFunctionMode`` that sends exactly the SDPA calls FA3
supports to it and everything else to SDPA unchanged. FA3 comes from the optional ``fa3-fwd``
wheel (forward only: inference); without it, or off CUDA, nothing changes.

``fp8=True`` is an opt-in approximation (``acceleration.approximate.float8_attention``): q, k and v
go to FA3's e4m3 kernel with one scale per (sample, head), which FA3 multiplies back in
(``q_descale`` ...; its output is bf16). It changes the outputs; the GPU benchmark measures by how much.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from torch.overrides import TorchFunctionMode

FA3_MODULE = "fa3_fwd_interface"  # the fa3-fwd wheel's interface module
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def flash_attention3_available() -> bool:
    """True when the FA3 forward kernel can run here: the wheel is installed and a Hopper GPU is present."""
    return (importlib.util.find_spec(FA3_MODULE) is not None and torch.cuda.is_available()
            and torch.cuda.get_device_capability()[0] == 9)


def _fa3_forward():
    from fa3_fwd_interface import flash_attn_func

    return flash_attn_func


def to_e4m3_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (B, H, N, D) in float8 e4m3 with one scale per (sample, head), the largest magnitude
    mapped to e4m3's largest value; returns it and the (B, H) float32 descale FA3 multiplies back
    (``x ~= x8.float() * descale[..., None, None]``)."""
    descale = x.detach().abs().amax(dim=(2, 3)).float().clamp(min=1e-12) / E4M3_MAX
    # clamped: e4m3fn has no infinity, and a value rounded past its largest would become NaN
    scaled = (x.float() / descale[:, :, None, None]).clamp(-E4M3_MAX, E4M3_MAX)
    return scaled.to(torch.float8_e4m3fn), descale


class SdpaToFlashAttention3(TorchFunctionMode):
    """Inside this mode, ``F.scaled_dot_product_attention(q, k, v)`` with (B, H, N, D) bf16 CUDA
    tensors, D <= 256, no mask, no dropout, not causal and the default scale runs FA3's forward
    kernel (which takes (B, N, H, D): a transpose, no copy when the last dim is contiguous).
    ``fp8``: bf16 calls run FA3's e4m3 kernel on per-(sample, head) scaled inputs (approximate)."""

    def __init__(self, flash_attn_func=None, device_types: tuple[str, ...] = ("cuda",), fp8: bool = False) -> None:
        super().__init__()
        # both injectable so the routing is testable without a Hopper GPU
        self.flash_attn_func = flash_attn_func or _fa3_forward()
        self.device_types = device_types
        self.fp8 = fp8

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self._eligible(*args, **kwargs) \
                and args[0].device.type in self.device_types:
            q, k, v = args[:3]
            if self.fp8:
                (q, q_descale), (k, k_descale), (v, v_descale) = map(to_e4m3_per_head, (q, k, v))
                scales = {"q_descale": q_descale, "k_descale": k_descale, "v_descale": v_descale}
            else:
                scales = {}
            out = self.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **scales)
            out = out[0] if isinstance(out, tuple) else out
            return out.transpose(1, 2)
        return func(*args, **kwargs)

    @staticmethod
    def _eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None, dropout_p: float = 0.0,
                  is_causal: bool = False, scale: float | None = None, **rest: Any) -> bool:
        return (attn_mask is None and dropout_p == 0.0 and not is_causal and scale is None and not rest
                # bf16 only: the fa3-fwd wheel is built without its fp16 kernels (FLASHATTENTION_DISABLE_FP16)
                and q.dtype == torch.bfloat16 and q.dtype == k.dtype == v.dtype
                and q.ndim == 4 and q.shape[-1] <= 256 and not torch.is_grad_enabled())


class FlashAttention3CogVideoXProcessor(CogVideoXAttnProcessor2_0):
    """diffusers' CogVideoX attention processor with its SDPA call served by FA3's forward kernel."""

    def __init__(self, mode: SdpaToFlashAttention3 | None = None) -> None:
        super().__init__()
        self.mode = mode or SdpaToFlashAttention3()

    # the parent's signature, spelled out: diffusers' Attention.forward drops keyword arguments
    # (image_rotary_emb!) that the processor's __call__ does not name
    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: torch.Tensor | None = None):
        with self.mode:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


def use_flash_attention3(transformer: torch.nn.Module, fp8: bool = False) -> None:
    """Give every attention layer of a CogVideoX transformer the FA3 processor (inference only);
    ``fp8``: its e4m3 kernel (approximate, see :class:`SdpaToFlashAttention3`)."""
    if not flash_attention3_available():
        raise RuntimeError("FlashAttention-3 needs the fa3-fwd wheel and a Hopper (sm90) GPU")
    transformer.set_attn_processor(FlashAttention3CogVideoXProcessor(SdpaToFlashAttention3(fp8=fp8)))


__all__ = ["FlashAttention3CogVideoXProcessor", "SdpaToFlashAttention3", "flash_attention3_available",
           "to_e4m3_per_head", "use_flash_attention3"]
