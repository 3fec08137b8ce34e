"""The training recipe and a run's settings, in one dataclass shared by the trainer and the run files."""
from dataclasses import dataclass, field

from vit.augment import AUTO_AUGMENT_VARIANTS
from vit.mixing import SMOOTHING_CONVENTIONS

OPTIMIZERS = ("adam", "adamw")

# Settings that no longer exist, with what replaced them: train.py refuses a flag naming one with
# this reason, and --resume reads a saved run's config.json that holds one without it, with a note.
REMOVED_FIELDS = {
    "augment": "training augments in batches on the training device (vit/augment.py), the only pipeline",
    "num_workers": "no DataLoader workers remain to set; training augments in batches on the training device",
}


@dataclass
class TrainConfig:
    """The recipe and the run's settings; defaults are the reference's table (the "default"
    recipe of vit/recipes.py)."""
    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 5.0
    # adam: Adam with coupled L2 weight decay on every parameter; adamw: decoupled weight decay on
    # the weight matrices only, none on norms, biases, the position embedding and the class token.
    optimizer: str = "adam"
    weight_decay: float = 5e-5
    label_smoothing: float = 0.1
    # "torch": 1 - s + s/K on the true class (F.cross_entropy's); "reference": 1 - s, s/(K-1) on each other.
    label_smoothing_convention: str = "torch"
    auto_augment: str = "torchvision"  # a variant of vit.augment.AUTO_AUGMENT_VARIANTS
    # CutMix / MixUp in the batched loader (vit/mixing.py), on when either alpha is positive.
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0  # chance that a sample is mixed
    mix_switch_prob: float = 0.5  # chance of CutMix rather than MixUp when both alphas are positive
    # An exponential moving average of the weights, updated every step and evaluated after every
    # epoch: average = decay * average + (1 - decay) * weights. 0 turns it off.
    ema_decay: float = 0.0
    recipe: str = "default"  # the preset (vit/recipes.py) the values came from; the fields hold the values
    precision: str = "bf16"  # bf16 | fp16 | fp32; resolved to fp32 on the CPU by resolve_defaults
    device: str = "cuda"
    seed: int = 0
    train_subset: int | None = None
    compile: bool = False
    # Capture the training step (forward, loss, backward, Adam, metrics) in one CUDA graph and
    # replay it every step; CUDA only, single process, not with fp16 or compile (vit/trainer.py).
    cuda_graph: bool = False
    data_dir: str = "data"
    out_dir: str | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name, value, allowed in (("optimizer", self.optimizer, OPTIMIZERS),
                                     ("label_smoothing_convention", self.label_smoothing_convention,
                                      SMOOTHING_CONVENTIONS),
                                     ("auto_augment", self.auto_augment, tuple(AUTO_AUGMENT_VARIANTS))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {self.mixup_alpha}, {self.cutmix_alpha}")
        for name in ("mix_prob", "mix_switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

    @property
    def mixing(self) -> bool:
        """Whether the loader mixes samples (CutMix or MixUp) and hands out soft targets."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0
