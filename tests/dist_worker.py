"""One rank of a multi-process training run, for tests/test_train.py (run under torchrun).

Usage: torchrun --nproc_per_node N tests/dist_worker.py WORKDIR OUT_JSON [MAX_STEPS]
WORKDIR holds params.yaml and latents/ (written by the test); rank 0 writes OUT_JSON with the
loss history, the clips each rank trained on, each rank's weights' digest and the checkpoint
it resumed from."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402

from tests.conftest import TRAIN_CLIPS, train_tiny  # noqa: E402
from udpdiff.config import load_params  # noqa: E402
from udpdiff.train import make_batch  # noqa: E402


def main() -> None:
    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    max_steps = int(sys.argv[3]) if len(sys.argv) > 3 else None
    p = load_params(work / "params.yaml")
    model, result = train_tiny(p, work / "latents", work / "ck", max_steps_this_run=max_steps)
    rank, world = dist.get_rank(), dist.get_world_size()
    # which clips each rank's first micro-batches hold (make_batch is pure, so this is what it trained on)
    from udpdiff.latents import LatentDataset
    from udpdiff.models.scheduler import build_scheduler

    data = LatentDataset(work / "latents", TRAIN_CLIPS)
    alphas = build_scheduler(p.active.scheduler.model_dump()).alphas_cumprod
    clips = [make_batch(data, p, s, 0, 1.0, alphas, rank, world)["clip_index"].tolist() for s in range(3)]
    gathered = [None] * world
    dist.all_gather_object(gathered, clips)
    # each rank's weights, to show the ranks' copies stay identical
    digest = hashlib.sha256(b"".join(t.detach().float().numpy().tobytes() for t in model.state_dict().values()))
    digests = [None] * world
    dist.all_gather_object(digests, digest.hexdigest())
    if rank == 0:
        out.write_text(json.dumps({"losses": [h["loss"] for h in result.history], "world": world,
                                   "resumed_from": result.resumed_from, "steps_done": result.steps_done,
                                   "clips": gathered, "weights_sha256": digests}))


if __name__ == "__main__":
    try:
        main()
    finally:
        # leaving with the group alive lets DeepSpeed's CPU shared-memory comm threads abort the
        # process at exit ("terminate called without an active exception"), failing a finished rank
        if dist.is_initialized():
            dist.destroy_process_group()
