"""Classify image files with a trained ViT.

    python -m vit.predict runs/my_run cat.jpg ship.png        # top-3 classes per image
    python -m vit.predict runs/my_run/last.pt cat.jpg --json  # machine-readable

Any image Pillow reads (PNG and JPEG included), of any size and mode, is turned into the
model's input the same way:
1. converted to RGB (grayscale is replicated, an alpha channel is dropped);
2. resized so that its shorter side is the model's image_size (32 for CIFAR-10), bilinear
   with antialiasing, keeping the aspect ratio;
3. center-cropped to image_size x image_size;
4. normalized with the CIFAR-10 training statistics, as the test images were.
An image that already has the input size goes through unchanged. The crop keeps objects
undistorted, at the cost of the edges of images that are far from square.

CHECKPOINT may be a run directory (its best.pt is used). Class names come from the run's
config.json ("class_names"), else CIFAR-10's standard ten. Bad input (missing or truncated
checkpoint, an unreadable image, ...) ends with a one-line message on stderr and exit code 1;
a bad flag with exit code 2 (vit/cli.py's rule).
"""
import json
import sys

import torch
from PIL import Image
from torchvision.transforms import functional as TF

from vit import cli
from vit.backends import backend_names
from vit.cli import RunError, one_line
from vit.evaluate import CONFIG_NAME, EMA_HELP, class_names_of, load_trained_model, predict_logits

TOP_K = 3
PREPROCESSING = ("RGB; shorter side resized to image_size (bilinear, antialiased); "
                 "center crop to image_size x image_size; CIFAR-10 normalization")


def load_image(path: str, image_size: int) -> torch.Tensor:
    """An image file -> the model's input as uint8 [3, image_size, image_size] (see the module docstring)."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")  # decodes the whole file: a truncated one fails here
    except (OSError, Image.DecompressionBombError) as error:  # missing, not an image, truncated, corrupt
        raise RunError(f"{path}: cannot read the image ({one_line(error)})") from None
    pixels = TF.pil_to_tensor(image)  # uint8 [3, H, W]
    pixels = TF.resize(pixels, image_size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(pixels, [image_size, image_size])


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
                    "Each image is converted to RGB, resized so that its shorter side is the model's input size "
                    "(bilinear, antialiased; aspect ratio kept), center-cropped to a square of that size and "
                    "normalized as in training.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a checkpoint file, or a run directory (uses its best.pt); config.json must be beside it")
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="PNG or JPEG files (anything Pillow reads), any size")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: per image, the top-3 and the probabilities of all classes")
    parser.add_argument("--backend", choices=backend_names(),
                        help="attention/MLP implementation (default: the run's backend if it can run on the device, "
                             "else torch)")
    parser.add_argument("--device", type=cli.device, default="auto", help=cli.DEVICE_HELP)
    parser.add_argument("--ema", action="store_true", help=EMA_HELP)
    return parser


def main(argv=None) -> int:
    return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    device = args.device
    trained = load_trained_model(args.checkpoint, device, args.backend, ema=args.ema)
    cfg = trained.model.cfg
    class_names = class_names_of(trained.config, cfg.num_classes, trained.checkpoint_path.parent / CONFIG_NAME)
    # Read every image before classifying any, so a bad file fails the command up front.
    images = torch.stack([load_image(path, cfg.image_size) for path in args.images])
    probabilities = predict_logits(trained.model, images, device, batch_size=256).softmax(dim=1)

    top_k = min(TOP_K, cfg.num_classes)
    predictions = []
    for path, probs in zip(args.images, probabilities):
        top_probs, top_classes = probs.topk(top_k)
        predictions.append({
            "image": path,
            "top": [{"class": class_names[c], "probability": p.item()} for p, c in zip(top_probs, top_classes)],
            "probabilities": {name: p.item() for name, p in zip(class_names, probs)},
        })

    if args.json:
        print(json.dumps({"checkpoint": str(trained.checkpoint_path), "weights": trained.weights,
                          "preprocessing": PREPROCESSING, "predictions": predictions}, indent=2))
    else:
        for prediction in predictions:
            print(prediction["image"])
            for rank, top in enumerate(prediction["top"], start=1):
                print(f"  {rank}. {top['class']:<12} {100 * top['probability']:6.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
