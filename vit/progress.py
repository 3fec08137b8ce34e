"""Training progress, shaped by where it goes.

- On a terminal: a live bar per epoch (tqdm: the epoch's steps, elapsed time and rate) with the
  running loss, accuracy, learning rate, images/s and the whole run's elapsed time and ETA beside
  it. The bar is cleared when the epoch ends, where the trainer prints the epoch's summary line.
- Anywhere else (a file, a pipe, a job scheduler's log): a plain line at most every
  LINE_EVERY_SECONDS with the same numbers, and never a carriage return.

The trainer calls update() at its progress points only, the places where it reads the device: after
an epoch's first step, then every few steps or seconds (vit/trainer.py). The first point of the run
shows at once in either form, so a slow start is never silent. The run's clock (elapsed time and
ETA) is kept even when nothing is displayed, for the epoch lines and for on_first_eta, a callback
handed the run's ETA in seconds at its first progress point (train.py's warning about a long CPU run).
"""
import sys
import time
from typing import Callable

from tqdm import tqdm

LINE_EVERY_SECONDS = 30.0  # plain-text mode: often enough to follow a slow run, rare enough for a log file


def format_duration(seconds: float) -> str:
    """1:02:03 or 2:03."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    def __init__(self, epochs: int, steps_per_epoch: int, enabled: bool = True, stream=None, clock=time.monotonic):
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.mode = "off" if not enabled else ("bar" if _is_terminal(self.stream) else "lines")
        self.bar = None
        self.epoch = 0
        self.run_started = self.clock()
        self.run_first_step = 0  # global step at which this process's run began
        self.last_line: float | None = None  # when the last plain line was written; None: none yet this run
        self.on_first_eta: Callable[[float], None] | None = None
        self.eta_reported = False

    # -- the run's clock ------------------------------------------------------------------------
    def start_run(self, first_epoch: int):
        self.run_started = self.clock()
        self.last_line = None
        self.run_first_step = first_epoch * self.steps_per_epoch

    def eta_seconds(self, steps_in_epoch: int | None = None) -> float | None:
        """The run's time left at the pace of the steps this process has run so far (evaluation and
        host work included); None before the first step."""
        done_step = self.epoch * self.steps_per_epoch + (self.steps_per_epoch if steps_in_epoch is None else steps_in_epoch)
        done = done_step - self.run_first_step
        left = self.epochs * self.steps_per_epoch - done_step
        return (self.clock() - self.run_started) / done * left if done > 0 else None

    def run_status(self, steps_in_epoch: int | None = None) -> str:
        """'elapsed 1:23, ETA 4:56' for the run: the time since start_run and eta_seconds()."""
        eta = self.eta_seconds(steps_in_epoch)
        return f"elapsed {format_duration(self.clock() - self.run_started)}, ETA {'?' if eta is None else format_duration(eta)}"

    # -- the epoch's display --------------------------------------------------------------------
    def start_epoch(self, epoch: int):
        self.epoch = epoch
        if self.mode == "bar":
            self.bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False,
                            file=self.stream, dynamic_ncols=True)

    def update(self, steps: int, loss: float, acc: float, lr: float, images_per_second: float):
        """At a progress point: `steps` steps of the epoch are done; the running means of the epoch."""
        numbers = f"loss {loss:.4f}  acc {acc:.2%}  lr {lr:.2e}  {images_per_second:,.0f} img/s"
        if self.on_first_eta is not None and not self.eta_reported:
            self.eta_reported = True
            with tqdm.external_write_mode(file=self.stream):  # what it prints goes above a live bar
                self.on_first_eta(self.eta_seconds(steps))
        if self.mode == "bar":
            self.bar.update(steps - self.bar.n)
            self.bar.set_postfix_str(f"{numbers} | run {self.run_status(steps)}", refresh=True)
        elif self.mode == "lines" and (self.last_line is None or self.clock() - self.last_line >= LINE_EVERY_SECONDS):
            self.last_line = self.clock()
            self.stream.write(f"epoch {self.epoch + 1}/{self.epochs}  step {steps}/{self.steps_per_epoch}  "
                              f"{numbers}  {self.run_status(steps)}\n")
            self.stream.flush()

    def end_epoch(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
