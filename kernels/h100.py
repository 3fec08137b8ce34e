"""Compile every Triton kernel for an H100 (sm_90a) on a machine without a GPU.

Triton can lower a kernel all the way to a cubin for a target we name, without a
driver: triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)). From there the
NVIDIA tools shipped inside Triton's wheel tell us what the hardware would see:

* ptxas -v on the PTX: registers per thread, bytes spilled to local memory, static
  shared memory. We re-run ptxas ourselves with the flags Triton's own make_cubin uses,
  because Triton only prints that log on a cache miss and never keeps it.
* cuobjdump -sass on Triton's cubin: HGMMA instructions mean the Hopper warpgroup tensor
  cores (wgmma) are used; HMMA alone means a matmul fell back to Ampere-style mma.sync.
* Triton's metadata "shared": the dynamic shared memory the kernel will request.

Each op module listed in OP_MODULES describes its kernels by a function
h100_compile_specs() -> list[KernelSpec]; all_specs() collects them, and
`python -m kernels.report` / tests/test_h100_compile.py check them.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import re
import subprocess
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import triton
import triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

# Every module here must define h100_compile_specs() once it exists. A new op module is
# added to this one tuple and nothing else.
OP_MODULES = ("kernels.attention", "kernels.layernorm_mlp")

# Compute capability 9.0, 32 threads a warp. Triton turns capability 90 into "sm_90a",
# the variant with wgmma/TMA, which is what a real H100 gets at run time too.
H100_TARGET = GPUTarget("cuda", 90, 32)
H100_GPU_NAME = "sm_90a"

# The most shared memory one block may use on an H100 (cudaDevAttrMaxSharedMemoryPerBlockOptin
# = 232448 bytes: 228 KiB per SM less the 1 KiB the system reserves per block). Triton
# refuses to launch a kernel whose metadata "shared" exceeds the device's value.
SHARED_MEMORY_LIMIT = 227 * 1024

# The launcher marks an argument 16-divisible when it is, and kernels are compiled
# for that. The hint changes the code a lot (vectorised 16-byte loads, cp.async, TMA),
# so leaving it out would report registers for a kernel that never runs.
_DIVISIBILITY_ATTR = [["tt.divisibility", 16]]


class ToolchainMissingError(RuntimeError):
    """ptxas or cuobjdump is not where Triton keeps them."""


@dataclass
class KernelSpec:
    """One kernel at one configuration, as it would be launched on an H100.

    name, config: how the kernel shows up in the report and test ids; config is a short
        human string such as "BLOCK_M=64,BLOCK_N=64,HEAD_DIM=32". (name, config) must be
        unique across all specs.
    fn: the @triton.jit function (a triton.autotune / triton.heuristics wrapper around one
        is unwrapped). Works whether or not TRITON_INTERPRET=1 is set; see compilable().
    signature: every runtime argument of fn, name -> Triton type string, e.g.
        {"x_ptr": "*bf16", "out_ptr": "*fp32", "n_rows": "i32", "eps": "fp32"}.
        Types: "*bf16", "*fp16", "*fp32", "*i32", "*i64" (pointers), "i1", "i32", "i64",
        "u32", "fp32", ... (whatever triton.language.str_to_ty accepts).
    constexprs: every tl.constexpr argument of fn, name -> Python value, e.g.
        {"BLOCK_M": 64, "HEAD_DIM": 32, "IS_CAUSAL": False}.
        - Constexpr arguments need NOT appear in `signature`. Triton 3.8's ASTSource wants
          them there as "constexpr", in parameter order; compile_for_h100 adds those
          entries itself (writing them as "constexpr" yourself is accepted too).
        - A constexpr argument with a default in the Python signature may be left out;
          its default is used. (Raw Triton 3.8 does not do this: an omitted constexpr is a
          cryptic "'NoneType' object has no attribute '_unflatten_ir'".)
        - A runtime argument may instead be pinned to a constant by putting it here and
          not in `signature` (the launcher does this for integer arguments equal to 1).
        Every argument of fn must be in exactly one of the two dicts.
    num_warps, num_stages: the launch options, as passed to the kernel at run time.
    uses_matmul: the kernel calls tl.dot, so on an H100 it must use HGMMA (wgmma).
    divisible_by_16: the arguments the launcher would see as multiples of 16 (pointers
        to 16-byte-aligned data, integer strides/sizes like 384). None means "every pointer
        argument", which holds for tensors torch allocates; name integer arguments too when
        they always are multiples of 16 (e.g. a row stride of dim=384), () for none.
    """

    name: str
    config: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    uses_matmul: bool
    divisible_by_16: tuple[str, ...] | None = None

    @property
    def label(self) -> str:
        return f"{self.name}[{self.config}]"


@dataclass
class CompileResult:
    name: str
    config: str
    registers: int  # per thread
    spills: int  # bytes of spill stores + spill loads, summed over the kernel's functions
    shared_bytes: int  # dynamic (Triton's) + static shared memory per block
    uses_hgmma: bool  # Hopper warpgroup MMA in the SASS
    sass_path: Path | None  # where the SASS was written, if a directory was given
    uses_hmma: bool = False  # Ampere-style mma.sync in the SASS (what a matmul falls back to)
    stack_frame_bytes: int = 0

    @property
    def label(self) -> str:
        return f"{self.name}[{self.config}]"


# --------------------------------------------------------------------------- toolchain


@dataclass(frozen=True)
class Toolchain:
    ptxas: Path
    cuobjdump: Path


def find_toolchain() -> Toolchain:
    """ptxas and cuobjdump as Triton itself finds them (TRITON_PTXAS_PATH etc., else the wheel's bin/)."""
    found = {}
    for tool_name in ("ptxas", "cuobjdump"):
        try:
            found[tool_name] = Path(getattr(knobs.nvidia, tool_name).path)
        except RuntimeError as error:  # knobs raise "Cannot find ptxas" when neither path runs
            wheel_bin = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
            raise ToolchainMissingError(
                f"{tool_name} is missing: Triton's wheel should ship it in {wheel_bin} "
                f"(or set TRITON_{tool_name.upper()}_PATH). Without it kernels cannot be "
                f"compiled for an H100. ({error})") from error
    return Toolchain(**found)


def toolchain_missing_reason() -> str | None:
    """Why compile_for_h100 cannot run here, or None when it can."""
    try:
        find_toolchain()
    except ToolchainMissingError as error:
        return str(error)
    return None


# ------------------------------------------------------------- interpreter-mode kernels


def unwrap_kernel(kernel):
    """The @triton.jit function inside triton.autotune / triton.heuristics wrappers."""
    # Both wrappers keep what they wrap in .fn; so does JITFunction (the raw Python
    # function), hence the type checks first.
    while not isinstance(kernel, JITFunction) and not _is_interpreted(kernel) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    if not isinstance(kernel, JITFunction) and not _is_interpreted(kernel):
        raise TypeError(f"{kernel!r} is not a @triton.jit function")
    return kernel


def _is_interpreted(obj) -> bool:
    # Imported lazily: nothing else here needs the interpreter (or numpy).
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(obj, InterpretedFunction)


@contextlib.contextmanager
def compilable(kernel):
    """Yield a JITFunction for kernel that triton.compile can lower, in either mode.

    Without TRITON_INTERPRET this is just the kernel. With TRITON_INTERPRET=1 (how the
    test suite runs) every @triton.jit in the process was made an InterpretedFunction,
    and that includes triton.language's own library (tl.zeros, tl.sum, tl.max,
    tl.softmax, tensor methods like x.sum() ... are @jit functions in
    triton/language/standard.py). The compiler calls an InterpretedFunction it meets as
    plain Python, which runs the interpreter's numpy code on IR values and fails.

    So for the duration of the block, every InterpretedFunction the kernel can reach is
    replaced, where it is referenced, by a JITFunction built from the same Python
    function: in the globals and closure cells of the kernel and its helpers, in modules
    those globals name (so `helpers.softmax(...)` works), in every triton.language
    module, and among tl.tensor's methods. Everything is put back on exit, so the
    interpreter works as before. Not thread-safe against the interpreter running kernels
    concurrently in the same process.
    """
    kernel = unwrap_kernel(kernel)
    if isinstance(kernel, JITFunction):
        yield kernel
        return
    swap = _InterpretedToJit()
    try:
        for module_name, module in list(sys.modules.items()):
            if module_name.startswith("triton.language") and module is not None:
                swap.module_attributes(module)
        swap.tensor_methods()
        yield swap.function(kernel)
    finally:
        swap.restore()


# JITFunction twins of InterpretedFunctions, made once per function for the process. The
# InterpretedFunction is kept alive with its twin so that its id() cannot be reused.
_jit_twins: dict[int, tuple[Any, JITFunction]] = {}


def _jit_twin(interpreted) -> JITFunction:
    entry = _jit_twins.get(id(interpreted))
    if entry is None:
        # Same keyword arguments (do_not_specialize, debug, noinline, ...) as @triton.jit got.
        entry = (interpreted, JITFunction(interpreted.fn, **interpreted.kwargs))
        _jit_twins[id(interpreted)] = entry
    return entry[1]


class _InterpretedToJit:
    """Swaps InterpretedFunctions for their JITFunction twins and remembers how to undo it."""

    def __init__(self):
        self._undo: list[Callable[[], None]] = []
        self._visited: set[int] = set()

    def function(self, interpreted) -> JITFunction:
        """The twin of interpreted, with everything its body refers to swapped too."""
        twin = _jit_twin(interpreted)
        raw = interpreted.fn
        if id(raw) not in self._visited:
            self._visited.add(id(raw))
            # The twin compiles the same function object, so it sees these very globals.
            self._namespace(raw.__globals__)
            for cell in raw.__closure__ or ():
                self._cell(cell)
        return twin

    def module_attributes(self, module: types.ModuleType):
        if id(module) in self._visited:
            return
        self._visited.add(id(module))
        for name, value in list(vars(module).items()):
            if _is_interpreted(value):
                self._set(vars(module), name, self.function(value))

    def tensor_methods(self):
        # Under the interpreter, triton.language.core._tensor_member_fn attaches a plain
        # wrapper closing over the InterpretedFunction (for a JITFunction it attaches the
        # function itself, which is what the compiler expects).
        for name, method in list(vars(tl.tensor).items()):
            wrapped = [cell.cell_contents for cell in getattr(method, "__closure__", None) or ()
                       if _is_interpreted(_cell_contents(cell))]
            if wrapped:
                self._setattr(tl.tensor, name, self.function(wrapped[0]))

    def restore(self):
        while self._undo:
            self._undo.pop()()

    def _namespace(self, namespace: dict):
        if id(namespace) in self._visited:
            return
        self._visited.add(id(namespace))
        for name, value in list(namespace.items()):
            if _is_interpreted(value):
                self._set(namespace, name, self.function(value))
            elif isinstance(value, types.ModuleType):
                self.module_attributes(value)

    def _cell(self, cell):
        contents = _cell_contents(cell)
        if _is_interpreted(contents):
            twin = self.function(contents)
            cell.cell_contents = twin
            self._undo.append(lambda: setattr(cell, "cell_contents", contents))

    def _set(self, namespace: dict, name: str, value):
        original = namespace[name]
        namespace[name] = value
        self._undo.append(lambda: namespace.__setitem__(name, original))

    def _setattr(self, owner, name: str, value):
        original = vars(owner)[name]
        setattr(owner, name, value)
        self._undo.append(lambda: setattr(owner, name, original))


def _cell_contents(cell):
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell: a name assigned after the closure was made
        return None


# ------------------------------------------------------------------------- compilation


def compile_for_h100(spec: KernelSpec, sass_dir: Path | str | None = None) -> CompileResult:
    """Compile spec for sm_90a and read registers, spills, shared memory and tensor-core use.

    Writes the SASS to sass_dir/<name>__<config>.sass when sass_dir is given. Raises
    ToolchainMissingError without ptxas/cuobjdump, ValueError for a malformed spec, and
    Triton's own errors when the kernel does not compile.
    """
    toolchain = find_toolchain()
    with compilable(spec.fn) as jit_function:
        signature, constexprs, attrs = _triton_source_arguments(spec, jit_function)
        source = triton.compiler.ASTSource(fn=jit_function, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(source, target=H100_TARGET,
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})

    usage = _ptxas_resource_usage(toolchain.ptxas, compiled.asm["ptx"], compiled.metadata)
    cubin_registers = _cubin_registers(toolchain.cuobjdump, compiled.asm["cubin"])
    if cubin_registers != usage.registers:
        # Our ptxas run must reproduce Triton's, or its spill figures describe another binary.
        raise RuntimeError(f"{spec.label}: re-running ptxas gave {usage.registers} registers but Triton's cubin "
                           f"has {cubin_registers}; _ptxas_resource_usage no longer uses make_cubin's flags")
    sass = _disassemble(toolchain.cuobjdump, compiled.asm["cubin"])
    sass_path = None
    if sass_dir is not None:
        sass_path = Path(sass_dir) / f"{_file_safe(spec.name)}__{_file_safe(spec.config)}.sass"
        sass_path.parent.mkdir(parents=True, exist_ok=True)
        sass_path.write_text(sass)

    return CompileResult(
        name=spec.name,
        config=spec.config,
        registers=usage.registers,
        spills=usage.spill_store_bytes + usage.spill_load_bytes,
        # Triton's kernels use dynamic shared memory ("shared"); a static .shared array
        # would show up in ptxas's smem instead. A block needs both.
        shared_bytes=(compiled.metadata.shared or 0) + usage.static_shared_bytes,
        uses_hgmma=_sass_has_opcode(sass, "HGMMA"),
        uses_hmma=_sass_has_opcode(sass, "HMMA"),
        sass_path=sass_path,
        stack_frame_bytes=usage.stack_frame_bytes,
    )


def _triton_source_arguments(spec: KernelSpec, jit_function: JITFunction):
    """spec's signature/constexprs in the form Triton 3.8's ASTSource takes, checked against fn."""
    parameters = inspect.signature(jit_function.fn).parameters
    known = set(parameters)
    unknown = (set(spec.signature) | set(spec.constexprs)) - known
    if unknown:
        raise ValueError(f"{spec.label}: {sorted(unknown)} are not arguments of {jit_function.__name__}{tuple(parameters)}")

    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    for name, parameter in parameters.items():
        is_constexpr = "constexpr" in str(parameter.annotation)
        declared_type = spec.signature.get(name)
        if name in spec.constexprs:
            if declared_type not in (None, "constexpr"):
                raise ValueError(f"{spec.label}: {name} is in constexprs and typed {declared_type!r} in signature")
            signature[name] = "constexpr"
            constexprs[name] = spec.constexprs[name]
        elif is_constexpr:
            if declared_type not in (None, "constexpr"):
                raise ValueError(f"{spec.label}: {name} is a tl.constexpr argument; give its value in constexprs, "
                                 f"not the type {declared_type!r} in signature")
            if parameter.default is inspect.Parameter.empty:
                raise ValueError(f"{spec.label}: constexpr argument {name} needs a value in constexprs")
            signature[name] = "constexpr"
            constexprs[name] = parameter.default
        elif declared_type is None or declared_type == "constexpr":
            raise ValueError(f"{spec.label}: runtime argument {name} needs a type in signature "
                             f"(e.g. '*bf16', 'i32', 'fp32') or a value in constexprs")
        else:
            try:
                tl.str_to_ty(declared_type, None)
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{spec.label}: {name} has type {declared_type!r}, which Triton does not know; "
                                 "use e.g. '*bf16', '*fp32', 'i32', 'i64', 'fp32'") from None
            signature[name] = declared_type

    if spec.divisible_by_16 is None:
        divisible = [name for name, ty in signature.items() if ty.startswith("*")]
    else:
        divisible = list(spec.divisible_by_16)
        not_runtime = [name for name in divisible if signature.get(name, "constexpr") == "constexpr"]
        if not_runtime:
            raise ValueError(f"{spec.label}: divisible_by_16 names {not_runtime}, which are not runtime arguments")
    argument_index = {name: index for index, name in enumerate(parameters)}
    attrs = {(argument_index[name], ): _DIVISIBILITY_ATTR for name in divisible}
    return signature, constexprs, attrs


@dataclass(frozen=True)
class _PtxasUsage:
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_frame_bytes: int
    static_shared_bytes: int


def _ptxas_resource_usage(ptxas: Path, ptx: str, metadata) -> _PtxasUsage:
    """Assemble the PTX again with -v and the flags of Triton's make_cubin, and parse the log."""
    command = [str(ptxas), "-lineinfo", "-v", "--regAllocOptLevel=2"]
    if not metadata.enable_fp_fusion:
        command.append("--fmad=false")
    if metadata.ptx_options:
        command += metadata.ptx_options.split(" ")
    with tempfile.TemporaryDirectory(prefix="h100_ptxas_") as workdir:
        ptx_path = Path(workdir) / "kernel.ptx"
        ptx_path.write_text(ptx)
        command += [f"--gpu-name={H100_GPU_NAME}", str(ptx_path), "-o", str(Path(workdir) / "kernel.cubin")]
        finished = subprocess.run(command, capture_output=True, text=True)
    log = finished.stdout + finished.stderr
    if finished.returncode != 0:
        raise RuntimeError(f"ptxas failed on {metadata.name} ({finished.returncode}):\n{log}")
    return parse_ptxas_log(log)


def parse_ptxas_log(log: str) -> _PtxasUsage:
    """Registers of the entry function and spills summed over every function ptxas reports.

    The log looks like:
        ptxas info    : Function properties for mm
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 72 registers, used 1 barriers, 16 bytes smem, ...
    A noinline helper gets its own "Function properties" line; its spills count too.
    """
    registers = [int(count) for count in re.findall(r"Used (\d+) registers", log)]
    if len(registers) != 1:
        raise RuntimeError(f"expected one entry function in the ptxas log, found {len(registers)}:\n{log}")
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not frames:
        raise RuntimeError(f"no spill figures in the ptxas log:\n{log}")
    static_shared = re.search(r"(\d+) bytes smem", log)
    return _PtxasUsage(
        registers=registers[0],
        spill_store_bytes=sum(int(stores) for _, stores, _ in frames),
        spill_load_bytes=sum(int(loads) for _, _, loads in frames),
        stack_frame_bytes=max(int(frame) for frame, _, _ in frames),
        static_shared_bytes=int(static_shared.group(1)) if static_shared else 0,
    )


def _cuobjdump(cuobjdump: Path, option: str, cubin: bytes) -> str:
    with tempfile.TemporaryDirectory(prefix="h100_cuobjdump_") as workdir:
        cubin_path = Path(workdir) / "kernel.cubin"
        cubin_path.write_bytes(cubin)
        # cuobjdump warns on stderr about the ELF flavour; the report is on stdout.
        finished = subprocess.run([str(cuobjdump), option, str(cubin_path)], capture_output=True, text=True)
    if finished.returncode != 0:
        raise RuntimeError(f"cuobjdump {option} failed ({finished.returncode}):\n{finished.stderr}")
    return finished.stdout


def _disassemble(cuobjdump: Path, cubin: bytes) -> str:
    sass = _cuobjdump(cuobjdump, "-sass", cubin)
    if "Function :" not in sass:
        raise RuntimeError(f"cuobjdump -sass printed no function:\n{sass}")
    return sass


def _cubin_registers(cuobjdump: Path, cubin: bytes) -> int:
    """Registers per thread recorded in the cubin ("REG:72 STACK:0 SHARED:1024 ...")."""
    usage = _cuobjdump(cuobjdump, "-res-usage", cubin)
    registers = re.search(r"\bREG:(\d+)", usage)
    if registers is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no register count:\n{usage}")
    return int(registers.group(1))


def _sass_has_opcode(sass: str, opcode: str) -> bool:
    # SASS lines read "/*0a30*/   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], ..." possibly after
    # a predicate "@P0"; match the opcode as a whole word so HMMA does not match HGMMA.
    return re.search(rf"\*/\s+(?:@!?U?P\w+\s+)?{opcode}\b", sass) is not None


def _file_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)


# --------------------------------------------------------------------- collecting specs


def op_module_exists(module_name: str) -> bool:
    return importlib.util.find_spec(module_name) is not None


def specs_from_module(module_name: str) -> list[KernelSpec]:
    """The specs an existing op module declares; an error if it declares none."""
    module = importlib.import_module(module_name)
    declare = getattr(module, "h100_compile_specs", None)
    if declare is None:
        raise LookupError(f"{module_name} defines no h100_compile_specs(); every op module in "
                          f"kernels.h100.OP_MODULES must list its kernels for the H100 compile check")
    specs = list(declare())
    if not specs:
        raise LookupError(f"{module_name}.h100_compile_specs() returned no specs")
    for spec in specs:
        if not isinstance(spec, KernelSpec):
            raise TypeError(f"{module_name}.h100_compile_specs() returned {spec!r}, not a KernelSpec")
    return specs


def missing_op_modules() -> list[str]:
    """Op modules in OP_MODULES that are not written yet."""
    return [name for name in OP_MODULES if not op_module_exists(name)]


def all_specs() -> list[KernelSpec]:
    """Every spec of every op module that exists (see missing_op_modules for the rest).

    Raises when an existing module declares no specs, or two specs share name and config.
    """
    specs = [spec for name in OP_MODULES if op_module_exists(name) for spec in specs_from_module(name)]
    labels = [spec.label for spec in specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"kernel specs share name and config: {duplicates}")
    return specs
