"""A dense prediction *of* a real clip scored against that clip's ground truth (exact for synthetic
data): the ``gt_*`` scores of the evaluate stage, and of the autoencoder stage's after-VAE ceiling."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from udpdiff.evaluation.depth import depth_scores
from udpdiff.evaluation.segmentation import hungarian_miou, temporal_id_consistency
from udpdiff.io.dense import load_depth, load_ids
from udpdiff.io.manifest import resolve


def ground_truth_scores(task: str, prediction: np.ndarray, clip, manifest: Path, depth_per_frame: bool = False,
                        depth_range: tuple[float, float] | None = None) -> dict[str, float]:
    """``clip`` is its manifest row (``seg_path``/``depth_path``); its first ``len(prediction)``
    frames were predicted. Depth: δ1/AbsRel/RMSE (and in depth space with ``depth_range``);
    segmentation: Hungarian mIoU and temporal id consistency."""
    t = prediction.shape[0]
    if task == "depth":
        scores = depth_scores(prediction, load_depth(resolve(manifest, clip.depth_path))[:t], depth_per_frame,
                              depth_range)
        return {f"gt_{k}": v for k, v in scores.items()}
    gt = load_ids(resolve(manifest, clip.seg_path))[:t]
    return {"gt_miou": float(hungarian_miou(prediction, gt)["miou"]),
            "gt_temporal_id_consistency": temporal_id_consistency(prediction, gt)}
