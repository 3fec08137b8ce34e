"""The training recipe and a run's settings, in one dataclass shared by the trainer and the run files."""
import os
from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    """The recipe and the run's settings; defaults are the reference's table."""
    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 5.0
    weight_decay: float = 5e-5
    label_smoothing: float = 0.1
    precision: str = "bf16"  # bf16 | fp16 | fp32; resolved to fp32 on the CPU by resolve_defaults
    device: str = "cuda"
    seed: int = 0
    num_workers: int = min(4, os.cpu_count() or 1)
    train_subset: int | None = None
    augment: str = "gpu"  # gpu: batched on the device; cpu: torchvision per image in DataLoader workers
    compile: bool = False
    # Capture the training step (forward, loss, backward, Adam, metrics) in one CUDA graph and
    # replay it every step; CUDA only, single process, not with fp16 or compile (vit/trainer.py).
    cuda_graph: bool = False
    data_dir: str = "data"
    out_dir: str | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)
