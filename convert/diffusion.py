"""Key table of the DiffLoss head (SimpleMLPAdaLN), relative to the MAR's `diffloss.net.`.

The MAR state dict holds the head as `diffloss.net.*` (UniPic's as `mar.diffloss.net.*`). PyTorch
`nn.Sequential` indices name the Flax submodules (`mlp.0` -> `mlp_0`, `adaLN_modulation.1` ->
`adaLN_modulation_1`); `final_layer.norm_final` has no affine parameters, hence no key.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from convert.core import KeyMap, Rule, flax_to_torch, torch_to_flax
from unipic_jax.models.diffusion import DiffusionConfig, head_param_shapes

HEAD_PREFIX = "diffloss.net."


def _linear(torch_name: str, flax_name: str) -> list[Rule]:
    return [Rule(f"{torch_name}.weight", f"{flax_name}/kernel", "linear"),
            Rule(f"{torch_name}.bias", f"{flax_name}/bias")]


HEAD_KEYMAP = KeyMap([
    *_linear("time_embed.mlp.0", "time_embed/mlp_0"),
    *_linear("time_embed.mlp.2", "time_embed/mlp_2"),
    *_linear("cond_embed", "cond_embed"),
    *_linear("input_proj", "input_proj"),
    Rule("res_blocks.{i}.in_ln.weight", "res_blocks_{i}/in_ln/scale"),
    Rule("res_blocks.{i}.in_ln.bias", "res_blocks_{i}/in_ln/bias"),
    *_linear("res_blocks.{i}.mlp.0", "res_blocks_{i}/mlp_0"),
    *_linear("res_blocks.{i}.mlp.2", "res_blocks_{i}/mlp_2"),
    *_linear("res_blocks.{i}.adaLN_modulation.1", "res_blocks_{i}/adaLN_modulation_1"),
    *_linear("final_layer.linear", "final_layer/linear"),
    *_linear("final_layer.adaLN_modulation.1", "final_layer/adaLN_modulation_1"),
])


def head_params_from_torch(state_dict: Mapping[str, np.ndarray], config: DiffusionConfig,
                           prefix: str = HEAD_PREFIX) -> dict:
    """Head params from a state dict holding `<prefix>*` keys (other keys are ignored), checked
    against the shapes of `SimpleMLPAdaLN(config)`; raises `ConversionError` listing every problem."""
    sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return torch_to_flax(sub, HEAD_KEYMAP, head_param_shapes(config), what="diffusion head")


def head_params_to_torch(params: Mapping, prefix: str = HEAD_PREFIX) -> dict[str, np.ndarray]:
    """Inverse of `head_params_from_torch`: keys `<prefix>*` in PyTorch layouts."""
    return flax_to_torch(params, HEAD_KEYMAP.prefixed(prefix, ""), what="diffusion head params")
