"""Two reports on the kernels, neither needing a GPU: their cost at a transformer block's
shape, and how every configuration compiles for an H100.

    python -m kernels.report [--only cost|compile] [--batch 128 --seq-len 65 --dim 384 --heads 12
                             --mlp-dim 384 --depth 7 --matmul-dtype bf16 --residual-dtype fp32]
                             [--model vit_small_patch16_224]
                             [--bandwidth 3.3 --peak 790] [--json PATH] [--sass-dir DIR] [--jobs N]
                             [--triton installed|gpu-machine|both]

Cost: each launch of one transformer block at the given shape (the model's by default: bf16
matmuls under autocast with an fp32 residual stream), from kernels/cost.py's per-op costs:
HBM bytes read and written, bytes the programs load, useful and executed FLOPs, launches, and
the floor (memory or arithmetic time, whichever is
larger, at --bandwidth TB/s and --peak TFLOP/s); then per block and per training step
(forward + backward, times depth) beside the targets. The block is composed from BLOCK_OPS;
the torch ops the model runs around our kernels are rows of their own, marked "torch".

--model NAME takes the block's shape (tokens with the class and register tokens, width, heads, MLP
width, depth) from timm's registered model NAME at its own image size, in place of those flags;
the fused kernels run such a model through vit.fuse.

Compile: every configuration the op modules' launch planners can pick, compiled for sm_90a by
kernels.h100 in a fresh process (so it works under TRITON_INTERPRET=1 too), by the installed
Triton, the GPU machine's (GPU_MACHINE_TRITON, as `make test` installs it) or both, one table
each, headed by the version that compiled its rows. Exits non-zero when a kernel fails to
compile or breaks a rule (spills, shared memory over SHARED_MEMORY_LIMIT, matmuls on another
instruction class than the spec declares), so it can gate CI as well. Registers at
REGISTER_WARNING or above are flagged, not failed.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from kernels._common import DTYPE_NAMES
from kernels import cost
from kernels.cost import DEFAULT_BANDWIDTH, DEFAULT_PEAK_FLOPS, KernelCost
from kernels.h100 import (GPU_MACHINE_TRITON_DIR, INSTRUCTION_CLASSES, SPEC_SOURCES, REGISTER_WARNING,
                          SHARED_MEMORY_LIMIT, CompileOutcome, compile_isolated, found_instructions,
                          toolchain_missing_reason, triton_missing_reason)

# ------------------------------------------------------------------------------ the block


@dataclass(frozen=True)
class BlockShape:
    """A transformer block's sizes and precisions; the defaults are the model's training step."""
    batch: int = 128
    seq_len: int = 65  # 64 patches and the class token
    dim: int = 384
    heads: int = 12
    mlp_dim: int = 384
    depth: int = 7
    matmul_dtype: torch.dtype = torch.bfloat16  # autocast's
    residual_dtype: torch.dtype = torch.float32  # the residual stream and the parameters

    @property
    def rows(self) -> int:
        return self.batch * self.seq_len

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


@dataclass(frozen=True)
class BlockOp:
    """One op of the block: what it computes there, the function of kernels/cost.py that
    counts its launches, and the block's shape as that function's arguments."""
    computes: str
    costs: Callable[..., list[KernelCost]]
    arguments: Callable[[BlockShape], dict]
    ours: bool = True  # False: torch ops the model runs, counted by the same rules


# vit/model.py's Block.forward, in order: its four seams, each one of our ops.
BLOCK_OPS = (
    BlockOp("norm1 + qkv linear", cost.layernorm_linear_costs,
            lambda s: dict(rows=s.rows, cols=s.dim, out_features=3 * s.dim, activation_dtype=s.residual_dtype,
                           matmul_dtype=s.matmul_dtype, parameter_dtype=s.residual_dtype)),
    BlockOp("attention", cost.attention_costs,
            lambda s: dict(batch=s.batch, seq_len=s.seq_len, num_heads=s.heads, head_dim=s.head_dim,
                           dtype=s.matmul_dtype)),
    BlockOp("proj linear + residual", cost.linear_residual_costs,
            lambda s: dict(rows=s.rows, in_features=s.dim, out_features=s.dim, activation_dtype=s.residual_dtype,
                           input_dtype=s.matmul_dtype, matmul_dtype=s.matmul_dtype, parameter_dtype=s.residual_dtype)),
    BlockOp("norm2 + mlp + residual", cost.layernorm_mlp_costs,
            lambda s: dict(rows=s.rows, cols=s.dim, hidden=s.mlp_dim, activation_dtype=s.residual_dtype,
                           matmul_dtype=s.matmul_dtype, parameter_dtype=s.residual_dtype)),
    # The block's input feeds norm1 and the projection's residual: autograd adds the two gradients.
    BlockOp("block input gradient", cost.gradient_sum_costs,
            lambda s: dict(numel=s.rows * s.dim, dtype=s.residual_dtype), ours=False),
)

# The targets per block at the model's shape (kernels/README.md), and the training step's
# (whole step, all of its launches: the blocks are a part of it).
BLOCK_FLOOR_TARGET_US = 50.0
EXECUTED_PER_USEFUL_TARGET = 1.3
LAUNCH_TARGETS = {"forward": 4, "backward": 8}
STEP_LAUNCH_TARGET = 120


def timm_block_shape(name: str, batch: int, matmul_dtype: torch.dtype, residual_dtype: torch.dtype) -> BlockShape:
    """The block shape of timm's registered VisionTransformer `name` (built on the meta device:
    no weights allocated)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    block = model.blocks[0]
    return BlockShape(batch=batch, seq_len=model.patch_embed.num_patches + model.num_prefix_tokens,
                      dim=model.embed_dim, heads=block.attn.num_heads, mlp_dim=block.mlp.fc2.in_features,
                      depth=len(model.blocks), matmul_dtype=matmul_dtype, residual_dtype=residual_dtype)


def block_costs(shape: BlockShape, ops=BLOCK_OPS) -> list[tuple[BlockOp, KernelCost]]:
    """Every launch of one block, forward and backward, with the op it belongs to."""
    rows = []
    for op in ops:
        rows += [(op, launch) for launch in op.costs(**op.arguments(shape))]
    return rows


# ------------------------------------------------------------------------- the cost report


@dataclass(frozen=True)
class Totals:
    launches: int
    bytes: int
    useful_flops: int
    executed_flops: int
    floor_seconds: float

    @classmethod
    def of(cls, costs, bandwidth: float, peak_flops: float) -> Totals:
        costs = list(costs)
        return cls(launches=sum(c.launches for c in costs), bytes=sum(c.bytes for c in costs),
                   useful_flops=sum(c.useful_flops for c in costs),
                   executed_flops=sum(c.executed_flops for c in costs),
                   floor_seconds=sum(c.floor_seconds(bandwidth, peak_flops) for c in costs))

    @property
    def executed_per_useful(self) -> float:
        return self.executed_flops / self.useful_flops if self.useful_flops else float("nan")


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], right_aligned_from: int) -> str:
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]

    def line(row):
        cells = [cell.rjust(width) if column >= right_aligned_from else cell.ljust(width)
                 for column, (cell, width) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([line(header), "  ".join("-" * width for width in widths), *map(line, rows)])


def _megabytes(count: int | None) -> str:
    return "-" if count is None else f"{count / 1e6:.2f}"


def _gigaflops(count: int) -> str:
    return f"{count / 1e9:.3f}"


def cost_report(shape: BlockShape, bandwidth: float = DEFAULT_BANDWIDTH,
                peak_flops: float = DEFAULT_PEAK_FLOPS) -> str:
    """The cost tables at `shape`, as printed by `python -m kernels.report --only cost`."""
    costs = block_costs(shape)
    lines = [f"Cost of one transformer block: B={shape.batch} N={shape.seq_len} C={shape.dim} "
             f"heads={shape.heads}x{shape.head_dim} MLP={shape.mlp_dim} depth={shape.depth}, "
             f"{DTYPE_NAMES[shape.matmul_dtype]} matmuls, {DTYPE_NAMES[shape.residual_dtype]} residual stream; "
             f"floor at {bandwidth / 1e12:g} TB/s and {peak_flops / 1e12:g} TFLOP/s "
             "(kernels/cost.py's counting rules)", ""]

    header = ("block op", "kernel", "phase", "by", "launches", "read MB", "written MB", "loaded MB",
              "useful GFLOP", "executed GFLOP", "floor us")
    rows = []
    for phase in ("forward", "backward"):
        for op, kernel_cost in costs:
            if kernel_cost.phase != phase:
                continue
            by = "ours" if op.ours and kernel_cost.library == "triton" else ("ours: torch" if op.ours else "torch")
            rows.append((op.computes, kernel_cost.kernel, phase, by, str(kernel_cost.launches),
                         _megabytes(kernel_cost.bytes_read), _megabytes(kernel_cost.bytes_written), _megabytes(kernel_cost.bytes_loaded),
                         _gigaflops(kernel_cost.useful_flops), _gigaflops(kernel_cost.executed_flops),
                         f"{kernel_cost.floor_seconds(bandwidth, peak_flops) * 1e6:.2f}"))
    lines += [_table(header, rows, right_aligned_from=4),
              "by: ours = our Triton kernels; ours: torch = torch ops our op runs (casts, sums of partials); "
              "torch = the model's own torch ops. loaded: what the programs load, re-reads included.", ""]

    def summarize(selected):
        totals = Totals.of(selected, bandwidth, peak_flops)
        return totals, (f"{totals.launches}", f"{totals.bytes / 1e6:.1f}", _gigaflops(totals.useful_flops),
                        _gigaflops(totals.executed_flops), f"{totals.executed_per_useful:.2f}",
                        f"{totals.floor_seconds * 1e6:.1f}")

    header = ("per block", "phase", "launches", "MB", "useful GFLOP", "executed GFLOP", "executed/useful",
              "floor us", "target")
    rows = []
    block_totals = {}
    for scope, select in (("our ops", lambda op, cost: op.ours), ("whole block", lambda op, cost: True)):
        for phase in ("forward", "backward", "both"):
            selected = [cost for op, cost in costs if select(op, cost) and phase in ("both", cost.phase)]
            totals, cells = summarize(selected)
            target = ""
            if scope == "whole block":
                block_totals[phase] = totals
                if phase in LAUNCH_TARGETS:
                    target = f"launches <= {LAUNCH_TARGETS[phase]}"
                else:
                    target = (f"floor <= {BLOCK_FLOOR_TARGET_US:g} us, "
                              f"executed/useful <= {EXECUTED_PER_USEFUL_TARGET:g}")
            rows.append((scope, phase, *cells, target))
    lines += [_table(header, rows, right_aligned_from=2), ""]

    both = block_totals["both"]
    step_launches = both.launches * shape.depth
    lines.append(f"Per training step (forward + backward of {shape.depth} blocks): {step_launches} launches "
                 f"(target for the whole step, everything outside the blocks included: <= {STEP_LAUNCH_TARGET}), "
                 f"{both.bytes * shape.depth / 1e6:.0f} MB, {both.useful_flops * shape.depth / 1e9:.1f} useful and "
                 f"{both.executed_flops * shape.depth / 1e9:.1f} executed GFLOP, "
                 f"floor {both.floor_seconds * shape.depth * 1e3:.3f} ms.")
    met = {"block floor": both.floor_seconds * 1e6 <= BLOCK_FLOOR_TARGET_US,
           "executed/useful": both.executed_per_useful <= EXECUTED_PER_USEFUL_TARGET,
           **{f"{phase} launches": block_totals[phase].launches <= limit for phase, limit in LAUNCH_TARGETS.items()},
           "step launches": step_launches <= STEP_LAUNCH_TARGET}
    lines.append("Targets met: " + ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in met.items()) + ".")
    return "\n".join(lines)


# ---------------------------------------------------------------------- the compile report

COLUMNS = ("kernel", "config", "warps", "stages", "registers", "spills (B)", "shared (KiB)", "declared", "found",
           "problems")


def _row(outcome: CompileOutcome) -> tuple[str, ...]:
    head = (outcome.name, outcome.config, str(outcome.num_warps), str(outcome.num_stages))
    if outcome.error is not None:
        return head + ("-", "-", "-", outcome.instructions, "-", f"FAILED TO COMPILE: {outcome.error}")
    result = outcome.result
    notes = list(outcome.problems)
    if result.registers >= REGISTER_WARNING:
        notes.append(f"registers >= {REGISTER_WARNING} (close to spilling)")
    return head + (str(result.registers), str(result.spills), f"{result.shared_bytes / 1024:.1f}",
                   outcome.instructions, found_instructions(result), "; ".join(notes))


# --triton: which Triton compiles, as compile_isolated's triton_dir (None: the installed one).
TRITON_CHOICES = {"installed": [None], "gpu-machine": [GPU_MACHINE_TRITON_DIR],
                  "both": [None, GPU_MACHINE_TRITON_DIR]}


def compile_report(args) -> int:
    triton_dirs = TRITON_CHOICES[args.triton]
    missing = [toolchain_missing_reason()] + [triton_missing_reason(d) for d in triton_dirs if d is not None]
    missing = [reason for reason in missing if reason is not None]
    if missing:
        print(f"cannot compile for H100: {missing[0]}", file=sys.stderr)
        return 2

    tables = []
    for triton_dir in triton_dirs:
        sass_dir = args.sass_dir
        if sass_dir is not None and len(triton_dirs) > 1:
            sass_dir = sass_dir / ("installed" if triton_dir is None else "gpu-machine")
        tables.append(compile_isolated(SPEC_SOURCES, jobs=args.jobs, sass_dir=sass_dir, triton_dir=triton_dir))
    failed = 0
    for outcomes in tables:
        failed += _print_compile_table(outcomes)
        print()

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        records = [{**asdict(outcome), "label": outcome.label} for outcomes in tables for outcome in outcomes]
        for record in records:
            if record["result"] and record["result"]["sass_path"]:
                record["result"]["sass_path"] = str(record["result"]["sass_path"])
        args.json.write_text(json.dumps({"target": "sm_90a", "shared_memory_limit": SHARED_MEMORY_LIMIT,
                                         "register_warning": REGISTER_WARNING, "kernels": records}, indent=2) + "\n")
    return 1 if failed else 0


def _print_compile_table(outcomes: list[CompileOutcome]) -> int:
    """One Triton's table and summary; returns how many configurations do not fit."""
    versions = sorted({outcome.triton for outcome in outcomes})
    failed = [outcome for outcome in outcomes if not outcome.ok]
    flagged = [o for o in outcomes if o.result is not None and o.result.registers >= REGISTER_WARNING]
    print(f"Compiled by Triton {', '.join(versions)} for H100 (sm_90a): every configuration the launch planners of "
          f"{', '.join(SPEC_SOURCES)} can pick; shared memory limit {SHARED_MEMORY_LIMIT // 1024} KiB per block")
    print(_table(COLUMNS, [_row(outcome) for outcome in outcomes], right_aligned_from=len(COLUMNS)))
    by_class = {name: sum(o.instructions == name for o in outcomes) for name in INSTRUCTION_CLASSES}
    print(f"Triton {', '.join(versions)}: {len(outcomes)} configurations "
          f"({', '.join(f'{n} {name}' for name, n in by_class.items() if n)}): "
          f"{len(outcomes) - len(failed)} fit, {len(failed)} do not; {len(flagged)} at {REGISTER_WARNING}+ registers; "
          f"{sum(o.seconds for o in outcomes):.0f} s of compiling")
    return len(failed)


# ------------------------------------------------------------------------------------ main

_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("cost", "compile"), help="print one report (default: both)")
    model = BlockShape()
    shape = parser.add_argument_group("cost: the block's shape (default: the model's training step)")
    for name in ("batch", "seq_len", "dim", "heads", "mlp_dim", "depth"):
        shape.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(model, name))
    shape.add_argument("--matmul-dtype", choices=list(_DTYPES), default=DTYPE_NAMES[model.matmul_dtype])
    shape.add_argument("--residual-dtype", choices=list(_DTYPES), default=DTYPE_NAMES[model.residual_dtype],
                       help="the residual stream's and the parameters' dtype")
    shape.add_argument("--model", metavar="NAME",
                       help="timm's registered ViT NAME's block (tokens, width, heads, MLP width, depth) in place of "
                            "--seq-len --dim --heads --mlp-dim --depth")
    shape.add_argument("--bandwidth", type=float, default=DEFAULT_BANDWIDTH / 1e12, help="HBM bandwidth, TB/s")
    shape.add_argument("--peak", type=float, default=DEFAULT_PEAK_FLOPS / 1e12, help="matmul peak, TFLOP/s")
    compiling = parser.add_argument_group("compile")
    compiling.add_argument("--json", type=Path, help="also write the compile results to this JSON file")
    compiling.add_argument("--sass-dir", type=Path, help="write each kernel's SASS into this directory")
    compiling.add_argument("--jobs", type=int, default=None, help="compiles at a time (default: one per CPU)")
    compiling.add_argument("--triton", choices=list(TRITON_CHOICES), default="installed",
                           help="which Triton compiles: the installed one, the GPU machine's "
                                f"(installed by `make test` in {GPU_MACHINE_TRITON_DIR.name}), or both, one table each")
    args = parser.parse_args(argv)

    if args.only != "compile":
        block = BlockShape(batch=args.batch, seq_len=args.seq_len, dim=args.dim, heads=args.heads,
                           mlp_dim=args.mlp_dim, depth=args.depth, matmul_dtype=_DTYPES[args.matmul_dtype],
                           residual_dtype=_DTYPES[args.residual_dtype])
        if args.model:
            try:
                block = timm_block_shape(args.model, args.batch, block.matmul_dtype, block.residual_dtype)
            except (RuntimeError, AttributeError) as error:  # an unknown name, or not a VisionTransformer
                parser.error(f"--model {args.model}: {error}")
        if block.dim % block.heads:
            parser.error(f"--heads {block.heads} does not divide --dim {block.dim}")
        print(cost_report(block, bandwidth=args.bandwidth * 1e12, peak_flops=args.peak * 1e12))
        if args.only is None:
            print()
    if args.only == "cost":
        return 0
    return compile_report(args)


if __name__ == "__main__":
    sys.exit(main())
