"""A run directory's files, read and written in one place (the trainer, vit.evaluate, vit.predict).

A run directory holds
- config.json  the model and training configuration, written when the run starts;
- last.pt      the checkpoint of the last finished epoch: weights (and their average, "ema", when the
               run keeps one), optimizer, RNG states, and the metrics of every epoch so far. It is
               the run's single source of truth;
- best.pt      the checkpoint of the epoch with the best test accuracy so far;
- metrics.csv and curves.png, regenerated from the checkpoint's metrics after each checkpoint
  and on resume, so a kill between two writes never loses an epoch's row.

Every file is written atomically (a temporary name, then a rename): a kill or a failed write
(vit.environment.WriteError: a full disk, a quota) at any moment leaves each file whole, in its
previous or its new version. A resume removes the temporaries a kill left (remove_stale_temporaries).

While a run trains, its process holds an exclusive lock on the directory (RunLock, an OS file lock
that ends with the process): a second training process on the same directory is refused, naming
the first. Reading a run (vit.evaluate, vit.predict) takes no lock: every file it reads is whole.

Checkpoints are written off the training thread. On it, HostSnapshot copies the state's tensors
into host buffers kept from one epoch to the next (from a GPU: into pinned buffers, enqueued on the
device's stream, followed by an event); BackgroundWriter runs the writes on a thread, one job at a
time, and a job waits for the copies' event before it reads the buffers.
"""
import csv
import fcntl
import json
import os
import pickle
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from vit.config import TrainConfig
from vit.environment import atomic_write, device_name, versions
from vit.model import ViTConfig

CONFIG_FILE = "config.json"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
METRICS_FILE = "metrics.csv"
CURVES_FILE = "curves.png"
LOCK_FILE = ".train.lock"  # held by the training process, holds its pid; removed when the run ends
METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds",
                  "images_per_second"]
# After those, in a run that keeps an average of the weights (TrainConfig.ema_decay): its evaluation.
EMA_METRIC_COLUMNS = ["ema_test_loss", "ema_test_acc"]
# Test hook: with VIT_TEST_KILL_AFTER_CHECKPOINT=N in the environment, the process SIGKILLs itself
# right after epoch N's last.pt is in place and before metrics.csv is rewritten: the window in which
# a kill used to lose an epoch's row (tests/test_checkpoint.py).
KILL_AFTER_CHECKPOINT_VARIABLE = "VIT_TEST_KILL_AFTER_CHECKPOINT"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# ---------------------------------------------------------------------------- checkpoints

def _torch_save(state: dict, path: Path):
    """torch.save through a Python file: a failed write is the OSError it is (no space, a quota),
    where torch's own file writer reports an "enforce fail" RuntimeError."""
    with open(path, "wb") as f:
        torch.save(state, f)


def save_checkpoint(path: Path, state: dict):
    atomic_write(path, lambda tmp: _torch_save(state, tmp))


# What torch's weights-only unpickler says when a file names a Python object (a class, a function
# to call) that a checkpoint of tensors never holds, with the object's name.
_FOREIGN_OBJECT = re.compile(r"GLOBAL (\S+)|unrecognized function (\S+)|but got <class '([^']+)'>")


def _unpickler_reason(message: str) -> str:
    """The weights-only unpickler's own reason, without torch's advice around it (which suggests
    loading the file with weights_only=False: running whatever it holds)."""
    found = re.search(r"WeightsUnpickler error:\s*(\S.*)", message) or re.search(r"\n\n(\S.*)", message)
    return found.group(1).strip() if found else "refused by torch's weights-only loader"


def load_checkpoint(path: Path, device="cpu") -> dict:
    """A checkpoint written by save_checkpoint (weights_only: a checkpoint is data, never code).
    FileNotFoundError when it is missing; RuntimeError with a one-line message naming the file
    when it holds Python objects beyond tensors (refused, nothing in it runs), cannot be read,
    or is not a training checkpoint. torch's warnings about the file stay silent."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error below says it all
            state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # truncated, not a torch file, disallowed objects: many exception types
        if isinstance(error, pickle.UnpicklingError) and str(error).startswith("Weights only load failed"):
            reason = _unpickler_reason(str(error))
            named = _FOREIGN_OBJECT.search(reason)
            if named:
                name = next(group for group in named.groups() if group)
                raise RuntimeError(f"{path}: holds Python objects beyond tensors ({name}); refused, "
                                   f"nothing was run") from None
            raise RuntimeError(f"{path}: cannot read the checkpoint, not a torch.save file of tensors "
                               f"({reason})") from None
        raise RuntimeError(f"{path}: cannot read the checkpoint, truncated or not a torch.save file "
                           f"({_first_line(error)})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise RuntimeError(f"{path}: not a training checkpoint (expected a dict with the model's state_dict under \"model\")")
    return state


def _link_or_copy(source: Path, target: Path):
    """target becomes the same bytes as source: a hard link (no second write of the same bytes;
    files here are only ever replaced, never changed in place), or a copy where links fail."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_epoch_files(run_dir: Path, state: dict, best: bool, curves: bool):
    """One finished epoch: last.pt (and best.pt), then metrics.csv and curves.png from the metrics
    inside the checkpoint. best.pt is renamed into place before last.pt: a kill between the two
    renames leaves last.pt one epoch behind (a resume trains that epoch again), never a best.pt
    older than the best epoch last.pt records."""
    run_dir = Path(run_dir)

    def write_last(tmp: Path):
        _torch_save(state, tmp)
        if best:
            atomic_write(run_dir / BEST_CHECKPOINT, lambda best_tmp: _link_or_copy(tmp, best_tmp))

    atomic_write(run_dir / LAST_CHECKPOINT, write_last)
    if os.environ.get(KILL_AFTER_CHECKPOINT_VARIABLE) == str(state["epoch"]):
        os.kill(os.getpid(), signal.SIGKILL)
    write_outputs(run_dir, state["metrics"], curves=curves)


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files (.NAME.tmp) a killed write left in run_dir; returns them."""
    stale = sorted(p for p in Path(run_dir).glob(".*.tmp") if p.is_file())
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


# ---------------------------------------------------------------------------- one writer per run

class RunInUse(RuntimeError):
    """Another process holds the run directory's lock: the message names it."""


class RunLock:
    """An exclusive lock on a run directory for the life of the process that trains it: flock on
    LOCK_FILE, which the kernel releases when the process ends however it ends, so a killed run
    never leaves a stale lock. The file holds the holder's pid, for the message of a refused one."""

    def __init__(self, path: Path, descriptor: int):
        self.path, self._descriptor = path, descriptor

    @classmethod
    def acquire(cls, run_dir: Path) -> "RunLock":
        """The lock, or RunInUse naming the process that holds it."""
        path = Path(run_dir) / LOCK_FILE
        while True:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(descriptor, 32).decode(errors="replace").strip()
                os.close(descriptor)
                who = f"process {holder}" if holder.isdigit() else "another process"
                raise RunInUse(f"{run_dir} is in use: {who} is training it (one training process per run "
                               f"directory); wait for it to end, or stop it first") from None
            try:
                current = os.stat(path).st_ino == os.fstat(descriptor).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(descriptor)  # the holder removed the file as we opened it: lock the new one
        try:
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()}\n".encode())
        except OSError:
            pass  # no room for the pid on a full disk: the lock holds without it
        return cls(path, descriptor)

    def release(self):
        """Remove the lock file, then unlock (a process that opened it meanwhile sees it removed)."""
        if self._descriptor is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # a folder gone read-only: the file stays, a leftover the next claim or lock reuses
        os.close(self._descriptor)
        self._descriptor = None


def is_own_leftover(path: Path) -> bool:
    """A file a run leaves only when it was killed: a temporary of an interrupted write, the lock
    file, or the empty config.json by which a run claims its directory before writing it."""
    name = path.name
    return (name.startswith(".") and name.endswith(".tmp")) or name == LOCK_FILE or (
        name == CONFIG_FILE and path.is_file() and path.stat().st_size == 0)


# ---------------------------------------------------------------------------- metrics

def metric_columns(rows: list[dict]) -> list[str]:
    """metrics.csv's columns: METRIC_COLUMNS, then EMA_METRIC_COLUMNS when the rows have them."""
    return METRIC_COLUMNS + (EMA_METRIC_COLUMNS if rows and EMA_METRIC_COLUMNS[0] in rows[0] else [])


def write_metrics(path: Path, rows: list[dict]):
    columns = metric_columns(rows)

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows({k: row[k] for k in columns} for row in rows)
    atomic_write(path, write)


def write_outputs(run_dir: Path, rows: list[dict], curves: bool = True):
    """metrics.csv, and curves.png when asked, from the metrics a checkpoint carries."""
    write_metrics(Path(run_dir) / METRICS_FILE, rows)
    if curves and rows:
        # Imported here: matplotlib is paid for only by what draws (vit.predict never does).
        from vit.plots import plot_curves
        plot_curves(rows, Path(run_dir) / CURVES_FILE)


# ---------------------------------------------------------------------------- config.json

def write_config(run_dir: Path, model_cfg: ViTConfig, train_cfg: TrainConfig, class_names: list[str], device):
    config = {"model": asdict(model_cfg), "train": asdict(train_cfg), "class_names": class_names,
              "versions": versions(), "device": device_name(torch.device(device)), "command": sys.argv}
    atomic_write(Path(run_dir) / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))


def read_config_file(path: Path) -> dict:
    """config.json as a dict with a "model" section; ValueError with a one-line message naming the
    file when it is unreadable or not such a dict (FileNotFoundError when it is missing)."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable ({_first_line(error)})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError(f"{path}: has no \"model\" section")
    return config


def read_config(run_dir: Path) -> tuple[ViTConfig, TrainConfig]:
    """The run's model and training configuration; fields this version does not know are ignored."""
    path = Path(run_dir) / CONFIG_FILE
    config = read_config_file(path)
    train = config.get("train")
    if not isinstance(train, dict):
        raise ValueError(f"{path}: has no \"train\" section")
    known = {f.name for f in fields(TrainConfig)}
    try:
        return ViTConfig(**config["model"]), TrainConfig(**{k: v for k, v in train.items() if k in known})
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: not a valid configuration ({_first_line(error)})") from None


# ---------------------------------------------------------------------------- off the training thread

@dataclass
class HostCopy:
    """What HostSnapshot.take returns: the state with its tensors in host buffers, and the event
    recorded after the copies from a GPU (None when every copy was made at once, from the CPU)."""
    state: dict
    copied: torch.cuda.Event | None

    def wait(self):
        """Block until the copies are in the host buffers (a GPU's run behind the host)."""
        if self.copied is not None:
            self.copied.synchronize()


class HostSnapshot:
    """Host copies of the tensors in a nested state (dicts, lists, tuples), in buffers kept from
    one snapshot to the next: allocating 75 MB afresh each epoch costs more than copying it.
    Buffers for CUDA tensors are pinned and filled with non-blocking copies on the device's current
    stream: the copies run in stream order, before any kernel enqueued after them changes a tensor,
    so the host never waits for them to start. The caller must not take the next snapshot while a
    reader of the previous one may still read the buffers."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def take(self, state: dict) -> HostCopy:
        """The state with every tensor replaced by its copy in the host buffers (enqueued, from a GPU)."""
        devices = set()
        host = self._copy(state, (), devices)
        if len(devices) > 1:  # one event orders one device's copies
            raise ValueError(f"a snapshot's tensors must be on one GPU; these are on {sorted(map(str, devices))}")
        copied = None
        if devices:
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(devices.pop()))
        return HostCopy(host, copied)

    def _copy(self, state, path: tuple, devices: set):
        if isinstance(state, torch.Tensor):
            buffer = self._buffers.get(path)
            if buffer is None or buffer.shape != state.shape or buffer.dtype != state.dtype:
                buffer = torch.empty(state.shape, dtype=state.dtype, pin_memory=state.is_cuda)
                self._buffers[path] = buffer
            if state.is_cuda:
                devices.add(state.device)
            return buffer.copy_(state.detach(), non_blocking=state.is_cuda)
        if isinstance(state, dict):
            return {k: self._copy(v, path + (k,), devices) for k, v in state.items()}
        if isinstance(state, (list, tuple)):
            return type(state)(self._copy(v, path + (i,), devices) for i, v in enumerate(state))
        return state


class BackgroundWriter:
    """Runs jobs (file writes) on a background thread, one at a time: submit() first waits for
    the previous job. An error in a job is raised by the next submit() or wait(). The thread is not
    a daemon, so a job under way when the main thread ends still finishes its file. A job runs
    beside the training thread: it reads copies, never what training goes on changing (the metrics
    list, the weights)."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.job_seconds: list[float] = []  # how long each finished job ran, in order

    def submit(self, job: Callable[[], None]):
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(job,), name="run-directory-writer")
        self._thread.start()

    def _run(self, job):
        started = time.perf_counter()
        try:
            job()
        except BaseException as error:  # handed to the training thread by wait()
            self._error = error
        self.job_seconds.append(time.perf_counter() - started)

    def wait(self):
        """Block until the job under way (if any) has finished; raise its error, if it had one."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
