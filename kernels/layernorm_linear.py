"""Fused LayerNorm + linear: linear(layer_norm(x)) = layer_norm(x) @ W^T + b, forward and backward.

Same signature and math as vit.backends.torch_layernorm_linear; the model's QKV projection
with its LayerNorm (W [3C, C]). x is [..., C], seen as [rows, C].

Forward, one kernel: a program owns BLOCK_M rows, computes their LayerNorm statistics once,
keeps layer_norm(x) on chip (the row panel, kernels/_fused_linear.py) and walks the outputs
in BLOCK_N chunks, each a matmul over the whole panel plus the bias: the normalization is the
matmul's prologue, and the normalized activations never reach memory. Saved for the
backward: per-row mean and rstd, and x_hat = (x - mean) * rstd in the matmul dtype, the operand
of the weight gradient, written once where every output tile's weight-gradient programs would
otherwise re-read fp32 x and the statistics (half the bytes; kernels/README.md has the figures).

Backward, two kernels (the pattern of kernels/_fused_linear.py):
  1. weight-gradient kernel: program (output tile, row split) accumulates
     G^T[:, tile] += x_hat^T @ dout[:, tile] over its rows, and db partials;
  2. row kernel: d_normalized = dout @ W for BLOCK_M full rows, the LayerNorm backward with
     that panel in registers, dx; then its slabs of dW = G * gamma + db (x) beta, db,
     dgamma = sum_out W * G, dbeta = sum_out W * db.

Precision and dtypes: fp32 statistics, normalization and accumulation; matmul operands in the
autocast dtype when autocast is on for x's device, else x's; the output in that matmul dtype
(what F.linear returns); dx in x's dtype, parameter gradients in their parameters' dtypes.
Traced, the op is a pair of PyTorch operators (torch.ops.vit_kernels.layernorm_linear and
its backward), so torch.compile traces through it without a graph break; called plainly, one
torch.autograd.Function around the same launchers (kernels/_common.py's Operator).
"""
import functools
import warnings

import torch
import triton
import triton.language as tl

from kernels import _common
from kernels import _fused_linear as fl

warnings.filterwarnings("ignore", message="tl.make_block_ptr is deprecated", category=UserWarning)

OP_NAME = "layernorm_linear"


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["n_rows"])
def _ln_linear_forward_kernel(
    x_ptr, out_ptr, ln_weight_ptr, ln_bias_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, x_hat_ptr,
    n_rows, n_cols, n_out, stride_x, stride_out, eps,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, NUM_CHUNKS: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr, PANEL: tl.constexpr, MATMUL_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    row0 = tl.program_id(0) * BLOCK_M
    mean, rstd, panel = fl.layer_norm_rows(x_ptr, x_hat_ptr, ln_weight_ptr, ln_bias_ptr, mean_ptr, rstd_ptr, row0,
                                           n_rows, n_cols, stride_x, eps, BLOCK_M, BLOCK_C, NUM_CHUNKS, PANEL,
                                           MATMUL_DTYPE)
    for out0 in range(0, n_out, BLOCK_N):
        acc = fl.normalized_times_weight(panel, x_ptr, ln_weight_ptr, ln_bias_ptr, mean, rstd, w_ptr, row0, out0,
                                         n_rows, n_cols, n_out, stride_x, BLOCK_M, BLOCK_C, NUM_CHUNKS, BLOCK_K,
                                         BLOCK_N, PANEL, MATMUL_DTYPE, INPUT_PRECISION)
        acc += fl.load_vector(b_ptr, out0, n_out, BLOCK_N)[None, :]
        fl.store_tile(out_ptr, acc, row0, out0, n_rows, n_out, stride_out, BLOCK_M, BLOCK_N)


@triton.jit(do_not_specialize=["n_rows", "rows_per_split"])
def _ln_linear_backward_weight_kernel(
    x_hat_ptr, dout_ptr, g_partial_ptr, db_partial_ptr,
    n_rows, n_cols, n_out, stride_dout, rows_per_split,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, NUM_CHUNKS: tl.constexpr, BLOCK_Q: tl.constexpr,
    MATMUL_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One output tile over one split of the rows (fl.split_program)."""
    out0, split, row_start, row_end = fl.split_program(tl.program_id(0), n_out, rows_per_split, n_rows, BLOCK_Q)
    acc = (tl.zeros([BLOCK_C, BLOCK_Q], dtype=tl.float32),) * NUM_CHUNKS
    db = tl.zeros([BLOCK_Q], dtype=tl.float64)
    for row0 in range(row_start, row_end, BLOCK_R):
        # Rows past the end read dout = 0 and x_hat = 0: they add nothing.
        d = fl.load_tile(dout_ptr, row0, out0, n_rows, n_out, stride_dout, BLOCK_R, BLOCK_Q)
        db += fl.column_sum(d.to(tl.float32))
        d = d.to(MATMUL_DTYPE)
        updated = ()
        for k in tl.static_range(NUM_CHUNKS):
            # The forward's x_hat: 0 past C and past the last row.
            x_hat_t = fl.load_tile_transposed(x_hat_ptr, row0, k * BLOCK_C, n_rows, n_cols, n_cols, BLOCK_C, BLOCK_R)
            updated = updated + (tl.dot(x_hat_t, d, acc[k], input_precision=INPUT_PRECISION),)
        acc = updated
    fl.store_panel_partial(acc, g_partial_ptr, split, out0, n_cols, n_out, BLOCK_C, NUM_CHUNKS, BLOCK_Q)
    outs = out0 + tl.arange(0, BLOCK_Q)
    tl.store(db_partial_ptr + split * n_out + outs, db, mask=outs < n_out)


@triton.jit(do_not_specialize=["n_rows", "n_splits"])
def _ln_linear_backward_input_kernel(
    x_ptr, dout_ptr, dx_ptr, ln_weight_ptr, ln_bias_ptr, w_ptr, mean_ptr, rstd_ptr,
    g_partial_ptr, db_partial_ptr, dw_ptr, db_ptr, d_ln_weight_ptr, d_ln_bias_ptr,
    n_rows, n_cols, n_out, stride_x, stride_dout, stride_dx, n_splits,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, NUM_CHUNKS: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr, REDUCTION_BLOCK: tl.constexpr, MATMUL_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dx for BLOCK_M rows, then slabs program, program + programs, ... of the reductions."""
    program = tl.program_id(0)
    row0 = program * BLOCK_M
    fl.layer_norm_input_gradient(dout_ptr, w_ptr, dx_ptr, dx_ptr, x_ptr, ln_weight_ptr, mean_ptr, rstd_ptr, row0,
                                 n_rows, n_cols, n_out, stride_dout, stride_x, stride_dx, stride_dx, BLOCK_M, BLOCK_C,
                                 NUM_CHUNKS, BLOCK_K, False, MATMUL_DTYPE, INPUT_PRECISION)
    for slab in range(program, tl.cdiv(n_cols, BLOCK_S), tl.num_programs(0)):
        fl.layer_norm_weight_gradients(g_partial_ptr, db_partial_ptr, w_ptr, ln_weight_ptr, ln_bias_ptr,
                                       dw_ptr, db_ptr, d_ln_weight_ptr, d_ln_bias_ptr, slab, n_splits, n_cols, n_out,
                                       BLOCK_S, REDUCTION_BLOCK)


# ---------------------------------------------------------------------------------------------
# Launch plan
# ---------------------------------------------------------------------------------------------

def launch_plan(n_cols: int, matmul_dtype: torch.dtype) -> fl.SeamPlan:
    """The tiles for C = n_cols: kernels/_fused_linear.py's LayerNorm tiling with 64 outputs per
    forward step next to the on-chip panel; weight-gradient tiles of 64 outputs (32 past
    C = 384), 16 in fp32."""
    width = fl.panel_width(n_cols, matmul_dtype)
    block_q = (32 if width > 384 else 64) if fl.is_half(matmul_dtype) else 16
    return fl.layernorm_plan(width, matmul_dtype, forward_step=64, block_q=block_q)


@functools.lru_cache(maxsize=_common.PLANNED_SHAPES)
def plan_launches(n_rows: int, n_cols: int, n_out: int, matmul_dtype: torch.dtype) -> fl.SeamLaunches:
    plan = launch_plan(n_cols, matmul_dtype)
    split = plan.weight_split(n_rows, n_out)
    row_tiles = triton.cdiv(n_rows, plan.block_m)
    return fl.SeamLaunches(
        forward=fl.planned_launch(_ln_linear_forward_kernel, row_tiles, plan.num_warps, plan.num_stages,
                                  plan.forward_constexprs(matmul_dtype, BLOCK_N=plan.forward_step, PANEL=plan.half)),
        weight=fl.planned_launch(_ln_linear_backward_weight_kernel, triton.cdiv(n_out, plan.block_q) * split.splits,
                                 plan.num_warps, plan.num_stages, plan.weight_constexprs(matmul_dtype)),
        row=fl.planned_launch(_ln_linear_backward_input_kernel, row_tiles, plan.row.num_warps, plan.row.num_stages,
                              plan.row.constexprs(matmul_dtype)),
        backward_grid=split)


# ---------------------------------------------------------------------------------------------
# Launchers and the operator
# ---------------------------------------------------------------------------------------------

_INTERPRETED = _common.is_interpreted(_ln_linear_forward_kernel)


def _forward(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, weight: torch.Tensor,
             bias: torch.Tensor, eps: float, matmul_dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, rstd, x_hat): the output and what the backward reads."""
    n_cols, n_out = x.shape[-1], weight.shape[0]
    x2d, stride_x = fl.rows_view(x, n_cols)
    n_rows = x2d.shape[0]
    ln_weight, ln_bias, weight, bias = fl.contiguous(ln_weight, ln_bias, weight, bias)
    out, mean, rstd, x_hat = _common.new_outputs(
        x.device, ((*x.shape[:-1], n_out), matmul_dtype), ((n_rows,), torch.float32), ((n_rows,), torch.float32),
        ((n_rows, n_cols), matmul_dtype))
    if n_rows > 0:
        with _common.on_device_of(x):
            plan_launches(n_rows, n_cols, n_out, matmul_dtype).forward(
                x2d, out, ln_weight, ln_bias, weight, bias, mean, rstd, x_hat,
                n_rows, n_cols, n_out, stride_x, n_out, eps)
    return out, mean, rstd, x_hat


def _backward(dout: torch.Tensor, x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
              weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
              x_hat: torch.Tensor, matmul_dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, d_ln_weight, d_ln_bias, dweight, dbias)."""
    n_cols, n_out = x.shape[-1], weight.shape[0]
    x2d, stride_x = fl.rows_view(x, n_cols)
    dout2d, stride_dout = fl.rows_view(dout, n_out)
    n_rows = x2d.shape[0]
    ln_weight, ln_bias, weight = fl.contiguous(ln_weight, ln_bias, weight)
    if n_rows == 0:  # every parameter gradient is an empty sum
        return tuple(t.new_zeros(t.shape) for t in (x, ln_weight, ln_bias, weight, bias))
    launches = plan_launches(n_rows, n_cols, n_out, matmul_dtype)
    splits = launches.backward_grid.splits
    dx, d_ln_weight, d_ln_bias, dw, db, g_partial, db_partial = _common.new_outputs(
        x.device, (x.shape, x.dtype), (ln_weight.shape, ln_weight.dtype), (ln_bias.shape, ln_bias.dtype),
        (weight.shape, weight.dtype), (bias.shape, bias.dtype), ((splits, n_cols, n_out), torch.float32),
        ((splits, n_out), torch.float64))
    with _common.on_device_of(x):
        launches.weight(x_hat, dout2d, g_partial, db_partial,
                        n_rows, n_cols, n_out, stride_dout, launches.backward_grid.rows_per_split)
        launches.row(x2d, dout2d, dx.view(n_rows, n_cols), ln_weight, ln_bias, weight, mean, rstd, g_partial,
                     db_partial, dw, db, d_ln_weight, d_ln_bias,
                     n_rows, n_cols, n_out, stride_x, stride_dout, n_cols, splits)
    return dx, d_ln_weight, d_ln_bias, dw, db


def _forward_fake(x, ln_weight, ln_bias, weight, bias, eps, matmul_dtype):
    n_rows = x.numel() // x.shape[-1]
    return (x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=matmul_dtype),
            x.new_empty((n_rows,), dtype=torch.float32), x.new_empty((n_rows,), dtype=torch.float32),
            x.new_empty((n_rows, x.shape[-1]), dtype=matmul_dtype))


def _backward_fake(dout, x, ln_weight, ln_bias, weight, bias, mean, rstd, x_hat, matmul_dtype):
    return tuple(t.new_empty(t.shape) for t in (x, ln_weight, ln_bias, weight, bias))


def _setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, weight, bias, _eps, matmul_dtype = inputs
    _out, mean, rstd, x_hat = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(mean, rstd, x_hat)
    ctx.save_for_backward(x, ln_weight, ln_bias, weight, bias, mean, rstd, x_hat)
    ctx.matmul_dtype = matmul_dtype


def _backward_formula(ctx, dout, *_saved_output_gradients):
    gradients = ctx.launch_backward(dout, *ctx.saved_tensors, ctx.matmul_dtype)
    return (*gradients, None, None)


_OPERATOR = _common.Operator(
    "layernorm_linear", _forward, _forward_fake, _backward, _backward_fake, _setup_context, _backward_formula)

_SHAPES = _common.operand_shapes(x=("...", "C"), weight=("out", "C"), ln_weight=("C",), ln_bias=("C",),
                                 bias=("out",))


def layernorm_linear(x, ln_weight, ln_bias, weight, bias, eps: float = 1e-5) -> torch.Tensor:
    """linear(layer_norm(x)), fused; see the module docstring.

    x: [..., C] with C <= 512 (384 with fp32 matmuls); ln_weight, ln_bias: [C]; weight: [out, C];
    bias: [out]. Returns
    [..., out] in the matmul dtype, differentiable in x and the four parameters. Raises
    ValueError for inconsistent shapes, unsupported dtypes or devices.
    """
    matmul_dtype = fl.matmul_dtype_of(x)
    operands = {"x": x, "ln_weight": ln_weight, "ln_bias": ln_bias, "weight": weight, "bias": bias}
    sizes = _common.check_operands(operands, _SHAPES, matmul_dtype, _INTERPRETED, __name__)
    fl.panel_width(sizes["C"], matmul_dtype)
    return _OPERATOR(x, ln_weight, ln_bias, weight, bias, float(eps), matmul_dtype)[0]
