"""Figures of a ``small`` GPU run (``benchmarks/small_gpu.py``), from its unpacked tarballs.

    python benchmarks/small_gpu_figures.py RUN_DIR OUT_DIR [--gallery-rows 4] [--gallery-variant NAME]

Writes, beside the per-variant plots the stages already make:
- ``fig8_validation.png``: the Fig 8 validation scores of every variant over training steps
  (segmentation mIoU and depth δ1 in depth space, of held-out real clips against exact ground truth);
- ``fig8_gpu_time.png``: the same scores over training seconds (each run's training wall time,
  validations included, spread evenly over its steps), with any ``--compare LABEL=JSONL@SECONDS``
  curves of earlier runs (a committed ``train_steps.jsonl`` and its training seconds): variants of
  unequal cost per step (the ``token-size`` table) compared at equal GPU time;
- ``train_loss.png``: the dense and RGB halves' losses of every variant;
- ``gallery.gif``: the first rows of a variant's text-to-video gallery (the full method's unless
  ``--gallery-variant`` names another), segmentation beside depth (each row: generated video |
  colormap | decoded map), for the README;
- ``caption_following.json``: whether that gallery's generated videos show their caption's sky and
  ground colour (``udpdiff.evaluation.scene_following``, read from the gallery's frames: runs whose
  sample stage predates that score in the evaluate stage);
- ``text_to_video_variants.png``: the same first ``--gallery-rows`` prompts and seeds as every variant with a
  gallery generated them (the Tab 1/2 comparison), frames 0, 8 and 16 of each, side by side;
- ``real_clips.gif``: that variant's dense prediction of its first ``--real-clips`` held-out clips (the
  RGB half given) beside their exact ground truth, re-rendered from the clips' seeds. Each row: the clip |
  its entities | the predicted ones (each matched to an entity as the evaluation matches them, in that
  entity's colour; unmatched ones in others) | its disparity | the prediction after the evaluation's
  scale-and-shift fit, with the clip's mIoU and δ1 (depth space) from ``per_video.csv``: the picture of
  the scores issue 12 is about.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageSequence

from udpdiff import viz
from udpdiff.evaluation.scene_following import scene_following
from udpdiff.evaluation.segmentation import hungarian_miou
from udpdiff.evaluation.validation_curves import VALIDATION_SCORES, plot_validation_scores
from udpdiff.io.atomic import atomic_path, write_text
from udpdiff.io.video import write_gif

FULL_METHOD = "udpdiff-multi-task"


def series(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curves(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if key in r]
    return [s for s, _ in points], [v for _, v in points]


def seconds_axis(rows: list[dict], key: str, seconds: float) -> tuple[list[float], list[float]]:
    """``curves`` over training seconds: step ``s`` of a run whose training took ``seconds`` for its
    last logged step is put at ``s / last * seconds`` (validations spread evenly over the steps)."""
    steps, values = curves(rows, key)
    last = max(r["step"] for r in rows)
    return [s / last * seconds for s in steps], values


def compared_run(spec: str) -> tuple[str, list[dict], float]:
    """``LABEL=PATH@SECONDS`` (``--compare``): an earlier run's ``train_steps.jsonl`` and its training seconds."""
    label, sep, rest = spec.partition("=")
    path, sep2, seconds = rest.rpartition("@")
    if not (sep and sep2 and label and path):
        raise SystemExit(f"--compare {spec!r}: expected LABEL=PATH/train_steps.jsonl@SECONDS")
    try:
        return label, series(Path(path)), float(seconds)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--compare {spec!r}: {e}") from e


def matched_ids(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """``pred``'s entity ids renamed to the ground-truth ids they match (Hungarian on the video-volume
    IoU, as the evaluation scores them), so a picture gives a matched pair one colour; unmatched
    predicted entities get ids past the truth's."""
    lut = np.zeros(int(pred.max(initial=0)) + 1, np.int64)
    matches = {p: g for p, g, _ in hungarian_miou(pred, gt)["matches"]}
    spare = int(gt.max(initial=0)) + 1
    for p in np.unique(pred[pred > 0]).tolist():
        lut[p] = matches.get(p, spare)
        spare += p not in matches
    return lut[pred]


def real_clips_picture(variant: Path, rows: int) -> np.ndarray:
    """``real_clips.gif``'s frames for one variant's run (see the module's docstring)."""
    import pandas as pd
    import small_gpu
    from small_depth_errors import aligned
    from small_vae_ceiling import exact_clip

    info = json.loads((variant / "outputs/small/gpu_run/variant.json").read_text())
    p = small_gpu.load(info.get("profile_overrides", []))
    scores = pd.read_csv(variant / "outputs/small/evaluation/per_video.csv").set_index(["set", "clip_id"])
    out = []
    with np.load(variant / "outputs/small/metrics/dense_predictions.npz") as z:
        clips = [k.split("/", 1)[1] for k in z.files if k.startswith("segmentation/")]
        clips = [c for c in clips if f"depth/{c}" in z.files][:rows]
        if not clips:
            raise SystemExit(f"{variant}: no clip has both segmentation and depth predictions")
        for clip_id in clips:
            seg, depth = z[f"segmentation/{clip_id}"], z[f"depth/{clip_id}"]
            exact = exact_clip(p, clip_id)
            t = min(len(seg), len(depth))
            gt_ids, gt = exact["ids"][:t], exact["depth"][:t]
            fitted = aligned(depth[:t], exact)  # the evaluation's one scale-and-shift fit per clip
            seen = gt[gt > 0]  # shown over the clip's own range (not the sky's 0), so the ground's ramp shows
            lo, hi = (float(seen.min()), float(seen.max())) if seen.size else (0.0, 1.0)
            gt_shown, fitted_shown = (np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0) for x in (gt, fitted))
            miou = scores.loc[("segmentation", clip_id), "gt_miou"]
            delta1 = scores.loc[("depth", clip_id), "gt_delta1_depth"]
            out.append(viz.side_by_side(
                exact["frames"][:t], gt_ids, matched_ids(seg[:t], gt_ids), gt_shown, fitted_shown,
                labels=[clip_id, "entities", f"predicted: mIoU {miou:.2f}", "disparity",
                        f"predicted: delta1 {delta1:.2f}"]))  # the label font has no Greek
    return np.concatenate(out, axis=1)


def _gallery(path: Path) -> tuple[np.ndarray, int, int]:
    """A sample-stage gallery's frames, its label band's height and its row height (``viz.side_by_side``:
    a band of 14-32 px above samples stacked at ``viz.MIN_DISPLAY_HEIGHT`` px each for small clips)."""
    with Image.open(path) as im:
        frames = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
    row = viz.MIN_DISPLAY_HEIGHT
    return frames, frames.shape[1] - (frames.shape[1] - 14) // row * row, row


def gallery_rows(path: Path, rows: int) -> np.ndarray:
    """The label band and first ``rows`` samples of a sample-stage gallery."""
    frames, band, row = _gallery(path)
    return frames[:, : band + rows * row]


def gallery_caption_following(samples: Path) -> dict[str, dict[str, float]]:
    """Per task gallery in ``samples``: the fraction of its generated videos (the first column; square
    clips) that show the sky and the ground colour their prompt (``index.json``) names."""
    index = json.loads((samples / "index.json").read_text())
    out = {}
    for gif in sorted(samples.glob("gallery_*.gif")):
        task = gif.stem.removeprefix("gallery_")
        frames, band, row = _gallery(gif)
        n = (frames.shape[1] - band) // row
        videos = [frames[:, band + i * row: band + (i + 1) * row, :row] for i in range(n)]
        prompts = [e["prompt"] for e in index if e["task"] == task][:n]
        scores = scene_following(videos, prompts)
        out[task] = {"videos": n, **{k: float(np.nanmean(v)) for k, v in scores.items()}}
    return out


def generated_by_variant(run: Path, rows: int, frames: tuple[int, ...] = (0, 8, 16)) -> np.ndarray | None:
    """``text_to_video_variants.png``: the same prompts and seeds generated by every variant that has a
    gallery, side by side. A row per prompt; per variant and task gallery (the multi-task has two), the
    generated video (its first column) at ``frames``. ``None`` when fewer than two galleries exist."""
    columns, labels = [], []
    for gif in sorted((run / "variants").glob("*/outputs/small/samples/gallery_*.gif")):
        video, band, row = _gallery(gif)
        n = min(rows, (video.shape[1] - band) // row)
        shown = [t for t in frames if t < len(video)]
        stacked = np.concatenate([video[shown, band + i * row: band + (i + 1) * row, :row] for i in range(n)], axis=1)
        columns.append(np.concatenate(list(stacked), axis=1)[None])  # (1, n*row, len(shown)*row, 3)
        variant, task = gif.parents[3].name, gif.stem.removeprefix("gallery_")
        labels.append(f"{variant} ({task}): frames {', '.join(map(str, shown))}")
    if len(columns) < 2 or len({c.shape[1] for c in columns}) > 1:
        return None
    return viz.side_by_side(*columns, labels=labels, height=columns[0].shape[1])[0]


def _trained_by_another(workspace: Path) -> bool:
    info = workspace / "outputs/small/gpu_run/variant.json"
    return info.exists() and json.loads(info.read_text()).get("trained_by", workspace.name) != workspace.name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="the unpacked tarball(s): holds variants/<name>/")
    ap.add_argument("out", type=Path)
    ap.add_argument("--gallery-rows", type=int, default=4)
    ap.add_argument("--gallery-variant", default=FULL_METHOD,
                    help="whose text-to-video gallery and real_clips.gif (default: %(default)s)")
    ap.add_argument("--real-clips", type=int, default=4, help="rows of real_clips.gif (0: none)")
    ap.add_argument("--compare", action="append", default=[], metavar="LABEL=JSONL@SECONDS",
                    help="an earlier run's train_steps.jsonl and training seconds, added to fig8_gpu_time.png")
    args = ap.parse_args(argv)
    # a variant that only resampled another's model (variant.json "trained_by") has that run's curves
    variants = {d.name: series(d / "outputs/small/gpu_run/train_steps.jsonl")
                for d in sorted((args.run / "variants").iterdir())
                if (d / "outputs/small/gpu_run").is_dir() and not _trained_by_another(d)}
    if not variants:
        raise SystemExit(f"{args.run}: no variants/<name>/outputs/small/gpu_run/train_steps.jsonl")
    args.out.mkdir(parents=True, exist_ok=True)
    histories = {name: pd.DataFrame(rows) for name, rows in variants.items()}
    plot_validation_scores(args.out / "fig8_validation.png", histories)
    trained = {name: args.run / "variants" / name / "outputs/small/gpu_run/train.done.json" for name in variants}
    timed = [(name, rows, json.loads(trained[name].read_text())["seconds"])
             for name, rows in variants.items() if trained[name].exists()]
    timed += [compared_run(spec) for spec in args.compare]
    by_time = {f"{name}: {label}": c for name, rows, seconds in timed
               for key, label in VALIDATION_SCORES.items() if (c := seconds_axis(rows, key, seconds))[0]}
    if by_time:
        viz.plot_curves(args.out / "fig8_gpu_time.png", by_time, xlabel="training seconds (validations included)",
                        title="Fig 8 at equal GPU time: held-out real clips", ylabel="score (higher is better)")
    losses = {f"{name}: {key}": c for name, rows in variants.items()
              for key in ("loss_dense", "loss_rgb") if (c := curves(rows, key))[0]}
    viz.plot_curves(args.out / "train_loss.png", losses, title="training loss (v-prediction MSE)", ylabel="loss",
                    logy=True)
    samples = args.run / "variants" / args.gallery_variant / "outputs/small/samples"
    seg, depth = samples / "gallery_segmentation.gif", samples / "gallery_depth.gif"
    if seg.exists() and depth.exists():
        a, b = gallery_rows(seg, args.gallery_rows), gallery_rows(depth, args.gallery_rows)
        gap = np.full((a.shape[0], a.shape[1], 8, 3), 255, np.uint8)
        write_gif(args.out / "gallery.gif", np.concatenate([a, gap, b], axis=2), fps=8)
        following = gallery_caption_following(samples)
        write_text(args.out / "caption_following.json", json.dumps(following, indent=1) + "\n")
        print(f"caption following of {args.gallery_variant}'s gallery: {following}")
    elif args.gallery_variant != FULL_METHOD:  # asked for by name: say so rather than skip it
        raise SystemExit(f"{samples}: no gallery_segmentation.gif and gallery_depth.gif")
    if (still := generated_by_variant(args.run, args.gallery_rows)) is not None:
        with atomic_path(args.out / "text_to_video_variants.png") as tmp:
            # the galleries are GIFs, 256 colours a frame already: a palette PNG is half the bytes
            Image.fromarray(still).quantize(256, dither=Image.Dither.NONE).save(tmp, format="png", optimize=True)
    variant = args.run / "variants" / args.gallery_variant
    if args.real_clips > 0 and (variant / "outputs/small/metrics/dense_predictions.npz").exists():
        write_gif(args.out / "real_clips.gif", real_clips_picture(variant, args.real_clips), fps=8)
    print(f"figures of {', '.join(variants)} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
