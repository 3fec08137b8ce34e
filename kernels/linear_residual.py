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
gradient in the residual's, parameter gradients in their parameters'. The op is a PyTorch
operator (torch.ops.vit_kernels.linear_residual) with a fake and its backward registered.
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
    """Program p: input tile p % q_tiles, row split p // q_tiles; the panel is over C_out."""
    q_tiles = tl.cdiv(n_in, BLOCK_Q)
    in0 = (tl.program_id(0) % q_tiles) * BLOCK_Q
    split = tl.program_id(0) // q_tiles
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, n_rows)
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
    BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, MATMUL_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
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
        fl.sum_partial_rows(dw_partial_ptr, dw_ptr, slab, n_splits, n_out, n_in, BLOCK_S, BLOCK_N)
        fl.sum_partial_vector(db_partial_ptr, db_ptr, slab, n_splits, n_out, BLOCK_S)


# ---------------------------------------------------------------------------------------------
# Launch plan
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Plan:
    """Tiles and launch options for one panel width (C_out for the forward and the weight
    gradient, C_in for the row kernel) and matmul dtype; h100_compile_specs compiles exactly
    these."""
    panel: fl.Panel
    block_m: int  # rows per program of the forward and the row kernel
    block_k: int  # contraction step (C_in in the forward, C_out in the row kernel)
    block_r: int  # rows per step of the weight-gradient programs
    block_q: int  # input features per weight-gradient program
    num_warps: int
    num_stages: int

    def forward_constexprs(self, matmul_dtype) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_C=self.panel.block_c, NUM_CHUNKS=self.panel.num_chunks,
                    BLOCK_K=self.block_k, **fl.dtype_constexprs(matmul_dtype))

    def weight_constexprs(self, matmul_dtype) -> dict:
        return dict(BLOCK_R=self.block_r, BLOCK_C=self.panel.block_c, NUM_CHUNKS=self.panel.num_chunks,
                    BLOCK_Q=self.block_q, **fl.dtype_constexprs(matmul_dtype))

    @property
    def row(self) -> fl.RowKernel:
        """The row kernel's configuration, when this plan's panel is C_in."""
        return fl.RowKernel(self.panel, self.block_m, self.block_k, self.num_warps, self.num_stages)

    def describe(self) -> str:
        return (f"C={self.panel.num_chunks}x{self.panel.block_c} M={self.block_m} K={self.block_k} R={self.block_r} "
                f"Q={self.block_q} warps={self.num_warps} stages={self.num_stages}")


def _plan(panel_cols: int, matmul_dtype: torch.dtype) -> _Plan:
    width = fl.panel_width(panel_cols, matmul_dtype)
    if fl.is_half(matmul_dtype):
        # As kernels/layernorm_mlp.py: 64-row warpgroup tiles over 8 warps. At C = 512: 32 rows
        # (mma.sync), 16-wide gradient tiles and no pipelining (32-wide tiles, or two stages in
        # the forward, spilled a few bytes).
        if width > 384:
            return _Plan(fl.chunked(width, 128), block_m=32, block_k=64, block_r=64, block_q=16, num_warps=8,
                         num_stages=1)
        # 32-wide gradient tiles at C = 384: 64 spilled 16 B in pure bf16 under Triton 3.6 (README).
        return _Plan(fl.chunked(width, 128), block_m=64, block_k=64, block_r=64, block_q=32 if width == 384 else 64,
                     num_warps=8, num_stages=2)
    # Exact fp32 on the FMA units: operands in registers, so 16-wide steps.
    return _Plan(fl.chunked(width, 128), block_m=16, block_k=16, block_r=16, block_q=16, num_warps=8, num_stages=1)


def _split(plan: _Plan, n_rows: int, n_in: int) -> fl.Split:
    return fl.split_rows(n_rows, plan.block_r, triton.cdiv(n_in, plan.block_q), fl.WEIGHT_GRADIENT_PROGRAMS)


@functools.lru_cache(maxsize=_common.PLANNED_SHAPES)
def _launches(n_rows: int, n_in: int, n_out: int, matmul_dtype: torch.dtype) -> fl.SeamLaunches:
    output_plan = _plan(n_out, matmul_dtype)  # the forward and the weight gradient hold C_out
    input_plan = _plan(n_in, matmul_dtype)  # the row kernel holds C_in
    split = _split(output_plan, n_rows, n_in)
    return fl.SeamLaunches(
        forward=fl.planned_launch(_linear_residual_forward_kernel, triton.cdiv(n_rows, output_plan.block_m),
                                  output_plan.num_warps, output_plan.num_stages,
                                  output_plan.forward_constexprs(matmul_dtype)),
        weight=fl.planned_launch(_linear_residual_backward_weight_kernel,
                                 triton.cdiv(n_in, output_plan.block_q) * split.splits, output_plan.num_warps,
                                 output_plan.num_stages, output_plan.weight_constexprs(matmul_dtype)),
        row=fl.planned_launch(_linear_residual_backward_input_kernel, triton.cdiv(n_rows, input_plan.block_m),
                              input_plan.num_warps, input_plan.num_stages, input_plan.row.constexprs(matmul_dtype)),
        backward_grid=split)


# ---------------------------------------------------------------------------------------------
# Launchers and the operator
# ---------------------------------------------------------------------------------------------

_INTERPRETED = _common.is_interpreted(_linear_residual_forward_kernel)


def _output_dtype(residual_dtype, matmul_dtype, branch_scale) -> torch.dtype:
    return fl.result_dtype(residual_dtype, matmul_dtype, *((branch_scale.dtype,) if branch_scale is not None else ()))


def _forward(h, weight, bias, residual, branch_scale, matmul_dtype: torch.dtype):
    n_in, n_out = h.shape[-1], weight.shape[0]
    h2d = fl.rows_view(h, n_in)
    residual2d = fl.rows_view(residual, n_out)
    n_rows = h2d.shape[0]
    weight, bias, branch_scale = fl.contiguous(weight, bias, branch_scale)
    out = _common.new_output(residual.shape, _output_dtype(residual.dtype, matmul_dtype, branch_scale), h.device)
    if n_rows > 0:
        scale = branch_scale if branch_scale is not None else bias  # never read without a scale
        with _common.on_device_of(h):
            _launches(n_rows, n_in, n_out, matmul_dtype).forward(
                h2d, weight, bias, residual2d, scale, out,
                n_rows, n_in, n_out, h2d.stride(0), residual2d.stride(0), n_out,
                fl.rows_per_sample(residual, branch_scale), int(branch_scale is not None))
    return out


def _backward(dy, h, weight, bias, branch_scale, matmul_dtype: torch.dtype):
    n_in, n_out = h.shape[-1], weight.shape[0]
    h2d = fl.rows_view(h, n_in)
    dy2d = fl.rows_view(dy, n_out)
    n_rows = h2d.shape[0]
    weight, branch_scale = fl.contiguous(weight, branch_scale)
    device = h.device
    dh = _common.new_output(h.shape, h.dtype, device)
    dw = _common.new_output(weight.shape, weight.dtype, device)
    db = _common.new_output(bias.shape, bias.dtype, device)
    if n_rows == 0:
        return dh, dw.zero_(), db.zero_()
    launches = _launches(n_rows, n_in, n_out, matmul_dtype)
    splits = launches.backward_grid.splits
    dw_partial = _common.new_output((splits, n_out, n_in), torch.float32, device)
    db_partial = _common.new_output((splits, n_out), torch.float64, device)
    scale = branch_scale if branch_scale is not None else bias  # never read without a scale
    per_sample = fl.rows_per_sample(dy, branch_scale)
    has_scale = int(branch_scale is not None)
    with _common.on_device_of(h):
        launches.weight(h2d, dy2d, scale, dw_partial, db_partial,
                        n_rows, n_in, n_out, h2d.stride(0), dy2d.stride(0), per_sample, has_scale,
                        launches.backward_grid.rows_per_split)
        launches.row(dy2d, weight, scale, dh.view(n_rows, n_in), dw_partial, db_partial, dw, db,
                     n_rows, n_in, n_out, dy2d.stride(0), n_in, per_sample, has_scale, splits)
    return dh, dw, db


@torch.library.custom_op("vit_kernels::linear_residual", mutates_args=())
def _linear_residual_op(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor,
                        branch_scale: torch.Tensor | None, matmul_dtype: torch.dtype) -> torch.Tensor:
    return _forward(h, weight, bias, residual, branch_scale, matmul_dtype)


@_linear_residual_op.register_fake
def _(h, weight, bias, residual, branch_scale, matmul_dtype):
    return residual.new_empty(residual.shape, dtype=_output_dtype(residual.dtype, matmul_dtype, branch_scale))


@torch.library.custom_op("vit_kernels::linear_residual_backward", mutates_args=())
def _linear_residual_backward_op(dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                 branch_scale: torch.Tensor | None, matmul_dtype: torch.dtype
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dweight, dbias)."""
    return _backward(dy, h, weight, bias, branch_scale, matmul_dtype)


@_linear_residual_backward_op.register_fake
def _(dy, h, weight, bias, branch_scale, matmul_dtype):
    return h.new_empty(h.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    h, weight, bias, residual, branch_scale, matmul_dtype = inputs
    ctx.save_for_backward(h, weight, bias, branch_scale)
    ctx.matmul_dtype, ctx.residual_dtype = matmul_dtype, residual.dtype


def _autograd_backward(ctx, dy):
    h, weight, bias, branch_scale = ctx.saved_tensors
    dh, dw, db = _linear_residual_backward_op(dy, h, weight, bias, branch_scale, ctx.matmul_dtype)
    d_residual = dy if dy.dtype == ctx.residual_dtype else dy.to(ctx.residual_dtype)
    return dh, dw, db, d_residual, None, None


_linear_residual_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def _validate(h, weight, bias, residual, branch_scale, matmul_dtype: torch.dtype):
    named = dict(h=h, weight=weight, bias=bias, residual=residual)
    for name, t in named.items():
        _common.check_floating(name, t)
        if t.device != h.device:
            raise ValueError(f"{name} is on {t.device} but h is on {h.device}; all must be on one device")
    if h.dim() < 1 or h.shape[-1] == 0:
        raise ValueError(f"h must have shape [..., C_in] with C_in > 0, got {list(h.shape)}")
    n_in = h.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != n_in or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape [C_out, C_in={n_in}] (C_in from h), got {list(weight.shape)}")
    n_out = weight.shape[0]
    if tuple(bias.shape) != (n_out,):
        raise ValueError(f"bias must have shape [{n_out}] (C_out from weight), got {list(bias.shape)}")
    if tuple(residual.shape) != (*h.shape[:-1], n_out):
        raise ValueError(f"residual must have shape {[*h.shape[:-1], n_out]} (h's leading dimensions, C_out from "
                         f"weight), got {list(residual.shape)}")
    fl.check_branch_scale(branch_scale, residual, "residual")
    _common.check_device("h", h, _INTERPRETED, __name__)
    fl.panel_width(max(n_in, n_out), matmul_dtype)
    _common.refuse_interpreted_bf16("h (or autocast)", _INTERPRETED, matmul_dtype)


def linear_residual(h, weight, bias, residual, branch_scale: torch.Tensor | None = None) -> torch.Tensor:
    """residual + s * linear(h), fused; see the module docstring.

    h: [..., C_in]; weight: [C_out, C_in]; bias: [C_out]; residual: [..., C_out]; C_in, C_out
    <= 512 (384 with fp32 matmuls). branch_scale: None, or [residual.shape[0]] per-sample scales (needs no gradient).
    Returns residual's shape, differentiable in h, weight, bias and residual. Raises ValueError
    for inconsistent shapes, unsupported dtypes or devices.
    """
    matmul_dtype = fl.matmul_dtype_of(h)
    _validate(h, weight, bias, residual, branch_scale, matmul_dtype)
    return _linear_residual_op(h, weight, bias, residual, branch_scale, matmul_dtype)


# ---------------------------------------------------------------------------------------------
# Costs (kernels/cost.py) and the H100 compile check (kernels/h100.py), from the launch plan
# ---------------------------------------------------------------------------------------------

def launch_costs(rows: int, in_features: int, out_features: int, activation_dtype: torch.dtype = torch.float32,
                 input_dtype: torch.dtype = torch.bfloat16, matmul_dtype: torch.dtype = torch.bfloat16,
                 parameter_dtype: torch.dtype = torch.float32, samples: int = 0) -> list:
    """KernelCost of every launch of one forward and one backward of linear_residual.

    rows: h's rows (B * N); in_features: C_in; out_features: C_out; activation_dtype: the
    residual's (and the output's, dy's) dtype; input_dtype: h's (the attention output:
    bf16 under autocast); matmul_dtype: the operands'; parameter_dtype: weight's and bias';
    samples: B when a branch_scale is passed, 0 without one.
    """
    forward_plan = _plan(out_features, matmul_dtype)
    input_plan = _plan(in_features, matmul_dtype)
    useful = fl.matmul_flops(rows, out_features, in_features)

    forward = fl.Traffic()
    tiles = fl.rows_in_tiles(rows, forward_plan.block_m)
    for index, n in enumerate(tiles):
        forward.read(n * in_features, input_dtype)
        forward.read(out_features * in_features + out_features, parameter_dtype, shared="parameters")
        forward.read(n * out_features, activation_dtype)
        fl.read_scales(forward, index * forward_plan.block_m, n, rows, samples, activation_dtype)
        forward.write(n * out_features, activation_dtype)
    panel = forward_plan.panel
    executed = len(tiles) * triton.cdiv(in_features, forward_plan.block_k) * panel.num_chunks * fl.matmul_flops(
        forward_plan.block_m, panel.block_c, forward_plan.block_k)
    costs = [fl.kernel_cost(OP_NAME, _linear_residual_forward_kernel, "forward", forward, useful, executed)]

    split = _split(forward_plan, rows, in_features)
    q_tiles = triton.cdiv(in_features, forward_plan.block_q)
    weight = fl.Traffic()
    executed = 0
    for s in range(split.splits):
        row0 = s * split.rows_per_split
        n = max(0, min(split.rows_per_split, rows - row0))
        for q in range(q_tiles):
            width = min(forward_plan.block_q, in_features - q * forward_plan.block_q)
            weight.read(n * width, input_dtype)
            weight.read_rows("dy", row0, n, out_features, activation_dtype)
            fl.read_scales(weight, row0, n, rows, samples, activation_dtype)
            weight.write(out_features * width, torch.float32)
            if q == 0:
                weight.write(out_features, torch.float64)
            executed += triton.cdiv(n, forward_plan.block_r) * panel.num_chunks * fl.matmul_flops(
                panel.block_c, forward_plan.block_q, forward_plan.block_r)
    costs.append(fl.kernel_cost(OP_NAME, _linear_residual_backward_weight_kernel, "backward", weight, useful,
                                executed))

    row_kernel = fl.Traffic()
    tiles = fl.rows_in_tiles(rows, input_plan.block_m)
    for index, n in enumerate(tiles):
        row_kernel.read(n * out_features, activation_dtype)
        row_kernel.read(out_features * in_features, parameter_dtype, shared="weight")
        fl.read_scales(row_kernel, index * input_plan.block_m, n, rows, samples, activation_dtype)
        row_kernel.write(n * in_features, input_dtype)
    for slab_rows in fl.rows_in_tiles(out_features, fl.REDUCTION_SLAB):
        row_kernel.read(split.splits * slab_rows * in_features, torch.float32)
        row_kernel.read(split.splits * slab_rows, torch.float64)
        row_kernel.write(slab_rows * in_features + slab_rows, parameter_dtype)
    executed = len(tiles) * triton.cdiv(out_features, input_plan.block_k) * input_plan.panel.num_chunks * \
        fl.matmul_flops(input_plan.block_m, input_plan.panel.block_c, input_plan.block_k)
    costs.append(fl.kernel_cost(OP_NAME, _linear_residual_backward_input_kernel, "backward", row_kernel, useful,
                                executed))
    return costs


def h100_compile_specs():
    """Every kernel in every plan _plan can pick, in every dtype variant, for sm_90a (see
    kernels/layernorm_mlp.py's h100_compile_specs for the integer assumptions). h is in the
    matmul dtype, as the attention output the model feeds it."""
    specs = []
    dimensions = ("n_in", "n_out", "stride_h", "stride_residual", "stride_out", "stride_dy", "stride_dh")
    for activation, matmul in fl.DTYPE_VARIANTS:
        names = {dtype: _common.DTYPE_NAMES[dtype] for dtype in (activation, matmul)}
        output = _common.DTYPE_NAMES[fl.result_dtype(activation, matmul)]
        pointer_types = dict(
            h_ptr=names[matmul], dh_ptr=names[matmul], residual_ptr=names[activation], out_ptr=output,
            dy_ptr=output, scale_ptr=names[activation], dw_partial_ptr="fp32", db_partial_ptr="fp64",
            **{name: names[activation] for name in ("w_ptr", "b_ptr", "dw_ptr", "db_ptr")})
        variant = f"x={names[activation]} mm={names[matmul]}"
        for width in fl.panel_widths(matmul):
            plan = _plan(width, matmul)
            label = f"{variant} {plan.describe()}"
            specs.append(fl.kernel_spec(
                "linear_residual_forward", _linear_residual_forward_kernel, label, pointer_types,
                plan.forward_constexprs(matmul), plan.num_warps, plan.num_stages,
                fl.instruction_class(matmul, [plan.block_m], plan.num_warps), dimensions))
            specs.append(fl.kernel_spec(
                "linear_residual_backward_weight", _linear_residual_backward_weight_kernel, label, pointer_types,
                plan.weight_constexprs(matmul), plan.num_warps, plan.num_stages,
                fl.instruction_class(matmul, [plan.panel.block_c], plan.num_warps), dimensions))
            specs.append(fl.kernel_spec(
                "linear_residual_backward_input", _linear_residual_backward_input_kernel, label, pointer_types,
                plan.row.constexprs(matmul), plan.num_warps, plan.num_stages,
                fl.instruction_class(matmul, [plan.block_m], plan.num_warps), dimensions))
    return specs
