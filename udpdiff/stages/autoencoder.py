"""The `autoencoder` stage: the 3D VAE for RGB and colormaps (trained for tiny, checked when pretrained)."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from udpdiff import pixelplanes, viz
from udpdiff.acceleration import compiled_while_training, wants_compile
from udpdiff.data.synthetic import exact_depth_range
from udpdiff.devices import default_device
from udpdiff.io.dense import load_depth, load_ids
from udpdiff.io.manifest import read_manifest, resolve
from udpdiff.stages.common import (
    LogFn,
    StepResult,
    fresh_tmp_dir,
    load_colormap,
    load_palette,
    read_clip,
    replace_dir,
    write_json,
)
from udpdiff.workers import read_ahead

if TYPE_CHECKING:
    from udpdiff.config import Params
    from udpdiff.paths import ProjectPaths

logger = logging.getLogger(__name__)


VAE_CHECK_CLIPS = 8  # validation clips for the VAE's reconstruction PSNR and dense scores after it


def _video_and_colormaps(p: Params, paths: ProjectPaths, row: tuple[str, str]) -> dict[str, np.ndarray]:
    """One clip's frames and its colormap per trained task (a worker process's read)."""
    video_path, clip_id = row
    t = p.active.data.num_frames
    return {"rgb": read_clip(p, paths, video_path),
            **{task: load_colormap(paths, task, clip_id)[:t] for task in p.active.train.tasks}}


def _dense_after_vae(p: Params, paths: ProjectPaths, rows: pd.DataFrame, rec: dict[str, list[np.ndarray]]
                     ) -> dict[str, float]:
    """The validation clips' exact dense maps, encoded and decoded by the VAE, then scored as the
    evaluate stage scores a prediction (palette-free Pixelplanes decoding): the best score a dense
    prediction through this VAE can reach, whatever the transformer learns."""
    from udpdiff.evaluation.ground_truth import ground_truth_scores

    tolerance, depth_range = p.active.pixelplanes.decode_tolerance, exact_depth_range(p.active.data.source)
    scores: dict[str, list[float]] = {}
    for i, r in enumerate(rows.itertuples()):
        row: dict[str, float] = {}
        if "segmentation" in rec:
            gt_ids = load_ids(resolve(paths.manifest, r.seg_path))[:len(rec["segmentation"][i])]
            palette = load_palette(paths, r.clip_id)
            with_palette = pixelplanes.decode_segmentation(rec["segmentation"][i], palette=palette, tolerance=tolerance)
            row["seg_pixel_acc"] = float((with_palette == gt_ids).mean())
            blind = pixelplanes.decode_segmentation(rec["segmentation"][i], tolerance=tolerance)
            row.update(ground_truth_scores("segmentation", blind, r, paths.manifest))
        if "depth" in rec:
            decoded = pixelplanes.decode_depth(rec["depth"][i])
            gt_depth = load_depth(resolve(paths.manifest, r.depth_path))[:len(decoded)]
            row["depth_mae"] = float(np.abs(decoded - gt_depth).mean())
            row.update(ground_truth_scores("depth", decoded, r, paths.manifest, depth_range=depth_range))
        for k, v in row.items():
            scores.setdefault(f"{k}_after_vae", []).append(v)
    return {k: float(np.nanmean(v)) for k, v in scores.items()}


def run(p: Params, paths: ProjectPaths, log_fn: LogFn | None = None) -> StepResult:
    """Fit the tiny VAE on RGB clips and both colormaps (a pretrained VAE is only checked)."""
    from udpdiff.models.vae import (
        build_vae,
        calibrate_scaling_factor,
        psnr,
        reconstruct,
        train_vae,
    )

    spec = p.active.vae
    df = read_manifest(paths.manifest)
    tasks = p.active.train.tasks
    train_df, val_df = df[df.split == "train"], df[df.split == "val"]
    if val_df.empty:
        val_df = train_df.iloc[:1]
    # a pretrained VAE is only checked: a few validation clips, never the (large) training split
    val_df = val_df.head(VAE_CHECK_CLIPS)
    if spec.pretrained:
        train_df = train_df.iloc[:0]

    def kinds(rows: pd.DataFrame) -> dict[str, list[np.ndarray]]:
        # video and colormaps read together, ahead, on worker processes: read one after another
        # they took a third of this stage on a 32-core GPU machine (small-h200x2-attempt2.md)
        clips = list(read_ahead(functools.partial(_video_and_colormaps, p, paths),
                                list(zip(rows.video_path, rows.clip_id, strict=True))))
        return {kind: [c[kind] for c in clips] for kind in ["rgb", *tasks]}

    train_videos, val_videos = kinds(train_df), kinds(val_df)
    vae = build_vae(spec.model_dump(), p.seed).to(default_device())
    history = []
    if not spec.pretrained:
        # compiled for the training loop only: the calls after it are gradient-free and of other shapes
        with compiled_while_training([vae.encoder, vae.decoder],
                                     enabled=wants_compile(p.active.acceleration.compile_vae, vae.device)) as compiled:
            history = train_vae(vae, [v for vs in train_videos.values() for v in vs], steps=spec.train.steps,
                                batch_size=spec.train.batch_size, lr=spec.train.lr, kl_weight=spec.train.kl_weight,
                                seed=p.seed, log_fn=log_fn, crop=spec.train.crop)
        calibrate_scaling_factor(vae, train_videos["rgb"])
        logger.info("trained the VAE for %d steps (%s)", len(history), "compiled" if compiled else "eager")
    rec = {k: [reconstruct(vae, v) for v in vs] for k, vs in val_videos.items()}
    metrics = {f"psnr_{k}": float(np.mean([psnr(r, v) for r, v in zip(rec[k], vs, strict=True)]))
               for k, vs in val_videos.items()}
    metrics["scaling_factor"] = float(vae.config.scaling_factor)
    # what the VAE does to the dense maps, measured where it matters: after Pixelplanes decoding
    metrics.update(_dense_after_vae(p, paths, val_df, rec))
    rec = {k: v[0] for k, v in rec.items()}
    tmp = fresh_tmp_dir(paths.vae)
    vae.save_pretrained(tmp)
    if spec.pretrained:
        write_json(tmp / "SOURCE.json", {"pretrained": spec.pretrained})
    replace_dir(tmp, paths.vae)
    curve = {"vae_loss": (np.arange(1, len(history) + 1), [h["vae_loss"] for h in history])} if history else {}
    artifacts = [viz.plot_curves(paths.metrics / "vae_loss.png", curve, ylabel="L1 + MSE + KL", logy=bool(history),
                                 title="VAE training loss" if history else
                                 f"pretrained VAE ({spec.pretrained}): not trained")]
    preview = paths.outputs / "previews" / "vae_reconstruction.mp4"
    viz.write_side_by_side(preview, [val_videos[k][0] for k in rec] + [rec[k] for k in rec],
                           labels=[f"{k}" for k in rec] + [f"{k} (VAE)" for k in rec], fps=p.active.data.fps)
    artifacts.append(preview)
    return StepResult(metrics=metrics, artifacts=artifacts)
