"""Kernel builds: one per ISA level, chosen from the CPU or REPLKNET_FN_ISA, cached per level; the pointwise kernels
(exact GELU, drop path's scaling, AdamW, squared sum) and training BatchNorm compute their formulas in every build
this CPU runs."""
import math
import os
import re
import shutil
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from replknet_fn import batchnorm, dwconv, kernels, pointwise

ISA_LEVELS = kernels.supported_isa_levels()
SOURCES = sorted(kernels.SOURCE_DIR.glob("*.cc"))  # every kernel, including the next one written


def test_the_default_level_is_the_highest_the_cpu_runs(monkeypatch):
    monkeypatch.delenv(kernels.ISA_VARIABLE, raising=False)
    assert kernels.isa_level() == ISA_LEVELS[0]
    assert ISA_LEVELS[-1] == "portable"


@pytest.mark.parametrize("isa", ISA_LEVELS)
def test_the_environment_variable_chooses_the_level(monkeypatch, isa):
    monkeypatch.setenv(kernels.ISA_VARIABLE, isa)
    assert kernels.isa_level() == isa
    assert dwconv.depthwise_conv(2, 5, "direct").isa == isa


def test_an_unknown_level_lists_the_valid_ones(monkeypatch):
    monkeypatch.setenv(kernels.ISA_VARIABLE, "sse9")
    with pytest.raises(ValueError, match="avx512.*avx2.*portable"):
        kernels.isa_level()


def test_a_level_the_cpu_cannot_run_is_an_error_naming_what_it_lacks(monkeypatch):
    monkeypatch.setattr(kernels, "is_x86", lambda: True)
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"sse4_2", "avx", "avx2", "fma"}))
    monkeypatch.setenv(kernels.ISA_VARIABLE, "avx512")
    with pytest.raises(ValueError, match="lacks.*avx512f.*runs portable"):
        kernels.isa_level()


def test_every_level_has_its_own_cached_build(monkeypatch, tmp_path):
    monkeypatch.setenv("REPLKNET_FN_CACHE", str(tmp_path))
    kernels.compiled_library.cache_clear()
    try:
        libraries = [dwconv.library(isa) for isa in ISA_LEVELS]
        assert len(set(libraries)) == len(ISA_LEVELS)
        assert all(library.parent == tmp_path and library.exists() for library in libraries)
        kernels.compiled_library.cache_clear()
        assert [dwconv.library(isa) for isa in ISA_LEVELS] == libraries
        assert sorted(path.name for path in tmp_path.iterdir()) == sorted(library.name for library in libraries)
    finally:
        kernels.compiled_library.cache_clear()


def test_each_level_compiles_for_its_vector_width():
    for isa, lanes in kernels.LANES.items():
        assert f"-DREPLKNET_LANES={lanes}" in kernels.compile_flags(isa)


def portable_flags():
    return [flag for flag in kernels.compile_flags("portable") if not flag.startswith(("-march", "-mtune"))]


@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.name)
def test_the_portable_build_has_no_asm_or_intrinsics(source):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    preprocessed = subprocess.run([compiler, *portable_flags(), "-E", "-P", str(source)], capture_output=True,
                                  text=True, check=True).stdout
    ours = preprocessed[preprocessed.index("namespace {"):]  # after the system headers
    assert "asm" not in ours and "_mm" not in ours


@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.name)
def test_the_portable_build_compiles_for_arm(source, tmp_path):
    compiler = shutil.which("aarch64-linux-gnu-g++")
    if compiler is None:
        pytest.skip("no aarch64 cross compiler (Debian: apt-get install g++-aarch64-linux-gnu)")
    subprocess.run([compiler, *portable_flags(), "-march=armv8-a", "-Werror", str(source), "-o",
                    str(tmp_path / "arm.so")], capture_output=True, text=True, check=True)


@pytest.mark.parametrize("isa", ISA_LEVELS)
def test_gelu_is_the_exact_erf_form_forward_and_backward(isa):
    gelu = pointwise.gelu_op(isa)
    x = np.linspace(-8, 8, 2001).astype(np.float32)
    exact_x = x.astype(np.float64)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(exact_x / math.sqrt(2)))
    pdf = np.exp(-0.5 * exact_x ** 2) / math.sqrt(2 * math.pi)
    value, grad = ms.value_and_grad(lambda t: gelu(t).sum())(ms.Tensor(x))
    np.testing.assert_allclose(gelu(ms.Tensor(x)).asnumpy(), exact_x * cdf, rtol=0, atol=2e-6)
    np.testing.assert_allclose(grad.asnumpy(), cdf + exact_x * pdf, rtol=0, atol=1e-6)


@pytest.mark.parametrize("isa", ISA_LEVELS)
def test_squared_sum_over_many_tensors(isa):
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(size).astype(np.float32) for size in (1000 + 7, 1, 3, 64)]  # not multiples of a width
    total = sum(np.sum(x.astype(np.float64) ** 2) for x in xs)
    np.testing.assert_allclose(pointwise.squared_sum_op(isa)(*map(ms.Tensor, xs)).asnumpy(), total, rtol=1e-6)
    np.testing.assert_allclose(pointwise.squared_sum_op(isa)(ms.Tensor(xs[0])).asnumpy(),
                               np.sum(xs[0].astype(np.float64) ** 2), rtol=1e-6)


@pytest.mark.parametrize("isa", ISA_LEVELS)
def test_scale_all_scales_every_tensor(isa):
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(shape).astype(np.float32) for shape in ((3, 5, 7), (1,), (9,))]
    k = np.float32(0.375)
    outputs = pointwise.scale_all_op(isa)(*map(ms.Tensor, xs), ms.Tensor(k))
    assert len(outputs) == len(xs)
    for x, y in zip(xs, outputs):
        np.testing.assert_array_equal(y.asnumpy(), x * k)
    (single,) = pointwise.scale_all_op(isa)(ms.Tensor(xs[0]), ms.Tensor(k))
    np.testing.assert_array_equal(single.asnumpy(), xs[0] * k)


@pytest.mark.parametrize("isa", ISA_LEVELS)
def test_adamw_follows_torch_in_place_for_every_parameter(isa):
    """One op updates several parameters, each with its own lr scale and weight decay, as torch.optim.AdamW."""
    rng = np.random.default_rng(0)
    sizes, lr, beta1, beta2, eps = (37, 1, 8), 0.1, 0.9, 0.999, 1e-8
    lr_scales, weight_decays = (1.0, 0.5, 0.25), (0.05, 0.0, 0.1)
    starts = [rng.standard_normal(size) for size in sizes]
    grads = [[rng.standard_normal(size) for size in sizes] for _ in range(3)]
    params, exp_avgs, exp_avg_sqs = ([ms.Parameter(ms.Tensor(value.astype(np.float32)), name=f"{prefix}{i}")
                                      for i, value in enumerate(values)]
                                     for prefix, values in [("p", starts), ("m", [np.zeros(s) for s in sizes]),
                                                            ("v", [np.zeros(s) for s in sizes])])
    hypers = ms.Tensor([[scale, decay, beta1, beta2, eps] for scale, decay in zip(lr_scales, weight_decays)],
                       ms.float32)
    adamw = pointwise.adamw_op(len(sizes), isa)
    expected = [start.copy() for start in starts]
    ms_, vs = [np.zeros(s) for s in sizes], [np.zeros(s) for s in sizes]
    for step, step_grads in enumerate(grads, start=1):
        adamw(*params, *exp_avgs, *exp_avg_sqs, *(ms.Tensor(g.astype(np.float32)) for g in step_grads),
              ms.Tensor([lr, step], ms.float32), hypers)
        for i, g in enumerate(step_grads):
            rate = lr * lr_scales[i]
            expected[i] = expected[i] * (1 - rate * weight_decays[i])
            ms_[i], vs[i] = beta1 * ms_[i] + (1 - beta1) * g, beta2 * vs[i] + (1 - beta2) * g * g
            expected[i] -= rate * (ms_[i] / (1 - beta1 ** step)) / (np.sqrt(vs[i] / (1 - beta2 ** step)) + eps)
    for param, value in zip(params, expected):
        np.testing.assert_allclose(param.asnumpy(), value, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("isa", ISA_LEVELS)
def test_drop_path_kernel_masks_each_sample_as_the_graph_hash_does_and_its_gradient_alike(isa):
    """The kernel's mask equals DropPath's graph path (model.hash_uniform, MindSpore's int32 and float32 ops) bit
    for bit: seeds whose hash wraps around int32 both ways, several streams, and keep probabilities set right at a
    sample's threshold (keep = 1 - u, and one float step below), so that a hash off by its last bit changes a mask."""
    from replknet_fn.model import hash_uniform
    rng = np.random.default_rng(0)
    samples = 16
    x = rng.standard_normal((samples, 5, 7, 9)).astype(np.float32)  # 315 floats per sample: no vector width
    dout = rng.standard_normal(x.shape).astype(np.float32)
    kernel = pointwise.drop_path_op(isa)
    kept = dropped = 0
    for seed, stream in [(0, 0), (11, 3), (2 ** 31 - 1, 47), (123456789, 1)]:
        uniform = hash_uniform(ms.Tensor(seed, ms.int32), stream, samples)
        thresholds = [np.float32(1) - u for u in uniform.asnumpy()[:4] if u > 0]
        for keep_prob in [0.9714285714285714] + thresholds + [t - np.float32(2 ** -24) for t in thresholds]:
            mask = (ops.floor(ms.Tensor(keep_prob, ms.float32) + uniform) / ms.Tensor(keep_prob, ms.float32))
            mask = mask.asnumpy()
            kept, dropped = kept + np.count_nonzero(mask), dropped + np.count_nonzero(mask == 0)
            constants = (ms.Tensor(seed, ms.int32), ms.Tensor(stream, ms.int32), ms.Tensor(keep_prob, ms.float32))
            expected = x * mask[:, None, None, None]
            np.testing.assert_array_equal(kernel(ms.Tensor(x), *constants).asnumpy(), expected)
            grad_x = ms.grad(lambda a, s, i, k: (kernel(a, s, i, k) * ms.Tensor(dout)).sum())(
                ms.Tensor(x), *constants)
            np.testing.assert_array_equal(grad_x.asnumpy(), dout * mask[:, None, None, None])
    assert kept > 0 and dropped > 0


class ExactGelu(nn.Cell):
    """The model's GELU cell as BatchNorm2d.forward_gelu sees it (a kernel, or None where BN and GELU stay apart),
    computing MindSpore's exact GELU (the oracle)."""

    def __init__(self, fused):
        super().__init__()
        self.kernel = "stands in for the GELU kernel" if fused else None

    def construct(self, x):
        return ops.gelu(x, approximate="none")


def batch_norm_outputs(bn, x, dout, activation, jit):
    """Output, gradients (x, gamma, beta) of sum(out * dout) and the running statistics after one training
    forward of bn followed by `activation` (None, "relu", "gelu"), for a BN initialised with fixed random affine
    parameters. The kernel BN runs its fused forward (forward_relu, forward_gelu); nn.BatchNorm2d the ops after it."""
    rng = np.random.default_rng(1)
    bn.gamma.set_data(ms.Tensor(rng.standard_normal(bn.gamma.shape).astype(np.float32)))
    bn.beta.set_data(ms.Tensor(rng.standard_normal(bn.beta.shape).astype(np.float32)))
    bn.set_train(True)
    ours = isinstance(bn, batchnorm.BatchNorm2d)
    gelu = ExactGelu(fused=ours)

    def loss(t):
        if activation == "relu":
            out = bn.forward_relu(t) if ours else ops.relu(bn(t))
        elif activation == "gelu":
            out = bn.forward_gelu(t, gelu) if ours else gelu(bn(t))
        else:
            out = bn(t)
        return (out * ms.Tensor(dout)).sum(), out

    grad_fn = ms.value_and_grad(loss, 0, (bn.gamma, bn.beta), has_aux=True)
    (_, out), (dx, (dgamma, dbeta)) = (ms.jit(grad_fn) if jit else grad_fn)(ms.Tensor(x))
    return [value.asnumpy() for value in (out, dx, dgamma, dbeta, bn.moving_mean, bn.moving_variance)]


@pytest.mark.parametrize("isa", ISA_LEVELS)
@pytest.mark.parametrize("activation", [None, "relu", "gelu"], ids=["bn", "bn_relu", "bn_gelu"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("shape", [(3, 6, 9, 11), (4, 6, 5, 7), (5, 6, 2, 1)], ids=["plane99", "plane35", "plane2"])
def test_training_batch_norm_kernel_is_mindspores_batch_norm(isa, activation, jit, shape):
    """Output, the three gradients and the running statistics (momentum 0.9, unbiased variance) of the kernel BN
    (and BN + ReLU, BN + exact GELU) equal nn.BatchNorm2d's (+ ops.relu, + ops.gelu) to float rounding: by channels
    (99 pixels a plane) and, for planes under 64 pixels, by whole images (35, 2); no plane size a multiple of any
    vector width."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    dout = rng.standard_normal(x.shape).astype(np.float32)
    ours = batchnorm.BatchNorm2d(6, eps=1e-5, momentum=0.9)
    ours.kernel, ours.relu_kernel = batchnorm.batch_norm_op(isa), batchnorm.batch_norm_relu_op(isa)
    ours.gelu_kernel = batchnorm.batch_norm_gelu_op(isa)
    expected = batch_norm_outputs(nn.BatchNorm2d(6, eps=1e-5, momentum=0.9), x, dout, activation, jit)
    actual = batch_norm_outputs(ours, x, dout, activation, jit)
    low = expected[0].min()  # what ran after BN: nothing (normal values), ReLU (0), GELU (its minimum is -0.17)
    assert low < -0.2 if activation is None else (low == 0 if activation == "relu" else -0.17 < low < 0)
    for name, value, reference in zip(["out", "dx", "dgamma", "dbeta", "moving_mean", "moving_variance"], actual,
                                      expected):
        assert np.abs(value - reference).max() <= 2e-6 * np.abs(reference).max(), name


@pytest.mark.parametrize("isa", ISA_LEVELS)
@pytest.mark.parametrize("activation", [None, "relu", "gelu"], ids=["bn", "bn_relu", "bn_gelu"])
@pytest.mark.parametrize("shape", [(3, 6, 9, 11), (5, 6, 2, 1)], ids=["plane99", "plane2"])
def test_the_apply_kernel_recomputes_the_forward_output_bit_for_bit(isa, activation, shape):
    """From x and the statistics the forward returned, `apply` gives the forward's y again, the same bits, on both
    of the forward's plane paths: what lets a train step recompute y in the backward (conv1x1.NormalizedInput)."""
    rng = np.random.default_rng(2)
    x = ms.Tensor((rng.standard_normal(shape) * 3 + 1).astype(np.float32))
    gamma, beta = (ms.Tensor(rng.standard_normal(6).astype(np.float32)) for _ in range(2))
    moving_mean, moving_variance = ms.Parameter(np.zeros(6, np.float32)), ms.Parameter(np.ones(6, np.float32))
    kernel_set = batchnorm.kernel_sets(isa)[activation]
    y, mean, invstd = kernel_set.forward(x, gamma, beta, moving_mean, moving_variance,
                                         ms.Tensor([1e-5, 0.9], ms.float32))
    again = kernel_set.apply(x, gamma, beta, mean, invstd).asnumpy()
    assert np.array_equal(again, y.asnumpy()) and np.abs(again).max() > 0.5


def test_batch_norm_evaluates_and_trains_by_mindspore_where_the_kernel_does_not_apply():
    """Eval mode and frozen statistics (running statistics), and float16 input (AMP), go to nn.BatchNorm2d's own
    path."""
    bn = batchnorm.BatchNorm2d(3, eps=1e-5, momentum=0.9)
    x = ms.Tensor(np.random.default_rng(0).standard_normal((2, 3, 2, 2)).astype(np.float32))
    bn.set_train(True)
    assert bn.by_kernel(x) and not bn.by_kernel(x.astype(ms.float16))
    bn.use_batch_statistics = False
    assert not bn.by_kernel(x)
    bn.use_batch_statistics = None
    bn.set_train(False)
    assert not bn.by_kernel(x)
    np.testing.assert_allclose(bn(x).asnumpy(), x.asnumpy() / np.sqrt(1 + 1e-5), rtol=1e-6)


# Each source's loops over all elements, as (the pattern of their lines, how many): pointwise.cc's GELU forward and
# gradient, drop path's and the gradients' scaling, AdamW; batchnorm.cc's normalize-and-activate loops (both plane
# paths, and apply) and its GELU gradient.
ELEMENT_WISE_LOOPS = {"pointwise": (r"\s*for \(int64_t i = 0; i < (n|per_sample); \+\+i\)", 5),
                      "batchnorm": (r"\s*for .*(activate<kActivation>|gelu_slope)\(", 4)}


@pytest.mark.parametrize("isa", ISA_LEVELS)
@pytest.mark.parametrize("source", sorted(ELEMENT_WISE_LOOPS))
def test_every_element_wise_loop_vectorizes_at_every_level(isa, source, tmp_path):
    """GCC's report for the build's own flags: each loop over all elements is vectorized. Without AVX-512 a loop with
    a branch vectorizes only with -fno-trapping-math: the AVX2 build's GELU had run element by element, ~10x slower
    than the AVX-512 build's. (A loop in a template counts if any of its instances vectorizes.)"""
    compiler = shutil.which("g++")
    if compiler is None or "Free Software Foundation" not in subprocess.run(
            [compiler, "--version"], capture_output=True, text=True).stdout:
        pytest.skip("GCC's -fopt-info is needed")
    path = kernels.SOURCE_DIR / f"{source}.cc"
    pattern, count = ELEMENT_WISE_LOOPS[source]
    loops = {number for number, line in enumerate(path.read_text().splitlines(), start=1) if re.match(pattern, line)}
    assert len(loops) == count
    report = subprocess.run([compiler, *kernels.compile_flags(isa), "-c", str(path), "-o", str(tmp_path / "kernel.o"),
                             "-fopt-info-vec-optimized"], capture_output=True, text=True, check=True).stderr
    vectorized = {int(number) for number in re.findall(rf"{source}\.cc:(\d+):\d+: optimized: loop vectorized", report)}
    assert loops <= vectorized, f"not vectorized at {isa}: lines {sorted(loops - vectorized)}"


WAIT_POLICY_PROBE = """
import os
import replknet_fn.model  # the package first, as the entry scripts import it: MindSpore loads libgomp after it
maps = open("/proc/self/maps").read()
print(os.environ["OMP_WAIT_POLICY"], "libgomp" in maps)
"""


@pytest.mark.parametrize("user_value", [None, "active"])
def test_the_kernels_threads_sleep_after_a_call_unless_the_user_says_otherwise(user_value):
    # libgomp reads OMP_WAIT_POLICY once, when it loads (with MindSpore): the package sets it before that.
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    if user_value:
        env["OMP_WAIT_POLICY"] = user_value
    result = subprocess.run([sys.executable, "-c", WAIT_POLICY_PROBE], env=env, capture_output=True, text=True,
                            check=True)
    assert result.stdout.split()[-2:] == [user_value or "passive", "True"]
