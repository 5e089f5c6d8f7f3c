"""1x1 convolutions (stride 1, one group, no bias) whose weight gradient is a batched matmul on CPU, and which
recompute a normalized input in the backward rather than keep it.

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

Normalized inputs. Most of these convs read a BN's output, or its ReLU or GELU: the blocks' pw1 after the pre-BN,
ConvFFN's pw2 after BN and GELU (four times the channels), RepLKBlock's pw2 after its two branches' BNs, their sum
and the ReLU, the stem's after BN and ReLU. Autodiff would keep that tensor for the weight gradient, though the
BN's gradient keeps the BN's input anyway. `Conv1x1.after_norm` and `after_two_norms` run the BN(s), the activation
and the conv as one cell (NormalizedInput, NormalizedSumInput) whose gradient recomputes the tensor from the BN's
input and batch statistics, by batchnorm.cc's apply kernel (the forward's bits), once dout exists (dwconv.py does
the same for depthwise convs). 31B at batch 4: 3.75 -> 3.25 GB with dwconv.py's part (Zen 3; BENCHMARKS.md).

Parameters, their names and checkpoints are nn.Conv2d's. Other dtypes (AMP) and other devices use nn.Conv2d's
own construct.
"""
import mindspore as ms
from mindspore import nn, ops

from replknet_fn import batchnorm, device


def gradient_ops():
    """(input-gradient op, weight-gradient op): MindSpore's Conv2DBackpropInput (its out_channel is unused on CPU)
    and a batched matmul."""
    return ops.Conv2DBackpropInput(out_channel=1, kernel_size=1), ops.BatchMatMul(transpose_b=True)


def gradients(conv, x, weight, dout):
    """(dx, dweight) of conv2d(x, weight) for a 1x1 weight: dweight = sum_n dy[n] @ x[n]^T, dx by MindSpore's
    Conv2DBackpropInput (`conv` holds the two ops of `gradient_ops`)."""
    batch, in_channels, height, width = x.shape
    out_channels = weight.shape[0]
    dy = dout.reshape(batch, out_channels, height * width)
    # Not before dout exists: MindSpore runs an op once its inputs are ready, and x's reshape, run in the forward,
    # would keep a copy of x until the backward.
    x = ops.depend(x, dout)
    per_image = conv.batch_matmul(dy, x.reshape(batch, in_channels, height * width))
    weight_gradient = per_image.sum(axis=0).reshape(weight.shape)
    return conv.input_gradient(dout, weight, x.shape), weight_gradient


class WeightGradientByMatmul(nn.Cell):
    """conv2d(x, weight) for a 1x1 weight, with its own gradient (MindSpore calls `bprop` for a cell that has one).
    """

    def __init__(self):
        super().__init__()
        self.input_gradient, self.batch_matmul = gradient_ops()

    def construct(self, x, weight):
        return ops.conv2d(x, weight)

    def bprop(self, x, weight, out, dout):
        return gradients(self, x, weight, dout)


class NormalizedInput(batchnorm.RecomputesItsOutput):
    """conv2d(activation(bn(x)), weight) in training, bn by the batch statistics (batchnorm.py's kernels), whose
    gradient recomputes the normalized input y from x and the statistics instead of keeping it: the step keeps x
    (which BN's own gradient reads anyway) and two per-channel vectors, not y. Returns (conv output, batch mean,
    batch invstd)."""

    def __init__(self, activation):
        super().__init__(activation)
        self.input_gradient, self.batch_matmul = gradient_ops()

    def construct(self, x, gamma, beta, moving_mean, moving_variance, hyper, weight):
        y, mean, invstd = self.forward_op(x, gamma, beta, moving_mean, moving_variance, hyper)
        return ops.conv2d(y, weight), mean, invstd

    def bprop(self, x, gamma, beta, moving_mean, moving_variance, hyper, weight, out, dout):
        _, mean, invstd = out
        y = self.recomputed(x, gamma, beta, mean, invstd, dout[0])
        dy, weight_gradient = gradients(self, y, weight, dout[0])
        return (*self.input_gradients(x, gamma, beta, moving_mean, moving_variance, hyper, mean, invstd, y, dy),
                weight_gradient)


class NormalizedSumInput(NormalizedInput):
    """conv2d(relu(bn_a(a) + bn_b(b)), weight) in training (RepLKBlock's two depthwise branches, their BNs, the sum
    and the ReLU before pw2), the ReLU's output recomputed in the backward as NormalizedInput's input is. Returns
    (conv output, a's mean, a's invstd, b's mean, b's invstd)."""

    def __init__(self):
        super().__init__(None)
        self.relu = ops.ReLU()  # the primitive: ops.relu in a bprop fails to compile in MindSpore 2.8

    def construct(self, a, gamma_a, beta_a, moving_mean_a, moving_variance_a, hyper_a,
                  b, gamma_b, beta_b, moving_mean_b, moving_variance_b, hyper_b, weight):
        y_a, mean_a, invstd_a = self.forward_op(a, gamma_a, beta_a, moving_mean_a, moving_variance_a, hyper_a)
        y_b, mean_b, invstd_b = self.forward_op(b, gamma_b, beta_b, moving_mean_b, moving_variance_b, hyper_b)
        return ops.conv2d(self.relu(y_a + y_b), weight), mean_a, invstd_a, mean_b, invstd_b

    def bprop(self, a, gamma_a, beta_a, moving_mean_a, moving_variance_a, hyper_a,
              b, gamma_b, beta_b, moving_mean_b, moving_variance_b, hyper_b, weight, out, dout):
        _, mean_a, invstd_a, mean_b, invstd_b = out
        y_a = self.recomputed(a, gamma_a, beta_a, mean_a, invstd_a, dout[0])
        y_b = self.recomputed(b, gamma_b, beta_b, mean_b, invstd_b, dout[0])
        y = self.relu(y_a + y_b)
        dy, weight_gradient = gradients(self, y, weight, dout[0])
        dy = dy * (y > 0).astype(dy.dtype)
        return (*self.input_gradients(a, gamma_a, beta_a, moving_mean_a, moving_variance_a, hyper_a, mean_a,
                                      invstd_a, y_a, dy),
                *self.input_gradients(b, gamma_b, beta_b, moving_mean_b, moving_variance_b, hyper_b, mean_b,
                                      invstd_b, y_b, dy),
                weight_gradient)


# What a Conv1x1's `input_norm` says the model feeds it: a BN's output, BN then ReLU or GELU, or the ReLU of two
# BNs' sum.
INPUT_NORMS = (None, "bn", "bn_relu", "bn_gelu", "two_bn_relu")


def activation_kind(activation):
    """None, "relu", or "gelu" for the model's GELU cell where it runs its kernel ("composed gelu" where it keeps
    MindSpore's ops, which no NormalizedInput is built for: the layers then run one after another)."""
    if activation is None or isinstance(activation, str):
        return activation
    return "gelu" if activation.kernel is not None else "composed gelu"


class Conv1x1(nn.Conv2d):
    """nn.Conv2d(in_channels, out_channels, 1, has_bias=False), its weight gradient by matmul in float32 on CPU.

    `input_norm` (INPUT_NORMS) says what the model feeds it: `after_norm(norm, x, activation)` computes
    self(activation(norm(x))), `after_two_norms(norm_a, a, norm_b, b)` self(relu(norm_a(a) + norm_b(b))), in
    training with that normalized input recomputed in the backward rather than kept (NormalizedInput,
    NormalizedSumInput)."""

    def __init__(self, in_channels, out_channels, input_norm=None):
        super().__init__(in_channels, out_channels, 1, has_bias=False)
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm {input_norm!r}: choose one of {list(INPUT_NORMS)}")
        on_cpu = device.current_target() == "CPU"
        self.by_matmul = WeightGradientByMatmul() if on_cpu else None
        recomputes = (on_cpu and input_norm is not None and device.cpu_kernels_enabled()
                      and batchnorm.kernel_sets() is not None)
        self.normalized = self.normalized_sum = None
        if recomputes and input_norm == "two_bn_relu":
            self.normalized_sum = NormalizedSumInput()
        elif recomputes:
            self.normalized = NormalizedInput({"bn": None, "bn_relu": "relu", "bn_gelu": "gelu"}[input_norm])

    def by_kernels(self, x):
        return self.by_matmul is not None and x.dtype == ms.float32 and self.weight.dtype == ms.float32

    def construct(self, x):
        if not self.by_kernels(x):
            return super().construct(x)
        # The weight's value, not the Parameter, into every cell with its own bprop: one handed the Parameter loads
        # it again in its bprop, and MindSpore copies (TensorMove) each load of a parameter that a graph loads twice
        # -- every conv weight of the step, ~0.27 GB of 31B's peak (BENCHMARKS.md). AdamW, the weights' only writer,
        # runs after every reader (it takes their gradients).
        return self.by_matmul(x, self.weight.value())

    def after_norm(self, norm, x, activation=None):
        """self(activation(norm(x))) for `activation` None, "relu" or the model's GELU cell (see the class
        docstring)."""
        if self.recomputes(norm, x, activation):
            return self.normalized(x, norm.gamma, norm.beta, norm.moving_mean, norm.moving_variance, norm.hyper,
                                   self.weight.value())[0]
        return self.construct(batchnorm.normalize(norm, x, activation))

    def after_two_norms(self, norm_a, a, norm_b, b):
        """self(relu(norm_a(a) + norm_b(b))) (see the class docstring)."""
        if (self.normalized_sum is not None and self.by_kernels(a) and batchnorm.runs_kernel(norm_a, a)
                and batchnorm.runs_kernel(norm_b, b)):
            return self.normalized_sum(a, norm_a.gamma, norm_a.beta, norm_a.moving_mean, norm_a.moving_variance,
                                       norm_a.hyper, b, norm_b.gamma, norm_b.beta, norm_b.moving_mean,
                                       norm_b.moving_variance, norm_b.hyper, self.weight.value())[0]
        return self.construct(ops.relu(norm_a(a) + norm_b(b)))

    def recomputes(self, norm, x, activation):
        """Whether `after_norm` runs NormalizedInput: built for this input, in float32 training with the BN and
        GELU kernels."""
        return (self.normalized is not None and self.by_kernels(x) and batchnorm.runs_kernel(norm, x)
                and activation_kind(activation) == self.normalized.activation)
