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
the tensor's device and returns torch there. Both backends run the same code, written once against
the Python array API standard (``array-api-compat`` supplies either library's namespace; a few
small helpers cover what the standard lacks, such as a scatter-add), and all decisions (nearest
colour, clustering) are computed with integer-exact arithmetic, so the numpy and torch results are
identical. Work is vectorised over pixels; pixels are first reduced to their unique colours (a
generated video has far fewer distinct colours than pixels), and the remaining distance
computations are chunked to bound memory. Cost of the nearest-colour steps is O(unique colours x
palette size).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import array_api_compat.numpy as numpy_xp
import numpy as np
from array_api_compat import array_namespace, is_torch_array, is_torch_namespace
from array_api_compat import device as device_of
from array_api_compat import size as size_of

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
# Backends: kernels take ``xp``, the array API namespace of their inputs (numpy's or torch's, via
# array-api-compat), and create arrays on their inputs' device. Indexing, arithmetic, ``//`` and
# the methods ``.reshape``, ``.sum``, ``.all``, ``.min``, ``.max`` need no namespace (whole-array
# ``.min()`` rather than ``xp.min``: torch's ``amin`` behind it is ~3x slower on int64). The
# standard leaves the order of ``unique_inverse``'s values open; array-api-compat's sorts them for
# numpy and torch alike, which the searches and tie-breaks below rely on. numpy and torch spell
# ``bincount`` alike, outside the standard; the helpers below cover the rest.
# --------------------------------------------------------------------------------------------

# Integer dtypes accepted for ids and colormaps (bool counts as an integer here).
_INTEGER_KINDS = ("integral", "bool")


def _as_array(x: Any) -> tuple[Any, Any]:
    """Return ``x`` as a numpy array or torch tensor plus its namespace (lists become numpy)."""
    if not is_torch_array(x):
        x = np.asarray(x)
    return x, array_namespace(x)


def _from_host(xp: Any, a: Any, dtype: Any, device: Any) -> Any:
    """Host data (a list or a cached numpy table) as an ``xp`` array of ``dtype`` on ``device``."""
    if is_torch_namespace(xp) and isinstance(a, np.ndarray) and not a.flags.writeable:
        a = a.copy()  # cached tables are read-only; torch wants writable memory to wrap
    return xp.asarray(a, dtype=dtype, device=device)


def _unique_sorted(xp: Any, x: Any) -> Any:
    """Sorted distinct values of a 1-D array. Not ``unique_values``: the standard leaves its order
    open, and numpy >= 2.3 computes it with a hash table, ~20x slower than sorting on large
    integer arrays (17 s vs 1 s for 2**24 ids)."""
    s = xp.sort(x, stable=False)
    return xp.concat([s[:1], s[1:][s[1:] != s[:-1]]])


def _segment_sum(xp: Any, idx: Any, values: Any, n: int) -> Any:
    """(n,) int64 sums of integer ``values`` grouped by ``idx`` in [0, n), exactly."""
    if is_torch_namespace(xp):
        # Integer scatter-add: exact and order independent (deterministic on GPU too).
        out = xp.zeros(n, dtype=xp.int64, device=device_of(idx))
        return out.index_add_(0, idx, xp.astype(values, xp.int64, copy=False))
    # float64 bincount is exact for integer sums below 2**53 (always true here).
    return np.bincount(idx, weights=values.astype(np.float64), minlength=n).astype(np.int64)


def _small_to_numpy(x: Any) -> np.ndarray:
    """Copy a *small* summary (e.g. the distinct ids of a video) to a numpy array on the host.

    Used only where the result must live on the host anyway (palettes are numpy); the video
    itself never leaves its device.
    """
    if is_torch_array(x):
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


def _pack_rgb(xp: Any, rgb: Any) -> Any:
    """(..., 3) integer colours -> (...,) int64 24-bit codes ``r * 65536 + g * 256 + b``."""
    if isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8:
        # Fast path (one copy instead of six passes): bytes (0, r, g, b) read as big-endian u32.
        buf = np.zeros(rgb.shape[:-1] + (4,), dtype=np.uint8)
        buf[..., 1:] = rgb
        return buf.view(">u4")[..., 0].astype(np.int64)
    if rgb.dtype == xp.uint8:
        r32 = xp.astype(rgb, xp.int32)  # int32 arithmetic: half the memory traffic of int64
        return xp.astype((r32[..., 0] << 16) | (r32[..., 1] << 8) | r32[..., 2], xp.int64)
    rgb = xp.astype(rgb, xp.int64, copy=False)
    return (rgb[..., 0] * 65536) + (rgb[..., 1] * 256) + rgb[..., 2]


def _unpack_rgb(xp: Any, codes: Any) -> Any:
    return xp.stack([codes // 65536, (codes // 256) % 256, codes % 256], axis=-1)


def _distinct_entity_ids(entity_ids: Any) -> np.ndarray:
    """Sorted distinct positive ids of an id video / list / tensor, as host int64."""
    if not (is_torch_array(entity_ids) or isinstance(entity_ids, (np.ndarray, list, tuple))):
        entity_ids = list(entity_ids)  # sets, ranges, generators, dict keys
    arr, xp = _as_array(entity_ids)
    if size_of(arr) == 0:
        return np.zeros(0, dtype=np.int64)
    if not xp.isdtype(arr.dtype, _INTEGER_KINDS):
        raise TypeError(f"entity ids must be integers, got {arr.dtype}")
    flat = xp.astype(arr.reshape(-1), xp.int64, copy=False)
    lo, hi = flat.min().item(), flat.max().item()
    if lo < 0:
        raise ValueError(f"entity ids must be non-negative (0 = background), got {lo}")
    if int(flat.shape[0]) >= _HIST_UNIQUE_MIN and hi < _N_CODES:
        # Large id videos with small ids: a histogram is much faster than sorting every pixel.
        uniq = xp.nonzero(xp.bincount(flat, minlength=hi + 1) > 0)[0]
    else:
        uniq = _unique_sorted(xp, flat)
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
        return _unpack_rgb(numpy_xp, codes)
    colors = rng.integers(0, 256, size=(k, 3), dtype=np.int64)
    while True:
        codes = _pack_rgb(numpy_xp, colors)
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


def _unique_colors(xp: Any, rgb_flat: Any) -> tuple[Any, Any, Any]:
    """Distinct colours of (N, 3) pixels: (codes (M,), inverse (N,), counts (M,)), codes sorted."""
    codes = _pack_rgb(xp, rgb_flat)
    n = int(codes.shape[0])
    if n < _HIST_UNIQUE_MIN:
        uniq, inverse = xp.unique_inverse(codes)  # sorted (see Backends)
        return uniq, inverse, xp.bincount(inverse, minlength=int(uniq.shape[0]))
    # A 2**24-bin histogram replaces the sort: O(N) and, for large N, several times faster.
    hist = xp.bincount(codes, minlength=_N_CODES)
    uniq = xp.nonzero(hist > 0)[0]
    lut = xp.zeros(_N_CODES, dtype=xp.int64, device=device_of(codes))
    lut[uniq] = xp.arange(int(uniq.shape[0]), device=device_of(codes))
    return uniq, lut[codes], hist[uniq]


def _nearest(xp: Any, points: Any, centres: Any) -> tuple[Any, Any]:
    """Nearest centre of each point and its squared distance, exactly.

    Inputs are integer-valued (M, 3) / (C, 3) arrays with values in [0, 255]. The squared
    distances are computed in float32 via ``|p|^2 - 2 p.c + |c|^2``; every intermediate is an
    integer below 2**24, so the result is exact whatever order the BLAS sums in -- which is what
    makes numpy, torch-CPU and torch-CUDA agree bit for bit. Ties go to the lowest index.
    Returns (idx int64 (M,), d2 int64 (M,)).
    """
    p_all = xp.astype(points, xp.float32, copy=False)
    c = xp.astype(centres, xp.float32, copy=False)
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
        k = xp.argmin(partial, axis=1)  # first minimum on ties, on both backends
        p2 = p[:, 0] * p[:, 0] + p[:, 1] * p[:, 1] + p[:, 2] * p[:, 2]
        idx_parts.append(k)
        d2_parts.append(p2 + xp.take_along_axis(partial, k[:, None], axis=1)[:, 0])
    if not idx_parts:
        empty = xp.zeros(0, dtype=xp.int64, device=device_of(points))
        return empty, empty
    idx = xp.astype(xp.concat(idx_parts), xp.int64, copy=False)
    return idx, xp.astype(xp.concat(d2_parts), xp.int64)


def _tolerance_d2(tolerance: float) -> int:
    """Integer squared-distance threshold equivalent to ``distance <= tolerance``."""
    if not (tolerance >= 0) or not math.isfinite(tolerance):
        raise ValueError(f"tolerance must be finite and >= 0, got {tolerance}")
    return int(math.floor(float(tolerance) ** 2))


def _check_colormap(xp: Any, colormap: Any) -> Any:
    if colormap.ndim < 1 or int(colormap.shape[-1]) != 3:
        raise ValueError(f"colormap must have shape (..., 3), got {tuple(colormap.shape)}")
    if not xp.isdtype(colormap.dtype, _INTEGER_KINDS):
        raise TypeError(
            f"colormap must be an integer (uint8) array, got {colormap.dtype}; convert model "
            f"outputs with from_model_range() first"
        )
    flat = colormap.reshape(-1, 3)
    if flat.dtype != xp.uint8 and int(flat.shape[0]) > 0:
        lo, hi = flat.min().item(), flat.max().item()
        if lo < 0 or hi > 255:
            raise ValueError(f"colormap values must lie in [0, 255], got [{lo}, {hi}]")
    return flat


# --------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------


def _palette_arrays(xp: Any, palette: Palette, device: Any) -> tuple[Any, Any]:
    ids = _from_host(xp, palette.ids, xp.int64, device)
    return ids, _from_host(xp, palette.colors, xp.int64, device)


def encode_segmentation(
    ids: Array, seed: int = 0, palette: Palette | None = None
) -> tuple[Array, Palette]:
    """Entity-id video ``(T, H, W)`` -> Pixelplanes colormap ``(T, H, W, 3)`` uint8 and its palette.

    Without ``palette`` one is drawn with :func:`make_palette` (``seed``) for the ids present.
    The colour of an entity is the same in every frame. With ``palette``, every id in ``ids``
    must be in it (``ValueError`` lists the missing ones).
    """
    x, xp = _as_array(ids)
    if not xp.isdtype(x.dtype, _INTEGER_KINDS):
        raise TypeError(f"ids must be an integer array, got {x.dtype}")
    if palette is None:
        palette = make_palette(x, seed)
    dev = device_of(x)
    pal_ids, pal_colors = _palette_arrays(xp, palette, dev)
    flat = x.reshape(-1)
    n_pal = int(pal_ids.shape[0])
    hi = flat.max().item() if int(flat.shape[0]) else 0
    lo = flat.min().item() if int(flat.shape[0]) else 0
    if lo >= 0 and hi < _N_CODES:
        # Small ids (the usual case): an id -> palette-row table and one gather; -1 = missing.
        table = xp.full(int(hi) + 1, -1, dtype=xp.int64, device=dev)
        in_range = pal_ids <= hi  # palette ids beyond the video's largest id are not needed
        table[pal_ids[in_range]] = xp.arange(n_pal, device=dev)[in_range]
        # int32/int64 index directly (no copy); torch would read uint8 as a mask, so cast others.
        index = flat if flat.dtype in (xp.int32, xp.int64) else xp.astype(flat, xp.int64)
        pos = table[index]
        missing_mask = pos < 0
    else:
        # Huge or negative ids: binary search over the sorted palette ids (past the end -> last).
        flat = xp.astype(flat, xp.int64, copy=False)
        pos = xp.minimum(xp.searchsorted(pal_ids, flat), n_pal - 1)
        missing_mask = pal_ids[pos] != flat
    if xp.any(missing_mask):
        flat = xp.astype(flat, xp.int64, copy=False)
        missing = _small_to_numpy(_unique_sorted(xp, flat[missing_mask])).astype(np.int64)
        raise ValueError(
            f"ids contain {missing.size} entities not in the palette: {missing[:20].tolist()}"
            + (" ..." if missing.size > 20 else "")
        )
    out = xp.astype(pal_colors, xp.uint8)[pos]
    return out.reshape(tuple(x.shape) + (3,)), palette


def _nms(xp: Any, pos: Any, thr: int) -> Any:
    """Greedy non-maximum suppression of points given in priority order.

    Returns a boolean keep-mask equal to the sequential rule "keep a point unless it lies within
    ``sqrt(thr)`` of an already kept, higher-priority point", computed in parallel rounds over
    the list of conflicting pairs (a point is decided once every higher-priority conflicting
    point is decided), so the number of Python iterations is the length of the longest chain of
    dependencies, not the number of points.
    """
    n = int(pos.shape[0])
    dev = device_of(pos)
    if n == 0:
        return xp.zeros(0, dtype=xp.bool, device=dev)
    # Conflicting pairs (i < j), chunked over rows.
    pi_parts, pj_parts = [], []
    p = xp.astype(pos, xp.float32, copy=False)
    p2 = p[:, 0] * p[:, 0] + p[:, 1] * p[:, 1] + p[:, 2] * p[:, 2]
    rows = max(1, _CHUNK_ELEMS // n)
    col = xp.arange(n, device=dev)
    for s in range(0, n, rows):
        blk = p[s : s + rows]
        d2 = (p2[s : s + rows, None] - 2.0 * (blk @ p.T)) + p2[None, :]
        row = xp.arange(int(blk.shape[0]), device=dev) + s
        conflict = (d2 <= float(thr)) & (col[None, :] > row[:, None])
        i, j = xp.nonzero(conflict)  # row-major order
        pi_parts.append(i + s)
        pj_parts.append(j)
    pi = xp.concat(pi_parts)
    pj = xp.concat(pj_parts)
    # status: 0 undecided, 1 kept, 2 suppressed
    status = xp.zeros(n, dtype=xp.int64, device=dev)
    while True:
        undecided = status == 0
        if not xp.any(undecided):
            break
        si, sj = status[pi], status[pj]
        suppressed = xp.bincount(pj[(si == 1) & (sj == 0)], minlength=n) > 0
        status = xp.where(undecided & suppressed, 2, status)
        undecided = status == 0
        sj = status[pj]
        blocked = xp.bincount(pj[(status[pi] == 0) & (sj == 0)], minlength=n) > 0
        status = xp.where(undecided & ~blocked, 1, status)
    return status == 1


_NEIGHBOUR_OFFSETS = np.array(
    [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)], dtype=np.int64
)


def _seed_colors(xp: Any, rgb: Any, counts: Any, thr: int, tolerance: float) -> Any:
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
    cells, cinv = xp.unique_inverse(ccode)  # sorted (see Backends), as searchsorted needs
    n_cells = int(cells.shape[0])
    n_cell = _segment_sum(xp, cinv, counts, n_cells)
    s_cell = xp.stack([_segment_sum(xp, cinv, rgb[:, ch] * counts, n_cells) for ch in range(3)], 1)
    cxyz = xp.stack([cells // (nc * nc), (cells // nc) % nc, cells % nc], axis=1)
    dev = device_of(rgb)
    dens = xp.zeros(n_cells, dtype=xp.int64, device=dev)
    sums = xp.zeros((n_cells, 3), dtype=xp.int64, device=dev)
    neighbours = []
    for off in _NEIGHBOUR_OFFSETS.tolist():  # 27 fixed offsets, each vectorised over bins
        nb = cxyz + xp.asarray(off, dtype=xp.int64, device=dev)[None, :]
        valid = ((nb >= 0) & (nb < nc)).all(1)
        nbcode = (nb[:, 0] * nc + nb[:, 1]) * nc + nb[:, 2]
        at = xp.minimum(xp.searchsorted(cells, nbcode), n_cells - 1)  # past the end -> last
        found = valid & (cells[at] == nbcode)
        dens = dens + xp.where(found, n_cell[at], 0)
        sums = sums + xp.where(found[:, None], s_cell[at], 0)
        neighbours.append((at, found))
    if use_local_max:
        nb_max = xp.zeros(n_cells, dtype=xp.int64, device=dev)
        for at, found in neighbours:
            nb_max = xp.maximum(nb_max, xp.where(found, dens[at], 0))
        cand = xp.nonzero(dens >= nb_max)[0]
    else:
        cand = xp.arange(n_cells, device=dev)
    d = dens[cand]
    centre = (sums[cand] + (d // 2)[:, None]) // d[:, None]  # rounded mean, exact in integers
    order = xp.argsort(-d, stable=True)  # densest first; ties by bin code (deterministic)
    centre = centre[order]
    return centre[xp.nonzero(_nms(xp, centre, thr))[0]]


def _lloyd_step(xp: Any, rgb: Any, counts: Any, centres: Any, thr: int) -> tuple[Any, Any]:
    """One weighted k-means update using only colours within the tolerance of their centre.
    Returns (new centres, pixel weight per centre). Centres are rounded to integers so the next
    distance computation stays exact."""
    idx, d2 = _nearest(xp, rgb, centres)
    w = xp.where(d2 <= thr, counts, 0)
    n = int(centres.shape[0])
    weight = _segment_sum(xp, idx, w, n)
    sums = xp.stack([_segment_sum(xp, idx, rgb[:, ch] * w, n) for ch in range(3)], axis=1)
    safe = xp.maximum(weight, 1)
    new = (sums + (safe // 2)[:, None]) // safe[:, None]
    new = xp.where((weight > 0)[:, None], new, centres)
    return new, weight


def _cluster_colors(
    xp: Any, rgb: Any, counts: Any, tolerance: float, merge_radius: float, n_iter: int = 2
) -> tuple[Any, Any]:
    """Cluster distinct colours (M, 3) weighted by pixel counts.

    Returns (centres (C, 3) int64, label (M,) int64 with -1 for colours farther than
    ``tolerance`` from every centre). Clusters whose centres end up within ``merge_radius`` of a
    heavier cluster are merged into it.
    """
    thr = _tolerance_d2(tolerance)
    thr_merge = _tolerance_d2(merge_radius)
    centres = _seed_colors(xp, rgb, counts, thr_merge, merge_radius)
    for _ in range(max(1, n_iter)):
        centres, weight = _lloyd_step(xp, rgb, counts, centres, thr)
    # Merge: seeds in the noise tail of a colour drift towards it during the updates.
    order = xp.argsort(-weight, stable=True)
    centres = centres[order]
    centres = centres[xp.nonzero(_nms(xp, centres, thr_merge))[0]]
    centres, _ = _lloyd_step(xp, rgb, counts, centres, thr)
    idx, d2 = _nearest(xp, rgb, centres)
    label = xp.where(d2 <= thr, idx, -1)
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
    x, xp = _as_array(colormap)
    flat = _check_colormap(xp, x)
    dev = device_of(x)
    out_shape = tuple(x.shape[:-1])
    thr = _tolerance_d2(tolerance)
    codes, inverse, counts = _unique_colors(xp, flat)
    rgb = _unpack_rgb(xp, codes)

    if palette is not None:
        pal_ids, pal_colors = _palette_arrays(xp, palette, dev)
        k, d2 = _nearest(xp, rgb, pal_colors)
        uniq_ids = xp.where(d2 <= thr, pal_ids[k], 0)
        if min_pixels > 0:
            # Pixel count per palette row, then drop small entities (never the background row).
            rowcount = _segment_sum(xp, k, xp.where(d2 <= thr, counts, 0), int(pal_ids.shape[0]))
            small = rowcount < int(min_pixels)
            uniq_ids = xp.where(small[k], 0, uniq_ids)
        # int32 per the conventions, unless the palette's ids do not fit.
        out_dtype = xp.int32 if int(palette.ids[-1]) <= np.iinfo(np.int32).max else xp.int64
        return xp.astype(uniq_ids, out_dtype)[inverse].reshape(out_shape)

    if int(codes.shape[0]) == 0:
        return xp.zeros(out_shape, dtype=xp.int32, device=dev)
    merge = tolerance if merge_radius is None else merge_radius
    centres, label = _cluster_colors(xp, rgb, counts, tolerance, merge)
    n_c = int(centres.shape[0])
    assigned = label >= 0
    lab = xp.where(assigned, label, 0)
    pixcount = _segment_sum(xp, lab, xp.where(assigned, counts, 0), n_c)
    keep = pixcount >= max(int(min_pixels), 1)
    background = xp.asarray([BACKGROUND_COLOR], dtype=xp.int64, device=dev)
    bg_idx, bg_d2 = _nearest(xp, background, centres)
    is_bg = (xp.arange(n_c, device=dev) == bg_idx[0]) & (bg_d2[0] <= thr)
    keep = keep & ~is_bg
    # Number kept clusters 1..K by descending pixel count (stable: ties keep centre order).
    order = xp.argsort(-xp.where(keep, pixcount, -1), stable=True)
    rank = xp.zeros(n_c, dtype=xp.int64, device=dev)
    rank[order] = xp.arange(n_c, device=dev) + 1
    table = xp.where(keep, rank, 0)
    uniq_ids = xp.where(assigned, table[lab], 0)
    return xp.astype(uniq_ids, xp.int32)[inverse].reshape(out_shape)


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
    x, xp = _as_array(ids)
    if not xp.isdtype(x.dtype, _INTEGER_KINDS):
        raise TypeError(f"ids must be an integer array, got {x.dtype}")
    squeeze = x.ndim == 2
    if squeeze:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"ids must have shape (T, H, W) or (H, W), got {tuple(x.shape)}")
    t_len, h, w = (int(s) for s in x.shape)
    dev = device_of(x)
    flat = xp.astype(x.reshape(-1), xp.int64, copy=False)
    if int(flat.shape[0]) and flat.min().item() < 0:
        raise ValueError(
            f"entity ids must be non-negative (0 = background), got {flat.min().item()}"
        )
    uniq, inv = xp.unique_inverse(flat)  # sorted (see Backends)
    n_u = int(uniq.shape[0])
    # First frame of each distinct id: presence table (T, n_u) -> first True along T (as uint8:
    # torch's argmax rejects bool).
    tt = xp.arange(int(flat.shape[0]), device=dev) // (h * w)
    present = xp.bincount(tt * n_u + inv, minlength=t_len * n_u).reshape(t_len, n_u) > 0
    first_t = xp.argmax(xp.astype(present, xp.uint8), axis=0)
    # Centroid over that frame only, in pixel-centre coordinates, with exact integer sums.
    sel = xp.nonzero(tt == first_t[inv])[0]
    inv_sel = inv[sel]
    pix = sel % (h * w)
    cnt = xp.bincount(inv_sel, minlength=n_u)
    ysum = _segment_sum(xp, inv_sel, pix // w, n_u)
    xsum = _segment_sum(xp, inv_sel, pix % w, n_u)
    # cell = floor(((sum + n/2) / n) * g / size), in integers: (2*sum + n) * g // (2 * n * size)
    row = xp.clip(((2 * ysum + cnt) * grid_size) // (2 * cnt * h), 0, grid_size - 1)
    col = xp.clip(((2 * xsum + cnt) * grid_size) // (2 * cnt * w), 0, grid_size - 1)
    grid = _from_host(xp, _location_grid_colors(grid_size), xp.int64, dev)
    colors = grid[row * grid_size + col]
    bg = xp.asarray([BACKGROUND_COLOR], dtype=xp.int64, device=dev)
    colors = xp.where((uniq == 0)[:, None], bg, colors)
    out = xp.astype(colors, xp.uint8)[inv].reshape(tuple(x.shape) + (3,))
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


def _lut_arrays(xp: Any, device: Any) -> tuple[Any, Any]:
    lut = _from_host(xp, depth_lut(), xp.float32, device)
    return lut[:-1], lut[1:] - lut[:-1]  # segment starts and directions (integer-valued)


def encode_depth(depth: Array) -> Array:
    """Depth ``(...)`` float in [0, 1] (disparity, 1 = near) -> Spectral colormap ``(..., 3)``.

    ``v`` maps to the point at parameter ``255 * v`` of the piecewise-linear curve through the
    256 LUT colours (linear interpolation between adjacent samples, resolved to 1/256 of a LUT
    step, far below what a uint8 colour can express), rounded to one of the 8 integer colours
    around it -- the one that decodes best (see :func:`_depth_encode_table`). Values within 1e-6
    outside [0, 1] are clipped; NaN or anything farther out raises ``ValueError``.
    """
    x, xp = _as_array(depth)
    if not xp.isdtype(x.dtype, "real floating"):
        x = xp.astype(x, xp.float32)
    flat = xp.astype(x.reshape(-1), xp.float32, copy=False)
    if int(flat.shape[0]):
        lo, hi = flat.min().item(), flat.max().item()  # NaN propagates into min/max
        if math.isnan(lo) or math.isnan(hi):
            raise ValueError(f"depth contains {int(xp.isnan(flat).sum())} NaN values")
        if lo < -1e-6 or hi > 1.0 + 1e-6:
            raise ValueError(
                f"depth must lie in [0, 1] (normalised disparity), got values in "
                f"[{lo:.6g}, {hi:.6g}]"
            )
    table = _from_host(xp, _depth_encode_table(), xp.uint8, device_of(x))
    n_pos = int(table.shape[0]) - 1
    # Round half to even (both backends); in [0, n_pos] after the clip.
    pos = xp.round(xp.clip(flat, 0.0, 1.0) * float(n_pos))
    return table[xp.astype(pos, xp.int64)].reshape(tuple(x.shape) + (3,))


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
    codes, inverse, _ = _unique_colors(numpy_xp, cand.reshape(-1, 3).astype(np.uint8))
    rgb = _unpack_rgb(numpy_xp, codes)
    k, _ = _nearest(numpy_xp, rgb, depth_lut().astype(np.int64))
    step = 1.0 / (DEPTH_LUT_SIZE - 1)
    target = j[:, None] / n_pos
    err_cont = np.abs(
        _project_on_curve(numpy_xp, rgb).astype(np.float64)[inverse].reshape(-1, 8) - target
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


def _project_on_curve(xp: Any, rgb: Any) -> Any:
    """Depth of each distinct colour (M, 3): closest point on the piecewise-linear LUT curve.

    For every segment a -> a + d the closest point is ``t = clamp((p - a).d / |d|^2, 0, 1)``;
    take the segment with the smallest distance and return ``(i + t) / 255``. The integer parts
    ((p - a).d, |p - a|^2) come from float32 matmuls that are exact (integers < 2**24); the rest
    is the same sequence of IEEE operations on both backends.
    """
    dev = device_of(rgb)
    start, direction = _lut_arrays(xp, dev)
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
    dd = xp.maximum(dd, 1.0)  # no zero-length segments in Spectral; guard anyway
    p_all = xp.astype(rgb, xp.float32, copy=False)
    rows = max(1, _CHUNK_ELEMS // (4 * n_seg))  # several (rows, 255) temporaries live at once
    parts = []
    for s in range(0, int(p_all.shape[0]), rows):  # bounded chunk loop
        p = p_all[s : s + rows]
        p2 = p[:, 0] * p[:, 0] + p[:, 1] * p[:, 1] + p[:, 2] * p[:, 2]
        pa2 = (p2[:, None] - 2.0 * (p @ start.T)) + a2[None, :]  # |p - a|^2
        num = (p @ direction.T) - ad[None, :]  # (p - a).d
        t = xp.clip(num / dd[None, :], 0.0, 1.0)
        dist = (pa2 - (2.0 * t) * num) + (t * t) * dd[None, :]  # |p - a - t d|^2
        k = xp.argmin(dist, axis=1)
        tk = xp.take_along_axis(t, k[:, None], axis=1)[:, 0]
        parts.append(xp.astype(k, xp.float32) + tk)
    if not parts:
        return xp.zeros(0, dtype=xp.float32, device=dev)
    # Divide by a (1,) array, not a Python scalar: PyTorch's CUDA kernel turns division by a
    # scalar into multiplication by its reciprocal (1 ulp off); array division is IEEE on all.
    return xp.concat(parts) / xp.asarray([float(DEPTH_LUT_SIZE - 1)], dtype=xp.float32, device=dev)


def decode_depth(colormap: Array, method: Literal["nearest", "continuous"] = "continuous") -> Array:
    """Spectral colormap ``(..., 3)`` uint8 -> depth ``(...)`` float32 in [0, 1] (1 = near).

    ``"nearest"``: the paper's Appendix C -- nearest of the 256 sampled colours ``i`` gives
    ``i / 255`` (quantisation error up to 1/510). ``"continuous"``: projection onto the
    piecewise-linear curve through the samples, the inverse of :func:`encode_depth` up to uint8
    rounding.
    """
    if method not in ("nearest", "continuous"):
        raise ValueError(f"method must be 'nearest' or 'continuous', got {method!r}")
    x, xp = _as_array(colormap)
    flat = _check_colormap(xp, x)
    out_shape = tuple(x.shape[:-1])
    codes, inverse, _ = _unique_colors(xp, flat)
    rgb = _unpack_rgb(xp, codes)
    if method == "nearest":
        k, _ = _nearest(xp, rgb, _from_host(xp, depth_lut(), xp.int64, device_of(x)))
        uniq_depth = _from_host(xp, _lut_depths(), xp.float32, device_of(x))[k]
    else:
        uniq_depth = _project_on_curve(xp, rgb)
    return uniq_depth[inverse].reshape(out_shape)


# --------------------------------------------------------------------------------------------
# Model range
# --------------------------------------------------------------------------------------------


def to_model_range(colormap: Array) -> Array:
    """uint8 colormap -> float32 in [-1, 1] (``x / 127.5 - 1``), same shape and layout.

    Integer input must lie in [0, 255]; float input is rejected (it is probably already in model
    range).
    """
    x, xp = _as_array(colormap)
    if not xp.isdtype(x.dtype, _INTEGER_KINDS):
        raise TypeError(f"to_model_range expects an integer (uint8) colormap, got {x.dtype}")
    if x.dtype != xp.uint8 and size_of(x):
        lo, hi = x.min().item(), x.max().item()
        if lo < 0 or hi > 255:
            raise ValueError(f"colormap values must lie in [0, 255], got [{lo}, {hi}]")
    # numpy indexes with any integer dtype; torch would read uint8 as a mask, so cast there.
    cast = is_torch_array(x) and x.dtype not in (xp.int32, xp.int64)
    index = xp.astype(x, xp.int64) if cast else x
    return _from_host(xp, _model_range_table(), xp.float32, device_of(x))[index]


def from_model_range(x: Array) -> Array:
    """Float in [-1, 1] -> uint8 in [0, 255]: clamp, scale, round half to even. Same layout."""
    arr, xp = _as_array(x)
    if not xp.isdtype(arr.dtype, "real floating"):
        arr = xp.astype(arr, xp.float32)
    y = (xp.clip(arr, -1.0, 1.0) + 1.0) * 127.5
    return xp.astype(xp.clip(xp.round(y), 0, 255), xp.uint8)
