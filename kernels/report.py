"""Print registers, spills, shared memory and matmul instructions of every kernel on an H100.

    python -m kernels.report [--json PATH] [--sass-dir DIR] [--jobs N]

Needs no GPU: every configuration the op modules' launch planners can pick is compiled for
sm_90a by kernels.h100, in a fresh process (so it works under TRITON_INTERPRET=1 too).
Exits non-zero when a kernel fails to compile or breaks a rule (spills, shared memory over
SHARED_MEMORY_LIMIT, matmuls on another instruction class than the spec declares), so it
can gate CI as well. Registers at REGISTER_WARNING or above are flagged, not failed.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from kernels.h100 import (OP_MODULES, REGISTER_WARNING, SHARED_MEMORY_LIMIT, CompileOutcome, compile_isolated,
                          found_instructions, toolchain_missing_reason)

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


def _format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[column]) for row in [COLUMNS, *rows]) for column in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [COLUMNS, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--sass-dir", type=Path, help="write each kernel's SASS into this directory")
    parser.add_argument("--jobs", type=int, default=None, help="compiles at a time (default: one per CPU)")
    args = parser.parse_args(argv)

    missing_tools = toolchain_missing_reason()
    if missing_tools is not None:
        print(f"cannot compile for H100: {missing_tools}", file=sys.stderr)
        return 2

    outcomes = compile_isolated(OP_MODULES, jobs=args.jobs, sass_dir=args.sass_dir)
    failed = [outcome for outcome in outcomes if not outcome.ok]
    flagged = [o for o in outcomes if o.result is not None and o.result.registers >= REGISTER_WARNING]
    print(f"Triton kernels compiled for H100 (sm_90a): every configuration the launch planners of "
          f"{', '.join(OP_MODULES)} can pick; shared memory limit {SHARED_MEMORY_LIMIT // 1024} KiB per block")
    print(_format_table([_row(outcome) for outcome in outcomes]))
    by_class = {name: sum(o.instructions == name for o in outcomes) for name in ("HGMMA", "HMMA", "FMA", "none")}
    print(f"{len(outcomes)} configurations ({', '.join(f'{n} {name}' for name, n in by_class.items() if n)}): "
          f"{len(outcomes) - len(failed)} fit, {len(failed)} do not; {len(flagged)} at {REGISTER_WARNING}+ registers")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        records = [{**asdict(outcome), "label": outcome.label} for outcome in outcomes]
        for record in records:
            if record["result"] and record["result"]["sass_path"]:
                record["result"]["sass_path"] = str(record["result"]["sass_path"])
        args.json.write_text(json.dumps({"target": "sm_90a", "shared_memory_limit": SHARED_MEMORY_LIMIT,
                                         "register_warning": REGISTER_WARNING, "kernels": records}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
