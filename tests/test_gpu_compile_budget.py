"""Step 1's warm-up (bench/session/warmup.py): the kernel configurations it compiles are those
the gpu tests and the bench launch, read as Triton's launcher specializes a launch, each one a
configuration the compile check compiles; on the interpreter it lists them and compiles nothing.
Whether their compile seconds fit step 1 is tests/test_h100_compile.py's check, where the
compile outcomes are.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from bench.session import steps, warmup
from kernels import h100

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def configurations():
    """What step 1's workloads launch, recorded here (the kernels stubbed)."""
    return warmup.step1_configurations(torch.device("cpu"))


@triton.jit(do_not_specialize=["n_rows"])
def _probe_kernel(x_ptr, n_rows, n_cols, stride, eps, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr = False):
    pass


def _configuration(*args, **kwargs) -> dict:
    configuration = warmup.configuration_of(_probe_kernel, args, dict(kwargs, num_warps=4, num_stages=2))
    assert (configuration.module, configuration.kernel) == (__name__, "_probe_kernel")
    assert (configuration.num_warps, configuration.num_stages) == (4, 2)
    return {argument.name: argument for argument in configuration.arguments}


def test_a_launch_is_read_as_the_launcher_specializes_it():
    x = torch.empty(64, dtype=torch.bfloat16)
    args = _configuration(x, 1, 384, 1, 1e-5, BLOCK=64)
    assert args["x_ptr"] == warmup.Argument("x_ptr", "*bf16", divisible=True)
    assert args["n_rows"] == warmup.Argument("n_rows", "i32")  # do_not_specialize: not even 1 is a constant
    assert args["n_cols"] == warmup.Argument("n_cols", "i32", divisible=True)
    assert args["stride"] == warmup.Argument("stride", "constexpr", 1)
    assert args["eps"] == warmup.Argument("eps", "fp32")
    assert args["BLOCK"] == warmup.Argument("BLOCK", "constexpr", 64)
    assert args["HAS_BIAS"] == warmup.Argument("HAS_BIAS", "constexpr", False)  # the default
    unaligned = _configuration(x[1:], 7, 385, 2**31, 0.5, BLOCK=64)
    assert unaligned["x_ptr"].divisible is False and unaligned["n_cols"] == warmup.Argument("n_cols", "i32")
    assert unaligned["stride"] == warmup.Argument("stride", "i64", divisible=True)
    # Rows differ, the binary does not: n_rows is not specialized on.
    assert warmup.configuration_of(_probe_kernel, (x, 5, 384, 3, 1.0), dict(BLOCK=64, num_warps=4, num_stages=2)) == \
        warmup.configuration_of(_probe_kernel, (x, 9, 768, 5, 2.0), dict(BLOCK=64, num_warps=4, num_stages=2))


def test_recording_stubs_the_launches_and_counts_them():
    from kernels.attention import attention, plan_launches

    qkv = torch.full((2, 17, 3 * 32), float("nan"))
    with warmup.RecordedLaunches() as recorded:
        out = attention(qkv, 2)
        attention(qkv, 2)
    assert out.shape == (2, 17, 32)  # allocated, never written
    (configuration,) = recorded.configurations
    assert recorded.configurations[configuration] == 2  # the forward, twice, in one binary
    assert configuration.kernel == plan_launches(2, 17, 2, 16, torch.float32).forward.kernel.fn.__name__


def _collected_step1_tests() -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests", "-m", steps.STEP1_TESTS, "--collect-only", "-q",
                           "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    nodes = [line for line in proc.stdout.splitlines() if "::" in line]
    assert nodes, proc.stdout[-3000:] + proc.stderr[-3000:]
    return nodes


def test_every_step1_gpu_test_that_launches_our_kernels_has_its_workload():
    """A new gpu test (or file) must be mirrored by a workload, or the warm-up would not compile
    what it launches: every collected test's function is named by a workload of its file."""
    mirrored = {(workload.source, test) for workload in warmup.workloads() for test in workload.tests}
    collected = {(node.split("::")[0], node.split("::")[-1].split("[")[0]) for node in _collected_step1_tests()}
    for path, name in sorted(collected):
        launches_none = warmup.NO_TRITON_TESTS.get(path, ())
        if launches_none is not None and name not in launches_none:
            assert (path, name) in mirrored, f"{path}::{name} has no workload in bench/session/warmup.py"
    # And no workload stands for a test that step 1 no longer runs.
    assert {pair for pair in mirrored if pair[0] != "bench"} <= collected


def test_every_configuration_step1_launches_is_one_the_compile_check_compiles(configurations):
    """Each recorded configuration is exactly a spec's (kernel, argument types, divisibility,
    constants, options), so the compile check compiles the binary it runs, and the budget check
    costs it by that compile."""
    specs = h100.collect_specs()
    outcomes = {spec.label: h100.CompileOutcome(name=spec.name, config=spec.config, instructions=spec.instructions,
                                                num_warps=spec.num_warps, num_stages=spec.num_stages, seconds=1.0,
                                                triton="-", cpu_seconds=1.0) for spec in specs}
    seconds = warmup.compile_seconds(configurations, specs, outcomes)
    assert None not in seconds.values(), [c.describe() for c, s in seconds.items() if s is None]
    assert {configuration.module for configuration in configurations} == {
        "kernels.attention", "kernels.layernorm_linear", "kernels.linear_residual", "kernels.layernorm_mlp"}


def test_the_pool_hands_each_task_to_the_first_free_worker():
    assert warmup.pool_seconds([4, 1, 1, 1, 1], 2) == 4
    assert warmup.pool_seconds([1, 1, 1, 4], 2) == 5  # the long one comes last, to the first worker free
    assert warmup.pool_seconds([3, 2], 16) == 3 and warmup.pool_seconds([], 4) == 0


def test_on_the_interpreter_the_warm_up_lists_the_configurations_and_says_nothing_compiles(tmp_path, configurations):
    report = tmp_path / "warmup.json"
    proc = subprocess.run([sys.executable, "-m", "bench.session.warmup", "--json", str(report)], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(REPO), TRITON_INTERPRET="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = json.loads(report.read_text())
    assert done["compiled"] == [] and "compiles nothing" in done["nothing_to_compile"]
    assert done["configurations"] == [configuration.describe() for configuration in configurations]
    assert "nothing to compile" in proc.stdout
