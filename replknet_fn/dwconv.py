"""Large-kernel depthwise convolution (stride 1, "same" padding) and the choice of its implementation.

`depthwise_conv(channels, kernel_size, impl)` returns a cell with one parameter `weight` of shape
(channels, 1, K, K) (plus `bias` when asked), whatever the implementation, so checkpoints do not depend on it.

- "native": MindSpore's `nn.Conv2d(group=channels)` (oneDNN); the reference, and what deploy export uses.
- "direct": a compiled C++ kernel (`csrc/dwconv.cc`) called through `ops.Custom(func_type="aot")`, with its own
  input- and weight-gradient kernels. Built with the system C++ compiler on first use and cached; without a
  compiler it warns once and runs the native conv.
- "auto": "direct" where it was measured faster than native (`direct_is_faster`), native elsewhere.
"""
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from mindspore import nn, ops
from mindspore.common import dtype as mstype

from replknet_fn import device

IMPLEMENTATIONS = ("native", "auto", "direct")

SOURCE = Path(__file__).resolve().parent / "csrc" / "dwconv.cc"
# -march=native makes the library specific to this CPU: the cache key includes the CPU's flags.
# -fno-math-errno lets sqrt vectorize (nothing here reads errno): pointwise.cc's AdamW over 80M floats 0.20 -> 0.045 s.
COMPILE_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=c++17")


def cache_dir():
    return Path(os.environ.get("REPLKNET_FN_CACHE", Path.home() / ".cache" / "replknet_fn"))


def cpu_description():
    """The CPU model and instruction-set flags, the part of the machine `-march=native` compiles for."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(wanted)))


@functools.lru_cache(maxsize=None)
def compiled_library(source=SOURCE, fallback="large depthwise convs fall back to the native MindSpore conv"):
    """Path of the library compiled from `source` (a file in csrc/), built on first use, or None (after one
    warning that ends with `fallback`) if it cannot be.

    The file name is a hash of the source, the compiler, its flags and the CPU, so an edit, another compiler or
    another machine sharing the cache gets its own build. The build writes a temporary file and renames it, so
    processes building at the same time never load a half-written library."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++"]
    compiler = next((shutil.which(name) for name in names if shutil.which(name)), None)
    if compiler is None:
        warnings.warn(f"no C++ compiler found ({' or '.join(names)}; set CXX or install g++): {fallback}")
        return None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\n".join([source.read_text(), compiler, version, " ".join(COMPILE_FLAGS),
                                    cpu_description()]).encode()).hexdigest()[:16]
    library = cache_dir() / f"{source.stem}-{key}.so"
    if library.exists():
        return library
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=library.parent, prefix=library.stem, suffix=".tmp")
        os.close(handle)
    except OSError as error:
        warnings.warn(f"cannot write the kernel cache ({error}; set REPLKNET_FN_CACHE): {fallback}")
        return None
    result = subprocess.run([compiler, *COMPILE_FLAGS, str(source), "-o", temporary], capture_output=True,
                            text=True)
    if result.returncode != 0:
        os.unlink(temporary)
        warnings.warn(f"building {source.name} with {compiler} failed, {fallback}:\n{result.stderr[-2000:]}")
        return None
    os.chmod(temporary, 0o755)  # mkstemp's 0600 would hide a shared cache's build from other users
    os.replace(temporary, library)
    return library


def same_shape(shape, *_):
    return shape


def same_dtype(dtype, *_):
    return dtype


def kernel_shape(x_shape, dy_shape, weight_shape):
    return weight_shape


@functools.lru_cache(maxsize=None)
def direct_conv_op():
    """The forward custom op, whose bprop calls the input- and weight-gradient kernels; None without a library."""
    library = compiled_library()
    if library is None:
        return None
    input_grad = ops.Custom(f"{library}:dwconv_input_grad", same_shape, same_dtype, func_type="aot")
    weight_grad = ops.Custom(f"{library}:dwconv_weight_grad", kernel_shape, same_dtype, func_type="aot")

    def bprop(x, weight, out, dout):
        # dx is the same convolution of dout with the kernel flipped; dweight correlates x with dout.
        return input_grad(dout, weight), weight_grad(x, dout, weight)

    return ops.Custom(f"{library}:dwconv_forward", same_shape, same_dtype, func_type="aot", bprop=bprop)


def direct_is_faster(batch, channels, height, width, kernel_size):
    """Whether the direct kernel beats the native conv at this input shape, forward and forward+backward.

    Measured with `python -m replknet_fn.bench dwconv --shape K,SIZE,CHANNELS` (jitted, float32, 2 shared cores,
    medians of 7-200 interleaved runs) at 24 shapes, batch 1 and 8 (K 3-31, maps 2x2-112x112, 16-1024 channels),
    plus K3@224x224x32 and K1: for every K >= 3 the direct kernel was as fast or faster, in both directions.
    Forward / forward+backward, native vs direct:
      K3@56x56x128 B8    25 / 948 ms   vs 11 / 44 ms
      K3@224x224x32 B8   99 / 2176 ms  vs 39 / 180 ms
      K31@7x7x128 B8     69 / 153 ms   vs 1.2 / 4.8 ms
      K5@2x2x64 B1       0.5 / 6.4 ms  vs 0.6 / 0.6 ms  (forward: both are the cost of launching the call;
      K3@7x7x64 B1       0.41 ms       vs 0.09-0.41 ms   equal within noise over 200 runs)
    At K = 1 (a per-channel scale, bound by memory traffic) native wins: K1@56x56x128 B8 3.8 / 37 ms vs
    10.8 / 53 ms. So only the kernel size decides, at every batch, channel count and map size measured."""
    return kernel_size >= 3


class DepthwiseConv(nn.Conv2d):
    """nn.Conv2d(channels, channels, K, padding=K // 2, group=channels) computed by the direct kernel.

    Subclassing nn.Conv2d keeps its parameters, their names, initialization and attributes (`kernel_size`,
    `stride`, ...), so code that reads a conv reads this one too. `automatic` uses the direct kernel only at
    shapes where `direct_is_faster`; float32 only (other dtypes run the native conv)."""

    def __init__(self, channels, kernel_size, has_bias=False, automatic=False):
        super().__init__(channels, channels, kernel_size, stride=1, pad_mode="pad", padding=kernel_size // 2,
                         group=channels, has_bias=has_bias)
        self.direct = direct_conv_op() if device.cpu_kernels_enabled() else None
        self.automatic = automatic

    def use_direct(self, x):
        if self.direct is None or x.dtype != mstype.float32:
            return False
        if not self.automatic:
            return True
        batch, channels, height, width = x.shape
        return direct_is_faster(batch, channels, height, width, self.kernel_size[0])

    def construct(self, x):
        if self.use_direct(x):
            out = self.direct(x, self.weight)
        else:
            out = self.conv2d(x, self.weight)
        if self.has_bias:
            out = self.bias_add(out, self.bias)
        return out


def native_depthwise_conv(channels, kernel_size, has_bias=False):
    return nn.Conv2d(channels, channels, kernel_size, stride=1, pad_mode="pad", padding=kernel_size // 2,
                     group=channels, has_bias=has_bias)


def depthwise_conv(channels, kernel_size, impl="native", has_bias=False):
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"large_kernel_impl {impl!r}: choose one of {list(IMPLEMENTATIONS)}")
    if impl == "native" or kernel_size % 2 == 0:
        # The kernels implement odd K only (even K has no symmetric "same" padding).
        return native_depthwise_conv(channels, kernel_size, has_bias)
    return DepthwiseConv(channels, kernel_size, has_bias, automatic=impl == "auto")
