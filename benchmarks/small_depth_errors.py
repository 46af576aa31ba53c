"""Where a ``small`` model's depth predictions of real clips go wrong, clip by clip: the
``dense_predictions.npz`` a GPU run returns (``small_gpu.py``), against the clips' exact disparity
re-rendered from their seeds. Runs on the CPU (16 clips: about a minute).

    python benchmarks/small_depth_errors.py dense_predictions.npz [--out errors.json] [--compare other.npz]
        [--prefix depth_single]

Per clip, beside the evaluate stage's δ1 (depth space, one scale-and-shift per video):
- ``delta1_depth_per_frame_fit``: the same with a fit per frame; far above the per-video score, the
  prediction drifts in level or scale over time;
- ``delta1_depth_ground_fit`` / ``delta1_depth_entities_fit``: each region fitted and scored alone;
  both high while the whole is low, the regions are right in themselves but not against each other;
- ``ground_slope`` / ``ground_r2``: the predicted ground disparity regressed on the true one, per
  frame, then averaged (1 / 1 is exact; a slope near 0 is a flat ground, below 0 a reversed ramp);
- ``fit_scale``: the per-video scale of the paper protocol's fit (below 0: the prediction is read
  backwards, which the scale-and-shift fit forgives);
- ``delta1_depth_true_entities`` / ``delta1_depth_true_ground``: the evaluate stage's δ1 with one region's
  prediction replaced by the truth, the rest as predicted: what that region's errors cost (one fit
  covers both regions, so entity errors also shift the far ground, where depth is most sensitive);
- ``delta1_depth_entity_medians``: each entity's pixels set to its median prediction: what the spread
  inside entities (ragged edges, blotches) costs beside their level.
Over all clips' entities (``entities`` in the JSON): how their predicted mean disparities follow the
true ones (correlation, mean absolute error beside that of guessing the prior's median for every
entity, and how often a pair's near/far order is right). Near 0, 0.5 and above the guess, the model
does not see how far the entities are: it guesses. ``slope`` (the predicted means regressed on the
true ones) and the two spreads tell a compressed estimate (slope below 1, its spread below the
truth's: entities pulled towards the middle) from a noisy one. ``size_r2_truth`` is how much of the true
disparities' variance the entities' image size explains (their image radius, from the scene; the
generator gives every entity about one metric size, so near 1 the pixels show the depth),
``size_r2_predicted`` the same for the predictions, and ``size_slope_ratio`` how steeply the predictions
follow image size against the truth (1: the size cue fully used, 0: ignored). ``area_r2_truth`` /
``area_r2_predicted``: the same shares for the square root of the entity's silhouette area (unoccluded,
in pixels) instead of its extent. The truth follows extent (equal metric radii), so a prediction that
follows area better than extent reads how much of the frame an entity fills, and puts the shapes that
fill little of their extent (rings, triangles) too far.
``by_shape``: the entities' mean disparity error per generator shape, after each clip's scale-and-shift fit
(the evaluation's): every shape has the same metric size, so a shape put consistently too far or too near
is one whose image the model misreads (attempt 14: rings and triangles, which fill less of their extent).
``shape_bias_cost``: the evaluation's δ1 with each shape's mean error (``by_shape``) taken off its entities'
aligned predictions, one shape at a time and all at once; ``leave_one_clip_out`` measures the bias on the
other clips only, so a gain there is a bias consistent enough to correct without knowing the clip.

``--compare other.npz``: the same clips predicted by another run (or seed). ``entity_error_correlation``
near 1 means both runs put the same entities wrong (errors the model or the shared seeds make
systematically, not sampling noise); ``delta1_depth_of_the_mean`` scores the two predictions averaged: a
gain over both is what an ensemble of such runs would buy.
``--through-vae VAE_DIR``: the same clips, but the depth analysed is each clip's exact disparity encoded and
decoded by that VAE (the run's ``models/small/vae``) instead of the model's prediction: which of the errors
above the VAE already makes. A transformer that predicted the exact dense latent would show these (attempt
15: the VAE puts rings 0.03 too far, the model 0.10).
See ``small_depth_sensitivity.py`` for what each kind of error costs the scores on these scenes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from small_depth_sensitivity import SKY
from small_vae_ceiling import REPO, depth_through_vae, exact_clip, load_vae

from udpdiff.config import load_params
from udpdiff.data.synthetic import ENTITY_Z_RANGE, FOCAL_FRAC, disparity_from_z, entity_layer, exact_depth_range
from udpdiff.evaluation.depth import align_scale_shift, depth_scores, depth_space_metrics
from udpdiff.io.atomic import write_text


def ground_fit(pred: np.ndarray, gt: np.ndarray, ground: np.ndarray) -> tuple[float, float]:
    """Mean over frames of the least-squares slope and r² of predicted on true ground disparity."""
    slopes, r2s = [], []
    for p, g, m in zip(pred, gt, ground, strict=True):
        x, y = g[m].astype(np.float64), p[m].astype(np.float64)
        if m.sum() < 16 or x.std() == 0:
            continue
        slope, intercept = np.polyfit(x, y, 1)
        residual = y - (slope * x + intercept)
        slopes.append(slope)
        r2s.append(1.0 - residual.var() / y.var() if y.var() > 0 else 0.0)
    return float(np.mean(slopes)) if slopes else float("nan"), float(np.mean(r2s)) if r2s else float("nan")


def clip_errors(pred: np.ndarray, clip: dict, depth_range: tuple[float, float]) -> dict[str, float]:
    gt, ids = clip["depth"][: len(pred)], clip["ids"][: len(pred)]
    pred = pred.astype(np.float32)
    ground, entities = (ids == 0) & (gt > SKY), ids > 0
    scores = depth_scores(pred, gt, depth_range=depth_range)
    slope, r2 = ground_fit(pred, gt, ground)

    def delta1(mask: np.ndarray | None = None, per_frame: bool = False) -> float:
        return float(depth_space_metrics(pred, gt, depth_range, mask=mask, per_frame=per_frame)["delta1"])

    def delta1_with(replaced: np.ndarray) -> float:  # the evaluate stage's delta1_depth (depth_scores), alone
        return float(depth_space_metrics(replaced, gt, depth_range, mask=gt > 1e-3)["delta1"])

    medians = pred.copy()
    for entity in np.unique(ids[entities]):
        medians[ids == entity] = np.median(pred[ids == entity])

    return {"delta1": float(scores["delta1"]), "delta1_depth": float(scores["delta1_depth"]),
            "abs_rel_depth": float(scores["abs_rel_depth"]), "delta1_depth_per_frame_fit": delta1(per_frame=True),
            "delta1_depth_ground_fit": delta1(ground), "delta1_depth_entities_fit": delta1(entities),
            "delta1_depth_true_entities": delta1_with(np.where(entities, gt, pred)),
            "delta1_depth_true_ground": delta1_with(np.where(ground, gt, pred)),
            "delta1_depth_entity_medians": delta1_with(medians),
            "ground_slope": slope, "ground_r2": r2,
            # the paper protocol's scale: below 0 the fit reads the prediction backwards (and may still score)
            "fit_scale": float(align_scale_shift(pred, gt, mask=gt > SKY).scale),
            "ground_share": float(ground.sum() / max((gt > SKY).sum(), 1))}


def entity_means(pred: np.ndarray, clip: dict) -> pd.DataFrame:
    """Per visible entity of a clip: its shape, its true and predicted mean disparity over the predicted
    frames, its image radius in pixels (at its mean depth over those frames) and the square root of its
    mean silhouette area in pixels (from the scene, occlusion ignored)."""
    gt, ids, scene = clip["depth"][: len(pred)], clip["ids"][: len(pred)], clip["scene"]
    rows = []
    for e in scene.entities:
        mask = ids == e.id
        if mask.any():
            z = np.mean([e.z_at(t) for t in range(len(pred))])
            area = np.mean([entity_layer(e, scene, t)[0].sum() for t in range(len(pred))])
            rows.append({"id": e.id, "shape": e.shape, "true": float(gt[mask].mean()),
                         "predicted": float(pred[mask].astype(np.float64).mean()),
                         "image_radius": FOCAL_FRAC * scene.width * e.radius / z,
                         "image_sqrt_area": float(np.sqrt(area))})
    return pd.DataFrame(rows)


def aligned(pred: np.ndarray, clip: dict) -> np.ndarray:
    """``pred`` after the clip's one scale-and-shift fit to the truth, as the evaluation fits it."""
    gt = clip["depth"][: len(pred)].astype(np.float64)
    return align_scale_shift(pred.astype(np.float64), gt, mask=gt > SKY).aligned


def errors_by_shape(pairs: list[tuple[np.ndarray, dict]]) -> pd.DataFrame:
    """Per generator shape: its entities and their mean aligned disparity error (predicted - true) with
    its standard error (module docstring, ``by_shape``)."""
    m = pd.concat([entity_means(aligned(p, clip), clip) for p, clip in pairs], ignore_index=True)
    error = (m.predicted - m.true).groupby(m["shape"])
    return pd.DataFrame({"entities": error.size(), "mean_error": error.mean(),
                         "standard_error": error.std() / np.sqrt(error.size())})


def shape_bias_cost(pairs: list[tuple[np.ndarray, dict]], depth_range: tuple[float, float]) -> pd.DataFrame:
    """What each shape's bias costs δ1 (module docstring, ``shape_bias_cost``): per shape, and for all
    shapes at once, the mean δ1 (depth space) with that bias taken off its entities' aligned predictions,
    the bias measured on all clips (``in_sample``) or on the other clips only (``leave_one_clip_out``)."""
    fitted = [(aligned(p, clip), clip) for p, clip in pairs]
    means = [entity_means(a, clip) for a, clip in fitted]

    def bias(leave_out: int | None = None) -> pd.Series:
        m = pd.concat([x for i, x in enumerate(means) if i != leave_out], ignore_index=True)
        return (m.predicted - m.true).groupby(m["shape"]).mean()

    def delta1(i: int, b: pd.Series, shapes: set[str]) -> float:
        pred, clip = fitted[i]
        pred, ids = pred.copy(), clip["ids"][: len(pred)]
        for e in clip["scene"].entities:
            if e.shape in shapes and e.shape in b:
                pred[ids == e.id] -= b[e.shape]
        return float(depth_scores(pred, clip["depth"][: len(pred)], depth_range=depth_range)["delta1_depth"])

    everywhere, rows = bias(), {}
    for name, shapes in [("all shapes", set(everywhere.index)), *((s, {s}) for s in everywhere.index)]:
        rows[name] = {"in_sample": np.mean([delta1(i, everywhere, shapes) for i in range(len(fitted))]),
                      "leave_one_clip_out": np.mean([delta1(i, bias(i), shapes) for i in range(len(fitted))])}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("bias taken off")


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of y on x and the share of y's variance it explains."""
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(1.0 - (y - slope * x - intercept).var() / y.var()) if y.var() > 0 else 0.0


def entity_depths(pairs: list[tuple[np.ndarray, dict]]) -> dict[str, float]:
    """How (prediction, clip) pairs' per-entity mean disparities follow the truth (module docstring)."""
    frames, order = [], []
    for p, clip in pairs:
        m = entity_means(p, clip)
        frames.append(m)
        means = list(zip(m.true, m.predicted, strict=True))
        order += [(ta > tb) == (qa > qb) for i, (ta, qa) in enumerate(means) for tb, qb in means[i + 1:] if ta != tb]
    m = pd.concat(frames, ignore_index=True)
    true, pred, size = m.true.to_numpy(), m.predicted.to_numpy(), m.image_radius.to_numpy()
    median_guess = disparity_from_z(np.sqrt(np.prod(ENTITY_Z_RANGE)))  # the log-uniform prior's median depth
    (true_on_size, size_r2_truth), (pred_on_size, size_r2_predicted) = _fit(size, true), _fit(size, pred)
    area = m.image_sqrt_area.to_numpy()
    return {"entities": len(true), "correlation": float(np.corrcoef(true, pred)[0, 1]),
            "mean_abs_error": float(np.abs(pred - true).mean()),
            "mean_abs_error_of_the_prior_median": float(np.abs(median_guess - true).mean()),
            "pair_order_right": float(np.mean(order)) if order else float("nan"),
            "slope": float(np.polyfit(true, pred, 1)[0]), "spread": float(pred.std()), "true_spread": float(true.std()),
            "size_r2_truth": size_r2_truth, "size_r2_predicted": size_r2_predicted,
            "size_slope_ratio": pred_on_size / true_on_size,
            "area_r2_truth": _fit(area, true)[1], "area_r2_predicted": _fit(area, pred)[1]}


def compare(p, predictions: Path, other: Path, prefix: str = "depth") -> dict[str, float]:
    """Two runs' depth predictions of the same clips (module docstring, ``--compare``): ``predictions``'
    ``prefix`` ones against ``other``'s evaluated ones (``depth/``)."""
    depth_range = exact_depth_range(p.active.data.source)
    with np.load(predictions) as a, np.load(other) as b:
        clip_ids = sorted(k.split("/", 1)[1] for k in a.files if k.startswith(f"{prefix}/"))
        missing = [c for c in clip_ids if f"depth/{c}" not in b.files]
        if missing or not clip_ids:
            raise SystemExit(f"{other}: lacks {len(missing)} of {predictions}'s {len(clip_ids)} depth predictions "
                             f"({missing[:3]})")
        errors, scores = [], {"a": [], "b": [], "mean": []}
        for clip_id in clip_ids:
            clip = exact_clip(p, clip_id)
            pa, pb = a[f"{prefix}/{clip_id}"].astype(np.float32), b[f"depth/{clip_id}"].astype(np.float32)
            ma, mb = entity_means(pa, clip), entity_means(pb, clip)
            errors.append(np.stack([ma.predicted - ma.true, mb.predicted - mb.true], axis=1))
            for name, pred in (("a", pa), ("b", pb), ("mean", (pa + pb) / 2)):
                gt = clip["depth"][: len(pred)]
                scores[name].append(float(depth_scores(pred, gt, depth_range=depth_range)["delta1_depth"]))
    e = np.concatenate(errors)
    return {"entities": len(e), "entity_error_correlation": float(np.corrcoef(e[:, 0], e[:, 1])[0, 1]),
            "delta1_depth": float(np.mean(scores["a"])), "delta1_depth_other": float(np.mean(scores["b"])),
            "delta1_depth_of_the_mean": float(np.mean(scores["mean"]))}


def depth_errors(p, predictions: Path, prefix: str = "depth",
                 through_vae: Path | None = None) -> tuple[pd.DataFrame, dict[str, float], pd.DataFrame, pd.DataFrame]:
    depth_range = exact_depth_range(p.active.data.source)
    rows, pairs = {}, []
    vae = load_vae(through_vae) if through_vae else None
    with np.load(predictions) as z:
        keys = sorted(k for k in z.files if k.startswith(f"{prefix}/"))
        if not keys:
            raise SystemExit(f"{predictions}: no {prefix}/<clip> predictions "
                             "(a dense_predictions.npz of a depth model?)")
        for key in keys:
            clip_id = key.split("/", 1)[1]
            clip = exact_clip(p, clip_id)
            pred = depth_through_vae(vae, clip["depth"][: len(z[key])]) if vae else z[key]
            rows[clip_id] = clip_errors(pred, clip, depth_range)
            pairs.append((pred, clip))
            print(f"{clip_id}: δ1 depth space {rows[clip_id]['delta1_depth']:.3f}", flush=True)
    return (pd.DataFrame.from_dict(rows, orient="index").rename_axis("clip"), entity_depths(pairs),
            errors_by_shape(pairs), shape_bias_cost(pairs, depth_range))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("predictions", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="JSON of the per-clip rows (a .md table beside it)")
    ap.add_argument("--compare", type=Path, default=None, metavar="OTHER_NPZ",
                    help="another run's dense_predictions.npz of the same clips (module docstring)")
    ap.add_argument("--prefix", default="depth", choices=["depth", "depth_single"],
                    help="which predictions: depth (the evaluated ones; an ensemble where sample.dense_ensemble_size "
                         "> 1) or depth_single (an ensemble's first member alone)")
    ap.add_argument("--through-vae", type=Path, default=None, metavar="VAE_DIR",
                    help="analyse the clips' exact depth through this VAE instead of the predictions "
                         "(module docstring)")
    args = ap.parse_args(argv)
    if args.through_vae and args.compare:
        ap.error("--through-vae analyses the VAE's round trip, --compare two runs' predictions: one at a time")
    p = load_params(REPO / "params.yaml", profile="small")
    table, entities, by_shape, bias_cost = depth_errors(p, args.predictions, args.prefix, args.through_vae)

    def summary(d: dict) -> str:
        return ", ".join(f"{k.replace('_', ' ')} {v:.3f}" if isinstance(v, float) else f"{v} {k}" for k, v in d.items())

    text = (table.to_markdown(floatfmt=".3f") + "\n\nEntities' mean disparity, all clips: " + summary(entities)
            + "\n\nEntities' mean disparity error by shape (after each clip's fit):\n\n"
            + by_shape.to_markdown(floatfmt=".3f")
            + f"\n\nδ1 (depth space, {table.delta1_depth.mean():.3f} as predicted) with a shape's mean error taken "
            "off its entities, measured on all clips or on the other clips only:\n\n"
            + bias_cost.to_markdown(floatfmt=".3f"))
    compared = compare(p, args.predictions, args.compare, args.prefix) if args.compare else None
    if compared:
        text += f"\n\nAgainst {args.compare}: " + summary(compared)
    print(text)
    if args.out:
        report = {"predictions": str(args.predictions), "clips": table.to_dict(orient="index"),
                  **({"through_vae": str(args.through_vae)} if args.through_vae else {}),
                  "mean": table.mean().to_dict(), "entities": entities,
                  "by_shape": by_shape.to_dict(orient="index"), "shape_bias_cost": bias_cost.to_dict(orient="index")}
        if compared:
            report |= {"compared_with": str(args.compare), "compared": compared}
        write_text(args.out, json.dumps(report, indent=1) + "\n")
        write_text(args.out.with_suffix(".md"), text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
