"""Training on several processes: which of a step's micro-batches are this process's, its dropout seed, and the
numbers every process must agree on.

Every process builds the same global plan of each optimizer step (data/batching.py: a pure function of seed and
epoch), so the trained tokens of the whole step are known everywhere without communication; process r takes the
micro-batches r, r + N, r + 2N, ... A step with fewer micro-batches than processes (the short last step of an
epoch) gives the others one micro-batch to run at weight zero: DDP needs every process in every synchronised
backward.
"""

from __future__ import annotations

import torch


def my_micro_batches(micro_batches: list, rank: int, world: int) -> tuple[list, bool]:
    """(this process's micro-batches, whether they only stand in: run at weight zero, counted nowhere)."""
    mine = micro_batches[rank::world]
    if mine or not micro_batches:
        return mine, False
    return micro_batches[-1:], True


def seed_step(seed: int, step: int, rank: int) -> None:
    """Each process's random numbers (dropout) for this step, from (seed, step, rank) alone: a resumed run draws the
    same ones without the other processes' generator states in the checkpoint."""
    torch.manual_seed((seed * 1_000_003 + step) * 65_537 + rank)


def reduce(values: list[float], device, op: str = "sum") -> list[float]:
    """The element-wise sum (or max) of `values` over every process."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()
