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


def normalized_conv_outputs(conv, norm, activation, x, target, jit):
    """Output, the gradients of x, gamma, beta and the weight of sum(conv.after_norm(norm, x, activation) * target),
    and norm's running statistics after that one training forward."""
    norm.set_train(True)

    def loss(x):
        out = conv.after_norm(norm, x, activation)
        return (out * target).sum(), out

    value_and_grad = ms.value_and_grad(loss, 0, [norm.gamma, norm.beta, conv.weight], has_aux=True)
    if jit:
        value_and_grad = ms.jit(value_and_grad)
    (_, out), (input_gradient, parameter_gradients) = value_and_grad(x)
    return [value.asnumpy() for value in (out, input_gradient, *parameter_gradients, norm.moving_mean,
                                          norm.moving_variance)]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("input_norm", ["bn", "bn_relu", "bn_gelu"])
@pytest.mark.parametrize("shape", [(3, 6, 9, 11), (4, 6, 5, 7)], ids=["plane99", "plane35"])
def test_recomputing_the_normalized_input_changes_no_value(input_norm, jit, shape):
    """conv(bn(x)), conv(relu(bn(x))) and conv(gelu(bn(x))) with the normalized input recomputed in the backward
    (NormalizedInput) give the same output, gradients (x, gamma, beta, weight) and running statistics (updated
    once) as the same kernels run one after another and the input kept: the recomputed input is the forward's,
    bit for bit."""
    rng = np.random.default_rng(3)
    x = ms.Tensor((rng.standard_normal(shape) * 2 + 1).astype(np.float32))
    target = ms.Tensor(rng.standard_normal((shape[0], 10, *shape[2:])).astype(np.float32))
    gamma, beta = rng.standard_normal(6).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    outputs = []
    for recomputes in (True, False):
        conv = Conv1x1(6, 10, input_norm if recomputes else None)
        conv.weight.set_data(ms.Tensor(rng.standard_normal((10, 6, 1, 1)).astype(np.float32)) if not outputs
                             else outputs[0][-1])
        norm = model.batch_norm(6)
        norm.gamma.set_data(ms.Tensor(gamma))
        norm.beta.set_data(ms.Tensor(beta))
        activation = {"bn": None, "bn_relu": "relu", "bn_gelu": model.GELU()}[input_norm]
        norm.set_train(True)
        assert conv.recomputes(norm, x, activation) == recomputes
        outputs.append([*normalized_conv_outputs(conv, norm, activation, x, target, jit), conv.weight.data])
    for name, got, expected in zip(["out", "dx", "dgamma", "dbeta", "dweight", "moving_mean", "moving_variance"],
                                   outputs[0], outputs[1]):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max(), err_msg=name)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_recomputing_the_relu_of_two_normalized_branches_changes_no_value(jit):
    """conv(relu(bn_a(a) + bn_b(b))), RepLKBlock's pw2 after its two branches, by NormalizedSumInput: output, the
    gradients of a, b, both BNs' gamma and beta and the weight, and both BNs' running statistics equal the layers'
    run one after another."""
    rng = np.random.default_rng(6)
    a, b = (ms.Tensor((rng.standard_normal((3, 6, 9, 11)) * 2 + 1).astype(np.float32)) for _ in range(2))
    target = ms.Tensor(rng.standard_normal((3, 10, 9, 11)).astype(np.float32))
    weight = rng.standard_normal((10, 6, 1, 1)).astype(np.float32)
    affine = [rng.standard_normal(6).astype(np.float32) for _ in range(4)]
    outputs = []
    for input_norm in ("two_bn_relu", None):
        conv = Conv1x1(6, 10, input_norm)
        conv.weight.set_data(ms.Tensor(weight))
        norms = [model.batch_norm(6), model.batch_norm(6)]
        for index, (norm, gamma, beta) in enumerate(zip(norms, affine[::2], affine[1::2])):
            for name, parameter in norm.parameters_and_names():
                parameter.name = f"bn{index}.{name}"  # jit needs unique names
            norm.gamma.set_data(ms.Tensor(gamma))
            norm.beta.set_data(ms.Tensor(beta))
            norm.set_train(True)

        def loss(a, b):
            out = conv.after_two_norms(norms[0], a, norms[1], b)
            return (out * target).sum(), out

        parameters = [norms[0].gamma, norms[0].beta, norms[1].gamma, norms[1].beta, conv.weight]
        value_and_grad = ms.value_and_grad(loss, (0, 1), parameters, has_aux=True)
        (_, out), (input_gradients, parameter_gradients) = (ms.jit(value_and_grad) if jit else value_and_grad)(a, b)
        outputs.append([value.asnumpy() for value in (out, *input_gradients, *parameter_gradients, *(
            statistic for norm in norms for statistic in (norm.moving_mean, norm.moving_variance)))])
    assert (outputs[0][0] > 0).any() and outputs[0][1].std() > 0
    for index, (got, expected) in enumerate(zip(*outputs)):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max(), err_msg=str(index))


def test_the_gradient_recomputes_the_normalized_input(monkeypatch):
    """The gradient the unfused layers would equal is NormalizedInput's bprop's: a doubled weight gradient shows."""
    original = conv1x1.NormalizedInput.bprop

    def doubled(self, *args):
        gradients = original(self, *args)
        return (*gradients[:-1], gradients[-1] * 2)

    monkeypatch.setattr(conv1x1.NormalizedInput, "bprop", doubled)
    conv, norm = Conv1x1(4, 5, "bn"), model.batch_norm(4)
    x = ms.Tensor(np.random.default_rng(4).standard_normal((2, 4, 3, 3)).astype(np.float32))
    target = ms.Tensor(np.ones((2, 5, 3, 3), np.float32))
    # d/dW sum(W bn(x)) is the sum of bn(x) over the batch and the pixels: with gamma 1 and beta 1, 18 per channel.
    norm.beta.set_data(ms.Tensor(np.ones(4, np.float32)))
    dweight = normalized_conv_outputs(conv, norm, None, x, target, False)[4]
    np.testing.assert_allclose(dweight, np.full((5, 4, 1, 1), 2 * 18, np.float32), rtol=1e-5)


def test_the_blocks_recompute_their_1x1_convs_normalized_inputs():
    """RepLKBlock's pw1 (after the pre-BN) and pw2 (after the branches' BNs and the ReLU; after one BN and the ReLU
    without a small kernel), ConvFFN's pw1 (after the pre-BN) and pw2 (after BN and GELU), and the stem's 1x1 conv
    (after BN and ReLU) are built to recompute their inputs; eval mode runs the layers one after another (the
    running statistics)."""
    block, ffn = model.RepLKBlock(8, 8, 5, 3, 0.0), model.ConvFFN(8, 32, 0.0)
    assert block.pw1.conv.normalized.activation is None and block.pw2.conv.normalized_sum is not None
    assert model.RepLKBlock(8, 8, 5, None, 0.0).pw2.conv.normalized.activation == "relu"
    assert ffn.pw1.conv.normalized.activation is None and ffn.pw2.conv.normalized.activation == "gelu"
    assert model.build_replknet([5], [1], [8], num_classes=4).stem[2].conv.normalized.activation == "relu"
    x = ms.Tensor(np.random.default_rng(5).standard_normal((2, 8, 6, 6)).astype(np.float32))
    ffn.set_train(False)
    assert not ffn.pw1.conv.recomputes(ffn.preffn_bn, x, None)
    expected = ffn.pw2(ffn.nonlinear(ffn.pw1(ffn.preffn_bn(x)))).asnumpy() + x.asnumpy()
    np.testing.assert_allclose(ffn(x).asnumpy(), expected, rtol=1e-6, atol=1e-6)
