"""RepLKNet (Ding et al., "Scaling Up Your Kernels to 31x31", CVPR 2022), layer for layer as the official
PyTorch `replknet.py`, so that official state dicts map onto it one key to one parameter.

Layers are built by small functions (`conv_bn`, `conv_bn_relu`, `batch_norm`); blocks are cells whose
`construct` reads like the paper's figure. Parameter names follow the official keys with MindSpore's BN names
(gamma, beta, moving_mean, moving_variance); `convert.py` holds that mapping.
"""
import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from replknet_fn import batchnorm, device, dwconv, pointwise
from replknet_fn.conv1x1 import Conv1x1
from replknet_fn.parameters import write_parameter

# Official `get_bn`: nn.BatchNorm2d defaults, eps 1e-5 and PyTorch momentum 0.1 (= MindSpore momentum 0.9).
BN_EPS = 1e-5
BN_MOMENTUM = 0.9


def batch_norm(channels):
    """nn.BatchNorm2d with the official settings, trained by compiled kernels on CPU (batchnorm.py)."""
    return batchnorm.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def conv2d(in_channels, out_channels, kernel_size, stride=1, groups=1, has_bias=False, input_norm=None):
    """A conv with the official "same" padding (kernel_size // 2), bias-free like the official `conv_bn`; a 1x1
    one's weight gradient by matmul, and what `input_norm` says the block feeds it (conv1x1.INPUT_NORMS) recomputed
    in the backward (conv1x1.py)."""
    if kernel_size == 1 and stride == 1 and groups == 1 and not has_bias:
        return Conv1x1(in_channels, out_channels, input_norm)
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, pad_mode="pad",
                     padding=kernel_size // 2, group=groups, has_bias=has_bias)


def conv_after_norm(conv, norm, x, activation=None):
    """conv(activation(norm(x))): by the conv's own `after_norm` where it has one (Conv1x1, dwconv.DepthwiseConv),
    which in training recomputes that input in the backward rather than keeping it."""
    if isinstance(conv, (Conv1x1, dwconv.DepthwiseConv)):
        return conv.after_norm(norm, x, activation)
    return conv(batchnorm.normalize(norm, x, activation))


class ConvBN(nn.Cell):
    """Official `conv_bn` / `conv_bn_relu`: conv (no bias) -> BN [-> ReLU]. Names: `conv`, `bn`."""

    def __init__(self, conv, channels, relu):
        super().__init__()
        self.conv = conv
        self.bn = batch_norm(channels)
        self.relu = relu

    def construct(self, x):
        return self.norm_and_relu(self.conv(x))

    def after_norm(self, norm, x, activation=None):
        """self(activation(norm(x))), that input recomputed in the backward rather than kept (conv_after_norm)."""
        return self.norm_and_relu(conv_after_norm(self.conv, norm, x, activation))

    def norm_and_relu(self, x):
        if self.relu and isinstance(self.bn, batchnorm.BatchNorm2d):  # not when AMP has wrapped it
            return self.bn.forward_relu(x)  # one kernel for BN and ReLU in training
        x = self.bn(x)
        return ops.relu(x) if self.relu else x


def conv_bn(in_channels, out_channels, kernel_size, stride=1, groups=1, input_norm=None):
    return ConvBN(conv2d(in_channels, out_channels, kernel_size, stride, groups, input_norm=input_norm), out_channels,
                  relu=False)


def conv_bn_relu(in_channels, out_channels, kernel_size, stride=1, groups=1, input_norm=None):
    return ConvBN(conv2d(in_channels, out_channels, kernel_size, stride, groups, input_norm=input_norm), out_channels,
                  relu=True)


def depthwise_conv_bn_relu(channels, kernel_size, large_kernel_impl, stride=1):
    """conv_bn_relu(channels, channels, kernel_size, stride, groups=channels) by `large_kernel_impl` (dwconv.py)."""
    return ConvBN(dwconv.depthwise_conv(channels, kernel_size, large_kernel_impl, stride=stride), channels, relu=True)


class DropPath(nn.Cell):
    """Stochastic depth per sample (timm's DropPath, which the official code uses), with resumable randomness.

    MindSpore's random ops keep hidden per-op state that a checkpoint cannot restore (and that differs between
    jit and eager), so the keep/drop decision is a hash of (`seed`, this cell's `index`, sample index). The
    training loop sets `seed` for every step (`set_drop_path_seed`), which makes drop path identical eagerly and
    jitted, and after a resume. `seed` is a network parameter only by necessity: it is not saved in weights.
    """

    def __init__(self, drop_prob, index):
        super().__init__()
        self.keep_prob = 1.0 - drop_prob
        self.index = int(index)
        self.seed = Parameter(Tensor(0, ms.int32), name="drop_path.seed", requires_grad=False)
        self.kernel = pointwise.drop_path_op() if device.cpu_kernels_enabled() else None
        self.kernel_constants = (Tensor(self.index, ms.int32), Tensor(self.keep_prob, ms.float32))

    def construct(self, x):
        if not self.training:
            return x
        if self.kernel is not None and x.dtype == ms.float32:
            return self.kernel(x, self.seed, *self.kernel_constants)  # the mask below, in one op
        uniform = hash_uniform(self.seed, self.index, x.shape[0])
        # As timm: the per-sample mask is scaled, not x (one pass over x instead of two). A constant of the step:
        # without stop_gradient the backward graph also differentiates the hash (31B training: +60 MB).
        mask = ops.stop_gradient(ops.floor(self.keep_prob + uniform).astype(x.dtype) / self.keep_prob)
        return x * mask.reshape((x.shape[0],) + (1,) * (x.ndim - 1))


def hash_uniform(seed, stream, count):
    """`count` numbers in [0, 1) from a stateless integer hash of (seed, stream, position); int32 arithmetic
    wraps, identically in numpy, eager and jitted MindSpore."""
    x = seed * 1000003 + stream * 7919 + ops.arange(count, dtype=ms.int32) * 104729
    for _ in range(2):
        x = ops.bitwise_xor(x, ops.floor_divide(x, 65536))
        x = x * 73244475
    x = ops.bitwise_xor(x, ops.floor_divide(x, 65536))
    return ops.floor_mod(x, 16777216).astype(ms.float32) / 16777216.0


def set_drop_path_seed(net, seed):
    """Give every DropPath of `net` the seed of this step (see DropPath)."""
    value = Tensor(int(seed) % (2 ** 31), ms.int32)
    for _, cell in net.cells_and_names():
        if isinstance(cell, DropPath):
            write_parameter(cell.seed, value)


def is_rng_state(name):
    """Parameters that hold randomness state, not weights (left out of weights and official conversion)."""
    return name.endswith("drop_path.seed")


def drop_path_or_identity(drop_prob, index):
    return DropPath(drop_prob, index) if drop_prob > 0.0 else nn.Identity()


class ReparamLargeKernelConv(nn.Cell):
    """Large depthwise K x K conv-BN plus a parallel small k x k conv-BN, summed (paper Sec. 3, guideline 3).

    `reparam.py` replaces this cell by `DeployLargeKernelConv`, one biased conv holding both branches.
    """

    def __init__(self, channels, large_kernel_size, small_kernel_size, large_kernel_impl="auto"):
        super().__init__()
        if small_kernel_size is not None and small_kernel_size > large_kernel_size:
            raise ValueError(f"small_kernel ({small_kernel_size}) must not exceed the large kernel "
                             f"({large_kernel_size})")
        self.lkb_origin = ConvBN(dwconv.depthwise_conv(channels, large_kernel_size, large_kernel_impl),
                                 channels, relu=False)
        self.small_conv = (ConvBN(dwconv.depthwise_conv(channels, small_kernel_size, large_kernel_impl), channels,
                                  relu=False) if small_kernel_size is not None else None)
        origin = self.lkb_origin.conv
        self.normalized_pair = (dwconv.NormalizedInputOfTwo(origin.isa) if self.small_conv is not None
                                and isinstance(origin, dwconv.DepthwiseConv) and origin.normalized is not None
                                else None)

    def construct(self, x):
        out = self.lkb_origin(x)
        if self.small_conv is not None:
            out = out + self.small_conv(x)
        return out

    def branches_after_norm(self, norm, x):
        """(large kernel's conv, small kernel's conv) of relu(norm(x)), before their BNs; in training relu(norm(x))
        is recomputed in the backward rather than kept (dwconv.NormalizedInputOfTwo)."""
        large, small = self.lkb_origin.conv, self.small_conv.conv
        if self.normalized_pair is not None and dwconv.recomputes(norm, x, large, small):
            out = self.normalized_pair(x, norm.gamma, norm.beta, norm.moving_mean, norm.moving_variance, norm.hyper,
                                       large.weight.value(), small.weight.value())  # see Conv1x1.construct
            return out[0], out[1]
        y = batchnorm.normalize(norm, x, "relu")
        return large(y), small(y)


class RepLKBlock(nn.Cell):
    """pre-BN -> 1x1 conv-BN-ReLU -> large depthwise conv -> ReLU -> 1x1 conv-BN -> drop path -> residual."""

    def __init__(self, in_channels, dw_channels, large_kernel_size, small_kernel_size, drop_path_rate,
                 large_kernel_impl="auto", index=0):
        super().__init__()
        self.prelkb_bn = batch_norm(in_channels)
        self.pw1 = conv_bn_relu(in_channels, dw_channels, 1, input_norm="bn")
        self.large_kernel = ReparamLargeKernelConv(dw_channels, large_kernel_size, small_kernel_size,
                                                   large_kernel_impl)
        self.lk_nonlinear = nn.ReLU()
        self.pw2 = conv_bn(dw_channels, in_channels, 1,
                           input_norm="bn_relu" if small_kernel_size is None else "two_bn_relu")
        self.drop_path = drop_path_or_identity(drop_path_rate, index)

    def construct(self, x):
        large_kernel = self.large_kernel
        if not isinstance(large_kernel, ReparamLargeKernelConv) or not isinstance(self.pw2, ConvBN):  # deploy forms
            out = self.pw1(self.prelkb_bn(x))
            out = self.pw2(self.lk_nonlinear(large_kernel(out)))
            return x + self.drop_path(out)
        # The same layers, grouped so that in training no normalized tensor is kept for the backward: each is
        # recomputed there from the conv output before it (see conv_after_norm).
        origin, small = large_kernel.lkb_origin, large_kernel.small_conv
        out = self.pw1.conv.after_norm(self.prelkb_bn, x)  # prelkb_bn, pw1's conv
        if small is None:
            out = conv_after_norm(origin.conv, self.pw1.bn, out, "relu")  # pw1's BN, ReLU, the large kernel
            out = self.pw2.conv.after_norm(origin.bn, out, "relu")  # its BN, lk_nonlinear, pw2's conv
        else:
            large, out = large_kernel.branches_after_norm(self.pw1.bn, out)  # pw1's BN, ReLU, both kernels
            out = self.pw2.conv.after_two_norms(origin.bn, large, small.bn, out)  # their BNs, sum, ReLU, pw2's conv
        return x + self.drop_path(self.pw2.bn(out))


class GELU(nn.Cell):
    """Exact (erf) GELU, the official model's torch nn.GELU(); MindSpore's nn.GELU defaults to the tanh form.

    float32 runs the one-pass kernels of `pointwise.py` (forward and gradient ~3-7x faster than MindSpore's
    erf-based nn.GELU(approximate=False), which composes ~10 primitives; within 1.5e-6 of the exact value on
    [-10, 10], MindSpore's within 4.5e-7), and in training ConvFFN runs the same GELU inside its BN kernel
    (batchnorm.py); other dtypes, without a C++ compiler, or with impl "native" (what deploy export builds: a MindIR
    file cannot hold the compiled kernel) use MindSpore's."""

    def __init__(self, impl="auto"):
        super().__init__()
        self.kernel = pointwise.gelu_op() if impl != "native" and device.cpu_kernels_enabled() else None
        self.composed = nn.GELU(approximate=False)

    def construct(self, x):
        if self.kernel is None or x.dtype != ms.float32:
            return self.composed(x)
        return self.kernel(x)


class ConvFFN(nn.Cell):
    """pre-BN -> 1x1 conv-BN (expand) -> exact GELU -> 1x1 conv-BN -> drop path -> residual; in training the
    expand's BN and the GELU are one kernel, and neither 1x1 conv's normalized input is kept for the backward
    (Conv1x1.after_norm): the four-times-wide GELU output is recomputed there."""

    def __init__(self, channels, internal_channels, drop_path_rate, index=0, impl="auto"):
        super().__init__()
        self.preffn_bn = batch_norm(channels)
        self.pw1 = conv_bn(channels, internal_channels, 1, input_norm="bn")
        self.nonlinear = GELU(impl)
        self.pw2 = conv_bn(internal_channels, channels, 1, input_norm="bn_gelu")
        self.drop_path = drop_path_or_identity(drop_path_rate, index)

    def construct(self, x):
        if not isinstance(self.pw1, ConvBN):  # the folded deploy form (reparam.py): biased convs
            return x + self.drop_path(self.pw2(self.nonlinear(self.pw1(self.preffn_bn(x)))))
        out = self.pw1.conv.after_norm(self.preffn_bn, x)  # preffn_bn, pw1's conv
        out = self.pw2.conv.after_norm(self.pw1.bn, out, self.nonlinear)  # pw1's BN, GELU, pw2's conv
        return x + self.drop_path(self.pw2.bn(out))


class RepLKNetStage(nn.Cell):
    def __init__(self, channels, num_blocks, large_kernel_size, drop_path_rates, small_kernel_size, dw_ratio,
                 ffn_ratio, norm_intermediate_features, recompute, large_kernel_impl, first_index=0):
        super().__init__()
        blocks = []
        for pair, rate in enumerate(drop_path_rates[:num_blocks]):
            # One drop-path rate is shared by each RepLK/FFN pair, as in the official stage.
            index = 2 * (first_index + pair)
            blocks.append(RepLKBlock(channels, int(channels * dw_ratio), large_kernel_size, small_kernel_size,
                                     rate, large_kernel_impl, index))
            blocks.append(ConvFFN(channels, int(channels * ffn_ratio), rate, index + 1, large_kernel_impl))
        if recompute:
            for block in blocks:
                block.recompute()
        self.blocks = nn.CellList(blocks)
        self.norm = batch_norm(channels) if norm_intermediate_features else nn.Identity()

    def construct(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def transition(in_channels, out_channels, large_kernel_impl="auto"):
    return nn.SequentialCell([conv_bn_relu(in_channels, out_channels, 1),
                              depthwise_conv_bn_relu(out_channels, 3, large_kernel_impl, stride=2)])


class GlobalAvgPool(nn.Cell):
    """Mean over H and W (ONNX export rejects AdaptiveAvgPool2d)."""

    def construct(self, x):
        return x.mean(axis=(2, 3))


class RepLKNet(nn.Cell):
    def __init__(self, stem, stages, transitions, head_norm, head, out_indices):
        super().__init__()
        self.stem = stem
        self.stages = stages
        self.transitions = transitions
        self.out_indices = tuple(out_indices) if out_indices is not None else None
        self.norm = head_norm
        self.avgpool = GlobalAvgPool() if head is not None else None
        self.head = head

    def forward_stem(self, x):
        """The stem's four conv-BN-ReLU layers; in training each ReLU's output that a conv reads is recomputed in
        the backward rather than kept (conv_after_norm)."""
        stem = self.stem
        if not isinstance(stem[1], ConvBN):  # the folded deploy form
            for layer in stem:
                x = layer(x)
            return x
        x = stem[0].conv(x)
        x = conv_after_norm(stem[1].conv, stem[0].bn, x, "relu")
        x = conv_after_norm(stem[2].conv, stem[1].bn, x, "relu")
        return stem[3].after_norm(stem[2].bn, x, "relu")

    def forward_transition(self, index, x):
        """Transition `index`: a 1x1 conv-BN-ReLU, then a stride-2 3x3 depthwise conv-BN-ReLU reading the first's
        ReLU output, recomputed in the backward in training (ConvBN.after_norm)."""
        first, second = self.transitions[index][0], self.transitions[index][1]
        if not isinstance(second, ConvBN):  # the folded deploy form
            return second(first(x))
        return second.after_norm(first.bn, first.conv(x), "relu")

    def forward_features(self, x):
        x = self.forward_stem(x)
        num_stages = len(self.stages)
        for stage_idx in range(num_stages):
            x = self.stages[stage_idx](x)
            if stage_idx < num_stages - 1:
                x = self.forward_transition(stage_idx, x)
        return x

    def forward_stage_outputs(self, x):
        """Per-stage features for `out_indices` (official: normalized by `stages[i].norm`)."""
        x = self.forward_stem(x)
        outs = ()
        num_stages = len(self.stages)
        for stage_idx in range(num_stages):
            x = self.stages[stage_idx](x)
            if stage_idx in self.out_indices:
                outs = outs + (self.stages[stage_idx].norm(x),)
            if stage_idx < num_stages - 1:
                x = self.forward_transition(stage_idx, x)
        return outs

    def construct(self, x):
        if self.out_indices is not None:
            return self.forward_stage_outputs(x)
        x = self.forward_features(x)
        if self.head is None:
            return x
        x = self.norm(x)
        x = self.avgpool(x)
        return self.head(x)


def linspace(start, stop, num):
    """torch.linspace values, rounded to float32 as the official `x.item()` of a float32 tensor."""
    return [float(v) for v in np.linspace(start, stop, num, dtype=np.float32)]


def sync_parameter_names(net):
    """Give every parameter its full dotted path as its name (what checkpoints store). MindSpore names a
    parameter when its cell is attached, so a cell swapped in later would otherwise keep a partial name."""
    for name, param in net.parameters_and_names():
        param.name = name


def build_replknet(large_kernel_sizes, layers, channels, drop_path_rate=0.0, small_kernel=5, dw_ratio=1,
                   ffn_ratio=4, in_channels=3, num_classes=1000, out_indices=None,
                   norm_intermediate_features=False, recompute=False, large_kernel_impl="auto"):
    """Build a RepLKNet. Arguments are named as in the official constructor.

    `small_kernel=None` drops the parallel small kernel (RepLKNet-XL). `num_classes=None` builds the backbone
    without norm/pool/head. `out_indices` makes the network return a tuple of per-stage features.
    `recompute` recomputes each block's activations in the backward pass (gradient checkpointing).
    `large_kernel_impl` picks how the depthwise convs (large and small kernels, the stem's and the transitions'
    3x3) are computed (see `dwconv.py`), and "native" also keeps the exact GELU in MindSpore's own ops (what
    MindIR export needs); parameters are the same whatever the choice.
    """
    if not (len(large_kernel_sizes) == len(layers) == len(channels)):
        raise ValueError(f"large_kernel_sizes {list(large_kernel_sizes)}, layers {list(layers)} and channels "
                         f"{list(channels)} must have one entry per stage")
    if out_indices is not None:
        bad = [i for i in out_indices if not 0 <= i < len(layers)]
        if bad:
            raise ValueError(f"out_indices {list(out_indices)}: {bad} not a stage index in 0..{len(layers) - 1}")
    base_width = channels[0]
    stem = nn.CellList([
        conv_bn_relu(in_channels, base_width, 3, stride=2),
        depthwise_conv_bn_relu(base_width, 3, large_kernel_impl),
        conv_bn_relu(base_width, base_width, 1, input_norm="bn_relu"),
        depthwise_conv_bn_relu(base_width, 3, large_kernel_impl, stride=2),
    ])
    # Drop-path rates rise linearly over all blocks, as in the official code (following Swin).
    rates = linspace(0.0, drop_path_rate, sum(layers))
    stages, transitions = [], []
    for stage_idx, num_blocks in enumerate(layers):
        first = sum(layers[:stage_idx])
        stages.append(RepLKNetStage(channels[stage_idx], num_blocks, large_kernel_sizes[stage_idx],
                                    rates[first:first + num_blocks], small_kernel, dw_ratio, ffn_ratio,
                                    norm_intermediate_features, recompute, large_kernel_impl, first))
        if stage_idx < len(layers) - 1:
            transitions.append(transition(channels[stage_idx], channels[stage_idx + 1], large_kernel_impl))
    if recompute:
        for layer in list(stem)[1:]:
            layer.recompute()
    if num_classes is not None:
        head_norm, head = batch_norm(channels[-1]), nn.Dense(channels[-1], num_classes)
    else:
        head_norm, head = None, None
    net = RepLKNet(stem, nn.CellList(stages), nn.CellList(transitions), head_norm, head, out_indices)
    sync_parameter_names(net)
    # The arguments that built this network, so that `reparameterize` and checkpoints can rebuild it.
    net.build_args = dict(large_kernel_sizes=list(large_kernel_sizes), layers=list(layers), channels=list(channels),
                          drop_path_rate=drop_path_rate, small_kernel=small_kernel, dw_ratio=dw_ratio,
                          ffn_ratio=ffn_ratio, in_channels=in_channels, num_classes=num_classes,
                          out_indices=None if out_indices is None else list(out_indices),
                          norm_intermediate_features=norm_intermediate_features, recompute=recompute,
                          large_kernel_impl=large_kernel_impl)
    return net


def replknet31_base(drop_path_rate=0.3, num_classes=1000, **kwargs):
    return build_replknet(**dict(large_kernel_sizes=[31, 29, 27, 13], layers=[2, 2, 18, 2],
                                 channels=[128, 256, 512, 1024], small_kernel=5, drop_path_rate=drop_path_rate,
                                 num_classes=num_classes) | kwargs)


def replknet31_large(drop_path_rate=0.3, num_classes=1000, **kwargs):
    return build_replknet(**dict(large_kernel_sizes=[31, 29, 27, 13], layers=[2, 2, 18, 2],
                                 channels=[192, 384, 768, 1536], small_kernel=5, drop_path_rate=drop_path_rate,
                                 num_classes=num_classes) | kwargs)


def replknet_xlarge(drop_path_rate=0.3, num_classes=1000, **kwargs):
    return build_replknet(**dict(large_kernel_sizes=[27, 27, 27, 13], layers=[2, 2, 18, 2],
                                 channels=[256, 512, 1024, 2048], small_kernel=None, dw_ratio=1.5,
                                 drop_path_rate=drop_path_rate, num_classes=num_classes) | kwargs)


def replknet_tiny(drop_path_rate=0.0, num_classes=10, **kwargs):
    """Not in the paper: the official test fixture's shape, for demos and tests on a CPU."""
    return build_replknet(**dict(large_kernel_sizes=[13, 11, 9, 7], layers=[1, 1, 2, 1], channels=[16, 32, 64, 128],
                                 small_kernel=5, drop_path_rate=drop_path_rate, num_classes=num_classes) | kwargs)


MODELS = {
    "replknet_tiny": replknet_tiny,
    "replknet31_base": replknet31_base,
    "replknet31_large": replknet31_large,
    "replknet_xlarge": replknet_xlarge,
}


# How the official weights are fed, where it differs from ImageNet's defaults (official README, "Evaluation"):
# RepLKNet-XL was pretrained on MegData-73M and fine-tuned with mean = std = 0.5, its 1K weights at 320x320.
OFFICIAL_INPUT = {"replknet_xlarge": dict(image_resize=320, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))}


def create_model(name, **kwargs):
    """The zoo's network `name`; `kwargs` replace any of its build_replknet arguments (other kernels, classes)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)
