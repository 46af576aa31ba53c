"""Cut Panda-70M source videos into fixed-size clips (paper §3.1: a random subset of Panda-70M).

A Panda-70M CSV row names one source video (``videoID``, ``url``) and lists its clips as
``timestamp`` ``[[start, end], ...]`` (``"H:MM:SS.fff"`` strings) with one ``caption`` per clip
(and, optionally, ``caption_long``). :func:`read_panda_csv` explodes rows into :class:`ClipSpec`
objects (clip ``k`` of video ``v`` is ``v_<k:05d>``, the id Panda-70M's own splitter uses),
:func:`select_clips` draws the seeded subset, and :class:`ClipCutter` turns one spec into a clip:

1. **plan** (no decoding): find ``<video_dir>/<videoID><ext>``, read its header with PyAV (fps,
   size, duration), check the timestamp is long enough, place the sampling window and the crop.
2. **cut**: seek PyAV to the keyframe before ``start``, decode forward, and take ``num_frames``
   frames at the profile's ``fps``: sample instant ``k`` is ``t0 + k / fps`` and gets the decoded
   frame nearest to it (FFmpeg's ``fps`` filter rounds the same way), never a frame before
   ``start`` or at/after ``end``.
3. **resize**: centre-crop to the output aspect, then resize to (height, width) with area
   interpolation (linear when a source has to be enlarged, see ``max_upscale``).
4. **write** with :func:`udpdiff.io.video.write_video` (H.264 at a constant quantiser: equal frames
   give equal bytes).

Why a fixed-rate window and not ``num_frames`` spread over the whole clip: CogVideoX is trained on
49 frames at 8 fps (6 s) and the clip's fps is stored with it; spreading frames over clips of
3 to 60 s would give every clip a different real frame rate, so the same motion would look
faster or slower from clip to clip and the stored fps would be wrong. A clip shorter than the
window is rejected (``too_short``) rather than stretched. Within a longer clip the window is
centred by default (``window="center"``): Panda-70M cut its clips at detected shot changes, and
the middle is furthest from them.

A bad source never stops a run: every problem is a :class:`ClipRejected` whose ``code`` is
short (``missing_source``, ``unreadable``, ``too_short``, ``bad_timestamp``) and whose message
names the file and the problem.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import av
import cv2
import numpy as np
import pandas as pd

from udpdiff.data.curation_params import CutParams
from udpdiff.io.video import uniform_indices, write_video

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("videoID", "timestamp", "caption")
_VIDEO_ID_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_TIMESTAMP_RE = re.compile(r"^(?:(\d+):)?(?:(\d+):)?(\d+(?:\.\d*)?)$")
#: Seconds of slack when comparing frame times with timestamps (container rounding).
_EPS = 1e-3


class ClipRejected(Exception):
    """A clip cannot be made. ``code`` is a short reason (counted per run), ``message`` names the
    file and the problem."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def reason(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class ClipSpec:
    """One Panda-70M clip: a ``[start, end)`` span (seconds) of a source video, with its captions."""

    clip_id: str
    video_id: str
    start_s: float
    end_s: float
    caption: str
    caption_long: str = ""
    url: str = ""

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class SourceInfo:
    """Header facts of a source video (no frame decoded)."""

    path: Path
    fps: float
    height: int
    width: int
    duration_s: float | None


@dataclass(frozen=True)
class ClipPlan:
    """Where a clip comes from and how it will be cut: the input of the header-only filters."""

    spec: ClipSpec
    source: SourceInfo
    #: sample instants in seconds from the start of the source, one per output frame
    times: np.ndarray
    #: centre crop in source pixels: (y0, x0, crop_h, crop_w)
    crop: tuple[int, int, int, int]
    #: factor the crop is scaled by to reach (height, width); > 1 means the source is enlarged
    scale: float


@dataclass(frozen=True, eq=False)
class CutClip:
    """A cut clip: ``frames`` uint8 (T, H, W, 3) RGB at ``fps``; ``frame_times`` the source time of
    each (seconds); ``quality_frames`` a few of them uncropped at source resolution."""

    plan: ClipPlan
    frames: np.ndarray
    fps: float
    frame_times: np.ndarray
    quality_frames: np.ndarray
    extra: dict = field(default_factory=dict)

    @property
    def spec(self) -> ClipSpec:
        return self.plan.spec

    @property
    def source(self) -> SourceInfo:
        return self.plan.source


# --------------------------------------------------------------------------------------------
# the CSV
# --------------------------------------------------------------------------------------------


def parse_timestamp(text: str | float | int) -> float:
    """``"0:01:02.500"`` / ``"01:02.5"`` / ``"62.5"`` / ``62.5`` -> seconds (float)."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _TIMESTAMP_RE.match(str(text).strip())
        if not m:
            raise ValueError(f"timestamp {text!r} is not H:MM:SS.fff, MM:SS.fff or seconds")
        a, b, s = m.groups()
        parts = [int(p) for p in (a, b) if p is not None]
        hours, minutes = (parts + [0, 0])[:2] if len(parts) == 2 else (0, parts[0] if parts else 0)
        value = hours * 3600 + minutes * 60 + float(s)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"timestamp {text!r} must be a finite, non-negative time")
    return value


def _literal(text: str, strict: bool = True) -> object:
    """A Python list literal from the CSV; other text as it is. ``strict=False`` (captions) keeps
    text that only looks like a list (``"[Music] a man sings"``) instead of failing."""
    text = text.strip()
    if not text.startswith("["):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
        if not strict:
            return text
        raise ValueError(f"not a valid list literal ({exc.__class__.__name__}): {text[:80]!r}") from exc


def _per_clip(value: object, n: int, column: str, required: bool) -> list[str]:
    if isinstance(value, list):
        if len(value) != n:
            raise ValueError(f"{column} has {len(value)} entries but timestamp has {n}")
        return [str(v) for v in value]
    text = str(value)
    if n == 1 or (not required and not text.strip()):
        return [text] * n
    raise ValueError(f"{column} is a single string but timestamp lists {n} clips")


def read_panda_csv(csv_path: str | os.PathLike) -> tuple[list[ClipSpec], list[dict]]:
    """Read a Panda-70M CSV into one :class:`ClipSpec` per timestamp.

    Returns ``(specs, rejects)``; a malformed row (bad timestamp, caption count mismatch, unusable
    video id) becomes a reject ``{"clip_id", "path", "reason"}`` with reason ``bad_row: ...`` and
    the other rows are still read. A missing file or missing columns raise ``ValueError`` /
    ``FileNotFoundError`` naming the file.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"Panda-70M CSV {csv_path} does not exist")
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{csv_path}: not a readable CSV ({exc})") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{csv_path}: missing required columns {missing}; got {list(df.columns)}")
    has_long = "caption_long" in df.columns
    specs: list[ClipSpec] = []
    rejects: list[dict] = []
    for row_no, row in enumerate(df.to_dict("records"), start=2):  # line 1 is the header
        video_id = str(row["videoID"]).strip()
        try:
            if not _VIDEO_ID_RE.match(video_id):
                raise ValueError(f"videoID {video_id!r} is not usable as a file name")
            stamps = _literal(str(row["timestamp"]))
            if isinstance(stamps, list) and len(stamps) == 2 and not isinstance(stamps[0], list | tuple):
                stamps = [stamps]  # a single [start, end] pair
            if not isinstance(stamps, list) or not stamps:
                raise ValueError(f"timestamp must be a list of [start, end] pairs, got {str(row['timestamp'])[:80]!r}")
            n = len(stamps)
            captions = _per_clip(_literal(str(row["caption"]), strict=False), n, "caption", required=True)
            longs = (_per_clip(_literal(str(row["caption_long"]), strict=False), n, "caption_long", False)
                     if has_long else [""] * n)
            for k, pair in enumerate(stamps):
                if not isinstance(pair, list | tuple) or len(pair) != 2:
                    raise ValueError(f"timestamp entry {k} is {pair!r}, not a [start, end] pair")
                start, end = parse_timestamp(pair[0]), parse_timestamp(pair[1])
                if end <= start:
                    raise ValueError(f"timestamp entry {k} ends ({pair[1]}) before it starts ({pair[0]})")
                specs.append(ClipSpec(f"{video_id}_{k:05d}", video_id, start, end, captions[k].strip(),
                                      longs[k].strip(), str(row.get("url", ""))))
        except ValueError as exc:
            rejects.append({"clip_id": video_id, "path": str(csv_path),
                            "reason": f"bad_row: line {row_no} of {csv_path}: {exc}"})
    return specs, rejects


def select_clips(specs: Sequence[ClipSpec], num_clips: int | None, seed: int) -> list[ClipSpec]:
    """A seeded random subset of ``num_clips`` clips (all when ``None`` or more than there are).

    Each clip is ranked by ``sha256(f"{seed}:{clip_id}")`` and the lowest ranks win. Unlike a
    shuffle, this does not depend on the CSV's row order, and growing ``num_clips`` keeps every
    clip picked before (so a larger dataset extends a smaller one instead of replacing it). The
    subset comes back in rank order, which is the order to process it in.
    """
    if num_clips is not None and num_clips < 0:
        raise ValueError(f"num_clips must be >= 0, got {num_clips}")
    ids = [s.clip_id for s in specs]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"clip ids appear more than once (the CSV lists a videoID twice?): {dup}")

    def rank(spec: ClipSpec) -> bytes:
        return hashlib.sha256(f"{seed}:{spec.clip_id}".encode()).digest()

    ranked = sorted(specs, key=rank)
    return ranked if num_clips is None else ranked[:num_clips]


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------


def centre_crop_box(src_hw: tuple[int, int], out_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """The largest centred box of the output's aspect ratio inside the source: (y0, x0, h, w)."""
    h, w = src_hw
    oh, ow = out_hw
    if w * oh > ow * h:  # source is wider than the output: crop the sides
        ch, cw = h, max(1, min(w, round(h * ow / oh)))
    else:  # taller: crop top and bottom
        ch, cw = max(1, min(h, round(w * oh / ow))), w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def crop_resize(frame: np.ndarray, crop: tuple[int, int, int, int], out_hw: tuple[int, int]) -> np.ndarray:
    """Crop ``frame`` to ``crop`` then resize to ``out_hw``: area interpolation when shrinking (no
    aliasing), linear when enlarging (area degenerates to nearest-neighbour there)."""
    y0, x0, ch, cw = crop
    oh, ow = out_hw
    region = frame[y0 : y0 + ch, x0 : x0 + cw]
    if (ch, cw) == (oh, ow):
        return np.ascontiguousarray(region)
    interp = cv2.INTER_AREA if ch * cw >= oh * ow else cv2.INTER_LINEAR
    return cv2.resize(region, (ow, oh), interpolation=interp)


# --------------------------------------------------------------------------------------------
# the cutter
# --------------------------------------------------------------------------------------------


def probe_source(path: str | os.PathLike) -> SourceInfo:
    """fps, size and duration from the container header (PyAV; nothing decoded). Raises
    :class:`ClipRejected` (``unreadable``) naming the file when it is not a readable video."""
    path = Path(path)
    if not path.is_file():
        raise ClipRejected("missing_source", f"{path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise ClipRejected("unreadable", f"{path} is empty (0 bytes)")
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise ClipRejected("unreadable", f"{path} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else 0.0
            height, width = int(stream.codec_context.height or 0), int(stream.codec_context.width or 0)
            duration: float | None = None
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000
    except ClipRejected:
        raise
    except Exception as exc:  # PyAV raises several FFmpegError subclasses, OSError, ValueError
        raise ClipRejected("unreadable", f"{path} is not a readable video container ({exc})") from exc
    if height <= 0 or width <= 0:
        raise ClipRejected("unreadable", f"{path}: the video stream has no frame size")
    if not (fps > 0 and math.isfinite(fps)):
        raise ClipRejected("unreadable", f"{path}: the video stream has no frame rate")
    return SourceInfo(path, fps, height, width, duration)


class ClipCutter:
    """Turns a :class:`ClipSpec` into a :class:`CutClip` of exactly ``num_frames`` x ``height`` x
    ``width`` frames at ``fps`` (see the module docstring for how)."""

    def __init__(self, num_frames: int, fps: float, height: int, width: int, window: str = "center",
                 quality_frames: int = 4, qp: int = 10,
                 video_extensions: Sequence[str] = (".mp4", ".mkv", ".webm", ".mov")) -> None:
        if num_frames < 1 or height < 2 or width < 2 or not fps > 0:
            raise ValueError(f"bad clip geometry: {num_frames} frames of {height}x{width} at {fps} fps")
        if window not in ("start", "center"):
            raise ValueError(f"window must be 'start' or 'center', got {window!r}")
        self.num_frames, self.fps, self.height, self.width = num_frames, float(fps), height, width
        self.window = window
        self.quality_frames = max(1, min(quality_frames, num_frames))
        self.qp = qp
        self.video_extensions = tuple(video_extensions)

    @classmethod
    def from_params(cls, params: CutParams, num_frames: int, fps: float, height: int, width: int) -> ClipCutter:
        """From the ``cut`` section plus the profile's ``data`` geometry (``DataParams``)."""
        return cls(num_frames, fps, height, width, window=params.window, quality_frames=params.quality_frames,
                   qp=params.qp, video_extensions=params.video_extensions)

    @property
    def span_s(self) -> float:
        """Seconds between the first and the last sample instant."""
        return (self.num_frames - 1) / self.fps

    def locate(self, spec: ClipSpec, video_dir: str | os.PathLike) -> Path:
        """``<video_dir>/<videoID><ext>`` for the first ending that exists."""
        video_dir = Path(video_dir)
        for ext in self.video_extensions:
            path = video_dir / f"{spec.video_id}{ext}"
            if path.is_file():
                return path
        tried = ", ".join(f"{spec.video_id}{e}" for e in self.video_extensions)
        raise ClipRejected("missing_source", f"no source video for {spec.video_id} in {video_dir} (tried {tried})")

    def plan(self, spec: ClipSpec, source: str | os.PathLike | SourceInfo) -> ClipPlan:
        """Check the timestamp against the source header and place the window and the crop."""
        info = source if isinstance(source, SourceInfo) else probe_source(source)
        where = f"{info.path} [{spec.start_s:.3f} s, {spec.end_s:.3f} s) (clip {spec.clip_id})"
        if info.duration_s is not None and spec.start_s >= info.duration_s:
            raise ClipRejected("bad_timestamp", f"{where} starts after the source ends ({info.duration_s:.3f} s)")
        frame_s = 1.0 / info.fps
        # the last frame that starts before `end` is about one source frame before it; sample
        # instants may sit up to half a frame from the frame they take
        usable = spec.end_s - frame_s - spec.start_s
        if usable + 0.5 * frame_s + 1e-9 < self.span_s:
            raise ClipRejected(
                "too_short",
                f"{where} lasts {spec.duration_s:.3f} s but {self.num_frames} frames at {self.fps:g} fps need "
                f"{self.span_s + 1.5 * frame_s:.3f} s of a {info.fps:.3g} fps source",
            )
        slack = max(0.0, usable - self.span_s)
        t0 = spec.start_s + (slack / 2 if self.window == "center" else 0.0)
        # snap the first instant onto the source's frame grid (no tie between two frames)
        snapped = math.floor(t0 * info.fps + 0.5) / info.fps
        if snapped < spec.start_s - _EPS:
            snapped += frame_s
        if snapped + self.span_s <= spec.end_s - 0.5 * frame_s + _EPS:
            t0 = snapped
        times = t0 + np.arange(self.num_frames) / self.fps
        crop = centre_crop_box((info.height, info.width), (self.height, self.width))
        return ClipPlan(spec, info, times, crop, self.height / crop[2])

    def cut(self, plan: ClipPlan) -> CutClip:
        """Decode the planned frames. Raises :class:`ClipRejected` naming the file on any problem."""
        spec, info, times = plan.spec, plan.source, plan.times
        path = info.path
        n = len(times)
        tol = 0.5 / info.fps + _EPS
        keep_native = set(uniform_indices(n, self.quality_frames).tolist())
        out = np.empty((n, self.height, self.width, 3), np.uint8)
        taken = np.full(n, np.nan)
        native: dict[int, np.ndarray] = {}
        k = 0
        prev: tuple[float, av.VideoFrame] | None = None
        last_t = -1.0
        cache: tuple[float, np.ndarray] | None = None  # the last converted frame (a frame may be taken twice)

        def take(idx: int, t: float, frame: av.VideoFrame) -> None:
            nonlocal cache
            if cache is None or cache[0] != t:
                cache = (t, frame.to_ndarray(format="rgb24"))
            rgb = cache[1]
            if rgb.shape[:2] != (info.height, info.width):
                raise ClipRejected("unreadable", f"{path}: frame at {t:.3f} s is {rgb.shape[1]}x{rgb.shape[0]}, "
                                                 f"the header said {info.width}x{info.height}")
            out[idx] = crop_resize(rgb, plan.crop, (self.height, self.width))
            taken[idx] = t
            if idx in keep_native:
                native[idx] = rgb.copy()

        try:
            with av.open(str(path), mode="r") as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                tb = stream.time_base
                origin = stream.start_time or 0
                if spec.start_s > 0:
                    # the keyframe at or before `start`; decoding forward from there is frame-exact
                    container.seek(origin + int(spec.start_s / tb), stream=stream, backward=True, any_frame=False)
                for frame in container.decode(stream):
                    if frame.pts is None:
                        continue
                    t = float((frame.pts - origin) * tb)
                    last_t = max(last_t, t)
                    if t < spec.start_s - _EPS:
                        continue
                    if t >= spec.end_s - _EPS:
                        break
                    while k < n and times[k] <= t:
                        if prev is not None and times[k] - prev[0] <= t - times[k]:
                            take(k, *prev)
                        else:
                            take(k, t, frame)
                        k += 1
                    prev = (t, frame)
                    if k == n:
                        break
                while k < n and prev is not None and times[k] - prev[0] <= tol:
                    take(k, *prev)
                    k += 1
        except ClipRejected:
            raise
        except Exception as exc:
            raise ClipRejected("unreadable", f"{path}: decoding failed near {max(last_t, 0):.3f} s "
                                             f"(corrupt or truncated: {exc})") from exc
        if k < n:
            got = f"the last frame decoded is at {last_t:.3f} s" if last_t >= 0 else "no frame could be decoded"
            raise ClipRejected("too_short", f"{path}: {got} but clip {spec.clip_id} needs one at "
                                            f"{times[k]:.3f} s (timestamp [{spec.start_s:.3f}, {spec.end_s:.3f}))")
        off = np.abs(taken - times)
        if off.max() > tol:
            i = int(off.argmax())
            raise ClipRejected("unreadable", f"{path}: no frame near {times[i]:.3f} s (nearest at {taken[i]:.3f} s); "
                                             "the stream has a gap")
        quality = np.stack([native[i] for i in sorted(native)])
        return CutClip(plan, out, self.fps, taken, quality)

    def write(self, clip: CutClip, path: str | os.PathLike) -> Path:
        """Write the clip's frames with :func:`udpdiff.io.video.write_video` (deterministic bytes)."""
        path = Path(path)
        write_video(path, clip.frames, clip.fps, qp=self.qp)
        return path


__all__ = [
    "ClipCutter",
    "ClipPlan",
    "ClipRejected",
    "ClipSpec",
    "CutClip",
    "SourceInfo",
    "centre_crop_box",
    "crop_resize",
    "parse_timestamp",
    "probe_source",
    "read_panda_csv",
    "select_clips",
]
