"""Fused multi-head self-attention core: softmax(q k^T * scale) v, forward and backward.

`attention(qkv, num_heads, scale=None)` computes the same function as
`vit.backends.torch_attention`, reading q, k and v straight out of the QKV projection's
[B, N, 3*C] output (timm's layout: q, k, v blocks of C = heads * head_dim columns,
heads contiguous inside a block) and writing straight into the [B, N, C] layout the
output projection reads. No permute or contiguous copies, and the N x N scores never
leave the chip: the forward keeps a running (online) softmax per query row and saves
only each row's log-sum-exp (fp32) for the backward, which recomputes the
probabilities from it.

Kernels (one program per tile, the second grid axis is batch * heads):

* `_attention_forward_kernel`: one program per (query block, batch, head); loops over
  key blocks with the online softmax; writes the output and the log-sum-exp.
* `_attention_backward_dkdv_kernel`: one program per (key block, batch, head); holds
  its keys and values, loops over every query block and accumulates dk and dv in
  registers. When a single key block covers the whole sequence (fp16/bf16 with
  N <= 128, the model's N = 65; fp32 with N <= 16) the program sees complete softmax
  rows, so it also finishes dq for each query block and writes it (FUSE_DQ): the whole
  backward is one launch.
* `_attention_backward_dq_kernel`: only for longer sequences. One program per
  (query block, batch, head) loops over the key blocks for dq; it also computes
  delta = rowsum(dout * out), which the dk/dv kernel, launched after it, reads.

Every gradient element is written by exactly one program with a fixed reduction order
and no atomics, so the backward is bit-for-bit deterministic; dq, dk and dv land in
one [B, N, 3*C] tensor laid out like qkv.

Block sizes are fixed per shape and dtype in Python (`_launch_plan`); there is no
@triton.autotune because the interpreter (CPU tests) cannot run one with several
configs. `h100_compile_specs()` lists every kernel in every configuration the
wrapper can pick, for kernels/h100.py to compile for sm_90 and check for spills and
tensor-core (HGMMA) use.
"""
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import _common

SUPPORTED_HEAD_DIMS = (16, 32, 48, 64)

# Softmax exponentials use exp2 (one instruction on the GPU), so scores and log-sum-exps
# are converted to base 2 with log2(e), and back with ln(2).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------
# Addressing: for batch b and head h, row n of q is at
#   qkv_ptr + b * stride_qkv_b + n * stride_qkv_n + h * HEAD_DIM + d,
# k is C = num_heads * HEAD_DIM columns further and v 2 * C further. The last dimension
# is unit-stride (the wrapper guarantees it), which lets rows load as contiguous vectors.
# HEAD_DIM need not be a power of two (48): tiles are BLOCK_D = next power of two wide
# and the extra columns are masked to zero, which adds nothing to any dot product.
# Rows past seq_len are masked the same way; keys past seq_len are excluded from the
# softmax explicitly, because a zero key still scores exp(0).


@triton.jit
def _program_batch_head(num_heads):
    """The (batch * heads) index of this program (grid axis 1), its batch and its head."""
    batch_head = tl.program_id(1)
    return batch_head, batch_head // num_heads, batch_head % num_heads


@triton.jit
def _head_base(ptr, batch, head, stride_b, HEAD_DIM: tl.constexpr):
    """Where `head` of `batch` starts in a [B, N, ...] tensor laid out like qkv or out."""
    return ptr + batch.to(tl.int64) * stride_b + head * HEAD_DIM


@triton.jit
def _row_masks(offs_rows, in_head, seq_len):
    """Which rows exist, and the [rows, BLOCK_D] mask of the elements that do."""
    rows_valid = offs_rows < seq_len
    return rows_valid, rows_valid[:, None] & in_head[None, :]


@triton.jit
def _load_rows(base, offs_rows, stride_n, offs_d, mask):
    """Rows of one head's [N, HEAD_DIM] slice; zero where the mask is off."""
    return tl.load(base + offs_rows[:, None] * stride_n + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _attention_forward_kernel(
    qkv_ptr, out_ptr, lse_ptr,
    seq_len, num_heads,
    stride_qkv_b, stride_qkv_n,
    stride_out_b, stride_out_n,
    softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    query_block = tl.program_id(0)
    batch_head, batch, head = _program_batch_head(num_heads)
    model_dim = num_heads * HEAD_DIM

    q_base = _head_base(qkv_ptr, batch, head, stride_qkv_b, HEAD_DIM)
    k_base = q_base + model_dim
    v_base = q_base + 2 * model_dim

    offs_m = query_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_head = offs_d < HEAD_DIM
    query_valid, row_mask = _row_masks(offs_m, in_head, seq_len)
    q = _load_rows(q_base, offs_m, stride_qkv_n, offs_d, row_mask)

    # Scores in base-2 units, so the softmax can use exp2.
    qk_scale = softmax_scale * LOG2E
    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for key_start in range(0, seq_len, BLOCK_N):
        offs_n = key_start + tl.arange(0, BLOCK_N)
        key_valid, kv_mask = _row_masks(offs_n, in_head, seq_len)
        k = _load_rows(k_base, offs_n, stride_qkv_n, offs_d, kv_mask)
        v = _load_rows(v_base, offs_n, stride_qkv_n, offs_d, kv_mask)

        # "ieee" only matters for fp32 inputs: exact fp32 products instead of tf32, so
        # fp32 matches the reference tightly. fp16/bf16 inputs use tensor cores anyway.
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        scores = tl.where(key_valid[None, :], scores, float("-inf"))

        # The first key block always holds a valid key, so new_max is finite from the
        # start and exp2(-inf - new_max) = 0 rescales the empty initial state away.
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        probs = tl.math.exp2(scores - new_max[:, None])
        correction = tl.math.exp2(running_max - new_max)
        running_sum = running_sum * correction + tl.sum(probs, axis=1)
        acc = acc * correction[:, None] + tl.dot(probs.to(v.dtype), v, input_precision="ieee")
        running_max = new_max

    out = acc / running_sum[:, None]
    out_base = _head_base(out_ptr, batch, head, stride_out_b, HEAD_DIM)
    tl.store(out_base + offs_m[:, None] * stride_out_n + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask)

    # Saved in natural-log units (log sum_j exp(scale * q.k_j)), the usual meaning.
    log_sum_exp = (running_max + tl.math.log2(running_sum)) * LN2
    tl.store(lse_ptr + batch_head.to(tl.int64) * seq_len + offs_m, log_sum_exp, mask=query_valid)


@triton.jit
def _attention_backward_dkdv_kernel(
    qkv_ptr, dout_ptr, dqkv_ptr, lse_ptr, delta_ptr,
    seq_len, num_heads,
    stride_qkv_b, stride_qkv_n,
    stride_dout_b, stride_dout_n,
    stride_dqkv_b, stride_dqkv_n,
    softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FUSE_DQ: tl.constexpr,
):
    """dk and dv for one key block; with FUSE_DQ (the block holds every key) also dq.

    Works on transposed tiles (keys along rows, queries along columns) so that dk and
    dv come out of tensor-core dots without transposing register tiles:
        P^T  = exp(scale * K Q^T - lse)       dV += P^T dO
        dP^T = V dO^T                         dS^T = P^T * (dP^T - delta)
        dK  += dS^T Q  (times scale)          dQ  = (dS^T)^T K  (times scale, FUSE_DQ)
    delta_i = sum_j P_ij dP_ij. With FUSE_DQ it is summed exactly from the tile; the
    split path reads the rowsum(dout * out) that the dq kernel stored.
    """
    key_block = tl.program_id(0)
    batch_head, batch, head = _program_batch_head(num_heads)
    model_dim = num_heads * HEAD_DIM

    q_base = _head_base(qkv_ptr, batch, head, stride_qkv_b, HEAD_DIM)
    k_base = q_base + model_dim
    v_base = q_base + 2 * model_dim
    dout_base = _head_base(dout_ptr, batch, head, stride_dout_b, HEAD_DIM)
    dq_base = _head_base(dqkv_ptr, batch, head, stride_dqkv_b, HEAD_DIM)
    dk_base = dq_base + model_dim
    dv_base = dq_base + 2 * model_dim
    row_stats_base = batch_head.to(tl.int64) * seq_len

    offs_n = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_head = offs_d < HEAD_DIM
    key_valid, kv_mask = _row_masks(offs_n, in_head, seq_len)
    k = _load_rows(k_base, offs_n, stride_qkv_n, offs_d, kv_mask)
    v = _load_rows(v_base, offs_n, stride_qkv_n, offs_d, kv_mask)

    qk_scale = softmax_scale * LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    for query_start in range(0, seq_len, BLOCK_M):
        offs_m = query_start + tl.arange(0, BLOCK_M)
        query_valid, row_mask = _row_masks(offs_m, in_head, seq_len)
        q = _load_rows(q_base, offs_m, stride_qkv_n, offs_d, row_mask)
        dout = _load_rows(dout_base, offs_m, stride_dout_n, offs_d, row_mask)
        # +inf for padded query rows makes their probabilities exactly 0.
        lse_log2 = tl.load(lse_ptr + row_stats_base + offs_m, mask=query_valid,
                           other=float("inf")) * LOG2E

        scores_t = tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale
        probs_t = tl.math.exp2(scores_t - lse_log2[None, :])
        probs_t = tl.where(key_valid[:, None], probs_t, 0.0)  # a zero key still scores exp(0)
        dv += tl.dot(probs_t.to(dout.dtype), dout, input_precision="ieee")

        dprobs_t = tl.dot(v, tl.trans(dout), input_precision="ieee")
        if FUSE_DQ:
            delta = tl.sum(probs_t * dprobs_t, axis=0)
        else:
            delta = tl.load(delta_ptr + row_stats_base + offs_m, mask=query_valid, other=0.0)
        dscores_t = probs_t * (dprobs_t - delta[None, :])
        dk += tl.dot(dscores_t.to(q.dtype), q, input_precision="ieee")

        if FUSE_DQ:
            dq = tl.dot(tl.trans(dscores_t.to(k.dtype)), k, input_precision="ieee") * softmax_scale
            tl.store(dq_base + offs_m[:, None] * stride_dqkv_n + offs_d[None, :],
                     dq.to(dqkv_ptr.dtype.element_ty), mask=row_mask)

    dk *= softmax_scale
    grad_offsets = offs_n[:, None] * stride_dqkv_n + offs_d[None, :]
    tl.store(dk_base + grad_offsets, dk.to(dqkv_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_base + grad_offsets, dv.to(dqkv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attention_backward_dq_kernel(
    qkv_ptr, out_ptr, dout_ptr, dqkv_ptr, lse_ptr, delta_ptr,
    seq_len, num_heads,
    stride_qkv_b, stride_qkv_n,
    stride_out_b, stride_out_n,
    stride_dout_b, stride_dout_n,
    stride_dqkv_b, stride_dqkv_n,
    softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dq for one query block (sequences longer than one key block), plus delta.

        delta = rowsum(dO * O)    (= sum_j P_ij dP_ij), stored for the dk/dv kernel
        dQ = scale * sum over key blocks of (P * (dO V^T - delta)) K
    """
    query_block = tl.program_id(0)
    batch_head, batch, head = _program_batch_head(num_heads)
    model_dim = num_heads * HEAD_DIM

    q_base = _head_base(qkv_ptr, batch, head, stride_qkv_b, HEAD_DIM)
    k_base = q_base + model_dim
    v_base = q_base + 2 * model_dim
    out_base = _head_base(out_ptr, batch, head, stride_out_b, HEAD_DIM)
    dout_base = _head_base(dout_ptr, batch, head, stride_dout_b, HEAD_DIM)
    dq_base = _head_base(dqkv_ptr, batch, head, stride_dqkv_b, HEAD_DIM)
    row_stats_base = batch_head.to(tl.int64) * seq_len

    offs_m = query_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_head = offs_d < HEAD_DIM
    query_valid, row_mask = _row_masks(offs_m, in_head, seq_len)
    q = _load_rows(q_base, offs_m, stride_qkv_n, offs_d, row_mask)
    dout = _load_rows(dout_base, offs_m, stride_dout_n, offs_d, row_mask)
    out = _load_rows(out_base, offs_m, stride_out_n, offs_d, row_mask)
    delta = tl.sum(out.to(tl.float32) * dout.to(tl.float32), axis=1)
    tl.store(delta_ptr + row_stats_base + offs_m, delta, mask=query_valid)
    lse_log2 = tl.load(lse_ptr + row_stats_base + offs_m, mask=query_valid,
                       other=float("inf")) * LOG2E

    qk_scale = softmax_scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for key_start in range(0, seq_len, BLOCK_N):
        offs_n = key_start + tl.arange(0, BLOCK_N)
        key_valid, kv_mask = _row_masks(offs_n, in_head, seq_len)
        k = _load_rows(k_base, offs_n, stride_qkv_n, offs_d, kv_mask)
        v = _load_rows(v_base, offs_n, stride_qkv_n, offs_d, kv_mask)

        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        probs = tl.math.exp2(scores - lse_log2[:, None])
        probs = tl.where(key_valid[None, :], probs, 0.0)
        dprobs = tl.dot(dout, tl.trans(v), input_precision="ieee")
        dscores = probs * (dprobs - delta[:, None])
        dq += tl.dot(dscores.to(k.dtype), k, input_precision="ieee")

    dq *= softmax_scale
    tl.store(dq_base + offs_m[:, None] * stride_dqkv_n + offs_d[None, :],
             dq.to(dqkv_ptr.dtype.element_ty), mask=row_mask)


# --------------------------------------------------------------------------------------
# Launch configurations, chosen in Python from the shape
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _LaunchConfig:
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class _LaunchPlan:
    forward: _LaunchConfig
    dkdv: _LaunchConfig
    dq: _LaunchConfig | None  # None: dq is fused into the dk/dv kernel (all keys in one block)


# The choices below come from compiling every configuration for sm_90a with
# kernels/h100.py (N = 1 to 257, every head dim, fp16/bf16/fp32, with and without the
# launcher's 16-byte alignment hints) and reading ptxas's register counts: none spills.
# fp16/bf16 tiles of 64+ rows use wgmma (HGMMA); smaller ones use mma.sync (wgmma
# needs 64 rows), and fp32 uses FMA.

# fp32 inputs take exact fp32 dots, which run on FMA units with both operands in
# registers, so tiles must be far smaller than on tensor cores: 32 x 32 at 4 warps
# holds, 32-key fused tiles (the fused backward's P, dP and dS next to dk, dv) spill,
# so only sequences of up to 16 tokens take the fused backward.
_FP32_FUSED_TILE = 16
_FP32_SPLIT = _LaunchConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)

# fp16/bf16 sequences up to 128 tokens (the model's N = 65) are one key block, and the
# backward is a single kernel. Longer ones use 64 x 64 tiles (128 query rows in the
# forward) streamed double-buffered.
_HALF_MAX_FUSED_TILE = 128
_HALF_SPLIT_FORWARD = _LaunchConfig(block_m=128, block_n=64, num_warps=8, num_stages=2)
_HALF_SPLIT_BACKWARD = _LaunchConfig(block_m=64, block_n=64, num_warps=8, num_stages=2)


def _half_warps_for_tile(tile: int) -> int:
    # Tiles of 64 and up run on wgmma (HGMMA), which works in warpgroups of 4 warps;
    # two warpgroups halve the per-thread share of the score tiles, which keeps the
    # head_dim 48/64 kernels clear of the 255-register limit. Tiles of 16 and 32 run on
    # mma.sync (wgmma needs 64 rows); ptxas spilled them at 1 warp (16 tokens,
    # head_dim 48 forward) and at 4 (32 tokens, head_dim 16 backward), never at 2.
    return 8 if tile >= 64 else 2


def _launch_plan(seq_len: int, head_dim: int, dtype: torch.dtype) -> _LaunchPlan:
    # The tile that holds every token: a power of two (tl.arange), at least 16 (tl.dot).
    tile = max(16, triton.next_power_of_2(seq_len))
    if dtype == torch.float32:
        if tile <= _FP32_FUSED_TILE:
            # 2 warps: ptxas spilled this tile at 1 warp (head_dim 48/64) and at 4
            # (head_dim 32 with unaligned strides).
            fused = _LaunchConfig(tile, tile, num_warps=2, num_stages=1)
            return _LaunchPlan(forward=fused, dkdv=fused, dq=None)
        return _LaunchPlan(forward=_FP32_SPLIT, dkdv=_FP32_SPLIT, dq=_FP32_SPLIT)

    if tile > _HALF_MAX_FUSED_TILE:
        return _LaunchPlan(forward=_HALF_SPLIT_FORWARD, dkdv=_HALF_SPLIT_BACKWARD, dq=_HALF_SPLIT_BACKWARD)
    warps = _half_warps_for_tile(tile)
    # Forward: one program per (batch, head) takes all queries; at N = 65 that is 128
    # padded rows over two warpgroups. Head dims padded to 64 get 64-key blocks (two
    # loop steps, the same tensor-core work) so that the 128 x 64 output accumulator
    # next to the score tile fits in registers.
    keys_per_block = tile if triton.next_power_of_2(head_dim) <= 32 else min(tile, 64)
    forward = _LaunchConfig(tile, keys_per_block, num_warps=warps, num_stages=1)
    # Backward: every key in one block, so each program finishes dq as well; queries go
    # in blocks of up to 64. At N = 65 two 64-row steps do the same tensor-core work as
    # one 128-row step with half the P and dP registers (128-row steps spill at
    # head_dim 48 and 64).
    dkdv = _LaunchConfig(min(tile, 64), tile, num_warps=warps, num_stages=1)
    return _LaunchPlan(forward=forward, dkdv=dkdv, dq=None)


# --------------------------------------------------------------------------------------
# Python wrapper
# --------------------------------------------------------------------------------------
def _kernels_are_interpreted() -> bool:
    """True when TRITON_INTERPRET=1 was set before this module was imported (CPU tests)."""
    return _common.is_interpreted(_attention_forward_kernel)


def _with_unit_last_stride(tensor: torch.Tensor) -> torch.Tensor:
    # The kernels assume contiguous rows; other strides are handled in place.
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _validate(qkv, num_heads, scale) -> tuple[int, float]:
    """Check the arguments; returns (head_dim, scale)."""
    _common.check_floating("qkv", qkv)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be 3-D [B, N, 3*C], got shape {tuple(qkv.shape)}")
    if qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"qkv's last dim {qkv.shape[-1]} is not divisible by 3 * num_heads = {3 * num_heads}")
    head_dim = qkv.shape[-1] // (3 * num_heads)
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} (qkv's last dim / (3 * num_heads)) is not supported; "
                         f"supported: {SUPPORTED_HEAD_DIMS}")
    interpreted = _kernels_are_interpreted()
    _common.check_device("qkv", qkv, interpreted, __name__)
    _common.refuse_interpreted_bf16("qkv", interpreted, qkv.dtype)
    if scale is None:
        scale = head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    return head_dim, float(scale)


def _attention_forward(qkv: torch.Tensor, num_heads: int, head_dim: int, scale: float, plan: _LaunchPlan):
    batch, seq_len, _ = qkv.shape
    model_dim = num_heads * head_dim
    out = _common.new_output((batch, seq_len, model_dim), qkv.dtype, qkv.device)
    lse = _common.new_output((batch * num_heads, seq_len), torch.float32, qkv.device)
    if out.numel() == 0:
        return out, lse
    config = plan.forward
    grid = (triton.cdiv(seq_len, config.block_m), batch * num_heads)
    _attention_forward_kernel[grid](
        qkv, out, lse,
        seq_len, num_heads,
        qkv.stride(0), qkv.stride(1),
        out.stride(0), out.stride(1),
        scale,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out, lse


def _attention_backward(qkv, out, lse, dout, num_heads: int, head_dim: int, scale: float, plan: _LaunchPlan):
    batch, seq_len, _ = qkv.shape
    dqkv = _common.new_output(qkv.shape, qkv.dtype, qkv.device)
    if dqkv.numel() == 0:
        return dqkv
    block_d = triton.next_power_of_2(head_dim)
    dkdv_config, dq_config = plan.dkdv, plan.dq
    batch_heads = batch * num_heads

    if dq_config is None:
        delta = lse  # unused by the fused kernel: delta comes from the tile itself
    else:
        delta = _common.new_output((batch_heads, seq_len), torch.float32, qkv.device)
        _attention_backward_dq_kernel[(triton.cdiv(seq_len, dq_config.block_m), batch_heads)](
            qkv, out, dout, dqkv, lse, delta,
            seq_len, num_heads,
            qkv.stride(0), qkv.stride(1),
            out.stride(0), out.stride(1),
            dout.stride(0), dout.stride(1),
            dqkv.stride(0), dqkv.stride(1),
            scale,
            HEAD_DIM=head_dim, BLOCK_D=block_d,
            BLOCK_M=dq_config.block_m, BLOCK_N=dq_config.block_n,
            num_warps=dq_config.num_warps, num_stages=dq_config.num_stages,
        )

    fuse_dq = dq_config is None
    if fuse_dq:
        assert dkdv_config.block_n >= seq_len, "fused dq needs every key in one block"
    # Launched after the dq kernel on the same stream, so delta is ready.
    _attention_backward_dkdv_kernel[(triton.cdiv(seq_len, dkdv_config.block_n), batch_heads)](
        qkv, dout, dqkv, lse, delta,
        seq_len, num_heads,
        qkv.stride(0), qkv.stride(1),
        dout.stride(0), dout.stride(1),
        dqkv.stride(0), dqkv.stride(1),
        scale,
        HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_M=dkdv_config.block_m, BLOCK_N=dkdv_config.block_n,
        FUSE_DQ=fuse_dq,
        num_warps=dkdv_config.num_warps, num_stages=dkdv_config.num_stages,
    )
    return dqkv


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, num_heads, head_dim, scale):
        plan = _launch_plan(qkv.shape[1], head_dim, qkv.dtype)
        with _common.on_device_of(qkv):
            out, lse = _attention_forward(qkv, num_heads, head_dim, scale, plan)
        # Only the split backward reads the output back (for delta); saving it costs no
        # memory, it is the tensor returned.
        ctx.save_for_backward(qkv, out if plan.dq is not None else None, lse)
        ctx.num_heads, ctx.head_dim, ctx.scale, ctx.plan = num_heads, head_dim, scale, plan
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        qkv, out, lse = ctx.saved_tensors
        dout = _with_unit_last_stride(dout.to(qkv.dtype))
        with _common.on_device_of(qkv):
            dqkv = _attention_backward(qkv, out, lse, dout, ctx.num_heads, ctx.head_dim, ctx.scale, ctx.plan)
        return dqkv, None, None, None


def attention(qkv: torch.Tensor, num_heads: int, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v over the heads, fused; same contract as torch_attention.

    qkv: [B, N, 3*C] in float16, bfloat16 or float32 (under autocast it already arrives
    in the autocast dtype); head_dim = C / num_heads must be 16, 32, 48 or 64. Returns
    [B, N, C] in qkv's dtype. scale defaults to head_dim ** -0.5. Raises ValueError for
    arguments the kernels cannot take.
    """
    head_dim, scale = _validate(qkv, num_heads, scale)
    return _FusedAttention.apply(_with_unit_last_stride(qkv), num_heads, head_dim, scale)


# --------------------------------------------------------------------------------------
# H100 compile checks (see kernels/h100.py)
# --------------------------------------------------------------------------------------
# Runtime (non-constexpr) arguments, in order, with their Triton types; "{dtype}" is
# the input dtype's pointer type.
_FORWARD_SIGNATURE = {
    "qkv_ptr": "*{dtype}", "out_ptr": "*{dtype}", "lse_ptr": "*fp32",
    "seq_len": "i32", "num_heads": "i32",
    "stride_qkv_b": "i32", "stride_qkv_n": "i32",
    "stride_out_b": "i32", "stride_out_n": "i32",
    "softmax_scale": "fp32",
}
_DKDV_SIGNATURE = {
    "qkv_ptr": "*{dtype}", "dout_ptr": "*{dtype}", "dqkv_ptr": "*{dtype}",
    "lse_ptr": "*fp32", "delta_ptr": "*fp32",
    "seq_len": "i32", "num_heads": "i32",
    "stride_qkv_b": "i32", "stride_qkv_n": "i32",
    "stride_dout_b": "i32", "stride_dout_n": "i32",
    "stride_dqkv_b": "i32", "stride_dqkv_n": "i32",
    "softmax_scale": "fp32",
}
_DQ_SIGNATURE = {
    "qkv_ptr": "*{dtype}", "out_ptr": "*{dtype}", "dout_ptr": "*{dtype}", "dqkv_ptr": "*{dtype}",
    "lse_ptr": "*fp32", "delta_ptr": "*fp32",
    "seq_len": "i32", "num_heads": "i32",
    "stride_qkv_b": "i32", "stride_qkv_n": "i32",
    "stride_out_b": "i32", "stride_out_n": "i32",
    "stride_dout_b": "i32", "stride_dout_n": "i32",
    "stride_dqkv_b": "i32", "stride_dqkv_n": "i32",
    "softmax_scale": "fp32",
}

# The planner is evaluated at every sequence length up to this one; its choice depends on
# the smallest power-of-two tile holding the sequence, and is the same for every length
# past _HALF_MAX_FUSED_TILE, so this covers each branch several times over.
PLANNED_SEQ_LEN_LIMIT = 2048


def launch_plans():
    """Every (dtype, head_dim, seq_len, plan) the wrapper can launch with, one seq_len per
    distinct (dtype, head_dim, plan, seq_len as the launcher specializes it)."""
    from kernels.h100 import launcher_specialization

    seen = set()
    for dtype in _common.SUPPORTED_DTYPES:
        for head_dim in SUPPORTED_HEAD_DIMS:
            for seq_len in range(1, PLANNED_SEQ_LEN_LIMIT + 1):
                plan = _launch_plan(seq_len, head_dim, dtype)
                key = (dtype, head_dim, plan, launcher_specialization(seq_len))
                if key not in seen:
                    seen.add(key)
                    yield dtype, head_dim, seq_len, plan


def h100_compile_specs() -> list:
    """Every kernel in every configuration launch_plans() yields, as kernels/h100.py compiles them.

    The integers other than seq_len are those of contiguous tensors: torch's allocations are
    16-byte aligned, and every supported head_dim is a multiple of 16, so the row strides (3C,
    C) and batch strides (N * 3C, N * C) are multiples of 16. num_heads is taken as the
    model's 12 (neither 1 nor a multiple of 16).
    """
    from kernels.h100 import KernelSpec, launcher_specialization, matmul_instructions

    specs, labels = [], set()

    def add(kernel, runtime_args, constexprs, config, dtype, seq_len, dot_rows):
        dtype_name = _common.DTYPE_NAMES[dtype]
        specialization = launcher_specialization(seq_len)
        described = ",".join(f"{name}={value}" for name, value in constexprs.items())
        label = f"{dtype_name},{described},warps={config.num_warps},stages={config.num_stages},seq_len:{specialization}"
        if (kernel, label) in labels:  # the same kernel configuration chosen for another shape
            return
        labels.add((kernel, label))
        signature = {name: kind.format(dtype=dtype_name) for name, kind in runtime_args.items()}
        pinned = {}
        if specialization == "1":
            pinned["seq_len"] = 1
            del signature["seq_len"]
        divisible = [name for name, kind in signature.items() if kind.startswith("*") or name.startswith("stride_")]
        if specialization == "16k":
            divisible.append("seq_len")
        specs.append(KernelSpec(
            name=kernel.__name__, config=label, fn=kernel, signature=signature,
            constexprs={**constexprs, **pinned}, num_warps=config.num_warps, num_stages=config.num_stages,
            # fp32 dots run with input_precision="ieee": exact products on the FMA units.
            instructions=matmul_instructions(dtype_name, "ieee", dot_rows, config.num_warps),
            divisible_by_16=tuple(divisible),
        ))

    for dtype, head_dim, seq_len, plan in launch_plans():
        head = {"HEAD_DIM": head_dim, "BLOCK_D": triton.next_power_of_2(head_dim)}
        forward, dkdv, dq = plan.forward, plan.dkdv, plan.dq
        # The rows (M side) of each kernel's tl.dot calls decide which tensor-core instruction fits.
        add(_attention_forward_kernel, _FORWARD_SIGNATURE,
            {**head, "BLOCK_M": forward.block_m, "BLOCK_N": forward.block_n}, forward, dtype, seq_len,
            dot_rows=(forward.block_m,))
        add(_attention_backward_dkdv_kernel, _DKDV_SIGNATURE,
            {**head, "BLOCK_M": dkdv.block_m, "BLOCK_N": dkdv.block_n, "FUSE_DQ": dq is None}, dkdv, dtype, seq_len,
            dot_rows=(dkdv.block_n,) if dq is not None else (dkdv.block_n, dkdv.block_m))
        if dq is not None:
            add(_attention_backward_dq_kernel, _DQ_SIGNATURE,
                {**head, "BLOCK_M": dq.block_m, "BLOCK_N": dq.block_n}, dq, dtype, seq_len, dot_rows=(dq.block_m,))
    return specs
