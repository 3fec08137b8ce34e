"""Fused LayerNorm + linear: linear(layer_norm(x)) = layer_norm(x) @ W^T + b, forward and backward.

Same signature and math as vit.backends.torch_layernorm_linear; the model's QKV projection
with its LayerNorm (W [3C, C]). x is [..., C], seen as [rows, C].

Forward, one kernel: a program owns BLOCK_M rows, computes their LayerNorm statistics once,
keeps layer_norm(x) on chip (the row panel, kernels/_fused_linear.py) and walks the outputs
in BLOCK_N chunks, each a matmul over the whole panel plus the bias: the normalization is the
matmul's prologue, and the normalized activations never reach memory. Saved for the
backward: per-row mean and rstd, and x_hat = (x - mean) * rstd in the matmul dtype, the operand
of the weight gradient (at the model's shape 6.4 MB written once, where each of the 18 output
tiles' weight-gradient programs would otherwise re-read fp32 x and the statistics: 115 MB
instead of 230 MB by kernels/cost.py's count).

Backward, two kernels (the pattern of kernels/_fused_linear.py):
  1. weight-gradient kernel: program (output tile, row split) accumulates
     G^T[:, tile] += x_hat^T @ dout[:, tile] over its rows, and db partials;
  2. row kernel: d_normalized = dout @ W for BLOCK_M full rows, the LayerNorm backward with
     that panel in registers, dx; then its slabs of dW = G * gamma + db (x) beta, db,
     dgamma = sum_out W * G, dbeta = sum_out W * db.

Precision and dtypes: fp32 statistics, normalization and accumulation; matmul operands in the
autocast dtype when autocast is on for x's device, else x's; the output in that matmul dtype
(what F.linear returns); dx in x's dtype, parameter gradients in their parameters' dtypes.
The op is a PyTorch operator (torch.ops.vit_kernels.layernorm_linear) with a fake and its
backward registered, so torch.compile traces through it without a graph break.
"""
import functools
import warnings
from dataclasses import dataclass

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
    mean, rstd = fl.row_statistics(x_ptr, row0, n_rows, n_cols, stride_x, eps, BLOCK_M, BLOCK_C, NUM_CHUNKS)
    rows = row0 + tl.arange(0, BLOCK_M)
    tl.store(mean_ptr + rows, mean, mask=rows < n_rows)
    tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)
    panel = fl.normalized_panel(x_ptr, x_hat_ptr, ln_weight_ptr, ln_bias_ptr, mean, rstd, row0, n_rows, n_cols,
                                stride_x, BLOCK_M, BLOCK_C, NUM_CHUNKS, PANEL, MATMUL_DTYPE)
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
    """Program p: output tile p % q_tiles, row split p // q_tiles."""
    q_tiles = tl.cdiv(n_out, BLOCK_Q)
    out0 = (tl.program_id(0) % q_tiles) * BLOCK_Q
    split = tl.program_id(0) // q_tiles
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, n_rows)
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
    BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, MATMUL_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dx for BLOCK_M rows, then slabs program, program + programs, ... of the reductions."""
    program = tl.program_id(0)
    row0 = program * BLOCK_M
    d_normed = (tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32),) * NUM_CHUNKS
    for out0 in range(0, n_out, BLOCK_K):
        d = fl.load_tile(dout_ptr, row0, out0, n_rows, n_out, stride_dout, BLOCK_M, BLOCK_K).to(MATMUL_DTYPE)
        d_normed = fl.accumulate_times_weight(d_normed, d, w_ptr, out0, n_out, n_cols, False, BLOCK_K, BLOCK_C,
                                              NUM_CHUNKS, MATMUL_DTYPE, INPUT_PRECISION)
    mean = fl.load_row_vector(mean_ptr, row0, n_rows, BLOCK_M)
    rstd = fl.load_row_vector(rstd_ptr, row0, n_rows, BLOCK_M)
    fl.layer_norm_backward(d_normed, dx_ptr, dx_ptr, x_ptr, ln_weight_ptr, mean, rstd, row0, n_rows, n_cols,
                           stride_x, stride_dx, stride_dx, BLOCK_M, BLOCK_C, NUM_CHUNKS, False)
    for slab in range(program, tl.cdiv(n_cols, BLOCK_S), tl.num_programs(0)):
        fl.layer_norm_weight_gradients(g_partial_ptr, db_partial_ptr, w_ptr, ln_weight_ptr, ln_bias_ptr,
                                       dw_ptr, db_ptr, d_ln_weight_ptr, d_ln_bias_ptr, slab, n_splits, n_cols, n_out,
                                       BLOCK_S, BLOCK_N)


# ---------------------------------------------------------------------------------------------
# Launch plan
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Plan:
    """Tiles and launch options, fixed per (C, matmul dtype); h100_compile_specs compiles
    exactly these."""
    panel: fl.Panel  # C as the forward and the weight-gradient kernel hold it
    row: fl.RowKernel  # the row kernel's configuration
    half: bool  # bf16/fp16 operands on tensor cores; else exact fp32 on the FMA units
    block_m: int  # rows per program of the forward and the row kernel
    block_n: int  # outputs per forward step
    block_k: int  # contraction step over a streamed dimension (C in fp32, the outputs in the row kernel)
    block_r: int  # rows per step of the weight-gradient programs
    block_q: int  # outputs per weight-gradient program
    num_warps: int
    num_stages: int  # forward and weight-gradient kernel

    def forward_constexprs(self, matmul_dtype) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_C=self.panel.block_c, NUM_CHUNKS=self.panel.num_chunks,
                    BLOCK_K=self.block_k, BLOCK_N=self.block_n, PANEL=self.half, **fl.dtype_constexprs(matmul_dtype))

    def weight_constexprs(self, matmul_dtype) -> dict:
        return dict(BLOCK_R=self.block_r, BLOCK_C=self.panel.block_c, NUM_CHUNKS=self.panel.num_chunks,
                    BLOCK_Q=self.block_q, **fl.dtype_constexprs(matmul_dtype))

    def describe(self) -> str:
        return (f"C={self.panel.num_chunks}x{self.panel.block_c} M={self.block_m} N={self.block_n} K={self.block_k} "
                f"R={self.block_r} Q={self.block_q} warps={self.num_warps} stages={self.num_stages}")


def _plan(n_cols: int, matmul_dtype: torch.dtype) -> _Plan:
    width = fl.panel_width(n_cols, matmul_dtype)
    if fl.is_half(matmul_dtype):
        # As kernels/layernorm_mlp.py: 64-row warpgroup tiles over 8 warps (32 rows, mma.sync,
        # at C = 512); 64 outputs per forward step next to the on-chip panel; the row kernel's
        # gradient panel in 64-wide chunks, unpipelined, for the LayerNorm backward's room.
        block_m = 32 if width > 384 else 64
        return _Plan(fl.chunked(width, 128), fl.RowKernel(fl.chunked(width, 64), block_m, 64, 8, num_stages=1),
                     half=True, block_m=block_m, block_n=64, block_k=64, block_r=64,
                     block_q=32 if width > 384 else 64, num_warps=8, num_stages=2)
    # Exact fp32 on the FMA units: operands in registers, so 16-wide steps.
    # Row kernel in 32-wide chunks: 128-wide ones spilled 24-44 B under Triton 3.6 (README).
    return _Plan(fl.chunked(width, 128), fl.RowKernel(fl.chunked(width, 32), 16, 16, 8, num_stages=1), half=False,
                 block_m=16, block_n=64, block_k=16, block_r=16, block_q=16, num_warps=8, num_stages=1)


def _split(plan: _Plan, n_rows: int, n_out: int) -> fl.Split:
    return fl.split_rows(n_rows, plan.block_r, triton.cdiv(n_out, plan.block_q), fl.WEIGHT_GRADIENT_PROGRAMS)


@functools.lru_cache(maxsize=_common.PLANNED_SHAPES)
def _launches(n_rows: int, n_cols: int, n_out: int, matmul_dtype: torch.dtype) -> fl.SeamLaunches:
    plan = _plan(n_cols, matmul_dtype)
    split = _split(plan, n_rows, n_out)
    row_tiles = triton.cdiv(n_rows, plan.block_m)
    return fl.SeamLaunches(
        forward=fl.planned_launch(_ln_linear_forward_kernel, row_tiles, plan.num_warps, plan.num_stages,
                                  plan.forward_constexprs(matmul_dtype)),
        weight=fl.planned_launch(_ln_linear_backward_weight_kernel, triton.cdiv(n_out, plan.block_q) * split.splits,
                                 plan.num_warps, plan.num_stages, plan.weight_constexprs(matmul_dtype)),
        row=fl.planned_launch(_ln_linear_backward_input_kernel, row_tiles, plan.row.num_warps, plan.row.num_stages,
                              plan.row.constexprs(matmul_dtype)),
        backward_grid=split)


# ---------------------------------------------------------------------------------------------
# Launchers and the operator
# ---------------------------------------------------------------------------------------------

_INTERPRETED = _common.is_interpreted(_ln_linear_forward_kernel)


def _forward(x, ln_weight, ln_bias, weight, bias, eps: float, matmul_dtype: torch.dtype):
    n_cols, n_out = x.shape[-1], weight.shape[0]
    x2d = fl.rows_view(x, n_cols)
    n_rows = x2d.shape[0]
    ln_weight, ln_bias, weight, bias = fl.contiguous(ln_weight, ln_bias, weight, bias)
    out = _common.new_output((*x.shape[:-1], n_out), matmul_dtype, x.device)
    mean = _common.new_output((n_rows,), torch.float32, x.device)
    rstd = _common.new_output((n_rows,), torch.float32, x.device)
    x_hat = _common.new_output((n_rows, n_cols), matmul_dtype, x.device)
    if n_rows > 0:
        with _common.on_device_of(x):
            _launches(n_rows, n_cols, n_out, matmul_dtype).forward(
                x2d, out, ln_weight, ln_bias, weight, bias, mean, rstd, x_hat,
                n_rows, n_cols, n_out, x2d.stride(0), n_out, eps)
    return out, mean, rstd, x_hat


def _backward(dout, x, ln_weight, ln_bias, weight, bias, mean, rstd, x_hat, matmul_dtype: torch.dtype):
    n_cols, n_out = x.shape[-1], weight.shape[0]
    x2d = fl.rows_view(x, n_cols)
    dout2d = fl.rows_view(dout, n_out)
    n_rows = x2d.shape[0]
    ln_weight, ln_bias, weight = fl.contiguous(ln_weight, ln_bias, weight)
    device = x.device
    dx = _common.new_output(x.shape, x.dtype, device)
    grads = [_common.new_output(p.shape, p.dtype, device) for p in (ln_weight, ln_bias, weight, bias)]
    if n_rows == 0:
        return (dx, *(g.zero_() for g in grads))
    d_ln_weight, d_ln_bias, dw, db = grads
    launches = _launches(n_rows, n_cols, n_out, matmul_dtype)
    splits = launches.backward_grid.splits
    g_partial = _common.new_output((splits, n_cols, n_out), torch.float32, device)
    db_partial = _common.new_output((splits, n_out), torch.float64, device)
    with _common.on_device_of(x):
        launches.weight(x_hat, dout2d, g_partial, db_partial,
                        n_rows, n_cols, n_out, dout2d.stride(0), launches.backward_grid.rows_per_split)
        launches.row(x2d, dout2d, dx.view(n_rows, n_cols), ln_weight, ln_bias, weight, mean, rstd, g_partial,
                     db_partial, dw, db, d_ln_weight, d_ln_bias,
                     n_rows, n_cols, n_out, x2d.stride(0), dout2d.stride(0), n_cols, splits)
    return dx, d_ln_weight, d_ln_bias, dw, db


@torch.library.custom_op("vit_kernels::layernorm_linear", mutates_args=())
def _layernorm_linear_op(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor, eps: float, matmul_dtype: torch.dtype
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, rstd, x_hat): the output and what the backward reads."""
    return _forward(x, ln_weight, ln_bias, weight, bias, eps, matmul_dtype)


@_layernorm_linear_op.register_fake
def _(x, ln_weight, ln_bias, weight, bias, eps, matmul_dtype):
    n_rows = x.numel() // x.shape[-1]
    return (x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=matmul_dtype),
            x.new_empty((n_rows,), dtype=torch.float32), x.new_empty((n_rows,), dtype=torch.float32),
            x.new_empty((n_rows, x.shape[-1]), dtype=matmul_dtype))


@torch.library.custom_op("vit_kernels::layernorm_linear_backward", mutates_args=())
def _layernorm_linear_backward_op(dout: torch.Tensor, x: torch.Tensor, ln_weight: torch.Tensor,
                                  ln_bias: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                  mean: torch.Tensor, rstd: torch.Tensor, x_hat: torch.Tensor,
                                  matmul_dtype: torch.dtype
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, d_ln_weight, d_ln_bias, dweight, dbias)."""
    return _backward(dout, x, ln_weight, ln_bias, weight, bias, mean, rstd, x_hat, matmul_dtype)


@_layernorm_linear_backward_op.register_fake
def _(dout, x, ln_weight, ln_bias, weight, bias, mean, rstd, x_hat, matmul_dtype):
    return tuple(t.new_empty(t.shape) for t in (x, ln_weight, ln_bias, weight, bias))


def _setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, weight, bias, _eps, matmul_dtype = inputs
    _out, mean, rstd, x_hat = output
    ctx.set_materialize_grads(False)  # the saved outputs get no gradient: no zeros to launch
    ctx.mark_non_differentiable(mean, rstd, x_hat)
    ctx.save_for_backward(x, ln_weight, ln_bias, weight, bias, mean, rstd, x_hat)
    ctx.matmul_dtype = matmul_dtype


def _autograd_backward(ctx, dout, *_saved_output_gradients):
    gradients = _layernorm_linear_backward_op(dout, *ctx.saved_tensors, ctx.matmul_dtype)
    return (*gradients, None, None)


_layernorm_linear_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def _validate(x, ln_weight, ln_bias, weight, bias, matmul_dtype: torch.dtype):
    named = dict(x=x, ln_weight=ln_weight, ln_bias=ln_bias, weight=weight, bias=bias)
    for name, t in named.items():
        _common.check_floating(name, t)
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all must be on one device")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape [..., C] with C > 0, got {list(x.shape)}")
    n_cols = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != n_cols or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape [out, C={n_cols}] (C from x), got {list(weight.shape)}")
    expected = dict(ln_weight=(n_cols,), ln_bias=(n_cols,), bias=(weight.shape[0],))
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)} (C={n_cols} from x, out={weight.shape[0]} from "
                             f"weight), got {list(named[name].shape)}")
    _common.check_device("x", x, _INTERPRETED, __name__)
    fl.panel_width(n_cols, matmul_dtype)
    _common.refuse_interpreted_bf16("x (or autocast)", _INTERPRETED, matmul_dtype)


def layernorm_linear(x, ln_weight, ln_bias, weight, bias, eps: float = 1e-5) -> torch.Tensor:
    """linear(layer_norm(x)), fused; see the module docstring.

    x: [..., C] with C <= 512 (384 with fp32 matmuls); ln_weight, ln_bias: [C]; weight: [out, C];
    bias: [out]. Returns
    [..., out] in the matmul dtype, differentiable in x and the four parameters. Raises
    ValueError for inconsistent shapes, unsupported dtypes or devices.
    """
    matmul_dtype = fl.matmul_dtype_of(x)
    _validate(x, ln_weight, ln_bias, weight, bias, matmul_dtype)
    return _layernorm_linear_op(x, ln_weight, ln_bias, weight, bias, float(eps), matmul_dtype)[0]


# ---------------------------------------------------------------------------------------------
# Costs (kernels/cost.py) and the H100 compile check (kernels/h100.py), from the launch plan
# ---------------------------------------------------------------------------------------------

def launch_costs(rows: int, cols: int, out_features: int, activation_dtype: torch.dtype = torch.float32,
                 matmul_dtype: torch.dtype = torch.bfloat16, parameter_dtype: torch.dtype = torch.float32) -> list:
    """KernelCost of every launch of one forward and one backward of layernorm_linear.

    rows: x's rows (B * N); cols: C; out_features: the linear's outputs (3C for QKV);
    activation_dtype: x's (and dx's) dtype; matmul_dtype: the operands' and the output's (the
    autocast dtype); parameter_dtype: the four parameters'.
    """
    plan = _plan(cols, matmul_dtype)
    num_chunks, block_c = plan.panel.num_chunks, plan.panel.block_c
    tiles = fl.rows_in_tiles(rows, plan.block_m)
    useful = fl.matmul_flops(rows, out_features, cols)

    forward = fl.Traffic()
    for n in tiles:
        forward.read(n * cols, activation_dtype)
        forward.read(2 * cols + out_features * cols + out_features, parameter_dtype, shared="parameters")
        forward.write(n * out_features + n * cols, matmul_dtype)  # out, x_hat
        forward.write(2 * n, torch.float32)
    step = (num_chunks * fl.matmul_flops(plan.block_m, plan.block_n, block_c) if plan.half
            else triton.cdiv(cols, plan.block_k) * fl.matmul_flops(plan.block_m, plan.block_n, plan.block_k))
    costs = [fl.kernel_cost(OP_NAME, _ln_linear_forward_kernel, "forward", forward, useful,
                            len(tiles) * triton.cdiv(out_features, plan.block_n) * step)]

    split = _split(plan, rows, out_features)
    q_tiles = triton.cdiv(out_features, plan.block_q)
    weight = fl.Traffic()
    executed = 0
    for s in range(split.splits):
        n = max(0, min(split.rows_per_split, rows - s * split.rows_per_split))
        for q in range(q_tiles):
            width = min(plan.block_q, out_features - q * plan.block_q)
            weight.read(n * width, matmul_dtype)  # dout
            weight.read_rows("x_hat", s * split.rows_per_split, n, cols, matmul_dtype)
            weight.write(cols * width, torch.float32)
            weight.write(width, torch.float64)
            executed += triton.cdiv(n, plan.block_r) * num_chunks * fl.matmul_flops(block_c, plan.block_q,
                                                                                      plan.block_r)
    costs.append(fl.kernel_cost(OP_NAME, _ln_linear_backward_weight_kernel, "backward", weight, useful, executed))

    row_kernel = fl.Traffic()
    for n in tiles:
        row_kernel.read(n * out_features, matmul_dtype)
        row_kernel.read(out_features * cols + cols, parameter_dtype, shared="weight, ln_weight")
        row_kernel.read(2 * n, torch.float32)
        row_kernel.read(n * cols, activation_dtype)
        row_kernel.write(n * cols, activation_dtype)
    for slab, slab_cols in enumerate(fl.rows_in_tiles(cols, fl.REDUCTION_SLAB)):
        row_kernel.read(split.splits * slab_cols * out_features, torch.float32)
        row_kernel.read(split.splits * out_features, torch.float64, shared="db partials")
        row_kernel.read(slab_cols, parameter_dtype)  # ln_bias
        row_kernel.write(slab_cols * out_features + 2 * slab_cols + (out_features if slab == 0 else 0),
                         parameter_dtype)
    executed = len(tiles) * triton.cdiv(out_features, plan.block_k) * plan.row.panel.num_chunks * fl.matmul_flops(
        plan.block_m, plan.row.panel.block_c, plan.block_k)
    costs.append(fl.kernel_cost(OP_NAME, _ln_linear_backward_input_kernel, "backward", row_kernel, useful, executed))
    return costs


def h100_compile_specs():
    """Every kernel in every plan _plan can pick, in every dtype variant, for sm_90a (see
    kernels/layernorm_mlp.py's h100_compile_specs for the integer assumptions)."""
    specs = []
    dimensions = ("n_cols", "n_out", "stride_x", "stride_out", "stride_dout", "stride_dx")
    for activation, matmul in fl.DTYPE_VARIANTS:
        names = {dtype: _common.DTYPE_NAMES[dtype] for dtype in (activation, matmul)}
        pointer_types = dict(
            x_ptr=names[activation], dx_ptr=names[activation], out_ptr=names[matmul], dout_ptr=names[matmul],
            x_hat_ptr=names[matmul],
            mean_ptr="fp32", rstd_ptr="fp32", g_partial_ptr="fp32", db_partial_ptr="fp64",
            **{name: names[activation] for name in ("ln_weight_ptr", "ln_bias_ptr", "w_ptr", "b_ptr", "dw_ptr",
                                                   "db_ptr", "d_ln_weight_ptr", "d_ln_bias_ptr")})
        variant = f"x={names[activation]} mm={names[matmul]}"
        for width in fl.panel_widths(matmul):
            plan = _plan(width, matmul)
            label = f"{variant} {plan.describe()}"
            specs.append(fl.kernel_spec(
                "ln_linear_forward", _ln_linear_forward_kernel, label, pointer_types, plan.forward_constexprs(matmul),
                plan.num_warps, plan.num_stages, fl.instruction_class(matmul, [plan.block_m], plan.num_warps),
                dimensions))
            specs.append(fl.kernel_spec(
                "ln_linear_backward_weight", _ln_linear_backward_weight_kernel, label, pointer_types,
                plan.weight_constexprs(matmul), plan.num_warps, plan.num_stages,
                fl.instruction_class(matmul, [plan.panel.block_c], plan.num_warps), dimensions))
            specs.append(fl.kernel_spec(
                "ln_linear_backward_input", _ln_linear_backward_input_kernel, f"{variant} {plan.row.describe()}",
                pointer_types, plan.row.constexprs(matmul), plan.row.num_warps, plan.row.num_stages,
                fl.instruction_class(matmul, [plan.block_m], plan.num_warps), dimensions))
    return specs
