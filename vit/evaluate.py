"""Evaluate a trained ViT on the 10,000 CIFAR-10 test images.

    python -m vit.evaluate runs/my_run                  # uses runs/my_run/best.pt
    python -m vit.evaluate runs/my_run/last.pt --out-dir runs/my_run/eval_last
    python -m vit.evaluate runs/my_run --ema --out-dir runs/my_run/eval_ema   # the average of the weights

Reports top-1 accuracy, per-class accuracy and the mean cross-entropy (plain, without
the label smoothing training may use), and writes next to the checkpoint (or into
--out-dir):
- eval.json      all the numbers, the confusion matrix included;
- confusion.png  the 10x10 confusion matrix with counts;
- mistakes.png   the test images the model got wrong with the highest confidence.

write_report() is the function that does the work; the trainer calls it at the end of
training so that a finished run directory holds its own evaluation. The loading helpers
here (load_trained_model and friends) are shared with vit/predict.py.

Bad input (a missing or truncated checkpoint, a checkpoint whose own model_config differs from
config.json's model in any field, weights that do not fit the config, no config.json, no data set,
an --out-dir that cannot be written) ends with a one-line message on stderr and exit code 1; a bad
flag, --backend that cannot run on the device included, with exit code 2 (vit/cli.py's rule).
"""
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vit import cli
from vit.augment import normalize
from vit.backends import backend_names, default_backend, get_backend
from vit.checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT, load_checkpoint, read_config_file
from vit.checkpoint import CONFIG_FILE as CONFIG_NAME
from vit.cli import RunError, one_line
from vit.data import load_cifar10
from vit.environment import atomic_write
from vit.config import build_configs, flat_values
from vit.fields import ConfigError
from vit.model import ViT, ViTConfig, model_config_differences
from vit.timm_interop import build_model

CHECKPOINT_NAMES = (BEST_CHECKPOINT, LAST_CHECKPOINT)  # what a run directory is searched for, in this order
# The order of CIFAR-10's batches.meta; used when a run's config.json has no class_names.
CIFAR10_CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
NUM_MISTAKES_SHOWN = 25  # a 5x5 grid in mistakes.png
LOSS_DEFINITION = "mean cross-entropy over the test images, without label smoothing"
EMA_HELP = ("use the checkpoint's average of the weights (saved by runs with train.py --ema-decay) instead of the "
            "weights themselves")


# ---------------------------------------------------------------------------------------
# Loading a trained model: checkpoint + the config.json beside it


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint file itself, or a run directory's best.pt (last.pt when there is no best.pt)."""
    path = Path(path)
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        raise RunError(f"{path}: no checkpoint in this directory (looked for {' and '.join(CHECKPOINT_NAMES)})")
    if not path.exists():
        raise RunError(f"{path}: no such checkpoint file or run directory")
    return path


def read_run_config(checkpoint_path: Path) -> dict:
    """The run's config.json, which lives next to its checkpoints."""
    config_path = checkpoint_path.parent / CONFIG_NAME
    if not config_path.is_file():
        raise RunError(f"{config_path}: missing; the model is rebuilt from the {CONFIG_NAME} the trainer writes beside its checkpoints")
    try:
        return read_config_file(config_path)
    except (OSError, ValueError) as error:
        raise RunError(one_line(error)) from None


def model_config_from(config: dict, config_path: Path) -> ViTConfig:
    """config.json's model through the configs' one loader (vit/config.py); fields this version
    does not have are left out."""
    try:
        return build_configs(flat_values({"model": config["model"]}, str(config_path), drop_unknown=True))[0]
    except ConfigError as error:
        raise RunError(f"{config_path}: \"model\" is not a valid ViTConfig ({one_line(error)})") from None


def backend_problem(requested: str, device: torch.device) -> str | None:
    """Why --backend `requested` cannot run on the device (a usage error: exit code 2), or None."""
    reason = get_backend(requested).unavailable_reason(device)
    return f"--backend {requested} cannot run on {device}: {reason}" if reason else None


def choose_backend(requested: str | None, configured: str, device: torch.device) -> str:
    """--backend when given (it must be able to run on the device); otherwise the backend
    the run trained with when it can run here, else the device's default (vit.backends.default_backend)."""
    if requested is not None:
        problem = backend_problem(requested, device)
        if problem:
            raise RunError(problem)
        return requested
    chosen = default_backend(device, preferred=configured)
    if chosen != configured:
        print(f"note: the run's backend {configured!r} cannot run on {device}; using {chosen}", file=sys.stderr)
    return chosen


def read_checkpoint(checkpoint_path: Path) -> dict:
    try:
        # Onto the CPU, so the optimizer state we do not need never takes GPU memory.
        return load_checkpoint(checkpoint_path, "cpu")
    except (OSError, RuntimeError) as error:
        raise RunError(one_line(error)) from None


def _strip_wrapper_prefix(state_dict: dict) -> dict:
    """State dicts saved from a torch.compile'd or DDP-wrapped model carry a prefix on every key
    (both prefixes, in either order, when the two wrappers are stacked)."""
    while state_dict:
        prefix = next((p for p in ("_orig_mod.", "module.") if all(key.startswith(p) for key in state_dict)), None)
        if prefix is None:
            break
        state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def load_weights(model: ViT, state_dict: dict, checkpoint_path: Path):
    """load_state_dict, but a mismatch becomes one line naming the first bad tensor."""
    expected = model.state_dict()
    problems = [f"{key} is {list(value.shape)} in the checkpoint but {list(expected[key].shape)} in the model"
                for key, value in state_dict.items() if key in expected and value.shape != expected[key].shape]
    problems += [f"{key} is missing from the checkpoint" for key in expected if key not in state_dict]
    problems += [f"{key} is in the checkpoint but not in the model" for key in state_dict if key not in expected]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise RunError(f"{checkpoint_path}: weights do not fit the model in {CONFIG_NAME}: {problems[0]}{more}")
    model.load_state_dict(state_dict)


def check_model_identity(checkpoint: dict, model_config: dict, checkpoint_path: Path):
    """Refuse a checkpoint whose own model_config describes another model than config.json's
    "model" (vit.model.model_config_differences): the weights would run in a model they were not
    trained in, shapes equal or not. A checkpoint without model_config has only its shapes to check.
    Shared with train.py --resume."""
    saved = checkpoint.get("model_config")
    if isinstance(saved, dict):
        differences = model_config_differences(saved, model_config)
        if differences:
            raise RunError(f"{checkpoint_path}: the checkpoint's model differs from the one in {CONFIG_NAME} in "
                           f"{'; '.join(differences)}; restore the run's own {CONFIG_NAME}")


@dataclass
class TrainedModel:
    model: ViT  # on the device, in eval mode
    config: dict  # the run's config.json
    checkpoint_path: Path
    epoch: int | None  # the epoch the checkpoint was saved at, when it says
    weights: str = "model"  # "model", or "ema": the average of the weights the run kept


def load_trained_model(path: str | os.PathLike, device: torch.device, backend: str | None = None,
                       ema: bool = False) -> TrainedModel:
    """A checkpoint file or run directory -> the trained model, rebuilt from the run's config.json.
    ema: load the checkpoint's average of the weights (TrainConfig.ema_decay) instead of the weights."""
    checkpoint_path = find_checkpoint(path)
    config = read_run_config(checkpoint_path)
    model_config = model_config_from(config, checkpoint_path.parent / CONFIG_NAME)
    model_config.backend = choose_backend(backend, model_config.backend, device)
    checkpoint = read_checkpoint(checkpoint_path)
    weights = "ema" if ema else "model"
    if weights not in checkpoint:
        raise RunError(f"{checkpoint_path}: has no average of the weights; the run did not keep one "
                       f"(train.py --ema-decay), evaluate it without --ema")
    check_model_identity(checkpoint, config["model"], checkpoint_path)
    try:
        model = build_model(model_config)
    except ValueError as error:  # a timm model the backend cannot fuse, or no longer the recorded one
        raise RunError(f"{checkpoint_path}: {one_line(error)}") from None
    load_weights(model, _strip_wrapper_prefix(checkpoint[weights]), checkpoint_path)
    epoch = checkpoint.get("epoch")
    return TrainedModel(model.to(device).eval(), config, checkpoint_path, int(epoch) if epoch is not None else None,
                        weights)


def class_names_of(config: dict, num_classes: int, config_path: Path) -> list[str]:
    """config.json's class_names (the trainer stores them), else CIFAR-10's standard names."""
    names = config.get("class_names", CIFAR10_CLASS_NAMES)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) != num_classes:
        raise RunError(f"{config_path}: class_names must be a list of {num_classes} names, one per model output")
    return names


# ---------------------------------------------------------------------------------------
# Evaluation


@torch.inference_mode()
def predict_logits(model, images_uint8: torch.Tensor, device, batch_size: int = 500, precision: str = "fp32") -> torch.Tensor:
    """The model's logits for uint8 images [N, 3, H, W], as float32 [N, num_classes] on the CPU.

    The caller's model is put in eval mode (no dropout) for the pass and handed back in
    the mode it came in, so the trainer can call this mid-run.
    """
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # fp16: a run's own, from Trainer.finish
    if precision not in autocast:
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', got {precision!r}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    chunks = []
    try:
        for start in range(0, len(images_uint8), batch_size):
            images = normalize(images_uint8[start:start + batch_size].to(device, non_blocking=True))
            with torch.autocast(device.type, dtype=autocast[precision], enabled=autocast[precision] is not None):
                logits = model(images)
            chunks.append(logits.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks)


def summarize(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict:
    """All the numbers of eval.json from the logits and true labels."""
    num_classes = len(class_names)
    if logits.shape[1] != num_classes:
        raise ValueError(f"the model has {logits.shape[1]} outputs but there are {num_classes} class names")
    labels = labels.cpu()
    probabilities = logits.softmax(dim=1)
    confidences, predictions = probabilities.max(dim=1)
    correct = predictions == labels
    # confusion[true, predicted]: one bincount over the flattened (true, predicted) pairs.
    confusion = torch.bincount(labels * num_classes + predictions, minlength=num_classes**2).view(num_classes, num_classes)
    class_sizes = confusion.sum(dim=1)
    per_class = {name: (confusion[c, c].item() / class_sizes[c].item() if class_sizes[c] else None)
                 for c, name in enumerate(class_names)}
    wrong = (~correct).nonzero().squeeze(1)
    most_confident_wrong = wrong[confidences[wrong].argsort(descending=True)][:NUM_MISTAKES_SHOWN]
    return {
        "num_images": len(labels),
        "correct": int(correct.sum()),
        "accuracy": int(correct.sum()) / len(labels),
        "loss": F.cross_entropy(logits, labels).item(),
        "loss_definition": LOSS_DEFINITION,
        "class_names": class_names,
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
        "confusion_matrix_layout": "confusion_matrix[true class][predicted class], classes in the order of class_names",
        "most_confident_mistakes": [
            {"index": int(i), "true": class_names[labels[i]], "predicted": class_names[predictions[i]],
             "confidence": confidences[i].item()}
            for i in most_confident_wrong
        ],
    }




def write_report(model, images_uint8: torch.Tensor, labels: torch.Tensor, class_names: list[str], out_dir,
                 device, batch_size: int = 500, precision: str = "fp32", source: dict | None = None) -> dict:
    """Evaluate the model (already on `device`) on uint8 images [N, 3, H, W] with int64 labels,
    write eval.json, confusion.png and mistakes.png into out_dir, and return eval.json's dict.

    precision: "fp32", or "bf16" / "fp16" for that autocast. source: what was evaluated (checkpoint,
    epoch, ...), stored under "source" in eval.json.
    """
    from vit import plots  # matplotlib is imported only by what draws: vit.predict never pays for it

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logits = predict_logits(model, images_uint8, device, batch_size, precision)
    report = {"source": source or {}, "precision": precision, **summarize(logits, labels, class_names)}

    plots.plot_confusion(report["confusion_matrix"], class_names, out_dir / "confusion.png",
                         title=f"Confusion matrix, {report['num_images']} test images, accuracy {100 * report['accuracy']:.2f}%")
    mistakes = report["most_confident_mistakes"]
    plots.plot_mistakes(
        images_uint8[[m["index"] for m in mistakes]].cpu(),
        [m["true"] for m in mistakes], [m["predicted"] for m in mistakes], [m["confidence"] for m in mistakes],
        out_dir / "mistakes.png",
        title=f"The {len(mistakes)} most confident mistakes (true class, predicted class, probability of the prediction)",
    )
    atomic_write(out_dir / "eval.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
    return report


def format_summary(report: dict) -> str:
    """The short table the CLI prints."""
    lines = [
        f"test images  {report['num_images']}",
        f"accuracy     {100 * report['accuracy']:.2f}%  ({report['correct']} correct)",
        f"loss         {report['loss']:.4f}  ({report['loss_definition']})",
        "",
        f"{'class':<12} {'accuracy':>9}",
    ]
    for name, accuracy in report["per_class_accuracy"].items():
        lines.append(f"{name:<12} {'n/a' if accuracy is None else f'{100 * accuracy:.2f}%':>9}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Command line


EXAMPLES = """\
examples:
  python -m vit.evaluate runs/20261125-101500
      best.pt of a run, against the data set its config.json names
  python -m vit.evaluate runs/20261125-101500/last.pt --out-dir runs/20261125-101500/eval_last
      the last epoch's weights, the report in a folder of its own
  python -m vit.evaluate runs/20261125-101500 --ema --out-dir runs/20261125-101500/eval_ema
      the average of the weights saved with best.pt (runs with --ema-decay)
"""


def build_parser() -> cli.Parser:
    parser = cli.Parser(
        prog="python -m vit.evaluate", epilog=EXAMPLES,
        description="Evaluate a trained ViT on the CIFAR-10 test set: accuracy, per-class accuracy, "
                    "loss, confusion matrix and most confident mistakes.",
    )
    parser.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT",
                        help="a run directory (its best.pt is used, last.pt if there is no best.pt) or a checkpoint "
                             "file; the run's config.json must be next to the checkpoint")
    parser.add_argument("--data-dir", help="folder holding cifar-10-batches-py, or that folder itself "
                                           "(default: train.data_dir from the run's config.json, a relative path "
                                           "taken from the current directory, as the trainer took it)")
    parser.add_argument("--backend", choices=backend_names(),
                        help="attention/MLP implementation (default: the run's backend if it can run on the device, "
                             "else torch)")
    parser.add_argument("--device", type=cli.device, default="auto", help=cli.DEVICE_HELP)
    parser.add_argument("--ema", action="store_true", help=EMA_HELP)
    parser.add_argument("--batch-size", type=cli.positive_int, default=500, help="images per forward pass")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="fp32, or bf16 autocast")
    parser.add_argument("--out-dir", help="where to write eval.json, confusion.png and mistakes.png (default: the "
                                          "checkpoint's directory, replacing an earlier evaluation there)")
    return parser


def main(argv=None) -> int:
    return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = args.device
    if args.backend and (problem := backend_problem(args.backend, device)):
        parser.error(problem)
    # The model first: a bad checkpoint is reported without waiting for the data set to load.
    trained = load_trained_model(args.path, device, args.backend, ema=args.ema)
    out_dir = cli.make_dir(args.out_dir, "--out-dir") if args.out_dir else trained.checkpoint_path.parent
    data_dir = args.data_dir or trained.config.get("train", {}).get("data_dir")
    if not data_dir:
        raise RunError(f"{trained.checkpoint_path.parent / CONFIG_NAME} has no train.data_dir; pass --data-dir")
    cifar = load_cifar10(data_dir, download=False)
    if trained.model.cfg.num_classes != len(cifar.class_names):
        raise RunError(f"the model has {trained.model.cfg.num_classes} outputs but CIFAR-10 has {len(cifar.class_names)} classes")
    source = {"checkpoint": str(trained.checkpoint_path), "epoch": trained.epoch, "data_dir": str(data_dir),
              "device": str(device), "backend": trained.model.cfg.backend, "weights": trained.weights,
              "model": asdict(trained.model.cfg)}
    try:
        report = write_report(trained.model, cifar.test_images, cifar.test_labels, cifar.class_names, out_dir,
                              device, args.batch_size, args.precision, source)
    except torch.OutOfMemoryError:
        raise RunError(f"out of memory on {device} at --batch-size {args.batch_size}; pass a smaller one") from None
    epoch = f" (epoch {trained.epoch})" if trained.epoch is not None else ""
    weights = ", the average of the weights" if trained.weights == "ema" else ""
    print(f"checkpoint   {trained.checkpoint_path}{epoch}{weights}")
    print(format_summary(report))
    print(f"\nwrote {out_dir / 'eval.json'}, confusion.png, mistakes.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
