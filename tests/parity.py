"""One rule for every kernel's parity tests: as accurate as PyTorch, judged against float64.

The kernel and PyTorch's own computation run in the same dtype on the same (rounded) inputs;
both are compared with a float64 computation of the reference on those inputs. The kernel may
be at most twice as far off as PyTorch (FlashAttention's rule), plus a floor at the scale of
the exact values (error_floor): one rounding of the result in its own dtype, which covers the
cases where PyTorch happens to be exact (one token, a single product), and FP32_NOISE_ULPS
units of float32's last place, the noise of a kernel that accumulates in float32 in another
order than PyTorch. The second term is negligible next to fp16/bf16 rounding, where the rule
is the 2x rule; it matters for float32 inputs only. A NaN or infinity fails: outputs are
NaN-poisoned in tests (the `poisoned_outputs` fixture), so an element no kernel writes cannot
pass.

Inputs are fresh random numbers each run (the `generator` fixture); every failure message
carries the seed, so `torch.Generator().manual_seed(seed)` replays it.
"""
import os

import pytest
import torch

# Where every kernel test runs: CPU tensors through Triton's interpreter (tests/conftest.py sets
# TRITON_INTERPRET=1 before anything imports Triton when there is no GPU), else the GPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA and not INTERPRETED else "cpu")

# Marks for a test module of Triton kernels.
KERNEL_TEST_MARKS = [
    pytest.mark.skipif(not INTERPRETED and not HAS_CUDA,
                       reason="needs a CUDA GPU or TRITON_INTERPRET=1 to run Triton kernels"),
    # The fused linear ops use tl.make_block_ptr on purpose (kernels/_fused_linear.py); Triton 3.8
    # marks it deprecated.
    pytest.mark.filterwarnings("ignore:tl.make_block_ptr is deprecated"),
    pytest.mark.usefixtures("poisoned_outputs"),
] + ([pytest.mark.interpreter] if INTERPRETED else [])

# The dtypes of every kernel's parity tests, with their test ids. Under the interpreter, bf16
# runs with kernels.interpreter_bf16 installed: the tests that take bf16 request the
# `bf16_interpreter` fixture (tests/conftest.py); without it the ops refuse bf16 there.
PARITY_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PARITY_DTYPE_IDS = ["fp32", "fp16", "bf16"]


# Float32 ulps a kernel's float32 result may carry beyond twice PyTorch's error. Measured: the
# attention backward recomputes the probabilities from the saved log-sum-exp in base 2, whose
# exponent carries an absolute rounding that grows with the score; over 240 seeds at its
# noisiest shapes (N=17, float32, a few hundred gradient elements, so the max error is noisy)
# it needed at most 3.2 ulps beyond 2x PyTorch's error. (With only the result's own rounding as
# the floor, 1 seed in 30 failed.)
FP32_NOISE_ULPS = 4


def error_floor(dtype: torch.dtype, exact: torch.Tensor) -> float:
    """One unit in the last place of dtype, plus FP32_NOISE_ULPS of float32's, at the scale of
    the exact values."""
    if not exact.numel():
        return 0.0
    ulps = torch.finfo(dtype).eps + FP32_NOISE_ULPS * torch.finfo(torch.float32).eps
    return ulps * exact.abs().max().item()


def max_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    return (value.detach().double().cpu() - exact.detach().double().cpu()).abs().max().item() if exact.numel() else 0.0


def parity_problems(kernel: dict, torch_results: dict, exact: dict, dtype: torch.dtype) -> list[str]:
    """For each named result, why the kernel's value breaks the rule (empty when none does).
    kernel, torch_results: name -> tensor in the dtype under test; exact: name -> float64."""
    problems = []
    for name, reference in exact.items():
        value = kernel[name]
        if value.shape != reference.shape:
            problems.append(f"{name}: shape {tuple(value.shape)}, expected {tuple(reference.shape)}")
            continue
        if value.numel() and not torch.isfinite(value).all():
            problems.append(f"{name}: NaN or infinity (an element was not written, or overflowed)")
            continue
        kernel_error = max_error(value, reference)
        torch_error = max_error(torch_results[name], reference)
        floor = error_floor(dtype, reference)
        if not kernel_error <= 2 * torch_error + floor:
            problems.append(f"{name}: kernel error {kernel_error:.3g} > 2 x torch's {torch_error:.3g} + {floor:.2g}")
    return problems


def assert_parity(kernel: dict, torch_results: dict, exact: dict, dtype: torch.dtype, context: str):
    """parity_problems as an assertion; context must name the seed and the case."""
    problems = parity_problems(kernel, torch_results, exact, dtype)
    assert not problems, f"{context}: " + "; ".join(problems)


def randn(generator: torch.Generator, *shape, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """float64 normal numbers on the CPU from the test's generator."""
    return shift + scale * torch.randn(*shape, generator=generator, dtype=torch.float64)
