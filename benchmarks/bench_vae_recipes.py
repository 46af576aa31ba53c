"""The autoencoder stage under several VAE training recipes, same data, same seeds: what each recipe's VAE
lets through (reconstruction PSNR, the dense ceilings ``gt_*_after_vae``) and what it costs in seconds.

    python benchmarks/bench_vae_recipes.py --profile tiny --seeds 1234 7 \\
        --recipe whole= --recipe crop24="vae.train.crop=[9,24,24]" "vae.train.batch_size=16" \\
        --out benchmarks/results/vae-recipes-tiny-vm.json

A recipe is a name and ``--set``-style overrides of the profile (``whole=`` is the profile as it is).
Each run is the stage itself (``udpdiff.stages.autoencoder.run``) in a scratch root of its own whose
``data/`` links the project's (``--data``: after ``dvc repro`` or ``small_gpu.py prepare``, the data and
encode stages' outputs), so it trains nothing of the project's. The JSON (and a markdown table beside it)
is rewritten after each run, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from benchmarks.common import machine_info, write_outputs  # noqa: E402
from udpdiff.config import load_params, parse_overrides  # noqa: E402
from udpdiff.paths import ProjectPaths  # noqa: E402

REPORTED = ("psnr_rgb", "psnr_segmentation", "psnr_depth", "gt_miou_after_vae", "gt_delta1_depth_after_vae")


def parse_recipe(text: str, more: list[str]) -> tuple[str, list[str]]:
    """``name=override`` plus any further overrides -> (name, overrides); ``name=`` has none."""
    name, _, first = text.partition("=")
    if not name:
        raise SystemExit(f"--recipe {text!r}: give it a name, NAME=KEY=VALUE or NAME=")
    return name, [o for o in (first, *more) if o]


def run_recipe(profile: str, data: Path, overrides: list[str], seed: int, scratch: Path) -> dict:
    from udpdiff.stages import autoencoder

    p = load_params(ROOT / "params.yaml", profile=profile).with_overrides(parse_overrides(overrides))
    p = p.model_copy(update={"seed": seed})
    scratch.mkdir(parents=True)
    (scratch / "data").symlink_to(data.resolve())
    start = time.perf_counter()
    metrics = autoencoder.run(p, ProjectPaths(scratch, profile)).metrics
    return {"seconds": time.perf_counter() - start, **{k: metrics[k] for k in REPORTED if k in metrics}}


def render_markdown(result: dict) -> str:
    machine = result["machine"].get("gpu", {}).get("name", f"{result['machine']['cpu_count']} CPU cores")
    head = f"# VAE training recipes, profile `{result['profile']}` ({machine})\n\n"
    if not result["rows"]:
        return head + "no rows yet\n"
    df = pd.DataFrame(result["rows"])
    df["overrides"] = df["overrides"].map(lambda o: " ".join(o) or "(the profile)")
    mean = df.groupby("recipe", sort=False)[["seconds", *[k for k in REPORTED if k in df]]].mean()
    return (head + df.to_markdown(index=False, floatfmt=".3f") + "\n\nMean over seeds:\n\n"
            + mean.to_markdown(floatfmt=".3f") + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--data", type=Path, default=ROOT / "data", help="the data folder to link (holds <profile>/)")
    ap.add_argument("--recipe", nargs="+", action="append", required=True, metavar="NAME=OVERRIDE",
                    help="a name and overrides (repeat for each recipe)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not (args.data / args.profile).is_dir():
        raise SystemExit(f"{args.data / args.profile}: no data for profile {args.profile} (run its data and "
                         "encode stages first)")
    recipes = [parse_recipe(r[0], r[1:]) for r in args.recipe]
    from udpdiff.devices import default_device

    device = default_device()
    result = {"machine": machine_info(device, ["diffusers"]), "profile": args.profile, "seeds": args.seeds, "rows": []}
    with tempfile.TemporaryDirectory(prefix="vae-recipes-") as tmp:
        for seed in args.seeds:
            for name, overrides in recipes:
                row = run_recipe(args.profile, args.data, overrides, seed, Path(tmp) / f"{name}-{seed}")
                result["rows"].append({"recipe": name, "seed": seed, "overrides": overrides, **row})
                print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
                write_outputs(result, args.out, render_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
