"""Exact GELU, drop path, and the global norm, gradient scaling and AdamW update (each one op over all parameters)
as compiled one-pass kernels (`csrc/pointwise.cc`), built by kernels.py.

Measured on RepLKNet-31B (batch 4 @224, 2 shared cores): MindSpore builds the exact (erf) GELU and its gradient from
~10 primitives, 1.4 s of a 6.5 s train step; its fused AdamWeightDecay kernel takes ~0.4-0.8 s over the 80M
parameters. Each op here is None when the library cannot be built (no compiler): callers then use MindSpore's ops.
"""
import functools

from mindspore import ops
from mindspore.ops import signature as sig

from replknet_fn import kernels
from replknet_fn.kernels import same_dtype, same_shape

SOURCE = kernels.SOURCE_DIR / "pointwise.cc"


def library(isa):
    return kernels.compiled_library(SOURCE, isa, "exact GELU and AdamW use MindSpore's slower ops")


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
def drop_path_op(isa):
    """(x, seed, stream, keep_prob) -> x[b] * mask[b] for each sample b (x float32, seed and stream int32 and
    keep_prob float32 scalars): DropPath in one op, its mask `floor(keep_prob + u) / keep_prob` from u =
    `model.hash_uniform(seed, stream, batch)` computed in the kernel, bit for bit as the graph computes it. Its
    bprop masks the output gradient the same way and uses nothing else. Measured (MindSpore 2.8 CPU): the hash in
    MindSpore's ops was ~15 small ops per DropPath, 136 of the 469 ops each demo step launched (~30-50 us each); and
    MindSpore's broadcast Mul by the mask, whose gradient also covers the mask, made 31B training (batch 4) peak
    0.7 GB higher and compile ~7 s longer, although the mask is under stop_gradient. None without a library."""
    path = library(isa)
    if path is None:
        return None
    masked = ops.Custom(f"{path}:drop_path", same_shape, same_dtype, func_type="aot")

    def bprop(x, seed, stream, keep_prob, out, dout):
        return masked(dout, seed, stream, keep_prob), ops.zeros_like(seed), ops.zeros_like(stream), \
            ops.zeros_like(keep_prob)

    return ops.Custom(f"{path}:drop_path", same_shape, same_dtype, func_type="aot", bprop=bprop)


def scalar_shape(*_):
    return []


def all_but_last(*values):
    return list(values[:-1])


@kernels.per_isa_level
def squared_sum_op(isa):
    """(x_1, ..., x_n) -> the sum of squares of every element of every x_t, a float32 scalar (float32 inputs): the
    global norm's sum over all gradients in one op. None without a library."""
    path = library(isa)
    return None if path is None else ops.Custom(f"{path}:squared_sum", scalar_shape, same_dtype,
                                                func_type="aot")


@kernels.per_isa_level
def scale_all_op(isa):
    """(x_1, ..., x_n, k) -> (x_1 k, ..., x_n k) for a float32 scalar k (float32 inputs): unscaling or clipping all
    gradients in one op. None without a library."""
    path = library(isa)
    return None if path is None else ops.Custom(f"{path}:scale_all", all_but_last, all_but_last, func_type="aot")


class InPlaceUpdate(ops.Custom):
    """A custom op that writes the first `3 count` of its inputs in place (AdamW's parameters and two state
    buffers, `count` of each). They are declared written (RW_WRITE) with a memory side effect, as MindSpore's own
    optimizer ops are, so graphs order the op after every earlier read of those Parameters and before every later
    one. MindSpore reads the signature from the class: `in_place_update` makes a class per count."""

    def __init__(self, function, count):
        def output_shape(*shapes):
            return shapes[4 * count]  # step_hyper's

        def output_dtype(*dtypes):
            return dtypes[4 * count]

        super().__init__(function, output_shape, output_dtype, func_type="aot")
        self.add_prim_attr("side_effect_mem", True)


def in_place_update(function, count):
    written = [sig.make_sig(f"{name}_{t}", sig.sig_rw.RW_WRITE) for name in ("param", "exp_avg", "exp_avg_sq")
               for t in range(count)]
    read = [sig.make_sig(f"grad_{t}") for t in range(count)] + [sig.make_sig("step_hyper"),
                                                                  sig.make_sig("param_hypers")]
    cls = type(f"InPlaceUpdate{count}", (InPlaceUpdate,), {"__mindspore_signature__": tuple(written + read)})
    return cls(function, count)


def adamw_op(count, isa=None):
    """(param_1..n, exp_avg_1..n, exp_avg_sq_1..n, grad_1..n, [lr, step], param_hypers) -> [lr, step] for n =
    `count` float32 parameters: torch.optim.AdamW applied in place to all of them in one op, param_hypers (n, 5)
    holding each parameter's [lr scale, weight decay, beta1, beta2, eps]. None without a library."""
    return adamw_op_at(count, kernels.isa_level() if isa is None else isa)


@functools.lru_cache(maxsize=None)
def adamw_op_at(count, isa):
    path = library(isa)
    return None if path is None else in_place_update(f"{path}:adamw_update", count)
