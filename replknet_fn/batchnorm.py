"""Training-mode BatchNorm2d (optionally followed by ReLU or exact GELU) as compiled one-op kernels
(`csrc/batchnorm.cc`).

MindSpore 2.8's CPU BatchNorm and BatchNormGrad run at 4.6-11.6 ns per element forward+backward, these kernels at
2.0-3.3 (Zen 3, AVX2; BENCHMARKS.md): on the demo MindSpore's were 30 ms of ~80 ms of op time per step.
`BatchNorm2d` is `nn.BatchNorm2d` (same parameters, names and eval path) whose training forward runs one kernel that
normalizes by the batch statistics and updates the running statistics in place, and whose gradient is one more
kernel. Elsewhere (eval, frozen statistics, not float32 NCHW, no compiler, not on CPU) it is MindSpore's BN.
"""
from typing import NamedTuple

import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.ops import signature as sig

from replknet_fn import device, kernels

SOURCE = kernels.SOURCE_DIR / "batchnorm.cc"


def library(isa):
    return kernels.compiled_library(SOURCE, isa, "BatchNorm uses MindSpore's slower ops")


def tensor_and_two_per_channel_shapes(x, gamma, *_):
    """Forward (y, mean, invstd) and backward (dx, dgamma, dbeta) alike: x's shape, then gamma's twice."""
    return [x, gamma, gamma]


def three_dtypes(x, *_):
    return [x, x, x]


class TrainForward(ops.Custom):
    """(x, gamma, beta, moving_mean, moving_var, [eps, momentum]) -> (y, batch mean, batch invstd); writes the two
    running statistics in place, declared written (RW_WRITE, memory side effect) as MindSpore's own BatchNorm does,
    so graphs order it after every earlier read of them and before every later one."""

    __mindspore_signature__ = (
        sig.make_sig("x"), sig.make_sig("gamma"), sig.make_sig("beta"),
        sig.make_sig("moving_mean", sig.sig_rw.RW_WRITE), sig.make_sig("moving_variance", sig.sig_rw.RW_WRITE),
        sig.make_sig("hyper"))

    def __init__(self, function, bprop):
        super().__init__(function, tensor_and_two_per_channel_shapes, three_dtypes, func_type="aot", bprop=bprop)
        self.add_prim_attr("side_effect_mem", True)


class KernelSet(NamedTuple):
    """One activation's training kernels: `forward` (a TrainForward op, with its gradient), `apply` ((x, gamma,
    beta, mean, invstd) -> the forward's y again, bit for bit) and `backward` (see `backward_inputs`)."""
    forward: ops.Custom
    apply: ops.Custom
    backward: ops.Custom


def backward_inputs(activation, x, gamma, beta, mean, invstd, y):
    """What the gradient kernel reads besides dy: x and the batch statistics, with ReLU its output (the mask), with
    GELU beta (to recompute the normalized x, where GELU's slope is taken)."""
    if activation == "relu":
        return x, gamma, mean, invstd, y
    if activation == "gelu":
        return x, gamma, beta, mean, invstd
    return x, gamma, mean, invstd


def training_gradients(backward, activation, x, gamma, beta, moving_mean, moving_variance, hyper, mean, invstd, y,
                       dy):
    """The training BN's gradients for its six inputs: the gradient kernel `backward`'s (dx, dgamma, dbeta), then
    zeros for the running statistics and the hyperparameters."""
    dx, dgamma, dbeta = backward(*backward_inputs(activation, x, gamma, beta, mean, invstd, y), dy)
    return dx, dgamma, dbeta, ops.zeros_like(moving_mean), ops.zeros_like(moving_variance), ops.zeros_like(hyper)


def make_kernel_set(isa, activation):
    """The training BN kernels followed by `activation` (None, "relu" or "gelu") in the same pass; None without a
    library."""
    path = library(isa)
    if path is None:
        return None
    suffix = f"{activation}_" if activation else ""
    backward = ops.Custom(f"{path}:batch_norm_{suffix}backward", tensor_and_two_per_channel_shapes, three_dtypes,
                          func_type="aot")
    apply = ops.Custom(f"{path}:batch_norm_{suffix}apply", lambda x, *_: x, lambda x, *_: x, func_type="aot")

    def bprop(x, gamma, beta, moving_mean, moving_variance, hyper, out, dout):
        y, mean, invstd = out
        return training_gradients(backward, activation, x, gamma, beta, moving_mean, moving_variance, hyper, mean,
                                  invstd, y, dout[0])

    return KernelSet(TrainForward(f"{path}:batch_norm_{suffix}forward", bprop), apply, backward)


@kernels.per_isa_level
def kernel_sets(isa):
    """{None: KernelSet, "relu": ..., "gelu": ...}, or None without a library."""
    if library(isa) is None:
        return None
    return {activation: make_kernel_set(isa, activation) for activation in (None, "relu", "gelu")}


def make_op(isa, activation):
    sets = kernel_sets(isa)
    return None if sets is None else sets[activation].forward


@kernels.per_isa_level
def batch_norm_op(isa):
    """The training BatchNorm op (see TrainForward) with its gradient kernel; None without a library."""
    return make_op(isa, None)


@kernels.per_isa_level
def batch_norm_relu_op(isa):
    """batch_norm_op followed by ReLU, in the same pass; None without a library."""
    return make_op(isa, "relu")


@kernels.per_isa_level
def batch_norm_gelu_op(isa):
    """batch_norm_op followed by exact GELU (gelu.h, as pointwise.gelu_op), in the same pass; None without a
    library."""
    return make_op(isa, "gelu")


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training forward on float32 NCHW input is one compiled kernel (and its gradient one
    more). `forward_relu(x)` is relu(self(x)) and `forward_gelu(x, gelu)` gelu(self(x)), each fused in training."""

    def __init__(self, channels, eps, momentum):
        super().__init__(channels, eps=eps, momentum=momentum)
        kernels_on = device.cpu_kernels_enabled()
        self.kernel = batch_norm_op() if kernels_on else None
        self.relu_kernel = batch_norm_relu_op() if kernels_on else None
        self.gelu_kernel = batch_norm_gelu_op() if kernels_on else None
        self.hyper = Tensor([eps, momentum], ms.float32)

    def batch_statistics(self):
        """Whether this forward normalizes by the batch's statistics (nn.BatchNorm2d's rule)."""
        return self.training if self.use_batch_statistics is None else self.use_batch_statistics

    def by_kernel(self, x):
        return self.batch_statistics() and self.kernel is not None and x.dtype == ms.float32 and x.ndim == 4

    def construct(self, x):
        if self.by_kernel(x):
            return self.kernel(x, self.gamma, self.beta, self.moving_mean, self.moving_variance, self.hyper)[0]
        return super().construct(x)

    def forward_relu(self, x):
        if self.by_kernel(x):
            return self.relu_kernel(x, self.gamma, self.beta, self.moving_mean, self.moving_variance, self.hyper)[0]
        return ops.relu(super().construct(x))

    def forward_gelu(self, x, gelu):
        """gelu(self(x)) for the model's exact-GELU cell `gelu`: one kernel in training where `gelu` runs the GELU
        kernel too (not where it keeps MindSpore's ops: impl "native", deploy export)."""
        if self.by_kernel(x) and gelu.kernel is not None:
            return self.gelu_kernel(x, self.gamma, self.beta, self.moving_mean, self.moving_variance, self.hyper)[0]
        return gelu(super().construct(x))


def normalize(norm, x, activation=None):
    """activation(norm(x)) for `activation` None, "relu" or the model's GELU cell, BN and activation one kernel where
    `norm` is a BatchNorm2d (not one AMP has wrapped)."""
    if activation is None:
        return norm(x)
    relu = isinstance(activation, str)
    if not isinstance(norm, BatchNorm2d):
        return ops.relu(norm(x)) if relu else activation(norm(x))
    return norm.forward_relu(x) if relu else norm.forward_gelu(x, activation)


def runs_kernel(norm, x):
    """Whether `norm` is a BatchNorm2d running its training kernel on x (not one AMP has wrapped, not in eval)."""
    return isinstance(norm, BatchNorm2d) and norm.by_kernel(x)


class RecomputesItsOutput(nn.Cell):
    """Base of the cells that run the training BN followed by `activation` and then convs reading its output y, and
    recompute y in the backward rather than keep it (conv1x1.NormalizedInput and NormalizedSumInput,
    dwconv.NormalizedInput): the kernels, y again, the BN's gradients."""

    def __init__(self, activation, isa=None):
        super().__init__()
        # Separate attributes: jit reads a NamedTuple's fields by index only.
        self.forward_op, self.apply_op, self.backward_op = kernel_sets(isa)[activation]
        self.activation = activation

    def recomputed(self, x, gamma, beta, mean, invstd, dout):
        """y again from x and the batch statistics (the same bits), once the backward has reached the conv: MindSpore
        runs an op as soon as its inputs exist, and a y recomputed in the forward would be kept all the same."""
        return self.apply_op(ops.depend(x, dout), gamma, beta, mean, invstd)

    def input_gradients(self, x, gamma, beta, moving_mean, moving_variance, hyper, mean, invstd, y, dy):
        """The BN's gradients for its six inputs (`training_gradients`), dy being y's."""
        return training_gradients(self.backward_op, self.activation, x, gamma, beta, moving_mean, moving_variance,
                                  hyper, mean, invstd, y, dy)
