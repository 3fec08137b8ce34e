"""The session's two steps: step1 (the gpu tests, then the kernel bench, which measures the
plan) and step2 (the real data, the full training run planned from step1's measured step, the
training bench); bench/session/__init__.py says what each runs and why in that order."""
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from bench.measure import REPO
from bench.run import QUICK_BATCH_SIZE, TINY_MODEL
from bench.session.driver import MAX_RESULT_FILES, Session
from vit.environment import atomic_write

# Of step1's time, at most, for compiling the kernels its tests and bench launch (bench/session/warmup.py),
# before the tests: tests/test_h100_compile.py checks the measured compile seconds fit it on 16 cores.
WARMUP_SHARE = 0.2
TESTS_SHARE = 0.4  # of step1's time, at most, for the two test groups after the warm-up (3/4 of it for parity)
# step1's gpu tests: those of the real data run in step2, once it is unpacked.
STEP1_TESTS, STEP2_TESTS = "gpu and not real_data", "gpu and real_data"
# step1's tests in two groups: the bf16 parity tests at the model's shapes first, then the
# determinism tests (their names say so).
TEST_GROUPS = (("bf16 parity", "not determinis"), ("determinism", "determinis"))
# Our kernels' whole-step CUDA graph first, then the eager row step2 plans with; the training
# peers run in step2, on the real data, with more time.
STEP1_TRAINING_CONFIGS = "triton-graphs,triton"
DATA_TESTS_SECONDS = 90  # step2: the gpu tests of the real data (two short bf16 runs of the default model)
# The bench's share of the MAX_RESULT_FILES, beside the session's own (session.log, session.json,
# and step2's metrics.csv and curves.png).
BENCH_FILES = {"step1": MAX_RESULT_FILES - 2, "step2": MAX_RESULT_FILES - 4}
RECIPE_EPOCHS = 200  # the default recipe's schedule, the most the full run trains
# step2 keeps at least this for the training bench after the full run (--bench-seconds): the
# headline pair (triton eager, ~20 s; torch bf16 + compile, ~80 s with its compile) and the report.
BENCH_SECONDS = 150
EPOCH_SAFETY = 1.1  # the plan's per-epoch time is stretched by this before counting epochs
# Seconds train.py spends outside its epochs, before the first (start, imports, data, model,
# CUDA context) and after the last (the best checkpoint's evaluation, confusion and mistakes
# plots): allowances, since neither is measured before the run.
STARTUP_SECONDS = {"cuda": 25.0, "cpu": 15.0}
FINISH_SECONDS = {"cuda": 15.0, "cpu": 10.0}
PROBE_SECONDS = 60  # step2 without a plan from step1: a bench row of the triton step, this long
MARGIN_SECONDS = 10  # kept at the end of a step for writing session.json


def _junit_summary(path: Path) -> dict:
    """Counts and the failed tests (with the first line of why) from pytest's junit XML."""
    if not path.exists():
        return {"report": "missing (pytest did not finish)"}
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    totals = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        for problem in list(case.findall("failure")) + list(case.findall("error")):
            message = (problem.get("message") or problem.text or "").strip().splitlines()
            failed.append(f"{case.get('classname')}::{case.get('name')}: {message[0][:300] if message else ''}")
    totals["passed"] = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
    return {**totals, "failed": failed}


def plan_from_bench(results_json: Path) -> dict | None:
    """What step2 needs to plan the full run, from a bench run's triton training row."""
    if not results_json.exists():
        return None
    results = json.loads(results_json.read_text())
    row = next((r for r in results.get("training", []) if r["key"] == "triton" and r["status"] == "ok"), None)
    if row is None:
        return None
    data = results["data"]
    settings = results["settings"]["training"]
    return {"source": f"{results_json} (row {row['name']}, {row['measured_steps']} steady steps)",
            "device": results["device"], "model": settings["model"], "batch_size": settings["batch_size"],
            "step_seconds": row["step_ms"] / 1e3, "eval_seconds_per_image": row["eval_seconds"] / data["test_images"],
            "host_work_seconds": row["host_work_seconds"], "overhead_seconds": row["overhead_seconds"]}


def _pytest(markers: str, expression: str | None, junit: Path) -> list[str]:
    return [sys.executable, "-m", "pytest", "-m", markers, *(["-k", expression] if expression else []),
            "-p", "no:cacheprovider", "-q", "-rfEs", f"--junitxml={junit}"]


def test_shards(node_ids: list[str], workers: int) -> list[list[str]]:
    """The test files of node_ids (pytest's "path::name[...]"), spread over at most `workers`
    shards with about as many tests each: the files with the most tests first, each to the
    shard with the fewest so far. A file stays whole (its kernels compile once, in one process)."""
    counts: dict[str, int] = {}
    for node in node_ids:
        path = node.split("::")[0]
        counts[path] = counts.get(path, 0) + 1
    shards = [[] for _ in range(max(1, min(workers, len(counts))))]
    sizes = [0] * len(shards)
    for path in sorted(counts, key=lambda p: (-counts[p], p)):
        smallest = sizes.index(min(sizes))
        shards[smallest].append(path)
        sizes[smallest] += counts[path]
    return [shard for shard in shards if shard]


def _collect(session: Session, markers: str, expression: str, seconds: float) -> list[str]:
    """The node ids pytest selects (an empty list when it selects none or cannot collect)."""
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "tests", "-m", markers, "-k", expression,
                               "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=REPO,
                              env=session.environment(), capture_output=True, text=True, timeout=max(1.0, seconds))
    except subprocess.TimeoutExpired:
        return []
    return [line for line in proc.stdout.splitlines() if "::" in line]


def run_test_group(session: Session, title: str, expression: str, index: int, until: float):
    """One group of step1's tests, its files in parallel pytest processes (one substep each)."""
    node_ids = _collect(session, STEP1_TESTS, expression, until - time.perf_counter())
    shards = test_shards(node_ids, os.cpu_count() or 1) or [["tests"]]  # nothing collected: pytest says why
    substeps = [None] * len(shards)

    def run_shard(k: int):
        junit = session.work / f"pytest-{index + 1}-{k + 1}.xml"
        junit.unlink(missing_ok=True)
        name = f"tests: {title}" + (f" ({k + 1} of {len(shards)})" if len(shards) > 1 else "")
        # The shards share the CPUs: more compute threads than cores would spin against each other.
        substep = session.run(name, [*_pytest(STEP1_TESTS, expression, junit), *shards[k]], until - time.perf_counter(),
                              threads=max(1, (os.cpu_count() or 1) // len(shards)))
        substep["tests"] = _junit_summary(junit)
        substeps[k] = substep

    threads = [threading.Thread(target=run_shard, args=(k,)) for k in range(len(shards))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # pytest exits 5 when nothing was selected: no GPU tests is not a failure of the code.
    if any(substep["exit_code"] not in (0, 5) for substep in substeps):
        session.failed = True
    session.save()


def warm_up(session: Session) -> None:
    """Compile the kernels step1's tests and bench launch into Triton's cache, all cores at a time
    (bench/session/warmup.py), its report in session.json; on the interpreter it lists them and
    says there is nothing to compile."""
    report = session.work / "warmup.json"
    report.unlink(missing_ok=True)
    substep = session.run("compile the kernels of the tests and the bench",
                          [sys.executable, "-m", "bench.session.warmup", "--json", str(report)],
                          WARMUP_SHARE * session.args.seconds)
    if report.exists():
        done = json.loads(report.read_text())
        substep["warmup"] = {"configurations": len(done["configurations"]), "compiled": len(done["compiled"]),
                             "nothing_to_compile": done.get("nothing_to_compile"), "seconds": done["seconds"],
                             "slowest": sorted(done["compiled"], key=lambda c: -c["seconds"])[:3],
                             "failed": [c for c in done["compiled"] if c["error"]]}
    else:
        substep["warmup"] = {"report": "missing (the warm-up did not finish: the tests compile what is left)"}
    # Whatever the warm-up did not compile the tests and the bench compile themselves, and judge: it fails
    # no step.
    session.save()


def step1(session: Session) -> None:
    (session.work / "plan.json").unlink(missing_ok=True)  # a plan is this step's, or none
    warm_up(session)
    tests_started = time.perf_counter()
    for index, (title, expression) in enumerate(TEST_GROUPS):
        # The parity group may not take all of the determinism group's time.
        until = tests_started + (0.75 if index == 0 else 1.0) * TESTS_SHARE * session.args.seconds
        run_test_group(session, title, expression, index, until)

    bench_out = session.results / "bench"
    substep = session.run_bench("kernel bench", bench_out, session.left() - MARGIN_SECONDS, BENCH_FILES["step1"],
                                "--data", "synthetic", "--training-configs", STEP1_TRAINING_CONFIGS)
    if substep["exit_code"] != 0:
        session.failed = True
    plan = plan_from_bench(bench_out / "results.json")
    session.record["plan"] = plan or {"missing": "the bench measured no triton training row; step2 measures one"}
    if plan:
        atomic_write(session.work / "plan.json", lambda tmp: tmp.write_text(json.dumps(plan, indent=2) + "\n"))
        session.say(f"plan for step2: {plan['step_seconds'] * 1e3:.2f} ms per step of {plan['batch_size']}, "
                    f"host work {plan['host_work_seconds']:.2f} s per epoch (saved to {session.work / 'plan.json'})")
    session.save()


# ---------------------------------------------------------------------------------- step 2

def _cifar_sizes(data_dir: Path) -> tuple[int, int]:
    from vit.data import load_cifar10

    data = load_cifar10(data_dir, download=False)
    return len(data.train_labels), len(data.test_labels)


def _real_data(session: Session) -> tuple[Path | None, str]:
    """(folder holding cifar-10-batches-py, how it got there) or (None, why there is none)."""
    if session.args.data_dir:
        return Path(session.args.data_dir).resolve(), f"--data-dir {session.args.data_dir}"
    target = session.work / "data"
    if (target / "cifar-10-batches-py" / "batches.meta").exists():  # device_data.py writes it last
        return target, f"unpacked earlier in {target}"
    tool = session.work / "device_data.py"
    parts = [session.work / f"part{k}.xz" for k in range(2)]
    missing = [str(p) for p in [tool, *parts] if not p.exists()]
    if missing:
        return None, (f"missing {', '.join(missing)} (each command carries one part; the machine must stay warm "
                      "between the two, so that step1's part is still there)")
    substep = session.run("unpack CIFAR-10", [sys.executable, str(tool), "unpack", str(session.work), str(target)],
                          min(120.0, session.left()))
    if substep["exit_code"] != 0:
        return None, f"device_data.py unpack failed (exit {substep['exit_code']})"
    return target, f"unpacked from {parts[0]} and {parts[1]}"


def _probe(session: Session, data_dir: Path) -> dict | None:
    """No plan from step1: measure the triton training step here (a short bench row)."""
    out = session.work / "probe"
    shutil.rmtree(out, ignore_errors=True)
    session.run_bench("measure the triton step (no plan from step1)", out, PROBE_SECONDS, 3, "--only", "training",
                      "--training-configs", "triton", "--data-dir", str(data_dir))
    return plan_from_bench(out / "results.json")


def plan_epochs(plan: dict, seconds: float, train_images: int, test_images: int, device_type: str,
                max_epochs: int = RECIPE_EPOCHS) -> dict:
    """How many epochs of the recipe fit in `seconds` (at most max_epochs), from a measured step."""
    steps = train_images // plan["batch_size"]
    epoch = (steps * plan["step_seconds"] + test_images * plan["eval_seconds_per_image"]
             + plan["host_work_seconds"]) * EPOCH_SAFETY
    fixed = STARTUP_SECONDS[device_type] + FINISH_SECONDS[device_type] + plan["overhead_seconds"]
    fits = math.floor((seconds - fixed) / epoch) if seconds > fixed else 0
    return {"epoch_seconds_estimate": epoch, "fixed_seconds_estimate": fixed, "seconds_available": seconds,
            "epochs_that_fit": fits, "max_epochs": max_epochs, "epochs": max(0, min(max_epochs, fits)),
            "steps_per_epoch": steps}


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _full_run_summary(rows: list[dict], epochs: int, stopped: bool, exit_code: int | None, wall: float,
                      estimate: dict) -> dict:
    done = len(rows)
    if epochs == RECIPE_EPOCHS:
        label = "the default recipe, all 200 epochs"
    else:
        why = (f"--max-epochs {epochs}" if estimate["epochs_that_fit"] > epochs else
               f"200 did not fit ({estimate['epoch_seconds_estimate']:.2f}s per epoch estimated from a measured step, "
               f"{estimate['seconds_available']:.0f}s available)")
        label = (f"the default recipe shortened to {epochs} epochs (--epochs {epochs}: warm-up and cosine over "
                 f"{epochs} epochs), not the 200-epoch recipe: {why}")
    if done < epochs:
        label += f"; STOPPED after {done} of {epochs} epochs" + (" at the time limit" if stopped else "") + \
                 ": the accuracy is mid-schedule"
    summary = {"label": label, "epochs_planned": epochs, "epochs_done": done, "complete": done == epochs and exit_code == 0,
               "exit_code": exit_code, "stopped_at_time_limit": stopped, "wall_seconds": round(wall, 1),
               "train_seconds": round(sum(float(r["epoch_seconds"]) for r in rows), 1)}
    if rows:
        best = max(rows, key=lambda r: float(r["test_acc"]))
        summary.update(final_test_acc=float(rows[-1]["test_acc"]), best_test_acc=float(best["test_acc"]),
                       best_epoch=int(best["epoch"]), images_per_second_last_epoch=float(rows[-1]["images_per_second"]))
    return summary


def full_run(session: Session, data_dir: Path, plan: dict) -> None:
    train_images, test_images = _cifar_sizes(data_dir)
    available = session.left() - session.args.bench_seconds - MARGIN_SECONDS
    estimate = plan_epochs(plan, available, train_images, test_images, "cpu" if session.dry_run else "cuda",
                           session.args.max_epochs)
    session.record["full_run_plan"] = {**estimate, "plan": plan, "train_images": train_images,
                                       "test_images": test_images}
    epochs = estimate["epochs"]
    if epochs < 1:
        session.record["full_run"] = {"skipped": f"not even one epoch fits: {estimate}"}
        session.say(f"!! full run skipped: not even one epoch fits ({estimate})")
        session.failed = True
        session.save()
        return
    run_dir = session.work / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    command = [sys.executable, "train.py", "--backend", "triton", "--data-dir", str(data_dir), "--out-dir",
               str(run_dir), "--epochs", str(epochs), "--no-progress"]
    if session.dry_run:
        command += ["--device", "cpu", "--batch-size", str(QUICK_BATCH_SIZE)] + [
            f"--{k.replace('_', '-')}={v}" for k, v in TINY_MODEL.items() if k != "num_classes"]
    started = time.perf_counter()

    def copy_run_files():
        for name in ("metrics.csv", "curves.png"):
            if (run_dir / name).exists():
                data = (run_dir / name).read_bytes()
                atomic_write(session.results / name, lambda tmp: tmp.write_bytes(data))

    def on_line(line: str):
        # train.py prints an epoch's line after writing its metrics.csv and curves.png: copy
        # them now, so a command stopped later still returns the epochs done.
        if line.startswith("epoch ") and "test loss" in line:
            copy_run_files()

    substep = session.run(f"full training run ({epochs} epochs)", command,
                          session.left() - session.args.bench_seconds / 2 - MARGIN_SECONDS, on_line=on_line)
    copy_run_files()
    summary = _full_run_summary(_read_metrics(run_dir / "metrics.csv"), epochs, substep["stopped_at_time_limit"],
                                substep["exit_code"], time.perf_counter() - started, estimate)
    summary.update(run_dir=str(run_dir), backend="triton", device=session.record["device"],
                   commit=session.record["commit"]["commit"], date=session.record["started"], data=str(data_dir))
    session.record["full_run"] = summary
    if substep["exit_code"] != 0 and not substep["stopped_at_time_limit"]:
        session.failed = True
    accuracy = f"final test accuracy {summary['final_test_acc']:.2%}" if "final_test_acc" in summary else "no epoch"
    session.say(f"full run: {summary['label']}; {accuracy}; {summary['wall_seconds']:.0f}s wall clock")
    session.save()


def step2(session: Session) -> None:
    data_dir, how = _real_data(session)
    session.record["data"] = {"dir": str(data_dir) if data_dir else None, "how": how}
    session.save()
    if data_dir is not None:
        session.data_dir = data_dir
        junit = session.work / "pytest-data.xml"
        junit.unlink(missing_ok=True)
        substep = session.run("tests: the real data", [*_pytest(STEP2_TESTS, None, junit), "tests"],
                              min(DATA_TESTS_SECONDS, session.left() - MARGIN_SECONDS))
        substep["tests"] = _junit_summary(junit)
        if substep["exit_code"] not in (0, 5):
            session.failed = True
        session.save()
    if data_dir is None:
        session.say(f"no real CIFAR-10 ({how}): no full run; the training bench runs on synthetic images")
        session.record["full_run"] = {"skipped": f"no real CIFAR-10: {how}"}
        session.failed = True
    else:
        try:
            plan_path = session.work / "plan.json"
            plan = json.loads(plan_path.read_text()) if plan_path.exists() else _probe(session, data_dir)
            session.record["plan"] = plan or {"missing": "no triton training step could be measured"}
            if plan is None:
                session.record["full_run"] = {"skipped": "no measured triton step to plan with"}
                session.failed = True
            else:
                full_run(session, data_dir, plan)
        except Exception as error:  # the training bench still gets its time
            session.record["full_run"] = {"error": f"{type(error).__name__}: {error}"}
            session.failed = True
            session.say(f"!! full run: {type(error).__name__}: {error}")
            session.save()
    data_flags = ["--data-dir", str(data_dir)] if data_dir else ["--data", "synthetic"]
    configs = ["--training-configs", session.args.bench_configs] if session.args.bench_configs else []
    substep = session.run_bench("training bench", session.results / "bench", session.left() - MARGIN_SECONDS,
                                BENCH_FILES["step2"], "--only", "training", *data_flags, *configs)
    if substep["exit_code"] != 0:
        session.failed = True
