"""Tests for udpdiff.io.video (decord + PyAV reading, atomic writing) and udpdiff.io.dense."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from udpdiff.io import video as video_mod
from udpdiff.io.dense import DenseMapError, load_depth, load_ids, save_depth, save_ids
from udpdiff.io.video import (
    FrameIndexError,
    VideoReadError,
    probe_video,
    read_video,
    uniform_indices,
    write_gif,
    write_video,
)

T, H, W = 12, 48, 64


def _bounded(fn: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Run ``fn`` in a thread and fail the test if it has not returned within ``timeout``."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"call did not return within {timeout} s (hang)"
    if "error" in box:
        raise box["error"]
    return box["value"]


def _clip(t: int = T, h: int = H, w: int = W) -> np.ndarray:
    """Smooth, moving content (H.264 at low crf keeps it nearly exact)."""
    ys, xs = np.mgrid[0:h, 0:w]
    frames = np.empty((t, h, w, 3), dtype=np.uint8)
    for i in range(t):
        frames[i, ..., 0] = (xs * 255 // (w - 1)).astype(np.uint8)
        frames[i, ..., 1] = (ys * 255 // (h - 1)).astype(np.uint8)
        frames[i, ..., 2] = 40
        frames[i, 8 : 8 + 16, 2 + 3 * i : 2 + 3 * i + 16] = (230, 230, 30)  # a moving square
    return frames


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    frames = _clip()
    write_video(path, frames, fps=8.0)
    return path, frames


def _mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_round_trip(clip_file: tuple[Path, np.ndarray]) -> None:
    path, frames = clip_file
    info = probe_video(path)
    assert (info.num_frames, info.height, info.width) == (T, H, W)
    assert info.fps == pytest.approx(8.0)
    assert info.backend == "decord"
    out = read_video(path)
    assert out.dtype == np.uint8 and out.shape == frames.shape
    assert _mae(out, frames) < 4.0
    # frames are distinct (the square moves), so a frame-index slip would show up here
    for i in (0, 5, T - 1):
        assert _mae(out[i], frames[i]) < _mae(out[i], frames[(i + 3) % T])


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    write_video(tmp_path / "a.mp4", _clip(4), fps=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]


def test_indices_order_and_repeats(clip_file: tuple[Path, np.ndarray]) -> None:
    path, frames = clip_file
    out = read_video(path, indices=[7, 0, 7, 3])
    assert out.shape == (4, H, W, 3)
    for got, i in zip(out, [7, 0, 7, 3], strict=True):
        assert _mae(got, frames[i]) < 4.0


def test_num_frames_sampling(clip_file: tuple[Path, np.ndarray]) -> None:
    path, frames = clip_file
    out = read_video(path, num_frames=4)
    idx = uniform_indices(T, 4)
    assert idx.tolist() == [0, 4, 7, 11]
    assert out.shape == (4, H, W, 3)
    assert _mae(out, frames[idx]) < 4.0
    with pytest.raises(FrameIndexError, match="clip.mp4"):
        read_video(path, num_frames=T + 1)


def test_resize(clip_file: tuple[Path, np.ndarray]) -> None:
    path, frames = clip_file
    out = read_video(path, indices=[0, 5], size=(24, 32))
    assert out.shape == (2, 24, 32, 3)
    small = frames[[0, 5]].reshape(2, 24, 2, 32, 2, 3).mean(axis=(2, 4))  # exact 2x2 box filter
    assert _mae(out, small.astype(np.uint8)) < 4.0
    # 30x48: widths like 48 trip a decord 0.6 resize bug; resizing is done with OpenCV instead
    assert read_video(path, num_frames=3, size=(30, 48)).shape == (3, 30, 48, 3)


def test_index_out_of_range_is_clear(clip_file: tuple[Path, np.ndarray]) -> None:
    path, _ = clip_file
    with pytest.raises(FrameIndexError) as info:
        read_video(path, indices=[0, T])
    msg = str(info.value)
    assert "clip.mp4" in msg and str(T) in msg and "out of range" in msg
    assert isinstance(info.value, IndexError)
    with pytest.raises(FrameIndexError):
        read_video(path, indices=[-1])


def test_max_frames_bound(clip_file: tuple[Path, np.ndarray]) -> None:
    path, _ = clip_file
    with pytest.raises(ValueError, match="max_frames"):
        read_video(path, max_frames=T - 1)


def test_decord_open_failure_falls_back_to_pyav(
    clip_file: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, frames = clip_file
    reference = read_video(path, indices=[1, 6])

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated decord failure")

    monkeypatch.setattr(video_mod, "_open_decord", broken)
    out = read_video(path, indices=[1, 6])
    assert _mae(out, frames[[1, 6]]) < 4.0
    assert _mae(out, reference) < 1.0  # both backends agree
    assert probe_video(path).backend == "pyav"


@pytest.fixture(autouse=True)
def _forget_decord_failures() -> None:
    video_mod._DECORD_FAILED.clear()


def test_a_file_decord_failed_on_goes_straight_to_pyav_next_time(
    clip_file: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, frames = clip_file
    opened = []

    def broken(*args: object, **kwargs: object) -> None:
        opened.append(1)
        raise RuntimeError("simulated decord failure")

    monkeypatch.setattr(video_mod, "_open_decord", broken)
    first, second = read_video(path, indices=[3]), read_video(path, indices=[3])
    assert len(opened) == 1 and np.array_equal(first, second) and _mae(first[0], frames[3]) < 4.0
    path.touch()  # a rewritten file gets decord again
    read_video(path, indices=[3])
    assert len(opened) == 2


def test_hanging_decord_read_times_out_and_falls_back(
    clip_file: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, frames = clip_file

    class HangingReader:
        def __len__(self) -> int:
            return T

        def get_batch(self, indices: list[int]) -> None:
            time.sleep(30)  # like decord 0.6 on an over-reporting container

    monkeypatch.setattr(video_mod, "_open_decord", lambda path, timeout_s: HangingReader())
    start = time.perf_counter()
    out = _bounded(lambda: read_video(path, indices=[2], timeout_s=0.5), timeout=10)
    assert time.perf_counter() - start < 8
    assert _mae(out[0], frames[2]) < 4.0


def _expect_read_error(path: Path, probe_fails: bool = True) -> VideoReadError:
    with pytest.raises(VideoReadError) as info:
        _bounded(lambda: read_video(path))
    assert path.name in str(info.value)
    if probe_fails:
        with pytest.raises(VideoReadError) as probe_info:
            _bounded(lambda: probe_video(path))
        assert path.name in str(probe_info.value)
    return info.value


def test_truncated_file(tmp_path: Path, clip_file: tuple[Path, np.ndarray]) -> None:
    src, _ = clip_file
    data = src.read_bytes()
    cut = tmp_path / "truncated.mp4"
    cut.write_bytes(data[: len(data) // 2])
    _expect_read_error(cut)


def test_truncated_faststart_file_over_reports_frames(tmp_path: Path) -> None:
    """moov at the front: the header still claims every frame after the cut (the decord-hang
    case). The trusted count must shrink, and reading the lost frames must fail cleanly."""
    full = tmp_path / "fast.mp4"
    frames = (np.random.default_rng(0).random((30, 64, 64, 3)) * 255).astype(np.uint8)
    with av.open(str(full), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=8, options={"qp": "10"})
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    data = full.read_bytes()
    cut = tmp_path / "fast_cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with av.open(str(cut)) as c:
        assert c.streams.video[0].frames == 30  # the container over-reports
    info = _bounded(lambda: probe_video(cut))  # probing does not decode, so it succeeds
    assert info.num_frames < 30
    err = _expect_read_error(cut, probe_fails=False)
    assert "fast_cut.mp4" in str(err)
    with pytest.raises(FrameIndexError):
        read_video(cut, indices=[29])
    assert _bounded(lambda: read_video(cut, indices=[0, 3])).shape == (2, 64, 64, 3)


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    err = _expect_read_error(empty)
    assert "empty" in str(err)


def test_text_file_named_mp4(tmp_path: Path) -> None:
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is not a video\n" * 50)
    _expect_read_error(fake)


def test_missing_file(tmp_path: Path) -> None:
    err = _expect_read_error(tmp_path / "nope.mp4")
    assert "does not exist" in str(err)


def test_write_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 15, 16, 3), np.uint8), fps=8)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "f.mp4", np.zeros((2, 16, 16, 3), np.float32), fps=8)
    assert not list(tmp_path.iterdir())


def test_write_gif(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "a.gif"
    write_gif(path, _clip(5), fps=10)
    with Image.open(path) as im:
        assert im.n_frames == 5 and im.size == (W, H)


# -------------------------------------------------------------------------------- dense maps


def test_dense_round_trip_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 7, size=(3, 10, 12)).astype(np.int64)
    depth = rng.random((3, 10, 12)).astype(np.float32)
    save_ids(tmp_path / "s.npz", ids)
    save_depth(tmp_path / "d.npz", depth)
    got_ids, got_depth = load_ids(tmp_path / "s.npz"), load_depth(tmp_path / "d.npz")
    assert got_ids.dtype == np.int32 and np.array_equal(got_ids, ids)
    assert got_depth.dtype == np.float32 and np.array_equal(got_depth, depth)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "s.npz"]


@pytest.mark.parametrize(
    ("writer", "loader", "match"),
    [
        (lambda p: np.savez(p, other=np.zeros((1, 2, 2), np.int32)), load_ids, "missing key"),
        (lambda p: np.savez(p, ids=np.zeros((2, 2), np.int32)), load_ids, "ndim=2"),
        (lambda p: np.savez(p, ids=np.zeros((1, 2, 2), np.float32)), load_ids, "integer"),
        (lambda p: np.savez(p, ids=-np.ones((1, 2, 2), np.int32)), load_ids, ">= 0"),
        (lambda p: np.savez(p, depth=np.full((1, 2, 2), np.nan, np.float32)), load_depth, "NaN"),
        (lambda p: np.savez(p, depth=np.full((1, 2, 2), 1.5, np.float32)), load_depth, r"\[0, 1\]"),
        (lambda p: np.savez(p, depth=np.zeros((1, 2), np.float32)), load_depth, "ndim"),
        (lambda p: Path(p).write_bytes(b"garbage"), load_depth, "readable"),
    ],
)
def test_dense_bad_files(tmp_path: Path, writer: Callable, loader: Callable, match: str) -> None:
    path = tmp_path / "bad.npz"
    writer(str(path))
    with pytest.raises(DenseMapError, match=match) as info:
        loader(path)
    assert "bad.npz" in str(info.value)


def test_dense_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DenseMapError, match="does not exist"):
        load_ids(tmp_path / "missing.npz")


def test_save_validates(tmp_path: Path) -> None:
    with pytest.raises(DenseMapError):
        save_depth(tmp_path / "d.npz", np.full((1, 2, 2), 2.0, np.float32))
    assert not (tmp_path / "d.npz").exists()


def test_equal_frames_encode_to_equal_bytes_whatever_the_float_state(tmp_path):
    """DVC compares bytes: an encoder whose output drifts from run to run re-runs every stage
    downstream of a video. x264's adaptive quantisation / macroblock tree made equal frames encode
    differently between calls (and with the CPU's flush-to-zero mode, which torch can switch)."""
    import hashlib

    import torch

    from udpdiff.data.synthetic import clip_seed, render_clip

    clips = [render_clip(clip_seed(1234, i), 9, 48, 48, clip_id=str(i)).frames for i in range(6)]
    digests = set()
    try:
        for flush_denormal in (False, True, False):
            torch.set_flush_denormal(flush_denormal)
            run = []
            for i, frames in enumerate(clips):
                write_video(tmp_path / f"{i}.mp4", frames, fps=8)
                run.append(hashlib.sha256((tmp_path / f"{i}.mp4").read_bytes()).hexdigest())
            digests.add(tuple(run))
    finally:
        torch.set_flush_denormal(False)
    assert len(digests) == 1


def test_without_decord_every_read_is_pyav_and_said_once(
    clip_file: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path, frames = clip_file
    reference = read_video(path, indices=[1, 6])

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("decord was opened although it is not installed")

    monkeypatch.setattr(video_mod.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(video_mod, "_open_decord", never)
    video_mod._decord_installed.cache_clear()
    try:
        with caplog.at_level("WARNING", logger=video_mod.__name__):
            reads = [read_video(path, indices=[1, 6]) for _ in range(3)]
    finally:
        video_mod._decord_installed.cache_clear()
    for out in reads:
        assert _mae(out, reference) < 1.0
        assert _mae(out, frames[[1, 6]]) < 4.0
    said = [r.getMessage() for r in caplog.records if "decord" in r.getMessage()]
    assert said == ["decord is not installed: reading videos with PyAV"]


def test_decord_failures_warn_once_per_process(
    clip_file: tuple[Path, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    """Files decord fails on are read with PyAV, equal to a PyAV read; the first failure is a
    warning naming the file, the others are debug lines (not one warning per clip)."""
    import shutil

    path, frames = clip_file
    copies = [shutil.copy(path, tmp_path / f"copy{i}.mp4") for i in range(3)]

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Check failed: from_size == to_size")

    monkeypatch.setattr(video_mod, "_decord_installed", lambda: True)
    monkeypatch.setattr(video_mod, "_open_decord", broken)
    monkeypatch.setattr(video_mod, "_DECORD_FALLBACK_SAID", False)
    with caplog.at_level("DEBUG", logger=video_mod.__name__):
        reads = [read_video(c, indices=[1, 6]) for c in copies]
    for out in reads:
        assert _mae(out, frames[[1, 6]]) < 4.0
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "decord" in r.getMessage()]
    assert len(warned) == 1 and str(copies[0]) in warned[0].getMessage()
    debug = [r for r in caplog.records if r.levelname == "DEBUG" and "decord cannot open" in r.getMessage()]
    assert [str(c) in r.getMessage() for c, r in zip(copies[1:], debug, strict=True)] == [True, True]
