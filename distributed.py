"""Data parallelism under torchrun for train.py: the process group, gradient averaging, and sums across processes.

    torchrun --nproc_per_node 4 train.py --method inflora --tasks 10

Every process sees the same global batches (data.ShardedBatches) and takes its share of each; after every
backward the trainable gradients are averaged, weighted by local batch size, so the update is the one a single
process takes on the whole global batch. NCCL on GPUs, gloo on CPU (`CIL_DIST_BACKEND=gloo` forces gloo).
Outside torchrun (no WORLD_SIZE) everything here is a no-op of one process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    """This process's place under torchrun (rank 0 of 1 otherwise)."""
    rank: int = 0
    world: int = 1

    def sum_(self, x: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place across processes; a no-op in one process."""
        if self.world > 1:
            torch.distributed.all_reduce(x)
        return x

    def broadcast(self, obj):
        """Rank 0's value of a picklable object, in every process."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def local_rank() -> int | None:
    """The GPU index torchrun gives this process, or None outside torchrun."""
    return int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None


def init() -> Dist:
    """torch.distributed from torchrun's environment: NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    backend = "nccl" if torch.cuda.is_available() and os.environ.get("CIL_DIST_BACKEND") != "gloo" else "gloo"
    torch.distributed.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(local_rank() or 0)
    return Dist(torch.distributed.get_rank(), world)


def close(dist: Dist, finished: bool) -> None:
    """Tear the process group down. After a finished run every process first waits for the others at a barrier,
    so none destroys its group while another still talks to it (gloo can abort a process then); after an error
    there is no barrier, since the others may never reach it."""
    if dist.world > 1:
        if finished:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def average_gradients(params: list[torch.Tensor], n_local: int, n_global: int, dist: Dist) -> None:
    """grad <- sum over processes of (n_local / n_global) * local grad: the gradient of the global batch mean."""
    grads = [p.grad for p in params if p.grad is not None]
    if dist.world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]) * (n_local / n_global)
    dist.sum_(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
