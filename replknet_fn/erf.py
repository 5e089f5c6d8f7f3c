"""Effective receptive field (ERF) maps and high-contribution area ratios, by the official RepLKNet method.

    python -m replknet_fn.erf --model NAME [--ckpt_path CKPT] --data_dir VAL_DIR --num_images 50
                              --image_resize 1024 --out OUT [--compare MODEL2 [--ckpt2 CKPT2]]

Method of the official `erf/visualize_erf.py` and `erf/analyze_erf.py` (RepLKNet paper, Fig. 1 and Table 3):
each image is resized to image_resize x image_resize (bicubic) and normalized (ImageNet's mean and std, or what
the checkpoint was trained with; RepLKNet-XL: 0.5); the contribution score map is
the positive part of the gradient, with respect to the input, of the ReLU'd, channel-summed central point of the
last stage's feature map (before the final norm), summed over RGB; maps are averaged over images. For display and
for the area ratios the average is mapped through log10(x + 1) and divided by its maximum.

Writes OUT.npy (the averaged raw scores, as the official visualize_erf saves them; with --compare the second
model's go to OUT_compare.npy) and OUT.png (heat map with a colour bar; two panels with --compare).
"""
import argparse
import logging
import math
import sys
import time
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from PIL import Image, ImageDraw, ImageFont

from replknet_fn import device
from replknet_fn.checkpoint import CheckpointError
from replknet_fn.config import add_option, parse_tool_args
from replknet_fn.model import create_model
from replknet_fn.runlog import Progress, setup_logging
from replknet_fn.weights import eval_preprocessing, network_from_checkpoint

log = logging.getLogger(__name__)
THRESHOLDS = (0.2, 0.3, 0.5, 0.99)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


# ---- the contribution score map -------------------------------------------------------------------------------

def central_point_gradient_fn(features):
    """x -> d sum_c relu(features(x)[0, c, h//2, w//2]) / dx, as the official `get_input_grad`."""

    def central_point(x):
        out = features(x)
        return ops.relu(out[:, :, out.shape[2] // 2, out.shape[3] // 2]).sum()

    return ms.grad(central_point)


def erf_map(net, images, num_images=None, jit=True):
    """Average contribution score map (H, W) over `images` (an iterable of (3, H, W) arrays, all one size).

    `net` is a cell with `forward_features` (a RepLKNet: the last stage's output, before the final norm), any
    other cell, or a plain function of an NCHW tensor. An image whose map holds a NaN is skipped, as the official
    script does; with `num_images`, images are read until that many maps are averaged."""
    if isinstance(net, nn.Cell):
        net.set_train(False)
    grad_fn = central_point_gradient_fn(getattr(net, "forward_features", net))
    if jit:
        grad_fn = ms.jit(grad_fn)
    total, count = None, 0
    for image in images:
        grad = grad_fn(ms.Tensor(np.asarray(image, np.float32)[None])).asnumpy()
        scores = np.maximum(grad, 0).sum(axis=(0, 1), dtype=np.float64)
        if np.isnan(scores.sum()):
            log.warning("erf: NaN contribution scores, image skipped")
            continue
        total = scores if total is None else total + scores
        count += 1
        if count == num_images:
            break
    if count == 0:
        raise ValueError("no image gave a finite contribution score map")
    return total / count


def normalize_erf(raw):
    """log10(x + 1) rescaled to [0, 1] (official analyze_erf: the scores differ in magnitude across models)."""
    scaled = np.log10(np.asarray(raw, np.float64) + 1)
    peak = scaled.max()
    return scaled / peak if peak > 0 else scaled


def high_contribution_ratios(scores, thresholds=THRESHOLDS):
    """For each t: (t, side, area ratio) of the smallest square centred at (h//2, w//2) holding more than t of
    the map's total; (t, None, None) when even the largest centred square inside the map does not.

    The official analyze_erf (`get_rectangle`) applies this to the normalized map (`normalize_erf`), which is what
    the CLI passes. Unlike the official loop, which starts at side 3, side 1 (the centre alone) is tried too."""
    scores = np.asarray(scores, np.float64)
    h, w = scores.shape
    cy, cx = h // 2, w // 2
    largest = min(cy, h - 1 - cy, cx, w - 1 - cx)
    total = scores.sum()
    # The sum inside each centred square, from the centre outwards.
    inside = np.array([scores[cy - i:cy + i + 1, cx - i:cx + i + 1].sum() for i in range(largest + 1)])
    results = []
    for t in thresholds:
        hits = np.nonzero(inside / total > t)[0]
        if len(hits) == 0:
            results.append((t, None, None))
        else:
            side = 2 * int(hits[0]) + 1
            results.append((t, side, side / h * side / w))
    return results


def format_ratios(ratios):
    lines = []
    for t, side, area in ratios:
        found = f"side {side:4d}  area ratio {area:.4f}" if side is not None else "not reached inside the image"
        lines.append(f"  t={t:<4}  {found}")
    return "\n".join(lines)


# ---- images -----------------------------------------------------------------------------------------------------

def list_images(data_dir):
    """Image files of an ImageNet-style folder in torchvision ImageFolder order (classes sorted, files sorted),
    or of a flat folder of images."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir {data_dir} is not a directory")

    def images_in(folder):
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    classes = sorted(p for p in root.iterdir() if p.is_dir())
    files = [f for folder in classes for f in images_in(folder)] or images_in(root)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {data_dir} or its subfolders")
    return files


def load_image(path, image_size, mean, std):
    """The official ERF preprocessing: resize to image_size x image_size (bicubic), to [0, 1], normalize.
    Returns a (3, H, W) float32 array."""
    with Image.open(path) as image:
        image = image.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
    pixels = np.asarray(image, np.float32) / 255.0
    return ((pixels - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1)


def read_images(files, image_size, mean, std):
    """Yield preprocessed images; an unreadable file is reported by name and skipped."""
    for path in files:
        try:
            image = load_image(path, image_size, mean, std)
        except OSError as error:
            log.warning("erf: skipping %s: %s", path, error)
            continue
        yield image


def with_progress(items, total, label, every=None):
    """Yield `items`, logging how many were taken, the rate and the ETA (the first item, which also compiles the
    gradient, is left out of the rate)."""
    every = every or max(1, total // 20)
    progress = Progress(total)
    for done, item in enumerate(items):
        if done == 1:
            progress.restart(1)
        if done >= 2 and done % every == 0:
            log.info("%s: %d/%d images, %s", label, done, total, progress.update(done).describe("images"))
        yield item


# ---- the heat map -------------------------------------------------------------------------------------------

# viridis (matplotlib's default colour map) at ten evenly spaced points; interpolated linearly in between.
VIRIDIS_ANCHORS = np.array([
    (68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142),
    (31, 158, 137), (53, 183, 121), (109, 205, 89), (180, 222, 44), (253, 231, 37)], np.float64)
COLORMAP = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(VIRIDIS_ANCHORS)),
                               VIRIDIS_ANCHORS[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)

MIN_PANEL_SIZE = 256   # small maps are enlarged by an integer factor to at least this side
MARGIN = 10            # white border around everything
TITLE_HEIGHT = 20      # strip above each panel holding its title
PANEL_GAP = 10         # between two panels
COLORBAR_WIDTH = 70    # gap, bar and tick labels, right of the panels
BAR_GAP, BAR_THICKNESS = 10, 16


def colorize(values):
    """Values in [0, 1] -> RGB uint8 through the colour map."""
    index = np.clip(np.round(np.asarray(values) * 255), 0, 255).astype(np.int64)
    return COLORMAP[index]


def panel_scale(shape):
    return max(1, math.ceil(MIN_PANEL_SIZE / max(shape)))


def png_size(shape, num_panels):
    """(width, height) of the PNG `render_png` writes for `num_panels` maps of `shape`."""
    scale = panel_scale(shape)
    width = 2 * MARGIN + num_panels * shape[1] * scale + (num_panels - 1) * PANEL_GAP + COLORBAR_WIDTH
    return width, 2 * MARGIN + TITLE_HEIGHT + shape[0] * scale


def render_png(maps, path, titles=None):
    """Write normalized maps (values in [0, 1], all one shape) side by side as a heat map PNG, each under its
    title, with one colour bar (0 to 1, ticks every 0.25) on the right."""
    maps = [np.asarray(m, np.float64) for m in maps]
    shape = maps[0].shape
    if any(m.shape != shape for m in maps):
        raise ValueError(f"maps of different shapes {[m.shape for m in maps]} cannot share one figure")
    titles = titles or [""] * len(maps)
    scale = panel_scale(shape)
    canvas = Image.new("RGB", png_size(shape, len(maps)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    top = MARGIN + TITLE_HEIGHT
    left = MARGIN
    for values, title in zip(maps, titles):
        panel = Image.fromarray(colorize(values)).resize((shape[1] * scale, shape[0] * scale), Image.NEAREST)
        canvas.paste(panel, (left, top))
        draw.text((left, MARGIN), title, fill="black", font=font)
        left += shape[1] * scale + PANEL_GAP
    bar_left = left - PANEL_GAP + BAR_GAP
    bar_height = shape[0] * scale
    # Top of the bar is 1, bottom 0.
    ramp = colorize(np.linspace(1, 0, bar_height))[:, None, :].repeat(BAR_THICKNESS, axis=1)
    canvas.paste(Image.fromarray(ramp), (bar_left, top))
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = top + round((1 - tick) * (bar_height - 1))
        draw.line([(bar_left + BAR_THICKNESS, y), (bar_left + BAR_THICKNESS + 4, y)], fill="black")
        draw.text((bar_left + BAR_THICKNESS + 7, y - 6), f"{tick:.2f}", fill="black", font=font)
    canvas.save(path)
    return path


# ---- command line -------------------------------------------------------------------------------------------

def model_erf(name, ckpt, overrides, files, args):
    """(label, averaged raw scores) of one network: `name` with the weights of `ckpt`, or untrained."""
    if ckpt:
        net, record = network_from_checkpoint(ckpt, name, **overrides)
        name = record.get("model", name)
    else:
        net, record = create_model(name, drop_path_rate=0.0, **overrides), {}
        net.set_train(False)
    preprocessing = eval_preprocessing(record, name)
    label = name + "".join(f" {key}={value}" for key, value in overrides.items())
    log.info("%s: %s, %d images at %dx%d", label, "weights from " + ckpt if ckpt else "untrained (random init)",
             args.num_images, args.image_resize, args.image_resize)
    start = time.time()
    images = with_progress(read_images(files, args.image_resize, preprocessing["mean"], preprocessing["std"]),
                           args.num_images, f"erf {name}")
    raw = erf_map(net, images, args.num_images)
    log.info("erf %s: done in %.0f s", name, time.time() - start)
    ratios = high_contribution_ratios(normalize_erf(raw))
    log.info("%s: high-contribution area ratios (raw scores %.3g..%.3g)\n%s", label, raw.min(), raw.max(),
             format_ratios(ratios))
    return label, raw


def build_overrides(large_kernel_sizes, small_kernel):
    overrides = {}
    if large_kernel_sizes is not None:
        overrides["large_kernel_sizes"] = large_kernel_sizes
    if small_kernel is not None:
        overrides["small_kernel"] = None if small_kernel.lower() == "none" else int(small_kernel)
    return overrides


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m replknet_fn.erf",
                                     description="Effective receptive field of a RepLKNet (official method).")
    add_option(parser, "model", help="the model (for our checkpoints: default the checkpoint's)")
    add_option(parser, "ckpt_path", help="our checkpoint or official weights (default: untrained weights)")
    add_option(parser, "data_dir", required=True, help="folder of class subfolders, or a flat folder of images")
    parser.add_argument("--num_images", type=int, default=50)
    add_option(parser, "image_resize", default="1024", help="images are resized to this square (official: 1024)")
    parser.add_argument("--out", required=True, help="writes OUT.npy and OUT.png")
    parser.add_argument("--large_kernel_sizes", type=int, nargs="+", default=None,
                        help="override the model's kernels, e.g. 13 13 13 13 (the paper's RepLKNet-13)")
    parser.add_argument("--small_kernel", default=None, help="override the model's small kernel: an int, or none")
    parser.add_argument("--compare", default=None, help="a second model, drawn beside")
    parser.add_argument("--ckpt2", default=None, help="the second model's weights")
    parser.add_argument("--large_kernel_sizes2", type=int, nargs="+", default=None)
    parser.add_argument("--small_kernel2", default=None)
    add_option(parser, "device_target", default="auto")
    return parser


def main(argv=None):
    setup_logging()
    parser = build_parser()
    args = parse_tool_args(parser, argv)
    if args.num_images < 1:
        parser.error("--num_images must be at least 1")
    if not args.model and not args.ckpt_path:
        parser.error("give --model, --ckpt_path, or both")
    try:
        device.apply_device_target(args.device_target)
        files = list_images(args.data_dir)
        runs = [(args.model, args.ckpt_path, build_overrides(args.large_kernel_sizes, args.small_kernel))]
        if args.compare or args.ckpt2:
            runs.append((args.compare, args.ckpt2, build_overrides(args.large_kernel_sizes2, args.small_kernel2)))
        results = [model_erf(name, ckpt, overrides, files, args) for name, ckpt, overrides in runs]
    except (CheckpointError, device.DeviceError, ValueError, OSError) as error:
        sys.exit(f"erf: {error}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for (label, raw), suffix in zip(results, ("", "_compare")):
        np.save(f"{out}{suffix}.npy", raw)
    png = render_png([normalize_erf(raw) for _, raw in results], f"{out}.png", [label for label, _ in results])
    log.info("wrote %s.npy%s, %s", out, f" and {out}_compare.npy" if len(results) > 1 else "", png)


if __name__ == "__main__":
    main()
