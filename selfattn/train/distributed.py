"""DDP helpers: the same entry point runs under ``torchrun --nproc_per_node N``.

Under torchrun (``WORLD_SIZE`` > 1) the process group is initialised with NCCL on CUDA and
gloo on CPU. Each rank takes its slice of the same global batch, so a run with N processes
reproduces one process at equal global batch (up to float reduction order).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_from_env() -> DistInfo:
    return DistInfo(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)), local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def setup(device: "torch.device") -> DistInfo:
    """Join the process group when launched by torchrun; a no-op for one process."""
    import torch.distributed as dist

    info = dist_from_env()
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return info


def teardown(info: DistInfo) -> None:
    import torch.distributed as dist

    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(t: "torch.Tensor", info: DistInfo) -> "torch.Tensor":
    import torch.distributed as dist

    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def broadcast_object(obj: object, info: DistInfo) -> object:
    import torch.distributed as dist

    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj: object, info: DistInfo) -> list[object]:
    """``[obj from rank 0, obj from rank 1, ...]`` on every rank."""
    import torch.distributed as dist

    if not info.enabled:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    import torch.distributed as dist

    if info.enabled:
        dist.barrier()


def shard(t: "torch.Tensor", info: DistInfo) -> "torch.Tensor":
    """This rank's rows of a global batch ``t`` [B, ...] (B divisible by world size)."""
    if not info.enabled:
        return t
    per = t.shape[0] // info.world_size
    return t[info.rank * per : (info.rank + 1) * per]
