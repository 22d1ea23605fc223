"""SigLIP2 vision tower: Hugging Face `SiglipVisionModel` keys <-> `unipic_jax.models.siglip` params.

The key table uses the layout of transformers 4.x (the version UniPic pins) and of published
checkpoints: `vision_model.*`. Inside UniPic the same keys sit under `siglip2.`
(`siglip2.vision_model.encoder.layers.0.self_attn.q_proj.weight`), so pass `prefix="siglip2."`.
Two other layouts reach the same table through `hf_vision_state_dict`: transformers >= 5 saves a
`SiglipVisionModel` without the `vision_model.` level, and a published SigLIP2 folder holds the
whole `SiglipModel` (text tower, `logit_scale`, `logit_bias` too, with a config.json whose
`vision_config` describes the tower); only the vision part is read, as
`SiglipVisionModel.from_pretrained` does.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from configs.fixture import siglip_section
from convert.core import KeyMap, Rule, flax_to_torch, torch_to_flax
from convert.hf import load_hf_folder
from unipic_jax.models.siglip import SiglipConfig, SiglipVisionModel

_LAYER = "vision_model.encoder.layers.{i}."
_HEAD = "vision_model.head."


def _linear(torch_name: str, flax_name: str) -> list[Rule]:
    return [Rule(f"{torch_name}.weight", f"{flax_name}/kernel", "linear"),
            Rule(f"{torch_name}.bias", f"{flax_name}/bias")]


def _norm(torch_name: str, flax_name: str) -> list[Rule]:
    return [Rule(f"{torch_name}.weight", f"{flax_name}/scale"), Rule(f"{torch_name}.bias", f"{flax_name}/bias")]


SIGLIP_KEYMAP = KeyMap([
    Rule("vision_model.embeddings.patch_embedding.weight", "embeddings/patch_embedding/kernel", "conv"),
    Rule("vision_model.embeddings.patch_embedding.bias", "embeddings/patch_embedding/bias"),
    Rule("vision_model.embeddings.position_embedding.weight", "embeddings/position_embedding/embedding"),
    *(r for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
      for r in _linear(f"{_LAYER}self_attn.{proj}", f"layers_{{i}}/self_attn/{proj}")),
    *_norm(f"{_LAYER}layer_norm1", "layers_{i}/layer_norm1"),
    *_norm(f"{_LAYER}layer_norm2", "layers_{i}/layer_norm2"),
    *_linear(f"{_LAYER}mlp.fc1", "layers_{i}/mlp/fc1"),
    *_linear(f"{_LAYER}mlp.fc2", "layers_{i}/mlp/fc2"),
    *_norm("vision_model.post_layernorm", "post_layernorm"),
    Rule(f"{_HEAD}probe", "head/probe"),
    # nn.MultiheadAttention's fused (3D, D) in_proj_weight, rows [q; k; v] -> (D, 3D) kernel.
    Rule(f"{_HEAD}attention.in_proj_weight", "head/in_proj_kernel", "linear"),
    Rule(f"{_HEAD}attention.in_proj_bias", "head/in_proj_bias"),
    *_linear(f"{_HEAD}attention.out_proj", "head/out_proj"),
    *_norm(f"{_HEAD}layernorm", "head/layernorm"),
    *_linear(f"{_HEAD}mlp.fc1", "head/mlp/fc1"),
    *_linear(f"{_HEAD}mlp.fc2", "head/mlp/fc2"),
])

# Keys of a full `SiglipModel` checkpoint that the vision tower does not use.
_NOT_VISION = ("text_model.", "logit_scale", "logit_bias")
_VISION = "vision_model."


def siglip_param_shapes(config: SiglipConfig) -> dict:
    """The tower's param tree as `jax.ShapeDtypeStruct`s (nothing allocated)."""
    pixels = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
    return jax.eval_shape(SiglipVisionModel(config).init, jax.random.PRNGKey(0), pixels)["params"]


def siglip_params_from_torch(state_dict: Mapping[str, np.ndarray], config: SiglipConfig, *,
                             prefix: str = "", what: str = "SigLIP checkpoint") -> dict:
    """PyTorch `SiglipVisionModel` state dict -> Flax params, checked against `config`'s shapes.

    With a `prefix` (UniPic's `"siglip2."`) keys outside it are ignored. Raises
    `convert.ConversionError` listing every unmapped, missing or misshapen key.
    """
    skip = (lambda k: not k.startswith(prefix)) if prefix else None
    return torch_to_flax(state_dict, SIGLIP_KEYMAP.prefixed(prefix, ""), siglip_param_shapes(config),
                         what=what, skip=skip)


def siglip_params_to_torch(params: Mapping, *, prefix: str = "") -> dict[str, np.ndarray]:
    """Flax params -> PyTorch `SiglipVisionModel` state dict (keys under `prefix`)."""
    return flax_to_torch(params, SIGLIP_KEYMAP.prefixed(prefix, ""))


def hf_vision_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A Hugging Face SigLIP state dict in the table's `vision_model.*` layout: the text tower and
    logit scale/bias of a `SiglipModel` dropped, transformers-5 keys given their `vision_model.`."""
    return {(k if k.startswith(_VISION) else _VISION + k): v
            for k, v in state_dict.items() if not k.startswith(_NOT_VISION)}


def _square(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"SigLIP config: non-square {name} {value} is not supported")
        value = value[0]
    return int(value)


def siglip_section_from_hf(hf: Mapping) -> dict:
    """The `siglip` config section (configs/unipic_1p5b.py schema) from an HF config.json dict: a
    `SiglipVisionConfig`, or a `SiglipModel` config whose `vision_config` is used. Fields left out
    take transformers' defaults (`configs.fixture.SIGLIP_HF_DEFAULTS`), as transformers 4.x writes
    a nested `vision_config` without them."""
    if "vision_config" in hf or hf.get("model_type") == "siglip":
        hf = hf.get("vision_config") or {}
    hf = dict(hf)
    act = hf.get("hidden_act", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"SigLIP config: hidden_act {act!r}; the port implements 'gelu_pytorch_tanh'")
    for name in ("image_size", "patch_size"):
        if name in hf:
            hf[name] = _square(hf[name], name)
    return siglip_section(hf, use_head=hf.get("vision_use_head", True))


def siglip_config_from_hf(hf: Mapping) -> SiglipConfig:
    """`SiglipConfig` from an HF config.json dict (see `siglip_section_from_hf`)."""
    return SiglipConfig(**siglip_section_from_hf(hf))


def siglip_from_hf_folder(path: str | os.PathLike) -> tuple[SiglipConfig, dict]:
    """Read a Hugging Face SigLIP folder -> (config, Flax params).

    The weights are checked against config.json: a disagreement (another width, layer count, patch
    size, a head the config says is absent) raises `convert.ConversionError` naming each key.
    """
    hf_config, state_dict = load_hf_folder(path)
    config = siglip_config_from_hf(hf_config)
    params = siglip_params_from_torch(hf_vision_state_dict(state_dict), config,
                                      what=f"SigLIP folder {os.fspath(path)} against its config.json")
    return config, params
