"""Ingest real clips in Panda-70M format into the project's on-disk dataset format.

Expected inputs
---------------
* ``csv_path``: a Panda-70M list with columns ``videoID, url, timestamp, caption,
  matching_score`` (``url``, ``timestamp`` and ``matching_score`` are kept for provenance only).
  Two row layouts are accepted:

  - *per source video* (the released CSVs): ``timestamp`` is a list of ``[start, end]`` pairs and
    ``caption`` / ``matching_score`` are lists of the same length; clip ``k`` of the row gets the
    id ``<videoID>_<k:05d>``, matching the ``_<clipID>`` suffix of Panda-70M's downloader;
  - *per clip*: ``timestamp`` is a single ``[start, end]`` pair (or empty) and ``caption`` a plain
    string; the clip id is the optional ``clip_id`` column, else ``videoID``.

  An optional ``caption_long`` column carries re-captioned (e.g. Video-LLaVA) text; when missing or
  empty, the long caption is the short one.
* ``video_dir``: the clips, already downloaded and split, as ``<video_dir>/<clip_id>.mp4``.
* optional ``seg_dir`` / ``depth_dir``: annotator outputs (SAM2 entity ids, DepthCrafter depth) as
  ``<seg_dir>/<clip_id>.npz`` (key ``ids``) and ``<depth_dir>/<clip_id>.npz`` (key ``depth``).
* optional ``annotators``: models that label a clip which has no precomputed map (see
  :mod:`udpdiff.annotators`).

Output (``out_dir``): ``videos/``, ``seg/``, ``depth/`` (hard links, or copies across file
systems), ``manifest.parquet`` with ``source="panda70m"`` and ``rejects.csv``
(``clip_id, path, reason``). A bad clip never stops the run: it is logged with its file name and
recorded in ``rejects.csv``; reasons start with a short code (``missing_video``, ``unreadable``,
``too_short``, ``bad_seg``, ``seg_mismatch``, ...).
"""

from __future__ import annotations

import ast
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from udpdiff.io.atomic import atomic_path, write_text
from udpdiff.io.dense import DenseMapError, load_depth, load_ids, save_depth, save_ids
from udpdiff.io.manifest import (
    MANIFEST_NAME,
    aesthetic_proxy,
    assign_splits,
    empty_manifest,
    write_manifest,
)
from udpdiff.io.video import VideoReadError, count_decodable_frames, probe_video, read_video

logger = logging.getLogger(__name__)

REQUIRED_CSV_COLUMNS = ("videoID", "caption")
PANDA_CSV_COLUMNS = ("videoID", "url", "timestamp", "caption", "matching_score")
REJECT_COLUMNS = ("clip_id", "path", "reason")
_CLIP_ID_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
#: Frame pairs used to estimate the motion score, and the resolution the flow is computed at.
MOTION_PAIRS = 4
MOTION_SHORT_SIDE = 128


@dataclass(frozen=True)
class _Candidate:
    clip_id: str
    caption_short: str
    caption_long: str


class ClipReject(Exception):
    """A clip that cannot go into the dataset; ``reason`` starts with a short code (``bad_seg: ...``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _parse_list(text: str) -> object:
    """Parse a Python/JSON-style list literal from the CSV; return the raw text if it is not one."""
    text = text.strip()
    if not text.startswith("["):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _expand_rows(df: pd.DataFrame, csv_path: Path) -> tuple[list[_Candidate], list[dict]]:
    """Turn CSV rows into one candidate per clip (exploding per-source-video rows)."""
    candidates: list[_Candidate] = []
    rejects: list[dict] = []
    has_long = "caption_long" in df.columns
    for row_no, row in enumerate(df.to_dict("records")):
        video_id = str(row["videoID"]).strip()
        stamps = _parse_list(str(row.get("timestamp", "")))
        captions = _parse_list(str(row["caption"]))
        longs = _parse_list(str(row["caption_long"])) if has_long else None
        multi = isinstance(stamps, list) and len(stamps) > 0 and isinstance(stamps[0], list | tuple)
        if multi:
            n = len(stamps)  # type: ignore[arg-type]
            if not isinstance(captions, list) or len(captions) != n:
                rejects.append(
                    {
                        "clip_id": video_id,
                        "path": str(csv_path),
                        "reason": f"bad_row: row {row_no} has {n} timestamps but captions "
                        f"{captions!r:.80}",
                    }
                )
                continue
            for k in range(n):
                long_k = longs[k] if isinstance(longs, list) and len(longs) == n else ""
                candidates.append(
                    _Candidate(f"{video_id}_{k:05d}", str(captions[k]), str(long_k or ""))
                )
        else:
            cid = str(row.get("clip_id") or video_id).strip()
            short = captions[0] if isinstance(captions, list) and len(captions) == 1 else captions
            long_ = longs[0] if isinstance(longs, list) and len(longs) == 1 else longs
            candidates.append(_Candidate(cid, str(short), str(long_ or "")))
    return candidates, rejects


def _link_or_copy(src: Path, dst: Path) -> None:
    """Place ``src`` at ``dst`` atomically: a hard link if possible (no extra disk), else a copy."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def motion_score_from_frames(frames: np.ndarray, scale: float = 1.0) -> float:
    """Mean Farneback optical-flow magnitude between consecutive frames given as pairs
    ``(f0, f1, f0', f1', ...)``, in pixels per frame, multiplied by ``scale`` (to convert a flow
    measured on downscaled frames back to the stored resolution)."""
    mags = []
    for a, b in zip(frames[0::2], frames[1::2], strict=False):
        ga = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)
        gb = cv2.cvtColor(b, cv2.COLOR_RGB2GRAY)
        flow = cv2.calcOpticalFlowFarneback(ga, gb, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        mags.append(float(np.linalg.norm(flow, axis=-1).mean()))
    return float(np.mean(mags)) * scale if mags else 0.0


def _measure(path: Path, num_frames: int, height: int, width: int) -> tuple[float, float]:
    """Motion and aesthetic scores from a few decoded frames (also proves they decode)."""
    starts = np.unique(np.linspace(0, num_frames - 2, MOTION_PAIRS).round().astype(int))
    indices = [int(i) for s in starts for i in (s, s + 1)]
    shrink = min(1.0, MOTION_SHORT_SIDE / min(height, width))
    size = (max(2, round(height * shrink)), max(2, round(width * shrink)))
    frames = read_video(path, indices=indices, size=size)
    motion = motion_score_from_frames(frames, scale=1.0 / shrink)
    return motion, aesthetic_proxy(frames)


def _dense_check(kind: str, path: Path, expected: tuple[int, int, int]) -> np.ndarray:
    loader = load_ids if kind == "seg" else load_depth
    try:
        array = loader(path)
    except DenseMapError as exc:
        raise ClipReject(f"bad_{kind}: {exc}") from exc
    if array.shape != expected:
        raise ClipReject(
            f"{kind}_mismatch: {path} has shape {array.shape} (T, H, W) but the video has "
            f"{expected}"
        )
    return array


def annotate_clip(kind: str, annotator: Callable[[np.ndarray], np.ndarray], video: np.ndarray, src: Path,
                  expected: tuple[int, int, int]) -> np.ndarray:
    """Run ``annotator`` on the clip; its output must be a valid map of the clip's (T, H, W).

    A clip the annotator fails on becomes a :class:`ClipReject` (``annotator_error``), so one bad
    clip never stops a run. Errors loading the model (missing weights: ``MetricModelUnavailable``,
    ``OSError``; a missing package: ``ImportError``) and ``MemoryError`` still propagate: no
    silently unlabelled dataset."""
    from udpdiff.evaluation.consistency import MetricModelUnavailable

    try:
        out = np.asarray(annotator(video))
    except (MetricModelUnavailable, OSError, ImportError, MemoryError):
        raise
    except Exception as exc:
        raise ClipReject(f"annotator_error: the {kind} annotator failed on {src} "
                         f"({exc.__class__.__name__}: {exc})") from exc
    if out.shape != expected:
        raise ClipReject(f"{kind}_mismatch: the {kind} annotator returned {out.shape} for {src} ({expected})")
    if kind == "seg":
        if not np.issubdtype(out.dtype, np.integer) or (out < 0).any():
            raise ClipReject(f"bad_seg: the annotator returned {out.dtype} ids with negatives for {src}")
        return out.astype(np.int32, copy=False)
    out = out.astype(np.float32, copy=False)
    if not np.isfinite(out).all() or out.min() < 0 or out.max() > 1:
        raise ClipReject(f"bad_depth: the annotator returned values outside [0, 1] (or NaN) for {src}")
    return out


def _ingest_one(
    cand: _Candidate,
    video_dir: Path,
    out: Path,
    min_frames: int,
    seg_dirs: Sequence[Path],
    depth_dirs: Sequence[Path],
    require_dense: bool,
    annotators: Mapping[str, Callable[[np.ndarray], np.ndarray]],
) -> dict:
    if not _CLIP_ID_RE.match(cand.clip_id):
        raise ClipReject(f"bad_clip_id: {cand.clip_id!r} is not usable as a file name")
    short = cand.caption_short.strip()
    if not short:
        raise ClipReject("empty_caption: the CSV caption is empty")
    long_ = cand.caption_long.strip() or short
    src = video_dir / f"{cand.clip_id}.mp4"
    if not src.exists():
        raise ClipReject(f"missing_video: {src} does not exist")
    try:
        info = probe_video(src)
        # Full decode: the only count that cannot be fooled by a header (curation runs once).
        decodable = count_decodable_frames(src)
    except VideoReadError as exc:
        raise ClipReject(f"unreadable: {exc}") from exc
    n = min(info.num_frames, decodable)
    if n < min_frames:
        raise ClipReject(f"too_short: {n} frames < min_frames={min_frames}")
    if info.height % 2 or info.width % 2:
        logger.info("%s: odd frame size %dx%d", src, info.height, info.width)
    try:
        motion, aesthetic = _measure(src, n, info.height, info.width)
    except VideoReadError as exc:
        raise ClipReject(f"unreadable: {exc}") from exc

    expected = (n, info.height, info.width)
    seg_rel = depth_rel = ""
    num_entities = 0
    dense: dict[str, np.ndarray] = {}
    video: np.ndarray | None = None
    for kind, folders in (("seg", seg_dirs), ("depth", depth_dirs)):
        # the first folder holding the clip's map wins (precomputed maps before curation's labels)
        candidates = [folder / f"{cand.clip_id}.npz" for folder in folders]
        path = next((c for c in candidates if c.exists()), candidates[0] if candidates else None)
        if path is not None and path.exists():
            dense[kind] = _dense_check(kind, path, expected)
        elif kind in annotators:
            # no precomputed map: the configured annotator labels the clip (paper §3: SAM2 / DepthCrafter)
            if video is None:
                video = read_video(src, indices=list(range(n)))
            dense[kind] = annotate_clip(kind, annotators[kind], video, src, expected)
        elif path is not None:
            if require_dense:
                raise ClipReject(f"missing_{kind}: {path} does not exist")
            logger.info("%s: no %s map at %s", cand.clip_id, kind, path)

    _link_or_copy(src, out / "videos" / f"{cand.clip_id}.mp4")
    if "seg" in dense:
        seg_rel = f"seg/{cand.clip_id}.npz"
        save_ids(out / seg_rel, dense["seg"])
        num_entities = int(np.count_nonzero(np.unique(dense["seg"]) > 0))
    if "depth" in dense:
        depth_rel = f"depth/{cand.clip_id}.npz"
        save_depth(out / depth_rel, dense["depth"])
    return {
        "clip_id": cand.clip_id,
        "video_path": f"videos/{cand.clip_id}.mp4",
        "num_frames": n,
        "fps": float(info.fps),
        "height": info.height,
        "width": info.width,
        "caption_long": long_,
        "caption_short": short,
        "seg_path": seg_rel,
        "depth_path": depth_rel,
        "num_entities": num_entities,
        "motion_score": motion,
        "aesthetic_score": aesthetic,
        "source": "panda70m",
        "split": "train",
    }


def ingest_panda70m(
    csv_path: str | os.PathLike,
    video_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    min_frames: int,
    seg_dir: str | os.PathLike | None = None,
    depth_dir: str | os.PathLike | None = None,
    require_dense: bool = False,
    val_fraction: float = 0.0,
    seed: int = 0,
    max_clips: int | None = None,
    annotators: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None,
) -> tuple[Path, Path]:
    """Validate and import Panda-70M clips; return ``(manifest_path, rejects_path)``.

    Args:
        min_frames: clips with fewer decodable frames are rejected (``too_short``).
        seg_dir, depth_dir: optional annotator outputs; a present map must match the video's
            (T, H, W) exactly, else the clip is rejected. A missing map leaves the manifest path
            empty unless ``require_dense`` is set, which rejects the clip instead.
        val_fraction, seed: deterministic split (see :func:`udpdiff.io.manifest.assign_splits`).
        max_clips: stop after this many candidate clips (smoke runs).
        annotators: ``{"seg": video -> ids, "depth": video -> disparity}`` (e.g. the SAM2 and
            DepthCrafter annotators of :mod:`udpdiff.annotators`): a clip without a precomputed map
            of that kind is labelled by it (the whole clip, at its own size). A map that does not
            fit the clip rejects the clip like a bad file would.
    """
    annotators = dict(annotators or {})
    unknown = set(annotators) - {"seg", "depth"}
    if unknown:
        raise ValueError(f"annotators: unknown kinds {sorted(unknown)}; use 'seg' and/or 'depth'")
    csv_path, video_dir, out = Path(csv_path), Path(video_dir), Path(out_dir)
    if min_frames < 1:
        raise ValueError(f"min_frames must be >= 1, got {min_frames}")
    if not video_dir.is_dir():
        raise FileNotFoundError(f"video_dir {video_dir} is not a directory")
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    missing = [c for c in REQUIRED_CSV_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{csv_path}: missing required columns {missing}; got {list(df.columns)}")
    absent = [c for c in PANDA_CSV_COLUMNS if c not in df.columns]
    if absent:
        logger.warning("%s: Panda-70M columns %s absent (provenance only)", csv_path, absent)

    candidates, rejects = _expand_rows(df, csv_path)
    if max_clips is not None:
        candidates = candidates[:max_clips]
    for sub in ("videos", "seg", "depth"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    rows: list[dict] = []
    seen: set[str] = set()
    for cand in tqdm(candidates, desc="ingesting clips", unit="clip", disable=None):
        path = video_dir / f"{cand.clip_id}.mp4"
        try:
            if cand.clip_id in seen:
                raise ClipReject(f"duplicate: clip id {cand.clip_id!r} appears more than once")
            seen.add(cand.clip_id)
            rows.append(
                _ingest_one(cand, video_dir, out, min_frames, _dirs(seg_dir), _dirs(depth_dir), require_dense,
                            annotators)
            )
        except ClipReject as rej:
            logger.error("rejected clip %s (%s): %s", cand.clip_id, path, rej.reason)
            rejects.append({"clip_id": cand.clip_id, "path": str(path), "reason": rej.reason})

    manifest, rejects_path = _write_outputs(rows, rejects, out, val_fraction, seed, csv_path)
    logger.info("ingested %d clips, rejected %d (see %s)", len(rows), len(rejects), rejects_path)
    return manifest, rejects_path


def _write_outputs(rows: list[dict], rejects: list[dict], out: Path, val_fraction: float, seed: int,
                   source) -> tuple[Path, Path]:
    """The manifest (with its train/val split) and rejects.csv (its fixed columns first, then any
    scores the rejects carry) of a curation run."""
    manifest_df = pd.DataFrame(rows) if rows else empty_manifest()
    if rows:
        manifest_df["split"] = assign_splits(manifest_df["clip_id"].tolist(), val_fraction, seed)
    else:
        logger.warning("%s: no clip survived curation", source)
    manifest = write_manifest(manifest_df, out / MANIFEST_NAME)
    rejects_path = out / "rejects.csv"
    rej_df = pd.DataFrame(rejects)
    extra = sorted(c for c in rej_df.columns if c not in REJECT_COLUMNS)
    write_text(rejects_path, rej_df.reindex(columns=[*REJECT_COLUMNS, *extra]).to_csv(index=False))
    return manifest, rejects_path


#: curate_clips record keys that are manifest columns already (or machine-specific: source_path)
_RECORD_BASE = {"clip_id", "video_path", "num_frames", "fps", "height", "width", "caption_short", "caption_long",
                "source_path"}
_NON_NAME = re.compile(r"[^a-z0-9_]+")


def curation_columns(record: Mapping[str, object]) -> dict[str, object]:
    """A curated clip's scores and provenance as ``curation_<name>`` manifest columns (floats or
    strings; see :data:`udpdiff.io.manifest.EXTRA_PREFIX`)."""
    out: dict[str, object] = {}
    for key, value in record.items():
        if key in _RECORD_BASE:
            continue
        name = "curation_" + _NON_NAME.sub("_", str(key).lower()).strip("_")
        if isinstance(value, bool):
            value = float(value)
        out[name] = float(value) if isinstance(value, int | float | np.number) else str(value)
    return out


def _dirs(folders: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    if folders is None:
        return []
    if isinstance(folders, str | os.PathLike):
        return [Path(folders)]
    return [Path(f) for f in folders if f is not None]


def ingest_curated(
    records: list[dict],
    clip_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    min_frames: int,
    rejects: list[dict] | None = None,
    seg_dir: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    depth_dir: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    require_dense: bool = False,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[Path, Path, dict[str, int]]:
    """Publish clips cut by :func:`udpdiff.data.filters.curate_clips` (and labelled by
    :mod:`udpdiff.data.shards`).

    ``records`` are the kept clips (``<clip_dir>/<clip_id>.mp4``), ``rejects`` everything dropped
    before (they go to ``rejects.csv`` as they are, scores included). ``seg_dir`` / ``depth_dir``
    are one folder or a list searched in order (precomputed maps, then curation's labels). Each
    clip goes through the same checks and linking as :func:`ingest_panda70m`; its filter scores
    and provenance become ``curation_*`` manifest columns. Returns ``(manifest, rejects_path,
    counts)`` with ``counts = {"failed": clips rejected here}``.
    """
    clip_dir, out = Path(clip_dir), Path(out_dir)
    for sub in ("videos", "seg", "depth"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    all_rejects = list(rejects or [])
    rows: list[dict] = []
    failed = 0
    for rec in tqdm(records, desc="publishing clips", unit="clip", disable=None):
        cand = _Candidate(str(rec["clip_id"]), str(rec.get("caption_short", "")), str(rec.get("caption_long", "")))
        try:
            row = _ingest_one(cand, clip_dir, out, min_frames, _dirs(seg_dir), _dirs(depth_dir), require_dense, {})
        except ClipReject as rej:
            failed += 1
            path = clip_dir / f"{cand.clip_id}.mp4"
            logger.error("rejected clip %s (%s): %s", cand.clip_id, path, rej.reason)
            all_rejects.append({"clip_id": cand.clip_id, "path": str(path), "reason": rej.reason})
            continue
        row.update(curation_columns(rec))
        rows.append(row)

    manifest, rejects_path = _write_outputs(rows, all_rejects, out, val_fraction, seed, clip_dir)
    logger.info("published %d curated clips, rejected %d in all (see %s)", len(rows), len(all_rejects), rejects_path)
    return manifest, rejects_path, {"failed": failed}


__all__ = ["REJECT_COLUMNS", "ClipReject", "annotate_clip", "curation_columns", "ingest_curated", "ingest_panda70m",
           "motion_score_from_frames"]
