"""vit.evaluate and vit.predict: the numbers against an independent count, the pictures,
and a one-line error with exit code 1 (never a traceback) for each kind of bad input.

The run directories here are built by hand in the trainer's format (config.json + best.pt),
so these tests do not depend on the trainer. The model is tiny and trained for a few
steps on real CIFAR-10 when it is present (<repo>/../shared/data), so its predictions are
not constant; the tests that need the test images skip without it, the others do not.
"""
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vit.augment import normalize
from vit.data import DataError, load_cifar10
from vit.evaluate import CIFAR10_CLASS_NAMES, write_report
from vit.model import ViT, ViTConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT.parent / "shared" / "data"
# Dropout on, so that a report computed in training mode would differ from the true one.
TINY = dict(dim=32, depth=1, heads=2, mlp_dim=32, dropout=0.1)


def run_cli(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def write_run(run_dir: Path, model: ViT, config_model: dict | None = None, data_dir=DATA_DIR) -> Path:
    """A run directory in the trainer's format: config.json and best.pt."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "model": config_model or asdict(model.cfg),
        "train": {"epochs": 1, "batch_size": 128, "lr": 3e-3, "data_dir": str(data_dir)},
        "versions": {"torch": torch.__version__},
        "device": "cpu",
        "class_names": CIFAR10_CLASS_NAMES,
    }
    (run_dir / "config.json").write_text(json.dumps(config))
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 1, "best_acc": 0.0,
                "model_config": asdict(model.cfg)}, run_dir / "best.pt")
    return run_dir


@pytest.fixture(scope="module")
def cifar_if_present():
    try:
        return load_cifar10(DATA_DIR, download=False)
    except DataError as error:
        return error


@pytest.fixture(scope="module")
def cifar(cifar_if_present):
    if isinstance(cifar_if_present, DataError):
        pytest.skip(f"real CIFAR-10 not available: {cifar_if_present}")
    return cifar_if_present


@pytest.fixture(scope="module")
def tiny_model(cifar_if_present):
    """A tiny ViT, trained a few Adam steps on real images when they are present."""
    torch.manual_seed(0)
    model = ViT(ViTConfig(**TINY))
    if isinstance(cifar_if_present, DataError):
        return model  # untrained is enough for the tests that run without the data set
    data = cifar_if_present
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        batch = torch.randint(0, len(data.train_images), (128,))
        loss = F.cross_entropy(model(normalize(data.train_images[batch])), data.train_labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@pytest.fixture(scope="module")
def run_dir(tiny_model, tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("run"), tiny_model)


@pytest.fixture(scope="module")
def independent_logits(tiny_model, cifar):
    """The test set's logits straight from the model, in eval mode, in other batch sizes than the code under test."""
    tiny_model.eval()
    with torch.no_grad():
        logits = torch.cat([tiny_model(normalize(images)) for images in cifar.test_images.split(1000)])
    tiny_model.train()
    return logits


def assert_valid_png(path: Path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        assert min(image.size) > 200  # a real figure, not an empty canvas


def assert_consistent(report: dict, independent_logits: torch.Tensor, labels: torch.Tensor):
    independent_correct = int((independent_logits.argmax(dim=1) == labels).sum())
    assert report["num_images"] == 10_000
    assert report["correct"] == independent_correct
    assert report["accuracy"] == independent_correct / 10_000
    assert report["loss"] == pytest.approx(F.cross_entropy(independent_logits, labels).item(), abs=1e-4)
    confusion = torch.tensor(report["confusion_matrix"])
    assert confusion.shape == (10, 10)
    assert confusion.sum() == 10_000 and confusion.trace() == independent_correct
    assert confusion.sum(dim=1).tolist() == torch.bincount(labels, minlength=10).tolist()
    # CIFAR-10's test classes have 1000 images each, so the per-class accuracies average to the overall one.
    per_class = report["per_class_accuracy"]
    assert list(per_class) == CIFAR10_CLASS_NAMES
    assert sum(per_class.values()) / 10 == pytest.approx(report["accuracy"], abs=1e-12)
    assert "label smoothing" in report["loss_definition"]
    mistakes = report["most_confident_mistakes"]
    assert 0 < len(mistakes) <= 25
    assert all(labels[m["index"]] != CIFAR10_CLASS_NAMES.index(m["predicted"]) for m in mistakes)
    confidences = [m["confidence"] for m in mistakes]
    assert confidences == sorted(confidences, reverse=True)


def test_write_report_matches_an_independent_count(tiny_model, cifar, independent_logits, tmp_path):
    tiny_model.train()  # as the trainer would hand it over mid-run
    report = write_report(tiny_model, cifar.test_images, cifar.test_labels, cifar.class_names, tmp_path, "cpu")
    assert tiny_model.training, "write_report must give the model back in the mode it came in"
    assert_consistent(report, independent_logits, cifar.test_labels)
    assert json.loads((tmp_path / "eval.json").read_text()) == report
    assert_valid_png(tmp_path / "confusion.png")
    assert_valid_png(tmp_path / "mistakes.png")


def test_evaluate_cli_on_a_run_directory(run_dir, cifar, independent_logits, tmp_path):
    # --data-dir is left out: it comes from the run's config.json.
    result = run_cli("vit.evaluate", run_dir, "--out-dir", tmp_path / "out", "--batch-size", "700")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert_consistent(report, independent_logits, cifar.test_labels)
    assert report["source"]["checkpoint"] == str(run_dir / "best.pt")
    assert_valid_png(tmp_path / "out" / "confusion.png")
    assert_valid_png(tmp_path / "out" / "mistakes.png")
    assert f"{100 * report['accuracy']:.2f}%" in result.stdout
    assert all(name in result.stdout for name in CIFAR10_CLASS_NAMES)


def test_predict_json_probabilities(run_dir, tiny_model, tmp_path):
    rng = np.random.default_rng(0)
    exact = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # the input size: PNG is lossless, no resize
    Image.fromarray(exact).save(tmp_path / "exact.png")
    Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(tmp_path / "wide.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(tmp_path / "small_gray.png")
    images = [tmp_path / "exact.png", tmp_path / "wide.jpg", tmp_path / "small_gray.png"]

    result = run_cli("vit.predict", run_dir, *images, "--json")
    assert result.returncode == 0, result.stderr
    predictions = json.loads(result.stdout)["predictions"]
    assert [p["image"] for p in predictions] == [str(path) for path in images]
    for prediction in predictions:
        probabilities = prediction["probabilities"]
        assert list(probabilities) == CIFAR10_CLASS_NAMES
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        top = prediction["top"]
        assert len(top) == 3
        assert [t["probability"] for t in top] == sorted(probabilities.values(), reverse=True)[:3]
        assert all(probabilities[t["class"]] == t["probability"] for t in top)

    # An image of the input size reaches the model unchanged: same probabilities as calling it directly.
    tiny_model.eval()
    with torch.no_grad():
        direct = tiny_model(normalize(torch.from_numpy(exact).permute(2, 0, 1)[None])).softmax(dim=1)[0]
    tiny_model.train()
    assert list(predictions[0]["probabilities"].values()) == pytest.approx(direct.tolist(), abs=1e-5)


def test_predict_text_output(run_dir, tmp_path):
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "black.jpg")
    result = run_cli("vit.predict", run_dir / "best.pt", tmp_path / "black.jpg")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str(tmp_path / "black.jpg")
    assert len(lines) == 4 and all(line.rstrip().endswith("%") for line in lines[1:])


# --- bad input: one line on stderr, exit code 1, no traceback ------------------------------

@pytest.fixture
def bad_runs(tiny_model, tmp_path):
    """Run directories broken in each way the CLIs must report, and a readable image."""
    good = write_run(tmp_path / "good", tiny_model)
    truncated = write_run(tmp_path / "truncated", tiny_model)
    data = (truncated / "best.pt").read_bytes()
    (truncated / "best.pt").write_bytes(data[:len(data) // 2])
    # Weights of a wider, deeper model under a config.json that describes the tiny one.
    mismatched = write_run(tmp_path / "mismatched", ViT(ViTConfig(**{**TINY, "dim": 64, "depth": 2})),
                           config_model=asdict(tiny_model.cfg))
    no_config = write_run(tmp_path / "no_config", tiny_model)
    (no_config / "config.json").unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    return {"good": good, "truncated": truncated, "mismatched": mismatched, "no_config": no_config,
            "empty": empty, "missing": tmp_path / "missing.pt", "image": image}


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str):
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# Every case through vit.evaluate; two through vit.predict, which loads with the same code.
# (Each subprocess costs seconds of imports, hence not the full cross product.)
@pytest.mark.parametrize("module, case, fragments", [
    ("vit.evaluate", "missing", ["missing.pt", "no such checkpoint"]),
    ("vit.evaluate", "truncated", ["best.pt", "truncated"]),
    ("vit.evaluate", "mismatched", ["best.pt", "dim (64 in the checkpoint, 32 in config.json)"]),
    ("vit.evaluate", "no_config", ["config.json", "missing"]),
    ("vit.evaluate", "empty", ["no checkpoint"]),
    ("vit.predict", "truncated", ["best.pt", "truncated"]),
    ("vit.predict", "mismatched", ["best.pt", "dim (64 in the checkpoint, 32 in config.json)"]),
])
def test_bad_checkpoint_is_a_one_line_error(bad_runs, module, case, fragments):
    image_args = [bad_runs["image"]] if module == "vit.predict" else []
    assert_clean_error(run_cli(module, bad_runs[case], *image_args), *fragments)


def test_unreadable_images_are_one_line_errors_with_strict(bad_runs, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    truncated = tmp_path / "truncated.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:600])
    result = run_cli("vit.predict", bad_runs["good"], bad_runs["image"], not_an_image, truncated, "--strict")
    assert_clean_error(result, "2 of 3 images could not be read")
    for bad_image in (not_an_image, truncated):
        assert f"{bad_image}\n  error: cannot read the image" in result.stdout, result.stdout


def test_evaluate_without_the_data_set_is_a_one_line_error(tiny_model, tmp_path):
    run = write_run(tmp_path / "run", tiny_model, data_dir=tmp_path / "no_data_here")
    assert_clean_error(run_cli("vit.evaluate", run), "CIFAR-10 not found", "no_data_here")


def test_usage_error_exits_with_2(bad_runs):
    result = run_cli("vit.predict", bad_runs["good"])  # no IMAGE
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "required: IMAGE" in result.stderr and "--help" in result.stderr
