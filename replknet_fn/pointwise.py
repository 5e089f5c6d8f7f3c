"""Exact GELU, drop path's per-sample scaling and the AdamW update as compiled one-pass kernels
(`csrc/pointwise.cc`), built by kernels.py.

Measured on RepLKNet-31B (batch 4 @224, 2 shared cores): MindSpore builds the exact (erf) GELU and its gradient from
~10 primitives, 1.4 s of a 6.5 s train step; its fused AdamWeightDecay kernel takes ~0.4-0.8 s over the 80M
parameters. Each op here is None when the library cannot be built (no compiler): callers then use MindSpore's ops.
"""
from mindspore import ops
from mindspore.ops import signature as sig

from replknet_fn import kernels
from replknet_fn.kernels import same_dtype, same_shape

SOURCE = kernels.SOURCE_DIR / "pointwise.cc"


def library(isa):
    return kernels.compiled_library(SOURCE, isa, "exact GELU and AdamW use MindSpore's slower ops")


def fifth_shape(*shapes):
    return shapes[4]


def fifth_dtype(*dtypes):
    return dtypes[4]


@kernels.per_isa_level
def gelu_op(isa):
    """x -> x Phi(x) (float32), whose bprop is the matching one-pass gradient kernel; None without a library."""
    path = library(isa)
    if path is None:
        return None
    backward = ops.Custom(f"{path}:gelu_backward", same_shape, same_dtype, func_type="aot")

    def bprop(x, out, dout):
        return (backward(x, dout),)

    return ops.Custom(f"{path}:gelu_forward", same_shape, same_dtype, func_type="aot", bprop=bprop)


@kernels.per_isa_level
def scale_samples_op(isa):
    """(x, k) -> x * k[b] for each sample b (float32; k of shape (batch,)): drop path's mask. Its bprop scales the
    output gradient by k and uses nothing else: with MindSpore's broadcast Mul, whose gradient also covers k,
    RepLKNet-31B training (batch 4) peaked 0.7 GB higher (4.89 vs 4.22 GB), its first step compiled ~7 s longer and
    each step ran ~0.5 s slower, although k is under stop_gradient (measured, MindSpore 2.8 CPU). None without a
    library."""
    path = library(isa)
    if path is None:
        return None
    scale = ops.Custom(f"{path}:scale_samples", same_shape, same_dtype, func_type="aot")

    def bprop(x, k, out, dout):
        return scale(dout, k), ops.zeros_like(k)

    return ops.Custom(f"{path}:scale_samples", same_shape, same_dtype, func_type="aot", bprop=bprop)


def scalar_shape(*_):
    return []


@kernels.per_isa_level
def squared_sum_op(isa):
    """x -> sum of x^2, a float32 scalar (float32 input); None without a library."""
    path = library(isa)
    return None if path is None else ops.Custom(f"{path}:squared_sum", scalar_shape, same_dtype,
                                                func_type="aot")


class InPlaceUpdate(ops.Custom):
    """A custom op that writes its first three inputs in place. They are declared written (RW_WRITE) with a memory
    side effect, as MindSpore's own optimizer ops are, so graphs order the op after every earlier read of those
    Parameters and before every later one."""

    __mindspore_signature__ = (
        sig.make_sig("param", sig.sig_rw.RW_WRITE), sig.make_sig("exp_avg", sig.sig_rw.RW_WRITE),
        sig.make_sig("exp_avg_sq", sig.sig_rw.RW_WRITE), sig.make_sig("grad"), sig.make_sig("step_hyper"),
        sig.make_sig("param_hyper"))

    def __init__(self, function):
        super().__init__(function, fifth_shape, fifth_dtype, func_type="aot")
        self.add_prim_attr("side_effect_mem", True)


@kernels.per_isa_level
def adamw_op(isa):
    """(param, exp_avg, exp_avg_sq, grad, [lr, step], [lr scale, weight decay, beta1, beta2, eps]) -> [lr, step],
    torch.optim.AdamW applied in place (float32); None without a library."""
    path = library(isa)
    return None if path is None else InPlaceUpdate(f"{path}:adamw_update")
