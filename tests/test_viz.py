"""Visualisation helpers: side-by-side videos, mp4/gif writing, curves, markdown tables."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch

from udpdiff.viz import MIN_DISPLAY_HEIGHT, plot_curves, side_by_side, to_rgb_video, write_side_by_side

T = 5


def _rgb(h: int = 32, w: int = 48) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(T, h, w, 3), dtype=np.uint8)


def _depth(h: int = 16, w: int = 16) -> np.ndarray:
    ramp = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, None, :]
    return np.broadcast_to(ramp, (T, h, w)).copy()


def _ids(h: int = 32, w: int = 32) -> np.ndarray:
    ids = np.zeros((T, h, w), np.int32)
    ids[:, 4:20, 4:20] = 1
    ids[:, 20:, 10:] = 7
    return ids


def _read_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_side_by_side_shapes_and_heights() -> None:
    out = side_by_side(_rgb(), _depth(), _ids(), height=32)
    # depth 16x16 -> 32x32, ids 32x32 stay: 48 + 32 + 32
    assert out.shape == (T, 32, 112, 3) and out.dtype == np.uint8
    # small clips are upscaled for people: at least MIN_DISPLAY_HEIGHT rows, aspect kept
    big = side_by_side(_rgb(), _ids())
    assert big.shape == (T, MIN_DISPLAY_HEIGHT, MIN_DISPLAY_HEIGHT * 48 // 32 + MIN_DISPLAY_HEIGHT, 3)
    out2 = side_by_side(_rgb(), torch.from_numpy(_depth()), height=64)
    assert out2.shape == (T, 64, 96 + 64, 3)


def test_panel_conversion() -> None:
    rgb = _rgb()
    assert to_rgb_video(rgb)[0] is rgb
    gray, _ = to_rgb_video(_depth(), colormap=None)
    assert (gray[..., 0] == gray[..., 1]).all() and gray[0, 0, 0, 0] == 0 and gray[0, 0, -1, 0] == 255
    colored, _ = to_rgb_video(_depth())
    assert not (colored[..., 0] == colored[..., 1]).all()
    ids, is_labels = to_rgb_video(_ids())
    assert is_labels and (ids[_ids() == 0] == 0).all() and ids[0, 10, 10].any()
    assert not np.array_equal(ids[0, 10, 10], ids[0, 25, 20])  # different entities, different colours
    # (T, H, W, 1) maps and min-max normalisation
    norm, _ = to_rgb_video(_depth()[..., None] * 10.0, colormap=None, normalize=True)
    assert norm.max() == 255 and norm.min() == 0


def test_labels_change_pixels_and_input_untouched() -> None:
    rgb = np.full((T, 40, 60, 3), 128, np.uint8)
    plain = side_by_side(rgb, rgb, height=40)
    labelled = side_by_side(rgb, rgb, labels=["generated", None], height=40)
    band = labelled.shape[1] - 40  # labels sit in a band above the pictures, never on them
    assert band > 0
    np.testing.assert_array_equal(labelled[:, band:], plain)
    assert labelled[:, :band, :60].any()  # text drawn for the first panel
    assert not labelled[:, :band, 60:].any()  # an empty band for the unlabelled one
    assert (rgb == 128).all()
    # the same label is burnt into every frame
    assert all(np.array_equal(labelled[0], labelled[i]) for i in range(T))


def test_side_by_side_rejects_mismatch() -> None:
    with pytest.raises(ValueError, match="frame counts"):
        side_by_side(_rgb(), _depth()[:3])
    with pytest.raises(ValueError, match="labels"):
        side_by_side(_rgb(), labels=["a", "b"])


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_write_and_read_back(tmp_path: Path, suffix: str) -> None:
    # moving content so that no two gif frames are identical (Pillow merges identical frames)
    rgb = np.stack([np.roll(_rgb(33, 47)[0], 3 * i, axis=1) for i in range(T)])
    path = tmp_path / "sub" / f"preview{suffix}"
    out = write_side_by_side(path, [rgb, _depth(33, 21)], fps=8, height=33)
    assert out == path and path.is_file()
    frames = _read_frames(path)
    assert len(frames) == T
    if suffix == ".mp4":
        assert frames[0].shape == (34, 68, 3)  # 33 x (47 + 21) padded to even
    else:
        assert frames[0].shape == (33, 68, 3)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left


def test_write_rejects_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="extension"):
        write_side_by_side(tmp_path / "x.avi", [_rgb()])
    assert not any(tmp_path.iterdir())


def test_plot_curves_png(tmp_path: Path) -> None:
    steps = np.arange(50)
    series = {
        "train": (steps, np.exp(-steps / 10.0) + 0.01),
        "val": (steps[::10], np.array([1.0, 0.5, np.nan, 0.1, 0.0])),
    }
    for logy in (False, True):
        path = plot_curves(tmp_path / f"loss_{logy}.png", series, title="loss", ylabel="mse", logy=logy)
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
        from PIL import Image

        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss_False.png", "loss_True.png"]


def test_plot_curves_marks_the_points_of_a_sparse_series(tmp_path: Path) -> None:
    """A validation curve with one point still shows it (a line through one point draws nothing)."""
    from PIL import Image

    def pixels(series) -> np.ndarray:
        path = plot_curves(tmp_path / "p.png", series, title="t")
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.int16)

    # the same axes and legend either way; only the lone point (inside a's range, off its line) differs
    a = (np.arange(100), np.linspace(0.0, 2.0, 100))
    with_point = pixels({"a": a, "b": (np.array([20.0]), np.array([1.5]))})
    without = pixels({"a": a, "b": (np.array([20.0]), np.array([np.nan]))})
    assert (np.abs(with_point - without).sum(-1) > 60).sum() > 10
