"""UniPic-1: the composition of the VAE, MAR, diffusion head, Qwen2.5 and the projectors (spec §1, §7).

    pixels -> vae -> tokens (b, m, n, C) -> mar encoder -> proj_in -> llm -> proj_out (+ residual)
           -> mar decoder -> diffusion head -> tokens -> vae -> pixels

The LLM sees the MAR features after the prompt as `[visible image tokens (raster order) ; buffer]`
(the buffer moved to the end), causal; its output is moved back to MAR order (buffer first) and
added to the encoder output as `x_enc + proj_out(z_llm)` before the MAR decoder. SigLIP2 and
`siglip2_proj` are built (the checkpoint holds them) but the released code never calls them.

Submodules (and top-level param keys): `vae`, `mar`, `diffusion_head`, `llm`, `proj_in`,
`proj_out`, `siglip2`, `siglip2_proj`. Methods are applied with `method=`; the samplers in
`unipic_jax.sampling` drive them with static shapes. The diffusion head and the LLM are also
applied on their own (`head_module`, `llm_module`) by loops that take a module and its params.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unipic_jax.models.diffusion import DiffusionConfig, SimpleMLPAdaLN
from unipic_jax.models.layers import add
from unipic_jax.models.mar import MAR, MARConfig
from unipic_jax.models.projectors import MLPProjector
from unipic_jax.models.qwen2 import KVCache, Qwen2, Qwen2Config, positions_from_mask
from unipic_jax.models.siglip import SiglipConfig, SiglipVisionModel
from unipic_jax.models.vae import AutoencoderKL, VAEConfig

Dtype = Any
Grid = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class ProjectorsConfig:
    """The `projectors` section: MAR encoder width, LLM width, SigLIP width (1152 in the reference)."""

    mar_dim: int
    llm_dim: int
    siglip_dim: int


@dataclasses.dataclass(frozen=True)
class TokensConfig:
    """The `tokens` section: ids of `<image>`, EOS, pad and BOS."""

    image: int
    eos: int
    pad: int
    bos: int


@dataclasses.dataclass(frozen=True)
class UniPicConfig:
    """Every section of configs/unipic_1p5b.py, each as its component's config dataclass."""

    vae: VAEConfig
    vae_scale: float
    mar: MARConfig
    diffusion: DiffusionConfig
    qwen2: Qwen2Config
    siglip: SiglipConfig
    projectors: ProjectorsConfig
    tokens: TokensConfig

    def __post_init__(self):
        checks = [
            ("projectors.mar_dim", self.projectors.mar_dim, "mar.encoder_dim", self.mar.encoder_dim),
            ("projectors.llm_dim", self.projectors.llm_dim, "qwen2.hidden_size", self.qwen2.hidden_size),
            ("diffusion.cond_dim", self.diffusion.cond_dim, "mar.decoder_dim", self.mar.decoder_dim),
            ("diffusion.token_dim", self.diffusion.token_dim, "mar.token_dim", self.mar.token_dim),
            ("mar.token_dim", self.mar.token_dim, "vae.embed_dim * patch_size^2",
             self.vae.embed_dim * self.mar.patch_size ** 2),
        ]
        problems = [f"{a}={x} but {b}={y}" for a, x, b, y in checks if x != y]
        if self.mar.patch_size != 1:
            problems.append(f"mar.patch_size={self.mar.patch_size}: UniPic's token layout assumes 1")
        if problems:
            raise ValueError("inconsistent UniPic config: " + "; ".join(problems))

    @classmethod
    def from_config(cls, cfg) -> "UniPicConfig":
        """From the ConfigDict of configs/unipic_1p5b.py (or configs/fixture.py for unipic/).
        A missing section or field, or one the model does not know, is a one-line ValueError."""
        sections = dict(vae=VAEConfig, mar=MARConfig, diffusion=DiffusionConfig, qwen2=Qwen2Config,
                        siglip=SiglipConfig, projectors=ProjectorsConfig, tokens=TokensConfig)
        built = {}
        for name, kind in sections.items():
            if name not in cfg:
                raise ValueError(f"model config: the {name!r} section is missing")
            fields = {f.name: f for f in dataclasses.fields(kind)}
            given = dict(cfg[name])
            missing = sorted(n for n, f in fields.items() if n not in given and f.default is dataclasses.MISSING
                             and f.default_factory is dataclasses.MISSING)
            unknown = sorted(given.keys() - fields.keys())
            if missing or unknown:
                raise ValueError(f"model config section {name!r}: " + "; ".join(
                    ([f"missing {', '.join(missing)}"] if missing else []) +
                    ([f"unknown {', '.join(unknown)}"] if unknown else [])))
            built[name] = kind(**given)
        if "vae_scale" not in cfg:
            raise ValueError("model config: 'vae_scale' is missing")
        return cls(vae_scale=float(cfg.vae_scale), **built)

    @property
    def buffer_size(self) -> int:
        return self.mar.buffer_size


# ----------------------------------------------------------------------------------------------
# The buffer reorder between MAR order [buffer ; image] and LLM order [image ; buffer]


def _reorder(x_bkd, index_k):
    return jnp.take(x_bkd, index_k, axis=1)


def buffer_last(x_bkd, num_visible, buffer: int):
    """MAR order `[buffer ; V visible ; padding]` -> LLM order `[V visible ; buffer ; padding]`.

    `num_visible` may be a Python int or a traced scalar (padding slots stay where they are).
    """
    k = jnp.arange(x_bkd.shape[1])
    return _reorder(x_bkd, jnp.where(k < num_visible, k + buffer, jnp.where(k < num_visible + buffer,
                                                                           k - num_visible, k)))


def buffer_first(x_bkd, num_visible, buffer: int):
    """Inverse of `buffer_last`: LLM order back to MAR order."""
    k = jnp.arange(x_bkd.shape[1])
    return _reorder(x_bkd, jnp.where(k < buffer, k + num_visible, jnp.where(k < num_visible + buffer,
                                                                           k - buffer, k)))


def splice_image_features(embeds_bld, ids_bl, image_id: int, features_bkd):
    """Write image features at the `<image>` positions of each row, in order (spec §9 step 5).

    `features_bkd` (b or 1, K, D): row r's K image-token positions (ascending) receive row r's
    features (or the single row's). Every row must hold exactly K `<image>` ids; checked when the
    ids are concrete. Other positions keep their embeddings.
    """
    b, k = ids_bl.shape[0], features_bkd.shape[1]
    if not isinstance(ids_bl, jax.core.Tracer):
        counts = np.sum(np.asarray(ids_bl) == image_id, axis=1)
        if not np.all(counts == k):
            raise ValueError(f"rows hold {counts.tolist()} <image> tokens (id {image_id}); the image "
                             f"features need exactly {k} per row")
    positions_bk = jnp.argsort(ids_bl != image_id, axis=1, stable=True)[:, :k]
    features_bkd = jnp.broadcast_to(features_bkd, (b, k, features_bkd.shape[2]))
    embeds_bld = jnp.asarray(embeds_bld)
    return embeds_bld.at[jnp.arange(b)[:, None], positions_bk].set(features_bkd.astype(embeds_bld.dtype))


# ----------------------------------------------------------------------------------------------
# The model


class UniPic(nn.Module):
    """SkyworkUnipic. Images are NHWC in [-1, 1]; tokens (b, m, n, C) channel-last or (b, m*n, C)."""

    config: UniPicConfig
    dtype: Dtype = jnp.float32
    # Rematerialise every transformer block / ResBlock of the MAR, the diffusion head, the LLM and
    # SigLIP2 in the backward pass (training memory; the frozen, gradient-free VAE is left as is).
    remat: bool = False

    def setup(self):
        c = self.config
        llm_dim, mar_dim = c.projectors.llm_dim, c.projectors.mar_dim
        self.vae = AutoencoderKL(c.vae, self.dtype)
        self.mar = MAR(c.mar, self.dtype, self.remat)
        self.diffusion_head = SimpleMLPAdaLN(c.diffusion, self.dtype, self.remat)
        self.llm = Qwen2(llm_config(c, self.dtype), self.dtype, self.remat)
        self.proj_in = MLPProjector(llm_dim, llm_dim, self.dtype)
        self.proj_out = MLPProjector(llm_dim, mar_dim, self.dtype)
        self.siglip2 = SiglipVisionModel(c.siglip, self.dtype, self.remat)
        self.siglip2_proj = MLPProjector(llm_dim, llm_dim, self.dtype)

    # --- pixels <-> tokens

    def encode(self, images_bhwc):
        """Images (b, 16m, 16n, 3) -> tokens (b, m, n, C): posterior mode times vae_scale."""
        return self.vae.encode_tokens(images_bhwc, self.config.vae_scale)

    def decode(self, tokens_bmnc):
        """Tokens (b, m, n, C) -> images (b, 16m, 16n, 3), not clamped."""
        return self.vae.decode_tokens(tokens_bmnc, self.config.vae_scale)

    # --- MAR <-> LLM

    def extract_visual_feature(self, tokens_bmnc, mask_bl=None, num_visible: Optional[int] = None, *,
                               deterministic: bool = True):
        """MAR encoder (fake_latent buffer) then proj_in, buffer moved to the end. `tokens_bmnc`
        are `encode`'s output, as in every caller of the reference (`MAR.encode_at(from_vae)`).

        `mask_bl` (b, m*n), 1 = masked, with `num_visible` (Python int) zeros per row; None keeps
        every token. Returns `(x_enc, z_enc)`: x_enc (b, buffer + V, mar_dim) in MAR order,
        z_enc (b, V + buffer, llm_dim) in LLM order. `deterministic=False`: MAR dropout on (training).
        """
        b, m, n, c = tokens_bmnc.shape
        if mask_bl is None:
            mask_bl, num_visible = jnp.zeros((b, m * n), jnp.float32), m * n
        x_enc = self.mar.encode(tokens_bmnc.reshape(b, m * n, c), mask_bl, num_visible, (m, n),
                                deterministic=deterministic, from_vae=True)
        return x_enc, buffer_last(self.proj_in(x_enc), num_visible, self.config.buffer_size)

    def bridge(self, x_enc_bkd, z_llm_bkd, num_visible):
        """LLM output (LLM order) -> MAR decoder input: `x_enc + proj_out(buffer moved to the front)`."""
        z_bkd = buffer_first(z_llm_bkd, num_visible, self.config.buffer_size)
        return add(x_enc_bkd, self.proj_out(z_bkd).astype(x_enc_bkd.dtype))

    def forward_mae_encoder(self, tokens_blc, mask_bl, num_visible: int, image_shape: Grid,
                            prompt_embeds_btd, prompt_mask_bt):
        """The reference's cache-free `forward_mae_encoder` (training): the LLM runs on
        `[prompt ; z_enc]` with key mask `[prompt_mask ; 1]` and positions `cumsum - 1`; the
        tokens are `encode`'s output (`MAR.encode_at(from_vae)`).

        Returns the MAR decoder input (b, buffer + V, mar_dim).
        """
        x_enc = self.mar.encode(tokens_blc, mask_bl, num_visible, image_shape, from_vae=True)
        z_enc = buffer_last(self.proj_in(x_enc), num_visible, self.config.buffer_size)
        b, length = z_enc.shape[:2]
        x_btd = jnp.concatenate([prompt_embeds_btd.astype(z_enc.dtype), z_enc], axis=1)
        mask_bt = jnp.concatenate([jnp.asarray(prompt_mask_bt, bool), jnp.ones((b, length), bool)], axis=1)
        hidden = self.llm(x_btd, positions_from_mask(mask_bt), mask_bt).last_hidden_state
        return self.bridge(x_enc, hidden[:, -length:], num_visible)

    def mae_encoder_cached(self, cache: KVCache, tokens_blc, visible_bv, num_visible, image_shape: Grid,
                           *, padded: bool = False, halves: int = 1):
        """One sampling step's encoder side: MAR encoder on the kept positions `visible_bv`
        (`MAR.encode_at`), proj_in, the LLM after the prompt cache (`Qwen2.peek`, positions after
        each row's valid prompt tokens), then `bridge`.

        With `padded`, `visible_bv` has padding slots (entries >= m*n) after its `num_visible`
        real ones (a traced count); the LLM sequence is then `[visible ; buffer ; padding]`, so
        causality hides the padding. `halves` = 2 says the rows are two identical halves in
        tokens and positions (the CFG batch): the MAR encoder and proj_in, which see nothing
        else, run on the first half only and are repeated (the reference runs them on both).
        Returns (MAR decoder input, LLM last hidden state in LLM order).
        """
        rows = tokens_blc.shape[0] // halves
        x_enc = self.mar.encode_at(tokens_blc[:rows], visible_bv[:rows], image_shape, padded=padded)
        z_enc = buffer_last(self.proj_in(x_enc), num_visible, self.config.buffer_size)
        x_enc, z_enc = (jnp.concatenate([a] * halves) for a in (x_enc, z_enc))
        hidden = self.llm.peek(cache, z_enc, cache.next_positions(z_enc.shape[1])).last_hidden_state
        return self.bridge(x_enc, hidden, num_visible), hidden

    def mae_decoder(self, x_enc_bkd, visible_bv, image_shape: Grid, x_con_bsd=None, query_bq=None):
        """MAR decoder given the encoder's kept positions (`MAR.decode_at`) -> (b, m*n, decoder_dim),
        or (b, q, decoder_dim) for the raster positions `query_bq` only."""
        return self.mar.decode_at(x_enc_bkd, visible_bv, image_shape, x_con_bsd, query_bq=query_bq)

    # --- the prompt

    def embed(self, ids_bt):
        """Token embeddings (b, t, llm_dim)."""
        return self.llm.embed(ids_bt)

    def prefill(self, cache: KVCache, prompt_embeds_btd, prompt_mask_bt):
        """The reference's prompt pass: positions 0..L-1, no padding mask (right padding is hidden
        from valid tokens by causality); the cache then admits only the valid prompt slots.
        Returns (last hidden state (b, L, llm_dim), cache)."""
        b, length = prompt_mask_bt.shape
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        out, cache = self.llm.prefill(cache, prompt_embeds_btd, positions)
        valid = jnp.zeros_like(cache.valid).at[:, :length].set(jnp.asarray(prompt_mask_bt, bool))
        return out.last_hidden_state, cache.replace(valid=valid)

    # --- understanding

    def siglip_features(self, pixels_bhwc):
        """SigLIP2 last_hidden_state (after post_layernorm) -> siglip2_proj: (b, patches, llm_dim).
        Not a released path (the reference never calls SigLIP); see `sampling/caption.py`."""
        return self.siglip2_proj(self.siglip2(pixels_bhwc).last_hidden_state)

    def init_all(self):
        """Touches every submodule on minimal inputs (for `init` / `jax.eval_shape`)."""
        c = self.config
        f = c.vae.downsample_factor
        self.vae(jnp.zeros((1, f, f, c.vae.in_channels)))
        image_len = c.mar.seq_len
        self.mar(jnp.zeros((1, image_len, c.mar.token_dim)), jnp.zeros((1, image_len)), image_len)
        self.diffusion_head(jnp.zeros((1, c.diffusion.token_dim)), jnp.zeros((1,), jnp.int32),
                            jnp.zeros((1, c.diffusion.cond_dim)))
        ids = jnp.zeros((1, 1), jnp.int32)
        self.llm.forward_tokens(ids, ids, return_logits=True)
        self.proj_in(jnp.zeros((1, c.projectors.mar_dim)))
        self.proj_out(jnp.zeros((1, c.projectors.llm_dim)))
        s = c.siglip
        self.siglip2(jnp.zeros((1, s.image_size, s.image_size, s.num_channels)))
        self.siglip2_proj(jnp.zeros((1, c.projectors.siglip_dim)))


def head_module(model: UniPic) -> SimpleMLPAdaLN:
    """The diffusion head as a stand-alone module; its params are `params["diffusion_head"]`."""
    return SimpleMLPAdaLN(model.config.diffusion, model.dtype, model.remat)


def llm_module(model: UniPic) -> Qwen2:
    """The LLM as a stand-alone module; its params are `params["llm"]`."""
    return Qwen2(llm_config(model.config, model.dtype), model.dtype, model.remat)


def llm_config(config: UniPicConfig, dtype: Dtype) -> Qwen2Config:
    """The LLM's config under the dtype policy: in bf16 the RoPE inverse frequencies are rounded
    to bf16 first, as the reference's `model.to(torch.bfloat16)` rounds the `inv_freq` buffer
    (spec §1.3); float32 keeps the config as it is."""
    if jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16):
        return dataclasses.replace(config.qwen2, rope_inv_freq_dtype="bfloat16")
    return config.qwen2


def cast_params(params, dtype: Dtype):
    """Every floating param cast to `dtype` (round to nearest even), as the reference's
    `model.to(torch.bfloat16)` does before a bf16 run; integer leaves are kept."""
    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x
    return jax.tree_util.tree_map(cast, params)


def param_shapes(config: UniPicConfig) -> dict:
    """The 'params' tree of `UniPic(config)` as `jax.ShapeDtypeStruct`s (nothing allocated)."""
    model = UniPic(config)
    return jax.eval_shape(lambda rng: model.init(rng, method=UniPic.init_all), jax.random.key(0))["params"]


def init_params(config: UniPicConfig, rng: jax.Array) -> dict:
    """Random float32 params of `UniPic(config)` (every submodule; for tiny configs and benches)."""
    return jax.jit(lambda r: UniPic(config).init(r, method=UniPic.init_all))(rng)["params"]
