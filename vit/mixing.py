"""Soft targets: label smoothing in either convention, and CutMix / MixUp on the device.

Label smoothing spreads a share `smoothing` of each target over other classes. Two
conventions are in use, and they differ:
- "torch": over all K classes, the true one included (torch.nn.functional.cross_entropy's
  `label_smoothing`, timm): 1 - s + s/K on the true class, s/K on each other (0.91 / 0.01 for
  s = 0.1, K = 10);
- "reference": over the K - 1 other classes, as the reference ViT-on-CIFAR-10 code does:
  1 - s on the true class, s/(K-1) on each other (0.9 / 0.0111).

CutMix and MixUp follow timm's Mixup in its per-sample ("elem") mode, with its parameters:
each sample is mixed with probability `prob`; a mixed sample uses CutMix with probability
`switch_prob` when both alphas are positive (else whichever is); its lambda is drawn from
Beta(alpha, alpha) of the chosen method. MixUp blends `lam * own + (1 - lam) * partner`;
CutMix pastes the partner's pixels into a box of timm's rand_bbox (sides int(H sqrt(1 - lam))
and int(W sqrt(1 - lam)) halved to either side of a uniform center, clipped at the border)
and, as timm's correct_lam, sets lam to the share of the image left uncovered. The target is
`lam * soft(own label) + (1 - lam) * soft(partner's label)`.

What differs from timm, so that mixing is as reproducible as the rest of the augmentation:
- every draw of a sample (mixed or not, which method, lambda, box center) is a function of
  (seed, epoch, sample index) alone (vit/keyed_random.py), drawn for all samples at once;
- partners are neighbours: position 2k with 2k + 1 within each group of `group_size`
  positions (one batch, or one process's share of it); with an odd group the last position
  is its own partner (left unmixed). The batch order is the epoch's random permutation, so
  the pairing is a uniformly random one, fixed by (seed, epoch); and since a pair never
  straddles an even share, a batch split over processes mixes as one process would, and a
  chunk of many batches mixes as its batches would one by one.
"""
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vit import keyed_random

SMOOTHING_CONVENTIONS = ("torch", "reference")


def smoothing_values(num_classes: int, smoothing: float, convention: str = "torch") -> tuple[float, float]:
    """(value on the true class, value on each other class) of a smoothed target."""
    if convention not in SMOOTHING_CONVENTIONS:
        raise ValueError(f"unknown label smoothing convention {convention!r}; expected one of "
                         f"{', '.join(SMOOTHING_CONVENTIONS)}")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"label smoothing must be in [0, 1], got {smoothing}")
    if num_classes < 2:
        raise ValueError(f"label smoothing needs at least 2 classes, got {num_classes}")
    if convention == "torch":
        off = smoothing / num_classes
        return 1.0 - smoothing + off, off
    return 1.0 - smoothing, smoothing / (num_classes - 1)


def smooth_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0,
                   convention: str = "torch") -> torch.Tensor:
    """float32 [N, num_classes] soft targets of integer labels [N], on their device: one-hot
    when smoothing is 0, else smoothed in the given convention (see the module docstring)."""
    on, off = smoothing_values(num_classes, smoothing, convention)
    targets = torch.full((len(labels), num_classes), off, dtype=torch.float32, device=labels.device)
    return targets.scatter_(1, labels.view(-1, 1), on)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_k targets[k] * log_softmax(logits)[k], in float32. With
    smooth_targets(labels, K, s, "torch") it is F.cross_entropy(logits, labels,
    label_smoothing=s)."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


@dataclass(frozen=True)
class MixConfig:
    """timm Mixup's parameters and defaults (per-sample mode, lambda corrected to the box
    area), for the 10 CIFAR-10 classes."""
    mixup_alpha: float = 1.0  # Beta(alpha, alpha) of MixUp's lambda; 0 turns MixUp off
    cutmix_alpha: float = 0.0  # Beta(alpha, alpha) of CutMix's lambda; 0 turns CutMix off
    prob: float = 1.0  # chance that a sample is mixed at all; 0 leaves every sample as it is
    switch_prob: float = 0.5  # chance of CutMix rather than MixUp, when both alphas are positive
    label_smoothing: float = 0.1
    smoothing_convention: str = "torch"  # see SMOOTHING_CONVENTIONS
    num_classes: int = 10

    def __post_init__(self):
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {self.mixup_alpha}, {self.cutmix_alpha}")
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            raise ValueError("mixing needs mixup_alpha > 0 or cutmix_alpha > 0")
        for name in ("prob", "switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        smoothing_values(self.num_classes, self.label_smoothing, self.smoothing_convention)


@dataclass(frozen=True)
class MixParams:
    """Each sample's mixing, one row per sample. weight + partner_weight is 1 to within one
    float32 rounding; the image and the target are mixed with the same two numbers."""
    weight: torch.Tensor  # float32 [N]: lam, the own image's share (1: unmixed)
    partner_weight: torch.Tensor  # float32 [N]: the partner's share (CutMix: the box's area / (H W), exactly)
    cutmix: torch.Tensor  # bool [N]: mixed by pasting a box (else blended)
    box: torch.Tensor  # int64 [N, 4]: top, bottom, left, right of the pasted box (empty if not CutMix)


# Draw slots of one sample, in the keyed stream of the mixing.
_MIXED, _USE_CUTMIX, _CENTER_Y, _CENTER_X, _BETA = 0, 1, 2, 3, 4
_MIX_DRAW_SLOTS = _BETA + keyed_random.BETA_SLOTS


def draw_mix_params(indices: torch.Tensor, seed: int, epoch: int, config: MixConfig, height: int,
                    width: int) -> MixParams:
    """The mixing of the samples indices (int64 [N]), a function of (seed, epoch, index) alone,
    for images of height x width."""
    bits = keyed_random.random_bits(indices, _MIX_DRAW_SLOTS,
                                    keyed_random.stream_keys(seed, epoch, keyed_random.MIX_STREAM))
    # Uniform u < p, with u on [0, 1) in steps of 2^-24 (p = 1 always passes, p = 0 never).
    mixed = keyed_random.uniform_float32(bits[:, _MIXED]) < config.prob
    if config.mixup_alpha > 0 and config.cutmix_alpha > 0:
        use_cutmix = keyed_random.uniform_float32(bits[:, _USE_CUTMIX]) < config.switch_prob
    else:
        use_cutmix = torch.full_like(mixed, config.cutmix_alpha > 0)
    alpha = torch.where(use_cutmix, config.cutmix_alpha, config.mixup_alpha)
    alpha = torch.where(alpha > 0, alpha, 1.0)  # rows of a disabled method are never used
    lam = keyed_random.symmetric_beta(alpha, bits[:, _BETA:])
    lam = torch.where(mixed, lam, 1.0)
    cutmix = mixed & use_cutmix

    # timm's rand_bbox: sides int(size * sqrt(1 - lam)), half of each (floored) on either
    # side of a uniform integer center, clipped to the image.
    ratio = torch.sqrt(1.0 - lam)
    half_h = torch.where(cutmix, (height * ratio).to(torch.int64) // 2, 0)
    half_w = torch.where(cutmix, (width * ratio).to(torch.int64) // 2, 0)
    center_y = keyed_random.below(bits[:, _CENTER_Y], height)
    center_x = keyed_random.below(bits[:, _CENTER_X], width)
    top, bottom = (center_y - half_h).clamp(0, height), (center_y + half_h).clamp(0, height)
    left, right = (center_x - half_w).clamp(0, width), (center_x + half_w).clamp(0, width)
    box = torch.stack([top, bottom, left, right], dim=1)
    # CutMix's partner share is the covered pixel count over the image's, one correctly
    # rounded float32 division; MixUp's is 1 - lam.
    covered = ((bottom - top) * (right - left)).to(torch.float32) / float(height * width)
    lam = lam.to(torch.float32)
    partner_weight = torch.where(cutmix, covered, 1 - lam)
    weight = torch.where(cutmix, 1 - covered, lam)
    return MixParams(weight=weight, partner_weight=partner_weight, cutmix=cutmix, box=box)


@functools.lru_cache(maxsize=None)
def _positions(count: int, device: torch.device) -> torch.Tensor:
    return torch.arange(count, device=device)


def partner_positions(count: int, group_size: int | None, device) -> torch.Tensor:
    """int64 [count]: the position each position mixes with: 2k <-> 2k + 1 within each group of
    group_size consecutive positions (default: one group); a group's last position, when the
    group is odd, is its own partner."""
    group_size = group_size or count
    if count % group_size:
        raise ValueError(f"{count} samples are not a whole number of groups of {group_size}")
    position = _positions(count, torch.device(device))
    within = position % group_size
    neighbour = within ^ 1
    return torch.where(neighbour < group_size, position - within + neighbour, position)


def apply_mix(images: torch.Tensor, labels: torch.Tensor, params: MixParams, config: MixConfig,
              group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed float images [N, C, H, W], float32 soft targets [N, num_classes]) of images
    (float, e.g. normalized) and integer labels [N], with each sample's params and partner
    (partner_positions). Samples with weight 1 are returned unchanged, bit for bit."""
    if not images.is_floating_point():
        raise TypeError(f"mixing blends pixels: expected float images, got {images.dtype}")
    N, _, H, W = images.shape
    partner = partner_positions(N, group_size, images.device)
    alone = partner == _positions(N, images.device)  # its own partner: left unmixed
    weight = torch.where(alone, 1.0, params.weight)
    partner_weight = torch.where(alone, 0.0, params.partner_weight)
    partner_images = images[partner]
    blended = (weight.to(images.dtype).view(N, 1, 1, 1) * images
               + partner_weight.to(images.dtype).view(N, 1, 1, 1) * partner_images)
    rows, cols = _positions(H, images.device), _positions(W, images.device)
    top, bottom, left, right = params.box.unbind(dim=1)
    in_rows = (rows >= top.view(N, 1)) & (rows < bottom.view(N, 1))  # [N, H]
    in_cols = (cols >= left.view(N, 1)) & (cols < right.view(N, 1))  # [N, W]
    in_box = in_rows.view(N, 1, H, 1) & in_cols.view(N, 1, 1, W)
    pasted = torch.where(in_box, partner_images, images)
    unmixed = (weight == 1).view(N, 1, 1, 1)
    mixed_images = torch.where(params.cutmix.view(N, 1, 1, 1), pasted, torch.where(unmixed, images, blended))

    soft = smooth_targets(labels, config.num_classes, config.label_smoothing, config.smoothing_convention)
    targets = weight.view(N, 1) * soft + partner_weight.view(N, 1) * soft[partner]
    return mixed_images, targets


def mix_batch(images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, seed: int, epoch: int,
              config: MixConfig, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix / MixUp of a batch (float images [N, C, H, W], integer labels [N], their sample
    indices [N]) in one call: draw_mix_params then apply_mix. Returns the mixed images and
    soft targets whose rows sum to one."""
    params = draw_mix_params(indices, seed, epoch, config, images.shape[-2], images.shape[-1])
    return apply_mix(images, labels, params, config, group_size)
