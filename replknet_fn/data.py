"""Image folders to numpy batches: listing, decoding, timm's ImageNet augmentation, sharding, parallel loading.

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
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from replknet_fn.workers import map_in_workers

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
                  "lanczos": Image.LANCZOS}


class DataError(ValueError):
    """A dataset, file or data setting that cannot be used; the message names it."""


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


def find_splits(data_dir):
    """(train_samples, val_samples, class_names) of `data_dir/train` and `data_dir/val`.

    Raises DataError for a missing folder, a split without images, or class folders that differ between
    train and val (labels would silently mean different classes). An empty class folder only warns."""
    layout = f"expected {os.path.join(data_dir, 'train', '<class>', '<image>')} and the same under val/"
    if not os.path.isdir(data_dir):
        raise DataError(f"data_dir {data_dir!r} does not exist or is not a directory ({layout})")
    splits = {}
    for split in ("train", "val"):
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
        splits[split] = samples, class_names
    (train, train_classes), (val, val_classes) = splits["train"], splits["val"]
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(f"class folders differ between train/ and val/ in {data_dir!r}: "
                        f"only in train/: {only_train}; only in val/: {only_val}")
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
# Per-image transforms (PIL in, PIL or CHW float32 out; randomness only from the `rng` argument)

def random_resized_crop(image, rng, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=Image.BICUBIC):
    """torchvision's RandomResizedCrop: 10 tries at an area fraction in `scale` and a log-uniform aspect ratio
    in `ratio`, else a centre crop clamped to `ratio`; then crop and resize to size x size."""
    width, height = image.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
        crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            break
    else:
        in_ratio = width / height
        if in_ratio < min(ratio):
            crop_width, crop_height = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            crop_width, crop_height = int(round(height * max(ratio))), height
        else:
            crop_width, crop_height = width, height
        top, left = (height - crop_height) // 2, (width - crop_width) // 2
    crop = image.crop((left, top, left + crop_width, top + crop_height))
    return crop.resize((size, size), interpolation)


def color_jitter(image, rng, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0):
    """torchvision's ColorJitter on a PIL image: each enabled adjustment once, in a random order, with a factor
    uniform in [max(0, 1 - s), 1 + s] (hue: a shift uniform in [-hue, hue] of a full turn)."""
    order = rng.permutation(4)
    factors = [rng.uniform(max(0.0, 1 - s), 1 + s) if s else None for s in (brightness, contrast, saturation)]
    factors.append(rng.uniform(-hue, hue) if hue else None)
    for op in order:
        factor = factors[op]
        if factor is None:
            continue
        if op == 0:
            image = ImageEnhance.Brightness(image).enhance(factor)
        elif op == 1:
            image = ImageEnhance.Contrast(image).enhance(factor)
        elif op == 2:
            image = ImageEnhance.Color(image).enhance(factor)
        else:
            hue_channel, saturation_channel, value_channel = image.convert("HSV").split()
            shifted = (np.asarray(hue_channel, dtype=np.int16) + int(round(factor * 255))) % 256
            hue_channel = Image.fromarray(shifted.astype(np.uint8), "L")
            image = Image.merge("HSV", (hue_channel, saturation_channel, value_channel)).convert("RGB")
    return image


def normalize(image):
    """RGB PIL image -> float32 CHW array, (x / 255 - mean) / std with ImageNet's mean and std."""
    pixels = np.asarray(image, dtype=np.float32)
    scale = np.float32(1 / 255) / np.asarray(IMAGENET_STD, np.float32)
    shift = np.asarray(IMAGENET_MEAN, np.float32) / np.asarray(IMAGENET_STD, np.float32)
    return np.ascontiguousarray((pixels * scale - shift).transpose(2, 0, 1))


def random_erasing(chw, rng, probability, min_area=0.02, max_area=1 / 3, min_aspect=0.3):
    """timm's RandomErasing, mode 'pixel', one box: with `probability`, up to 10 tries to place a box of area
    fraction uniform in [min_area, max_area] and log-uniform aspect in [min_aspect, 1/min_aspect]; the box
    is filled with per-pixel standard normal noise in the normalized space. Edits `chw` in place."""
    if rng.random() >= probability:
        return chw
    channels, height, width = chw.shape
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(10):
        target_area = rng.uniform(min_area, max_area) * height * width
        aspect_ratio = math.exp(rng.uniform(*log_aspect))
        box_height = int(round(math.sqrt(target_area * aspect_ratio)))
        box_width = int(round(math.sqrt(target_area / aspect_ratio)))
        if box_width < width and box_height < height:
            top = int(rng.integers(0, height - box_height + 1))
            left = int(rng.integers(0, width - box_width + 1))
            noise = rng.standard_normal((channels, box_height, box_width), dtype=np.float32)
            chw[:, top:top + box_height, left:left + box_width] = noise
            break
    return chw


def eval_transform(image, image_resize=224, crop_pct=0.875, interpolation="bicubic"):
    """timm's eval transform: resize the shorter side to floor(image_resize / crop_pct), centre crop
    image_resize x image_resize, normalize. PIL RGB image -> float32 CHW array."""
    resample = _interpolation(interpolation)
    scale_size = int(math.floor(image_resize / crop_pct))
    width, height = image.size
    if width <= height:
        new_size = (scale_size, int(scale_size * height / width))
    else:
        new_size = (int(scale_size * width / height), scale_size)
    if new_size != image.size:
        image = image.resize(new_size, resample)
    width, height = image.size
    top = int(round((height - image_resize) / 2.0))
    left = int(round((width - image_resize) / 2.0))
    return normalize(image.crop((left, top, left + image_resize, top + image_resize)))


def _interpolation(name):
    if name not in INTERPOLATIONS:
        raise DataError(f"interpolation {name!r} is not one of {sorted(INTERPOLATIONS)}")
    return INTERPOLATIONS[name]


# ---------------------------------------------------------------------------------------------------------------
# RandAugment, as timm's rand_augment_transform (timm/data/auto_augment.py), on PIL images

# Magnitudes are out of 10 (timm's _LEVEL_DENOM); each op's argument range at magnitude 10 is in _op_argument.
RAND_AUGMENT_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
                    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
                    "TranslateYRel")
# '-inc1': the variants whose strength grows with the magnitude
RAND_AUGMENT_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                               "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                               "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
                               "TranslateXRel", "TranslateYRel")
# '-w0': timm's experimental op choice weights
RAND_AUGMENT_WEIGHTS = {"Rotate": 0.3, "ShearX": 0.2, "ShearY": 0.2, "TranslateXRel": 0.1, "TranslateYRel": 0.1,
                        "Color": .025, "Sharpness": 0.025, "AutoContrast": 0.025, "Solarize": .005,
                        "SolarizeAdd": .005, "Contrast": .005, "Brightness": .005, "Equalize": .005,
                        "Posterize": 0, "Invert": 0}
# timm fills uncovered pixels of geometric ops with the ImageNet mean colour
IMAGENET_MEAN_RGB = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)


@dataclass(frozen=True)
class RandAugment:
    """`num_layers` ops drawn uniformly with replacement (without, when weighted), each applied with
    probability `op_prob` at a magnitude drawn from N(magnitude, magnitude_std) clipped to
    [0, magnitude_max] (uniform in [0, magnitude] when magnitude_std is inf)."""
    magnitude: float = 10.0
    num_layers: int = 2
    magnitude_std: float = 0.0
    magnitude_max: float = 10.0
    ops: tuple = RAND_AUGMENT_OPS
    op_weights: tuple = None
    op_prob: float = 0.5
    fill: tuple = IMAGENET_MEAN_RGB
    interpolation: int = Image.BICUBIC

    def sample_magnitude(self, rng):
        magnitude = self.magnitude
        if self.magnitude_std == float("inf"):
            magnitude = rng.uniform(0, magnitude)
        elif self.magnitude_std > 0:
            magnitude = rng.normal(magnitude, self.magnitude_std)
        return min(max(0.0, magnitude), self.magnitude_max)

    def __call__(self, image, rng):
        if self.op_weights is None:
            chosen = rng.integers(0, len(self.ops), size=self.num_layers)
        else:
            chosen = rng.choice(len(self.ops), size=self.num_layers, replace=False, p=self.op_weights)
        for index in chosen:
            if self.op_prob < 1.0 and rng.random() > self.op_prob:
                continue
            name = self.ops[index]
            image = apply_augment_op(image, name, _op_argument(name, self.sample_magnitude(rng), rng),
                                     self.fill, self.interpolation)
        return image


def parse_rand_augment(config_str, interpolation="bicubic", fill=IMAGENET_MEAN_RGB):
    """RandAugment from timm's string 'rand-m9-mstd0.5' (mindcv spells it 'randaug-...'). Sections: m
    magnitude (default 10), n layers (2), mstd magnitude noise std (0; > 100 means uniform), mmax magnitude
    upper bound (10), inc1 increasing-strength ops, w0 timm's op weights, p op probability (0.5)."""
    name, *sections = config_str.split("-")
    if name not in ("rand", "randaug"):
        raise DataError(f"auto_augment {config_str!r}: only RandAugment strings ('randaug-m9-mstd0.5' or timm's "
                        f"'rand-m9-mstd0.5') are supported")
    options = {"ops": RAND_AUGMENT_OPS, "interpolation": _interpolation(interpolation), "fill": tuple(fill)}
    weighted = False
    for section in sections:
        match = re.fullmatch(r"(m|n|mstd|mmax|inc|w|p)([0-9]+\.?[0-9]*)", section)
        if match is None:
            raise DataError(f"auto_augment {config_str!r}: unknown section {section!r}; valid: m<magnitude>, "
                            f"n<layers>, mstd<std>, mmax<max>, inc<0|1>, w<0>, p<prob>")
        key, value = match.group(1), float(match.group(2))
        if key == "m":
            options["magnitude"] = value
        elif key == "n":
            options["num_layers"] = int(value)
        elif key == "mstd":
            options["magnitude_std"] = float("inf") if value > 100 else value
        elif key == "mmax":
            options["magnitude_max"] = value
        elif key == "inc" and value:
            options["ops"] = RAND_AUGMENT_INCREASING_OPS
        elif key == "w":
            weighted = True
        elif key == "p":
            options["op_prob"] = value
    if weighted:  # timm: the weights are defined for the plain op list only
        weights = np.asarray([RAND_AUGMENT_WEIGHTS[op] for op in RAND_AUGMENT_OPS])
        options["ops"] = RAND_AUGMENT_OPS
        options["op_weights"] = tuple(weights / weights.sum())
    return RandAugment(**options)


def _op_argument(name, magnitude, rng):
    """timm's level-to-argument mapping of one op at `magnitude` (out of 10); signed ops are negated with
    probability 0.5."""
    level = magnitude / 10.0

    def signed(value):
        return -value if rng.random() > 0.5 else value

    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name == "Rotate":
        return signed(level * 30.0)  # degrees
    if name in ("ShearX", "ShearY"):
        return signed(level * 0.3)
    if name in ("TranslateXRel", "TranslateYRel"):
        return signed(level * 0.45)  # fraction of the image size
    if name == "Posterize":
        return int(level * 4)  # bits kept: stronger at low magnitude, as TF's EfficientNet RandAugment
    if name == "PosterizeIncreasing":
        return 4 - int(level * 4)
    if name == "Solarize":
        return int(level * 256)  # threshold
    if name == "SolarizeIncreasing":
        return 256 - int(level * 256)
    if name == "SolarizeAdd":
        return int(level * 110)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return level * 1.8 + 0.1  # enhancement factor in [0.1, 1.9]
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        return max(0.1, 1.0 + signed(level * 0.9))
    raise DataError(f"unknown RandAugment op {name!r}")


def apply_augment_op(image, name, argument, fill=IMAGENET_MEAN_RGB, interpolation=Image.BICUBIC):
    """One RandAugment op on an RGB PIL image."""
    geometry = {"resample": interpolation, "fillcolor": fill}
    width, height = image.size
    if name == "AutoContrast":
        return ImageOps.autocontrast(image)
    if name == "Equalize":
        return ImageOps.equalize(image)
    if name == "Invert":
        return ImageOps.invert(image)
    if name == "Rotate":
        return image.rotate(argument, **geometry)
    if name.startswith("Posterize"):  # keep `argument` high bits; 0 bits is black (Pillow >= 10 refuses 0)
        keep = 0xFF & ~(2 ** (8 - argument) - 1) if argument < 8 else 0xFF
        return image.point([value & keep for value in range(256)] * len(image.getbands()))
    if name.startswith("Solarize") and name != "SolarizeAdd":
        return ImageOps.solarize(image, argument)
    if name == "SolarizeAdd":
        lut = [min(255, value + argument) if value < 128 else value for value in range(256)]
        return image.point(lut * len(image.getbands()))
    for prefix, enhancer in (("Color", ImageEnhance.Color), ("Contrast", ImageEnhance.Contrast),
                             ("Brightness", ImageEnhance.Brightness), ("Sharpness", ImageEnhance.Sharpness)):
        if name.startswith(prefix):
            return enhancer(image).enhance(argument)
    affine = {"ShearX": (1, argument, 0, 0, 1, 0), "ShearY": (1, 0, 0, argument, 1, 0),
              "TranslateXRel": (1, 0, argument * width, 0, 1, 0),
              "TranslateYRel": (1, 0, 0, 0, 1, argument * height)}
    if name in affine:
        return image.transform(image.size, Image.AFFINE, affine[name], **geometry)
    raise DataError(f"unknown RandAugment op {name!r}")


# ---------------------------------------------------------------------------------------------------------------
# Train settings: the recipe's keys, read once from the config

@dataclass(frozen=True)
class TrainSettings:
    """The config attributes the training data uses. Defaults are the RepLKNet ImageNet recipe (official
    repo's timm arguments: rand-m9-mstd0.5, reprob 0.25, mixup 0.8, cutmix 1.0, smoothing 0.1)."""
    batch_size: int = 64             # per rank
    image_resize: int = 224          # output crop size
    scale: tuple = (0.08, 1.0)       # RandomResizedCrop area fraction range
    ratio: tuple = (3 / 4, 4 / 3)    # RandomResizedCrop aspect ratio range
    interpolation: str = "bicubic"   # crop resize and RandAugment geometry
    hflip: float = 0.5               # horizontal flip probability
    auto_augment: str = "randaug-m9-mstd0.5"  # RandAugment string, or None/'' for none
    color_jitter: float = 0.4        # brightness=contrast=saturation strength; ignored with auto_augment (timm)
    re_prob: float = 0.25            # random erasing probability (timm 'pixel' mode)
    mixup: float = 0.8               # mixup Beta(alpha, alpha); 0 disables
    cutmix: float = 1.0              # cutmix Beta(alpha, alpha); 0 disables
    cutmix_prob: float = 1.0         # probability that a batch is mixed at all (timm's mixup_prob; mindcv's name)
    mixup_switch_prob: float = 0.5   # with both alphas > 0: probability a mixed batch uses cutmix, else mixup
    label_smoothing: float = 0.1     # folded into the soft targets
    seed: int = 0
    num_parallel_workers: int = 0    # processes building batches; 0 or 1 builds them in this process

    @classmethod
    def from_config(cls, config):
        values = {name: getattr(config, name) for name in cls.__dataclass_fields__ if hasattr(config, name)}
        for name in ("scale", "ratio"):
            if name in values:
                values[name] = tuple(float(value) for value in values[name])
        if isinstance(values.get("color_jitter"), list):
            values["color_jitter"] = tuple(values["color_jitter"])
        settings = cls(**values)
        settings.check()
        return settings

    def check(self):
        problems = []
        for name in ("hflip", "re_prob", "cutmix_prob", "mixup_switch_prob", "label_smoothing"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}={getattr(self, name)} is not in [0, 1]")
        for name in ("mixup", "cutmix"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be >= 0 (0 disables)")
        if self.batch_size < 1 or self.image_resize < 1:
            problems.append(f"batch_size={self.batch_size} and image_resize={self.image_resize} must be >= 1")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            problems.append(f"scale={self.scale} must be (min, max) with 0 < min <= max")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            problems.append(f"ratio={self.ratio} must be (min, max) with 0 < min <= max")
        if self.interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation={self.interpolation!r} is not one of {sorted(INTERPOLATIONS)}")
        if self.seed < 0:
            problems.append(f"seed={self.seed} must be >= 0")
        if problems:
            raise DataError("bad data settings: " + "; ".join(problems))
        self.rand_augment()  # raises for a bad auto_augment string

    def uses_rand_augment(self):
        return bool(self.auto_augment) and str(self.auto_augment).lower() != "none"

    def rand_augment(self):
        return parse_rand_augment(self.auto_augment, self.interpolation) if self.uses_rand_augment() else None

    def jitter_strengths(self):
        """(brightness, contrast, saturation, hue) for color_jitter, or None. timm applies colour jitter only
        without auto_augment (transforms_imagenet_train: `elif color_jitter is not None`), and so do we."""
        if self.uses_rand_augment() or not self.color_jitter:
            return None
        if isinstance(self.color_jitter, (tuple, list)):
            return tuple(self.color_jitter) + (0.0,) * (4 - len(self.color_jitter))
        return (float(self.color_jitter),) * 3 + (0.0,)


def train_transform(image, rng, settings, rand_augment=None):
    """One training image: random resized crop, flip, RandAugment (or colour jitter), normalize, random erasing.
    The order is timm's transforms_imagenet_train. PIL RGB image -> float32 CHW array."""
    image = random_resized_crop(image, rng, settings.image_resize, settings.scale, settings.ratio,
                                _interpolation(settings.interpolation))
    if settings.hflip > 0 and rng.random() < settings.hflip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    if rand_augment is not None:
        image = rand_augment(image, rng)
    else:
        jitter = settings.jitter_strengths()
        if jitter is not None:
            image = color_jitter(image, rng, *jitter)
    chw = normalize(image)
    if settings.re_prob > 0:
        chw = random_erasing(chw, rng, settings.re_prob)
    return chw


# ---------------------------------------------------------------------------------------------------------------
# Mixup and cutmix per batch, as timm's Mixup (mode 'batch', correct_lam=True): sample i is mixed with sample
# N-1-i (the batch flipped), and the targets are mixed with the same lambda.

def sample_mix(rng, mixup=0.8, cutmix=1.0, mix_prob=1.0, switch_prob=0.5):
    """(lam, use_cutmix) for one batch; lam == 1 means no mixing."""
    if (mixup <= 0 and cutmix <= 0) or rng.random() >= mix_prob:
        return 1.0, False
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < switch_prob)
    alpha = cutmix if use_cutmix else mixup
    return float(rng.beta(alpha, alpha)), use_cutmix


def cutmix_box(rng, height, width, lam):
    """((top, bottom, left, right), corrected lam): a box of side fractions sqrt(1 - lam) centred uniformly,
    clipped to the image; the returned lam is the uncovered fraction (timm's correct_lam)."""
    cut_ratio = math.sqrt(1.0 - lam)
    cut_height, cut_width = int(height * cut_ratio), int(width * cut_ratio)
    center_y, center_x = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = np.clip([center_y - cut_height // 2, center_y + cut_height // 2], 0, height)
    left, right = np.clip([center_x - cut_width // 2, center_x + cut_width // 2], 0, width)
    lam = 1.0 - (bottom - top) * (right - left) / float(height * width)
    return (int(top), int(bottom), int(left), int(right)), lam


def mix_images(images, lam, box=None):
    """Mixup (box None): lam * x + (1 - lam) * flip(x); cutmix: the box is copied from flip(x)."""
    flipped = images[::-1]
    if box is None:
        return (lam * images + (1.0 - lam) * flipped).astype(np.float32)
    top, bottom, left, right = box
    mixed = images.copy()
    mixed[:, :, top:bottom, left:right] = flipped[:, :, top:bottom, left:right]
    return mixed


def soft_targets(labels, num_classes, lam=1.0, smoothing=0.0):
    """lam * smooth(onehot(y)) + (1 - lam) * smooth(onehot(flip(y))), smoothing as timm's mixup_target:
    off = smoothing / num_classes, on = 1 - smoothing + off. Each row sums to 1."""
    off_value = smoothing / num_classes
    on_value = 1.0 - smoothing + off_value
    one_hot = np.full((len(labels), num_classes), off_value, np.float64)
    one_hot[np.arange(len(labels)), labels] = on_value
    return (lam * one_hot + (1.0 - lam) * one_hot[::-1]).astype(np.float32)


def mix_batch(images, labels, num_classes, rng, settings):
    """(images, soft targets) of one batch after timm's per-batch mixup/cutmix and label smoothing."""
    lam, use_cutmix = sample_mix(rng, settings.mixup, settings.cutmix, settings.cutmix_prob,
                                 settings.mixup_switch_prob)
    if lam < 1.0:
        box = None
        if use_cutmix:
            box, lam = cutmix_box(rng, images.shape[2], images.shape[3], lam)
        images = mix_images(images, lam, box)
    return images, soft_targets(labels, num_classes, lam, settings.label_smoothing)


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
# Batch builders: picklable descriptions of one epoch whose build(batch_index) is a pure function returning
# (arrays shaped as array_specs(), failures)

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
        self.rand_augment = self.settings.rand_augment()

    def array_specs(self):
        size, batch_size = self.settings.image_resize, self.settings.batch_size
        return [((batch_size, 3, size, size), np.float32), ((batch_size, self.num_classes), np.float32)]

    def build(self, batch_index):
        settings, size = self.settings, self.settings.image_resize
        images = np.empty((settings.batch_size, 3, size, size), np.float32)
        labels = np.empty(settings.batch_size, np.int64)
        failures = []
        for row in range(settings.batch_size):
            position = (batch_index * settings.batch_size + row) * self.world_size + self.rank  # train_positions
            image, labels[row] = self._load_at(position, failures)
            rng = _generator(settings.seed, self.epoch, _SAMPLE, position)
            images[row] = train_transform(image, rng, settings, self.rand_augment)
        batch_rng = _generator(settings.seed, self.epoch, _BATCH, batch_index * self.world_size + self.rank)
        return mix_batch(images, labels, self.num_classes, batch_rng, settings), failures

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
    batch_size: int
    image_resize: int
    crop_pct: float
    interpolation: str

    def array_specs(self):
        size = self.image_resize
        return [((self.batch_size, 3, size, size), np.float32), ((self.batch_size,), np.int32),
                ((self.batch_size,), np.float32)]

    def build(self, batch_index):
        size = self.image_resize
        images = np.zeros((self.batch_size, 3, size, size), np.float32)
        labels = np.zeros(self.batch_size, np.int32)
        valid = np.zeros(self.batch_size, np.float32)
        failures = []
        for row, (path, label) in enumerate(self.samples[batch_index * self.batch_size:
                                                         (batch_index + 1) * self.batch_size]):
            labels[row] = label
            try:
                image = load_rgb(path)
            except DataError as error:
                failures.append((path, str(error), True))
                continue
            images[row] = eval_transform(image, size, self.crop_pct, self.interpolation)
            valid[row] = 1.0
        return (images, labels, valid), failures


# ---------------------------------------------------------------------------------------------------------------
# The public generators

def train_batches(samples, num_classes, config, epoch, rank=0, world_size=1, start_batch=0, stats=None):
    """Yield `(images, targets)` for batches start_batch.. of `rank`'s shard of `epoch`.

    images: float32 (batch_size, 3, image_resize, image_resize), normalized; targets: float32
    (batch_size, num_classes) soft labels that already contain mixup/cutmix and label smoothing (use a plain
    soft-target cross-entropy). `config` is any object with the TrainSettings attributes. Bad files are
    replaced and counted in `stats` (a DataStats) when given."""
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
    across ranks. Uses config.batch_size, image_resize, crop_pct (default 0.875), interpolation,
    num_parallel_workers."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank={rank} is not in [0, world_size={world_size})")
    batch_size = config.batch_size
    num_batches = num_eval_batches(len(samples), batch_size, world_size)
    job = _EvalShard(list(samples)[rank::world_size], batch_size, config.image_resize,
                     getattr(config, "crop_pct", 0.875), getattr(config, "interpolation", "bicubic"))
    _interpolation(job.interpolation)
    workers = getattr(config, "num_parallel_workers", 0)
    stats = stats if stats is not None else DataStats()
    return _recorded(map_in_workers(job, range(num_batches), workers), stats)


def _recorded(batches, stats):
    """The batches without their list of failures, which go to `stats`."""
    try:
        for arrays, failures in batches:
            stats.record(failures)
            yield arrays
    finally:
        batches.close()  # stops the workers now, also when the consumer stops early or raises
