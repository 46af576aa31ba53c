"""Serve the ``udpdiff`` flow's deployments from this machine: one per job of ``flows.jobs.JOBS``.

    prefect server start                      # terminal 1 (or point PREFECT_API_URL at a server)
    python infra/prefect/serve.py             # terminal 2: registers and serves the deployments
    prefect deployment run udpdiff/train      # anywhere: brings `train` up to date through DVC

A DVC job (pipeline, curate, train, evaluate) runs ``dvc repro <its targets>`` in this repository:
only stale stages run, each as a subflow ``udpdiff-stage``; nothing runs when nothing changed.
``sweep`` runs the paper's ablations: ``prefect deployment run udpdiff/sweep -p ablation=tab5``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
# the flow runs this process starts (python -m prefect.engine) import `flows` from this checkout too
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


def deployments():
    from flows.jobs import JOBS, udpdiff

    out = []
    for job, targets in JOBS.items():
        if targets is None:
            what = "the paper's ablations (parameter `ablation`: one table such as tab5; all by default)"
        else:
            what = f"`dvc repro {' '.join(targets) or '(all stages)'}`: only stale stages run"
        out.append(udpdiff.to_deployment(name=job, parameters={"job": job}, tags=["udpdiff", job],
                                         description=f"UDPDiff `{job}` job: {what}"))
    return out


if __name__ == "__main__":
    from prefect import serve

    os.chdir(ROOT)  # dvc runs in the repository
    serve(*deployments())
