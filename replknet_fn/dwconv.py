"""Large-kernel depthwise convolution (stride 1, "same" padding) and the choice of its implementation.

`depthwise_conv(channels, kernel_size, impl)` returns a cell with one parameter `weight` of shape
(channels, 1, K, K) (plus `bias` when asked), whatever the implementation, so checkpoints do not depend on it.
"""
from mindspore import nn

IMPLEMENTATIONS = ("native",)


def native_depthwise_conv(channels, kernel_size, has_bias=False):
    return nn.Conv2d(channels, channels, kernel_size, stride=1, pad_mode="pad", padding=kernel_size // 2,
                     group=channels, has_bias=has_bias)


def depthwise_conv(channels, kernel_size, impl="native", has_bias=False):
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"large_kernel_impl {impl!r}: choose one of {list(IMPLEMENTATIONS)}")
    return native_depthwise_conv(channels, kernel_size, has_bias)
