"""Recipes: named presets of the model and training settings (`train.py --recipe NAME`).

A preset is data: the ViTConfig and TrainConfig fields it sets, as a config file (`--config
FILE`) sets them, each of them also a flag of train.py (the field name with dashes). Fields a
preset leaves out keep the dataclasses' defaults; a config file and then the flags typed on the
command line override the preset's values (vit/config.py). README.md's recipes table lists
every value of every preset with its source.

- default: the dataclasses' defaults, the reference's published table (12 heads, one GELU,
  timm's initialisation, label smoothing 0.91 / 0.01, torchvision's AutoAugment).
- reference: what the reference code (KunViT) ran, where it differs from the published table.
  Its per-epoch warmup and cosine are not reproduced: its warmup scheduler gives the whole
  first epoch a learning rate of 0, an epoch that trains nothing; this project warms up per
  step, starting above zero.
- strong: the same 6.3M-parameter ViT with the training of the stronger CIFAR-10 ViT anchors
  (SPT_LSA_ViT, Compact Transformers, DeiT/timm's defaults for what they share).
"""
from vit.config import TrainConfig, build_configs
from vit.model import ViTConfig

RECIPES: dict[str, dict] = {
    "default": {},
    "reference": {
        "heads": 8,  # its code's default (heads of 48), run without arguments
        "mlp_second_gelu": True,  # its MLP is Linear-GELU-Linear-GELU
        "init": "pytorch",  # nn.Linear defaults, non-zero biases, randn class token and position embedding
        "label_smoothing_convention": "reference",  # 0.9 on the true class, 0.1/9 on each other
        "auto_augment": "reference",  # grey 128 fill, rotation by +theta only, bicubic shears
    },
    "strong": {
        "optimizer": "adamw",  # decoupled weight decay, none on norms, biases, embeddings (timm/DeiT)
        "lr": 1e-3,  # SPT_LSA_ViT
        "weight_decay": 0.05,  # SPT_LSA_ViT, DeiT
        "warmup_epochs": 10.0,  # SPT_LSA_ViT
        "drop_path": 0.1,  # SPT_LSA_ViT, Compact Transformers, DeiT
        "mixup_alpha": 0.8,  # timm/DeiT
        "cutmix_alpha": 1.0,  # timm/DeiT, SPT_LSA_ViT
        "mix_prob": 1.0,  # timm/DeiT
        "mix_switch_prob": 0.5,  # timm/DeiT, SPT_LSA_ViT
        "label_smoothing": 0.1,  # all three anchors, F.cross_entropy's convention as timm's
        # A time constant 1 / (1 - decay) of 5,000 steps, 6.4% of the 78,000 steps of 200 epochs
        # at batch 128: DeiT's 0.99996 is 25,000 of its 375,000 steps (6.7%).
        "ema_decay": 0.9998,
        "pool": "token",  # sequence pooling (Compact Transformers' CVT) stays optional: --pool sequence
    },
}


def recipe_values(name: str) -> dict:
    """A preset's fields, TrainConfig.recipe naming it."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return {**RECIPES[name], "recipe": name}


def recipe_configs(name: str) -> tuple[ViTConfig, TrainConfig]:
    """The model and training configuration of a preset: the dataclasses' defaults with the
    preset's values."""
    return build_configs(recipe_values(name))
