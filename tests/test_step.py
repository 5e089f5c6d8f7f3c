"""The train step: loss scaling, skipping, clipping, accumulation, optimizers, eager == jit."""
import math
import re

import mindspore as ms
import numpy as np
import pytest

from replknet_fn import build_replknet
from replknet_fn.config import DEFAULTS, Config
from replknet_fn.dist import plan_buckets
from replknet_fn.optim import SGD, AdamW, Lion, create_optimizer, layer_id, parameter_groups
from replknet_fn.step import clip_by_global_norm, compute_gradients, global_norm, make_train_step
from replknet_fn.train_state import EMA, TrainState, create_loss_scale


def tiny_config(**overrides):
    config = Config(DEFAULTS)
    # Eager by default (no compile: fast tests); the tests about jit itself ask for it.
    config.update(lr=1e-3, loss_scale=1024.0, loss_scale_window=3, jit=False)
    config.update(overrides)
    return config


def tiny_state(config, seed=0, ema=False, large_kernel_impl="auto"):
    ms.set_seed(seed)
    net = build_replknet([5, 3], [1, 1], [8, 16], small_kernel=3, num_classes=4, large_kernel_impl=large_kernel_impl)
    net.set_train(True)
    return TrainState(net, create_optimizer(net, config), create_loss_scale(config),
                      EMA(net, 0.9) if ema else None)


def batch(size=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(size, 3, 16, 16)).astype(np.float32)
    targets = np.eye(4, dtype=np.float32)[rng.integers(0, 4, size)]
    return ms.Tensor(images), ms.Tensor(targets)


def weights(state):
    return {name: param.asnumpy().copy() for name, param in state.parameters().items()}


LR = ms.Tensor(1e-3, ms.float32)


def test_loss_falls_over_a_few_dozen_steps():
    config = tiny_config(lr=3e-3)
    state = tiny_state(config)
    step = make_train_step(state, config)
    images, targets = batch(16)
    losses = [float(step(images, targets, ms.Tensor(3e-3, ms.float32))[0].asnumpy()) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]


def overflowing_gradients(grad_fn, images, targets, scale):
    """A replacement gradient stage that injects an inf, as an fp16 overflow would."""
    loss, grads = compute_gradients(grad_fn, images, targets, scale)
    return loss, (grads[0] + float("inf"),) + tuple(grads[1:])


def test_overflow_skips_the_update_halves_the_scale_and_keeps_the_schedule():
    from replknet_fn.schedule import create_lr_schedule
    config = tiny_config(warmup_epochs=1, epoch_size=3, decay_epochs=2, jit=True)
    lr_at = create_lr_schedule(config, steps_per_epoch=4)
    state = tiny_state(config, ema=True)
    step = make_train_step(state, config)
    overflowing_step = make_train_step(state, config, gradients=overflowing_gradients)
    images, targets = batch()
    step(images, targets, ms.Tensor(lr_at(0), ms.float32))
    before = weights(state)
    _, norm, finite, scale = overflowing_step(images, targets, ms.Tensor(lr_at(1), ms.float32))
    assert not bool(finite.asnumpy()) and not math.isfinite(float(norm.asnumpy()))
    assert float(scale.asnumpy()) == 512.0
    after = weights(state)
    for name, value in before.items():
        if name.startswith("loss_scale.") or "moving_" in name:
            continue  # the scale changes by design; BN statistics are updated by the (finite) forward
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    assert int(state.optimizer.steps.asnumpy()) == 1
    assert int(state.loss_scale.good_steps.asnumpy()) == 0
    # The next step runs with the lr passed in (the loop's lr_at(step), which counts the skipped step), and
    # AdamW's bias correction counts applied updates only: the result equals one more ordinary step.
    step(images, targets, ms.Tensor(lr_at(2), ms.float32))
    assert int(state.optimizer.steps.asnumpy()) == 2


def test_dynamic_scale_grows_after_a_window_of_finite_steps():
    config = tiny_config(loss_scale_window=3, jit=True)
    state = tiny_state(config)
    step = make_train_step(state, config)
    images, targets = batch()
    scales = [float(step(images, targets, LR)[3].asnumpy()) for _ in range(4)]
    assert scales == [1024.0, 1024.0, 2048.0, 2048.0]


def test_static_scale_never_changes_but_still_skips_overflow():
    config = tiny_config(loss_scale_type="static", loss_scale=128.0)
    state = tiny_state(config)
    step = make_train_step(state, config, gradients=overflowing_gradients)
    before = state.net.trainable_params()[0].asnumpy().copy()
    _, _, finite, scale = step(*batch(), LR)
    assert not bool(finite.asnumpy()) and float(scale.asnumpy()) == 128.0
    np.testing.assert_array_equal(state.net.trainable_params()[0].asnumpy(), before)


def test_clipping_bounds_the_global_norm():
    rng = np.random.default_rng(0)
    grads = tuple(ms.Tensor(rng.normal(size=shape).astype(np.float32)) for shape in [(3, 4), (5,), (2, 2, 2)])
    norm = global_norm(grads)
    expected = math.sqrt(sum(float((g.asnumpy().astype(np.float64) ** 2).sum()) for g in grads))
    assert float(norm.asnumpy()) == pytest.approx(expected, rel=1e-6)
    clipped = clip_by_global_norm(grads, norm, clip_value=0.5)
    assert float(global_norm(clipped).asnumpy()) == pytest.approx(0.5, rel=1e-5)
    unclipped = clip_by_global_norm(grads, norm, clip_value=1e3)
    for a, b in zip(unclipped, grads):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())


def test_step_reports_the_unclipped_norm_and_applies_the_clipped_update():
    config = tiny_config(opt="sgd", momentum=0.0, weight_decay=0.0, clip_value=1e-3)
    state = tiny_state(config)
    step = make_train_step(state, config)
    before = [p.asnumpy().copy() for p in state.optimizer.parameters]
    lr = 0.5
    _, norm, _, _ = step(*batch(), ms.Tensor(lr, ms.float32))
    update_norm = math.sqrt(sum(float(((p.asnumpy() - b) ** 2).sum())
                                for p, b in zip(state.optimizer.parameters, before)))
    assert float(norm.asnumpy()) > 1e-2
    assert update_norm == pytest.approx(lr * 1e-3, rel=1e-3)


def test_two_micro_batches_equal_one_double_batch():
    images, targets = batch(8)
    results = []
    for accumulation in (1, 2):
        config = tiny_config(accumulation_steps=accumulation)
        state = tiny_state(config)
        state.net.set_train(False)  # BN on running statistics: a batch's statistics would differ per micro-batch
        step = make_train_step(state, config)
        loss = step(images, targets, LR)[0].asnumpy()
        results.append((loss, weights(state)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for name, value in results[0][1].items():
        np.testing.assert_allclose(results[1][1][name], value, rtol=1e-5, atol=1e-7, err_msg=name)


def test_eager_and_jitted_steps_agree():
    results = []
    for jit in (True, False):
        config = tiny_config(jit=jit)
        state = tiny_state(config, ema=True)
        step = make_train_step(state, config)
        losses = [float(step(*batch(seed=i), LR)[0].asnumpy()) for i in range(3)]
        results.append((losses, weights(state)))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    for name, value in results[0][1].items():
        np.testing.assert_allclose(results[1][1][name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def numpy_adamw(param, grads, lrs, wd, beta1=0.9, beta2=0.999, eps=1e-8):
    """torch.optim.AdamW, written out."""
    m = np.zeros_like(param)
    v = np.zeros_like(param)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        param = param * (1 - lr * wd)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
        param = param - lr * m_hat / (np.sqrt(v_hat) + eps)
    return param


@pytest.mark.parametrize("optimizer_name", ["adamw", "adamw_fused", "sgd_nesterov", "lion"])
def test_optimizers_follow_their_torch_formulas(optimizer_name):
    rng = np.random.default_rng(0)
    start = rng.normal(size=(6,)).astype(np.float64)
    grads = [rng.normal(size=(6,)) for _ in range(4)]
    lrs = [0.1, 0.05, 0.02, 0.01]
    param = ms.Parameter(ms.Tensor(start.astype(np.float32)), name="w")
    if optimizer_name.startswith("adamw"):
        optimizer, expected = AdamW([param], [0.05], [1.0]), numpy_adamw(start, grads, lrs, 0.05)
        if optimizer_name == "adamw_fused":
            optimizer.kernel = None  # MindSpore's fused kernel, used without a C++ compiler
    elif optimizer_name == "sgd_nesterov":
        optimizer = SGD([param], [0.01], [1.0], momentum=0.9, nesterov=True)
        p, buf = start.copy(), np.zeros(6)
        for g, lr in zip(grads, lrs):
            g = g + 0.01 * p
            buf = 0.9 * buf + g
            p = p - lr * (g + 0.9 * buf)
        expected = p
    else:
        optimizer = Lion([param], [0.1], [1.0], betas=(0.9, 0.99))
        p, m = start.copy(), np.zeros(6)
        for g, lr in zip(grads, lrs):
            p = p * (1 - lr * 0.1) - lr * np.sign(0.9 * m + 0.1 * g)
            m = 0.99 * m + 0.01 * g
        expected = p
    for g, lr in zip(grads, lrs):
        optimizer((ms.Tensor(g.astype(np.float32)),), ms.Tensor(lr, ms.float32))
    np.testing.assert_allclose(param.asnumpy(), expected, rtol=2e-5, atol=1e-6)


def test_bias_and_bn_parameters_get_no_weight_decay():
    config = tiny_config(weight_decay=0.05)
    net = build_replknet([5, 3], [1, 1], [8, 16], small_kernel=3, num_classes=4)
    params, decays, _ = parameter_groups(net, config)
    by_name = dict(zip((p.name for p in params), decays))
    assert by_name["stem.0.conv.weight"] == 0.05 and by_name["head.weight"] == 0.05
    assert by_name["head.bias"] == 0.0 and by_name["stem.0.bn.gamma"] == 0.0 and by_name["norm.beta"] == 0.0


def official_layer_id(var_name):
    """The official optim_factory.get_num_layer_for_replknet (RepLKNet-pytorch), for [2, 2, 18, 2] layers."""
    if var_name.startswith("stem"):
        return 0
    elif var_name.startswith("stages"):
        stage_id = int(var_name.split('.')[1])
        block_id = int(var_name.split('.')[3])
        if stage_id in [0, 1]:
            return stage_id + 1
        elif stage_id == 2:
            return 3 + block_id // 4
        return 12
    elif var_name.startswith('transitions'):
        transition_id = int(var_name.split('.')[1])
        return transition_id + 1 if transition_id in [0, 1] else 11
    return 13


def test_layer_ids_are_the_official_groups_for_the_31b_31l_xl_depths():
    layers = [2, 2, 18, 2]
    names = ["stem.0.conv.weight", "stem.3.bn.gamma", "norm.gamma", "head.weight", "head.bias"]
    names += [f"stages.{stage}.blocks.{block}.pw1.conv.weight" for stage in range(4)
              for block in range(2 * layers[stage])]
    names += [f"transitions.{index}.0.conv.weight" for index in range(3)]
    assert {name: layer_id(name, layers) for name in names} == {name: official_layer_id(name) for name in names}


def test_layer_decay_scales_rise_towards_the_head():
    """The official scale of layer i is decay ** (13 - i) at [2, 2, 18, 2]; a small net groups the same way."""
    config = tiny_config(layer_decay=0.5)
    net = build_replknet([5, 3], [1, 2], [8, 16], small_kernel=3, num_classes=4)
    params, _, scales = parameter_groups(net, config)
    by_name = dict(zip((p.name for p in params), scales))
    layers = [1, 2]
    # stem 0, stage 0 (and transition 0) 1, stage 1 (the deepest: 4 blocks, one group of 4) 2, head 3
    assert layer_id("stages.1.blocks.3.pw1.conv.weight", layers) == 2
    assert layer_id("transitions.0.0.conv.weight", layers) == 1
    assert by_name["stem.0.conv.weight"] == 0.5 ** 3
    assert by_name["stages.0.blocks.1.pw1.conv.weight"] == 0.5 ** 2
    assert by_name["stages.1.blocks.3.pw1.conv.weight"] == 0.5
    assert by_name["head.weight"] == 1.0


def test_ema_follows_its_formula():
    config = tiny_config()
    state = tiny_state(config, ema=True)
    step = make_train_step(state, config)
    first = state.net.trainable_params()[0]
    average = next(a for a in state.ema.averages if a.name == "ema." + first.name)
    before_average = average.asnumpy().copy()
    step(*batch(), LR)
    np.testing.assert_allclose(average.asnumpy(), 0.9 * before_average + 0.1 * first.asnumpy(), rtol=1e-6,
                               atol=1e-7)


def test_mixed_precision_o2_step_trains_with_fp32_loss():
    from replknet_fn.device import mixed_precision
    config = tiny_config(amp_level="O2", lr=3e-3)
    state = tiny_state(config)
    step = make_train_step(state, config, net=mixed_precision(state.net, "O2"))
    images, targets = batch(16)
    losses = [float(step(images, targets, ms.Tensor(3e-3, ms.float32))[0].asnumpy()) for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0]
    assert state.net.trainable_params()[0].dtype == ms.float32  # master weights stay fp32


def test_compiling_the_step_keeps_parameter_names():
    config = tiny_config(jit=True)
    state = tiny_state(config, ema=True)
    names = sorted(state.parameters())
    make_train_step(state, config)
    assert sorted(state.parameters()) == names
    assert all(param.name == name for name, param in state.net.parameters_and_names())


def test_buckets_cover_every_tensor_in_order_within_the_limit():
    """dist.plan_buckets: the all-reduce's buckets and scale_all's chunks."""
    ranges = plan_buckets([5, 3, 9, 1, 1, 2, 12], 8)
    assert ranges == [(0, 2), (2, 3), (3, 6), (6, 7)]  # a tensor over the limit is a bucket of its own
    assert plan_buckets([], 8) == []


@pytest.mark.parametrize("limit", [None, 160])
def test_gradient_ops_by_kernel_equal_mindspores_ops(monkeypatch, limit):
    """scale_all (in chunks of `limit` bytes, or the default) and sum_of_squares by kernel, jitted, equal the
    per-tensor MindSpore versions."""
    from replknet_fn import step  # as a module here: the other tests name their train steps `step`
    if limit is not None:
        monkeypatch.setattr(step, "SCALE_CHUNK_BYTES", limit)
    rng = np.random.default_rng(0)
    grads = tuple(ms.Tensor(rng.standard_normal(shape).astype(np.float32)) for shape in
                  [(4, 3), (50,), (2, 2, 3), (7,), (30,)])
    params = [ms.Parameter(grad, name=f"p{i}") for i, grad in enumerate(grads)]
    scale_all, sum_of_squares = step.choose_gradient_ops(params)
    assert scale_all is not step.scale_each
    assert len(plan_buckets([4 * grad.size for grad in grads], step.SCALE_CHUNK_BYTES)) == (1 if limit is None else 4)
    factor = ms.Tensor(0.25, ms.float32)
    scaled = ms.jit(scale_all)(factor, grads)
    assert len(scaled) == len(grads)
    for ours, expected in zip(scaled, step.scale_each(factor, grads)):
        np.testing.assert_array_equal(ours.asnumpy(), expected.asnumpy())
    np.testing.assert_allclose(ms.jit(sum_of_squares)(grads).asnumpy(),
                               step.sum_of_squares_each(grads).asnumpy(), rtol=1e-6)


@pytest.mark.parametrize("large_kernel_impl", ["auto", "direct"])
def test_the_compiled_step_copies_no_weight(tmp_path, large_kernel_impl):
    """MindSpore's order enforcement copies (TensorMove) every load of a parameter that one graph loads twice; a
    cell with its own bprop handed the Parameter loads it again in its bprop. The step's graph must read each conv
    weight where it lies: a copy per weight was ~0.27 GB of 31B's peak. The loss scale (a scalar) may be copied."""
    config = tiny_config(jit=True)
    step = make_train_step(tiny_state(config, large_kernel_impl=large_kernel_impl), config)
    ms.set_context(save_graphs=1, save_graphs_path=str(tmp_path))
    try:
        step(*batch(), LR)
    finally:
        ms.set_context(save_graphs=0)
    [final_graph] = tmp_path.glob("**/*_validate_*.ir")
    text = final_graph.read_text()
    defined = dict(re.findall(r"^\s+(%\d+)\(\S+\) = (.*)$", text, re.MULTILINE))
    moved = [defined.get(source, source) for source in re.findall(r"= TensorMove\((%\d+)\)", text)]
    weights = [source for source in moved if re.search(r"Load\(%para\d+_\S*weight", source)]
    assert not weights, f"{len(weights)} conv weights copied, e.g. {weights[0][:120]}"
    assert len(moved) <= 2
