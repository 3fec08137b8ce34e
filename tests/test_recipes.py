"""Recipes (vit/recipes.py, train.py --recipe) and the options they set: the presets' values,
the command line around them, AdamW's weight-decay groups, the loss conventions, the average of
the weights, PyTorch's initialisation and sequence pooling."""
import csv
import json
import math
import os
import re
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train
from bench.counts import DeviceWorkCounter
from vit import evaluate
from vit.checkpoint import load_checkpoint
from vit.config import TrainConfig
from vit.mixing import soft_target_cross_entropy
from vit.model import ViT, ViTConfig
from vit.optimizer import Adam, make_optimizer, weight_decay_groups
from vit.recipes import RECIPES, recipe_configs
from vit.trainer import EvalSet, Trainer, criterion, make_train_loader, seed_everything

TINY = ViTConfig(dim=32, depth=2, heads=2, mlp_dim=32)
TINY_FLAGS = ["--device", "cpu", "--depth", "2", "--dim", "32", "--heads", "2", "--mlp-dim", "32", "--no-progress"]
CLASSES = [str(i) for i in range(10)]
README = Path(__file__).resolve().parent.parent / "README.md"

# What each preset sets, as README.md's recipes table documents it: every field that differs
# from the dataclasses' defaults, and nothing else.
DOCUMENTED = {
    "default": {},
    "reference": {"heads": 8, "mlp_second_gelu": True, "init": "pytorch", "label_smoothing_convention": "reference",
                  "auto_augment": "reference"},
    "strong": {"optimizer": "adamw", "weight_decay": 0.05, "warmup_epochs": 10.0, "drop_path": 0.1,
               "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "ema_decay": 0.9998},
}


def differing_fields(model_cfg: ViTConfig, train_cfg: TrainConfig) -> dict:
    values = {**asdict(model_cfg), **asdict(train_cfg)}
    defaults = {**asdict(ViTConfig()), **asdict(TrainConfig())}
    return {name: value for name, value in values.items() if value != defaults[name] and name != "recipe"}


# ------------------------------------------------------------------------------------ the presets

@pytest.mark.parametrize("name", list(RECIPES))
def test_each_preset_resolves_to_exactly_its_documented_values(name):
    model_cfg, train_cfg = recipe_configs(name)
    assert differing_fields(model_cfg, train_cfg) == DOCUMENTED[name]
    assert train_cfg.recipe == name


def test_the_readme_table_lists_every_value_of_every_preset():
    section = README.read_text().split("## Recipes", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `--([a-z-]+)` \|(.*)\|\s*$", line)
        if match:
            rows[match.group(1).replace("-", "_")] = [cell.strip() for cell in match.group(2).split("|")]
    header = next(line for line in section.splitlines() if line.startswith("| flag"))
    columns = [cell.strip() for cell in header.strip("|").split("|")][1:]
    assert columns[:3] == ["default", "reference", "strong"], columns
    assert set().union(*DOCUMENTED.values()) <= set(rows), sorted(set().union(*DOCUMENTED.values()) - set(rows))
    for name in RECIPES:
        model_cfg, train_cfg = recipe_configs(name)
        values = {**asdict(model_cfg), **asdict(train_cfg)}
        for field_name in rows:
            value = values[field_name]
            cell = rows[field_name][columns.index(name)]
            shown = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
            assert cell.split()[0].strip("*") in (str(shown), f"{shown:g}" if isinstance(shown, float) else ""), \
                (name, field_name, cell, shown)


def test_an_unknown_recipe_or_field_is_refused():
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe_configs("fast")
    from vit.config import build_configs
    with pytest.raises(ValueError, match="not a ViTConfig or TrainConfig field: warmup"):
        build_configs({"warmup": 5})


# -------------------------------------------------------------------------------- the command line

def printed_config(capsys, argv) -> dict:
    assert train.main(argv + ["--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def test_print_config_prints_the_resolved_preset_and_exits_without_training(capsys, tmp_path):
    out_dir = tmp_path / "never"
    config = printed_config(capsys, ["--recipe", "strong", "--device", "cpu", "--out-dir", str(out_dir)])
    assert not out_dir.exists()
    model_cfg = ViTConfig(**config["model"])
    train_cfg = TrainConfig(**{k: v for k, v in config["train"].items()})
    expected = {**DOCUMENTED["strong"], "precision": "fp32", "device": "cpu", "out_dir": str(out_dir)}
    assert differing_fields(model_cfg, train_cfg) == expected
    assert train_cfg.recipe == "strong"


def test_typed_flags_override_the_preset(capsys):
    config = printed_config(capsys, ["--recipe", "reference", "--device", "cpu", "--heads", "12", "--no-mlp-second-gelu",
                                     "--lr", "5e-4"])
    assert config["model"]["heads"] == 12 and config["model"]["mlp_second_gelu"] is False
    assert config["train"]["lr"] == 5e-4
    # What was not typed keeps the preset's value.
    assert config["model"]["init"] == "pytorch" and config["train"]["auto_augment"] == "reference"
    assert config["train"]["recipe"] == "reference"


def test_help_lists_the_presets_values_as_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--recipe", "strong", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("--optimizer {adam,adamw}", "(default: adamw)", "(default: 0.05)", "(default: 0.9998)",
                     "(default: 0.8)", "(default: strong)"):
        assert expected in text, expected
    plain = " ".join(train.build_parser().format_help().split())
    assert "(default: adam)" in plain and "(default: default)" in plain


# ------------------------------------------------------------------------------------ the optimizer

def test_adamw_decays_only_the_weight_matrices():
    for pool in ("token", "sequence"):
        model = ViT(ViTConfig(dim=32, depth=2, heads=2, mlp_dim=32, pool=pool))
        decayed, not_decayed = weight_decay_groups(model)
        names = dict(model.named_parameters())
        assert sorted(decayed + not_decayed) == sorted(names)
        expected_exempt = {n for n in names if n.endswith(".bias") or ".norm" in n or n.startswith("norm.")
                           or n in ("pos_embed", "cls_token")}
        assert set(not_decayed) == expected_exempt
        assert all(names[n].dim() >= 2 for n in decayed) and all(names[n].dim() == 1 or n in ("pos_embed", "cls_token")
                                                                for n in not_decayed)
        assert ("cls_token" in not_decayed) == (pool == "token")
        optimizer = make_optimizer(model, TrainConfig(optimizer="adamw", weight_decay=0.05, device="cpu"), "cpu")
        assert isinstance(optimizer, torch.optim.AdamW)
        by_id = {id(p): n for n, p in model.named_parameters()}
        groups = [({by_id[id(p)] for p in g["params"]}, g["weight_decay"]) for g in optimizer.param_groups]
        assert groups == [(set(decayed), 0.05), (set(not_decayed), 0.0)]
        assert all(torch.is_tensor(g["lr"]) for g in optimizer.param_groups)


def test_adam_keeps_one_group_with_coupled_decay_on_everything():
    model = ViT(TINY)
    optimizer = make_optimizer(model, TrainConfig(device="cpu"), "cpu")
    assert type(optimizer) is Adam and len(optimizer.param_groups) == 1  # not AdamW
    assert optimizer.param_groups[0]["weight_decay"] == TrainConfig().weight_decay


# --------------------------------------------------------------------------------------- the loss

def test_label_smoothing_conventions_put_the_documented_mass_on_each_class():
    logits = torch.randn(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 9, 3, 5, 1])
    log_probs = logits.log_softmax(-1)
    for convention, on, off in (("torch", 0.91, 0.01), ("reference", 0.9, 0.1 / 9)):
        cfg = TrainConfig(label_smoothing=0.1, label_smoothing_convention=convention)
        targets = torch.full((6, 10), off, dtype=torch.float64)
        targets[torch.arange(6), labels] = on
        expected = -(targets * log_probs).sum(-1).mean()
        torch.testing.assert_close(criterion(logits, labels, cfg).double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(criterion(logits, labels, TrainConfig(label_smoothing=0.1)),
                               F.cross_entropy(logits.float(), labels, label_smoothing=0.1))


def test_soft_target_loss_on_one_hot_targets_is_cross_entropy():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 10, generator=generator)
    labels = torch.randint(0, 10, (8,), generator=generator)
    one_hot = F.one_hot(labels, 10).float()
    torch.testing.assert_close(soft_target_cross_entropy(logits, one_hot), F.cross_entropy(logits, labels))
    torch.testing.assert_close(criterion(logits, one_hot, TrainConfig(label_smoothing=0.1)),
                               F.cross_entropy(logits, labels))


# ----------------------------------------------------------------------------- the averaged weights

def make_trainer(run_dir, model_cfg=TINY, steps=4, batch_size=8, **cfg_fields) -> Trainer:
    """A trainer over generated images with the batched loader (mixing when the fields ask)."""
    cfg = TrainConfig(**{"epochs": 2, "batch_size": batch_size, "warmup_epochs": 1, "device": "cpu",
                         "precision": "fp32", "progress": False, **cfg_fields})
    device = torch.device("cpu")
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    images = torch.randint(0, 256, (steps * batch_size, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (steps * batch_size,), generator=generator)
    loader = make_train_loader(cfg, images, labels, device, num_classes=10)
    model = ViT(model_cfg)
    test_set = EvalSet(images[:16], labels[:16], CLASSES)
    return Trainer(model, loader, test_set, make_optimizer(model, cfg, device), cfg, run_dir, log=lambda line: None)


def test_the_average_of_the_weights_is_its_closed_form_after_n_steps(tmp_path):
    decay = 0.7
    trainer = make_trainer(tmp_path, ema_decay=decay, optimizer="adamw", weight_decay=0.05)
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    trajectory = []  # the weights after each step
    trainer.loader.set_epoch(0)
    for images, targets in trainer.loader:
        trainer.train_step(images, targets)
        trajectory.append([p.detach().clone() for p in trainer.model.parameters()])
    n = len(trajectory)
    assert n == 4
    # average_n = decay^n w_0 + (1 - decay) sum_k decay^(n - k) w_k
    for index, average in enumerate(trainer.ema_model.parameters()):
        expected = decay ** n * initial[index].double()
        for k, weights in enumerate(trajectory, start=1):
            expected += (1 - decay) * decay ** (n - k) * weights[index].double()
        torch.testing.assert_close(average.double(), expected, rtol=1e-5, atol=1e-6)
        assert not average.requires_grad
    assert not torch.equal(list(trainer.ema_model.parameters())[0], trajectory[-1][0])


def test_the_strong_step_has_no_host_sync(tmp_path):
    """AdamW's groups, CutMix/MixUp soft targets, stochastic depth and the EMA update: all on the
    device, the same work every step."""
    model_cfg = ViTConfig(dim=32, depth=2, heads=2, mlp_dim=32, drop_path=0.1)
    _, strong = recipe_configs("strong")
    fields_of_strong = {name: getattr(strong, name) for name in ("optimizer", "weight_decay", "mixup_alpha",
                                                                 "cutmix_alpha", "ema_decay")}
    trainer = make_trainer(tmp_path, model_cfg, steps=5, **fields_of_strong)
    trainer.loader.set_epoch(0)
    batches = list(trainer.loader)
    assert batches[0][1].is_floating_point()  # soft targets
    counts = []
    for images, targets in batches:
        with DeviceWorkCounter() as counter:
            trainer.train_step(images, targets)
        counts.append(counter.counts)
    for index, step in enumerate(counts):
        assert (step.syncs, step.host_tensors, step.host_to_device_copies, step.device_to_host_copies) == (0, 0, 0, 0), \
            (index, dict(step.by_op))
    assert len({c.launches for c in counts[1:]}) == 1  # the first step also creates the optimizer's moments
    assert counts[1].by_op["_foreach_lerp_"] >= 1, dict(counts[1].by_op)


def test_a_resumed_run_restores_the_average(tmp_path):
    trainer = make_trainer(tmp_path, ema_decay=0.5, epochs=1)
    trainer.fit()
    saved = load_checkpoint(tmp_path / "last.pt")
    for name, value in trainer.ema_model.state_dict().items():
        torch.testing.assert_close(saved["ema"][name], value)
    resumed = make_trainer(tmp_path, ema_decay=0.5, epochs=1)
    resumed.resume()
    for name, value in trainer.ema_model.state_dict().items():
        torch.testing.assert_close(resumed.ema_model.state_dict()[name], value)
    make_trainer(tmp_path / "plain", epochs=1).fit()
    assert "ema" not in load_checkpoint(tmp_path / "plain" / "last.pt")


# ------------------------------------------------------------------------ initialisation and pooling

def test_pytorch_initialisation_has_nn_linears_bounds_and_randn_embeddings():
    torch.manual_seed(0)
    model = ViT(ViTConfig(dim=256, depth=2, heads=4, mlp_dim=512, init="pytorch"))
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fan_in = module.weight[0].numel()
            bound = 1 / math.sqrt(fan_in)
            for tensor in (module.weight, module.bias):
                assert tensor.abs().max() <= bound, name
                # Uniform in +-bound: standard deviation bound / sqrt(3), and it fills the range.
                if tensor.numel() >= 256:
                    assert tensor.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), name
                    assert tensor.abs().max() > 0.9 * bound, name
            assert module.bias.abs().min() > 0 or module.bias.numel() < 4, name  # non-zero biases
        elif isinstance(module, nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight)) and not module.bias.any()
    for embedding in (model.pos_embed, model.cls_token):
        assert embedding.std().item() == pytest.approx(1.0, rel=0.1)
    assert model.pos_embed.abs().max() > 2.5  # not truncated at 2 standard deviations as timm's
    timm_style = ViT(ViTConfig(dim=256, depth=2, heads=4, mlp_dim=512))
    assert timm_style.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
    assert not timm_style.blocks[0].mlp.fc1.bias.any()


def test_sequence_pooling_has_no_class_token_and_trains():
    torch.manual_seed(0)
    cfg = ViTConfig(dim=32, depth=2, heads=2, mlp_dim=32, pool="sequence")
    model = ViT(cfg)
    assert model.cls_token is None and "cls_token" not in model.state_dict()
    assert model.pos_embed.shape == (1, cfg.num_patches, 32) and cfg.num_tokens == cfg.num_patches
    images = torch.randn(3, 3, 32, 32)
    logits = model(images)
    assert logits.shape == (3, 10)
    logits.square().sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # The head reads the softmax-weighted average of the final tokens.
    with torch.no_grad():
        tokens = model.patch_embed(images) + model.pos_embed
        for block in model.blocks:
            tokens = block(tokens)
        tokens = model.norm(tokens)
        weights = model.attention_pool(tokens).softmax(dim=1)
        torch.testing.assert_close(model(images), model.head((weights * tokens).sum(dim=1)))


def test_the_token_model_keeps_its_state_dict_names():
    names = set(ViT(TINY).state_dict())
    assert {"cls_token", "pos_embed"} <= names and not any(n.startswith("attention_pool") for n in names)


# --------------------------------------------------------------------------------- train.py runs

def test_a_tiny_strong_run_writes_the_average_and_evaluates_it(fake_cifar, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(TINY_FLAGS + ["--recipe", "strong", "--epochs", "2", "--batch-size", "20", "--data-dir",
                                    str(fake_cifar), "--out-dir", str(run)]) == 0
    out = capsys.readouterr()
    assert "recipe strong;" in out.out and "optimizer=adamw" in out.out and "EMA acc" in out.out
    assert "average of the weights: best test accuracy" in out.out
    assert "--ema-decay 0.9998 averages over about 5,000 steps" in out.err  # a run this short is warned
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["recipe"] == "strong" and config["model"]["drop_path"] == 0.1
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {"ema_test_loss", "ema_test_acc"} <= set(rows[0])
    assert all(0 <= float(r["ema_test_acc"]) <= 1 and math.isfinite(float(r["ema_test_loss"])) for r in rows)
    checkpoint = load_checkpoint(run / "last.pt")
    assert set(checkpoint["ema"]) == set(checkpoint["model"])
    assert not torch.equal(checkpoint["ema"]["head.weight"], checkpoint["model"]["head.weight"])

    assert evaluate.main([str(run / "last.pt"), "--ema", "--device", "cpu", "--out-dir", str(tmp_path / "ema")]) == 0
    report = json.loads((tmp_path / "ema" / "eval.json").read_text())
    assert report["source"]["weights"] == "ema"
    assert report["accuracy"] == pytest.approx(float(rows[-1]["ema_test_acc"]))


def test_evaluating_the_average_of_a_run_without_one_is_a_one_line_error(fake_cifar, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(TINY_FLAGS + ["--epochs", "1", "--batch-size", "20", "--data-dir", str(fake_cifar),
                                    "--out-dir", str(run)]) == 0
    with open(run / "metrics.csv") as f:
        assert "ema_test_acc" not in next(csv.DictReader(f))
    capsys.readouterr()
    assert evaluate.main([str(run), "--ema", "--device", "cpu"]) == 1
    assert "has no average of the weights" in capsys.readouterr().err


def test_resume_refuses_a_changed_recipe_and_keeps_the_saved_one(fake_cifar, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(TINY_FLAGS + ["--recipe", "reference", "--epochs", "2", "--batch-size", "20", "--data-dir",
                                    str(fake_cifar), "--out-dir", str(run)]) == 0
    for flags in (["--recipe", "strong"], ["--ema-decay", "0.9"], ["--optimizer", "adamw"]):
        with pytest.raises(SystemExit) as exit_info:
            train.main(["--resume", str(run), *flags])
        assert exit_info.value.code == 2
        assert f"differ from it: {flags[0]}" in capsys.readouterr().err
    config = printed_config(capsys, ["--resume", str(run), "--device", "cpu"])
    assert config["train"]["recipe"] == "reference" and config["model"]["init"] == "pytorch"


@pytest.mark.parametrize("name", list(RECIPES))
def test_each_preset_learns_on_a_tiny_model(name, tmp_path):
    """A few epochs of the preset (shortened schedule, tiny model) on images whose class is their
    colour under noise: the test accuracy on them rises far above chance (10%)."""
    model_cfg, cfg = recipe_configs(name)
    model_cfg = replace(model_cfg, patch_size=8, dim=48, depth=2, mlp_dim=48)  # 48: divided by 12 and 8 heads
    cfg = replace(cfg, epochs=4, warmup_epochs=1, batch_size=32, device="cpu", precision="fp32",
                  progress=False, ema_decay=0.9 if cfg.ema_decay else 0.0)
    seed_everything(0)
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (256,), generator=generator)
    palette = torch.randint(0, 256, (10, 3), generator=generator).float()
    noise = torch.randint(0, 256, (256, 3, 32, 32), generator=generator).float()
    images = (0.7 * palette[labels][:, :, None, None] + 0.3 * noise).to(torch.uint8)
    loader = make_train_loader(cfg, images, labels, torch.device("cpu"), num_classes=10)
    model = ViT(model_cfg)
    trainer = Trainer(model, loader, EvalSet(images[:128], labels[:128], CLASSES), make_optimizer(model, cfg, "cpu"),
                      cfg, tmp_path, log=lambda line: None)
    losses = [trainer.train_epoch(epoch)["train_loss"] for epoch in range(cfg.epochs)]  # no files written
    assert losses[-1] < losses[0], losses
    accuracy = trainer.evaluate()[1]
    assert accuracy >= 0.4, (name, accuracy)
    if cfg.ema_decay:
        assert trainer.evaluate_ema()[1] >= 0.4, name


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="the Triton kernels need CUDA or TRITON_INTERPRET=1")
@pytest.mark.filterwarnings("ignore:tl.make_block_ptr is deprecated")
@pytest.mark.interpreter
def test_sequence_pooling_and_pytorch_init_give_the_same_logits_and_gradients_under_both_backends():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=8, patch_size=4, dim=32, depth=2, heads=2, mlp_dim=32, pool="sequence",
                    init="pytorch", mlp_second_gelu=True)
    reference = ViT(cfg).to(device)
    fused = ViT(replace(cfg, backend="triton")).to(device)
    fused.load_state_dict(reference.state_dict())
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(3, 3, 8, 8, generator=generator).to(device)
    labels = torch.randint(0, 10, (3,), generator=generator).to(device)
    results = []
    for model in (reference, fused):
        logits = model(images)
        F.cross_entropy(logits, labels).backward()
        results.append({"logits": logits.detach(), **{n: p.grad for n, p in model.named_parameters()}})
    assert "attention_pool.weight" in results[1] and all(value is not None for value in results[1].values())
    for name, value in results[1].items():
        torch.testing.assert_close(value, results[0][name], rtol=1e-4, atol=1e-5, msg=name)
