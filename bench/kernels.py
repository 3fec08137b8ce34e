"""Kernel benchmarks: the attention core and the LayerNorm+MLP sub-block, each in forward,
backward and forward+backward, for every provider a user could pick, at the model's
shapes and over a sweep of batch size and sequence length.

Providers
- attention: our Triton kernel (kernels.attention); the torch reference (eager
  matmul-softmax-matmul, vit.backends.torch_attention); torch's
  scaled_dot_product_attention forced onto each of its backends (flash, efficient,
  cudnn, math) with torch.nn.attention.sdpa_kernel, including the permutes from the
  model's [B, N, 3C] layout to [B, H, N, D] and back, which a user of SDPA pays too;
  torch.compile of the reference.
- layernorm_mlp: our Triton kernels (kernels.layernorm_mlp); the torch reference
  (vit.backends.torch_layernorm_mlp); torch.compile of the reference.
A provider that cannot run here (module missing, no CUDA, no kernel for the shape,
compile failing) becomes a row with status "skipped" and the reason, never nothing.

Every provider is also checked for correctness at every shape it is timed at: fresh
random inputs (another seed than the timed ones), forward and all input gradients
compared with the torch reference evaluated in float64, max absolute error reported.

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

from bench.measure import describe_error, synchronize, time_fn
from vit.backends import torch_attention, torch_layernorm_mlp

LAYER_NORM_EPS = 1e-5
OPS = ("attention", "layernorm_mlp")
MODES = ("forward", "backward", "forward+backward")


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
QUICK_SWEEP_BATCH_SIZES = (1, 2, 4)
QUICK_SWEEP_SEQ_LENS = (9, 17, 33)


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


@dataclass
class Provider:
    name: str
    op: str
    description: str
    # shape -> fn(*inputs) -> output; raises Unavailable (or anything) when it cannot run.
    build: Callable[[KernelShape], Callable]
    # Entered around every call of fn (sdpa_kernel for SDPA); outside the timed region.
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    is_compile: bool = False
    skip_reason: str | None = None  # known before trying (e.g. --quick CPU skips compile)


def _import_kernel(module_name: str, function_name: str):
    try:
        module = __import__(module_name, fromlist=[function_name])
        return getattr(module, function_name)
    except Exception as error:  # ImportError, a syntax error in a landing module, no triton...
        raise Unavailable(f"{module_name}.{function_name} cannot be imported ({describe_error(error)})") from None


def _triton_provider(op: str, device: torch.device) -> Provider:
    module = f"kernels.{op}"

    def build(s: KernelShape):
        if op == "attention":
            attention = _import_kernel(module, "attention")
            return lambda qkv: attention(qkv, s.heads)
        layernorm_mlp = _import_kernel(module, "layernorm_mlp")
        return lambda *tensors: layernorm_mlp(*tensors, eps=LAYER_NORM_EPS)

    where = "compiled for this GPU" if device.type == "cuda" else "run by the Triton interpreter (TRITON_INTERPRET=1)"
    return Provider("triton (ours)", op, f"{module}, {where}", build)


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


def compile_mode(device: torch.device) -> str:
    # max-autotune on GPU: the project's speed targets compare against it. On the CPU it would
    # only add autotuning of C++ GEMM templates; the default mode is what a CPU user gets.
    return "max-autotune" if device.type == "cuda" else "default"


def _compile_provider(op: str, device: torch.device, skip_reason: str | None) -> Provider:
    mode = compile_mode(device)

    def build(s: KernelShape):
        import torch._dynamo

        # A fresh cache per shape: dynamo's recompile limit (8 per code object) would
        # otherwise make later shapes of a sweep silently run eagerly.
        torch._dynamo.reset()
        compiled = torch.compile(reference(op, s), mode=None if mode == "default" else mode, dynamic=False)
        if device.type != "cuda":
            return compiled

        def step(*tensors):
            # max-autotune records CUDA graphs; each call is a new step, so outputs of a
            # previous call whose backward never ran (forward-only timing) are released.
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(*tensors)
        return step

    return Provider(f"torch.compile ({mode})", op, f"torch.compile(reference, mode={mode!r}, dynamic=False)",
                    build, is_compile=True, skip_reason=skip_reason)


def providers(op: str, device: torch.device, compile_skip_reason: str | None = None) -> list[Provider]:
    eager = Provider("torch (eager)", op, "vit.backends reference, eager", lambda s: reference(op, s))
    out = [_triton_provider(op, device), eager]
    if op == "attention":
        out += [_sdpa_provider(name) for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")]
    out.append(_compile_provider(op, device, compile_skip_reason))
    return out


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
    status: str  # "ok" | "skipped" (cannot run here, or trimmed) | "failed" (crashed; the reason says how)
    skipped_reason: str | None = None
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


def measure_shape(op: str, s: KernelShape, provider: Provider, modes, dtype, device, peaks: dict,
                  in_sweeps: list[str], quick: bool, seed: int = 0) -> list[KernelRow]:
    """All modes of one provider at one shape: probe (and compile), correctness, timing."""
    common = dict(op=op, provider=provider.name, provider_description=provider.description,
                  shape={**asdict(s), "head_dim": s.head_dim}, dtype=str(dtype).removeprefix("torch."),
                  in_sweeps=list(in_sweeps))

    def skipped(mode, reason, status="skipped", **extra):
        return KernelRow(mode=mode, status=status, skipped_reason=reason, flops=flops(op, mode, s),
                         bytes=bytes_moved(op, mode, s, dtype.itemsize), **common, **extra)

    if provider.skip_reason:
        return [skipped(mode, provider.skip_reason) for mode in modes]
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
            return [skipped(mode, _describe_failure(error, caught)) for mode in modes]
    compile_seconds = time.perf_counter() - started if provider.is_compile else None

    with provider.context():
        try:
            forward_error, grad_error = max_errors(fn, op, s, dtype, device, seed=seed + 1000)
        except Exception as error:
            return [skipped(mode, f"correctness check crashed: {describe_error(error)}", "failed")
                    for mode in modes]
        grad_out = torch.randn(fn(*inputs).shape, generator=torch.Generator().manual_seed(seed + 2)).to(device, dtype)
        rows = []
        for mode in modes:
            error_of_mode = {"forward": forward_error, "backward": grad_error}.get(mode, max(forward_error, grad_error))
            try:
                call, setup = mode_callable(fn, inputs, mode, grad_out)
                timing = time_fn(call, device, quick, setup)
            except Exception as error:
                rows.append(skipped(mode, f"timing crashed: {describe_error(error)}", "failed",
                                    max_error=error_of_mode, max_error_forward=forward_error,
                                    max_error_grad=grad_error))
                continue
            seconds = timing.median_ms * 1e-3
            work, traffic = flops(op, mode, s), bytes_moved(op, mode, s, dtype.itemsize)
            rows.append(KernelRow(
                mode=mode, status="ok", median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                timed_calls=timing.calls, flops=work, bytes=traffic,
                tflops=work / seconds / 1e12, gbps=traffic / seconds / 1e9,
                compute_floor_fraction=work / (peaks["matmul_tflops"] * 1e12) / seconds,
                memory_floor_fraction=traffic / (peaks["copy_gbps"] * 1e9) / seconds,
                max_error=error_of_mode, max_error_forward=forward_error, max_error_grad=grad_error,
                compile_seconds=compile_seconds, **common))
    return rows


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


def run_model_shape(points, device, dtype, peaks, quick, compile_skip_reason, log) -> list[KernelRow]:
    """Every op, provider and mode at the model's shape: never trimmed."""
    base = points[0]
    rows = []
    for op in OPS:
        for provider in providers(op, device, compile_skip_reason):
            started = time.perf_counter()
            new = measure_shape(op, base.shape, provider, MODES, dtype, device, peaks, list(base.in_sweeps), quick)
            rows += new
            log(f"  {op:<14} {provider.name:<26} {_summary(new)}  ({time.perf_counter() - started:.1f}s)")
    return rows


def run_sweeps(points, modes, device, dtype, peaks, quick, compile_skip_reason, budget, deadline, log,
               compile_seconds_seen: list[float] = ()) -> list[KernelRow]:
    """The other sweep shapes, cheapest providers first: all non-compile providers at every
    shape, then torch.compile (a recompile per shape) while time is left. A compile is only
    started when the longest one seen so far (compile_seconds_seen: the model shape's) fits."""
    rows = []
    compile_seconds_per_shape = list(compile_seconds_seen)
    for compile_pass in (False, True):
        for point in points[1:]:
            for op in OPS:
                for provider in providers(op, device, compile_skip_reason):
                    if provider.is_compile != compile_pass:
                        continue
                    what = f"kernel sweep {op} {provider.name} at {point.shape.label()}"
                    if provider.is_compile and not provider.skip_reason and compile_seconds_per_shape:
                        expected = max(compile_seconds_per_shape)
                        if time.perf_counter() + expected > deadline:
                            budget.trim(what, f"a torch.compile takes ~{expected:.0f}s here; "
                                              f"{max(0, deadline - time.perf_counter()):.0f}s of the sweep budget left")
                            continue
                    if time.perf_counter() > deadline:
                        budget.trim(what, "sweep budget spent")
                        continue
                    started = time.perf_counter()
                    new = measure_shape(op, point.shape, provider, modes, dtype, device, peaks,
                                        list(point.in_sweeps), quick)
                    if provider.is_compile and any(r.status == "ok" for r in new):
                        compile_seconds_per_shape.append(time.perf_counter() - started)
                    rows += new
                    log(f"  {op:<14} {provider.name:<26} {point.shape.label():<40} {_summary(new)}")
    return rows


def _summary(rows: list[KernelRow]) -> str:
    ok = [r for r in rows if r.status == "ok"]
    if not ok:
        return f"skipped: {rows[0].skipped_reason}" if rows else ""
    return "  ".join(f"{r.mode} {r.median_ms * 1e3:,.0f}us" for r in ok) + f"  max err {max(r.max_error for r in ok):.1e}"
