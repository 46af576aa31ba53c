"""The `sample` stage: text -> video + dense map per task, and the dense prediction of real clips."""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from udpdiff import viz
from udpdiff.distributed import Ranks, inference_ranks, local_device
from udpdiff.io.atomic import atomic_path, write_text
from udpdiff.io.manifest import read_manifest
from udpdiff.stages.common import (
    RGB_ONLY,
    StepResult,
    dense_picture,
    read_clip,
    replace_dir,
    sample_seed,
    sample_sets,
    write_json,
)

if TYPE_CHECKING:
    from udpdiff.config import Params
    from udpdiff.paths import ProjectPaths

logger = logging.getLogger(__name__)


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


def _resumable_work_dir(final: Path, fingerprint: str, ranks: Ranks | None = None) -> Path:
    """A work folder beside ``final`` that survives an interrupted run: reused when the fingerprint
    matches (finished samples are kept), emptied otherwise. Under several ranks rank 0 decides and
    the others use what it left (the folder must be on a filesystem every rank sees)."""
    ranks = ranks or Ranks()
    work = final.with_name(f".partial-{final.name}")
    stamp = work / "fingerprint.txt"
    if ranks.is_main:
        if stamp.exists() and stamp.read_text().strip() == fingerprint:
            logger.info("%s: resuming an interrupted run (finished samples are kept)", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            write_text(stamp, fingerprint + "\n")
    ranks.barrier()
    if not ranks.is_main and not (stamp.exists() and stamp.read_text().strip() == fingerprint):
        raise RuntimeError(f"rank {ranks.rank}: {stamp} is missing or from another run; every rank must see "
                           "rank 0's work folder (a filesystem shared by all nodes)")
    return work


def inference_device(p: Params) -> tuple[torch.device, torch.dtype]:
    """Sampling runs on the GPU when there is one (this rank's under a launcher), in the training
    precision (fp32 on the CPU)."""
    precision = p.active.train.precision
    device = local_device()
    if device.type == "cpu":
        return device, torch.float32
    return device, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


TIMINGS = ".timings"  # seconds per finished sample, kept in the work folder for a resumed run


def run(p: Params, paths: ProjectPaths) -> StepResult:
    """Text -> (video, dense) for validation prompts, per task with the same prompts and seeds
    (the paper's multi-task protocol), plus the dense prediction *of* each real validation clip
    (the RGB half fixed to that clip) so the evaluation can score it against exact ground truth.

    Samples are written one by one (1,024 of them never sit in memory) into a work folder that an
    interrupted run resumes; the finished set replaces ``outputs/<profile>/samples`` at the end.
    ``sample.runtime_trials`` also times ours against the stock CogVideoX architecture (Tab 4).

    Under a launcher (``inference_launcher``) every rank loads the pipeline on its own GPU and makes
    the samples ``k`` with ``k % world == rank`` of the fixed (set, prompt) order, with the seed a
    one-process run gives them; rank 0 then writes the index, gallery, timings and metrics. A run
    resumes on any number of ranks: a finished sample is skipped whichever rank made it."""
    with inference_ranks() as ranks:
        return _run(p, paths, ranks)


def _run(p: Params, paths: ProjectPaths, ranks: Ranks) -> StepResult:
    from tqdm.auto import tqdm

    from udpdiff.acceleration import accelerate_pipeline
    from udpdiff.pipeline import UDPDiffPipeline

    s, d, te = p.active.sample, p.active.data, p.active.text_encoder
    device, dtype = inference_device(p)
    pipe = UDPDiffPipeline.from_pretrained(paths.pipeline, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    # compiled blocks (on CUDA by default) and the batched video + colormap decode; the first sample
    # pays the compile, which its timing (seconds_per_sample is a median) absorbs
    acceleration = accelerate_pipeline(pipe, p.active.acceleration)
    df = read_manifest(paths.manifest)
    rows = df[df.split == s.split].head(s.num_samples)
    if rows.empty:
        raise ValueError(f"{paths.manifest}: no clips in split {s.split!r} to take prompts from")
    if len(rows) < s.num_samples and ranks.is_main:
        logger.warning("sample.num_samples=%d but split %r has %d clips: sampling %d", s.num_samples, s.split,
                       len(rows), len(rows))
    names = sample_sets(p)
    work = _resumable_work_dir(paths.samples, _sample_fingerprint(p, paths, names), ranks)
    call = dict(num_frames=d.num_frames, height=d.height, width=d.width, num_inference_steps=s.num_inference_steps,
                guidance_scale=s.guidance_scale, max_sequence_length=te.max_length,
                segmentation_tolerance=p.active.pixelplanes.decode_tolerance)
    # the work items in their fixed order: set after set, prompt after prompt, each with its clip's seed
    items = [({"task": name, "clip_id": row.clip_id, "prompt": row.caption_long, "seed": sample_seed(p, i),
               "npz": f"{name}/{row.clip_id}.npz", "mp4": f"{name}/{row.clip_id}.mp4"}, row)
             for name in names for i, row in enumerate(rows.itertuples())]
    index = [entry for entry, _ in items]
    mine = [item for k, item in enumerate(items) if ranks.owns(k)]
    desc = "sample" if ranks.world == 1 else f"sample (rank {ranks.rank}/{ranks.world})"
    for entry, row in tqdm(mine, desc=desc, unit="video", disable=not ranks.is_main):
        name = entry["task"]
        task = None if name == RGB_ONLY else name
        stem = work / name / row.clip_id
        timing = _timing_file(work, entry)
        if Path(f"{stem}.npz").exists() and Path(f"{stem}.mp4").exists() and timing.exists():
            continue
        start = time.perf_counter()
        out = pipe(row.caption_long, task=task, generator=torch.Generator().manual_seed(entry["seed"]), **call)
        seconds = time.perf_counter() - start
        stem.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"video": out.videos[0]}
        if task is not None:
            real = read_clip(p, paths, row.video_path)  # one clip at a time
            members = s.dense_ensemble_size
            cond = pipe(row.caption_long, task=task, video=real, reconstruction_guidance=s.reconstruction_guidance,
                        generator=member_generators(entry["seed"], members), ensemble_size=members,
                        **{k: v for k, v in call.items() if k not in ("num_frames", "height", "width")}
                        | {"guidance_scale": s.guidance_for_real_clips()})
            arrays.update(colormap=out.colormaps[0], dense=out.dense[0], conditioned_colormap=cond.colormaps[0],
                          conditioned_dense=cond.dense[0])
            if members > 1:  # the first member alone is what one sample gives: the evaluation scores both
                arrays.update(conditioned_dense_single=cond.members[0, 0],
                              conditioned_colormap_single=cond.member_colormaps[0, 0],
                              conditioned_uncertainty=cond.uncertainty[0].astype(np.float16))
        # the mp4 is written last: an npz without its mp4 is an interrupted sample and is redone
        with atomic_path(f"{stem}.npz") as tmp:
            np.savez_compressed(tmp, **arrays)
        if task is None:
            viz.write_side_by_side(f"{stem}.mp4", [out.videos[0]], labels=["generated (RGB only)"], fps=d.fps)
        else:
            viz.write_side_by_side(f"{stem}.mp4",
                                   [out.videos[0], out.colormaps[0], dense_picture(task, out.dense[0])],
                                   labels=["generated", f"{task} colormap", "decoded"], fps=d.fps)
        write_text(timing, f"{seconds!r}\n")
    ranks.barrier()  # every sample is written (by whichever rank owned it)
    result = _publish(p, paths, work, names, index, pipe, acceleration) if ranks.is_main else StepResult()
    ranks.barrier()  # and every rank returns once rank 0 has put them in place
    return result


def _publish(p: Params, paths: ProjectPaths, work: Path, names: list[str], index: list[dict], pipe,
             acceleration) -> StepResult:
    """Rank 0, every sample written: galleries, runtime (Tab 4), the index; the work folder replaces
    ``outputs/<profile>/samples``."""
    s, d = p.active.sample, p.active.data
    missing = [e["npz"] for e in index if not _timing_file(work, e).exists()]
    if missing:
        raise RuntimeError(f"{work}: {len(missing)} samples missing after every rank finished ({missing[:3]}…); "
                           "on several nodes the work folder must be on a filesystem all of them share")
    seconds = [float(_timing_file(work, e).read_text()) for e in index]
    for name in names:
        _write_gallery(work, name, [e for e in index if e["task"] == name][: s.gallery_size], d)
    runtime = measure_runtime(p, pipe, index[0]["prompt"], names) if s.runtime_trials else {}  # the first prompt
    write_json(work / "index.json", index)
    # timings differ run to run: they go to the stage's metrics, never into the samples folder that
    # the evaluate stage depends on (equal samples must be equal bytes, or DVC re-evaluates for nothing)
    write_json(paths.metrics / "runtime.json", runtime)
    shutil.rmtree(work / TIMINGS)
    (work / "fingerprint.txt").unlink()
    for stray in [f for f in work.rglob(".*") if f.is_file()]:
        stray.unlink()  # the temporary file of a write a killed rank left half done
    replace_dir(work, paths.samples)
    metrics = {"seconds_per_sample": float(np.median(seconds)),
               "seconds_per_step": float(np.median(seconds)) / s.num_inference_steps,
               "compiled_blocks": float(acceleration.compiled_blocks),
               "attention_fa3": float(acceleration.attention.startswith("fa3")),
               "attention_float8": float(acceleration.attention == "fa3-fp8")}
    metrics.update({f"runtime/{k}/{m}": v for k, r in runtime.items() for m, v in r.items()})
    return StepResult(metrics=metrics, artifacts=[paths.samples / f"gallery_{n}.gif" for n in names])


def member_generators(seed: int, members: int) -> torch.Generator | list[torch.Generator]:
    """The generator of one sample, or of each of its ensemble members: the first one the sample's own, so
    its first member is the prediction one sample gives."""
    if members == 1:
        return torch.Generator().manual_seed(seed)
    seeds = [seed] + [int(np.random.SeedSequence([seed, k]).generate_state(1)[0]) for k in range(1, members)]
    return [torch.Generator().manual_seed(s) for s in seeds]


def _timing_file(work: Path, entry: dict) -> Path:
    """Written last for a finished sample: its seconds (and the mark that it is done)."""
    return work / TIMINGS / entry["task"] / f"{entry['clip_id']}.txt"


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
    CogVideoX; otherwise the profile's config randomly initialised (a timing baseline only). Its
    blocks are compiled when ours are (``acceleration``), so Tab 4 compares like with like."""
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    from udpdiff.acceleration import accelerate_pipeline
    from udpdiff.models.transformer import LATENT_CHANNELS, UDPDiffTransformer3DModel

    spec = p.active.transformer
    dtype, device = pipe.transformer.dtype, pipe.transformer.device
    if spec.pretrained:
        stock = CogVideoXTransformer3DModel.from_pretrained(spec.pretrained, subfolder="transformer",
                                                            torch_dtype=dtype)
    else:
        config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_") and k != "num_tasks"}
        config.update(in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS)
        stock = CogVideoXTransformer3DModel.from_config(config).to(dtype)
    # diffusers 0.42's CogVideoX declares no repeated blocks; they are the same CogVideoXBlock as ours
    stock._repeated_blocks = UDPDiffTransformer3DModel._repeated_blocks
    out = CogVideoXPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                            transformer=stock.to(device).eval(), scheduler=pipe.scheduler)
    # the same kernels, compile and approximations as ours: Tab 4 compares like with like
    accelerate_pipeline(out, p.active.acceleration)
    out.set_progress_bar_config(disable=True)
    return out


def measure_runtime(p: Params, pipe, prompt: str, names: list[str]) -> dict[str, dict[str, float]]:
    """Tab 4: median seconds per sample and per denoising step of the stock architecture and of ours
    (per sample set), same prompt, seed, size and steps. Each is run once untimed first (warm-up)."""
    from udpdiff.acceleration import compiled_blocks
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
    compiled = {"stock": compiled_blocks(stock.transformer), **dict.fromkeys(names, compiled_blocks(pipe.transformer))}
    return {k: {**time_calls(fn, s.runtime_trials, steps=s.num_inference_steps), "compiled_blocks": float(compiled[k])}
            for k, fn in runs.items()}
