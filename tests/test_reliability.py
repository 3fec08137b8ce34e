"""What a new user meets when a run is disturbed: a second training process on the same run, a
stop signal (SIGTERM, SIGHUP, Ctrl-C under torchrun), a full disk, a checkpoint that holds Python
objects. Each ends with one line, the right exit status and nothing lost."""
import csv
import errno
import os
import shlex
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

import train
from conftest import write_cifar_folder
from vit import cli
from vit import evaluate as vit_evaluate
from vit import predict as vit_predict
from vit.checkpoint import LOCK_FILE, RunLock, load_checkpoint, write_config
from vit.config import TrainConfig
from vit.model import ViTConfig
from vit.trainer import Trainer

REPO = Path(train.__file__).resolve().parent
# 100 training images in 5 steps of 20: the smallest run without a few-steps warning.
TINY = ["--device", "cpu", "--depth", "1", "--dim", "32", "--heads", "2", "--mlp-dim", "32", "--no-progress",
        "--batch-size", "20", "--warmup-epochs", "0.5", "--seed", "3"]
STEPS_PER_EPOCH = 5
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
HANG_GUARD_SECONDS = 900  # far above the seconds these runs take on a busy 2-core machine

# train.py as the user starts it, but the process sends SIGNAL to its process group (itself and
# any child of it, as a closed terminal or a scheduler does) when its training step number
# STEP (1-based, over the whole run) begins: a stop at a known step, through the same handler and
# the same delivery as a signal from outside.
SIGNAL_AT_STEP = """
import os, runpy, signal, sys
from vit.trainer import Trainer
signum, at_step = getattr(signal, sys.argv.pop(1)), int(sys.argv.pop(1))
original, steps = Trainer.train_step, []
def train_step(self, images, targets):
    steps.append(None)
    if len(steps) == at_step:
        os.killpg(0, signum)
    return original(self, images, targets)
Trainer.train_step = train_step
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # 100 test images: every class is among them, so the per-class report of the run's end is whole.
    return write_cifar_folder(tmp_path_factory.mktemp("data"), per_batch=20, num_test=100)


def epochs_in(run: Path) -> list[int]:
    with open(run / "metrics.csv", newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def hidden_files(run: Path) -> list[str]:
    """Temporaries of a write and the lock file: none may outlive the run."""
    return sorted(p.name for p in run.iterdir() if p.name.startswith("."))


def start(command: list[str]) -> subprocess.Popen:
    process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    watchdog = threading.Timer(HANG_GUARD_SECONDS, lambda: os.killpg(process.pid, signal.SIGKILL))
    watchdog.daemon = True
    watchdog.start()
    return process


def read_until(process: subprocess.Popen, text: str) -> str:
    """stdout up to the line holding text (the process goes on)."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if text in line:
            return "".join(lines)
    raise AssertionError(f"the process ended before printing {text!r}: {process.wait()}\n"
                         f"{''.join(lines)}{process.stderr.read()[-3000:]}")


# ------------------------------------------------------------------------------- one writer per run

def test_a_second_training_process_on_a_run_is_refused_naming_the_first(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    first = start([sys.executable, "train.py", *TINY, "--epochs", "1000", "--data-dir", str(data_dir),
                   "--out-dir", str(run)])
    try:
        # Epoch 2's line comes after epoch 1's checkpoint is written: a run that trains, with files to read.
        read_until(first, "epoch   2/1000")
        in_use = f"{run} is in use: process {first.pid} is training it"
        for argv, flag in ((["--resume", str(run)], "--resume"),
                           (TINY + ["--epochs", "1", "--data-dir", str(data_dir), "--out-dir", str(run)], "--out-dir")):
            assert train.main(argv) == 1
            err = capsys.readouterr().err
            assert err.startswith(f"error: {flag} {in_use}") and err.count("\n") == 1, err

        # Reading a run that trains takes no lock.
        image = tmp_path / "image.png"
        Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
        assert vit_predict.main([str(run), str(image), "--device", "cpu"]) == 0
        assert "1. " in capsys.readouterr().out
        assert (run / LOCK_FILE).read_text().strip() == str(first.pid)
    finally:
        first.kill()
        first.communicate()
    RunLock.acquire(run).release()  # a killed run leaves no lock behind: the kernel released it


# ------------------------------------------------------------------------------- stop signals

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "sighup"])
def test_a_stop_signal_in_epoch_2_stops_cleanly_and_resume_keeps_every_epoch_once(data_dir, tmp_path, signum):
    run = tmp_path / "run"
    process = start([sys.executable, "-c", SIGNAL_AT_STEP, signum.name, str(STEPS_PER_EPOCH + 1), *TINY,
                     "--epochs", "2", "--data-dir", str(data_dir), "--out-dir", str(run)])
    out, err = process.communicate()
    assert process.returncode == 128 + signum, err
    expected = f"{cli.stopped_by(signum)}; continue with: "
    assert err.startswith(expected) and err.count("\n") == 1, err
    assert shlex.split(err[len(expected):])[-2:] == ["--resume", str(run)]
    assert "epoch   1/2" in out and "epoch   2/2" not in out
    state = load_checkpoint(run / "last.pt")  # whole: the step in flight was abandoned, nothing half-written
    assert state["epoch"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values())
    assert epochs_in(run) == [1] and hidden_files(run) == []

    assert train.main(["--resume", str(run)]) == 0
    assert epochs_in(run) == [1, 2] and load_checkpoint(run / "last.pt")["epoch"] == 2


def test_a_stop_before_the_first_checkpoint_says_the_run_starts_over(data_dir, tmp_path):
    run = tmp_path / "run"
    process = start([sys.executable, "-c", SIGNAL_AT_STEP, "SIGTERM", "2", *TINY, "--epochs", "2",
                     "--data-dir", str(data_dir), "--out-dir", str(run)])
    _, err = process.communicate()
    assert process.returncode == 128 + signal.SIGTERM, err
    assert err.startswith("stopped by SIGTERM before the first epoch ended, so nothing was saved: the run will start "
                          "over from the beginning (the work so far is lost); start it over with: "), err
    assert err.count("\n") == 1 and err.rstrip().endswith(f"--resume {run}")
    assert not (run / "last.pt").exists() and hidden_files(run) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_torchrun_stopped_stops_every_rank_quietly(data_dir, tmp_path, signum):
    run = tmp_path / "run"
    launcher = start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                      *TINY, "--epochs", "1000", "--data-dir", str(data_dir), "--out-dir", str(run)])
    read_until(launcher, "epoch   1/1000")
    launcher.send_signal(signum)  # Ctrl-C in its terminal, or a scheduler's SIGTERM: torchrun passes it on
    _, err = launcher.communicate()
    assert launcher.returncode != 0
    # Rank 0 says what happened once; no rank prints a traceback (torch's launcher may print its own).
    assert err.count(f"{cli.stopped_by(signum)}; continue with: ") == 1, err
    assert not any(f'File "{REPO / code}' in err for code in ("train.py", "vit")), err  # not the .venv's torch
    assert "Stopped" not in err and "KeyboardInterrupt" not in err, err
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] >= 1 and epochs_in(run) == list(range(1, state["epoch"] + 1))
    assert hidden_files(run) == []


# ------------------------------------------------------------------------------- a full disk

class FullDisk:
    """A folder whose filesystem fills on demand: a tmpfs of a few MB filled with a ballast file
    (needs root, as CI and the test machines run), or, anywhere, every file's flush to the disk
    failing with ENOSPC as a full disk's does."""

    def __init__(self, kind: str, folder: Path, monkeypatch):
        self.kind, self.folder, self.monkeypatch = kind, folder, monkeypatch

    def fill(self):
        if self.kind == "tmpfs":
            with open(self.folder / "ballast", "wb") as f:
                try:
                    while True:
                        f.write(bytes(1 << 16))
                        f.flush()
                except OSError as error:
                    assert error.errno == errno.ENOSPC
        else:
            def no_space(descriptor):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.monkeypatch.setattr(os, "fsync", no_space)

    def free(self):
        if self.kind == "tmpfs":
            (self.folder / "ballast").unlink()
        else:
            self.monkeypatch.undo()


@pytest.fixture(params=["tmpfs", "patched"])
def full_disk(request, tmp_path, monkeypatch):
    folder = tmp_path / "disk"
    folder.mkdir()
    if request.param == "tmpfs":
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root; the patched variant runs instead")
        # 4 MB: room for the run's files (about 0.6 MB) and a ballast that fills the rest.
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the patched variant runs instead")
    yield FullDisk(request.param, folder, monkeypatch)
    if request.param == "tmpfs":
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_full_disk_names_the_file_keeps_the_last_checkpoint_and_resume_finishes(data_dir, full_disk, monkeypatch,
                                                                                  capsys):
    run = full_disk.folder / "run"
    original = Trainer.train_epoch

    def fill_before_epoch_2(self, epoch):
        if epoch == 1:
            self.writer.wait()  # epoch 1's files are written
            full_disk.fill()
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", fill_before_epoch_2)
    assert train.main(TINY + ["--epochs", "2", "--data-dir", str(data_dir), "--out-dir", str(run)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {run / 'last.pt'}: no space left on device; its previous version is "
                          f"intact; free some space, then continue with: "), err
    assert err.count("\n") == 1 and err.rstrip().endswith(f"--resume {run}")
    assert load_checkpoint(run / "last.pt")["epoch"] == 1 and epochs_in(run) == [1]
    assert hidden_files(run) == []

    full_disk.free()
    monkeypatch.setattr(Trainer, "train_epoch", original)
    assert train.main(["--resume", str(run)]) == 0
    assert epochs_in(run) == [1, 2] and load_checkpoint(run / "last.pt")["epoch"] == 2


def test_a_disk_full_at_the_start_leaves_nothing_behind(data_dir, full_disk, capsys):
    run = full_disk.folder / "run"
    full_disk.fill()
    assert train.main(TINY + ["--epochs", "1", "--data-dir", str(data_dir), "--out-dir", str(run)]) == 1
    assert capsys.readouterr().err == (f"error: cannot write {run / 'config.json'}: no space left on device; it was "
                                       f"not written; free some space, then start the run again\n")
    assert not run.exists()  # the run created it and gave it back: the same --out-dir starts a run
    full_disk.free()


def test_a_folder_holding_only_what_a_killed_run_left_is_claimed_and_cleaned(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".config.json.tmp").write_text('{"mod')  # a kill inside the first write
    (out / "config.json").touch()  # the claim of the killed run
    (out / LOCK_FILE).write_text("4194304\n")  # its lock file: the lock itself ended with it
    path, created, lock = train.claim_run_dir(str(out))
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "config.json"]
    assert (out / "config.json").stat().st_size == 0 and not created
    train.release_run_dir(path, created, lock)
    assert list(out.iterdir()) == []

    (out / "notes.txt").write_text("the user's")
    with pytest.raises(ValueError, match="exists and is not empty"):
        train.claim_run_dir(str(out))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]  # refused without a trace


# ------------------------------------------------------------------------------- a hostile checkpoint

@pytest.fixture
def hostile_run(data_dir, tmp_path):
    """A run directory whose checkpoints hold a payload that would create a file when unpickled."""
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {shlex.quote(str(marker))}",)

    run = tmp_path / "run"
    run.mkdir()
    train_cfg = TrainConfig(epochs=2, batch_size=20, precision="fp32", device="cpu",
                            data_dir=str(data_dir), out_dir=str(run), progress=False)
    write_config(run, ViTConfig(dim=32, depth=1, heads=2, mlp_dim=32), train_cfg, [str(i) for i in range(10)], "cpu")
    for name in ("last.pt", "best.pt"):
        # Protocol 3: the one that also draws a warning from torch's loader.
        torch.save({"epoch": 1, "model": {}, "payload": Payload()}, run / name, pickle_protocol=3)
    return run, marker


@pytest.mark.parametrize("command", ["resume", "evaluate", "predict"])
def test_a_checkpoint_holding_python_objects_is_refused_as_such(hostile_run, tmp_path, command, capsys):
    run, marker = hostile_run
    image = tmp_path / "image.png"
    Image.new("RGB", (32, 32)).save(image)
    argv = {"resume": ["--resume", str(run)], "evaluate": [str(run), "--device", "cpu"],
            "predict": [str(run), str(image), "--device", "cpu"]}[command]
    main = {"resume": train.main, "evaluate": vit_evaluate.main, "predict": vit_predict.main}[command]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(argv)
    err = capsys.readouterr().err
    checkpoint = run / ("last.pt" if command == "resume" else "best.pt")
    assert code == 1 and err.count("\n") == 1, err
    assert f"{checkpoint}: holds Python objects beyond tensors (posix.system); refused, nothing was run" in err, err
    assert "weights_only" not in err and "truncated" not in err
    assert [str(w.message) for w in caught] == []  # nothing of torch's leaks
    assert not marker.exists()
