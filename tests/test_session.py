"""The prepared GPU session (bench/session/), dry-run on the CPU at tiny sizes: both steps
run with the flags and paths the GPU machine will see, write only under their results folder
(and the scratch folder), within the 8 files that come back, and record what a GPU run must
report (test outcomes, the plan, the full run's accuracy and wall clock, the benches).

The dry run takes several minutes of one core: the two test groups, the bench's kernel phase
and its interpreted triton row, a two-epoch training run of a tiny model through the Triton
interpreter, and a training bench of one torch row. Its work is bounded by the tiny sizes, the
sweeps' shapes, --max-epochs and --bench-configs; its seconds budgets are far above what that work
takes, so that a slow or busy machine cannot fail it: it runs beside a CPU-bound job of its own
(a second process spinning) to prove it.
"""
import csv
import json
import os
import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

import bench.session
from bench.session import driver, steps
from conftest import write_cifar_folder

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.minutes(6)  # CPU minutes on 2 cores: both steps dry-run beside a CPU-bound job
FILE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
HANG_GUARD_SECONDS = 1800  # each step's budget: far above the minutes its bounded work takes
# A second CPU-bound job beside the dry run, bounded: it spins for at most the dry run's hang guard.
BURNER = f"import time\nend = time.monotonic() + {2 * HANG_GUARD_SECONDS}\nwhile time.monotonic() < end:\n    pass"


def _repository_outputs() -> set[str]:
    """Where a run could leave files in the repository."""
    return {str(p.relative_to(REPO)) for folder in ("runs", "data", "bench/results", ".device-data")
            if (REPO / folder).exists() for p in (REPO / folder).rglob("*")}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("session")
    data = root / "data"
    write_cifar_folder(data, per_batch=4, num_test=50)  # 20 training images: 2 steps of 8 an epoch
    # train.py ends with per-class accuracies of the best checkpoint: every class must be there.
    from vit.data import load_cifar10
    assert set(load_cifar10(data, download=False).test_labels.tolist()) == set(range(10))
    work, step1_out, step2_out = root / "work", root / "step1", root / "step2"
    before = _repository_outputs()
    runs = {}
    # The work is bounded by the tiny sizes (the sweeps end when every shape is done), by
    # --max-epochs and by --bench-configs; the seconds budgets and the timeouts are hang guards.
    burner = subprocess.Popen([sys.executable, "-c", BURNER])
    try:
        for name, out, flags in (("step1", step1_out, ["--seconds", str(HANG_GUARD_SECONDS)]),
                                 ("step2", step2_out, ["--seconds", str(HANG_GUARD_SECONDS), "--max-epochs", "2",
                                                       "--bench-configs", "torch-fp32", "--data-dir", str(data)])):
            proc = subprocess.run([sys.executable, "-m", "bench.session", name, str(out), "--device", "cpu",
                                   "--work", str(work), *flags], cwd=REPO, capture_output=True, text=True,
                                  timeout=2 * HANG_GUARD_SECONDS)
            runs[name] = {"proc": proc, "out": out, "session": json.loads((out / "session.json").read_text())}
        burner_ran = burner.poll() is None  # still spinning: it ran beside both steps
    finally:
        burner.kill()
        burner.wait()
    return {**runs, "work": work, "data": data, "repository_changed": _repository_outputs() - before,
            "burner_ran": burner_ran}


def _files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("step", ["step1", "step2"])
def test_each_step_succeeds_and_leaves_at_most_8_files_a_gpu_machine_returns(dry_run, step):
    run = dry_run[step]
    proc, session = run["proc"], run["session"]
    assert proc.returncode == 0, f"{proc.stdout[-5000:]}\n{proc.stderr[-3000:]}"
    files = _files(run["out"])
    assert 1 <= len(files) <= driver.MAX_RESULT_FILES, files
    for path in files:
        assert len(path.parts) <= 2 and all(FILE_NAME.match(part) for part in path.parts), path  # $OUT/a/file
        assert not path.name.endswith(".tmp")
    assert session["complete"] is True and session["exit_code"] == 0 and session["dry_run"] is True
    assert sorted(session["files"]) == sorted(str(p) for p in files)
    assert session["commit"]["commit"] != "unknown" and session["device"].startswith("cpu")
    log = (run["out"] / "session.log").read_text()
    assert log.startswith(f"{step}: cpu") and f"{step}: done" in log


def test_nothing_is_written_in_the_repository(dry_run):
    assert dry_run["repository_changed"] == set()


def test_the_dry_run_passed_beside_a_cpu_bound_job(dry_run):
    assert dry_run["burner_ran"]
    for step in ("step1", "step2"):
        assert dry_run[step]["proc"].returncode == 0
        assert not any(s.get("stopped_at_time_limit") for s in dry_run[step]["session"]["substeps"])


def _test_groups(session: dict) -> dict[str, list[dict]]:
    groups = {}
    for substep in session["substeps"]:
        if substep["name"].startswith("tests: "):
            groups.setdefault(substep["name"].split(" (")[0].removeprefix("tests: "), []).append(substep)
    return groups


def _shard_files(command: list[str]) -> list[str]:
    """The test files a shard's pytest command names (after its options)."""
    junit = next(k for k, part in enumerate(command) if part.startswith("--junitxml="))
    return command[junit + 1:]


def test_step1_runs_the_gpu_tests_parity_first_in_parallel_files_then_the_kernel_bench(dry_run):
    session = dry_run["step1"]["session"]
    names = [s["name"] for s in session["substeps"]]
    groups = _test_groups(session)
    assert list(groups) == ["bf16 parity", "determinism"] and names[-1] == "kernel bench"
    # First the warm-up, which on the interpreter lists the kernel configurations and compiles none.
    warm = session["substeps"][0]
    assert warm["name"] == "compile the kernels of the tests and the bench" and warm["exit_code"] == 0
    assert warm["warmup"]["configurations"] > 0 and warm["warmup"]["compiled"] == 0
    assert "interpreter" in warm["warmup"]["nothing_to_compile"]
    assert names.index(groups["determinism"][0]["name"]) > max(names.index(s["name"]) for s in groups["bf16 parity"])
    for shards, expression in ((groups["bf16 parity"], "not determinis"), (groups["determinism"], "determinis")):
        files = [path for shard in shards for path in _shard_files(shard["command"])]
        for shard in shards:
            command = shard["command"]
            assert command[1:7] == ["-m", "pytest", "-m", steps.STEP1_TESTS, "-k", expression]
            assert shard["threads"] == max(1, (os.cpu_count() or 1) // len(shards))  # the CPUs shared out
            assert shard["exit_code"] == 0 and shard["tests"]["tests"] > 0 and shard["tests"]["failed"] == []
            # On the CPU every gpu test skips.
            assert shard["tests"]["skipped"] == shard["tests"]["tests"]
        assert len(files) == len(set(files)) and all(f.startswith("tests/test_") for f in files)  # each file once
    # The parity group holds the model-shape bf16 tests.
    assert sum(s["tests"]["tests"] for s in groups["bf16 parity"]) >= 5
    assert sum(s["tests"]["tests"] for s in groups["determinism"]) >= 2
    bench = session["substeps"][-1]
    assert bench["exit_code"] == 0 and not bench["stopped_at_time_limit"]
    command = bench["command"]
    for flag, value in (("--data", "synthetic"), ("--training-configs", "triton-graphs,triton"), ("--max-files", "6"),
                        ("--out", str(dry_run["step1"]["out"] / "bench")), ("--device", "cpu")):
        assert command[command.index(flag) + 1] == value
    results = json.loads((dry_run["step1"]["out"] / "bench" / "results.json").read_text())
    assert results["complete"] and results["label"] == "CPU smoke, synthetic images"
    graphs, eager = results["training"]  # the CUDA-graph row first; on the CPU it cannot run
    assert graphs["key"] == "triton-graphs" and graphs["status"] == "skipped" and "CUDA" in graphs["skipped_reason"]
    assert eager["key"] == "triton" and eager["status"] == "ok"
    assert results["kernels"] and results["phases_done"][:2] == ["peaks", "kernels"]


def test_step2_runs_the_gpu_tests_of_the_real_data_where_it_found_the_data(dry_run):
    (tests,) = _test_groups(dry_run["step2"]["session"])["the real data"]
    assert tests["command"][1:5] == ["-m", "pytest", "-m", steps.STEP2_TESTS] and tests["command"][-1] == "tests"
    assert tests["exit_code"] == 0 and tests["tests"]["tests"] >= 1  # skipped on the CPU
    log = (dry_run["step2"]["out"] / "session.log").read_text()
    assert "tests: the real data" in log


def test_test_files_are_spread_over_shards_whole_and_largest_first():
    nodes = ([f"tests/test_a.py::t{i}" for i in range(5)] + [f"tests/test_b.py::t{i}" for i in range(3)]
             + [f"tests/test_c.py::t{i}" for i in range(2)] + ["tests/test_d.py::t0"])
    # 5 tests, then 3 + 2, then 1 to the first of the two equal shards.
    assert steps.test_shards(nodes, 2) == [["tests/test_a.py", "tests/test_d.py"], ["tests/test_b.py", "tests/test_c.py"]]
    assert steps.test_shards(nodes, 3) == [["tests/test_a.py"], ["tests/test_b.py"], ["tests/test_c.py", "tests/test_d.py"]]
    assert steps.test_shards(nodes, 16) == [[f"tests/test_{x}.py"] for x in "abcd"]
    assert steps.test_shards([], 4) == []


def test_the_real_data_is_found_where_vit_data_dir_says(tmp_path):
    """The GPU machine has no ../shared: the session points the tests at the data it unpacked."""
    data = tmp_path / "elsewhere"
    write_cifar_folder(data, per_batch=2, num_test=3)
    probe = ("import conftest; print(conftest.has_real_cifar(), conftest.REAL_DATA)")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO / "tests", capture_output=True, text=True,
                          env={**os.environ, "VIT_DATA_DIR": str(data)}, timeout=600)
    assert proc.stdout.split() == ["True", str(data)], proc.stderr


def test_step1_hands_step2_a_plan_measured_from_the_triton_step(dry_run):
    session = dry_run["step1"]["session"]
    plan = json.loads((dry_run["work"] / "plan.json").read_text())
    assert session["plan"] == plan
    results = json.loads((dry_run["step1"]["out"] / "bench" / "results.json").read_text())
    row = next(r for r in results["training"] if r["key"] == "triton")  # the eager row, after the graph one
    assert plan["step_seconds"] == pytest.approx(row["step_ms"] / 1e3) and plan["batch_size"] == 8
    assert plan["host_work_seconds"] == row["host_work_seconds"] > 0
    assert plan["eval_seconds_per_image"] == pytest.approx(row["eval_seconds"] / 10_000)


def test_step2_trains_the_planned_epochs_and_returns_metrics_curves_accuracy_and_wall_clock(dry_run):
    out, session = dry_run["step2"]["out"], dry_run["step2"]["session"]
    assert session["data"] == {"dir": str(dry_run["data"]), "how": f"--data-dir {dry_run['data']}"}
    run, estimate = session["full_run"], session["full_run_plan"]
    assert estimate["epochs"] == run["epochs_planned"] and estimate["train_images"] == 20
    train = next(s for s in session["substeps"] if s["name"].startswith("full training run"))
    command = train["command"]
    assert command[1:4] == ["train.py", "--backend", "triton"]
    assert command[command.index("--epochs") + 1] == str(run["epochs_planned"])
    assert "--out-dir" in command and command[command.index("--out-dir") + 1].startswith(str(dry_run["work"]))
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == run["epochs_done"] >= 1
    assert run["final_test_acc"] == float(rows[-1]["test_acc"])
    assert run["best_test_acc"] == max(float(r["test_acc"]) for r in rows)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run["wall_seconds"] > run["train_seconds"] > 0
    assert run["backend"] == "triton" and run["commit"] == session["commit"]["commit"]
    assert run["epochs_planned"] == 2 and estimate["epochs_that_fit"] >= 2
    assert run["label"] == ("the default recipe shortened to 2 epochs (--epochs 2: warm-up and cosine over 2 epochs), "
                            "not the 200-epoch recipe: --max-epochs 2")


def test_step2_runs_the_training_bench_on_the_real_data_in_the_time_left(dry_run):
    session = dry_run["step2"]["session"]
    bench = session["substeps"][-1]
    assert bench["name"] == "training bench" and bench["exit_code"] == 0
    command = bench["command"]
    assert command[command.index("--only") + 1] == "training" and command[command.index("--max-files") + 1] == "4"
    assert command[command.index("--data-dir") + 1] == str(dry_run["data"])
    results = json.loads((dry_run["step2"]["out"] / "bench" / "results.json").read_text())
    assert results["complete"] and results["data"]["kind"] == "cifar10" and results["data"]["accuracy_valid"]
    assert "synthetic" not in results["label"]
    assert sorted(p.name for p in (dry_run["step2"]["out"] / "bench").iterdir()) == sorted(
        ["results.json", "report.md", "bench-files.zip", "log.txt"])
    # Whatever did not fit the seconds-long budget is listed as trimmed, with the reason.
    for row in results["training"]:
        assert row["status"] == "ok" or row["skipped_reason"]


# ------------------------------------------------------------------------------- planning

PLAN = {"batch_size": 128, "step_seconds": 0.004, "eval_seconds_per_image": 1e-5, "host_work_seconds": 0.5,
        "overhead_seconds": 20.0}


def test_the_plan_counts_the_epochs_that_fit_with_every_per_epoch_cost():
    # 390 steps x 4 ms + 0.1 s of evaluation + 0.5 s of host work = 2.16 s, x1.1 = 2.376 s per epoch.
    estimate = steps.plan_epochs(PLAN, 300.0, 50_000, 10_000, "cuda")
    assert estimate["epoch_seconds_estimate"] == pytest.approx(2.376)
    assert estimate["fixed_seconds_estimate"] == steps.STARTUP_SECONDS["cuda"] + steps.FINISH_SECONDS["cuda"] + 20.0
    assert estimate["epochs"] == int((300 - 60) // 2.376) == 101
    assert steps.plan_epochs(PLAN, 10_000.0, 50_000, 10_000, "cuda")["epochs"] == 200  # never more than the recipe
    assert steps.plan_epochs(PLAN, 50.0, 50_000, 10_000, "cuda")["epochs"] == 0
    capped = steps.plan_epochs(PLAN, 300.0, 50_000, 10_000, "cuda", max_epochs=2)
    assert capped["epochs"] == 2 and capped["epochs_that_fit"] == 101


def test_the_full_run_is_labelled_by_what_it_was():
    rows = [{"epoch": str(e), "test_acc": str(0.5 + e / 1000), "epoch_seconds": "2.0", "images_per_second": "25000"}
            for e in range(1, 201)]
    estimate = {"epoch_seconds_estimate": 2.4, "seconds_available": 300.0, "epochs_that_fit": 250}
    full = steps._full_run_summary(rows, 200, False, 0, 450.0, estimate)
    assert full["label"] == "the default recipe, all 200 epochs" and full["complete"]
    assert full["final_test_acc"] == pytest.approx(0.7) and full["best_epoch"] == 200 and full["train_seconds"] == 400
    short = steps._full_run_summary(rows[:100], 100, False, 0, 230.0, {**estimate, "epochs_that_fit": 100})
    assert short["label"].startswith("the default recipe shortened to 100 epochs") and short["complete"]
    assert short["label"].endswith("200 did not fit (2.40s per epoch estimated from a measured step, 300s available)")
    stopped = steps._full_run_summary(rows[:60], 100, True, -2, 230.0, {**estimate, "epochs_that_fit": 100})
    assert "STOPPED after 60 of 100 epochs at the time limit" in stopped["label"] and not stopped["complete"]


def _session(tmp_path, **overrides) -> driver.Session:
    args = Namespace(results=str(tmp_path / "results"), work=str(tmp_path / "work"), seconds=60.0, device="cpu",
                     data_dir=None, commit=None, bench_seconds=20.0, max_epochs=200)
    for key, value in overrides.items():
        setattr(args, key, value)
    return driver.Session("step2", args)


def test_without_both_parts_there_is_no_real_data_and_the_reason_says_why(tmp_path):
    session = _session(tmp_path)
    (session.work / "part1.xz").write_bytes(b"step2's part only")
    data_dir, why = steps._real_data(session)
    assert data_dir is None and "part0.xz" in why and "device_data.py" in why and "warm" in why
    assert session.record["substeps"] == []  # nothing was run


def test_pytest_outcomes_are_read_from_junit_xml(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text('<testsuites><testsuite tests="4" failures="1" errors="0" skipped="2">'
                   '<testcase classname="tests.test_attention" name="test_a"/>'
                   '<testcase classname="tests.test_attention" name="test_b"><failure message="assert 1 == 2&#10;more">'
                   'trace</failure></testcase>'
                   '<testcase classname="t" name="c"><skipped/></testcase><testcase classname="t" name="d"><skipped/>'
                   '</testcase></testsuite></testsuites>')
    summary = steps._junit_summary(xml)
    assert summary == {"tests": 4, "failures": 1, "errors": 0, "skipped": 2, "passed": 1,
                       "failed": ["tests.test_attention::test_b: assert 1 == 2"]}
    assert steps._junit_summary(tmp_path / "missing.xml") == {"report": "missing (pytest did not finish)"}


def test_a_results_folder_that_is_not_empty_is_refused(tmp_path, capsys):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        bench.session.main(["step1", str(tmp_path), "--device", "cpu"])
    assert exit_info.value.code == 2 and "is not empty" in capsys.readouterr().err
