"""The oracle of the batched train augmentation (vit/augment.py): torchvision's per-image
transforms on one uint8 [3, H, W] tensor at a time, drawing from torch's global RNG, with each
AutoAugment variant carried out as vit.augment.AUTO_AUGMENT_VARIANTS describes it. Training
never runs these; the tests compare the batched pipeline against them sample by sample."""
import torch
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from torchvision.transforms.autoaugment import AutoAugment, AutoAugmentPolicy, _apply_op

from vit import augment


def torchvision_op(image: torch.Tensor, op_name: str, magnitude: float, auto_augment: str = "torchvision") -> torch.Tensor:
    """One AutoAugment op on one uint8 [3, H, W] image: torchvision's `_apply_op` with the
    variant's interpolation and fill (magnitude in `_apply_op`'s units and sign).

    torchvision's tensor ops have no bicubic affine, so bicubic ops go through a PIL image:
    torchvision's F.affine then runs PIL's Image.transform with BICUBIC, as the reference
    code's shears did."""
    variant = augment.auto_augment_variant(auto_augment)
    fill = None if variant.fill is None else [float(variant.fill)] * image.shape[-3]
    if op_name in variant.bicubic_ops:
        resampled = _apply_op(TF.to_pil_image(image), op_name, magnitude, interpolation=InterpolationMode.BICUBIC,
                              fill=fill)
        return TF.pil_to_tensor(resampled)
    return _apply_op(image, op_name, magnitude, interpolation=InterpolationMode.NEAREST, fill=fill)


class VariantAutoAugment(AutoAugment):
    """torchvision's AutoAugment (CIFAR10 policy, the same draws from torch's global RNG)
    carried out as a variant says. forward is AutoAugment.forward with each op applied by
    torchvision_op, because torchvision gives one interpolation to every op."""

    def __init__(self, auto_augment: str):
        variant = augment.auto_augment_variant(auto_augment)
        super().__init__(AutoAugmentPolicy.CIFAR10, interpolation=InterpolationMode.NEAREST, fill=variant.fill)
        self.variant, self.auto_augment = variant, auto_augment

    def _augmentation_space(self, num_bins: int, image_size: tuple[int, int]) -> dict:
        if num_bins != augment.NUM_MAGNITUDE_BINS:
            raise ValueError(f"the CIFAR10 policy uses {augment.NUM_MAGNITUDE_BINS} magnitude bins, got {num_bins}")
        return augment.augmentation_space(self.variant, *image_size)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """img: uint8 [3, H, W]."""
        transform_id, probs, signs = self.get_params(len(self.policies))
        space = self._augmentation_space(augment.NUM_MAGNITUDE_BINS, tuple(img.shape[-2:]))
        for i, (op_name, p, magnitude_id) in enumerate(self.policies[transform_id]):
            if probs[i] <= p:
                magnitudes, signed = space[op_name]
                magnitude = float(magnitudes[magnitude_id].item()) if magnitude_id is not None else 0.0
                if signed and signs[i] == 0:
                    magnitude *= -1.0
                img = torchvision_op(img, op_name, magnitude, self.auto_augment)
        return img


def auto_augment_transform(auto_augment: str = "torchvision") -> torch.nn.Module:
    """The per-image AutoAugment of a variant; the default is torchvision's own class."""
    if augment.auto_augment_variant(auto_augment) == augment.AUTO_AUGMENT_VARIANTS["torchvision"]:
        return AutoAugment(AutoAugmentPolicy.CIFAR10)
    return VariantAutoAugment(auto_augment)


def per_image_train_transform(auto_augment: str = "torchvision") -> transforms.Compose:
    """The whole train augmentation of one uint8 [3, H, W] image, as torchvision's transforms."""
    return transforms.Compose([
        transforms.RandomCrop(32, padding=augment.CROP_PADDING),
        transforms.RandomHorizontalFlip(),
        auto_augment_transform(auto_augment),
    ])
