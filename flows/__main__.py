"""Command line for the flows: what DVC stages and people run.

    python -m flows stage train            # one stage (a Prefect flow + an MLflow run)
    python -m flows run pipeline           # the `udpdiff` flow: pipeline|curate|train|evaluate|sweep
    python -m flows run sweep --variants single-task-depth   # ablations (params.yaml `sweeps`)
    python -m flows repro                  # `dvc repro` with one local Prefect server for all stages
    torchrun --nproc_per_node 8 -m flows stage train   # train on 8 GPUs (params.yaml train_launcher)
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def run_with_prefect_server(cmd: list[str]) -> int:
    """Run ``cmd`` with one Prefect server shared by every flow it starts.

    Without PREFECT_API_URL each stage would start (and stop) its own ephemeral server, several
    seconds apiece; one server for the whole `dvc repro` saves that and keeps all runs in one
    place. An existing PREFECT_API_URL is used as is."""
    # dvc.yaml's commands say `python`: make it this environment's, activated or not
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if env.get("PREFECT_API_URL"):
        return subprocess.call(cmd, env=env)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    prefect = Path(sys.executable).with_name("prefect")
    server = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None:
                print(f"error: prefect server exited: {server.stderr.read().decode()[-2000:]}", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print("error: prefect server did not become healthy within 120 s", file=sys.stderr)
                return 1
            time.sleep(0.5)
        return subprocess.call(cmd, env={**env, "PREFECT_API_URL": url})
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("stage", help="run one stage")
    st.add_argument("stage")
    st.add_argument("--profile", default=None, help="override params.yaml's profile")
    st.add_argument("--variant", default=None, help="a sweep variant of params.yaml (its own output folders)")
    rn = sub.add_parser("run", help="run the udpdiff flow for a job")
    rn.add_argument("job", choices=["pipeline", "curate", "train", "evaluate", "sweep"])
    rn.add_argument("--profile", default=None)
    rn.add_argument("--variants", nargs="+", default=None, help="sweep: only these variants")
    rp = sub.add_parser("repro", help="dvc repro (extra args passed on) with one shared Prefect server")
    rp.add_argument("dvc_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "repro":
        return run_with_prefect_server([str(Path(sys.executable).with_name("dvc")), "repro", *args.dvc_args])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "alembic", "great_expectations"):  # per-request chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from flows.pipeline import stage_flow, udpdiff
    from udpdiff.config import ParamsError

    try:
        if args.command == "stage" and int(os.environ.get("RANK", 0)) != 0:
            # a worker rank under torchrun/deepspeed: the same step, without a flow or MLflow run
            # of its own (rank 0 runs those and logs for all ranks)
            if args.stage != "train":
                print(f"error: only the train stage runs under a multi-process launcher, not {args.stage!r}",
                      file=sys.stderr)
                return 2
            from flows.common import load
            from udpdiff import steps

            steps.train_transformer(*load(args.profile, args.variant))
        elif args.command == "stage":
            stage_flow(args.stage, args.profile, args.variant)
        elif args.job == "sweep":
            from flows.sweep import sweep_flow

            sweep_flow(args.profile, args.variants)
        else:
            udpdiff(args.job, args.profile)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
