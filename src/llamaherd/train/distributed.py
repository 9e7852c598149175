"""torch.distributed set-up for training: process group from torchrun's environment, DDP or FSDP2 wrapping."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn



@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (a single process: rank 0 of 1)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the process group that torchrun describes (gloo on CPU, nccl on GPU); a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank, world, local_rank, device)


def all_reduce_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of `x` over all processes (x itself in a single process)."""
    if info.enabled:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def wrap(module: nn.Module, blocks: list[nn.Module], strategy: str, info: DistInfo) -> nn.Module:
    """DDP (replicated) or FSDP2 (`fully_shard` per block, then the root); unchanged in a single process."""
    if not info.enabled:
        return module
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 shards in place, so it is its own module)."""
    return getattr(module, "module", module) if type(module).__name__ == "DistributedDataParallel" else module


def set_grad_sync(module: nn.Module, enabled: bool) -> None:
    """Skip (or restore) the gradient all-reduce, so accumulation micro-steps communicate once per step."""
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(enabled)
    elif hasattr(module, "require_backward_grad_sync"):  # DDP
        module.require_backward_grad_sync = enabled
