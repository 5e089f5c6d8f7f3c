"""The augmentations of the RepLKNet ImageNet recipe (timm's), as pure functions of a PIL image or a numpy batch
and a numpy Generator: RandomResizedCrop, flip, colour jitter, RandAugment, normalization, random erasing, the
evaluation resize and centre crop, per-batch mixup/cutmix with label smoothing. `train_transform` and `mix_batch`
apply them as the recipe does, from `AugmentSettings` (the recipe's config keys). Nothing here reads files or
picks seeds: data.py decides which generator each sample and batch gets. `DataError` (bad settings, bad files)
is defined here, where the data modules start, and data.py re-exports it.
"""
import math
import re
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from replknet_fn.config import INTERPOLATIONS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """A dataset, file or data setting that cannot be used; the message names it. (data.py, which raises it
    for files and folders, re-exports it: `data.DataError`.)"""


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


def normalize(image, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """RGB PIL image -> float32 CHW array, (x / 255 - mean) / std (mean and std per channel, in [0, 1] units)."""
    pixels = np.asarray(image).transpose(2, 0, 1)  # uint8, CHW: each channel's factor broadcasts over rows
    scale = np.float32(1 / 255) / np.asarray(std, np.float32)
    shift = np.asarray(mean, np.float32) / np.asarray(std, np.float32)
    chw = pixels.astype(np.float32, order="C")
    chw *= scale[:, None, None]  # in place, per channel: ~3.5x faster than a float HWC array times 3-vectors
    chw -= shift[:, None, None]
    return chw


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


def eval_transform(image, image_resize=224, crop_pct=0.875, interpolation="bicubic", mean=IMAGENET_MEAN,
                   std=IMAGENET_STD, warp=False):
    """The official eval transform (RepLKNet's datasets.py, timm's below 384): resize the shorter side to
    floor(image_resize / crop_pct) and centre crop image_resize x image_resize; or, with `warp` (the official
    rule at 384 and above), resize the whole image to image_resize x image_resize. Then normalize.
    PIL RGB image -> float32 CHW array."""
    resample = resample_filter(interpolation)
    if warp:
        if image.size != (image_resize, image_resize):
            image = image.resize((image_resize, image_resize), resample)
        return normalize(image, mean, std)
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
    return normalize(image.crop((left, top, left + image_resize, top + image_resize)), mean, std)


def resample_filter(name):
    """Pillow's resampling filter for an interpolation name of config.INTERPOLATIONS ('bicubic' -> BICUBIC)."""
    if name not in INTERPOLATIONS:
        raise DataError(f"interpolation {name!r} is not one of {sorted(INTERPOLATIONS)}")
    return getattr(Image, name.upper())


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
def mean_colour(mean):
    return tuple(min(255, round(255 * m)) for m in mean)


IMAGENET_MEAN_RGB = mean_colour(IMAGENET_MEAN)


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
    options = {"ops": RAND_AUGMENT_OPS, "interpolation": resample_filter(interpolation), "fill": tuple(fill)}
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
# The recipe's settings, read from the config

@dataclass(frozen=True)
class AugmentSettings:
    """The config keys the training augmentations read. Their defaults, the RepLKNet ImageNet recipe (the
    official repo's timm arguments: rand-m9-mstd0.5, reprob 0.25, mixup 0.8, cutmix 1.0, smoothing 0.1), are
    declared once, in config.OPTIONS; build the settings with `from_config`."""
    image_resize: int         # output crop size
    scale: tuple              # RandomResizedCrop area fraction range
    ratio: tuple              # RandomResizedCrop aspect ratio range
    interpolation: str        # crop resize and RandAugment geometry
    hflip: float              # horizontal flip probability
    auto_augment: str         # RandAugment string, or None/'' for none
    color_jitter: float       # brightness=contrast=saturation strength; ignored with auto_augment (timm)
    re_prob: float            # random erasing probability (timm 'pixel' mode)
    mixup: float              # mixup Beta(alpha, alpha); 0 disables
    cutmix: float             # cutmix Beta(alpha, alpha); 0 disables
    cutmix_prob: float        # probability that a batch is mixed at all (timm's mixup_prob; mindcv's name)
    mixup_switch_prob: float  # with both alphas > 0: probability a mixed batch uses cutmix, else mixup
    label_smoothing: float    # folded into the soft targets
    mean: tuple               # normalization, RGB in [0, 1] units
    std: tuple

    @classmethod
    def from_config(cls, config):
        values = config_values(config, [field.name for field in fields(cls)])
        for name in ("scale", "ratio", "mean", "std"):
            values[name] = tuple(float(value) for value in values[name])
        if isinstance(values["color_jitter"], list):
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
        if self.image_resize < 1:
            problems.append(f"image_resize={self.image_resize} must be >= 1")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            problems.append(f"scale={self.scale} must be (min, max) with 0 < min <= max")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            problems.append(f"ratio={self.ratio} must be (min, max) with 0 < min <= max")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            problems.append(f"mean={self.mean} and std={self.std} must be 3 values each (RGB), std > 0")
        if self.interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation={self.interpolation!r} is not one of {sorted(INTERPOLATIONS)}")
        if problems:
            raise DataError("bad data settings: " + "; ".join(problems))
        self.rand_augment()  # raises for a bad auto_augment string

    def uses_rand_augment(self):
        return bool(self.auto_augment) and str(self.auto_augment).lower() != "none"

    def rand_augment(self):
        if not self.uses_rand_augment():
            return None
        # timm fills the pixels that geometric ops uncover with the normalization mean as a colour.
        return parse_rand_augment(self.auto_augment, self.interpolation, mean_colour(self.mean))

    def jitter_strengths(self):
        """(brightness, contrast, saturation, hue) for color_jitter, or None. timm applies colour jitter only
        without auto_augment (transforms_imagenet_train: `elif color_jitter is not None`), and so do we."""
        if self.uses_rand_augment() or not self.color_jitter:
            return None
        if isinstance(self.color_jitter, (tuple, list)):
            return tuple(self.color_jitter) + (0.0,) * (4 - len(self.color_jitter))
        return (float(self.color_jitter),) * 3 + (0.0,)


def config_values(config, names):
    """{name: config.<name>} for each of `names`. The defaults live only in config.OPTIONS, so a config that
    lacks a key (one not built on config.DEFAULTS) is an error naming the keys, not silently filled in."""
    missing = [name for name in names if not hasattr(config, name)]
    if missing:
        raise DataError(f"the config has no {', '.join(missing)}; build it on replknet_fn.config.DEFAULTS, "
                        f"e.g. Config(DEFAULTS, batch_size=...)")
    return {name: getattr(config, name) for name in names}


def train_transform(image, rng, settings, rand_augment=None):
    """One training image: random resized crop, flip, RandAugment (or colour jitter), normalize, random erasing.
    The order is timm's transforms_imagenet_train. PIL RGB image -> float32 CHW array."""
    image = random_resized_crop(image, rng, settings.image_resize, settings.scale, settings.ratio,
                                resample_filter(settings.interpolation))
    if settings.hflip > 0 and rng.random() < settings.hflip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    if rand_augment is not None:
        image = rand_augment(image, rng)
    else:
        jitter = settings.jitter_strengths()
        if jitter is not None:
            image = color_jitter(image, rng, *jitter)
    chw = normalize(image, settings.mean, settings.std)
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
