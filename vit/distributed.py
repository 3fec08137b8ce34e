"""Data-parallel training under torchrun: one process per GPU (or CPU process with gloo).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything here is the
single-process identity, so the trainer has one code path.
"""
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device_type: str) -> Context:
    """Join the process group torchrun describes: NCCL on CUDA, gloo on the CPU."""
    if not launched_by_torchrun():
        return Context()
    ctx = Context(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device_type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
    # A bounded timeout: a rank that dies mid-collective ends the job instead of hanging it.
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timedelta(minutes=10))
    return ctx


def teardown(ctx: Context):
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In place over all ranks; a no-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(value, src: int = 0):
    if not (dist.is_available() and dist.is_initialized()):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
