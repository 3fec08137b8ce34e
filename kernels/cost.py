"""A cost model of the kernels: what each launch reads and writes in HBM, the FLOPs the math
needs and the FLOPs the tiles execute, derived from the launch plans rather than typed in.

Each op module exposes `launch_costs(...)` for one call of its op at a given problem size
(its own arguments: rows, columns, heads... never the model), returning one KernelCost per
kernel it launches, forward and backward. `python -m kernels.report` composes them into a
transformer block and a training step and prints the floor: per kernel the larger of its
memory time (bytes / bandwidth) and its arithmetic time (executed FLOPs / peak), summed.

Counting rules, the same for every op:
- bytes read and written: what must cross HBM at the least, each element a launch reads or
  writes counted once, however many of its programs load it (re-reads by other programs
  are taken as L2 hits: a floor);
- bytes loaded: what the launch's programs load, each program's tiles counted once per
  program that touches them (every re-read by another program counted: L2 or HBM). The
  ratio to bytes read shows how much a kernel leans on L2;
- useful FLOPs: 2 per multiply-add of the op's mathematical definition at the real sizes
  (unpadded), elementwise work not counted;
- executed FLOPs: 2 per multiply-add of the tl.dot calls the plan issues, at the padded tile
  sizes and with every recomputation;
- launches: kernels launched; torch ops an op runs besides its Triton kernels (weight casts,
  sums of partial results) are records of their own, with library "torch" and the same rules
  (one launch per kernel-launching aten op; a matmul's executed FLOPs are its useful ones,
  since cuBLAS's tiling is not ours to count).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# The H100 SXM's figures the targets use: HBM3 bandwidth and dense bf16 tensor-core peak.
DEFAULT_BANDWIDTH = 3.3e12  # bytes/s
DEFAULT_PEAK_FLOPS = 790e12  # FLOP/s


@dataclass(frozen=True)
class KernelCost:
    op: str  # the op's public name, e.g. "attention"
    kernel: str  # the @triton.jit function's name, or the torch op's ("aten.sum: dW1 partials")
    phase: str  # "forward" or "backward"
    launches: int
    bytes_read: int
    bytes_written: int
    useful_flops: int
    executed_flops: int
    library: str = "triton"  # "triton": one of our kernels; "torch": a torch op
    bytes_loaded: int | None = None  # None: not counted (taken as bytes_read)

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    def floor_seconds(self, bandwidth: float = DEFAULT_BANDWIDTH, peak_flops: float = DEFAULT_PEAK_FLOPS) -> float:
        """The least time this launch can take: bound by memory or by arithmetic, whichever is slower."""
        return max(self.bytes / bandwidth, self.executed_flops / peak_flops)


def reads(*tensors: tuple[int, int]) -> dict:
    """bytes_read and bytes_loaded of a launch from its inputs, each given as (its bytes, how
    many times the launch's programs load it in all: 1 when each program loads a slice of its
    own): KernelCost(..., **reads((x_bytes, 1), (w_bytes, programs)))."""
    return {"bytes_read": sum(size for size, _ in tensors),
            "bytes_loaded": sum(size * programs for size, programs in tensors)}


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
