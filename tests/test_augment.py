"""The batched train augmentation (vit/augment.py) against torchvision's per-image ops.

Exactness: every op (ShearX, ShearY, TranslateX, TranslateY, Rotate, Brightness, Color,
Contrast, Sharpness, Posterize, Solarize, AutoContrast, Equalize, Invert) and the whole
crop -> flip -> AutoAugment pipeline are compared for identical pixels (torch.equal), on
random images and on real CIFAR-10 images; none needs a within-one-level tolerance.
The reference is torchvision's `_apply_op` on one uint8 [3, H, W] tensor at a time, the
call AutoAugment.forward makes, with one thing pinned (see `unfused_affine_grid`): the
sampling grid of the geometric ops is evaluated as the sum of products torchvision's source
writes, without fused multiply-adds.
"""
import math

import pytest
import torch
from torchvision.transforms import InterpolationMode, RandomCrop
from torchvision.transforms import functional as TF
from torchvision.transforms.autoaugment import AutoAugment, AutoAugmentPolicy, _apply_op

from vit import augment

POLICY = AutoAugment(AutoAugmentPolicy.CIFAR10)
SPACE = POLICY._augmentation_space(10, (32, 32))


@pytest.fixture(scope="module", autouse=True)
def unfused_affine_grid():
    """torchvision builds the grid of ShearX/Y, TranslateX/Y and Rotate as a matrix product,
    [x, y, 1] @ theta (a bmm with 3 terms). Whether the platform's BLAS evaluates that with
    fused multiply-adds decides the rounding of grid points that fall exactly on a half pixel
    (magnitude 0.2 shears put whole rows there), so torchvision's own pixels differ between
    machines there: with AVX-512 MKL on one CPU, 110 pixels of a ShearY(-0.2) batch moved to
    the other neighbour. The batched implementation evaluates (x * a + y * b) + c in IEEE
    single precision, the order the product is written in, on every device; the reference
    does the same here, so the comparison stays exact on any machine."""
    from torchvision.transforms import _functional_tensor

    original = _functional_tensor._gen_affine_grid

    def gen_affine_grid(theta, w, h, ow, oh):
        # torchvision's pixel centres and rescaled theta, then its product written out.
        x = torch.linspace(-ow * 0.5 + 0.5, ow * 0.5 - 0.5, steps=ow, device=theta.device).view(1, 1, ow, 1)
        y = torch.linspace(-oh * 0.5 + 0.5, oh * 0.5 - 0.5, steps=oh, device=theta.device).view(1, oh, 1, 1)
        scaled = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], dtype=theta.dtype, device=theta.device)
        return (x * scaled[:, None, None, 0] + y * scaled[:, None, None, 1]) + scaled[:, None, None, 2]

    _functional_tensor._gen_affine_grid = gen_affine_grid
    yield
    _functional_tensor._gen_affine_grid = original


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are a few images: intra-op threads only add overhead, and on a busy
    machine their spinning made this module ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_op(images, op_name, magnitudes):
    """torchvision, one image at a time; magnitudes: one float per image."""
    return torch.stack([_apply_op(image, op_name, float(m), interpolation=InterpolationMode.NEAREST, fill=None)
                        for image, m in zip(images, magnitudes)])


def synthetic_images(count, height=32, width=32, seed=0):
    """Uniform noise plus the cases that take other branches in torchvision: low contrast,
    smooth gradients, a constant image and a constant channel (AutoContrast's infinite
    scale, Equalize's zero step), a channel with one outlier pixel."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, height, width), dtype=torch.uint8, generator=generator)
    low = torch.randint(100, 130, (count // 4, 3, height, width), dtype=torch.uint8, generator=generator)
    images[: len(low)] = low
    ramp = torch.linspace(0, 255, width).round().to(torch.uint8)
    images[-1] = ramp.view(1, 1, width)
    images[-2] = 77
    images[-3, 1] = 200
    images[-4, 2] = 10
    images[-4, 2, 5, 5] = 250
    return images


@pytest.fixture(scope="module")
def random_images():
    return synthetic_images(24)


@pytest.fixture(scope="module")
def real_images(real_cifar):
    return real_cifar.train_images[:48]


def policy_magnitudes(op_name):
    """Every magnitude AutoAugment can pass for op_name: each bin, both signs if signed."""
    magnitudes, signed = SPACE[op_name]
    values = [float(v) for v in magnitudes.flatten()] if magnitudes.ndim else [0.0]
    if signed:
        values += [-v for v in values]
    return sorted(set(values))


# Magnitudes off the policy's bins: other angles, exact rounding ties of the shear grid
# (0.2 puts rows 2, 7, 12, ... on half pixels), translations past the border, factors
# down to 0, every Posterize bit count, thresholds between integers.
EXTRA_MAGNITUDES = {
    "ShearX": [0.2, -0.2, 0.55, -1.0],
    "ShearY": [0.2, -0.2, 0.55, -1.0],
    "TranslateX": [1.0, -2.9, 31.0, -40.0],
    "TranslateY": [1.0, -2.9, 31.0, -40.0],
    "Rotate": [13.7, -45.3, 90.0, -180.0],
    "Brightness": [-1.0, -0.37, 0.5, 2.0],
    "Color": [-1.0, -0.37, 0.5, 2.0],
    "Contrast": [-1.0, -0.37, 0.5, 2.0],
    "Sharpness": [-1.0, -0.37, 0.5, 2.0],
    "Posterize": [0.0, 1.0, 2.0, 3.0, 8.0],
    "Solarize": [127.5, 1.0, 254.9],
}
OP_CASES = [(op, m) for op in SPACE for m in policy_magnitudes(op) + EXTRA_MAGNITUDES.get(op, [])]


@pytest.mark.parametrize("op_name,magnitude", OP_CASES, ids=[f"{op}({m:g})" for op, m in OP_CASES])
def test_op_matches_torchvision_on_random_images(random_images, op_name, magnitude):
    out = augment.apply_op(random_images, op_name, magnitude)
    assert out.dtype == torch.uint8 and out.shape == random_images.shape
    assert torch.equal(out, reference_op(random_images, op_name, [magnitude] * len(random_images)))


@pytest.mark.parametrize("op_name", list(SPACE))
def test_op_matches_torchvision_on_real_images(real_images, op_name):
    for magnitude in policy_magnitudes(op_name):
        out = augment.apply_op(real_images, op_name, magnitude)
        assert torch.equal(out, reference_op(real_images, op_name, [magnitude] * len(real_images))), magnitude


@pytest.mark.parametrize("op_name", ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Sharpness", "Equalize"])
def test_op_matches_torchvision_on_non_square_images(op_name):
    # Height and width differ, so a swapped axis cannot go unnoticed.
    images = synthetic_images(8, height=20, width=28, seed=1)
    for magnitude in (policy_magnitudes(op_name) + EXTRA_MAGNITUDES.get(op_name, []))[::3]:
        assert torch.equal(augment.apply_op(images, op_name, magnitude),
                           reference_op(images, op_name, [magnitude] * len(images))), magnitude


@pytest.mark.parametrize("op_name", ["ShearY", "TranslateX", "Rotate", "Contrast", "Posterize", "Solarize"])
def test_per_sample_magnitudes(random_images, op_name):
    values = policy_magnitudes(op_name)
    magnitudes = torch.tensor([values[i % len(values)] for i in range(len(random_images))], dtype=torch.float64)
    assert torch.equal(augment.apply_op(random_images, op_name, magnitudes),
                       reference_op(random_images, op_name, magnitudes.tolist()))


def test_apply_op_rejects_bad_input(random_images):
    with pytest.raises(ValueError, match="unknown op"):
        augment.apply_op(random_images, "Blur", 1.0)
    with pytest.raises(TypeError):
        augment.apply_op(random_images.float(), "Invert", 0.0)
    with pytest.raises(ValueError):
        augment.apply_op(random_images, "Rotate", torch.zeros(3))


# ---------------------------------------------------------------------------------------
# The whole pipeline with given draws, against torchvision's transforms' own forward()

class FixedCrop(RandomCrop):
    def __init__(self, top, left):
        super().__init__(32, padding=4)
        self.top, self.left = top, left

    def get_params(self, img, output_size):
        return self.top, self.left, *output_size


class FixedAutoAugment(AutoAugment):
    """AutoAugment.forward with its draws replaced by given ones."""

    def __init__(self, sub_policy, applied, negated):
        super().__init__(AutoAugmentPolicy.CIFAR10)
        # forward applies op i when probs[i] <= p: 0 always passes (p = 0.0 included, as a
        # draw of exactly 0 would), 2 never does.
        probs = torch.tensor([0.0 if a else 2.0 for a in applied])
        signs = torch.tensor([0 if n else 1 for n in negated])  # forward negates on sign 0
        self.draws = (sub_policy, probs, signs)

    def get_params(self, transform_num):
        return self.draws


def reference_train_augment(images, params):
    out = []
    for i, image in enumerate(images):
        image = FixedCrop(int(params["crop_top"][i]), int(params["crop_left"][i]))(image)
        if params["flip"][i]:
            image = TF.hflip(image)
        auto_augment = FixedAutoAugment(int(params["sub_policy"][i]), params["op_applied"][i].tolist(),
                                        params["op_negated"][i].tolist())
        out.append(auto_augment(image))
    return torch.stack(out)


def test_train_augment_matches_torchvision_transforms(random_images):
    images = synthetic_images(400, seed=2)
    params = augment.draw_train_params(torch.arange(len(images)), seed=3, epoch=0)
    # Every sub-policy, with both of its ops applied, in each sign, so that each of the
    # policy's (op, magnitude, sign) cases occurs.
    params["sub_policy"][:200] = torch.arange(200) % 25
    params["op_applied"][:200] = True
    params["op_negated"][:200] = (torch.arange(200) // 25 % 4).unsqueeze(1) // torch.tensor([1, 2]) % 2 == 1
    assert torch.equal(augment.apply_train_augment(images, params), reference_train_augment(images, params))


def test_train_augment_matches_torchvision_transforms_on_real_images(real_cifar):
    images = real_cifar.train_images[1000:1300]
    params = augment.draw_train_params(torch.arange(len(images)), seed=4, epoch=0)
    assert torch.equal(augment.apply_train_augment(images, params), reference_train_augment(images, params))


# ---------------------------------------------------------------------------------------
# Draws: the distributions of torchvision's transforms

DRAWS = 100_000


@pytest.fixture(scope="module")
def many_params():
    return augment.draw_train_params(torch.arange(DRAWS), seed=5, epoch=0)


def chi_square_p_value(counts, expected):
    statistic = ((counts.double() - expected) ** 2 / expected).sum()
    degrees_of_freedom = len(counts) - 1
    return torch.special.gammaincc(torch.tensor(degrees_of_freedom / 2, dtype=torch.float64), statistic / 2).item()


def assert_binomial(successes, trials, p, what):
    """Within 5 standard deviations of the expectation (exact when p is 0 or 1)."""
    expected = trials * p
    sigma = math.sqrt(trials * p * (1 - p))
    assert abs(successes - expected) <= 5 * sigma, f"{what}: {successes} of {trials}, expected {expected:.1f} ± {sigma:.1f}"


def test_params_shapes_and_types(many_params):
    expected = {"crop_top": ((DRAWS,), torch.int64), "crop_left": ((DRAWS,), torch.int64),
                "flip": ((DRAWS,), torch.bool), "sub_policy": ((DRAWS,), torch.int64),
                "op_applied": ((DRAWS, 2), torch.bool), "op_negated": ((DRAWS, 2), torch.bool)}
    assert {k: (tuple(v.shape), v.dtype) for k, v in many_params.items()} == expected


def test_sub_policies_are_uniform(many_params):
    counts = torch.bincount(many_params["sub_policy"], minlength=25)
    assert len(counts) == 25
    assert chi_square_p_value(counts, DRAWS / 25) > 1e-3


def test_ops_are_applied_with_the_policy_probabilities(many_params):
    sub_policy, applied = many_params["sub_policy"], many_params["op_applied"]
    # Each slot of each sub-policy, given that sub-policy.
    for index, sub in enumerate(POLICY.policies):
        chosen = sub_policy == index
        for slot, (op_name, p, _) in enumerate(sub):
            assert_binomial(int(applied[chosen, slot].sum()), int(chosen.sum()), p, f"sub-policy {index} slot {slot} {op_name}")
    # Each op over all draws: the chance a sample gets it in a slot, summed over slots.
    for op_name in SPACE:
        for slot in range(2):
            expected_p = sum(sub[slot][1] for sub in POLICY.policies if sub[slot][0] == op_name) / 25
            in_slot = torch.tensor([sub[slot][0] == op_name for sub in POLICY.policies])[sub_policy]
            assert_binomial(int((in_slot & applied[:, slot]).sum()), DRAWS, expected_p, f"{op_name} in slot {slot}")


def test_signs_are_even(many_params):
    for slot in range(2):
        assert_binomial(int(many_params["op_negated"][:, slot].sum()), DRAWS, 0.5, f"negated in slot {slot}")


def test_crop_offsets_and_flips(many_params):
    for key in ("crop_top", "crop_left"):
        offsets = many_params[key]
        assert offsets.min() >= 0 and offsets.max() <= 8
        counts = torch.bincount(offsets, minlength=9)
        assert chi_square_p_value(counts, DRAWS / 9) > 1e-3, key
    assert_binomial(int(many_params["flip"].sum()), DRAWS, 0.5, "flips")


def test_samples_of_one_batch_draw_their_own_augmentation():
    params = augment.draw_train_params(torch.arange(128), seed=6, epoch=0)
    assert len(params["sub_policy"].unique()) >= 20
    assert len(params["op_applied"].unique(dim=0)) == 4  # all four apply patterns occur
    # One image copied across a batch comes out in many different ways.
    image = synthetic_images(4, seed=7)[1]
    out = augment.gpu_train_augment(image.expand(128, 3, 32, 32).contiguous(), torch.arange(128), seed=8, epoch=0)
    assert len(out.flatten(1).unique(dim=0)) > 100


# ---------------------------------------------------------------------------------------
# Crop and flip

def test_crop_and_flip_matches_padding_and_slicing(random_images):
    images = random_images[:6]
    padded = torch.nn.functional.pad(images, [4, 4, 4, 4])
    for top in range(9):
        for left in range(9):
            for flip in (False, True):
                out = augment.crop_and_flip(images, torch.full((6,), top), torch.full((6,), left), torch.full((6,), flip))
                expected = padded[:, :, top:top + 32, left:left + 32]
                if flip:
                    expected = expected.flip(-1)
                assert torch.equal(out, expected), (top, left, flip)


def test_crop_and_flip_per_sample(random_images):
    crop_top, crop_left = torch.tensor([0, 8, 3, 4, 7, 1]), torch.tensor([8, 0, 5, 4, 2, 6])
    flip = torch.tensor([True, False, True, False, False, True])
    out = augment.crop_and_flip(random_images[:6], crop_top, crop_left, flip)
    for i in range(6):
        expected = TF.crop(TF.pad(random_images[i], [4]), int(crop_top[i]), int(crop_left[i]), 32, 32)
        assert torch.equal(out[i], TF.hflip(expected) if flip[i] else expected), i


# ---------------------------------------------------------------------------------------
# The batch transform's contract

def test_output_dtype_shape_and_range(random_images):
    out = augment.gpu_train_augment(random_images, torch.arange(len(random_images)), seed=9, epoch=0)
    assert out.dtype == torch.uint8 and out.shape == random_images.shape and out.device == random_images.device
    assert 0 < out.float().mean() < 255 and not torch.equal(out, random_images)


def test_batch_of_one(random_images):
    out = augment.gpu_train_augment(random_images[:1], torch.arange(1), seed=10, epoch=0)
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.uint8


def test_same_keys_same_output_other_seed_or_epoch_other_output(random_images):
    indices = torch.arange(len(random_images))
    first = augment.gpu_train_augment(random_images, indices, seed=11, epoch=0)
    again = augment.gpu_train_augment(random_images, indices, seed=11, epoch=0)
    other_seed = augment.gpu_train_augment(random_images, indices, seed=12, epoch=0)
    other_epoch = augment.gpu_train_augment(random_images, indices, seed=11, epoch=1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed) and not torch.equal(first, other_epoch)


def test_gpu_train_augment_is_draw_then_apply(random_images):
    params = augment.draw_train_params(torch.arange(len(random_images)), seed=13, epoch=0)
    assert torch.equal(augment.gpu_train_augment(random_images, torch.arange(len(random_images)), seed=13, epoch=0),
                       augment.apply_train_augment(random_images, params))


def test_shards_of_params_give_shards_of_the_batch(random_images):
    params = augment.draw_train_params(torch.arange(len(random_images)), seed=14, epoch=0)
    full = augment.apply_train_augment(random_images, params)
    for lo, hi in ((0, 8), (8, 16), (16, 24), (5, 6)):
        shard = augment.apply_train_augment(random_images[lo:hi], {k: v[lo:hi] for k, v in params.items()})
        assert torch.equal(shard, full[lo:hi])


def test_normalize_is_the_standardization(random_images):
    mean = torch.tensor(augment.CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(augment.CIFAR10_STD).view(3, 1, 1)
    out = augment.normalize(random_images)
    assert out.dtype == torch.float32
    assert torch.equal(out, (random_images.float() / 255.0 - mean) / std)
