"""What every op module in kernels/ needs besides its kernels: output allocation (with the
NaN-poisoning switch the tests use), interpreter detection, input checks, the device
context a launch runs in, planned launches, and the registration of an op as PyTorch
operators.
"""
import contextlib
import os
import warnings
from dataclasses import dataclass

import torch

from kernels import interpreter_bf16, interpreter_patching

# Under the interpreter, triton.language is patched once per launch instead of once per
# device-function call (kernels/interpreter_patching.py): the same results in fewer calls.
if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        interpreter_patching.install()
    except RuntimeError as error:
        warnings.warn(f"{error}: the interpreter runs as it is, slower")

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


def operand_shapes(**shapes) -> tuple:
    """An op's operand shapes, for check_operands: each tensor's dimensions by name, in order,
    ("...", "C") for x of shape [..., C]. A name's size is bound by the first tensor that has it,
    and every later tensor must agree ("..." too: the same leading dimensions); every size but
    those before the first tensor's last must be positive. Prepared once, at import: the checks
    run on every call of an op, and their Python calls count (tests/test_host_cost.py)."""
    prepared = []
    for name, dims in shapes.items():
        named = dims[1:] if dims[0] == "..." else dims
        # Each named dimension with its index from the end of the shape.
        prepared.append((name, dims[0] == "...", len(named), tuple(zip(named, range(-len(named), 0)))))
    return tuple(prepared)


def check_operands(tensors: dict, shapes: tuple, matmul_dtype: torch.dtype | None, interpreted: bool, module: str,
                   branch_scale=None, scaled: str = "") -> dict:
    """ValueError unless an op's tensors can go to its kernels: floating tensors of a supported
    dtype, all on the first one's device, which the kernels can run on, of the shapes `shapes`
    (operand_shapes) names, with matmuls in a dtype the kernels compute right here (None: the
    first tensor's own). Returns the sizes the shapes bind. branch_scale: None, or one scale per sample of the tensor named
    `scaled` ([scaled.shape[0]])."""
    first, device = shapes[0][0], None
    for name, tensor in tensors.items():
        check_floating(name, tensor)
        if device is None:
            device = tensor.device
        elif tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but {first} is on {device}; all must be on one device")
    sizes = {}
    for name, leading, rank, named in shapes:
        shape = tensors[name].shape
        # At least `rank` dimensions, and no more without leading ones (slices: no Python calls).
        fits = shape[rank - 1:] != () and (leading or shape[rank:] == ())
        if fits and leading:
            if "..." in sizes:
                fits = sizes["..."] == shape[:-rank]
            else:
                sizes["..."] = shape[:-rank]
        for dim, index in named if fits else ():
            size = shape[index]
            if dim in sizes:
                fits = fits and sizes[dim] == size
            else:
                sizes[dim] = size
                fits = fits and (size > 0 or (name == first and index != -1))
        if not fits:
            raise ValueError(_shape_error(tensors, shapes, name))
    if branch_scale is not None:
        check_floating("branch_scale", branch_scale)
        target = tensors[scaled]
        if target.dim() < 2 or tuple(branch_scale.shape) != (target.shape[0],):
            samples = target.shape[0] if target.dim() else "?"
            raise ValueError(f"branch_scale must have shape [{scaled}.shape[0]] = [{samples}] (one scale per sample, "
                             f"{scaled} of shape [B, ..., C]), got {list(branch_scale.shape)}")
        if branch_scale.device != device:
            raise ValueError(f"branch_scale is on {branch_scale.device} but {scaled} is on {device}")
    check_device(first, tensors[first], interpreted, module)
    refuse_interpreted_bf16(f"{first} (its dtype, or autocast's)", interpreted, matmul_dtype or tensors[first].dtype)
    return sizes


def _shape_error(tensors: dict, shapes: tuple, failing: str) -> str:
    """check_operands' message for the tensor named `failing`: its shape as the tensors before
    it bind it, and where each bound size came from."""
    known, owners = {}, {}
    for name, leading, rank, indexed in shapes:
        named = tuple(dim for dim, _ in indexed)
        if name == failing:
            break
        shape = tensors[name].shape
        if leading:
            known["..."] = list(shape[:len(shape) - rank])
        for dim, index in indexed:
            known.setdefault(dim, shape[index])
            owners.setdefault(dim, name)
    dims = (("...",) if leading else ()) + named
    if all(dim in known for dim in dims):
        wanted = ", ".join(str(size) for dim in dims for size in (known[dim] if dim == "..." else (known[dim],)))
    else:
        wanted = ", ".join(f"{dim}={known[dim]}" if dim in known and dim != "..." else dim for dim in dims)
    origins = ", ".join(f"{dim}={known[dim]} from {owners[dim]}" for dim in named if dim in known)
    return (f"{failing} must have shape [{wanted}]" + (f" ({origins})" if origins else "")
            + f", got {list(tensors[failing].shape)}")


def register_operator(name: str, forward, forward_fake, backward, backward_fake, setup_context, backward_formula):
    """An op's two PyTorch operators, "vit_kernels::<name>" around `forward` and
    "vit_kernels::<name>_backward" around `backward` (type-annotated launchers), returned in
    that order.

    torch.compile (fullgraph) then traces through the op without a graph break: it sees two
    opaque calls whose fakes give the outputs' shapes, dtypes and contiguous strides, and the
    launch planning runs only when an operator really executes, never inside a trace.
    register_autograd pairs them: setup_context saves what the backward operator needs (inputs
    and outputs only; the outputs that exist for the backward's sake non-differentiable, their
    gradients not materialized, so no zeros are launched), and backward_formula calls it.
    """
    forward_op = torch.library.custom_op(f"vit_kernels::{name}", forward, mutates_args=())
    forward_op.register_fake(forward_fake)
    backward_op = torch.library.custom_op(f"vit_kernels::{name}_backward", backward, mutates_args=())
    backward_op.register_fake(backward_fake)
    forward_op.register_autograd(backward_formula, setup_context=setup_context)
    return forward_op, backward_op
