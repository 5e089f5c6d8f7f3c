"""Writing host values into Parameters so that compiled graphs see them.

MindSpore 2.8 trap (measured here): once a `mindspore.jit` function has run with a Parameter,
`Parameter.set_data` and `assign_value` give the Parameter a new buffer that the compiled graph never reads (it
keeps the old one, while `asnumpy()` shows the new value). `Tensor.copy_` writes in place, which both see. So
every host-side write in replknet_fn (checkpoint loading, EMA swaps, drop-path seeds) goes through here.
"""
import mindspore as ms
import numpy as np


def write_parameter(param, value):
    """Copy `value` (array, number or Tensor; same shape) into `param` in place, cast to its dtype.

    Beware: `param.asnumpy()` may be a view of the very buffer this overwrites; copy it first if you keep it."""
    if not isinstance(value, ms.Tensor):
        value = ms.Tensor(np.array(value, copy=True), param.dtype)
    param.copy_(value)
