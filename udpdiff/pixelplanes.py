"""Pixelplanes: colour encodings of dense predictions, so a video VAE/diffusion model can treat them
as ordinary RGB video (UDPDiff paper, section 3.2 and Appendix C).

Representation
--------------
* **Entity segmentation.** An entity-id video ``(T, H, W)`` (``0`` = background) becomes a ``uint8``
  colormap ``(T, H, W, 3)``. Every entity gets one colour whose R, G, B channels are drawn
  independently and uniformly from ``[0, 255]`` (``np.random.default_rng(seed)``); colours are
  unique and differ from the background colour ``BACKGROUND_COLOR``. The colour is a property of
  the entity, not of its position, so it is the same in every frame (temporal stability) and
  motion does not change it -- unlike the location-aware colormap of UniGS, kept here as a
  baseline (:func:`encode_location_aware`). The id -> colour mapping is a :class:`Palette`, which
  can be saved (``to_dict``) beside a clip so that decoding is exact.
* **Depth.** Depth is normalised disparity in ``[0, 1]`` (``1`` = nearest, ``0`` = farthest). A
  value ``v`` is drawn with matplotlib's ``"Spectral"`` colormap at position ``v`` (as Marigold
  visualises depth), i.e. **near (1) -> Spectral(1.0), a violet-blue (94, 79, 162); far (0) ->
  Spectral(0.0), a dark red (158, 1, 66)**; the middle (0.5) is pale yellow. Note that Marigold
  colours *depth* (0 = near), so its near pixels are red; ours colour *disparity*, so near pixels
  are blue. The curve is represented by ``DEPTH_LUT_SIZE`` = 256 colours sampled at ``i / 255``
  (:func:`depth_lut`); encoding interpolates linearly between adjacent samples (continuous, not
  256 bins) and rounds to a neighbouring ``uint8`` colour chosen so that it decodes back to
  within half a LUT step (the uint8 curve folds back at its yellow apex; see
  :func:`_depth_encode_table`).

Decoding generated colormaps
----------------------------
Generated colormaps are noisy (VAE and diffusion). Segmentation is decoded by nearest palette
colour within a tolerance, or -- without a palette -- by clustering the colours of the *whole
video* at once, so that ids agree across frames. Depth is decoded either as in the paper's
Appendix C (nearest of the 256 samples -> ``i / 255``) or by projecting each colour onto the
piecewise-linear curve through the samples (``method="continuous"``), which removes most of
the ``1/510`` quantisation error (noise-free mean error 2.0e-4 vs 9.8e-4). Under colour noise the
two are close, and near the yellow apex, where the two branches of the Spectral curve pass
within a few RGB units of each other, noise can flip a pixel to the other branch (errors up to
~0.1 at noise sigma 3); that is a property of the colormap, not of the decoder.

Backends
--------
Every public function takes numpy arrays or torch tensors; given torch it computes with torch on
the tensor's device and returns torch there. Both backends run the same algorithm, and all
decisions (nearest colour, clustering) are computed with integer-exact arithmetic, so the numpy
and torch results are identical. Work is vectorised over pixels; pixels are first reduced to their
unique colours (a generated video has far fewer distinct colours than pixels), and the remaining
distance computations are chunked to bound memory. Cost of the nearest-colour steps is
O(unique colours x palette size).
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "BACKGROUND_COLOR",
    "DEPTH_LUT_SIZE",
    "MAX_ENTITIES",
    "Palette",
    "decode_depth",
    "decode_segmentation",
    "depth_lut",
    "encode_depth",
    "encode_location_aware",
    "encode_segmentation",
    "from_model_range",
    "make_palette",
    "to_model_range",
]

#: Colour of id 0 (background / unlabelled).
BACKGROUND_COLOR: tuple[int, int, int] = (0, 0, 0)
#: Number of colours sampled along the Spectral curve (Appendix C).
DEPTH_LUT_SIZE = 256
#: Distinct non-background 24-bit colours.
MAX_ENTITIES = 256**3 - 1

# numpy array or torch tensor; torch is imported only when the caller passes tensors.
Array = Any

_N_CODES = 1 << 24  # 24-bit RGB codes
# Above this many pixels, dedupe colours with a 2**24-entry histogram instead of a sort (faster).
_HIST_UNIQUE_MIN = 1 << 20
# Elements per chunk of a pairwise-distance matrix (float32: 64 MiB).
_CHUNK_ELEMS = 1 << 24
# Depth is resolved to 1/_DEPTH_SUBSTEPS of a LUT step before colouring (encode table size).
_DEPTH_SUBSTEPS = 256
# Maximum density of equal spheres (Kepler), for the min_distance feasibility bound.
_SPHERE_PACKING_DENSITY = math.pi / math.sqrt(18)


# --------------------------------------------------------------------------------------------
# Backend shim: the few operations whose spelling differs between numpy and torch. Everything
# else (indexing, arithmetic, comparisons, ``//``) is written once and works on both.
# --------------------------------------------------------------------------------------------


def _np_unique_sorted(x: np.ndarray) -> np.ndarray:
    """Sorted distinct values. Plain ``np.unique`` in numpy >= 2.3 takes a hash-based path that
    is ~20x slower than sorting on large integer arrays (17 s vs 1 s for 2**24 ids)."""
    s = np.sort(x.reshape(-1))
    if s.size == 0:
        return s
    keep = np.empty(s.shape[0], dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


class _NumpyOps:
    i64: Any = np.int64
    i32: Any = np.int32
    f32: Any = np.float32
    f64: Any = np.float64
    u8: Any = np.uint8
    bool_: Any = np.bool_

    def asarray(self, a: Any, dtype: Any = None) -> np.ndarray:
        return np.asarray(a, dtype=dtype)

    def astype(self, x: np.ndarray, dtype: Any) -> np.ndarray:
        return x.astype(dtype, copy=False)

    def is_integer(self, x: np.ndarray) -> bool:
        return np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_

    def is_floating(self, x: np.ndarray) -> bool:
        return np.issubdtype(x.dtype, np.floating)

    def zeros(self, shape: Any, dtype: Any) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    def full(self, shape: Any, value: Any, dtype: Any) -> np.ndarray:
        return np.full(shape, value, dtype=dtype)

    def arange(self, n: int, dtype: Any = None) -> np.ndarray:
        return np.arange(n, dtype=dtype if dtype is not None else np.int64)

    def concat(self, xs: list[np.ndarray], axis: int = 0) -> np.ndarray:
        return np.concatenate(xs, axis=axis)

    def stack(self, xs: list[np.ndarray], axis: int = 0) -> np.ndarray:
        return np.stack(xs, axis=axis)

    def unique(self, x: np.ndarray) -> np.ndarray:
        return _np_unique_sorted(x)

    def unique_inverse_counts(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        u, inv, cnt = np.unique(x, return_inverse=True, return_counts=True)
        return u, inv.reshape(-1).astype(np.int64, copy=False), cnt.astype(np.int64, copy=False)

    def bincount(self, x: np.ndarray, minlength: int) -> np.ndarray:
        return np.bincount(x, minlength=minlength).astype(np.int64, copy=False)

    def segment_sum(self, idx: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
        # float64 bincount is exact for integer sums below 2**53 (always true here).
        out = np.bincount(idx, weights=values.astype(np.float64), minlength=n)
        return out.astype(np.int64)

    def nonzero(self, mask: np.ndarray) -> np.ndarray:
        return np.flatnonzero(mask)

    def any(self, mask: np.ndarray) -> bool:
        return bool(mask.any())

    def argsort_stable(self, keys: np.ndarray) -> np.ndarray:
        return np.argsort(keys, kind="stable")

    def argmin1(self, x: np.ndarray) -> np.ndarray:
        return np.argmin(x, axis=1)

    def take_along1(self, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return np.take_along_axis(x, idx[:, None], axis=1)[:, 0]

    def max_all(self, x: np.ndarray) -> float:
        return x.max().item()

    def min_all(self, x: np.ndarray) -> float:
        return x.min().item()

    def clip(self, x: np.ndarray, lo: Any, hi: Any) -> np.ndarray:
        return np.clip(x, lo, hi)

    def floor(self, x: np.ndarray) -> np.ndarray:
        return np.floor(x)

    def rint(self, x: np.ndarray) -> np.ndarray:
        return np.rint(x)  # round half to even, as torch.round

    def isnan(self, x: np.ndarray) -> np.ndarray:
        return np.isnan(x)

    def searchsorted(self, sorted_seq: np.ndarray, values: np.ndarray) -> np.ndarray:
        return np.searchsorted(sorted_seq, values)

    def where(self, cond: np.ndarray, a: Any, b: Any) -> np.ndarray:
        return np.where(cond, a, b)

    def maximum(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.maximum(a, b)

    def argmax0(self, x: np.ndarray) -> np.ndarray:
        return np.argmax(x, axis=0)


class _TorchOps:
    def __init__(self, device: Any) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.i64 = torch.int64
        self.i32 = torch.int32
        self.f32 = torch.float32
        self.f64 = torch.float64
        self.u8 = torch.uint8
        self.bool_ = torch.bool

    def asarray(self, a: Any, dtype: Any = None) -> Any:
        if isinstance(a, np.ndarray) and not a.flags.writeable:
            a = a.copy()  # cached tables are read-only; torch wants writable memory to wrap
        return self.torch.as_tensor(a, dtype=dtype, device=self.device)

    def astype(self, x: Any, dtype: Any) -> Any:
        return x.to(dtype)

    def is_integer(self, x: Any) -> bool:
        return not x.dtype.is_floating_point and not x.dtype.is_complex

    def is_floating(self, x: Any) -> bool:
        return x.dtype.is_floating_point

    def zeros(self, shape: Any, dtype: Any) -> Any:
        return self.torch.zeros(shape, dtype=dtype, device=self.device)

    def full(self, shape: Any, value: Any, dtype: Any) -> Any:
        return self.torch.full(shape, value, dtype=dtype, device=self.device)

    def arange(self, n: int, dtype: Any = None) -> Any:
        return self.torch.arange(
            n, dtype=dtype if dtype is not None else self.i64, device=self.device
        )

    def concat(self, xs: list[Any], axis: int = 0) -> Any:
        return self.torch.cat(xs, dim=axis)

    def stack(self, xs: list[Any], axis: int = 0) -> Any:
        return self.torch.stack(xs, dim=axis)

    def unique(self, x: Any) -> Any:
        return self.torch.unique(x, sorted=True)

    def unique_inverse_counts(self, x: Any) -> tuple[Any, Any, Any]:
        u, inv, cnt = self.torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
        return u, inv.reshape(-1), cnt

    def bincount(self, x: Any, minlength: int) -> Any:
        return self.torch.bincount(x, minlength=minlength)

    def segment_sum(self, idx: Any, values: Any, n: int) -> Any:
        # Integer scatter-add: exact and order independent (deterministic on GPU too).
        out = self.torch.zeros(n, dtype=self.i64, device=self.device)
        return out.index_add_(0, idx, values.to(self.i64))

    def nonzero(self, mask: Any) -> Any:
        return self.torch.nonzero(mask.reshape(-1)).reshape(-1)

    def any(self, mask: Any) -> bool:
        return bool(mask.any())

    def argsort_stable(self, keys: Any) -> Any:
        return self.torch.sort(keys, stable=True).indices

    def argmin1(self, x: Any) -> Any:
        return self.torch.argmin(x, dim=1)  # first minimum on ties, as numpy

    def take_along1(self, x: Any, idx: Any) -> Any:
        return self.torch.gather(x, 1, idx[:, None])[:, 0]

    def max_all(self, x: Any) -> float:
        return x.max().item()

    def min_all(self, x: Any) -> float:
        return x.min().item()

    def clip(self, x: Any, lo: Any, hi: Any) -> Any:
        return self.torch.clamp(x, lo, hi)

    def floor(self, x: Any) -> Any:
        return self.torch.floor(x)

    def rint(self, x: Any) -> Any:
        return self.torch.round(x)

    def isnan(self, x: Any) -> Any:
        return self.torch.isnan(x)

    def searchsorted(self, sorted_seq: Any, values: Any) -> Any:
        return self.torch.searchsorted(sorted_seq, values.contiguous())

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return self.torch.where(cond, a, b)

    def maximum(self, a: Any, b: Any) -> Any:
        return self.torch.maximum(a, b)

    def argmax0(self, x: Any) -> Any:
        # torch.argmax on bool is not implemented everywhere; first maximum like numpy.
        return self.torch.argmax(x.to(self.torch.uint8), dim=0)


_Ops = _NumpyOps | _TorchOps


def _ops_for(x: Any) -> _Ops:
    if _is_torch(x):
        return _TorchOps(x.device)
    return _NumpyOps()


def _as_backend_array(x: Any) -> tuple[Any, _Ops]:
    """Return ``x`` as a numpy array or torch tensor plus its ops (lists become numpy)."""
    if _is_torch(x):
        return x, _TorchOps(x.device)
    return np.asarray(x), _NumpyOps()


def _small_to_numpy(x: Any) -> np.ndarray:
    """Copy a *small* summary (e.g. the distinct ids of a video) to a numpy array on the host.

    Used only where the result must live on the host anyway (palettes are numpy); the video
    itself never leaves its device.
    """
    if _is_torch(x):
        return np.asarray(x.detach().cpu().tolist())
    return np.asarray(x)


# --------------------------------------------------------------------------------------------
# Palette
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Palette:
    """Mapping entity id -> RGB colour of one clip.

    ``ids`` is stored sorted ascending (int64) and always contains ``0`` (background);
    ``colors[k]`` is the colour of ``ids[k]``. Both arrays are read-only. Colours produced by
    :func:`make_palette` are unique; a palette from :func:`encode_location_aware` may repeat
    colours (that baseline's weakness), in which case decoding picks the smallest id among equal
    colours.
    """

    ids: np.ndarray  # (K,) int64, includes 0 for background
    colors: np.ndarray  # (K, 3) uint8

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids)
        colors = np.asarray(self.colors)
        if ids.ndim != 1:
            raise ValueError(f"Palette.ids must be 1-D, got shape {ids.shape}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"Palette.ids must be integers, got dtype {ids.dtype}")
        if colors.shape != (ids.shape[0], 3):
            raise ValueError(
                f"Palette.colors must have shape ({ids.shape[0]}, 3), got {colors.shape}"
            )
        if colors.size and (colors.min() < 0 or colors.max() > 255):
            raise ValueError("Palette.colors must lie in [0, 255]")
        ids = ids.astype(np.int64)
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        colors = colors[order].astype(np.uint8)
        if ids.size and ids[0] < 0:
            raise ValueError(f"Palette.ids must be non-negative, got {ids[0]}")
        if ids.size > 1 and np.any(ids[1:] == ids[:-1]):
            dup = np.unique(ids[1:][ids[1:] == ids[:-1]])
            raise ValueError(f"Palette.ids must be unique; duplicated: {dup[:20].tolist()}")
        if ids.size == 0 or ids[0] != 0:
            raise ValueError("Palette.ids must include 0 (the background)")
        ids.setflags(write=False)
        colors.setflags(write=False)
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "colors", colors)

    # Arrays make the dataclass-generated __eq__/__hash__ unusable; define value semantics.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Palette):
            return NotImplemented
        return np.array_equal(self.ids, other.ids) and np.array_equal(self.colors, other.colors)

    def __hash__(self) -> int:
        return hash((self.ids.tobytes(), self.colors.tobytes()))

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def background_color(self) -> tuple[int, int, int]:
        return self.color_of(0)

    def color_of(self, entity_id: int) -> tuple[int, int, int]:
        """Colour of ``entity_id`` as an ``(r, g, b)`` tuple; ``KeyError`` if it is not here."""
        k = int(np.searchsorted(self.ids, int(entity_id)))
        if k >= self.ids.shape[0] or self.ids[k] != int(entity_id):
            raise KeyError(f"entity id {entity_id} is not in the palette")
        r, g, b = (int(c) for c in self.colors[k])
        return (r, g, b)

    def to_dict(self) -> dict[str, list]:
        """JSON-serialisable form: ``{"ids": [...], "colors": [[r, g, b], ...]}``."""
        return {"ids": self.ids.tolist(), "colors": self.colors.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Palette:
        ids = np.asarray(d["ids"], dtype=np.int64).reshape(-1)
        colors = np.asarray(d["colors"], dtype=np.int64).reshape(-1, 3)
        return cls(ids=ids, colors=colors)


def _pack_rgb(ops: _Ops, rgb: Any) -> Any:
    """(..., 3) integer colours -> (...,) int64 24-bit codes ``r * 65536 + g * 256 + b``."""
    if isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8:
        # Fast path (one copy instead of six passes): bytes (0, r, g, b) read as big-endian u32.
        buf = np.zeros(rgb.shape[:-1] + (4,), dtype=np.uint8)
        buf[..., 1:] = rgb
        return buf.view(">u4")[..., 0].astype(np.int64)
    if _is_torch(rgb) and rgb.dtype == ops.u8:
        r32 = rgb.to(ops.i32)  # int32 arithmetic: half the memory traffic of int64
        return ((r32[..., 0] << 16) | (r32[..., 1] << 8) | r32[..., 2]).to(ops.i64)
    rgb = ops.astype(rgb, ops.i64)
    return (rgb[..., 0] * 65536) + (rgb[..., 1] * 256) + rgb[..., 2]


def _unpack_rgb(ops: _Ops, codes: Any) -> Any:
    return ops.stack([codes // 65536, (codes // 256) % 256, codes % 256], axis=-1)


def _distinct_entity_ids(entity_ids: Any) -> np.ndarray:
    """Sorted distinct positive ids of an id video / list / tensor, as host int64."""
    if _is_torch(entity_ids):
        arr: Any = entity_ids
    elif isinstance(entity_ids, (np.ndarray, list, tuple)):
        arr = np.asarray(entity_ids)
    else:  # sets, ranges, generators, dict keys
        arr = np.asarray(list(entity_ids))
    ops = _ops_for(arr)
    if int(arr.numel() if _is_torch(arr) else arr.size) == 0:
        return np.zeros(0, dtype=np.int64)
    if not ops.is_integer(arr):
        raise TypeError(f"entity ids must be integers, got {arr.dtype}")
    flat = ops.astype(arr.reshape(-1), ops.i64)
    lo, hi = ops.min_all(flat), ops.max_all(flat)
    if lo < 0:
        raise ValueError(f"entity ids must be non-negative (0 = background), got {lo}")
    if int(flat.shape[0]) >= _HIST_UNIQUE_MIN and hi < _N_CODES:
        # Large id videos with small ids: a histogram is much faster than sorting every pixel.
        uniq = ops.nonzero(ops.bincount(flat, minlength=hi + 1) > 0)
    else:
        uniq = ops.unique(flat)
    uniq = _small_to_numpy(uniq).astype(np.int64).reshape(-1)
    return uniq[uniq != 0]


def _draw_unique_colors(rng: np.random.Generator, k: int, bg_code: int) -> np.ndarray:
    """(k, 3) uniform random colours, pairwise distinct and != background."""
    n_free = _N_CODES - 1
    if k > n_free // 2:
        # Redrawing collisions needs ~n*log(n) draws near saturation; sampling distinct codes
        # without replacement gives the same distribution (a uniform random injection) directly.
        codes = rng.choice(n_free, size=k, replace=False).astype(np.int64)
        codes = codes + (codes >= bg_code)  # skip the background code
        return _unpack_rgb(_NumpyOps(), codes)
    colors = rng.integers(0, 256, size=(k, 3), dtype=np.int64)
    while True:
        codes = _pack_rgb(_NumpyOps(), colors)
        _, first = np.unique(codes, return_index=True)
        bad = np.ones(k, dtype=bool)
        bad[first] = False  # keep the first entity holding each colour, redraw the others
        bad |= codes == bg_code
        n_bad = int(bad.sum())
        if n_bad == 0:
            return colors
        colors[bad] = rng.integers(0, 256, size=(n_bad, 3), dtype=np.int64)


def _max_colors_bound(min_distance: float) -> int:
    """Upper bound on how many colours (background included) fit in the RGB cube pairwise at
    least ``min_distance`` apart: disjoint balls of radius d/2 inside the cube grown by d/2, at
    most at the densest sphere-packing density."""
    d = float(min_distance)
    ball = math.pi / 6.0 * d**3
    return int(_SPHERE_PACKING_DENSITY * (255.0 + d) ** 3 / ball)


def _draw_spread_colors(
    rng: np.random.Generator, k: int, background: np.ndarray, min_distance: float, max_rounds: int
) -> np.ndarray:
    """(k, 3) random colours pairwise >= min_distance apart and from the background.

    Random sequential placement, vectorised per round: every unplaced entity draws a candidate;
    candidates too close to an already placed colour, or to a lower-numbered candidate, are
    redrawn in the next round.
    """
    from scipy.spatial import cKDTree

    min_d2 = float(min_distance) ** 2
    colors = np.zeros((k, 3), dtype=np.int64)
    placed_pts = background.reshape(1, 3).astype(np.int64)
    pending = np.arange(k)
    for _ in range(max_rounds):
        if pending.size == 0:
            return colors
        cand = rng.integers(0, 256, size=(pending.size, 3), dtype=np.int64)
        # Distance to the nearest placed colour (exact integer check on the tree's answer).
        _, nn = cKDTree(placed_pts).query(cand, k=1)
        diff = cand - placed_pts[nn]
        ok = (diff * diff).sum(1) >= min_d2
        # Among surviving candidates, the higher-numbered one of each too-close pair is redrawn.
        surv = np.flatnonzero(ok)
        if surv.size > 1:
            pairs = cKDTree(cand[surv]).query_pairs(r=float(min_distance), output_type="ndarray")
            if pairs.size:
                dd = cand[surv[pairs[:, 0]]] - cand[surv[pairs[:, 1]]]
                close = (dd * dd).sum(1) < min_d2
                ok[surv[pairs[close].max(axis=1)]] = False
        colors[pending[ok]] = cand[ok]
        placed_pts = np.concatenate([placed_pts, cand[ok]])
        pending = pending[~ok]
    if pending.size == 0:
        return colors
    raise ValueError(
        f"could not place {k} colours at least {min_distance:g} apart (and from the background): "
        f"{pending.size} still unplaced after {max_rounds} rounds of redrawing; use fewer entities "
        f"or a smaller min_distance (upper bound for this distance: "
        f"{_max_colors_bound(min_distance) - 1} entities, random placement reaches far fewer)"
    )


def make_palette(
    entity_ids: Iterable[int] | Array,
    seed: int,
    background: tuple[int, int, int] = BACKGROUND_COLOR,
    min_distance: float = 0.0,
    *,
    max_rounds: int = 2000,
) -> Palette:
    """Random Pixelplanes palette for the distinct positive ids in ``entity_ids``.

    ``entity_ids`` may be a list/set of ids or a whole id video (numpy or torch); ``0`` is the
    background and always gets ``background``. Each entity (in ascending id order) gets R, G, B
    drawn independently uniform in ``[0, 255]`` from ``np.random.default_rng(seed)``; colours that
    repeat an earlier entity's colour or equal the background are redrawn (vectorised rounds), so
    all colours are unique. The result depends only on ``seed`` and the set of ids.

    ``min_distance`` = 0 (default) reproduces the paper exactly. With ``min_distance > 0`` colours
    are also redrawn until every two colours (background included) are at least ``min_distance``
    apart in RGB Euclidean distance, which makes decoding of noisy colormaps more reliable; a
    ``ValueError`` is raised when that is impossible (sphere-packing bound) or not reached after
    ``max_rounds`` rounds.

    Raises ``ValueError`` if more than ``MAX_ENTITIES`` (256**3 - 1) entities are requested.
    """
    ids = _distinct_entity_ids(entity_ids)
    k = int(ids.size)
    bg = np.asarray(background, dtype=np.int64).reshape(-1)
    if bg.shape != (3,) or bg.min() < 0 or bg.max() > 255:
        raise ValueError(f"background must be an (r, g, b) triple in [0, 255], got {background!r}")
    if k > MAX_ENTITIES:
        raise ValueError(
            f"{k} entities requested but only {MAX_ENTITIES} distinct non-background RGB "
            f"colours exist"
        )
    if min_distance < 0 or not math.isfinite(min_distance):
        raise ValueError(f"min_distance must be finite and >= 0, got {min_distance}")
    rng = np.random.default_rng(seed)
    if min_distance > 0:
        bound = _max_colors_bound(min_distance)
        if k + 1 > bound:
            raise ValueError(
                f"{k} entities cannot have colours at least {min_distance:g} apart (and from the "
                f"background): at most {bound - 1} fit in the RGB cube at that distance"
            )
        colors = _draw_spread_colors(rng, k, bg, min_distance, max_rounds)
    else:
        bg_code = int(bg[0]) * 65536 + int(bg[1]) * 256 + int(bg[2])
        colors = _draw_unique_colors(rng, k, bg_code)
    return Palette(
        ids=np.concatenate([[0], ids]).astype(np.int64),
        colors=np.concatenate([bg[None, :], colors]).astype(np.uint8),
    )


# --------------------------------------------------------------------------------------------
# Shared vectorised kernels
# --------------------------------------------------------------------------------------------


def _unique_colors(ops: _Ops, rgb_flat: Any) -> tuple[Any, Any, Any]:
    """Distinct colours of (N, 3) pixels: (codes (M,), inverse (N,), counts (M,)), codes sorted."""
    codes = _pack_rgb(ops, rgb_flat)
    n = int(codes.shape[0])
    if n < _HIST_UNIQUE_MIN:
        return ops.unique_inverse_counts(codes)
    # A 2**24-bin histogram replaces the sort: O(N) and, for large N, several times faster.
    hist = ops.bincount(codes, minlength=_N_CODES)
    uniq = ops.nonzero(hist > 0)
    lut = ops.zeros(_N_CODES, ops.i64)
    lut[uniq] = ops.arange(int(uniq.shape[0]))
    return uniq, lut[codes], hist[uniq]


def _nearest(ops: _Ops, points: Any, centres: Any) -> tuple[Any, Any]:
    """Nearest centre of each point and its squared distance, exactly.

    Inputs are integer-valued (M, 3) / (C, 3) arrays with values in [0, 255]. The squared
    distances are computed in float32 via ``|p|^2 - 2 p.c + |c|^2``; every intermediate is an
    integer below 2**24, so the result is exact whatever order the BLAS sums in -- which is what
    makes numpy, torch-CPU and torch-CUDA agree bit for bit. Ties go to the lowest index.
    Returns (idx int64 (M,), d2 int64 (M,)).
    """
    p_all = ops.astype(points, ops.f32)
    c = ops.astype(centres, ops.f32)
    c2 = c[:, 0] * c[:, 0] + c[:, 1] * c[:, 1] + c[:, 2] * c[:, 2]
    # 2c is still exactly representable in TF32/bf16 (a power-of-two scaling of values <= 255),
    # so the distances stay exact even under torch.set_float32_matmul_precision("high"/"medium").
    c_twice_t = (c * 2.0).T
    n_c = int(c.shape[0])
    rows = max(1, _CHUNK_ELEMS // max(n_c, 1))
    idx_parts, d2_parts = [], []
    for s in range(0, int(p_all.shape[0]), rows):  # bounded chunk loop, not per pixel
        p = p_all[s : s + rows]
        # argmin_c |p - c|^2 = argmin_c (|c|^2 - 2 p.c); |p|^2 is added back for the minimum only.
        partial = c2[None, :] - p @ c_twice_t
        k = ops.argmin1(partial)
        p2 = p[:, 0] * p[:, 0] + p[:, 1] * p[:, 1] + p[:, 2] * p[:, 2]
        idx_parts.append(k)
        d2_parts.append(p2 + ops.take_along1(partial, k))
    if not idx_parts:
        return ops.zeros(0, ops.i64), ops.zeros(0, ops.i64)
    return ops.astype(ops.concat(idx_parts), ops.i64), ops.astype(ops.concat(d2_parts), ops.i64)


def _tolerance_d2(tolerance: float) -> int:
    """Integer squared-distance threshold equivalent to ``distance <= tolerance``."""
    if not (tolerance >= 0) or not math.isfinite(tolerance):
        raise ValueError(f"tolerance must be finite and >= 0, got {tolerance}")
    return int(math.floor(float(tolerance) ** 2))


def _check_colormap(ops: _Ops, colormap: Any) -> Any:
    if colormap.ndim < 1 or int(colormap.shape[-1]) != 3:
        raise ValueError(f"colormap must have shape (..., 3), got {tuple(colormap.shape)}")
    if not ops.is_integer(colormap):
        raise TypeError(
            f"colormap must be an integer (uint8) array, got {colormap.dtype}; convert model "
            f"outputs with from_model_range() first"
        )
    flat = colormap.reshape(-1, 3)
    if flat.dtype != ops.u8 and int(flat.shape[0]) > 0:
        lo, hi = ops.min_all(flat), ops.max_all(flat)
        if lo < 0 or hi > 255:
            raise ValueError(f"colormap values must lie in [0, 255], got [{lo}, {hi}]")
    return flat


# --------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------


def _palette_arrays(ops: _Ops, palette: Palette) -> tuple[Any, Any]:
    return ops.asarray(palette.ids, ops.i64), ops.asarray(palette.colors.astype(np.int64), ops.i64)


def encode_segmentation(
    ids: Array, seed: int = 0, palette: Palette | None = None
) -> tuple[Array, Palette]:
    """Entity-id video ``(T, H, W)`` -> Pixelplanes colormap ``(T, H, W, 3)`` uint8 and its palette.

    Without ``palette`` one is drawn with :func:`make_palette` (``seed``) for the ids present.
    The colour of an entity is the same in every frame. With ``palette``, every id in ``ids``
    must be in it (``ValueError`` lists the missing ones).
    """
    x, ops = _as_backend_array(ids)
    if not ops.is_integer(x):
        raise TypeError(f"ids must be an integer array, got {x.dtype}")
    if palette is None:
        palette = make_palette(x, seed)
    pal_ids, pal_colors = _palette_arrays(ops, palette)
    flat = x.reshape(-1)
    n_pal = int(pal_ids.shape[0])
    hi = ops.max_all(flat) if int(flat.shape[0]) else 0
    lo = ops.min_all(flat) if int(flat.shape[0]) else 0
    if lo >= 0 and hi < _N_CODES:
        # Small ids (the usual case): an id -> palette-row table and one gather; -1 = missing.
        table = ops.full((int(hi) + 1,), -1, ops.i64)
        in_range = pal_ids <= hi  # palette ids beyond the video's largest id are not needed
        table[pal_ids[in_range]] = ops.arange(n_pal)[in_range]
        # int32/int64 index directly (no copy); torch would read uint8 as a mask, so cast others.
        index = flat if flat.dtype in (ops.i32, ops.i64) else ops.astype(flat, ops.i64)
        pos = table[index]
        missing_mask = pos < 0
    else:
        # Huge or negative ids: binary search over the sorted palette ids.
        flat = ops.astype(flat, ops.i64)
        pos = ops.clip(ops.searchsorted(pal_ids, flat), 0, n_pal - 1)
        missing_mask = pal_ids[pos] != flat
    if ops.any(missing_mask):
        flat = ops.astype(flat, ops.i64)
        missing = _small_to_numpy(ops.unique(flat[missing_mask])).astype(np.int64)
        raise ValueError(
            f"ids contain {missing.size} entities not in the palette: {missing[:20].tolist()}"
            + (" ..." if missing.size > 20 else "")
        )
    out = ops.astype(pal_colors, ops.u8)[pos]
    return out.reshape(tuple(x.shape) + (3,)), palette


def _nms(ops: _Ops, pos: Any, thr: int) -> Any:
    """Greedy non-maximum suppression of points given in priority order.

    Returns a boolean keep-mask equal to the sequential rule "keep a point unless it lies within
    ``sqrt(thr)`` of an already kept, higher-priority point", computed in parallel rounds over
    the list of conflicting pairs (a point is decided once every higher-priority conflicting
    point is decided), so the number of Python iterations is the length of the longest chain of
    dependencies, not the number of points.
    """
    n = int(pos.shape[0])
    if n == 0:
        return ops.zeros(0, ops.bool_)
    # Conflicting pairs (i < j), chunked over rows.
    pi_parts, pj_parts = [], []
    p = ops.astype(pos, ops.f32)
    p2 = p[:, 0] * p[:, 0] + p[:, 1] * p[:, 1] + p[:, 2] * p[:, 2]
    rows = max(1, _CHUNK_ELEMS // n)
    col = ops.arange(n)
    for s in range(0, n, rows):
        blk = p[s : s + rows]
        d2 = (p2[s : s + rows, None] - 2.0 * (blk @ p.T)) + p2[None, :]
        row = ops.arange(int(blk.shape[0])) + s
        conflict = (d2 <= float(thr)) & (col[None, :] > row[:, None])
        flat = ops.nonzero(conflict)
        pi_parts.append(flat // n + s)
        pj_parts.append(flat % n)
    pi = ops.concat(pi_parts)
    pj = ops.concat(pj_parts)
    # status: 0 undecided, 1 kept, 2 suppressed
    status = ops.zeros(n, ops.i64)
    while True:
        undecided = status == 0
        if not ops.any(undecided):
            break
        si, sj = status[pi], status[pj]
        suppressed = ops.bincount(pj[(si == 1) & (sj == 0)], minlength=n) > 0
        status = ops.where(undecided & suppressed, 2, status)
        undecided = status == 0
        sj = status[pj]
        blocked = ops.bincount(pj[(status[pi] == 0) & (sj == 0)], minlength=n) > 0
        status = ops.where(undecided & ~blocked, 1, status)
    return status == 1


_NEIGHBOUR_OFFSETS = np.array(
    [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)], dtype=np.int64
)


def _seed_colors(ops: _Ops, rgb: Any, counts: Any, thr: int, tolerance: float) -> Any:
    """Initial cluster centres: modes of a coarse colour histogram, then NMS at ``tolerance``
    (here the merge radius, ``thr`` its squared integer threshold).

    Colours are binned into cubes of side ``q ~ tolerance / 5`` (about the VAE noise sigma when
    the radius is ~5 sigma); each occupied bin gets the pixel count of its 3x3x3 neighbourhood
    (a box-smoothed density) and the neighbourhood's mean colour. Bins that are local maxima of
    the smoothed density are candidates -- this removes the many low-density bins in the noise
    tails of each colour. Since a neighbourhood spans at most 2*sqrt(3)*q < tolerance, anything
    the local-maximum test removes would have been merged anyway. Candidates are then accepted
    by density (NMS): a candidate within the tolerance of a stronger one is merged into it.
    """
    q = max(1, int(tolerance // 5))
    use_local_max = 2.0 * math.sqrt(3.0) * q <= tolerance
    nc = (255 // q) + 1
    cell = rgb // q
    ccode = (cell[:, 0] * nc + cell[:, 1]) * nc + cell[:, 2]
    cells, cinv, _ = ops.unique_inverse_counts(ccode)
    n_cells = int(cells.shape[0])
    n_cell = ops.segment_sum(cinv, counts, n_cells)
    s_cell = ops.stack([ops.segment_sum(cinv, rgb[:, ch] * counts, n_cells) for ch in range(3)], 1)
    cxyz = ops.stack([cells // (nc * nc), (cells // nc) % nc, cells % nc], 1)
    dens = ops.zeros(n_cells, ops.i64)
    sums = ops.zeros((n_cells, 3), ops.i64)
    neighbours = []
    for off in _NEIGHBOUR_OFFSETS.tolist():  # 27 fixed offsets, each vectorised over bins
        nb = cxyz + ops.asarray(off, ops.i64)[None, :]
        valid = ((nb >= 0) & (nb < nc)).all(1)
        nbcode = (nb[:, 0] * nc + nb[:, 1]) * nc + nb[:, 2]
        at = ops.clip(ops.searchsorted(cells, nbcode), 0, n_cells - 1)
        found = valid & (cells[at] == nbcode)
        dens = dens + ops.where(found, n_cell[at], 0)
        sums = sums + ops.where(found[:, None], s_cell[at], 0)
        neighbours.append((at, found))
    if use_local_max:
        nb_max = ops.zeros(n_cells, ops.i64)
        for at, found in neighbours:
            nb_max = ops.maximum(nb_max, ops.where(found, dens[at], 0))
        cand = ops.nonzero(dens >= nb_max)
    else:
        cand = ops.arange(n_cells)
    d = dens[cand]
    centre = (sums[cand] + (d // 2)[:, None]) // d[:, None]  # rounded mean, exact in integers
    order = ops.argsort_stable(-d)  # densest first; ties by bin code (deterministic)
    centre = centre[order]
    return centre[ops.nonzero(_nms(ops, centre, thr))]


def _lloyd_step(ops: _Ops, rgb: Any, counts: Any, centres: Any, thr: int) -> tuple[Any, Any]:
    """One weighted k-means update using only colours within the tolerance of their centre.
    Returns (new centres, pixel weight per centre). Centres are rounded to integers so the next
    distance computation stays exact."""
    idx, d2 = _nearest(ops, rgb, centres)
    w = ops.where(d2 <= thr, counts, 0)
    n = int(centres.shape[0])
    weight = ops.segment_sum(idx, w, n)
    sums = ops.stack([ops.segment_sum(idx, rgb[:, ch] * w, n) for ch in range(3)], 1)
    safe = ops.maximum(weight, ops.full((n,), 1, ops.i64))
    new = (sums + (safe // 2)[:, None]) // safe[:, None]
    new = ops.where((weight > 0)[:, None], new, centres)
    return new, weight


def _cluster_colors(
    ops: _Ops, rgb: Any, counts: Any, tolerance: float, merge_radius: float, n_iter: int = 2
) -> tuple[Any, Any]:
    """Cluster distinct colours (M, 3) weighted by pixel counts.

    Returns (centres (C, 3) int64, label (M,) int64 with -1 for colours farther than
    ``tolerance`` from every centre). Clusters whose centres end up within ``merge_radius`` of a
    heavier cluster are merged into it.
    """
    thr = _tolerance_d2(tolerance)
    thr_merge = _tolerance_d2(merge_radius)
    centres = _seed_colors(ops, rgb, counts, thr_merge, merge_radius)
    for _ in range(max(1, n_iter)):
        centres, weight = _lloyd_step(ops, rgb, counts, centres, thr)
    # Merge: seeds in the noise tail of a colour drift towards it during the updates.
    order = ops.argsort_stable(-weight)
    centres = centres[order]
    centres = centres[ops.nonzero(_nms(ops, centres, thr_merge))]
    centres, _ = _lloyd_step(ops, rgb, counts, centres, thr)
    idx, d2 = _nearest(ops, rgb, centres)
    label = ops.where(d2 <= thr, idx, -1)
    return centres, label


def decode_segmentation(
    colormap: Array,
    palette: Palette | None = None,
    tolerance: float = 40.0,
    min_pixels: int = 0,
    *,
    merge_radius: float | None = None,
) -> Array:
    """Pixelplanes colormap ``(..., 3)`` uint8 -> entity ids ``(...)`` int32 (0 = background).

    With ``palette``: each pixel takes the id of the nearest palette colour; pixels farther than
    ``tolerance`` (RGB Euclidean) from every palette colour become 0. Entities left with fewer
    than ``min_pixels`` pixels become 0.

    Without ``palette`` (generated outputs): the colours of the whole video are clustered at once
    (histogram-mode seeds, merged within ``merge_radius``, refined by weighted k-means), so an id
    means the same entity in every frame. Pixels farther than ``tolerance`` from every cluster
    centre, the cluster nearest ``BACKGROUND_COLOR`` (if within ``tolerance``) and clusters with
    fewer than ``min_pixels`` pixels become 0; the other clusters are numbered 1..K by descending
    pixel count. ``tolerance`` should be ~5x the noise sigma (default 40 suits VAE noise of
    sigma 5-8). Colour clusters closer than ``merge_radius`` (default: ``tolerance``) merge into
    one entity. Random palettes often contain such pairs (with 50 entities, ~10-20 pairs of
    colours lie within 40 of each other), so a smaller ``merge_radius`` -- down to ~3x the noise
    sigma, e.g. 25 for sigma <= 8 -- separates more entities; below that, noise itself splits
    into clusters. Palettes drawn with ``make_palette(..., min_distance=...)`` avoid the issue.
    Under noise a few far-tail pixels can form tiny extra clusters; ``min_pixels`` removes them.
    """
    x, ops = _as_backend_array(colormap)
    flat = _check_colormap(ops, x)
    out_shape = tuple(x.shape[:-1])
    thr = _tolerance_d2(tolerance)
    codes, inverse, counts = _unique_colors(ops, flat)
    rgb = _unpack_rgb(ops, codes)

    if palette is not None:
        pal_ids, pal_colors = _palette_arrays(ops, palette)
        k, d2 = _nearest(ops, rgb, pal_colors)
        uniq_ids = ops.where(d2 <= thr, pal_ids[k], 0)
        if min_pixels > 0:
            # Pixel count per palette row, then drop small entities (never the background row).
            rowcount = ops.segment_sum(k, ops.where(d2 <= thr, counts, 0), int(pal_ids.shape[0]))
            small = rowcount < int(min_pixels)
            uniq_ids = ops.where(small[k], 0, uniq_ids)
        # int32 per the conventions, unless the palette's ids do not fit.
        out_dtype = ops.i32 if int(palette.ids[-1]) <= np.iinfo(np.int32).max else ops.i64
        return ops.astype(uniq_ids, out_dtype)[inverse].reshape(out_shape)

    if int(codes.shape[0]) == 0:
        return ops.zeros(out_shape, ops.i32)
    merge = tolerance if merge_radius is None else merge_radius
    centres, label = _cluster_colors(ops, rgb, counts, tolerance, merge)
    n_c = int(centres.shape[0])
    assigned = label >= 0
    lab = ops.where(assigned, label, 0)
    pixcount = ops.segment_sum(lab, ops.where(assigned, counts, 0), n_c)
    keep = pixcount >= max(int(min_pixels), 1)
    bg_idx, bg_d2 = _nearest(ops, ops.asarray([list(BACKGROUND_COLOR)], ops.i64), centres)
    is_bg = (ops.arange(n_c) == bg_idx[0]) & (bg_d2[0] <= thr)
    keep = keep & ~is_bg
    # Number kept clusters 1..K by descending pixel count (stable: ties keep centre order).
    order = ops.argsort_stable(-ops.where(keep, pixcount, -1))
    rank = ops.zeros(n_c, ops.i64)
    rank[order] = ops.arange(n_c) + 1
    table = ops.where(keep, rank, 0)
    uniq_ids = ops.where(assigned, table[lab], 0)
    return ops.astype(uniq_ids, ops.i32)[inverse].reshape(out_shape)


# --------------------------------------------------------------------------------------------
# Location-aware colormap (UniGS baseline, paper Tab. 6)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _location_grid_colors(grid_size: int) -> np.ndarray:
    """(grid_size**2, 3) fixed colours, row-major over cells, evenly spread over an RGB lattice.

    Lattice levels are ``255 * (1..L) / L`` so no colour is the (black) background.
    """
    n = grid_size * grid_size
    levels_per_axis = max(1, math.ceil(round(n ** (1.0 / 3.0), 9)))
    while levels_per_axis**3 < n:
        levels_per_axis += 1
    levels = np.rint(255.0 * np.arange(1, levels_per_axis + 1) / levels_per_axis).astype(np.int64)
    lattice = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    pick = np.rint(np.linspace(0, lattice.shape[0] - 1, n)).astype(np.int64)
    out = lattice[pick].astype(np.uint8)
    out.setflags(write=False)
    return out


def encode_location_aware(ids: Array, grid_size: int = 8) -> tuple[Array, Palette]:
    """UniGS-style location-aware colormap, the baseline of the paper's Tab. 6.

    The frame is divided into ``grid_size x grid_size`` cells with fixed, deterministic colours
    (evenly spread over an RGB lattice, never black). An entity takes the colour of the cell that
    contains its centroid in the *first frame it appears in*, and keeps that colour in later
    frames even after moving elsewhere. Known weakness (why the paper replaces it): entities
    whose first-frame centroids fall in the same cell get the same colour and cannot be told
    apart, and a colour no longer says where the entity is once it moves. Background is black.
    Returns the colormap and a :class:`Palette` (which may repeat colours).
    """
    if grid_size < 1:
        raise ValueError(f"grid_size must be >= 1, got {grid_size}")
    x, ops = _as_backend_array(ids)
    if not ops.is_integer(x):
        raise TypeError(f"ids must be an integer array, got {x.dtype}")
    squeeze = x.ndim == 2
    if squeeze:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"ids must have shape (T, H, W) or (H, W), got {tuple(x.shape)}")
    t_len, h, w = (int(s) for s in x.shape)
    flat = ops.astype(x.reshape(-1), ops.i64)
    if int(flat.shape[0]) and ops.min_all(flat) < 0:
        raise ValueError(
            f"entity ids must be non-negative (0 = background), got {ops.min_all(flat)}"
        )
    uniq, inv, _ = ops.unique_inverse_counts(flat)
    n_u = int(uniq.shape[0])
    # First frame of each distinct id: presence table (T, n_u) -> first True along T.
    tt = ops.arange(int(flat.shape[0])) // (h * w)
    present = ops.bincount(tt * n_u + inv, minlength=t_len * n_u).reshape(t_len, n_u) > 0
    first_t = ops.argmax0(present)
    # Centroid over that frame only, in pixel-centre coordinates, with exact integer sums.
    sel = ops.nonzero(tt == first_t[inv])
    inv_sel = inv[sel]
    pix = sel % (h * w)
    cnt = ops.segment_sum(inv_sel, ops.full((int(sel.shape[0]),), 1, ops.i64), n_u)
    ysum = ops.segment_sum(inv_sel, pix // w, n_u)
    xsum = ops.segment_sum(inv_sel, pix % w, n_u)
    # cell = floor(((sum + n/2) / n) * g / size), in integers: (2*sum + n) * g // (2 * n * size)
    row = ops.clip(((2 * ysum + cnt) * grid_size) // (2 * cnt * h), 0, grid_size - 1)
    col = ops.clip(((2 * xsum + cnt) * grid_size) // (2 * cnt * w), 0, grid_size - 1)
    grid = ops.asarray(_location_grid_colors(grid_size).astype(np.int64), ops.i64)
    colors = grid[row * grid_size + col]
    bg = ops.asarray(list(BACKGROUND_COLOR), ops.i64)[None, :]
    colors = ops.where((uniq == 0)[:, None], bg, colors)
    out = ops.astype(colors, ops.u8)[inv].reshape(tuple(x.shape) + (3,))
    if squeeze:
        out = out[0]
    uniq_np = _small_to_numpy(uniq).astype(np.int64)
    colors_np = _small_to_numpy(colors).astype(np.int64)
    if uniq_np.size == 0 or uniq_np[0] != 0:  # palettes always carry the background
        uniq_np = np.concatenate([[0], uniq_np])
        colors_np = np.concatenate([np.asarray([BACKGROUND_COLOR], np.int64), colors_np])
    return out, Palette(ids=uniq_np, colors=colors_np)


# --------------------------------------------------------------------------------------------
# Depth
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def depth_lut() -> np.ndarray:
    """(256, 3) uint8: matplotlib "Spectral" at ``i / 255``, ``i = 0..255`` (computed once).

    Row ``i`` is the colour of normalised disparity ``i / 255``: row 0 = far = Spectral(0.0)
    (dark red), row 255 = near = Spectral(1.0) (violet-blue). Bytes are matplotlib's own
    ``bytes=True`` conversion, as in Marigold's visualisation. Read-only.
    """
    import matplotlib

    cmap = matplotlib.colormaps["Spectral"]
    lut = np.asarray(cmap(np.linspace(0.0, 1.0, DEPTH_LUT_SIZE), bytes=True)[:, :3], dtype=np.uint8)
    lut.setflags(write=False)
    return lut


@functools.lru_cache(maxsize=1)
def _lut_depths() -> np.ndarray:
    """(256,) float32 ``i / 255``: the depth of each LUT colour."""
    out = (np.arange(DEPTH_LUT_SIZE, dtype=np.float64) / (DEPTH_LUT_SIZE - 1)).astype(np.float32)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=1)
def _model_range_table() -> np.ndarray:
    """(256,) float32 ``i / 127.5 - 1``, exactly -1 and 1 at the ends. A table keeps numpy, CPU
    and CUDA results identical (CUDA divides by a scalar via its reciprocal)."""
    out = (np.arange(256, dtype=np.float64) / 127.5 - 1.0).astype(np.float32)
    out.setflags(write=False)
    return out


def _lut_arrays(ops: _Ops) -> tuple[Any, Any]:
    lut = ops.asarray(depth_lut().astype(np.float32), ops.f32)
    return lut[:-1], lut[1:] - lut[:-1]  # segment starts and directions (integer-valued)


def encode_depth(depth: Array) -> Array:
    """Depth ``(...)`` float in [0, 1] (disparity, 1 = near) -> Spectral colormap ``(..., 3)``.

    ``v`` maps to the point at parameter ``255 * v`` of the piecewise-linear curve through the
    256 LUT colours (linear interpolation between adjacent samples, resolved to 1/256 of a LUT
    step, far below what a uint8 colour can express), rounded to one of the 8 integer colours
    around it -- the one that decodes best (see :func:`_depth_encode_table`). Values within 1e-6
    outside [0, 1] are clipped; NaN or anything farther out raises ``ValueError``.
    """
    x, ops = _as_backend_array(depth)
    if not ops.is_floating(x):
        x = ops.astype(x, ops.f32)
    flat = ops.astype(x.reshape(-1), ops.f32)
    if int(flat.shape[0]):
        lo, hi = ops.min_all(flat), ops.max_all(flat)  # NaN propagates into min/max
        if math.isnan(lo) or math.isnan(hi):
            raise ValueError(f"depth contains {int(ops.isnan(flat).sum())} NaN values")
        if lo < -1e-6 or hi > 1.0 + 1e-6:
            raise ValueError(
                f"depth must lie in [0, 1] (normalised disparity), got values in "
                f"[{lo:.6g}, {hi:.6g}]"
            )
    table = ops.asarray(_depth_encode_table(), ops.u8)
    n_pos = int(table.shape[0]) - 1
    pos = ops.rint(ops.clip(flat, 0.0, 1.0) * float(n_pos))  # in [0, n_pos] after the clip
    return table[ops.astype(pos, ops.i64)].reshape(tuple(x.shape) + (3,))


@functools.lru_cache(maxsize=1)
def _depth_encode_table() -> np.ndarray:
    """((DEPTH_LUT_SIZE - 1) * 256 + 1, 3) uint8: the colour of depth ``j / ((256 - 1) * 256)``.

    Why not plain rounding of the interpolated colour: the uint8 Spectral samples fold back at
    the pale-yellow apex (LUT[127] = (254, 254, 189), LUT[128] = (254, 254, 190),
    LUT[129] = (253, 254, 188)), so rounding maps depths near 128.5/255 onto LUT[127] and any
    decoder is then wrong by ~1.5 steps there. Instead, of the 8 integer colours around the
    exact curve point (floor/ceil per channel, all within sqrt(3) of it) we take the one whose
    "continuous" decoding is closest to the depth, among those whose "nearest" (paper) decoding
    is within half a step (or as close as any of the 8 gets); ties go to the colour closest to
    the curve point. Both decoders then invert the encoder to within half a LUT step (1/510),
    and "continuous" to ~0.05 steps on average. Built once, lazily, with numpy.
    """
    lut = depth_lut().astype(np.float32)
    sub = _DEPTH_SUBSTEPS
    n_pos = (DEPTH_LUT_SIZE - 1) * sub
    j = np.arange(n_pos + 1)
    i0 = np.minimum(j // sub, DEPTH_LUT_SIZE - 2)
    frac = ((j - i0 * sub) / sub).astype(np.float32)
    exact = lut[i0] + (lut[i0 + 1] - lut[i0]) * frac[:, None]
    corners = np.array(
        [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=np.float32
    )
    cand = np.clip(np.floor(exact)[:, None, :] + corners[None, :, :], 0, 255)  # (n, 8, 3)
    ops = _NumpyOps()
    codes, inverse, _ = _unique_colors(ops, cand.reshape(-1, 3).astype(np.uint8))
    rgb = _unpack_rgb(ops, codes)
    k, _ = _nearest(ops, rgb, depth_lut().astype(np.int64))
    step = 1.0 / (DEPTH_LUT_SIZE - 1)
    target = j[:, None] / n_pos
    err_cont = np.abs(
        _project_on_curve(ops, rgb).astype(np.float64)[inverse].reshape(-1, 8) - target
    )
    err_near = np.abs((k * step)[inverse].reshape(-1, 8) - target)
    allowed = err_near <= np.maximum(0.5 * step + 1e-9, err_near.min(axis=1, keepdims=True))
    key = np.where(allowed, err_cont, np.inf)
    rgb_dev = ((cand - exact[:, None, :]) ** 2).sum(-1)
    # Lexicographic argmin per row: (key, rgb_dev, corner index).
    order = np.lexsort(
        (
            np.arange(8)[None, :].repeat(n_pos + 1, 0).ravel(),
            rgb_dev.ravel(),
            key.ravel(),
            np.repeat(j, 8),
        )
    )
    best = order.reshape(n_pos + 1, 8)[:, 0] % 8
    table = cand[j, best].astype(np.uint8)
    table.setflags(write=False)
    return table


def _project_on_curve(ops: _Ops, rgb: Any) -> Any:
    """Depth of each distinct colour (M, 3): closest point on the piecewise-linear LUT curve.

    For every segment a -> a + d the closest point is ``t = clamp((p - a).d / |d|^2, 0, 1)``;
    take the segment with the smallest distance and return ``(i + t) / 255``. The integer parts
    ((p - a).d, |p - a|^2) come from float32 matmuls that are exact (integers < 2**24); the rest
    is the same sequence of IEEE operations on both backends.
    """
    start, direction = _lut_arrays(ops)
    n_seg = int(start.shape[0])
    a2 = start[:, 0] * start[:, 0] + start[:, 1] * start[:, 1] + start[:, 2] * start[:, 2]
    ad = (
        start[:, 0] * direction[:, 0]
        + start[:, 1] * direction[:, 1]
        + start[:, 2] * direction[:, 2]
    )
    dd = (
        direction[:, 0] * direction[:, 0]
        + direction[:, 1] * direction[:, 1]
        + direction[:, 2] * direction[:, 2]
    )
    dd = ops.maximum(
        dd, ops.full((n_seg,), 1.0, ops.f32)
    )  # no zero-length segments in Spectral; guard anyway
    p_all = ops.astype(rgb, ops.f32)
    rows = max(1, _CHUNK_ELEMS // (4 * n_seg))  # several (rows, 255) temporaries live at once
    parts = []
    for s in range(0, int(p_all.shape[0]), rows):  # bounded chunk loop
        p = p_all[s : s + rows]
        p2 = p[:, 0] * p[:, 0] + p[:, 1] * p[:, 1] + p[:, 2] * p[:, 2]
        pa2 = (p2[:, None] - 2.0 * (p @ start.T)) + a2[None, :]  # |p - a|^2
        num = (p @ direction.T) - ad[None, :]  # (p - a).d
        t = ops.clip(num / dd[None, :], 0.0, 1.0)
        dist = (pa2 - (2.0 * t) * num) + (t * t) * dd[None, :]  # |p - a - t d|^2
        k = ops.argmin1(dist)
        tk = ops.take_along1(t, k)
        parts.append(ops.astype(k, ops.f32) + tk)
    if not parts:
        return ops.zeros(0, ops.f32)
    # Divide by a (1,) array, not a Python scalar: PyTorch's CUDA kernel turns division by a
    # scalar into multiplication by its reciprocal (1 ulp off); array division is IEEE on all.
    return ops.concat(parts) / ops.asarray([float(DEPTH_LUT_SIZE - 1)], ops.f32)


def decode_depth(colormap: Array, method: Literal["nearest", "continuous"] = "continuous") -> Array:
    """Spectral colormap ``(..., 3)`` uint8 -> depth ``(...)`` float32 in [0, 1] (1 = near).

    ``"nearest"``: the paper's Appendix C -- nearest of the 256 sampled colours ``i`` gives
    ``i / 255`` (quantisation error up to 1/510). ``"continuous"``: projection onto the
    piecewise-linear curve through the samples, the inverse of :func:`encode_depth` up to uint8
    rounding.
    """
    if method not in ("nearest", "continuous"):
        raise ValueError(f"method must be 'nearest' or 'continuous', got {method!r}")
    x, ops = _as_backend_array(colormap)
    flat = _check_colormap(ops, x)
    out_shape = tuple(x.shape[:-1])
    codes, inverse, _ = _unique_colors(ops, flat)
    rgb = _unpack_rgb(ops, codes)
    if method == "nearest":
        lut = ops.asarray(depth_lut().astype(np.int64), ops.i64)
        k, _ = _nearest(ops, rgb, lut)
        uniq_depth = ops.asarray(_lut_depths(), ops.f32)[k]
    else:
        uniq_depth = _project_on_curve(ops, rgb)
    return uniq_depth[inverse].reshape(out_shape)


# --------------------------------------------------------------------------------------------
# Model range
# --------------------------------------------------------------------------------------------


def to_model_range(colormap: Array) -> Array:
    """uint8 colormap -> float32 in [-1, 1] (``x / 127.5 - 1``), same shape and layout.

    Integer input must lie in [0, 255]; float input is rejected (it is probably already in model
    range).
    """
    x, ops = _as_backend_array(colormap)
    if not ops.is_integer(x):
        raise TypeError(f"to_model_range expects an integer (uint8) colormap, got {x.dtype}")
    if x.dtype != ops.u8 and int(x.numel() if _is_torch(x) else x.size):
        lo, hi = ops.min_all(x), ops.max_all(x)
        if lo < 0 or hi > 255:
            raise ValueError(f"colormap values must lie in [0, 255], got [{lo}, {hi}]")
    # numpy indexes with any integer dtype; torch would read uint8 as a mask, so cast there.
    index = (
        x if isinstance(ops, _NumpyOps) or x.dtype in (ops.i32, ops.i64) else ops.astype(x, ops.i64)
    )
    return ops.asarray(_model_range_table(), ops.f32)[index]


def from_model_range(x: Array) -> Array:
    """Float in [-1, 1] -> uint8 in [0, 255]: clamp, scale, round half to even. Same layout."""
    arr, ops = _as_backend_array(x)
    if not ops.is_floating(arr):
        arr = ops.astype(arr, ops.f32)
    y = (ops.clip(arr, -1.0, 1.0) + 1.0) * 127.5
    return ops.astype(ops.clip(ops.rint(y), 0, 255), ops.u8)
