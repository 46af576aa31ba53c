"""The `evaluate` stage: the paper's scores per sample set, streamed."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from udpdiff import viz
from udpdiff.data.synthetic import exact_depth_range
from udpdiff.distributed import Ranks, inference_ranks
from udpdiff.evaluation.ground_truth import ground_truth_scores
from udpdiff.evaluation.scene_following import scene_following
from udpdiff.io.atomic import atomic_path, write_text
from udpdiff.io.manifest import read_manifest, resolve
from udpdiff.io.video import read_video
from udpdiff.stages.common import (
    RGB_ONLY,
    StepResult,
    read_clip,
    sample_sets,
    write_json,
)

if TYPE_CHECKING:
    from udpdiff.config import Params
    from udpdiff.paths import ProjectPaths

logger = logging.getLogger(__name__)


def run(p: Params, paths: ProjectPaths) -> StepResult:
    """Scores per sample set, streamed in chunks of ``evaluate.batch_size`` videos:

    - generation quality (Tabs 1-2): VBench SC (DINO) / BC (CLIP) when configured, motion smoothness
      (VBench's AMT when configured, else the flow prior, under its own name), FVD against the
      cached I3D statistics of the real split, and a weight-free frame-consistency number;
    - dense predictions of real clips against their exact (or curated) ground truth (``gt_*``);
    - dense predictions of generated videos against the annotators' pseudo ground truth (Tab 3,
      ``pseudo_*`` / ``baseline_*``) when annotators are configured.

    Under a launcher (``inference_launcher``) the chunks are shared out: chunk ``k`` of the fixed
    order (every set's chunks, then the real clips') is scored on rank ``k % world``, exactly as one
    process would batch it, and rank 0 gathers the per-video rows and I3D features and writes
    everything, so the outputs are those of a one-process run.

    Writes ``outputs/<profile>/evaluation/{metrics.json, per_video.csv, tables.md, tables.html}``."""
    with inference_ranks() as ranks:
        return _run(p, paths, ranks)


def _run(p: Params, paths: ProjectPaths, ranks: Ranks) -> StepResult:
    from tqdm.auto import tqdm

    from udpdiff.evaluation.fvd import FeatureAccumulator
    from udpdiff.evaluation.runner import build_metric_suite

    e = p.active.evaluate
    # what the FVD reference depends on, read whether or not I3D is configured (dvc.yaml lists them)
    _ = (e.fvd_frames, e.fvd_reference_videos, p.active.sample.split)
    index = json.loads((paths.samples / "index.json").read_text())
    manifest = read_manifest(paths.manifest)
    df = manifest.set_index("clip_id")
    suite = build_metric_suite(e, where=f"profiles.{p.profile}.evaluate")
    suite.depth_range = exact_depth_range(p.active.data.source)  # depth-space scores where depth is exact
    reference = fvd_reference(p, paths, suite.i3d, manifest, ranks) if suite.i3d is not None else None
    names = sample_sets(p)
    real_ids = list(dict.fromkeys(x["clip_id"] for x in index))
    # the work: every set's chunks, then the real clips' (the real clips the prompts came from: the
    # ceiling to compare against); a chunk is one batch, whichever rank scores it
    jobs = [(name, chunk) for name in names for chunk in _chunks([x for x in index if x["task"] == name],
                                                                   e.batch_size)]
    jobs += [(None, chunk) for chunk in _chunks(real_ids, e.batch_size)]
    bar = tqdm(total=sum(ranks.owns(k) for k in range(len(jobs))), unit="chunk", disable=not ranks.is_main,
               desc="evaluate" if ranks.world == 1 else f"evaluate (rank {ranks.rank}/{ranks.world})")

    def score(job: tuple[str | None, list]) -> dict:
        name, chunk = job
        if name is None:
            out = _score_real(p, paths, df, suite, chunk)
        else:
            i3d = FeatureAccumulator(suite.i3d, e.fvd_frames) if reference is not None else None
            out = _score_samples(paths, df, suite, name, chunk, i3d)
        bar.update()
        return out

    done = ranks.map(score, jobs)  # on rank 0; None on the others
    bar.close()
    result = _publish(p, paths, suite, reference, names, jobs, done) if done is not None else StepResult()
    ranks.barrier()  # every rank returns once rank 0 has written the results
    return result


def _publish(p: Params, paths: ProjectPaths, suite, reference, names: list[str], jobs: list[tuple[str | None, list]],
             done: list[dict]) -> StepResult:
    """Rank 0, every chunk scored: the scores per set (FVD from the gathered I3D features), the real
    clips' row, and the files."""
    from udpdiff.evaluation import tables
    from udpdiff.evaluation.fvd import FeatureAccumulator, fvd

    e = p.active.evaluate
    per_video: list[dict] = []
    results: dict[str, dict[str, float]] = {}
    for name in names:
        parts = [r for (n, _), r in zip(jobs, done, strict=True) if n == name]
        rows = [row for r in parts for row in r["rows"]]
        per_video += rows
        results[name] = _means(rows)
        results[name]["num_videos"] = float(len(rows))
        results[name]["num_frames"] = float(parts[-1]["frames"]) if parts else 0.0
        if reference is not None:
            features = FeatureAccumulator(suite.i3d, e.fvd_frames)
            for r in parts:
                features.add_features(r["features"], r["feature_frames"], what=f"{paths.samples / name}")
            results[name].update(fvd(reference, features.statistics()))
    real = [r for (n, _), r in zip(jobs, done, strict=True) if n is None]
    real_rows = [row for r in real for row in r["rows"]]
    results["real"] = {**_means(real_rows), "num_videos": float(len(real_rows)),
                       "num_frames": float(real[-1]["frames"]) if real_rows else 0.0}
    notes = suite.notes
    out = paths.evaluation
    write_json(out / "metrics.json", {"metrics": results, "models": suite.names, "notes": notes})
    with atomic_path(out / "per_video.csv") as tmp:
        pd.DataFrame(per_video + real_rows).to_csv(tmp, index=False)
    tabs = tables.all_tables(results, names, suite.names)
    title = f"UDPDiff evaluation — profile `{p.profile}`"
    write_text(out / "tables.md", tables.markdown_document(title, tabs, notes))
    write_text(out / "tables.html", tables.html_document(title, tabs, notes))
    _plot_scores(out / "scores.png", results)
    flat = {f"{s}/{k}": v for s, m in results.items() for k, v in m.items()}
    return StepResult(metrics=flat, artifacts=[out / f for f in ("metrics.json", "per_video.csv", "tables.md",
                                                                 "tables.html", "scores.png")], info={"notes": notes})


def _score_samples(paths: ProjectPaths, df: pd.DataFrame, suite, name: str, chunk: list[dict],
                   features) -> dict:
    """One chunk of sample set ``name``: its per-video rows, its frame count and, with I3D (``features``,
    an empty accumulator), its I3D features."""
    task = None if name == RGB_ONLY else name
    arrays = [_load_sample(paths.samples / x["npz"], task) for x in chunk]
    videos = _stack([a["video"] for a in arrays], paths.samples / chunk[0]["npz"])
    scores = suite.score_videos(videos) | _caption_following(videos, [x["prompt"] for x in chunk])
    if task is not None:
        scores.update(suite.score_pseudo_gt(task, videos, np.stack([a["dense"] for a in arrays])))
        for x, a in zip(chunk, arrays, strict=True):
            # an ensembled prediction (sample.dense_ensemble_size): its first member alone too, beside it
            for suffix, key in (("", "conditioned_dense"), ("_single", "conditioned_dense_single")):
                if key in a:
                    for k, v in ground_truth_scores(task, a[key], df.loc[x["clip_id"]], paths.manifest,
                                                    suite.depth_per_frame, suite.depth_range).items():
                        scores.setdefault(k + suffix, []).append(v)
            if "conditioned_uncertainty" in a:
                scores.setdefault("ensemble_uncertainty", []).append(float(a["conditioned_uncertainty"].mean()))
    out = {"rows": [{"set": name, "clip_id": x["clip_id"], **{k: v[j] for k, v in scores.items()}}
                    for j, x in enumerate(chunk)], "frames": int(videos.shape[1])}
    if features is not None:
        out.update(features=features.add(videos, what=f"{paths.samples / name}"), feature_frames=features.frames)
    return out


def _score_real(p: Params, paths: ProjectPaths, df: pd.DataFrame, suite, chunk: list[str]) -> dict:
    """One chunk of the real clips the prompts came from: their per-video rows and frame count."""
    videos = np.stack([read_clip(p, paths, df.loc[c].video_path) for c in chunk])
    scores = suite.score_videos(videos) | _caption_following(videos, [df.loc[c].caption_long for c in chunk])
    return {"rows": [{"set": "real", "clip_id": c, **{k: v[j] for k, v in scores.items()}}
                     for j, c in enumerate(chunk)], "frames": int(videos.shape[1])}


def _caption_following(videos: np.ndarray, prompts: list[str]) -> dict[str, list[float]]:
    """Sky and ground as the prompts name them (``scene_following``), where they name a synthetic scene."""
    scores = scene_following(videos, prompts)
    return scores if any(np.isfinite(scores["caption_sky"])) else {}


def _plot_scores(path: Path, results: dict[str, dict[str, float]]) -> Path:
    """The [0, 1] scores of every set side by side (FVD and seconds have other scales: tables only)."""
    from udpdiff.evaluation.tables import set_label

    keys = ["subject_consistency", "background_consistency", "motion_smoothness", "motion_smoothness_flow",
            "pixel_frame_consistency", "gt_delta1", "gt_delta1_depth", "pseudo_delta1", "gt_miou", "pseudo_miou",
            "gt_temporal_id_consistency", "caption_sky", "caption_ground"]
    shown = [k for k in keys if any(k in m for m in results.values())]
    order = sorted(results, key=lambda s: s != "real")  # the real clips' ceiling first
    return viz.plot_grouped_bars(path, {set_label(s): results[s] for s in order}, shown,
                                 title="evaluation scores per sample set", ylabel="score (higher is better)")


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _load_sample(path: Path, task: str | None) -> dict[str, np.ndarray]:
    keys = ("video",) if task is None else ("video", "dense", "conditioned_dense")
    ensembled = ("conditioned_dense_single", "conditioned_uncertainty")  # sample.dense_ensemble_size > 1
    try:
        with np.load(path) as z:
            return {k: z[k] for k in keys} | {k: z[k] for k in ensembled if task is not None and k in z.files}
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"{path}: unreadable sample ({type(err).__name__}: {err}); rerun the sample stage") from err


def _stack(videos: list[np.ndarray], where: Path) -> np.ndarray:
    shapes = {v.shape for v in videos}
    if len(shapes) != 1:
        raise ValueError(f"{where.parent}: samples of one set differ in shape {sorted(shapes)}")
    return np.stack(videos)


def _means(rows: list[dict]) -> dict[str, float]:
    keys = dict.fromkeys(k for r in rows for k in r if k not in ("set", "clip_id"))
    out = {}
    for k in keys:
        # NaN-skipping mean: a clip without entities has no mIoU, which must not sink the average
        v = np.array([r.get(k, np.nan) for r in rows], dtype=np.float64)
        v = v[~np.isnan(v)]
        out[k] = float(v.mean()) if v.size else float("nan")
    return out


def fvd_reference(p: Params, paths: ProjectPaths, i3d, manifest: pd.DataFrame | None = None,
                  ranks: Ranks | None = None):
    """I3D statistics of the real clips of ``sample.split`` (capped at ``evaluate.fvd_reference_videos``),
    cached under ``data/<profile>/fvd_reference``: computed once per split, clip set, frame count and
    I3D file, reused by every later evaluation and sweep variant. Under several ``ranks`` the chunks
    are shared out like the samples' and rank 0 writes the cache; every rank gets the statistics."""
    import hashlib

    from udpdiff.evaluation.fvd import FeatureAccumulator, FVDStatistics

    ranks = ranks or Ranks()
    e, split = p.active.evaluate, p.active.sample.split
    df = read_manifest(paths.manifest) if manifest is None else manifest
    clips = df[df.split == split].sort_values("clip_id")
    if e.fvd_reference_videos:
        clips = clips.head(e.fvd_reference_videos)
    files = [resolve(paths.manifest, v) for v in clips.video_path]
    frames = list(range(p.active.data.num_frames))
    i3d_file = Path(e.i3d).expanduser()
    key = json.dumps({"split": split, "clips": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files],
                      "frames": [len(frames), e.fvd_frames], "i3d": [str(i3d_file.resolve()), i3d_file.stat().st_size]})
    digest = hashlib.sha256(key.encode()).hexdigest()
    cache = paths.fvd_reference / f"{split}-{digest[:16]}.npz"
    # every rank reads the cache before any rank can write it (rank 0 writes after gathering from all)
    stats = FVDStatistics.load(cache, digest)
    if stats is not None:
        if ranks.is_main:
            logger.info("FVD reference: %s (%d videos, %d frames, cached)", cache, stats.num_videos,
                        stats.num_frames)
        return stats

    def features(chunk: list[Path]) -> tuple[np.ndarray, int]:
        acc = FeatureAccumulator(i3d, e.fvd_frames)
        return acc.add(np.stack([read_video(f, indices=frames) for f in chunk]), what=str(chunk[0].parent)), acc.frames

    parts = ranks.map(features, list(_chunks(files, e.batch_size)))
    if parts is not None:
        acc = FeatureAccumulator(i3d, e.fvd_frames)
        for feats, n in parts:
            acc.add_features(feats, n, what=str(paths.clips))
        stats = acc.statistics()
        cache.parent.mkdir(parents=True, exist_ok=True)
        stats.save(cache, digest)
        logger.info("FVD reference: %s (%d videos, %d frames, computed)", cache, stats.num_videos, stats.num_frames)
    # the other ranks need no reference (rank 0 alone computes FVD); they get it anyway, for one code path
    return _broadcast_from_main(ranks, stats)


def _broadcast_from_main(ranks: Ranks, obj):
    if ranks.world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
