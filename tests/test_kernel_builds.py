"""Kernel libraries: built in background threads while the entry scripts import MindSpore, and built again when a
header they include changes."""
import ctypes
import threading

from replknet_fn import kernels


def test_a_first_use_waits_for_the_background_build_instead_of_building_again(tmp_path, monkeypatch):
    monkeypatch.setenv("REPLKNET_FN_CACHE", str(tmp_path))
    builds, building = [], threading.Event()
    real_run = kernels.subprocess.run

    def counting_run(command, *args, **kwargs):
        if "-o" in command:
            builds.append((threading.current_thread().name, command[command.index("-o") - 1]))
            building.set()
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(kernels.subprocess, "run", counting_run)
    source = kernels.SOURCE_DIR / "pointwise.cc"
    [thread] = kernels.build_in_background(sources=[source])
    assert building.wait(timeout=60)  # the background's g++ is running: the first use comes during its build
    library = kernels.compiled_library(source, kernels.isa_level(), "no fallback needed")
    thread.join()
    assert library is not None and library.exists()
    assert builds == [("build-pointwise", str(source))]  # one g++, the background's
    assert list(tmp_path.glob("*.tmp")) == []
    assert [path.name for path in tmp_path.glob("pointwise-*.so")] == [library.name]


def test_a_background_build_that_cannot_run_stays_quiet_and_the_first_use_warns(tmp_path, monkeypatch, recwarn):
    monkeypatch.setenv("REPLKNET_FN_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    source = kernels.SOURCE_DIR / "pointwise.cc"
    [thread] = kernels.build_in_background(sources=[source])
    thread.join()
    assert len(recwarn) == 0
    assert kernels.compiled_library(source, kernels.isa_level(), "slower ops instead") is None
    assert [str(w.message) for w in recwarn] == [
        "no C++ compiler found (no-such-compiler; set CXX or install g++): slower ops instead"]


def test_an_edit_to_a_header_beside_the_source_builds_the_library_again(tmp_path, monkeypatch):
    monkeypatch.setenv("REPLKNET_FN_CACHE", str(tmp_path / "cache"))
    sources = tmp_path / "csrc"
    sources.mkdir()
    header, source = sources / "shared.h", sources / "probe.cc"
    source.write_text('#include "shared.h"\nextern "C" int probe() { return answer(); }\n')

    def build_and_call(answer):
        header.write_text(f"inline int answer() {{ return {answer}; }}\n")
        kernels.compiled_library.cache_clear()
        library = kernels.compiled_library(source, kernels.isa_level(), "no fallback needed")
        return library, ctypes.CDLL(str(library)).probe()

    try:
        (first, one), (second, two) = build_and_call(1), build_and_call(2)
    finally:
        kernels.compiled_library.cache_clear()
    assert (one, two) == (1, 2) and first != second
