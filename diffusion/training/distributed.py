"""Several processes, one per GPU (or gloo processes on the CPU): who this process is, the
process group, and the collectives the stages use.

A process knows its place from the environment torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), so a stage runs the same under
``torchrun --nproc-per-node N -m diffusion.cli train`` (several nodes included) as under
:mod:`diffusion.training.launch`, which starts N local processes of the same ``diffusion
<stage>`` command. A collective whose peer is gone ends the rank with :class:`RankFailed`
(the launcher, or torchrun, says which rank died).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from diffusion.errors import UserError

T = TypeVar("T")


class RankFailed(UserError, RuntimeError):
    """Another rank failed or is gone; this one stops too."""

    said_elsewhere = True  # by the failed rank itself, or by the launcher for a rank that died


# How gloo and NCCL word a collective whose peer process is gone (a plain RuntimeError).
PEER_LOST = ("closed by peer", "reset by peer", "Broken pipe", "remote process exited")


@dataclass(frozen=True)
class World:
    """This process's place among the job's processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs to MLflow and writes the stage's outputs."""
        return self.rank == 0


def world() -> World:
    """This process's :class:`World`, from torchrun's environment (one process without it)."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own stream derived from ``seed`` (rank 0 keeps ``seed``, so
    one process draws as it always did): numpy's ``SeedSequence(seed, spawn_key=(rank,))``."""
    if rank == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence(seed, spawn_key=(rank,)).generate_state(1, np.uint64)[0] >> 1)


@contextlib.contextmanager
def process_group(current: World) -> Iterator[None]:
    """The job's process group while the block runs (nothing for one process): NCCL for
    CUDA tensors (each rank on GPU ``LOCAL_RANK``), gloo for CPU ones."""
    if current.size == 1:
        yield
        return
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(current.local_rank)
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, rank=current.rank, world_size=current.size)
    try:
        yield
    except RuntimeError as err:
        if isinstance(err, dist.DistError) or any(words in str(err) for words in PEER_LOST):
            raise RankFailed(f"rank {current.rank}: another rank of the job is gone ({str(err).splitlines()[0]})") from None
        raise
    finally:
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over the ranks (itself for one process). A NaN on any rank is a
    NaN on every rank, so a non-finite check on the result agrees everywhere."""
    if not active():
        return values
    total = values.clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def highest(value: int) -> int:
    """The largest of the ranks' ``value`` (itself for one process)."""
    if not active():
        return value
    total = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return int(total.item())


def concat(tensor: torch.Tensor) -> torch.Tensor:
    """The ranks' ``tensor`` s (equal shapes) concatenated along dim 0 in rank order."""
    if not active():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` for one process."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agreed(work: Callable[[], T]) -> list[T]:
    """Run ``work`` on every rank and gather its results; when it raised a
    :class:`~diffusion.errors.UserError` on some rank, every rank raises: that rank its own
    error, the others :class:`RankFailed` naming it (no rank is left waiting for the others)."""
    try:
        outcome: tuple[str, Any] = ("ok", work())
    except UserError as err:
        if not active():
            raise
        outcome = ("error", err)
    outcomes = gather(outcome)
    failed = [(rank, err) for rank, (kind, err) in enumerate(outcomes) if kind == "error"]
    if failed:
        rank, err = failed[0]
        if rank == dist.get_rank():
            raise err
        raise RankFailed(f"rank {rank} failed: {err}")
    return [value for _, value in outcomes]


def shard(total: int, current: World) -> range:
    """The contiguous block of ``range(total)`` that rank ``current.rank`` owns (the first
    ``total % size`` ranks own one more)."""
    base, extra = divmod(total, current.size)
    start = current.rank * base + min(current.rank, extra)
    return range(start, start + base + (current.rank < extra))
