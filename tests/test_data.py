import math

import pytest
import torch

from vit import augment
from vit import data as cifar
from vit.trainer import lr_at, lr_schedule, TrainConfig
from vit.fields import ConfigError


def test_loader_reads_the_official_layout_from_either_folder(fake_cifar):
    for given in (fake_cifar, fake_cifar.parent):
        d = cifar.load_cifar10(given, download=False)
        assert d.train_images.shape == (100, 3, 32, 32) and d.train_images.dtype == torch.uint8
        assert d.test_images.shape == (30, 3, 32, 32) and d.test_labels.dtype == torch.int64
        assert d.class_names[0] == "airplane" and len(d.class_names) == 10


def test_loader_keeps_the_plane_layout(fake_cifar):
    import pickle
    with open(fake_cifar / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    d = cifar.load_cifar10(fake_cifar, download=False)
    row = raw[b"data"][3]
    # Pixel (y=2, x=5) of image 3: its red, green and blue values sit 1024 apart in the row.
    assert d.train_images[3, :, 2, 5].tolist() == [row[2 * 32 + 5], row[1024 + 2 * 32 + 5], row[2048 + 2 * 32 + 5]]
    assert d.train_labels[3] == raw[b"labels"][3]


def test_truncated_file_is_a_clear_error_naming_it(fake_cifar):
    path = fake_cifar / "data_batch_3"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(cifar.DataError, match="data_batch_3.*truncated or corrupt"):
        cifar.load_cifar10(fake_cifar, download=False)


def test_wrong_contents_is_a_clear_error(fake_cifar):
    import pickle
    with open(fake_cifar / "test_batch", "wb") as f:
        pickle.dump({b"data": [1, 2, 3], b"labels": [1]}, f)
    with pytest.raises(cifar.DataError, match="test_batch: not a CIFAR-10 batch"):
        cifar.load_cifar10(fake_cifar, download=False)


def test_missing_data_without_network_says_where_to_put_it(tmp_path, monkeypatch):
    # A port that refuses at once: the same path as a machine without network.
    monkeypatch.setattr(cifar, "ARCHIVE_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(cifar.DataError, match="could not be downloaded.*Put the official python-version files"):
        cifar.load_cifar10(tmp_path / "nowhere")


def test_real_data_matches_its_readme(real_cifar):
    assert real_cifar.train_images.shape == (50000, 3, 32, 32)
    assert real_cifar.train_labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert real_cifar.test_labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    mean = real_cifar.train_images.float().div(255).mean(dim=(0, 2, 3))
    torch.testing.assert_close(mean, torch.tensor(augment.CIFAR10_MEAN), atol=1e-4, rtol=0)


def test_global_batch_must_divide_among_ranks(fake_cifar):
    d = cifar.load_cifar10(fake_cifar, download=False)
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        cifar.TrainLoader(d.train_images, d.train_labels, 20, seed=0, device="cpu", world_size=3)


def test_lr_schedule_warms_up_from_above_zero_and_ends_at_min_lr():
    steps_per_epoch, epochs = 390, 200
    total, warmup = steps_per_epoch * epochs, 5 * steps_per_epoch
    assert lr_at(0, total, warmup, 1e-3, 1e-5) > 0
    assert math.isclose(lr_at(warmup - 1, total, warmup, 1e-3, 1e-5), 1e-3)
    assert math.isclose(lr_at(total - 1, total, warmup, 1e-3, 1e-5), 1e-5)
    lrs = [lr_at(s, total, warmup, 1e-3, 1e-5) for s in range(total)]
    assert all(a < b for a, b in zip(lrs[:warmup - 1], lrs[1:warmup]))
    assert all(a >= b for a, b in zip(lrs[warmup - 1:], lrs[warmup:]))


def test_lr_schedule_table_holds_every_step_of_the_recipe():
    cfg = TrainConfig(epochs=3, warmup_epochs=1, lr=1e-3, min_lr=1e-5)
    table = lr_schedule(cfg, steps_per_epoch=4)
    assert table.shape == (12,) and table.dtype == torch.float32
    assert math.isclose(table[0], 2.5e-4, rel_tol=1e-6) and math.isclose(table[3], 1e-3, rel_tol=1e-6)
    assert math.isclose(table[-1], 1e-5, rel_tol=1e-6)
    # A zero peak would train nothing: the configuration refuses it before any schedule is made.
    with pytest.raises(ConfigError, match="lr must be a positive"):
        TrainConfig(epochs=2, lr=0.0, min_lr=0.0)


def test_training_batches_depend_on_seed_epoch_and_index_only(fake_cifar):
    """The batched loader on the CPU: two processes see exactly the halves of each global batch,
    and another epoch another order."""
    d = cifar.load_cifar10(fake_cifar, download=False)
    one = cifar.TrainLoader(d.train_images, d.train_labels, 20, seed=3, device="cpu")
    ranks = [cifar.TrainLoader(d.train_images, d.train_labels, 20, seed=3, device="cpu", rank=r, world_size=2)
             for r in range(2)]
    for loader in [one, *ranks]:
        loader.set_epoch(4)
    full, halves = list(one), [list(r) for r in ranks]
    assert len(full) == 5 and full[0][0].dtype == torch.float32 and full[0][0].shape == (20, 3, 32, 32)
    for step, (x, y) in enumerate(full):
        assert torch.equal(torch.cat([halves[0][step][0], halves[1][step][0]]), x)
        assert torch.equal(torch.cat([halves[0][step][1], halves[1][step][1]]), y)
    one.set_epoch(5)
    assert not torch.equal(next(iter(one))[0], full[0][0])
