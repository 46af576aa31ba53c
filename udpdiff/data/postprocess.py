"""Post-processing of propagated entity-id videos (paper §3.1: "We also post-process these frames to
remove small holes and the empty area").

SAM2 propagation leaves two kinds of defects in an ``int (T, H, W)`` id video (0 = no entity): small
holes inside an entity where its mask dipped, and unclaimed area no mask covers; it also leaves
specks, tiny fragments of an entity far from its body. :func:`postprocess_ids` repairs each frame:

1. **holes**: a connected region of unclaimed pixels (id 0) that does not touch the frame border,
   is bordered by one entity only and has at most ``max_hole_fraction`` of the frame's pixels takes
   that entity's id;
2. **small regions**: a connected region of an entity with fewer than ``min_region_fraction`` of the
   frame's pixels is given to the id most of its border touches (``small_regions: neighbour``) or
   to 0 (``background``);
3. **unclaimed pixels** (``unclaimed: nearest``): every remaining 0 pixel takes the id of the nearest
   entity pixel (Euclidean distance transform); ``background`` leaves them 0.

The three steps repeat until the frame no longer changes (a fixed point, so applying the function
again changes nothing). Ids are never renumbered or created: a pixel only ever takes an id already
present in its frame (or 0), so an entity keeps its id in every frame it appears in. Connectivity is
8-neighbour throughout. Pure numpy / scipy; no model.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from udpdiff.data.curation_params import SegPostprocessParams

logger = logging.getLogger(__name__)

_EIGHT = np.ones((3, 3), bool)
#: Passes of the three steps before giving up on a fixed point (two suffice in practice).
MAX_PASSES = 8


def _regions(frame: np.ndarray, value: int) -> list[tuple[np.ndarray, tuple[slice, slice]]]:
    """The 8-connected regions of ``frame == value``: (mask inside the padded box, padded box)."""
    labels, n = ndimage.label(frame == value, structure=_EIGHT)
    out = []
    h, w = frame.shape
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        padded = (slice(max(box[0].start - 1, 0), min(box[0].stop + 1, h)),
                  slice(max(box[1].start - 1, 0), min(box[1].stop + 1, w)))
        out.append((labels[padded] == k, padded))
    return out


def _ring(mask: np.ndarray) -> np.ndarray:
    """Pixels 8-adjacent to ``mask`` and not in it."""
    return ndimage.binary_dilation(mask, structure=_EIGHT) & ~mask


def _touches_border(box: tuple[slice, slice], mask: np.ndarray, shape: tuple[int, int]) -> bool:
    rows = np.flatnonzero(mask.any(axis=1)) + box[0].start
    cols = np.flatnonzero(mask.any(axis=0)) + box[1].start
    return rows[0] == 0 or cols[0] == 0 or rows[-1] == shape[0] - 1 or cols[-1] == shape[1] - 1


def fill_holes(frame: np.ndarray, max_area: int) -> np.ndarray:
    """Step 1: unclaimed regions of at most ``max_area`` pixels, off the border and bordered by a
    single entity, take that entity's id."""
    out = frame.copy()
    if max_area <= 0:
        return out
    for mask, box in _regions(frame, 0):
        if mask.sum() > max_area or _touches_border(box, mask, frame.shape):
            continue
        around = np.unique(frame[box][_ring(mask)])
        if around.size == 1 and around[0] > 0:
            out[box][mask] = around[0]
    return out


def drop_small_regions(frame: np.ndarray, min_area: int, to: str = "neighbour") -> np.ndarray:
    """Step 2: entity regions smaller than ``min_area`` pixels go to 0 (``to="background"``) or to
    the id most of their border touches (``to="neighbour"``; ties to the smaller id), counting only
    border pixels that are not themselves in a small region: two specks never swap ids, so the
    steps reach a fixed point."""
    out = frame.copy()
    if min_area <= 1:
        return out
    small = [(mask, box) for value in np.unique(frame) if value != 0
             for mask, box in _regions(frame, int(value)) if mask.sum() < min_area]
    if not small:
        return out
    in_small = np.zeros(frame.shape, bool)
    for mask, box in small:
        in_small[box] |= mask
    for mask, box in small:
        target = 0
        if to == "neighbour":
            ring = _ring(mask) & ~in_small[box]
            if ring.any():
                ids, counts = np.unique(frame[box][ring], return_counts=True)
                target = int(ids[np.argmax(counts)])
        out[box][mask] = target
    return out


def assign_unclaimed(frame: np.ndarray) -> np.ndarray:
    """Step 3 (``nearest``): every 0 pixel takes the id of the nearest entity pixel."""
    empty = frame == 0
    if not empty.any() or empty.all():
        return frame.copy()
    _, (rows, cols) = ndimage.distance_transform_edt(empty, return_indices=True)
    return frame[rows, cols]


def postprocess_frame(frame: np.ndarray, params: SegPostprocessParams) -> np.ndarray:
    """Holes, small regions and unclaimed pixels of one ``(H, W)`` frame, repeated to a fixed point."""
    h, w = frame.shape
    max_hole = int(np.floor(params.max_hole_fraction * h * w))
    min_region = int(np.ceil(params.min_region_fraction * h * w))
    current = frame
    for _ in range(MAX_PASSES):
        new = fill_holes(current, max_hole)
        new = drop_small_regions(new, min_region, params.small_regions)
        if params.unclaimed == "nearest":
            new = assign_unclaimed(new)
        if np.array_equal(new, current):
            return new
        current = new
    logger.warning("segmentation post-processing did not settle in %d passes on a %dx%d frame", MAX_PASSES, h, w)
    return current


def postprocess_ids(ids: np.ndarray, params: SegPostprocessParams) -> np.ndarray:
    """Post-process an entity-id video ``(T, H, W)`` (or one ``(H, W)`` frame) of non-negative
    integers, frame by frame; returns ``int32`` of the same shape. Ids are kept as they are."""
    ids = np.asarray(ids)
    if ids.ndim not in (2, 3) or 0 in ids.shape:
        raise ValueError(f"entity ids must be a non-empty (T, H, W) or (H, W) array, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"entity ids must be integers, got {ids.dtype}")
    if (ids < 0).any():
        raise ValueError("entity ids must be >= 0 (0 = no entity)")
    video = ids.astype(np.int32)
    frames = video[None] if video.ndim == 2 else video
    out = np.stack([postprocess_frame(f, params) for f in frames])
    return out[0] if ids.ndim == 2 else out


__all__ = ["assign_unclaimed", "drop_small_regions", "fill_holes", "postprocess_frame",
           "postprocess_ids"]
