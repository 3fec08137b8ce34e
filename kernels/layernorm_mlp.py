"""Fused LayerNorm + MLP sub-block, residual included: x + s * act2(fc2(gelu(fc1(layer_norm(x))))).

Same signature and math as vit.backends.torch_layernorm_mlp: exact (erf) GELU, weights in
nn.Linear's [out, in] layout (w1 [H, C], w2 [C, H]), x of shape [..., C] seen as [rows, C].
Options: second_gelu (act2 = GELU, the reference's Linear-GELU-Linear-GELU MLP; else the
identity) and branch_scale, a [B] tensor s of per-sample scales (stochastic depth: 0 for a
dropped sample, 1/(1-p) for a kept one); None means 1 everywhere.

Forward, one kernel, one pass. A program owns BLOCK_M rows: it computes their LayerNorm
statistics once, keeps layer_norm(x) on chip (the row panel, see kernels/_fused_linear.py),
and walks the hidden units once in BLOCK_H chunks: fc1 for the chunk, GELU, and straight
into fc2's [BLOCK_M, C] accumulator. fc1 is never recomputed. Then bias, the optional second
GELU, the branch scale and the residual, and y is written.

What the backward needs is saved, not recomputed: per-row mean and rstd; x_hat =
(x - mean) * rstd and the pre-activation fc1(layer_norm(x)), both in the matmul dtype; with
the second GELU also fc2's output z. At the model's shape (8,320 rows, C = H = 384, bf16): pre
is 6.4 MB, written here and read by the two kinds of weight-gradient program (19.2 MB in all,
5.8 us at 3.3 TB/s); recomputing it there would be two more fc1 matmuls (4.9 GFLOP, 6.2 us at
790 TFLOP/s, a third more executed FLOPs in the sub-block's training step) on top of the
LayerNorm. x_hat (6.4 MB written) is what the dpre programs contract with: each of the 12
hidden tiles reads it in bf16, 77 MB in all by kernels/cost.py's count, where fp32 x and the
statistics would be 154 MB. Saved, the backward also uses exactly the rounded activations the
forward used, as torch's autograd does.

Backward, two kernels (the pattern of kernels/_fused_linear.py):
  1. weight-gradient kernel, two kinds of program, each over a split of the rows and a
     BLOCK_Q-wide tile of the hidden units:
       - dpre programs: dz = s * dy (* gelu'(z)), dpre = (dz @ w2) * gelu'(pre) for the tile,
         written in the matmul dtype for kernel 2; G^T += x_hat^T @ dpre over the split and
         db1 partials;
       - dW2 programs: dW2[:, tile] += dz^T @ gelu(pre) over the split, and db2 partials.
     A dpre program does two matmuls per row step and a dW2 program one, so the dW2
     programs take twice the splits (half the rows each).
  2. row kernel: d_normalized = dpre @ w1 for BLOCK_M full rows, the LayerNorm backward with
     that panel in registers, dx = dy + ...; and its slab of the reductions: dW1, db1,
     dgamma, dbeta from G and db1 (see kernels/_fused_linear.py), dW2 and db2 summed.
Every matmul of the backward runs once: 4 x 2RCH FLOPs, the useful work.

Precision: matmul accumulation and the LayerNorm/GELU math are fp32; bias and LayerNorm-
parameter sums fp64. Matmul operands are in the matmul dtype: x's, or the autocast dtype when
autocast is on for x's device (as torch does for F.linear). Output dtype: torch's promotion of
x, the matmul dtype and branch_scale (x's dtype under autocast); dx has x's dtype, every
parameter gradient its parameter's. Tilings are in _plan below.

The op is a PyTorch operator (torch.ops.vit_kernels.layernorm_mlp, with a fake for tracing
and its backward registered), so torch.compile traces through it without a graph break.
"""
import functools
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import _common
from kernels import _fused_linear as fl

# Block pointers are deliberate (kernels/_fused_linear.py): silence Triton's deprecation
# notice for them rather than print it into every training and bench log.
warnings.filterwarnings("ignore", message="tl.make_block_ptr is deprecated", category=UserWarning)

OP_NAME = "layernorm_mlp"


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["n_rows", "rows_per_sample", "has_scale"])
def _ln_mlp_forward_kernel(
    x_ptr, y_ptr, ln_weight_ptr, ln_bias_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, scale_ptr,
    mean_ptr, rstd_ptr, x_hat_ptr, pre_ptr, z_ptr,
    n_rows, n_cols, n_hidden, stride_x, stride_y, rows_per_sample, has_scale, eps,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, NUM_CHUNKS: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr, PANEL: tl.constexpr, SECOND_GELU: tl.constexpr,
    MATMUL_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    row0 = tl.program_id(0) * BLOCK_M
    mean, rstd = fl.row_statistics(x_ptr, row0, n_rows, n_cols, stride_x, eps, BLOCK_M, BLOCK_C, NUM_CHUNKS)
    rows = row0 + tl.arange(0, BLOCK_M)
    tl.store(mean_ptr + rows, mean, mask=rows < n_rows)
    tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)
    panel = fl.normalized_panel(x_ptr, x_hat_ptr, ln_weight_ptr, ln_bias_ptr, mean, rstd, row0, n_rows, n_cols,
                                stride_x, BLOCK_M, BLOCK_C, NUM_CHUNKS, PANEL, MATMUL_DTYPE)

    out = (tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32),) * NUM_CHUNKS
    for hidden0 in range(0, n_hidden, BLOCK_H):
        pre = fl.normalized_times_weight(panel, x_ptr, ln_weight_ptr, ln_bias_ptr, mean, rstd, w1_ptr, row0, hidden0,
                                         n_rows, n_cols, n_hidden, stride_x, BLOCK_M, BLOCK_C, NUM_CHUNKS, BLOCK_K,
                                         BLOCK_H, PANEL, MATMUL_DTYPE, INPUT_PRECISION)
        pre = (pre + fl.load_vector(b1_ptr, hidden0, n_hidden, BLOCK_H)[None, :]).to(MATMUL_DTYPE)
        fl.store_tile(pre_ptr, pre, row0, hidden0, n_rows, n_hidden, n_hidden, BLOCK_M, BLOCK_H)
        # Hidden units past H have pre = 0, so GELU gives 0, and w2 reads 0 there anyway.
        hidden = fl.gelu(pre.to(tl.float32)).to(MATMUL_DTYPE)
        out = fl.accumulate_times_weight(out, hidden, w2_ptr, hidden0, n_hidden, n_cols, True, BLOCK_H, BLOCK_C,
                                         NUM_CHUNKS, MATMUL_DTYPE, INPUT_PRECISION)

    scale = fl.sample_scale(scale_ptr, has_scale, row0, n_rows, rows_per_sample, BLOCK_M)
    for k in tl.static_range(NUM_CHUNKS):
        col0 = k * BLOCK_C
        branch = out[k] + fl.load_vector(b2_ptr, col0, n_cols, BLOCK_C)[None, :]
        if SECOND_GELU:
            z = branch.to(MATMUL_DTYPE)
            fl.store_tile(z_ptr, z, row0, col0, n_rows, n_cols, n_cols, BLOCK_M, BLOCK_C)
            branch = fl.gelu(z.to(tl.float32))
        residual = fl.load_tile(x_ptr, row0, col0, n_rows, n_cols, stride_x, BLOCK_M, BLOCK_C).to(tl.float32)
        fl.store_tile(y_ptr, residual + scale[:, None] * branch, row0, col0, n_rows, n_cols, stride_y, BLOCK_M,
                      BLOCK_C)


@triton.jit
def _branch_gradient_transposed(dy_ptr, z_ptr, scale, row0, col0, n_rows, n_cols, stride_dy,
                                BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, SECOND_GELU: tl.constexpr):
    """dz = s * dy (* gelu'(z)), the gradient of fc2's output, transposed: [BLOCK_C, BLOCK_R], fp32."""
    dz = fl.load_tile_transposed(dy_ptr, row0, col0, n_rows, n_cols, stride_dy, BLOCK_C, BLOCK_R).to(tl.float32)
    dz = dz * scale[None, :]
    if SECOND_GELU:
        z = fl.load_tile_transposed(z_ptr, row0, col0, n_rows, n_cols, n_cols, BLOCK_C, BLOCK_R).to(tl.float32)
        dz = dz * fl.gelu_derivative(z)
    return dz


@triton.jit
def _branch_gradient(dy_ptr, z_ptr, scale, row0, col0, n_rows, n_cols, stride_dy,
                     BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SECOND_GELU: tl.constexpr):
    """dz as above, [BLOCK_R, BLOCK_K], fp32."""
    dz = fl.load_tile(dy_ptr, row0, col0, n_rows, n_cols, stride_dy, BLOCK_R, BLOCK_K).to(tl.float32)
    dz = dz * scale[:, None]
    if SECOND_GELU:
        z = fl.load_tile(z_ptr, row0, col0, n_rows, n_cols, n_cols, BLOCK_R, BLOCK_K).to(tl.float32)
        dz = dz * fl.gelu_derivative(z)
    return dz


@triton.jit(do_not_specialize=["n_rows", "rows_per_sample", "has_scale", "pre_splits", "pre_rows_per_split",
                               "w2_rows_per_split"])
def _ln_mlp_backward_weight_kernel(
    x_hat_ptr, dy_ptr, w2_ptr, scale_ptr, pre_ptr, z_ptr,
    d_pre_ptr, g_partial_ptr, db1_partial_ptr, dw2_partial_ptr, db2_partial_ptr,
    n_rows, n_cols, n_hidden, stride_dy, rows_per_sample, has_scale,
    pre_splits, pre_rows_per_split, w2_rows_per_split,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, NUM_CHUNKS: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_Q: tl.constexpr, SECOND_GELU: tl.constexpr, MATMUL_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Programs [0, q_tiles * pre_splits) are dpre programs, the rest dW2 programs; program p
    of a kind takes hidden tile p % q_tiles and row split p // q_tiles."""
    q_tiles = tl.cdiv(n_hidden, BLOCK_Q)
    pre_programs = q_tiles * pre_splits
    program = tl.program_id(0)
    is_pre_program = program < pre_programs
    program = tl.where(is_pre_program, program, program - pre_programs)
    hidden0 = (program % q_tiles) * BLOCK_Q
    split = program // q_tiles
    rows_per_split = tl.where(is_pre_program, pre_rows_per_split, w2_rows_per_split)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, n_rows)
    acc = (tl.zeros([BLOCK_C, BLOCK_Q], dtype=tl.float32),) * NUM_CHUNKS

    if is_pre_program:
        db1 = tl.zeros([BLOCK_Q], dtype=tl.float64)
        for row0 in range(row_start, row_end, BLOCK_R):
            scale = fl.sample_scale(scale_ptr, has_scale, row0, n_rows, rows_per_sample, BLOCK_R)
            d_hidden = tl.zeros([BLOCK_R, BLOCK_Q], dtype=tl.float32)
            for col0 in range(0, n_cols, BLOCK_K):
                dz = _branch_gradient(dy_ptr, z_ptr, scale, row0, col0, n_rows, n_cols, stride_dy, BLOCK_R, BLOCK_K,
                                      SECOND_GELU)
                w2 = fl.load_tile(w2_ptr, col0, hidden0, n_cols, n_hidden, n_hidden, BLOCK_K, BLOCK_Q)
                d_hidden = tl.dot(dz.to(MATMUL_DTYPE), w2.to(MATMUL_DTYPE), d_hidden, input_precision=INPUT_PRECISION)
            pre = fl.load_tile(pre_ptr, row0, hidden0, n_rows, n_hidden, n_hidden, BLOCK_R, BLOCK_Q).to(tl.float32)
            # Rows past the end read dy = 0, so their d_pre is 0 and adds nothing below.
            d_pre = d_hidden * fl.gelu_derivative(pre)
            db1 += fl.column_sum(d_pre)
            d_pre = d_pre.to(MATMUL_DTYPE)
            fl.store_tile(d_pre_ptr, d_pre, row0, hidden0, n_rows, n_hidden, n_hidden, BLOCK_R, BLOCK_Q)
            updated = ()
            for k in tl.static_range(NUM_CHUNKS):
                # The forward's x_hat: 0 past C and past the last row.
                x_hat_t = fl.load_tile_transposed(x_hat_ptr, row0, k * BLOCK_C, n_rows, n_cols, n_cols, BLOCK_C,
                                                  BLOCK_R)
                updated = updated + (tl.dot(x_hat_t, d_pre, acc[k], input_precision=INPUT_PRECISION),)
            acc = updated
        fl.store_panel_partial(acc, g_partial_ptr, split, hidden0, n_cols, n_hidden, BLOCK_C, NUM_CHUNKS, BLOCK_Q)
        units = hidden0 + tl.arange(0, BLOCK_Q)
        tl.store(db1_partial_ptr + split * n_hidden + units, db1, mask=units < n_hidden)
    else:
        db2 = (tl.zeros([BLOCK_C], dtype=tl.float64),) * NUM_CHUNKS
        for row0 in range(row_start, row_end, BLOCK_R):
            scale = fl.sample_scale(scale_ptr, has_scale, row0, n_rows, rows_per_sample, BLOCK_R)
            pre = fl.load_tile(pre_ptr, row0, hidden0, n_rows, n_hidden, n_hidden, BLOCK_R, BLOCK_Q).to(tl.float32)
            # Rows past the end read dy = 0, so their (nonzero) activations add nothing.
            hidden = fl.gelu(pre).to(MATMUL_DTYPE)
            updated = ()
            sums = ()
            for k in tl.static_range(NUM_CHUNKS):
                dz_t = _branch_gradient_transposed(dy_ptr, z_ptr, scale, row0, k * BLOCK_C, n_rows, n_cols, stride_dy,
                                                   BLOCK_C, BLOCK_R, SECOND_GELU)
                updated = updated + (tl.dot(dz_t.to(MATMUL_DTYPE), hidden, acc[k], input_precision=INPUT_PRECISION),)
                sums = sums + (db2[k] + tl.sum(dz_t.to(tl.float64), axis=1),)
            acc = updated
            db2 = sums
        fl.store_panel_partial(acc, dw2_partial_ptr, split, hidden0, n_cols, n_hidden, BLOCK_C, NUM_CHUNKS, BLOCK_Q)
        if hidden0 == 0:  # every hidden tile sums the same dz; the first one writes it
            fl.store_vector_partial(db2, db2_partial_ptr, split, n_cols, BLOCK_C, NUM_CHUNKS)


@triton.jit(do_not_specialize=["n_rows", "pre_splits", "w2_splits"])
def _ln_mlp_backward_input_kernel(
    x_ptr, dy_ptr, dx_ptr, ln_weight_ptr, ln_bias_ptr, w1_ptr, mean_ptr, rstd_ptr, d_pre_ptr,
    g_partial_ptr, db1_partial_ptr, dw2_partial_ptr, db2_partial_ptr,
    dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, d_ln_weight_ptr, d_ln_bias_ptr,
    n_rows, n_cols, n_hidden, stride_x, stride_dy, stride_dx, pre_splits, w2_splits,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, NUM_CHUNKS: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, MATMUL_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dx for BLOCK_M rows, then slabs program, program + programs, ... of BLOCK_S columns of
    every reduction."""
    program = tl.program_id(0)
    row0 = program * BLOCK_M
    d_normed = (tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32),) * NUM_CHUNKS
    for hidden0 in range(0, n_hidden, BLOCK_K):
        d_pre = fl.load_tile(d_pre_ptr, row0, hidden0, n_rows, n_hidden, n_hidden, BLOCK_M, BLOCK_K)
        d_normed = fl.accumulate_times_weight(d_normed, d_pre, w1_ptr, hidden0, n_hidden, n_cols, False, BLOCK_K,
                                              BLOCK_C, NUM_CHUNKS, MATMUL_DTYPE, INPUT_PRECISION)
    mean = fl.load_row_vector(mean_ptr, row0, n_rows, BLOCK_M)
    rstd = fl.load_row_vector(rstd_ptr, row0, n_rows, BLOCK_M)
    fl.layer_norm_backward(d_normed, dy_ptr, dx_ptr, x_ptr, ln_weight_ptr, mean, rstd, row0, n_rows, n_cols,
                           stride_x, stride_dy, stride_dx, BLOCK_M, BLOCK_C, NUM_CHUNKS, True)

    for slab in range(program, tl.cdiv(n_cols, BLOCK_S), tl.num_programs(0)):
        fl.layer_norm_weight_gradients(g_partial_ptr, db1_partial_ptr, w1_ptr, ln_weight_ptr, ln_bias_ptr,
                                       dw1_ptr, db1_ptr, d_ln_weight_ptr, d_ln_bias_ptr, slab, pre_splits, n_cols,
                                       n_hidden, BLOCK_S, BLOCK_N)
        fl.sum_partial_rows(dw2_partial_ptr, dw2_ptr, slab, w2_splits, n_cols, n_hidden, BLOCK_S, BLOCK_N)
        fl.sum_partial_vector(db2_partial_ptr, db2_ptr, slab, w2_splits, n_cols, BLOCK_S)


# ---------------------------------------------------------------------------------------------
# Launch plan
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Plan:
    """Tiles and launch options, fixed per (C, matmul dtype) rather than autotuned: the
    interpreter cannot run triton.autotune, and h100_compile_specs compiles exactly these."""
    panel: fl.Panel  # C as the forward and the weight-gradient kernel hold it
    row: fl.RowKernel  # the row kernel's configuration
    half: bool  # bf16/fp16 operands on tensor cores; else exact fp32 on the FMA units
    block_m: int  # rows per program of the forward and the row kernel
    block_k: int  # contraction step over a streamed dimension (C in fp32 fc1, H in the row kernel)
    block_h: int  # hidden units per forward step
    block_r: int  # rows per step of the weight-gradient programs
    block_q: int  # hidden units per weight-gradient program
    num_warps: int
    num_stages: int  # forward and weight-gradient kernel

    def forward_constexprs(self, second_gelu: bool, matmul_dtype: torch.dtype) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_C=self.panel.block_c, NUM_CHUNKS=self.panel.num_chunks,
                    BLOCK_K=self.block_k, BLOCK_H=self.block_h, PANEL=self.half, SECOND_GELU=second_gelu,
                    **fl.dtype_constexprs(matmul_dtype))

    def weight_constexprs(self, second_gelu: bool, matmul_dtype: torch.dtype) -> dict:
        return dict(BLOCK_R=self.block_r, BLOCK_C=self.panel.block_c, NUM_CHUNKS=self.panel.num_chunks,
                    BLOCK_K=self.block_k, BLOCK_Q=self.block_q, SECOND_GELU=second_gelu,
                    **fl.dtype_constexprs(matmul_dtype))

    def describe(self) -> str:
        return (f"C={self.panel.num_chunks}x{self.panel.block_c} M={self.block_m} K={self.block_k} H={self.block_h} "
                f"R={self.block_r} Q={self.block_q} warps={self.num_warps} stages={self.num_stages}")


def _plan(n_cols: int, matmul_dtype: torch.dtype) -> _Plan:
    width = fl.panel_width(n_cols, matmul_dtype)
    if fl.is_half(matmul_dtype):
        # Compiled for sm_90 (kernels/README.md has the history):
        # - 64-row tiles, the smallest a warpgroup MMA takes, over 8 warps, which split the
        #   [64, C] fp32 accumulators (96 registers a thread at C = 384); at C = 512 that no
        #   longer fits next to the rest: 32 rows (mma.sync).
        # - forward: 32 hidden units a step; with 64 every variant spilled (a step's fc1 and
        #   fc2 tiles are live together).
        # - weight-gradient kernel: 32-wide hidden tiles (64 spilled with the second GELU), 16
        #   at C = 512.
        # - row kernel: the gradient panel in 64-wide chunks, unpipelined; 128-wide chunks or
        #   two stages left the LayerNorm backward's temporaries no room.
        block_m = 32 if width > 384 else 64
        # 16 hidden units a forward step at C = 512, and fp16 at C = 384: 32 spilled 8 B with the
        # second GELU under Triton 3.6 (bf16 at C = 384 fits, 252-255 registers; README).
        block_h = 16 if width > 384 or matmul_dtype == torch.float16 else 32
        return _Plan(fl.chunked(width, 128), fl.RowKernel(fl.chunked(width, 64), block_m, 64, 8, num_stages=1),
                     half=True, block_m=block_m, block_k=64, block_h=block_h, block_r=64,
                     block_q=16 if width > 384 else 32, num_warps=8, num_stages=2)
    # Exact fp32 on the FMA units: an FMA dot holds its operands in registers, so tiles and
    # contraction steps stay at 16. Row kernel in 32-wide chunks: 128-wide ones spilled under
    # Triton 3.6 (README).
    return _Plan(fl.chunked(width, 128), fl.RowKernel(fl.chunked(width, 32), 16, 16, 8, num_stages=1), half=False,
                 block_m=16, block_k=16, block_h=16, block_r=16, block_q=16, num_warps=8, num_stages=1)


@dataclass(frozen=True)
class _BackwardGrid:
    q_tiles: int
    pre: fl.Split
    w2: fl.Split
    row_tiles: int

    @property
    def weight_programs(self) -> int:
        return self.q_tiles * (self.pre.splits + self.w2.splits)


def _backward_grid(plan: _Plan, n_rows: int, n_cols: int, n_hidden: int) -> _BackwardGrid:
    q_tiles = triton.cdiv(n_hidden, plan.block_q)
    # Per row step a dpre program does two matmuls and a dW2 program one: a third of the
    # programs' budget to dpre splits, two thirds to twice as many dW2 splits.
    pre = fl.split_rows(n_rows, plan.block_r, 3 * q_tiles, fl.WEIGHT_GRADIENT_PROGRAMS)
    w2 = fl.split_rows(n_rows, plan.block_r, q_tiles, 2 * pre.splits * q_tiles)
    return _BackwardGrid(q_tiles, pre, w2, triton.cdiv(n_rows, plan.block_m))


@functools.lru_cache(maxsize=_common.PLANNED_SHAPES)
def _launches(n_rows: int, n_cols: int, n_hidden: int, second_gelu: bool, matmul_dtype: torch.dtype) -> fl.SeamLaunches:
    plan = _plan(n_cols, matmul_dtype)
    grid = _backward_grid(plan, n_rows, n_cols, n_hidden)
    return fl.SeamLaunches(
        forward=fl.planned_launch(_ln_mlp_forward_kernel, grid.row_tiles, plan.num_warps, plan.num_stages,
                                  plan.forward_constexprs(second_gelu, matmul_dtype)),
        weight=fl.planned_launch(_ln_mlp_backward_weight_kernel, grid.weight_programs, plan.num_warps,
                                 plan.num_stages, plan.weight_constexprs(second_gelu, matmul_dtype)),
        row=fl.planned_launch(_ln_mlp_backward_input_kernel, grid.row_tiles, plan.row.num_warps, plan.row.num_stages,
                              plan.row.constexprs(matmul_dtype)),
        backward_grid=grid)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

_INTERPRETED = _common.is_interpreted(_ln_mlp_forward_kernel)


def _forward(x, ln_weight, ln_bias, w1, b1, w2, b2, branch_scale, eps: float, second_gelu: bool,
             matmul_dtype: torch.dtype):
    n_cols, n_hidden = x.shape[-1], w1.shape[0]
    x2d = fl.rows_view(x, n_cols)
    n_rows = x2d.shape[0]
    ln_weight, ln_bias, w1, b1, w2, b2, branch_scale = fl.contiguous(ln_weight, ln_bias, w1, b1, w2, b2, branch_scale)
    out_dtype = _output_dtype(x.dtype, matmul_dtype, branch_scale)
    y = _common.new_output(x.shape, out_dtype, x.device)
    mean = _common.new_output((n_rows,), torch.float32, x.device)
    rstd = _common.new_output((n_rows,), torch.float32, x.device)
    x_hat = _common.new_output((n_rows, n_cols), matmul_dtype, x.device)
    pre = _common.new_output((n_rows, n_hidden), matmul_dtype, x.device)
    z = _common.new_output((n_rows, n_cols) if second_gelu else (0,), matmul_dtype, x.device)
    if n_rows > 0:
        scale = branch_scale if branch_scale is not None else mean  # never read without a scale
        with _common.on_device_of(x):
            _launches(n_rows, n_cols, n_hidden, second_gelu, matmul_dtype).forward(
                x2d, y, ln_weight, ln_bias, w1, b1, w2, b2, scale, mean, rstd, x_hat, pre, z,
                n_rows, n_cols, n_hidden, x2d.stride(0), n_cols, fl.rows_per_sample(x, branch_scale),
                int(branch_scale is not None), eps)
    return y, mean, rstd, x_hat, pre, z


def _backward(dy, x, ln_weight, ln_bias, w1, b1, w2, b2, mean, rstd, x_hat, pre, z, branch_scale, second_gelu: bool,
              matmul_dtype: torch.dtype):
    n_cols, n_hidden = x.shape[-1], w1.shape[0]
    x2d = fl.rows_view(x, n_cols)
    dy2d = fl.rows_view(dy, n_cols)
    ln_weight, ln_bias, w1, w2, branch_scale = fl.contiguous(ln_weight, ln_bias, w1, w2, branch_scale)
    n_rows = x2d.shape[0]
    device = x.device
    dx = _common.new_output(x.shape, x.dtype, device)
    grads = [_common.new_output(p.shape, p.dtype, device) for p in (ln_weight, ln_bias, w1, b1, w2, b2)]
    if n_rows == 0:  # every parameter gradient is an empty sum
        return (dx, *(g.zero_() for g in grads))
    d_ln_weight, d_ln_bias, dw1, db1, dw2, db2 = grads
    launches = _launches(n_rows, n_cols, n_hidden, second_gelu, matmul_dtype)
    grid = launches.backward_grid
    d_pre = _common.new_output((n_rows, n_hidden), matmul_dtype, device)
    g_partial = _common.new_output((grid.pre.splits, n_cols, n_hidden), torch.float32, device)
    db1_partial = _common.new_output((grid.pre.splits, n_hidden), torch.float64, device)
    dw2_partial = _common.new_output((grid.w2.splits, n_cols, n_hidden), torch.float32, device)
    db2_partial = _common.new_output((grid.w2.splits, n_cols), torch.float64, device)
    scale = branch_scale if branch_scale is not None else mean  # never read without a scale
    with _common.on_device_of(x):
        launches.weight(x_hat, dy2d, w2, scale, pre, z, d_pre, g_partial, db1_partial, dw2_partial, db2_partial,
                        n_rows, n_cols, n_hidden, dy2d.stride(0), fl.rows_per_sample(x, branch_scale),
                        int(branch_scale is not None), grid.pre.splits, grid.pre.rows_per_split,
                        grid.w2.rows_per_split)
        launches.row(x2d, dy2d, dx.view(n_rows, n_cols), ln_weight, ln_bias, w1, mean, rstd, d_pre,
                     g_partial, db1_partial, dw2_partial, db2_partial,
                     dw1, db1, dw2, db2, d_ln_weight, d_ln_bias,
                     n_rows, n_cols, n_hidden, x2d.stride(0), dy2d.stride(0), n_cols, grid.pre.splits,
                     grid.w2.splits)
    return dx, d_ln_weight, d_ln_bias, dw1, db1, dw2, db2


def _output_dtype(x_dtype, matmul_dtype, branch_scale) -> torch.dtype:
    dtypes = (x_dtype, matmul_dtype) + ((branch_scale.dtype,) if branch_scale is not None else ())
    return fl.result_dtype(*dtypes)


# ---------------------------------------------------------------------------------------------
# The operator: torch.library.custom_op with a fake (shapes only, for tracing) and autograd
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("vit_kernels::layernorm_mlp", mutates_args=())
def _layernorm_mlp_op(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, w1: torch.Tensor,
                      b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, branch_scale: torch.Tensor | None,
                      eps: float, second_gelu: bool, matmul_dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd, x_hat, pre, z): the output and what the backward reads."""
    return _forward(x, ln_weight, ln_bias, w1, b1, w2, b2, branch_scale, eps, second_gelu, matmul_dtype)


@_layernorm_mlp_op.register_fake
def _(x, ln_weight, ln_bias, w1, b1, w2, b2, branch_scale, eps, second_gelu, matmul_dtype):
    n_cols, n_hidden = x.shape[-1], w1.shape[0]
    n_rows = x.numel() // n_cols
    return (x.new_empty(x.shape, dtype=_output_dtype(x.dtype, matmul_dtype, branch_scale)),
            x.new_empty((n_rows,), dtype=torch.float32), x.new_empty((n_rows,), dtype=torch.float32),
            x.new_empty((n_rows, n_cols), dtype=matmul_dtype), x.new_empty((n_rows, n_hidden), dtype=matmul_dtype),
            x.new_empty((n_rows, n_cols) if second_gelu else (0,), dtype=matmul_dtype))


@torch.library.custom_op("vit_kernels::layernorm_mlp_backward", mutates_args=())
def _layernorm_mlp_backward_op(dy: torch.Tensor, x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                               w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                               mean: torch.Tensor, rstd: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor,
                               z: torch.Tensor, branch_scale: torch.Tensor | None, second_gelu: bool,
                               matmul_dtype: torch.dtype
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor, torch.Tensor]:
    """(dx, d_ln_weight, d_ln_bias, dw1, db1, dw2, db2)."""
    return _backward(dy, x, ln_weight, ln_bias, w1, b1, w2, b2, mean, rstd, x_hat, pre, z, branch_scale,
                     second_gelu, matmul_dtype)


@_layernorm_mlp_backward_op.register_fake
def _(dy, x, ln_weight, ln_bias, w1, b1, w2, b2, mean, rstd, x_hat, pre, z, branch_scale, second_gelu,
      matmul_dtype):
    return tuple(t.new_empty(t.shape) for t in (x, ln_weight, ln_bias, w1, b1, w2, b2))


def _setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, w1, b1, w2, b2, branch_scale, _eps, second_gelu, matmul_dtype = inputs
    _y, mean, rstd, x_hat, pre, z = output
    ctx.set_materialize_grads(False)  # the saved outputs get no gradient: no zeros to launch
    ctx.mark_non_differentiable(mean, rstd, x_hat, pre, z)
    ctx.save_for_backward(x, ln_weight, ln_bias, w1, b1, w2, b2, mean, rstd, x_hat, pre, z, branch_scale)
    ctx.second_gelu, ctx.matmul_dtype = second_gelu, matmul_dtype


def _autograd_backward(ctx, dy, *_saved_output_gradients):
    gradients = _layernorm_mlp_backward_op(dy, *ctx.saved_tensors, ctx.second_gelu, ctx.matmul_dtype)
    return (*gradients, None, None, None, None)


_layernorm_mlp_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def _validate(x, ln_weight, ln_bias, w1, b1, w2, b2, branch_scale, matmul_dtype: torch.dtype):
    named = dict(x=x, ln_weight=ln_weight, ln_bias=ln_bias, w1=w1, b1=b1, w2=w2, b2=b2)
    for name, t in named.items():
        _common.check_floating(name, t)
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all must be on one device")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape [..., C] with C > 0, got {list(x.shape)}")
    n_cols = x.shape[-1]
    if w1.dim() != 2 or w1.shape[1] != n_cols or w1.shape[0] == 0:
        raise ValueError(f"w1 must have shape [hidden, C={n_cols}] (C from x), got {list(w1.shape)}")
    n_hidden = w1.shape[0]
    expected = dict(ln_weight=(n_cols,), ln_bias=(n_cols,), b1=(n_hidden,), w2=(n_cols, n_hidden), b2=(n_cols,))
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)} (C={n_cols} from x, hidden={n_hidden} from w1), "
                             f"got {list(named[name].shape)}")
    fl.check_branch_scale(branch_scale, x)
    _common.check_device("x", x, _INTERPRETED, __name__)
    fl.panel_width(n_cols, matmul_dtype)
    _common.refuse_interpreted_bf16("x (or autocast)", _INTERPRETED, matmul_dtype)


def layernorm_mlp(x, ln_weight, ln_bias, w1, b1, w2, b2, eps: float = 1e-5, *, second_gelu: bool = False,
                  branch_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x + s * act2(fc2(gelu(fc1(layer_norm(x))))), fused; see the module docstring.

    x: [..., C] with C <= 512 (384 with fp32 matmuls); ln_weight, ln_bias: [C]; w1: [H, C]; b1: [H];
    w2: [C, H]; b2: [C].
    second_gelu: act2 is GELU (else the identity). branch_scale: None, or [x.shape[0]] scales,
    one per sample (needs no gradient). Returns a tensor of x's shape, differentiable in x and
    the six parameters. Raises ValueError for inconsistent shapes, unsupported dtypes or devices.
    """
    matmul_dtype = fl.matmul_dtype_of(x)
    _validate(x, ln_weight, ln_bias, w1, b1, w2, b2, branch_scale, matmul_dtype)
    return _layernorm_mlp_op(x, ln_weight, ln_bias, w1, b1, w2, b2, branch_scale, float(eps), bool(second_gelu),
                             matmul_dtype)[0]


# ---------------------------------------------------------------------------------------------
# Costs (kernels/cost.py) and the H100 compile check (kernels/h100.py), from the launch plan
# ---------------------------------------------------------------------------------------------

def launch_costs(rows: int, cols: int, hidden: int, activation_dtype: torch.dtype = torch.float32,
                 matmul_dtype: torch.dtype = torch.bfloat16, parameter_dtype: torch.dtype = torch.float32,
                 second_gelu: bool = False, samples: int = 0) -> list:
    """KernelCost of every launch of one forward and one backward of layernorm_mlp.

    rows: x's rows (B * N); cols: C; hidden: H; activation_dtype: x's (and dy's) dtype;
    matmul_dtype: the operands' (the autocast dtype); parameter_dtype: the six parameters';
    second_gelu: the option; samples: B when a branch_scale is passed, 0 without one.
    """
    plan = _plan(cols, matmul_dtype)
    out_dtype = fl.result_dtype(activation_dtype, matmul_dtype, *((activation_dtype,) if samples else ()))
    num_chunks, block_c = plan.panel.num_chunks, plan.panel.block_c

    # Forward: one program per BLOCK_M rows.
    forward = fl.Traffic()
    row_tiles = fl.rows_in_tiles(rows, plan.block_m)
    for index, n in enumerate(row_tiles):
        forward.read(n * cols, activation_dtype)
        forward.read(2 * cols + 2 * hidden * cols + hidden + cols, parameter_dtype, shared="parameters")
        fl.read_scales(forward, index * plan.block_m, n, rows, samples, activation_dtype)
        forward.write(n * cols, out_dtype)
        forward.write(2 * n, torch.float32)
        forward.write(n * cols + n * hidden + (n * cols if second_gelu else 0), matmul_dtype)  # x_hat, pre, z
    steps = triton.cdiv(hidden, plan.block_h)
    fc1_dot = (num_chunks * fl.matmul_flops(plan.block_m, plan.block_h, block_c) if plan.half
               else triton.cdiv(cols, plan.block_k) * fl.matmul_flops(plan.block_m, plan.block_h, plan.block_k))
    fc2_dot = num_chunks * fl.matmul_flops(plan.block_m, block_c, plan.block_h)
    mlp_flops = 2 * fl.matmul_flops(rows, hidden, cols)
    costs = [fl.kernel_cost(OP_NAME, _ln_mlp_forward_kernel, "forward", forward, mlp_flops,
                            len(row_tiles) * steps * (fc1_dot + fc2_dot))]

    # Backward, kernel 1: dpre programs and dW2 programs over (hidden tile, row split).
    grid = _backward_grid(plan, rows, cols, hidden)
    weight = fl.Traffic()
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
                fl.read_scales(weight, row0, n, rows, samples, activation_dtype)
                weight.read_rows(("pre", q), row0, n, width, matmul_dtype)
                panel_dots = row_steps * num_chunks * fl.matmul_flops(block_c, plan.block_q, plan.block_r)
                if is_pre:
                    weight.read(cols * width, parameter_dtype, shared=("w2", q))
                    weight.read_rows("x_hat", row0, n, cols, matmul_dtype)
                    weight.write(n * width, matmul_dtype)  # dpre
                    weight.write(cols * width, torch.float32)  # G partial
                    weight.write(width, torch.float64)  # db1 partial
                    executed += panel_dots + row_steps * triton.cdiv(cols, plan.block_k) * fl.matmul_flops(
                        plan.block_r, plan.block_q, plan.block_k)
                else:
                    weight.write(cols * width, torch.float32)  # dW2 partial
                    if q == 0:
                        weight.write(cols, torch.float64)  # db2 partial
                    executed += panel_dots
    costs.append(fl.kernel_cost(OP_NAME, _ln_mlp_backward_weight_kernel, "backward", weight,
                                3 * fl.matmul_flops(rows, hidden, cols), executed))

    # Backward, kernel 2: one program per BLOCK_M rows, the first few also finish a slab of C.
    row_kernel = fl.Traffic()
    input_tiles = fl.rows_in_tiles(rows, plan.block_m)
    for n in input_tiles:
        row_kernel.read(n * hidden, matmul_dtype)  # dpre
        row_kernel.read(hidden * cols + cols, parameter_dtype, shared="w1, ln_weight")
        row_kernel.read(2 * n, torch.float32)
        row_kernel.read(2 * n * cols, activation_dtype)  # x, dy
        row_kernel.write(n * cols, activation_dtype)  # dx
    for slab, slab_cols in enumerate(fl.rows_in_tiles(cols, fl.REDUCTION_SLAB)):
        row_kernel.read(grid.pre.splits * slab_cols * hidden + grid.w2.splits * slab_cols * hidden, torch.float32)
        row_kernel.read(grid.pre.splits * hidden, torch.float64, shared="db1 partials")
        row_kernel.read(grid.w2.splits * slab_cols, torch.float64)
        row_kernel.read(slab_cols, parameter_dtype)  # ln_bias
        row_kernel.write(2 * slab_cols * hidden + 3 * slab_cols + (hidden if slab == 0 else 0), parameter_dtype)
    executed = len(input_tiles) * triton.cdiv(hidden, plan.block_k) * plan.row.panel.num_chunks * fl.matmul_flops(
        plan.block_m, plan.row.panel.block_c, plan.block_k)
    costs.append(fl.kernel_cost(OP_NAME, _ln_mlp_backward_input_kernel, "backward", row_kernel,
                                fl.matmul_flops(rows, hidden, cols), executed))
    return costs


def h100_compile_specs():
    """Every kernel in every plan _plan can pick (each panel width, fp32 and half operands), in
    every dtype variant and option, as kernels.h100 compiles them for sm_90a. Integer sizes
    and row strides are multiples of 16 for the models the backend runs (C = heads x
    head_dim, head_dim in 16..64; MLP sizes multiples of 16); row counts, splits and
    per-sample rows are not specialized on (do_not_specialize)."""
    specs = []
    dimensions = ("n_cols", "n_hidden", "stride_x", "stride_y", "stride_dy", "stride_dx")
    for activation, matmul in fl.DTYPE_VARIANTS:
        names = {dtype: _common.DTYPE_NAMES[dtype] for dtype in (activation, matmul, torch.float32)}
        output = _common.DTYPE_NAMES[fl.result_dtype(activation, matmul)]
        pointer_types = dict(
            x_ptr=names[activation], y_ptr=output, dy_ptr=output, dx_ptr=names[activation], x_hat_ptr=names[matmul],
            scale_ptr=names[activation], mean_ptr="fp32", rstd_ptr="fp32",
            pre_ptr=names[matmul], z_ptr=names[matmul], d_pre_ptr=names[matmul],
            g_partial_ptr="fp32", dw2_partial_ptr="fp32", db1_partial_ptr="fp64", db2_partial_ptr="fp64",
            **{name: names[activation] for name in ("ln_weight_ptr", "ln_bias_ptr", "w1_ptr", "b1_ptr", "w2_ptr",
                                                   "b2_ptr", "dw1_ptr", "db1_ptr", "dw2_ptr", "db2_ptr",
                                                   "d_ln_weight_ptr", "d_ln_bias_ptr")})
        variant = f"x={names[activation]} mm={names[matmul]}"
        for width in fl.panel_widths(matmul):
            plan = _plan(width, matmul)
            label = f"{variant} {plan.describe()}"
            for second_gelu in (False, True):
                option = f"{label} second_gelu={second_gelu}"
                specs.append(fl.kernel_spec(
                    "ln_mlp_forward", _ln_mlp_forward_kernel, option, pointer_types,
                    plan.forward_constexprs(second_gelu, matmul), plan.num_warps, plan.num_stages,
                    fl.instruction_class(matmul, [plan.block_m], plan.num_warps), dimensions))
                specs.append(fl.kernel_spec(
                    "ln_mlp_backward_weight", _ln_mlp_backward_weight_kernel, option, pointer_types,
                    plan.weight_constexprs(second_gelu, matmul), plan.num_warps, plan.num_stages,
                    fl.instruction_class(matmul, [plan.block_r, plan.panel.block_c], plan.num_warps), dimensions))
            specs.append(fl.kernel_spec(
                "ln_mlp_backward_input", _ln_mlp_backward_input_kernel, f"{variant} {plan.row.describe()}",
                pointer_types, plan.row.constexprs(matmul), plan.row.num_warps, plan.row.num_stages,
                fl.instruction_class(matmul, [plan.block_m], plan.num_warps), dimensions))
    return specs
