"""Video depth annotators: DepthCrafter (video diffusion) and Depth Anything V2 (per frame).

Used as the pseudo-ground-truth protocol of paper Table 3 (DepthCrafter is run on generated videos
and both UDPDiff's decoded depth and Depth Anything V2 ViT-L are scored against it with delta1/RMSE)
and for dataset curation (paper section 3: depth labels come from DepthCrafter).

Output convention (``CONVENTIONS.md``): every annotator maps a uint8 ``(T, H, W, 3)`` RGB video to a
float32 ``(T, H, W)`` **normalised disparity** in [0, 1] (1 = nearest, 0 = farthest) at the input
resolution. Both networks predict relative inverse depth, so no inversion is needed.

Normalisation is **per video**: one min/max over the whole clip, ``(d - min) / (max - min)``, which is
exactly what DepthCrafter's ``run.py`` does with its output. A single affine map for the clip keeps
the relative scale between frames (a per-frame min/max would erase any temporal change of depth
range). For Depth Anything V2 the raw per-frame predictions are affine-ambiguous *per frame*, so the
per-video normalisation does not remove its frame-to-frame flicker; that inconsistency is what the
paper's Table 8 ablation measures. A clip with constant prediction maps to all zeros.

DepthCrafter details (checked against ``Tencent/DepthCrafter``: ``depthcrafter/depth_crafter_ppl.py``,
``depthcrafter/unet.py``, ``depthcrafter/utils.py``, ``run.py``), reimplemented on diffusers' SVD
classes:

* Input frames are resized to multiples of 64 (``round(x / 64) * 64``; if the longer side exceeds
  ``max_res`` the frame is first scaled so the longer side is ``max_res``), stretched without padding
  like DepthCrafter's decord reader, and mapped to [-1, 1].
* Conditioning: per-frame CLIP image embeddings (frames resized to 224x224 with SVD's antialiased
  resize, CLIP mean/std), i.e. ``encoder_hidden_states`` of shape ``(1, T, D)``: frame ``t`` of the
  UNet cross-attends to the embedding of frame ``t`` (SVD instead repeats one image embedding), see
  :class:`FramewiseUNetSpatioTemporalConditionModel`.
* The RGB latents (VAE posterior mode of the noise-augmented video, ``noise_aug_strength=0.02``, *not*
  multiplied by the VAE scaling factor, as in SVD) are concatenated to the scaled noisy depth
  latents along the channel axis: ``cat([scale_model_input(z_t), z_rgb], dim=2)``.
* Added time ids ``(fps=7, motion_bucket_id=127, noise_aug_strength)``.
* SVD's EDM-style Euler scheduler (v-prediction, Karras sigmas, continuous timesteps), 5 steps and
  guidance 1.0 by default (DepthCrafter v1.0.1). Guidance > 1 uses zero RGB latents and zero
  embeddings as the unconditional branch.
* Long clips: sliding windows of ``window_size`` frames with ``overlap`` frames shared by consecutive
  windows. The initial noise of window ``k+1`` reuses window ``k``'s noise cyclically, and its first
  ``overlap`` latents start from the already-denoised latents of the previous window plus noise at
  ``sigma_max``. After denoising, the overlap is blended linearly
  (``new * w + old * (1 - w)``, ``w = linspace(0, 1, overlap)``) before appending the rest.
* The VAE decodes a 3-channel image; its channel mean is the disparity, then min/max-normalised over
  the clip.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel
from diffusers.models.unets.unet_spatio_temporal_condition import UNetSpatioTemporalConditionOutput
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing
from diffusers.utils.torch_utils import randn_tensor

from udpdiff.devices import default_device
from udpdiff.evaluation.consistency import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MetricModelUnavailable,
    _load_pretrained,
    _looks_like_local_path,
    _weights_hint,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DepthAnnotator",
    "DepthAnythingV2Annotator",
    "DepthCrafterAnnotator",
    "DepthCrafterPipeline",
    "FramewiseUNetSpatioTemporalConditionModel",
    "MetricModelUnavailable",
    "DEPTH_ANYTHING_V2_PROCESSOR_SETTINGS",
    "SVD_SCHEDULER_CONFIG",
    "depth_anything_v2_processor",
    "depthcrafter_processing_size",
    "normalize_per_video",
    "overlap_blend_weights",
    "sliding_windows",
    "stitch_windows",
]

DEPTH_ANYTHING_V2_ID = "depth-anything/Depth-Anything-V2-Large-hf"
DEPTHCRAFTER_UNET_ID = "tencent/DepthCrafter"
SVD_ID = "stabilityai/stable-video-diffusion-img2vid-xt"

# The preprocessor_config.json of the depth-anything/Depth-Anything-V2-*-hf checkpoints. Note the
# ImageNet *default* mean/std: transformers' DPT processor defaults to 0.5/0.5, which would be wrong.
DEPTH_ANYTHING_V2_PROCESSOR_SETTINGS: dict[str, object] = {
    "do_resize": True,
    "size": {"height": 518, "width": 518},
    "keep_aspect_ratio": True,
    "ensure_multiple_of": 14,
    "resample": 3,  # PIL bicubic
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": list(IMAGENET_MEAN),
    "image_std": list(IMAGENET_STD),
    "do_pad": False,
}

# The scheduler/scheduler_config.json of stabilityai/stable-video-diffusion-img2vid-xt (EDM-style
# Euler, v-prediction), which DepthCrafter samples with: what a pipeline assembled from parts needs
# (the random-weight ones of the tests and the benchmarks' smoke runs).
SVD_SCHEDULER_CONFIG: dict[str, object] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "sigma_max": 700.0,
    "sigma_min": 0.002,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "use_karras_sigmas": True,
}

# DepthCrafter's fixed SVD micro-conditioning (depth_crafter_ppl.py passes these literally, no fps - 1).
_DC_FPS = 7
_DC_MOTION_BUCKET_ID = 127


# --------------------------------------------------------------------------------------------
# Shared plumbing
# --------------------------------------------------------------------------------------------


def _as_video(video: object) -> np.ndarray:
    """Validate a uint8 ``(T, H, W, 3)`` RGB video (numpy, or a torch tensor moved to numpy)."""
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu().numpy()
    if not isinstance(video, np.ndarray):
        raise TypeError(f"expected a numpy uint8 (T, H, W, 3) video, got {type(video).__name__}")
    if video.dtype != np.uint8:
        raise TypeError(f"expected a uint8 (T, H, W, 3) video, got dtype {video.dtype}")
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected a (T, H, W, 3) RGB video, got shape {video.shape}")
    if min(video.shape[:3]) == 0:
        raise ValueError(f"empty video, shape {video.shape}")
    return video


def normalize_per_video(disparity: torch.Tensor | np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """``(d - min) / (max - min)`` with one min/max over the whole clip -> float32 numpy in [0, 1].

    A (near-)constant clip has no defined relative depth and maps to zeros.
    """
    d = torch.as_tensor(disparity).detach().to("cpu", torch.float64)
    lo, hi = d.min(), d.max()
    if not torch.isfinite(lo) or not torch.isfinite(hi):
        raise ValueError("depth prediction contains non-finite values")
    if float(hi - lo) <= eps:
        return np.zeros(tuple(d.shape), dtype=np.float32)
    # float64 for the affine map so that min/max land exactly on 0 and 1 after the float32 cast.
    return ((d - lo) / (hi - lo)).clamp_(0.0, 1.0).to(torch.float32).numpy()


class DepthAnnotator(abc.ABC):
    """Maps an RGB video to normalised disparity.

    ``__call__(video)``: uint8 ``(T, H, W, 3)`` -> float32 ``(T, H, W)`` in [0, 1], 1 = nearest, at the
    input resolution, min/max-normalised once over the whole clip (see the module docstring).
    Subclasses implement :meth:`predict_disparity` (raw relative disparity, any affine scale).
    """

    name: str = "depth"

    @abc.abstractmethod
    def predict_disparity(self, video: np.ndarray) -> torch.Tensor:
        """Raw relative disparity ``(T, H, W)`` (larger = nearer) of a validated uint8 video."""

    def __call__(self, video: np.ndarray) -> np.ndarray:
        video = _as_video(video)
        t, h, w = video.shape[:3]
        with torch.inference_mode():
            disparity = self.predict_disparity(video)
        if tuple(disparity.shape) != (t, h, w):
            raise RuntimeError(f"{self.name}: predicted shape {tuple(disparity.shape)} != {(t, h, w)}")
        return normalize_per_video(disparity)


# --------------------------------------------------------------------------------------------
# Depth Anything V2 (per frame)
# --------------------------------------------------------------------------------------------


def depth_anything_v2_processor() -> object:
    """A DPT image processor with the Depth Anything V2 checkpoints' settings.

    :data:`DEPTH_ANYTHING_V2_PROCESSOR_SETTINGS`: resize so the frame is as close as possible to
    518x518 while keeping the aspect ratio (the side whose scale is nearer to 1 wins), both sides
    rounded to a multiple of 14 (the ViT patch), bicubic; rescale to [0, 1]; ImageNet mean/std.
    """
    from transformers import DPTImageProcessor

    return DPTImageProcessor(**DEPTH_ANYTHING_V2_PROCESSOR_SETTINGS)


def _load_depth_processor(path_or_id: str | os.PathLike, local_files_only: bool) -> object:
    """The checkpoint's own processor if its files are reachable, else the known DA-V2 settings."""
    from transformers import AutoImageProcessor

    key = str(path_or_id)
    local = os.path.expanduser(key)
    if os.path.exists(local) or not _looks_like_local_path(key):
        try:
            return AutoImageProcessor.from_pretrained(
                local if os.path.exists(local) else key, local_files_only=local_files_only
            )
        except Exception as exc:  # noqa: BLE001 - any failure: fall back to the documented settings
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    else:
        reason = "no such folder"
    # Many exported checkpoints ship without preprocessor_config.json; the DA-V2 settings are fixed
    # and public, so rebuilding them is safer than failing the whole evaluation.
    logger.warning(
        "Depth Anything V2: no image processor at %r (%s); using the known DA-V2 settings "
        "(518 px, keep aspect ratio, multiple of 14, bicubic, ImageNet mean/std).",
        key,
        reason,
    )
    return depth_anything_v2_processor()


class DepthAnythingV2Annotator(DepthAnnotator):
    """Depth Anything V2 run independently on every frame (paper Table 3 baseline, ViT-L).

    Args:
        model_path_or_id: HF id or local folder of a transformers depth-estimation checkpoint
            (default ``depth-anything/Depth-Anything-V2-Large-hf``).
        model: an already-built ``DepthAnythingForDepthEstimation`` (e.g. tiny random in tests);
            overrides loading.
        processor: an image processor; default: the checkpoint's ``preprocessor_config.json`` if
            present, otherwise :func:`depth_anything_v2_processor` (the known DA-V2 settings).
        device: where to run; default CUDA if available, else CPU.
        batch_size: frames per forward pass (the result does not depend on it).
        local_files_only: only use a local folder or the HF cache (the machines are offline).

    The relative disparity of each frame (``predicted_depth``) is resized back to the frame size
    with bicubic interpolation (as transformers' ``post_process_depth_estimation``), then the clip is
    min/max-normalised once.

    Raises:
        MetricModelUnavailable: the weights cannot be loaded.
    """

    name = "depth_anything_v2"

    def __init__(
        self,
        model_path_or_id: str | os.PathLike = DEPTH_ANYTHING_V2_ID,
        *,
        model: torch.nn.Module | None = None,
        processor: object | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 8,
        local_files_only: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if model is None:
            from transformers import AutoModelForDepthEstimation

            model = _load_pretrained(
                AutoModelForDepthEstimation,
                "Depth Anything V2 depth annotator",
                model_path_or_id,
                _weights_hint("DepthAnythingV2Annotator", DEPTH_ANYTHING_V2_ID),
                local_files_only=local_files_only,
            )
        if processor is None:
            processor = _load_depth_processor(model_path_or_id, local_files_only)
        self.device = default_device(device)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.batch_size = int(batch_size)
        self._dtype = next(iter(self.model.parameters())).dtype

    def predict_disparity(self, video: np.ndarray) -> torch.Tensor:
        t, h, w = video.shape[:3]
        out = torch.empty((t, h, w), dtype=torch.float32)
        for i in range(0, t, self.batch_size):
            frames = list(video[i : i + self.batch_size])
            # channels_last stated explicitly: tiny frames would make the format guess ambiguous.
            pixel_values = self.processor(images=frames, return_tensors="pt", input_data_format="channels_last")[
                "pixel_values"
            ]
            pixel_values = pixel_values.to(self.device, self._dtype)
            pred = self.model(pixel_values=pixel_values).predicted_depth  # (N, h', w')
            # One batched bicubic resize (transformers' post-processing does the same per image).
            pred = F.interpolate(pred[:, None].float(), size=(h, w), mode="bicubic", align_corners=False)
            out[i : i + len(frames)] = pred[:, 0].cpu()
        return out


# --------------------------------------------------------------------------------------------
# DepthCrafter: windows, UNet, pipeline
# --------------------------------------------------------------------------------------------


def depthcrafter_processing_size(height: int, width: int, max_res: int = 1024) -> tuple[int, int]:
    """DepthCrafter's working resolution for an ``height x width`` video (``utils.read_video_frames``).

    Both sides are rounded to the nearest multiple of 64; if the longer one then exceeds ``max_res``
    the original size is first scaled so the longer side is ``max_res``. Sides are at least 64 (the
    original would produce 0 for tiny inputs). E.g. 720x1280 -> 576x1024.
    """
    h, w = round(height / 64) * 64, round(width / 64) * 64
    if max(h, w) > max_res:
        scale = max_res / max(height, width)
        h, w = round(height * scale / 64) * 64, round(width * scale / 64) * 64
    return max(h, 64), max(w, 64)


def sliding_windows(num_frames: int, window_size: int, overlap: int) -> list[tuple[int, int]]:
    """``[start, end)`` frame windows of DepthCrafter's long-video inference.

    A clip of at most ``window_size`` frames is one window (no overlap). Otherwise windows start
    every ``window_size - overlap`` frames while ``start < num_frames - overlap``, so every later
    window has more than ``overlap`` frames and consecutive windows share exactly ``overlap``.
    """
    if num_frames < 1 or window_size < 1:
        raise ValueError(f"need num_frames >= 1 and window_size >= 1, got {num_frames}, {window_size}")
    if num_frames <= window_size:
        return [(0, num_frames)]
    if not 0 <= overlap < window_size:
        raise ValueError(f"overlap must be in [0, window_size), got {overlap} for window {window_size}")
    stride = window_size - overlap
    windows, start = [], 0
    while start < num_frames - overlap:
        windows.append((start, min(start + window_size, num_frames)))
        start += stride
    return windows


def overlap_blend_weights(overlap: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Weights ``w`` of the *new* window on the ``overlap`` shared frames (old window: ``1 - w``).

    ``linspace(0, 1, overlap)``: the first shared frame comes fully from the previous window, the last
    fully from the new one, so the stitched sequence has no seam.
    """
    return torch.linspace(0.0, 1.0, overlap, device=device)


def _blend_append(stitched: torch.Tensor | None, window: torch.Tensor, overlap: int) -> torch.Tensor:
    """Append ``window`` (frames on dim 1) to ``stitched``, blending the first ``overlap`` frames."""
    if stitched is None:
        return window.clone()
    if overlap == 0:
        return torch.cat([stitched, window], dim=1)
    w = overlap_blend_weights(overlap, window.device).to(window.dtype)
    w = w.view(1, overlap, *([1] * (window.ndim - 2)))
    head = window[:, :overlap] * w + stitched[:, -overlap:] * (1 - w)
    return torch.cat([stitched[:, :-overlap], head, window[:, overlap:]], dim=1)


def stitch_windows(windows: Sequence[torch.Tensor], overlap: int) -> torch.Tensor:
    """Stitch per-window tensors ``(B, t_k, ...)`` (from :func:`sliding_windows`) into ``(B, T, ...)``."""
    stitched = None
    for k, win in enumerate(windows):
        stitched = _blend_append(stitched, win, overlap if k else 0)
    if stitched is None:
        raise ValueError("no windows to stitch")
    return stitched


class FramewiseUNetSpatioTemporalConditionModel(UNetSpatioTemporalConditionModel):
    """SVD's UNet with **per-frame** cross-attention conditioning (DepthCrafter's UNet).

    Same config and weights as :class:`diffusers.UNetSpatioTemporalConditionModel`; only the handling
    of ``encoder_hidden_states`` differs: ``(B, T, D)`` (one CLIP embedding per frame) becomes
    ``(B * T, 1, D)``, so frame ``t`` attends to its own embedding (SVD repeats ``(B, 1, D)`` over
    frames). With identical embeddings for all frames both forwards coincide. The temporal
    transformer layers see the first frame's embedding, as in diffusers' blocks.
    """

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        added_time_ids: torch.Tensor,
        return_dict: bool = True,
    ) -> UNetSpatioTemporalConditionOutput | tuple:
        batch_size, num_frames = sample.shape[:2]
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[:2] != (batch_size, num_frames):
            raise ValueError(
                f"expected per-frame encoder_hidden_states of shape ({batch_size}, {num_frames}, D), "
                f"got {tuple(encoder_hidden_states.shape)}"
            )
        upsample_size = None
        forward_upsample_size = any(s % (2**self.num_upsamplers) != 0 for s in sample.shape[-2:])

        # 1. time + added-time-id embeddings, one per video, repeated over its frames.
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            dtype = torch.float64 if isinstance(timestep, float) else torch.int64
            if sample.device.type == "mps":
                dtype = torch.float32 if isinstance(timestep, float) else torch.int32
            timesteps = torch.tensor([timesteps], dtype=dtype, device=sample.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps.expand(batch_size)
        # time_proj has no weights and returns float32; the embedding MLP runs in the model dtype.
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=self.conv_in.weight.dtype))
        time_embeds = self.add_time_proj(added_time_ids.flatten()).reshape(batch_size, -1)
        emb = emb + self.add_embedding(time_embeds.to(emb.dtype))
        emb = emb.repeat_interleave(num_frames, dim=0)

        # The one difference to SVD: [B, T, D] -> [B * T, 1, D] instead of repeating [B, 1, D].
        encoder_hidden_states = encoder_hidden_states.flatten(0, 1).unsqueeze(1)
        sample = self.conv_in(sample.flatten(0, 1).to(dtype=self.conv_in.weight.dtype))
        image_only_indicator = torch.zeros(batch_size, num_frames, dtype=sample.dtype, device=sample.device)

        def cond(block: torch.nn.Module) -> dict[str, torch.Tensor]:
            if getattr(block, "has_cross_attention", False):
                return {"encoder_hidden_states": encoder_hidden_states}
            return {}

        # 2. down / mid / up, as in diffusers.
        down_block_res_samples: tuple[torch.Tensor, ...] = (sample,)
        for block in self.down_blocks:
            sample, res = block(
                hidden_states=sample, temb=emb, image_only_indicator=image_only_indicator, **cond(block)
            )
            down_block_res_samples += res
        sample = self.mid_block(
            hidden_states=sample,
            temb=emb,
            encoder_hidden_states=encoder_hidden_states,
            image_only_indicator=image_only_indicator,
        )
        for i, block in enumerate(self.up_blocks):
            res = down_block_res_samples[-len(block.resnets) :]
            down_block_res_samples = down_block_res_samples[: -len(block.resnets)]
            if i < len(self.up_blocks) - 1 and forward_upsample_size:
                upsample_size = down_block_res_samples[-1].shape[2:]
            sample = block(
                hidden_states=sample,
                temb=emb,
                res_hidden_states_tuple=res,
                upsample_size=upsample_size,
                image_only_indicator=image_only_indicator,
                **cond(block),
            )

        # 3. post-process and restore [B, T, C, H, W].
        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))
        sample = sample.reshape(batch_size, num_frames, *sample.shape[1:])
        if not return_dict:
            return (sample,)
        return UNetSpatioTemporalConditionOutput(sample=sample)


class DepthCrafterPipeline(StableVideoDiffusionPipeline):
    """DepthCrafter inference on SVD components (``vae``, ``image_encoder``, ``feature_extractor``,
    ``scheduler`` from the SVD checkpoint; ``unet`` from DepthCrafter, a
    :class:`FramewiseUNetSpatioTemporalConditionModel`). See the module docstring for the method.
    """

    @torch.inference_mode()
    def encode_frames_clip(self, video: torch.Tensor, chunk_size: int = 8) -> torch.Tensor:
        """Per-frame CLIP image embeddings ``(T, D)`` of ``video`` ``(T, 3, H, W)`` in [-1, 1]."""
        x = (_resize_with_antialiasing(video.float(), (224, 224)) + 1.0) / 2.0
        # DepthCrafter calls the CLIP processor with resize, crop and rescale all off: only the
        # mean/std normalisation remains, applied here directly on the tensor.
        mean = torch.tensor(self.feature_extractor.image_mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.feature_extractor.image_std, device=x.device).view(1, 3, 1, 1)
        x = ((x - mean) / std).to(self.image_encoder.dtype)
        return torch.cat([self.image_encoder(x[i : i + chunk_size]).image_embeds for i in range(0, len(x), chunk_size)])

    @torch.inference_mode()
    def encode_frames_vae(self, video: torch.Tensor, chunk_size: int = 8) -> torch.Tensor:
        """VAE posterior modes ``(T, C, h, w)`` (unscaled, as SVD's image latents) of ``video`` in [-1, 1]."""
        # SVD's VAE overflows in fp16 (force_upcast); encode in fp32 and hand back the UNet dtype.
        upcast = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        vae_dtype = torch.float32 if upcast else self.vae.dtype
        if upcast:
            self.vae.to(torch.float32)
        try:
            x = video.to(vae_dtype)
            latents = torch.cat(
                [self.vae.encode(x[i : i + chunk_size]).latent_dist.mode() for i in range(0, len(x), chunk_size)]
            )
        finally:
            if upcast:
                self.vae.to(torch.float16)
        return latents.to(video.dtype)

    @torch.inference_mode()
    def __call__(
        self,
        video: torch.Tensor,
        *,
        num_inference_steps: int = 5,
        guidance_scale: float = 1.0,
        window_size: int = 110,
        overlap: int = 25,
        noise_aug_strength: float = 0.02,
        decode_chunk_size: int = 8,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
    ) -> torch.Tensor:
        """Denoise depth latents for ``video`` ``(T, 3, H, W)`` in [0, 1] (H, W multiples of 8).

        Returns the decoded 3-channel depth images ``(T, 3, H, W)`` in [0, 1] (``output_type="pt"``)
        or the stitched latents ``(1, T, C, h, w)`` (``"latent"``). ``latents``: optional initial
        noise of one window, ``(1, window, C, h, w)``, before scaling by ``init_noise_sigma``.
        """
        if video.ndim != 4 or video.shape[1] != 3:
            raise ValueError(f"expected (T, 3, H, W) frames, got {tuple(video.shape)}")
        num_frames, _, height, width = video.shape
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}")
        if output_type not in ("pt", "latent"):
            raise ValueError(f"output_type must be 'pt' or 'latent', got {output_type!r}")
        windows = sliding_windows(num_frames, window_size, overlap)
        if len(windows) == 1:
            window_size, overlap = num_frames, 0
        stride = window_size - overlap
        device, dtype = self._execution_device, self.unet.dtype
        self._guidance_scale = guidance_scale

        video = video.to(device=device, dtype=dtype) * 2.0 - 1.0
        embeddings = self.encode_frames_clip(video, decode_chunk_size).to(dtype)[None]  # (1, T, D)
        # Noise augmentation of the conditioning frames, drawn before the latent noise (same RNG order
        # as DepthCrafter, so a seed reproduces its initial noise).
        noise = randn_tensor(video.shape, generator=generator, device=device, dtype=video.dtype)
        rgb_latents = self.encode_frames_vae(video + noise_aug_strength * noise, decode_chunk_size)[None]

        added_time_ids = self._get_add_time_ids(
            _DC_FPS, _DC_MOTION_BUCKET_ID, noise_aug_strength, dtype, 1, 1, False
        ).to(device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents_init = self.prepare_latents(
            1, window_size, self.unet.config.in_channels, height, width, dtype, device, generator, latents
        )  # (1, window, C, h, w), already scaled by init_noise_sigma

        stitched: torch.Tensor | None = None
        for k, (start, end) in enumerate(windows):
            # Fresh scheduler state (step index) for every window.
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            z = latents_init[:, : end - start].clone()
            if overlap > 0:
                # The next window's noise: this window's last `overlap` noise frames, then its first ones.
                latents_init = torch.cat([latents_init[:, -overlap:], latents_init[:, :stride]], dim=1)
            if k > 0 and overlap > 0:
                # Start the shared frames from the previous window's result, re-noised to sigma_max, so
                # consecutive windows agree on them (DepthCrafter's "noise init from previous frames").
                sigma0 = self.scheduler.sigmas[0].to(device)
                z[:, :overlap] = stitched[:, -overlap:] + z[:, :overlap] / self.scheduler.init_noise_sigma * sigma0
            z = self._denoise_window(
                z, rgb_latents[:, start:end], embeddings[:, start:end], added_time_ids, guidance_scale
            )
            stitched = _blend_append(stitched, z, overlap if k else 0)
            logger.debug("DepthCrafter window %d/%d: frames [%d, %d)", k + 1, len(windows), start, end)

        if output_type == "latent":
            return stitched
        frames = self.decode_latents(stitched.to(self.vae.dtype), num_frames, decode_chunk_size)  # (1,3,T,H,W)
        self.maybe_free_model_hooks()
        # Same as diffusers' VideoProcessor.postprocess_video(output_type="np") before the numpy cast.
        return (frames[0].permute(1, 0, 2, 3) / 2 + 0.5).clamp(0, 1)

    def _denoise_window(
        self,
        z: torch.Tensor,
        rgb_latents: torch.Tensor,
        embeddings: torch.Tensor,
        added_time_ids: torch.Tensor,
        guidance_scale: float,
    ) -> torch.Tensor:
        for t in self.scheduler.timesteps:
            z_in = self.scheduler.scale_model_input(z, t)
            # Depth latents first, RGB latents second along channels (the UNet's 8 input channels).
            pred = self.unet(
                torch.cat([z_in, rgb_latents], dim=2),
                t,
                encoder_hidden_states=embeddings,
                added_time_ids=added_time_ids,
                return_dict=False,
            )[0]
            if guidance_scale > 1.0:
                # DepthCrafter's unconditional branch: zero RGB latents and zero CLIP embeddings.
                uncond = self.unet(
                    torch.cat([z_in, torch.zeros_like(z_in)], dim=2),
                    t,
                    encoder_hidden_states=torch.zeros_like(embeddings),
                    added_time_ids=added_time_ids,
                    return_dict=False,
                )[0]
                pred = uncond + guidance_scale * (pred - uncond)
            z = self.scheduler.step(pred, t, z).prev_sample
        return z


def _depthcrafter_hint() -> str:
    return (
        f"DepthCrafter needs two checkpoints: the DepthCrafter UNet ('{DEPTHCRAFTER_UNET_ID}', config.json + "
        f"diffusion_pytorch_model.safetensors at the folder root) and the SVD components ('{SVD_ID}': "
        f"model_index.json, vae/, image_encoder/, feature_extractor/, scheduler/; its unet/ is not used). "
        f"Download both on a machine with internet access (e.g. `huggingface-cli download {DEPTHCRAFTER_UNET_ID} "
        f"--local-dir /models/DepthCrafter` and `huggingface-cli download {SVD_ID} --local-dir "
        f"/models/stable-video-diffusion-img2vid-xt`), copy them here and pass "
        f"DepthCrafterAnnotator(unet_path_or_id='/models/DepthCrafter', "
        f"svd_path_or_id='/models/stable-video-diffusion-img2vid-xt') (or set those paths in the evaluation "
        f"config). A populated HF cache also works; pass local_files_only=False to allow a hub download."
    )


class DepthCrafterAnnotator(DepthAnnotator):
    """DepthCrafter video depth (paper: pseudo ground truth of Table 3 and the dataset's depth labels).

    Args:
        unet_path_or_id: DepthCrafter UNet checkpoint (HF id or folder; default ``tencent/DepthCrafter``).
        svd_path_or_id: Stable Video Diffusion checkpoint providing the VAE, CLIP image encoder, its
            processor and the scheduler (default ``stabilityai/stable-video-diffusion-img2vid-xt``).
        device: default CUDA if available, else CPU.
        dtype: default float16 on CUDA, float32 otherwise.
        num_inference_steps, guidance_scale, window_size, overlap, max_res: DepthCrafter's inference
            settings (defaults: its v1.0.1 ``run.py``).
        local_files_only: only use local folders or the HF cache (the machines are offline).
        pipeline: an already-built :class:`DepthCrafterPipeline`; overrides loading.
        seed: seed of a dedicated generator, re-seeded for every video so a clip's annotation does
            not depend on what ran before (``run.py`` seeds the global RNG with 42 per video).
        noise_aug_strength, decode_chunk_size: DepthCrafter's pipeline defaults (0.02, 8).

    Frames are resized (bilinear, antialiased) to :func:`depthcrafter_processing_size`, the channel mean
    of the decoded depth images is resized back (bilinear) to the input size and min/max-normalised
    over the clip.

    Raises:
        MetricModelUnavailable: either checkpoint cannot be loaded.
    """

    name = "depthcrafter"

    def __init__(
        self,
        unet_path_or_id: str | os.PathLike = DEPTHCRAFTER_UNET_ID,
        svd_path_or_id: str | os.PathLike = SVD_ID,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        num_inference_steps: int = 5,
        guidance_scale: float = 1.0,
        window_size: int = 110,
        overlap: int = 25,
        max_res: int = 1024,
        local_files_only: bool = True,
        pipeline: DepthCrafterPipeline | None = None,
        seed: int | None = 42,
        noise_aug_strength: float = 0.02,
        decode_chunk_size: int = 8,
    ) -> None:
        # overlap >= window_size is only an error for clips longer than the window (sliding_windows
        # checks it then), as in DepthCrafter, where short clips ignore the overlap.
        if window_size < 1 or overlap < 0:
            raise ValueError(f"need window_size >= 1 and overlap >= 0, got {window_size}, {overlap}")
        if max_res < 64:
            raise ValueError(f"max_res must be >= 64, got {max_res}")
        self.device = default_device(device)
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        if pipeline is None:
            hint = _depthcrafter_hint()
            unet = _load_pretrained(
                FramewiseUNetSpatioTemporalConditionModel,
                "DepthCrafter depth annotator (UNet)",
                unet_path_or_id,
                hint,
                dtype=dtype,
                low_cpu_mem_usage=True,
                local_files_only=local_files_only,
            )
            pipeline = _load_pretrained(
                DepthCrafterPipeline,
                "DepthCrafter depth annotator (SVD components)",
                svd_path_or_id,
                hint,
                unet=unet,
                dtype=dtype,
                local_files_only=local_files_only,
            )
        elif not isinstance(pipeline.unet, FramewiseUNetSpatioTemporalConditionModel):
            raise TypeError("DepthCrafter needs a FramewiseUNetSpatioTemporalConditionModel as pipeline.unet")
        self.pipeline = pipeline.to(self.device)
        # Freshly built modules (tests, custom code) start in training mode; inference must not.
        for component in self.pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()
        self.pipeline.set_progress_bar_config(disable=True)
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.window_size, self.overlap, self.max_res = int(window_size), int(overlap), int(max_res)
        self.seed = seed
        self.noise_aug_strength = float(noise_aug_strength)
        self.decode_chunk_size = int(decode_chunk_size)

    def predict_disparity(self, video: np.ndarray) -> torch.Tensor:
        t, h, w = video.shape[:3]
        ph, pw = depthcrafter_processing_size(h, w, self.max_res)
        frames = torch.from_numpy(np.ascontiguousarray(video)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        if (ph, pw) != (h, w):
            frames = F.interpolate(frames, size=(ph, pw), mode="bilinear", align_corners=False, antialias=True)
            frames = frames.clamp_(0.0, 1.0)
        generator = None
        if self.seed is not None:
            generator = torch.Generator(self.device).manual_seed(self.seed)
        depth_rgb = self.pipeline(
            frames,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            window_size=self.window_size,
            overlap=self.overlap,
            noise_aug_strength=self.noise_aug_strength,
            decode_chunk_size=self.decode_chunk_size,
            generator=generator,
        )  # (T, 3, ph, pw) in [0, 1]
        # run.py: res.sum(-1) / 3, i.e. the mean of the three decoded channels.
        disparity = depth_rgb.float().mean(dim=1, keepdim=True)
        if (ph, pw) != (h, w):
            disparity = F.interpolate(disparity, size=(h, w), mode="bilinear", align_corners=False)
        return disparity[:, 0].cpu()
