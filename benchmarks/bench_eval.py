"""Evaluation cost: seconds per video and peak GPU memory of every metric of the streaming evaluation.

The paper evaluates 1,024 samples of 49x480x720 per sample set. Each section builds one metric's model
with **random weights at its real size** (timing does not depend on weight values), directly on the
device, in the dtype the evaluation runs it in, and scores synthetic uint8 videos (a smooth random
texture panning at 0-1.3 px/frame) through the project's own metric code:

* ``sc``             — VBench subject consistency: ``DinoFeatures`` (ViT-B/16, ``ViTConfig()`` defaults), fp32.
* ``bc``             — VBench background consistency: ``ClipImageFeatures`` (CLIP ViT-B/32 vision tower), fp32.
* ``ms_amt``         — VBench motion smoothness: ``AMTInterpolator`` (AMT-S from VBench's own code and
  ``AMT-S.yaml``), fp32, 8 frame pairs per forward.
* ``ms_flow``        — the weight-free ``FlowInterpolator`` (OpenCV Farneback on the CPU), for comparison.
* ``fvd``            — ``FeatureAccumulator`` on ``evaluate.fvd_frames`` (16) frames with an I3D-like
  *stand-in* (the real TorchScript I3D is not here; its FLOPs are recorded), and the Fréchet distance
  of 1,024 x 400-d feature sets (CPU, scipy).
* ``suite``          — ``MetricSuite.score_videos`` on one chunk of ``evaluate.batch_size`` (8) videos
  with SC + BC + MS(AMT) + the pixel number, exactly as the evaluate step calls it.
* ``depth_anything`` — the Tab 3 baseline ``DepthAnythingV2Annotator`` (Depth Anything V2 Large: DINOv2
  ViT-L/14 backbone), fp32, with the DA-V2 image processor (CPU resize), one video per call.
* ``sam2``           — the segmentation pseudo-GT ``Sam2VideoAnnotator`` (sam2.1-hiera-large-shaped
  config), fp32: the point-grid step (8x8 prompts) and the propagation of K first-frame entities are
  timed separately (random weights give random grid masks, so the entity count is fixed instead).
* ``depthcrafter``   — the depth pseudo-GT ``DepthCrafterAnnotator`` at real size (SVD-xt UNet with
  per-frame conditioning, SVD's temporal-decoder VAE, CLIP ViT-H/14), fp16, 5 steps, window 110 (a
  49-frame clip is one window).

Finally ``projection`` adds the per-video costs up to hours for 1,024 videos per sample set, with and
without the annotators. The JSON (and a markdown table beside it) is written after every section, so a
run stopped by a time limit keeps what it measured.

    python benchmarks/bench_eval.py --out benchmarks/results/eval-h100.json
    python benchmarks/bench_eval.py --sections sc,bc,suite --out /tmp/x.json
    python benchmarks/bench_eval.py --smoke --out /tmp/smoke.json      # tiny configs, CPU ok, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import logging
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import GIB, n_params, write_outputs  # noqa: E402
from benchmarks.common import machine_info as common_machine_info  # noqa: E402
from udpdiff.evaluation.runtime import measure_calls  # noqa: E402

logger = logging.getLogger("bench_eval")

SECTIONS = ("fvd", "sc", "bc", "ms_amt", "suite", "ms_flow", "depth_anything", "sam2", "depthcrafter")
NUM_VIDEOS = 1024  # per sample set (paper section 4)

FULL = dict(frames=49, height=480, width=720, chunk=8, fvd_frames=16, sam2_entities=(16, 64))
# --smoke: the same code paths on toy models and sizes (AMT-S needs >= 128 px per side)
SMOKE = dict(frames=5, height=128, width=128, chunk=2, fvd_frames=4, sam2_entities=(4,))


# --------------------------------------------------------------------------------------------
# bookkeeping
# --------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.smoke = args.smoke
        self.cuda = torch.cuda.is_available() and not args.cpu
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.size = SMOKE if args.smoke else FULL
        self.t_start = time.perf_counter()
        self.result: dict[str, Any] = {}
        self._videos: dict[tuple, np.ndarray] = {}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / GIB if self.cuda else None

    def allocated_gib(self) -> float | None:
        return torch.cuda.memory_allocated(self.device) / GIB if self.cuda else None

    def measure(self, fn: Callable[[], Any], videos_per_call: int, reps: int, warmup: int = 1) -> dict[str, Any]:
        """Warm-up calls, then ``reps`` timed calls (host work such as CPU preprocessing and copies is part of
        the evaluation's cost, so the clock counts it); median, per video, and the peak memory of the timed
        calls (weights included: the peak is reset after the model is built, not freed)."""
        m = measure_calls(fn, reps, warmup, before_timed=self.reset_peak)
        return {
            "videos_per_call": videos_per_call,
            "reps": reps,
            "times_s": m.times,
            "median_s": m.median,
            "s_per_video": m.median / videos_per_call,
            "peak_gib": self.peak_gib(),
        }

    def videos(self, n: int, frames: int | None = None, seed: int = 0) -> np.ndarray:
        s = self.size
        key = (n, frames or s["frames"], seed)
        if key not in self._videos:
            self._videos[key] = synthetic_videos(n, key[1], s["height"], s["width"], seed)
        return self._videos[key]

    def save(self) -> None:
        if self.args.out is None:
            return
        self.result["wall_s"] = self.elapsed()
        write_outputs(self.result, self.args.out, render_markdown)


def synthetic_videos(n: int, t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 ``(n, t, h, w, 3)``: a smooth random texture (cubic upsampling of noise) panning at a random
    constant velocity of up to ~1.3 px/frame, so optical flow and interpolation see real motion."""
    import cv2

    rng = np.random.default_rng(seed)
    margin = max(8, int(1.3 * t) + 2)
    out = np.empty((n, t, h, w, 3), dtype=np.uint8)
    for i in range(n):
        small = rng.integers(0, 256, size=((h + margin) // 8 + 2, (w + margin) // 8 + 2, 3), dtype=np.uint8)
        base = cv2.resize(small, (w + margin, h + margin), interpolation=cv2.INTER_CUBIC)
        v = rng.uniform(-1.0, 1.0, size=2) * (margin - 1) / max(t - 1, 1)
        oy0, ox0 = (margin - 1) / 2 - v * (t - 1) / 2
        for k in range(t):
            oy, ox = int(round(oy0 + v[0] * k)), int(round(ox0 + v[1] * k))
            out[i, k] = base[oy : oy + h, ox : ox + w]
    return out


@contextlib.contextmanager
def seeded_on(device: torch.device, seed: int = 0):
    """Build modules directly on ``device`` (fast random init even for 1.5B parameters)."""
    torch.manual_seed(seed)
    with torch.device(device):
        yield


PACKAGES = ("torch", "transformers", "diffusers", "numpy", "scipy", "opencv-python-headless", "vbench")


def machine_info(bench: Bench) -> dict[str, Any]:
    info = common_machine_info(bench.device, PACKAGES)
    info["torch_threads"] = torch.get_num_threads()
    info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    info["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    return info


# --------------------------------------------------------------------------------------------
# model configs (real sizes; tiny ones for --smoke)
# --------------------------------------------------------------------------------------------


def dino_model(smoke: bool) -> torch.nn.Module:
    from transformers import ViTConfig, ViTModel

    cfg = (
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        if smoke
        else ViTConfig()
    )  # defaults = ViT-B/16 at 224 (facebook/dino-vitb16's shape)
    return ViTModel(cfg, add_pooling_layer=False)


def clip_model(smoke: bool) -> torch.nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = (
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            patch_size=32,
            projection_dim=16,
        )
        if smoke
        else CLIPVisionConfig(patch_size=32, projection_dim=512)
    )  # openai/clip-vit-base-patch32
    return CLIPVisionModelWithProjection(cfg)


def amt_model() -> torch.nn.Module:
    from udpdiff.evaluation.motion import amt_s_params, import_vbench_amt

    return import_vbench_amt("networks.AMT-S").Model(**amt_s_params())  # VBench's AMT-S, real size always


def depth_anything_model(smoke: bool) -> torch.nn.Module:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    if smoke:
        backbone = Dinov2Config(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            mlp_ratio=1,
            image_size=70,
            patch_size=14,
            out_features=["stage1", "stage2", "stage3", "stage4"],
            reshape_hidden_states=False,
        )
        cfg = DepthAnythingConfig(
            backbone_config=backbone,
            reassemble_hidden_size=32,
            neck_hidden_sizes=[8, 16, 32, 32],
            fusion_hidden_size=16,
            head_hidden_size=8,
            patch_size=14,
        )
    else:  # depth-anything/Depth-Anything-V2-Large-hf/config.json
        backbone = Dinov2Config(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            mlp_ratio=4,
            image_size=518,
            patch_size=14,
            layerscale_value=1.0,
            out_indices=[5, 12, 18, 24],
            reshape_hidden_states=False,
        )
        cfg = DepthAnythingConfig(
            backbone_config=backbone,
            reassemble_hidden_size=1024,
            neck_hidden_sizes=[256, 512, 1024, 1024],
            reassemble_factors=[4, 2, 1, 0.5],
            fusion_hidden_size=256,
            head_hidden_size=32,
            patch_size=14,
            depth_estimation_type="relative",
        )
    return DepthAnythingForDepthEstimation(cfg)


SAM2_LARGE_BACKBONE = dict(  # facebook/sam2.1-hiera-large (Hiera-L)
    hidden_size=144,
    num_attention_heads=2,
    blocks_per_stage=[2, 6, 36, 4],
    embed_dim_per_stage=[144, 288, 576, 1152],
    num_attention_heads_per_stage=[2, 4, 8, 16],
    global_attention_blocks=[23, 33, 43],
    window_positional_embedding_background_size=[7, 7],
    window_size_per_stage=[8, 4, 16, 8],
)


def sam2_config(smoke: bool):
    from transformers import (
        Sam2HieraDetConfig,
        Sam2VideoConfig,
        Sam2VideoMaskDecoderConfig,
        Sam2VideoPromptEncoderConfig,
        Sam2VisionConfig,
    )

    if not smoke:
        vision = Sam2VisionConfig(
            backbone_config=Sam2HieraDetConfig(**SAM2_LARGE_BACKBONE), backbone_channel_list=[1152, 576, 288, 144]
        )
        return Sam2VideoConfig(vision_config=vision), "sam2.1-hiera-large-shaped (Hiera-L backbone, default heads)"
    s = 128  # the tiny config of tests/test_annotators_segmentation.py
    backbone = Sam2HieraDetConfig(
        hidden_size=8,
        image_size=[s, s],
        blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[8, 16, 32, 64],
        num_attention_heads_per_stage=[1, 1, 1, 1],
        window_size_per_stage=[4, 4, 4, 4],
        global_attention_blocks=[3],
    )
    vision = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=[64, 32, 16, 8],
        backbone_feature_sizes=[[s // 4, s // 4], [s // 8, s // 8], [s // 16, s // 16]],
        fpn_hidden_size=128,
    )
    cfg = Sam2VideoConfig(
        vision_config=vision,
        prompt_encoder_config=Sam2VideoPromptEncoderConfig(hidden_size=128, image_size=s, mask_input_channels=8),
        mask_decoder_config=Sam2VideoMaskDecoderConfig(
            hidden_size=128, mlp_dim=32, num_hidden_layers=1, num_attention_heads=2, iou_head_hidden_dim=16
        ),
        image_size=s,
        num_maskmem=3,
        memory_attention_hidden_size=128,
        memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=32,
        memory_attention_rope_feat_sizes=[s // 16, s // 16],
        memory_encoder_hidden_size=128,
        memory_encoder_output_channels=64,
        mask_downsampler_embed_dim=128,
        memory_fuser_embed_dim=128,
        memory_fuser_intermediate_dim=32,
        max_object_pointers_in_encoder=4,
    )
    return cfg, "tiny (smoke)"


def depthcrafter_pipeline(smoke: bool, frames: int, device: torch.device | str = "cpu"):
    """The DepthCrafter pipeline; its networks are built on ``device`` (the scheduler's tables stay on the CPU)."""
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPImageProcessor

    from udpdiff.annotators.depth import SVD_SCHEDULER_CONFIG, DepthCrafterPipeline

    with seeded_on(torch.device(device)):
        unet, vae, clip = _depthcrafter_networks(smoke, frames)
    return DepthCrafterPipeline(
        vae=vae,
        image_encoder=clip,
        scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG),
        feature_extractor=CLIPImageProcessor(),
        unet=unet,
    )


def _depthcrafter_networks(smoke: bool, frames: int):
    from diffusers import AutoencoderKLTemporalDecoder
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from udpdiff.annotators.depth import FramewiseUNetSpatioTemporalConditionModel

    if smoke:
        unet = FramewiseUNetSpatioTemporalConditionModel(
            sample_size=8,
            in_channels=8,
            out_channels=4,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            block_out_channels=(32, 64),
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24,
            layers_per_block=1,
            cross_attention_dim=32,
            transformer_layers_per_block=1,
            num_attention_heads=(2, 4),
            num_frames=frames,
        )
        vae = AutoencoderKLTemporalDecoder(
            block_out_channels=(32, 32, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 4,
            layers_per_block=1,
            latent_channels=4,
        )
        clip = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=224,
            patch_size=32,
            projection_dim=32,
        )
    else:
        # stabilityai/stable-video-diffusion-img2vid-xt: the diffusers defaults are SVD's UNet; the VAE's are
        # not (one 64-channel block), so vae/config.json's values; image_encoder = OpenCLIP ViT-H/14 vision
        # tower with a 1024-d projection (image_encoder/config.json).
        unet = FramewiseUNetSpatioTemporalConditionModel()
        vae = AutoencoderKLTemporalDecoder(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=768,
            scaling_factor=0.18215,
            force_upcast=True,
        )
        clip = CLIPVisionConfig(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=16,
            patch_size=14,
            image_size=224,
            projection_dim=1024,
            hidden_act="gelu",
        )
    return unet, vae, CLIPVisionModelWithProjection(clip)


class I3DStandIn(torch.nn.Module):
    """A module with the StyleGAN-V I3D call signature and I3D-like work: rescale to [-1, 1], trilinear
    resize to 224x224 inside the model, a 7x7x7/2 stem, 3x3x3 convolutions over a shrinking pyramid,
    400 logits. NOT I3D (no Inception mixing); its FLOPs are counted and reported beside the timing."""

    def __init__(self, width: int = 1) -> None:
        super().__init__()
        c = [64 // width, 192 // width, 256 // width, 480 // width, 832 // width, 1024 // width]
        conv = torch.nn.Conv3d
        self.net = torch.nn.Sequential(
            conv(3, c[0], 7, stride=2, padding=3),
            torch.nn.ReLU(),
            torch.nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
            conv(c[0], c[0], 1),
            torch.nn.ReLU(),
            conv(c[0], c[1], 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
            conv(c[1], c[2], 1),
            torch.nn.ReLU(),
            conv(c[2], c[3], (1, 3, 3), padding=(0, 1, 1)),
            torch.nn.ReLU(),
            torch.nn.MaxPool3d(3, 2, 1),
            conv(c[3], c[3], 1),
            torch.nn.ReLU(),
            conv(c[3], c[4], 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool3d(2, 2, ceil_mode=True),
            conv(c[4], c[5], 1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool3d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(c[5], 400),
        )

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False
    ) -> torch.Tensor:
        if rescale:
            x = x / 127.5 - 1.0
        if resize:
            x = torch.nn.functional.interpolate(x, size=(x.shape[2], 224, 224), mode="trilinear", align_corners=False)
        return self.net(x)


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------


def _extractor_section(bench: Bench, key: str) -> None:
    from udpdiff.evaluation.consistency import (
        ClipImageFeatures,
        DinoFeatures,
        background_consistency,
        subject_consistency,
    )

    a, s = bench.args, bench.size
    with seeded_on(bench.device):
        model = dino_model(bench.smoke) if key == "sc" else clip_model(bench.smoke)
    if key == "sc":
        ext, metric, desc = DinoFeatures(model=model, device=bench.device), subject_consistency, "DinoFeatures ViT-B/16"
    else:
        ext, metric, desc = (
            ClipImageFeatures(model=model, device=bench.device),
            background_consistency,
            "ClipImageFeatures CLIP ViT-B/32",
        )
    videos = bench.videos(s["chunk"])
    entry = {
        "model": desc,
        "params_m": n_params(model) / 1e6,
        "dtype": "float32",
        "batch_size": ext.batch_size,
        "weights_gib": bench.allocated_gib(),
    }
    entry.update(bench.measure(lambda: metric(videos, ext, reduction="none"), s["chunk"], a.reps))
    if bench.cuda and not a.no_autocast:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            entry["autocast_bf16"] = bench.measure(lambda: metric(videos, ext, reduction="none"), s["chunk"], a.reps)
    bench.result.setdefault("sections", {})[key] = entry


def run_sc(bench: Bench) -> None:
    _extractor_section(bench, "sc")


def run_bc(bench: Bench) -> None:
    _extractor_section(bench, "bc")


def run_ms_amt(bench: Bench) -> None:
    from udpdiff.evaluation.motion import AMTInterpolator, motion_smoothness

    a, s = bench.args, bench.size
    with seeded_on(bench.device):
        model = amt_model()
    interp = AMTInterpolator(model=model, device=bench.device)
    videos = bench.videos(s["chunk"])
    pairs = (s["frames"] - 1) // 2
    entry = {
        "model": "AMTInterpolator (VBench AMT-S, AMT-S.yaml)",
        "params_m": n_params(model) / 1e6,
        "dtype": "float32",
        "batch_size_pairs": interp.batch_size,
        "pairs_per_video": pairs,
        "weights_gib": bench.allocated_gib(),
    }
    entry.update(bench.measure(lambda: motion_smoothness(videos, interp, reduction="none"), s["chunk"], a.reps))
    if bench.cuda and not a.no_autocast:
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                entry["autocast_bf16"] = bench.measure(
                    lambda: motion_smoothness(videos, interp, reduction="none"), s["chunk"], a.reps
                )
        except Exception as exc:  # noqa: BLE001 - a note, not a failure of the fp32 figure
            entry["autocast_bf16"] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:300]}
    bench.result.setdefault("sections", {})["ms_amt"] = entry


def run_ms_flow(bench: Bench) -> None:
    from udpdiff.evaluation.motion import FlowInterpolator, motion_smoothness

    a = bench.args
    interp = FlowInterpolator()
    videos = bench.videos(1)
    entry = {
        "model": "FlowInterpolator (OpenCV Farneback, CPU)",
        "dtype": "float32 (CPU)",
        "opencv_threads": __import__("cv2").getNumThreads(),
    }
    entry.update(bench.measure(lambda: motion_smoothness(videos, interp, reduction="none"), 1, max(1, a.reps - 1)))
    entry["peak_gib"] = None  # CPU only
    bench.result.setdefault("sections", {})["ms_flow"] = entry


def run_fvd(bench: Bench) -> None:
    from udpdiff.evaluation.fvd import FeatureAccumulator, I3DFeatures, feature_statistics, frechet_distance

    a, s = bench.args, bench.size
    with seeded_on(bench.device):
        model = I3DStandIn(width=8 if bench.smoke else 1)
    i3d = I3DFeatures(model=model, device=bench.device)
    videos = bench.videos(s["chunk"])
    probe = torch.zeros((1, 3, s["fvd_frames"], s["height"], s["width"]), device=bench.device)
    with torch.inference_mode():
        flops = count_flops(lambda: model(probe, rescale=True, resize=True, return_features=True))

    def add() -> None:
        acc = FeatureAccumulator(i3d, s["fvd_frames"])
        acc.add(videos)

    features = {
        "model": f"I3D stand-in ({n_params(model) / 1e6:.1f} M params, "
        f"{flops / 1e9:.0f} GFLOP per {s['fvd_frames']}-frame video)",
        "flops_per_video": flops,
        "fvd_frames": s["fvd_frames"],
        "dtype": "float32",
        "weights_gib": bench.allocated_gib(),
        "note": "not the TorchScript I3D (absent here); the real I3D (Inception-v1 3D, ~12 M params) does "
        "about 108 G multiply-adds per 64x224x224 clip, i.e. ~27 G (~54 GFLOP as counted here, 2 per "
        "multiply-add) per 16 frames",
    }
    features.update(bench.measure(add, s["chunk"], a.reps))
    n, dim = (64, 32) if bench.smoke else (NUM_VIDEOS, 400)  # I3D: 400 logits per video
    rng = np.random.default_rng(0)
    real, fake = rng.standard_normal((n, dim)), rng.standard_normal((n, dim)) + 0.1

    def frechet() -> float:
        return frechet_distance(*feature_statistics(real), *feature_statistics(fake))

    fd = {
        "what": f"feature_statistics x2 + frechet_distance of {n} x {dim} features (CPU, scipy sqrtm)",
        "videos": n,
        "dim": dim,
        "value": frechet(),
    }
    m = measure_calls(frechet, a.reps, warmup=0)
    fd.update({"times_s": m.times, "median_s": m.median})
    bench.result.setdefault("sections", {})["fvd"] = {"features": features, "frechet": fd}


def run_suite(bench: Bench) -> None:
    from udpdiff.evaluation.consistency import ClipImageFeatures, DinoFeatures
    from udpdiff.evaluation.motion import AMTInterpolator
    from udpdiff.evaluation.runner import MetricSuite
    from udpdiff.evaluation.tables import MS_AMT

    a, s = bench.args, bench.size
    with seeded_on(bench.device):
        dino, clip, amt = dino_model(bench.smoke), clip_model(bench.smoke), amt_model()
    suite = MetricSuite(
        dino=DinoFeatures(model=dino, device=bench.device),
        clip=ClipImageFeatures(model=clip, device=bench.device),
        motion=AMTInterpolator(model=amt, device=bench.device),
        motion_key=MS_AMT,
    )
    videos = bench.videos(s["chunk"])
    entry = {
        "model": "MetricSuite.score_videos: pixel + MS(AMT-S) + SC(DINO) + BC(CLIP)",
        "dtype": "float32",
        "weights_gib": bench.allocated_gib(),
    }
    entry.update(bench.measure(lambda: suite.score_videos(videos), s["chunk"], a.reps))
    scores = suite.score_videos(videos)
    entry["keys"] = sorted(scores)
    bench.result.setdefault("sections", {})["suite"] = entry


def run_depth_anything(bench: Bench) -> None:
    from udpdiff.annotators.depth import DepthAnythingV2Annotator, depth_anything_v2_processor

    a = bench.args
    with seeded_on(bench.device):
        model = depth_anything_model(bench.smoke)
    ann = DepthAnythingV2Annotator(model=model, processor=depth_anything_v2_processor(), device=bench.device)
    video = bench.videos(1)[0]
    entry = {
        "model": "DepthAnythingV2Annotator, Depth-Anything-V2-Large shape (DINOv2 ViT-L/14)"
        if not bench.smoke
        else "DepthAnythingV2Annotator (tiny)",
        "params_m": n_params(model) / 1e6,
        "dtype": "float32",
        "batch_size": ann.batch_size,
        "weights_gib": bench.allocated_gib(),
    }
    entry.update(bench.measure(lambda: ann(video), 1, a.reps))
    # where the time goes: the processor (PIL bicubic resize on the CPU) alone
    frames = list(video[: ann.batch_size])
    t = measure_calls(lambda: ann.processor(images=frames, return_tensors="pt", input_data_format="channels_last"),
                      1, warmup=0).median
    entry["processor_s_per_video"] = t * video.shape[0] / len(frames)
    bench.result.setdefault("sections", {})["depth_anything"] = entry


def run_sam2(bench: Bench) -> None:
    from transformers import Sam2VideoModel

    from udpdiff.annotators.segmentation import Sam2VideoAnnotator

    a, s = bench.args, bench.size
    cfg, cfg_name = sam2_config(bench.smoke)
    with seeded_on(bench.device):
        model = Sam2VideoModel(cfg)
    ann = Sam2VideoAnnotator(model=model.eval(), device=bench.device)
    video = bench.videos(1)[0]
    h, w = video.shape[1:3]
    entry = {
        "model": "Sam2VideoAnnotator",
        "config": cfg_name,
        "params_m": n_params(model) / 1e6,
        "dtype": "float32",
        "image_size": ann.image_size,
        "points_per_side": ann.points_per_side,
        "weights_gib": bench.allocated_gib(),
    }
    grid = bench.measure(lambda: ann.first_frame_entities(video[0]), 1, a.reps)
    grid["entities_found"] = int(ann.first_frame_entities(video[0]).max())
    entry["grid"] = grid
    for k in s["sam2_entities"]:
        side = int(round(k**0.5))
        ys, xs = np.mgrid[0:h, 0:w]
        ids = ((ys * side // h) * side + xs * side // w + 1).astype(np.int32)  # side x side blocks
        entry[f"propagate_{side * side}"] = bench.measure(
            lambda ids=ids: ann(video, first_frame_ids=ids), 1, max(1, a.reps - 1)
        )
    if bench.cuda and not a.no_autocast:
        # not what the evaluation runs (build_annotator passes no dtype: fp32); the annotator's dtype= option
        k, side = s["sam2_entities"][0], int(round(s["sam2_entities"][0] ** 0.5))
        ys, xs = np.mgrid[0:h, 0:w]
        ids = ((ys * side // h) * side + xs * side // w + 1).astype(np.int32)
        ann16 = Sam2VideoAnnotator(model=model, device=bench.device, dtype=torch.bfloat16)
        entry[f"bf16_propagate_{side * side}"] = bench.measure(
            lambda: ann16(video, first_frame_ids=ids), 1, max(1, a.reps - 1)
        )
    k0 = s["sam2_entities"][0]
    entry["per_video_s"] = grid["s_per_video"] + entry[f"propagate_{k0}"]["s_per_video"]
    entry["per_video_note"] = f"grid step + propagation of {k0} entities (random weights find random entities)"
    entry["peak_gib"] = max(x["peak_gib"] or 0 for key, x in entry.items() if isinstance(x, dict)) or None
    bench.result.setdefault("sections", {})["sam2"] = entry


def run_depthcrafter(bench: Bench) -> None:
    from udpdiff.annotators.depth import DepthCrafterAnnotator, depthcrafter_processing_size

    a, s = bench.args, bench.size
    dtype = torch.float16 if bench.cuda else torch.float32  # DepthCrafterAnnotator's default dtype
    t0 = time.perf_counter()
    pipe = depthcrafter_pipeline(bench.smoke, s["frames"], bench.device).to(bench.device, dtype)
    bench.sync()
    build_s = time.perf_counter() - t0
    ann = DepthCrafterAnnotator(pipeline=pipe, device=bench.device, dtype=dtype)
    video = bench.videos(1)[0]
    params = {k: n_params(m) / 1e6 for k, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    entry = {
        "model": "DepthCrafterAnnotator: SVD-xt UNet (per-frame cond.) + SVD VAE + CLIP ViT-H/14"
        if not bench.smoke
        else "DepthCrafterAnnotator (tiny)",
        "params_m": params,
        "dtype": str(dtype)[6:],
        "steps": ann.num_inference_steps,
        "window": ann.window_size,
        "processing_size": depthcrafter_processing_size(s["height"], s["width"], ann.max_res),
        "build_s": build_s,
        "weights_gib": bench.allocated_gib(),
    }
    entry.update(bench.measure(lambda: ann(video), 1, a.dc_reps))
    bench.result.setdefault("sections", {})["depthcrafter"] = entry


RUNNERS: dict[str, Callable[[Bench], None]] = {
    "fvd": run_fvd,
    "sc": run_sc,
    "bc": run_bc,
    "ms_amt": run_ms_amt,
    "suite": run_suite,
    "ms_flow": run_ms_flow,
    "depth_anything": run_depth_anything,
    "sam2": run_sam2,
    "depthcrafter": run_depthcrafter,
}


# --------------------------------------------------------------------------------------------
# projection and table
# --------------------------------------------------------------------------------------------


def per_video_s(sec: dict[str, Any], key: str) -> float | None:
    e = sec.get(key)
    if not isinstance(e, dict) or "status" in e:
        return None
    if key == "fvd":
        return e["features"]["s_per_video"]
    if key == "sam2":
        return e["per_video_s"]
    return e.get("s_per_video")


def projection(result: dict[str, Any]) -> dict[str, Any]:
    """Hours for ``NUM_VIDEOS`` videos per sample set from the measured per-video costs (metric models
    only: sample loading, ground-truth scoring and pseudo-GT metric maths are not included)."""
    sec = result.get("sections", {})
    core = per_video_s(sec, "suite")
    if core is None:  # fall back to the parts
        parts = [per_video_s(sec, k) for k in ("sc", "bc", "ms_amt")]
        core = sum(parts) if None not in parts else None
    fvd_v = per_video_s(sec, "fvd") or 0.0
    frechet = (
        (sec.get("fvd") or {}).get("frechet", {}).get("median_s", 0.0) if isinstance(sec.get("fvd"), dict) else 0.0
    )
    if core is None:
        return {"status": "not computed", "reason": "needs the suite (or sc, bc, ms_amt) section"}
    dc, da, sam = (per_video_s(sec, k) for k in ("depthcrafter", "depth_anything", "sam2"))
    hours = lambda s_per_video: (s_per_video * NUM_VIDEOS + frechet) / 3600  # noqa: E731
    base = core + fvd_v
    out: dict[str, Any] = {
        "videos_per_set": NUM_VIDEOS,
        "per_video_s": {
            "score_videos (SC+BC+MS-AMT)": core,
            "fvd features": fvd_v,
            "depthcrafter": dc,
            "depth_anything_v2": da,
            "sam2": sam,
        },
        "frechet_s_per_set": frechet,
        "rgb_set_h": hours(base),
        "per_set_without_annotators_h": hours(base),
    }
    if dc is not None and da is not None:
        out["depth_set_with_annotators_h"] = hours(base + dc + da)
    if sam is not None:
        out["segmentation_set_with_annotators_h"] = hours(base + sam)
    out["real_clips_h"] = core * NUM_VIDEOS / 3600  # score_videos on the real clips (no FVD, no annotators)
    sets = [out["rgb_set_h"], out.get("depth_set_with_annotators_h"), out.get("segmentation_set_with_annotators_h")]
    if None not in sets:
        out["three_sets_plus_real_h"] = sum(sets) + out["real_clips_h"]
        out["three_sets_plus_real_without_annotators_h"] = 3 * out["per_set_without_annotators_h"] + out["real_clips_h"]
    return out


def _f(x: Any, fmt: str = "{:.3f}") -> str:
    return "—" if x is None else fmt.format(x)


ROWS = [
    ("sc", "SC: DINO ViT-B/16"),
    ("bc", "BC: CLIP ViT-B/32"),
    ("ms_amt", "MS: AMT-S"),
    ("ms_flow", "MS†: OpenCV Farneback (CPU)"),
    ("suite", "score_videos chunk (SC+BC+MS-AMT+pixel)"),
    ("fvd", "FVD features (I3D stand-in, 16 frames)"),
    ("depth_anything", "Depth Anything V2 Large"),
    ("depthcrafter", "DepthCrafter (5 steps, 1 window)"),
    ("sam2", "SAM2 video (grid + propagate)"),
]


def render_markdown(r: dict[str, Any]) -> str:
    m, st = r.get("machine", {}), r.get("settings", {})
    gpu = (m.get("gpu") or {}).get("name", m.get("device", "?"))
    size = st.get("size", {})
    lines = [f"# Evaluation cost per video — {gpu}", ""]
    if st.get("smoke"):
        lines += ["**SMOKE RUN** (tiny models and videos): the numbers mean nothing.", ""]
    lines += [
        f"{r.get('date', '')}; torch {m.get('versions', {}).get('torch')}; videos "
        f"{size.get('frames')}x{size.get('height')}x{size.get('width')}; random weights at the real sizes; "
        "median of the timed calls after one warm-up; wall clock with the device synchronised.",
        "",
        "| metric | dtype | s/video | peak GiB | bf16 autocast s/video | device |",
        "|---|---|---:|---:|---:|---|",
    ]
    sec = r.get("sections", {})
    for key, label in ROWS:
        e = sec.get(key)
        if e is None:
            continue
        if "status" in e:
            lines.append(f"| {label} | {e['status']}: {e.get('reason', '')[:120]} | | | | |")
            continue
        dev = "CPU" if key == "ms_flow" else gpu
        if key == "fvd":
            x = e["features"]
            lines.append(
                f"| {label} | {x['dtype']} | {_f(x['s_per_video'])} | {_f(x['peak_gib'], '{:.2f}')} | | {dev} |"
            )
            fd = e["frechet"]
            lines.append(
                f"| Fréchet distance, {fd['videos']} x {fd.get('dim', 400)}-d (per set) | float64 | "
                f"{_f(fd['median_s'])} s/set "
                f"| | | CPU |"
            )
            continue
        if key == "sam2":
            lines.append(
                f"| {label}: {e['config']} | {e['dtype']} | {_f(e['per_video_s'])} | {_f(e['peak_gib'], '{:.2f}')} "
                f"| | {dev} |"
            )
            g = e["grid"]
            lines.append(
                f"| ↳ SAM2 point grid {e['points_per_side']}x{e['points_per_side']} | | {_f(g['s_per_video'])} | "
                f"{_f(g['peak_gib'], '{:.2f}')} | | |"
            )
            for k, x in e.items():
                if k.startswith("propagate_"):
                    bf = e.get(f"bf16_{k}", {}).get("s_per_video")
                    bf_text = "" if bf is None else _f(bf) + " (annotator dtype=bf16)"
                    lines.append(
                        f"| ↳ SAM2 propagation, {k.split('_')[1]} entities | | {_f(x['s_per_video'])} | "
                        f"{_f(x['peak_gib'], '{:.2f}')} | {bf_text} | |"
                    )
            continue
        ac = e.get("autocast_bf16") or {}
        lines.append(
            f"| {label} | {e.get('dtype', '')} | {_f(e.get('s_per_video'))} | {_f(e.get('peak_gib'), '{:.2f}')} | "
            f"{_f(ac.get('s_per_video'))} | {dev} |"
        )
    p = r.get("projection")
    if p and "status" not in p:
        lines += (
            [
                "",
                f"## Projection: {p['videos_per_set']} videos per sample set",
                "",
                "| what | hours |",
                "|---|---:|",
            ]
            + [
                f"| {what} | {_f(p.get(key), '{:.2f}')} |"
                for what, key in (
                    ("one sample set without annotators (score_videos + FVD features)", "per_set_without_annotators_h"),
                    ("depth set with annotators (+ DepthCrafter + DA-V2)", "depth_set_with_annotators_h"),
                    ("segmentation set with annotators (+ SAM2)", "segmentation_set_with_annotators_h"),
                    ("real clips (score_videos)", "real_clips_h"),
                    ("rgb + depth + segmentation sets + real clips, with annotators", "three_sets_plus_real_h"),
                    ("the same without annotators", "three_sets_plus_real_without_annotators_h"),
                )
            ]
            + [
                "",
                "Metric models only (one GPU): sample loading, ground-truth and pseudo-GT metric maths"
                " are not included.",
            ]
        )
    if r.get("notes"):
        lines += [""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def merge(paths: list[Path]) -> dict[str, Any]:
    """Sections of several runs in one result: a later run's keys win inside each section (so a section
    re-measured in part keeps the earlier run's other keys); each run's date, argv and wall time are kept."""
    merged: dict[str, Any] = {"benchmark": "eval", "runs": [], "sections": {}, "notes": []}
    for path in paths:
        r = json.loads(path.read_text())
        for key in ("date", "machine", "settings"):
            merged.setdefault(key, r.get(key))
        merged["runs"].append(
            {
                "file": path.name,
                "date": r.get("date"),
                "argv": r.get("settings", {}).get("argv"),
                "wall_s": r.get("wall_s"),
                "sections": sorted(r.get("sections", {})),
            }
        )
        for name, entry in r.get("sections", {}).items():
            if entry.get("status") == "skipped" and name in merged["sections"]:
                continue
            if "status" in entry or "status" in merged["sections"].get(name, {}):
                merged["sections"][name] = entry
            else:
                merged["sections"].setdefault(name, {}).update(entry)
        merged["notes"] += [n for n in r.get("notes", []) if n not in merged["notes"]]
    merged["projection"] = projection(merged)
    return merged


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="JSON path (a .md table is written beside it)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    p.add_argument("--smoke", action="store_true", help="tiny models and videos, few reps (CPU ok, seconds)")
    p.add_argument("--cpu", action="store_true", help="use the CPU even if CUDA is available")
    p.add_argument("--reps", type=int, default=3, help="timed calls per measurement (median)")
    p.add_argument("--dc-reps", type=int, default=2, help="timed DepthCrafter videos")
    p.add_argument("--no-autocast", action="store_true", help="skip the bf16-autocast notes of SC/BC/MS")
    p.add_argument("--sam2-entities", default=None, help="comma list of first-frame entity counts (squares)")
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="combine result JSONs into --out (later files win per section key); no runs",
    )
    p.add_argument("--budget-s", type=float, default=None, help="skip sections that start after this many seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.reps = 1
        args.dc_reps = 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    sections = [x for x in args.sections.split(",") if x]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    sections = [x for x in SECTIONS if x in sections]
    if args.merge:
        if args.out is None:
            raise SystemExit("--merge needs --out")
        result = merge(args.merge)
        write_outputs(result, args.out, render_markdown)
        print(render_markdown(result))
        return 0
    bench = Bench(args)
    if args.sam2_entities:
        bench.size = dict(bench.size, sam2_entities=tuple(int(x) for x in args.sam2_entities.split(",")))
    for noisy in ("diffusers", "transformers", "udpdiff.annotators"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    bench.result.update(
        {
            "benchmark": "eval",
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine_info(bench),
            "settings": {
                "sections": sections,
                "smoke": args.smoke,
                "size": bench.size,
                "reps": args.reps,
                "dc_reps": args.dc_reps,
                "argv": sys.argv[1:] if argv is None else argv,
                "budget_s": args.budget_s,
            },
            "notes": [
                "RANDOM WEIGHTS at the real model sizes (timing does not depend on weight values); models built "
                "directly on the device; dtypes as the evaluation runs them (DINO/CLIP/AMT/DA-V2/SAM2 fp32, "
                "DepthCrafter fp16); synthetic panning-texture videos; eager PyTorch",
                "s/video = median wall-clock seconds of one call (device synchronised) / videos per call; peak GiB = "
                "torch max_memory_allocated during the timed calls, weights included",
            ],
        }
    )
    logger.info("device %s, sections %s", bench.device, sections)
    for name in sections:
        if args.budget_s is not None and bench.elapsed() > args.budget_s:
            bench.result.setdefault("sections", {})[name] = {
                "status": "skipped",
                "reason": f"--budget-s {args.budget_s:.0f} s spent",
            }
            continue
        logger.info("== %s (t=%.0f s)", name, bench.elapsed())
        t0 = time.perf_counter()
        try:
            RUNNERS[name](bench)
            bench.result["sections"][name]["section_wall_s"] = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - one failed section must not lose the others
            logger.error("%s failed: %s", name, traceback.format_exc())
            bench.result.setdefault("sections", {})[name] = {
                "status": "failed",
                "reason": f"{type(exc).__name__}: {exc}"[:500],
            }
        bench.free()
        bench.result["projection"] = projection(bench.result)
        bench.save()
    print(render_markdown(bench.result))
    if args.out:
        print(f"wrote {args.out} and {args.out.with_suffix('.md')} ({bench.elapsed():.0f} s)")
    failed = [k for k, v in bench.result.get("sections", {}).items() if v.get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
