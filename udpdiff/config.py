"""Typed view of ``params.yaml``: one file holds every parameter; a profile selects a column.

Validation happens once, at load, so a bad value fails with the key path and the reason
(``profiles.tiny.train.lr: Input should be greater than 0``) before any work starts.
"""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from udpdiff.data.curation_params import CurationParams
from udpdiff.tasks import validate_tasks


class ParamsError(ValueError):
    """params.yaml is missing, unreadable, or holds a bad value."""


# Dotted keys read while recording (``recording_reads``): what a DVC stage's `params:` must list.
_READS: ContextVar[set[str] | None] = ContextVar("udpdiff_params_reads", default=None)


@contextlib.contextmanager
def recording_reads() -> Iterator[set[str]]:
    """Collect the dotted keys (``profiles.tiny.train.lr``) of every parameter read inside the block,
    through attribute access or ``model_dump``; tests compare them with dvc.yaml's ``params:``."""
    reads: set[str] = set()
    token = _READS.set(reads)
    try:
        yield reads
    finally:
        _READS.reset(token)


@contextlib.contextmanager
def unrecorded() -> Iterator[None]:
    """Reads inside the block are bookkeeping, not inputs of the stage's outputs (a checkpoint's
    compatibility fingerprint hashes every section, yet those sections reach training through
    its data dependencies): they are left out of ``recording_reads``."""
    token = _READS.set(None)
    try:
        yield
    finally:
        _READS.reset(token)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    _key: str = PrivateAttr(default="")  # this section's dotted key in params.yaml, set by Params

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if name[0] != "_" and not _is_section(value):
            reads = _READS.get()
            if reads is not None and name in type(self).model_fields:
                reads.add(f"{self._key}{name}")
        return value

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        reads = _READS.get()
        if reads is not None:
            exclude = kwargs.get("exclude") or ()
            reads.update(f"{self._key}{leaf}" for leaf in _leaves(self) if leaf.split(".")[0] not in exclude)
        return super().model_dump(**kwargs)


def _is_section(value: Any) -> bool:
    return isinstance(value, _Strict) or (isinstance(value, dict) and bool(value)
                                           and all(isinstance(v, _Strict) for v in value.values()))


def _leaves(model: _Strict, prefix: str = "") -> Iterator[str]:
    for name in type(model).model_fields:
        value = BaseModel.__getattribute__(model, name)
        if isinstance(value, _Strict):
            yield from _leaves(value, f"{prefix}{name}.")
        elif isinstance(value, dict) and value and all(isinstance(v, _Strict) for v in value.values()):
            for k, v in value.items():
                yield from _leaves(v, f"{prefix}{name}.{k}.")
        else:
            yield f"{prefix}{name}"


def _assign_keys(model: _Strict, prefix: str = "") -> None:
    model._key = prefix
    for name in type(model).model_fields:
        value = BaseModel.__getattribute__(model, name)
        if isinstance(value, _Strict):
            _assign_keys(value, f"{prefix}{name}.")
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, _Strict):
                    _assign_keys(v, f"{prefix}{name}.{k}.")


class EntityModelParams(_Strict):
    """SAM2's first-frame entity model (paper §3.1: EntitySeg's entity map is SAM2's prompt): a
    universal segmentation model used class-agnostically (``udpdiff.annotators.entities``)."""

    type: Literal["mask2former", "eomt"]
    path: str                                 # local folder or hub id of the checkpoint
    # keyword arguments of EntitySegmenter, e.g. {score_threshold: 0.8, max_entities: 16, dtype: bfloat16}
    options: dict[str, Any] = Field(default_factory=dict)


# Sam2VideoAnnotator options that only shape its point-grid prompts, which an entity model replaces
SAM2_GRID_OPTIONS = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
                     "stability_score_offset", "nms_iou_thresh", "min_area_fraction", "max_entities")


class AnnotatorParams(_Strict):
    """A dense annotator model: labels curated clips, or gives the pseudo ground truth of generated videos (Tab 3)."""

    type: Literal["depthcrafter", "depth-anything-v2", "sam2"]
    path: str                                 # local folder or hub id of the model
    svd_path: str | None = None               # DepthCrafter only: its Stable Video Diffusion base
    # keyword arguments of the annotator class, e.g. {dtype: bfloat16, max_entities: 16, points_per_side: 12}
    options: dict[str, Any] = Field(default_factory=dict)
    # SAM2 only: frame 0's entities come from this model instead of SAM2's point grid (null: the grid)
    entities: EntityModelParams | None = None

    @model_validator(mode="after")
    def _entities_prompt_sam2(self) -> AnnotatorParams:
        if self.entities is None:
            return self
        if self.type != "sam2":
            raise ValueError(f"entities (a first-frame entity model) prompts SAM2: the type must be sam2, "
                             f"not {self.type!r}")
        grid = [k for k in SAM2_GRID_OPTIONS if k in self.options]
        if grid:
            raise ValueError(f"options {grid} shape SAM2's point-grid prompts, which entities replaces: remove them "
                             "(entities.options has the entity model's own min_area_fraction and max_entities)")
        return self


DEPTH_ANNOTATORS = ("depthcrafter", "depth-anything-v2")
SEGMENTATION_ANNOTATORS = ("sam2",)


def _check_annotator_kinds(obj: BaseModel, keys: dict[str, tuple[str, ...]]) -> None:
    for key, kinds in keys.items():
        ref = getattr(obj, key)
        if ref is not None and ref.type not in kinds:
            raise ValueError(f"{key}.type must be one of {list(kinds)}, got {ref.type!r}")


class Panda70MSource(_Strict):
    csv: str | None = None
    video_dir: str | None = None
    seg_dir: str | None = None
    depth_dir: str | None = None
    # clips without a precomputed map in seg_dir / depth_dir are labelled by these (paper §3)
    segmentation_annotator: AnnotatorParams | None = None
    depth_annotator: AnnotatorParams | None = None
    # set: cut Panda-70M *source videos* at their timestamps and filter them (udpdiff.data.filters)
    # instead of reading pre-cut clips from csv / video_dir; see udpdiff.data.curation_params
    curation: CurationParams | None = None

    @model_validator(mode="after")
    def _annotator_kinds(self) -> Panda70MSource:
        _check_annotator_kinds(self, {"segmentation_annotator": SEGMENTATION_ANNOTATORS,
                                      "depth_annotator": DEPTH_ANNOTATORS})
        return self


class DataParams(_Strict):
    source: Literal["synthetic", "panda70m"] = "synthetic"
    num_clips: int = Field(24, gt=0)
    num_frames: int = Field(9, gt=0)
    height: int = Field(64, gt=0)
    width: int = Field(64, gt=0)
    fps: float = Field(8, gt=0)
    val_fraction: float = Field(0.25, ge=0, lt=1)
    panda70m: Panda70MSource = Panda70MSource()

    @model_validator(mode="after")
    def _vae_compatible(self) -> DataParams:
        # CogVideoX's VAE compresses time 4x keeping the first frame: 4k+1 frames; space 8x.
        if (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames must be 4k+1 for the CogVideoX VAE, got {self.num_frames}")
        if self.height % 16 or self.width % 16:
            raise ValueError(f"height and width must be multiples of 16, got {self.height}x{self.width}")
        return self


class PixelplanesParams(_Strict):
    segmentation: Literal["pixelplanes", "location-aware"] = "pixelplanes"
    min_color_distance: float = Field(0.0, ge=0)
    grid_size: int = Field(8, gt=0)
    decode_tolerance: float = Field(40.0, gt=0)


class VaeTrainParams(_Strict):
    steps: int = Field(300, ge=0)
    batch_size: int = Field(4, gt=0)
    lr: float = Field(2e-3, gt=0)
    kl_weight: float = Field(1e-6, ge=0)
    # [frames, height, width]: train on random crops of the clips (the VAE is convolutional and is used on
    # whole clips); null = whole clips. Sides multiples of 8; frames as the profile's VAE takes them (below).
    crop: tuple[int, int, int] | None = None

    @field_validator("crop")
    @classmethod
    def _crop_shape(cls, v: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if v is not None and (v[0] < 1 or v[1] % 8 or v[2] % 8 or min(v[1:]) < 8):
            raise ValueError(f"crop must be [frames, height, width] with sides multiples of 8, got {list(v)}")
        return v


class VaeParams(_Strict):
    pretrained: str | None = None
    subfolder: str = "vae"
    config: dict[str, Any] = {}
    train: VaeTrainParams = VaeTrainParams()


class TextPretrainParams(_Strict):
    """Masked-word pretraining of a random text encoder on the training captions (0 steps: none)."""
    steps: int = Field(0, ge=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1.0e-3, gt=0)
    mask_probability: float = Field(0.15, gt=0, lt=1)


class TextEncoderParams(_Strict):
    pretrained: str | None = None
    # a random encoder's tokenizer (udpdiff.models.text): byt5 bytes, or the training captions' words
    tokenizer: Literal["byt5", "words"] = "byt5"
    max_length: int = Field(64, gt=0)
    config: dict[str, Any] = {}
    pretrain: TextPretrainParams = TextPretrainParams()

    @model_validator(mode="after")
    def _pretrain_needs_a_random_encoder(self) -> TextEncoderParams:
        if self.pretrained and self.pretrain.steps:
            raise ValueError(f"pretrain.steps {self.pretrain.steps}: {self.pretrained!r} is trained already; "
                             "masked-word pretraining is for a random encoder (pretrained: null)")
        return self


# what a from-scratch transformer's config must spell out: without them diffusers' class defaults
# (CogVideoX-2B's shape) would be built silently, whatever the profile says
ARCHITECTURE_KEYS = ("num_attention_heads", "attention_head_dim", "num_layers", "text_embed_dim", "time_embed_dim",
                     "sample_height", "sample_width", "sample_frames", "patch_size", "max_text_seq_length",
                     "use_rotary_positional_embeddings")


class TransformerParams(_Strict):
    pretrained: str | None = None
    subfolder: str = "transformer"
    channel_expansion: Literal["duplicate", "random", "duplicate-preserving"] = "duplicate"
    # the architecture: built from it when `pretrained` is null; checked against the weights otherwise
    config: dict[str, Any] = {}

    @model_validator(mode="after")
    def _architecture(self) -> TransformerParams:
        missing = [k for k in ARCHITECTURE_KEYS if k not in self.config]
        if self.pretrained is None and missing:
            raise ValueError(f"pretrained: null trains from scratch, so config must give the architecture; "
                             f"missing {missing}")
        return self


class SchedulerParams(_Strict):
    type: Literal["ddim", "dpm"] = "ddim"
    config: dict[str, Any] = {}


class TrainParams(_Strict):
    tasks: list[str] = ["segmentation", "depth"]
    task_ratio: list[float] = [0.5, 0.5]
    # embedding: learned task embedding (paper); text-prompt: task named in the prompt (Tab 5);
    # none: a single-task model without task embedding (Tab 1), or with `tasks: []` the
    # RGB-only 16-channel baseline (the "CogVideoX" rows, fine-tuned under the same conditions)
    task_conditioning: Literal["embedding", "text-prompt", "none"] = "embedding"
    long_caption_prob: float = Field(0.8, ge=0, le=1)
    caption_dropout_prob: float = Field(0.1, ge=0, lt=1)
    # the share of samples whose RGB half is given clean, with the loss on their dense half only:
    # the model learns to read a video while it denoises the dense half, which dense prediction of
    # real clips (UDPDiffPipeline video=) needs and joint noising alone barely teaches
    # (benchmarks/probe_rgb_reliance.py). 0 is the paper: both halves always noised alike
    rgb_given_prob: float = Field(0.0, ge=0, lt=1)
    steps: int = Field(400, gt=0)
    micro_batch_size: int = Field(4, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    # the learning rate after the linear warmup, by diffusers.optimization's schedule of that name:
    # constant (the paper), or a decay to 0 at `steps` (linear, cosine), which ends a fixed budget
    # on a less noisy model than a constant rate does
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    # a DeepSpeed JSON (repo-relative or absolute); its "auto" values are filled from the fields
    # here (micro batch, accumulation, clipping, precision). ZeRO stage and offload live in it.
    deepspeed_config: str = "infra/deepspeed/zero2.json"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # adamw: torch's AdamW (fused on CUDA), or DeepSpeed's when the JSON names an optimizer.
    # adamw8bit: torchao's AdamW8bit, both moments block-wise 8-bit (a quarter of AdamW's state
    # memory; the `lowbit` extra). Not lossless: the moments are quantised. It needs the weights as
    # they are, unflattened: a ZeRO-0 JSON (infra/deepspeed/zero0.json) and fp32 or master_weights: bf16
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    # the weights the optimizer updates: fp32, a master copy beside the bf16/fp16 module (DeepSpeed's
    # mixed precision), or bf16, the bf16 module itself, updated with stochastic rounding (no fp32
    # copy: with adamw8bit, 5B fits one 80 GB GPU; benchmarks/results/gpu-memory-5b-8bit-h200.md)
    master_weights: Literal["fp32", "bf16"] = "fp32"
    # activation checkpointing: true/full recomputes each block in the backward (least memory);
    # selective keeps matmul and attention outputs and recomputes only pointwise work (a backward
    # of ~2 forwards instead of 3, more memory); false keeps everything (udpdiff.acceleration)
    gradient_checkpointing: bool | Literal["full", "selective"] = False
    # cached: read the latents stage's VAE posteriors and T5 embeddings; online: encode each clip
    # when a batch needs it (no pre-encoding pass; the same batches, slower steps)
    latents: Literal["cached", "online"] = "cached"
    checkpoint_every: int = Field(100, gt=0)
    keep_last: int = Field(2, gt=0)
    log_every: int = Field(10, gt=0)
    # a grid of samples (one prompt per task, video | colormap) every N steps; 0 turns it off. With it,
    # the validation scores (paper Fig 8) of the first `validation_clips` clips of `sample.split`
    sample_every: int = Field(0, ge=0)
    validation_clips: int = Field(2, ge=0)
    # Fig 8's video scores (MS†, pixel consistency) at each preview: 0 = of the grid's one video; N = the
    # mean over text-to-video samples of the first N validation clips' captions with the sample stage's
    # seeds, in one batched pass (the last preview then scores the evaluation's videos of those clips)
    validation_videos: int = Field(0, ge=0)
    # MLflow gets each checkpoint either copied ("artifacts") or as a path + size reference
    # ("references": a 5B ZeRO checkpoint is ~60 GB); the final diffusers export is always copied
    # for artifacts, referenced otherwise
    log_checkpoints: Literal["artifacts", "references"] = "references"
    # a checkpoint of this run's settings that other code wrote (DVC reran the stage for a code
    # change): "restart" sets it aside and trains anew, "resume" continues it (a fix that does not
    # change what was learnt, e.g. logging) and records the changed files (udpdiff.train.resume_point)
    on_code_change: Literal["restart", "resume"] = "restart"

    @model_validator(mode="after")
    def _tasks(self) -> TrainParams:
        validate_tasks(self.tasks, self.task_ratio)
        if self.validation_videos > self.validation_clips:
            raise ValueError(f"validation_videos ({self.validation_videos}) scores the first validation clips' "
                             f"captions: at most validation_clips ({self.validation_clips})")
        if self.task_conditioning == "none" and len(self.tasks) > 1:
            raise ValueError(f"task_conditioning 'none' is for single-task models; got tasks {self.tasks}")
        if not self.tasks and self.task_conditioning != "none":
            raise ValueError("tasks: [] (the RGB-only baseline) needs task_conditioning: none")
        if not self.tasks and self.rgb_given_prob:
            raise ValueError("rgb_given_prob needs a dense task: the RGB-only baseline has no dense half to predict")
        if self.master_weights == "bf16" and (self.precision != "bf16" or self.optimizer != "adamw8bit"):
            # torch's AdamW rounds each update to bf16: at lr 1e-5 most updates would round away
            raise ValueError(f"master_weights: bf16 needs precision: bf16 and optimizer: adamw8bit (its stochastic "
                             f"rounding keeps small updates); got precision {self.precision}, "
                             f"optimizer {self.optimizer}")
        if self.optimizer == "adamw8bit" and self.precision != "fp32" and self.master_weights != "bf16":
            # DeepSpeed's mixed precision steps the optimizer on one flat fp32 buffer, for which
            # torchao keeps full-precision moments: no memory saved
            raise ValueError(f"optimizer: adamw8bit with precision {self.precision} needs master_weights: bf16 "
                             "(DeepSpeed's fp32 master copy is one flat buffer, whose moments torchao keeps "
                             "in full precision)")
        return self


class SampleParams(_Strict):
    num_samples: int = Field(4, gt=0)
    num_inference_steps: int = Field(25, gt=0)
    guidance_scale: float = Field(3.0, ge=1.0)
    # text guidance (CFG) for dense prediction of real clips, their RGB half given; null = guidance_scale.
    # With the video given the caption adds little: 1 (no CFG) scored best on both tasks for the small
    # RGB-given model (benchmarks/results/small-h200-attempt9.md)
    dense_guidance_scale: float | None = Field(None, ge=1.0)
    split: Literal["train", "val"] = "val"
    gallery_size: int = Field(4, ge=1)        # samples per task stacked in the MLflow gallery
    runtime_trials: int = Field(1, ge=0)      # timed runs of ours and the stock architecture (Tab 4)
    # w_r of Ho et al.'s reconstruction guidance for dense prediction of real clips (UDPDiffPipeline
    # reconstruction_guidance; 0 = the plain replacement sampler, the paper's); a backward pass per step
    reconstruction_guidance: float = Field(0.0, ge=0)
    # dense prediction of real clips from members sampled with their own seeds (UDPDiffPipeline
    # ensemble_size): depth aligned and fused by the median (Marigold's test-time ensembling), entities
    # matched across members and voted per pixel; 1 = one sample, the paper's
    dense_ensemble_size: int = Field(1, ge=1)

    def guidance_for_real_clips(self) -> float:
        """The text guidance scale of dense prediction of real clips (``dense_guidance_scale``, or
        ``guidance_scale`` when that is null)."""
        return self.guidance_scale if self.dense_guidance_scale is None else self.dense_guidance_scale


def _timestep_range(v: tuple[int, int]) -> tuple[int, int]:
    if not -1 <= v[0] < v[1] <= 1000:
        raise ValueError(f"a timestep range (low, high) with -1 <= low < high <= 1000, got {list(v)}")
    return v


TimestepRange = Annotated[tuple[int, int], AfterValidator(_timestep_range)]


class FirstBlockCacheParams(_Strict):
    """diffusers' First-Block Cache: every step runs the first block; when its residual changed by
    less than ``threshold`` (relative mean absolute difference) since the last full step, the other
    blocks are skipped and their cached residual is added instead."""

    type: Literal["first-block"]
    threshold: float = Field(0.05, gt=0, lt=1)


class FasterCacheParams(_Strict):
    """diffusers' FasterCache: attention outputs reused (extrapolated) between recomputations every
    ``attention_skip_range`` steps inside ``attention_timesteps``, and the unconditional CFG half
    skipped (approximated from the conditional one in frequency space) except every
    ``uncond_skip_range`` steps inside ``uncond_timesteps``. Needs CFG (guidance_scale > 1)."""

    type: Literal["faster"]
    attention_skip_range: int = Field(2, ge=2)
    attention_timesteps: TimestepRange = (-1, 681)
    attention_weight: float = Field(0.3, ge=0, le=1)  # diffusers' CogVideoX example
    uncond_skip_range: int = Field(5, ge=2)
    uncond_timesteps: TimestepRange = (-1, 641)


class PyramidAttentionBroadcastParams(_Strict):
    """diffusers' Pyramid Attention Broadcast: each block's attention output is recomputed every
    ``attention_skip_range`` steps inside ``timesteps`` and broadcast (reused as is) in between."""

    type: Literal["pab"]
    attention_skip_range: int = Field(2, ge=2)
    timesteps: TimestepRange = (100, 800)


CacheParams = Annotated[FirstBlockCacheParams | FasterCacheParams | PyramidAttentionBroadcastParams,
                        Field(discriminator="type")]


class ApproximateParams(_Strict):
    """Opt-in approximate sampling: these CHANGE the outputs (each mode's cost against the lossless
    path is measured by ``benchmarks/bench_gpu.py --sections approx``). Sampling, ``udpdiff
    generate`` and the GPU benchmark apply them (``udpdiff.acceleration.accelerate_pipeline``);
    training ignores this sub-section (it is not a train-stage parameter) and
    ``udpdiff.acceleration.check_inference`` refuses a transformer in training mode.

    ``float8``: ``rowwise`` = the blocks' token-wise linear layers in float8 (torchao: dynamic
    activation + weight float8 e4m3, one scale per row; CUDA sm89+ and bf16 weights, the optional
    ``torchao`` extra); ``tensorwise`` = the same with one scale per tensor (cuBLAS's scalar-scaled
    float8 GEMM: usually faster than rowwise, at a larger quality cost, since one outlier sets the
    scale of the whole activation). ``float8_attention``: the attention itself in float8 (FA3's e4m3
    forward kernel, one scale per sample and head; needs FA3: ``attention: fa3``, or ``auto`` where it
    runs). ``cache``: one of diffusers' step caches, or null."""

    float8: Literal["none", "rowwise", "tensorwise"] = "none"
    float8_attention: bool = False
    cache: CacheParams | None = None

    @property
    def active(self) -> bool:
        return self.float8 != "none" or self.float8_attention or self.cache is not None


class AccelerationParams(_Strict):
    """How the transformer and the VAE run, not what they compute: every setting here is lossless up
    to floating-point rounding (bf16 tolerance) except ``approximate`` (opt-in, sampling only) and
    ``vae_tiling`` (blended tile seams), and none enters a checkpoint's fingerprint, so a run
    resumes across a change. One section because training, sampling, ``udpdiff generate`` and the
    GPU benchmark all apply it through ``udpdiff.acceleration``.

    ``compile_blocks``: ``torch.compile`` each transformer block (regional compilation, diffusers'
    ``compile_repeated_blocks``: one compile, reused by every block, paid once per process and
    cached on disk by Inductor). ``auto`` = on when the model runs on CUDA, off on the CPU, where
    the tiny profile's seconds-long runs would spend longer compiling than computing.
    ``vae_decode``: ``batched`` decodes the video and the colormap in one VAE call; ``sequential``
    decodes one video at a time (diffusers' VAE slicing: the memory of the old two decodes)."""

    compile_blocks: bool | Literal["auto"] = "auto"
    # torch.compile's mode for the blocks; CUDA graphs (reduce-overhead) are left out: they belong
    # around the whole step, not around each of 42 blocks that share one compiled graph
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"
    vae_decode: Literal["batched", "sequential"] = "batched"
    # torch.compile the VAE's encoder and decoder while the autoencoder stage trains it (1.54x a step
    # on an H200, half the memory: vae-train-modes-h200.md); auto = on CUDA. Eager again after training
    compile_vae: bool | Literal["auto"] = "auto"
    # decode in overlapping spatial tiles, blended at the seams (diffusers' VAE tiling): less decode
    # memory for large frames, more time, and seams that differ slightly from a whole-frame decode
    vae_tiling: bool = False
    # sampling's attention kernel: FlashAttention-3's forward (udpdiff.attention; the optional fa3-fwd
    # wheel, Hopper GPUs) or PyTorch's SDPA; auto = FA3 where it can run. Training always uses SDPA
    attention: Literal["auto", "sdpa", "fa3"] = "auto"
    # NOT lossless: opt-in approximations for sampling only (ApproximateParams); off by default
    approximate: ApproximateParams = ApproximateParams()


class EvaluateParams(_Strict):
    """Metric models (local paths or hub ids; ``null`` = that metric is not computed) and streaming.

    ``amt`` is VBench's ``amt-s.pth`` for motion smoothness; without it MS comes from the OpenCV
    optical-flow prior (reported under its own name). FVD reference statistics of the sampled split
    are cached per split, I3D file and frame count."""

    batch_size: int = Field(4, gt=0)          # videos per streamed chunk
    device: str = "auto"                      # auto: CUDA when available
    dino: str | None = None
    clip: str | None = None
    amt: str | None = None
    i3d: str | None = None
    depth_alignment: Literal["video", "frame"] = "video"  # least-squares scale and shift per video or frame
    fvd_frames: int | None = Field(None, gt=0)            # first N frames of each video (null: all)
    fvd_reference_videos: int | None = Field(None, gt=1)  # real clips for the reference (null: whole split)
    depth_annotator: AnnotatorParams | None = None        # pseudo-GT depth of generated videos
    depth_baseline: AnnotatorParams | None = None         # Tab 3's per-frame baseline vs that pseudo-GT
    segmentation_annotator: AnnotatorParams | None = None  # pseudo-GT entity ids of generated videos

    @model_validator(mode="after")
    def _annotator_kinds(self) -> EvaluateParams:
        _check_annotator_kinds(self, {"depth_annotator": DEPTH_ANNOTATORS, "depth_baseline": DEPTH_ANNOTATORS,
                                      "segmentation_annotator": SEGMENTATION_ANNOTATORS})
        if self.depth_baseline is not None and self.depth_annotator is None:
            raise ValueError("depth_baseline is scored against depth_annotator's pseudo-GT: set depth_annotator too")
        return self


class ProfileParams(_Strict):
    data: DataParams = DataParams()
    pixelplanes: PixelplanesParams = PixelplanesParams()
    vae: VaeParams = VaeParams()
    text_encoder: TextEncoderParams = TextEncoderParams()
    transformer: TransformerParams  # no default: a profile names its weights or its architecture
    scheduler: SchedulerParams = SchedulerParams()
    train: TrainParams = TrainParams()
    sample: SampleParams = SampleParams()
    acceleration: AccelerationParams = AccelerationParams()
    evaluate: EvaluateParams = EvaluateParams()

    @model_validator(mode="after")
    def _guidance_needs_noised_rgb(self) -> ProfileParams:
        if self.sample.reconstruction_guidance and self.train.rgb_given_prob:
            raise ValueError("sample.reconstruction_guidance guides a model that sees the given RGB half noised; one "
                             "trained with train.rgb_given_prob > 0 is given it clean: set one of them to 0")
        return self

    @model_validator(mode="after")
    def _vae_crop_fits_the_clips(self) -> ProfileParams:
        crop, d = self.vae.train.crop, self.data
        if crop is None or self.vae.pretrained:
            return self
        if crop[0] > d.num_frames or crop[1] > d.height or crop[2] > d.width:
            raise ValueError(f"vae.train.crop {list(crop)} is larger than the clips "
                             f"({d.num_frames} frames of {d.height}x{d.width})")
        # CogVideoX's decoder gives an odd number of latent frames back as 1 + r (n - 1) frames, an even
        # number as r n: only 1 + 2rk frames come back as many as went in
        period = 2 * int(self.vae.config.get("temporal_compression_ratio", 4))
        if (crop[0] - 1) % period:
            raise ValueError(f"vae.train.crop frames must be 1 + {period}k (what this VAE decodes back to as many "
                             f"frames), got {crop[0]}")
        return self

    @model_validator(mode="after")
    def _text_states_fit_the_transformer(self) -> ProfileParams:
        # a mismatch would otherwise surface as a shape error minutes later, in the train stage
        te, tr = self.text_encoder, self.transformer.config
        if te.pretrained is None and "text_embed_dim" in tr:
            d_model = te.config.get("d_model")
            if d_model is None:
                from transformers import T5Config  # its default width, what build_text_encoder then gets

                d_model = T5Config().d_model
            if d_model != tr["text_embed_dim"]:
                raise ValueError(f"transformer.config.text_embed_dim {tr['text_embed_dim']} must equal the random "
                                 f"text encoder's width, text_encoder.config.d_model {d_model}")
        return self

    @model_validator(mode="after")
    def _faster_cache_needs_cfg(self) -> ProfileParams:
        # FasterCache approximates the unconditional CFG half: refuse now, not after the first samples
        if isinstance(self.acceleration.approximate.cache, FasterCacheParams):
            for key in ("guidance_scale", "dense_guidance_scale"):
                value = getattr(self.sample, key)
                if value is not None and value <= 1:
                    raise ValueError(f"acceleration.approximate.cache type 'faster' approximates the unconditional "
                                     f"CFG half: it needs sample.{key} > 1, got {value}")
        return self


class MlflowParams(_Strict):
    tracking_uri: str = "sqlite:///mlruns.db"
    artifact_location: str = "mlartifacts"
    experiment: str = "udpdiff"


class AblationParams(_Strict):
    """One paper table: variants of the active profile, each a set of dotted-key overrides
    (``{train.task_conditioning: text-prompt}``; ``{}`` is params.yaml as it stands; the key
    ``profile`` switches profile, as Tab 12 does)."""

    title: str
    variants: dict[str, dict[str, Any]]
    # the variants the others are read against clip by clip (``udpdiff.evaluation.paired``), in order;
    # empty: the profile as it stands (``{}``), else the first. Tabs 1-2 in one table need two: the
    # multi-task model (Tab 2, and multi-task vs single-task) and the RGB-only one (Tab 1)
    compare_with: list[str] = []

    @field_validator("variants")
    @classmethod
    def _some(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if len(v) < 2:
            raise ValueError("an ablation compares at least two variants")
        return v

    @model_validator(mode="after")
    def _compare_with_variants(self) -> AblationParams:
        unknown = [n for n in self.compare_with if n not in self.variants]
        if unknown:
            raise ValueError(f"compare_with names {', '.join(map(repr, unknown))}, not a variant of this ablation "
                             f"(its variants: {', '.join(self.variants)})")
        if len(set(self.compare_with)) != len(self.compare_with):
            raise ValueError(f"compare_with names a variant twice: {self.compare_with}")
        return self

    @property
    def references(self) -> list[str]:
        """The variants the others are read against: ``compare_with``, else the profile as it stands
        (the variant without overrides), else the first."""
        if self.compare_with:
            return list(self.compare_with)
        return [next((n for n, overrides in self.variants.items() if not overrides), next(iter(self.variants)))]


class Params(_Strict):
    profile: str = "tiny"
    seed: int = 1234
    # what starts the train stage: "python -m" (one process), or a multi-process launcher ending in
    # its module flag, e.g. "torchrun --nproc_per_node 8 -m" or "deepspeed --num_gpus 8 --module"
    train_launcher: str = "python -m"
    # what starts the sample and evaluate stages, alike: their samples and videos are shared out over
    # the ranks (rank k % world), and the outputs are a one-process run's whatever the rank count
    inference_launcher: str = "python -m"
    mlflow: MlflowParams = MlflowParams()
    profiles: dict[str, ProfileParams]
    # the paper's ablations, one entry per table: `python -m flows ablation tab5`
    ablations: dict[str, AblationParams] = {}

    @field_validator("train_launcher", "inference_launcher")
    @classmethod
    def _launcher(cls, v: str) -> str:
        try:
            words = shlex.split(v)
        except ValueError as err:
            raise ValueError(f"not a command line ({err})") from None
        if len(words) < 2 or words[-1] not in ("-m", "--module"):
            raise ValueError(f"{v!r} must be a command ending in its run-a-module flag ('python -m', "
                             "'torchrun --nproc_per_node 8 -m', 'deepspeed --num_gpus 8 --module'): "
                             "`flows stage <name>` is appended to it")
        return v

    @field_validator("profiles")
    @classmethod
    def _non_empty(cls, v: dict[str, ProfileParams]) -> dict[str, ProfileParams]:
        if not v:
            raise ValueError("at least one profile is required")
        return v

    @model_validator(mode="after")
    def _profile_exists(self) -> Params:
        if self.profile not in self.profiles:
            raise ValueError(f"profile {self.profile!r} is not defined; defined: {sorted(self.profiles)}")
        _assign_keys(self)
        return self

    @property
    def active(self) -> ProfileParams:
        return self.profiles[self.profile]

    def with_overrides(self, overrides: dict[str, Any]) -> Params:
        """A copy whose active profile has ``overrides`` (dotted keys) applied, re-validated. The key
        ``profile`` switches the active profile first (the other keys then apply to that one)."""
        raw = self.model_dump()
        overrides = dict(overrides)
        if "profile" in overrides:
            raw["profile"] = overrides.pop("profile")
            if raw["profile"] not in raw["profiles"]:
                raise ParamsError(f"override profile={raw['profile']!r}: no such profile; defined: "
                                  f"{sorted(raw['profiles'])}")
            self = Params.model_validate(raw)  # noqa: PLW0642 (the other keys apply to the new profile)
        for dotted, value in overrides.items():
            node = raw["profiles"][self.profile]
            *parents, leaf = dotted.split(".")
            for key in parents:
                if not isinstance(node.get(key), dict):
                    raise ParamsError(f"override {dotted!r}: no section {key!r} in profile {self.profile!r}")
                node = node[key]
            if leaf not in node:
                raise ParamsError(f"override {dotted!r}: no key {leaf!r} in profile {self.profile!r}")
            node[leaf] = value
        try:
            return Params.model_validate(raw)
        except ValidationError as e:
            lines = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
            raise ParamsError(f"overrides {overrides}: invalid parameters:\n  " + "\n  ".join(lines)) from None

    def ineffective_overrides(self, overrides: dict[str, Any]) -> list[str]:
        """The overrides that could not change anything under this params' active profile, each
        with the reason (an ablation that silently equals its base would be a lie in its table)."""
        q = self.with_overrides(overrides)
        a = q.active
        problems = []
        for key in overrides:
            if key.startswith("data.panda70m") and a.data.source != "panda70m":
                problems.append(f"{key}: profile {q.profile!r} synthesises its clips (data.source: "
                                f"{a.data.source}); curation settings are never used")
            if key == "transformer.channel_expansion" and not a.transformer.pretrained:
                problems.append(f"{key}: profile {q.profile!r} trains its transformer from scratch "
                                "(transformer.pretrained: null): there are no pretrained channels to expand")
            if key.startswith("transformer.config") and a.transformer.pretrained:
                problems.append(f"{key}: profile {q.profile!r} loads pretrained weights (transformer.pretrained: "
                                f"{a.transformer.pretrained}), whose architecture the config only checks; "
                                "an architecture ablation needs transformer.pretrained: null")
            if key == "transformer.pretrained" and overrides[key] is None and not self.active.transformer.pretrained \
                    and "profile" not in overrides:
                problems.append(f"{key}: profile {q.profile!r} already trains from scratch")
            if key == "train.task_ratio" and "train.tasks" not in overrides and len(a.train.tasks) < 2:
                problems.append(f"{key}: a partition needs two tasks; profile {q.profile!r} trains {a.train.tasks}")
            if key == "train.task_conditioning" and "train.tasks" not in overrides and len(a.train.tasks) < 2 \
                    and overrides[key] != "none":
                problems.append(f"{key}: task conditioning tells tasks apart; {a.train.tasks} has one or none")
        return problems


def parse_overrides(assignments: list[str]) -> dict[str, Any]:
    """``["train.steps=500", "vae.config={a: 1}"]`` (command-line ``--set``) as dotted key -> YAML value,
    for :meth:`Params.with_overrides`."""
    out = {}
    for kv in assignments:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise ParamsError(f"override {kv!r}: expected key=value")
        out[key] = yaml.safe_load(value)
    return out


def load_params(path: str | Path = "params.yaml", profile: str | None = None) -> Params:
    """Read and validate params.yaml; ``profile`` overrides the file's ``profile`` key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    if profile is not None:
        raw["profile"] = profile
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ParamsError(f"{path}: invalid parameters:\n  " + "\n  ".join(lines)) from None
