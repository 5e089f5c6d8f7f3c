"""Structural re-parameterization: the training-form RepLKNet -> an equivalent deploy network.

`reparameterize(net)` merges each large + small kernel pair and their BNs into one biased depthwise conv, as the
official `ReparamLargeKernelConv.merge_kernel` does. `reparameterize(net, fold_all=True)` also folds every
remaining conv-BN pair into a biased conv, each pre-BN into the 1x1 conv that follows it, and the head BN into
the classifier, as the official MegEngine deploy conversion does. The input network is left untouched.
"""
import numpy as np
from mindspore import nn

from replknet_fn import dwconv
from replknet_fn.model import BN_EPS, ConvFFN, RepLKBlock, build_replknet, conv2d, sync_parameter_names
from replknet_fn.parameters import write_parameter


def to_numpy(parameter):
    return parameter.asnumpy().astype(np.float64)


def bn_scale_shift(bn):
    """BN in eval mode as y = scale * x + shift (per channel)."""
    std = np.sqrt(to_numpy(bn.moving_variance) + getattr(bn, "eps", BN_EPS))
    scale = to_numpy(bn.gamma) / std
    return scale, to_numpy(bn.beta) - to_numpy(bn.moving_mean) * scale


def fuse_conv_bn(conv, bn):
    """Official `fuse_bn`: conv (no bias) followed by BN == conv with kernel * scale and bias shift."""
    scale, shift = bn_scale_shift(bn)
    kernel = to_numpy(conv.weight) * scale.reshape(-1, 1, 1, 1)
    if getattr(conv, "bias", None) is not None:
        shift = shift + to_numpy(conv.bias) * scale
    return kernel, shift


def merge_large_kernel(large_kernel):
    """Official `get_equivalent_kernel_bias`: both branches fused with their BNs, the small kernel zero-padded
    into the centre of the large one (valid because both convs use "same" padding and stride 1)."""
    kernel, bias = fuse_conv_bn(large_kernel.lkb_origin.conv, large_kernel.lkb_origin.bn)
    if large_kernel.small_conv is not None:
        small_kernel, small_bias = fuse_conv_bn(large_kernel.small_conv.conv, large_kernel.small_conv.bn)
        pad = (kernel.shape[-1] - small_kernel.shape[-1]) // 2
        kernel = kernel + np.pad(small_kernel, [(0, 0), (0, 0), (pad, pad), (pad, pad)])
        bias = bias + small_bias
    return kernel, bias


def set_weights(cell, weight, bias=None):
    write_parameter(cell.weight, weight)
    if bias is not None:
        write_parameter(cell.bias, bias)


class DeployLargeKernelConv(nn.Cell):
    """The merged large-kernel conv; `lkb_reparam` matches the official deploy keys."""

    def __init__(self, lkb_reparam):
        super().__init__()
        self.lkb_reparam = lkb_reparam

    def construct(self, x):
        return self.lkb_reparam(x)


class ConvBias(nn.Cell):
    """A conv-BN[-ReLU] with the BN folded in: conv with bias [-> ReLU]."""

    def __init__(self, conv, relu):
        super().__init__()
        self.conv = conv
        self.relu = nn.ReLU() if relu else None

    def construct(self, x):
        x = self.conv(x)
        if self.relu is not None:
            x = self.relu(x)
        return x


def deploy_large_kernel(large_kernel, large_kernel_impl):
    kernel, bias = merge_large_kernel(large_kernel)
    channels, _, size, _ = kernel.shape
    conv = dwconv.depthwise_conv(channels, size, large_kernel_impl, has_bias=True)
    set_weights(conv, kernel, bias)
    return DeployLargeKernelConv(conv)


def fold_conv_bn(conv_bn, pre_scale=None, pre_shift=None):
    """conv-BN[-ReLU] -> conv with bias[-ReLU]; optionally fold a preceding per-channel affine (a pre-BN) into
    it as well, which is exact only for a 1x1 conv (no padding sees the shift)."""
    kernel, bias = fuse_conv_bn(conv_bn.conv, conv_bn.bn)
    if pre_scale is not None:
        if kernel.shape[-1] != 1 or kernel.shape[1] != pre_scale.shape[0]:
            raise ValueError("a pre-BN folds only into a following dense 1x1 conv")
        bias = bias + kernel[:, :, 0, 0] @ pre_shift
        kernel = kernel * pre_scale.reshape(1, -1, 1, 1)
    old = conv_bn.conv
    conv = conv2d(old.in_channels, old.out_channels, old.kernel_size[0], old.stride[0], old.group, has_bias=True)
    set_weights(conv, kernel, bias)
    return ConvBias(conv, relu=conv_bn.relu)


def fold_block(block):
    """Fold the block's pre-BN into pw1 and every conv-BN into a biased conv."""
    pre_bn = block.prelkb_bn if isinstance(block, RepLKBlock) else block.preffn_bn
    scale, shift = bn_scale_shift(pre_bn)
    block.pw1 = fold_conv_bn(block.pw1, scale, shift)
    block.pw2 = fold_conv_bn(block.pw2)
    if isinstance(block, RepLKBlock):
        block.prelkb_bn = nn.Identity()
    else:
        block.preffn_bn = nn.Identity()


def fold_head(net):
    """norm (BN) -> mean over H, W -> Dense == mean -> Dense with the BN's scale and shift folded in."""
    scale, shift = bn_scale_shift(net.norm)
    weight = to_numpy(net.head.weight)
    bias = to_numpy(net.head.bias) + weight @ shift
    head = nn.Dense(weight.shape[1], weight.shape[0])
    set_weights(head, weight * scale.reshape(1, -1), bias)
    net.norm = nn.Identity()
    net.head = head


def reparameterize(net, fold_all=False, large_kernel_impl=None):
    """Return the deploy form of a training-form RepLKNet built by `build_replknet`; `net` is not modified.

    The deploy network computes the training form's eval-mode output (BN running statistics)."""
    build_args = dict(net.build_args)
    impl = large_kernel_impl or build_args["large_kernel_impl"]
    deploy = build_replknet(**dict(build_args, large_kernel_impl=impl))
    source = dict(net.parameters_and_names())
    for name, param in deploy.parameters_and_names():
        write_parameter(param, source[name].asnumpy())
    for cell_name, cell in list(deploy.cells_and_names()):
        if isinstance(cell, RepLKBlock):
            cell.large_kernel = deploy_large_kernel(cell.large_kernel, impl)
        if fold_all and isinstance(cell, (RepLKBlock, ConvFFN)):
            fold_block(cell)
    if fold_all:
        deploy.stem = nn.CellList([fold_conv_bn(layer) for layer in deploy.stem])
        deploy.transitions = nn.CellList([nn.SequentialCell([fold_conv_bn(layer) for layer in transition])
                                          for transition in deploy.transitions])
        if deploy.head is not None:
            fold_head(deploy)
    sync_parameter_names(deploy)
    deploy.build_args = dict(build_args, large_kernel_impl=impl)
    deploy.deploy_form = "folded" if fold_all else "reparam"
    deploy.set_train(False)
    return deploy
