"""The `train` stage: the 32-channel transformer under DeepSpeed ZeRO."""

from __future__ import annotations

import functools
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from udpdiff import viz
from udpdiff.data.synthetic import exact_depth_range
from udpdiff.io.atomic import atomic_path
from udpdiff.io.dense import load_depth, load_ids
from udpdiff.io.manifest import read_manifest, resolve
from udpdiff.latents import EMPTY_PROMPT_FILE, load_record, record_path
from udpdiff.stage_code import stage_code_digests
from udpdiff.stages.common import (
    RGB_ONLY,
    LogFn,
    StepResult,
    dense_picture,
    fresh_tmp_dir,
    read_clip,
    replace_dir,
    sample_seed,
)
from udpdiff.stages.loading import clip_inputs, load_text_encoder, load_vae

if TYPE_CHECKING:
    from udpdiff.config import Params
    from udpdiff.paths import ProjectPaths

logger = logging.getLogger(__name__)


def run(p: Params, paths: ProjectPaths, log_fn: LogFn | None = None,
        artifact_fn: Callable[[Path, str], None] | None = None,
        max_steps_this_run: int | None = None) -> StepResult:
    """Train the transformer (one process, or every rank of a launcher: rank 0 writes outputs)."""
    from udpdiff.models.scheduler import build_scheduler
    from udpdiff.pipeline import UDPDiffPipeline
    from udpdiff.train import rank_and_world, resolve_config_path, summary, train, train_device, write_history

    t = p.active.train
    df = read_manifest(paths.manifest)
    vae = load_vae(p, paths)
    scheduler = build_scheduler(p.active.scheduler.model_dump(), p.active.transformer.pretrained)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    train_rows = df[df.split == "train"]
    latents, text_fn = paths.latents, None
    max_length = p.active.text_encoder.max_length  # online encoding's; read either way (dvc.yaml lists it)
    if t.latents == "online":
        from udpdiff.latents import OnlineLatentDataset
        from udpdiff.models.text import encode_text

        tokenizer, encoder = load_text_encoder(p, paths)
        vae, encoder = vae.to(train_device()), encoder.to(train_device())

        def text_fn(prompts: list[str]) -> torch.Tensor:
            return encode_text(tokenizer, encoder, prompts, max_length, device=encoder.device)

        latents = OnlineLatentDataset(lambda i: clip_inputs(p, paths, train_rows.iloc[i]), len(train_rows), vae,
                                      text_fn, t.tasks, text_prompt_tasks=t.task_conditioning == "text-prompt")
    data_digest = _data_digest(paths, online=t.latents == "online")
    preview = None
    if t.sample_every:
        empty = load_record(paths.latents / EMPTY_PROMPT_FILE)["text:empty"]
        rows = df[df.split == p.active.sample.split]
        rows = rows if not rows.empty else df
        prompts = _prompt_embeddings(p, paths, rows.iloc[0], text_fn)
        validation = [_validation_clip(p, paths, row, text_fn) for row in rows.head(t.validation_clips).itertuples()]
        losses_fn = functools.partial(_fixed_draw_losses, p, _loss_clip_sets(p, paths, df, vae, text_fn),
                                      float(vae.config.scaling_factor), scheduler.alphas_cumprod, vae_scale)
        preview = functools.partial(_training_preview, p, vae, scheduler, prompts, empty, validation, losses_fn,
                                    log_fn)
    transformer, result = train(p, latents, train_rows.clip_id.tolist(), paths.checkpoints,
                                scaling_factor=float(vae.config.scaling_factor), vae_scale_spatial=vae_scale,
                                scheduler=scheduler, log_fn=log_fn, max_steps_this_run=max_steps_this_run,
                                ds_config=resolve_config_path(t.deepspeed_config, paths.root),
                                preview_fn=preview, artifact_fn=artifact_fn, data_digest=data_digest,
                                code=stage_code_digests("train"))
    if rank_and_world()[0] != 0:
        return StepResult()
    # the run's preview grids (kept with its checkpoints, so a resumed run still has the early ones)
    grids = paths.outputs / "train_samples"
    tmp = fresh_tmp_dir(grids)
    for gif in sorted((result.run_dir / "train_samples").glob("step-*.gif")):
        shutil.copy2(gif, tmp / gif.name)
    replace_dir(tmp, grids)
    artifacts = _validation_history(result.run_dir / "train_samples" / VALIDATION_LOG, paths.metrics)
    history_csv = paths.metrics / "train_history.csv"
    write_history(result.history, history_csv)
    artifacts.append(history_csv)
    steps = [h["step"] for h in result.history]
    curves = {k: (steps, [h[k] for h in result.history]) for k in ("loss", "loss_rgb", "loss_dense")
              if all(k in h for h in result.history)}
    artifacts.append(viz.plot_curves(paths.metrics / "train_loss.png", curves, title="UDPDiff training loss",
                                     ylabel="v-prediction MSE", logy=True))
    metrics = summary(result.history) if result.history else {}
    metrics.update(steps_done=float(result.steps_done), resumed_from_step=float(result.resumed_from),
                   resumed_across_code_change=float(bool(result.code_changed)))
    if result.steps_done >= t.steps:
        tokenizer, encoder = load_text_encoder(p, paths)
        pipe = UDPDiffPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer.eval(),
                               scheduler=scheduler, task_conditioning=t.task_conditioning, given_rgb=given_rgb(p))
        tmp = fresh_tmp_dir(paths.pipeline)
        pipe.save_pretrained(tmp)
        replace_dir(tmp, paths.pipeline)
        if artifact_fn is not None and t.log_checkpoints == "artifacts":
            artifact_fn(paths.pipeline / "transformer", "model/transformer")  # the diffusers export
    return StepResult(metrics=metrics, artifacts=artifacts, info={"checkpoint": str(result.checkpoint)})


def given_rgb(p: Params) -> str:
    """How the trained pipeline takes a given video's RGB half: as training saw it."""
    return "clean" if p.active.train.rgb_given_prob > 0 else "noised"


def _data_digest(paths: ProjectPaths, online: bool) -> str:
    """What the run trains on, for its checkpoints' fingerprint: the latent cache's digest, or with
    online encoding the manifest and the VAE's and text encoder's weight files it encodes with."""
    from udpdiff.latents import cache_digest, files_digest

    if not online:
        return cache_digest(paths.latents)
    return files_digest([paths.manifest, *sorted(paths.vae.glob("*.safetensors")),
                         *sorted(paths.text_encoder.glob("*.safetensors"))])


def _prompt_embeddings(p: Params, paths: ProjectPaths, row, text_fn) -> dict[str, torch.Tensor]:
    """One clip's long-caption embedding per trained task (task-named for the text-prompt ablation),
    keyed as the latent cache keys them. Read from that cache, so no text encoder is loaded during
    training; ``text_fn`` encodes them when training encodes online and there is no cache."""
    from udpdiff.tasks import task_prompt

    t = p.active.train
    if text_fn is None:
        rec = load_record(record_path(paths.latents, row.clip_id))
    else:
        prompts = {"text:long": row.caption_long, **{f"text:long:{k}": task_prompt(k, row.caption_long)
                                                     for k in t.tasks}}
        with torch.no_grad():
            rec = dict(zip(prompts, text_fn(list(prompts.values())).cpu(), strict=True))
    keys = [f"text:long:{k}" if t.task_conditioning == "text-prompt" else "text:long" for k in t.tasks or [None]]
    return {k: rec[k] for k in keys}


def _validation_clip(p: Params, paths: ProjectPaths, row, text_fn) -> dict:
    """A validation clip for the scores during training (Fig 8): its frames, its ground truth per
    trained task, its caption (what its text-to-video sample should show) and its prompt embeddings,
    read once."""
    n = p.active.data.num_frames
    gt = {}
    if "depth" in p.active.train.tasks:
        gt["depth"] = load_depth(resolve(paths.manifest, row.depth_path))[:n]
    if "segmentation" in p.active.train.tasks:
        gt["segmentation"] = load_ids(resolve(paths.manifest, row.seg_path))[:n]
    return {"clip_id": row.clip_id, "video": read_clip(p, paths, row.video_path), "gt": gt,
            "caption": row.caption_long, "prompts": _prompt_embeddings(p, paths, row, text_fn)}


def _loss_clip_sets(p: Params, paths: ProjectPaths, df: pd.DataFrame, vae, text_fn) -> dict[str, object]:
    """The clips whose loss at fixed draws is followed during training: the first ``train.validation_clips``
    held-out (validation split) clips and as many of the first training clips; from the latent cache,
    or encoded when a batch needs them (``train.latents: online``)."""
    from udpdiff.latents import LatentDataset, OnlineLatentDataset

    t = p.active.train
    held_out = df[df.split == "val"].head(t.validation_clips)
    sets = {"held_out": held_out, "train_clips": df[df.split == "train"].head(max(len(held_out), 1))}
    if t.latents == "cached":
        return {name: LatentDataset(paths.latents, rows.clip_id.tolist()) for name, rows in sets.items() if len(rows)}
    return {name: OnlineLatentDataset(lambda i, rows=rows: clip_inputs(p, paths, rows.iloc[i]), len(rows), vae,
                                      text_fn, t.tasks, text_prompt_tasks=t.task_conditioning == "text-prompt")
            for name, rows in sets.items() if len(rows)}


def _fixed_draw_losses(p: Params, clip_sets: dict[str, object], scaling_factor: float, alphas_cumprod: torch.Tensor,
                       vae_scale: int, module: torch.nn.Module) -> dict[str, float]:
    """``val/loss/held_out``, ``val/loss/train_clips`` (and ``val/loss_dense/...``): the training loss
    of each clip set at fixed draws (:func:`udpdiff.train.fixed_draw_loss`)."""
    from udpdiff.train import fixed_draw_loss

    out = {}
    for name, data in clip_sets.items():
        for key, value in fixed_draw_loss(module, data, p, scaling_factor, alphas_cumprod, vae_scale).items():
            out[f"val/{key}/{name}"] = value
    return out


VALIDATION_LOG = "validation.jsonl"  # beside the preview grids in the run's checkpoint folder


def validation_scores(task: str | None, generated: Sequence[np.ndarray],
                      predictions: list[tuple[np.ndarray, np.ndarray]],
                      depth_range: tuple[float, float] | None = None,
                      captions: Sequence[str] | None = None) -> dict[str, float]:
    """Scores needing no metric weights (paper Fig 8): the generated videos' mean motion smoothness
    (the flow prior, MS†) and pixel consistency; with the ``captions`` they were generated from, the
    share that show the captioned sky and ground (synthetic captions; others are skipped, as the
    evaluate stage skips them); and the dense prediction *of* real clips against their ground truth
    (depth δ1 / AbsRel / RMSE after scale-and-shift in disparity, and in depth space where
    ``depth_range`` makes depth exact; segmentation mIoU)."""
    from udpdiff.evaluation.consistency import pixel_frame_consistency
    from udpdiff.evaluation.depth import depth_scores
    from udpdiff.evaluation.motion import motion_smoothness_flow
    from udpdiff.evaluation.scene_following import scene_following
    from udpdiff.evaluation.segmentation import hungarian_miou

    name = task or RGB_ONLY
    out = {f"val/{name}/motion_smoothness_flow": float(np.mean([motion_smoothness_flow(v) for v in generated])),
           f"val/{name}/pixel_frame_consistency": float(np.mean([pixel_frame_consistency(v) for v in generated]))}
    for key, values in (scene_following(generated, captions) if captions is not None else {}).items():
        named = [v for v in values if np.isfinite(v)]
        if named:
            out[f"val/{name}/{key}"] = float(np.mean(named))
    rows = []
    for pred, gt in predictions:
        if task == "depth":
            rows.append({f"gt_{k}": v for k, v in depth_scores(pred, gt, depth_range=depth_range).items()})
        elif task == "segmentation":
            rows.append({"gt_miou": float(hungarian_miou(pred, gt)["miou"])})
    for key in dict.fromkeys(k for r in rows for k in r):
        values = [r[key] for r in rows if np.isfinite(r[key])]
        if values:
            out[f"val/{name}/{key}"] = float(np.mean(values))
    return out


def _training_preview(p: Params, vae, scheduler, prompts: dict[str, torch.Tensor], empty: torch.Tensor,
                      validation: list[dict], losses_fn: Callable[[torch.nn.Module], dict[str, float]],
                      log_fn: LogFn | None, module: torch.nn.Module, step: int, path: Path) -> Path | None:
    """A sample grid of the model being trained: one prompt per task, rows of generated video |
    colormap | decoded; the validation scores (Fig 8) of that video (or of ``train.validation_videos``
    text-to-video samples of ``validation``'s captions) and of the dense prediction of
    ``validation``'s real clips; and ``losses_fn``'s losses of held-out and training clips, all
    logged as metric series and kept beside the grids. Runs on every rank (ZeRO-3 forwards are
    collective); rank 0 writes and logs, and returns the gif."""
    from udpdiff.pipeline import UDPDiffPipeline
    from udpdiff.train import rank_and_world

    t, d, s = p.active.train, p.active.data, p.active.sample
    device = next(module.parameters()).device
    dtype = next(module.parameters()).dtype
    home = vae.device  # the VAE goes back there (online encoding keeps it on the GPU)
    pipe = UDPDiffPipeline(tokenizer=None, text_encoder=None, vae=vae.to(device), transformer=module,
                           scheduler=scheduler, task_conditioning=t.task_conditioning, given_rgb=given_rgb(p))
    pipe.set_progress_bar_config(disable=True)
    columns: list[list[np.ndarray]] = [[], [], []]
    scores: dict[str, float] = losses_fn(module)
    call = dict(num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                segmentation_tolerance=p.active.pixelplanes.decode_tolerance)

    def negative(n: int) -> torch.Tensor:
        return empty[None].expand(n, -1, -1).to(device, dtype)

    clip_indices = range(len(validation))  # each clip's index in sample.split, whose seed it draws from
    scored = validation[:t.validation_videos]  # the clips whose captions Fig 8's video scores are of

    for task in t.tasks or [None]:  # None: the RGB-only baseline, video alone
        key = f"text:long:{task}" if t.task_conditioning == "text-prompt" else "text:long"
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if scored:
                # the sample stage's text-to-video draws of these clips, batched as the dense pass is; the
                # grid shows the first, the grid's own caption (the split's first clip) and seed (p.seed)
                out = pipe(None, task=task, num_frames=d.num_frames, height=d.height, width=d.width,
                           prompt_embeds=torch.stack([clip["prompts"][key] for clip in scored]).to(device, dtype),
                           negative_prompt_embeds=negative(len(scored)),
                           generator=[torch.Generator().manual_seed(sample_seed(p, i)) for i in range(len(scored))],
                           **call)
            else:
                out = pipe(None, task=task, prompt_embeds=prompts[key][None].to(device, dtype),
                           negative_prompt_embeds=negative(1), num_frames=d.num_frames, height=d.height,
                           width=d.width, generator=torch.Generator(device).manual_seed(p.seed), **call)
            generated = list(out.videos)
            predictions = []
            if task is not None and validation:
                # every validation clip in one batched pass: one 50-step sampler per clip made a
                # preview of the small GPU run cost as much as ~100 training steps. Each clip draws from
                # the sample stage's seed for it, so the last validation scores the evaluation's draws
                # (one draw for the batch read 0.02-0.05 below its one sample in five small GPU runs)
                cond = pipe(None, task=task, video=np.stack([clip["video"] for clip in validation]),
                            prompt_embeds=torch.stack([clip["prompts"][key] for clip in validation]).to(device, dtype),
                            negative_prompt_embeds=negative(len(validation)),
                            generator=[torch.Generator().manual_seed(sample_seed(p, i)) for i in clip_indices],
                            **call | {"guidance_scale": s.guidance_for_real_clips()})
                predictions = [(dense, clip["gt"][task]) for dense, clip in zip(cond.dense, validation, strict=True)]
        scores.update(validation_scores(task, generated, predictions, exact_depth_range(d.source),
                                        captions=[clip["caption"] for clip in scored] if scored else None))
        columns[0].append(out.videos[0])
        if task is not None:
            columns[1].append(out.colormaps[0])
            columns[2].append(dense_picture(task, out.dense[0]))
    vae.to(home)
    if rank_and_world()[0] != 0:
        return None
    if log_fn is not None:
        log_fn(scores, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / VALIDATION_LOG, "a") as f:  # appended: a resumed run keeps the earlier steps
        f.write(json.dumps({"step": step, **scores}, sort_keys=True) + "\n")
    viz.write_side_by_side(path, [np.concatenate(c, axis=1) for c in columns if c],
                           labels=[f"step {step}: {' / '.join(t.tasks or ['RGB only'])}", "colormap", "decoded"][
                               :sum(bool(c) for c in columns)], fps=d.fps,
                           height=max(len(t.tasks), 1) * max(d.height, viz.MIN_DISPLAY_HEIGHT))
    return path


# -- sampling, evaluation, report ---------------------------------------------------------------------


def _validation_history(log: Path, out_dir: Path) -> list[Path]:
    """The validation scores over training steps (paper Fig 8) as a CSV (DVC plots) and a picture."""
    if not log.exists():
        return []
    by_step = {}
    for line in log.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_step[row["step"]] = row  # a step redone after a resume: the last word counts
    frame = pd.DataFrame([by_step[s] for s in sorted(by_step)])
    csv = out_dir / "validation_history.csv"
    with atomic_path(csv) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    steps = frame["step"].tolist()
    losses = [c for c in frame.columns if c.startswith(("val/loss/", "val/loss_dense/"))]
    curves = {c.removeprefix("val/"): (steps, frame[c].tolist()) for c in frame.columns
              if c != "step" and c not in losses and not c.endswith("rmse") and not c.endswith("abs_rel")}
    png = viz.plot_curves(out_dir / "validation_scores.png", curves, title="validation scores during training (Fig 8)",
                          ylabel="score (higher is better)")
    # a held-out loss rising or flat while the training clips' falls: memorisation
    loss_png = viz.plot_curves(out_dir / "validation_loss.png",
                               {c.removeprefix("val/"): (steps, frame[c].tolist()) for c in losses},
                               title="loss at fixed draws: held-out vs training clips", ylabel="v-prediction MSE",
                               logy=True)
    return [csv, png, loss_png]
