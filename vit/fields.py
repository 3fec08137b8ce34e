"""Configuration fields that describe themselves: each dataclass field of ViTConfig and
TrainConfig carries its help text, its choices or bounds, and what its default depends on, in
`field(metadata=...)`. train.py's flags are generated from them (vit/config.py), and
`check_fields`, called by each dataclass's `__post_init__`, is the one check of every value,
whether it came from a flag, a config file, a recipe or code.
"""
import math
import types
import typing
from dataclasses import MISSING, field, fields


class ConfigError(ValueError):
    """A value a configuration cannot take. `names`: the fields the message speaks of, each
    written in it as the field name, so that a command line can name them as its flags."""

    def __init__(self, message: str, *names: str):
        super().__init__(message)
        self.names = names


# Bounds of numeric fields: name -> (the test, what a value must be; {kind}: integer or finite number).
BOUNDS = {
    "positive": (lambda v: math.isfinite(v) and v > 0, "must be a positive {kind}"),
    "non_negative": (lambda v: math.isfinite(v) and v >= 0, "must be zero or a positive {kind}"),
    "fraction": (lambda v: 0 <= v < 1, "must be at least 0 and below 1"),  # dropout, smoothing, decay
    "probability": (lambda v: 0 <= v <= 1, "must be from 0 to 1"),  # how often something happens
    "unit_open": (lambda v: 0 < v < 1, "must be above 0 and below 1"),
    # torch.manual_seed's range, and what vit.data's sample seeds are reduced to
    "seed": (lambda v: 0 <= v <= 2**63 - 1, f"must be a whole number from 0 to {2**63 - 1}"),
}


def option(default=MISSING, *, help: str, choices=None, bound: str | None = None, default_help: str | None = None,
           flag: bool = True, metavar: str | None = None, default_factory=MISSING):
    """A configuration field. help: the flag's help; choices: the allowed values (a callable
    returning them when they are known only at run time, as the installed backends); bound: a key
    of BOUNDS; default_help: for a default that depends on the machine, the words that say what
    it is (the flag then defaults to "decided at run time", vit/config.py's machine_defaults);
    flag: False for a field that no flag sets directly."""
    if bound is not None and bound not in BOUNDS:
        raise ValueError(f"unknown bound {bound!r}; choose one of {', '.join(BOUNDS)}")
    metadata = {"help": help, "choices": choices, "bound": bound, "default_help": default_help, "flag": flag,
                "metavar": metavar}
    return field(default=default, default_factory=default_factory, metadata=metadata)


def choices_of(f) -> tuple | None:
    choices = f.metadata.get("choices")
    return tuple(choices() if callable(choices) else choices) if choices is not None else None


def value_type(f) -> type:
    """The field's type without its None: int for `int | None`."""
    hint = f.type
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def optional(f) -> bool:
    return (isinstance(f.type, types.UnionType) or typing.get_origin(f.type) is typing.Union) and \
        type(None) in typing.get_args(f.type)


def check_fields(cfg):
    """Check every field of a configuration dataclass against its type, choices and bound; ints
    given for float fields become floats. Raises ConfigError naming the field."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if value is None and optional(f):
            continue
        kind = value_type(f)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            setattr(cfg, f.name, value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ConfigError(f"{f.name} must be {type_words(f)}, got {value!r}", f.name)
        allowed = choices_of(f)
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{f.name} must be one of {', '.join(map(str, allowed))}, got {value!r}", f.name)
        bound = f.metadata.get("bound")
        if bound is not None:
            test, _ = BOUNDS[bound]
            if not test(value):
                raise ConfigError(f"{f.name} {bound_words(bound, kind)}, got {value}", f.name)


def bound_words(bound: str, kind: type) -> str:
    """What a value of type kind within the bound must be."""
    return BOUNDS[bound][1].format(kind="integer" if kind is int else "finite number")


def type_words(f) -> str:
    words = {int: "a whole number", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}
    return words[value_type(f)] + (" or null" if optional(f) else "")
