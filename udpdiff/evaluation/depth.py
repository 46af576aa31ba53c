"""Depth metrics for generated dense predictions (paper section 4.3, Table 3: delta1 and RMSE).

Depth here follows CONVENTIONS.md: float ``(T, H, W)`` normalised *disparity* in [0, 1]
(1 = nearest). Both the prediction (decoded from Pixelplanes) and the pseudo ground truth
(DepthCrafter) are relative, affine-ambiguous disparities, so by default the prediction is first
aligned to the ground truth with a least-squares scale and shift (the protocol of DepthCrafter and
Depth Anything for affine-invariant disparity). All metrics are then computed in that same
normalised-disparity space, which is the space the paper's RMSE values (~0.1) live in.

:func:`depth_space_metrics` is the standard protocol for relative depth, as DepthCrafter and Depth
Anything report it: the prediction is aligned in disparity to the ground truth's *true* disparity
(1/z), converted to depth, and δ1 / AbsRel are computed in depth space. It needs the metric depth
range that normalised disparity 1 and 0 stand for (exact for the synthetic clips), so its numbers
can be read against the literature's.

Everything is torch internally: numpy inputs are converted (and outputs converted back), torch
inputs stay on their device. Leading dimensions beyond ``(T, H, W)`` are treated as a batch of
videos for the alignment; metrics pool all valid pixels.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor

__all__ = ["ScaleShift", "align_scale_shift", "depth_metrics", "depth_scores", "depth_space_metrics"]


class ScaleShift(NamedTuple):
    """Result of :func:`align_scale_shift`.

    ``aligned`` has the type and shape of the prediction; ``scale`` and ``shift`` have the
    leading (batch) shape, plus ``T`` when ``per_frame=True``.
    """

    aligned: ArrayLike
    scale: ArrayLike
    shift: ArrayLike


def _to_tensor(x: ArrayLike, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x
    return t if dtype is None else t.to(dtype)


def _like(x: torch.Tensor, ref: ArrayLike) -> ArrayLike:
    """Return ``x`` as the container type of ``ref`` (numpy in, numpy out)."""
    if isinstance(ref, np.ndarray):
        return x.detach().cpu().numpy()
    return x


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    # float64 makes the normal equations well conditioned for 49x480x720 sums; MPS has no
    # float64, so there we stay in float32.
    return torch.float32 if t.device.type == "mps" else torch.float64


def _fit(
    pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form weighted least squares for ``s * pred + t ~= gt`` over ``dims``."""
    w = mask.to(pred.dtype)
    p = torch.where(mask, pred, torch.zeros_like(pred))
    g = torch.where(mask, gt, torch.zeros_like(gt))
    a00 = (w * p * p).sum(dims)
    a01 = (w * p).sum(dims)
    a11 = w.sum(dims)
    b0 = (w * p * g).sum(dims)
    b1 = (w * g).sum(dims)
    det = a00 * a11 - a01 * a01
    # A constant (or empty) prediction has no unique scale: fall back to scale 0 and the mean of
    # the ground truth (the best constant), or to identity when there are no valid pixels.
    # det = n^2 * var(pred) >= 0; relative to a00*a11 = n^2 * E[p^2] it is var/E[p^2], and below
    # ~1e-10 the prediction is constant up to summation round-off.
    ok = det > 1e-10 * (a00 * a11)
    safe_det = torch.where(ok, det, torch.ones_like(det))
    scale = torch.where(ok, (a11 * b0 - a01 * b1) / safe_det, torch.zeros_like(det))
    mean_g = b1 / a11.clamp_min(1.0)
    shift = torch.where(ok, (a00 * b1 - a01 * b0) / safe_det, mean_g)
    empty = a11 == 0
    scale = torch.where(empty, torch.ones_like(scale), scale)
    shift = torch.where(empty, torch.zeros_like(shift), shift)
    if bool((~ok & ~empty).any()):
        logger.debug("align_scale_shift: degenerate (constant) prediction; using scale=0")
    return scale, shift


def _valid_mask(pred: torch.Tensor, gt: torch.Tensor, mask: ArrayLike | None) -> torch.Tensor:
    valid = torch.isfinite(pred) & torch.isfinite(gt)
    if mask is not None:
        m = _to_tensor(mask).to(device=pred.device, dtype=torch.bool)
        valid = valid & m.expand_as(valid)
    return valid


def _pooled_scores(p_ratio: torch.Tensor, g_ratio: torch.Tensor, p: torch.Tensor, g: torch.Tensor,
                   caller: str) -> dict[str, float | int]:
    """δ1 and AbsRel from the (positive) ``*_ratio`` values, RMSE from ``p`` and ``g``, pooled over
    the valid pixels given (1-D); NaN scores when there are none."""
    n = int(p.numel())
    if n == 0:
        logger.warning("%s: no valid pixels; returning NaN metrics", caller)
        nan = float("nan")
        return {"delta1": nan, "abs_rel": nan, "rmse": nan, "n_valid": 0}
    ratio = torch.maximum(p_ratio / g_ratio, g_ratio / p_ratio)
    return {
        "delta1": float((ratio < 1.25).to(p.dtype).mean()),
        "abs_rel": float(((p_ratio - g_ratio).abs() / g_ratio).mean()),
        "rmse": float(((p - g) ** 2).mean().sqrt()),
        "n_valid": n,
    }


def _check_shapes(pred: ArrayLike, gt: ArrayLike) -> None:
    if tuple(pred.shape) != tuple(gt.shape):
        raise ValueError(f"pred and gt shapes differ: {tuple(pred.shape)} vs {tuple(gt.shape)}")
    if len(pred.shape) < 3:
        raise ValueError(f"expected (..., T, H, W) depth, got shape {tuple(pred.shape)}")


def align_scale_shift(
    pred: ArrayLike,
    gt: ArrayLike,
    mask: ArrayLike | None = None,
    per_frame: bool = False,
) -> ScaleShift:
    """Least-squares align ``pred`` to ``gt``: find ``s, t`` minimising ``sum m (s*pred + t - gt)^2``.

    Solved in closed form from the 2x2 normal equations (no iterative solver), in float64.

    Args:
        pred, gt: ``(..., T, H, W)`` arrays (numpy or torch, same shape).
        mask: optional boolean array broadcastable to ``pred``; only ``True`` pixels are fitted.
            Non-finite pixels of either input are always excluded.
        per_frame: fit one ``(s, t)`` per frame instead of one per video. Per-video alignment is
            the stricter protocol for video depth (it also penalises scale flicker over time).

    Returns:
        :class:`ScaleShift` with the aligned prediction (type, dtype and shape of ``pred``) and the
        fitted scale and shift. A constant prediction gets ``scale=0, shift=mean(gt)``; a
        video/frame without valid pixels is left unchanged (``scale=1, shift=0``).
    """
    _check_shapes(pred, gt)
    p0 = _to_tensor(pred)
    dtype = _work_dtype(p0)
    p = p0.to(dtype)
    g = _to_tensor(gt).to(device=p.device, dtype=dtype)
    valid = _valid_mask(p, g, mask)
    dims = (-2, -1) if per_frame else (-3, -2, -1)
    scale, shift = _fit(p, g, valid, dims)
    expand = scale.reshape(*scale.shape, *([1] * len(dims)))
    aligned = expand * p + shift.reshape(expand.shape)
    out_dtype = p0.dtype if p0.is_floating_point() else torch.float32
    return ScaleShift(
        aligned=_like(aligned.to(out_dtype), pred),
        scale=_like(scale, pred),
        shift=_like(shift, pred),
    )


def depth_metrics(
    pred: ArrayLike,
    gt: ArrayLike,
    mask: ArrayLike | None = None,
    align: bool = True,
    per_frame: bool = False,
    eps: float = 1e-6,
) -> dict[str, float | int]:
    """Standard depth metrics between a predicted and a (pseudo) ground-truth disparity video.

    Args:
        pred, gt: ``(..., T, H, W)`` normalised disparity in [0, 1] (numpy or torch).
        mask: optional boolean validity mask broadcastable to ``pred``.
        align: first least-squares align ``pred`` to ``gt`` (scale and shift,
            see :func:`align_scale_shift`). Without it the raw values are compared.
        per_frame: align each frame separately instead of the whole video.
        eps: lower clamp for the ratio-based metrics (see below).

    Returns:
        ``{"delta1", "abs_rel", "rmse", "n_valid"}`` as Python numbers, pooled over all valid
        pixels (pixel-weighted; average per video yourself for a per-clip mean):

        - ``delta1``: fraction of pixels with ``max(p/g, g/p) < 1.25``;
        - ``abs_rel``: mean of ``|p - g| / g``;
        - ``rmse``: ``sqrt(mean((p - g)^2))`` on the (aligned) values, unclamped.

    Zeros: normalised disparity is 0 at the farthest point (sky, infinity) and the aligned
    prediction can even be slightly negative, where ratios are undefined. For ``delta1`` and
    ``abs_rel`` both ``p`` and ``g`` are therefore clamped to ``>= eps`` (so a ``p = g = 0`` pixel
    counts as correct, and a near-zero prediction against a positive target as wrong). ``abs_rel``
    is dominated by near-zero ground truth; pass e.g. ``mask=gt > 0.01`` if that is undesired.
    With no valid pixels all metrics are NaN.
    """
    return _metrics_and_scale(pred, gt, mask, align, per_frame, eps)[0]


def _metrics_and_scale(pred: ArrayLike, gt: ArrayLike, mask: ArrayLike | None, align: bool, per_frame: bool,
                       eps: float) -> tuple[dict[str, float | int], torch.Tensor | None]:
    """:func:`depth_metrics` and the fit's scale (``None`` unaligned), so a caller needing both fits once."""
    _check_shapes(pred, gt)
    p = _to_tensor(pred)
    dtype = _work_dtype(p)
    p = p.to(dtype)
    g = _to_tensor(gt).to(device=p.device, dtype=dtype)
    valid = _valid_mask(p, g, mask)
    scale = None
    if align:
        scale, shift = _fit(p, g, valid, (-2, -1) if per_frame else (-3, -2, -1))
        n_dims = 2 if per_frame else 3
        p = scale.reshape(*scale.shape, *([1] * n_dims)) * p + shift.reshape(
            *shift.shape, *([1] * n_dims)
        )
    pv, gv = p[valid], g[valid]
    return _pooled_scores(pv.clamp_min(eps), gv.clamp_min(eps), pv, gv, "depth_metrics"), scale


def depth_space_metrics(
    pred: ArrayLike,
    gt: ArrayLike,
    depth_range: tuple[float, float],
    mask: ArrayLike | None = None,
    per_frame: bool = False,
) -> dict[str, float | int]:
    """δ1, AbsRel and RMSE in *depth* space, the relative-depth protocol of DepthCrafter and Depth
    Anything.

    ``gt`` is normalised disparity ``(1/z - 1/z_far) / (1/z_near - 1/z_far)`` with
    ``depth_range = (z_near, z_far)``, so its true disparity ``1/z`` and depth ``z`` are exact.
    The prediction (normalised disparity, affine-ambiguous) is least-squares aligned with a scale
    and shift to ``1/z`` over the valid pixels, clamped to ``>= 1/z_far`` (the far end of the
    range; an aligned disparity can undershoot it, even below 0) and inverted to depth. Pixels at
    the far plane (``gt`` of 0: the sky, "infinitely" far) are not scored, nor any outside ``mask``.

    Returns ``{"delta1", "abs_rel", "rmse", "n_valid"}``: the fraction of pixels with
    ``max(z_p/z, z/z_p) < 1.25``, ``mean(|z_p - z| / z)`` and ``sqrt(mean((z_p - z)^2))`` in the
    range's units, pooled over valid pixels; NaN with none."""
    z_near, z_far = (float(v) for v in depth_range)
    if not 0 < z_near < z_far:
        raise ValueError(f"depth_range must be (z_near, z_far) with 0 < z_near < z_far, got {depth_range}")
    _check_shapes(pred, gt)
    p = _to_tensor(pred)
    dtype = _work_dtype(p)
    p = p.to(dtype)
    g = _to_tensor(gt).to(device=p.device, dtype=dtype)
    valid = _valid_mask(p, g, mask) & (g > 0)
    gt_disparity = g * (1 / z_near - 1 / z_far) + 1 / z_far
    dims = (-2, -1) if per_frame else (-3, -2, -1)
    scale, shift = _fit(p, gt_disparity, valid, dims)
    shape = (*scale.shape, *([1] * len(dims)))
    aligned = (scale.reshape(shape) * p + shift.reshape(shape)).clamp_min(1 / z_far)
    zp, zg = 1 / aligned[valid], 1 / gt_disparity[valid]
    return _pooled_scores(zp, zg, zp, zg, "depth_space_metrics")


def depth_scores(pred: ArrayLike, gt: ArrayLike, per_frame: bool = False,
                 depth_range: tuple[float, float] | None = None) -> dict[str, float]:
    """δ1, AbsRel, RMSE of one video after least-squares scale-and-shift alignment (per video, or per
    frame) in normalised disparity (the paper's protocol); with ``depth_range`` also δ1, AbsRel and
    RMSE in depth space (``*_depth``: the protocol of DepthCrafter and Depth Anything).

    ``fit_reversed``: the fraction of those fits (the video's, or its frames') whose scale is negative.
    Both protocols' fits may flip a prediction, so a depth read backwards (near and far swapped) can
    still score δ1 1; this says when it happened."""
    # disparity 0 is "infinitely far" (sky): ratios are undefined there, so score where gt > 0
    m, scale = _metrics_and_scale(pred, gt, gt > 1e-3, True, per_frame, 1e-6)
    out = {k: m[k] for k in ("delta1", "abs_rel", "rmse")}
    out["fit_reversed"] = float((scale < 0).double().mean())
    if depth_range is not None:
        d = depth_space_metrics(pred, gt, depth_range, mask=gt > 1e-3, per_frame=per_frame)
        out.update({f"{k}_depth": d[k] for k in ("delta1", "abs_rel", "rmse")})
    return out
