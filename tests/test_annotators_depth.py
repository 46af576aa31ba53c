"""Video depth annotators (DepthCrafter, Depth Anything V2) with tiny random models of the real classes.

No weights are available offline: the tests build tiny randomly-initialised configs of the same
diffusers/transformers classes, save them in folders laid out like the hub repos and load them back
through the annotators, so the real ``from_pretrained`` code paths run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLTemporalDecoder,
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    DepthAnythingForDepthEstimation,
)

from udpdiff.annotators.depth import (
    SVD_SCHEDULER_CONFIG,
    DepthAnnotator,
    DepthAnythingV2Annotator,
    DepthCrafterAnnotator,
    DepthCrafterPipeline,
    FramewiseUNetSpatioTemporalConditionModel,
    depthcrafter_processing_size,
    normalize_per_video,
    overlap_blend_weights,
    sliding_windows,
    stitch_windows,
)
from udpdiff.evaluation.consistency import IMAGENET_MEAN, IMAGENET_STD, MetricModelUnavailable

T, H, W = 9, 40, 56  # odd sizes on purpose: DepthCrafter works at 64x64, DA-V2 at 364x518

UNET_KW = dict(
    sample_size=8,
    in_channels=8,  # 4 noisy depth latent channels + 4 RGB latent channels
    out_channels=4,
    down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    block_out_channels=(32, 64),
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24,  # 3 added time ids x 8
    layers_per_block=1,
    cross_attention_dim=32,
    transformer_layers_per_block=1,
    num_attention_heads=(2, 4),
    num_frames=T,
)


def textured_video(t: int = T, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """A smooth gradient scene drifting over time plus some noise, uint8 (t, h, w, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = []
    for i in range(t):
        base = 127 + 90 * np.sin((xx + 2 * i) / 9.0) * np.cos(yy / 7.0)
        rgb = np.stack([base, 255 - base, 0.5 * base + 40], -1) + rng.normal(0, 8, (h, w, 3))
        frames.append(rgb)
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# tiny models
# --------------------------------------------------------------------------------------------


def tiny_depthcrafter_parts(seed: int = 0) -> dict[str, object]:
    torch.manual_seed(seed)
    return dict(
        unet=FramewiseUNetSpatioTemporalConditionModel(**UNET_KW),
        # 4 blocks -> vae_scale_factor 8 as in SVD; 32 channels because of GroupNorm(32).
        vae=AutoencoderKLTemporalDecoder(
            block_out_channels=(32, 32, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 4,
            layers_per_block=1,
            latent_channels=4,
        ),
        image_encoder=CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=1,
                num_attention_heads=4,
                image_size=224,
                patch_size=32,
                projection_dim=32,
            )
        ),
        scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG),
        feature_extractor=CLIPImageProcessor(),
    )


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    # The models are tiny: one intra-op thread is as fast, and it avoids the OpenMP spin-wait
    # slowdowns (10x and more) when the shared CPU is busy with other jobs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dc_pipeline() -> DepthCrafterPipeline:
    return DepthCrafterPipeline(**tiny_depthcrafter_parts())


@pytest.fixture(scope="module")
def dc_annotator(dc_pipeline: DepthCrafterPipeline) -> DepthCrafterAnnotator:
    return DepthCrafterAnnotator(pipeline=dc_pipeline, device="cpu", num_inference_steps=2)


@pytest.fixture(scope="module")
def dc_dirs(tmp_path_factory: pytest.TempPathFactory, dc_pipeline: DepthCrafterPipeline) -> tuple[Path, Path]:
    """``DepthCrafter/`` (UNet at the root, like tencent/DepthCrafter) and ``svd/`` (an SVD repo)."""
    root = tmp_path_factory.mktemp("dc")
    dc_pipeline.unet.save_pretrained(root / "DepthCrafter")
    parts = {k: v for k, v in dc_pipeline.components.items() if k != "unet"}
    # The SVD repo's own (stock, here unrelated random) UNet must not be the one that gets used.
    torch.manual_seed(123)
    svd_unet = UNetSpatioTemporalConditionModel(**UNET_KW)
    StableVideoDiffusionPipeline(unet=svd_unet, **parts).save_pretrained(root / "svd")
    # Like the real model_index.json (transformers >= 5 writes the backend class name instead).
    index_path = root / "svd" / "model_index.json"
    index = json.loads(index_path.read_text())
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    index_path.write_text(json.dumps(index))
    return root / "DepthCrafter", root / "svd"


@pytest.fixture(scope="module")
def da_model(tiny_depth_anything_dir: Path) -> DepthAnythingForDepthEstimation:
    return DepthAnythingForDepthEstimation.from_pretrained(tiny_depth_anything_dir).eval()


@pytest.fixture(scope="module")
def da_annotator(da_model: DepthAnythingForDepthEstimation, small_da_processor) -> DepthAnythingV2Annotator:
    return DepthAnythingV2Annotator(model=da_model, processor=small_da_processor, device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def small_da_processor(tiny_depth_anything_dir: Path) -> object:
    from transformers import DPTImageProcessor

    # DA-V2's settings at 70 px instead of 518 px (tests/conftest.py), to keep most tests fast
    return DPTImageProcessor.from_pretrained(tiny_depth_anything_dir)


def assert_normalised_depth(d: np.ndarray, shape: tuple[int, int, int]) -> None:
    assert isinstance(d, np.ndarray) and d.dtype == np.float32
    assert d.shape == shape
    assert np.isfinite(d).all()
    # Per-video normalisation: one min/max over the clip lands exactly on 0 and 1.
    assert d.min() == 0.0 and d.max() == 1.0


# --------------------------------------------------------------------------------------------
# shared maths
# --------------------------------------------------------------------------------------------


def test_normalize_per_video_is_one_affine_map_for_the_clip() -> None:
    d = torch.stack([torch.linspace(0, 1, 12).view(3, 4), torch.linspace(2, 3, 12).view(3, 4)])
    n = normalize_per_video(d)
    assert n.dtype == np.float32 and n.min() == 0.0 and n.max() == 1.0
    # Frame 0 stays in the lower third: a per-frame min/max would have stretched it to [0, 1].
    assert n[0].max() == pytest.approx(1 / 3, abs=1e-6) and n[1].min() == pytest.approx(2 / 3, abs=1e-6)
    np.testing.assert_allclose(n, (d.numpy() - 0) / 3, atol=1e-6)
    assert not normalize_per_video(torch.full((2, 3, 4), 5.0)).any()
    with pytest.raises(ValueError, match="non-finite"):
        normalize_per_video(torch.tensor([0.0, float("nan")]))


@pytest.mark.parametrize(
    ("size", "expected"),
    [((40, 56), (64, 64)), ((720, 1280), (576, 1024)), ((1080, 1920), (576, 1024)), ((480, 720), (512, 704)),
     ((10, 10), (64, 64))],
)
def test_depthcrafter_processing_size(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert depthcrafter_processing_size(*size, max_res=1024) == expected


def test_sliding_windows_match_depthcrafter_loop() -> None:
    assert sliding_windows(9, 110, 25) == [(0, 9)]  # short clip: one window, no overlap
    assert sliding_windows(195, 110, 25) == [(0, 110), (85, 195)]  # DepthCrafter's default process length
    wins = sliding_windows(9, 4, 2)
    assert wins == [(0, 4), (2, 6), (4, 8), (6, 9)]
    for (_, e0), (s1, e1) in zip(wins, wins[1:], strict=False):
        assert e0 - s1 == 2 and e1 - s1 > 2  # exactly `overlap` shared, always something new
    assert wins[-1][1] == 9
    with pytest.raises(ValueError):
        sliding_windows(20, 4, 4)


def test_overlap_blend_weights_and_stitching() -> None:
    w = overlap_blend_weights(5)
    assert w[0] == 0 and w[-1] == 1 and torch.all(w[1:] > w[:-1])
    # Windows that agree on their shared frames stitch back to the underlying sequence exactly
    # (every blended frame is a convex combination with weights w and 1 - w summing to one).
    x = torch.randn(1, 23, 4, 3, 3)
    wins = sliding_windows(23, 8, 3)
    np.testing.assert_allclose(stitch_windows([x[:, s:e] for s, e in wins], 3), x, atol=1e-6)
    # Two disagreeing windows: a linear ramp from the old value to the new one over the overlap.
    a, b = torch.zeros(1, 6, 1), torch.ones(1, 6, 1)
    out = stitch_windows([a, b], 4)[0, :, 0]
    np.testing.assert_allclose(out, [0, 0, 0, 1 / 3, 2 / 3, 1, 1, 1], atol=1e-6)


# --------------------------------------------------------------------------------------------
# DepthCrafter
# --------------------------------------------------------------------------------------------


def test_framewise_unet_matches_svd_unet_for_shared_embedding_and_uses_per_frame_ones() -> None:
    torch.manual_seed(0)
    fw = FramewiseUNetSpatioTemporalConditionModel(**UNET_KW).eval()
    stock = UNetSpatioTemporalConditionModel(**UNET_KW).eval()
    stock.load_state_dict(fw.state_dict())
    sample, ids = torch.randn(1, 3, 8, 8, 8), torch.tensor([[7.0, 127.0, 0.02]])
    emb = torch.randn(1, 1, 32)
    with torch.no_grad():
        ref = stock(sample, 1.5, emb, ids).sample
        same = fw(sample, 1.5, emb.expand(1, 3, 32), ids).sample
        per_frame = fw(sample, 1.5, torch.randn(1, 3, 32), ids).sample
    torch.testing.assert_close(same, ref, atol=1e-5, rtol=1e-5)
    assert (per_frame - ref).abs().max() > 1e-4
    with pytest.raises(ValueError, match="per-frame"):
        fw(sample, 1.5, emb, ids)


def test_depthcrafter_output_contract(dc_annotator: DepthCrafterAnnotator) -> None:
    video = textured_video()
    d = dc_annotator(video)
    assert_normalised_depth(d, (T, H, W))
    assert isinstance(dc_annotator, DepthAnnotator) and dc_annotator.name == "depthcrafter"
    # Seeded per video: the same clip gets the same annotation whatever ran before.
    np.testing.assert_array_equal(dc_annotator(video), d)


def test_depthcrafter_window_covering_clip_equals_single_window(dc_pipeline: DepthCrafterPipeline) -> None:
    video = textured_video()
    exact = DepthCrafterAnnotator(pipeline=dc_pipeline, device="cpu", num_inference_steps=2, window_size=T)
    larger = DepthCrafterAnnotator(pipeline=dc_pipeline, device="cpu", num_inference_steps=2, window_size=64)
    np.testing.assert_array_equal(exact(video), larger(video))


def test_depthcrafter_sliding_windows_run_the_unet_per_window(dc_pipeline: DepthCrafterPipeline) -> None:
    ann = DepthCrafterAnnotator(pipeline=dc_pipeline, device="cpu", num_inference_steps=2, window_size=4, overlap=2)
    frames_seen: list[tuple[int, int]] = []
    hook = dc_pipeline.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: frames_seen.append((args[0].shape[1], args[0].shape[2])), with_kwargs=True
    )
    try:
        d = ann(textured_video())
    finally:
        hook.remove()
    assert_normalised_depth(d, (T, H, W))
    # 4 windows [0,4) [2,6) [4,8) [6,9), 2 steps each, 8 input channels (depth + RGB latents).
    assert frames_seen == [(4, 8)] * 6 + [(3, 8)] * 2


def test_depthcrafter_windows_slice_conditioning_and_reuse_noise(
    dc_pipeline: DepthCrafterPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Check the long-video logic with a fake denoiser whose output only depends on the conditioning."""
    window, overlap, stride = 4, 2, 2
    frames = torch.rand(T, 3, 64, 64)
    calls: list[dict[str, torch.Tensor]] = []

    def fake_denoise(z, rgb_latents, embeddings, added_time_ids, guidance_scale):  # noqa: ANN001
        calls.append({"z": z.clone(), "rgb": rgb_latents, "emb": embeddings})
        # A deterministic function of this window's frames only: consistent windows must stitch
        # back to the same function of the whole clip.
        return rgb_latents + embeddings.mean(-1)[..., None, None, None]

    monkeypatch.setattr(dc_pipeline, "_denoise_window", fake_denoise)
    noise = torch.randn(1, window, 4, 8, 8)
    out = dc_pipeline(
        frames, window_size=window, overlap=overlap, num_inference_steps=2, latents=noise.clone(),
        generator=torch.Generator().manual_seed(0), output_type="latent",
    )
    monkeypatch.undo()
    wins = sliding_windows(T, window, overlap)
    assert len(calls) == len(wins) and out.shape == (1, T, 4, 8, 8)
    rgb_all = torch.cat([c["rgb"] for c in calls[:1]] + [c["rgb"][:, overlap:] for c in calls[1:]], dim=1)
    emb_all = torch.cat([c["emb"] for c in calls[:1]] + [c["emb"][:, overlap:] for c in calls[1:]], dim=1)
    expected = rgb_all + emb_all.mean(-1)[..., None, None, None]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # Overlapping windows got the same conditioning for their shared frames.
    for prev, cur in zip(calls, calls[1:], strict=False):
        torch.testing.assert_close(cur["rgb"][:, :overlap], prev["rgb"][:, stride : stride + overlap])
        torch.testing.assert_close(cur["emb"][:, :overlap], prev["emb"][:, stride : stride + overlap])
    # Noise: window 0 starts from the given noise at init_noise_sigma; window 1 re-noises the previous
    # result to sigma_max on the shared frames and reuses the noise cyclically (DepthCrafter).
    sched = dc_pipeline.scheduler
    sigma0, init_sigma = float(sched.sigmas[0]), float(sched.init_noise_sigma)
    torch.testing.assert_close(calls[0]["z"], noise * init_sigma)
    cyc = torch.cat([noise[:, -overlap:], noise[:, :stride]], dim=1)
    torch.testing.assert_close(calls[1]["z"][:, :overlap], expected[:, stride:window] + cyc[:, :overlap] * sigma0)
    torch.testing.assert_close(calls[1]["z"][:, overlap:], cyc[:, overlap:] * init_sigma)


def test_depthcrafter_loads_from_repo_layout_folders(
    dc_dirs: tuple[Path, Path], dc_annotator: DepthCrafterAnnotator
) -> None:
    unet_dir, svd_dir = dc_dirs
    assert (unet_dir / "config.json").exists() and (svd_dir / "vae" / "config.json").exists()
    ann = DepthCrafterAnnotator(unet_dir, svd_dir, device="cpu", num_inference_steps=2)
    assert type(ann.pipeline.unet) is FramewiseUNetSpatioTemporalConditionModel
    assert isinstance(ann.pipeline.scheduler, EulerDiscreteScheduler)
    assert ann.pipeline.scheduler.config.prediction_type == "v_prediction"
    video = textured_video()
    d = ann(video)
    assert_normalised_depth(d, (T, H, W))
    # Same weights as the in-memory pipeline (not the SVD repo's own UNet); loaded tensors may take
    # other BLAS paths, hence the tolerance.
    np.testing.assert_allclose(d, dc_annotator(video), atol=1e-3)


def test_depthcrafter_missing_weights_raise_with_hint(tmp_path: Path, dc_dirs: tuple[Path, Path]) -> None:
    with pytest.raises(MetricModelUnavailable, match="DepthCrafter") as err:
        DepthCrafterAnnotator(tmp_path / "nope", tmp_path / "nope_svd", device="cpu")
    assert "unet_path_or_id" in str(err.value) and "huggingface-cli download" in str(err.value)
    with pytest.raises(MetricModelUnavailable, match="SVD components") as err:
        DepthCrafterAnnotator(dc_dirs[0], tmp_path / "nope_svd", device="cpu")
    assert "svd_path_or_id" in str(err.value)


def test_depthcrafter_rejects_bad_settings(dc_pipeline: DepthCrafterPipeline) -> None:
    with pytest.raises(ValueError, match="overlap"):
        DepthCrafterAnnotator(pipeline=dc_pipeline, device="cpu", overlap=-1)
    with pytest.raises(ValueError, match="overlap"):
        DepthCrafterAnnotator(pipeline=dc_pipeline, device="cpu", window_size=4, overlap=4)(textured_video())
    with pytest.raises(ValueError, match="multiples of 8"):
        dc_pipeline(torch.rand(2, 3, 60, 64))


# --------------------------------------------------------------------------------------------
# Depth Anything V2
# --------------------------------------------------------------------------------------------


def test_depth_anything_output_contract_and_batching_invariance(
    da_model: DepthAnythingForDepthEstimation, da_annotator: DepthAnythingV2Annotator, small_da_processor
) -> None:
    video = textured_video()
    d4 = da_annotator(video)
    assert_normalised_depth(d4, (T, H, W))
    assert da_annotator.name == "depth_anything_v2"
    one = DepthAnythingV2Annotator(model=da_model, processor=small_da_processor, device="cpu", batch_size=1)
    np.testing.assert_allclose(one(video), d4, atol=1e-5)


def test_depth_anything_matches_transformers_postprocessing(
    da_model: DepthAnythingForDepthEstimation, da_annotator: DepthAnythingV2Annotator
) -> None:
    video = textured_video(t=3)
    proc = da_annotator.processor
    with torch.no_grad():
        inputs = proc(images=list(video), return_tensors="pt")
        outputs = da_model(**inputs)
    ref = proc.post_process_depth_estimation(outputs, target_sizes=[(H, W)] * 3)
    ref = torch.stack([r["predicted_depth"] for r in ref])
    np.testing.assert_allclose(da_annotator(video), normalize_per_video(ref), atol=1e-5)


def test_depth_anything_loads_from_folder_and_falls_back_to_known_processor(
    tmp_path: Path, da_model: DepthAnythingForDepthEstimation, caplog: pytest.LogCaptureFixture, small_da_processor
) -> None:
    bare, full = tmp_path / "bare", tmp_path / "full"
    da_model.save_pretrained(bare)  # config.json + model.safetensors, no preprocessor_config.json
    da_model.save_pretrained(full)
    small_da_processor.save_pretrained(full)

    with_proc = DepthAnythingV2Annotator(full, device="cpu")
    assert with_proc.processor.size["height"] == 70  # read from the checkpoint's preprocessor_config.json

    with caplog.at_level("WARNING", logger="udpdiff.annotators.depth"):
        ann = DepthAnythingV2Annotator(bare, device="cpu", batch_size=8)
    assert "known DA-V2 settings" in caplog.text
    p = ann.processor
    assert p.size["height"] == p.size["width"] == 518 and p.keep_aspect_ratio and p.ensure_multiple_of == 14
    np.testing.assert_allclose(p.image_mean, IMAGENET_MEAN)
    np.testing.assert_allclose(p.image_std, IMAGENET_STD)
    assert p(images=[textured_video(t=1)[0]], return_tensors="pt")["pixel_values"].shape[-2:] == (364, 518)
    assert_normalised_depth(ann(textured_video(t=3)), (3, H, W))


def test_depth_anything_missing_weights_raise_with_hint(tmp_path: Path) -> None:
    with pytest.raises(MetricModelUnavailable, match="Depth Anything V2") as err:
        DepthAnythingV2Annotator(tmp_path / "missing")
    assert "DepthAnythingV2Annotator(model_path_or_id=" in str(err.value)
    # A hub id that is not in the local cache fails fast and clearly (no download offline).
    with pytest.raises(MetricModelUnavailable, match="Depth Anything V2"):
        DepthAnythingV2Annotator("udpdiff-tests/no-such-depth-model", local_files_only=True)


@pytest.mark.parametrize(
    ("video", "exc"),
    [
        (np.zeros((2, 8, 8, 3), np.float32), TypeError),
        (np.zeros((2, 8, 8), np.uint8), ValueError),
        (np.zeros((2, 8, 8, 4), np.uint8), ValueError),
        (np.zeros((0, 8, 8, 3), np.uint8), ValueError),
        ([[0, 1, 2]], TypeError),
    ],
)
def test_annotators_reject_bad_videos(
    video: object, exc: type[Exception], da_annotator: DepthAnythingV2Annotator, dc_annotator: DepthCrafterAnnotator
) -> None:
    for ann in (da_annotator, dc_annotator):
        with pytest.raises(exc):
            ann(video)
