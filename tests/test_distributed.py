"""torchrun data-parallel training on the CPU (gloo), two processes."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import torch

import train
from vit.checkpoint import load_checkpoint
from vit.trainer import Trainer

REPO = Path(train.__file__).resolve().parent
TINY = ["--device", "cpu", "--depth", "1", "--dim", "32", "--heads", "2", "--mlp-dim", "32", "--no-progress",
        "--batch-size", "64", "--train-subset", "256", "--seed", "5"]


def torchrun(*args, processes=2, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", "train.py", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def assert_same_weights(a: Path, b: Path):
    first, second = load_checkpoint(a), load_checkpoint(b)
    assert first["epoch"] == second["epoch"]
    for name, tensor in first["model"].items():
        torch.testing.assert_close(second["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def epochs_in(run: Path) -> list[int]:
    with open(run / "metrics.csv", newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def test_two_processes_match_one_and_resume_across_process_counts(real_data_dir, tmp_path, monkeypatch):
    common = TINY + ["--epochs", "2", "--data-dir", str(real_data_dir)]
    assert train.main(common + ["--out-dir", str(tmp_path / "single")]) == 0

    result = torchrun(*common, "--out-dir", str(tmp_path / "ddp"))
    assert result.returncode == 0, result.stderr[-3000:]
    # Only rank 0 prints and writes: one summary line per epoch, one metrics row per epoch.
    assert result.stdout.count("epoch   1/2") == 1 and "2 processes, 32 images each per step" in result.stdout
    assert epochs_in(tmp_path / "ddp") == [1, 2]
    assert {p.name for p in (tmp_path / "ddp").iterdir()} == {
        "config.json", "metrics.csv", "curves.png", "last.pt", "best.pt", "confusion.png", "mistakes.png", "eval.json"}
    assert_same_weights(tmp_path / "single" / "last.pt", tmp_path / "ddp" / "last.pt")

    # Stop a one-process run after its first epoch, then finish it with two processes.
    original = Trainer.train_epoch

    def interrupt_second_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", interrupt_second_epoch)
    assert train.main(common + ["--out-dir", str(tmp_path / "resumed")]) == 130
    result = torchrun("--resume", str(tmp_path / "resumed"), "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming after epoch 1" in result.stdout
    assert epochs_in(tmp_path / "resumed") == [1, 2]
    assert_same_weights(tmp_path / "single" / "last.pt", tmp_path / "resumed" / "last.pt")


def test_world_size_that_does_not_divide_the_batch_is_a_clear_error(fake_cifar, tmp_path):
    result = torchrun(*TINY, "--batch-size", "63", "--data-dir", str(fake_cifar), "--out-dir", str(tmp_path / "run"),
                      timeout=300)
    assert result.returncode != 0
    assert "--batch-size 63: global batch size 63 is not divisible by the world size 2" in result.stderr
