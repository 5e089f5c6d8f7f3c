"""Building and loading the compiled C++ kernels (`csrc/*.cc`), one build per instruction-set level.

A kernel library is compiled with the system C++ compiler on first use and cached on disk. Each build targets one
ISA level, which sets the vector width the sources are written for (`-DREPLKNET_LANES`) and the compiler's
target:

- "avx512": 16 floats a vector, x86-64-v4 (AVX-512 F/BW/CD/DQ/VL; 32 vector registers).
- "avx2": 8 floats, x86-64-v3 (AVX2, FMA; 16 vector registers).
- "portable": 4 floats and no x86-specific code, so the same source builds for ARM (NEON) or any other CPU; on
  x86 it targets x86-64-v2 (SSE4.2, every x86-64 CPU since about 2009), on 64-bit ARM armv8-a.

The level is the highest this CPU runs, or the environment variable REPLKNET_FN_ISA (avx512, avx2 or portable).
A level the CPU cannot run is an error, not a fallback: its code would die of an illegal instruction, and a
silent substitute would make a benchmark or test of that level measure another one.

16 floats a vector without AVX-512 compile to near-scalar code (measured on an AVX2-only AMD Zen 2: the direct
depthwise conv ~100x slower than with 8-float vectors), hence one build per level instead of one width for all.
"""
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
ISA_VARIABLE = "REPLKNET_FN_ISA"
ISA_LEVELS = ("avx512", "avx2", "portable")  # fastest first
LANES = {"avx512": 16, "avx2": 8, "portable": 4}
# The x86-64 psABI micro-architecture levels, with the /proc/cpuinfo flags each needs beyond the one below it.
X86_TARGETS = {"avx512": "x86-64-v4", "avx2": "x86-64-v3", "portable": "x86-64-v2"}
X86_REQUIRED_FLAGS = {
    "avx2": {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"},
    "avx512": {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave",
               "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
}
# -fno-math-errno lets sqrt vectorize (nothing here reads errno; pointwise.cc's AdamW, BENCHMARKS.md).
# -fno-trapping-math lets a loop with a branch (GELU's clamp of erf's argument) vectorize without AVX-512's masks:
# computing both sides may raise floating-point exception flags, which nothing here reads. Without it the AVX2 and
# portable builds ran GELU element by element, ~10x slower than the AVX-512 build (BENCHMARKS.md, Zen 4).
COMMON_FLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC", "-std=c++17")


def cache_dir():
    return Path(os.environ.get("REPLKNET_FN_CACHE", Path.home() / ".cache" / "replknet_fn"))


def cpu_description():
    """The CPU's model name, x86 family and model numbers, and instruction-set flags: what a build's speed and the
    code it may use depend on (virtual machines often show only a generic model name that two CPU generations
    share, e.g. "AMD EPYC"; the numbers tell them apart)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in lines if line.partition(":")[0].strip() in ("model name", "cpu family", "model",
                                                                           "flags", "Features")]
    return "\n".join(sorted(set(wanted)))


def cpu_model():
    """The CPU's model name with its x86 family and model numbers (e.g. "AMD EPYC (family 26, model 2)"), for
    reports and auto's verdicts."""
    fields = {}
    for line in cpu_description().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def is_x86():
    return platform.machine().lower() in ("x86_64", "amd64")  # 32-bit x86 builds the portable level only


@functools.lru_cache(maxsize=None)
def cpu_flags():
    flags = set()
    for line in cpu_description().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return frozenset(flags)


def supported_isa_levels():
    """The ISA levels this CPU runs, fastest first; "portable" always."""
    if not is_x86():
        return ("portable",)
    return tuple(level for level in ISA_LEVELS if X86_REQUIRED_FLAGS.get(level, set()) <= cpu_flags())


def isa_level():
    """The ISA level kernels are built for: REPLKNET_FN_ISA if set, else the highest this CPU runs."""
    supported = supported_isa_levels()
    requested = os.environ.get(ISA_VARIABLE, "").strip().lower()
    if not requested:
        return supported[0]
    return check_isa_level(requested, f"{ISA_VARIABLE}={requested}")


def check_isa_level(level, what=None):
    """`level` if this CPU runs it; otherwise a ValueError naming `what` was asked and the levels it runs."""
    what = what or f"ISA level {level!r}"
    supported = supported_isa_levels()
    if level not in ISA_LEVELS:
        raise ValueError(f"{what}: unknown ISA level; choose one of {list(ISA_LEVELS)}")
    if level not in supported:
        missing = sorted(X86_REQUIRED_FLAGS.get(level, set()) - cpu_flags()) if is_x86() else ["an x86 CPU"]
        raise ValueError(f"{what}: this CPU ({cpu_model()}) cannot run it (it lacks {', '.join(missing)}); "
                         f"it runs {', '.join(supported)}")
    return level


def compile_flags(isa):
    """Compiler flags for a build at ISA level `isa`. -mtune=native only schedules for this CPU: the instructions
    are those of the level, so a build runs on any CPU of that level."""
    if is_x86():
        target = [f"-march={X86_TARGETS[isa]}", "-mtune=native"]
        if isa == "avx512":
            target.append("-mprefer-vector-width=512")  # GCC's generic tuning would vectorize loops 256 bits wide
    elif platform.machine().lower() in ("aarch64", "arm64"):
        target = ["-march=armv8-a"]
    else:
        target = []
    return (*COMMON_FLAGS, *target, f"-DREPLKNET_LANES={LANES[isa]}")


@functools.lru_cache(maxsize=None)
def compiled_library(source, isa, fallback):
    """Path of the library compiled from `source` (a file in csrc/) for ISA level `isa`, built on first use, or
    None (after one warning that ends with `fallback`) if it cannot be.

    The file name is a hash of the source (and the headers beside it), the compiler, its flags (the ISA level's among
    them) and the CPU, so an edit, another compiler, level or machine sharing the cache gets its own build. The build
    writes a temporary file and renames it, so processes building at the same time never load a half-written
    library; within a process a second caller waits for a build under way (`build_in_background`) instead of starting
    another."""
    with _build_lock(source, isa):
        library, problem = _build(source, isa)
    if problem:
        before, after = problem
        warnings.warn(f"{before}{fallback}{after}")
    return library


_build_locks = {}
_build_locks_guard = threading.Lock()


def _build_lock(source, isa):
    with _build_locks_guard:
        return _build_locks.setdefault((Path(source), isa), threading.Lock())


def source_texts(source):
    """The text of `source` and of every header beside it (what its `#include "..."` lines can reach): an edit to a
    shared header (gelu.h) must rebuild each library that includes it."""
    return [source.read_text(), *(header.read_text() for header in sorted(source.parent.glob("*.h")))]


def _build(source, isa):
    """(library path or None, None or what went wrong as the text before and after the fallback's words):
    compiled_library's work, without its warning."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++"]
    compiler = next((shutil.which(name) for name in names if shutil.which(name)), None)
    if compiler is None:
        return None, (f"no C++ compiler found ({' or '.join(names)}; set CXX or install g++): ", "")
    flags = compile_flags(isa)
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\n".join([*source_texts(source), compiler, version, " ".join(flags),
                                    cpu_description()]).encode()).hexdigest()[:16]
    library = cache_dir() / f"{source.stem}-{isa}-{key}.so"
    if library.exists():
        return library, None
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=library.parent, prefix=library.stem, suffix=".tmp")
        os.close(handle)
    except OSError as error:
        return None, (f"cannot write the kernel cache ({error}; set REPLKNET_FN_CACHE): ", "")
    result = subprocess.run([compiler, *flags, str(source), "-o", temporary], capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(temporary)
        return None, (f"building {source.name} ({isa}) with {compiler} failed, ", f":\n{result.stderr[-2000:]}")
    os.chmod(temporary, 0o755)  # mkstemp's 0600 would hide a shared cache's build from other users
    os.replace(temporary, library)
    return library, None


def build_in_background(isa=None, sources=None):
    """Start building the kernel libraries (`sources`, default every csrc/*.cc) for `isa` (default this CPU's
    level), each in a daemon thread of its own, and return the threads. The entry scripts call this before they
    import MindSpore: g++ (Zen 3: dwconv 3.1 s, batchnorm 1.3, pointwise 0.8, one after another when the network's
    construction asked for them) then runs beside the imports and beside itself. Whoever needs a library first waits
    for its build (compiled_library); a build that fails here is tried again, with its warning, on first use."""
    sources = sorted(SOURCE_DIR.glob("*.cc")) if sources is None else sources

    def build(source):
        try:
            level = isa or isa_level()
            with _build_lock(source, level):
                _build(source, level)
        except Exception:  # noqa: BLE001 -- a bad REPLKNET_FN_ISA, an unreadable cache: the first use reports it
            return

    threads = [threading.Thread(target=build, args=(source,), name=f"build-{source.stem}", daemon=True)
               for source in sources]
    for thread in threads:
        thread.start()
    return threads


def per_isa_level(build):
    """`build(isa)` (which makes custom ops from a library) memoized per ISA level. Called without a level it
    builds for `isa_level()` as it is at that first call; it stays an lru_cache object because jitted code calls
    it (step.py) and MindSpore runs such an object at compile time where it would parse a plain function."""

    @functools.lru_cache(maxsize=None)
    def at_level(isa=None):
        return at_level(isa_level()) if isa is None else build(isa)

    return functools.update_wrapper(at_level, build)


def aot_call(library, name, arrays):
    """A no-argument callable running the entry point `name` of `library` on C-contiguous float32 numpy `arrays`
    (inputs, then the output), through the signature `ops.Custom(func_type="aot")` calls: the kernel alone, without
    MindSpore's op launch or a copy to the host (what `bench dwconv` compares with numpy's matmul)."""
    if any(array.dtype != "float32" or not array.flags.c_contiguous for array in arrays):
        raise ValueError(f"{name}: the kernels take C-contiguous float32 arrays")
    count = len(arrays)
    params = (ctypes.c_void_p * count)(*[array.ctypes.data for array in arrays])
    ndims = (ctypes.c_int * count)(*[array.ndim for array in arrays])
    dims = [(ctypes.c_int64 * array.ndim)(*array.shape) for array in arrays]
    shapes = (ctypes.POINTER(ctypes.c_int64) * count)(*[ctypes.cast(d, ctypes.POINTER(ctypes.c_int64)) for d in dims])
    dtypes = (ctypes.c_char_p * count)(*[b"float32"] * count)
    function = getattr(ctypes.CDLL(str(library)), name)

    def run():
        if function(count, params, ndims, shapes, dtypes, None, None) != 0:
            raise RuntimeError(f"{name} in {library} rejected its arguments")
        return arrays[-1]

    return run


def same_shape(shape, *_):
    return shape


def same_dtype(dtype, *_):
    return dtype
