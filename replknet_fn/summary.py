"""Parameters and multiply-accumulates of a RepLKNet, per part and in total.

    python -m replknet_fn.summary --model replknet31_base [--image_size 224] [--deploy]

MACs count convolutions and the classifier (as the paper's FLOPs column does); BN, activations and additions
are not counted. Parameters are the trainable ones (BN running statistics excluded, as PyTorch's
`parameters()` counts them).
"""
import argparse
import json

from mindspore import nn


def conv_output_size(size, kernel_size, stride, padding):
    return (size + 2 * padding - kernel_size) // stride + 1


def section_cost(section, height, width):
    """(MACs, parameters, height, width) of one part of the network, its convs visited in definition order.

    Only stride-2 convs change the spatial size, and every parallel branch (large + small kernel) has stride 1,
    so tracking the size through the convs in order is exact."""
    macs = 0
    for _, cell in section.cells_and_names():
        weight = getattr(cell, "weight", None)
        if isinstance(cell, nn.Dense):
            macs += weight.size
        elif weight is not None and len(weight.shape) == 4:
            kernel_size = weight.shape[-1]
            stride = cell.stride[-1] if isinstance(cell.stride, tuple) else cell.stride
            padding = kernel_size // 2
            height = conv_output_size(height, kernel_size, stride, padding)
            width = conv_output_size(width, kernel_size, stride, padding)
            macs += weight.size * height * width
    params = sum(p.size for p in section.trainable_params())
    return macs, params, height, width


def summarize(net, image_size=224):
    """Rows of (part, output shape, parameters, MACs) in forward order, and the totals."""
    height = width = image_size
    rows = []
    parts = [("stem", net.stem)]
    for index, stage in enumerate(net.stages):
        parts.append((f"stage{index + 1}", stage))
        if index < len(net.transitions):
            parts.append((f"transition{index + 1}", net.transitions[index]))
    for name, section in parts:
        macs, params, height, width = section_cost(section, height, width)
        rows.append({"part": name, "resolution": [height, width], "params": params, "macs": macs})
    if net.head is not None:
        head_params = sum(p.size for p in net.trainable_params() if p.name.startswith(("norm.", "head.")))
        rows.append({"part": "head", "resolution": [1, 1], "params": head_params, "macs": net.head.weight.size})
    total = {"params": sum(row["params"] for row in rows), "macs": sum(row["macs"] for row in rows)}
    return rows, total


def main(argv=None):
    from replknet_fn.model import MODELS, create_model
    from replknet_fn.reparam import reparameterize
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--deploy", action="store_true", help="summarize the re-parameterized network")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    net = create_model(args.model, num_classes=args.num_classes)
    if args.deploy:
        net = reparameterize(net)
    rows, total = summarize(net, args.image_size)
    if args.json:
        print(json.dumps({"model": args.model, "deploy": args.deploy, "image_size": args.image_size,
                          "rows": rows, **total}))
        return
    form = "deploy" if args.deploy else "train"
    print(f"{args.model} ({form} form) at {args.image_size}x{args.image_size}")
    print(f"{'part':<12}{'output':>10}{'params (M)':>14}{'MACs (G)':>12}")
    for row in rows:
        resolution = "x".join(str(v) for v in row["resolution"])
        print(f"{row['part']:<12}{resolution:>10}{row['params'] / 1e6:>14.3f}{row['macs'] / 1e9:>12.3f}")
    print(f"{'total':<12}{'':>10}{total['params'] / 1e6:>14.3f}{total['macs'] / 1e9:>12.3f}")


if __name__ == "__main__":
    main()
