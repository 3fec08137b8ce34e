"""Which torch.compile mode each compiled row uses, and whether its compile fits the budget.

A cold compile is not free: `default` takes tens of seconds for one sub-block and a minute
or two for the whole model's forward and backward; `max-autotune` benchmarks GEMM templates
for every matmul shape and takes minutes. The bench times every compile (a row's
`compile_seconds` or its one-time overhead), and starts one only when what it is expected to
take still fits the phase's share of the budget: a guess until the run has measured a
compile of the same kind and mode, then the longest one measured.

`--compile-mode auto` picks per row: for a kernel row the strongest peer that fits
(`max-autotune`, else `default`); for a training row `default` (a whole-model `max-autotune`
compile costs several minutes per configuration). An explicit mode is used for every
compiled row, and a row whose compile does not fit is trimmed. Every compiled row records
its mode.
"""
from dataclasses import dataclass, field

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
KINDS = ("kernel", "training")  # one sub-block op forward+backward; the whole model's training step
# Seconds a cold compile takes at the least, before the run has measured one: (device type, kind) ->
# mode -> seconds. Guesses from compiles of models of this size; replaced by measurements.
INITIAL_GUESS = {
    ("cuda", "kernel"): {"default": 30.0, "reduce-overhead": 35.0, "max-autotune": 150.0,
                         "max-autotune-no-cudagraphs": 140.0},
    ("cuda", "training"): {"default": 60.0, "reduce-overhead": 70.0, "max-autotune": 420.0,
                           "max-autotune-no-cudagraphs": 400.0},
    ("cpu", "kernel"): {"default": 60.0, "reduce-overhead": 60.0, "max-autotune": 300.0,
                        "max-autotune-no-cudagraphs": 300.0},
    ("cpu", "training"): {"default": 180.0, "reduce-overhead": 180.0, "max-autotune": 900.0,
                          "max-autotune-no-cudagraphs": 900.0},
}
AUTO_PREFERENCE = {"kernel": ("max-autotune", "default"), "training": ("default",)}


def uses_cuda_graphs(mode: str) -> bool:
    """Modes whose compiled callables replay CUDA graphs (outputs are overwritten by the next
    call unless each call is marked as a new step)."""
    return mode in ("reduce-overhead", "max-autotune")


@dataclass
class CompilePolicy:
    requested: str  # "auto", "none" or one of COMPILE_MODES
    device_type: str  # "cuda" | "cpu"
    skip_reason: str | None = None  # set: every compiled row is skipped with this reason
    measured: dict = field(default_factory=dict)  # (kind, mode) -> [seconds]

    def estimate(self, kind: str, mode: str) -> tuple[float, str]:
        """(seconds, where the figure comes from) for one cold compile of this kind and mode."""
        seen = self.measured.get((kind, mode))
        if seen:
            return max(seen), "measured in this run"
        return INITIAL_GUESS[(self.device_type, kind)][mode], "a guess until this run has measured one"

    def candidates(self, kind: str) -> tuple[str, ...]:
        return AUTO_PREFERENCE[kind] if self.requested == "auto" else (self.requested,)

    def choose(self, kind: str, seconds_left: float) -> tuple[str | None, str]:
        """(mode, "") for the first candidate mode whose compile fits in seconds_left, else
        (None, why nothing fits)."""
        if self.skip_reason:
            return None, self.skip_reason
        tried = []
        for mode in self.candidates(kind):
            seconds, source = self.estimate(kind, mode)
            if seconds <= seconds_left:
                return mode, ""
            tried.append(f"mode {mode} takes ~{seconds:.0f}s ({source})")
        return None, f"trimmed by the budget: {max(0.0, seconds_left):.0f}s left; " + ", ".join(tried)

    def record(self, kind: str, mode: str, seconds: float):
        self.measured.setdefault((kind, mode), []).append(seconds)

    def describe(self) -> str:
        if self.skip_reason:
            return f"no compiled rows: {self.skip_reason}"
        if self.requested == "auto":
            return ("auto: kernel rows max-autotune where its compile fits the budget, else default; "
                    "training rows default")
        return f"{self.requested} for every compiled row"
