"""The reference AutoAugment variant (grey 128 fill, Rotate by +theta only, bicubic shears),
batched (vit/augment.py) against the per-image oracle (tests/augment_oracle.py: torchvision's
`_apply_op`, through PIL for the bicubic shears as torchvision itself does), op by op and as a
whole pipeline.

Exactness: every op matches pixel for pixel (torch.equal), the bicubic shears included:
the batched shear follows PIL's bicubic filter in float64 operation for operation, so no
tolerance is needed anywhere.
"""
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF
from torchvision.transforms.autoaugment import AutoAugment

import augment_oracle
from vit import augment
from test_augment import EXTRA_MAGNITUDES, SPACE, FixedCrop, one_thread, policy_magnitudes, synthetic_images  # noqa: F401 (one_thread: an autouse fixture)

REFERENCE = "reference"


def per_image(images, op_name, magnitude, auto_augment=REFERENCE):
    return torch.stack([augment_oracle.torchvision_op(image, op_name, magnitude, auto_augment) for image in images])


OP_CASES = [(op, m) for op in SPACE for m in policy_magnitudes(op) + EXTRA_MAGNITUDES.get(op, [])]


@pytest.mark.parametrize("op_name,magnitude", OP_CASES, ids=[f"{op}({m:g})" for op, m in OP_CASES])
def test_reference_op_matches_the_per_image_op_on_random_images(op_name, magnitude):
    images = synthetic_images(24)
    out = augment.apply_op(images, op_name, magnitude, REFERENCE)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(out, per_image(images, op_name, magnitude))


@pytest.mark.parametrize("op_name", list(SPACE))
def test_reference_op_matches_the_per_image_op_on_real_images(real_cifar, op_name):
    images = real_cifar.train_images[:48]
    for magnitude in policy_magnitudes(op_name):
        assert torch.equal(augment.apply_op(images, op_name, magnitude, REFERENCE),
                           per_image(images, op_name, magnitude)), magnitude


@pytest.mark.parametrize("op_name", ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"])
def test_reference_op_matches_the_per_image_op_on_non_square_images(op_name):
    images = synthetic_images(8, height=20, width=28, seed=1)
    for magnitude in policy_magnitudes(op_name) + EXTRA_MAGNITUDES.get(op_name, []):
        assert torch.equal(augment.apply_op(images, op_name, magnitude, REFERENCE),
                           per_image(images, op_name, magnitude)), magnitude


@pytest.mark.parametrize("op_name", ["ShearX", "ShearY"])
def test_bicubic_shears_are_the_reference_codes_pil_calls(op_name):
    # The reference code shears with Image.transform(AFFINE, (1, m, 0, 0, 1, 0) or
    # (1, 0, 0, m, 1, 0), BICUBIC, fillcolor=(128, 128, 128)).
    images = synthetic_images(16, seed=4)
    for magnitude in policy_magnitudes(op_name):
        coefficients = (1, magnitude, 0, 0, 1, 0) if op_name == "ShearX" else (1, 0, 0, magnitude, 1, 0)
        expected = torch.stack([TF.pil_to_tensor(TF.to_pil_image(image).transform(
            (32, 32), Image.AFFINE, coefficients, Image.BICUBIC, fillcolor=(128, 128, 128))) for image in images])
        assert torch.equal(augment.apply_op(images, op_name, magnitude, REFERENCE), expected), magnitude


def test_bicubic_shears_clamp_overshoots_and_differ_from_nearest():
    # A one-pixel checkerboard makes the cubic overshoot both ends of 0..255.
    board = ((torch.arange(32).view(32, 1) + torch.arange(32)) % 2 * 255).to(torch.uint8)
    images = board.expand(2, 3, 32, 32).contiguous()
    bicubic = augment.apply_op(images, "ShearX", 0.3, REFERENCE)
    nearest = augment.apply_op(images, "ShearX", 0.3)
    assert torch.equal(bicubic, per_image(images, "ShearX", 0.3))
    values = set(bicubic.unique().tolist())
    assert {0, 255} <= values and len(values) > 10  # blended values, saturated extremes
    assert set(nearest.unique().tolist()) == {0, 255}


def test_reference_fill_is_grey_128():
    images = torch.full((2, 3, 32, 32), 7, dtype=torch.uint8)
    for op_name, magnitude in (("TranslateX", 10.0), ("TranslateY", -10.0), ("Rotate", 30.0), ("ShearY", 0.3)):
        reference = augment.apply_op(images, op_name, magnitude, REFERENCE)
        default = augment.apply_op(images, op_name, magnitude)
        revealed = default == 0
        assert revealed.any(), op_name
        assert (reference[revealed] == 128).all() and (reference[~revealed] == 7).all(), op_name


def test_reference_rotates_by_plus_theta_whatever_the_sign_draw():
    images = synthetic_images(8, seed=5)
    params = augment.draw_train_params(torch.arange(8), seed=0, epoch=0)
    params["sub_policy"][:] = 1  # (Rotate, 0.7, bin 2), (TranslateX, 0.3, bin 9)
    params["op_applied"][:] = torch.tensor([True, False])
    outputs = {}
    for auto_augment in augment.AUTO_AUGMENT_VARIANTS:
        for negated in (False, True):
            params["op_negated"][:] = negated
            outputs[auto_augment, negated] = augment.apply_train_augment(images, params, auto_augment)
    assert torch.equal(outputs[REFERENCE, False], outputs[REFERENCE, True])
    assert not torch.equal(outputs["torchvision", False], outputs["torchvision", True])
    # +theta is torchvision's positive (counter-clockwise) angle.
    cropped = augment.crop_and_flip(images, params["crop_top"], params["crop_left"], params["flip"])
    angle = float(SPACE["Rotate"][0][2])
    assert torch.equal(outputs[REFERENCE, True], per_image(cropped, "Rotate", angle))


def test_default_variant_of_the_oracle_is_torchvision_autoaugment_itself():
    transform = augment_oracle.per_image_train_transform()
    auto_augment = transform.transforms[-1]
    assert type(auto_augment) is AutoAugment and auto_augment.fill is None
    assert type(augment_oracle.per_image_train_transform(REFERENCE).transforms[-1]) is augment_oracle.VariantAutoAugment


def test_the_reference_recipe_trains_on_the_batched_reference_variant(fake_cifar):
    from vit import data as cifar
    from vit.recipes import recipe_configs
    from vit.trainer import make_train_loader
    d = cifar.load_cifar10(fake_cifar, download=False)
    _, cfg = recipe_configs(REFERENCE)
    cfg.batch_size, cfg.seed = 20, 5
    loader = make_train_loader(cfg, d.train_images, d.train_labels, "cpu")
    loader.set_epoch(2)
    images, labels = next(iter(loader))
    index = loader.local_order()[0]
    expected = augment.normalize(augment.gpu_train_augment(d.train_images[index], index, 5, 2, REFERENCE))
    assert torch.equal(images, expected) and torch.equal(labels, d.train_labels[index])
    torchvision_variant = augment.normalize(augment.gpu_train_augment(d.train_images[index], index, 5, 2))
    assert not torch.equal(images, torchvision_variant)


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown AutoAugment variant 'fancy'; expected one of torchvision, reference"):
        augment.apply_op(synthetic_images(4), "Invert", 0.0, "fancy")


# ---------------------------------------------------------------------------------------
# The whole pipeline with given draws, against the per-image transform's own forward()

def reference_train_augment(images, params, auto_augment):
    out = []
    for i, image in enumerate(images):
        image = FixedCrop(int(params["crop_top"][i]), int(params["crop_left"][i]))(image)
        if params["flip"][i]:
            image = TF.hflip(image)
        transform = augment_oracle.auto_augment_transform(auto_augment)
        # forward applies op k when probs[k] <= p: 0 always passes, 2 never does; it negates
        # a signed op on sign 0.
        draws = (int(params["sub_policy"][i]), torch.tensor([0.0 if a else 2.0 for a in params["op_applied"][i]]),
                 torch.tensor([0 if n else 1 for n in params["op_negated"][i]]))
        transform.get_params = lambda transform_num, draws=draws: draws
        out.append(transform(image))
    return torch.stack(out)


def test_reference_pipeline_matches_the_per_image_transform():
    images = synthetic_images(400, seed=2)
    params = augment.draw_train_params(torch.arange(len(images)), seed=3, epoch=0)
    # Every sub-policy with both ops applied, in each sign, then the drawn params.
    params["sub_policy"][:200] = torch.arange(200) % 25
    params["op_applied"][:200] = True
    params["op_negated"][:200] = (torch.arange(200) // 25 % 4).unsqueeze(1) // torch.tensor([1, 2]) % 2 == 1
    assert torch.equal(augment.apply_train_augment(images, params, REFERENCE),
                       reference_train_augment(images, params, REFERENCE))


def test_reference_pipeline_matches_the_per_image_transform_on_real_images(real_cifar):
    images = real_cifar.train_images[2000:2300]
    params = augment.draw_train_params(torch.arange(2000, 2300), seed=4, epoch=1)
    assert torch.equal(augment.apply_train_augment(images, params, REFERENCE),
                       reference_train_augment(images, params, REFERENCE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("auto_augment", list(augment.AUTO_AUGMENT_VARIANTS))
def test_gpu_pipeline_is_bit_identical_to_the_cpu(auto_augment):
    images = synthetic_images(512, seed=6)
    indices = torch.arange(1000, 1512)
    cpu = augment.gpu_train_augment(images, indices, seed=7, epoch=3, auto_augment=auto_augment)
    gpu = augment.gpu_train_augment(images.cuda(), indices.cuda(), seed=7, epoch=3, auto_augment=auto_augment)
    assert torch.equal(gpu.cpu(), cpu)
