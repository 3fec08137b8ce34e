"""The fused attention kernels (kernels/attention.py) against vit.backends.torch_attention.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET=1 before anything imports Triton). The parity tests run in fp32, fp16
and bf16; the interpreter computes bf16 as a GPU does only with kernels.interpreter_bf16
installed (the `bf16_interpreter` fixture), and refuses it otherwise. On a GPU, bf16 is also
checked at the model's shapes. Accuracy follows tests/parity.py's rule: at most twice PyTorch's own
error against float64, on fresh random inputs whose seed is in every failure message, with
NaN-poisoned outputs.
"""
import math

import pytest
import torch

from kernels import attention as attention_module
from kernels.attention import attention
from parity import DEVICE, INTERPRETED, KERNEL_TEST_MARKS, PARITY_DTYPE_IDS, PARITY_DTYPES, assert_parity, randn
from vit.backends import torch_attention

pytestmark = KERNEL_TEST_MARKS


def _forward_backward(fn, qkv, grad_out, num_heads, scale=None):
    """fn's output and the gradient it sends back to qkv."""
    qkv = qkv.detach().clone().requires_grad_()
    out = fn(qkv, num_heads, scale)
    out.backward(grad_out)
    return out.detach(), qkv.grad


def _random_problem(generator, batch, seq_len, num_heads, head_dim, dtype, device=DEVICE):
    """qkv and the output gradient, rounded to dtype (so every computation sees the same values)."""
    model_dim = num_heads * head_dim
    qkv = randn(generator, batch, seq_len, 3 * model_dim).to(device, dtype)
    grad_out = randn(generator, batch, seq_len, model_dim).to(device, dtype)
    return qkv, grad_out


def _check_parity(generator, batch, seq_len, num_heads, head_dim, dtype, scale=None):
    qkv, grad_out = _random_problem(generator, batch, seq_len, num_heads, head_dim, dtype)
    results = {}
    for name, fn, inputs in (("exact", torch_attention, (qkv.double(), grad_out.double())),
                             ("torch", torch_attention, (qkv, grad_out)), ("kernel", attention, (qkv, grad_out))):
        out, grad = _forward_backward(fn, *inputs, num_heads, scale)
        results[name] = {"output": out, "qkv gradient": grad}
    assert results["kernel"]["output"].dtype == dtype and results["kernel"]["qkv gradient"].dtype == dtype
    assert_parity(results["kernel"], results["torch"], results["exact"], dtype,
                  f"B={batch} N={seq_len} heads={num_heads} head_dim={head_dim} {dtype} scale={scale} "
                  f"seed={generator.initial_seed()}")


# (batch, seq_len, num_heads, head_dim). C = num_heads * head_dim is rarely a power of two.
# Sequence lengths are odd: the last tile of every plan is partly masked. fp16 takes the
# whole-sequence plan up to 128 tokens (fp32 up to 16), with the parts noted.
PARITY_SHAPES = [
    (1, 1, 3, 16),     # one token: the softmax is exactly 1, C = 48
    (3, 17, 3, 16),    # odd batch, keys masked inside one tile (a 32-token lead)
    (1, 65, 12, 32),   # the model's attention (C = 384) at batch 1: 64 + a 16-token tail
    (3, 65, 2, 48),    # head_dim 48, padded to 64 columns
    (2, 79, 4, 16),    # 64 + 16 again, the backward's queries in 32-row tiles (head_dim 16)
    (1, 127, 2, 16),   # one 128-token part, the backward's queries in 64-row tiles
    (1, 129, 2, 64),   # past the whole-sequence plan: streamed forward, dq and dk/dv backward
    (1, 257, 1, 32),   # several key and query blocks per program
]


@pytest.mark.parametrize("dtype", PARITY_DTYPES, ids=PARITY_DTYPE_IDS)
@pytest.mark.parametrize("batch, seq_len, num_heads, head_dim", PARITY_SHAPES,
                         ids=[f"B{b}-N{n}-H{h}-D{d}" for b, n, h, d in PARITY_SHAPES])
def test_matches_reference(batch, seq_len, num_heads, head_dim, dtype, generator, bf16_interpreter):
    _check_parity(generator, batch, seq_len, num_heads, head_dim, dtype)


@pytest.mark.parametrize("scale", [0.3, -0.05])
def test_scale_argument(scale, generator):
    _check_parity(generator, 2, 17, 2, 32, torch.float32, scale=scale)


def test_default_scale_is_inverse_sqrt_head_dim(generator):
    qkv, _ = _random_problem(generator, 1, 9, 2, 16, torch.float32)
    assert torch.equal(attention(qkv, 2), attention(qkv, 2, scale=16 ** -0.5))
    assert not torch.equal(attention(qkv, 2), attention(qkv, 2, scale=0.5))


@pytest.mark.parametrize("seq_len", [65, 129], ids=["whole-sequence", "streaming"])
def test_backward_is_deterministic(seq_len, generator):
    qkv, grad_out = _random_problem(generator, 3, seq_len, 2, 32, torch.float16)
    out_first, grad_first = _forward_backward(attention, qkv, grad_out, 2)
    out_second, grad_second = _forward_backward(attention, qkv, grad_out, 2)
    assert torch.isfinite(grad_first).all()
    assert torch.equal(out_first, out_second)
    assert torch.equal(grad_first, grad_second)


def _non_contiguous_views(batch, seq_len, width, dtype):
    """Views of shape [batch, seq_len, width] that are not contiguous, with their names."""
    wide = torch.randn(batch, seq_len, width + 24, device=DEVICE).to(dtype)
    sequence_major = torch.randn(seq_len, batch, width, device=DEVICE).to(dtype)
    interleaved = torch.randn(batch, seq_len, width, 2, device=DEVICE).to(dtype)
    return {
        "column-slice": wide[:, :, 8:8 + width],       # rows longer than 3C, offset start
        "batch-transposed": sequence_major.transpose(0, 1),
        "strided-columns": interleaved[..., 0],        # last dim not unit-stride
    }


# fp16: the interpreter runs its 64-token tiles faster than fp32's 32-token ones, and
# N = 129 exercises the streaming backward. Contiguous inputs are checked against the
# reference above, so bit-equality with them is the whole check here.
@pytest.mark.parametrize("layout", ["column-slice", "batch-transposed", "strided-columns"])
@pytest.mark.parametrize("seq_len", [17, 129])
def test_non_contiguous_qkv(layout, seq_len):
    num_heads, head_dim = 2, 16
    model_dim = num_heads * head_dim
    qkv = _non_contiguous_views(2, seq_len, 3 * model_dim, torch.float16)[layout]
    assert not qkv.is_contiguous()
    grad_out = torch.randn(2, seq_len, model_dim, device=DEVICE).to(torch.float16)
    out, grad = _forward_backward(attention, qkv, grad_out, num_heads)
    out_contiguous, grad_contiguous = _forward_backward(attention, qkv.contiguous(), grad_out, num_heads)
    assert torch.isfinite(grad).all()
    # Same numbers in the same order, only read through other strides.
    assert torch.equal(out, out_contiguous)
    assert torch.equal(grad, grad_contiguous)


@pytest.mark.parametrize("layout", ["column-slice", "batch-transposed", "strided-columns"])
@pytest.mark.parametrize("seq_len", [17, 129])
def test_non_contiguous_output_gradient(layout, seq_len, generator):
    num_heads, head_dim = 2, 16
    qkv, _ = _random_problem(generator, 2, seq_len, num_heads, head_dim, torch.float16)
    grad_out = _non_contiguous_views(2, seq_len, num_heads * head_dim, torch.float16)[layout]
    assert not grad_out.is_contiguous()
    _, grad = _forward_backward(attention, qkv, grad_out, num_heads)
    _, grad_contiguous = _forward_backward(attention, qkv, grad_out.contiguous(), num_heads)
    assert torch.isfinite(grad).all()
    assert torch.equal(grad, grad_contiguous)


def test_broadcast_output_gradient(generator):
    # out.sum().backward() hands backward an expanded tensor with all strides 0.
    qkv, _ = _random_problem(generator, 2, 17, 3, 16, torch.float32)
    qkv_kernel = qkv.clone().requires_grad_()
    attention(qkv_kernel, 3).sum().backward()
    qkv_reference = qkv.double().requires_grad_()
    torch_attention(qkv_reference, 3).sum().backward()
    torch.testing.assert_close(qkv_kernel.grad.double(), qkv_reference.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_output_dtype_follows_qkv_under_autocast(dtype, generator):
    autocast_dtype = torch.bfloat16 if DEVICE.type == "cpu" else torch.float16
    qkv, grad_out = _random_problem(generator, 1, 17, 2, 16, dtype)
    expected_out, expected_grad = _forward_backward(attention, qkv, grad_out, 2)
    with torch.autocast(DEVICE.type, dtype=autocast_dtype):
        out, grad = _forward_backward(attention, qkv, grad_out, 2)
    assert out.dtype == dtype and grad.dtype == dtype
    assert torch.equal(out, expected_out)
    assert torch.equal(grad, expected_grad)


def test_empty_batch():
    qkv = torch.randn(0, 17, 3 * 48, device=DEVICE, requires_grad=True)
    out = attention(qkv, 3)
    assert out.shape == (0, 17, 48)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape


@pytest.mark.parametrize("shape, num_heads, match", [
    ((17, 3 * 48), 3, r"qkv must have shape \[B, N, 3\*C\]"),
    ((1, 2, 17, 3 * 48), 3, r"qkv must have shape \[B, N, 3\*C\]"),
    ((1, 17, 100), 3, "not divisible by 3 \\* num_heads"),
    ((1, 17, 3 * 8), 1, "head_dim 8"),        # too narrow for tl.dot
    ((1, 17, 3 * 24), 1, "head_dim 24"),      # not one of 16, 32, 48, 64
    ((1, 17, 3 * 128), 1, "head_dim 128"),    # too wide
    ((1, 17, 3 * 48), 0, "num_heads"),
    ((1, 17, 3 * 48), -3, "num_heads"),
])
def test_bad_shapes_raise_value_error(shape, num_heads, match):
    with pytest.raises(ValueError, match=match):
        attention(torch.randn(shape, device=DEVICE), num_heads)


@pytest.mark.parametrize("num_heads", [3.0, True, "3"])
def test_num_heads_must_be_an_int(num_heads):
    with pytest.raises(ValueError, match="num_heads"):
        attention(torch.randn(1, 17, 3 * 48, device=DEVICE), num_heads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.float8_e4m3fn])
def test_bad_dtype_raises_value_error(dtype):
    with pytest.raises(ValueError, match="qkv has dtype"):
        attention(torch.zeros(1, 17, 3 * 48, device=DEVICE).to(dtype), 3)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.5", torch.tensor(0.5)])
def test_bad_scale_raises_value_error(scale):
    with pytest.raises(ValueError, match="scale"):
        attention(torch.randn(1, 17, 3 * 48, device=DEVICE), 3, scale)


def test_non_tensor_raises_value_error():
    with pytest.raises(ValueError, match="qkv must be a torch.Tensor"):
        attention([[0.0] * 144], 3)


def test_cpu_tensor_without_interpreter_raises_value_error(monkeypatch):
    # As if TRITON_INTERPRET had not been set when the kernels were defined.
    monkeypatch.setattr(attention_module, "_INTERPRETED", False)
    with pytest.raises(ValueError, match="qkv is on the CPU"):
        attention(torch.randn(1, 17, 3 * 48), 3)


def test_unsupported_device_raises_value_error():
    with pytest.raises(ValueError, match="qkv is on meta"):
        attention(torch.randn(1, 17, 3 * 48, device="meta"), 3)


@pytest.mark.skipif(not INTERPRETED, reason="about the Triton interpreter")
def test_interpreter_refuses_bf16():
    # The interpreter's bf16 dots return garbage (max error ~1e9) without an error.
    with pytest.raises(ValueError, match="bfloat16 matmuls, which the Triton interpreter computes wrongly"):
        attention(torch.randn(1, 17, 3 * 48, device=DEVICE).bfloat16(), 3)


# ---------------------------------------------------------------------- GPU only

# The model's attention: batch 128, 65 tokens (64 patches + class token), C = 384 in
# 12 heads of 32; the other whole-sequence plans (64 + 16 tokens on two warpgroups at head_dim
# 64, one 128-token part); and a longer sequence for the streaming backward.
GPU_SHAPES = [(128, 65, 12, 32), (32, 79, 6, 64), (16, 101, 4, 48), (8, 257, 6, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("batch, seq_len, num_heads, head_dim", GPU_SHAPES,
                         ids=[f"B{b}-N{n}-H{h}-D{d}" for b, n, h, d in GPU_SHAPES])
def test_bf16_matches_reference_on_gpu(batch, seq_len, num_heads, head_dim, generator):
    _check_parity(generator, batch, seq_len, num_heads, head_dim, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("batch, seq_len, num_heads, head_dim", GPU_SHAPES,
                         ids=[f"B{b}-N{n}-H{h}-D{d}" for b, n, h, d in GPU_SHAPES])
def test_bf16_backward_is_deterministic_on_gpu(batch, seq_len, num_heads, head_dim, generator):
    qkv, grad_out = _random_problem(generator, batch, seq_len, num_heads, head_dim, torch.bfloat16)
    _, grad_first = _forward_backward(attention, qkv, grad_out, num_heads)
    for _ in range(3):
        _, grad_again = _forward_backward(attention, qkv, grad_out, num_heads)
        assert torch.equal(grad_first, grad_again)


@pytest.mark.gpu
def test_bf16_under_autocast_on_gpu():
    # How the model calls it: the QKV projection's output arrives in bf16 already.
    x = torch.randn(4, 65, 384, device="cuda")
    projection = torch.nn.Linear(384, 3 * 384).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        qkv = projection(x)
        out = attention(qkv, 12)
    assert qkv.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    reference = torch_attention(qkv.double(), 12)
    assert math.isfinite(out.float().abs().max().item())
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=2e-2)
