"""Every large-kernel depthwise conv implementation computes what the native conv computes: the output, the input
gradient, the weight gradient and the bias gradient, to float32 rounding; `auto` keeps native where it is faster."""
import mindspore as ms
import numpy as np
import pytest

from conftest import relative_error
from replknet_fn import dwconv

TOLERANCE = 1e-5
FAST_IMPLS = [impl for impl in dwconv.IMPLEMENTATIONS if impl != "native"]

# (batch, channels, height, width, kernel_size): even and odd sizes, non-square maps, kernels larger than the map.
SHAPES = [
    (1, 3, 7, 7, 5),
    (2, 2, 8, 6, 7),
    (2, 3, 9, 16, 13),
    (3, 2, 17, 33, 31),
    (1, 2, 4, 5, 31),
    (2, 4, 14, 14, 27),
    (2, 2, 40, 21, 11),
    (2, 3, 5, 4, 1),
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


def assert_matches_native(impl, shape, jit, has_bias=False, seed=0):
    batch, channels, height, width, kernel_size = shape
    rng = np.random.default_rng(seed)
    native = dwconv.depthwise_conv(channels, kernel_size, "native", has_bias)
    conv = dwconv.depthwise_conv(channels, kernel_size, impl, has_bias)
    if has_bias:
        native.bias.set_data(random_tensor(rng, (channels,)))
    same_weights(native, conv)
    x = random_tensor(rng, (batch, channels, height, width))
    out_grad = random_tensor(rng, (batch, channels, height, width))
    expected = outputs_and_gradients(native, x, out_grad, jit)
    actual = outputs_and_gradients(conv, x, out_grad, jit)
    names = ["output", "input grad", "weight grad", "bias grad"]
    for name, got, want in zip(names, actual, expected):
        assert got.shape == want.shape, name
        assert relative_error(got, want) < TOLERANCE, name


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_output_and_gradients_match_native(impl, shape):
    assert_matches_native(impl, shape, jit=False)


@pytest.mark.parametrize("shape", [(2, 3, 9, 16, 13), (1, 2, 4, 5, 31)], ids=shape_id)
@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_output_and_gradients_match_native_under_jit(impl, shape):
    assert_matches_native(impl, shape, jit=True)


@pytest.mark.parametrize("jit", [False, True], ids=["pynative", "jit"])
@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_bias_gradient_matches_native(impl, jit):
    assert_matches_native(impl, (2, 3, 11, 10, 9), jit, has_bias=True)


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


def test_auto_uses_the_direct_kernel_at_the_replknet_31b_stage_shapes():
    for kernel_size, size, channels in [(31, 56, 128), (29, 28, 256), (27, 14, 512), (13, 7, 1024)]:
        assert dwconv.direct_is_faster(8, channels, size, size, kernel_size)


def test_auto_keeps_native_where_it_was_measured_faster():
    assert not dwconv.direct_is_faster(8, 128, 56, 56, 1)
    assert dwconv.direct_is_faster(1, 64, 2, 2, 3)


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
    dwconv.compiled_library.cache_clear()
    dwconv.direct_conv_op.cache_clear()
    try:
        with pytest.warns(UserWarning, match="compiler"):
            conv = dwconv.depthwise_conv(2, 7, "direct")
        native = dwconv.depthwise_conv(2, 7, "native")
        same_weights(native, conv)
        x = random_tensor(np.random.default_rng(2), (1, 2, 6, 6))
        np.testing.assert_array_equal(conv(x).asnumpy(), native(x).asnumpy())
    finally:
        dwconv.compiled_library.cache_clear()
        dwconv.direct_conv_op.cache_clear()


def test_the_build_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("REPLKNET_FN_CACHE", str(tmp_path))
    dwconv.compiled_library.cache_clear()
    try:
        library = dwconv.compiled_library()
        assert library.parent == tmp_path and library.exists()
        dwconv.compiled_library.cache_clear()
        assert dwconv.compiled_library() == library
        assert [path.name for path in tmp_path.iterdir()] == [library.name]
    finally:
        dwconv.compiled_library.cache_clear()
