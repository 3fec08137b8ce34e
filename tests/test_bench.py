"""The benchmark suite (`python -m bench`) runs end to end on a CPU and writes complete,
honestly labelled results; its measuring parts compute what they claim.

The smoke run is one subprocess shared by the tests that read its outputs (~40 s alone on
2 cores, --quick sizes, Triton through its interpreter).
"""
import csv
import json
import math
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from bench import augmentation as ab
from bench import kernels as kb
from bench import training as tb
from bench.budget import Budget
from bench.measure import _quantile, time_cpu

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--device", "cpu", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return {"out": out, "stdout": proc.stdout, "seconds": seconds,
            "results": json.loads((out / "results.json").read_text())}


# ------------------------------------------------------------------------------- the smoke run

def test_smoke_run_is_labelled_and_records_where_it_ran(smoke):
    r = smoke["results"]
    assert r["label"] == "CPU smoke" and r["smoke"] is True and r["quick"] is True
    assert r["device"].startswith("cpu") and r["device_type"] == "cpu"
    for package in ("python", "torch", "triton", "cuda"):
        assert package in r["versions"]
    assert r["versions"]["torch"] == torch.__version__ and r["versions"]["triton"]
    assert r["commit"]["commit"] and r["commit"]["commit"] != "unknown"
    assert r["command"][-5:] == ["--quick", "--device", "cpu", "--out", str(smoke["out"])]
    assert r["phase_errors"] == []
    assert isinstance(r["trimmed"], list) and all(t["what"] and t["why"] for t in r["trimmed"])
    assert r["peaks"]["matmul_tflops"] > 0 and r["peaks"]["copy_gbps"] > 0
    assert "CPU smoke" in smoke["stdout"]
    # Budget: the default 510 s, and the run told how long it took.
    assert r["budget_seconds"] == 510 and 0 < r["elapsed_seconds"] < r["budget_seconds"]


def test_every_kernel_provider_is_timed_and_checked_or_skipped_with_a_reason(smoke):
    rows = smoke["results"]["kernels"]
    model_rows = [row for row in rows if "model" in row["in_sweeps"]]
    device = torch.device("cpu")
    for op in kb.OPS:
        for provider in kb.providers(op, device):
            for mode in kb.MODES:
                matching = [row for row in model_rows
                            if (row["op"], row["provider"], row["mode"]) == (op, provider.name, mode)]
                assert len(matching) == 1, (op, provider.name, mode)
    for row in rows:
        if row["status"] == "skipped":
            assert row["skipped_reason"], row
            continue
        assert row["status"] == "ok"
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
                            for row in compiled)
    # No CUDA here: SDPA's CUDA-only backends have no kernel, and say so.
    for backend in ("sdpa efficient", "sdpa cudnn"):
        assert all(row["status"] == "skipped" and row["skipped_reason"]
                   for row in rows if row["provider"] == backend)
    # Ours runs through the interpreter; the reference runs everywhere.
    for op in kb.OPS:
        for provider in ("triton (ours)", "torch (eager)"):
            assert any(row["status"] == "ok" for row in rows if row["op"] == op and row["provider"] == provider)


def test_kernel_sweeps_cover_batch_size_and_sequence_length(smoke):
    rows = [row for row in smoke["results"]["kernels"] if row["status"] == "ok"]
    for sweep, axis, values in (("batch", "batch", kb.QUICK_SWEEP_BATCH_SIZES),
                                ("seq_len", "seq_len", kb.QUICK_SWEEP_SEQ_LENS)):
        for op in kb.OPS:
            measured = {row["shape"][axis] for row in rows
                        if row["op"] == op and row["provider"] == "torch (eager)" and sweep in row["in_sweeps"]}
            assert measured == set(values), (sweep, op, measured)


def test_every_training_configuration_is_measured_or_skipped_with_a_reason(smoke):
    rows = {row["name"]: row for row in smoke["results"]["training"]}
    assert list(rows) == [c.name for c in tb.training_configs(torch.device("cpu"))]
    ran = [row for row in rows.values() if row["status"] == "ok"]
    assert {"torch fp32", "torch bf16", "timm ViT bf16"} <= {row["name"] for row in ran}
    for row in ran:
        assert row["images_per_second"] > 0 and row["epoch_seconds"] > 0 and row["eval_seconds"] > 0
        assert 0 <= row["test_acc"] <= 1 and 0 <= row["data_wait_share"] <= 1
        assert "peak_memory" in row and row["peak_memory"] is None and row["peak_memory_note"]
        assert row["projected_200_epoch_seconds"] >= 200 * (row["epoch_seconds"] + row["eval_seconds"])
        warmup = smoke["results"]["settings"]["training"]["warmup_steps"]
        assert row["measured_steps"] >= 3 and row["steps_run"] == row["measured_steps"] + warmup
        # The accuracy-against-time curve starts untrained at 0 s and ends at the reported accuracy.
        assert row["accuracy_curve"][0][0] == 0.0 and len(row["accuracy_curve"]) == row["epochs_run"] + 1
        assert row["accuracy_curve"][-1][1] == row["test_acc"]
    for row in rows.values():
        assert row["status"] in ("ok", "skipped"), row  # "failed": a configuration crashed
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
    report = (smoke["out"] / "report.md").read_text()
    assert "## Augmentation alone" in report
    share = ab.step_share(rows, results["training"], batch_size)
    if share is None:
        assert "Share of a triton-backend training step" in report and "not available" in report
    else:
        assert f"**{share[0]:.1%}** of a training step of `{share[1]}`" in report


def test_augmentation_step_share_divides_by_the_eager_triton_step():
    augmentation = [{"batch_size": 128, "status": "ok", "median_ms": 0.5},
                    {"batch_size": 512, "status": "ok", "median_ms": 1.0}]
    training = [
        {"name": "torch bf16", "status": "ok", "model": "ours", "backend": "torch", "compile": False,
         "cuda_graphs": False, "images_per_second": 10_000.0},
        {"name": "triton bf16 compiled", "status": "ok", "model": "ours", "backend": "triton", "compile": True,
         "cuda_graphs": False, "images_per_second": 64_000.0},
        {"name": "triton bf16", "status": "ok", "model": "ours", "backend": "triton", "compile": False,
         "cuda_graphs": False, "images_per_second": 25_600.0},  # 5 ms per step of 128
    ]
    assert ab.step_share(augmentation, training, 128) == (pytest.approx(0.1), "triton bf16")
    assert ab.step_share(augmentation, training, 256) is None  # no augmentation timing there
    assert ab.step_share(augmentation, training[:1], 128) is None  # no triton row


def test_plots_and_report_are_written_and_labelled_smoke(smoke):
    from PIL import Image

    out, results = smoke["out"], smoke["results"]
    assert len(results["plots"]) == 4
    for name in results["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE, name
        with Image.open(out / name) as image:
            image.verify()
            assert image.size[0] > 300 and image.size[1] > 200
    report = (out / "report.md").read_text()
    assert report.splitlines()[0].endswith("CPU smoke")
    assert "not performance numbers" in report
    for name in results["plots"]:
        assert f"]({name})" in report
    for row in results["training"]:
        assert row["name"] in report
    if tb.CUDA_GRAPH_FIELD not in {f.name for f in fields(tb.TrainConfig)}:
        assert "trainer has no CUDA-graph mode" in report
    for name, rows in (("kernels.csv", results["kernels"]), ("training.csv", results["training"])):
        with open(out / name, newline="") as f:
            table = list(csv.DictReader(f))
        assert len(table) == len(rows) and all(row["run_label"] == "CPU smoke" for row in table)


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


def test_quantiles_and_cpu_timing():
    assert _quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert _quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.2) == pytest.approx(1.8)
    assert _quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.8) == pytest.approx(4.2)
    timing = time_cpu(lambda: time.sleep(0.002), min_calls=5, max_calls=5)
    assert timing.calls == 5 and 2.0 <= timing.p20_ms <= timing.median_ms <= timing.p80_ms < 200
    # The setup's time (a fresh forward before a backward) stays out of the measurement.
    prepared = []
    timing = time_cpu(lambda state: prepared.append(state), setup=lambda: time.sleep(0.05) or "ready",
                      warmup_calls=0, min_calls=3, max_calls=3)
    assert prepared == ["ready"] * 3 and timing.p80_ms < 25


class _FakeLoader:
    def __init__(self, steps, fetch_seconds):
        self.steps, self.fetch_seconds, self.epoch = steps, fetch_seconds, None

    def __len__(self):
        return self.steps

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        for step in range(self.steps):
            time.sleep(self.fetch_seconds)
            yield step


def test_timed_loader_splits_step_time_into_data_wait_and_compute():
    loader = tb.TimedLoader(_FakeLoader(steps=4, fetch_seconds=0.01), torch.device("cpu"))
    loader.set_epoch(3)
    assert loader.inner.epoch == 3 and len(loader) == 4
    for _ in loader:
        time.sleep(0.03)  # the "training step"
    steps, waits = loader.step_times()
    assert len(steps) == len(waits) == 4 and not loader.stopped_early
    for step, wait in zip(steps, waits):
        assert 0.01 <= wait < step and step >= 0.04
    assert 0.1 < sum(waits) / sum(steps) < 0.5


def test_timed_loader_stops_at_the_deadline_after_the_minimum_steps():
    loader = tb.TimedLoader(_FakeLoader(steps=100, fetch_seconds=0.0), torch.device("cpu"))
    loader.stop_at, loader.min_steps = time.perf_counter() - 1, 3  # already past the deadline
    assert list(loader) == [0, 1, 2] and loader.stopped_early
    steps, _ = loader.step_times()
    assert len(steps) == 3


def test_sweep_points_measure_each_shape_once_with_the_model_shape_first():
    points = kb.sweep_points(kb.MODEL_SHAPE, kb.SWEEP_BATCH_SIZES, kb.SWEEP_SEQ_LENS)
    assert points[0].shape == kb.MODEL_SHAPE and set(points[0].in_sweeps) == {"model", "batch", "seq_len"}
    assert len({p.shape for p in points}) == len(points)
    assert len(points) == 1 + (len(kb.SWEEP_BATCH_SIZES) - 1) + (len(kb.SWEEP_SEQ_LENS) - 1)


def test_budget_records_what_it_trims():
    budget = Budget(total_seconds=10)
    assert budget.end() == budget.start + 10 and 0 <= budget.elapsed() < 1
    budget.trim("training x", "no time")
    assert budget.trimmed[0]["what"] == "training x" and budget.trimmed[0]["why"] == "no time"
