"""Qwen2.5 (`Qwen2ForCausalLM`) state dict <-> `unipic_jax.models.qwen2.Qwen2` params.

PyTorch keys `model.embed_tokens.weight`, `model.layers.{i}.*`, `model.norm.weight` and the tied
`lm_head.weight` (an alias of the embedding; Hugging Face safetensors files store only the
embedding, torch's `state_dict()` has both). UniPic's checkpoint holds the same keys under `llm.`.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np

from convert.core import ConversionError, KeyMap, Rule, flax_to_torch, torch_to_flax

_LAYER = [
    Rule("self_attn.q_proj.weight", "self_attn/q_proj/kernel", "linear"),
    Rule("self_attn.q_proj.bias", "self_attn/q_proj/bias"),
    Rule("self_attn.k_proj.weight", "self_attn/k_proj/kernel", "linear"),
    Rule("self_attn.k_proj.bias", "self_attn/k_proj/bias"),
    Rule("self_attn.v_proj.weight", "self_attn/v_proj/kernel", "linear"),
    Rule("self_attn.v_proj.bias", "self_attn/v_proj/bias"),
    Rule("self_attn.o_proj.weight", "self_attn/o_proj/kernel", "linear"),
    Rule("mlp.gate_proj.weight", "mlp/gate_proj/kernel", "linear"),
    Rule("mlp.up_proj.weight", "mlp/up_proj/kernel", "linear"),
    Rule("mlp.down_proj.weight", "mlp/down_proj/kernel", "linear"),
    Rule("input_layernorm.weight", "input_layernorm/scale"),
    Rule("post_attention_layernorm.weight", "post_attention_layernorm/scale"),
]

_BODY = [
    Rule("model.embed_tokens.weight", "embed_tokens/embedding"),
    *[r.prefixed("model.layers.{i}.", "layers_{i}/") for r in _LAYER],
    Rule("model.norm.weight", "norm/scale"),
]

# Tied head (Qwen2.5-1.5B, UniPic): lm_head.weight is the embedding.
QWEN2_KEYMAP = KeyMap(_BODY, tied={"lm_head.weight": "model.embed_tokens.weight"})
# Untied head: lm_head is a param of its own.
QWEN2_UNTIED_KEYMAP = KeyMap([*_BODY, Rule("lm_head.weight", "lm_head/kernel", "linear")])


def qwen2_keymap(config) -> KeyMap:
    """The key table for `config` (tied or untied head)."""
    return QWEN2_KEYMAP if config.tie_embeddings else QWEN2_UNTIED_KEYMAP


def qwen2_param_shapes(config) -> dict:
    """The param tree of `Qwen2(config)` as ShapeDtypeStructs (nothing allocated)."""
    from unipic_jax.models.qwen2 import init_params

    return jax.eval_shape(lambda rng: init_params(config, rng), jax.random.key(0))


def qwen2_params_from_torch(state_dict: Mapping[str, np.ndarray], config, *, what: str = "Qwen2 checkpoint") -> dict:
    """PyTorch `Qwen2ForCausalLM` state dict (numpy or torch-free arrays) -> Flax params.

    Every key must map and every param must be filled with the right shape; a tied
    `lm_head.weight`, when present, must equal the embedding. Raises `ConversionError` listing
    every problem at once.
    """
    return torch_to_flax(state_dict, qwen2_keymap(config), qwen2_param_shapes(config), what=what)


def qwen2_params_to_torch(params: Mapping, config=None) -> dict[str, np.ndarray]:
    """Flax params -> `Qwen2ForCausalLM` state dict, `lm_head.weight` included (tied: the
    embedding). `config` only picks the table; without it, the presence of `lm_head` does."""
    tied = config.tie_embeddings if config is not None else "lm_head" not in params
    keymap = QWEN2_KEYMAP if tied else QWEN2_UNTIED_KEYMAP
    return flax_to_torch(params, keymap)


# config.json fields with no usable default (transformers' are a 7B model's sizes).
QWEN2_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def qwen2_section_from_hf(hf: Mapping) -> dict:
    """A Hugging Face Qwen2 `config.json` dict -> the `qwen2` config section (configs/unipic_1p5b.py
    schema), read as transformers reads it (transformers 4.x `rope_theta` or 5.x `rope_parameters`;
    omitted fields take transformers' defaults, `configs.fixture.QWEN2_HF_DEFAULTS`). Raises
    `ConversionError` for a missing size or a setting the port does not implement."""
    from configs.fixture import QWEN2_HF_DEFAULTS, qwen2_section

    hf = dict(hf)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    problems = []
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"config.json: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported")
    if hf.get("use_sliding_window"):
        problems.append("config.json: use_sliding_window=true is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (silu only)")
    problems += [f"config.json: missing {k!r}" for k in QWEN2_REQUIRED if hf.get(k) is None]
    kv_default = QWEN2_HF_DEFAULTS["num_key_value_heads"]
    if "num_key_value_heads" not in hf and (hf.get("num_attention_heads") or kv_default) % kv_default:
        problems.append(f"config.json: no 'num_key_value_heads', so {kv_default} (transformers' default), "
                        f"which does not divide num_attention_heads={hf['num_attention_heads']}")
    if problems:
        raise ConversionError(problems, "Qwen2 config")
    return qwen2_section(hf)


def qwen2_config_from_hf(hf: Mapping):
    """A Hugging Face Qwen2 `config.json` dict -> `Qwen2Config` (see `qwen2_section_from_hf`)."""
    from unipic_jax.models.qwen2 import Qwen2Config

    return Qwen2Config(**qwen2_section_from_hf(hf))


# config.json field -> (state-dict key, axis) giving the same size in the weights.
_CONFIG_CHECKS = [
    ("vocab_size", "model.embed_tokens.weight", 0),
    ("hidden_size", "model.embed_tokens.weight", 1),
    ("intermediate_size", "model.layers.0.mlp.gate_proj.weight", 0),
]


def _check_config_against_weights(hf: Mapping, config, state_dict: Mapping[str, np.ndarray]) -> None:
    """Name each config.json field the weights disagree with."""
    problems = []
    for field, key, axis in _CONFIG_CHECKS:
        if key in state_dict and np.shape(state_dict[key])[axis] != hf[field]:
            problems.append(f"config.json {field}={hf[field]} but {key!r} has size "
                            f"{np.shape(state_dict[key])[axis]} on axis {axis}")
    layers = {int(k.split(".")[2]) for k in state_dict if k.startswith("model.layers.")}
    if layers and max(layers) + 1 != config.num_layers:
        problems.append(f"config.json num_hidden_layers={config.num_layers} but the weights hold "
                        f"layers 0..{max(layers)}")
    for field, key, heads in [("num_attention_heads", "model.layers.0.self_attn.q_proj.weight", config.num_heads),
                              ("num_key_value_heads", "model.layers.0.self_attn.k_proj.weight", config.num_kv_heads)]:
        if key in state_dict and np.shape(state_dict[key])[0] != heads * config.head_dim:
            problems.append(f"config.json {field}={heads} (head_dim {config.head_dim}) but {key!r} has "
                            f"{np.shape(state_dict[key])[0]} output rows")
    if problems:
        raise ConversionError(problems, "Qwen2 config.json against its weights")


def qwen2_from_hf_folder(path: str | os.PathLike):
    """A Hugging Face Qwen2 folder (config.json + safetensors/bin) -> (Qwen2Config, params).

    The config must agree with the weights (a disagreement is a `ConversionError` naming the
    config.json field); the weights then go through `qwen2_params_from_torch`.
    """
    from convert.hf import load_hf_folder

    hf, state_dict = load_hf_folder(path)
    config = qwen2_config_from_hf(hf)
    _check_config_against_weights(hf, config, state_dict)
    return config, qwen2_params_from_torch(state_dict, config, what=f"Qwen2 folder {os.fspath(path)}")
