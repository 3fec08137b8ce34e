"""Compile every Triton kernel for an H100 (sm_90a) on a machine without a GPU.

Triton can lower a kernel all the way to a cubin for a target we name, without a
driver: triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)). From there the
NVIDIA tools shipped inside Triton's wheel tell us what the hardware would see:

* ptxas -v, as Triton runs it to make the cubin: registers per thread, bytes spilled to
  local memory, static shared memory. Triton prints that log only when asked
  (knobs.nvidia.dump_ptxas_log) and runs ptxas only on a cache miss, so compile_for_h100 asks
  for the log and for a compile that bypasses the cache; cuobjdump -res-usage on the cubin
  confirms the log describes the binary.
* the PTX's matmul instructions: wgmma.mma_async is what ptxas turns into HGMMA (the Hopper
  warpgroup tensor cores), mma.sync into HMMA (the Ampere-style fallback), fma.rn.f32 into
  FFMA (dots on the FMA units); ptxas never turns one into another. The SASS itself
  (cuobjdump -sass, about 0.4 CPU s a kernel whatever its size) is disassembled only when
  asked for (sass_dir), and its opcodes must then agree with the PTX's reading.
* Triton's metadata "shared": the dynamic shared memory the kernel will request.

Each op's kernels are described by a function -> list[KernelSpec] of kernels/specs.py,
generated from the op's launch planner so that every configuration the planner can pick is
compiled; SPEC_SOURCES names them, collect_specs() gathers them, and
`python -m kernels.report` / tests/test_h100_compile.py check them against
check_result()'s rules.

Compiles run where Triton's interpreter has never run: once a kernel has run interpreted
(TRITON_INTERPRET=1, how the CPU tests run), the interpreter leaves triton.language's
builtins patched for the rest of the process, and lowering any kernel that calls tl.zeros,
tl.sum, tl.max... then fails. compile_isolated() therefore compiles in a fresh Python
process without TRITON_INTERPRET (`python -m kernels.h100`), which imports the spec
factories by name; compile_for_h100() is the in-process step that process runs, and
refuses to run in an interpreted process.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import multiprocessing
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import triton
import triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

REPO = Path(__file__).resolve().parents[1]

# Where the compile check finds its specs: each op's function in kernels/specs.py (by name, since
# kernels.specs imports this module). A new op adds its function there and its name here.
SPEC_SOURCES = ("kernels.specs:attention_specs", "kernels.specs:layernorm_linear_specs",
                "kernels.specs:linear_residual_specs", "kernels.specs:layernorm_mlp_specs")

# Compute capability 9.0, 32 threads a warp. Triton turns capability 90 into "sm_90a",
# the variant with wgmma/TMA, which is what a real H100 gets at run time too.
H100_TARGET = GPUTarget("cuda", 90, 32)
H100_GPU_NAME = "sm_90a"

# The most shared memory one block may use on an H100 (cudaDevAttrMaxSharedMemoryPerBlockOptin
# = 232448 bytes: 228 KiB per SM less the 1 KiB the system reserves per block). Triton
# refuses to launch a kernel whose metadata "shared" exceeds the device's value.
SHARED_MEMORY_LIMIT = 227 * 1024

# The GPU machine's Triton (with torch 2.11 and Python 3.12 there). The compile check runs under
# it as well as under the Triton installed here: `make test` installs it alone into
# GPU_MACHINE_TRITON_DIR (pip install --no-deps --target), and compile_isolated(triton_dir=...)
# puts that directory ahead of the installed Triton on the compiling process's import path;
# torch and everything else still come from the running environment.
GPU_MACHINE_TRITON = "3.6.0"
GPU_MACHINE_TRITON_DIR = REPO / f".triton-{GPU_MACHINE_TRITON}"

# The launcher marks an argument 16-divisible when it is, and kernels are compiled
# for that. The hint changes the code a lot (vectorised 16-byte loads, cp.async, TMA),
# so leaving it out would report registers for a kernel that never runs.
_DIVISIBILITY_ATTR = [["tt.divisibility", 16]]


class ToolchainMissingError(RuntimeError):
    """ptxas or cuobjdump is not where Triton keeps them, or a Triton asked for is not installed."""


@dataclass
class KernelSpec:
    """One kernel at one configuration, as it would be launched on an H100.

    name, config: how the kernel shows up in the report and test ids; config is a short
        human string such as "BLOCK_M=64,BLOCK_N=64,HEAD_DIM=32". (name, config) must be
        unique across all specs.
    fn: the @triton.jit function (a triton.autotune / triton.heuristics wrapper around one
        is unwrapped). It must not be an interpreted kernel: see compile_isolated().
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
    instructions: what the kernel's matmuls must compile to, one of INSTRUCTION_CLASSES
        ("HGMMA", "HMMA", "FMA", "none"); matmul_instructions() derives it from the tiles.
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
    instructions: str
    divisible_by_16: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.instructions not in INSTRUCTION_CLASSES:
            raise ValueError(f"{self.name}[{self.config}]: instructions {self.instructions!r} is not one of "
                             f"{INSTRUCTION_CLASSES}")

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
    uses_ffma: bool = False  # fp32 fused multiply-adds in the SASS
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


def triton_missing_reason(triton_dir: Path | str) -> str | None:
    """Why compile_isolated(triton_dir=triton_dir) cannot run here, or None when it can."""
    if (Path(triton_dir) / "triton" / "__init__.py").is_file():
        return None
    return (f"no Triton in {triton_dir}: `make test` installs the GPU machine's there, as "
            f"`pip install --no-deps --target {triton_dir} triton=={GPU_MACHINE_TRITON}`")


# ---------------------------------------------------------------- what a spec declares


def launcher_specialization(value: int) -> str:
    """How Triton's launcher specializes an integer argument, and so which binary runs: "1"
    (compiled as the constant 1), "16k" (compiled knowing it is a multiple of 16, which can
    change vectorization and registers) or "plain"."""
    if value == 1:
        return "1"
    return "16k" if value % 16 == 0 else "plain"


# What a kernel's matmuls compile to on an H100, as a KernelSpec declares it:
#   HGMMA: Hopper's warpgroup MMA (wgmma), the full-rate tensor-core path;
#   HMMA: Ampere's mma.sync, which Triton falls back to for tiles wgmma cannot take;
#   HGMMA+HMMA: both, in a kernel with some dots of each kind (say 64-row main tiles and
#     a 16-row tail tile);
#   FMA: no tensor cores, dots on the FMA units (exact fp32, input_precision="ieee");
#   none: the kernel has no tl.dot.
INSTRUCTION_CLASSES = ("HGMMA", "HGMMA+HMMA", "HMMA", "FMA", "none")
# wgmma works on a warpgroup of 4 warps and 64 rows at a time.
_WGMMA_ROWS, _WARPGROUP = 64, 4


def matmul_instructions(operand_dtype: str, input_precision: str, dot_rows, num_warps: int) -> str:
    """The instruction class Triton picks for a kernel's tl.dot calls on sm_90a.

    operand_dtype: "fp16", "bf16" or "fp32"; input_precision: what fp32 dots ask for
    ("ieee" runs on the FMA units, "tf32" on tensor cores); dot_rows: the M side of every
    tl.dot in the kernel. wgmma needs whole warpgroups and M a multiple of 64; smaller tiles
    fall back to mma.sync, each dot on its own.
    """
    if operand_dtype == "fp32" and input_precision == "ieee":
        return "FMA"
    on_wgmma = [num_warps % _WARPGROUP == 0 and rows % _WGMMA_ROWS == 0 for rows in dot_rows]
    if all(on_wgmma):
        return "HGMMA"
    return "HGMMA+HMMA" if any(on_wgmma) else "HMMA"


# ------------------------------------------------------------------------- compilation


class InterpreterActiveError(RuntimeError):
    """A compile was asked of a process whose kernels run through Triton's interpreter."""


def compile_for_h100(spec: KernelSpec, sass_dir: Path | str | None = None) -> CompileResult:
    """Compile spec for sm_90a in this process and read registers, spills, shared memory and
    the matmul instructions.

    Writes the SASS to sass_dir/<name>__<config>.sass when sass_dir is given. Raises
    ToolchainMissingError without ptxas/cuobjdump, InterpreterActiveError when spec.fn is an
    interpreted kernel (use compile_isolated), ValueError for a malformed spec, and Triton's
    own errors when the kernel does not compile.
    """
    toolchain = find_toolchain()
    jit_function = unwrap_kernel(spec.fn)
    signature, constexprs, attrs = _triton_source_arguments(spec, jit_function)
    source = triton.compiler.ASTSource(fn=jit_function, signature=signature, constexprs=constexprs, attrs=attrs)
    ptxas_log = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(ptxas_log):
        knobs.nvidia.dump_ptxas_log = True  # make_cubin prints its ptxas -v log
        knobs.compilation.always_compile = True  # a cache hit would run no ptxas, so print no log
        compiled = triton.compile(source, target=H100_TARGET,
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    usage = parse_ptxas_log(ptxas_log.getvalue())
    cubin_registers = _cubin_registers(toolchain.cuobjdump, compiled.asm["cubin"])
    if cubin_registers != usage.registers:
        raise RuntimeError(f"{spec.label}: the ptxas log Triton printed says {usage.registers} registers but its "
                           f"cubin has {cubin_registers}; the log captured is not that of this kernel's ptxas run")
    ptx = compiled.asm["ptx"]
    uses = {opcode: _ptx_has_instruction(ptx, opcode) for opcode in _PTX_INSTRUCTIONS}
    sass_path = None
    if sass_dir is not None:
        sass = _disassemble(toolchain.cuobjdump, compiled.asm["cubin"])
        in_sass = {opcode: _sass_has_opcode(sass, opcode) for opcode in _PTX_INSTRUCTIONS}
        if in_sass != uses:
            raise RuntimeError(f"{spec.label}: the SASS's opcodes {in_sass} disagree with the PTX's {uses}; "
                               "_PTX_INSTRUCTIONS no longer describes what ptxas emits")
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
        uses_hgmma=uses["HGMMA"],
        uses_hmma=uses["HMMA"],
        uses_ffma=uses["FFMA"],
        sass_path=sass_path,
        stack_frame_bytes=usage.stack_frame_bytes,
    )


# Registers per thread at which a kernel is flagged in the report (not failed): close to the
# 255 a thread can have, so a compiler upgrade or a small change may start spilling.
REGISTER_WARNING = 240


def found_instructions(result: CompileResult) -> str:
    """The instruction class the SASS shows, in KernelSpec.instructions' terms."""
    if result.uses_hgmma:
        return "HGMMA+HMMA" if result.uses_hmma else "HGMMA"
    if result.uses_hmma:
        return "HMMA"
    return "FMA" if result.uses_ffma else "none"


def check_result(spec: KernelSpec, result: CompileResult) -> list[str]:
    """What makes this compiled kernel unfit for an H100, in words (empty when fine): spills,
    shared memory over the limit, or matmuls on another instruction class than declared."""
    problems = []
    if result.spills:
        problems.append(f"{result.spills} bytes of register spills ({result.registers} registers)")
    if result.shared_bytes > SHARED_MEMORY_LIMIT:
        problems.append(f"{result.shared_bytes} bytes of shared memory, over the H100's {SHARED_MEMORY_LIMIT}")
    found = found_instructions(result)
    # An FMA kernel may hold no FFMA when its dots were folded away; it must never hold tensor-core ops.
    expected = {spec.instructions} | ({"none"} if spec.instructions == "FMA" else set())
    if found not in expected:
        problems.append(f"matmuls compiled to {found}, declared {spec.instructions}")
    return problems


def unwrap_kernel(kernel) -> JITFunction:
    """The @triton.jit function inside triton.autotune / triton.heuristics wrappers."""
    # Both wrappers keep what they wrap in .fn; so does JITFunction (the raw Python
    # function), hence the type check first.
    while not isinstance(kernel, JITFunction) and hasattr(kernel, "fn") and not _is_interpreted(kernel):
        kernel = kernel.fn
    if _is_interpreted(kernel):
        raise InterpreterActiveError(
            f"{kernel.fn.__name__} was defined under TRITON_INTERPRET=1, and once the interpreter has run in a "
            "process Triton cannot lower kernels there; compile with compile_isolated() (a fresh process)")
    if not isinstance(kernel, JITFunction):
        raise TypeError(f"{kernel!r} is not a @triton.jit function")
    return kernel


def _is_interpreted(obj) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # a Triton without the interpreter
        return False
    return isinstance(obj, InterpretedFunction)


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


# The SASS opcode each PTX instruction of a matmul becomes on sm_90a, as a pattern on the PTX.
_PTX_INSTRUCTIONS = {"HGMMA": r"wgmma\.mma_async", "HMMA": r"mma\.sync", "FFMA": r"fma\.rn(?:\.ftz)?\.f32"}


def _ptx_has_instruction(ptx: str, opcode: str) -> bool:
    # PTX lines read "\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...}" or
    # "\tfma.rn.f32 %f3, %f1, %f2, %f3;": the instruction starts its line, maybe after a predicate "@%p1".
    return re.search(rf"^\s*(?:@!?%p\w+\s+)?{_PTX_INSTRUCTIONS[opcode]}\b", ptx, re.MULTILINE) is not None


def _sass_has_opcode(sass: str, opcode: str) -> bool:
    # SASS lines read "/*0a30*/   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], ..." possibly after
    # a predicate "@P0"; match the opcode as a whole word so HMMA does not match HGMMA.
    return re.search(rf"\*/\s+(?:@!?U?P\w+\s+)?{opcode}\b", sass) is not None


def _file_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)


# --------------------------------------------------------------------- collecting specs


def specs_from_source(source: str) -> list[KernelSpec]:
    """The specs a source declares: "package.module" (its h100_compile_specs()) or
    "package.module:function" (any function returning KernelSpecs). An error if it declares none."""
    module_name, _, function_name = source.partition(":")
    module = importlib.import_module(module_name)
    declare = getattr(module, function_name or "h100_compile_specs", None)
    if declare is None:
        raise LookupError(f"{module_name} defines no {function_name or 'h100_compile_specs'}(); every source in "
                          f"kernels.h100.SPEC_SOURCES must list its kernels for the H100 compile check")
    specs = list(declare())
    if not specs:
        raise LookupError(f"{source} returned no specs")
    for spec in specs:
        if not isinstance(spec, KernelSpec):
            raise TypeError(f"{source} returned {spec!r}, not a KernelSpec")
    return specs


def collect_specs(sources=SPEC_SOURCES) -> list[KernelSpec]:
    """Every spec of every source; raises when two specs share name and config."""
    specs = [spec for source in sources for spec in specs_from_source(source)]
    labels = [spec.label for spec in specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"kernel specs share name and config: {duplicates}")
    return specs


# -------------------------------------------------------------- compiling in a fresh process


@dataclass
class CompileOutcome:
    """One spec's compile in compile_isolated: its result and problems, or the error."""
    name: str
    config: str
    instructions: str  # declared
    num_warps: int
    num_stages: int
    seconds: float  # wall clock, which another job on the machine stretches
    triton: str  # the version of the Triton that compiled it
    cpu_seconds: float = 0.0  # the compile's own CPU time, ptxas's and cuobjdump's included
    result: CompileResult | None = None
    problems: list | None = None  # check_result's, when it compiled
    error: str | None = None  # type and message, when it did not
    # The spec whose compile produced this one's binary (both seconds are then 0), when another with
    # the same configuration_key came first.
    same_binary_as: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name}[{self.config}]"

    @property
    def ok(self) -> bool:
        return self.error is None and not self.problems


# Seconds after which compile_isolated gives up on its process: a hang guard only. Every
# configuration takes about 430 CPU seconds a Triton (kernels/README.md), half an hour of wall
# time on a busy 2-core machine.
COMPILE_HANG_GUARD = 4 * 3600


def compile_isolated(sources=SPEC_SOURCES, jobs: int | None = None, sass_dir: Path | str | None = None,
                     python_path=(), timeout: float = COMPILE_HANG_GUARD, triton_dir: Path | str | None = None) -> list[CompileOutcome]:
    """Compile every spec of `sources` (see specs_from_source) for sm_90a in a fresh Python
    process that has never run Triton's interpreter, `jobs` compiles at a time (default: one
    per CPU). python_path: extra import roots for the sources (the repository is always one).
    triton_dir: a directory holding another Triton (GPU_MACHINE_TRITON_DIR) to compile with,
    its ptxas and cuobjdump included; None: the installed one. Returns one outcome per spec,
    in the sources' order, each naming the Triton version that compiled it; specs with one
    configuration_key are compiled once (the later ones' outcomes name the first in
    same_binary_as). Raises when the process fails as a whole (a source that cannot be imported, a toolchain that is missing)."""
    if triton_dir is not None and triton_missing_reason(triton_dir) is not None:
        raise ToolchainMissingError(triton_missing_reason(triton_dir))
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    roots = ([] if triton_dir is None else [str(Path(triton_dir).resolve())]) + [str(REPO), *map(str, python_path)]
    if environment.get("PYTHONPATH"):
        roots.append(environment["PYTHONPATH"])
    environment["PYTHONPATH"] = os.pathsep.join(roots)
    with tempfile.TemporaryDirectory(prefix="h100_compile_") as workdir:
        output = Path(workdir) / "outcomes.json"
        command = [sys.executable, "-m", "kernels.h100", "--json", str(output), "--jobs", str(jobs or os.cpu_count() or 1)]
        if sass_dir is not None:
            command += ["--sass-dir", str(Path(sass_dir).resolve())]
        finished = subprocess.run(command + list(sources), env=environment, cwd=REPO, capture_output=True, text=True,
                                  timeout=timeout)
        if finished.returncode != 0 or not output.exists():
            raise RuntimeError(f"compiling {', '.join(sources)} in a fresh process failed "
                               f"({finished.returncode}):\n{finished.stderr[-4000:]}")
        records = json.loads(output.read_text())
    outcomes = []
    for record in records:
        result = record.pop("result")
        if result is not None:
            result["sass_path"] = Path(result["sass_path"]) if result["sass_path"] else None
            result = CompileResult(**result)
        outcomes.append(CompileOutcome(**record, result=result))
    return outcomes


def configuration_key(spec: KernelSpec) -> str:
    """What decides the binary Triton makes of spec: the kernel's source and everything it calls
    (JITFunction.cache_key), the arguments' types, constant values and divisibility, and the
    launch options. Two specs with one key compile to the same binary."""
    jit_function = unwrap_kernel(spec.fn)
    signature, constexprs, attrs = _triton_source_arguments(spec, jit_function)
    return repr((jit_function.cache_key, signature, sorted(constexprs.items()), sorted(attrs), spec.num_warps,
                 spec.num_stages))


_SPECS_TO_COMPILE: list[KernelSpec] = []  # the worker processes' share of main()'s specs (fork)


def _cpu_seconds() -> float:
    """CPU time of this process and of the tools it has run and waited for."""
    own, tools = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + tools.ru_utime + tools.ru_stime


def _compile_one(index: int, sass_dir: str | None) -> tuple[CompileResult | None, str | None, float, float]:
    """(result, None, seconds, CPU seconds), or (None, the error in one line, seconds, CPU seconds)."""
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    result, error = None, None
    try:
        result = compile_for_h100(_SPECS_TO_COMPILE[index], sass_dir=sass_dir)
    except ToolchainMissingError:
        raise
    except Exception as exception:  # a kernel that does not compile is an outcome, not the end of the run
        lines = [line for line in str(exception).strip().splitlines() if line.strip()]
        error = f"{type(exception).__name__}: {lines[0] if lines else ''}"
    return result, error, round(time.perf_counter() - started, 2), round(_cpu_seconds() - cpu_started, 2)


def _record(spec: KernelSpec, compiled: tuple, same_binary_as: str | None) -> dict:
    """One spec's CompileOutcome fields, as JSON, from its configuration's compile."""
    result, error, seconds, cpu_seconds = compiled
    record = {"name": spec.name, "config": spec.config, "instructions": spec.instructions,
              "num_warps": spec.num_warps, "num_stages": spec.num_stages, "triton": triton.__version__,
              "seconds": 0.0 if same_binary_as else seconds, "cpu_seconds": 0.0 if same_binary_as else cpu_seconds,
              "same_binary_as": same_binary_as,
              "result": None, "problems": None, "error": error}
    if result is not None:
        # The result names the spec that compiled it; the declared instructions are this spec's.
        result = CompileResult(**{**asdict(result), "name": spec.name, "config": spec.config})
        record["result"] = {**asdict(result), "sass_path": str(result.sass_path) if result.sass_path else None}
        record["problems"] = check_result(spec, result)
    return record


def main(argv: list[str] | None = None) -> int:
    """`python -m kernels.h100 --json OUT [--jobs N] [--sass-dir DIR] SOURCE...`: what
    compile_isolated runs. Writes one record per spec to OUT."""
    parser = argparse.ArgumentParser(prog="python -m kernels.h100", description=main.__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", help='"package.module" or "package.module:function"')
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--sass-dir", default=None)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: kernels would be defined interpreted and could not be lowered")
    find_toolchain()  # fail once, clearly, rather than once per spec
    specs = collect_specs(args.sources)
    first_with_key: dict[str, int] = {}  # configuration_key -> the first spec with it
    firsts = [first_with_key.setdefault(configuration_key(spec), index) for index, spec in enumerate(specs)]
    to_compile = sorted(first_with_key.values())
    _SPECS_TO_COMPILE[:] = specs
    if args.jobs > 1:
        # Forked workers inherit the specs; nothing here has touched a GPU or started threads.
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            compiled = pool.starmap(_compile_one, [(index, args.sass_dir) for index in to_compile], chunksize=1)
    else:
        compiled = [_compile_one(index, args.sass_dir) for index in to_compile]
    by_index = dict(zip(to_compile, compiled))
    records = [_record(spec, by_index[first], None if first == index else specs[first].label)
               for index, (spec, first) in enumerate(zip(specs, firsts))]
    args.json.write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    # Run as kernels.h100, not __main__, so that the specs the op modules build are instances of
    # this module's KernelSpec.
    from kernels.h100 import main as module_main
    sys.exit(module_main())
