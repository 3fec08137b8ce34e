"""Fused linear + residual: residual + s * linear(h) = residual + s * (h @ W^T + b), forward and backward.

Same signature and math as vit.backends.torch_linear_residual; the model's attention output
projection with the residual add (W [C, C]). h is [..., C_in], residual [..., C_out], both
seen as [rows, features]. branch_scale is None or a [B] tensor s of per-sample scales
(stochastic depth); it needs no gradient.

Forward, one kernel: a program owns BLOCK_M rows and accumulates the full [BLOCK_M, C_out]
output row panel (kernels/_fused_linear.py) over C_in in BLOCK_K steps, then adds the bias,
scales by s and adds the residual in the epilogue.

Backward, two kernels (the pattern of kernels/_fused_linear.py), with D = s * dy:
  1. weight-gradient kernel: program (input tile, row split) accumulates
     dW[:, tile] += D^T @ h[:, tile] over its rows, and db partials;
  2. row kernel: dh = D @ W for BLOCK_M full rows; then its slabs of dW and db, summed
     over the splits in split order.
The residual's gradient is dy itself (no kernel).

Precision and dtypes: fp32 accumulation; matmul operands in the autocast dtype when autocast
is on for h's device, else h's; the output in torch's promotion of the residual, the matmul
dtype and branch_scale (the residual's dtype in the model); dh in h's dtype, the residual's
gradient in the residual's, parameter gradients in their parameters'. Traced, the op is a
pair of PyTorch operators (torch.ops.vit_kernels.linear_residual and its backward); called
plainly, one torch.autograd.Function around the same launchers (kernels/_common.py's Operator).
"""
import functools
import warnings

import torch
import triton
import triton.language as tl

from kernels import _common
from kernels import _fused_linear as fl

warnings.filterwarnings("ignore", message="tl.make_block_ptr is deprecated", category=UserWarning)

OP_NAME = "linear_residual"


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["n_rows", "rows_per_sample", "has_scale"])
def _linear_residual_forward_kernel(
    h_ptr, w_ptr, b_ptr, residual_ptr, scale_ptr, out_ptr,
    n_rows, n_in, n_out, stride_h, stride_residual, stride_out, rows_per_sample, has_scale,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, NUM_CHUNKS: tl.constexpr, BLOCK_K: tl.constexpr,
    MATMUL_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    row0 = tl.program_id(0) * BLOCK_M
    acc = (tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32),) * NUM_CHUNKS
    for in0 in range(0, n_in, BLOCK_K):
        h = fl.load_tile(h_ptr, row0, in0, n_rows, n_in, stride_h, BLOCK_M, BLOCK_K).to(MATMUL_DTYPE)
        acc = fl.accumulate_times_weight(acc, h, w_ptr, in0, n_in, n_out, True, BLOCK_K, BLOCK_C, NUM_CHUNKS,
                                         MATMUL_DTYPE, INPUT_PRECISION)
    scale = fl.sample_scale(scale_ptr, has_scale, row0, n_rows, rows_per_sample, BLOCK_M)
    for k in tl.static_range(NUM_CHUNKS):
        col0 = k * BLOCK_C
        branch = acc[k] + fl.load_vector(b_ptr, col0, n_out, BLOCK_C)[None, :]
        residual = fl.load_tile(residual_ptr, row0, col0, n_rows, n_out, stride_residual, BLOCK_M,
                                BLOCK_C).to(tl.float32)
        fl.store_tile(out_ptr, residual + scale[:, None] * branch, row0, col0, n_rows, n_out, stride_out, BLOCK_M,
                      BLOCK_C)


@triton.jit(do_not_specialize=["n_rows", "rows_per_sample", "has_scale", "rows_per_split"])
def _linear_residual_backward_weight_kernel(
    h_ptr, dy_ptr, scale_ptr, dw_partial_ptr, db_partial_ptr,
    n_rows, n_in, n_out, stride_h, stride_dy, rows_per_sample, has_scale, rows_per_split,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, NUM_CHUNKS: tl.constexpr, BLOCK_Q: tl.constexpr,
    MATMUL_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One input tile over one split of the rows (fl.split_program); the panel is over C_out."""
    in0, split, row_start, row_end = fl.split_program(tl.program_id(0), n_in, rows_per_split, n_rows, BLOCK_Q)
    acc = (tl.zeros([BLOCK_C, BLOCK_Q], dtype=tl.float32),) * NUM_CHUNKS
    db = (tl.zeros([BLOCK_C], dtype=tl.float64),) * NUM_CHUNKS
    for row0 in range(row_start, row_end, BLOCK_R):
        scale = fl.sample_scale(scale_ptr, has_scale, row0, n_rows, rows_per_sample, BLOCK_R)
        # Rows past the end read dy = 0: their h adds nothing.
        h = fl.load_tile(h_ptr, row0, in0, n_rows, n_in, stride_h, BLOCK_R, BLOCK_Q).to(MATMUL_DTYPE)
        updated = ()
        sums = ()
        for k in tl.static_range(NUM_CHUNKS):
            d_t = fl.load_tile_transposed(dy_ptr, row0, k * BLOCK_C, n_rows, n_out, stride_dy, BLOCK_C,
                                          BLOCK_R).to(tl.float32) * scale[None, :]
            updated = updated + (tl.dot(d_t.to(MATMUL_DTYPE), h, acc[k], input_precision=INPUT_PRECISION),)
            sums = sums + (db[k] + tl.sum(d_t.to(tl.float64), axis=1),)
        acc = updated
        db = sums
    fl.store_panel_partial(acc, dw_partial_ptr, split, in0, n_out, n_in, BLOCK_C, NUM_CHUNKS, BLOCK_Q)
    if in0 == 0:  # every input tile sums the same D; the first one writes it
        fl.store_vector_partial(db, db_partial_ptr, split, n_out, BLOCK_C, NUM_CHUNKS)


@triton.jit(do_not_specialize=["n_rows", "rows_per_sample", "has_scale", "n_splits"])
def _linear_residual_backward_input_kernel(
    dy_ptr, w_ptr, scale_ptr, dh_ptr, dw_partial_ptr, db_partial_ptr, dw_ptr, db_ptr,
    n_rows, n_in, n_out, stride_dy, stride_dh, rows_per_sample, has_scale, n_splits,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, NUM_CHUNKS: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr, REDUCTION_BLOCK: tl.constexpr, MATMUL_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dh for BLOCK_M rows (the panel is over C_in), then slabs program, program + programs,
    ... of C_out rows of dW and db."""
    program = tl.program_id(0)
    row0 = program * BLOCK_M
    scale = fl.sample_scale(scale_ptr, has_scale, row0, n_rows, rows_per_sample, BLOCK_M)
    acc = (tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32),) * NUM_CHUNKS
    for out0 in range(0, n_out, BLOCK_K):
        d = fl.load_tile(dy_ptr, row0, out0, n_rows, n_out, stride_dy, BLOCK_M, BLOCK_K).to(tl.float32)
        d = (d * scale[:, None]).to(MATMUL_DTYPE)
        acc = fl.accumulate_times_weight(acc, d, w_ptr, out0, n_out, n_in, False, BLOCK_K, BLOCK_C, NUM_CHUNKS,
                                         MATMUL_DTYPE, INPUT_PRECISION)
    for k in tl.static_range(NUM_CHUNKS):
        fl.store_tile(dh_ptr, acc[k], row0, k * BLOCK_C, n_rows, n_in, stride_dh, BLOCK_M, BLOCK_C)
    for slab in range(program, tl.cdiv(n_out, BLOCK_S), tl.num_programs(0)):
        fl.sum_partial_rows(dw_partial_ptr, dw_ptr, slab, n_splits, n_out, n_in, BLOCK_S, REDUCTION_BLOCK)
        fl.sum_partial_vector(db_partial_ptr, db_ptr, slab, n_splits, n_out, BLOCK_S)


# ---------------------------------------------------------------------------------------------
# Launch plan
# ---------------------------------------------------------------------------------------------

def launch_plan(panel_cols: int, matmul_dtype: torch.dtype) -> fl.SeamPlan:
    """The tiles for a panel of panel_cols columns (C_out for the forward and the weight
    gradient, C_in for the row kernel, whose configuration is the plan's own)."""
    width = fl.panel_width(panel_cols, matmul_dtype)
    panel = fl.chunked(width, 128)
    if not fl.is_half(matmul_dtype):
        # Exact fp32 on the FMA units: operands in registers, so 16-wide steps.
        block_m, block_k, block_r, block_q, num_stages = 16, 16, 16, 16, 1
    elif width > 384:
        # 64-row warpgroup tiles over 8 warps, as the LayerNorm ops. At C = 512: 32 rows
        # (mma.sync), 16-wide gradient tiles and no pipelining (32-wide tiles, or two stages in
        # the forward, spilled a few bytes).
        block_m, block_k, block_r, block_q, num_stages = 32, 64, 64, 16, 1
    else:
        # 32-wide gradient tiles at C = 384: 64 spilled in pure bf16 under Triton 3.6.
        block_m, block_k, block_r, block_q, num_stages = 64, 64, 64, 32 if width == 384 else 64, 2
    return fl.SeamPlan(panel, fl.RowKernel(panel, block_m, block_k, 8, num_stages), half=fl.is_half(matmul_dtype),
                       block_m=block_m, block_k=block_k, block_r=block_r, block_q=block_q, num_warps=8,
                       num_stages=num_stages)


@functools.lru_cache(maxsize=_common.PLANNED_SHAPES)
def plan_launches(n_rows: int, n_in: int, n_out: int, matmul_dtype: torch.dtype) -> fl.SeamLaunches:
    output_plan = launch_plan(n_out, matmul_dtype)  # the forward and the weight gradient hold C_out
    row = launch_plan(n_in, matmul_dtype).row  # the row kernel holds C_in
    split = output_plan.weight_split(n_rows, n_in)
    return fl.SeamLaunches(
        forward=fl.planned_launch(_linear_residual_forward_kernel, triton.cdiv(n_rows, output_plan.block_m),
                                  output_plan.num_warps, output_plan.num_stages,
                                  output_plan.forward_constexprs(matmul_dtype)),
        weight=fl.planned_launch(_linear_residual_backward_weight_kernel,
                                 triton.cdiv(n_in, output_plan.block_q) * split.splits, output_plan.num_warps,
                                 output_plan.num_stages, output_plan.weight_constexprs(matmul_dtype)),
        row=fl.planned_launch(_linear_residual_backward_input_kernel, triton.cdiv(n_rows, row.block_m),
                              row.num_warps, row.num_stages, row.constexprs(matmul_dtype)),
        backward_grid=split)


# ---------------------------------------------------------------------------------------------
# Launchers and the operator
# ---------------------------------------------------------------------------------------------

_INTERPRETED = _common.is_interpreted(_linear_residual_forward_kernel)


def _output_dtype(residual_dtype, matmul_dtype, branch_scale) -> torch.dtype:
    return fl.result_dtype(residual_dtype, matmul_dtype, *((branch_scale.dtype,) if branch_scale is not None else ()))


def _forward(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor,
             branch_scale: torch.Tensor | None, matmul_dtype: torch.dtype) -> torch.Tensor:
    n_in, n_out = h.shape[-1], weight.shape[0]
    h2d, stride_h = fl.rows_view(h, n_in)
    residual2d, stride_residual = fl.rows_view(residual, n_out)
    n_rows = h2d.shape[0]
    weight, bias, branch_scale = fl.contiguous(weight, bias, branch_scale)
    out, = _common.new_outputs(h.device, (residual.shape, _output_dtype(residual.dtype, matmul_dtype, branch_scale)))
    if n_rows > 0:
        scale = branch_scale if branch_scale is not None else bias  # never read without a scale
        with _common.on_device_of(h):
            plan_launches(n_rows, n_in, n_out, matmul_dtype).forward(
                h2d, weight, bias, residual2d, scale, out,
                n_rows, n_in, n_out, stride_h, stride_residual, n_out,
                fl.rows_per_sample(residual, branch_scale), int(branch_scale is not None))
    return out


def _backward(dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
              branch_scale: torch.Tensor | None, matmul_dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dweight, dbias)."""
    n_in, n_out = h.shape[-1], weight.shape[0]
    h2d, stride_h = fl.rows_view(h, n_in)
    dy2d, stride_dy = fl.rows_view(dy, n_out)
    n_rows = h2d.shape[0]
    weight, branch_scale = fl.contiguous(weight, branch_scale)
    if n_rows == 0:  # every parameter gradient is an empty sum
        return h.new_zeros(h.shape), weight.new_zeros(weight.shape), bias.new_zeros(bias.shape)
    launches = plan_launches(n_rows, n_in, n_out, matmul_dtype)
    splits = launches.backward_grid.splits
    dh, dw, db, dw_partial, db_partial = _common.new_outputs(
        h.device, (h.shape, h.dtype), (weight.shape, weight.dtype), (bias.shape, bias.dtype),
        ((splits, n_out, n_in), torch.float32), ((splits, n_out), torch.float64))
    scale = branch_scale if branch_scale is not None else bias  # never read without a scale
    per_sample = fl.rows_per_sample(dy, branch_scale)
    has_scale = int(branch_scale is not None)
    with _common.on_device_of(h):
        launches.weight(h2d, dy2d, scale, dw_partial, db_partial,
                        n_rows, n_in, n_out, stride_h, stride_dy, per_sample, has_scale,
                        launches.backward_grid.rows_per_split)
        launches.row(dy2d, weight, scale, dh.view(n_rows, n_in), dw_partial, db_partial, dw, db,
                     n_rows, n_in, n_out, stride_dy, n_in, per_sample, has_scale, splits)
    return dh, dw, db


def _forward_fake(h, weight, bias, residual, branch_scale, matmul_dtype):
    return residual.new_empty(residual.shape, dtype=_output_dtype(residual.dtype, matmul_dtype, branch_scale))


def _backward_fake(dy, h, weight, bias, branch_scale, matmul_dtype):
    return h.new_empty(h.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    h, weight, bias, residual, branch_scale, matmul_dtype = inputs
    ctx.save_for_backward(h, weight, bias, branch_scale)
    ctx.matmul_dtype, ctx.residual_dtype = matmul_dtype, residual.dtype


def _backward_formula(ctx, dy):
    h, weight, bias, branch_scale = ctx.saved_tensors
    dh, dw, db = ctx.launch_backward(dy, h, weight, bias, branch_scale, ctx.matmul_dtype)
    d_residual = dy if dy.dtype == ctx.residual_dtype else dy.to(ctx.residual_dtype)
    return dh, dw, db, d_residual, None, None


_OPERATOR = _common.Operator(
    "linear_residual", _forward, _forward_fake, _backward, _backward_fake, _setup_context, _backward_formula)

_SHAPES = _common.operand_shapes(h=("...", "C_in"), weight=("C_out", "C_in"), bias=("C_out",),
                                 residual=("...", "C_out"))


def linear_residual(h, weight, bias, residual, branch_scale: torch.Tensor | None = None) -> torch.Tensor:
    """residual + s * linear(h), fused; see the module docstring.

    h: [..., C_in]; weight: [C_out, C_in]; bias: [C_out]; residual: [..., C_out]; C_in, C_out
    <= 512 (384 with fp32 matmuls). branch_scale: None, or [residual.shape[0]] per-sample scales (needs no gradient).
    Returns residual's shape, differentiable in h, weight, bias and residual. Raises ValueError
    for inconsistent shapes, unsupported dtypes or devices.
    """
    matmul_dtype = fl.matmul_dtype_of(h)
    operands = {"h": h, "weight": weight, "bias": bias, "residual": residual}
    sizes = _common.check_operands(operands, _SHAPES, matmul_dtype, _INTERPRETED, __name__, branch_scale, "residual")
    fl.panel_width(max(sizes["C_in"], sizes["C_out"]), matmul_dtype)
    return _OPERATOR(h, weight, bias, residual, branch_scale, matmul_dtype)
