"""A run's configuration: the training recipe and the run's settings (TrainConfig), and how a
configuration is read from flags, config files and recipes into the two dataclasses
(TrainConfig and vit.model.ViTConfig).

Every value passes through one path: the dataclasses' defaults, then a recipe (vit/recipes.py),
then a config file (`--config FILE`, JSON, or YAML when PyYAML is installed; a run's config.json
is one), then the flags typed on the command line; the dataclasses' `__post_init__` checks the
result. Flags are generated from the fields (vit/fields.py), so a new option is one field.
"""
import argparse
import json
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from vit import cli
from vit.augment import AUTO_AUGMENT_VARIANTS
from vit.backends import default_backend
from vit.environment import parse_device
from vit.fields import ConfigError, check_fields, choices_of, option, value_type
from vit.mixing import SMOOTHING_CONVENTIONS
from vit.model import ViTConfig

OPTIMIZERS = ("adam", "adamw")
PRECISIONS = ("bf16", "fp16", "fp32")
# Settings that no longer exist, with what replaced them: a flag or a config file naming one is
# refused with this reason, and --resume reads a saved run's config.json that holds one without it.
REMOVED_FIELDS = {
    "augment": "training augments in batches on the training device (vit/augment.py), the only pipeline",
    "num_workers": "no DataLoader workers remain to set; training augments in batches on the training device",
}


@dataclass
class TrainConfig:
    """The recipe and the run's settings; defaults are the reference's table (the "default"
    recipe of vit/recipes.py). Every field but recipe and extra is a flag of train.py."""
    epochs: int = option(200, bound="positive", help="passes over the training set; the cosine schedule ends with "
                                                     "the last")
    batch_size: int = option(128, bound="positive", help="images per step, over all processes together")
    lr: float = option(1e-3, bound="positive", help="peak learning rate, reached at the end of warmup")
    min_lr: float = option(1e-5, bound="non_negative", help="learning rate at the last step (at most --lr)")
    warmup_epochs: float = option(5.0, bound="non_negative", help="linear warmup to --lr, per step; fractions allowed")
    optimizer: str = option("adam", choices=OPTIMIZERS,
                            help="adam: Adam, coupled L2 weight decay on every parameter; adamw: AdamW, decoupled "
                                 "weight decay on the weight matrices, none on norms, biases, position embedding and "
                                 "class token")
    weight_decay: float = option(5e-5, bound="non_negative",
                                 help="the optimizer's weight decay: coupled L2 with adam, decoupled with adamw")
    label_smoothing: float = option(0.1, bound="fraction", help="label smoothing of the cross-entropy (train and test "
                                                                "loss)")
    label_smoothing_convention: str = option(
        "torch", choices=SMOOTHING_CONVENTIONS,
        help="where --label-smoothing S goes: torch keeps 1 - S + S/K on the true class and S/K on each other "
             "(F.cross_entropy's); reference keeps 1 - S and S/(K - 1) (the reference code's)")
    auto_augment: str = option("torchvision", choices=tuple(AUTO_AUGMENT_VARIANTS),
                               help="AutoAugment variant (CIFAR10 policy): torchvision's (zero fill, rotation by "
                                    "+-theta, nearest shears) or the reference code's (grey 128 fill, rotation by "
                                    "+theta, bicubic shears)")
    mixup_alpha: float = option(0.0, bound="non_negative",
                                help="MixUp: a mixed sample blends with its partner by a Beta(alpha, alpha) share; 0 "
                                     "turns MixUp off")
    cutmix_alpha: float = option(0.0, bound="non_negative",
                                 help="CutMix: a mixed sample gets a box of its partner covering a 1 - Beta(alpha, "
                                      "alpha) share; 0 turns CutMix off")
    mix_prob: float = option(1.0, bound="probability", help="chance that a sample is mixed, when --mixup-alpha or "
                                                            "--cutmix-alpha is positive")
    mix_switch_prob: float = option(0.5, bound="probability",
                                    help="chance that a mixed sample takes CutMix rather than MixUp, when both alphas "
                                         "are positive")
    ema_decay: float = option(0.0, bound="fraction",
                              help="an average of the weights, each step decay * average + (1 - decay) * weights, "
                                   "evaluated after every epoch beside the model and saved in the checkpoints; 0 "
                                   "turns it off")
    recipe: str = option("default", flag=False, help="the preset (vit/recipes.py) the values started from")
    precision: str = option("bf16", choices=PRECISIONS, default_help="bf16 on CUDA, fp32 on the CPU",
                            help="autocast precision")
    device: str = option("cuda", default_help="auto, which is cuda when available, else cpu",
                         help="cuda, cuda:N or cpu")
    seed: int = option(0, bound="seed", help="seeds python, numpy, torch and the data order")
    train_subset: int | None = option(None, bound="positive", metavar="N",
                                      help="train on the first N images only (default: all of them)")
    compile: bool = option(False, help="torch.compile the model")
    # CUDA only, single process, not with fp16 or compile (vit/trainer.py).
    cuda_graph: bool = option(False, help="capture the whole training step in a CUDA graph and replay it each step "
                                          "(CUDA only; bf16 or fp32, one process, not with --compile)")
    data_dir: str = option("data", help="folder holding cifar-10-batches-py, or that folder itself; downloaded there "
                                        "if missing")
    out_dir: str | None = option(None, help="run directory, never overwritten (default: runs/<timestamp>, with -2, "
                                            "-3, ... if taken)")
    progress: bool = option(True, help="a live progress bar")
    extra: dict = option(flag=False, default_factory=dict, help="free-form notes kept with the run")

    def __post_init__(self):
        check_fields(self)
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr {self.min_lr} is above lr {self.lr}; the schedule only decays", "min_lr", "lr")
        if self.train_subset is not None and self.train_subset < self.batch_size:
            raise ConfigError(f"train_subset {self.train_subset} is smaller than one batch of {self.batch_size}",
                              "train_subset", "batch_size")

    @property
    def mixing(self) -> bool:
        """Whether the loader mixes samples (CutMix or MixUp) and hands out soft targets."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


CONFIG_CLASSES = (ViTConfig, TrainConfig)


# ---------------------------------------------------------------------------- values -> configs

def split(values: dict) -> tuple[dict, dict]:
    """A flat {field: value} into ViTConfig's and TrainConfig's; ConfigError for any other name."""
    model_fields = {f.name for f in fields(ViTConfig)}
    train_fields = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - model_fields - train_fields)
    refuse_removed(unknown)
    if unknown:
        raise ConfigError(f"not a ViTConfig or TrainConfig field: {', '.join(unknown)}", *unknown)
    return ({k: v for k, v in values.items() if k in model_fields},
            {k: v for k, v in values.items() if k in train_fields})


def refuse_removed(names, source: str | None = None):
    """ConfigError saying what replaced the first removed setting among names, if any."""
    for name in names:
        if name in REMOVED_FIELDS:
            prefix = f"{source}: " if source else ""
            raise ConfigError(f"{prefix}{name} was removed: {REMOVED_FIELDS[name]}", name)


def build_configs(values: dict) -> tuple[ViTConfig, TrainConfig]:
    """The two dataclasses from flat values, the defaults for what they leave out."""
    model_values, train_values = split(values)
    return ViTConfig(**model_values), TrainConfig(**train_values)


def flat_values(config: dict, source: str, drop_unknown: bool = False) -> dict:
    """A config's {field: value}: either flat, or in "model" and "train" sections as a run's
    config.json holds them (whose other top-level keys record the run: class names, versions).
    drop_unknown: leave out the fields this version does not have (a run's record written by
    another version) instead of refusing them."""
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: expected a mapping of field names to values")
    if not any(isinstance(config.get(section), dict) for section in ("model", "train")):
        known = {f.name for cls in CONFIG_CLASSES for f in fields(cls)}
        return {k: v for k, v in config.items() if k in known or not drop_unknown}
    values = {}
    for section, cls in (("model", ViTConfig), ("train", TrainConfig)):
        known = {f.name for f in fields(cls)}
        part = config.get(section, {})
        if not isinstance(part, dict):
            raise ConfigError(f"{source}: \"{section}\" must be a mapping of {cls.__name__} fields to values")
        unknown = sorted(set(part) - known)
        if drop_unknown:
            part = {k: v for k, v in part.items() if k in known}
        elif unknown:
            refuse_removed(unknown, source)
            raise ConfigError(f"{source}: not a {cls.__name__} field: {', '.join(f'{section}.{u}' for u in unknown)}",
                              *unknown)
        values.update(part)
    return values


def read_config_file(path: str | os.PathLike, drop_unknown: bool = False) -> dict:
    """A config file's flat values (flat_values), checked to make the two configs: JSON, or YAML
    (.yaml, .yml) when PyYAML is installed. Raises ConfigError with a one-line message naming the
    file and the field."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read it ({getattr(error, 'strerror', None) or error})") from None
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or write the file as "
                              f"JSON") from None
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: unreadable (not YAML: {' '.join(str(error).split())})") from None
    else:
        try:
            config = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: unreadable (not JSON: {error})") from None
    values = flat_values(config, str(path), drop_unknown)
    try:
        build_configs(values)  # every field known, of its type and within its bounds
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}", *error.names) from None
    return values


# ---------------------------------------------------------------------------- the machine

def resolve_device(name: str | None) -> torch.device:
    """TrainConfig.device as this machine's device ("auto" or None: cuda when available, else cpu)."""
    try:
        return parse_device(None if name in (None, "auto") else name)
    except ValueError as error:
        raise ConfigError(f"device: {error}", "device") from None


def machine_defaults(values: dict, device: torch.device) -> dict:
    """values with each field whose default depends on the machine (None: not given) filled in
    for the device: the one place those defaults are decided."""
    decided = {
        "backend": lambda: default_backend(device),
        "precision": lambda: "bf16" if device.type == "cuda" else "fp32",
        "device": lambda: str(device),
    }
    return {**values, **{name: decide() for name, decide in decided.items() if values.get(name) is None}}


# ---------------------------------------------------------------------------- flags

def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def flag_fields(cls) -> list:
    return [f for f in fields(cls) if f.metadata["flag"]]


def add_config_flags(parser: argparse.ArgumentParser, defaults: dict | None):
    """One flag per field of ViTConfig and TrainConfig, in a group each; defaults: the values
    each flag shows and takes when not typed, or None for a parser that reads only what is typed."""
    on_off = {True: "on", False: "off"}
    for cls, title in ((ViTConfig, "model"), (TrainConfig, "training")):
        group = parser.add_argument_group(title)
        for f in flag_fields(cls):
            kind, help_text = value_type(f), f.metadata["help"]
            default = argparse.SUPPRESS if defaults is None else defaults.get(f.name, f.default)
            if default is None and f.metadata["default_help"]:
                help_text += f" (default: {f.metadata['default_help']})"
            elif kind is bool and default is not argparse.SUPPRESS:
                help_text += f" (default: {on_off[default]})"
            if kind is bool:
                action = group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=default)
                action.help = help_text  # after construction: Python 3.11's action would add "(default: False)"
                continue
            group.add_argument(flag(f.name), type=FLAG_TYPES[kind], choices=choices_of(f), default=default,
                               metavar=f.metadata["metavar"], help=help_text)


FLAG_TYPES = {int: cli.bounded(int), float: cli.bounded(float), str: str}  # bounds: __post_init__'s


def as_flags(error: ConfigError) -> str:
    """A ConfigError's message with the fields it names written as their flags."""
    message = str(error)
    for name in error.names:
        message = re.sub(rf"(?<![\w.-]){name}(?![\w-])", flag(name), message)
    return message
