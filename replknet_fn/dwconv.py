"""Depthwise convolution ("same" padding, stride 1 or 2) and the choice of its implementation.

`depthwise_conv(channels, kernel_size, impl, stride=1)` returns a cell with one parameter `weight` of shape
(channels, 1, K, K) (plus `bias` when asked), whatever the implementation, so checkpoints do not depend on it.
Stride 2 is the stem's and the transitions' 3x3 (see csrc/dwconv.cc for how the kernel computes it).

- "native": MindSpore's `nn.Conv2d(group=channels)` (oneDNN); the reference, and what deploy export uses.
- "direct": a compiled C++ kernel (`csrc/dwconv.cc`) called through `ops.Custom(func_type="aot")`, with its own
  input- and weight-gradient kernels, built by `kernels.py` for the CPU's ISA level on first use; without a
  compiler it warns once and runs the native conv.
- "auto": at each input shape, whichever of direct and native was measured faster on this machine.

How auto decides. MindSpore compiles a jitted step by tracing `construct`, and timing convs while it compiles
does not work (MindSpore 2.8: an eager forward+backward run from inside the compile of a value_and_grad step
crashed the process). So `decide_for(net, input_shape)`, called before a step is compiled, finds the input
shape of each automatic conv of `net` and times direct against native at each new (batch, channels, height,
width, kernel) (`decide`), in a child process, so that the ~30 small graphs the measuring compiles do not stay
in the training process's memory. Verdicts are kept on disk per machine and kernel build (`verdict_file`) and
logged once per shape; construct reads them while it is traced. A shape nobody decided runs direct for K >= 3
and native for K = 1 (`direct_when_undecided`).

Where a direct conv reads relu(bn(x)) (the stem's and transitions' 3x3 after their conv-BN-ReLU, RepLKBlock's two
kernels after pw1), `DepthwiseConv.after_norm` and `NormalizedInputOfTwo` recompute that input in the backward
rather than keep it, as conv1x1.py does for 1x1 convs.
"""
import contextlib
import functools
import hashlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from mindspore.common import dtype as mstype
from mindspore.common.parameter import ParameterTuple

from replknet_fn import batchnorm, device, kernels

IMPLEMENTATIONS = ("native", "auto", "direct")
SOURCE = kernels.SOURCE_DIR / "dwconv.cc"
# Timings closer than this are re-measured (medians of CLOSE_CALL_REPEATS runs each) before auto picks one, so
# that one noisy run does not pick the slower one.
CLOSE_CALL_RATIO = 1.25
CLOSE_CALL_REPEATS = 5
# From this many multiply-adds (batch x channels x output pixels x K^2; RepLKNet-31B's K27-K31 convs at batch 4 have
# 0.3-1.5e9, its other convs under 0.06e9) native's forward is timed on one image before the whole batch: it takes
# long enough (K31@56x56x128, batch 4: ~0.9 s a run) that a one-image graph's compile pays for itself.
ONE_IMAGE_FIRST_MULTIPLY_ADDS = 10**8

log = logging.getLogger(__name__)


def library(isa):
    return kernels.compiled_library(SOURCE, isa, "large depthwise convs fall back to the native MindSpore conv")


def kernel_shape(x_shape, dy_shape, weight_shape):
    return weight_shape


def stride2_shape(x_shape, weight_shape):
    return [x_shape[0], x_shape[1], (x_shape[2] + 1) // 2, (x_shape[3] + 1) // 2]


def x_shape_last(dy_shape, weight_shape, x_shape):
    return x_shape


@functools.lru_cache(maxsize=None)
def gradient_ops(isa, stride):
    """(input-gradient op, weight-gradient op) of the direct kernel at `stride`; None without a library. dx is the
    same convolution of dout with the kernel flipped, dweight correlates x with dout; at stride 2 the
    input-gradient kernel also takes x, for its shape (odd or even size)."""
    path = library(isa)
    if path is None:
        return None
    name = "dwconv" if stride == 1 else "dwconv_stride2"
    weight_grad = ops.Custom(f"{path}:{name}_weight_grad", kernel_shape, kernels.same_dtype, func_type="aot")
    input_shape = kernels.same_shape if stride == 1 else x_shape_last
    input_grad = ops.Custom(f"{path}:{name}_input_grad", input_shape, kernels.same_dtype, func_type="aot")
    return input_grad, weight_grad


def gradients(input_grad, weight_grad, stride, x, weight, dout):
    """(dx, dweight) of the direct conv of x at `stride`, by its gradient ops (`gradient_ops`)."""
    dx = input_grad(dout, weight) if stride == 1 else input_grad(dout, weight, x)
    return dx, weight_grad(x, dout, weight)


def conv_op(isa, stride):
    """The forward custom op at `stride` (1 or 2), whose bprop calls the input- and weight-gradient kernels
    (`gradient_ops`); None without a library."""
    path = library(isa)
    if path is None:
        return None
    input_grad, weight_grad = gradient_ops(isa, stride)

    def bprop(x, weight, out, dout):
        return gradients(input_grad, weight_grad, stride, x, weight, dout)

    name = "dwconv" if stride == 1 else "dwconv_stride2"
    forward_shape = kernels.same_shape if stride == 1 else stride2_shape
    return ops.Custom(f"{path}:{name}_forward", forward_shape, kernels.same_dtype, func_type="aot", bprop=bprop)


@kernels.per_isa_level
def direct_conv_op(isa):
    return conv_op(isa, 1)


@kernels.per_isa_level
def direct_stride2_conv_op(isa):
    return conv_op(isa, 2)


def direct_when_undecided(kernel_size):
    """Direct or not at a shape with no measured verdict: the direct kernel was as fast or faster than native for
    every K >= 3 measured on an AVX-512 machine, native faster at K = 1 (BENCHMARKS.md)."""
    return kernel_size >= 3


# --- auto: measured verdicts -------------------------------------------------------------------------------------

# This process's copy of the verdict files, {isa: {shape key: "direct" or "native"}}, and the shapes logged.
_verdicts = {}
_logged = set()
# True while decide_for runs its shape-recording forward, whose batch-1 shapes are never compiled: not logged.
_recording_shapes = False


def shape_key(batch, channels, height, width, kernel_size, stride=1):
    key = f"B{batch}C{channels}_{height}x{width}_K{kernel_size}"
    return key if stride == 1 else f"{key}_S{stride}"


def machine_key(isa):
    """What a verdict depends on besides the shape: the kernel build (its library's name hashes the source,
    compiler, flags, ISA level and CPU), MindSpore (the native conv) and the threads both may use."""
    built = library(isa)
    return {"cpu": kernels.cpu_model(), "isa": isa, "library": built.name if built else None,
            "mindspore": ms.__version__, "threads": os.environ.get("OMP_NUM_THREADS") or os.cpu_count()}


def verdict_file(isa):
    machine = json.dumps(dict(machine_key(isa), cpu=kernels.cpu_description()), sort_keys=True, default=str)
    return kernels.cache_dir() / f"dwconv_auto-{isa}-{hashlib.sha256(machine.encode()).hexdigest()[:16]}.json"


def stored_verdicts(isa):
    """{shape key: impl} known for this machine and kernel build: from memory, else from its verdict file."""
    if isa not in _verdicts:
        _verdicts[isa] = {key: entry["impl"] for key, entry in verdict_file_entries(isa).items()}
    return _verdicts[isa]


def verdict_file_entries(isa):
    """{shape key: {"impl": ..., "seconds": {...}}} in the verdict file of `isa` ({} without a readable one)."""
    try:
        entries = json.loads(verdict_file(isa).read_text())["verdicts"]
        return {key: entry for key, entry in entries.items() if entry["impl"] in ("direct", "native")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def store_verdict(isa, key, impl, seconds):
    """Record a measured verdict in memory and in the verdict file (rewritten whole through a renamed temporary
    file: a reader never sees half a file; two processes deciding at once may each keep only their own shape,
    which costs a measurement later, never a wrong verdict)."""
    stored_verdicts(isa)[key] = impl
    path = verdict_file(isa)
    try:
        contents = json.loads(path.read_text())
    except (OSError, ValueError):
        contents = {"machine": machine_key(isa), "verdicts": {}}
    contents["verdicts"][key] = {"impl": impl, "seconds": seconds}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
        with os.fdopen(handle, "w") as file:
            json.dump(contents, file, indent=1)
        os.replace(temporary, path)
    except OSError as error:
        log.warning("cannot write %s (%s): auto will measure %s again in the next process", path, error, key)


class _ForwardBackward(nn.Cell):
    """conv(x) and its input and weight gradients for the output gradient `dout`, as training runs them (the
    output gradient comes from the layers above), without a loss: on CPU MindSpore's ReduceSum over the output
    cost more than the direct conv itself (3.3 ms vs 1.5 ms at K13@7x7x1024, batch 8, Intel AVX-512)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.params = ParameterTuple(net.trainable_params())
        self.grad = ops.GradOperation(get_all=True, get_by_list=True, sens_param=True)

    def construct(self, x, dout):
        return self.net(x), self.grad(self.net, self.params)(x, dout)


def conv_runs(impl, batch, channels, height, width, kernel_size, stride=1, isa=None):
    """{"forward", "forward_backward"}: jitted no-argument callables running one depthwise conv of `impl` on a
    random input of that shape (forward+backward: also the input and weight gradients for a random output
    gradient)."""
    rng = np.random.default_rng(0)
    shapes = [(batch, channels, height, width), (batch, channels, -(-height // stride), -(-width // stride))]
    x, dout = (ms.Tensor(rng.standard_normal(shape).astype(np.float32)) for shape in shapes)
    net = depthwise_conv(channels, kernel_size, impl, isa=isa, stride=stride)
    # Cells jitted: a new @jit function per shape would make MindSpore warn "compiled again" each time.
    forward, forward_backward = ms.jit(net), ms.jit(_ForwardBackward(net))
    return {"forward": lambda: forward(x), "forward_backward": lambda: forward_backward(x, dout)}


def kernel_runs(batch, channels, height, width, kernel_size, isa=None):
    """As `conv_runs`, but calling the direct kernel's entry points from numpy (kernels.aot_call): the kernel's own
    time, without MindSpore's op launch and copy to the host; None without a library."""
    path = library(isa or kernels.isa_level())
    if path is None:
        return None
    rng = np.random.default_rng(0)
    x, dout = (rng.standard_normal((batch, channels, height, width)).astype(np.float32) for _ in range(2))
    weight = (rng.standard_normal((channels, 1, kernel_size, kernel_size)) / kernel_size).astype(np.float32)
    out, dx, dweight = np.empty_like(x), np.empty_like(x), np.empty_like(weight)
    forward = kernels.aot_call(path, "dwconv_forward", [x, weight, out])
    input_grad = kernels.aot_call(path, "dwconv_input_grad", [dout, weight, dx])
    weight_grad = kernels.aot_call(path, "dwconv_weight_grad", [x, dout, weight, dweight])
    return {"forward": forward, "forward_backward": lambda: (forward(), input_grad(), weight_grad())[-1]}


def wait(result):
    """Block until `result` (a tensor or nested tuple of tensors) is computed."""
    if isinstance(result, (tuple, list)):
        for item in result:
            wait(item)
    else:
        result.asnumpy()


@functools.lru_cache(maxsize=None)
def compiled_run(impl, mode, shape, isa):
    """conv_runs' `mode` callable at `shape`, compiled and run once: a close call times it again without compiling
    it again. `measure` empties this cache when it is done."""
    run = conv_runs(impl, *shape, isa=isa)[mode]
    wait(run())
    return run


def time_conv(impl, mode, shape, isa, repeat=1):
    """Median seconds of `repeat` runs of one depthwise conv of `impl` at `shape` (batch, channels, height, width,
    kernel[, stride]), `mode` "forward" or "forward_backward", after one untimed run that compiles it (once per
    `measure`)."""
    run = compiled_run(impl, mode, tuple(shape), isa)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        wait(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decide(shape, isa):
    """"direct" or "native" at `shape` (batch, channels, height, width, kernel[, stride]) for the kernel build
    `isa`: the stored verdict, else measured (`measure`), stored and logged."""
    key = shape_key(*shape)
    verdicts = stored_verdicts(isa)
    if key not in verdicts:
        impl, seconds = measure(shape, isa)
        store_verdict(isa, key, impl, seconds)
        log_verdict(isa, key, impl, "measured now: " + describe_seconds(seconds))
    else:
        log_verdict(isa, key, verdicts[key], f"measured before: {verdict_file(isa)}")
    return verdicts[key]


def measure(shape, isa):
    """(impl, {what: seconds}): which of direct and native runs forward+backward (what training runs) faster at
    `shape` for the kernel build `isa`.

    The native backward is slow where the direct kernel matters (K31@56x56x128, batch 8: ~9 s), so it is timed
    only when needed: direct forward+backward first, then native forward alone, and if that alone is slower,
    direct wins without timing native's backward. For large convs (ONE_IMAGE_FIRST_MULTIPLY_ADDS) native's forward
    is first timed on one image of the batch: a batch takes at least as long, so if one image's forward is already
    slower than direct's forward+backward of the batch, direct wins without timing native on the batch."""
    try:
        direct = time_conv("direct", "forward_backward", shape, isa)
        seconds = {"direct_forward_backward": direct}
        if shape[0] > 1 and multiply_adds(*shape) >= ONE_IMAGE_FIRST_MULTIPLY_ADDS:
            seconds["native_forward_one_image"] = time_conv("native", "forward", (1, *shape[1:]), isa)
            if seconds["native_forward_one_image"] >= direct:
                return "direct", seconds
        seconds["native_forward"] = time_conv("native", "forward", shape, isa)
        if seconds["native_forward"] >= direct:
            return "direct", seconds
        native = seconds["native_forward_backward"] = time_conv("native", "forward_backward", shape, isa)
        if max(direct, native) < CLOSE_CALL_RATIO * min(direct, native):
            direct = seconds["direct_forward_backward"] = time_conv("direct", "forward_backward", shape, isa,
                                                                    CLOSE_CALL_REPEATS)
            native = seconds["native_forward_backward"] = time_conv("native", "forward_backward", shape, isa,
                                                                    CLOSE_CALL_REPEATS)
        return ("direct" if direct <= native else "native"), seconds
    finally:
        compiled_run.cache_clear()  # the graphs compiled for this shape


def multiply_adds(batch, channels, height, width, kernel_size, stride=1):
    """A depthwise conv's multiply-adds, the padding's taps included."""
    return batch * channels * -(-height // stride) * -(-width // stride) * kernel_size ** 2


def describe_seconds(seconds):
    return ", ".join(f"{name} {value * 1e3:.1f} ms" for name, value in seconds.items())


def log_verdict(isa, key, impl, how):
    if not _recording_shapes and (isa, key) not in _logged:
        _logged.add((isa, key))
        log.info("auto depthwise conv %s (%s build): %s (%s)", key, isa, impl, how)


@ms.constexpr
def direct_at(shape, kernel_size, stride, isa):
    """Whether an automatic conv runs direct at input `shape`: read while MindSpore traces construct (constexpr:
    plain Python at compile time), so it reads verdicts and never measures."""
    if any(size is None or size < 0 for size in shape):  # a dynamic shape
        return direct_when_undecided(kernel_size)
    key = shape_key(*shape, kernel_size, stride)
    impl = stored_verdicts(isa).get(key)
    if impl is None:
        log_verdict(isa, key, "direct" if direct_when_undecided(kernel_size) else "native",
                    "not measured: call dwconv.decide_for before compiling")
        return direct_when_undecided(kernel_size)
    log_verdict(isa, key, impl, f"measured before: {verdict_file(isa)}")
    return impl == "direct"


def conv_input_shapes(net, convs, input_shape):
    """{conv: its input shape} when `net` runs on `input_shape`: one eager forward of a batch of 1 in eval mode
    (no batch statistics or random drops change), the batch size put back after."""
    shapes = {}

    def record(cell, args):
        shapes[cell] = (input_shape[0], *args[0].shape[1:])

    global _recording_shapes
    handles = [conv.register_forward_pre_hook(record) for conv in convs]
    modes = [(cell, cell.training) for _, cell in net.cells_and_names()]
    try:
        _recording_shapes = True
        net.set_train(False)
        net(ops.zeros((1, *input_shape[1:]), mstype.float32))
    finally:
        _recording_shapes = False
        for handle in handles:
            handle.remove()
        for cell, training in modes:  # parents before children: each cell ends with its own mode
            cell.set_train(training)
    return shapes


def decide_for(net, input_shape):
    """Decide (measure, or read the stored verdict) every automatic conv of `net` for an input of `input_shape`
    (batch, channels, height, width), before a step or forward of `net` is compiled. Returns {shape key: impl}.
    Shapes not decided yet are measured in a child process (`measure_in_child_process`)."""
    convs = [cell for _, cell in net.cells_and_names()
             if isinstance(cell, DepthwiseConv) and cell.automatic and cell.direct is not None]
    if not convs:
        return {}
    shapes = list(dict.fromkeys(((*shape, conv.kernel_size[0], conv.stride[0]), conv.isa)
                                for conv, shape in conv_input_shapes(net, convs, tuple(input_shape)).items()))
    undecided = [(shape, isa) for shape, isa in shapes if shape_key(*shape) not in stored_verdicts(isa)]
    if undecided:
        measure_in_child_process(undecided)
    return {shape_key(*shape): decide(shape, isa) for shape, isa in shapes}


# --- measuring in a child process --------------------------------------------------------------------------------

# The child imports this very package (first on its path), whatever the current directory holds.
PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
CHILD_COMMAND = ("import sys; sys.path.insert(0, sys.argv[2]); from replknet_fn import dwconv; "
                 "dwconv.child_process_main(sys.argv[1])")


def measure_in_child_process(undecided):
    """Measure and store the verdicts at `undecided` [(shape, isa)] in a child Python process, so that what the
    measuring compiles and allocates (~30 one-conv graphs for RepLKNet-31B) leaves with it: measured in the training
    process, it stayed in its peak memory (31B batch 4: 4.39 against 4.02 GB with the verdicts stored, Zen 3,
    BENCHMARKS.md). If the child fails, its shapes are measured here (`decide`), with a warning saying why."""
    log.info("auto depthwise conv: measuring %d shape(s) in a child process (a few seconds; stored for later runs)",
             len(undecided))
    request = json.dumps({"device_target": device.current_target(),
                          "shapes": [[list(shape), isa] for shape, isa in undecided]})
    try:
        # os.environ, not the inherited environment: importing MindSpore sets OMP_NUM_THREADS=1 in the process's C
        # environment (not in os.environ), and a child inheriting it timed the kernels on one OpenMP thread and
        # stored its verdicts under a machine key the parent never looks up.
        child = subprocess.run([sys.executable, "-c", CHILD_COMMAND, request, PACKAGE_PARENT], capture_output=True,
                               text=True, check=False, env=dict(os.environ))
    except OSError as error:
        log.warning("auto depthwise conv: cannot start a child process (%s); measuring in this one", error)
        return
    try:
        report = json.loads(child.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        report = None
    if child.returncode != 0 or not isinstance(report, dict):
        last_words = (child.stderr.strip().splitlines() or ["no message"])[-1]
        log.warning("auto depthwise conv: measuring in a child process failed (exit status %d: %s); measuring in "
                    "this one", child.returncode, last_words)
        return
    for warning in report["warnings"]:
        log.warning("auto depthwise conv, in its child process: %s", warning)
    for entry in report["verdicts"]:
        stored_verdicts(entry["isa"])[entry["key"]] = entry["impl"]
        log_verdict(entry["isa"], entry["key"], entry["impl"], f"{entry['how']}: {describe_seconds(entry['seconds'])}")


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def child_process_main(request):
    """The child of `measure_in_child_process`: measure and store each shape, then print what it found and the
    warnings it logged as the last line of its output (JSON), which the parent reads even when the verdict file
    cannot be written. One measuring process at a time per cache directory (`measuring_lock`): the ranks of a
    data-parallel run on one machine would otherwise time their convs on shared cores at once, and could decide
    differently; the ones that waited find the verdicts stored."""
    request = json.loads(request)
    device.apply_device_target(request["device_target"])
    warnings, verdicts = _Warnings(), []
    log.addHandler(warnings)
    try:
        with measuring_lock():
            _verdicts.clear()  # what other processes stored while this one waited
            stored = {isa: verdict_file_entries(isa) for _, isa in request["shapes"]}
            for shape, isa in request["shapes"]:
                key = shape_key(*shape)
                entry = stored[isa].get(key)
                if entry is not None:
                    impl, seconds = entry["impl"], entry.get("seconds", {})
                    how = "measured meanwhile by another process"
                else:
                    impl, seconds = measure(tuple(shape), isa)
                    store_verdict(isa, key, impl, seconds)
                    how = "measured now, in a child process"
                verdicts.append({"isa": isa, "key": key, "impl": impl, "seconds": seconds, "how": how})
    finally:
        log.removeHandler(warnings)
    print(json.dumps({"verdicts": verdicts, "warnings": warnings.messages}), flush=True)


@contextlib.contextmanager
def measuring_lock():
    """An exclusive lock on `dwconv_auto.lock` in the kernel cache, held while this process measures (none where
    the directory cannot be written or the OS has no fcntl: then processes may measure at once, as before)."""
    try:
        import fcntl
        path = kernels.cache_dir() / "dwconv_auto.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
    except (ImportError, OSError):
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class DepthwiseConv(nn.Conv2d):
    """nn.Conv2d(channels, channels, K, stride, padding=K // 2, group=channels) computed by the direct kernel.

    Subclassing nn.Conv2d keeps its parameters, their names, initialization and attributes (`kernel_size`,
    `stride`, ...), so code that reads a conv reads this one too. `automatic` uses the direct kernel only at
    shapes where it was measured faster (`decide_for`); float32 only (other dtypes run the native conv)."""

    def __init__(self, channels, kernel_size, has_bias=False, automatic=False, isa=None, stride=1):
        super().__init__(channels, channels, kernel_size, stride=stride, pad_mode="pad", padding=kernel_size // 2,
                         group=channels, has_bias=has_bias)
        self.isa = isa or kernels.isa_level()
        op = direct_conv_op if stride == 1 else direct_stride2_conv_op
        self.direct = op(self.isa) if device.cpu_kernels_enabled() else None
        self.automatic = automatic
        # relu(bn(x)) recomputed in the backward (after_norm); also what ReparamLargeKernelConv's pair checks.
        self.normalized = (NormalizedInput(self.isa, stride) if self.direct is not None
                           and batchnorm.kernel_sets(self.isa) is not None else None)

    def use_direct(self, x):
        if self.direct is None or x.dtype != mstype.float32:
            return False
        if not self.automatic:
            return True
        return direct_at(x.shape, self.kernel_size[0], self.stride[0], self.isa)

    def after_norm(self, norm, x, activation=None):
        """self(activation(norm(x))); for "relu" after a BatchNorm2d in training, by the direct kernel, that input
        recomputed in the backward rather than kept (NormalizedInput)."""
        if isinstance(activation, str) and recomputes(norm, x, self):
            return self.normalized(x, norm.gamma, norm.beta, norm.moving_mean, norm.moving_variance, norm.hyper,
                                   self.weight.value())[0]  # .value(): see conv1x1.Conv1x1.construct
        return self.construct(batchnorm.normalize(norm, x, activation))

    def construct(self, x):
        if self.use_direct(x):
            out = self.direct(x, self.weight)
        else:
            out = self.conv2d(x, self.weight)
        if self.has_bias:
            out = self.bias_add(out, self.bias)
        return out


class NormalizedInput(batchnorm.RecomputesItsOutput):
    """The direct kernel's depthwise conv of relu(bn(x)) in training (the stem's and the transitions' 3x3 after
    their conv-BN-ReLU), whose gradient recomputes relu(bn(x)) from x and the batch statistics rather than keeping
    it, as conv1x1.NormalizedInput does. Returns (conv output, batch mean, batch invstd)."""

    def __init__(self, isa, stride):
        super().__init__("relu", isa)
        self.conv = (direct_conv_op if stride == 1 else direct_stride2_conv_op)(isa)
        self.input_grad, self.weight_grad = gradient_ops(isa, stride)
        self.stride = stride

    def construct(self, x, gamma, beta, moving_mean, moving_variance, hyper, weight):
        y, mean, invstd = self.forward_op(x, gamma, beta, moving_mean, moving_variance, hyper)
        return self.conv(y, weight), mean, invstd

    def bprop(self, x, gamma, beta, moving_mean, moving_variance, hyper, weight, out, dout):
        _, mean, invstd = out
        y = self.recomputed(x, gamma, beta, mean, invstd, dout[0])
        dy, weight_gradient = gradients(self.input_grad, self.weight_grad, self.stride, y, weight, dout[0])
        return (*self.input_gradients(x, gamma, beta, moving_mean, moving_variance, hyper, mean, invstd, y, dy),
                weight_gradient)


class NormalizedInputOfTwo(NormalizedInput):
    """NormalizedInput for two direct stride-1 convs of the same relu(bn(x)), each with its weight (RepLKBlock's
    large and small kernels after pw1). Returns (both outputs, batch mean, batch invstd)."""

    def __init__(self, isa):
        super().__init__(isa, 1)

    def construct(self, x, gamma, beta, moving_mean, moving_variance, hyper, weight_a, weight_b):
        y, mean, invstd = self.forward_op(x, gamma, beta, moving_mean, moving_variance, hyper)
        return self.conv(y, weight_a), self.conv(y, weight_b), mean, invstd

    def bprop(self, x, gamma, beta, moving_mean, moving_variance, hyper, weight_a, weight_b, out, dout):
        _, _, mean, invstd = out
        y = self.recomputed(x, gamma, beta, mean, invstd, ops.depend(dout[0], dout[1]))
        dy_a, weight_gradient_a = gradients(self.input_grad, self.weight_grad, 1, y, weight_a, dout[0])
        dy_b, weight_gradient_b = gradients(self.input_grad, self.weight_grad, 1, y, weight_b, dout[1])
        return (*self.input_gradients(x, gamma, beta, moving_mean, moving_variance, hyper, mean, invstd, y,
                                      dy_a + dy_b), weight_gradient_a, weight_gradient_b)


def recomputes(norm, x, *convs):
    """Whether depthwise convs of relu(norm(x)) run as a NormalizedInput: norm is a BatchNorm2d running its kernel
    on x, and each conv a DepthwiseConv running the direct kernel at x's shape."""
    recompute = batchnorm.runs_kernel(norm, x)
    for conv in convs:  # a loop, not all(...): MindSpore 2.8's jit does not resolve names in a generator
        recompute = recompute and isinstance(conv, DepthwiseConv) and conv.normalized is not None
        recompute = recompute and not conv.has_bias and conv.use_direct(x)
    return recompute


def native_depthwise_conv(channels, kernel_size, has_bias=False, stride=1):
    return nn.Conv2d(channels, channels, kernel_size, stride=stride, pad_mode="pad", padding=kernel_size // 2,
                     group=channels, has_bias=has_bias)


def depthwise_conv(channels, kernel_size, impl="native", has_bias=False, isa=None, stride=1):
    """`isa`: the kernel build's ISA level (kernels.py), by default `kernels.isa_level()`; `stride` 1 or 2."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"large_kernel_impl {impl!r}: choose one of {list(IMPLEMENTATIONS)}")
    if stride not in (1, 2):
        raise ValueError(f"depthwise conv stride {stride!r}: the kernels implement 1 and 2")
    if impl == "native" or kernel_size % 2 == 0:
        # The kernels implement odd K only (even K has no symmetric "same" padding).
        return native_depthwise_conv(channels, kernel_size, has_bias, stride)
    return DepthwiseConv(channels, kernel_size, has_bias, automatic=impl == "auto", isa=isa, stride=stride)
