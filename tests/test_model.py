import pytest
import torch

from vit import ViT, ViTConfig, count_parameters, from_timm, to_timm
from vit.backends import backend_names, get_backend, torch_attention, torch_layernorm_mlp


def test_default_model_has_the_reference_parameter_count():
    assert count_parameters(ViT(ViTConfig())) == 6_268_810


@pytest.mark.parametrize("cfg", [
    ViTConfig(dim=32, depth=1, heads=2, mlp_dim=48),
    ViTConfig(dim=48, depth=2, heads=3, mlp_dim=96, patch_size=8, num_classes=7),
    ViTConfig(dim=64, depth=1, heads=4, mlp_dim=64, image_size=16, patch_size=2),
])
@pytest.mark.parametrize("batch", [1, 3])
def test_output_shape(cfg, batch):
    logits = ViT(cfg)(torch.randn(batch, 3, cfg.image_size, cfg.image_size))
    assert logits.shape == (batch, cfg.num_classes)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("bad", [dict(heads=5), dict(dim=0), dict(patch_size=5), dict(dropout=1.0)])
def test_config_rejects_bad_sizes(bad):
    with pytest.raises(ValueError):
        ViTConfig(**bad)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="backend must be one of torch, triton, got 'nope'"):
        ViTConfig(backend="nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        get_backend("nope")
    assert "torch" in backend_names()


def test_reference_attention_matches_the_per_head_definition():
    B, N, H, D = 2, 5, 3, 4
    qkv = torch.randn(B, N, 3 * H * D, dtype=torch.float64)
    out = torch_attention(qkv, H)
    for b in range(B):
        for h in range(H):
            q = qkv[b, :, h * D:(h + 1) * D]
            k = qkv[b, :, H * D + h * D:H * D + (h + 1) * D]
            v = qkv[b, :, 2 * H * D + h * D:2 * H * D + (h + 1) * D]
            expected = torch.softmax(q @ k.T / D ** 0.5, dim=-1) @ v
            torch.testing.assert_close(out[b, :, h * D:(h + 1) * D], expected)


def test_reference_layernorm_mlp_matches_modules():
    C, Hd = 12, 20
    x = torch.randn(4, 3, C, dtype=torch.float64)
    ln, fc1, fc2 = torch.nn.LayerNorm(C).double(), torch.nn.Linear(C, Hd).double(), torch.nn.Linear(Hd, C).double()
    expected = x + fc2(torch.nn.functional.gelu(fc1(ln(x))))
    got = torch_layernorm_mlp(x, ln.weight, ln.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    torch.testing.assert_close(got, expected)


def test_timm_round_trip_keeps_logits():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = ViT(ViTConfig(dim=48, depth=2, heads=3, mlp_dim=96)).eval()
    images = torch.randn(4, 3, 32, 32)
    timm_model = to_timm(model).eval()
    assert type(timm_model).__name__ == "VisionTransformer"
    assert timm_model.embed_dim == 48 and len(timm_model.blocks) == 2 and timm_model.num_classes == 10
    with torch.no_grad():
        ours, theirs = model(images), timm_model(images)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        back = from_timm(timm_model).eval()
        assert back.cfg == model.cfg
        torch.testing.assert_close(back(images), theirs, rtol=1e-5, atol=1e-5)


def test_from_timm_takes_a_model_trained_in_timm():
    pytest.importorskip("timm")
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer
    timm_model = VisionTransformer(img_size=32, patch_size=4, num_classes=10, embed_dim=64, depth=1, num_heads=4,
                                   mlp_ratio=2.0, norm_layer=partial(torch.nn.LayerNorm, eps=1e-5)).eval()
    model = from_timm(timm_model).eval()
    assert model.cfg.mlp_dim == 128 and model.cfg.heads == 4
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), timm_model(images), rtol=1e-5, atol=1e-5)


def test_stock_timm_model_round_trips_with_its_layer_norm_eps():
    """timm's VisionTransformer uses LayerNorm eps 1e-6: from_timm keeps it, so timm -> ours ->
    timm is the same function to fp32 rounding (with 1e-5 the logits moved by ~7e-5 relative)."""
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    timm_model = VisionTransformer(img_size=32, patch_size=4, num_classes=10, embed_dim=64, depth=2, num_heads=4,
                                   mlp_ratio=1.0).eval()
    assert timm_model.norm.eps == 1e-6
    ours = from_timm(timm_model).eval()
    assert ours.cfg.layer_norm_eps == 1e-6
    back = to_timm(ours).eval()
    assert all(m.eps == 1e-6 for m in back.modules() if isinstance(m, torch.nn.LayerNorm))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        reference = timm_model(images)
        torch.testing.assert_close(ours(images), reference, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(back(images), reference, rtol=1e-6, atol=1e-6)


def test_from_timm_refuses_mixed_layer_norm_eps():
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer
    timm_model = VisionTransformer(img_size=32, patch_size=4, num_classes=10, embed_dim=64, depth=1, num_heads=4)
    timm_model.norm.eps = 1e-5
    with pytest.raises(ValueError, match="one LayerNorm eps"):
        from_timm(timm_model)


def test_set_backend_keeps_weights():
    model = ViT(ViTConfig(dim=32, depth=1, heads=2, mlp_dim=32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_backend("torch")
    assert get_backend("torch").name == model.backend.name
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
