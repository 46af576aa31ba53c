"""Where a ``small`` model's segmentation of real clips loses mIoU, entity by entity: the
``dense_predictions.npz`` a GPU run returns (``small_gpu.py``), against the clips' exact entity ids
re-rendered from their seeds. Runs on the CPU (16 clips: a few seconds).

    python benchmarks/small_seg_errors.py dense_predictions.npz [--prefix segmentation_single] [--out errors.json]

Each ground-truth entity is matched to a predicted one as the evaluation matches them (Hungarian on the
video-volume IoU, ``udpdiff.evaluation.segmentation.hungarian_miou``); its IoU is that match's. Where its
pixels went instead (fractions of the entity's pixels, summing to 1 with ``hit``):
- ``to_background``: predicted background (id 0): the entity, or part of it, missed;
- ``to_other_entity``: the segment matched to another ground-truth entity: two entities painted one
  colour (a merge; ``merged`` flags an entity whose pixels mostly carry another entity's segment, or
  whose majority segment is also another entity's majority);
- ``to_unmatched``: segments matched to no entity: the entity split, or stray colours.
``spill``: the fraction of the matched segment outside the entity (edges bled onto the background or
onto neighbours). The summary breaks the mIoU down by entity size (share of the frame) and shape, so a
gap made of small entities, merges or edges shows as such.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from small_vae_ceiling import REPO, exact_clip

from udpdiff.config import load_params
from udpdiff.evaluation.segmentation import hungarian_miou
from udpdiff.io.atomic import write_text

SIZE_BINS = [0.0, 0.01, 0.03, 0.10, 1.0]  # an entity's mean share of the frame
SIZE_LABELS = ["< 1 %", "1–3 %", "3–10 %", "≥ 10 %"]


def entity_errors(pred: np.ndarray, clip: dict) -> pd.DataFrame:
    """One row per ground-truth entity of a clip (module docstring)."""
    gt = clip["ids"][: len(pred)].astype(np.int64)
    pred = pred.astype(np.int64)
    scores = hungarian_miou(pred, gt)
    matched, ious = {g: p for p, g, _ in scores["matches"]}, scores["per_entity"]
    shapes = {e.id: e.shape for e in clip["scene"].entities}
    majority = {}
    for g in ious:
        values, counts = np.unique(pred[gt == g], return_counts=True)
        majority[g] = int(values[counts.argmax()])
    rows = []
    for g, iou in ious.items():
        mask = gt == g
        p = pred[mask]
        others = [matched[o] for o in matched if o != g]
        own = matched.get(g)
        segment = pred == own if own is not None else np.zeros_like(mask)
        merged = majority[g] != 0 and (majority[g] in others
                                       or any(majority[o] == majority[g] for o in majority if o != g))
        rows.append({"entity": g, "shape": shapes.get(g, "?"), "frame_share": float(mask.mean()), "iou": iou,
                     "hit": float((p == own).mean()) if own is not None else 0.0,
                     "to_background": float((p == 0).mean()),
                     "to_other_entity": float(np.isin(p, others).mean()),
                     "to_unmatched": float((~np.isin(p, [0, *others, *([own] if own is not None else [])])).mean()),
                     "spill": float((segment & ~mask).sum() / max(segment.sum(), 1)),
                     "merged": bool(merged)})
    return pd.DataFrame(rows)


def seg_errors(p, predictions: Path, prefix: str = "segmentation") -> pd.DataFrame:
    with np.load(predictions) as z:
        keys = sorted(k for k in z.files if k.startswith(f"{prefix}/"))
        if not keys:
            raise SystemExit(f"{predictions}: no {prefix}/<clip> predictions "
                             "(a dense_predictions.npz of a segmentation model?)")
        frames = []
        for key in keys:
            clip_id = key.split("/", 1)[1]
            e = entity_errors(z[key], exact_clip(p, clip_id))
            frames.append(e.assign(clip=clip_id))
    return pd.concat(frames, ignore_index=True)


def summary(entities: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The mIoU and where the pixels went, over all entities, by size and by shape."""
    parts = ["iou", "hit", "to_background", "to_other_entity", "to_unmatched", "spill", "merged"]
    size = pd.cut(entities.frame_share, SIZE_BINS, labels=SIZE_LABELS, right=False)

    def table(by) -> pd.DataFrame:
        g = entities.groupby(by, observed=True)
        return g[parts].mean().assign(entities=g.size())[["entities", *parts]]

    return {"all": table(np.zeros(len(entities), int)).rename(index={0: "all"}),
            "by_size": table(size.rename("frame share")), "by_shape": table(entities["shape"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("predictions", type=Path)
    ap.add_argument("--prefix", default="segmentation", choices=["segmentation", "segmentation_single"],
                    help="the evaluated predictions (a vote where sample.dense_ensemble_size > 1) or a vote's "
                         "first member alone")
    ap.add_argument("--out", type=Path, default=None, help="JSON of the per-entity rows (a .md summary beside it)")
    args = ap.parse_args(argv)
    p = load_params(REPO / "params.yaml", profile="small")
    entities = seg_errors(p, args.predictions, args.prefix)
    tables = summary(entities)
    text = "\n\n".join(f"{name}:\n\n" + t.to_markdown(floatfmt=".3f") for name, t in tables.items())
    print(text)
    if args.out:
        report = {"predictions": str(args.predictions), "prefix": args.prefix,
                  "entities": entities.to_dict(orient="records"),
                  **{name: t.reset_index().to_dict(orient="records") for name, t in tables.items()}}
        write_text(args.out, json.dumps(report, indent=1, default=str) + "\n")
        write_text(args.out.with_suffix(".md"), text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
