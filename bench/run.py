"""`python -m bench`: time the kernels and CIFAR-10 training, side by side with what a user
would pick instead, check the results are right, and write a report.

The phases (PHASES, which run_phase walks in order), each within its share of the budget:
  1. peaks: the device's matmul FLOP/s and copy bandwidth, measured now;
  2. kernels at the model's shape: ours and SDPA's backends first, then the eager reference,
     then torch.compile (each compile budgeted; bench/compiling.py);
  3. the batched augmentation alone, images/s at batch 128 and 512;
  4. end-to-end training, one configuration after the other, the headline pair first;
  5. kernel sweeps over batch size and sequence length, with what is left.
results.json, report.md and the rest (bench/outputs.py) are rewritten after every phase.
Exit status: 0; 1 when our own kernels or trainer failed (crashed or gave wrong results) or
a phase crashed; 2 for a usage error (or CIFAR-10 missing without --download).
"""
import argparse
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from bench import augmentation as augmentation_bench
from bench import datasets
from bench import kernels as kernel_bench
from bench import training as training_bench
from bench.budget import Budget
from bench.compiling import COMPILE_MODES, CompilePolicy
from bench.measure import (REPO, command_line, describe_error, device_properties, device_slug, git_commit,
                           measure_peaks)
from bench.outputs import DEFAULT_MAX_FILES, MIN_FILES, Outputs
from bench.report import ours_failures
from vit.data import DataError
from vit import cli
from vit.environment import device_name, versions

DEFAULT_BUDGET_SECONDS = 510  # under 9 minutes: one 10-minute command with room to start and copy
# Kept at the end for drawing the last phase's plots and writing the files: 15 s, or less of a
# short budget (but 6 s at least, the sweep plots take seconds on a busy CPU; at most half).
REPORT_RESERVE_SECONDS = 15
REPORT_RESERVE_SHARE, REPORT_RESERVE_FLOOR = 0.15, 6.0
# Shares of the budget: the kernel phase (compiles included) may use at least KERNEL_SHARE of
# it, more when the training configurations need less; the sweeps keep SWEEP_SHARE.
KERNEL_SHARE = 0.35
SWEEP_SHARE = 0.15
# --only: the phases each choice runs (beside the peaks, which always run).
ONLY = {"all": ("kernels", "augmentation", "training", "sweeps"), "kernels": ("kernels", "sweeps"),
        "training": ("augmentation", "training")}
COMPILE_SKIPPED_IN_QUICK_CPU = "skipped in a --quick CPU smoke: compile time dominates"
# Patches of 8: 17 tokens, like the quick kernel shape. With the model's 65 tokens one step of
# the Triton interpreter takes ~20 s on a CPU core; with 17, about one.
TINY_MODEL = {"image_size": 32, "patch_size": 8, "num_classes": 10, "dim": 32, "depth": 1, "heads": 2,
              "mlp_dim": 32, "dropout": 0.0}
FULL_MODEL = {"image_size": 32, "patch_size": 4, "num_classes": 10, "dim": 384, "depth": 7, "heads": 12,
              "mlp_dim": 384, "dropout": 0.0}
QUICK_BATCH_SIZE = 8
# What a --quick run counts a training step on: its model at the full model's depth, 2 images a
# step (the Triton interpreter runs a step of 7 blocks in seconds at 2 images, a minute at 8).
# Fewer heads, tokens or rows change what torch launches: those stay as they are.
COUNT_MODEL = {**TINY_MODEL, "depth": FULL_MODEL["depth"]}
COUNT_BATCH_SIZE = 2


EXAMPLES = """\
examples:
  python -m bench
      on a GPU: kernels, augmentation and CIFAR-10 training side by side, in under 9 minutes
  python -m bench --quick --device cpu --data synthetic
      a smoke run of every code path on the CPU (labelled as such, never performance figures)
  python -m bench --only training --training-configs triton,torch-bf16-compile --budget-seconds 300
      the headline training comparison alone
"""


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="python -m bench", description=__doc__.split("\n\n")[0], epilog=EXAMPLES)
    p.add_argument("--device", type=cli.device, default="auto",
                   help=cli.DEVICE_HELP.replace(")", "; a CPU run is always a smoke run at --quick sizes)"))
    p.add_argument("--quick", action="store_true", help="tiny kernel shapes, a tiny model, a few dozen images")
    p.add_argument("--out", default=None, help="output folder (default: bench/results/<date>-<device>-<commit>, "
                                               "where GPU results are committed; CPU runs there are ignored by git)")
    p.add_argument("--max-files", type=cli.positive_int, default=DEFAULT_MAX_FILES,
                   help=f"at most this many files in --out (at least {MIN_FILES}); what has no room of its own "
                        "goes into bench-files.zip")
    p.add_argument("--budget-seconds", type=cli.positive_float, default=DEFAULT_BUDGET_SECONDS,
                   help="wall-clock bound for the whole run; phases, compiles and configurations are trimmed to fit, "
                        "and the report says what was trimmed")
    p.add_argument("--only", choices=list(ONLY), default="all",
                   help="kernels: the kernel rows and sweeps; training: the augmentation and training rows")
    p.add_argument("--data", choices=datasets.KINDS, default="cifar10",
                   help="the training rows' images: the real CIFAR-10, or synthetic random images of its shape "
                        "(throughput valid, accuracy meaningless; every output says so)")
    p.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py (default: ./data, then "
                                                    "../shared/data beside the checkout)")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 into --data-dir (or ./data) when it is "
                                                           "missing; without it the bench never downloads")
    p.add_argument("--epochs", type=cli.positive_int, default=1, help="training epochs per configuration, at most")
    p.add_argument("--batch-size", type=cli.positive_int, default=None,
                   help=f"training batch size (default: the recipe's 128; {QUICK_BATCH_SIZE} with --quick)")
    p.add_argument("--training-configs", default=None, metavar="KEYS",
                   help="comma-separated training configurations to run, in this order (default: all, in priority "
                        "order), e.g. triton,torch-bf16-compile")
    p.add_argument("--compile-mode", choices=["auto", "none", *COMPILE_MODES], default="auto",
                   help="torch.compile mode of the compiled rows; auto: kernel rows max-autotune where it fits the "
                        "budget, else default, training rows default (skipped in a --quick CPU run); none: no "
                        "compiled rows")
    p.add_argument("--commit", default=None, help="the commit measured, recorded when the folder is not a git "
                                                  "checkout (a copy on a GPU machine; default: read from git)")
    return p


def default_out_dir(device: torch.device, commit: dict) -> Path:
    sha = commit["commit"] + ("-dirty" if commit.get("dirty") else "")
    return REPO / "bench" / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}-{device_slug(device)}-{sha}"


def phase_deadlines(budget: Budget, phases: tuple[str, ...], training_seconds: float) -> dict:
    """The perf_counter() time by which each phase must end. Later phases get what earlier ones
    leave unused: the deadlines are absolute, not durations. training_seconds: what the
    training configurations take at the least (the kernel phase leaves it to them, within
    KERNEL_SHARE)."""
    total, end = budget.total_seconds, budget.end()
    reserve = min(REPORT_RESERVE_SECONDS, max(REPORT_RESERVE_FLOOR, REPORT_RESERVE_SHARE * total), total / 2)
    sweeps = SWEEP_SHARE * total if "sweeps" in phases else 0.0
    training_end = end - reserve - sweeps
    if "training" in phases:
        kernels_end = max(budget.start + KERNEL_SHARE * total, training_end - training_seconds)
    else:
        kernels_end = end - reserve - 2 * sweeps
    return {"kernels": kernels_end, "training": training_end, "sweeps": end - reserve}


@dataclass
class BenchRun:
    """What the phases share: the run's settings, the results they fill in (results.json, rewritten
    after each phase) and the log."""
    args: argparse.Namespace
    device: torch.device
    smoke: bool  # a CPU run: --quick sizes, never performance figures
    dtype: torch.dtype  # of the kernel rows
    policy: CompilePolicy
    budget: Budget
    deadlines: dict  # phase name -> perf_counter() time by which it must end (phase_deadlines)
    base_shape: kernel_bench.KernelShape  # the kernel rows' model shape
    points: list  # the kernel shapes: the model shape and the sweeps' (kernel_bench.sweep_points)
    sweep_modes: tuple[str, ...]
    configs: list  # the training configurations, in the order they run
    training_settings: training_bench.TrainingSettings
    data: datasets.BenchData | None  # the training rows' images; None when no training phase runs
    outputs: Outputs
    results: dict

    @property
    def quick(self) -> bool:
        return self.args.quick

    def log(self, line: str):
        self.outputs.log(line)

    def write(self, phase_done: str | None = None):
        self.results["elapsed_seconds"] = self.budget.elapsed()
        self.outputs.write(self.results, phase_done)


def measure_device_peaks(run: BenchRun):
    peaks = run.results["peaks"] = measure_peaks(run.device, run.dtype, run.quick)
    run.log(f"  matmul {peaks['matmul_tflops']:.3g} TFLOP/s, copy {peaks['copy_gbps']:.3g} GB/s")


def kernels_at_model_shape(run: BenchRun):
    run.results["kernels"] += [asdict(r) for r in kernel_bench.run_model_shape(
        run.points, run.device, run.dtype, run.results["peaks"], run.quick, run.policy, run.budget,
        run.deadlines["kernels"], run.log)]


def augmentation_alone(run: BenchRun):
    batch_sizes = augmentation_bench.batch_sizes(run.quick, run.training_settings.batch_size)
    run.results["augmentation"] = [asdict(r) for r in augmentation_bench.run_augmentation(
        run.device, batch_sizes, run.quick, run.log)]


def end_to_end_training(run: BenchRun):
    def on_row(rows):
        run.results["training"] = rows
        run.write()

    outcome = training_bench.run_training(run.training_settings, run.configs, run.device, run.data, run.policy,
                                          run.budget, run.deadlines["training"], run.log, on_row)
    run.results["training"], run.results["host_work"] = outcome["rows"], outcome["host_work"]
    run.log(f"-- a training step of timm's {training_bench.TIMM_STEP_MODEL}: fused, timm's own, compiled")
    run.results["timm_step"] = training_bench.timm_step_rows(run.device, run.quick, run.policy, run.log)


def kernel_sweeps(run: BenchRun):
    # Each op's sweep compiles with the mode its model-shape row ran with.
    compile_modes = {r["op"]: r["compile_mode"] for r in run.results["kernels"]
                     if r["compile_mode"] and r["status"] == "ok" and "model" in r["in_sweeps"]}
    run.results["kernels"] += [asdict(r) for r in kernel_bench.run_sweeps(
        run.points, run.sweep_modes, run.device, run.dtype, run.results["peaks"], run.quick, run.policy,
        compile_modes, run.budget, run.deadlines["sweeps"], run.log)]


@dataclass(frozen=True)
class Phase:
    name: str  # in results.json's phases_done and phase_errors, and in ONLY
    title: Callable[[BenchRun], str]  # the log's heading of the phase
    measure: Callable[[BenchRun], None]
    always: bool = False  # runs whatever --only selects


# In the order they run. The peaks always run: the other phases' rows are fractions of them.
PHASES = (
    Phase("peaks", lambda run: "peaks", measure_device_peaks, always=True),
    Phase("kernels", lambda run: f"kernels at {run.base_shape.label()} ({run.results['settings']['kernel_dtype']})",
          kernels_at_model_shape),
    Phase("augmentation", lambda run: "augmentation alone (vit/augment.py, uint8 on the device)", augmentation_alone),
    Phase("training", lambda run: "end-to-end training", end_to_end_training),
    Phase("sweeps", lambda run: "kernel sweeps", kernel_sweeps),
)


def run_phase(run: BenchRun, phase: Phase):
    """One phase, timed and logged; its crash is recorded in phase_errors and the run goes on
    (one phase failing still leaves the others' numbers and a report). results.json and the
    rest are rewritten after it."""
    started = time.perf_counter()
    run.results["phase_running"] = phase.name
    run.log(f"== {phase.title(run)}")
    try:
        phase.measure(run)
    except Exception as error:
        run.results["phase_errors"].append({"phase": phase.name, "error": describe_error(error),
                                            "traceback": traceback.format_exc()})
        run.log(f"!! {phase.name} failed: {describe_error(error)}\n{traceback.format_exc()}")
    run.results["phases_done"].append(phase.name)
    run.results["phase_running"] = None
    run.log(f"   ({time.perf_counter() - started:.1f}s; {run.budget.elapsed():.0f}s of "
            f"{run.args.budget_seconds:.0f}s used)")
    run.write(phase_done=phase.name)


def main(argv=None) -> int:
    return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    budget = Budget(args.budget_seconds)  # from here on everything counts, loading the data included
    device = args.device
    if args.max_files < MIN_FILES:
        parser.error(f"--max-files must be at least {MIN_FILES}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    smoke = device.type == "cpu"
    notes = []
    if smoke and not args.quick:
        args.quick = True
        notes.append("--device cpu runs at --quick sizes: the Triton interpreter would take hours at the model's")
    selected = ONLY[args.only]
    keys = [k.strip() for k in args.training_configs.split(",") if k.strip()] if args.training_configs else None
    try:
        configs = training_bench.select_configs(training_bench.training_configs(device), keys)
    except ValueError as error:
        parser.error(str(error))
    if smoke:
        # One thread: with several, OpenMP's barriers stall for tens of ms whenever another
        # process holds a core (CI runners, shared machines), and the smoke run crawls.
        torch.set_num_threads(1)

    # The data first: a run that cannot get its images stops before writing anything.
    data = None
    if "training" in selected:
        try:
            data = datasets.load(args.data, args.data_dir, args.download)
        except DataError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2

    commit = git_commit()
    if commit["commit"] == "unknown" and args.commit:
        commit = {"commit": args.commit, "dirty": None, "source": "--commit: this folder is not a git checkout"}
    out_dir = Path(args.out) if args.out else default_out_dir(device, commit)
    outputs = Outputs(out_dir, args.max_files)
    synthetic = data is not None and not data.accuracy_valid
    label = ("CPU smoke" if smoke else device_name(device) + (" (--quick sizes)" if args.quick else "")) + (
        ", synthetic images" if synthetic else "")
    outputs.log(f"bench: {label}; device {device_name(device)}; budget {args.budget_seconds:.0f}s; out {out_dir}")
    for note in notes:
        outputs.log(f"note: {note}")
    if data is not None:
        outputs.log(f"data: {data.note}")

    policy = compile_policy(args.compile_mode, device, smoke)
    # The Triton interpreter computes bf16 matmuls wrongly: fp32 on the CPU.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    quick = args.quick
    base_shape = kernel_bench.QUICK_SHAPE if quick else kernel_bench.MODEL_SHAPE
    run = BenchRun(
        args=args, device=device, smoke=smoke, dtype=dtype, policy=policy, budget=budget,
        deadlines=phase_deadlines(budget, selected, training_bench.minimum_seconds(configs, device, policy)
                                  if "training" in selected else 0.0),
        base_shape=base_shape,
        points=kernel_bench.sweep_points(
            base_shape, kernel_bench.QUICK_SWEEP_BATCH_SIZES if quick else kernel_bench.SWEEP_BATCH_SIZES,
            kernel_bench.QUICK_SWEEP_SEQ_LENS if quick else kernel_bench.SWEEP_SEQ_LENS),
        # A CPU smoke run sweeps forward+backward only: each interpreted call takes ~0.1 s.
        sweep_modes=("forward+backward",) if smoke else kernel_bench.MODES,
        configs=configs, training_settings=training_settings(args, data), data=data, outputs=outputs, results={})
    run.results = initial_results(run, label, notes, commit, selected)

    run.write()
    for phase in PHASES:
        if phase.always or phase.name in selected:
            run_phase(run, phase)

    run.results["complete"] = True
    failures = ours_failures(run.results)
    for line in failures:
        outputs.log(f"FAILED: {line}")
    outputs.log(f"writing {out_dir}: {', '.join(outputs.file_plan()['standalone'])} after {budget.elapsed():.0f}s"
                + (" — CPU smoke: not performance numbers" if smoke else "")
                + (" — synthetic images: accuracy meaningless" if synthetic else ""))
    run.write()
    outputs.close()
    return 1 if failures else 0


def compile_policy(compile_mode: str, device: torch.device, smoke: bool) -> CompilePolicy:
    """--compile-mode as a policy; a CPU smoke run (always at --quick sizes) skips the compiles of
    auto."""
    if compile_mode == "none":
        return CompilePolicy("none", device.type, skip_reason="skipped: --compile-mode none")
    if compile_mode == "auto" and smoke:
        return CompilePolicy("auto", device.type, skip_reason=COMPILE_SKIPPED_IN_QUICK_CPU)
    return CompilePolicy(compile_mode, device.type)


def training_settings(args: argparse.Namespace, data: datasets.BenchData | None) -> training_bench.TrainingSettings:
    quick = args.quick
    batch_size = args.batch_size or (QUICK_BATCH_SIZE if quick else 128)
    warmup_steps, measured_steps = (2, 3) if quick else (10, 30)
    return training_bench.TrainingSettings(
        model=TINY_MODEL if quick else FULL_MODEL, epochs=args.epochs, batch_size=batch_size,
        # --quick: an epoch of just the steps it measures, and two batches of test images (each
        # interpreted step and evaluation of the CPU smoke takes seconds).
        train_subset=(warmup_steps + measured_steps) * batch_size if quick else None,
        test_subset=2 * batch_size if quick else None,
        warmup_steps=warmup_steps, min_measured_steps=measured_steps, count_steps=2 if quick else 3,
        count_model=COUNT_MODEL if quick else None, count_batch_size=COUNT_BATCH_SIZE if quick else None,
        data=data.describe() if data else {})


def initial_results(run: BenchRun, label: str, notes: list[str], commit: dict, selected: tuple[str, ...]) -> dict:
    """results.json before the first phase: what runs, where and how; the phases fill in the rest."""
    args, device, data = run.args, run.device, run.data
    return {
        "label": label, "smoke": run.smoke, "quick": run.quick, "notes": notes, "complete": False, "phases_done": [],
        "phase_running": None, "device": device_name(device), "device_type": device.type,
        "versions": versions(), "device_properties": device_properties(device), "commit": commit,
        "command": command_line(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "budget_seconds": args.budget_seconds, "elapsed_seconds": 0.0, "data": data.describe() if data else None,
        "settings": {
            "phases": list(selected),
            "kernel_dtype": str(run.dtype).removeprefix("torch."),
            "kernel_model_shape": asdict(run.base_shape),
            "sweep_shapes": [{**asdict(p.shape), "in_sweeps": list(p.in_sweeps)} for p in run.points],
            "sweep_modes": list(run.sweep_modes),
            "compile_mode": args.compile_mode,
            "compile_policy": run.policy.describe(),
            "training_configs": [c.key for c in run.configs],
            "torch_threads": torch.get_num_threads(),
            # fp32 rows are true fp32 unless TF32 is on: say which.
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "timing": ("triton.testing.do_bench, quantiles 0.5/0.2/0.8, L2 flushed before each call" if device.type == "cuda"
                       else "perf_counter loop after a warm-up call (CPU, synchronous)"),
            "training": training_bench.settings_dict(run.training_settings),
        },
        "published_runs": training_bench.PUBLISHED_RUNS,
        "peaks": {}, "kernels": [], "augmentation": [], "training": [], "timm_step": [], "host_work": None,
        "trimmed": run.budget.trimmed, "phase_errors": [],
    }


if __name__ == "__main__":
    sys.exit(main())
