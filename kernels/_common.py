"""What every op module in kernels/ needs besides its kernels: output allocation (with the
NaN-poisoning switch the tests use), interpreter detection, input checks, the device
context a launch runs in, planned launches, and an op's forward and backward as PyTorch
operators (traced) or one autograd.Function (run plainly).
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


def new_outputs(device, *specs) -> list[torch.Tensor]:
    """A launcher's outputs and scratch buffers, one per (shape, dtype) of specs, in one call (a
    step's Python calls count, tests/test_host_cost.py): uninitialised, or NaN-filled when
    POISON_OUTPUTS is on (integer buffers are then filled with -1)."""
    if POISON_OUTPUTS:
        return [torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)
                for shape, dtype in specs]
    return [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in specs]


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
        # kernel[grid](...) without the lambda that kernel[grid] makes: two Python calls fewer.
        self.kernel.run(*args, grid=self.grid, warmup=False, **self.options)


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


# Operand signatures that passed check_operands, with the sizes they bind; emptied when full. A
# model calls each op with one or two signatures (training and evaluation batches), tests with
# a few hundred.
CHECKED_SIGNATURES = 1024
_checked_signatures: dict = {}


def check_operands(tensors: dict, shapes: tuple, matmul_dtype: torch.dtype | None, interpreted: bool, module: str,
                   branch_scale=None, scaled: str = "") -> dict:
    """ValueError unless an op's tensors can go to its kernels: floating tensors of a supported
    dtype, all on the first one's device, which the kernels can run on, of the shapes `shapes`
    (operand_shapes) names, with matmuls in a dtype the kernels compute right here (None: the
    first tensor's own). Returns the sizes the shapes bind. branch_scale: None, or one scale per
    sample of the tensor named `scaled` ([scaled.shape[0]]).

    Checked once per signature (each operand's type, shape, dtype and device): an eager step
    calls the ops 28 times with the same few, and every check's Python calls count
    (tests/test_host_cost.py). Only the interpreter's bf16 refusal is asked again each call:
    kernels.interpreter_bf16 may have been installed since."""
    try:
        signature = (shapes, matmul_dtype, interpreted, scaled,
                     *[(type(t), t.shape, t.dtype, t.device) for t in tensors.values()],
                     branch_scale if branch_scale is None else
                     (type(branch_scale), branch_scale.shape, branch_scale.dtype, branch_scale.device))
        sizes = _checked_signatures.get(signature)
    except (AttributeError, TypeError):  # not a tensor: the full check says what is wrong
        signature = sizes = None
    if sizes is None:
        sizes = _check_operands(tensors, shapes, interpreted, module, branch_scale, scaled)
        if signature is not None:
            if len(_checked_signatures) >= CHECKED_SIGNATURES:
                _checked_signatures.clear()
            _checked_signatures[signature] = sizes
    if interpreted:
        refuse_interpreted_bf16(f"{shapes[0][0]} (its dtype, or autocast's)", interpreted,
                                matmul_dtype or tensors[shapes[0][0]].dtype)
    return sizes


def _check_operands(tensors: dict, shapes: tuple, interpreted: bool, module: str, branch_scale, scaled: str) -> dict:
    """check_operands' full check, but for the bf16 refusal."""
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


def traced() -> bool:
    """Whether an op's call is being traced or intercepted rather than only run: torch.compile or
    torch.export (Dynamo, which reads this as True and never looks at the rest), a torch dispatch
    mode (fake tensors, functionalization, make_fx, bench.counts.DeviceWorkCounter), or a functorch
    transform. Those see an op as its PyTorch operators; a plain call runs its launchers."""
    return (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._are_functorch_transforms_active())


class Operator:
    """An op's forward and backward launchers as PyTorch runs them: two ways, one result.

    Traced (`traced()`): two PyTorch operators, "vit_kernels::<name>" around `forward` and
    "vit_kernels::<name>_backward" around `backward` (type-annotated launchers), `forward_op`
    and `backward_op`. torch.compile (fullgraph) traces through the op without a graph break:
    it sees two opaque calls whose fakes give the outputs' shapes, dtypes and contiguous strides,
    and the launch planning runs only when an operator really executes, never inside a trace.
    register_autograd pairs them: setup_context saves what the backward needs (inputs and
    outputs only; the outputs that exist for the backward's sake non-differentiable, their
    gradients not materialized, so no zeros are launched), and backward_formula calls
    ctx.launch_backward, here the backward operator.

    Run plainly: one torch.autograd.Function around the same forward launcher, setup_context and
    backward_formula, whose ctx.launch_backward is the backward launcher itself. The operators'
    dispatch and autograd cost about 31 Python calls per call, the Function's way 8 forward and
    3 backward: an eager step's host cost (kernels/README.md, "Host cost").
    """

    def __init__(self, name: str, forward, forward_fake, backward, backward_fake, setup_context, backward_formula):
        self.forward_op = torch.library.custom_op(f"vit_kernels::{name}", forward, mutates_args=())
        self.forward_op.register_fake(forward_fake)
        self.backward_op = torch.library.custom_op(f"vit_kernels::{name}_backward", backward, mutates_args=())
        self.backward_op.register_fake(backward_fake)

        def operator_setup_context(ctx, inputs, output):
            setup_context(ctx, inputs, output)
            ctx.launch_backward = self.backward_op

        self.forward_op.register_autograd(backward_formula, setup_context=operator_setup_context)

        def function_forward(ctx, *args):
            output = forward(*args)
            setup_context(ctx, args, output)
            ctx.launch_backward = backward
            return output

        self._function = type(name, (torch.autograd.Function,), {
            "forward": staticmethod(function_forward), "backward": staticmethod(backward_formula)})

    def __call__(self, *args):
        """The op's forward, differentiable: the forward operator when traced, else the autograd.Function."""
        return self.forward_op(*args) if traced() else self._function.apply(*args)
