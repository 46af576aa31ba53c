"""Command line for the flows: what DVC stages and people run.

    python -m flows stage train            # one stage (a Prefect flow + an MLflow run)
    python -m flows run pipeline           # the `udpdiff` flow: pipeline|curate|train|evaluate|sweep
    python -m flows run sweep --variants single-task-depth   # ablations (params.yaml `sweeps`)
"""

from __future__ import annotations

import argparse
import logging
import sys


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "alembic", "great_expectations"):  # per-request chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from flows.pipeline import stage_flow, udpdiff
    from udpdiff.config import ParamsError

    try:
        if args.command == "stage":
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
