"""Per-stage feature maps of a checkpoint's network: the backbone that detection and segmentation heads use.

    python -m replknet_fn.features --ckpt_path run/best.ckpt [--image_resize 224] [--out_indices 0 1 2 3]
    python -m replknet_fn.features --ckpt_path RepLKNet-31B_ImageNet-1K_UperNet_ADE20K.pth --model replknet31_base

Builds the network with `out_indices` (as the official segmentation/detection backbone: each chosen stage's
output through that stage's norm), runs one image-sized input and prints, per stage, the feature shape and
stride; `--json` prints one JSON object instead. Official segmentation and detection checkpoints (keys under
`backbone.`) load too: only their backbone is taken. From Python: `network_from_checkpoint(path,
out_indices=(0, 1, 2, 3))` returns the same backbone, whose call gives a tuple of feature maps.
"""
import argparse
import json
import logging
import sys

import mindspore as ms
import numpy as np

from replknet_fn import device
from replknet_fn.checkpoint import CheckpointError
from replknet_fn.config import add_flag, add_option, add_weights_options, parse_tool_args
from replknet_fn.runlog import setup_logging
from replknet_fn.weights import eval_preprocessing, network_from_checkpoint

log = logging.getLogger(__name__)


def stage_shapes(net, image_size, batch_size=1):
    """[(stage index, feature shape, stride)] of a network built with out_indices."""
    x = ms.Tensor(np.zeros((batch_size, 3, image_size, image_size), np.float32))
    outputs = net(x)
    return [(index, tuple(output.shape), image_size // output.shape[-1])
            for index, output in zip(net.out_indices, outputs)]


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m replknet_fn.features",
                                     description="Per-stage feature shapes of a checkpoint's backbone.")
    add_weights_options(parser)
    add_option(parser, "image_resize", help="input size (default: the checkpoint's, else the model's official one)")
    parser.add_argument("--out_indices", type=int, nargs="+", default=[0, 1, 2, 3], help="stages to output")
    add_option(parser, "device_target", default="auto")
    add_flag(parser, "json", "print one JSON object")
    return parser


def main(argv=None):
    setup_logging(stream="stderr")
    args = parse_tool_args(build_parser(), argv)
    try:
        device.apply_device_target(args.device_target)
        net, record = network_from_checkpoint(args.ckpt_path, args.model, use_ema=args.use_ema, num_classes=None,
                                              out_indices=list(args.out_indices), large_kernel_impl="native")
    except (CheckpointError, device.DeviceError, ValueError, OSError) as error:
        sys.exit(f"features: {error}")
    image_size = args.image_resize or eval_preprocessing(record, args.model)["image_resize"]
    shapes = stage_shapes(net, image_size)
    if args.json:
        print(json.dumps({"model": record.get("model", args.model), "image_size": image_size,
                          "stages": [{"index": index, "shape": list(shape), "stride": stride}
                                     for index, shape, stride in shapes]}))
        return shapes
    print(f"{record.get('model', args.model)} at {image_size}x{image_size}:")
    for index, shape, stride in shapes:
        print(f"  stage {index}: {list(shape)} (stride {stride})")
    return shapes


if __name__ == "__main__":
    main()
