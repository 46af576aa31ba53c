"""The clip manifest: one parquet row per clip, the single source of truth for its schema.

Columns (:data:`MANIFEST_COLUMNS`, name -> dtype):

=================  =======  ====================================================================
``clip_id``        str      unique id; also the file stem of the clip's files
``video_path``     str      ``videos/<clip_id>.mp4``, relative to the manifest's folder
``num_frames``     int      readable frames in the video
``fps``            float    frames per second
``height``         int      frame height in pixels
``width``          int      frame width in pixels
``caption_long``   str      detailed caption (re-captioned; equals the short one if absent)
``caption_short``  str      brief caption (Panda-70M's original caption)
``seg_path``       str      ``seg/<clip_id>.npz`` or ``""`` when the clip has no entity map
``depth_path``     str      ``depth/<clip_id>.npz`` or ``""`` when the clip has no depth map
``num_entities``   int      distinct positive entity ids in the seg map (0 without one)
``motion_score``   float    mean apparent motion, pixels per frame at the stored resolution:
                            exact ground-truth translational flow for synthetic clips, mean
                            Farneback optical-flow magnitude for real clips
``aesthetic_score`` float   :func:`aesthetic_proxy`, a crude image-statistics proxy in [0, 1]
                            (NOT a learned aesthetic predictor)
``source``         str      ``"synthetic"`` or ``"panda70m"``
``split``          str      ``"train"`` or ``"val"``
=================  =======  ====================================================================

Curated clips may carry more columns, each named ``curation_<name>`` (:data:`EXTRA_PREFIX`): the
filter scores and provenance of :mod:`udpdiff.data.filters` (``curation_quality``,
``curation_motion``, ``curation_video_id``, ...). They are numbers (float64, NaN allowed) or strings,
stored after the columns above in name order; no stage depends on them.

Paths are relative to the folder holding ``manifest.parquet`` (so a dataset folder can move);
turn them into real paths with :func:`resolve`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from udpdiff.io.atomic import atomic_path

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.parquet"

#: Column name -> logical dtype ("str", "int", "float"). The order is the on-disk column order.
MANIFEST_COLUMNS: dict[str, str] = {
    "clip_id": "str",
    "video_path": "str",
    "num_frames": "int",
    "fps": "float",
    "height": "int",
    "width": "int",
    "caption_long": "str",
    "caption_short": "str",
    "seg_path": "str",
    "depth_path": "str",
    "num_entities": "int",
    "motion_score": "float",
    "aesthetic_score": "float",
    "source": "str",
    "split": "str",
}

#: Prefix of the optional extra columns (filter scores, provenance); any other unknown column is an error.
EXTRA_PREFIX = "curation_"
_EXTRA_RE = re.compile(r"^curation_[a-z0-9_]+$")

SOURCES = ("synthetic", "panda70m")
SPLITS = ("train", "val")

#: Storage dtype of each logical dtype.
_STORAGE = {"str": "str", "int": "int64", "float": "float64"}


class ManifestError(ValueError):
    """A manifest (or a frame meant to become one) violates the schema."""


def is_extra_column(name: object) -> bool:
    """Whether ``name`` is an allowed optional column (``curation_<lowercase name>``)."""
    return isinstance(name, str) and bool(_EXTRA_RE.match(name))


def _coerce(df: pd.DataFrame, where: str) -> pd.DataFrame:
    """Check columns and dtypes and return a copy with canonical column order and dtypes."""
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    extra = [c for c in df.columns if c not in MANIFEST_COLUMNS and not is_extra_column(c)]
    problems: list[str] = []
    if missing:
        problems.append(f"missing columns {missing}")
    if extra:
        problems.append(f"unknown columns {extra} (the schema lives in udpdiff/io/manifest.py; "
                        f"optional columns must be named {EXTRA_PREFIX}<name>)")
    if problems:
        raise ManifestError(f"{where}: " + "; ".join(problems))

    out = pd.DataFrame(index=pd.RangeIndex(len(df)))
    for name, kind in MANIFEST_COLUMNS.items():
        col = df[name].reset_index(drop=True)
        n_null = int(col.isna().sum())
        if n_null:
            raise ManifestError(
                f"{where}: column {name!r} has {n_null} null values (use '' for absent paths)"
            )
        if kind == "str":
            bad = [v for v in col.tolist() if not isinstance(v, str)]
            if bad:
                raise ManifestError(
                    f"{where}: column {name!r} must hold strings, found e.g. {bad[:3]!r}"
                )
            out[name] = col.astype(_STORAGE[kind])
        elif kind == "int":
            if not (pd.api.types.is_integer_dtype(col) and not pd.api.types.is_bool_dtype(col)):
                raise ManifestError(f"{where}: column {name!r} must be integer, got {col.dtype}")
            out[name] = col.astype(_STORAGE[kind])
        else:
            if not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
                raise ManifestError(f"{where}: column {name!r} must be numeric, got {col.dtype}")
            out[name] = col.astype(_STORAGE[kind])
    for name in sorted(c for c in df.columns if is_extra_column(c)):
        col = df[name].reset_index(drop=True)
        if pd.api.types.is_bool_dtype(col):
            raise ManifestError(f"{where}: extra column {name!r} must hold numbers or strings, got booleans")
        if pd.api.types.is_numeric_dtype(col):
            out[name] = col.astype("float64")
        elif all(isinstance(v, str) for v in col.tolist()):
            out[name] = col.astype("str")
        else:
            bad = [v for v in col.tolist() if not isinstance(v, str)][:3]
            raise ManifestError(f"{where}: extra column {name!r} must be all numbers or all strings, "
                                f"found e.g. {bad!r}")
    return out


def empty_manifest() -> pd.DataFrame:
    """A zero-row frame with the manifest's columns and dtypes."""
    return pd.DataFrame({n: pd.Series([], dtype=_STORAGE[k]) for n, k in MANIFEST_COLUMNS.items()})


def write_manifest(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Validate ``df`` against the schema and write it as parquet, atomically."""
    path = Path(path)
    clean = _coerce(df, f"manifest for {path}")
    with atomic_path(path, suffix=".parquet") as tmp:
        clean.to_parquet(tmp, index=False)
    logger.info("wrote manifest %s (%d clips)", path, len(clean))
    return path


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read a manifest; raise :class:`ManifestError` naming the file on schema problems."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest {path} does not exist")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises a zoo of error types for damaged files
        raise ManifestError(f"manifest {path} is not a readable parquet file ({exc})") from exc
    return _coerce(df, f"manifest {path}")


def resolve(manifest_path: str | os.PathLike, relpath: str) -> Path:
    """Turn a path stored in the manifest into a real path (relative to the manifest's folder)."""
    if not relpath:
        raise ValueError(f"empty path in manifest {manifest_path}")
    return Path(manifest_path).parent / relpath


def assign_splits(clip_ids: Sequence[str], val_fraction: float, seed: int = 0) -> list[str]:
    """Deterministic train/val split.

    Clips are ranked by a hash of ``(seed, clip_id)`` and the lowest ``round(val_fraction * n)``
    go to val (at least one when ``0 < val_fraction`` and there are two or more clips). Hashing
    instead of shuffling keeps a clip's split stable as long as the set of clips is the same,
    whatever order they arrive in.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(clip_ids)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, max(0, n - 1))  # always keep at least one training clip

    def key(cid: str) -> str:
        return hashlib.sha1(f"{seed}:{cid}".encode()).hexdigest()

    val = set(sorted(clip_ids, key=key)[:n_val])
    return ["val" if c in val else "train" for c in clip_ids]


def aesthetic_proxy(frames: np.ndarray) -> float:
    """Crude, honest image-statistics proxy for the ``aesthetic_score`` column, in [0, 1].

    Per frame: ``0.5 * contrast + 0.5 * colourfulness`` where contrast is the RMS contrast of
    luma (std of Y in [0, 1], divided by 0.5, its maximum) and colourfulness is the
    Hasler-Suesstrunk (2003) metric divided by 109 (their "extremely colourful" level), each
    clipped to [0, 1]; averaged over frames. Flat grey video scores 0. It says nothing about
    composition or content; a learned predictor (e.g. LAION aesthetics) can replace it later.
    """
    f = np.asarray(frames, dtype=np.float32)
    if f.ndim == 3:
        f = f[None]
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    luma = (0.299 * r + 0.587 * g + 0.114 * b) / 255.0
    contrast = np.clip(luma.reshape(len(f), -1).std(axis=1) / 0.5, 0.0, 1.0)
    rg = (r - g).reshape(len(f), -1)
    yb = (0.5 * (r + g) - b).reshape(len(f), -1)
    colourful = np.sqrt(rg.std(axis=1) ** 2 + yb.std(axis=1) ** 2) + 0.3 * np.sqrt(
        rg.mean(axis=1) ** 2 + yb.mean(axis=1) ** 2
    )
    colourful = np.clip(colourful / 109.0, 0.0, 1.0)
    return float(np.mean(0.5 * contrast + 0.5 * colourful))
