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
from udpdiff.devices import default_device
from udpdiff.io.atomic import atomic_path, write_text
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
    from udpdiff.annotators import LazyAnnotator

    # loaded when a clip first lacks a map; missing weights then stop the stage (no silently unlabelled data)
    device = default_device()
    annotators = {kind: LazyAnnotator(ref, device) for kind, ref in
                  (("seg", src.segmentation_annotator), ("depth", src.depth_annotator)) if ref is not None}
    manifest, rejects = ingest_panda70m(src.csv, src.video_dir, paths.clips, min_frames=p.active.data.num_frames,
                                        seg_dir=src.seg_dir, depth_dir=src.depth_dir,
                                        val_fraction=p.active.data.val_fraction, seed=p.seed,
                                        annotators=annotators)
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


def read_clip(p: Params, paths: ProjectPaths, video_path: str) -> np.ndarray:
    """A manifest clip as the models see it: its first ``data.num_frames`` frames (the data contract
    guarantees at least that many, at the profile's size; curated clips may be longer)."""
    return read_video(resolve(paths.manifest, video_path), indices=list(range(p.active.data.num_frames)))


# -- models -------------------------------------------------------------------------------------------
def load_vae(p: Params, paths: ProjectPaths):
    from diffusers import AutoencoderKLCogVideoX

    from udpdiff.models.vae import build_vae

    spec = p.active.vae.model_dump()
    return (build_vae(spec, p.seed) if spec["pretrained"] else AutoencoderKLCogVideoX.from_pretrained(paths.vae)).eval()


VAE_CHECK_CLIPS = 8  # validation clips for the VAE's reconstruction PSNR


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
    t = p.active.data.num_frames
    # a pretrained VAE is only checked: a few validation clips, never the (large) training split
    val_df = val_df.head(VAE_CHECK_CLIPS)
    if spec.pretrained:
        train_df = train_df.iloc[:0]

    def kinds(rows: pd.DataFrame) -> dict[str, list[np.ndarray]]:
        out = {"rgb": [read_clip(p, paths, r.video_path) for r in rows.itertuples()]}
        for task in tasks:
            out[task] = [load_colormap(paths, task, r.clip_id)[:t] for r in rows.itertuples()]
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
        gt_ids = load_ids(resolve(paths.manifest, r.seg_path))[:t]
        dec = pixelplanes.decode_segmentation(rec["segmentation"], palette=load_palette(paths, r.clip_id),
                                              tolerance=p.active.pixelplanes.decode_tolerance)
        metrics["seg_pixel_acc_after_vae"] = float((dec == gt_ids).mean())
    if "depth" in rec:
        gt_depth = load_depth(resolve(paths.manifest, r.depth_path))[:t]
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

    t = p.active.data.num_frames
    return ClipInputs(clip_id=row.clip_id, rgb=read_clip(p, paths, row.video_path),
                      dense={task: load_colormap(paths, task, row.clip_id)[:t] for task in p.active.train.tasks},
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


def _sample_fingerprint(p: Params, paths: ProjectPaths, names: list[str]) -> str:
    """What makes two sample runs interchangeable: the sampling params and the pipeline's files."""
    import hashlib

    files = sorted((str(f.relative_to(paths.pipeline)), f.stat().st_size, f.stat().st_mtime_ns)
                   for f in paths.pipeline.rglob("*") if f.is_file())
    a = p.active
    key = {"seed": p.seed, "sets": names, "sample": a.sample.model_dump(exclude={"gallery_size", "runtime_trials"}),
           "data": [a.data.num_frames, a.data.height, a.data.width], "tolerance": a.pixelplanes.decode_tolerance,
           "max_length": a.text_encoder.max_length, "pipeline": files}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _resumable_work_dir(final: Path, fingerprint: str) -> Path:
    """A work folder beside ``final`` that survives an interrupted run: reused when the fingerprint
    matches (finished samples are kept), emptied otherwise."""
    work = final.with_name(f".partial-{final.name}")
    stamp = work / "fingerprint.txt"
    if stamp.exists() and stamp.read_text().strip() == fingerprint:
        logger.info("%s: resuming an interrupted run (finished samples are kept)", work)
        return work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_text(stamp, fingerprint + "\n")
    return work


def inference_device(p: Params) -> tuple[torch.device, torch.dtype]:
    """Sampling runs on the GPU when there is one, in the training precision (fp32 on the CPU)."""
    if not torch.cuda.is_available():
        return torch.device("cpu"), torch.float32
    return torch.device("cuda"), {"bf16": torch.bfloat16, "fp16": torch.float16}.get(p.active.train.precision,
                                                                                      torch.float32)


def sample(p: Params, paths: ProjectPaths) -> StepResult:
    """Text -> (video, dense) for validation prompts, per task with the same prompts and seeds
    (the paper's multi-task protocol), plus the dense prediction *of* each real validation clip
    (the RGB half fixed to that clip) so the evaluation can score it against exact ground truth.

    Samples are written one by one (1,024 of them never sit in memory) into a work folder that an
    interrupted run resumes; the finished set replaces ``outputs/<profile>/samples`` at the end.
    ``sample.runtime_trials`` also times ours against the stock CogVideoX architecture (Tab 4)."""
    import time

    from tqdm.auto import tqdm

    from udpdiff.pipeline import UDPDiffPipeline

    s, d, te = p.active.sample, p.active.data, p.active.text_encoder
    device, dtype = inference_device(p)
    pipe = UDPDiffPipeline.from_pretrained(paths.pipeline, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    df = read_manifest(paths.manifest)
    rows = df[df.split == s.split].head(s.num_samples)
    if rows.empty:
        raise ValueError(f"{paths.manifest}: no clips in split {s.split!r} to take prompts from")
    if len(rows) < s.num_samples:
        logger.warning("sample.num_samples=%d but split %r has %d clips: sampling %d", s.num_samples, s.split,
                       len(rows), len(rows))
    names = sample_sets(p)
    work = _resumable_work_dir(paths.samples, _sample_fingerprint(p, paths, names))
    call = dict(num_frames=d.num_frames, height=d.height, width=d.width, num_inference_steps=s.num_inference_steps,
                guidance_scale=s.guidance_scale, max_sequence_length=te.max_length,
                segmentation_tolerance=p.active.pixelplanes.decode_tolerance)
    index, seconds = [], []
    bar = tqdm(total=len(names) * len(rows), desc="sample", unit="video")
    for name in names:
        task = None if name == RGB_ONLY else name
        for i, row in enumerate(rows.itertuples()):
            stem = work / name / row.clip_id
            index.append({"task": name, "clip_id": row.clip_id, "prompt": row.caption_long, "seed": p.seed + i,
                          "npz": f"{name}/{row.clip_id}.npz", "mp4": f"{name}/{row.clip_id}.mp4"})
            bar.update()
            if Path(f"{stem}.npz").exists() and Path(f"{stem}.mp4").exists():
                with np.load(f"{stem}.npz") as z:
                    seconds.append(float(z["seconds"]))
                continue
            start = time.perf_counter()
            out = pipe(row.caption_long, task=task, generator=torch.Generator().manual_seed(p.seed + i), **call)
            seconds.append(time.perf_counter() - start)
            stem.parent.mkdir(parents=True, exist_ok=True)
            arrays = {"video": out.videos[0], "seconds": np.float64(seconds[-1])}
            if task is not None:
                real = read_clip(p, paths, row.video_path)  # one clip at a time
                cond = pipe(row.caption_long, task=task, video=real,
                            generator=torch.Generator().manual_seed(p.seed + i),
                            **{k: v for k, v in call.items() if k not in ("num_frames", "height", "width")})
                arrays.update(colormap=out.colormaps[0], dense=out.dense[0], conditioned_colormap=cond.colormaps[0],
                              conditioned_dense=cond.dense[0])
            # the mp4 is written last: an npz without its mp4 is an interrupted sample and is redone
            with atomic_path(f"{stem}.npz") as tmp:
                np.savez_compressed(tmp, **arrays)
            if task is None:
                viz.write_side_by_side(f"{stem}.mp4", [out.videos[0]], labels=["generated (RGB only)"], fps=d.fps)
            else:
                viz.write_side_by_side(f"{stem}.mp4",
                                       [out.videos[0], out.colormaps[0], dense_picture(task, out.dense[0])],
                                       labels=["generated", f"{task} colormap", "decoded"], fps=d.fps)
        _write_gallery(work, name, [e for e in index if e["task"] == name][: s.gallery_size], d)
    bar.close()
    runtime = measure_runtime(p, pipe, rows.iloc[0].caption_long, names) if s.runtime_trials else {}
    _json(work / "index.json", index)
    _json(work / "runtime.json", runtime)
    (work / "fingerprint.txt").unlink()
    _replace_dir(work, paths.samples)
    metrics = {"seconds_per_sample": float(np.median(seconds)),
               "seconds_per_step": float(np.median(seconds)) / s.num_inference_steps}
    metrics.update({f"runtime/{k}/{m}": v for k, r in runtime.items() for m, v in r.items()})
    return StepResult(metrics=metrics, artifacts=[paths.samples / f"gallery_{n}.gif" for n in names])


def _write_gallery(work: Path, name: str, entries: list[dict], d) -> None:
    """One picture per sample set for the MLflow UI: a few samples stacked, video | colormap | decoded."""
    task = None if name == RGB_ONLY else name
    loaded = []
    for e in entries:
        with np.load(work / e["npz"]) as z:
            loaded.append({k: z[k] for k in ("video", "colormap", "dense") if k in z})
    columns = [np.concatenate([z["video"] for z in loaded], axis=1)]
    if task is not None:
        columns += [np.concatenate([z["colormap"] for z in loaded], axis=1),
                    np.concatenate([dense_picture(task, z["dense"]) for z in loaded], axis=1)]
    viz.write_side_by_side(work / f"gallery_{name}.gif", columns,
                           labels=["generated", f"{task} colormap", "decoded"][:len(columns)], fps=d.fps,
                           height=len(loaded) * max(d.height, viz.MIN_DISPLAY_HEIGHT))


def stock_pipeline(p: Params, pipe):
    """diffusers' stock ``CogVideoXPipeline`` with the stock 16-channel transformer, sharing our
    VAE, T5 and scheduler: the baseline of Tab 4. With ``transformer.pretrained`` that is the real
    CogVideoX; otherwise the profile's config randomly initialised (a timing baseline only)."""
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    from udpdiff.models.transformer import LATENT_CHANNELS

    spec = p.active.transformer
    dtype, device = pipe.transformer.dtype, pipe.transformer.device
    if spec.pretrained:
        stock = CogVideoXTransformer3DModel.from_pretrained(spec.pretrained, subfolder="transformer",
                                                            torch_dtype=dtype)
    else:
        config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_") and k != "num_tasks"}
        config.update(in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS)
        stock = CogVideoXTransformer3DModel.from_config(config).to(dtype)
    out = CogVideoXPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                            transformer=stock.to(device), scheduler=pipe.scheduler)
    out.set_progress_bar_config(disable=True)
    return out


def measure_runtime(p: Params, pipe, prompt: str, names: list[str]) -> dict[str, dict[str, float]]:
    """Tab 4: median seconds per sample and per denoising step of the stock architecture and of ours
    (per sample set), same prompt, seed, size and steps. Each is run once untimed first (warm-up)."""
    from udpdiff.evaluation.runtime import time_calls

    s, d, te = p.active.sample, p.active.data, p.active.text_encoder
    call = dict(num_frames=d.num_frames, height=d.height, width=d.width, num_inference_steps=s.num_inference_steps,
                guidance_scale=s.guidance_scale, max_sequence_length=te.max_length)
    stock = stock_pipeline(p, pipe)
    runs = {"stock": functools.partial(stock, prompt, generator=torch.Generator().manual_seed(p.seed),
                                       output_type="np", **call)}
    for name in names:
        task = None if name == RGB_ONLY else name
        runs[name] = functools.partial(pipe, prompt, task=task, generator=torch.Generator().manual_seed(p.seed),
                                       segmentation_tolerance=p.active.pixelplanes.decode_tolerance, **call)
    return {k: time_calls(fn, s.runtime_trials, steps=s.num_inference_steps) for k, fn in runs.items()}


def evaluate(p: Params, paths: ProjectPaths) -> StepResult:
    """Scores per sample set, streamed in chunks of ``evaluate.batch_size`` videos:

    - generation quality (Tabs 1-2): VBench SC (DINO) / BC (CLIP) when configured, motion smoothness
      (VBench's AMT when configured, else the flow prior, under its own name), FVD against the
      cached I3D statistics of the real split, and a weight-free frame-consistency number;
    - dense predictions of real clips against their exact (or curated) ground truth (``gt_*``);
    - dense predictions of generated videos against the annotators' pseudo ground truth (Tab 3,
      ``pseudo_*`` / ``baseline_*``) when annotators are configured.

    Writes ``outputs/<profile>/evaluation/{metrics.json, per_video.csv, tables.md, tables.html}``."""
    from tqdm.auto import tqdm

    from udpdiff.evaluation import tables
    from udpdiff.evaluation.fvd import FeatureAccumulator, fvd
    from udpdiff.evaluation.runner import build_metric_suite

    e = p.active.evaluate
    index = json.loads((paths.samples / "index.json").read_text())
    manifest = read_manifest(paths.manifest)
    df = manifest.set_index("clip_id")
    suite = build_metric_suite(e, where=f"profiles.{p.profile}.evaluate")
    reference = fvd_reference(p, paths, suite.i3d, manifest) if suite.i3d is not None else None
    per_video: list[dict] = []
    results: dict[str, dict[str, float]] = {}
    for name in sample_sets(p):
        task = None if name == RGB_ONLY else name
        entries = [x for x in index if x["task"] == name]
        features = FeatureAccumulator(suite.i3d, e.fvd_frames) if reference is not None else None
        rows: list[dict] = []
        for chunk in tqdm(_chunks(entries, e.batch_size), desc=f"evaluate {name}", unit="chunk",
                          total=-(-len(entries) // e.batch_size)):
            arrays = [_load_sample(paths.samples / x["npz"], task) for x in chunk]
            videos = _stack([a["video"] for a in arrays], paths.samples / chunk[0]["npz"])
            scores = suite.score_videos(videos)
            if task is not None:
                scores.update(suite.score_pseudo_gt(task, videos, np.stack([a["dense"] for a in arrays])))
                for x, a in zip(chunk, arrays, strict=True):
                    for k, v in _ground_truth_scores(task, a["conditioned_dense"], df.loc[x["clip_id"]],
                                                     paths.manifest, suite.depth_per_frame).items():
                        scores.setdefault(k, []).append(v)
            if features is not None:
                features.add(videos, what=f"{paths.samples / name}")
            rows += [{"set": name, "clip_id": x["clip_id"], **{k: v[j] for k, v in scores.items()}}
                     for j, x in enumerate(chunk)]
        per_video += rows
        results[name] = _means(rows)
        results[name]["num_videos"] = float(len(rows))
        results[name]["num_frames"] = float(videos.shape[1]) if entries else 0.0
        if features is not None:
            results[name].update(fvd(reference, features.statistics()))
    # the same scores on the real clips the prompts came from: the ceiling to compare against
    real_ids = list(dict.fromkeys(x["clip_id"] for x in index))
    real_rows = []
    for chunk in _chunks(real_ids, e.batch_size):
        videos = np.stack([read_clip(p, paths, df.loc[c].video_path) for c in chunk])
        scores = suite.score_videos(videos)
        real_rows += [{"set": "real", "clip_id": c, **{k: v[j] for k, v in scores.items()}}
                      for j, c in enumerate(chunk)]
    results["real"] = {**_means(real_rows), "num_videos": float(len(real_rows)),
                       "num_frames": float(videos.shape[1]) if real_rows else 0.0}
    runtime_path = paths.samples / "runtime.json"
    runtime = json.loads(runtime_path.read_text()) if runtime_path.exists() else {}
    notes = suite.notes
    out = paths.evaluation
    _json(out / "metrics.json", {"metrics": results, "runtime": runtime, "models": suite.names, "notes": notes})
    with atomic_path(out / "per_video.csv") as tmp:
        pd.DataFrame(per_video + real_rows).to_csv(tmp, index=False)
    tabs = tables.all_tables(results, sample_sets(p), suite.names, runtime)
    title = f"UDPDiff evaluation — profile `{p.profile}`"
    write_text(out / "tables.md", tables.markdown_document(title, tabs, notes))
    write_text(out / "tables.html", tables.html_document(title, tabs, notes))
    _plot_scores(out / "scores.png", results)
    flat = {f"{s}/{k}": v for s, m in results.items() for k, v in m.items()}
    return StepResult(metrics=flat, artifacts=[out / f for f in ("metrics.json", "per_video.csv", "tables.md",
                                                                 "tables.html", "scores.png")], info={"notes": notes})


def _plot_scores(path: Path, results: dict[str, dict[str, float]]) -> Path:
    """The [0, 1] scores of every set side by side (FVD and seconds have other scales: tables only)."""
    from udpdiff.evaluation.tables import set_label

    keys = ["subject_consistency", "background_consistency", "motion_smoothness", "motion_smoothness_flow",
            "pixel_frame_consistency", "gt_delta1", "pseudo_delta1", "gt_miou", "pseudo_miou",
            "gt_temporal_id_consistency"]
    shown = [k for k in keys if any(k in m for m in results.values())]
    order = sorted(results, key=lambda s: s != "real")  # the real clips' ceiling first
    return viz.plot_grouped_bars(path, {set_label(s): results[s] for s in order}, shown,
                                 title="evaluation scores per sample set", ylabel="score (higher is better)")


def _ground_truth_scores(task: str, prediction: np.ndarray, clip, manifest: Path,
                         depth_per_frame: bool = False) -> dict[str, float]:
    """The dense prediction *of* a real clip against that clip's ground truth (exact for synthetic data)."""
    from udpdiff.evaluation.runner import depth_scores
    from udpdiff.evaluation.segmentation import hungarian_miou, temporal_id_consistency

    t = prediction.shape[0]  # the clip's first t frames were predicted
    if task == "depth":
        scores = depth_scores(prediction, load_depth(resolve(manifest, clip.depth_path))[:t], depth_per_frame)
        return {f"gt_{k}": v for k, v in scores.items()}
    gt = load_ids(resolve(manifest, clip.seg_path))[:t]
    return {"gt_miou": float(hungarian_miou(prediction, gt)["miou"]),
            "gt_temporal_id_consistency": temporal_id_consistency(prediction, gt)}


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _load_sample(path: Path, task: str | None) -> dict[str, np.ndarray]:
    keys = ("video",) if task is None else ("video", "dense", "conditioned_dense")
    try:
        with np.load(path) as z:
            return {k: z[k] for k in keys}
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"{path}: unreadable sample ({type(err).__name__}: {err}); rerun the sample stage") from err


def _stack(videos: list[np.ndarray], where: Path) -> np.ndarray:
    shapes = {v.shape for v in videos}
    if len(shapes) != 1:
        raise ValueError(f"{where.parent}: samples of one set differ in shape {sorted(shapes)}")
    return np.stack(videos)


def _means(rows: list[dict]) -> dict[str, float]:
    keys = dict.fromkeys(k for r in rows for k in r if k not in ("set", "clip_id"))
    out = {}
    for k in keys:
        # NaN-skipping mean: a clip without entities has no mIoU, which must not sink the average
        v = np.array([r.get(k, np.nan) for r in rows], dtype=np.float64)
        v = v[~np.isnan(v)]
        out[k] = float(v.mean()) if v.size else float("nan")
    return out


def fvd_reference(p: Params, paths: ProjectPaths, i3d, manifest: pd.DataFrame | None = None):
    """I3D statistics of the real clips of ``sample.split`` (capped at ``evaluate.fvd_reference_videos``),
    cached under ``data/<profile>/fvd_reference``: computed once per split, clip set, frame count and
    I3D file, reused by every later evaluation and sweep variant."""
    import hashlib

    from udpdiff.evaluation.fvd import FeatureAccumulator, FVDStatistics

    e, split = p.active.evaluate, p.active.sample.split
    df = read_manifest(paths.manifest) if manifest is None else manifest
    clips = df[df.split == split].sort_values("clip_id")
    if e.fvd_reference_videos:
        clips = clips.head(e.fvd_reference_videos)
    files = [resolve(paths.manifest, v) for v in clips.video_path]
    frames = list(range(p.active.data.num_frames))
    i3d_file = Path(e.i3d).expanduser()
    key = json.dumps({"split": split, "clips": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files],
                      "frames": [len(frames), e.fvd_frames], "i3d": [str(i3d_file.resolve()), i3d_file.stat().st_size]})
    digest = hashlib.sha256(key.encode()).hexdigest()
    cache = paths.fvd_reference / f"{split}-{digest[:16]}.npz"
    stats = FVDStatistics.load(cache, digest)
    if stats is not None:
        logger.info("FVD reference: %s (%d videos, %d frames, cached)", cache, stats.num_videos, stats.num_frames)
        return stats
    acc = FeatureAccumulator(i3d, e.fvd_frames)
    for chunk in _chunks(files, e.batch_size):
        acc.add(np.stack([read_video(f, indices=frames) for f in chunk]), what=str(chunk[0].parent))
    stats = acc.statistics()
    cache.parent.mkdir(parents=True, exist_ok=True)
    stats.save(cache, digest)
    logger.info("FVD reference: %s (%d videos, %d frames, computed)", cache, stats.num_videos, stats.num_frames)
    return stats


def report(p: Params, paths: ProjectPaths) -> StepResult:
    """The run's report (markdown and HTML): the evaluation's tables in the paper's layouts, the
    training and VAE loss curves, and the sample galleries."""
    from udpdiff.evaluation import tables

    ev = json.loads((paths.evaluation / "metrics.json").read_text())
    tabs = tables.all_tables(ev["metrics"], [t for t in sample_sets(p) if t in ev["metrics"]], ev.get("models", {}),
                             ev.get("runtime"))
    models = [f"{k}: {v}" for k, v in ev.get("models", {}).items()]
    notes = [*ev["notes"], *(f"model for {m}" for m in models),
             "`gt_*` scores are dense predictions *of* real validation clips (RGB half fixed to the clip) against "
             "their ground truth; depth after least-squares scale-and-shift alignment per video."]
    title = f"UDPDiff report — profile `{p.profile}`"
    out = paths.report
    write_text(out / "report.md", tables.markdown_document(title, tabs, notes))
    write_text(out / "report.html", tables.html_document(title, tabs, notes))
    plots = [q for q in (paths.metrics / "train_loss.png", paths.metrics / "vae_loss.png") if q.exists()]
    return StepResult(artifacts=[out / "report.md", out / "report.html", *plots])
