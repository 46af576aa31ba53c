"""Typed parameters of Panda-Dense curation: cutting Panda-70M sources into clips, then filtering them.

The clip geometry (``num_frames``, ``fps``, ``height``, ``width``) and the subset size
(``num_clips``) come from :class:`udpdiff.config.DataParams`; this module holds only what the
curation steps add. Sections are frozen and forbid unknown keys, like the rest of ``params.yaml``.
A filter section set to ``null`` switches that filter off.

This module deliberately imports nothing from :mod:`udpdiff.config` so that ``config`` can embed
:class:`CurationParams` (e.g. as ``Panda70MSource.curation``) without an import cycle.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: Quality scorers :func:`udpdiff.data.filters.build_quality_scorer` knows. ``classical`` needs no
#: weights; a learned VQA model (e.g. DOVER / FAST-VQA) would be added here and in filters.py.
QUALITY_SCORERS = ("classical",)
#: Scene-cut detectors: PySceneDetect's ``ContentDetector`` (HSV deltas) or an HSV-histogram
#: difference detector written here (no extra package).
SCENE_DETECTORS = ("content", "histogram")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CutParams(_Strict):
    """How a Panda-70M timestamp becomes a clip (frame count, fps and size come from ``data``)."""

    #: Seed of the random subset of ``data.num_clips`` clips drawn from the CSV.
    seed: int = 0
    #: Where the fixed-rate window of ``num_frames`` frames sits inside a longer clip: ``start``
    #: (from the first frame) or ``center`` (furthest from Panda-70M's cut points).
    window: Literal["start", "center"] = "center"
    #: File endings tried, in order, for ``<video_dir>/<videoID><ext>``.
    video_extensions: tuple[str, ...] = (".mp4", ".mkv", ".webm", ".mov")
    #: H.264 constant quantiser of the written clips (udpdiff.io.video.write_video; 0 = lossless luma).
    qp: int = Field(10, ge=0, le=51)
    #: Source-resolution frames (spread over the window) kept for the quality scorer.
    quality_frames: int = Field(4, gt=0, le=64)

    @field_validator("video_extensions")
    @classmethod
    def _extensions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("video_extensions must name at least one file ending, e.g. ['.mp4']")
        bad = [e for e in value if not e.startswith(".") or len(e) < 2 or "/" in e]
        if bad:
            raise ValueError(f"video_extensions must look like '.mp4', got {bad}")
        return value


class SourceFilterParams(_Strict):
    """Checks on the source video and the timestamp, before anything is decoded."""

    #: Clip (timestamp) length bounds in seconds; ``max_duration_s: null`` = no upper bound.
    min_duration_s: float = Field(0.0, ge=0)
    max_duration_s: float | None = Field(None, gt=0)
    #: Largest factor the source may be enlarged by to fill (height, width); 1.0 = never upscale.
    max_upscale: float = Field(1.0, ge=1.0)

    @model_validator(mode="after")
    def _bounds(self) -> SourceFilterParams:
        if self.max_duration_s is not None and self.max_duration_s <= self.min_duration_s:
            raise ValueError(
                f"max_duration_s ({self.max_duration_s}) must be greater than min_duration_s ({self.min_duration_s})"
            )
        return self


class QualityWeights(_Strict):
    """Weights of the classical scorer's components in its weighted geometric mean."""

    sharpness: float = Field(0.4, ge=0)
    blockiness: float = Field(0.3, ge=0)
    noise: float = Field(0.15, ge=0)
    exposure: float = Field(0.15, ge=0)

    @model_validator(mode="after")
    def _some_weight(self) -> QualityWeights:
        if self.sharpness + self.blockiness + self.noise + self.exposure <= 0:
            raise ValueError("quality weights are all 0: give at least one component a positive weight")
        return self


class QualityFilterParams(_Strict):
    """Technical quality: drop clips whose score is below ``min_score``."""

    scorer: Literal["classical"] = "classical"
    min_score: float = Field(0.5, ge=0, le=1)
    #: classical scorer: variance of the Laplacian that maps to a sharpness score of 0.5.
    sharpness_ref: float = Field(100.0, gt=0)
    #: classical scorer: boundary/interior gradient ratio at which blockiness scores 0.
    blockiness_max_ratio: float = Field(2.0, gt=1)
    #: classical scorer: noise sigma (grey levels) at which the noise score is 1/e.
    noise_ref: float = Field(8.0, gt=0)
    #: classical scorer: fraction of clipped (<=4 or >=251) pixels at which exposure scores 0.
    clipped_max_fraction: float = Field(0.5, gt=0, le=1)
    #: classical scorer: frames are measured at this short side (area resize; never enlarged), so a
    #: 1080p and a 720p source of equal quality score alike. Blockiness uses the native grid.
    analysis_short_side: int = Field(480, ge=32)
    weights: QualityWeights = QualityWeights()


class MotionFilterParams(_Strict):
    """Farneback optical flow between consecutive output frames (1/fps apart), as a fraction of the
    frame diagonal per frame; clips outside ``[min_motion, max_motion]`` are dropped.

    Farneback (3 pyramid levels, 15 px window) follows displacements up to about 20 px at a 128 px
    short side (about 0.09 of a 3:2 diagonal) and reads less beyond, so ``max_motion`` should stay
    below about 0.08 unless ``short_side`` is raised."""

    min_motion: float = Field(1e-3, ge=0)
    max_motion: float = Field(0.06, gt=0)
    #: frame pairs measured, spread uniformly over the clip.
    pairs: int = Field(8, gt=0)
    #: flow is computed with the frames' short side resized to this (area).
    short_side: int = Field(128, ge=16)

    @model_validator(mode="after")
    def _bounds(self) -> MotionFilterParams:
        if self.max_motion <= self.min_motion:
            raise ValueError(f"max_motion ({self.max_motion}) must be greater than min_motion ({self.min_motion})")
        return self


class SceneCutParams(_Strict):
    """Drop clips with a shot change inside."""

    detector: Literal["content", "histogram"] = "content"
    #: cut threshold; ``null`` = the detector's default (content: 27.0, PySceneDetect's default on
    #: its 0-255 HSV-delta scale; histogram: 0.5 Bhattacharyya distance).
    threshold: float | None = Field(None, gt=0)
    #: frames are analysed at this width (PySceneDetect's own CLI downscales to about 256 px).
    analysis_width: int = Field(256, ge=16)

    @model_validator(mode="after")
    def _threshold_range(self) -> SceneCutParams:
        if self.detector == "histogram" and self.threshold is not None and self.threshold > 1:
            raise ValueError(
                f"threshold {self.threshold} is out of range for the histogram detector "
                "(a Bhattacharyya distance in (0, 1])"
            )
        return self


class FilterParams(_Strict):
    """Which filters run (a section set to ``null`` is off) and their thresholds."""

    source: SourceFilterParams | None = SourceFilterParams()
    quality: QualityFilterParams | None = QualityFilterParams()
    motion: MotionFilterParams | None = MotionFilterParams()
    scene_cut: SceneCutParams | None = SceneCutParams()


class SegPostprocessParams(_Strict):
    """Repairs of SAM2-propagated entity ids (paper §3.1; :mod:`udpdiff.data.postprocess`), per
    frame, as fractions of the frame's pixels. Ids are never renumbered."""

    #: unclaimed (id 0) regions up to this size, off the border and bordered by one entity, join it
    max_hole_fraction: float = Field(0.002, ge=0, le=1)
    #: entity regions (8-connected pieces) smaller than this are re-assigned (specks); 0 = keep all
    min_region_fraction: float = Field(0.0005, ge=0, lt=1)
    #: where a small region goes: the entity most of its border touches, or background (0)
    small_regions: Literal["neighbour", "background"] = "neighbour"
    #: the remaining unclaimed pixels: the nearest entity (distance transform) or left background (0)
    unclaimed: Literal["nearest", "background"] = "nearest"


class RecaptionParams(_Strict):
    """Long captions from a video-language model (paper §3: Video-LLaVA; :mod:`udpdiff.data.captioner`)."""

    type: Literal["video-llava"] = "video-llava"
    #: local folder or hub id of the model (with its tokenizer and image processor)
    path: str = "LanguageBind/Video-LLaVA-7B-hf"
    #: the chat prompt; ``<video>`` (exactly once) is where the clip goes
    prompt: str = "USER: <video>\nDescribe this video in detail. ASSISTANT:"
    #: frames sampled uniformly over the clip (Video-LLaVA was trained on 8)
    num_frames: int = Field(8, gt=0, le=64)
    max_new_tokens: int = Field(200, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    #: also re-caption clips whose CSV row already has a ``caption_long``
    overwrite: bool = False
    #: only a local folder or the HF cache (the training machines are offline)
    local_files_only: bool = True

    @field_validator("prompt")
    @classmethod
    def _one_video_token(cls, value: str) -> str:
        if value.count("<video>") != 1:
            raise ValueError(f"prompt must contain <video> exactly once (where the clip goes), got {value!r}")
        return value


class RunnerParams(_Strict):
    """How the per-clip work is spread (:mod:`udpdiff.data.shards`, ``flows/curation.py``). It changes
    how fast a dataset is made, never which: shards are merged in selection order.

    ``local``: shards run one after another in the stage's process. ``dask``: each shard is a Prefect
    task on a Dask cluster (prefect-dask): a ``LocalCluster`` of ``workers`` processes started for
    the run, or the scheduler at ``address`` (``dask scheduler`` / ``dask worker`` started elsewhere,
    e.g. one worker per GPU with ``--resources GPU=1``)."""

    type: Literal["local", "dask"] = "local"
    #: clips per shard: the unit of scheduling and of retries (a shard's finished clips are kept)
    shard_size: int = Field(64, gt=0)
    #: a failed shard (a worker lost, an out-of-memory) is retried this often; a clip's own error is
    #: a reject, never a shard failure
    retries: int = Field(2, ge=0)
    #: dask: scheduler address (tcp://host:8786); null = a LocalCluster for this run
    address: str | None = None
    #: dask LocalCluster: worker processes (null: one per GPU when ``gpus_per_worker`` > 0 and GPUs
    #: exist, else half the CPU cores), threads each
    workers: int | None = Field(None, gt=0)
    threads_per_worker: int = Field(1, gt=0)
    #: dask: GPUs each worker owns (a Dask resource; LocalCluster worker i uses GPU i mod count); shards
    #: that load models ask for one, so at most one model-running shard per GPU. 0 = CPU only.
    gpus_per_worker: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _address_is_dask(self) -> RunnerParams:
        if self.type == "local" and self.address is not None:
            raise ValueError("runner.address is a Dask scheduler: set runner.type: dask to use it")
        return self


class CurationParams(_Strict):
    """Everything curation adds to ``data``: where the Panda-70M sources are, cutting and filtering.

    Relative paths are relative to the project root. Layout::

        <source_dir>/<videoID>.mp4      source videos as Panda-70M's downloader saves them (any of
                                        cut.video_extensions), not split into clips
        <csv>                           Panda-70M CSV: videoID, url, timestamp, caption[, caption_long]
        <cut_dir>/videos/<clip>.mp4     the cut clips (kept ones), <clip> = <videoID>_<k:05d>
        <cut_dir>/state/<clip>.json     one decision per clip: a rerun skips what is decided
        <cut_dir>/captions/<clip>.json  long captions, keyed by the captioner's parameters
        <cut_dir>/labels/<kind>-<key>/<clip>.npz   annotator labels, keyed by annotator + post-processing

    ``cut_dir`` lives outside the stage's output on purpose: DVC clears a stage's outputs before
    it runs, and cutting 300K clips should survive an interrupted run.
    """

    csv: str | None = None
    source_dir: str | None = None
    cut_dir: str | None = None
    cut: CutParams = CutParams()
    filters: FilterParams = FilterParams()
    #: post-processing of the segmentation annotator's ids (not of precomputed maps); null = off
    seg_postprocess: SegPostprocessParams | None = SegPostprocessParams()
    #: long captions from a video-language model; null = keep the CSV's (or the short caption)
    recaption: RecaptionParams | None = None
    #: where the per-clip work runs (in the stage's process, or Dask workers)
    runner: RunnerParams = RunnerParams()


__all__ = [
    "QUALITY_SCORERS",
    "SCENE_DETECTORS",
    "CurationParams",
    "CutParams",
    "FilterParams",
    "MotionFilterParams",
    "QualityFilterParams",
    "QualityWeights",
    "RecaptionParams",
    "RunnerParams",
    "SceneCutParams",
    "SegPostprocessParams",
    "SourceFilterParams",
]
