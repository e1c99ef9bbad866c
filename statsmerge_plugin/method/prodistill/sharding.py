R"""ProDistill on several devices (Lightning Fabric, FusionBench's engine): the few-shot samples of
every block sharded across ranks, the coefficient gradients all-reduced.

The pooled few-shot set has ``N`` samples (spec §1.1). Rank ``r`` of ``W`` holds the samples ``g``
with ``g % W == r`` in its dual-input cache, at row ``g // W``: its stage 0, teacher passes,
training forwards and propagation touch only those (``≈ N / W`` per rank). Every rank draws the
same global permutation of ``0..N-1`` for an epoch (one generator, one seed), cuts it into the same
minibatches of ``batch_size`` and computes the loss of its own samples of each minibatch; the
squared error is a sum over samples, so the sum over ranks of the per-rank gradients is the
gradient of the whole minibatch, and after an all-reduce every rank takes the same Adam step:
the coefficients stay identical on every rank (checked after every block,
:func:`max_rank_difference`). With one process this is exactly the single-device loop.
"""

from __future__ import annotations

from typing import Iterator, Sequence, Tuple

import torch
from torch import Tensor


class SampleShard:
    """Which of ``num_samples`` pooled samples rank ``rank`` of ``world_size`` holds."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.num_samples, self.rank, self.world_size = int(num_samples), int(rank), int(world_size)
        #: global indices of this rank's samples, in the order of its cache rows
        self.owned = torch.arange(self.rank, self.num_samples, self.world_size)

    def __len__(self) -> int:
        return len(self.owned)

    def rows_of(self, global_indices: Tensor) -> Tensor:
        """Cache rows of this rank's samples among ``global_indices`` (in their order)."""
        mine = global_indices[global_indices % self.world_size == self.rank]
        return torch.div(mine, self.world_size, rounding_mode="floor")

    def positions_in(self, offset: int, size: int) -> Tensor:
        """Positions ``p`` in ``[0, size)`` of the samples ``offset + p`` this rank holds (which
        rows of an input batch that starts at global sample ``offset`` to embed)."""
        p = torch.arange(size)
        return p[(offset + p) % self.world_size == self.rank]

    def local_task_ids(self, task_ids: Tensor) -> Tensor:
        return task_ids[self.owned]

    def epoch(self, batch_size: int, generator: torch.Generator) -> Iterator[Tuple[Tensor, int]]:
        """One epoch of mixed-task minibatches (spec §1.1): ``(rows of this rank, size of the global
        minibatch)``; the rows may be empty on a rank."""
        perm = torch.randperm(self.num_samples, generator=generator)
        for start in range(0, self.num_samples, batch_size):
            chunk = perm[start : start + batch_size]
            yield self.rows_of(chunk), len(chunk)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_sum(value: float, device) -> float:
    """The sum over ranks of a float (itself in one process)."""
    if not _distributed() or torch.distributed.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return float(t.item())


def all_reduce_gradients(params: Sequence[Tensor]) -> None:
    """Sum every parameter's gradient over the ranks, in the order of ``params`` (a rank whose
    minibatch share was empty contributes zeros)."""
    if not _distributed() or torch.distributed.get_world_size() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)


@torch.no_grad()
def max_rank_difference(tensors: Sequence[Tensor]) -> float:
    """``max |t_r - t_0|`` over ranks ``r`` and every element of ``tensors`` (0 in one process):
    rank 0's values are broadcast one tensor at a time."""
    if not _distributed() or torch.distributed.get_world_size() == 1:
        return 0.0
    worst = torch.zeros((), dtype=torch.float64, device=tensors[0].device if tensors else "cpu")
    for t in tensors:
        reference = t.detach().clone()
        torch.distributed.broadcast(reference, src=0)
        worst = torch.maximum(worst, (t.detach() - reference).abs().max().to(worst.dtype))
    torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    return float(worst.item())
