"""Pictures people look at: side-by-side videos, training curves, result tables.

Panels follow CONVENTIONS.md: RGB video and Pixelplanes colormaps are uint8 ``(T, H, W, 3)``;
depth is float ``(T, H, W)`` in [0, 1]; entity ids are integer ``(T, H, W)`` with 0 = background.
Every file is written atomically through :func:`udpdiff.io.atomic.atomic_path`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from udpdiff.io.atomic import atomic_path
from udpdiff.io.video import write_gif, write_video

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor

__all__ = ["to_rgb_video", "side_by_side", "write_side_by_side", "plot_curves"]


def _numpy(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _colormap_lut(name: str) -> np.ndarray:
    """256x3 uint8 lookup table of a matplotlib colormap."""
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return np.round(cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).astype(np.uint8)


def _id_palette(max_id: int) -> np.ndarray:
    """Deterministic, well-separated colours for entity ids; id 0 (background) is black."""
    # Golden-ratio hue steps keep neighbouring ids visually distinct for any number of ids.
    ids = np.arange(max_id + 1, dtype=np.float64)
    hue = (ids * 0.61803398875) % 1.0
    hsv = np.stack([hue * 179.0, np.full_like(hue, 200.0), np.full_like(hue, 230.0)], -1)
    rgb = cv2.cvtColor(hsv.astype(np.uint8)[None], cv2.COLOR_HSV2RGB)[0]
    rgb[0] = 0
    return rgb


def to_rgb_video(
    video: ArrayLike, colormap: str | None = "inferno", normalize: bool = False
) -> tuple[np.ndarray, bool]:
    """Turn any supported panel into uint8 RGB ``(T, H, W, 3)``.

    * uint8 ``(T, H, W, 3)``: returned as is.
    * float ``(T, H, W)`` or ``(T, H, W, 1)`` (e.g. depth): assumed in [0, 1] and clipped (or
      min-max scaled over the whole video with ``normalize=True``), then mapped through the
      matplotlib ``colormap`` (``None`` for gray).
    * integer ``(T, H, W)`` (entity ids): one fixed colour per id, background black.
    * float ``(T, H, W, 3)`` in [0, 1]: scaled to uint8.

    Returns ``(rgb, is_label_map)``; label maps should be resized with nearest neighbour.
    """
    v = _numpy(video)
    if v.ndim == 4 and v.shape[-1] == 1:
        v = v[..., 0]
    if v.ndim == 4 and v.shape[-1] == 3:
        if v.dtype == np.uint8:
            return v, False
        return (np.clip(v.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), False
    if v.ndim != 3:
        raise ValueError(f"expected (T, H, W[, 3]) panel, got shape {v.shape}")
    if v.dtype == np.bool_:
        v = v.astype(np.float32)
    if np.issubdtype(v.dtype, np.integer):
        if v.min(initial=0) < 0:
            raise ValueError("entity ids must be >= 0")
        return _id_palette(int(v.max(initial=0)))[v], True
    f = v.astype(np.float32)
    if normalize:
        finite = f[np.isfinite(f)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        f = (f - lo) / (hi - lo) if hi > lo else np.zeros_like(f)
    u8 = (np.clip(np.nan_to_num(f, nan=0.0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if colormap is None:
        return np.repeat(u8[..., None], 3, axis=-1), False
    return _colormap_lut(colormap)[u8], False


def _resize_height(rgb: np.ndarray, height: int, nearest: bool) -> np.ndarray:
    t, h, w, _ = rgb.shape
    if h == height:
        return rgb
    new_w = max(1, int(round(w * height / h)))
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float()
    if nearest:
        y = F.interpolate(x, size=(height, new_w), mode="nearest-exact")
    else:
        # Antialiasing matters when shrinking large generations into a thumbnail strip.
        y = F.interpolate(x, size=(height, new_w), mode="bilinear", align_corners=False, antialias=True)
    return y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


MIN_DISPLAY_HEIGHT = 144  # tiny-profile clips are 48 px: upscale so people can see them


def _header(t: int, w: int, text: str | None, band: int) -> np.ndarray:
    """A black band of ``band`` rows with ``text`` in white, repeated over ``t`` frames: labels
    sit above the picture instead of covering it."""
    strip = np.zeros((band, w), np.uint8)
    if text:
        scale = band / 30.0
        font = cv2.FONT_HERSHEY_SIMPLEX
        thick = max(1, int(round(scale * 1.2)))
        (tw, th), _ = cv2.getTextSize(text, font, scale, thick)
        while tw > w - 4 and scale > 0.25:  # shrink to fit the panel's width
            scale *= 0.9
            (tw, th), _ = cv2.getTextSize(text, font, scale, thick)
        cv2.putText(strip, text, (2, (band + th) // 2), font, scale, 255, thick, cv2.LINE_AA)
    return np.broadcast_to(strip[None, :, :, None], (t, band, w, 3))


def side_by_side(
    *videos: ArrayLike,
    labels: Sequence[str | None] | None = None,
    height: int | None = None,
    colormap: str | None = "inferno",
    normalize: bool = False,
) -> np.ndarray:
    """Concatenate panels horizontally into one uint8 ``(T, height, W_total, 3)`` video.

    Panels may be RGB videos, Pixelplanes colormaps, float maps (depth; see :func:`to_rgb_video`)
    or integer entity-id maps. All must have the same number of frames; each is resized to
    ``height`` (default: the first panel's height, at least ``MIN_DISPLAY_HEIGHT``) keeping its
    aspect ratio. ``labels`` (one per panel, ``None``/"" for none) go in a band above the panels.
    """
    if not videos:
        raise ValueError("side_by_side needs at least one video")
    if labels is not None and len(labels) != len(videos):
        raise ValueError(f"{len(labels)} labels for {len(videos)} videos")
    panels = [to_rgb_video(v, colormap=colormap, normalize=normalize) for v in videos]
    t = panels[0][0].shape[0]
    if any(p.shape[0] != t for p, _ in panels):
        raise ValueError(f"frame counts differ: {[p.shape[0] for p, _ in panels]}")
    height = int(height or max(panels[0][0].shape[1], MIN_DISPLAY_HEIGHT))
    band = min(32, max(14, height // 8))
    out = []
    for i, (rgb, is_labels) in enumerate(panels):
        # upscaling keeps hard pixel edges (nearest) so small clips are not smeared
        p = _resize_height(rgb, height, nearest=is_labels or height > rgb.shape[1])
        if labels is not None:
            p = np.concatenate([_header(t, p.shape[2], labels[i], band), p], axis=1)
        out.append(p)
    return np.concatenate(out, axis=2)


def _even(frames: np.ndarray) -> np.ndarray:
    """yuv420p subsamples chroma 2x2, so libx264 needs even sizes: pad bottom/right with black."""
    _, h, w, _ = frames.shape
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))) if h % 2 or w % 2 else frames


def write_side_by_side(
    path: str | os.PathLike,
    videos: Sequence[ArrayLike],
    labels: Sequence[str | None] | None = None,
    fps: float = 8.0,
    qp: int = 18,
    **side_by_side_kwargs: Any,
) -> Path:
    """Write :func:`side_by_side` of ``videos`` to ``path`` (atomically) and return the path.

    ``.mp4``: H.264 (libx264, yuv420p, odd sizes padded to even, constant quantiser ``qp``) via PyAV.
    ``.gif``: looping GIF via Pillow (palette per frame; fine for short previews).
    """
    path = Path(path)
    frames = side_by_side(*videos, labels=labels, **side_by_side_kwargs)
    ext = path.suffix.lower()
    if ext not in (".mp4", ".gif"):
        raise ValueError(f"unsupported extension {path.suffix!r}; use .mp4 or .gif")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if ext == ".mp4":  # the project's one mp4 and one gif writer (atomic, deterministic bytes)
        write_video(path, _even(frames), fps, qp=qp)
    else:
        write_gif(path, frames, fps)
    logger.debug("wrote %s (%d frames, %dx%d)", path, frames.shape[0], frames.shape[2], frames.shape[1])
    return path


def _save_png(fig, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


SPARSE_POINTS = 30  # plot_curves marks each point of a series this short


def plot_curves(
    path: str | os.PathLike,
    series: Mapping[str, tuple[ArrayLike | Sequence[float], ArrayLike | Sequence[float]]],
    title: str = "",
    ylabel: str = "",
    logy: bool = False,
    xlabel: str = "step",
) -> Path:
    """Plot named ``(steps, values)`` curves to a PNG (matplotlib Agg, no pyplot state).

    Non-finite values are dropped (and non-positive ones too with ``logy``) so one NaN loss does
    not hide the rest of a curve. Returns ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, (steps, values) in series.items():
        x = _numpy(steps).astype(np.float64).reshape(-1)
        y = _numpy(values).astype(np.float64).reshape(-1)
        if x.shape != y.shape:
            raise ValueError(f"series {name!r}: {x.size} steps vs {y.size} values")
        keep = np.isfinite(x) & np.isfinite(y) & ((y > 0) if logy else True)
        if not keep.all():
            logger.debug("plot_curves: dropped %d points of %r", int((~keep).sum()), name)
        # sparse series (validations every few hundred steps) get markers: a lone point draws no line
        sparse = int(keep.sum()) <= SPARSE_POINTS
        ax.plot(x[keep], y[keep], label=str(name), linewidth=1.5, marker="o" if sparse else None, markersize=4)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(loc="best", fontsize="small")
    return _save_png(fig, path)


def plot_grouped_bars(
    path: str | os.PathLike,
    groups: Mapping[str, Mapping[str, float]],
    metrics: Sequence[str],
    title: str = "",
    ylabel: str = "",
) -> Path:
    """Grouped bar chart (one group per metric, one bar per entry of ``groups``) to a PNG.

    Missing or non-finite values leave a gap, so a metric that was not computed for one set is
    visibly absent rather than drawn as 0. Returns ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, 1.4 * len(metrics) + 2), 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(groups), 1)
    x = np.arange(len(metrics), dtype=np.float64)
    for i, (name, values) in enumerate(groups.items()):
        y = np.array([float(values.get(m, np.nan)) for m in metrics])
        bars = ax.bar(x + (i - (len(groups) - 1) / 2) * width, np.where(np.isfinite(y), y, 0.0), width, label=name)
        for bar, v in zip(bars, y, strict=True):
            if not np.isfinite(v):
                bar.set_visible(False)
    ax.set_xticks(x, list(metrics), rotation=20, ha="right", fontsize="small")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    if groups:
        ax.legend(loc="best", fontsize="small")
    return _save_png(fig, path)


def plot_histograms(
    path: str | os.PathLike,
    panels: Mapping[str, Mapping[str, ArrayLike | Sequence[float]]],
    xlabels: Mapping[str, str] | None = None,
    integer: Sequence[str] = (),
) -> Path:
    """Side-by-side histograms to a PNG: one panel per entry of ``panels`` (its title), one outlined
    histogram per named series in it, with the series' mean in the legend. Panels named in
    ``integer`` get one bin per integer value (counts such as entities per clip). Returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5 * max(len(panels), 1), 3.6), dpi=110)
    FigureCanvasAgg(fig)
    for i, (title, series) in enumerate(panels.items()):
        ax = fig.add_subplot(1, max(len(panels), 1), i + 1)
        values = {name: _numpy(v).astype(np.float64).reshape(-1) for name, v in series.items()}
        values = {name: v[np.isfinite(v)] for name, v in values.items()}
        everything = np.concatenate([v for v in values.values() if v.size] or [np.zeros(1)])
        lo, hi = float(everything.min()), float(everything.max())
        bins = np.arange(np.floor(lo) - 0.5, np.ceil(hi) + 1.5) if title in integer else np.linspace(lo, hi + 1e-9, 21)
        for name, v in values.items():
            if v.size:
                ax.hist(v, bins=bins, histtype="step", linewidth=1.5, label=f"{name} (mean {v.mean():.1f})")
        ax.set_title(title)
        ax.set_xlabel((xlabels or {}).get(title, ""))
        ax.set_ylabel("clips")
        ax.grid(True, alpha=0.3)
        if values:
            ax.legend(loc="best", fontsize="small")
    return _save_png(fig, path)
