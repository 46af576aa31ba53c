"""Video I/O: robust reading (decord first, PyAV fallback) and atomic H.264 / GIF writing.

Reading strategy and why:

* decord 0.6 is fast for random access, but it trusts the container's frame count: when a
  container over-reports it (truncated downloads, ``faststart`` files cut short), ``get_batch`` on
  a frame that does not exist can hang or fail, and long reads grow memory. So every read first
  establishes a frame count we *trust*: the smallest of decord's ``len(vr)``, PyAV's
  ``stream.frames`` (when the container states it) and the number of packets PyAV actually demuxes
  (cheap: no decoding). Requested indices are validated against that count before decord sees
  them.
* decord calls run in a daemon worker thread with a timeout (decord calls into C through ctypes,
  which releases the GIL, so the timeout works); reads are bounded (``max_frames``) and done in
  chunks. A decord failure or timeout falls back to PyAV's sequential decoder, which is slower but
  only ever returns frames it really decoded.
* Any unreadable input (missing, empty, not a video, truncated, corrupt) raises
  :class:`VideoReadError` whose message names the file and the problem.

Frames are ``uint8 (T, H, W, 3)`` RGB (see CONVENTIONS.md).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TypeVar

import av
import cv2
import numpy as np

from udpdiff.io.atomic import atomic_path

logger = logging.getLogger(__name__)

#: Seconds one decord call (open, or one chunk of ``get_batch``) may take before we give up on
#: decord and fall back to PyAV. Generous: a healthy chunk of 32 HD frames takes well under 1 s.
DECORD_TIMEOUT_S = 30.0
#: Frames per decord ``get_batch`` call; bounded so one call never materialises a huge batch.
CHUNK_FRAMES = 32
#: Byte budget of one decoded chunk (the chunk shrinks for large frames).
CHUNK_BYTES = 256 * 1024 * 1024

_T = TypeVar("_T")


class VideoReadError(RuntimeError):
    """A video could not be opened or decoded. The message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"cannot read video {str(path)!r}: {problem}")


class FrameIndexError(VideoReadError, IndexError):
    """Requested frame indices fall outside the clip's trusted frame count."""


class _DecordTimeoutError(RuntimeError):
    pass


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` learned about a file.

    ``num_frames`` is the trusted frame count (see module docstring); ``backend`` is the reader
    :func:`read_video` will use first (``"decord"`` when decord can open the file, else ``"pyav"``).
    """

    path: Path
    num_frames: int
    fps: float
    height: int
    width: int
    backend: str


@dataclass(frozen=True)
class _PyavProbe:
    fps: float
    height: int
    width: int
    meta_frames: int  # container-stated count, 0 when the container does not state one
    demuxed_frames: int  # packets actually present in the file
    duration_frames: int | None  # round(duration * fps), an estimate only


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _call_with_timeout(fn: Callable[[], _T], timeout_s: float, what: str) -> _T:
    """Run ``fn`` in a daemon thread; raise ``_DecordTimeoutError`` if it does not finish in time.

    A hung thread cannot be killed in Python; being a daemon it at least never blocks interpreter
    exit, and we never touch its result again.
    """
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread below
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"udpdiff-decord-{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise _DecordTimeoutError(f"decord {what} did not finish within {timeout_s:.0f} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoReadError(path, "file does not exist")
    if not path.is_file():
        raise VideoReadError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise VideoReadError(path, "file is empty (0 bytes)")


def _probe_pyav(path: Path) -> _PyavProbe:
    """Container facts plus a demuxed packet count, cached per (path, size, mtime).

    Demuxing reads the whole file, so repeated reads of the same clip (a data loader) reuse the
    result; a rewritten file has a new size/mtime and is probed again. Failures are not cached.
    """
    st = path.stat()
    return _probe_pyav_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _probe_pyav_cached(path_str: str, size: int, mtime_ns: int) -> _PyavProbe:
    path = Path(path_str)
    try:
        container = av.open(str(path), mode="r")
    except Exception as exc:  # PyAV raises several FFmpegError subclasses, OSError, ValueError
        raise VideoReadError(path, f"not a readable video container ({exc})") from exc
    with container:
        if not container.streams.video:
            raise VideoReadError(path, "container has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        height = int(stream.codec_context.height or 0)
        width = int(stream.codec_context.width or 0)
        meta_frames = int(stream.frames or 0)
        duration_s: float | None = None
        if stream.duration is not None and stream.time_base is not None:
            duration_s = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration_s = container.duration / 1_000_000  # microseconds (AV_TIME_BASE)
        duration_frames = round(duration_s * fps) if duration_s and fps > 0 else None
        # Count packets by demuxing (no decoding): this sees what is really in the file, so a
        # truncated file whose header still claims the full length is caught here.
        demuxed = 0
        try:
            for packet in container.demux(stream):
                if packet.size > 0:  # the final flush packet is empty
                    demuxed += 1
        except Exception as exc:
            logger.warning("%s: demuxing stopped after %d packets (%s)", path, demuxed, exc)
    if height <= 0 or width <= 0:
        raise VideoReadError(path, "video stream has no frame size")
    if fps <= 0 or not math.isfinite(fps):
        raise VideoReadError(path, "video stream has no frame rate")
    return _PyavProbe(fps, height, width, meta_frames, demuxed, duration_frames)


@functools.cache
def _decord_installed() -> bool:
    """Whether decord imports here; without it every read is PyAV's, which is said once, not per file
    (the GPU machines lack decord: a warning per clip buried their logs)."""
    if importlib.util.find_spec("decord") is None:
        logger.warning("decord is not installed: reading videos with PyAV")
        return False
    return True


def _open_decord(path: Path, timeout_s: float):  # -> decord.VideoReader
    """Open with decord at native size.

    decord's own ``width``/``height`` resizing is not used: decord 0.6 fails a buffer-size check
    for some output widths (e.g. 48 px), and resizing with OpenCV after decoding gives the same
    interpolation on both backends.
    """
    import decord  # imported lazily: decord loads FFmpeg libraries at import time

    return _call_with_timeout(
        lambda: decord.VideoReader(str(path), ctx=decord.cpu(0)), timeout_s, "open"
    )


def _trusted_count(path: Path, probe: _PyavProbe, decord_len: int | None) -> int:
    candidates = {"demuxed packets": probe.demuxed_frames}
    if probe.meta_frames > 0:
        candidates["container frame count"] = probe.meta_frames
    if decord_len is not None:
        candidates["decord len"] = decord_len
    trusted = min(candidates.values())
    if len(set(candidates.values())) > 1:
        logger.warning(
            "%s: frame counts disagree (%s); trusting the smallest, %d",
            path,
            ", ".join(f"{k}={v}" for k, v in candidates.items()),
            trusted,
        )
    if probe.duration_frames is not None and abs(probe.duration_frames - trusted) > 1:
        # duration*fps is only an estimate (variable frame rate, edit lists), so it is logged as a
        # cross-check but never used to cut the clip.
        logger.info(
            "%s: duration*fps suggests %d frames, trusted count is %d",
            path,
            probe.duration_frames,
            trusted,
        )
    if trusted <= 0:
        raise VideoReadError(path, "video stream contains no frames")
    return trusted


def _validate_size(size: tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if len(size) != 2 or int(size[0]) <= 0 or int(size[1]) <= 0:
        raise ValueError(f"size must be (height, width) with positive values, got {size!r}")
    return int(size[0]), int(size[1])


def uniform_indices(total: int, num_frames: int) -> np.ndarray:
    """``num_frames`` indices spread uniformly over ``[0, total)``, first and last included."""
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if num_frames > total:
        raise ValueError(f"cannot sample {num_frames} distinct frames from {total}")
    if num_frames == 1:
        return np.array([0], dtype=np.int64)
    return np.round(np.linspace(0, total - 1, num_frames)).astype(np.int64)


def _resolve_indices(
    path: Path,
    total: int,
    indices: Sequence[int] | None,
    num_frames: int | None,
    max_frames: int,
) -> np.ndarray:
    if indices is not None and num_frames is not None:
        raise ValueError("pass either indices or num_frames, not both")
    if num_frames is not None:
        if num_frames > total:
            raise FrameIndexError(
                path, f"asked to sample {num_frames} frames but the clip has only {total}"
            )
        idx = uniform_indices(total, num_frames)
    elif indices is not None:
        idx = np.asarray(list(indices), dtype=np.int64).reshape(-1)
        if idx.size == 0:
            raise ValueError(f"{path}: empty list of frame indices")
        bad = idx[(idx < 0) | (idx >= total)]
        if bad.size:
            raise FrameIndexError(
                path,
                f"frame indices {bad[:8].tolist()} out of range: the clip has {total} readable "
                f"frames (valid indices 0..{total - 1})",
            )
    else:
        idx = np.arange(total, dtype=np.int64)
    if idx.size > max_frames:
        raise ValueError(
            f"{path}: request of {idx.size} frames exceeds max_frames={max_frames}; "
            "pass indices/num_frames or raise max_frames"
        )
    return idx


def _resize(frame: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    if size is None or frame.shape[:2] == size:
        return frame
    h, w = size
    # INTER_AREA avoids aliasing when shrinking; INTER_LINEAR is the usual choice for enlarging.
    interp = cv2.INTER_AREA if h * w < frame.shape[0] * frame.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(frame, (w, h), interpolation=interp)


def _read_decord(
    vr,
    unique: np.ndarray,
    native_hw: tuple[int, int],
    size: tuple[int, int] | None,
    timeout_s: float,
) -> np.ndarray:
    out_hw = size if size is not None else native_hw
    out = np.empty((unique.size, out_hw[0], out_hw[1], 3), dtype=np.uint8)
    frame_bytes = native_hw[0] * native_hw[1] * 3
    chunk_frames = max(1, min(CHUNK_FRAMES, CHUNK_BYTES // frame_bytes))
    for start in range(0, unique.size, chunk_frames):
        chunk = unique[start : start + chunk_frames]
        batch = _call_with_timeout(
            lambda c=chunk: vr.get_batch(c.tolist()).asnumpy(), timeout_s, "get_batch"
        )
        expected = (chunk.size, native_hw[0], native_hw[1], 3)
        if batch.shape != expected or batch.dtype != np.uint8:
            raise RuntimeError(f"decord returned {batch.dtype} {batch.shape}, expected {expected}")
        for j in range(chunk.size):
            out[start + j] = _resize(batch[j], size)
        del batch
    return out


def _read_pyav(path: Path, unique: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Decode sequentially (no seeking: frame-accurate and safe on damaged files)."""
    wanted = {int(i): pos for pos, i in enumerate(unique.tolist())}
    last = int(unique.max())
    frames: list[np.ndarray | None] = [None] * unique.size
    decoded = 0
    try:
        container = av.open(str(path), mode="r")
    except Exception as exc:
        raise VideoReadError(path, f"not a readable video container ({exc})") from exc
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if decoded in wanted:
                    frames[wanted[decoded]] = _resize(frame.to_ndarray(format="rgb24"), size)
                decoded += 1
                if decoded > last:
                    break
        except Exception as exc:
            raise VideoReadError(
                path, f"decoding failed after {decoded} frames (file corrupt or truncated: {exc})"
            ) from exc
    if decoded <= last:
        raise VideoReadError(
            path, f"only {decoded} frames could be decoded but frame {last} was requested"
        )
    return np.stack(frames)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def probe_video(path: str | os.PathLike, timeout_s: float = DECORD_TIMEOUT_S) -> VideoInfo:
    """Open ``path`` and return its trusted frame count, fps and size (no frame decoding)."""
    path = Path(path)
    _check_file(path)
    probe = _probe_pyav(path)
    backend = "pyav"
    decord_len: int | None = None
    try:
        vr = _open_decord(path, timeout_s)
        decord_len = len(vr)
        backend = "decord"
        del vr
    except Exception as exc:
        logger.warning("%s: decord cannot open the file (%s); PyAV will be used", path, exc)
    n = _trusted_count(path, probe, decord_len)
    return VideoInfo(path, n, probe.fps, probe.height, probe.width, backend)


def count_decodable_frames(path: str | os.PathLike) -> int:
    """Decode the whole stream with PyAV (no colour conversion) and count frames.

    The definitive but slow check: use it where a wrong count is expensive (curation). Raises
    :class:`VideoReadError` if decoding hits an error, naming how far it got.
    """
    path = Path(path)
    _check_file(path)
    try:
        container = av.open(str(path), mode="r")
    except Exception as exc:
        raise VideoReadError(path, f"not a readable video container ({exc})") from exc
    n = 0
    with container:
        if not container.streams.video:
            raise VideoReadError(path, "container has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for _ in container.decode(stream):
                n += 1
        except Exception as exc:
            raise VideoReadError(
                path, f"decoding failed after {n} frames (file corrupt or truncated: {exc})"
            ) from exc
    if n == 0:
        raise VideoReadError(path, "video stream contains no decodable frames")
    return n


# Files decord failed on in this process (path, mtime, size): later reads go straight to PyAV
# instead of failing (and warning) again on every epoch. Bounded, since it lives for the process.
_DECORD_FAILED: set[tuple[str, int, int]] = set()
_DECORD_FAILED_MAX = 100_000


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_mtime_ns, st.st_size


_DECORD_FALLBACK_SAID = False


def _say_decord_fallback(path: Path, what: str, exc: Exception) -> None:
    """A file decord fails on is read with PyAV. The first such file in a process is a warning;
    the rest are debug lines: decord 0.6 fails on every clip of some sizes (e.g. 48 px wide), and a
    warning per clip buried a pipeline's log (54 of them in one ``make repro``)."""
    global _DECORD_FALLBACK_SAID
    if _DECORD_FALLBACK_SAID:
        logger.debug("%s: decord %s (%s); falling back to PyAV", path, what, exc)
        return
    _DECORD_FALLBACK_SAID = True
    logger.warning("%s: decord %s (%s); falling back to PyAV (later files decord fails on in this process: "
                   "debug log)", path, what, exc)


def _remember_decord_failure(path: Path) -> None:
    if len(_DECORD_FAILED) >= _DECORD_FAILED_MAX:
        _DECORD_FAILED.clear()
    _DECORD_FAILED.add(_file_key(path))


def read_video(
    path: str | os.PathLike,
    indices: Sequence[int] | None = None,
    num_frames: int | None = None,
    size: tuple[int, int] | None = None,
    max_frames: int = 1024,
    timeout_s: float = DECORD_TIMEOUT_S,
) -> np.ndarray:
    """Read frames of ``path`` as ``uint8 (T, H, W, 3)`` RGB.

    Args:
        indices: frame indices to read, in the order wanted (repeats allowed). Validated against
            the trusted frame count; out of range raises :class:`FrameIndexError`.
        num_frames: instead of ``indices``, sample this many frames uniformly over the clip
            (first and last frame included).
        size: ``(H, W)`` to resize to (OpenCV after decoding, on both backends).
        max_frames: upper bound on frames returned by one call (memory guard); reading the whole
            clip (neither ``indices`` nor ``num_frames``) is refused beyond it.
        timeout_s: per-call limit for each decord operation before falling back to PyAV.
    """
    path = Path(path)
    size = _validate_size(size)
    _check_file(path)
    probe = _probe_pyav(path)

    vr, decord_len = None, None
    if not _decord_installed():
        pass  # said once per process by _decord_installed
    elif _file_key(path) in _DECORD_FAILED:
        logger.debug("%s: decord failed on this file before; reading with PyAV", path)
    else:
        try:
            vr = _open_decord(path, timeout_s)
            decord_len = len(vr)
        except Exception as exc:
            _say_decord_fallback(path, "cannot open the file", exc)
            _remember_decord_failure(path)
            vr, decord_len = None, None

    total = _trusted_count(path, probe, decord_len)
    idx = _resolve_indices(path, total, indices, num_frames, max_frames)
    unique, inverse = np.unique(idx, return_inverse=True)

    frames: np.ndarray | None = None
    if vr is not None:
        try:
            frames = _read_decord(vr, unique, (probe.height, probe.width), size, timeout_s)
        except Exception as exc:
            _say_decord_fallback(path, "read failed", exc)
            _remember_decord_failure(path)
            frames = None
        finally:
            del vr  # release decord's decoder state promptly (its memory grows with use)
    if frames is None:
        frames = _read_pyav(path, unique, size)
    return frames[inverse.reshape(-1)]


def _check_frames(path: Path, frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"{path}: frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}"
        )
    if frames.shape[0] == 0:
        raise ValueError(f"{path}: no frames to write")
    return np.ascontiguousarray(frames)


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: float,
    qp: int = 10,
    preset: str = "medium",
) -> None:
    """Write ``uint8 (T, H, W, 3)`` RGB frames as H.264 (libx264, yuv420p) atomically.

    yuv420p subsamples chroma 2x2, so H and W must be even; an odd size raises ``ValueError``
    (padding silently would make the video disagree with its dense maps). A low constant quantiser
    ``qp`` (default 10) keeps the encode close to lossless; 0 is lossless luma but poorly supported
    by players. Equal frames give equal bytes.
    """
    path = Path(path)
    frames = _check_frames(path, frames)
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(
            f"{path}: H.264 yuv420p needs even height and width, got {h}x{w}; crop or pad first"
        )
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"{path}: fps must be positive, got {fps}")
    # Rational frame rate: NTSC-style rates such as 30000/1001 survive the round trip.
    rate = Fraction(fps).limit_denominator(1001)
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w") as container:
            # constant quantiser, no adaptive quantisation, macroblock tree or psychovisual tuning:
            # with those x264 turns equal frames into different bytes from run to run (measured:
            # tests/test_video_io.py), and DVC would then re-run every stage downstream of a video
            stream = container.add_stream("libx264", rate=rate, options={
                "qp": str(int(qp)), "preset": preset, "x264-params": "aq-mode=0:mbtree=0:psy=0"})
            stream.width = w
            stream.height = h
            stream.pix_fmt = "yuv420p"
            for frame in frames:
                video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
                for packet in stream.encode(video_frame):
                    container.mux(packet)
            for packet in stream.encode():  # flush delayed frames
                container.mux(packet)
    logger.debug("wrote %s (%d frames, %dx%d, %.3g fps)", path, frames.shape[0], h, w, fps)


def write_gif(path: str | os.PathLike, frames: np.ndarray, fps: float) -> None:
    """Write ``uint8 (T, H, W, 3)`` frames as a looping GIF (Pillow), atomically.

    GIF stores delays in 1/100 s, so the frame rate is approximate.
    """
    from PIL import Image

    path = Path(path)
    frames = _check_frames(path, frames)
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"{path}: fps must be positive, got {fps}")
    images = [Image.fromarray(f) for f in frames]
    duration_ms = max(20, int(round(100.0 / fps)) * 10)  # GIF delays are centiseconds; Pillow takes ms
    with atomic_path(path) as tmp:
        images[0].save(
            tmp,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=duration_ms,
            loop=0,
        )
