"""Triton's interpreter patches triton.language once per launch, not once per device-function call,
and looks up numpy's type for a Triton type without rebuilding its table each time.

Under TRITON_INTERPRET=1, a launch (GridExecutor.__call__) calls `_patch_lang(kernel)`, which
points triton.language's builtins at the interpreter for the launch and returns a scope that
restores them afterwards. Every call of a @triton.jit helper inside the kernel
(InterpretedFunction.__call__) calls `_patch_lang(helper)` again, in every program instance:
the same attributes set to the same builder's functions, each time through inspect.getmembers
over the language's modules, and its scope is never restored. Our kernels call helpers in their
inner loops, so the re-patching takes about 40% of an interpreted launch, and what the helpers
patch outlives the launch (a later sm_90 compile in the same process can fail on it).

`install()` replaces triton.runtime.interpreter._patch_lang: inside a launch, a helper whose
language modules (triton.language, triton.language.core: those in its globals) the launch has
already patched is not patched again; one that brings a module not yet patched is, and that
scope is restored with the launch's, innermost first, when the launch ends. The interpreter
computes exactly what it did (the patched attributes are the same functions of the one
interpreter builder), in fewer calls, and leaves triton.language as it found it.

Second, the interpreter's `_get_np_dtype(tt_dtype)`, called for every value an operation makes,
builds a dict of 19 Triton types (each hashed in Python) to look one up: about 13% of an
interpreted layernorm_mlp. `install()` replaces it with a lookup in a table filled once per type,
from the interpreter's own answer (pointers, which Triton types cannot hash, still ask it).

The internals it replaces are the same in Triton 3.6 and 3.8: `_patch_lang(fn)` returning a
scope with `restore()`, called by GridExecutor.__call__ (the launch) and by
InterpretedFunction.__call__ (a device-function call), and `_get_np_dtype(tt_dtype)`. If one is
missing or has another signature, install() raises RuntimeError naming it and the Triton
version; kernels._common then runs the interpreter as it is, only slower.
"""
import functools
import inspect

_original = None  # the interpreter's _patch_lang while installed
_original_np_dtype = None  # and its _get_np_dtype
_launch = None  # the launch in progress: its _LaunchScope
_np_dtypes = {}  # Triton scalar type -> numpy dtype, as _original_np_dtype answered


class _LaunchScope:
    """A launch's patching: the launch's own scope, the module sets patched so far and the
    scopes of the helpers that added one; restore() undoes them all, innermost first."""

    def __init__(self, scope, languages: frozenset):
        self.scopes = [scope]
        self.patched = set(languages)

    def restore(self):
        global _launch
        try:
            while self.scopes:
                self.scopes.pop().restore()
        finally:
            _launch = None


@functools.lru_cache(maxsize=None)
def _languages(fn) -> frozenset:
    """The ids of the triton.language modules fn's globals name, as _patch_lang finds them (a
    module's imports do not change once its kernels run)."""
    import triton.language as tl

    return frozenset(id(value) for value in fn.__globals__.values()
                     if inspect.ismodule(value) and (value is tl or value is tl.core))


def _patch_once(fn):
    global _launch
    languages = _languages(fn)
    if _launch is None:  # a launch starts: GridExecutor restores what it returns
        _launch = _LaunchScope(_original(fn), languages)
        return _launch
    if not languages <= _launch.patched:  # a helper with a module the launch has not patched
        _launch.scopes.append(_original(fn))
        _launch.patched |= languages
    return None  # InterpretedFunction.__call__ ignores it


def _np_dtype_once(tt_dtype):
    """_get_np_dtype: a block's element type, that type's numpy dtype asked once."""
    import triton.language as tl

    if isinstance(tt_dtype, tl.block_type):
        tt_dtype = tt_dtype.element_ty
    if isinstance(tt_dtype, tl.pointer_type):
        return _original_np_dtype(tt_dtype)
    np_dtype = _np_dtypes.get(tt_dtype)
    if np_dtype is None:
        np_dtype = _np_dtypes[tt_dtype] = _original_np_dtype(tt_dtype)
    return np_dtype


def is_installed() -> bool:
    return _original is not None


def install():
    """Replace the interpreter's _patch_lang and _get_np_dtype (see the module's docstring); a
    second call does nothing."""
    global _original, _original_np_dtype
    if _original is not None:
        return
    import triton
    from triton.runtime import interpreter

    for name, parameters in (("_patch_lang", ["fn"]), ("_get_np_dtype", ["tt_dtype"])):
        internal = getattr(interpreter, name, None)
        if internal is None or list(inspect.signature(internal).parameters) != parameters:
            raise RuntimeError(f"kernels.interpreter_patching: Triton {triton.__version__}'s interpreter has no "
                               f"{name}({', '.join(parameters)}); this module knows Triton 3.6 and 3.8")
    for caller in (interpreter.GridExecutor.__call__, interpreter.InterpretedFunction.__call__):
        if "_patch_lang(self.fn)" not in inspect.getsource(caller):
            raise RuntimeError(f"kernels.interpreter_patching: Triton {triton.__version__}'s {caller.__qualname__} "
                               "no longer calls _patch_lang(self.fn); this module knows Triton 3.6 and 3.8")
    _original, _original_np_dtype = interpreter._patch_lang, interpreter._get_np_dtype
    interpreter._patch_lang, interpreter._get_np_dtype = _patch_once, _np_dtype_once


def uninstall():
    """Give the interpreter its own _patch_lang and _get_np_dtype back."""
    global _original, _original_np_dtype
    if _original is None:
        return
    from triton.runtime import interpreter

    interpreter._patch_lang, interpreter._get_np_dtype = _original, _original_np_dtype
    _original = _original_np_dtype = None
