"""A cost model of the kernels: what each launch reads and writes in HBM, the FLOPs the math
needs and the FLOPs the tiles execute, derived from the launch plans rather than typed in.

Each op module exposes `launch_costs(...)` for one call of its op at a given problem size
(its own arguments: rows, columns, heads... never the model), returning one KernelCost per
kernel it launches, forward and backward. `python -m kernels.report` composes them into a
transformer block and a training step and prints the floor: per kernel the larger of its
memory time (bytes / bandwidth) and its arithmetic time (executed FLOPs / peak), summed.

Counting rules, the same for every op:
- bytes: each tensor a kernel reads or writes in HBM, once per program that touches it
  (a tile re-read by several programs counts each time; L2 hits are not modelled);
- useful FLOPs: 2 per multiply-add of the op's mathematical definition at the real sizes
  (unpadded), elementwise work not counted;
- executed FLOPs: 2 per multiply-add of the tl.dot calls the plan issues, at the padded tile
  sizes and with every recomputation.
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
    kernel: str  # the @triton.jit function's name
    phase: str  # "forward" or "backward"
    launches: int
    bytes_read: int
    bytes_written: int
    useful_flops: int
    executed_flops: int

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    def floor_seconds(self, bandwidth: float = DEFAULT_BANDWIDTH, peak_flops: float = DEFAULT_PEAK_FLOPS) -> float:
        """The least time this launch can take: bound by memory or by arithmetic, whichever is slower."""
        return max(self.bytes / bandwidth, self.executed_flops / peak_flops)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
