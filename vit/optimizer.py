"""The optimizer: Adam or AdamW over the model's parameters, fused, with a tensor learning rate.

torch's Adam and AdamW walk every parameter of a group in Python at each step to collect the
tensors their fused kernel takes (Adam._init_group: about a dozen Python calls per parameter
tensor, about 1,100 for the model's 92 at each step, 30% of an eager training step's host calls).
The tensors are the same every step but the gradients, which zero_grad(set_to_none=True) replaces:
Adam and AdamW here collect the rest once and only the gradients after that. Their updates,
state and state_dict are torch's, bit for bit (tests/test_optimizer.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vit.config import TrainConfig

# Parameters without weight decay under AdamW, besides every norm's and every bias (timm's
# no_weight_decay() of its VisionTransformer).
NO_WEIGHT_DECAY = ("pos_embed", "cls_token")


@dataclass
class _Collected:
    """What torch's Adam._init_group collected for a group (every parameter had a gradient)."""
    group: dict  # kept alive, so that its id() names no other group
    params: list[torch.Tensor]  # group["params"] then
    count: int  # its length then
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    max_exp_avg_sqs: list[torch.Tensor]
    state_steps: list[torch.Tensor]
    has_complex: bool

    def holds_for(self, group: dict) -> bool:
        return self.params is group["params"] and self.count == len(self.params)


class _CollectOnce:
    """Adam._init_group from what torch's walk collected at the group's first step on which every
    parameter had a gradient, while that still holds and the group is the same: load_state_dict
    and add_param_group make new groups, a parameter appended to the group changes its length.
    Otherwise torch's own walk."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._collected: dict[int, _Collected] = {}  # by id() of the group

    def __setstate__(self, state):  # a copy or an unpickled optimizer collects anew
        super().__setstate__(state)
        self._collected = {}

    def _init_group(self, group, params_with_grad, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
        collected = self._collected.get(id(group))
        if collected is not None and collected.holds_for(group):
            new_grads = [p.grad for p in collected.params]
            if not [g for g in new_grads if g is None]:
                params_with_grad.extend(collected.params)
                grads.extend(new_grads)
                exp_avgs.extend(collected.exp_avgs)
                exp_avg_sqs.extend(collected.exp_avg_sqs)
                max_exp_avg_sqs.extend(collected.max_exp_avg_sqs)
                state_steps.extend(collected.state_steps)
                return collected.has_complex
        has_complex = super()._init_group(group, params_with_grad, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                          state_steps)
        if len(params_with_grad) == len(group["params"]):
            self._collected[id(group)] = _Collected(group, group["params"], len(group["params"]), list(exp_avgs),
                                                    list(exp_avg_sqs), list(max_exp_avg_sqs), list(state_steps),
                                                    has_complex)
        return has_complex


class Adam(_CollectOnce, torch.optim.Adam):
    """torch.optim.Adam with its per-parameter tensors collected once (see the module docstring)."""


class AdamW(_CollectOnce, torch.optim.AdamW):
    """torch.optim.AdamW with its per-parameter tensors collected once (see the module docstring)."""


def weight_decay_groups(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """AdamW's split of the model's parameters by name: (decayed: the weight matrices of the
    linear layers and the patch embedding; not decayed: LayerNorm weights and biases, every bias,
    the position embedding and the class token)."""
    decayed, not_decayed = [], []
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{name}" if module_name else name
            exempt = isinstance(module, torch.nn.LayerNorm) or name == "bias" or full_name in NO_WEIGHT_DECAY
            (not_decayed if exempt else decayed).append(full_name)
    return decayed, not_decayed


def make_optimizer(model, cfg: TrainConfig, device) -> Adam:
    """cfg.optimizer over the model's parameters: "adam", Adam with coupled L2 weight decay on
    every parameter, one group; "adamw", AdamW's decoupled weight decay on the weight matrices
    and none on the rest (weight_decay_groups), two groups.

    Each group's learning rate is a device tensor of its own, which the trainer overwrites on the
    device each step. The fused implementation on every device: it reads the tensor learning
    rate without a host sync (the for-loop one calls .item() per parameter). Capturable (its
    state steps kept on the device) for cfg.cuda_graph.

    model: the module; Adam also takes an iterable of parameters (AdamW's groups need the names)."""
    device = torch.device(device)

    def lr():
        return torch.tensor(cfg.lr, dtype=torch.float32, device=device)

    options = dict(betas=(0.9, 0.999), weight_decay=cfg.weight_decay, fused=True,
                   capturable=cfg.cuda_graph and device.type == "cuda")
    if cfg.optimizer == "adam":
        params = model.parameters() if isinstance(model, torch.nn.Module) else model
        return Adam(params, lr=lr(), **options)
    if not isinstance(model, torch.nn.Module):
        raise TypeError("make_optimizer: AdamW's weight-decay groups are chosen by parameter name; pass the model")
    named = dict(model.named_parameters())
    decayed, not_decayed = weight_decay_groups(model)
    groups = [{"params": [named[n] for n in decayed], "lr": lr()},
              {"params": [named[n] for n in not_decayed], "lr": lr(), "weight_decay": 0.0}]
    return AdamW(groups, lr=lr(), **options)
