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
the second GELU also fc2's output z. Reading pre back costs less than the two fc1 matmuls
(and the LayerNorm) that recomputing it in the weight-gradient programs would, and x_hat in
the matmul dtype is half the bytes of the fp32 x and statistics it replaces in the dpre
programs (kernels/README.md has the figures). Saved, the backward also uses exactly the
rounded activations the forward used, as torch's autograd does.

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
parameter gradient its parameter's. Tilings are in launch_plan below.

Traced, the op is a pair of PyTorch operators (torch.ops.vit_kernels.layernorm_mlp and its
backward), so torch.compile traces through it without a graph break; called plainly, one
torch.autograd.Function around the same launchers (kernels/_common.py's Operator).
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
    mean, rstd, panel = fl.layer_norm_rows(x_ptr, x_hat_ptr, ln_weight_ptr, ln_bias_ptr, mean_ptr, rstd_ptr, row0,
                                           n_rows, n_cols, stride_x, eps, BLOCK_M, BLOCK_C, NUM_CHUNKS, PANEL,
                                           MATMUL_DTYPE)

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
    """Programs [0, hidden tiles * pre_splits) are dpre programs, the rest dW2 programs; each
    kind's programs take (hidden tile, row split) as fl.split_program says."""
    pre_programs = tl.cdiv(n_hidden, BLOCK_Q) * pre_splits
    program = tl.program_id(0)
    is_pre_program = program < pre_programs
    hidden0, split, row_start, row_end = fl.split_program(
        tl.where(is_pre_program, program, program - pre_programs), n_hidden,
        tl.where(is_pre_program, pre_rows_per_split, w2_rows_per_split), n_rows, BLOCK_Q)
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
    BLOCK_S: tl.constexpr, REDUCTION_BLOCK: tl.constexpr, MATMUL_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dx for BLOCK_M rows, then slabs program, program + programs, ... of BLOCK_S columns of
    every reduction."""
    program = tl.program_id(0)
    row0 = program * BLOCK_M
    fl.layer_norm_input_gradient(d_pre_ptr, w1_ptr, dy_ptr, dx_ptr, x_ptr, ln_weight_ptr, mean_ptr, rstd_ptr, row0,
                                 n_rows, n_cols, n_hidden, n_hidden, stride_x, stride_dy, stride_dx, BLOCK_M, BLOCK_C,
                                 NUM_CHUNKS, BLOCK_K, True, MATMUL_DTYPE, INPUT_PRECISION)

    for slab in range(program, tl.cdiv(n_cols, BLOCK_S), tl.num_programs(0)):
        fl.layer_norm_weight_gradients(g_partial_ptr, db1_partial_ptr, w1_ptr, ln_weight_ptr, ln_bias_ptr,
                                       dw1_ptr, db1_ptr, d_ln_weight_ptr, d_ln_bias_ptr, slab, pre_splits, n_cols,
                                       n_hidden, BLOCK_S, REDUCTION_BLOCK)
        fl.sum_partial_rows(dw2_partial_ptr, dw2_ptr, slab, w2_splits, n_cols, n_hidden, BLOCK_S, REDUCTION_BLOCK)
        fl.sum_partial_vector(db2_partial_ptr, db2_ptr, slab, w2_splits, n_cols, BLOCK_S)


# ---------------------------------------------------------------------------------------------
# Launch plan
# ---------------------------------------------------------------------------------------------

def launch_plan(n_cols: int, matmul_dtype: torch.dtype) -> fl.SeamPlan:
    """The tiles for C = n_cols: kernels/_fused_linear.py's LayerNorm tiling, with (half) 32
    hidden units a forward step (64 spilled in every variant: a step's fc1 and fc2 tiles are
    live together) and 32-wide hidden tiles in the weight-gradient kernel (64 spilled with the
    second GELU); at C = 512 16 of each. fp32: 16 and 16."""
    width = fl.panel_width(n_cols, matmul_dtype)
    if not fl.is_half(matmul_dtype):
        return fl.layernorm_plan(width, matmul_dtype, forward_step=16, block_q=16)
    # 16 hidden units a forward step for fp16 at C = 384 too: 32 spilled with the second
    # GELU under Triton 3.6 (bf16 at C = 384 fits; README).
    forward_step = 16 if width > 384 or matmul_dtype == torch.float16 else 32
    return fl.layernorm_plan(width, matmul_dtype, forward_step=forward_step, block_q=16 if width > 384 else 32)


@dataclass(frozen=True)
class BackwardGrid:
    q_tiles: int
    pre: fl.Split
    w2: fl.Split
    row_tiles: int

    @property
    def weight_programs(self) -> int:
        return self.q_tiles * (self.pre.splits + self.w2.splits)


def _backward_grid(plan: fl.SeamPlan, n_rows: int, n_hidden: int) -> BackwardGrid:
    q_tiles = triton.cdiv(n_hidden, plan.block_q)
    # Per row step a dpre program does two matmuls and a dW2 program one: a third of the
    # programs' budget to dpre splits, two thirds to twice as many dW2 splits.
    pre = fl.split_rows(n_rows, plan.block_r, 3 * q_tiles, fl.WEIGHT_GRADIENT_PROGRAMS)
    w2 = fl.split_rows(n_rows, plan.block_r, q_tiles, 2 * pre.splits * q_tiles)
    return BackwardGrid(q_tiles, pre, w2, triton.cdiv(n_rows, plan.block_m))


@functools.lru_cache(maxsize=_common.PLANNED_SHAPES)
def plan_launches(n_rows: int, n_cols: int, n_hidden: int, second_gelu: bool,
                  matmul_dtype: torch.dtype) -> fl.SeamLaunches:
    plan = launch_plan(n_cols, matmul_dtype)
    grid = _backward_grid(plan, n_rows, n_hidden)
    return fl.SeamLaunches(
        forward=fl.planned_launch(_ln_mlp_forward_kernel, grid.row_tiles, plan.num_warps, plan.num_stages,
                                  plan.forward_constexprs(matmul_dtype, BLOCK_H=plan.forward_step, PANEL=plan.half,
                                                          SECOND_GELU=second_gelu)),
        weight=fl.planned_launch(_ln_mlp_backward_weight_kernel, grid.weight_programs, plan.num_warps,
                                 plan.num_stages, plan.weight_constexprs(matmul_dtype, BLOCK_K=plan.block_k,
                                                                         SECOND_GELU=second_gelu)),
        row=fl.planned_launch(_ln_mlp_backward_input_kernel, grid.row_tiles, plan.row.num_warps, plan.row.num_stages,
                              plan.row.constexprs(matmul_dtype)),
        backward_grid=grid)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

_INTERPRETED = _common.is_interpreted(_ln_mlp_forward_kernel)


def _forward(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, w1: torch.Tensor,
             b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, branch_scale: torch.Tensor | None,
             eps: float, second_gelu: bool, matmul_dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd, x_hat, pre, z): the output and what the backward reads."""
    n_cols, n_hidden = x.shape[-1], w1.shape[0]
    x2d, stride_x = fl.rows_view(x, n_cols)
    n_rows = x2d.shape[0]
    ln_weight, ln_bias, w1, b1, w2, b2, branch_scale = fl.contiguous(ln_weight, ln_bias, w1, b1, w2, b2, branch_scale)
    y, mean, rstd, x_hat, pre, z = _common.new_outputs(
        x.device, (x.shape, _output_dtype(x.dtype, matmul_dtype, branch_scale)), ((n_rows,), torch.float32),
        ((n_rows,), torch.float32), ((n_rows, n_cols), matmul_dtype), ((n_rows, n_hidden), matmul_dtype),
        ((n_rows, n_cols) if second_gelu else (0,), matmul_dtype))
    if n_rows > 0:
        scale = branch_scale if branch_scale is not None else ln_weight  # x's dtype, never read without a scale
        with _common.on_device_of(x):
            plan_launches(n_rows, n_cols, n_hidden, second_gelu, matmul_dtype).forward(
                x2d, y, ln_weight, ln_bias, w1, b1, w2, b2, scale, mean, rstd, x_hat, pre, z,
                n_rows, n_cols, n_hidden, stride_x, n_cols, fl.rows_per_sample(x, branch_scale),
                int(branch_scale is not None), eps)
    return y, mean, rstd, x_hat, pre, z


def _backward(dy: torch.Tensor, x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
              w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
              mean: torch.Tensor, rstd: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor,
              z: torch.Tensor, branch_scale: torch.Tensor | None, second_gelu: bool, matmul_dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                         torch.Tensor]:
    """(dx, d_ln_weight, d_ln_bias, dw1, db1, dw2, db2)."""
    n_cols, n_hidden = x.shape[-1], w1.shape[0]
    x2d, stride_x = fl.rows_view(x, n_cols)
    dy2d, stride_dy = fl.rows_view(dy, n_cols)
    ln_weight, ln_bias, w1, w2, branch_scale = fl.contiguous(ln_weight, ln_bias, w1, w2, branch_scale)
    n_rows = x2d.shape[0]
    if n_rows == 0:  # every parameter gradient is an empty sum
        return tuple(t.new_zeros(t.shape) for t in (x, ln_weight, ln_bias, w1, b1, w2, b2))
    launches = plan_launches(n_rows, n_cols, n_hidden, second_gelu, matmul_dtype)
    grid = launches.backward_grid
    (dx, d_ln_weight, d_ln_bias, dw1, db1, dw2, db2,
     d_pre, g_partial, db1_partial, dw2_partial, db2_partial) = _common.new_outputs(
        x.device, (x.shape, x.dtype), (ln_weight.shape, ln_weight.dtype), (ln_bias.shape, ln_bias.dtype),
        (w1.shape, w1.dtype), (b1.shape, b1.dtype), (w2.shape, w2.dtype), (b2.shape, b2.dtype),
        ((n_rows, n_hidden), matmul_dtype), ((grid.pre.splits, n_cols, n_hidden), torch.float32),
        ((grid.pre.splits, n_hidden), torch.float64), ((grid.w2.splits, n_cols, n_hidden), torch.float32),
        ((grid.w2.splits, n_cols), torch.float64))
    scale = branch_scale if branch_scale is not None else ln_weight  # x's dtype, never read without a scale
    with _common.on_device_of(x):
        launches.weight(x_hat, dy2d, w2, scale, pre, z, d_pre, g_partial, db1_partial, dw2_partial, db2_partial,
                        n_rows, n_cols, n_hidden, stride_dy, fl.rows_per_sample(x, branch_scale),
                        int(branch_scale is not None), grid.pre.splits, grid.pre.rows_per_split,
                        grid.w2.rows_per_split)
        launches.row(x2d, dy2d, dx.view(n_rows, n_cols), ln_weight, ln_bias, w1, mean, rstd, d_pre,
                     g_partial, db1_partial, dw2_partial, db2_partial,
                     dw1, db1, dw2, db2, d_ln_weight, d_ln_bias,
                     n_rows, n_cols, n_hidden, stride_x, stride_dy, n_cols, grid.pre.splits,
                     grid.w2.splits)
    return dx, d_ln_weight, d_ln_bias, dw1, db1, dw2, db2


def _output_dtype(x_dtype, matmul_dtype, branch_scale) -> torch.dtype:
    dtypes = (x_dtype, matmul_dtype) + ((branch_scale.dtype,) if branch_scale is not None else ())
    return fl.result_dtype(*dtypes)


# ---------------------------------------------------------------------------------------------
# The operators (kernels/_common.py's Operator)
# ---------------------------------------------------------------------------------------------

def _forward_fake(x, ln_weight, ln_bias, w1, b1, w2, b2, branch_scale, eps, second_gelu, matmul_dtype):
    n_cols, n_hidden = x.shape[-1], w1.shape[0]
    n_rows = x.numel() // n_cols
    return (x.new_empty(x.shape, dtype=_output_dtype(x.dtype, matmul_dtype, branch_scale)),
            x.new_empty((n_rows,), dtype=torch.float32), x.new_empty((n_rows,), dtype=torch.float32),
            x.new_empty((n_rows, n_cols), dtype=matmul_dtype), x.new_empty((n_rows, n_hidden), dtype=matmul_dtype),
            x.new_empty((n_rows, n_cols) if second_gelu else (0,), dtype=matmul_dtype))


def _backward_fake(dy, x, ln_weight, ln_bias, w1, b1, w2, b2, mean, rstd, x_hat, pre, z, branch_scale, second_gelu,
                   matmul_dtype):
    return tuple(t.new_empty(t.shape) for t in (x, ln_weight, ln_bias, w1, b1, w2, b2))


def _setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, w1, b1, w2, b2, branch_scale, _eps, second_gelu, matmul_dtype = inputs
    _y, mean, rstd, x_hat, pre, z = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(mean, rstd, x_hat, pre, z)
    ctx.save_for_backward(x, ln_weight, ln_bias, w1, b1, w2, b2, mean, rstd, x_hat, pre, z, branch_scale)
    ctx.second_gelu, ctx.matmul_dtype = second_gelu, matmul_dtype


def _backward_formula(ctx, dy, *_saved_output_gradients):
    gradients = ctx.launch_backward(dy, *ctx.saved_tensors, ctx.second_gelu, ctx.matmul_dtype)
    return (*gradients, None, None, None, None)


_OPERATOR = _common.Operator(
    "layernorm_mlp", _forward, _forward_fake, _backward, _backward_fake, _setup_context, _backward_formula)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

_SHAPES = _common.operand_shapes(x=("...", "C"), w1=("hidden", "C"), ln_weight=("C",), ln_bias=("C",), b1=("hidden",),
                                 w2=("C", "hidden"), b2=("C",))


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
    operands = {"x": x, "ln_weight": ln_weight, "ln_bias": ln_bias, "w1": w1, "b1": b1, "w2": w2, "b2": b2}
    sizes = _common.check_operands(operands, _SHAPES, matmul_dtype, _INTERPRETED, __name__, branch_scale, "x")
    fl.panel_width(sizes["C"], matmul_dtype)
    return _OPERATOR(x, ln_weight, ln_bias, w1, b1, w2, b2, branch_scale, float(eps), bool(second_gelu),
                     matmul_dtype)[0]
