"""MindSpore's compile cache for the jitted train step: a run whose step was compiled before starts in seconds.

Measured with MindSpore 2.8 on CPU (MS_COMPILER_CACHE_ENABLE / MS_COMPILER_CACHE_PATH):
- A cached jitted Cell (`step.StepCell`) reloads with its parameters bound: a second run's losses equal the first's,
  bit for bit, and RepLKNet-31B's first step starts in seconds instead of minutes.
- A cached jitted plain function reloads reading garbage (NaN or 1e24 losses). So the cache is switched on only
  while the train step compiles (`with_compile_cache`), never for the eval step or other graphs.
- MindSpore keys a cache by the source files of the entry script and its imports only: a run with another model,
  batch size or optimizer setting silently reloads the wrong graph. So each step graph gets its own directory,
  named by a hash of everything else it depends on (`step_cache_dir`).
- Within one process only the first graph compiled with the cache on may use it: a second train step (another
  run's `main()` in the same process, as in the tests) that loads it trains the first step's parameters, not its
  own (measured: resuming in-process then ended with other weights). `with_compile_cache` therefore returns the
  step unchanged after the first use in a process, and says so.
"""
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import mindspore as ms
from mindspore.common import api as mindspore_api

from replknet_fn import dwconv, kernels
from replknet_fn.config import OPTIONS

ENABLE, PATH = "MS_COMPILER_CACHE_ENABLE", "MS_COMPILER_CACHE_PATH"
# Every edit of the sources or the config makes a new entry (4-15 MB each, measured): the cache keeps the most
# recently used ones and deletes the rest, but never one used within the last hour (another run may be using it).
KEEP_ENTRIES = 16
MIN_AGE_SECONDS = 3600
_used_in_this_process = False


def cache_root(setting):
    """The `compile_cache_dir` config value as a directory, or None when the cache is off ("")."""
    if not setting:
        return None
    return kernels.cache_dir() / "compile_cache" if setting == "auto" else Path(setting).expanduser()


def source_digest():
    """Hash of this package's Python and C++ sources and of the entry script. MindSpore hashes sources too, but
    skips every file under a sys.path entry, which includes this package when run from the checkout."""
    package = Path(__file__).resolve().parent
    files = sorted(package.glob("*.py")) + sorted(package.glob("csrc/*"))
    entry = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if entry is not None and entry.is_file():
        files.append(entry)
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def step_cache_dir(config, world_size):
    """<compile_cache_dir>/train_step-<hash of what the step graph depends on besides MindSpore's own key: the config
    (model, batch and input size, optimizer, loss scaling, ...), the number of ranks, this package's sources, the
    MindSpore and Python versions, the CPU and ISA level the kernels are compiled for, and auto's conv verdicts
    (which impl each conv of the graph runs)>. None when the cache is off, and for multi-process runs (a cached
    graph with communication ops is untested)."""
    root = cache_root(config.compile_cache_dir)
    if root is None or world_size > 1:
        return None
    graph_config = {key: value for key, value in config.items() if key not in OPTIONS or OPTIONS[key].graph}
    description = json.dumps({"config": graph_config, "world_size": world_size, "sources": source_digest(),
                              "mindspore": ms.__version__, "python": platform.python_version(),
                              "cpu": kernels.cpu_description(), "isa": kernels.isa_level(),
                              "auto_verdicts": dwconv.stored_verdicts(kernels.isa_level())},
                             sort_keys=True, default=str)
    return root / f"train_step-{hashlib.sha256(description.encode()).hexdigest()[:16]}"


def prune(root, keep=KEEP_ENTRIES, min_age_seconds=MIN_AGE_SECONDS):
    """Delete the train_step-* entries of `root` beyond the `keep` most recently used, if unused for a while."""
    entries = sorted(Path(root).glob("train_step-*"), key=lambda path: path.stat().st_mtime, reverse=True)
    for entry in entries[keep:]:
        if time.time() - entry.stat().st_mtime > min_age_seconds:
            shutil.rmtree(entry, ignore_errors=True)


def cache_available():
    """False once a train step in this process has used the compile cache (see the module docstring)."""
    return not _used_in_this_process


def with_compile_cache(step, directory):
    """`step` (a jitted `StepCell`) whose first call, the one that compiles, loads or fills the cache in
    `directory`. Later calls run `step` directly. Returns `step` itself if a step in this process used the cache
    already."""
    global _used_in_this_process
    if _used_in_this_process:
        return step
    _used_in_this_process = True
    directory = Path(directory)
    if directory.exists():
        os.utime(directory)  # most recently used: `prune` keeps it
    else:
        prune(directory.parent, keep=KEEP_ENTRIES - 1)
    compiled = False
    # MindSpore hashes its entry script, recorded as sys.argv[0] when mindspore is imported: "-m" under
    # `python -m`, which the cache then fails to open. By the time a step runs, sys.argv[0] is the real file.
    if not os.path.isfile(mindspore_api.entry_script_path or "") and os.path.isfile(sys.argv[0]):
        mindspore_api.entry_script_path = os.path.realpath(sys.argv[0])

    def cached_step(*args):
        nonlocal compiled
        if compiled:
            return step(*args)
        saved = {name: os.environ.get(name) for name in (ENABLE, PATH)}
        os.environ[ENABLE], os.environ[PATH] = "1", str(directory)
        existed = directory.exists()
        try:
            return step(*args)
        except BaseException:
            # A compile that failed may still have written an entry; a later run would load it and fail at once.
            if not existed:
                shutil.rmtree(directory, ignore_errors=True)
            raise
        finally:
            compiled = True
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    return cached_step
