"""End-to-end training benchmarks on real CIFAR-10 with the real recipe.

Every configuration is trained by the project's own loop (vit.trainer.Trainer.train_epoch:
the same data pipeline, augmentation, optimizer, schedule and autocast) and evaluated
with vit.trainer.evaluate. timm's VisionTransformer, the external peer, goes through the
same loop: the bench hands the Trainer to_timm(our model) (same configuration, same initial
weights) with an optimizer built the same way. The trainer itself is not changed.

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
- test accuracy after the run (and before training and after each epoch, against
  wall-clock seconds), so a fast wrong kernel shows. Evaluation runs the uncompiled model with the same weights: a
  compiled model would recompile for eval mode, which costs budget and adds nothing the
  compiled training steps have not already exercised.
- peak GPU memory (torch.cuda.max_memory_allocated) over set-up, training and evaluation.
- the projection of the full recipe (200 epochs): one-time overhead (compile, warm-up)
  plus 200 x (steady epoch + steady evaluation of the full test set).
"""
import gc
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields

import torch

from bench.measure import describe_error
from vit.backends import backend_names, get_backend
from vit.model import ViTConfig
from vit.data import load_cifar10
from vit.model import ViT
from vit.trainer import EvalSet, TrainConfig, Trainer, evaluate, make_optimizer, make_train_loader, seed_everything

RECIPE_EPOCHS = 200
CUDA_GRAPH_FIELD = "cuda_graphs"  # the TrainConfig switch the bench would use if the trainer had one

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


def training_configs(device: torch.device) -> list[TrainingConfig]:
    """In priority order: what a budget cut drops first comes last."""
    # The Triton interpreter computes bf16 matmuls wrongly, so on the CPU our kernels train in fp32.
    ours = "bf16" if device.type == "cuda" else "fp32"
    eager = [TrainingConfig("ours", "torch", "bf16", False), TrainingConfig("ours", "triton", ours, False),
             TrainingConfig("timm", "torch", "bf16", False), TrainingConfig("ours", "torch", "fp32", False)]
    compiled = [TrainingConfig("ours", "triton", ours, True), TrainingConfig("ours", "torch", "bf16", True),
                TrainingConfig("timm", "torch", "bf16", True), TrainingConfig("ours", "torch", "fp32", True)]
    graphs = [TrainingConfig("ours", "triton", ours, False, cuda_graphs=True),
              TrainingConfig("ours", "torch", "bf16", False, cuda_graphs=True)]
    return eager + compiled + graphs


@dataclass
class TrainingSettings:
    model: dict  # ViTConfig fields except backend
    epochs: int
    batch_size: int
    data_dir: str
    train_subset: int | None
    test_subset: int | None
    warmup_steps: int  # steps excluded from the steady state
    min_measured_steps: int  # steady steps a configuration runs even past its time slice
    augment: str = "gpu"
    num_workers: int = 4
    data_note: str = ""


def unavailable_reason(config: TrainingConfig, device: torch.device, compile_skip_reason: str | None) -> str | None:
    if config.cuda_graphs:
        if CUDA_GRAPH_FIELD not in {f.name for f in fields(TrainConfig)}:
            return "trainer has no CUDA-graph mode"
        if device.type != "cuda":
            return "CUDA graphs need a CUDA device"
    if config.compile and compile_skip_reason:
        return compile_skip_reason
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
                close()  # stops DataLoader workers when the epoch is cut short

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


# --------------------------------------------------------------------------- one configuration

def build_parts(config: TrainingConfig, model_cfg: ViTConfig, train_cfg: TrainConfig, device: torch.device):
    """(model, train loader, test set, optimizer, full data set size): our ViT, or timm's
    VisionTransformer of the same configuration and initial weights."""
    seed_everything(train_cfg.seed)
    data = load_cifar10(train_cfg.data_dir)
    images, labels = data.train_images, data.train_labels
    if train_cfg.train_subset:
        images, labels = images[:train_cfg.train_subset], labels[:train_cfg.train_subset]
    loader = make_train_loader(train_cfg, images, labels, device)
    test_set = EvalSet(data.test_images.to(device), data.test_labels.to(device), data.class_names)
    model = ViT(model_cfg).to(device)
    if config.model == "timm":
        from vit.timm_interop import to_timm
        model = to_timm(model).train()
    return model, loader, test_set, make_optimizer(model.parameters(), train_cfg, device), len(data.train_images)


@dataclass
class TrainingRow:
    name: str
    model: str
    backend: str
    precision: str
    compile: bool
    cuda_graphs: bool
    status: str  # "ok" | "skipped" (cannot run here, or trimmed) | "failed" (crashed; the reason says how)
    skipped_reason: str | None = None
    images_per_second: float | None = None
    epoch_seconds: float | None = None  # steady state, a full epoch of the data set
    test_acc: float | None = None
    data_wait_share: float | None = None
    peak_memory: int | None = None  # bytes, torch.cuda.max_memory_allocated
    peak_memory_note: str | None = None
    projected_200_epoch_seconds: float | None = None
    eval_seconds: float | None = None  # steady, the full test set
    overhead_seconds: float | None = None  # one-time: compile, warm-up, first evaluation
    setup_seconds: float | None = None
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


def run_config(config: TrainingConfig, settings: TrainingSettings, device: torch.device,
               stop_at: float, log) -> TrainingRow:
    row = TrainingRow(name=config.name, model=config.model, backend=config.backend, precision=config.precision,
                      compile=config.compile, cuda_graphs=config.cuda_graphs, status="ok")
    _free_memory(device)
    train_cfg = TrainConfig(
        epochs=settings.epochs, batch_size=settings.batch_size, precision=config.precision, device=str(device),
        compile=config.compile, data_dir=settings.data_dir,
        train_subset=settings.train_subset, augment=settings.augment, num_workers=settings.num_workers,
        progress=False, seed=0)
    if config.cuda_graphs:
        setattr(train_cfg, CUDA_GRAPH_FIELD, True)
    model_cfg = ViTConfig(**settings.model, backend=config.backend)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-run-") as run_dir:  # train_epoch writes nothing there
        model, inner_loader, test_set, optimizer, full_images = build_parts(config, model_cfg, train_cfg, device)
        loader = TimedLoader(inner_loader, device)
        trainer = Trainer(model, loader, test_set, optimizer, train_cfg, run_dir, log=lambda line: None)
        test_images, test_labels = test_set.images, test_set.labels
        if settings.test_subset:
            test_images, test_labels = test_images[:settings.test_subset], test_labels[:settings.test_subset]
        full_steps = full_images // settings.batch_size
        row.steps_per_full_epoch, row.test_images = full_steps, len(test_labels)
        row.setup_seconds = time.perf_counter() - started

        # Accuracy before any training: where the accuracy-against-time curve starts.
        untrained_accuracy, first_eval = _timed_evaluate(trainer.model, test_images, test_labels, device, train_cfg)
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
            accuracy, _ = _timed_evaluate(trainer.model, test_images, test_labels, device, train_cfg)
            row.test_acc = accuracy
            row.accuracy_curve.append([time.perf_counter() - train_started, accuracy])
            row.epochs_run = epoch + 1
            log(f"    epoch {epoch + 1}: {len(loader.asks)} steps so far, train loss {metrics['train_loss']:.3f}, "
                f"test acc {accuracy:.2%}")
            if loader.stopped_early:
                row.stopped_early = True
                break
        # Timed once more when everything is warm: the first evaluation carries one-time costs
        # (cuDNN heuristics, allocator growth), counted in the overhead instead.
        _, steady_eval = _timed_evaluate(trainer.model, test_images, test_labels, device, train_cfg)
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
        row.images_per_second = settings.batch_size / step_seconds
        row.epoch_seconds = step_seconds * full_steps
        row.data_wait_share = sum(steady_waits) / sum(steady_steps)
        # Evaluation time grows with the number of test images: scale to the full test set.
        row.eval_seconds = steady_eval * len(test_set.labels) / len(test_labels)
        trained_seconds = sum(row.epoch_wall_seconds)
        # One-time costs: compile and warm-up (the epochs' wall time beyond their steps at the
        # steady rate), and the first evaluation's extra time.
        row.overhead_seconds = (max(0.0, trained_seconds - step_seconds * len(steps))
                                + max(0.0, first_eval - steady_eval))
        row.projected_200_epoch_seconds = row.overhead_seconds + RECIPE_EPOCHS * (row.epoch_seconds + row.eval_seconds)
        del trainer, loader, inner_loader, model, optimizer, test_set
    _free_memory(device)
    return row


def skipped_row(config: TrainingConfig, reason: str, status: str = "skipped") -> TrainingRow:
    return TrainingRow(name=config.name, model=config.model, backend=config.backend, precision=config.precision,
                       compile=config.compile, cuda_graphs=config.cuda_graphs, status=status, skipped_reason=reason)


# ------------------------------------------------------------------------------- the phase

# Guesses of what one configuration takes at the least (set-up, warm-up, the minimum steps,
# two evaluations; for "compiled", a compile of the model's forward and backward), in
# seconds, by (device type, compiled). Used until the run has measured a configuration
# of the kind; a configuration is trimmed when even that would not fit in what is left.
INITIAL_COST_ESTIMATE = {("cuda", False): 20.0, ("cuda", True): 120.0, ("cpu", False): 5.0, ("cpu", True): 180.0}


def run_training(settings: TrainingSettings, device: torch.device, budget, deadline: float,
                 compile_skip_reason: str | None, log) -> list[TrainingRow]:
    configs = training_configs(device)
    runnable, rows = [], {}
    for config in configs:
        reason = unavailable_reason(config, device, compile_skip_reason)
        if reason:
            rows[config] = skipped_row(config, reason)
            log(f"  {config.name:<28} skipped: {reason}")
        else:
            runnable.append(config)

    cost = {compiled: INITIAL_COST_ESTIMATE[(device.type, compiled)] for compiled in (False, True)}
    measured_cost = {False: [], True: []}
    for index, config in enumerate(runnable):
        left = deadline - time.perf_counter()
        if left < cost[config.compile]:
            why = (f"{left:.0f}s of the training budget left; {'a compiled' if config.compile else 'an eager'} "
                   f"configuration took ~{cost[config.compile]:.0f}s at the least")
            budget.trim(f"training {config.name}", why)
            rows[config] = skipped_row(config, f"trimmed by --budget-seconds: {why}")
            log(f"  {config.name:<28} trimmed: {why}")
            continue
        # An equal share of what is left for each configuration still to run; time one
        # leaves unused goes to the next.
        stop_at = time.perf_counter() + left / (len(runnable) - index)
        log(f"  {config.name:<28} training (until {stop_at - budget.start:.0f}s into the run at the latest)")
        started = time.perf_counter()
        try:
            row = run_config(config, settings, device, stop_at, log)
        except Exception as error:  # a crash of one configuration is a result, not the end of the run
            row = skipped_row(config, describe_error(error), status="failed")
            log(f"  {config.name:<28} FAILED: {describe_error(error)}")
            del error  # its traceback holds the trainer: let _free_memory release it
            _free_memory(device)
        else:
            # The cheapest configuration of the kind seen so far: a budget cut should only drop
            # what cannot fit even then (the slow ones stop at their share anyway).
            measured_cost[config.compile].append(time.perf_counter() - started)
            cost[config.compile] = min(measured_cost[config.compile])
            log(f"  {config.name:<28} {row.images_per_second:,.0f} img/s, epoch {row.epoch_seconds:.1f}s, "
                f"test acc {row.test_acc:.2%}, data wait {row.data_wait_share:.0%}, "
                f"200 epochs ~{row.projected_200_epoch_seconds / 60:.0f} min ({time.perf_counter() - started:.0f}s)")
            if row.stopped_early:
                budget.trim(f"training {config.name}",
                            f"stopped after {row.steps_run} steps ({row.epochs_run} epoch(s) begun of "
                            f"{settings.epochs}): its share of the budget was spent")
        rows[config] = row
    return [rows[config] for config in configs]


def settings_dict(settings: TrainingSettings) -> dict:
    return asdict(settings)
