"""`python -m bench`: time the kernels and real CIFAR-10 training, side by side with what a
user would pick instead, check the results are right, and write a report.

Phases, in the order they get the budget:
  1. peaks: the device's matmul FLOP/s and copy bandwidth, measured now;
  2. kernels at the model's shape, every op, provider and mode (never trimmed);
  3. the batched augmentation alone, images/s at batch 128 and 512;
  4. end-to-end training, one configuration after the other, each with its share;
  5. kernel sweeps over batch size and sequence length, with what is left;
then results.json, kernels.csv, training.csv, report.md and the plots.
"""
import argparse
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from bench import augmentation as augmentation_bench
from bench import kernels as kernel_bench
from bench import report
from bench import training as training_bench
from bench.budget import Budget
from bench.measure import (REPO, command_line, describe_error, device_properties, device_slug, git_commit,
                           measure_peaks)
from vit.environment import device_name, parse_device, versions

DEFAULT_BUDGET_SECONDS = 510  # under 9 minutes: one 10-minute command with room to start and copy
REPORT_RESERVE_SECONDS = 15  # writing the report and the plots
SWEEP_SHARE = 0.15  # of the budget, kept for the sweeps while training runs
COMPILE_SKIPPED_IN_QUICK_CPU = "skipped in --quick CPU smoke: compile time dominates"
# Patches of 8: 17 tokens, like the quick kernel shape. With the model's 65 tokens one step of
# the Triton interpreter takes ~20 s on a CPU core; with 17, about one.
TINY_MODEL = {"image_size": 32, "patch_size": 8, "num_classes": 10, "dim": 32, "depth": 1, "heads": 2,
              "mlp_dim": 32, "dropout": 0.0}
FULL_MODEL = {"image_size": 32, "patch_size": 4, "num_classes": 10, "dim": 384, "depth": 7, "heads": 12,
              "mlp_dim": 384, "dropout": 0.0}


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except those the help text explains (None) and off switches."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available; a CPU run "
                                                  "is always a smoke run at --quick sizes)")
    p.add_argument("--quick", action="store_true", help="tiny kernel shapes, a tiny model, a few dozen images")
    p.add_argument("--out", default=None, help="output folder (default: bench/results/<date>-<device>-<commit>)")
    p.add_argument("--budget-seconds", type=positive_float, default=DEFAULT_BUDGET_SECONDS,
                   help="wall-clock bound for the whole run; sweeps and training are trimmed to fit, and the "
                        "report says what was trimmed")
    p.add_argument("--epochs", type=positive_int, default=1, help="training epochs per configuration, at most")
    p.add_argument("--batch-size", type=positive_int, default=None, help="training batch size (default: the "
                                                                          "recipe's 128; 8 with --quick)")
    p.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py (default: ./data, then "
                                                    "../shared/data beside the checkout)")
    p.add_argument("--only", choices=["all", "kernels", "training"], default="all", help="run one half only")
    p.add_argument("--compile-providers", choices=["auto", "run", "skip"], default="auto",
                   help="torch.compile rows, kernels and training; auto skips them in a --quick CPU run")
    return p


def find_real_data() -> Path | None:
    from vit.data import FOLDER, TEST_FILE
    for candidate in (Path("data"), REPO / "data", REPO.parent / "shared" / "data"):
        if (candidate / FOLDER / TEST_FILE).exists() or (candidate / TEST_FILE).exists():
            return candidate
    return None


def write_generated_cifar(root: Path, train_per_batch: int, num_test: int) -> Path:
    """Random images in the official python-version layout, for a smoke run without the data set."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in [(f"data_batch_{i}", train_per_batch) for i in range(1, 6)] + [("test_batch", num_test)]:
        batch = {b"labels": [int(x) for x in rng.integers(0, 10, count)],
                 b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8)}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in names]}, f)
    return root


def default_out_dir(device: torch.device, commit: dict) -> Path:
    sha = commit["commit"] + ("-dirty" if commit.get("dirty") else "")
    return REPO / "bench" / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}-{device_slug(device)}-{sha}"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = parse_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    smoke = device.type == "cpu"
    notes = []
    if smoke and not args.quick:
        args.quick = True
        notes.append("--device cpu runs at --quick sizes: the Triton interpreter would take hours at the model's")
    quick = args.quick
    if smoke:
        # One thread: with several, OpenMP's barriers stall for tens of ms whenever another
        # process holds a core (CI runners, shared machines), and the smoke run crawls.
        torch.set_num_threads(1)
    budget = Budget(args.budget_seconds)
    commit = git_commit()
    out_dir = Path(args.out) if args.out else default_out_dir(device, commit)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(out_dir / "log.txt", "w")

    def log(line: str):
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    label = "CPU smoke" if smoke else (f"{device_name(device)}" + (" (--quick sizes)" if quick else ""))
    log(f"bench: {label}; device {device_name(device)}; budget {args.budget_seconds:.0f}s; out {out_dir}")
    for note in notes:
        log(f"note: {note}")

    compile_skip_reason = None
    if args.compile_providers == "skip":
        compile_skip_reason = "skipped by --compile-providers skip"
    elif args.compile_providers == "auto" and quick and smoke:
        compile_skip_reason = COMPILE_SKIPPED_IN_QUICK_CPU

    # The Triton interpreter computes bf16 matmuls wrongly: fp32 on the CPU.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base_shape = kernel_bench.QUICK_SHAPE if quick else kernel_bench.MODEL_SHAPE
    points = kernel_bench.sweep_points(
        base_shape,
        kernel_bench.QUICK_SWEEP_BATCH_SIZES if quick else kernel_bench.SWEEP_BATCH_SIZES,
        kernel_bench.QUICK_SWEEP_SEQ_LENS if quick else kernel_bench.SWEEP_SEQ_LENS)
    # A CPU smoke run sweeps forward+backward only: each interpreted call takes ~0.1 s.
    sweep_modes = ("forward+backward",) if smoke else kernel_bench.MODES

    generated_data = None
    data_dir = Path(args.data_dir) if args.data_dir else find_real_data()
    if args.data_dir:
        data_note = f"CIFAR-10 from {data_dir} (downloaded there if missing)"
    elif data_dir is not None:
        data_note = f"real CIFAR-10 from {data_dir.resolve()}"
    elif quick:
        generated_data = tempfile.TemporaryDirectory(prefix="bench-cifar-")
        data_dir = write_generated_cifar(Path(generated_data.name), train_per_batch=64, num_test=256)
        data_note = "GENERATED random images (the real CIFAR-10 was not found): test accuracy is meaningless"
    else:
        data_dir = Path(args.data_dir or "data")
        data_note = f"CIFAR-10 from {data_dir} (downloaded there if missing)"
    batch_size = args.batch_size or (8 if quick else 128)
    training_settings = training_bench.TrainingSettings(
        model=TINY_MODEL if quick else FULL_MODEL, epochs=args.epochs, batch_size=batch_size, data_dir=str(data_dir),
        train_subset=6 * batch_size if quick else None, test_subset=64 if quick else None,
        warmup_steps=2 if quick else 10, min_measured_steps=3 if quick else 30, augment="gpu", num_workers=0,
        data_note=data_note)

    results = {
        "label": label, "smoke": smoke, "quick": quick, "notes": notes,
        "device": device_name(device), "device_type": device.type,
        "versions": versions(), "device_properties": device_properties(device), "commit": commit, "command": command_line(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "budget_seconds": args.budget_seconds,
        "settings": {
            "kernel_dtype": str(dtype).removeprefix("torch."),
            "kernel_model_shape": asdict(base_shape),
            "sweep_shapes": [{**asdict(p.shape), "in_sweeps": list(p.in_sweeps)} for p in points],
            "sweep_modes": list(sweep_modes),
            "compile_mode": kernel_bench.compile_mode(device),
            "torch_threads": torch.get_num_threads(),
            # fp32 rows are true fp32 unless TF32 is on: say which.
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "timing": ("triton.testing.do_bench, quantiles 0.5/0.2/0.8, L2 flushed before each call" if device.type == "cuda"
                       else "perf_counter loop after a warm-up call (CPU, synchronous)"),
            "training": training_bench.settings_dict(training_settings),
        },
        "published_runs": training_bench.PUBLISHED_RUNS,
        "peaks": {}, "kernels": [], "augmentation": [], "training": [], "trimmed": budget.trimmed, "phase_errors": [],
    }

    def phase(name, fn):
        started = time.perf_counter()
        log(f"== {name}")
        try:
            fn()
        except Exception as error:  # one phase failing still leaves the others' numbers and a report
            results["phase_errors"].append({"phase": name, "error": describe_error(error),
                                            "traceback": traceback.format_exc()})
            log(f"!! {name} failed: {describe_error(error)}\n{traceback.format_exc()}")
        log(f"   ({time.perf_counter() - started:.1f}s; {budget.elapsed():.0f}s of {args.budget_seconds:.0f}s used)")

    def peaks():
        results["peaks"] = measure_peaks(device, dtype, quick)
        p = results["peaks"]
        log(f"  matmul {p['matmul_tflops']:.3g} TFLOP/s, copy {p['copy_gbps']:.3g} GB/s")

    def kernels_at_model_shape():
        results["kernels"] += [asdict(r) for r in kernel_bench.run_model_shape(
            points, device, dtype, results["peaks"], quick, compile_skip_reason, log)]

    def training():
        deadline = budget.end() - REPORT_RESERVE_SECONDS
        if args.only == "all":
            deadline -= SWEEP_SHARE * args.budget_seconds
        results["training"] = [asdict(r) for r in training_bench.run_training(
            training_settings, device, budget, deadline, compile_skip_reason, log)]

    def augmentation():
        results["augmentation"] = [asdict(r) for r in augmentation_bench.run_augmentation(
            device, augmentation_bench.batch_sizes(quick, batch_size), quick, log)]

    def sweeps():
        deadline = budget.end() - REPORT_RESERVE_SECONDS
        compile_seconds = [r["compile_seconds"] for r in results["kernels"] if r["compile_seconds"] is not None]
        results["kernels"] += [asdict(r) for r in kernel_bench.run_sweeps(
            points, sweep_modes, device, dtype, results["peaks"], quick, compile_skip_reason, budget, deadline, log,
            compile_seconds)]

    phase("peaks", peaks)
    if args.only in ("all", "kernels"):
        phase(f"kernels at {base_shape.label()} ({results['settings']['kernel_dtype']})", kernels_at_model_shape)
    if args.only in ("all", "training"):
        phase("augmentation alone (vit/augment.py, uint8 on the device)", augmentation)
        phase("end-to-end training", training)
    if args.only in ("all", "kernels"):
        phase("kernel sweeps", sweeps)

    results["elapsed_seconds"] = budget.elapsed()
    results["plots"] = report.write_plots(results, out_dir)
    report.write_results(results, out_dir)
    report.write_report(results, out_dir)
    log(f"wrote {out_dir}/report.md, results.json, kernels.csv, training.csv and {len(results['plots'])} plots "
        f"in {budget.elapsed():.0f}s" + (" — CPU smoke: not performance numbers" if smoke else ""))
    log_file.close()
    if generated_data is not None:
        generated_data.cleanup()
    return 1 if results["phase_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
