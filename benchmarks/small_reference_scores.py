"""Reference scores for reading the ``small`` profile's dense-prediction figures: what predictors
that need no model score on the same held-out clips, with the same metrics as the evaluate stage.

    python benchmarks/small_reference_scores.py SAMPLES_INDEX_JSON [--out scores.json]

SAMPLES_INDEX_JSON is a sample stage's ``samples/index.json`` (its clip ids ``synth-<seed>-<index>``
name the clips); the clips are re-rendered from their seeds, byte for byte as the data stage made them.
- *GT at the token grid*: the exact map averaged (depth) or subsampled (ids) over the transformer's
  token cells (8x8 px for ``small``: VAE 4x, patch 2) and upsampled: the detail a prediction that is
  right per token but no finer keeps. The acceptance thresholds need finer detail than this.
- *Scene prior* (depth): the mean disparity map of 200 training clips, blind to the video.
- *Static frame 0* (ids): the first frame's exact ids for every frame (no tracking), and one entity
  covering frame 0's foreground.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from udpdiff.data.synthetic import clip_seed, exact_depth_range, render_clip
from udpdiff.evaluation.depth import depth_scores
from udpdiff.evaluation.segmentation import hungarian_miou

PRIOR_CLIPS = range(1000, 1200)  # training indices of the 2,000-clip set (validation is 5 %)


def cell_mean(x: np.ndarray, f: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x, np.float32))[:, None]
    return torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(t, f), scale_factor=f)[:, 0].numpy()


def cell_sample(x: np.ndarray, f: int) -> np.ndarray:
    return np.repeat(np.repeat(x[:, ::f, ::f], f, axis=1), f, axis=2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("index", type=Path)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    entries = json.loads(args.index.read_text())
    ids = sorted({e["clip_id"] for e in entries})
    dataset_seed = int(ids[0].split("-")[1])

    def render(index: int):
        return render_clip(clip_seed(dataset_seed, index), args.frames, args.size, args.size)

    clips = [render(int(c.rsplit("-", 1)[1])) for c in ids]
    prior = np.mean([render(i).depth for i in PRIOR_CLIPS], axis=0)
    depth = {"GT at the 8x8 token grid": lambda c: cell_mean(c.depth, 8),
             "GT at a 16x16 grid": lambda c: cell_mean(c.depth, 16),
             "scene prior (mean of 200 training clips; video-blind)": lambda c: prior}
    seg = {"GT at the 8x8 token grid": lambda c: cell_sample(c.ids, 8),
           "GT at a 16x16 grid": lambda c: cell_sample(c.ids, 16),
           "frame 0's exact ids, static (no tracking)": lambda c: np.repeat(c.ids[:1], len(c.ids), axis=0),
           "one entity covering frame 0's foreground, static": lambda c: np.repeat(
               (c.ids[:1] > 0).astype(np.int64), len(c.ids), axis=0)}
    out = {"clips": ids, "depth": {}, "segmentation": {}}
    for name, predict in depth.items():
        s = [depth_scores(predict(c), c.depth, depth_range=exact_depth_range("synthetic")) for c in clips]
        out["depth"][name] = {k: float(np.nanmean([x[k] for x in s])) for k in s[0]}
    for name, predict in seg.items():
        out["segmentation"][name] = {"miou": float(np.nanmean([hungarian_miou(predict(c), c.ids)["miou"]
                                                                for c in clips]))}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
