"""bfloat16 in Triton's interpreter, computed as a GPU computes it.

Triton's interpreter (TRITON_INTERPRET=1) stores bfloat16 values as their raw uint16 bit
patterns and, for bf16, only converts to and from float32 correctly (and then truncates instead
of rounding). Everything else computes on the integers: `tl.dot` of two bf16 blocks multiplies
bit patterns, a float64 or integer value cast to bf16 becomes a small integer's bit pattern (a
bias gradient of 67 reads back as 6e-39), and `-x` or `tl.max(x)` act on the integers.
`install()` makes the interpreter, for every kernel run after it:
- run `tl.dot` with bf16 operands on their exact float32 values (a bf16 x bf16 product is exact
  in float32, and the GPU's tensor cores accumulate in float32);
- round float32 -> bf16 casts to nearest, ties to even, keeping NaN and infinities (the GPU's
  cvt.rn.bf16.f32);
- cast between bf16 and any other type through float32, as Triton's own semantics do for
  bf16 -> other (and as torch does for float64 -> bf16);
- raise BFloat16InterpreterError for any other arithmetic, comparison, reduction or scan
  applied to bf16 values, instead of computing on bit patterns (convert with .to(tl.float32)).
Loads, stores, selects (tl.where), reshapes and transposes move bit patterns and stay exact.

The Triton internals it replaces, in triton.runtime.interpreter (the same in Triton 3.6 and
3.8): InterpreterBuilder.create_dot, .cast_impl (behind every create_fp_trunc, create_fp_ext,
create_si_to_fp, create_fp_to_si... lambda), .binary_op, .unary_op, .ternary_op, .create_fma,
.create_erf, .create_rsqrt, ReduceOps.apply_impl and ScanOps.apply_impl; it reads TensorHandle.
If any of them is missing or has another signature, install() raises RuntimeError naming it
and the Triton version. With it installed, kernels._common lets the ops take bf16 under the
interpreter; uninstall() restores the interpreter and the ops' refusal.
"""
import inspect

import numpy as np

# (class in triton.runtime.interpreter, method, its parameters) replaced by install().
PATCHED = (
    ("InterpreterBuilder", "create_dot", ("self", "a", "b", "d", "input_precision", "max_num_imprecise_acc")),
    ("InterpreterBuilder", "cast_impl", ("self", "src", "dst_type")),
    ("InterpreterBuilder", "binary_op", ("self", "lhs", "rhs", "op")),
    ("InterpreterBuilder", "unary_op", ("self", "arg", "op")),
    ("InterpreterBuilder", "ternary_op", ("self", "lhs", "rhs", "other", "op")),
    ("InterpreterBuilder", "create_fma", ("self", "x", "y", "z")),
    ("InterpreterBuilder", "create_erf", ("self", "arg")),
    ("InterpreterBuilder", "create_rsqrt", ("self", "arg")),
    ("ReduceOps", "apply_impl", ("self", "input")),
    ("ScanOps", "apply_impl", ("self", "input")),
)

# (class, method name) -> the interpreter's own method, while installed.
_originals = {}


class BFloat16InterpreterError(RuntimeError):
    """Arithmetic the interpreter would compute on bf16 bit patterns."""


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """The exact float32 values of bf16 bit patterns (bf16 is float32's upper half)."""
    return (np.asarray(bits).astype(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """bf16 bit patterns of float32 values rounded to nearest, ties to even. Infinities stay
    infinite, finite values past bf16's range round to infinity, NaN stays a (quiet) NaN."""
    values = np.asarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit carries into the kept half exactly when the dropped
    # half is above one half, or equal to it with an odd kept half.
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    quiet_nan = (bits >> np.uint32(16)) | np.uint32(0x0040)
    return np.where(np.isnan(values), quiet_nan, rounded).astype(np.uint16)


def is_installed() -> bool:
    return bool(_originals)


def install():
    """Patch Triton's interpreter (see the module's docstring); a second call does nothing."""
    if _originals:
        return
    from triton.runtime import interpreter

    originals = {(owner, name): getattr(owner, name) for owner, name in _checked_targets(interpreter)}
    replacements = _replacements(interpreter, originals)
    _originals.update(originals)
    for (owner, name), replacement in zip(originals, replacements):
        setattr(owner, name, replacement)


def uninstall():
    """Restore the interpreter's own methods (no-op when not installed)."""
    while _originals:
        (owner, name), original = _originals.popitem()
        setattr(owner, name, original)


def _checked_targets(interpreter):
    import triton

    targets = []
    for class_name, name, parameters in PATCHED:
        where = f"triton.runtime.interpreter.{class_name}.{name}"
        owner = getattr(interpreter, class_name, None)
        method = getattr(owner, name, None)
        if method is None:
            raise RuntimeError(f"kernels.interpreter_bf16 patches {where}, which Triton {triton.__version__} "
                               "does not have; the shim must be updated for this Triton version")
        found = tuple(inspect.signature(method).parameters)
        if found != parameters:
            raise RuntimeError(f"kernels.interpreter_bf16 patches {where}{parameters}, which Triton "
                               f"{triton.__version__} defines as {found}; the shim must be updated for this "
                               "Triton version")
        targets.append((owner, name))
    if not hasattr(interpreter, "TensorHandle"):
        raise RuntimeError(f"kernels.interpreter_bf16 needs triton.runtime.interpreter.TensorHandle, which Triton "
                           f"{triton.__version__} does not have")
    return targets


def _refuse(what: str):
    raise BFloat16InterpreterError(
        f"{what} applied to bfloat16 values: Triton's interpreter would compute it on their uint16 bit patterns; "
        "convert with .to(tl.float32) first (kernels.interpreter_bf16)")


def _replacements(interpreter, originals: dict):
    """The new methods, in PATCHED's order; each calls the interpreter's own one."""
    import triton.language as tl

    TensorHandle = interpreter.TensorHandle
    bf16 = tl.bfloat16

    def is_bf16(handle) -> bool:
        return handle.dtype.scalar == bf16

    def as_float32(handle):
        return TensorHandle(bf16_bits_to_float32(handle.data), tl.float32) if is_bf16(handle) else handle

    create_dot = originals[interpreter.InterpreterBuilder, "create_dot"]
    cast_impl = originals[interpreter.InterpreterBuilder, "cast_impl"]
    binary_op = originals[interpreter.InterpreterBuilder, "binary_op"]
    unary_op = originals[interpreter.InterpreterBuilder, "unary_op"]
    ternary_op = originals[interpreter.InterpreterBuilder, "ternary_op"]
    create_fma = originals[interpreter.InterpreterBuilder, "create_fma"]
    create_erf = originals[interpreter.InterpreterBuilder, "create_erf"]
    create_rsqrt = originals[interpreter.InterpreterBuilder, "create_rsqrt"]
    reduce_impl = originals[interpreter.ReduceOps, "apply_impl"]
    scan_impl = originals[interpreter.ScanOps, "apply_impl"]

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if is_bf16(d):
            _refuse("tl.dot with a bfloat16 accumulator")
        return create_dot(self, as_float32(a), as_float32(b), d, input_precision, max_num_imprecise_acc)

    def cast(self, src, dst_type):
        source, target = src.dtype.scalar, dst_type.scalar
        if (source == bf16) == (target == bf16):
            return cast_impl(self, src, dst_type)
        if source == bf16:
            as_fp32 = as_float32(src)
            return as_fp32 if target == tl.float32 else cast_impl(self, as_fp32, dst_type)
        as_fp32 = src if source == tl.float32 else cast_impl(self, src, tl.float32)
        return TensorHandle(float32_to_bf16_bits(as_fp32.data), bf16)

    def binary(self, lhs, rhs, op):
        if is_bf16(lhs) or is_bf16(rhs):
            _refuse(f"{getattr(op, '__name__', op)}")
        return binary_op(self, lhs, rhs, op)

    def unary(self, arg, op):
        if is_bf16(arg):
            _refuse(f"{getattr(op, '__name__', op)}")
        return unary_op(self, arg, op)

    def ternary(self, lhs, rhs, other, op):
        # A select (tl.where) moves bit patterns, which is exact; anything else computes.
        if op is not np.where and any(is_bf16(handle) for handle in (lhs, rhs, other)):
            _refuse(f"{getattr(op, '__name__', op)}")
        return ternary_op(self, lhs, rhs, other, op)

    def fma(self, x, y, z):
        if any(is_bf16(handle) for handle in (x, y, z)):
            _refuse("fma")
        return create_fma(self, x, y, z)

    def erf(self, arg):
        if is_bf16(arg):
            _refuse("erf")
        return create_erf(self, arg)

    def rsqrt(self, arg):
        if is_bf16(arg):
            _refuse("rsqrt")
        return create_rsqrt(self, arg)

    def reduce(self, input):
        if any(tensor.dtype.scalar == bf16 for tensor in input):
            _refuse("a reduction")
        return reduce_impl(self, input)

    def scan(self, input):
        if any(tensor.dtype.scalar == bf16 for tensor in input):
            _refuse("a scan")
        return scan_impl(self, input)

    return (dot, cast, binary, unary, ternary, fma, erf, rsqrt, reduce, scan)
