"""Streaming evaluation of sample sets: every metric of paper section 4 on chunks of videos.

:class:`MetricSuite` holds the configured metric models (DINO, CLIP, AMT or the flow prior, I3D,
and the dense annotators of the pseudo-ground-truth protocol). A model whose weights are missing
becomes one note naming the metric and the parameter to set; every other metric still runs.

:meth:`MetricSuite.score_videos` scores one chunk ``(B, T, H, W, 3)`` of generated (or real) videos
and returns per-video values; callers stream a sample set through it chunk by chunk, so 1,024
samples of 49x480x720 never need to be in memory at once. I3D features (400 floats per video) are
the only thing kept across chunks, for FVD.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from udpdiff.annotators import build_annotator
from udpdiff.config import EvaluateParams
from udpdiff.devices import default_device
from udpdiff.evaluation.consistency import (
    ClipImageFeatures,
    DinoFeatures,
    MetricModelUnavailable,
    background_consistency,
    pixel_frame_consistency,
    subject_consistency,
)
from udpdiff.evaluation.depth import depth_scores
from udpdiff.evaluation.fvd import I3DFeatures
from udpdiff.evaluation.motion import AMTInterpolator, FlowInterpolator, motion_smoothness
from udpdiff.evaluation.segmentation import hungarian_miou
from udpdiff.evaluation.tables import MS_AMT, MS_FLOW

logger = logging.getLogger(__name__)

# metric key -> what produced it; the report prints these so nobody compares the flow prior with VBench
MOTION_PRIORS = {MS_AMT: "VBench AMT-S frame interpolation", MS_FLOW: "OpenCV Farneback optical-flow interpolation "
                 "(offline prior; not comparable to the paper's MS)"}


@dataclass
class MetricSuite:
    """The metric models of one evaluation; ``None`` = not configured or weights missing (see ``notes``)."""

    dino: DinoFeatures | None = None
    clip: ClipImageFeatures | None = None
    motion: Callable | None = None
    motion_key: str = MS_FLOW
    i3d: I3DFeatures | None = None
    depth_annotator: Callable[[np.ndarray], np.ndarray] | None = None
    depth_baseline: Callable[[np.ndarray], np.ndarray] | None = None
    segmentation_annotator: Callable[[np.ndarray], np.ndarray] | None = None
    depth_per_frame: bool = False  # least-squares alignment per frame instead of per video
    # (z_near, z_far) the data's normalised disparity stands for, when exact: adds depth-space scores
    depth_range: tuple[float, float] | None = None
    names: dict[str, str] = field(default_factory=dict)  # which model produced which metric
    notes: list[str] = field(default_factory=list)

    def score_videos(self, videos: np.ndarray) -> dict[str, list[float]]:
        """Generation-quality scores of a chunk of uint8 videos ``(B, T, H, W, 3)``, one value per video."""
        out: dict[str, list[float]] = {
            "pixel_frame_consistency": [pixel_frame_consistency(v) for v in videos]}
        if self.motion is not None:
            out[self.motion_key] = list(motion_smoothness(videos, self.motion, reduction="none"))
        if self.dino is not None:
            out["subject_consistency"] = list(subject_consistency(videos, self.dino, reduction="none"))
        if self.clip is not None:
            out["background_consistency"] = list(background_consistency(videos, self.clip, reduction="none"))
        return out

    def score_pseudo_gt(self, task: str, videos: np.ndarray, dense: np.ndarray) -> dict[str, list[float]]:
        """The paper's protocol for generated videos, which have no ground truth (Tab 3): the annotator
        runs on the generated RGB and the decoded dense prediction is scored against its output."""
        out: dict[str, list[float]] = {}
        for video, pred in zip(videos, dense, strict=True):
            if task == "depth" and self.depth_annotator is not None:
                pseudo = self.depth_annotator(video)
                for k, v in depth_scores(pred, pseudo, self.depth_per_frame).items():
                    out.setdefault(f"pseudo_{k}", []).append(v)
                if self.depth_baseline is not None:
                    for k, v in depth_scores(self.depth_baseline(video), pseudo, self.depth_per_frame).items():
                        out.setdefault(f"baseline_{k}", []).append(v)
            elif task == "segmentation" and self.segmentation_annotator is not None:
                pseudo = self.segmentation_annotator(video)
                out.setdefault("pseudo_miou", []).append(float(hungarian_miou(pred, pseudo)["miou"]))
        return out


def _try(notes: list[str], build: Callable[[], object]) -> object | None:
    try:
        return build()
    except MetricModelUnavailable as err:
        logger.warning("%s", err)
        notes.append(str(err))
        return None


def build_metric_suite(e: EvaluateParams, where: str = "evaluate") -> MetricSuite:
    """Load every configured metric model; unconfigured or unloadable ones become notes.

    ``where`` is the params.yaml prefix of ``e`` (``profiles.<profile>.evaluate``), so that a note
    says exactly which key to set."""
    device = default_device(e.device)
    s = MetricSuite(depth_per_frame=e.depth_alignment == "frame")
    unset = [k for k in ("dino", "clip", "i3d") if not getattr(e, k)]
    for key in unset:
        s.notes.append(f"{key}: not configured, its metric is not computed (set {where}.{key} to a local path or id)")
    for key, cls, label, metric in (("dino", DinoFeatures, "DINO ViT-B/16", "subject_consistency"),
                                    ("clip", ClipImageFeatures, "CLIP ViT-B/32", "background_consistency"),
                                    ("i3d", I3DFeatures, "I3D Kinetics-400", "fvd")):
        ref = getattr(e, key)
        if ref:
            setattr(s, key, _try(s.notes, lambda cls=cls, ref=ref: cls(ref, device=device)))
            if getattr(s, key) is not None:  # only what actually produced a number is named
                s.names[metric] = f"{label} ({ref})"
    if e.amt:
        s.motion = _try(s.notes, lambda: AMTInterpolator(e.amt, device=device))
        if s.motion is not None:
            s.motion_key = MS_AMT
    if s.motion is None:
        s.notes.append(f"motion smoothness from the {MOTION_PRIORS[MS_FLOW]} (set {where}.amt to VBench's amt-s.pth "
                       "for VBench's MS)")
        s.motion, s.motion_key = FlowInterpolator(), MS_FLOW
    s.names[s.motion_key] = MOTION_PRIORS[s.motion_key]
    for key in ("depth_annotator", "depth_baseline", "segmentation_annotator"):
        ref = getattr(e, key)
        if ref is None:
            s.notes.append(f"{key}: not configured, pseudo-ground-truth scores of generated videos are not computed "
                           f"(set {where}.{key})")
            continue
        setattr(s, key, _try(s.notes, lambda ref=ref: build_annotator(ref, device)))
        if getattr(s, key) is not None:
            s.names[key] = f"{ref.type} ({ref.path})"
    return s
