"""Validation: top-1, top-5 and loss over a sharded validation set, every image counted exactly once.

Each rank sums hit counts over its shard (padding rows carry valid = 0); the sums are added across ranks, and
only then divided. The same function serves the training loop and validate_with_func.py, so both report the
same numbers for the same weights.
"""
import time

import mindspore as ms
import numpy as np
from mindspore import ops


def evaluation_counts(logits, labels, valid):
    """[top-1 hits, top-5 hits, summed loss, samples] over the valid (not padding) rows of a batch."""
    logits = logits.astype(ms.float32)
    loss = ops.cross_entropy(logits, labels, reduction="none")
    k = min(5, logits.shape[-1])
    _, top = ops.topk(logits, k)
    hits = (top == labels.reshape(-1, 1)).astype(ms.float32)
    top1 = ops.sum(hits[:, 0] * valid)
    top5 = ops.sum(ops.sum(hits, 1) * valid)
    return ops.stack([top1, top5, ops.sum(loss * valid), ops.sum(valid)])


def make_eval_step(net, jit=True):
    """`eval_step(images, labels, valid) -> [top-1 hits, top-5 hits, loss sum, count]` (float64-safe sums are
    taken on the host)."""

    def eval_step(images, labels, valid):
        return evaluation_counts(net(images), labels, valid)

    return ms.jit(eval_step) if jit else eval_step


def evaluate(net, eval_step, batches, sum_across_ranks=None, num_batches=None, log=None):
    """Run `eval_step` over `batches` of (images, labels, valid) in eval mode; return top1/top5 (percent), mean
    loss and the number of images counted, summed over ranks."""
    was_training = net.training
    net.set_train(False)
    totals = np.zeros(4, np.float64)
    start = time.time()
    for index, (images, labels, valid) in enumerate(batches):
        counts = eval_step(ms.Tensor(images), ms.Tensor(labels), ms.Tensor(valid))
        totals += counts.asnumpy().astype(np.float64)
        if log is not None and num_batches and (index + 1) % 50 == 0:
            elapsed = time.time() - start
            log(f"  validation {index + 1}/{num_batches}, ETA {elapsed / (index + 1) * (num_batches - index - 1):.0f}s")
    net.set_train(was_training)
    if sum_across_ranks is not None:
        totals = sum_across_ranks(ms.Tensor(totals.astype(np.float32))).asnumpy().astype(np.float64)
    count = max(totals[3], 1.0)
    return {"top1": 100.0 * totals[0] / count, "top5": 100.0 * totals[1] / count, "loss": totals[2] / count,
            "num_samples": int(round(totals[3]))}
