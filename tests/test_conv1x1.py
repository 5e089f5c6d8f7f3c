"""The 1x1 conv kernel, in every build this CPU runs, computes what MindSpore's conv computes (output, input,
weight and bias gradients, to float32 rounding), with the same parameters; the network's 1x1 convs follow
`large_kernel_impl`, and auto decides them as it decides the depthwise convs."""
import mindspore as ms
import numpy as np
import pytest

from replknet_fn import conv1x1, dwconv, kernels
from replknet_fn.model import replknet_tiny

from conftest import outputs_and_gradients, random_tensor, relative_error, same_weights

TOLERANCE = 1e-5
ISA_LEVELS = kernels.supported_isa_levels()

# (batch, in channels, height, width, out channels): maps smaller than a vector (one vector holds pixels of
# several images), pixel and channel counts that fill no whole vector or register tile, more rows than a tile.
SHAPES = [(5, 3, 2, 1, 7), (3, 5, 5, 7, 9), (2, 17, 4, 4, 6), (1, 8, 9, 9, 33), (4, 2, 1, 1, 2)]


def shape_id(shape):
    batch, channels, height, width, out_channels = shape
    return f"B{batch}C{channels}_{height}x{width}_O{out_channels}"


def assert_matches_native(impl, shape, jit, has_bias=False, isa=None):
    batch, channels, height, width, out_channels = shape
    rng = np.random.default_rng(0)
    native = conv1x1.pointwise_conv(channels, out_channels, "native", has_bias)
    conv = conv1x1.pointwise_conv(channels, out_channels, impl, has_bias, isa=isa)
    if has_bias:
        native.bias.set_data(random_tensor(rng, (out_channels,)))
    same_weights(native, conv)
    x = random_tensor(rng, (batch, channels, height, width))
    out_grad = random_tensor(rng, (batch, out_channels, height, width))
    expected = outputs_and_gradients(native, x, out_grad, jit)
    actual = outputs_and_gradients(conv, x, out_grad, jit)
    for name, got, want in zip(["output", "input grad", "weight grad", "bias grad"], actual, expected):
        assert got.shape == want.shape, name
        assert relative_error(got, want) < TOLERANCE, name


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("isa", ISA_LEVELS)
def test_output_and_gradients_match_native(isa, shape):
    assert_matches_native("direct", shape, jit=False, isa=isa)


@pytest.mark.parametrize("isa", ISA_LEVELS)
def test_output_and_gradients_match_native_under_jit_with_a_bias(isa):
    assert_matches_native("direct", (3, 5, 5, 7, 9), jit=True, has_bias=True, isa=isa)


def test_parameters_are_those_of_the_native_conv():
    for impl in ("auto", "direct"):
        for has_bias in (False, True):
            native = conv1x1.pointwise_conv(6, 10, "native", has_bias)
            conv = conv1x1.pointwise_conv(6, 10, impl, has_bias)
            assert [(p.name, p.shape) for p in conv.get_parameters()] == \
                [(p.name, p.shape) for p in native.get_parameters()]


def test_the_network_builds_its_1x1_convs_by_large_kernel_impl():
    """Every dense stride-1 1x1 conv (the stem's, pw1 and pw2 of each block, the transitions') follows the
    implementation, and the parameters are the same either way (checkpoints do not depend on it)."""
    native, automatic = replknet_tiny(large_kernel_impl="native"), replknet_tiny(large_kernel_impl="auto")
    pointwise = [name for name, cell in automatic.cells_and_names() if isinstance(cell, conv1x1.PointwiseConv)]
    assert len(pointwise) == 1 + 2 * 10 + 3
    assert not any(isinstance(cell, conv1x1.PointwiseConv) for _, cell in native.cells_and_names())
    assert [(p.name, p.shape) for p in automatic.get_parameters()] == \
        [(p.name, p.shape) for p in native.get_parameters()]


def test_unknown_implementation_lists_the_valid_ones():
    with pytest.raises(ValueError, match="native"):
        conv1x1.pointwise_conv(4, 4, "cuda")


def test_auto_decides_1x1_convs_by_their_output_channels_too(monkeypatch, tmp_path):
    """decide_for finds 1x1 convs and keys their verdicts by the output channels; construct follows them."""
    monkeypatch.setenv("REPLKNET_FN_CACHE", str(tmp_path))
    monkeypatch.setattr(dwconv, "_verdicts", {})
    monkeypatch.setattr(dwconv, "_logged", set())
    net = ms.nn.SequentialCell([conv1x1.pointwise_conv(4, 6, "auto"), conv1x1.pointwise_conv(6, 5, "auto")])
    faster = {dwconv.shape_key(3, 4, 5, 5, 1, 6): "direct", dwconv.shape_key(3, 6, 5, 5, 1, 5): "native"}

    def time_conv(impl, mode, shape, isa, repeat=1):
        assert len(shape) == 6
        slower = 1.0 if impl != faster[dwconv.shape_key(*shape)] else 0.01
        return slower if mode == "forward_backward" else slower / 3

    monkeypatch.setattr(dwconv, "time_conv", time_conv)
    assert dwconv.decide_for(net, (3, 4, 5, 5)) == faster

    def fail(*_):
        raise AssertionError("the direct kernel ran")

    net[1].direct = fail
    net(random_tensor(np.random.default_rng(5), (3, 4, 5, 5)))  # first: direct; second: native


def test_what_auto_times_is_the_1x1_conv_and_its_gradients():
    results = {}
    for impl in ("direct", "native"):
        ms.set_seed(0)
        runs = dwconv.conv_runs(impl, 2, 5, 3, 4, 1, 7)
        out, (input_grads, weight_grads) = runs["forward_backward"]()
        results[impl] = [out.asnumpy(), *(g.asnumpy() for g in input_grads), *(g.asnumpy() for g in weight_grads)]
    assert [r.shape for r in results["direct"]] == [(2, 7, 3, 4), (2, 5, 3, 4), (7, 5, 1, 1)]
    for got, want in zip(results["direct"], results["native"]):
        assert relative_error(got, want) < TOLERANCE
