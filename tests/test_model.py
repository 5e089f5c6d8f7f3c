"""The network computes what the official PyTorch RepLKNet computes (../shared/reference/README.md)."""
import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import ops

from replknet_fn import MODELS, build_replknet, replknet_tiny
from replknet_fn.convert import load_official_state_dict, official_key
from replknet_fn.model import GELU
from replknet_fn.reparam import reparameterize

from conftest import relative_error

EVAL_TOLERANCE = 1e-5
TRAIN_LOGITS_TOLERANCE = 5e-5
GRAD_TOLERANCE = 1e-3


@pytest.fixture()
def official_net(official_state_dict):
    net = replknet_tiny()
    load_official_state_dict(net, official_state_dict)
    return net


def test_eval_logits_match_official(official_net, fixture):
    official_net.set_train(False)
    logits = official_net(ms.Tensor(fixture["input"])).asnumpy()
    assert relative_error(logits, fixture["logits_eval"]) < EVAL_TOLERANCE


@pytest.mark.parametrize("fold_all", [False, True], ids=["reparam", "fully_folded"])
def test_deploy_logits_match_official(official_net, fixture, fold_all):
    deploy = reparameterize(official_net, fold_all=fold_all)
    logits = deploy(ms.Tensor(fixture["input"])).asnumpy()
    assert relative_error(logits, fixture["logits_reparam"]) < EVAL_TOLERANCE


def test_reparameterize_leaves_the_training_net_intact(official_net, fixture):
    reparameterize(official_net, fold_all=True)
    assert official_net.stages[0].blocks[0].large_kernel.small_conv is not None
    official_net.set_train(False)
    logits = official_net(ms.Tensor(fixture["input"])).asnumpy()
    assert relative_error(logits, fixture["logits_eval"]) < EVAL_TOLERANCE


def test_deploy_keys_match_official_reparam_keys(official_net, fixture):
    deploy = reparameterize(official_net)
    names = [name for name, _ in deploy.parameters_and_names()]
    assert all(param.name == name for name, param in deploy.parameters_and_names())
    assert "stages.0.blocks.0.large_kernel.lkb_reparam.bias" in names
    assert not any("lkb_origin" in name or "small_conv" in name for name in names)


def train_step_outputs(net, fixture):
    net.set_train(True)
    params = net.trainable_params()

    def forward(images, labels):
        logits = net(images)
        return ops.cross_entropy(logits, labels), logits

    grad_fn = ms.value_and_grad(forward, None, params, has_aux=True)
    (loss, logits), grads = grad_fn(ms.Tensor(fixture["input"]), ms.Tensor(fixture["labels"].astype(np.int32)))
    return loss.asnumpy(), logits.asnumpy(), dict(zip((p.name for p in params), (g.asnumpy() for g in grads)))


def test_train_mode_logits_loss_gradients_and_bn_statistics(official_net, fixture):
    loss, logits, grads = train_step_outputs(official_net, fixture)
    assert relative_error(logits, fixture["logits_train"]) < TRAIN_LOGITS_TOLERANCE
    assert abs(float(loss) - float(fixture["loss_train"])) / abs(float(fixture["loss_train"])) < 1e-5

    # Some gradients are mathematically zero (a bias feeding a train-mode BN) and hold only rounding noise, so
    # each is compared relative to max(its own largest magnitude, 1e-3 x the largest gradient in the model).
    official_grads = {key[len("grad:"):]: value for key, value in fixture.items() if key.startswith("grad:")}
    assert len(grads) == len(official_grads)
    largest = max(np.abs(value).max() for value in official_grads.values())
    for name, grad in grads.items():
        expected = official_grads[official_key(name)]
        error = np.abs(grad - expected).max() / max(np.abs(expected).max(), 1e-3 * largest)
        assert error < GRAD_TOLERANCE, name

    checked = 0
    for name, param in official_net.parameters_and_names():
        key = "post_train:" + official_key(name)
        if key in fixture:
            assert relative_error(param.asnumpy(), fixture[key]) < 1e-5, name
            checked += 1
    assert checked == 2 * 51  # running mean and variance of every BN of the tiny model


@pytest.mark.parametrize("name, train_params, deploy_params", [
    ("replknet31_base", 79.86, 79.53),
    ("replknet31_large", 172.67, 172.17),
    ("replknet_xlarge", 335.44, 335.40),
])
def test_parameter_counts_equal_official(name, train_params, deploy_params):
    net = MODELS[name]()
    count = sum(p.size for p in net.trainable_params())
    assert round(count / 1e6, 2) == train_params
    deploy = reparameterize(net)
    assert round(sum(p.size for p in deploy.trainable_params()) / 1e6, 2) == deploy_params


def test_drop_path_rates_rise_linearly_and_are_shared_by_each_pair():
    net = build_replknet([7, 5], [2, 3], [8, 16], drop_path_rate=0.4, num_classes=4)
    rates = [getattr(block.drop_path, "keep_prob", 1.0) for stage in net.stages for block in stage.blocks]
    expected = np.repeat(1 - np.linspace(0, 0.4, 5, dtype=np.float32), 2)
    np.testing.assert_allclose(rates, expected, rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("by_kernel", [True, False])
def test_drop_path_is_the_masked_multiply_forward_and_backward(jit, by_kernel):
    """DropPath masks by the compiled kernel where it can (pointwise.drop_path_op), else by MindSpore's ops; values
    and the input gradient are those of timm's `x * mask`, eagerly and jitted."""
    from replknet_fn.model import DropPath, hash_uniform, set_drop_path_seed
    cell = DropPath(0.5, index=3)
    assert cell.kernel is not None
    if not by_kernel:
        cell.kernel = None
    cell.set_train(True)
    set_drop_path_seed(cell, 11)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 4, 5)).astype(np.float32)
    dout = rng.standard_normal(x.shape).astype(np.float32)
    mask = np.floor(0.5 + hash_uniform(ms.Tensor(11, ms.int32), 3, 8).asnumpy()) / 0.5
    assert 0 < np.count_nonzero(mask) < 8  # both kept and dropped samples

    def loss(t):
        return (cell(t) * ms.Tensor(dout)).sum()

    forward, grad = (ms.jit(cell), ms.jit(ms.grad(loss))) if jit else (cell, ms.grad(loss))
    np.testing.assert_array_equal(forward(ms.Tensor(x)).asnumpy(), x * mask[:, None, None, None])
    np.testing.assert_array_equal(grad(ms.Tensor(x)).asnumpy(), dout * mask[:, None, None, None])


def test_out_indices_return_normalized_stage_features():
    net = build_replknet([7, 5, 5], [1, 1, 1], [8, 16, 32], num_classes=None, out_indices=[0, 2],
                         norm_intermediate_features=True)
    net.set_train(False)
    features = net(ms.Tensor(np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)))
    assert [tuple(f.shape) for f in features] == [(2, 8, 8, 8), (2, 32, 2, 2)]
    assert "stages.0.norm.gamma" in [name for name, _ in net.parameters_and_names()]


def test_xlarge_style_net_has_no_small_kernel_and_reparameterizes_exactly():
    net = build_replknet([7, 5], [1, 1], [8, 16], small_kernel=None, dw_ratio=1.5, num_classes=3)
    assert net.stages[0].blocks[0].large_kernel.small_conv is None
    assert net.stages[0].blocks[0].pw1.conv.out_channels == 12
    randomize_bn_statistics(net)
    net.set_train(False)
    images = ms.Tensor(np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32))
    expected = net(images).asnumpy()
    for fold_all in (False, True):
        assert relative_error(reparameterize(net, fold_all=fold_all)(images).asnumpy(), expected) < 1e-5


def randomize_bn_statistics(net, seed=0):
    rng = np.random.default_rng(seed)
    for name, param in net.parameters_and_names():
        if name.endswith(("moving_mean", "beta")):
            param.set_data(ms.Tensor(rng.normal(0, 0.5, param.shape).astype(np.float32)))
        elif name.endswith(("moving_variance", "gamma")):
            param.set_data(ms.Tensor(rng.uniform(0.5, 2.0, param.shape).astype(np.float32)))


def test_recompute_gives_the_same_gradients(official_state_dict, fixture):
    plain = replknet_tiny()
    load_official_state_dict(plain, official_state_dict)
    recomputed = replknet_tiny(recompute=True)
    load_official_state_dict(recomputed, official_state_dict)
    _, _, expected = train_step_outputs(plain, fixture)
    _, _, actual = train_step_outputs(recomputed, fixture)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kernel", [True, False], ids=["compiled", "mindspore"])
def test_gelu_is_the_exact_erf_form_forward_and_backward(kernel):
    gelu = GELU()
    if not kernel:
        gelu.kernel = None
    x = np.linspace(-8, 8, 20001).astype(np.float32)
    exact_x = x.astype(np.float64)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(exact_x / math.sqrt(2)))
    pdf = np.exp(-0.5 * exact_x ** 2) / math.sqrt(2 * math.pi)
    value, grad = ms.value_and_grad(lambda t: gelu(t).sum())(ms.Tensor(x))
    np.testing.assert_allclose(gelu(ms.Tensor(x)).asnumpy(), exact_x * cdf, rtol=0, atol=2e-6)
    np.testing.assert_allclose(grad.asnumpy(), cdf + exact_x * pdf, rtol=0, atol=1e-6)
    # The tanh approximation (MindSpore's default GELU) is 100x further off: this tolerance tells them apart.
    tanh_form = 0.5 * exact_x * (1 + np.tanh(math.sqrt(2 / math.pi) * (exact_x + 0.044715 * exact_x ** 3)))
    assert np.abs(tanh_form - exact_x * cdf).max() > 1e-4
