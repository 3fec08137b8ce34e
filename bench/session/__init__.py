"""A short GPU window turned into complete results, in two commands (bench/README.md says how to
launch them). Each writes its results only under the folder given as its first argument (at
most 8 files, no deeper than RESULTS/bench/), rewritten as it goes, so a command stopped at any
moment still leaves what it measured; scratch (the data set, the training run's checkpoints,
the plan handed from step 1 to step 2) goes to --work (default .device-data, ignored by git).

    python -m bench.session step1 RESULTS     # compile the kernels, the GPU tests, then the kernel bench
    python -m bench.session step2 RESULTS     # the data, the full training run, the training bench

step1: first the Triton kernel configurations that its tests and bench launch, compiled into
       Triton's cache one process a core (bench/session/warmup.py; under the interpreter of the
       dry run there is nothing to compile, and it says so), within WARMUP_SHARE of the step;
       then the tests marked gpu that need no data set, bf16 parity first (-k "not determinis"),
       then determinism (-k determinis), each group's test files spread over parallel pytest
       processes, their time limits counted from the warm-up's end; then `python -m bench` on
       synthetic images (kernels at the model's shape, augmentation, the triton training rows:
       the CUDA-graph one first, then the eager one whose step time step2 plans with; sweeps,
       whose other shapes compile in their own budget).
step2: CIFAR-10 rebuilt from the two parts carried with the commands (device_data.py unpack);
       the gpu tests of the real data (VIT_DATA_DIR set to it); the default recipe trained with
       the triton backend by train.py, all 200 epochs if the step time measured in step1 says
       they fit before the training bench's share, else as many as fit (a recipe of that many
       epochs, labelled so); then `python -m bench --only training` on the real data in the time
       left.

Results (each step): session.log (everything printed but the bench's own log), session.json
(what ran, exit codes, test outcomes, the plan, the full run's accuracy and wall clock), and the
bench's folder; step2 adds the full run's metrics.csv and curves.png. Exit status 0 when
everything passed, 1 when a test, our kernels, our trainer or the full run failed, 2 for a
usage error.

`--device cpu` is a dry run at tiny sizes (the bench's --quick, a tiny model, the Triton
interpreter): tests/test_session.py runs both steps so that paths, flags and the file limit
are known to work before a GPU is lent.
"""
import argparse
from pathlib import Path

from bench.session.driver import MAX_RESULT_FILES, Session
from bench.session.steps import BENCH_SECONDS, RECIPE_EPOCHS, step1, step2
from vit import cli

# Each within one 10-minute command; the two, with the machine's start-up, within a 15-minute GPU window.
DEFAULT_SECONDS = {"step1": 210, "step2": 480}

EXAMPLES = """\
examples:
  python -m bench.session step1 $OUT --commit 0123456789ab
      on the GPU machine: the gpu-marked tests, then the kernel bench (bench/README.md says how to run both steps)
  python -m bench.session step2 $OUT --commit 0123456789ab
      then: unpack the data, train the full recipe with the triton backend, the training bench
  python -m bench.session step1 /tmp/dry --device cpu
      a dry run of a step at tiny sizes on the CPU
"""

def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="python -m bench.session", description=__doc__.split("\n\n")[0], epilog=EXAMPLES)
    p.add_argument("step", choices=["step1", "step2"],
                   help="step1: the gpu-marked tests and the kernel bench; step2: the full training run and the "
                        "training bench")
    p.add_argument("results", help="folder for the results (on the GPU machine: $OUT); created if missing, must be empty")
    p.add_argument("--work", default=".device-data", help="scratch: device_data.py and the parts, the unpacked data, "
                                                          "the training run, the plan from step1")
    p.add_argument("--seconds", type=cli.positive_float, default=None,
                   help=f"wall-clock budget of the step (default: {DEFAULT_SECONDS['step1']} for step1, "
                        f"{DEFAULT_SECONDS['step2']} for step2)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: a dry run at tiny sizes, to check paths, flags and the file limit without a GPU")
    p.add_argument("--data-dir", default=None,
                   help="step2: CIFAR-10 already on this machine (default: unpack the carried parts into --work)")
    p.add_argument("--bench-seconds", type=cli.positive_float, default=BENCH_SECONDS,
                   help="step2: seconds kept for the training bench after the full run")
    p.add_argument("--bench-configs", default=None, metavar="KEYS",
                   help="step2: the training bench's configurations, as python -m bench --training-configs "
                        "(default: all, the headline pair first)")
    p.add_argument("--max-epochs", type=cli.positive_int, default=RECIPE_EPOCHS,
                   help="step2: at most this many epochs in the full run (the recipe's 200; fewer when they do not fit)")
    p.add_argument("--commit", default=None,
                   help="the commit measured, recorded when the folder is not a git checkout (default: read from git)")
    return p


def main(argv=None) -> int:
    return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.seconds = args.seconds or DEFAULT_SECONDS[args.step]
    results = Path(args.results)
    if results.exists() and any(results.iterdir()):
        parser.error(f"{results} is not empty: give each step an empty results folder (at most "
                     f"{MAX_RESULT_FILES} files come back from it)")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device here; --device cpu runs the dry run")
    session = Session(args.step, args)
    session.say(f"{args.step}: {session.record['device']}, commit {session.record['commit']['commit']}, "
                f"{args.seconds:.0f}s, results in {results}, scratch in {args.work}"
                + (" (dry run at tiny sizes)" if session.dry_run else ""))
    session.save()
    try:
        (step1 if args.step == "step1" else step2)(session)
    except Exception as error:  # the session's own failure: recorded, and what exists stays
        session.failed = True
        session.record["error"] = f"{type(error).__name__}: {error}"
        session.say(f"!! {args.step} failed: {type(error).__name__}: {error}")
    return session.finish()
