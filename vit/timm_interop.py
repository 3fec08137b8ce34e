"""timm's VisionTransformer beside ours: weights to and from it, and timm's registered models as
the model of a run.

vit.model names its parameters as timm does, so the state dicts map one to one (to_timm,
from_timm). A run's ViTConfig may name a timm model instead (ViTConfig.timm_model, train.py
--model timm:NAME): build_model builds it, fused onto the kernels under the triton backend
(vit/timm_fuse.py). timm is needed for these functions alone, never to train our ViT.
"""
from functools import partial

import torch.nn as nn

from vit.model import ViT, ViTConfig
from vit.timm_fuse import fuse


def to_timm(model: ViT):
    from timm.models.vision_transformer import VisionTransformer

    cfg = model.cfg
    if cfg.mlp_second_gelu:
        raise ValueError("timm's VisionTransformer has no GELU after fc2; a model with mlp_second_gelu=True has no "
                         "timm equivalent")
    if cfg.pool == "sequence":
        raise ValueError("timm's VisionTransformer has no sequence pooling (a learned attention-weighted average of "
                         "the tokens, no class token); a model with pool='sequence' has no timm equivalent")
    timm_model = VisionTransformer(
        img_size=cfg.image_size, patch_size=cfg.patch_size, num_classes=cfg.num_classes,
        embed_dim=cfg.dim, depth=cfg.depth, num_heads=cfg.heads, mlp_ratio=cfg.mlp_dim / cfg.dim,
        qkv_bias=True, drop_rate=cfg.dropout, proj_drop_rate=cfg.dropout, drop_path_rate=cfg.drop_path,
        norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps),
    )
    timm_model.load_state_dict(model.state_dict())
    return timm_model.to(next(model.parameters()).device)


def from_timm(timm_model, backend: str = "torch") -> ViT:
    """A ViT with the weights of a timm VisionTransformer of the plain layout this project uses."""
    patch = timm_model.patch_embed.patch_size[0]
    image = timm_model.patch_embed.img_size[0]
    block = timm_model.blocks[0]
    if timm_model.global_pool != "token" or timm_model.cls_token is None:
        raise ValueError("from_timm needs a class-token model (global_pool='token')")
    # Every LayerNorm of the model shares one eps (timm's default 1e-6); ours carries it.
    norm_eps = {module.eps for module in timm_model.modules() if isinstance(module, nn.LayerNorm)}
    if len(norm_eps) != 1:
        raise ValueError(f"from_timm needs one LayerNorm eps throughout the model, found {sorted(norm_eps)}")
    # timm's stochastic depth rises linearly to drop_path_rate at the last block, as ours does.
    last_drop_path = getattr(timm_model.blocks[-1].drop_path1, "drop_prob", 0.0)
    cfg = ViTConfig(
        image_size=image, patch_size=patch, num_classes=timm_model.num_classes,
        dim=timm_model.embed_dim, depth=len(timm_model.blocks), heads=block.attn.num_heads,
        mlp_dim=block.mlp.fc1.out_features, backend=backend, layer_norm_eps=norm_eps.pop(),
        drop_path=last_drop_path,
    )
    model = ViT(cfg)
    # strict: any extra module in the timm model (layer scale, qk norm, fc_norm) fails here.
    model.load_state_dict(timm_model.state_dict(), strict=True)
    return model.to(next(timm_model.parameters()).device)


def build_model(cfg: ViTConfig) -> nn.Module:
    """The model of cfg: ViT(cfg), or for cfg.timm_model timm's model of that name with random
    weights at cfg's image size, patch size, classes, depth and drop rates, every block fused onto
    cfg.backend's seams unless the backend is torch (timm's own forward). The timm model carries
    cfg as .cfg, as ours does. ValueError when timm's model is not the architecture cfg records,
    or a block cannot be fused."""
    if not cfg.timm_model:
        return ViT(cfg)
    model = _create_timm_model(cfg.timm_model, cfg.image_size, cfg.num_classes, cfg.dropout, cfg.drop_path,
                               patch_size=cfg.patch_size, depth=cfg.depth)
    built = timm_config(model, cfg.timm_model, cfg.num_classes, cfg.dropout, cfg.drop_path, cfg.backend)
    if built != cfg:
        differing = [f"{name} {getattr(built, name)} (recorded {getattr(cfg, name)})" for name in vars(cfg)
                     if getattr(built, name) != getattr(cfg, name)]
        raise ValueError(f"timm's {cfg.timm_model} is not the recorded architecture: {', '.join(differing)}")
    if cfg.backend != "torch":
        fuse(model, strict=True, backend=cfg.backend)
    model.cfg = cfg
    return model


def resolve_timm_config(name: str, *, image_size: int, num_classes: int, dropout: float = 0.0, drop_path: float = 0.0,
                        backend: str = "torch", patch_size: int | None = None, depth: int | None = None) -> ViTConfig:
    """The ViTConfig of timm's registered model `name` at the data's image size and classes,
    with its own patch size and depth unless given. ValueError for a name timm does not have or
    a model that is not a VisionTransformer."""
    model = _create_timm_model(name, image_size, num_classes, dropout, drop_path, patch_size=patch_size, depth=depth)
    return timm_config(model, name, num_classes, dropout, drop_path, backend)


def timm_config(model, name: str, num_classes: int, dropout: float, drop_path: float, backend: str) -> ViTConfig:
    """What a ViTConfig records of a timm VisionTransformer built by _create_timm_model."""
    block = model.blocks[0]
    return ViTConfig(
        image_size=model.patch_embed.img_size[0], patch_size=model.patch_embed.patch_size[0], num_classes=num_classes,
        dim=model.embed_dim, depth=len(model.blocks), heads=block.attn.num_heads, mlp_dim=block.mlp.fc2.in_features,
        dropout=dropout, backend=backend, layer_norm_eps=block.norm1.eps,
        drop_path=drop_path, timm_model=name)


def _create_timm_model(name: str, image_size: int, num_classes: int, dropout: float, drop_path: float, **overrides):
    import timm
    from timm.models.vision_transformer import VisionTransformer

    kwargs = {key: value for key, value in overrides.items() if value is not None}
    try:
        model = timm.create_model(name, pretrained=False, img_size=image_size, num_classes=num_classes,
                                  drop_rate=dropout, proj_drop_rate=dropout, drop_path_rate=drop_path, **kwargs)
    except (TypeError, AssertionError, RuntimeError) as error:
        raise ValueError(f"timm's {name} at image size {image_size} with {kwargs}: {error}") from None
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"timm's {name} is a {type(model).__name__}, not a VisionTransformer")
    return model
