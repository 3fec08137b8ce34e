"""Any timm Vision Transformer on the fused kernels, in one call.

    import timm
    from vit import fuse
    model = timm.create_model("vit_small_patch16_224")
    report = fuse(model)  # in place; print(report) says which blocks run fused and why the others not

A timm `Block` computes x + drop_path(ls(attn(norm1(x)))), then x + drop_path(ls(mlp(norm2(x)))):
exactly the four seams of vit/backends.py. fuse gives each block whose configuration the kernels
compute a forward through them (kernels.layernorm_linear for norm1 + qkv, kernels.attention,
kernels.linear_residual for proj + residual, kernels.layernorm_mlp for norm2 + MLP + residual)
that reads the block's own parameters at every call: no copies, so optimizers, state dicts,
named_parameters and checkpoints are those of the unfused model. unfuse restores timm's forwards.

How the parts of a timm block map onto the seams:
- DropPath: the kernels' per-sample branch scales, drawn as timm draws them (one Bernoulli per
  sample from the global generator, at the same point of the forward), so a fused model in
  training drops the same samples as the unfused one under the same seed.
- LayerScale (x + gamma * branch): folded into the branch's last linear at every forward, through
  autograd: gamma * (W h + b) = (gamma' W) h + gamma' b, times c, with gamma = c * gamma' and c the
  power of two nearest max |gamma|. c rides on the per-sample branch scale (exact, a power of
  two), so the folded weights keep the magnitude of W: gamma of 1e-5 folded whole would put fp16
  matmul operands among the subnormals.
- A linear without bias gets a zero bias (the kernels take one).

Left as timm's own code, with the reason in the report: other norms than LayerNorm, qk-norm and
the other attention or MLP norms, gated attention, MLPs other than fc1 -> exact GELU -> fc2
(SwiGLU, tanh GELU), dropout inside the attention or MLP (the kernels have none), head dims the
attention kernel does not take, widths past the fused linears' row panel, and the post-norm and
parallel block classes. A call with an attention mask runs timm's forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MethodType

import torch
import torch.nn as nn

from kernels.head_dims import SUPPORTED_HEAD_DIMS
from vit.backends import Backend, get_backend

# The attribute of a fused block that holds the backend of its seams.
_SEAMS = "_fused_seams"


@dataclass
class FuseReport:
    """What fuse did: the names of the fused blocks, and why each other block was left alone."""
    fused: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)

    def refusals(self) -> list[str]:
        """One line per distinct reason: the blocks it holds back, then the reason."""
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.refused.items():
            by_reason.setdefault(reason, []).append(name)
        return [f"{names[0] if len(names) == 1 else f'{len(names)} blocks ({names[0]} .. {names[-1]})'}: {reason}"
                for reason, names in by_reason.items()]

    def __str__(self) -> str:
        total = len(self.fused) + len(self.refused)
        return "\n".join([f"fused {len(self.fused)} of {total} transformer blocks"]
                         + [f"  {line}" for line in self.refusals()])


def fuse(model: nn.Module, strict: bool = False, backend: str = "triton") -> FuseReport:
    """Make every timm Block of model whose configuration the kernels compute run through the
    fused seams of `backend` (in place; see the module docstring). strict: raise ValueError,
    fusing nothing, when some block cannot be fused or the model has no timm block."""
    seams = get_backend(backend)
    report = FuseReport()
    for name, module in model.named_modules():
        reason = why_not_fusable(module)
        if reason is None:
            report.fused.append(name)
        elif reason != _NOT_A_BLOCK:
            report.refused[name] = reason
    if strict and (report.refused or not report.fused):
        if not report.fused and not report.refused:
            raise ValueError(f"{type(model).__name__} has no timm transformer block to fuse")
        raise ValueError(f"cannot fuse every block of {type(model).__name__} (strict): " + "; ".join(report.refusals()))
    modules = dict(model.named_modules())
    for name in report.fused:
        block = modules[name]
        setattr(block, _SEAMS, seams)
        block.forward = MethodType(_fused_block_forward, block)
    return report


def unfuse(model: nn.Module) -> int:
    """Restore timm's forward of every fused block of model; returns how many were fused."""
    restored = 0
    for module in model.modules():
        if is_fused(module):
            del module.forward
            delattr(module, _SEAMS)
            restored += 1
    return restored


def is_fused(module: nn.Module) -> bool:
    return hasattr(module, _SEAMS)


# ---------------------------------------------------------------------------------------------
# Which blocks the kernels compute
# ---------------------------------------------------------------------------------------------

_NOT_A_BLOCK = "not a transformer block"


def _other_block_reasons() -> dict[type, str]:
    from timm.models import vision_transformer as vt
    parallel = "parallel block (attention and MLP side by side from one input): the seams are sequential"
    return {vt.ResPostBlock: "post-norm block (norm after each branch): the kernels fuse the LayerNorm before the "
                             "linears",
            vt.ParallelScalingBlock: parallel, vt.ParallelThingsBlock: parallel,
            vt.DiffParallelScalingBlock: parallel}


def why_not_fusable(module: nn.Module) -> str | None:
    """None when module is a timm Block the kernels compute; else why not (_NOT_A_BLOCK for a
    module that is no transformer block at all)."""
    from timm.models.vision_transformer import Block
    others = _other_block_reasons()
    if type(module) in others:
        return others[type(module)]
    if not isinstance(module, Block):
        return _NOT_A_BLOCK
    if type(module).forward is not Block.forward:
        return f"{type(module).__name__} overrides timm Block's forward"
    checks = (_norm_problem(module.norm1, "norm1"), _attention_problem(module.attn),
              _norm_problem(module.norm2, "norm2"), _mlp_problem(module.mlp),
              _branch_problem(module.ls1, module.drop_path1, "1"), _branch_problem(module.ls2, module.drop_path2, "2"))
    problems = [problem for problem in checks if problem]
    if problems:
        return "; ".join(problems)
    return _width_problem(module.norm1.normalized_shape[0], module.mlp.fc2.out_features, module.attn.proj.out_features)


def _norm_problem(norm: nn.Module, name: str) -> str | None:
    if not isinstance(norm, nn.LayerNorm):
        return f"{name} is {type(norm).__name__}, the kernels compute LayerNorm"
    if norm.weight is None or norm.bias is None:
        return f"{name} is a LayerNorm without affine weight and bias"
    if len(norm.normalized_shape) != 1:
        return f"{name} normalizes over {list(norm.normalized_shape)}, not the last dimension"
    return None


def _attention_problem(attn: nn.Module) -> str | None:
    from timm.layers import Attention
    if type(attn) is not Attention:
        return f"attention is {type(attn).__name__}, not timm's Attention"
    if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
        return "qk-norm (a norm of q and k inside the attention) is not in the kernels"
    if not isinstance(attn.norm, nn.Identity):
        return "a norm of the attention output before the projection is not in the kernels"
    if getattr(attn, "gate", None) is not None:
        return "gated attention is not in the kernels"
    if attn.attn_drop.p > 0 or attn.proj_drop.p > 0:
        return (f"attention dropout {attn.attn_drop.p} / projection dropout {attn.proj_drop.p}: the kernels have no "
                "dropout")
    if attn.head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head dim {attn.head_dim}: the attention kernel takes {', '.join(map(str, SUPPORTED_HEAD_DIMS))}"
    if attn.attn_dim != attn.qkv.in_features or attn.proj.out_features != attn.qkv.in_features:
        return "the attention changes the width (attn_head_dim or dim_out): the residual needs one width"
    return None


def _mlp_problem(mlp: nn.Module) -> str | None:
    from timm.layers import Mlp
    from timm.layers.activations import GELU
    if type(mlp) is not Mlp:
        return f"MLP is {type(mlp).__name__} (e.g. SwiGLU or gated): the kernels compute fc1 -> GELU -> fc2"
    if not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
        return "MLP of 1x1 convolutions: the kernels take linears"
    exact_gelu = type(mlp.act) is GELU or (type(mlp.act) is nn.GELU and mlp.act.approximate == "none")
    if not exact_gelu:
        return f"MLP activation {mlp.act}: the kernels compute the exact (erf) GELU"
    if not isinstance(mlp.norm, nn.Identity):
        return "a norm inside the MLP is not in the kernels"
    if mlp.drop1.p > 0 or mlp.drop2.p > 0:
        return f"MLP dropout {mlp.drop1.p} / {mlp.drop2.p}: the kernels have no dropout"
    return None


def _branch_problem(layer_scale: nn.Module, drop_path: nn.Module, index: str) -> str | None:
    from timm.layers import DropPath, LayerScale
    if not isinstance(layer_scale, (nn.Identity, LayerScale)):
        return f"ls{index} is {type(layer_scale).__name__}, not timm's LayerScale"
    if not isinstance(drop_path, (nn.Identity, DropPath)):
        return f"drop_path{index} is {type(drop_path).__name__}, not timm's DropPath"
    return None


def _width_problem(*widths: int) -> str | None:
    from kernels._fused_linear import MAX_PANEL_COLUMNS
    if len(set(widths)) != 1:
        return f"the block's widths differ ({widths}): the residual needs one width"
    if widths[0] > MAX_PANEL_COLUMNS:
        return (f"width {widths[0]}: the fused linears keep a row of at most {MAX_PANEL_COLUMNS} features on chip "
                f"(ViT-B's 768 is past it)")
    return None


# ---------------------------------------------------------------------------------------------
# The fused forward
# ---------------------------------------------------------------------------------------------

def _fused_block_forward(block, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
    """timm Block.forward through the four seams (x: [B, N, C])."""
    if attn_mask is not None or is_causal:  # the attention kernel has no mask
        return type(block).forward(block, x, attn_mask=attn_mask, is_causal=is_causal)
    seams: Backend = getattr(block, _SEAMS)
    norm1, attn, norm2, mlp = block.norm1, block.attn, block.norm2, block.mlp
    qkv = seams.layernorm_linear(x, norm1.weight, norm1.bias, attn.qkv.weight, _bias(attn.qkv), norm1.eps)
    attended = seams.attention(qkv, attn.num_heads, attn.scale)
    weight, bias, scale = _branch_end(attn.proj, block.ls1, block.drop_path1, x)
    x = seams.linear_residual(attended, weight, bias, x, branch_scale=scale)
    weight, bias, scale = _branch_end(mlp.fc2, block.ls2, block.drop_path2, x)
    return seams.layernorm_mlp(x, norm2.weight, norm2.bias, mlp.fc1.weight, _bias(mlp.fc1), weight, bias, norm2.eps,
                               branch_scale=scale)


def _bias(linear: nn.Linear) -> torch.Tensor:
    """The linear's bias, or zeros for one without (the kernels take a bias)."""
    if linear.bias is not None:
        return linear.bias
    return torch.zeros(linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype)


def _branch_end(linear: nn.Linear, layer_scale: nn.Module, drop_path: nn.Module, x: torch.Tensor):
    """(weight, bias, branch_scale) of the branch's last linear with the block's LayerScale and
    DropPath in them: residual + branch_scale * (weight h + bias) is timm's
    residual + drop_path(ls(linear(h)))."""
    weight, bias = linear.weight, _bias(linear)
    scale = _drop_path_scale(drop_path, x)
    gamma = getattr(layer_scale, "gamma", None)
    if gamma is None:
        return weight, bias, scale
    # c: the power of two nearest max |gamma| (1 for an all-zero gamma), a constant of this step.
    magnitude = gamma.detach().abs().amax().float().clamp_min(torch.finfo(gamma.dtype).tiny)
    c = torch.exp2(torch.round(torch.log2(magnitude)))
    unit_gamma = gamma / c.to(gamma.dtype)
    per_sample = c.expand(x.shape[0]) if scale is None else scale * c
    return unit_gamma[:, None] * weight, unit_gamma * bias, per_sample


def _drop_path_scale(drop_path: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """timm's DropPath as per-sample scales [B] (fp32): the same Bernoulli draws, in the same
    order, as timm.layers.drop_path; None where it is the identity."""
    drop_probability = getattr(drop_path, "drop_prob", 0.0)
    if drop_probability == 0.0 or not drop_path.training:
        return None
    keep = 1.0 - drop_probability
    draws = torch.empty(x.shape[0], device=x.device, dtype=torch.float32).bernoulli_(keep)
    return draws / keep if keep > 0.0 and drop_path.scale_by_keep else draws
