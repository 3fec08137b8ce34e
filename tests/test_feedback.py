"""Feedback where the first minutes are slow, and the smaller conveniences of the command lines:
progress after the first step and then every few steps or seconds, the warning for a long CPU
run with the smoke-run command, the compiling lines, --resume of a checkpoint file, and curves.png
with its legend off the curves and the run's name in its title."""
import io
import math

import pytest
import torch

import train
from test_model_identity import write_run
from test_progress import FakeClock
from test_step import make_trainer
from vit import plots
from vit import trainer as trainer_module
from vit.config import TrainConfig
from vit.model import ViTConfig
from vit.progress import Progress


def progress_steps(trainer) -> list[int]:
    """The epoch's steps at which train_epoch showed progress."""
    shown = []
    trainer.progress.update = lambda steps, **numbers: shown.append(steps)
    trainer.train_epoch(0)
    return shown


def test_progress_after_the_first_step_then_every_n_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "PROGRESS_EVERY_SECONDS", math.inf)
    monkeypatch.setattr(trainer_module, "PROGRESS_EVERY", 3)  # a short epoch shows the cadence
    trainer = make_trainer(tmp_path, steps=7, batch_size=2)
    assert progress_steps(trainer) == [1, 3, 6, 7]


def test_progress_every_interval_when_steps_are_slow(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "PROGRESS_EVERY_SECONDS", 0.0)  # every step is slower than the interval
    trainer = make_trainer(tmp_path, steps=4, batch_size=2)
    assert progress_steps(trainer) == [1, 2, 3, 4]


def test_the_first_eta_is_handed_over_once():
    clock, etas = FakeClock(), []
    progress = Progress(epochs=2, steps_per_epoch=10, stream=io.StringIO(), clock=clock)
    progress.on_first_eta = etas.append
    progress.start_run(0)
    progress.start_epoch(0)
    for step in (1, 2):
        clock.now += 3.0
        progress.update(step, loss=1.0, acc=0.1, lr=1e-3, images_per_second=1.0)
    assert etas == [3.0 * 19]  # one step in 3 s, 19 to go


def test_a_long_cpu_run_warns_with_its_eta_and_the_smoke_run():
    assert train.long_cpu_run_warning(None, "data") is None
    assert train.long_cpu_run_warning(train.LONG_CPU_RUN_SECONDS - 1, "data") is None
    warning = train.long_cpu_run_warning(418 * 3600, "~/data")
    assert "418h 00m 00s" in warning and "sized for a GPU" in warning
    assert "train.py " + " ".join(train.SMOKE_RUN_FLAGS) + " --data-dir '~/data'" in warning


def test_train_py_shows_the_first_step_and_warns_on_a_long_cpu_run(fake_cifar, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "LONG_CPU_RUN_SECONDS", 0)  # every run counts as long: the warning's path runs
    argv = ["--device", "cpu", "--epochs", "1", "--batch-size", "20", "--depth", "1", "--dim", "32", "--heads", "2",
            "--mlp-dim", "32", "--data-dir", str(fake_cifar), "--out-dir", str(tmp_path / "run")]
    assert train.main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    first = next(i for i, line in enumerate(err) if line.startswith("epoch 1/1  step "))
    assert err[first].startswith("epoch 1/1  step 1/5  loss ")  # the first step's line, in plain-text mode
    (warning,) = [line for line in err if "training on the CPU" in line]
    assert warning.startswith("warning: ") and " ".join(train.SMOKE_RUN_FLAGS) in warning


def test_compiling_lines_for_torch_compile_and_triton_on_a_gpu():
    torch_model, triton_model = ViTConfig(), ViTConfig(backend="triton")
    assert train.slow_start_notes(torch_model, TrainConfig(), torch.device("cpu")) == []
    (compiling,) = train.slow_start_notes(torch_model, TrainConfig(compile=True), torch.device("cpu"))
    assert compiling.startswith("compiling the model with torch.compile")
    (kernels,) = train.slow_start_notes(triton_model, TrainConfig(), torch.device("cuda"))
    assert kernels.startswith("compiling the Triton kernels")
    assert len(train.slow_start_notes(triton_model, TrainConfig(compile=True), torch.device("cuda"))) == 2


def test_resume_of_a_checkpoint_file_resumes_its_run_directory(tmp_path, capsys):
    run = write_run(tmp_path / "run", checkpoint_name="last.pt")
    assert train.main(["--resume", str(run / "last.pt"), "--print-config"]) == 0
    err = capsys.readouterr().err
    assert f"{run / 'last.pt'} is a file in one, so the run in {run} continues" in err


def test_resume_of_a_file_outside_a_run_is_a_usage_error(tmp_path, capsys):
    loose = tmp_path / "weights.pt"
    loose.write_bytes(b"")
    with pytest.raises(SystemExit) as exited:
        train.main(["--resume", str(loose)])
    assert exited.value.code == 2
    assert "a file, not a run directory" in capsys.readouterr().err


def test_curves_keep_the_legend_off_the_curves_and_name_the_run(tmp_path, monkeypatch):
    rows = [{"epoch": e, "train_loss": 2.0 / e, "test_loss": 2.1 / e, "train_acc": 0.1 * e, "test_acc": 0.09 * e,
             "ema_test_loss": 2.2 / e, "ema_test_acc": 0.08 * e} for e in range(1, 9)]
    drawn = []
    monkeypatch.setattr(plots, "save_figure", lambda figure, path: drawn.append(figure))
    plots.plot_curves(rows, tmp_path / "20261125-101500" / "curves.png")
    (figure,) = drawn
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    assert "20261125-101500" in figure.get_suptitle()
    assert all(ax.get_legend() is None for ax in figure.axes)
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == ["train", "test", "test, average of the weights"]
    box = legend.get_window_extent(renderer)
    for ax in figure.axes:
        assert not box.overlaps(ax.get_window_extent(renderer))
