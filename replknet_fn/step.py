"""The training step as a pipeline of small named functions.

    forward and loss -> scale -> gradients (accumulated over micro-batches) -> all-reduce -> unscale
    -> global norm / finite check -> clip -> apply or skip -> update the loss scale -> update the EMA

`make_train_step` composes them and compiles the result with `mindspore.jit` (or not, with `jit=False`: the
same code runs eagerly, for a debugger). To change one stage, pass your own function for it, e.g.
`make_train_step(state, config, clip=my_clip)`. A stage takes data only; `make_train_step` binds the config's
settings to the defaults (`with_settings`), so a replacement never has to accept settings it does not use:

| stage          | signature                                          | default (settings bound from the config)   |
| -------------- | -------------------------------------------------- | ------------------------------------------ |
| `loss_fn`      | (logits, targets) -> loss                          | soft_target_cross_entropy                  |
| `gradients`    | (grad_fn, images, targets, scale) -> (loss, grads) | compute_gradients (accumulation_steps)     |
| `all_reduce`   | (grads) -> grads                                   | no_all_reduce; dist.make_gradient_mean     |
| `clip`         | (grads, norm) -> grads                             | clip_by_global_norm (clip_value)           |
| `apply`        | (optimizer, grads, lr, finite) -> applied          | apply_or_skip (drop_overflow_update)       |
| `scale_update` | (loss_scale, finite) -> new scale                  | update_loss_scale                          |
| `ema_update`   | (ema, applied) -> applied                          | update_ema                                 |

`grads` is a tuple of tensors in the order of the optimizer's parameters; `scale` and `lr` are float32 scalars;
`finite` and `applied` are boolean scalars. Unscaling and the global norm are plain functions here too; they and
the clip scale or sum all gradients with one op each where the compiled CPU kernels run (`choose_gradient_ops`).

Functions over all gradients map a per-tensor function with `ops.HyperMap` (`map_each`) rather than a Python
loop or comprehension: jit unrolls those into nested calls, and over RepLKNet-31B's 562 parameters that exceeds
MindSpore's call-depth limit.
"""
import mindspore as ms
from mindspore import nn, ops

from replknet_fn import device, dist, pointwise

map_each = ops.HyperMap()


def multiply(factor, tensor):
    return tensor * factor


def squared_sum(tensor):
    """sum(tensor ** 2) with MindSpore's ops."""
    return ops.sum(tensor * tensor)


def scale_each(factor, grads):
    """Every gradient times the scalar `factor`, with MindSpore's ops (one Mul per gradient)."""
    return map_each(ops.partial(multiply, factor), grads)


def sum_of_squares_each(grads):
    """The sum of squares of every element of every gradient, with MindSpore's ops (a few per gradient)."""
    return ops.addn(map_each(squared_sum, grads))


# Bytes per op of `scale_all`: its outputs are allocated while its inputs live, so one op over all of 31B's
# gradients would hold a second copy of them (320 MB) at once; in chunks, each chunk's inputs are freed after it.
SCALE_CHUNK_BYTES = 32 * 2 ** 20


def choose_gradient_ops(params):
    """(scale_all, sum_of_squares), the two functions over all gradients of unscaling, clipping and the global norm.
    Where the compiled CPU kernels run and every parameter is float32, each is one compiled op over all gradients
    (scale_all: one per chunk of SCALE_CHUNK_BYTES; pointwise.py), else MindSpore's ops per gradient
    (scale_each, sum_of_squares_each). Launching an op costs MindSpore ~30-50 us on CPU whatever its size: two Muls
    and a squared sum per gradient, with AdamW's update, were 632 of the ~1100 ops of the demo's step. Chosen on the
    host, before the step is traced."""
    uses_kernels = (device.cpu_kernels_enabled() and len(params) > 0
                    and all(param.dtype == ms.float32 for param in params))
    scale_kernel = pointwise.scale_all_op() if uses_kernels else None
    squares_kernel = pointwise.squared_sum_op() if uses_kernels else None
    if scale_kernel is None or squares_kernel is None:
        return scale_each, sum_of_squares_each

    ranges = dist.plan_buckets([param.size * param.data.itemsize for param in params], SCALE_CHUNK_BYTES)

    def scale_all(factor, grads):
        start, end = ranges[0]
        scaled = scale_kernel(*grads[start:end], factor)
        for start, end in ranges[1:]:
            scaled = scaled + scale_kernel(*grads[start:end], factor)
        return scaled

    def sum_of_squares(grads):
        return squares_kernel(*grads)

    return scale_all, sum_of_squares


def soft_target_cross_entropy(logits, targets):
    """Cross-entropy against soft targets (mixup/cutmix and label smoothing are already in `targets`)."""
    log_probs = ops.log_softmax(logits.astype(ms.float32), axis=-1)
    return ops.mean(ops.sum(-targets * log_probs, -1))


def make_scaled_forward(net, loss_fn):
    """forward(images, targets, scale) -> (scaled loss, loss, logits); gradients flow from the first output."""

    def forward(images, targets, scale):
        logits = net(images)
        loss = loss_fn(logits, targets)
        return loss * scale, loss, logits

    return forward


def compute_gradients(grad_fn, images, targets, scale, *, accumulation_steps=1):
    """Mean loss and mean (still scaled) gradients over `accumulation_steps` equal micro-batches."""
    if accumulation_steps == 1:
        (_, loss, _), grads = grad_fn(images, targets, scale)
        return loss, grads
    micro = images.shape[0] // accumulation_steps
    (_, total_loss, _), total_grads = grad_fn(images[:micro], targets[:micro], scale)
    for i in range(1, accumulation_steps):
        (_, loss, _), grads = grad_fn(images[i * micro:(i + 1) * micro], targets[i * micro:(i + 1) * micro], scale)
        total_loss = total_loss + loss
        total_grads = map_each(ops.add, total_grads, grads)
    return total_loss / accumulation_steps, scale_each(1.0 / accumulation_steps, total_grads)


def no_all_reduce(grads):
    """One process: nothing to communicate. `dist.make_gradient_mean` is the multi-process hook."""
    return grads


def unscale(grads, scale, scale_all=scale_each):
    return scale_all(1.0 / scale, grads)


def global_norm(grads, sum_of_squares=sum_of_squares_each):
    """sqrt of the sum of squares of every gradient. Non-finite iff some gradient is (or the sum overflows,
    which is treated the same). Hand-written: ~16x faster than ops.clip_by_global_norm on CPU."""
    return ops.sqrt(sum_of_squares(grads))


def clip_by_global_norm(grads, norm, *, clip_value, scale_all=scale_each):
    """torch.nn.utils.clip_grad_norm_: scale by clip_value / (norm + 1e-6) when that is below 1."""
    factor = ops.minimum(clip_value / (norm + 1e-6), 1.0)
    return scale_all(factor, grads)


def apply_or_skip(optimizer, grads, lr, finite, *, drop_overflow_update):
    """Run the optimizer, unless the gradients are non-finite and such updates are dropped. Returns whether
    it ran; the caller must use that value, or graph compilation prunes the update as dead code."""
    if drop_overflow_update:
        if finite:
            return ops.depend(ops.ones_like(finite), optimizer(grads, lr))
        return ops.zeros_like(finite)
    return ops.depend(ops.ones_like(finite), optimizer(grads, lr))


def update_loss_scale(loss_scale, finite):
    """Dynamic scaling: divide by `factor` (not below 1) on a non-finite step; multiply after `window` finite
    steps in a row. Returns the new scale."""
    if not loss_scale.dynamic:
        return loss_scale.value
    good_steps = ops.select(finite, loss_scale.good_steps + 1, ops.zeros_like(loss_scale.good_steps))
    grow = good_steps >= loss_scale.window
    scale = loss_scale.value
    new_scale = ops.select(finite, ops.select(grow, scale * loss_scale.factor, scale),
                           ops.maximum(scale / loss_scale.factor, 1.0))
    ops.assign(loss_scale.good_steps, ops.select(grow, ops.zeros_like(good_steps), good_steps))
    ops.assign(loss_scale.value, new_scale)
    return new_scale


def move_average(decay, average, source):
    return ops.assign(average, decay * average + (1.0 - decay) * source)


def update_ema(ema, applied):
    """average <- decay * average + (1 - decay) * weight, after each applied update."""
    if applied:
        return ops.depend(applied, map_each(ops.partial(move_average, ema.decay), ema.averages, ema.sources))
    return applied


def with_settings(stage, **settings):
    """`stage` with its keyword settings fixed, as a closure. Not functools.partial: inside the compiled step
    Cell, a float bound by partial arrived as a float64 tensor and the step failed to compile (measured, MindSpore
    2.8: "Float32 cannot be converted to Float64" at the loss-scale update); a closure's floats stay constants."""
    def stage_with_settings(*data):
        return stage(*data, **settings)

    return stage_with_settings


def make_train_step(state, config, all_reduce=no_all_reduce, loss_fn=soft_target_cross_entropy, gradients=None,
                    clip=None, apply=None, scale_update=update_loss_scale, ema_update=update_ema, net=None):
    """Return `train_step(images, targets, lr) -> (loss, grad_norm, finite, loss_scale)`.

    `images`/`targets` hold `accumulation_steps` micro-batches; `lr` is a float32 scalar Tensor from the
    schedule. Every stage can be replaced by a function of the signature in the table above. `net` is the
    network to differentiate if not `state.net` itself (e.g. `state.net` wrapped by MindSpore AMP)."""
    net = state.net if net is None else net
    optimizer, loss_scale, ema = state.optimizer, state.loss_scale, state.ema
    grad_fn = ms.value_and_grad(make_scaled_forward(net, loss_fn), None, optimizer.parameters, has_aux=True)
    scale_all, sum_of_squares = choose_gradient_ops(optimizer.parameters)
    gradients = gradients or with_settings(compute_gradients, accumulation_steps=config.accumulation_steps)
    clip = clip or with_settings(clip_by_global_norm, clip_value=float(config.clip_value), scale_all=scale_all)
    apply = apply or with_settings(apply_or_skip, drop_overflow_update=config.drop_overflow_update)
    clip_grad = config.clip_grad

    def train_step(images, targets, lr):
        scale = loss_scale.value
        loss, grads = gradients(grad_fn, images, targets, scale)
        grads = all_reduce(grads)
        grads = unscale(grads, scale, scale_all)
        norm = global_norm(grads, sum_of_squares)
        finite = ops.isfinite(norm)
        if clip_grad:
            grads = clip(grads, norm)
        applied = apply(optimizer, grads, lr, finite)
        new_scale = scale_update(loss_scale, finite)
        if ema is not None:
            applied = ema_update(ema, applied)
        # Tie the update into the outputs: jit drops side effects that no output depends on.
        return ops.depend(loss, applied), norm, finite, new_scale

    if not config.jit:
        return train_step
    return ms.jit(StepCell(train_step, state, net))


class StepCell(nn.Cell):
    """`step` as the `construct` of a Cell that holds the state's cells, whose parameters the step reads and writes.

    Jitted, this compiles the same graph as `ms.jit(step)`. It exists for MindSpore's compile cache
    (compile_cache.py): a cached Cell graph is reloaded with its parameters bound to the Cell's, while a cached
    plain function comes back reading garbage (measured, MindSpore 2.8 CPU). `auto_prefix=False` keeps the
    parameter names (and so checkpoints) unchanged."""

    def __init__(self, step, state, forward_net):
        super().__init__(auto_prefix=False)
        self.step = step
        self.net, self.forward_net, self.optimizer = state.net, forward_net, state.optimizer
        self.loss_scale, self.ema = state.loss_scale, state.ema

    def construct(self, images, targets, lr):
        return self.step(images, targets, lr)

