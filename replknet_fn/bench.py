"""Speed of the large-kernel convolution and of the whole training step, measured in one run each.

    python -m replknet_fn.bench dwconv [--batch_size 8] [--repeat 3] [--impls direct auto] [--shape 31,56,128]
    python -m replknet_fn.bench step [--model replknet31_base] [--image_size 224] [--batch_size 4] [--repeat 3]
                                     [--large_kernel_impl auto native] [--compile_cache_dir DIR]
                                     [--skip_large_kernels_1]

`dwconv` times the large depthwise conv alone against the native MindSpore conv, forward and forward+backward
(input and weight gradients), jitted, at the RepLKNet-31B stage shapes (kernel, map size, channels at 224 input)
or at the `--shape`s given. `step` builds the project's real train step (step.make_train_step on a TrainState,
with the training defaults of config.py) and reports the time from build to the first step done (compilation
included) and from process start; then, interleaved: the steady train step, the part after the gradients alone
(unscale, global norm, clip, AdamW, loss-scale update), the eval-mode forward and the deploy network's inference
(`reparameterize`), each per `--large_kernel_impl` (by default auto and native, with auto's speedups against
native); and the train step and eval forward of the same network with every large kernel set to 1, whose
difference to the full step is the large-kernel convs' share. Every subcommand prints a table and then ONE JSON
line with the median times in seconds.

The machine is shared and noisy: repetitions of all implementations are interleaved, so a slow spell hits them
alike, and medians are reported. Add a benchmark as a function `run_<name>(args)` plus an `add_<name>_parser`
registered in `build_parser`.
"""
import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import mindspore as ms
from mindspore import ops
from mindspore.common.parameter import ParameterTuple

from replknet_fn import compile_cache, device, dwconv
from replknet_fn.config import DEFAULTS, Config
from replknet_fn.model import MODELS, build_replknet, create_model
from replknet_fn.optim import create_optimizer
from replknet_fn.reparam import reparameterize
from replknet_fn.step import make_train_step
from replknet_fn.train_state import EMA, TrainState, create_loss_scale

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


def process_age():
    """Seconds since this process started (Linux: /proc), or None."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def step_config(args, impl):
    """The training defaults (config.py), with the benchmark's model, input size, batch and implementation."""
    return Config(DEFAULTS, model=args.model, image_resize=args.image_size, batch_size=args.batch_size,
                  large_kernel_impl=impl, compile_cache_dir=args.compile_cache_dir)


def train_state(net, config):
    net.set_train(True)
    return TrainState(net, create_optimizer(net, config), create_loss_scale(config),
                      EMA(net, config.ema_decay) if config.ema else None)


def example_batch(args, num_classes):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch_size, 3, args.image_size, args.image_size)).astype(np.float32)
    targets = np.eye(num_classes, dtype=np.float32)[rng.integers(0, num_classes, args.batch_size)]
    return ms.Tensor(images), ms.Tensor(targets), ms.Tensor(1e-4, ms.float32)


def stored_gradients(params):
    """A replacement gradient stage returning fixed (random) gradients, so that a step built with it times
    everything after the gradients: unscale, global norm, finite check, clip, optimizer, loss-scale update."""
    grads = ParameterTuple(params).clone(prefix="bench_gradients", init="normal")

    def gradients(grad_fn, images, targets, scale, accumulation_steps):
        return ops.zeros((), ms.float32), tuple(grads)

    return gradients


def jitted_forward(net):
    @ms.jit
    def forward(images):
        return net(images)

    return forward


def jitted_eval_forward(build_args):
    """The eval-mode forward of a fresh network built like `build_args` (its own cell: the train step's network
    stays in train mode)."""
    net = build_replknet(**build_args)
    net.set_train(False)
    return jitted_forward(net)


def first_step(impl, args):
    """Build the model and the project's real train step (train_with_func.py's, with the config defaults) and run it
    once; returns the step and the seconds from build to the first step done (compilation included)."""
    start = time.perf_counter()
    config = step_config(args, impl)
    net = create_model(config.model, num_classes=config.num_classes, drop_path_rate=config.drop_path_rate,
                       large_kernel_impl=impl)
    state = train_state(net, config)
    train_step = make_train_step(state, config)
    cache_dir = compile_cache.step_cache_dir(config, world_size=1) if compile_cache.cache_available() else None
    cache = "off" if cache_dir is None else ("reused" if cache_dir.exists() else "filled")
    if cache_dir is not None:
        train_step = compile_cache.with_compile_cache(train_step, cache_dir)
    batch = example_batch(args, config.num_classes)
    wait(train_step(*batch))
    return state, config, train_step, batch, time.perf_counter() - start, cache


def step_functions(state, config, train_step, batch):
    """No-argument callables: the train step, optimizer and clip alone, eval-mode forward, deploy inference."""
    net = state.net
    rest_of_step = make_train_step(state, config, gradients=stored_gradients(state.optimizer.parameters))
    eval_forward, deploy_forward = jitted_eval_forward(net.build_args), jitted_forward(reparameterize(net))
    images = batch[0]
    functions = {"train_step": lambda: train_step(*batch), "optimizer_and_clip": lambda: rest_of_step(*batch),
                 "eval_forward": lambda: eval_forward(images), "deploy_inference": lambda: deploy_forward(images)}
    return functions


def large_kernels_1_functions(args, config, build_args):
    """The network of `build_args` with every large (and small) kernel 1x1: its train step and eval forward time the
    rest."""
    small_kernel = None if build_args["small_kernel"] is None else 1
    build_args = dict(build_args, large_kernel_sizes=[1] * len(build_args["layers"]), small_kernel=small_kernel)
    state = train_state(build_replknet(**build_args), config)
    train_step = make_train_step(state, config)
    eval_forward = jitted_eval_forward(build_args)
    batch = example_batch(args, config.num_classes)
    return {"train_step": lambda: train_step(*batch), "eval_forward": lambda: eval_forward(batch[0])}


STEP_PARTS = ("train_step", "optimizer_and_clip", "eval_forward", "deploy_inference")
K1 = "large_kernels_1"


def run_step(args):
    load_before = os.getloadavg()
    impls = list(dict.fromkeys(args.large_kernel_impl))
    functions, first, cache = {}, {}, {}
    for impl in impls:
        state, config, train_step, batch, first[impl], cache[impl] = first_step(impl, args)
        if impl == impls[0]:
            process_to_first_step, first_build_args = process_age(), state.net.build_args
        for part, function in step_functions(state, config, train_step, batch).items():
            functions[(impl, part)] = function
    if not args.skip_large_kernels_1:
        for part, function in large_kernels_1_functions(args, step_config(args, impls[0]),
                                                        first_build_args).items():
            functions[(K1, part)] = function
    medians = interleaved_medians(functions, args.repeat)
    seconds = {}
    for (variant, part), value in medians.items():
        seconds.setdefault(variant, {})[part] = value
    for impl in impls:
        seconds[impl]["first_step"] = first[impl]
        seconds[impl]["compile_estimate"] = first[impl] - seconds[impl]["train_step"]
    result = {"bench": "step", "model": args.model, "image_size": args.image_size, "batch_size": args.batch_size,
              "repeat": args.repeat, "process_to_first_step": process_to_first_step, "compile_cache": cache,
              "seconds": seconds,
              "images_per_second": {variant: args.batch_size / values["train_step"] for variant, values in
                                    seconds.items()},
              "load_average": {"before": [round(value, 2) for value in load_before],
                               "after": [round(value, 2) for value in os.getloadavg()]}}
    if K1 in seconds:
        result["large_kernel_seconds"] = {impl: seconds[impl]["train_step"] - seconds[K1]["train_step"]
                                          for impl in impls}
    if "native" in seconds and len(impls) > 1:
        result["speedup_vs_native"] = {impl: {part: seconds["native"][part] / seconds[impl][part]
                                              for part in STEP_PARTS}
                                       for impl in impls if impl != "native"}
    print_step_table(result, impls)
    print(json.dumps(result))


def print_step_table(result, impls):
    seconds = result["seconds"]
    load = result["load_average"]
    print(f"{result['model']} @{result['image_size']}, batch {result['batch_size']}: median seconds of "
          f"{result['repeat']} interleaved runs; load average {load['before'][0]:.1f} before, "
          f"{load['after'][0]:.1f} after")
    variants = impls + [K1] * (K1 in seconds)
    print(f"{'':<22}" + "".join(f"{variant:>18}" for variant in variants))
    rows = ["first_step", "compile_estimate"] + list(STEP_PARTS)
    for row in rows:
        cells = [f"{seconds[variant][row]:.2f}" if row in seconds[variant] else "-" for variant in variants]
        print(f"{row:<22}" + "".join(f"{cell:>18}" for cell in cells))
    cells = [f"{result['images_per_second'][variant]:.2f}" for variant in variants]
    print(f"{'images/s (train)':<22}" + "".join(f"{cell:>18}" for cell in cells))
    if "large_kernel_seconds" in result:
        cells = [f"{result['large_kernel_seconds'][impl]:.2f}" for impl in impls]
        print(f"{'large kernels (train)':<22}" + "".join(f"{cell:>18}" for cell in cells))
    for impl, speedups in result.get("speedup_vs_native", {}).items():
        print(f"{impl} vs native: " + ", ".join(f"{part} {value:.1f}x" for part, value in speedups.items()))
    age = result["process_to_first_step"]
    print(f"process start -> first {impls[0]} step done: {age:.1f} s; compile cache: {result['compile_cache']}"
          if age is not None else f"compile cache: {result['compile_cache']}")


def add_step_parser(subparsers):
    parser = subparsers.add_parser("step", help="the real training step and its parts, eval and deploy forward")
    parser.add_argument("--model", default="replknet31_base", choices=sorted(MODELS))
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--large_kernel_impl", nargs="+", default=["auto", "native"],
                        choices=list(dwconv.IMPLEMENTATIONS),
                        help="depthwise conv implementations to time (each builds its own model; the first one's "
                             "is the time to first step; with native, the others' speedups against it)")
    parser.add_argument("--compile_cache_dir", default="",
                        help="as in training: reuse/fill the compiled step there ('auto': the training default); "
                             "'' (default): off, so first_step is a cold compile")
    parser.add_argument("--skip_large_kernels_1", action="store_true",
                        help="do not time the model with every large kernel set to 1 (saves its compile)")
    parser.set_defaults(run=run_step)


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m replknet_fn.bench", description=__doc__.split("\n\n")[0])
    device.add_device_argument(parser)
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_dwconv_parser(subparsers)
    add_step_parser(subparsers)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device.apply_device_target(args.device_target)
    except device.DeviceError as error:
        parser.exit(2, f"error: {error}\n")
    args.run(args)


if __name__ == "__main__":
    main()
