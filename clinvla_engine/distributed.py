"""Multi-process training helpers (torchrun / DDP): rank info and an all-gather that keeps gradients.

Both losses see the global batch: each rank scores its own images against every rank's texts and
its own texts against every rank's images. ``gather_with_grad``'s backward sums the gradient that
every rank's loss sends to each slice, and DDP averages parameter gradients over ranks, so the
update equals that of one process holding the whole batch (tested with gloo on two CPU processes).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_env() -> bool:
    """Initialises the process group when launched by torchrun (WORLD_SIZE > 1); returns whether it did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on every slice: sum their gradients
        return grad.chunk(ctx.world, dim=0)[ctx.rank]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(b, ...) on each rank -> (world * b, ...) in rank order; identity in one process."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_mean(value: float) -> float:
    if not is_distributed():
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world_size()
