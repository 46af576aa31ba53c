"""Dense prediction maps on disk: entity ids and depth as compressed ``.npz`` files.

* ``seg/<clip_id>.npz``: key ``ids``, ``int32 (T, H, W)``, 0 = background, positive = entity.
* ``depth/<clip_id>.npz``: key ``depth``, ``float32 (T, H, W)``, normalised disparity in [0, 1]
  (1 = nearest), see CONVENTIONS.md.

Both are lossless (``np.savez_compressed``) and written atomically. Loaders validate what they read
and raise :class:`DenseMapError` naming the file and the problem, so a bad annotation is caught at
the boundary instead of surfacing as a shape error deep inside training.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from udpdiff.io.atomic import atomic_path

logger = logging.getLogger(__name__)

IDS_KEY = "ids"
DEPTH_KEY = "depth"


class DenseMapError(ValueError):
    """A dense map file is missing, unreadable or violates the on-disk contract."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"bad dense map {str(path)!r}: {problem}")


def _check_ids(path: Path, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 3:
        raise DenseMapError(path, f"ids must have shape (T, H, W), got ndim={ids.ndim} {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise DenseMapError(path, f"ids must be an integer array, got dtype {ids.dtype}")
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0:
            raise DenseMapError(path, f"ids must be >= 0 (0 = background), found {lo}")
        if hi > np.iinfo(np.int32).max:
            raise DenseMapError(path, f"id {hi} does not fit int32")
    return ids.astype(np.int32, copy=False)


def _check_depth(path: Path, depth: np.ndarray) -> np.ndarray:
    depth = np.asarray(depth)
    if depth.ndim != 3:
        raise DenseMapError(
            path, f"depth must have shape (T, H, W), got ndim={depth.ndim} {depth.shape}"
        )
    if not np.issubdtype(depth.dtype, np.floating):
        raise DenseMapError(path, f"depth must be a float array, got dtype {depth.dtype}")
    depth = depth.astype(np.float32, copy=False)
    if depth.size:
        n_nan = int(np.count_nonzero(~np.isfinite(depth)))
        if n_nan:
            raise DenseMapError(path, f"depth has {n_nan} NaN/inf values")
        lo, hi = float(depth.min()), float(depth.max())
        if lo < 0.0 or hi > 1.0:
            raise DenseMapError(
                path, f"depth must be normalised disparity in [0, 1], found range [{lo}, {hi}]"
            )
    return depth


def _save(path: Path, key: str, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        # Writing through a file object stops numpy from appending a second ".npz" suffix.
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **{key: array})


def _load(path: Path, key: str) -> np.ndarray:
    if not path.exists():
        raise DenseMapError(path, "file does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            if key not in data.files:
                raise DenseMapError(path, f"missing key {key!r} (keys present: {data.files})")
            return data[key]
    except DenseMapError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DenseMapError(path, f"not a readable .npz file ({exc})") from exc


def save_ids(path: str | os.PathLike, ids: np.ndarray) -> None:
    """Save entity ids ``(T, H, W)`` (any non-negative integer dtype; stored as int32)."""
    path = Path(path)
    _save(path, IDS_KEY, _check_ids(path, ids))


def load_ids(path: str | os.PathLike) -> np.ndarray:
    """Load and validate entity ids: returns ``int32 (T, H, W)``."""
    path = Path(path)
    return _check_ids(path, _load(path, IDS_KEY))


def save_depth(path: str | os.PathLike, depth: np.ndarray) -> None:
    """Save normalised disparity ``(T, H, W)`` in [0, 1] (stored as float32)."""
    path = Path(path)
    _save(path, DEPTH_KEY, _check_depth(path, depth))


def load_depth(path: str | os.PathLike) -> np.ndarray:
    """Load and validate depth: returns ``float32 (T, H, W)`` in [0, 1], no NaN."""
    path = Path(path)
    return _check_depth(path, _load(path, DEPTH_KEY))
