"""The `encode` stage: segmentation and depth as Pixelplanes colormaps."""

from __future__ import annotations

import logging
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

if TYPE_CHECKING:
    from udpdiff.config import Params
    from udpdiff.paths import ProjectPaths

logger = logging.getLogger(__name__)


def run(p: Params, paths: ProjectPaths) -> StepResult:
    """Segmentation -> random-colour Pixelplanes (or the UniGS baseline), depth -> Spectral."""
    from tqdm.auto import tqdm

    pp = p.active.pixelplanes
    # read up front: the stage depends on all three whichever colormap is chosen (dvc.yaml lists them)
    mode, min_distance, grid_size = pp.segmentation, pp.min_color_distance, pp.grid_size
    df = read_manifest(paths.manifest)
    out = fresh_tmp_dir(paths.pixelplanes)
    palettes, seg_acc, depth_err = {}, [], []
    for row in tqdm(df.itertuples(), total=len(df), desc="pixelplanes", leave=False):
        ids = load_ids(resolve(paths.manifest, row.seg_path))
        depth = load_depth(resolve(paths.manifest, row.depth_path))
        if mode == "pixelplanes":
            entity_ids = np.unique(ids)
            palette = pixelplanes.make_palette(entity_ids[entity_ids != 0], seed=clip_seed(p.seed, row.clip_id),
                                               min_distance=min_distance)
            seg_map, palette = pixelplanes.encode_segmentation(ids, palette=palette)
        else:
            seg_map, palette = pixelplanes.encode_location_aware(ids, grid_size=grid_size)
        depth_map = pixelplanes.encode_depth(depth)
        np.savez_compressed(_mk(out / "segmentation" / f"{row.clip_id}.npz"), colormap=seg_map)
        np.savez_compressed(_mk(out / "depth" / f"{row.clip_id}.npz"), colormap=depth_map)
        palettes[row.clip_id] = palette.to_dict()
        seg_acc.append(float((pixelplanes.decode_segmentation(seg_map, palette=palette) == ids).mean()))
        depth_err.append(float(np.abs(pixelplanes.decode_depth(depth_map, method="continuous") - depth).mean()))
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


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
