"""SigLIP2 vision tower (Hugging Face `SiglipVisionModel`), as UniPic-1 builds it (reference-spec §6).

pixels (B, S, S, C) in [-1, 1]
  -> patch conv (kernel = stride = patch, VALID) -> (B, N, D), N = (S / patch)^2, raster order
  -> + learned position embedding (N, D)               = hidden_states[0]
  -> pre-LN layers: x + attn(LN1(x)); x + MLP(LN2(x))  = hidden_states[i]   (tanh GELU)
  -> post_layernorm                                    = last_hidden_state
  -> MAP head: a learned probe attends to the tokens (nn.MultiheadAttention), then
     y + MLP(LN(y))                                    = pooler_output (B, D)

The position table is used at its native size only (UniPic feeds 512 px to a 512 px tower); any
other input size is an error rather than a silent interpolation. Norm statistics and softmax run in
float32 whatever the compute `dtype`; in bf16 every op rounds as the reference's (transformers'
eager attention, torch's nn.MultiheadAttention) does (layers.py). The encoder's self-attention
takes its kernel from `attention.attend` (that arithmetic on CPU, fused or Pallas kernels on GPU
and TPU); the MAP head's one probe query keeps its own. With `remat=True` every encoder
layer is rematerialised on its own in the backward pass (`nn.remat`; param names unchanged).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from unipic_jax.models import attention
from unipic_jax.models.layers import Conv, Dense, LayerNorm, add, einsum, gelu, linear, round_to, rounds, scalar_mul
from unipic_jax.sharding import constrain

Dtype = Any


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    """The `siglip` section of configs/unipic_1p5b.py."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    ln_eps: float
    use_head: bool

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@flax.struct.dataclass
class SiglipOutput:
    """`last_hidden_state` (B, N, D) after post_layernorm; `pooler_output` (B, D) or None without a
    head; `hidden_states` (embeddings, layer 1 ... layer L outputs) before post_layernorm, or None."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array | None
    hidden_states: tuple[jax.Array, ...] | None


def _layer_norm(eps: float, dtype: Dtype, name: str | None = None) -> LayerNorm:
    # Two-pass variance in float32, as torch's LayerNorm computes it.
    return LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def _split_heads(x_btd: jax.Array, num_heads: int) -> jax.Array:
    b, t, d = x_btd.shape
    return x_btd.reshape(b, t, num_heads, d // num_heads)


def _attention(q_bqhk: jax.Array, k_bshk: jax.Array, v_bshk: jax.Array, dtype: Dtype,
               scale_first: bool = False) -> jax.Array:
    """Softmax(q k^T * head_dim^-0.5) v with the softmax in float32; returns (B, Q, H, K).

    bf16 rounds as transformers' eager SiglipAttention: q k^T, then its scaling, then the
    softmax's output, then p v. `scale_first`: as torch's `nn.MultiheadAttention` (need_weights),
    which scales q and rounds it before the product (float32 keeps the one order it has).
    """
    scale = q_bqhk.shape[-1] ** -0.5
    if scale_first and rounds(dtype):
        logits_bhqs = einsum("bqhk,bshk->bhqs", scalar_mul(q_bqhk, scale), k_bshk)
    else:
        logits_bhqs = scalar_mul(einsum("bqhk,bshk->bhqs", q_bqhk, k_bshk), scale)
    probs_bhqs = round_to(jax.nn.softmax(logits_bhqs.astype(jnp.float32), axis=-1), dtype)
    return einsum("bhqs,bshk->bqhk", probs_bhqs, v_bshk)


class SiglipMLP(nn.Module):
    """fc1 -> GELU (tanh approximation, HF `gelu_pytorch_tanh`) -> fc2."""

    hidden_size: int
    intermediate_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        h_btf = Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x_btd)
        h_btf = gelu(h_btf, approximate=True)
        return Dense(self.hidden_size, dtype=self.dtype, name="fc2")(h_btf)


class SiglipAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (all with bias)."""

    config: SiglipConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        cfg = self.config
        q_bthk, k_bthk, v_bthk = (
            _split_heads(Dense(cfg.hidden_size, dtype=self.dtype, name=name)(x_btd), cfg.num_heads)
            for name in ("q_proj", "k_proj", "v_proj"))
        # The kernel is chosen by platform (`attention.attend`); the reference path is `_attention`.
        swap = lambda x: jnp.swapaxes(x, 1, 2)
        o_bthk = swap(attention.attend(swap(q_bthk), swap(k_bthk), swap(v_bthk),
                                       reference=lambda: swap(_attention(q_bthk, k_bthk, v_bthk, self.dtype))))
        o_btd = o_bthk.reshape(x_btd.shape[:2] + (cfg.hidden_size,))
        return Dense(cfg.hidden_size, dtype=self.dtype, name="out_proj")(o_btd)


class SiglipEncoderLayer(nn.Module):
    """Pre-LN transformer layer: x + attn(LN1(x)), then x + MLP(LN2(x))."""

    config: SiglipConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        cfg = self.config
        x_btd = constrain(x_btd, ("batch", "length", "act_embed"))
        h = _layer_norm(cfg.ln_eps, self.dtype, "layer_norm1")(x_btd)
        x_btd = add(x_btd, SiglipAttention(cfg, self.dtype, name="self_attn")(h))
        h = _layer_norm(cfg.ln_eps, self.dtype, "layer_norm2")(x_btd)
        x_btd = add(x_btd, SiglipMLP(cfg.hidden_size, cfg.intermediate_size, self.dtype, name="mlp")(h))
        return constrain(x_btd, ("batch", "length", "act_embed"))


RematEncoderLayer = nn.remat(SiglipEncoderLayer)


class SiglipEmbeddings(nn.Module):
    """Patch conv (stride = patch, VALID) flattened in raster order, plus the position table."""

    config: SiglipConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels_bhwc: jax.Array) -> jax.Array:
        cfg = self.config
        p = cfg.patch_size
        patches = Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                       name="patch_embedding")(pixels_bhwc)
        b, gh, gw, d = patches.shape
        if gh * gw != cfg.num_patches:
            raise ValueError(
                f"SigLIP input {pixels_bhwc.shape[1:3]} gives {gh}x{gw} patches; the position table "
                f"holds {cfg.num_patches} ({cfg.image_size} px / patch {p}); no interpolation")
        positions_nd = nn.Embed(cfg.num_patches, d, name="position_embedding").embedding
        return add(patches.reshape(b, gh * gw, d), positions_nd.astype(self.dtype))


class SiglipPoolingHead(nn.Module):
    """Multi-head attention pooling (MAP): a learned probe queries the tokens through PyTorch's
    `nn.MultiheadAttention` (fused in_proj, rows [q; k; v]; out_proj), then y + MLP(LN(y)).

    In bf16 torch's in-projection of the probe adds its bias before rounding (a contiguous
    input), that of the tokens after (F.linear on the transposed, non-contiguous tokens is a
    matmul, then `add_`); q is scaled before the product (`_attention(scale_first=True)`)."""

    config: SiglipConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        cfg = self.config
        b, _, d = x_btd.shape
        probe = self.param("probe", nn.initializers.normal(1.0), (1, 1, d))
        probe_b1d = jnp.broadcast_to(probe.astype(self.dtype), (b, 1, d))
        # Fused input projection stored as one (D, 3D) kernel, columns [q | k | v] (the transpose
        # of PyTorch's in_proj_weight); the probe only needs q, the tokens only k and v.
        kernel_d3d = self.param("in_proj_kernel", nn.initializers.lecun_normal(), (d, 3 * d)).astype(self.dtype)
        bias_3d = self.param("in_proj_bias", nn.initializers.zeros_init(), (3 * d,)).astype(self.dtype)
        q_b1d = linear(probe_b1d, kernel_d3d[:, :d], bias_3d[:d])
        kv_bt2d = add(einsum("btd,de->bte", x_btd, kernel_d3d[:, d:]), bias_3d[d:])
        n = cfg.num_heads
        o_b1hk = _attention(_split_heads(q_b1d, n), _split_heads(kv_bt2d[..., :d], n),
                            _split_heads(kv_bt2d[..., d:], n), self.dtype, scale_first=True)
        y_b1d = Dense(d, dtype=self.dtype, name="out_proj")(o_b1hk.reshape(b, 1, d))
        h = _layer_norm(cfg.ln_eps, self.dtype, "layernorm")(y_b1d)
        y_b1d = add(y_b1d, SiglipMLP(d, cfg.intermediate_size, self.dtype, name="mlp")(h))
        return y_b1d[:, 0]


class SiglipVisionModel(nn.Module):
    """The SigLIP vision tower. Input NHWC pixels in [-1, 1]; see the module docstring.

    Built in `setup`, so a bound model exposes its parts (`embeddings`, `layers[i]`,
    `post_layernorm`, `head`) for layer-by-layer checks.
    """

    config: SiglipConfig
    dtype: Dtype = jnp.float32
    remat: bool = False  # rematerialise each encoder layer in the backward pass (training memory)

    def setup(self):
        cfg = self.config
        self.embeddings = SiglipEmbeddings(cfg, self.dtype)
        layer = RematEncoderLayer if self.remat else SiglipEncoderLayer
        self.layers = [layer(cfg, self.dtype) for _ in range(cfg.num_layers)]
        self.post_layernorm = _layer_norm(cfg.ln_eps, self.dtype)
        if cfg.use_head:
            self.head = SiglipPoolingHead(cfg, self.dtype)

    def __call__(self, pixels_bhwc: jax.Array, output_hidden_states: bool = False) -> SiglipOutput:
        x_btd = self.embeddings(round_to(pixels_bhwc, self.dtype))
        hidden = [x_btd]
        for layer in self.layers:
            x_btd = layer(x_btd)
            hidden.append(x_btd)
        last_btd = self.post_layernorm(x_btd)
        pooled_bd = self.head(last_btd) if self.config.use_head else None
        return SiglipOutput(last_btd, pooled_bd, tuple(hidden) if output_hidden_states else None)
