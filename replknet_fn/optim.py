"""Optimizers with torch semantics that take the learning rate as an input of every call.

`optimizer(grads, lr)` updates the parameters in place. The lr comes from the schedule on the host each step
(see schedule.py), so there is no hidden step counter to drift after skipped steps. Each parameter carries a
weight decay and an lr scale (layer-wise decay), fixed at construction.

Each optimizer maps a per-parameter update over all parameters with `ops.HyperMap`: a Python loop over RepLKNet-31B's
562 parameters exceeds MindSpore's call-depth limit under jit (see step.py). AdamW's compiled kernel is one op over
all parameters instead.
"""
import math

import mindspore as ms
from mindspore import nn, ops
from mindspore.common.parameter import Parameter, ParameterTuple

from replknet_fn import device, pointwise

map_each = ops.HyperMap()


def decays_weight(name, param, filter_bias_and_bn):
    """timm's rule: biases and BN/1-D parameters get no weight decay."""
    return not (filter_bias_and_bn and (len(param.shape) <= 1 or name.endswith(".bias")))


def layer_groups(layers):
    """Groups of layer-wise lr decay per stage, as the official optim_factory.get_num_layer_for_replknet: one
    per stage, except the deepest stage (RepLKNet's third: 18 RepLK/FFN pairs), in groups of 4 blocks (2 pairs).
    For [2, 2, 18, 2]: [1, 1, 9, 1]."""
    deepest = layers.index(max(layers))
    return [math.ceil(2 * count / 4) if stage == deepest else 1 for stage, count in enumerate(layers)]


def layer_id(name, layers):
    """Layer index for layer-wise lr decay (BEiT style, the official grouping): stem 0, then the stage groups of
    `layer_groups` in order, a transition with the group before it, the final norm and head last. For
    [2, 2, 18, 2] the official ids 0..13."""
    groups = layer_groups(layers)
    first = [1 + sum(groups[:stage]) for stage in range(len(layers))]
    if name.startswith("stem."):
        return 0
    parts = name.split(".")
    if parts[0] == "stages":
        stage = int(parts[1])
        if parts[2] == "blocks" and groups[stage] > 1:
            return first[stage] + int(parts[3]) // 4
        return first[stage] + (0 if parts[2] == "blocks" else groups[stage] - 1)
    if parts[0] == "transitions":
        stage = int(parts[1])
        return first[stage] + groups[stage] - 1
    return 1 + sum(groups)


def parameter_groups(net, config):
    """(params, weight_decays, lr_scales) for the trainable parameters of `net`."""
    params = net.trainable_params()
    decays = [config.weight_decay if decays_weight(p.name, p, config.filter_bias_and_bn) else 0.0 for p in params]
    if config.layer_decay < 1.0:
        layers = net.build_args["layers"]
        last = 1 + sum(layer_groups(layers))  # the head's id: its lr is not decayed
        scales = [config.layer_decay ** (last - layer_id(p.name, layers)) for p in params]
    else:
        scales = [1.0] * len(params)
    return params, decays, scales


class PerParameterOptimizer(nn.Cell):
    """What every optimizer here holds: the parameters, zero-initialised state buffers shaped like them (checkpoint
    names `<name>.<state>.<parameter>`), a step count `<name>.steps`, and each parameter's weight decay and lr
    scale. `states` maps an attribute to its state's name, e.g. {"exp_avg": "exp_avg"}."""

    def __init__(self, name, params, weight_decays, lr_scales, states):
        super().__init__()
        self.parameters = ParameterTuple(params)
        for attribute, state in states.items():
            setattr(self, attribute, self.parameters.clone(prefix=f"{name}.{state}", init="zeros"))
        self.steps = Parameter(ms.Tensor(0, ms.int32), name=f"{name}.steps", requires_grad=False)
        self.weight_decays = tuple(float(decay) for decay in weight_decays)
        self.lr_scales = tuple(float(scale) for scale in lr_scales)

    def count_step(self):
        """The step count after this step, stored."""
        steps = self.steps + 1
        ops.assign(self.steps, steps)
        return steps


class AdamW(PerParameterOptimizer):
    """torch.optim.AdamW (decoupled decay, bias correction).

    float32 parameters are updated in place by the one-pass kernel of pointwise.py (torch's formula, written out
    in csrc/pointwise.cc), one op for all of them. Without it (no C++ compiler), by MindSpore's fused
    `AdamWeightDecay` kernel, which computes p -= a * (m / (sqrt(v) + e) + d * p) without bias correction; torch's
    update p -= lr * wd * p + lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps) is the same with a = lr * sqrt(bc2) / bc1,
    e = eps * sqrt(bc2) and d = wd * bc1 / sqrt(bc2).
    """

    def __init__(self, params, weight_decays, lr_scales, betas=(0.9, 0.999), eps=1e-8):
        super().__init__("adamw", params, weight_decays, lr_scales,
                         {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"})
        self.beta1, self.beta2, self.eps = float(betas[0]), float(betas[1]), float(eps)
        uses_kernel = device.cpu_kernels_enabled() and params and all(param.dtype == ms.float32 for param in params)
        self.kernel = pointwise.adamw_op(len(params)) if uses_kernel else None
        # The kernel's per-parameter constants, one row per parameter, a graph constant.
        self.kernel_hypers = ms.Tensor([[scale, decay, self.beta1, self.beta2, self.eps]
                                        for scale, decay in zip(self.lr_scales, self.weight_decays)], ms.float32)

    def construct(self, grads, lr):
        steps = self.count_step()
        count = steps.astype(ms.float32)
        if self.kernel is not None:
            update = self.kernel(*self.parameters, *self.exp_avg, *self.exp_avg_sq, *grads, ops.stack([lr, count]),
                                 self.kernel_hypers)
            return ops.depend(steps, update)
        bias_correction1 = 1.0 - ops.pow(self.beta1, count)
        root_bias_correction2 = ops.sqrt(1.0 - ops.pow(self.beta2, count))
        step_size = lr * root_bias_correction2 / bias_correction1
        eps = self.eps * root_bias_correction2
        decay_factor = bias_correction1 / root_bias_correction2
        updates = map_each(ops.partial(adamw_fused_update, self.beta1, self.beta2, step_size, eps, decay_factor),
                           self.lr_scales, self.weight_decays, self.parameters, self.exp_avg, self.exp_avg_sq, grads)
        return ops.depend(steps, updates)


fused_adam_weight_decay = ops.AdamWeightDecay()


def adamw_fused_update(beta1, beta2, step_size, eps, decay_factor, lr_scale, weight_decay, param, exp_avg,
                       exp_avg_sq, grad):
    return fused_adam_weight_decay(param, exp_avg, exp_avg_sq, step_size * lr_scale, beta1, beta2, eps,
                                   weight_decay * decay_factor, grad)


class SGD(PerParameterOptimizer):
    """torch.optim.SGD with momentum (optionally Nesterov) and coupled weight decay."""

    def __init__(self, params, weight_decays, lr_scales, momentum=0.9, nesterov=False):
        super().__init__("sgd", params, weight_decays, lr_scales, {"momentum_buffers": "momentum"})
        self.momentum, self.nesterov = float(momentum), bool(nesterov)

    def construct(self, grads, lr):
        # torch initialises the buffer with the first gradient; from zeros, momentum * 0 + g is the same.
        steps = self.count_step()
        updates = map_each(ops.partial(sgd_update, self.momentum, self.nesterov, lr), self.lr_scales,
                           self.weight_decays, self.parameters, self.momentum_buffers, grads)
        return ops.depend(steps, updates)


def sgd_update(momentum, nesterov, lr, lr_scale, weight_decay, param, buffer, grad):
    grad = grad + weight_decay * param
    new_buffer = momentum * buffer + grad
    ops.assign(buffer, new_buffer)
    update = grad + momentum * new_buffer if nesterov else new_buffer
    return ops.assign(param, param - lr * lr_scale * update)


class Lion(PerParameterOptimizer):
    """Lion (Chen et al. 2023): sign of an interpolated momentum, decoupled weight decay."""

    def __init__(self, params, weight_decays, lr_scales, betas=(0.9, 0.99)):
        super().__init__("lion", params, weight_decays, lr_scales, {"exp_avg": "exp_avg"})
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])

    def construct(self, grads, lr):
        steps = self.count_step()
        updates = map_each(ops.partial(lion_update, self.beta1, self.beta2, lr), self.lr_scales, self.weight_decays,
                           self.parameters, self.exp_avg, grads)
        return ops.depend(steps, updates)


def lion_update(beta1, beta2, lr, lr_scale, weight_decay, param, exp_avg, grad):
    group_lr = lr * lr_scale
    update = ops.sign(beta1 * exp_avg + (1.0 - beta1) * grad)
    ops.assign(param, param * (1.0 - group_lr * weight_decay) - group_lr * update)
    return ops.assign(exp_avg, beta2 * exp_avg + (1.0 - beta2) * grad)


def create_optimizer(net, config):
    params, decays, scales = parameter_groups(net, config)
    if config.opt == "adamw":
        return AdamW(params, decays, scales, config.betas, config.eps)
    if config.opt in ("sgd", "momentum"):
        momentum = config.momentum if config.opt == "momentum" or config.momentum > 0 else 0.0
        return SGD(params, decays, scales, momentum, config.nesterov)
    if config.opt == "lion":
        return Lion(params, decays, scales, config.betas)
    raise ValueError(f"unknown optimizer {config.opt!r}")

