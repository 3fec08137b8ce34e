"""Step 1's Triton kernels compiled before its tests, on all the machine's cores.

Each pytest process of step 1 would otherwise compile the kernels its tests launch one after
another, inside its group's time limit (kernels/README.md has the figures). Here the launches of
the gpu tests and of the bench are recorded without running anything (workloads(): each mirrors
a test, or a bench phase, at its shapes and dtypes, through the same ops and helpers), reduced to
the configurations Triton's launcher would compile (Configuration: the kernel, each argument as
the launcher specializes it, the launch options), and each configuration is compiled through the
runtime's own path (`kernel.run(..., warmup=True)`, what `JITFunction.warmup` does) in a pool of
processes. The binaries land in Triton's on-disk cache, where the tests' and the bench's
launches find them: the same specialization, options and target make the same cache key. (The
compile check's triton.compile(ASTSource(...)) could miss it: Triton hashes the source's
attributes in the order given, which the runtime gives in parameter order.) A configuration that
fails to compile is reported and left to the tests, which then fail on it themselves.

    python -m bench.session.warmup --json OUT [--jobs N]

Under the Triton interpreter (the CPU dry run) the kernels are Python and nothing compiles: the
configurations are recorded and listed all the same, and the report says so.
"""
import argparse
import concurrent.futures
import importlib
import inspect
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.counts import StubbedTritonLaunches
from kernels.h100 import launcher_specialization

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"

# Seconds the warm-up spends besides its compiles, an allowance (not yet measured on the GPU machine): this
# process imports torch, Triton, the kernels and the tests' helpers and records every workload (a few
# seconds of CPU here), and each worker of the pool imports torch and Triton and opens CUDA.
STARTUP_SECONDS = 20
# Step 1's gpu tests that launch none of our Triton kernels, by file (None: all of its tests): torch's
# augmentation on the GPU against the CPU, and steps of the torch backend (ViTConfig's default).
# tests/test_gpu_compile_budget.py requires every other step-1 test to be mirrored by a workload.
NO_TRITON_TESTS = {"tests/test_augment_chunks.py": None, "tests/test_augment_variants.py": None,
                   "tests/test_step.py": ("test_on_cuda_steps_do_not_sync_and_a_replayed_step_only_copies_its_batch",)}


# ------------------------------------------------------------------------ configurations


@dataclass(frozen=True)
class Argument:
    """One kernel argument as Triton's launcher sees it. kind: "constexpr" (value is the value),
    a pointer type such as "*bf16", or a scalar type ("i32", "i64", "i1", "fp32"); divisible:
    whether the launcher marks it a multiple of 16 (pointers: 16-byte aligned)."""
    name: str
    kind: str
    value: object = None  # constexprs only
    divisible: bool = False


@dataclass(frozen=True)
class Configuration:
    """A binary Triton compiles: the kernel (module and function), its arguments as the launcher
    specializes them, and the launch options. Two launches with one Configuration share a binary.
    replay: argument values that specialize the same way (for the warm-up; not compared)."""
    module: str
    kernel: str
    arguments: tuple
    num_warps: int
    num_stages: int
    replay: tuple = field(default=(), compare=False, hash=False)

    def describe(self) -> str:
        constants = ",".join(f"{a.name}={a.value}" for a in self.arguments if a.kind == "constexpr")
        pointers = sorted({a.kind for a in self.arguments if a.kind.startswith("*")})
        return f"{self.kernel}[{'/'.join(pointers)} {constants} warps={self.num_warps} stages={self.num_stages}]"


_LAUNCH_OPTIONS = ("num_warps", "num_stages")
# Triton's names of the tensor dtypes our kernels take pointers to.
POINTER_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                 torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


def _scalar_kind(value) -> str:
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    return "fp32"


def configuration_of(kernel, args: tuple, kwargs: dict) -> Configuration:
    """The Configuration of `kernel[grid](*args, **kwargs)`, by the launcher's rules (Triton
    3.6-3.8): a tensor is a pointer to its dtype, divisible when 16-byte aligned; an integer
    is specialized as kernels.h100.launcher_specialization says (the constant 1, or marked
    divisible by 16), unless the kernel names it in do_not_specialize; tl.constexpr arguments are constants
    (their defaults when not passed)."""
    function = kernel.fn
    options = {name: kwargs[name] for name in _LAUNCH_OPTIONS}
    bound = inspect.signature(function).bind(*args, **{k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS})
    bound.apply_defaults()
    # A JITFunction keeps do_not_specialize as given (names or indices), an interpreted kernel in its kwargs.
    given = getattr(kernel, "do_not_specialize", None) or getattr(kernel, "kwargs", {}).get("do_not_specialize") or ()
    parameters = inspect.signature(function).parameters
    not_specialized = {name for index, name in enumerate(parameters) if name in given or index in given}
    arguments, replay = [], []
    for name, parameter in parameters.items():
        value = bound.arguments[name]
        if "constexpr" in str(parameter.annotation) or value is None:
            arguments.append(Argument(name, "constexpr", value))
        elif isinstance(value, torch.Tensor):
            arguments.append(Argument(name, "*" + POINTER_TYPES[value.dtype],
                                      divisible=value.data_ptr() % 16 == 0))
            value = (str(value.dtype).removeprefix("torch."), arguments[-1].divisible)
        elif isinstance(value, int) and not isinstance(value, bool) and name not in not_specialized:
            specialization = launcher_specialization(value)
            arguments.append(Argument(name, "constexpr", 1) if specialization == "1" else
                             Argument(name, _scalar_kind(value), divisible=specialization == "16k"))
        else:
            arguments.append(Argument(name, _scalar_kind(value)))
        replay.append(value)
    return Configuration(function.__module__, function.__name__, tuple(arguments), options["num_warps"],
                         options["num_stages"], tuple(replay))


def spec_configuration(spec) -> Configuration:
    """The Configuration a kernels.h100.KernelSpec compiles (kernels/specs.py builds the specs from
    the same plans), so that a recorded launch finds the compile check's outcome of its binary."""
    function = spec.fn.fn
    divisible = set(spec.divisible_by_16 if spec.divisible_by_16 is not None else
                    (name for name, kind in spec.signature.items() if kind.startswith("*")))
    arguments = []
    for name, parameter in inspect.signature(function).parameters.items():
        if name in spec.constexprs or "constexpr" in str(parameter.annotation):
            arguments.append(Argument(name, "constexpr", spec.constexprs.get(name, parameter.default)))
        else:
            arguments.append(Argument(name, spec.signature[name], divisible=name in divisible))
    return Configuration(function.__module__, function.__name__, tuple(arguments), spec.num_warps, spec.num_stages)


class RecordedLaunches(StubbedTritonLaunches):
    """Inside `with RecordedLaunches() as recorded:`, a @triton.jit kernel's launch returns at
    once (nothing compiles or executes; outputs keep what they were allocated with) and
    recorded.configurations gains its Configuration."""

    def __init__(self):
        super().__init__(on_launch=self._record)
        self.configurations: dict[Configuration, int] = {}  # -> launches, in first-launch order

    def _record(self, kernel, args, kwargs):
        configuration = configuration_of(kernel, args, kwargs)
        self.configurations[configuration] = self.configurations.get(configuration, 0) + 1


# ------------------------------------------------------------------------------ workloads


@dataclass(frozen=True)
class Workload:
    """What one gpu test (or a bench phase) launches, at its shapes and dtypes: `run(device)`
    calls our ops as the test does. source: the test file (or "bench"); tests: the test
    functions it stands for."""
    source: str
    tests: tuple
    run: object


def _test_module(name: str):
    """A test module of tests/, for its shapes and helpers (tests/ is their import root)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    return importlib.import_module(name)


def _attention(batch, seq_len, num_heads, head_dim, backward=True):
    def run(device):
        from kernels.attention import attention

        qkv = torch.randn(batch, seq_len, 3 * num_heads * head_dim, device=device, dtype=torch.bfloat16)
        out = attention(qkv.requires_grad_(backward), num_heads)
        if backward:
            out.backward(torch.randn_like(out))
    return run


def _fused(test_module: str, op: str, problem: tuple, dtype, autocast_dtype=None, scale_dtype=None,
           matmul_input: str | None = None, **options):
    """A fused linear op's forward and backward as its test runs it (fused_parity.run): the test
    module's random_problem(*problem), cast to dtype; matmul_input: an input given in the autocast
    dtype (linear_residual's h); scale_dtype: a stochastic-depth scale of that dtype."""
    def run(device):
        module, fused_parity = _test_module(test_module), _test_module("fused_parity")
        inputs, dy = module.random_problem(*problem, torch.Generator().manual_seed(0))
        inputs = fused_parity.cast(inputs, dtype, device)
        if matmul_input:
            inputs[matmul_input] = inputs[matmul_input].to(autocast_dtype)
        scale = {} if scale_dtype is None else {
            "branch_scale": torch.ones(next(iter(inputs.values())).shape[0], device=device, dtype=scale_dtype)}
        function = getattr(importlib.import_module(f"kernels.{op}"), op)
        fused_parity.run(function, inputs, dy.to(device, dtype), autocast_dtype=autocast_dtype, **options, **scale)
    return run


def _model_step(batch: int, autocast: bool, evaluate: bool = False, **config):
    """A training step's forward and backward of ViT(config) with the triton backend (bf16
    autocast or fp32), and an evaluation forward when the test evaluates."""
    def run(device):
        from vit import ViT, ViTConfig

        model = ViT(ViTConfig(**config, backend="triton")).to(device)
        images = torch.randn(batch, 3, model.cfg.image_size, model.cfg.image_size, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(images)
        torch.nn.functional.cross_entropy(logits.float(), torch.zeros(batch, dtype=torch.long, device=device)).backward()
        if evaluate:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                model.eval()(images)
    return run


def _bench_kernels(device):
    """The kernel bench's phase at the model's shape: our two ops, every input bf16 (bench/kernels.py)."""
    from bench import kernels as kernel_bench
    from kernels.attention import attention
    from kernels.layernorm_mlp import layernorm_mlp

    shape = kernel_bench.MODEL_SHAPE
    for op, function in (("attention", lambda qkv: attention(qkv, shape.heads)),
                         ("layernorm_mlp", lambda *tensors: layernorm_mlp(*tensors, eps=kernel_bench.LAYER_NORM_EPS))):
        out = function(*kernel_bench.make_inputs(op, shape, torch.bfloat16, device, seed=0))
        out.backward(torch.randn_like(out))


def workloads() -> list[Workload]:
    """Every gpu test of step 1 that launches our kernels, and the bench's phases that do."""
    attention_tests = _test_module("test_attention")
    ln_linear, residual, ln_mlp = (_test_module(name) for name in
                                   ("test_layernorm_linear", "test_linear_residual", "test_layernorm_mlp"))
    from bench.run import FULL_MODEL

    bf16, fp32 = torch.bfloat16, torch.float32
    linear_problem, residual_problem = (ln_linear.REAL_SHAPE, ln_linear.REAL_OUT), (residual.REAL_ROWS,
                                                                                   residual.REAL_DIM, residual.REAL_DIM)
    mlp_problem = (ln_mlp.REAL_SHAPE, ln_mlp.REAL_HIDDEN)
    found = [Workload("tests/test_attention.py",
                      ("test_bf16_matches_reference_on_gpu", "test_bf16_backward_is_deterministic_on_gpu"),
                      _attention(*shape)) for shape in attention_tests.GPU_SHAPES]
    found += [
        # The QKV projection's output, already bf16 under autocast: 4 images, 12 heads of 32.
        Workload("tests/test_attention.py", ("test_bf16_under_autocast_on_gpu",), _attention(4, 65, 12, 32, False)),
        Workload("tests/test_layernorm_linear.py", ("test_gpu_bf16_parity_at_real_shapes",),
                 _fused("test_layernorm_linear", "layernorm_linear", linear_problem, bf16)),
        Workload("tests/test_layernorm_linear.py", ("test_gpu_autocast_bf16_at_real_shapes",
                                                    "test_gpu_backward_is_deterministic_at_real_shapes"),
                 _fused("test_layernorm_linear", "layernorm_linear", linear_problem, fp32, bf16)),
        *[Workload("tests/test_linear_residual.py", ("test_gpu_bf16_parity_at_real_shapes",),
                   _fused("test_linear_residual", "linear_residual", residual_problem, bf16, scale_dtype=scale))
          for scale in (None, bf16)],
        Workload("tests/test_linear_residual.py", ("test_gpu_backward_is_deterministic_at_real_shapes",),
                 _fused("test_linear_residual", "linear_residual", residual_problem, fp32, bf16, fp32, "h")),
        Workload("tests/test_layernorm_mlp.py", ("test_gpu_bf16_parity_at_real_shapes",),
                 _fused("test_layernorm_mlp", "layernorm_mlp", mlp_problem, bf16)),
        *[Workload("tests/test_layernorm_mlp.py", ("test_gpu_autocast_bf16_at_real_shapes",),
                   _fused("test_layernorm_mlp", "layernorm_mlp", mlp_problem, fp32, bf16, fp32, second_gelu=second))
          for second in (False, True)],
        Workload("tests/test_layernorm_mlp.py", ("test_gpu_backward_is_deterministic_at_real_shapes",),
                 _fused("test_layernorm_mlp", "layernorm_mlp", mlp_problem, fp32, bf16, fp32)),
        # The default model, a batch of 128 under bf16 autocast; with the second GELU and drop-path.
        Workload("tests/test_fused_block.py", ("test_gpu_model_shape_bf16_is_as_accurate_as_torch",
                                               "test_gpu_model_shape_gradients_are_bit_identical_over_repeated_runs"),
                 _model_step(128, True, drop_path=0.1)),
        Workload("tests/test_fused_block.py", ("test_gpu_model_shape_bf16_is_as_accurate_as_torch",),
                 _model_step(128, True, mlp_second_gelu=True, drop_path=0.1)),
        # per_step_losses: dim 64, 2 blocks of 4 heads, batches of 32, fp32 and bf16.
        *[Workload("tests/test_step.py", ("test_graph_step_gives_the_eager_loss_sequence_exactly_at_fp32",
                                          "test_graph_step_stays_close_to_the_eager_one_at_bf16"),
                   _model_step(32, autocast, dim=64, depth=2, heads=4, mlp_dim=64)) for autocast in (False, True)],
        # dim 32, one block of 2 heads, batches of 8 in bf16, evaluated each epoch.
        Workload("tests/test_step.py", ("test_checkpoints_hold_their_epochs_state_while_the_next_epoch_trains",),
                 _model_step(8, True, True, dim=32, depth=1, heads=2, mlp_dim=32)),
        Workload("bench", ("kernels at the model's shape",), _bench_kernels),
        # The triton training rows: the recipe's model and batch, bf16 autocast, trained and evaluated.
        Workload("bench", ("training rows",), _model_step(128, True, True, **FULL_MODEL)),
    ]
    return found


def record(workload: Workload, device: torch.device) -> dict[Configuration, int]:
    """The configurations workload launches on device (its launches stubbed), with launch counts.
    Under the interpreter, bf16 matmuls are let through (kernels.interpreter_bf16): nothing runs."""
    from kernels import interpreter_bf16

    installed = device.type == "cpu" and not interpreter_bf16.is_installed()
    if installed:
        interpreter_bf16.install()
    try:
        with RecordedLaunches() as recorded, torch.random.fork_rng(devices=[]):
            workload.run(device)
    finally:
        if installed:
            interpreter_bf16.uninstall()
    return recorded.configurations


def step1_configurations(device: torch.device) -> list[Configuration]:
    """The distinct configurations of every workload, in first-launch order."""
    configurations: dict[Configuration, None] = {}
    for workload in workloads():
        configurations.update(dict.fromkeys(record(workload, device)))
    return list(configurations)


def compile_seconds(configurations, specs, outcomes: dict) -> dict:
    """Each configuration's compile CPU seconds, from the compile check's outcomes (label ->
    kernels.h100.CompileOutcome) of specs: those of the spec that compiles it; None when no spec does."""
    def seconds(outcome):
        return outcomes[outcome.same_binary_as].cpu_seconds if outcome.same_binary_as else outcome.cpu_seconds

    exact = {spec_configuration(spec): seconds(outcomes[spec.label]) for spec in specs}
    return {configuration: exact.get(configuration) for configuration in configurations}


def pool_seconds(task_seconds: list[float], workers: int) -> float:
    """When a pool of `workers` processes finishes tasks handed out in this order, each to the
    first worker free (ProcessPoolExecutor.map)."""
    free_at = [0.0] * max(1, workers)
    for seconds in task_seconds:
        worker = free_at.index(min(free_at))
        free_at[worker] += seconds
    return max(free_at)


# ---------------------------------------------------------------------------------- compiling


def _replay_arguments(configuration: Configuration, device: str) -> list:
    """Values that the launcher specializes as configuration says: a pointer as an empty tensor of
    its dtype (aligned, or offset by one element when the recorded one was not), scalars as recorded."""
    values = []
    for argument, recorded in zip(configuration.arguments, configuration.replay):
        if argument.kind.startswith("*"):
            dtype_name, aligned = recorded
            storage = torch.empty(16, dtype=getattr(torch, dtype_name), device=device)
            values.append(storage if aligned else storage[1:])
        else:
            values.append(recorded)
    return values


def compile_configuration(configuration: Configuration) -> dict:
    """Compile one configuration into Triton's cache through the runtime's path: its seconds, or
    the error in one line."""
    started, cpu_started = time.perf_counter(), time.process_time()
    error = None
    try:
        kernel = getattr(importlib.import_module(configuration.module), configuration.kernel)
        kernel.run(*_replay_arguments(configuration, "cuda"), grid=(1,), warmup=True,
                   num_warps=configuration.num_warps, num_stages=configuration.num_stages)
    except Exception as exception:  # reported; the tests that launch it fail on it themselves
        lines = str(exception).strip().splitlines()
        error = f"{type(exception).__name__}: {lines[0] if lines else ''}"
    return {"configuration": configuration.describe(), "seconds": round(time.perf_counter() - started, 2),
            "cpu_seconds": round(time.process_time() - cpu_started, 2), "error": error}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.session.warmup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, help="where the report goes")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles at a time")
    args = parser.parse_args(argv)
    from kernels import _common
    from kernels.attention import _attention_whole_forward_kernel

    interpreted = _common.is_interpreted(_attention_whole_forward_kernel)
    device = torch.device("cpu" if interpreted else "cuda")
    started = time.perf_counter()
    configurations = step1_configurations(device)
    report = {"configurations": [c.describe() for c in configurations], "device": str(device),
              "record_seconds": round(time.perf_counter() - started, 1)}
    print(f"{len(configurations)} kernel configurations launched by step 1's tests and bench "
          f"(recorded in {report['record_seconds']:.1f}s)", flush=True)
    if interpreted:
        report["compiled"] = []
        report["nothing_to_compile"] = ("TRITON_INTERPRET=1: the kernels run through Triton's interpreter, which "
                                        "compiles nothing")
        print(f"nothing to compile: {report['nothing_to_compile']}", flush=True)
    else:
        # Each compile in a worker process of its own (spawned: this one has a CUDA context).
        context = multiprocessing.get_context("spawn")
        workers = max(1, min(args.jobs, len(configurations)))
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            report["compiled"] = []
            for done in pool.map(compile_configuration, configurations):
                report["compiled"].append(done)
                print(f"  {done['configuration']}: " + (f"FAILED {done['error']}" if done["error"] else
                                                         f"{done['seconds']:.1f}s"), flush=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    # Run as bench.session.warmup, not __main__, so that the pool's workers find compile_configuration there.
    from bench.session.warmup import main as module_main
    sys.exit(module_main())
