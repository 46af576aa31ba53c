"""The autoencoder stage's dense scores after the VAE: the ceiling a dense prediction through the VAE
can reach, scored exactly as the evaluate stage scores predictions (udpdiff/stages/autoencoder.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from udpdiff.config import load_params
from udpdiff.data.synthetic import synthesize_dataset
from udpdiff.io.manifest import read_manifest
from udpdiff.paths import ProjectPaths
from udpdiff.stages import autoencoder, encode
from udpdiff.stages.common import load_colormap

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """Six tiny synthetic clips with their exact colormaps (the encode stage's files)."""
    p = load_params(ROOT / "params.yaml", profile="tiny").with_overrides({"data.num_clips": 6})
    paths = ProjectPaths(tmp_path_factory.mktemp("ae"), "tiny")
    d = p.active.data
    synthesize_dataset(paths.clips, num_clips=d.num_clips, num_frames=d.num_frames, height=d.height,
                       width=d.width, fps=d.fps, seed=p.seed, val_fraction=d.val_fraction)
    encode.run(p, paths)
    rows = read_manifest(paths.manifest).head(4)
    maps = {task: [load_colormap(paths, task, c)[:d.num_frames] for c in rows.clip_id] for task in p.active.train.tasks}
    return p, paths, rows, maps


def test_a_lossless_vae_scores_perfectly(encoded):
    p, paths, rows, maps = encoded
    s = autoencoder._dense_after_vae(p, paths, rows, maps)
    assert s["seg_pixel_acc_after_vae"] == 1.0
    assert s["gt_miou_after_vae"] == 1.0  # palette-free decoding finds every entity of an exact colormap
    assert s["depth_mae_after_vae"] < 1e-3
    # the Spectral colormap quantises depth (its lookup table): near-perfect, not exact
    assert s["gt_delta1_after_vae"] > 0.99 and s["gt_delta1_depth_after_vae"] > 0.99
    assert s["gt_abs_rel_depth_after_vae"] < 1e-2


def test_a_blurring_vae_loses_entities_and_depth_detail(encoded):
    """Colormaps blurred over 9x9 px (what a lossy VAE does at entity edges) score below 1 on every
    dense score."""
    import torch

    p, paths, rows, maps = encoded

    def blur(v: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(v).float().permute(0, 3, 1, 2)
        x = torch.nn.functional.avg_pool2d(x, 9, stride=1, padding=4, count_include_pad=False)
        return x.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    s = autoencoder._dense_after_vae(p, paths, rows, {k: [blur(v) for v in vs] for k, vs in maps.items()})
    assert 0.0 < s["gt_miou_after_vae"] < 1.0
    assert 0.0 < s["seg_pixel_acc_after_vae"] < 1.0
    assert s["depth_mae_after_vae"] > 1e-3
    assert s["gt_delta1_depth_after_vae"] <= 1.0 and s["gt_abs_rel_depth_after_vae"] > 1e-3
