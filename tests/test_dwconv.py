"""Every large-kernel depthwise conv implementation, in every kernel build this CPU runs, computes what the native
conv computes: the output, the input gradient, the weight gradient and the bias gradient, to float32 rounding;
`auto` runs whichever of direct and native it measured faster, and remembers it per machine and kernel build."""
import ctypes
import json
import logging
import os
import threading
import time

import mindspore as ms
import numpy as np
import pytest

from replknet_fn import dwconv, kernels, model

from conftest import relative_error

TOLERANCE = 1e-5
FAST_IMPLS = [impl for impl in dwconv.IMPLEMENTATIONS if impl != "native"]
ISA_LEVELS = kernels.supported_isa_levels()

# (batch, channels, height, width, kernel_size): even and odd sizes, non-square maps, kernels larger than the map,
# a batch larger than a vector (a channel's planes in two vectors, the last one partly empty), kernels that reach
# across the whole map width (K >= 2W - 1: the weight gradient by row pairs; 31B's last stage is K13 on 7x7), and
# across the whole map both ways on maps up to 8 wide (by output rows on AVX2: rows of 6-8 pixels, a one-row map
# smaller than a vector, rows that fill a vector exactly, odd batches).
SHAPES = [
    (2, 3, 7, 7, 13),
    (5, 2, 5, 7, 13),
    (3, 3, 1, 6, 11),
    (4, 2, 8, 8, 15),
    (2, 2, 6, 6, 11),
    (9, 2, 11, 7, 15),
    (3, 2, 9, 4, 9),
    (1, 3, 7, 7, 5),
    (2, 2, 8, 6, 7),
    (2, 3, 9, 16, 13),
    (3, 2, 17, 33, 31),
    (1, 2, 4, 5, 31),
    (2, 4, 14, 14, 27),
    (2, 2, 40, 21, 11),
    (2, 3, 5, 4, 1),
    (17, 2, 6, 5, 9),
]


def shape_id(shape):
    batch, channels, height, width, kernel_size = shape
    return f"B{batch}C{channels}_{height}x{width}_K{kernel_size}"


def outputs_and_gradients(conv, x, out_grad, jit):
    """conv(x), d/dx, and d/dparameter of sum(conv(x) * out_grad)."""
    def loss(x):
        out = conv(x)
        return (out * out_grad).sum(), out

    grad_fn = ms.value_and_grad(loss, 0, conv.trainable_params(), has_aux=True)
    if jit:
        grad_fn = ms.jit(grad_fn)
    (_, out), (x_grad, param_grads) = grad_fn(x)
    return [out.asnumpy(), x_grad.asnumpy()] + [grad.asnumpy() for grad in param_grads]


def same_weights(reference, conv):
    for source, target in zip(reference.trainable_params(), conv.trainable_params()):
        target.set_data(source.data.copy())


def random_tensor(rng, shape):
    return ms.Tensor(rng.standard_normal(shape).astype(np.float32))


def assert_matches_native(impl, shape, jit, has_bias=False, seed=0, isa=None, stride=1):
    batch, channels, height, width, kernel_size = shape
    rng = np.random.default_rng(seed)
    native = dwconv.depthwise_conv(channels, kernel_size, "native", has_bias, stride=stride)
    conv = dwconv.depthwise_conv(channels, kernel_size, impl, has_bias, isa=isa, stride=stride)
    if has_bias:
        native.bias.set_data(random_tensor(rng, (channels,)))
    same_weights(native, conv)
    x = random_tensor(rng, (batch, channels, height, width))
    out_grad = random_tensor(rng, (batch, channels, -(-height // stride), -(-width // stride)))
    expected = outputs_and_gradients(native, x, out_grad, jit)
    actual = outputs_and_gradients(conv, x, out_grad, jit)
    names = ["output", "input grad", "weight grad", "bias grad"]
    for name, got, want in zip(names, actual, expected):
        assert got.shape == want.shape, name
        assert relative_error(got, want) < TOLERANCE, name


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("isa", ISA_LEVELS)
def test_output_and_gradients_match_native(isa, shape):
    assert_matches_native("direct", shape, jit=False, isa=isa)


@pytest.mark.parametrize("shape", [(2, 3, 9, 16, 13), (1, 2, 4, 5, 31)], ids=shape_id)
@pytest.mark.parametrize("isa", ISA_LEVELS)
def test_output_and_gradients_match_native_under_jit(isa, shape):
    assert_matches_native("direct", shape, jit=True, isa=isa)


@pytest.mark.parametrize("jit", [False, True], ids=["pynative", "jit"])
@pytest.mark.parametrize("shape", [(2, 3, 8, 8, 3), (3, 2, 7, 9, 3), (1, 3, 1, 2, 3), (17, 2, 5, 5, 5)], ids=shape_id)
@pytest.mark.parametrize("isa", ISA_LEVELS)
def test_stride_2_output_and_gradients_match_native(isa, shape, jit):
    """Stride 2 (the stem's and the transitions' 3x3): even and odd map sizes, a map smaller than the kernel."""
    assert_matches_native("direct", shape, jit, isa=isa, stride=2)


def test_stride_2_has_the_native_conv_s_parameters_and_attributes():
    native, conv = (dwconv.depthwise_conv(4, 3, impl, stride=2) for impl in ("native", "direct"))
    assert [(p.name, p.shape) for p in conv.get_parameters()] == [(p.name, p.shape) for p in native.get_parameters()]
    assert conv.stride == native.stride and conv.padding == native.padding and conv.group == native.group
    with pytest.raises(ValueError, match="stride 3"):
        dwconv.depthwise_conv(4, 3, "direct", stride=3)


@pytest.mark.parametrize("jit", [False, True], ids=["pynative", "jit"])
@pytest.mark.parametrize("isa", ISA_LEVELS)
def test_bias_gradient_matches_native(isa, jit):
    assert_matches_native("direct", (2, 3, 11, 10, 9), jit, has_bias=True, isa=isa)


@pytest.mark.parametrize("jit", [False, True], ids=["pynative", "jit"])
@pytest.mark.parametrize("shape", [(3, 2, 17, 33, 31), (2, 3, 5, 4, 1)], ids=shape_id)
def test_auto_matches_native(shape, jit):
    assert_matches_native("auto", shape, jit, has_bias=True)


def test_the_default_build_is_the_best_level_this_cpu_runs():
    assert dwconv.depthwise_conv(2, 5, "direct").isa == ISA_LEVELS[0]


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_parameters_are_those_of_the_native_conv(impl):
    for has_bias in (False, True):
        native = dwconv.depthwise_conv(6, 13, "native", has_bias)
        conv = dwconv.depthwise_conv(6, 13, impl, has_bias)
        assert [(p.name, p.shape) for p in conv.get_parameters()] == \
            [(p.name, p.shape) for p in native.get_parameters()]


def test_one_jitted_cell_follows_batch_and_map_size_changes():
    conv = dwconv.depthwise_conv(2, 9, "direct")
    native = dwconv.depthwise_conv(2, 9, "native")
    same_weights(native, conv)
    rng = np.random.default_rng(1)
    forward, reference = ms.jit(conv), ms.jit(native)
    for shape in [(1, 2, 8, 8), (3, 2, 8, 8), (2, 2, 5, 12)]:
        x = random_tensor(rng, shape)
        assert relative_error(forward(x).asnumpy(), reference(x).asnumpy()) < TOLERANCE


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_float16_runs_the_native_conv(impl):
    native = dwconv.depthwise_conv(2, 7, "native")
    conv = dwconv.depthwise_conv(2, 7, impl)
    same_weights(native, conv)
    x = random_tensor(np.random.default_rng(4), (1, 2, 6, 6)).astype(ms.float16)
    native.to_float(ms.float16)
    conv.to_float(ms.float16)
    np.testing.assert_array_equal(conv(x).asnumpy(), native(x).asnumpy())


def test_unknown_implementation_lists_the_valid_ones():
    with pytest.raises(ValueError, match="native"):
        dwconv.depthwise_conv(4, 7, "cuda")


def test_an_undecided_shape_runs_direct_for_large_kernels_and_native_at_1x1():
    for kernel_size, size, channels in [(31, 56, 128), (29, 28, 256), (27, 14, 512), (13, 7, 1024), (3, 2, 64)]:
        assert dwconv.direct_when_undecided(kernel_size)
    assert not dwconv.direct_when_undecided(1)


def test_auto_runs_native_without_touching_the_direct_kernel():
    def fail(*_):
        raise AssertionError("the direct kernel ran")

    conv = dwconv.depthwise_conv(3, 1, "auto")
    conv.direct = fail
    conv(random_tensor(np.random.default_rng(3), (2, 3, 6, 6)))


def test_without_a_compiler_it_warns_once_and_runs_native(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("REPLKNET_FN_CACHE", str(tmp_path / "cache"))
    kernels.compiled_library.cache_clear()
    dwconv.direct_conv_op.cache_clear()
    dwconv.gradient_ops.cache_clear()
    try:
        with pytest.warns(UserWarning, match="compiler"):
            conv = dwconv.depthwise_conv(2, 7, "direct")
        native = dwconv.depthwise_conv(2, 7, "native")
        same_weights(native, conv)
        x = random_tensor(np.random.default_rng(2), (1, 2, 6, 6))
        np.testing.assert_array_equal(conv(x).asnumpy(), native(x).asnumpy())
    finally:
        kernels.compiled_library.cache_clear()
        dwconv.direct_conv_op.cache_clear()
        dwconv.gradient_ops.cache_clear()


# --- auto: measured verdicts -------------------------------------------------------------------------------------

SHAPE = (2, 4, 8, 8, 5)


@pytest.fixture
def verdict_cache(monkeypatch, tmp_path):
    """An empty verdict cache (on disk and in memory) and no shape logged yet in this process."""
    monkeypatch.setenv("REPLKNET_FN_CACHE", str(tmp_path))
    monkeypatch.setattr(dwconv, "_verdicts", {})
    monkeypatch.setattr(dwconv, "_logged", set())
    return tmp_path


def fake_timings(monkeypatch, seconds, by_batch=False):
    """Make dwconv time convs by `seconds` {(impl, mode): s}, or {(impl, mode, batch): s} `by_batch`; returns the
    list of those keys timed."""
    timed = []

    def time_conv(impl, mode, shape, isa, repeat=1):
        key = (impl, mode, shape[0]) if by_batch else (impl, mode)
        timed.append(key)
        return seconds[key]

    monkeypatch.setattr(dwconv, "time_conv", time_conv)
    return timed


def measure_in_this_process(monkeypatch):
    """decide_for measures here, where the fake timings are, instead of in a child process."""
    monkeypatch.setattr(dwconv, "measure_in_child_process", lambda undecided: None)


def forget_this_process(monkeypatch):
    monkeypatch.setattr(dwconv, "_verdicts", {})
    monkeypatch.setattr(dwconv, "_logged", set())


def test_auto_picks_direct_without_timing_the_native_backward_when_native_forward_alone_is_slower(
        verdict_cache, monkeypatch):
    timed = fake_timings(monkeypatch, {("direct", "forward_backward"): 0.07, ("native", "forward"): 0.6})
    assert dwconv.decide(SHAPE, ISA_LEVELS[0]) == "direct"
    assert ("native", "forward_backward") not in timed


def test_auto_picks_native_where_native_is_faster(verdict_cache, monkeypatch):
    fake_timings(monkeypatch, {("direct", "forward_backward"): 0.05, ("native", "forward"): 0.004,
                               ("native", "forward_backward"): 0.03})
    assert dwconv.decide(SHAPE, ISA_LEVELS[0]) == "native"


def test_auto_picks_direct_where_its_forward_and_backward_is_faster(verdict_cache, monkeypatch):
    fake_timings(monkeypatch, {("direct", "forward_backward"): 0.05, ("native", "forward"): 0.02,
                               ("native", "forward_backward"): 2.0})
    assert dwconv.decide(SHAPE, ISA_LEVELS[0]) == "direct"


LARGE_SHAPE = (4, 128, 56, 56, 31)  # RepLKNet-31B's first stage at batch 4: 1.5e9 multiply-adds


def test_a_large_conv_where_native_is_slower_on_one_image_is_decided_without_timing_native_on_the_batch(
        verdict_cache, monkeypatch):
    timed = fake_timings(monkeypatch, {("direct", "forward_backward", 4): 0.05, ("native", "forward", 1): 0.25},
                         by_batch=True)
    assert dwconv.multiply_adds(*LARGE_SHAPE) >= dwconv.ONE_IMAGE_FIRST_MULTIPLY_ADDS
    assert dwconv.decide(LARGE_SHAPE, ISA_LEVELS[0]) == "direct"
    assert timed == [("direct", "forward_backward", 4), ("native", "forward", 1)]


def test_a_large_conv_where_one_image_does_not_decide_is_timed_on_the_batch(verdict_cache, monkeypatch):
    timed = fake_timings(monkeypatch, {("direct", "forward_backward", 4): 0.05,
                                       ("native", "forward", 1): 0.02, ("native", "forward", 4): 0.03,
                                       ("native", "forward_backward", 4): 0.2}, by_batch=True)
    assert dwconv.decide(LARGE_SHAPE, ISA_LEVELS[0]) == "direct"
    assert timed == [("direct", "forward_backward", 4), ("native", "forward", 1), ("native", "forward", 4),
                     ("native", "forward_backward", 4)]


def test_a_small_conv_is_timed_on_the_batch_only(verdict_cache, monkeypatch):
    timed = fake_timings(monkeypatch, {("direct", "forward_backward", 2): 0.05, ("native", "forward", 2): 0.6},
                         by_batch=True)
    assert dwconv.multiply_adds(*SHAPE) < dwconv.ONE_IMAGE_FIRST_MULTIPLY_ADDS
    assert dwconv.decide(SHAPE, ISA_LEVELS[0]) == "direct"
    assert timed == [("direct", "forward_backward", 2), ("native", "forward", 2)]


def test_a_close_call_times_again_without_compiling_again(verdict_cache, monkeypatch):
    made, calls = [], []

    def fake_conv_runs(impl, *shape, isa=None):  # graphs that take as long as a close call's
        made.append(impl)

        def run(mode, seconds):
            def call():
                calls.append((impl, mode))
                time.sleep(seconds)
                return ms.Tensor(0.0)
            return call

        return {"forward": run("forward", 0.001), "forward_backward": run("forward_backward", 0.004)}

    monkeypatch.setattr(dwconv, "conv_runs", fake_conv_runs)
    monkeypatch.setattr(dwconv, "CLOSE_CALL_RATIO", float("inf"))  # a close call whatever the sleeps' jitter
    _, seconds = dwconv.measure(SHAPE, ISA_LEVELS[0])
    assert set(seconds) == {"direct_forward_backward", "native_forward", "native_forward_backward"}
    assert sorted(made) == ["direct", "native", "native"]  # one graph each: direct f+b, native forward, native f+b
    # compiling run, one timed run, then CLOSE_CALL_REPEATS more
    assert calls.count(("direct", "forward_backward")) == calls.count(("native", "forward_backward")) == 7
    assert dwconv.compiled_run.cache_info().currsize == 0  # the graphs go with the measuring


def test_a_close_call_is_timed_again_before_auto_picks(verdict_cache, monkeypatch):
    timed = fake_timings(monkeypatch, {("direct", "forward_backward"): 0.050, ("native", "forward"): 0.02,
                                       ("native", "forward_backward"): 0.045})
    assert dwconv.decide(SHAPE, ISA_LEVELS[0]) == "native"
    assert timed.count(("native", "forward_backward")) == 2 and timed.count(("direct", "forward_backward")) == 2


def test_a_verdict_is_stored_on_disk_and_reused_by_the_next_process(verdict_cache, monkeypatch):
    timed = fake_timings(monkeypatch, {("direct", "forward_backward"): 0.05, ("native", "forward"): 0.004,
                                       ("native", "forward_backward"): 0.03})
    isa = ISA_LEVELS[0]
    dwconv.decide(SHAPE, isa)
    (stored,) = verdict_cache.glob("dwconv_auto-*.json")
    assert json.loads(stored.read_text())["verdicts"][dwconv.shape_key(*SHAPE)]["impl"] == "native"
    forget_this_process(monkeypatch)
    timed.clear()
    assert dwconv.decide(SHAPE, isa) == "native" and timed == []


def test_verdicts_are_kept_per_cpu_and_kernel_build(verdict_cache, monkeypatch):
    timed = fake_timings(monkeypatch, {("direct", "forward_backward"): 0.05, ("native", "forward"): 0.004,
                                       ("native", "forward_backward"): 0.03})
    for isa in ISA_LEVELS:
        dwconv.decide(SHAPE, isa)
    assert len(set(verdict_cache.glob("dwconv_auto-*.json"))) == len(ISA_LEVELS)
    forget_this_process(monkeypatch)
    timed.clear()
    monkeypatch.setattr(kernels, "cpu_description", lambda: "model name : another CPU")
    dwconv.decide(SHAPE, ISA_LEVELS[-1])
    assert ("direct", "forward_backward") in timed


def test_each_shape_is_logged_once(verdict_cache, monkeypatch, caplog):
    fake_timings(monkeypatch, {("direct", "forward_backward"): 0.07, ("native", "forward"): 0.6})
    with caplog.at_level(logging.INFO, logger="replknet_fn.dwconv"):
        for _ in range(3):
            dwconv.decide(SHAPE, ISA_LEVELS[0])
    (record,) = caplog.records
    assert dwconv.shape_key(*SHAPE) in record.getMessage() and "direct" in record.getMessage()


class TwoConvs(ms.nn.Cell):
    def __init__(self):
        super().__init__()
        self.large = dwconv.depthwise_conv(4, 5, "auto")
        self.pool = ms.nn.AvgPool2d(2, 2)
        self.small = dwconv.depthwise_conv(4, 3, "auto")

    def construct(self, x):
        return self.small(self.pool(self.large(x)))


def test_decide_for_finds_each_conv_input_shape_and_construct_follows_the_verdicts(verdict_cache, monkeypatch):
    net = TwoConvs()
    net.set_train(True)
    native_at = dwconv.shape_key(3, 4, 4, 4, 3)

    def time_conv(impl, mode, shape, isa, repeat=1):
        native_wins = dwconv.shape_key(*shape) == native_at
        return {("direct", "forward_backward"): 0.05, ("native", "forward"): 0.001 if native_wins else 0.6,
                ("native", "forward_backward"): 0.01}[(impl, mode)]

    monkeypatch.setattr(dwconv, "time_conv", time_conv)
    measure_in_this_process(monkeypatch)
    verdicts = dwconv.decide_for(net, (3, 4, 8, 8))
    assert verdicts == {dwconv.shape_key(3, 4, 8, 8, 5): "direct", native_at: "native"}
    assert net.training and net.large.training

    def fail(*_):
        raise AssertionError("the direct kernel ran")

    net.small.direct = fail
    net(random_tensor(np.random.default_rng(5), (3, 4, 8, 8)))  # large: direct; small: native


def test_decide_for_measures_in_a_child_process_and_keeps_its_verdicts(verdict_cache, monkeypatch, caplog):
    def fail(*_):
        raise AssertionError("measured in the training process")

    monkeypatch.setattr(dwconv, "time_conv", fail)
    # The child imports this package, not whatever the current directory holds under the same name.
    decoy = verdict_cache / "cwd" / "replknet_fn"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise ImportError('a decoy package')\n")
    monkeypatch.chdir(decoy.parent)
    net = TwoConvs()
    with caplog.at_level(logging.INFO, logger="replknet_fn.dwconv"):
        verdicts = dwconv.decide_for(net, (3, 4, 8, 8))
    keys = [dwconv.shape_key(3, 4, 8, 8, 5), dwconv.shape_key(3, 4, 4, 4, 3)]
    assert sorted(verdicts) == sorted(keys) and set(verdicts.values()) <= {"direct", "native"}
    (stored,) = verdict_cache.glob("dwconv_auto-*.json")
    on_disk = json.loads(stored.read_text())["verdicts"]
    assert {key: on_disk[key]["impl"] for key in keys} == verdicts
    for key in keys:
        (record,) = [record for record in caplog.records if key in record.getMessage()]
        assert "measured now, in a child process: direct_forward_backward" in record.getMessage()
    # Stored where this process (and the next run) looks them up, measured with its threads: a child that inherited
    # the OMP_NUM_THREADS=1 MindSpore sets in the C environment timed one thread and stored them under another key.
    isa = net.large.isa
    assert stored == dwconv.verdict_file(isa)
    assert json.loads(stored.read_text())["machine"]["threads"] == dwconv.machine_key(isa)["threads"]
    monkeypatch.setattr(dwconv, "_verdicts", {})
    monkeypatch.setattr(dwconv, "measure_in_child_process", fail)
    assert dwconv.decide_for(net, (3, 4, 8, 8)) == verdicts


def test_when_the_child_process_fails_decide_for_measures_here_and_says_why(verdict_cache, monkeypatch, caplog):
    monkeypatch.setattr(dwconv, "CHILD_COMMAND", "import sys; sys.exit('no measuring today')")
    timed = fake_timings(monkeypatch, {("direct", "forward_backward"): 0.05, ("native", "forward"): 0.6})
    with caplog.at_level(logging.INFO, logger="replknet_fn.dwconv"):
        verdicts = dwconv.decide_for(TwoConvs(), (3, 4, 8, 8))
    assert set(verdicts.values()) == {"direct"} and len(timed) == 4
    (warning,) = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert "exit status 1: no measuring today" in warning.getMessage()
    assert "measuring in this one" in warning.getMessage()


def test_measuring_processes_take_turns_and_a_waiting_one_uses_what_the_other_stored(verdict_cache, monkeypatch,
                                                                                       capsys):
    # The ranks of a data-parallel run on one machine each start a child; the lock makes them measure in turn, so
    # none times its convs on cores another one is timing on, and the later ones reuse the first one's verdicts.
    isa = ISA_LEVELS[0]
    stored_by_the_other, measured_here = (2, 4, 8, 8, 5), (2, 4, 8, 8, 7)
    timed = fake_timings(monkeypatch, {("direct", "forward_backward"): 0.05, ("native", "forward"): 0.6})
    request = json.dumps({"device_target": "CPU", "shapes": [[list(stored_by_the_other), isa],
                                                             [list(measured_here), isa]]})
    with dwconv.measuring_lock():
        child = threading.Thread(target=dwconv.child_process_main, args=(request,))
        child.start()
        time.sleep(0.5)  # without the lock, the child would measure both shapes now
        dwconv.store_verdict(isa, dwconv.shape_key(*stored_by_the_other), "native", {"native_forward": 0.001})
    child.join()
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(entry["impl"], entry["how"]) for entry in report["verdicts"]] == [
        ("native", "measured meanwhile by another process"), ("direct", "measured now, in a child process")]
    assert len(timed) == 2  # measured_here's direct forward+backward and native forward


def test_the_child_process_s_warnings_reach_the_training_log(verdict_cache, monkeypatch, caplog):
    report = {"verdicts": [{"isa": ISA_LEVELS[0], "key": dwconv.shape_key(*SHAPE), "impl": "direct",
                            "seconds": {"direct_forward_backward": 0.05}, "how": "measured now, in a child process"}],
              "warnings": ["cannot write /nowhere/dwconv_auto.json (read-only)"]}
    monkeypatch.setattr(dwconv, "CHILD_COMMAND", f"print({json.dumps(json.dumps(report))})")
    with caplog.at_level(logging.INFO, logger="replknet_fn.dwconv"):
        dwconv.measure_in_child_process([(SHAPE, ISA_LEVELS[0])])
    assert dwconv.stored_verdicts(ISA_LEVELS[0])[dwconv.shape_key(*SHAPE)] == "direct"
    (warning,) = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert "in its child process: cannot write /nowhere/dwconv_auto.json" in warning.getMessage()


def test_the_child_process_reports_what_it_logged_as_warnings(verdict_cache, monkeypatch, capsys):
    fake_timings(monkeypatch, {("direct", "forward_backward"): 0.05, ("native", "forward"): 0.6})
    monkeypatch.setattr(dwconv, "store_verdict", lambda *_: dwconv.log.warning("cannot write the verdict file"))
    dwconv.child_process_main(json.dumps({"device_target": "CPU", "shapes": [[list(SHAPE), ISA_LEVELS[0]]]}))
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["warnings"] == ["cannot write the verdict file"]
    assert report["verdicts"][0]["impl"] == "direct"


def flatten(result):
    if isinstance(result, (tuple, list)):
        return [leaf for item in result for leaf in flatten(item)]
    return [result.asnumpy()]


def test_what_auto_times_is_the_conv_and_its_gradients_for_an_output_gradient():
    shape = (2, 3, 7, 7, 13)
    results = {}
    for impl in ("direct", "native"):
        ms.set_seed(0)  # the same initial weights for both
        runs = dwconv.conv_runs(impl, *shape)
        results[impl] = {mode: flatten(run()) for mode, run in runs.items()}
    for mode, names in [("forward", ["output"]), ("forward_backward", ["output", "input grad", "weight grad"])]:
        direct, native = results["direct"][mode], results["native"][mode]
        assert len(direct) == len(native) == len(names), mode
        for name, got, want in zip(names, direct, native):
            assert relative_error(got, want) < TOLERANCE, (mode, name)


def kernel_outputs(library, x, out_grad, weight):
    """(output, input grad, weight grad) of the direct kernel's entry points called from numpy (kernels.aot_call)."""
    out, dx, dweight = np.empty_like(x), np.empty_like(x), np.empty_like(weight)
    kernels.aot_call(library, "dwconv_forward", [x, weight, out])()
    kernels.aot_call(library, "dwconv_input_grad", [out_grad, weight, dx])()
    kernels.aot_call(library, "dwconv_weight_grad", [x, out_grad, weight, dweight])()
    return out, dx, dweight


@pytest.mark.parametrize("isa", ISA_LEVELS)
def test_the_kernels_called_from_numpy_compute_the_native_conv_and_its_gradients(isa):
    # What `bench dwconv --impls kernel` times: the entry points called without MindSpore (kernels.aot_call).
    batch, channels, height, width, kernel_size = shape = (2, 3, 9, 16, 13)
    rng = np.random.default_rng(0)
    native = dwconv.depthwise_conv(channels, kernel_size, "native")
    x, out_grad = (rng.standard_normal((batch, channels, height, width)).astype(np.float32) for _ in range(2))
    expected = outputs_and_gradients(native, ms.Tensor(x), ms.Tensor(out_grad), jit=False)
    actual = kernel_outputs(dwconv.library(isa), x, out_grad, native.weight.asnumpy())
    for name, got, want in zip(["output", "input grad", "weight grad"], actual, expected):
        assert relative_error(got, want) < TOLERANCE, (name, shape_id(shape))


def test_the_kernels_called_from_numpy_refuse_other_dtypes():
    x = np.zeros((1, 1, 3, 3))
    with pytest.raises(ValueError, match="dwconv_forward: the kernels take C-contiguous float32"):
        kernels.aot_call(dwconv.library(kernels.isa_level()), "dwconv_forward", [x, x, x])


def test_auto_decides_stride_2_convs_apart_from_stride_1(verdict_cache, monkeypatch):
    net = ms.nn.SequentialCell([dwconv.depthwise_conv(4, 3, "auto", stride=2), dwconv.depthwise_conv(4, 3, "auto")])
    shapes = []

    def time_conv(impl, mode, shape, isa, repeat=1):
        shapes.append(tuple(shape))
        return {("direct", "forward_backward"): 0.05, ("native", "forward"): 0.6}[(impl, mode)]

    monkeypatch.setattr(dwconv, "time_conv", time_conv)
    measure_in_this_process(monkeypatch)
    verdicts = dwconv.decide_for(net, (2, 4, 8, 8))
    assert set(verdicts) == {"B2C4_8x8_K3_S2", "B2C4_4x4_K3"}
    assert (2, 4, 8, 8, 3, 2) in shapes
    runs = dwconv.conv_runs("direct", 2, 4, 8, 8, 3, 2)
    out, _ = runs["forward_backward"]()
    assert out.shape == (2, 4, 4, 4)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one CPU: one thread")
@pytest.mark.parametrize("shape", [(8, 512, 7, 7, 13), (4, 64, 24, 24, 13)], ids=shape_id)
@pytest.mark.parametrize("isa", ISA_LEVELS)
def test_the_kernels_give_the_same_bits_on_one_thread_and_on_two(isa, shape):
    # Work units are whole channels and a channel's sums run in one order whatever thread takes it. The shapes have
    # work enough for two threads (dwconv.cc, kWorkPerThread); batch 4 puts two channels in a vector (AVX2).
    batch, channels, height, width, kernel_size = shape
    rng = np.random.default_rng(0)
    x, out_grad = (rng.standard_normal((batch, channels, height, width)).astype(np.float32) for _ in range(2))
    weight = rng.standard_normal((channels, 1, kernel_size, kernel_size)).astype(np.float32)
    library = dwconv.library(isa)
    openmp = ctypes.CDLL(str(library))  # libgomp's functions, found through the kernels' library
    threads_before = openmp.omp_get_max_threads()
    results = []
    try:
        for threads in (1, 2):
            openmp.omp_set_num_threads(threads)
            results.append(kernel_outputs(library, x, out_grad, weight))
    finally:
        openmp.omp_set_num_threads(threads_before)
    for name, one, two in zip(["output", "input grad", "weight grad"], *results):
        assert np.array_equal(one, two), name


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("layout", ["stride1", "stride2", "pair"])
def test_recomputing_the_relu_bn_input_of_direct_convs_changes_no_value(layout, jit):
    """conv(relu(bn(x))) by the direct kernel with relu(bn(x)) recomputed in the backward (dwconv.NormalizedInput:
    the stem's and transitions' 3x3 at stride 1 and 2; NormalizedInputOfTwo: RepLKBlock's two kernels of one
    input) gives the output, the gradients of x, gamma, beta and the weights, and the running statistics of the
    same kernels run one after another."""
    rng = np.random.default_rng(7)
    x = ms.Tensor((rng.standard_normal((2, 8, 9, 9)) * 2 + 1).astype(np.float32))
    gamma, beta = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    weights = [rng.standard_normal((8, 1, k, k)).astype(np.float32) for k in (7, 3)]
    outputs = []
    for recompute in (True, False):
        norm = model.batch_norm(8)
        norm.gamma.set_data(ms.Tensor(gamma))
        norm.beta.set_data(ms.Tensor(beta))
        norm.set_train(True)
        if layout == "pair":
            large_kernel = model.ReparamLargeKernelConv(8, 7, 3, "direct")
            convs = [large_kernel.lkb_origin.conv, large_kernel.small_conv.conv]
            if not recompute:
                large_kernel.normalized_pair = None
        else:
            convs = [dwconv.depthwise_conv(8, 3, "direct", stride=1 if layout == "stride1" else 2)]
            if not recompute:
                convs[0].normalized = None
        for index, (conv, weight) in enumerate(zip(convs, weights if layout == "pair" else weights[1:])):
            conv.weight.set_data(ms.Tensor(weight))
            conv.weight.name = f"weight{index}"  # jit needs unique names
        if layout != "pair":
            assert dwconv.recomputes(norm, x, *convs) == recompute

        def loss(x):
            if layout == "pair":
                out = large_kernel.branches_after_norm(norm, x)
                return (out[0] * out[1]).sum() + out[0].sum(), out[0]
            out = convs[0].after_norm(norm, x, "relu")
            return (out * out).sum(), out

        value_and_grad = ms.value_and_grad(loss, 0, [norm.gamma, norm.beta, *(conv.weight for conv in convs)],
                                           has_aux=True)
        (_, out), (dx, parameter_gradients) = (ms.jit(value_and_grad) if jit else value_and_grad)(x)
        outputs.append([value.asnumpy() for value in (out, dx, *parameter_gradients, norm.moving_mean,
                                                      norm.moving_variance)])
    assert np.abs(outputs[0][1]).max() > 0
    for index, (got, expected) in enumerate(zip(*outputs)):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max(), err_msg=str(index))
