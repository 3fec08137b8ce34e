"""kernels.attention as PyTorch operators (torch.ops.vit_kernels.attention / attention_backward):
torch.library's own checks pass, torch.compile(fullgraph=True) traces attention() with no
graph break and gives eager's output and gradient, the Python launch planning never runs
inside a trace, and one call launches one kernel each way at the model's sequence length.

Runs the kernels through Triton's interpreter on the CPU (or on a GPU where there is one).
"""
import shutil

import pytest
import torch

from bench.counts import DeviceWorkCounter
from kernels import _common
from kernels import attention as attention_module
from kernels.attention import attention
from parity import DEVICE, KERNEL_TEST_MARKS, randn

pytestmark = KERNEL_TEST_MARKS

# Inductor compiles the code around the operators to C++ on the CPU.
HAS_CXX_COMPILER = shutil.which("g++") is not None or shutil.which("c++") is not None


def _problem(generator, batch=2, seq_len=17, num_heads=2, head_dim=16, dtype=torch.float16):
    qkv = randn(generator, batch, seq_len, 3 * num_heads * head_dim).to(DEVICE, dtype)
    grad_out = randn(generator, batch, seq_len, num_heads * head_dim).to(DEVICE, dtype)
    return qkv, grad_out


def test_operators_pass_torch_library_checks(generator):
    """Schema, fake (meta) implementation against the real one, autograd registration, and
    AOT dispatch with dynamic shapes, for both operators."""
    qkv, grad_out = _problem(generator)
    out, lse = attention_module.attention_forward_op(qkv, 2, 0.25)
    torch.library.opcheck(attention_module.attention_forward_op, (qkv.requires_grad_(), 2, 0.25))
    torch.library.opcheck(attention_module.attention_backward_op, (qkv.detach(), out, lse, grad_out, 2, 0.25))


def _scaled_attention(qkv):
    # Ops before and after, so that the compiled graph holds more than the operator; both
    # exact (powers of two), so that compiled and eager must agree bit for bit.
    return attention(qkv * 2.0, 2).float() * 0.5


@pytest.mark.parametrize("backend", [
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.skipif(not HAS_CXX_COMPILER, reason="inductor needs a C++ compiler "
                                                                                  "on the CPU")),
])
def test_compiled_fullgraph_matches_eager(backend, generator):
    from torch._dynamo.utils import counters

    qkv, grad_out = _problem(generator)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(_scaled_attention, fullgraph=True, backend=backend)
    results = {}
    for name, fn in (("eager", _scaled_attention), ("compiled", compiled)):
        leaf = qkv.clone().requires_grad_()
        out = fn(leaf)
        out.backward(grad_out.float())
        results[name] = (out.detach(), leaf.grad)
    assert not counters["graph_break"], dict(counters["graph_break"])
    context = f"backend={backend} seed={generator.initial_seed()}"
    assert torch.equal(results["compiled"][0], results["eager"][0]), context
    assert torch.isfinite(results["compiled"][1]).all(), context
    assert torch.equal(results["compiled"][1], results["eager"][1]), context


def test_launch_planning_never_runs_inside_a_trace(monkeypatch, generator):
    """Under torch.compile the operators' fake implementations give the shapes; the planner
    runs only when the kernels really launch (with real tensors, outside any trace)."""
    from torch._guards import detect_fake_mode

    calls = []
    plan = attention_module.plan_launches

    def recording_plan(*args):
        calls.append({"compiling": torch.compiler.is_compiling(), "fake": detect_fake_mode() is not None})
        return plan(*args)

    monkeypatch.setattr(attention_module, "plan_launches", recording_plan)
    qkv, grad_out = _problem(generator)
    torch._dynamo.reset()
    leaf = qkv.clone().requires_grad_()
    torch.compile(_scaled_attention, fullgraph=True, backend="aot_eager")(leaf).backward(grad_out.float())
    assert len(calls) == 2, calls  # one forward and one backward launch
    assert not any(call["compiling"] or call["fake"] for call in calls), calls


@pytest.mark.parametrize("seq_len, dtype, kernels", [
    (65, torch.float16, ({"_attention_whole_forward_kernel": 1}, {"_attention_whole_backward_kernel": 1})),
    (129, torch.float16, ({"_attention_forward_kernel": 1},
                          {"_attention_backward_dq_kernel": 1, "_attention_backward_dkdv_kernel": 1})),
], ids=["model-length", "streaming"])
def test_launches_per_call(seq_len, dtype, kernels, generator, monkeypatch):
    """Up to 128 tokens one launch forward and one backward, nothing else; the operators
    themselves are not counted as aten launches (bench.counts). Counted as training runs them:
    without the tests' NaN fills of the outputs."""
    monkeypatch.setattr(_common, "POISON_OUTPUTS", False)
    qkv, grad_out = _problem(generator, seq_len=seq_len, dtype=dtype)
    leaf = qkv.clone().requires_grad_()
    with DeviceWorkCounter() as forward:
        out = attention(leaf, 2)
    with DeviceWorkCounter() as backward:
        out.backward(grad_out)
    for counter, expected in zip((forward, backward), kernels):
        assert dict(counter.counts.triton_by_kernel) == expected
        assert counter.counts.aten_launches == 0, counter.counts.by_op
        assert counter.counts.syncs == 0
