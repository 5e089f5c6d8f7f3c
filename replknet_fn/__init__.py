"""replknet_fn: RepLKNet on MindSpore, trained by a functional pipeline."""
from replknet_fn.model import (
    MODELS,
    build_replknet,
    create_model,
    replknet31_base,
    replknet31_large,
    replknet_tiny,
    replknet_xlarge,
)
from replknet_fn.reparam import reparameterize

__all__ = ["MODELS", "build_replknet", "create_model", "replknet31_base", "replknet31_large", "replknet_tiny",
           "replknet_xlarge", "reparameterize", "load_official_state_dict"]


def __getattr__(name):
    # Imported on first use: importing convert here made `python -m replknet_fn.convert` warn that the module
    # was already in sys.modules before it ran as __main__.
    if name == "load_official_state_dict":
        from replknet_fn.convert import load_official_state_dict
        return load_official_state_dict
    raise AttributeError(f"module 'replknet_fn' has no attribute {name!r}")
