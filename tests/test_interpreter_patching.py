"""kernels.interpreter_patching: Triton's interpreter patches triton.language once per launch and
asks numpy's type of a Triton type once, computes exactly what it computed before, and leaves
triton.language as it found it."""
import contextlib
import os

import pytest
import torch
import triton.language as tl

from kernels import interpreter_patching
from kernels.attention import attention
from kernels.layernorm_mlp import layernorm_mlp

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")]

# What the interpreter patches for a launch: the language modules and the tensor classes.
PATCHED_OWNERS = (tl, tl.core, tl.math, tl.core.tensor, tl.core.tensor_descriptor_base)


def _namespaces() -> list[dict]:
    return [dict(vars(owner)) for owner in PATCHED_OWNERS]


@contextlib.contextmanager
def _unpatched():
    """The interpreter as it is, inside; then triton.language as it was before, and the patching back."""
    before = _namespaces()
    interpreter_patching.uninstall()
    try:
        yield
    finally:
        for owner, namespace in zip(PATCHED_OWNERS, before):
            for name in set(vars(owner)) - set(namespace):
                delattr(owner, name)
            for name, value in namespace.items():
                if vars(owner).get(name, object()) is not value and name not in ("__dict__", "__weakref__", "__doc__"):
                    setattr(owner, name, value)
        interpreter_patching.install()


def _run_ops(seed: int):
    """layernorm_mlp and attention, forward and backward (kernels that call @triton.jit helpers,
    ours and triton.language.standard's), at small shapes: outputs and every gradient."""
    generator = torch.Generator().manual_seed(seed)
    dim, hidden = 64, 64
    x = torch.randn(2, 17, dim, generator=generator, requires_grad=True)
    params = [torch.randn(dim, generator=generator), torch.randn(dim, generator=generator),
              0.1 * torch.randn(hidden, dim, generator=generator), torch.randn(hidden, generator=generator),
              0.1 * torch.randn(dim, hidden, generator=generator), torch.randn(dim, generator=generator)]
    for p in params:
        p.requires_grad_()
    qkv = torch.randn(2, 17, 3 * dim, generator=generator, requires_grad=True)
    y, out = layernorm_mlp(x, *params), attention(qkv, 2)
    (y.square().sum() + out.square().sum()).backward()
    return [t.detach().clone() for t in (y, out, x.grad, qkv.grad, *(p.grad for p in params))]


@pytest.fixture
def counted_patching(monkeypatch):
    """How often the interpreter's own _patch_lang runs, with the patching installed."""
    assert interpreter_patching.is_installed()  # kernels._common installs it under TRITON_INTERPRET=1
    calls = []
    original = interpreter_patching._original

    def counting(fn):
        calls.append(fn.__name__)
        return original(fn)

    monkeypatch.setattr(interpreter_patching, "_original", counting)
    return calls


def test_results_are_identical_with_and_without_it():
    seed = 3
    patched = _run_ops(seed)
    with _unpatched():
        unpatched = _run_ops(seed)
    for k, (a, b) in enumerate(zip(patched, unpatched)):
        assert torch.equal(a, b), f"tensor {k} differs (seed {seed})"


def test_helpers_inside_a_launch_do_not_patch_again(counted_patching):
    _run_ops(seed=1)
    launches = [name for name in counted_patching if name.endswith("_kernel")]
    assert launches, counted_patching
    # Besides each launch, only a helper that brings a language module the launch had not
    # patched patches once per launch: triton.language.standard's, whose globals name
    # triton.language.core where our kernels name triton.language.
    assert len(counted_patching) <= 2 * len(launches), counted_patching


def test_numpy_types_are_asked_once_per_triton_type(monkeypatch):
    assert interpreter_patching.is_installed()
    asked = []
    original = interpreter_patching._original_np_dtype

    def counting(tt_dtype):
        asked.append(tt_dtype)
        return original(tt_dtype)

    monkeypatch.setattr(interpreter_patching, "_original_np_dtype", counting)
    monkeypatch.setattr(interpreter_patching, "_np_dtypes", {})
    _run_ops(seed=4)
    scalars = [t for t in asked if not isinstance(t, tl.pointer_type)]
    assert scalars and len(scalars) == len(set(scalars)), scalars  # each type once; blocks ask their element's


def test_triton_language_is_restored_after_a_launch():
    before = _namespaces()
    _run_ops(seed=2)
    assert _namespaces() == before
    with _unpatched():  # the interpreter's own patching leaves the helpers' patches behind: the check sees it
        _run_ops(seed=2)
        assert _namespaces() != before


@pytest.mark.parametrize("internal, named", [("_patch_lang", r"_patch_lang\(fn\)"),
                                             ("_get_np_dtype", r"_get_np_dtype\(tt_dtype\)")])
def test_an_interpreter_without_an_internal_it_replaces_is_refused_by_name(internal, named, monkeypatch):
    from triton.runtime import interpreter

    interpreter_patching.uninstall()
    try:
        monkeypatch.delattr(interpreter, internal)
        with pytest.raises(RuntimeError, match=named):
            interpreter_patching.install()
        assert not interpreter_patching.is_installed()
    finally:
        monkeypatch.undo()
        interpreter_patching.install()
    assert interpreter_patching.is_installed()
