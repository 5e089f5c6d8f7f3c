"""1x1 convolutions (stride 1, one group, no bias) whose weight gradient is a batched matmul on CPU.

RepLKNet's 1x1 convs (the blocks' pw1/pw2, ConvFFN's expand and project, stem and transitions) hold most of its
parameters. MindSpore's CPU Conv2D computes their weight gradient with oneDNN, and each such oneDNN primitive keeps
a scratchpad of its own for the whole run: per-thread copies of the weight gradient, touched at every step
(measured with MindSpore 2.8 on a 2-core AMD EPYC, Zen 3: 85 scratchpads for RepLKNet-31B at batch 4, 2.1 GB
reserved, 0.52 GB resident -- 2 MB of 8 for each 512x512 conv, 8 MB of 32 for each 512x2048, 32 MB of 128 for
each 1024x4096). PyTorch frees its scratchpad after each call. Here the weight gradient is the sum over the batch
of dy[n] @ x[n]^T (MindSpore's BatchMatMul, then a sum over the batch), whose buffers come from MindSpore's memory
pool and are reused; the input gradient and the forward stay MindSpore's Conv2D (neither keeps a scratchpad).
31B's training peak: 3.84 -> 3.75 GB, the step as fast (BENCHMARKS.md). Not the whole 0.52 GB: the same cell with
MindSpore's own Conv2DBackpropFilter in its bprop peaks ~0.23 GB higher in MindSpore's pool than nn.Conv2d, so a
cell with its own gradient costs that much by itself (why is not known).

Parameters, their names and checkpoints are nn.Conv2d's. Other dtypes (AMP) and other devices use nn.Conv2d's
own construct.
"""
import mindspore as ms
from mindspore import nn, ops

from replknet_fn import device


class WeightGradientByMatmul(nn.Cell):
    """conv2d(x, weight) for a 1x1 weight, with its own gradient (MindSpore calls `bprop` for a cell that has one).
    """

    def __init__(self):
        super().__init__()
        self.input_gradient = ops.Conv2DBackpropInput(out_channel=1, kernel_size=1)  # out_channel: unused on CPU
        self.batch_matmul = ops.BatchMatMul(transpose_b=True)

    def construct(self, x, weight):
        return ops.conv2d(x, weight)

    def bprop(self, x, weight, out, dout):
        batch, in_channels, height, width = x.shape
        out_channels = weight.shape[0]
        dy = dout.reshape(batch, out_channels, height * width)
        # Not before dout exists: MindSpore runs an op once its inputs are ready, and x's reshape, run in the
        # forward, would keep a copy of x until the backward.
        x = ops.depend(x, dout)
        per_image = self.batch_matmul(dy, x.reshape(batch, in_channels, height * width))
        weight_gradient = per_image.sum(axis=0).reshape(weight.shape)
        return self.input_gradient(dout, weight, x.shape), weight_gradient


class Conv1x1(nn.Conv2d):
    """nn.Conv2d(in_channels, out_channels, 1, has_bias=False), its weight gradient by matmul in float32 on CPU."""

    def __init__(self, in_channels, out_channels):
        super().__init__(in_channels, out_channels, 1, has_bias=False)
        self.by_matmul = WeightGradientByMatmul() if device.current_target() == "CPU" else None

    def construct(self, x):
        if self.by_matmul is None or x.dtype != ms.float32 or self.weight.dtype != ms.float32:
            return super().construct(x)
        return self.by_matmul(x, self.weight)
