"""The benchmark suite (`python -m bench`) runs end to end on a CPU and writes complete,
honestly labelled results within its file limit; its measuring parts compute what they claim;
a failure of our own code is a FAILED row and a non-zero exit, a peer that cannot run is
skipped with its reason.

The smoke run is one subprocess shared by the tests that read its outputs (~60 s alone on
2 cores, --quick sizes, synthetic images, Triton through its interpreter).
"""
import csv
import io
import json
import math
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from bench import augmentation as ab
from bench import budget as budget_module
from bench import datasets
from bench import kernels as kb
from bench import measure
from bench import run as bench_run
from bench import training as tb
from bench.budget import Budget
from bench.compiling import CompilePolicy
from bench.measure import _quantile, time_cpu
from bench.outputs import ARCHIVE, Outputs
from bench.report import PLOTS, ours_failures
from vit.data import TrainLoader

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.minutes(3)  # CPU minutes on 2 cores: the bench's smoke run
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FILE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what the GPU machine sends back


class FakeClock:
    """Stands for the time module in the timing code under test: its clock moves only when the
    test sleeps on it, so durations come out exact however busy the machine is."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float):
        self.now += seconds


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--device", "cpu", "--data", "synthetic",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return {"out": out, "stdout": proc.stdout, "seconds": seconds,
            "results": json.loads((out / "results.json").read_text()),
            "report": (out / "report.md").read_text()}


def _archive(out: Path) -> dict:
    with zipfile.ZipFile(out / ARCHIVE) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


# ------------------------------------------------------------------------------- the smoke run

def test_smoke_run_is_labelled_and_records_where_it_ran(smoke):
    r = smoke["results"]
    assert r["label"] == "CPU smoke, synthetic images" and r["smoke"] is True and r["quick"] is True
    assert r["complete"] is True and r["phase_running"] is None
    assert r["phases_done"] == ["peaks", "kernels", "augmentation", "training", "sweeps"]
    assert r["device"].startswith("cpu") and r["device_type"] == "cpu"
    for package in ("python", "torch", "triton", "cuda"):
        assert package in r["versions"]
    assert r["versions"]["torch"] == torch.__version__ and r["versions"]["triton"]
    assert r["commit"]["commit"] and r["commit"]["commit"] != "unknown"
    assert r["command"][-7:] == ["--quick", "--device", "cpu", "--data", "synthetic", "--out", str(smoke["out"])]
    assert r["phase_errors"] == [] and ours_failures(r) == []
    assert isinstance(r["trimmed"], list) and all(t["what"] and t["why"] for t in r["trimmed"])
    assert r["peaks"]["matmul_tflops"] > 0 and r["peaks"]["copy_gbps"] > 0
    assert "CPU smoke" in smoke["stdout"] and "synthetic images: accuracy meaningless" in smoke["stdout"]
    # Budget: the default 510 s, and the run told how long it took.
    assert r["budget_seconds"] == 510 and 0 < r["elapsed_seconds"] < r["budget_seconds"]


def test_synthetic_data_is_said_everywhere_and_accuracy_is_never_a_result(smoke):
    r, report = smoke["results"], smoke["report"]
    assert r["data"] == {"kind": "synthetic", "source": r["data"]["source"], "note": datasets.SYNTHETIC_NOTE,
                         "accuracy_valid": False, "train_images": 50_000, "test_images": 10_000}
    assert "synthetic images" in report.splitlines()[0]
    assert "**Synthetic images.**" in report and "test accuracy is meaningless" in report
    for row in r["training"]:
        assert row["accuracy_valid"] is False
        if row["status"] == "ok":
            assert row["accuracy_note"] == "meaningless: synthetic images"
            assert f"| {row['name']} | {row['owner']} | eager | " in report
    assert report.count("n/a (synthetic)") == sum(row["status"] == "ok" for row in r["training"])
    # No accuracy plot of random labels; every CSV row says what it is.
    assert PLOTS["accuracy_vs_time"] not in r["files"]["archived"]
    assert "Test accuracy against time: not drawn (synthetic images)." in report
    table = list(csv.DictReader(io.StringIO(_archive(smoke["out"])["training.csv"].decode())))
    assert table and all(row["run_label"] == r["label"] and row["data"] == "synthetic" for row in table)


def test_the_run_writes_at_most_8_files_with_names_a_gpu_machine_returns(smoke):
    out, files = smoke["out"], smoke["results"]["files"]
    on_disk = sorted(p.name for p in out.iterdir())
    assert all(p.is_file() for p in out.iterdir()) and len(on_disk) <= 8
    assert on_disk == sorted(files["standalone"]) and all(FILE_NAME.match(name) for name in on_disk)
    assert files["standalone"][:4] == ["results.json", "report.md", ARCHIVE, "log.txt"]
    archive = _archive(out)
    assert set(archive) == {"kernels.csv", "training.csv", "log.txt", *[n for n in files["archived"] if n.endswith(".png")]}
    assert archive["log.txt"].decode().startswith("bench: CPU smoke, synthetic images")
    for name in [n for n in on_disk if n.endswith(".png")]:
        assert (out / name).read_bytes() == archive[name]
    report = smoke["report"]
    assert f"Beside this report: {', '.join(files['standalone'])}" in report


def test_headline_comparisons_come_first_in_the_report(smoke):
    report = smoke["report"]
    sections = [line for line in report.splitlines() if line.startswith("## ")]
    assert sections[0] == "## Headline"
    headline = report.split("## Headline")[1].split("\n## ")[0]
    assert "attention forward+backward: ours" in headline and "SDPA's fastest backend here (sdpa " in headline
    assert "attention, ours against torch.compile (auto): torch.compile (auto) skipped" in headline
    assert "whole training step (the loader's batch included), triton fp32:" in headline
    assert "the full recipe (200 epochs) with triton fp32, projected from this run" in headline


def test_every_kernel_provider_is_timed_and_checked_or_skipped_with_a_reason(smoke):
    rows = smoke["results"]["kernels"]
    model_rows = [row for row in rows if "model" in row["in_sweeps"]]
    device = torch.device("cpu")
    names = {op: [p.name for p in kb.providers(op, device)] + ["torch.compile (auto)"] for op in kb.OPS}
    for op in kb.OPS:
        for name in names[op]:
            for mode in kb.MODES:
                matching = [row for row in model_rows if (row["op"], row["provider"], row["mode"]) == (op, name, mode)]
                assert len(matching) == 1, (op, name, mode)
        # The headline order: ours first, the eager reference after SDPA's backends, compile last.
        order = list(dict.fromkeys(row["provider"] for row in model_rows if row["op"] == op))
        assert order == names[op]
    for row in rows:
        assert row["owner"] == ("ours" if row["provider"] in (kb.OURS, kb.EAGER) else "peer")
        if row["status"] == "skipped":
            assert row["skipped_reason"], row
            continue
        assert row["status"] == "ok", row
        for key in ("median_ms", "p20_ms", "p80_ms", "tflops", "gbps", "compute_floor_fraction",
                    "memory_floor_fraction", "max_error", "max_error_forward", "max_error_grad"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] >= 0, (key, row)
        assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        seconds = row["median_ms"] * 1e-3
        assert row["tflops"] == pytest.approx(row["flops"] / seconds / 1e12)
        assert row["gbps"] == pytest.approx(row["bytes"] / seconds / 1e9)
        # fp32 on the CPU: every provider that ran must agree with float64 closely.
        assert row["max_error"] < 1e-4, row


def test_smoke_run_skips_what_cannot_run_here_with_the_reason(smoke):
    rows = smoke["results"]["kernels"]
    compiled = [row for row in rows if row["provider"].startswith("torch.compile")]
    assert compiled and all(row["status"] == "skipped" and "compile time dominates" in row["skipped_reason"]
                            and row["compile_mode"] is None for row in compiled)
    # No CUDA here: SDPA's CUDA-only backends have no kernel, and say so.
    for backend in ("sdpa efficient", "sdpa cudnn"):
        assert all(row["status"] == "skipped" and row["skipped_reason"]
                   for row in rows if row["provider"] == backend)
    # Ours runs through the interpreter; the reference runs everywhere.
    for op in kb.OPS:
        for provider in (kb.OURS, kb.EAGER):
            assert any(row["status"] == "ok" for row in rows if row["op"] == op and row["provider"] == provider)


def test_kernel_sweeps_cover_batch_size_and_sequence_length(smoke):
    rows = [row for row in smoke["results"]["kernels"] if row["status"] == "ok"]
    for sweep, axis, values in (("batch", "batch", kb.QUICK_SWEEP_BATCH_SIZES),
                                ("seq_len", "seq_len", kb.QUICK_SWEEP_SEQ_LENS)):
        for op in kb.OPS:
            measured = {row["shape"][axis] for row in rows
                        if row["op"] == op and row["provider"] == kb.EAGER and sweep in row["in_sweeps"]}
            assert measured == set(values), (sweep, op, measured)


def test_every_training_configuration_is_measured_or_skipped_with_a_reason(smoke):
    results = smoke["results"]
    rows = {row["name"]: row for row in results["training"]}
    configs = tb.training_configs(torch.device("cpu"))
    assert list(rows) == [c.name for c in configs]
    assert [row["key"] for row in rows.values()] == [c.key for c in configs]
    # The headline pair first: ours, then torch bf16 + torch.compile.
    assert [c.key for c in configs[:2]] == ["triton", "torch-bf16-compile"]
    ran = [row for row in rows.values() if row["status"] == "ok"]
    assert {"triton fp32", "torch fp32", "torch bf16", "timm ViT bf16"} <= {row["name"] for row in ran}
    host = results["host_work"]
    assert host["gap_seconds"] > 0 and host["write_seconds"] > 0 and len(host["gaps_seconds"]) == tb.HOST_WORK_EPOCHS - 1
    warmup = results["settings"]["training"]["warmup_steps"]
    for row in ran:
        assert row["images_per_second"] > 0 and row["epoch_seconds"] > 0 and row["eval_seconds"] > 0
        assert row["step_ms"] == pytest.approx(1e3 * results["settings"]["training"]["batch_size"]
                                               / row["images_per_second"])
        assert 0 <= row["test_acc"] <= 1 and 0 <= row["data_wait_share"] <= 1
        assert row["peak_memory"] is None and row["peak_memory_note"]
        # The projection adds the per-epoch host work measured in this run, at this row's epoch length.
        assert row["host_work_seconds"] == pytest.approx(
            tb.host_seconds_per_epoch(host, row["epoch_seconds"] + row["eval_seconds"]))
        assert row["host_work_seconds"] >= host["gap_seconds"]
        assert row["projected_200_epoch_seconds"] == pytest.approx(
            row["overhead_seconds"] + 200 * (row["epoch_seconds"] + row["eval_seconds"] + row["host_work_seconds"]))
        assert row["measured_steps"] >= 3 and row["steps_run"] == row["measured_steps"] + warmup
        # The accuracy-against-time curve starts untrained at 0 s and ends at the reported accuracy.
        assert row["accuracy_curve"][0][0] == 0.0 and len(row["accuracy_curve"]) == row["epochs_run"] + 1
        assert row["accuracy_curve"][-1][1] == row["test_acc"]
        # Eager configurations: the device work of a step, counted by dispatch, when the row's
        # share of the budget has time left after training (else trimmed, and recorded so).
        counts = row["counts"]
        if counts.get("error") == tb.COUNT_TRIMMED:
            trims = {t["what"]: t["why"] for t in results["trimmed"]}
            assert trims[f"training {row['name']}: device work counted"] == tb.COUNT_TRIMMED
            continue
        assert counts["steps_counted"] == results["settings"]["training"]["count_steps"]
        # The step counted at the full model's depth, on a fresh model.
        assert counts["model"] == bench_run.COUNT_MODEL and counts["model"]["depth"] == bench_run.FULL_MODEL["depth"]
        assert "the step counted on a fresh model (depth 7," in counts["note"]
        assert counts["launches_per_step"] == counts["aten_launches_per_step"] + counts["triton_launches_per_step"]
        assert counts["launches_per_step"] > 0 and counts["loader_launches_per_image"] > 0
        # The --quick epoch (40 images) is shorter than a chunk: the loader is counted over a stand-in
        # full CIFAR-10 epoch of small synthetic images, and the row says so.
        assert counts["loader_images_counted"] == tb.CIFAR10_TRAIN_IMAGES // 8 * 8
        assert f"{tb.CIFAR10_TRAIN_IMAGES:,} synthetic" in counts["loader_counted"]
        assert counts["launches_per_step_with_loader"] == pytest.approx(
            counts["launches_per_step"] + 8 * counts["loader_launches_per_image"])
        assert (counts["triton_launches_per_step"] > 0) == (row["backend"] == "triton" and row["model"] == "ours")
        assert counts["syncs_in_counted_epoch"] >= counts["syncs_per_step"] * counts["steps_counted"]
    for row in rows.values():
        assert row["status"] in ("ok", "skipped"), row  # "failed": a configuration crashed
        assert row["owner"] == ("peer" if row["model"] == "timm" or row["key"].startswith("torch-") and row["compile"]
                                else "ours")
        if row["status"] != "ok":
            assert row["skipped_reason"], row
        if row["compile"]:
            assert row["status"] == "skipped" and "compile time dominates" in row["skipped_reason"]
    graphs = [row for row in rows.values() if row["cuda_graphs"]]
    assert graphs and all(row["status"] == "skipped" for row in graphs)
    # The same initial weights, data and recipe: timm's model is the same function as ours.
    assert rows["timm ViT bf16"]["train_loss"] == pytest.approx(rows["torch bf16"]["train_loss"], abs=0.02)


def test_augmentation_alone_is_timed_at_the_training_batch_size_and_reported(smoke):
    results = smoke["results"]
    rows = results["augmentation"]
    batch_size = results["settings"]["training"]["batch_size"]
    assert [r["batch_size"] for r in rows] == ab.batch_sizes(quick=True, training_batch_size=batch_size)
    for r in rows:
        assert r["status"] == "ok", r
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["images_per_second"] == pytest.approx(r["batch_size"] / (r["median_ms"] / 1e3))
    report = smoke["report"]
    assert "## Augmentation alone" in report
    share = ab.step_share(rows, results["training"], batch_size)
    assert share is not None and f"**{share[0]:.1%}** of a training step of `{share[1]}`" in report


def test_plots_are_valid_and_labelled(smoke):
    from PIL import Image

    out, results = smoke["out"], smoke["results"]
    archive = _archive(out)
    drawn = [name for name in results["files"]["archived"] if name.endswith(".png")]
    assert sorted(drawn) == sorted([PLOTS["images_per_second"], PLOTS["batch"], PLOTS["seq_len"]])
    for name in drawn:
        assert archive[name][:8] == PNG_SIGNATURE, name
        with Image.open(io.BytesIO(archive[name])) as image:
            image.verify()
            assert image.size[0] > 300 and image.size[1] > 200
    report = smoke["report"]
    assert report.splitlines()[0].endswith("CPU smoke, synthetic images")
    assert "not performance numbers" in report
    for name in drawn:
        assert f"]({name})" in report
    for row in results["training"]:
        assert row["name"] in report
    assert "--cuda-graph needs a CUDA device" in report
    with zipfile.ZipFile(out / ARCHIVE) as zipped:
        table = list(csv.DictReader(io.StringIO(zipped.read("kernels.csv").decode())))
    assert len(table) == len(results["kernels"]) and all(row["run_label"] == results["label"] for row in table)


# ------------------------------------------------------------------------------- failures and skips

@pytest.fixture
def keep_threads(monkeypatch):
    """bench.run.main sets one torch thread on a CPU: not for the rest of this test process."""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)


def _provider(owner, error):
    def build(shape):
        raise error
    return kb.Provider("p", "attention", "test provider", build, owner=owner)


@pytest.mark.parametrize("owner, error, status", [
    ("ours", RuntimeError("boom"), "failed"),
    ("ours", kb.Unavailable("not importable"), "failed"),
    ("peer", RuntimeError("boom"), "failed"),
    ("peer", kb.Unavailable("no CUDA"), "skipped"),
    ("peer", RuntimeError("No available kernel. Aborting execution."), "skipped"),
], ids=["ours-crash", "ours-missing", "peer-crash", "peer-unavailable", "peer-no-sdpa-kernel"])
def test_a_crash_is_failed_and_only_an_unavailable_peer_is_skipped(owner, error, status):
    rows = kb.measure_shape("attention", kb.QUICK_SHAPE, _provider(owner, error), kb.MODES, torch.float32,
                            torch.device("cpu"), {"matmul_tflops": 1.0, "copy_gbps": 1.0}, ["model"], quick=True)
    assert [r.status for r in rows] == [status] * 3 and all(r.owner == owner and r.skipped_reason for r in rows)
    if status == "failed":
        assert all(r.skipped_reason.startswith("crashed: ") for r in rows)


@pytest.mark.parametrize("op", ["attention", "layernorm_mlp"])
def test_our_kernels_are_skipped_with_the_reason_where_the_interpreter_is_broken(monkeypatch, op):
    monkeypatch.setattr(kb, "interpreter_broken_reason", lambda: "the interpreter is broken for this test")
    provider = kb._triton_provider(op, torch.device("cpu"))
    rows = kb.measure_shape(op, kb.QUICK_SHAPE, provider, kb.MODES, torch.float32, torch.device("cpu"),
                            {"matmul_tflops": 1.0, "copy_gbps": 1.0}, ["model"], quick=True)
    assert [r.status for r in rows] == ["skipped"] * 3 and all(r.owner == "ours" for r in rows)
    assert all("the interpreter is broken for this test" in r.skipped_reason for r in rows), rows


def test_our_kernel_with_wrong_results_fails_its_row():
    common = dict(op="attention", mode="forward", provider_description="", shape={"batch": 2}, dtype="float32",
                  in_sweeps=["model"], status="ok")
    eager = kb.KernelRow(provider=kb.EAGER, owner="ours", max_error_forward=1e-6, max_error_grad=1e-6, **common)
    good = kb.KernelRow(provider=kb.OURS, owner="ours", max_error_forward=5e-6, max_error_grad=2e-6, **common)
    assert kb.fail_wrong_results([eager, good]) == [] and good.status == "ok"
    wrong = kb.KernelRow(provider=kb.OURS, owner="ours", max_error_forward=1e-6, max_error_grad=1e-3, **common)
    nan = kb.KernelRow(provider=kb.OURS, owner="ours", max_error_forward=float("nan"), max_error_grad=0.0, **common)
    assert len(kb.fail_wrong_results([eager, wrong, nan])) == 2
    assert wrong.status == nan.status == "failed" and "wrong results: gradient" in wrong.skipped_reason


def test_a_crash_of_our_kernels_is_a_failed_row_and_a_non_zero_exit(monkeypatch, tmp_path, capsys, keep_threads):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    real_import = kb._import_kernel
    monkeypatch.setattr(kb, "_import_kernel", lambda module, name: broken if module == "kernels.attention"
                        else real_import(module, name))
    monkeypatch.setattr(kb, "OPS", ("attention",))
    out = tmp_path / "out"
    code = bench_run.main(["--device", "cpu", "--only", "kernels", "--budget-seconds", "4", "--out", str(out)])
    assert code == 1
    results = json.loads((out / "results.json").read_text())
    failed = [r for r in results["kernels"] if r["status"] == "failed"]
    assert failed and all(r["provider"] == kb.OURS and "kernel exploded" in r["skipped_reason"] for r in failed)
    report = (out / "report.md").read_text()
    assert "> **FAILED.** Our own code failed here" in report and "FAILED (ours): crashed: RuntimeError" in report
    assert "FAILED: kernel attention" in capsys.readouterr().out


def test_the_runner_walks_the_selected_phases_in_order_and_a_crashed_phase_leaves_the_rest(monkeypatch, tmp_path,
                                                                                          keep_threads):
    walked = []

    def measure(name):
        def run(bench):
            walked.append((name, bench.results["phase_running"], list(bench.results["phases_done"])))
            if name == "kernels":
                raise RuntimeError("phase exploded")
        return run

    peaks = bench_run.Phase("peaks", lambda bench: "peaks", measure("peaks"), always=True)
    monkeypatch.setattr(bench_run, "PHASES", (peaks, *(bench_run.Phase(name, lambda bench: name, measure(name))
                                                       for name in bench_run.ONLY["all"])))
    out = tmp_path / "out"
    code = bench_run.main(["--device", "cpu", "--only", "kernels", "--budget-seconds", "60", "--out", str(out)])
    # The peaks always, then --only's phases in order; the sweeps still run after the kernels crashed.
    assert code == 1 and walked == [("peaks", "peaks", []), ("kernels", "kernels", ["peaks"]),
                                    ("sweeps", "sweeps", ["peaks", "kernels"])]
    results = json.loads((out / "results.json").read_text())
    assert results["phases_done"] == ["peaks", "kernels", "sweeps"] and results["phase_running"] is None
    assert results["complete"] and results["settings"]["phases"] == ["kernels", "sweeps"]
    (error,) = results["phase_errors"]
    assert error["phase"] == "kernels" and "phase exploded" in error["error"] and "Traceback" in error["traceback"]
    assert "phase kernels: RuntimeError: phase exploded" in ours_failures(results)


def test_a_crash_of_our_trainer_is_a_failed_row_and_a_non_zero_exit(monkeypatch, tmp_path, keep_threads):
    def broken(self, epoch):
        raise RuntimeError("trainer exploded")

    monkeypatch.setattr(tb.Trainer, "train_epoch", broken)
    out = tmp_path / "out"
    code = bench_run.main(["--device", "cpu", "--only", "training", "--data", "synthetic", "--training-configs",
                           "torch-fp32", "--out", str(out), "--budget-seconds", "60"])
    assert code == 1
    results = json.loads((out / "results.json").read_text())
    (row,) = results["training"]
    assert row["status"] == "failed" and row["owner"] == "ours" and "trainer exploded" in row["skipped_reason"]
    assert "> **FAILED.**" in (out / "report.md").read_text()


def test_timm_missing_is_a_skipped_peer_with_its_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm.models.vision_transformer", None)  # import fails
    config = next(c for c in tb.training_configs(torch.device("cpu")) if c.key == "timm-bf16")
    reason = tb.unavailable_reason(config, torch.device("cpu"), CompilePolicy("auto", "cpu"))
    assert config.owner == "peer" and reason.startswith("timm cannot be imported")


def test_real_data_missing_stops_before_writing_and_never_downloads(monkeypatch, tmp_path, capsys, keep_threads):
    monkeypatch.setattr(datasets, "default_locations", lambda: [tmp_path / "nowhere"])
    out = tmp_path / "out"
    assert bench_run.main(["--device", "cpu", "--only", "training", "--out", str(out)]) == 2
    message = capsys.readouterr().err
    assert "CIFAR-10 not found" in message and "--download" in message and "--data synthetic" in message
    assert not out.exists() and not (tmp_path / "nowhere").exists()


def test_unknown_training_configuration_is_a_usage_error(capsys, keep_threads):
    with pytest.raises(SystemExit) as exit_info:
        bench_run.main(["--device", "cpu", "--training-configs", "triton,warp-drive"])
    assert exit_info.value.code == 2
    assert "unknown warp-drive; known: triton, torch-bf16-compile" in capsys.readouterr().err


# ------------------------------------------------------------------------------- budget and files

def test_compile_mode_is_chosen_per_row_from_what_fits():
    policy = CompilePolicy("auto", "cuda")
    assert policy.choose("kernel", 1000) == ("max-autotune", "")
    assert policy.choose("kernel", 60) == ("default", "")
    mode, why = policy.choose("kernel", 5)
    assert mode is None and why.startswith("trimmed by the budget") and "mode default takes ~" in why
    assert policy.choose("training", 1000) == ("default", "")  # a whole-model max-autotune costs minutes
    policy.record("kernel", "default", 3.0)
    assert policy.estimate("kernel", "default") == (3.0, "measured in this run") and policy.choose("kernel", 5)[0]
    explicit = CompilePolicy("max-autotune", "cuda")
    assert explicit.choose("kernel", 60)[0] is None and explicit.choose("kernel", 1000)[0] == "max-autotune"
    assert CompilePolicy("auto", "cpu", skip_reason="nope").choose("kernel", 1e9) == (None, "nope")


def test_phase_deadlines_leave_the_training_rows_what_they_need():
    budget = Budget(total_seconds=200)
    all_phases = bench_run.ONLY["all"]
    few = bench_run.phase_deadlines(budget, all_phases, training_seconds=20)
    many = bench_run.phase_deadlines(budget, all_phases, training_seconds=1000)
    assert few["sweeps"] == budget.end() - 15 and few["training"] == few["sweeps"] - 30
    assert few["kernels"] == few["training"] - 20  # the kernels may use what training will not need
    assert many["kernels"] == budget.start + 0.35 * 200  # but always get their share
    kernels_only = bench_run.phase_deadlines(budget, ("kernels", "sweeps"), 0)
    assert kernels_only["kernels"] == budget.end() - 15 - 60


def test_outputs_keep_within_the_file_limit_and_push_plots_into_the_archive(tmp_path):
    results = {"kernels": [], "training": [], "label": "test"}
    outputs = Outputs(tmp_path / "a", max_files=5)
    outputs.log("hello")
    outputs.plots = {PLOTS["batch"]: b"batch", PLOTS["seq_len"]: b"seq"}
    files = outputs.file_plan()
    assert files["standalone"] == ["results.json", "report.md", ARCHIVE, "log.txt", PLOTS["batch"]]
    outputs.plots[PLOTS["images_per_second"]] = b"ips"  # drawn later, with a higher priority
    assert outputs.file_plan()["standalone"][-1] == PLOTS["images_per_second"]
    three = Outputs(tmp_path / "b", max_files=3)
    assert three.file_plan()["standalone"] == ["results.json", "report.md", ARCHIVE] and not three.live_log
    assert not (tmp_path / "b" / "log.txt").exists()
    with pytest.raises(ValueError):
        Outputs(tmp_path / "c", max_files=2)
    with zipfile.ZipFile(io.BytesIO(outputs._archive(results))) as archive:
        assert archive.read("log.txt") == b"hello\n" and archive.read(PLOTS["seq_len"]) == b"seq"


# ------------------------------------------------------------------------------- the measuring parts

def test_flop_and_byte_counts_at_the_model_shape():
    s = kb.MODEL_SHAPE
    attention_forward = 4 * 128 * 12 * 65 * 65 * 32
    assert kb.flops("attention", "forward", s) == attention_forward
    assert kb.flops("attention", "backward", s) == attention_forward * 5 // 2
    assert kb.flops("attention", "forward+backward", s) == attention_forward * 7 // 2
    mlp_forward = 2 * (128 * 65) * 384 * 384 * 2
    assert kb.flops("layernorm_mlp", "forward", s) == mlp_forward
    assert kb.flops("layernorm_mlp", "backward", s) == 2 * mlp_forward
    rows = 128 * 65
    # bf16 qkv in, out, fp32 log-sum-exp per (batch, head, row).
    assert kb.bytes_moved("attention", "forward", s, 2) == rows * 3 * 384 * 2 + rows * 384 * 2 + 128 * 12 * 65 * 4
    params = (2 * 384 * 384 + 384 + 3 * 384) * 2
    assert kb.bytes_moved("layernorm_mlp", "forward", s, 2) == 2 * rows * 384 * 2 + params + rows * 8


def test_errors_are_measured_against_float64():
    s = kb.QUICK_SHAPE
    exact = kb.max_errors(kb.reference("attention", s), "attention", s, torch.float64, "cpu", seed=3)
    assert exact == (0.0, 0.0)
    wrong = kb.max_errors(lambda qkv: kb.reference("attention", s)(qkv) * 1.01, "attention", s, torch.float32,
                          "cpu", seed=3)
    assert wrong[0] > 1e-3 and wrong[1] > 1e-3


def test_quantiles_and_cpu_timing(monkeypatch):
    assert _quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert _quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.2) == pytest.approx(1.8)
    assert _quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.8) == pytest.approx(4.2)
    clock = FakeClock()
    monkeypatch.setattr(measure, "time", clock)
    durations = iter([0.004, 0.001, 0.002, 0.003, 0.005, 0.002])  # the first call is the warm-up
    timing = time_cpu(lambda: clock.sleep(next(durations)), min_calls=5, max_calls=5)
    assert timing.calls == 5
    assert (timing.p20_ms, timing.median_ms, timing.p80_ms) == pytest.approx((1.8, 2.0, 3.4))
    # The setup's time (a fresh forward before a backward) stays out of the measurement.
    prepared = []
    timing = time_cpu(lambda state: prepared.append(state) or clock.sleep(0.001),
                      setup=lambda: clock.sleep(0.05) or "ready", warmup_calls=0, min_calls=3, max_calls=3)
    assert prepared == ["ready"] * 3 and timing.p80_ms == pytest.approx(1.0)


class _FakeLoader:
    def __init__(self, steps, fetch_seconds=0.0, clock=time):
        self.steps, self.fetch_seconds, self.clock, self.epoch = steps, fetch_seconds, clock, None

    def __len__(self):
        return self.steps

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        for step in range(self.steps):
            self.clock.sleep(self.fetch_seconds)
            yield step


def test_timed_loader_splits_step_time_into_data_wait_and_compute(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(tb, "time", clock)
    loader = tb.TimedLoader(_FakeLoader(steps=4, fetch_seconds=0.01, clock=clock), torch.device("cpu"))
    loader.set_epoch(3)
    assert loader.inner.epoch == 3 and len(loader) == 4
    for _ in loader:
        clock.sleep(0.03)  # the "training step"
    steps, waits = loader.step_times()
    assert len(steps) == len(waits) == 4 and not loader.stopped_early
    assert steps == pytest.approx([0.04] * 4) and waits == pytest.approx([0.01] * 4)


def test_timed_loader_stops_at_the_deadline_after_the_minimum_steps():
    loader = tb.TimedLoader(_FakeLoader(steps=100, fetch_seconds=0.0), torch.device("cpu"))
    loader.stop_at, loader.min_steps = time.perf_counter() - 1, 3  # already past the deadline
    assert list(loader) == [0, 1, 2] and loader.stopped_early
    steps, _ = loader.step_times()
    assert len(steps) == 3


class _Batches(_FakeLoader):
    """Batches of 4 images made in a chunk of two batches: the loader's work falls on every other step."""

    def __iter__(self):
        for step in range(self.steps):
            if step % 2 == 0:
                chunk = torch.ones(8) * step  # 2 launches (ones, mul) for two batches
            yield chunk[4 * (step % 2):4 * (step % 2 + 1)], None


def test_counting_loader_tells_the_step_from_the_loader():
    from bench.counts import DeviceWorkCounter

    counter = DeviceWorkCounter()
    loader = tb.CountingLoader(_Batches(steps=6, fetch_seconds=0), steps=3, counter=counter)
    assert len(loader) == 3
    with counter:
        for images, _ in loader:
            (images + 1).sum().item()  # the "step": 2 launches and a sync
        torch.zeros(1).item()  # after the steps: the epoch's own sync
    summary = loader.summary(total=counter.counts.as_dict())
    assert summary["steps_counted"] == 3 and summary["launches_per_step"] == 2 and summary["syncs_per_step"] == 1
    assert summary["syncs_in_counted_epoch"] == 4
    # The loader over its whole epoch: 3 chunks of 2 launches for 24 images.
    whole = tb.count_loader_epoch(_Batches(steps=6, fetch_seconds=0), epoch=1)
    assert whole == {"loader_launches_per_image": 0.25, "loader_syncs_per_epoch": 0,
                     "loader_host_to_device_copies_per_epoch": 0, "loader_images_counted": 24,
                     "loader_counted": "this configuration's loader"}


def test_rows_with_the_same_loader_settings_share_one_stand_in_count(monkeypatch):
    """A short epoch is counted over a stand-in epoch of CIFAR-10's size (64 images here), once
    per loader settings and epoch in a run: a second row with the same settings gets the same
    count without a second pass; other settings are counted on their own."""
    monkeypatch.setattr(tb, "CIFAR10_TRAIN_IMAGES", 64)
    monkeypatch.setattr(tb, "_stand_in_counts", {})
    passes = []
    count_epoch = tb._count_epoch
    monkeypatch.setattr(tb, "_count_epoch", lambda loader, epoch, counted: passes.append(
        (len(loader.images), loader.chunk_images, epoch)) or count_epoch(loader, epoch, counted))
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (16,), generator=generator)

    def count(chunk_images, epoch=1, rows=16):
        return tb.count_loader_epoch(TrainLoader(images[:rows], labels[:rows], 8, 0, "cpu",
                                                 chunk_images=chunk_images), epoch)

    first = count(32)
    assert first["loader_images_counted"] == 64 and "64 synthetic" in first["loader_counted"]
    counted = dict(first)
    first["loader_counted"] = "changed by its caller"
    assert count(32, rows=8) == counted  # another row's loader, the same settings
    count(16)
    count(32, epoch=2)
    assert passes == [(64, 32, 1), (64, 16, 1), (64, 32, 2)]


def test_sweep_points_measure_each_shape_once_with_the_model_shape_first():
    points = kb.sweep_points(kb.MODEL_SHAPE, kb.SWEEP_BATCH_SIZES, kb.SWEEP_SEQ_LENS)
    assert points[0].shape == kb.MODEL_SHAPE and set(points[0].in_sweeps) == {"model", "batch", "seq_len"}
    assert len({p.shape for p in points}) == len(points)
    assert len(points) == 1 + (len(kb.SWEEP_BATCH_SIZES) - 1) + (len(kb.SWEEP_SEQ_LENS) - 1)


def test_budget_records_what_it_trims(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(budget_module, "time", clock)
    budget = Budget(total_seconds=10, start=clock.perf_counter())
    clock.sleep(0.5)
    assert budget.end() == budget.start + 10 and budget.elapsed() == 0.5
    budget.trim("training x", "no time")
    assert budget.trimmed[0]["what"] == "training x" and budget.trimmed[0]["why"] == "no time"


def test_synthetic_images_have_cifar10s_shape_and_sizes():
    data = datasets.load("synthetic", None, download=False)
    images = data.images
    assert images.train_images.shape == (50_000, 3, 32, 32) and images.train_images.dtype == torch.uint8
    assert images.test_images.shape == (10_000, 3, 32, 32) and images.test_labels.shape == (10_000,)
    assert 0 <= int(images.train_labels.min()) and int(images.train_labels.max()) == 9
    assert not data.accuracy_valid and data.describe()["note"] == datasets.SYNTHETIC_NOTE


@pytest.mark.parametrize("share_left", [False, True], ids=["share-spent", "time-left"])
def test_a_training_row_after_its_share_only_evaluates_its_epochs(monkeypatch, share_left):
    """The phases after training are bounded by the row's share (stop_at): one evaluation per
    epoch beside the untrained one, no extra one; the counting runs only with time left."""
    evaluations, counted = [], []
    timed_evaluate = tb._timed_evaluate
    monkeypatch.setattr(tb, "_timed_evaluate", lambda *args: (evaluations.append(1), timed_evaluate(*args))[1])
    monkeypatch.setattr(tb, "count_device_work", lambda *args: counted.append(1) or {"note": "counted"})
    settings = tb.TrainingSettings(model=bench_run.TINY_MODEL, epochs=2, batch_size=4, train_subset=8, test_subset=8,
                                   warmup_steps=1, min_measured_steps=1, count_steps=1)
    data = datasets.BenchData("synthetic", "test", "synthetic", False, datasets.synthetic_cifar10(16, 8))
    host_work = {"gap_seconds": 0.0, "write_seconds": 0.0}  # measured once per run, by the first row
    stop_at = math.inf if share_left else time.perf_counter()
    row, _ = tb.run_config(tb.TrainingConfig("ours", "torch", "fp32", False), settings, torch.device("cpu"), data,
                           None, stop_at, host_work, log=lambda line: None)
    assert len(evaluations) == row.epochs_run + 1 and row.eval_seconds > 0
    if share_left:
        assert row.epochs_run == 2 and counted == [1] and row.counts["note"] == "counted"
    else:
        assert row.epochs_run == 1 and not counted and row.counts == {"error": tb.COUNT_TRIMMED}
