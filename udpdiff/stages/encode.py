"""The `encode` stage: segmentation and depth as Pixelplanes colormaps."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from udpdiff import pixelplanes, viz
from udpdiff.io.dense import load_depth, load_ids
from udpdiff.io.manifest import read_manifest, resolve
from udpdiff.io.video import read_video
from udpdiff.stages.common import (
    StepResult,
    clip_seed,
    fresh_tmp_dir,
    load_colormap,
    replace_dir,
    write_json,
)
from udpdiff.workers import map_clips

if TYPE_CHECKING:
    from udpdiff.config import Params
    from udpdiff.paths import ProjectPaths

logger = logging.getLogger(__name__)


def run(p: Params, paths: ProjectPaths) -> StepResult:
    """Segmentation -> random-colour Pixelplanes (or the UniGS baseline), depth -> Spectral."""
    pp = p.active.pixelplanes
    # read up front: the stage depends on all three whichever colormap is chosen (dvc.yaml lists them)
    mode, min_distance, grid_size = pp.segmentation, pp.min_color_distance, pp.grid_size
    df = read_manifest(paths.manifest)
    out = fresh_tmp_dir(paths.pixelplanes)
    jobs = [_EncodeJob(row.clip_id, resolve(paths.manifest, row.seg_path), resolve(paths.manifest, row.depth_path),
                       out, mode, min_distance, grid_size, clip_seed(p.seed, row.clip_id)) for row in df.itertuples()]
    done = map_clips(_encode_clip, jobs, desc="pixelplanes")
    palettes = {job.clip_id: palette for job, (palette, _, _) in zip(jobs, done, strict=True)}
    seg_acc = [acc for _, acc, _ in done]
    depth_err = [err for _, _, err in done]
    write_json(out / "palettes.json", palettes)
    replace_dir(out, paths.pixelplanes)
    first = df.iloc[0]
    preview = paths.outputs / "previews" / "pixelplanes.mp4"
    viz.write_side_by_side(
        preview,
        [read_video(resolve(paths.manifest, first.video_path)), load_colormap(paths, "segmentation", first.clip_id),
         load_colormap(paths, "depth", first.clip_id)],
        labels=["rgb", "segmentation", "depth"], fps=p.active.data.fps)
    return StepResult(metrics={"seg_roundtrip_pixel_acc": float(np.mean(seg_acc)),
                               "depth_roundtrip_mae": float(np.mean(depth_err))},
                      artifacts=[preview])


@dataclass(frozen=True)
class _EncodeJob:
    clip_id: str
    seg_path: Path
    depth_path: Path
    out: Path
    mode: str
    min_distance: float
    grid_size: int
    seed: int


def _encode_clip(job: _EncodeJob) -> tuple[dict, float, float]:
    """One clip's two colormaps, written; returns its palette and the lossless-roundtrip checks
    (a worker process's unit of work: the result depends on the job alone)."""
    ids, depth = load_ids(job.seg_path), load_depth(job.depth_path)
    if job.mode == "pixelplanes":
        entity_ids = np.unique(ids)
        palette = pixelplanes.make_palette(entity_ids[entity_ids != 0], seed=job.seed, min_distance=job.min_distance)
        seg_map, palette = pixelplanes.encode_segmentation(ids, palette=palette)
    else:
        seg_map, palette = pixelplanes.encode_location_aware(ids, grid_size=job.grid_size)
    depth_map = pixelplanes.encode_depth(depth)
    np.savez_compressed(_mk(job.out / "segmentation" / f"{job.clip_id}.npz"), colormap=seg_map)
    np.savez_compressed(_mk(job.out / "depth" / f"{job.clip_id}.npz"), colormap=depth_map)
    seg_acc = float((pixelplanes.decode_segmentation(seg_map, palette=palette) == ids).mean())
    depth_err = float(np.abs(pixelplanes.decode_depth(depth_map, method="continuous") - depth).mean())
    return palette.to_dict(), seg_acc, depth_err


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
