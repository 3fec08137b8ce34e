"""pytest configuration for `pytest bench` (the kernel benchmarks; `pytest tests` never
collects this folder)."""
import os

import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run through the interpreter, which Triton picks when a
    # kernel is decorated: set before any test module imports kernels.*.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # One thread: with several, OpenMP's barriers stall for tens of ms whenever another
    # process holds a core, and CPU timings become noise.
    torch.set_num_threads(1)
