"""The wall-clock budget of one benchmark run, and the record of what it cut.

`python -m bench` must fit one 10-minute command, so every phase asks the budget how
much time it may still use and skips (or stops early) what does not fit. Nothing is
cut silently: each cut is recorded with what was cut and why, and lands in
results.json ("trimmed") and report.md.
"""
import time
from dataclasses import dataclass, field


@dataclass
class Budget:
    total_seconds: float
    start: float = field(default_factory=time.perf_counter)
    trimmed: list[dict] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def end(self) -> float:
        """The perf_counter() value at which the budget is spent."""
        return self.start + self.total_seconds

    def trim(self, what: str, why: str):
        self.trimmed.append({"what": what, "why": why, "at_seconds": round(self.elapsed(), 1)})
