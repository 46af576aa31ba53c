"""First-frame entity segmentation: a class-agnostic entity map of one image, the prompt SAM2 propagates.

The paper (section 3.1, "Entity Segmentation") segments the first frame of every clip with EntitySeg's
CropFormer and lets SAM2 track those entities, because SAM2's own point-grid prompts give masks of
inconsistent granularity (Tab. 9). CropFormer is not in transformers; its closest released relatives
are the mask-classification ("universal") segmentation models there, loaded with
``AutoModelForUniversalSegmentation``: Mask2Former (CropFormer's own base architecture; default
checkpoint ``facebook/mask2former-swin-large-coco-panoptic``, COCO panoptic, the data EntitySeg's
first entity models were trained on without their classes) and EoMT (``eomt``, ``eomt_dinov3``).
OneFormer is not supported: its forward needs tokenised task text (``task_inputs``) from a CLIP
tokenizer, and MaskFormer/DETR are superseded by Mask2Former.

Each of the model's N queries predicts a mask and a class distribution over C classes plus
"no object". They are used class-agnostically, as EntitySeg does (:func:`queries_to_ids`):

* **Score** of a query = ``1 - p(no object)``: the probability that the query is *some* entity,
  thing or stuff alike. The maximum class probability (Mask2Former's panoptic score) would also
  rank by how sure the model is *which* class it is, so an entity torn between two labels
  (0.45 / 0.45) would be dropped although it is certainly an entity; the class does not matter here.
  It is never below the maximum class probability, so the default threshold 0.8 (Mask2Former's
  panoptic ``object_mask_threshold``) keeps every query Mask2Former's panoptic inference keeps,
  plus the class-ambiguous ones.
* **Overlaps** are resolved per pixel by the largest ``score x mask probability`` among the
  queries whose mask covers the pixel (probability >= ``mask_threshold``): Mask2Former's panoptic
  inference rule, which uses the model's per-pixel confidence. (``segmentation.masks_to_ids``
  paints binary masks smaller-on-top, a heuristic for SAM's masks that carry no per-pixel
  confidence; query masks do.) A pixel no query covers stays 0 (unclaimed).
* A query keeps its entity only if it wins more than ``overlap_threshold`` of its own mask
  (Mask2Former's ``overlap_mask_area_threshold``: suppresses duplicate and mostly hidden queries)
  and at least ``min_area`` pixels. Unlike Mask2Former, a dropped query's pixels are handed to the
  next best covering query (the map is recomputed without it) instead of becoming holes, and
  queries are dropped one at a time, weakest first, so two duplicates splitting a region do not
  eliminate each other. Beyond ``max_entities`` the smallest entities go the same way.
* Ids ``1..K`` by decreasing area (ties: lower query index), int32 ``(H, W)`` at the input size.

Preprocessing is done here in torch (resize, pad, rescale, normalise on the model's device), from
the values of the checkpoint's ``preprocessor_config.json``: the default transformers processors of
these models need torchvision, which is not a project dependency. The values are read through the
PIL-backend processor class (``AutoImageProcessor.from_pretrained(..., backend="pil")``, which loads
without torchvision); its own ``preprocess`` is not used because the resize and padding must be
known to map the masks back to the frame, and HF's Mask2Former post-processing resizes masks to a
fixed 384x384 regardless of the input. Geometry follows the HF processors: Mask2Former resizes to
``size`` (shortest/longest edge, aspect kept) rounded up to multiples of ``size_divisor``; EoMT
resizes so the image fits the model's square input and pads black pixels at the bottom/right.
Mask logits are upsampled to the padded input, cropped to the resized image and resized to the frame.
"""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from udpdiff.annotators.segmentation import _relabel_by_area
from udpdiff.devices import default_device
from udpdiff.evaluation.consistency import _load_pretrained
from udpdiff.evaluation.consistency import _weights_hint as _consistency_weights_hint

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.image_processing_utils import BaseImageProcessor

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor

__all__ = ["EntitySegmenter", "entity_scores", "queries_to_ids", "DEFAULT_ENTITY_MODEL_ID", "MODEL_TYPES"]

DEFAULT_ENTITY_MODEL_ID = "facebook/mask2former-swin-large-coco-panoptic"

# params.yaml's `entities.type` -> the transformers model types it accepts
MODEL_TYPES: dict[str, tuple[str, ...]] = {"mask2former": ("mask2former",), "eomt": ("eomt", "eomt_dinov3")}
_WHY_NOT = {
    "oneformer": "OneFormer's forward needs tokenised task text (task_inputs) from its CLIP tokenizer",
    "maskformer": "use a Mask2Former checkpoint (MaskFormer's successor)",
    "detr": "DETR's segmentation head predicts boxes and per-box masks, not mask-classification queries",
}
# PIL resampling filters (the processors' `resample`) -> torch interpolation modes
_RESAMPLE_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


# --------------------------------------------------------------------------------------------
# Pure maths (no model)
# --------------------------------------------------------------------------------------------


def _as_tensor(x: ArrayLike) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else torch.as_tensor(x)


def entity_scores(class_logits: ArrayLike) -> torch.Tensor:
    """Class-agnostic entity score ``1 - p(no object)`` of each query, ``(..., Q, C + 1)`` -> ``(..., Q)``.

    The last class is "no object", as in Mask2Former and EoMT.
    """
    logits = _as_tensor(class_logits).float()
    if logits.ndim < 2 or logits.shape[-1] < 2:
        raise ValueError(f"expected class logits (..., Q, C + 1) with C >= 1, got {tuple(logits.shape)}")
    return 1.0 - logits.softmax(-1)[..., -1]


def queries_to_ids(
    scores: ArrayLike,
    mask_logits: ArrayLike,
    *,
    score_threshold: float = 0.8,
    mask_threshold: float = 0.5,
    overlap_threshold: float = 0.8,
    min_area: int = 0,
    max_entities: int | None = None,
) -> np.ndarray:
    """One int32 ``(H, W)`` entity map from query scores ``(Q,)`` and mask logits ``(Q, H, W)``.

    The rules (see the module docstring): queries scoring below ``score_threshold`` are dropped; a
    pixel goes to the covering query (sigmoid(logit) >= ``mask_threshold``) with the largest
    ``score x probability`` (ties: lower query index), or stays 0; a query must win more than
    ``overlap_threshold`` of its own mask and at least ``min_area`` pixels, else it is dropped
    (weakest score first, one at a time) and its pixels go to the next best covering query; at most
    ``max_entities`` (the largest) are kept. Ids ``1..K`` by decreasing area.
    """
    s = _as_tensor(scores).float().reshape(-1)
    logits = _as_tensor(mask_logits)
    if logits.ndim != 3:
        raise ValueError(f"expected mask logits of shape (Q, H, W), got {tuple(logits.shape)}")
    q, h, w = logits.shape
    if s.numel() != q:
        raise ValueError(f"{q} masks but {s.numel()} scores")
    s = s.to(logits.device)
    min_area = max(int(min_area), 1)
    limit = q if max_entities is None else max(int(max_entities), 0)

    candidates = torch.nonzero(s >= score_threshold).flatten()
    probs = logits[candidates].float().sigmoid()
    covers = probs >= mask_threshold
    own_area = covers.flatten(1).sum(1)
    # The per-pixel contest: score x probability where the query's mask covers the pixel, -inf elsewhere.
    weighted = torch.where(covers, s[candidates, None, None] * probs, -torch.inf)
    del probs
    cand_scores = s[candidates].cpu().numpy()
    # A query whose own mask is below min_area can never win that much: out before the first round.
    active = torch.nonzero(own_area >= min_area).flatten()
    won = torch.full((h, w), -1, dtype=torch.int64, device=logits.device)
    # Removing a query only grows the others' won areas, so this settles in at most Q rounds.
    while active.numel():
        claimed = covers[active].any(0)
        won = torch.where(claimed, weighted[active].argmax(0), -1)  # index into `active`
        won_area = torch.bincount(won[claimed], minlength=active.numel())
        fail = (won_area < min_area) | (won_area.double() <= overlap_threshold * own_area[active].double())
        won_area_np, fail_np = won_area.cpu().numpy(), fail.cpu().numpy()
        if fail_np.any():
            # One at a time, weakest first (lowest score, then smaller won area, then later query):
            # its pixels may rescue another failing query (two duplicates splitting one region).
            failing = np.flatnonzero(fail_np)
            pos = active.cpu().numpy()
            weakest = failing[np.lexsort((-pos[failing], won_area_np[failing], cand_scores[pos[failing]]))[0]]
            active = torch.cat([active[:weakest], active[weakest + 1 :]])
            continue
        if active.numel() > limit:
            # Keep the `limit` largest (ties: lower query index), in query order.
            by_area = np.lexsort((np.arange(active.numel()), -won_area_np))
            active = active[torch.from_numpy(np.sort(by_area[:limit])).to(active.device)]
            continue
        break
    if not active.numel():
        return np.zeros((h, w), dtype=np.int32)
    return _relabel_by_area((won + 1).cpu().numpy())


# --------------------------------------------------------------------------------------------
# Model wrapper
# --------------------------------------------------------------------------------------------


def _weights_hint() -> str:
    return _consistency_weights_hint("EntitySegmenter", DEFAULT_ENTITY_MODEL_ID)


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"image must be uint8 (H, W, 3) RGB, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"image must have shape (H, W, 3) with H, W >= 1, got {image.shape}")


def _pair(size: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[-1]))


def _aspect_size(h: int, w: int, shortest: int, longest: int | None) -> tuple[int, int]:
    """``(h, w)`` resized so the shorter side is ``shortest`` and the longer at most ``longest``, aspect kept.

    What ``transformers.image_transforms.get_size_with_aspect_ratio`` computes for the processors.
    """
    from transformers.image_transforms import get_size_with_aspect_ratio

    return tuple(int(v) for v in get_size_with_aspect_ratio((h, w), shortest, longest))


class EntitySegmenter:
    """Class-agnostic entity map of one RGB image from a universal segmentation model (module docstring).

    ``__call__(image)``: uint8 ``(H, W, 3)`` -> int32 ``(H, W)``, ``0`` = unclaimed, entities ``1..K``
    by decreasing area.

    Args:
        model_path_or_id: HF id or local folder of a Mask2Former / EoMT checkpoint with its
            ``preprocessor_config.json`` (default ``facebook/mask2former-swin-large-coco-panoptic``).
        model_type: ``"mask2former"`` or ``"eomt"`` (params.yaml's ``entities.type``); the
            checkpoint must be of that family. ``None``: any supported family.
        model: an already-built ``*ForUniversalSegmentation`` model; overrides loading the weights.
        processor: the model's image processor (only its values are read); default: loaded from
            ``model_path_or_id`` with the PIL backend.
        score_threshold: queries whose entity score ``1 - p(no object)`` is below this are dropped.
        mask_threshold: a query's mask covers a pixel where its probability is at least this.
        overlap_threshold: a query must win more than this fraction of its own mask.
        min_area_fraction: entities smaller than this fraction of the image are dropped (the
            paper's post-processing removes such fragments).
        max_entities: at most this many (largest) entities; SAM2 then tracks one object per entity.
        device: where the model runs; default: the given model's device, else CUDA when available.
        dtype: model dtype (e.g. ``torch.bfloat16`` on GPU); default: the model's.
        local_files_only: never contact the hub (default), as everywhere in this project.

    Raises:
        MetricModelUnavailable: the weights or the preprocessor config cannot be loaded.
        ValueError: the checkpoint is not of ``model_type`` or of a supported family.
    """

    name = "entities"

    def __init__(
        self,
        model_path_or_id: str | os.PathLike = DEFAULT_ENTITY_MODEL_ID,
        *,
        model_type: str | None = None,
        model: PreTrainedModel | None = None,
        processor: BaseImageProcessor | None = None,
        score_threshold: float = 0.8,
        mask_threshold: float = 0.5,
        overlap_threshold: float = 0.8,
        min_area_fraction: float = 0.002,
        max_entities: int = 64,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        local_files_only: bool = True,
    ) -> None:
        if model_type is not None and model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {sorted(MODEL_TYPES)}, got {model_type!r}")
        if max_entities < 1:
            raise ValueError(f"max_entities must be >= 1, got {max_entities}")
        if not 0.0 <= min_area_fraction < 1.0:
            raise ValueError(f"min_area_fraction must be in [0, 1), got {min_area_fraction}")
        if not 0.0 <= overlap_threshold < 1.0:
            raise ValueError(f"overlap_threshold must be in [0, 1), got {overlap_threshold}")
        if not 0.0 < mask_threshold < 1.0:
            raise ValueError(f"mask_threshold is a probability in (0, 1), got {mask_threshold}")

        model_given = model is not None
        if model is None:
            from transformers import AutoConfig, AutoModelForUniversalSegmentation

            # The config first: a wrong family fails before gigabytes of weights are read.
            config = _load_pretrained(
                AutoConfig, "EntitySegmenter (config)", model_path_or_id, _weights_hint(),
                local_files_only=local_files_only,
            )
            self._check_family(config.model_type, model_type, model_path_or_id)
            model = _load_pretrained(
                AutoModelForUniversalSegmentation, f"EntitySegmenter ({config.model_type})", model_path_or_id,
                _weights_hint(), config=config, local_files_only=local_files_only,
            )
        else:
            self._check_family(model.config.model_type, model_type, model_path_or_id)
        if processor is None:
            from transformers import AutoImageProcessor

            processor = _load_pretrained(
                AutoImageProcessor, "EntitySegmenter (image processor config)", model_path_or_id,
                _weights_hint() + " Its preprocessor_config.json gives the input size and normalisation.",
                backend="pil", local_files_only=local_files_only,
            )

        if device is None:
            device = _module_device(model) if model_given else None
        self.device = default_device(device)
        self.model = model.to(self.device, dtype=dtype).eval() if dtype is not None else model.to(self.device).eval()
        self.dtype = next(self.model.parameters()).dtype
        self.model_type = self.model.config.model_type
        self._read_preprocessing(processor)

        self.score_threshold = float(score_threshold)
        self.mask_threshold = float(mask_threshold)
        self.overlap_threshold = float(overlap_threshold)
        self.min_area_fraction = float(min_area_fraction)
        self.max_entities = int(max_entities)

    @staticmethod
    def _check_family(found: str, wanted: str | None, where: str | os.PathLike) -> None:
        supported = [t for types in MODEL_TYPES.values() for t in types]
        if found not in supported:
            why = f" ({_WHY_NOT[found]})" if found in _WHY_NOT else ""
            raise ValueError(f"EntitySegmenter: {where} is a {found!r} model{why}; supported: {supported}")
        if wanted is not None and found not in MODEL_TYPES[wanted]:
            raise ValueError(f"EntitySegmenter: {where} is a {found!r} model, not {wanted!r} "
                             f"(which takes {list(MODEL_TYPES[wanted])})")

    def _read_preprocessing(self, processor: BaseImageProcessor) -> None:
        """The preprocessing values of the checkpoint's processor (its ``preprocess`` is not used)."""
        if getattr(processor, "do_split_image", False):
            raise ValueError("EntitySegmenter: this EoMT checkpoint tiles images (do_split_image: semantic "
                             "segmentation); use a panoptic or instance checkpoint")
        self.do_resize = bool(getattr(processor, "do_resize", True))
        size = processor.size
        size = size if isinstance(size, dict) else {k: v for k, v in vars(size).items() if v is not None}
        if "height" in size and "width" in size:
            self.size: dict[str, int | None] = {"height": int(size["height"]), "width": int(size["width"])}
        elif "shortest_edge" in size:
            longest = size.get("longest_edge")
            self.size = {"shortest_edge": int(size["shortest_edge"]), "longest_edge": int(longest) if longest else None}
        else:
            raise ValueError(f"EntitySegmenter: unsupported processor size {size} (expected height/width "
                             "or shortest_edge[/longest_edge])")
        self.size_divisor = int(getattr(processor, "size_divisor", 0) or 0)
        self.resample_mode = _RESAMPLE_MODES.get(int(getattr(processor, "resample", 2)), "bilinear")
        self.rescale_factor = float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 1.0
        normalize = getattr(processor, "do_normalize", True)
        self.image_mean = tuple(float(v) for v in processor.image_mean) if normalize else (0.0, 0.0, 0.0)
        self.image_std = tuple(float(v) for v in processor.image_std) if normalize else (1.0, 1.0, 1.0)
        # EoMT's patch embedding has a fixed grid: every image is padded to the model's square input.
        self.pad_to = _pair(self.model.config.image_size) if self.model_type.startswith("eomt") else None

    # ---- public API ------------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        """int32 ``(H, W)`` entity ids of ``image`` (uint8 ``(H, W, 3)``); 0 = unclaimed."""
        _check_image(image)
        h, w = image.shape[:2]
        pixel_values, resized = self.preprocess(image)
        out = self.model(pixel_values=pixel_values)
        scores = entity_scores(out.class_queries_logits[0])
        keep = torch.nonzero(scores >= self.score_threshold).flatten()
        logits = self._masks_to_frame(out.masks_queries_logits[0][keep].float(), pixel_values.shape[-2:], resized, h, w)
        ids = queries_to_ids(
            scores[keep], logits,
            score_threshold=self.score_threshold,
            mask_threshold=self.mask_threshold,
            overlap_threshold=self.overlap_threshold,
            min_area=math.ceil(self.min_area_fraction * h * w),
            max_entities=self.max_entities,
        )
        logger.info("%s entities: %d queries -> %d above score %.2f -> %d entities", self.model_type,
                    scores.numel(), keep.numel(), self.score_threshold, int(ids.max()))
        return ids

    def input_size(self, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(resized, padded)`` model input sizes ``(height, width)`` for an ``h x w`` image."""
        if not self.do_resize:
            resized = (h, w)
        elif "height" in self.size:
            resized = (self.size["height"], self.size["width"])
        else:
            shortest, longest = self.size["shortest_edge"], self.size["longest_edge"]
            if self.pad_to is not None and longest is None:
                longest = shortest  # EoMT's processor: a missing longest_edge means shortest_edge
            # EoMT checkpoints set shortest_edge == longest_edge: the longer side becomes that size,
            # so the image fits the square input it is then padded to.
            resized = _aspect_size(h, w, shortest, longest)
        if self.size_divisor > 0 and self.pad_to is None:
            d = self.size_divisor
            resized = (math.ceil(resized[0] / d) * d, math.ceil(resized[1] / d) * d)
        padded = resized if self.pad_to is None else self.pad_to
        if padded[0] < resized[0] or padded[1] < resized[1]:
            raise ValueError(f"resized input {resized} does not fit the model's input {padded}")
        return resized, padded

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """uint8 ``(H, W, 3)`` -> normalised ``(1, 3, h', w')`` in the model's dtype, and the resized size.

        Resize (on uint8 values, rounded back to integers as PIL does), pad black at the bottom/right,
        rescale, normalise: the HF processors' order.
        """
        resized, padded = self.input_size(*image.shape[:2])
        x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1)[None].float()
        if resized != tuple(image.shape[:2]):
            antialias = self.resample_mode in ("bilinear", "bicubic")
            kwargs = {"antialias": antialias, "align_corners": False} if antialias else {}
            x = F.interpolate(x, size=resized, mode=self.resample_mode, **kwargs).round_().clamp_(0, 255)
        if padded != resized:
            x = F.pad(x, (0, padded[1] - resized[1], 0, padded[0] - resized[0]))
        mean = torch.tensor(self.image_mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=self.device).view(1, 3, 1, 1)
        return ((x * self.rescale_factor - mean) / std).to(self.dtype), resized

    # ---- steps -----------------------------------------------------------------------------

    @staticmethod
    def _masks_to_frame(logits: torch.Tensor, padded: tuple[int, int], resized: tuple[int, int],
                        h: int, w: int) -> torch.Tensor:
        """Mask logits ``(K, h', w')`` of the padded input -> ``(K, H, W)`` over the image."""
        if logits.shape[0] == 0:
            return logits.new_zeros((0, h, w))
        x = logits[:, None]
        if tuple(padded) != tuple(resized):
            x = F.interpolate(x, size=tuple(padded), mode="bilinear", align_corners=False)
            x = x[..., : resized[0], : resized[1]]
        return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)[:, 0]


def _module_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
