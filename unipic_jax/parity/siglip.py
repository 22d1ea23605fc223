"""Parity rows for siglip/: the SigLIP2 vision tower (HF `SiglipVisionModel`) on its stored pixels.

Rows: `last_hidden_state` (after post_layernorm), `pooler_output` (MAP head; absent without a
head), and every `hidden_states/{i}` (0 = embeddings, i = output of layer i). All are single
forward passes, so each is held to FORWARD (1e-4 x max|ref|).
"""

from __future__ import annotations

import jax
import numpy as np

from convert.siglip import siglip_params_from_torch
from unipic_jax.models.siglip import SiglipConfig, SiglipVisionModel
from unipic_jax.parity import FORWARD, Fixture, Row, compare


def rows(fx: Fixture):
    config = SiglipConfig(**fx.config().siglip)
    params = siglip_params_from_torch(fx.weights, config, what=f"{fx.folder}/weights.safetensors")
    io = fx.io
    pixels_bhwc = np.transpose(io["pixel_values"], (0, 2, 3, 1))  # fixture images are NCHW
    model = SiglipVisionModel(config)
    out = jax.jit(lambda p, x: model.apply({"params": p}, x, output_hidden_states=True))(params, pixels_bhwc)
    yield compare("siglip", "last_hidden_state", out.last_hidden_state, io["last_hidden_state"], FORWARD)
    if "pooler_output" in io:
        yield compare("siglip", "pooler_output", out.pooler_output, io["pooler_output"], FORWARD)
    stored = sorted((k for k in io if k.startswith("hidden_states/")), key=lambda k: int(k.split("/")[1]))
    if len(stored) != len(out.hidden_states):
        yield Row("siglip", "hidden_states", float("inf"), 0.0, 0.0, False,
                  f"{len(out.hidden_states)} computed, {len(stored)} stored")
    for key in stored:
        i = int(key.split("/")[1])
        if i < len(out.hidden_states):
            yield compare("siglip", key, out.hidden_states[i], io[key], FORWARD)
