"""The two seams a backend replaces: the attention core and the LayerNorm+MLP sub-block.

A backend is a pair of plain functions. "torch" is the reference: explicit
matmul-softmax-matmul and an unfused LayerNorm -> Linear -> GELU -> Linear, written
so that it reads as the definition of the math. Other backends must compute the same
function and are held to that by the parity tests.
"""
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


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


def torch_layernorm_mlp(x, ln_weight, ln_bias, w1, b1, w2, b2, eps: float = 1e-5) -> torch.Tensor:
    """x + fc2(gelu(fc1(layer_norm(x)))), exact (erf) GELU, weights in nn.Linear's [out, in] layout."""
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    h = F.gelu(F.linear(h, w1, b1))
    return x + F.linear(h, w2, b2)


@dataclass(frozen=True)
class Backend:
    name: str
    attention: Callable[..., torch.Tensor]
    layernorm_mlp: Callable[..., torch.Tensor]
    description: str = ""
    # Why the backend cannot run on a device, or None when it can.
    unavailable_reason: Callable[[torch.device], str | None] = lambda device: None


def _torch_backend() -> Backend:
    return Backend("torch", torch_attention, torch_layernorm_mlp,
                   "reference: matmul-softmax-matmul attention, unfused LayerNorm+MLP")


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
        from kernels.layernorm_mlp import layernorm_mlp
    except ImportError as error:
        missing = f"Triton is not installed ({error})"

        def not_installed(*args, **kwargs):
            raise RuntimeError(missing)
        return Backend("triton", not_installed, not_installed, "unavailable", lambda device: missing)
    return Backend("triton", attention, layernorm_mlp,
                   "fused Triton kernels: kernels.attention, kernels.layernorm_mlp", _triton_unavailable)


# Name -> factory. Factories import lazily so that a backend's dependencies are only
# needed when it is picked.
_REGISTRY: dict[str, Callable[[], Backend]] = {
    "torch": _torch_backend,
    "triton": _triton_backend,
}


def backend_names() -> list[str]:
    return list(_REGISTRY)


def get_backend(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]()
