"""vit.checkpoint: the run directory's files, the checkpoint as the source of the metrics, the
snapshot and the background writer, and a kill between the checkpoint and the metrics."""
import csv
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import train
from vit.checkpoint import (KILL_AFTER_CHECKPOINT_VARIABLE, BackgroundWriter, HostSnapshot, load_checkpoint,
                            read_config, read_config_file, remove_stale_temporaries, save_checkpoint,
                            write_config, write_epoch_files)
from vit.model import ViTConfig
from vit.trainer import TrainConfig

REPO = Path(train.__file__).resolve().parent
TINY = ["--device", "cpu", "--depth", "1", "--dim", "32", "--heads", "2", "--mlp-dim", "32",
        "--batch-size", "20"]


def metric_rows(epochs):
    return [{"epoch": e, "train_loss": 2.0 / e, "train_acc": 0.1 * e, "test_loss": 2.1 / e, "test_acc": 0.1 * e,
             "lr": 1e-3, "epoch_seconds": 1.0, "images_per_second": 100.0} for e in epochs]


def epochs_in_csv(path: Path) -> list[int]:
    with open(path, newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def temporaries(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------------------- reading and writing

def test_checkpoint_round_trip_and_one_line_errors_naming_the_file(tmp_path):
    path = tmp_path / "last.pt"
    state = {"model": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 3, "metrics": metric_rows([1, 2, 3])}
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["metrics"] == state["metrics"]
    assert temporaries(tmp_path) == []

    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(RuntimeError) as error:
        load_checkpoint(path)
    assert str(path) in str(error.value) and "truncated" in str(error.value) and "\n" not in str(error.value)

    torch.save({"weights": 1}, path)
    with pytest.raises(RuntimeError, match="not a training checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_config_round_trip_and_broken_configs(tmp_path):
    model_cfg, train_cfg = ViTConfig(dim=64, heads=4), TrainConfig(epochs=7, cuda_graph=True)
    write_config(tmp_path, model_cfg, train_cfg, ["a"] * 10, "cpu")
    assert read_config(tmp_path) == (model_cfg, train_cfg)

    (tmp_path / "config.json").write_text('{"model": {"dim": 64,')
    with pytest.raises(ValueError) as error:
        read_config(tmp_path)
    assert str(tmp_path / "config.json") in str(error.value) and "\n" not in str(error.value)
    (tmp_path / "config.json").write_text('{"train": {}}')
    with pytest.raises(ValueError, match="no \"model\" section"):
        read_config_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text('{"model": {"dim": 63, "heads": 4}, "train": {}}')
    with pytest.raises(ValueError, match="not a valid configuration"):
        read_config(tmp_path)


def test_epoch_files_come_from_the_checkpoint_and_leave_no_temporaries(tmp_path):
    state = {"model": {"w": torch.ones(3)}, "epoch": 2, "metrics": metric_rows([1, 2])}
    write_epoch_files(tmp_path, state, best=True, curves=True)
    assert {p.name for p in tmp_path.iterdir()} == {"last.pt", "best.pt", "metrics.csv", "curves.png"}
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 2 and epochs_in_csv(tmp_path / "metrics.csv") == [1, 2]

    # The next epoch does not improve: best.pt keeps epoch 2 although it shared last.pt's bytes.
    write_epoch_files(tmp_path, {**state, "epoch": 3, "metrics": metric_rows([1, 2, 3])}, best=False, curves=False)
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 2 and load_checkpoint(tmp_path / "last.pt")["epoch"] == 3
    assert epochs_in_csv(tmp_path / "metrics.csv") == [1, 2, 3]
    assert temporaries(tmp_path) == []


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    for name in (".last.pt.tmp", ".metrics.csv.tmp", "last.pt", "notes.txt"):
        (tmp_path / name).write_text("x")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".last.pt.tmp", ".metrics.csv.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.txt"]


# ------------------------------------------------------------------------------- off the training thread

def test_snapshot_copies_a_nested_state_into_buffers_it_keeps():
    weights = torch.randn(4, 5)
    state = {"model": {"w": weights}, "optimizer": {"param_groups": [{"lr": torch.tensor(0.5), "params": [0]}],
                                                    "state": {0: {"step": torch.tensor(3.0)}}}, "epoch": 7}
    snapshot = HostSnapshot()
    taken = snapshot.take(state)
    assert taken.copied is None  # from the CPU the copies are made at once: nothing to wait for
    first = taken.state
    assert torch.equal(first["model"]["w"], weights) and first["model"]["w"].data_ptr() != weights.data_ptr()
    assert first["optimizer"]["param_groups"][0]["params"] == [0] and first["epoch"] == 7
    assert not first["model"]["w"].is_pinned()  # pinned buffers only for copies from a GPU
    buffer = first["model"]["w"].data_ptr()
    weights.add_(1)  # the copy is a copy: training on does not change it...
    assert not torch.equal(first["model"]["w"], weights)
    second = snapshot.take(state).state  # ...and the next snapshot reuses the buffer
    assert second["model"]["w"].data_ptr() == buffer and torch.equal(second["model"]["w"], weights)


def test_background_writer_runs_jobs_in_order_and_hands_errors_over():
    writer, order = BackgroundWriter(), []
    release = threading.Event()
    writer.submit(lambda: (release.wait(5), order.append(1)))
    assert order == []  # submit() returned while the job waits
    release.set()
    writer.submit(lambda: order.append(2))  # waits for the first job
    writer.wait()
    assert order == [1, 2] and len(writer.job_seconds) == 2

    def fail():
        raise OSError("disk full")
    writer.submit(fail)
    with pytest.raises(OSError, match="disk full"):
        writer.wait()
    writer.wait()  # the error was handed over once


# ------------------------------------------------------------------------------- a kill between two writes

def test_sigkill_between_checkpoint_and_metrics_then_resume_keeps_every_epoch_once(fake_cifar, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, KILL_AFTER_CHECKPOINT_VARIABLE: "2", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "train.py", *TINY, "--epochs", "3", "--no-progress",
                             "--data-dir", str(fake_cifar), "--out-dir", str(run)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    # The kill came after epoch 2's checkpoint and before its metrics row.
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    assert epochs_in_csv(run / "metrics.csv") == [1]
    # What a kill in the middle of a write leaves behind.
    (run / ".metrics.csv.tmp").write_text("epoch,trai")
    (run / ".curves.png.tmp").write_bytes(b"\x89PN")

    assert train.main(["--resume", str(run), "--no-progress"]) == 0
    assert epochs_in_csv(run / "metrics.csv") == [1, 2, 3]
    assert [row["epoch"] for row in load_checkpoint(run / "last.pt")["metrics"]] == [1, 2, 3]
    assert temporaries(run) == []
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The final evaluation says what it evaluated.
    source = json.loads((run / "eval.json").read_text())["source"]
    assert source["checkpoint"] == str(run / "best.pt") and source["epoch"] == load_checkpoint(run / "best.pt")["epoch"]
