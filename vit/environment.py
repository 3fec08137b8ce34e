"""The machine a run happens on: which device to use, its name, package versions, and
files written so that a kill mid-write never leaves a broken one.

Shared by train.py, vit.evaluate / vit.predict and the bench, so that all of them accept
--device the same way and record the same facts about where they ran.
"""
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch


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


def atomic_write(path: Path, write: Callable[[Path], None]):
    """write(tmp) to a temporary name beside path, then rename it over path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
