"""Temporal-consistency metrics of generated videos (paper section 4: SC and BC).

VBench definitions (checked against Vchitect/VBench ``subject_consistency.py``,
``background_consistency.py`` and ``utils.py``):

* Subject consistency (SC): DINO ViT-B/16 features (CLS token of the last layer), L2-normalised.
* Background consistency (BC): CLIP ViT-B/32 image embeddings, L2-normalised.
* Both combine per-frame features the same way (:func:`vbench_consistency`): for every frame
  ``i >= 1``, ``sim_prev = max(0, cos(f_i, f_{i-1}))`` and ``sim_first = max(0, cos(f_i, f_0))``,
  the frame scores ``(sim_prev + sim_first) / 2``, and the video scores the mean over its
  ``T - 1`` frames. VBench's dataset score is ``sum / count`` over all frames of all videos; for
  equal-length videos that equals the mean of the per-video scores. A 1-frame video scores 1.
* Motion smoothness (MS) lives in :mod:`udpdiff.evaluation.motion` (VBench's AMT-S interpolator and
  a weight-free optical-flow prior).

Preprocessing follows VBench: DINO frames are resized (bilinear, no antialias) so the short side is
224 and are *not* cropped (the DINO ViT interpolates its position embeddings; we use
``interpolate_pos_encoding=True``), scaled to [0, 1] and ImageNet-normalised. CLIP frames are
resized (bicubic) so the short side is 224, center-cropped to 224x224 and CLIP-normalised.

:func:`pixel_frame_consistency` is a cheap weight-free sanity number, not a VBench metric.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor

__all__ = [
    "MetricModelUnavailable",
    "FeatureExtractor",
    "DinoFeatures",
    "ClipImageFeatures",
    "vbench_consistency",
    "vbench_consistency_per_video",
    "subject_consistency",
    "background_consistency",
    "pixel_frame_consistency",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class MetricModelUnavailable(RuntimeError):
    """A metric's network weights could not be loaded (typically: offline, nothing cached).

    The message says which metric, what was tried and how to point the code at local weights.
    """

    def __init__(self, metric_name: str, path_or_id: str | os.PathLike, hint: str) -> None:
        self.metric_name = metric_name
        self.path_or_id = str(path_or_id)
        self.hint = hint
        super().__init__(
            f"{metric_name}: model weights unavailable at {self.path_or_id!r}. {hint}"
        )

    def __reduce__(self):  # picklable with its fields: it crosses process boundaries (Dask workers)
        return type(self), (self.metric_name, self.path_or_id, self.hint)


# --------------------------------------------------------------------------------------------
# VBench frame-consistency maths
# --------------------------------------------------------------------------------------------


def vbench_consistency_per_video(features: torch.Tensor) -> torch.Tensor:
    """Per-video VBench consistency of per-frame features ``(T, D)`` or ``(B, T, D)``.

    Returns a tensor of shape ``()`` or ``(B,)`` on the features' device (float32 or wider).
    See the module docstring for the definition.
    """
    f = torch.as_tensor(features)
    if f.ndim not in (2, 3):
        raise ValueError(f"expected (T, D) or (B, T, D) features, got shape {tuple(f.shape)}")
    if not f.is_floating_point() or f.dtype in (torch.float16, torch.bfloat16):
        f = f.float()
    if f.shape[-2] < 2:
        # VBench scores a video without frame pairs as perfectly consistent.
        return torch.ones(f.shape[:-2], dtype=f.dtype, device=f.device)
    f = F.normalize(f, p=2, dim=-1)
    sim_prev = (f[..., 1:, :] * f[..., :-1, :]).sum(-1).clamp_min(0.0)
    sim_first = (f[..., 1:, :] * f[..., :1, :]).sum(-1).clamp_min(0.0)
    return ((sim_prev + sim_first) / 2).mean(-1)


def vbench_consistency(features: torch.Tensor) -> float:
    """VBench subject/background consistency of per-frame features.

    ``features``: ``(T, D)`` for one video, or ``(B, T, D)`` for equal-length videos (then the
    mean over videos, which equals VBench's frame-pooled ``sum / count``).
    """
    return float(vbench_consistency_per_video(features).mean())


# --------------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------------


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps a batch of RGB frames to one feature vector per frame.

    ``__call__(frames)``: ``frames`` uint8 ``(N, H, W, 3)`` (numpy or torch) -> float tensor
    ``(N, D)``. Implementations batch internally and handle their own preprocessing.
    """

    name: str

    def __call__(self, frames: ArrayLike) -> torch.Tensor: ...


def _frames_to_nchw(frames: ArrayLike, device: torch.device) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float ``(N, 3, H, W)`` in [0, 1] on ``device``."""
    t = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) frames, got shape {tuple(t.shape)}")
    if t.dtype != torch.uint8:
        raise TypeError(f"expected uint8 frames, got {t.dtype}")
    return t.to(device).permute(0, 3, 1, 2).float().div_(255.0)


def _short_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    # torchvision's Resize(int): short side -> size, long side truncated (int()), as in VBench.
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def _normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def _looks_like_local_path(path_or_id: str) -> bool:
    # Hub ids are "name" or "org/name"; anything absolute, explicitly relative, home-based or
    # deeper than one slash can only be a filesystem path.
    return (
        os.path.isabs(path_or_id)
        or path_or_id.startswith((".", "~"))
        or path_or_id.count("/") >= 2
        or "\\" in path_or_id
    )


def _load_pretrained(
    cls: type, metric: str, path_or_id: str | os.PathLike, hint: str, **kwargs: object
) -> torch.nn.Module:
    """``cls.from_pretrained`` with a clear :class:`MetricModelUnavailable` on any failure."""
    key = str(path_or_id)
    local = Path(key).expanduser()
    if local.exists():
        key = str(local)
    elif _looks_like_local_path(key):
        # Fail fast: a missing folder must not turn into a (slow, offline) hub lookup.
        raise MetricModelUnavailable(metric, key, f"No such file or directory. {hint}")
    try:
        return cls.from_pretrained(key, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any loader failure means "no usable weights"
        cause = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else ""
        raise MetricModelUnavailable(metric, key, f"{type(exc).__name__}: {cause}. {hint}") from exc


def _weights_hint(class_name: str, default_id: str) -> str:
    return (
        f"Download '{default_id}' on a machine with internet access (e.g. "
        f"`huggingface-cli download {default_id} --local-dir /models/{default_id.split('/')[-1]}`), "
        f"copy the folder here and pass it as {class_name}(model_path_or_id='/models/...') "
        f"(or set that path in the evaluation config). A populated HF cache also works; pass "
        f"local_files_only=False to allow a hub download where there is internet."
    )


class _TorchExtractor(abc.ABC):
    """Shared plumbing: device handling, chunked batching, no-grad inference."""

    name = "base"

    def __init__(self, model: torch.nn.Module, device: str | torch.device | None, batch_size: int):
        self.device = torch.device(device) if device is not None else _module_device(model)
        self.model = model.to(self.device).eval()
        self.batch_size = int(batch_size)

    @abc.abstractmethod
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Model features of preprocessed frames, (N, D)."""

    @abc.abstractmethod
    def _preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """The metric's own resize/crop/normalisation of (N, 3, H, W) frames in [0, 255]."""

    @torch.inference_mode()
    def __call__(self, frames: ArrayLike) -> torch.Tensor:
        n = int(frames.shape[0])
        out = []
        # Chunking bounds activation memory for 49-frame 720p videos; each chunk is one batched
        # forward pass.
        for i in range(0, n, self.batch_size):
            x = self._preprocess(_frames_to_nchw(frames[i : i + self.batch_size], self.device))
            out.append(self._embed(x).float())
        return torch.cat(out, 0) if out else torch.empty(0, 0, device=self.device)


def _module_device(model: torch.nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


class DinoFeatures(_TorchExtractor):
    """DINO ViT-B/16 CLS features for subject consistency (VBench SC).

    Args:
        model_path_or_id: HF id or local folder of a transformers ``ViTModel`` checkpoint
            (default ``facebook/dino-vitb16``, the HF port of VBench's ``dino_vitb16``).
        model: an already-built ``ViTModel`` (e.g. a tiny random one in tests); overrides loading.
        device: where to run; defaults to the model's device.
        batch_size: frames per forward pass.
        center_crop: VBench does not crop for DINO (short side -> 224, aspect kept). Set True to
            center-crop 224x224 instead (cheaper, but not VBench).
        antialias: antialiased resize; VBench uses ``antialias=False``.
        local_files_only: only use a local folder or the HF cache (default: the training and
            device machines are offline, and a hub lookup there only burns ~25 s of retries).

    Raises:
        MetricModelUnavailable: the weights cannot be loaded.
    """

    name = "dino"

    def __init__(
        self,
        model_path_or_id: str | os.PathLike = "facebook/dino-vitb16",
        *,
        model: torch.nn.Module | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 16,
        size: int = 224,
        center_crop: bool = False,
        antialias: bool = False,
        local_files_only: bool = True,
    ) -> None:
        if model is None:
            from transformers import ViTModel

            model = _load_pretrained(
                ViTModel,
                "subject_consistency (DINO)",
                model_path_or_id,
                _weights_hint("DinoFeatures", "facebook/dino-vitb16"),
                add_pooling_layer=False,
                local_files_only=local_files_only,
            )
        super().__init__(model, device, batch_size)
        self.size, self.center_crop, self.antialias = size, center_crop, antialias

    def _preprocess(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = F.interpolate(
            x, size=_short_side_size(h, w, self.size), mode="bilinear", align_corners=False,
            antialias=self.antialias,
        )
        if self.center_crop:
            x = _center_crop(x, self.size)
        return _normalize(x, IMAGENET_MEAN, IMAGENET_STD)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        # Non-square inputs need position-embedding interpolation, as the original DINO hub
        # model does internally (both bicubic; DINO's scale-factor variant differs from HF's
        # target-size one only by tiny numerical amounts).
        out = self.model(pixel_values=x, interpolate_pos_encoding=True)
        return out.last_hidden_state[:, 0]


class ClipImageFeatures(_TorchExtractor):
    """CLIP ViT-B/32 image embeddings (after the visual projection) for background consistency.

    Args:
        model_path_or_id: HF id or local folder of a ``CLIPVisionModelWithProjection`` checkpoint
            (default ``openai/clip-vit-base-patch32``, VBench's ``ViT-B/32``). A full ``CLIPModel``
            checkpoint folder loads too (transformers keeps the vision tower and projection).
        model: an already-built ``CLIPVisionModelWithProjection``; overrides loading.
        device, batch_size, size, antialias, local_files_only: as for :class:`DinoFeatures`
            (here: bicubic resize, short side -> 224, then 224x224 center crop, CLIP mean/std).

    Raises:
        MetricModelUnavailable: the weights cannot be loaded.
    """

    name = "clip"

    def __init__(
        self,
        model_path_or_id: str | os.PathLike = "openai/clip-vit-base-patch32",
        *,
        model: torch.nn.Module | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        size: int = 224,
        antialias: bool = False,
        local_files_only: bool = True,
    ) -> None:
        if model is None:
            from transformers import CLIPVisionModelWithProjection

            model = _load_pretrained(
                CLIPVisionModelWithProjection,
                "background_consistency (CLIP)",
                model_path_or_id,
                _weights_hint("ClipImageFeatures", "openai/clip-vit-base-patch32"),
                local_files_only=local_files_only,
            )
        super().__init__(model, device, batch_size)
        self.size, self.antialias = size, antialias

    def _preprocess(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = F.interpolate(
            x, size=_short_side_size(h, w, self.size), mode="bicubic", align_corners=False,
            antialias=self.antialias,
        )
        # Bicubic overshoots; the 8-bit images VBench's transform sees cannot leave [0, 1].
        x = _center_crop(x, self.size).clamp_(0.0, 1.0)
        return _normalize(x, CLIP_MEAN, CLIP_STD)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).image_embeds


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return x[..., top : top + size, left : left + size]


# --------------------------------------------------------------------------------------------
# Video-level metrics
# --------------------------------------------------------------------------------------------


def _as_video_batch(video: ArrayLike) -> tuple[ArrayLike, bool]:
    """Return ``(B, T, H, W, 3)`` and whether the input was a single video."""
    if video.ndim == 4:
        return video[None], True
    if video.ndim == 5:
        return video, False
    raise ValueError(f"expected (T, H, W, 3) or (B, T, H, W, 3) video, got {tuple(video.shape)}")


def _feature_consistency(
    video: ArrayLike, extractor: FeatureExtractor, reduction: Literal["mean", "none"]
) -> float | list[float]:
    vids, _ = _as_video_batch(video)
    b, t = int(vids.shape[0]), int(vids.shape[1])
    # All frames of all videos go through the extractor together (it chunks internally).
    feats = extractor(vids.reshape(b * t, *vids.shape[2:]))
    scores = vbench_consistency_per_video(feats.reshape(b, t, -1))
    if reduction == "none":
        return [float(s) for s in scores.cpu()]
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return float(scores.mean())


def subject_consistency(
    video: ArrayLike, extractor: FeatureExtractor, reduction: Literal["mean", "none"] = "mean"
) -> float | list[float]:
    """VBench subject consistency: :func:`vbench_consistency` on DINO features.

    ``video``: uint8 ``(T, H, W, 3)`` or a batch ``(B, T, H, W, 3)``; ``extractor``: normally a
    :class:`DinoFeatures`. Returns the mean over videos, or per-video scores with
    ``reduction="none"``.
    """
    return _feature_consistency(video, extractor, reduction)


def background_consistency(
    video: ArrayLike, extractor: FeatureExtractor, reduction: Literal["mean", "none"] = "mean"
) -> float | list[float]:
    """VBench background consistency: :func:`vbench_consistency` on CLIP image embeddings.

    Same arguments as :func:`subject_consistency`; ``extractor`` is normally a
    :class:`ClipImageFeatures`.
    """
    return _feature_consistency(video, extractor, reduction)


def pixel_frame_consistency(video: ArrayLike) -> float:
    """Weight-free sanity number: mean over consecutive frame pairs of ``1 - mean|diff| / 255``.

    NOT a VBench metric (it rewards static videos and punishes any motion); it exists so that the
    tiny offline pipeline always reports *some* frame-consistency number. ``video``: uint8
    ``(T, H, W, 3)`` or ``(B, T, H, W, 3)`` (numpy or torch, device kept). 1-frame videos score 1.
    """
    vids, _ = _as_video_batch(video)
    v = torch.from_numpy(np.asarray(vids)) if isinstance(vids, np.ndarray) else vids
    if v.shape[1] < 2:
        return 1.0
    # int16 differences avoid uint8 wrap-around and keep memory at 2 bytes per value.
    d = (v[:, 1:].to(torch.int16) - v[:, :-1].to(torch.int16)).abs()
    return float(1.0 - d.float().mean() / 255.0)

