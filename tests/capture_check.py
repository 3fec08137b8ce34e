"""Whether a piece of device code can be captured in a CUDA graph and replayed, checked on the CPU.

A CUDA graph records the kernels one call launches, with their arguments and memory addresses,
and replays exactly that. What the host does during the call runs once, at capture, and never
again. So a call is capture-safe when every call after the first (which may create state
lazily, as the graph's warm-up steps do) asks the device for the same work and nothing of the
host:

- no host sync: no `.item()`, `bool(tensor)`, `nonzero` or other data-dependent shape, no copy to
  the host, `.cpu()`, `.numpy()` or `.tolist()` (bench.counts.DeviceWorkCounter counts the
  dispatched ones; the ones that return a CPU tensor as it is are watched here);
- no tensor made from host data (`torch.tensor(...)`): a graph replays the value captured;
- the same ops in the same order with the same shapes, dtypes and host scalars (Python numbers
  passed to aten ops and Triton kernels) on every call after the first: a new allocation, a
  data-dependent shape or a host value that changes per call differs between two calls;
- random numbers only from the device's default generator (a graph advances its offset on each
  replay); an explicit generator argument or a draw of Python's or NumPy's global RNG would
  replay the captured draw.

    problems = capture_problems(lambda: trainer.train_step(images, labels))
    assert not problems, problems
"""
from __future__ import annotations

import random
import traceback
from pathlib import Path

import numpy as np
import torch

from bench.counts import DeviceWorkCounter

REPO = Path(__file__).resolve().parents[1]
CHECKER_FILES = {Path(__file__).resolve(), (REPO / "bench" / "counts.py").resolve()}
# The project's own code; anything else under the checkout (a .venv's packages) is not.
PROJECT_CODE = ("train.py", "vit", "kernels", "bench", "tests")
HOST_READS = ("cpu", "numpy", "tolist")  # Tensor methods that hand the host a device value


def _describe(value):
    """A comparable description of an op's argument or result: tensors by shape, dtype and device;
    host numbers, strings, dtypes and devices as they are."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype), value.device.type)
    if isinstance(value, (list, tuple)):
        return tuple(_describe(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _describe(v)) for k, v in value.items())
    if isinstance(value, float):
        return repr(value)  # NaN equals itself this way
    if isinstance(value, (int, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return value
    # Other host objects by their kind: a fresh lambda (a launch grid) per call is the same code.
    return getattr(value, "__qualname__", type(value).__name__)


def _where() -> str:
    """The innermost frame of the project's code outside this checker: where a problem starts."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path.is_relative_to(REPO) and path.relative_to(REPO).parts[0] in PROJECT_CODE and path not in CHECKER_FILES:
            return f"{path.relative_to(REPO)}:{frame.lineno}"
    return "outside the project"


class CaptureCheck(DeviceWorkCounter):
    """Runs calls under the device-work counter, recording each one's ops and what a graph cannot
    replay. Use capture_problems()."""

    def __init__(self):
        super().__init__()
        self.calls: list[list] = []  # per call: (what, arguments, results) of each op and Triton launch
        self.problems: list[str] = []
        self._saved_methods = {}

    def problem(self, what: str):
        self.problems.append(f"call {len(self.calls)}: {what} at {_where()}")

    # -- what the device is asked ----------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        syncs, host_tensors = self.counts.syncs, self.counts.host_tensors
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self._inside_triton or not self.calls or func.namespace == "profiler":  # profiler: host-side labels
            return out
        self.calls[-1].append((str(func), _describe(args), _describe(kwargs), _describe(out)))
        if self.counts.syncs > syncs:
            self.problem(f"host sync ({func})")
        if self.counts.host_tensors > host_tensors and len(self.calls) > 1:
            self.problem(f"tensor made from host data ({func})")
        if kwargs.get("generator") is not None:
            self.problem(f"random numbers from an explicit generator ({func}): a graph replays only the "
                         "default generator's draws correctly")
        return out

    def on_triton_launch(self, kernel, grid, args, kwargs):
        if self.calls:
            name = getattr(kernel, "__name__", repr(kernel))
            self.calls[-1].append((f"triton {name}", _describe(grid), _describe(args), _describe(kwargs)))

    # -- what the host reads ---------------------------------------------------------------------
    def _watch_host_reads(self):
        checker = self
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)
            self._saved_methods[name] = torch.Tensor.__dict__.get(name)  # None: inherited from TensorBase

            def watched(tensor, *args, _original=original, _name=name, **kwargs):
                if checker.calls and not checker._inside_triton:
                    checker.problem(f"host read (Tensor.{_name})")
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, watched)

    def __enter__(self):
        self._watch_host_reads()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, original in self._saved_methods.items():
                if original is None:
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, original)
            self._saved_methods.clear()

    # -- the calls -------------------------------------------------------------------------------
    def call(self, fn):
        python, numpy = random.getstate(), np.random.get_state()[1].copy()
        self.calls.append([])
        fn()
        if random.getstate() != python or not np.array_equal(np.random.get_state()[1], numpy):
            self.problem("a draw of Python's or NumPy's global random numbers: a graph replays the captured one")

    def compare_calls(self):
        """Every call after the first asks for the same work as the second."""
        reference = self.calls[1] if len(self.calls) > 1 else []
        for index, ops in enumerate(self.calls[2:], start=3):
            if ops == reference:
                continue
            at = next((k for k, (a, b) in enumerate(zip(reference, ops)) if a != b), min(len(reference), len(ops)))
            theirs = reference[at] if at < len(reference) else "nothing"
            ours = ops[at] if at < len(ops) else "nothing"
            self.problems.append(f"call {index} differs from call 2 at op {at + 1} of {len(ops)} "
                                 f"(an allocation, a shape or a host value that changes per call): {ours} where call 2 "
                                 f"had {theirs}")


def capture_problems(fn, calls: int = 3) -> list[str]:
    """What keeps fn (no arguments, called `calls` times, the first as a warm-up) from being
    captured in a CUDA graph and replayed; empty when nothing does."""
    if calls < 3:
        raise ValueError(f"comparing calls after the warm-up needs at least 3 calls, got {calls}")
    checker = CaptureCheck()
    with checker:
        for _ in range(calls):
            checker.call(fn)
    checker.compare_calls()
    return checker.problems
