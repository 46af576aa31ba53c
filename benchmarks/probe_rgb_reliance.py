"""Does a trained transformer predict the dense half *from the RGB half*? (issue 12's question)

Dense prediction of a real clip fixes the RGB half (``UDPDiffPipeline(video=...)`` replaces it with
the clip's noised latent every step), so it can only work if the model reads the RGB half when it
denoises the dense half. This probe measures that directly on cached clips (the latents stage's
VAE posterior means): both halves are noised to level ``t`` alike, as in training, and the dense
half's x0 error is computed three ways:

* ``true_rgb``     — the clip's own RGB latent beside its dense latent;
* ``shuffled_rgb`` — another clip's RGB latent (same noise): what the dense half alone tells;
* ``prior``        — the error of predicting the dense latent's mean (no model at all).

``reliance = 1 - true_rgb / shuffled_rgb``: 0 when the model ignores the RGB half (then RGB-given
prediction cannot follow the clip), towards 1 when the RGB half decides the dense prediction.

    python benchmarks/probe_rgb_reliance.py --pipeline models/tiny/pipeline --latents data/tiny/latents \\
        --out benchmarks/results/rgb-reliance-tiny-vm.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info  # noqa: E402

logger = logging.getLogger("probe_rgb_reliance")


def _latent(record: dict, key: str, scaling_factor: float) -> torch.Tensor:
    """A cached posterior mean as the transformer's input layout, (1, F, C, h, w), scaled."""
    return (record[f"{key}_mean"] * scaling_factor).permute(1, 0, 2, 3)[None]


@torch.no_grad()
def dense_x0_errors(transformer, records: list[dict], scaling_factor: float, alphas_cumprod: torch.Tensor,
                    task: str, timesteps: list[int], seed: int = 0) -> dict[int, dict[str, float]]:
    """Per noise level: the dense half's mean squared x0 error with the true RGB, with a shuffled
    clip's RGB, and of the prior (the dense latent's mean), averaged over ``records`` (>= 2)."""
    from udpdiff.pipeline import LATENT_CHANNELS
    from udpdiff.tasks import task_id

    if len(records) < 2:
        raise ValueError("the probe needs at least 2 clips (one's RGB stands in for another's)")
    dtype = next(transformer.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in timesteps:
        a = alphas_cumprod[t].float()
        errors: dict[str, list[float]] = {"true_rgb": [], "shuffled_rgb": [], "prior": []}
        for i, rec in enumerate(records):
            rgb, dense = _latent(rec, "rgb", scaling_factor), _latent(rec, task, scaling_factor)
            other = _latent(records[(i + 1) % len(records)], "rgb", scaling_factor)
            noise_rgb, noise_dense = torch.randn(rgb.shape, generator=g), torch.randn(dense.shape, generator=g)
            noisy_dense = a.sqrt() * dense + (1 - a).sqrt() * noise_dense
            for name, r in (("true_rgb", rgb), ("shuffled_rgb", other)):
                x = torch.cat([a.sqrt() * r + (1 - a).sqrt() * noise_rgb, noisy_dense], dim=2)
                v = transformer(x.to(dtype), rec["text:long"][None].to(dtype), torch.tensor([t]),
                                task_id=task_id(task)).sample.float()
                x0 = a.sqrt() * x - (1 - a).sqrt() * v  # v-prediction
                errors[name].append(float((x0[:, :, LATENT_CHANNELS:] - dense).pow(2).mean()))
            errors["prior"].append(float((dense - dense.mean()).pow(2).mean()))
        row = {k: float(np.mean(v)) for k, v in errors.items()}
        row["reliance"] = 1 - row["true_rgb"] / row["shuffled_rgb"]
        out[t] = row
        logger.info("%s t=%d: %s", task, t, {k: round(v, 4) for k, v in row.items()})
    return out


def probe(pipeline: Path, latents: Path, clips: int, timesteps: list[int]) -> dict:
    from udpdiff.latents import load_record
    from udpdiff.pipeline import UDPDiffPipeline

    pipe = UDPDiffPipeline.from_pretrained(str(pipeline))
    if not pipe.dense:
        raise SystemExit(f"{pipeline}: an RGB-only pipeline has no dense half to probe")
    paths = sorted(p for p in latents.glob("*.safetensors") if not p.name.startswith("_"))[:clips]
    if len(paths) < 2:
        raise SystemExit(f"{latents}: needs at least 2 cached clips, found {len(paths)}")
    records = [load_record(p) for p in paths]
    tasks = [k[: -len("_mean")] for k in records[0] if k.endswith("_mean") and k != "rgb_mean"]
    transformer = pipe.transformer.eval()
    result = {"pipeline": str(pipeline), "latents": str(latents), "clips": len(records), "timesteps": timesteps,
              "tasks": {}}
    for task in tasks:
        rows = dense_x0_errors(transformer, records, pipe.vae_scaling_factor_image, pipe.scheduler.alphas_cumprod,
                               task, timesteps)
        result["tasks"][task] = {str(t): r for t, r in rows.items()}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", type=Path, default=ROOT / "models" / "tiny" / "pipeline")
    p.add_argument("--latents", type=Path, default=ROOT / "data" / "tiny" / "latents")
    p.add_argument("--clips", type=int, default=12)
    p.add_argument("--timesteps", type=lambda v: [int(x) for x in v.split(",")], default=[200, 500, 800])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    result = {"benchmark": "rgb_reliance", "machine": machine_info(torch.device("cpu"), ["torch", "diffusers"]),
              **probe(args.pipeline, args.latents, args.clips, args.timesteps)}
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
