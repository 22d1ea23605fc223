"""MAR encoder and decoder (reference-spec §3): timm ViT blocks around a masked-token canvas.

The encoder embeds the known latent tokens, prepends `buffer_size` buffer tokens (UniPic fills
every buffer slot with `fake_latent`), adds its position table, drops the masked tokens and runs
its blocks. The decoder writes the encoder tokens back onto a full-length canvas (`mask_token`, or
the embedded source-image features when editing), runs its blocks and returns one conditioning
vector per image token for the diffusion head (`diffloss.*`, another module).

Static shapes: the number of visible tokens is a Python int and the kept positions come from a
stable sort of the mask, so one compilation serves every mask with the same count. Masks are
float or bool with 1 = masked/unknown, 0 = known; sequences are raster (row-major) order.
`encode_at` / `decode_at` take the kept positions instead of a mask (a sampler derives them from its
generation orders) and accept padding slots, so a bucket of visible counts shares one compilation.

Position tables are laid out like the PyTorch ones (`(1, buffer + seq_h*seq_w, D)`, buffer rows
first); at another latent grid their image rows are resized bilinearly as `F.interpolate(...,
mode="bilinear", align_corners=False)` does, without antialiasing (the 1024-px path of a 512-px
MAR). Param names follow the PyTorch state dict (`encoder_blocks.3.attn.qkv` is
`encoder_blocks_3/attn/qkv`). LayerNorm statistics and the softmax run in float32 whatever the
compute `dtype`; params are float32. In bf16 every op rounds as the reference's does (layers.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unipic_jax.models import attention
from unipic_jax.models.layers import Dense, LayerNorm, add, gelu, round_to
from unipic_jax.sharding import constrain

Dtype = Any
Grid = tuple[int, int]

_embed_init = nn.initializers.normal(0.02)  # pos-embeds, fake_latent, mask_token, class_emb


@dataclasses.dataclass(frozen=True)
class MARConfig:
    """The `mar` section of configs/unipic_1p5b.py.

    The native latent grid is `img_size // vae_stride // patch_size` on each side; `token_dim` is
    the VAE latent width times `patch_size**2`. `class_num`, `mask_ratio_min` and
    `diffusion_batch_mul` do not enter the encoder/decoder forward (class_num sizes the unused
    `class_emb`; the others belong to training), nor do the training-only dropout rates.
    """

    img_size: int
    vae_stride: int
    patch_size: int
    token_dim: int
    encoder_dim: int
    encoder_depth: int
    encoder_heads: int
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    mlp_ratio: int
    buffer_size: int
    class_num: int
    ln_eps: float
    mask_ratio_min: float
    diffusion_batch_mul: int
    attn_dropout: float = 0.1  # on the attention probabilities (training only)
    proj_dropout: float = 0.1  # after attn.proj, the MLP's GELU and fc2 (training only)

    @property
    def grid(self) -> Grid:
        """The native latent grid (seq_h, seq_w) the position tables were learned at."""
        side = self.img_size // self.vae_stride // self.patch_size
        return (side, side)

    @property
    def seq_len(self) -> int:
        """Image tokens at the native grid."""
        return self.grid[0] * self.grid[1]


def _layer_norm(eps: float, dtype: Dtype, name: Optional[str] = None) -> LayerNorm:
    """PyTorch LayerNorm: two-pass (biased) variance, float32 statistics."""
    return LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def _dense(features: int, dtype: Dtype, name: Optional[str] = None) -> Dense:
    """nn.Linear with bias; xavier-uniform/zero init as the reference's `initialize_weights`."""
    return Dense(features, dtype=dtype, kernel_init=nn.initializers.xavier_uniform(), name=name)


class Attention(nn.Module):
    """timm Attention: fused qkv (rows [q | k | v], heads contiguous in each), no mask; the core is
    `F.scaled_dot_product_attention`, computed by the platform's kernel (`attention.attend`)."""

    num_heads: int
    dtype: Dtype = jnp.float32
    attn_dropout: float = 0.0
    proj_dropout: float = 0.0

    @nn.compact
    def __call__(self, x_bld, key_mask_bl=None, deterministic: bool = True, query_bq=None):
        """`key_mask_bl` (b, l) bool, False for padding slots no token may attend to (None: all).
        `query_bq` (b, q): the positions whose outputs are wanted (None: all l); every position
        is still a key (the fused qkv product still runs on all l rows)."""
        b, l, d = x_bld.shape
        head_dim = d // self.num_heads
        qkv = _dense(3 * d, self.dtype, "qkv")(x_bld).reshape(b, l, 3, self.num_heads, head_dim)
        # Heads-major (b, n, l, h) operands: both products batch over leading axes. On XLA:CPU the
        # attention core at 2 x 320 tokens took 5.0 ms against 6.0 ms in the (b, l, n, h) layout.
        q_bnlh, k_bnlh, v_bnlh = jnp.transpose(qkv, (2, 0, 3, 1, 4))
        if query_bq is not None:
            q_bnlh = jnp.take_along_axis(q_bnlh, query_bq[:, None, :, None], axis=2)
            l = query_bq.shape[1]
        active = self.attn_dropout > 0 and not deterministic
        dropout = (lambda w: nn.Dropout(self.attn_dropout)(w, deterministic)) if active else None
        out_bnqh = attention.attend(q_bnlh, k_bnlh, v_bnlh, key_mask_bl, dropout)
        out_bqnh = jnp.swapaxes(out_bnqh, 1, 2)
        out_bld = _dense(d, self.dtype, "proj")(out_bqnh.reshape(b, l, d))
        return nn.Dropout(self.proj_dropout)(out_bld, deterministic)


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> dropout -> fc2 -> dropout."""

    hidden: int
    dtype: Dtype = jnp.float32
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x_bld, deterministic: bool = True):
        h = gelu(_dense(self.hidden, self.dtype, "fc1")(x_bld), approximate=False)
        h = nn.Dropout(self.dropout)(h, deterministic)
        return nn.Dropout(self.dropout)(_dense(x_bld.shape[-1], self.dtype, "fc2")(h), deterministic)


class Block(nn.Module):
    """timm 0.9.12 `vision_transformer.Block` as MAR builds it: pre-LN, no LayerScale/DropPath,
    `attn_drop=attn_dropout`, `proj_drop=proj_dropout` (off unless `deterministic=False`)."""

    num_heads: int
    mlp_ratio: int
    ln_eps: float
    dtype: Dtype = jnp.float32
    attn_dropout: float = 0.0
    proj_dropout: float = 0.0

    @nn.compact
    def __call__(self, x_bld, key_mask_bl=None, deterministic: bool = True, query_bq=None):
        """`query_bq` (b, q): return only these positions' outputs (b, q, d), every position
        still attended to (None: all of them)."""
        d = x_bld.shape[-1]
        h_bld = _layer_norm(self.ln_eps, self.dtype, "norm1")(x_bld)
        if query_bq is not None:
            x_bld = jnp.take_along_axis(x_bld, query_bq[:, :, None], axis=1)
        x_bld = add(x_bld, Attention(self.num_heads, self.dtype, self.attn_dropout, self.proj_dropout, name="attn")(
            h_bld, key_mask_bl, deterministic, query_bq))
        x_bld = add(x_bld, Mlp(self.mlp_ratio * d, self.dtype, self.proj_dropout, name="mlp")(
            _layer_norm(self.ln_eps, self.dtype, "norm2")(x_bld), deterministic))
        return x_bld


# `deterministic` (argument 3, counting self) is a Python bool: static under the remat.
RematBlock = nn.remat(Block, static_argnums=(3,))


def _bilinear_weights(src: int, dst: int) -> np.ndarray:
    """(dst, src) matrix of 1-D bilinear weights, `F.interpolate(align_corners=False)` without
    antialiasing, computed in float32 as PyTorch's CPU kernel does.

    Output `o` samples `s = max((o + 0.5) * src / dst - 0.5, 0)` from inputs `floor(s)` and
    `min(floor(s) + 1, src - 1)` with weights `1 - frac(s)`, `frac(s)`.
    """
    scale = np.float32(src) / np.float32(dst)
    s = np.maximum(scale * (np.arange(dst, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5),
                   np.float32(0))
    i0 = s.astype(np.int64)
    i1 = np.minimum(i0 + 1, src - 1)
    frac = s - i0.astype(np.float32)
    weights = np.zeros((dst, src), np.float32)
    np.add.at(weights, (np.arange(dst), i0), np.float32(1) - frac)
    np.add.at(weights, (np.arange(dst), i1), frac)
    return weights


def resize_pos_embed(table_1ld, src_hw: Grid, dst_hw: Grid):
    """A learned position table at another latent grid.

    `table_1ld` is `(1, buffer + src_h*src_w, D)`: buffer rows first (any number, inferred from
    the length; 0 for the diffusion table), then image rows in raster order of `src_hw`. The
    image rows are resized to `dst_hw` with PyTorch's bilinear `F.interpolate(align_corners=False)`
    and no antialiasing, also when shrinking (separable, float32); the buffer rows are kept as
    they are. Returns `(1, buffer + dst_h*dst_w, D)`; the table itself when the grids agree.
    """
    (src_h, src_w), (dst_h, dst_w) = tuple(src_hw), tuple(dst_hw)
    if (src_h, src_w) == (dst_h, dst_w):
        return table_1ld
    _, length, d = table_1ld.shape
    num_buffer = length - src_h * src_w
    if num_buffer < 0:
        raise ValueError(f"position table of length {length} is shorter than the {src_h}x{src_w} grid")
    image_hwd = table_1ld[0, num_buffer:].astype(jnp.float32).reshape(src_h, src_w, d)
    resized_hwd = jnp.einsum("ya,xb,abd->yxd", _bilinear_weights(src_h, dst_h),
                             _bilinear_weights(src_w, dst_w), image_hwd,
                             precision=jax.lax.Precision.HIGHEST)
    resized_1ld = round_to(resized_hwd.reshape(1, dst_h * dst_w, d), table_1ld.dtype)
    return jnp.concatenate([table_1ld[:, :num_buffer], resized_1ld], axis=1)


def visible_positions(mask_bl, num_visible: int):
    """(b, num_visible) int32: raster positions of the visible (mask == 0) tokens, ascending.

    A stable sort puts visible tokens first in raster order, so every row must hold exactly
    `num_visible` visible tokens (as everywhere in the reference); no boolean gather.
    """
    order_bl = jnp.argsort((mask_bl != 0).astype(jnp.int32), axis=-1, stable=True)
    return order_bl[:, :num_visible].astype(jnp.int32)


class MAR(nn.Module):
    """MAR encoder/decoder (no diffusion head). `encode` and `decode` are the reference's
    `forward_mae_encoder` (with `fake_latent` as class embedding) and `forward_mae_decoder`."""

    config: MARConfig
    dtype: Dtype = jnp.float32
    remat: bool = False  # rematerialise each block in the backward pass (training memory)

    def setup(self):
        c = self.config
        block = functools.partial(RematBlock if self.remat else Block, mlp_ratio=c.mlp_ratio, ln_eps=c.ln_eps,
                                  dtype=self.dtype, attn_dropout=c.attn_dropout, proj_dropout=c.proj_dropout)
        image_len = c.seq_len
        self.z_proj = _dense(c.encoder_dim, self.dtype)
        self.z_proj_ln = _layer_norm(c.ln_eps, self.dtype)
        self.fake_latent = self.param("fake_latent", _embed_init, (1, c.encoder_dim))
        # Unused by UniPic; kept so a checkpoint round-trips unchanged.
        self.class_emb = self.param("class_emb", _embed_init, (c.class_num, c.encoder_dim))
        self.encoder_pos_embed_learned = self.param(
            "encoder_pos_embed_learned", _embed_init, (1, c.buffer_size + image_len, c.encoder_dim))
        self.encoder_blocks = [block(c.encoder_heads) for _ in range(c.encoder_depth)]
        self.encoder_norm = _layer_norm(c.ln_eps, self.dtype)
        self.decoder_embed = _dense(c.decoder_dim, self.dtype)
        self.mask_token = self.param("mask_token", _embed_init, (1, 1, c.decoder_dim))
        self.decoder_pos_embed_learned = self.param(
            "decoder_pos_embed_learned", _embed_init, (1, c.buffer_size + image_len, c.decoder_dim))
        self.decoder_blocks = [block(c.decoder_heads) for _ in range(c.decoder_depth)]
        self.decoder_norm = _layer_norm(c.ln_eps, self.dtype)
        self.diffusion_pos_embed_learned = self.param(
            "diffusion_pos_embed_learned", _embed_init, (1, image_len, c.decoder_dim))

    def _grid(self, image_shape: Optional[Grid], image_len: int) -> Grid:
        grid = self.config.grid if image_shape is None else tuple(image_shape)
        if grid[0] * grid[1] != image_len:
            raise ValueError(f"{image_len} image tokens do not fill a {grid[0]}x{grid[1]} grid")
        return grid

    def _pos_embed(self, table_1ld, grid: Grid):
        return resize_pos_embed(table_1ld, self.config.grid, grid).astype(self.dtype)

    def _kept_positions(self, visible_bv):
        """(b, buffer + V) canvas positions the encoder keeps: buffer, then the visible tokens."""
        buffer = self.config.buffer_size
        buffer_bk = jnp.broadcast_to(jnp.arange(buffer, dtype=jnp.int32), (visible_bv.shape[0], buffer))
        return jnp.concatenate([buffer_bk, buffer + visible_bv.astype(jnp.int32)], axis=1)

    def encode(self, x_blc, mask_bl, num_visible: int, image_shape: Optional[Grid] = None, *,
               deterministic: bool = True, from_vae: bool = False):
        """Tokens (b, h*w, token_dim) and mask (b, h*w) -> (b, buffer + num_visible, encoder_dim).

        `num_visible` (a Python int) is the number of zeros in every mask row; `image_shape` is the
        latent grid (h, w), None for the native one. Output order: buffer tokens, then the visible
        tokens in raster order. `deterministic=False` turns the blocks' dropout on (training).
        `from_vae`: the tokens come straight from the VAE (see `encode_at`).
        """
        return self.encode_at(x_blc, visible_positions(mask_bl, num_visible), image_shape,
                              deterministic=deterministic, from_vae=from_vae)

    def encode_at(self, x_blc, visible_bv, image_shape: Optional[Grid] = None, *, padded: bool = False,
                  deterministic: bool = True, from_vae: bool = False):
        """`encode` given the kept raster positions `visible_bv` (b, V), ascending, instead of a mask.

        With `padded`, entries >= h*w mark padding slots (after the real ones): they hold a copy of
        a real token, are hidden from attention as keys and their outputs are to be discarded, so
        every V up to the slot count shares one compilation.

        `from_vae`: the tokens are UniPic `encode`'s output, which the reference holds as a
        permuted (non-contiguous) view; torch's bf16 z_proj then rounds the product before adding
        the bias (`layers.linear(fused=False)`). The sampler's token buffer is contiguous.
        """
        c = self.config
        b, image_len, _ = x_blc.shape
        grid = self._grid(image_shape, image_len)
        x_bld = self.z_proj(x_blc, fused=not from_vae)
        buffer_bld = jnp.broadcast_to(self.fake_latent.astype(x_bld.dtype)[None],
                                      (b, c.buffer_size, c.encoder_dim))
        x_bld = jnp.concatenate([buffer_bld, x_bld], axis=1)
        x_bld = add(x_bld, self._pos_embed(self.encoder_pos_embed_learned, grid))
        x_bld = self.z_proj_ln(x_bld)
        kept_bk = self._kept_positions(jnp.minimum(visible_bv, image_len - 1) if padded else visible_bv)
        x_bkd = jnp.take_along_axis(x_bld, kept_bk[:, :, None], axis=1)
        key_mask_bk = None
        if padded:
            key_mask_bk = jnp.concatenate([jnp.ones((b, c.buffer_size), bool), visible_bv < image_len], axis=1)
        for blk in self.encoder_blocks:
            x_bkd = constrain(blk(x_bkd, key_mask_bk, deterministic), ("batch", "length", "act_embed"))
        return self.encoder_norm(x_bkd)

    def decode(self, x_enc_bkd, mask_bl, image_shape: Optional[Grid] = None, x_con_bsd=None, *,
               deterministic: bool = True):
        """Encoder output (b, buffer + V, encoder_dim) and mask -> (b, h*w, decoder_dim).

        The canvas is `mask_token` everywhere, or `decoder_embed(x_con_bsd)` when a full-length
        (b, buffer + h*w, encoder_dim) source-image encoding is given (editing); the encoder
        tokens are written at the buffer and visible positions. V is read from the shape.
        """
        self._grid(image_shape, mask_bl.shape[1])
        visible_bv = visible_positions(mask_bl, x_enc_bkd.shape[1] - self.config.buffer_size)
        return self.decode_at(x_enc_bkd, visible_bv, image_shape, x_con_bsd, deterministic=deterministic)

    def decode_at(self, x_enc_bkd, visible_bv, image_shape: Optional[Grid] = None, x_con_bsd=None, *,
                  deterministic: bool = True, query_bq=None):
        """`decode` given the encoder's kept positions `visible_bv` (b, V) instead of a mask;
        rows at entries >= h*w (padding slots of `encode_at`) are dropped.

        `query_bq` (b, q) raster positions: return only their outputs (b, q, decoder_dim), the
        rows a sampling step predicts (entries >= h*w give a copy of the last token, to be
        discarded). The last block then computes its attention output and MLP for those rows
        only; every token still enters as a key, so they equal the full decode's rows.
        """
        c = self.config
        b = x_enc_bkd.shape[0]
        grid = c.grid if image_shape is None else tuple(image_shape)
        image_len = grid[0] * grid[1]
        x_bkd = self.decoder_embed(x_enc_bkd)
        if x_con_bsd is None:
            canvas_bsd = jnp.broadcast_to(self.mask_token.astype(x_bkd.dtype),
                                          (b, c.buffer_size + image_len, c.decoder_dim))
        else:
            canvas_bsd = self.decoder_embed(x_con_bsd)
        kept_bk = self._kept_positions(visible_bv)
        x_bsd = canvas_bsd.at[jnp.arange(b)[:, None], kept_bk].set(x_bkd, mode="drop")
        x_bsd = add(x_bsd, self._pos_embed(self.decoder_pos_embed_learned, grid))
        blocks = self.decoder_blocks if query_bq is None else self.decoder_blocks[:-1]
        for blk in blocks:
            x_bsd = constrain(blk(x_bsd, None, deterministic), ("batch", "length", "act_embed"))
        pos_1ld = self._pos_embed(self.diffusion_pos_embed_learned, grid)
        if query_bq is None:
            return add(self.decoder_norm(x_bsd)[:, c.buffer_size:], pos_1ld)
        query_bq = jnp.minimum(query_bq, image_len - 1).astype(jnp.int32)
        x_bqd = self.decoder_blocks[-1](x_bsd, None, deterministic, c.buffer_size + query_bq)
        return add(self.decoder_norm(x_bqd), jnp.take(pos_1ld[0], query_bq, axis=0))

    def __call__(self, x_blc, mask_bl, num_visible: int, image_shape: Optional[Grid] = None):
        """encode then decode (what `init` runs)."""
        return self.decode(self.encode(x_blc, mask_bl, num_visible, image_shape), mask_bl, image_shape)


def param_shapes(config: MARConfig) -> dict:
    """The 'params' tree of `MAR(config)` as `jax.ShapeDtypeStruct`s (nothing allocated)."""
    model = MAR(config)
    image_len = config.seq_len
    x = jax.ShapeDtypeStruct((1, image_len, config.token_dim), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, image_len), jnp.float32)

    def init(x_blc, mask_bl):
        return model.init(jax.random.key(0), x_blc, mask_bl, image_len)

    return jax.eval_shape(init, x, mask)["params"]


@functools.partial(jax.jit, static_argnames=("model", "num_visible", "image_shape"))
def apply_encode(model: MAR, params, x_blc, mask_bl, num_visible: int,
                 image_shape: Optional[Grid] = None):
    """Jitted `MAR.encode`; compiles once per (model, input shapes, num_visible, image_shape)."""
    return model.apply({"params": params}, x_blc, mask_bl, num_visible, image_shape, method=MAR.encode)


@functools.partial(jax.jit, static_argnames=("model", "image_shape"))
def apply_decode(model: MAR, params, x_enc_bkd, mask_bl, image_shape: Optional[Grid] = None,
                 x_con_bsd=None):
    """Jitted `MAR.decode`; compiles once per (model, input shapes, image_shape, x_con given)."""
    return model.apply({"params": params}, x_enc_bkd, mask_bl, image_shape, x_con_bsd,
                       method=MAR.decode)
