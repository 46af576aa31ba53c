"""The `data` stage: synthetic clips with exact ground truth, or curated Panda-70M clips."""

from __future__ import annotations

import hashlib
import json
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
    from udpdiff.config import DataParams, Panda70MSource, Params
    from udpdiff.paths import ProjectPaths

logger = logging.getLogger(__name__)


def synthesize(p: Params, paths: ProjectPaths) -> StepResult:
    from udpdiff.data.synthetic import synthesize_dataset

    d = p.active.data
    manifest = synthesize_dataset(paths.clips, num_clips=d.num_clips, num_frames=d.num_frames, height=d.height,
                                  width=d.width, fps=d.fps, seed=p.seed, val_fraction=d.val_fraction)
    df = read_manifest(manifest)
    return StepResult(metrics=_dataset_stats(df), artifacts=[manifest])


def _annotators(src: Panda70MSource) -> dict:
    from udpdiff.annotators import LazyAnnotator

    # loaded when a clip first lacks a map; missing weights then stop the stage (no silently unlabelled data)
    device = default_device()
    return {kind: LazyAnnotator(ref, device) for kind, ref in
            (("seg", src.segmentation_annotator), ("depth", src.depth_annotator)) if ref is not None}


def curation_fingerprint(d: DataParams) -> str:
    """What decides a cut clip and its filter verdict: the clip geometry, ``cut`` and ``filters``
    (not the paths, not the subset size: growing ``num_clips`` reuses every clip cut before)."""
    cur = d.panda70m.curation
    assert cur is not None
    spec = {"num_frames": d.num_frames, "fps": d.fps, "height": d.height, "width": d.width,
            "cut": cur.cut.model_dump(mode="json"), "filters": cur.filters.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def curate_sources(p: Params, paths: ProjectPaths) -> StepResult:
    """Panda-70M source videos -> cut, filtered, labelled clips (``data.panda70m.curation``)."""
    from udpdiff.data.captioner import build_captioner, caption_stats, recaption_clips
    from udpdiff.data.curate import ingest_curated
    from udpdiff.data.cut import ClipCutter, read_panda_csv, select_clips
    from udpdiff.data.filters import build_filters, curate_clips
    from udpdiff.data.postprocess import PostprocessedSegmenter

    d = p.active.data
    src = d.panda70m
    cur = src.curation
    assert cur is not None
    unset = [k for k in ("csv", "source_dir", "cut_dir") if not getattr(cur, k)]
    if unset:
        raise ValueError(f"data.panda70m.curation: {', '.join(unset)} must be set to curate Panda-70M sources")
    root = Path(paths.root)
    csv, source_dir, cut_dir = (root / cur.csv, root / cur.source_dir, root / cur.cut_dir)  # absolute stays absolute
    if not source_dir.is_dir():
        raise FileNotFoundError(f"data.panda70m.curation.source_dir {source_dir} is not a directory")
    specs, bad_rows = read_panda_csv(csv)
    selected = select_clips(specs, d.num_clips, cur.cut.seed)
    cutter = ClipCutter.from_params(cur.cut, d.num_frames, d.fps, d.height, d.width)
    result = curate_clips(selected, source_dir, cut_dir, cutter, build_filters(cur.filters),
                          resume_key=curation_fingerprint(d))
    records, caption_rejects, caption_counts = result.records, [], {}
    if cur.recaption is not None:  # paper §3: long captions by Video-LLaVA
        recap = cur.recaption
        captions = recaption_clips(records, cut_dir / "videos", cut_dir / "captions", recap,
                                   lambda: build_captioner(recap, default_device()))
        records, caption_rejects = captions.records, captions.rejects
        caption_counts = {"recaptioned": float(captions.captioned), "captions_cached": float(captions.cached)}
    annotators = _annotators(src)
    if cur.seg_postprocess is not None and "seg" in annotators:  # paper §3.1: holes and empty area
        annotators["seg"] = PostprocessedSegmenter(annotators["seg"], cur.seg_postprocess)
    manifest, rejects, counts = ingest_curated(
        records, cut_dir / "videos", paths.clips, min_frames=d.num_frames,
        rejects=[*bad_rows, *result.rejects, *caption_rejects], seg_dir=_under(root, src.seg_dir),
        depth_dir=_under(root, src.depth_dir), val_fraction=d.val_fraction, seed=p.seed, annotators=annotators)
    df = read_manifest(manifest)
    stats = _dataset_stats(df)
    rej = pd.read_csv(rejects)
    codes = rej["reason"].astype(str).str.split(":", n=1).str[0] if len(rej) else pd.Series([], dtype=str)
    stats.update({
        "clips_in": float(len(selected)),
        "csv_bad_rows": float(len(bad_rows)),
        "cut": float(result.cut),
        "resumed": float(result.resumed),
        "rejected_clips": float(len(rej)),
        "annotated": float(counts["annotated"]),
        # failures: a clip that could not be processed, as opposed to one a filter rejected
        "failed": float(sum(1 for c in codes if c not in FILTER_CODES)),
    })
    stats.update({f"dropped_{code}": float(n) for code, n in sorted(codes.value_counts().items())})
    stats.update(caption_counts)
    # caption lengths in words (paper Fig 7: Panda-70M's captions against the long ones)
    stats.update(caption_stats(df["caption_short"], "caption_short"))
    stats.update(caption_stats(df["caption_long"], "caption_long"))
    return StepResult(metrics=stats, artifacts=[manifest, Path(rejects)])


#: reject codes that are a verdict on the clip (its length, resolution, content), not a failure
FILTER_CODES = frozenset({"duration", "resolution", "scene_cut", "static", "extreme_motion", "low_quality",
                          "too_short", "bad_timestamp"})


def _under(root: Path, path: str | None) -> Path | None:
    return None if path is None else root / path


def curate(p: Params, paths: ProjectPaths) -> StepResult:
    from udpdiff.data.curate import ingest_panda70m

    src = p.active.data.panda70m
    if src.curation is not None:
        return curate_sources(p, paths)
    if not (src.csv and src.video_dir):
        raise ValueError("data.panda70m.csv and data.panda70m.video_dir must be set for source: panda70m")
    annotators = _annotators(src)
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
