"""Compiling the Triton kernels for GPUs that are not there: ahead-of-time checks for sm_80 and sm_90.

Lesson
------
Motivation. The kernels in this folder are tested in Triton's interpreter (numpy on the CPU), which
checks their arithmetic but not that they compile: the interpreter never builds the GPU program, so a
kernel could use an operation with no lowering for Hopper, need more shared memory than an A100 has, or
spill registers to slow local memory, and no CPU test would notice. Compiling does not need a GPU. The
triton wheel carries the whole tool chain, Python AST -> Triton IR (ttir) -> GPU IR (ttgir) -> LLVM IR
-> PTX -> cubin (through the `ptxas` binary it ships), and `triton.compile` accepts a made-up target:

    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    src = ASTSource(fn=kernel, signature={"x_ptr": "*bf16", "n": "i32", "BLOCK": "constexpr"},
                    constexprs={"BLOCK": 128}, attrs={(0,): [["tt.divisibility", 16]]})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    compiled.asm["ptx"], compiled.asm["cubin"], compiled.metadata.shared

What a compile case is. At run time Triton compiles one program per *specialization*: the pointer
dtypes, the values of every tl.constexpr argument (tile sizes, flags, dtypes for tl.dot), the launch
options (num_warps, num_stages, enable_fp_fusion) and, for integers and pointers, whether they are
multiples of 16 (the "tt.divisibility" attribute that lets loads vectorize). A `CompileCase` names one
such specialization. Each kernel module lists its cases in `aot_cases()`:

    every autotuning config (or the fixed launch config) x every dtype the launcher accepts,
    at the default quantization (blocksize 64, double quantization, with bias),
    plus each other constexpr value (blocksizes, no double quantization, no bias) on one or more configs.

Pointers are marked 16-byte aligned (torch allocations are) and the size arguments multiples of 16 (every
model shape here is), except the row count M, which is compiled without the hint (its general form).

Which kernels. `entry_kernels()` imports every module in this folder and lists the module-level
@triton.jit functions that no other @triton.jit function calls: those are launched from Python, the others
(nf4_decode_tile, ...) are device functions compiled inside their callers. tests/test_aot_compile.py fails
when an entry kernel has no case, so a new kernel cannot be forgotten.

What is recorded. ptxas' verbose report (`-v`, which Triton always passes; we capture it with
knobs.nvidia.dump_ptxas_log) gives registers per thread, spill stores/loads and the stack frame; the
compiled metadata gives the shared memory Triton allocates. Limits, per thread block (CUDA C Programming
Guide, "Technical Specifications per Compute Capability"):

    registers per thread          255 (beyond that the compiler spills to local memory, i.e. DRAM/L1)
    shared memory per block       sm_80 (A100): 163 KB = 166,912 B;  sm_90 (H100/H200): 227 KB = 232,448 B

Time. One compile takes 0.5-3 s (the Python front end and MLIR passes, then ptxas), and there are a few
hundred cases per target. So `compile_all` runs the cases in a process pool and keeps each result as a
small JSON file under build/aot-cache/ (git-ignored), named by a hash of the kernel's source (Triton's
JITFunction.cache_key covers the kernel and every @triton.jit function and global it uses, and the line
each function starts on), the case and the Triton version. A fresh clone compiles everything; a later run
recompiles only kernels whose source changed or moved: even a line added to a docstring above a kernel
shifts its starting line, and so recompiles it. Failed compiles are never cached.

Workers run in fresh processes with TRITON_INTERPRET unset: under the interpreter `@triton.jit` returns
an InterpretedFunction, which cannot be compiled, and the test session sets TRITON_INTERPRET=1.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .triton_support import DTYPE_NAMES, config_label  # noqa: F401 - the kernel modules' aot_cases use them

PACKAGE = "minift.kernels"
KERNELS_DIR = Path(__file__).resolve().parent
NOT_KERNEL_MODULES = {"__init__", "aot", "triton_support", "nf4_codes", "spilling_configs"}  # no @triton.jit functions
TARGETS = {"sm_80": 80, "sm_90": 90}
SHARED_MEMORY_LIMIT = {"sm_80": 166_912, "sm_90": 232_448}  # bytes per block (opt-in), CUDA guide table
MAX_REGISTERS = 255
DEFAULT_CACHE = KERNELS_DIR.parent / "build" / "aot-cache"


@dataclass(frozen=True)
class CompileCase:
    """One specialization of one kernel: what `triton.compile` needs, as plain data (picklable)."""

    module: str  # kernel module name inside minift.kernels, e.g. "nf4_matmul_kernel"
    kernel: str  # the @triton.jit function's name in that module
    config: str  # human-readable: "BLOCK_N=128 BLOCK_M=128 BLOCK_K=64 w8 s3"
    dtype: str  # the activation / output dtype this case is for: fp32, fp16, bf16
    pointers: dict = field(default_factory=dict)  # pointer argument -> Triton type string ("*bf16")
    constexprs: dict = field(default_factory=dict)  # constexpr argument -> value ("tl.bfloat16" for dtypes)
    num_warps: int = 4
    num_stages: int = 3
    enable_fp_fusion: bool = True
    unaligned: tuple = ("M",)  # integer arguments compiled without the multiple-of-16 hint
    scalars: dict = field(default_factory=dict)  # non-pointer arguments that are not i32 ("fp32", "i64")
    variant: str = "default"  # which axis this case varies beyond configs x dtypes ("blocksize 32", ...)

    def key(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if v != {} or k != "scalars"}  # no scalars: older keys
        return json.dumps(fields, sort_keys=True, default=str)


def pointer_type(dtype) -> str:
    """torch dtype -> Triton pointer type string ("*bf16")."""
    return "*" + DTYPE_NAMES[str(dtype)]


# --------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------


def kernel_module_names() -> list[str]:
    """Every Python module in kernels/ that may define @triton.jit functions."""
    return sorted(p.stem for p in KERNELS_DIR.glob("*.py") if p.stem not in NOT_KERNEL_MODULES)


def _is_jit(obj) -> bool:
    return type(obj).__name__ in ("JITFunction", "InterpretedFunction")


def jit_functions() -> dict[str, tuple[str, object]]:
    """'module.name' -> (module name, function) for every @triton.jit function defined in kernels/."""
    found = {}
    for module_name in kernel_module_names():
        module = importlib.import_module(f"{PACKAGE}.{module_name}")
        for name, obj in vars(module).items():
            if _is_jit(obj) and obj.fn.__module__ == module.__name__:
                found[f"{module_name}.{name}"] = (module_name, obj)
    return found


def entry_kernels() -> list[str]:
    """'module.name' of every @triton.jit function that no other @triton.jit function calls."""
    functions = jit_functions()
    called = set()
    for _, fn in functions.values():
        for name in fn.fn.__code__.co_names:  # global names the body uses (helpers it calls among them)
            target = fn.fn.__globals__.get(name)
            if _is_jit(target) and target is not fn:
                called.add(id(target))
    return sorted(key for key, (_, fn) in functions.items() if id(fn) not in called)


def all_cases() -> list[CompileCase]:
    """The compile cases of every kernel module that defines aot_cases()."""
    cases = []
    for module_name in kernel_module_names():
        module = importlib.import_module(f"{PACKAGE}.{module_name}")
        if hasattr(module, "aot_cases"):
            cases += module.aot_cases()
    return cases


# --------------------------------------------------------------------------------------------------
# Compiling one case (in a worker process without TRITON_INTERPRET)
# --------------------------------------------------------------------------------------------------

_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def parse_ptxas_log(log: str) -> dict:
    """Registers, stack frame and spill bytes from ptxas -v output (one entry function)."""
    out = {}
    for name, pattern in _PTXAS.items():
        match = pattern.search(log)
        out[name] = int(match.group(1)) if match else None
    return out


def _kernel_function(case: CompileCase):
    module = importlib.import_module(f"{PACKAGE}.{case.module}")
    fn = getattr(module, case.kernel)
    if type(fn).__name__ != "JITFunction":
        raise RuntimeError(f"{case.module}.{case.kernel} is a {type(fn).__name__}: compile in a process "
                           "started without TRITON_INTERPRET=1 (compile_all does)")
    return fn


def _source(case: CompileCase):
    import triton.language as tl
    from triton.compiler import ASTSource

    fn = _kernel_function(case)
    constexprs = {k: getattr(tl, v[3:]) if isinstance(v, str) and v.startswith("tl.") else v
                  for k, v in case.constexprs.items()}
    signature, attrs = {}, {}
    for index, param in enumerate(fn.params):
        name = param.name
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in case.pointers:
            signature[name] = case.pointers[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = case.scalars.get(name, "i32")
            if signature[name] in ("i32", "i64") and name not in case.unaligned:
                attrs[(index,)] = [["tt.divisibility", 16]]
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise ValueError(f"{case.module}.{case.kernel}: compile case gives no value for constexpr {missing}")
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def cache_key(case: CompileCase, target: str) -> str:
    import triton

    digest = hashlib.sha256()
    digest.update(f"{triton.__version__}|{target}|{_source(case).hash()}|{case.key()}".encode())
    return digest.hexdigest()[:32]


def compile_case(case: CompileCase, target: str) -> dict:
    """Compile `case` for `target` ('sm_80' / 'sm_90'); returns the static report (never raises)."""
    import triton
    from triton.backends.compiler import GPUTarget

    report = dict(module=case.module, kernel=case.kernel, config=case.config, dtype=case.dtype, variant=case.variant,
                  target=target, ok=False, error=None)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v output, printed: we capture it
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(_source(case), target=GPUTarget("cuda", TARGETS[target], 32),
                                      options=dict(num_warps=case.num_warps, num_stages=case.num_stages,
                                                   enable_fp_fusion=case.enable_fp_fusion))
        ptx = compiled.asm["ptx"]
        resources = parse_ptxas_log(log.getvalue())
        if resources["registers"] is None:  # a hit in Triton's own cache skips ptxas: ask ptxas ourselves
            resources = parse_ptxas_log(run_ptxas(ptx, TARGETS[target], case.enable_fp_fusion))
        report.update(ok=True, shared=int(compiled.metadata.shared), cubin_bytes=len(compiled.asm["cubin"]),
                      wgmma="wgmma.mma_async" in ptx, mma="mma.sync" in ptx, **resources)
    except Exception as error:  # noqa: BLE001 - a compile error is a result to report, not a crash
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        report["error"] = f"{type(error).__name__}: " + " | ".join(lines[-6:])[:1500]
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report


def run_ptxas(ptx: str, capability: int, enable_fp_fusion: bool) -> str:
    """ptxas -v of the wheel on `ptx` (the same flags Triton uses); returns its log."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    arch = sm_arch_from_capability(capability)
    with tempfile.TemporaryDirectory() as directory:
        source = Path(directory) / "kernel.ptx"
        source.write_text(ptx)
        command = [get_ptxas(capability).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", str(source),
                   "-o", str(Path(directory) / "kernel.cubin")] + ([] if enable_fp_fusion else ["--fmad=false"])
        return subprocess.run(command, capture_output=True, text=True, check=True).stderr


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)  # before any kernel module is imported in this process


def _cached_compile(case: CompileCase, target: str, cache_dir: str | None) -> dict:
    path = None
    if cache_dir:
        try:
            path = Path(cache_dir) / f"{cache_key(case, target)}.json"
        except Exception:  # noqa: BLE001 - e.g. a constexpr missing: compile_case reports it
            path = None
        if path is not None and path.exists():
            report = json.loads(path.read_text())
            report["cached"] = True
            return report
    report = compile_case(case, target)
    if path is not None and report["ok"]:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        temporary.write_text(json.dumps(report, sort_keys=True))
        os.replace(temporary, path)  # atomic: a concurrent run never reads half a file
    report["cached"] = False
    return report


def compile_all(cases: list[CompileCase], targets=tuple(TARGETS), workers: int | None = None,
                cache_dir: str | Path | None = DEFAULT_CACHE) -> list[dict]:
    """Compile every case for every target in a pool of fresh processes; one report per (case, target)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(case, target) for case in cases for target in targets]
    workers = workers or min(len(jobs), os.cpu_count() or 1) or 1
    cache = str(cache_dir) if cache_dir else None
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init) as pool:
        futures = [pool.submit(_cached_compile, case, target, cache) for case, target in jobs]
        return [future.result() for future in futures]


def defects(report: dict) -> list[str]:
    """What is wrong with one compiled case: a compile error, spilled registers, too much shared memory."""
    if not report["ok"]:
        return [f"does not compile: {report['error']}"]
    found = []
    if (report.get("spill_stores") or 0) or (report.get("spill_loads") or 0):
        found.append(f"spills {report['spill_stores']} B stored / {report['spill_loads']} B loaded")
    if report["shared"] > SHARED_MEMORY_LIMIT[report["target"]]:
        found.append(f"needs {report['shared']} B shared memory > {SHARED_MEMORY_LIMIT[report['target']]} B")
    return found


def spilling_table(reports: list[dict]) -> dict:
    """kernel -> target -> dtype -> sorted config labels that are defective (spill, or too much shared memory)
    in any variant: what the NF4 matmuls' autotuners leave out (triton_support.spill_free)."""
    table: dict = {}
    for r in reports:
        if r["ok"] and defects(r):
            configs = table.setdefault(r["kernel"], {}).setdefault(r["target"], {}).setdefault(r["dtype"], [])
            if r["config"] not in configs:
                configs.append(r["config"])
    return {k: {t: {d: sorted(c) for d, c in sorted(ds.items())} for t, ds in sorted(ts.items())}
            for k, ts in sorted(table.items())}


def describe(report: dict) -> str:
    return (f"{report['module']}.{report['kernel']} [{report['dtype']}, {report['config']}, {report['variant']}] "
            f"on {report['target']}")
