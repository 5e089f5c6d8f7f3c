"""Configuration: defaults < YAML file (`--config`) < command line. YAML keys equal the command-line flags.

Every key is declared once in `OPTIONS` with its default, a one-line help and, where it has one, the allowed
values or range. Values from YAML and from the command line are checked the same way; an unknown key is an error
that lists the closest valid keys.
"""
import argparse
import difflib
import logging
import math
import sys
from pathlib import Path

import yaml

log = logging.getLogger(__name__)
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"  # the entry scripts' default
# Resize filters by name: the `interpolation` key's choices, and what augment.py maps to Pillow's filters.
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


class ConfigError(ValueError):
    pass


TRAIN, VALIDATE = "train", "validate"  # the entry scripts, by the flags they take


class Option:
    """One config key: default, help, allowed values; which entry scripts take it as a flag (`used_by`); and
    whether it can change the compiled train step (`graph`; False: host-side only, so the compile cache may
    share a graph across its values). A key whose nature is unknown is best left `graph=True`: at worst that
    costs a cache miss."""

    def __init__(self, default, help, choices=None, low=None, high=None, element=None, used_by=(TRAIN,),
                 graph=True):
        self.default, self.help, self.choices, self.low, self.high = default, help, choices, low, high
        # Type of list/tuple elements (tuples and lists keep their kind), or the scalar type.
        self.element = element
        self.used_by, self.graph = frozenset(used_by), graph


BOTH, VALIDATE_ONLY = (TRAIN, VALIDATE), (VALIDATE,)


def _options():
    o = Option
    return {
        # --- run -----------------------------------------------------------------------------------------
        "config": o("", "YAML file with any of these keys (command-line flags override it)", used_by=BOTH, graph=False),
        "seed": o(42, "seed of data order, augmentation, initialization and drop path", low=0, graph=False),
        "jit": o(True, "compile the train/eval steps with mindspore.jit (False: eager, for debugging)", used_by=BOTH),
        "compile_cache_dir": o("auto", "reuse the compiled train step across runs (MindSpore compile cache) from "
                                       "this directory; 'auto': $REPLKNET_FN_CACHE or ~/.cache/replknet_fn, "
                                       "under compile_cache/; '': off", graph=False),
        "device_target": o("auto", "MindSpore device; auto: the one this MindSpore build runs on",
                           choices=["auto", "CPU", "GPU", "Ascend"], used_by=BOTH),
        "distribute": o(False, "data-parallel over the processes started by msrun or mpirun", used_by=BOTH),
        "collective_timeout": o(600, "seconds a rank waits in a collective for a late peer, e.g. while rank 0 "
                                     "saves a large checkpoint (a dead rank is still noticed within ~30 s)",
                                low=1, used_by=BOTH, graph=False),
        "resume": o("", "checkpoint to continue from, or 'auto' for the newest valid one in ckpt_save_dir",
                    graph=False),
        "max_steps": o(0, "stop after this many optimizer steps in total (0: no limit; for tests and debugging)",
                       low=0, graph=False),
        # --- data ----------------------------------------------------------------------------------------
        "data_dir": o("", "folder with train/ and val/ class folders; empty: the built-in demo data", used_by=BOTH,
                      graph=False),
        "demo_data_dir": o("./demo_data", "where the built-in demo data set is generated when data_dir is empty",
                           used_by=BOTH, graph=False),
        "num_parallel_workers": o(2, "data loading processes (0: in the main process)", low=0, used_by=BOTH,
                                  graph=False),
        "batch_size": o(64, "images per step per process", low=1, used_by=BOTH),
        "image_resize": o(224, "training crop and evaluation crop size", low=8, used_by=BOTH),
        "scale": o((0.08, 1.0), "RandomResizedCrop area range", element=float, graph=False),
        "ratio": o((0.75, 1.333), "RandomResizedCrop aspect-ratio range", element=float, graph=False),
        "interpolation": o("bicubic", "resize interpolation", choices=list(INTERPOLATIONS), used_by=BOTH, graph=False),
        "hflip": o(0.5, "horizontal flip probability", low=0.0, high=1.0, graph=False),
        "auto_augment": o("randaug-m9-mstd0.5", "timm-style RandAugment spec, or '' for none", graph=False),
        "color_jitter": o(0.4, "brightness/contrast/saturation jitter (skipped when auto_augment is set, "
                               "as in timm)", low=0.0, graph=False),
        "re_prob": o(0.25, "random erasing probability", low=0.0, high=1.0, graph=False),
        "mixup": o(0.8, "mixup alpha (0: off)", low=0.0, graph=False),
        "cutmix": o(1.0, "cutmix alpha (0: off)", low=0.0, graph=False),
        "cutmix_prob": o(1.0, "probability that a batch is mixed at all (mixup or cutmix)", low=0.0, high=1.0,
                         graph=False),
        "mixup_switch_prob": o(0.5, "probability of cutmix rather than mixup when both are on", low=0.0,
                               high=1.0, graph=False),
        "label_smoothing": o(0.1, "label smoothing", low=0.0, high=1.0, graph=False),
        "crop_pct": o(0.875, "evaluation: resize to image_resize / crop_pct, then centre crop", low=0.01,
                      high=1.0, used_by=BOTH, graph=False),
        "eval_resize": o("auto", "evaluation resize: crop (shorter side to image_resize / crop_pct, centre crop), "
                                 "warp (the whole image to a square), auto (the official rule: warp at "
                                 "image_resize >= 384)", choices=["auto", "crop", "warp"], used_by=BOTH, graph=False),
        "mean": o((0.485, 0.456, 0.406), "normalization mean, RGB in [0, 1] (ImageNet's; RepLKNet-XL used 0.5)",
                  element=float, used_by=BOTH),
        "std": o((0.229, 0.224, 0.225), "normalization std, RGB in [0, 1] (ImageNet's; RepLKNet-XL used 0.5)",
                 element=float, low=1e-6, used_by=BOTH),
        "train_split": o("train", "folder of training images under data_dir", graph=False),
        "val_split": o("val", "folder of validation images under data_dir (not needed when val_while_train "
                              "is false)", used_by=BOTH, graph=False),
        "scan_data": o(False, "decode every image before training and report the ones that fail", graph=False),
        # --- model ---------------------------------------------------------------------------------------
        "model": o("replknet31_base", "model name (see replknet_fn.MODELS)", used_by=BOTH),
        "num_classes": o(1000, "classes (checked against the data set)", low=1),
        "drop_path_rate": o(0.3, "stochastic depth rate of the last block", low=0.0, high=1.0),
        "large_kernel_impl": o("auto", "depthwise conv implementation: auto, native or direct (replknet_fn.dwconv)",
                               choices=["auto", "native", "direct"], used_by=BOTH),
        "recompute": o(False, "recompute block activations in the backward pass (less memory)"),
        "pretrained": o(False, "fine-tune from ckpt_path (ours or a converted official checkpoint)", graph=False),
        "ckpt_path": o("", "weights to start from when pretrained is true", used_by=BOTH, graph=False),
        "ema": o(False, "keep an exponential moving average of the weights"),
        "use_ema": o(False, "validate_with_func.py: evaluate the checkpoint's EMA weights", used_by=VALIDATE_ONLY,
                     graph=False),
        "reparam": o(False, "validate_with_func.py: evaluate the re-parameterized (deploy) network",
                     used_by=VALIDATE_ONLY, graph=False),
        "results_file": o("", "validate_with_func.py: also write the results to this .json or .csv file",
                          used_by=VALIDATE_ONLY, graph=False),
        "ema_decay": o(0.9999, "EMA decay per step", low=0.0, high=1.0),
        # --- optimization --------------------------------------------------------------------------------
        "epoch_size": o(300, "epochs", low=1, graph=False),
        "opt": o("adamw", "optimizer", choices=["adamw", "sgd", "momentum", "lion"]),
        "lr": o(5e-4, "peak learning rate (for the global batch; see README on scaling)", low=0.0, graph=False),
        "min_lr": o(1e-6, "final learning rate of cosine decay", low=0.0, graph=False),
        "weight_decay": o(0.05, "decoupled weight decay", low=0.0),
        "filter_bias_and_bn": o(True, "no weight decay for biases and BN parameters"),
        "momentum": o(0.9, "SGD momentum", low=0.0, high=1.0),
        "nesterov": o(False, "Nesterov momentum for SGD"),
        "betas": o((0.9, 0.999), "AdamW / Lion betas", element=float),
        "eps": o(1e-8, "AdamW epsilon", low=0.0),
        "layer_decay": o(1.0, "layer-wise lr decay for fine-tuning (official: 0.7; 1.0: off)", low=0.0,
                         high=1.0),
        "scheduler": o("cosine_decay", "learning-rate schedule",
                       choices=["cosine_decay", "constant", "step_decay", "multi_step_decay"], graph=False),
        "warmup_epochs": o(20, "linear warmup epochs", low=0, graph=False),
        "warmup_factor": o(0.0, "warmup starts at lr * warmup_factor", low=0.0, high=1.0, graph=False),
        "decay_epochs": o(280, "epochs of cosine decay after warmup", low=0, graph=False),
        "decay_rate": o(0.1, "step/multistep: lr factor at each milestone", low=0.0, graph=False),
        "milestones": o([30, 60, 90], "multi_step_decay epochs; step_decay uses decay_epochs as its period",
                        element=int, graph=False),
        "lr_epoch_stair": o(False, "keep the lr constant within an epoch", graph=False),
        "amp_level": o("auto", "mixed precision; auto: O2 on Ascend/GPU, O0 (fp32, fastest there) on CPU",
                       choices=["auto", "O0", "O1", "O2", "O3"], used_by=BOTH),
        "loss_scale_type": o("dynamic", "loss scaling", choices=["dynamic", "static"]),
        "loss_scale": o(65536.0, "initial (dynamic) or fixed (static) loss scale", low=1.0),
        "loss_scale_factor": o(2.0, "dynamic: divide on overflow, multiply after loss_scale_window good steps",
                               low=1.0),
        "loss_scale_window": o(2000, "dynamic: finite steps before the scale grows", low=1),
        "drop_overflow_update": o(True, "skip the optimizer on a step with non-finite gradients"),
        "max_consecutive_skips": o(100, "stop the run after this many skipped steps in a row", low=1, graph=False),
        "clip_grad": o(True, "clip gradients by global norm"),
        "clip_value": o(5.0, "global-norm clip threshold", low=0.0),
        "accumulation_steps": o(1, "micro-batches per optimizer step", low=1),
        # --- validation, checkpoints, logs ---------------------------------------------------------------
        "val_while_train": o(True, "validate during training", graph=False),
        "val_interval": o(1, "validate every this many epochs", low=1, graph=False),
        "ckpt_save_dir": o("./ckpt", "checkpoints, the resolved config and TensorBoard logs", graph=False),
        "ckpt_save_policy": o("top_k", "which epoch checkpoints to keep", choices=["top_k", "latest_k"], graph=False),
        "ckpt_save_steps": o(0, "also save the -last checkpoint every this many steps (0: at epoch ends only)",
                             low=0, graph=False),
        "keep_checkpoint_max": o(10, "epoch checkpoints kept (plus best and last)", low=1, graph=False),
        "log_interval": o(10, "log every this many steps", low=1, graph=False),
        "tensorboard": o(True, "write TensorBoard scalars to ckpt_save_dir/tensorboard", graph=False),
    }


OPTIONS = _options()
DEFAULTS = {key: option.default for key, option in OPTIONS.items()}


class Config(dict):
    """A dict whose keys are also attributes (config.lr)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(unknown_key_message(key, "config")) from None

    def __setattr__(self, key, value):
        self[key] = value


def unknown_key_message(key, where, valid=None):
    valid = list(OPTIONS) if valid is None else list(valid)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return f"unknown key {key!r} in {where}{hint}"


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def coerce(key, value, where):
    """Convert `value` (from YAML or a command-line string) to the type of the key's default, and check it."""
    option = OPTIONS[key]
    default = option.default
    try:
        if isinstance(default, bool):
            value = _to_bool(value)
        elif isinstance(default, (tuple, list)):
            value = _to_sequence(value, option.element, type(default))
        elif isinstance(default, float):
            value = float(_scalar(value))
        elif isinstance(default, int):
            value = _to_int(_scalar(value))
        elif isinstance(default, str):
            value = "" if value is None else str(value)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: bad value for {key!r}: {value!r} ({error})") from None
    _check_range(key, value, option, where)
    return value


def _scalar(value):
    return yaml.safe_load(value) if isinstance(value, str) else value


def _to_bool(value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("expected true/false")


def _to_int(value):
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError("expected an integer")
    return int(value)


def _to_sequence(value, element, kind):
    """"0.08,1.0", "[0.08, 1.0]", ["0.08", "1.0"] (nargs) or a YAML list -> a tuple/list of `element`."""
    if isinstance(value, str):
        value = value.strip().strip("[]()").replace(",", " ").split()
    if not isinstance(value, (list, tuple)):
        value = [value]
    convert = _to_int if element is int else element
    return kind(convert(_scalar(item)) for item in value)


def _check_range(key, value, option, where):
    if option.choices is not None and value not in option.choices:
        raise ConfigError(f"{where}: {key}={value!r} is not one of {option.choices}")
    values = value if isinstance(value, (tuple, list)) else [value]
    for item in values:
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{where}: {key}={value!r} must be finite")
            if option.low is not None and item < option.low or option.high is not None and item > option.high:
                bounds = f"[{option.low if option.low is not None else '-inf'}, " \
                         f"{option.high if option.high is not None else 'inf'}]"
                raise ConfigError(f"{where}: {key}={value!r} is outside the allowed range {bounds}")


def load_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values")
    for key in data:
        if key not in OPTIONS:
            raise ConfigError(unknown_key_message(key, str(path)))
    return {key: coerce(key, value, str(path)) for key, value in data.items()}


# Old names of flags, still accepted with a note: one concept has one name in every entry point and tool.
DEPRECATED_FLAGS = {"ckpt": "ckpt_path", "image_size": "image_resize", "input_size": "image_resize",
                    "num_workers": "num_parallel_workers"}


def flags_of(entry_point):
    """The config keys that `entry_point` (TRAIN or VALIDATE) takes on its command line."""
    return [key for key, option in OPTIONS.items() if entry_point in option.used_by]


def add_option(parser, key, **overrides):
    """--key as config.py declares it: its help and allowed values; a boolean may be given bare (`--ema` means
    `--ema True`); tuples and lists take several values. The parsed value is a string (or list of strings) for
    `coerce`, or None when the flag is absent; `overrides` are passed to argparse (e.g. a tool's own default)."""
    option = OPTIONS[key]
    kwargs = {"default": None, "help": option.help, "metavar": key.upper()}
    if isinstance(option.default, bool):
        kwargs.update(nargs="?", const="true", metavar="BOOL")
    elif isinstance(option.default, (tuple, list)):
        kwargs.update(nargs="+")
    if option.choices is not None:
        kwargs["metavar"] = "{" + ",".join(str(choice) for choice in option.choices) + "}"
    kwargs.update(overrides)
    names = ["-c", "--config"] if key == "config" else [f"--{key}"]
    parser.add_argument(*names, **kwargs)


def add_weights_options(parser):
    """--ckpt_path (required), --model and --use_ema: the weights a tool loads (weights.network_from_checkpoint)."""
    add_option(parser, "ckpt_path", required=True, help="our checkpoint, or official weights (.pth .npz .safetensors)")
    add_option(parser, "model", help="needed for weights that do not record their architecture (official ones)")
    add_option(parser, "use_ema", default=False, help="the EMA weights of a training checkpoint")


def add_flag(parser, name, help):
    """A tool's own on/off flag, with the config's boolean syntax: bare, or followed by true/false."""
    parser.add_argument(f"--{name}", nargs="?", const=True, default=False, type=_to_bool, metavar="BOOL",
                        help=help)


def replace_deprecated_flags(argv):
    """`argv` with old flag names (DEPRECATED_FLAGS) replaced by their new ones, each noted once on stderr."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for index, item in enumerate(argv):
        name, equals, value = item[2:].partition("=")
        if item.startswith("--") and name in DEPRECATED_FLAGS:
            new = DEPRECATED_FLAGS[name]
            log.warning("--%s is deprecated: it is now --%s", name, new)
            argv[index] = f"--{new}{equals}{value}"
    return argv


def parse_tool_args(parser, argv=None):
    """A tool's arguments (`python -m replknet_fn.<tool>`): old flag names replaced, and the values of config
    keys (added with `add_option`) checked and converted as in the config; None where not given."""
    args = parser.parse_args(replace_deprecated_flags(argv))
    for key, value in vars(args).items():
        if key in OPTIONS and value is not None:
            if isinstance(value, list) and not isinstance(OPTIONS[key].default, (tuple, list)):
                value = value[0]
            try:
                setattr(args, key, coerce(key, value, "the command line"))
            except ConfigError as error:
                parser.error(str(error))
    return args


def build_parser(description=None, entry_point=TRAIN):
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for key in flags_of(entry_point):
        add_option(parser, key)
    return parser


def parse_config(argv=None, default_config=None, description=None, entry_point=TRAIN):
    """Resolve the configuration from defaults, `--config` YAML (or `default_config`) and the command line.

    The YAML file may hold any key (a training recipe also describes its validation); the command line takes
    the flags of `entry_point` only, so a flag that this script would not read is an error, never ignored."""
    return parse_config_and_given(argv, default_config, description, entry_point)[0]


def parse_config_and_given(argv=None, default_config=None, description=None, entry_point=TRAIN):
    """(config, the keys the user set: on the command line or in a `--config` file they named)."""
    parser = build_parser(description, entry_point)
    args, unknown = parser.parse_known_args(replace_deprecated_flags(argv))
    for item in unknown:
        if item.startswith("-"):
            raise ConfigError(unknown_key_message(item.lstrip("-").split("=")[0], "the command line",
                                                  flags_of(entry_point)))
    if unknown:
        raise ConfigError(f"unexpected command-line arguments {unknown}")
    cli = {}
    for key, value in vars(args).items():
        if value is None:
            continue
        if isinstance(value, list) and not isinstance(OPTIONS[key].default, (tuple, list)):
            value = value[0]
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        cli[key] = coerce(key, value, "the command line")
    config, given = Config(DEFAULTS), set(cli)
    config_file = cli.get("config") or default_config
    if config_file:
        from_file = load_yaml(config_file)
        config.update(from_file)
        config["config"] = str(config_file)
        if cli.get("config"):
            given |= set(from_file)
    config.update(cli)
    return config, given


def save_config(config, path):
    plain = {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}
    Path(path).write_text(yaml.safe_dump(plain, sort_keys=False))
