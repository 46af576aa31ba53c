"""Wall time of the embedded `tiny` pipeline on this machine, stage by stage, from a clean clone.

    .venv/bin/python benchmarks/bench_e2e.py              # `make repro`'s command: one Prefect server
    .venv/bin/python benchmarks/bench_e2e.py --per-stage  # `dvc repro -s` stage by stage (ephemeral Prefect)

Clones HEAD into a temp dir and writes benchmarks/results/e2e-tiny[-per-stage]-<hostname>.json
(goal: <= 5 min on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from udpdiff.io.atomic import write_text  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-stage", action="store_true", help="time each stage as its own `dvc repro -s`")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    mode = "per-stage" if args.per_stage else "shared-server"
    out = args.out or REPO / "benchmarks" / "results" / (
        f"e2e-tiny{'-per-stage' if args.per_stage else ''}-{socket.gethostname()}.json")
    stages = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PREFECT_API_URL", None)
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "udpdiff"
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(work)], check=True)
        env["PREFECT_HOME"] = str(Path(tmp) / "prefect")
        total = time.perf_counter()
        if not args.per_stage:  # exactly what `make repro` runs
            proc = subprocess.run([sys.executable, "-m", "flows", "repro"], cwd=work, env=env, capture_output=True,
                                  text=True)
            if proc.returncode:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            stages = []
        for stage in stages:
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", stage], cwd=work, env=env,
                                  capture_output=True, text=True)
            if proc.returncode:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            timings[stage] = time.perf_counter() - start
            print(f"{stage:12s} {timings[stage]:7.1f} s", flush=True)
        total = time.perf_counter() - total
    print(f"{'total':12s} {total:7.1f} s")
    result = {"mode": mode, "total_s": total, "stages_s": timings, "host": socket.gethostname(),
              "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
              "note": "per-stage: each stage its own process and ephemeral Prefect server; "
                      "shared-server: `python -m flows repro`, one Prefect server for all stages"}
    write_text(out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
