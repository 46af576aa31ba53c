"""The ceiling of dense prediction through a trained ``small`` VAE: the held-out clips' exact colormaps
encoded and decoded by the VAE, then decoded by Pixelplanes and scored as the evaluate stage scores a
prediction, at several segmentation decode tolerances (with and without the clip's palette).

    python benchmarks/small_vae_ceiling.py VAE_DIR CLIPS_JSON [--out ceiling.json]
    python benchmarks/small_vae_ceiling.py --predictions SAMPLES_DIR [--out sweep.json]

VAE_DIR is a trained VAE (``models/small/vae``; ``small_gpu.py save-vae`` packs one); CLIPS_JSON a
file with a ``clips`` list of ids ``synth-<seed>-<index>`` (e.g. ``small_reference_scores.py``'s output).
The clips and their colormaps are re-rendered from their seeds, as the data and encode stages made
them. Runs on the CPU (16 clips: about a minute). A transformer that predicted the exact dense latent
would score these numbers: a prediction above them is impossible, one near them is limited by the VAE.

With ``--predictions`` it sweeps the same tolerances over a trained model's predictions instead: the
sample stage's ``samples/segmentation/*.npz`` (``conditioned_colormap``, the dense prediction of a real
clip), scored against the clip's exact ids re-rendered from its seed. Predictions are noisier than a
VAE round trip, so their best tolerance need not be the ceiling's. In a run with
``sample.dense_ensemble_size`` > 1 that colormap is the vote's, encoded again from its ids: the sweep
reads the first member's own colormap (``conditioned_colormap_single``) instead, as the model made it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from udpdiff import pixelplanes
from udpdiff.config import load_params
from udpdiff.data.synthetic import clip_seed, exact_depth_range, render_clip
from udpdiff.evaluation.depth import depth_scores
from udpdiff.evaluation.segmentation import hungarian_miou
from udpdiff.models.vae import reconstruct
from udpdiff.stages.common import clip_seed as palette_seed

REPO = Path(__file__).resolve().parents[1]
TOLERANCES = (25, 40, 50, 60, 70, 80, 100)


def exact_clip(p, clip_id: str) -> dict[str, np.ndarray]:
    """Clip ``synth-<seed>-<index>`` re-rendered as the data and encode stages made it: its frames, ids,
    depth, segmentation colormap, the palette that coloured it and the scene it was rendered from."""
    d, pp = p.active.data, p.active.pixelplanes
    dataset_seed, index = (int(x) for x in clip_id.split("-")[1:])
    c = render_clip(clip_seed(dataset_seed, index), d.num_frames, d.height, d.width)
    entities = np.unique(c.ids)
    palette = pixelplanes.make_palette(entities[entities != 0], seed=palette_seed(p.seed, clip_id),
                                       min_distance=pp.min_color_distance)
    seg, palette = pixelplanes.encode_segmentation(c.ids, palette=palette)
    return {"frames": c.frames, "ids": c.ids, "depth": c.depth, "exact_seg": seg, "palette": palette,
            "scene": c.scene}


def miou_per_tolerance(clips: list[dict], key: str, with_palette: bool = False,
                       tolerances: tuple[int, ...] = TOLERANCES) -> dict[int, float]:
    """Mean Hungarian mIoU of the colormaps ``clip[key]`` decoded at each tolerance."""
    def decode(c: dict, t: int) -> np.ndarray:
        return pixelplanes.decode_segmentation(c[key], palette=c["palette"] if with_palette else None, tolerance=t)

    return {t: float(np.nanmean([hungarian_miou(decode(c, t), c["ids"][:len(c[key])])["miou"] for c in clips]))
            for t in tolerances}


def load_vae(vae_dir: Path):
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX.from_pretrained(vae_dir).eval()


def depth_through_vae(vae, depth: np.ndarray) -> np.ndarray:
    """Exact disparity -> its Pixelplanes colormap -> encoded and decoded by ``vae`` -> disparity."""
    return pixelplanes.decode_depth(reconstruct(vae, pixelplanes.encode_depth(depth)))


def ceiling(p, vae_dir: Path, ids: list[str]) -> dict:
    vae = load_vae(vae_dir)
    clips = []
    for cid in ids:
        c = exact_clip(p, cid)
        c.update(seg=reconstruct(vae, c["exact_seg"]), depth_through=depth_through_vae(vae, c["depth"]))
        clips.append(c)
        print(f"{cid}: {len(np.unique(c['ids'])) - 1} entities", flush=True)
    err = np.concatenate([np.linalg.norm(c["seg"].astype(np.float32) - c["exact_seg"].astype(np.float32), axis=-1)
                          .ravel() for c in clips])
    percentiles = np.percentile(err, [50, 90, 95, 99]).round(1).tolist()
    depth_range = exact_depth_range(p.active.data.source)
    depth = [depth_scores(c["depth_through"], c["depth"], depth_range=depth_range) for c in clips]
    return {"vae": str(vae_dir), "clips": ids, "profile_decode_tolerance": p.active.pixelplanes.decode_tolerance,
            "colormap_error_percentiles": dict(zip(["p50", "p90", "p95", "p99"], percentiles, strict=True)),
            "depth": {k: float(np.nanmean([s[k] for s in depth])) for k in depth[0]},
            "segmentation_miou": {"palette_free": miou_per_tolerance(clips, "seg"),
                                  "with_palette": miou_per_tolerance(clips, "seg", True, (*TOLERANCES, 1000))}}


def prediction_sweep(p, samples: Path) -> dict:
    files = sorted(samples.glob("*.npz"))
    if not files:
        raise SystemExit(f"{samples}: no *.npz samples (the sample stage's samples/segmentation folder?)")
    clips, keys = [], set()
    for f in files:
        with np.load(f) as z:
            if "conditioned_colormap" not in z:
                raise SystemExit(f"{f}: no conditioned_colormap: not a segmentation sample")
            # an ensemble's conditioned_colormap is its vote encoded again (a palette of its own, no tolerance
            # to find): its first member's colormap is the model's
            key = "conditioned_colormap_single" if "conditioned_colormap_single" in z else "conditioned_colormap"
            clips.append({**exact_clip(p, f.stem), "predicted": z[key]})
            keys.add(key)
    return {"predictions": str(samples), "clips": [f.stem for f in files], "colormaps": sorted(keys),
            "profile_decode_tolerance": p.active.pixelplanes.decode_tolerance,
            # palette-free only: a model picks its own colours for the entities (paper §3.2), so the
            # clip's palette is no reference for a prediction
            "segmentation_miou": {"palette_free": miou_per_tolerance(clips, "predicted")}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("vae", type=Path, nargs="?")
    ap.add_argument("clips", type=Path, nargs="?")
    ap.add_argument("--predictions", type=Path, default=None, help="a samples/segmentation folder to sweep instead")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.predictions is None and (args.vae is None or args.clips is None):
        ap.error("give VAE_DIR and CLIPS_JSON, or --predictions SAMPLES_DIR")
    p = load_params(REPO / "params.yaml", profile="small")
    if args.predictions is not None:
        out = prediction_sweep(p, args.predictions)
    else:
        out = ceiling(p, args.vae, json.loads(args.clips.read_text())["clips"])
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
