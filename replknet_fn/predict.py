"""Predict the top classes of your own images with a trained RepLKNet checkpoint.

    python -m replknet_fn.predict --ckpt run/replknet_tiny-best.ckpt photos/            # our checkpoints
    python -m replknet_fn.predict --model replknet31_base --ckpt replknet31b.ckpt --labels imagenet.txt \\
        [--reparam] [--image_size 224] [--crop_pct 0.875] [--top_k 5] [--batch_size 16] [--json] IMAGE_OR_DIR...

Preprocessing is validation's, through the same code (`data.eval_batches`): resize the shorter side to
image_size / crop_pct, centre crop, normalize; image_size, crop_pct and interpolation default to the values the
checkpoint was trained with (its saved config), else 224, 0.875, bicubic. Directories are searched recursively for
the image types `data.py` reads. Class names come from `--labels` (one name per line, or a JSON list), else from
the class list saved with the checkpoint, else they are the class indices. A file that does not decode is named
on stderr and skipped; the exit status is non-zero only when no image could be predicted.

From Python:

    net, class_names, settings = load_predictor("best.ckpt")
    for path, result in predict_files(net, paths, settings, batch_size=16):
        ...   # result: probabilities (num_classes,), or the DataError of a file that did not decode
"""
import argparse
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass

import mindspore as ms
import numpy as np

from replknet_fn import data, device
from replknet_fn.checkpoint import CheckpointError
from replknet_fn.config import INTERPOLATIONS, Config, add_flag, add_option, add_weights_options, parse_tool_args
from replknet_fn.runlog import Progress, setup_logging
from replknet_fn.weights import PREPROCESSING_KEYS, eval_preprocessing, network_from_checkpoint

PROGRESS_EVERY = 10  # batches between progress lines on stderr
log = logging.getLogger(__name__)


class PredictError(ValueError):
    """A checkpoint, model name or labels file that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class PredictSettings:
    """Evaluation preprocessing (named as the config keys, so that `data.eval_batches` reads them)."""
    image_resize: int
    crop_pct: float
    interpolation: str
    mean: tuple
    std: tuple
    eval_resize: str
    num_parallel_workers: int
    jit: bool


# ---- the network and its classes ------------------------------------------------------------------------------

def read_labels(path):
    """Class names from a file: a JSON list of strings, or one name per line (blank lines ignored)."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as error:
        raise PredictError(f"labels file {path}: {error.strerror}") from None
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as error:
            raise PredictError(f"labels file {path} starts like a JSON list but is not valid JSON: {error}") from None
        if not all(isinstance(name, str) for name in names):
            raise PredictError(f"labels file {path}: the JSON list must hold only strings")
        return names
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_predictor(ckpt, model=None, reparam=False, labels=None, use_ema=False, large_kernel_impl="native",
                   num_parallel_workers=0, jit=True, **preprocessing):
    """(net in eval mode, class names or None, PredictSettings) for checkpoint `ckpt` (ours, or official weights
    with `model`).

    `labels` (a file) overrides the checkpoint's class names. `preprocessing` (image_resize, crop_pct,
    interpolation, mean, std, eval_resize) overrides what the checkpoint records it was trained with, else the
    official values for the model. `reparam` returns the deploy network (same logits). `use_ema` loads a
    training checkpoint's EMA weights."""
    try:
        net, record = network_from_checkpoint(ckpt, model, use_ema=use_ema, reparam=reparam,
                                              large_kernel_impl=large_kernel_impl)
    except CheckpointError as error:
        raise PredictError(str(error)) from None
    if net.head is None:
        raise PredictError(f"{ckpt} holds a backbone without a classifier: it cannot predict classes")
    num_classes = net.build_args["num_classes"]
    class_names = read_labels(labels) if labels else record.get("class_names")
    if class_names is not None and len(class_names) != num_classes:
        source = f"labels file {labels}" if labels else f"the class list saved in {ckpt}"
        raise PredictError(f"{source} has {len(class_names)} names but the classifier has {num_classes} outputs")
    chosen = dict(eval_preprocessing(record, model),
                  **{key: value for key, value in preprocessing.items() if value is not None})
    unknown = set(chosen) - set(PREPROCESSING_KEYS)
    if unknown:
        raise TypeError(f"load_predictor: unknown preprocessing argument(s) {sorted(unknown)}")
    settings = PredictSettings(**chosen, num_parallel_workers=num_parallel_workers, jit=jit)
    if settings.interpolation not in INTERPOLATIONS:
        raise PredictError(f"interpolation {settings.interpolation!r}: choose one of {sorted(INTERPOLATIONS)}")
    return net, class_names, settings


# ---- images -> probabilities ---------------------------------------------------------------------------------

def find_images(inputs):
    """Files to predict: each file argument as given, and the image files under each directory argument
    (recursively, sorted, hidden names skipped, extensions of `data.IMAGE_EXTENSIONS`). A directory without images
    is reported on stderr. A path that does not exist is kept, and reported as unreadable when predicted."""
    files = []
    for item in inputs:
        if not os.path.isdir(item):
            files.append(item)
            continue
        found = []
        for folder, subfolders, names in os.walk(item, followlinks=True):
            subfolders[:] = [name for name in subfolders if not name.startswith(".")]
            found += [os.path.join(folder, name) for name in names
                      if not name.startswith(".") and name.lower().endswith(data.IMAGE_EXTENSIONS)]
        if not found:
            log.warning("predict: no images (%s) under %s", " ".join(data.IMAGE_EXTENSIONS), item)
        files += sorted(found)
    return files


class _Failures(data.DataStats):
    """Collects the files that did not decode without logging them: predict reports them itself, in order."""

    def record(self, failures):
        for path, error, _ in failures:
            self.bad_files[path] = error


def softmax(logits):
    logits = np.asarray(logits, np.float64)
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def predict_files(net, paths, settings, batch_size=16):
    """Yield (path, probabilities) for each of `paths` in order, or (path, DataError) for a file that does not
    decode. Batches are built by validation's own loader, padded to `batch_size` so one compiled graph serves.
    Each call compiles the network once (with settings.jit): pass all files to one call."""
    paths = list(paths)
    if not paths:
        return

    def logits_of(images):
        return net(images)

    forward = ms.jit(logits_of) if settings.jit else logits_of
    net.set_train(False)
    failures = _Failures()
    loader_config = Config(asdict(settings), batch_size=batch_size)
    batches = data.eval_batches([(path, 0) for path in paths], loader_config, stats=failures)
    for batch_index, (images, _, valid) in enumerate(batches):
        probabilities = softmax(forward(ms.Tensor(images)).asnumpy())
        for row, path in enumerate(paths[batch_index * batch_size:(batch_index + 1) * batch_size]):
            if valid[row]:
                yield path, probabilities[row]
            else:
                yield path, data.DataError(failures.bad_files.get(path, f"cannot decode image file {path}"))


def top_k(probabilities, k, class_names=None):
    """The k most probable classes, most probable first (ties: lower index first), as
    [{"class": name (the index as a string without names), "index": int, "probability": float}]."""
    probabilities = np.asarray(probabilities)
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [{"class": class_names[index] if class_names is not None else str(index), "index": int(index),
             "probability": float(probabilities[index])} for index in order]


# ---- command line -------------------------------------------------------------------------------------------

def with_progress(results, total, batch_size, every=PROGRESS_EVERY):
    """Pass `results` through, logging images done, rate and ETA every `every` batches (the first batch, which
    also compiles the network, is left out of the rate)."""
    if not every or total <= every * batch_size:
        yield from results
        return
    progress = Progress(total)
    for done, result in enumerate(results, 1):
        yield result
        if done == batch_size:
            progress.restart(done)
        if done % (every * batch_size) == 0 and done < total:
            log.info("predict: %d/%d images, %s", done, total, progress.update(done).describe("images"))


def format_table(path, ranked):
    width = max(len(entry["class"]) for entry in ranked)
    lines = [path] + [f"  {entry['class']:<{width}}  {100 * entry['probability']:6.2f}%  (class {entry['index']})"
                      for entry in ranked]
    return "\n".join(lines)


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m replknet_fn.predict",
                                     description="Top classes of images by a RepLKNet checkpoint.")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    add_weights_options(parser)
    add_option(parser, "reparam", default=False, help="predict with the re-parameterized (deploy) network")
    parser.add_argument("--labels", default=None, help="class names: one per line, or a JSON list (overrides the "
                                                        "checkpoint's class list)")
    for key in PREPROCESSING_KEYS:  # default: the checkpoint's record, else the official values
        add_option(parser, key)
    parser.add_argument("--top_k", type=int, default=5)
    add_option(parser, "batch_size", default="16")
    add_option(parser, "num_parallel_workers", default="2", help="image decoding processes (0: in this one)")
    add_option(parser, "large_kernel_impl", default="native")
    add_option(parser, "device_target", default="auto")
    add_flag(parser, "json", "one JSON object per image on stdout (JSON lines)")
    return parser


def main(argv=None):
    setup_logging(stream="stderr")  # stdout holds the predictions
    parser = build_parser()
    args = parse_tool_args(parser, argv)
    try:
        device.apply_device_target(args.device_target)
        net, class_names, settings = load_predictor(
            args.ckpt_path, args.model, args.reparam, args.labels, args.use_ema, args.large_kernel_impl,
            args.num_parallel_workers, **{key: getattr(args, key) for key in PREPROCESSING_KEYS})
    except (PredictError, device.DeviceError) as error:
        sys.exit(f"predict: {error}")
    if args.top_k < 1:
        parser.error("--top_k must be at least 1")
    paths = find_images(args.inputs)
    form = {None: "training form", "reparam": "deploy form", "folded": "deploy form, BN folded"}
    log.info("predict: %d image(s), %dpx (%s, crop_pct %g, %s), network in %s", len(paths), settings.image_resize,
             "warp" if data.warps_at_eval(settings) else "resize and centre crop", settings.crop_pct,
             settings.interpolation, form[getattr(net, "deploy_form", None)])
    predicted, skipped = 0, 0
    for path, result in with_progress(predict_files(net, paths, settings, args.batch_size), len(paths),
                                      args.batch_size):
        if isinstance(result, Exception):
            skipped += 1
            log.warning("predict: skipping %s: %s", path, result)
            continue
        predicted += 1
        ranked = top_k(result, args.top_k, class_names)
        if args.json:
            print(json.dumps({"path": path, "top_k": ranked}), flush=True)
        else:
            print(format_table(path, ranked), flush=True)
    log.info("predict: %d image(s) predicted, %d skipped", predicted, skipped)
    if predicted == 0:
        sys.exit(f"predict: no image could be predicted ({len(paths)} given)")


if __name__ == "__main__":
    main()
