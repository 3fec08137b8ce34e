"""The training loop: recipe, schedule, checkpoints, metrics and the run directory.

A run directory holds config.json, metrics.csv (one row per epoch), curves.png,
last.pt and best.pt. Everything is written atomically (temporary file, then rename),
so killing a run at any moment leaves the last complete epoch resumable.
"""
import csv
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vit import data as cifar
from vit import distributed
from vit.backends import get_backend
from vit.environment import atomic_write, device_name, versions
from vit.model import ViT, ViTConfig, count_parameters
from vit.plots import plot_curves

METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds", "images_per_second"]
PROGRESS_EVERY = 25  # steps between progress-bar refreshes; each one waits for the GPU


@dataclass
class TrainConfig:
    """The recipe and the run's settings; defaults are the reference's table."""
    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 5.0
    weight_decay: float = 5e-5
    label_smoothing: float = 0.1
    precision: str = "bf16"  # bf16 | fp16 | fp32; resolved to fp32 on the CPU by resolve_defaults
    device: str = "cuda"
    seed: int = 0
    num_workers: int = min(4, os.cpu_count() or 1)
    train_subset: int | None = None
    augment: str = "gpu"  # gpu: batched on the device; cpu: torchvision per image in DataLoader workers
    compile: bool = False
    data_dir: str = "data"
    out_dir: str | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)


class NonFiniteLoss(RuntimeError):
    pass


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


def make_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    warmup = max(1, round(cfg.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, total, warmup, cfg.lr, cfg.min_lr) / cfg.lr)


# ---------------------------------------------------------------------------- run directory

def save_checkpoint(path: Path, state: dict):
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, device="cpu") -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise RuntimeError(f"{path}: unreadable checkpoint ({type(error).__name__}: {error})") from None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()[1].copy(),
             "numpy_pos": int(np.random.get_state()[2])}
    state["numpy"] = torch.from_numpy(state["numpy"].astype(np.int64))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_metrics(path: Path, rows: list[dict]):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    atomic_write(path, write)


def write_config(run_dir: Path, model_cfg: ViTConfig, train_cfg: TrainConfig, class_names: list[str], device):
    config = {"model": asdict(model_cfg), "train": asdict(train_cfg), "class_names": class_names,
              "versions": versions(), "device": device_name(device), "command": sys.argv}
    atomic_write(run_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))


def read_config(run_dir: Path) -> tuple[ViTConfig, TrainConfig]:
    config = json.loads((Path(run_dir) / "config.json").read_text())
    known = {f.name for f in fields(TrainConfig)}
    return ViTConfig(**config["model"]), TrainConfig(**{k: v for k, v in config["train"].items() if k in known})


# ---------------------------------------------------------------------------- training

def autocast_dtype(cfg: TrainConfig):
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[cfg.precision]


def make_train_loader(cfg: TrainConfig, images, labels, device, rank=0, world_size=1):
    if cfg.augment == "gpu":
        return cifar.GPUTrainLoader(images, labels, cfg.batch_size, cfg.seed, device, rank=rank, world_size=world_size)
    return cifar.CPUTrainLoader(images, labels, cfg.batch_size, cfg.seed, device, cfg.num_workers,
                                rank=rank, world_size=world_size)


@torch.no_grad()
def evaluate(model, images, labels, device, cfg: TrainConfig, batch_size=1000,
             ctx: distributed.Context = distributed.Context()) -> tuple[float, float]:
    """(mean loss with the training criterion, accuracy) over the given test images;
    under torchrun each rank takes a contiguous share and the sums are reduced."""
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
        loss_sum += F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing, reduction="sum")
        correct += (logits.argmax(-1) == y).sum()
    model.train()
    distributed.all_reduce(loss_sum)
    distributed.all_reduce(correct)
    return loss_sum.item() / total, correct.item() / total


class Trainer:
    def __init__(self, model_cfg: ViTConfig, cfg: TrainConfig, run_dir: Path, resume: bool = False, log=print,
                 ctx: distributed.Context = distributed.Context()):
        self.model_cfg, self.cfg, self.run_dir, self.ctx = model_cfg, cfg, Path(run_dir), ctx
        self.log = log if ctx.is_main else (lambda line: None)
        self.device = torch.device(cfg.device)
        seed_everything(cfg.seed)

        self.data = cifar.load_cifar10(cfg.data_dir)
        train_images, train_labels = self.data.train_images, self.data.train_labels
        if cfg.train_subset:
            train_images, train_labels = train_images[:cfg.train_subset], train_labels[:cfg.train_subset]
        self.loader = make_train_loader(cfg, train_images, train_labels, self.device, ctx.rank, ctx.world_size)
        self.test_images = self.data.test_images.to(self.device)
        self.test_labels = self.data.test_labels.to(self.device)

        self.model = ViT(model_cfg).to(self.device)
        self.step_model = self.model
        if ctx.enabled:
            # Gradients averaged over ranks: each rank's loss is the mean over its share of
            # the global batch, so the update equals the single-process one.
            self.step_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            self.step_model = torch.compile(self.step_model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.999),
                                          weight_decay=cfg.weight_decay, fused=self.device.type == "cuda")
        self.scheduler = make_scheduler(self.optimizer, cfg, len(self.loader))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.start_epoch, self.best_acc = 0, 0.0
        self.metrics = []
        if resume:
            self._resume()

    def _resume(self):
        state = load_checkpoint(self.run_dir / "last.pt", self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.start_epoch, self.best_acc = state["epoch"], state["best_acc"]
        # Rows past the checkpoint belong to an epoch whose checkpoint never landed.
        self.metrics = [r for r in read_metrics(self.run_dir / "metrics.csv") if int(r["epoch"]) <= self.start_epoch]

    def checkpoint_state(self, epoch: int) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng_state(),
                "epoch": epoch, "best_acc": self.best_acc, "model_config": asdict(self.model_cfg)}

    def train_epoch(self, epoch: int) -> dict:
        cfg, device, model = self.cfg, self.device, self.step_model
        self.loader.set_epoch(epoch)
        dtype = autocast_dtype(cfg)
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        first_bad_step = torch.full((), -1, device=device, dtype=torch.int64)
        seen = 0
        bar = tqdm(self.loader, total=len(self.loader), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (cfg.progress and self.ctx.is_main), dynamic_ncols=True, file=sys.stderr)
        start = time.perf_counter()
        for step, (images, labels) in enumerate(bar):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(images)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            loss = loss.detach()
            # Kept on the device: reading them every step would stall the GPU.
            loss_sum += loss * len(labels)
            correct += (logits.argmax(-1) == labels).sum()
            first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss),
                                         torch.tensor(step, device=device), first_bad_step)
            seen += len(labels) * self.ctx.world_size
            if step % PROGRESS_EVERY == PROGRESS_EVERY - 1 or step == len(self.loader) - 1:
                # Every rank learns of a bad loss on any rank, so all stop together.
                bad = distributed.all_reduce(first_bad_step.clone(), distributed.dist.ReduceOp.MAX).item()
                if bad >= 0:
                    raise NonFiniteLoss(f"non-finite loss at epoch {epoch + 1}, step {bad + 1}; "
                                        f"stopping. The last good checkpoint is {self.run_dir / 'last.pt'}")
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{correct.item() * self.ctx.world_size / seen:.1%}",
                                lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                                img_s=f"{seen / (time.perf_counter() - start):,.0f}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        bar.close()
        distributed.all_reduce(loss_sum)
        distributed.all_reduce(correct)
        return {"train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen,
                "epoch_seconds": seconds, "images_per_second": seen / seconds}

    def fit(self) -> dict:
        cfg = self.cfg
        for epoch in range(self.start_epoch, cfg.epochs):
            row = self.train_epoch(epoch)
            test_loss, test_acc = evaluate(self.model, self.test_images, self.test_labels, self.device, cfg, ctx=self.ctx)
            row = {"epoch": epoch + 1, **row, "test_loss": test_loss, "test_acc": test_acc,
                   "lr": self.optimizer.param_groups[0]["lr"]}
            self.metrics.append({k: row[k] for k in METRIC_COLUMNS})
            improved = test_acc > self.best_acc
            self.best_acc = max(self.best_acc, test_acc)
            if self.ctx.is_main:
                state = self.checkpoint_state(epoch + 1)
                if improved:
                    save_checkpoint(self.run_dir / "best.pt", state)
                save_checkpoint(self.run_dir / "last.pt", state)
                write_metrics(self.run_dir / "metrics.csv", self.metrics)
                plot_curves(self.metrics, self.run_dir / "curves.png")
            self.log(f"epoch {epoch + 1:>3}/{cfg.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.2%}  "
                     f"test loss {test_loss:.4f} acc {test_acc:.2%}  lr {row['lr']:.2e}  "
                     f"{row['epoch_seconds']:.1f}s  {row['images_per_second']:,.0f} img/s"
                     + ("  *best" if improved else ""))
        return {"best_acc": self.best_acc, "epochs": cfg.epochs}

    def finish(self):
        """Evaluate the best epoch's weights in full: confusion matrix, per-class accuracy,
        the most confident mistakes, next to the checkpoints."""
        from vit.evaluate import write_report

        if not self.ctx.is_main:
            return
        self.model.load_state_dict(load_checkpoint(self.run_dir / "best.pt", self.device)["model"])
        report = write_report(self.model, self.data.test_images, self.data.test_labels, self.data.class_names,
                              self.run_dir, self.device)
        per_class = "  ".join(f"{name} {acc:.1%}" for name, acc in report["per_class_accuracy"].items())
        self.log(f"best epoch per class: {per_class}")

    def describe(self) -> str:
        backend = get_backend(self.model_cfg.backend)
        return (f"ViT with {count_parameters(self.model):,} parameters; backend {backend.name} ({backend.description}); "
                f"device {device_name(self.device)}; precision {self.cfg.precision}; "
                f"{'torch.compile; ' if self.cfg.compile else ''}augmentation on the {self.cfg.augment.upper()}; "
                f"{len(self.loader.images):,} train images, {len(self.loader)} steps of {self.cfg.batch_size} per epoch"
                + (f"; {self.ctx.world_size} processes, {self.cfg.batch_size // self.ctx.world_size} images each per step"
                   if self.ctx.enabled else ""))
