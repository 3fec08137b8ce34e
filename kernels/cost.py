"""A cost model of the kernels: what each launch reads and writes in HBM, the FLOPs the math
needs and the FLOPs the tiles execute, derived from the launch plans rather than typed in.

One function per op, `<op>_costs(...)`, for one call of the op at a given problem size (the
op's own arguments: rows, columns, heads... never the model), returns one KernelCost per
kernel it launches, forward and backward, read off the op module's launch plan (its
launch_plan and plan_launches); the op modules know nothing of this one. `python -m
kernels.report` composes them into a transformer block and a training step and prints the
floor: per kernel the larger of its memory time (bytes / bandwidth) and its arithmetic time
(executed FLOPs / peak), summed.

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
import triton

from kernels import _fused_linear as fl
from kernels import attention, layernorm_linear, layernorm_mlp, linear_residual

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


# ---------------------------------------------------------------------------------------------
# Counting helpers
# ---------------------------------------------------------------------------------------------

def matmul_flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def rows_in_tiles(n_rows: int, block: int) -> list[int]:
    """The real rows each tile of `block` rows covers (the last may be partial)."""
    full, rest = divmod(n_rows, block)
    return [block] * full + ([rest] if rest else [])


class Traffic:
    """HBM bytes of one launch, counted as kernels/cost.py says. Each program's loads are
    recorded as it makes them: all count in bytes_loaded; bytes_read counts each element once,
    however many programs load it."""

    def __init__(self):
        self.bytes_loaded = 0
        self.bytes_written = 0
        self._own_bytes_read = 0
        self._shared_parts = set()
        self._rows_read = {}  # tensor name -> (bytes per row, [(first row, stop row)])

    def read(self, elements: int, dtype: torch.dtype, shared=None):
        """One program loads `elements` of `dtype`; shared: a name for the part when other
        programs load the same part (a weight, a tile of one), None when no other does."""
        size = elements * element_size(dtype)
        self.bytes_loaded += size
        if shared is None or shared not in self._shared_parts:
            self._own_bytes_read += size
        if shared is not None:
            self._shared_parts.add(shared)

    def read_rows(self, tensor: str, first: int, count: int, row_elements: int, dtype: torch.dtype):
        """One program loads rows [first, first + count) of a [rows, row_elements] tensor that
        other programs load rows of too, with other splits of the rows perhaps."""
        row_bytes = row_elements * element_size(dtype)
        self.bytes_loaded += count * row_bytes
        self._rows_read.setdefault(tensor, (row_bytes, []))[1].append((first, first + count))

    @property
    def bytes_read(self) -> int:
        total = self._own_bytes_read
        for row_bytes, ranges in self._rows_read.values():
            covered_to = 0
            for start, stop in sorted(ranges):
                start = max(start, covered_to)
                if stop > start:
                    total += (stop - start) * row_bytes
                    covered_to = stop
        return total

    def write(self, elements: int, dtype: torch.dtype, programs: int = 1):
        self.bytes_written += programs * elements * element_size(dtype)


def kernel_cost(op: str, launch, phase: str, traffic: Traffic, useful_flops: int, executed_flops: int):
    return KernelCost(op=op, kernel=kernel_name(launch.kernel), phase=phase, launches=1,
                      bytes_read=traffic.bytes_read, bytes_loaded=traffic.bytes_loaded,
                      bytes_written=traffic.bytes_written, useful_flops=useful_flops, executed_flops=executed_flops)


def kernel_name(kernel) -> str:
    """A @triton.jit function's name, compiled or interpreted."""
    return kernel.fn.__name__


def read_scales(traffic: Traffic, row0: int, rows: int, total_rows: int, samples: int, dtype: torch.dtype):
    """A program over rows [row0, row0 + rows) of total_rows loads the per-sample scale of each
    of the samples among them (a sample split between two programs' rows is loaded by both);
    samples 0: no scales, nothing loaded."""
    if samples and rows:
        rows_per_sample = max(1, total_rows // samples)
        first = row0 // rows_per_sample
        traffic.read_rows("scale", first, (row0 + rows - 1) // rows_per_sample + 1 - first, 1, dtype)


# ---------------------------------------------------------------------------------------------
# torch ops around our kernels
# ---------------------------------------------------------------------------------------------

def gradient_sum_costs(numel: int, dtype: torch.dtype) -> list[KernelCost]:
    """Autograd's sum of two gradients of one tensor (backward only)."""
    size = numel * element_size(dtype)
    return [KernelCost(op="autograd", kernel="aten.add: gradient sum", phase="backward", launches=1,
                       bytes_read=2 * size, bytes_written=size, useful_flops=0, executed_flops=0, library="torch")]


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

def attention_costs(batch: int, seq_len: int, num_heads: int, head_dim: int, dtype: torch.dtype) -> list[KernelCost]:
    """Every launch of one attention call, forward then backward, on a [batch, seq_len,
    3 * num_heads * head_dim] qkv of `dtype`, derived from the launch plan.

    Useful FLOPs: the forward's two matmuls (Q K^T, P V) and the backward's four (dV = P^T dO,
    dP = dO V^T, dQ = dS K, dK = dS^T Q), at the real sizes. Executed: every tl.dot at its
    padded tile, with the backward's recomputation of Q K^T and, in the streaming plan, the
    dq kernel's second dP.
    """
    plan = attention.launch_plan(seq_len, head_dim, dtype)
    launches = attention.plan_launches(batch, seq_len, num_heads, head_dim, dtype)
    batch_heads = batch * num_heads
    # One head's [N, head_dim] slice of q, k, v, out, dout..., over every (batch, head), in
    # bytes, and one fp32 statistic per row (lse, delta).
    rows = batch_heads * seq_len * head_dim * element_size(dtype)
    stats = batch_heads * seq_len * 4
    one_matmul = 2 * batch_heads * seq_len * seq_len * head_dim  # an N x N x head_dim product per head
    block_d = triton.next_power_of_2(head_dim)

    def cost(launch, phase, read, written, useful_matmuls, executed):
        return KernelCost(op="attention", kernel=kernel_name(launch.kernel), phase=phase, launches=1, **read,
                          bytes_written=written, useful_flops=useful_matmuls * one_matmul, executed_flops=executed)

    def padded_matmul(query_rows, keys):
        """An N x N x head_dim product per head with queries and keys padded to tiles."""
        return 2 * batch_heads * query_rows * keys * block_d

    if isinstance(plan, attention.WholeSequencePlan):
        # Each program loads its own head's q, k, v (and dout, lse) once; the tail part's
        # queries load the keys again from L2 inside the same program.
        tokens = plan.tokens
        return [cost(launches.forward, "forward", reads((3 * rows, 1)), rows + stats,
                     2, 2 * padded_matmul(tokens, tokens)),
                cost(launches.backward, "backward", reads((4 * rows + stats, 1)), 3 * rows,
                     4, 5 * padded_matmul(tokens, tokens))]

    forward, dq, dkdv = plan.forward, plan.dq, plan.dkdv

    def padded(block):
        return triton.cdiv(seq_len, block) * block

    def programs(block):
        return triton.cdiv(seq_len, block)

    return [
        # Each query block loads its q rows and every key and value.
        cost(launches.forward, "forward", reads((rows, 1), (2 * rows, programs(forward.block_m))),
             rows + stats, 2, 2 * padded_matmul(padded(forward.block_m), padded(forward.block_n))),
        # Each query block loads its q, out and dout rows and lse, and every key and value;
        # writes dq and delta. Its dots: Q K^T again, dP again (the dk/dv kernel's is counted
        # useful) and dQ.
        cost(launches.backward, "backward",
             reads((3 * rows + stats, 1), (2 * rows, programs(dq.block_m))), rows + stats,
             1, 3 * padded_matmul(padded(dq.block_m), padded(dq.block_n))),
        # Each key block loads its k and v rows, and every q, dout, lse and delta; writes dk
        # and dv. Its dots: Q K^T again, dP, dV and dK.
        cost(launches.dkdv, "backward",
             reads((2 * rows, 1), (2 * rows + 2 * stats, programs(dkdv.block_n))), 2 * rows,
             3, 4 * padded_matmul(padded(dkdv.block_m), padded(dkdv.block_n))),
    ]


# ---------------------------------------------------------------------------------------------
# The fused linear ops
# ---------------------------------------------------------------------------------------------

def layernorm_linear_costs(rows: int, cols: int, out_features: int, activation_dtype: torch.dtype = torch.float32,
                 matmul_dtype: torch.dtype = torch.bfloat16, parameter_dtype: torch.dtype = torch.float32) -> list:
    """KernelCost of every launch of one forward and one backward of layernorm_linear.

    rows: x's rows (B * N); cols: C; out_features: the linear's outputs (3C for QKV);
    activation_dtype: x's (and dx's) dtype; matmul_dtype: the operands' and the output's (the
    autocast dtype); parameter_dtype: the four parameters'.
    """
    plan = layernorm_linear.launch_plan(cols, matmul_dtype)
    launches = layernorm_linear.plan_launches(rows, cols, out_features, matmul_dtype)
    num_chunks, block_c = plan.panel.num_chunks, plan.panel.block_c
    tiles = rows_in_tiles(rows, plan.block_m)
    useful = matmul_flops(rows, out_features, cols)

    forward = Traffic()
    for n in tiles:
        forward.read(n * cols, activation_dtype)
        forward.read(2 * cols + out_features * cols + out_features, parameter_dtype, shared="parameters")
        forward.write(n * out_features + n * cols, matmul_dtype)  # out, x_hat
        forward.write(2 * n, torch.float32)
    step = (num_chunks * matmul_flops(plan.block_m, plan.forward_step, block_c) if plan.half
            else triton.cdiv(cols, plan.block_k) * matmul_flops(plan.block_m, plan.forward_step, plan.block_k))
    costs = [kernel_cost("layernorm_linear", launches.forward, "forward", forward, useful,
                            len(tiles) * triton.cdiv(out_features, plan.forward_step) * step)]

    split = launches.backward_grid
    q_tiles = triton.cdiv(out_features, plan.block_q)
    weight = Traffic()
    executed = 0
    for s in range(split.splits):
        n = max(0, min(split.rows_per_split, rows - s * split.rows_per_split))
        for q in range(q_tiles):
            width = min(plan.block_q, out_features - q * plan.block_q)
            weight.read(n * width, matmul_dtype)  # dout
            weight.read_rows("x_hat", s * split.rows_per_split, n, cols, matmul_dtype)
            weight.write(cols * width, torch.float32)
            weight.write(width, torch.float64)
            executed += triton.cdiv(n, plan.block_r) * num_chunks * matmul_flops(block_c, plan.block_q,
                                                                                      plan.block_r)
    costs.append(kernel_cost("layernorm_linear", launches.weight, "backward", weight, useful, executed))

    row_kernel = Traffic()
    for n in tiles:
        row_kernel.read(n * out_features, matmul_dtype)
        row_kernel.read(out_features * cols + cols, parameter_dtype, shared="weight, ln_weight")
        row_kernel.read(2 * n, torch.float32)
        row_kernel.read(n * cols, activation_dtype)
        row_kernel.write(n * cols, activation_dtype)
    for slab, slab_cols in enumerate(rows_in_tiles(cols, fl.REDUCTION_SLAB)):
        row_kernel.read(split.splits * slab_cols * out_features, torch.float32)
        row_kernel.read(split.splits * out_features, torch.float64, shared="db partials")
        row_kernel.read(slab_cols, parameter_dtype)  # ln_bias
        row_kernel.write(slab_cols * out_features + 2 * slab_cols + (out_features if slab == 0 else 0),
                         parameter_dtype)
    executed = len(tiles) * triton.cdiv(out_features, plan.block_k) * plan.row.panel.num_chunks * matmul_flops(
        plan.block_m, plan.row.panel.block_c, plan.block_k)
    costs.append(kernel_cost("layernorm_linear", launches.row, "backward", row_kernel, useful, executed))
    return costs


def linear_residual_costs(rows: int, in_features: int, out_features: int, activation_dtype: torch.dtype = torch.float32,
                 input_dtype: torch.dtype = torch.bfloat16, matmul_dtype: torch.dtype = torch.bfloat16,
                 parameter_dtype: torch.dtype = torch.float32, samples: int = 0) -> list:
    """KernelCost of every launch of one forward and one backward of linear_residual.

    rows: h's rows (B * N); in_features: C_in; out_features: C_out; activation_dtype: the
    residual's (and the output's, dy's) dtype; input_dtype: h's (the attention output:
    bf16 under autocast); matmul_dtype: the operands'; parameter_dtype: weight's and bias';
    samples: B when a branch_scale is passed, 0 without one.
    """
    forward_plan = linear_residual.launch_plan(out_features, matmul_dtype)
    input_plan = linear_residual.launch_plan(in_features, matmul_dtype)
    launches = linear_residual.plan_launches(rows, in_features, out_features, matmul_dtype)
    useful = matmul_flops(rows, out_features, in_features)

    forward = Traffic()
    tiles = rows_in_tiles(rows, forward_plan.block_m)
    for index, n in enumerate(tiles):
        forward.read(n * in_features, input_dtype)
        forward.read(out_features * in_features + out_features, parameter_dtype, shared="parameters")
        forward.read(n * out_features, activation_dtype)
        read_scales(forward, index * forward_plan.block_m, n, rows, samples, activation_dtype)
        forward.write(n * out_features, activation_dtype)
    panel = forward_plan.panel
    executed = len(tiles) * triton.cdiv(in_features, forward_plan.block_k) * panel.num_chunks * matmul_flops(
        forward_plan.block_m, panel.block_c, forward_plan.block_k)
    costs = [kernel_cost("linear_residual", launches.forward, "forward", forward, useful, executed)]

    split = launches.backward_grid
    q_tiles = triton.cdiv(in_features, forward_plan.block_q)
    weight = Traffic()
    executed = 0
    for s in range(split.splits):
        row0 = s * split.rows_per_split
        n = max(0, min(split.rows_per_split, rows - row0))
        for q in range(q_tiles):
            width = min(forward_plan.block_q, in_features - q * forward_plan.block_q)
            weight.read(n * width, input_dtype)
            weight.read_rows("dy", row0, n, out_features, activation_dtype)
            read_scales(weight, row0, n, rows, samples, activation_dtype)
            weight.write(out_features * width, torch.float32)
            if q == 0:
                weight.write(out_features, torch.float64)
            executed += triton.cdiv(n, forward_plan.block_r) * panel.num_chunks * matmul_flops(
                panel.block_c, forward_plan.block_q, forward_plan.block_r)
    costs.append(kernel_cost("linear_residual", launches.weight, "backward", weight, useful,
                                executed))

    row_kernel = Traffic()
    tiles = rows_in_tiles(rows, input_plan.block_m)
    for index, n in enumerate(tiles):
        row_kernel.read(n * out_features, activation_dtype)
        row_kernel.read(out_features * in_features, parameter_dtype, shared="weight")
        read_scales(row_kernel, index * input_plan.block_m, n, rows, samples, activation_dtype)
        row_kernel.write(n * in_features, input_dtype)
    for slab_rows in rows_in_tiles(out_features, fl.REDUCTION_SLAB):
        row_kernel.read(split.splits * slab_rows * in_features, torch.float32)
        row_kernel.read(split.splits * slab_rows, torch.float64)
        row_kernel.write(slab_rows * in_features + slab_rows, parameter_dtype)
    executed = len(tiles) * triton.cdiv(out_features, input_plan.block_k) * input_plan.panel.num_chunks * \
        matmul_flops(input_plan.block_m, input_plan.panel.block_c, input_plan.block_k)
    costs.append(kernel_cost("linear_residual", launches.row, "backward", row_kernel, useful,
                                executed))
    return costs


def layernorm_mlp_costs(rows: int, cols: int, hidden: int, activation_dtype: torch.dtype = torch.float32,
                 matmul_dtype: torch.dtype = torch.bfloat16, parameter_dtype: torch.dtype = torch.float32,
                 second_gelu: bool = False, samples: int = 0) -> list:
    """KernelCost of every launch of one forward and one backward of layernorm_mlp.

    rows: x's rows (B * N); cols: C; hidden: H; activation_dtype: x's (and dy's) dtype;
    matmul_dtype: the operands' (the autocast dtype); parameter_dtype: the six parameters';
    second_gelu: the option; samples: B when a branch_scale is passed, 0 without one.
    """
    plan = layernorm_mlp.launch_plan(cols, matmul_dtype)
    launches = layernorm_mlp.plan_launches(rows, cols, hidden, second_gelu, matmul_dtype)
    out_dtype = fl.result_dtype(activation_dtype, matmul_dtype, *((activation_dtype,) if samples else ()))
    num_chunks, block_c = plan.panel.num_chunks, plan.panel.block_c

    # Forward: one program per BLOCK_M rows.
    forward = Traffic()
    row_tiles = rows_in_tiles(rows, plan.block_m)
    for index, n in enumerate(row_tiles):
        forward.read(n * cols, activation_dtype)
        forward.read(2 * cols + 2 * hidden * cols + hidden + cols, parameter_dtype, shared="parameters")
        read_scales(forward, index * plan.block_m, n, rows, samples, activation_dtype)
        forward.write(n * cols, out_dtype)
        forward.write(2 * n, torch.float32)
        forward.write(n * cols + n * hidden + (n * cols if second_gelu else 0), matmul_dtype)  # x_hat, pre, z
    steps = triton.cdiv(hidden, plan.forward_step)
    fc1_dot = (num_chunks * matmul_flops(plan.block_m, plan.forward_step, block_c) if plan.half
               else triton.cdiv(cols, plan.block_k) * matmul_flops(plan.block_m, plan.forward_step, plan.block_k))
    fc2_dot = num_chunks * matmul_flops(plan.block_m, block_c, plan.forward_step)
    mlp_flops = 2 * matmul_flops(rows, hidden, cols)
    costs = [kernel_cost("layernorm_mlp", launches.forward, "forward", forward, mlp_flops,
                            len(row_tiles) * steps * (fc1_dot + fc2_dot))]

    # Backward, kernel 1: dpre programs and dW2 programs over (hidden tile, row split).
    grid = launches.backward_grid
    weight = Traffic()
    executed = 0
    for split_plan, is_pre in ((grid.pre, True), (grid.w2, False)):
        for split in range(split_plan.splits):
            row0 = split * split_plan.rows_per_split
            n = max(0, min(split_plan.rows_per_split, rows - row0))
            row_steps = triton.cdiv(n, plan.block_r)
            for q in range(grid.q_tiles):
                width = min(plan.block_q, hidden - q * plan.block_q)
                weight.read_rows("dy", row0, n, cols, activation_dtype)
                if second_gelu:
                    weight.read_rows("z", row0, n, cols, matmul_dtype)
                read_scales(weight, row0, n, rows, samples, activation_dtype)
                weight.read_rows(("pre", q), row0, n, width, matmul_dtype)
                panel_dots = row_steps * num_chunks * matmul_flops(block_c, plan.block_q, plan.block_r)
                if is_pre:
                    weight.read(cols * width, parameter_dtype, shared=("w2", q))
                    weight.read_rows("x_hat", row0, n, cols, matmul_dtype)
                    weight.write(n * width, matmul_dtype)  # dpre
                    weight.write(cols * width, torch.float32)  # G partial
                    weight.write(width, torch.float64)  # db1 partial
                    executed += panel_dots + row_steps * triton.cdiv(cols, plan.block_k) * matmul_flops(
                        plan.block_r, plan.block_q, plan.block_k)
                else:
                    weight.write(cols * width, torch.float32)  # dW2 partial
                    if q == 0:
                        weight.write(cols, torch.float64)  # db2 partial
                    executed += panel_dots
    costs.append(kernel_cost("layernorm_mlp", launches.weight, "backward", weight,
                                3 * matmul_flops(rows, hidden, cols), executed))

    # Backward, kernel 2: one program per BLOCK_M rows, the first few also finish a slab of C.
    row_kernel = Traffic()
    input_tiles = rows_in_tiles(rows, plan.block_m)
    for n in input_tiles:
        row_kernel.read(n * hidden, matmul_dtype)  # dpre
        row_kernel.read(hidden * cols + cols, parameter_dtype, shared="w1, ln_weight")
        row_kernel.read(2 * n, torch.float32)
        row_kernel.read(2 * n * cols, activation_dtype)  # x, dy
        row_kernel.write(n * cols, activation_dtype)  # dx
    for slab, slab_cols in enumerate(rows_in_tiles(cols, fl.REDUCTION_SLAB)):
        row_kernel.read(grid.pre.splits * slab_cols * hidden + grid.w2.splits * slab_cols * hidden, torch.float32)
        row_kernel.read(grid.pre.splits * hidden, torch.float64, shared="db1 partials")
        row_kernel.read(grid.w2.splits * slab_cols, torch.float64)
        row_kernel.read(slab_cols, parameter_dtype)  # ln_bias
        row_kernel.write(2 * slab_cols * hidden + 3 * slab_cols + (hidden if slab == 0 else 0), parameter_dtype)
    executed = len(input_tiles) * triton.cdiv(hidden, plan.block_k) * plan.row.panel.num_chunks * matmul_flops(
        plan.block_m, plan.row.panel.block_c, plan.block_k)
    costs.append(kernel_cost("layernorm_mlp", launches.row, "backward", row_kernel,
                                matmul_flops(rows, hidden, cols), executed))
    return costs
