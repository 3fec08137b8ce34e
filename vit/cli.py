"""What the command lines share (train.py, python -m vit.evaluate, python -m vit.predict):
flag validators, the help format, --device, and the error rule.

The error rule: a bad flag, path or file ends the command with one line on stderr that
names what is wrong and what to do. Exit code 2 for a usage error (argparse's, or one found
checking the flags before any work), 1 for a run that failed, 128 + the signal for a stop
signal (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP). Never a traceback, unless --debug or
VIT_DEBUG=1 asks for it.
"""
import argparse
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

import torch

from vit.data import DataError
from vit.environment import STOP_SIGNALS, parse_device
from vit.fields import BOUNDS, bound_words

DEBUG_ENV = "VIT_DEBUG"


class RunError(RuntimeError):
    """Bad input found while running: the message says what is wrong and with which file, in one line."""


# Errors whose message is written for the user; anything else is a bug and says so.
EXPECTED_ERRORS = (RunError, DataError, OSError)


def one_line(error: BaseException) -> str:
    """The first line of an exception's message: torch's errors can run over dozens of lines."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------
# Flag validators: argparse types whose message completes "argument --flag: ..."


def bounded(kind: type, bound: str | None = None):
    """An argparse type: text to `kind` (int or float), within one of vit.fields.BOUNDS (the
    configuration fields' bounds) when one is named."""
    test = BOUNDS[bound][0] if bound else (lambda value: True)

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{bound_words(bound, kind)}, got {text}")
        return value
    convert.__name__ = kind.__name__  # argparse names the type in its messages
    return convert


positive_int = bounded(int, "positive")
positive_float = bounded(float, "positive")


DEVICE_HELP = "cuda, cuda:N or cpu (default: auto, which is cuda when available, else cpu)"


def device(text: str) -> torch.device:
    """--device, converted once, when the flags are parsed ("auto": cuda when available, else cpu)."""
    try:
        return parse_device(None if text == "auto" else text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# ---------------------------------------------------------------------------------------
# The parser: help with every default, examples kept as written, one-line usage errors


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every flag's help ends with its default: the value, "off" for a switch, or, for a
    default resolved at run time, the help's own words (it must contain "default")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "default" in text:
            return text
        if action.nargs == 0:  # store_true / store_false: the switch is off unless given
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with the project's help format, no abbreviated flags, --debug, and usage
    errors as one line (exit code 2)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(**kwargs)
        self.add_argument("--debug", action="store_true",
                          help=f"show the traceback of a failure (also {DEBUG_ENV}=1)")

    def error(self, message):
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------
# The error rule


def debug_requested(argv) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def describe(error: Exception) -> str:
    if isinstance(error, EXPECTED_ERRORS):
        return one_line(error)
    return (f"{type(error).__name__}: {one_line(error)} (unexpected; --debug or {DEBUG_ENV}=1 "
            f"shows the traceback)")


class Stopped(KeyboardInterrupt):
    """A stop signal (vit.environment.STOP_SIGNALS), raised in the main thread as Ctrl-C's
    KeyboardInterrupt is, so that every path that handles Ctrl-C handles SIGTERM and SIGHUP too."""

    def __init__(self, signum: int):
        self.signum = signal.Signals(signum)
        super().__init__(self.signum.name)


_first_stop: signal.Signals | None = None  # the first stop signal this process received


def stop_signal(interrupt: KeyboardInterrupt) -> signal.Signals:
    """The signal behind a KeyboardInterrupt: Ctrl-C's SIGINT unless it is a Stopped."""
    return getattr(interrupt, "signum", signal.SIGINT)


def stop_received() -> signal.Signals | None:
    """The first stop signal received, or None: an error that follows one (a peer process that
    stopped first) is part of the same stop."""
    return _first_stop


def stopped_by(signum: int) -> str:
    """What happened, as the line that reports a stop starts."""
    named = {signal.SIGINT: "interrupted", signal.SIGHUP: "stopped by SIGHUP (its terminal closed)"}
    return named.get(signum, f"stopped by {signal.Signals(signum).name}")


def exit_status(signum: int) -> int:
    return 128 + signum


def _raise_stop(signum, frame):
    global _first_stop
    _first_stop = _first_stop or signal.Signals(signum)
    raise Stopped(signum)


def stop_on_signals():
    """Every stop signal raises Stopped in the main thread, from wherever it is."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _raise_stop)


def exit_on_next_interrupt():
    """After the first stop signal has been handled, a second one ends the process at once,
    without a traceback from whatever cleanup it interrupts."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, lambda signum, frame: os._exit(exit_status(signum)))


def run(main, argv=None) -> int:
    """main(argv) under the error rule; returns the exit code. Usage errors leave through
    argparse's SystemExit(2), as they do from any parser."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS} if in_main_thread else {}
    try:
        return main(argv)
    except KeyboardInterrupt as interrupt:
        exit_on_next_interrupt()
        if debug:
            traceback.print_exc()
        print(stopped_by(stop_signal(interrupt)), file=sys.stderr)
        return exit_status(stop_signal(interrupt))
    except Exception as error:
        if debug:
            traceback.print_exc()
        print(f"error: {describe(error)}", file=sys.stderr)
        return 1
    finally:
        for signum, handler in handlers.items():
            if handler is not None:
                signal.signal(signum, handler)


# ---------------------------------------------------------------------------------------
# Folders a command writes into


def dir_problem(path: Path) -> str | None:
    """Why `path` cannot be, or be made, a folder to write into; None when nothing is known against it."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        return "is a file, not a folder" if existing == path else f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return "is not writable" if existing == path else f"{existing} is not writable"
    return None


def make_dir(path: Path, flag: str) -> Path:
    """Create `path` (and its parents) for writing, or raise RunError naming the flag and the reason."""
    path = Path(path)
    problem = dir_problem(path)
    if problem is None:
        try:
            path.mkdir(parents=True, exist_ok=True)
            return path
        except OSError as error:
            problem = f"cannot create it ({error.strerror or one_line(error)})"
    raise RunError(f"{flag} {path}: {problem}; pick a folder you can write to")
