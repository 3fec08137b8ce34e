"""Weights to and from timm's VisionTransformer.

vit.model names its parameters as timm does, so the state dicts map one to one; this
module only builds the matching timm model. timm is needed for these two functions
alone, never to train.
"""
from functools import partial

import torch.nn as nn

from vit.model import ViT, ViTConfig


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
