"""The global batch across data-parallel workers: shard bounds, a row gather with gradient,
and a broadcast from rank 0.

Every stage loss is computed over the *global* batch: each worker embeds its contiguous
shard of the batch's rows, :func:`gather_rows` puts every worker's rows back in the
batch's order, and each worker then computes the same loss from the same gathered
tensors. With one worker every function here returns its input unchanged, so a
one-worker run computes exactly what it did before the gather existed.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def shard_sizes(rows: int, world: int) -> list[int]:
    """How many rows of a ``rows``-row batch each worker holds: ``np.array_split``'s rule
    (the first ``rows % world`` workers hold one more), which is how batches are sharded."""
    base, extra = divmod(rows, world)
    return [base + (1 if rank < extra else 0) for rank in range(world)]


def shard_bounds(rows: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of ``rank``'s contiguous shard of a ``rows``-row batch."""
    sizes = shard_sizes(rows, world)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def _all_gather(local: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    most = max(sizes)
    if most == 0:
        return local
    # all_gather needs one shape on every rank: pad each shard to the largest, trim after.
    padded = local.new_zeros((most, *local.shape[1:]))
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


class _GatherRows(torch.autograd.Function):
    """All-gather whose backward keeps the local rows' gradient, times the world size.

    Every rank computes the *same* loss from the gathered rows, so the gradient of the
    global loss with respect to this rank's rows is the slice its own backward produced;
    the runner then *averages* gradients over ranks (DDP's rule), which the factor
    ``world`` undoes. The backward needs no collective, so ranks whose shard holds no
    rows of a tensor (no gradient path) cannot deadlock the others.
    """

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
        ctx.start, ctx.count, ctx.world = sum(sizes[:rank]), sizes[rank], len(sizes)
        return _all_gather(local, sizes)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad[ctx.start:ctx.start + ctx.count] * ctx.world, None, None


def gather_rows(local: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Every rank's rows of a batch tensor, in rank order ([sum(sizes), ...]).

    ``sizes[r]`` is rank r's row count (exchanged first when not given); the gradient
    flows to the local rows (see :class:`_GatherRows`), and only when every rank computes
    the same loss from the result. One worker: ``local`` itself.
    """
    rank, world = rank_and_world()
    if world == 1:
        return local
    if sizes is None:
        count = torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device)
        counts = [torch.empty_like(count) for _ in range(world)]
        dist.all_gather(counts, count)
        sizes = [int(c.item()) for c in counts]
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) != world or local.shape[0] != sizes[rank]:
        raise ValueError(f"gather_rows: rank {rank} holds {local.shape[0]} rows, sizes say {sizes}")
    if local.dtype == torch.bool:  # not every backend reduces bools
        return _all_gather(local.to(torch.uint8), sizes).bool()
    if local.requires_grad and torch.is_grad_enabled():
        return _GatherRows.apply(local, sizes, rank)
    return _all_gather(local.detach(), sizes)


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object); one worker: ``value``."""
    _, world = rank_and_world()
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]



def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank, as DDP's
    ``broadcast_buffers`` does: each rank updates them from its own shard, and the frozen
    features every rank computes after a stage must come from one model, the one rank 0 saves."""
    _, world = rank_and_world()
    if world == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)
