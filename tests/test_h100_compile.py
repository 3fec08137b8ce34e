"""Every Triton kernel compiles for an H100 without spilling, fits in shared memory and,
when it multiplies matrices, uses the Hopper tensor cores (HGMMA).

No GPU is needed: kernels.h100 compiles for sm_90a and reads ptxas's and cuobjdump's
reports. The first tests check that machinery itself on small kernels written here, so
a broken detector cannot make the real checks pass.
"""
import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import triton
import triton.language as tl

from kernels import h100
from kernels.h100 import SHARED_MEMORY_LIMIT, CompileResult, KernelSpec, compile_for_h100

REPO = Path(__file__).resolve().parents[1]
MISSING_TOOLCHAIN = h100.toolchain_missing_reason()
needs_toolchain = pytest.mark.skipif(MISSING_TOOLCHAIN is not None, reason=MISSING_TOOLCHAIN or "")


# ----------------------------------------------------------------- kernels for the self-test


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bk, stride_cm,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c = a @ b for row-major bf16 a [M, K], b [K, N]; M, N, K multiples of the blocks."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inner = tl.arange(0, BLOCK_K)
    accumulator = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rows[:, None] * stride_am + (k + inner)[None, :])
        b = tl.load(b_ptr + (k + inner)[:, None] * stride_bk + cols[None, :])
        accumulator = tl.dot(a, b, accumulator)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], accumulator.to(tl.bfloat16))


@triton.jit
def _relu(x):
    # A helper called by bare name: under TRITON_INTERPRET=1 it is an InterpretedFunction
    # in the kernel's globals, which compile_for_h100 has to convert as well.
    return tl.maximum(x, 0.0)


@triton.jit
def _scale_relu_kernel(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < n
    x = tl.load(x_ptr + offsets, mask=in_bounds)
    tl.store(y_ptr + offsets, _relu(x) * scale, mask=in_bounds)


@triton.jit
def _single_tile_matmul_kernel(a_ptr, b_ptr, c_ptr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    inner = tl.arange(0, BLOCK_K)
    a = tl.load(a_ptr + rows[:, None] * BLOCK_K + inner[None, :])
    b = tl.load(b_ptr + inner[:, None] * BLOCK_N + cols[None, :])
    tl.store(c_ptr + rows[:, None] * BLOCK_N + cols[None, :], tl.dot(a, b))


def matmul_spec() -> KernelSpec:
    return KernelSpec(
        name="selftest_matmul", config="64x64x64 bf16", fn=_matmul_kernel,
        signature={"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
                   "stride_am": "i32", "stride_bk": "i32", "stride_cm": "i32"},
        constexprs={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64},
        num_warps=4, num_stages=3, uses_matmul=True,
        divisible_by_16=("a_ptr", "b_ptr", "c_ptr", "K", "stride_am", "stride_bk", "stride_cm"),
    )


def elementwise_spec() -> KernelSpec:
    return KernelSpec(
        name="selftest_scale_relu", config="BLOCK=1024 fp32", fn=_scale_relu_kernel,
        signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "scale": "fp32"},
        constexprs={"BLOCK": 1024}, num_warps=4, num_stages=1, uses_matmul=False,
    )


def spilling_matmul_spec() -> KernelSpec:
    # A 256x256 fp32 accumulator over 4 warps (128 threads) is 512 registers a thread,
    # twice the 255 a thread can have, so ptxas must spill whatever it does.
    return KernelSpec(
        name="selftest_spilling_matmul", config="256x256x64 bf16 4 warps", fn=_single_tile_matmul_kernel,
        signature={"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32"},
        constexprs={"BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 64},
        num_warps=4, num_stages=1, uses_matmul=True,
    )


def small_matmul_spec() -> KernelSpec:
    # wgmma needs a warpgroup (4 warps) and 64-row tiles; a 16x16 tile on one warp makes
    # Triton fall back to Ampere's mma.sync (HMMA) even on sm_90a.
    return KernelSpec(
        name="selftest_small_matmul", config="16x16x16 bf16 1 warp", fn=_single_tile_matmul_kernel,
        signature={"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32"},
        constexprs={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16},
        num_warps=1, num_stages=1, uses_matmul=True,
    )


# ------------------------------------------------------------- the project's kernel specs


def _collect_specs_for_parametrize() -> dict[str, KernelSpec]:
    """Specs by label, collected without raising: a broken op module must not break the
    collection of the whole file; test_op_module_declares_specs reports it instead."""
    specs = {}
    for module_name in h100.OP_MODULES:
        try:
            module_specs = h100.specs_from_module(module_name)
        except Exception:
            continue
        specs.update((spec.label, spec) for spec in module_specs)
    return specs


PROJECT_SPECS = _collect_specs_for_parametrize()


@functools.lru_cache(maxsize=None)
def _compiled(label: str) -> CompileResult:
    """Each project spec compiles once per session, however many tests look at it."""
    return compile_for_h100(PROJECT_SPECS[label])


@functools.lru_cache(maxsize=None)
def _compiled_selftest(make_spec) -> CompileResult:
    return compile_for_h100(make_spec())


# ------------------------------------------------------------------------- self-tests


@needs_toolchain
def test_matmul_kernel_uses_hgmma_without_spills():
    result = _compiled_selftest(matmul_spec)
    assert result.uses_hgmma, "a 64x64x64 bf16 tl.dot with 4 warps must become HGMMA on sm_90a"
    assert result.spills == 0
    assert 0 < result.registers <= 255
    # wgmma reads its operands from shared memory: 3 stages of a 64x64 and a 64x64 bf16 tile.
    assert 0 < result.shared_bytes <= SHARED_MEMORY_LIMIT


@needs_toolchain
def test_elementwise_kernel_uses_no_tensor_cores_and_no_shared_memory():
    result = _compiled_selftest(elementwise_spec)
    assert not result.uses_hgmma
    assert not result.uses_hmma
    assert result.spills == 0
    assert result.shared_bytes == 0
    assert 0 < result.registers <= 255


@needs_toolchain
def test_forced_register_spills_are_reported():
    result = _compiled_selftest(spilling_matmul_spec)
    assert result.spills > 0
    assert result.stack_frame_bytes > 0


@needs_toolchain
def test_matmul_that_falls_back_to_mma_sync_is_not_reported_as_hgmma():
    result = _compiled_selftest(small_matmul_spec)
    assert not result.uses_hgmma
    assert result.uses_hmma


@needs_toolchain
def test_sass_is_written_when_asked(tmp_path):
    result = compile_for_h100(elementwise_spec(), sass_dir=tmp_path)
    assert result.sass_path is not None and result.sass_path.parent == tmp_path
    assert "Function : _scale_relu_kernel" in result.sass_path.read_text()


@needs_toolchain
def test_interpreted_kernels_compile_after_running_in_the_interpreter():
    """How CI runs: TRITON_INTERPRET=1, and other tests have already run kernels on CPU."""
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
        import torch
        from triton.runtime.interpreter import InterpretedFunction
        import test_h100_compile as selftest
        from kernels.h100 import compile_for_h100

        assert isinstance(selftest._scale_relu_kernel, InterpretedFunction), type(selftest._scale_relu_kernel)
        import triton.language as tl

        def run_in_interpreter():
            x = torch.randn(3000)
            y = torch.empty_like(x)
            selftest._scale_relu_kernel[(3,)](x, y, x.numel(), 2.0, BLOCK=1024)
            assert torch.equal(y, torch.relu(x) * 2.0)

        run_in_interpreter()
        for make_spec in (selftest.elementwise_spec, selftest.matmul_spec):
            result = compile_for_h100(make_spec())
            print(result.name, result.uses_hgmma, result.spills)
        # Compiling swaps interpreted functions for JIT ones only while it runs.
        assert isinstance(tl.zeros, InterpretedFunction) and isinstance(selftest._relu, InterpretedFunction)
        run_in_interpreter()
    """)
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    finished = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                              cwd=REPO, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert finished.stdout.split() == ["selftest_scale_relu", "False", "0", "selftest_matmul", "True", "0"]


@needs_toolchain
def test_malformed_specs_are_explained():
    spec = elementwise_spec()
    spec.signature = {"x_ptr": "*fp32", "y_ptr": "*fp32", "scale": "fp32"}  # n is missing
    with pytest.raises(ValueError, match="runtime argument n needs a type"):
        compile_for_h100(spec)

    spec = elementwise_spec()
    spec.constexprs = {}
    with pytest.raises(ValueError, match="constexpr argument BLOCK needs a value"):
        compile_for_h100(spec)

    spec = elementwise_spec()
    spec.signature = {**spec.signature, "n": "int32"}
    with pytest.raises(ValueError, match="'int32', which Triton does not know"):
        compile_for_h100(spec)


def test_missing_binaries_raise_a_clear_error(monkeypatch):
    # knobs.nvidia.cuobjdump looks at $TRITON_CUOBJDUMP_PATH, then at the wheel's bin/.
    cuobjdump_knob = vars(type(h100.knobs.nvidia))["cuobjdump"]
    monkeypatch.delenv(cuobjdump_knob.key, raising=False)
    monkeypatch.setattr(cuobjdump_knob, "default_path", "/nonexistent/bin/cuobjdump")
    with pytest.raises(h100.ToolchainMissingError, match="cuobjdump is missing"):
        h100.find_toolchain()
    assert "cuobjdump is missing" in h100.toolchain_missing_reason()


def test_ptxas_log_parsing_sums_spills_over_functions():
    log = textwrap.dedent("""\
        ptxas info    : 0 bytes gmem
        ptxas info    : Function properties for helper
            8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
        ptxas info    : Compiling entry function 'kernel' for 'sm_90a'
        ptxas info    : Function properties for kernel
            96 bytes stack frame, 100 bytes spill stores, 112 bytes spill loads
        ptxas info    : Used 255 registers, used 1 barriers, 96 bytes cumulative stack size, 512 bytes smem
        ptxas info    : Compile time = 40.1 ms
    """)
    usage = h100.parse_ptxas_log(log)
    assert usage.registers == 255
    assert usage.spill_store_bytes == 108
    assert usage.spill_load_bytes == 116
    assert usage.stack_frame_bytes == 96
    assert usage.static_shared_bytes == 512


# ------------------------------------------------------------------- the project's kernels


@pytest.mark.parametrize("module_name", h100.OP_MODULES)
def test_op_module_declares_specs(module_name):
    if not h100.op_module_exists(module_name):
        pytest.skip(f"{module_name} is not written yet")
    specs = h100.specs_from_module(module_name)  # raises when it declares none or returns non-specs
    assert specs and all(isinstance(spec, KernelSpec) for spec in specs)


def test_spec_labels_are_unique():
    # all_specs raises on two specs with the same name and config.
    assert len(h100.all_specs()) == len(PROJECT_SPECS)


@needs_toolchain
# Explicit ids: pytest replaces auto-generated ids over 100 characters by "label<N>".
@pytest.mark.parametrize("label", [pytest.param(label, id=label) for label in sorted(PROJECT_SPECS)])
def test_kernel_fits_an_h100(label):
    spec = PROJECT_SPECS[label]
    result = _compiled(label)
    problems = []
    if result.spills:
        problems.append(f"{result.spills} bytes of register spills ({result.registers} registers)")
    if result.shared_bytes > SHARED_MEMORY_LIMIT:
        problems.append(f"{result.shared_bytes} bytes of shared memory, over the H100's {SHARED_MEMORY_LIMIT}")
    if spec.uses_matmul and not result.uses_hgmma:
        problems.append("tl.dot without HGMMA" + (" (fell back to HMMA)" if result.uses_hmma else ""))
    assert not problems, f"{label}: " + "; ".join(problems)
