"""How time is measured, the machine's own peaks, and what the run ran on.

Timing
- CUDA: triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]). It runs fn once and a
  few times more to estimate its cost, warms up, then times each call between CUDA
  events with the L2 cache flushed before every call, so a kernel never reads data a
  previous call left in cache. Launch overhead is included when the GPU has to wait
  for the host (an eager chain of small kernels), which is what a user would see.
  A call that needs untimed preparation (the backward alone needs a fresh forward each
  time) goes through _time_cuda_with_setup, do_bench's loop with a setup step before
  the L2 flush and the start event: only fn's kernels fall between the events.
- CPU: a perf_counter() loop around each call after a warm-up call; every call is
  synchronous there.
Both give the median and the 20th and 80th percentiles of per-call time, in ms.

Peaks (measured in the same run, so the "fraction of the floor" is against this very
machine, not a datasheet):
- matmul peak: a large square matmul in the benchmark dtype, 2*n^3 FLOPs per call;
- copy bandwidth: a large tensor copy, which reads and writes every byte: 2*size bytes.
"""
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from vit.environment import device_name

REPO = Path(__file__).resolve().parents[1]
QUANTILES = (0.5, 0.2, 0.8)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    calls: int | None  # timed calls behind the quantiles; do_bench does not report its count (None)


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default, torch.quantile's)."""
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _timing(times_ms: list[float]) -> Timing:
    times_ms = sorted(times_ms)
    return Timing(statistics.median(times_ms), _quantile(times_ms, 0.2), _quantile(times_ms, 0.8), len(times_ms))


def time_cpu(fn: Callable, setup: Callable[[], Any] | None = None, warmup_calls: int = 1, min_calls: int = 3,
             max_calls: int = 50, min_seconds: float = 0.2) -> Timing:
    """fn() per call, or fn(setup()) with setup outside the timed region."""
    def one_call() -> float:
        state = setup() if setup else None
        t0 = time.perf_counter()
        fn(state) if setup else fn()
        return (time.perf_counter() - t0) * 1e3

    for _ in range(warmup_calls):
        one_call()
    times = []
    started = time.perf_counter()
    while len(times) < min_calls or (len(times) < max_calls and time.perf_counter() - started < min_seconds):
        times.append(one_call())
    return _timing(times)


def time_cuda(fn: Callable, setup: Callable[[], Any] | None = None, warmup_ms: int = 25, rep_ms: int = 100) -> Timing:
    if setup is None:
        from triton.testing import do_bench

        median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
        return Timing(median, p20, p80, None)
    return _time_cuda_with_setup(fn, setup, warmup_ms, rep_ms)


def _time_cuda_with_setup(fn, setup, warmup_ms: int, rep_ms: int) -> Timing:
    """do_bench's procedure for fn(setup()), with setup() enqueued before the L2 flush and
    the start event: the events bracket fn's kernels alone."""
    from triton import runtime

    driver = runtime.driver.active
    cache = driver.get_empty_cache_for_benchmark()

    def timed_calls(count: int) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
        for start, end in zip(starts, ends):
            state = setup()
            driver.clear_cache(cache)
            start.record()
            fn(state)
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in zip(starts, ends)]

    fn(setup())
    torch.cuda.synchronize()
    estimate_ms = max(1e-3, statistics.mean(timed_calls(5)))
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn(setup())
    times = timed_calls(max(1, int(rep_ms / estimate_ms)))
    return _timing(times)


def time_fn(fn: Callable, device: torch.device, quick: bool = False, setup: Callable[[], Any] | None = None) -> Timing:
    """Per-call time of fn() (or fn(setup()), setup untimed) on this device."""
    if device.type == "cuda":
        return time_cuda(fn, setup, warmup_ms=10 if quick else 25, rep_ms=40 if quick else 100)
    # Interpreted Triton calls take ~0.1 s each on a CPU: a smoke run (--quick) affords one after the
    # warm-up (its figures are never performance figures), a full CPU run a few.
    return time_cpu(fn, setup, min_calls=1 if quick else 3, max_calls=10 if quick else 50,
                    min_seconds=0.05 if quick else 0.2)


def describe_error(error: BaseException, limit: int = 400) -> str:
    """One line for a report: the type and the first line of the message (compiler errors
    run to pages)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:limit]


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------- peaks

def measure_peaks(device: torch.device, dtype: torch.dtype, quick: bool) -> dict:
    """Best-case matmul FLOP/s and copy bytes/s of this device, measured now."""
    if device.type == "cuda":
        n, copy_mib = (4096, 256) if quick else (8192, 1024)
    else:
        n, copy_mib = (256, 16) if quick else (1024, 256)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    matmul = time_fn(lambda: torch.mm(a, b), device, quick)
    matmul_flops = 2 * n ** 3  # n*n outputs, each a length-n dot product: n multiplies + n adds
    del a, b

    source = torch.empty(copy_mib * 2 ** 20, device=device, dtype=torch.uint8)
    target = torch.empty_like(source)
    copy = time_fn(lambda: target.copy_(source), device, quick)
    copy_bytes = 2 * source.numel()  # every byte is read once and written once
    del source, target
    return {
        "matmul_tflops": matmul_flops / (matmul.median_ms * 1e-3) / 1e12,
        "matmul_shape": [n, n, n],
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "matmul_median_ms": matmul.median_ms,
        "copy_gbps": copy_bytes / (copy.median_ms * 1e-3) / 1e9,
        "copy_bytes_moved": copy_bytes,
        "copy_median_ms": copy.median_ms,
    }


# ------------------------------------------------------------------------------- environment

def device_properties(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    p = torch.cuda.get_device_properties(device)
    return {"compute_capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2 ** 30, 1)}


def device_slug(device: torch.device) -> str:
    """A folder-friendly device name: nvidia-h100-80gb-hbm3, cpu."""
    if device.type != "cuda":
        return "cpu"
    name = device_name(device).lower()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def git_commit() -> dict:
    """The checked-out commit and whether the tree differs from it (then the numbers are not
    exactly that commit's: results name it "<sha>-dirty")."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)

    try:
        sha = git("rev-parse", "--short=12", "HEAD")
        status = git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError) as error:
        return {"commit": "unknown", "dirty": None, "error": str(error)}
    if sha.returncode != 0:
        return {"commit": "unknown", "dirty": None, "error": sha.stderr.strip()}
    # Earlier benchmark outputs inside the tree do not change what is measured.
    changed = [line[3:] for line in status.stdout.splitlines() if not line[3:].startswith("bench/results")]
    return {"commit": sha.stdout.strip(), "dirty": bool(changed), "changed_files": changed}


def command_line() -> list[str]:
    return [sys.executable, "-m", "bench", *sys.argv[1:]]
