"""timm Vision Transformers on the fused kernels (vit/timm_fuse.py): the fused model keeps its
parameters and state dict, computes timm's logits and every gradient within the parity rule
(tests/parity.py) in fp32 and under fp16 autocast, draws DropPath's samples as timm does, and
refuses, with the reason, each block the kernels do not compute.

Interpreter cost bounds the shapes: the timm registry's models run one block (timm's depth=1)
on one image under fp16 only (the fp32 kernels interpret several times slower; at 197 tokens a
minute of CPU for the forward): vit_tiny_patch16_224 at its 197 tokens, deit_small_patch16_224
at 32 pixels (5 tokens of 384, 6 heads of 64). fp32 runs at the CIFAR-sized and tiny models."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import ParallelScalingBlock, ResPostBlock, VisionTransformer

from parity import DEVICE, KERNEL_TEST_MARKS, assert_parity
from vit import fuse, unfuse
from vit.timm_fuse import is_fused

pytestmark = pytest.mark.minutes(3)  # CPU minutes on 2 cores: timm models through the interpreter and train.py


def runs_kernels(test):
    for mark in KERNEL_TEST_MARKS:
        test = mark(test)
    return test


def tiny_vit(**options) -> VisionTransformer:
    """7 tokens (4 patches, the class token and 2 registers where asked) of 48 in 3 heads of 16."""
    torch.manual_seed(0)
    settings = dict(img_size=8, patch_size=4, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=10)
    return VisionTransformer(**{**settings, **options})


def fused_copy(model: nn.Module, backend: str = "triton") -> nn.Module:
    fused = copy.deepcopy(model)
    report = fuse(fused, strict=True, backend=backend)
    assert len(report.fused) == len(model.blocks)
    return fused


def logits_and_gradients(model, images, labels, autocast_dtype=None, seed=1):
    """A training-mode forward and backward; seed fixes DropPath's draws."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast(images.device.type, dtype=autocast_dtype or torch.float16, enabled=autocast_dtype is not None):
        logits = model(images)
    F.cross_entropy(logits.float(), labels).backward()
    return {"logits": logits.detach(), **{name: p.grad.clone() for name, p in model.named_parameters()}}


def dropped_samples(model, images, seed=1) -> int:
    """How many (sample, branch) pairs timm's DropPath drops in logits_and_gradients' forward."""
    dropped = []

    def count(module, inputs, output):
        dropped.append(int(((output == 0).flatten(1).all(1) & (inputs[0] != 0).flatten(1).any(1)).sum()))
    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, timm.layers.DropPath)]
    torch.manual_seed(seed)
    with torch.no_grad():
        model.train()(images)
    for hook in hooks:
        hook.remove()
    return sum(dropped)


def images_and_labels(batch, size):
    generator = torch.Generator().manual_seed(2)
    return (torch.randn(batch, 3, size, size, generator=generator).to(DEVICE),
            torch.randint(0, 10, (batch,), generator=generator).to(DEVICE))


def assert_same_as_timm_within_the_parity_rule(model, images, labels, dtype, case):
    """The fused model against timm's own: in fp32 close to it; under fp16 autocast at most 2x
    as far from a float64 timm model as timm's fp16 computation (tests/parity.py)."""
    model = model.to(DEVICE).train()
    fused = fused_copy(model)
    if dtype == torch.float32:
        expected = logits_and_gradients(model, images, labels)
        got = logits_and_gradients(fused, images, labels)
        assert set(got) == set(expected)
        for name, value in got.items():
            torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5, msg=f"{case}: {name}")
        return
    exact = logits_and_gradients(copy.deepcopy(model).double(), images.double(), labels)
    expected = logits_and_gradients(model, images, labels, autocast_dtype=dtype)
    got = logits_and_gradients(fused, images, labels, autocast_dtype=dtype)
    assert_parity(got, expected, exact, dtype, f"{case}, {dtype}")


# ---------------------------------------------------------------------------------------------
# Parameters, state dict, unfuse: no kernels run
# ---------------------------------------------------------------------------------------------

def test_fused_model_has_the_same_parameters_and_state_dict_and_unfuse_restores_timm():
    model = tiny_vit(init_values=1e-5, drop_path_rate=0.2)
    before = {name: p for name, p in model.named_parameters()}
    state = {key: value.clone() for key, value in model.state_dict().items()}
    report = fuse(model)
    assert report.fused == ["blocks.0", "blocks.1"] and not report.refused
    assert all(is_fused(block) for block in model.blocks)
    after = dict(model.named_parameters())
    assert list(after) == list(before) and all(after[name] is p for name, p in before.items())
    fused_state = model.state_dict()
    assert list(fused_state) == list(state)
    assert all(torch.equal(fused_state[key], value) for key, value in state.items())
    assert unfuse(model) == 2
    assert not any(is_fused(block) or "forward" in vars(block) for block in model.blocks)


def test_the_seams_compute_timms_block_with_layer_scale_drop_path_registers_and_no_qkv_bias():
    """Through the torch backend's seams (no kernels): the mapping itself, LayerScale folded
    and DropPath drawn as timm draws it, gives timm's numbers in training."""
    model = tiny_vit(init_values=1e-5, drop_path_rate=0.5, reg_tokens=2, qkv_bias=False, depth=3).train()
    fused = fused_copy(model, backend="torch")
    images, labels = images_and_labels(8, 8)
    expected = logits_and_gradients(model, images.cpu(), labels.cpu())
    got = logits_and_gradients(fused, images.cpu(), labels.cpu())
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert dropped_samples(model, images.cpu()) > 0  # DropPath was exercised


def test_eval_mode_ignores_drop_path():
    model = tiny_vit(drop_path_rate=0.9)
    fused = fused_copy(model, backend="torch").eval()
    images, _ = images_and_labels(4, 8)
    torch.testing.assert_close(fused(images.cpu()), model.eval()(images.cpu()))


# ---------------------------------------------------------------------------------------------
# What is refused, and why
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, reason", [
    (dict(qk_norm=True), "qk-norm"),
    (dict(mlp_layer=timm.layers.SwiGLU), "SwiGLU"),
    (dict(act_layer="gelu_tanh"), "exact (erf) GELU"),
    (dict(norm_layer=timm.layers.RmsNorm), "RmsNorm"),
    (dict(attn_drop_rate=0.1), "no dropout"),
    (dict(proj_drop_rate=0.1), "no dropout"),
    (dict(embed_dim=48, num_heads=6), "head dim 8"),
    (dict(embed_dim=768, num_heads=12), "width 768"),
    (dict(block_fn=ResPostBlock), "post-norm"),
    (dict(block_fn=ParallelScalingBlock), "parallel block"),
], ids=["qk_norm", "swiglu", "tanh_gelu", "rmsnorm", "attn_drop", "proj_drop", "head_dim_8", "width_768",
        "post_norm", "parallel"])
def test_blocks_the_kernels_do_not_compute_are_left_to_timm_with_the_reason(options, reason):
    model = tiny_vit(**options)
    report = fuse(model)
    assert not report.fused and list(report.refused) == ["blocks.0", "blocks.1"]
    assert all(reason in why for why in report.refused.values()), report.refused
    assert reason in str(report) and "2 blocks (blocks.0 .. blocks.1)" in str(report)
    assert not any(is_fused(block) for block in model.blocks)
    with pytest.raises(ValueError, match="cannot fuse every block") as raised:
        fuse(tiny_vit(**options), strict=True)
    assert reason in str(raised.value)


def test_strict_refuses_a_model_without_timm_blocks_and_fuses_nothing_when_one_block_fails():
    with pytest.raises(ValueError, match="Sequential has no timm transformer block"):
        fuse(nn.Sequential(nn.Linear(4, 4)), strict=True)
    model = tiny_vit()
    model.blocks[1].attn.attn_drop.p = 0.1
    with pytest.raises(ValueError, match="blocks.1: attention dropout 0.1"):
        fuse(model, strict=True)
    assert not any(is_fused(block) for block in model.blocks)
    assert fuse(model).fused == ["blocks.0"]


# ---------------------------------------------------------------------------------------------
# Parity of the kernels (interpreter without a GPU)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@runs_kernels
def test_cifar_sized_vit_same_logits_and_gradients_as_timm(dtype):
    """img 32, patch 4: 65 tokens of 64 in 4 heads of 16, one block, one image."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=4, mlp_ratio=2.0,
                              num_classes=10)
    images, labels = images_and_labels(1, 32)
    assert_same_as_timm_within_the_parity_rule(model, images, labels, dtype, "CIFAR-sized timm ViT")


@runs_kernels
def test_vit_tiny_patch16_224_at_197_tokens_under_fp16_is_as_accurate_as_timm():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    images, labels = images_and_labels(1, 224)
    assert_same_as_timm_within_the_parity_rule(model, images, labels, torch.float16, "vit_tiny_patch16_224, depth 1")


@runs_kernels
def test_deit_small_under_fp16_is_as_accurate_as_timm():
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False, depth=1, img_size=32)
    images, labels = images_and_labels(1, 32)
    assert_same_as_timm_within_the_parity_rule(model, images, labels, torch.float16,
                                               "deit_small_patch16_224, depth 1, 32 px")


# LayerScale's initial value per dtype. In fp16 a branch gradient scaled by 1e-5 underflows
# inside the fused backward's fp16 matmuls (timm's own fp16 path underflows it too, for the
# linear's weights, but takes gamma's gradient from an fp32 product), and gamma's gradient breaks
# the parity rule by 5-15x; bf16, the GPU's half precision, has fp32's exponent range.
LAYER_SCALE_INIT = {torch.float32: 1e-5, torch.float16: 0.1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@runs_kernels
def test_layer_scale_drop_path_and_registers_same_as_timm_in_training(dtype):
    """LayerScale (LAYER_SCALE_INIT), DropPath at 0.5 with the same per-sample draws, 2 register
    tokens, no qkv bias."""
    model = tiny_vit(init_values=LAYER_SCALE_INIT[dtype], drop_path_rate=0.5, reg_tokens=2, qkv_bias=False)
    images, labels = images_and_labels(4, 8)
    assert dropped_samples(model.to(DEVICE), images) > 0  # DropPath is exercised
    assert_same_as_timm_within_the_parity_rule(model, images, labels, dtype, "LayerScale, DropPath, registers")


# ---------------------------------------------------------------------------------------------
# train.py --model timm:NAME, and evaluate loading the run
# ---------------------------------------------------------------------------------------------

@runs_kernels
def test_train_py_trains_a_timm_model_with_both_backends_to_the_same_losses(tmp_path):
    """One step of 2 images (one 32-pixel patch and the class token, 192 wide), one block, each
    backend; the fused run's losses are the unfused run's (fp32), and vit.evaluate rebuilds the
    run's model, fused. The test set is one image of each class (the run's report has every
    class's accuracy)."""
    import csv
    import pickle

    import train
    from conftest import write_cifar_folder
    from vit.evaluate import load_trained_model

    data = write_cifar_folder(tmp_path / "data", per_batch=2, num_test=10)
    with open(data / "test_batch", "rb") as f:
        test_batch = pickle.load(f)
    test_batch[b"labels"] = list(range(10))
    with open(data / "test_batch", "wb") as f:
        pickle.dump(test_batch, f)
    data = data.parent
    losses = {}
    for backend in ("torch", "triton"):
        run = tmp_path / backend
        assert train.main(["--model", "timm:vit_tiny_patch16_224", "--depth", "1", "--patch-size", "32",
                           "--backend", backend, "--device", "cpu", "--epochs", "1", "--train-subset", "2",
                           "--batch-size", "2", "--data-dir", str(data), "--out-dir", str(run), "--no-progress"]) == 0
        with open(run / "metrics.csv") as f:
            row = next(csv.DictReader(f))
        losses[backend] = torch.tensor([float(row["train_loss"]), float(row["test_loss"])])
        trained = load_trained_model(run, torch.device("cpu"))
        assert trained.model.cfg.timm_model == "vit_tiny_patch16_224" and trained.model.cfg.dim == 192
        assert is_fused(trained.model.blocks[0]) == (backend == "triton")
    torch.testing.assert_close(losses["triton"], losses["torch"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flags, message", [
    (["--model", "timm:vit_tiny_patch16_224", "--dim", "64"], "--dim describe this project's ViT"),
    (["--model", "timm:no_such_model"], "Unknown model"),
    (["--model", "timm:vit_base_patch16_224", "--depth", "1", "--backend", "triton"], "width 768"),
    (["--model", "timm"], "expected vit or timm:NAME"),
])
def test_train_py_refuses_what_a_timm_model_cannot_run_with_a_usage_error(flags, message, capsys, monkeypatch):
    import train
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # --backend triton may run on the CPU: the model is what fails
    with pytest.raises(SystemExit) as exited:
        train.main(flags + ["--device", "cpu", "--print-config"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_train_py_print_config_records_the_timm_architecture(capsys):
    import json

    import train
    assert train.main(["--model", "timm:deit_small_patch16_224", "--patch-size", "8", "--depth", "2", "--device",
                       "cpu", "--print-config"]) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert model["timm_model"] == "deit_small_patch16_224"
    assert (model["dim"], model["heads"], model["depth"], model["patch_size"], model["layer_norm_eps"]) == (
        384, 6, 2, 8, 1e-6)


def test_cost_report_at_a_timm_models_shape(capsys):
    from kernels.report import main
    assert main(["--only", "cost", "--model", "vit_small_patch16_224", "--batch", "64"]) == 0
    assert "B=64 N=197 C=384 heads=6x64 MLP=1536 depth=12" in capsys.readouterr().out


@runs_kernels
def test_bench_times_a_step_of_timm_vit_s_fused_and_timms_own():
    """The CPU smoke of the bench's ViT-S/16 row: the fused and timm's steps run, the compiled
    one is skipped as the policy says."""
    from bench.compiling import CompilePolicy
    from bench.training import timm_step_rows

    policy = CompilePolicy("auto", "cpu", skip_reason="skipped in a CPU smoke")
    rows = timm_step_rows(torch.device("cpu"), True, policy, lambda line: None)
    assert [(row["way"], row["status"]) for row in rows] == [
        ("fused", "ok"), ("timm", "ok"), ("timm + compile", "skipped")]
    assert all(row["ms_per_step"] > 0 for row in rows[:2]) and rows[2]["error"] == "skipped in a CPU smoke"
