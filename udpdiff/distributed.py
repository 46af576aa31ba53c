"""Data-parallel inference over the ranks of a launcher (torchrun, deepspeed): the sample and
evaluate stages split their work items between processes, one GPU each, and rank 0 merges.

Work item ``k`` of a fixed order belongs to rank ``k % world``; what an item computes depends on
the item alone (its seed, its batch), never on the rank that computes it, so any number of ranks
produces what one process does. One process without a launcher is rank 0 of 1: no process group,
no collective, the code path of a plain run.

The ranks talk over gloo even on GPUs: they exchange only a barrier and small Python objects
(per-video score rows, 400 I3D floats per video), never GPU tensors, so NCCL would add a
device-bound communicator and its watchdog for nothing. The collectives wait up to
:data:`TIMEOUT` for the slowest rank; a rank that dies makes the launcher stop the others.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")

# how long a rank that finished its share waits at a collective for the others: shares differ by about
# one item (a 5B sample is minutes) plus a slow rank's loading and compiling, more when a resumed run
# finds the finished samples unevenly spread; a rank that dies ends the run through its launcher
TIMEOUT = timedelta(hours=6)


# what a launcher sets for its ranks (torchrun's elastic agent adds TORCHELASTIC_*)
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """True in a process started by torchrun/deepspeed (they set the rank variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def top_level_env(**extra: str) -> dict[str, str]:
    """This process's environment less any launcher's rank variables, plus ``extra``: for starting
    a new top-level process (a launcher, a worker of its own), whatever this process's environment
    holds (DeepSpeed sets RANK and WORLD_SIZE in a process that trained in-process)."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES and not k.startswith("TORCHELASTIC_")}
    return {**env, **extra}


def local_device() -> torch.device:
    """This process's device: under a launcher its own GPU (``cuda:LOCAL_RANK``), else the GPU when
    there is one, else the CPU."""
    import torch  # here, not at the top: the flow of every stage imports this module, most need no torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    if "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks doing one stage's work."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, k: int) -> bool:
        """Whether work item ``k`` (of the stage's fixed order) is this rank's."""
        return k % self.world == self.rank

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0, in rank order; ``None`` on the other ranks."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def map(self, fn: Callable[[T], Any], items: Sequence[T]) -> list[Any] | None:
        """``[fn(x) for x in items]`` with item ``k`` computed on rank ``k % world``: the list, in
        item order, on rank 0; ``None`` on the other ranks. Every rank must call it (a collective)."""
        mine = {k: fn(x) for k, x in enumerate(items) if self.owns(k)}
        parts = self.gather(mine)
        if parts is None:
            return None
        merged = {k: v for part in parts for k, v in part.items()}
        return [merged[k] for k in range(len(items))]


def _destroy_if_initialized() -> None:
    import torch.distributed as dist

    if dist.is_initialized():  # the stage's entry point may have left the group already
        dist.destroy_process_group()


@contextlib.contextmanager
def inference_ranks() -> Iterator[Ranks]:
    """The ranks of this stage run: ``Ranks(0, 1)`` for one process; under a launcher with several
    processes the ranks of a gloo process group, with this process's GPU made the current device (code
    that asks for ``"cuda"`` gets ``cuda:LOCAL_RANK``). The group is made on first use and kept for
    the process's later stages (destroyed at exit): a group made again under the same launcher would
    meet the first one's rendezvous keys in the launcher's store and hang. An existing process group
    (a caller's) is used as it is."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        yield Ranks(dist.get_rank(), dist.get_world_size())
        return
    world = int(os.environ.get("WORLD_SIZE", 1)) if launched() else 1
    if world <= 1:
        yield Ranks()
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())
    dist.init_process_group("gloo", timeout=TIMEOUT)  # env:// : MASTER_ADDR/PORT, RANK, WORLD_SIZE from the launcher
    atexit.register(_destroy_if_initialized)
    ranks = Ranks(dist.get_rank(), dist.get_world_size())
    logger.info("rank %d of %d (device %s)", ranks.rank, ranks.world, local_device())
    yield ranks
