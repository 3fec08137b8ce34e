import csv
import json
import subprocess
import sys

import pytest
import torch

import train
from vit import augment
from vit import data as cifar
from vit.checkpoint import load_checkpoint, write_config
from vit.trainer import Trainer, TrainConfig, build_trainer
from vit.model import ViTConfig

TINY = ["--device", "cpu", "--depth", "1", "--dim", "32", "--heads", "2", "--mlp-dim", "32", "--no-progress"]
RUN_FILES = {"config.json", "metrics.csv", "curves.png", "last.pt", "best.pt"}


def test_tiny_model_on_real_images_drives_the_loss_down(real_data_dir, tmp_path):
    model_cfg = ViTConfig(dim=64, depth=2, heads=4, mlp_dim=64)
    cfg = TrainConfig(epochs=4, batch_size=64, lr=2e-3, warmup_epochs=0.5, device="cpu", precision="fp32",
                      train_subset=3000, data_dir=str(real_data_dir), progress=False)
    (tmp_path / "run").mkdir()
    trainer = build_trainer(model_cfg, cfg, tmp_path / "run", log=lambda line: None)
    trainer.fit()
    losses = [float(r["train_loss"]) for r in trainer.metrics]
    assert losses[-1] < losses[0] - 0.1, losses
    assert max(float(r["test_acc"]) for r in trainer.metrics) > 0.25


def test_train_py_end_to_end_writes_every_output(real_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    code = train.main(TINY + ["--epochs", "2", "--train-subset", "512", "--batch-size", "64",
                              "--data-dir", str(real_data_dir), "--out-dir", str(run)])
    assert code == 0
    out = capsys.readouterr().out
    assert "ViT with" in out and "backend torch" in out and "epoch   2/2" in out
    assert RUN_FILES | {"confusion.png", "mistakes.png", "eval.json"} <= {p.name for p in run.iterdir()}
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert list(rows[0]) == ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds",
                             "images_per_second"]
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["dim"] == 32 and config["train"]["epochs"] == 2 and config["versions"]["torch"]
    state = load_checkpoint(run / "last.pt")  # weights_only=True
    assert state["epoch"] == 2 and {"model", "optimizer", "scaler", "rng", "best_acc", "best_epoch", "metrics"} <= set(state)
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(fake_cifar, tmp_path, monkeypatch):
    common = TINY + ["--epochs", "3", "--batch-size", "20", "--data-dir", str(fake_cifar), "--seed", "7",
                     "--dropout", "0.1"]
    assert train.main(common + ["--out-dir", str(tmp_path / "straight")]) == 0

    original = Trainer.train_epoch

    def interrupt_second_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", interrupt_second_epoch)
    assert train.main(common + ["--out-dir", str(tmp_path / "resumed")]) == 130
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    monkeypatch.setattr(Trainer, "train_epoch", original)
    assert train.main(["--resume", str(tmp_path / "resumed"), "--no-progress"]) == 0

    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert resumed["epoch"] == 3
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    with open(tmp_path / "resumed" / "metrics.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]


def test_resume_refuses_a_changed_recipe(fake_cifar, tmp_path):
    run = tmp_path / "run"
    assert train.main(TINY + ["--epochs", "1", "--batch-size", "20", "--data-dir", str(fake_cifar),
                              "--out-dir", str(run)]) == 0
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--resume", str(run), "--lr", "0.5"])
    assert exit_info.value.code == 2


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(fake_cifar, tmp_path, monkeypatch, capsys):
    original = cifar.TrainLoader.__iter__

    def poison_second_epoch(self):
        for images, labels in original(self):
            yield (torch.full_like(images, float("nan")) if self.epoch == 1 else images), labels

    monkeypatch.setattr(cifar.TrainLoader, "__iter__", poison_second_epoch)
    run = tmp_path / "run"
    code = train.main(TINY + ["--epochs", "3", "--batch-size", "20", "--data-dir", str(fake_cifar), "--out-dir", str(run)])
    assert code == 1
    assert "non-finite loss at epoch 2, step 1" in capsys.readouterr().err
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_existing_run_directory_is_never_overwritten(fake_cifar, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("precious\n")
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--data-dir", str(fake_cifar), "--out-dir", str(run)])
    assert exit_info.value.code == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (run / "metrics.csv").read_text() == "precious\n"


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "-1"], "--epochs must be a positive integer"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--backend", "nope"], "invalid choice: 'nope'"),
    (["--heads", "5"], "--heads 5 does not divide --dim 384"),
    (["--lr", "-1"], "--lr must be a positive finite number"),
    (["--device", "cuda:0"], None),  # no CUDA here
    (["--precision", "bf16", "--device", "cpu"], "needs CUDA"),
])
def test_bad_cli_values_exit_2_with_an_argparse_message(flags, message):
    if flags[:2] == ["--device", "cuda:0"] and torch.cuda.is_available():
        pytest.skip("CUDA is available")
    result = subprocess.run([sys.executable, "train.py", *flags], capture_output=True, text=True,
                            cwd=train.__file__.rsplit("/", 1)[0], timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "(see train.py --help)" in result.stderr and "Traceback" not in result.stderr
    if message:
        assert message in result.stderr


def test_help_documents_every_flag():
    text = train.build_parser().format_help()
    for flag in ["--backend", "--epochs", "--batch-size", "--lr", "--min-lr", "--warmup-epochs", "--weight-decay",
                 "--label-smoothing", "--data-dir", "--out-dir", "--resume", "--precision", "--device", "--seed",
                 "--train-subset", "--patch-size", "--dim", "--depth", "--heads", "--mlp-dim"]:
        assert flag in text


def test_training_on_the_cpu_augments_in_batches(fake_cifar, tmp_path, monkeypatch):
    augmented = []

    def batched(images, params, auto_augment):
        augmented.append(len(images))
        return original(images, params, auto_augment)

    original = augment.apply_train_augment
    monkeypatch.setattr(augment, "apply_train_augment", batched)
    run = tmp_path / "run"
    assert train.main(TINY + ["--epochs", "1", "--batch-size", "20", "--data-dir", str(fake_cifar),
                              "--out-dir", str(run)]) == 0
    assert augmented == [100]  # the epoch's 5 steps of 20 in one chunk
    assert not {"augment", "num_workers"} & json.loads((run / "config.json").read_text())["train"].keys()
    assert load_checkpoint(run / "last.pt")["epoch"] == 1


@pytest.mark.parametrize("argv, flag", [(["--augment", "cpu"], "--augment"), (["--num-workers=4"], "--num-workers"),
                                        (["--resume", "runs/old", "--num-workers", "0"], "--num-workers")])
def test_removed_flags_are_a_usage_error_that_says_what_replaced_them(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"train.py: error: {flag} was removed: ")
    assert "training augments in batches on the training device" in err and "drop it from the command line" in err


def test_resume_of_a_run_saved_with_removed_settings_ignores_them_with_a_note(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    write_config(run, ViTConfig(dim=32, depth=1, heads=2, mlp_dim=32),
                 TrainConfig(epochs=2, batch_size=20, device="cpu", precision="fp32", out_dir=str(run)),
                 [str(i) for i in range(10)], "cpu")
    config = json.loads((run / "config.json").read_text())
    config["train"].update(augment="cpu", num_workers=2)
    (run / "config.json").write_text(json.dumps(config))
    assert train.main(["--resume", str(run), "--print-config"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"note: {run / 'config.json'}: augment and "
                                                                     f"num_workers are settings this version no longer has")
    assert "the same transforms and distributions" in captured.err
    printed = json.loads(captured.out)["train"]
    assert printed["epochs"] == 2 and not {"augment", "num_workers"} & printed.keys()
