import collections
import os
import sys
from pathlib import Path

import pytest

# Under pytest-xdist (make test: one worker per CPU), each worker's torch and every process a
# test starts get their share of the CPUs: more compute threads than cores spin against each
# other (a CPU epoch of tests/test_train.py took 4x the CPU time with 2 threads in each of 2 workers).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import torch  # noqa: E402  (after OMP_NUM_THREADS, which torch reads when it is imported)

# Without a GPU, Triton kernels run through the interpreter on CPU tensors. Triton reads
# this when a kernel is decorated, so it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# kernels._common imports torch only: importing it here defines no kernel.
from kernels._common import interpreter_broken_reason  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRETER_BROKEN = interpreter_broken_reason()


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip without CUDA; `interpreter` tests skip where the interpreter is broken;
    tests of the real CIFAR-10 are marked `real_data` (a GPU session runs them once it has the data).
    The files marked `minutes(N)` run first, the longest first, then the others, those with the
    most tests first: make test hands whole files to its workers in this order (--dist loadfile
    --no-loadscope-reorder), so that no file of several minutes starts last and runs alone."""
    for item in items:
        if "real_data_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_data)
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "interpreter" in item.keywords and INTERPRETER_BROKEN:
            item.add_marker(pytest.mark.skip(reason=INTERPRETER_BROKEN))
    tests_in_file = collections.Counter(item.nodeid.split("::")[0] for item in items)

    def order(item):
        minutes = item.get_closest_marker("minutes")
        return -(minutes.args[0] if minutes else 0), -tests_in_file[item.nodeid.split("::")[0]]

    items.sort(key=order)


# The folder holding the real CIFAR-10: VIT_DATA_DIR (bench/session/ sets it where it unpacked
# the data), else beside the checkout, where CI and developers have it.
REAL_DATA = Path(os.environ.get("VIT_DATA_DIR") or REPO.parent / "shared" / "data")


@pytest.fixture
def generator():
    """Fresh random inputs every run; generator.initial_seed() (in every failure message)
    replays them."""
    import random
    return torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Kernel outputs and scratch buffers start as NaN, so an element no kernel writes fails."""
    from kernels import _common
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


@pytest.fixture
def bf16_interpreter():
    """bf16 kernels through Triton's interpreter computed as on a GPU (kernels.interpreter_bf16),
    for this test only; without it the ops refuse bf16 under the interpreter."""
    from kernels import interpreter_bf16
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    interpreter_bf16.install()
    yield
    interpreter_bf16.uninstall()


def has_real_cifar() -> bool:
    return (REAL_DATA / "cifar-10-batches-py" / "test_batch").exists()


@pytest.fixture(scope="session")
def real_data_dir():
    if not has_real_cifar():
        pytest.skip(f"real CIFAR-10 not found at {REAL_DATA}/cifar-10-batches-py (set VIT_DATA_DIR to its folder)")
    return REAL_DATA


@pytest.fixture(scope="session")
def real_cifar(real_data_dir):
    from vit.data import load_cifar10
    return load_cifar10(real_data_dir, download=False)


def write_cifar_folder(root: Path, per_batch: int = 20, num_test: int = 30, seed: int = 0) -> Path:
    """A small data set in the official python-version layout: bytes keys, uint8 rows of 3072."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    for name in names:
        n = num_test if name == "test_batch" else per_batch
        batch = {b"batch_label": name.encode(), b"labels": [int(x) for x in rng.integers(0, 10, n)],
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"filenames": [f"{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    meta = {b"label_names": [c.encode() for c in ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                                  "frog", "horse", "ship", "truck"]],
            b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f)
    return folder


@pytest.fixture
def fake_cifar(tmp_path):
    return write_cifar_folder(tmp_path / "data")
