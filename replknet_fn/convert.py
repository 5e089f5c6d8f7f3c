"""Official PyTorch RepLKNet weights -> replknet_fn networks and checkpoints.

    python -m replknet_fn.convert SRC DST.ckpt --model NAME [--num_classes N]

SRC is an official `.pth` (read without torch; torch is used instead when it is installed), `.npz` or
`.safetensors`. Our parameter names are the official keys with MindSpore's BN names, so the mapping is a rename;
every key and shape is checked, and nothing is loaded silently wrong.
"""
import argparse
import pickle
import sys
import zipfile
from collections import OrderedDict

import numpy as np

# MindSpore BatchNorm parameter name -> PyTorch BatchNorm2d state-dict name.
BN_NAMES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
WRAPPER_KEYS = ("model", "model_ema", "state_dict", "module")


class ConversionError(ValueError):
    pass


def official_key(our_name):
    """Our parameter name -> the official state-dict key."""
    prefix, _, leaf = our_name.rpartition(".")
    return f"{prefix}.{BN_NAMES.get(leaf, leaf)}"


def net_parameters(net):
    """Every weight of `net` (trainable or BN statistic) by name, in definition order; not RNG state."""
    from replknet_fn.model import is_rng_state
    return OrderedDict((name, param) for name, param in net.parameters_and_names() if not is_rng_state(name))


def unwrap_state_dict(state_dict, prefer="model"):
    """Accept flat state dicts and ones wrapped by training scripts (`model`, `model_ema`, `state_dict`) or by
    DataParallel/DDP (`module.` prefixes); take only the backbone of the official segmentation and detection
    checkpoints (`backbone.` keys; their heads are dropped); drop `num_batches_tracked`; rename the 22K
    classifier `head.cls_22k`."""
    order = (prefer,) + tuple(k for k in WRAPPER_KEYS if k != prefer)
    for key in order:
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    state_dict = {key[len("module."):] if key.startswith("module.") else key: value
                  for key, value in state_dict.items()}
    if any(key.startswith("backbone.") for key in state_dict):
        state_dict = {key[len("backbone."):]: value for key, value in state_dict.items()
                      if key.startswith("backbone.")}
    flat = OrderedDict()
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        key = key.replace("head.cls_22k.", "head.")
        flat[key] = np.asarray(value)
    return flat


def is_deploy_form(state_dict):
    return any(".lkb_reparam." in key for key in state_dict)


def check_and_map(net, state_dict, allow_head_mismatch=False, optional=()):
    """Match an (unwrapped) official state dict against `net`; return {our name: array}.

    Raises `ConversionError` naming the first missing/unexpected key or mismatched shape. With
    `allow_head_mismatch`, a classifier of another size is left out (for fine-tuning on new classes).
    """
    params = net_parameters(net)
    ours_by_official = OrderedDict((official_key(name), name) for name in params)
    net_deploy = any(".lkb_reparam." in key for key in ours_by_official)
    if is_deploy_form(state_dict) != net_deploy:
        form = "deploy (re-parameterized, lkb_reparam)" if is_deploy_form(state_dict) else "training (lkb_origin)"
        raise ConversionError(f"the state dict is in {form} form but the network is not; "
                              f"{'re-parameterize the network first' if not net_deploy else 'load the training form'}")
    unexpected = [key for key in state_dict if key not in ours_by_official]
    if unexpected:
        raise ConversionError(f"unexpected key {unexpected[0]!r} in the state dict ({len(unexpected)} in all); "
                              "is it a checkpoint of another model?")
    missing = [key for key in ours_by_official if key not in state_dict and not key.startswith(tuple(optional))]
    if missing:
        raise ConversionError(f"missing key {missing[0]!r} in the state dict ({len(missing)} in all)")
    mapped = OrderedDict()
    for key, our_name in ours_by_official.items():
        if key not in state_dict:
            continue  # optional, left as initialized
        value = state_dict[key]
        expected = tuple(params[our_name].shape)
        if tuple(value.shape) != expected:
            if allow_head_mismatch and key.startswith("head."):
                continue
            raise ConversionError(f"shape mismatch for {key!r}: state dict has {tuple(value.shape)}, "
                                  f"network expects {expected}")
        mapped[our_name] = value.astype(np.float32)
    return mapped


def load_official_state_dict(net, state_dict, allow_head_mismatch=False, prefer="model", optional=()):
    """Load an official PyTorch state dict (mapping key -> array) into `net`; return the loaded names. Keys
    starting with one of `optional` may be missing (those parameters keep their initialization)."""
    from replknet_fn.parameters import write_parameter
    mapped = check_and_map(net, unwrap_state_dict(state_dict, prefer), allow_head_mismatch, optional)
    params = net_parameters(net)
    for name, value in mapped.items():
        write_parameter(params[name], value)
    return list(mapped)


# ---- reading .pth without torch ------------------------------------------------------------------------------

_TORCH_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


def _bfloat16_to_float32(raw):
    return (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    if len(size) == 0:
        return storage[storage_offset].copy()
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[storage_offset:], shape=tuple(size),
                                           strides=tuple(s * itemsize for s in stride))
    return np.ascontiguousarray(view)


def _rebuild_parameter(data, *unused):
    return data


class _TorchZipUnpickler(pickle.Unpickler):
    def __init__(self, file, archive, prefix):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return name
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch" and name in ("float32", "float16", "bfloat16", "int64"):
            return name
        if module in ("builtins", "argparse", "_codecs", "numpy", "numpy.core.multiarray") or \
                module.startswith("numpy"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"cannot read {module}.{name} without torch; install torch to read this file")

    def persistent_load(self, pid):
        _, storage_type, key, _location, _numel = pid
        raw = self.archive.read(f"{self.prefix}/data/{key}")
        dtype = _TORCH_STORAGE_DTYPES[storage_type]
        if dtype == "bfloat16":
            return _bfloat16_to_float32(raw)
        return np.frombuffer(raw, dtype=dtype)


def read_torch_zip(path):
    """Read a `torch.save` zip file (PyTorch >= 1.6) into nested dicts of numpy arrays, without torch."""
    if not zipfile.is_zipfile(path):
        raise ConversionError(f"{path}: not a zip-format .pth (saved by PyTorch < 1.6); install torch to read it")
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        if not pickles:
            raise ConversionError(f"{path}: no data.pkl inside; not a torch.save file")
        prefix = pickles[0][:-len("/data.pkl")]
        with archive.open(pickles[0]) as file:
            return _TorchZipUnpickler(file, archive, prefix).load()


def read_state_dict(path):
    """Read an official checkpoint (.pth/.pt/.bin, .npz, .safetensors) into a dict of numpy arrays."""
    path = str(path)
    if path.endswith(".npz"):
        with np.load(path) as data:
            return {key: data[key] for key in data.files}
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        return load_file(path)
    try:
        import torch
    except ImportError:
        return read_torch_zip(path)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    return _torch_to_numpy(raw)


def _torch_to_numpy(value):
    if isinstance(value, dict):
        return OrderedDict((key, _torch_to_numpy(item)) for key, item in value.items())
    if hasattr(value, "detach"):
        return value.detach().float().numpy() if value.is_floating_point() else value.detach().numpy()
    return value


def convert(src, dst, model, num_classes=None, prefer="model"):
    """Convert an official checkpoint into a MindSpore checkpoint of `model`; return the network."""
    import mindspore as ms

    from replknet_fn.model import create_model
    from replknet_fn.reparam import reparameterize
    state_dict = unwrap_state_dict(read_state_dict(src), prefer)
    if num_classes is None:
        num_classes = state_dict["head.weight"].shape[0] if "head.weight" in state_dict else None
    net = create_model(model, num_classes=num_classes)
    if is_deploy_form(state_dict):
        net = reparameterize(net)
    load_official_state_dict(net, state_dict)
    ms.save_checkpoint(net, dst, crc_check=True)
    return net


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert official RepLKNet weights to a MindSpore checkpoint.")
    parser.add_argument("src", help="official .pth / .npz / .safetensors")
    parser.add_argument("dst", help="output .ckpt")
    parser.add_argument("--model", required=True, help="model name, e.g. replknet31_base")
    parser.add_argument("--num_classes", type=int, default=None, help="default: taken from the classifier")
    parser.add_argument("--use_ema", action="store_true", help="take `model_ema` from a training checkpoint")
    args = parser.parse_args(argv)
    try:
        net = convert(args.src, args.dst, args.model, args.num_classes, "model_ema" if args.use_ema else "model")
    except (ConversionError, OSError) as error:
        sys.exit(f"convert: {error}")
    count = sum(p.size for p in net.trainable_params())
    print(f"wrote {args.dst}: {args.model}, {count / 1e6:.2f}M trainable parameters")


if __name__ == "__main__":
    main()
