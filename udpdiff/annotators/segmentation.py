"""Video entity-segmentation annotator: first-frame entity masks propagated through the clip by SAM2.

This is the paper's dataset-construction procedure (section 3.1, "Entity Segmentation") and the
annotator behind the "agreement with the segmentation annotator run on the generated RGB" metric:

1. **First-frame entities.** Given by the caller (``first_frame_ids``), or segmented by a
   first-frame entity model (``entity_model``, e.g. :class:`udpdiff.annotators.entities.EntitySegmenter`:
   the paper's EntitySeg prompt), or found automatically with SAM2 prompted by a regular point
   grid (the ``8x8`` / ``12x12`` baselines of the paper's Tab. 9): every grid point
   prompts one mask (the best of SAM2's three by predicted IoU), masks with a low predicted IoU or
   stability score are dropped, near-duplicates are removed by mask-IoU NMS, tiny masks are dropped
   and the survivors are painted into one id map (ids ``1..K`` by decreasing area).
2. **Propagation.** Every entity of the first-frame id map becomes a mask prompt for one SAM2 object
   on frame 0, and ``Sam2VideoModel`` tracks all objects through the video.
3. **Composition.** Per frame, each pixel gets the id of the object with the highest mask logit,
   or ``0`` where no object's logit exceeds the mask threshold.

Output follows CONVENTIONS.md: ``int32 (T, H, W)``, ``0`` = background, positive ids stable over
time, at the input resolution.

Implementation notes (transformers 5.x):

* The grid prompts run through ``Sam2Model`` (its public forward batches many point prompts on one
  image embedding). By default that image model is not loaded separately: it is built on the meta
  device and its parameters are *assigned* from the video model's state dict, so both models share
  the same tensors (the checkpoints ``facebook/sam2.1-hiera-*`` serve both classes).
* Frames are preprocessed here (resize to the model's square input size, bilinear + antialias,
  ImageNet mean/std: what ``Sam2VideoVideoProcessor`` does) instead of through
  ``Sam2VideoProcessor``, because the HF SAM2 image/video processors require torchvision, which is
  not a project dependency. Pass ``processor=`` (or ``load_processor=True``) to use HF's exact
  preprocessing where torchvision is installed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from udpdiff.devices import default_device
from udpdiff.evaluation.consistency import IMAGENET_MEAN, IMAGENET_STD, _load_pretrained
from udpdiff.evaluation.consistency import _weights_hint as _consistency_weights_hint

if TYPE_CHECKING:
    from transformers import Sam2Model, Sam2VideoInferenceSession, Sam2VideoModel, Sam2VideoProcessor

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor
# uint8 (H, W, 3) first frame -> integer (H, W) entity ids, 0 = background (e.g. EntitySegmenter)
FirstFrameSegmenter = Callable[[np.ndarray], np.ndarray]

__all__ = [
    "SegmentationAnnotator",
    "Sam2VideoAnnotator",
    "point_grid",
    "stability_scores",
    "deduplicate_masks",
    "masks_to_ids",
    "compose_ids",
]

DEFAULT_SAM2_ID = "facebook/sam2.1-hiera-large"


@runtime_checkable
class SegmentationAnnotator(Protocol):
    """Maps an RGB video to entity ids.

    ``__call__(video)``: ``video`` uint8 ``(T, H, W, 3)`` -> int32 ``(T, H, W)`` with ``0`` =
    background and ``1..K`` entities whose ids are stable across frames.
    """

    name: str

    def __call__(self, video: np.ndarray) -> np.ndarray: ...


# --------------------------------------------------------------------------------------------
# Pure mask maths (no model)
# --------------------------------------------------------------------------------------------


def point_grid(points_per_side: int, height: int, width: int) -> np.ndarray:
    """Regular ``points_per_side x points_per_side`` grid of prompt points at cell centres.

    Returns float32 ``(points_per_side**2, 2)`` pixel coordinates ``(x, y)`` (x = column), row-major
    (all points of the top row first), as SAM's automatic mask generator lays them out:
    ``x = (i + 0.5) * width / n``, ``y = (j + 0.5) * height / n``.
    """
    n = int(points_per_side)
    if n < 1:
        raise ValueError(f"points_per_side must be >= 1, got {points_per_side}")
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    centres = (np.arange(n, dtype=np.float64) + 0.5) / n
    ys, xs = np.meshgrid(centres * height, centres * width, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=-1).astype(np.float32)


def stability_scores(logits: torch.Tensor, mask_threshold: float = 0.0, offset: float = 1.0) -> torch.Tensor:
    """SAM's stability score of mask logits ``(..., H, W)`` -> ``(...)``.

    IoU of the masks binarised at ``mask_threshold + offset`` and at ``mask_threshold - offset``
    (the former is a subset of the latter, so IoU = ratio of areas). An empty mask scores 0.
    """
    inter = (logits > mask_threshold + offset).flatten(-2).sum(-1, dtype=torch.int64)
    union = (logits > mask_threshold - offset).flatten(-2).sum(-1, dtype=torch.int64)
    return torch.where(union > 0, inter.double() / union.clamp_min(1).double(), 0.0).float()


def _as_bool_masks(masks: ArrayLike) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(masks)) if isinstance(masks, np.ndarray) else masks
    if t.ndim != 3:
        raise ValueError(f"expected masks of shape (N, H, W), got {tuple(t.shape)}")
    return t if t.dtype == torch.bool else t != 0


def deduplicate_masks(
    masks: ArrayLike,
    scores: ArrayLike,
    *,
    iou_threshold: float = 0.7,
    min_area: int = 0,
) -> np.ndarray:
    """Greedy mask-IoU NMS; returns the kept indices ordered by decreasing area.

    Masks smaller than ``min_area`` pixels are dropped first (an empty mask is always dropped).
    The rest are visited by decreasing score (ties: larger area, then lower index) and a mask is
    kept unless its IoU with an already kept mask exceeds ``iou_threshold``. The result (int64
    indices into ``masks``) is sorted by decreasing area, ties by index, so ids assigned in this
    order are deterministic.
    """
    m = _as_bool_masks(masks)
    s = torch.as_tensor(np.asarray(scores) if isinstance(scores, np.ndarray) else scores).double().reshape(-1).cpu()
    if s.numel() != m.shape[0]:
        raise ValueError(f"{m.shape[0]} masks but {s.numel()} scores")
    flat = m.flatten(1)
    area = flat.sum(1, dtype=torch.int64).cpu()
    valid = area >= max(int(min_area), 1)
    cand = torch.nonzero(valid).flatten()
    if cand.numel() == 0:
        return np.zeros(0, dtype=np.int64)
    # Visiting order: score desc, then area desc, then index (np.lexsort: last key is primary).
    order = np.lexsort((cand.numpy(), -area[cand].numpy(), -s[cand].numpy()))
    cand = cand[torch.from_numpy(order)]
    # All pairwise intersections in one matmul (float32 counts are exact below 2**24 pixels, which
    # covers every frame size we annotate; float64 would be exact to 2**53 but is slow on GPU).
    f = flat[cand.to(flat.device)].to(torch.float64 if flat.shape[1] >= 2**24 else torch.float32)
    inter = (f @ f.T).double().cpu()
    a = area[cand].double()
    iou = inter / (a[:, None] + a[None, :] - inter).clamp_min(1.0)
    keep = torch.ones(cand.numel(), dtype=torch.bool)
    # Greedy NMS is sequential by definition; each step is a vectorised row operation.
    for i in range(cand.numel()):
        if keep[i]:
            suppress = iou[i] > iou_threshold
            suppress[: i + 1] = False
            keep &= ~suppress
    kept = cand[keep]
    by_area = np.lexsort((kept.numpy(), -area[kept].numpy()))
    return kept.numpy()[by_area].astype(np.int64)


def masks_to_ids(masks: ArrayLike, *, min_area: int = 0, max_entities: int | None = None) -> np.ndarray:
    """Paint binary masks ``(K, H, W)`` into one int32 id map ``(H, W)``.

    Masks are painted by decreasing area so that a smaller mask overlapping a larger one (a part
    inside a whole, an object in front of a background region) stays visible. Entities whose
    *visible* area is below ``min_area`` (or empty), and beyond the ``max_entities`` largest, are
    removed and the rest repainted, so their pixels go to the mask underneath rather than becoming
    holes. Ids ``1..K'`` are assigned by decreasing visible area (ties: lower input index).
    """
    m = _as_bool_masks(masks)
    k, h, w = m.shape
    min_area = max(int(min_area), 1)
    limit = k if max_entities is None else max(int(max_entities), 0)
    area = m.flatten(1).sum(1, dtype=torch.int64).cpu().numpy()
    paint_order = np.lexsort((np.arange(k), -area))  # largest first, ties by index
    active = paint_order[area[paint_order] >= min_area]
    painted = torch.zeros((h, w), dtype=torch.int64, device=m.device)
    # Removing an entity only grows the visible areas of the others, so this settles in at most K
    # rounds (in practice one or two).
    while active.size:
        # "Last painter wins" without a per-mask loop: reverse the painting order and take, per
        # pixel, the first mask that covers it (argmax of a boolean stack returns the first True).
        reverse = torch.from_numpy(active[::-1].copy()).to(m.device)
        stack = m[reverse]
        painted = torch.where(stack.any(0), reverse[stack.to(torch.uint8).argmax(0)] + 1, 0)
        visible = torch.bincount(painted.flatten(), minlength=k + 1)[1:].cpu().numpy()[active]
        drop = visible < min_area
        if not drop.any() and active.size > limit:
            # Too many entities: drop the smallest visible ones (ties: the later painted).
            rank = np.lexsort((np.arange(active.size), -visible))
            drop[rank[limit:]] = True
        if not drop.any():
            break
        active = active[~drop]
    if not active.size:
        painted.zero_()
    return _relabel_by_area(painted.cpu().numpy())


def _relabel_by_area(ids: np.ndarray) -> np.ndarray:
    """Renumber the positive ids present to ``1..K`` by decreasing area (ties: smaller old id first)."""
    labels, counts = np.unique(ids[ids > 0], return_counts=True)
    old = labels[np.lexsort((labels, -counts))]  # old[i] becomes id i + 1
    out = np.zeros(ids.shape, dtype=np.int32)
    if old.size:
        # searchsorted maps every pixel's old id to its new id in one vectorised pass.
        sorter = np.argsort(old)
        pos = np.searchsorted(old[sorter], ids).clip(0, old.size - 1)
        hit = (old[sorter][pos] == ids) & (ids > 0)
        out[hit] = (sorter + 1).astype(np.int32)[pos[hit]]
    return out


def compose_ids(
    logits: ArrayLike,
    object_ids: Sequence[int] | None = None,
    *,
    mask_threshold: float = 0.0,
) -> np.ndarray:
    """Compose per-object mask logits ``(..., K, H, W)`` into int32 id maps ``(..., H, W)``.

    Each pixel gets the id of the object with the highest logit if that logit exceeds
    ``mask_threshold``, else ``0``. ``object_ids[k]`` is the id of channel ``k`` (default
    ``k + 1``). Ties go to the lower channel index.
    """
    t = torch.from_numpy(np.asarray(logits)) if isinstance(logits, np.ndarray) else logits
    if t.ndim < 3:
        raise ValueError(f"expected logits of shape (..., K, H, W), got {tuple(t.shape)}")
    k = t.shape[-3]
    ids = torch.arange(1, k + 1) if object_ids is None else torch.as_tensor(list(object_ids), dtype=torch.int64)
    if ids.numel() != k:
        raise ValueError(f"{k} logit channels but {ids.numel()} object ids")
    if k == 0:
        return np.zeros(tuple(t.shape[:-3]) + tuple(t.shape[-2:]), dtype=np.int32)
    best, arg = t.float().max(dim=-3)
    out = torch.where(best > mask_threshold, ids.to(arg.device)[arg], 0)
    return out.to(torch.int32).cpu().numpy()


# --------------------------------------------------------------------------------------------
# SAM2 annotator
# --------------------------------------------------------------------------------------------


def _check_video(video: np.ndarray) -> None:
    if not isinstance(video, np.ndarray):
        raise TypeError(f"video must be a numpy array, got {type(video).__name__}")
    if video.dtype != np.uint8:
        raise TypeError(f"video must be uint8 (T, H, W, 3) RGB, got dtype {video.dtype}")
    if video.ndim != 4 or video.shape[-1] != 3 or min(video.shape[:3]) < 1:
        raise ValueError(f"video must have shape (T, H, W, 3) with T, H, W >= 1, got {video.shape}")


def _weights_hint() -> str:
    return _consistency_weights_hint("Sam2VideoAnnotator", DEFAULT_SAM2_ID)


class Sam2VideoAnnotator:
    """Entity ids of a video: first-frame entity masks propagated by SAM2 (see the module docstring).

    Args:
        model_path_or_id: HF id or local folder of a SAM2 checkpoint loadable as ``Sam2VideoModel``
            (default ``facebook/sam2.1-hiera-large``).
        model: an already-built ``Sam2VideoModel``; overrides loading.
        processor: optional ``Sam2VideoProcessor`` used only to preprocess frames (HF's exact
            resize/normalise; needs torchvision). Default: the equivalent built-in preprocessing.
        load_processor: load ``Sam2VideoProcessor`` from ``model_path_or_id`` (ignored when
            ``processor`` is given).
        image_model: optional ``Sam2Model`` for the point-grid step; default: one sharing the
            video model's weights (no second copy in memory).
        entity_model: optional first-frame segmenter, uint8 ``(H, W, 3)`` -> integer ``(H, W)`` ids
            (e.g. :class:`udpdiff.annotators.entities.EntitySegmenter`, the paper's EntitySeg step).
            When set, frame 0's entities come from it instead of the point grid, and the grid options
            below are unused.
        points_per_side: grid size of the automatic first-frame prompts (paper Tab. 9: 8 or 12).
        points_per_batch: grid points decoded per forward pass of the mask decoder.
        pred_iou_thresh: drop grid masks whose predicted IoU is below this.
        stability_score_thresh, stability_score_offset: drop grid masks whose stability score
            (:func:`stability_scores`) is below the threshold.
        nms_iou_thresh: mask-IoU above which the lower-scored of two grid masks is dropped.
        min_area_fraction: grid entities smaller than this fraction of the frame are dropped
            (the paper's post-processing removes such fragments).
        max_entities: at most this many (largest) grid entities are tracked. These grid options
            do not touch explicit ``first_frame_ids`` or the entity model's map, which are tracked
            as given (the entity model has its own ``min_area_fraction`` and ``max_entities``).
        mask_threshold: logit threshold of SAM2's masks (0 = probability 0.5).
        device: where the models run; default: the given model's device, else CUDA when available.
        dtype: model/session dtype (e.g. ``torch.bfloat16`` on GPU); default: the model's.
        local_files_only: never contact the hub (default), as everywhere in this project.

    Raises:
        MetricModelUnavailable: the weights (or the requested processor) cannot be loaded.
    """

    name = "sam2_video"

    def __init__(
        self,
        model_path_or_id: str | os.PathLike = DEFAULT_SAM2_ID,
        *,
        model: Sam2VideoModel | None = None,
        processor: Sam2VideoProcessor | None = None,
        load_processor: bool = False,
        image_model: Sam2Model | None = None,
        entity_model: FirstFrameSegmenter | None = None,
        points_per_side: int = 8,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.8,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        nms_iou_thresh: float = 0.7,
        min_area_fraction: float = 0.002,
        max_entities: int = 64,
        mask_threshold: float = 0.0,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        local_files_only: bool = True,
    ) -> None:
        if points_per_side < 1 or points_per_batch < 1:
            raise ValueError("points_per_side and points_per_batch must be >= 1")
        if max_entities < 1:
            raise ValueError(f"max_entities must be >= 1, got {max_entities}")
        if not 0.0 <= min_area_fraction < 1.0:
            raise ValueError(f"min_area_fraction must be in [0, 1), got {min_area_fraction}")

        model_given = model is not None
        if model is None:
            from transformers import Sam2VideoModel

            model = _load_pretrained(
                Sam2VideoModel,
                "Sam2VideoAnnotator (SAM2 video)",
                model_path_or_id,
                _weights_hint(),
                local_files_only=local_files_only,
            )
        if processor is None and load_processor:
            from transformers import Sam2VideoProcessor

            # Same failure handling as the weights: a missing preprocessor config or a missing
            # torchvision both mean "this annotator cannot run as configured".
            processor = _load_pretrained(
                Sam2VideoProcessor,
                "Sam2VideoAnnotator (SAM2 video processor)",
                model_path_or_id,
                _weights_hint() + " The HF SAM2 processors also need torchvision; or leave load_processor=False.",
                local_files_only=local_files_only,
            )

        if device is None:
            # A caller's model stays where it is; a freshly loaded one goes to the GPU if there is one.
            device = _module_device(model) if model_given else None
        self.device = default_device(device)
        self.model = model.to(self.device, dtype=dtype).eval() if dtype is not None else model.to(self.device).eval()
        self.dtype = next(self.model.parameters()).dtype
        size = self.model.config.image_size  # square model input; an int in every SAM2 checkpoint
        self.image_size = int(size[0] if isinstance(size, (list, tuple)) else size)
        self.processor = processor
        if processor is not None:
            size = processor.video_processor.size
            if (size["height"], size["width"]) != (self.image_size, self.image_size):
                raise ValueError(f"processor size {size} does not match the model's image_size {self.image_size}")
        self._image_model = image_model.to(self.device, dtype=self.dtype).eval() if image_model is not None else None
        self.entity_model = entity_model

        self.points_per_side = int(points_per_side)
        self.points_per_batch = int(points_per_batch)
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_score_offset = float(stability_score_offset)
        self.nms_iou_thresh = float(nms_iou_thresh)
        self.min_area_fraction = float(min_area_fraction)
        self.max_entities = int(max_entities)
        self.mask_threshold = float(mask_threshold)

    # ---- public API ------------------------------------------------------------------------

    def __call__(self, video: np.ndarray, first_frame_ids: np.ndarray | None = None) -> np.ndarray:
        """Entity ids ``int32 (T, H, W)`` of ``video`` (uint8 ``(T, H, W, 3)``).

        ``first_frame_ids``: optional integer ``(H, W)`` entity map of frame 0 (e.g. EntitySeg's);
        its positive ids are tracked and kept as they are (so the output's ids are a subset of
        them). Without it, frame 0 is segmented by the entity model if there is one, else with the
        point grid, and the entities are numbered ``1..K`` (contiguous, by decreasing first-frame area).
        """
        _check_video(video)
        h, w = video.shape[1:3]
        pixel_values = self._preprocess(video)
        automatic = first_frame_ids is None
        if automatic:
            first_frame_ids = self._first_frame_entities(video[0], pixel_values[0])
        else:
            first_frame_ids = self._check_first_frame_ids(first_frame_ids, h, w)

        ids = self._propagate(video, pixel_values, first_frame_ids)
        if automatic:
            # An entity can vanish in the low-resolution round trip (a thin sliver); keep 1..K
            # contiguous without changing the relative order.
            ids = _compact_ids(ids)
        return ids

    def first_frame_entities(self, frame: np.ndarray) -> np.ndarray:
        """Step 1 alone: int32 ``(H, W)`` entity ids of one uint8 ``(H, W, 3)`` frame, from the entity
        model if there is one, else from the point grid."""
        if not isinstance(frame, np.ndarray) or frame.ndim != 3:
            raise ValueError(f"expected one uint8 (H, W, 3) frame, got {getattr(frame, 'shape', type(frame))}")
        _check_video(frame[None])
        if self.entity_model is not None:
            return self._first_frame_entities(frame, None)
        return self._first_frame_entities(frame, self._preprocess(frame[None])[0])

    # ---- steps -----------------------------------------------------------------------------

    def _first_frame_entities(self, frame: np.ndarray, pixel_values: torch.Tensor | None) -> np.ndarray:
        """Step 1: the entity model's map of ``frame`` if there is one, else the point grid's on its
        preprocessed ``pixel_values``."""
        h, w = frame.shape[:2]
        if self.entity_model is None:
            return self._grid_entities(pixel_values, h, w)
        raw = self.entity_model(frame)
        try:
            ids = self._check_first_frame_ids(raw, h, w)
        except (TypeError, ValueError) as err:
            raise type(err)(f"the entity model's first-frame map is malformed: {err}") from err
        logger.info("first-frame entity model: %d entities", int(np.count_nonzero(np.unique(ids))))
        return ids

    def _min_area(self, h: int, w: int) -> int:
        return int(np.ceil(self.min_area_fraction * h * w))

    def _preprocess(self, video: np.ndarray) -> torch.Tensor:
        """uint8 ``(T, H, W, 3)`` -> normalised ``(T, 3, S, S)`` in the model's dtype on ``self.device``."""
        if self.processor is not None:
            # Exactly what Sam2VideoProcessor.init_video_session does with a whole video.
            out = self.processor.video_processor(videos=video, device=self.device, return_tensors="pt")
            return out.pixel_values_videos[0].to(self.device, self.dtype)
        size = (self.image_size, self.image_size)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        chunks = []
        # Chunks bound the float copy of full-resolution frames (49 frames of 720p are 0.5 GB).
        for i in range(0, video.shape[0], 16):
            x = torch.from_numpy(np.ascontiguousarray(video[i : i + 16])).to(self.device)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            chunks.append(((x - mean) / std).to(self.dtype))
        return torch.cat(chunks, 0)

    def _check_first_frame_ids(self, ids: np.ndarray, h: int, w: int) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.shape != (h, w):
            raise ValueError(f"first_frame_ids must have the frame's shape {(h, w)}, got {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"first_frame_ids must be an integer array, got {ids.dtype}")
        if ids.size and ids.min() < 0:
            raise ValueError("first_frame_ids must be >= 0 (0 = background)")
        return ids.astype(np.int32, copy=False)

    @property
    def image_model(self) -> Sam2Model:
        """``Sam2Model`` for the point-grid prompts, sharing the video model's parameters."""
        if self._image_model is None:
            self._image_model = _image_model_sharing_weights(self.model)
        return self._image_model

    @torch.inference_mode()
    def _grid_entities(self, pixel_values: torch.Tensor, h: int, w: int) -> np.ndarray:
        """Step 1: point-grid prompts on one preprocessed frame ``(3, S, S)`` -> int32 ``(H, W)`` ids."""
        image_model = self.image_model
        embeddings = image_model.get_image_embeddings(pixel_values[None])
        points = torch.from_numpy(point_grid(self.points_per_side, h, w)).to(self.device)
        # Pixel (x, y) -> the model's square input frame (what Sam2Processor's normalisation does).
        points = points * torch.tensor([self.image_size / w, self.image_size / h], device=self.device)

        masks, scores = [], []
        for i in range(0, points.shape[0], self.points_per_batch):
            chunk = points[i : i + self.points_per_batch]
            out = image_model(
                image_embeddings=embeddings,
                # float32 even for a bf16 model: the prompt encoder normalises the coordinates
                # before casting them to its own dtype (as with Sam2Processor's outputs).
                input_points=chunk[None, :, None, :],
                input_labels=torch.ones(1, chunk.shape[0], 1, dtype=torch.long, device=self.device),
                multimask_output=True,
            )
            iou = out.iou_scores[0].float()  # (n, 3)
            best = iou.argmax(-1)
            rows = torch.arange(chunk.shape[0], device=self.device)
            low_res = out.pred_masks[0][rows, best].float()  # (n, h', w') best of three per point
            logits = F.interpolate(low_res[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            stability = stability_scores(logits, self.mask_threshold, self.stability_score_offset)
            ok = (iou[rows, best] >= self.pred_iou_thresh) & (stability >= self.stability_score_thresh)
            masks.append((logits > self.mask_threshold)[ok].cpu())
            scores.append(iou[rows, best][ok].cpu())

        masks_t, scores_t = torch.cat(masks), torch.cat(scores)
        min_area = self._min_area(h, w)
        keep = deduplicate_masks(masks_t, scores_t, iou_threshold=self.nms_iou_thresh, min_area=min_area)
        ids = masks_to_ids(masks_t[torch.from_numpy(keep)], min_area=min_area, max_entities=self.max_entities)
        logger.info(
            "SAM2 point grid %dx%d: %d points -> %d after score filters -> %d after NMS -> %d entities",
            self.points_per_side, self.points_per_side, points.shape[0], masks_t.shape[0], keep.size, int(ids.max()),
        )
        return ids

    def _new_session(self, video: np.ndarray, pixel_values: torch.Tensor) -> Sam2VideoInferenceSession:
        from transformers import Sam2VideoInferenceSession

        return Sam2VideoInferenceSession(
            video=pixel_values,
            video_height=video.shape[1],
            video_width=video.shape[2],
            inference_device=self.device,
            inference_state_device=self.device,
            video_storage_device=self.device,
            dtype=self.dtype,
        )

    def _add_mask_prompts(self, session: Sam2VideoInferenceSession, ids: np.ndarray, object_ids: list[int]) -> None:
        """One mask prompt per object on frame 0 (what ``Sam2VideoProcessor.add_inputs_to_inference_session``
        does for masks: resize to the model input size, bilinear + antialias, binarise at 0.5)."""
        obj = torch.tensor(object_ids, device=self.device)[:, None, None]
        masks = torch.from_numpy(ids).to(self.device)[None] == obj
        size = (self.image_size, self.image_size)
        resized = F.interpolate(masks[:, None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        resized = (resized >= 0.5).to(self.dtype)
        for k, obj_id in enumerate(object_ids):
            obj_idx = session.obj_id_to_idx(obj_id)
            session.add_mask_inputs(obj_idx, 0, resized[k : k + 1])
            session.remove_point_inputs(obj_idx, 0)
        session.obj_with_new_inputs = list(object_ids)

    @torch.inference_mode()
    def _propagate(self, video: np.ndarray, pixel_values: torch.Tensor, first_frame_ids: np.ndarray) -> np.ndarray:
        """Steps 2 and 3: track every first-frame entity and compose per-frame id maps."""
        t, h, w = video.shape[:3]
        object_ids = [int(i) for i in np.unique(first_frame_ids) if i > 0]
        out = np.zeros((t, h, w), dtype=np.int32)
        if not object_ids:
            logger.warning("Sam2VideoAnnotator: no first-frame entities; returning an all-background video")
            return out
        session = self._new_session(video, pixel_values)
        self._add_mask_prompts(session, first_frame_ids, object_ids)

        # Propagation is sequential (each frame reads the memory of the previous ones); each step
        # handles all objects and is composed right away so only one frame of logits is alive.
        for step in self.model.propagate_in_video_iterator(session, start_frame_idx=0):
            logits = F.interpolate(step.pred_masks.float(), size=(h, w), mode="bilinear", align_corners=False)
            out[step.frame_idx] = compose_ids(logits[:, 0], step.object_ids, mask_threshold=self.mask_threshold)
        return out


def _compact_ids(ids: np.ndarray) -> np.ndarray:
    """Renumber the positive ids present to ``1..K`` keeping their order."""
    present = np.unique(ids)
    lut = np.zeros(int(present.max()) + 1, dtype=np.int32)
    positive = present[present > 0]
    lut[positive] = np.arange(1, positive.size + 1, dtype=np.int32)
    return lut[ids]


def _module_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _image_model_sharing_weights(video_model: Sam2VideoModel) -> Sam2Model:
    """A ``Sam2Model`` whose parameters *are* the video model's (same tensors, no copy).

    The image model is a strict subset of the video model (vision encoder, prompt encoder, mask
    decoder, shared positional embedding, no-memory embedding) under the same parameter names, so
    building it on the meta device and assigning the video model's tensors costs no memory.
    """
    from transformers import Sam2Config, Sam2Model

    vcfg = video_model.config
    cfg = Sam2Config(
        vision_config=vcfg.vision_config.to_dict(),
        prompt_encoder_config=vcfg.prompt_encoder_config.to_dict(),
        mask_decoder_config=vcfg.mask_decoder_config.to_dict(),
        initializer_range=vcfg.initializer_range,
    )
    cfg._attn_implementation = vcfg._attn_implementation
    with torch.device("meta"):
        image_model = Sam2Model(cfg)
    wanted = image_model.state_dict().keys()
    source = video_model.state_dict()
    missing = [k for k in wanted if k not in source]
    if missing:
        raise RuntimeError(
            f"cannot build Sam2Model from this Sam2VideoModel: parameters {missing[:5]} are missing; "
            "pass image_model=Sam2Model.from_pretrained(...) to Sam2VideoAnnotator instead"
        )
    image_model.load_state_dict({k: source[k] for k in wanted}, strict=True, assign=True)
    leftover = [n for n, t in [*image_model.named_parameters(), *image_model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"Sam2Model tensors left uninitialised after weight sharing: {leftover[:5]}")
    return image_model.eval()
