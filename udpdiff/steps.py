"""One function per pipeline stage: read the previous stage's outputs, compute, write this
stage's outputs, return ``StepResult`` (metrics, params, artifact paths) for the caller to log.

The Prefect flows in ``flows/`` call these and log the results to MLflow; nothing here knows
about Prefect, DVC or MLflow.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from udpdiff import pixelplanes, viz
from udpdiff.config import Params
from udpdiff.io.atomic import write_text
from udpdiff.io.dense import load_depth, load_ids
from udpdiff.io.manifest import read_manifest, resolve
from udpdiff.io.video import read_video
from udpdiff.paths import ProjectPaths

logger = logging.getLogger(__name__)

LogFn = Callable[[dict[str, float], int], None]


@dataclass
class StepResult:
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def _json(path: Path, obj) -> Path:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")
    return path


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written folder into place (the old one is removed only after success)."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def _fresh_tmp_dir(final: Path) -> Path:
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def clip_seed(seed: int, clip_id: str) -> int:
    """A per-clip seed independent of manifest order (crc32 is stable across runs/platforms)."""
    return (seed * 1_000_003 + zlib.crc32(clip_id.encode())) % 2**32


# -- data ---------------------------------------------------------------------------------------------
def synthesize(p: Params, paths: ProjectPaths) -> StepResult:
    from udpdiff.data.synthetic import synthesize_dataset

    d = p.active.data
    manifest = synthesize_dataset(paths.clips, num_clips=d.num_clips, num_frames=d.num_frames, height=d.height,
                                  width=d.width, fps=d.fps, seed=p.seed, val_fraction=d.val_fraction)
    df = read_manifest(manifest)
    return StepResult(metrics=_dataset_stats(df), artifacts=[manifest])


def curate(p: Params, paths: ProjectPaths) -> StepResult:
    from udpdiff.data.curate import ingest_panda70m

    src = p.active.data.panda70m
    if not (src.csv and src.video_dir):
        raise ValueError("data.panda70m.csv and data.panda70m.video_dir must be set for source: panda70m")
    manifest, rejects = ingest_panda70m(src.csv, src.video_dir, paths.clips, min_frames=p.active.data.num_frames,
                                        seg_dir=src.seg_dir, depth_dir=src.depth_dir,
                                        val_fraction=p.active.data.val_fraction, seed=p.seed)
    df = read_manifest(manifest)
    stats = _dataset_stats(df)
    stats["rejected_clips"] = float(len(pd.read_csv(rejects))) if Path(rejects).stat().st_size else 0.0
    return StepResult(metrics=stats, artifacts=[manifest, Path(rejects)])


def _dataset_stats(df: pd.DataFrame) -> dict[str, float]:
    return {
        "clips": float(len(df)),
        "train_clips": float((df["split"] == "train").sum()),
        "val_clips": float((df["split"] == "val").sum()),
        "mean_entities": float(df["num_entities"].mean()),
        "mean_motion_score": float(df["motion_score"].mean()),
    }


def validate(p: Params, paths: ProjectPaths) -> StepResult:
    """The data contract; raises DataContractError (report already written) when it breaks."""
    from udpdiff.data.validation import DataContractError, validate_manifest

    d = p.active.data
    report = paths.validation / "report.json"
    result = validate_manifest(paths.manifest, min_frames=d.num_frames, expected_size=(d.height, d.width),
                               report_path=report)
    metrics = {"contract_success": float(result.success), "contract_failures": float(len(result.failures))}
    _json(paths.validation / "summary.json", {**metrics, "failures": result.failures})
    if not result.success:
        err = DataContractError(f"{paths.manifest}: data contract failed (report: {report}):\n  - "
                                + "\n  - ".join(result.failures))
        err.artifacts = [report, paths.validation / "summary.json"]  # for the caller to keep/log
        raise err
    return StepResult(metrics=metrics, artifacts=[report])


def encode_pixelplanes(p: Params, paths: ProjectPaths) -> StepResult:
    """Segmentation -> random-colour Pixelplanes (or the UniGS baseline), depth -> Spectral."""
    from tqdm.auto import tqdm

    pp = p.active.pixelplanes
    df = read_manifest(paths.manifest)
    out = _fresh_tmp_dir(paths.pixelplanes)
    palettes, seg_acc, depth_err = {}, [], []
    for row in tqdm(df.itertuples(), total=len(df), desc="pixelplanes", leave=False):
        ids = load_ids(resolve(paths.manifest, row.seg_path))
        depth = load_depth(resolve(paths.manifest, row.depth_path))
        if pp.segmentation == "pixelplanes":
            entity_ids = np.unique(ids)
            palette = pixelplanes.make_palette(entity_ids[entity_ids != 0], seed=clip_seed(p.seed, row.clip_id),
                                               min_distance=pp.min_color_distance)
            seg_map, palette = pixelplanes.encode_segmentation(ids, palette=palette)
        else:
            seg_map, palette = pixelplanes.encode_location_aware(ids, grid_size=pp.grid_size)
        depth_map = pixelplanes.encode_depth(depth)
        np.savez_compressed(_mk(out / "segmentation" / f"{row.clip_id}.npz"), colormap=seg_map)
        np.savez_compressed(_mk(out / "depth" / f"{row.clip_id}.npz"), colormap=depth_map)
        palettes[row.clip_id] = palette.to_dict()
        seg_acc.append(float((pixelplanes.decode_segmentation(seg_map, palette=palette) == ids).mean()))
        depth_err.append(float(np.abs(pixelplanes.decode_depth(depth_map, method="continuous") - depth).mean()))
    _json(out / "palettes.json", palettes)
    _replace_dir(out, paths.pixelplanes)
    first = df.iloc[0]
    preview = paths.outputs / "previews" / "pixelplanes.mp4"
    viz.write_side_by_side(
        preview,
        [read_video(resolve(paths.manifest, first.video_path)), load_colormap(paths, "segmentation", first.clip_id),
         load_colormap(paths, "depth", first.clip_id)],
        labels=["rgb", "segmentation", "depth"], fps=p.active.data.fps)
    return StepResult(metrics={"seg_roundtrip_pixel_acc": float(np.mean(seg_acc)),
                               "depth_roundtrip_mae": float(np.mean(depth_err))},
                      artifacts=[preview])


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def load_colormap(paths: ProjectPaths, task: str, clip_id: str) -> np.ndarray:
    path = paths.pixelplanes / task / f"{clip_id}.npz"
    with np.load(path) as z:
        return z["colormap"]


def load_palette(paths: ProjectPaths, clip_id: str) -> pixelplanes.Palette:
    return pixelplanes.Palette.from_dict(json.loads((paths.pixelplanes / "palettes.json").read_text())[clip_id])


# -- models -------------------------------------------------------------------------------------------
def load_vae(p: Params, paths: ProjectPaths):
    from diffusers import AutoencoderKLCogVideoX

    from udpdiff.models.vae import build_vae

    spec = p.active.vae.model_dump()
    return (build_vae(spec, p.seed) if spec["pretrained"] else AutoencoderKLCogVideoX.from_pretrained(paths.vae)).eval()


def train_autoencoder(p: Params, paths: ProjectPaths, log_fn: LogFn | None = None) -> StepResult:
    """Fit the tiny VAE on RGB clips and both colormaps (a pretrained VAE is only checked)."""
    from udpdiff.models.vae import (
        build_vae,
        calibrate_scaling_factor,
        reconstruction_psnr,
        to_model_input,
        to_uint8,
        train_vae,
    )

    spec = p.active.vae
    df = read_manifest(paths.manifest)
    tasks = p.active.train.tasks
    train_df, val_df = df[df.split == "train"], df[df.split == "val"]
    if val_df.empty:
        val_df = train_df.iloc[:1]

    def kinds(rows: pd.DataFrame) -> dict[str, list[np.ndarray]]:
        out = {"rgb": [read_video(resolve(paths.manifest, r.video_path)) for r in rows.itertuples()]}
        for task in tasks:
            out[task] = [load_colormap(paths, task, r.clip_id) for r in rows.itertuples()]
        return out

    train_videos, val_videos = kinds(train_df), kinds(val_df)
    vae = build_vae(spec.model_dump(), p.seed)
    history = []
    if not spec.pretrained:
        history = train_vae(vae, [v for vs in train_videos.values() for v in vs], steps=spec.train.steps,
                            batch_size=spec.train.batch_size, lr=spec.train.lr, kl_weight=spec.train.kl_weight,
                            seed=p.seed, log_fn=log_fn)
        calibrate_scaling_factor(vae, train_videos["rgb"])
    metrics = {f"psnr_{k}": reconstruction_psnr(vae, v) for k, v in val_videos.items()}
    metrics["scaling_factor"] = float(vae.config.scaling_factor)
    # what the VAE does to the dense maps, measured where it matters: after Pixelplanes decoding
    r = val_df.iloc[0]
    with torch.no_grad():
        def roundtrip(v: np.ndarray) -> np.ndarray:
            x = to_model_input(v[None])
            return to_uint8(vae.decode(vae.encode(x).latent_dist.mode()).sample)[0]

        rec = {k: roundtrip(v[0]) for k, v in val_videos.items()}
    if "segmentation" in rec:
        gt_ids = load_ids(resolve(paths.manifest, r.seg_path))
        dec = pixelplanes.decode_segmentation(rec["segmentation"], palette=load_palette(paths, r.clip_id),
                                              tolerance=p.active.pixelplanes.decode_tolerance)
        metrics["seg_pixel_acc_after_vae"] = float((dec == gt_ids).mean())
    if "depth" in rec:
        gt_depth = load_depth(resolve(paths.manifest, r.depth_path))
        metrics["depth_mae_after_vae"] = float(np.abs(pixelplanes.decode_depth(rec["depth"]) - gt_depth).mean())
    tmp = _fresh_tmp_dir(paths.vae)
    vae.save_pretrained(tmp)
    if spec.pretrained:
        _json(tmp / "SOURCE.json", {"pretrained": spec.pretrained})
    _replace_dir(tmp, paths.vae)
    curve = {"vae_loss": (np.arange(1, len(history) + 1), [h["vae_loss"] for h in history])} if history else {}
    artifacts = [viz.plot_curves(paths.metrics / "vae_loss.png", curve, ylabel="L1 + MSE + KL", logy=bool(history),
                                 title="VAE training loss" if history else
                                 f"pretrained VAE ({spec.pretrained}): not trained")]
    preview = paths.outputs / "previews" / "vae_reconstruction.mp4"
    viz.write_side_by_side(preview, [val_videos[k][0] for k in rec] + [rec[k] for k in rec],
                           labels=[f"{k}" for k in rec] + [f"{k} (VAE)" for k in rec], fps=p.active.data.fps)
    artifacts.append(preview)
    return StepResult(metrics=metrics, artifacts=artifacts)


def load_text_encoder(p: Params, paths: ProjectPaths):
    from transformers import AutoTokenizer, T5EncoderModel

    from udpdiff.models.text import build_text_encoder

    if p.active.text_encoder.pretrained:
        return build_text_encoder(p.active.text_encoder.model_dump(), p.seed)
    return (AutoTokenizer.from_pretrained(paths.text_encoder),
            T5EncoderModel.from_pretrained(paths.text_encoder).eval().requires_grad_(False))


def clip_inputs(p: Params, paths: ProjectPaths, row):
    """One manifest row's video, colormaps (per trained task) and captions, read from disk."""
    from udpdiff.latents import ClipInputs

    return ClipInputs(clip_id=row.clip_id, rgb=read_video(resolve(paths.manifest, row.video_path)),
                      dense={t: load_colormap(paths, t, row.clip_id) for t in p.active.train.tasks},
                      caption_long=row.caption_long, caption_short=row.caption_short)


def build_latents(p: Params, paths: ProjectPaths) -> StepResult:
    """Cache VAE posteriors and T5 embeddings for every clip (and save the tiny text encoder).
    With ``train.latents: online`` only the empty-prompt embedding is written: training encodes
    the clips itself."""
    from udpdiff.latents import encode_clips
    from udpdiff.models.text import build_text_encoder, encode_text

    te = p.active.text_encoder
    tokenizer, encoder = build_text_encoder(te.model_dump(), p.seed)
    if paths.variant is None:  # sweep variants share the base run's text encoder
        tmp_te = _fresh_tmp_dir(paths.text_encoder)
        if te.pretrained:
            _json(tmp_te / "SOURCE.json", {"pretrained": te.pretrained})
        else:
            encoder.save_pretrained(tmp_te)
            tokenizer.save_pretrained(tmp_te)
        _replace_dir(tmp_te, paths.text_encoder)
    vae = load_vae(p, paths)
    df = read_manifest(paths.manifest)
    if p.active.train.latents == "online":
        df = df.iloc[:0]
    tmp = _fresh_tmp_dir(paths.latents)
    written = encode_clips((clip_inputs(p, paths, r) for r in df.itertuples()), vae,
                           lambda prompts: encode_text(tokenizer, encoder, prompts, te.max_length), tmp,
                           p.active.train.tasks, text_prompt_tasks=p.active.train.task_conditioning == "text-prompt",
                           total=len(df))
    _replace_dir(tmp, paths.latents)
    return StepResult(metrics={"cached_clips": float(len(written))})


def train_transformer(p: Params, paths: ProjectPaths, log_fn: LogFn | None = None,
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
    if t.latents == "online":
        from udpdiff.latents import OnlineLatentDataset
        from udpdiff.models.text import encode_text

        tokenizer, encoder = load_text_encoder(p, paths)
        vae, encoder = vae.to(train_device()), encoder.to(train_device())

        def text_fn(prompts: list[str]) -> torch.Tensor:
            return encode_text(tokenizer, encoder, prompts, p.active.text_encoder.max_length, device=encoder.device)

        latents = OnlineLatentDataset(lambda i: clip_inputs(p, paths, train_rows.iloc[i]), len(train_rows), vae,
                                      text_fn, t.tasks, text_prompt_tasks=t.task_conditioning == "text-prompt")
    preview = None
    if t.sample_every:
        preview = functools.partial(_training_preview, p, vae, scheduler, *_preview_prompts(p, paths, df, text_fn))
    transformer, result = train(p, latents, train_rows.clip_id.tolist(), paths.checkpoints,
                                scaling_factor=float(vae.config.scaling_factor), vae_scale_spatial=vae_scale,
                                scheduler=scheduler, log_fn=log_fn, max_steps_this_run=max_steps_this_run,
                                ds_config=resolve_config_path(t.deepspeed_config, paths.root),
                                preview_fn=preview, artifact_fn=artifact_fn)
    if rank_and_world()[0] != 0:
        return StepResult()
    # the run's preview grids (kept with its checkpoints, so a resumed run still has the early ones)
    grids = paths.outputs / "train_samples"
    tmp = _fresh_tmp_dir(grids)
    for gif in sorted((result.run_dir / "train_samples").glob("step-*.gif")):
        shutil.copy2(gif, tmp / gif.name)
    _replace_dir(tmp, grids)
    history_csv = paths.metrics / "train_history.csv"
    write_history(result.history, history_csv)
    artifacts = [history_csv]
    steps = [h["step"] for h in result.history]
    curves = {k: (steps, [h[k] for h in result.history]) for k in ("loss", "loss_rgb", "loss_dense")
              if all(k in h for h in result.history)}
    artifacts.append(viz.plot_curves(paths.metrics / "train_loss.png", curves, title="UDPDiff training loss",
                                     ylabel="v-prediction MSE", logy=True))
    metrics = summary(result.history) if result.history else {}
    metrics.update(steps_done=float(result.steps_done), resumed_from_step=float(result.resumed_from))
    if result.steps_done >= t.steps:
        tokenizer, encoder = load_text_encoder(p, paths)
        pipe = UDPDiffPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer.eval(),
                               scheduler=scheduler, task_conditioning=t.task_conditioning)
        tmp = _fresh_tmp_dir(paths.pipeline)
        pipe.save_pretrained(tmp)
        _replace_dir(tmp, paths.pipeline)
        if artifact_fn is not None and t.log_checkpoints == "artifacts":
            artifact_fn(paths.pipeline / "transformer", "model/transformer")  # the diffusers export
    return StepResult(metrics=metrics, artifacts=artifacts, info={"checkpoint": str(result.checkpoint)})


def _preview_prompts(p: Params, paths: ProjectPaths, df: pd.DataFrame, text_fn) -> tuple[dict, torch.Tensor]:
    """The training previews' prompt embeddings, read once: the first validation clip's long
    caption (task-named for the text-prompt ablation) and the empty prompt. They come from the
    latent cache, so no text encoder is loaded during training; ``text_fn`` encodes them when
    training encodes online and there is no cache."""
    from udpdiff.latents import EMPTY_PROMPT_FILE
    from udpdiff.tasks import task_prompt

    t = p.active.train
    rows = df[df.split == p.active.sample.split]
    row = (rows if not rows.empty else df).iloc[0]
    if text_fn is None:
        rec = torch.load(paths.latents / f"{row.clip_id}.pt", map_location="cpu", weights_only=True)
    else:
        prompts = {"text:long": row.caption_long, **{f"text:long:{k}": task_prompt(k, row.caption_long)
                                                     for k in t.tasks}}
        with torch.no_grad():
            rec = dict(zip(prompts, text_fn(list(prompts.values())).cpu(), strict=True))
    keys = [f"text:long:{k}" if t.task_conditioning == "text-prompt" else "text:long" for k in t.tasks or [None]]
    empty = torch.load(paths.latents / EMPTY_PROMPT_FILE, map_location="cpu", weights_only=True)["text:empty"]
    return {k: rec[k] for k in keys}, empty


def _training_preview(p: Params, vae, scheduler, prompts: dict[str, torch.Tensor], empty: torch.Tensor,
                      module: torch.nn.Module, step: int, path: Path) -> Path | None:
    """A sample grid of the model being trained: one prompt per task (``_preview_prompts``), rows
    of generated video | colormap | decoded. Runs on every rank (ZeRO-3 forwards are
    collective); rank 0 writes the gif and returns its path."""
    from udpdiff.pipeline import UDPDiffPipeline
    from udpdiff.train import rank_and_world

    t, d, s = p.active.train, p.active.data, p.active.sample
    device = next(module.parameters()).device
    dtype = next(module.parameters()).dtype
    home = vae.device  # the VAE goes back there (online encoding keeps it on the GPU)
    pipe = UDPDiffPipeline(tokenizer=None, text_encoder=None, vae=vae.to(device), transformer=module,
                           scheduler=scheduler, task_conditioning=t.task_conditioning)
    pipe.set_progress_bar_config(disable=True)
    columns: list[list[np.ndarray]] = [[], [], []]
    for task in t.tasks or [None]:  # None: the RGB-only baseline, video alone
        key = f"text:long:{task}" if t.task_conditioning == "text-prompt" else "text:long"
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = pipe(None, task=task, prompt_embeds=prompts[key][None].to(device, dtype),
                       negative_prompt_embeds=empty[None].to(device, dtype), num_frames=d.num_frames,
                       height=d.height, width=d.width, num_inference_steps=s.num_inference_steps,
                       guidance_scale=s.guidance_scale, generator=torch.Generator(device).manual_seed(p.seed),
                       segmentation_tolerance=p.active.pixelplanes.decode_tolerance)
        columns[0].append(out.videos[0])
        if task is not None:
            columns[1].append(out.colormaps[0])
            columns[2].append(dense_picture(task, out.dense[0]))
    vae.to(home)
    if rank_and_world()[0] != 0:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    viz.write_side_by_side(path, [np.concatenate(c, axis=1) for c in columns if c],
                           labels=[f"step {step}: {' / '.join(t.tasks or ['RGB only'])}", "colormap", "decoded"][
                               :sum(bool(c) for c in columns)], fps=d.fps,
                           height=max(len(t.tasks), 1) * max(d.height, viz.MIN_DISPLAY_HEIGHT))
    return path


# -- sampling, evaluation, report ---------------------------------------------------------------------
def dense_picture(task: str, dense: np.ndarray, palette: pixelplanes.Palette | None = None) -> np.ndarray:
    """A decoded prediction re-rendered for people: Spectral depth, or ids in palette colours."""
    if task == "depth":
        return pixelplanes.encode_depth(np.clip(dense, 0.0, 1.0))
    return pixelplanes.encode_segmentation(dense, seed=0)[0] if palette is None else \
        pixelplanes.encode_segmentation(dense, palette=palette)[0]


RGB_ONLY = "rgb"  # the sample set of the RGB-only baseline (no dense task)


def sample_sets(p: Params) -> list[str]:
    """What the sample and evaluate stages produce per model: one set per task, or ``rgb``."""
    return list(p.active.train.tasks) or [RGB_ONLY]


def sample(p: Params, paths: ProjectPaths) -> StepResult:
    """Text -> (video, dense) for validation prompts, per task with the same prompts and seeds
    (the paper's multi-task protocol), plus the dense prediction *of* each real validation clip
    (the RGB half fixed to that clip) so the evaluation can score it against exact ground truth."""
    import time

    from udpdiff.pipeline import UDPDiffPipeline

    s, d, te = p.active.sample, p.active.data, p.active.text_encoder
    pipe = UDPDiffPipeline.from_pretrained(paths.pipeline)
    pipe.set_progress_bar_config(disable=True)
    df = read_manifest(paths.manifest)
    rows = df[df.split == s.split].head(s.num_samples)
    if rows.empty:
        raise ValueError(f"{paths.manifest}: no clips in split {s.split!r} to take prompts from")
    tmp = _fresh_tmp_dir(paths.samples)
    index, seconds = [], []
    call = dict(num_frames=d.num_frames, height=d.height, width=d.width, num_inference_steps=s.num_inference_steps,
                guidance_scale=s.guidance_scale, max_sequence_length=te.max_length,
                segmentation_tolerance=p.active.pixelplanes.decode_tolerance)
    real_videos = {r.clip_id: read_video(resolve(paths.manifest, r.video_path)) for r in rows.itertuples()}
    names = sample_sets(p)
    for name in names:
        task = None if name == RGB_ONLY else name
        for i, row in enumerate(rows.itertuples()):
            start = time.perf_counter()
            out = pipe(row.caption_long, task=task, generator=torch.Generator().manual_seed(p.seed + i), **call)
            seconds.append(time.perf_counter() - start)
            stem = tmp / name / row.clip_id
            stem.parent.mkdir(parents=True, exist_ok=True)
            if task is None:
                np.savez_compressed(f"{stem}.npz", video=out.videos[0])
                viz.write_side_by_side(f"{stem}.mp4", [out.videos[0]], labels=["generated (RGB only)"], fps=d.fps)
            else:
                cond = pipe(row.caption_long, task=task, video=real_videos[row.clip_id],
                            generator=torch.Generator().manual_seed(p.seed + i),
                            **{k: v for k, v in call.items() if k not in ("num_frames", "height", "width")})
                np.savez_compressed(f"{stem}.npz", video=out.videos[0], colormap=out.colormaps[0],
                                    dense=out.dense[0], conditioned_colormap=cond.colormaps[0],
                                    conditioned_dense=cond.dense[0])
                viz.write_side_by_side(f"{stem}.mp4",
                                       [out.videos[0], out.colormaps[0], dense_picture(task, out.dense[0])],
                                       labels=["generated", f"{task} colormap", "decoded"], fps=d.fps)
            index.append({"task": name, "clip_id": row.clip_id, "prompt": row.caption_long, "seed": p.seed + i,
                          "npz": f"{name}/{row.clip_id}.npz", "mp4": f"{name}/{row.clip_id}.mp4"})
        # one picture per task for the MLflow UI: every sample stacked, video | colormap | decoded
        first = [np.load(tmp / e["npz"]) for e in index if e["task"] == name]
        columns = [np.concatenate([z["video"] for z in first], axis=1)]
        if task is not None:
            columns += [np.concatenate([z["colormap"] for z in first], axis=1),
                        np.concatenate([dense_picture(task, z["dense"]) for z in first], axis=1)]
        viz.write_side_by_side(tmp / f"gallery_{name}.gif", columns,
                               labels=["generated", f"{task} colormap", "decoded"][:len(columns)], fps=d.fps,
                               height=len(first) * max(d.height, viz.MIN_DISPLAY_HEIGHT))
    _json(tmp / "index.json", index)
    _replace_dir(tmp, paths.samples)
    runtime = {"seconds_per_sample": float(np.median(seconds)),
               "seconds_per_step": float(np.median(seconds)) / s.num_inference_steps}
    return StepResult(metrics=runtime, artifacts=[paths.samples / f"gallery_{n}.gif" for n in names])


def evaluate(p: Params, paths: ProjectPaths) -> StepResult:
    """Scores per task: frame consistency and motion smoothness of generated videos (VBench SC/BC
    too when DINO/CLIP weights are configured), and dense-prediction accuracy against exact GT."""
    from udpdiff.evaluation.consistency import (
        background_consistency,
        motion_smoothness_flow,
        pixel_frame_consistency,
        subject_consistency,
    )
    from udpdiff.evaluation.depth import depth_metrics
    from udpdiff.evaluation.fvd import fvd_from_features
    from udpdiff.evaluation.segmentation import hungarian_miou, temporal_id_consistency

    index = json.loads((paths.samples / "index.json").read_text())
    df = read_manifest(paths.manifest).set_index("clip_id")
    extractors, notes = _metric_models(p)
    results: dict[str, dict[str, float]] = {}
    # each real clip is read once: for FVD and for the reference row
    real = {c: read_video(resolve(paths.manifest, df.loc[c].video_path))
            for c in dict.fromkeys(e["clip_id"] for e in index)}
    for task in sample_sets(p):
        entries = [e for e in index if e["task"] == task]
        rows: dict[str, list[float]] = {}
        videos = []
        for e in entries:
            with np.load(paths.samples / e["npz"]) as z:
                video = z["video"]
                cond = z["conditioned_dense"] if task != RGB_ONLY else None
            videos.append(video)
            clip = df.loc[e["clip_id"]]
            if task == RGB_ONLY:
                pass  # no dense prediction to score
            elif task == "depth":
                gt = load_depth(resolve(paths.manifest, clip.depth_path))
                # disparity 0 is "infinitely far" (sky): ratios there are undefined, so score where gt > 0
                m = depth_metrics(cond, gt, mask=gt > 1e-3)
                for k in ("delta1", "abs_rel", "rmse"):
                    rows.setdefault(f"gt_{k}", []).append(m[k])
            else:
                gt = load_ids(resolve(paths.manifest, clip.seg_path))
                rows.setdefault("gt_miou", []).append(float(hungarian_miou(cond, gt)["miou"]))
                rows.setdefault("gt_temporal_id_consistency", []).append(temporal_id_consistency(cond, gt))
        batch = np.stack(videos)
        rows["pixel_frame_consistency"] = [pixel_frame_consistency(v) for v in videos]
        rows["motion_smoothness_flow"] = list(np.atleast_1d(motion_smoothness_flow(batch)))
        if "dino" in extractors:
            rows["subject_consistency"] = list(np.atleast_1d(subject_consistency(batch, extractors["dino"])))
        if "clip" in extractors:
            rows["background_consistency"] = list(np.atleast_1d(background_consistency(batch, extractors["clip"])))
        if "i3d" in extractors:
            # FVD against the real clips the prompts came from; biased by both counts, so logged beside it
            real_batch = np.stack([real[e["clip_id"]] for e in entries])
            rows["fvd"] = [fvd_from_features(extractors["i3d"](real_batch).cpu().numpy(),
                                             extractors["i3d"](batch).cpu().numpy())]
            rows["fvd_num_frames"] = [float(batch.shape[1])]
        results[task] = {k: float(np.mean(v)) for k, v in rows.items()}
        results[task]["num_videos"] = float(len(entries))
    # the same weight-free scores on the real validation clips: the ceiling to compare against
    real_list = list(real.values())
    results["real"] = {"pixel_frame_consistency": float(np.mean([pixel_frame_consistency(v) for v in real_list])),
                       "motion_smoothness_flow": float(np.mean(motion_smoothness_flow(np.stack(real_list))))}
    _json(paths.metrics / "eval.json", {"metrics": results, "notes": notes})
    flat = {f"{task}/{k}": v for task, m in results.items() for k, v in m.items()}
    return StepResult(metrics=flat, artifacts=[paths.metrics / "eval.json"], info={"notes": notes})


def _metric_models(p: Params) -> tuple[dict, list[str]]:
    """Load the learned-metric models that are configured; a missing one is a note, not a failure."""
    from udpdiff.evaluation.consistency import ClipImageFeatures, DinoFeatures, MetricModelUnavailable

    e = p.active.evaluate
    out, notes = {}, []
    from udpdiff.evaluation.fvd import I3DFeatures

    models = (("dino", DinoFeatures, e.dino), ("clip", ClipImageFeatures, e.clip), ("i3d", I3DFeatures, e.i3d))
    for key, cls, ref in models:
        if not ref:
            notes.append(f"{key}: not configured (set profiles.{p.profile}.evaluate.{key} to a local path or id)")
            continue
        try:
            out[key] = cls(ref)
        except MetricModelUnavailable as err:
            logger.warning("%s", err)
            notes.append(str(err))
    notes.append("motion_smoothness_flow uses an OpenCV optical-flow interpolation prior, not VBench's AMT model; "
                 "its numbers are not comparable to the paper's MS")
    return out, notes


def report(p: Params, paths: ProjectPaths) -> StepResult:
    """Markdown report in the paper's table layout, from the metrics the other stages wrote."""
    ev = json.loads((paths.metrics / "eval.json").read_text())
    m = ev["metrics"]
    tasks = [t for t in sample_sets(p) if t in m]
    gen_cols = ["model", "subject_consistency", "background_consistency", "motion_smoothness_flow", "fvd",
                "pixel_frame_consistency"]
    gen_rows = [{"model": "real clips (reference)", **m["real"]}] + [
        {"model": "CogVideoX, fine-tuned RGB only (16 ch)" if t == RGB_ONLY else f"UDPDiff ({t})", **m[t]}
        for t in tasks]
    lines = [f"# UDPDiff report — profile `{p.profile}`", "",
             "## Generation quality (paper Tabs 1–2 layout; higher is better, except FVD)", "",
             viz.markdown_table(gen_rows, gen_cols), ""]
    if "depth" in m:
        lines += ["## Depth prediction of real validation clips vs exact ground truth (Tab 3 layout)", "",
                  viz.markdown_table([{"model": "UDPDiff (depth)", **m["depth"]}],
                                     ["model", "gt_delta1", "gt_abs_rel", "gt_rmse"]), ""]
    if "segmentation" in m:
        lines += ["## Segmentation of real validation clips vs exact ground truth", "",
                  viz.markdown_table([{"model": "UDPDiff (segmentation)", **m["segmentation"]}],
                                     ["model", "gt_miou", "gt_temporal_id_consistency"]), ""]
    lines += ["## Notes", ""] + [f"- {n}" for n in ev["notes"]] + [
        "- An empty cell means that metric's model is not configured (see the notes above).",
        "- `gt_*` columns score the dense prediction *of* real validation clips (RGB half fixed to the clip) "
        "against their exact ground truth; depth after least-squares scale-and-shift alignment.", ""]
    path = paths.report / "report.md"
    write_text(path, "\n".join(lines))
    artifacts = [path] + [q for q in (paths.metrics / "train_loss.png", paths.metrics / "vae_loss.png") if q.exists()]
    return StepResult(artifacts=artifacts)
