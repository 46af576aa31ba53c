"""Command line for the flows: what DVC stages and people run.

    python -m flows repro                  # `dvc repro` with one Prefect server and one MLflow parent run
    python -m flows stage train            # one stage (what dvc.yaml runs): a Prefect flow + an MLflow run
    python -m flows run train              # the `udpdiff` flow's job: brings its DVC target up to date
    python -m flows ablation tab5          # a paper ablation (params.yaml `ablations`) as DVC experiments
    python -m flows import-run small.tar.gz   # log a run benchmarks/small_gpu.py packed on a GPU machine (once;
                                              # its volumes small-2.tar.gz, ... beside it come along)
    python -m flows import-run benchmarks/results/small-h200-tab12   # variants whose tarballs are gone, from
                                              # their kept scores (beside tarballs too: one table)
    torchrun --nproc_per_node 8 -m flows stage train   # train on 8 GPUs (params.yaml train_launcher)
    torchrun --nproc_per_node 8 -m flows stage sample  # sample on 8 GPUs (params.yaml inference_launcher)
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import logging
import os
import sys
from pathlib import Path


def _environment_problem() -> str | None:
    """dvc.yaml's commands say `python`: outside the project's venv that is some other Python.
    Say how to get the right one instead of failing deep inside with ModuleNotFoundError."""
    # found, not imported: importing diffusers alone takes ~3.7 s, and a stage that does not need it
    # (data, validate, evaluate, report) or the parent of a `dvc repro` would pay that for nothing
    missing = [module for module in ("mlflow", "prefect", "dvc", "torch", "diffusers", "udpdiff")
               if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    venv = Path(__file__).resolve().parents[1] / ".venv"
    how = (f"activate the project's environment first:  source {venv}/bin/activate  (or run `make repro`)"
           if (venv / "bin" / "python").exists() else
           "create it first with `make setup` (or `make repro`), then:  source .venv/bin/activate")
    return f"{sys.executable} lacks {', '.join(missing)}: this is not the UDPDiff environment; {how}"


def _argument_problem(args: argparse.Namespace) -> str | None:
    """A bad profile, stage or job, found before a Prefect server starts (~15 s on 2 cores) for a
    command that cannot run."""
    from udpdiff.config import ParamsError

    if args.command not in ("stage", "run", "ablation"):
        return None
    if args.command == "stage":
        from udpdiff.stages import STAGES

        if args.stage not in STAGES:
            return f"unknown stage {args.stage!r}; stages: {', '.join(STAGES)}"
    if args.command == "run":
        from flows.jobs import JOBS

        if args.job not in JOBS:
            return f"unknown job {args.job!r}; jobs: {sorted(JOBS)}"
    from flows.common import load

    try:
        load(args.profile)
    except ParamsError as e:
        return str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rp = sub.add_parser("repro", help="dvc repro (extra args passed on) with one Prefect server and MLflow parent run")
    rp.add_argument("dvc_args", nargs=argparse.REMAINDER)
    st = sub.add_parser("stage", help="run one stage (what each dvc.yaml stage runs)")
    st.add_argument("stage")
    st.add_argument("--profile", default=None, help="override params.yaml's profile")
    rn = sub.add_parser("run", help="run the udpdiff flow for a job (through DVC)")
    rn.add_argument("job")
    rn.add_argument("--profile", default=None)
    rn.add_argument("--ablation", default=None, help="job sweep: the table (tab5), default all")
    ab = sub.add_parser("ablation", help="run paper ablations (params.yaml `ablations`) as DVC experiments")
    ab.add_argument("tables", nargs="*", help="tab1 tab5 … (default: all of params.yaml's ablations)")
    ab.add_argument("--profile", default=None)
    ab.add_argument("--variants", nargs="+", default=None, help="only these variants of the table")
    ab.add_argument("--force", action="store_true", help="rerun variants whose experiment is up to date")
    im = sub.add_parser("import-run", help="log a run packed by benchmarks/small_gpu.py (a GPU machine without "
                                           "MLflow) to MLflow: the ablation's parent, variants and stages")
    im.add_argument("tarballs", type=Path, nargs="+",
                    help="small.tar.gz (its volumes small-2.tar.gz, ... beside it come along), or a folder of "
                         "kept variants (<variant>/per_video.csv, validation_history.csv, variant.json: "
                         "benchmarks/results/small-h200-tab12)")
    im.add_argument("--profile", default=None, help="the profile it ran (default: small)")
    im.add_argument("--replace", action="store_true", help="delete an earlier import of the same tarballs and log "
                                                           "them again (an import is otherwise done once)")
    args = parser.parse_args(argv)

    problem = _environment_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from flows import PREFECT_SERVER_START_TIMEOUT_S

    # before anything imports prefect, whose settings are read once at import; passed on to the
    # stages DVC starts
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(PREFECT_SERVER_START_TIMEOUT_S))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "alembic", "great_expectations"):  # per-request chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from udpdiff.config import ParamsError

    problem = _argument_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.command in ("run", "ablation") and not os.environ.get("PREFECT_API_URL"):
        # one local Prefect server for the job's flow and every stage flow DVC starts under it (the
        # stages then show up as its subflows), instead of an ephemeral server per process
        from flows.jobs import run_with_prefect_server

        return run_with_prefect_server([sys.executable, "-m", "flows", *(sys.argv[1:] if argv is None else argv)])
    try:
        if args.command == "repro":
            from flows.jobs import repro

            return repro(args.dvc_args)
        if args.command == "stage" and int(os.environ.get("RANK", 0)) != 0:
            # a worker rank under torchrun/deepspeed: the same step, without a flow or MLflow run
            # of its own (rank 0 runs those and logs for all ranks)
            from flows.common import load
            from udpdiff.stages import LAUNCHERS

            if args.stage not in LAUNCHERS:
                print(f"error: only the {', '.join(LAUNCHERS)} stages run under a multi-process launcher, "
                      f"not {args.stage!r}", file=sys.stderr)
                return 2
            import importlib

            importlib.import_module(f"udpdiff.stages.{args.stage}").run(*load(args.profile))
        elif args.command == "stage":
            from flows.stage import stage_flow
            from flows.subflows import run_stage_flow

            run_stage_flow(stage_flow, {"stage": args.stage, "profile": args.profile})
        elif args.command == "import-run":
            from flows.gpu_import import import_run

            print(import_run(args.tarballs, args.profile, replace=args.replace))
        elif args.command == "ablation":
            from flows.ablation import ablation_flow

            ablation_flow(args.tables or None, args.profile, args.variants, args.force)
        else:
            from flows.jobs import udpdiff

            udpdiff(args.job, args.profile, args.ablation)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        leave_process_group()
    return 0


def leave_process_group() -> None:
    """Every rank of a launched stage leaves its process group before exiting: a rank that exits with
    it alive can be aborted by DeepSpeed's CPU comm threads ("terminate called without an active
    exception", failing a finished run), and NCCL warns about leaked resources."""
    dist = sys.modules.get("torch.distributed")  # never import torch just to find nothing to do
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_without_teardown(code: int) -> None:
    """Leave once everything is written: run the exit handlers (Prefect's log and event flushes,
    logging's shutdown), flush, and skip Python's own teardown. That teardown garbage-collects the
    module graphs of torch, MLflow and Prefect, ~2.5 s per process on 2 CPU cores, and DVC starts
    one process per stage. Every output is closed by then: stages write through context managers."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main_interruptible(argv: list[str] | None = None) -> int:
    """``main``, with Ctrl-C or SIGTERM (``flows.jobs.sigterm_interrupts``) ending in one line and the
    shell's code for it instead of a traceback: what the command started is stopped by then."""
    try:
        return main(argv)
    except KeyboardInterrupt as e:
        print(f"\ninterrupted ({e or 'Ctrl-C'}): what it started is stopped; every output is written whole, "
              "and a rerun resumes (DVC reruns what is not done, training from its last checkpoint)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    exit_without_teardown(main_interruptible())
