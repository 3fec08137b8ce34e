"""Every Triton kernel, in every configuration its launch planner can pick, compiles for an
H100 without spilling, fits in shared memory, and runs its matmuls on the instruction class
it declares (HGMMA, mma.sync where a tile is too small for wgmma, FMA for exact fp32).

No GPU is needed: kernels.h100 compiles for sm_90a and reads ptxas's and cuobjdump's
reports, in a fresh process that has never run Triton's interpreter (this test process
has). The first tests check that machinery itself on small kernels with known properties
(tests/h100_selftest_kernels.py), so a broken detector cannot make the real checks pass.

Both run under two Tritons: the installed one and the GPU machine's (h100.GPU_MACHINE_TRITON,
which `make test` installs in h100.GPU_MACHINE_TRITON_DIR). Each set of specs is compiled
once per run and Triton, all CPUs at a time, whichever test asks first; pytest-xdist workers
share it (the first compiles, the others wait for its result).
"""
import hashlib
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import triton
from filelock import FileLock

from kernels import h100
from kernels.h100 import SHARED_MEMORY_LIMIT, KernelSpec

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
pytestmark = pytest.mark.minutes(10)  # CPU minutes on 2 cores: every kernel compiled under two Tritons
MISSING_TOOLCHAIN = h100.toolchain_missing_reason()
needs_toolchain = pytest.mark.skipif(MISSING_TOOLCHAIN is not None, reason=MISSING_TOOLCHAIN or "")
SELFTEST_SOURCES = ("h100_selftest_kernels:selftest_specs",)

# Collected in this (interpreted) process: building specs only evaluates the planners.
PROJECT_SPECS = {spec.label: spec for spec in h100.collect_specs()}

# Test id -> compile_isolated's triton_dir.
TRITONS = {f"triton-{triton.__version__}": None, f"triton-{h100.GPU_MACHINE_TRITON}": h100.GPU_MACHINE_TRITON_DIR}


@pytest.fixture(params=list(TRITONS))
def triton_dir(request):
    """Each Triton the compile check runs under; the GPU machine's skips where it is not
    installed, except in CI, whose `make test` always installs it."""
    directory = TRITONS[request.param]
    missing = None if directory is None else h100.triton_missing_reason(directory)
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    return directory


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """compiled(sources, triton_dir, sass=False) -> {label: outcome}: compile_isolated(sources) once
    per run, Triton and sass (True: with the SASS, which compile_for_h100 then checks against its
    reading of the PTX). Under pytest-xdist the first worker to ask compiles and leaves the
    outcomes in the run's temporary directory, which every worker shares; the others wait on its lock."""
    shared = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") else None
    cache = {}

    def outcomes(sources: tuple, triton_dir, sass: bool = False) -> dict:
        key = repr((sources, None if triton_dir is None else str(triton_dir), sass))
        if key not in cache:
            def compile_now():
                sass_dir = tmp_path_factory.mktemp("sass") if sass else None
                return {o.label: o for o in h100.compile_isolated(sources, python_path=[TESTS], triton_dir=triton_dir,
                                                                  sass_dir=sass_dir)}
            if shared is None:
                cache[key] = compile_now()
            else:
                stored = shared / f"h100_compile_{hashlib.sha256(key.encode()).hexdigest()[:16]}.pickle"
                with FileLock(f"{stored}.lock"):
                    if not stored.exists():
                        stored.write_bytes(pickle.dumps(compile_now()))
                    cache[key] = pickle.loads(stored.read_bytes())
        return cache[key]

    return outcomes


@pytest.fixture
def selftest(compiled, triton_dir):
    """The self-test kernels' outcomes by name, under each Triton, compiled with their SASS."""
    return {o.name: o for o in compiled(SELFTEST_SOURCES, triton_dir, sass=True).values()}


# ------------------------------------------------------------------------- self-tests


@needs_toolchain
def test_matmul_kernel_uses_hgmma_without_spills(selftest):
    outcome = selftest["selftest_matmul"]
    result = outcome.result
    assert result.uses_hgmma, "a 64x64x64 bf16 tl.dot with 4 warps must become HGMMA on sm_90a"
    assert result.spills == 0 and 0 < result.registers <= 255
    # wgmma reads its operands from shared memory: 3 stages of a 64x64 and a 64x64 bf16 tile.
    assert 0 < result.shared_bytes <= SHARED_MEMORY_LIMIT
    assert outcome.ok, outcome.problems


@needs_toolchain
def test_elementwise_kernel_uses_no_tensor_cores_and_no_shared_memory(selftest):
    outcome = selftest["selftest_scale_relu"]
    result = outcome.result
    assert not result.uses_hgmma and not result.uses_hmma
    assert result.spills == 0 and result.shared_bytes == 0 and 0 < result.registers <= 255
    assert h100.found_instructions(result) in ("none", "FMA") and outcome.ok, outcome.problems


@needs_toolchain
def test_forced_register_spills_are_reported(selftest):
    outcome = selftest["selftest_spilling_matmul"]
    assert outcome.result.spills > 0 and outcome.result.stack_frame_bytes > 0
    assert any("register spills" in problem for problem in outcome.problems)


@needs_toolchain
def test_matmul_that_falls_back_to_mma_sync_is_not_reported_as_hgmma(selftest):
    result = selftest["selftest_small_matmul"].result
    assert not result.uses_hgmma and result.uses_hmma
    assert h100.found_instructions(result) == "HMMA"


@needs_toolchain
def test_exact_fp32_matmul_runs_on_fma_units(selftest):
    outcome = selftest["selftest_fp32_matmul"]
    assert outcome.result.uses_ffma and not outcome.result.uses_hgmma and not outcome.result.uses_hmma
    assert outcome.ok, outcome.problems


@needs_toolchain
def test_an_instruction_class_other_than_declared_is_a_problem(selftest):
    outcome = selftest["selftest_mislabelled_matmul"]
    assert outcome.problems == ["matmuls compiled to HMMA, declared HGMMA"]


@needs_toolchain
def test_sass_is_written_when_asked_and_agrees_with_the_ptx(selftest):
    """Every self-test kernel compiled with its SASS: compile_for_h100 raises (an outcome's error)
    where the SASS's HGMMA/HMMA/FFMA disagree with what it read from the PTX."""
    assert all(outcome.error is None for outcome in selftest.values()), {n: o.error for n, o in selftest.items()}
    sass_path = selftest["selftest_scale_relu"].result.sass_path
    assert sass_path is not None and "Function : _scale_relu_kernel" in sass_path.read_text()


def test_ptx_instructions_are_read_where_they_start_a_line():
    ptx = textwrap.dedent("""\
        \t@%p1 wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd1, %rd2, 1, 1, 1, 0, 0;
        \tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1, %f2}, {%r1}, {%r2}, {%f3};
        \tfma.rn.ftz.f32 %f3, %f1, %f2, %f3;
        // fma.rn.f32 in a comment
    """)
    assert [h100._ptx_has_instruction(ptx, opcode) for opcode in ("HGMMA", "HMMA", "FFMA")] == [True, True, True]
    assert not h100._ptx_has_instruction("\tfma.rn.f64 %fd3, %fd1, %fd2, %fd3;\n// fma.rn.f32\n", "FFMA")
    assert not h100._ptx_has_instruction("\twgmma.fence.sync.aligned;\n", "HGMMA")


@needs_toolchain
def test_a_configuration_is_compiled_once_for_every_spec_that_shares_it(selftest):
    """The mislabelled matmul is the small matmul declared otherwise: one binary, two verdicts."""
    small, mislabelled = selftest["selftest_small_matmul"], selftest["selftest_mislabelled_matmul"]
    assert small.same_binary_as is None and small.cpu_seconds > 0
    assert mislabelled.same_binary_as == small.label and mislabelled.seconds == mislabelled.cpu_seconds == 0
    assert mislabelled.result.registers == small.result.registers and mislabelled.result.name == mislabelled.name
    assert small.ok and mislabelled.problems == ["matmuls compiled to HMMA, declared HGMMA"]


@needs_toolchain
@pytest.mark.interpreter
def test_compiles_work_after_the_interpreter_has_run():
    """How CI runs: TRITON_INTERPRET=1, and other tests have already run kernels on the CPU.
    Once a kernel that calls tl.max / tl.sum / tl.zeros has run interpreted, lowering kernels
    in that process fails inside Triton; compile_isolated compiles elsewhere, and an
    in-process compile refuses with a clear error instead of Triton's."""
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(REPO)!r}, {str(TESTS)!r}]
        import torch
        import h100_selftest_kernels as selftest
        from kernels import h100

        x = torch.randn(3, 100)
        y = torch.empty_like(x)
        selftest._row_softmax_kernel[(3,)](x, y, 100, BLOCK=128)
        assert torch.allclose(y, torch.softmax(x, dim=1), atol=1e-6)
        try:
            h100.compile_for_h100(selftest.softmax_spec())
        except h100.InterpreterActiveError as error:
            print("refused:", str(error).split(",")[0])
        for outcome in h100.compile_isolated(["h100_selftest_kernels:selftest_specs"], python_path=[{str(TESTS)!r}], jobs=1):
            if outcome.name in ("selftest_row_softmax", "selftest_matmul"):
                print(outcome.name, outcome.ok, outcome.result.registers > 0)
        selftest._row_softmax_kernel[(3,)](x, y, 100, BLOCK=128)  # the interpreter still works
        assert torch.allclose(y, torch.softmax(x, dim=1), atol=1e-6)
    """)
    finished = subprocess.run([sys.executable, "-c", script], env={**os.environ, "TRITON_INTERPRET": "1"},
                              capture_output=True, text=True, cwd=REPO, timeout=600)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert finished.stdout.splitlines() == [
        "refused: _row_softmax_kernel was defined under TRITON_INTERPRET=1",
        "selftest_matmul True True",
        "selftest_row_softmax True True",
    ], finished.stdout


@needs_toolchain
def test_malformed_specs_are_explained():
    """Checked in this process: the arguments are validated before anything is lowered."""
    import h100_selftest_kernels as selftest

    spec = selftest.elementwise_spec()
    spec.signature = {"x_ptr": "*fp32", "y_ptr": "*fp32", "scale": "fp32"}  # n is missing
    with pytest.raises(ValueError, match="runtime argument n needs a type"):
        h100._triton_source_arguments(spec, _as_jit(spec.fn))

    spec = selftest.elementwise_spec()
    spec.constexprs = {}
    with pytest.raises(ValueError, match="constexpr argument BLOCK needs a value"):
        h100._triton_source_arguments(spec, _as_jit(spec.fn))

    spec = selftest.elementwise_spec()
    spec.signature = {**spec.signature, "n": "int32"}
    with pytest.raises(ValueError, match="'int32', which Triton does not know"):
        h100._triton_source_arguments(spec, _as_jit(spec.fn))

    with pytest.raises(ValueError, match="instructions 'WGMMA' is not one of"):
        KernelSpec(name="k", config="c", fn=spec.fn, signature={}, constexprs={}, num_warps=4, num_stages=1,
                   instructions="WGMMA")


def _as_jit(kernel):
    """A JITFunction for kernel's Python function: argument validation needs only its signature."""
    from triton.runtime.jit import JITFunction
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def test_instruction_class_rule():
    assert h100.matmul_instructions("bf16", "ieee", (64, 128), 8) == "HGMMA"
    assert h100.matmul_instructions("fp16", "ieee", (64, 32), 8) == "HGMMA+HMMA"  # and a 32-row dot
    assert h100.matmul_instructions("fp16", "ieee", (32, 16), 4) == "HMMA"
    assert h100.matmul_instructions("bf16", "ieee", (64,), 2) == "HMMA"  # no whole warpgroup
    assert h100.matmul_instructions("fp32", "ieee", (64,), 8) == "FMA"
    assert h100.matmul_instructions("fp32", "tf32", (64,), 8) == "HGMMA"


def test_launcher_specialization():
    assert [h100.launcher_specialization(n) for n in (1, 2, 16, 65, 8320, 65000)] == \
        ["1", "plain", "16k", "plain", "16k", "plain"]


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


def test_every_planner_configuration_is_a_spec():
    """The specs come from the planners: each (dtype, head dim, sequence-length regime) plan of
    the attention wrapper, whole-sequence (with and without a tail part) and streaming, and
    each panel width and dtype variant of the fused linear ops."""
    from kernels import attention
    names = {spec.name for spec in PROJECT_SPECS.values()}
    assert {"_attention_whole_forward_kernel", "_attention_whole_backward_kernel", "_attention_forward_kernel",
            "_attention_backward_dkdv_kernel", "_attention_backward_dq_kernel",
            "ln_mlp_forward", "ln_mlp_backward_weight", "ln_mlp_backward_input", "ln_linear_forward",
            "linear_residual_backward_input"} <= names
    configs = list(PROJECT_SPECS)
    for dtype in ("fp16", "bf16", "fp32"):
        for head_dim in attention.SUPPORTED_HEAD_DIMS:
            mine = [c for c in configs if c.startswith("_attention") and f"[{dtype},HEAD_DIM={head_dim}," in c]
            for kernel in ("_attention_whole_forward_kernel", "_attention_whole_backward_kernel",
                           "_attention_backward_dq_kernel", "_attention_backward_dkdv_kernel"):
                assert any(c.startswith(kernel + "[") for c in mine), (dtype, head_dim, kernel)
            if dtype != "fp32":  # the model's 65 tokens: a 64-token lead and a 16-token tail
                assert any("LEAD=64,TAIL=16," in c for c in mine), (dtype, head_dim)
    # Every panel width and dtype variant of the fused linear ops, the second GELU with and without.
    for width in (128, 256, 384, 512):
        assert any(c.startswith(f"ln_mlp_forward[x=fp32 mm=bf16 C={width // 128}x128") for c in configs), width
    assert any("mm=fp32" in c for c in configs if c.startswith("linear_residual_backward_weight"))
    assert {"second_gelu=True", "second_gelu=False"} <= {c.split()[-1].rstrip("]") for c in configs
                                                         if c.startswith("ln_mlp_backward_weight")}
    for spec in PROJECT_SPECS.values():
        declared = list(spec.signature) + list(spec.constexprs)
        assert sorted(declared) == sorted(spec.fn.arg_names), spec.label


@needs_toolchain
def test_the_fresh_process_compiles_the_same_specs_with_the_triton_asked_for(compiled, triton_dir):
    outcomes = compiled(h100.SPEC_SOURCES, triton_dir)
    assert sorted(outcomes) == sorted(PROJECT_SPECS)
    expected = triton.__version__ if triton_dir is None else h100.GPU_MACHINE_TRITON
    assert {outcome.triton for outcome in outcomes.values()} == {expected}
    for outcome in outcomes.values():  # a spec sharing another's configuration shares its binary
        if outcome.same_binary_as is not None:
            first = outcomes[outcome.same_binary_as]
            assert first.same_binary_as is None and outcome.cpu_seconds == 0 < first.cpu_seconds
            assert (outcome.result.registers, outcome.result.spills, outcome.result.shared_bytes) == \
                (first.result.registers, first.result.spills, first.result.shared_bytes)


# The GPU machine's cores, over which step 1's warm-up compiles (bench/session/warmup.py).
GPU_MACHINE_CORES = 16


@needs_toolchain
@pytest.mark.parametrize("triton_dir", [f"triton-{h100.GPU_MACHINE_TRITON}"], indirect=True)
def test_step1_compiles_what_its_tests_and_bench_launch_within_its_warm_up_share(compiled, triton_dir):
    """The kernel configurations step 1's gpu tests and bench launch (recorded here at their shapes,
    nothing executed), each costed at its compile's CPU seconds under the GPU machine's Triton, handed
    to the warm-up's pool of one process a core: the pool must be done within the warm-up's share of
    step 1, its start-up allowance included. CPU seconds of this machine's compiles stand in for the
    GPU machine's (CPU seconds, not wall: a busy machine hardly changes them)."""
    from bench.session import DEFAULT_SECONDS, steps, warmup

    configurations = warmup.step1_configurations(torch.device("cpu"))
    seconds = warmup.compile_seconds(configurations, PROJECT_SPECS.values(), compiled(h100.SPEC_SOURCES, triton_dir))
    assert None not in seconds.values(), [c.describe() for c, s in seconds.items() if s is None]
    pool = warmup.pool_seconds([seconds[c] for c in configurations], GPU_MACHINE_CORES)
    share = steps.WARMUP_SHARE * DEFAULT_SECONDS["step1"]
    assert pool + warmup.STARTUP_SECONDS <= share, (
        f"{len(configurations)} configurations, {sum(seconds.values()):.0f} CPU s, {pool:.1f} s on "
        f"{GPU_MACHINE_CORES} cores + {warmup.STARTUP_SECONDS} s of start-up > {share:.0f} s")


@needs_toolchain
def test_the_ptx_reading_agrees_with_the_sass_on_every_project_kernel(compiled, triton_dir):
    """One configuration of each of the project's kernels compiled with its SASS (the others are
    read from their PTX alone): an outcome's error says where the two disagree."""
    outcomes = compiled(("h100_selftest_kernels:one_project_spec_per_kernel",), triton_dir, sass=True)
    assert {outcome.name for outcome in outcomes.values()} == {spec.name for spec in PROJECT_SPECS.values()}
    for outcome in outcomes.values():
        assert outcome.error is None and outcome.result.sass_path.exists(), f"{outcome.label}: {outcome.error}"


def test_a_triton_that_is_not_installed_is_explained(tmp_path):
    assert "make test" in h100.triton_missing_reason(tmp_path)
    with pytest.raises(h100.ToolchainMissingError, match=f"no Triton in {tmp_path}"):
        h100.compile_isolated(SELFTEST_SOURCES, python_path=[TESTS], triton_dir=tmp_path)


def test_the_compile_report_heads_each_table_with_the_triton_that_compiled_it(capsys):
    from kernels import report

    result = h100.CompileResult(name="k", config="c", registers=250, spills=8, shared_bytes=2048, uses_hgmma=False,
                                sass_path=None, uses_ffma=True)
    outcomes = [h100.CompileOutcome(name="k", config="c", instructions="FMA", num_warps=8, num_stages=1, seconds=2.5,
                                    triton="3.6.0", result=result, problems=["8 bytes of register spills (250 registers)"])]
    assert report._print_compile_table(outcomes) == 1
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("Compiled by Triton 3.6.0 for H100 (sm_90a)")
    assert "8 bytes of register spills" in printed[3] and "registers >= 240" in printed[3]
    assert printed[-1].startswith("Triton 3.6.0: 1 configurations (1 FMA): 0 fit, 1 do not; 1 at 240+ registers")


def test_make_test_installs_the_gpu_machines_triton_where_the_compile_check_looks():
    makefile = (REPO / "Makefile").read_text()
    assert f"GPU_MACHINE_TRITON := {h100.GPU_MACHINE_TRITON}\n" in makefile
    assert f"GPU_MACHINE_TRITON_DIR := {h100.GPU_MACHINE_TRITON_DIR.relative_to(REPO)}\n" in makefile


@needs_toolchain
# Explicit ids: pytest replaces auto-generated ids over 100 characters by "label<N>".
@pytest.mark.parametrize("label", [pytest.param(label, id=label) for label in sorted(PROJECT_SPECS)])
def test_kernel_fits_an_h100(label, compiled, triton_dir):
    outcome = compiled(h100.SPEC_SOURCES, triton_dir)[label]
    assert outcome.error is None, f"{label}: {outcome.error}"
    assert not outcome.problems, f"{label}: " + "; ".join(outcome.problems)
