"""`python -m bench`: time the kernels and CIFAR-10 training, side by side with what a user
would pick instead, check the results are right, and write a report.

Phases, in the order they run, each within its share of the budget:
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
from dataclasses import asdict
from pathlib import Path

import torch

from bench import augmentation as augmentation_bench
from bench import datasets
from bench import kernels as kernel_bench
from bench import training as training_bench
from bench.budget import Budget
from bench.compiling import MODES, CompilePolicy
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
PHASES = ("kernels", "augmentation", "training", "sweeps")
ONLY = {"all": PHASES, "kernels": ("kernels", "sweeps"), "training": ("augmentation", "training")}
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
    p.add_argument("--compile-mode", choices=["auto", "none", *MODES], default="auto",
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
    quick = args.quick
    phases = ONLY[args.only]
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
    if "training" in phases:
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
    log = outputs.log

    label = ("CPU smoke" if smoke else device_name(device) + (" (--quick sizes)" if quick else "")) + (
        ", synthetic images" if data is not None and not data.accuracy_valid else "")
    log(f"bench: {label}; device {device_name(device)}; budget {args.budget_seconds:.0f}s; out {out_dir}")
    for note in notes:
        log(f"note: {note}")
    if data is not None:
        log(f"data: {data.note}")

    if args.compile_mode == "none":
        policy = CompilePolicy("none", device.type, skip_reason="skipped: --compile-mode none")
    elif args.compile_mode == "auto" and quick and smoke:
        policy = CompilePolicy("auto", device.type, skip_reason=COMPILE_SKIPPED_IN_QUICK_CPU)
    else:
        policy = CompilePolicy(args.compile_mode, device.type)
    deadlines = phase_deadlines(budget, phases, training_bench.minimum_seconds(configs, device, policy)
                                if "training" in phases else 0.0)

    # The Triton interpreter computes bf16 matmuls wrongly: fp32 on the CPU.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base_shape = kernel_bench.QUICK_SHAPE if quick else kernel_bench.MODEL_SHAPE
    points = kernel_bench.sweep_points(
        base_shape,
        kernel_bench.QUICK_SWEEP_BATCH_SIZES if quick else kernel_bench.SWEEP_BATCH_SIZES,
        kernel_bench.QUICK_SWEEP_SEQ_LENS if quick else kernel_bench.SWEEP_SEQ_LENS)
    # A CPU smoke run sweeps forward+backward only: each interpreted call takes ~0.1 s.
    sweep_modes = ("forward+backward",) if smoke else kernel_bench.MODES

    batch_size = args.batch_size or (QUICK_BATCH_SIZE if quick else 128)
    training_settings = training_bench.TrainingSettings(
        model=TINY_MODEL if quick else FULL_MODEL, epochs=args.epochs, batch_size=batch_size,
        train_subset=6 * batch_size if quick else None, test_subset=64 if quick else None,
        warmup_steps=2 if quick else 10, min_measured_steps=3 if quick else 30, count_steps=2 if quick else 3,
        count_model=COUNT_MODEL if quick else None, count_batch_size=COUNT_BATCH_SIZE if quick else None, data=data.describe() if data else {})

    results = {
        "label": label, "smoke": smoke, "quick": quick, "notes": notes, "complete": False, "phases_done": [],
        "phase_running": None, "device": device_name(device), "device_type": device.type,
        "versions": versions(), "device_properties": device_properties(device), "commit": commit,
        "command": command_line(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "budget_seconds": args.budget_seconds, "elapsed_seconds": 0.0, "data": data.describe() if data else None,
        "settings": {
            "phases": list(phases),
            "kernel_dtype": str(dtype).removeprefix("torch."),
            "kernel_model_shape": asdict(base_shape),
            "sweep_shapes": [{**asdict(p.shape), "in_sweeps": list(p.in_sweeps)} for p in points],
            "sweep_modes": list(sweep_modes),
            "compile_mode": args.compile_mode,
            "compile_policy": policy.describe(),
            "training_configs": [c.key for c in configs],
            "torch_threads": torch.get_num_threads(),
            # fp32 rows are true fp32 unless TF32 is on: say which.
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "timing": ("triton.testing.do_bench, quantiles 0.5/0.2/0.8, L2 flushed before each call" if device.type == "cuda"
                       else "perf_counter loop after a warm-up call (CPU, synchronous)"),
            "training": training_bench.settings_dict(training_settings),
        },
        "published_runs": training_bench.PUBLISHED_RUNS,
        "peaks": {}, "kernels": [], "augmentation": [], "training": [], "timm_step": [], "host_work": None,
        "trimmed": budget.trimmed, "phase_errors": [],
    }

    def write(phase_done=None):
        results["elapsed_seconds"] = budget.elapsed()
        outputs.write(results, phase_done)

    def phase(name, title, fn):
        started = time.perf_counter()
        results["phase_running"] = name
        log(f"== {title}")
        try:
            fn()
        except Exception as error:  # one phase failing still leaves the others' numbers and a report
            results["phase_errors"].append({"phase": name, "error": describe_error(error),
                                            "traceback": traceback.format_exc()})
            log(f"!! {name} failed: {describe_error(error)}\n{traceback.format_exc()}")
        results["phases_done"].append(name)
        results["phase_running"] = None
        log(f"   ({time.perf_counter() - started:.1f}s; {budget.elapsed():.0f}s of {args.budget_seconds:.0f}s used)")
        write(phase_done=name)

    def peaks():
        results["peaks"] = measure_peaks(device, dtype, quick)
        p = results["peaks"]
        log(f"  matmul {p['matmul_tflops']:.3g} TFLOP/s, copy {p['copy_gbps']:.3g} GB/s")

    def kernels_at_model_shape():
        results["kernels"] += [asdict(r) for r in kernel_bench.run_model_shape(
            points, device, dtype, results["peaks"], quick, policy, budget, deadlines["kernels"], log)]

    def augmentation():
        results["augmentation"] = [asdict(r) for r in augmentation_bench.run_augmentation(
            device, augmentation_bench.batch_sizes(quick, batch_size), quick, log)]

    def training():
        def on_row(rows):
            results["training"] = rows
            write()

        outcome = training_bench.run_training(training_settings, configs, device, data, policy, budget,
                                              deadlines["training"], log, on_row)
        results["training"], results["host_work"] = outcome["rows"], outcome["host_work"]
        log(f"-- a training step of timm's {training_bench.TIMM_STEP_MODEL}: fused, timm's own, compiled")
        results["timm_step"] = training_bench.timm_step_rows(device, quick, policy, log)

    def sweeps():
        compile_modes = {r["op"]: r["compile_mode"] for r in results["kernels"]
                         if r["compile_mode"] and r["status"] == "ok" and "model" in r["in_sweeps"]}
        results["kernels"] += [asdict(r) for r in kernel_bench.run_sweeps(
            points, sweep_modes, device, dtype, results["peaks"], quick, policy, compile_modes, budget,
            deadlines["sweeps"], log)]

    write()
    phase("peaks", "peaks", peaks)
    if "kernels" in phases:
        phase("kernels", f"kernels at {base_shape.label()} ({results['settings']['kernel_dtype']})",
              kernels_at_model_shape)
    if "augmentation" in phases:
        phase("augmentation", "augmentation alone (vit/augment.py, uint8 on the device)", augmentation)
    if "training" in phases:
        phase("training", "end-to-end training", training)
    if "sweeps" in phases:
        phase("sweeps", "kernel sweeps", sweeps)

    results["complete"] = True
    failures = ours_failures(results)
    for line in failures:
        log(f"FAILED: {line}")
    log(f"writing {out_dir}: {', '.join(outputs.file_plan()['standalone'])} after {budget.elapsed():.0f}s"
        + (" — CPU smoke: not performance numbers" if smoke else "")
        + (" — synthetic images: accuracy meaningless" if data is not None and not data.accuracy_valid else ""))
    write()
    outputs.close()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
