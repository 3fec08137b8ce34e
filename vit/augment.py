"""Training augmentation: RandomCrop(32, padding=4), RandomHorizontalFlip, AutoAugment
(torchvision's CIFAR10 policy), then normalization. Test images are only normalized.

All functions take uint8 images [..., 3, H, W]; normalize() is the only step that
turns them into floats.
"""
import torch
from torchvision import transforms

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32, scaled to [0, 1] and standardized per channel."""
    mean = torch.tensor(CIFAR10_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=images.device).view(3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def cpu_train_transform():
    """torchvision's per-image transforms on one uint8 [3, H, W] tensor; they draw from
    torch's global RNG."""
    return transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.AutoAugment(transforms.AutoAugmentPolicy.CIFAR10),
    ])
