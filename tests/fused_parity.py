"""Parity checks shared by the fused linear ops' tests (layernorm_linear, linear_residual,
layernorm_mlp): run an op and its torch reference on the same rounded inputs, differentiate
both, and hold every result to tests/parity.py's rule against float64."""
import torch

from parity import (DEVICE, HAS_CUDA, INTERPRETED, KERNEL_TEST_MARKS,  # noqa: F401 (re-exported)
                    PARITY_DTYPE_IDS, PARITY_DTYPES, assert_parity, randn)


def run(function, inputs: dict, dy: torch.Tensor, autocast_dtype=None, **options) -> dict:
    """function(**inputs, **options) and the gradient of <output, dy> in every input, as a dict:
    "out" and "d<name>"."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
    device_type = next(iter(inputs.values())).device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float16, enabled=autocast_dtype is not None):
        out = function(*leaves.values(), **options)
    gradients = torch.autograd.grad(out, list(leaves.values()), dy.to(out.dtype))
    return {"out": out, **{"d" + name: g for name, g in zip(leaves, gradients)}}


def cast(tensors: dict, dtype, device=DEVICE) -> dict:
    return {name: t.to(device, dtype) for name, t in tensors.items()}


def float64_results(reference, inputs: dict, dy, options_float64: dict) -> dict:
    """The exact function at the given (already rounded) inputs, on the CPU."""
    return run(reference, cast(inputs, torch.float64, torch.device("cpu")), dy.to("cpu", torch.float64),
               **options_float64)


def check(kernel, reference, inputs64: dict, dy64, dtype, context: str, autocast_dtype=None, **options):
    """Parity of kernel with reference at inputs64 rounded to dtype, on DEVICE. options may hold
    a branch_scale (cast like the inputs); every result's dtype is checked against torch's."""
    inputs = cast(inputs64, dtype)
    scale = options.pop("branch_scale", None)
    options_dtype = dict(options, **({"branch_scale": scale.to(DEVICE, dtype)} if scale is not None else {}))
    options_64 = dict(options, **({"branch_scale": scale.to(DEVICE, dtype).double().cpu()}
                                  if scale is not None else {}))
    dy = dy64.to(DEVICE, dtype)
    got = run(kernel, inputs, dy, autocast_dtype, **options_dtype)
    expected = run(reference, inputs, dy, autocast_dtype, **options_dtype)
    for name, value in got.items():
        assert value.shape == expected[name].shape, f"{context}: {name} has shape {tuple(value.shape)}"
        assert value.dtype == expected[name].dtype, f"{context}: {name} is {value.dtype}, not {expected[name].dtype}"
    exact = float64_results(reference, {k: v for k, v in inputs.items()}, dy, options_64)
    assert_parity(got, expected, exact, autocast_dtype or dtype, context)
    return got


def linear_weight(generator, n_out: int, n_in: int) -> torch.Tensor:
    """Scaled like nn.Linear's initialisation."""
    return randn(generator, n_out, n_in, scale=n_in ** -0.5)


def layer_norm_parameters(generator, n_cols: int) -> dict:
    return dict(ln_weight=randn(generator, n_cols, scale=0.2, shift=1.0), ln_bias=randn(generator, n_cols, scale=0.2))


def activations(generator, *shape) -> torch.Tensor:
    """A residual stream: nonzero mean (so the variance pass matters), spread 2."""
    return randn(generator, *shape, scale=2.0, shift=0.5)


def branch_scales(generator, samples: int, drop: float = 0.3) -> torch.Tensor:
    """Stochastic-depth scales: 0 for a dropped sample, 1/(1-drop) for a kept one (float64)."""
    keep = (torch.rand(samples, generator=generator, dtype=torch.float64) >= drop).double()
    keep[0] = 1.0  # at least one kept sample, so the gradients are not all zero
    return keep / (1 - drop)
