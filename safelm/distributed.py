"""Data-parallel training under ``torchrun``: one process per device, gloo on CPUs, NCCL on GPUs.

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK; :func:`init_from_env` joins the process group.
Rank 0 alone writes the run dir. Non-private runs wrap the model in PyTorch's DDP and give each
rank a slice of every global batch; private runs use Opacus' DPDDP (parameters broadcast from
rank 0) with a distributed DP optimizer (per-sample clipping on each rank, noise added once on
rank 0, clipped sums all-reduced), and each rank keeps its shard of one global Poisson draw, so
the batches, the noise and the accounting are those of one process with the same global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_from_env() -> Dist:
    """Join the process group that torchrun describes (a no-op in a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return Dist(rank, world, local)


def current() -> Dist:
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(),
                    int(os.environ.get("LOCAL_RANK", "0")))
    return Dist()
