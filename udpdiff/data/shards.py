"""Panda-Dense curation, one shard at a time (paper §3.1): cut + filter, re-caption, label.

A shard is a slice of the selected Panda-70M clips. :func:`curate_shard` runs every per-clip step
on it:

1. cut and filter (:func:`udpdiff.data.filters.curate_clips`; decisions in ``<cut_dir>/state``);
2. long captions (:func:`udpdiff.data.captioner.recaption_clips`; ``<cut_dir>/captions``);
3. labels: the segmentation annotator (first-frame entities propagated by SAM2, then
   :mod:`udpdiff.data.postprocess`) and the depth annotator, for clips without a precomputed map,
   saved to ``<cut_dir>/labels/<kind>-<key>/<clip>.npz`` where ``key`` fingerprints the annotator
   and its post-processing.

Every step keeps its result per clip under ``cut_dir`` (atomically), so a rerun, a retried shard
or another worker redoes nothing that is finished, and a clip's own failure is a reject with its
reason, never the shard's. Shards are independent: the caller maps them over whatever runs them
(one after another in the stage's process, or Dask workers under Prefect: ``flows/curation.py``),
and :func:`merge_shards` puts their results back in selection order, so the dataset does not
depend on how, or on how many workers, it was made.

This module is library code: it knows nothing of Prefect or Dask; ``device`` is all a worker tells it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from udpdiff.data.curate import ClipReject, annotate_clip
from udpdiff.io.dense import save_depth, save_ids
from udpdiff.io.video import VideoReadError, read_video

if TYPE_CHECKING:
    import torch

    from udpdiff.config import DataParams, Panda70MSource, Params
    from udpdiff.data.cut import ClipSpec

logger = logging.getLogger(__name__)

Annotator = Callable[[np.ndarray], np.ndarray]
KINDS = ("seg", "depth")
_LABEL_VERSION = 1


@dataclass
class ShardResult:
    """What one shard (or several, merged) produced.

    ``records``: kept clips (ids, captions, every score), in selection order; ``rejects``: ``clip_id,
    path, reason`` (+ scores measured before the drop); ``counts``: ``cut``, ``resumed``,
    ``recaptioned``, ``captions_cached``, ``annotated`` (clips labelled by a model now),
    ``annotated_seg`` / ``annotated_depth``, ``labels_cached``; ``seconds``: wall time per step."""

    records: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    seconds: Counter = field(default_factory=Counter)


def split_shards(specs: Sequence[ClipSpec], shard_size: int) -> list[list[ClipSpec]]:
    """Consecutive slices of ``shard_size`` clips (the last may be shorter), in selection order."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [list(specs[i : i + shard_size]) for i in range(0, len(specs), shard_size)]


def merge_shards(results: Iterable[ShardResult]) -> ShardResult:
    """One result of many, in the order given (the shards' selection order, not their finishing order)."""
    out = ShardResult()
    for r in results:
        out.records += r.records
        out.rejects += r.rejects
        out.counts.update(r.counts)
        out.seconds.update(r.seconds)
    return out


def curation_fingerprint(d: DataParams) -> str:
    """What decides a cut clip and its filter verdict: the clip geometry, ``cut`` and ``filters``
    (not the paths, not the subset size: growing ``num_clips`` reuses every clip cut before)."""
    cur = d.panda70m.curation
    assert cur is not None
    spec = {"num_frames": d.num_frames, "fps": d.fps, "height": d.height, "width": d.width,
            "cut": cur.cut.model_dump(mode="json"), "filters": cur.filters.model_dump(mode="json")}
    return _digest(spec)


def label_key(kind: str, annotator: Annotator, src: Panda70MSource) -> str:
    """The label cache's key: the annotator's parameters (its ``ref`` in params.yaml, or its class
    for one built in code) and, for segmentation, the post-processing applied to its ids."""
    ref = getattr(annotator, "ref", None)
    if ref is not None:
        name: object = ref.model_dump(mode="json")
    else:
        owner = annotator if hasattr(annotator, "__qualname__") else type(annotator)
        name = f"{owner.__module__}.{owner.__qualname__}"
    spec: dict[str, Any] = {"version": _LABEL_VERSION, "kind": kind, "annotator": name}
    cur = src.curation
    if kind == "seg" and cur is not None and cur.seg_postprocess is not None:
        spec["postprocess"] = cur.seg_postprocess.model_dump(mode="json")
    return _digest(spec)


def label_dirs(cut_dir: Path, src: Panda70MSource, annotators: Mapping[str, Annotator]) -> dict[str, Path]:
    """``kind -> <cut_dir>/labels/<kind>-<key>`` for each configured annotator."""
    return {kind: cut_dir / "labels" / f"{kind}-{label_key(kind, fn, src)}" for kind, fn in annotators.items()}


# A Dask worker runs many shards: it keeps its loaded models between them (one per kind).
_LOADED: dict[str, tuple[str, Annotator]] = {}


def load_annotators(src: Panda70MSource, device: str | torch.device | None = None) -> dict[str, Annotator]:
    """The curation annotators ``src`` configures (``seg``, ``depth``), built lazily: a shard whose
    clips all have labels never loads weights. Cached per process and device."""
    from udpdiff.annotators import LazyAnnotator
    from udpdiff.devices import default_device

    device = default_device(device)
    out: dict[str, Annotator] = {}
    for kind, ref in (("seg", src.segmentation_annotator), ("depth", src.depth_annotator)):
        if ref is None:
            continue
        key = f"{ref.model_dump_json()}@{device}"
        if kind not in _LOADED or _LOADED[kind][0] != key:
            _LOADED[kind] = (key, LazyAnnotator(ref, device))
        out[kind] = _LOADED[kind][1]
    return out


def curate_shard(p: Params, root: str | Path, specs: Sequence[ClipSpec], *, device: str | None = None,
                 annotators: Mapping[str, Annotator] | None = None) -> ShardResult:
    """Cut, filter, caption and label the clips ``specs`` (``data.panda70m.curation`` of ``p``;
    relative paths under ``root``). ``annotators`` default to :func:`load_annotators` on ``device``."""
    from udpdiff.data.captioner import build_captioner, recaption_clips
    from udpdiff.data.cut import ClipCutter
    from udpdiff.data.filters import build_filters, curate_clips

    d = p.active.data
    src = d.panda70m
    cur = src.curation
    if cur is None:
        raise ValueError("data.panda70m.curation is not set: nothing to curate")
    root = Path(root)
    source_dir, cut_dir = root / cur.source_dir, root / cur.cut_dir
    cutter = ClipCutter.from_params(cur.cut, d.num_frames, d.fps, d.height, d.width)
    cut = curate_clips(specs, source_dir, cut_dir, cutter, build_filters(cur.filters),
                       resume_key=curation_fingerprint(d))
    result = ShardResult(records=cut.records, rejects=cut.rejects, seconds=Counter(cut.seconds))
    result.counts.update(cut=cut.cut, resumed=cut.resumed)

    if cur.recaption is not None:  # paper §3: long captions by Video-LLaVA
        recap = cur.recaption
        captions = recaption_clips(result.records, cut_dir / "videos", cut_dir / "captions", recap,
                                   lambda: build_captioner(recap, device))
        result.records = captions.records
        result.rejects += captions.rejects
        result.counts.update(recaptioned=captions.captioned, captions_cached=captions.cached)

    if annotators is None:
        annotators = load_annotators(src, device)
    precomputed = {"seg": _under(root, src.seg_dir), "depth": _under(root, src.depth_dir)}
    label_clips(result, cut_dir, annotators, src, precomputed)
    return result


def label_clips(result: ShardResult, cut_dir: Path, annotators: Mapping[str, Annotator], src: Panda70MSource,
                precomputed: Mapping[str, Path | None]) -> None:
    """Label ``result.records`` in place: each kind without a precomputed map and without a cached
    label is annotated (segmentation ids post-processed) and cached. A clip the annotator fails on
    moves to ``result.rejects``; errors loading a model stop the shard (see :func:`annotate_clip`)."""
    from udpdiff.data.postprocess import postprocess_ids

    post = src.curation.seg_postprocess if src.curation is not None else None
    dirs = label_dirs(cut_dir, src, annotators)
    kept: list[dict] = []
    for rec in tqdm(result.records, desc="labelling clips", unit="clip", disable=True if not annotators else None):
        cid = str(rec["clip_id"])
        video_path = cut_dir / "videos" / f"{cid}.mp4"
        video: np.ndarray | None = None
        labelled = False
        try:
            for kind, annotator in annotators.items():
                given = precomputed.get(kind)
                if given is not None and (given / f"{cid}.npz").exists():
                    continue
                target = dirs[kind] / f"{cid}.npz"
                if target.exists():  # written atomically: present means complete
                    result.counts["labels_cached"] += 1
                    continue
                if video is None:
                    try:
                        video = read_video(video_path)
                    except VideoReadError as exc:
                        raise ClipReject(f"unreadable: {exc}") from exc
                expected = tuple(video.shape[:3])
                out = annotate_clip(kind, annotator, video, video_path, expected)
                if kind == "seg":
                    save_ids(target, postprocess_ids(out, post) if post is not None else out)
                else:
                    save_depth(target, out)
                result.counts[f"annotated_{kind}"] += 1
                labelled = True
        except ClipReject as rej:
            logger.error("rejected clip %s (%s): %s", cid, video_path, rej.reason)
            result.rejects.append({"clip_id": cid, "path": str(video_path), "reason": rej.reason})
            continue
        result.counts["annotated"] += int(labelled)
        kept.append(rec)
    result.records = kept


def _under(root: Path, path: str | None) -> Path | None:
    return None if path is None else root / path


def _digest(spec: object) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


__all__ = ["KINDS", "ShardResult", "curate_shard", "curation_fingerprint", "label_clips", "label_dirs", "label_key",
           "load_annotators", "merge_shards", "split_shards"]
