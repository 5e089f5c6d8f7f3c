"""Validation: top-1, top-5 and loss over a sharded validation set, every image counted exactly once.

Each rank sums hit counts over its shard (padding rows carry valid = 0); the sums are added across ranks, and
only then divided. The same function serves the training loop and validate_with_func.py, so both report the
same numbers for the same weights.
"""
import logging

import mindspore as ms
import numpy as np

from replknet_fn.runlog import Progress

log = logging.getLogger(__name__)


def evaluation_counts(logits, labels, valid):
    """[top-1 hits, top-5 hits, summed loss, samples] over the valid (not padding) rows of a batch, in float64 on
    the host.

    Not in the compiled graph: MindSpore 2.8's CPU runtime changes how it runs a graph after its first five calls,
    and the cross-entropy and sums of the same logits then come out different in the last bits (measured), so
    one validation would depend on how often its graph had run before. The network's logits do not change."""
    logits = np.asarray(logits, np.float64)
    labels, valid = np.asarray(labels), np.asarray(valid, np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_probs[np.arange(len(labels)), labels]
    k = min(5, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]  # ties: the lower class index first, as ops.topk
    hits = top == labels.reshape(-1, 1)
    return np.array([np.sum(hits[:, 0] * valid), np.sum(hits.sum(1) * valid), np.sum(loss * valid), np.sum(valid)])


def make_eval_step(net, jit=True):
    """`eval_step(images) -> logits` of `net`, compiled unless `jit` is False."""

    def eval_step(images):
        return net(images).astype(ms.float32)

    return ms.jit(eval_step) if jit else eval_step


def evaluate(net, eval_step, batches, sum_across_ranks=None, num_batches=None):
    """Run `eval_step` over `batches` of (images, labels, valid) in eval mode; return top1/top5 (percent), mean
    loss and the number of images counted, summed over ranks. Long validations log their progress."""
    was_training = net.training
    net.set_train(False)
    totals = np.zeros(4, np.float64)
    progress = Progress(num_batches or 0)
    for index, (images, labels, valid) in enumerate(batches):
        totals += evaluation_counts(eval_step(ms.Tensor(images)).asnumpy(), labels, valid)
        if num_batches and (index + 1) % 50 == 0:
            log.info("  validation %d/%d, %s", index + 1, num_batches, progress.update(index + 1).describe("batches"))
        elif index == 0:
            progress.restart(1)  # the first batch also compiles the graph
    net.set_train(was_training)
    if sum_across_ranks is not None:
        totals = sum_across_ranks(ms.Tensor(totals.astype(np.float32))).asnumpy().astype(np.float64)
    count = max(totals[3], 1.0)
    return {"top1": 100.0 * totals[0] / count, "top5": 100.0 * totals[1] / count, "loss": totals[2] / count,
            "num_samples": int(round(totals[3]))}
