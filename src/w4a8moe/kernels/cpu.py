"""The native CPU backend: a C kernel (AVX-512 VNNI, AVX-VNNI or AVX2) for the grouped expert path.

The C source ships with the package (``kernels/csrc/w4a8_cpu.c``) and is compiled on first use
with the system C compiler into a per-user cache (``$W4A8MOE_CACHE_DIR``, default
``~/.cache/w4a8moe``), keyed by a hash of the source, the compiler, the flags and the OpenMP
runtime it links, and loaded with :mod:`ctypes`; it never builds against torch's headers.
Where no compiler or no AVX2 is available the backend factory returns ``None`` (the reference
backend is then chosen) after one warning.

One thread pool per process: the kernel's parallel loops are OpenMP regions linked against
the very OpenMP runtime torch has loaded (found in ``/proc/self/maps`` and confirmed by
``torch.set_num_threads`` moving that runtime's ``omp_get_max_threads``), so torch's ops and
the kernel run on the same threads, and each call uses ``torch.get_num_threads()`` of the
calling thread. Where torch's runtime cannot be found (a torch build without OpenMP, or
whose OpenMP is not a separate shared library), the kernel is built without OpenMP and runs
single-threaded, after one warning: a second pool would fight torch's for the cores.

The kernel is bit-exact against :mod:`w4a8moe.kernels.reference`: exact int32 accumulation,
the same fp32 operation order for the scales, torch's bf16 rounding, and ``silu`` read from
tables that :func:`w4a8moe.quant.swiglu_fp32` itself fills for every bf16 input (GMM1's
output is bf16, so ``g`` takes at most 65536 values).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import mmap
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from w4a8moe.kernels.base import PackedExpertWeights, PreparedExperts, register_backend
from w4a8moe.quant import INT4_MAX, dynamic_quant_per_token, int8_matmul_int32, scaled_int_matmul, swiglu_fp32

CACHE_ENV = "W4A8MOE_CACHE_DIR"
ISA_ENV = "W4A8MOE_CPU_ISA"
SOURCE = Path(__file__).parent / "csrc" / "w4a8_cpu.c"
ABI_VERSION = 9
BLOCK_SCRATCH = (
    "blk_xq", "blk_xscale", "blk_order", "blk_token_ids", "blk_offsets", "blk_row_weights", "xg", "gu", "hq", "h",
    "xsum", "hsum", "xs", "hs", "rows", "token_rows", "token_start", "blk_rowbuf", "mlp_xp", "mlp_xsum", "mlp_gu",
    "mlp_hq", "mlp_hs", "mlp_hsum", "mlp_h", "mlp_hb", "blk_shared_out",
)
"""The scratch of ``w4a8_moe_block``, in the order of its arguments."""

ISA_FLAGS: dict[str, list[str]] = {
    # Everything the compiling CPU has: AVX-512 VNNI where present.
    "native": ["-march=native"],
    # AVX-512 switched off: AVX-VNNI (vpdpbusd on ymm) where present, else AVX2 maddubs.
    "avx2": ["-march=native", "-mno-avx512f"],
    # Plain AVX2 (vpmaddubsw + vpmaddwd), whatever else the CPU has.
    "avx2-maddubs": ["-march=native", "-mno-avx512f", "-mno-avxvnni"],
}
COMMON_FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-fast-math"]
"""Compile flags of every variant (the link step is separate, see :func:`_compile`)."""
ISA_NAMES = {0: "none", 1: "avx2", 2: "avx-vnni", 3: "avx512-vnni"}

BLOCK_N = 32
"""Output channels per weight block of the re-laid layout."""
TORCH_GRAIN_SIZE = 32768
"""``at::internal::GRAIN_SIZE``: below this many elements torch runs an elementwise op serially."""

_ERRORS = {
    -1: "a token id is out of range",
    -2: "expert offsets must start at 0 and be non-decreasing",
    -3: "the kernel was compiled without SIMD support",
    -4: "out of memory",
    -5: "invalid routing arguments",
    -6: "an expert id is out of range",
}


class KernelBuildError(RuntimeError):
    """The C kernel could not be compiled or loaded on this machine."""


class KernelCallError(RuntimeError):
    """The C kernel rejected its arguments."""


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$W4A8MOE_CACHE_DIR`` or ``~/.cache/w4a8moe``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "w4a8moe"


@functools.lru_cache(maxsize=1)
def amx_int_mm() -> bool:
    """Whether ``torch._int_mm`` runs on AMX here (the CPU has ``amx_int8`` and torch its oneDNN
    kernels): then it multiplies the clip search's [M = 64-256] x [N, K] operands 1.1-1.9x as
    fast as this kernel's VNNI tile, with the same exact int32 results."""
    return " amx_int8 " in f" {_cpu_flags()} " and torch.backends.mkldnn.is_available()


def _cpu_flags() -> str:
    # Part of the cache key: a cache shared between machines must not hand one CPU another's build.
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


# File names of OpenMP runtimes: GNU (also as auditwheel renames it, libgomp-1a2b3c4d.so.1),
# Intel and LLVM. All three export the GNU entry points GCC's -fopenmp code calls.
_OPENMP_RUNTIME_NAME = re.compile(r"^lib(gomp|iomp5|omp)(-[0-9a-f]+)?\.so(\.[0-9.]+)?$")


def _mapped_openmp_runtimes() -> list[str]:
    """The OpenMP runtime libraries mapped into this process, from ``/proc/self/maps``."""
    found: list[str] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or not fields[5].startswith("/"):
                    continue
                path = fields[5].rstrip("\n")
                if _OPENMP_RUNTIME_NAME.match(os.path.basename(path)) and path not in found:
                    found.append(path)
    except OSError:
        pass
    return found


def _runtime_max_threads(path: str) -> int | None:
    """``omp_get_max_threads()`` of the runtime at ``path`` on the calling thread, if it has one."""
    try:
        get_max = ctypes.CDLL(path).omp_get_max_threads  # already mapped: no second copy loads
    except (OSError, AttributeError):
        return None
    get_max.restype = ctypes.c_int
    return int(get_max())


def _drives_runtime(path: str, probe: bool) -> bool:
    """Whether torch's thread count is this runtime's ``omp_get_max_threads`` (read on the
    calling thread, where ``torch.set_num_threads`` sets it). With ``probe`` it also follows
    a change made in the runtime itself (its ``omp_set_num_threads``, then back): no torch call
    that sets threads is needed (vLLM's CPU worker turns ``torch.set_num_threads`` into a
    no-op after binding its threads), and no parallel region runs, so no thread starts."""
    saved = torch.get_num_threads()
    if _runtime_max_threads(path) != saved:
        return False
    if not probe:
        return True
    try:
        set_threads = ctypes.CDLL(path).omp_set_num_threads
    except (OSError, AttributeError):
        return False
    set_threads.argtypes = [ctypes.c_int]
    other = 1 if saved > 1 else 2
    set_threads(other)
    try:
        return torch.get_num_threads() == other
    finally:
        set_threads(saved)


@functools.lru_cache(maxsize=1)
def torch_openmp_runtime() -> tuple[str | None, str]:
    """``(path, "")`` of the OpenMP runtime torch's intra-op pool runs on, or ``(None, why)``."""
    info = torch.__config__.parallel_info()
    if "parallel backend: OpenMP" not in info:
        backend = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                        if "parallel backend" in line), "unknown")
        return None, f"torch's intra-op pool is not OpenMP ({backend})"
    mapped = _mapped_openmp_runtimes()
    candidates = [path for path in mapped if _drives_runtime(path, probe=len(mapped) > 1)]
    if len(candidates) == 1:
        return os.path.realpath(candidates[0]), ""
    if not candidates:
        return None, "torch's OpenMP runtime is not a shared library mapped in this process"
    return None, f"torch drives several OpenMP runtimes: {candidates}"


def _compile(compiler: str, flags: list[str], runtime: str | None) -> Path:
    """Compile the kernel with ``flags`` into the cache (atomically) and return the library path.

    With ``runtime`` (an OpenMP runtime's path) the code is compiled with ``-fopenmp`` and
    linked against that file alone, found again at load through its rpath (and, torch having
    loaded it, by its soname), never against the compiler's own copy: one runtime per process.
    Without it, the build has no OpenMP and runs serially.
    """
    source = SOURCE.read_bytes()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelBuildError(f"cannot run the C compiler {compiler!r}: {exc}") from exc
    compile_flags = [*flags, "-fopenmp"] if runtime else list(flags)
    # No -fopenmp at link time: it would add the compiler's libgomp beside torch's.
    link_flags = ["-shared", "-Wl,--no-undefined", "-pthread", "-ldl", "-lm"]
    if runtime:
        link_flags = [runtime, f"-Wl,-rpath,{os.path.dirname(runtime)}", *link_flags]
        stat = os.stat(runtime)
        runtime_id = f"{runtime}:{stat.st_size}:{int(stat.st_mtime)}"
    else:
        runtime_id = "serial"
    key = hashlib.sha256(
        b"\0".join([source, compiler.encode(), version.encode(), " ".join(compile_flags).encode(),
                    " ".join(link_flags).encode(), runtime_id.encode(), _cpu_flags().encode()])
    ).hexdigest()[:20]
    directory = cache_dir()
    target = directory / f"w4a8_cpu_{key}.so"
    if target.exists():
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp", dir=directory)
        os.close(fd)
    except OSError as exc:
        raise KernelBuildError(f"cannot write to the kernel cache {directory}: {exc}") from exc
    object_name = tmp_name + ".o"
    try:
        steps = ([compiler, *compile_flags, "-c", "-o", object_name, str(SOURCE)],
                 [compiler, "-o", tmp_name, object_name, *link_flags])
        for step in steps:
            proc = subprocess.run(step, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise KernelBuildError(f"{compiler} failed ({' '.join(step[1:])}):\n{proc.stderr[-2000:]}")
        # Atomic: a concurrent process either sees no library or a complete one.
        os.replace(tmp_name, target)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelBuildError(f"compiling the CPU kernel failed: {exc}") from exc
    finally:
        for name in (tmp_name, object_name):
            if os.path.exists(name):
                os.unlink(name)
    return target


_I64, _INT, _P = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


class KernelLibrary:
    """The loaded C library with typed entry points."""

    def __init__(self, path: Path):
        self.path = path
        lib = ctypes.CDLL(str(path))
        lib.w4a8_isa.restype = _INT
        lib.w4a8_abi_version.restype = _INT
        lib.w4a8_layout_bytes.restype = _I64
        lib.w4a8_layout_bytes.argtypes = [_I64, _I64]
        lib.w4a8_relayout.restype = None
        lib.w4a8_relayout.argtypes = [_P, _I64, _I64, _P, _INT]
        lib.w4a8_gemm.restype = _INT
        lib.w4a8_gemm.argtypes = [_P, _I64, _I64, _P, _I64, _I64, _P, _P, _P, _P, _INT, _INT]
        lib.w4a8_int8_layout_bytes.restype = _I64
        lib.w4a8_int8_layout_bytes.argtypes = [_I64, _I64]
        lib.w4a8_relayout_int8.restype = None
        lib.w4a8_relayout_int8.argtypes = [_P, _I64, _I64, _P, _INT]
        lib.w4a8_quant_rows.restype = _INT
        lib.w4a8_quant_rows.argtypes = [_P, _I64, _I64, _I64, _INT, _P, _P, _INT]
        lib.w4a8_select_experts.restype = _INT
        lib.w4a8_select_experts.argtypes = [_P, _P, _I64, _I64, _I64, _I64, _I64, _P, _P]
        lib.w4a8_sort_rows.restype = _INT
        lib.w4a8_sort_rows.argtypes = [_P, _I64, _I64, _I64, _P, _P, _P, _P, _P]
        lib.w4a8_ste_clip_quant.restype = None
        lib.w4a8_ste_clip_quant.argtypes = [_P, _I64, _I64, _P, _P, _P, _INT]
        lib.w4a8_ste_clip_quant_backward.restype = None
        lib.w4a8_ste_clip_quant_backward.argtypes = [_P, _P, _I64, _I64, _P, _P, _P, _P, _P, _P, _INT]
        lib.w4a8_row_absmax.restype = _INT
        lib.w4a8_row_absmax.argtypes = [_P, _I64, _I64, _P, _INT]
        lib.w4a8_moe_forward.restype = _INT
        lib.w4a8_moe_forward.argtypes = [_P, _P, _P, _P, _I64, _I64, _I64, _P, _P, _I64, _P, _P, _P, _P, _P, _I64,
                                         _I64, _I64, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _INT]
        lib.w4a8_gated_mlp_int8.restype = _INT
        lib.w4a8_gated_mlp_int8.argtypes = [_P, _P, _P, _P, _I64, _I64, _I64, _P, _P, _I64, _P, _P, _I64, _I64,
                                            _I64, _P, _P, _P, _P, _P, _P, _P, _P, _P, _INT]
        lib.w4a8_moe_block.restype = _INT
        lib.w4a8_moe_block.argtypes = ([_P, _P, _P, _P, _P, _I64, _I64, _I64, _P, _P, _P, _P, _I64, ctypes.c_float,
                                        _P, _P, _I64, _I64, _P, _I64, _P, _P, _I64, _I64]
                                       + [_P] * len(BLOCK_SCRATCH) + [_P, _INT])
        lib.w4a8_silu_and_mul.restype = _INT
        lib.w4a8_silu_and_mul.argtypes = [_P, _I64, _I64, _P, _P, _I64, _I64, _I64, _P, _P, _INT]
        lib.w4a8_scaled_sq_err.restype = None
        lib.w4a8_scaled_sq_err.argtypes = [_P, _I64, _I64, _P, _P, _P, _INT, _P, _INT]
        lib.w4a8_quant_int4_layout.restype = _INT
        lib.w4a8_quant_int4_layout.argtypes = [_P, _I64, _I64, _P, _INT, _P, _INT]
        lib.w4a8_quant_int4_rows.restype = _INT
        lib.w4a8_quant_int4_rows.argtypes = [_P, _I64, _I64, _P, _I64, _INT, _P, _INT]
        lib.w4a8_swiglu_clip_quant.restype = _INT
        lib.w4a8_swiglu_clip_quant.argtypes = [_P, _I64, _I64, ctypes.c_float, _P, _P, _I64, _I64, _I64, _P, _P, _P,
                                               _INT]
        lib.w4a8_probe_read.restype = _I64
        lib.w4a8_probe_read.argtypes = [_P, _I64, _INT, _INT]
        lib.w4a8_probe_int8_dot.restype = _I64
        lib.w4a8_probe_int8_dot.argtypes = [_I64, _I64, _INT]
        lib.w4a8_probe_team.restype = _INT
        lib.w4a8_probe_team.argtypes = [_INT, _P]
        lib.w4a8_openmp_runtime.restype = ctypes.c_char_p
        if lib.w4a8_abi_version() != ABI_VERSION:
            raise KernelBuildError(f"{path} has ABI {lib.w4a8_abi_version()}, expected {ABI_VERSION}")
        self.lib = lib
        self.isa = ISA_NAMES[lib.w4a8_isa()]
        runtime = lib.w4a8_openmp_runtime()
        self.openmp_runtime: str | None = None if runtime is None else os.fsdecode(runtime)
        """The OpenMP runtime the library is bound to, ``None`` for the serial build."""

    def team(self, nthreads: int) -> list[int]:
        """The kernel thread ids of the threads one job on ``nthreads`` threads runs on (the
        caller first), through the same pool as every kernel call."""
        tids = (ctypes.c_int64 * max(nthreads, 1))()
        size = self.lib.w4a8_probe_team(nthreads, ctypes.addressof(tids))
        return list(tids[:size])

    def check(self, status: int) -> None:
        """Raise :class:`KernelCallError` for a non-zero kernel status."""
        if status != 0:
            raise KernelCallError(_ERRORS.get(status, f"kernel error {status}"))


@functools.lru_cache(maxsize=None)
def load_kernel(isa: str = "native") -> KernelLibrary:
    """Compile (once, cached on disk) and load the kernel for ``isa`` (a key of :data:`ISA_FLAGS`).

    Raises :class:`KernelBuildError` when there is no compiler, the build fails, or the
    result has no AVX2.
    """
    if isa not in ISA_FLAGS:
        raise ValueError(f"unknown ISA variant {isa!r}; known: {sorted(ISA_FLAGS)}")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise KernelBuildError(f"the CPU kernel needs x86-64, this is {platform.machine()}")
    compiler = _compiler()
    if compiler is None:
        raise KernelBuildError("no C compiler found (tried $CC, cc, gcc, clang)")
    flags = [*COMMON_FLAGS, *ISA_FLAGS[isa]]
    runtime, why_serial = torch_openmp_runtime()
    library = None
    if runtime is not None:
        try:
            library = _load(_compile(compiler, flags, runtime))
        except KernelBuildError as exc:
            why_serial = f"building it against torch's OpenMP runtime {runtime} failed: {exc}"
        else:
            bound = library.openmp_runtime
            if not bound or os.path.realpath(bound) != runtime:
                why_serial = f"it bound to the OpenMP runtime {bound!r}, not torch's {runtime}"
                library = None
    if library is None:
        _warn_serial(why_serial)
        library = _load(_compile(compiler, flags, None))
    if library.isa == "none":
        raise KernelBuildError("this CPU (or compiler) has no AVX2: the CPU kernel cannot run")
    return library


def _load(path: Path) -> KernelLibrary:
    try:
        return KernelLibrary(path)
    except OSError as exc:
        raise KernelBuildError(f"cannot load {path}: {exc}") from exc


_WARNED_SERIAL = False


def _warn_serial(why: str) -> None:
    global _WARNED_SERIAL
    if not _WARNED_SERIAL:
        _WARNED_SERIAL = True
        warnings.warn(f"w4a8moe: the CPU kernel runs single-threaded: {why}", RuntimeWarning, stacklevel=3)


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


# ---- silu exactly as the reference computes it -------------------------------------------


@dataclass(frozen=True)
class SiluTables:
    """torch's fp32 ``silu`` of every bf16 value, from its vector code and from its scalar code.

    The two agree except for a handful of inputs (1 ulp apart); torch uses the scalar code for
    the elements of a row segment past its last whole group of ``vec_block`` elements.
    ``vec_block == 0`` means the two tables are identical and no patching is needed.
    """

    vector: torch.Tensor
    scalar: torch.Tensor
    vec_block: int


def _all_bf16() -> torch.Tensor:
    return torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def _silu_via_swiglu(gate: torch.Tensor) -> torch.Tensor:
    """``swiglu_fp32`` of rows ``[gate | 1]``: silu(gate) computed by the one implementation."""
    return swiglu_fp32(torch.cat((gate, torch.ones_like(gate)), dim=-1))


@functools.lru_cache(maxsize=1)
def silu_tables() -> SiluTables:
    """Build (once per process) the silu tables and find torch's vector block width."""
    values = _all_bf16()
    # Vector code: contiguous rows of 16384 (a multiple of any vector block, below the
    # parallel grain size so no thread split lands inside a row).
    vector = torch.cat([_silu_via_swiglu(chunk.unsqueeze(0)).squeeze(0) for chunk in values.split(16384)])
    # Scalar code: a strided one-column slice is never vectorized.
    scalar = _silu_via_swiglu(values.unsqueeze(-1)).squeeze(-1)
    differs = (vector.view(torch.int32) != scalar.view(torch.int32)) & ~torch.isnan(vector)
    if not bool(differs.any()):
        return SiluTables(vector.contiguous(), vector.contiguous(), 0)
    # Calibrate: in one row of `length` copies of an input whose two results differ, the
    # scalar code covers exactly the last `length % vec_block` elements.
    probe = values[int(differs.nonzero()[0])]
    scalar_bits = scalar.view(torch.int32)[int(differs.nonzero()[0])]
    candidates = {8, 16, 32, 64, 128}
    for length in (255, 1000):
        row = _silu_via_swiglu(probe.repeat(1, length)).squeeze(0).view(torch.int32)
        tail = int((row == scalar_bits).sum())
        suffix_only = bool((row[: length - tail] != scalar_bits).all())
        candidates &= {w for w in candidates if suffix_only and length % w == tail}
    if len(candidates) != 1:
        warnings.warn("could not identify torch's silu vector block; rare 1-ulp silu differences "
                      "against the reference are possible", RuntimeWarning, stacklevel=2)
        return SiluTables(vector.contiguous(), vector.contiguous(), 0)
    vec_block = candidates.pop()
    return SiluTables(vector.contiguous(), scalar.contiguous(), vec_block)


# ---- the backend --------------------------------------------------------------------------


class CpuPreparedExperts(PreparedExperts):
    """Experts re-laid for the kernel: ``w13`` uint8 ``[E, layout_bytes(2I, H)]``, ``w2`` uint8
    ``[E, layout_bytes(H, I)]`` (4 bits per weight, blocked for VNNI), scales fp32 padded to a
    multiple of 32 channels per expert."""


@dataclass
class CpuInt8Linear:
    """An int8 ``[N, K]`` Linear weight re-laid for the kernel (8 bits per weight, as
    ``w + 128`` bytes in the blocked layout), its scales padded to a multiple of 32, and, only
    for the rare K where int32 could overflow, the caller's weight itself (else ``None``: the
    layout is the one copy, :meth:`CpuBackend.int8_linear_weight` decodes it)."""

    layout: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor | None
    out_features: int
    in_features: int


@dataclass
class CpuInt4Operand:
    """An int4-valued ``[N, K]`` weight made by :meth:`CpuBackend.quantize_int4_operand` for
    :meth:`CpuBackend.operand_int_matmul`: in the kernel's int4 layout (uint8
    ``[layout_bytes]``), or, where the backend's products run on ``torch._int_mm``
    (:attr:`CpuBackend.int_mm_products`), as row-major int8 ``values`` ``[N, K]`` (``layout``
    ``None``)."""

    layout: torch.Tensor | None
    out_features: int
    in_features: int
    values: torch.Tensor | None = None


HUGE_PAGE = 2 << 20
"""The size of a transparent huge page on x86-64 Linux."""


def weight_buffer(nbytes: int) -> torch.Tensor:
    """uint8 ``[nbytes]`` for a weight layout the kernel streams, on transparent huge pages
    where the OS gives them on request (Linux ``madvise`` mode, the usual default), else a
    plain tensor.

    A decode call reads each weight once from DRAM; with 4 KiB pages its streams cross a page
    (and the hardware prefetcher stops) every 4 KiB: on 2 MiB pages the same calls ran 5 %
    faster (``bench/bench_cpu_moe.py --block-only``). The memory is an anonymous private
    mapping that the tensor keeps alive; it costs at most one huge page more than ``nbytes``.
    """
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if nbytes < HUGE_PAGE or advice is None:
        return torch.empty(nbytes, dtype=torch.uint8)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(advice)
    except OSError:  # THP compiled out, or refused: ordinary pages, still fine
        pass
    whole = torch.frombuffer(region, dtype=torch.uint8)  # holds the mapping until freed
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start:start + nbytes]


def _round_up(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def _int32_may_overflow(k: int) -> bool:
    """Whether a K-long int8 x int8 dot product can leave int32 (the kernel then hands over)."""
    return k * 128 * 128 >= 2**31


def _padded_scales(scale: torch.Tensor, n: int) -> torch.Tensor:
    e = scale.shape[0]
    out = torch.zeros((e, _round_up(n, BLOCK_N)), dtype=torch.float32)
    out[:, :n] = scale.reshape(e, n).to(torch.float32)
    return out


class CpuBackend:
    """The native W4A8 expert path (see the module docstring). Thread-safe across calls."""

    name = "cpu"

    def __init__(self, isa: str = "native", num_threads: int | None = None):
        self.kernel = load_kernel(isa)
        self.isa = self.kernel.isa
        self._num_threads = num_threads
        self._scratch = threading.local()
        self.int_mm_products = amx_int_mm()
        """Whether the exact products of the clip search (:meth:`int_matmul`,
        :meth:`quantize_int4_operand` and :meth:`operand_int_matmul`) run on ``torch._int_mm``
        rather than this kernel: where :func:`amx_int_mm`. Either gives the same integers."""

    @property
    def num_threads(self) -> int:
        """Threads the kernel uses: the constructor's value, else torch's intra-op thread count."""
        return self._num_threads or torch.get_num_threads()

    def relayout(self, packed: torch.Tensor) -> torch.Tensor:
        """Re-lay SPEC-4 packed int8 ``[N/2, K]`` (or ``[E, N/2, K]``) into the kernel layout.

        Returns uint8 ``[layout_bytes]`` (or ``[E, layout_bytes]``).
        """
        if packed.dtype != torch.int8 or packed.dim() not in (2, 3):
            raise ValueError(f"expected packed int8 [N/2, K] or [E, N/2, K], got {packed.dtype} {list(packed.shape)}")
        stacked = packed if packed.dim() == 3 else packed.unsqueeze(0)
        stacked = stacked.contiguous()
        n, k = 2 * stacked.shape[1], stacked.shape[2]
        size = self.kernel.lib.w4a8_layout_bytes(n, k)
        out = weight_buffer(stacked.shape[0] * size).view(stacked.shape[0], size)
        for e in range(stacked.shape[0]):
            self.kernel.lib.w4a8_relayout(_ptr(stacked[e]), n, k, _ptr(out[e]), self.num_threads)
        return out if packed.dim() == 3 else out[0]

    def prepare(self, weights: PackedExpertWeights) -> CpuPreparedExperts:
        """Re-lay all experts once (4 bits per weight); the SPEC-4 tensors are not kept."""
        e, inter, hidden = weights.w13.shape
        if tuple(weights.w2.shape) != (e, hidden // 2, inter) or hidden % 2:
            raise ValueError(f"w2 must be [E, H/2, I] = [{e}, {hidden // 2}, {inter}], got {list(weights.w2.shape)}")
        return CpuPreparedExperts(
            w13=self.relayout(weights.w13),
            w13_scale=_padded_scales(weights.w13_scale, 2 * inter),
            w2=self.relayout(weights.w2),
            w2_scale=_padded_scales(weights.w2_scale, hidden),
            num_experts=e,
            hidden_size=hidden,
            intermediate_size=inter,
        )

    def gemm(self, layout: torch.Tensor, n: int, k: int, x_q: torch.Tensor, x_scale: torch.Tensor | None = None,
             w_scale: torch.Tensor | None = None) -> torch.Tensor:
        """One matrix through the kernel's GEMM (a test and benchmark entry).

        ``layout`` from :meth:`relayout`; ``x_q`` int8 ``[M, K]``. Without scales it returns
        the exact int32 accumulation ``x_q @ W^T`` ``[M, N]``; with ``x_scale`` fp32 ``[M, 1]``
        and ``w_scale`` fp32 ``[N]`` it returns bf16 ``(acc * x_scale) * w_scale``.
        """
        if x_scale is not None and w_scale is None:
            raise ValueError("w_scale is needed with x_scale")
        ws = None if x_scale is None else _padded_scales(w_scale.reshape(1, n), n)
        return self._gemm(layout, n, k, x_q, x_scale, ws, int8_weights=False)

    def gemm_int8(self, layout: torch.Tensor, n: int, k: int, x_q: torch.Tensor) -> torch.Tensor:
        """Exact int32 ``x_q @ W^T`` against an int8 weight re-laid by :meth:`prepare_int8_linear`
        (a test entry; see :meth:`gemm`)."""
        return self._gemm(layout, n, k, x_q, None, None, int8_weights=True)

    def _gemm(self, layout: torch.Tensor, n: int, k: int, x_q: torch.Tensor, x_scale: torch.Tensor | None,
              w_scale_padded: torch.Tensor | None, int8_weights: bool) -> torch.Tensor:
        if x_q.dtype != torch.int8 or x_q.dim() != 2 or x_q.shape[1] != k:
            raise ValueError(f"x_q must be int8 [M, {k}], got {x_q.dtype} {list(x_q.shape)}")
        size = (self.kernel.lib.w4a8_int8_layout_bytes if int8_weights else self.kernel.lib.w4a8_layout_bytes)(n, k)
        if layout.dtype != torch.uint8 or layout.numel() != size:
            raise ValueError("layout does not match (n, k)")
        x_q = x_q.contiguous()
        m = x_q.shape[0]
        if x_scale is None:
            out = torch.empty((m, n), dtype=torch.int32)
            status = self.kernel.lib.w4a8_gemm(_ptr(layout), n, k, _ptr(x_q), m, k, None, None, _ptr(out), None,
                                               int(int8_weights), self.num_threads)
        else:
            xs = x_scale.reshape(m).to(torch.float32).contiguous()
            out = torch.empty((m, n), dtype=torch.bfloat16)
            status = self.kernel.lib.w4a8_gemm(_ptr(layout), n, k, _ptr(x_q), m, k, _ptr(xs), _ptr(w_scale_padded),
                                               None, _ptr(out), int(int8_weights), self.num_threads)
        self.kernel.check(status)
        return out

    def quantize_per_token(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`w4a8moe.quant.dynamic_quant_per_token` of bf16 or fp32 ``[M, K]`` rows in one
        parallel pass without temporaries, bit for bit; rows with inf or NaN, other dtypes and
        K = 0 go to the torch function itself."""
        if x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float32) or x.shape[1] == 0:
            return dynamic_quant_per_token(x)
        x = x.contiguous()
        m, k = x.shape
        x_q = torch.empty((m, k), dtype=torch.int8)
        scale = torch.empty((m, 1), dtype=torch.float32)
        nonfinite = self.kernel.lib.w4a8_quant_rows(_ptr(x), m, k, k, int(x.dtype == torch.bfloat16), _ptr(x_q),
                                                    _ptr(scale), self.num_threads)
        return dynamic_quant_per_token(x) if nonfinite else (x_q, scale)

    def select_experts(self, scores: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int = 1,
                       topk_group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The expert choice of :func:`w4a8moe.moe.routing.grouped_top_k` for fp32 CPU ``scores``
        ``[M, E]`` in one call, the same ids and (unbiased) weights bit for bit: ``(weights fp32
        [M, top_k], ids int64 [M, top_k])``, best first, equal values by the lower index."""
        if scores.dtype != torch.float32 or scores.dim() != 2:
            raise ValueError(f"scores must be fp32 [M, E], got {scores.dtype} {list(scores.shape)}")
        m, e = scores.shape
        scores = scores.contiguous()
        if bias is not None:
            if bias.numel() != e:
                raise ValueError(f"expected {e} correction biases, got {bias.numel()}")
            bias = bias.to(torch.float32).reshape(e).contiguous()
        weights = torch.empty((m, top_k), dtype=torch.float32)
        ids = torch.empty((m, top_k), dtype=torch.int64)
        self.kernel.check(self.kernel.lib.w4a8_select_experts(
            _ptr(scores), None if bias is None else _ptr(bias), m, e, top_k, n_group, topk_group, _ptr(weights),
            _ptr(ids)))
        return weights, ids

    def sort_rows(self, ids: torch.Tensor, num_experts: int, weights: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:func:`w4a8moe.moe.routing.sort_rows_by_expert` of int64 CPU ``ids`` ``[M, k]`` in one
        call: ``(order, token_ids, offsets, row_weights or None)``."""
        if ids.dim() != 2:
            raise ValueError(f"ids must be [M, k], got {list(ids.shape)}")
        n, k = ids.numel(), ids.shape[1]
        flat = ids.to(torch.int64).reshape(-1).contiguous()
        order = torch.empty(n, dtype=torch.int64)
        token_ids = torch.empty(n, dtype=torch.int64)
        offsets = torch.empty(num_experts + 1, dtype=torch.int64)
        row_weights = None
        if weights is not None:
            if weights.numel() != n:
                raise ValueError(f"expected {n} routing weights, got {weights.numel()}")
            weights = weights.to(torch.float32).reshape(-1).contiguous()
            row_weights = torch.empty(n, dtype=torch.float32)
        self.kernel.check(self.kernel.lib.w4a8_sort_rows(
            _ptr(flat), n, max(k, 1), num_experts, None if weights is None else _ptr(weights), _ptr(order),
            _ptr(token_ids), _ptr(offsets), None if row_weights is None else _ptr(row_weights)))
        return order, token_ids, offsets, row_weights

    def prepare_int8_linear(self, weight_q: torch.Tensor, weight_scale: torch.Tensor) -> CpuInt8Linear:
        """Re-lay an int8 ``[N, K]`` weight (and its fp32 ``[N]`` scales) for :meth:`int8_linear`."""
        if weight_q.dtype != torch.int8 or weight_q.dim() != 2:
            raise ValueError(f"expected an int8 [N, K] weight, got {weight_q.dtype} {list(weight_q.shape)}")
        n, k = weight_q.shape
        if weight_scale.numel() != n:
            raise ValueError(f"expected {n} weight scales, got {weight_scale.numel()}")
        weight_q = weight_q.contiguous()
        layout = weight_buffer(self.kernel.lib.w4a8_int8_layout_bytes(n, k))
        self.kernel.lib.w4a8_relayout_int8(_ptr(weight_q), n, k, _ptr(layout), self.num_threads)
        kept = weight_q if _int32_may_overflow(k) else None
        return CpuInt8Linear(layout, _padded_scales(weight_scale.reshape(1, n), n), kept, n, k)

    def int8_linear_weight(self, prepared: CpuInt8Linear) -> torch.Tensor:
        """The int8 ``[N, K]`` weight of a prepared Linear, decoded exactly from its layout (a new
        tensor): the kernel's layout is the only copy a :class:`~w4a8moe.moe.W8A8Linear` keeps."""
        if prepared.weight is not None:
            return prepared.weight
        n, k = prepared.out_features, prepared.in_features
        blocks, quads = _round_up(n, BLOCK_N) // BLOCK_N, _round_up(k, 4) // 4
        # Byte [block, quad, half, lane, j] holds w[32 * block + 16 * half + lane, 4 * quad + j] + 128.
        lines = prepared.layout.view(torch.int8).view(blocks, quads, 2, BLOCK_N // 2, 4)
        w = lines.permute(0, 2, 3, 1, 4).reshape(blocks * BLOCK_N, quads * 4)[:n, :k]
        return torch.bitwise_xor(w, -128).contiguous()  # (w + 128) mod 256, its top bit flipped

    def int8_linear(self, prepared: CpuInt8Linear, x_q: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """bf16 ``(float(x_q @ W^T) * x_scale) * w_scale``: the bits of
        :func:`w4a8moe.quant.scaled_int_matmul`, in one kernel call."""
        n, k = prepared.out_features, prepared.in_features
        if _int32_may_overflow(k):
            # int32 could overflow: the reference path, which checks (and raises) exactly.
            return scaled_int_matmul(x_q, x_scale, prepared.weight, prepared.scale[0, :n])
        return self._gemm(prepared.layout, n, k, x_q, x_scale, prepared.scale, int8_weights=True)

    def int_matmul(self, a_q: torch.Tensor, b_q: torch.Tensor) -> torch.Tensor:
        """Exact int32 ``a_q [M, K] @ b_q[N, K]^T`` (int8 both): ``b_q`` re-laid once, one GEMM."""
        if a_q.dtype != torch.int8 or b_q.dtype != torch.int8 or a_q.dim() != 2 or b_q.dim() != 2 \
                or a_q.shape[1] != b_q.shape[1]:
            raise ValueError(f"int_matmul expects int8 a_q [M, K] and b_q [N, K], got {a_q.dtype} "
                             f"{list(a_q.shape)} and {b_q.dtype} {list(b_q.shape)}")
        (m, k), n = a_q.shape, b_q.shape[0]
        if _int32_may_overflow(k):  # int32 could overflow: the float64 path checks and raises
            return int8_matmul_int32(a_q, b_q)
        if m == 0 or n == 0 or k == 0:
            return torch.zeros((m, n), dtype=torch.int32)
        if self.int_mm_products:
            return torch._int_mm(a_q.contiguous(), b_q.contiguous().t())
        b_q = b_q.contiguous()
        layout = torch.empty(self.kernel.lib.w4a8_int8_layout_bytes(n, k), dtype=torch.uint8)
        self.kernel.lib.w4a8_relayout_int8(_ptr(b_q), n, k, _ptr(layout), self.num_threads)
        return self._gemm(layout, n, k, a_q, None, None, int8_weights=True)

    def quantize_int4_operand(self, weight: torch.Tensor, scale: torch.Tensor,
                              reuse: CpuInt4Operand | None = None) -> CpuInt4Operand:
        """The int4 values :func:`w4a8moe.quant.quantize_with_scale` gives fp32 ``weight``
        ``[N, K]`` under ``scale`` ``[N]``, quantized and laid out for the GEMM in one pass.

        For the clip search, which quantizes one weight under many scale vectors: it never
        materializes the int8 values, and :meth:`operand_int_matmul` multiplies the result
        (where :attr:`int_mm_products`, it writes them row-major instead, for ``torch._int_mm``).
        ``reuse``: an operand of the same shape that is no longer needed, written over (fresh
        memory for each of a search's grid points cost more in page faults than the
        quantization itself).
        """
        return self.quantize_int4_operands(weight, [scale], [reuse])[0]

    def quantize_int4_operands(self, weight: torch.Tensor, scales: list[torch.Tensor],
                               reuse: list[CpuInt4Operand | None] | None = None) -> list[CpuInt4Operand]:
        """:meth:`quantize_int4_operand` of one weight under several scale vectors; where
        :attr:`int_mm_products`, in one pass over the weight (each fp32 row read from memory
        once for all of them: the search's quantization was bound by reading the weight once per
        grid point). ``reuse[i]`` (optional) as ``reuse`` there."""
        if weight.dtype != torch.float32 or weight.dim() != 2:
            raise ValueError(f"expected an fp32 [N, K] weight, got {weight.dtype} {list(weight.shape)}")
        n, k = weight.shape
        for scale in scales:
            if scale.numel() != n:
                raise ValueError(f"expected {n} scales, got {scale.numel()}")
        weight = weight.contiguous()
        reuse = list(reuse or []) + [None] * (len(scales) - len(reuse or []))

        def spare(i: int, kind: str) -> torch.Tensor | None:
            r = reuse[i]
            fits = r is not None and (r.out_features, r.in_features) == (n, k)
            return getattr(r, kind) if fits else None

        if self.int_mm_products:
            values = [spare(i, "values") for i in range(len(scales))]
            values = [v if v is not None else torch.empty((n, k), dtype=torch.int8) for v in values]
            if scales and n * k:
                stacked = torch.stack([s.reshape(n).to(torch.float32) for s in scales]).contiguous()
                outs = (ctypes.c_void_p * len(values))(*(_ptr(v) for v in values))
                self.kernel.check(self.kernel.lib.w4a8_quant_int4_rows(
                    _ptr(weight), n, k, _ptr(stacked), len(scales), INT4_MAX, outs, self.num_threads))
            return [CpuInt4Operand(None, n, k, v) for v in values]
        operands = []
        for i, scale in enumerate(scales):
            layout = spare(i, "layout")
            if layout is None:
                layout = torch.empty(self.kernel.lib.w4a8_layout_bytes(n, k), dtype=torch.uint8)
            s = scale.reshape(n).to(torch.float32).contiguous()
            if layout.numel():
                self.kernel.check(self.kernel.lib.w4a8_quant_int4_layout(_ptr(weight), n, k, _ptr(s), INT4_MAX,
                                                                        _ptr(layout), self.num_threads))
            operands.append(CpuInt4Operand(layout, n, k))
        return operands

    def operand_int_matmul(self, a_q: torch.Tensor, operand: CpuInt4Operand) -> torch.Tensor:
        """Exact int32 ``a_q [M, K] @ q^T`` for the int4 values ``q`` of an operand."""
        n, k = operand.out_features, operand.in_features
        if a_q.shape[0] == 0 or n == 0 or k == 0:
            if a_q.dim() != 2 or a_q.shape[1] != k:
                raise ValueError(f"a_q must be int8 [M, {k}], got {a_q.dtype} {list(a_q.shape)}")
            return torch.zeros((a_q.shape[0], n), dtype=torch.int32)
        if operand.values is not None:
            if a_q.dtype != torch.int8 or a_q.dim() != 2 or a_q.shape[1] != k:
                raise ValueError(f"a_q must be int8 [M, {k}], got {a_q.dtype} {list(a_q.shape)}")
            return torch._int_mm(a_q.contiguous(), operand.values.t())
        return self._gemm(operand.layout, n, k, a_q, None, None, int8_weights=False)

    def scaled_squared_error(self, acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                             reference: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """float64 ``[M, N]``: ``(scale_int32(acc, x_scale, w_scale, out_dtype).double() -
        reference) ** 2`` element for element (the bits of those torch steps), in one pass.

        ``acc`` int32 ``[M, N]``, ``reference`` float64 ``[M, N]``; ``out_dtype`` fp32 or bf16.
        """
        if out_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"out_dtype must be float32 or bfloat16, got {out_dtype}")
        m, n = acc.shape
        if acc.dtype != torch.int32 or reference.dtype != torch.float64 or tuple(reference.shape) != (m, n):
            raise ValueError(f"expected int32 acc and float64 reference of one shape, got {acc.dtype} "
                             f"{list(acc.shape)} and {reference.dtype} {list(reference.shape)}")
        acc, ref = acc.contiguous(), reference.contiguous()
        xs = x_scale.reshape(m).to(torch.float32).contiguous()
        ws = w_scale.reshape(n).to(torch.float32).contiguous()
        out = torch.empty((m, n), dtype=torch.float64)
        self.kernel.lib.w4a8_scaled_sq_err(_ptr(acc), m, n, _ptr(xs), _ptr(ws), _ptr(ref),
                                           int(out_dtype == torch.bfloat16), _ptr(out), self.num_threads)
        return out

    def gate_up_rows(self, prepared: CpuPreparedExperts, x_q: torch.Tensor, x_scale: torch.Tensor,
                     token_ids: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
        """GMM1 alone, one kernel GEMM per non-empty expert (see
        :meth:`w4a8moe.kernels.base.ExpertBackend.gate_up_rows`)."""
        n, k = 2 * prepared.intermediate_size, prepared.hidden_size
        out = torch.empty((token_ids.shape[0], n), dtype=torch.bfloat16)
        offsets = expert_offsets.tolist()
        xs = x_scale.to(torch.float32).reshape(-1, 1)
        for e in range(prepared.num_experts):
            start, end = offsets[e], offsets[e + 1]
            if start < end:
                rows = token_ids[start:end]
                out[start:end] = self._gemm(prepared.w13[e], n, k, x_q[rows], xs[rows], prepared.w13_scale[e],
                                            int8_weights=False)
        return out

    def down_rows_int32(self, prepared: CpuPreparedExperts, h_q: torch.Tensor,
                        expert_offsets: torch.Tensor) -> torch.Tensor:
        """GMM2's exact int32 accumulation, one kernel GEMM per non-empty expert."""
        n, k = prepared.hidden_size, prepared.intermediate_size
        out = torch.empty((h_q.shape[0], n), dtype=torch.int32)
        offsets = expert_offsets.tolist()
        for e in range(prepared.num_experts):
            start, end = offsets[e], offsets[e + 1]
            if start < end:
                out[start:end] = self._gemm(prepared.w2[e], n, k, h_q[start:end], None, None, int8_weights=False)
        return out

    def int8_linear_int32(self, prepared: CpuInt8Linear, x_q: torch.Tensor) -> torch.Tensor:
        """Exact int32 ``x_q @ W^T`` of a prepared W8A8 Linear."""
        n, k = prepared.out_features, prepared.in_features
        if _int32_may_overflow(k):
            return int8_matmul_int32(x_q, prepared.weight)
        return self._gemm(prepared.layout, n, k, x_q, None, None, int8_weights=True)

    def swiglu_clip_quant(self, gate_up: torch.Tensor, alpha: float = 1.0
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kernel's SwiGLU-clip-quant step alone (a test entry) for the rows of one expert.

        ``gate_up`` bf16 ``[R, 2I]``. Returns ``(h fp32 [R, I], h_q int8 [R, I], c fp32 [R, 1])``,
        to be compared with :func:`w4a8moe.quant.swiglu_fp32` and
        :func:`w4a8moe.quant.swiglu_clip_quant`.
        """
        if gate_up.dtype != torch.bfloat16 or gate_up.dim() != 2 or gate_up.shape[1] % 2:
            raise ValueError(f"gate_up must be bf16 [R, 2I], got {gate_up.dtype} {list(gate_up.shape)}")
        gate_up = gate_up.contiguous()
        rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
        h = torch.empty((rows, inter), dtype=torch.float32)
        h_q = torch.empty((rows, inter), dtype=torch.int8)
        c = torch.empty((rows, 1), dtype=torch.float32)
        tables = silu_tables()
        status = self.kernel.lib.w4a8_swiglu_clip_quant(
            _ptr(gate_up), rows, inter, float(alpha), _ptr(tables.vector), _ptr(tables.scalar), tables.vec_block,
            torch.get_num_threads(), TORCH_GRAIN_SIZE, _ptr(h), _ptr(h_q), _ptr(c), self.num_threads)
        self.kernel.check(status)
        return h, h_q, c

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The activation step of :meth:`gated_mlp_int8` alone (a test entry): bf16 ``[R, I]``
        from bf16 ``gate_up`` ``[R, 2I]``, to be compared with
        :func:`w4a8moe.quant.silu_and_mul` of its two halves."""
        if gate_up.dtype != torch.bfloat16 or gate_up.dim() != 2 or gate_up.shape[1] % 2:
            raise ValueError(f"gate_up must be bf16 [R, 2I], got {gate_up.dtype} {list(gate_up.shape)}")
        gate_up = gate_up.contiguous()
        rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty((rows, inter), dtype=torch.bfloat16)
        threads = self.num_threads
        h = torch.empty(max(threads * inter, 1), dtype=torch.float32)
        tables = silu_tables()
        self.kernel.check(self.kernel.lib.w4a8_silu_and_mul(
            _ptr(gate_up), rows, inter, _ptr(tables.vector), _ptr(tables.scalar), tables.vec_block,
            torch.get_num_threads(), TORCH_GRAIN_SIZE, _ptr(h), _ptr(out), threads))
        return out

    def _scratch_buffers(self, need: dict[str, tuple[int, torch.dtype]]) -> dict[str, torch.Tensor]:
        """Scratch tensors of at least ``need[name] = (elements, dtype)``: kept per calling thread
        and only grown, so that steady-state calls allocate nothing large."""
        cache: dict[str, torch.Tensor] = getattr(self._scratch, "buffers", {})
        for name, (size, dtype) in need.items():
            if name not in cache or cache[name].numel() < size or cache[name].dtype != dtype:
                cache[name] = torch.empty(max(size, 1), dtype=dtype)
                # Pointers kept from earlier calls (moe_block's) are stale from here on.
                self._scratch.generation = getattr(self._scratch, "generation", 0) + 1
        self._scratch.buffers = cache
        return cache

    def _buffers(self, rows: int, tokens: int, hidden: int, inter: int, threads: int,
                 combine: bool) -> dict[str, torch.Tensor]:
        need = {
            "xg": (rows * _round_up(hidden, 4), torch.int8),
            "gu": (rows * 2 * inter, torch.int16),
            "hq": (rows * _round_up(inter, 4), torch.int8),
            "h": (threads * inter, torch.float32),
            "xsum": (rows, torch.int32),
            "hsum": (rows, torch.int32),
            "xs": (rows, torch.float32),
            "hs": (rows, torch.float32),
        }
        if combine:  # the bf16 rows, and each token's rows, stay in scratch
            need.update(rows=(rows * hidden, torch.int16), token_rows=(rows, torch.int64),
                        token_start=(tokens + 1, torch.int64))
        return self._scratch_buffers(need)

    def gated_mlp_int8(self, gate_up: CpuInt8Linear, down: CpuInt8Linear, x_q: torch.Tensor,
                       x_scale: torch.Tensor) -> torch.Tensor | None:
        """``down(silu_and_mul(gate, up))`` of W8A8 Linears in one kernel call: bf16 ``[M, N]``,
        the bits of the three :meth:`int8_linear` calls with
        :func:`w4a8moe.quant.silu_and_mul` and :meth:`quantize_per_token` between them.

        ``gate_up`` stacks the gate rows, then the up rows (``[2I, K]``); ``down`` is ``[N, I]``;
        ``x_q`` int8 ``[M, K]``, ``x_scale`` fp32 ``[M, 1]``. Returns ``None`` where the torch
        code must run instead: a row of ``silu_and_mul`` that is not finite (whose quantization
        this kernel does not reproduce), or a K where int32 could overflow.
        """
        k, inter, n = gate_up.in_features, gate_up.out_features // 2, down.out_features
        if gate_up.out_features % 2 or down.in_features != inter:
            raise ValueError(f"gate_up must be [2I, K] and down [N, I]: got gate_up "
                             f"[{gate_up.out_features}, {k}] and down [{n}, {down.in_features}]")
        if x_q.dtype != torch.int8 or x_q.dim() != 2 or x_q.shape[1] != k:
            raise ValueError(f"x_q must be int8 [M, {k}], got {x_q.dtype} {list(x_q.shape)}")
        m = x_q.shape[0]
        if x_scale.numel() != m:
            raise ValueError(f"x_scale must have {m} values, got {x_scale.numel()}")
        if _int32_may_overflow(max(k, inter)):
            return None
        out = torch.empty((m, n), dtype=torch.bfloat16)
        if m == 0:
            return out
        threads = self.num_threads
        buf = self._scratch_buffers({
            "mlp_xp": (m * _round_up(k, 4), torch.int8), "mlp_xsum": (m, torch.int32),
            "mlp_gu": (m * 2 * inter, torch.int16), "mlp_hq": (m * _round_up(inter, 4), torch.int8),
            "mlp_hs": (m, torch.float32), "mlp_hsum": (m, torch.int32),
            "mlp_h": (threads * inter, torch.float32), "mlp_hb": (threads * inter, torch.int16),
        })
        x_q = x_q.contiguous()
        xs = x_scale.to(torch.float32).reshape(-1).contiguous()
        tables = silu_tables()
        status = self.kernel.lib.w4a8_gated_mlp_int8(
            _ptr(gate_up.layout), _ptr(gate_up.scale), _ptr(down.layout), _ptr(down.scale), k, inter, n, _ptr(x_q),
            _ptr(xs), m, _ptr(tables.vector), _ptr(tables.scalar), tables.vec_block, torch.get_num_threads(),
            TORCH_GRAIN_SIZE, _ptr(buf["mlp_xp"]), _ptr(buf["mlp_xsum"]), _ptr(buf["mlp_gu"]), _ptr(buf["mlp_hq"]),
            _ptr(buf["mlp_hs"]), _ptr(buf["mlp_hsum"]), _ptr(buf["mlp_h"]), _ptr(buf["mlp_hb"]), _ptr(out), threads)
        if status == 1:
            return None
        self.kernel.check(status)
        return out

    def grouped_forward(
        self,
        prepared: CpuPreparedExperts,
        x_q: torch.Tensor,
        x_scale: torch.Tensor,
        token_ids: torch.Tensor,
        expert_offsets: torch.Tensor,
        alpha: torch.Tensor,
    ) -> torch.Tensor:
        """The expert path for routed rows (see :class:`w4a8moe.kernels.base.ExpertBackend`)."""
        return self._forward(prepared, x_q, x_scale, token_ids, expert_offsets, alpha, None)

    def combined_forward(
        self,
        prepared: CpuPreparedExperts,
        x_q: torch.Tensor,
        x_scale: torch.Tensor,
        token_ids: torch.Tensor,
        expert_offsets: torch.Tensor,
        alpha: torch.Tensor,
        row_weights: torch.Tensor,
    ) -> torch.Tensor:
        """The expert path and the per-token weighted sum in one kernel call: the rows stay in
        scratch and are summed in the kernel's last phase (see
        :class:`w4a8moe.kernels.base.ExpertBackend`)."""
        if row_weights.numel() != token_ids.numel():
            raise ValueError(f"row_weights must have {token_ids.numel()} values, got {row_weights.numel()}")
        return self._forward(prepared, x_q, x_scale, token_ids, expert_offsets, alpha,
                             row_weights.to(torch.float32).reshape(-1).contiguous())

    def _forward(self, prepared: CpuPreparedExperts, x_q: torch.Tensor, x_scale: torch.Tensor,
                 token_ids: torch.Tensor, expert_offsets: torch.Tensor, alpha: torch.Tensor,
                 row_weights: torch.Tensor | None) -> torch.Tensor:
        e, hidden, inter = prepared.num_experts, prepared.hidden_size, prepared.intermediate_size
        if x_q.dtype != torch.int8 or x_q.dim() != 2 or x_q.shape[1] != hidden:
            raise ValueError(f"x_q must be int8 [M, {hidden}], got {x_q.dtype} {list(x_q.shape)}")
        if x_scale.numel() != x_q.shape[0]:
            raise ValueError(f"x_scale must have {x_q.shape[0]} values, got {x_scale.numel()}")
        if expert_offsets.numel() != e + 1:
            raise ValueError(f"expert_offsets must have {e + 1} entries, got {expert_offsets.numel()}")
        if alpha.numel() != e:
            raise ValueError(f"alpha must have {e} entries, got {alpha.numel()}")
        rows, tokens = token_ids.numel(), x_q.shape[0]
        offsets = expert_offsets.to(torch.int64).contiguous()
        if int(offsets[-1]) != rows:
            raise ValueError(f"expert_offsets end at {int(offsets[-1])} but there are {rows} routed rows")
        combine = row_weights is not None
        if combine:
            out = torch.empty((tokens, hidden), dtype=torch.float32)
        else:
            out = torch.empty((rows, hidden), dtype=torch.bfloat16)
            if rows == 0:
                return out
        x_q = x_q.contiguous()
        xs = x_scale.to(torch.float32).reshape(-1).contiguous()
        ids = token_ids.to(torch.int64).contiguous()
        alpha32 = alpha.to(torch.float32).contiguous()
        tables = silu_tables()
        threads = self.num_threads
        buf = self._buffers(rows, tokens, hidden, inter, threads, combine)
        # Combined: the bf16 rows go to reused scratch and only the [M, H] sum is new memory.
        rows_ptr = _ptr(buf["rows"]) if combine else _ptr(out)
        status = self.kernel.lib.w4a8_moe_forward(
            _ptr(prepared.w13), _ptr(prepared.w13_scale), _ptr(prepared.w2), _ptr(prepared.w2_scale),
            e, hidden, inter, _ptr(x_q), _ptr(xs), tokens, _ptr(ids), _ptr(offsets), _ptr(alpha32),
            _ptr(tables.vector), _ptr(tables.scalar), tables.vec_block, torch.get_num_threads(), TORCH_GRAIN_SIZE,
            _ptr(buf["xg"]), _ptr(buf["gu"]), _ptr(buf["hq"]), _ptr(buf["h"]), _ptr(buf["xsum"]),
            _ptr(buf["hsum"]), _ptr(buf["xs"]), _ptr(buf["hs"]), rows_ptr,
            _ptr(row_weights) if combine else None, _ptr(buf["token_rows"]) if combine else None,
            _ptr(buf["token_start"]) if combine else None, _ptr(out) if combine else None, threads,
        )
        self.kernel.check(status)
        return out

    def moe_block(self, prepared: CpuPreparedExperts, x: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, alpha: torch.Tensor, scaling: float,
                  shared: tuple[CpuInt8Linear, CpuInt8Linear] | None = None) -> torch.Tensor | None:
        """A whole MoE block in one kernel call: bf16 ``[M, H]`` from bf16 ``x`` ``[M, H]`` and its
        routing (``topk_weights`` fp32 and ``topk_ids`` int64 ``[M, k]``), the bits of
        :meth:`quantize_per_token`, :meth:`sort_rows`, :meth:`combined_forward`, ``*
        scaling``, ``+`` :meth:`gated_mlp_int8` of ``shared = (gate_up, down)`` on the same
        quantized input (or no shared expert) and the rounding to bf16, as
        :class:`~w4a8moe.moe.W4A8MoE` computes them. All of it runs in one parallel region, the
        routed and the shared expert's work of each phase claimed from one range, so that at
        decode the threads stream from one weight to the next without a wait or a Python step in
        between. Returns ``None`` where those calls would take a torch path (a row of ``x`` or
        of the shared activation not finite, or a K where int32 could overflow): the caller
        then runs them."""
        e, hidden, inter = prepared.num_experts, prepared.hidden_size, prepared.intermediate_size
        if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[1] != hidden:
            raise ValueError(f"x must be bf16 [M, {hidden}], got {x.dtype} {list(x.shape)}")
        m = x.shape[0]
        if topk_ids.dim() != 2 or topk_ids.shape[0] != m or tuple(topk_weights.shape) != tuple(topk_ids.shape):
            raise ValueError(f"topk_ids and topk_weights must be [{m}, k], got {list(topk_ids.shape)} and "
                             f"{list(topk_weights.shape)}")
        if alpha.numel() != e:
            raise ValueError(f"alpha must have {e} entries, got {alpha.numel()}")
        k = topk_ids.shape[1]
        s_inter = 0
        if shared is not None:
            gate_up, down = shared
            s_inter = gate_up.out_features // 2
            if gate_up.in_features != hidden or down.out_features != hidden or gate_up.out_features % 2 \
                    or down.in_features != s_inter:
                raise ValueError(f"the shared expert must be gate_up [2I, {hidden}] and down [{hidden}, I], got "
                                 f"[{gate_up.out_features}, {gate_up.in_features}] and "
                                 f"[{down.out_features}, {down.in_features}]")
            if _int32_may_overflow(max(hidden, s_inter)):
                return None
        out = torch.empty((m, hidden), dtype=torch.bfloat16)
        if m == 0:
            return out
        if k < 1:
            raise ValueError("topk_ids must have at least one expert per token")
        x = x.contiguous()
        ids = topk_ids.to(torch.int64).contiguous()
        weights = topk_weights.to(torch.float32).contiguous()
        alpha32 = alpha.to(torch.float32).contiguous()
        tables = silu_tables()
        scratch = self._block_scratch(m, k, e, hidden, inter, s_inter)
        if shared is not None:
            shared_args = [_ptr(gate_up.layout), _ptr(gate_up.scale), _ptr(down.layout), _ptr(down.scale), s_inter]
        else:
            shared_args = [None, None, None, None, 0]
        status = self.kernel.lib.w4a8_moe_block(
            _ptr(prepared.w13), _ptr(prepared.w13_scale), _ptr(prepared.w2), _ptr(prepared.w2_scale), _ptr(alpha32),
            e, hidden, inter, *shared_args, scaling, _ptr(tables.vector), _ptr(tables.scalar), tables.vec_block,
            TORCH_GRAIN_SIZE, _ptr(x), m, _ptr(weights), _ptr(ids), k, torch.get_num_threads(), *scratch, _ptr(out),
            self.num_threads)
        if status == 1:
            return None
        self.kernel.check(status)
        return out

    def _block_scratch(self, m: int, k: int, e: int, hidden: int, inter: int, s_inter: int) -> list[int]:
        """The scratch pointers of :meth:`moe_block`, in :data:`BLOCK_SCRATCH` order (kept per
        calling thread with the tensors, rebuilt only when a size changes)."""
        threads = self.num_threads
        key = (m, k, e, hidden, inter, s_inter, threads)
        cached = getattr(self._scratch, "block", None)
        if cached is not None and cached[0] == key and cached[1] == getattr(self._scratch, "generation", 0):
            return cached[2]
        rows, hp, ip, sip = m * k, _round_up(hidden, 4), _round_up(inter, 4), _round_up(s_inter, 4)
        sizes = {
            "blk_xq": (m * hidden, torch.int8), "blk_xscale": (m, torch.float32),
            "blk_order": (rows, torch.int64), "blk_token_ids": (rows, torch.int64),
            "blk_offsets": (e + 1, torch.int64), "blk_row_weights": (rows, torch.float32),
            "xg": (rows * hp, torch.int8), "gu": (rows * 2 * inter, torch.int16), "hq": (rows * ip, torch.int8),
            "h": (threads * inter, torch.float32), "xsum": (rows, torch.int32), "hsum": (rows, torch.int32),
            "xs": (rows, torch.float32), "hs": (rows, torch.float32), "rows": (rows * hidden, torch.int16),
            "token_rows": (rows, torch.int64), "token_start": (m + 1, torch.int64),
            "blk_rowbuf": (threads * hidden, torch.float32),
            "mlp_xp": (m * hp, torch.int8), "mlp_xsum": (m, torch.int32), "mlp_gu": (m * 2 * s_inter, torch.int16),
            "mlp_hq": (m * sip, torch.int8), "mlp_hs": (m, torch.float32), "mlp_hsum": (m, torch.int32),
            "mlp_h": (threads * s_inter, torch.float32), "mlp_hb": (threads * s_inter, torch.int16),
            "blk_shared_out": (m * hidden, torch.int16),
        }
        buf = self._scratch_buffers(sizes)
        pointers = [_ptr(buf[name]) for name in BLOCK_SCRATCH]
        self._scratch.block = (key, getattr(self._scratch, "generation", 0), pointers)
        return pointers

    # ---- the clip search's alpha refinement (w4a8moe.calibrate.clips, the Gram form) ----

    @staticmethod
    def _ste_rows(h: torch.Tensor, bound: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if h.dtype != torch.float32 or h.dim() != 2 or h.device.type != "cpu":
            raise ValueError(f"h must be fp32 [M, I] on the CPU, got {h.dtype} {list(h.shape)} on {h.device}")
        m = h.shape[0]
        for name, t in (("bound", bound), ("step", step)):
            if t.dtype != torch.float32 or t.numel() != m:
                raise ValueError(f"{name} must be fp32 with {m} values, got {t.dtype} {list(t.shape)}")
        return h.contiguous(), bound.reshape(m).contiguous(), step.reshape(m).contiguous()

    @staticmethod
    def _ste_out(out: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        if out is None:
            return torch.empty_like(like)
        if out.dtype != torch.float32 or out.shape != like.shape or not out.is_contiguous():
            raise ValueError(f"out must be contiguous fp32 {list(like.shape)}, got {out.dtype} {list(out.shape)}")
        return out

    def ste_clip_quant(self, h: torch.Tensor, bound: torch.Tensor, step: torch.Tensor,
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """The refinement's straight-through fake quantization ``q`` fp32 ``[M, I]`` of finite
        ``h``: per row ``z = minimum(maximum(h, -bound), bound) / step``,
        ``q = (z + (round(z) - z)) * step`` (``bound``, ``step`` fp32 ``[M, 1]``, ``step > 0``),
        the bits of those torch ops, in one pass (into ``out`` when given)."""
        h, b, s = self._ste_rows(h, bound, step)
        q = self._ste_out(out, h)
        self.kernel.lib.w4a8_ste_clip_quant(_ptr(h), h.shape[0], h.shape[1], _ptr(b), _ptr(s), _ptr(q),
                                            self.num_threads)
        return q

    def ste_clip_quant_terms(self, h: torch.Tensor, g: torch.Tensor, bound: torch.Tensor, step: torch.Tensor,
                             out: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, ...]:
        """The ``[M, I]`` terms of autograd's backward of :meth:`ste_clip_quant` at
        ``g = d loss / d q``, before their reductions to ``[M, 1]`` (the bits of autograd's
        backward functions, in one pass; see ``w4a8_ste_clip_quant_backward`` in the C source):
        ``(t_mul, t_div, t_min, t_max)``, the grads of ``step`` through ``q = a * step`` and
        ``z = clipped / step``, of ``bound`` through ``minimum`` and of ``-bound`` through
        ``maximum``. ``out``: four tensors to write into."""
        h, b, s = self._ste_rows(h, bound, step)
        if g.dtype != torch.float32 or g.shape != h.shape:
            raise ValueError(f"g must be fp32 {list(h.shape)}, got {g.dtype} {list(g.shape)}")
        g = g.contiguous()
        terms = tuple(self._ste_out(t, h) for t in (out or (None,) * 4))
        if len(terms) != 4:
            raise ValueError(f"out must hold 4 tensors, got {len(terms)}")
        self.kernel.lib.w4a8_ste_clip_quant_backward(_ptr(h), _ptr(g), h.shape[0], h.shape[1], _ptr(b), _ptr(s),
                                                     *(_ptr(t) for t in terms), self.num_threads)
        return terms

    def row_absmax(self, weight: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``(max |W| per row fp32 [N], whether W is finite)`` of fp32 ``weight`` ``[N, K]``, in
        one parallel pass (the clip search's channel maxima). Exact where finite (a max rounds
        nothing), except that an all-zero row gives +0 where torch's ``maximum(-min, max)`` may
        give -0; where not finite the maxima are not magnitudes."""
        if weight.dtype != torch.float32 or weight.dim() != 2 or weight.device.type != "cpu":
            raise ValueError(f"expected an fp32 [N, K] weight on the CPU, got {weight.dtype} "
                             f"{list(weight.shape)} on {weight.device}")
        weight = weight.contiguous()
        out = torch.empty(weight.shape[0], dtype=torch.float32)
        nonfinite = self.kernel.lib.w4a8_row_absmax(_ptr(weight), weight.shape[0], weight.shape[1], _ptr(out),
                                                    self.num_threads)
        return out, not nonfinite


_WARNED = False


def cpu_backend_factory() -> CpuBackend | None:
    """The registered factory: a :class:`CpuBackend` (ISA from ``$W4A8MOE_CPU_ISA``), or ``None``
    with a single warning per process where the kernel cannot be built here."""
    global _WARNED
    try:
        return CpuBackend(os.environ.get(ISA_ENV, "native"))
    except KernelBuildError as exc:
        if not _WARNED:
            _WARNED = True
            warnings.warn(f"w4a8moe: CPU kernel unavailable, using the reference backend ({exc})",
                          RuntimeWarning, stacklevel=2)
        return None


register_backend("cpu", cpu_backend_factory, priority=0)
