"""What a piece of host code asks of the device: kernel launches, host syncs and host data.

At our step size (about 1 ms of GPU arithmetic for 128 images) the number of kernels a step
launches and the number of times the host waits for the device cost as much as the kernels
themselves. Both can be counted without a GPU, on the CPU, from the ops the code dispatches:

    with DeviceWorkCounter() as counter:
        train_step(images, labels)
    counter.counts.launches, counter.counts.syncs

- aten launches: every aten op that reaches the dispatcher (below autograd, so backward ops
  count too) except those that launch nothing on a GPU: views and other aliasing ops (their
  schema returns an alias of an input), uninitialized allocations (empty, empty_strided), and
  wrapping host data (lift_fresh). A `_foreach_*` or fused optimizer op counts once, though a
  GPU runs one multi-tensor kernel per chunk of tensors.
- Triton launches: calls of a @triton.jit kernel (`kernel[grid](...)`), compiled or through the
  interpreter; aten ops the interpreter itself runs to move data are not counted.
- custom operators (torch.library.custom_op, e.g. torch.ops.vit_kernels.*): not a launch
  themselves; their implementation runs under the counter, so the Triton kernels and aten ops
  inside are what counts. The counter is a dispatch mode: under it the kernels/ ops run as
  their custom operators (kernels/_common.py, traced()), with the same launches and allocations
  as the autograd.Function a plain call runs.
- syncs: ops after which the host holds a value computed on the device, so that on a GPU the
  host waits: `.item()`, `bool(tensor)`, `.tolist()` (each element), `nonzero` and friends
  whose output shape depends on the data, and copies from a device to the host.
- host tensors: tensors made from host data (`torch.tensor(...)`, `torch.as_tensor` of a list);
  on a GPU each is a host-to-device copy, and blocking unless pinned.
- device copies: copies between devices, by direction.
CPU timings are never performance figures; these counts are the same on every machine.

The host's own cost of a step is counted the same way, in Python calls (cProfile's count,
builtins included), with Triton's launches stubbed so that nothing executes:

    with StubbedTritonLaunches():
        calls = count_python_calls(lambda: train_step(images, labels))
    calls.total, calls.of("kernels/_common.py", "traced")

On a GPU an eager step's launches are queued faster than the device runs them only while the
host's calls cost less than the kernels: at about a microsecond a call, thousands of calls are
milliseconds. The count runs on the CPU: the planning, allocations and dispatches are those of
the GPU step (the same code, the same shapes), with the stub's one call per launch in place of
Triton's own launcher, and without the CUDA device guard each op enters.
"""
from __future__ import annotations

import cProfile
import pstats
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops that allocate or relabel memory without running a kernel.
_NO_KERNEL = {
    aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.new_empty.default,
    aten.new_empty_strided.default, aten._unsafe_view.default, aten._reshape_alias.default,
    aten.resize_.default, aten.set_.source_Storage_storage_offset, aten.lift_fresh.default,
    aten.detach.default, aten.alias.default, aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default,
    aten.sym_storage_offset.default, aten.is_same_size.default,
}
# Host data turned into a tensor: on a GPU, a host-to-device copy.
_HOST_TENSOR = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
# The host learns a value (or a shape) computed on the device.
_SYNC = {
    aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default, aten.nonzero.default,
    aten.masked_select.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.item.default,
}


_COMPOSITE = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


@dataclass
class Counts:
    aten_launches: int = 0
    triton_launches: int = 0
    syncs: int = 0
    host_tensors: int = 0
    host_to_device_copies: int = 0
    device_to_host_copies: int = 0
    by_op: Counter = field(default_factory=Counter)  # aten launches and syncs, by op name
    triton_by_kernel: Counter = field(default_factory=Counter)

    @property
    def launches(self) -> int:
        return self.aten_launches + self.triton_launches

    def as_dict(self) -> dict:
        return {"launches": self.launches, "aten_launches": self.aten_launches,
                "triton_launches": self.triton_launches, "syncs": self.syncs, "host_tensors": self.host_tensors,
                "host_to_device_copies": self.host_to_device_copies,
                "device_to_host_copies": self.device_to_host_copies}


def _is_alias(op) -> bool:
    """A view or other op whose result shares an input's memory (schema `Tensor(a)`, not `(a!)`)."""
    returns = op._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _copy_direction(op, args, kwargs, out) -> tuple[str, str] | None:
    """(source device type, target device type) of a copy between devices, else None."""
    if op is aten.copy_.default:
        target, source = args[0], args[1]
    elif op in (aten._to_copy.default, aten.to.dtype_layout, aten.to.device):
        source, target = args[0], out
    else:
        return None
    if not isinstance(source, torch.Tensor) or not isinstance(target, torch.Tensor):
        return None
    if source.device.type == target.device.type:
        return None
    return source.device.type, target.device.type


def _triton_function_classes() -> list:
    from triton.runtime.jit import JITFunction

    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:  # a Triton without the interpreter
        pass
    return classes


class DeviceWorkCounter(TorchDispatchMode):
    """Counts the device work of everything run inside `with DeviceWorkCounter() as c:`; see the
    module docstring. c.counts holds the totals; the counter may be entered again to add to them."""

    def __init__(self):
        super().__init__()
        self.counts = Counts()
        self._inside_triton = 0
        self._patched = []

    # -- Triton launches ---------------------------------------------------------------------
    def _patch_triton(self):
        counter = self
        for cls in _triton_function_classes():
            original = cls.__dict__["run"]

            def run(kernel, *args, grid, warmup, _original=original, **kwargs):
                if warmup:
                    return _original(kernel, *args, grid=grid, warmup=warmup, **kwargs)
                counter.counts.triton_launches += 1
                counter.counts.triton_by_kernel[getattr(kernel, "__name__", repr(kernel))] += 1
                counter.on_triton_launch(kernel, grid, args, kwargs)
                counter._inside_triton += 1  # the interpreter moves data with aten ops: not launches
                try:
                    return _original(kernel, *args, grid=grid, warmup=warmup, **kwargs)
                finally:
                    counter._inside_triton -= 1

            cls.run = run
            self._patched.append((cls, original))

    def on_triton_launch(self, kernel, grid, args, kwargs):
        """Called at each counted Triton launch; a subclass records more of it (tests/capture_check.py)."""

    def __enter__(self):
        self._patch_triton()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for cls, original in self._patched:
                cls.run = original
            self._patched.clear()

    # -- aten ops ----------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace not in ("aten", "prims") and torch._C._dispatch_has_kernel_for_dispatch_key(
                func.name(), "CompositeExplicitAutograd"):
            # A custom operator: run its implementation (where torch.library.custom_op registers
            # it, below this mode's dispatch key) with this mode on the stack again (the Triton
            # patch is already in place, hence not `with self`).
            TorchDispatchMode.__enter__(self)
            try:
                return func.redispatch(_COMPOSITE, *args, **kwargs)
            finally:
                TorchDispatchMode.__exit__(self, None, None, None)
        out = func(*args, **kwargs)
        if self._inside_triton:
            return out
        counts = self.counts
        name = str(func.overloadpacket.__name__)
        if func in _HOST_TENSOR:
            counts.host_tensors += 1
        if func in _SYNC:
            counts.syncs += 1
            counts.by_op[name] += 1
            return out
        direction = _copy_direction(func, args, kwargs, out)
        if direction is not None:
            source, target = direction
            if source == "cpu":
                counts.host_to_device_copies += 1
            elif target == "cpu":
                counts.device_to_host_copies += 1
                counts.syncs += 1  # the host reads what the device computed
        if func in _NO_KERNEL or _is_alias(func) or func.namespace != "aten":
            # An operator of another namespace without an implementation to run under the
            # counter: not a launch of its own.
            return out
        counts.aten_launches += 1
        counts.by_op[name] += 1
        return out


# ---------------------------------------------------------------------------------------------
# Python calls
# ---------------------------------------------------------------------------------------------

class StubbedTritonLaunches:
    """Inside `with StubbedTritonLaunches() as stub:`, a @triton.jit kernel's launch
    (`kernel[grid](...)`, or its `run`) returns at once: nothing compiles or executes, outputs
    keep what they were allocated with. stub.launches counts them, by kernel (the @triton.jit
    function; by_name() by its name): the stub's own Python calls are one per launch, where
    Triton's launcher runs on a GPU. on_launch(kernel, args, kwargs), when given, sees each launch."""

    def __init__(self, on_launch=None):
        self.launches = Counter()
        self.on_launch = on_launch
        self._patched = []

    def by_name(self) -> dict:
        return {getattr(kernel, "__name__", repr(kernel)): count for kernel, count in self.launches.items()}

    def __enter__(self):
        stub = self
        for cls in _triton_function_classes():
            original = cls.__dict__["run"]

            def run(kernel, *args, grid, warmup, _original=original, **kwargs):
                if warmup:
                    return _original(kernel, *args, grid=grid, warmup=warmup, **kwargs)
                stub.launches[kernel] += 1
                if stub.on_launch is not None:
                    stub.on_launch(kernel, args, kwargs)
                return None

            cls.run = run
            self._patched.append((cls, original))
        return self

    def __exit__(self, *exc):
        for cls, original in self._patched:
            cls.run = original
        self._patched.clear()


@dataclass
class PythonCalls:
    """Python function calls made by a piece of host code, builtins included (cProfile's count)."""
    total: int
    by_function: Counter  # (file name, line, function name) -> calls; builtins have file name "~"

    def of(self, file_suffix: str, function: str) -> int:
        """Calls of `function` defined in a file whose path ends with file_suffix ("~" for builtins,
        whose function reads e.g. "<built-in method torch.empty>")."""
        return sum(calls for (file, _, name), calls in self.by_function.items()
                   if file.endswith(file_suffix) and name == function)

    def as_dict(self) -> dict:
        return {"python_calls": self.total,
                # kernels/_common.py's Operator: each forward call of an op asks traced() which way
                # it goes; plainly, to the op's autograd.Function (whose backward torch's
                # BackwardCFunction.apply calls), else to the custom operators.
                "op_calls": self.of("kernels/_common.py", "traced"),
                "function_forwards": self.of("kernels/_common.py", "function_forward"),
                "function_backwards": self.of("torch/autograd/function.py", "apply"),
                "custom_op_dispatches": self.of("torch/_library/custom_ops.py", "__call__"),
                "torch_empty_calls": self.of("~", "<built-in method torch.empty>"),
                "grid_helper_calls": (self.of("triton/__init__.py", "cdiv")
                                      + self.of("triton/__init__.py", "next_power_of_2"))}


def count_python_calls(fn) -> PythonCalls:
    """The Python calls of one fn() (run it once before, so that one-off work such as imports,
    plans and optimizer state is not counted)."""
    profile = cProfile.Profile()
    profile.enable()
    try:
        fn()
    finally:
        profile.disable()
    stats = pstats.Stats(profile)
    return PythonCalls(total=stats.total_calls,
                       by_function=Counter({key: row[1] for key, row in stats.stats.items()}))
