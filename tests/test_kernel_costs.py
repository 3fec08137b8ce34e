"""kernels/cost.py's costs of the fused linear ops, checked by hand on small shapes against its
rules (bytes loaded: every tensor once per program that touches it; bytes read: each element
once per launch; useful FLOPs: the math at the real
sizes; executed FLOPs: the tl.dot tiles the plan issues), and at the model's shape."""
import pytest
import torch

from kernels import cost
from kernels.cost import KernelCost

FP32, BF16 = 4, 2  # bytes per element


def costs_by_kernel(costs):
    assert all(isinstance(c, KernelCost) and c.launches == 1 for c in costs)
    return {c.kernel: c for c in costs}


def test_layernorm_linear_by_hand():
    """100 rows, C = 128 (one 128-wide chunk), 256 outputs, bf16 matmuls, fp32 x and parameters.
    Plan: 64-row programs (2, the second with 36 rows), 64 outputs a step; weight gradient in
    64-wide output tiles over 2 row splits of 64 rows; row kernel 64-wide chunks, 64-step
    contraction; partials summed in 32 slabs of 4 columns."""
    costs = costs_by_kernel(cost.layernorm_linear_costs(100, 128, 256))
    assert [c.phase for c in costs.values()] == ["forward", "backward", "backward"]
    useful = 2 * 100 * 256 * 128
    parameters = 2 * 128 + 256 * 128 + 256  # LayerNorm weight and bias, W, b

    forward = costs["_ln_linear_forward_kernel"]
    assert forward.bytes_loaded == 100 * 128 * FP32 + 2 * parameters * FP32
    assert forward.bytes_read == 100 * 128 * FP32 + parameters * FP32
    assert forward.bytes_written == 100 * 256 * BF16 + 100 * 128 * BF16 + 100 * 2 * FP32  # out, x_hat, statistics
    assert forward.useful_flops == useful
    assert forward.executed_flops == 2 * (256 // 64) * 2 * 64 * 64 * 128  # programs x steps x one chunk's dot

    weight = costs["_ln_linear_backward_weight_kernel"]
    # 4 output tiles x 2 splits: each reads its rows of dout (its 64 columns) and of the saved
    # x_hat (all columns), and writes a [128, 64] fp32 partial and 64 fp64 sums.
    assert weight.bytes_loaded == 4 * (100 * 64 * BF16 + 100 * 128 * BF16)
    assert weight.bytes_read == 100 * 256 * BF16 + 100 * 128 * BF16
    assert weight.bytes_written == 8 * (128 * 64 * FP32 + 64 * 8)
    assert weight.useful_flops == useful
    assert weight.executed_flops == 8 * 2 * 128 * 64 * 64

    rows = costs["_ln_linear_backward_input_kernel"]
    row_part_read = 100 * 256 * BF16 + 2 * (256 * 128 + 128) * FP32 + 100 * 2 * FP32 + 100 * 128 * FP32
    # Each slab: 2 splits of [4, 256] fp32 partials and [256] fp64 bias sums, 4 LayerNorm biases.
    slab_read = 32 * (2 * 4 * 256 * FP32 + 2 * 256 * 8 + 4 * FP32)
    assert rows.bytes_loaded == row_part_read + slab_read
    # Read once: W and the LayerNorm weight (both programs load them), the bias sums (every slab).
    assert rows.bytes_read == row_part_read - (256 * 128 + 128) * FP32 + slab_read - 31 * 2 * 256 * 8
    assert rows.bytes_written == 100 * 128 * FP32 + 32 * (4 * 256 + 2 * 4) * FP32 + 256 * FP32
    assert rows.useful_flops == useful
    assert rows.executed_flops == 2 * (256 // 64) * 2 * (2 * 64 * 64 * 64)


def test_layernorm_mlp_by_hand():
    """100 rows, C = 128, hidden 64, bf16 matmuls, fp32 x and parameters. Plan: 64-row programs
    (2), 32 hidden units a step; weight gradient: 2 hidden tiles of 32, 2 dpre splits and 2
    dW2 splits of 64 rows; row kernel 64-wide chunks (2) and a 64-step contraction."""
    costs = costs_by_kernel(cost.layernorm_mlp_costs(100, 128, 64))
    parameters = 2 * 128 + 2 * 64 * 128 + 64 + 128

    forward = costs["_ln_mlp_forward_kernel"]
    assert forward.bytes_loaded == 100 * 128 * FP32 + 2 * parameters * FP32
    assert forward.bytes_read == 100 * 128 * FP32 + parameters * FP32
    # y, statistics, x_hat, pre
    assert forward.bytes_written == 100 * 128 * FP32 + 100 * 2 * FP32 + 100 * 128 * BF16 + 100 * 64 * BF16
    assert forward.useful_flops == 2 * 2 * 100 * 64 * 128
    assert forward.executed_flops == 2 * 2 * (2 * 64 * 32 * 128 + 2 * 64 * 128 * 32)  # programs x steps x (fc1 + fc2)

    weight = costs["_ln_mlp_backward_weight_kernel"]
    pre_programs_read = 2 * (100 * 128 * FP32 + 100 * 32 * BF16 + 100 * 128 * BF16) + \
        4 * 128 * 32 * FP32  # per hidden tile: dy, pre, x_hat; each program its w2 tile
    w2_programs_read = 2 * (100 * 128 * FP32 + 100 * 32 * BF16)
    assert weight.bytes_loaded == pre_programs_read + w2_programs_read
    assert weight.bytes_read == 100 * 128 * FP32 + 100 * 64 * BF16 + 100 * 128 * BF16 + 128 * 64 * FP32  # dy, pre, x_hat, w2
    pre_programs_written = 2 * 100 * 32 * BF16 + 4 * (128 * 32 * FP32 + 32 * 8)  # dpre, G partials, db1 sums
    w2_programs_written = 4 * 128 * 32 * FP32 + 2 * 128 * 8  # dW2 partials; db2 sums from hidden tile 0
    assert weight.bytes_written == pre_programs_written + w2_programs_written
    assert weight.useful_flops == 3 * 2 * 100 * 64 * 128
    # A dpre program's row step: dz @ w2 in two 64-wide steps over C, then x_hat^T @ dpre; a dW2
    # program's: dz^T @ gelu(pre). One row step each.
    assert weight.executed_flops == 4 * (2 * 2 * 64 * 32 * 64 + 2 * 128 * 32 * 64) + 4 * 2 * 128 * 32 * 64

    rows = costs["_ln_mlp_backward_input_kernel"]
    row_part_read = 100 * 64 * BF16 + 2 * (64 * 128 + 128) * FP32 + 100 * 2 * FP32 + 2 * 100 * 128 * FP32
    slab_read = 32 * ((2 * 4 * 64 + 2 * 4 * 64) * FP32 + (2 * 64 + 2 * 4) * 8 + 4 * FP32)
    assert rows.bytes_loaded == row_part_read + slab_read
    # Read once: w1 and the LayerNorm weight, and the db1 sums every slab loads.
    assert rows.bytes_read == row_part_read - (64 * 128 + 128) * FP32 + slab_read - 31 * 2 * 64 * 8
    assert rows.bytes_written == 100 * 128 * FP32 + 32 * (2 * 4 * 64 + 3 * 4) * FP32 + 64 * FP32
    assert rows.useful_flops == 2 * 100 * 64 * 128
    assert rows.executed_flops == 2 * 1 * 2 * (2 * 64 * 64 * 64)


def test_layernorm_mlp_options_add_their_traffic():
    plain = costs_by_kernel(cost.layernorm_mlp_costs(100, 128, 64))
    options = costs_by_kernel(cost.layernorm_mlp_costs(100, 128, 64, second_gelu=True, samples=4))
    forward, forward_plain = options["_ln_mlp_forward_kernel"], plain["_ln_mlp_forward_kernel"]
    # z is saved; the scales of samples 0-2 (rows 0-63) and 2-3 (rows 64-99) are read.
    assert forward.bytes_written - forward_plain.bytes_written == 100 * 128 * BF16
    assert forward.bytes_loaded - forward_plain.bytes_loaded == (3 + 2) * FP32
    assert forward.bytes_read - forward_plain.bytes_read == 4 * FP32
    weight, weight_plain = options["_ln_mlp_backward_weight_kernel"], plain["_ln_mlp_backward_weight_kernel"]
    # Every program reads z with dy, and the scales of its split's samples (0-2, 2-3).
    assert weight.bytes_loaded - weight_plain.bytes_loaded == 2 * 2 * 100 * 128 * BF16 + 4 * (3 + 2) * FP32
    assert weight.bytes_read - weight_plain.bytes_read == 100 * 128 * BF16 + 4 * FP32
    assert weight.executed_flops == weight_plain.executed_flops


def test_linear_residual_by_hand():
    """100 rows, 128 -> 128 features, h bf16, residual and parameters fp32, bf16 matmuls."""
    costs = costs_by_kernel(cost.linear_residual_costs(100, 128, 128))
    useful = 2 * 100 * 128 * 128

    forward = costs["_linear_residual_forward_kernel"]
    assert forward.bytes_loaded == 100 * 128 * BF16 + 2 * (128 * 128 + 128) * FP32 + 100 * 128 * FP32
    assert forward.bytes_read == 100 * 128 * BF16 + (128 * 128 + 128) * FP32 + 100 * 128 * FP32
    assert forward.bytes_written == 100 * 128 * FP32
    assert (forward.useful_flops, forward.executed_flops) == (useful, 2 * 2 * 2 * 64 * 128 * 64)

    weight = costs["_linear_residual_backward_weight_kernel"]
    assert weight.bytes_loaded == 2 * (100 * 64 * BF16 + 100 * 128 * FP32)  # 2 input tiles x (h tile, dy)
    assert weight.bytes_read == 100 * 128 * BF16 + 100 * 128 * FP32
    assert weight.bytes_written == 4 * 128 * 64 * FP32 + 2 * 128 * 8
    assert (weight.useful_flops, weight.executed_flops) == (useful, 4 * 2 * 128 * 64 * 64)

    rows = costs["_linear_residual_backward_input_kernel"]
    assert rows.bytes_loaded == 100 * 128 * FP32 + 2 * 128 * 128 * FP32 + 32 * (2 * 4 * 128 * FP32 + 2 * 4 * 8)
    assert rows.bytes_read == 100 * 128 * FP32 + 128 * 128 * FP32 + 32 * (2 * 4 * 128 * FP32 + 2 * 4 * 8)
    assert rows.bytes_written == 100 * 128 * BF16 + 32 * (4 * 128 + 4) * FP32
    assert (rows.useful_flops, rows.executed_flops) == (useful, 2 * 2 * 2 * 64 * 128 * 64)


@pytest.mark.parametrize("costs", [
    cost.layernorm_linear_costs(8320, 384, 1152),
    cost.linear_residual_costs(8320, 384, 384, samples=128),
    cost.layernorm_mlp_costs(8320, 384, 384, second_gelu=True, samples=128),
], ids=["layernorm_linear", "linear_residual", "layernorm_mlp"])
def test_at_the_model_shape_nothing_is_padded_or_recomputed(costs):
    """8,320 rows (128 images of 65 tokens), C = hidden = 384: 130 row tiles of 64 and three
    128-wide chunks, so every executed FLOP is useful; the backward is twice the forward."""
    assert all(c.executed_flops == c.useful_flops for c in costs)
    forward = sum(c.useful_flops for c in costs if c.phase == "forward")
    assert sum(c.useful_flops for c in costs if c.phase == "backward") == 2 * forward
    assert [c.phase for c in costs] == ["forward", "backward", "backward"]


def test_fp32_matmuls_count_their_own_tiles():
    """Exact fp32 plans run 16-row tiles and 16-wide steps: at 100 rows the last tile is padded."""
    costs = costs_by_kernel(cost.linear_residual_costs(100, 128, 128, activation_dtype=torch.float32,
                                                         input_dtype=torch.float32, matmul_dtype=torch.float32))
    forward = costs["_linear_residual_forward_kernel"]
    assert forward.executed_flops == 7 * (128 // 16) * 2 * 16 * 128 * 16  # 7 tiles of 16 rows cover 100
    assert forward.useful_flops == 2 * 100 * 128 * 128
