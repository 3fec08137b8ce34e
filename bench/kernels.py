"""Kernel benchmarks: the attention core and the LayerNorm+MLP sub-block, each in forward,
backward and forward+backward, for every provider a user could pick, at the model's
shapes and over a sweep of batch size and sequence length.

Providers, in the order they are measured (the headline comparisons first)
- attention: our Triton kernel (kernels.attention); torch's scaled_dot_product_attention
  forced onto each of its backends (flash, efficient, cudnn, math) with
  torch.nn.attention.sdpa_kernel, including the permutes from the model's [B, N, 3C] layout
  to [B, H, N, D] and back, which a user of SDPA pays too; the torch reference (eager
  matmul-softmax-matmul, vit.backends.torch_attention);
- layernorm_mlp: our Triton kernels (kernels.layernorm_mlp); the torch reference
  (vit.backends.torch_layernorm_mlp);
- then, budgeted (bench/compiling.py), torch.compile of each reference, the row naming its mode.
Each row says whose code it times: "ours" (our kernels and our torch reference) or "peer".
A peer that cannot run here (no CUDA, no SDPA kernel for the case, compile not affordable)
is a row with status "skipped" and the reason, and so is ours on a CPU whose Triton interpreter
cannot run (kernels._common.interpreter_broken_reason); a crash is a row with status "failed" and
the reason, and a failure of ours makes the run exit non-zero.

Every provider is also checked for correctness at every shape it is timed at: fresh
random inputs (another seed than the timed ones), forward and all input gradients
compared with the torch reference evaluated in float64, max absolute error reported. Our
kernel fails its row when its error exceeds ERROR_FACTOR_ALLOWED times the eager
reference's own error in the same dtype: a fast wrong kernel is not a result.

Precision: bf16 on CUDA (the model's training precision). On the CPU everything runs in
fp32, because the Triton interpreter computes bf16 matmuls wrongly (kernels/layernorm_mlp.py
refuses them there). All inputs, LayerNorm+MLP weights included, are in that dtype; in
training the residual stream and the weights stay fp32 under autocast, which the
end-to-end numbers cover.
"""
import contextlib
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from bench.compiling import CompilePolicy, uses_cuda_graphs
from bench.measure import describe_error, synchronize, time_fn
from kernels._common import interpreter_broken_reason
from vit.backends import torch_attention, torch_layernorm_mlp

LAYER_NORM_EPS = 1e-5
OPS = ("attention", "layernorm_mlp")
MODES = ("forward", "backward", "forward+backward")
OURS = "triton (ours)"
EAGER = "torch (eager)"
# An error of our kernel above this many times the eager reference's own error in the same
# dtype (both against float64, same inputs) is a wrong kernel, not rounding.
ERROR_FACTOR_ALLOWED = 10.0
ERROR_FLOOR = 1e-6  # slack where the reference happens to be exact


@dataclass(frozen=True)
class KernelShape:
    batch: int
    seq_len: int
    dim: int
    heads: int
    mlp_dim: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def rows(self) -> int:
        return self.batch * self.seq_len

    def label(self) -> str:
        return f"B={self.batch} N={self.seq_len} C={self.dim} H={self.heads}x{self.head_dim} MLP={self.mlp_dim}"


# The model: batch 128, 64 patches + the class token, dim 384 in 12 heads of 32, MLP 384.
MODEL_SHAPE = KernelShape(batch=128, seq_len=65, dim=384, heads=12, mlp_dim=384)
QUICK_SHAPE = KernelShape(batch=2, seq_len=17, dim=64, heads=2, mlp_dim=64)
# Sequence lengths of 32x32 images in patches of 8, 4 (the model), 2, and the lengths between.
SWEEP_BATCH_SIZES = (16, 32, 64, 128, 256, 512)
SWEEP_SEQ_LENS = (17, 33, 65, 129, 257, 513)
# --quick: the quick shape and one point above it on each axis, the least interpreted work that
# runs a sweep's code path (each interpreted call takes seconds).
QUICK_SWEEP_BATCH_SIZES = (2, 4)
QUICK_SWEEP_SEQ_LENS = (17, 33)


# ------------------------------------------------------------------ work and traffic of each op
# FLOPs count multiply-adds of the matmuls as 2; softmax, LayerNorm and GELU are left out
# (they are a few percent of the matmuls here). Bytes are what must cross DRAM at the
# least: every input read once, every output written once, and the small per-row
# statistics a training forward keeps for its backward. Providers that move more (the
# eager reference writes the N x N scores) are measured against the same floor, so the
# fractions compare providers.

def flops(op: str, mode: str, s: KernelShape) -> int:
    if mode == "forward+backward":
        return flops(op, "forward", s) + flops(op, "backward", s)
    if op == "attention":
        # forward: S = Q K^T and O = P V, each 2*N*N*D per (batch, head): 4*B*H*N^2*D.
        forward = 4 * s.batch * s.heads * s.seq_len ** 2 * s.head_dim
        # backward: dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q, plus S recomputed from
        # Q and K (FlashAttention's convention): five N x N x D matmuls = 2.5x forward.
        return forward if mode == "forward" else forward * 5 // 2
    # layernorm_mlp forward: fc1 [rows, C] x [C, H] and fc2 [rows, H] x [H, C]: 2 * (2*rows*C*H).
    forward = 2 * s.rows * s.dim * s.mlp_dim * 2
    # backward: for each linear, the input gradient and the weight gradient, each as large as
    # its forward matmul: 2x forward. Our kernels also recompute fc1; that is not useful work
    # and is not counted.
    return forward if mode == "forward" else 2 * forward


def bytes_moved(op: str, mode: str, s: KernelShape, element_size: int) -> int:
    if mode == "forward+backward":
        return bytes_moved(op, "forward", s, element_size) + bytes_moved(op, "backward", s, element_size)
    e = element_size
    if op == "attention":
        qkv, out = s.rows * 3 * s.dim * e, s.rows * s.dim * e
        log_sum_exp = s.batch * s.heads * s.seq_len * 4  # fp32 per (batch, head, query row)
        if mode == "forward":
            return qkv + out + log_sum_exp  # read qkv; write out and the lse the backward needs
        return qkv + out + log_sum_exp + qkv  # read qkv, dout (out-sized) and lse; write dqkv
    activation = s.rows * s.dim * e
    parameters = (2 * s.dim * s.mlp_dim + s.mlp_dim + 3 * s.dim) * e  # w1, w2, b1; LN weight, LN bias, b2
    row_statistics = s.rows * 2 * 4  # fp32 mean and 1/std per row, saved for the backward
    if mode == "forward":
        return 2 * activation + parameters + row_statistics  # read x and the weights; write y
    return 3 * activation + 2 * parameters + row_statistics  # read x, dy, weights, stats; write dx, grads


# ----------------------------------------------------------------------------------- inputs

def make_inputs(op: str, s: KernelShape, dtype, device, seed: int) -> list[torch.Tensor]:
    """Leaf tensors requiring grad, scaled like the model's activations and weights."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*size, scale=1.0, offset=0.0):
        return (torch.randn(*size, generator=g) * scale + offset).to(device=device, dtype=dtype).requires_grad_()

    if op == "attention":
        return [randn(s.batch, s.seq_len, 3 * s.dim)]
    return [randn(s.batch, s.seq_len, s.dim),  # x
            randn(s.dim, scale=0.1, offset=1.0), randn(s.dim, scale=0.1),  # LayerNorm weight, bias
            randn(s.mlp_dim, s.dim, scale=0.02), randn(s.mlp_dim, scale=0.02),  # fc1
            randn(s.dim, s.mlp_dim, scale=0.02), randn(s.dim, scale=0.02)]  # fc2


def reference(op: str, s: KernelShape) -> Callable:
    if op == "attention":
        return lambda qkv: torch_attention(qkv, s.heads)
    return lambda *tensors: torch_layernorm_mlp(*tensors, LAYER_NORM_EPS)


# -------------------------------------------------------------------------------- providers

class Unavailable(Exception):
    """The provider cannot run here; the message says why."""


class InterpreterBroken(Unavailable):
    """Our kernels cannot run here: this stack's Triton interpreter is broken (not our code)."""


@dataclass
class Provider:
    name: str
    op: str
    description: str
    # shape -> fn(*inputs) -> output; raises Unavailable (or anything) when it cannot run.
    build: Callable[[KernelShape], Callable]
    owner: str = "peer"  # "ours": a failure is the project's and fails the run; "peer": what a user could pick instead
    # Entered around every call of fn (sdpa_kernel for SDPA); outside the timed region.
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    compile_mode: str | None = None  # the torch.compile mode of a compiled provider

    @property
    def is_compile(self) -> bool:
        return self.compile_mode is not None


def _import_kernel(module_name: str, function_name: str):
    try:
        module = __import__(module_name, fromlist=[function_name])
        return getattr(module, function_name)
    except Exception as error:  # ImportError, a syntax error in a landing module, no triton...
        raise Unavailable(f"{module_name}.{function_name} cannot be imported ({describe_error(error)})") from None


def _triton_provider(op: str, device: torch.device) -> Provider:
    module = f"kernels.{op}"

    def build(s: KernelShape):
        broken = interpreter_broken_reason() if device.type != "cuda" else None
        if broken:
            raise InterpreterBroken(broken)
        if op == "attention":
            attention = _import_kernel(module, "attention")
            return lambda qkv: attention(qkv, s.heads)
        layernorm_mlp = _import_kernel(module, "layernorm_mlp")
        return lambda *tensors: layernorm_mlp(*tensors, eps=LAYER_NORM_EPS)

    where = "compiled for this GPU" if device.type == "cuda" else "run by the Triton interpreter (TRITON_INTERPRET=1)"
    return Provider(OURS, op, f"{module}, {where}", build, owner="ours")


def _sdpa_provider(backend_name: str) -> Provider:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def build(s: KernelShape):
        def sdpa(qkv):
            B, N, _ = qkv.shape
            # The permutes a user of SDPA needs around the model's [B, N, 3C] layout; they
            # are views, SDPA copies if its kernel needs contiguous heads.
            q, k, v = qkv.view(B, N, 3, s.heads, s.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v)
            return out.transpose(1, 2).reshape(B, N, s.dim)
        return sdpa

    short = backend_name.lower().removesuffix("_attention")
    return Provider(f"sdpa {short}", "attention",
                    f"F.scaled_dot_product_attention under sdpa_kernel(SDPBackend.{backend_name}), with the "
                    f"permutes from and to [B, N, 3C]", build, context=lambda: sdpa_kernel(backend))


def compile_provider(op: str, device: torch.device, mode: str) -> Provider:
    """torch.compile of the reference in one mode (bench/compiling.py), a fresh compile per shape."""
    def build(s: KernelShape):
        import torch._dynamo

        # A fresh cache per shape: dynamo's recompile limit (8 per code object) would
        # otherwise make later shapes of a sweep silently run eagerly.
        torch._dynamo.reset()
        compiled = torch.compile(reference(op, s), mode=None if mode == "default" else mode, dynamic=False)
        if device.type != "cuda" or not uses_cuda_graphs(mode):
            return compiled

        def step(*tensors):
            # This mode records CUDA graphs; each call is a new step, so outputs of a previous
            # call whose backward never ran (forward-only timing) are released.
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(*tensors)
        return step

    return Provider(f"torch.compile ({mode})", op, f"torch.compile(reference, mode={mode!r}, dynamic=False)",
                    build, compile_mode=mode)


def providers(op: str, device: torch.device) -> list[Provider]:
    """The providers of one op that need no compile, in the order they are measured: ours,
    then the peers of the headline comparison (SDPA's backends), then the eager reference."""
    eager = Provider(EAGER, op, "vit.backends reference, eager", lambda s: reference(op, s), owner="ours")
    out = [_triton_provider(op, device)]
    if op == "attention":
        out += [_sdpa_provider(name) for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")]
    return out + [eager]


# ------------------------------------------------------------------------ timed callables

def mode_callable(fn: Callable, inputs: list[torch.Tensor], mode: str, grad_out: torch.Tensor):
    """(call, setup): what one timed call does, and its untimed preparation (None, or a
    function whose result is passed to call). The forward runs with grad enabled, as in
    training (it saves what the backward needs). The backward alone gets a fresh forward
    from setup each time, so it never replays a graph (compiled backwards refuse to); the
    gradients are returned, not accumulated into .grad."""
    if mode == "forward":
        return (lambda: fn(*inputs)), None
    if mode == "backward":
        return (lambda out: torch.autograd.grad(out, inputs, grad_out)), (lambda: fn(*inputs))
    return (lambda: torch.autograd.grad(fn(*inputs), inputs, grad_out)), None


def _describe_failure(error: BaseException, caught: list) -> str:
    reason = describe_error(error)
    # SDPA says only "No available kernel" in the error; the why is in its warnings.
    details = [str(w.message).strip().splitlines()[0] for w in caught if "kernel" in str(w.message).lower()]
    if details:
        reason += " (" + "; ".join(dict.fromkeys(details))[:400] + ")"
    return reason


def max_errors(fn: Callable, op: str, s: KernelShape, dtype, device, seed: int) -> tuple[float, float]:
    """(forward, gradient) max absolute error against the reference in float64, on fresh inputs."""
    inputs = make_inputs(op, s, dtype, device, seed)
    exact_inputs = [t.detach().double().requires_grad_() for t in inputs]
    out = fn(*inputs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    grads = torch.autograd.grad(out, inputs, grad_out.to(dtype))
    exact_out = reference(op, s)(*exact_inputs)
    exact_grads = torch.autograd.grad(exact_out, exact_inputs, grad_out.double())
    forward_error = (out.double() - exact_out).abs().max().item()
    grad_error = max((g.double() - e).abs().max().item() for g, e in zip(grads, exact_grads))
    return forward_error, grad_error


@dataclass
class KernelRow:
    op: str
    mode: str
    provider: str
    provider_description: str
    shape: dict
    dtype: str
    in_sweeps: list[str]
    status: str  # "ok" | "skipped" (cannot run here, or trimmed) | "failed" (crashed or wrong; the reason says how)
    owner: str = "peer"  # "ours" | "peer"
    compile_mode: str | None = None  # torch.compile mode of a compiled provider; None: not compiled
    skipped_reason: str | None = None  # why skipped or failed
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    timed_calls: int | None = None
    flops: int = 0
    bytes: int = 0
    tflops: float | None = None
    gbps: float | None = None
    # Time the op would take at the measured matmul peak (compute) or copy bandwidth (memory),
    # divided by the measured time: 1.0 means at that floor.
    compute_floor_fraction: float | None = None
    memory_floor_fraction: float | None = None
    max_error: float | None = None  # this mode's outputs: forward output, input gradients, or both
    max_error_forward: float | None = None
    max_error_grad: float | None = None
    compile_seconds: float | None = None  # the first forward+backward of a torch.compile provider


def _is_unavailable(error: BaseException) -> bool:
    """A peer that cannot run here, as opposed to one that crashed."""
    if isinstance(error, Unavailable):
        return True
    # SDPA forced onto a backend that has no kernel for this device, dtype or shape.
    text = str(error)
    return isinstance(error, RuntimeError) and ("No available kernel" in text or "No viable backend" in text)


def _shape_dict(s: KernelShape) -> dict:
    return {**asdict(s), "head_dim": s.head_dim}


def not_measured(op: str, s: KernelShape, provider: Provider, modes, dtype, in_sweeps, reason: str,
                 status: str = "skipped", **extra) -> list[KernelRow]:
    """Rows for a provider that did not run at this shape, with the reason."""
    return [KernelRow(op=op, mode=mode, provider=provider.name, provider_description=provider.description,
                      shape=_shape_dict(s), dtype=str(dtype).removeprefix("torch."), in_sweeps=list(in_sweeps),
                      status=status, owner=provider.owner, compile_mode=provider.compile_mode,
                      skipped_reason=reason, flops=flops(op, mode, s),
                      bytes=bytes_moved(op, mode, s, dtype.itemsize), **extra) for mode in modes]


def measure_shape(op: str, s: KernelShape, provider: Provider, modes, dtype, device, peaks: dict,
                  in_sweeps: list[str], quick: bool, seed: int = 0) -> list[KernelRow]:
    """All modes of one provider at one shape: probe (and compile), correctness, timing."""
    def failed(reason, **extra):
        return not_measured(op, s, provider, modes, dtype, in_sweeps, reason, "failed", **extra)

    inputs = make_inputs(op, s, dtype, device, seed)
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn = provider.build(s)
            with provider.context():
                # The first forward+backward compiles (Triton JIT, torch.compile) and shows
                # whether this provider runs at this shape at all.
                out = fn(*inputs)
                torch.autograd.grad(out, inputs, torch.ones_like(out))
                synchronize(device)
        except Exception as error:
            reason = _describe_failure(error, caught)
            if isinstance(error, InterpreterBroken) or (provider.owner == "peer" and _is_unavailable(error)):
                return not_measured(op, s, provider, modes, dtype, in_sweeps, reason)
            return failed(f"crashed: {reason}")
    compile_seconds = time.perf_counter() - started if provider.is_compile else None

    with provider.context():
        try:
            forward_error, grad_error = max_errors(fn, op, s, dtype, device, seed=seed + 1000)
        except Exception as error:
            return failed(f"correctness check crashed: {describe_error(error)}", compile_seconds=compile_seconds)
        grad_out = torch.randn(fn(*inputs).shape, generator=torch.Generator().manual_seed(seed + 2)).to(device, dtype)
        rows = []
        for mode in modes:
            error_of_mode = {"forward": forward_error, "backward": grad_error}.get(mode, max(forward_error, grad_error))
            errors = dict(max_error=error_of_mode, max_error_forward=forward_error, max_error_grad=grad_error,
                          compile_seconds=compile_seconds)
            try:
                call, setup = mode_callable(fn, inputs, mode, grad_out)
                timing = time_fn(call, device, quick, setup)
            except Exception as error:
                rows += not_measured(op, s, provider, [mode], dtype, in_sweeps,
                                     f"timing crashed: {describe_error(error)}", "failed", **errors)
                continue
            seconds = timing.median_ms * 1e-3
            work, traffic = flops(op, mode, s), bytes_moved(op, mode, s, dtype.itemsize)
            rows.append(KernelRow(
                op=op, mode=mode, provider=provider.name, provider_description=provider.description,
                shape=_shape_dict(s), dtype=str(dtype).removeprefix("torch."), in_sweeps=list(in_sweeps),
                status="ok", owner=provider.owner, compile_mode=provider.compile_mode,
                median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                timed_calls=timing.calls, flops=work, bytes=traffic,
                tflops=work / seconds / 1e12, gbps=traffic / seconds / 1e9,
                compute_floor_fraction=work / (peaks["matmul_tflops"] * 1e12) / seconds,
                memory_floor_fraction=traffic / (peaks["copy_gbps"] * 1e9) / seconds, **errors))
    return rows


def fail_wrong_results(rows: list[KernelRow]) -> list[str]:
    """Marks our kernel's rows failed where its error is beyond ERROR_FACTOR_ALLOWED times the
    eager reference's at the same op, shape and mode; returns what it failed."""
    eager = {(r.op, str(r.shape), r.mode): r for r in rows if r.provider == EAGER and r.status == "ok"}
    failed = []
    for row in rows:
        reference_row = eager.get((row.op, str(row.shape), row.mode))
        if row.provider != OURS or row.status != "ok" or reference_row is None:
            continue
        for what, mine, theirs in (("forward", row.max_error_forward, reference_row.max_error_forward),
                                   ("gradient", row.max_error_grad, reference_row.max_error_grad)):
            if not mine <= ERROR_FACTOR_ALLOWED * theirs + ERROR_FLOOR:  # NaN fails too
                row.status = "failed"
                row.skipped_reason = (f"wrong results: {what} max error {mine:.3g} against float64, the eager "
                                      f"reference's {theirs:.3g} (at most {ERROR_FACTOR_ALLOWED:g}x allowed)")
                failed.append(f"{row.op} {row.mode} at {row.shape}")
                break
    return failed


# ------------------------------------------------------------------------------ the phase

@dataclass(frozen=True)
class SweepPoint:
    shape: KernelShape
    in_sweeps: tuple[str, ...]


def sweep_points(base: KernelShape, batch_sizes, seq_lens) -> list[SweepPoint]:
    """The base shape, then every other shape of the two sweeps, each once."""
    membership: dict[KernelShape, list[str]] = {base: ["model"]}
    for b in batch_sizes:
        membership.setdefault(KernelShape(b, base.seq_len, base.dim, base.heads, base.mlp_dim), []).append("batch")
    for n in seq_lens:
        membership.setdefault(KernelShape(base.batch, n, base.dim, base.heads, base.mlp_dim), []).append("seq_len")
    return [SweepPoint(s, tuple(m)) for s, m in membership.items()]


def _compile_placeholder(op: str, policy: CompilePolicy) -> Provider:
    """The compiled peer's identity for rows that never compiled (skipped or trimmed)."""
    return Provider(f"torch.compile ({policy.requested})", op, "torch.compile of the reference; not compiled, "
                    "see the reason", lambda s: None)


def run_model_shape(points, device, dtype, peaks, quick, policy: CompilePolicy, budget, deadline: float,
                    log) -> list[KernelRow]:
    """Every op, provider and mode at the model's shape, ours and the eager peers first, then
    the compiled peers, each compile started only if it fits before the deadline."""
    base = points[0]
    shape, in_sweeps = base.shape, list(base.in_sweeps)
    rows = []
    for op in OPS:
        for provider in providers(op, device):
            if time.perf_counter() > deadline:
                why = "trimmed by the budget: the kernel phase's share was spent"
                budget.trim(f"kernels {op} {provider.name} at {shape.label()}", why)
                rows += not_measured(op, shape, provider, MODES, dtype, in_sweeps, why)
                log(f"  {op:<14} {provider.name:<30} {why}")
                continue
            started = time.perf_counter()
            new = measure_shape(op, shape, provider, MODES, dtype, device, peaks, in_sweeps, quick)
            rows += new
            log(f"  {op:<14} {provider.name:<30} {_summary(new)}  ({time.perf_counter() - started:.1f}s)")
    for what in fail_wrong_results(rows):
        log(f"  FAILED: triton (ours) gives wrong results: {what}")
    for op in OPS:
        mode, why = policy.choose("kernel", deadline - time.perf_counter())
        if mode is None:
            provider = _compile_placeholder(op, policy)
            if not policy.skip_reason:
                budget.trim(f"kernels {op} {provider.name} at {shape.label()}", why)
            rows += not_measured(op, shape, provider, MODES, dtype, in_sweeps, why)
            log(f"  {op:<14} {provider.name:<30} skipped: {why}")
            continue
        provider = compile_provider(op, device, mode)
        started = time.perf_counter()
        new = measure_shape(op, shape, provider, MODES, dtype, device, peaks, in_sweeps, quick)
        if new[0].compile_seconds is not None:
            policy.record("kernel", mode, new[0].compile_seconds)
        rows += new
        log(f"  {op:<14} {provider.name:<30} {_summary(new)}  ({time.perf_counter() - started:.1f}s)")
    return rows


def run_sweeps(points, modes, device, dtype, peaks, quick, policy: CompilePolicy, compile_modes: dict,
               budget, deadline: float, log) -> list[KernelRow]:
    """The other sweep shapes, cheapest providers first: all non-compile providers at every
    shape, then torch.compile (a recompile per shape) in the mode the model shape used for
    that op (compile_modes: op -> mode), each compile only where its measured time fits."""
    rows = []
    for point in points[1:]:
        for op in OPS:
            for provider in providers(op, device):
                if time.perf_counter() > deadline:
                    budget.trim(f"kernel sweep {op} {provider.name} at {point.shape.label()}", "sweep budget spent")
                    continue
                new = measure_shape(op, point.shape, provider, modes, dtype, device, peaks,
                                    list(point.in_sweeps), quick)
                rows += new
                log(f"  {op:<14} {provider.name:<30} {point.shape.label():<40} {_summary(new)}")
    for what in fail_wrong_results(rows):
        log(f"  FAILED: triton (ours) gives wrong results: {what}")
    for point in points[1:]:
        for op, mode in compile_modes.items():
            what = f"kernel sweep {op} torch.compile ({mode}) at {point.shape.label()}"
            expected, source = policy.estimate("kernel", mode)
            if time.perf_counter() + expected > deadline:
                budget.trim(what, f"a torch.compile ({mode}) takes ~{expected:.0f}s here ({source}); "
                                  f"{max(0, deadline - time.perf_counter()):.0f}s of the sweep budget left")
                continue
            new = measure_shape(op, point.shape, compile_provider(op, device, mode), modes, dtype, device, peaks,
                                list(point.in_sweeps), quick)
            if new[0].compile_seconds is not None:
                policy.record("kernel", mode, new[0].compile_seconds)
            rows += new
            log(f"  {op:<14} torch.compile ({mode}){'':<8} {point.shape.label():<40} {_summary(new)}")
    return rows


def _summary(rows: list[KernelRow]) -> str:
    ok = [r for r in rows if r.status == "ok"]
    if not ok:
        return f"{rows[0].status}: {rows[0].skipped_reason}" if rows else ""
    return "  ".join(f"{r.mode} {r.median_ms * 1e3:,.0f}us" for r in ok) + f"  max err {max(r.max_error for r in ok):.1e}"
