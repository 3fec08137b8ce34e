"""Throughput of the batched train augmentation (vit/augment.py) on its own.

What the train loader does per step, timed alone: draw every sample's crop, flip and
AutoAugment parameters, apply them to a batch of uint8 images already on the device, and
normalize. The work does not depend on pixel values (every op runs on every image and is
masked), so random images give the same time as CIFAR-10's.

The issue's targets: at least 1,000,000 images/s at batch 512, and a batch of 128 costing
under 10% of a triton-backend training step (the report divides by the step time measured
in the same run's training phase).
"""
from dataclasses import dataclass

import torch

from bench.measure import describe_error, time_fn
from vit import augment

BATCH_SIZES = (128, 512)
QUICK_BATCH_SIZES = (8, 32)
TARGET_IMAGES_PER_SECOND = 1_000_000  # at batch 512, on an H100
TARGET_BATCH_SIZE = 512
TARGET_STEP_SHARE = 0.10  # of a triton-backend step, at batch 128


@dataclass
class AugmentationRow:
    batch_size: int
    status: str  # "ok" | "failed"
    error: str | None = None
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    images_per_second: float | None = None


def augment_batch(images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return augment.normalize(augment.gpu_train_augment(images, indices, seed=0, epoch=0))


def batch_sizes(quick: bool, training_batch_size: int) -> list[int]:
    """The standard sizes plus the training phase's, so the step share can be computed."""
    return sorted({*(QUICK_BATCH_SIZES if quick else BATCH_SIZES), training_batch_size})


def run_augmentation(device: torch.device, sizes: list[int], quick: bool, log) -> list[AugmentationRow]:
    rows = []
    generator = torch.Generator(device).manual_seed(0)
    for batch_size in sizes:
        row = AugmentationRow(batch_size, "ok")
        try:
            images = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, device=device,
                                   generator=generator)
            indices = torch.arange(batch_size, device=device)
            timing = time_fn(lambda: augment_batch(images, indices), device, quick)
            row.median_ms, row.p20_ms, row.p80_ms = timing.median_ms, timing.p20_ms, timing.p80_ms
            row.images_per_second = batch_size / (timing.median_ms / 1e3)
            log(f"  batch {batch_size}: {timing.median_ms:.3f} ms, {row.images_per_second:,.0f} images/s")
        except Exception as error:  # one size failing still reports the others
            row.status, row.error = "failed", describe_error(error)
            log(f"  batch {batch_size}: failed: {row.error}")
        rows.append(row)
    return rows


def step_share(augmentation: list[dict], training: list[dict], batch_size: int) -> tuple[float, str] | None:
    """The augmentation of one batch as a share of a triton-backend training step at the same
    batch size (eager bf16 first, else any triton row), with that row's name."""
    timed = {r["batch_size"]: r for r in augmentation if r["status"] == "ok"}
    if batch_size not in timed:
        return None
    triton_rows = [r for r in training if r["status"] == "ok" and r["model"] == "ours" and r["backend"] == "triton"]
    triton_rows.sort(key=lambda r: (r["compile"], r["cuda_graphs"]))
    if not triton_rows:
        return None
    step_ms = 1e3 * batch_size / triton_rows[0]["images_per_second"]
    return timed[batch_size]["median_ms"] / step_ms, triton_rows[0]["name"]
