"""Small kernels with known properties, for checking kernels/h100.py itself: a broken detector
must not let the project's kernels pass. Imported by tests/test_h100_compile.py and, through
kernels.h100.compile_isolated, by a fresh process without the interpreter; one_project_spec_per_kernel()
picks the project's kernels whose SASS the tests check against the PTX reading."""
import triton
import triton.language as tl

from kernels.h100 import KernelSpec


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
    # A helper called by bare name, as the project's kernels call theirs.
    return tl.maximum(x, 0.0)


@triton.jit
def _scale_relu_kernel(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < n
    x = tl.load(x_ptr + offsets, mask=in_bounds)
    tl.store(y_ptr + offsets, _relu(x) * scale, mask=in_bounds)


@triton.jit
def _row_softmax_kernel(x_ptr, y_ptr, n_cols, BLOCK: tl.constexpr):
    """softmax of one row per program, through tl.max, tl.sum and tl.zeros: the standard-library
    helpers that the interpreter leaves patched once it has run."""
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + tl.program_id(0) * n_cols + cols, mask=mask, other=float("-inf"))
    shifted = x - tl.max(x, axis=0)
    numerator = tl.where(mask, tl.exp(shifted), tl.zeros([BLOCK], dtype=tl.float32))
    tl.store(y_ptr + tl.program_id(0) * n_cols + cols, numerator / tl.sum(numerator, axis=0), mask=mask)


@triton.jit
def _single_tile_matmul_kernel(a_ptr, b_ptr, c_ptr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    inner = tl.arange(0, BLOCK_K)
    a = tl.load(a_ptr + rows[:, None] * BLOCK_K + inner[None, :])
    b = tl.load(b_ptr + inner[:, None] * BLOCK_N + cols[None, :])
    tl.store(c_ptr + rows[:, None] * BLOCK_N + cols[None, :], tl.dot(a, b))


@triton.jit
def _fp32_single_tile_matmul_kernel(a_ptr, b_ptr, c_ptr,
                                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    inner = tl.arange(0, BLOCK_K)
    a = tl.load(a_ptr + rows[:, None] * BLOCK_K + inner[None, :])
    b = tl.load(b_ptr + inner[:, None] * BLOCK_N + cols[None, :])
    tl.store(c_ptr + rows[:, None] * BLOCK_N + cols[None, :], tl.dot(a, b, input_precision="ieee"))


def matmul_spec() -> KernelSpec:
    return KernelSpec(
        name="selftest_matmul", config="64x64x64 bf16", fn=_matmul_kernel,
        signature={"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
                   "stride_am": "i32", "stride_bk": "i32", "stride_cm": "i32"},
        constexprs={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64},
        num_warps=4, num_stages=3, instructions="HGMMA",
        divisible_by_16=("a_ptr", "b_ptr", "c_ptr", "K", "stride_am", "stride_bk", "stride_cm"),
    )


def elementwise_spec() -> KernelSpec:
    return KernelSpec(
        name="selftest_scale_relu", config="BLOCK=1024 fp32", fn=_scale_relu_kernel,
        signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "scale": "fp32"},
        constexprs={"BLOCK": 1024}, num_warps=4, num_stages=1, instructions="none",
    )


def softmax_spec() -> KernelSpec:
    return KernelSpec(
        name="selftest_row_softmax", config="BLOCK=128 fp32", fn=_row_softmax_kernel,
        signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "n_cols": "i32"},
        constexprs={"BLOCK": 128}, num_warps=4, num_stages=1, instructions="none",
    )


def spilling_matmul_spec() -> KernelSpec:
    # A 256x256 fp32 accumulator over 4 warps (128 threads) is 512 registers a thread,
    # twice the 255 a thread can have, so ptxas must spill whatever it does.
    return KernelSpec(
        name="selftest_spilling_matmul", config="256x256x64 bf16 4 warps", fn=_single_tile_matmul_kernel,
        signature={"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32"},
        constexprs={"BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 64},
        num_warps=4, num_stages=1, instructions="HGMMA",
    )


def small_matmul_spec() -> KernelSpec:
    # wgmma needs a warpgroup (4 warps) and 64-row tiles; a 16x16 tile on one warp makes
    # Triton fall back to Ampere's mma.sync (HMMA) even on sm_90a.
    return KernelSpec(
        name="selftest_small_matmul", config="16x16x16 bf16 1 warp", fn=_single_tile_matmul_kernel,
        signature={"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32"},
        constexprs={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16},
        num_warps=1, num_stages=1, instructions="HMMA",
    )


def fp32_matmul_spec() -> KernelSpec:
    return KernelSpec(
        name="selftest_fp32_matmul", config="32x32x32 fp32 ieee", fn=_fp32_single_tile_matmul_kernel,
        signature={"a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32"},
        constexprs={"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32},
        num_warps=4, num_stages=1, instructions="FMA",
    )


def mislabelled_matmul_spec() -> KernelSpec:
    """The small matmul declared HGMMA: check_result must call it out."""
    spec = small_matmul_spec()
    spec.name, spec.instructions = "selftest_mislabelled_matmul", "HGMMA"
    return spec


SELFTEST_FACTORIES = (matmul_spec, elementwise_spec, softmax_spec, spilling_matmul_spec, small_matmul_spec,
                      fp32_matmul_spec, mislabelled_matmul_spec)


def selftest_specs() -> list[KernelSpec]:
    return [make() for make in SELFTEST_FACTORIES]


def one_project_spec_per_kernel() -> list[KernelSpec]:
    """The first configuration of each of the project's kernels (kernels.h100.collect_specs())."""
    from kernels.h100 import collect_specs

    firsts = {}
    for spec in collect_specs():
        firsts.setdefault(spec.name, spec)
    return list(firsts.values())
