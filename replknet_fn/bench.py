"""Speed of the large-kernel convolution and of the whole training step, measured in one run each.

    python -m replknet_fn.bench dwconv [--batch_size 8] [--repeat 3] [--impls direct auto kernel] [--shape 31,56,128]
                                       [--isa avx512 avx2 portable]
    python -m replknet_fn.bench step [--model replknet31_base] [--image_size 224] [--batch_size 4] [--repeat 3]
                                     [--large_kernel_impl auto native] [--compile_cache_dir DIR]
                                     [--skip_large_kernels_1]

Every subcommand first prints the machine it runs on (CPU model, the kernel build's ISA level, threads) and the
float32 matmul rate measured in the same run (numpy sgemm, 2048^3), the yardstick for the other rates.

`dwconv` times the large depthwise conv alone against the native MindSpore conv, forward and forward+backward
(input and weight gradients for a given output gradient, as in training; no loss), jitted, at the RepLKNet-31B stage
shapes (kernel, map size, channels at 224 input) or at the `--shape`s given, with the direct kernel of each ISA
level build given (`--isa`, default: all this CPU runs). Rates count the multiply-adds of taps that meet real
pixels (2 flops each; forward+backward: 3 times the forward's, for the forward, input and weight gradients), as
GFLOP/s and as a fraction of the matmul rate timed between the convs of the same shape (so that both see the same
load). Each impl runs as a jitted MindSpore call whose output is copied to numpy, except "kernel": the direct
kernel's library called from numpy, as the matmul is (KERNEL_ONLY).

`step` builds the project's real train step (step.make_train_step on a TrainState, with the training defaults of
config.py) and reports the time from build to the first step done (compilation included) and from process start,
and the peak memory (max RSS) of training after three steps, before it builds any other network;
then, interleaved: the steady train step, the part after the gradients alone (unscale, global norm, clip, AdamW,
loss-scale update), the eval-mode forward and the deploy network's inference (`reparameterize`), each per
`--large_kernel_impl` (by default auto and native, with auto's speedups against native); and the train step and
eval forward of the same network with every large kernel set to 1, whose difference to the full step is the
large-kernel convs' share. Every subcommand prints a table and then ONE JSON line with the median times in seconds.

The machine is shared and noisy: repetitions of all implementations are interleaved, so a slow spell hits them
alike, and medians are reported. Add a benchmark as a function `run_<name>(args)` plus an `add_<name>_parser`
registered in `build_parser`.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from replknet_fn import allocator, kernels

if __name__ == "__main__":
    allocator.restart_with_jemalloc()  # before MindSpore loads: allocator.py says why
    kernels.build_in_background()  # g++ while MindSpore imports (kernels.py)

import mindspore as ms
import numpy as np
from mindspore import ops
from mindspore.common.parameter import ParameterTuple

from replknet_fn import compile_cache, device, dwconv
from replknet_fn.config import DEFAULTS, Config
from replknet_fn.model import MODELS, build_replknet, create_model
from replknet_fn.optim import create_optimizer
from replknet_fn.reparam import reparameterize
from replknet_fn.step import make_train_step
from replknet_fn.train_state import EMA, TrainState, create_loss_scale

# `bench dwconv --impls kernel`: the direct kernel's library called from numpy (dwconv.kernel_runs), timed on the
# same footing as the numpy matmul it is compared with. A jitted MindSpore call of one op adds ~1 ms to launch it and
# copy its output to the host (K13@7x7x1024, Zen 3: 3.4 ms through MindSpore, 1.4 ms the kernel alone), which hides
# the kernel's speed at the small shapes; inside a train step an op's launch costs ~50 us.
KERNEL_ONLY = "kernel"

# (kernel size, map height = width, channels) of RepLKNet-31B's four stages at 224x224 input.
STAGE_SHAPES = ((31, 56, 128), (29, 28, 256), (27, 14, 512), (13, 7, 1024))


def wait(result):
    """Block until `result` (tensors, nested tuples of them, or numpy arrays, which are ready) is computed."""
    if not isinstance(result, np.ndarray):
        dwconv.wait(result)


MATMUL_SIZE = 2048


def machine():
    """What a figure depends on: the CPU, the kernel build's ISA level (and the levels it could run), threads and
    the malloc (compile time)."""
    return {"cpu": kernels.cpu_model(), "isa": kernels.isa_level(),
            "isa_levels": list(kernels.supported_isa_levels()), "cpus": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "malloc": allocator.current()}


def matmul_function(size=MATMUL_SIZE):
    """A no-argument callable multiplying two float32 size x size matrices with numpy (sgemm)."""
    a = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    return lambda: a @ a


def matmul_gflops(size=MATMUL_SIZE, repeat=5):
    """float32 GFLOP/s of numpy's matmul on size x size matrices, median of `repeat` after a warm-up."""
    return 2 * size ** 3 / interleaved_medians({"matmul": matmul_function(size)}, repeat)["matmul"] / 1e9


def print_machine(description, gflops):
    threads = description["omp_num_threads"] or f"{description['cpus']} (all CPUs)"
    print(f"machine: {description['cpu']}; kernel build {description['isa']} (runs "
          f"{', '.join(description['isa_levels'])}); threads {threads}; malloc {description['malloc']}; "
          f"float32 matmul {gflops:.0f} GFLOP/s (numpy, {MATMUL_SIZE}^3)", flush=True)


# A sample of a function faster than this is the mean of as many back-to-back calls as fill it. A lone call of a
# sub-millisecond kernel times mostly the waking of its threads beside another pool's still spinning ones (numpy's
# OpenBLAS, MindSpore's): K13@7x7x1024 forward+backward, Zen 3, 1.9 ms back to back, ~31 ms right after a matmul.
SAMPLE_SECONDS = 0.05


def calls_per_sample(function):
    """Back-to-back calls of `function` that make one sample of about SAMPLE_SECONDS (1 for slow functions), after
    one warm-up call (compilation)."""
    start = time.perf_counter()
    wait(function())
    if time.perf_counter() - start >= SAMPLE_SECONDS:
        return 1
    fastest = SAMPLE_SECONDS
    for _ in range(3):
        start = time.perf_counter()
        wait(function())
        fastest = min(fastest, time.perf_counter() - start)
    return max(1, math.ceil(SAMPLE_SECONDS / max(fastest, 1e-6)))


def interleaved_medians(functions, repeat):
    """{name: median seconds per call} of `functions` ({name: no-argument callable}) over `repeat` samples each, a
    sample being one call or, for fast functions, the mean of back-to-back calls (`calls_per_sample`); the samples
    alternate between the functions, so that all see the same load."""
    calls = {name: calls_per_sample(function) for name, function in functions.items()}
    times = {name: [] for name in functions}
    for _ in range(repeat):
        for name, function in functions.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                wait(function())
            times[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(values) for name, values in times.items()}


def valid_taps(size, kernel_size):
    """Sum over the output positions of one axis of the taps that meet a real input position ("same" padding)."""
    pad = kernel_size // 2
    return sum(min(size - 1, position + pad) - max(0, position - pad) + 1 for position in range(size))


def dwconv_gflop(batch_size, kernel_size, size, channels):
    """GFLOP of one depthwise conv forward, counting only multiply-adds of taps that meet real pixels."""
    return 2 * batch_size * channels * valid_taps(size, kernel_size) ** 2 / 1e9


def dwconv_functions(impl, batch_size, kernel_size, size, channels, isa=None):
    """Jitted forward and forward+backward of one depthwise conv, as no-argument callables; auto decided first.
    "kernel": the direct kernel called from numpy, without MindSpore (see KERNEL_ONLY)."""
    shape = (batch_size, channels, size, size)
    if impl == KERNEL_ONLY:
        runs = dwconv.kernel_runs(*shape, kernel_size, isa=isa)
        if runs is None:
            raise SystemExit(f"--impls {KERNEL_ONLY}: the {isa} build of {dwconv.SOURCE.name} is not available")
        return runs
    if impl == "auto":
        dwconv.decide(shape + (kernel_size,), isa or kernels.isa_level())
    return dwconv.conv_runs(impl, *shape, kernel_size, isa=isa)


def shape_name(kernel_size, size, channels):
    return f"K{kernel_size}@{size}x{size}x{channels}"


MODES = ("forward", "forward_backward")


def run_dwconv(args):
    load_before = os.getloadavg()
    description, first_matmul = machine(), matmul_gflops()
    print_machine(description, first_matmul)
    asked = dict.fromkeys(args.isa or kernels.supported_isa_levels())
    isa_levels = [kernels.check_isa_level(isa, f"--isa {isa}") for isa in asked]
    variants = ["native"] + [f"{impl}/{isa}" for isa in isa_levels for impl in args.impls if impl != "native"]
    results = []
    for kernel_size, size, channels in args.shape or STAGE_SHAPES:
        # The matmul is timed between the convs too, so that its rate and theirs see the same load.
        functions = {("matmul", None): matmul_function()}
        for variant in variants:
            impl, _, isa = variant.partition("/")
            runs = dwconv_functions(impl, args.batch_size, kernel_size, size, channels, isa or None)
            for mode, function in runs.items():
                functions[(variant, mode)] = function
        medians = interleaved_medians(functions, args.repeat)
        matmul = 2 * MATMUL_SIZE ** 3 / medians[("matmul", None)] / 1e9
        forward_gflop = dwconv_gflop(args.batch_size, kernel_size, size, channels)
        gflop = {"forward": forward_gflop, "forward_backward": 3 * forward_gflop}
        seconds = {variant: {mode: medians[(variant, mode)] for mode in MODES} for variant in variants}
        gflops = {variant: {mode: gflop[mode] / seconds[variant][mode] for mode in MODES} for variant in variants}
        result = {"shape": shape_name(kernel_size, size, channels), "kernel_size": kernel_size, "size": size,
                  "channels": channels, "gflop": gflop, "seconds": seconds, "gflops": gflops, "matmul_gflops": matmul,
                  "fraction_of_matmul": {variant: {mode: gflops[variant][mode] / matmul for mode in MODES}
                                         for variant in variants},
                  "speedup": {variant: {mode: seconds["native"][mode] / seconds[variant][mode] for mode in MODES}
                              for variant in variants[1:]}}
        results.append(result)
        print_dwconv_rows(result, variants, header=len(results) == 1)
    print(json.dumps({"bench": "dwconv", "machine": description, "matmul_gflops": first_matmul,
                      "batch_size": args.batch_size, "repeat": args.repeat, "isa": isa_levels, "results": results,
                      "load_average": {"before": [round(value, 2) for value in load_before],
                                       "after": [round(value, 2) for value in os.getloadavg()]}}))


def print_dwconv_rows(result, variants, header):
    columns = ["fwd ms", "fwd+bwd ms", "fwd GF/s", "f+b GF/s", "fwd %mm", "f+b %mm", "x native"]
    if header:
        print(f"{'shape':<16}{'impl':<18}" + "".join(f"{column:>11}" for column in columns)
              + "   (%mm: of the matmul rate)", flush=True)
    for variant in variants:
        seconds, gflops = result["seconds"][variant], result["gflops"][variant]
        fraction = result["fraction_of_matmul"][variant]
        speedup = result["speedup"].get(variant)
        cells = [f"{seconds['forward'] * 1e3:.1f}", f"{seconds['forward_backward'] * 1e3:.1f}",
                 f"{gflops['forward']:.1f}", f"{gflops['forward_backward']:.1f}",
                 f"{fraction['forward'] * 100:.0f}%", f"{fraction['forward_backward'] * 100:.0f}%",
                 f"{speedup['forward']:.3g}/{speedup['forward_backward']:.3g}" if speedup else "-"]
        name = result["shape"] if variant == variants[0] else ""
        print(f"{name:<16}{variant:<18}" + "".join(f"{cell:>11}" for cell in cells), flush=True)
    print(f"{'':<16}{'matmul (numpy)':<18}{'':>22}{result['matmul_gflops']:>11.1f}", flush=True)


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
    parser.add_argument("--impls", nargs="+", default=["direct", "auto", KERNEL_ONLY],
                        choices=[impl for impl in dwconv.IMPLEMENTATIONS if impl != "native"] + [KERNEL_ONLY],
                        help=f"implementations compared with native ({KERNEL_ONLY!r}: the direct kernel alone, called "
                             "from numpy like the matmul, without MindSpore's op launch and copy to the host)")
    parser.add_argument("--shape", type=conv_shape, action="append",
                        help="KERNEL,SIZE,CHANNELS instead of the RepLKNet-31B stage shapes (repeatable)")
    parser.add_argument("--isa", nargs="+", choices=list(kernels.ISA_LEVELS),
                        help="kernel builds to time (default: every level this CPU runs)")
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

    def gradients(grad_fn, images, targets, scale):
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
    once; returns the step and the seconds from build to the first step done (compilation included, and auto's
    measurements at shapes this machine has not decided yet)."""
    start = time.perf_counter()
    config = step_config(args, impl)
    net = create_model(config.model, num_classes=config.num_classes, drop_path_rate=config.drop_path_rate,
                       large_kernel_impl=impl)
    dwconv.decide_for(net, (args.batch_size, 3, args.image_size, args.image_size))
    state = train_state(net, config)
    train_step = make_train_step(state, config)
    cache_dir = compile_cache.step_cache_dir(config, world_size=1) if compile_cache.cache_available() else None
    cache = "off" if cache_dir is None else ("reused" if cache_dir.exists() else "filled")
    if cache_dir is not None:
        train_step = compile_cache.with_compile_cache(train_step, cache_dir)
    batch = example_batch(args, config.num_classes)
    wait(train_step(*batch))
    return state, config, train_step, batch, time.perf_counter() - start, cache


def training_peak_memory(train_step, batch, steps=2):
    """Peak memory (max RSS, bytes) of this process after `steps` more train steps: what training the first impl's
    network at this batch costs (import, build, compile, steps), taken before bench builds other networks. None
    where Python has no `resource` module (Windows)."""
    for _ in range(steps):
        wait(train_step(*batch))
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


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
    net = build_replknet(**build_args)
    dwconv.decide_for(net, (args.batch_size, 3, args.image_size, args.image_size))
    state = train_state(net, config)
    train_step = make_train_step(state, config)
    eval_forward = jitted_eval_forward(build_args)
    batch = example_batch(args, config.num_classes)
    return {"train_step": lambda: train_step(*batch), "eval_forward": lambda: eval_forward(batch[0])}


STEP_PARTS = ("train_step", "optimizer_and_clip", "eval_forward", "deploy_inference")
K1 = "large_kernels_1"


def run_step(args):
    load_before = os.getloadavg()
    description = machine()
    impls = list(dict.fromkeys(args.large_kernel_impl))
    functions, first, cache = {}, {}, {}
    for impl in impls:
        state, config, train_step, batch, first[impl], cache[impl] = first_step(impl, args)
        if impl == impls[0]:
            process_to_first_step, first_build_args = process_age(), state.net.build_args
            training_peak = training_peak_memory(train_step, batch)
            # Measured here, not first: its ~1 s and 50 MB of arrays are the bench's, not what training waits for.
            matmul = matmul_gflops()
            print_machine(description, matmul)
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
    result = {"bench": "step", "machine": description, "matmul_gflops": matmul, "model": args.model,
              "image_size": args.image_size, "batch_size": args.batch_size, "repeat": args.repeat,
              "process_to_first_step": process_to_first_step, "compile_cache": cache,
              "training_max_rss_bytes": training_peak,
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
    peak = result["training_max_rss_bytes"]
    if peak is not None:
        print(f"peak memory of training ({impls[0]}, max RSS after 3 steps, before the other networks): "
              f"{peak / 1e9:.2f} GB")


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
