"""1x1 convolutions (stride 1, one group) by a compiled kernel (`csrc/conv1x1.cc`) where it was measured faster.

MindSpore 2.8's CPU Conv2D and its two gradients ran the demo network's 1x1 convs (16-512 channels, maps of
32x32 down to 2x2, batch 32) at 1-10 GFLOP/s (Zen 3): half its step. The kernel multiplies matrices whose columns
are all the batch's pixels, on one thread. At RepLKNet-31B's shapes MindSpore's two-thread convs are faster, so
"auto" (the default) runs each shape by whichever `dwconv.decide_for` measured faster on this machine, as for the
depthwise convs; a shape nobody measured runs MindSpore's. Parameters are nn.Conv2d's whatever runs them.
"""
from mindspore import nn, ops

from replknet_fn import dwconv, kernels

SOURCE = kernels.SOURCE_DIR / "conv1x1.cc"


def library(isa):
    return kernels.compiled_library(SOURCE, isa, "1x1 convs run MindSpore's conv")


def output_shape(x_shape, weight_shape):
    return [x_shape[0], weight_shape[0], x_shape[2], x_shape[3]]


def input_grad_shape(dy_shape, weight_shape):
    return [dy_shape[0], weight_shape[1], dy_shape[2], dy_shape[3]]


def weight_grad_shape(x_shape, dy_shape, weight_shape):
    return weight_shape


@kernels.per_isa_level
def direct_conv_op(isa):
    """The forward custom op, whose bprop calls the input- and weight-gradient kernels; None without a library."""
    path = library(isa)
    if path is None:
        return None
    same_dtype = kernels.same_dtype
    input_grad = ops.Custom(f"{path}:conv1x1_input_grad", input_grad_shape, same_dtype, func_type="aot")
    weight_grad = ops.Custom(f"{path}:conv1x1_weight_grad", weight_grad_shape, same_dtype, func_type="aot")

    def bprop(x, weight, out, dout):
        return input_grad(dout, weight), weight_grad(x, dout, weight)

    return ops.Custom(f"{path}:conv1x1_forward", output_shape, same_dtype, func_type="aot", bprop=bprop)


class PointwiseConv(dwconv.KernelConv):
    """nn.Conv2d(in_channels, out_channels, 1) computed by the 1x1 kernel (see dwconv.KernelConv)."""

    def __init__(self, in_channels, out_channels, has_bias=False, automatic=False, isa=None):
        super().__init__(in_channels, out_channels, 1, 1, direct_conv_op, has_bias, automatic, isa)

    def conv_shape(self, input_shape):
        return tuple(input_shape) + (1, self.out_channels)


def pointwise_conv(in_channels, out_channels, impl="native", has_bias=False, isa=None):
    """A 1x1 conv, stride 1: `impl` as for the depthwise convs (dwconv.IMPLEMENTATIONS); `isa` the kernel build's
    ISA level, by default `kernels.isa_level()`."""
    if impl not in dwconv.IMPLEMENTATIONS:
        raise ValueError(f"large_kernel_impl {impl!r}: choose one of {list(dwconv.IMPLEMENTATIONS)}")
    if impl == "native":
        return nn.Conv2d(in_channels, out_channels, 1, stride=1, pad_mode="pad", padding=0, has_bias=has_bias)
    return PointwiseConv(in_channels, out_channels, has_bias, automatic=impl == "auto", isa=isa)
