"""Parity rows for qwen2/: the padded forward and UniPic's KV-cache protocol (fixtures README).

padded/*: embeddings of `input_ids` at positions 0..L-1 (the HF default) with the padding mask.
cache/*: the reference prefills the whole padded prompt with no mask (positions 0..L-1), then runs
each step's new tokens with its stored position_ids and attention_mask `[prompt_mask ; ones]`
against that prefix and truncates the cache back. Here: `prefill` without a key mask, the cache's
validity set to the step mask's prompt part, then `peek` (which never writes).
"""

from __future__ import annotations

import re
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from convert.qwen2 import qwen2_params_from_torch
from unipic_jax.models.qwen2 import KVCache, Qwen2, Qwen2Config
from unipic_jax.parity import FORWARD, Row, compare

NAME = "qwen2"


def load(fx) -> tuple[Qwen2, dict]:
    """The float32 model and its params from the fixture's weights."""
    config = Qwen2Config(**fx.config().qwen2)
    return Qwen2(config), {"params": qwen2_params_from_torch(fx.weights, config)}


def _steps(io: dict) -> list[int]:
    found = {int(m.group(1)) for k in io if (m := re.match(r"cache/step(\d+)/", k))}
    return sorted(found)


def _step_input(io: dict, step: int) -> np.ndarray:
    """New-token embeddings of step k: `x_new` for step 1, `x_new{k}` after (README naming)."""
    return io["x_new" if step == 1 else f"x_new{step}"]


def rows(fx) -> Iterator[Row]:
    model, variables = load(fx)
    io = fx.io
    ids = jnp.asarray(io["input_ids"])
    mask = jnp.asarray(io["attention_mask"])
    b, length = ids.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    x = model.apply(variables, ids, method=Qwen2.embed)

    forward = jax.jit(lambda v, x, p, m: model.apply(v, x, p, m, return_hidden_states=True, return_logits=True))
    out = forward(variables, x, positions, mask)
    yield compare(NAME, "padded/logits", out.logits, io["padded/logits"], FORWARD)
    yield compare(NAME, "padded/last_hidden_state", out.last_hidden_state, io["padded/last_hidden_state"], FORWARD)
    for i, h in enumerate(out.hidden_states):
        yield compare(NAME, f"padded/hidden_states/{i}", h, io[f"padded/hidden_states/{i}"], FORWARD)

    cache = KVCache.create(model.config, b, length)
    prefix, cache = jax.jit(lambda v, c, x, p: model.apply(v, c, x, p, method=Qwen2.prefill))(
        variables, cache, x, positions)
    yield compare(NAME, "cache/prefix_last_hidden_state", prefix.last_hidden_state,
                  io["cache/prefix_last_hidden_state"], FORWARD)
    for layer in range(model.config.num_layers):
        # Reference layout (B, kv_heads, L, head_dim); ours (B, L, kv_heads, head_dim).
        for name, buf in (("keys", cache.k), ("values", cache.v)):
            yield compare(NAME, f"cache/prefix_{name}/{layer}", jnp.swapaxes(buf[layer, :, :length], 1, 2),
                          io[f"cache/prefix_{name}/{layer}"], FORWARD)

    peek = jax.jit(lambda v, c, x, p: model.apply(v, c, x, p, return_logits=True, method=Qwen2.peek))
    for step in _steps(io):
        step_mask = io[f"cache/step{step}/attention_mask"]
        if not np.all(step_mask[:, length:]):
            raise ValueError(f"cache/step{step}/attention_mask masks new tokens; the protocol never does")
        stepped = cache.replace(valid=jnp.asarray(step_mask[:, :length], bool))
        out = peek(variables, stepped, jnp.asarray(_step_input(io, step)),
                   jnp.asarray(io[f"cache/step{step}/position_ids"], jnp.int32))
        yield compare(NAME, f"cache/step{step}/last_hidden_state", out.last_hidden_state,
                      io[f"cache/step{step}/last_hidden_state"], FORWARD)
        yield compare(NAME, f"cache/step{step}/logits", out.logits, io[f"cache/step{step}/logits"], FORWARD)
