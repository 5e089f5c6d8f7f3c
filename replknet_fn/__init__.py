"""replknet_fn: RepLKNet on MindSpore, trained by a functional pipeline."""
import importlib
import os

# The kernels' OpenMP threads (csrc/) sleep when a parallel region ends instead of spinning first (libgomp's default):
# between two kernels the spinning threads took the cores from MindSpore's own op threads, on 2 cores ~20% of the
# demo's step (Zen 3: fastest step ~60 -> ~48 ms; RepLKNet-31B's step unchanged). libgomp reads this once, when
# MindSpore loads it, so it is set here, before any module of the package imports MindSpore; the user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

# Where each public name lives. They are imported on first use, so that importing the package does not load
# MindSpore: the entry scripts restart themselves on another malloc before it loads (allocator.py), and
# `python -m replknet_fn.convert` would otherwise warn that the module was in sys.modules before it ran as __main__.
_HOMES = {"MODELS": "model", "build_replknet": "model", "create_model": "model", "replknet31_base": "model",
          "replknet31_large": "model", "replknet_tiny": "model", "replknet_xlarge": "model",
          "reparameterize": "reparam", "load_official_state_dict": "convert"}

__all__ = list(_HOMES)


def __getattr__(name):
    if name in _HOMES:
        return getattr(importlib.import_module(f"replknet_fn.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'replknet_fn' has no attribute {name!r}")
