"""Training on several processes: whether a launcher started this one as one of several, which of a step's
micro-batches are this process's, its dropout seed, and the numbers every process must agree on.

Every process builds the same global plan of each optimizer step (data/batching.py: a pure function of seed and
epoch), so the trained tokens of the whole step are known everywhere without communication; process r takes the
micro-batches r, r + N, r + 2N, ... A step with fewer micro-batches than processes (the short last step of an
epoch) gives the others one micro-batch to run at weight zero: DDP needs every process in every synchronised
backward; under FSDP every process runs as many micro-batches as the busiest one.
"""

from __future__ import annotations

import os

import torch

from ..errors import PeftuneError

# what launchers set: torchrun, `accelerate launch`, deepspeed and torch.distributed.launch WORLD_SIZE; mpirun (what
# `accelerate launch --cpu` uses for several processes) the MPI sizes Accelerate reads; srun its step's task count
LAUNCHER_SIZES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")


def launched_processes() -> tuple[str, int] | None:
    """(the variable, the count) when a launcher started this process as one of several; None otherwise."""
    for name in LAUNCHER_SIZES:
        try:
            count = int(os.environ.get(name, "1") or 1)
        except ValueError:
            continue
        if count > 1:
            return name, count
    return None


def check_launch(launched: tuple[str, int] | None, running: int, asked: int) -> None:
    """A launcher's count that Accelerate does not run (srun without torchrun: Accelerate reads no SLURM variable,
    and every process would train alone into the same output_dir), or a num_processes other than the launcher's,
    is refused before anything is read or written."""
    if launched and running != launched[1]:
        raise PeftuneError(f"launched as one of {launched[1]} processes ({launched[0]}={launched[1]}), but "
                           f"Accelerate runs {running}: every process would train alone into the same output_dir. "
                           "Launch with torchrun or `accelerate launch` (inside srun too), or run `peftune train "
                           "CONFIG --num_processes N`")
    if asked > 1 and running != asked:
        raise PeftuneError(f"num_processes {asked}, but the launcher started {running}")


def my_micro_batches(micro_batches: list, rank: int, world: int, lockstep: bool = False) -> tuple[list, list[float]]:
    """(this process's micro-batches, the weight of each: 0 for one that only stands in, run but counted nowhere).
    `lockstep` (FSDP: every forward and backward gathers weights from all processes): each process runs the same
    number of micro-batches, the step's count rounded up to a multiple of the processes."""
    mine = micro_batches[rank::world]
    weights = [1.0] * len(mine)
    if not micro_batches:
        return mine, weights
    needed = -(-len(micro_batches) // world) if lockstep else 1
    while len(mine) < needed:
        mine, weights = mine + micro_batches[-1:], weights + [0.0]
    return mine, weights


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
