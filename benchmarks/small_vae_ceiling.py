"""The ceiling of dense prediction through a trained ``small`` VAE: the held-out clips' exact colormaps
encoded and decoded by the VAE, then decoded by Pixelplanes and scored as the evaluate stage scores a
prediction, at several segmentation decode tolerances (with and without the clip's palette).

    python benchmarks/small_vae_ceiling.py VAE_DIR CLIPS_JSON [--out ceiling.json]

VAE_DIR is a trained VAE (``models/small/vae``; ``small_gpu.py save-vae`` packs one); CLIPS_JSON a
file with a ``clips`` list of ids ``synth-<seed>-<index>`` (e.g. ``small_reference_scores.py``'s output).
The clips and their colormaps are re-rendered from their seeds, as the data and encode stages made
them. Runs on the CPU (16 clips: about a minute). A transformer that predicted the exact dense latent
would score these numbers: a prediction above them is impossible, one near them is limited by the VAE.
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


def main(argv: list[str] | None = None) -> int:
    from diffusers import AutoencoderKLCogVideoX

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("vae", type=Path)
    ap.add_argument("clips", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    p = load_params(REPO / "params.yaml", profile="small")
    d, pp = p.active.data, p.active.pixelplanes
    ids = json.loads(args.clips.read_text())["clips"]
    vae = AutoencoderKLCogVideoX.from_pretrained(args.vae).eval()
    clips = []
    for cid in ids:
        dataset_seed, index = (int(x) for x in cid.split("-")[1:])
        c = render_clip(clip_seed(dataset_seed, index), d.num_frames, d.height, d.width)
        entities = np.unique(c.ids)
        palette = pixelplanes.make_palette(entities[entities != 0], seed=palette_seed(p.seed, cid),
                                           min_distance=pp.min_color_distance)
        seg, palette = pixelplanes.encode_segmentation(c.ids, palette=palette)
        clips.append({"ids": c.ids, "depth": c.depth, "exact_seg": seg, "seg": reconstruct(vae, seg),
                      "palette": palette, "depth_map": reconstruct(vae, pixelplanes.encode_depth(c.depth))})
        print(f"{cid}: {len(entities) - 1} entities", flush=True)

    def miou(decode) -> float:
        return float(np.nanmean([hungarian_miou(decode(c), c["ids"])["miou"] for c in clips]))

    err = np.concatenate([np.linalg.norm(c["seg"].astype(np.float32) - c["exact_seg"].astype(np.float32), axis=-1)
                          .ravel() for c in clips])
    depth_range = exact_depth_range(d.source)
    depth = [depth_scores(pixelplanes.decode_depth(c["depth_map"]), c["depth"], depth_range=depth_range) for c in clips]
    out = {"vae": str(args.vae), "clips": ids, "profile_decode_tolerance": pp.decode_tolerance,
           "colormap_error_percentiles": dict(zip(["p50", "p90", "p95", "p99"],
                                                  np.percentile(err, [50, 90, 95, 99]).round(1).tolist(), strict=True)),
           "depth": {k: float(np.nanmean([s[k] for s in depth])) for k in depth[0]},
           "segmentation_miou": {
               "palette_free": {t: miou(lambda c, t=t: pixelplanes.decode_segmentation(c["seg"], tolerance=t))
                                for t in TOLERANCES},
               "with_palette": {t: miou(lambda c, t=t: pixelplanes.decode_segmentation(
                   c["seg"], palette=c["palette"], tolerance=t)) for t in (*TOLERANCES, 1000)}}}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
