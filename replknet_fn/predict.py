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
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import mindspore as ms
import numpy as np

from replknet_fn import data, device
from replknet_fn.checkpoint import CheckpointError, load_parameters, read_checkpoint
from replknet_fn.ckpt_io import network_from_checkpoint
from replknet_fn.config import INTERPOLATIONS, Config
from replknet_fn.convert import net_parameters
from replknet_fn.dwconv import IMPLEMENTATIONS
from replknet_fn.model import MODELS, build_replknet
from replknet_fn.reparam import reparameterize

PROGRESS_EVERY = 10  # batches between progress lines on stderr


class PredictError(ValueError):
    """A checkpoint, model name or labels file that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class PredictSettings:
    """Evaluation preprocessing (named as the training config keys, so that `data.eval_batches` reads them)."""
    image_resize: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    num_parallel_workers: int = 0
    jit: bool = True


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


def build_from_checkpoint(params, meta, ckpt, model, large_kernel_impl):
    """The eval-mode network of a checkpoint. Ours record their architecture (meta["build_args"]); a converted
    official checkpoint needs `model`, and may be in training or deploy form."""
    if meta.get("build_args"):
        if model is not None and meta.get("model") not in (None, model):
            raise PredictError(f"{ckpt} holds a {meta['model']} network, not {model}; drop --model or fix it")
        # Drop path is off in eval mode; building without it also skips its per-block seed parameters.
        net = build_replknet(**dict(meta["build_args"], drop_path_rate=0.0, recompute=False,
                                    large_kernel_impl=large_kernel_impl))
        load_parameters(net_parameters(net), params, ckpt)
        return net
    if model is None:
        raise PredictError(f"{ckpt} does not record its architecture (a converted official checkpoint?); "
                           f"give --model, one of {sorted(MODELS)}")
    head = params.get("head.weight")
    if head is None:
        raise PredictError(f"{ckpt} has no classifier (head.weight): a backbone cannot predict classes")
    return network_from_checkpoint(model, params, num_classes=int(head.shape[0]),
                                   large_kernel_impl=large_kernel_impl, drop_path_rate=0.0)


def load_predictor(ckpt, model=None, reparam=False, labels=None, image_resize=None, crop_pct=None,
                   interpolation=None, use_ema=False, large_kernel_impl="native", num_parallel_workers=0,
                   jit=True):
    """(net in eval mode, class names or None, PredictSettings) for checkpoint `ckpt`.

    `labels` (a file) overrides the checkpoint's class names. Preprocessing arguments left at None take the
    checkpoint's training config, else the timm defaults. `reparam` returns the deploy network (same logits).
    `use_ema` loads a training checkpoint's EMA weights."""
    try:
        params, meta = read_checkpoint(ckpt)
    except CheckpointError as error:
        raise PredictError(str(error)) from None
    if use_ema:
        params = {name[len("ema."):]: value for name, value in params.items() if name.startswith("ema.")}
        if not params:
            raise PredictError(f"{ckpt} holds no EMA weights (train with --ema True)")
    try:
        net = build_from_checkpoint(params, meta, ckpt, model, large_kernel_impl)
    except CheckpointError as error:
        raise PredictError(f"{ckpt}: {error}") from None
    if net.head is None:
        raise PredictError(f"{ckpt} holds a backbone without a classifier: it cannot predict classes")
    if reparam and getattr(net, "deploy_form", None) is None:
        net = reparameterize(net, large_kernel_impl=large_kernel_impl)
    net.set_train(False)

    num_classes = net.build_args["num_classes"]
    class_names = read_labels(labels) if labels else meta.get("class_names")
    if class_names is not None and len(class_names) != num_classes:
        source = f"labels file {labels}" if labels else f"the class list saved in {ckpt}"
        raise PredictError(f"{source} has {len(class_names)} names but the classifier has {num_classes} outputs")

    trained = meta.get("config", {})
    chosen = {"image_resize": image_resize, "crop_pct": crop_pct, "interpolation": interpolation}
    settings = PredictSettings(**{key: trained[key] for key in chosen if key in trained})
    settings = replace(settings, **{key: value for key, value in chosen.items() if value is not None},
                       num_parallel_workers=num_parallel_workers, jit=jit)
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
            print(f"predict: no images ({' '.join(data.IMAGE_EXTENSIONS)}) under {item}", file=sys.stderr)
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
    """Pass `results` through, printing images done, rate and ETA to stderr every `every` batches (the first
    batch, which also compiles the network, is left out of the rate)."""
    if not every or total <= every * batch_size:
        yield from results
        return
    first_batch_done = None
    for done, result in enumerate(results, 1):
        yield result
        if done == batch_size:
            first_batch_done = time.time()
        if done % (every * batch_size) == 0 and done < total and first_batch_done is not None:
            rate = (done - batch_size) / max(time.time() - first_batch_done, 1e-9)
            print(f"predict: {done}/{total} images, {rate:.1f} images/s, ETA {(total - done) / rate:.0f} s",
                  file=sys.stderr, flush=True)


def format_table(path, ranked):
    width = max(len(entry["class"]) for entry in ranked)
    lines = [path] + [f"  {entry['class']:<{width}}  {100 * entry['probability']:6.2f}%  (class {entry['index']})"
                      for entry in ranked]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Top classes of images by a RepLKNet checkpoint.")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    parser.add_argument("--ckpt", required=True, help="our training checkpoint, or a converted official one")
    parser.add_argument("--model", default=None, choices=sorted(MODELS),
                        help="needed for checkpoints that do not record their architecture (converted official)")
    parser.add_argument("--reparam", action="store_true", help="predict with the re-parameterized (deploy) network")
    parser.add_argument("--use_ema", action="store_true", help="use the EMA weights of a training checkpoint")
    parser.add_argument("--labels", default=None, help="class names: one per line, or a JSON list (overrides the "
                                                        "checkpoint's class list)")
    parser.add_argument("--image_size", type=int, default=None, help="crop size (default: the checkpoint's "
                                                                     "image_resize, else 224)")
    parser.add_argument("--crop_pct", type=float, default=None, help="default: the checkpoint's, else 0.875")
    parser.add_argument("--interpolation", default=None, choices=sorted(INTERPOLATIONS),
                        help="default: the checkpoint's, else bicubic")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_workers", type=int, default=2, help="image decoding processes (0: in this one)")
    parser.add_argument("--large_kernel_impl", default="native", choices=IMPLEMENTATIONS)
    parser.add_argument("--json", action="store_true", help="one JSON object per image on stdout (JSON lines)")
    device.add_device_argument(parser)
    args = parser.parse_args(argv)
    try:
        device.apply_device_target(args.device_target)
    except device.DeviceError as error:
        parser.exit(2, f"error: {error}\n")
    for name in ("top_k", "batch_size", "image_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        parser.error("--crop_pct must be in (0, 1]")
    try:
        net, class_names, settings = load_predictor(
            args.ckpt, args.model, args.reparam, args.labels, args.image_size, args.crop_pct, args.interpolation,
            args.use_ema, args.large_kernel_impl, args.num_workers)
    except PredictError as error:
        sys.exit(f"predict: {error}")
    paths = find_images(args.inputs)
    form = {None: "training form", "reparam": "deploy form", "folded": "deploy form, BN folded"}
    print(f"predict: {len(paths)} image(s), {settings.image_resize}px crop (crop_pct {settings.crop_pct}, "
          f"{settings.interpolation}), network in {form[getattr(net, 'deploy_form', None)]}", file=sys.stderr)
    predicted, skipped = 0, 0
    for path, result in with_progress(predict_files(net, paths, settings, args.batch_size), len(paths),
                                      args.batch_size):
        if isinstance(result, Exception):
            skipped += 1
            print(f"predict: skipping {path}: {result}", file=sys.stderr, flush=True)
            continue
        predicted += 1
        ranked = top_k(result, args.top_k, class_names)
        if args.json:
            print(json.dumps({"path": path, "top_k": ranked}), flush=True)
        else:
            print(format_table(path, ranked), flush=True)
    print(f"predict: {predicted} image(s) predicted, {skipped} skipped", file=sys.stderr)
    if predicted == 0:
        sys.exit(f"predict: no image could be predicted ({len(paths)} given)")


if __name__ == "__main__":
    main()
