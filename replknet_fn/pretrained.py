"""Start from trained weights: one of our checkpoints, or official PyTorch weights (.pth/.npz/.safetensors).

A classifier of another size (fine-tuning on new classes) is left at its fresh initialization and said so;
any other missing parameter or shape mismatch is an error naming it.
"""
from pathlib import Path

from replknet_fn.checkpoint import CheckpointError, load_parameters, read_checkpoint
from replknet_fn.convert import load_official_state_dict, net_parameters, read_state_dict


def load_pretrained(net, path, log=print):
    path = Path(path) if path else None
    if path is None or not path.is_file():
        raise CheckpointError(f"pretrained is true but ckpt_path {str(path) if path else '(empty)'!r} is not a file")
    if path.suffix != ".ckpt":
        loaded = load_official_state_dict(net, read_state_dict(path), allow_head_mismatch=True)
        log(f"pretrained: loaded {len(loaded)} official tensors from {path}")
        return
    source, _ = read_checkpoint(path)
    params = net_parameters(net)
    head = {name for name in params if name.startswith("head.")}
    if any(name in source and tuple(source[name].shape) != tuple(params[name].shape) for name in head):
        log(f"pretrained: the classifier in {path} has another number of classes; starting it afresh")
        params = {name: param for name, param in params.items() if name not in head}
    load_parameters(params, source, path)
    log(f"pretrained: loaded {len(params)} parameters from {path}")
