"""The images the training rows and the augmentation phase use, and what every output says
about them.

- `cifar10` (the default): the real CIFAR-10, read from --data-dir or the usual places. The
  bench never downloads it unless asked to (--download): a benchmark that silently spends
  minutes on a download, or hangs without a network, times the wrong thing.
- `synthetic`: random uint8 images of CIFAR-10's shape and sizes (50,000 training and 10,000
  test images, labels uniform over the 10 classes), made in memory. Every op of the training
  step and of the augmentation runs on every image whatever its pixels, so throughput is
  valid; test accuracy is not (chance, about 10%), and every output says so.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.measure import REPO
from vit.data import CIFAR10, FOLDER, TEST_FILE, DataError, load_cifar10

KINDS = ("cifar10", "synthetic")
TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000  # CIFAR-10's sizes
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SYNTHETIC_NOTE = "SYNTHETIC random images of CIFAR-10's shape: throughput valid, test accuracy meaningless"


@dataclass
class BenchData:
    kind: str  # "cifar10" | "synthetic"
    source: str  # where the images come from, for the record
    note: str  # one line that every output carries
    accuracy_valid: bool
    images: CIFAR10

    def describe(self) -> dict:
        return {"kind": self.kind, "source": self.source, "note": self.note, "accuracy_valid": self.accuracy_valid,
                "train_images": len(self.images.train_labels), "test_images": len(self.images.test_labels)}


def default_locations() -> list[Path]:
    return [Path("data"), REPO / "data", REPO.parent / "shared" / "data"]


def find_cifar10() -> Path | None:
    for candidate in default_locations():
        if (candidate / FOLDER / TEST_FILE).exists() or (candidate / TEST_FILE).exists():
            return candidate
    return None


def synthetic_cifar10(train_images: int = TRAIN_IMAGES, test_images: int = TEST_IMAGES, seed: int = 0) -> CIFAR10:
    generator = torch.Generator().manual_seed(seed)

    def images(n):
        return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)

    def labels(n):
        return torch.randint(0, 10, (n,), dtype=torch.int64, generator=generator)

    return CIFAR10(images(train_images), labels(train_images), images(test_images), labels(test_images),
                   list(CLASS_NAMES))


def load(kind: str, data_dir: str | None, download: bool) -> BenchData:
    """The data set for this run. DataError (a one-line message saying what to pass) when the
    real CIFAR-10 is not where it was looked for and no download was asked for."""
    if kind == "synthetic":
        images = synthetic_cifar10()
        return BenchData("synthetic", f"random uint8 images made in memory (seed 0), {TRAIN_IMAGES:,} train and "
                                      f"{TEST_IMAGES:,} test", SYNTHETIC_NOTE, False, images)
    if data_dir is None:
        found = find_cifar10()
        if found is None and not download:
            raise DataError(
                "CIFAR-10 not found in " + ", ".join(str(p) for p in default_locations())
                + "; pass --data-dir DIR, --download to fetch it into ./data, or --data synthetic to time with "
                  "random images (throughput only)")
        data_dir = found or Path("data")
    images = load_cifar10(data_dir, download=download)
    folder = Path(data_dir).resolve()
    train, test = len(images.train_labels), len(images.test_labels)
    note = f"CIFAR-10 read from {folder}"
    if (train, test) != (TRAIN_IMAGES, TEST_IMAGES):
        note += f" (a partial set: {train:,} training and {test:,} test images, not CIFAR-10's {TRAIN_IMAGES:,} and {TEST_IMAGES:,})"
    return BenchData("cifar10", str(folder), note, True, images)
