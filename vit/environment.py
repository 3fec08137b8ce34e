"""The machine a run happens on: which device to use, its name, package versions, the signals
that stop a run, and files written so that a kill or a failed write never leaves a broken one.

Shared by train.py, vit.evaluate / vit.predict and the bench, so that all of them accept
--device the same way and record the same facts about where they ran.
"""
import errno
import os
import platform
import signal
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch


# What asks a run to stop: Ctrl-C, a scheduler's or `kill`'s SIGTERM, a closed terminal's SIGHUP.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_device(name: str | None) -> torch.device:
    """--device's value (None: cuda when available, else cpu) as a device this machine has.
    ValueError with a one-line message that completes "argument --device: ..."."""
    try:
        device = torch.device(name or default_device())
    except (RuntimeError, TypeError):
        raise ValueError(f"{name!r} is not a device: use cuda, cuda:N or cpu") from None
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"{name!r} is not a device to train on: use cuda, cuda:N or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def versions() -> dict:
    """Python, torch, CUDA, cuDNN and the installed versions of the other packages that
    change the numbers (read from their metadata: nothing is imported)."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    for package in ("torchvision", "triton", "timm"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


class WriteError(OSError):
    """A file could not be written (no space, a quota, a read-only or vanished folder). Its
    message names the file and says that the file's previous version, if it had one, is intact."""

    def __init__(self, path: Path, cause: OSError):
        super().__init__(cause.errno, cause.strerror, str(path))
        self.path = Path(path)
        if cause.errno == errno.ENOENT and not self.path.parent.is_dir():
            self.reason = f"its folder {self.path.parent} no longer exists"
        else:
            self.reason = (cause.strerror or str(cause)).lower()
        # A run's claim on its folder is an empty config.json: no version of it to keep.
        kept = self.path.is_file() and self.path.stat().st_size > 0
        self.kept = "its previous version is intact" if kept else "it was not written"

    def __str__(self):
        return f"cannot write {self.path}: {self.reason}; {self.kept}"


def atomic_write(path: Path, write: Callable[[Path], None]):
    """write(tmp) to a temporary name beside path, flush it to the disk, then rename it over path:
    path is replaced only by a file written in full. When anything fails, the temporary is removed
    and path keeps its previous version; an OSError becomes a WriteError naming path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        # A full disk or quota can show only when the data reaches it (delayed allocation, network
        # filesystems): before the rename, not after.
        descriptor = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(tmp, path)
    except BaseException as error:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the folder itself is gone or read-only: nothing of ours is left to remove
        if isinstance(error, OSError) and not isinstance(error, WriteError):
            raise WriteError(path, error) from error
        raise
