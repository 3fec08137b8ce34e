"""The four seams a backend replaces, in the order a transformer block calls them:
LayerNorm + QKV projection, the attention core, the output projection with its residual add,
and the LayerNorm + MLP sub-block with its residual add.

A backend is a set of plain functions. "torch" is the reference: each seam written from
unfused torch ops so that it reads as the definition of the math. Other backends must compute
the same functions and are held to that by the parity tests.
"""
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from kernels.head_dims import SUPPORTED_HEAD_DIMS
from vit.fields import ConfigError


def torch_attention(qkv: torch.Tensor, num_heads: int, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v over the heads.

    qkv: [B, N, 3*C], the q, k and v blocks of C = heads * head_dim columns each, heads
    contiguous inside a block (timm's layout). Returns [B, N, C].
    """
    B, N, three_c = qkv.shape
    C = three_c // 3
    head_dim = C // num_heads
    if scale is None:
        scale = head_dim ** -0.5
    q, k, v = qkv.view(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, D]
    scores = (q @ k.transpose(-2, -1)) * scale
    weights = scores.softmax(dim=-1)
    out = weights @ v  # [B, H, N, D]
    return out.transpose(1, 2).reshape(B, N, C)


def _per_sample(branch_scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """branch_scale [B] viewed to broadcast over like's [B, ...] dimensions."""
    return branch_scale.view(-1, *([1] * (like.dim() - 1)))


def torch_layernorm_linear(x, ln_weight, ln_bias, weight, bias, eps: float = 1e-5) -> torch.Tensor:
    """linear(layer_norm(x)), weight in nn.Linear's [out, in] layout."""
    return F.linear(F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps), weight, bias)


def torch_linear_residual(h, weight, bias, residual, branch_scale: torch.Tensor | None = None) -> torch.Tensor:
    """residual + s * linear(h); branch_scale s is None (1) or one scale per sample, [B]."""
    out = F.linear(h, weight, bias)
    if branch_scale is not None:
        out = _per_sample(branch_scale, out) * out
    return residual + out


def torch_layernorm_mlp(x, ln_weight, ln_bias, w1, b1, w2, b2, eps: float = 1e-5, *, second_gelu: bool = False,
                        branch_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x + s * act2(fc2(gelu(fc1(layer_norm(x))))), exact (erf) GELU, weights in nn.Linear's
    [out, in] layout; act2 is GELU with second_gelu, else the identity; branch_scale s is None
    (1) or one scale per sample, [B]."""
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    h = F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2)
    if second_gelu:
        h = F.gelu(h)
    if branch_scale is not None:
        h = _per_sample(branch_scale, h) * h
    return x + h


@dataclass(frozen=True)
class Backend:
    name: str
    layernorm_linear: Callable[..., torch.Tensor]
    attention: Callable[..., torch.Tensor]
    linear_residual: Callable[..., torch.Tensor]
    layernorm_mlp: Callable[..., torch.Tensor]
    description: str = ""
    # Why the backend cannot run on a device, or None when it can.
    unavailable_reason: Callable[[torch.device], str | None] = lambda device: None
    head_dims: tuple[int, ...] | None = None  # the attention head sizes it supports; None: any

    def check(self, cfg, device: torch.device):
        """Refuse, before any work, a model (a ViTConfig) this backend cannot run on the device:
        vit.fields.ConfigError naming the fields."""
        reason = self.unavailable_reason(device)
        if reason:
            raise ConfigError(f"backend {self.name} cannot run on {device}: {reason}", "backend")
        head_dim = cfg.dim // cfg.heads
        if self.head_dims is not None and head_dim not in self.head_dims:
            raise ConfigError(f"backend {self.name} supports heads of {', '.join(map(str, self.head_dims))} "
                              f"dimensions; dim {cfg.dim} / heads {cfg.heads} gives {head_dim}",
                              "backend", "dim", "heads")


def _torch_backend() -> Backend:
    return Backend("torch", torch_layernorm_linear, torch_attention, torch_linear_residual, torch_layernorm_mlp,
                   "reference: unfused LayerNorm and linears, matmul-softmax-matmul attention")


def _triton_unavailable(device: torch.device) -> str | None:
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        from kernels._common import interpreter_broken_reason
        return interpreter_broken_reason()
    return ("the Triton kernels need a CUDA GPU; on the CPU they run only through Triton's interpreter "
            "(set TRITON_INTERPRET=1, slow, for checking)")


def _triton_backend() -> Backend:
    try:
        from kernels.attention import attention
        from kernels.layernorm_linear import layernorm_linear
        from kernels.layernorm_mlp import layernorm_mlp
        from kernels.linear_residual import linear_residual
    except ImportError as error:
        missing = f"Triton is not installed ({error})"

        def not_installed(*args, **kwargs):
            raise RuntimeError(missing)
        return Backend("triton", not_installed, not_installed, not_installed, not_installed, "unavailable",
                       lambda device: missing, SUPPORTED_HEAD_DIMS)
    return Backend("triton", layernorm_linear, attention, linear_residual, layernorm_mlp,
                   "fused Triton kernels: kernels.layernorm_linear, kernels.attention, kernels.linear_residual, "
                   "kernels.layernorm_mlp", _triton_unavailable, SUPPORTED_HEAD_DIMS)


# Name -> factory. Factories import lazily so that a backend's dependencies are only
# needed when it is picked.
_REGISTRY: dict[str, Callable[[], Backend]] = {
    "torch": _torch_backend,
    "triton": _triton_backend,
}


def backend_names() -> list[str]:
    return list(_REGISTRY)


def default_backend(device: torch.device, preferred: str | None = None) -> str:
    """The backend a model runs on when none is asked for: `preferred` (a run's own) when it is
    installed and can run on the device, else triton on CUDA when it can run there, else torch.
    Triton's interpreter (TRITON_INTERPRET=1) runs the kernels on the CPU only for checking them:
    the CPU default stays the torch reference."""
    for name in (preferred, "triton" if device.type == "cuda" else None):
        if name in _REGISTRY and get_backend(name).unavailable_reason(device) is None:
            return name
    return "torch"


def get_backend(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]()
