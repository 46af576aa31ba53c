"""The `data` stage: synthetic clips with exact ground truth, or curated Panda-70M clips."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from udpdiff.devices import default_device
from udpdiff.io.manifest import read_manifest
from udpdiff.stages.common import (
    StepResult,
)

if TYPE_CHECKING:
    from udpdiff.config import Params
    from udpdiff.paths import ProjectPaths

logger = logging.getLogger(__name__)


def synthesize(p: Params, paths: ProjectPaths) -> StepResult:
    from udpdiff.data.synthetic import synthesize_dataset

    d = p.active.data
    manifest = synthesize_dataset(paths.clips, num_clips=d.num_clips, num_frames=d.num_frames, height=d.height,
                                  width=d.width, fps=d.fps, seed=p.seed, val_fraction=d.val_fraction)
    df = read_manifest(manifest)
    return StepResult(metrics=_dataset_stats(df), artifacts=[manifest])


def curate(p: Params, paths: ProjectPaths) -> StepResult:
    from udpdiff.data.curate import ingest_panda70m

    src = p.active.data.panda70m
    if not (src.csv and src.video_dir):
        raise ValueError("data.panda70m.csv and data.panda70m.video_dir must be set for source: panda70m")
    from udpdiff.annotators import LazyAnnotator

    # loaded when a clip first lacks a map; missing weights then stop the stage (no silently unlabelled data)
    device = default_device()
    annotators = {kind: LazyAnnotator(ref, device) for kind, ref in
                  (("seg", src.segmentation_annotator), ("depth", src.depth_annotator)) if ref is not None}
    manifest, rejects = ingest_panda70m(src.csv, src.video_dir, paths.clips, min_frames=p.active.data.num_frames,
                                        seg_dir=src.seg_dir, depth_dir=src.depth_dir,
                                        val_fraction=p.active.data.val_fraction, seed=p.seed,
                                        annotators=annotators)
    df = read_manifest(manifest)
    stats = _dataset_stats(df)
    stats["rejected_clips"] = float(len(pd.read_csv(rejects))) if Path(rejects).stat().st_size else 0.0
    return StepResult(metrics=stats, artifacts=[manifest, Path(rejects)])


def _dataset_stats(df: pd.DataFrame) -> dict[str, float]:
    return {
        "clips": float(len(df)),
        "train_clips": float((df["split"] == "train").sum()),
        "val_clips": float((df["split"] == "val").sum()),
        "mean_entities": float(df["num_entities"].mean()),
        "mean_motion_score": float(df["motion_score"].mean()),
    }


def run(p: Params, paths: ProjectPaths) -> StepResult:
    """The dataset stage follows the profile's source."""
    return synthesize(p, paths) if p.active.data.source == "synthetic" else curate(p, paths)
