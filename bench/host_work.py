"""The trainer's host work, measured without a GPU: the gap between epochs and the device work
(kernel launches, host syncs, tensors from host data) of each training step.

- measure_epoch_gap(): the wall time from the end of an epoch's last step to the start of the
  next epoch's first step, evaluation excluded: the checkpoint snapshot, handing the writes to
  the background writer, the epoch line, the loader's next epoch. A step starts when the loop
  asks the loader for its batch, so making a batch is part of the step, not of the gap. The
  trainer runs its real fit() (checkpoints, metrics.csv, curves.png written for real) on
  generated images, with the model at whatever size is given: the snapshot copies every weight
  and Adam moment, so the model's size is what matters, not the data's. On the CPU those copies
  are made within the gap; from a GPU they are only enqueued there (the device runs them ahead of
  the next epoch's steps): a CPU figure is not a GPU figure.
- count_step_work(): DeviceWorkCounter's counts for each step of an epoch (from the batch handed
  over to the next ask: the loader's own work excluded), and for each progress point.

Timings on the CPU are host-work figures, never GPU performance figures; the counts are the same
on every machine (the op sequence does not depend on the device's speed or the batch size).
"""
import statistics
import tempfile
import time

import torch

from bench.counts import Counts, DeviceWorkCounter
from vit.data import TrainLoader
from vit.model import ViT, ViTConfig
from vit.optimizer import make_optimizer
from vit.trainer import EvalSet, TrainConfig, Trainer, seed_everything

CLASS_NAMES = [f"class {i}" for i in range(10)]


class MarkedLoader:
    """Wraps a train loader: calls on_ask() when the loop asks for a batch, on_batch() when the batch
    is handed over, and on_end() when the loop asks past the epoch's last batch."""

    def __init__(self, inner, on_ask=lambda: None, on_batch=lambda: None, on_end=lambda: None):
        self.inner, self.on_ask, self.on_batch, self.on_end = inner, on_ask, on_batch, on_end

    def __len__(self):
        return len(self.inner)

    def __getattr__(self, name):  # set_epoch, images, ...: the wrapped loader's
        return getattr(self.inner, name)

    def __iter__(self):
        batches = iter(self.inner)
        while True:
            self.on_ask()
            try:
                batch = next(batches)
            except StopIteration:
                self.on_end()
                return
            self.on_batch()
            yield batch


def _parts(model_cfg: ViTConfig, cfg: TrainConfig, num_images: int, num_test: int):
    """A model, a batched-augmentation loader over generated images, a test set and an optimizer."""
    seed_everything(cfg.seed)
    device = torch.device(cfg.device)
    generator = torch.Generator().manual_seed(cfg.seed)
    images = torch.randint(0, 256, (num_images, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (num_images,), generator=generator)
    loader = TrainLoader(images, labels, cfg.batch_size, cfg.seed, device)
    test_set = EvalSet(images[:num_test].to(device), labels[:num_test].to(device), CLASS_NAMES)
    model = ViT(model_cfg).to(device)
    return model, loader, test_set, make_optimizer(model.parameters(), cfg, device)


def measure_epoch_gap(model_cfg: ViTConfig | None = None, epochs: int = 5, batch_size: int = 4,
                      steps_per_epoch: int = 8, device: str = "cpu", precision: str = "fp32") -> dict:
    """Run fit() for `epochs` epochs and time the gaps between them (see the module docstring).

    The background writer must finish an epoch's files before the next epoch's are handed to it;
    when an epoch is shorter than that write, the gap includes the wait. The result says both, so
    the figure can be read against the real epoch time: {"gaps_seconds" (one per pair of epochs),
    "median_seconds", "max_seconds", "epoch_seconds" (training only, each epoch), "snapshot_seconds"
    (the part of each gap spent in the checkpoint snapshot's copies: all of them on the CPU, only
    their enqueueing from a GPU), "write_seconds" (the background write of each epoch, on its
    thread), "parameters"}."""
    model_cfg = model_cfg or ViTConfig()
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, warmup_epochs=1, device=device, precision=precision,
                      progress=False, seed=0)
    model, loader, test_set, optimizer = _parts(model_cfg, cfg, steps_per_epoch * batch_size, num_test=batch_size)
    ends, starts, eval_seconds = [], [], []
    first_ask = [True]

    def on_ask():
        if first_ask[0]:
            starts.append(time.perf_counter())
            first_ask[0] = False

    def on_end():
        ends.append(time.perf_counter())
        first_ask[0] = True

    class TimedTrainer(Trainer):
        def evaluate(self):
            started = time.perf_counter()
            try:
                return super().evaluate()
            finally:
                eval_seconds.append(time.perf_counter() - started)

    lines = []
    with tempfile.TemporaryDirectory(prefix="epoch-gap-") as run_dir:
        trainer = TimedTrainer(model, MarkedLoader(loader, on_ask=on_ask, on_end=on_end), test_set, optimizer, cfg,
                               run_dir, model_cfg=model_cfg, log=lines.append)
        snapshot_seconds = []
        take = trainer.snapshot.take

        def timed_take(state):
            started = time.perf_counter()
            try:
                return take(state)
            finally:
                snapshot_seconds.append(time.perf_counter() - started)

        trainer.snapshot.take = timed_take
        trainer.fit()
    gaps = [starts[e + 1] - ends[e] - eval_seconds[e] for e in range(epochs - 1)]
    return {"gaps_seconds": gaps, "median_seconds": statistics.median(gaps), "max_seconds": max(gaps),
            "epoch_seconds": [end - start for start, end in zip(starts, ends)], "snapshot_seconds": snapshot_seconds[:-1],
            "write_seconds": trainer.writer.job_seconds, "parameters": sum(p.numel() for p in model.parameters())}


def count_step_work(model_cfg: ViTConfig | None = None, steps: int = 3, batch_size: int = 4, device: str = "cpu",
                    precision: str = "fp32", cfg_overrides: dict | None = None) -> dict:
    """One epoch of `steps` steps under DeviceWorkCounter: {"steps": [Counts of each step],
    "epoch": Counts of the whole train_epoch, "outside_steps": Counts of the rest (the loader, the
    progress points, the epoch's end)}."""
    model_cfg = model_cfg or ViTConfig()
    cfg = TrainConfig(epochs=1, batch_size=batch_size, warmup_epochs=0, device=device, precision=precision,
                      progress=False, seed=0, **(cfg_overrides or {}))
    model, loader, test_set, optimizer = _parts(model_cfg, cfg, steps * batch_size, num_test=batch_size)
    counter = DeviceWorkCounter()
    marks = []  # Counts copies at each ask and each handed-over batch, in order

    def mark():
        marks.append(_copy(counter.counts))

    with tempfile.TemporaryDirectory(prefix="step-work-") as run_dir:
        trainer = Trainer(model, MarkedLoader(loader, on_ask=mark, on_batch=mark), test_set, optimizer, cfg, run_dir,
                          model_cfg=model_cfg, log=lambda line: None)
        with counter:
            trainer.train_epoch(0)
    # marks: ask0, batch0, ask1, batch1, ..., ask_last (the one that ends the epoch)
    per_step = [_difference(marks[2 * i + 2], marks[2 * i + 1]) for i in range(steps)]
    outside = _copy(counter.counts)
    for step in per_step:
        outside = _difference(outside, step)
    return {"steps": per_step, "epoch": counter.counts, "outside_steps": outside}


def _copy(counts: Counts) -> Counts:
    return Counts(**{k: (v.copy() if hasattr(v, "copy") else v) for k, v in vars(counts).items()})


def _difference(after: Counts, before: Counts) -> Counts:
    return Counts(**{k: (after_v - vars(before)[k]) for k, after_v in vars(after).items()})
