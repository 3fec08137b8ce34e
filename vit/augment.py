"""Training augmentation: RandomCrop(32, padding=4), RandomHorizontalFlip, AutoAugment
(CIFAR10 policy), then normalization. Test images are only normalized.

All functions take uint8 images [..., 3, H, W]; normalize() is the only step that
turns them into floats.

draw_train_params() + apply_train_augment() (or gpu_train_augment()) augment any number of
samples at once on whatever device holds them (the training device: a GPU or the CPU), each
sample with its own crop, flip, sub-policy, apply decisions and signs, drawn from the
distributions of torchvision's per-image transforms. The draws are a function of (seed, epoch,
sample index) alone (vit/keyed_random.py), so a sample's augmentation is the same whether it
is augmented in a batch, in a chunk of many batches, or in one process's share of a batch.
torchvision's per-image transforms are the tests' oracle (tests/augment_oracle.py), never a
training path.

Two AutoAugment variants (AUTO_AUGMENT_VARIANTS):
- "torchvision" (the default): torchvision's AutoAugment exactly: zero fill, Rotate by
  +-theta, every geometric op with nearest interpolation;
- "reference": what the reference ViT-on-CIFAR-10 code ran: grey 128 fill, Rotate always by
  +theta, ShearX/ShearY with bicubic interpolation; the rest as torchvision.

The batched ops compute what torchvision's per-image tensor ops compute (the functions
`AutoAugment._apply_op` calls, on a uint8 [3, H, W] tensor) pixel for pixel; every op is
bit-identical on CPU, which tests/test_augment.py and tests/test_augment_variants.py check
on random and real images:
- ShearX, ShearY, TranslateX, TranslateY, Rotate: the same float32 sampling grid, built
  from the same float64 inverse matrix, and the same nearest F.grid_sample (with a fill, the
  same sampled mask channel). The reference variant's bicubic shears have no tensor
  counterpart in torchvision, which runs them through PIL: they follow PIL's bicubic
  filter (Geometry.c) in float64 operation for operation, as the reference code ran it;
- Brightness, Color, Contrast, Sharpness: the same float32 blend `ratio * img + (1 - ratio)
  * degenerate`, truncated to uint8. Sharpness's blur is computed from exact integer sums
  (see _blurred_degenerate), which rounds as torchvision's float convolution does;
- Posterize, Solarize, Invert, AutoContrast, Equalize: per-(image, channel) lookup tables
  holding torchvision's formula evaluated at each of the 256 values (integer histograms for
  Equalize).
The batched ops use only elementwise IEEE arithmetic (no fused multiply-adds, no matmul,
no convolution library), grid_sample, and integer sums and histograms, so that a GPU
computes the same pixels and no TF32 setting can change them.

Speed: no loop over images, no host synchronization (no .item(), no data-dependent
shapes), and after the first call per device and image size (which builds the cached
tables), no host-to-device copies, so that apply_train_augment can run ahead of the GPU
and be captured in a CUDA graph after a warm-up call. Each slot of a sub-policy runs one
pass per op family over all samples (geometric: one grid_sample, and the bicubic shears in
the reference variant; blends: one blend; lookup ops: one gather), and torch.where keeps
each sample's own op: about 240 small kernels per call (320 for the reference variant),
draws included, whatever the number of samples, which is why the train loader augments
many batches per call.
"""
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vit import keyed_random

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@functools.lru_cache(maxsize=None)
def _normalize_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(CIFAR10_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=device).view(3, 1, 1)
    return mean, std


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32, scaled to [0, 1] and standardized per channel."""
    # Constants cached per device (no host-to-device copy per batch); the arithmetic runs in
    # place on the one new float tensor.
    mean, std = _normalize_constants(images.device)
    return images.float().div_(255.0).sub_(mean).div_(std)


# ---------------------------------------------------------------------------------------
# The policy, read from torchvision so that the batched pipeline and its oracle share one source of truth.

CROP_PADDING = 4
NUM_MAGNITUDE_BINS = 10  # what AutoAugment.forward passes to _augmentation_space
OPS_PER_SUB_POLICY = 2


@functools.lru_cache(maxsize=None)
def _auto_augment():
    """torchvision's AutoAugment with its CIFAR10 policy, imported when first asked for:
    torchvision's import takes about a second (it imports torch._dynamo), which evaluation,
    prediction and a command line's checks need not wait for."""
    from torchvision.transforms.autoaugment import AutoAugment, AutoAugmentPolicy

    return AutoAugment(AutoAugmentPolicy.CIFAR10)


@functools.lru_cache(maxsize=None)
def sub_policies() -> tuple:
    """The 25 sub-policies of two (op name, probability, magnitude bin or None) each."""
    return tuple(tuple(sub_policy) for sub_policy in _auto_augment().policies)


@functools.lru_cache(maxsize=None)
def _slot_ops() -> tuple[frozenset, ...]:
    """The ops that can occur in each slot of a sub-policy: the others need not be computed there."""
    return tuple(frozenset(sub_policy[slot][0] for sub_policy in sub_policies()) for slot in range(OPS_PER_SUB_POLICY))


OP_NAMES = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
            "Brightness", "Color", "Contrast", "Sharpness",
            "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
OP_CODES = {name: code for code, name in enumerate(OP_NAMES)}
IDENTITY = OP_CODES["Identity"]

# Python's math.degrees and math.radians multiply by these two doubles.
_DEGREES_PER_RADIAN = 180.0 / math.pi
_RADIANS_PER_DEGREE = math.pi / 180.0
SHEAR_OPS = frozenset({"ShearX", "ShearY"})


@dataclass(frozen=True)
class AutoAugmentVariant:
    """How the policy's ops are carried out; the sub-policies, probabilities and magnitudes
    are torchvision's CIFAR10 policy in every variant."""
    fill: int | None  # grey level of pixels that come from outside the image (None: 0, unblended)
    signed_rotate: bool  # Rotate by -theta half the time (torchvision) or always by +theta
    shear_interpolation: str  # "nearest" or "bicubic"; the other geometric ops are always nearest

    @property
    def bicubic_ops(self) -> frozenset:
        return SHEAR_OPS if self.shear_interpolation == "bicubic" else frozenset()


AUTO_AUGMENT_VARIANTS = {
    "torchvision": AutoAugmentVariant(fill=None, signed_rotate=True, shear_interpolation="nearest"),
    "reference": AutoAugmentVariant(fill=128, signed_rotate=False, shear_interpolation="bicubic"),
}


def auto_augment_variant(name: str) -> AutoAugmentVariant:
    if name not in AUTO_AUGMENT_VARIANTS:
        raise ValueError(f"unknown AutoAugment variant {name!r}; expected one of {', '.join(AUTO_AUGMENT_VARIANTS)}")
    return AUTO_AUGMENT_VARIANTS[name]


def augmentation_space(variant: AutoAugmentVariant, height: int, width: int) -> dict:
    """torchvision's {op name: (magnitudes per bin, signed)}, with Rotate unsigned where the
    variant always rotates by +theta."""
    space = dict(_auto_augment()._augmentation_space(NUM_MAGNITUDE_BINS, (height, width)))
    if not variant.signed_rotate:
        space["Rotate"] = (space["Rotate"][0], False)
    return space


# ---------------------------------------------------------------------------------------
# Per-sample op arguments

# How a batch of each op is computed: resampled through a grid, blended with a degenerate
# image, or mapped through a 256-entry table per channel.
NO_OP, GEOMETRIC, BLEND, LOOKUP = range(4)
GEOMETRIC_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})
BLEND_OPS = frozenset({"Brightness", "Color", "Contrast", "Sharpness"})
LOOKUP_OPS = frozenset({"Posterize", "Solarize", "Invert", "AutoContrast", "Equalize"})
_FAMILY_OF_CODE = tuple(GEOMETRIC if name in GEOMETRIC_OPS else BLEND if name in BLEND_OPS
                        else LOOKUP if name in LOOKUP_OPS else NO_OP for name in OP_NAMES)


@dataclass(frozen=True)
class _OpArguments:
    """What each sample's op needs, one row per sample, derived from its (op, magnitude)
    exactly as torchvision derives its arguments from a magnitude. Rows whose op does not
    use a field hold a harmless value there."""
    op_code: torch.Tensor  # int64 [N], index into OP_NAMES
    family: torch.Tensor  # int64 [N], NO_OP, GEOMETRIC, BLEND or LOOKUP
    # float32 [N, 2, 3]: the inverse affine matrix divided by the half sizes, which maps
    # [x, y, 1] of an output pixel center to grid_sample's [-1, 1] coordinates (identity
    # for non-geometric ops).
    grid_coefficients: torch.Tensor
    blend_ratio: torch.Tensor  # float32 [N], the enhance factor, 1 + magnitude
    blend_complement: torch.Tensor  # float32 [N], 1 - factor, rounded as _blend rounds it
    solarize_threshold: torch.Tensor  # float32 [N]
    posterize_mask: torch.Tensor  # uint8 [N], the bits Posterize keeps
    # float64 [N, 6]: the inverse affine matrix torchvision hands to PIL's Image.transform for
    # a shear (pivot at pixel corner (0, 0)), used by the bicubic shears (identity otherwise).
    pil_matrix: torch.Tensor

    # All fields as float64 columns of one tensor (the integers and float32 values here are
    # exact in float64), so that a batch's rows come out of a table in one indexing operation.
    def pack(self) -> torch.Tensor:
        columns = [self.op_code, self.family, self.grid_coefficients.flatten(1), self.blend_ratio,
                   self.blend_complement, self.solarize_threshold, self.posterize_mask, self.pil_matrix]
        return torch.cat([c.to(torch.float64).view(len(self.op_code), -1) for c in columns], dim=1)

    @staticmethod
    def unpack(packed: torch.Tensor) -> "_OpArguments":
        return _OpArguments(
            op_code=packed[:, 0].to(torch.int64),
            family=packed[:, 1].to(torch.int64),
            grid_coefficients=packed[:, 2:8].to(torch.float32).unflatten(1, (2, 3)),
            blend_ratio=packed[:, 8].to(torch.float32),
            blend_complement=packed[:, 9].to(torch.float32),
            solarize_threshold=packed[:, 10].to(torch.float32),
            posterize_mask=packed[:, 11].to(torch.uint8),
            pil_matrix=packed[:, 12:18],
        )


def _inverse_affine_matrices(angle, translate_x, translate_y, shear_x, shear_y, center_x, center_y):
    """torchvision.transforms.functional._get_inverse_affine_matrix at scale 1, per row of
    float64 tensors (degrees, pixels relative to the image center), operation for operation
    as the Python original so that the float64 results are the same numbers."""
    rot = angle * _RADIANS_PER_DEGREE
    sx = shear_x * _RADIANS_PER_DEGREE
    sy = shear_y * _RADIANS_PER_DEGREE
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    # Inverse of rotation-shear, then of the center and translation shifts, then the center.
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = m0 * (-center_x - translate_x) + m1 * (-center_y - translate_y) + center_x
    m5 = m3 * (-center_x - translate_x) + m4 * (-center_y - translate_y) + center_y
    return torch.stack([m0, m1, m2, m3, m4, m5], dim=-1).view(-1, 2, 3)


def _op_arguments(op_code: torch.Tensor, magnitude: torch.Tensor, height: int, width: int) -> _OpArguments:
    """Arguments for op_code[i] at magnitude[i] (torchvision's `_apply_op` units and signs),
    following `_apply_op` and the functional ops it calls. Float64 plays Python's floats;
    the casts to float32 sit where torchvision converts to float32 tensors."""
    device = op_code.device
    m = magnitude.to(torch.float64)
    zero = torch.zeros_like(m)

    def where_op(name, value, otherwise=zero):
        return torch.where(op_code == OP_CODES[name], value, otherwise)

    # _apply_op: shear=math.degrees(math.atan(magnitude)); translate=int(magnitude);
    # F.rotate passes -angle (its angle is counter-clockwise, affine's clockwise).
    shear_degrees = torch.atan(m) * _DEGREES_PER_RADIAN
    # Shears pivot on pixel (0, 0): center=[0, 0] is (-W/2, -H/2) from the image center.
    is_shear = (op_code == OP_CODES["ShearX"]) | (op_code == OP_CODES["ShearY"])
    theta = _inverse_affine_matrices(
        angle=where_op("Rotate", -m),
        translate_x=where_op("TranslateX", torch.trunc(m)),
        translate_y=where_op("TranslateY", torch.trunc(m)),
        shear_x=where_op("ShearX", shear_degrees),
        shear_y=where_op("ShearY", shear_degrees),
        center_x=torch.where(is_shear, 0 - width * 0.5, zero),
        center_y=torch.where(is_shear, 0 - height * 0.5, zero),
    ).to(torch.float32)
    # _gen_affine_grid's rescaled theta: row 0 (grid x) over W/2, row 1 (grid y) over H/2.
    half_size = torch.tensor([[0.5 * width], [0.5 * height]], dtype=torch.float32, device=device)
    # F.affine on a PIL image takes center=[0, 0] as pixel coordinates, not relative ones.
    pil_matrix = _inverse_affine_matrices(angle=zero, translate_x=zero, translate_y=zero,
                                          shear_x=where_op("ShearX", shear_degrees),
                                          shear_y=where_op("ShearY", shear_degrees), center_x=zero, center_y=zero)

    # F.adjust_*(img, 1.0 + magnitude); _blend computes ratio * img1 + (1.0 - ratio) * img2
    # with both Python floats becoming float32 scalars.
    ratio = 1.0 + m
    # F.posterize(img, int(magnitude)) keeps the top `bits` bits: img & -(2 ** (8 - bits)).
    bits = torch.trunc(m).clamp(0, 8).to(torch.int64)
    posterize_mask = (torch.full_like(bits, 255) << (8 - bits)) & 255
    return _OpArguments(
        op_code=op_code.to(torch.int64),
        family=torch.tensor(_FAMILY_OF_CODE, device=device)[op_code],
        grid_coefficients=theta / half_size,
        blend_ratio=ratio.to(torch.float32),
        blend_complement=(1.0 - ratio).to(torch.float32),
        # F.solarize compares uint8 pixels with a Python float: in float32.
        solarize_threshold=m.to(torch.float32),
        posterize_mask=posterize_mask.to(torch.uint8),
        pil_matrix=pil_matrix.view(-1, 6),
    )


# ---------------------------------------------------------------------------------------
# The three op families, each computed for the whole batch

@functools.lru_cache(maxsize=None)
def _pixel_centers(height: int, width: int, device: torch.device):
    """_gen_affine_grid's pixel-center coordinates relative to the image center, shaped to
    broadcast into a [B, H, W, 2] grid."""
    x = torch.linspace(-width * 0.5 + 0.5, width * 0.5 + 0.5 - 1, steps=width, device=device)
    y = torch.linspace(-height * 0.5 + 0.5, height * 0.5 + 0.5 - 1, steps=height, device=device)
    return x.view(1, 1, width, 1), y.view(1, height, 1, 1)


def _sampling_grid(grid_coefficients: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """float32 [B, H, W, 2]: each sample's grid_sample coordinates, as torchvision's
    _gen_affine_grid computes them per image."""
    x, y = _pixel_centers(height, width, grid_coefficients.device)
    per_sample = grid_coefficients[:, None, None]  # [B, 1, 1, 2 (grid x, y), 3]
    # grid = [x, y, 1] @ rescaled theta, written out elementwise in the order the matmul
    # sums (x term + y term, then the constant) so it rounds the same, and so no matmul
    # precision setting (TF32) can touch it.
    return x * per_sample[..., 0] + y * per_sample[..., 1] + per_sample[..., 2]


def _nearest(pixels: torch.Tensor, grid_coefficients: torch.Tensor, fill: int | None) -> torch.Tensor:
    """float32 [B, C, H, W] -> uint8: torchvision's _apply_grid_transform in nearest mode on a
    batch. With a fill, a channel of ones is sampled along (as torchvision does), and pixels
    whose sampled mask is below 1/2 came from outside the image and take the fill."""
    H, W = pixels.shape[-2:]
    if fill is not None:
        pixels = torch.cat([pixels, torch.ones_like(pixels[:, :1])], dim=1)
    grid = _sampling_grid(grid_coefficients, H, W)
    sampled = F.grid_sample(pixels, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    if fill is not None:
        sampled = torch.where(sampled[:, -1:] < 0.5, float(fill), sampled[:, :-1])
    return sampled.to(torch.uint8)  # nearest samples are the input's integers or the fill


def _cubic(v1, v2, v3, v4, d):
    """PIL's BICUBIC macro (Geometry.c): the cubic through four taps at offset d in [0, 1)
    (float64), evaluated in its order, so that it rounds as its C doubles do. Integer taps
    give exact integer coefficients p2..p4, as in its C ints."""
    p2 = v3 - v1
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = v2 - v1 - v3 + v4
    return (d * p4).add_(p3).mul_(d).add_(p2).mul_(d).add_(v2)  # v2 + d * (p2 + d * (p3 + d * p4))


@functools.lru_cache(maxsize=None)
def _pil_pixel_centers(height: int, width: int, device: torch.device):
    """x + 0.5 and y + 0.5 in float64, as PIL's affine_transform computes them."""
    x = torch.arange(width, dtype=torch.float64, device=device) + 0.5
    y = torch.arange(height, dtype=torch.float64, device=device) + 0.5
    return x, y.view(height, 1)


def _pil_bicubic_shears(images: torch.Tensor, arguments: _OpArguments, ops: frozenset,
                        fill: int | None) -> torch.Tensor:
    """uint8 [B, C, H, W] -> uint8: each sample's ShearX or ShearY (ops: which occur) as PIL's
    Image.transform(AFFINE, matrix, BICUBIC, fillcolor) computes it, which is what
    torchvision's F.affine does to a PIL image with bicubic interpolation.

    Geometry.c's bicubic_filter32RGB: the source point of output pixel (x, y) is
    matrix @ (x + 1/2, y + 1/2, 1) in float64; points outside the image take the fill; the
    others interpolate the 4 x 4 taps around them (indices clamped to the border) with PIL's
    cubic, rows first, and clamp to 0..255 and truncate. A shear's matrix moves points along
    one axis only: for ShearX the source row is exactly y + 1/2, so PIL's vertical offset is
    0 and its vertical cubic returns the middle row's value unchanged; for ShearY the same
    holds across columns. So one 4-tap cubic along the sheared axis gives PIL's result
    exactly, with a quarter of the taps.
    """
    B, C, H, W = images.shape
    x, y = _pil_pixel_centers(H, W, images.device)
    a = arguments.pil_matrix.view(B, 6, 1, 1)
    source_x = a[:, 0] * x + a[:, 1] * y + a[:, 2]  # [B, H, W]
    source_y = a[:, 3] * x + a[:, 4] * y + a[:, 5]
    inside = (source_x >= 0) & (source_x < W) & (source_y >= 0) & (source_y < H)
    source_x, source_y = source_x - 0.5, source_y - 0.5
    flat = images.view(B, C, H * W)

    def cubic_along(moving, other_axis_offset, stride, size):
        start = moving.floor()
        offset = (moving - start).unsqueeze(1)  # [B, 1, H, W]
        start = start.to(torch.int64)
        taps = []
        for k in (-1, 0, 1, 2):
            index = ((start + k).clamp_(0, size - 1) * stride + other_axis_offset).view(B, 1, H * W)
            taps.append(flat.gather(2, index.expand(B, C, H * W)).view(B, C, H, W).to(torch.int16))
        return _cubic(*taps, offset)

    out = None
    if "ShearX" in ops:  # along rows: the row is fixed
        out = cubic_along(source_x, source_y.floor().to(torch.int64).clamp_(0, H - 1) * W, 1, W)
    if "ShearY" in ops:  # along columns: the column is fixed
        along_columns = cubic_along(source_y, source_x.floor().to(torch.int64).clamp_(0, W - 1), W, H)
        if out is None:
            out = along_columns
        else:
            out = torch.where((arguments.op_code == OP_CODES["ShearY"]).view(B, 1, 1, 1), along_columns, out)
    out = out.clamp_(0, 255).to(torch.uint8)  # <= 0 -> 0, >= 255 -> 255, else truncated
    return torch.where(inside.unsqueeze(1), out, 0 if fill is None else fill)


def _geometric_ops(images: torch.Tensor, pixels: torch.Tensor, arguments: _OpArguments, ops: frozenset,
                   variant: AutoAugmentVariant) -> torch.Tensor:
    """ShearX/Y, TranslateX/Y and Rotate of uint8 images [B, C, H, W] (pixels: the same as
    float32) -> uint8: one resampling per interpolation the ops need, each sample kept from
    its own op's."""
    bicubic_ops = ops & variant.bicubic_ops
    out = _nearest(pixels, arguments.grid_coefficients, variant.fill) if ops - bicubic_ops else None
    if bicubic_ops:
        bicubic = _pil_bicubic_shears(images, arguments, bicubic_ops, variant.fill)
        if out is None:
            out = bicubic
        else:
            is_bicubic = functools.reduce(torch.logical_or, [arguments.op_code == OP_CODES[name] for name in bicubic_ops])
            out = torch.where(is_bicubic.view(-1, 1, 1, 1), bicubic, out)
    return out


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 1, H, W], rgb_to_grayscale's float32 weighting truncated to uint8."""
    r, g, b = images.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).to(torch.uint8).unsqueeze(dim=-3)


def _blurred_degenerate(pixels: torch.Tensor) -> torch.Tensor:
    """adjust_sharpness's degenerate image as float32: the interior smoothed by PIL's SMOOTH
    kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 and rounded, inside the original one-pixel
    border.

    torchvision convolves with the float kernel and rounds. Here the 3x3 sum is taken in
    integers (sums of pixel values, exact in float32 whatever the order, and no convolution
    library or TF32 setting involved), and sum / 13 is never within 1/26 of a .5 tie, far
    beyond either side's float error: both round to the same integer.
    """
    box = F.avg_pool2d(pixels, kernel_size=3, stride=1, divisor_override=1)  # 3x3 sums
    sums = torch.add(box, pixels[..., 1:-1, 1:-1], alpha=4)  # the center weighs 5
    blurred = pixels.clone()
    blurred[..., 1:-1, 1:-1] = sums.div_(13.0).round_()
    return blurred


def _blend_ops(images, pixels, arguments: _OpArguments, ops: frozenset) -> torch.Tensor:
    """Brightness, Color, Contrast and Sharpness: _blend(img, degenerate, factor), each
    sample with the degenerate image of its own op."""
    H, W = images.shape[-2:]

    def picks(name):
        return (arguments.op_code == OP_CODES[name]).view(-1, 1, 1, 1)

    # Brightness blends with black; the others replace it where their op is picked.
    degenerate = torch.zeros((), device=images.device)
    if ops & {"Color", "Contrast"}:
        gray = _grayscale(images).float()
        if "Color" in ops:
            degenerate = torch.where(picks("Color"), gray, degenerate)
        if "Contrast" in ops:
            # adjust_contrast's mean of the uint8 grayscale; the sum of integers is exact
            # in float32 in any summation order (up to 65793 pixels, 256x256 images).
            degenerate = torch.where(picks("Contrast"), gray.mean(dim=(-3, -2, -1), keepdim=True), degenerate)
    if "Sharpness" in ops and H > 2 and W > 2:  # adjust_sharpness leaves images of <= 2 pixels alone
        degenerate = torch.where(picks("Sharpness"), _blurred_degenerate(pixels), degenerate)
    blended = (arguments.blend_ratio.view(-1, 1, 1, 1) * pixels
               + arguments.blend_complement.view(-1, 1, 1, 1) * degenerate)
    return blended.clamp_(0, 255).to(torch.uint8)  # to(uint8) truncates, as in _blend


@functools.lru_cache(maxsize=None)
def _intensity_values(device: torch.device):
    """The 256 uint8 values, the same as float32, and inverted (255 - v)."""
    values = torch.arange(256, device=device).to(torch.uint8)
    return values, values.to(torch.float32), 255 - values


def _autocontrast_tables(channel_min: torch.Tensor, channel_max: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, 256]: F.autocontrast's float32 formula at every value."""
    _, values, _ = _intensity_values(channel_min.device)
    minimum = channel_min.to(torch.float32).unsqueeze(-1)
    maximum = channel_max.to(torch.float32).unsqueeze(-1)
    scale = 255 / (maximum - minimum)
    # A single-valued channel (torchvision: a non-finite scale) is left as it is.
    constant = maximum == minimum
    minimum = torch.where(constant, 0.0, minimum)
    scale = torch.where(constant, 1.0, scale)
    return ((values - minimum) * scale).clamp_(0, 255).to(torch.uint8)


def _equalize_tables(pixels: torch.Tensor, channel_max: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, 256]: torchvision's _scale_channel lookup table for each channel of
    pixels (int64 [B, C, N]), from per-channel histograms counted in one scatter."""
    B, C, N = pixels.shape
    device = pixels.device
    # Channel k's histogram occupies bins [256 k, 256 k + 256) of one flat histogram.
    offsets = torch.arange(B * C, device=device).view(B, C, 1) * 256
    bins = (pixels + offsets).view(-1)
    counts = torch.zeros(B * C * 256, dtype=torch.int32, device=device)
    counts.scatter_add_(0, bins, torch.ones((), dtype=torch.int32, device=device).expand(bins.numel()))
    histogram = counts.view(B, C, 256)
    # step = floor(sum of the nonzero bins but the last / 255); the last nonzero bin is the
    # channel's maximum value.
    count_at_max = histogram.gather(2, channel_max.to(torch.int64).unsqueeze(-1))
    step = torch.div(N - count_at_max, 255, rounding_mode="floor")  # [B, C, 1]
    # Value v maps through the count of values below v (torchvision shifts the inclusive
    # cumulative sum right by one, putting 0 first).
    below = histogram.cumsum(dim=-1) - histogram
    table = torch.div(below + torch.div(step, 2, rounding_mode="floor"), step.clamp(min=1), rounding_mode="floor")
    table = table.clamp_(0, 255).to(torch.uint8)
    # A channel with step 0 (all one value, or nearly) is left as it is.
    values, _, _ = _intensity_values(device)
    return torch.where(step == 0, values, table)


def _lookup_ops(images, arguments: _OpArguments, ops: frozenset) -> torch.Tensor:
    """Posterize, Solarize, Invert, AutoContrast and Equalize: each maps every channel of
    every image through a 256-entry table, so build one table per (image, channel) holding
    the sample's op, then look all pixels up in one gather."""
    B, C, H, W = images.shape
    values, float_values, inverted = _intensity_values(images.device)
    per_sample = (-1, 1, 1)
    tables = values.expand(B, C, 256)

    def choose(name, op_tables):
        return torch.where((arguments.op_code == OP_CODES[name]).view(per_sample), op_tables, tables)

    if "Posterize" in ops:
        tables = choose("Posterize", values & arguments.posterize_mask.view(per_sample))
    if "Solarize" in ops:
        tables = choose("Solarize", torch.where(float_values >= arguments.solarize_threshold.view(per_sample),
                                                inverted, values))
    if "Invert" in ops:
        tables = choose("Invert", inverted)
    pixels = images.reshape(B, C, H * W).to(torch.int64)
    if ops & {"AutoContrast", "Equalize"}:
        channel_min, channel_max = torch.aminmax(images.reshape(B, C, H * W), dim=-1)
        if "AutoContrast" in ops:
            tables = choose("AutoContrast", _autocontrast_tables(channel_min, channel_max))
        if "Equalize" in ops:
            tables = choose("Equalize", _equalize_tables(pixels, channel_max))
    return tables.expand(B, C, 256).gather(2, pixels).view(B, C, H, W)


def _apply_ops(images: torch.Tensor, arguments: _OpArguments, possible_ops: frozenset,
               variant: AutoAugmentVariant) -> torch.Tensor:
    """Each sample through its own op (arguments.op_code; Identity for none). Only the
    families of possible_ops are computed; each runs over the whole batch and its result is
    kept for the samples whose op belongs to it."""
    geometric, blend, lookup = possible_ops & GEOMETRIC_OPS, possible_ops & BLEND_OPS, possible_ops & LOOKUP_OPS
    family = arguments.family.view(-1, 1, 1, 1)
    pixels = images.float() if geometric or blend else None
    out = images
    if geometric:
        out = torch.where(family == GEOMETRIC, _geometric_ops(images, pixels, arguments, geometric, variant), out)
    if blend:
        out = torch.where(family == BLEND, _blend_ops(images, pixels, arguments, blend), out)
    if lookup:
        out = torch.where(family == LOOKUP, _lookup_ops(images, arguments, lookup), out)
    return out


def _check_images(images: torch.Tensor):
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 tensor, got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {list(images.shape)}")


def apply_op(images: torch.Tensor, op_name: str, magnitude, auto_augment: str = "torchvision") -> torch.Tensor:
    """One AutoAugment op on every image of uint8 [B, 3, H, W], with torchvision's
    `_apply_op` names, units and signs: degrees for Rotate (counter-clockwise) and pixels for
    Translate (truncated to int), the shear coefficient for ShearX/Y (torchvision shears by
    math.degrees(math.atan(magnitude))), bits for Posterize, the threshold for Solarize,
    factor - 1 for Brightness, Color, Contrast and Sharpness; ignored by AutoContrast,
    Equalize, Invert and Identity. Interpolation and fill as the AutoAugment variant says
    (the default: nearest, zero fill); the magnitude's sign is used as given.

    magnitude: a float for all images, or a [B] tensor, one per image.
    """
    _check_images(images)
    variant = auto_augment_variant(auto_augment)
    if op_name not in OP_CODES:
        raise ValueError(f"unknown op {op_name!r}; expected one of {', '.join(OP_NAMES)}")
    batch, _, height, width = images.shape
    if isinstance(magnitude, torch.Tensor):
        if magnitude.ndim > 1 or (magnitude.ndim == 1 and len(magnitude) != batch):
            raise ValueError(f"magnitude must be a number or have shape [{batch}], got {list(magnitude.shape)}")
        magnitude = magnitude.to(images.device, torch.float64).expand(batch)
    else:
        magnitude = torch.full((batch,), float(magnitude), dtype=torch.float64, device=images.device)
    op_code = torch.full((batch,), OP_CODES[op_name], dtype=torch.int64, device=images.device)
    return _apply_ops(images, _op_arguments(op_code, magnitude, height, width), frozenset({op_name}), variant)


# ---------------------------------------------------------------------------------------
# The train augmentation, batched

@functools.lru_cache(maxsize=None)
def _pixel_indices(height: int, width: int, device: torch.device):
    rows, cols = torch.arange(height, device=device), torch.arange(width, device=device)
    return rows, cols, cols.flip(0)


def crop_and_flip(images: torch.Tensor, crop_top: torch.Tensor, crop_left: torch.Tensor, flip: torch.Tensor,
                  padding: int = CROP_PADDING) -> torch.Tensor:
    """RandomCrop(size=(H, W), padding, fill 0) then RandomHorizontalFlip, per sample:
    crop_top/crop_left [B] are the crop's offsets in the padded image (0..2 * padding),
    flip [B] bool. One gather from the padded batch with per-sample indices."""
    B, C, H, W = images.shape
    padded = F.pad(images, [padding] * 4)
    padded_width = W + 2 * padding
    rows, cols, reversed_cols = _pixel_indices(H, W, images.device)
    cols = torch.where(flip.view(B, 1), reversed_cols, cols) + crop_left.view(B, 1)  # flip after crop
    rows = rows + crop_top.view(B, 1)
    source = (rows * padded_width).view(B, H, 1) + cols.view(B, 1, W)
    return padded.view(B, C, -1).gather(2, source.view(B, 1, H * W).expand(B, C, H * W)).view(B, C, H, W)


@dataclass(frozen=True)
class _PolicyTables:
    # Packed _OpArguments. Row 0: no op, for slots whose op is not applied; row
    # 1 + 4 * sub_policy + 2 * slot + negated: that slot's op at that sign.
    arguments: torch.Tensor
    # int64 [2]: the row of (sub-policy 0, slot, not negated) for each slot.
    slot_rows: torch.Tensor


@functools.lru_cache(maxsize=None)
def _policy_tables(height: int, width: int, device: torch.device, auto_augment: str) -> _PolicyTables:
    """Every (sub-policy, slot, sign) op's arguments, computed once on the host the way
    AutoAugment.forward computes the magnitude, then kept on the device."""
    space = augmentation_space(auto_augment_variant(auto_augment), height, width)
    op_codes, magnitudes = [IDENTITY], [0.0]
    for sub_policy in sub_policies():
        for op_name, _, magnitude_bin in sub_policy:
            bin_magnitudes, signed = space[op_name]
            magnitude = float(bin_magnitudes[magnitude_bin].item()) if magnitude_bin is not None else 0.0
            for negated in (False, True):
                op_codes.append(OP_CODES[op_name])
                magnitudes.append(magnitude * -1.0 if signed and negated else magnitude)
    arguments = _op_arguments(torch.tensor(op_codes), torch.tensor(magnitudes, dtype=torch.float64), height, width)
    return _PolicyTables(arguments.pack().to(device), torch.tensor([1, 3], device=device))


@functools.lru_cache(maxsize=None)
def _apply_probability(device: torch.device) -> torch.Tensor:
    """float32 [25, 2]: each slot's apply probability. AutoAugment compares its float32
    torch.rand draw with the Python float p, so in float32."""
    return torch.tensor([[p for _, p, _ in sub_policy] for sub_policy in sub_policies()], dtype=torch.float32,
                        device=device)


# Draw slots of one sample, in the keyed stream of the augmentation.
_CROP_TOP, _CROP_LEFT, _FLIP, _SUB_POLICY, _APPLY_U, _NEGATE = 0, 1, 2, 3, 4, 6  # _APPLY_U and _NEGATE: 2 each
_TRAIN_DRAW_SLOTS = 8


def draw_train_params(indices: torch.Tensor, seed: int, epoch: int) -> dict[str, torch.Tensor]:
    """All randomness of the train augmentation of the samples indices (int64 [N], on the
    device that will augment them), a function of (seed, epoch, index) alone, with the
    distributions of torchvision's RandomCrop(32, padding=4), RandomHorizontalFlip and AutoAugment:
    - crop_top, crop_left: int64 [N], uniform in 0..8 (RandomCrop(32, padding=4)),
    - flip: bool [N], probability 1/2,
    - sub_policy: int64 [N], uniform over the 25 sub-policies,
    - op_applied: bool [N, 2], u <= the slot's probability with u uniform on [0, 1) in steps
      of 2^-24, as AutoAugment decides with a float32 torch.rand,
    - op_negated: bool [N, 2], probability 1/2 (used by the signed ops only).
    Every tensor's first dimension is the sample, so params[k][lo:hi] are the params of
    indices[lo:hi]. Integer draws are unbiased to within 25 / 2^32 (keyed_random.below).
    """
    bits = keyed_random.random_bits(indices, _TRAIN_DRAW_SLOTS,
                                    keyed_random.stream_keys(seed, epoch, keyed_random.AUGMENT_STREAM))
    crop_top = keyed_random.below(bits[:, _CROP_TOP], 2 * CROP_PADDING + 1)
    crop_left = keyed_random.below(bits[:, _CROP_LEFT], 2 * CROP_PADDING + 1)
    flip = keyed_random.coin(bits[:, _FLIP])
    sub_policy = keyed_random.below(bits[:, _SUB_POLICY], len(sub_policies()))
    apply_u = keyed_random.uniform_float32(bits[:, _APPLY_U:_APPLY_U + OPS_PER_SUB_POLICY])
    op_applied = apply_u <= _apply_probability(indices.device)[sub_policy]
    op_negated = keyed_random.coin(bits[:, _NEGATE:_NEGATE + OPS_PER_SUB_POLICY])
    return {"crop_top": crop_top, "crop_left": crop_left, "flip": flip,
            "sub_policy": sub_policy, "op_applied": op_applied, "op_negated": op_negated}


def apply_train_augment(images: torch.Tensor, params: dict[str, torch.Tensor],
                        auto_augment: str = "torchvision") -> torch.Tensor:
    """uint8 [B, 3, H, W] -> uint8 [B, 3, H, W]: crop and flip, then each sample's AutoAugment
    sub-policy as the variant carries it out; deterministic given params (from
    draw_train_params, or a slice of them), and each sample's result depends on its own
    image and params alone. For 32x32 images this is torchvision's per-image transforms
    (tests/augment_oracle.py) with the same draws."""
    _check_images(images)
    variant = auto_augment_variant(auto_augment)
    _, _, height, width = images.shape
    images = crop_and_flip(images, params["crop_top"], params["crop_left"], params["flip"])
    tables = _policy_tables(height, width, images.device, auto_augment)
    rows = params["sub_policy"].unsqueeze(1) * 4 + tables.slot_rows + params["op_negated"]
    rows = torch.where(params["op_applied"], rows, 0)
    arguments = tables.arguments[rows]  # [B, 2 slots, packed]
    for slot in range(OPS_PER_SUB_POLICY):
        images = _apply_ops(images, _OpArguments.unpack(arguments[:, slot]), _slot_ops()[slot], variant)
    return images


def gpu_train_augment(images: torch.Tensor, indices: torch.Tensor, seed: int, epoch: int,
                      auto_augment: str = "torchvision") -> torch.Tensor:
    """The train augmentation of images (uint8 [N, 3, H, W]), which are the samples indices
    (int64 [N]), in one call on the device that holds them."""
    return apply_train_augment(images, draw_train_params(indices, seed, epoch), auto_augment)
