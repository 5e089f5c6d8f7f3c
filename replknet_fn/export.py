"""Export the re-parameterized (deploy) RepLKNet to MindIR, and check the file against the checkpoint's network.

    python -m replknet_fn.export --ckpt_path CKPT [--model NAME] [--format MINDIR] [--image_resize 224]
                                 [--dynamic_batch] [--batch_size 1] [--num_classes N] [--fold_all] [--out PATH]

The checkpoint may be in training form (it is re-parameterized here) or already in deploy form (`lkb_reparam`
keys). The exported file is reloaded with `mindspore.load` + `nn.GraphCell` and its logits are compared with the
checkpoint network's eval logits on a random input; the export fails if they differ by more than 1e-5 relative.
"""
import argparse
import logging
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn

from replknet_fn import device
from replknet_fn.checkpoint import CheckpointError
from replknet_fn.config import add_flag, add_option, add_weights_options, parse_tool_args
from replknet_fn.reparam import reparameterize
from replknet_fn.runlog import setup_logging
from replknet_fn.weights import eval_preprocessing, network_from_checkpoint

log = logging.getLogger(__name__)
TOLERANCE = 1e-5
# Measured on MindSpore 2.8: the ONNX converter has no `Erf` operator, which the exact GELU of the ConvFFN needs
# (the official model's nonlinearity; the tanh approximation would change the logits), so only MindIR is offered.
ONNX_UNAVAILABLE = ("ONNX export is not available: MindSpore 2.8's ONNX converter cannot export the Erf operator "
                    "of the exact GELU in every ConvFFN; use --format MINDIR")
SUFFIXES = {"MINDIR": ".mindir"}


def deploy_network(net, fold_all=False):
    """The deploy form of `net` with native large-kernel convs (what an exported graph can hold)."""
    if getattr(net, "deploy_form", None) is None:
        return reparameterize(net, fold_all=fold_all, large_kernel_impl="native")
    if net.build_args["large_kernel_impl"] != "native":
        raise ValueError(f"deploy network uses large_kernel_impl={net.build_args['large_kernel_impl']!r}; "
                         "re-parameterize the training network with large_kernel_impl='native' to export it")
    return net


def export_input(image_size, batch_size=1, dynamic_batch=False, in_channels=3):
    if dynamic_batch:
        return ms.Tensor(shape=[None, in_channels, image_size, image_size], dtype=ms.float32)
    return ms.Tensor(np.zeros((batch_size, in_channels, image_size, image_size), np.float32))


def export_deploy(net, file_name, image_size=224, dynamic_batch=False, file_format="MINDIR", batch_size=1,
                  fold_all=False):
    """Re-parameterize `net` (unless it is already a deploy network) and export it; return the written path.

    With `dynamic_batch` the graph takes any batch size; otherwise `batch_size` images of `image_size`."""
    if file_format == "ONNX":
        raise ValueError(ONNX_UNAVAILABLE)
    if file_format not in SUFFIXES:
        raise ValueError(f"file_format {file_format!r}: choose one of {sorted(SUFFIXES)}")
    deploy = deploy_network(net, fold_all)
    deploy.set_train(False)
    path = str(file_name)
    if not path.endswith(SUFFIXES[file_format]):
        path += SUFFIXES[file_format]  # what mindspore.export appends
    inputs = export_input(image_size, batch_size, dynamic_batch, deploy.build_args["in_channels"])
    ms.export(deploy, inputs, file_name=path, file_format=file_format)
    return path


def relative_difference(actual, expected):
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), np.finfo(np.float32).tiny))


def verify_export(path, reference_net, image_size, batch_sizes=(1,), seed=0):
    """Worst relative logit difference between the exported file and `reference_net` (eval mode) on random
    inputs of each batch size."""
    graph = nn.GraphCell(ms.load(str(path)))
    reference_net.set_train(False)
    rng = np.random.default_rng(seed)
    worst = 0.0
    for batch_size in batch_sizes:
        shape = (batch_size, reference_net.build_args["in_channels"], image_size, image_size)
        x = ms.Tensor(rng.standard_normal(shape, dtype=np.float32))
        worst = max(worst, relative_difference(graph(x).asnumpy(), reference_net(x).asnumpy()))
    return worst


def default_output(ckpt, fold_all):
    return str(Path(ckpt).with_suffix("")) + ("_deploy_folded" if fold_all else "_deploy")


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m replknet_fn.export",
                                     description="Export the re-parameterized RepLKNet of a checkpoint.")
    add_weights_options(parser)
    parser.add_argument("--format", default="MINDIR", choices=["MINDIR", "ONNX"], type=str.upper)
    add_option(parser, "image_resize", help="input size (default: the checkpoint's, else the model's official one)")
    add_option(parser, "batch_size", default="1", help="fixed batch size (without --dynamic_batch)")
    add_flag(parser, "dynamic_batch", "export with a variable batch dimension")
    add_option(parser, "num_classes", help="default: the checkpoint's classifier size")
    add_flag(parser, "fold_all", "also fold every conv-BN, pre-BN and the head BN (reparameterize(fold_all=True))")
    parser.add_argument("--out", default=None, help="output path (default: next to the checkpoint)")
    add_option(parser, "device_target", default="auto")
    return parser


def main(argv=None):
    setup_logging()
    args = parse_tool_args(build_parser(), argv)
    if args.format == "ONNX":
        sys.exit(f"export: {ONNX_UNAVAILABLE}")
    try:
        device.apply_device_target(args.device_target)
        net, record = network_from_checkpoint(args.ckpt_path, args.model, use_ema=args.use_ema,
                                              num_classes=args.num_classes, large_kernel_impl="native")
    except (CheckpointError, device.DeviceError, ValueError, OSError) as error:
        sys.exit(f"export: {args.ckpt_path}: {error}")
    if getattr(net, "deploy_form", None) == "reparam" and args.fold_all:
        sys.exit("export: --fold_all needs a training-form checkpoint (this one is re-parameterized without it)")
    image_size = args.image_resize or eval_preprocessing(record, args.model)["image_resize"]
    path = export_deploy(net, args.out or default_output(args.ckpt_path, args.fold_all), image_size,
                         args.dynamic_batch, args.format, args.batch_size, args.fold_all)
    batch_sizes = (1, 3) if args.dynamic_batch else (args.batch_size,)
    difference = verify_export(path, net, image_size, batch_sizes)
    folded = args.fold_all or getattr(net, "deploy_form", None) == "folded"
    log.info("wrote %s: %s deploy form%s, input [%s, 3, %d, %d]", path, record.get("model", args.model),
             " (fully folded)" if folded else "", "N" if args.dynamic_batch else args.batch_size, image_size,
             image_size)
    log.info("reloaded logits vs checkpoint network (eval), batch sizes %s: max relative difference %.2e "
             "(tolerance %.0e)", list(batch_sizes), difference, TOLERANCE)


if __name__ == "__main__":
    main()
