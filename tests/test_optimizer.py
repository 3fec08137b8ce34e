"""vit.optimizer's Adam and AdamW against torch's: the same updates, state and state_dict bit for
bit, step after step, and torch's per-parameter walk (Adam._init_group) run only when what it
collected may have changed."""
import copy

import pytest
import torch

from vit import optimizer as vit_optimizer
from vit.config import TrainConfig
from vit.model import ViT, ViTConfig
from vit.optimizer import make_optimizer

TINY = ViTConfig(dim=32, depth=1, heads=2, mlp_dim=32)
STEPS = 4


def _pair(kind: str, cfg: TrainConfig):
    """make_optimizer's optimizer over a model, and make_optimizer with torch's own class in its
    place over a copy of it."""
    torch.manual_seed(0)
    ours_model = ViT(TINY)
    torch_model = ViT(TINY)
    torch_model.load_state_dict(ours_model.state_dict())
    ours = make_optimizer(ours_model, cfg, "cpu")
    assert type(ours) is getattr(vit_optimizer, kind)
    torch_class = getattr(torch.optim, kind)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vit_optimizer, kind, torch_class)
        theirs = make_optimizer(torch_model, cfg, "cpu")
    assert type(theirs) is torch_class
    return ours, theirs


def _step(optimizer, seed: int, lr: float, without_grad: frozenset[int] = frozenset()):
    """Gradients drawn from seed for every parameter of the groups, in order (none for the
    indices in without_grad), a learning rate written into the groups' tensors, and one step."""
    optimizer.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(seed)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, p in enumerate(params):
        grad = torch.randn(p.shape, generator=generator)
        if index not in without_grad:
            p.grad = grad
    for group in optimizer.param_groups:
        group["lr"].fill_(lr)
    optimizer.step()


def _assert_same(ours, theirs, seed):
    mine, other = ours.state_dict(), theirs.state_dict()
    for index, (a, b) in enumerate(zip(*([p for g in o.param_groups for p in g["params"]] for o in (ours, theirs)))):
        assert torch.equal(a, b), f"parameter {index} differs (seed {seed})"
    assert mine["param_groups"] == other["param_groups"], f"seed {seed}"
    assert mine["state"].keys() == other["state"].keys(), f"seed {seed}"
    for index, state in mine["state"].items():
        for key, value in state.items():
            assert torch.equal(value, other["state"][index][key]), f"state {index} {key} differs (seed {seed})"


@pytest.fixture
def walks(monkeypatch) -> list:
    """The optimizer of each call of torch's own Adam._init_group, its walk over every parameter
    of a group."""
    calls = []
    # torch.compile's first use gives each torch.optim class an _init_group of its own.
    walks_by_class = {torch_class: torch_class._init_group for torch_class in (torch.optim.Adam, torch.optim.AdamW)}
    for torch_class, walk in walks_by_class.items():
        def counted(self, *args, walk=walk):
            calls.append(self)
            return walk(self, *args)

        monkeypatch.setattr(torch_class, "_init_group", counted)
    return calls


def _walks_of(walks, optimizer) -> int:
    return sum(o is optimizer for o in walks)


@pytest.mark.parametrize("kind, cfg", [
    ("Adam", TrainConfig(optimizer="adam", weight_decay=5e-5, device="cpu")),
    ("AdamW", TrainConfig(optimizer="adamw", weight_decay=0.05, device="cpu")),
])
def test_steps_match_torchs_optimizer_bit_for_bit_and_walk_the_parameters_once(kind, cfg, walks):
    ours, theirs = _pair(kind, cfg)
    groups = len(ours.param_groups)
    for seed in range(STEPS):
        for optimizer in (ours, theirs):
            _step(optimizer, seed, lr=1e-3 * (seed + 1))
        _assert_same(ours, theirs, seed)
    assert _walks_of(walks, theirs) == STEPS * groups  # torch's walks every group at every step
    assert _walks_of(walks, ours) == groups  # ours at the first step only


def test_a_parameter_without_a_gradient_is_skipped_as_torch_skips_it(walks):
    ours, theirs = _pair("AdamW", TrainConfig(optimizer="adamw", weight_decay=0.05, device="cpu"))
    last = len([p for group in ours.param_groups for p in group["params"]]) - 1  # in the second group
    for seed, without in enumerate([frozenset(), frozenset({last}), frozenset(), frozenset()]):
        for optimizer in (ours, theirs):
            _step(optimizer, seed, 1e-3, without)
        _assert_same(ours, theirs, seed)
    # Ours walked both groups at the first step and the second group again at the step without the
    # gradient; the step after used what the first step collected.
    assert _walks_of(walks, ours) == 2 + 1, walks


def test_load_state_dict_new_groups_and_new_parameters_collect_again(walks):
    ours, theirs = _pair("AdamW", TrainConfig(optimizer="adamw", weight_decay=0.05, device="cpu"))
    for optimizer in (ours, theirs):
        _step(optimizer, 0, 1e-3)
    saved = copy.deepcopy(theirs.state_dict())  # its tensors are the optimizer's own, updated in place
    for optimizer in (ours, theirs):
        _step(optimizer, 1, 1e-3)
    # Both go back to the moments after the first step: ours must not use those it collected.
    for optimizer in (ours, theirs):
        optimizer.load_state_dict(copy.deepcopy(saved))
        _step(optimizer, 2, 1e-3)
    _assert_same(ours, theirs, 2)
    assert _walks_of(walks, ours) == 2 + 2, walks

    for optimizer in (ours, theirs):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))], "lr": torch.tensor(1e-3)})
        _step(optimizer, 3, 1e-3)
        _step(optimizer, 4, 1e-3)
    _assert_same(ours, theirs, 4)
    assert _walks_of(walks, ours) == 2 + 2 + 1, walks  # only the new group, once

    for optimizer in (ours, theirs):  # a parameter appended to a group in place
        optimizer.param_groups[0]["params"].append(torch.nn.Parameter(torch.ones(2)))
        _step(optimizer, 5, 1e-3)
    _assert_same(ours, theirs, 5)
    assert _walks_of(walks, ours) == 2 + 2 + 1 + 1, walks


def test_a_copy_of_the_optimizer_steps_as_torchs_copy():
    ours, theirs = _pair("Adam", TrainConfig(optimizer="adam", weight_decay=5e-5, device="cpu"))
    for optimizer in (ours, theirs):
        _step(optimizer, 0, 1e-3)
    ours, theirs = copy.deepcopy(ours), copy.deepcopy(theirs)  # parameters and state copied too
    for seed in (1, 2):
        for optimizer in (ours, theirs):
            _step(optimizer, seed, 1e-3)
        _assert_same(ours, theirs, seed)


def test_the_gradient_scalers_skipped_step_matches_torchs():
    """GradScaler hands the fused step its scale and found-inf flag: a step with an infinite
    gradient changes nothing but the scale, as with torch's class."""
    ours, theirs = _pair("AdamW", TrainConfig(optimizer="adamw", weight_decay=0.05, device="cpu"))
    scalers = [torch.amp.GradScaler("cpu", init_scale=8.0) for _ in range(2)]
    for seed, poisoned in enumerate([False, True, False]):
        for optimizer, scaler in zip((ours, theirs), scalers):
            optimizer.zero_grad(set_to_none=True)
            generator = torch.Generator().manual_seed(seed)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            for p in params:
                p.grad = 8.0 * torch.randn(p.shape, generator=generator)
            if poisoned:
                params[0].grad.view(-1)[0] = float("inf")
            scaler.scale(torch.zeros(()))  # as scaler.scale(loss) before the backward would
            scaler.step(optimizer)
            scaler.update()
        _assert_same(ours, theirs, seed)
        assert scalers[0].get_scale() == scalers[1].get_scale()
    assert scalers[0].get_scale() < 8.0  # the poisoned step was skipped and the scale backed off
