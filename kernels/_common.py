"""What every op module in kernels/ needs besides its kernels: output allocation (with the
NaN-poisoning switch the tests use), interpreter detection, input checks, the device
context a launch runs in, and planned launches.
"""
import contextlib
import os
from dataclasses import dataclass

import torch

from kernels import interpreter_bf16

# When True, outputs and scratch buffers are allocated filled with NaN instead of left
# uninitialised, so an element a kernel forgets to write shows up in tests. Tests switch it
# on (monkeypatch this attribute); KERNELS_POISON_OUTPUTS=1 does the same for a whole run.
POISON_OUTPUTS = os.environ.get("KERNELS_POISON_OUTPUTS", "0") == "1"

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output or scratch buffer: uninitialised, or NaN-filled when POISON_OUTPUTS is on
    (integer buffers are then filled with -1)."""
    if POISON_OUTPUTS:
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# Shapes whose launches each op module keeps planned (functools.lru_cache of its planner):
# a model calls each op at one or two shapes (training and evaluation batches); tests at a few
# dozen.
PLANNED_SHAPES = 64


@dataclass(frozen=True)
class Launch:
    """One kernel launch planned for a shape: its grid and keyword arguments (constexprs,
    num_warps, num_stages), computed once, so that a call only passes the tensors and the
    runtime integers."""
    kernel: object
    grid: tuple
    options: dict

    def __call__(self, *args):
        self.kernel[self.grid](*args, **self.options)


def is_interpreted(kernel) -> bool:
    """Whether this @triton.jit kernel runs through Triton's interpreter, which Triton decides
    when the kernel is decorated (TRITON_INTERPRET=1 at import time)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def interpreter_broken_reason() -> str | None:
    """Why Triton's interpreter cannot run on this stack, or None. Triton before 3.7 runs its
    interpreter on NumPy APIs that NumPy 2.4 removed, so every interpreted kernel fails ("only
    0-dimensional arrays can be converted to Python scalars"): an upstream bug, and the GPU
    machine's stack (Triton 3.6, NumPy 2.5) has it."""
    from importlib.metadata import version

    import numpy

    def major_minor(text):
        return tuple(int(part) for part in text.split(".")[:2])

    triton_version = version("triton")
    if major_minor(triton_version) < (3, 7) and major_minor(numpy.__version__) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter fails with NumPy {numpy.__version__} (an upstream bug; "
                "Triton 3.8 with NumPy 2.4 works); run on a GPU, or with NumPy < 2.4")
    return None


_NO_DEVICE_SWITCH = contextlib.nullcontext()  # reusable: it holds no state


def on_device_of(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (cuda:1 etc.). torch's
    device guard built from the index: torch.cuda.device would parse its argument in Python on
    every operator call."""
    return torch.cuda._DeviceGuard(tensor.device.index) if tensor.is_cuda else _NO_DEVICE_SWITCH


def check_device(name: str, tensor: torch.Tensor, interpreted: bool, module: str):
    """ValueError unless the kernels can run on tensor's device: CUDA, or the CPU when the
    kernels were defined under the interpreter."""
    if tensor.device.type == "cuda":
        return
    if tensor.device.type == "cpu":
        if not interpreted:
            raise ValueError(f"{name} is on the CPU; the Triton kernels need a CUDA tensor, "
                             f"or TRITON_INTERPRET=1 set before {module} is imported")
        return
    raise ValueError(f"{name} is on {tensor.device}, which the Triton kernels do not support; use a CUDA tensor")


def refuse_interpreted_bf16(what: str, interpreted: bool, matmul_dtype: torch.dtype):
    """Triton's interpreter computes bf16 dots on bit patterns (Triton 3.6-3.8: garbage, no
    error): refuse rather than return wrong numbers, unless kernels.interpreter_bf16 is installed."""
    if interpreted and matmul_dtype == torch.bfloat16 and not interpreter_bf16.is_installed():
        raise ValueError(f"{what} asks for bfloat16 matmuls, which the Triton interpreter computes wrongly; "
                         "call kernels.interpreter_bf16.install() first, or use float32 or float16 under "
                         "TRITON_INTERPRET=1 (bf16 runs on a GPU)")


def check_floating(name: str, tensor, supported=SUPPORTED_DTYPES):
    """ValueError unless tensor is a tensor of one of the supported dtypes."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in supported:
        names = ", ".join(str(dtype).removeprefix("torch.") for dtype in supported)
        raise ValueError(f"{name} has dtype {tensor.dtype}; supported: {names}")
