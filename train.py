"""Train the ViT on CIFAR-10.

    python train.py                                  # the full recipe, defaults below
    python train.py --recipe strong                  # a preset (vit/recipes.py); typed flags override it
    python train.py --device cpu --epochs 2 --train-subset 2000 --depth 2 --dim 64 --heads 4 --mlp-dim 64
    python train.py --config my.yaml --lr 5e-4       # fields from a file (a run's config.json is one)
    python train.py --resume runs/20261125-101500    # continue an interrupted run
    torchrun --nproc_per_node=8 train.py             # data-parallel; --batch-size stays global
"""
import signal
import sys

if __name__ == "__main__":
    # Ctrl-C, SIGTERM or SIGHUP while the imports below load (torch takes seconds): no run exists
    # yet, leave quietly.
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, lambda signum, frame: sys.exit(128 + signum))

import argparse  # noqa: E402
import errno  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, fields, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from vit import cli, distributed  # noqa: E402
from vit.backends import get_backend  # noqa: E402
from vit.checkpoint import (CONFIG_FILE, LAST_CHECKPOINT, LOCK_FILE, RunInUse, RunLock, is_own_leftover,  # noqa: E402
                            load_checkpoint, write_config)
from vit.config import (CONFIG_CLASSES, REMOVED_FIELDS, add_config_flags, as_flags, build_configs, flag,  # noqa: E402
                        flag_fields, machine_defaults, read_config_file, resolve_device)
from vit.data import BatchSizeError  # noqa: E402
from vit.environment import WriteError  # noqa: E402
from vit.evaluate import check_model_identity  # noqa: E402
from vit.fields import ConfigError  # noqa: E402
from vit.model import ViTConfig  # noqa: E402
from vit.recipes import RECIPES, recipe_values  # noqa: E402
from vit.timm_interop import build_model, resolve_timm_config  # noqa: E402
from vit.trainer import (NonFiniteLoss, RunSummary, TrainConfig, Trainer, build_trainer,  # noqa: E402
                         cuda_graph_unsupported_reason)

# What may differ on --resume: where and how the run executes, never what it computes.
RESUME_MAY_CHANGE = {"device", "progress", "resume", "data_dir", "cuda_graph"}
CIFAR10_IMAGE_SIZE = 32  # the images are used as they are, never resized
CIFAR10_CLASSES = 10
# --model timm:NAME trains timm's registered model NAME; these flags describe this project's ViT,
# which a timm model fixes itself (--patch-size and --depth override it through timm's arguments).
TIMM_PREFIX = "timm:"
OWN_ARCHITECTURE_FIELDS = ("dim", "heads", "mlp_dim", "layer_norm_eps", "init", "pool", "mlp_second_gelu")
# Below this many steps an epoch's train loss and accuracy average over a handful of batches,
# and the warmup and cosine schedule move in large jumps.
MIN_STEPS_PER_EPOCH = 5
# Above this share of the initial weights left in the average of the weights at the end of the
# run (ema_decay ** steps), the average is mostly the untrained model: a warning says so.
EMA_INITIAL_SHARE = 0.05
# A CPU run whose first steps put it at more than this is most likely the GPU recipe started on a
# CPU by mistake (the full recipe is hundreds of hours there): a warning gives the smoke run instead.
LONG_CPU_RUN_SECONDS = 3600
SMOKE_RUN_FLAGS = ("--device", "cpu", "--epochs", "2", "--warmup-epochs", "0.5", "--train-subset", "2000", "--depth", "2",
                   "--dim", "64", "--heads", "4", "--mlp-dim", "64")  # README's quick start: minutes on 2 cores

EXAMPLES = """\
examples:
  python train.py --device cpu --epochs 2 --train-subset 2000 --depth 2 --dim 64 --heads 4 --mlp-dim 64
      a smoke run on the CPU: a few minutes on 2 cores
  python train.py --data-dir ~/data
      the full recipe (200 epochs); on a GPU the backend is triton
  python train.py --recipe strong --data-dir ~/data
      AdamW, stochastic depth, CutMix and MixUp, an average of the weights (README: recipes)
  python train.py --recipe reference --print-config
      the preset's resolved settings, without training; --recipe reference --help lists them as defaults
  python train.py --config runs/20261125-101500/config.json --out-dir runs/again
      the same run again: a run's config.json is a config file; typed flags override its values
  python train.py --resume runs/20261125-101500
      continue an interrupted run after its last finished epoch
  torchrun --nproc_per_node=8 train.py --data-dir ~/data
      data-parallel on 8 GPUs, --batch-size still global
"""


def build_parser(defaults: dict | None = None, typed_only: bool = False) -> argparse.ArgumentParser:
    """The command line: the run's options, then one flag per configuration field (vit/config.py).
    defaults: what each field's flag takes when not typed (starting_values; those of the "default"
    recipe when None); typed_only: a parser whose namespace holds only the flags typed."""
    defaults = starting_values("default", {}) if defaults is None else defaults
    p = cli.Parser(prog="train.py", description="Train a Vision Transformer from scratch on CIFAR-10.",
                   epilog=EXAMPLES, argument_default=argparse.SUPPRESS if typed_only else None)
    g = p.add_argument_group("run")
    g.add_argument("--config", metavar="FILE",
                   help="a config file of ViTConfig and TrainConfig fields: JSON (flat, or a run's config.json) or "
                        "YAML; its values replace the recipe's, typed flags replace its (default: none)")
    g.add_argument("--recipe", choices=list(RECIPES), **({} if typed_only else {"default": defaults["recipe"]}),
                   help="a preset of the model and training fields (README: recipes); a flag typed with it overrides "
                        "its value, and --recipe NAME --help lists its values here")
    timm_model = defaults.get("timm_model")
    g.add_argument("--model", type=model_name, metavar="vit|timm:NAME",
                   **({} if typed_only else {"default": f"{TIMM_PREFIX}{timm_model}" if timm_model else "vit"}),
                   help="vit: this project's ViT; timm:NAME: timm's registered model NAME (a VisionTransformer, random "
                        "weights, at the data's image size and --num-classes; --patch-size and --depth override its "
                        "own), run by timm's code under --backend torch and on the fused kernels under triton")
    g.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR after its last finished epoch, or from its start if none "
                        "finished; the recipe stays the saved one; a checkpoint file in it names it too "
                        "(default: a new run)")
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved model and training configuration (config.json's \"model\" and "
                        "\"train\", itself a --config file) and exit, without loading data")
    add_config_flags(p, None if typed_only else defaults)
    return p


def model_name(value: str) -> str:
    if value == "vit" or (value.startswith(TIMM_PREFIX) and len(value) > len(TIMM_PREFIX)):
        return value
    raise argparse.ArgumentTypeError(f"expected vit or timm:NAME, got {value!r}")


def starting_values(recipe: str, file_values: dict) -> dict:
    """What the flags start from: the recipe's values, then the config file's; a field whose
    default depends on the machine is None (decided for the device by machine_defaults) unless
    the file sets it."""
    machine = {f.name: None for cls in CONFIG_CLASSES for f in fields(cls) if f.metadata["default_help"]}
    return {**machine, **recipe_values(recipe), **file_values}


def read_starting_values(argv: list[str]) -> tuple[dict, dict]:
    """starting_values of a command line's --recipe and --config, read before the parser is built
    (its values are the parser's defaults), and the config file's own values. A config file that
    cannot be read, or whose values the configs refuse, is a usage error naming the field; an
    unknown recipe, or a flag without its value, is left for the parser to refuse."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    pre.add_argument("--recipe")
    pre.add_argument("--config")
    try:
        named = pre.parse_known_args(argv)[0]
    except argparse.ArgumentError:
        return starting_values("default", {}), {}
    file_values = {}
    if named.config:
        try:
            file_values = read_config_file(named.config)
        except ConfigError as error:
            build_parser().error(f"--config {error}")
    recipe = named.recipe or file_values.get("recipe", "default")
    if named.recipe is None and recipe not in RECIPES:
        build_parser().error(f"--config {named.config}: recipe {recipe!r} is not a preset; choose one of "
                             f"{', '.join(RECIPES)}")
    return starting_values(recipe if recipe in RECIPES else "default", file_values), file_values


def refuse_removed_flags(argv: list[str], parser: argparse.ArgumentParser):
    """A flag of a removed setting (REMOVED_FIELDS) is a usage error that says what replaced it, so
    that an old command line fails clearly rather than as an unknown flag."""
    for arg in argv:
        name = arg.split("=", 1)[0]
        field_name = name[2:].replace("-", "_")
        if name.startswith("--") and field_name in REMOVED_FIELDS:
            parser.error(f"{name} was removed: {REMOVED_FIELDS[field_name]}; drop it from the command line")


# ---------------------------------------------------------------------------- a new run

def resolve_timm_model(args, values: dict, explicit: set[str], parser) -> ViTConfig:
    """--model timm:NAME's config: timm's architecture at the data's size, checked to build (and
    fuse, under the triton backend) before any work. explicit: the fields typed or set by the
    config file, whose --patch-size and --depth override timm's own."""
    try:
        model_cfg = resolve_timm_config(args.model[len(TIMM_PREFIX):], image_size=values["image_size"],
                                        num_classes=values["num_classes"], dropout=values["dropout"],
                                        drop_path=values["drop_path"], backend=values["backend"],
                                        patch_size=values["patch_size"] if "patch_size" in explicit else None,
                                        depth=values["depth"] if "depth" in explicit else None)
        if model_cfg.backend != "torch":
            build_model(model_cfg)  # fuses every block, or says which cannot be
    except ValueError as error:
        parser.error(f"--model {args.model}: {cli.one_line(error)}")
    return model_cfg


def resolve(args, parser, typed: dict, file_values: dict, device: torch.device,
            ctx: distributed.Context) -> tuple[ViTConfig, TrainConfig]:
    """The new run's configs: the parsed flags over the machine's defaults, refused before any
    work when they cannot train here."""
    values = {**file_values, **{f.name: getattr(args, f.name) for cls in CONFIG_CLASSES for f in flag_fields(cls)},
              "recipe": args.recipe, "device": str(device)}
    values = machine_defaults(values, device)
    timm_model = args.model.startswith(TIMM_PREFIX)
    values["timm_model"] = ""  # --model names the model: a timm one is resolved from timm below
    own = [flag(name) for name in OWN_ARCHITECTURE_FIELDS if name in typed]
    if timm_model and own:
        parser.error(f"--model {args.model}: {', '.join(own)} describe this project's ViT; timm's model fixes its own "
                     f"(--patch-size and --depth override it)")
    try:
        model_cfg, train_cfg = build_configs(values)
    except ConfigError as error:
        parser.error(as_flags(error))
    if timm_model:
        model_cfg = resolve_timm_model(args, values, set(typed) | set(file_values), parser)
    check_data(model_cfg, parser)
    if train_cfg.precision != "fp32" and device.type == "cpu":
        parser.error(f"--precision {train_cfg.precision} needs CUDA; use --precision fp32 on the CPU")
    check_machine(model_cfg, train_cfg, device, ctx.world_size, typed, parser)
    return model_cfg, train_cfg


def check_data(model_cfg: ViTConfig, parser):
    """What CIFAR-10 asks of the model: its image size and at least its classes."""
    if model_cfg.image_size != CIFAR10_IMAGE_SIZE:
        parser.error(f"--image-size {model_cfg.image_size}: CIFAR-10's images are {CIFAR10_IMAGE_SIZE}x"
                     f"{CIFAR10_IMAGE_SIZE} and are not resized; leave --image-size at {CIFAR10_IMAGE_SIZE}")
    if model_cfg.num_classes < CIFAR10_CLASSES:
        parser.error(f"--num-classes {model_cfg.num_classes} is fewer than CIFAR-10's {CIFAR10_CLASSES} classes")


def check_machine(model_cfg: ViTConfig, train_cfg: TrainConfig, device: torch.device, world_size: int, typed: dict,
                  parser):
    """What the device asks of the configs, for a new run and a resumed one alike (the batch's
    split over the processes is the loader's to check). A saved run's CUDA graph, which this
    device cannot replay and the user did not ask for again, is turned off."""
    try:
        get_backend(model_cfg.backend).check(model_cfg, device)
    except ConfigError as error:
        parser.error(as_flags(error))
    if train_cfg.cuda_graph:
        reason = cuda_graph_unsupported_reason(train_cfg, device, world_size)
        if reason and "cuda_graph" not in typed and device.type != "cuda":
            train_cfg.cuda_graph = False  # an execution choice of the saved run that this device cannot make
        elif reason:
            parser.error(reason)


def claim_run_dir(out_dir: str | None) -> tuple[Path, bool, RunLock]:
    """Make a run directory this process's alone: (path, whether this process created it, the
    directory's lock, held until the run ends).

    The claim takes the directory's lock (RunLock), then finds it empty but for what a killed run
    leaves (is_own_leftover: removed) and marks it with an empty config.json until the trainer is
    built and the real config replaces it. A directory holding anything else is never claimed;
    one whose lock another process holds is refused with RunInUse naming it. The default
    runs/<timestamp> takes a -2, -3, ... suffix when the name is taken. Raises ValueError with a
    one-line message.
    """
    if out_dir is not None:
        candidates = [Path(out_dir)]
    else:
        stamp = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        candidates = [stamp] + [stamp.with_name(f"{stamp.name}-{n}") for n in range(2, 1000)]
    for path in candidates:
        name = f"--out-dir {path}" if out_dir is not None else f"run directory {path}"
        advice = "pick a folder you can write to" if out_dir is not None else "pass an --out-dir you can write to"
        problem = cli.dir_problem(path)
        if problem:
            raise ValueError(f"{name}: {problem}; {advice}")
        try:
            path.mkdir(parents=True)
            created = True
        except FileExistsError:
            created = False
        except OSError as error:
            raise ValueError(f"{name}: cannot create it ({error.strerror}); {advice}") from None

        def foreign_contents() -> bool:
            return any(not is_own_leftover(p) for p in path.iterdir())

        # A finished run or a folder of the user's is refused without touching it; a lock file
        # may belong to a run training there, which the lock names.
        if created or not foreign_contents() or (path / LOCK_FILE).exists():
            try:
                lock = RunLock.acquire(path)
            except RunInUse:
                if out_dir is not None:
                    raise
                continue  # a run started in the same second holds this name
            except OSError as error:
                raise ValueError(f"{name}: cannot write in it ({error.strerror}); {advice}") from None
            if not foreign_contents():
                try:
                    for leftover in path.iterdir():
                        if leftover.name != LOCK_FILE:
                            leftover.unlink()
                    (path / CONFIG_FILE).touch()
                except OSError as error:
                    lock.release()
                    raise ValueError(f"{name}: cannot write in it ({error.strerror}); {advice}") from None
                return path, created, lock
            lock.release()
        if out_dir is not None:
            raise ValueError(f"{name} exists and is not empty; pick another --out-dir, or --resume it")
    raise ValueError(f"every run directory name from {candidates[0]} to {candidates[-1]} is taken; pass --out-dir")


def release_run_dir(path: Path, created: bool, lock: RunLock):
    """Undo claim_run_dir for a run that stopped before it wrote anything."""
    config = path / CONFIG_FILE
    if config.exists() and config.stat().st_size == 0:
        config.unlink()
    lock.release()
    if created:
        try:
            path.rmdir()
        except OSError:
            pass  # something was written there after all: keep it


def claim_on_rank_0(out_dir: str | None, parser, ctx: distributed.Context) -> tuple[Path, bool, RunLock | None]:
    """Rank 0 names, claims and locks the directory; the others take its word (their clocks
    differ) and its lock: they never write the run directory."""
    claim, problem, in_use = (None, False, None), None, False
    if ctx.is_main:
        try:
            claim = claim_run_dir(out_dir)
        except ValueError as error:
            problem = str(error)
        except RunInUse as error:
            problem, in_use = str(error), True
    path, problem, in_use = distributed.broadcast_object((str(claim[0]) if claim[0] else None, problem, in_use))
    if problem and in_use:
        if ctx.is_main:
            raise cli.RunError(f"--out-dir {problem}")
        sys.exit(1)
    if problem:
        if ctx.is_main:
            parser.error(problem)
        sys.exit(2)
    return Path(path), claim[1], claim[2]


def lock_on_rank_0(run_dir: Path, ctx: distributed.Context) -> RunLock | None:
    """The lock of a run to resume, taken by rank 0 for all ranks; RunError when another process holds it."""
    lock, problem = None, None
    if ctx.is_main:
        try:
            lock = RunLock.acquire(run_dir)
        except (RunInUse, OSError) as error:
            problem = (f"--resume {error}" if isinstance(error, RunInUse)
                       else f"--resume {run_dir}: cannot lock it ({error})")
    problem = distributed.broadcast_object(problem)
    if problem:
        if ctx.is_main:
            raise cli.RunError(problem)
        sys.exit(1)
    return lock


# ---------------------------------------------------------------------------- --resume

def resolve_resume(args, parser, typed: dict, device: torch.device,
                   ctx: distributed.Context) -> tuple[ViTConfig, TrainConfig, Path, bool]:
    """The saved run's configs, its directory, and whether it has a checkpoint to continue from."""
    run_dir = Path(args.resume)
    if run_dir.is_file() and run_dir.parent.joinpath("config.json").is_file():
        # A checkpoint inside a run directory: the run continues from its last.pt either way.
        if ctx.is_main:
            print(f"note: --resume takes a run directory; {run_dir} is a file in one, so the run in {run_dir.parent} "
                  f"continues from its last finished epoch", file=sys.stderr)
        run_dir = run_dir.parent
    config_path = run_dir / "config.json"
    if run_dir.is_file():
        parser.error(f"--resume {run_dir}: a file, not a run directory (there is no config.json beside it)")
    if not run_dir.is_dir():
        parser.error(f"--resume {run_dir}: no such run directory")
    if not config_path.is_file():
        parser.error(f"--resume {run_dir}: not a run directory (it has no config.json); start a new run instead")
    if config_path.stat().st_size == 0:
        raise cli.RunError(f"{config_path} is empty: the run was stopped before it wrote its config, so there is "
                           f"nothing to resume; start it again as a new run (--out-dir {run_dir} may be reused)")
    try:
        model_cfg, train_cfg = build_configs(read_config_file(config_path, drop_unknown=True))
    except ConfigError as error:  # broken JSON, missing sections, values the configs refuse
        raise cli.RunError(f"{cli.one_line(error)}; the run cannot be resumed, start a new one") from None
    if ctx.is_main:
        note = removed_fields_note(json.loads(config_path.read_text()).get("train", {}))
        if note:
            print(f"note: {config_path}: {note}", file=sys.stderr)
    saved = {**asdict(model_cfg), **asdict(train_cfg)}
    if "epochs" in typed and typed["epochs"] != train_cfg.epochs:
        parser.error(f"--resume continues the saved recipe of {train_cfg.epochs} epochs, whose learning-rate schedule "
                     f"ends there; to train {typed['epochs']} epochs, start a new run with --epochs {typed['epochs']}")
    conflicts = sorted(flag(k) for k in set(typed) - RESUME_MAY_CHANGE if k in saved and typed[k] != saved[k])
    if conflicts:
        parser.error(f"--resume continues the saved recipe; these flags differ from it: {', '.join(conflicts)}")
    if "device" not in typed and torch.device(train_cfg.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"the run trained on {train_cfg.device}; pass --device cpu to resume it here")
    changes = {k: typed[k] for k in RESUME_MAY_CHANGE & set(typed) if k in saved}
    train_cfg = replace(train_cfg, **{**changes, "device": str(device)})
    check_machine(model_cfg, train_cfg, device, ctx.world_size, typed, parser)
    has_checkpoint = (run_dir / "last.pt").exists()
    if has_checkpoint:
        check_checkpoint_model(run_dir / "last.pt", model_cfg)
    return model_cfg, train_cfg, run_dir, has_checkpoint


def removed_fields_note(saved_train: dict) -> str | None:
    """What --resume says of a saved run's removed settings (REMOVED_FIELDS), which it ignores: they
    chose how the same augmentation was run, never what it computes. None when the run holds none."""
    removed = [name for name in REMOVED_FIELDS if name in saved_train]
    if not removed:
        return None
    note = (f"{' and '.join(removed)} {'are settings' if len(removed) > 1 else 'is a setting'} this version no "
            f"longer has, ignored: training augments in batches on the training device")
    if saved_train.get("augment") == "cpu":
        note += (" (the same transforms and distributions as the run's per-image pipeline; each sample's random "
                 "draws differ from what it would have drawn)")
    return note


def check_checkpoint_model(checkpoint_path: Path, model_cfg: ViTConfig):
    """Refuse to resume weights under another model than the one they were trained in: the
    checkpoint's own model_config against config.json's (which the typed flags were held to)."""
    try:
        checkpoint = load_checkpoint(checkpoint_path, "cpu")
    except (OSError, RuntimeError) as error:
        raise cli.RunError(f"cannot resume {checkpoint_path.parent}: {cli.one_line(error)}") from None
    check_model_identity(checkpoint, asdict(model_cfg), checkpoint_path)


# ---------------------------------------------------------------------------- what the user reads

def startup_warnings(cfg: TrainConfig, typed: set[str], num_images: int, steps_per_epoch: int) -> list[str]:
    """Settings that run but make little sense together; num_images: the training set's size."""
    warnings = []
    if cfg.warmup_epochs >= cfg.epochs:
        warnings.append(f"--warmup-epochs {cfg.warmup_epochs:g} is not shorter than --epochs {cfg.epochs}: "
                        f"the learning rate rises for the whole run and never decays")
    if cfg.train_subset is not None and cfg.train_subset > num_images:
        warnings.append(f"--train-subset {cfg.train_subset} is more than the {num_images:,} training images; "
                        f"training on all of them")
    if steps_per_epoch < MIN_STEPS_PER_EPOCH:
        warnings.append(f"only {steps_per_epoch} step{'s' * (steps_per_epoch != 1)} of {cfg.batch_size} images per "
                        f"epoch: each epoch's numbers rest on a handful of batches; use more training images or a "
                        f"smaller --batch-size")
    if cfg.ema_decay > 0:
        steps = cfg.epochs * steps_per_epoch
        initial_share = cfg.ema_decay ** steps
        if initial_share > EMA_INITIAL_SHARE:
            warnings.append(f"--ema-decay {cfg.ema_decay:g} averages over about {1 / (1 - cfg.ema_decay):,.0f} steps: "
                            f"after the run's {steps:,} steps the initial weights are still {initial_share:.0%} of "
                            f"the average; a smaller decay suits a run this short")
    return warnings


def long_cpu_run_warning(eta_seconds: float | None, data_dir: str) -> str | None:
    """The warning for a CPU run that its first steps put at more than LONG_CPU_RUN_SECONDS, or None."""
    if eta_seconds is None or eta_seconds < LONG_CPU_RUN_SECONDS:
        return None
    return (f"training on the CPU, at the pace of the first steps this run needs another {duration(eta_seconds)}; "
            f"the recipe is sized for a GPU. A smoke run on the CPU takes minutes: "
            f"{shell_command(script(), *SMOKE_RUN_FLAGS, '--data-dir', data_dir)}")


def slow_start_notes(model_cfg: ViTConfig, cfg: TrainConfig, device: torch.device) -> list[str]:
    """What makes the first steps slow before the progress shows: compilation."""
    notes = []
    if cfg.compile:
        notes.append("compiling the model with torch.compile: the first training steps and the first evaluation "
                     "wait for it (minutes on a CPU)")
    if model_cfg.backend == "triton" and device.type == "cuda":
        notes.append("compiling the Triton kernels for this GPU at their first launches (and autotuning them): the "
                     "first steps wait for it; later runs reuse Triton's cache")
    return notes


def shell_command(*words) -> str:
    """A command line to copy: this interpreter and script as they can be typed from here."""
    def short(path: str) -> str:
        path = os.path.abspath(path)
        relative = os.path.relpath(path)
        return path if relative.startswith("..") else relative

    python = "python" if shutil.which("python") == sys.executable else short(sys.executable)
    return " ".join(shlex.quote(str(w)) for w in (python, *words))


def script() -> str:
    path = os.path.abspath(__file__)
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


def config_lines(model_cfg: ViTConfig, train_cfg: TrainConfig) -> list[str]:
    """The resolved configuration, as the run prints it at the start: every field."""
    def listed(cfg, leave_out=()):
        return " ".join(f"{name}={value}" for name, value in asdict(cfg).items() if name not in leave_out)
    return [f"recipe {train_cfg.recipe}; model: {listed(model_cfg)}",
            f"training: {listed(train_cfg, leave_out={'recipe', 'extra'})}"]


def final_lines(summary: RunSummary, run_dir: Path, resumed: bool) -> list[str]:
    ema = []
    if summary.ema_best_acc is not None:
        ema = [f"average of the weights: best test accuracy {summary.ema_best_acc:.2%} at epoch "
               f"{summary.ema_best_epoch}; last epoch {summary.ema_last_acc:.2%}; in each checkpoint, evaluated by "
               f"{shell_command('-m', 'vit.evaluate', run_dir, '--ema')}"]
    return [
        f"best test accuracy {summary.best_acc:.2%} at epoch {summary.best_epoch} of {summary.epochs}; "
        f"last epoch {summary.last_acc:.2%}",
        *ema,
        f"wall time {duration(summary.wall_seconds)}{' since resuming' if resumed else ''}; "
        + (f"{summary.images_per_second:,.0f} training images/s" if summary.images_per_second else "no epoch trained"),
        f"run directory {run_dir}; curves {run_dir / 'curves.png'}; evaluation of best.pt {run_dir / 'eval.json'}",
        f"evaluate it again: {shell_command('-m', 'vit.evaluate', run_dir)}",
    ]


# ---------------------------------------------------------------------------- main

def main(argv=None) -> int:
    return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
    start, file_values = read_starting_values(argv)
    parser = build_parser(start)
    refuse_removed_flags(argv, parser)
    args = parser.parse_args(argv)
    typed = vars(build_parser(start, typed_only=True).parse_args(argv))
    if args.resume and args.config:
        parser.error("--config and --resume: a resumed run keeps its saved config; start a new run from it with "
                     "--config RUN_DIR/config.json")
    try:
        device = resolve_device(typed.get("device") if args.resume else args.device)
    except ConfigError as error:
        parser.error(as_flags(error))
    ctx = distributed.setup(device.type)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)  # one GPU per process
    try:
        return run(args, parser, typed, file_values, device, ctx)
    finally:
        distributed.teardown(ctx)


def run(args, parser, typed: dict, file_values: dict, device: torch.device, ctx: distributed.Context) -> int:
    def say(*lines, file=sys.stdout):
        if ctx.is_main:
            print(*lines, file=file, flush=True)

    if args.resume:
        model_cfg, train_cfg, run_dir, has_checkpoint = resolve_resume(args, parser, typed, device, ctx)
    else:
        model_cfg, train_cfg = resolve(args, parser, typed, file_values, device, ctx)
    if args.print_config:
        say(json.dumps({"model": asdict(model_cfg), "train": asdict(train_cfg)}, indent=2))
        return 0
    if args.resume:
        lock = lock_on_rank_0(run_dir, ctx)
    else:
        run_dir, created, lock = claim_on_rank_0(train_cfg.out_dir, parser, ctx)
        train_cfg.out_dir = str(run_dir)
        has_checkpoint = False
    trainer = None
    try:
        try:
            trainer = start(args, parser, model_cfg, train_cfg, run_dir, has_checkpoint, ctx, say)
        finally:
            if trainer is None and not args.resume and ctx.is_main:
                release_run_dir(run_dir, created, lock)  # a new run that did not start gives its directory back
        return train(trainer, model_cfg, train_cfg, typed, run_dir, has_checkpoint, say)
    except BaseException as error:
        code = ended_early(error, run_dir, started=trainer is not None or args.resume, say=say)
        if code is None:
            raise
        return code
    finally:
        if lock is not None:
            lock.release()


def ended_early(error: BaseException, run_dir: Path, started: bool, say) -> int | None:
    """Report a run that a stop signal or a failed write ended, in one line; its exit status.
    None for any other error (the error rule reports it). An error that follows a stop signal
    (a torchrun peer that stopped first) is part of that stop; a failed write is reported even
    then: it needs the user's hand before the run can go on."""
    resume = shell_command(script(), "--resume", run_dir)
    saved = (run_dir / LAST_CHECKPOINT).exists()
    if isinstance(error, WriteError):
        if error.errno == errno.ENOENT and not run_dir.is_dir():
            say(f"error: {error}; the run directory was removed, start a new run", file=sys.stderr)
            return 1
        fix = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space within your quota",
               errno.EROFS: "make the filesystem writable"}.get(error.errno, "fix that")
        then = (f"then continue with: {resume}" if saved else
                f"then start it over with: {resume} (no epoch was saved yet)" if started else
                "then start the run again")
        say(f"error: {error}; {fix}, {then}", file=sys.stderr)
        return 1
    if isinstance(error, KeyboardInterrupt):
        signum = cli.stop_signal(error)
    elif isinstance(error, Exception) and cli.stop_received():
        signum = cli.stop_received()
    else:
        return None
    cli.exit_on_next_interrupt()
    what = ("\n" if sys.stderr.isatty() else "") + cli.stopped_by(signum)
    if not started:
        say(f"{what} before the run started; nothing was saved", file=sys.stderr)
    elif saved:
        say(f"{what}; continue with: {resume}", file=sys.stderr)
    else:
        say(f"{what} before the first epoch ended, so nothing was saved: the run will start over from the "
            f"beginning (the work so far is lost); start it over with: {resume}", file=sys.stderr)
    return cli.exit_status(signum)


def start(args, parser, model_cfg, train_cfg, run_dir, has_checkpoint, ctx, say) -> Trainer:
    """The trainer, with a new run's config.json written before its first step."""
    try:
        trainer = build_trainer(model_cfg, train_cfg, run_dir, resume=has_checkpoint, ctx=ctx, log=say)
    except BatchSizeError as error:
        parser.error(f"--batch-size {train_cfg.batch_size}: {error}")
    except RuntimeError as error:
        if not has_checkpoint or isinstance(error, cli.EXPECTED_ERRORS):
            raise
        raise cli.RunError(f"cannot resume {run_dir}: {cli.one_line(error)}") from None
    if not args.resume and ctx.is_main:
        write_config(run_dir, model_cfg, train_cfg, trainer.test_set.class_names, trainer.device)
    return trainer


def train(trainer, model_cfg: ViTConfig, cfg: TrainConfig, typed, run_dir: Path, resuming: bool, say) -> int:
    """Fit, evaluate the best epoch, and say where everything is."""
    say(trainer.describe())
    for line in config_lines(model_cfg, cfg):
        say(line)
    if resuming:
        say(f"run directory {run_dir}; seed {cfg.seed} (resuming after epoch {trainer.start_epoch})")
    elif "resume" in typed:
        say(f"run directory {run_dir}; seed {cfg.seed} (it has config.json but no last.pt: it stopped before its "
            f"first epoch ended, so it starts from the beginning with its saved config)")
    else:
        say(f"run directory {run_dir}; seed {cfg.seed}")
    for warning in startup_warnings(cfg, typed, len(trainer.loader.images), len(trainer.loader)):
        say(f"warning: {warning}", file=sys.stderr)
    if resuming and trainer.start_epoch >= cfg.epochs:
        say(f"the run already finished its {cfg.epochs} epoch{'s' * (cfg.epochs != 1)}; nothing left to train")
    if trainer.device.type == "cpu":
        def warn_if_long(eta_seconds):
            warning = long_cpu_run_warning(eta_seconds, cfg.data_dir)
            if warning:
                say(f"warning: {warning}", file=sys.stderr)
        trainer.progress.on_first_eta = warn_if_long
    for note in slow_start_notes(model_cfg, cfg, trainer.device):
        say(note)
    try:
        summary = trainer.fit()
    except NonFiniteLoss as error:
        say(f"error: {error}", file=sys.stderr)
        return 1
    trainer.finish()
    for line in final_lines(summary, run_dir, resuming):
        say(line)
    return 0


if __name__ == "__main__":
    cli.stop_on_signals()
    sys.exit(main())
