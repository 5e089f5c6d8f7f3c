"""Entry scripts restart themselves on MindSpore's jemalloc, once, unless told not to or unable to."""
import os
import subprocess
import sys
import textwrap

import pytest

from replknet_fn import allocator

from conftest import ROOT

LIBRARY = allocator.bundled_jemalloc()
needs_jemalloc = pytest.mark.skipif(LIBRARY is None or not sys.platform.startswith("linux"),
                                    reason="no libjemalloc in this MindSpore wheel, or not Linux")

SCRIPT = textwrap.dedent("""
    import sys
    from replknet_fn.allocator import restart_with_jemalloc
    print("start", flush=True)
    if __name__ == "__main__":
        restart_with_jemalloc()
    maps = open("/proc/self/maps").read()
    print("jemalloc" if "libjemalloc" in maps else "glibc", "mindspore" in sys.modules, *sys.argv[1:])
""")


def run_script(tmp_path, environ=None, *args):
    script = tmp_path / "entry.py"
    script.write_text(SCRIPT)
    env = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-u", str(script), *args], env=dict(env, **(environ or {})),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.split("\n")


@needs_jemalloc
def test_a_script_restarts_once_on_jemalloc_with_its_arguments_and_without_loading_mindspore(tmp_path):
    lines = run_script(tmp_path, None, "--lr", "1e-3")
    # "start" twice: the first process printed it, then exec'd itself once; the restarted one found jemalloc.
    assert lines[:3] == ["start", "start", "jemalloc False --lr 1e-3"]


def test_the_system_malloc_when_asked(tmp_path):
    assert run_script(tmp_path, {allocator.VARIABLE: "system"})[:2] == ["start", "glibc False"]


def test_a_bad_choice_names_the_variable_and_the_choices():
    with pytest.raises(ValueError, match=r"REPLKNET_FN_MALLOC='tcmalloc'.*jemalloc.*system"):
        allocator.restart_command(["python", "x.py"], {allocator.VARIABLE: "tcmalloc"}, "/lib/libjemalloc.so.2")


def test_no_restart_when_already_preloaded_or_without_the_library():
    library = "/site/mindspore/lib/libjemalloc.so.2"
    assert allocator.restart_command(["python", "x.py"], {"LD_PRELOAD": library}, library) is None
    assert allocator.restart_command(["python", "x.py"], {}, None) is None
    executable, argv, environ = allocator.restart_command(["python", "-m", "replknet_fn.bench", "step"],
                                                          {"LD_PRELOAD": "/other.so", "HOME": "/h"}, library)
    assert argv == [sys.executable, "-m", "replknet_fn.bench", "step"] and executable == sys.executable
    assert environ == {"LD_PRELOAD": f"{library} /other.so", "HOME": "/h", "MALLOC_CONF": allocator.SETTINGS}
    _, _, environ = allocator.restart_command(["python", "x.py"], {"MALLOC_CONF": "narenas:1"}, library)
    assert environ["MALLOC_CONF"] == "narenas:1"
