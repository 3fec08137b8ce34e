"""Parity of the fused LayerNorm+MLP kernels (kernels/layernorm_mlp.py) with the torch reference.

Without a GPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by
conftest.py) on CPU tensors; with one they run on it, and the GPU-only tests add bf16 at the
model's real shapes. The parity tests run in fp32, fp16 and bf16 and under fp16 and bf16
autocast; the interpreter computes bf16 as a GPU does only with kernels.interpreter_bf16
installed (the `bf16_interpreter` fixture), and refuses it otherwise. Accuracy follows tests/parity.py's rule: at most twice PyTorch's own error against
float64 plus one rounding of the result, on fresh random inputs whose seed is in every failure
message, with NaN-poisoned outputs.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fused_parity import (DEVICE, INTERPRETED, KERNEL_TEST_MARKS, PARITY_DTYPE_IDS, PARITY_DTYPES,
                          activations, branch_scales, cast, check, layer_norm_parameters, linear_weight, run)
from kernels.layernorm_mlp import layernorm_mlp
from parity import assert_parity, randn
from vit.backends import torch_layernorm_mlp

REPO = Path(__file__).resolve().parents[1]
pytestmark = KERNEL_TEST_MARKS

PARAMETER_NAMES = ("ln_weight", "ln_bias", "w1", "b1", "w2", "b2")
RESULT_NAMES = ("out", "dx") + tuple("d" + name for name in PARAMETER_NAMES)


def random_problem(shape, hidden, generator):
    """Float64 CPU inputs (x, then the parameters scaled like the model's) and an output gradient."""
    n_cols = shape[-1]
    inputs = dict(x=activations(generator, *shape), **layer_norm_parameters(generator, n_cols),
                  w1=linear_weight(generator, hidden, n_cols), b1=randn(generator, hidden, scale=0.2),
                  w2=linear_weight(generator, n_cols, hidden), b2=randn(generator, n_cols, scale=0.2))
    return inputs, randn(generator, *shape)


def check_parity(shape, hidden, dtype, generator, eps=1e-5, autocast_dtype=None, **options):
    inputs, dy = random_problem(shape, hidden, generator)
    context = (f"shape={list(shape)} hidden={hidden} {dtype} eps={eps} {options} autocast={autocast_dtype} "
               f"seed={generator.initial_seed()}")
    return check(layernorm_mlp, torch_layernorm_mlp, inputs, dy, dtype, context, autocast_dtype, eps=eps, **options)


# ------------------------------------------------------------------------ interpreter parity

# (x shape, hidden size): a single row, odd row counts and several row tiles (partial sums over
# tiles and row splits), C and hidden off the chunk and tile sizes (C = 200 is two 128-wide
# chunks, the second partial; C = 48 one 64-wide chunk; hidden 80 and 100 end in partial
# tiles), a 3-D input, and a hidden size of 1024. The widest panel (C = 512, four chunks) takes
# half-precision matmuls only, in its own test.
# The single row has C = 200 and hidden 384: with one row each gradient element is a single
# product, and at C = 48 the max error over so few elements is noisy enough to pass 2x
# torch's in a few percent of draws (the interpreter's fp32 tl.dot sums sequentially, torch's
# BLAS in blocks).
PARITY_CASES = [
    ((1, 200), 384),
    ((67, 96), 100),
    ((33, 200), 80),
    ((3, 5, 48), 80),
    ((130, 48), 96),
    ((5, 96), 1024),
]


# Each case in each dtype, but hidden 1024 in bf16: bf16 takes fp16's plans (_plan), and that case
# differs from the others only in its number of hidden tiles, at the interpreter's slowest.
PARITY_RUNS = [(shape, hidden, dtype, dtype_id) for shape, hidden in PARITY_CASES
               for dtype, dtype_id in zip(PARITY_DTYPES, PARITY_DTYPE_IDS)
               if not (dtype == torch.bfloat16 and hidden == 1024)]


@pytest.mark.parametrize("shape, hidden, dtype", [(s, h, d) for s, h, d, _ in PARITY_RUNS],
                         ids=[f"{'x'.join(map(str, s))}-h{h}-{i}" for s, h, _, i in PARITY_RUNS])
def test_parity_with_torch(shape, hidden, dtype, generator, bf16_interpreter):
    check_parity(shape, hidden, dtype, generator)


def test_parity_at_the_widest_panel(generator):
    check_parity((3, 512), 48, torch.float16, generator, second_gelu=True)


OPTION_CASES = [((4, 17, 96), 80), ((3, 5, 200), 48)]

# (inputs' dtype, autocast dtype): each dtype, and the model's bf16 case, fp32 activations and
# parameters with bf16 matmuls under autocast.
OPTION_PRECISIONS = [(dtype, None) for dtype in PARITY_DTYPES] + [(torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("dtype, autocast_dtype", OPTION_PRECISIONS, ids=PARITY_DTYPE_IDS + ["autocast-bf16"])
@pytest.mark.parametrize("second_gelu, scaled", [(True, False), (False, True), (True, True)],
                         ids=["second_gelu", "branch_scale", "both"])
@pytest.mark.parametrize("shape, hidden", OPTION_CASES, ids=[f"{'x'.join(map(str, s))}-h{h}" for s, h in OPTION_CASES])
def test_options_parity_with_torch(shape, hidden, second_gelu, scaled, dtype, autocast_dtype, generator,
                                   bf16_interpreter):
    """The second GELU after fc2, and per-sample branch scales (some samples dropped)."""
    options = dict(second_gelu=second_gelu)
    if scaled:
        options["branch_scale"] = branch_scales(generator, shape[0])
    check_parity(shape, hidden, dtype, generator, autocast_dtype=autocast_dtype, **options)


def test_branch_scale_of_ones_is_no_scale_and_zero_drops_the_branch(generator):
    inputs, dy = random_problem((3, 7, 48), 80, generator)
    inputs = cast(inputs, torch.float32)
    plain = layernorm_mlp(*inputs.values())
    ones = layernorm_mlp(*inputs.values(), branch_scale=torch.ones(3, device=DEVICE))
    dropped = layernorm_mlp(*inputs.values(), branch_scale=torch.tensor([1.0, 0.0, 2.0], device=DEVICE))
    assert torch.equal(plain, ones)
    assert torch.equal(dropped[1], inputs["x"][1]) and torch.equal(dropped[0], plain[0])
    torch.testing.assert_close(dropped[2] - inputs["x"][2], 2 * (plain[2] - inputs["x"][2]))


def test_eps_is_used(generator):
    # With eps = 0.5 next to a variance of about 4, a kernel that ignored eps would be far off.
    check_parity((7, 48), 80, torch.float32, generator, eps=0.5)


def test_non_contiguous_inputs(generator):
    inputs, dy = random_problem((6, 5, 48), 80, generator)
    inputs, dy = cast(inputs, torch.float32), dy.to(DEVICE, torch.float32)
    x = inputs.pop("x")
    # x: every other row of a wider tensor, columns a strided slice of a wider last
    # dimension (row stride != C), then a transposed view whose rows are not evenly spaced.
    wide = torch.zeros(12, 5, 64, dtype=torch.float32, device=DEVICE)
    wide[::2, :, 8:56] = x
    x_strided = wide[::2, :, 8:56]
    x_transposed = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not x_strided.is_contiguous() and not x_transposed.is_contiguous()
    # Weights stored transposed, vectors with a stride of 2.
    parameters_strided = {
        name: (p.t().contiguous().t() if p.dim() == 2 else torch.stack([p, p], dim=1)[:, 0])
        for name, p in inputs.items()
    }
    assert not any(p.is_contiguous() for p in parameters_strided.values())
    dy_strided = dy.transpose(0, 1).contiguous().transpose(0, 1)

    exact = run(torch_layernorm_mlp, cast(dict(x=x, **inputs), torch.float64, torch.device("cpu")),
                dy.cpu().double())
    torch_result = run(torch_layernorm_mlp, dict(x=x, **inputs), dy)
    for x_view in (x_strided, x_transposed):
        kernel = run(layernorm_mlp, dict(x=x_view, **parameters_strided), dy_strided)
        assert_parity(kernel, torch_result, exact, torch.float32,
                      f"x strides {x_view.stride()} seed={generator.initial_seed()}")


def test_backward_is_deterministic(generator):
    # Several row tiles and row splits, so that partial sums from different programs meet.
    inputs, dy = random_problem((130, 96), 80, generator)
    inputs, dy = cast(inputs, torch.float16), dy.to(DEVICE, torch.float16)
    scale = branch_scales(generator, 130).to(DEVICE, torch.float16)
    first = run(layernorm_mlp, inputs, dy, second_gelu=True, branch_scale=scale)
    second = run(layernorm_mlp, inputs, dy, second_gelu=True, branch_scale=scale)
    for name in RESULT_NAMES:
        assert torch.equal(first[name], second[name]), f"{name} differs between two identical runs"


def test_empty_input_gives_empty_output_and_zero_gradients(generator):
    inputs, dy = random_problem((0, 48), 80, generator)
    kernel = run(layernorm_mlp, cast(inputs, torch.float32), dy.to(DEVICE, torch.float32))
    assert kernel["out"].shape == (0, 48) and kernel["dx"].shape == (0, 48)
    for name in PARAMETER_NAMES:
        assert torch.equal(kernel["d" + name], torch.zeros_like(inputs[name], device=DEVICE, dtype=torch.float32)), name


@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_autocast_runs_matmuls_in_the_autocast_dtype(autocast_dtype, generator, bf16_interpreter):
    """Under autocast: fp32 in and out, LayerNorm in fp32, matmuls in the autocast dtype --
    what the model does on a GPU with bf16."""
    got = check_parity((37, 96), 80, torch.float32, generator, autocast_dtype=autocast_dtype)
    for name in RESULT_NAMES:
        assert got[name].dtype == torch.float32, f"{name} is {got[name].dtype} under autocast"
    # And the matmuls really ran in fp16: far from the fp32 kernel, not within fp32 rounding.
    inputs, dy = random_problem((37, 96), 80, generator)
    inputs, dy = cast(inputs, torch.float32), dy.to(DEVICE, torch.float32)
    half = run(layernorm_mlp, inputs, dy, autocast_dtype=autocast_dtype)
    full_precision = run(layernorm_mlp, inputs, dy)
    assert (half["out"] - full_precision["out"]).abs().max().item() > 1e-4


# ------------------------------------------------------------------------------ bad inputs


def good_arguments():
    x = torch.randn(4, 48, device=DEVICE)
    parameters = dict(ln_weight=torch.ones(48), ln_bias=torch.zeros(48), w1=torch.randn(80, 48),
                      b1=torch.zeros(80), w2=torch.randn(48, 80), b2=torch.zeros(48))
    return x, {name: p.to(DEVICE) for name, p in parameters.items()}


@pytest.mark.parametrize("name, replacement, message", [
    ("w1", torch.randn(80, 47), r"w1 must have shape \[hidden, C=48\]"),
    ("ln_weight", torch.ones(47), r"ln_weight must have shape \[48\]"),
    ("ln_bias", torch.zeros(48, 1), r"ln_bias must have shape \[48\]"),
    ("b1", torch.zeros(81), r"b1 must have shape \[80\]"),
    ("w2", torch.randn(48, 81), r"w2 must have shape \[48, 80\]"),
    ("w2", torch.randn(80, 48), r"w2 must have shape \[48, 80\]"),
    ("b2", torch.zeros(80), r"b2 must have shape \[48\]"),
])
def test_shape_mismatch_raises_value_error_naming_the_argument(name, replacement, message):
    x, parameters = good_arguments()
    parameters[name] = replacement.to(DEVICE)
    with pytest.raises(ValueError, match=message):
        layernorm_mlp(x, **parameters)


def test_rows_wider_than_the_panel_are_refused():
    arguments = [torch.randn(2, 520), torch.ones(520), torch.zeros(520), torch.randn(8, 520), torch.zeros(8),
                 torch.randn(520, 8), torch.zeros(520)]
    with pytest.raises(ValueError, match="at most 512 features per row with torch.float16 matmuls"):
        layernorm_mlp(*(t.to(DEVICE, torch.float16) for t in arguments))


def test_fp32_matmuls_past_384_features_are_refused():
    arguments = [torch.randn(2, 400), torch.ones(400), torch.zeros(400), torch.randn(8, 400), torch.zeros(8),
                 torch.randn(400, 8), torch.zeros(400)]
    with pytest.raises(ValueError, match="at most 384 features per row with torch.float32 matmuls"):
        layernorm_mlp(*(t.to(DEVICE) for t in arguments))


def test_branch_scale_must_hold_one_scale_per_sample():
    x, parameters = good_arguments()
    with pytest.raises(ValueError, match="branch_scale must have shape"):
        layernorm_mlp(x.view(2, 2, 48), **parameters, branch_scale=torch.ones(4, device=DEVICE))


@pytest.mark.parametrize("name, dtype", [("x", torch.float64), ("w1", torch.int32), ("b2", torch.float64)])
def test_unsupported_dtype_raises_value_error_naming_the_argument(name, dtype):
    x, parameters = good_arguments()
    if name == "x":
        x = x.to(dtype)
    else:
        parameters[name] = parameters[name].to(dtype)
    with pytest.raises(ValueError, match=f"{name} has dtype {dtype}"):
        layernorm_mlp(x, **parameters)


def test_mismatched_devices_raise_value_error_naming_the_argument():
    x, parameters = good_arguments()
    parameters["w2"] = parameters["w2"].to("meta")
    with pytest.raises(ValueError, match="w2 is on meta"):
        layernorm_mlp(x, **parameters)


@pytest.mark.skipif(not INTERPRETED, reason="about the Triton interpreter")
def test_interpreter_refuses_bf16_matmuls():
    x, parameters = good_arguments()
    with pytest.raises(ValueError, match="bfloat16 matmuls"):
        layernorm_mlp(x.bfloat16(), **{name: p.bfloat16() for name, p in parameters.items()})


def test_cpu_tensors_without_the_interpreter_raise_value_error():
    script = textwrap.dedent("""
        import torch
        from kernels.layernorm_mlp import layernorm_mlp
        x = torch.randn(4, 48)
        try:
            layernorm_mlp(x, torch.ones(48), torch.zeros(48), torch.randn(80, 48), torch.zeros(80),
                          torch.randn(48, 80), torch.zeros(48))
        except ValueError as error:
            print(error)
    """)
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    finished = subprocess.run([sys.executable, "-c", script], env=environment, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert "x is on the CPU" in finished.stdout and "TRITON_INTERPRET=1" in finished.stdout, finished.stdout


# --------------------------------------------------------------------------------- GPU only

# The model's shapes: a batch of 128 images of 64 patches plus the class token, dim 384,
# mlp_dim 384.
REAL_SHAPE, REAL_HIDDEN = (128, 65, 384), 384


@pytest.mark.gpu
def test_gpu_bf16_parity_at_real_shapes(generator):
    check_parity(REAL_SHAPE, REAL_HIDDEN, torch.bfloat16, generator)


@pytest.mark.gpu
@pytest.mark.parametrize("second_gelu", [False, True], ids=["one_gelu", "second_gelu"])
def test_gpu_autocast_bf16_at_real_shapes(second_gelu, generator):
    """The model's case: fp32 residual stream and parameters, bf16 matmuls under autocast,
    with stochastic-depth scales."""
    got = check_parity(REAL_SHAPE, REAL_HIDDEN, torch.float32, generator, autocast_dtype=torch.bfloat16,
                       second_gelu=second_gelu, branch_scale=branch_scales(generator, REAL_SHAPE[0]))
    for name in RESULT_NAMES:
        assert got[name].dtype == torch.float32, f"{name} is {got[name].dtype} under autocast"


@pytest.mark.gpu
def test_gpu_backward_is_deterministic_at_real_shapes(generator):
    inputs, dy = random_problem(REAL_SHAPE, REAL_HIDDEN, generator)
    inputs, dy = cast(inputs, torch.float32), dy.to(DEVICE, torch.float32)
    scale = branch_scales(generator, REAL_SHAPE[0]).to(DEVICE, torch.float32)
    runs = [run(layernorm_mlp, inputs, dy, autocast_dtype=torch.bfloat16, branch_scale=scale) for _ in range(3)]
    for name in RESULT_NAMES:
        assert all(torch.equal(runs[0][name], other[name]) for other in runs[1:]), f"{name} differs between runs"
