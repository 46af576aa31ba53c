"""Depth metrics: hand-computed values on tiny arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from udpdiff.evaluation.depth import align_scale_shift, depth_metrics


def _vid(values: list[float], dtype: type = np.float32) -> np.ndarray:
    """Four values as a (T=1, H=2, W=2) depth video."""
    return np.asarray(values, dtype=dtype).reshape(1, 2, 2)


def test_hand_computed_without_alignment() -> None:
    pred = _vid([0.1, 0.4, 0.6, 0.9])
    gt = _vid([0.2, 0.4, 0.5, 1.0])
    m = depth_metrics(pred, gt, align=False)
    # ratios max(p/g, g/p): 2.0 (fail), 1.0, 1.2, 1.111 -> 3 of 4 below 1.25
    assert m["delta1"] == pytest.approx(0.75)
    # |p-g|/g: 0.5, 0, 0.2, 0.1
    assert m["abs_rel"] == pytest.approx(0.2, abs=1e-6)
    # squared errors 0.01, 0, 0.01, 0.01
    assert m["rmse"] == pytest.approx(math.sqrt(0.0075), abs=1e-6)
    assert m["n_valid"] == 4


def test_perfect_prediction() -> None:
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.05, 1.0, size=(3, 8, 10)).astype(np.float32)
    for align in (False, True):
        m = depth_metrics(gt.copy(), gt, align=align)
        assert m["delta1"] == 1.0
        assert m["rmse"] == pytest.approx(0.0, abs=1e-6)
        assert m["abs_rel"] == pytest.approx(0.0, abs=1e-6)


def test_scaled_shifted_copy_is_perfect_after_alignment() -> None:
    rng = np.random.default_rng(1)
    gt = rng.uniform(0.05, 1.0, size=(4, 6, 7))
    pred = 0.5 * gt + 0.2
    res = align_scale_shift(pred, gt)
    assert isinstance(res.aligned, np.ndarray) and res.aligned.shape == gt.shape
    assert float(res.scale) == pytest.approx(2.0, abs=1e-9)
    assert float(res.shift) == pytest.approx(-0.4, abs=1e-9)
    np.testing.assert_allclose(res.aligned, gt, atol=1e-9)
    m = depth_metrics(pred, gt)
    assert m["rmse"] == pytest.approx(0.0, abs=1e-9)
    assert m["delta1"] == 1.0
    assert depth_metrics(pred, gt, align=False)["rmse"] > 0.05


def test_per_frame_alignment() -> None:
    rng = np.random.default_rng(2)
    gt = rng.uniform(0.05, 1.0, size=(3, 5, 5))
    scales = np.array([0.5, 1.0, 2.0])[:, None, None]
    shifts = np.array([0.1, -0.2, 0.3])[:, None, None]
    pred = scales * gt + shifts
    res = align_scale_shift(pred, gt, per_frame=True)
    assert res.scale.shape == (3,)
    np.testing.assert_allclose(res.scale, 1.0 / scales[:, 0, 0], atol=1e-9)
    assert depth_metrics(pred, gt, per_frame=True)["rmse"] == pytest.approx(0.0, abs=1e-9)
    # One affine map per video cannot undo per-frame flicker.
    assert depth_metrics(pred, gt, per_frame=False)["rmse"] > 0.01


def test_outlier_matches_hand_calculation() -> None:
    gt = _vid([0.1, 0.2, 0.3, 0.4])
    pred = _vid([0.1, 0.2, 0.3, 1.0])  # one outlier
    # Least squares: mean p = 0.4, mean g = 0.25, cov = 0.14, var_p = 0.5 -> s = 0.28,
    # t = 0.25 - 0.28 * 0.4 = 0.138. Aligned = [0.166, 0.194, 0.222, 0.418].
    res = align_scale_shift(_vid([0.1, 0.2, 0.3, 1.0], np.float64), _vid([0.1, 0.2, 0.3, 0.4], np.float64))
    assert float(res.scale) == pytest.approx(0.28, abs=1e-9)
    assert float(res.shift) == pytest.approx(0.138, abs=1e-9)
    np.testing.assert_allclose(res.aligned.reshape(-1), [0.166, 0.194, 0.222, 0.418], atol=1e-9)
    m = depth_metrics(pred, gt)
    # residuals 0.066, -0.006, -0.078, 0.018 -> mean square 0.0108 / 4 = 0.0027
    assert m["rmse"] == pytest.approx(math.sqrt(0.0027), abs=1e-6)
    # ratios 1.66 (fail), 1.031, 1.351 (fail), 1.045 -> 0.5
    assert m["delta1"] == pytest.approx(0.5)
    abs_rel = (0.066 / 0.1 + 0.006 / 0.2 + 0.078 / 0.3 + 0.018 / 0.4) / 4
    assert m["abs_rel"] == pytest.approx(abs_rel, abs=1e-6)
    raw = depth_metrics(pred, gt, align=False)
    assert raw["rmse"] == pytest.approx(0.3, abs=1e-6)
    assert raw["delta1"] == pytest.approx(0.75)


def test_mask_excludes_pixels() -> None:
    gt = _vid([0.1, 0.2, 0.3, 0.4])
    pred = _vid([0.1, 0.2, 0.3, 1.0])
    mask = _vid([1, 1, 1, 0]).astype(bool)
    m = depth_metrics(pred, gt, mask=mask)
    assert m["n_valid"] == 3
    assert m["rmse"] == pytest.approx(0.0, abs=1e-6)
    assert m["delta1"] == 1.0


def test_zeros_are_clamped_to_eps() -> None:
    gt = _vid([0.0, 0.5, 0.5, 0.5])
    pred = _vid([0.0, 0.0, 0.5, 0.5])
    m = depth_metrics(pred, gt, align=False, eps=1e-6)
    # p = g = 0 -> ratio 1 (correct); p = 0 vs g = 0.5 -> huge ratio (wrong)
    assert m["delta1"] == pytest.approx(0.75)
    assert m["abs_rel"] == pytest.approx((1.0 - 1e-6 / 0.5) / 4, abs=1e-6)
    assert np.isfinite(m["abs_rel"])


def test_nonfinite_excluded_and_empty_is_nan() -> None:
    gt = _vid([0.2, 0.4, np.nan, 0.8])
    m = depth_metrics(gt.copy(), gt)
    assert m["n_valid"] == 3 and m["rmse"] == pytest.approx(0.0, abs=1e-6)
    empty = depth_metrics(gt, gt, mask=np.zeros_like(gt, dtype=bool))
    assert empty["n_valid"] == 0 and math.isnan(empty["delta1"])


def test_constant_prediction_falls_back_to_mean() -> None:
    gt = _vid([0.1, 0.2, 0.3, 0.4])
    pred = np.full_like(gt, 0.7)
    res = align_scale_shift(pred, gt)
    assert float(res.scale) == 0.0
    assert float(res.shift) == pytest.approx(0.25, abs=1e-6)


def test_torch_input_and_batch() -> None:
    g = torch.rand(2, 3, 4, 5, dtype=torch.float32) * 0.9 + 0.05
    p = torch.stack([2.0 * g[0] - 0.1, 0.5 * g[1] + 0.3])
    res = align_scale_shift(p, g)
    assert isinstance(res.aligned, torch.Tensor) and res.aligned.dtype == torch.float32
    assert res.scale.shape == (2,)
    torch.testing.assert_close(res.aligned, g, atol=1e-5, rtol=0)
    m = depth_metrics(p, g)
    assert m["rmse"] < 1e-5 and m["delta1"] == 1.0


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        depth_metrics(np.zeros((1, 2, 2)), np.zeros((1, 2, 3)))


# -- the depth-space protocol (DepthCrafter / Depth Anything) -------------------------------------
def _reference_depth_space(pred, gt, z_near, z_far):
    """The protocol written out with numpy's least squares: align in true disparity, invert, score."""
    valid = gt > 0
    true_disp = gt * (1 / z_near - 1 / z_far) + 1 / z_far
    a = np.stack([pred[valid], np.ones(valid.sum())], axis=1)
    (s, t), *_ = np.linalg.lstsq(a, true_disp[valid], rcond=None)
    zp = 1 / np.maximum(s * pred[valid] + t, 1 / z_far)
    zg = 1 / true_disp[valid]
    ratio = np.maximum(zp / zg, zg / zp)
    return {"delta1": (ratio < 1.25).mean(), "abs_rel": (np.abs(zp - zg) / zg).mean(),
            "rmse": np.sqrt(((zp - zg) ** 2).mean())}


def test_depth_space_metrics_match_the_protocol_written_out():
    from udpdiff.data.synthetic import Z_FAR, Z_NEAR, disparity_from_z
    from udpdiff.evaluation.depth import depth_space_metrics

    rng = np.random.default_rng(0)
    z = rng.uniform(1.2, 12.0, size=(3, 16, 20))
    gt = disparity_from_z(z)
    gt[:, :3] = 0.0  # sky rows: infinitely far, never scored
    # a prediction that is wrong in a way no scale and shift can undo: depth warped and noisy
    pred = disparity_from_z(z**1.15 * rng.lognormal(0, 0.1, z.shape))
    got = depth_space_metrics(pred, gt, (Z_NEAR, Z_FAR))
    want = _reference_depth_space(pred, gt, Z_NEAR, Z_FAR)
    for key in ("delta1", "abs_rel", "rmse"):
        assert got[key] == pytest.approx(want[key], rel=1e-9), key
    assert got["n_valid"] == (gt > 0).sum() and 0.3 < got["delta1"] < 0.99
    # the sky is not scored: whatever is predicted there changes nothing
    pred_sky = pred.copy()
    pred_sky[:, :3] = 5.0
    assert depth_space_metrics(pred_sky, gt, (Z_NEAR, Z_FAR)) == got


def test_depth_space_metrics_are_perfect_for_any_affine_disparity_and_read_in_depth():
    from udpdiff.evaluation.depth import depth_space_metrics

    rng = np.random.default_rng(1)
    gt = rng.uniform(0.05, 1.0, size=(2, 8, 8))
    perfect = depth_space_metrics(0.3 * gt + 0.1, gt, (1.0, 20.0))
    assert perfect["delta1"] == 1.0 and perfect["abs_rel"] < 1e-12 and perfect["rmse"] < 1e-10
    # a depth off by 30 % everywhere is an affine error in disparity: the alignment removes it,
    # whereas a 30 % error in *depth* at half the pixels is not, and counts as wrong there
    z = 1 / (gt * (1 - 1 / 20) + 1 / 20)
    half = np.where(np.arange(8) < 4, 1.3, 1.0)[None, None, :]
    warped = (1 / (z * half) - 1 / 20) / (1 - 1 / 20)
    m = depth_space_metrics(warped, gt, (1.0, 20.0))
    assert m["delta1"] < 1.0 and m["abs_rel"] > 0.01
    with pytest.raises(ValueError, match="z_near"):
        depth_space_metrics(gt, gt, (5.0, 1.0))


def test_training_validation_scores_add_the_depth_space_protocol_for_exact_depth():
    """Fig 8's validation scores: the paper's disparity scores always, depth-space ones when the data's
    depth is exact (synthetic clips)."""
    from udpdiff.data.synthetic import exact_depth_range
    from udpdiff.stages.train import validation_scores

    rng = np.random.default_rng(2)
    gt = rng.uniform(0.05, 1.0, size=(4, 8, 8)).astype(np.float32)
    video = rng.integers(0, 255, size=(4, 8, 8, 3), dtype=np.uint8)
    warped = np.clip(gt**1.5, 0, 1)
    plain = validation_scores("depth", [video], [(warped, gt)])
    exact = validation_scores("depth", [video], [(warped, gt)], exact_depth_range("synthetic"))
    assert "val/depth/gt_delta1_depth" not in plain and plain.items() <= exact.items()
    assert 0 < exact["val/depth/gt_delta1_depth"] < 1 and exact["val/depth/gt_abs_rel_depth"] > 0
    assert exact_depth_range("panda70m") is None
