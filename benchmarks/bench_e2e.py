"""Wall time of the embedded `tiny` pipeline on this machine, stage by stage, from a clean clone.

    .venv/bin/python benchmarks/bench_e2e.py            # clones HEAD into a temp dir, runs every stage

Writes benchmarks/results/e2e-tiny-<hostname>.json (goal: <= 5 min on a 2-core CPU).
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
    parser.add_argument("--out", type=Path,
                        default=REPO / "benchmarks" / "results" / f"e2e-tiny-{socket.gethostname()}.json")
    args = parser.parse_args()
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
    result = {"total_s": total, "stages_s": timings, "host": socket.gethostname(), "cpus": os.cpu_count(),
              "machine": platform.machine(), "python": platform.python_version(),
              "note": "each stage is a separate process with its own ephemeral Prefect server"}
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
