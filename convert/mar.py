"""Key table of the MAR encoder/decoder: PyTorch `MAR` state dict <-> `unipic_jax.models.mar` params.

The diffusion head inside the same state dict (`diffloss.*`) has its own table
(`convert/diffusion.py`); callers of `MAR_KEYMAP` skip those keys (`is_diffloss_key`). Inside UniPic
the table sits under `mar.` (`MAR_KEYMAP.prefixed("mar.", "mar/")`). Module names match one to
one: `.{i}.` becomes `_{i}`, Linear weight -> kernel (transposed), LayerNorm weight -> scale; the
free tensors (position tables, fake_latent, mask_token, class_emb) keep their PyTorch shapes.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from convert.core import KeyMap, Rule, flax_to_torch, torch_to_flax
from unipic_jax.models.mar import MARConfig, param_shapes


def _linear(torch_prefix: str, flax_prefix: str) -> list[Rule]:
    return [Rule(f"{torch_prefix}.weight", f"{flax_prefix}/kernel", "linear"),
            Rule(f"{torch_prefix}.bias", f"{flax_prefix}/bias")]


def _norm(torch_prefix: str, flax_prefix: str) -> list[Rule]:
    return [Rule(f"{torch_prefix}.weight", f"{flax_prefix}/scale"),
            Rule(f"{torch_prefix}.bias", f"{flax_prefix}/bias")]


# One timm Block (`unipic_jax.models.mar.Block`), un-prefixed.
BLOCK_KEYMAP = KeyMap(
    _norm("norm1", "norm1") + _linear("attn.qkv", "attn/qkv") + _linear("attn.proj", "attn/proj")
    + _norm("norm2", "norm2") + _linear("mlp.fc1", "mlp/fc1") + _linear("mlp.fc2", "mlp/fc2")
)

MAR_KEYMAP = (
    KeyMap(
        [Rule(name, name) for name in ("fake_latent", "mask_token", "encoder_pos_embed_learned",
                                       "decoder_pos_embed_learned", "diffusion_pos_embed_learned")]
        + [Rule("class_emb.weight", "class_emb")]
        + _linear("z_proj", "z_proj") + _norm("z_proj_ln", "z_proj_ln")
        + _norm("encoder_norm", "encoder_norm")
        + _linear("decoder_embed", "decoder_embed") + _norm("decoder_norm", "decoder_norm")
    )
    + BLOCK_KEYMAP.prefixed("encoder_blocks.{i}.", "encoder_blocks_{i}/")
    + BLOCK_KEYMAP.prefixed("decoder_blocks.{i}.", "decoder_blocks_{i}/")
)


def is_diffloss_key(key: str) -> bool:
    """Keys of the diffusion head, which `MAR_KEYMAP` leaves to `convert/diffusion.py`."""
    return key.startswith("diffloss.")


def mar_params_from_torch(state_dict: Mapping[str, np.ndarray], config: MARConfig) -> dict:
    """An un-prefixed MAR state dict -> `MAR(config)` params (diffloss keys ignored).

    Raises `ConversionError` listing every unmapped key, missing param and shape mismatch.
    """
    return torch_to_flax(state_dict, MAR_KEYMAP, param_shapes(config), what="MAR checkpoint",
                         skip=is_diffloss_key)


def mar_params_to_torch(params: Mapping) -> dict[str, np.ndarray]:
    """`MAR` params -> the PyTorch state dict without diffloss keys (numpy, PyTorch layouts)."""
    return flax_to_torch(params, MAR_KEYMAP, what="MAR params")
