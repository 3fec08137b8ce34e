"""CIFAR-10 from the official "python version" files, and the batch iterators that feed training.

The whole data set is read once into uint8 tensors [N, 3, 32, 32] (180 MB). Training
batches come from TrainLoader: the images stay on the training device (a GPU or the
CPU) and are augmented there by batched tensor operations (vit/augment.py) over chunks of
many batches at once. It shuffles with a permutation seeded by (seed, epoch) and gives
each sample randomness seeded by (seed, epoch, sample index) alone, so the data a run sees
does not depend on the number of processes or chunks, and a resumed run sees what an
uninterrupted one would.
"""
import math
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vit import augment
from vit.mixing import MixConfig, mix_batch

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"


class DataError(RuntimeError):
    """The data set is missing or unreadable; the message says which file and what to do."""


class BatchSizeError(ValueError):
    """The batch does not fit the data: more images than the training set, or a global batch
    that does not divide among the processes."""


@dataclass
class CIFAR10:
    train_images: torch.Tensor  # uint8 [50000, 3, 32, 32]
    train_labels: torch.Tensor  # int64 [50000]
    test_images: torch.Tensor  # uint8 [10000, 3, 32, 32]
    test_labels: torch.Tensor  # int64 [10000]
    class_names: list[str]


def resolve_data_dir(data_dir: str | os.PathLike, download: bool = True) -> Path:
    """The `cifar-10-batches-py` folder, given it or the folder that holds it.

    When neither holds the files, the official archive is downloaded into data_dir
    (md5-checked) and unpacked; without a network that fails with a message saying
    where to put the files. Existing files are never md5-checked: copies rebuilt from
    other sources are valid data with other bytes.
    """
    data_dir = Path(data_dir).expanduser()
    for candidate in (data_dir / FOLDER, data_dir):
        if (candidate / TEST_FILE).exists() or (candidate / TRAIN_FILES[0]).exists():
            return candidate
    if not download:
        raise DataError(f"CIFAR-10 not found in {data_dir}: expected {data_dir / FOLDER}/{{{', '.join(TRAIN_FILES + [TEST_FILE, META_FILE])}}}")
    _download(data_dir)
    return data_dir / FOLDER


def _download(data_dir: Path):
    from torchvision.datasets.utils import check_integrity, download_url

    archive = data_dir / "cifar-10-python.tar.gz"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if not check_integrity(str(archive), ARCHIVE_MD5):
            download_url(ARCHIVE_URL, str(data_dir), archive.name, md5=ARCHIVE_MD5)
    except Exception as error:  # no network, refused, wrong checksum: all end the same way for the user
        raise DataError(
            f"CIFAR-10 is not in {data_dir} and could not be downloaded ({type(error).__name__}: {error}). "
            f"Put the official python-version files (data_batch_1..5, test_batch, batches.meta) in "
            f"{data_dir / FOLDER}, or pass --data-dir pointing at a folder that holds {FOLDER}."
        ) from None
    if not check_integrity(str(archive), ARCHIVE_MD5):
        raise DataError(f"{archive}: md5 does not match the official CIFAR-10 archive; delete it and retry")
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(data_dir, filter="data")


# What a CIFAR-10 file may refer to: numpy's uint8 array reconstruction (under numpy 1's module
# names and numpy 2's), and bytes as Python 3 writes them at pickle protocol 2. Everything else
# (dicts, lists, strings, bytes, ints) needs no lookup at all.
_ARRAY_RECONSTRUCT = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}
_ARRAY_FROMBUFFER = {("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}


class _NotCIFAR(Exception):
    """Raised while unpickling: the file asks for something the CIFAR-10 layout never holds."""


class _Array:
    """A uint8 array as the pickle describes it; only turned into numpy once the whole file
    has been read and checked, so numpy never runs on an unchecked state."""

    def __init__(self, shape=None, data=None, fortran=False):
        self.shape, self.data, self.fortran = shape, data, fortran

    def __setstate__(self, state):  # ndarray's state: ([version,] shape, dtype, is_fortran, raw bytes)
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _NotCIFAR("an array state numpy never writes")
        shape, dtype, fortran, data = state[-4:]
        if not isinstance(dtype, _Uint8):
            raise _NotCIFAR("an array that is not uint8")
        self.shape, self.data, self.fortran = shape, data, fortran

    def to_numpy(self) -> np.ndarray:
        shape, data = self.shape, self.data
        if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
            raise _NotCIFAR("an array without a valid shape")
        if not isinstance(data, (bytes, bytearray)) or len(data) != math.prod(shape):
            raise _NotCIFAR("an array whose bytes do not match its shape")
        return np.frombuffer(data, dtype=np.uint8).reshape(shape, order="F" if self.fortran else "C")


class _Uint8:
    """numpy.dtype("u1") and nothing else."""

    def __setstate__(self, state):  # (version, byte order, subarray, names, fields, ...)
        if not (isinstance(state, tuple) and len(state) >= 5 and state[1] in ("|", b"|")
                and state[2:5] == (None, None, None)):
            raise _NotCIFAR("a dtype that is not plain uint8")


def _dtype(name, align=False, copy=True):
    if name not in ("u1", b"u1", "uint8", b"uint8"):
        raise _NotCIFAR(f"an array of dtype {name!r}, not uint8")
    return _Uint8()


def _reconstruct(cls, shape, typecode):
    if cls is not _Array:
        raise _NotCIFAR("an array of a class other than numpy.ndarray")
    return _Array()


def _frombuffer(buffer, dtype, shape, order):
    if not isinstance(dtype, _Uint8):
        raise _NotCIFAR("an array that is not uint8")
    return _Array(shape, bytes(buffer) if isinstance(buffer, memoryview) else buffer, order == "F")


def _latin1_bytes(text, encoding):
    if not (isinstance(text, str) and encoding in ("latin1", "latin-1")):
        raise _NotCIFAR("_codecs.encode used for something other than bytes")
    return text.encode("latin1")


class _CIFARUnpickler(pickle.Unpickler):
    """Builds only dicts, lists, tuples, strings, bytes, numbers and uint8 arrays: every other
    global a pickle names is refused before it is looked up, so nothing in the file runs."""

    def find_class(self, module, name):
        if (module, name) in _ARRAY_RECONSTRUCT:
            return _reconstruct
        if (module, name) in _ARRAY_FROMBUFFER:
            return _frombuffer
        if (module, name) == ("numpy", "ndarray"):
            return _Array
        if (module, name) == ("numpy", "dtype"):
            return _dtype
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        raise _NotCIFAR(f"it asks for {module}.{name}")

    def persistent_load(self, pid):
        raise _NotCIFAR("it refers to objects outside the file")


def _to_numpy(value, done: dict):
    """The unpickled structure with every _Array made a numpy array (shared objects stay shared)."""
    if id(value) in done:
        return done[id(value)]
    if isinstance(value, _Array):
        result = value.to_numpy()
    elif isinstance(value, dict):
        result = {key: _to_numpy(item, done) for key, item in value.items()}
    elif isinstance(value, (list, tuple)):
        result = type(value)(_to_numpy(item, done) for item in value)
    elif isinstance(value, (_Uint8,)) or not isinstance(value, (str, bytes, bytearray, int, float, bool, type(None))):
        raise _NotCIFAR(f"a {type(value).__name__} where data was expected")
    else:
        result = value
    done[id(value)] = result
    return result


def _unpickle(path: Path) -> dict:
    """A CIFAR-10 python-version file, read without running anything it contains."""
    if not path.exists():
        raise DataError(f"{path}: file missing; the CIFAR-10 folder needs {', '.join(TRAIN_FILES + [TEST_FILE, META_FILE])}")
    try:
        with open(path, "rb") as f:
            return _to_numpy(_CIFARUnpickler(f, encoding="bytes").load(), {})
    except _NotCIFAR as error:
        raise DataError(f"{path}: not a CIFAR-10 file ({error}); nothing in it was run; "
                        f"replace it with the official file") from None
    except Exception as error:  # truncated or corrupt: pickle raises many different types
        raise DataError(f"{path}: truncated or corrupt CIFAR-10 file ({type(error).__name__}: {error}); replace it") from None


def _read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    batch = _unpickle(path)
    data, labels = batch.get(b"data") if isinstance(batch, dict) else None, batch.get(b"labels") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: not a CIFAR-10 batch (expected b'data' as uint8 of shape (n, 3072))")
    if labels is None or len(labels) != data.shape[0]:
        raise DataError(f"{path}: b'labels' missing or not one per image")
    try:
        labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    except (TypeError, ValueError):
        raise DataError(f"{path}: b'labels' are not integers") from None
    if labels.numel() and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels outside 0..9")
    # Each row holds the R, G and B planes of 32x32, row-major: exactly [3, 32, 32].
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), labels


def load_cifar10(data_dir: str | os.PathLike, download: bool = True) -> CIFAR10:
    folder = resolve_data_dir(data_dir, download)
    train = [_read_batch(folder / name) for name in TRAIN_FILES]
    test_images, test_labels = _read_batch(folder / TEST_FILE)
    meta = _unpickle(folder / META_FILE)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not names or len(names) != 10:
        raise DataError(f"{folder / META_FILE}: b'label_names' missing or not 10 names")
    return CIFAR10(
        train_images=torch.cat([images for images, _ in train]),
        train_labels=torch.cat([labels for _, labels in train]),
        test_images=test_images,
        test_labels=test_labels,
        class_names=[n.decode() if isinstance(n, bytes) else str(n) for n in names],
    )


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed that is a function of (seed, epoch, index) alone; index -1 seeds the epoch's permutation."""
    return ((seed * 1_000_003 + epoch) * 2_147_483_647 + index) % (2**63 - 1)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(sample_seed(seed, epoch, -1))
    return torch.randperm(num_samples, generator=generator)


def global_batches(num_samples: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The epoch's global batches of sample indices; the last partial batch is dropped so
    every step has the same shape (what compiled and graph-captured steps need)."""
    order = epoch_permutation(num_samples, seed, epoch)
    steps = num_samples // batch_size
    return list(order[: steps * batch_size].view(steps, batch_size))


# Images augmented per call of the train loader. A call launches a fixed number of kernels,
# whatever its size: about 250 (480 with the reference variant and mixing), so CIFAR-10's
# epoch at batch 128, in 4 chunks of about 12,500 images, costs 0.02 (0.04) launches per
# image, within the 0.05 target. Its intermediates peak at about 90 kB per image (140 kB for
# the reference variant), 1.5 (2.3) GB at most: small beside a training GPU's memory; CPU
# runs and tests use smaller data sets or pass a smaller chunk.
DEFAULT_CHUNK_IMAGES = 16384


def chunk_bounds(steps: int, steps_per_chunk: int) -> list[tuple[int, int]]:
    """[first, last) step ranges covering 0..steps in as few chunks of at most steps_per_chunk
    steps as possible, their sizes as equal as possible."""
    count = -(-steps // steps_per_chunk)
    edges = [k * steps // count for k in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


class TrainLoader:
    """Images resident on the training device (a GPU or the CPU) as uint8, augmented there in
    chunks of many steps; each step hands out this rank's share of a global batch of the epoch's
    permutation.

    Each chunk (at most chunk_images of this rank's images, a whole number of steps) is
    gathered, augmented, normalized (and optionally mixed) by one pass of batched tensor
    operations, then handed out a step at a time as views. Every sample's draws are a
    function of (seed, epoch, index) alone, so the images do not depend on the chunk size
    or on the number of processes (each rank augments its share of each global batch).
    Per epoch the host sends one tensor, the epoch's sample order (pinned, non-blocking);
    nothing else crosses, and nothing waits for the device.

    auto_augment: a variant of augment.AUTO_AUGMENT_VARIANTS.
    mixing: CutMix / MixUp (vit/mixing.py) applied per batch, partners within this rank's
    share of each step; the labels handed out are then float32 soft targets [B, classes]
    instead of int64 classes.
    """

    def __init__(self, images, labels, batch_size, seed, device, rank=0, world_size=1, *,
                 chunk_images: int = DEFAULT_CHUNK_IMAGES, auto_augment: str = "torchvision",
                 mixing: MixConfig | None = None):
        if batch_size % world_size:
            raise BatchSizeError(f"global batch size {batch_size} is not divisible by the world size {world_size}")
        if len(images) < batch_size:
            raise BatchSizeError(f"{len(images)} training images are fewer than one batch of {batch_size}")
        if chunk_images < 1:
            raise ValueError(f"chunk_images must be positive, got {chunk_images}")
        augment.auto_augment_variant(auto_augment)  # an unknown name fails here, not at the first step
        self.batch_size, self.seed, self.device = batch_size, seed, torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self.chunk_images, self.auto_augment, self.mixing = chunk_images, auto_augment, mixing
        self.steps_per_epoch = len(images) // batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def local_order(self) -> torch.Tensor:
        """int64 [steps, share] on the host: this rank's sample indices at each step of the epoch."""
        share = self.batch_size // self.world_size
        batches = torch.stack(global_batches(len(self.images), self.batch_size, self.seed, self.epoch))
        return batches[:, self.rank * share:(self.rank + 1) * share].contiguous()

    def __len__(self):
        return self.steps_per_epoch

    def __iter__(self):
        share = self.batch_size // self.world_size
        order = self.local_order()
        if self.device.type == "cuda":
            order = order.pin_memory()
        order = order.to(self.device, non_blocking=True)
        for first, last in chunk_bounds(self.steps_per_epoch, max(1, self.chunk_images // share)):
            index = order[first:last].view(-1)
            images = augment.apply_train_augment(
                self.images[index], augment.draw_train_params(index, self.seed, self.epoch), self.auto_augment)
            images, labels = augment.normalize(images), self.labels[index]
            if self.mixing is not None:
                images, labels = mix_batch(images, labels, index, self.seed, self.epoch, self.mixing, group_size=share)
            for start in range(0, len(index), share):
                yield images[start:start + share], labels[start:start + share]


def test_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, device):
    """Normalized test batches in order; images may already live on the device."""
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device, non_blocking=True)
        yield augment.normalize(batch), labels[start:start + batch_size].to(device, non_blocking=True)
