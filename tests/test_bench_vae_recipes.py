"""benchmarks/bench_vae_recipes.py: the autoencoder stage under several recipes, in scratch roots that link
the project's data and write nothing into it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from udpdiff.config import load_params
from udpdiff.data.synthetic import synthesize_dataset
from udpdiff.paths import ProjectPaths
from udpdiff.stages import encode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_vae_recipes  # noqa: E402


def test_each_recipe_and_seed_is_a_row_and_the_data_stays_untouched(tmp_path):
    p = load_params(ROOT / "params.yaml", profile="tiny").with_overrides({"data.num_clips": 6})
    paths = ProjectPaths(tmp_path / "project", "tiny")
    d = p.active.data
    synthesize_dataset(paths.clips, num_clips=d.num_clips, num_frames=d.num_frames, height=d.height,
                       width=d.width, fps=d.fps, seed=p.seed, val_fraction=d.val_fraction)
    encode.run(p, paths)
    before = sorted(f.relative_to(paths.data) for f in paths.data.rglob("*"))
    out = tmp_path / "recipes.json"
    assert bench_vae_recipes.main(["--profile", "tiny", "--data", str(paths.data.parent), "--seeds", "0", "1",
                                   "--recipe", "whole=vae.train.steps=2",
                                   "--recipe", "crop=vae.train.steps=2", "vae.train.crop=[9,24,24]",
                                   "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["recipe"], r["seed"]) for r in rows] == [("whole", 0), ("crop", 0), ("whole", 1), ("crop", 1)]
    assert rows[1]["overrides"] == ["vae.train.steps=2", "vae.train.crop=[9,24,24]"]
    assert all(r["seconds"] > 0 and 0 < r["psnr_rgb"] < 60 and 0 <= r["gt_miou_after_vae"] <= 1 for r in rows)
    assert rows[0]["psnr_rgb"] != rows[2]["psnr_rgb"]  # the seed reaches the VAE
    assert "Mean over seeds" in out.with_suffix(".md").read_text()
    assert sorted(f.relative_to(paths.data) for f in paths.data.rglob("*")) == before
    assert not (paths.root / "models").exists()


def test_a_profile_without_data_is_named(tmp_path):
    with pytest.raises(SystemExit, match="no data for profile tiny"):
        bench_vae_recipes.main(["--data", str(tmp_path), "--recipe", "whole=", "--out", str(tmp_path / "r.json")])
