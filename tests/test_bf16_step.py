"""The whole training step in bf16 autocast on the CPU, the triton backend's kernels through Triton's
interpreter (with kernels.interpreter_bf16, the `bf16_interpreter` fixture): the logits, the loss,
every gradient and the updated weights of one Trainer.train_step under tests/parity.py's rule
(at most twice the torch backend's bf16 error against a float64 step on the same weights and
batch), and a short bf16 training run whose loss falls."""
import dataclasses

import pytest
import torch

from parity import INTERPRETED, KERNEL_TEST_MARKS, assert_parity
from vit.model import ViT, ViTConfig
from vit.optimizer import make_optimizer
from vit.trainer import EvalSet, TrainConfig, Trainer, criterion

pytestmark = KERNEL_TEST_MARKS + [
    pytest.mark.skipif(not INTERPRETED, reason="the bf16 step on the CPU, through Triton's interpreter"),
    pytest.mark.usefixtures("bf16_interpreter")]

# Every op of the block with its options: N = 17 tokens (16 patches and the class token), head
# dim 16, the second GELU, stochastic depth (the second block's branches scaled per sample).
MODEL = ViTConfig(image_size=16, patch_size=4, dim=48, depth=2, heads=3, mlp_dim=80, mlp_second_gelu=True,
                  drop_path=0.3)
BATCH = 3  # odd: the kernels' row tiles end part full
# Adam's epsilon, far above the gradients: the first update is then close to -lr * gradient. With
# the default (1e-8) it is -lr * sign(gradient), which one bf16 rounding flips for a gradient near
# zero in either backend, and the update's largest error would compare sign flips, not arithmetic.
ADAM_EPS = 1.0
STEP_CONFIG = TrainConfig(epochs=1, batch_size=BATCH, warmup_epochs=0, lr=1e-2, weight_decay=0.05, optimizer="adam",
                          device="cpu", precision="bf16", progress=False)
CLASSES = [str(i) for i in range(10)]


def trainer_for(model: ViT, images, labels, cfg: TrainConfig, run_dir, steps_per_epoch: int,
                adam_eps: float | None = None) -> Trainer:
    """A Trainer over one fixed batch, steps_per_epoch times an epoch; Adam's epsilon replaced
    when adam_eps is given."""
    optimizer = make_optimizer(model, cfg, cfg.device)
    for group in optimizer.param_groups:
        group["eps"] = adam_eps or group["eps"]
    test_set = EvalSet(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64), CLASSES)
    return Trainer(model, FixedBatch(images, labels, steps_per_epoch), test_set, optimizer, cfg, run_dir,
                   log=lambda line: None)


class FixedBatch:
    """The same (images, labels) every step of every epoch."""

    def __init__(self, images, labels, steps: int):
        self.batch, self.steps = (images, labels), steps

    def set_epoch(self, epoch: int):
        pass

    def __len__(self):
        return self.steps

    def __iter__(self):
        return iter([self.batch] * self.steps)


def step_results(backend: str, state: dict, scales, images, labels, run_dir) -> tuple[dict, float]:
    """One Trainer.train_step of a copy of the model under backend: {logits, loss, every
    parameter's gradient and update}, and the learning rate the step used."""
    model = ViT(dataclasses.replace(MODEL, backend=backend))
    model.load_state_dict(state)
    model.branch_scales = lambda batch: scales  # the same stochastic-depth draw in every run
    captured = {}
    model.register_forward_hook(lambda module, inputs, output: captured.update(logits=output.detach()))
    trainer = trainer_for(model, images, labels, STEP_CONFIG, run_dir / backend, steps_per_epoch=1,
                          adam_eps=ADAM_EPS)
    trainer.train_step(images, labels)
    results = {"logits": captured["logits"], "loss": trainer.meters.loss_sum.clone()}
    for name, parameter in model.named_parameters():
        results["d" + name] = parameter.grad
        results["update " + name] = parameter.detach().double() - state[name].double()
    return results, trainer.lr_tensors[0].item()


def float64_step(state: dict, scales, images, labels, lr: float) -> dict:
    """The same step in float64 with the torch backend and no autocast."""
    model = ViT(MODEL).double()
    model.load_state_dict(state)
    model.branch_scales = lambda batch: scales.double()
    logits = model(images.double())
    loss = criterion(logits.double(), labels, STEP_CONFIG)
    loss.backward()
    results = {"logits": logits.detach(), "loss": loss.detach().double()}
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=ADAM_EPS,
                                 weight_decay=STEP_CONFIG.weight_decay, foreach=False)
    optimizer.step()
    for name, parameter in model.named_parameters():
        results["d" + name] = parameter.grad
        results["update " + name] = parameter.detach() - state[name].double()
    return results


def test_bf16_training_step_matches_the_torch_backend(generator, tmp_path):
    seed = generator.initial_seed()
    torch.manual_seed(seed)
    model = ViT(MODEL)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    # A stochastic-depth draw that keeps every branch of the first block (its rate is 0) and, in the
    # second, drops the middle sample's and scales the others' by 1 / keep.
    keep = 1 - MODEL.drop_path
    scales = torch.ones(MODEL.depth, 2, BATCH)
    scales[1] = torch.tensor([1 / keep, 0.0, 1 / keep])
    images = torch.randn(BATCH, 3, MODEL.image_size, MODEL.image_size, generator=generator)
    labels = torch.randint(0, MODEL.num_classes, (BATCH,), generator=generator)

    triton_results, lr = step_results("triton", state, scales, images, labels, tmp_path)
    torch_results, torch_lr = step_results("torch", state, scales, images, labels, tmp_path)
    exact = float64_step(state, scales, images, labels, lr)
    assert lr == torch_lr == pytest.approx(STEP_CONFIG.lr)
    assert triton_results["logits"].dtype == torch_results["logits"].dtype == torch.bfloat16
    assert set(triton_results) == set(exact) and len(exact) == 2 + 2 * len(list(model.parameters()))
    assert_parity(triton_results, torch_results, exact, torch.bfloat16, f"bf16 train_step seed={seed}")


def test_a_short_bf16_training_run_learns(generator, tmp_path):
    """Three epochs of one step on one batch of 4 images (N = 17, head dim 16), Adam as the
    recipe has it: the loss falls."""
    seed = generator.initial_seed()
    torch.manual_seed(seed)
    cfg = dataclasses.replace(STEP_CONFIG, epochs=3, batch_size=4, warmup_epochs=1, lr=3e-3)
    model = ViT(dataclasses.replace(MODEL, image_size=32, patch_size=8, depth=1, backend="triton"))
    images = torch.randn(4, 3, 32, 32, generator=generator)
    labels = torch.randint(0, MODEL.num_classes, (4,), generator=generator)
    trainer = trainer_for(model, images, labels, cfg, tmp_path, steps_per_epoch=1)
    losses = [trainer.train_epoch(epoch)["train_loss"] for epoch in range(cfg.epochs)]
    assert losses[2] < losses[1] < losses[0], f"losses {losses} seed={seed}"


def test_without_the_shim_the_bf16_step_refuses(tmp_path):
    """Removing kernels.interpreter_bf16 makes the bf16 step fail with the ops' ValueError, not pass."""
    from kernels import interpreter_bf16
    interpreter_bf16.uninstall()
    model = ViT(MODEL)
    state = model.state_dict()
    images, labels = torch.randn(BATCH, 3, MODEL.image_size, MODEL.image_size), torch.zeros(BATCH, dtype=torch.int64)
    with pytest.raises(ValueError, match="bfloat16 matmuls, which the Triton interpreter computes wrongly"):
        step_results("triton", state, torch.ones(MODEL.depth, 2, BATCH), images, labels, tmp_path)
