"""Distributed training: which process this is (`Dist`), joining torchrun's process group, sharing objects.

A plain `tegaki train` is a world of one: every call here is then a no-op. Under
`torchrun --nproc_per_node N -m tegaki train ...` each process learns its rank from the
environment; rank 0 prepares the tokenizer and the shards and tells the others where they are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def init_distributed(device_kind: str) -> Dist:
    """Join the process group that torchrun set up (RANK, WORLD_SIZE, MASTER_ADDR in the
    environment); a plain `tegaki train` is a world of one. NCCL for GPUs, gloo for CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(
        rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", "0")), world_size=dist.get_world_size()
    )


def init_single_process_group(device: torch.device) -> None:
    """A process group of one, for FSDP without torchrun (it shards nothing, but runs the same code)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def broadcast_object(obj: Any, dist_info: Dist) -> Any:
    """Rank 0's `obj` on every rank (each other rank passes anything, usually None)."""
    if not dist_info.enabled:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def destroy_process_group() -> None:
    """Leave the process group, if one was joined (a run under torchrun, or --fsdp)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
