"""A small generated image classification set, so the demo trains on a fresh machine without downloads.

    python -m replknet_fn.demo_data OUT_DIR [--train_per_class 200] [--val_per_class 50] [--image_size 64]

Eight classes told apart by shape (circle, square, triangle, ring, cross) or by texture (stripes, checker,
dots, each filling a disk or a rotated square) at random position, size, rotation and colours, over varied
backgrounds (flat, gradient, smooth noise, pixel noise). JPEG files in the ImageNet layout
OUT_DIR/{train,val}/<class>/<n>.jpg. Every image comes from its own generator seeded by (seed, split, class,
n), so the set is the same on every machine with the same Pillow.
"""
import argparse
import json
import logging
import math
import os
import shutil
import time

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

CLASS_NAMES = ("checker", "circle", "cross", "dots", "ring", "square", "stripes", "triangle")
MARKER = "DEMO_DATASET_COMPLETE.json"  # written last: a folder without it was never finished
_SUPERSAMPLE = 2  # shapes are drawn at twice the size, then downsampled, for anti-aliased edges
_JPEG_QUALITY = 90


def ensure_demo_dataset(root, num_train_per_class=200, num_val_per_class=50, image_size=64, seed=0):
    """Generate the demo set in `root` unless a finished one with these settings is there; return `root`.

    The set is written to a temporary folder beside `root` and renamed into place, so an interrupted run
    leaves no `root` behind, and concurrent callers (several ranks) end with one complete copy."""
    settings = {"num_train_per_class": num_train_per_class, "num_val_per_class": num_val_per_class,
                "image_size": image_size, "seed": seed, "classes": list(CLASS_NAMES)}
    root = os.path.abspath(root)
    if _finished_with(root, settings):
        return root
    if os.path.exists(root) and not os.path.exists(os.path.join(root, MARKER)) and os.listdir(root):
        raise FileExistsError(f"{root} exists and is not a generated demo dataset (no {MARKER}); "
                              f"choose another directory for the demo data")
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    _remove_abandoned_temporaries(root)
    temporary = os.path.join(parent, f".{os.path.basename(root)}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    start = time.time()
    try:
        counts = {"train": num_train_per_class, "val": num_val_per_class}
        for split_index, split in enumerate(("train", "val")):
            for class_index, class_name in enumerate(CLASS_NAMES):
                folder = os.path.join(temporary, split, class_name)
                os.makedirs(folder)
                for number in range(counts[split]):
                    rng = np.random.default_rng([seed, split_index, class_index, number])
                    image = draw_demo_image(class_name, rng, image_size)
                    image.save(os.path.join(folder, f"{number:05d}.jpg"), quality=_JPEG_QUALITY)
        with open(os.path.join(temporary, MARKER), "w") as marker:
            json.dump(settings, marker, indent=1)
        _move_into_place(temporary, root, settings)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    log.info("generated the demo dataset in %s (%d classes, %d train and %d val images each) in %.1f s", root,
             len(CLASS_NAMES), num_train_per_class, num_val_per_class, time.time() - start)
    return root


def _finished_with(root, settings):
    try:
        with open(os.path.join(root, MARKER)) as marker:
            return json.load(marker) == settings
    except (OSError, ValueError):
        return False


def _move_into_place(temporary, root, settings):
    if os.path.exists(root):
        if _finished_with(root, settings):
            return  # another process finished first; its copy is identical
        # An empty folder, or our own demo set made with other settings: replace it.
        old = f"{temporary}-old"
        os.rename(root, old)
        shutil.rmtree(old)
    try:
        os.rename(temporary, root)
    except OSError:
        if not _finished_with(root, settings):  # lost a race only if the winner finished
            raise


def _remove_abandoned_temporaries(root):
    parent, prefix = os.path.dirname(root), f".{os.path.basename(root)}.tmp-"
    for name in os.listdir(parent):
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------------------------
# Drawing

def draw_demo_image(class_name, rng, image_size=64):
    """One RGB image of `class_name`, every random choice from `rng`."""
    size = image_size * _SUPERSAMPLE
    background = _background(rng, size)
    foreground_color = _contrasting_color(rng, background.reshape(-1, 3).mean(axis=0))
    mask = _class_mask(class_name, rng, size)[..., None]
    shading = rng.normal(0.0, 6.0, (size, size, 1))  # the object is not perfectly flat either
    pixels = background * (1.0 - mask) + (foreground_color + shading) * mask
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    return image.resize((image_size, image_size), Image.LANCZOS)


def _random_color(rng):
    return rng.uniform(0, 255, 3)


def _contrasting_color(rng, against):
    for _ in range(20):
        color = _random_color(rng)
        if np.abs(color - against).mean() > 90:
            return color
    return 255.0 - against


def _background(rng, size):
    kind = rng.integers(0, 4)
    if kind == 0:  # flat
        return np.broadcast_to(_random_color(rng), (size, size, 3)).astype(np.float64)
    if kind == 1:  # linear gradient in a random direction
        angle = rng.uniform(0, 2 * math.pi)
        y, x = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
        t = np.clip((x * math.cos(angle) + y * math.sin(angle)) + 0.5, 0, 1)[..., None]
        return _random_color(rng) * (1 - t) + _random_color(rng) * t
    if kind == 2:  # smooth colour noise, at half contrast so that its blobs are weaker than the object
        cells = int(rng.integers(2, 5))
        coarse = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
        blobs = np.asarray(Image.fromarray(coarse, "RGB").resize((size, size), Image.BICUBIC), np.float64)
        return 0.5 * blobs + 0.5 * _random_color(rng)
    base = _random_color(rng)  # a colour with pixel noise
    return base + rng.normal(0, rng.uniform(8, 25), (size, size, 3))


def _class_mask(class_name, rng, size):
    """Float mask in [0, 1] of the object, (size, size)."""
    # Central enough that a random resized crop of a third of the area still shows most of the object.
    radius = rng.uniform(0.22, 0.36) * size
    center = rng.uniform(0.32 * size, 0.68 * size, 2)
    angle = rng.uniform(0, 2 * math.pi)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if class_name == "circle":
        draw.ellipse(_box(center, radius), fill=255)
    elif class_name == "ring":
        draw.ellipse(_box(center, radius), fill=255)
        draw.ellipse(_box(center, radius * rng.uniform(0.5, 0.7)), fill=0)
    elif class_name == "square":
        draw.polygon(_regular_polygon(center, radius, 4, angle), fill=255)
    elif class_name == "triangle":
        draw.polygon(_regular_polygon(center, radius * 1.15, 3, angle), fill=255)
    elif class_name == "cross":
        half_width = radius * rng.uniform(0.15, 0.25)
        for arm_angle in (angle, angle + math.pi / 2):
            draw.polygon(_rotated_rectangle(center, radius, half_width, arm_angle), fill=255)
    elif class_name in ("stripes", "checker", "dots"):
        if rng.random() < 0.5:
            draw.ellipse(_box(center, radius * 1.1), fill=255)
        else:
            draw.polygon(_regular_polygon(center, radius * 1.2, 4, angle), fill=255)
        return np.asarray(mask, np.float64) / 255.0 * _texture(class_name, rng, size, angle, radius)
    else:
        raise ValueError(f"unknown demo class {class_name!r}; classes: {CLASS_NAMES}")
    return np.asarray(mask, np.float64) / 255.0


def _texture(class_name, rng, size, angle, radius):
    period = radius * rng.uniform(0.35, 0.6)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    u = (x * math.cos(angle) + y * math.sin(angle)) / period
    v = (-x * math.sin(angle) + y * math.cos(angle)) / period
    if class_name == "stripes":
        return (np.mod(u, 1.0) < 0.5).astype(np.float64)
    if class_name == "checker":
        return (np.mod(np.floor(u) + np.floor(v), 2) == 0).astype(np.float64)
    distance = np.hypot(np.mod(u, 1.0) - 0.5, np.mod(v, 1.0) - 0.5)  # dots on a rotated grid
    return (distance < 0.28).astype(np.float64)


def _box(center, radius):
    return [center[0] - radius, center[1] - radius, center[0] + radius, center[1] + radius]


def _regular_polygon(center, radius, sides, angle):
    return [(center[0] + radius * math.cos(angle + 2 * math.pi * k / sides),
             center[1] + radius * math.sin(angle + 2 * math.pi * k / sides)) for k in range(sides)]


def _rotated_rectangle(center, half_length, half_width, angle):
    cos, sin = math.cos(angle), math.sin(angle)
    corners = [(half_length, half_width), (-half_length, half_width), (-half_length, -half_width),
               (half_length, -half_width)]
    return [(center[0] + a * cos - b * sin, center[1] + a * sin + b * cos) for a, b in corners]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--train_per_class", type=int, default=200)
    parser.add_argument("--val_per_class", type=int, default=50)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = ensure_demo_dataset(args.out_dir, args.train_per_class, args.val_per_class, args.image_size, args.seed)
    print(root)


if __name__ == "__main__":
    main()
