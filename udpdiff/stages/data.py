"""The `data` stage: synthetic clips with exact ground truth, or curated Panda-70M clips."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from tqdm.auto import tqdm

from udpdiff.devices import default_device
from udpdiff.io.manifest import read_manifest
from udpdiff.stages.common import (
    StepResult,
)

if TYPE_CHECKING:
    from udpdiff.config import Panda70MSource, Params
    from udpdiff.data.shards import ShardResult
    from udpdiff.paths import ProjectPaths

logger = logging.getLogger(__name__)


def synthesize(p: Params, paths: ProjectPaths) -> StepResult:
    from udpdiff.data.synthetic import synthesize_dataset

    d = p.active.data
    manifest = synthesize_dataset(paths.clips, num_clips=d.num_clips, num_frames=d.num_frames, height=d.height,
                                  width=d.width, fps=d.fps, seed=p.seed, val_fraction=d.val_fraction)
    df = read_manifest(manifest)
    return StepResult(metrics=_dataset_stats(df), artifacts=[manifest, dataset_figure(df, paths)])


def _annotators(src: Panda70MSource) -> dict:
    from udpdiff.data.shards import load_annotators

    # loaded when a clip first lacks a map; missing weights then stop the stage (no silently unlabelled data)
    return load_annotators(src, default_device())


#: ``map_shards(fn, shards) -> results``: runs ``fn(shard)`` on every shard and returns the results in
#: the shards' order. By default they run here, one after another; flows/curation.py maps them over
#: Dask workers as Prefect tasks (and passes each worker's ``device=``).
ShardMap = Callable[[Callable[..., "ShardResult"], list], list]


def curate_sources(p: Params, paths: ProjectPaths, map_shards: ShardMap | None = None) -> StepResult:
    """Panda-70M source videos -> cut, filtered, captioned, labelled clips (``data.panda70m.curation``)."""
    from udpdiff.data.captioner import caption_stats
    from udpdiff.data.curate import ingest_curated
    from udpdiff.data.cut import read_panda_csv, select_clips
    from udpdiff.data.shards import curate_shard, label_dirs, merge_shards, split_shards

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
    shards = split_shards(selected, cur.runner.shard_size)
    logger.info("curating %d clips in %d shards of up to %d", len(selected), len(shards), cur.runner.shard_size)
    annotators = _annotators(src)  # lazy: nothing loads here unless a local shard needs a label
    if map_shards is None:
        results = [curate_shard(p, root, shard, annotators=annotators)
                   for shard in tqdm(shards, desc="curation shards", unit="shard", disable=None)]
    else:
        results = map_shards(partial(curate_shard, p, root), shards)
    result = merge_shards(results)

    folders = label_dirs(cut_dir, src, annotators)
    manifest, rejects, _ = ingest_curated(
        result.records, cut_dir / "videos", paths.clips, min_frames=d.num_frames,
        rejects=[*bad_rows, *result.rejects],
        seg_dir=[f for f in (_under(root, src.seg_dir), folders.get("seg")) if f is not None],
        depth_dir=[f for f in (_under(root, src.depth_dir), folders.get("depth")) if f is not None],
        val_fraction=d.val_fraction, seed=p.seed)
    df = read_manifest(manifest)
    stats = _dataset_stats(df)
    rej = pd.read_csv(rejects)
    codes = rej["reason"].astype(str).str.split(":", n=1).str[0] if len(rej) else pd.Series([], dtype=str)
    c = result.counts
    stats.update({
        "clips_in": float(len(selected)),
        "shards": float(len(shards)),
        "csv_bad_rows": float(len(bad_rows)),
        "cut": float(c["cut"]),
        "resumed": float(c["resumed"]),
        "rejected_clips": float(len(rej)),
        "annotated": float(c["annotated"]),
        "labels_cached": float(c["labels_cached"]),
        # failures: a clip that could not be processed, as opposed to one a filter rejected
        "failed": float(sum(1 for code in codes if code not in FILTER_CODES)),
    })
    stats.update({f"annotated_{kind}": float(c[f"annotated_{kind}"]) for kind in folders})
    stats.update({f"dropped_{code}": float(n) for code, n in sorted(codes.value_counts().items())})
    if cur.recaption is not None:
        stats.update(recaptioned=float(c["recaptioned"]), captions_cached=float(c["captions_cached"]))
    # caption lengths in words (paper Fig 7: Panda-70M's captions against the long ones)
    stats.update(caption_stats(df["caption_short"], "caption_short"))
    stats.update(caption_stats(df["caption_long"], "caption_long"))
    return StepResult(metrics=stats, artifacts=[manifest, Path(rejects), dataset_figure(df, paths)])


#: reject codes that are a verdict on the clip (its length, resolution, content), not a failure
FILTER_CODES = frozenset({"duration", "resolution", "scene_cut", "static", "extreme_motion", "low_quality",
                          "too_short", "bad_timestamp"})


def _under(root: Path, path: str | None) -> Path | None:
    return None if path is None else root / path


def curate(p: Params, paths: ProjectPaths, map_shards: ShardMap | None = None) -> StepResult:
    from udpdiff.data.curate import ingest_panda70m

    src = p.active.data.panda70m
    if src.curation is not None:
        return curate_sources(p, paths, map_shards)
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
    return StepResult(metrics=stats, artifacts=[manifest, Path(rejects), dataset_figure(df, paths)])


def dataset_figure(df: pd.DataFrame, paths: ProjectPaths) -> Path:
    """Entities per clip (paper Fig 6) and caption lengths in words, short against long (Fig 7)."""
    from udpdiff.viz import plot_histograms

    words = {name: df[f"caption_{name}"].astype(str).str.split().str.len().to_numpy() for name in ("short", "long")}
    return plot_histograms(paths.dataset_figure, {
        "entities per clip": {"clips": df["num_entities"].to_numpy()},
        "caption length": {"short (source)": words["short"], "long": words["long"]},
    }, xlabels={"entities per clip": "entities", "caption length": "words"}, integer=["entities per clip"])


def _dataset_stats(df: pd.DataFrame) -> dict[str, float]:
    return {
        "clips": float(len(df)),
        "train_clips": float((df["split"] == "train").sum()),
        "val_clips": float((df["split"] == "val").sum()),
        "mean_entities": float(df["num_entities"].mean()),
        "mean_motion_score": float(df["motion_score"].mean()),
    }


def run(p: Params, paths: ProjectPaths, map_shards: ShardMap | None = None) -> StepResult:
    """The dataset stage follows the profile's source. ``map_shards``: see :data:`ShardMap`."""
    if p.active.data.source == "synthetic":
        return synthesize(p, paths)
    return curate(p, paths, map_shards)
