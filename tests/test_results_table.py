"""The README's results table is rendered from the results committed under bench/results/
(bench/readme_table.py): GPU sessions and GPU benches fill it, with device, commit and date;
CPU smoke runs and dry runs never do; until a GPU has run, it says "not measured yet"."""
import json
from pathlib import Path

from bench import readme_table

REPO = Path(__file__).resolve().parents[1]


def _bench_results(folder: Path, device_type="cuda", smoke=False, started="2026-12-01 10:00:00 +0000"):
    folder.mkdir(parents=True)
    rows = [{"key": "triton", "name": "triton bf16", "status": "ok", "compile_mode": None, "steps_run": 400,
             "projected_200_epoch_seconds": 600.0},
            {"key": "torch-bf16-compile", "name": "torch bf16 + compile", "status": "ok", "compile_mode": "default",
             "steps_run": 120, "projected_200_epoch_seconds": 900.0},
            {"key": "timm-bf16", "name": "timm ViT bf16", "status": "ok", "compile_mode": None, "steps_run": 60,
             "projected_200_epoch_seconds": 1500.0},
            {"key": "torch-bf16", "name": "torch bf16", "status": "skipped", "compile_mode": None}]
    (folder / "results.json").write_text(json.dumps({
        "smoke": smoke, "quick": smoke, "device_type": device_type, "device": "NVIDIA H200" if device_type == "cuda"
        else "cpu", "started": started, "commit": {"commit": "abc123def456"}, "training": rows}))


def _session(folder: Path, dry_run=False, epochs=87):
    folder.mkdir(parents=True)
    (folder / "session.json").write_text(json.dumps({"dry_run": dry_run, "full_run": {
        "label": f"the default recipe shortened to {epochs} epochs", "epochs_done": epochs, "final_test_acc": 0.8612,
        "best_test_acc": 0.8650, "best_epoch": epochs - 3, "wall_seconds": 412.0, "backend": "triton",
        "device": "NVIDIA H200", "commit": "abc123def456", "date": "2026-12-01 10:05:00 +0000"}}))


def _rows(table: str) -> list[str]:
    return [line for line in table.splitlines() if line.startswith("| this project")]


def test_without_gpu_results_the_projects_rows_say_not_measured(tmp_path):
    _bench_results(tmp_path / "cpu-smoke", device_type="cpu", smoke=True)
    _session(tmp_path / "dry-run" / "step2", dry_run=True)
    table = readme_table.render(tmp_path)
    assert table.startswith(readme_table.BEGIN) and table.endswith(readme_table.END)
    assert "| reference implementation (published) | RTX A6000 | 89.87% | 2 h 00 min |  |  |" in table
    rows = _rows(table)
    assert len(rows) == 2 and all("not measured yet" in row for row in rows)
    assert "No GPU has run this code yet" in table


def test_gpu_results_fill_the_table_with_device_commit_and_date(tmp_path):
    _bench_results(tmp_path / "20261201-h200" / "step1" / "bench", started="2026-12-01 10:00:00 +0000")
    _bench_results(tmp_path / "20261130-h200" / "bench", started="2026-11-30 09:00:00 +0000")  # older: not shown
    _session(tmp_path / "20261201-h200" / "step2")
    rows = _rows(readme_table.render(tmp_path))
    assert rows[0] == ("| this project, triton backend: the default recipe shortened to 87 epochs | NVIDIA H200 | "
                       "86.12% (best 86.50%, epoch 84) | 6 min 52 s (train.py, start to end) | `abc123def456` | "
                       "2026-12-01 |")
    assert rows[1] == ("| this project, triton bf16: 200 epochs projected from 400 steps | NVIDIA H200 | not measured "
                       "(a short row) | ~10 min 00 s (projected) | `abc123def456` | 2026-12-01 |")
    assert rows[2].startswith("| this project, torch bf16 + compile, compile mode default: 200 epochs projected")
    assert len(rows) == 3  # timm is not a headline row; a skipped row has nothing to project


def test_write_replaces_the_table_and_check_finds_a_stale_one(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n## Results\n\n{readme_table.BEGIN}\nold\n{readme_table.END}\n\nafter\n")
    results = tmp_path / "results"
    args = ["--results", str(results), "--readme", str(readme)]
    assert readme_table.main(args + ["--check"]) == 1
    assert readme_table.main(args + ["--write"]) == 0 and readme_table.main(args + ["--check"]) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\n## Results\n\n") and text.endswith(f"{readme_table.END}\n\nafter\n")
    assert "old" not in text and "not measured yet" in text


def test_the_readme_table_is_rendered_from_the_committed_results():
    assert readme_table.main(["--check"]) == 0, "run python -m bench.readme_table --write"
