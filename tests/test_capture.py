"""The CUDA-graph step's parts are capture-safe, checked on the CPU (tests/capture_check.py): the
training step with either backend (our kernels through the interpreter), the average of the
weights, the static-buffer copy and replay of GraphedStep, the CutMix/MixUp draw; and the check
itself catches what a graph cannot replay, planted into the step."""
import random

import pytest
import torch

from capture_check import capture_problems
from vit import trainer as trainer_module
from vit.data import TrainLoader
from vit.mixing import MixConfig, mix_batch
from vit.model import ViT, ViTConfig
from vit.optimizer import make_optimizer
from vit.trainer import EvalSet, GraphedStep, TrainConfig, Trainer, seed_everything

BATCH = 4
CALLS = 3  # a warm-up call, then two to compare (the schedule covers CALLS epochs of 2 steps)


def make_trainer(run_dir, backend="torch", mixing=False, depth=2, batch_size=BATCH, **cfg_fields) -> Trainer:
    """A small model over generated images; dropout and drop-path on, so the step draws random
    numbers."""
    cfg = TrainConfig(epochs=CALLS, batch_size=batch_size, device="cpu", precision="fp32", progress=False,
                      seed=0, **cfg_fields)
    seed_everything(0)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2 * batch_size, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (2 * batch_size,), generator=generator)
    mix = MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0) if mixing else None
    loader = TrainLoader(images, labels, batch_size, 0, cfg.device, mixing=mix)
    model = ViT(ViTConfig(dim=32, depth=depth, heads=2, mlp_dim=32, dropout=0.1, drop_path=0.1, backend=backend))
    return Trainer(model, loader, EvalSet(images, labels, [str(i) for i in range(10)]),
                   make_optimizer(model, cfg, cfg.device), cfg, run_dir, log=lambda line: None)


def first_batch(trainer):
    return next(iter(trainer.loader))


def test_the_torch_step_with_the_average_of_the_weights_and_mixed_targets_is_capture_safe(tmp_path):
    trainer = make_trainer(tmp_path, ema_decay=0.99, mixing=True)
    images, targets = first_batch(trainer)
    assert targets.is_floating_point()  # soft targets: the mixing loader's
    problems = capture_problems(lambda: trainer.train_step(images, targets), CALLS)
    assert not problems, "\n".join(problems)


@pytest.mark.interpreter
def test_the_triton_step_is_capture_safe(tmp_path):
    # One block of two images: every kernel of the step, each launched at the smallest shape.
    trainer = make_trainer(tmp_path, backend="triton", depth=1, batch_size=2, ema_decay=0.99)
    images, labels = first_batch(trainer)
    problems = capture_problems(lambda: trainer.train_step(images, labels), CALLS)
    assert not problems, "\n".join(problems)


class EagerReplay:
    """A graph's stand-in on the CPU: its replay runs the step on the static buffers."""

    def __init__(self, graphed: GraphedStep):
        self.graphed = graphed

    def replay(self):
        self.graphed.step(self.graphed.images, self.graphed.labels)


def test_the_replayed_step_copies_each_batch_into_the_static_buffers_capture_safely(tmp_path):
    trainer = make_trainer(tmp_path, mixing=True)
    batches = iter(trainer.loader)
    images, targets = next(batches)
    graphed = GraphedStep(trainer.train_step, stream=None)  # no stream: this step is past its warm-up and capture
    graphed.warmup_left = 0
    graphed.images, graphed.labels = images.clone(), targets.clone()
    graphed.graph = EagerReplay(graphed)
    second = next(batches)
    problems = capture_problems(lambda: graphed(*second), CALLS)
    assert not problems, "\n".join(problems)
    assert torch.equal(graphed.images, second[0]) and torch.equal(graphed.labels, second[1])


def test_the_mixing_draw_is_capture_safe():
    config = MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0)
    images = torch.rand(BATCH, 3, 8, 8)
    labels = torch.arange(BATCH)
    batches = iter([torch.randperm(100)[:BATCH] for _ in range(CALLS)])
    problems = capture_problems(lambda: mix_batch(images, labels, next(batches), seed=0, epoch=1, config=config), CALLS)
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------- what the check catches

def plant(monkeypatch, extra):
    """The step's loss with `extra(loss)` evaluated inside it."""
    criterion = trainer_module.criterion

    def planted(logits, targets, cfg):
        loss = criterion(logits, targets, cfg)
        return extra(loss)

    monkeypatch.setattr(trainer_module, "criterion", planted)


class Counter:
    value = 0

    def next(self) -> int:
        self.value += 1
        return self.value


PLANTS = {
    "item": (lambda loss: loss * 0 + loss.item(), "host sync (aten._local_scalar_dense"),
    "bool": (lambda loss: loss if loss > 0 else -loss, "host sync"),
    "cpu copy": (lambda loss: loss + loss.cpu(), "host read (Tensor.cpu)"),
    "tolist": (lambda loss: loss + sum(loss.view(1).tolist()), "host read (Tensor.tolist)"),
    "nonzero": (lambda loss: loss + loss.view(1).nonzero().sum(), "host sync (aten.nonzero"),
    "host tensor": (lambda loss: loss * torch.tensor(0.5), "tensor made from host data"),
    "host value per call": (lambda loss, count=Counter(): loss * count.next(), "differs from call 2"),
    "python random": (lambda loss: loss * random.random(), "Python's or NumPy's global random numbers"),
    "explicit generator": (lambda loss, generator=torch.Generator().manual_seed(1):
                           loss * torch.rand((), generator=generator), "explicit generator"),
    "allocation per call": (lambda loss, count=Counter(): loss + torch.zeros(count.next()).sum(), "differs from call 2"),
}


@pytest.mark.parametrize("name", PLANTS)
def test_the_check_fails_on_what_a_graph_cannot_replay_planted_into_the_step(tmp_path, monkeypatch, name):
    extra, expected = PLANTS[name]
    plant(monkeypatch, extra)
    trainer = make_trainer(tmp_path)
    images, labels = first_batch(trainer)
    problems = capture_problems(lambda: trainer.train_step(images, labels), CALLS)
    assert any(expected in problem for problem in problems), problems
    if "differs" not in expected:  # the problem names the line that caused it
        assert any("tests/test_capture.py" in problem for problem in problems), problems
