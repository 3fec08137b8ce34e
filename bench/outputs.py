"""The files a run leaves in the folder --out names: written after every phase (and after
every training configuration), each one atomically, never more than --max-files of them.

A run can be stopped at any moment (a command limit, a kill): whatever it has measured up to
its last completed phase is then on disk as complete files, marked INCOMPLETE. The files, by
priority (the first --max-files of them get a file of their own; --max-files is at least 3):
  results.json        every number, the settings, the environment
  report.md           the tables to read
  bench-files.zip     kernels.csv, training.csv, log.txt and every plot (rewritten with the others)
  log.txt             what the run printed, appended line by line (survives a kill mid-phase)
  the plots           training images/s, kernels against batch size, accuracy against time,
                      kernels against sequence length (only those the phases done can draw)
With the default of 8 every file gets its own. With 3, log.txt lives only in the archive
(as of the last write): the caller captures the output (bench/session/ does).
"""
import io
import json
import os
import zipfile
from pathlib import Path

from bench import report
from vit.environment import atomic_write

ARCHIVE = "bench-files.zip"
LOG = "log.txt"
CORE = ("results.json", "report.md", ARCHIVE)
MIN_FILES = len(CORE)
DEFAULT_MAX_FILES = 8


class Outputs:
    def __init__(self, out_dir: Path, max_files: int = DEFAULT_MAX_FILES):
        if max_files < MIN_FILES:
            raise ValueError(f"--max-files must be at least {MIN_FILES} ({', '.join(CORE)}), got {max_files}")
        self.out_dir, self.max_files = Path(out_dir), max_files
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.live_log = max_files > MIN_FILES
        self.log_lines: list[str] = []
        self.plots: dict[str, bytes] = {}  # every plot drawn so far, by file name
        self._log_file = open(self.out_dir / LOG, "w") if self.live_log else None

    def log(self, line: str):
        print(line, flush=True)
        self.log_lines.append(line)
        if self._log_file:
            self._log_file.write(line + "\n")
            self._log_file.flush()

    def close(self):
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def file_plan(self) -> dict:
        """Which files stand beside report.md and which live only in the archive."""
        standalone = list(CORE) + ([LOG] if self.live_log else [])
        drawn = [name for name in report.PLOTS.values() if name in self.plots]
        room = self.max_files - len(standalone)
        standalone += drawn[:room]
        archived = ["kernels.csv", "training.csv", LOG] + drawn
        return {"standalone": standalone, "archive": ARCHIVE, "archived": archived, "max_files": self.max_files}

    def write(self, results: dict, phase_done: str | None = None):
        """Every file from results as they stand; after a phase, its plots are drawn first."""
        if phase_done:
            self.plots.update(report.plots_for(results, phase_done))
        files = self.file_plan()
        results["files"] = files
        text = json.dumps(report.finite_or_text(results), indent=2, allow_nan=False) + "\n"
        atomic_write(self.out_dir / "results.json", lambda tmp: tmp.write_text(text))
        markdown = report.report_markdown(results, files)
        atomic_write(self.out_dir / "report.md", lambda tmp: tmp.write_text(markdown))
        atomic_write(self.out_dir / ARCHIVE, lambda tmp: tmp.write_bytes(self._archive(results)))
        for name, data in self.plots.items():
            path = self.out_dir / name
            if name in files["standalone"]:
                atomic_write(path, lambda tmp: tmp.write_bytes(data))
            elif path.exists():
                os.remove(path)  # pushed out by a plot of higher priority; it stays in the archive

    def _archive(self, results: dict) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("kernels.csv", report.kernels_csv(results))
            archive.writestr("training.csv", report.training_csv(results))
            archive.writestr(LOG, "\n".join(self.log_lines) + "\n")
            for name, data in self.plots.items():
                archive.writestr(name, data)
        return buffer.getvalue()
