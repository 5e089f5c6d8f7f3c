"""Data parallelism made explicit: who we are, and the few things that cross processes.

    ranks = init_distributed(config.distribute, config.collective_timeout)  # Ranks(rank, world_size)
    all_reduce = make_gradient_mean(world_size, params)       # the train step's all-reduce hook
    totals = make_sum_across_ranks(world_size)(counts)        # validation counters
    broadcast_parameters(params, ranks)                       # every rank starts from rank 0's weights
    average_over_ranks(state.rank_local_parameters(), world_size)  # BN statistics, before validating/saving
    check_same_on_all_ranks({"step": step}, ranks)            # every rank resumed from the same point

With `distribute False` nothing is initialised and nothing is communicated. BN statistics are per rank during an
epoch, as in the reference recipe, and averaged over ranks before every validation and save.

Failure (MindSpore 2.8 on CPU): nothing hangs. When a rank dies, MindSpore's scheduler stops hearing its
heartbeat and, after its node timeout (30 s), every other rank kills itself with SIGTERM; a collective left
waiting for a late peer fails after the workers' collective timeout. Both are MindSpore's `MS_NODE_TIMEOUT`, read
by each process for its own role: `init_distributed` keeps the scheduler's at 30 s (dead ranks are noticed fast)
and gives the workers `collective_timeout` (a slow rank, e.g. rank 0 saving a large checkpoint, is waited for).
`init_distributed` adds a one-line explanation to the SIGTERM, `explain_failure` to a failed collective.
"""
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import NamedTuple

import mindspore as ms
import numpy as np
from mindspore import ops

from replknet_fn.parameters import write_parameter

# MindSpore's MS_NODE_TIMEOUT (default 30 s; include/cluster/topology/common.h and rpc/collective_ops_impl.h) is
# both the scheduler's heartbeat timeout and a worker's wait in a CPU collective (measured: a peer 25 s late is
# waited for, one 45 s late fails the job; MS_RECEIVE_MSG_TIMEOUT does not change it). Each process reads it for
# its own role, so the two are set apart.
NODE_TIMEOUT_SECONDS = 30
BUCKET_BYTES = 64 * 1024 * 1024  # gradients per all-reduce: well under the 320 MB that broke the ring on CPU
DEFAULT_SCHEDULER_PORT = "8118"  # msrun's default --master_port


class DistributedError(RuntimeError):
    pass


class Ranks(NamedTuple):
    """Who this process is in its data-parallel group (unpacks as `rank, world_size`)."""
    rank: int
    world_size: int


# MindSpore's init() joins a process to its group once per process; these remember that for a second call (a
# second run in one process, as in the tests) and for explain_failure, which runs where no Ranks is at hand.
_joined = None
_collective_timeout = None


def init_distributed(distribute, collective_timeout):
    """Ranks(rank, world_size). With `distribute`, joins the group that msrun or mpirun started us in; this
    worker's collectives wait `collective_timeout` seconds for a late peer."""
    global _joined, _collective_timeout
    if not distribute:
        return Ranks(0, 1)
    if _joined is not None:
        return _joined
    if not os.environ.get("MS_ROLE") and os.environ.get("OMPI_COMM_WORLD_SIZE"):
        join_cluster_from_openmpi(os.environ)
    set_node_timeout(os.environ, collective_timeout)
    _collective_timeout = int(collective_timeout)
    if not os.environ.get("MS_ROLE"):
        raise DistributedError(
            "--distribute True needs a launcher: run under `msrun --worker_num=N --local_worker_num=N "
            "train_with_func.py ... --distribute True` or `mpirun -n N python train_with_func.py ... "
            "--distribute True` (README, 'Data-parallel training')")
    from mindspore.communication import get_group_size, get_rank, init
    try:
        init()
    except (RuntimeError, ValueError) as error:
        raise DistributedError(f"joining the process group failed: {str(error).splitlines()[0]}") from None
    _joined = Ranks(get_rank(), get_group_size())
    if _joined[1] > 1:
        _explain_termination(*_joined)
    return _joined


def set_node_timeout(environ, collective_timeout):
    """MS_NODE_TIMEOUT for this process's role. msrun runs the training script in its scheduler process too, so
    this runs there as well: the scheduler keeps MindSpore's 30 s heartbeat timeout (or the one the user set), a
    worker waits `collective_timeout` seconds in a collective. (In a worker, MS_NODE_TIMEOUT governs only that
    wait: measured, a killed rank still stops the others ~30 s later with workers at 600 s.)"""
    if environ.get("MS_ROLE") == "MS_SCHED":
        environ.setdefault("MS_NODE_TIMEOUT", str(NODE_TIMEOUT_SECONDS))
    else:
        environ["MS_NODE_TIMEOUT"] = str(int(collective_timeout))


def join_cluster_from_openmpi(environ):
    """Map mpirun's OMPI_COMM_WORLD_RANK/SIZE onto MindSpore's dynamic cluster (what msrun sets up).

    MindSpore 2.8's own OpenMPI path does not initialise collectives on CPU (measured: "Failed to initialize
    communication library on device side"), so each rank becomes an msrun-style worker (MS_ROLE, MS_NODE_ID =
    the MPI rank) and rank 0 also starts the scheduler process that msrun would start. The scheduler listens on
    MS_SCHED_HOST:MS_SCHED_PORT (defaults 127.0.0.1 and 8118; across machines pass
    `-x MS_SCHED_HOST=<rank 0's address>`)."""
    rank, size = int(environ["OMPI_COMM_WORLD_RANK"]), int(environ["OMPI_COMM_WORLD_SIZE"])
    local_size = int(environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", size))
    if not environ.get("MS_SCHED_HOST") and local_size != size:
        raise DistributedError(
            f"mpirun placed {size} ranks on several machines: tell every rank where rank 0's scheduler listens, "
            "e.g. `mpirun -x MS_SCHED_HOST=<address of rank 0's machine> -x MS_SCHED_PORT=8118 ...`")
    cluster = {"MS_WORKER_NUM": str(size), "MS_SCHED_HOST": environ.get("MS_SCHED_HOST", "127.0.0.1"),
               "MS_SCHED_PORT": environ.get("MS_SCHED_PORT", DEFAULT_SCHEDULER_PORT)}
    # Without these two, MindSpore would also take its own (GPU/Ascend-only) OpenMPI route.
    for name in ("OMPI_COMMAND", "PMIX_RANK"):
        environ.pop(name, None)
    if rank == 0:
        start_scheduler(dict(environ, **cluster))
    # Workers retry on their own; waiting here turns a scheduler that never comes up into a clear error.
    _wait_until_listening(cluster["MS_SCHED_HOST"], int(cluster["MS_SCHED_PORT"]))
    environ.update(cluster, MS_ROLE="MS_WORKER", MS_NODE_ID=str(rank))


def start_scheduler(environ):
    """The process msrun runs as `MS_ROLE=MS_SCHED`: it exits by itself once every worker has left (or timed
    out), and is killed with its parent. Only errors reach the log (GLOG_v=3) unless GLOG_v is set."""
    env = {name: value for name, value in environ.items() if not name.startswith(("OMPI_", "PMIX_"))}
    env.update(MS_ROLE="MS_SCHED", GLOG_v=environ.get("GLOG_v", "3"))
    set_node_timeout(env, None)
    return subprocess.Popen([sys.executable, "-c", "from mindspore.communication import init; init()"],
                            env=env, preexec_fn=_die_with_parent)


def _wait_until_listening(host, port, timeout=300.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=2.0):
                return
        except OSError as error:
            if time.monotonic() > deadline:
                raise DistributedError(f"rank 0's scheduler at {host}:{port} did not answer within {timeout:.0f} s "
                                       f"({error}); check MS_SCHED_HOST/MS_SCHED_PORT and rank 0's log") from None
            time.sleep(0.2)


def _die_with_parent():
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the scheduler still exits after its heartbeat timeout


def _explain_termination(rank, world_size):
    """Measured: when a rank stops answering (killed, out of memory, crashed), MindSpore's scheduler notices
    within ~30 s and every other rank kills itself with SIGTERM, which leaves only MindSpore's log lines. Say
    why in one line first. A thread does it, because the main thread may be stuck inside a collective; the
    exit code stays 143 (128 + SIGTERM)."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end)  # the C-level handler writes the signal number here at once
    signal.signal(signal.SIGTERM, lambda number, frame: None)  # keep the default action off: the thread exits

    def watch():
        while os.read(read_end, 1) != bytes([signal.SIGTERM]):
            pass
        sys.stderr.write(
            f"\nerror: rank {rank} of {world_size} stopped by SIGTERM. MindSpore's cluster sends it to every rank "
            f"~{NODE_TIMEOUT_SECONDS} s after one rank stops answering (died, killed, out of memory): find the "
            "first error in the other ranks' logs (msrun: log_dir/worker_<rank>.log; log_dir/scheduler.log names "
            "the rank that timed out). A launcher that stops the job sends it too.\n")
        sys.stderr.flush()
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="sigterm-report", daemon=True).start()
    # A forked child (a data worker) inherits the wakeup fd and the no-op handler: the SIGTERM that closes the
    # worker pool would be written into this pipe, and the watcher would kill this rank (measured: both ranks
    # exited at the first epoch end, the scheduler then timed both out). Children get the default action back.
    os.register_at_fork(after_in_child=_forget_termination_watch)


def _forget_termination_watch():
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def explain_failure(error):
    """A DistributedError explaining `error` when it is MindSpore's report of a failed collective in a group of
    several processes; else None."""
    if _joined is None or _joined[1] == 1 or "AllReduce" not in str(error):
        return None
    rank, world_size = _joined
    return DistributedError(
        f"rank {rank}: an all-reduce across {world_size} processes failed after waiting ~{_collective_timeout} s "
        "for a peer (collective_timeout). Another rank has probably died (killed, out of memory, an error: see its "
        "log, e.g. msrun's log_dir/worker_<rank>.log) or fell more than that far behind")


def _identity(values):
    return values


def make_gradient_mean(world_size, params=None, bucket_bytes=BUCKET_BYTES):
    """The all-reduce hook of the train step: the mean over ranks of each gradient.

    With `params` (the parameters the gradients belong to, in order), consecutive gradients are flattened into
    buckets of at most `bucket_bytes` and each bucket is one ops.AllReduce; without, one AllReduce per tensor.
    Buckets because every CPU all-reduce costs milliseconds however small (measured on 2 ranks: 603 gradients,
    152 MB, one by one 3.2 s, in 3 buckets 1.2 s; in the demo's step ~0.8 s against ~0.3 s), and a limit because
    one 320 MB buffer broke the ring all-reduce.
    Per-tensor work is mapped with HyperMap, as in the step: a comprehension over 31B's 562 tensors exceeds jit's
    call depth. Summing two float32 values does not depend on the order, so on 2 ranks both ways give identical
    bits."""
    if world_size == 1:
        return _identity
    from replknet_fn.step import map_each
    all_reduce, inverse = ops.AllReduce(), 1.0 / world_size
    if params is None:
        # Closures, not ops.partial(..., inverse): a Python float bound by partial arrives as a float64 tensor,
        # and the step's float32 parameters then fail to compile (measured).
        def mean_of_one(grad):
            return all_reduce(grad) * inverse

        def gradient_mean_per_tensor(grads):
            return map_each(mean_of_one, grads)

        return gradient_mean_per_tensor
    sizes = [int(np.prod(param.shape)) for param in params]
    buckets = plan_buckets([size * param.data.itemsize for size, param in zip(sizes, params)], bucket_bytes)
    # Where each gradient starts in its bucket's flat buffer (ops.split over hundreds of sizes exceeds jit's
    # call depth; slicing by HyperMap does not).
    offsets = [tuple(int(o) for o in np.cumsum([0] + sizes[start:end - 1])) for start, end in buckets]

    def gradient_mean(grads):
        means = ()
        for (start, end), bucket_offsets in zip(buckets, offsets):
            bucket = grads[start:end]
            flat = all_reduce(ops.concat(map_each(_flatten, bucket))) * inverse
            means = means + map_each(ops.partial(_piece, flat), bucket_offsets, bucket)
        return means

    return gradient_mean


def plan_buckets(sizes_in_bytes, bucket_bytes):
    """[(start, end)] ranges of consecutive tensors, each holding at most `bucket_bytes` (or one larger tensor)."""
    buckets, start, filled = [], 0, 0
    for index, size in enumerate(sizes_in_bytes):
        if index > start and filled + size > bucket_bytes:
            buckets.append((start, index))
            start, filled = index, 0
        filled += size
    if start < len(sizes_in_bytes):
        buckets.append((start, len(sizes_in_bytes)))
    return buckets


def _flatten(tensor):
    return tensor.reshape(-1)


def _piece(flat, offset, like):
    return ops.slice(flat, (offset,), (like.size,)).reshape(like.shape)


def make_sum_across_ranks(world_size):
    """Sum of a float32 Tensor over ranks (metric counters: exact below 2**24); identity on one process."""
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
    return float(_sum_over_ranks(np.array([value], np.float32))[0]) / world_size


def barrier(world_size):
    """Return once every rank has called it (an all-reduce of one number: comm_func.barrier fails on CPU)."""
    mean_across_ranks(0.0, world_size)


def broadcast_parameters(params, ranks):
    """Make every rank hold rank 0's values, bit for bit: float parameters travel as float32 (others add zeros:
    x + 0 is exact), integer ones (step counters, seeds) as 16-bit halves. Host buffers, 64 MB per all-reduce."""
    rank, world_size = ranks
    if world_size == 1:
        return
    float_types, int_types = (ms.float32, ms.float16), (ms.int32, ms.int16, ms.int8, ms.uint8)
    floats = [p for p in params if p.dtype in float_types]
    ints = [p for p in params if p.dtype in int_types]
    other = [p for p in params if p.dtype not in float_types + int_types]
    if other:
        raise DistributedError(f"cannot broadcast parameter {other[0].name} of dtype {other[0].dtype} exactly")
    for group, receive in ((floats, _floats_from_rank0), (ints, _ints_from_rank0)):
        if not group:
            continue
        values = receive(np.concatenate([p.asnumpy().ravel() for p in group]), rank)
        offset = 0
        for param in group:
            write_parameter(param, values[offset:offset + param.size].reshape(param.shape))
            offset += param.size


def average_over_ranks(params, world_size):
    """Give each float32 Parameter its mean over ranks, on every rank (host buffers, 64 MB per all-reduce)."""
    if world_size == 1 or not params:
        return
    mean = _sum_over_ranks(np.concatenate([param.asnumpy().ravel() for param in params])) / np.float32(world_size)
    offset = 0
    for param in params:
        write_parameter(param, mean[offset:offset + param.size].reshape(param.shape))
        offset += param.size


def check_same_on_all_ranks(values, ranks):
    """Raise DistributedError on every rank unless all ranks hold the same integers `values` ({name: int}),
    e.g. the step a resume restored."""
    rank, world_size = ranks
    if world_size == 1:
        return
    local = np.array(list(values.values()), np.int64)
    rank0 = _ints_from_rank0(local, rank)
    differs = _sum_over_ranks((rank0 != local).astype(np.float32)) > 0
    if differs.any():
        names = [name for name, flag in zip(values, differs) if flag]
        theirs = ", ".join(f"{name}={value}" for name, value, flag in zip(values, rank0, differs) if flag)
        mine = ", ".join(f"{name}={values[name]}" for name in names) if rank else "another rank differs"
        raise DistributedError(
            f"the ranks disagree on {', '.join(names)} (rank 0: {theirs}; rank {rank}: {mine}): they did not all "
            "resume from the same checkpoint. Put ckpt_save_dir on storage every machine sees, or copy the "
            "checkpoint to each")


# Host-side plumbing. Measured on CPU: AllReduce sums float32 and float16 only (int32/int64 are rejected, float64
# is silently summed in float32), and one 320 MB buffer broke the ring: send float32 chunks of 64 MB at most.
_CHUNK = 16 * 1024 * 1024


def _sum_over_ranks(array):
    flat = np.ascontiguousarray(array, np.float32).ravel()
    total = np.empty_like(flat)
    all_reduce = ops.AllReduce()
    for start in range(0, flat.size, _CHUNK):
        total[start:start + _CHUNK] = all_reduce(ms.Tensor(flat[start:start + _CHUNK])).asnumpy()
    return total.reshape(np.shape(array))


def _floats_from_rank0(values, rank):
    return _sum_over_ranks(values if rank == 0 else np.zeros_like(values, np.float32))


def _ints_from_rank0(values, rank):
    """Integers in int32's range, exactly: float32 sums integers exactly only below 2**24, so send the two 16-bit
    halves of value + 2**31."""
    shifted = np.asarray(values, np.int64) + 2 ** 31
    if shifted.size and (shifted.min() < 0 or shifted.max() >= 2 ** 32):
        raise DistributedError("integers to broadcast must fit in int32")
    halves = _floats_from_rank0(np.stack([shifted >> 16, shifted & 0xFFFF]).astype(np.float32), rank)
    halves = halves.astype(np.int64)
    return (halves[0] << 16) + halves[1] - 2 ** 31
