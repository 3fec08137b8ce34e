"""End-to-end training benchmarks: the real recipe, real CIFAR-10 (or synthetic images, labelled).

Every configuration is trained by the project's own loop (vit.trainer.Trainer.train_epoch:
the same data pipeline, augmentation, optimizer, schedule and autocast) and evaluated
with vit.trainer.evaluate. timm's VisionTransformer, the external peer, goes through the
same loop: the bench hands the Trainer to_timm(our model) (same configuration, same initial
weights) with an optimizer built the same way. Every use of the Trainer is in one section
below ("The Trainer").

Configurations, in the order they run (a budget cut drops the last ones): the headline
comparison first (our triton backend, eager, against torch bf16 + torch.compile, the
strongest plain-PyTorch peer), then the torch backend eager, the triton backend compiled,
timm's model, fp32, and the CUDA-graph variants.

What is measured, per configuration
- Step times, without adding any synchronization: the train loader is wrapped so that each
  step leaves two markers, one when the loop asks for the next batch and one when the
  batch is handed over. On CUDA the markers are CUDA events recorded on the stream, so
  their distances are the GPU's timeline: a step is the distance between two "asks", the
  data wait is the distance from "ask" to "handed over" (the augmentation's GPU work, or
  the GPU idling while the host waits for a batch). On the CPU they are perf_counter().
- images/s and epoch seconds from the steady state: the first warm-up steps (torch.compile
  compiles during the first, kernels autotune) are excluded; epoch_seconds is the steady
  step time times the steps of a full epoch of the data set.
- test accuracy after each epoch (and before training), against wall-clock seconds, so a
  fast wrong kernel shows; each row says what its accuracy is (full epochs, or a short row
  of a few steps, or meaningless on synthetic images). Evaluation runs the uncompiled model
  with the same weights: a compiled model would recompile for eval mode.
- peak GPU memory (torch.cuda.max_memory_allocated) over set-up, training and evaluation.
- per-epoch host work, measured once per run at this model size with Trainer.fit itself
  (bench/host_work.py): the gap on the training thread between one epoch's last step and the
  next one's first, evaluation excluded, and the background write of each epoch's files
  (checkpoints, metrics.csv, curves.png), which delays training only when it takes longer
  than an epoch and its evaluation.
- the projection of the full recipe (200 epochs): one-time overhead (compile, warm-up)
  plus 200 x (steady epoch + steady evaluation of the full test set + per-epoch host work
  at that epoch length).
- for eager configurations, the device work of a training step counted by dispatch
  (bench/counts.py): kernel launches per step (aten and Triton), host syncs, and the
  loader's launches per image. Counts are the same on every machine.
"""
import gc
import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from bench.compiling import CompilePolicy
from bench.counts import DeviceWorkCounter
from bench.datasets import BenchData
from bench.host_work import measure_epoch_gap
from bench.measure import describe_error, synchronize
from vit.config import build_configs
from vit.data import TrainLoader
from vit.backends import backend_names, get_backend
from vit.model import ViT, ViTConfig
from vit.optimizer import make_optimizer
from vit.trainer import (EvalSet, TrainConfig, Trainer, cuda_graph_unsupported_reason, evaluate, make_train_loader,
                         seed_everything)

RECIPE_EPOCHS = 200
COUNT_TRIMMED = "not counted: the row's share of the budget was spent in training"  # a row's counts, then
HOST_WORK_EPOCHS = 5  # fit() epochs behind the host-work figures: 4 gaps between epochs, 5 background writes

# The reference implementation's published runs of the same recipe.
PUBLISHED_RUNS = [
    {"gpu": "RTX A6000", "seconds": 2 * 3600, "test_acc": 0.8987},
    {"gpu": "V100", "seconds": 2 * 3600 + 14 * 60, "test_acc": 0.9092},
]


@dataclass(frozen=True)
class TrainingConfig:
    model: str  # "ours" (vit.model.ViT with a backend) or "timm" (timm's VisionTransformer)
    backend: str  # our backend; "torch" for timm, whose attention and MLP are its own
    precision: str
    compile: bool
    cuda_graphs: bool = False

    @property
    def name(self) -> str:
        base = f"timm ViT {self.precision}" if self.model == "timm" else f"{self.backend} {self.precision}"
        return base + (" + compile" if self.compile else "") + (" + CUDA graphs" if self.cuda_graphs else "")

    @property
    def key(self) -> str:
        """The name in --training-configs. Our triton backend trains in bf16 on a GPU and in fp32
        through the interpreter: its key leaves the precision out."""
        base = "triton" if self.backend == "triton" else f"{self.model if self.model == 'timm' else 'torch'}-{self.precision}"
        return base + ("-compile" if self.compile else "") + ("-graphs" if self.cuda_graphs else "")

    @property
    def owner(self) -> str:
        """"ours": our model, backends and trainer (a failure fails the run); "peer": what a user
        could pick instead: timm's model, and torch.compile of the torch reference."""
        return "peer" if self.model == "timm" or (self.backend == "torch" and self.compile) else "ours"


def training_configs(device: torch.device) -> list[TrainingConfig]:
    """In priority order: what a budget cut drops first comes last."""
    # The Triton interpreter computes bf16 matmuls wrongly, so on the CPU our kernels train in fp32.
    ours = "bf16" if device.type == "cuda" else "fp32"
    return [
        TrainingConfig("ours", "triton", ours, False),  # the headline: ours ...
        TrainingConfig("ours", "torch", "bf16", True),  # ... against the strongest plain-PyTorch peer
        TrainingConfig("ours", "torch", "bf16", False),
        TrainingConfig("ours", "triton", ours, True),
        TrainingConfig("timm", "torch", "bf16", False),
        TrainingConfig("timm", "torch", "bf16", True),
        TrainingConfig("ours", "torch", "fp32", False),
        TrainingConfig("ours", "torch", "fp32", True),
        TrainingConfig("ours", "triton", ours, False, cuda_graphs=True),
        TrainingConfig("ours", "torch", "bf16", False, cuda_graphs=True),
    ]


def select_configs(configs: list[TrainingConfig], keys: list[str] | None) -> list[TrainingConfig]:
    """The configurations named by --training-configs, in the order named (the first named runs
    first); ValueError naming the known keys for an unknown one."""
    if not keys:
        return configs
    known = {c.key for c in configs}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ValueError(f"--training-configs: unknown {', '.join(unknown)}; known: {', '.join(c.key for c in configs)}")
    by_key = {c.key: c for c in configs}
    return [by_key[k] for k in dict.fromkeys(keys)]


@dataclass
class TrainingSettings:
    model: dict  # ViTConfig fields except backend
    epochs: int
    batch_size: int
    train_subset: int | None
    test_subset: int | None
    warmup_steps: int  # steps excluded from the steady state
    min_measured_steps: int  # steady steps a configuration runs even past its time slice
    count_steps: int  # steps of the epoch counted with DeviceWorkCounter (eager configurations)
    # The model and batch size the training step's device work is counted on, when not `model`: a
    # fresh model trained for the counted steps only (a --quick run counts its model at the full
    # model's depth, since launches per step grow with the depth).
    count_model: dict | None = None
    count_batch_size: int | None = None
    data: dict = field(default_factory=dict)  # BenchData.describe()


def unavailable_reason(config: TrainingConfig, device: torch.device, policy: CompilePolicy) -> str | None:
    if config.cuda_graphs:
        reason = cuda_graph_unsupported_reason(TrainConfig(precision=config.precision), device)
        if reason:
            return reason
    if config.compile and policy.skip_reason:
        return policy.skip_reason
    if config.model == "timm":
        try:
            import timm.models.vision_transformer  # noqa: F401
        except Exception as error:
            return f"timm cannot be imported ({describe_error(error)})"
    if config.backend not in backend_names():
        return f"backend {config.backend!r} is not registered in vit.backends (registered: {', '.join(backend_names())})"
    reason = get_backend(config.backend).unavailable_reason(device)
    if reason:
        return f"backend {config.backend!r} cannot run on {device.type}: {reason}"
    return None


# --------------------------------------------------------------------------- step markers

class TimedLoader:
    """Wraps a train loader: records two markers per step (see the module docstring) and
    ends the epoch early once `stop_at` (perf_counter) has passed and `min_steps` steps of
    this configuration have run, so a configuration cannot overrun its share of the budget
    by more than a step."""

    def __init__(self, inner, device: torch.device):
        self.inner, self.device = inner, device
        self.asks, self.handed = [], []  # one pair of markers per step, across epochs
        self.epochs = []  # per epoch: (indices of its steps, the marker after its last step)
        self.stop_at, self.min_steps = math.inf, 0
        self.stopped_early = False

    def __len__(self):
        return len(self.inner)

    def __getattr__(self, name):  # set_epoch, images, labels...: the wrapped loader's
        return getattr(self.inner, name)

    def _mark(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def __iter__(self):
        first = len(self.asks)
        batches = iter(self.inner)
        try:
            while True:
                if time.perf_counter() > self.stop_at and len(self.asks) >= self.min_steps:
                    self.stopped_early = True
                    break
                ask = self._mark()
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                self.asks.append(ask)
                self.handed.append(self._mark())
                yield batch
        finally:
            self.epochs.append((range(first, len(self.asks)), self._mark()))
            close = getattr(batches, "close", None)
            if close:
                close()  # ends the loader's generator, and frees its chunk, when the epoch is cut short

    def _seconds(self, start, end) -> float:
        if self.device.type == "cuda":
            # Read after train_epoch synchronized the device, so every event has completed.
            return start.elapsed_time(end) * 1e-3
        return end - start

    def step_times(self) -> tuple[list[float], list[float]]:
        """(step seconds, data-wait seconds) of every step in order. A step ends where the
        next one asks for its batch; an epoch's last step ends at the epoch's end marker."""
        steps, waits = [], []
        for indices, end in self.epochs:
            for i in indices:
                following = self.asks[i + 1] if i + 1 in indices else end
                steps.append(self._seconds(self.asks[i], following))
                waits.append(self._seconds(self.asks[i], self.handed[i]))
        return steps, waits


class CountingLoader:
    """Wraps a train loader for one counted epoch of `steps` steps: snapshots the counter's
    totals when the loop asks for a batch and when it gets it, so the training step alone
    (handed over to the next ask) is told apart from the loader's work."""

    def __init__(self, inner, steps: int, counter: DeviceWorkCounter):
        self.inner, self.steps, self.counter = inner, steps, counter
        self.asks, self.handed = [], []

    def __len__(self):
        return self.steps  # the trainer's progress point (a host sync) falls on the last step, as in a real epoch

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __iter__(self):
        batches = iter(self.inner)
        for _ in range(self.steps):
            self.asks.append(self.counter.counts.as_dict())
            batch = next(batches)
            self.handed.append(self.counter.counts.as_dict())
            yield batch
        self.asks.append(self.counter.counts.as_dict())  # the end of the last step

    def summary(self, total: dict) -> dict:
        """The training step's own device work (the fewest over the counted steps: a step without
        a progress point) and the counted epoch's syncs."""
        steps = list(zip(self.handed, self.asks[1:]))

        def per_step(key):
            return min(b[key] - a[key] for a, b in steps)

        return {"steps_counted": self.steps, "launches_per_step": per_step("launches"),
                "aten_launches_per_step": per_step("aten_launches"),
                "triton_launches_per_step": per_step("triton_launches"), "syncs_per_step": per_step("syncs"),
                "host_to_device_copies_per_step": per_step("host_to_device_copies"),
                "syncs_in_counted_epoch": total["syncs"]}


CIFAR10_TRAIN_IMAGES = 50_000
STAND_IN_IMAGE_SIZE = 8  # the loader's ops do not depend on the image size: small images count the same


# Stand-in loaders counted in this process, by their settings and epoch: the rows of a run that
# share them (a smoke run's configurations differ in model and precision, not in loader) share one count.
_stand_in_counts: dict[tuple, dict] = {}


def count_loader_epoch(loader, epoch: int) -> dict:
    """The loader's device work over one whole epoch (augmenting in chunks, its work per image
    is only right over whole chunks): launches per image, syncs and host-to-device copies.
    A TrainLoader over fewer images than CIFAR-10's 50,000 (a smoke run, a subset) is counted
    as a loader with the same settings over a full epoch of synthetic 8x8 images, so that the
    chunks are those of a real epoch, once per settings and epoch in a process; the result says
    which was counted."""
    if isinstance(loader, TrainLoader) and len(loader.images) < CIFAR10_TRAIN_IMAGES:
        key = (loader.batch_size, loader.seed, loader.device, loader.chunk_images, loader.auto_augment,
               loader.mixing, epoch)
        if key not in _stand_in_counts:
            _stand_in_counts[key] = _count_stand_in_epoch(loader, epoch)
        return dict(_stand_in_counts[key])
    return _count_epoch(loader, epoch, "this configuration's loader")


def _count_stand_in_epoch(loader: TrainLoader, epoch: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    size = (CIFAR10_TRAIN_IMAGES, 3, STAND_IN_IMAGE_SIZE, STAND_IN_IMAGE_SIZE)
    stand_in = TrainLoader(torch.randint(0, 256, size, dtype=torch.uint8, generator=generator),
                           torch.randint(0, 10, (CIFAR10_TRAIN_IMAGES,), generator=generator), loader.batch_size,
                           loader.seed, loader.device, chunk_images=loader.chunk_images,
                           auto_augment=loader.auto_augment, mixing=loader.mixing)
    counted = (f"a loader with this configuration's settings over a full epoch of {CIFAR10_TRAIN_IMAGES:,} "
               f"synthetic {STAND_IN_IMAGE_SIZE}x{STAND_IN_IMAGE_SIZE} images (its ops do not depend on the image "
               "size; this configuration's own epoch is too short for whole chunks)")
    stand_in.set_epoch(epoch)
    for _ in stand_in:  # the first epoch at an image size builds the augmentation's cached tables
        pass
    return _count_epoch(stand_in, epoch, counted)


def _count_epoch(loader, epoch: int, counted: str) -> dict:
    loader.set_epoch(epoch)
    images = 0
    with DeviceWorkCounter() as counter:
        for batch, _ in loader:
            images += len(batch)
    counts = counter.counts
    return {"loader_launches_per_image": counts.launches / images, "loader_syncs_per_epoch": counts.syncs,
            "loader_host_to_device_copies_per_epoch": counts.host_to_device_copies, "loader_images_counted": images,
            "loader_counted": counted}


# --------------------------------------------------------------------------- the Trainer
# Every use of vit.trainer.Trainer is in this section.

def make_trainer(config: TrainingConfig, settings: TrainingSettings, device: torch.device, data: BenchData,
                 compile_mode: str | None) -> Trainer:
    """A Trainer for the configuration over the bench's data set in memory (real or synthetic): our
    ViT, or timm's VisionTransformer of the same configuration and initial weights."""
    model_cfg, train_cfg = build_configs(dict(
        settings.model, backend=config.backend,
        epochs=settings.epochs, batch_size=settings.batch_size, precision=config.precision, device=str(device),
        compile=compile_mode == "default", cuda_graph=config.cuda_graphs, data_dir="(in memory)",
        train_subset=settings.train_subset, progress=False, seed=0))
    seed_everything(train_cfg.seed)
    images, labels = data.images.train_images, data.images.train_labels
    if train_cfg.train_subset:
        images, labels = images[:train_cfg.train_subset], labels[:train_cfg.train_subset]
    loader = make_train_loader(train_cfg, images, labels, device)
    test_set = EvalSet(data.images.test_images.to(device), data.images.test_labels.to(device), data.images.class_names)
    model = ViT(model_cfg).to(device)
    if config.model == "timm":
        from vit.timm_interop import to_timm
        model, model_cfg = to_timm(model).train(), None  # timm's own module, described by its class
    trainer = Trainer(model, loader, test_set, make_optimizer(model.parameters(), train_cfg, device), train_cfg,
                      tempfile.gettempdir(), model_cfg=model_cfg, log=lambda line: None)
    if compile_mode not in (None, "default"):  # TrainConfig.compile is torch.compile's default mode
        trainer.step_model = torch.compile(model, mode=compile_mode)
    return trainer


def measure_host_work(model_cfg: dict, device: torch.device, precision: str) -> dict:
    """Trainer.fit's per-epoch host work at this model size (bench.host_work.measure_epoch_gap): the
    gap between epochs on the training thread, and the background write of each epoch's files.
    Medians over HOST_WORK_EPOCHS epochs."""
    measured = measure_epoch_gap(ViTConfig(**model_cfg), epochs=HOST_WORK_EPOCHS, device=str(device),
                                 precision=precision)
    gap, write = measured["median_seconds"], statistics.median(measured["write_seconds"])
    return {"gap_seconds": gap, "write_seconds": write, "gaps_seconds": measured["gaps_seconds"],
            "note": f"Trainer.fit at this model size ({measured['parameters']:,} parameters), median of "
                    f"{HOST_WORK_EPOCHS} epochs: {gap * 1e3:.1f} ms on the training thread between epochs (evaluation "
                    f"excluded); {write:.3g} s writing each epoch's checkpoint, metrics.csv and curves.png on a "
                    f"background thread, which delays training only when it outlasts an epoch and its evaluation"}


def host_seconds_per_epoch(host_work: dict, epoch_and_eval_seconds: float) -> float:
    """What the host work adds to an epoch of this length: the gap, and the part of the background
    write that outlasts the epoch (the next epoch's files wait for it)."""
    return host_work["gap_seconds"] + max(0.0, host_work["write_seconds"] - epoch_and_eval_seconds)


def count_device_work(trainer: Trainer, step_loader, steps: int, epoch: int, loader, batch_size: int) -> dict:
    """Launches, syncs and copies of `steps` training steps over step_loader run by
    Trainer.train_epoch (of the given epoch of the recipe, run again), and of `loader` over a whole
    epoch, counted by dispatch (bench/counts.py); with the loader: a step and batch_size images of
    the loader. Trains the model further: run it after the measurements."""
    counter = DeviceWorkCounter()
    counting = CountingLoader(step_loader, min(steps, len(step_loader)), counter)
    previous, trainer.loader = trainer.loader, counting
    try:
        with counter:
            trainer.train_epoch(epoch)
    finally:
        trainer.loader = previous
    summary = {**counting.summary(counter.counts.as_dict()), **count_loader_epoch(loader, epoch + 1)}
    summary["launches_per_step_with_loader"] = (summary["launches_per_step"]
                                                + summary["loader_launches_per_image"] * batch_size)
    summary["note"] = (f"counted by dispatch (bench/counts.py): the training step alone, the fewest over an epoch "
                       f"of {summary['steps_counted']} steps (a step without a progress point); the loader over a "
                       f"whole epoch of {summary['loader_images_counted']:,} images, per image "
                       f"({summary['loader_counted']}); with the loader: the step plus a batch's share of the loader")
    return summary


# --------------------------------------------------------------------------- one configuration

@dataclass
class TrainingRow:
    name: str
    key: str
    model: str
    backend: str
    precision: str
    compile: bool
    cuda_graphs: bool
    status: str  # "ok" | "skipped" (cannot run here, or trimmed) | "failed" (crashed; the reason says how)
    owner: str = "ours"  # "ours" | "peer"
    compile_mode: str | None = None  # torch.compile mode; None: eager
    skipped_reason: str | None = None
    images_per_second: float | None = None
    step_ms: float | None = None  # steady, the loader's batch included
    epoch_seconds: float | None = None  # steady state, a full epoch of the data set
    test_acc: float | None = None
    accuracy_valid: bool = True  # False on synthetic images
    accuracy_note: str | None = None  # what test_acc is: after full epochs, after a few steps, or meaningless
    data_wait_share: float | None = None
    peak_memory: int | None = None  # bytes, torch.cuda.max_memory_allocated
    peak_memory_note: str | None = None
    host_work_seconds: float | None = None  # per epoch, measured once per run (see "host_work" in results.json)
    projected_200_epoch_seconds: float | None = None
    eval_seconds: float | None = None  # steady, the full test set
    overhead_seconds: float | None = None  # one-time: compile, warm-up, first evaluation
    setup_seconds: float | None = None
    wall_seconds: float | None = None  # this configuration from start to end, counting included
    epochs_run: int = 0
    steps_run: int = 0
    measured_steps: int = 0
    steps_per_full_epoch: int | None = None
    epoch_wall_seconds: list = field(default_factory=list)  # as train_epoch measured them, compile included
    train_loss: float | None = None
    train_acc: float | None = None
    test_images: int | None = None
    stopped_early: bool = False
    accuracy_curve: list = field(default_factory=list)  # [seconds since training began, test_acc]
    counts: dict | None = None  # device work of a step (eager configurations); room for the trainer's own figures


def _free_memory(device: torch.device):
    import torch._dynamo

    torch._dynamo.reset()  # compiled graphs of the previous configuration, and its recompile count
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _timed_evaluate(model, images, labels, device, cfg) -> tuple[float, float]:
    started = time.perf_counter()
    _, accuracy = evaluate(model, images, labels, device, cfg)  # .item() inside: synchronized
    return accuracy, time.perf_counter() - started


def _accuracy_note(row: TrainingRow, settings: TrainingSettings, data: BenchData) -> str:
    if not data.accuracy_valid:
        return "meaningless: synthetic images"
    on = f"on {row.test_images:,} test images"
    if row.epochs_run == settings.epochs and not row.stopped_early and not settings.train_subset:
        return f"after {row.epochs_run} full epoch(s), {on}"
    fraction = row.steps_run / row.steps_per_full_epoch
    return (f"a short row: after {row.steps_run} steps ({fraction:.2g} of an epoch), {on}; "
            f"not the recipe's accuracy")


def run_config(config: TrainingConfig, settings: TrainingSettings, device: torch.device, data: BenchData,
               compile_mode: str | None, stop_at: float, host_work: dict | None, log) -> tuple[TrainingRow, dict]:
    """One configuration: train, evaluate, count, within its share of the budget (until stop_at):
    the host work (measured here when host_work is None) before training, whose epochs stop at
    stop_at; after training only the counting, when time is left. Returns the row and the
    per-epoch host work."""
    row = TrainingRow(name=config.name, key=config.key, model=config.model, backend=config.backend,
                      precision=config.precision, compile=config.compile, cuda_graphs=config.cuda_graphs,
                      status="ok", owner=config.owner, compile_mode=compile_mode,
                      accuracy_valid=data.accuracy_valid)
    _free_memory(device)
    started = time.perf_counter()
    trainer = make_trainer(config, settings, device, data, compile_mode)
    test_images, test_labels = trainer.test_set.images, trainer.test_set.labels
    if settings.test_subset:
        test_images, test_labels = test_images[:settings.test_subset], test_labels[:settings.test_subset]
    inner_loader = trainer.loader
    loader = TimedLoader(inner_loader, device)
    trainer.loader = loader
    full_steps = len(data.images.train_labels) // settings.batch_size
    row.steps_per_full_epoch, row.test_images = full_steps, len(test_labels)
    row.setup_seconds = time.perf_counter() - started
    if host_work is None:  # before the training, whose epochs stop in time for the share
        host_work = measure_host_work(settings.model, device, config.precision)

    # Accuracy before any training: where the accuracy-against-time curve starts.
    untrained_accuracy, first_eval = _timed_evaluate(trainer.model, test_images, test_labels, device, trainer.cfg)
    row.accuracy_curve.append([0.0, untrained_accuracy])
    train_started = time.perf_counter()
    for epoch in range(settings.epochs):
        if epoch > 0 and time.perf_counter() > stop_at:
            row.stopped_early = True  # an epoch that would stop at once would train on nothing
            break
        loader.stop_at = stop_at
        loader.min_steps = settings.warmup_steps + settings.min_measured_steps
        metrics = trainer.train_epoch(epoch)
        row.epoch_wall_seconds.append(metrics["epoch_seconds"])
        row.train_loss, row.train_acc = metrics["train_loss"], metrics["train_acc"]
        # After the first, an evaluation runs warm: the last one's time is the steady one.
        accuracy, steady_eval = _timed_evaluate(trainer.model, test_images, test_labels, device, trainer.cfg)
        row.test_acc = accuracy
        row.accuracy_curve.append([time.perf_counter() - train_started, accuracy])
        row.epochs_run = epoch + 1
        log(f"    epoch {epoch + 1}: {len(loader.asks)} steps so far, train loss {metrics['train_loss']:.3f}, "
            f"test acc {accuracy:.2%}" + ("" if data.accuracy_valid else " (synthetic images: meaningless)"))
        if loader.stopped_early:
            row.stopped_early = True
            break
    if device.type == "cuda":
        row.peak_memory = torch.cuda.max_memory_allocated(device)
    else:
        row.peak_memory_note = "torch.cuda.max_memory_allocated needs CUDA; not measured on the CPU"

    steps, waits = loader.step_times()
    row.steps_run = len(steps)
    measured = slice(settings.warmup_steps, None) if len(steps) > settings.warmup_steps else slice(None)
    steady_steps, steady_waits = steps[measured], waits[measured]
    row.measured_steps = len(steady_steps)
    step_seconds = sum(steady_steps) / len(steady_steps)
    row.step_ms = step_seconds * 1e3
    row.images_per_second = settings.batch_size / step_seconds
    row.epoch_seconds = step_seconds * full_steps
    row.data_wait_share = sum(steady_waits) / sum(steady_steps)
    # Evaluation time grows with the number of test images: scale to the full test set.
    row.eval_seconds = steady_eval * len(data.images.test_labels) / len(test_labels)
    trained_seconds = sum(row.epoch_wall_seconds)
    # One-time costs: compile and warm-up (the epochs' wall time beyond their steps at the
    # steady rate), and the first evaluation's extra time (cuDNN heuristics, allocator growth).
    row.overhead_seconds = (max(0.0, trained_seconds - step_seconds * len(steps))
                            + max(0.0, first_eval - steady_eval))
    row.accuracy_note = _accuracy_note(row, settings, data)
    row.host_work_seconds = host_seconds_per_epoch(host_work, row.epoch_seconds + row.eval_seconds)
    row.projected_200_epoch_seconds = row.overhead_seconds + RECIPE_EPOCHS * (
        row.epoch_seconds + row.eval_seconds + row.host_work_seconds)
    # Eager steps only: a compiled or graph-replayed step launches what the dispatcher does not see.
    if compile_mode is None and not config.cuda_graphs and settings.count_steps and time.perf_counter() >= stop_at:
        row.counts = {"error": COUNT_TRIMMED}
        log(f"    device work {COUNT_TRIMMED}")
    elif compile_mode is None and not config.cuda_graphs and settings.count_steps:
        try:
            if settings.count_model is None:
                row.counts = count_device_work(trainer, inner_loader, settings.count_steps, row.epochs_run - 1,
                                               inner_loader, settings.batch_size)
            else:
                count_settings = replace(settings, model=settings.count_model,
                                         batch_size=settings.count_batch_size or settings.batch_size)
                counted = make_trainer(config, count_settings, device, data, None)
                row.counts = count_device_work(counted, counted.loader, settings.count_steps, 0, inner_loader,
                                               settings.batch_size)
                row.counts["note"] += (f"; the step counted on a fresh model ({_describe_model(settings.count_model)},"
                                       f" batch {count_settings.batch_size}), since launches per step grow with the "
                                       "depth")
            row.counts["model"] = dict(settings.count_model or settings.model)
        except Exception as error:  # the counter is a measuring aid: its failure is not the trainer's
            row.counts = {"error": f"not counted: {describe_error(error)}"}
            log(f"    device work not counted: {describe_error(error)}")
    del trainer, loader, inner_loader
    _free_memory(device)
    row.wall_seconds = time.perf_counter() - started
    return row, host_work


def _describe_model(model: dict) -> str:
    return (f"depth {model['depth']}, dim {model['dim']}, {model['heads']} heads, MLP {model['mlp_dim']}, "
            f"patch {model['patch_size']}")


def not_run_row(config: TrainingConfig, reason: str, status: str = "skipped", compile_mode: str | None = None,
                accuracy_valid: bool = True) -> TrainingRow:
    return TrainingRow(name=config.name, key=config.key, model=config.model, backend=config.backend,
                       precision=config.precision, compile=config.compile, cuda_graphs=config.cuda_graphs,
                       status=status, owner=config.owner, compile_mode=compile_mode, skipped_reason=reason,
                       accuracy_valid=accuracy_valid)


# ------------------------------------------------------------------------------- the phase

# Guesses of what an eager configuration takes at the least (set-up, warm-up, the minimum
# steps, two evaluations, the host-work timing, the counted steps), in seconds, by device
# type and backend; replaced by the cheapest one of the backend measured. Our kernels through
# the Triton interpreter take about a second per step of the --quick model, and several for each
# counted step at the full depth. A compiled
# configuration adds its compile (bench/compiling.py).
EAGER_COST_GUESS = {("cuda", "torch"): 20.0, ("cuda", "triton"): 20.0, ("cpu", "torch"): 5.0, ("cpu", "triton"): 30.0}


def minimum_seconds(configs: list[TrainingConfig], device: torch.device, policy: CompilePolicy) -> float:
    """What the configurations that can run here take at the least, from the guesses: the time
    the phases before training must leave it."""
    total = 0.0
    for config in configs:
        if unavailable_reason(config, device, policy):
            continue
        total += EAGER_COST_GUESS[(device.type, config.backend)]
        if config.compile:
            total += policy.estimate("training", policy.candidates("training")[0])[0]
    return total


def run_training(settings: TrainingSettings, configs: list[TrainingConfig], device: torch.device, data: BenchData,
                 policy: CompilePolicy, budget, deadline: float, log, on_row=lambda rows: None) -> dict:
    """Every configuration in order, each with an equal share of what is left; on_row(rows) after
    each one, so the caller can write its results. Returns {"rows": [...], "host_work": {...}}."""
    rows: dict[TrainingConfig, TrainingRow] = {}
    runnable = []
    for config in configs:
        reason = unavailable_reason(config, device, policy)
        if reason:
            rows[config] = not_run_row(config, reason, accuracy_valid=data.accuracy_valid)
            log(f"  {config.name:<28} skipped: {reason}")
        else:
            runnable.append(config)

    eager_cost = {backend: EAGER_COST_GUESS[(device.type, backend)] for backend in ("torch", "triton")}
    eager_measured = {backend: [] for backend in eager_cost}
    host_work = None

    def ordered():
        return [asdict(rows[c]) for c in configs if c in rows]

    for index, config in enumerate(runnable):
        left = deadline - time.perf_counter()
        least = eager_cost[config.backend]
        mode = None
        if config.compile:
            mode, why = policy.choose("training", left - least)
        else:
            source = "measured" if eager_measured[config.backend] else "a guess"
            why = "" if left >= least else (f"trimmed by the budget: {max(0.0, left):.0f}s of the training budget "
                                            f"left; an eager {config.backend}-backend configuration takes "
                                            f"~{least:.0f}s ({source})")
        if why:
            budget.trim(f"training {config.name}", why)
            rows[config] = not_run_row(config, why, accuracy_valid=data.accuracy_valid)
            log(f"  {config.name:<28} {why}")
            on_row(ordered())
            continue
        # An equal share of what is left for each configuration still to run; time one
        # leaves unused goes to the next.
        stop_at = time.perf_counter() + left / (len(runnable) - index)
        log(f"  {config.name:<28} training{f' (torch.compile mode {mode})' if mode else ''} "
            f"(until {stop_at - budget.start:.0f}s into the run at the latest)")
        started = time.perf_counter()
        try:
            row, host_work = run_config(config, settings, device, data, mode, stop_at, host_work, log)
        except Exception as error:  # a crash of one configuration is a result, not the end of the run
            row = not_run_row(config, f"crashed: {describe_error(error)}", "failed", mode, data.accuracy_valid)
            log(f"  {config.name:<28} FAILED ({config.owner}): {describe_error(error)}")
            del error  # its traceback holds the trainer: let _free_memory release it
            _free_memory(device)
        else:
            seconds = time.perf_counter() - started
            if mode:
                policy.record("training", mode, seconds)
            else:
                eager_measured[config.backend].append(seconds)
                eager_cost[config.backend] = min(eager_measured[config.backend])
            accuracy = f"{row.test_acc:.2%}" if data.accuracy_valid else "n/a (synthetic)"
            log(f"  {config.name:<28} {row.images_per_second:,.0f} img/s, {row.step_ms:.2f} ms/step, epoch "
                f"{row.epoch_seconds:.1f}s, test acc {accuracy}, data wait {row.data_wait_share:.0%}, 200 epochs "
                f"~{row.projected_200_epoch_seconds / 60:.0f} min ({seconds:.0f}s)")
            if row.counts and row.counts.get("error") == COUNT_TRIMMED:
                budget.trim(f"training {config.name}: device work counted", COUNT_TRIMMED)
            if row.stopped_early:
                budget.trim(f"training {config.name}",
                            f"stopped after {row.steps_run} steps ({row.epochs_run} epoch(s) begun of "
                            f"{settings.epochs}): its share of the budget was spent")
        rows[config] = row
        on_row(ordered())
    return {"rows": ordered(), "host_work": host_work}


def settings_dict(settings: TrainingSettings) -> dict:
    return asdict(settings)


# --------------------------------------------------------------------------- timm's ViT-S/16 at 224
# A training step of timm's own ViT-S/16 at ImageNet's 224 pixels (197 tokens, 6 heads of 64),
# three ways in one run: its blocks on our kernels (vit.fuse), timm's forward (SDPA attention),
# and torch.compile of timm's forward. Synthetic images: the step's time does not depend on them.

TIMM_STEP_MODEL = "vit_small_patch16_224"
TIMM_STEP_BATCH = 64  # timm's usual per-GPU batch for ViT-S; fits an H100 in bf16 with room
TIMM_STEP_WARMUP, TIMM_STEP_MEASURED = 5, 20  # steps before timing (compiles, allocator), steps timed
# The smoke (CPU, --quick): one block 64 wide (4 heads of 16) at 32 pixels (4 patches), one image,
# fp32 (the interpreter's): ViT-S's 384 columns take a minute a step through the interpreter.
TIMM_SMOKE_MODEL = dict(depth=1, img_size=32, embed_dim=64, num_heads=4)
TIMM_SMOKE_BATCH, TIMM_SMOKE_STEPS = 1, 1


def timm_step_rows(device: torch.device, quick: bool, policy: CompilePolicy, log) -> list[dict]:
    """ms per training step (forward, backward, AdamW) of timm's ViT-S/16, fused, timm's own and
    compiled; bf16 autocast on a GPU, the tiny smoke in fp32 on the CPU or with --quick."""
    import timm

    from vit.timm_fuse import fuse

    overrides, batch, warmup, measured = ((TIMM_SMOKE_MODEL, TIMM_SMOKE_BATCH, TIMM_SMOKE_STEPS, TIMM_SMOKE_STEPS)
                                          if quick else ({}, TIMM_STEP_BATCH, TIMM_STEP_WARMUP, TIMM_STEP_MEASURED))
    image_size = overrides.get("img_size", 224)
    precision = "bf16" if device.type == "cuda" else "fp32"
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator).to(device)
    labels = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    rows = []
    for way in ("fused", "timm", "timm + compile"):
        row = dict(name=f"timm {TIMM_STEP_MODEL} {way}", model=TIMM_STEP_MODEL, way=way, image_size=image_size,
                   batch=batch, overrides=overrides, precision=precision, status="ok", ms_per_step=None,
                   images_per_second=None, peak_memory_gb=None, error=None)
        rows.append(row)
        reason = (get_backend("triton").unavailable_reason(device) if way == "fused"
                  else policy.skip_reason if way == "timm + compile" else None)
        if reason:
            row.update(status="skipped", error=reason)
            log(f"  {row['name']}: skipped ({reason})")
            continue
        _free_memory(device)
        try:
            torch.manual_seed(0)
            model = timm.create_model(TIMM_STEP_MODEL, pretrained=False, **overrides).to(device).train()
            if way == "fused":
                fuse(model, strict=True)
            step_model = torch.compile(model) if way == "timm + compile" else model
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

            def step():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss = torch.nn.functional.cross_entropy(step_model(images).float(), labels)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            for _ in range(warmup):
                step()
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            for _ in range(measured):
                step()
            synchronize(device)
            seconds = (time.perf_counter() - started) / measured
            row.update(ms_per_step=seconds * 1e3, images_per_second=batch / seconds,
                       peak_memory_gb=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None)
            log(f"  {row['name']}: {seconds * 1e3:.1f} ms/step, {batch / seconds:.0f} img/s")
        except Exception as error:  # one way failing leaves the others' numbers
            row.update(status="failed", error=describe_error(error))
            log(f"  {row['name']}: failed ({row['error']})")
        finally:
            model = step_model = optimizer = None
    return rows
