"""Classify image files with a trained ViT.

    python -m vit.predict runs/my_run cat.jpg ship.png        # top-3 classes per image
    python -m vit.predict runs/my_run/last.pt cat.jpg --json  # machine-readable

Any image Pillow reads (PNG and JPEG included), of any size and mode, is turned into the
model's input the same way:
1. decoded to 8-bit RGB by the range its mode holds (to_rgb8): 8-bit modes as they are (greyscale
   replicated, a palette looked up, bilevel 0 or 255); 16-bit greyscale (I;16 and its byte orders)
   divided by 257, so 65535 is 255; 32-bit integer (I) and float (F) greyscale stretched from their
   smallest to their largest finite value, as these modes have no standard white level (a float
   image may hold 0..1 or any physical unit, an integer one any range); CMYK by
   R = (255 - C)(255 - K) / 255
   and likewise for G and B; a transparent image (RGBA, LA, PA, a palette with a transparent
   entry) composited over white, the page a viewer shows it on;
2. of a multi-frame file (an animation, a multi-page TIFF) the first frame, which the output says;
3. resized so that its shorter side is the model's image_size (32 for CIFAR-10), bilinear
   with antialiasing, keeping the aspect ratio;
4. center-cropped to image_size x image_size;
5. normalized with the CIFAR-10 training statistics, as the test images were.
An image that already has the input size goes through unchanged. The crop keeps objects
undistorted, at the cost of the edges of images that are far from square.

CHECKPOINT may be a run directory (its best.pt is used). Class names come from the run's
config.json ("class_names"), else CIFAR-10's standard ten. An unreadable image is reported in
its own row (and under "error" with --json) while the others are classified; the exit code is 1
when no image could be read, or with --strict when any could not. A bad checkpoint ends with a
one-line message on stderr and exit code 1; a bad flag with exit code 2 (vit/cli.py's rule).
"""
import json
import sys
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vit import cli
from vit.backends import backend_names
from vit.cli import RunError, one_line
from vit.evaluate import CONFIG_NAME, EMA_HELP, backend_problem, class_names_of, load_trained_model, predict_logits

TOP_K = 3
PREPROCESSING = ("8-bit RGB by the mode's range (16-bit / 257; 32-bit integer and float stretched min to max; "
                 "transparency over white); first frame; shorter side resized to image_size (bilinear, "
                 "antialiased); center crop to image_size x image_size; CIFAR-10 normalization")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
STRETCHED_MODES = ("I", "F")  # no standard white level: their own smallest to largest value
TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
WHITE = 255.0  # the background a transparent image is composited over


def to_rgb8(image: Image.Image) -> np.ndarray:
    """The pixels of a decoded image of any mode as uint8 RGB [H, W, 3] (the rules in the module docstring)."""
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES:
        grey = np.round(np.asarray(image).astype(np.float64) / 257)
    elif mode in STRETCHED_MODES:
        values = np.asarray(image).astype(np.float64)
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)  # a float image's NaN and infinities
        grey = np.round((values - low) * (255 / (high - low))) if high > low else np.zeros_like(values)
    elif mode == "CMYK":
        cmyk = np.asarray(image).astype(np.float64)
        return np.round((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255).astype(np.uint8)
    elif mode in TRANSPARENT_MODES or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA")).astype(np.float64)
        alpha = rgba[..., 3:] / 255
        return np.round(rgba[..., :3] * alpha + WHITE * (1 - alpha)).astype(np.uint8)
    else:  # 1, L, P, RGB and Pillow's other 8-bit modes
        return np.asarray(image.convert("RGB"))
    return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)


@dataclass
class LoadedImage:
    path: str
    pixels: torch.Tensor | None = None  # uint8 [3, image_size, image_size]; None when unreadable
    error: str | None = None  # why it could not be read
    note: str | None = None  # which frame of a multi-frame file was used


def load_image(path: str, image_size: int) -> LoadedImage:
    """An image file -> the model's input as uint8 [3, image_size, image_size] (see the module
    docstring), or the reason it cannot be read."""
    from torchvision.transforms import functional as TF  # here: its import takes a second a usage error need not wait

    try:
        with Image.open(path) as image:
            frames = getattr(image, "n_frames", 1)
            image.seek(0)
            rgb = to_rgb8(image)  # decodes the whole frame: a truncated file fails here
    except (OSError, ValueError, Image.DecompressionBombError) as error:  # missing, not an image, truncated, corrupt
        return LoadedImage(path, error=f"cannot read the image ({one_line(error)})")
    pixels = torch.from_numpy(rgb.copy()).permute(2, 0, 1)  # uint8 [3, H, W]
    pixels = TF.resize(pixels, image_size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    note = f"frame 1 of {frames} used" if frames > 1 else None
    return LoadedImage(path, TF.center_crop(pixels, [image_size, image_size]), note=note)


EXAMPLES = """\
examples:
  python -m vit.predict runs/20261125-101500 cat.jpg ship.png
      the top-3 classes of each image, with best.pt
  python -m vit.predict runs/20261125-101500/last.pt cat.jpg --json
      every class's probability, as JSON
"""


def build_parser() -> cli.Parser:
    parser = cli.Parser(
        prog="python -m vit.predict", epilog=EXAMPLES,
        description="Classify images with a trained ViT and print the top-3 classes with their probabilities. "
                    "Each image is decoded to 8-bit RGB by its mode's range (a multi-frame file: its first frame), "
                    "resized so that its shorter side is the model's input size (bilinear, antialiased; aspect ratio "
                    "kept), center-cropped to a square of that size and normalized as in training. An unreadable "
                    "image is reported in its row and the others are classified.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a checkpoint file, or a run directory (uses its best.pt); config.json must be beside it")
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="PNG or JPEG files (anything Pillow reads), any size")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: per image, the top-3 and the probabilities of all classes, or the "
                             "error that kept it from being read")
    parser.add_argument("--backend", choices=backend_names(),
                        help="attention/MLP implementation (default: the run's backend if it can run on the device, "
                             "else torch)")
    parser.add_argument("--device", type=cli.device, default="auto", help=cli.DEVICE_HELP)
    parser.add_argument("--ema", action="store_true", help=EMA_HELP)
    parser.add_argument("--strict", action="store_true",
                        help="exit with code 1 when any image cannot be read (without it: only when none can); "
                             "the readable ones are classified either way")
    return parser


def main(argv=None) -> int:
    return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = args.device
    if args.backend and (problem := backend_problem(args.backend, device)):
        parser.error(problem)
    trained = load_trained_model(args.checkpoint, device, args.backend, ema=args.ema)
    cfg = trained.model.cfg
    class_names = class_names_of(trained.config, cfg.num_classes, trained.checkpoint_path.parent / CONFIG_NAME)
    loaded = [load_image(path, cfg.image_size) for path in args.images]
    readable = [image for image in loaded if image.error is None]
    unreadable = len(loaded) - len(readable)
    if not readable:
        first = loaded[0]
        others = f" (and the {unreadable - 1} other images)" if unreadable > 1 else ""
        raise RunError(f"{first.path}: {first.error}{others}; no image could be read")
    probabilities = predict_logits(trained.model, torch.stack([image.pixels for image in readable]), device,
                                   batch_size=256).softmax(dim=1)
    rows = iter(probabilities)

    top_k = min(TOP_K, cfg.num_classes)
    predictions = []
    for image in loaded:
        if image.error is not None:
            predictions.append({"image": image.path, "error": image.error})
            continue
        probs = next(rows)
        top_probs, top_classes = probs.topk(top_k)
        predictions.append({
            "image": image.path,
            **({"note": image.note} if image.note else {}),
            "top": [{"class": class_names[c], "probability": p.item()} for p, c in zip(top_probs, top_classes)],
            "probabilities": {name: p.item() for name, p in zip(class_names, probs)},
        })

    if args.json:
        print(json.dumps({"checkpoint": str(trained.checkpoint_path), "weights": trained.weights,
                          "preprocessing": PREPROCESSING, "unreadable": unreadable, "predictions": predictions},
                         indent=2))
    else:
        for prediction in predictions:
            print(prediction["image"] + (f"  ({prediction['note']})" if "note" in prediction else ""))
            if "error" in prediction:
                print(f"  error: {prediction['error']}")
            for rank, top in enumerate(prediction.get("top", []), start=1):
                print(f"  {rank}. {top['class']:<12} {100 * top['probability']:6.2f}%")
    if unreadable:
        failed = f"{unreadable} of {len(loaded)} images could not be read (see their rows)"
        print(f"{'error' if args.strict else 'warning'}: {failed}", file=sys.stderr)
        return 1 if args.strict else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
