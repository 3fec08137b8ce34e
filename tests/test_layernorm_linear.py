"""Parity of the fused LayerNorm + linear kernels (kernels/layernorm_linear.py) with the torch
reference, vit.backends.torch_layernorm_linear: in fp32, fp16 and bf16 (through the interpreter
with kernels.interpreter_bf16, the `bf16_interpreter` fixture), and under fp16 and bf16 autocast;
on a GPU also bf16 at the model's shapes; tests/parity.py's rule, NaN-poisoned outputs, fresh
seeds."""
import pytest
import torch

from fused_parity import (DEVICE, INTERPRETED, KERNEL_TEST_MARKS, PARITY_DTYPE_IDS, PARITY_DTYPES, activations, cast,
                          check, layer_norm_parameters, linear_weight, run)
from kernels.layernorm_linear import layernorm_linear
from parity import randn
from vit.backends import torch_layernorm_linear

pytestmark = KERNEL_TEST_MARKS

RESULT_NAMES = ("out", "dx", "dln_weight", "dln_bias", "dweight", "dbias")


def random_problem(shape, out_features, generator):
    n_cols = shape[-1]
    inputs = dict(x=activations(generator, *shape), **layer_norm_parameters(generator, n_cols),
                  weight=linear_weight(generator, out_features, n_cols), bias=randn(generator, out_features, scale=0.2))
    return inputs, randn(generator, *shape[:-1], out_features)


def check_parity(shape, out_features, dtype, generator, eps=1e-5, autocast_dtype=None):
    inputs, dy = random_problem(shape, out_features, generator)
    context = (f"shape={list(shape)} out={out_features} {dtype} eps={eps} autocast={autocast_dtype} "
               f"seed={generator.initial_seed()}")
    return check(layernorm_linear, torch_layernorm_linear, inputs, dy, dtype, context, autocast_dtype, eps=eps)


# (x shape, outputs): one row, odd row counts over several row tiles and row splits, C off the
# chunk sizes (200: two chunks of 128, the second partial; 48 and 64: one), outputs off the tile
# sizes (100, 144) and the QKV layout 3C, a 3-D input. The widest panel (C = 512, four chunks)
# takes half-precision matmuls only, in its own test.
PARITY_CASES = [
    ((1, 96), 288),
    ((67, 200), 100),
    ((3, 17, 48), 144),
    ((130, 64), 192),
]


@pytest.mark.parametrize("dtype", PARITY_DTYPES, ids=PARITY_DTYPE_IDS)
@pytest.mark.parametrize("shape, out_features", PARITY_CASES,
                         ids=[f"{'x'.join(map(str, s))}-o{o}" for s, o in PARITY_CASES])
def test_parity_with_torch(shape, out_features, dtype, generator, bf16_interpreter):
    check_parity(shape, out_features, dtype, generator)


def test_parity_at_the_widest_panel(generator):
    check_parity((5, 512), 48, torch.float16, generator)


def test_eps_is_used(generator):
    check_parity((7, 48), 96, torch.float32, generator, eps=0.5)


@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_autocast_returns_the_autocast_dtype_and_keeps_gradients_in_the_inputs_dtypes(autocast_dtype, generator,
                                                                                       bf16_interpreter):
    got = check_parity((37, 96), 288, torch.float32, generator, autocast_dtype=autocast_dtype)
    assert got["out"].dtype == autocast_dtype  # what F.linear returns under autocast
    assert all(got[name].dtype == torch.float32 for name in RESULT_NAMES[1:])


def test_non_contiguous_inputs(generator):
    inputs, dy = random_problem((6, 5, 48), 144, generator)
    inputs, dy = cast(inputs, torch.float32), dy.to(DEVICE, torch.float32)
    expected = run(layernorm_linear, inputs, dy)
    strided = dict(inputs, x=inputs["x"].transpose(0, 1).contiguous().transpose(0, 1),
                   weight=inputs["weight"].t().contiguous().t(),
                   ln_weight=torch.stack([inputs["ln_weight"]] * 2, dim=1)[:, 0])
    got = run(layernorm_linear, strided, dy.transpose(0, 1).contiguous().transpose(0, 1))
    for name in RESULT_NAMES:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_backward_is_deterministic(generator):
    inputs, dy = random_problem((130, 96), 144, generator)
    inputs, dy = cast(inputs, torch.float16), dy.to(DEVICE, torch.float16)
    first, second = run(layernorm_linear, inputs, dy), run(layernorm_linear, inputs, dy)
    for name in RESULT_NAMES:
        assert torch.equal(first[name], second[name]), f"{name} differs between two identical runs"


def test_empty_input_gives_empty_output_and_zero_gradients(generator):
    inputs, dy = random_problem((0, 48), 96, generator)
    got = run(layernorm_linear, cast(inputs, torch.float32), dy.to(DEVICE, torch.float32))
    assert got["out"].shape == (0, 96) and got["dx"].shape == (0, 48)
    for name in ("ln_weight", "ln_bias", "weight", "bias"):
        assert not got["d" + name].any(), name


def good_arguments():
    return [t.to(DEVICE) for t in (torch.randn(4, 48), torch.ones(48), torch.zeros(48), torch.randn(96, 48),
                                   torch.zeros(96))]


@pytest.mark.parametrize("index, replacement, message", [
    (3, torch.randn(96, 47), r"weight must have shape \[out, C=48\]"),
    (1, torch.ones(47), r"ln_weight must have shape \[48\]"),
    (2, torch.zeros(48, 1), r"ln_bias must have shape \[48\]"),
    (4, torch.zeros(95), r"bias must have shape \[96\]"),
    (0, torch.randn(4, 520), r"weight must have shape"),
])
def test_shape_mismatch_raises_value_error_naming_the_argument(index, replacement, message):
    arguments = good_arguments()
    arguments[index] = replacement.to(DEVICE)
    with pytest.raises(ValueError, match=message):
        layernorm_linear(*arguments)


def test_rows_wider_than_the_panel_are_refused():
    arguments = [t.to(DEVICE, torch.float16) for t in (torch.randn(2, 520), torch.ones(520), torch.zeros(520),
                                                       torch.randn(8, 520), torch.zeros(8))]
    with pytest.raises(ValueError, match="at most 512 features per row with torch.float16 matmuls"):
        layernorm_linear(*arguments)


@pytest.mark.skipif(not INTERPRETED, reason="about the Triton interpreter")
def test_interpreter_refuses_bf16_matmuls():
    with pytest.raises(ValueError, match="bfloat16 matmuls"):
        layernorm_linear(*(t.bfloat16() for t in good_arguments()))


# --------------------------------------------------------------------------------- GPU only

REAL_SHAPE, REAL_OUT = (128, 65, 384), 3 * 384  # the model's QKV projection


@pytest.mark.gpu
def test_gpu_bf16_parity_at_real_shapes(generator):
    check_parity(REAL_SHAPE, REAL_OUT, torch.bfloat16, generator)


@pytest.mark.gpu
def test_gpu_autocast_bf16_at_real_shapes(generator):
    got = check_parity(REAL_SHAPE, REAL_OUT, torch.float32, generator, autocast_dtype=torch.bfloat16)
    assert got["out"].dtype == torch.bfloat16 and got["dx"].dtype == torch.float32


@pytest.mark.gpu
def test_gpu_backward_is_deterministic_at_real_shapes(generator):
    inputs, dy = random_problem(REAL_SHAPE, REAL_OUT, generator)
    inputs, dy = cast(inputs, torch.float32), dy.to(DEVICE, torch.bfloat16)
    runs = [run(layernorm_linear, inputs, dy, autocast_dtype=torch.bfloat16) for _ in range(3)]
    for name in RESULT_NAMES:
        assert all(torch.equal(runs[0][name], other[name]) for other in runs[1:]), f"{name} differs between runs"
