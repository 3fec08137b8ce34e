"""Progress output: a bar on a terminal, plain lines in a file; the curves' best-epoch note."""
import io
import subprocess
import sys
from pathlib import Path

import train
from vit.plots import curves_figure
from vit.progress import LINE_EVERY_SECONDS, Progress, format_duration

REPO = Path(train.__file__).resolve().parent


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_durations_read_as_clock_times():
    assert [format_duration(s) for s in (0, 59.6, 61, 3600, 3725)] == ["0:00", "1:00", "1:01", "1:00:00", "1:02:05"]


def test_plain_lines_when_not_a_terminal_the_first_at_once_then_at_most_every_interval_with_the_run_eta():
    out, clock = io.StringIO(), FakeClock()
    progress = Progress(epochs=2, steps_per_epoch=100, stream=out, clock=clock)
    assert progress.mode == "lines"
    progress.start_run(first_epoch=0)
    progress.start_epoch(0)
    for step in range(25, 100, 25):
        clock.now += LINE_EVERY_SECONDS / 2
        progress.update(step, loss=1.5, acc=0.25, lr=1e-3, images_per_second=1000)
    progress.end_epoch()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 2  # the run's first progress point at once, then one in the interval after it
    assert lines[0].startswith("epoch 1/2  step 25/100  loss 1.5000  acc 25.00%")
    # 75 of the run's 200 steps in 1.5 intervals: 2.5 more intervals to go.
    assert lines[1].startswith("epoch 1/2  step 75/100  loss 1.5000  acc 25.00%")
    assert (f"elapsed {format_duration(1.5 * LINE_EVERY_SECONDS)}, ETA {format_duration(2.5 * LINE_EVERY_SECONDS)}"
            in lines[1])


def test_a_bar_on_a_terminal_with_the_run_elapsed_time_and_eta():
    out, clock = Terminal(), FakeClock()
    progress = Progress(epochs=3, steps_per_epoch=10, stream=out, clock=clock)
    assert progress.mode == "bar"
    progress.start_run(first_epoch=1)  # a resumed run: the ETA counts this process's steps only
    progress.start_epoch(1)
    clock.now = 4.0
    progress.update(5, loss=0.9, acc=0.5, lr=2e-4, images_per_second=123)
    progress.end_epoch()
    text = out.getvalue()
    assert "epoch 2/3" in text and "loss 0.9000" in text and "run elapsed 0:04, ETA 0:12" in text


def test_nothing_is_shown_when_disabled_but_the_run_clock_still_runs():
    out, clock = Terminal(), FakeClock()
    progress = Progress(epochs=2, steps_per_epoch=10, enabled=False, stream=out, clock=clock)
    progress.start_run(0)
    progress.start_epoch(0)
    progress.update(10, loss=1.0, acc=0.1, lr=1e-3, images_per_second=1.0)
    progress.end_epoch()
    clock.now = 30
    assert out.getvalue() == "" and progress.run_status() == "elapsed 0:30, ETA 0:30"


def test_train_py_with_output_to_a_file_writes_lines_only(fake_cifar, tmp_path):
    """As nohup or a job scheduler runs it: stdout and stderr into one file, progress left on."""
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        result = subprocess.run([sys.executable, "train.py", "--device", "cpu", "--depth", "1", "--dim", "32",
                                 "--heads", "2", "--mlp-dim", "32", "--batch-size", "20",
                                 "--epochs", "3", "--data-dir", str(fake_cifar), "--out-dir", str(tmp_path / "run")],
                                cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert result.returncode == 0, text[-3000:]
    assert "\r" not in text
    summaries = [line for line in text.splitlines() if line.startswith("epoch ") and "train loss" in line]
    assert [line.split()[1] for line in summaries] == ["1/3", "2/3", "3/3"], text
    assert all("ETA" in line for line in summaries)


def test_best_note_stays_inside_the_axes_when_the_best_epoch_is_the_first():
    rows = [{"epoch": e, "train_loss": 1.0 + e, "test_loss": 1.0 + e, "train_acc": 0.5 / e, "test_acc": 0.5 / e}
            for e in range(1, 31)]
    figure = curves_figure(rows, run_name="run")
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    accuracy_axes = figure.axes[1]
    (note,) = accuracy_axes.texts
    assert "best test 50.00% (epoch 1)" in note.get_text()
    inside = accuracy_axes.get_window_extent(renderer)
    box = note.get_window_extent(renderer)
    assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
    for label in accuracy_axes.get_yticklabels() + accuracy_axes.get_xticklabels():
        assert not box.overlaps(label.get_window_extent(renderer)), label.get_text()
