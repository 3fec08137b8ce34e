"""The host's cost of an eager step at the model's shape, in Python calls (bench/counts.py):
Triton's launches stubbed, so that the planning, allocations and operator dispatches of the
GPU step are counted on the CPU, at the real shapes, without executing a kernel."""
import pytest
import torch

from bench.counts import StubbedTritonLaunches, count_python_calls
from bench.host_work import _parts
from vit.model import ViTConfig
from vit.trainer import TrainConfig, Trainer, autocast_dtype

MODEL = ViTConfig(backend="triton")  # the model's defaults: 7 blocks of 12 heads at dim 384, N = 65
BATCH = 128
# Op calls per block: layernorm_linear, attention, linear_residual and layernorm_mlp, each
# through its torch.autograd.Function (kernels/_common.py's Operator: no custom-op dispatch
# outside a trace), whose backward the training step runs once too.
OPS_PER_BLOCK = 4
PRECISIONS = ["fp32", "bf16", "fp16"]  # bf16: the GPU's step; fp16 adds the gradient scaler
# Kernel launches per block: one per op forward, two per fused linear's backward, and
# attention's backward: one in half precision (the whole-sequence plan), two at fp32 (streaming at N = 65).
FORWARD_LAUNCHES_PER_BLOCK = 4
LAUNCHES_PER_BLOCK = {"fp32": FORWARD_LAUNCHES_PER_BLOCK + 8, "bf16": FORWARD_LAUNCHES_PER_BLOCK + 7,
                      "fp16": FORWARD_LAUNCHES_PER_BLOCK + 7}
# Python calls per eager step, at most 3,000; measured 2,890 at fp32 and 2,895 at bf16 (kernels/README.md,
# "Host cost", breaks them down). fp16 adds torch's GradScaler, which walks the parameters in
# Python to unscale and check the gradients: measured 3,186, with 3% room for another torch's internals.
STEP_BUDGET = {"fp32": 3_000, "bf16": 3_000, "fp16": 3_275}
EVALUATION_BUDGET = {"fp32": 1_650, "bf16": 1_685, "fp16": 1_655}  # measured 1,599, 1,633 and 1,605, +3%


def _trainer(precision: str, run_dir) -> tuple[Trainer, torch.Tensor, torch.Tensor]:
    cfg = TrainConfig(epochs=1, batch_size=BATCH, warmup_epochs=0, device="cpu", precision=precision,
                      progress=False, seed=0)
    model, loader, test_set, optimizer = _parts(MODEL, cfg, 4 * BATCH, num_test=BATCH)
    images, labels = next(iter(loader))
    return Trainer(model, loader, test_set, optimizer, cfg, run_dir, log=lambda line: None), images, labels


def _describe(calls) -> str:
    top = ", ".join(f"{name} {count}" for (_, _, name), count in calls.by_function.most_common(12))
    return f"{calls.as_dict()}; most called: {top}"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_an_eager_training_step_plans_nothing_and_stays_within_its_python_calls(precision, tmp_path, bf16_interpreter):
    trainer, images, labels = _trainer(precision, tmp_path)
    with StubbedTritonLaunches() as stub:
        for _ in range(2):  # Adam's state and every launch plan are made here
            trainer.train_step(images, labels)
        stub.launches.clear()
        calls = count_python_calls(lambda: trainer.train_step(images, labels))
    figures = calls.as_dict()
    print(f"{precision} training step: {_describe(calls)}")
    assert figures["op_calls"] == figures["function_forwards"] == OPS_PER_BLOCK * MODEL.depth, figures
    assert figures["function_backwards"] == OPS_PER_BLOCK * MODEL.depth, figures
    assert figures["custom_op_dispatches"] == 0, figures
    assert sum(stub.launches.values()) == LAUNCHES_PER_BLOCK[precision] * MODEL.depth, stub.by_name()
    assert figures["grid_helper_calls"] == 0, _describe(calls)  # grids come from the plans, made once
    assert calls.total <= STEP_BUDGET[precision], _describe(calls)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_an_evaluation_forward_plans_nothing_and_stays_within_its_python_calls(precision, tmp_path, bf16_interpreter):
    trainer, images, _ = _trainer(precision, tmp_path)
    model = trainer.model.eval()

    dtype = autocast_dtype(trainer.cfg)

    def forward():  # as vit.trainer.evaluate runs each batch
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            model(images)

    with StubbedTritonLaunches() as stub:
        forward()
        stub.launches.clear()
        calls = count_python_calls(forward)
    figures = calls.as_dict()
    print(f"{precision} evaluation forward: {_describe(calls)}")
    assert figures["op_calls"] == figures["function_forwards"] == OPS_PER_BLOCK * MODEL.depth, figures
    assert figures["function_backwards"] == figures["custom_op_dispatches"] == 0, figures
    assert sum(stub.launches.values()) == FORWARD_LAUNCHES_PER_BLOCK * MODEL.depth, stub.by_name()
    assert figures["grid_helper_calls"] == 0, _describe(calls)
    assert calls.total <= EVALUATION_BUDGET[precision], _describe(calls)
