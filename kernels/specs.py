"""The sm_90 compile specs: every kernel in every configuration its op's launch planner can
pick, as kernels/h100.py compiles them, read off the op modules' plans. A spec's constexprs
and launch options are those of the planned launch (plan_launches), so the check compiles
exactly what runs; its runtime arguments and their types come from the kernel's own
parameters (pointers by name, `FLOAT_ARGUMENTS` fp32, every other integer i32). The op modules
know nothing of this one.

One function per op, `<op>_specs()`, named in kernels.h100.SPEC_SOURCES.

Integer assumptions: torch's allocations are 16-byte aligned, and the models the backend runs
have widths that are multiples of 16 (C = heads x head_dim, head_dim in 16..64; MLP sizes
multiples of 16), so pointers, row strides and feature counts are 16-divisible; row counts,
splits and per-sample rows are not specialized on (the kernels' do_not_specialize). Attention
takes num_heads as the model's 12 (neither 1 nor a multiple of 16) and compiles each sequence
length regime as the launcher specializes seq_len.
"""
import collections
import inspect

import torch

from kernels import _common
from kernels import _fused_linear as fl
from kernels import attention, layernorm_linear, layernorm_mlp, linear_residual
from kernels.h100 import KernelSpec, launcher_specialization, matmul_instructions

# Runtime scalars the kernels take as floats; every other runtime scalar is an i32.
FLOAT_ARGUMENTS = ("eps", "softmax_scale")

# The attention planner is evaluated at every sequence length up to this one; its choice
# depends on the power-of-two tiles holding the sequence and is the same for every length
# past the whole-sequence plans' 128 tokens, so this covers each branch several times over.
PLANNED_SEQ_LEN_LIMIT = 2048
MODEL_HEADS = 12  # attention's num_heads in its specs: the model's

# (dtype of the activations, dtype of the matmul operands): fp32 training, autocast to bf16 or
# fp16 (activations and parameters stay fp32), and a model in bf16 or fp16 throughout.
DTYPE_VARIANTS = ((torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                  (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16))


def runtime_arguments(kernel) -> list[str]:
    """The kernel's runtime (not tl.constexpr) parameters, in order, from its Python signature."""
    parameters = inspect.signature(kernel.fn).parameters
    return [name for name, parameter in parameters.items() if "constexpr" not in str(parameter.annotation)]


def kernel_spec(name: str, config: str, launch: _common.Launch, pointer_types, instructions: str,
                divisible=(), pinned=None) -> KernelSpec:
    """The KernelSpec of a planned launch: its kernel, constexprs and launch options; its
    runtime arguments typed by kernel_spec's rules, pointers from pointer_types (by name);
    pinned: runtime arguments compiled as constants. Pointers and the `divisible` arguments
    are declared multiples of 16."""
    constexprs = dict(launch.options)
    num_warps, num_stages = constexprs.pop("num_warps"), constexprs.pop("num_stages")
    pinned = pinned or {}
    signature = {}
    for argument in runtime_arguments(launch.kernel):
        if argument in pinned:
            continue
        if argument.endswith("_ptr"):
            signature[argument] = "*" + pointer_types[argument]
        else:
            signature[argument] = "fp32" if argument in FLOAT_ARGUMENTS else "i32"
    pointers = tuple(argument for argument in signature if argument.endswith("_ptr"))
    return KernelSpec(name=name, config=config, fn=launch.kernel, signature=signature,
                      constexprs={**constexprs, **pinned}, num_warps=num_warps, num_stages=num_stages,
                      instructions=instructions,
                      divisible_by_16=pointers + tuple(argument for argument in divisible if argument in signature))


# ------------------------------------------------------------------------------ attention


def attention_plans():
    """Every (dtype, head_dim, seq_len, plan) attention can launch with, one seq_len per
    distinct (dtype, head_dim, plan, seq_len as the launcher specializes it)."""
    seen = set()
    for dtype in _common.SUPPORTED_DTYPES:
        for head_dim in attention.SUPPORTED_HEAD_DIMS:
            for seq_len in range(1, PLANNED_SEQ_LEN_LIMIT + 1):
                plan = attention.launch_plan(seq_len, head_dim, dtype)
                key = (dtype, head_dim, plan, launcher_specialization(seq_len))
                if key not in seen:
                    seen.add(key)
                    yield dtype, head_dim, seq_len, plan


def attention_specs() -> list[KernelSpec]:
    """Every attention kernel in every configuration attention_plans() yields. The rows (M side)
    of each kernel's tl.dot calls decide which tensor-core instruction fits; fp32 dots run with
    input_precision="ieee", exact products on the FMA units."""
    specs, labels = [], set()
    for dtype, head_dim, seq_len, plan in attention_plans():
        launches = attention.plan_launches(1, seq_len, MODEL_HEADS, head_dim, dtype)
        if isinstance(plan, attention.WholeSequencePlan):
            # A query tile's rows in the forward and in dQ, a key part's in the backward's other four.
            dot_rows = ((launches.forward, (plan.forward.query_rows, plan.tail)),
                        (launches.backward, (plan.backward.query_rows, plan.lead, plan.tail)))
        else:
            dot_rows = ((launches.forward, (plan.forward.block_m,)), (launches.backward, (plan.dq.block_m,)),
                        (launches.dkdv, (plan.dkdv.block_n,)))
        dtype_name = _common.DTYPE_NAMES[dtype]
        specialization = launcher_specialization(seq_len)
        for launch, rows in dot_rows:
            options = launch.options
            described = ",".join(f"{name}={value}" for name, value in options.items()
                                 if name not in ("num_warps", "num_stages"))
            label = (f"{dtype_name},{described},warps={options['num_warps']},stages={options['num_stages']},"
                     f"seq_len:{specialization}")
            name = launch.kernel.fn.__name__
            if (name, label) in labels:  # the same kernel configuration chosen for another shape
                continue
            labels.add((name, label))
            arguments = runtime_arguments(launch.kernel)
            divisible = [argument for argument in arguments if argument.startswith("stride_")]
            specs.append(kernel_spec(
                name, label, launch, collections.defaultdict(lambda: dtype_name, lse_ptr="fp32", delta_ptr="fp32"),
                matmul_instructions(dtype_name, "ieee", tuple(r for r in rows if r), options["num_warps"]),
                divisible + (["seq_len"] if specialization == "16k" else []),
                pinned={"seq_len": 1} if specialization == "1" else None))
    return specs


# ------------------------------------------------------------------------ fused linear ops


def _fused_variants():
    """(dtype names, variant label, matmul dtype, panel width) of every dtype variant and
    panel width the fused linear ops plan for."""
    for activation, matmul in DTYPE_VARIANTS:
        names = {"x": _common.DTYPE_NAMES[activation], "mm": _common.DTYPE_NAMES[matmul],
                 "out": _common.DTYPE_NAMES[fl.result_dtype(activation, matmul)]}
        for width in fl.panel_widths(matmul):
            yield names, f"x={names['x']} mm={names['mm']}", matmul, width


def _instructions(matmul_dtype: torch.dtype, dot_rows, num_warps: int) -> str:
    return matmul_instructions(_common.DTYPE_NAMES[matmul_dtype], fl.input_precision(matmul_dtype), dot_rows,
                               num_warps)


def _seam_specs(prefix: str, launches: fl.SeamLaunches, labels: tuple, pointer_types: dict, dot_rows: tuple,
                matmul_dtype: torch.dtype, dimensions: tuple) -> list[KernelSpec]:
    """The specs of a fused op's three planned kernels (forward, weight gradient, row kernel),
    each with its label and the rows of its tl.dot calls."""
    return [kernel_spec(f"{prefix}_{role}", label, launch, pointer_types,
                        _instructions(matmul_dtype, rows, launch.options["num_warps"]), dimensions)
            for role, launch, label, rows in zip(("forward", "backward_weight", "backward_input"),
                                                 (launches.forward, launches.weight, launches.row), labels, dot_rows)]


def layernorm_linear_specs() -> list[KernelSpec]:
    specs = []
    for names, variant, matmul, width in _fused_variants():
        plan = layernorm_linear.launch_plan(width, matmul)
        pointer_types = collections.defaultdict(
            lambda: names["x"], out_ptr=names["mm"], dout_ptr=names["mm"], x_hat_ptr=names["mm"], mean_ptr="fp32",
            rstd_ptr="fp32", g_partial_ptr="fp32", db_partial_ptr="fp64")
        label = f"{variant} {plan.describe('N')}"
        specs += _seam_specs("ln_linear", layernorm_linear.plan_launches(1, width, width, matmul),
                             (label, label, f"{variant} {plan.row.describe()}"), pointer_types,
                             ([plan.block_m], [plan.panel.block_c], [plan.block_m]), matmul,
                             ("n_cols", "n_out", "stride_x", "stride_out", "stride_dout", "stride_dx"))
    return specs


def linear_residual_specs() -> list[KernelSpec]:
    """h is in the matmul dtype, as the attention output the model feeds it."""
    specs = []
    for names, variant, matmul, width in _fused_variants():
        plan = linear_residual.launch_plan(width, matmul)
        pointer_types = collections.defaultdict(
            lambda: names["x"], h_ptr=names["mm"], dh_ptr=names["mm"], out_ptr=names["out"], dy_ptr=names["out"],
            dw_partial_ptr="fp32", db_partial_ptr="fp64")
        label = f"{variant} {plan.describe()}"
        specs += _seam_specs("linear_residual", linear_residual.plan_launches(1, width, width, matmul),
                             (label,) * 3, pointer_types, ([plan.block_m], [plan.panel.block_c], [plan.block_m]),
                             matmul, ("n_in", "n_out", "stride_h", "stride_residual", "stride_out", "stride_dy",
                                      "stride_dh"))
    return specs


def layernorm_mlp_specs() -> list[KernelSpec]:
    """The forward and weight-gradient kernels with the second GELU and without; the row
    kernel, which has no such option, once."""
    specs = []
    for names, variant, matmul, width in _fused_variants():
        plan = layernorm_mlp.launch_plan(width, matmul)
        pointer_types = collections.defaultdict(
            lambda: names["x"], y_ptr=names["out"], dy_ptr=names["out"], x_hat_ptr=names["mm"], mean_ptr="fp32",
            rstd_ptr="fp32", pre_ptr=names["mm"], z_ptr=names["mm"], d_pre_ptr=names["mm"], g_partial_ptr="fp32",
            dw2_partial_ptr="fp32", db1_partial_ptr="fp64", db2_partial_ptr="fp64")
        label = f"{variant} {plan.describe('H')}"
        dimensions = ("n_cols", "n_hidden", "stride_x", "stride_y", "stride_dy", "stride_dx")
        dot_rows = ([plan.block_m], [plan.block_r, plan.panel.block_c], [plan.block_m])
        for second_gelu in (False, True):
            option = f"{label} second_gelu={second_gelu}"
            seam = _seam_specs("ln_mlp", layernorm_mlp.plan_launches(1, width, width, second_gelu, matmul),
                               (option, option, f"{variant} {plan.row.describe()}"), pointer_types, dot_rows, matmul,
                               dimensions)
            specs += seam[:2]
        specs.append(seam[2])
    return specs
