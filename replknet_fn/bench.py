"""Speed against the native MindSpore convolution, both measured in the same run.

    python -m replknet_fn.bench dwconv [--batch_size 8] [--repeat 3] [--impls direct auto] [--shape 31,56,128]

`dwconv` times the large depthwise conv alone, forward and forward+backward (input and weight gradients), jitted,
at the RepLKNet-31B stage shapes (kernel, map size, channels at 224 input) or at the `--shape`s given. Every
subcommand prints a table and then ONE JSON line with the median times (seconds) and the ratios native / impl.

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


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m replknet_fn.bench", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_dwconv_parser(subparsers)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
