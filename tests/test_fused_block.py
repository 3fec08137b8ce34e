"""The transformer block as four fused operators (layernorm_linear -> attention -> linear_residual
-> layernorm_mlp): whole-model parity of the triton backend with the torch reference (logits and
every gradient, with the recipe options), launches per block, torch.compile without graph
breaks, deterministic gradients, stochastic depth, and checkpoints of the model before the
seams were fused."""
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench.counts import DeviceWorkCounter
from parity import DEVICE, HAS_CUDA, INTERPRETED, assert_parity
from vit import ViT, ViTConfig
from vit.backends import get_backend, torch_attention
from vit.model import Block

DATA = Path(__file__).resolve().parent / "data"

needs_kernels = pytest.mark.skipif(not INTERPRETED and not HAS_CUDA, reason="the Triton kernels need CUDA or "
                                                                            "TRITON_INTERPRET=1")
_KERNEL_MARKS = [needs_kernels, pytest.mark.filterwarnings("ignore:tl.make_block_ptr is deprecated")] + (
    [pytest.mark.interpreter] if INTERPRETED else [])


def runs_kernels(test):
    """The test runs the Triton kernels in this process: through the interpreter when it is on."""
    for mark in _KERNEL_MARKS:
        test = mark(test)
    return test


# 5 tokens of dim 48 in 3 heads of 16, MLP 80: every panel and tile partial.
TINY = dict(image_size=8, patch_size=4, dim=48, depth=2, heads=3, mlp_dim=80)


def model_pair(**options):
    """The same initial weights under the torch and the triton backend."""
    torch.manual_seed(0)
    reference = ViT(ViTConfig(**TINY, **options)).to(DEVICE)
    fused = ViT(ViTConfig(**TINY, **options, backend="triton")).to(DEVICE)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


def logits_and_gradients(model, images, labels, seed=1, autocast_dtype=None):
    """Training-mode forward and backward; the seed fixes the stochastic-depth draws."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast(images.device.type, dtype=autocast_dtype or torch.float16, enabled=autocast_dtype is not None):
        logits = model(images)
    F.cross_entropy(logits.float(), labels).backward()
    # (A compiled model names its parameters after the module it wraps: _orig_mod.<name>.)
    return {"logits": logits.detach(),
            **{name.removeprefix("_orig_mod."): p.grad.clone() for name, p in model.named_parameters()}}


def with_fixed_branch_scales(scales, *models):
    """Make every model use the same stochastic-depth draws (in its own dtype)."""
    for model in models:
        dtype = model.keep_probability.dtype
        model.branch_scales = lambda batch_size, dtype=dtype: scales.to(dtype)


def batch(size=3, image_size=8):
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(size, 3, image_size, image_size, generator=generator).to(DEVICE)
    return images, torch.randint(0, 10, (size,), generator=generator).to(DEVICE)


@pytest.mark.parametrize("options", [{}, dict(mlp_second_gelu=True), dict(drop_path=0.5),
                                     dict(mlp_second_gelu=True, drop_path=0.5)],
                         ids=["default", "second_gelu", "drop_path", "both"])
@runs_kernels
def test_model_same_logits_and_gradients_under_both_backends(options):
    if HAS_CUDA:
        torch.backends.cuda.matmul.allow_tf32 = False
    reference, fused = model_pair(**options)
    images, labels = batch()
    expected = logits_and_gradients(reference, images, labels)
    got = logits_and_gradients(fused, images, labels)
    assert set(got) == set(expected)
    if options.get("drop_path"):  # the draws dropped something, or the option was not exercised
        assert (reference.branch_scales(64) == 0).any()
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5, msg=name)


@runs_kernels
def test_model_under_fp16_autocast_is_as_accurate_as_torch():
    """Half-precision matmuls (what bf16 does on a GPU; fp16 here, which the interpreter can
    run): logits and every gradient at most 2x as far from a float64 model as the torch
    backend's, plus one rounding (tests/parity.py's rule)."""
    reference, fused = model_pair(mlp_second_gelu=True, drop_path=0.5)
    images, labels = batch()
    exact_model = ViT(dataclasses.replace(reference.cfg)).to(DEVICE).double()
    exact_model.load_state_dict(reference.state_dict())
    with_fixed_branch_scales(reference.branch_scales(len(labels)), reference, fused, exact_model)
    exact = logits_and_gradients(exact_model, images.double(), labels)
    expected = logits_and_gradients(reference, images, labels, autocast_dtype=torch.float16)
    got = logits_and_gradients(fused, images, labels, autocast_dtype=torch.float16)
    assert_parity(got, expected, exact, torch.float16, "tiny ViT, fp16 autocast, second GELU and stochastic depth")


@pytest.mark.parametrize("options", [{}, dict(mlp_second_gelu=True)], ids=["default", "second_gelu"])
@runs_kernels
def test_block_launches_at_most_4_forward_and_8_backward(options):
    """Triton launches plus aten kernel launches of one block, counted by dispatch (sizes do not
    change the counts): the four fused seams forward; their seven backward kernels and the one
    add that sums the gradients of the block input's two uses (LayerNorm and residual)."""
    block = Block(ViTConfig(**TINY, **options), get_backend("triton")).to(DEVICE)
    x = torch.randn(2, 5, 48, device=DEVICE, requires_grad=True)
    scales = torch.tensor([[1.0, 0.0], [2.0, 2.0]], device=DEVICE)
    dy = torch.randn(2, 5, 48, device=DEVICE)
    with DeviceWorkCounter() as forward:
        y = block(x, scales)
    with DeviceWorkCounter() as backward:
        torch.autograd.backward(y, dy)
    assert forward.counts.launches <= 4 and forward.counts.triton_launches == 4, forward.counts.as_dict()
    assert backward.counts.launches <= 8, (backward.counts.as_dict(), backward.counts.by_op)
    assert forward.counts.syncs == backward.counts.syncs == 0
    assert x.grad is not None and all(p.grad is not None for p in block.parameters())


@runs_kernels
def test_compiled_model_is_one_graph_with_the_eager_numbers():
    """torch.compile(fullgraph=True) traces through the fused operators (their fakes, not the
    launch planning), and the compiled model gives the eager logits and gradients. Attention
    here is the torch reference: kernels.attention's own operator is tested with its module."""
    torch.manual_seed(0)
    model = ViT(ViTConfig(**TINY, mlp_second_gelu=True, drop_path=0.5, backend="triton")).to(DEVICE)
    backend = dataclasses.replace(get_backend("triton"), attention=torch_attention)
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = backend
    images, labels = batch()
    explanation = torch._dynamo.explain(model)(images)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
    eager = logits_and_gradients(model, images, labels)
    # Inductor's own random numbers would draw other stochastic-depth masks than eager's.
    with torch._inductor.config.patch(fallback_random=True):
        compiled = logits_and_gradients(torch.compile(model, fullgraph=True), images, labels)
    for name, value in compiled.items():
        torch.testing.assert_close(value, eager[name], rtol=1e-5, atol=1e-6, msg=name)


@runs_kernels
def test_gradients_are_bit_identical_over_repeated_runs():
    _, fused = model_pair(mlp_second_gelu=True, drop_path=0.5)
    images, labels = batch(size=30)
    first = logits_and_gradients(fused, images, labels)
    second = logits_and_gradients(fused, images, labels)
    for name, value in first.items():
        assert torch.equal(value, second[name]), name


# ---------------------------------------------------------------------------- stochastic depth

def test_drop_path_rates_rise_linearly_to_the_last_block_as_in_timm():
    model = ViT(ViTConfig(**dict(TINY, depth=4), drop_path=0.3))
    torch.testing.assert_close(torch.tensor(model.drop_path_rates), torch.linspace(0, 0.3, 4))
    assert "keep_probability" not in model.state_dict()


def test_branch_scales_are_none_in_eval_or_without_drop_path():
    model = ViT(ViTConfig(**TINY, drop_path=0.3))
    assert model.branch_scales(8) is not None
    assert model.eval().branch_scales(8) is None
    assert ViT(ViTConfig(**TINY)).branch_scales(8) is None


def test_branch_scales_keep_each_branch_at_its_rate():
    """Drawn values are 0 or 1 / (1 - rate); the kept fraction per branch matches 1 - rate
    (chi-square, 1 degree of freedom, p = 0.001 over 4 x 2 x 20000 draws)."""
    torch.manual_seed(0)
    model = ViT(ViTConfig(**dict(TINY, depth=4), drop_path=0.4))
    scales = model.branch_scales(20000)
    assert scales.shape == (4, 2, 20000)
    for block, rate in enumerate(model.drop_path_rates):
        allowed = (0.0, 1.0 / (1.0 - rate)) if rate else (1.0,)
        for value in scales[block].unique().tolist():
            assert any(abs(value - a) < 1e-6 for a in allowed), (block, value)
        if rate:
            kept = (scales[block] > 0).sum(dim=1).double()
            n = scales.shape[2]
            chi_square = ((kept - n * (1 - rate)) ** 2 / (n * (1 - rate)) +
                          (n - kept - n * rate) ** 2 / (n * rate))
            assert (chi_square < 10.83).all(), (block, rate, kept)


def test_drop_path_zero_is_the_identity_in_training():
    torch.manual_seed(0)
    plain = ViT(ViTConfig(**TINY))
    images, _ = batch()
    with torch.no_grad():
        expected = plain.to(DEVICE).eval()(images)
        assert torch.equal(plain.train()(images), expected)  # no dropout, no drop path: train == eval


def test_to_timm_carries_drop_path_and_refuses_the_second_gelu():
    pytest.importorskip("timm")
    from vit import from_timm, to_timm
    model = ViT(ViTConfig(**TINY, drop_path=0.2))
    timm_model = to_timm(model)
    assert timm_model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert from_timm(timm_model).cfg.drop_path == pytest.approx(0.2)
    with pytest.raises(ValueError, match="no GELU after fc2"):
        to_timm(ViT(ViTConfig(**TINY, mlp_second_gelu=True)))


@pytest.mark.parametrize("bad", [dict(drop_path=1.0), dict(drop_path=-0.1)])
def test_config_rejects_bad_drop_path(bad):
    with pytest.raises(ValueError, match="drop_path"):
        ViTConfig(**bad)


def test_defaults_keep_the_reference_model():
    cfg = ViTConfig()
    assert not cfg.mlp_second_gelu and cfg.drop_path == 0.0


# ------------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=_KERNEL_MARKS)])
def test_state_dict_saved_before_the_fused_seams_loads_and_gives_the_same_logits(backend):
    """tests/data/vit_state_dict_before_fused_seams.pt: a tiny model's state dict, a batch and
    its logits, saved by the model as it was before the block became four fused seams (torch
    backend, eval mode)."""
    saved = torch.load(DATA / "vit_state_dict_before_fused_seams.pt", weights_only=True)
    model = ViT(ViTConfig(**dict(saved["config"], backend=backend)))
    model.load_state_dict(saved["state_dict"], strict=True)
    with torch.no_grad():
        logits = model.to(DEVICE).eval()(saved["images"].to(DEVICE))
    torch.testing.assert_close(logits.cpu(), saved["logits"], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("options", [{}, dict(mlp_second_gelu=True, drop_path=0.1)], ids=["default", "options"])
def test_gpu_model_shape_bf16_is_as_accurate_as_torch(options):
    """The default model (dim 384, 12 heads, MLP 384), a batch of 128, bf16 autocast: the
    triton backend's logits and gradients against a float64 model, at most 2x torch's error."""
    torch.manual_seed(0)
    reference = ViT(ViTConfig(**options)).cuda()
    fused = ViT(ViTConfig(**options, backend="triton")).cuda()
    fused.load_state_dict(reference.state_dict())
    exact_model = ViT(ViTConfig(**options)).cuda().double()
    exact_model.load_state_dict(reference.state_dict())
    images, labels = torch.randn(128, 3, 32, 32, device="cuda"), torch.randint(0, 10, (128,), device="cuda")
    if options.get("drop_path"):
        with_fixed_branch_scales(reference.branch_scales(128), reference, fused, exact_model)
    exact = logits_and_gradients(exact_model, images.double(), labels)
    expected = logits_and_gradients(reference, images, labels, autocast_dtype=torch.bfloat16)
    got = logits_and_gradients(fused, images, labels, autocast_dtype=torch.bfloat16)
    assert_parity(got, expected, exact, torch.bfloat16, f"default model bf16 {options}")


@pytest.mark.gpu
def test_gpu_model_shape_gradients_are_bit_identical_over_repeated_runs():
    torch.manual_seed(0)
    model = ViT(ViTConfig(backend="triton", drop_path=0.1)).cuda()
    images, labels = torch.randn(128, 3, 32, 32, device="cuda"), torch.randint(0, 10, (128,), device="cuda")
    runs = [logits_and_gradients(model, images, labels, autocast_dtype=torch.bfloat16) for _ in range(3)]
    for name, value in runs[0].items():
        assert all(torch.equal(value, other[name]) for other in runs[1:]), name
