"""Which depth errors the scores punish: the held-out ``small`` clips' exact disparity, degraded in
controlled ways, encoded as the Spectral colormap, decoded and scored as the evaluate stage scores a
prediction (δ1 / AbsRel in normalised disparity, the paper's protocol, and in depth space).

    python benchmarks/small_depth_sensitivity.py CLIPS_JSON [--out sensitivity.json] [--only NAME ...]

CLIPS_JSON holds a ``clips`` list of ids ``synth-<seed>-<index>`` (``small_reference_scores.py``'s
output). Runs on the CPU (16 clips: about three minutes). It answers what a depth score means on
these scenes: a ground plane whose disparity ramps from 0 at the horizon to 0.064-0.10 at the bottom
row, covering most scored pixels, with the entities nearer than any of it and the sky (disparity 0)
left out of every score. A model's δ1 read against these rows says which kind of error it makes.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from small_vae_ceiling import REPO, exact_clip

from udpdiff import pixelplanes
from udpdiff.config import load_params
from udpdiff.data.synthetic import ENTITY_Z_RANGE, disparity_from_z, exact_depth_range
from udpdiff.evaluation.depth import depth_scores
from udpdiff.io.atomic import write_text

SKY = 1e-3  # the evaluation scores pixels with gt disparity above this (the sky is 0)


def _noisy(sigma: float, smooth_px: float = 0.0) -> Callable[[dict, np.random.Generator], np.ndarray]:
    """Gaussian noise of ``sigma`` RGB units on the colormap, iid or low-pass (``smooth_px``) in space."""
    def degrade(c: dict, rng: np.random.Generator) -> np.ndarray:
        cmap = pixelplanes.encode_depth(c["depth"]).astype(np.float32)
        if smooth_px:
            n = gaussian_filter(rng.normal(size=cmap.shape[:3]), (0, smooth_px, smooth_px))
            noise = (n / n.std() * sigma)[..., None]
        else:
            noise = rng.normal(0.0, sigma, cmap.shape)
        return np.clip(np.rint(cmap + noise), 0, 255).astype(np.uint8)
    return degrade


def _blurred(px: float) -> Callable[[dict, np.random.Generator], np.ndarray]:
    def degrade(c: dict, rng: np.random.Generator) -> np.ndarray:
        cmap = pixelplanes.encode_depth(c["depth"]).astype(np.float32)
        return np.clip(np.rint(gaussian_filter(cmap, (0, px, px, 0))), 0, 255).astype(np.uint8)
    return degrade


def _ground_slope(factor: float) -> Callable[[dict, np.random.Generator], np.ndarray]:
    """The ground's disparity pulled towards its per-frame mean: ``factor`` 0 is a flat ground, 1 exact."""
    def degrade(c: dict, rng: np.random.Generator) -> np.ndarray:
        d = c["depth"].copy()
        for t in range(len(d)):
            ground = (c["ids"][t] == 0) & (d[t] > SKY)
            mean = d[t][ground].mean()
            d[t][ground] = mean + factor * (d[t][ground] - mean)
        return pixelplanes.encode_depth(d)
    return degrade


def _ground_moved(offset: float = 0.0, scale: float = 1.0) -> Callable[[dict, np.random.Generator], np.ndarray]:
    """The ground's disparity scaled and offset against the entities' (its shape kept): a ground at the
    wrong level, which a per-video scale-and-shift fit anchored by the entities cannot undo."""
    def degrade(c: dict, rng: np.random.Generator) -> np.ndarray:
        d = c["depth"].copy()
        ground = (c["ids"] == 0) & (d > SKY)
        d[ground] = np.clip(d[ground] * scale + offset, 0.0, 1.0)
        return pixelplanes.encode_depth(d)
    return degrade


def _far_noise(sigma: float, below: float = 0.15) -> Callable[[dict, np.random.Generator], np.ndarray]:
    """iid disparity noise on the far pixels (the ground: disparity below ``below``)."""
    def degrade(c: dict, rng: np.random.Generator) -> np.ndarray:
        d = c["depth"].copy()
        far = (d < below) & (d > SKY)
        d[far] = np.clip(d[far] + rng.normal(0.0, sigma, int(far.sum())), 0.0, 1.0)
        return pixelplanes.encode_depth(d)
    return degrade


def _entities_flat(c: dict, rng: np.random.Generator) -> np.ndarray:
    d = c["depth"].copy()
    for e in np.unique(c["ids"]):
        if e:
            m = c["ids"] == e
            d[m] = d[m].mean()
    return pixelplanes.encode_depth(d)


def _entities_shuffled(c: dict, rng: np.random.Generator) -> np.ndarray:
    """Each entity moved to another one's mean disparity (its own relief kept): wrong depth order."""
    d = c["depth"].copy()
    entities = [e for e in np.unique(c["ids"]) if e]
    means = {e: c["depth"][c["ids"] == e].mean() for e in entities}
    for e, other in zip(entities, rng.permutation(entities), strict=True):
        m = c["ids"] == e
        d[m] = c["depth"][m] - means[e] + means[other]
    return pixelplanes.encode_depth(np.clip(d, 0.0, 1.0))


def _entities_guessed(draw: bool) -> Callable[[dict, np.random.Generator], np.ndarray]:
    """Each entity moved (its relief kept) to a depth that ignores the pixels: the prior's median
    (``draw`` False, what a regression to the mean predicts) or a draw from the prior (``draw`` True,
    what a diffusion model samples where the pixels do not say): the score of a model that cannot see
    how far the entities are."""
    lo, hi = np.log(ENTITY_Z_RANGE)

    def degrade(c: dict, rng: np.random.Generator) -> np.ndarray:
        d = c["depth"].copy()
        for e in np.unique(c["ids"]):
            if e:
                m = c["ids"] == e
                z = np.exp(rng.uniform(lo, hi) if draw else (lo + hi) / 2)
                d[m] = c["depth"][m] - c["depth"][m].mean() + disparity_from_z(z)
        return pixelplanes.encode_depth(np.clip(d, 0.0, 1.0))
    return degrade


def _inverted(c: dict, rng: np.random.Generator) -> np.ndarray:
    """Near and far swapped on the scored pixels, linearly: the scale-and-shift fit may take a negative
    scale, so both protocols forgive a depth read backwards (a property of the metric, worth knowing)."""
    d = c["depth"].copy()
    scored = d > SKY
    d[scored] = d[scored].max() + d[scored].min() - d[scored]
    return pixelplanes.encode_depth(d)


DEGRADATIONS: dict[str, Callable[[dict, np.random.Generator], np.ndarray]] = {
    "exact": lambda c, rng: pixelplanes.encode_depth(c["depth"]),
    **{f"colormap noise, iid, sigma {s}": _noisy(s) for s in (3, 6, 10, 20)},
    **{f"colormap noise, smooth (6 px), sigma {s}": _noisy(s, 6.0) for s in (3, 6, 10)},
    **{f"colormap blur {px} px": _blurred(px) for px in (1, 2, 4)},
    **{f"disparity noise on the ground, sigma {s}": _far_noise(s) for s in (0.005, 0.01, 0.02)},
    "ground slope halved": _ground_slope(0.5),
    "ground flat (its per-frame mean)": _ground_slope(0.0),
    **{f"ground offset {o:+g}": _ground_moved(offset=o) for o in (0.01, -0.01, 0.03, -0.03)},
    **{f"ground scaled x{k:g}": _ground_moved(scale=k) for k in (0.5, 2.0)},
    "entities flat (each at its mean)": _entities_flat,
    "entities' depths shuffled": _entities_shuffled,
    "entities at the prior's median depth": _entities_guessed(draw=False),
    "entities at depths drawn from the prior": _entities_guessed(draw=True),
    "near and far swapped": _inverted,
}


def sensitivity(p, ids: list[str], names: list[str] | None = None, seed: int = 0) -> dict:
    depth_range = exact_depth_range(p.active.data.source)
    clips = [exact_clip(p, cid) for cid in ids]
    rows = {}
    for name in names or list(DEGRADATIONS):
        rng = np.random.default_rng(seed)
        scores = [depth_scores(pixelplanes.decode_depth(DEGRADATIONS[name](c, rng)), c["depth"],
                               depth_range=depth_range) for c in clips]
        rows[name] = {k: float(np.nanmean([s[k] for s in scores])) for k in scores[0]}
        rows[name]["delta1_depth_per_clip"] = [round(float(s["delta1_depth"]), 3) for s in scores]
        print(f"{name:45s} δ1 {rows[name]['delta1']:.3f}  δ1 depth space {rows[name]['delta1_depth']:.3f}", flush=True)
    scored = [(c["depth"] > SKY) for c in clips]
    return {"clips": ids, "degradations": rows,
            "scene": {"ground_share_of_scored_pixels": [float(((c["ids"] == 0) & s).sum() / s.sum())
                                                        for c, s in zip(clips, scored, strict=True)],
                      "ground_max_disparity": [float(c["depth"][(c["ids"] == 0) & s].max())
                                               for c, s in zip(clips, scored, strict=True)]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("clips", type=Path)
    ap.add_argument("--only", nargs="+", default=None, choices=list(DEGRADATIONS), metavar="NAME")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    p = load_params(REPO / "params.yaml", profile="small")
    out = sensitivity(p, json.loads(args.clips.read_text())["clips"], args.only)
    if args.out:
        write_text(args.out, json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
