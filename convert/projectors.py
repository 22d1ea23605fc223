"""UniPic projectors: PyTorch `nn.Sequential(Linear, SiLU, Linear)` keys <-> `MLPProjector` params.

The Sequential's Linear layers are its children 0 and 2 (1 is the SiLU). UniPic holds three of
them under the prefixes `proj_in.`, `proj_out.` and `siglip2_proj.`.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from convert.core import KeyMap, Rule, flax_to_torch, torch_to_flax
from unipic_jax.models.projectors import MLPProjector

PROJECTOR_KEYMAP = KeyMap([
    Rule("0.weight", "fc1/kernel", "linear"),
    Rule("0.bias", "fc1/bias"),
    Rule("2.weight", "fc2/kernel", "linear"),
    Rule("2.bias", "fc2/bias"),
])

PROJECTOR_PREFIXES = ("proj_in.", "proj_out.", "siglip2_proj.")


def projector_dims(config) -> dict[str, tuple[int, int, int]]:
    """(in, hidden, out) of each projector from the `projectors` config section
    (mar_dim, llm_dim, siglip_dim), keyed by its UniPic prefix."""
    return {
        "proj_in.": (config.mar_dim, config.llm_dim, config.llm_dim),
        "proj_out.": (config.llm_dim, config.llm_dim, config.mar_dim),
        "siglip2_proj.": (config.siglip_dim, config.llm_dim, config.llm_dim),
    }


def projector_param_shapes(in_dim: int, hidden: int, out: int) -> dict:
    """An `MLPProjector`'s param tree as `jax.ShapeDtypeStruct`s (nothing allocated)."""
    x = jax.ShapeDtypeStruct((1, in_dim), jnp.float32)
    return jax.eval_shape(MLPProjector(hidden, out).init, jax.random.PRNGKey(0), x)["params"]


def projector_params_from_torch(state_dict: Mapping[str, np.ndarray], in_dim: int, hidden: int, out: int,
                                *, prefix: str = "") -> dict:
    """The projector under `prefix` (e.g. `"siglip2_proj."`) -> Flax params, shapes checked; keys
    outside the prefix are ignored. Raises `convert.ConversionError` listing every problem."""
    skip = (lambda k: not k.startswith(prefix)) if prefix else None
    return torch_to_flax(state_dict, PROJECTOR_KEYMAP.prefixed(prefix, ""),
                         projector_param_shapes(in_dim, hidden, out),
                         what=f"projector {prefix.rstrip('.') or 'state dict'}", skip=skip)


def projector_params_to_torch(params: Mapping, *, prefix: str = "") -> dict[str, np.ndarray]:
    """Flax `MLPProjector` params -> PyTorch keys under `prefix`."""
    return flax_to_torch(params, PROJECTOR_KEYMAP.prefixed(prefix, ""))
