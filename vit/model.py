"""The Vision Transformer of "An Image is Worth 16x16 Words", sized for CIFAR-10.

Parameter names follow timm's VisionTransformer, so that the state dicts map one to
one (see vit/timm_interop.py). The attention core and the LayerNorm+MLP sub-block go
through the backend picked by ViTConfig.backend (vit/backends.py).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vit.backends import get_backend

@dataclass
class ViTConfig:
    image_size: int = 32
    patch_size: int = 4
    num_classes: int = 10
    dim: int = 384
    depth: int = 7
    heads: int = 12
    mlp_dim: int = 384
    dropout: float = 0.0
    backend: str = "torch"
    layer_norm_eps: float = 1e-5  # torch's default, as the recipe uses; timm's models use 1e-6

    def __post_init__(self):
        for name in ("image_size", "patch_size", "num_classes", "dim", "depth", "heads", "mlp_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} does not divide image_size {self.image_size}")
        if self.dim % self.heads:
            raise ValueError(f"heads {self.heads} does not divide dim {self.dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.layer_norm_eps < 1.0:
            raise ValueError(f"layer_norm_eps must be in (0, 1), got {self.layer_norm_eps}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, images):  # [B, 3, H, W] -> [B, num_patches, dim]
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)


class Mlp(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)


class Block(nn.Module):
    """Pre-norm block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)
        self.dropout = cfg.dropout

    def forward(self, x, backend):
        qkv = self.attn.qkv(self.norm1(x))
        attended = self.attn.proj(backend.attention(qkv, self.attn.heads))
        x = x + F.dropout(attended, self.dropout, self.training)
        # The LayerNorm+MLP sub-block, residual included, is one backend call; it has
        # no dropout inside, since the fused kernels compute it in one pass.
        return backend.layernorm_mlp(
            x, self.norm2.weight, self.norm2.bias,
            self.mlp.fc1.weight, self.mlp.fc1.bias, self.mlp.fc2.weight, self.mlp.fc2.bias,
            self.norm2.eps,
        )


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig | None = None):
        super().__init__()
        cfg = cfg or ViTConfig()
        self.cfg = cfg
        self.backend = get_backend(cfg.backend)
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self.reset_parameters()

    def reset_parameters(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def set_backend(self, name: str):
        """Switch the implementation of the two seams; the weights stay as they are."""
        self.backend = get_backend(name)
        self.cfg.backend = name

    def forward(self, images):
        x = self.patch_embed(images)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = F.dropout(x, self.cfg.dropout, self.training)
        for block in self.blocks:
            x = block(x, self.backend)
        return self.head(self.norm(x[:, 0]))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
