"""Fused LayerNorm + MLP sub-block: x + fc2(gelu(fc1(layer_norm(x)))), forward and backward.

Same signature and math as vit.backends.torch_layernorm_mlp: exact (erf) GELU, weights in
nn.Linear's [out, in] layout (w1 [H, C], w2 [C, H]), x of shape [..., C] seen as [rows, C].

Forward, one kernel. A program owns a BLOCK_M x BLOCK_N tile of the output (rows x output
columns). It first computes its rows' LayerNorm statistics (a mean pass, then a centred
variance pass over the row), then walks the hidden dimension in BLOCK_H chunks: the chunk of
fc1's output is accumulated over C in BLOCK_K pieces, each piece normalized on the fly from x
just before it feeds the matmul, then GELU'd and fed straight into fc2's accumulator. Neither
the normalized input nor the hidden activation is ever written to memory; the price is that
each output-column tile recomputes fc1 for its rows (C / BLOCK_N times in all), which keeps
the fc2 accumulator at BLOCK_M x BLOCK_N fp32 -- small enough for registers at any C.
The per-row mean and rstd are saved for the backward.

Backward, four kernels, no atomics (every reduction is a per-program partial written to its
own slot of a buffer and summed by torch in a fixed order, so two runs are bit-identical):
  1. hidden-gradient kernel, grid (row tiles, hidden tiles): recomputes fc1's output chunk,
     computes dy @ w2 for the chunk in the same loop over C, applies the GELU derivative and
     writes the gradient of fc1's output, d_pre [rows, H], plus per-row-tile sums for db1.
     d_pre is the one [rows, H] tensor the backward materializes. dx needs it contracted
     over H (d_pre @ w1) and dW1 over rows (d_pre^T @ layer_norm(x)); either contraction
     spans chunks that other programs own, so recomputing d_pre inside them would repeat
     fc1 and dy @ w2 -- two full matmuls -- for every output tile. Writing it once (in the
     matmul dtype: 6.4 MB at the model's shapes under bf16 autocast) costs far less.
  2. input-gradient kernel, grid (row tiles): d_normed = d_pre @ w1 chunk by chunk over C,
     fused with the LayerNorm backward. The LayerNorm backward needs two row sums over all of
     C before any dx can be written, so the kernel makes two passes over C, recomputing
     d_normed in the second rather than keeping a [BLOCK_M, C] tile. It writes dx (residual
     gradient included) and per-row-tile partials of d_ln_weight, d_ln_bias and db2.
  3. dW1 kernel, grid (hidden tiles, column tiles, row splits): d_pre^T @ layer_norm(x), the
     normalized input recomputed elementwise from x and the saved statistics.
  4. dW2 kernel, grid (column tiles, hidden tiles, row splits): dy^T @ gelu(fc1(...)), the
     hidden activation recomputed with the fc1 matmul. Row splits give the GPU enough
     programs; each writes its own [S, ...] slot, summed afterwards.

Precision: matmul accumulation and the LayerNorm/GELU math are fp32; the column sums behind
the bias and LayerNorm-parameter gradients are fp64 (see _column_sum). The matmul operands are
in x's dtype, or in the autocast dtype when autocast is enabled on x's device (as torch does
for F.linear; the weights are cast once per call). LayerNorm parameters and biases are read
at their own precision and converted to fp32. The output and dx have x's dtype, every
parameter gradient its parameter's dtype.

The [rows, C] / [rows, H] / weight tiles are read through block pointers (tl.make_block_ptr):
with per-element pointer arithmetic, a two-matmul chain at C=384 spilled registers on an H100
in every tile shape tried. Triton 3.8 marks block pointers deprecated in favour of tensor
descriptors, but those need 16-byte-aligned row strides (C=33 in fp32 has none) and a device
allocator; block pointers take any row stride. Tilings are in _KernelConfig below.
"""
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import _common

# The choice above is deliberate: silence Triton's deprecation notice for it, once per
# trace, rather than print it into every training and bench log.
warnings.filterwarnings("ignore", message="tl.make_block_ptr is deprecated", category=UserWarning)


# ---------------------------------------------------------------------------------------------
# Shared device helpers
# ---------------------------------------------------------------------------------------------

# Exact GELU, as torch's default: x * Phi(x). 0.70710678... = 1/sqrt(2), 0.39894228... = 1/sqrt(2 pi).
@triton.jit
def _gelu(pre):
    return 0.5 * pre * (1.0 + tl.math.erf(pre * 0.7071067811865476))


@triton.jit
def _gelu_derivative(pre):
    cdf = 0.5 * (1.0 + tl.math.erf(pre * 0.7071067811865476))
    pdf = tl.exp(-0.5 * pre * pre) * 0.3989422804014327
    return cdf + pre * pdf


@triton.jit
def _row_statistics(x_ptr, row0, n_rows, n_cols, stride_x_row, eps,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Mean and 1/std of BLOCK_M rows, in fp32, reading the row in BLOCK_K pieces."""
    x_block = tl.make_block_ptr(x_ptr, (n_rows, n_cols), (stride_x_row, 1), (row0, 0),
                                (BLOCK_M, BLOCK_K), (1, 0))
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for _ in range(0, n_cols, BLOCK_K):
        row_sum += tl.sum(tl.load(x_block, boundary_check=(0, 1), padding_option="zero").to(tl.float32), axis=1)
        x_block = tl.advance(x_block, (0, BLOCK_K))
    mean = row_sum / n_cols
    # A second, centred pass for the variance: E[x^2] - mean^2 cancels badly when the mean is
    # large next to the spread, which a residual stream can be.
    x_block = tl.make_block_ptr(x_ptr, (n_rows, n_cols), (stride_x_row, 1), (row0, 0),
                                (BLOCK_M, BLOCK_K), (1, 0))
    squares = tl.zeros([BLOCK_M], dtype=tl.float32)
    for col0 in range(0, n_cols, BLOCK_K):
        x = tl.load(x_block, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
        in_row = (col0 + tl.arange(0, BLOCK_K)) < n_cols
        centred = tl.where(in_row[None, :], x - mean[:, None], 0.0)
        squares += tl.sum(centred * centred, axis=1)
        x_block = tl.advance(x_block, (0, BLOCK_K))
    rstd = 1.0 / tl.sqrt_rn(squares / n_cols + eps)
    return mean, rstd


@triton.jit
def _column_sum(tile):
    """Sum over the rows of an fp32 tile, in fp64.

    The bias and LayerNorm-parameter gradients are sums over every row of fp32 terms, and
    the terms of db2 are exact, so the summation error is all of their error: torch's
    reductions sum pairwise, while a row-by-row fp32 sum of a tile (the Triton interpreter's
    numpy does exactly that) loses up to a few units in the last place. Accumulating the
    tile's sum and the per-tile partials in fp64 costs a few instructions per element in
    kernels dominated by matmuls, and leaves only the final rounding.
    """
    return tl.sum(tile.to(tl.float64), axis=0)


@triton.jit
def _load_saved_statistics(mean_ptr, rstd_ptr, row0, n_rows, BLOCK_M: tl.constexpr):
    """Rows past the end read mean 0 and rstd 0, so their x_hat is 0 rather than garbage."""
    rows = row0 + tl.arange(0, BLOCK_M)
    in_range = rows < n_rows
    mean = tl.load(mean_ptr + rows, mask=in_range, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=in_range, other=0.0)
    return mean, rstd


@triton.jit
def _load_vector(ptr, start, length, BLOCK: tl.constexpr):
    """BLOCK entries of a length-`length` parameter vector from `start`, 0 past the end, as fp32."""
    offsets = start + tl.arange(0, BLOCK)
    return tl.load(ptr + offsets, mask=offsets < length, other=0.0).to(tl.float32)


@triton.jit
def _normalized_chunk(x_block, ln_weight_ptr, ln_bias_ptr, col0, n_cols, mean, rstd,
                      BLOCK_K: tl.constexpr):
    """layer_norm(x) for one [BLOCK_M, BLOCK_K] piece, fp32. Columns past C come out 0 (weight
    and bias read 0 there), so they add nothing to a matmul over C."""
    x = tl.load(x_block, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
    # (Loaded here rather than through _load_vector: under the interpreter every nested
    # @jit call costs milliseconds, and this runs in the innermost loop.)
    cols = col0 + tl.arange(0, BLOCK_K)
    gamma = tl.load(ln_weight_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    beta = tl.load(ln_bias_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    x_hat = (x - mean[:, None]) * rstd[:, None]
    return x_hat * gamma[None, :] + beta[None, :]


@triton.jit
def _hidden_pre_activation(x_ptr, ln_weight_ptr, ln_bias_ptr, w1_ptr, b1_ptr, mean, rstd,
                           row0, hidden0, n_rows, n_cols, n_hidden, stride_x_row,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
                           INPUT_PRECISION: tl.constexpr):
    """fc1(layer_norm(x)) for BLOCK_M rows and BLOCK_H hidden units, fp32, bias included."""
    x_block = tl.make_block_ptr(x_ptr, (n_rows, n_cols), (stride_x_row, 1), (row0, 0),
                                (BLOCK_M, BLOCK_K), (1, 0))
    # w1 is [H, C] row-major; read it as w1^T, [C, H] with column-major tiles.
    w1t_block = tl.make_block_ptr(w1_ptr, (n_cols, n_hidden), (1, n_cols), (0, hidden0),
                                  (BLOCK_K, BLOCK_H), (0, 1))
    pre = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    for col0 in range(0, n_cols, BLOCK_K):
        normed = _normalized_chunk(x_block, ln_weight_ptr, ln_bias_ptr, col0, n_cols, mean, rstd, BLOCK_K)
        w1t = tl.load(w1t_block, boundary_check=(0, 1), padding_option="zero")
        pre = tl.dot(normed.to(w1t.dtype), w1t, pre, input_precision=INPUT_PRECISION)
        x_block = tl.advance(x_block, (0, BLOCK_K))
        w1t_block = tl.advance(w1t_block, (BLOCK_K, 0))
    return pre + _load_vector(b1_ptr, hidden0, n_hidden, BLOCK_H)[None, :]


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _ln_mlp_forward_kernel(
    x_ptr, y_ptr, ln_weight_ptr, ln_bias_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, mean_ptr, rstd_ptr,
    n_rows, n_cols, n_hidden, stride_x_row, stride_y_row, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    row0 = tl.program_id(0) * BLOCK_M
    out_col0 = tl.program_id(1) * BLOCK_N
    mean, rstd = _row_statistics(x_ptr, row0, n_rows, n_cols, stride_x_row, eps, BLOCK_M, BLOCK_K)
    if tl.program_id(1) == 0:  # every column tile computes the same statistics; one saves them
        rows = row0 + tl.arange(0, BLOCK_M)
        tl.store(mean_ptr + rows, mean, mask=rows < n_rows)
        tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)

    # w2 is [C, H] row-major; read it as w2^T, [H, C] with column-major tiles.
    w2t_block = tl.make_block_ptr(w2_ptr, (n_hidden, n_cols), (1, n_hidden), (0, out_col0),
                                  (BLOCK_H, BLOCK_N), (0, 1))
    out = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for hidden0 in range(0, n_hidden, BLOCK_H):
        pre = _hidden_pre_activation(x_ptr, ln_weight_ptr, ln_bias_ptr, w1_ptr, b1_ptr, mean, rstd,
                                     row0, hidden0, n_rows, n_cols, n_hidden, stride_x_row,
                                     BLOCK_M, BLOCK_K, BLOCK_H, INPUT_PRECISION)
        # Hidden units past H have pre = 0, so gelu = 0, and w2^T reads 0 there anyway.
        w2t = tl.load(w2t_block, boundary_check=(0, 1), padding_option="zero")
        out = tl.dot(_gelu(pre).to(w2t.dtype), w2t, out, input_precision=INPUT_PRECISION)
        w2t_block = tl.advance(w2t_block, (BLOCK_H, 0))

    residual_block = tl.make_block_ptr(x_ptr, (n_rows, n_cols), (stride_x_row, 1), (row0, out_col0),
                                       (BLOCK_M, BLOCK_N), (1, 0))
    residual = tl.load(residual_block, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
    y = residual + out + _load_vector(b2_ptr, out_col0, n_cols, BLOCK_N)[None, :]
    y_block = tl.make_block_ptr(y_ptr, (n_rows, n_cols), (stride_y_row, 1), (row0, out_col0),
                                (BLOCK_M, BLOCK_N), (1, 0))
    tl.store(y_block, y.to(y_ptr.dtype.element_ty), boundary_check=(0, 1))


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _ln_mlp_backward_hidden_kernel(
    x_ptr, dy_ptr, ln_weight_ptr, ln_bias_ptr, w1_ptr, b1_ptr, w2_ptr, mean_ptr, rstd_ptr,
    d_pre_ptr, db1_partial_ptr,
    n_rows, n_cols, n_hidden, stride_x_row, stride_dy_row,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """d_pre = (dy @ w2) * gelu'(fc1(layer_norm(x))) for a [BLOCK_M, BLOCK_H] tile."""
    row0 = tl.program_id(0) * BLOCK_M
    hidden0 = tl.program_id(1) * BLOCK_H
    mean, rstd = _load_saved_statistics(mean_ptr, rstd_ptr, row0, n_rows, BLOCK_M)

    # fc1's output and dy @ w2 both contract over C: one loop feeds both accumulators.
    x_block = tl.make_block_ptr(x_ptr, (n_rows, n_cols), (stride_x_row, 1), (row0, 0),
                                (BLOCK_M, BLOCK_K), (1, 0))
    w1t_block = tl.make_block_ptr(w1_ptr, (n_cols, n_hidden), (1, n_cols), (0, hidden0),
                                  (BLOCK_K, BLOCK_H), (0, 1))
    dy_block = tl.make_block_ptr(dy_ptr, (n_rows, n_cols), (stride_dy_row, 1), (row0, 0),
                                 (BLOCK_M, BLOCK_K), (1, 0))
    w2_block = tl.make_block_ptr(w2_ptr, (n_cols, n_hidden), (n_hidden, 1), (0, hidden0),
                                 (BLOCK_K, BLOCK_H), (1, 0))
    pre = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    d_hidden = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    for col0 in range(0, n_cols, BLOCK_K):
        normed = _normalized_chunk(x_block, ln_weight_ptr, ln_bias_ptr, col0, n_cols, mean, rstd, BLOCK_K)
        w1t = tl.load(w1t_block, boundary_check=(0, 1), padding_option="zero")
        pre = tl.dot(normed.to(w1t.dtype), w1t, pre, input_precision=INPUT_PRECISION)
        w2 = tl.load(w2_block, boundary_check=(0, 1), padding_option="zero")
        dy = tl.load(dy_block, boundary_check=(0, 1), padding_option="zero")
        d_hidden = tl.dot(dy.to(w2.dtype), w2, d_hidden, input_precision=INPUT_PRECISION)
        x_block = tl.advance(x_block, (0, BLOCK_K))
        w1t_block = tl.advance(w1t_block, (BLOCK_K, 0))
        dy_block = tl.advance(dy_block, (0, BLOCK_K))
        w2_block = tl.advance(w2_block, (BLOCK_K, 0))
    pre += _load_vector(b1_ptr, hidden0, n_hidden, BLOCK_H)[None, :]
    # Rows past the end read dy = 0, so their d_pre is 0 and adds nothing to the sums.
    d_pre = d_hidden * _gelu_derivative(pre)

    d_pre_block = tl.make_block_ptr(d_pre_ptr, (n_rows, n_hidden), (n_hidden, 1), (row0, hidden0),
                                    (BLOCK_M, BLOCK_H), (1, 0))
    tl.store(d_pre_block, d_pre.to(d_pre_ptr.dtype.element_ty), boundary_check=(0, 1))
    hidden = hidden0 + tl.arange(0, BLOCK_H)
    # Column sums over rows in fp64 (see _column_sum).
    tl.store(db1_partial_ptr + tl.program_id(0) * n_hidden + hidden, _column_sum(d_pre),
             mask=hidden < n_hidden)


@triton.jit
def _d_normed_chunk(d_pre_ptr, w1_ptr, row0, col0, n_rows, n_cols, n_hidden,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr):
    """Gradient of layer_norm's output, d_pre @ w1, for a [BLOCK_M, BLOCK_N] tile, fp32."""
    d_pre_block = tl.make_block_ptr(d_pre_ptr, (n_rows, n_hidden), (n_hidden, 1), (row0, 0),
                                    (BLOCK_M, BLOCK_H), (1, 0))
    w1_block = tl.make_block_ptr(w1_ptr, (n_hidden, n_cols), (n_cols, 1), (0, col0),
                                 (BLOCK_H, BLOCK_N), (1, 0))
    d_normed = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, n_hidden, BLOCK_H):
        d_pre = tl.load(d_pre_block, boundary_check=(0, 1), padding_option="zero")
        w1 = tl.load(w1_block, boundary_check=(0, 1), padding_option="zero")
        d_normed = tl.dot(d_pre, w1, d_normed, input_precision=INPUT_PRECISION)
        d_pre_block = tl.advance(d_pre_block, (0, BLOCK_H))
        w1_block = tl.advance(w1_block, (BLOCK_H, 0))
    return d_normed


@triton.jit
def _x_hat_chunk(x_ptr, row0, col0, n_rows, n_cols, stride_x_row, mean, rstd,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(x - mean) * rstd for a [BLOCK_M, BLOCK_N] tile, 0 in columns past C."""
    x_block = tl.make_block_ptr(x_ptr, (n_rows, n_cols), (stride_x_row, 1), (row0, col0),
                                (BLOCK_M, BLOCK_N), (1, 0))
    x = tl.load(x_block, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
    in_row = (col0 + tl.arange(0, BLOCK_N)) < n_cols
    return tl.where(in_row[None, :], (x - mean[:, None]) * rstd[:, None], 0.0)


@triton.jit
def _ln_mlp_backward_input_kernel(
    x_ptr, dy_ptr, dx_ptr, ln_weight_ptr, w1_ptr, mean_ptr, rstd_ptr, d_pre_ptr,
    d_ln_weight_partial_ptr, d_ln_bias_partial_ptr, db2_partial_ptr,
    n_rows, n_cols, n_hidden, stride_x_row, stride_dy_row, stride_dx_row,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """dx = dy + LayerNorm backward of (d_pre @ w1), for BLOCK_M full rows."""
    row0 = tl.program_id(0) * BLOCK_M
    mean, rstd = _load_saved_statistics(mean_ptr, rstd_ptr, row0, n_rows, BLOCK_M)

    # Pass 1: the two row means the LayerNorm backward needs, of g = d_normed * gamma and of
    # g * x_hat, over all of C.
    g_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    g_x_hat_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for col0 in range(0, n_cols, BLOCK_N):
        d_normed = _d_normed_chunk(d_pre_ptr, w1_ptr, row0, col0, n_rows, n_cols, n_hidden,
                                   BLOCK_M, BLOCK_N, BLOCK_H, INPUT_PRECISION)
        x_hat = _x_hat_chunk(x_ptr, row0, col0, n_rows, n_cols, stride_x_row, mean, rstd, BLOCK_M, BLOCK_N)
        g = d_normed * _load_vector(ln_weight_ptr, col0, n_cols, BLOCK_N)[None, :]
        g_sum += tl.sum(g, axis=1)
        g_x_hat_sum += tl.sum(g * x_hat, axis=1)
    g_mean = g_sum / n_cols
    g_x_hat_mean = g_x_hat_sum / n_cols

    # Pass 2: recompute d_normed (cheaper in registers than holding [BLOCK_M, C]) and write
    # dx plus this row tile's share of the LayerNorm-parameter and fc2-bias gradients.
    partial_offset = tl.program_id(0) * n_cols
    for col0 in range(0, n_cols, BLOCK_N):
        d_normed = _d_normed_chunk(d_pre_ptr, w1_ptr, row0, col0, n_rows, n_cols, n_hidden,
                                   BLOCK_M, BLOCK_N, BLOCK_H, INPUT_PRECISION)
        x_hat = _x_hat_chunk(x_ptr, row0, col0, n_rows, n_cols, stride_x_row, mean, rstd, BLOCK_M, BLOCK_N)
        gamma = _load_vector(ln_weight_ptr, col0, n_cols, BLOCK_N)
        dy_block = tl.make_block_ptr(dy_ptr, (n_rows, n_cols), (stride_dy_row, 1), (row0, col0),
                                     (BLOCK_M, BLOCK_N), (1, 0))
        dy = tl.load(dy_block, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
        d_ln_input = rstd[:, None] * (d_normed * gamma[None, :] - g_mean[:, None] - x_hat * g_x_hat_mean[:, None])
        dx_block = tl.make_block_ptr(dx_ptr, (n_rows, n_cols), (stride_dx_row, 1), (row0, col0),
                                     (BLOCK_M, BLOCK_N), (1, 0))
        tl.store(dx_block, (dy + d_ln_input).to(dx_ptr.dtype.element_ty), boundary_check=(0, 1))

        # Rows past the end have d_normed = 0 and dy = 0: they add nothing to these sums.
        cols = col0 + tl.arange(0, BLOCK_N)
        in_row = cols < n_cols
        tl.store(d_ln_weight_partial_ptr + partial_offset + cols, _column_sum(d_normed * x_hat), mask=in_row)
        tl.store(d_ln_bias_partial_ptr + partial_offset + cols, _column_sum(d_normed), mask=in_row)
        tl.store(db2_partial_ptr + partial_offset + cols, _column_sum(dy), mask=in_row)


@triton.jit
def _ln_mlp_backward_w1_kernel(
    x_ptr, ln_weight_ptr, ln_bias_ptr, mean_ptr, rstd_ptr, d_pre_ptr, dw1_partial_ptr,
    n_rows, n_cols, n_hidden, stride_x_row, rows_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One row split's share of dW1 = d_pre^T @ layer_norm(x) for a [BLOCK_H, BLOCK_N] tile."""
    hidden0 = tl.program_id(0) * BLOCK_H
    col0 = tl.program_id(1) * BLOCK_N
    split = tl.program_id(2)
    row_start = split * rows_per_split  # rows_per_split is a multiple of BLOCK_M
    row_end = tl.minimum(row_start + rows_per_split, n_rows)

    d_pre_t_block = tl.make_block_ptr(d_pre_ptr, (n_hidden, n_rows), (1, n_hidden), (hidden0, row_start),
                                      (BLOCK_H, BLOCK_M), (0, 1))
    x_block = tl.make_block_ptr(x_ptr, (n_rows, n_cols), (stride_x_row, 1), (row_start, col0),
                                (BLOCK_M, BLOCK_N), (1, 0))
    dw1 = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
    for row0 in range(row_start, row_end, BLOCK_M):
        mean, rstd = _load_saved_statistics(mean_ptr, rstd_ptr, row0, n_rows, BLOCK_M)
        normed = _normalized_chunk(x_block, ln_weight_ptr, ln_bias_ptr, col0, n_cols, mean, rstd, BLOCK_N)
        # Rows past the end read d_pre = 0, so their (nonzero) normed values add nothing.
        d_pre_t = tl.load(d_pre_t_block, boundary_check=(0, 1), padding_option="zero")
        dw1 = tl.dot(d_pre_t, normed.to(d_pre_t.dtype), dw1, input_precision=INPUT_PRECISION)
        d_pre_t_block = tl.advance(d_pre_t_block, (0, BLOCK_M))
        x_block = tl.advance(x_block, (BLOCK_M, 0))

    dw1_block = tl.make_block_ptr(dw1_partial_ptr + split * n_hidden * n_cols, (n_hidden, n_cols), (n_cols, 1),
                                  (hidden0, col0), (BLOCK_H, BLOCK_N), (1, 0))
    tl.store(dw1_block, dw1, boundary_check=(0, 1))


@triton.jit
def _ln_mlp_backward_w2_kernel(
    x_ptr, dy_ptr, ln_weight_ptr, ln_bias_ptr, w1_ptr, b1_ptr, mean_ptr, rstd_ptr, dw2_partial_ptr,
    n_rows, n_cols, n_hidden, stride_x_row, stride_dy_row, rows_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One row split's share of dW2 = dy^T @ gelu(fc1(layer_norm(x))) for a [BLOCK_N, BLOCK_H] tile."""
    col0 = tl.program_id(0) * BLOCK_N
    hidden0 = tl.program_id(1) * BLOCK_H
    split = tl.program_id(2)
    row_start = split * rows_per_split  # rows_per_split is a multiple of BLOCK_M
    row_end = tl.minimum(row_start + rows_per_split, n_rows)

    dy_t_block = tl.make_block_ptr(dy_ptr, (n_cols, n_rows), (1, stride_dy_row), (col0, row_start),
                                   (BLOCK_N, BLOCK_M), (0, 1))
    dw2 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    for row0 in range(row_start, row_end, BLOCK_M):
        mean, rstd = _load_saved_statistics(mean_ptr, rstd_ptr, row0, n_rows, BLOCK_M)
        pre = _hidden_pre_activation(x_ptr, ln_weight_ptr, ln_bias_ptr, w1_ptr, b1_ptr, mean, rstd,
                                     row0, hidden0, n_rows, n_cols, n_hidden, stride_x_row,
                                     BLOCK_M, BLOCK_K, BLOCK_H, INPUT_PRECISION)
        # Rows past the end read dy = 0, so their (nonzero) activations add nothing.
        dy_t = tl.load(dy_t_block, boundary_check=(0, 1), padding_option="zero")
        hidden = _gelu(pre).to(w1_ptr.dtype.element_ty)
        dw2 = tl.dot(dy_t.to(hidden.dtype), hidden, dw2, input_precision=INPUT_PRECISION)
        dy_t_block = tl.advance(dy_t_block, (0, BLOCK_M))

    dw2_block = tl.make_block_ptr(dw2_partial_ptr + split * n_cols * n_hidden, (n_cols, n_hidden), (n_hidden, 1),
                                  (col0, hidden0), (BLOCK_N, BLOCK_H), (1, 0))
    tl.store(dw2_block, dw2, boundary_check=(0, 1))


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _KernelConfig:
    """Tiling and launch options of one kernel. Fixed rather than autotuned: the interpreter
    cannot run triton.autotune, and these are exactly the configurations h100_compile_specs
    declares for the sm_90 compile check."""
    block_m: int  # rows per tile
    block_h: int  # hidden units per chunk
    block_n: int = 0  # output / input-feature columns per tile, for kernels that tile C
    block_k: int = 0  # C chunk of the fc1 contraction, for kernels that recompute fc1
    num_warps: int = 8
    num_stages: int = 2
    # fp32 matmuls ("ieee") run on the FMA units, not wgmma; software pipelining buys little
    # there and can wreck register allocation (see _BACKWARD_W1). None: same as num_stages.
    fp32_num_stages: int | None = None

    def stages_for(self, matmul_dtype: torch.dtype) -> int:
        if matmul_dtype == torch.float32 and self.fp32_num_stages is not None:
            return self.fp32_num_stages
        return self.num_stages

    def block_arguments(self, kernel) -> dict:
        """The BLOCK_* constexprs this kernel takes."""
        blocks = dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, BLOCK_H=self.block_h)
        return {name: value for name, value in blocks.items() if name in kernel.arg_names}

    def describe(self) -> str:
        blocks = [f"{name}={value}" for name, value in
                  (("BLOCK_M", self.block_m), ("BLOCK_N", self.block_n), ("BLOCK_K", self.block_k),
                   ("BLOCK_H", self.block_h)) if value]
        return " ".join(blocks + [f"warps={self.num_warps}"])


# Compiled for sm_90 at the model's shapes (bf16 matmuls, C = hidden = 384) with kernels.h100:
# all spill-free and on HGMMA (see h100_compile_specs). Every tl.dot keeps 64 on its M side,
# the smallest a warpgroup MMA takes. 8 warps: with 4 (and K chunks of 128) the [64, 128]
# fp32 tiles -- x, the accumulators, and the 64-bit addresses that block-pointer loads turn
# into -- took every kernel but dW1 to 225-255 registers, and the forward, the input-gradient
# kernel and, in one dtype variant each, the hidden-gradient and dW2 kernels spilled. With 8
# warps and K chunks of 64 they use 118-210.
_FORWARD = _KernelConfig(block_m=64, block_n=128, block_k=64, block_h=64)
_BACKWARD_HIDDEN = _KernelConfig(block_m=64, block_k=64, block_h=64)
# Pass 2 holds d_normed, x_hat, dy and dx tiles at once: 64 columns instead of 128.
_BACKWARD_INPUT = _KernelConfig(block_m=64, block_n=64, block_h=64)
# With fp32 operands (no autocast; not what the model runs) and 2 stages, ptxas squeezed this
# kernel into 32 registers and spilled 15 KB; with 1 stage it takes 100 and spills nothing.
_BACKWARD_W1 = _KernelConfig(block_m=64, block_n=128, block_h=64, fp32_num_stages=1)
_BACKWARD_W2 = _KernelConfig(block_m=64, block_n=128, block_k=64, block_h=64)

# Enough programs for the row-split weight-gradient kernels to fill an H100 (132 SMs) twice.
# A fixed number, not the device's SM count, so that the partial-sum layout, and with it the
# summation order, is the same on every machine.
_WEIGHT_GRADIENT_TARGET_PROGRAMS = 264


def _row_split(n_rows: int, tiles: int, block_m: int) -> tuple[int, int]:
    """(number of row splits, rows per split) for a weight-gradient grid of `tiles` output
    tiles. Rows per split is a multiple of block_m, so no row tile straddles two splits."""
    row_tiles = max(1, triton.cdiv(n_rows, block_m))  # one (empty) split when there are no rows
    splits = max(1, min(row_tiles, _WEIGHT_GRADIENT_TARGET_PROGRAMS // tiles))
    row_tiles_per_split = triton.cdiv(row_tiles, splits)
    return triton.cdiv(row_tiles, row_tiles_per_split), row_tiles_per_split * block_m


def _launch(kernel, config: _KernelConfig, grid, matmul_dtype: torch.dtype, *args):
    kernel[grid](*args, **config.block_arguments(kernel), INPUT_PRECISION=_input_precision(matmul_dtype),
                 num_warps=config.num_warps, num_stages=config.stages_for(matmul_dtype))


def _input_precision(matmul_dtype: torch.dtype) -> str:
    # fp32 matmuls in true fp32 ("ieee"), not TF32, so that they match torch's fp32 linears.
    # (The choice is ignored for fp16/bf16 operands.)
    return "ieee" if matmul_dtype == torch.float32 else "tf32"


def _rows_with_unit_column_stride(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """t as [rows, n_cols]: a view when its columns are contiguous (the kernels take any row
    stride), a contiguous copy otherwise."""
    t2d = t.reshape(-1, n_cols)
    if n_cols > 1 and t2d.stride(1) != 1:
        t2d = t2d.contiguous()
    return t2d


def _kernels_interpreted() -> bool:
    return _common.is_interpreted(_ln_mlp_forward_kernel)


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


# ---------------------------------------------------------------------------------------------
# autograd.Function and entry point
# ---------------------------------------------------------------------------------------------

class LayerNormMLPFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, w1, b1, w2, b2, eps):
        n_cols, n_hidden = x.shape[-1], w1.shape[0]
        x2d = _rows_with_unit_column_stride(x, n_cols)
        n_rows = x2d.shape[0]
        matmul_dtype = _matmul_dtype(x)
        # The weights are small next to the activations: cast (and lay out) them once per call.
        w1_mm = w1.to(matmul_dtype).contiguous()
        w2_mm = w2.to(matmul_dtype).contiguous()
        ln_weight, ln_bias, b1, b2 = (t.contiguous() for t in (ln_weight, ln_bias, b1, b2))

        y = _common.new_output((n_rows, n_cols), x.dtype, x.device)
        mean = _common.new_output((n_rows,), torch.float32, x.device)
        rstd = _common.new_output((n_rows,), torch.float32, x.device)
        if n_rows > 0:
            cfg = _FORWARD
            grid = (triton.cdiv(n_rows, cfg.block_m), triton.cdiv(n_cols, cfg.block_n))
            _launch(_ln_mlp_forward_kernel, cfg, grid, matmul_dtype,
                    x2d, y, ln_weight, ln_bias, w1_mm, b1, w2_mm, b2, mean, rstd,
                    n_rows, n_cols, n_hidden, x2d.stride(0), y.stride(0), eps)
        ctx.save_for_backward(x2d, ln_weight, ln_bias, w1_mm, b1, w2_mm, mean, rstd)
        ctx.x_shape = x.shape
        ctx.param_dtypes = tuple(t.dtype for t in (ln_weight, ln_bias, w1, b1, w2, b2))
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, ln_weight, ln_bias, w1_mm, b1, w2_mm, mean, rstd = ctx.saved_tensors
        n_rows, n_cols = x2d.shape
        n_hidden = w1_mm.shape[0]
        device = x2d.device
        matmul_dtype = w1_mm.dtype
        dy2d = _rows_with_unit_column_stride(dy, n_cols)

        hidden_cfg, input_cfg, w1_cfg, w2_cfg = _BACKWARD_HIDDEN, _BACKWARD_INPUT, _BACKWARD_W1, _BACKWARD_W2
        hidden_grid = (triton.cdiv(n_rows, hidden_cfg.block_m), triton.cdiv(n_hidden, hidden_cfg.block_h))
        input_grid = (triton.cdiv(n_rows, input_cfg.block_m),)
        w1_tiles = (triton.cdiv(n_hidden, w1_cfg.block_h), triton.cdiv(n_cols, w1_cfg.block_n))
        w1_splits, w1_rows_per_split = _row_split(n_rows, w1_tiles[0] * w1_tiles[1], w1_cfg.block_m)
        w2_tiles = (triton.cdiv(n_cols, w2_cfg.block_n), triton.cdiv(n_hidden, w2_cfg.block_h))
        w2_splits, w2_rows_per_split = _row_split(n_rows, w2_tiles[0] * w2_tiles[1], w2_cfg.block_m)

        d_pre = _common.new_output((n_rows, n_hidden), matmul_dtype, device)
        # The bias and LayerNorm-parameter partials are fp64: see _column_sum.
        db1_partial = _common.new_output((hidden_grid[0], n_hidden), torch.float64, device)
        dx = _common.new_output((n_rows, n_cols), x2d.dtype, device)
        d_ln_weight_partial = _common.new_output((input_grid[0], n_cols), torch.float64, device)
        d_ln_bias_partial = _common.new_output((input_grid[0], n_cols), torch.float64, device)
        db2_partial = _common.new_output((input_grid[0], n_cols), torch.float64, device)
        dw1_partial = _common.new_output((w1_splits, n_hidden, n_cols), torch.float32, device)
        dw2_partial = _common.new_output((w2_splits, n_cols, n_hidden), torch.float32, device)

        if n_rows > 0:
            _launch(_ln_mlp_backward_hidden_kernel, hidden_cfg, hidden_grid, matmul_dtype,
                    x2d, dy2d, ln_weight, ln_bias, w1_mm, b1, w2_mm, mean, rstd, d_pre, db1_partial,
                    n_rows, n_cols, n_hidden, x2d.stride(0), dy2d.stride(0))
            _launch(_ln_mlp_backward_input_kernel, input_cfg, input_grid, matmul_dtype,
                    x2d, dy2d, dx, ln_weight, w1_mm, mean, rstd, d_pre,
                    d_ln_weight_partial, d_ln_bias_partial, db2_partial,
                    n_rows, n_cols, n_hidden, x2d.stride(0), dy2d.stride(0), dx.stride(0))
            _launch(_ln_mlp_backward_w1_kernel, w1_cfg, (*w1_tiles, w1_splits), matmul_dtype,
                    x2d, ln_weight, ln_bias, mean, rstd, d_pre, dw1_partial,
                    n_rows, n_cols, n_hidden, x2d.stride(0), w1_rows_per_split)
            _launch(_ln_mlp_backward_w2_kernel, w2_cfg, (*w2_tiles, w2_splits), matmul_dtype,
                    x2d, dy2d, ln_weight, ln_bias, w1_mm, b1, mean, rstd, dw2_partial,
                    n_rows, n_cols, n_hidden, x2d.stride(0), dy2d.stride(0), w2_rows_per_split)
        else:  # no rows: every parameter gradient is an empty sum
            for partial in (db1_partial, d_ln_weight_partial, d_ln_bias_partial, db2_partial, dw1_partial, dw2_partial):
                partial.zero_()

        # The partials are summed by torch over their leading dimension, in a fixed order.
        ln_weight_dtype, ln_bias_dtype, w1_dtype, b1_dtype, w2_dtype, b2_dtype = ctx.param_dtypes
        return (
            dx.view(ctx.x_shape),
            d_ln_weight_partial.sum(0).to(ln_weight_dtype),
            d_ln_bias_partial.sum(0).to(ln_bias_dtype),
            dw1_partial.sum(0).to(w1_dtype),
            db1_partial.sum(0).to(b1_dtype),
            dw2_partial.sum(0).to(w2_dtype),
            db2_partial.sum(0).to(b2_dtype),
            None,
        )


def _validate(x, ln_weight, ln_bias, w1, b1, w2, b2):
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
    interpreted = _kernels_interpreted()
    _common.check_device("x", x, interpreted, __name__)
    _common.refuse_interpreted_bf16("x (or autocast)", interpreted, _matmul_dtype(x))


def layernorm_mlp(x, ln_weight, ln_bias, w1, b1, w2, b2, eps: float = 1e-5) -> torch.Tensor:
    """x + fc2(gelu(fc1(layer_norm(x)))), fused; see the module docstring for the kernels.

    x: [..., C]; ln_weight, ln_bias: [C]; w1: [H, C]; b1: [H]; w2: [C, H]; b2: [C].
    Returns a tensor of x's shape and dtype, differentiable in x and all six parameters.
    Raises ValueError for inconsistent shapes, unsupported dtypes or devices.
    """
    _validate(x, ln_weight, ln_bias, w1, b1, w2, b2)
    return LayerNormMLPFunction.apply(x, ln_weight, ln_bias, w1, b1, w2, b2, float(eps))


# ---------------------------------------------------------------------------------------------
# H100 compile check
# ---------------------------------------------------------------------------------------------

# Each kernel with its launch configuration and the M side of its tl.dot calls (which decides
# the tensor-core instruction; see kernels.h100.matmul_instructions).
_KERNELS = (
    ("ln_mlp_forward", _ln_mlp_forward_kernel, _FORWARD, ("block_m",)),
    ("ln_mlp_backward_hidden", _ln_mlp_backward_hidden_kernel, _BACKWARD_HIDDEN, ("block_m",)),
    ("ln_mlp_backward_input", _ln_mlp_backward_input_kernel, _BACKWARD_INPUT, ("block_m",)),
    ("ln_mlp_backward_w1", _ln_mlp_backward_w1_kernel, _BACKWARD_W1, ("block_h",)),
    ("ln_mlp_backward_w2", _ln_mlp_backward_w2_kernel, _BACKWARD_W2, ("block_m", "block_n")),
)

# (dtype of x / y / dy / dx, dtype of the matmul operands): fp32 training, autocast to bf16 or
# fp16 (x and the parameters stay fp32), and x itself in bf16 or fp16 (parameters too).
_DTYPE_VARIANTS = ((torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                   (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16))
# Integer arguments other than the row count: C and the hidden size, their row strides, and the
# rows per split (a multiple of BLOCK_M) -- multiples of 16 for every model the backend runs
# (C = heads * head_dim with head_dim in 16..64; the MLP sizes used are multiples of 16).
_DIMENSION_ARGUMENTS = ("n_cols", "n_hidden", "stride_x_row", "stride_y_row", "stride_dy_row", "stride_dx_row",
                        "rows_per_split")
# Row counts as the launcher specializes them: 1, a multiple of 16 (a batch of 128 images of 65
# tokens: 8320), or neither (evaluation batches of 1000 images: 65000 rows, a partial last tile).
_ROW_COUNTS = (1, 8320, 65000)


def h100_compile_specs():
    """Every kernel in the configuration the wrapper launches it with, in every dtype variant
    and row-count specialization above, for kernels.h100 to compile for sm_90a."""
    from kernels.h100 import KernelSpec, launcher_specialization, matmul_instructions

    specs = []
    for activation, matmul in _DTYPE_VARIANTS:
        parameter = activation  # fp32 under autocast, else x's dtype
        names = {dtype: _common.DTYPE_NAMES[dtype] for dtype in (activation, matmul)}
        variant = f"x={names[activation]} mm={names[matmul]}"
        pointer_types = dict(
            x_ptr=names[activation], y_ptr=names[activation], dy_ptr=names[activation], dx_ptr=names[activation],
            ln_weight_ptr=_common.DTYPE_NAMES[parameter], ln_bias_ptr=_common.DTYPE_NAMES[parameter],
            b1_ptr=_common.DTYPE_NAMES[parameter], b2_ptr=_common.DTYPE_NAMES[parameter],
            w1_ptr=names[matmul], w2_ptr=names[matmul], d_pre_ptr=names[matmul],
            mean_ptr="fp32", rstd_ptr="fp32", db1_partial_ptr="fp64", d_ln_weight_partial_ptr="fp64",
            d_ln_bias_partial_ptr="fp64", db2_partial_ptr="fp64", dw1_partial_ptr="fp32", dw2_partial_ptr="fp32",
        )
        for n_rows in _ROW_COUNTS:
            rows = launcher_specialization(n_rows)
            for name, kernel, cfg, dot_sides in _KERNELS:
                constexprs = {**cfg.block_arguments(kernel), "INPUT_PRECISION": _input_precision(matmul)}
                if rows == "1" and "n_rows" in kernel.arg_names:
                    constexprs["n_rows"] = 1
                signature = {}
                for argument in kernel.arg_names:
                    if argument in constexprs:
                        continue
                    if argument.endswith("_ptr"):
                        signature[argument] = "*" + pointer_types[argument]
                    else:
                        signature[argument] = "fp32" if argument == "eps" else "i32"
                divisible = [a for a in signature if a.endswith("_ptr") or a in _DIMENSION_ARGUMENTS]
                if rows == "16k" and "n_rows" in signature:
                    divisible.append("n_rows")
                num_stages = cfg.stages_for(matmul)
                specs.append(KernelSpec(
                    name=name, config=f"{variant} rows:{rows} {cfg.describe()} stages={num_stages}", fn=kernel,
                    signature=signature, constexprs=constexprs, num_warps=cfg.num_warps, num_stages=num_stages,
                    instructions=matmul_instructions(names[matmul], _input_precision(matmul),
                                                     [getattr(cfg, side) for side in dot_sides], cfg.num_warps),
                    divisible_by_16=tuple(divisible),
                ))
    return specs
