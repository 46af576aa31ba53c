"""What several stages share: the result type, atomic folder swaps, reading clips and colormaps."""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from udpdiff import pixelplanes
from udpdiff.io.atomic import write_text
from udpdiff.io.manifest import resolve
from udpdiff.io.video import read_video

if TYPE_CHECKING:
    from udpdiff.config import Params
    from udpdiff.paths import ProjectPaths

LogFn = Callable[[dict[str, float], int], None]


@dataclass
class StepResult:
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def write_json(path: Path, obj) -> Path:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")
    return path


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written folder into place (the old one is removed only after success)."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def fresh_tmp_dir(final: Path) -> Path:
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def clip_seed(seed: int, clip_id: str) -> int:
    """A per-clip seed independent of manifest order (crc32 is stable across runs/platforms)."""
    return (seed * 1_000_003 + zlib.crc32(clip_id.encode())) % 2**32


# -- data ---------------------------------------------------------------------------------------------


def load_colormap(paths: ProjectPaths, task: str, clip_id: str) -> np.ndarray:
    path = paths.pixelplanes / task / f"{clip_id}.npz"
    with np.load(path) as z:
        return z["colormap"]


def load_palette(paths: ProjectPaths, clip_id: str) -> pixelplanes.Palette:
    return pixelplanes.Palette.from_dict(json.loads((paths.pixelplanes / "palettes.json").read_text())[clip_id])


def read_clip(p: Params, paths: ProjectPaths, video_path: str) -> np.ndarray:
    """A manifest clip as the models see it: its first ``data.num_frames`` frames (the data contract
    guarantees at least that many, at the profile's size; curated clips may be longer)."""
    return read_video(resolve(paths.manifest, video_path), indices=list(range(p.active.data.num_frames)))


# -- models -------------------------------------------------------------------------------------------


def dense_picture(task: str, dense: np.ndarray, palette: pixelplanes.Palette | None = None) -> np.ndarray:
    """A decoded prediction re-rendered for people: Spectral depth, or ids in palette colours."""
    if task == "depth":
        return pixelplanes.encode_depth(np.clip(dense, 0.0, 1.0))
    return pixelplanes.encode_segmentation(dense, seed=0)[0] if palette is None else \
        pixelplanes.encode_segmentation(dense, palette=palette)[0]


RGB_ONLY = "rgb"  # the sample set of the RGB-only baseline (no dense task)


def sample_sets(p: Params) -> list[str]:
    """What the sample and evaluate stages produce per model: one set per task, or ``rgb``."""
    return list(p.active.train.tasks) or [RGB_ONLY]


def sample_seed(p: Params, index: int) -> int:
    """The seed of the ``index``-th clip of ``sample.split``: its sample (and the first member of its
    ensemble) in the sample stage, and its prediction in the validation during training, so that the
    last validation scores the draws the evaluation scores."""
    return p.seed + index


