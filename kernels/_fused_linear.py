"""What the fused linear ops share: layernorm_linear, linear_residual and layernorm_mlp.

Each of them is a matmul whose other side is a *row panel*: BLOCK_M rows by all C columns of
an activation (the LayerNorm input, the output being accumulated, the input gradient being
accumulated). A program keeps the panel on chip as NUM_CHUNKS tiles of [BLOCK_M, BLOCK_C] in
a tl.tuple (Triton tensors must have power-of-two shapes; C = 384 is 3 x 128), so that a
row's LayerNorm statistics, normalization and the full output row are computed once.

The backward of every op is the same two launches:
  1. weight-gradient kernel: split-K over rows. Each program owns a column tile of a weight
     gradient (BLOCK_Q outputs) and a contiguous split of the rows, and accumulates
     panel^T @ tile for every chunk of the panel; it writes its [C, BLOCK_Q] share to its
     own slot of a partial buffer [splits, C, N]. Bias (and LayerNorm) sums go to partial
     vectors the same way, in fp64.
  2. row kernel: each program owns BLOCK_M rows and computes the input gradient (for the
     LayerNorm ops the LayerNorm backward too, with the gradient panel in registers), then
     sums the partials of a slab of C columns over the splits, in split order. Every
     element is written by one program with one fixed order: deterministic, no atomics.
For the LayerNorm ops the weight-gradient kernel contracts with x_hat = (x - mean) * rstd
(saved by the forward in the matmul dtype), not with layer_norm(x): G = D^T @ x_hat, and the
row kernel's reduction finishes
    dW = G * gamma + db (x) beta,  dgamma = sum_out W * G,  dbeta = sum_out W * db,
because dgamma = sum_rows (D @ W) * x_hat = sum_out W * (D^T x_hat) and
dbeta = sum_rows D @ W = db @ W. The row-owning kernel has the full row gradient but cannot
sum over other programs' rows; this way it never has to.

Matmul operands are rounded to the matmul dtype (bf16/fp16 under autocast, like F.linear);
weights are read in their own dtype (fp32 parameters) and rounded in registers, so no cast
kernel runs. Two operand classes:
  - "half" (bf16, fp16): tensor cores (wgmma, 64-row tiles), the normalized panel kept on
    chip;
  - "fp32": exact fp32 products on the FMA units (input_precision="ieee", as torch's fp32
    linear), 16-row tiles and 16-wide contraction steps, and the normalized panel recomputed
    per contraction step: an FMA dot holds both operands in registers, and a 128-wide chunk
    of the panel as the A operand spilled at every tiling tried.

Each op is a forward and a backward launcher that kernels/_common.py's Operator runs as a pair
of PyTorch operators when traced, as one torch.autograd.Function when called plainly: the
forward returns the output and what the backward reads, the backward the gradients; the
public function checks its operands (_common.check_operands), takes the matmul dtype from
autocast (which a trace resolves) and calls the Operator. The launch plans
(SeamPlan, one per panel width and matmul dtype) are the same for every shape of rows.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import _common

# The widest C the row panels take: past it the [BLOCK_M, C] fp32 accumulators of the row
# kernels no longer fit in registers next to anything else at any tile that still uses tensor
# cores well. With exact fp32 matmuls (FMA dots hold their operands in registers) the
# weight-gradient kernels spill already at four 128-wide chunks.
MAX_PANEL_COLUMNS = 512
MAX_FP32_PANEL_COLUMNS = 384
# Panels are whole multiples of this many columns (C = 384 is exactly 3): few distinct
# configurations to compile, and no padding at the model's width.
PANEL_STEP = 128

# The weight-gradient kernels split the rows so that about this many programs run: one wave
# on an H100's 132 SMs. A fixed number, not the device's SM count, so that the partial-sum
# layout, and with it the summation order, is the same on every machine.
WEIGHT_GRADIENT_PROGRAMS = 132

# The row kernels sum the weight-gradient partials in slabs of this many columns of C (a
# program takes slabs program, program + programs, ...): C = 384 is 96 slabs, spread over the
# model's 130 row tiles. Each slab is summed in steps of REDUCTION_BLOCK output columns.
REDUCTION_SLAB = 4
REDUCTION_BLOCK = 64

TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# ---------------------------------------------------------------------------------------------
# Planning (Python)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Panel:
    """How a kernel holds C columns on chip: num_chunks tiles of block_c columns."""
    block_c: int
    num_chunks: int

    @property
    def width(self) -> int:
        return self.block_c * self.num_chunks


@functools.lru_cache(maxsize=_common.PLANNED_SHAPES)
def panel_width(n_cols: int, matmul_dtype: torch.dtype) -> int:
    """C rounded up to a multiple of PANEL_STEP; ValueError past the widest the kernels take."""
    limit = MAX_PANEL_COLUMNS if is_half(matmul_dtype) else MAX_FP32_PANEL_COLUMNS
    if n_cols > limit:
        raise ValueError(f"the fused kernels take at most {limit} features per row with {matmul_dtype} matmuls (the "
                         f"row panel is kept on chip), got {n_cols}; use the torch backend for wider models")
    return PANEL_STEP * triton.cdiv(n_cols, PANEL_STEP)


def panel_widths(matmul_dtype: torch.dtype) -> list[int]:
    """Every width panel_width can return (for the compile check)."""
    limit = MAX_PANEL_COLUMNS if is_half(matmul_dtype) else MAX_FP32_PANEL_COLUMNS
    return list(range(PANEL_STEP, limit + 1, PANEL_STEP))


def chunked(width: int, block_c: int) -> Panel:
    return Panel(block_c, width // block_c)


@dataclass(frozen=True)
class RowKernel:
    """Launch configuration of an op's row kernel: the input gradient of BLOCK_M full rows
    (the panel), contracted in BLOCK_K steps, then its slabs of the partial sums."""
    panel: Panel
    block_m: int
    block_k: int
    num_warps: int
    num_stages: int

    def constexprs(self, matmul_dtype: torch.dtype) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_C=self.panel.block_c, NUM_CHUNKS=self.panel.num_chunks,
                    BLOCK_K=self.block_k, BLOCK_S=REDUCTION_SLAB, REDUCTION_BLOCK=REDUCTION_BLOCK,
                    **dtype_constexprs(matmul_dtype))

    def describe(self) -> str:
        return (f"C={self.panel.num_chunks}x{self.panel.block_c} M={self.block_m} K={self.block_k} "
                f"warps={self.num_warps} stages={self.num_stages}")


def dtype_constexprs(matmul_dtype: torch.dtype) -> dict:
    return dict(MATMUL_DTYPE=TRITON_DTYPES[matmul_dtype], INPUT_PRECISION=input_precision(matmul_dtype))


def is_half(matmul_dtype: torch.dtype) -> bool:
    return matmul_dtype in (torch.float16, torch.bfloat16)


def input_precision(matmul_dtype: torch.dtype) -> str:
    # fp32 matmuls in true fp32 ("ieee"), not TF32, so that they match torch's fp32 linears.
    # (Ignored for fp16/bf16 operands.)
    return "ieee" if matmul_dtype == torch.float32 else "tf32"


def matmul_dtype_of(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would multiply x in: the autocast dtype when autocast is on for x's
    device, else x's own."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


@dataclass(frozen=True)
class SeamPlan:
    """Tiles and launch options of a fused linear op, fixed per (panel width, matmul dtype)
    rather than autotuned: the interpreter cannot run triton.autotune, and kernels/specs.py
    compiles exactly these for sm_90."""
    panel: Panel  # the panel as the forward and the weight-gradient kernel hold it
    row: RowKernel  # the row kernel's configuration
    half: bool  # bf16/fp16 operands on tensor cores; else exact fp32 on the FMA units
    block_m: int  # rows per program of the forward and the row kernel
    block_k: int  # contraction step over a streamed dimension
    block_r: int  # rows per step of the weight-gradient programs
    block_q: int  # weight-gradient columns per weight-gradient program
    num_warps: int
    num_stages: int  # forward and weight-gradient kernel
    forward_step: int = 0  # the LayerNorm ops' outputs (hidden units) per forward step

    def forward_constexprs(self, matmul_dtype: torch.dtype, **options) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_C=self.panel.block_c, NUM_CHUNKS=self.panel.num_chunks,
                    BLOCK_K=self.block_k, **options, **dtype_constexprs(matmul_dtype))

    def weight_constexprs(self, matmul_dtype: torch.dtype, **options) -> dict:
        return dict(BLOCK_R=self.block_r, BLOCK_C=self.panel.block_c, NUM_CHUNKS=self.panel.num_chunks,
                    BLOCK_Q=self.block_q, **options, **dtype_constexprs(matmul_dtype))

    def weight_split(self, n_rows: int, n_columns: int) -> Split:
        """The rows of each weight-gradient program, for a gradient of n_columns columns in
        block_q tiles."""
        return split_rows(n_rows, self.block_r, triton.cdiv(n_columns, self.block_q), WEIGHT_GRADIENT_PROGRAMS)

    def describe(self, forward_step: str = "") -> str:
        """The plan in a compile label; forward_step names the forward step's letter (N, H)."""
        step = f" {forward_step}={self.forward_step}" if forward_step else ""
        return (f"C={self.panel.num_chunks}x{self.panel.block_c} M={self.block_m} K={self.block_k}{step} "
                f"R={self.block_r} Q={self.block_q} warps={self.num_warps} stages={self.num_stages}")


def layernorm_plan(width: int, matmul_dtype: torch.dtype, forward_step: int, block_q: int) -> SeamPlan:
    """The tiling the two LayerNorm ops share at panel width `width`; each picks its forward
    step and weight-gradient tile (kernels/README.md has the history).
    - half: 64-row tiles, the smallest a warpgroup MMA takes, over 8 warps, which split the
      [64, C] fp32 accumulators; past C = 384 that no longer fits next to the rest: 32 rows
      (mma.sync). The row kernel's gradient panel in 64-wide chunks, unpipelined: 128-wide
      chunks or two stages left the LayerNorm backward's temporaries no room.
    - fp32 (exact, on the FMA units): an FMA dot holds its operands in registers, so tiles and
      contraction steps stay at 16; the row kernel in 32-wide chunks (128-wide ones spilled)."""
    if is_half(matmul_dtype):
        block_m = 32 if width > 384 else 64
        return SeamPlan(chunked(width, 128), RowKernel(chunked(width, 64), block_m, 64, 8, num_stages=1), half=True,
                        block_m=block_m, block_k=64, block_r=64, block_q=block_q, num_warps=8, num_stages=2,
                        forward_step=forward_step)
    return SeamPlan(chunked(width, 128), RowKernel(chunked(width, 32), 16, 16, 8, num_stages=1), half=False,
                    block_m=16, block_k=16, block_r=16, block_q=block_q, num_warps=8, num_stages=1,
                    forward_step=forward_step)


@dataclass(frozen=True)
class Split:
    """Rows divided among weight-gradient programs: `splits` slots of `rows_per_split` rows
    (a multiple of the row step, so no step straddles two splits)."""
    splits: int
    rows_per_split: int


def split_rows(n_rows: int, row_step: int, programs_per_split: int, target_programs: int) -> Split:
    steps = max(1, triton.cdiv(n_rows, row_step))  # one (empty) split when there are no rows
    splits = max(1, min(steps, target_programs // max(1, programs_per_split)))
    steps_per_split = triton.cdiv(steps, splits)
    return Split(triton.cdiv(steps, steps_per_split), steps_per_split * row_step)


def rows_view(t: torch.Tensor, n_cols: int) -> tuple[torch.Tensor, int]:
    """t as [rows, n_cols] with unit column stride, and its row stride: a view when possible
    (the kernels take any row stride), a contiguous copy otherwise."""
    t2d = t.reshape(-1, n_cols)
    row_stride, column_stride = t2d.stride()
    if n_cols > 1 and column_stride != 1:
        return t2d.contiguous(), n_cols
    return t2d, row_stride


def contiguous(*tensors):
    """The parameters as the kernels index them (unit stride, row-major); None stays None.
    A no-op, launching nothing, for the parameters of a model."""
    return [t if t is None else t.contiguous() for t in tensors]


def rows_per_sample(x: torch.Tensor, branch_scale: torch.Tensor | None) -> int:
    """Rows of x's [rows, C] view that belong to one sample (x.shape[0] samples)."""
    if branch_scale is None or x.shape[0] == 0:
        return 1
    return max(1, x.numel() // (x.shape[0] * x.shape[-1]))


def result_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """torch's type promotion over floating dtypes (what residual + scale * linear gives): one
    dtype stays itself, fp16 with bf16 gives fp32, anything with fp32 fp32. (Written out, not
    torch.promote_types, which dispatches as an aten op inside the operators.)"""
    distinct = set(dtypes)
    return distinct.pop() if len(distinct) == 1 else torch.float32


def planned_launch(kernel, programs: int, num_warps: int, num_stages: int, constexprs: dict) -> _common.Launch:
    """A launch of `programs` programs (a one-axis grid) with a plan's options."""
    return _common.Launch(kernel, (programs,), dict(constexprs, num_warps=num_warps, num_stages=num_stages))


@dataclass(frozen=True)
class SeamLaunches:
    """The launches of one fused linear op's call at one shape (n_rows > 0): the forward, the
    backward's weight-gradient and row kernels, and how the backward divides the rows among the
    weight-gradient programs (a Split; layernorm_mlp's grid of two)."""
    forward: _common.Launch
    weight: _common.Launch
    row: _common.Launch
    backward_grid: object


# ---------------------------------------------------------------------------------------------
# Device helpers (Triton)
# ---------------------------------------------------------------------------------------------
# Tiles are read through block pointers (tl.make_block_ptr): with per-element pointer
# arithmetic, a two-matmul chain at C = 384 spilled registers on an H100 in every tile shape
# tried. Triton 3.8 marks block pointers deprecated in favour of tensor descriptors, but those
# need 16-byte-aligned row strides (C = 33 in fp32 has none) and a device allocator.

# Exact GELU, as torch's default: x * Phi(x). 0.70710678... = 1/sqrt(2), 0.39894228... = 1/sqrt(2 pi).
@triton.jit
def gelu(pre):
    return 0.5 * pre * (1.0 + tl.math.erf(pre * 0.7071067811865476))


@triton.jit
def gelu_derivative(pre):
    cdf = 0.5 * (1.0 + tl.math.erf(pre * 0.7071067811865476))
    pdf = tl.exp(-0.5 * pre * pre) * 0.3989422804014327
    return cdf + pre * pdf


@triton.jit
def load_tile(ptr, row0, col0, n_rows, n_cols, stride_row, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """[BLOCK_R, BLOCK_C] tile of a row-major [n_rows, n_cols] matrix, zero outside it."""
    block = tl.make_block_ptr(ptr, (n_rows, n_cols), (stride_row, 1), (row0, col0), (BLOCK_R, BLOCK_C), (1, 0))
    return tl.load(block, boundary_check=(0, 1), padding_option="zero")


@triton.jit
def load_tile_transposed(ptr, row0, col0, n_rows, n_cols, stride_row, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """[BLOCK_C, BLOCK_R] tile of the transpose of a row-major [n_rows, n_cols] matrix:
    element (i, j) is matrix[row0 + j, col0 + i]; zero outside it."""
    block = tl.make_block_ptr(ptr, (n_cols, n_rows), (1, stride_row), (col0, row0), (BLOCK_C, BLOCK_R), (0, 1))
    return tl.load(block, boundary_check=(0, 1), padding_option="zero")


@triton.jit
def store_tile(ptr, value, row0, col0, n_rows, n_cols, stride_row, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    block = tl.make_block_ptr(ptr, (n_rows, n_cols), (stride_row, 1), (row0, col0), (BLOCK_R, BLOCK_C), (1, 0))
    tl.store(block, value.to(ptr.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def store_tile_transposed(ptr, value, row0, col0, n_rows, n_cols, stride_row,
                          BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Store a [BLOCK_C, BLOCK_R] tile into the transpose view of a row-major [n_rows, n_cols] matrix."""
    block = tl.make_block_ptr(ptr, (n_cols, n_rows), (1, stride_row), (col0, row0), (BLOCK_C, BLOCK_R), (0, 1))
    tl.store(block, value.to(ptr.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def split_program(program, n_columns, rows_per_split, n_rows, BLOCK_Q: tl.constexpr):
    """What weight-gradient program `program` owns: columns [col0, col0 + BLOCK_Q) of the
    gradient (tile program % tiles) and the rows [row_start, row_end) of its split (program //
    tiles)."""
    tiles = tl.cdiv(n_columns, BLOCK_Q)
    split = program // tiles
    row_start = split * rows_per_split
    return (program % tiles) * BLOCK_Q, split, row_start, tl.minimum(row_start + rows_per_split, n_rows)


@triton.jit
def load_vector(ptr, start, length, BLOCK: tl.constexpr):
    """BLOCK entries of a vector from `start` as fp32, 0 past `length`."""
    offsets = start + tl.arange(0, BLOCK)
    return tl.load(ptr + offsets, mask=offsets < length, other=0.0).to(tl.float32)


@triton.jit
def load_row_vector(ptr, row0, n_rows, BLOCK_M: tl.constexpr):
    """A per-row fp32 vector (saved mean or rstd); 0 for rows past the end, so that their
    x_hat is 0 rather than garbage."""
    rows = row0 + tl.arange(0, BLOCK_M)
    return tl.load(ptr + rows, mask=rows < n_rows, other=0.0)


@triton.jit
def sample_scale(scale_ptr, has_scale, row0, n_rows, rows_per_sample, BLOCK_M: tl.constexpr):
    """The branch scale of each row's sample (fp32), or 1 when there is none."""
    rows = row0 + tl.arange(0, BLOCK_M)
    scale = tl.full([BLOCK_M], 1.0, tl.float32)
    if has_scale != 0:
        scale = tl.load(scale_ptr + rows // rows_per_sample, mask=rows < n_rows, other=0.0).to(tl.float32)
    return scale


@triton.jit
def column_sum(tile):
    """Sum over the rows of an fp32 tile, in fp64.

    Bias and LayerNorm-parameter gradients are sums over every row of fp32 terms, so the
    summation error is all of their error: torch's reductions sum pairwise, while a row-by-row
    fp32 sum (what the Triton interpreter's numpy does across a tile) loses a few units in the
    last place. Summing in fp64 costs a few instructions per element in kernels dominated by
    matmuls, and leaves only the final rounding.
    """
    return tl.sum(tile.to(tl.float64), axis=0)


@triton.jit
def row_statistics(x_ptr, row0, n_rows, n_cols, stride_row, eps,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """Mean and 1/std of BLOCK_M rows in fp32: a mean pass, then a centred variance pass
    (E[x^2] - mean^2 cancels badly when the mean is large next to the spread, which a
    residual stream can be). x is read chunk by chunk, never held whole."""
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k in tl.static_range(NUM_CHUNKS):
        x = load_tile(x_ptr, row0, k * BLOCK_C, n_rows, n_cols, stride_row, BLOCK_M, BLOCK_C).to(tl.float32)
        total += tl.sum(x, axis=1)
    mean = total / n_cols
    squares = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k in tl.static_range(NUM_CHUNKS):
        x = load_tile(x_ptr, row0, k * BLOCK_C, n_rows, n_cols, stride_row, BLOCK_M, BLOCK_C).to(tl.float32)
        in_row = (k * BLOCK_C + tl.arange(0, BLOCK_C)) < n_cols
        centred = tl.where(in_row[None, :], x - mean[:, None], 0.0)
        squares += tl.sum(centred * centred, axis=1)
    return mean, 1.0 / tl.sqrt_rn(squares / n_cols + eps)


@triton.jit
def normalized(x_ptr, ln_weight_ptr, ln_bias_ptr, mean, rstd, row0, col0, n_rows, n_cols, stride_row,
               BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """layer_norm(x) for a [BLOCK_M, BLOCK_C] tile, fp32; 0 in columns past C (weight and bias
    read 0 there), so those add nothing to a matmul over C."""
    x = load_tile(x_ptr, row0, col0, n_rows, n_cols, stride_row, BLOCK_M, BLOCK_C).to(tl.float32)
    gamma = load_vector(ln_weight_ptr, col0, n_cols, BLOCK_C)
    beta = load_vector(ln_bias_ptr, col0, n_cols, BLOCK_C)
    return ((x - mean[:, None]) * rstd[:, None]) * gamma[None, :] + beta[None, :]


@triton.jit
def normalized_panel(x_ptr, x_hat_ptr, ln_weight_ptr, ln_bias_ptr, mean, rstd, row0, n_rows, n_cols, stride_row,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, NUM_CHUNKS: tl.constexpr, PANEL: tl.constexpr,
                     MATMUL_DTYPE: tl.constexpr):
    """Store x_hat = (x - mean) * rstd of BLOCK_M full rows in the matmul dtype ([rows, C],
    row stride C: the operand the weight gradient contracts with) and return layer_norm(x) in
    the matmul dtype as NUM_CHUNKS tiles; the empty tuple when the plan recomputes
    layer_norm(x) per contraction step instead (PANEL False)."""
    panel = ()
    for k in tl.static_range(NUM_CHUNKS):
        col0 = k * BLOCK_C
        x = load_tile(x_ptr, row0, col0, n_rows, n_cols, stride_row, BLOCK_M, BLOCK_C).to(tl.float32)
        in_row = (col0 + tl.arange(0, BLOCK_C)) < n_cols
        x_hat = tl.where(in_row[None, :], (x - mean[:, None]) * rstd[:, None], 0.0)
        store_tile(x_hat_ptr, x_hat.to(MATMUL_DTYPE), row0, col0, n_rows, n_cols, n_cols, BLOCK_M, BLOCK_C)
        if PANEL:
            gamma = load_vector(ln_weight_ptr, col0, n_cols, BLOCK_C)
            beta = load_vector(ln_bias_ptr, col0, n_cols, BLOCK_C)
            panel = panel + ((x_hat * gamma[None, :] + beta[None, :]).to(MATMUL_DTYPE),)
    return panel


@triton.jit
def layer_norm_rows(x_ptr, x_hat_ptr, ln_weight_ptr, ln_bias_ptr, mean_ptr, rstd_ptr, row0, n_rows, n_cols, stride_row,
                    eps, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, NUM_CHUNKS: tl.constexpr, PANEL: tl.constexpr,
                    MATMUL_DTYPE: tl.constexpr):
    """The LayerNorm ops' forward prologue for BLOCK_M rows: their statistics (stored for the
    backward, and returned) and normalized_panel's x_hat and panel."""
    mean, rstd = row_statistics(x_ptr, row0, n_rows, n_cols, stride_row, eps, BLOCK_M, BLOCK_C, NUM_CHUNKS)
    rows = row0 + tl.arange(0, BLOCK_M)
    tl.store(mean_ptr + rows, mean, mask=rows < n_rows)
    tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)
    panel = normalized_panel(x_ptr, x_hat_ptr, ln_weight_ptr, ln_bias_ptr, mean, rstd, row0, n_rows, n_cols,
                             stride_row, BLOCK_M, BLOCK_C, NUM_CHUNKS, PANEL, MATMUL_DTYPE)
    return mean, rstd, panel


@triton.jit
def normalized_times_weight(panel, x_ptr, ln_weight_ptr, ln_bias_ptr, mean, rstd, w_ptr, row0, out0,
                            n_rows, n_cols, n_out, stride_row,
                            BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, NUM_CHUNKS: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PANEL: tl.constexpr,
                            MATMUL_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """layer_norm(x) @ W^T for BLOCK_M rows and the BLOCK_N outputs from out0, fp32; W is
    [n_out, n_cols] (nn.Linear's layout). From the on-chip panel, or (PANEL False) with
    layer_norm(x) recomputed from x for each BLOCK_K-wide step of the contraction."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if PANEL:
        for k in tl.static_range(NUM_CHUNKS):
            w = load_tile_transposed(w_ptr, out0, k * BLOCK_C, n_out, n_cols, n_cols, BLOCK_C, BLOCK_N)
            acc = tl.dot(panel[k], w.to(MATMUL_DTYPE), acc, input_precision=INPUT_PRECISION)
    else:
        for col0 in range(0, n_cols, BLOCK_K):
            tile = normalized(x_ptr, ln_weight_ptr, ln_bias_ptr, mean, rstd, row0, col0, n_rows, n_cols, stride_row,
                              BLOCK_M, BLOCK_K)
            w = load_tile_transposed(w_ptr, out0, col0, n_out, n_cols, n_cols, BLOCK_K, BLOCK_N)
            acc = tl.dot(tile.to(MATMUL_DTYPE), w.to(MATMUL_DTYPE), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def accumulate_times_weight(acc, a, w_ptr, k0, n_k, n_out, W_IS_OUT_BY_IN: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, NUM_CHUNKS: tl.constexpr,
                            MATMUL_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc[j] += a @ B[k0:k0 + BLOCK_K, j * BLOCK_C:(j + 1) * BLOCK_C] for every chunk j of the
    output panel, where B = W^T for W of shape [n_out, n_k] (W_IS_OUT_BY_IN: a forward
    linear) or B = W for W of shape [n_k, n_out] (a linear's input gradient)."""
    updated = ()
    for j in tl.static_range(NUM_CHUNKS):
        if W_IS_OUT_BY_IN:
            w = load_tile_transposed(w_ptr, j * BLOCK_C, k0, n_out, n_k, n_k, BLOCK_K, BLOCK_C)
        else:
            w = load_tile(w_ptr, k0, j * BLOCK_C, n_k, n_out, n_out, BLOCK_K, BLOCK_C)
        updated = updated + (tl.dot(a, w.to(MATMUL_DTYPE), acc[j], input_precision=INPUT_PRECISION),)
    return updated


@triton.jit
def store_panel_partial(acc, partial_ptr, split, out0, n_cols, n_out,
                        BLOCK_C: tl.constexpr, NUM_CHUNKS: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Write a weight-gradient program's [C, BLOCK_Q] result (NUM_CHUNKS tiles of
    [BLOCK_C, BLOCK_Q]) into slot `split` of a [splits, C, n_out] fp32 partial buffer."""
    base = partial_ptr + split.to(tl.int64) * n_cols * n_out
    for k in tl.static_range(NUM_CHUNKS):
        store_tile(base, acc[k], k * BLOCK_C, out0, n_cols, n_out, n_out, BLOCK_C, BLOCK_Q)


@triton.jit
def store_vector_partial(values, partial_ptr, split, length, BLOCK_C: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """Write NUM_CHUNKS tiles of BLOCK_C sums (a C-long vector) into slot `split` of a
    [splits, length] partial buffer."""
    for k in tl.static_range(NUM_CHUNKS):
        offsets = k * BLOCK_C + tl.arange(0, BLOCK_C)
        tl.store(partial_ptr + split * length + offsets, values[k], mask=offsets < length)


@triton.jit
def layer_norm_backward(panel, dy_ptr, dx_ptr, x_ptr, ln_weight_ptr, mean, rstd, row0,
                        n_rows, n_cols, stride_x, stride_dy, stride_dx,
                        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, NUM_CHUNKS: tl.constexpr,
                        ADD_DY: tl.constexpr):
    """dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)), g = d_normalized * gamma, for
    BLOCK_M full rows whose d_normalized is the on-chip panel; plus dy (the residual's
    gradient) when ADD_DY."""
    g_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    g_x_hat_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k in tl.static_range(NUM_CHUNKS):
        col0 = k * BLOCK_C
        x = load_tile(x_ptr, row0, col0, n_rows, n_cols, stride_x, BLOCK_M, BLOCK_C).to(tl.float32)
        x_hat = (x - mean[:, None]) * rstd[:, None]
        g = panel[k] * load_vector(ln_weight_ptr, col0, n_cols, BLOCK_C)[None, :]
        g_sum += tl.sum(g, axis=1)
        g_x_hat_sum += tl.sum(g * x_hat, axis=1)  # g is 0 past C
    g_mean = g_sum / n_cols
    g_x_hat_mean = g_x_hat_sum / n_cols
    for k in tl.static_range(NUM_CHUNKS):
        col0 = k * BLOCK_C
        x = load_tile(x_ptr, row0, col0, n_rows, n_cols, stride_x, BLOCK_M, BLOCK_C).to(tl.float32)
        x_hat = (x - mean[:, None]) * rstd[:, None]
        g = panel[k] * load_vector(ln_weight_ptr, col0, n_cols, BLOCK_C)[None, :]
        dx = rstd[:, None] * (g - g_mean[:, None] - x_hat * g_x_hat_mean[:, None])
        if ADD_DY:
            dx += load_tile(dy_ptr, row0, col0, n_rows, n_cols, stride_dy, BLOCK_M, BLOCK_C).to(tl.float32)
        store_tile(dx_ptr, dx, row0, col0, n_rows, n_cols, stride_dx, BLOCK_M, BLOCK_C)


@triton.jit
def layer_norm_input_gradient(d_ptr, w_ptr, dy_ptr, dx_ptr, x_ptr, ln_weight_ptr, mean_ptr, rstd_ptr, row0,
                              n_rows, n_cols, n_out, stride_d, stride_x, stride_dy, stride_dx,
                              BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, NUM_CHUNKS: tl.constexpr,
                              BLOCK_K: tl.constexpr, ADD_DY: tl.constexpr, MATMUL_DTYPE: tl.constexpr,
                              INPUT_PRECISION: tl.constexpr):
    """dx of BLOCK_M rows of a LayerNorm'd linear, the LayerNorm ops' row kernels' first part:
    d_normalized = D @ W (D [rows, n_out] the linear's output gradient, W [n_out, C]) kept in
    registers as the panel, then layer_norm_backward (adding dy when ADD_DY)."""
    d_normed = (tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32),) * NUM_CHUNKS
    for out0 in range(0, n_out, BLOCK_K):
        d = load_tile(d_ptr, row0, out0, n_rows, n_out, stride_d, BLOCK_M, BLOCK_K).to(MATMUL_DTYPE)
        d_normed = accumulate_times_weight(d_normed, d, w_ptr, out0, n_out, n_cols, False, BLOCK_K, BLOCK_C,
                                           NUM_CHUNKS, MATMUL_DTYPE, INPUT_PRECISION)
    mean = load_row_vector(mean_ptr, row0, n_rows, BLOCK_M)
    rstd = load_row_vector(rstd_ptr, row0, n_rows, BLOCK_M)
    layer_norm_backward(d_normed, dy_ptr, dx_ptr, x_ptr, ln_weight_ptr, mean, rstd, row0, n_rows, n_cols,
                        stride_x, stride_dy, stride_dx, BLOCK_M, BLOCK_C, NUM_CHUNKS, ADD_DY)


@triton.jit
def sum_partial_rows(partial_ptr, out_ptr, slab, n_splits, n_rows, n_cols,
                     BLOCK_S: tl.constexpr, REDUCTION_BLOCK: tl.constexpr):
    """out[r, :] = sum over s of partial[s, r, :] for the BLOCK_S rows of slab `slab`, in split
    order; partial is [n_splits, n_rows, n_cols] fp32."""
    rows = slab * BLOCK_S + tl.arange(0, BLOCK_S)
    for col0 in range(0, n_cols, REDUCTION_BLOCK):
        cols = col0 + tl.arange(0, REDUCTION_BLOCK)
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        offsets = rows[:, None] * n_cols + cols[None, :]
        total = tl.zeros([BLOCK_S, REDUCTION_BLOCK], dtype=tl.float32)
        for s in range(n_splits):
            total += tl.load(partial_ptr + s * n_rows * n_cols + offsets, mask=mask, other=0.0)
        tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def sum_partial_vector(partial_ptr, out_ptr, slab, n_splits, length, BLOCK_S: tl.constexpr):
    """out[i] = sum over s of partial[s, i] (fp64 partials) for the BLOCK_S entries of slab `slab`."""
    offsets = slab * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = offsets < length
    total = tl.zeros([BLOCK_S], dtype=tl.float64)
    for s in range(n_splits):
        total += tl.load(partial_ptr + s * length + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def layer_norm_weight_gradients(g_partial_ptr, db_partial_ptr, w_ptr, ln_weight_ptr, ln_bias_ptr,
                                dw_ptr, db_ptr, d_ln_weight_ptr, d_ln_bias_ptr,
                                slab, n_splits, n_cols, n_out,
                                BLOCK_S: tl.constexpr, REDUCTION_BLOCK: tl.constexpr):
    """Finish the weight and LayerNorm-parameter gradients of a LayerNorm'd linear for the
    BLOCK_S columns of C in slab `slab` (see the module docstring):
        G^T[c, o] = sum_s g_partial[s, c, o]    db[o] = sum_s db_partial[s, o]
        dW[o, c] = G^T[c, o] * gamma[c] + db[o] * beta[c]
        dgamma[c] = sum_o W[o, c] G^T[c, o]     dbeta[c] = sum_o W[o, c] db[o]
    W is [n_out, n_cols]; slab 0 also writes db. Sums over splits in split order, the sums
    over outputs in fp64."""
    cols = slab * BLOCK_S + tl.arange(0, BLOCK_S)
    col_mask = cols < n_cols
    gamma = tl.load(ln_weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    beta = tl.load(ln_bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    d_gamma = tl.zeros([BLOCK_S], dtype=tl.float64)
    d_beta = tl.zeros([BLOCK_S], dtype=tl.float64)
    for out0 in range(0, n_out, REDUCTION_BLOCK):
        outs = out0 + tl.arange(0, REDUCTION_BLOCK)
        out_mask = outs < n_out
        mask = col_mask[:, None] & out_mask[None, :]
        g = tl.zeros([BLOCK_S, REDUCTION_BLOCK], dtype=tl.float32)
        db = tl.zeros([REDUCTION_BLOCK], dtype=tl.float64)
        for s in range(n_splits):
            g += tl.load(g_partial_ptr + s * n_cols * n_out + cols[:, None] * n_out + outs[None, :], mask=mask,
                         other=0.0)
            db += tl.load(db_partial_ptr + s * n_out + outs, mask=out_mask, other=0.0)
        w = tl.load(w_ptr + outs[None, :] * n_cols + cols[:, None], mask=mask, other=0.0).to(tl.float32)
        dw = g * gamma[:, None] + db.to(tl.float32)[None, :] * beta[:, None]
        tl.store(dw_ptr + outs[None, :] * n_cols + cols[:, None], dw.to(dw_ptr.dtype.element_ty), mask=mask)
        d_gamma += tl.sum(w.to(tl.float64) * g.to(tl.float64), axis=1)
        d_beta += tl.sum(w.to(tl.float64) * db[None, :], axis=1)
        if slab == 0:
            tl.store(db_ptr + outs, db.to(db_ptr.dtype.element_ty), mask=out_mask)
    tl.store(d_ln_weight_ptr + cols, d_gamma.to(d_ln_weight_ptr.dtype.element_ty), mask=col_mask)
    tl.store(d_ln_bias_ptr + cols, d_beta.to(d_ln_bias_ptr.dtype.element_ty), mask=col_mask)
