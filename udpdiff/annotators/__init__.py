"""Dense annotators run on RGB videos: pseudo ground truth for the evaluation (paper Tab 3) and
labels for curation. Depth: DepthCrafter, Depth Anything V2; entity segmentation: SAM2 video,
prompted on the first frame by an entity model (Mask2Former / EoMT, paper §3.1) or by point grids.

Each maps a uint8 ``(T, H, W, 3)`` video to ``(T, H, W)`` normalised disparity (float32, 1 = near)
or entity ids (int32, 0 = background), per CONVENTIONS.md. Models load from a local folder or hub
id; missing weights raise :class:`udpdiff.evaluation.consistency.MetricModelUnavailable`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from udpdiff.config import AnnotatorParams, EntityModelParams


def build_annotator(ref: AnnotatorParams, device: str | torch.device | None = None
                    ) -> Callable[[np.ndarray], np.ndarray]:
    """The annotator ``ref`` (params.yaml) names, loaded from its local path or hub id, with
    ``ref.options`` as keyword arguments of its class (a ``dtype`` given by name, e.g. ``bfloat16``).
    SAM2 with ``ref.entities`` gets that first-frame entity model (:func:`build_entity_model`)."""
    kwargs = _options(ref.options)
    if ref.type == "depth-anything-v2":
        from udpdiff.annotators.depth import DepthAnythingV2Annotator

        cls = DepthAnythingV2Annotator
    elif ref.type == "depthcrafter":
        from udpdiff.annotators.depth import DepthCrafterAnnotator

        cls = DepthCrafterAnnotator
        if ref.svd_path:
            kwargs["svd_path_or_id"] = ref.svd_path
    elif ref.type == "sam2":
        from udpdiff.annotators.segmentation import Sam2VideoAnnotator

        cls = Sam2VideoAnnotator
        if ref.entities is not None:
            kwargs["entity_model"] = build_entity_model(ref.entities, device)
    else:
        raise ValueError(f"unknown annotator type {ref.type!r}")
    try:
        return cls(ref.path, device=device, **kwargs)
    except TypeError as err:  # an option the class does not take: say which, and where it came from
        raise ValueError(f"annotator {ref.type} ({ref.path}): bad options {ref.options}: {err}") from err


def build_entity_model(ref: EntityModelParams, device: str | torch.device | None = None
                       ) -> Callable[[np.ndarray], np.ndarray]:
    """The first-frame entity segmenter ``ref`` (an annotator's ``entities:``) names, with ``ref.options``
    as keyword arguments of :class:`udpdiff.annotators.entities.EntitySegmenter`."""
    from udpdiff.annotators.entities import EntitySegmenter

    kwargs = _options(ref.options)
    try:
        return EntitySegmenter(ref.path, model_type=ref.type, device=device, **kwargs)
    except TypeError as err:
        raise ValueError(f"entity model {ref.type} ({ref.path}): bad options {ref.options}: {err}") from err


def _options(options: dict) -> dict:
    kwargs = dict(options)
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = _DTYPES[kwargs["dtype"]] if kwargs["dtype"] in _DTYPES else _bad_dtype(kwargs["dtype"])
    return kwargs


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _bad_dtype(name: str) -> torch.dtype:
    raise ValueError(f"annotator option dtype must be one of {sorted(_DTYPES)}, got {name!r}")


class LazyAnnotator:
    """Builds the annotator on its first call: a curation run whose clips all come with precomputed
    maps never needs (or loads) the annotator's weights."""

    def __init__(self, ref: AnnotatorParams, device: str | torch.device | None = None) -> None:
        self.ref, self.device = ref, device
        self.name = ref.type
        self._annotator: Callable[[np.ndarray], np.ndarray] | None = None

    def __call__(self, video: np.ndarray) -> np.ndarray:
        if self._annotator is None:
            self._annotator = build_annotator(self.ref, self.device)
        return self._annotator(video)


__all__ = ["LazyAnnotator", "build_annotator", "build_entity_model"]
