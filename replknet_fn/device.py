"""Where MindSpore computes, and what follows from it: whether the compiled CPU kernels may run, and the default
mixed precision.

    target = apply_device_target(config.device_target)    # before anything is built; 'auto': this build's device
    amp_level = resolve_amp_level(config.amp_level, target)
    if cpu_kernels_enabled(): ...                         # csrc/ kernels only when MindSpore runs on the CPU
"""
import logging

import mindspore as ms

TARGETS = ("CPU", "GPU", "Ascend")
AMP_LEVELS = ("O0", "O1", "O2", "O3")

log = logging.getLogger(__name__)


class DeviceError(RuntimeError):
    pass


def build_device():
    """The device this MindSpore build computes on by default ('CPU' for the CPU wheel)."""
    return ms.get_context("device_target")


def current_target():
    """The device MindSpore computes on now."""
    return ms.get_context("device_target")


def apply_device_target(target="auto"):
    """Make MindSpore compute on `target` (CPU, GPU, Ascend, or 'auto': the installed build's own device) and
    return it. A target this build cannot run is a DeviceError naming the build."""
    resolved = build_device() if target == "auto" else target
    if resolved not in TARGETS:
        raise DeviceError(f"device_target {target!r}: choose auto or one of {list(TARGETS)}")
    if resolved != build_device() and not _available(resolved):
        raise DeviceError(f"device_target {resolved}: this MindSpore {ms.__version__} build runs on "
                          f"{build_device()} only (install MindSpore's {resolved} package, or pass --device_target "
                          "auto)")
    if current_target() == resolved:
        return resolved  # set already (MindSpore refuses a second set_device once the runtime has started)
    try:
        set_device(resolved)
    except RuntimeError as error:
        raise DeviceError(f"device_target {resolved}: {str(error).splitlines()[0]}") from None
    return resolved


def add_device_argument(parser):
    """--device_target for a tool's own argument parser, as the config key of the entry scripts."""
    parser.add_argument("--device_target", default="auto", choices=("auto",) + TARGETS,
                        help="MindSpore device; auto: the one this MindSpore build runs on")


def set_device(target):
    ms.set_device(target)


def _available(target):
    try:
        return bool(ms.hal.is_available(target))
    except (RuntimeError, ValueError):
        return False


def resolve_amp_level(amp_level, target):
    """'auto': O2 on Ascend and GPU (the recipe's mixed precision, with its dynamic loss scale), O0 on the CPU,
    where float32 is fastest (RepLKNet-31B here: ~2 s a step against ~19 s under O2). An explicit level wins."""
    if amp_level != "auto":
        return amp_level
    return "O0" if target == "CPU" else "O2"


def mixed_precision(net, amp_level):
    """The network a step runs: `net` itself (O0), or wrapped by MindSpore's AMP (the same parameters)."""
    if amp_level == "O0":
        return net
    return ms.amp.auto_mixed_precision(net, amp_level)


_reported = set()


def cpu_kernels_enabled():
    """Whether the compiled C++ kernels of csrc/ (large depthwise conv, exact GELU, AdamW, squared sums) may run:
    only when MindSpore computes on the CPU. Elsewhere the network, the step and the optimizer use MindSpore's
    own ops, with the same parameters, names and checkpoints. Logged once per device."""
    target = current_target()
    enabled = target == "CPU"
    if target not in _reported:
        _reported.add(target)
        log.info("compiled CPU kernels: %s (MindSpore computes on %s)", "on" if enabled else "off, MindSpore's ops "
                 "instead", target)
    return enabled
