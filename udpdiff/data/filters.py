"""Clip filters of Panda-Dense curation (paper §3.1: "a series of data filtering such as video quality
assessment and motion score"), each a small :class:`ClipFilter` that returns every score it
measured, so the manifest keeps them and thresholds can be re-tuned without re-decoding.

=================  ==========================================================================
filter             what it measures, and when it drops a clip (reason code)
=================  ==========================================================================
``source``         header only, before decoding: timestamp length (``duration``) and how much
                   the source would be enlarged to fill (height, width) (``resolution``)
``scene_cut``      a shot change inside the clip (``scene_cut``): PySceneDetect's
                   ``ContentDetector`` (``detector: content``) or an HSV-histogram distance
                   (``detector: histogram``)
``motion``         mean Farneback optical-flow magnitude between consecutive output frames, as a
                   fraction of the frame diagonal per frame: near-static (``static``) or
                   extreme (``extreme_motion``)
``quality``        technical quality in [0, 1] from a :class:`QualityScorer` (``low_quality``);
                   ``classical`` is a weight-free no-reference score (below)
=================  ==========================================================================

The classical quality score (:class:`ClassicalQualityScorer`) is a weighted geometric mean of four
classical no-reference measures, each mapped to [0, 1] (1 = good), on a few source-resolution
frames of the clip:

* **sharpness**: variance of the Laplacian (Pech-Pacheco et al. 2000) at a fixed analysis short
  side, ``v / (v + sharpness_ref)``;
* **blockiness**: mean absolute luma step across the 8x8 block grid of the source divided by the
  mean step elsewhere (Wang, Bovik & Evans 2000 measure the same boundary excess); 1 for
  unblocked video, scored ``1 - (ratio - 1) / (blockiness_max_ratio - 1)``;
* **noise**: Immerkær's (1996) fast noise sigma (the Laplacian-difference mask ``[[1,-2,1],
  [-2,4,-2],[1,-2,1]]``), on the 90 % least-gradient pixels (Tai & Yang 2008) so edges and texture
  count less, scored ``exp(-sigma / noise_ref)``;
* **exposure**: fraction of clipped pixels (luma <= 4 or >= 251), scored
  ``1 - fraction / clipped_max_fraction``.

The geometric mean lets one very bad component (a black clip, a frozen blur) sink the score. It is
a documented fallback, not a learned VQA model: it catches blurred, blocky, noisy and badly exposed
clips but knows nothing of aesthetics or content. The default thresholds are first guesses to be
calibrated on a hand-labelled sample of real Panda-70M clips. A learned scorer (DOVER, FAST-VQA)
plugs in as another :class:`QualityScorer` subclass registered in :data:`QUALITY_SCORER_CLASSES`.

:func:`curate_clips` runs a :class:`~udpdiff.data.cut.ClipCutter` and the filters over a list of
clips, writes the kept ones and counts every drop by reason; no single bad clip stops it. With a
``resume_key`` it is resumable: each decided clip leaves a small state file, and a rerun with the
same key (same geometry, cut and filter parameters) and an unchanged source file takes the decision
from it instead of decoding the clip again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
from tqdm.auto import tqdm

from udpdiff.data.curate import motion_score_from_frames
from udpdiff.data.curation_params import (
    FilterParams,
    MotionFilterParams,
    QualityFilterParams,
    QualityWeights,
    SceneCutParams,
    SourceFilterParams,
)
from udpdiff.data.cut import ClipCutter, ClipPlan, ClipRejected, ClipSpec, CutClip
from udpdiff.io.atomic import write_text

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FilterResult:
    """What one filter found: its scores (kept for every clip) and, if it drops the clip, why."""

    name: str
    scores: dict[str, float]
    reason: str | None = None  # "<code>: <detail>" when the clip is dropped

    @property
    def passed(self) -> bool:
        return self.reason is None

    @property
    def code(self) -> str | None:
        return None if self.reason is None else self.reason.split(":", 1)[0]


class ClipFilter(ABC):
    """One curation filter. ``needs_frames = False`` filters see only the :class:`ClipPlan` (header
    facts) and run before the clip is decoded."""

    name: ClassVar[str]
    needs_frames: ClassVar[bool] = True

    @abstractmethod
    def evaluate(self, clip: CutClip | ClipPlan) -> FilterResult:
        """Scores of ``clip`` and whether it is kept."""


def _fmt(x: float) -> str:
    return f"{x:.4g}"


# --------------------------------------------------------------------------------------------
# source: duration and resolution
# --------------------------------------------------------------------------------------------


class SourceFilter(ClipFilter):
    """Timestamp length bounds and the largest allowed enlargement of the source."""

    name = "source"
    needs_frames = False

    def __init__(self, min_duration_s: float = 0.0, max_duration_s: float | None = None,
                 max_upscale: float = 1.0) -> None:
        self.min_duration_s, self.max_duration_s, self.max_upscale = min_duration_s, max_duration_s, max_upscale

    @classmethod
    def from_params(cls, p: SourceFilterParams) -> SourceFilter:
        return cls(p.min_duration_s, p.max_duration_s, p.max_upscale)

    def evaluate(self, clip: CutClip | ClipPlan) -> FilterResult:
        plan = clip.plan if isinstance(clip, CutClip) else clip
        spec, src = plan.spec, plan.source
        scores = {"duration_s": spec.duration_s, "source_fps": src.fps, "source_height": float(src.height),
                  "source_width": float(src.width), "resize_scale": plan.scale}
        reason = None
        if spec.duration_s < self.min_duration_s:
            reason = f"duration: {spec.duration_s:.3f} s < min_duration_s {self.min_duration_s:g}"
        elif self.max_duration_s is not None and spec.duration_s > self.max_duration_s:
            reason = f"duration: {spec.duration_s:.3f} s > max_duration_s {self.max_duration_s:g}"
        elif plan.scale > self.max_upscale + 1e-6:
            reason = (f"resolution: {src.width}x{src.height} source would be enlarged {plan.scale:.2f}x "
                      f"> max_upscale {self.max_upscale:g}")
        return FilterResult(self.name, scores, reason)


# --------------------------------------------------------------------------------------------
# quality
# --------------------------------------------------------------------------------------------


class QualityScorer(ABC):
    """Technical quality of a clip in [0, 1] (higher is better), from ``uint8 (T, H, W, 3)`` RGB
    frames at source resolution. The hook for a learned VQA model (e.g. DOVER or FAST-VQA): subclass,
    implement :meth:`score` (and :meth:`details` for sub-scores), register the class in
    :data:`QUALITY_SCORER_CLASSES` and its name in ``curation_params.QUALITY_SCORERS``."""

    name: ClassVar[str]

    @abstractmethod
    def score(self, frames: np.ndarray) -> float:
        """One score in [0, 1]."""

    def details(self, frames: np.ndarray) -> dict[str, float]:
        """The score as ``{"quality": ...}`` plus any sub-scores (``quality_*``)."""
        return {"quality": float(self.score(frames))}


_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)


def _gray(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) if frame.ndim == 3 else frame


def _shrink(gray: np.ndarray, short_side: int) -> np.ndarray:
    h, w = gray.shape
    s = short_side / min(h, w)
    if s >= 1:
        return gray
    return cv2.resize(gray, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 3x3 Laplacian of a luma image (higher = sharper)."""
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def blockiness_ratio(gray: np.ndarray, block: int = 8) -> float:
    """Mean |luma step| across ``block`` x ``block`` grid lines over the mean step elsewhere
    (horizontal and vertical averaged): about 1 without block artefacts, larger with them."""
    g = gray.astype(np.float32)
    ratios = []
    for axis in (1, 0):
        d = np.abs(np.diff(g, axis=axis))
        n = d.shape[axis]
        if n < 2 * block:
            continue
        on_grid = (np.arange(n) + 1) % block == 0
        boundary = d.take(np.flatnonzero(on_grid), axis=axis).mean()
        interior = d.take(np.flatnonzero(~on_grid), axis=axis).mean()
        ratios.append((boundary + 0.5) / (interior + 0.5))  # +0.5 grey level: flat frames give 1
    return float(np.mean(ratios)) if ratios else 1.0


def noise_sigma(gray: np.ndarray, keep_fraction: float = 0.9) -> float:
    """Immerkær's noise standard deviation (grey levels) on the ``keep_fraction`` least-gradient
    pixels (Sobel magnitude), so edges and texture are not taken for noise."""
    g = gray.astype(np.float32)
    if min(g.shape) < 3:
        return 0.0
    lap = np.abs(cv2.filter2D(g, cv2.CV_32F, _IMMERKAER))[1:-1, 1:-1]
    grad = np.hypot(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1))[1:-1, 1:-1]
    mask = grad <= np.quantile(grad, keep_fraction)
    if not mask.any():
        return 0.0
    return float(math.sqrt(math.pi / 2) * lap[mask].mean() / 6.0)


def clipped_fraction(gray: np.ndarray, low: int = 4, high: int = 251) -> float:
    """Fraction of pixels crushed to black or blown to white."""
    return float(((gray <= low) | (gray >= high)).mean())


class ClassicalQualityScorer(QualityScorer):
    """Weight-free technical quality: sharpness, blockiness, noise and exposure (module docstring)."""

    name = "classical"

    def __init__(self, sharpness_ref: float = 100.0, blockiness_max_ratio: float = 2.0, noise_ref: float = 8.0,
                 clipped_max_fraction: float = 0.5, analysis_short_side: int = 480,
                 weights: QualityWeights | None = None) -> None:
        self.sharpness_ref, self.blockiness_max_ratio = sharpness_ref, blockiness_max_ratio
        self.noise_ref, self.clipped_max_fraction = noise_ref, clipped_max_fraction
        self.analysis_short_side = analysis_short_side
        w = weights or QualityWeights()
        self.weights = {"sharpness": w.sharpness, "blockiness": w.blockiness, "noise": w.noise,
                        "exposure": w.exposure}

    @classmethod
    def from_params(cls, p: QualityFilterParams) -> ClassicalQualityScorer:
        return cls(p.sharpness_ref, p.blockiness_max_ratio, p.noise_ref, p.clipped_max_fraction,
                   p.analysis_short_side, p.weights)

    def details(self, frames: np.ndarray) -> dict[str, float]:
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.size == 0 or frames.dtype != np.uint8:
            raise ValueError(f"quality scorer needs uint8 (T, H, W, 3) frames, got {frames.dtype} {frames.shape}")
        raw = {"laplacian_var": [], "block_ratio": [], "noise_sigma": [], "clipped": []}
        for frame in frames:
            g = _gray(frame)
            small = _shrink(g, self.analysis_short_side)
            raw["laplacian_var"].append(laplacian_variance(small))
            raw["block_ratio"].append(blockiness_ratio(g))  # the codec's grid is the source's
            raw["noise_sigma"].append(noise_sigma(small))
            raw["clipped"].append(clipped_fraction(small))
        m = {k: float(np.mean(v)) for k, v in raw.items()}
        parts = {
            "sharpness": m["laplacian_var"] / (m["laplacian_var"] + self.sharpness_ref),
            "blockiness": float(np.clip(1 - (m["block_ratio"] - 1) / (self.blockiness_max_ratio - 1), 0, 1)),
            "noise": math.exp(-m["noise_sigma"] / self.noise_ref),
            "exposure": float(np.clip(1 - m["clipped"] / self.clipped_max_fraction, 0, 1)),
        }
        total = sum(self.weights.values())
        log_mean = sum(w * math.log(max(parts[k], 1e-3)) for k, w in self.weights.items()) / total
        out = {"quality": math.exp(log_mean)}
        out.update({f"quality_{k}": v for k, v in parts.items()})
        out.update({f"quality_{k}": v for k, v in m.items()})
        return out

    def score(self, frames: np.ndarray) -> float:
        return self.details(frames)["quality"]


#: scorer name (``filters.quality.scorer``) -> class with ``from_params(QualityFilterParams)``
QUALITY_SCORER_CLASSES: dict[str, type[QualityScorer]] = {"classical": ClassicalQualityScorer}


def build_quality_scorer(p: QualityFilterParams) -> QualityScorer:
    try:
        cls = QUALITY_SCORER_CLASSES[p.scorer]
    except KeyError:
        raise ValueError(f"filters.quality.scorer: unknown scorer {p.scorer!r}; "
                         f"known: {sorted(QUALITY_SCORER_CLASSES)}") from None
    return cls.from_params(p)  # type: ignore[attr-defined]


class QualityFilter(ClipFilter):
    """Drops clips whose :class:`QualityScorer` score is below ``min_score``."""

    name = "quality"

    def __init__(self, scorer: QualityScorer, min_score: float) -> None:
        self.scorer, self.min_score = scorer, min_score

    @classmethod
    def from_params(cls, p: QualityFilterParams) -> QualityFilter:
        return cls(build_quality_scorer(p), p.min_score)

    def evaluate(self, clip: CutClip | ClipPlan) -> FilterResult:
        assert isinstance(clip, CutClip)
        scores = self.scorer.details(clip.quality_frames)
        q = scores["quality"]
        reason = None
        if q < self.min_score:
            parts = ", ".join(f"{k[8:]} {_fmt(scores[k])}" for k in
                              ("quality_sharpness", "quality_blockiness", "quality_noise", "quality_exposure")
                              if k in scores)
            reason = f"low_quality: {self.scorer.name} score {_fmt(q)} < min_score {self.min_score:g}" + (
                f" ({parts})" if parts else "")
        return FilterResult(self.name, scores, reason)


# --------------------------------------------------------------------------------------------
# motion
# --------------------------------------------------------------------------------------------


def motion_score(frames: np.ndarray, pairs: int = 8, short_side: int = 128) -> tuple[float, float]:
    """Mean Farneback flow magnitude over ``pairs`` consecutive-frame pairs spread over the clip, at
    ``short_side`` (area resize). Returns ``(fraction of the frame diagonal per frame, pixels per
    frame at the analysis size)``."""
    t, h, w = frames.shape[:3]
    if t < 2:
        raise ValueError(f"motion needs at least 2 frames, got {t}")
    starts = np.unique(np.linspace(0, t - 2, min(pairs, t - 1)).round().astype(int))
    idx = [int(i) for s in starts for i in (s, s + 1)]
    s = min(1.0, short_side / min(h, w))
    size = (max(2, round(w * s)), max(2, round(h * s)))
    small = np.stack([cv2.resize(frames[i], size, interpolation=cv2.INTER_AREA) if s < 1 else frames[i]
                      for i in idx])
    px = motion_score_from_frames(small)
    return px / math.hypot(*size), px


class MotionFilter(ClipFilter):
    """Drops near-static and extreme-motion clips (flow as a fraction of the diagonal per frame)."""

    name = "motion"

    def __init__(self, min_motion: float = 1e-3, max_motion: float = 0.06, pairs: int = 8, short_side: int = 128):
        if max_motion <= min_motion:
            raise ValueError(f"max_motion ({max_motion}) must be greater than min_motion ({min_motion})")
        self.min_motion, self.max_motion, self.pairs, self.short_side = min_motion, max_motion, pairs, short_side

    @classmethod
    def from_params(cls, p: MotionFilterParams) -> MotionFilter:
        return cls(p.min_motion, p.max_motion, p.pairs, p.short_side)

    def evaluate(self, clip: CutClip | ClipPlan) -> FilterResult:
        assert isinstance(clip, CutClip)
        motion, px = motion_score(clip.frames, self.pairs, self.short_side)
        reason = None
        if motion < self.min_motion:
            reason = f"static: motion {_fmt(motion)} < min_motion {self.min_motion:g} (diagonals per frame)"
        elif motion > self.max_motion:
            reason = f"extreme_motion: motion {_fmt(motion)} > max_motion {self.max_motion:g} (diagonals per frame)"
        return FilterResult(self.name, {"motion": motion, "motion_px": px}, reason)


# --------------------------------------------------------------------------------------------
# scene cuts
# --------------------------------------------------------------------------------------------


class CutDetector(ABC):
    """Per-transition scores of a clip (``T - 1`` values: frame i-1 -> i) and the threshold above
    which a transition is a cut."""

    name: ClassVar[str]
    threshold: float

    @abstractmethod
    def transition_scores(self, frames: np.ndarray, fps: float) -> np.ndarray: ...


def _to_width(frame: np.ndarray, width: int) -> np.ndarray:
    h, w = frame.shape[:2]
    if w <= width:
        return frame
    return cv2.resize(frame, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)


class ContentCutDetector(CutDetector):
    """PySceneDetect's ``ContentDetector`` (mean HSV change between frames, 0-255 scale; default
    threshold 27), fed decoded frames directly, with no minimum scene length (any cut counts)."""

    name = "content"
    DEFAULT_THRESHOLD = 27.0

    def __init__(self, threshold: float | None = None, analysis_width: int = 256) -> None:
        try:
            import scenedetect  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "filters.scene_cut.detector 'content' needs PySceneDetect: pip install scenedetect-headless "
                "(the opencv-python-headless build), or set detector: histogram"
            ) from exc
        self.threshold = self.DEFAULT_THRESHOLD if threshold is None else threshold
        self.analysis_width = analysis_width

    def transition_scores(self, frames: np.ndarray, fps: float) -> np.ndarray:
        from scenedetect import FrameTimecode, StatsManager
        from scenedetect.detectors import ContentDetector

        det = ContentDetector(threshold=self.threshold, min_scene_len=0)
        stats = StatsManager()
        det.stats_manager = stats
        key = ContentDetector.FRAME_SCORE_KEY
        out = []
        for i, frame in enumerate(frames):
            tc = FrameTimecode(i, float(fps))
            det.process_frame(tc, cv2.cvtColor(_to_width(frame, self.analysis_width), cv2.COLOR_RGB2BGR))
            if i:
                out.append(float(stats.get_metrics(tc, [key])[0] or 0.0))
        return np.asarray(out, np.float64)


class HistogramCutDetector(CutDetector):
    """Bhattacharyya distance between consecutive frames' 2D hue-saturation histograms (30x32 bins)
    plus a 32-bin value histogram, averaged; no package beyond OpenCV."""

    name = "histogram"
    DEFAULT_THRESHOLD = 0.5

    def __init__(self, threshold: float | None = None, analysis_width: int = 256) -> None:
        self.threshold = self.DEFAULT_THRESHOLD if threshold is None else threshold
        self.analysis_width = analysis_width

    @staticmethod
    def _hists(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hsv = cv2.cvtColor(frame, cv2.COLOR_RGB2HSV)
        hs = cv2.calcHist([hsv], [0, 1], None, [30, 32], [0, 180, 0, 256])
        v = cv2.calcHist([hsv], [2], None, [32], [0, 256])
        return cv2.normalize(hs, hs).astype(np.float32), cv2.normalize(v, v).astype(np.float32)

    def transition_scores(self, frames: np.ndarray, fps: float) -> np.ndarray:
        hists = [self._hists(_to_width(f, self.analysis_width)) for f in frames]
        out = [
            0.5 * (cv2.compareHist(a[0], b[0], cv2.HISTCMP_BHATTACHARYYA)
                   + cv2.compareHist(a[1], b[1], cv2.HISTCMP_BHATTACHARYYA))
            for a, b in zip(hists[:-1], hists[1:], strict=True)
        ]
        return np.asarray(out, np.float64)


class SceneCutFilter(ClipFilter):
    """Drops clips with a shot change inside (a transition scoring above the detector's threshold)."""

    name = "scene_cut"

    def __init__(self, detector: CutDetector) -> None:
        self.detector = detector

    @classmethod
    def from_params(cls, p: SceneCutParams) -> SceneCutFilter:
        det_cls = {"content": ContentCutDetector, "histogram": HistogramCutDetector}[p.detector]
        return cls(det_cls(p.threshold, p.analysis_width))

    def cuts(self, frames: np.ndarray, fps: float) -> tuple[np.ndarray, np.ndarray]:
        """``(transition scores, indices of the frames that start a new shot)``."""
        scores = self.detector.transition_scores(frames, fps)
        return scores, np.flatnonzero(scores >= self.detector.threshold) + 1

    def evaluate(self, clip: CutClip | ClipPlan) -> FilterResult:
        assert isinstance(clip, CutClip)
        scores, cuts = self.cuts(clip.frames, clip.fps)
        top = float(scores.max()) if scores.size else 0.0
        reason = None
        if cuts.size:
            where = ", ".join(f"frame {i} ({_fmt(scores[i - 1])})" for i in cuts[:5])
            reason = (f"scene_cut: {cuts.size} cut(s) at {where}, {self.detector.name} threshold "
                      f"{self.detector.threshold:g}")
        return FilterResult(self.name, {"scene_cut_score": top, "scene_cuts": float(cuts.size)}, reason)


# --------------------------------------------------------------------------------------------
# building and running
# --------------------------------------------------------------------------------------------


def build_filters(p: FilterParams) -> list[ClipFilter]:
    """The filters a ``filters`` section switches on, in run order (header-only first)."""
    out: list[ClipFilter] = []
    if p.source is not None:
        out.append(SourceFilter.from_params(p.source))
    if p.scene_cut is not None:
        out.append(SceneCutFilter.from_params(p.scene_cut))
    if p.motion is not None:
        out.append(MotionFilter.from_params(p.motion))
    if p.quality is not None:
        out.append(QualityFilter.from_params(p.quality))
    return out


@dataclass
class CurationResult:
    """``records``: one dict per kept clip (ids, captions, provenance, geometry, every score);
    ``rejects``: ``clip_id, path, reason`` (+ the scores measured before the drop); ``drops``: count
    per reason code; ``seconds``: wall time per step summed over clips; ``cut``: clips decoded in
    this run; ``resumed``: clips whose decision came from an earlier run's state file."""

    records: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    drops: Counter = field(default_factory=Counter)
    seconds: Counter = field(default_factory=Counter)
    cut: int = 0
    resumed: int = 0


#: Reject codes that are never remembered by a resumable run: the source may appear (a download
#: finishes) or the failure may be transient, so a rerun tries again.
RETRIED_CODES = frozenset({"missing_source", "error"})
_STATE_VERSION = 1


def _source_signature(path: Path) -> list[int]:
    st = path.stat()
    return [int(st.st_size), int(st.st_mtime_ns)]


def _state_path(out: Path, clip_id: str) -> Path:
    return out / "state" / f"{clip_id}.json"


def _load_state(out: Path, spec: ClipSpec, source: Path, resume_key: str) -> dict | None:
    """The earlier decision on ``spec`` if it still holds: same key, same clip span, same source
    file (size and mtime) and, for a kept clip, its video still there. Anything else: ``None``."""
    path = _state_path(out, spec.clip_id)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable curation state %s (%s); the clip is cut again", path, exc)
        return None
    try:
        if (state.get("version") != _STATE_VERSION or state.get("key") != resume_key
                or state.get("span") != [spec.start_s, spec.end_s]
                or state.get("source") != _source_signature(source)):
            return None
        if state["status"] == "kept":
            video = out / state["record"]["video_path"]
            if not video.is_file() or video.stat().st_size != state.get("video_size"):
                return None
        elif state["status"] != "dropped":
            return None
    except (KeyError, TypeError, AttributeError, OSError):
        return None
    return state


def _save_state(out: Path, spec: ClipSpec, source: Path, resume_key: str, status: str, entry: dict,
                video: Path | None = None) -> None:
    state = {"version": _STATE_VERSION, "key": resume_key, "span": [spec.start_s, spec.end_s],
             "source": _source_signature(source), "status": status,
             "record" if status == "kept" else "reject": entry}
    if video is not None:
        state["video_size"] = video.stat().st_size
    write_text(_state_path(out, spec.clip_id), json.dumps(state, sort_keys=True, default=float))


def _timed(result: CurationResult, step: str, fn: Callable, *args):
    t0 = time.perf_counter()
    try:
        return fn(*args)
    finally:
        result.seconds[step] += time.perf_counter() - t0


def curate_clips(
    specs: Iterable[ClipSpec],
    video_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cutter: ClipCutter,
    filters: Sequence[ClipFilter],
    evaluate_all: bool = True,
    resume_key: str | None = None,
) -> CurationResult:
    """Cut, filter and write each clip: ``<out_dir>/videos/<clip_id>.mp4`` for the kept ones.

    A header-only filter that fails skips decoding; once decoded, every filter runs when
    ``evaluate_all`` (so dropped clips keep all their scores for threshold tuning) and the first
    failing one names the drop. Any problem with one clip (missing or corrupt source, a filter
    error) is logged with the file and recorded as a reject; the run goes on.

    ``resume_key`` (a fingerprint of everything that decides a clip: geometry, cut and filter
    parameters) makes the run resumable: each decision is saved to ``<out_dir>/state/<clip_id>.json``
    (atomically, after the clip's video), and a clip whose state has the same key, span and source
    file (size, mtime) is taken from it without decoding. Missing sources and unexpected errors
    (:data:`RETRIED_CODES`) are not saved, so a rerun tries them again.
    """
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    result = CurationResult()
    header = [f for f in filters if not f.needs_frames]
    framed = [f for f in filters if f.needs_frames]
    for spec in tqdm(specs, desc="cutting + filtering", unit="clip", disable=None):
        scores: dict[str, float] = {}
        path: Path | str = Path(video_dir) / spec.video_id
        reason: str | None = None
        try:
            path = cutter.locate(spec, video_dir)
            state = _load_state(out, spec, path, resume_key) if resume_key is not None else None
            if state is not None:
                result.resumed += 1
                if state["status"] == "kept":
                    record = dict(state["record"])  # captions may have been edited in the CSV since
                    record.update(caption_short=spec.caption, caption_long=spec.caption_long or spec.caption,
                                  url=spec.url, source_path=str(path))
                    result.records.append(record)
                else:
                    rej = dict(state["reject"], path=str(path))
                    result.drops[rej["reason"].split(":", 1)[0]] += 1
                    result.rejects.append(rej)
                continue
            plan = _timed(result, "probe", cutter.plan, spec, path)
            for f in header:
                r = _timed(result, f.name, f.evaluate, plan)
                scores.update(r.scores)
                reason = reason or r.reason
            if reason is None:
                clip = _timed(result, "cut", cutter.cut, plan)
                result.cut += 1
                for f in framed:
                    if reason is not None and not evaluate_all:
                        break
                    r = _timed(result, f.name, f.evaluate, clip)
                    scores.update(r.scores)
                    reason = reason or r.reason
        except ClipRejected as rej:
            reason = rej.reason
        except Exception as exc:  # a bug or an unexpected input must not end the whole run
            logger.exception("clip %s (%s) failed", spec.clip_id, path)
            reason = f"error: {path}: {exc.__class__.__name__}: {exc}"
        if reason is not None:
            code = reason.split(":", 1)[0]
            result.drops[code] += 1
            logger.info("dropped clip %s (%s): %s", spec.clip_id, path, reason)
            rej = {"clip_id": spec.clip_id, "path": str(path), "reason": reason, **scores}
            result.rejects.append(rej)
            if resume_key is not None and code not in RETRIED_CODES and Path(path).is_file():
                _save_state(out, spec, Path(path), resume_key, "dropped", rej)
            continue
        rel = f"videos/{spec.clip_id}.mp4"
        _timed(result, "write", cutter.write, clip, out / rel)
        record = {
            "clip_id": spec.clip_id, "video_path": rel, "num_frames": int(clip.frames.shape[0]), "fps": clip.fps,
            "height": int(clip.frames.shape[1]), "width": int(clip.frames.shape[2]),
            "caption_short": spec.caption, "caption_long": spec.caption_long or spec.caption,
            "video_id": spec.video_id, "url": spec.url, "source_path": str(path),
            "start_s": spec.start_s, "end_s": spec.end_s,
            "window_start_s": float(clip.frame_times[0]), "window_end_s": float(clip.frame_times[-1]),
            **scores,
        }
        result.records.append(record)
        if resume_key is not None:
            _save_state(out, spec, Path(path), resume_key, "kept", record, out / rel)
    logger.info("curated %d clips, dropped %d (%s)", len(result.records), len(result.rejects),
                ", ".join(f"{k} {v}" for k, v in result.drops.most_common()) or "none")
    return result


__all__ = [
    "QUALITY_SCORER_CLASSES",
    "RETRIED_CODES",
    "ClassicalQualityScorer",
    "ClipFilter",
    "ContentCutDetector",
    "CurationResult",
    "CutDetector",
    "FilterResult",
    "HistogramCutDetector",
    "MotionFilter",
    "QualityFilter",
    "QualityScorer",
    "SceneCutFilter",
    "SourceFilter",
    "blockiness_ratio",
    "build_filters",
    "build_quality_scorer",
    "clipped_fraction",
    "curate_clips",
    "laplacian_variance",
    "motion_score",
    "noise_sigma",
]
