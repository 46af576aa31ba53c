"""VBench-style consistency metrics, weight-free stand-ins, and FVD maths (motion smoothness: test_eval_motion.py).

Real DINO/CLIP/I3D weights are not available offline: extractors are exercised with tiny random
transformers models and a fake TorchScript I3D.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from udpdiff.evaluation.consistency import (
    ClipImageFeatures,
    DinoFeatures,
    FeatureExtractor,
    MetricModelUnavailable,
    background_consistency,
    pixel_frame_consistency,
    subject_consistency,
    vbench_consistency,
    vbench_consistency_per_video,
)
from udpdiff.evaluation.fvd import I3DFeatures, feature_statistics, frechet_distance, fvd_from_features

# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dino() -> DinoFeatures:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        image_size=224, patch_size=16,
    )
    return DinoFeatures(model=ViTModel(cfg, add_pooling_layer=False), batch_size=8)


@pytest.fixture(scope="module")
def tiny_clip() -> ClipImageFeatures:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=224, patch_size=32, projection_dim=16,
    )
    return ClipImageFeatures(model=CLIPVisionModelWithProjection(cfg), batch_size=8)


class PixelFeatures:
    """Deterministic weight-free extractor: centred 8x8 thumbnails (satisfies the protocol)."""

    name = "pixels"

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(frames)).permute(0, 3, 1, 2).float()
        x = torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)
        return x - x.mean(1, keepdim=True)


# --------------------------------------------------------------------------------------------
# vbench_consistency maths
# --------------------------------------------------------------------------------------------


def _vbench_loop(features: torch.Tensor) -> float:
    """Literal transcription of VBench's per-video loop (normalize, clamp each sim at 0)."""
    f = torch.nn.functional.normalize(features.double(), dim=-1, p=2)
    total = 0.0
    for i in range(1, len(f)):
        sim_pre = max(0.0, float(torch.nn.functional.cosine_similarity(f[i - 1 : i], f[i : i + 1])))
        sim_fir = max(0.0, float(torch.nn.functional.cosine_similarity(f[0:1], f[i : i + 1])))
        total += (sim_pre + sim_fir) / 2
    return total / (len(f) - 1)


def test_vbench_consistency_hand_example() -> None:
    s = 1 / math.sqrt(2)
    feats = torch.tensor([[1.0, 0.0], [s, s], [0.0, 1.0]])
    # frame 1: (cos 45 + cos 45) / 2 = s; frame 2: (cos 45 (prev) + cos 90 (first)) / 2 = s / 2
    assert vbench_consistency(feats) == pytest.approx((s + s / 2) / 2, abs=1e-6)
    # unnormalised features give the same score (VBench L2-normalises first)
    assert vbench_consistency(feats * torch.tensor([[3.0], [0.5], [7.0]])) == pytest.approx(
        (s + s / 2) / 2, abs=1e-6
    )
    # negative similarities are clamped at 0: frame 2 = [-1, 0] scores (max(0,-s) + max(0,-1))/2 = 0
    neg = torch.tensor([[1.0, 0.0], [s, s], [-1.0, 0.0]])
    assert vbench_consistency(neg) == pytest.approx(s / 2, abs=1e-6)


def test_vbench_consistency_matches_reference_loop_and_batches() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 7, 16, generator=g) + 0.5
    per_video = vbench_consistency_per_video(feats)
    assert per_video.shape == (3,)
    for b in range(3):
        assert float(per_video[b]) == pytest.approx(_vbench_loop(feats[b]), abs=1e-6)
    assert vbench_consistency(feats) == pytest.approx(float(per_video.mean()), abs=1e-7)
    assert vbench_consistency(torch.randn(1, 8)) == 1.0  # single frame: VBench returns 1


def test_vbench_consistency_smooth_beats_shuffled_features(frame_shuffle) -> None:
    theta = torch.linspace(0, 1.2, 12)
    smooth = torch.stack([torch.cos(theta), torch.sin(theta), 0.2 * torch.ones(12)], -1)
    shuffled = smooth[torch.from_numpy(frame_shuffle)]
    assert vbench_consistency(smooth) > vbench_consistency(shuffled)
    assert vbench_consistency(smooth.repeat(1, 1)[:1].repeat(5, 1)) == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------------------------
# SC / BC with tiny random extractors
# --------------------------------------------------------------------------------------------


def test_extractors_satisfy_protocol(tiny_dino: DinoFeatures, tiny_clip: ClipImageFeatures) -> None:
    assert isinstance(tiny_dino, FeatureExtractor)
    assert isinstance(tiny_clip, FeatureExtractor)
    assert isinstance(PixelFeatures(), FeatureExtractor)


def test_preprocessing_follows_vbench(tiny_dino: DinoFeatures, tiny_clip: ClipImageFeatures) -> None:
    x = torch.rand(2, 3, 48, 64)
    # DINO: short side -> 224, aspect kept (int-truncated long side), no crop
    assert tuple(tiny_dino._preprocess(x).shape) == (2, 3, 224, int(224 * 64 / 48))
    # CLIP: short side -> 224 then 224x224 center crop
    assert tuple(tiny_clip._preprocess(x).shape) == (2, 3, 224, 224)
    # ImageNet normalisation of a mid-gray frame
    gray = torch.full((1, 3, 224, 224), 0.5)
    expect = (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(tiny_dino._preprocess(gray)[0, :, 0, 0], expect)


def test_identical_frames_score_one(tiny_dino: DinoFeatures, tiny_clip: ClipImageFeatures, moving_video) -> None:
    still = np.repeat(moving_video(t=1), 5, axis=0)
    assert subject_consistency(still, tiny_dino) == pytest.approx(1.0, abs=1e-5)
    assert background_consistency(still, tiny_clip) == pytest.approx(1.0, abs=1e-5)


def test_sc_bc_equal_vbench_on_extracted_features(
    tiny_dino: DinoFeatures, tiny_clip: ClipImageFeatures, moving_video, frame_shuffle
) -> None:
    v = moving_video()
    for fn, ex in ((subject_consistency, tiny_dino), (background_consistency, tiny_clip)):
        score = fn(v, ex)
        assert 0.0 <= score <= 1.0
        assert score == pytest.approx(vbench_consistency(ex(v)), abs=1e-6)
        # a batch of videos: mean of per-video scores; order preserved with reduction="none"
        batch = np.stack([v, v[frame_shuffle]])
        per = fn(batch, ex, reduction="none")
        assert per[0] == pytest.approx(score, abs=1e-6)
        assert fn(batch, ex) == pytest.approx(float(np.mean(per)), abs=1e-6)


def test_smooth_video_beats_shuffled_with_weight_free_extractor(moving_video, frame_shuffle) -> None:
    # A tiny random ViT cannot separate these reliably; a deterministic extractor checks the
    # pipeline (frames -> features -> VBench maths) end to end.
    v = moving_video()
    ex = PixelFeatures()
    assert subject_consistency(v, ex) > subject_consistency(v[frame_shuffle], ex)


def test_missing_weights_raise_clear_error(tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(MetricModelUnavailable, match="DinoFeatures\\(model_path_or_id="):
        DinoFeatures(missing)
    with pytest.raises(MetricModelUnavailable, match="ClipImageFeatures") as info:
        ClipImageFeatures(str(missing))
    assert info.value.metric_name.startswith("background_consistency")
    assert info.value.path_or_id == str(missing)


def test_loads_saved_tiny_model_from_folder(tmp_path, tiny_dino: DinoFeatures, moving_video) -> None:
    tiny_dino.model.save_pretrained(tmp_path / "dino")
    loaded = DinoFeatures(tmp_path / "dino")
    v = moving_video(t=3)
    torch.testing.assert_close(loaded(v), tiny_dino(v))


# --------------------------------------------------------------------------------------------
# weight-free stand-ins
# --------------------------------------------------------------------------------------------


def test_pixel_frame_consistency(moving_video, frame_shuffle) -> None:
    two = np.stack([np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 51, np.uint8)])
    assert pixel_frame_consistency(two) == pytest.approx(1 - 51 / 255)
    # no uint8 wrap-around in the other direction
    assert pixel_frame_consistency(two[::-1].copy()) == pytest.approx(1 - 51 / 255)
    v = moving_video()
    assert pixel_frame_consistency(np.repeat(v[:1], 4, axis=0)) == 1.0
    assert pixel_frame_consistency(v) > pixel_frame_consistency(v[frame_shuffle])
    assert pixel_frame_consistency(torch.from_numpy(v)) == pytest.approx(pixel_frame_consistency(v))


# --------------------------------------------------------------------------------------------
# FVD
# --------------------------------------------------------------------------------------------


def _reference_fd(a: np.ndarray, b: np.ndarray) -> float:
    """Direct float64 numpy/scipy Fréchet distance between two sample sets."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_identical_sets_is_zero() -> None:
    a = np.random.default_rng(0).normal(size=(200, 12))
    mu, sigma = feature_statistics(a)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)
    assert fvd_from_features(torch.from_numpy(a).float(), a) == pytest.approx(0.0, abs=1e-4)


def test_frechet_distance_matches_reference_symmetric_positive() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 10))
    mix = rng.normal(size=(10, 10)) * 0.3 + np.eye(10)
    b = rng.normal(size=(300, 10)) @ mix + 0.5
    ma, sa = feature_statistics(a)
    mb, sb = feature_statistics(b)
    np.testing.assert_allclose(sa, np.cov(a, rowvar=False))
    fd = frechet_distance(ma, sa, mb, sb)
    assert fd == pytest.approx(_reference_fd(a, b), rel=1e-9)
    assert frechet_distance(mb, sb, ma, sa) == pytest.approx(fd, rel=1e-9)
    assert fd > 0.0
    # known closed form for 1-D Gaussians: (m1-m2)^2 + (s1-s2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_frechet_distance_near_singular_is_finite() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(5, 20)), rng.normal(size=(5, 20)) + 1.0  # rank-deficient covariances
    fd = fvd_from_features(a, b)
    assert math.isfinite(fd) and fd > 0.0


class _FakeI3D(torch.nn.Module):
    """Stand-in with the StyleGAN-V detector signature; records what it was fed."""

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False
    ) -> torch.Tensor:
        assert rescale and resize and return_features
        return torch.stack([x.mean((1, 2, 3, 4)), x.amax((1, 2, 3, 4)), float(x.shape[2]) + 0 * x[:, 0, 0, 0, 0]], 1)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_i3d_features_protocol(tmp_path) -> None:
    scripted = torch.jit.script(_FakeI3D())
    path = tmp_path / "i3d_torchscript.pt"
    scripted.save(str(path))
    ex = I3DFeatures(path, device="cpu", batch_size=2)
    vids = np.zeros((3, 5, 8, 8, 3), np.uint8)
    vids[1] = 255
    feats = ex(vids)
    assert feats.shape == (3, 3) and feats.dtype == torch.float32
    # fed (B, 3, T, H, W) floats in [0, 255] (the detector rescales to [-1, 1] itself)
    assert feats[:, 1].tolist() == [0.0, 255.0, 0.0]
    assert feats[:, 2].tolist() == [5.0, 5.0, 5.0]
    assert ex(vids[0]).shape == (1, 3)


def test_i3d_missing_file_raises(tmp_path) -> None:
    with pytest.raises(MetricModelUnavailable, match="i3d_torchscript.pt"):
        I3DFeatures(tmp_path / "missing.pt")
