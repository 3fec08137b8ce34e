"""The README's results table, rendered from the results committed under bench/results/.

    python -m bench.readme_table            # print the table
    python -m bench.readme_table --write    # put it into README.md, between the markers
    python -m bench.readme_table --check    # exit 1 if README.md differs from what the results say

Rows: the reference implementation's published runs; every full training run of a GPU session
(python -m bench.session step2: session.json), with what it was (all 200 epochs, or a shortened
recipe, labelled), its final and best test accuracy and its wall clock; and, from the latest
GPU bench of each device (results.json), the 200-epoch projection of the headline training
configurations, whose accuracy is not measured by a short row. Each row names the device, the
commit and the date. CPU smoke runs and dry runs are never rendered. Until a GPU has run, the
project's rows say "not measured yet".
"""
import argparse
import json
import sys
from pathlib import Path

from bench.measure import REPO
from bench.report import duration
from bench.training import PUBLISHED_RUNS

BEGIN = "<!-- results table: rendered by `python -m bench.readme_table --write` from bench/results/; do not edit -->"
END = "<!-- end of results table -->"
PROJECTED_CONFIGS = ("triton", "torch-bf16-compile", "torch-bf16")
HEADER = ["run", "device", "test accuracy", "wall clock", "commit", "date"]


def _date(started: str) -> str:
    return started.split(" ")[0]


def full_run_rows(results_dir: Path) -> list[list[str]]:
    rows = []
    for path in sorted(results_dir.rglob("session.json")):
        session = json.loads(path.read_text())
        run = session.get("full_run") or {}
        if session.get("dry_run") or "epochs_done" not in run or not run["epochs_done"]:
            continue
        accuracy = f"{run['final_test_acc']:.2%} (best {run['best_test_acc']:.2%}, epoch {run['best_epoch']})"
        rows.append([f"this project, {run['backend']} backend: {run['label']}", run["device"], accuracy,
                     f"{duration(run['wall_seconds'])} (train.py, start to end)", f"`{run['commit']}`",
                     _date(run["date"])])
    return rows


def projection_rows(results_dir: Path) -> list[list[str]]:
    latest = {}  # (device, configuration) -> (started, row)
    for path in sorted(results_dir.rglob("results.json")):
        results = json.loads(path.read_text())
        if results.get("smoke") or results.get("device_type") != "cuda" or results.get("quick"):
            continue
        for row in results.get("training", []):
            if row["key"] not in PROJECTED_CONFIGS or row["status"] != "ok":
                continue
            key = (results["device"], row["key"])
            if key not in latest or results["started"] > latest[key][0]:
                mode = f", compile mode {row['compile_mode']}" if row["compile_mode"] else ""
                latest[key] = (results["started"], [
                    f"this project, {row['name']}{mode}: 200 epochs projected from {row['steps_run']} steps",
                    results["device"], "not measured (a short row)",
                    f"~{duration(row['projected_200_epoch_seconds'])} (projected)", f"`{results['commit']['commit']}`",
                    _date(results["started"])])
    return [row for _, row in sorted(latest.values(), key=lambda item: item[0])]


def render(results_dir: Path) -> str:
    rows = [["reference implementation (published)", p["gpu"], f"{p['test_acc']:.2%}", duration(p["seconds"]),
             "", ""] for p in PUBLISHED_RUNS]
    measured = full_run_rows(results_dir) + projection_rows(results_dir)
    if measured:
        rows += measured
        note = ("The project's rows come from the GPU results committed under `bench/results/` (each folder's "
                "`report.md` and `session.json` have the details).")
    else:
        rows += [["this project, torch backend", "a GPU", "not measured yet", "not measured yet", "", ""],
                 ["this project, triton backend", "a GPU", "not measured yet", "not measured yet", "", ""]]
        note = ("No GPU has run this code yet, so no speed or full-recipe accuracy of this project is quoted; "
                "the prepared GPU session (`bench/session/`, see `bench/README.md`) fills these rows from "
                "`bench/results/`.")
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join([BEGIN, *lines, "", note, END])


def replace_in(readme: str, table: str) -> str:
    start, stop = readme.index(BEGIN), readme.index(END) + len(END)
    return readme[:start] + table + readme[stop:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.readme_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(REPO / "bench" / "results"), help="folder of committed results")
    p.add_argument("--readme", default=str(REPO / "README.md"))
    action = p.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="rewrite the table in the README")
    action.add_argument("--check", action="store_true", help="exit 1 if the README's table is not the rendered one")
    args = p.parse_args(argv)
    table = render(Path(args.results))
    if not (args.write or args.check):
        print(table)
        return 0
    readme_path = Path(args.readme)
    readme = readme_path.read_text()
    updated = replace_in(readme, table)
    if args.check:
        if updated != readme:
            print(f"{readme_path}: the results table differs from bench/results/; run python -m bench.readme_table "
                  "--write", file=sys.stderr)
            return 1
        return 0
    readme_path.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
