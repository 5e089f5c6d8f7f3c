"""Checkpoints of a whole `TrainState`: written atomically, verified by CRC, found again by `--resume auto`.
(Turning a checkpoint or official weights into a network is `weights.py`'s job.)

A checkpoint is one MindSpore `.ckpt` holding every Parameter of the train state (weights, BN statistics,
optimizer moments, loss scale, EMA) plus one JSON string `replknet_fn` with the loop's counters, the model's
build arguments, the class names and the resolved config. Files are written to a temporary name, flushed to
disk, then renamed, so a crash mid-write never leaves a file that a resume would load.
"""
import json
import logging
import os
import shutil
from pathlib import Path

import mindspore as ms
import numpy as np

from replknet_fn.parameters import write_parameter

log = logging.getLogger(__name__)
META_KEY = "replknet_fn"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    pass


def _fsync_directory(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(entries, path, meta):
    """Save a list of {"name", "data"} and the metadata dict to `path` atomically, with a CRC."""
    path = Path(path)
    # MindSpore appends ".ckpt" to names without it; the leading dot keeps temporaries out of resume's view.
    temporary = path.with_name(f".{path.stem}.tmp-{os.getpid()}.ckpt")
    try:
        ms.save_checkpoint(entries, str(temporary), append_dict={META_KEY: json.dumps(meta)}, crc_check=True)
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
        _fsync_directory(path.parent)
    finally:
        if temporary.exists():
            temporary.unlink()


def save_train_state(state, path, meta=None):
    """Write everything a resume needs (see TrainState) to `path`."""
    entries = [{"name": name, "data": param} for name, param in state.parameters().items()]
    atomic_save(entries, path, dict(meta or {}, format=FORMAT_VERSION, host_state=state.host_state()))


def read_checkpoint(path):
    """(parameters by name, metadata dict) of a checkpoint, verifying its CRC. Raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        contents = ms.load_checkpoint(str(path), crc_check=True)
    except (ValueError, RuntimeError, OSError) as error:
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt: {str(error).splitlines()[0]}") from None
    meta_value = contents.pop(META_KEY, None)
    meta = json.loads(str(meta_value)) if meta_value is not None else {}
    return contents, meta


def _value(param):
    return param.asnumpy() if hasattr(param, "asnumpy") else np.asarray(param)


def load_parameters(target_params, source, path, optional=()):
    """Copy `source` (name -> Parameter/array) into `target_params` (name -> Parameter), checking every name
    and shape first, so nothing is loaded when something does not fit. Names starting with one of `optional`
    may be missing. Entries of `source` that are not targets are ignored."""
    missing = [name for name in target_params if name not in source and not name.startswith(tuple(optional))]
    if missing:
        raise CheckpointError(f"{path}: parameter {missing[0]!r} is not in the checkpoint ({len(missing)} of "
                              f"{len(target_params)} missing); is it a checkpoint of another model or form?")
    present = [(name, param) for name, param in target_params.items() if name in source]
    for name, param in present:
        shape = tuple(_value(source[name]).shape)
        if shape != tuple(param.shape):
            raise CheckpointError(f"{path}: shape mismatch for {name!r}: checkpoint has {shape}, "
                                  f"network expects {tuple(param.shape)}")
    for name, param in present:
        write_parameter(param, _value(source[name]))


def restore_train_state(state, path):
    """Load a checkpoint written by `save_train_state` into `state`; return its metadata."""
    params, meta = read_checkpoint(path)
    # A run that turns on EMA when resuming starts its average from the current weights.
    load_parameters(state.parameters(), params, path, optional=("ema.",))
    if state.ema is not None and not any(name.startswith("ema.") for name in params):
        for average, source in zip(state.ema.averages, state.ema.sources):
            write_parameter(average, source.asnumpy())
    state.load_host_state(meta.get("host_state", {}))
    return meta


def verify(path):
    """None if `path` is a complete checkpoint of ours, else the reason it is not."""
    try:
        _, meta = read_checkpoint(path)
    except CheckpointError as error:
        return str(error)
    if "host_state" not in meta:
        return f"{path} has no training state (not written by save_train_state)"
    return None


def find_resume_checkpoint(directory):
    """The newest checkpoint in `directory` that verifies; logs which newer ones it skipped and why."""
    directory = Path(directory)
    candidates = sorted((path for path in directory.glob("*.ckpt") if not path.name.startswith(".")),
                        key=lambda path: path.stat().st_mtime, reverse=True)
    for path in candidates:
        reason = verify(path)
        if reason is None:
            return path
        log.info("resume: skipping %s: %s", path.name, reason)
    return None


def link_or_copy(source, destination):
    """Make `destination` hold the same bytes as `source` (a hard link when possible), atomically."""
    source, destination = Path(source), Path(destination)
    temporary = destination.with_name(f".{destination.name}.tmp-{os.getpid()}")
    if temporary.exists():
        temporary.unlink()
    try:
        os.link(source, temporary)
    except OSError:
        shutil.copyfile(source, temporary)
    os.replace(temporary, destination)


def check_writable(directory):
    """Fail early, naming the directory, if files cannot be written there."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as error:
        raise CheckpointError(f"checkpoint directory {directory} is not writable: {error.strerror}") from None


def check_free_space(directory, state):
    """Fail early if `directory` cannot hold two checkpoints of `state` (the last one and its replacement)."""
    size = sum(param.size * param.itemsize for param in state.parameters().values())
    free = shutil.disk_usage(directory).free
    if free < 2 * size:
        raise CheckpointError(f"checkpoint directory {directory} has {free / 2**20:.0f} MiB free but a checkpoint "
                              f"takes {size / 2**20:.0f} MiB and saving needs room for two")
    return size


def select_kept(kept, policy, keep_max):
    """Split epoch checkpoints [(top1, epoch, name)] into (kept, removed) under `policy`."""
    if policy == "top_k":
        ordered = sorted(kept, key=lambda item: (item[0], item[1]), reverse=True)
    else:
        ordered = sorted(kept, key=lambda item: item[1], reverse=True)
    return ordered[:keep_max], ordered[keep_max:]
