"""The ``small`` profile on a GPU machine that has the model stack but not the orchestration tools.

The lent GPU machines have torch, diffusers and DeepSpeed but no DVC, Prefect or MLflow (and no
network to install them), so this runs the very stage modules ``dvc repro`` runs
(``udpdiff.stages.<name>.run``), in the same order, on the same paths, with every metric and
per-step series written to files. ``python -m flows import-run <tarball(s)>`` then logs those
files to MLflow as a Tab 1/2 ablation (a parent run, one child per variant), here.

    python3 benchmarks/small_gpu.py prepare --root /tmp/small        # data, encode, autoencoder, latents
    python3 benchmarks/small_gpu.py variants --root /tmp/small       # the tab1-2 variants over every GPU
    python3 benchmarks/small_gpu.py variants --root /tmp/small --gpus-per-variant 2   # each on 2 GPUs (torchrun)
    python3 benchmarks/small_gpu.py pack --root /tmp/small --out results.tar.gz   # + results-2.tar.gz, ... if big
    python3 benchmarks/small_gpu.py all --root /tmp/small --out ...  # all three (resumes what is done)
    python3 benchmarks/small_gpu.py save-vae --root /tmp/small --out vae.tar      # carry it to a fresh machine
    python3 benchmarks/small_gpu.py restore-vae --root /tmp/small --vae vae.tar   # there: prepare skips the VAE

Each variant (params.yaml ``ablations.tab1-2``) trains, samples and evaluates in a workspace of its
own (``<root>/variants/<name>``) that links the shared data, VAE, text encoder and latent cache, as
its DVC experiment would have them; one process per training run, handed to GPUs as they free up.
Variants whose settings differ only in ``sample.*`` (the reconstruction-guidance table; or two tables'
names for the profile's own settings) share one training run, as DVC's run cache would share it: the
first trains, the others sample its model. Every stage
resumes (training from its last checkpoint, sampling from its last sample), and a finished stage
is skipped, so a second ``all`` after an interruption finishes the work.
``--set key=value`` (YAML values) overrides profile keys for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from udpdiff.config import Params, load_params, parse_overrides  # noqa: E402
from udpdiff.distributed import launched, top_level_env  # noqa: E402
from udpdiff.paths import ProjectPaths  # noqa: E402
from udpdiff.stages import stage_launcher  # noqa: E402

PROFILE = "small"
TABLES = ["tab1-2"]  # the paper's Tabs 1-2 at equal compute; `--tables tab1-2 rgb-given` adds ours
PREPARE = ("data", "encode", "autoencoder", "latents")
PER_VARIANT = ("train", "sample", "evaluate", "report")
SHARED = ("data/{p}", "models/{p}/vae", "models/{p}/text_encoder")  # what every variant links, not redoes
# what comes back (small files: the models and samples stay on the GPU machine)
DENSE_PREDICTIONS = "dense_predictions.npz"  # metrics/: see dense_predictions()
PACKED = ("*.json", "*.jsonl", "*.csv", "*.md", "*.html", "*.png", "*.gif", DENSE_PREDICTIONS)


def load(overrides: list[str], ranks: int = 1) -> Params:
    """The profile with ``overrides``; with ``ranks`` > 1 the train, sample and evaluate stages run
    under torchrun on that many GPUs (``train_launcher``, ``inference_launcher``, as ``python -m
    flows`` runs them; ``--standalone`` picks a free port, so several such variants can run at once)."""
    p = load_params(REPO / "params.yaml", profile=PROFILE).with_overrides(parse_overrides(overrides))
    if ranks == 1:
        return p
    launcher = f"{shlex.quote(sys.executable)} -m torch.distributed.run --standalone --nproc_per_node {ranks} -m"
    return Params.model_validate({**p.model_dump(), "train_launcher": launcher, "inference_launcher": launcher})


def variants(p: Params, tables: list[str]) -> dict[str, dict]:
    """The tables' variants, the full method first (the run the others are compared with). A
    variant named in several tables is one run, so it must mean the same settings in each."""
    out: dict[str, dict] = {}
    for table in tables:
        if table not in p.ablations:
            raise SystemExit(f"params.yaml has no ablation {table!r}; there are: {', '.join(p.ablations)}")
        for name, overrides in p.ablations[table].variants.items():
            if name in out and out[name] != dict(overrides):
                raise SystemExit(f"variant {name!r} means {out[name]} in one table and {dict(overrides)} in "
                                 f"{table!r}: one workspace cannot be both")
            out[name] = dict(overrides)
    return dict(sorted(out.items(), key=lambda kv: kv[0] != "udpdiff-multi-task"))


def done_marker(paths: ProjectPaths, stage: str) -> Path:
    return paths.outputs / "gpu_run" / f"{stage}.done.json"


def step_series(path: Path) -> Callable[[dict[str, float], int], None]:
    """An appender of per-step records to the JSONL ``path``. A resumed stage redoes the steps after
    its last checkpoint, so its first record drops those the interrupted process had logged from that
    step on: the series reads as one run, without a second value for any step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    first = True

    def append(metrics: dict[str, float], step: int) -> None:
        nonlocal first
        if first and path.exists():
            from udpdiff.io.atomic import write_text

            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] < step]
            write_text(path, "".join(f"{line}\n" for line in kept))
        first = False
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}, default=float) + "\n")

    return append


def run_stage(p: Params, paths: ProjectPaths, stage: str, relaunch: list[str] | None = None) -> dict:
    """One stage as ``python -m flows stage`` runs it, minus Prefect and MLflow: its metrics JSON
    (``outputs/<p>/metrics/<stage>.json``, as DVC reads it), its per-step series (JSONL) and its wall time.
    A stage with a launcher (:func:`load`'s ``ranks``) runs under it as ``small_gpu.py stage`` with
    ``relaunch``'s arguments (which name the variant); its rank 0 writes what one process would."""
    import importlib

    from udpdiff.stages.common import write_json

    marker = done_marker(paths, stage)
    if marker.exists():
        print(f"[{paths.root.name}] {stage}: done before, skipped", flush=True)
        return json.loads(marker.read_text())
    if not launched() and (launcher := stage_launcher(p, stage)) is not None:
        return launch_stage(paths, stage, launcher, relaunch)
    main_rank = int(os.environ.get("RANK", 0)) == 0
    append = step_series(paths.outputs / "gpu_run" / f"{stage}_steps.jsonl")

    def log_fn(metrics: dict[str, float], step: int) -> None:  # the stages call it on rank 0 only
        append(metrics, step)
        if any(k.startswith("val/") for k in metrics) or step % 100 == 0:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float | int))
            print(f"[{paths.root.name}] {stage} step {step}: {shown}", flush=True)

    run_fn = importlib.import_module(f"udpdiff.stages.{stage}").run
    kwargs = {"log_fn": log_fn} if stage in ("autoencoder", "train") else {}
    if main_rank:
        print(f"[{paths.root.name}] {stage}: starting", flush=True)
    start = time.perf_counter()
    result = run_fn(p, paths, **kwargs)
    seconds = time.perf_counter() - start
    record = {"stage": stage, "seconds": seconds, "metrics": result.metrics, "gpu": gpu_name(),
              "ranks": int(os.environ.get("WORLD_SIZE", 1)) if launched() else 1,
              "artifacts": [str(a.relative_to(paths.root)) for a in result.artifacts if a.is_relative_to(paths.root)]}
    if not main_rank:
        return record
    write_json(paths.metrics / f"{stage}.json", result.metrics)
    if stage == "train" and result.metrics.get("steps_done", 0) < p.active.train.steps:
        print(f"[{paths.root.name}] train stopped at step {result.metrics.get('steps_done')}: run again to resume",
              flush=True)
        return record
    write_json(marker, record)
    print(f"[{paths.root.name}] {stage}: done in {seconds:.0f} s", flush=True)
    return record


def launch_stage(paths: ProjectPaths, stage: str, launcher: str, relaunch: list[str] | None) -> dict:
    """``stage`` under ``launcher``: every rank runs ``small_gpu.py stage STAGE <relaunch>``; the
    record its rank 0 wrote (the done marker, or the metrics of a training that stopped early)."""
    if relaunch is None:
        raise SystemExit(f"{paths.root.name}: {stage} has a launcher ({launcher!r}) but no variant to relaunch")
    cmd = [*shlex.split(launcher), "benchmarks.small_gpu", "stage", stage, *relaunch]
    print(f"[{paths.root.name}] {stage}: launching {' '.join(cmd)}", flush=True)
    if (code := subprocess.call(cmd, cwd=REPO, env=top_level_env())) != 0:
        raise SystemExit(f"{paths.root.name}: {stage} under {launcher!r} failed with exit code {code}")
    marker = done_marker(paths, stage)
    if marker.exists():
        return json.loads(marker.read_text())
    return {"stage": stage, "metrics": json.loads((paths.metrics / f"{stage}.json").read_text())}


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def variant_root(root: Path, name: str, p: Params) -> Path:
    """``<root>/variants/<name>``, a workspace whose shared inputs are links into ``root``."""
    vroot = root / "variants" / name
    for rel in SHARED:
        rel = rel.format(p=p.profile)
        link = vroot / rel
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((root / rel).resolve(), target_is_directory=True)
    return vroot


def prepare(root: Path, overrides: list[str]) -> None:
    from udpdiff.stages.common import write_json

    p = load(overrides)
    paths = ProjectPaths(root, p.profile)
    if not done_marker(paths, "autoencoder").exists():
        # what the VAE is about to be trained for, with this run's --set: save-vae carries it with the VAE
        write_json(paths.outputs / "gpu_run" / "autoencoder.inputs.json", vae_inputs(p))
    for stage in PREPARE:
        run_stage(p, paths, stage)


def dense_predictions(paths: ProjectPaths) -> Path | None:
    """The dense maps predicted for the real clips (RGB half given), every task, in one small file
    that comes back with the run: the sample stage's .npz files hold the videos too (~3 MB each for
    ``small``), too big to pack, and the scores alone cannot say why one clip fails (the clips and
    their ground truth regenerate from the seed on any machine, so they are not needed). Written as
    soon as the sample stage ends: a run whose evaluate stage is lost with the machine (attempt 27)
    is still scored here, by small_seg_errors.py and small_depth_errors.py. An ensembled
    prediction (``sample.dense_ensemble_size``) adds its first member alone (``<task>_single/<clip>``,
    e.g. ``depth_single/``) and the members' disagreement (``<task>_uncertainty/<clip>``)."""
    import numpy as np

    arrays = {}
    for f in sorted(paths.samples.glob("*/*.npz")):
        with np.load(f) as sample:
            task = f.parent.name
            for key, prefix in (("conditioned_dense", task), ("conditioned_dense_single", f"{task}_single"),
                                ("conditioned_uncertainty", f"{task}_uncertainty")):
                if key in sample.files:
                    dense = sample[key]
                    kind = np.float16 if dense.dtype.kind == "f" else np.int32
                    arrays[f"{prefix}/{f.stem}"] = dense.astype(kind)
    if not arrays:
        return None
    from udpdiff.io.atomic import atomic_path

    out = paths.metrics / DENSE_PREDICTIONS
    with atomic_path(out) as tmp:
        np.savez_compressed(tmp, **arrays)
    return out


def variant_params(root: Path, name: str, base: Params, tables: list[str]) -> tuple[Params, ProjectPaths]:
    """``name``'s params (the tables' ``base`` with its overrides) and its workspace's paths."""
    p = base.with_overrides(variants(base, tables)[name])
    return p, ProjectPaths(variant_root(root, name, p), p.profile)


def relaunch_args(root: Path, name: str, overrides: list[str], tables: list[str], ranks: int) -> list[str]:
    """What ``small_gpu.py stage STAGE`` needs to rebuild ``name``'s params on every rank."""
    return [name, "--root", str(root), "--tables", *tables, *[a for kv in overrides for a in ("--set", kv)],
            "--gpus-per-variant", str(ranks)]


def variant_info(paths: ProjectPaths) -> Path:
    """The workspace's record of what it is: its tables, overrides and ``trained_by`` (read by import-run)."""
    return paths.outputs / "gpu_run" / "variant.json"


def write_variant_info(paths: ProjectPaths, base: Params, name: str, tables: list[str], overrides: list[str],
                       ranks: int, trained_by: str | None = None) -> None:
    """:func:`variant_info` for this call. A run of another table that shares the variant keeps the
    earlier tables (the workspace belongs to all), and a model it sampled from another variant's
    training stays that one's unless ``trained_by`` says otherwise."""
    from udpdiff.stages.common import write_json

    info = variant_info(paths)
    earlier = json.loads(info.read_text()) if info.exists() else {}
    mine = [t for t in tables if name in base.ablations[t].variants]
    trained_by = trained_by or earlier.get("trained_by")
    write_json(info, {"tables": list(dict.fromkeys([*earlier.get("tables", []), *mine])), "variant": name,
                      "overrides": variants(base, tables)[name], "profile_overrides": overrides, "gpus": ranks,
                      **({"trained_by": trained_by} if trained_by else {})})


def run_variant(root: Path, name: str, overrides: list[str], tables: list[str], ranks: int = 1) -> None:
    base = load(overrides, ranks)
    p, paths = variant_params(root, name, base, tables)
    write_variant_info(paths, base, name, tables, overrides, ranks)
    relaunch = relaunch_args(root, name, overrides, tables, ranks)
    for stage in PER_VARIANT:
        record = run_stage(p, paths, stage, relaunch)
        if stage == "train" and not done_marker(paths, "train").exists():
            raise SystemExit(f"{name}: training unfinished ({record['metrics'].get('steps_done')} steps)")
        if stage == "sample":
            dense_predictions(paths)


def train_key(base: Params, overrides: dict) -> str:
    """What a variant trains: the settings ``overrides`` give ``base``, less the sampling ones
    (``sample.*``). Variants of one key share one training run, as DVC's run cache shares the train
    stage between experiments of equal settings: under ``small`` Tabs 1-2's multi-task variant (the
    profile's own settings) and model-size's 6-layer one (which names them) are one training."""
    q = base.with_overrides({k: v for k, v in overrides.items() if not k.startswith("sample.")})
    settings = {"profile": q.profile, "seed": q.seed, **q.active.model_dump(mode="json", exclude={"sample"})}
    return json.dumps(settings, sort_keys=True, default=str)


def resample_variant(root: Path, name: str, trained: str, overrides: list[str], tables: list[str],
                     ranks: int = 1) -> None:
    """``name``'s sample, evaluate and report stages on the model ``trained`` (a variant of the same
    :func:`train_key`, already trained): its pipeline is linked and its training records copied in."""
    import shutil

    base = load(overrides, ranks)
    table = variants(base, tables)
    if train_key(base, table[name]) != train_key(base, table[trained]):
        raise SystemExit(f"{name} and {trained} differ in more than sample.*: {name} needs its own training")
    p, paths = variant_params(root, name, base, tables)
    src = ProjectPaths(root / "variants" / trained, p.profile)
    if not done_marker(src, "train").exists():
        raise SystemExit(f"{name}: {trained} has not finished training")
    if not paths.pipeline.exists():
        paths.pipeline.parent.mkdir(parents=True, exist_ok=True)
        paths.pipeline.symlink_to(src.pipeline.resolve(), target_is_directory=True)
    for f in [*src.metrics.glob("train*"), *src.metrics.glob("validation*"), *(src.outputs / "gpu_run").glob("train*")]:
        dest = paths.root / f.relative_to(src.root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest)
    write_variant_info(paths, base, name, tables, overrides, ranks, trained_by=trained)
    relaunch = relaunch_args(root, name, overrides, tables, ranks)
    for stage in PER_VARIANT[1:]:
        run_stage(p, paths, stage, relaunch)
        if stage == "sample":
            dense_predictions(paths)


def run_variants(root: Path, overrides: list[str], names: list[str] | None, gpus: int, per_gpu: int = 1,
                 tables: list[str] = TABLES, gpus_per_variant: int = 1) -> int:
    """Every variant in its own process, ``per_gpu`` of them on each of ``gpus`` GPUs at a time, or
    each on ``gpus_per_variant`` GPUs of its own (data parallel under torchrun, :func:`load`);
    returns the number that failed. Each process gets its share of the CPU cores for its thread
    pools (as torchrun does): 4 processes with a pool of every core each spent their time in
    thread contention, not on the GPU (benchmarks/results/small-h200x2-attempt1.md)."""
    from udpdiff.workers import available_cores

    if gpus_per_variant > 1 and (per_gpu != 1 or gpus_per_variant > gpus):
        raise SystemExit(f"--gpus-per-variant {gpus_per_variant}: needs as many GPUs (there are {gpus}) "
                         f"and --per-gpu 1 (not {per_gpu})")
    base = load(overrides)
    table = variants(base, tables)
    groups: dict[str, list[str]] = {}  # one process per training run: the first trains, the rest resample
    for name in names or list(table):
        groups.setdefault(train_key(base, table[name]), []).append(name)
    queue, running, failed = list(groups.values()), {}, 0
    # the GPUs each process gets ("0", or "0,1" with two GPUs per variant)
    free = [",".join(str(slot % gpus + k) for k in range(gpus_per_variant))
            for slot in range(0, gpus * per_gpu - gpus_per_variant + 1, gpus_per_variant)]
    threads = max(1, available_cores() // (len(free) * gpus_per_variant))
    while queue or running:
        while queue and free:
            gpu, group = free.pop(0), queue.pop(0)
            name = " + ".join(group)
            log = root / "logs" / f"{group[0]}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, __file__, "variant", *group, "--root", str(root), "--tables", *tables,
                   *[a for kv in overrides for a in ("--set", kv)], "--gpus-per-variant", str(gpus_per_variant)]
            env = top_level_env(CUDA_VISIBLE_DEVICES=gpu, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads))
            print(f"variant {name} on GPU {gpu} (log {log})", flush=True)
            running[subprocess.Popen(cmd, env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT)] = (name, gpu)
        time.sleep(0.2)  # a finished variant frees its GPU for the next at once (CPU variants end in seconds)
        for proc in [q for q in running if q.poll() is not None]:
            name, gpu = running.pop(proc)
            free.append(gpu)
            print(f"variant {name} finished with exit code {proc.returncode}", flush=True)
            failed += proc.returncode != 0
    return failed


def volume_path(out: Path, index: int) -> Path:
    """``small.tar.gz``, ``small-2.tar.gz``, ...: the volumes :func:`pack` writes."""
    if index == 1:
        return out
    stem, dot, ext = out.name.partition(".")
    return out.with_name(f"{stem}-{index}{dot}{ext}")


def pack(root: Path, out: Path, max_bytes: int = 15 * 2**20, max_volumes: int = 6) -> list[Path]:
    """The small files of the run (metrics, series, tables, plots, galleries) as self-contained
    tarballs of at most ``max_bytes`` each (the device returns files up to 16 MiB, 8 per call; one
    slot is the VAE's), smallest files first so the first volume holds every metric. A file that
    fits in no volume (the biggest galleries) is left out and named; attempt 3's one tarball of
    21 MiB did not come back at all."""
    files = sorted({f for pattern in PACKED for f in root.rglob(pattern)
                    if f.is_file() and "checkpoints" not in f.parts and "latents" not in f.parts
                    and ".tmp-" not in str(f)})
    files += sorted((root / "logs").glob("*.log")) if (root / "logs").exists() else []
    capacity = int(max_bytes * 0.98)  # gzip can grow incompressible gifs a little
    volumes: list[list[Path]] = []
    sizes: list[int] = []
    for f in sorted(files, key=lambda f: (f.stat().st_size, str(f))):
        size = f.stat().st_size + 1024  # its tar header and padding
        room = next((i for i, used in enumerate(sizes) if used + size <= capacity), None)
        if room is None and len(volumes) < max_volumes and size <= capacity:
            volumes.append([])
            sizes.append(0)
            room = len(volumes) - 1
        if room is None:
            print(f"not packed ({size / 2**20:.1f} MiB, no room in {max_volumes} volumes of "
                  f"{max_bytes / 2**20:.0f} MiB): {f.relative_to(root)}", flush=True)
            continue
        volumes[room].append(f)
        sizes[room] += size
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for index, members in enumerate(volumes or [[]], start=1):
        path = volume_path(out, index)
        with tarfile.open(path, "w:gz") as tar:
            for f in members:
                tar.add(f, arcname=str(f.relative_to(root)))
        print(f"packed {len(members)} files, {path.stat().st_size / 2**20:.1f} MiB -> {path}", flush=True)
        written.append(path)
    return written


def vae_inputs(p: Params) -> dict:
    """What the trained VAE depends on: a carried VAE is only reused for the same values. The decode
    tolerance is not among them: it reads colormaps, it does not make the ones the VAE learns."""
    a = p.active
    return {"seed": p.seed, "data": a.data.model_dump(), "pixelplanes": a.pixelplanes.model_dump(
            exclude={"decode_tolerance"}), "vae": a.vae.model_dump(), "tasks": list(a.train.tasks)}


def vae_files(paths: ProjectPaths) -> list[Path]:
    run = paths.outputs / "gpu_run"
    return [paths.vae, done_marker(paths, "autoencoder"), run / "autoencoder_steps.jsonl",
            paths.metrics / "autoencoder.json", paths.metrics / "vae_loss.png", run / "autoencoder.inputs.json"]


def save_vae(root: Path, out: Path, overrides: list[str]) -> Path | None:
    """The trained VAE and its stage record as a tarball (about 15 MB for ``small``), so a fresh
    machine skips the autoencoder stage: the data regenerate byte for byte from the seed, the latent
    cache from data and VAE, but the VAE would take minutes of the session's GPU time to retrain."""
    p = load(overrides)
    paths = ProjectPaths(root, p.profile)
    if not done_marker(paths, "autoencoder").exists():
        print("no trained VAE yet: nothing to save", flush=True)
        return None
    from udpdiff.stages.common import write_json

    record = paths.outputs / "gpu_run" / "autoencoder.inputs.json"
    if not record.exists():  # a VAE trained before prepare recorded its inputs: the profile as it is
        write_json(record, vae_inputs(p))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w") as tar:
        for f in vae_files(paths):
            tar.add(f, arcname=str(f.relative_to(root)))
    print(f"saved the VAE: {out.stat().st_size / 2**20:.1f} MiB -> {out}", flush=True)
    return out


def with_unset_fields(saved: dict, now: dict) -> dict:
    """``saved`` with the fields it lacks and ``now`` leaves unset (None) added: a field added to the
    config after a VAE was saved (``vae.train.crop``) defaults to the behaviour that trained it."""
    out = dict(saved)
    for key, value in now.items():
        if key not in out and value is None:
            out[key] = None
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = with_unset_fields(out[key], value)
    return out


def as_if_trained_on(saved: dict, now: dict, tarball: Path) -> dict:
    """``saved`` (a VAE's record) with ``now``'s ``data.num_clips``, for a VAE trained on the first
    clips of a smaller synthetic set (``restore-vae --vae-from-fewer-clips``): clip *i* is the same clip
    at any size, so only the count differs; refused where the larger set holds out a clip that VAE
    trained on (it would have seen a validation clip)."""
    from udpdiff.data.synthetic import train_clips_held_out_when_grown

    before, after = saved.get("data", {}), now["data"]
    trained_on = before.get("num_clips")
    if before.get("source") != "synthetic" or trained_on is None or trained_on >= after["num_clips"]:
        return saved  # not fewer clips of the same generator: the plain comparison decides
    seen = train_clips_held_out_when_grown(now["seed"], before["num_clips"], after["num_clips"],
                                           after["val_fraction"])
    if seen:
        raise SystemExit(f"{tarball}: its VAE trained on {len(seen)} clip(s) that {after['num_clips']} clips hold out "
                         f"for validation ({', '.join(seen[:5])}); retrain it (delete the tarball)")
    print(f"{tarball}: the VAE was trained on the first {before['num_clips']} of these {after['num_clips']} clips "
          f"(none of them held out now); its record says so", flush=True)
    return {**saved, "data": {**before, "num_clips": after["num_clips"]}}


def restore_vae(root: Path, tarball: Path, overrides: list[str], fewer_clips: bool = False) -> None:
    """Put a :func:`save_vae` tarball under ``root``, refusing one trained for other settings (with
    ``fewer_clips``, a VAE of the first clips of a smaller synthetic set is taken: a data-size run then
    changes the transformer's data alone). The tarball's record stays as it was trained."""
    p = load(overrides)
    paths = ProjectPaths(root, p.profile)
    with tarfile.open(tarball) as tar:
        saved_inputs = json.load(tar.extractfile(str((paths.outputs / "gpu_run" / "autoencoder.inputs.json")
                                                     .relative_to(root))))
        saved_inputs["pixelplanes"].pop("decode_tolerance", None)  # recorded by earlier versions
        now = vae_inputs(p)
        compared = as_if_trained_on(saved_inputs, now, tarball) if fewer_clips else saved_inputs
        if with_unset_fields(compared, now) != now:
            hint = "" if fewer_clips else " (or, for a VAE of fewer clips of this data, pass --vae-from-fewer-clips)"
            raise SystemExit(f"{tarball}: the VAE in it was trained for other settings than these; delete it to "
                             f"retrain{hint}. Saved: {saved_inputs}; now: {now}")
        tar.extractall(root, filter="data")
    print(f"restored the trained VAE from {tarball}: the autoencoder stage will be skipped", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["prepare", "variant", "variants", "pack", "all", "save-vae", "restore-vae",
                                        "stage"])
    ap.add_argument("names", nargs="*", help="command variant: the variant to train, then variants that differ "
                                             "from it only in sample.* (sampled with its model); command stage "
                                             "(what a launcher's ranks run): STAGE VARIANT")
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=None,
                    help="tarball of the small outputs (pack, all; volumes NAME, NAME-2, ... past 15 MiB) "
                         "or of the trained VAE (save-vae)")
    ap.add_argument("--vae", type=Path, default=None, help="a save-vae tarball to restore (restore-vae)")
    ap.add_argument("--vae-from-fewer-clips", action="store_true",
                    help="restore-vae: take a VAE trained on the first clips of a smaller synthetic set (a data-size "
                         "run; refused if the larger set holds out a clip it trained on)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--variants", nargs="+", default=None)
    ap.add_argument("--tables", nargs="+", default=TABLES, help="params.yaml ablations whose variants run")
    ap.add_argument("--gpus", type=int, default=None, help="default: every visible GPU")
    ap.add_argument("--per-gpu", type=int, default=1, help="variants sharing one GPU at a time")
    ap.add_argument("--gpus-per-variant", type=int, default=1,
                    help="GPUs each variant trains, samples and evaluates on (data parallel; train.micro_batch_size "
                         "is per GPU, so halve it on 2 GPUs for the same global batch)")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    if args.command == "save-vae":
        save_vae(root, args.out, args.overrides)
        return 0
    if args.command == "restore-vae":
        restore_vae(root, args.vae, args.overrides, args.vae_from_fewer_clips)
        return 0
    if args.command == "variant":
        if not args.names:
            ap.error("variant: name the variant")
        run_variant(root, args.names[0], args.overrides, args.tables, args.gpus_per_variant)
        for name in args.names[1:]:
            resample_variant(root, name, args.names[0], args.overrides, args.tables, args.gpus_per_variant)
        return 0
    if args.command == "stage":
        if len(args.names) != 2:
            ap.error("stage: STAGE VARIANT")
        stage, name = args.names
        run_stage(*variant_params(root, name, load(args.overrides, args.gpus_per_variant), args.tables), stage)
        return 0
    if args.command in ("prepare", "all"):
        prepare(root, args.overrides)
    failed = 0
    if args.command in ("variants", "all"):
        import torch

        gpus = args.gpus or max(torch.cuda.device_count(), 1)
        failed = run_variants(root, args.overrides, args.variants, gpus, args.per_gpu, args.tables,
                              args.gpus_per_variant)
    if args.command in ("pack", "all") and args.out is not None:
        pack(root, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
