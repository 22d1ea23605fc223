"""DiffLoss: the SimpleMLPAdaLN diffusion head and its Gaussian diffusion (reference-spec §4).

The head maps a noisy token `x` (N, token_dim), an integer timestep and a MAR decoder condition
`c` (N, cond_dim) to 2·token_dim channels: the noise prediction ε and the LEARNED_RANGE variance
value v. Its forward is split so that a sampler embeds the condition once per sample and the
timestep once per step for all rows:

    y = embed_time(t) + embed_cond(c);  out = denoise(x, y)

Schedules (cosine ᾱ, betas capped at `max_beta`, respacing) are built in numpy float64 exactly as
the reference does and cast to float32 for use (`Schedule.tables()`), as the reference's
`_extract_into_tensor(...).float()` does. `sample` is the reverse loop (nested `lax.scan`s);
`training_losses` / `forward_loss` are the MSE + VB training objective. Every random draw is an
argument, so the reference's recorded draws can be replayed. With `remat=True` every ResBlock is
rematerialised on its own in the backward pass (`nn.remat`; param names unchanged). In bf16 every op
of the head rounds as the reference's does (layers.py): SiLU once, `x * (1 + scale) + shift` three
times, the sampler's state stays float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unipic_jax.models.layers import Dense, LayerNorm, add, mul, round_to, scalar_div, scalar_mul, silu, sub
from unipic_jax.sharding import constrain

FREQUENCY_DIM = 256  # sinusoidal timestep features (TimestepEmbedder's default)
MAX_PERIOD = 10000
LN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """The `diffusion` section of configs/unipic_1p5b.py."""

    token_dim: int  # channels of one latent token (ε and v each have this many)
    cond_dim: int  # MAR decoder width (the condition z)
    width: int  # head width
    depth: int  # number of ResBlocks
    num_train_steps: int  # diffusion steps of the training schedule
    num_sampling_steps: str  # respacing string for sampling, e.g. "100"
    max_beta: float  # cap of the cosine betas (0.2 in UniPic, 0.999 in MAR)


# ----------------------------------------------------------------------------------------------
# The head


def timestep_features(t: jax.Array, dim: int = FREQUENCY_DIM) -> jax.Array:
    """[cos(t·f), sin(t·f)] with f_k = exp(-ln(10000)·k/(dim/2)), float32, shape (N, dim).

    The exponent is formed in float32 as the reference does; the exp itself is taken in float64
    and rounded once (a backend-independent constant; torch's float32 exp is within 1 ulp of it).
    """
    half = dim // 2
    exponent = (-math.log(MAX_PERIOD) * np.arange(half, dtype=np.float32)) / half  # float32
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = jnp.asarray(t).astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _modulate(x, shift, scale):
    """`x * (1 + scale) + shift`: three ops, each rounded in bf16."""
    return add(mul(x, add(1, scale)), shift)


class TimestepEmbedder(nn.Module):
    """Linear(256 -> width) - SiLU - Linear(width -> width) on the sinusoidal features."""

    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t):
        h = round_to(timestep_features(t), self.dtype)
        h = Dense(self.width, dtype=self.dtype, name="mlp_0")(h)
        return Dense(self.width, dtype=self.dtype, name="mlp_2")(silu(h))


class ResBlock(nn.Module):
    """adaLN residual MLP: h + gate·MLP(LN(h)·(1+scale) + shift), (shift, scale, gate) from y.

    `modulation(y)` is the part that depends on y alone and `modulated(h, mod)` the rest, so a
    sampler can compute the modulations of many diffusion steps in one large product."""

    width: int
    dtype: Any = jnp.float32

    def setup(self):
        self.adaLN_modulation_1 = Dense(3 * self.width, dtype=self.dtype)
        self.in_ln = LayerNorm(epsilon=LN_EPS, use_fast_variance=False, dtype=self.dtype)
        self.mlp_0 = Dense(self.width, dtype=self.dtype)
        self.mlp_2 = Dense(self.width, dtype=self.dtype)

    def modulation(self, y_nd):
        """(N, width) -> (N, 3·width): [shift | scale | gate]."""
        return self.adaLN_modulation_1(silu(y_nd))

    def modulated(self, h_nd, mod_nk):
        h_nd = constrain(h_nd, ("batch", "act_embed"))
        shift, scale, gate = jnp.split(mod_nk, 3, axis=-1)
        u = _modulate(self.in_ln(h_nd), shift, scale)
        u = self.mlp_2(silu(self.mlp_0(u)))
        return constrain(add(h_nd, mul(gate, u)), ("batch", "act_embed"))

    def __call__(self, h_nd, y_nd):
        return self.modulated(h_nd, self.modulation(y_nd))


RematResBlock = nn.remat(ResBlock)


class FinalLayer(nn.Module):
    """No-affine LayerNorm, adaLN (shift, scale) from y, Linear(width -> out_dim); split into
    `modulation(y)` and `modulated(h, mod)` as `ResBlock`."""

    width: int
    out_dim: int
    dtype: Any = jnp.float32

    def setup(self):
        self.adaLN_modulation_1 = Dense(2 * self.width, dtype=self.dtype)
        self.norm_final = LayerNorm(epsilon=LN_EPS, use_bias=False, use_scale=False, use_fast_variance=False,
                                       dtype=self.dtype)
        self.linear = Dense(self.out_dim, dtype=self.dtype)

    def modulation(self, y_nd):
        """(N, width) -> (N, 2·width): [shift | scale]."""
        return self.adaLN_modulation_1(silu(y_nd))

    def modulated(self, h_nd, mod_nk):
        shift, scale = jnp.split(mod_nk, 2, axis=-1)
        return self.linear(_modulate(self.norm_final(h_nd), shift, scale))

    def __call__(self, h_nd, y_nd):
        return self.modulated(h_nd, self.modulation(y_nd))


class SimpleMLPAdaLN(nn.Module):
    """The DiffLoss network. `__call__(x, t, c)` is the reference forward; its parts are
    `embed_time(t)` (rows depend on t only), `embed_cond(c)` and `denoise(x, y)` with
    y = embed_time(t) + embed_cond(c). Output (N, 2·token_dim): [ε, v]."""

    config: DiffusionConfig
    dtype: Any = jnp.float32
    remat: bool = False  # rematerialise each ResBlock in the backward pass (training memory)

    def setup(self):
        cfg = self.config
        self.time_embed = TimestepEmbedder(cfg.width, self.dtype)
        self.cond_embed = Dense(cfg.width, dtype=self.dtype)
        self.input_proj = Dense(cfg.width, dtype=self.dtype)
        block = RematResBlock if self.remat else ResBlock
        self.res_blocks = [block(cfg.width, self.dtype) for _ in range(cfg.depth)]
        self.final_layer = FinalLayer(cfg.width, 2 * cfg.token_dim, self.dtype)

    def embed_time(self, t):
        """Integer timesteps (N,) on the original 0..num_train_steps-1 scale -> (N, width)."""
        return self.time_embed(t)

    def embed_cond(self, c_nd):
        """Conditions (N, cond_dim) -> (N, width)."""
        return self.cond_embed(round_to(c_nd, self.dtype))

    def denoise(self, x_nc, y_nd):
        """The trunk on tokens (N, token_dim) given y = t_emb + c_emb (N, width)."""
        h = self.input_proj(round_to(x_nc, self.dtype))
        y_nd = constrain(y_nd, ("batch", "act_embed"))  # rows like h (ResBlock), so mod is never gathered
        for block in self.res_blocks:
            h = block(h, y_nd)
        return self.final_layer(h, y_nd)

    def modulations(self, y_nd):
        """Every adaLN modulation for y (N, width): a tuple of (N, 3·width) per ResBlock, then
        the final layer's (N, 2·width). They depend on y only, not on the noisy tokens."""
        return tuple(block.modulation(y_nd) for block in self.res_blocks) + (self.final_layer.modulation(y_nd),)

    def denoise_modulated(self, x_nc, mods):
        """`denoise` given `modulations(y)` instead of y: the same numbers. `denoise` stays the
        path of training: `nn.remat` wraps a ResBlock's `__call__`, which recomputes its
        modulation in the backward pass instead of keeping it."""
        h = self.input_proj(round_to(x_nc, self.dtype))
        for block, mod in zip(self.res_blocks, mods):
            h = block.modulated(h, mod)
        return self.final_layer.modulated(h, mods[-1])

    def __call__(self, x_nc, t, c_nd):
        return self.denoise(x_nc, add(self.embed_time(t), self.embed_cond(c_nd)))

    def forward_with_cfg(self, x_nc, t, c_nd, cfg):
        """The reference `forward_with_cfg`: the net on [cond half of x; cond half of x] with
        conditions c = [cond; uncond], ε guided for both halves, v left unguided."""
        half = x_nc[: x_nc.shape[0] // 2]
        out = self(jnp.concatenate([half, half]), t, c_nd)
        return guide(out, cfg, self.config.token_dim)


def guide(out_nk, cfg, token_dim: int):
    """Classifier-free guidance of net outputs on rows [cond; uncond]: both halves get
    ε_u + cfg·(ε_c − ε_u); the variance channels keep each half's own values. The combination
    runs in the outputs' dtype (bf16 under the bf16 policy, as with the reference's constant
    schedule, where `cfg` is a Python float): three ops, each rounded, cfg itself unrounded."""
    eps, rest = out_nk[:, :token_dim], out_nk[:, token_dim:]
    eps_cond, eps_uncond = jnp.split(eps, 2)
    eps_guided = add(eps_uncond, scalar_mul(sub(eps_cond, eps_uncond), cfg))
    return jnp.concatenate([jnp.concatenate([eps_guided, eps_guided]), rest], axis=1)


def head_param_shapes(config: DiffusionConfig) -> dict:
    """The head's param tree as `jax.ShapeDtypeStruct`s (nothing allocated)."""
    model = SimpleMLPAdaLN(config)
    x = jax.ShapeDtypeStruct((1, config.token_dim), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    c = jax.ShapeDtypeStruct((1, config.cond_dim), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x, t, c)["params"]


# ----------------------------------------------------------------------------------------------
# Schedules (numpy float64, as the reference)


def cosine_betas(num_steps: int, max_beta: float) -> np.ndarray:
    """β_i = min(1 − ᾱ((i+1)/n)/ᾱ(i/n), max_beta), ᾱ(s) = cos²((s+0.008)/1.008·π/2), float64."""

    def alpha_bar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                     for i in range(num_steps)], dtype=np.float64)


def space_timesteps(num_steps: int, respacing: str | Sequence[int] | None) -> list[int]:
    """The kept original timesteps, ascending. `respacing` is "" / None (keep all), a comma
    separated string of per-section counts ("100", "10,20") or a sequence of counts. Each of the
    equal sections keeps `start + round(k·stride)`, stride accumulated as a float (Python round)."""
    if not respacing:
        counts = [num_steps]
    elif isinstance(respacing, str):
        if respacing.startswith("ddim"):
            raise ValueError(f"DDIM respacing {respacing!r} is not supported")
        counts = [int(x) for x in respacing.split(",")]
    else:
        counts = [int(x) for x in respacing]
    size_per, extra = divmod(num_steps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot keep {count} steps out of a section of {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))


class DiffusionTables(NamedTuple):
    """Float32 coefficient tables indexed by the spaced step (a pytree: pass it through jit)."""

    timestep_map: jax.Array  # (T,) int32, spaced step -> original timestep fed to the net
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    log_betas: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array

    @property
    def num_steps(self) -> int:
        return self.timestep_map.shape[0]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A (respaced) Gaussian diffusion's float64 arrays, named as in the reference."""

    timestep_map: np.ndarray
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray

    @classmethod
    def from_betas(cls, betas: np.ndarray, timestep_map: Sequence[int]) -> "Schedule":
        """Every derived array of the reference GaussianDiffusion, in float64."""
        betas = np.asarray(betas, dtype=np.float64)
        alphas = 1.0 - betas
        ac = np.cumprod(alphas, axis=0)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        return cls(
            timestep_map=np.asarray(timestep_map, dtype=np.int64),
            betas=betas,
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=np.sqrt(ac),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
            posterior_variance=post_var,
            # post_var[0] = 0: the log is clipped by repeating index 1
            posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])),
            posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        )

    @classmethod
    def create(cls, config: DiffusionConfig, respacing: str | Sequence[int] | None) -> "Schedule":
        """The reference `create_diffusion(respacing, "cosine")` (a SpacedDiffusion): betas
        re-derived over the kept steps τ as β'_j = 1 − ᾱ(τ_j)/ᾱ(τ_{j−1}), ᾱ(τ_{−1}) = 1."""
        base = cosine_betas(config.num_train_steps, config.max_beta)
        ac = np.cumprod(1.0 - base, axis=0)
        kept = space_timesteps(config.num_train_steps, respacing)
        ac_kept = ac[kept]
        new_betas = 1 - ac_kept / np.append(1.0, ac_kept[:-1])
        return cls.from_betas(new_betas, kept)

    @property
    def num_steps(self) -> int:
        return len(self.timestep_map)

    def tables(self) -> DiffusionTables:
        """Float32 casts of the float64 arrays (log β taken in float64 first)."""
        f32 = lambda a: jnp.asarray(np.asarray(a, dtype=np.float64).astype(np.float32))
        return DiffusionTables(
            timestep_map=jnp.asarray(self.timestep_map, dtype=jnp.int32),
            sqrt_alphas_cumprod=f32(self.sqrt_alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=f32(self.sqrt_one_minus_alphas_cumprod),
            sqrt_recip_alphas_cumprod=f32(self.sqrt_recip_alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=f32(self.sqrt_recipm1_alphas_cumprod),
            log_betas=f32(np.log(self.betas)),
            posterior_log_variance_clipped=f32(self.posterior_log_variance_clipped),
            posterior_mean_coef1=f32(self.posterior_mean_coef1),
            posterior_mean_coef2=f32(self.posterior_mean_coef2),
        )


def train_schedule(config: DiffusionConfig) -> Schedule:
    """DiffLoss.train_diffusion: every one of the num_train_steps steps kept."""
    return Schedule.create(config, None)


def sampling_schedule(config: DiffusionConfig, respacing: str | None = None) -> Schedule:
    """DiffLoss.gen_diffusion: respaced to `respacing` (default config.num_sampling_steps)."""
    return Schedule.create(config, config.num_sampling_steps if respacing is None else respacing)


# ----------------------------------------------------------------------------------------------
# p(x_{t-1} | x_t): shared by the sampler and the VB loss


def _at(table, t):
    """table[t] shaped to broadcast over (N, C): scalar t -> scalar, (N,) t -> (N, 1)."""
    v = table[t]
    return v[:, None] if v.ndim else v


def _p_mean_log_variance(tables: DiffusionTables, t, x_nc, eps_nc, v_nc):
    """Mean (from ε, no clipping) and LEARNED_RANGE log variance of p(x_{t-1} | x_t)."""
    min_log = _at(tables.posterior_log_variance_clipped, t)
    max_log = _at(tables.log_betas, t)
    frac = scalar_div(add(v_nc, 1), 2)  # in the net's dtype (bf16: each op rounds), as the reference
    log_var = frac * max_log + sub(1, frac) * min_log
    x0 = _at(tables.sqrt_recip_alphas_cumprod, t) * x_nc - _at(tables.sqrt_recipm1_alphas_cumprod, t) * eps_nc
    mean = _at(tables.posterior_mean_coef1, t) * x0 + _at(tables.posterior_mean_coef2, t) * x_nc
    return mean, log_var


# ----------------------------------------------------------------------------------------------
# Sampling


def draw_sample_noise(key: jax.Array, num_rows: int, token_dim: int, num_steps: int, *, guided: bool):
    """Fresh draws in the reference's shapes: the initial noise ((N/2, C) when guided, else
    (N, C)) and one (N, C) draw per reverse step, stacked (T, N, C) in draw order."""
    key_init, key_steps = jax.random.split(key)
    init_rows = num_rows // 2 if guided else num_rows
    noise_init = jax.random.normal(key_init, (init_rows, token_dim), jnp.float32)
    step_noise = jax.random.normal(key_steps, (num_steps, num_rows, token_dim), jnp.float32)
    return noise_init, step_noise


# Rows of adaLN modulations `sample` computes in one product (a chunk of diffusion steps x rows).
# Larger chunks stop paying off on a 2-core CPU near 500 rows: the products are efficient by then
# and the chunk still sits in cache (60 MB at full size in bf16).
MODULATION_CHUNK_ROWS = 512


def steps_per_chunk(num_steps: int, num_rows: int) -> int:
    """The most diffusion steps K, a divisor of `num_steps`, with K·num_rows <= MODULATION_CHUNK_ROWS
    (at least 1)."""
    fits = [k for k in range(1, num_steps + 1) if num_steps % k == 0 and k * num_rows <= MODULATION_CHUNK_ROWS]
    return max(fits, default=1)


def sample(model: SimpleMLPAdaLN, params, tables: DiffusionTables, z_nd, noise_init, step_noise_tnc,
           *, temperature, cfg=1.0, guided: bool, unroll: bool = False):
    """DiffLoss.sample: the reverse chain over the spaced steps T-1 ... 0.

    z_nd: conditions (N, cond_dim), rows [cond; uncond] when `guided`. noise_init: x_T draw,
    (N/2, C) when guided (x_T = [draw; draw]) else (N, C). step_noise_tnc: the per-step draws in
    draw order (step k uses j = T-1-k; the j = 0 draw is multiplied by 0). `temperature` scales
    only the per-step noise. `guided` (static) selects `forward_with_cfg`; `cfg` may be traced.
    Returns x_0 (N, C) float32, both halves when guided. Jit with `model` and `guided` static:
    one compile per (N, T, guided).

    The adaLN modulations depend on (t, z) only, not on x: they are computed for a chunk of K
    steps at once (`steps_per_chunk`; one (K·N, width) product per block instead of K products
    of N rows, the same numbers), then the K steps of the chain run on them (nested scans).
    `unroll=True` unrolls both scans (the same arithmetic; for XLA's cost analysis, which counts a
    loop body once).
    """
    x, run_steps = _chain(model, params, tables, z_nd, noise_init, temperature=temperature, cfg=cfg, guided=guided,
                          unroll=unroll)
    chunk = steps_per_chunk(tables.num_steps, x.shape[0])
    steps = jnp.arange(tables.num_steps - 1, -1, -1).reshape(-1, chunk)
    noise = jnp.asarray(step_noise_tnc, jnp.float32)
    x, _ = jax.lax.scan(lambda x_nc, xs: (run_steps(x_nc, *xs), None), x,
                        (steps, noise.reshape((-1, chunk) + noise.shape[1:])), unroll=unroll or 1)
    return x


def _chain(model: SimpleMLPAdaLN, params, tables: DiffusionTables, z_nd, noise_init, *, temperature, cfg,
           guided: bool, unroll: bool):
    """What `sample` and `sample_dynamic` share: x_T (N, C) float32 and `run_steps(x, js, noise_knc)`,
    the reverse steps at spaced indices `js` (K,), their adaLN modulations in one (K·N, width)
    product, then the K steps of the chain in a scan (unrolled with `unroll`)."""
    variables = {"params": params}
    x = jnp.asarray(noise_init, jnp.float32)
    if guided:
        x = jnp.concatenate([x, x])
    c_emb = model.apply(variables, z_nd, method=SimpleMLPAdaLN.embed_cond)
    t_emb = model.apply(variables, tables.timestep_map, method=SimpleMLPAdaLN.embed_time)  # (T, width)
    rows, token_dim = x.shape

    def step(x_nc, xs):
        j, noise_nc, mods = xs
        x_in = jnp.concatenate([x_nc[: rows // 2]] * 2) if guided else x_nc
        out = model.apply(variables, x_in, mods, method=SimpleMLPAdaLN.denoise_modulated)
        if guided:
            out = guide(out, cfg, token_dim)
        mean, log_var = _p_mean_log_variance(tables, j, x_nc, out[:, :token_dim], out[:, token_dim:])
        nonzero = (j != 0).astype(jnp.float32)
        return mean + nonzero * jnp.exp(0.5 * log_var) * noise_nc * temperature, None

    def run_steps(x_nc, js, noise_knc):
        k = js.shape[0]
        y_knd = add(t_emb[js][:, None], c_emb[None])
        mods = model.apply(variables, y_knd.reshape(k * rows, -1), method=SimpleMLPAdaLN.modulations)
        mods = tuple(m.reshape(k, rows, -1) for m in mods)
        return jax.lax.scan(step, x_nc, (js, noise_knc, mods), unroll=unroll or 1)[0]

    return x, run_steps


# The most steps a `sample_dynamic` chunk batches (its traced length is cut into whole chunks plus
# single steps, so a longer chunk leaves more single steps): 10 reaches the batched products'
# efficiency on a CPU from 50 rows up and keeps the single-step tail short.
DYNAMIC_CHUNK_STEPS = 10


def dynamic_chunk(num_rows: int) -> int:
    """Steps per chunk of `sample_dynamic`: K·num_rows <= MODULATION_CHUNK_ROWS, 1 <= K <= 10."""
    return max(1, min(DYNAMIC_CHUNK_STEPS, MODULATION_CHUNK_ROWS // max(num_rows, 1)))


def sample_dynamic(model: SimpleMLPAdaLN, params, tables: DiffusionTables, num_steps, z_nd, noise_init,
                   step_noise_tnc, *, temperature, cfg=1.0, guided: bool, static_steps: int | None = None):
    """`sample` over the first `num_steps` (traced) entries of padded tables: one program for every
    chain length up to the tables' length T_max (the fast sampler's annealed step counts).

    tables: a respaced schedule of `num_steps` steps, each table padded to T_max entries.
    step_noise_tnc (T_max, N, C): entry i is the draw of reverse step i (spaced step
    num_steps-1-i); entries from num_steps on are unused. The chain runs num_steps // K chunks of
    K = `dynamic_chunk(N)` steps, the modulations of a chunk in one product as in `sample`, then
    the num_steps % K remaining steps one by one: nothing is computed beyond num_steps. The results
    equal `sample`'s up to the products' rounding. `static_steps` (a Python int equal to
    `num_steps`) unrolls every loop, for XLA's cost analysis.
    """
    unroll = static_steps is not None
    x, run_steps = _chain(model, params, tables, z_nd, noise_init, temperature=temperature, cfg=cfg, guided=guided,
                          unroll=unroll)
    noise = jnp.asarray(step_noise_tnc, jnp.float32)
    chunk = dynamic_chunk(x.shape[0])

    def steps_from(first, k: int, x_nc):
        """Reverse steps first .. first+k-1 (loop indices)."""
        js = num_steps - 1 - (first + jnp.arange(k))
        return run_steps(x_nc, js, jax.lax.dynamic_slice_in_dim(noise, first, k))

    if unroll:
        full = static_steps // chunk
        for c in range(full):
            x = steps_from(c * chunk, chunk, x)
        for i in range(full * chunk, static_steps):
            x = steps_from(i, 1, x)
        return x
    full = num_steps // chunk
    x = jax.lax.fori_loop(0, full, lambda c, x_nc: steps_from(c * chunk, chunk, x_nc), x)
    return jax.lax.fori_loop(full * chunk, num_steps, lambda i, x_nc: steps_from(i, 1, x_nc), x)


# ----------------------------------------------------------------------------------------------
# Training


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * jnp.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of bins of width 2/255 around x (tanh-approximated CDF, edge bins open)."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def training_losses(model: SimpleMLPAdaLN, params, tables: DiffusionTables, x_start_nc, t, noise_nc, c_nd):
    """Per-row losses of the reference `training_losses` (MSE + VB, LEARNED_RANGE).

    t: (N,) int spaced steps; noise: (N, C). Returns {'loss', 'mse', 'vb'}, each (N,). vb is
    KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) with ε detached, or the discretised decoder NLL at
    t = 0, both averaged over channels and in bits.
    """
    token_dim = x_start_nc.shape[1]
    x_t = (_at(tables.sqrt_alphas_cumprod, t) * x_start_nc
           + _at(tables.sqrt_one_minus_alphas_cumprod, t) * noise_nc)
    out = model.apply({"params": params}, x_t, tables.timestep_map[t], c_nd)
    eps, v = out[:, :token_dim], out[:, token_dim:]

    true_mean = _at(tables.posterior_mean_coef1, t) * x_start_nc + _at(tables.posterior_mean_coef2, t) * x_t
    true_log_var = _at(tables.posterior_log_variance_clipped, t)
    mean, log_var = _p_mean_log_variance(tables, t, x_t, jax.lax.stop_gradient(eps), v)
    kl = jnp.mean(_normal_kl(true_mean, true_log_var, mean, log_var), axis=1) / math.log(2.0)
    log_lik = _discretized_gaussian_log_likelihood(x_start_nc, mean, 0.5 * log_var)
    nll = -jnp.mean(log_lik, axis=1) / math.log(2.0)
    vb = jnp.where(t == 0, nll, kl)
    mse = jnp.mean((noise_nc - eps) ** 2, axis=1)
    return {"loss": mse + vb, "mse": mse, "vb": vb}


def forward_loss(model: SimpleMLPAdaLN, params, tables: DiffusionTables, z_bld, target_blc, mask_bl,
                 t, noise_nc, diffusion_batch_mul: int):
    """MAR.forward_loss: flatten (b, L, ·) to rows, tile the rows `diffusion_batch_mul` times
    ([all; all; ...], N = b·L·mul rows, matching t (N,) and noise (N, C)), then the masked mean
    Σ(loss·mask)/Σmask of the per-row training loss (mask 1 = predicted token)."""
    # The rows are computed sample-major ((b, mul, L) order, t and noise permuted to match) and
    # pinned to the "batch" rule: each device then holds the rows of its own samples. In the
    # reference's [all; all; ...] order a block of rows spans every sample, and XLA all-gathered
    # the rows of every ResBlock's adaLN modulation to all N = b·L·mul (36 GiB per chip at 1024
    # samples of 512 px). The masked mean does not depend on the row order.
    b, length = mask_bl.shape
    mul = diffusion_batch_mul

    def rows(a):  # (b, L, ...) -> (b·mul·L, ...), each sample's rows repeated mul times
        a = jnp.broadcast_to(a[:, None], (b, mul) + a.shape[1:])
        a = a.reshape((b * mul * length,) + a.shape[3:])
        return constrain(a, ("batch",) + (None,) * (a.ndim - 1))

    def sample_major(a):  # the reference's (mul·b·L, ...) rows -> (b·mul·L, ...)
        a = jnp.swapaxes(a.reshape((mul, b, length) + a.shape[1:]), 0, 1).reshape(a.shape)
        return constrain(a, ("batch",) + (None,) * (a.ndim - 1))

    mask = rows(mask_bl)
    loss = training_losses(model, params, tables, rows(target_blc), sample_major(t), sample_major(noise_nc),
                           rows(z_bld))["loss"]
    return jnp.sum(loss * mask) / jnp.sum(mask)
