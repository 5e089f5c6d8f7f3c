"""A pool of forked worker processes that builds the items of a job ahead of the consumer, in order.

    for arrays, extra in map_in_workers(job, indices, num_workers):
        ...

`job` is any object with `array_specs()`, the [(shape, dtype)] of the arrays one item holds, and a pure
`build(index)` returning (those arrays, extra picklable data); data.py's batch builders are such jobs. Item p of
`indices` goes to worker p % W, which writes its arrays into a shared-memory slot (sending 40 MB batches through a
pipe cost ~40% of the augmentation time) and reports through a queue; results are read back in order. Workers
ignore Ctrl-C (the parent terminates them), exit by themselves when the parent dies, and an error in a worker
is raised again in the parent with the worker's traceback attached.
"""
import mmap
import multiprocessing
import os
import pickle
import queue
import signal
import traceback

import numpy as np

_PREFETCH_PER_WORKER = 2


def map_in_workers(job, indices, num_workers):
    """Yield job.build(i) for i in indices, in order. With num_workers > 1, forked worker processes build
    them ahead (at most 2 per worker in flight); they are killed when the generator ends, is closed or
    raises, and exit by themselves if this process dies."""
    indices = list(indices)
    if not num_workers or num_workers <= 1 or len(indices) <= 1 or not _CAN_FORK:
        for index in indices:
            yield job.build(index)
        return
    pool = _WorkerPool(job, min(num_workers, len(indices)))
    try:
        submitted = 0
        for position, index in enumerate(indices):
            # position - 1 is consumed, so the slot that position + in_flight - 1 reuses is free
            while submitted < len(indices) and submitted < position + pool.in_flight:
                pool.submit(submitted, indices[submitted])
                submitted += 1
            yield pool.result(position, index)
    finally:
        pool.close()


# Workers are forked: they start at once, share the job and the result slots, and run only the job's code
# (numpy and Pillow for data.py's). Without fork (not Linux), items are built in this process.
_CAN_FORK = "fork" in multiprocessing.get_all_start_methods()


class _WorkerPool:
    def __init__(self, job, size):
        context = multiprocessing.get_context("fork")
        self.size, self.in_flight = size, size * _PREFETCH_PER_WORKER
        self.slots = [_shared_arrays(job.array_specs()) for _ in range(self.in_flight)]
        self.tasks = [context.Queue() for _ in range(size)]
        self.results = [context.Queue() for _ in range(size)]
        self.processes = [context.Process(target=_worker_loop, daemon=True, name=f"data-worker-{worker}",
                                          args=(job, self.slots, self.tasks[worker], self.results[worker],
                                                os.getpid()))
                          for worker in range(size)]
        for process in self.processes:
            process.start()

    def submit(self, position, index):
        self.tasks[position % self.size].put((index, position % self.in_flight))

    def result(self, position, index):
        worker = position % self.size
        while True:
            try:
                done_index, extra, error = self.results[worker].get(timeout=1.0)
                break
            except queue.Empty:
                process = self.processes[worker]
                if not process.is_alive():
                    raise RuntimeError(f"data worker {worker} died (exit code {process.exitcode}), for example "
                                       f"killed for lack of memory; lower num_parallel_workers or batch_size")
        if error is not None:
            raise error
        assert done_index == index, (done_index, index)
        return tuple(np.array(array) for array in self.slots[position % self.in_flight]), extra

    def close(self):
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(timeout=5)
        for task_queue in self.tasks:
            task_queue.cancel_join_thread()
            task_queue.close()
        for result_queue in self.results:
            result_queue.close()


def _shared_arrays(specs):
    """Arrays of the given (shape, dtype) in one anonymous shared mapping, which forked children share."""
    sizes = [int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in specs]
    buffer = mmap.mmap(-1, max(1, sum(sizes)))
    arrays, offset = [], 0
    for (shape, dtype), size in zip(specs, sizes):
        arrays.append(np.frombuffer(buffer, dtype, int(np.prod(shape)), offset).reshape(shape))
        offset += size
    return arrays


def _worker_loop(job, slots, tasks, results, parent_pid):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which then terminates us
    results.cancel_join_thread()  # exiting must not wait for a parent that stopped reading
    while True:
        try:
            index, slot = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent_pid:
                return  # the parent died without closing us
            continue
        try:
            arrays, extra = job.build(index)
            for target, array in zip(slots[slot], arrays):
                target[...] = array
            results.put((index, extra, None))
        except Exception as error:
            error.add_note(f"in data worker pid {os.getpid()} building batch {index}:\n{traceback.format_exc()}")
            try:
                pickle.dumps(error)
            except Exception:
                error = RuntimeError(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
            results.put((index, None, error))
