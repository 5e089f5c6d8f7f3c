"""Conv1x1: nn.Conv2d's 1x1 conv, its weight gradient by batched matmul on CPU (conv1x1.py). The oracle is
nn.Conv2d with the same weight: output, input gradient and weight gradient, eager and jitted."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from replknet_fn import conv1x1, model
from replknet_fn.conv1x1 import Conv1x1


def output_and_gradients(conv, x, target, jit):
    def loss(x):
        return (conv(x) * target).sum()

    value_and_grad = ms.value_and_grad(loss, 0, [conv.weight])
    if jit:
        value_and_grad = ms.jit(value_and_grad)
    _, (input_gradient, (weight_gradient,)) = value_and_grad(x)
    return conv(x).asnumpy(), input_gradient.asnumpy(), weight_gradient.asnumpy()


@pytest.mark.parametrize("jit", [False, True])
def test_output_and_both_gradients_are_nn_conv2d_s(jit):
    rng = np.random.default_rng(0)
    ours, reference = Conv1x1(6, 10), nn.Conv2d(6, 10, 1, has_bias=False)
    reference.weight.set_data(ours.weight.data)
    x = ms.Tensor(rng.standard_normal((3, 6, 5, 7)).astype(np.float32))
    target = ms.Tensor(rng.standard_normal((3, 10, 5, 7)).astype(np.float32))
    for got, expected in zip(output_and_gradients(ours, x, target, jit),
                             output_and_gradients(reference, x, target, jit)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_the_weight_gradient_is_the_matmul_s(monkeypatch):
    """The gradient nn.Conv2d's would equal is the one the cell's bprop computes, not MindSpore's own."""
    original = conv1x1.WeightGradientByMatmul.bprop

    def doubled(self, x, weight, out, dout):
        input_gradient, weight_gradient = original(self, x, weight, out, dout)
        return input_gradient, weight_gradient * 2

    monkeypatch.setattr(conv1x1.WeightGradientByMatmul, "bprop", doubled)
    conv = Conv1x1(4, 5)
    x = ms.Tensor(np.ones((2, 4, 3, 3), np.float32))
    _, _, weight_gradient = output_and_gradients(conv, x, ms.Tensor(np.ones((2, 5, 3, 3), np.float32)), False)
    np.testing.assert_allclose(weight_gradient, np.full((5, 4, 1, 1), 2 * 2 * 9, np.float32))


def test_the_model_builds_its_1x1_convs_as_conv1x1_with_nn_conv2d_s_names():
    conv = model.conv2d(8, 16, 1)
    assert isinstance(conv, Conv1x1) and isinstance(conv, nn.Conv2d)
    assert [name for name, _ in conv.parameters_and_names()] == ["weight"]
    assert not isinstance(model.conv2d(8, 16, 1, has_bias=True), Conv1x1)  # the folded deploy form
    assert not isinstance(model.conv2d(8, 16, 1, stride=2), Conv1x1)
    assert not isinstance(model.conv2d(8, 16, 3), Conv1x1)
