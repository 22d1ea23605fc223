"""The three UniPic projectors (reference-spec §7): Linear -> SiLU -> Linear, biases on both.

  proj_in       MAR encoder width -> LLM width -> LLM width   (MAR features into Qwen2.5)
  proj_out      LLM width -> LLM width -> MAR encoder width   (Qwen2.5 states back to the MAR)
  siglip2_proj  1152 -> LLM width -> LLM width                (built by UniPic, never called)

The input width is taken from the input; `hidden` and `out` are the two Dense widths.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unipic_jax.models.layers import Dense, silu


class MLPProjector(nn.Module):
    """Dense(hidden) -> SiLU -> Dense(out), both with bias; applies to the last axis."""

    hidden: int
    out: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
        return Dense(self.out, dtype=self.dtype, name="fc2")(silu(h))
