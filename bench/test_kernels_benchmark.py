"""pytest-benchmark entry points for the kernels: every op, provider and mode.

    pytest bench --benchmark-json=bench.json               # save a run
    pytest bench --benchmark-compare                       # compare with the last saved run
    pytest bench -k "attention and triton" --benchmark-columns=median,iqr,ops

`pytest tests` (the project's test command) never collects this file: it lives under
bench/. On a GPU the shapes are the model's (B=128, N=65, C=384, 12 heads of 32, MLP 384,
bf16). Each round synchronizes inside the timed function and starts from a synchronized
device (pedantic mode with a setup), so a round measures the kernels, not their launches.
pytest-benchmark's timings include the launch and synchronization latency and use no L2
flush: `python -m bench` (triton.testing.do_bench) is the reference for absolute numbers;
this file is for comparing runs over time.

Without a GPU the same tests run at tiny sizes in fp32 with Triton's interpreter: they
show the entry points work, not performance. torch.compile providers are skipped there
(minutes of compile for microseconds of work).
"""
import functools

import pytest
import torch

from bench import kernels as kb
from bench.measure import describe_error

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32  # the Triton interpreter's bf16 matmuls are wrong
SHAPE = kb.MODEL_SHAPE if CUDA else kb.QUICK_SHAPE
COMPILE_MODE = "max-autotune" if CUDA else "default"
COMPILE_SKIP = None if CUDA else "skipped without a GPU: torch.compile takes minutes for microseconds of work"


def _providers(op):
    return {p.name: p for p in kb.providers(op, DEVICE) + [kb.compile_provider(op, DEVICE, COMPILE_MODE)]}


CASES = [(op, name) for op in kb.OPS for name in _providers(op)]


@functools.cache
def _eager_errors(op: str) -> tuple[float, float]:
    return kb.max_errors(kb.reference(op, SHAPE), op, SHAPE, DTYPE, DEVICE, seed=1000)


@pytest.mark.parametrize("mode", kb.MODES)
@pytest.mark.parametrize("op,provider_name", CASES, ids=[f"{op}-{name}" for op, name in CASES])
def test_kernel(benchmark, op, provider_name, mode):
    provider = _providers(op)[provider_name]
    if provider.is_compile and COMPILE_SKIP:
        pytest.skip(COMPILE_SKIP)
    inputs = kb.make_inputs(op, SHAPE, DTYPE, DEVICE, seed=0)
    try:
        fn = provider.build(SHAPE)
        with provider.context():
            out = fn(*inputs)  # compiles; fails here when the provider has no kernel for this case
            torch.autograd.grad(out, inputs, torch.ones_like(out))
    except Exception as error:
        pytest.skip(f"{provider_name} cannot run here: {describe_error(error)}")

    grad_out = torch.randn_like(out)
    with provider.context():
        call, prepare = kb.mode_callable(fn, inputs, mode, grad_out)

        def setup():
            # Untimed: the fresh forward the backward alone needs, then an idle device.
            args = (prepare(),) if prepare else ()
            if CUDA:
                torch.cuda.synchronize()
            return args, {}

        def timed(*args):
            call(*args)
            if CUDA:
                torch.cuda.synchronize()  # the kernels' time, not their launches'

        benchmark.pedantic(timed, setup=setup, rounds=200 if CUDA else 3, warmup_rounds=20 if CUDA else 1)
        forward_error, grad_error = kb.max_errors(fn, op, SHAPE, DTYPE, DEVICE, seed=1000)

    benchmark.extra_info.update(
        shape=SHAPE.label(), dtype=str(DTYPE), device=str(DEVICE), mode=mode,
        flops=kb.flops(op, mode, SHAPE), bytes=kb.bytes_moved(op, mode, SHAPE, DTYPE.itemsize),
        max_error_forward=forward_error, max_error_grad=grad_error)
    eager_forward, eager_grad = _eager_errors(op)
    assert forward_error <= kb.ERROR_FACTOR_ALLOWED * eager_forward + kb.ERROR_FLOOR, (forward_error, eager_forward)
    assert grad_error <= kb.ERROR_FACTOR_ALLOWED * eager_grad + kb.ERROR_FLOOR, (grad_error, eager_grad)
