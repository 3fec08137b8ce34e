"""Fused multi-head self-attention core: softmax(q k^T * scale) v, forward and backward.

`attention(qkv, num_heads, scale=None)` computes the same function as
`vit.backends.torch_attention`, reading q, k and v straight out of the QKV projection's
[B, N, 3*C] output (timm's layout: q, k, v blocks of C = heads * head_dim columns,
heads contiguous inside a block) and writing straight into the [B, N, C] layout the
output projection reads. No permute or contiguous copies, and the N x N scores never
leave the chip: the forward saves only each query row's log-sum-exp (fp32) for the
backward, which recomputes the probabilities from it.

Two plans, picked in Python from the shape (`launch_plan`):

* Whole sequence (fp16/bf16 with N <= 128, the model's N = 65; fp32 with N <= 16): one
  program per (batch, head) holds every token, one launch forward and one backward.
  Tokens [0, N) are a lead part and, for 65 to 80 tokens, a 16-token tail part after a
  64-token lead, on both the query and the key axis: at N = 65 the tiles execute 80 x 80
  scores where the next power of two would execute 128 x 128 (1.5x the useful matrix and
  exponential work instead of 3.9x). The lead part's queries go in tiles of a planned
  height, the tail's in one tile.
  - `_attention_whole_forward_kernel`: per query tile, the scores against both key parts,
    an exact softmax over both (every key is in registers, no online rescaling), the
    output and the log-sum-exp.
  - `_attention_whole_backward_kernel`: per query tile, P and dP against both key parts
    (keys along rows, so dk and dv come out of tensor-core dots without transposing
    register tiles), delta = rowsum(P * dP) summed exactly from them, dq finished and
    written; dk and dv accumulate in registers for both key parts, written at the end.
* Streaming (longer sequences): FlashAttention-style tiles.
  - `_attention_forward_kernel`: one program per (batch, head, query block) loops over
    key blocks with the online softmax.
  - `_attention_backward_dq_kernel`: one program per (batch, head, query block) loops over
    the key blocks for dq and stores delta = rowsum(dout * out).
  - `_attention_backward_dkdv_kernel`, launched after it: one program per (batch, head,
    key block) loops over the query blocks for dk and dv, reading delta.

Every gradient element is written by exactly one program with a fixed reduction order
and no atomics, so the backward is bit-for-bit deterministic; dq, dk and dv land in
one [B, N, 3*C] tensor laid out like qkv. Traced, the launches are PyTorch operators
(`torch.ops.vit_kernels.attention` / `attention_backward`), so torch.compile treats them as
opaque calls and never traces the planning; called plainly, one torch.autograd.Function
around the same launchers (kernels/_common.py's Operator).

Block sizes are fixed per shape and dtype in Python (`launch_plan`, `plan_launches`); there
is no @triton.autotune because the interpreter (CPU tests) cannot run one with several
configs. kernels/cost.py counts every launch's bytes and FLOPs from the same plan, and
kernels/specs.py lists every configuration the planner can pick for the sm_90 compile check.
"""
import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import _common
from kernels.head_dims import SUPPORTED_HEAD_DIMS

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
# Grid axis 0 is batch * heads (up to 2^31 - 1 programs); axis 1, where there is one,
# the query or key block.


@triton.jit
def _program_batch_head(num_heads):
    """The (batch * heads) index of this program (grid axis 0), its batch and its head."""
    batch_head = tl.program_id(0)
    return batch_head, batch_head // num_heads, batch_head % num_heads


@triton.jit
def _head_base(ptr, batch, head, stride_b, HEAD_DIM: tl.constexpr):
    """Where `head` of `batch` starts in a [B, N, ...] tensor laid out like qkv or out."""
    return ptr + batch.to(tl.int64) * stride_b + head * HEAD_DIM


@triton.jit
def _qkv_bases(ptr, batch, head, stride_b, num_heads, HEAD_DIM: tl.constexpr):
    """Where q, k and v of `head` of `batch` start in qkv (or dq, dk and dv in dqkv): blocks
    of C = num_heads * HEAD_DIM columns."""
    q_base = _head_base(ptr, batch, head, stride_b, HEAD_DIM)
    model_dim = num_heads * HEAD_DIM
    return q_base, q_base + model_dim, q_base + 2 * model_dim


@triton.jit
def _row_masks(offs_rows, in_head, seq_len):
    """Which rows exist, and the [rows, BLOCK_D] mask of the elements that do."""
    rows_valid = offs_rows < seq_len
    return rows_valid, rows_valid[:, None] & in_head[None, :]


@triton.jit
def _load_rows(base, offs_rows, stride_n, offs_d, mask):
    """Rows of one head's [N, HEAD_DIM] slice; zero where the mask is off."""
    return tl.load(base + offs_rows[:, None] * stride_n + offs_d[None, :], mask=mask, other=0.0)


# ---- whole sequence in one program ---------------------------------------------------


@triton.jit
def _load_key_part(k_base, v_base, key0, seq_len, stride_qkv_n, offs_d, in_head, KEYS: tl.constexpr):
    """Keys and values [key0, key0 + KEYS), zero past the sequence, and which keys exist."""
    offs_n = key0 + tl.arange(0, KEYS)
    key_valid, kv_mask = _row_masks(offs_n, in_head, seq_len)
    k = _load_rows(k_base, offs_n, stride_qkv_n, offs_d, kv_mask)
    v = _load_rows(v_base, offs_n, stride_qkv_n, offs_d, kv_mask)
    return k, v, key_valid


@triton.jit
def _key_part_scores(q, k_base, v_base, key0, seq_len, stride_qkv_n, offs_d, in_head, qk_scale,
                     KEYS: tl.constexpr):
    """Base-2 scores of a query tile against keys [key0, key0 + KEYS) (-inf past the
    sequence), and those keys' values."""
    k, v, key_valid = _load_key_part(k_base, v_base, key0, seq_len, stride_qkv_n, offs_d, in_head, KEYS)
    # "ieee" only matters for fp32 inputs: exact fp32 products instead of tf32, so
    # fp32 matches the reference tightly. fp16/bf16 inputs use tensor cores anyway.
    scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    return tl.where(key_valid[None, :], scores, float("-inf")), v


@triton.jit
def _whole_forward_rows(q_base, k_base, v_base, out_base, lse_base, row0, seq_len, stride_qkv_n, stride_out_n,
                        qk_scale, ROWS: tl.constexpr, LEAD: tl.constexpr, TAIL: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Output and log-sum-exp of query rows [row0, row0 + ROWS) against every key."""
    offs_d = tl.arange(0, BLOCK_D)
    in_head = offs_d < HEAD_DIM
    offs_m = row0 + tl.arange(0, ROWS)
    query_valid, row_mask = _row_masks(offs_m, in_head, seq_len)
    q = _load_rows(q_base, offs_m, stride_qkv_n, offs_d, row_mask)

    # The lead part always holds a valid key, so row_max is finite.
    scores, v = _key_part_scores(q, k_base, v_base, 0, seq_len, stride_qkv_n, offs_d, in_head, qk_scale, LEAD)
    row_max = tl.max(scores, axis=1)
    if TAIL > 0:
        tail_scores, tail_v = _key_part_scores(q, k_base, v_base, LEAD, seq_len, stride_qkv_n, offs_d, in_head,
                                               qk_scale, TAIL)
        row_max = tl.maximum(row_max, tl.max(tail_scores, axis=1))
    probs = tl.math.exp2(scores - row_max[:, None])
    row_sum = tl.sum(probs, axis=1)
    acc = tl.dot(probs.to(v.dtype), v, input_precision="ieee")
    if TAIL > 0:
        tail_probs = tl.math.exp2(tail_scores - row_max[:, None])
        row_sum += tl.sum(tail_probs, axis=1)
        acc = tl.dot(tail_probs.to(tail_v.dtype), tail_v, acc, input_precision="ieee")

    out = acc / row_sum[:, None]
    tl.store(out_base + offs_m[:, None] * stride_out_n + offs_d[None, :], out.to(out_base.dtype.element_ty),
             mask=row_mask)
    # Saved in natural-log units (log sum_j exp(scale * q.k_j)), the usual meaning.
    tl.store(lse_base + offs_m, (row_max + tl.math.log2(row_sum)) * LN2, mask=query_valid)


@triton.jit
def _attention_whole_forward_kernel(
    qkv_ptr, out_ptr, lse_ptr,
    seq_len, num_heads,
    stride_qkv_b, stride_qkv_n,
    stride_out_b, stride_out_n,
    softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    LEAD: tl.constexpr, TAIL: tl.constexpr, QUERY_ROWS: tl.constexpr,
):
    """One (batch, head): tokens [0, LEAD) and [LEAD, LEAD + TAIL) (TAIL = 0: no tail), the
    lead part's queries in tiles of QUERY_ROWS, the tail's in one tile."""
    batch_head, batch, head = _program_batch_head(num_heads)
    q_base, k_base, v_base = _qkv_bases(qkv_ptr, batch, head, stride_qkv_b, num_heads, HEAD_DIM)
    out_base = _head_base(out_ptr, batch, head, stride_out_b, HEAD_DIM)
    lse_base = lse_ptr + batch_head.to(tl.int64) * seq_len
    qk_scale = softmax_scale * LOG2E
    for row0 in tl.static_range(0, LEAD, QUERY_ROWS):
        _whole_forward_rows(q_base, k_base, v_base, out_base, lse_base, row0, seq_len,
                            stride_qkv_n, stride_out_n, qk_scale, QUERY_ROWS, LEAD, TAIL, HEAD_DIM, BLOCK_D)
    if TAIL > 0:
        _whole_forward_rows(q_base, k_base, v_base, out_base, lse_base, LEAD, seq_len,
                            stride_qkv_n, stride_out_n, qk_scale, TAIL, LEAD, TAIL, HEAD_DIM, BLOCK_D)


@triton.jit
def _key_part_probabilities(q, dout, lse_log2, k, v, key_valid, qk_scale):
    """A key part against a query tile, transposed (keys along rows):
    P^T = exp(scale * K Q^T - lse) and dP^T = V dO^T."""
    probs_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale - lse_log2[None, :])
    probs_t = tl.where(key_valid[:, None], probs_t, 0.0)  # a zero key still scores exp(0)
    dprobs_t = tl.dot(v, tl.trans(dout), input_precision="ieee")
    return probs_t, dprobs_t


@triton.jit
def _key_part_gradients(k, probs_t, dprobs_t, delta, q, dout, dk, dv, dq):
    """One key part's share: dV += P^T dO, dK += dS^T Q, dQ += dS K (dk and dq unscaled),
    with dS^T = P^T * (dP^T - delta)."""
    dscores_t = probs_t * (dprobs_t - delta[None, :])
    dv = tl.dot(probs_t.to(dout.dtype), dout, dv, input_precision="ieee")
    dk = tl.dot(dscores_t.to(q.dtype), q, dk, input_precision="ieee")
    dq = tl.dot(tl.trans(dscores_t.to(k.dtype)), k, dq, input_precision="ieee")
    return dk, dv, dq


@triton.jit
def _whole_backward_rows(q_base, k_base, v_base, dout_base, dq_base, lse_base, row0, seq_len,
                         stride_qkv_n, stride_dout_n, stride_dqkv_n, softmax_scale,
                         dk_lead, dv_lead, dk_tail, dv_tail,
                         ROWS: tl.constexpr, LEAD: tl.constexpr, TAIL: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Query rows [row0, row0 + ROWS): writes their dq, returns the key parts' dk and dv
    accumulators with these rows' shares added (the tail's untouched when TAIL = 0)."""
    offs_d = tl.arange(0, BLOCK_D)
    in_head = offs_d < HEAD_DIM
    offs_m = row0 + tl.arange(0, ROWS)
    query_valid, row_mask = _row_masks(offs_m, in_head, seq_len)
    q = _load_rows(q_base, offs_m, stride_qkv_n, offs_d, row_mask)
    dout = _load_rows(dout_base, offs_m, stride_dout_n, offs_d, row_mask)
    # +inf for padded query rows makes their probabilities exactly 0.
    lse_log2 = tl.load(lse_base + offs_m, mask=query_valid, other=float("inf")) * LOG2E
    qk_scale = softmax_scale * LOG2E

    # delta_i = sum_j P_ij dP_ij over every key: both parts first, then the gradients.
    k, v, key_valid = _load_key_part(k_base, v_base, 0, seq_len, stride_qkv_n, offs_d, in_head, LEAD)
    probs_t, dprobs_t = _key_part_probabilities(q, dout, lse_log2, k, v, key_valid, qk_scale)
    delta = tl.sum(probs_t * dprobs_t, axis=0)
    if TAIL > 0:
        tail_k, tail_v, tail_valid = _load_key_part(k_base, v_base, LEAD, seq_len, stride_qkv_n, offs_d, in_head,
                                                    TAIL)
        tail_probs_t, tail_dprobs_t = _key_part_probabilities(q, dout, lse_log2, tail_k, tail_v, tail_valid,
                                                              qk_scale)
        delta += tl.sum(tail_probs_t * tail_dprobs_t, axis=0)
    dq = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    dk_lead, dv_lead, dq = _key_part_gradients(k, probs_t, dprobs_t, delta, q, dout, dk_lead, dv_lead, dq)
    if TAIL > 0:
        dk_tail, dv_tail, dq = _key_part_gradients(tail_k, tail_probs_t, tail_dprobs_t, delta, q, dout,
                                                   dk_tail, dv_tail, dq)
    tl.store(dq_base + offs_m[:, None] * stride_dqkv_n + offs_d[None, :],
             (dq * softmax_scale).to(dq_base.dtype.element_ty), mask=row_mask)
    return dk_lead, dv_lead, dk_tail, dv_tail


@triton.jit
def _store_key_gradients(dk_base, dv_base, dk, dv, key0, seq_len, stride_dqkv_n, softmax_scale,
                         KEYS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = key0 + tl.arange(0, KEYS)
    _, kv_mask = _row_masks(offs_n, offs_d < HEAD_DIM, seq_len)
    offsets = offs_n[:, None] * stride_dqkv_n + offs_d[None, :]
    tl.store(dk_base + offsets, (dk * softmax_scale).to(dk_base.dtype.element_ty), mask=kv_mask)
    tl.store(dv_base + offsets, dv.to(dv_base.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attention_whole_backward_kernel(
    qkv_ptr, dout_ptr, dqkv_ptr, lse_ptr,
    seq_len, num_heads,
    stride_qkv_b, stride_qkv_n,
    stride_dout_b, stride_dout_n,
    stride_dqkv_b, stride_dqkv_n,
    softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    LEAD: tl.constexpr, TAIL: tl.constexpr, QUERY_ROWS: tl.constexpr,
):
    """dq, dk and dv of one (batch, head), tokens split as in the forward. Per query tile:
        P^T  = exp(scale * K Q^T - lse)       dP^T = V dO^T       (each key part)
        delta = column sums of P^T * dP^T     dS^T = P^T * (dP^T - delta)
        dV += P^T dO     dK += dS^T Q (times scale)     dQ = sum over key parts of dS K (times scale)
    """
    batch_head, batch, head = _program_batch_head(num_heads)
    q_base, k_base, v_base = _qkv_bases(qkv_ptr, batch, head, stride_qkv_b, num_heads, HEAD_DIM)
    dq_base, dk_base, dv_base = _qkv_bases(dqkv_ptr, batch, head, stride_dqkv_b, num_heads, HEAD_DIM)
    dout_base = _head_base(dout_ptr, batch, head, stride_dout_b, HEAD_DIM)
    lse_base = lse_ptr + batch_head.to(tl.int64) * seq_len

    dk_lead = tl.zeros([LEAD, BLOCK_D], dtype=tl.float32)
    dv_lead = tl.zeros([LEAD, BLOCK_D], dtype=tl.float32)
    # Without a tail these are passed through untouched, and never stored.
    dk_tail, dv_tail = dk_lead, dv_lead
    if TAIL > 0:
        dk_tail = tl.zeros([TAIL, BLOCK_D], dtype=tl.float32)
        dv_tail = tl.zeros([TAIL, BLOCK_D], dtype=tl.float32)
    for row0 in tl.static_range(0, LEAD, QUERY_ROWS):
        dk_lead, dv_lead, dk_tail, dv_tail = _whole_backward_rows(
            q_base, k_base, v_base, dout_base, dq_base, lse_base, row0, seq_len,
            stride_qkv_n, stride_dout_n, stride_dqkv_n, softmax_scale,
            dk_lead, dv_lead, dk_tail, dv_tail, QUERY_ROWS, LEAD, TAIL, HEAD_DIM, BLOCK_D)
    if TAIL > 0:
        dk_lead, dv_lead, dk_tail, dv_tail = _whole_backward_rows(
            q_base, k_base, v_base, dout_base, dq_base, lse_base, LEAD, seq_len,
            stride_qkv_n, stride_dout_n, stride_dqkv_n, softmax_scale,
            dk_lead, dv_lead, dk_tail, dv_tail, TAIL, LEAD, TAIL, HEAD_DIM, BLOCK_D)

    _store_key_gradients(dk_base, dv_base, dk_lead, dv_lead, 0, seq_len,
                         stride_dqkv_n, softmax_scale, LEAD, HEAD_DIM, BLOCK_D)
    if TAIL > 0:
        _store_key_gradients(dk_base, dv_base, dk_tail, dv_tail, LEAD, seq_len,
                             stride_dqkv_n, softmax_scale, TAIL, HEAD_DIM, BLOCK_D)


# ---- streaming: longer sequences ------------------------------------------------------


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
    query_block = tl.program_id(1)
    batch_head, batch, head = _program_batch_head(num_heads)
    q_base, k_base, v_base = _qkv_bases(qkv_ptr, batch, head, stride_qkv_b, num_heads, HEAD_DIM)

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
        scores, v = _key_part_scores(q, k_base, v_base, key_start, seq_len, stride_qkv_n, offs_d, in_head,
                                     qk_scale, BLOCK_N)
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
):
    """dk and dv for one key block, from the delta = rowsum(dout * out) the dq kernel stored.
    Transposed tiles (keys along rows), as in the whole-sequence backward."""
    key_block = tl.program_id(1)
    batch_head, batch, head = _program_batch_head(num_heads)
    q_base, k_base, v_base = _qkv_bases(qkv_ptr, batch, head, stride_qkv_b, num_heads, HEAD_DIM)
    _, dk_base, dv_base = _qkv_bases(dqkv_ptr, batch, head, stride_dqkv_b, num_heads, HEAD_DIM)
    dout_base = _head_base(dout_ptr, batch, head, stride_dout_b, HEAD_DIM)
    row_stats_base = batch_head.to(tl.int64) * seq_len

    offs_d = tl.arange(0, BLOCK_D)
    in_head = offs_d < HEAD_DIM
    key0 = key_block * BLOCK_N
    qk_scale = softmax_scale * LOG2E
    k, v, key_valid = _load_key_part(k_base, v_base, key0, seq_len, stride_qkv_n, offs_d, in_head, BLOCK_N)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    for query_start in range(0, seq_len, BLOCK_M):
        offs_m = query_start + tl.arange(0, BLOCK_M)
        query_valid, row_mask = _row_masks(offs_m, in_head, seq_len)
        q = _load_rows(q_base, offs_m, stride_qkv_n, offs_d, row_mask)
        dout = _load_rows(dout_base, offs_m, stride_dout_n, offs_d, row_mask)
        lse_log2 = tl.load(lse_ptr + row_stats_base + offs_m, mask=query_valid,
                           other=float("inf")) * LOG2E
        probs_t, dprobs_t = _key_part_probabilities(q, dout, lse_log2, k, v, key_valid, qk_scale)
        delta = tl.load(delta_ptr + row_stats_base + offs_m, mask=query_valid, other=0.0)
        dscores_t = probs_t * (dprobs_t - delta[None, :])
        dv += tl.dot(probs_t.to(dout.dtype), dout, input_precision="ieee")
        dk += tl.dot(dscores_t.to(q.dtype), q, input_precision="ieee")

    _store_key_gradients(dk_base, dv_base, dk, dv, key0, seq_len,
                         stride_dqkv_n, softmax_scale, BLOCK_N, HEAD_DIM, BLOCK_D)


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
    """dq for one query block, plus delta.

        delta = rowsum(dO * O)    (= sum_j P_ij dP_ij), stored for the dk/dv kernel
        dQ = scale * sum over key blocks of (P * (dO V^T - delta)) K
    """
    query_block = tl.program_id(1)
    batch_head, batch, head = _program_batch_head(num_heads)
    q_base, k_base, v_base = _qkv_bases(qkv_ptr, batch, head, stride_qkv_b, num_heads, HEAD_DIM)
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
# Launch plans, chosen in Python from the shape
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _WholeSequenceKernel:
    query_rows: int  # the lead part's queries go in tiles of this many rows (the tail's in one)
    num_warps: int


@dataclass(frozen=True)
class WholeSequencePlan:
    """One program per (batch, head) holding every token, in two parts on both axes:
    tokens [0, lead) and [lead, lead + tail)."""
    lead: int  # a power of two, 16 to 128: tl.arange needs powers of two, tl.dot at least 16
    tail: int  # 0 (the sequence fits the lead part) or 16
    forward: _WholeSequenceKernel
    backward: _WholeSequenceKernel

    @property
    def tokens(self) -> int:
        """Tokens the tiles span, padding included."""
        return self.lead + self.tail


@dataclass(frozen=True)
class _LaunchConfig:
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class StreamingPlan:
    forward: _LaunchConfig
    dq: _LaunchConfig
    dkdv: _LaunchConfig


# The choices below are those that compile for sm_90a without spilling in every
# configuration (kernels/specs.py, kernels/h100.py); kernels/README.md has the register
# counts and the history. fp16/bf16 dots with 64 rows use wgmma (HGMMA); 16- and 32-row ones
# use mma.sync (wgmma needs 64 rows), and fp32 uses FMA.

# fp16/bf16 up to this many tokens take the whole-sequence plan: one launch each way.
_HALF_WHOLE_TOKENS = 128
# Sequences of 65 to 80 tokens (the model's 64 patches and class token) are a 64-token lead
# and a 16-token tail: 80 x 80 tiles rather than 128 x 128. A 32-token tail spilled in the
# backward, so longer sequences take one 128-token part, split into query tiles.
_LEAD_TOKENS = 64
_TAIL_TOKENS = 16
# fp32 inputs take exact fp32 dots, which run on FMA units with both operands in
# registers: 32-token whole-sequence tiles (P, dP and dS next to dk, dv) spilled, so only
# sequences of up to 16 tokens take that plan, at 2 warps.
_FP32_WHOLE = WholeSequencePlan(lead=16, tail=0, forward=_WholeSequenceKernel(16, num_warps=2),
                                backward=_WholeSequenceKernel(16, num_warps=2))
_FP32_STREAMING = _LaunchConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)
# dQ steps over 16 keys at a time: 32 spilled under Triton 3.6.
_FP32_STREAMING_DQ = _LaunchConfig(block_m=32, block_n=16, num_warps=4, num_stages=2)
# fp16/bf16 past 128 tokens: 64 x 64 tiles (128 query rows in the forward), double-buffered.
_HALF_STREAMING = StreamingPlan(forward=_LaunchConfig(block_m=128, block_n=64, num_warps=8, num_stages=2),
                                dq=_LaunchConfig(block_m=64, block_n=64, num_warps=8, num_stages=2),
                                dkdv=_LaunchConfig(block_m=64, block_n=64, num_warps=8, num_stages=2))


def _half_whole_sequence_plan(seq_len: int, head_dim: int) -> WholeSequencePlan:
    """The fp16/bf16 whole-sequence plan for seq_len <= _HALF_WHOLE_TOKENS."""
    tile = max(16, triton.next_power_of_2(seq_len))
    if tile <= _LEAD_TOKENS:
        # One part. 16- and 32-row tiles run on mma.sync at 2 warps (1 and 4 warps spilled);
        # 64-row tiles on wgmma, one warpgroup.
        one_tile = _WholeSequenceKernel(query_rows=tile, num_warps=2 if tile < _LEAD_TOKENS else 4)
        return WholeSequencePlan(lead=tile, tail=0, forward=one_tile, backward=one_tile)
    if seq_len <= _LEAD_TOKENS + _TAIL_TOKENS:
        # The backward holds P and dP of both key parts with the dk, dv accumulators of both:
        # 64-row query tiles fit one warpgroup at head_dim 32; head_dim 16 takes 32-row tiles
        # (64-row ones come close to the register limit), head_dim 48/64 two warpgroups.
        backward = _WholeSequenceKernel(query_rows=32, num_warps=4) if head_dim <= 16 else \
            _WholeSequenceKernel(query_rows=64, num_warps=4 if head_dim <= 32 else 8)
        return WholeSequencePlan(lead=_LEAD_TOKENS, tail=_TAIL_TOKENS,
                                 forward=_WholeSequenceKernel(query_rows=64, num_warps=4), backward=backward)
    # One 128-token part over two warpgroups: 128-row dots in the forward, 128-key dots and
    # 64-row query tiles in the backward.
    return WholeSequencePlan(lead=2 * _LEAD_TOKENS, tail=0, forward=_WholeSequenceKernel(query_rows=128, num_warps=8),
                             backward=_WholeSequenceKernel(query_rows=64, num_warps=8))


def launch_plan(seq_len: int, head_dim: int, dtype: torch.dtype):
    """The plan for a [B, seq_len, 3 * heads * head_dim] qkv of `dtype`: a WholeSequencePlan
    or a StreamingPlan."""
    if dtype == torch.float32:
        if seq_len <= _FP32_WHOLE.tokens:
            return _FP32_WHOLE
        return StreamingPlan(forward=_FP32_STREAMING, dq=_FP32_STREAMING_DQ, dkdv=_FP32_STREAMING)
    if seq_len > _HALF_WHOLE_TOKENS:
        return _HALF_STREAMING
    return _half_whole_sequence_plan(seq_len, head_dim)


@dataclass(frozen=True)
class Launches:
    """The launches of one call at one shape: the forward, and the backward's one (whole
    sequence) or two (streaming: the dq kernel, then the dk/dv kernel)."""
    forward: _common.Launch
    backward: _common.Launch  # the whole-sequence backward, or the streaming dq kernel
    dkdv: _common.Launch | None  # streaming only


@functools.lru_cache(maxsize=_common.PLANNED_SHAPES)
def plan_launches(batch: int, seq_len: int, num_heads: int, head_dim: int, dtype: torch.dtype) -> Launches:
    plan = launch_plan(seq_len, head_dim, dtype)
    batch_heads = batch * num_heads
    head = dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim))
    if isinstance(plan, WholeSequencePlan):
        def whole(kernel, config: _WholeSequenceKernel):
            return _common.Launch(kernel, (batch_heads,), dict(head, LEAD=plan.lead, TAIL=plan.tail,
                                                               QUERY_ROWS=config.query_rows,
                                                               num_warps=config.num_warps, num_stages=1))

        return Launches(forward=whole(_attention_whole_forward_kernel, plan.forward),
                         backward=whole(_attention_whole_backward_kernel, plan.backward), dkdv=None)

    def streaming(kernel, config: _LaunchConfig, tile: int):
        return _common.Launch(kernel, (batch_heads, triton.cdiv(seq_len, tile)),
                              dict(head, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                                   num_warps=config.num_warps, num_stages=config.num_stages))

    return Launches(forward=streaming(_attention_forward_kernel, plan.forward, plan.forward.block_m),
                     backward=streaming(_attention_backward_dq_kernel, plan.dq, plan.dq.block_m),
                     dkdv=streaming(_attention_backward_dkdv_kernel, plan.dkdv, plan.dkdv.block_n))


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------
_INTERPRETED = _common.is_interpreted(_attention_whole_forward_kernel)  # TRITON_INTERPRET=1 at import (CPU tests)


def _with_unit_last_stride(tensor: torch.Tensor) -> torch.Tensor:
    # The kernels assume contiguous rows; other strides are handled in place.
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _attention_forward(qkv: torch.Tensor, num_heads: int, head_dim: int, scale: float, launches: Launches):
    """out [B, N, C] and lse [B * heads, N] (fp32): one launch."""
    batch, seq_len, _ = qkv.shape
    width = num_heads * head_dim
    out, lse = _common.new_outputs(qkv.device, ((batch, seq_len, width), qkv.dtype),
                                   ((batch * num_heads, seq_len), torch.float32))
    if out.numel() == 0:
        return out, lse
    # out is the contiguous tensor just allocated: strides (N * C, C).
    launches.forward(qkv, out, lse, seq_len, num_heads, *qkv.stride()[:2], seq_len * width, width, scale)
    return out, lse


def _attention_backward(qkv, out, lse, dout, num_heads: int, head_dim: int, scale: float, launches: Launches):
    """dqkv, laid out like qkv: one launch (whole sequence) or two (streaming)."""
    batch, seq_len, width = qkv.shape
    if launches.dkdv is None:
        dqkv, = _common.new_outputs(qkv.device, (qkv.shape, qkv.dtype))
    else:  # the streaming kernels' scratch: delta = rowsum(dout * out), fp32
        dqkv, delta = _common.new_outputs(qkv.device, (qkv.shape, qkv.dtype),
                                          ((batch * num_heads, seq_len), torch.float32))
    if dqkv.numel() == 0:
        return dqkv
    # dqkv is the contiguous tensor just allocated: strides (N * 3C, 3C).
    strides = (*qkv.stride()[:2], *dout.stride()[:2], seq_len * width, width)
    if launches.dkdv is None:
        launches.backward(qkv, dout, dqkv, lse, seq_len, num_heads, *strides, scale)
        return dqkv

    launches.backward(qkv, out, dout, dqkv, lse, delta, seq_len, num_heads, *strides[:2], *out.stride()[:2],
                      *strides[2:], scale)
    # Launched after the dq kernel on the same stream, so delta is ready.
    launches.dkdv(qkv, dout, dqkv, lse, delta, seq_len, num_heads, *strides, scale)
    return dqkv


# --------------------------------------------------------------------------------------
# PyTorch operators (kernels/_common.py's Operator)
# --------------------------------------------------------------------------------------
def _forward_op(qkv: torch.Tensor, num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, N, C] in qkv's dtype, log-sum-exp [B * num_heads, N] in fp32) of validated arguments."""
    batch, seq_len, width = qkv.shape
    head_dim = width // (3 * num_heads)
    launches = plan_launches(batch, seq_len, num_heads, head_dim, qkv.dtype)
    with _common.on_device_of(qkv):
        return _attention_forward(_with_unit_last_stride(qkv), num_heads, head_dim, scale, launches)


def _forward_fake(qkv, num_heads, scale):
    batch, seq_len, width = qkv.shape
    return qkv.new_empty((batch, seq_len, width // 3)), qkv.new_empty((batch * num_heads, seq_len),
                                                                      dtype=torch.float32)


def _backward_op(qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
                 num_heads: int, scale: float) -> torch.Tensor:
    """The gradient with respect to qkv (contiguous, qkv's shape and dtype); dout in qkv's dtype."""
    batch, seq_len, width = qkv.shape
    head_dim = width // (3 * num_heads)
    launches = plan_launches(batch, seq_len, num_heads, head_dim, qkv.dtype)
    with _common.on_device_of(qkv):
        return _attention_backward(_with_unit_last_stride(qkv), out, lse, _with_unit_last_stride(dout),
                                   num_heads, head_dim, scale, launches)


def _backward_fake(qkv, out, lse, dout, num_heads, scale):
    return qkv.new_empty(qkv.shape)


def _setup_context(ctx, inputs, output):
    qkv, num_heads, scale = inputs
    out, lse = output
    # The streaming backward reads out (for delta); saving it costs no memory, it is the
    # tensor attention() returns.
    ctx.save_for_backward(qkv, out, lse)
    # lse is an output only so that the backward can have it: no gradient flows into it.
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.num_heads, ctx.scale = num_heads, scale


def _backward_formula(ctx, dout, _dlse):
    if dout is None:  # out did not reach the loss
        return None, None, None
    qkv, out, lse = ctx.saved_tensors
    return ctx.launch_backward(qkv, out, lse, dout.to(qkv.dtype), ctx.num_heads, ctx.scale), None, None


_OPERATOR = _common.Operator(
    "attention", _forward_op, _forward_fake, _backward_op, _backward_fake, _setup_context, _backward_formula)
attention_forward_op, attention_backward_op = _OPERATOR.forward_op, _OPERATOR.backward_op


_SHAPES = _common.operand_shapes(qkv=("B", "N", "3*C"))


def _validate(qkv, num_heads, scale) -> tuple[int, float]:
    """Check the arguments; returns (head_dim, scale)."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    width = _common.check_operands({"qkv": qkv}, _SHAPES, None, _INTERPRETED, __name__)["3*C"]
    if width % (3 * num_heads):
        raise ValueError(f"qkv's last dim {width} is not divisible by 3 * num_heads = {3 * num_heads}")
    head_dim = width // (3 * num_heads)
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} (qkv's last dim / (3 * num_heads)) is not supported; "
                         f"supported: {SUPPORTED_HEAD_DIMS}")
    if scale is None:
        scale = head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    return head_dim, float(scale)


def attention(qkv: torch.Tensor, num_heads: int, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v over the heads, fused; same contract as torch_attention.

    qkv: [B, N, 3*C] in float16, bfloat16 or float32 (under autocast it already arrives
    in the autocast dtype); head_dim = C / num_heads must be 16, 32, 48 or 64. Returns
    [B, N, C] in qkv's dtype. scale defaults to head_dim ** -0.5. Raises ValueError for
    arguments the kernels cannot take.
    """
    _, scale = _validate(qkv, num_heads, scale)
    out, _ = _OPERATOR(qkv, num_heads, scale)
    return out
