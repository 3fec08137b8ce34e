"""The training loop: recipe, schedule, the step, progress, checkpoints and the run directory.

The step (Trainer.train_step) waits neither for the device nor for another thread: the global step
counter, the learning rate (a table of the whole schedule on the device, indexed by that counter
and written into Adam's tensor learning rate), the running loss and accuracy, and the first step
at which the loss or the weights became non-finite all live on the device. The host reads them
only at progress points (after an epoch's first step, then every PROGRESS_EVERY steps or
PROGRESS_EVERY_SECONDS, whichever comes first, and once at the end of an epoch), where a
non-finite loss or weights stop the run with NonFiniteLoss. With TrainConfig.cuda_graph the same
function is captured once in a CUDA graph and replayed every step (GraphedStep).

The step's loss (criterion) takes integer labels or the soft targets a mixing loader hands out;
with TrainConfig.ema_decay the step also updates an exponential moving average of the weights,
which is evaluated after every epoch beside the model and saved in the checkpoints.

Between epochs, the training thread copies the checkpoint's tensors (weights, optimizer, the
average) into host buffers kept from epoch to epoch: from a GPU into pinned buffers, enqueued on
the training stream ahead of the next epoch's kernels, so the copies hold the epoch's weights
without the host waiting for them; on the CPU at once. A background thread waits for the copies,
writes the checkpoint and rewrites metrics.csv and curves.png from the metrics inside it
(vit/checkpoint.py). Nothing within an epoch waits for that thread; the next epoch's end waits for
its write before it copies into the same buffers.

build_trainer() assembles everything from the configs (what train.py uses); Trainer takes its
parts, so the bench can hand in timm's model or a timed loader.
"""
import copy
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from vit import data as cifar
from vit import distributed
from vit.backends import get_backend
from vit.checkpoint import (BEST_CHECKPOINT, LAST_CHECKPOINT, BackgroundWriter, HostSnapshot, load_checkpoint,
                            remove_stale_temporaries, write_epoch_files, write_outputs)
from vit.config import TrainConfig  # defined apart for vit.checkpoint; imported from here by callers
from vit.environment import device_name
from vit.mixing import MixConfig, smooth_targets, soft_target_cross_entropy
from vit.model import ViTConfig, count_parameters
from vit.optimizer import make_optimizer
from vit.timm_interop import build_model
from vit.progress import Progress

PROGRESS_EVERY = 25  # steps between progress points; each one waits for the device
PROGRESS_EVERY_SECONDS = 5.0  # or sooner, when steps are slow (the CPU, a first compile): the bar keeps moving
GRAPH_WARMUP_STEPS = 3  # eager steps on the capture stream before capturing, as PyTorch's docs do
CURVES_EVERY_SECONDS = 10.0  # curves.png is redrawn at most this often (and always after the last epoch)
NO_STEP = 2**62  # "no non-finite value yet" in the device's first-bad-step record


@dataclass
class EvalSet:
    images: torch.Tensor  # uint8 [N, 3, H, W], on the training device
    labels: torch.Tensor  # int64 [N], on the training device
    class_names: list[str]


@dataclass
class RunSummary:
    best_acc: float
    best_epoch: int  # 1-based; 0 when no epoch has finished
    last_acc: float
    epochs: int  # the recipe's total
    wall_seconds: float  # this process's fit()
    images_per_second: float  # training images per second over this process's epochs
    # The average of the weights (TrainConfig.ema_decay), when the run keeps one and an epoch finished.
    ema_best_acc: float | None = None
    ema_best_epoch: int = 0
    ema_last_acc: float | None = None


class NonFiniteLoss(RuntimeError):
    """The loss, the weights after a step, or the test loss became NaN or infinite."""


# ---------------------------------------------------------------------------- schedule

def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Linear warmup from peak/warmup_steps (never zero) to peak at the last warmup step,
    then cosine from peak to floor, reaching floor at the last step."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = total_steps - 1 - (warmup_steps - 1)
    if decay_steps <= 0:
        return peak
    progress = min(1.0, (step - (warmup_steps - 1)) / decay_steps)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def lr_schedule(cfg: TrainConfig, steps_per_epoch: int) -> torch.Tensor:
    """The learning rate of every step of the recipe, float32 [epochs * steps_per_epoch]."""
    total = cfg.epochs * steps_per_epoch
    warmup = max(1, round(cfg.warmup_epochs * steps_per_epoch))
    return torch.tensor([lr_at(step, total, warmup, cfg.lr, cfg.min_lr) for step in range(total)],
                        dtype=torch.float64).float()


def cuda_graph_unsupported_reason(cfg: TrainConfig, device: torch.device, world_size: int = 1) -> str | None:
    """Why TrainConfig.cuda_graph cannot be used with these settings, or None."""
    if torch.device(device).type != "cuda":
        return "--cuda-graph needs a CUDA device"
    if world_size > 1:
        return "--cuda-graph runs in a single process; it does not support torchrun"
    if cfg.compile:
        return "--cuda-graph and --compile do not combine; pick one"
    if cfg.precision == "fp16":
        return "--cuda-graph does not support --precision fp16 (its loss scaler); use bf16 or fp32"
    return None


# ---------------------------------------------------------------------------- reproducibility

def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()[1].copy(),
             "numpy_pos": int(np.random.get_state()[2])}
    state["numpy"] = torch.from_numpy(state["numpy"].astype(np.int64))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"].cpu())
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    np.random.set_state(("MT19937", state["numpy"].cpu().numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------- data and evaluation

def autocast_dtype(cfg: TrainConfig):
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[cfg.precision]


def mix_config(cfg: TrainConfig, num_classes: int) -> MixConfig | None:
    """The loader's CutMix / MixUp settings (with the recipe's label smoothing), or None when off."""
    if not cfg.mixing:
        return None
    return MixConfig(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.mix_prob,
                     switch_prob=cfg.mix_switch_prob, label_smoothing=cfg.label_smoothing,
                     smoothing_convention=cfg.label_smoothing_convention, num_classes=num_classes)


def make_train_loader(cfg: TrainConfig, images, labels, device, rank=0, world_size=1, num_classes: int = 10):
    """The batched loader, augmenting on the training device (mixing when cfg.mixing)."""
    return cifar.TrainLoader(images, labels, cfg.batch_size, cfg.seed, device, rank=rank, world_size=world_size,
                                auto_augment=cfg.auto_augment, mixing=mix_config(cfg, num_classes))


def criterion(logits: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """The training loss, the mean over the batch, in float32. targets: integer labels [B],
    cross-entropy with cfg.label_smoothing in cfg.label_smoothing_convention; or soft targets
    [B, classes] (a mixing loader's, smoothing included), soft-target cross-entropy. Both on
    the device, no host sync, the same shapes every step."""
    logits = logits.float()
    if targets.is_floating_point():
        return soft_target_cross_entropy(logits, targets)
    if cfg.label_smoothing_convention == "torch":
        return F.cross_entropy(logits, targets, label_smoothing=cfg.label_smoothing)
    return soft_target_cross_entropy(logits, smooth_targets(targets, logits.shape[-1], cfg.label_smoothing,
                                                            cfg.label_smoothing_convention))


def hard_labels(targets: torch.Tensor) -> torch.Tensor:
    """The class each target names: integer labels as they are; soft targets' largest share
    (a mixed sample's dominant image)."""
    return targets.argmax(dim=-1) if targets.is_floating_point() else targets


@torch.no_grad()
def evaluate(model, images, labels, device, cfg: TrainConfig, batch_size=1000,
             ctx: distributed.Context = distributed.Context()) -> tuple[float, float]:
    """(mean loss with the training criterion on the integer labels, accuracy) over the given
    test images; under torchrun each rank takes a contiguous share and the sums are reduced."""
    total = len(labels)
    share = -(-total // ctx.world_size)
    images, labels = images[ctx.rank * share:(ctx.rank + 1) * share], labels[ctx.rank * share:(ctx.rank + 1) * share]
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    dtype = autocast_dtype(cfg)
    for x, y in cifar.test_batches(images, labels, batch_size, device):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)
        loss_sum += criterion(logits, y, cfg).double() * len(y)
        correct += (logits.argmax(-1) == y).sum()
    model.train()
    distributed.all_reduce(loss_sum)
    distributed.all_reduce(correct)
    return loss_sum.item() / total, correct.item() / total


# ---------------------------------------------------------------------------- the step's device state

class StepMeters:
    """What the step keeps on the device; the host reads it only at progress points."""

    def __init__(self, device: torch.device):
        self.step = torch.zeros(1, dtype=torch.int64, device=device)  # the global step: index into the LR table
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # of the steps' mean losses
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        # The first global step whose loss, and whose weights after the update, were non-finite.
        self.first_bad = torch.full((2,), NO_STEP, dtype=torch.int64, device=device)

    def reset(self, global_step: int):
        """At the start of an epoch (outside any graph: these are the graph's inputs and outputs)."""
        self.step.fill_(global_step)
        self.loss_sum.zero_()
        self.correct.zero_()
        self.first_bad.fill_(NO_STEP)


@dataclass
class MeterReading:
    """StepMeters as the host reads them at a progress point."""
    loss_sum: float
    correct: float
    first_bad_loss: int  # NO_STEP: none yet
    first_bad_weights: int
    lr: float  # the last step's learning rate


class GraphedStep:
    """A training step function, step(images, targets), captured once in a CUDA graph and replayed
    every step.

    The first GRAPH_WARMUP_STEPS steps run eagerly on the capture stream, so what is created lazily
    (Adam's moments, cuBLAS workspaces, Triton's compiled and autotuned kernels) exists before the
    capture, as PyTorch's whole-network capture does; the capture stream is ordered after the
    current stream, and the current stream after it, so a warm-up step comes after whatever was
    enqueued before it (a checkpoint's copies of the weights) and before whatever comes after. The
    next step is captured: the capture only records, so the graph is then replayed for that step
    too. From then on each batch is copied into the static input buffers the graph reads, and the
    graph is replayed on the current stream. Everything the step changes (weights, Adam's state,
    the learning rate, the meters) is updated in place by the replay.

    stream: the capture stream; before_capture: called once before the capture, to free what the
    step allocates afresh (the gradients, which the capture then allocates in the graph's pool).
    """

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], None], stream: torch.cuda.Stream,
                 before_capture: Callable[[], None] = lambda: None):
        self.step, self.stream, self.before_capture = step, stream, before_capture
        self.warmup_left = GRAPH_WARMUP_STEPS
        self.graph: torch.cuda.CUDAGraph | None = None
        self.images = self.labels = None  # static input buffers

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        if self.graph is None and self.warmup_left > 0:
            self.warmup_left -= 1
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream), warnings.catch_warnings():
                # Adam warns when a capturable instance steps uncaptured: these steps are meant to.
                warnings.filterwarnings("ignore", message=".*capturable=True.*")
                self.step(images, labels)
            torch.cuda.current_stream().wait_stream(self.stream)
            return
        if self.graph is None:
            self._capture(images, labels)
        else:
            self.images.copy_(images, non_blocking=True)
            self.labels.copy_(labels, non_blocking=True)
        self.graph.replay()

    def _capture(self, images, labels):
        self.images, self.labels = images.clone(), labels.clone()
        self.before_capture()
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread (a checkpoint's writer, a DataLoader's pin-memory thread)
        # may keep working while this thread captures.
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            self.step(self.images, self.labels)
        self.graph = graph


# ---------------------------------------------------------------------------- the trainer

class Trainer:
    def __init__(self, model: torch.nn.Module, loader, test_set: EvalSet, optimizer: torch.optim.Optimizer,
                 cfg: TrainConfig, run_dir, *, model_cfg: ViTConfig | None = None,
                 ctx: distributed.Context = distributed.Context(), log=print):
        """model: on cfg.device; loader: one (images, targets) batch of fixed shape per step, with
        set_epoch() and len(), targets integer labels or soft targets (see criterion);
        optimizer: over model's parameters, with a tensor learning rate on the device
        (make_optimizer), which the trainer drives from its schedule; model_cfg: the configuration
        the model was built from (vit.timm_interop.build_model), recorded in the checkpoints and named
        by describe(), or None for a model handed in as it is (the bench's timm model)."""
        self.model, self.loader, self.test_set, self.optimizer = model, loader, test_set, optimizer
        self.model_cfg = model_cfg
        self.cfg, self.run_dir, self.ctx = cfg, Path(run_dir), ctx
        self.log = log if ctx.is_main else (lambda line: None)
        self.device = torch.device(cfg.device)
        if cfg.cuda_graph:
            reason = cuda_graph_unsupported_reason(cfg, self.device, ctx.world_size)
            if reason:
                raise ValueError(reason)
            if not all(group["capturable"] for group in optimizer.param_groups):
                raise ValueError("--cuda-graph needs a capturable optimizer (see vit.optimizer.make_optimizer)")
        self.steps_per_epoch = len(loader)

        self.step_model = model
        if ctx.enabled:
            # Gradients averaged over ranks: each rank's loss is the mean over its share of
            # the global batch, so the update equals the single-process one.
            self.step_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            self.step_model = torch.compile(self.step_model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.lr_tensors = [group["lr"] for group in optimizer.param_groups]
        for lr in self.lr_tensors:
            if not (isinstance(lr, torch.Tensor) and lr.device == self.device and lr.dim() == 0):
                raise ValueError("the optimizer's learning rate must be a 0-d tensor on the training device "
                                 "(see vit.optimizer.make_optimizer)")
        self.lr_table = lr_schedule(cfg, self.steps_per_epoch).to(self.device, self.lr_tensors[0].dtype)
        # The average of the weights: a copy of the model whose parameters the step moves toward
        # the model's (the model has no buffers that training changes).
        self.ema_model = None
        if cfg.ema_decay > 0:
            self.ema_model = copy.deepcopy(model).requires_grad_(False)
            self.ema_params, self.model_params = list(self.ema_model.parameters()), list(model.parameters())
        self.meters = StepMeters(self.device)
        self.graphed_step = None
        if cfg.cuda_graph:
            self.graphed_step = GraphedStep(self.train_step, torch.cuda.Stream(self.device),
                                            before_capture=lambda: optimizer.zero_grad(set_to_none=True))
        self.progress = Progress(cfg.epochs, self.steps_per_epoch, enabled=cfg.progress and ctx.is_main)

        self.writer = BackgroundWriter()
        self.snapshot = HostSnapshot()
        self._curves_drawn_at = -math.inf
        self.start_epoch, self.best_acc, self.best_epoch = 0, 0.0, 0
        self.metrics: list[dict] = []

    # -- the step ----------------------------------------------------------------------------------
    def train_step(self, images: torch.Tensor, targets: torch.Tensor):
        """One training step, all on the device: run eagerly, and captured by GraphedStep.
        targets: integer labels or soft targets (see criterion)."""
        cfg, meters = self.cfg, self.meters
        dtype = autocast_dtype(cfg)
        # No autocast weight cache: a cast cached across a graph's capture would outlive it.
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=False):
            logits = self.step_model(images)
            loss = criterion(logits, targets, cfg)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        for lr in self.lr_tensors:  # this step's entry of the schedule, into Adam's tensor learning rate
            torch.index_select(self.lr_table, 0, meters.step, out=lr.view(1))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema_model is not None:  # average = decay * average + (1 - decay) * weights
            with torch.no_grad():  # not a part of the graph: nothing differentiates the average
                torch._foreach_lerp_(self.ema_params, self.model_params, 1.0 - cfg.ema_decay)
        loss = loss.detach()
        meters.loss_sum += loss
        meters.correct += (logits.argmax(-1) == hard_labels(targets)).sum()
        # Non-finite weights show in their largest magnitude; the loss of the step that broke them
        # may still have been finite.
        largest_weight = torch.stack(torch._foreach_norm(self.params, math.inf)).amax()
        finite = torch.isfinite(torch.stack([loss, largest_weight.to(loss.dtype)]))
        torch.minimum(meters.first_bad, meters.step.expand(2).masked_fill(finite, NO_STEP), out=meters.first_bad)
        meters.step += 1

    # -- an epoch ------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        """Train one epoch (0-based): {train_loss, train_acc, lr (the last step's), epoch_seconds,
        images_per_second}."""
        if not 0 <= epoch < self.cfg.epochs:
            raise ValueError(f"epoch {epoch} is outside the recipe's {self.cfg.epochs} epochs")
        step_fn = self.graphed_step or self.train_step
        self.loader.set_epoch(epoch)
        self.meters.reset(epoch * self.steps_per_epoch)
        self.progress.start_epoch(epoch)
        start = last_point = time.perf_counter()
        steps = 0
        try:
            for images, labels in self.loader:
                step_fn(images, labels)
                steps += 1
                # The host's clock, not the device's: the step is only enqueued, and a progress point waits for it.
                due = steps == 1 or steps % PROGRESS_EVERY == 0 or time.perf_counter() - last_point >= PROGRESS_EVERY_SECONDS
                if due and steps < self.steps_per_epoch:
                    self._progress_point(steps, start, final=False)
                    last_point = time.perf_counter()
            means = self._progress_point(steps, start, final=True)
        finally:
            self.progress.end_epoch()
        seconds = time.perf_counter() - start
        return {**means, "epoch_seconds": seconds, "images_per_second": steps * self.cfg.batch_size / seconds}

    def _progress_point(self, steps: int, start: float, final: bool) -> dict:
        """Read the meters, stop on a non-finite value, show progress; the epoch's running means."""
        reading = self._read_meters(final)
        self._stop_if_non_finite(reading)
        means = self._running_means(reading, steps, final)
        self._show_progress(steps, start, means)
        return means

    def _read_meters(self, final: bool) -> MeterReading:
        """The device's meters in one transfer. Under torchrun the first non-finite steps are every
        rank's (so all ranks stop together), and at the end of the epoch the sums are too."""
        meters = self.meters
        sums = torch.stack([meters.loss_sum, meters.correct.double()])
        first_bad = meters.first_bad
        if self.ctx.enabled:
            first_bad = distributed.all_reduce(first_bad.clone(), distributed.dist.ReduceOp.MIN)
            if final:
                distributed.all_reduce(sums)
        loss_sum, correct, bad_loss, bad_weights, lr = torch.cat(
            [sums, first_bad.double(), self.lr_tensors[0].double().view(1)]).tolist()
        return MeterReading(loss_sum, correct, int(bad_loss), int(bad_weights), lr)

    def _stop_if_non_finite(self, reading: MeterReading):
        """NonFiniteLoss naming the first step whose loss or weights became non-finite, if any."""
        first_bad = min(reading.first_bad_loss, reading.first_bad_weights)
        if first_bad < NO_STEP:
            what = "loss" if reading.first_bad_loss <= reading.first_bad_weights else "weights after the optimizer step"
            epoch, step = divmod(first_bad, self.steps_per_epoch)
            raise NonFiniteLoss(f"non-finite {what} at epoch {epoch + 1}, step {step + 1}; {self._stopping()}")

    def _running_means(self, reading: MeterReading, steps: int, final: bool) -> dict:
        """{train_loss, train_acc, lr} over the epoch's `steps` steps so far: all ranks' at the end
        of the epoch (final), this rank's before."""
        world = self.ctx.world_size
        losses, images = (steps * world, steps * self.cfg.batch_size) if final else (steps, steps * self.cfg.batch_size // world)
        return {"train_loss": reading.loss_sum / losses if steps else math.nan,
                "train_acc": reading.correct / images if steps else math.nan, "lr": reading.lr}

    def _show_progress(self, steps: int, start: float, means: dict):
        """The progress bar after `steps` steps of the epoch that began at `start` (perf_counter)."""
        if steps:
            self.progress.update(steps, loss=means["train_loss"], acc=means["train_acc"], lr=means["lr"],
                                 images_per_second=steps * self.cfg.batch_size / (time.perf_counter() - start))

    def _stopping(self) -> str:
        """The end of a NonFiniteLoss message: what is kept. Every finished epoch was checkpointed."""
        kept = f"the last good checkpoint is {self.run_dir / LAST_CHECKPOINT}" if self.metrics else "no checkpoint was written yet"
        return f"stopping: {kept}"

    def evaluate(self) -> tuple[float, float]:
        return evaluate(self.model, self.test_set.images, self.test_set.labels, self.device, self.cfg, ctx=self.ctx)

    def evaluate_ema(self) -> tuple[float, float]:
        """evaluate() of the average of the weights (TrainConfig.ema_decay)."""
        return evaluate(self.ema_model, self.test_set.images, self.test_set.labels, self.device, self.cfg, ctx=self.ctx)

    # -- the run ---------------------------------------------------------------------------------------
    def fit(self) -> RunSummary:
        cfg = self.cfg
        started = time.perf_counter()
        trained_images, trained_seconds = 0, 0.0
        self.progress.start_run(self.start_epoch)
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                row = self.train_epoch(epoch)
                trained_images += row["images_per_second"] * row["epoch_seconds"]
                trained_seconds += row["epoch_seconds"]
                test_loss, test_acc = self.evaluate()
                if not math.isfinite(test_loss):
                    raise NonFiniteLoss(f"non-finite test loss after epoch {epoch + 1}; {self._stopping()}")
                row = {"epoch": epoch + 1, **row, "test_loss": test_loss, "test_acc": test_acc}
                if self.ema_model is not None:
                    row["ema_test_loss"], row["ema_test_acc"] = self.evaluate_ema()
                self.metrics.append(row)
                improved = self.best_epoch == 0 or test_acc > self.best_acc
                if improved:
                    self.best_acc, self.best_epoch = test_acc, epoch + 1
                if self.ctx.is_main:
                    self._save_epoch(epoch + 1, improved)
                ema = f"  EMA acc {row['ema_test_acc']:.2%}" if self.ema_model is not None else ""
                self.log(f"epoch {epoch + 1:>3}/{cfg.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.2%}  "
                         f"test loss {test_loss:.4f} acc {test_acc:.2%}{ema}  lr {row['lr']:.2e}  "
                         f"{row['epoch_seconds']:.1f}s  {row['images_per_second']:,.0f} img/s  "
                         f"{self.progress.run_status()}" + ("  *best" if improved else ""))
        finally:
            self.writer.wait()  # every file complete before fit() returns or raises
        summary = RunSummary(best_acc=self.best_acc, best_epoch=self.best_epoch,
                             last_acc=self.metrics[-1]["test_acc"] if self.metrics else 0.0, epochs=cfg.epochs,
                             wall_seconds=time.perf_counter() - started,
                             images_per_second=trained_images / trained_seconds if trained_seconds else 0.0)
        if self.ema_model is not None and self.metrics:
            best = max(self.metrics, key=lambda row: row["ema_test_acc"])  # the first of equals
            summary.ema_best_acc, summary.ema_best_epoch = best["ema_test_acc"], best["epoch"]
            summary.ema_last_acc = self.metrics[-1]["ema_test_acc"]
        return summary

    # -- checkpoints -----------------------------------------------------------------------------------
    def _save_epoch(self, epoch: int, best: bool):
        """Snapshot the finished epoch and hand its files to the background writer. The snapshot
        (weights, optimizer, their average) goes into host buffers kept from epoch to epoch: from a
        GPU the copies are only enqueued on the training stream, ahead of the next epoch's kernels,
        which therefore change the weights only after they are copied; on the CPU they are made
        here. The writer waits for the copies' event, then writes the files; the training thread goes
        on at once and never waits for the writer within an epoch. It waits here, before the copies,
        for the previous epoch's write (which reads the same buffers, and whose error surfaces here)."""
        self.writer.wait()
        state = {"epoch": epoch, "best_acc": self.best_acc, "best_epoch": self.best_epoch,
                 "metrics": [dict(row) for row in self.metrics], "rng": rng_state(),
                 "model_config": asdict(self.model_cfg) if self.model_cfg is not None else None}
        tensors = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                   "scaler": self.scaler.state_dict()}
        if self.ema_model is not None:
            tensors["ema"] = self.ema_model.state_dict()
        snapshot = self.snapshot.take(tensors)
        now = time.monotonic()
        curves = epoch == self.cfg.epochs or now - self._curves_drawn_at >= CURVES_EVERY_SECONDS
        if curves:
            self._curves_drawn_at = now

        def write():
            snapshot.wait()
            write_epoch_files(self.run_dir, {**state, **snapshot.state}, best=best, curves=curves)

        self.writer.submit(write)

    def resume(self):
        """Continue from run_dir's last.pt: the weights (and their average), optimizer, RNG states and metrics. The run
        directory's metrics.csv and curves.png are rewritten from the checkpoint, and temporary
        files a killed write left are removed."""
        path = self.run_dir / LAST_CHECKPOINT
        state = load_checkpoint(path, "cpu")
        if "metrics" not in state:
            raise RuntimeError(f"{path}: written by an older version of the trainer, without the metrics history; "
                               "finish it with that version, or start a new run")
        self.model.load_state_dict(state["model"])
        if self.ema_model is not None:
            if "ema" not in state:
                raise RuntimeError(f"{path}: has no average of the weights, but the run keeps one (ema_decay "
                                   f"{self.cfg.ema_decay}); it was written by an older version of the trainer")
            self.ema_model.load_state_dict(state["ema"])
        # The saved moments and steps, with this run's settings: the tensor learning rate the schedule
        # drives (load_state_dict puts a copy of the saved one in its place) and the capturable flag
        # (--cuda-graph may differ on resume).
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, own in zip(self.optimizer.param_groups, settings):
            group.update(own)
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.start_epoch, self.best_acc, self.best_epoch = state["epoch"], state["best_acc"], state["best_epoch"]
        self.metrics = state["metrics"]
        if self.ctx.is_main:
            remove_stale_temporaries(self.run_dir)
            rows = [dict(row) for row in self.metrics]  # fit() appends to self.metrics while the writer draws
            self.writer.submit(lambda: write_outputs(self.run_dir, rows))

    def finish(self):
        """Evaluate the best epoch's weights (best.pt) in full, in the run's precision (as its epochs
        were): confusion matrix, per-class accuracy, the most confident mistakes, next to the
        checkpoints. They are loaded into a copy of the model: self.model keeps the last epoch's."""
        from vit.evaluate import write_report

        if not self.ctx.is_main:
            return
        self.writer.wait()
        best = self.run_dir / BEST_CHECKPOINT
        state = load_checkpoint(best, "cpu")
        best_model = copy.deepcopy(self.model)
        best_model.load_state_dict(state["model"])
        source = {"checkpoint": str(best), "epoch": state["epoch"], "device": str(self.device),
                  "model": state.get("model_config")}
        report = write_report(best_model, self.test_set.images, self.test_set.labels, self.test_set.class_names,
                              self.run_dir, self.device, precision=self.cfg.precision, source=source)
        per_class = "  ".join(f"{name} {acc:.1%}" if acc is not None else f"{name} (no test images)"
                              for name, acc in report["per_class_accuracy"].items())
        self.log(f"best epoch per class: {per_class}")

    def describe(self) -> str:
        cfg, model_cfg = self.cfg, self.model_cfg
        if model_cfg is not None:
            backend = get_backend(model_cfg.backend)
            name = f"timm's {model_cfg.timm_model}" if model_cfg.timm_model else "ViT"
            model = f"{name} with {count_parameters(self.model):,} parameters; backend {backend.name} ({backend.description})"
        else:
            model = f"{type(self.model).__name__} with {count_parameters(self.model):,} parameters"
        return (f"{model}; device {device_name(self.device)}; precision {cfg.precision}; "
                f"{'torch.compile; ' if cfg.compile else ''}{'CUDA graph step; ' if cfg.cuda_graph else ''}"
                f"{len(self.loader.images):,} train images, {self.steps_per_epoch} steps of {cfg.batch_size} per epoch"
                + (f"; {self.ctx.world_size} processes, {cfg.batch_size // self.ctx.world_size} images each per step"
                   if self.ctx.enabled else ""))


def build_trainer(model_cfg: ViTConfig, cfg: TrainConfig, run_dir, *, resume: bool = False,
                  ctx: distributed.Context = distributed.Context(), log=print) -> Trainer:
    """The data, model, loader and optimizer from the configs; with resume, run_dir's last.pt
    (which must exist) restored."""
    device = torch.device(cfg.device)
    seed_everything(cfg.seed)
    data = cifar.load_cifar10(cfg.data_dir)
    train_images, train_labels = data.train_images, data.train_labels
    if cfg.train_subset:
        train_images, train_labels = train_images[:cfg.train_subset], train_labels[:cfg.train_subset]
    loader = make_train_loader(cfg, train_images, train_labels, device, ctx.rank, ctx.world_size,
                               num_classes=model_cfg.num_classes)
    test_set = EvalSet(data.test_images.to(device), data.test_labels.to(device), data.class_names)
    model = build_model(model_cfg).to(device)
    trainer = Trainer(model, loader, test_set, make_optimizer(model, cfg, device), cfg, run_dir, model_cfg=model_cfg,
                      ctx=ctx, log=log)
    if resume:
        trainer.resume()
    return trainer
