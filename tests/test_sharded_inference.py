"""The sample and evaluate stages shared out over ranks (``inference_launcher``): work item ``k`` on
rank ``k % world``, rank 0 merging. Two CPU ranks under torchrun (gloo) write what one process
writes, byte for byte, and finish a run that one process started and was killed in."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from udpdiff.distributed import Ranks, inference_ranks
from udpdiff.io.manifest import read_manifest
from udpdiff.stages import evaluate, sample

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "stage_worker.py"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@contextlib.contextmanager
def _one_thread():
    """As each torchrun rank computes (OMP_NUM_THREADS=1): the same reduction order, the same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_one_process_is_rank_0_of_1_with_no_process_group(monkeypatch):
    import torch.distributed as dist

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")  # without RANK: not a launcher's process
    had_group = dist.is_initialized()  # an in-process training test may have left its one-rank group
    with inference_ranks() as ranks:
        assert ranks == Ranks(0, 1) and dist.is_initialized() == had_group  # no group of its own
        assert ranks.map(lambda x: x * x, [1, 2, 3]) == [1, 4, 9] and ranks.gather("a") == ["a"]
        ranks.barrier()
    # the split: item k on rank k % world, every item on exactly one rank
    owners = [[r for r in range(3) if Ranks(r, 3).owns(k)] for k in range(7)]
    assert owners == [[0], [1], [2], [0], [1], [2], [0]]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="with CUDA each rank takes its own GPU: needs 2")
def test_two_ranks_sample_and_evaluate_as_one_process_does_and_resume(inference_project, torchrun, monkeypatch):
    from udpdiff.pipeline import UDPDiffPipeline

    p, paths = inference_project
    # one process: the reference outputs
    with _one_thread():
        sample.run(p, paths)
        evaluate.run(p, paths)
    reference = {folder: _files(folder) for folder in (paths.samples, paths.evaluation, paths.fvd_reference)}
    for folder in reference:
        shutil.rmtree(folder)
    # one process killed in its second sample (the first is finished), leaving a half-written file
    real_call, calls = UDPDiffPipeline.__call__, []

    def dying(self, *args, **kwargs):
        calls.append(kwargs.get("task"))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(UDPDiffPipeline, "__call__", dying)
    with _one_thread(), pytest.raises(KeyboardInterrupt):
        sample.run(p, paths)
    monkeypatch.undo()
    ids = read_manifest(paths.manifest).query("split == 'val'").clip_id.tolist()[:3]
    work = paths.samples.with_name(f".partial-{paths.samples.name}")
    finished = work / "segmentation" / f"{ids[0]}.npz"
    stamp = finished.stat().st_mtime_ns
    (work / "depth").mkdir()
    (work / "depth" / f".{ids[1]}.x1y2z3.npz").write_bytes(b"half an npz")

    # two ranks finish the run, then evaluate (the FVD reference recomputed, shared out too)
    torchrun(WORKER, paths.root, "sample", "evaluate")
    ranks = [json.loads((paths.root / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    # items in order seg0 seg1 seg2 depth0 depth1 depth2 (seed p.seed + prompt), item k on rank k % 2;
    # seg0 was finished and is not made again; each sample is a generation and a conditioned prediction
    s = p.seed
    made = [[(task, seed) for task, seed, conditioned in r["generated"] if not conditioned] for r in ranks]
    assert made == [[("segmentation", s + 2), ("depth", s + 1)],
                    [("segmentation", s + 1), ("depth", s), ("depth", s + 2)]]
    assert all(sorted(map(tuple, r["generated"])) == sorted([(t, x, c) for t, x in m for c in (False, True)])
               for r, m in zip(ranks, made, strict=True))
    assert (paths.samples / "segmentation" / f"{ids[0]}.npz").stat().st_mtime_ns == stamp
    # evaluation chunks of 2 in order seg, depth, real, chunk k on rank k % 2
    assert ranks[0]["scored"] == [["segmentation", ids[:2]], ["depth", ids[:2]], ["real", ids[:2]]]
    assert ranks[1]["scored"] == [["segmentation", ids[2:]], ["depth", ids[2:]], ["real", ids[2:]]]
    assert ranks[1]["metrics"] == {"sample": {}, "evaluate": {}}  # rank 0 alone reports
    assert ranks[0]["metrics"]["evaluate"]["depth/fvd_num_videos"] == 3

    # byte for byte what one process wrote: samples (npz, mp4), galleries, index, scores, tables, FVD cache
    for folder, files in reference.items():
        got = _files(folder)
        assert got.keys() == files.keys(), folder
        if torch.cuda.is_available():
            # GPU kernels round differently from process to process (2xH200: 9 of 15 sample files
            # differed in bytes from the in-process reference): the same files, not the same bytes
            continue
        assert [k for k in files if got[k] != files[k]] == [], folder
    assert not work.exists() and not any(f.name.startswith(".") for f in paths.samples.rglob("*"))
