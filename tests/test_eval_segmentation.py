"""Entity-segmentation metrics: Hungarian mIoU and temporal id consistency."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from udpdiff.evaluation.segmentation import hungarian_miou, iou_matrix, temporal_id_consistency


def _random_ids(seed: int, shape: tuple[int, ...] = (3, 12, 14), k: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, size=shape).astype(np.int32)


def test_permuted_relabelling_scores_one() -> None:
    gt = _random_ids(0)
    lut = np.array([0, 7, 3, 42, 5], dtype=np.int32)  # background stays 0, entities renamed
    pred = lut[gt]
    res = hungarian_miou(pred, gt)
    assert res["miou"] == 1.0
    assert sorted(res["matches"]) == sorted((int(lut[g]), g, 1.0) for g in range(1, 5))
    assert res["per_entity"] == {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}
    assert res["n_gt"] == 4 and res["n_pred"] == 4


def test_partial_overlap_hand_computed() -> None:
    gt = np.zeros((1, 4, 4), np.int32)
    gt[0, :, :2] = 1  # left half, 8 px
    gt[0, :, 2:] = 2  # right half, 8 px
    pred = np.zeros_like(gt)
    pred[0, :, :3] = 5  # 12 px: IoU with gt1 = 8/12, with gt2 = 4/16
    pred[0, :, 3:] = 6  # 4 px: IoU with gt2 = 4/8
    res = hungarian_miou(pred, gt)
    assert res["per_entity"][1] == pytest.approx(2 / 3)
    assert res["per_entity"][2] == pytest.approx(0.5)
    assert res["miou"] == pytest.approx(7 / 12)
    assert {(p, g) for p, g, _ in res["matches"]} == {(5, 1), (6, 2)}


def test_unmatched_gt_counts_zero() -> None:
    gt = np.zeros((2, 4, 6), np.int32)
    gt[:, :, 0:2], gt[:, :, 2:4], gt[:, :, 4:6] = 1, 2, 3
    pred = np.where(gt == 2, 9, 0).astype(np.int32)  # only entity 2 predicted
    res = hungarian_miou(pred, gt)
    assert res["per_entity"] == {1: 0.0, 2: 1.0, 3: 0.0}
    assert res["miou"] == pytest.approx(1 / 3)
    assert res["matches"] == [(9, 2, 1.0)]


def test_background_handling() -> None:
    gt = np.zeros((1, 2, 4), np.int32)
    gt[0, :, 2:] = 1
    pred = np.zeros_like(gt)
    pred[0, :, 1:] = 4  # entity spills one column into the background
    fg = hungarian_miou(pred, gt)
    assert fg["miou"] == pytest.approx(4 / 6)
    with_bg = hungarian_miou(pred, gt, ignore_background=False)
    assert with_bg["per_entity"][0] == pytest.approx(2 / 4)
    assert with_bg["miou"] == pytest.approx((4 / 6 + 2 / 4) / 2)
    assert math.isnan(hungarian_miou(pred, np.zeros_like(gt))["miou"])


def test_iou_matrix_matches_brute_force_and_accepts_torch() -> None:
    pred, gt = _random_ids(1, k=6), _random_ids(2, k=4)
    iou, p_lab, g_lab = iou_matrix(torch.from_numpy(pred), torch.from_numpy(gt))
    for i, p in enumerate(p_lab):
        for j, g in enumerate(g_lab):
            a, b = pred == p, gt == g
            assert iou[i, j] == pytest.approx((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("seed", range(5))
def test_hungarian_is_optimal(seed: int) -> None:
    # Blocky random maps give many partial overlaps; brute force over all assignments.
    rng = np.random.default_rng(seed)
    gt = np.kron(rng.integers(0, 4, size=(2, 4, 4)), np.ones((1, 3, 3), int)).astype(np.int32)
    pred = np.kron(rng.integers(0, 5, size=(2, 6, 6)), np.ones((1, 2, 2), int)).astype(np.int32)
    iou, p_lab, g_lab = iou_matrix(pred, gt)
    sub = iou[np.ix_(p_lab != 0, g_lab != 0)]
    best = max(
        sum(sub[r, c] for r, c in zip(rows, range(sub.shape[1]), strict=True))
        for rows in itertools.permutations(range(sub.shape[0]), sub.shape[1])
    )
    res = hungarian_miou(pred, gt)
    assert res["miou"] * res["n_gt"] == pytest.approx(best)


def test_temporal_consistency_perfect_and_flicker() -> None:
    gt = np.zeros((4, 3, 3), np.int32)
    gt[:, :2, :2] = 1  # static 4-pixel entity
    assert temporal_id_consistency(gt.copy(), gt) == 1.0
    pred = gt.copy()
    pred[2][gt[2] == 1] = 9  # id flickers at frame 2 only
    # pairs (0,1) stable, (1,2) and (2,3) unstable -> 4 of 12 pixels
    assert temporal_id_consistency(pred, gt) == pytest.approx(1 / 3)


def test_temporal_consistency_moving_entity_and_reductions() -> None:
    t, h, w = 6, 8, 12
    gt = np.zeros((t, h, w), np.int32)
    for i in range(t):
        gt[i, 1:5, i : i + 4] = 1  # moves right 1 px per frame (overlaps itself)
    gt[:, 6:8, :] = 2  # static stripe, 24 px
    assert temporal_id_consistency(gt + 10 * (gt > 0), gt) == 1.0
    pred = gt.copy()
    pred[3][gt[3] == 2] = 5  # entity 2 flickers at frame 3
    pix = temporal_id_consistency(pred, gt, reduction="pixel")
    ent = temporal_id_consistency(pred, gt, reduction="entity")
    # entity 1: 5 pairs x 12 overlap px, all stable; entity 2: 5 pairs x 24 px, 2 pairs unstable
    assert pix == pytest.approx((60 + 72) / (60 + 120))
    assert ent == pytest.approx((1.0 + 3 / 5) / 2)
    assert math.isnan(temporal_id_consistency(pred[:1], gt[:1]))
    with pytest.raises(ValueError):
        temporal_id_consistency(pred, gt, reduction="bogus")  # type: ignore[arg-type]


def test_float_ids_rejected() -> None:
    with pytest.raises(TypeError):
        hungarian_miou(np.zeros((1, 2, 2), np.float32), np.zeros((1, 2, 2), np.int32))
