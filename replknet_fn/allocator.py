"""Run the entry scripts on jemalloc (the copy MindSpore ships in its wheel) instead of glibc's malloc.

MindSpore's graph compiler builds and frees millions of small IR nodes; under glibc's malloc that is a large part of
compiling a train step (RepLKNet-31B here: ~45 s with glibc, ~32-36 s with jemalloc, the steps no slower; peak
memory 4.25 -> 3.93 GB with the settings below; BENCHMARKS.md). A process's malloc is fixed when it starts
(LD_PRELOAD), so `restart_with_jemalloc` restarts the script once, in the same process (exec: same PID, same
arguments), before MindSpore is loaded. It is a no-op where it cannot help or would get in the way:
- REPLKNET_FN_MALLOC=system (the escape hatch), or jemalloc already preloaded (after the restart, or by the user);
- under a debugger or tracer (a restart would leave it behind), in an interactive session, off Linux;
- when the wheel has no libjemalloc (then glibc's malloc, as before).
"""
import os
import sys
from importlib.util import find_spec
from pathlib import Path

VARIABLE = "REPLKNET_FN_MALLOC"
CHOICES = ("jemalloc", "system")
LIBRARY = "libjemalloc.so.2"
# Freed pages go back to the OS after a second (jemalloc's default: 10 s), by jemalloc's own thread: the compile's
# garbage is gone before the step's tensors need the memory (31B peak 4.10 -> 3.93 GB; purging at once, 0 ms,
# slowed the compile by ~7 s). A MALLOC_CONF the user set wins.
SETTINGS = "dirty_decay_ms:1000,muzzy_decay_ms:0,background_thread:true"


def bundled_jemalloc():
    """Path of the libjemalloc in the installed MindSpore wheel (found without importing MindSpore), or None."""
    spec = find_spec("mindspore")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / "lib" / LIBRARY
        if path.is_file():
            return path
    return None


def requested(environ):
    choice = environ.get(VARIABLE, "jemalloc").strip().lower() or "jemalloc"
    if choice not in CHOICES:
        raise ValueError(f"{VARIABLE}={environ[VARIABLE]!r}: choose one of {list(CHOICES)}")
    return choice


def preloaded(environ):
    return LIBRARY in environ.get("LD_PRELOAD", "")


def restart_command(orig_argv, environ, library):
    """(executable, argv, environment) that restarts this process on `library`, or None if it should not."""
    if library is None or requested(environ) == "system" or preloaded(environ) or not orig_argv:
        return None
    preload = " ".join(filter(None, [str(library), environ.get("LD_PRELOAD", "")]))
    return sys.executable, [sys.executable, *orig_argv[1:]], {"MALLOC_CONF": SETTINGS, **environ, "LD_PRELOAD": preload}


def restart_with_jemalloc():
    """Restart the running script on jemalloc (see the module docstring); returns only if it does not restart."""
    if not sys.platform.startswith("linux") or sys.gettrace() is not None or sys.flags.interactive:
        return
    command = restart_command(getattr(sys, "orig_argv", None), os.environ, bundled_jemalloc())
    if command is None:
        return
    executable, argv, environ = command
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(executable, argv, environ)
    except OSError:
        return  # could not restart: go on with glibc's malloc


def current():
    """What this process allocates with, for the log."""
    return "jemalloc (MindSpore's)" if preloaded(os.environ) else "glibc"
