"""One rank of a multi-process sample/evaluate run, for tests/test_sharded_inference.py (under torchrun).

Usage: torchrun --nproc_per_node N tests/stage_worker.py ROOT STAGE [STAGE ...]
ROOT holds params.yaml and the project's data/ and models/ (written by the test). Each rank runs the
stages, as the flows' ranks do, and writes ROOT/rank-<RANK>.json: its rank and world size, the
pipeline calls it made (task, seed, conditioned on a real clip), the evaluation chunks it scored
and the metrics each stage returned on it."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from udpdiff.config import load_params  # noqa: E402
from udpdiff.paths import ProjectPaths  # noqa: E402
from udpdiff.pipeline import UDPDiffPipeline  # noqa: E402
from udpdiff.stages import evaluate  # noqa: E402


def main() -> None:
    root, stages = Path(sys.argv[1]), sys.argv[2:]
    work: dict[str, list] = {"generated": [], "scored": []}
    call, score_samples, score_real = UDPDiffPipeline.__call__, evaluate._score_samples, evaluate._score_real

    def generate(self, *args, **kwargs):
        work["generated"].append([kwargs.get("task"), kwargs["generator"].initial_seed(), "video" in kwargs])
        return call(self, *args, **kwargs)

    def samples(paths, df, suite, name, chunk, features):
        work["scored"].append([name, [x["clip_id"] for x in chunk]])
        return score_samples(paths, df, suite, name, chunk, features)

    def real(p, paths, df, suite, chunk):
        work["scored"].append(["real", list(chunk)])
        return score_real(p, paths, df, suite, chunk)

    UDPDiffPipeline.__call__, evaluate._score_samples, evaluate._score_real = generate, samples, real
    p = load_params(root / "params.yaml")
    paths = ProjectPaths(root, p.profile)
    metrics = {s: importlib.import_module(f"udpdiff.stages.{s}").run(p, paths).metrics for s in stages}
    rank = int(os.environ["RANK"])
    (root / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "world": int(os.environ["WORLD_SIZE"]),
                                                        "metrics": metrics, **work}))


if __name__ == "__main__":
    main()
