"""Image folders to numpy batches: listing, decoding, the epoch plan (order, shards, batch counts), the settings
read from the config, and the generators. The per-image and per-batch augmentations are in augment.py; the
worker processes that build batches ahead of the training step are in workers.py.

    train, val, class_names = find_splits(data_dir)
    for images, targets in train_batches(train, len(class_names), config, epoch, rank, world_size):
        ...   # images float32 (N, 3, S, S) normalized; targets float32 (N, num_classes) soft labels
    for images, labels, valid in eval_batches(val, config, rank, world_size):
        ...   # labels int32 (N,), valid float32 (N,): 0 for padding and for images that did not decode

Determinism. Every random choice comes from its own generator, seeded by what it decides and nothing else:
the epoch's order by (seed, epoch); one sample's crop, flip, RandAugment and erasing by (seed, epoch, its
position in the epoch's global order); one batch's mixup/cutmix by (seed, epoch, global batch index). So a
batch does not depend on which worker built it, on the number of workers, or on the batches before it, and
`start_batch` resumes an epoch exactly.

Sharding. The epoch's order is a permutation of the samples; rank r takes every world_size-th sample of it
(positions r, r + world_size, ...). The order is padded by wrapping to a multiple of world_size, and the
remainder that does not fill a batch is dropped, so every rank yields the same number of full batches.

Bad data. Every file is decoded by `load_rgb`, which converts any mode to RGB and raises DataError naming the
file when it cannot decode it. In training, a slot whose file does not decode takes the next sample of the
epoch's order that does (with the slot's own augmentation), so shard sizes never change; in evaluation the
image is left out with valid=0. Either way `DataStats.skipped` counts it and the file is logged once per run.

We do not use `mindspore.dataset` here: its random ops draw from per-pipeline streams, so a sample's
augmentation depends on the worker count and on what came before, which rules out exact resume; its
RandAugment has no magnitude noise; and skipping bad samples there can make shards differ across ranks.
"""
import logging
import math
import os
from dataclasses import dataclass, field, fields

import numpy as np
from PIL import Image

from replknet_fn.augment import (
    AugmentSettings,
    DataError,
    config_values,
    eval_transform,
    mix_batch,
    resample_filter,
    train_transform,
)
from replknet_fn.workers import map_in_workers

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


# ---------------------------------------------------------------------------------------------------------------
# Listing

def list_image_folder(root):
    """(samples, class_names) of an ImageNet-layout folder `root/<class>/**/<image>`.

    samples are (path, label) sorted by class then relative path, label indexing the sorted class names.
    Hidden files and folders (names starting with '.') are ignored. Class folders without images are kept
    as classes (their label exists), they just contribute no samples."""
    class_names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    samples = []
    for label, class_name in enumerate(class_names):
        class_dir = os.path.join(root, class_name)
        paths = []
        for folder, subfolders, files in os.walk(class_dir, followlinks=True):
            subfolders[:] = [name for name in subfolders if not name.startswith(".")]
            paths += [os.path.join(folder, name) for name in files
                      if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)]
        samples += [(path, label) for path in sorted(paths)]
    return samples, class_names


def find_split(data_dir, split):
    """(samples, class_names) of `data_dir/split`. Raises DataError for a missing folder or a split without
    images; an empty class folder only warns."""
    layout = f"expected {os.path.join(data_dir, split, '<class>', '<image>')}"
    if not os.path.isdir(data_dir):
        raise DataError(f"data_dir {data_dir!r} does not exist or is not a directory ({layout})")
    split_dir = os.path.join(data_dir, split)
    if not os.path.isdir(split_dir):
        found = sorted(os.listdir(data_dir))
        raise DataError(f"data_dir {data_dir!r} has no {split}/ folder ({layout}); it contains: {found}")
    samples, class_names = list_image_folder(split_dir)
    if not class_names:
        raise DataError(f"{split_dir!r} has no class folders ({layout})")
    if not samples:
        raise DataError(f"{split_dir!r} has {len(class_names)} class folders but no images "
                        f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
    counts = np.bincount([label for _, label in samples], minlength=len(class_names))
    for class_name, count in zip(class_names, counts):
        if count == 0:
            log.warning("class folder %s has no images", os.path.join(split_dir, class_name))
    return samples, class_names


def find_splits(data_dir, train_split="train", val_split="val"):
    """(train_samples, val_samples, class_names) of `data_dir/train_split` and `data_dir/val_split` (val_split
    None: no validation split, val_samples empty). Raises DataError as find_split does, and when the class
    folders differ between the splits (labels would silently mean different classes)."""
    train, train_classes = find_split(data_dir, train_split)
    if val_split is None:
        return train, [], train_classes
    val, val_classes = find_split(data_dir, val_split)
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(f"class folders differ between {train_split}/ and {val_split}/ in {data_dir!r}: "
                        f"only in {train_split}/: {only_train}; only in {val_split}/: {only_val}")
    return train, val, train_classes


# ---------------------------------------------------------------------------------------------------------------
# Decoding

def load_rgb(path):
    """The image at `path` as an RGB PIL image, fully decoded.

    Grayscale, palette, CMYK, YCbCr and alpha images are converted with Pillow's `convert("RGB")`, which drops
    alpha (the colour under transparent pixels is kept, as torchvision's loader does, so it matches what the
    reference recipe saw). 16-bit and 32-bit images are scaled to 8 bits first (Pillow would clip them).
    Any file that does not decode completely (truncated, corrupt, not an image, missing) raises DataError."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")  # avoids Pillow's warning; same RGB as a direct conversion
            if image.mode in ("I", "F") or image.mode.startswith("I;16"):
                return _wide_to_rgb(image)
            return image.convert("RGB")
    except Exception as error:  # decoders of corrupt files raise many types (OSError, SyntaxError, struct.error...)
        raise DataError(f"cannot decode image file {path}: {type(error).__name__}: {error}") from error


def _wide_to_rgb(image):
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
        values = values / 257.0  # 65535 -> 255
    elif image.mode == "F" and values.max(initial=0) <= 1.0:
        values = values * 255.0
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([gray] * 3, axis=-1), "RGB")


def scan_images(samples, num_workers=0):
    """[(path, error message)] for every file of `samples` ((path, label) pairs or paths) that does not
    decode, in the order given; an empty list means all decode. For `--scan_data`."""
    paths = [sample[0] if isinstance(sample, (tuple, list)) else sample for sample in samples]
    job = _ScanJob(paths, chunk_size=64)
    failures = []
    for _, chunk_failures in map_in_workers(job, range(job.num_chunks), num_workers):
        failures += chunk_failures
    return failures


@dataclass
class _ScanJob:
    paths: list
    chunk_size: int

    @property
    def num_chunks(self):
        return math.ceil(len(self.paths) / self.chunk_size)

    def array_specs(self):
        return []

    def build(self, chunk_index):
        failures = []
        for path in self.paths[chunk_index * self.chunk_size:(chunk_index + 1) * self.chunk_size]:
            try:
                load_rgb(path)
            except DataError as error:
                failures.append((path, str(error)))
        return (), failures


# ---------------------------------------------------------------------------------------------------------------
# Epoch plan: order, shards, batch counts, random generators

_ORDER, _SAMPLE, _BATCH = 0, 1, 2  # separate random streams per purpose


def _generator(seed, epoch, purpose, index=0):
    return np.random.default_rng([seed, epoch, purpose, index])


def epoch_order(num_samples, seed, epoch):
    """The epoch's permutation of sample indices, the same on every rank."""
    return _generator(seed, epoch, _ORDER).permutation(num_samples)


def num_train_batches(num_samples, batch_size, world_size=1):
    """Full batches each rank yields per epoch: ceil(num_samples / world_size) // batch_size."""
    return math.ceil(num_samples / world_size) // batch_size


def num_eval_batches(num_samples, batch_size, world_size=1):
    """Batches each rank yields for evaluation: ceil(ceil(num_samples / world_size) / batch_size)."""
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def train_positions(num_samples, batch_size, rank=0, world_size=1):
    """Positions in the epoch's (wrapped) order that `rank` takes, in yield order: rank + k * world_size for
    every k that fills a batch. Sample index = epoch_order(...)[position % num_samples]."""
    count = num_train_batches(num_samples, batch_size, world_size) * batch_size
    return np.arange(count, dtype=np.int64) * world_size + rank


# ---------------------------------------------------------------------------------------------------------------
# Settings: what the batches read from the config, every key of it (the defaults are in config.OPTIONS only)

@dataclass(frozen=True)
class TrainSettings:
    batch_size: int             # per rank
    seed: int
    num_parallel_workers: int   # processes building batches; 0 or 1 builds them in this process
    augment: AugmentSettings    # image_resize and the recipe's augmentations

    @classmethod
    def from_config(cls, config):
        settings = cls(**config_values(config, ["batch_size", "seed", "num_parallel_workers"]),
                       augment=AugmentSettings.from_config(config))
        problems = []
        if settings.batch_size < 1:
            problems.append(f"batch_size={settings.batch_size} must be >= 1")
        if settings.seed < 0:
            problems.append(f"seed={settings.seed} must be >= 0")
        if problems:
            raise DataError("bad data settings: " + "; ".join(problems))
        return settings


@dataclass(frozen=True)
class EvalSettings:
    batch_size: int             # per rank
    image_resize: int           # centre crop size
    crop_pct: float             # the shorter side is resized to image_resize / crop_pct first
    interpolation: str
    mean: tuple                 # normalization, RGB in [0, 1] units
    std: tuple
    eval_resize: str            # crop, warp, or auto (warp at image_resize >= 384): see warps_at_eval
    num_parallel_workers: int

    @classmethod
    def from_config(cls, config):
        settings = cls(**config_values(config, [field.name for field in fields(cls)]))
        resample_filter(settings.interpolation)  # an unknown name fails now, not in the first batch
        return settings


@dataclass
class DataStats:
    """Files that did not decode. Pass one object for the whole run: `skipped` counts training samples that
    were replaced and eval images left out (read and reset it for each epoch's summary); `bad_files` maps
    every bad file met to its error, so each is logged once per run."""
    skipped: int = 0
    bad_files: dict = field(default_factory=dict)

    def record(self, failures):
        for path, error, counted in failures:
            self.skipped += counted
            if path not in self.bad_files:
                self.bad_files[path] = error
                log.warning("skipping a file that does not decode: %s", error)


# ---------------------------------------------------------------------------------------------------------------
# Batch builders, the jobs of workers.map_in_workers: picklable descriptions of one epoch whose build(batch_index)
# is a pure function returning (arrays shaped as array_specs(), failures)

@dataclass
class _TrainEpoch:
    samples: list
    order: np.ndarray
    num_classes: int
    settings: TrainSettings
    epoch: int
    rank: int
    world_size: int
    known_bad: dict = field(default_factory=dict)  # per process cache, only saves re-decoding

    def __post_init__(self):
        self.rand_augment = self.settings.augment.rand_augment()
        self.positions = train_positions(len(self.samples), self.settings.batch_size, self.rank, self.world_size)

    def array_specs(self):
        size, batch_size = self.settings.augment.image_resize, self.settings.batch_size
        return [((batch_size, 3, size, size), np.float32), ((batch_size, self.num_classes), np.float32)]

    def build(self, batch_index):
        settings, size = self.settings, self.settings.augment.image_resize
        images = np.empty((settings.batch_size, 3, size, size), np.float32)
        labels = np.empty(settings.batch_size, np.int64)
        failures = []
        for row in range(settings.batch_size):
            position = int(self.positions[batch_index * settings.batch_size + row])
            image, labels[row] = self._load_at(position, failures)
            rng = _generator(settings.seed, self.epoch, _SAMPLE, position)
            images[row] = train_transform(image, rng, settings.augment, self.rand_augment)
        batch_rng = _generator(settings.seed, self.epoch, _BATCH, batch_index * self.world_size + self.rank)
        return mix_batch(images, labels, self.num_classes, batch_rng, settings.augment), failures

    def _load_at(self, position, failures):
        """The sample at `position`, or the first one after it in the epoch's order that decodes. Only the
        position's own file counts as skipped; later candidates are counted at their own positions."""
        num_samples = len(self.order)
        for step in range(num_samples):
            path, label = self.samples[self.order[(position + step) % num_samples]]
            if path not in self.known_bad:
                try:
                    return load_rgb(path), label
                except DataError as error:
                    self.known_bad[path] = str(error)
            failures.append((path, self.known_bad[path], step == 0))
        raise DataError(f"none of the {num_samples} training images decodes; first error: {failures[0][1]}")


@dataclass
class _EvalShard:
    samples: list
    settings: EvalSettings

    def array_specs(self):
        size, batch_size = self.settings.image_resize, self.settings.batch_size
        return [((batch_size, 3, size, size), np.float32), ((batch_size,), np.int32), ((batch_size,), np.float32)]

    def build(self, batch_index):
        settings, size, batch_size = self.settings, self.settings.image_resize, self.settings.batch_size
        images = np.zeros((batch_size, 3, size, size), np.float32)
        labels = np.zeros(batch_size, np.int32)
        valid = np.zeros(batch_size, np.float32)
        failures = []
        for row, (path, label) in enumerate(self.samples[batch_index * batch_size:(batch_index + 1) * batch_size]):
            labels[row] = label
            try:
                image = load_rgb(path)
            except DataError as error:
                failures.append((path, str(error), True))
                continue
            images[row] = eval_transform(image, size, settings.crop_pct, settings.interpolation, settings.mean,
                                         settings.std, warps_at_eval(settings))
            valid[row] = 1.0
        return (images, labels, valid), failures


# ---------------------------------------------------------------------------------------------------------------
# The public generators

def train_batches(samples, num_classes, config, epoch, rank=0, world_size=1, start_batch=0, stats=None):
    """Yield `(images, targets)` for batches start_batch.. of `rank`'s shard of `epoch`.

    images: float32 (batch_size, 3, image_resize, image_resize), normalized; targets: float32
    (batch_size, num_classes) soft labels that already contain mixup/cutmix and label smoothing (use a plain
    soft-target cross-entropy). `config` is the run's config (it must hold every key TrainSettings reads).
    Bad files are replaced and counted in `stats` (a DataStats) when given."""
    settings = TrainSettings.from_config(config)
    stats = stats if stats is not None else DataStats()
    num_batches = num_train_batches(len(samples), settings.batch_size, world_size)
    if num_batches == 0:
        raise DataError(f"{len(samples)} training images over {world_size} rank(s) do not fill one batch of "
                        f"{settings.batch_size}")
    if not 0 <= start_batch <= num_batches:
        raise DataError(f"start_batch={start_batch} is outside the epoch's {num_batches} batches")
    if not 0 <= rank < world_size:
        raise DataError(f"rank={rank} is not in [0, world_size={world_size})")
    job = _TrainEpoch(list(samples), epoch_order(len(samples), settings.seed, epoch), num_classes, settings,
                      epoch, rank, world_size)
    return _recorded(map_in_workers(job, range(start_batch, num_batches), settings.num_parallel_workers), stats)


def eval_batches(samples, config, rank=0, world_size=1, stats=None):
    """Yield `(images, labels, valid)` for `rank`'s share of `samples` (samples[rank::world_size], in order).

    Every rank yields num_eval_batches(...) full-size batches: slots past the end of the shard and images
    that do not decode have valid=0 (zeros image, label 0), so each decodable image counts exactly once
    across ranks. `config` holds at least the keys EvalSettings reads."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank={rank} is not in [0, world_size={world_size})")
    settings = EvalSettings.from_config(config)
    num_batches = num_eval_batches(len(samples), settings.batch_size, world_size)
    job = _EvalShard(list(samples)[rank::world_size], settings)
    stats = stats if stats is not None else DataStats()
    return _recorded(map_in_workers(job, range(num_batches), settings.num_parallel_workers), stats)


def warps_at_eval(settings):
    """Whether evaluation resizes the whole image to a square (the official datasets.py at image_resize >= 384)
    instead of resizing its shorter side and cropping the centre."""
    return settings.eval_resize == "warp" or (settings.eval_resize == "auto" and settings.image_resize >= 384)


def _recorded(batches, stats):
    """The batches without their list of failures, which go to `stats`."""
    try:
        for arrays, failures in batches:
            stats.record(failures)
            yield arrays
    finally:
        batches.close()  # stops the workers now, also when the consumer stops early or raises
