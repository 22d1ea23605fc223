"""PyTorch <-> Flax weight mapping. Only this package knows PyTorch key names."""

from convert.core import ConversionError, KeyMap, Rule, flax_to_torch, torch_to_flax
from convert.io import CheckpointFileError, load_state_dict, save_state_dict

__all__ = ["ConversionError", "KeyMap", "Rule", "flax_to_torch", "torch_to_flax",
           "CheckpointFileError", "load_state_dict", "save_state_dict"]
