"""Our MindSpore checkpoints -> a network, checked parameter by parameter (used by the export and ERF tools).

A checkpoint written by `mindspore.save_checkpoint(net, path)` may also hold optimizer state or metadata; those
entries are not network parameters and are ignored. Every network parameter must be present with its shape.
"""
from replknet_fn.checkpoint import load_parameters, read_checkpoint
from replknet_fn.convert import net_parameters
from replknet_fn.model import build_replknet, create_model
from replknet_fn.reparam import reparameterize


def checkpoint_entries(checkpoint):
    """name -> value of a checkpoint file (CRC-checked when it has one), or `checkpoint` if already a dict."""
    if isinstance(checkpoint, dict):
        return checkpoint
    entries, _ = read_checkpoint(checkpoint)
    return entries


def checkpoint_form(entries):
    """'train' (lkb_origin + small_conv), 'reparam' (merged large kernels, as `reparameterize(net)`) or 'folded'
    (every BN folded too, as `reparameterize(net, fold_all=True)`)."""
    if not any(".lkb_reparam." in name for name in entries):
        return "train"
    return "folded" if "stem.0.conv.bias" in entries else "reparam"


def load_checkpoint_into(net, checkpoint):
    """Copy every weight of `net` from `checkpoint` (a path or a dict of entries).

    Raises `checkpoint.CheckpointError` naming the first missing parameter or the first shape mismatch (both
    shapes); nothing is copied then. Returns the checkpoint entries that are not weights of `net` (optimizer
    state, EMA, metadata), which are ignored."""
    entries = checkpoint_entries(checkpoint)
    params = net_parameters(net)
    load_parameters(params, entries, "checkpoint" if isinstance(checkpoint, dict) else checkpoint)
    return [name for name in entries if name not in params]


def build_network(model, **overrides):
    """`create_model(model)` with any `build_replknet` argument in `overrides` (num_classes, other kernels...)."""
    net = create_model(model, **{key: value for key, value in overrides.items() if key == "num_classes"})
    others = {key: value for key, value in overrides.items() if key != "num_classes"}
    if others:
        net = build_replknet(**dict(net.build_args, **others))
    return net


def network_from_checkpoint(model, checkpoint=None, num_classes=None, large_kernel_impl=None, **overrides):
    """The network `model` in the checkpoint's form (training or deploy), with its weights, in eval mode.
    `checkpoint` is a path or a dict of entries.

    `num_classes` defaults to the checkpoint's classifier size (no classifier: a backbone). A deploy-form
    checkpoint gives the deploy network, its large kernels built with `large_kernel_impl` (default: the model's)."""
    entries = checkpoint_entries(checkpoint) if checkpoint is not None else {}
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    elif checkpoint is not None:
        head = entries.get("head.weight")
        overrides["num_classes"] = int(head.shape[0]) if head is not None else None
    net = build_network(model, **overrides)
    form = checkpoint_form(entries)
    if form != "train":
        net = reparameterize(net, fold_all=form == "folded", large_kernel_impl=large_kernel_impl)
    if checkpoint is not None:
        load_checkpoint_into(net, entries)
    net.set_train(False)
    return net
