"""benchmarks/small_vae_ceiling.py: the small profile's held-out clips re-rendered from their seeds, their
exact maps through a VAE, scored as predictions (here: a tiny random VAE of the same class)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import small_vae_ceiling  # noqa: E402

CLIPS = ["synth-1234-00033", "synth-1234-00044"]  # held-out clips of the small profile's data set


@pytest.fixture
def vae_dir(random_vae_dir) -> Path:
    return random_vae_dir


def _run(vae_dir: Path, tmp_path: Path) -> dict:
    clips = tmp_path / "clips.json"
    clips.write_text(json.dumps({"clips": CLIPS}))
    out = tmp_path / "ceiling.json"
    assert small_vae_ceiling.main([str(vae_dir), str(clips), "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_a_lossless_vae_reaches_every_score(vae_dir, tmp_path, monkeypatch):
    """With the round trip made exact, every score is the exact maps' own: the ceiling is 1 (the
    depth colormap's quantisation aside, and palette-free decoding at tolerances past the palette's
    colour spacing, which merges entities) and the colormap error is 0 everywhere."""
    monkeypatch.setattr(small_vae_ceiling, "reconstruct", lambda vae, video: video)
    r = _run(vae_dir, tmp_path)
    assert r["clips"] == CLIPS
    assert set(r["colormap_error_percentiles"].values()) == {0.0}
    assert all(v == 1.0 for v in r["segmentation_miou"]["with_palette"].values())
    # palette-free decoding merges colours closer than its tolerance: exact up to the palette's spacing (60)
    assert all(v == 1.0 for t, v in r["segmentation_miou"]["palette_free"].items() if int(t) <= 60)
    assert r["depth"]["delta1_depth"] > 0.99 and r["depth"]["abs_rel_depth"] < 0.01


def test_a_random_vae_scores_below_the_exact_maps(vae_dir, tmp_path):
    r = _run(vae_dir, tmp_path)
    assert r["colormap_error_percentiles"]["p50"] > 10  # an untrained VAE does not reconstruct
    scores = [*r["segmentation_miou"]["palette_free"].values(), *r["segmentation_miou"]["with_palette"].values()]
    assert all(0.0 <= s < 1.0 for s in scores)
    assert set(r["segmentation_miou"]["palette_free"]) == {str(t) for t in small_vae_ceiling.TOLERANCES}
    assert r["depth"]["delta1_depth"] < 0.99


def test_prediction_sweep_scores_saved_samples_against_their_clips(tmp_path):
    """``--predictions``: exact colormaps saved as a sample's ``conditioned_colormap`` score 1 at every
    tolerance up to the palette's spacing; a colormap of another clip scores far lower."""
    p = small_vae_ceiling.load_params(small_vae_ceiling.REPO / "params.yaml", profile="small")
    exact = {cid: small_vae_ceiling.exact_clip(p, cid)["exact_seg"] for cid in CLIPS}
    good, bad = tmp_path / "good", tmp_path / "bad"
    for folder, maps in ((good, exact), (bad, dict(zip(CLIPS, reversed(list(exact.values())), strict=True)))):
        folder.mkdir()
        for cid, colormap in maps.items():
            np.savez_compressed(folder / f"{cid}.npz", conditioned_colormap=colormap, video=colormap)
    out = tmp_path / "sweep.json"
    assert small_vae_ceiling.main(["--predictions", str(good), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["clips"] == CLIPS
    assert all(v == 1.0 for t, v in r["segmentation_miou"]["palette_free"].items() if int(t) <= 60)
    assert small_vae_ceiling.main(["--predictions", str(bad), "--out", str(out)]) == 0
    assert max(json.loads(out.read_text())["segmentation_miou"]["palette_free"].values()) < 0.5


def test_prediction_sweep_of_an_ensemble_reads_its_first_members_colormap(tmp_path):
    """With sample.dense_ensemble_size > 1 a sample's conditioned_colormap is the vote encoded again; the
    sweep scores the first member's own colormap (exact here, the vote's another clip's)."""
    p = small_vae_ceiling.load_params(small_vae_ceiling.REPO / "params.yaml", profile="small")
    exact = [small_vae_ceiling.exact_clip(p, cid)["exact_seg"] for cid in CLIPS]
    for cid, own, other in zip(CLIPS, exact, reversed(exact), strict=True):
        np.savez_compressed(tmp_path / f"{cid}.npz", conditioned_colormap=other, conditioned_colormap_single=own)
    out = tmp_path / "sweep.json"
    assert small_vae_ceiling.main(["--predictions", str(tmp_path), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["colormaps"] == ["conditioned_colormap_single"]
    assert all(v == 1.0 for t, v in r["segmentation_miou"]["palette_free"].items() if int(t) <= 60)


def test_prediction_sweep_names_a_folder_without_samples(tmp_path):
    with pytest.raises(SystemExit, match=str(tmp_path)):
        small_vae_ceiling.main(["--predictions", str(tmp_path)])
