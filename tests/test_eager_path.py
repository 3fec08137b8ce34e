"""The two ways an op runs (kernels/_common.py's Operator): called plainly, one
torch.autograd.Function around the launchers; traced (torch.compile, a dispatch mode, a
functorch transform), the PyTorch operators around the same launchers. Both give the same
outputs and gradients, bit for bit, for every op, in fp32 and under fp16 autocast (fp16 qkv
for attention). That torch.compile sees the operators is tested where each op's compiled
parity is (tests/test_attention_op.py, tests/test_fused_block.py, tests/test_backend_parity.py).

Runs the kernels through Triton's interpreter on the CPU (or on a GPU where there is one).
"""
import pytest
import torch

from bench.counts import DeviceWorkCounter
from kernels import _common
from kernels.attention import attention
from kernels.layernorm_linear import layernorm_linear
from kernels.layernorm_mlp import layernorm_mlp
from kernels.linear_residual import linear_residual
from parity import DEVICE, KERNEL_TEST_MARKS, randn

pytestmark = KERNEL_TEST_MARKS

BATCH, TOKENS, WIDTH, HIDDEN, HEADS = 2, 5, 32, 48, 2  # small: every kernel runs through the interpreter


def _problems(generator) -> dict:
    """Each op's call, as (function, tensor arguments, other arguments); every floating tensor
    but branch_scale is differentiated."""
    def tensor(*shape, scale=1.0):
        return randn(generator, *shape, scale=scale).to(DEVICE, torch.float32)

    scales = tensor(BATCH).abs() + 0.5
    return {
        "layernorm_linear": (layernorm_linear, dict(
            x=tensor(BATCH, TOKENS, WIDTH), ln_weight=tensor(WIDTH) + 1.0, ln_bias=tensor(WIDTH, scale=0.2),
            weight=tensor(3 * WIDTH, WIDTH, scale=WIDTH ** -0.5), bias=tensor(3 * WIDTH, scale=0.2)), {}),
        "linear_residual": (linear_residual, dict(
            h=tensor(BATCH, TOKENS, HIDDEN), weight=tensor(WIDTH, HIDDEN, scale=HIDDEN ** -0.5),
            bias=tensor(WIDTH, scale=0.2), residual=tensor(BATCH, TOKENS, WIDTH)), dict(branch_scale=scales)),
        "layernorm_mlp": (layernorm_mlp, dict(
            x=tensor(BATCH, TOKENS, WIDTH), ln_weight=tensor(WIDTH) + 1.0, ln_bias=tensor(WIDTH, scale=0.2),
            w1=tensor(HIDDEN, WIDTH, scale=WIDTH ** -0.5), b1=tensor(HIDDEN, scale=0.2),
            w2=tensor(WIDTH, HIDDEN, scale=HIDDEN ** -0.5), b2=tensor(WIDTH, scale=0.2)),
            dict(second_gelu=True, branch_scale=scales)),
        "attention": (attention, dict(qkv=tensor(BATCH, TOKENS, 3 * HEADS * 16)), dict(num_heads=HEADS)),
    }


def _run(function, tensors: dict, options: dict, precision: str, grad_out_generator_seed: int):
    """The op's output, its grad_fn's type name and every tensor's gradient, for a fixed upstream gradient."""
    leaves = {name: t.clone().requires_grad_() for name, t in tensors.items()}
    if precision == "fp16" and function is attention:  # attention takes qkv in the autocast dtype
        leaves = {name: t.detach().half().requires_grad_() for name, t in leaves.items()}
    with torch.autocast(DEVICE.type, dtype=torch.float16, enabled=precision == "fp16"):
        out = function(*leaves.values(), **options)
    upstream = torch.Generator().manual_seed(grad_out_generator_seed)
    out.backward(randn(upstream, *out.shape).to(DEVICE, out.dtype))
    return out.detach(), type(out.grad_fn).__name__, {name: leaf.grad for name, leaf in leaves.items()}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("op", ["layernorm_linear", "linear_residual", "layernorm_mlp", "attention"])
def test_the_eager_function_and_the_operators_agree_bit_for_bit(op, precision, generator, monkeypatch):
    function, tensors, options = _problems(generator)[op]
    seed = generator.initial_seed()
    eager = _run(function, tensors, options, precision, seed)
    monkeypatch.setattr(_common, "traced", lambda: True)  # as under torch.compile or a dispatch mode
    operators = _run(function, tensors, options, precision, seed)
    context = f"{op} {precision} seed={seed}"
    assert eager[1] != operators[1], (context, eager[1])  # two ways really ran
    assert torch.isfinite(eager[0]).all(), context
    assert torch.equal(eager[0], operators[0]) and eager[0].dtype == operators[0].dtype, context
    for name, gradient in eager[2].items():
        assert gradient is not None and torch.isfinite(gradient).all(), (context, name)
        assert torch.equal(gradient, operators[2][name]), (context, name)


def test_a_plain_call_runs_the_function_and_a_dispatch_mode_the_operators(generator):
    """Which way a call takes: the autograd.Function plainly, the operators under a torch
    dispatch mode (bench.counts.DeviceWorkCounter is one), forward and backward."""
    function, tensors, options = _problems(generator)["layernorm_linear"]
    leaves = [t.clone().requires_grad_() for t in tensors.values()]
    assert not _common.traced()
    assert type(function(*leaves, **options).grad_fn).__name__ == "layernorm_linearBackward"
    with DeviceWorkCounter() as counter:
        assert _common.traced()
        out = function(*leaves, **options)
        out.sum().backward()
    assert type(out.grad_fn).__name__ != "layernorm_linearBackward"
    assert counter.counts.triton_launches == 3  # the forward and the backward operator ran their kernels
