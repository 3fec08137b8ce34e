"""The session's driver: a step's results folder, log, time limit and session.json, and the
commands it runs within that limit (bench/session/__init__.py says what the steps do)."""
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.measure import REPO, git_commit
from vit.environment import atomic_write

MAX_RESULT_FILES = 8  # what the GPU machine sends back from a results folder
GRACE_SECONDS = 10  # after SIGINT, before SIGKILL
BENCH_STARTUP_SECONDS = 15  # python -m bench imports torch, Triton and the kernels before its budget starts
MIN_COMMAND_SECONDS = 5  # a command with less time than this left is not started


class Session:
    """One step: its results folder, log, time limit and session.json."""

    def __init__(self, step: str, args):
        self.step, self.args = step, args
        # Absolute: the commands run from the repository's root, wherever this was started.
        self.results, self.work = Path(args.results).resolve(), Path(args.work).resolve()
        self.dry_run = args.device == "cpu"
        self.started = time.perf_counter()
        self.deadline = self.started + args.seconds
        self.results.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.results / "session.log", "a")
        commit = git_commit()
        if commit["commit"] == "unknown" and args.commit:
            commit = {"commit": args.commit, "dirty": None, "source": "--commit: this folder is not a git checkout"}
        self.record = {"step": step, "complete": False, "dry_run": self.dry_run, "device": _device_name(args.device),
                       "commit": commit, "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                       "budget_seconds": args.seconds, "command": [sys.executable, "-m", "bench.session",
                                                                  *sys.argv[1:]],
                       "substeps": []}
        self.failed = False
        self.data_dir: Path | None = None  # the real CIFAR-10, once step2 has it
        self._lock = threading.Lock()  # parallel test processes log and record at once

    # -- time, log, record -------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def say(self, line: str):
        with self._lock:
            print(line, flush=True)
            self.log_file.write(line + "\n")
            self.log_file.flush()

    def save(self):
        with self._lock:
            self.record["elapsed_seconds"] = round(time.perf_counter() - self.started, 1)
            text = json.dumps(self.record, indent=2) + "\n"
            atomic_write(self.results / "session.json", lambda tmp: tmp.write_text(text))

    def environment(self) -> dict:
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        if self.dry_run:
            env["TRITON_INTERPRET"] = "1"  # our kernels through the interpreter, as in the tests
        if self.data_dir is not None:
            env["VIT_DATA_DIR"] = str(self.data_dir)  # where tests/conftest.py finds the real data
        return env

    # -- subprocesses ------------------------------------------------------------------------
    def run(self, name: str, command: list[str], seconds: float, to_log: bool = True, on_line=None,
            threads: int | None = None) -> dict:
        """command with its output on stdout (and session.log when to_log), stopped at `seconds`:
        SIGINT, then SIGKILL after GRACE_SECONDS; threads: its compute threads (OMP_NUM_THREADS),
        when it runs beside others. Returns and records its substep."""
        substep = {"name": name, "command": command, "time_limit_seconds": round(seconds, 1),
                   **({"threads": threads} if threads else {})}
        self.record["substeps"].append(substep)
        if seconds < MIN_COMMAND_SECONDS:
            substep.update(exit_code=None, seconds=0.0, stopped_at_time_limit=False,
                           not_started=f"{max(0.0, seconds):.0f}s left of the step's time")
            self.say(f"!! {name}: not started, {substep['not_started']}")
            self.save()
            return substep
        self.say(f"== {name}: {shlex.join(command)} (at most {seconds:.0f}s)")
        self.save()
        started = time.perf_counter()
        env = self.environment() | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)

        def pump():
            for line in process.stdout:
                line = line.rstrip("\n")
                if to_log:
                    self.say(line)
                else:
                    print(line, flush=True)
                if on_line:
                    on_line(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        stopped = False
        try:
            process.wait(timeout=max(1.0, seconds))
        except subprocess.TimeoutExpired:
            stopped = True
            self.say(f"!! {name}: time limit of {seconds:.0f}s reached; interrupting")
            _signal_group(process, signal.SIGINT)
            try:
                process.wait(timeout=GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
        reader.join(timeout=GRACE_SECONDS)
        substep.update(exit_code=process.returncode, seconds=round(time.perf_counter() - started, 1),
                       stopped_at_time_limit=stopped)
        self.say(f"== {name}: exit {process.returncode} after {substep['seconds']:.0f}s"
                 + (" (stopped at its time limit)" if stopped else ""))
        _remove_partial_writes(self.results)
        self.save()
        return substep

    def run_bench(self, name: str, out: Path, seconds: float, max_files: int, *flags: str) -> dict:
        """python -m bench within `seconds` all told: its budget leaves room for its start-up."""
        command = [sys.executable, "-m", "bench", "--out", str(out), "--max-files", str(max_files),
                   "--budget-seconds", f"{max(1.0, seconds - BENCH_STARTUP_SECONDS):.0f}", *flags]
        if self.dry_run:
            command += ["--device", "cpu", "--quick"]
        if self.record["commit"].get("source"):
            command += ["--commit", self.record["commit"]["commit"]]
        # The bench writes its own log.txt: its output goes to stdout only.
        return self.run(name, command, seconds, to_log=False)

    def finish(self) -> int:
        self.record["complete"] = True
        self.record["exit_code"] = 1 if self.failed else 0
        self.save()  # session.json exists from here on: it is among the files listed
        self.record["files"] = [str(p.relative_to(self.results)) for p in _result_files(self.results)]
        self.say(f"{self.step}: {'FAILED' if self.failed else 'done'} in {time.perf_counter() - self.started:.0f}s; "
                 f"{len(self.record['files'])} files in {self.results}")
        if len(self.record["files"]) > MAX_RESULT_FILES:
            self.say(f"!! more than {MAX_RESULT_FILES} files in {self.results}: some will not come back")
        self.save()
        self.log_file.close()
        return self.record["exit_code"]


def _device_name(device: str) -> str:
    import torch

    from vit.environment import device_name

    return device_name(torch.device(device)) if device == "cpu" or torch.cuda.is_available() else "no CUDA device"


def _signal_group(process, sig):
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def _remove_partial_writes(folder: Path):
    """Temporary files of atomic writes a killed process left behind: not results, and each
    would count against the file limit."""
    for path in folder.rglob(".*.tmp"):
        path.unlink(missing_ok=True)


def _result_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())
