"""A run's directory and its life: claimed atomically (two runs never share one), resumable
from its start, and Ctrl-C at any moment prints only the line that resumes it (exit 130),
with the last finished epoch's checkpoint intact."""
import csv
import json
import multiprocessing
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import train
from conftest import write_cifar_folder
from vit import data as cifar
from vit.checkpoint import RunInUse
from vit.trainer import load_checkpoint

REPO = Path(train.__file__).resolve().parent
TINY = ["--device", "cpu", "--depth", "1", "--dim", "32", "--heads", "2", "--mlp-dim", "32", "--no-progress",
        "--batch-size", "20", "--warmup-epochs", "0.5", "--seed", "3"]
RESUME_LINE = "interrupted; continue with: "
# Before the first checkpoint there is nothing to continue from: the same command starts over.
START_OVER_LINE = ("interrupted before the first epoch ended, so nothing was saved: the run will start over from the "
                   "beginning (the work so far is lost); start it over with: ")


def epochs_in(run: Path) -> list[int]:
    with open(run / "metrics.csv", newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_cifar_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def longer_data_dir(tmp_path_factory):
    """500 training images: 25 steps per epoch, long enough to be interrupted inside one."""
    return write_cifar_folder(tmp_path_factory.mktemp("data"), per_batch=100)


# --- claiming -------------------------------------------------------------------------------

def _claim_in_child(folder, barrier, results, done):
    os.chdir(folder)
    time.strftime = lambda fmt: "20260101-000000"  # every claimant sees the same second
    barrier.wait()
    try:
        results.put(str(train.claim_run_dir(None)[0]))
    except ValueError as error:
        results.put(f"error: {error}")
    done.wait(120)  # a claim lasts as long as its run: keep it until every claimant has tried


def test_runs_started_in_the_same_second_get_distinct_directories(tmp_path):
    context = multiprocessing.get_context("fork")
    claimants = 6
    barrier, results, done = context.Barrier(claimants), context.Queue(), context.Event()
    processes = [context.Process(target=_claim_in_child, args=(tmp_path, barrier, results, done))
                 for _ in range(claimants)]
    for process in processes:
        process.start()
    claimed = sorted(results.get(timeout=120) for _ in processes)
    done.set()
    for process in processes:
        process.join(timeout=60)
    assert claimed == sorted(["runs/20260101-000000"] + [f"runs/20260101-000000-{n}" for n in range(2, claimants + 1)])
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(Path(c).name for c in claimed)


def _claim_given_dir_in_child(out_dir, barrier, results, done):
    barrier.wait()
    try:
        results.put(str(train.claim_run_dir(out_dir)[0]))
    except (ValueError, RunInUse) as error:
        results.put(f"error: {error}")
    done.wait(120)  # a claim lasts as long as its run: keep it until every claimant has tried


@pytest.mark.parametrize("exists", [False, True], ids=["new", "existing-empty"])
def test_one_out_dir_goes_to_exactly_one_of_two_runs(tmp_path, exists):
    out_dir = tmp_path / "run"
    if exists:
        out_dir.mkdir()
    context = multiprocessing.get_context("fork")
    barrier, results, done = context.Barrier(4), context.Queue(), context.Event()
    processes = [context.Process(target=_claim_given_dir_in_child, args=(str(out_dir), barrier, results, done))
                 for _ in range(4)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    done.set()
    for process in processes:
        process.join(timeout=60)
    assert outcomes.count(str(out_dir)) == 1, outcomes
    # A loser names the winner's pid, or "another process" when it looked between the winner's lock
    # and its writing of the pid (tests/test_reliability.py checks the pid of a running holder).
    assert all(f"{out_dir} is in use: " in o for o in outcomes if o != str(out_dir)), outcomes


def test_release_undoes_only_the_claim(tmp_path):
    path, created, lock = train.claim_run_dir(str(tmp_path / "a"))
    assert created
    train.release_run_dir(path, created, lock)
    assert not path.exists()
    (tmp_path / "b").mkdir()
    path, created, lock = train.claim_run_dir(str(tmp_path / "b"))
    assert not created and (path / "config.json").stat().st_size == 0  # the claim: an empty config.json
    train.release_run_dir(path, created, lock)
    assert path.is_dir() and not any(path.iterdir())  # the folder was the user's: it stays


def test_two_runs_started_at_once_without_out_dir_never_share_a_directory(data_dir, tmp_path):
    command = [sys.executable, str(REPO / "train.py"), *TINY, "--epochs", "1",
               "--data-dir", str(data_dir)]
    runs = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err for _, err in results]
    directories = sorted((tmp_path / "runs").iterdir())
    assert len(directories) == 2
    for directory in directories:
        assert json.loads((directory / "config.json").read_text())["train"]["out_dir"] == f"runs/{directory.name}"
        assert epochs_in(directory) == [1] and load_checkpoint(directory / "last.pt")["epoch"] == 1
    assert sorted(out.split("run directory ")[1].split(";")[0] for out, _ in results) == \
        [f"runs/{d.name}" for d in directories]


# --- Ctrl-C -----------------------------------------------------------------------------------

def interrupt(argv: list[str], after: str, delay: float = 0.0) -> tuple[int, str, str]:
    """Run train.py from the repository and press Ctrl-C once stdout shows `after`: SIGINT to the
    whole process group, as a terminal sends it."""
    process = subprocess.Popen([sys.executable, "train.py", *argv], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    watchdog = threading.Timer(600, lambda: os.killpg(process.pid, signal.SIGKILL))
    watchdog.start()
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if after in line:
                time.sleep(delay)
                os.killpg(process.pid, signal.SIGINT)
                break
        out, err = process.communicate()
    finally:
        watchdog.cancel()
    return process.returncode, "".join(lines) + out, err


def assert_only_the_resume_line(code: int, err: str, run: Path, line: str = RESUME_LINE) -> list[str]:
    """The interrupted run's stderr: exactly one line, the command that resumes it; returns that command."""
    assert code == 130, err
    assert err.count("\n") == 1 and err.startswith(line), err
    command = shlex.split(err[len(line):])
    assert command[-2:] == ["--resume", str(run)]
    return command


def resume(command: list[str]) -> subprocess.CompletedProcess:
    """The printed command, as the user would paste it in the same directory."""
    return subprocess.run([sys.executable, *command[1:]], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ctrl_c_in_epoch_1_then_resume_starts_it_from_the_beginning(longer_data_dir, tmp_path):
    run = tmp_path / "run"
    code, out, err = interrupt(TINY + ["--epochs", "2", "--data-dir", str(longer_data_dir), "--out-dir", str(run)],
                               after="run directory")
    command = assert_only_the_resume_line(code, err, run, START_OVER_LINE)
    assert "epoch   1/2" not in out
    assert (run / "config.json").stat().st_size > 0 and not (run / "last.pt").exists()

    result = resume(command)
    assert result.returncode == 0, result.stderr
    assert "it has config.json but no last.pt" in result.stdout and "starts from the beginning" in result.stdout
    assert epochs_in(run) == [1, 2] and load_checkpoint(run / "last.pt")["epoch"] == 2


def test_ctrl_c_as_epoch_2_starts_keeps_epoch_1_and_resume_finishes_the_run(longer_data_dir, tmp_path):
    run = tmp_path / "run"
    # Right after epoch 1's line: between two epochs, as epoch 2 starts.
    code, out, err = interrupt(TINY + ["--epochs", "2", "--data-dir", str(longer_data_dir), "--out-dir", str(run)],
                               after="epoch   1/2")
    command = assert_only_the_resume_line(code, err, run)
    assert "epoch   2/2" not in out
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values())
    assert epochs_in(run) == [1]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # no half-written file

    result = resume(command)
    assert result.returncode == 0, result.stderr
    assert "resuming after epoch 1" in result.stdout
    assert epochs_in(run) == [1, 2] and load_checkpoint(run / "last.pt")["epoch"] == 2


def test_ctrl_c_during_the_imports_exits_quietly():
    process = subprocess.Popen([sys.executable, "train.py", "--help"], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # inside `import torch`, which takes seconds
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the imports finished within 0.3 s: nothing was interrupted")
    assert process.returncode == 130 and err == "" and out == ""


def test_ctrl_c_while_the_data_loads(data_dir, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cifar, "load_cifar10", interrupted)
    run = tmp_path / "run"
    code = train.main(TINY + ["--epochs", "1", "--data-dir", str(data_dir), "--out-dir", str(run)])
    err = capsys.readouterr().err
    assert code == 130 and err == "interrupted before the run started; nothing was saved\n"
    assert not run.exists()  # nothing to resume: the claim is given back

    monkeypatch.undo()
    assert train.main(TINY + ["--epochs", "1", "--data-dir", str(data_dir),
                              "--out-dir", str(run)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(cifar, "load_cifar10", interrupted)
    assert train.main(["--resume", str(run)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(RESUME_LINE) and err.rstrip().endswith(f"--resume {run}")
