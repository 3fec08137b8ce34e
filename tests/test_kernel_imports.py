"""kernels/ imports one way: the op modules hold only their op, and the analysis of the ops
(the cost model, the sm_90 compile specs and driver, the report) imports the ops' plans,
never the reverse. Read from the source with ast, imports inside functions included, so a
lazy import cannot hide a cycle."""
import ast
import functools
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[1] / "kernels"

OPS = {"attention", "layernorm_linear", "linear_residual", "layernorm_mlp"}
# What the op modules share: helpers that know no op and no analysis.
SHARED = {"__init__", "_common", "_fused_linear", "head_dims", "interpreter_bf16", "interpreter_patching"}
ANALYSIS = {"cost", "specs", "h100", "report"}


def kernel_imports(source: str, package_modules: set) -> set:
    """The modules of kernels/ that `source` imports, anywhere in it (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "kernels" if node.level else node.module or ""
            if node.level and node.module:
                base = f"kernels.{node.module}"
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "kernels" and len(parts) > 1 and parts[1] in package_modules:
                found.add(parts[1])
    return found


@functools.cache
def import_graph() -> dict:
    modules = {path.stem for path in KERNELS.glob("*.py")}
    return {path.stem: kernel_imports(path.read_text(), modules) - {path.stem} for path in KERNELS.glob("*.py")}


def test_the_walker_sees_every_form_of_import():
    source = """
import kernels.cost
from kernels import specs as s, _common
from kernels.h100 import KernelSpec
from . import report

def lazily():
    from kernels.attention import attention
"""
    assert kernel_imports(source, OPS | SHARED | ANALYSIS) == {"cost", "specs", "_common", "h100", "report",
                                                               "attention"}


def test_every_module_of_kernels_has_a_role():
    assert set(import_graph()) == OPS | SHARED | ANALYSIS


@pytest.mark.parametrize("module", sorted(OPS | SHARED))
def test_ops_and_their_helpers_import_no_analysis(module):
    imported = import_graph()[module]
    assert not imported & ANALYSIS, f"kernels/{module}.py imports {sorted(imported & ANALYSIS)}"
    if module in SHARED:
        assert not imported & OPS, f"kernels/{module}.py imports the ops {sorted(imported & OPS)}"
    else:
        assert not imported & (OPS - {module}), f"kernels/{module}.py imports another op"


def test_no_import_cycle():
    graph = import_graph()
    finished, path = set(), []

    def visit(module):
        assert module not in path, f"import cycle: {' -> '.join(path[path.index(module):] + [module])}"
        if module in finished:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        finished.add(module)

    for module in sorted(graph):
        visit(module)
