"""Seconds per training step with the batch prefetch on and off (``udpdiff.train.prefetched``).

``udpdiff.train.train`` builds each batch (latent draws, noise, timesteps: ``make_batch``) in a worker
thread while the previous one trains, on CUDA with cached latents. This times the profile's training
step both ways on the same latent cache, model, seeds and steps: runs alternate (on, off, off, on, ...)
so that clock drift and the compile cache (the first run pays Inductor's compile) fall on both alike,
and each run starts from step 0 in a fresh checkpoint folder. A run's step time is the median of its
``train.log_every`` windows after the first ``--skip`` steps (compile, allocator warm-up).
``make_batch`` is a pure function of (seed, step), so both modes train on the same batches: the JSON
records the largest difference between their per-step losses (0 on the CPU; GPU kernels may reorder
sums, so a small one there is rounding, a large one a bug).

    # on a GPU machine, after ``small_gpu.py prepare --root /tmp/small`` (the latents stage's cache):
    python3 benchmarks/bench_train_prefetch.py --root /tmp/small --set transformer.config.num_layers=6 \\
        --set train.micro_batch_size=32 --set train.gradient_checkpointing=false --out /tmp/out/train-prefetch.json
    # the same under ZeRO-0 (no gradient buckets or partitions: one GPU needs none), beside it:
    python3 benchmarks/bench_train_prefetch.py ... --set train.deepspeed_config=infra/deepspeed/zero0.json \\
        --out /tmp/out/train-prefetch-zero0.json
    # on the CPU, after make repro (tiny's cache; the worker competes with the model for the cores there):
    python3 benchmarks/bench_train_prefetch.py --root . --profile tiny --steps 12 --skip 4 --out /tmp/p.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import machine_info, write_outputs  # noqa: E402
from udpdiff.config import Params, load_params, parse_overrides  # noqa: E402

PACKAGES = ("diffusers", "deepspeed")


def bench_params(profile: str, sets: list[str], steps: int) -> Params:
    """The profile with ``sets``, trained for ``steps`` without previews and with one checkpoint at the end."""
    fixed = [f"train.steps={steps}", "train.sample_every=0", f"train.checkpoint_every={steps}"]
    return load_params(REPO / "params.yaml", profile=profile).with_overrides(parse_overrides(sets + fixed))


def timed_run(p: Params, latents: Path, train_ids: list[str], work: Path, prefetch: bool, skip: int,
              **train_kw: Any) -> dict[str, Any]:
    """One training run from step 0; its step time (median over the windows after ``skip`` steps) and losses."""
    from udpdiff.train import train

    t = p.active.train
    windows: list[float] = []

    def log_fn(metrics: dict[str, float], step: int) -> None:
        if step > skip and "samples_per_s" in metrics:
            windows.append(t.micro_batch_size * t.gradient_accumulation_steps / metrics["samples_per_s"])

    started = time.perf_counter()
    _, result = train(p, latents, train_ids, work, log_fn=log_fn, prefetch=prefetch, **train_kw)
    if not windows:
        raise SystemExit(f"no timing window after step {skip} of {t.steps} (train.log_every {t.log_every}): "
                         "give more --steps or a smaller --skip")
    return {"prefetch": prefetch, "seconds_per_step": statistics.median(windows), "windows": windows,
            "wall_s": time.perf_counter() - started, "losses": [h["loss"] for h in result.history]}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode: the median of its runs' step times; the saving; the largest per-step loss difference."""
    out: dict[str, Any] = {}
    for mode in (True, False):
        times = [r["seconds_per_step"] for r in runs if r["prefetch"] is mode]
        if times:
            out["on" if mode else "off"] = {"seconds_per_step": statistics.median(times), "runs": times}
    if "on" in out and "off" in out:
        on, off = out["on"]["seconds_per_step"], out["off"]["seconds_per_step"]
        out["saving_pct"] = 100.0 * (off - on) / off
        ref = next(r["losses"] for r in runs if r["prefetch"])
        out["loss_max_abs_diff"] = max(abs(a - b) for r in runs for a, b in zip(r["losses"], ref, strict=True))
    return out


def measure(p: Params, latents: Path, train_ids: list[str], repeats: int, skip: int, out: Path | None,
            modes: tuple[bool, ...] = (True, False), **train_kw: Any) -> dict[str, Any]:
    """``repeats`` pairs of runs in the order on, off, off, on, ... (``repeats`` runs of one mode if
    ``modes`` holds one); the JSON is rewritten after each run."""
    t = p.active.train
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    result: dict[str, Any] = {
        "machine": machine_info(device, PACKAGES), "profile": p.profile, "steps": t.steps, "skip": skip,
        "micro_batch_size": t.micro_batch_size, "num_layers": p.active.transformer.config.get("num_layers"),
        # what else sets the step's cost, so runs with other settings (e.g. ZeRO-0) read side by side
        "deepspeed_config": t.deepspeed_config, "precision": t.precision,
        "gradient_checkpointing": t.gradient_checkpointing, "clips": len(train_ids), "runs": []}
    order = [i % 4 in (0, 3) for i in range(2 * repeats)] if len(modes) == 2 else list(modes) * repeats
    with tempfile.TemporaryDirectory(prefix="bench-prefetch-") as tmp:
        for i, prefetch in enumerate(order):
            run = timed_run(p, latents, train_ids, Path(tmp) / f"run{i}", prefetch, skip, **train_kw)
            result["runs"].append(run)
            result["summary"] = summarise(result["runs"])
            print(f"run {i + 1}/{len(order)}: prefetch {'on ' if prefetch else 'off'} "
                  f"{run['seconds_per_step'] * 1e3:.1f} ms/step ({run['wall_s']:.0f} s)", flush=True)
            if out is not None:
                write_outputs(result, out, render_markdown)
    return result


def profiled_run(p: Params, latents: Path, train_ids: list[str], work: Path, skip: int, active: int,
                 out: Path, **train_kw: Any) -> dict[str, Any]:
    """One run (prefetch as the training default) under ``torch.profiler`` for ``active`` steps after
    ``skip``: where a step's time goes. ``gpu_busy`` is the device's kernel and copy time over the
    wall-clock time of the same steps: well below 1 means the GPU waits for the host (launches,
    synchronising reads, Python) and a faster kernel would not shorten the step. Writes the summary
    JSON to ``out``, the op tables beside it (``.md``) and a Chrome trace (``.trace.json.gz``)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, schedule

    from udpdiff.io.atomic import write_text
    from udpdiff.train import train

    n = skip + 2 + active + 1  # log_fn is called after every step (log_every 1): the profiler's step
    p = p.with_overrides(parse_overrides(["train.log_every=1", f"train.steps={n}", f"train.checkpoint_every={n}"]))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    marks: list[float] = []
    with profile(activities=activities, schedule=schedule(wait=skip, warmup=2, active=active, repeat=1),
                 on_trace_ready=lambda prof: prof.export_chrome_trace(str(out.with_suffix(".trace.json.gz")))) as prof:
        def log_fn(metrics: dict[str, float], step: int) -> None:
            if skip + 2 <= step <= skip + 2 + active:  # the ends of the active steps
                marks.append(time.perf_counter())
            prof.step()

        train(p, latents, train_ids, work, log_fn=log_fn, **train_kw)
    events = prof.key_averages()
    # device-side events only (kernels, copies, memsets): an op's row repeats its kernels' time
    device_us = sum(e.self_device_time_total for e in events
                    if e.device_type != DeviceType.CPU and not e.is_user_annotation)
    wall_s = (marks[-1] - marks[0]) / (len(marks) - 1)
    result = {"active_steps": active, "skip": skip, "wall_ms_per_step": wall_s * 1e3,
              "device_ms_per_step": device_us / active / 1e3, "gpu_busy": device_us / active / 1e6 / wall_s,
              "top_device": [{"op": e.key, "ms_per_step": e.self_device_time_total / active / 1e3, "calls": e.count}
                             for e in sorted(events, key=lambda e: -e.self_device_time_total)[:40]],
              "top_cpu": [{"op": e.key, "ms_per_step": e.self_cpu_time_total / active / 1e3, "calls": e.count}
                          for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:40]]}
    write_text(out, json.dumps(result, indent=2) + "\n")
    write_text(out.with_suffix(".md"), "\n\n".join(
        [f"wall {result['wall_ms_per_step']:.1f} ms/step, device {result['device_ms_per_step']:.1f} ms/step, "
         f"GPU busy {result['gpu_busy']:.2f}",
         events.table(sort_by="self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total",
                      row_limit=40),
         events.table(sort_by="self_cpu_time_total", row_limit=40)]) + "\n")
    print(f"profile: {result['wall_ms_per_step']:.1f} ms/step wall, {result['device_ms_per_step']:.1f} on the "
          f"device (busy {result['gpu_busy']:.2f}) -> {out}", flush=True)
    return result


def render_markdown(r: dict[str, Any]) -> str:
    s = r.get("summary", {})
    gpu = r["machine"].get("gpu", {}).get("name", r["machine"]["device"])
    lines = [f"# Training step with and without the batch prefetch ({gpu})", "",
             f"Profile `{r['profile']}`, {r['num_layers']} layers, batch {r['micro_batch_size']}, {r['steps']} steps "
             f"per run (first {r['skip']} left out), {len(r['runs'])} runs alternating; "
             f"`{r['deepspeed_config']}`, {r['precision']}, "
             f"activation checkpointing {r['gradient_checkpointing']}.", ""]
    table = pd.DataFrame([{"prefetch": key, "ms per step (median of runs)": s[key]["seconds_per_step"] * 1e3,
                           "runs": ", ".join(f"{x * 1e3:.1f}" for x in s[key]["runs"])}
                          for key in ("on", "off") if key in s])
    if not table.empty:
        lines.append(table.to_markdown(index=False, floatfmt=".1f"))
    if "saving_pct" in s:
        lines += ["", f"Saving: {s['saving_pct']:.1f} % of the step. Largest per-step loss difference between "
                      f"runs: {s['loss_max_abs_diff']:.2e}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="project root whose latents stage has run")
    ap.add_argument("--profile", default="small")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=150, help="steps per run")
    ap.add_argument("--skip", type=int, default=30, help="steps left out of each run's median")
    ap.add_argument("--repeats", type=int, default=2, help="pairs of runs (on/off)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (a .md table is written beside it)")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="then one run under torch.profiler for this many steps after --skip (its JSON: "
                         "--out with a -profile suffix); 0: none")
    ap.add_argument("--profile-only", action="store_true", help="only the profiled run")
    ap.add_argument("--modes", choices=("on,off", "on", "off"), default="on,off",
                    help="prefetch modes to time (one mode: --repeats runs of it)")
    args = ap.parse_args(argv)

    from udpdiff.io.manifest import read_manifest
    from udpdiff.models.scheduler import build_scheduler
    from udpdiff.paths import ProjectPaths
    from udpdiff.stages.loading import load_vae
    from udpdiff.train import resolve_config_path

    p = bench_params(args.profile, args.sets, args.steps)
    paths = ProjectPaths(args.root.resolve(), p.profile)
    if not paths.latents.is_dir():
        raise SystemExit(f"{paths.latents}: no latent cache; run the latents stage (small_gpu.py prepare) first")
    df = read_manifest(paths.manifest)
    vae = load_vae(p, paths)
    train_ids = df[df.split == "train"].clip_id.tolist()
    kw = {"scaling_factor": float(vae.config.scaling_factor),
          "vae_scale_spatial": 2 ** (len(vae.config.block_out_channels) - 1),
          "scheduler": build_scheduler(p.active.scheduler.model_dump(), p.active.transformer.pretrained),
          "ds_config": resolve_config_path(p.active.train.deepspeed_config, REPO)}
    if not args.profile_only:
        modes = tuple(m == "on" for m in args.modes.split(","))
        measure(p, paths.latents, train_ids, args.repeats, args.skip, args.out, modes=modes, **kw)
    if args.profile_steps or args.profile_only:
        out = args.out or Path("train-prefetch.json")
        with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
            profiled_run(p, paths.latents, train_ids, Path(tmp), args.skip, args.profile_steps or 10,
                         out.with_name(out.stem + "-profile.json"), **kw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
