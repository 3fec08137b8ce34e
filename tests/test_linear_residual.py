"""Parity of the fused linear + residual kernels (kernels/linear_residual.py) with the torch
reference, vit.backends.torch_linear_residual, with and without per-sample branch scales: in fp32,
fp16 and bf16 (through the interpreter with kernels.interpreter_bf16, the `bf16_interpreter`
fixture), and under fp16 and bf16 autocast; on a GPU also bf16 at the model's shapes;
tests/parity.py's rule, NaN-poisoned outputs, fresh seeds."""
import pytest
import torch

from fused_parity import (DEVICE, INTERPRETED, KERNEL_TEST_MARKS, PARITY_DTYPE_IDS, PARITY_DTYPES, branch_scales, cast,
                          check, linear_weight, run)
from kernels.linear_residual import linear_residual
from parity import randn
from vit.backends import torch_linear_residual

pytestmark = KERNEL_TEST_MARKS

RESULT_NAMES = ("out", "dh", "dweight", "dbias", "dresidual")


def random_problem(leading, in_features, out_features, generator):
    inputs = dict(h=randn(generator, *leading, in_features), weight=linear_weight(generator, out_features, in_features),
                  bias=randn(generator, out_features, scale=0.2),
                  residual=randn(generator, *leading, out_features, scale=2.0, shift=0.5))
    return inputs, randn(generator, *leading, out_features)


def check_parity(leading, in_features, out_features, dtype, generator, scaled=False, autocast_dtype=None):
    inputs, dy = random_problem(leading, in_features, out_features, generator)
    options = dict(branch_scale=branch_scales(generator, leading[0])) if scaled else {}
    context = (f"rows={list(leading)} in={in_features} out={out_features} {dtype} scaled={scaled} "
               f"autocast={autocast_dtype} seed={generator.initial_seed()}")
    return check(linear_residual, torch_linear_residual, inputs, dy, dtype, context, autocast_dtype, **options)


# (leading dimensions, C_in, C_out): one row, odd row counts over several row tiles and splits,
# features off the chunk sizes (200, 48, 96 -> 128) and unequal in and out. The widest panel
# (512 features, four chunks) takes half-precision matmuls only, in its own test.
PARITY_CASES = [
    ((1,), 96, 96),
    ((67,), 200, 96),
    ((3, 17), 48, 80),
    ((130,), 64, 200),
]


# Branch scales on every case with more than one sample.
SCALED_CASES = [(case, scaled) for case in PARITY_CASES for scaled in (False, True) if not scaled or case[0][0] > 1]


@pytest.mark.parametrize("dtype", PARITY_DTYPES, ids=PARITY_DTYPE_IDS)
@pytest.mark.parametrize("case, scaled", SCALED_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{i}to{o}-{'scaled' if scaled else 'plain'}"
                              for (s, i, o), scaled in SCALED_CASES])
def test_parity_with_torch(case, scaled, dtype, generator, bf16_interpreter):
    leading, in_features, out_features = case
    check_parity(leading, in_features, out_features, dtype, generator, scaled)


def test_parity_at_the_widest_panel(generator):
    check_parity((5,), 512, 512, torch.float16, generator, scaled=True)


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_autocast_keeps_the_residual_stream_in_its_dtype(autocast_dtype, scaled, generator, bf16_interpreter):
    """The model's case: h from the attention in the autocast dtype, residual and parameters fp32."""
    inputs, dy = random_problem((3, 17), 96, 96, generator)
    inputs = dict(inputs, h=inputs["h"].to(autocast_dtype).double())
    options = dict(branch_scale=branch_scales(generator, 3)) if scaled else {}
    context = f"autocast {autocast_dtype} scaled={scaled} seed={generator.initial_seed()}"
    inputs32 = cast(inputs, torch.float32)
    inputs32["h"] = inputs32["h"].to(autocast_dtype)
    options32 = {name: scale.to(DEVICE, torch.float32) for name, scale in options.items()}
    got = run(linear_residual, inputs32, dy.to(DEVICE, torch.float32), autocast_dtype, **options32)
    expected = run(torch_linear_residual, inputs32, dy.to(DEVICE, torch.float32), autocast_dtype, **options32)
    for name in RESULT_NAMES:
        assert got[name].dtype == expected[name].dtype, f"{context}: {name} is {got[name].dtype}"
    assert got["out"].dtype == torch.float32 and got["dh"].dtype == autocast_dtype
    check(linear_residual, torch_linear_residual, inputs, dy, torch.float32, context, autocast_dtype, **options)


def test_branch_scale_of_zero_passes_the_residual_through(generator):
    inputs, dy = random_problem((3, 5), 48, 48, generator)
    inputs = cast(inputs, torch.float32)
    scale = torch.tensor([0.0, 1.0, 2.0], device=DEVICE)
    out = linear_residual(*inputs.values(), branch_scale=scale)
    plain = linear_residual(*inputs.values())
    assert torch.equal(out[0], inputs["residual"][0]) and torch.equal(out[1], plain[1])
    torch.testing.assert_close(out[2] - inputs["residual"][2], 2 * (plain[2] - inputs["residual"][2]))


def test_backward_is_deterministic(generator):
    inputs, dy = random_problem((130,), 96, 96, generator)
    inputs, dy = cast(inputs, torch.float16), dy.to(DEVICE, torch.float16)
    scale = branch_scales(generator, 130).to(DEVICE, torch.float16)
    first, second = (run(linear_residual, inputs, dy, branch_scale=scale) for _ in range(2))
    for name in RESULT_NAMES:
        assert torch.equal(first[name], second[name]), f"{name} differs between two identical runs"


def test_empty_input_gives_empty_output_and_zero_gradients(generator):
    inputs, dy = random_problem((0,), 48, 96, generator)
    got = run(linear_residual, cast(inputs, torch.float32), dy.to(DEVICE, torch.float32))
    assert got["out"].shape == (0, 96) and got["dh"].shape == (0, 48)
    assert not got["dweight"].any() and not got["dbias"].any()


def good_arguments():
    return [t.to(DEVICE) for t in (torch.randn(4, 48), torch.randn(96, 48), torch.zeros(96), torch.randn(4, 96))]


@pytest.mark.parametrize("index, replacement, message", [
    (1, torch.randn(96, 47), r"weight must have shape \[C_out, C_in=48\]"),
    (2, torch.zeros(95), r"bias must have shape \[96\]"),
    (3, torch.randn(4, 95), r"residual must have shape \[4, 96\]"),
    (3, torch.randn(5, 96), r"residual must have shape \[4, 96\]"),
])
def test_shape_mismatch_raises_value_error_naming_the_argument(index, replacement, message):
    arguments = good_arguments()
    arguments[index] = replacement.to(DEVICE)
    with pytest.raises(ValueError, match=message):
        linear_residual(*arguments)


def test_branch_scale_must_hold_one_scale_per_sample():
    h, weight, bias, residual = good_arguments()
    with pytest.raises(ValueError, match="branch_scale must have shape"):
        linear_residual(h.view(2, 2, 48), weight, bias, residual.view(2, 2, 96),
                        branch_scale=torch.ones(4, device=DEVICE))


@pytest.mark.skipif(not INTERPRETED, reason="about the Triton interpreter")
def test_interpreter_refuses_bf16_matmuls():
    with pytest.raises(ValueError, match="bfloat16 matmuls"):
        linear_residual(*(t.bfloat16() for t in good_arguments()))


# --------------------------------------------------------------------------------- GPU only

REAL_ROWS, REAL_DIM = (128, 65), 384  # the model's attention output projection


@pytest.mark.gpu
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "branch_scale"])
def test_gpu_bf16_parity_at_real_shapes(scaled, generator):
    check_parity(REAL_ROWS, REAL_DIM, REAL_DIM, torch.bfloat16, generator, scaled)


@pytest.mark.gpu
def test_gpu_backward_is_deterministic_at_real_shapes(generator):
    inputs, dy = random_problem(REAL_ROWS, REAL_DIM, REAL_DIM, generator)
    inputs, dy = cast(inputs, torch.float32), dy.to(DEVICE, torch.float32)
    inputs["h"] = inputs["h"].bfloat16()
    scale = branch_scales(generator, REAL_ROWS[0]).to(DEVICE, torch.float32)
    runs = [run(linear_residual, inputs, dy, autocast_dtype=torch.bfloat16, branch_scale=scale) for _ in range(3)]
    for name in RESULT_NAMES:
        assert all(torch.equal(runs[0][name], other[name]) for other in runs[1:]), f"{name} differs between runs"
