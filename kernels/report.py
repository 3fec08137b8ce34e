"""Print registers, spills, shared memory and tensor-core use of every kernel on an H100.

    python -m kernels.report [--json PATH] [--sass-dir DIR]

Needs no GPU: kernels are compiled for sm_90a by kernels.h100. Exits non-zero when a
kernel fails to compile or breaks a limit (spills, shared memory over
SHARED_MEMORY_LIMIT, a matmul kernel without HGMMA), so it can gate CI as well.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from kernels.h100 import (OP_MODULES, SHARED_MEMORY_LIMIT, CompileResult, KernelSpec, compile_for_h100,
                          missing_op_modules, op_module_exists, specs_from_module, toolchain_missing_reason)

COLUMNS = ("kernel", "config", "warps", "stages", "registers", "spills (B)", "shared (KiB)", "HGMMA", "problems")


def limit_problems(spec: KernelSpec, result: CompileResult) -> list[str]:
    """What makes this compiled kernel unfit for an H100, in words (empty when fine)."""
    problems = []
    if result.spills:
        problems.append(f"spills {result.spills} B")
    if result.shared_bytes > SHARED_MEMORY_LIMIT:
        problems.append(f"shared {result.shared_bytes} B > {SHARED_MEMORY_LIMIT} B")
    if spec.uses_matmul and not result.uses_hgmma:
        problems.append("matmul without HGMMA" + (" (HMMA fallback)" if result.uses_hmma else ""))
    return problems


def _tensor_core_cell(result: CompileResult) -> str:
    if result.uses_hgmma:
        return "yes"
    return "no (HMMA)" if result.uses_hmma else "no"


def _format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[column]) for row in [COLUMNS, *rows]) for column in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [COLUMNS, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--sass-dir", type=Path, help="write each kernel's SASS into this directory")
    args = parser.parse_args(argv)

    missing_tools = toolchain_missing_reason()
    if missing_tools is not None:
        print(f"cannot compile for H100: {missing_tools}", file=sys.stderr)
        return 2

    rows: list[tuple[str, ...]] = []
    records: list[dict] = []
    notes: list[str] = []
    failed = False

    for module_name in missing_op_modules():
        notes.append(f"{module_name}: not written yet, skipped")

    for module_name in (name for name in OP_MODULES if op_module_exists(name)):
        try:
            specs = specs_from_module(module_name)
        except Exception as error:  # one broken module should not hide the others' table
            failed = True
            notes.append(f"{module_name}: {type(error).__name__}: {error}")
            continue
        for spec in specs:
            started = time.perf_counter()
            try:
                result = compile_for_h100(spec, sass_dir=args.sass_dir)
            except Exception as error:
                failed = True
                first_line = (str(error).strip().splitlines() or [""])[0]
                rows.append((spec.name, spec.config, str(spec.num_warps), str(spec.num_stages),
                             "-", "-", "-", "-", f"FAILED TO COMPILE: {type(error).__name__}: {first_line}"))
                records.append({"name": spec.name, "config": spec.config, "module": module_name,
                                "error": f"{type(error).__name__}: {error}"})
                continue
            problems = limit_problems(spec, result)
            failed = failed or bool(problems)
            rows.append((spec.name, spec.config, str(spec.num_warps), str(spec.num_stages), str(result.registers),
                         str(result.spills), f"{result.shared_bytes / 1024:.1f}", _tensor_core_cell(result),
                         "; ".join(problems)))
            record = asdict(result)
            record.update(module=module_name, num_warps=spec.num_warps, num_stages=spec.num_stages,
                          uses_matmul=spec.uses_matmul, problems=problems,
                          compile_seconds=round(time.perf_counter() - started, 2),
                          sass_path=str(result.sass_path) if result.sass_path else None)
            records.append(record)

    print(f"Triton kernels compiled for H100 (sm_90a); shared memory limit {SHARED_MEMORY_LIMIT // 1024} KiB per block")
    print(_format_table(rows) if rows else "(no kernel specs)")
    for note in notes:
        print(f"note: {note}")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"target": "sm_90a", "shared_memory_limit": SHARED_MEMORY_LIMIT,
                                         "kernels": records, "notes": notes}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
