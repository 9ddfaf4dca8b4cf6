"""Scale-out through PyTorch's own DDP, started by ``torchrun``; nothing home-made.

``torchrun --nproc_per_node=N -m minigpt2 train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK; we join
the process group (gloo on CPU, nccl on CUDA) and wrap the model in ``DistributedDataParallel``.
Without those variables everything here is a no-op and training runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and reports."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: torch.device) -> DistInfo:
    """Join the process group if torchrun started us; returns this process's place in it."""
    if not launched_by_torchrun():
        return DistInfo()
    info = DistInfo(
        int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    )
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return info


def process_device(device: torch.device, info: DistInfo) -> torch.device:
    """Each process on a multi-GPU machine drives the GPU of its local rank."""
    if device.type == "cuda" and info.enabled:
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return device


def mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a tensor over all processes (itself when there is one)."""
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def any_true(flag: bool, device: torch.device, info: DistInfo) -> bool:
    """True on every process if it is true on any: keeps decisions such as stopping in step."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def shutdown(info: DistInfo) -> None:
    """Leave the process group together: a process that tears gloo down while another is still
    busy (rank 0 writing loss.png) can abort ("terminate called without an active exception")."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
