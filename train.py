"""Train the ViT on CIFAR-10.

    torchrun --nproc_per_node=8 train.py             # data-parallel; --batch-size stays global

    python train.py                                  # the full recipe, defaults below
    python train.py --device cpu --epochs 2 --train-subset 2000 --depth 2 --dim 64 --heads 4 --mlp-dim 64
    python train.py --resume runs/20261125-101500    # continue an interrupted run
"""
import argparse
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

from vit import distributed
from vit.backends import backend_names, get_backend
from vit.checkpoint import read_config, write_config
from vit.data import DataError
from vit.environment import parse_device
from vit.model import ViTConfig
from vit.trainer import NonFiniteLoss, TrainConfig, build_trainer

MODEL_FLAGS = {"image_size": "--image-size", "patch_size": "--patch-size", "num_classes": "--num-classes", "dim": "--dim",
               "depth": "--depth", "heads": "--heads", "mlp_dim": "--mlp-dim", "dropout": "--dropout",
               "backend": "--backend"}
# What may differ on --resume: where and how the run executes, never what it computes.
RESUME_MAY_CHANGE = {"device", "num_workers", "progress", "resume", "data_dir"}


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or positive, got {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be zero or positive, got {text}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the ones that are resolved at run time (None)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    m, t = ViTConfig(), TrainConfig()
    p = argparse.ArgumentParser(description="Train a Vision Transformer from scratch on CIFAR-10.",
                                formatter_class=HelpFormatter, allow_abbrev=False)
    g = p.add_argument_group("model")
    g.add_argument("--backend", choices=backend_names(), default=None,
                   help="implementation of attention and LayerNorm+MLP (default: triton on CUDA when available, else torch)")
    g.add_argument("--image-size", type=positive_int, default=m.image_size, help="input height and width")
    g.add_argument("--patch-size", type=positive_int, default=m.patch_size, help="patch height and width")
    g.add_argument("--num-classes", type=positive_int, default=m.num_classes, help=argparse.SUPPRESS)
    g.add_argument("--dim", type=positive_int, default=m.dim, help="hidden size")
    g.add_argument("--depth", type=positive_int, default=m.depth, help="number of transformer blocks")
    g.add_argument("--heads", type=positive_int, default=m.heads, help="attention heads (must divide --dim)")
    g.add_argument("--mlp-dim", type=positive_int, default=m.mlp_dim, help="MLP hidden size")
    g.add_argument("--dropout", type=non_negative_float, default=m.dropout, help="dropout on embeddings and attention output")
    g = p.add_argument_group("recipe")
    g.add_argument("--epochs", type=positive_int, default=t.epochs)
    g.add_argument("--batch-size", type=positive_int, default=t.batch_size, help="global batch size")
    g.add_argument("--lr", type=non_negative_float, default=t.lr, help="peak learning rate")
    g.add_argument("--min-lr", type=non_negative_float, default=t.min_lr, help="learning rate at the last step")
    g.add_argument("--warmup-epochs", type=non_negative_float, default=t.warmup_epochs, help="linear warmup, per step")
    g.add_argument("--weight-decay", type=non_negative_float, default=t.weight_decay, help="Adam's coupled L2")
    g.add_argument("--label-smoothing", type=non_negative_float, default=t.label_smoothing)
    g.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None,
                   help="autocast precision (default: bf16 on CUDA, fp32 on the CPU)")
    g.add_argument("--seed", type=non_negative_int, default=t.seed, help="seeds python, numpy, torch and the data order")
    g = p.add_argument_group("run")
    g.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    g.add_argument("--data-dir", default=t.data_dir,
                   help="folder holding cifar-10-batches-py, or that folder itself; downloaded there if missing")
    g.add_argument("--out-dir", default=None, help="run directory (default: runs/<timestamp>); never overwritten")
    g.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    g.add_argument("--num-workers", type=non_negative_int, default=t.num_workers, help="DataLoader workers (--augment cpu)")
    g.add_argument("--augment", choices=["gpu", "cpu"], default=None,
                   help="batched augmentation on the device, or torchvision per image in workers (default: gpu on CUDA)")
    g.add_argument("--train-subset", type=positive_int, default=None, metavar="N", help="train on the first N images only")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def typed_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the flags the user actually typed, as opposed to defaults."""
    return {action.dest for action in parser._actions for opt in action.option_strings
            if any(arg == opt or arg.startswith(opt + "=") for arg in argv)}


def resolve(args, parser, device: torch.device, ctx: distributed.Context) -> tuple[ViTConfig, TrainConfig, Path]:
    """Fill the defaults that depend on the machine and check what argparse cannot."""
    if args.backend is None:
        # Triton's interpreter (TRITON_INTERPRET=1) can run the kernels on the CPU, but only for
        # checking them: the CPU default stays the torch reference.
        use_triton = (device.type == "cuda" and "triton" in backend_names()
                      and get_backend("triton").unavailable_reason(device) is None)
        args.backend = "triton" if use_triton else "torch"
    reason = get_backend(args.backend).unavailable_reason(device)
    if reason:
        parser.error(f"--backend {args.backend} cannot run here: {reason}")
    if args.precision is None:
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    if args.precision != "fp32" and device.type == "cpu":
        parser.error(f"--precision {args.precision} needs CUDA; use --precision fp32 on the CPU")
    if args.augment is None:
        args.augment = "gpu" if device.type == "cuda" else "cpu"
    if args.dim % args.heads:
        parser.error(f"--heads {args.heads} does not divide --dim {args.dim}")
    if args.image_size % args.patch_size:
        parser.error(f"--patch-size {args.patch_size} does not divide --image-size {args.image_size}")
    if args.min_lr > args.lr:
        parser.error(f"--min-lr {args.min_lr} is above --lr {args.lr}")
    if args.dropout >= 1:
        parser.error(f"--dropout must be below 1, got {args.dropout}")
    try:
        model_cfg = ViTConfig(**{k: getattr(args, k) for k in MODEL_FLAGS})
    except ValueError as error:
        parser.error(str(error))
    train_fields = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in train_fields}
    values["device"] = str(device)
    train_cfg = TrainConfig(**values)
    if args.train_subset is not None and args.train_subset < args.batch_size:
        parser.error(f"--train-subset {args.train_subset} is smaller than one batch of {args.batch_size}")
    if args.batch_size % ctx.world_size:
        parser.error(f"--batch-size {args.batch_size} (global) is not divisible by the {ctx.world_size} processes")
    # Rank 0 names and claims the directory; the others take its word (their clocks differ).
    run_dir = None
    if ctx.is_main:
        run_dir = Path(args.out_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
        if run_dir.exists() and any(run_dir.iterdir()):
            parser.error(f"run directory {run_dir} exists and is not empty; pick another --out-dir, or --resume it")
    run_dir = Path(distributed.broadcast_object(str(run_dir) if run_dir else None))
    train_cfg.out_dir = str(run_dir)
    return model_cfg, train_cfg, run_dir


def resolve_resume(args, parser, typed: set[str], device: torch.device,
                   ctx: distributed.Context) -> tuple[ViTConfig, TrainConfig, Path]:
    run_dir = Path(args.resume)
    if not (run_dir / "config.json").exists() or not (run_dir / "last.pt").exists():
        parser.error(f"--resume {run_dir}: needs a run directory with config.json and last.pt")
    model_cfg, train_cfg = read_config(run_dir)
    saved = {**asdict(model_cfg), **asdict(train_cfg)}
    conflicts = sorted(f"--{k.replace('_', '-')}" for k in typed - RESUME_MAY_CHANGE
                       if k in saved and getattr(args, k) != saved[k])
    if conflicts:
        parser.error(f"--resume continues the saved recipe; these flags differ from it: {', '.join(conflicts)}")
    for k in RESUME_MAY_CHANGE & typed:
        if k in saved:
            setattr(train_cfg, k, getattr(args, k))
    if "device" not in typed and torch.device(train_cfg.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"the run trained on {train_cfg.device}; pass --device cpu to resume it here")
    if train_cfg.batch_size % ctx.world_size:
        parser.error(f"the run's global batch {train_cfg.batch_size} is not divisible by the {ctx.world_size} processes")
    train_cfg.device = str(device)
    reason = get_backend(model_cfg.backend).unavailable_reason(device)
    if reason:
        parser.error(f"the run's backend {model_cfg.backend} cannot run here: {reason}")
    return model_cfg, train_cfg, run_dir


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    typed = typed_flags(parser, argv)
    try:
        device = parse_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    ctx = distributed.setup(device.type)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)  # one GPU per process
    try:
        return run(args, parser, typed, device, ctx)
    finally:
        distributed.teardown(ctx)


def run(args, parser, typed, device, ctx) -> int:
    say = print if ctx.is_main else (lambda *a, **k: None)
    if args.resume:
        model_cfg, train_cfg, run_dir = resolve_resume(args, parser, typed, device, ctx)
    else:
        model_cfg, train_cfg, run_dir = resolve(args, parser, device, ctx)
    try:
        trainer = build_trainer(model_cfg, train_cfg, run_dir, resume=bool(args.resume), ctx=ctx)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not args.resume and ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, model_cfg, train_cfg, trainer.test_set.class_names, trainer.device)
    say(trainer.describe())
    say(f"run directory: {run_dir}" + (f" (resuming after epoch {trainer.start_epoch})" if args.resume else ""))
    try:
        summary = trainer.fit()
    except NonFiniteLoss as error:
        say(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        say(f"\ninterrupted; continue with: python train.py --resume {run_dir}", file=sys.stderr)
        return 130
    trainer.finish()
    say(f"best test accuracy {summary.best_acc:.2%}; outputs in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
