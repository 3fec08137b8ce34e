"""bench.counts: kernel launches, Triton launches and host syncs counted from dispatched ops."""
import os

import pytest
import torch
import triton
import triton.language as tl

from bench.counts import DeviceWorkCounter

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _add_one_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + 1.0, mask=mask)


def test_views_and_allocations_launch_nothing():
    x = torch.randn(4, 6)
    with DeviceWorkCounter() as counter:
        y = x.view(6, 4).t().transpose(0, 1)[1:].unsqueeze(0).expand(2, -1, -1)
        torch.empty(10)
        x.detach()
    assert counter.counts.launches == 0, counter.counts.by_op
    assert y.shape == (2, 5, 4)


def test_each_compute_op_is_one_launch_and_backward_counts_too():
    w = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(2, 3)
    with DeviceWorkCounter() as counter:
        loss = (x @ w).relu().sum()  # mm, relu, sum
    assert counter.counts.aten_launches == 3, counter.counts.by_op
    with DeviceWorkCounter() as backward:
        loss.backward()
    assert backward.counts.aten_launches >= 3, backward.counts.by_op  # at least sum, relu and mm backward
    assert backward.counts.syncs == 0


def test_item_and_data_dependent_shapes_are_syncs():
    x = torch.randn(8)
    with DeviceWorkCounter() as counter:
        x.sum().item()
        (x > 0).nonzero()
        bool(x[0] > 0)
    assert counter.counts.syncs == 3, counter.counts.by_op


def test_tensors_from_host_data_are_counted():
    with DeviceWorkCounter() as counter:
        torch.tensor(5)
        torch.tensor([1.0, 2.0])
    assert counter.counts.host_tensors == 2


@pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(), reason="needs CUDA or TRITON_INTERPRET=1")
@(pytest.mark.interpreter if INTERPRETED else (lambda test: test))
def test_triton_launches_are_counted_once_each_and_their_data_movement_is_not():
    x = torch.zeros(100, device="cuda" if torch.cuda.is_available() else "cpu")
    with DeviceWorkCounter() as counter:
        _add_one_kernel[(2,)](x, x.numel(), BLOCK=64)
        _add_one_kernel[(2,)](x, x.numel(), BLOCK=64)
    assert counter.counts.triton_launches == 2
    assert counter.counts.triton_by_kernel["_add_one_kernel"] == 2
    assert counter.counts.aten_launches == 0, counter.counts.by_op
    assert torch.equal(x.cpu(), torch.full((100,), 2.0))


def test_counter_restores_triton_after_exit():
    from triton.runtime.jit import JITFunction
    before = JITFunction.__dict__["run"]
    with DeviceWorkCounter():
        pass
    assert JITFunction.__dict__["run"] is before
    with pytest.raises(RuntimeError), DeviceWorkCounter():
        raise RuntimeError("boom")
    assert JITFunction.__dict__["run"] is before
