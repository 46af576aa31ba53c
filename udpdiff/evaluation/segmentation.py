"""Entity-segmentation metrics for generated dense predictions.

Entity ids follow CONVENTIONS.md: integer ``(T, H, W)``, ``0`` = background/unlabelled, positive
ids are entities that keep their id over time. Predicted ids (decoded from Pixelplanes) are
arbitrary labels, so they are matched to ground-truth entities before scoring.

Entities are spatio-temporal tubes: IoUs are computed over the whole video volume, so an entity
whose predicted id changes half-way through the clip can only match half of its tube. This is the
video-instance convention (one id per entity per video), which is what "stable ids" means here.

All counting is vectorised (``bincount`` of joint ids) in torch and keeps the input's device; only
the small ``K_pred x K_gt`` IoU matrix goes to the CPU for ``linear_sum_assignment``.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor

__all__ = ["iou_matrix", "hungarian_miou", "temporal_id_consistency"]


def _ids(x: ArrayLike, device: torch.device | None = None) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x
    if t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"entity ids must be an integer array, got {t.dtype}")
    t = t.to(torch.int64)
    return t if device is None else t.to(device)


def iou_matrix(
    pred_ids: ArrayLike, gt_ids: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU between every predicted and every ground-truth id (background included).

    Returns ``(iou, pred_labels, gt_labels)`` with ``iou[i, j]`` the IoU of the pixel sets
    ``pred_ids == pred_labels[i]`` and ``gt_ids == gt_labels[j]`` (over the whole array), as
    float64 numpy; labels are the sorted distinct ids present.
    """
    if tuple(pred_ids.shape) != tuple(gt_ids.shape):
        raise ValueError(
            f"pred_ids and gt_ids shapes differ: {tuple(pred_ids.shape)} vs {tuple(gt_ids.shape)}"
        )
    p = _ids(pred_ids)
    g = _ids(gt_ids, p.device)
    p_lab, p_idx = torch.unique(p, return_inverse=True)
    g_lab, g_idx = torch.unique(g, return_inverse=True)
    kp, kg = p_lab.numel(), g_lab.numel()
    # One bincount over joint compact indices gives every pairwise intersection at once.
    inter = torch.bincount((p_idx * kg + g_idx).reshape(-1), minlength=kp * kg).reshape(kp, kg)
    area_p = inter.sum(1, keepdim=True)
    area_g = inter.sum(0, keepdim=True)
    union = area_p + area_g - inter
    iou = inter.double() / union.clamp_min(1).double()
    return iou.cpu().numpy(), p_lab.cpu().numpy(), g_lab.cpu().numpy()


def hungarian_miou(
    pred_ids: ArrayLike, gt_ids: ArrayLike, ignore_background: bool = True
) -> dict[str, object]:
    """Mean IoU of ground-truth entities after an optimal one-to-one id matching.

    Predicted entities are matched to ground-truth entities with the Hungarian algorithm
    (``scipy.optimize.linear_sum_assignment``) maximising the total IoU. A ground-truth entity
    that is unmatched (more GT than predicted entities, or only zero-IoU partners) scores IoU 0.
    The mean is over ground-truth entities, so extra predicted entities are not penalised directly
    (they only lower the IoUs of the entities they overlap).

    Args:
        pred_ids, gt_ids: integer ``(T, H, W)`` (any equal shape) arrays, numpy or torch.
        ignore_background: drop id 0 from both sides (default). If False, background is paired
            with predicted background (id 0 in both is "background" by convention, not an
            arbitrary label), its IoU is reported under key 0 and included in the mean.

    Returns:
        ``{"miou": float, "matches": [(pred_id, gt_id, iou), ...], "per_entity": {gt_id: iou},
        "n_gt": int, "n_pred": int}``. ``miou`` is NaN when there are no ground-truth entities
        (use ``nanmean`` when averaging over clips).
    """
    iou, p_lab, g_lab = iou_matrix(pred_ids, gt_ids)
    p_fg, g_fg = p_lab != 0, g_lab != 0
    sub = iou[np.ix_(p_fg, g_fg)]
    p_ent, g_ent = p_lab[p_fg], g_lab[g_fg]

    per_entity: dict[int, float] = {int(g): 0.0 for g in g_ent}
    matches: list[tuple[int, int, float]] = []
    if sub.size:
        rows, cols = linear_sum_assignment(sub, maximize=True)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            v = float(sub[r, c])
            # A zero-IoU assignment is an artefact of the square-ish solver, not a match.
            if v > 0.0:
                matches.append((int(p_ent[r]), int(g_ent[c]), v))
                per_entity[int(g_ent[c])] = v

    if not ignore_background:
        bg_p, bg_g = np.flatnonzero(p_lab == 0), np.flatnonzero(g_lab == 0)
        if bg_g.size:
            v = float(iou[bg_p[0], bg_g[0]]) if bg_p.size else 0.0
            per_entity[0] = v
            if v > 0:
                matches.insert(0, (0, 0, v))

    if per_entity:
        miou = float(np.mean(list(per_entity.values())))
    else:
        logger.debug("hungarian_miou: no ground-truth entities; mIoU is NaN")
        miou = float("nan")
    return {
        "miou": miou,
        "matches": matches,
        "per_entity": per_entity,
        "n_gt": int(g_ent.size),
        "n_pred": int(p_ent.size),
    }


def temporal_id_consistency(
    pred_ids: ArrayLike,
    gt_ids: ArrayLike,
    reduction: Literal["pixel", "entity"] = "pixel",
) -> float:
    """How stable predicted ids are over time, measured where the ground truth is stable.

    Definition: take every pixel location ``(h, w)`` and consecutive frame pair ``(t, t+1)`` where
    the ground truth shows the *same foreground entity* in both frames
    (``gt[t,h,w] == gt[t+1,h,w] != 0``): the interior of an entity that stays put or overlaps
    itself while moving. Such a pixel is *stable* when the predicted id is also unchanged
    (``pred[t,h,w] == pred[t+1,h,w]``). The score is the fraction of stable pixels; 1 means no id
    flicker. It measures temporal stability only, not accuracy: predicting the same wrong id (or
    background) in both frames counts as stable; use :func:`hungarian_miou` for accuracy.

    Args:
        pred_ids, gt_ids: integer ``(T, H, W)`` arrays (numpy or torch, same shape, T >= 2).
        reduction: ``"pixel"`` pools all qualifying pixels (large entities weigh more);
            ``"entity"`` first computes the fraction per ground-truth entity, then averages.

    Returns:
        The score in [0, 1], or NaN if no pixel qualifies (e.g. no entity, or T < 2).
    """
    if tuple(pred_ids.shape) != tuple(gt_ids.shape):
        raise ValueError(
            f"pred_ids and gt_ids shapes differ: {tuple(pred_ids.shape)} vs {tuple(gt_ids.shape)}"
        )
    if len(pred_ids.shape) != 3:
        raise ValueError(f"expected (T, H, W) ids, got shape {tuple(pred_ids.shape)}")
    p = _ids(pred_ids)
    g = _ids(gt_ids, p.device)
    qualifies = (g[1:] == g[:-1]) & (g[1:] != 0)
    stable = qualifies & (p[1:] == p[:-1])
    n = int(qualifies.sum())
    if n == 0:
        return float("nan")
    if reduction == "pixel":
        return float(stable.sum()) / n
    if reduction != "entity":
        raise ValueError(f"reduction must be 'pixel' or 'entity', got {reduction!r}")
    ent = g[1:][qualifies]
    labels, idx = torch.unique(ent, return_inverse=True)
    tot = torch.bincount(idx, minlength=labels.numel())
    ok = torch.bincount(idx, weights=stable[qualifies].double(), minlength=labels.numel())
    return float((ok / tot.double()).mean())
