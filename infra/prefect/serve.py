"""Serve the ``udpdiff`` flow's deployments from this machine.

    prefect server start                      # terminal 1 (or point PREFECT_API_URL at a server)
    python infra/prefect/serve.py             # terminal 2: registers and serves the deployments
    prefect deployment run udpdiff/train      # anywhere: runs the train job on the server above

Deployments: pipeline, curate, train, evaluate, sweep — the `job` parameter of the flow.
Override the profile per run: prefect deployment run udpdiff/train -p profile=cogvideox-2b
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

JOBS = ("pipeline", "curate", "train", "evaluate", "sweep")


def deployments():
    from flows.pipeline import udpdiff

    return [udpdiff.to_deployment(name=job, parameters={"job": job}, tags=["udpdiff", job],
                                  description=f"UDPDiff `{job}` job on the profile in params.yaml")
            for job in JOBS]


if __name__ == "__main__":
    from prefect import serve

    serve(*deployments())
