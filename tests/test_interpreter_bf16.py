"""kernels.interpreter_bf16 against torch: bf16 dots on exact float32 values, float32 -> bf16
rounding to nearest even with NaN and infinities kept, casts to and from other types through
float32, the guard on arithmetic applied to raw bf16 values, the ops' refusal while the shim is
not installed, and a loud failure when the Triton internals it patches move."""
import numpy as np
import pytest
import torch

from kernels import interpreter_bf16
from kernels.interpreter_bf16 import BFloat16InterpreterError, bf16_bits_to_float32, float32_to_bf16_bits
from parity import INTERPRETED, KERNEL_TEST_MARKS

pytestmark = KERNEL_TEST_MARKS + [pytest.mark.skipif(not INTERPRETED, reason="about Triton's interpreter")]

if INTERPRETED:
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    @triton.jit
    def dot_kernel(a_ptr, b_ptr, out_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
        rows, inner, columns = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
        a = tl.load(a_ptr + rows[:, None] * K + inner[None, :])
        b = tl.load(b_ptr + inner[:, None] * N + columns[None, :])
        tl.store(out_ptr + rows[:, None] * N + columns[None, :], tl.dot(a, b))

    @triton.jit
    def cast_kernel(source_ptr, target_ptr, SIZE: tl.constexpr):
        offsets = tl.arange(0, SIZE)
        tl.store(target_ptr + offsets, tl.load(source_ptr + offsets).to(target_ptr.dtype.element_ty))

    @triton.jit
    def select_kernel(condition_ptr, x_ptr, y_ptr, out_ptr, SIZE: tl.constexpr):
        offsets = tl.arange(0, SIZE)
        condition = tl.load(condition_ptr + offsets) > 0
        tl.store(out_ptr + offsets, tl.where(condition, tl.load(x_ptr + offsets), tl.load(y_ptr + offsets)))

    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def raw_arithmetic_kernel(x_ptr, out_ptr, OPERATION: tl.constexpr):
        offsets = tl.arange(0, 16)
        x = tl.load(x_ptr + offsets)
        if OPERATION == "add":
            tl.store(out_ptr + offsets, x + x)
        elif OPERATION == "multiply":
            tl.store(out_ptr + offsets, x * x)
        elif OPERATION == "negate":
            tl.store(out_ptr + offsets, -x)
        elif OPERATION == "compare":
            tl.store(out_ptr + offsets, tl.where(x < x, x, x))
        elif OPERATION == "subtract":
            tl.store(out_ptr + offsets, x - x)
        elif OPERATION == "sum":
            tl.store(out_ptr, tl.sum(x, 0))
        elif OPERATION == "reduce":
            tl.store(out_ptr, tl.reduce(x, 0, _add))

    @triton.jit
    def promoted_kernel(x_ptr, y_ptr, max_ptr, quotient_ptr, maximum_ptr):
        """Operations Triton's semantics run in float32 on bf16 inputs."""
        offsets = tl.arange(0, 16)
        x, y = tl.load(x_ptr + offsets), tl.load(y_ptr + offsets)
        tl.store(max_ptr, tl.max(x, 0))
        tl.store(quotient_ptr + offsets, x / y)
        tl.store(maximum_ptr + offsets, tl.maximum(x, y))


@pytest.fixture
def shim():
    interpreter_bf16.install()
    yield
    interpreter_bf16.uninstall()


def bf16_of_bits(bits) -> torch.Tensor:
    return torch.tensor(np.asarray(bits, dtype=np.uint16).view(np.int16)).view(torch.bfloat16)


def bits_of(tensor: torch.Tensor) -> np.ndarray:
    return tensor.view(torch.int16).numpy().view(np.uint16)


def float32_of_bits(bits) -> torch.Tensor:
    return torch.tensor(np.asarray(bits, dtype=np.uint32).view(np.float32))


# float32 bit patterns at the edges of bf16 rounding: halfway cases with an even and an odd kept
# half (ties go to the even one), just below and above halfway, the carry into the exponent, the
# largest float32 (rounds to infinity), bf16's largest finite value, subnormals, signed zeros,
# infinities and NaNs (quiet, signalling, negative).
ADVERSARIAL_FLOAT32_BITS = [
    0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000, 0x3F807FFF, 0x3F808001, 0x3FFF8000, 0x3F7FFFFF,
    0x7F7FFFFF, 0x7F7F7FFF, 0x7F7F8000, 0x00008000, 0x00018000, 0x00000001, 0x807FFFFF, 0x00000000,
    0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFC12345, 0x7FFFFFFF, 0x3EAAAAAB,
]


def adversarial_float32() -> torch.Tensor:
    return float32_of_bits(ADVERSARIAL_FLOAT32_BITS)


# --------------------------------------------------------------------------- the conversions

def test_ties_round_to_even_and_nan_and_infinities_are_kept():
    rounded = float32_to_bf16_bits(np.array(ADVERSARIAL_FLOAT32_BITS, dtype=np.uint32).view(np.float32))
    # 1 + 2^-8 is halfway between 1 and 1 + 2^-7: the even one, 1. 1 + 3 * 2^-8: up to 1 + 2^-6.
    assert list(rounded[:4]) == [0x3F80, 0x3F82, 0xBF80, 0xBF82]
    assert list(rounded[4:8]) == [0x3F80, 0x3F81, 0x4000, 0x3F80]  # below, above halfway; carries
    assert rounded[8] == 0x7F80 and rounded[9] == 0x7F7F and rounded[10] == 0x7F80  # overflow to infinity
    assert list(rounded[17:19]) == [0x7F80, 0xFF80]
    assert all(np.isnan(bf16_bits_to_float32(rounded[19:23])))
    assert rounded[21] >> 15 == 1  # a negative NaN keeps its sign


def test_float32_to_bf16_matches_torch_everywhere(generator):
    spread = torch.randn(4096, generator=generator) * torch.exp2(torch.randint(-130, 128, (4096,), generator=generator))
    random_bits = torch.randint(0, 2**31, (4096,), generator=generator, dtype=torch.int64)
    values = torch.cat([adversarial_float32(), spread.float(),
                        float32_of_bits(random_bits.numpy().astype(np.uint32) * 2 + 1)])
    ours = float32_to_bf16_bits(values.numpy())
    theirs = bits_of(values.to(torch.bfloat16))
    finite = ~np.isnan(values.numpy())
    assert np.array_equal(ours[finite], theirs[finite]), f"seed={generator.initial_seed()}"
    assert np.isnan(bf16_bits_to_float32(ours[~finite])).all()


def test_bf16_to_float32_is_exact():
    every_bf16 = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    expected = bf16_of_bits(every_bf16).float().numpy()
    ours = bf16_bits_to_float32(every_bf16)
    same = (ours.view(np.uint32) == expected.view(np.uint32)) | (np.isnan(ours) & np.isnan(expected))
    assert same.all()


# ---------------------------------------------------------------------------------- tl.dot

def run_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = torch.full((a.shape[0], b.shape[1]), float("nan"))
    dot_kernel[(1,)](a.contiguous(), b.contiguous(), out, a.shape[0], a.shape[1], b.shape[1])
    return out


def test_dot_of_single_products_is_exact_at_large_and_small_exponents(shim, generator):
    """One nonzero product per output: the result is that product, exact in float32, for
    exponents from 2^-60 to 2^60 (products from 2^-120 to 2^120, all normal in float32)."""
    mantissas = 1 + torch.randint(0, 128, (16, 16), generator=generator) / 128
    exponents = torch.randint(-60, 61, (16, 16), generator=generator)
    signs = torch.randint(0, 2, (16, 16), generator=generator) * 2 - 1
    values = (signs * mantissas * torch.exp2(exponents.double())).to(torch.bfloat16)
    a = torch.diag(values[0])  # row i holds a single nonzero, at column i
    b = values
    expected = (a.double() @ b.double()).float()
    assert torch.equal(run_dot(a, b), expected), f"seed={generator.initial_seed()}"


def test_dot_with_cancellation_is_exact(shim):
    """Large terms that cancel around a small one, with every partial sum representable in
    float32: the exact result in any order of summation (truncated bit patterns would not)."""
    a = torch.zeros(16, 16)
    a[:, :3] = torch.tensor([2.0**20, 1.0, -2.0**20])
    a[1, :3] = torch.tensor([-3.0 * 2**-40, 2.0**-60, 3.0 * 2**-40])
    a[2, :3] = torch.tensor([1.5 * 2**100, 0.0, -1.5 * 2**100])
    b = torch.zeros(16, 16)
    b[:3] = torch.tensor([[1.0], [0.75], [1.0]]) * torch.ones(3, 16)
    a, b = a.bfloat16(), b.bfloat16()
    expected = (a.double() @ b.double()).float()
    assert expected[0, 0] == 0.75 and expected[1, 0] == 0.75 * 2**-60 and expected[2, 0] == 0
    got = run_dot(a, b)
    assert torch.equal(got, expected)


@pytest.mark.usefixtures("shim")
@pytest.mark.parametrize("m, k, n", [(16, 16, 16), (32, 64, 16)])
def test_dot_matches_torch_on_random_inputs(m, k, n, generator):
    """Exact float32 products summed in float32: within float32's accumulation bound of the
    float64 result, as torch's float32 matmul of the same bf16 values is."""
    a = torch.randn(m, k, generator=generator).bfloat16()
    b = (torch.randn(k, n, generator=generator) * 1e3).bfloat16()
    exact = a.double() @ b.double()
    bound = k * torch.finfo(torch.float32).eps * (a.double().abs() @ b.double().abs())
    got = run_dot(a, b)
    assert ((got.double() - exact).abs() <= bound).all(), f"seed={generator.initial_seed()}"
    assert ((got.double() - (a.float() @ b.float()).double()).abs() <= 2 * bound).all()


# ---------------------------------------------------------------------------------- casts

def run_cast(source: torch.Tensor, target_dtype: torch.dtype) -> torch.Tensor:
    target = torch.zeros(source.numel(), dtype=target_dtype)
    cast_kernel[(1,)](source, target, source.numel())
    return target


def test_float32_to_bf16_casts_round_as_torch(shim, generator):
    values = torch.cat([adversarial_float32(), torch.randn(8, generator=generator) * 1e3])
    got = run_cast(values, torch.bfloat16)
    finite = ~values.isnan().numpy()
    assert np.array_equal(bits_of(got)[finite], bits_of(values.to(torch.bfloat16))[finite])
    assert got[~finite].isnan().all()


@pytest.mark.usefixtures("shim")
@pytest.mark.parametrize("source_dtype", [torch.float64, torch.float16, torch.int32, torch.int64])
def test_casts_to_bf16_from_other_types_go_through_float32(source_dtype, generator):
    """A float64 weight-gradient sum of 67 must store as 67, not as the bit pattern 67."""
    values = torch.cat([torch.tensor([67.0, -3.0, 0.0, 1.0 + 2**-8, 257.0]),
                        torch.randn(11, generator=generator) * 100])
    source = values.to(source_dtype)
    expected = source.to(torch.float32).to(torch.bfloat16)
    got = run_cast(source, torch.bfloat16)
    assert got[0] == 67 and torch.equal(got, expected), f"seed={generator.initial_seed()}"


@pytest.mark.usefixtures("shim")
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.float64, torch.float16, torch.int32])
def test_casts_from_bf16_are_exact_values(target_dtype, generator):
    values = (torch.randn(16, generator=generator) * 100).bfloat16()
    assert torch.equal(run_cast(values, target_dtype), values.to(target_dtype))


def test_select_moves_bf16_values_exactly(shim, generator):
    x, y = (torch.randn(16, generator=generator).bfloat16() for _ in range(2))
    condition = torch.randn(16, generator=generator)
    out = torch.zeros(16, dtype=torch.bfloat16)
    select_kernel[(1,)](condition, x, y, out, 16)
    assert torch.equal(out, torch.where(condition > 0, x, y))


# ---------------------------------------------------------------------------------- the guard

@pytest.mark.usefixtures("shim")
@pytest.mark.parametrize("operation", ["add", "subtract", "multiply", "negate", "compare", "sum", "reduce"])
def test_arithmetic_on_raw_bf16_values_raises(operation):
    x = torch.randn(16).bfloat16()
    with pytest.raises(Exception) as raised:
        raw_arithmetic_kernel[(1,)](x, torch.zeros(16, dtype=torch.bfloat16), operation)
    error = raised.value  # the interpreter wraps it, once per @triton.jit call it crosses
    while error is not None and not isinstance(error, BFloat16InterpreterError):
        error = error.__cause__
    assert error is not None, repr(raised.value)
    assert "uint16 bit patterns" in str(error) and "tl.float32" in str(error)


def test_operations_triton_promotes_to_float32_compute_on_the_values(shim, generator):
    x, y = ((torch.randn(16, generator=generator) * 4).bfloat16() for _ in range(2))
    largest, quotient, maximum = torch.zeros(1), torch.zeros(16), torch.zeros(16, dtype=torch.bfloat16)
    promoted_kernel[(1,)](x, y, largest, quotient, maximum)
    assert largest.item() == x.max().item() and torch.equal(maximum, torch.maximum(x, y))
    assert torch.equal(quotient, x.float() / y.float())


# --------------------------------------------------------------------------- install, refusal

def test_install_is_idempotent_and_uninstall_restores_the_interpreter():
    originals = {(owner, name): getattr(getattr(interpreter, owner), name)
                 for owner, name, _ in interpreter_bf16.PATCHED}
    interpreter_bf16.install()
    try:
        patched = {key: getattr(getattr(interpreter, key[0]), key[1]) for key in originals}
        interpreter_bf16.install()
        assert interpreter_bf16.is_installed()
        assert all(getattr(getattr(interpreter, key[0]), key[1]) is patched[key] for key in originals)
        assert all(patched[key] is not originals[key] for key in originals)
    finally:
        interpreter_bf16.uninstall()
    assert not interpreter_bf16.is_installed()
    assert all(getattr(getattr(interpreter, key[0]), key[1]) is original for key, original in originals.items())


def test_a_moved_internal_fails_loudly_naming_it_and_the_triton_version(monkeypatch):
    monkeypatch.delattr(interpreter.InterpreterBuilder, "create_dot")
    with pytest.raises(RuntimeError, match=rf"triton.runtime.interpreter.InterpreterBuilder.create_dot.*"
                                           rf"Triton {triton.__version__}"):
        interpreter_bf16.install()
    assert not interpreter_bf16.is_installed()


def test_a_changed_signature_fails_loudly(monkeypatch):
    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", lambda self, src, dst_type, rounding: None)
    with pytest.raises(RuntimeError, match=rf"InterpreterBuilder.cast_impl.*Triton {triton.__version__} defines"):
        interpreter_bf16.install()
    assert not interpreter_bf16.is_installed()


def bf16_parity_checks():
    """Each op's bf16 parity check, as its test module runs it (one case each)."""
    import test_attention
    import test_layernorm_linear
    import test_layernorm_mlp
    import test_linear_residual
    return {
        "attention": lambda g: test_attention._check_parity(g, 1, 17, 2, 16, torch.bfloat16),
        "layernorm_linear": lambda g: test_layernorm_linear.check_parity((3, 48), 96, torch.bfloat16, g),
        "linear_residual": lambda g: test_linear_residual.check_parity((3,), 48, 48, torch.bfloat16, g),
        "layernorm_mlp": lambda g: test_layernorm_mlp.check_parity((3, 48), 80, torch.bfloat16, g),
    }


@pytest.mark.parametrize("op", ["attention", "layernorm_linear", "linear_residual", "layernorm_mlp"])
def test_without_the_shim_the_bf16_parity_checks_refuse(op, generator):
    """Removing the shim makes the bf16 tests fail with the ops' ValueError, not pass."""
    interpreter_bf16.install()
    interpreter_bf16.uninstall()
    with pytest.raises(ValueError, match="bfloat16 matmuls, which the Triton interpreter computes wrongly"):
        bf16_parity_checks()[op](generator)


def test_with_the_shim_the_same_check_passes(shim, generator):
    bf16_parity_checks()["layernorm_linear"](generator)
