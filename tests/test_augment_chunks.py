"""The train loader augments chunks of many steps at once: the images do not depend on
the chunk size or the number of processes, and the launches, syncs and host copies per
image are counted (bench/counts.py)."""
import pytest
import torch

from bench.counts import DeviceWorkCounter
from vit import augment
from vit import data as cifar
from vit.mixing import MixConfig, mix_batch
from test_augment import one_thread  # noqa: F401 (an autouse fixture)

MIXING = MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)


def synthetic_data(count, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)
    return images, torch.randint(0, 10, (count,), generator=generator)


def epoch_of(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def batch_at_a_time(images, labels, batch_size, seed, epoch, auto_augment="torchvision", mixing=None,
                    rank=0, world_size=1):
    """The augmentation as one call per step, of this rank's share of each global batch."""
    share = batch_size // world_size
    out = []
    for batch in cifar.global_batches(len(images), batch_size, seed, epoch):
        index = batch[rank * share:(rank + 1) * share]
        x = augment.normalize(augment.gpu_train_augment(images[index], index, seed, epoch, auto_augment))
        y = labels[index]
        if mixing is not None:
            x, y = mix_batch(x, y, index, seed, epoch, mixing)
        out.append((x, y))
    return out


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for step, ((x, y), (x2, y2)) in enumerate(zip(first, second)):
        assert torch.equal(x, x2) and torch.equal(y, y2), step


def test_draws_depend_on_seed_epoch_and_index_only():
    indices = torch.tensor([3, 17, 0, 99, 42, 5])
    params = augment.draw_train_params(indices, seed=1, epoch=2)
    order = torch.tensor([4, 2, 0, 5, 1, 3])
    shuffled = augment.draw_train_params(indices[order], seed=1, epoch=2)
    alone = augment.draw_train_params(indices[3:4], seed=1, epoch=2)
    for key, value in params.items():
        assert torch.equal(shuffled[key], value[order]), key
        assert torch.equal(alone[key], value[3:4]), key
    other_epoch = augment.draw_train_params(torch.arange(1000), seed=1, epoch=3)
    this_epoch = augment.draw_train_params(torch.arange(1000), seed=1, epoch=2)
    assert (other_epoch["sub_policy"] != this_epoch["sub_policy"]).float().mean() > 0.9


@pytest.mark.parametrize("auto_augment", list(augment.AUTO_AUGMENT_VARIANTS))
@pytest.mark.parametrize("mixing", [None, MIXING], ids=["no-mixing", "mixing"])
def test_chunks_give_the_images_of_one_batch_at_a_time(auto_augment, mixing):
    images, labels = synthetic_data(200)
    expected = batch_at_a_time(images, labels, 20, seed=3, epoch=4, auto_augment=auto_augment, mixing=mixing)
    # One step per chunk, 3 steps (uneven chunks: 4 of 3, 3, 2, 2... steps), the whole epoch.
    for chunk_images in (20, 60, 10_000):
        loader = cifar.TrainLoader(images, labels, 20, seed=3, device="cpu", chunk_images=chunk_images,
                                      auto_augment=auto_augment, mixing=mixing)
        assert_same_batches(epoch_of(loader, 4), expected)


@pytest.mark.parametrize("mixing", [None, MIXING], ids=["no-mixing", "mixing"])
def test_two_processes_see_the_halves_of_one_process(mixing):
    images, labels = synthetic_data(200)
    one = epoch_of(cifar.TrainLoader(images, labels, 20, seed=5, device="cpu", chunk_images=60, mixing=mixing), 1)
    ranks = [epoch_of(cifar.TrainLoader(images, labels, 20, seed=5, device="cpu", rank=rank, world_size=2,
                                           chunk_images=rank * 30 + 40, mixing=mixing), 1) for rank in range(2)]
    assert len(one) == 10
    for step, (x, y) in enumerate(one):
        assert torch.equal(torch.cat([ranks[0][step][0], ranks[1][step][0]]), x), step
        assert torch.equal(torch.cat([ranks[0][step][1], ranks[1][step][1]]), y), step


def test_loader_keeps_the_iteration_contract():
    images, labels = synthetic_data(105)
    loader = cifar.TrainLoader(images, labels, 20, seed=0, device="cpu", chunk_images=40)
    batches = epoch_of(loader, 0)
    assert len(loader) == len(batches) == 5  # the last partial batch is dropped
    for x, y in batches:
        assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32
        assert y.shape == (20,) and y.dtype == torch.int64
    # An epoch is a function of (seed, epoch): set_epoch again (as a resumed run does) repeats it.
    assert_same_batches(epoch_of(loader, 0), batches)
    assert not torch.equal(epoch_of(loader, 1)[0][0], batches[0][0])
    mixed = epoch_of(cifar.TrainLoader(images, labels, 20, seed=0, device="cpu", mixing=MIXING), 0)
    assert all(y.shape == (20, 10) and y.dtype == torch.float32 for _, y in mixed)


def test_loader_rejects_bad_settings():
    images, labels = synthetic_data(40)
    with pytest.raises(ValueError, match="chunk_images must be positive"):
        cifar.TrainLoader(images, labels, 20, seed=0, device="cpu", chunk_images=0)
    with pytest.raises(ValueError, match="unknown AutoAugment variant"):
        cifar.TrainLoader(images, labels, 20, seed=0, device="cpu", auto_augment="fancy")


def test_chunk_bounds_cover_the_epoch_in_even_chunks():
    assert cifar.chunk_bounds(390, 128) == [(0, 97), (97, 195), (195, 292), (292, 390)]
    assert cifar.chunk_bounds(5, 5) == [(0, 5)]
    assert cifar.chunk_bounds(5, 1) == [(k, k + 1) for k in range(5)]
    for steps in range(1, 40):
        for per_chunk in range(1, 12):
            bounds = cifar.chunk_bounds(steps, per_chunk)
            sizes = [last - first for first, last in bounds]
            assert bounds[0][0] == 0 and bounds[-1][1] == steps
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(sizes) <= per_chunk and max(sizes) - min(sizes) <= 1
            assert len(bounds) == -(-steps // per_chunk)


def count_epoch(loader, epoch):
    loader.set_epoch(epoch)
    with DeviceWorkCounter() as counter:
        images = sum(len(y) for _, y in loader)
    return counter.counts, images


def test_launches_per_chunk_do_not_depend_on_its_size():
    images, labels = synthetic_data(256, size=8)
    counts = {}
    for chunks, chunk_images in ((4, 64), (2, 128), (1, 256)):
        loader = cifar.TrainLoader(images, labels, 16, seed=0, device="cpu", chunk_images=chunk_images,
                                      auto_augment="reference", mixing=MIXING)
        count_epoch(loader, 0)  # builds the cached tables
        counts[chunks] = count_epoch(loader, 1)[0].launches
    # launches = per_epoch + chunks * per_chunk, the same per_chunk for 64, 128 and 256 images.
    per_chunk = counts[2] - counts[1]
    assert counts[4] - counts[2] == 2 * per_chunk, counts
    assert counts[1] - per_chunk <= 5, counts  # per epoch: the sample order, nothing per step


@pytest.mark.parametrize("auto_augment,mixing", [("torchvision", None), ("reference", MIXING)],
                         ids=["default", "reference-with-mixing"])
def test_an_epoch_at_cifar_size_launches_at_most_005_kernels_per_image(auto_augment, mixing):
    # 50,000 samples, batch 128, the default chunk size: the default pipeline and the one
    # with the most launches. The kernels launched do not depend on the image size, so 8x8
    # images stand in for 32x32 ones to keep the test fast.
    images, labels = synthetic_data(50_000, size=8)
    small = cifar.TrainLoader(images[:256], labels[:256], 128, seed=0, device="cpu", auto_augment=auto_augment,
                                 mixing=mixing)
    count_epoch(small, 0)  # builds the cached tables for this image size
    loader = cifar.TrainLoader(images, labels, 128, seed=0, device="cpu", auto_augment=auto_augment,
                                  mixing=mixing)
    counts, seen = count_epoch(loader, 1)
    assert seen == 49_920
    assert counts.launches / seen <= 0.05, (counts.launches, counts.by_op.most_common(8))
    # Nothing waits for the device and nothing is made from host data once the tables exist
    # (on a GPU, the epoch's sample order is the one host-to-device copy).
    assert counts.syncs == 0 and counts.host_tensors == 0 and counts.device_to_host_copies == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("auto_augment", list(augment.AUTO_AUGMENT_VARIANTS))
def test_gpu_loader_matches_the_cpu_and_copies_one_tensor_per_epoch(auto_augment):
    images, labels = synthetic_data(2048)
    batches = {}
    for device in ("cpu", "cuda"):
        loader = cifar.TrainLoader(images, labels, 128, seed=2, device=device, chunk_images=512,
                                      auto_augment=auto_augment, mixing=MIXING)
        count_epoch(loader, 0)
        counts, _ = count_epoch(loader, 1)
        batches[device] = [(x.cpu(), y.cpu()) for x, y in epoch_of(loader, 1)]
    assert counts.host_to_device_copies == 1 and counts.syncs == 0, counts.as_dict()
    for (x, y), (x_gpu, y_gpu) in zip(batches["cpu"], batches["cuda"]):
        assert torch.equal(x_gpu, x)
        torch.testing.assert_close(y_gpu, y, rtol=0, atol=1e-6)  # soft targets: sums of products
