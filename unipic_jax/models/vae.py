"""KL-16 VAE (the LDM `AutoencoderKL` used by MAR and UniPic-1), reference-spec §2.

NHWC inside, images in [-1, 1]. Submodule names follow the PyTorch state dict
(`encoder.down.0.block.1.conv1` is `encoder/down_0/block_1/conv1` here), so the key table in
`convert/vae.py` is a rename. GroupNorm statistics, the attention softmax and the decoder's
upsampling convolutions (`UpsampleConv`) run in float32 whatever the compute `dtype`; params are
float32. In bf16 every op rounds as the reference's does (layers.py): a convolution adds its bias
before its one rounding, swish is two rounded ops (`x * sigmoid(x)`), the latent scaling rounds
once with the unrounded scale.

UniPic never samples the posterior: `encode_tokens` uses its mode (the mean) times the latent
scale and puts channels last, `decode_tokens` divides by the scale and decodes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unipic_jax.models.layers import Conv, add, einsum, mul, round_to, scalar_div, scalar_mul, sigmoid, softmax
from unipic_jax.sharding import constrain

Dtype = Any

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The `vae` section of configs/unipic_1p5b.py.

    `embed_dim` is the latent width (the encoder emits 2*embed_dim moments). Attention sits
    after every block of the encoder levels whose nominal resolution `resolution // 2**level` is
    in `attn_resolutions`; the decoder has attention only in its middle.
    """

    embed_dim: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    resolution: int
    in_channels: int
    out_ch: int
    norm_groups: int
    norm_eps: float

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side (16 for KL-16)."""
        return 2 ** (len(self.ch_mult) - 1)


def _group_norm(config: VAEConfig, name: str, x):
    """GroupNorm with float32 statistics (two-pass variance, as PyTorch), cast back to x's dtype."""
    norm = nn.GroupNorm(num_groups=config.norm_groups, epsilon=config.norm_eps,
                        use_fast_variance=False, dtype=jnp.float32, name=name)
    return round_to(norm(x.astype(jnp.float32)), x.dtype)


def _conv(features: int, kernel: int, name: str, dtype: Dtype, **kwargs) -> Conv:
    """A k x k convolution; 3x3 ones pad by 1 on every side unless told otherwise."""
    padding = kwargs.pop("padding", (kernel - 1) // 2)
    return Conv(features, (kernel, kernel), padding=padding, dtype=dtype, name=name, **kwargs)


def swish(x):
    """LDM's `nonlinearity`: `x * torch.sigmoid(x)`, two ops (in bf16 each rounds), not F.silu."""
    return mul(x, sigmoid(x))


class ResnetBlock(nn.Module):
    """norm-swish-conv twice plus a skip (a 1x1 `nin_shortcut` when the width changes)."""

    config: VAEConfig
    out_ch: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc):
        h = _conv(self.out_ch, 3, "conv1", self.dtype)(swish(_group_norm(self.config, "norm1", x_bhwc)))
        h = _conv(self.out_ch, 3, "conv2", self.dtype)(swish(_group_norm(self.config, "norm2", h)))
        skip = x_bhwc
        if x_bhwc.shape[-1] != self.out_ch:
            skip = _conv(self.out_ch, 1, "nin_shortcut", self.dtype)(x_bhwc)
        return constrain(add(skip, h), ("batch", "length", "length", "act_embed"))


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, scale C^-0.5, with a residual."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc):
        b, height, width, c = x_bhwc.shape
        h = _group_norm(self.config, "norm", x_bhwc)
        q_bsc, k_bsc, v_bsc = (
            _conv(c, 1, name, self.dtype)(h).reshape(b, height * width, c) for name in ("q", "k", "v"))
        # bmm rounds, the scaling rounds, softmax(bf16) rounds (the reference's three ops).
        logits_bst = scalar_mul(einsum("bsc,btc->bst", q_bsc, k_bsc), c ** -0.5)
        weights_bst = softmax(logits_bst, axis=-1)
        out_bsc = einsum("bst,btc->bsc", weights_bst, v_bsc)
        return add(x_bhwc, _conv(c, 1, "proj_out", self.dtype)(out_bsc.reshape(b, height, width, c)))


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a 3x3 stride-2 convolution (halves h and w)."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc):
        conv = _conv(x_bhwc.shape[-1], 3, "conv", self.dtype, strides=(2, 2), padding=((0, 1), (0, 1)))
        return conv(x_bhwc)


def _fold_taps(kernel, axis: int):
    """A 3-tap kernel axis seen from the low-resolution grid of a nearest-x2 upsample.

    Output row 2i reads upsampled rows 2i-1, 2i, 2i+1, which are low rows i-1, i, i: taps
    (k0, k1+k2) over low rows (i-1, i). Output row 2i+1 reads low rows i, i, i+1: taps (k0+k1, k2)
    over (i, i+1). Returns the two 2-tap kernels stacked on a new leading parity axis.
    """
    k0, k1, k2 = (jnp.take(kernel, i, axis) for i in range(3))
    return jnp.stack([jnp.stack([k0, k1 + k2], axis), jnp.stack([k0 + k1, k2], axis)])


class UpsampleConv(nn.Module):
    """A 3x3 convolution of the nearest-x2 upsampled input, computed on the input itself.

    Same params as `nn.Conv(c, (3, 3), padding=1)` (`kernel` HWIO, `bias`). Each of the four
    output parities is a 2x2 convolution of the low-resolution input with summed taps
    (`_fold_taps`), so one 2x2 convolution with 4*c outputs over the input padded by one gives
    them all, then they are interleaved. That is 16 taps per input pixel instead of 36, and the
    4x larger upsampled tensor is never built. Runs in float32 (XLA:CPU converts bf16
    convolutions to float32 anyway), adds the bias, and rounds once to `dtype`.
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc):
        b, h, w, c = x_bhwc.shape
        o = self.features
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, c, o), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (o,), jnp.float32)
        folded = _fold_taps(_fold_taps(kernel.astype(jnp.float32), 0), 2)  # q, p, a, b, c, o
        kernel_abk = folded.transpose(2, 3, 4, 1, 0, 5).reshape(2, 2, c, 4 * o)  # k = (p, q, o)
        x_pad = jnp.pad(x_bhwc.astype(jnp.float32), ((0, 0), (1, 1), (1, 1), (0, 0)))
        out = jax.lax.conv_general_dilated(x_pad, kernel_abk, (1, 1), "VALID",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
        out = out.reshape(b, h + 1, w + 1, 2, 2, o)
        # output (2i+p, 2j+q) is window (i+p, j+q) of parity (p, q)
        y_bhpwqo = jnp.stack([jnp.stack([out[:, p:p + h, q:q + w, p, q] for q in range(2)], 3)
                              for p in range(2)], 2)
        return round_to(y_bhpwqo.reshape(b, 2 * h, 2 * w, o) + bias.astype(jnp.float32), self.dtype)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution (fused: `UpsampleConv`)."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc):
        return UpsampleConv(x_bhwc.shape[-1], self.dtype, name="conv")(x_bhwc)


class Level(nn.Module):
    """One resolution level: `num_blocks` ResnetBlocks (each followed by an AttnBlock when
    `attention`), then an optional Downsample (encoder) or Upsample (decoder)."""

    config: VAEConfig
    out_ch: int
    num_blocks: int
    attention: bool = False
    resample: str | None = None  # "downsample", "upsample" or None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc):
        for i in range(self.num_blocks):
            x_bhwc = ResnetBlock(self.config, self.out_ch, self.dtype, name=f"block_{i}")(x_bhwc)
            if self.attention:
                x_bhwc = AttnBlock(self.config, self.dtype, name=f"attn_{i}")(x_bhwc)
        if self.resample == "downsample":
            x_bhwc = Downsample(self.dtype, name="downsample")(x_bhwc)
        elif self.resample == "upsample":
            x_bhwc = Upsample(self.dtype, name="upsample")(x_bhwc)
        return x_bhwc


class MidBlock(nn.Module):
    """block_1, attn_1, block_2 at the lowest resolution."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc):
        c = x_bhwc.shape[-1]
        x_bhwc = ResnetBlock(self.config, c, self.dtype, name="block_1")(x_bhwc)
        x_bhwc = AttnBlock(self.config, self.dtype, name="attn_1")(x_bhwc)
        return ResnetBlock(self.config, c, self.dtype, name="block_2")(x_bhwc)


class Encoder(nn.Module):
    """Image (b, H, W, in_channels) -> moments before quant_conv (b, H/f, W/f, 2*embed_dim)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc):
        cfg = self.config
        h = _conv(cfg.ch, 3, "conv_in", self.dtype)(x_bhwc)
        last = len(cfg.ch_mult) - 1
        for level, mult in enumerate(cfg.ch_mult):
            h = Level(cfg, cfg.ch * mult, cfg.num_res_blocks,
                      attention=cfg.resolution // 2 ** level in cfg.attn_resolutions,
                      resample="downsample" if level != last else None,
                      dtype=self.dtype, name=f"down_{level}")(h)
        h = MidBlock(cfg, self.dtype, name="mid")(h)
        h = swish(_group_norm(cfg, "norm_out", h))
        return _conv(2 * cfg.embed_dim, 3, "conv_out", self.dtype)(h)


class Decoder(nn.Module):
    """Latent (b, h, w, embed_dim) after post_quant_conv -> image (b, f*h, f*w, out_ch)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z_bhwc):
        cfg = self.config
        h = _conv(cfg.ch * cfg.ch_mult[-1], 3, "conv_in", self.dtype)(z_bhwc)
        h = MidBlock(cfg, self.dtype, name="mid")(h)
        for level in reversed(range(len(cfg.ch_mult))):
            h = Level(cfg, cfg.ch * cfg.ch_mult[level], cfg.num_res_blocks + 1,
                      resample="upsample" if level != 0 else None,
                      dtype=self.dtype, name=f"up_{level}")(h)
        h = swish(_group_norm(cfg, "norm_out", h))
        return _conv(cfg.out_ch, 3, "conv_out", self.dtype)(h)


class AutoencoderKL(nn.Module):
    """The KL VAE: encoder + quant_conv -> (mean, logvar); post_quant_conv + decoder."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        self.quant_conv = _conv(2 * cfg.embed_dim, 1, None, self.dtype)
        self.post_quant_conv = _conv(cfg.embed_dim, 1, None, self.dtype)

    def encode(self, x_bhwc):
        """Images (b, H, W, C) -> posterior (mean, logvar), each (b, H/f, W/f, embed_dim);
        logvar clamped to [-30, 20]."""
        moments = self.quant_conv(self.encoder(x_bhwc))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z_bhwc):
        """Latents (b, h, w, embed_dim) -> images (b, f*h, f*w, out_ch); no clamping."""
        return self.decoder(self.post_quant_conv(z_bhwc))

    def encode_tokens(self, x_bhwc, scale: float):
        """UniPic `encode`: posterior mode (the mean) times `scale`, as tokens (b, m, n, embed_dim).

        Raises ValueError when H or W is not a multiple of the downsampling factor.
        """
        f = self.config.downsample_factor
        height, width = x_bhwc.shape[1:3]
        if height % f or width % f:
            raise ValueError(
                f"VAE input is {height}x{width} pixels; height and width must be multiples of {f} "
                f"(the encoder downsamples by {f}): resize or crop the image first")
        mean, _ = self.encode(x_bhwc)
        return scalar_mul(mean, scale)

    def decode_tokens(self, tokens_bmnc, scale: float):
        """UniPic `decode`: tokens (b, m, n, embed_dim) divided by `scale`, decoded to images."""
        return self.decode(scalar_div(tokens_bmnc, scale))

    def __call__(self, x_bhwc):
        """Encode, then decode the posterior mode (used for init)."""
        mean, _ = self.encode(x_bhwc)
        return self.decode(mean)
