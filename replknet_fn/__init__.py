"""replknet_fn: RepLKNet on MindSpore, trained by a functional pipeline."""
from replknet_fn.model import (MODELS, build_replknet, create_model, replknet31_base, replknet31_large,
                               replknet_tiny, replknet_xlarge)
from replknet_fn.convert import load_official_state_dict
from replknet_fn.reparam import reparameterize
