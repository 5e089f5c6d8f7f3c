"""Data parallelism made explicit: who we are, and the few things that cross processes.

    rank, world_size = init_distributed(config.distribute)
    all_reduce = make_gradient_mean(world_size)         # the train step's all-reduce hook
    totals = sum_across_ranks(counts)                   # validation counters
    broadcast_parameters(params)                        # every rank starts from rank 0's weights

With `distribute False` nothing is initialised and nothing is communicated. Everything else (BN statistics,
data shards, the optimizer) stays local to each rank, as in the reference recipe.
"""
import mindspore as ms
from mindspore import ops

from replknet_fn.parameters import write_parameter


class DistributedError(RuntimeError):
    pass


def init_distributed(distribute):
    """(rank, world_size). With `distribute`, joins the group msrun/mpirun started us in."""
    if not distribute:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init
    try:
        init()
    except (RuntimeError, ValueError) as error:
        raise DistributedError(
            "--distribute True needs a launcher: run under `msrun --worker_num=N --local_worker_num=N "
            f"train_with_func.py ...` or mpirun (see README). MindSpore said: {str(error).splitlines()[0]}"
        ) from None
    return get_rank(), get_group_size()


def _identity(values):
    return values


def make_gradient_mean(world_size):
    """The all-reduce hook of the train step: the mean of each gradient over ranks, one tensor at a time
    (a single huge buffer fails on CPU: measured, 320 MB at once breaks the ring all-reduce)."""
    if world_size == 1:
        return _identity
    all_reduce = ops.AllReduce()
    inverse = 1.0 / world_size

    def gradient_mean(grads):
        return tuple(all_reduce(g) * inverse for g in grads)

    return gradient_mean


def make_sum_across_ranks(world_size):
    """Sum of a Tensor over ranks (metric counters); identity on one process."""
    if world_size == 1:
        return _identity
    all_reduce = ops.AllReduce()

    def sum_across_ranks(value):
        return all_reduce(value)

    return sum_across_ranks


def mean_across_ranks(value, world_size):
    """Mean of a float over ranks, for logging."""
    if world_size == 1:
        return float(value)
    return float(ops.AllReduce()(ms.Tensor(float(value), ms.float32)).asnumpy()) / world_size


def broadcast_parameters(params, world_size):
    """Make every rank hold rank 0's values: all-reduce the values with every rank but 0 contributing zeros."""
    if world_size == 1:
        return
    from mindspore.communication import get_rank
    all_reduce = ops.AllReduce()
    keep = get_rank() == 0
    for param in params:
        value = param.value() if keep else ops.zeros_like(param.value())
        write_parameter(param, all_reduce(value))
