"""Qwen2.5 decoder (Hugging Face `Qwen2ForCausalLM`) with a static KV cache (reference-spec §5).

x (B, T, D) embeddings, positions (B, T) from the caller, a key-validity mask
  -> per layer: x + attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))
       attn: GQA (query head h reads KV head h // (heads / kv_heads)), q/k/v with bias, o without,
             RoPE (theta from the config, rotate-half convention) on q and k, softmax in float32
  -> final RMSNorm = last_hidden_state; logits = last_hidden_state @ embed^T (tied head)

UniPic drives the LLM through three cache calls, all with static shapes:
  * `prefill`: run the (right-padded) prompt, write its K/V into cache slots [0, L);
  * `peek`: run new tokens against [valid cached keys ; new tokens (causal among them)] without
    writing anything -- what the reference gets by truncating its cache after every MAR step;
  * `decode`: the same attention, then append the new K/V at the cache length (text generation).
Each call's mask is structure, not a dense (B, T, S) array (`attention.CausalKeyMask`: cache
validity, causal among the new tokens, new-token validity), so that `attention.attend_gqa` can
hand it to a TPU kernel; the kernel is chosen by platform there (on CPU: the eager arithmetic
described here, the parity path).
`__call__` is the plain cache-free forward (parity, training). RMSNorm statistics, RoPE cos/sin and
the attention softmax are float32 whatever the compute `dtype`; in bf16 every op rounds as the
reference's (transformers' eager attention) does (layers.py). With `remat=True` every decoder
layer is rematerialised on its own in the backward pass (`nn.remat`; param names unchanged).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from unipic_jax.models import attention
from unipic_jax.models.attention import CausalKeyMask
from unipic_jax.models.layers import Dense, Embed, add, mul, round_to, silu
from unipic_jax.sharding import constrain

Dtype = Any


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """The `qwen2` section of configs/unipic_1p5b.py, plus the RoPE frequency rounding knob.

    `rope_inv_freq_dtype`: dtype the inverse frequencies are rounded to before use. The reference
    casts the whole model to bf16, which rounds its `inv_freq` buffer too (fixtures README, bf16
    section); a bf16 policy sets "bfloat16" here to reproduce that. Angles, cos and sin are float32
    either way.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    tie_embeddings: bool
    max_position_embeddings: int
    rope_inv_freq_dtype: str = "float32"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")


def rope_inv_freq(head_dim: int, theta: float, dtype: str = "float32") -> np.ndarray:
    """`1 / theta^(2i / head_dim)` for i < head_dim / 2, float32 (rounded through `dtype` first).

    The power is taken in float64 and rounded, which matches torch's float32 table to the last bit
    at the real and fixture sizes but one entry of 64 (one ulp).
    """
    exponent = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    inv_freq = np.float32(1.0) / (float(theta) ** exponent.astype(np.float64)).astype(np.float32)
    return inv_freq.astype(jnp.dtype(dtype)).astype(np.float32)


def rope_cos_sin(positions_bt: jax.Array, inv_freq_k: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables (B, T, head_dim) in float32: angles `[p * inv_freq, p * inv_freq]`."""
    angles_btk = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_k)
    angles_btk = jnp.concatenate([angles_btk, angles_btk], axis=-1)
    return jnp.cos(angles_btk), jnp.sin(angles_btk)


def apply_rope(x_bthk: jax.Array, cos_btk: jax.Array, sin_btk: jax.Array) -> jax.Array:
    """Rotate-half RoPE: x * cos + [-x2, x1] * sin, with dims (i, i + head_dim/2) paired; cos and
    sin rounded to x's dtype, then three rounded ops (transformers' `apply_rotary_pos_emb`)."""
    cos = round_to(cos_btk[:, :, None, :], x_bthk.dtype)
    sin = round_to(sin_btk[:, :, None, :], x_bthk.dtype)
    x1, x2 = jnp.split(x_bthk, 2, axis=-1)
    return add(mul(x_bthk, cos), mul(jnp.concatenate([-x2, x1], axis=-1), sin))


def positions_from_mask(mask_bt: jax.Array) -> jax.Array:
    """The reference's position rule: `cumsum(mask) - 1`, negatives set to 0 (int32)."""
    return jnp.maximum(jnp.cumsum(mask_bt.astype(jnp.int32), axis=-1) - 1, 0)


@flax.struct.dataclass
class KVCache:
    """A preallocated KV cache: every shape fixed at creation, updated functionally.

    k, v: (layers, B, S, kv_heads, head_dim) keys after RoPE and values, in the compute dtype;
    valid: (B, S) bool, the slots a new token may attend to (pads and unwritten slots are False);
    length: () int32, the next slot `decode` writes (`prefill` sets it to the prompt length).
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    length: jax.Array

    @classmethod
    def create(cls, config: Qwen2Config, batch: int, max_len: int, dtype: Dtype = jnp.float32) -> "KVCache":
        shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, max_len), bool), length=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def next_positions(self, num_new: int) -> jax.Array:
        """Positions (B, num_new) of tokens appended after the valid cached ones: the reference
        rule `cumsum([prompt_mask ; ones]) - 1` restricted to the new tokens."""
        count_b = jnp.sum(self.valid, axis=-1, dtype=jnp.int32)
        return count_b[:, None] + jnp.arange(num_new, dtype=jnp.int32)


@flax.struct.dataclass
class Qwen2Output:
    """`last_hidden_state` (B, T, D) after the final norm; `hidden_states` (HF convention: 0 =
    embeddings, i = output of layer i, last = final-norm output) or None; `logits` (B, T, V)
    float32 or None."""

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    logits: jax.Array | None = None


class RMSNorm(nn.Module):
    """`weight * (x * rsqrt(mean(x^2) + eps)).astype(dtype)`, statistics in float32 (transformers'
    Qwen2RMSNorm: the normalised value rounds, then the product with the weight)."""

    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        weight = self.param("scale", nn.initializers.ones, (x_btd.shape[-1],), jnp.float32)
        x32 = x_btd.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return mul(weight.astype(self.dtype), round_to(normed, self.dtype))


class Qwen2MLP(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases; in bf16 silu's output rounds, then the product."""

    config: Qwen2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        dense = lambda n, name: Dense(n, use_bias=False, dtype=self.dtype, name=name)
        inter = self.config.intermediate_size
        h = mul(silu(dense(inter, "gate_proj")(x_btd)), dense(inter, "up_proj")(x_btd))
        return dense(self.config.hidden_size, "down_proj")(h)


class Qwen2Attention(nn.Module):
    """Grouped-query attention over [past keys ; new keys] (`attention.attend_gqa`: the kernel
    is chosen by platform there)."""

    config: Qwen2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd, cos_btk, sin_btk, mask, past_k_bskd=None, past_v_bskd=None):
        """Returns the attention output (B, T, D) and this call's (k, v), each (B, T, kv_heads,
        head_dim), for the caller to cache. `mask` covers the past keys then the new ones: an
        `attention.CausalKeyMask`, or a dense (B, T, S) bool array."""
        cfg = self.config
        b, t, _ = x_btd.shape

        def project(heads, name, bias=True):
            y = Dense(heads * cfg.head_dim, use_bias=bias, dtype=self.dtype, name=name)(x_btd)
            return y.reshape(b, t, heads, cfg.head_dim)

        q_bthk = apply_rope(project(cfg.num_heads, "q_proj"), cos_btk, sin_btk)
        k_btkd = apply_rope(project(cfg.num_kv_heads, "k_proj"), cos_btk, sin_btk)
        v_btkd = project(cfg.num_kv_heads, "v_proj")
        keys, values = k_btkd, v_btkd
        if past_k_bskd is not None:
            keys = jnp.concatenate([past_k_bskd.astype(self.dtype), k_btkd], axis=1)
            values = jnp.concatenate([past_v_bskd.astype(self.dtype), v_btkd], axis=1)

        # Query head h = kv_head * groups + g reads KV head `kv_head`.
        out_bthk = attention.attend_gqa(q_bthk, keys, values, mask, self.dtype)
        out_btd = out_bthk.reshape(b, t, cfg.num_heads * cfg.head_dim)
        out_btd = Dense(cfg.hidden_size, use_bias=False, dtype=self.dtype, name="o_proj")(out_btd)
        return out_btd, (k_btkd, v_btkd)


class Qwen2DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(input_layernorm(x)); x + mlp(post_attention_layernorm(x))."""

    config: Qwen2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd, cos_btk, sin_btk, mask, past_k_bskd=None, past_v_bskd=None):
        eps = self.config.rms_eps
        x_btd = constrain(x_btd, ("batch", "length", "act_embed"))
        h, kv = Qwen2Attention(self.config, self.dtype, name="self_attn")(
            RMSNorm(eps, self.dtype, name="input_layernorm")(x_btd), cos_btk, sin_btk, mask,
            past_k_bskd, past_v_bskd)
        x_btd = add(x_btd, h)
        x_btd = add(x_btd, Qwen2MLP(self.config, self.dtype, name="mlp")(
            RMSNorm(eps, self.dtype, name="post_attention_layernorm")(x_btd)))
        return constrain(x_btd, ("batch", "length", "act_embed")), kv


RematDecoderLayer = nn.remat(Qwen2DecoderLayer)  # every argument is a pytree of arrays (or None)


class Qwen2(nn.Module):
    """Qwen2ForCausalLM. Params: embed_tokens, layers_{i}, norm (and lm_head when untied)."""

    config: Qwen2Config
    dtype: Dtype = jnp.float32
    remat: bool = False  # rematerialise each decoder layer in the backward pass (training memory)

    def setup(self):
        cfg = self.config
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                                     embedding_init=nn.initializers.normal(0.02))
        layer = RematDecoderLayer if self.remat else Qwen2DecoderLayer
        self.layers = [layer(cfg, self.dtype) for _ in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.rms_eps, self.dtype)
        if not cfg.tie_embeddings:
            self.lm_head = Dense(cfg.vocab_size, use_bias=False, dtype=self.dtype)
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_inv_freq_dtype)

    def embed(self, ids_bt: jax.Array) -> jax.Array:
        """Token embeddings (B, T, D) in the compute dtype (not scaled)."""
        return self.embed_tokens(ids_bt)

    def logits(self, h_btd: jax.Array) -> jax.Array:
        """Final-norm hidden states -> logits (B, T, V), computed in the compute dtype, returned in
        float32 (the reference upcasts its head's output)."""
        if self.config.tie_embeddings:
            out = self.embed_tokens.attend(h_btd.astype(self.dtype))
        else:
            out = self.lm_head(h_btd)
        return out.astype(jnp.float32)

    def _stack(self, x_btd, positions_bt, mask, cache, return_hidden_states, return_logits):
        """Every layer, then the final norm. With `cache`, layer i attends to [cache.k[i] ; new]
        under `mask` (an `attention.CausalKeyMask`)."""
        cos, sin = rope_cos_sin(positions_bt, self.inv_freq)
        x_btd = round_to(x_btd, self.dtype)
        hidden, new_k, new_v = [x_btd], [], []
        for i, layer in enumerate(self.layers):
            past = (cache.k[i], cache.v[i]) if cache is not None else (None, None)
            x_btd, (k, v) = layer(x_btd, cos, sin, mask, *past)
            hidden.append(x_btd)
            new_k.append(k)
            new_v.append(v)
        h_btd = self.norm(x_btd)
        hidden[-1] = h_btd
        out = Qwen2Output(
            last_hidden_state=h_btd,
            hidden_states=tuple(hidden) if return_hidden_states else None,
            logits=self.logits(h_btd) if return_logits else None,
        )
        return out, jnp.stack(new_k), jnp.stack(new_v)

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, key_mask_bt: jax.Array | None = None,
                 *, return_hidden_states: bool = False, return_logits: bool = False) -> Qwen2Output:
        """Cache-free forward of embeddings `x_btd` at `positions_bt`: causal attention, with
        `key_mask_bt` (B, T) (1 = valid) hiding padded keys; None = all valid."""
        out, _, _ = self._stack(x_btd, positions_bt, CausalKeyMask(new_valid_bt=key_mask_bt), None,
                                return_hidden_states, return_logits)
        return out

    def forward_tokens(self, ids_bt: jax.Array, positions_bt: jax.Array, key_mask_bt: jax.Array | None = None,
                       **kwargs) -> Qwen2Output:
        """`__call__` on the embeddings of token ids (B, T)."""
        return self(self.embed(ids_bt), positions_bt, key_mask_bt, **kwargs)

    def prefill(self, cache: KVCache, x_btd: jax.Array, positions_bt: jax.Array,
                key_mask_bt: jax.Array | None = None, *, return_hidden_states: bool = False,
                return_logits: bool = False) -> tuple[Qwen2Output, KVCache]:
        """Run a prompt (B, L, D) as `__call__` does and write its K/V into cache slots [0, L).

        The cache's `valid` becomes `key_mask_bt` on [0, L) (False beyond) and `length` L. Any
        earlier cache content is discarded.
        """
        b, t, _ = x_btd.shape
        if t > cache.max_len:
            raise ValueError(f"prompt of {t} tokens does not fit a cache of {cache.max_len} slots")
        out, k, v = self._stack(x_btd, positions_bt, CausalKeyMask(new_valid_bt=key_mask_bt), None,
                                return_hidden_states, return_logits)
        valid_bt = jnp.ones((b, t), bool) if key_mask_bt is None else key_mask_bt.astype(bool)
        cache = KVCache(
            k=jax.lax.dynamic_update_slice(jnp.zeros_like(cache.k), k.astype(cache.k.dtype), (0,) * 5),
            v=jax.lax.dynamic_update_slice(jnp.zeros_like(cache.v), v.astype(cache.v.dtype), (0,) * 5),
            valid=jnp.zeros_like(cache.valid).at[:, :t].set(valid_bt),
            length=jnp.asarray(t, jnp.int32),
        )
        return out, cache

    def peek(self, cache: KVCache, x_btd: jax.Array, positions_bt: jax.Array, *,
             return_hidden_states: bool = False, return_logits: bool = False) -> Qwen2Output:
        """Run new tokens (B, l, D) after the cache, leaving the cache untouched.

        Token i attends to every valid cached slot and to new tokens 0..i. This is one MAR step
        of the reference (its cache grows and is then truncated back to the prompt).
        """
        out, _, _ = self._stack(x_btd, positions_bt, CausalKeyMask(cache.valid), cache,
                                return_hidden_states, return_logits)
        return out

    def decode(self, cache: KVCache, x_btd: jax.Array, positions_bt: jax.Array,
               key_mask_bt: jax.Array | None = None, *, return_hidden_states: bool = False,
               return_logits: bool = False) -> tuple[Qwen2Output, KVCache]:
        """`peek`, then append the new K/V at slots [length, length + l) and mark them valid.

        `key_mask_bt` (B, l), 1 = valid, hides new padded tokens from the others and leaves
        their slots invalid (None: all valid). The caller keeps `length + l <= cache.max_len`
        (a write past the end would be clamped).
        """
        b, t, _ = x_btd.shape
        out, k, v = self._stack(x_btd, positions_bt, CausalKeyMask(cache.valid, key_mask_bt), cache,
                                return_hidden_states, return_logits)
        at = (0, 0, cache.length, 0, 0)
        valid_bt = jnp.ones((b, t), bool) if key_mask_bt is None else key_mask_bt.astype(bool)
        cache = KVCache(
            k=jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), at),
            v=jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), at),
            valid=jax.lax.dynamic_update_slice(cache.valid, valid_bt, (0, cache.length)),
            length=cache.length + t,
        )
        return out, cache


def init_params(config: Qwen2Config, rng: jax.Array) -> dict:
    """Random float32 params of `Qwen2(config)` (every param, the head included)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return Qwen2(config).init(rng, ids, ids, return_logits=True, method=Qwen2.forward_tokens)["params"]
