"""The configuration read from its dataclass fields: the flags generated from them, config files
(a run's config.json among them), and the one check of every value."""
import ast
import json
from dataclasses import MISSING, fields, replace
from pathlib import Path

import pytest
import torch

import train
from conftest import write_cifar_folder
from vit.backends import default_backend, get_backend
from vit.config import CONFIG_CLASSES, TrainConfig, build_configs, flag, read_config_file
from vit.fields import ConfigError, bound_words, choices_of, optional, value_type
from vit.model import ViTConfig

REPO = Path(train.__file__).resolve().parent
TINY = ["--device", "cpu", "--depth", "1", "--dim", "32", "--heads", "2", "--mlp-dim", "32", "--no-progress",
        "--batch-size", "20", "--warmup-epochs", "0.5", "--epochs", "1"]
# A value of each type that no field of another type accepts.
WRONG_TYPE = {int: "3", float: "0.5", bool: 1, str: 3, dict: [1]}
# For each bound, a value outside it.
OUTSIDE = {"positive": 0, "non_negative": -1, "fraction": 1, "probability": 1.5, "unit_open": 0, "seed": -1}


def every_field():
    return [(cls, f) for cls in CONFIG_CLASSES for f in fields(cls)]


@pytest.mark.parametrize("cls, f", every_field(), ids=[f.name for _, f in every_field()])
def test_every_field_has_help_a_default_a_flag_and_validation(cls, f):
    assert f.metadata["help"], f.name
    assert f.default is not MISSING or f.default_factory is not MISSING, f.name
    parser = train.build_parser()
    if f.metadata["flag"]:
        action = next(a for a in parser._actions if flag(f.name) in a.option_strings)
        assert f.metadata["help"] in action.help
        assert "default" in parser._get_formatter()._get_help_string(action), f.name
    # A value of the wrong type is refused, naming the field.
    with pytest.raises(ConfigError, match=rf"^{f.name} must be") as error:
        cls(**{f.name: WRONG_TYPE[value_type(f)]})
    assert f.name in error.value.names
    if choices_of(f) is not None:
        with pytest.raises(ConfigError, match=rf"^{f.name} must be one of"):
            cls(**{f.name: "no-such-choice"})
    if f.metadata["bound"] is not None:
        with pytest.raises(ConfigError, match=rf"^{f.name} {bound_words(f.metadata['bound'], value_type(f))}"):
            cls(**{f.name: OUTSIDE[f.metadata["bound"]]})
    if optional(f):
        cls(**{f.name: None})


def test_numbers_are_bounded_and_closed_sets_are_choices():
    """Every number field says its range and every string field whose values are a closed set
    lists them: what a field of those kinds may not leave to chance."""
    for _, f in every_field():
        if value_type(f) in (int, float):
            assert f.metadata["bound"] is not None, f.name
    closed = {"backend", "init", "pool", "optimizer", "label_smoothing_convention", "auto_augment", "precision"}
    assert {f.name for _, f in every_field() if choices_of(f) is not None} == closed


def test_typed_flags_are_what_was_typed_and_nothing_else():
    start = train.starting_values("default", {})
    typed = vars(train.build_parser(start, typed_only=True).parse_args(["--lr", "0.001", "--no-progress",
                                                                         "--recipe", "default"]))
    assert typed == {"lr": 0.001, "progress": False, "recipe": "default"}  # typed at their defaults: still typed


def test_default_backend_is_decided_for_the_device():
    cpu = torch.device("cpu")
    assert default_backend(cpu) == "torch"
    assert default_backend(cpu, preferred="torch") == "torch"
    assert default_backend(cpu, preferred="not-installed") == "torch"
    triton = get_backend("triton")
    model = ViTConfig(dim=48, heads=2)
    with pytest.raises(ConfigError, match="supports heads of 16, 32, 48, 64 dimensions; dim 48 / heads 2 gives 24"):
        replace(triton, unavailable_reason=lambda device: None).check(model, cpu)
    get_backend("torch").check(model, cpu)


def top_level_imports(path: Path) -> set[str]:
    return {alias.name if isinstance(node, ast.Import) else node.module
            for node in ast.parse(path.read_text()).body if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in (node.names if isinstance(node, ast.Import) else [None])}


def test_the_supported_head_dims_load_without_triton():
    assert top_level_imports(REPO / "kernels" / "head_dims.py") == set()
    backends = top_level_imports(REPO / "vit" / "backends.py")
    assert "kernels.head_dims" in backends
    assert not any(name.startswith("triton") or name.startswith("kernels.") and name != "kernels.head_dims"
                   for name in backends), backends


# --- config files ---------------------------------------------------------------------------

def printed(capsys, argv) -> dict:
    assert train.main([str(a) for a in argv] + ["--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_runs_config_json_repeats_the_run(tmp_path, capsys):
    data = write_cifar_folder(tmp_path / "data")
    first = tmp_path / "first"
    assert train.main(TINY + ["--recipe", "strong", "--lr", "2e-3", "--data-dir", str(data),
                              "--out-dir", str(first)]) == 0
    saved = json.loads((first / "config.json").read_text())
    capsys.readouterr()
    assert printed(capsys, ["--config", first / "config.json"]) == {"model": saved["model"], "train": saved["train"]}
    again = tmp_path / "again"
    assert train.main(["--config", str(first / "config.json"), "--out-dir", str(again)]) == 0
    repeated = json.loads((again / "config.json").read_text())
    assert repeated["model"] == saved["model"]
    assert repeated["train"] == {**saved["train"], "out_dir": str(again)}


def test_typed_flags_override_a_yaml_file_which_overrides_its_recipe(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("recipe: reference\nheads: 4\nlr: 0.002\n")
    values = printed(capsys, ["--config", config, "--device", "cpu", "--lr", "0.003"])
    assert values["model"]["heads"] == 4  # the file's, over the recipe's 8
    assert values["model"]["init"] == "pytorch"  # the recipe's, which the file does not set
    assert values["train"]["lr"] == 0.003 and values["train"]["recipe"] == "reference"


@pytest.mark.parametrize("text, names", [
    ('{"lrr": 0.1}', ["not a ViTConfig or TrainConfig field: lrr"]),
    ('{"model": {"dim": 32, "heds": 2}}', ["not a ViTConfig field: model.heds"]),
    ('{"train": {"epochs": "ten"}}', ["epochs must be a whole number, got 'ten'"]),
    ('{"mix_prob": 2}', ["mix_prob must be from 0 to 1"]),
    ('{"dim": 32, "heads": 3}', ["heads 3 does not divide dim 32"]),
    ('{"optimizer": "sgd"}', ["optimizer must be one of adam, adamw"]),
    ('{"lr": ', ["unreadable"]),
    ('{"model": {"dim": 32}, "train": 5}', ['"train" must be a mapping of TrainConfig fields']),
    ('{"num_workers": 4}', ["num_workers was removed: no DataLoader workers remain"]),
    ('{"train": {"augment": "cpu"}}', ["augment was removed: training augments in batches on the training device"]),
])
def test_a_bad_config_file_is_one_line_naming_the_field(text, names, tmp_path, capsys):
    config = tmp_path / "bad.json"
    config.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", str(config), "--device", "cpu", "--print-config"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"--config {config}: " in lines[0], lines
    for name in names:
        assert name in lines[0], (name, lines[0])


def test_the_loader_checks_what_it_reads(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model": {"dim": 64, "heads": 4, "retired_field": 1}, "train": {"lr": 1},
                                  "class_names": ["a"]}))
    with pytest.raises(ConfigError, match="retired_field"):
        read_config_file(config)
    values = read_config_file(config, drop_unknown=True)  # a run's record from another version
    model_cfg, train_cfg = build_configs(values)
    assert (model_cfg.dim, model_cfg.heads) == (64, 4)
    assert train_cfg.lr == 1.0 and isinstance(train_cfg.lr, float)  # a whole number in a float field
    assert TrainConfig(lr=1).lr == 1.0


def test_a_bad_yaml_file_is_one_line_naming_the_field(tmp_path, capsys):
    config = tmp_path / "run.yml"
    config.write_text("dropout: 1\n")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", str(config), "--device", "cpu", "--print-config"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"--config {config}: dropout must be at least 0 and below 1, got 1.0" in lines[0], lines
