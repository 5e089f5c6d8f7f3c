"""Weights -> a network. The one way every entry point turns a checkpoint into a network: our checkpoints (a
training state or plain weights) and official PyTorch weights (.pth / .npz / .safetensors, or converted .ckpt),
in training or deploy form.

    net, record = network_from_checkpoint("best.ckpt")                     # ours: the architecture is recorded
    net, record = network_from_checkpoint("RepLKNet-31B.pth", "replknet31_base")   # official: name the model
    settings = eval_preprocessing(record, "replknet31_base")               # how it was (or officially is) fed
    load_pretrained(net, path)                                             # training: start from weights

`record` is what our checkpoints say about themselves (model, build_args, class_names, config); {} for official
weights. Any missing parameter or shape that does not fit is a CheckpointError naming it (both shapes).
"""
import logging
from pathlib import Path

from replknet_fn.checkpoint import CheckpointError, load_parameters, read_checkpoint
from replknet_fn.config import DEFAULTS
from replknet_fn.convert import (
    ConversionError,
    load_official_state_dict,
    net_parameters,
    read_state_dict,
    unwrap_state_dict,
)
from replknet_fn.model import MODELS, OFFICIAL_INPUT, build_replknet, create_model
from replknet_fn.reparam import reparameterize

log = logging.getLogger(__name__)

OFFICIAL_SUFFIXES = (".pth", ".pt", ".npz", ".safetensors")
# What a checkpoint's record may say about evaluation preprocessing (config keys).
PREPROCESSING_KEYS = ("image_resize", "crop_pct", "interpolation", "mean", "std", "eval_resize")


def read_weights(path, use_ema=False):
    """(entries: our parameter name -> value, record) of one of our .ckpt files (a training state, plain
    weights or a converted official checkpoint). With `use_ema`, the EMA weights of a training state."""
    entries, record = read_checkpoint(path)
    if use_ema:
        entries = {name[len("ema."):]: value for name, value in entries.items() if name.startswith("ema.")}
        if not entries:
            raise CheckpointError(f"{path} holds no EMA weights (train with --ema True)")
    return entries, record


def checkpoint_form(entries):
    """'train' (lkb_origin + small_conv), 'reparam' (merged large kernels, as `reparameterize(net)`) or 'folded'
    (every BN folded too, as `reparameterize(net, fold_all=True)`)."""
    if not any(".lkb_reparam." in name for name in entries):
        return "train"
    return "folded" if "stem.0.conv.bias" in entries else "reparam"


def load_network_weights(net, entries, path="checkpoint"):
    """Copy every weight of `net` from `entries` (name -> value), checking all names and shapes first."""
    load_parameters(net_parameters(net), entries, path)


def network_from_checkpoint(path, model=None, *, use_ema=False, reparam=False, num_classes=None,
                            large_kernel_impl="auto", **build_overrides):
    """(network in eval mode with the weights of `path`, its record).

    Our checkpoints rebuild the architecture they record (`model`, if given, must agree); official weights and
    converted checkpoints without a record need `model`, and their classifier size (none: a backbone) is read
    from the weights unless `num_classes` is given. A deploy-form checkpoint gives the deploy network;
    `reparam` re-parameterizes a training-form one. `build_overrides` change `build_replknet` arguments (e.g.
    other kernel sizes for an untrained comparison). Drop path is off: it does nothing in eval mode."""
    path = Path(path)
    if path.suffix in OFFICIAL_SUFFIXES:
        return _network_from_official(path, model, use_ema, reparam, num_classes, large_kernel_impl,
                                      build_overrides), {}
    entries, record = read_weights(path, use_ema)
    if record.get("build_args"):
        if model is not None and record.get("model") not in (None, model):
            raise CheckpointError(f"{path} holds a {record['model']} network, not {model}; drop --model or fix it")
        build_args = dict(record["build_args"], **build_overrides)
    elif model is None:
        raise CheckpointError(f"{path} does not record its architecture (a converted official checkpoint?); "
                              f"give --model, one of {sorted(MODELS)}")
    else:
        head = entries.get("head.weight")
        build_args = dict(model=model, num_classes=None if head is None else int(head.shape[0]), **build_overrides)
    if num_classes is not None:
        build_args["num_classes"] = num_classes
    net = _build(**dict(build_args, drop_path_rate=0.0, recompute=False, large_kernel_impl=large_kernel_impl))
    form = checkpoint_form(entries)
    if form != "train":
        net = reparameterize(net, fold_all=form == "folded", large_kernel_impl=large_kernel_impl)
    load_parameters(net_parameters(net), entries, path, optional=_stage_norms(entries, build_overrides))
    if reparam and form == "train":
        net = reparameterize(net, large_kernel_impl=large_kernel_impl)
    net.set_train(False)
    return net, record


def _network_from_official(path, model, use_ema, reparam, num_classes, large_kernel_impl, build_overrides):
    if model is None:
        raise CheckpointError(f"{path} is an official PyTorch checkpoint: give --model, one of {sorted(MODELS)}")
    state_dict = read_state_dict(path)
    flat = unwrap_state_dict(state_dict, "model_ema" if use_ema else "model")
    head = flat.get("head.weight")
    if num_classes is None:
        num_classes = None if head is None else int(head.shape[0])
    net = _build(model=model, num_classes=num_classes, drop_path_rate=0.0, recompute=False,
                 large_kernel_impl=large_kernel_impl, **build_overrides)
    if any(".lkb_reparam." in key for key in flat):
        net = reparameterize(net, large_kernel_impl=large_kernel_impl)
    try:
        load_official_state_dict(net, flat, optional=_stage_norms(flat, build_overrides))
    except ConversionError as error:
        raise CheckpointError(f"{path}: {error}") from None
    if reparam and getattr(net, "deploy_form", None) is None:
        net = reparameterize(net, large_kernel_impl=large_kernel_impl)
    net.set_train(False)
    return net


def _build(model=None, **args):
    """build_replknet(**args), or the zoo's `model` with any of its arguments replaced."""
    return build_replknet(**args) if model is None else create_model(model, **args)


def _stage_norms(entries, build_overrides):
    """Prefixes of the per-stage norms that a backbone (`out_indices`) adds and a classification checkpoint
    lacks: they start as initialized (BN: identity on unit statistics), as when the official detection and
    segmentation backbones start from ImageNet weights."""
    missing = [f"stages.{index}.norm." for index in build_overrides.get("out_indices") or ()
               if not any(name.startswith(f"stages.{index}.norm.") for name in entries)]
    if missing:
        log.info("backbone: %s not in the checkpoint; they start as initialized", ", ".join(missing))
    return tuple(missing)


def eval_preprocessing(record, model=None):
    """{image_resize, crop_pct, interpolation, mean, std, eval_resize} a checkpoint is evaluated with: what its
    record says it was trained with, else the official values for `model` (RepLKNet-XL: mean = std = 0.5)."""
    trained = record.get("config", {})
    official = dict({key: DEFAULTS[key] for key in PREPROCESSING_KEYS},
                    **OFFICIAL_INPUT.get(record.get("model") or model, {}))
    return {key: trained.get(key, official[key]) for key in PREPROCESSING_KEYS}


def load_pretrained(net, path):
    """Start training from weights: one of our checkpoints or official weights. A classifier of another size
    (fine-tuning on new classes) is left at its fresh initialization, and said so; any other missing parameter
    or shape mismatch is a CheckpointError naming it."""
    path = Path(path) if path else None
    if path is None or not path.is_file():
        raise CheckpointError(f"pretrained is true but ckpt_path {str(path) if path else '(empty)'!r} is not a file")
    if path.suffix != ".ckpt":
        try:
            loaded = load_official_state_dict(net, read_state_dict(path), allow_head_mismatch=True)
        except ConversionError as error:
            raise CheckpointError(f"{path}: {error}") from None
        log.info("pretrained: loaded %d official tensors from %s", len(loaded), path)
        return
    source, _ = read_checkpoint(path)
    params = net_parameters(net)
    head = {name for name in params if name.startswith("head.")}
    if any(name in source and tuple(source[name].shape) != tuple(params[name].shape) for name in head):
        log.info("pretrained: the classifier in %s has another number of classes; starting it afresh", path)
        params = {name: param for name, param in params.items() if name not in head}
    load_parameters(params, source, path)
    log.info("pretrained: loaded %d parameters from %s", len(params), path)
