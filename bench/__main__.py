"""Entry point of `python -m bench`; see bench/run.py and bench/README.md."""
import os
import sys


def _runs_on_cpu(argv: list[str]) -> bool:
    """Whether this run will use the CPU, decided before torch or triton is imported."""
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1].startswith("cpu")
        if arg.startswith("--device="):
            return arg.split("=", 1)[1].startswith("cpu")
    import torch  # importing torch does not import triton or the kernels

    return not torch.cuda.is_available()


# Without a GPU our Triton kernels run through Triton's interpreter. Triton decides that
# when a kernel is decorated, i.e. when kernels.* is imported: the variable must be set
# before anything imports them.
if _runs_on_cpu(sys.argv[1:]):
    os.environ["TRITON_INTERPRET"] = "1"

from bench.run import main  # noqa: E402

sys.exit(main())
