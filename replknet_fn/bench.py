"""Speed against the native MindSpore convolution, both measured in the same run.

    python -m replknet_fn.bench dwconv [--batch_size 8] [--repeat 3] [--impls direct auto] [--shape 31,56,128]
    python -m replknet_fn.bench step [--model replknet31_base] [--image_size 224] [--batch_size 4] [--repeat 3]
                                     [--large_kernel_impl auto]

`dwconv` times the large depthwise conv alone, forward and forward+backward (input and weight gradients), jitted,
at the RepLKNet-31B stage shapes (kernel, map size, channels at 224 input) or at the `--shape`s given. `step`
times a whole jitted training step (forward, cross-entropy, gradients, AdamW update) and the deploy network's
inference (`reparameterize`), with the model's large kernels computed by each implementation. Every subcommand
prints a table and then ONE JSON line with the median times (seconds) and the ratios native / impl.

The machine is shared and noisy: repetitions of all implementations are interleaved, so a slow spell hits them
alike, and medians are reported. Add a benchmark as a function `run_<name>(args)` plus an `add_<name>_parser`
registered in `build_parser`.
"""
import argparse
import json
import statistics
import time

import numpy as np
import mindspore as ms

from replknet_fn import dwconv
from replknet_fn.model import MODELS, create_model
from replknet_fn.reparam import reparameterize

# (kernel size, map height = width, channels) of RepLKNet-31B's four stages at 224x224 input.
STAGE_SHAPES = ((31, 56, 128), (29, 28, 256), (27, 14, 512), (13, 7, 1024))


def wait(result):
    """Block until `result` (a tensor or nested tuple of tensors) is computed."""
    if isinstance(result, (tuple, list)):
        for item in result:
            wait(item)
    else:
        result.asnumpy()


def interleaved_medians(functions, repeat):
    """{name: median seconds} of `functions` ({name: no-argument callable}), after one warm-up call each
    (compilation); the repetitions alternate between the functions."""
    for function in functions.values():
        wait(function())
    times = {name: [] for name in functions}
    for _ in range(repeat):
        for name, function in functions.items():
            start = time.perf_counter()
            wait(function())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def dwconv_functions(impl, batch_size, kernel_size, size, channels):
    """Jitted forward and forward+backward of one depthwise conv, as no-argument callables."""
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((batch_size, channels, size, size)).astype(np.float32))
    net = dwconv.depthwise_conv(channels, kernel_size, impl)

    @ms.jit
    def forward(x):
        return net(x)

    def loss(x):
        return net(x).sum()

    forward_backward = ms.jit(ms.value_and_grad(loss, 0, net.trainable_params()))

    def run_forward():
        return forward(x)

    def run_forward_backward():
        return forward_backward(x)

    return {"forward": run_forward, "forward_backward": run_forward_backward}


def shape_name(kernel_size, size, channels):
    return f"K{kernel_size}@{size}x{size}x{channels}"


def run_dwconv(args):
    impls = ["native"] + [impl for impl in args.impls if impl != "native"]
    shapes = args.shape or STAGE_SHAPES
    results = []
    for kernel_size, size, channels in shapes:
        functions = {}
        for impl in impls:
            for mode, function in dwconv_functions(impl, args.batch_size, kernel_size, size, channels).items():
                functions[(impl, mode)] = function
        medians = interleaved_medians(functions, args.repeat)
        result = {"shape": shape_name(kernel_size, size, channels), "kernel_size": kernel_size, "size": size,
                  "channels": channels,
                  "seconds": {impl: {mode: medians[(impl, mode)] for mode in ("forward", "forward_backward")}
                              for impl in impls},
                  "speedup": {impl: {mode: medians[("native", mode)] / medians[(impl, mode)]
                                     for mode in ("forward", "forward_backward")} for impl in impls[1:]}}
        results.append(result)
        print_dwconv_row(result, impls, header=len(results) == 1)
    print(json.dumps({"bench": "dwconv", "batch_size": args.batch_size, "repeat": args.repeat, "results": results}))


def print_dwconv_row(result, impls, header):
    if header:
        columns = [f"{impl} fwd / fwd+bwd (ms)" for impl in impls] + [f"x {impl}" for impl in impls[1:]]
        print(f"{'shape':<18}" + "".join(f"{column:>26}" for column in columns), flush=True)
    cells = [f"{result['seconds'][impl]['forward'] * 1e3:.1f} / {result['seconds'][impl]['forward_backward'] * 1e3:.1f}"
             for impl in impls]
    cells += [f"{result['speedup'][impl]['forward']:.1f} / {result['speedup'][impl]['forward_backward']:.1f}"
              for impl in impls[1:]]
    print(f"{result['shape']:<18}" + "".join(f"{cell:>26}" for cell in cells), flush=True)


def conv_shape(text):
    """"31,56,128" -> (31, 56, 128): kernel size, map size, channels."""
    try:
        kernel_size, size, channels = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KERNEL,SIZE,CHANNELS, e.g. 31,56,128") from None
    return kernel_size, size, channels


def add_dwconv_parser(subparsers):
    parser = subparsers.add_parser("dwconv", help="the large depthwise conv alone, per implementation")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--impls", nargs="+", default=["direct", "auto"],
                        choices=[impl for impl in dwconv.IMPLEMENTATIONS if impl != "native"],
                        help="implementations compared with native")
    parser.add_argument("--shape", type=conv_shape, action="append",
                        help="KERNEL,SIZE,CHANNELS instead of the RepLKNet-31B stage shapes (repeatable)")
    parser.set_defaults(run=run_dwconv)


def step_functions(impl, args):
    """A jitted train step and a jitted deploy forward of `args.model` using `impl`, as no-argument callables."""
    rng = np.random.default_rng(0)
    images = ms.Tensor(rng.standard_normal((args.batch_size, 3, args.image_size, args.image_size)).astype(np.float32))
    net = create_model(args.model, large_kernel_impl=impl)
    labels = ms.Tensor(rng.integers(0, net.head.weight.shape[0], args.batch_size).astype(np.int32))
    net.set_train(True)
    params = net.trainable_params()
    # The official recipe's optimizer (AdamW); its cost does not depend on the conv implementation.
    optimizer = ms.nn.AdamWeightDecay(params, learning_rate=1e-4, weight_decay=0.05)

    def loss_fn(images, labels):
        return ms.ops.cross_entropy(net(images), labels)

    grad_fn = ms.value_and_grad(loss_fn, None, params)

    @ms.jit
    def train_step(images, labels):
        loss, grads = grad_fn(images, labels)
        optimizer(grads)
        return loss

    deploy = reparameterize(net)

    @ms.jit
    def deploy_forward(images):
        return deploy(images)

    def run_train_step():
        return train_step(images, labels)

    def run_deploy():
        return deploy_forward(images)

    return {"train_step": run_train_step, "deploy_inference": run_deploy}


def run_step(args):
    impls = ["native"] + [impl for impl in args.large_kernel_impl if impl != "native"]
    functions = {}
    for impl in impls:
        for mode, function in step_functions(impl, args).items():
            functions[(impl, mode)] = function
    medians = interleaved_medians(functions, args.repeat)
    modes = ("train_step", "deploy_inference")
    result = {"bench": "step", "model": args.model, "image_size": args.image_size, "batch_size": args.batch_size,
              "repeat": args.repeat,
              "seconds": {impl: {mode: medians[(impl, mode)] for mode in modes} for impl in impls},
              "speedup": {impl: {mode: medians[("native", mode)] / medians[(impl, mode)] for mode in modes}
                          for impl in impls[1:]}}
    print(f"{args.model} @{args.image_size}, batch {args.batch_size}: median seconds (speedup vs native)")
    print(f"{'large_kernel_impl':<20}{'train step':>22}{'deploy inference':>22}")
    for impl in impls:
        cells = []
        for mode in modes:
            ratio = f" ({result['speedup'][impl][mode]:.1f}x)" if impl != "native" else ""
            cells.append(f"{result['seconds'][impl][mode]:.2f}{ratio}")
        print(f"{impl:<20}" + "".join(f"{cell:>22}" for cell in cells))
    print(json.dumps(result))


def add_step_parser(subparsers):
    parser = subparsers.add_parser("step", help="a whole training step and deploy inference, per implementation")
    parser.add_argument("--model", default="replknet31_base", choices=sorted(MODELS))
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--large_kernel_impl", nargs="+", default=["auto"],
                        choices=[impl for impl in dwconv.IMPLEMENTATIONS if impl != "native"],
                        help="implementations compared with native")
    parser.set_defaults(run=run_step)


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m replknet_fn.bench", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_dwconv_parser(subparsers)
    add_step_parser(subparsers)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
