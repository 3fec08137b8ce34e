"""The Vision Transformer of "An Image is Worth 16x16 Words", sized for CIFAR-10.

Parameter names follow timm's VisionTransformer, so that the state dicts map one to
one (see vit/timm_interop.py). A block is four seams of the backend picked by
ViTConfig.backend (vit/backends.py): LayerNorm + QKV projection, the attention core, the
output projection with its residual add, and the LayerNorm + MLP sub-block with its residual
add. Each module owns its forward with the backend fixed at construction, as timm's do.

Options beyond the plain ViT: the initialisation (timm's or PyTorch's defaults), what the head
reads (the class token, or sequence pooling as in Compact Transformers), a second GELU after
the MLP's fc2, and stochastic depth.
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vit.backends import Backend, backend_names, get_backend
from vit.fields import ConfigError, check_fields, option

INITS = ("timm", "pytorch")
POOLS = ("token", "sequence")


@dataclass
class ViTConfig:
    """The model; every field is a flag of train.py (vit/fields.py)."""
    image_size: int = option(32, bound="positive", help="input height and width; CIFAR-10's images are 32x32 and not "
                                                        "resized")
    patch_size: int = option(4, bound="positive", help="patch height and width")
    num_classes: int = option(10, bound="positive", help="outputs of the classifier head, at least CIFAR-10's 10")
    dim: int = option(384, bound="positive", help="hidden size")
    depth: int = option(7, bound="positive", help="number of transformer blocks")
    heads: int = option(12, bound="positive", help="attention heads, a divisor of --dim")
    mlp_dim: int = option(384, bound="positive", help="MLP hidden size")
    dropout: float = option(0.0, bound="fraction", help="dropout on embeddings and attention output")
    backend: str = option("torch", choices=backend_names, default_help="triton on CUDA when available, else torch",
                          help="implementation of attention and LayerNorm+MLP")
    # torch's default, as the recipe uses; timm's models use 1e-6.
    layer_norm_eps: float = option(1e-5, bound="unit_open", help="epsilon of every LayerNorm")
    mlp_second_gelu: bool = option(False, help="a GELU after the MLP's fc2 too (Linear-GELU-Linear-GELU, as the "
                                               "reference code)")
    # Block i drops at rate drop_path * i / (depth - 1), torch.linspace(0, drop_path, depth) as
    # timm; kept branches are scaled by 1 / (1 - rate).
    drop_path: float = option(0.0, bound="fraction", metavar="RATE",
                              help="stochastic depth: in training each sample skips each attention and MLP branch "
                                   "with its block's rate, rising linearly from 0 at the first block to RATE at the "
                                   "last (timm's rule)")
    init: str = option("timm", choices=INITS,
                       help="initialisation: timm (weights, class token and position embedding truncated normal "
                            "0.02, zero biases) or pytorch (nn.Linear's and nn.Conv2d's own, non-zero biases "
                            "included; class token and position embedding from randn, as the reference code)")
    pool: str = option("token", choices=POOLS,
                       help="what the head reads: the class token, or sequence pooling (a learned attention-weighted "
                            "average of the final tokens, no class token; Compact Transformers)")
    # The model is timm's, built at this config's image size, patch size, classes, depth and drop
    # rates with random weights (vit/timm_interop.py build_model), fused under the triton backend;
    # dim, heads, mlp_dim and layer_norm_eps record its architecture. train.py's --model sets it.
    timm_model: str = option("", flag=False, help="a timm registry name (vit_tiny_patch16_224), or empty for this "
                                                  "module's ViT")

    def __post_init__(self):
        check_fields(self)
        if self.image_size % self.patch_size:
            raise ConfigError(f"patch_size {self.patch_size} does not divide image_size {self.image_size}",
                              "patch_size", "image_size")
        if self.dim % self.heads:
            raise ConfigError(f"heads {self.heads} does not divide dim {self.dim}", "heads", "dim")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """The sequence the blocks see: the patches, and the class token unless sequence pooling."""
        return self.num_patches + (self.pool == "token")


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, images):  # [B, 3, H, W] -> [B, num_patches, dim]
        return self.proj(images).flatten(2).transpose(1, 2)


class AttentionResidual(nn.Module):
    """The attention branch added to its residual: x + s * proj(attention(qkv(norm(x)))).

    Named for the residual add it owns: the backend fuses the output projection with that add
    (one linear_residual call), so the branch alone never exists as a tensor. norm is the
    block's LayerNorm before it (norm1, which timm's names keep on the block): the backend fuses
    it into the QKV projection. s is the per-sample branch scale of stochastic depth (None: 1).
    Dropout (ViTConfig.dropout) applies to the attention output before the projection.
    """

    def __init__(self, cfg: ViTConfig, backend: Backend):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.dropout = cfg.dropout
        self.backend = backend

    def forward(self, x, norm: nn.LayerNorm, branch_scale=None):
        qkv = self.backend.layernorm_linear(x, norm.weight, norm.bias, self.qkv.weight, self.qkv.bias, norm.eps)
        attended = F.dropout(self.backend.attention(qkv, self.heads), self.dropout, self.training)
        return self.backend.linear_residual(attended, self.proj.weight, self.proj.bias, x, branch_scale=branch_scale)


class MlpResidual(nn.Module):
    """The MLP branch added to its residual: x + s * act2(fc2(gelu(fc1(norm(x))))), one backend
    call (layernorm_mlp, which fuses the norm, both linears and the residual add; norm is the
    block's norm2; act2 is GELU with ViTConfig.mlp_second_gelu; s as in AttentionResidual). No
    dropout inside: the fused kernels compute it in one pass."""

    def __init__(self, cfg: ViTConfig, backend: Backend):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)
        self.second_gelu = cfg.mlp_second_gelu
        self.backend = backend

    def forward(self, x, norm: nn.LayerNorm, branch_scale=None):
        return self.backend.layernorm_mlp(x, norm.weight, norm.bias, self.fc1.weight, self.fc1.bias, self.fc2.weight,
                                          self.fc2.bias, norm.eps, second_gelu=self.second_gelu,
                                          branch_scale=branch_scale)


class Block(nn.Module):
    """Pre-norm block: x + MHSA(LN(x)), then x + MLP(LN(x)). The attributes keep timm's names
    (attn, mlp) so that the state dicts match; each holds its branch with the residual add."""

    def __init__(self, cfg: ViTConfig, backend: Backend):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.attn = AttentionResidual(cfg, backend)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.mlp = MlpResidual(cfg, backend)

    def forward(self, x, branch_scales=None):
        """branch_scales: None, or [2, B] per-sample scales of the attention and MLP branches."""
        attn_scale, mlp_scale = (None, None) if branch_scales is None else branch_scales
        x = self.attn(x, self.norm1, attn_scale)
        return self.mlp(x, self.norm2, mlp_scale)


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig | None = None):
        super().__init__()
        cfg = cfg or ViTConfig()
        self.cfg = cfg
        self.backend = get_backend(cfg.backend)
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.pool == "token" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg, self.backend) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        # Sequence pooling's score of each token (Compact Transformers' name).
        self.attention_pool = nn.Linear(cfg.dim, 1) if cfg.pool == "sequence" else None
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        # Each block's probability of keeping a branch, for stochastic depth; not a parameter,
        # not in the state dict.
        self.register_buffer("keep_probability", 1.0 - torch.tensor(self.drop_path_rates).view(-1, 1, 1),
                             persistent=False)
        self.reset_parameters()

    @property
    def drop_path_rates(self) -> list[float]:
        """Each block's stochastic-depth rate (see ViTConfig.drop_path)."""
        return torch.linspace(0.0, self.cfg.drop_path, self.cfg.depth).tolist()

    def reset_parameters(self):
        """ViTConfig.init: timm's initialisation, or PyTorch's defaults as the reference code."""
        pytorch = self.cfg.init == "pytorch"
        for module in self.modules():
            if pytorch and isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
                module.reset_parameters()
            elif isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for embedding in (self.pos_embed, self.cls_token):
            if embedding is None:
                continue
            if pytorch:
                nn.init.normal_(embedding)
            else:
                nn.init.trunc_normal_(embedding, std=0.02)

    def set_backend(self, name: str):
        """Switch the implementation of the seams; the weights stay as they are."""
        self.backend = get_backend(name)
        self.cfg.backend = name
        for module in self.modules():
            if isinstance(module, (AttentionResidual, MlpResidual)):
                module.backend = self.backend

    def branch_scales(self, batch: int):
        """[depth, 2, batch] per-sample scales of every block's two branches: 0 for a dropped
        sample, 1 / keep for a kept one. None outside training or without stochastic depth."""
        if not self.training or self.cfg.drop_path == 0:
            return None
        keep = self.keep_probability
        return torch.bernoulli(keep.expand(-1, 2, batch)) / keep

    def forward(self, images):
        x = self.patch_embed(images)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        x = F.dropout(x, self.cfg.dropout, self.training)
        scales = self.branch_scales(x.shape[0])
        for index, block in enumerate(self.blocks):
            x = block(x, None if scales is None else scales[index])
        if self.attention_pool is None:
            return self.head(self.norm(x[:, 0]))
        x = self.norm(x)
        weights = self.attention_pool(x).softmax(dim=1)  # [B, N, 1]
        return self.head((weights.transpose(1, 2) @ x).squeeze(1))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# How the model computes, not what: the backends agree within the parity rule, so a checkpoint may
# run on another backend than the one it was trained with.
EXECUTION_FIELDS = ("backend",)


def model_config_differences(checkpoint: dict, config: dict) -> list[str]:
    """The fields in which a checkpoint's model_config and a run's config.json "model" (both as
    dicts) describe different models, each as "name (A in the checkpoint, B in config.json)".
    A field one of them lacks (a file written before the field existed) counts as ViTConfig's
    default. Shape-preserving differences count as much as the others: heads, the second GELU,
    the layer-norm eps or the initialisation change what the same tensors compute or meant."""
    defaults = asdict(ViTConfig())
    differences = []
    for name, default in defaults.items():
        if name in EXECUTION_FIELDS:
            continue
        ours, theirs = checkpoint.get(name, default), config.get(name, default)
        if ours != theirs:
            differences.append(f"{name} ({ours!r} in the checkpoint, {theirs!r} in config.json)")
    return differences
