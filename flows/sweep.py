"""Ablation sweeps (paper Tabs 1, 5, 6, 7): retrain and re-evaluate each variant of
params.yaml's ``sweeps`` on the shared data, VAE and text encoder, then tabulate.

    python -m flows run sweep                     # every variant
    prefect deployment run udpdiff/sweep          # the same, through a deployment
"""

from __future__ import annotations

import json

import mlflow
from prefect import flow, get_run_logger

from flows.common import load, log_result, mlflow_run
from flows.pipeline import stage_flow
from udpdiff import viz
from udpdiff.io.atomic import write_text
from udpdiff.steps import StepResult

SWEEP_STAGES = ["encode", "latents", "train", "sample", "evaluate", "report"]
# the paper's ablation columns (SC | BC | MS | FVD) per sample set, then the dense-prediction scores;
# columns no variant has (a metric model not configured) are left out
_GENERATION = ["subject_consistency", "background_consistency", "motion_smoothness", "motion_smoothness_flow", "fvd"]
COLUMNS = ["variant", *(f"{s}/{m}" for s in ("depth", "segmentation", "rgb") for m in _GENERATION),
           "depth/gt_delta1", "depth/gt_rmse", "depth/pseudo_delta1", "depth/pseudo_rmse", "segmentation/gt_miou",
           "segmentation/pseudo_miou", "depth/pixel_frame_consistency", "segmentation/pixel_frame_consistency",
           "rgb/pixel_frame_consistency"]


def _flat_eval(path) -> dict[str, float]:
    metrics = json.loads(path.read_text())["metrics"]
    return {f"{task}/{k}": v for task, m in metrics.items() for k, v in m.items()}


@flow(name="udpdiff-sweep")
def sweep_flow(profile: str | None = None, variants: list[str] | None = None) -> dict[str, dict[str, float]]:
    log = get_run_logger()
    p, base = load(profile)
    names = variants if variants is not None else list(p.sweeps)
    unknown = sorted(set(names) - set(p.sweeps))
    if unknown:
        raise ValueError(f"unknown sweep variants {unknown}; params.yaml defines {sorted(p.sweeps)}")
    missing = [str(x) for x in (base.manifest, base.vae, base.text_encoder) if not x.exists()]
    if missing:
        raise FileNotFoundError(f"a sweep reuses the base run's data, VAE and text encoder; missing {missing}: "
                                "run `dvc repro latents` (or the pipeline job) first")
    rows = []
    if (base.evaluation / "metrics.json").exists():
        rows.append({"variant": "base (params.yaml)", **_flat_eval(base.evaluation / "metrics.json")})
    for name in names:
        log.info("sweep variant %s: %s", name, p.sweeps[name])
        for stage in SWEEP_STAGES:
            stage_flow(stage, profile, variant=name)
        _, vpaths = load(profile, name)
        rows.append({"variant": name, **_flat_eval(vpaths.evaluation / "metrics.json")})
    table = viz.markdown_table(rows, [c for c in COLUMNS if any(c in r for r in rows)])
    text = (f"# Ablations — profile `{p.profile}`\n\n{table}\n\nOverrides per variant:\n\n"
            + "\n".join(f"- `{n}`: `{json.dumps(p.sweeps[n])}`" for n in names) + "\n")
    out = base.sweeps / "ablations.md"
    write_text(out, text)
    with mlflow_run("sweep", p, {"variants": ",".join(names)}):
        log_result(StepResult(artifacts=[out]))
        for r in rows:
            mlflow.log_metrics({f"{r['variant']}.{k}".replace("/", ".").replace(" ", "_").replace("(", "")
                                .replace(")", ""): v for k, v in r.items() if k != "variant"})
    return {r["variant"]: {k: v for k, v in r.items() if k != "variant"} for r in rows}
