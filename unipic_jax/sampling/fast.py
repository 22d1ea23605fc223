"""Fast sampling (issue #14): training-free methods that do less work than `SkyworkUnipic.sample`.

The faithful sampler (`t2i.sample_t2i` without `fast`) stays the default and is not touched by
anything here. Each method is a switch of `FastSettings`; they compose, and every shape stays
static: the step plan (`plan`) is Python data computed from (grid, num_iter, settings) before any
tracing.

  * MAR steps (`mar_steps`): run `ceil(mar_steps * num_iter)` MAR iterations instead of
    `num_iter` (the reference's own knob; its text2image.py uses 32, its paper 64).
  * DiSA, diffusion step annealing (`disa`; Zhao et al., arXiv 2505.20297): the diffusion head's
    respaced DDPM chain gets fewer steps as generation proceeds, e.g. 50 at the first MAR step
    down to 5 at the last. Each count is the UniPic schedule (cosine, max_beta 0.2) respaced to
    that many steps (DDPM respacing, as DiSA; not DDIM). The chain runs `diffusion.sample_dynamic`
    over tables padded to the largest count, its length a traced scalar, so one program serves
    every count.
  * LazyMAR's condition-redundancy cache (`lazy_cfg`; Yan et al., ICCV 2025): the difference
    between the unconditional and conditional rows' last MAR-decoder block output changes little
    between MAR steps. On "fresh" steps it is computed for every token and kept; on the other
    ("lazy") steps only the conditional rows run through the LLM and the MAR decoder, and the
    unconditional rows' decoder output is the conditional one plus the kept difference. LazyMAR's
    token cache (incremental MAR encoder, pruned decoder tokens) and its diffusion-head caches are
    not implemented (README, Benchmark).

A step is one of three programs: "plain" (the faithful `t2i._condition`), "fresh" (both halves,
every token through the last decoder block, returns the difference; only on a fresh step followed
by a lazy one) and "lazy" (conditional rows only). The diffusion program (`_predict`) is keyed by
the predicted-slot count only. A configuration therefore compiles at most `Buckets.visible` x 3
condition programs and `Buckets.predicted` diffusion programs, and a second call compiles nothing
(`TRACES` counts traces).

Randomness: as the faithful sampler's `Draws`, with step k's per-step noise (T_k, rows, C) for its
chain of T_k steps; `draws_from_key` draws the orders and each step's x_T exactly as
`t2i.draws_from_key` does for the same key (the same generation orders, and the same x_T when the
step predicts as many tokens), and the per-step noise at its own shape.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unipic_jax.models import diffusion
from unipic_jax.models.unipic import UniPic, head_module
from unipic_jax.sampling import t2i
from unipic_jax.sampling.schedule import Step, cfg_scales, mask_schedule
from unipic_jax.sampling.text import bucket_length, pad_prompt
from unipic_jax.sharding import constrain

Grid = tuple[int, int]

# Times each jitted program of this module was traced: tests prove one compile per configuration.
TRACES: collections.Counter = collections.Counter()

STRATEGIES = ("linear", "cosine", "constant")


# ----------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class DiSA:
    """Diffusion step annealing: the diffusion chain length at each MAR step.

    Followed from Qinyu-Allen-Zhao/DiSA, Harmon_DiSA/src/models/mar/diffloss.py: one respaced
    diffusion per count `lower..upper` (`create_diffusion(timestep_respacing=str(count))`, lines
    25-28), and at MAR step `s` of `n` the schedule index (lines 52-60), with `last = n - 1` and
    `span = upper - lower`: linear `int((last - s) / last * span)`, cosine
    `int((cos(pi * s / last) + 1) / 2 * span)`, constant 0; the count is `lower + index`.
    Defaults: upper 50, lower 5, linear, as Harmon_DiSA/configs/models/
    qwen2_5_1_5b_kl16_mar_h_disa_50_5.py lines 53-55 (and MAR_DiSA/models/mar.py lines 40-42).
    The published code divides by zero for one MAR step; here that step gets `upper`.
    """

    upper: int = 50
    lower: int = 5
    strategy: str = "linear"

    def __post_init__(self):
        if not (isinstance(self.lower, int) and isinstance(self.upper, int) and 1 <= self.lower <= self.upper):
            raise ValueError(f"DiSA needs 1 <= lower <= upper diffusion steps, got {self.lower}, {self.upper}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"DiSA strategy must be one of {STRATEGIES}, got {self.strategy!r}")

    def steps(self, num_iter: int) -> tuple[int, ...]:
        """The diffusion step count of each of `num_iter` MAR steps."""
        span, last = self.upper - self.lower, num_iter - 1
        counts = []
        for s in range(num_iter):
            if self.strategy == "constant":
                index = 0
            elif last == 0:
                index = span
            elif self.strategy == "linear":
                index = int((last - s) / last * span)
            else:
                index = int((math.cos(math.pi * s / last) + 1) / 2 * span)
            counts.append(self.lower + index)
        return tuple(counts)


@dataclasses.dataclass(frozen=True)
class LazyCFG:
    """LazyMAR's condition-redundancy cache: which MAR steps are fresh.

    Followed from feihongyan1/LazyMAR, models/mar_cache.py: step `s` is fresh when
    `s < start_step or (s - start_step) % refresh_every == 0` (lines 222-224), with start_step 5
    and refresh_every ("fresh_t") 9 (lines 364-365), by step index whatever num_iter is (as there).
    On a fresh step the difference uncond - cond of the last decoder block's output (before the
    decoder norm) is kept for every token (line 290); on a lazy step the decoder runs on the
    conditional rows only and the unconditional rows get conditional + difference (lines
    241-253, 277-280). In UniPic the LLM sits between the MAR encoder and decoder; on lazy steps
    it also runs on the conditional rows only (the MAR encoder already does in every mode).
    """

    start_step: int = 5
    refresh_every: int = 9

    def __post_init__(self):
        if not (isinstance(self.start_step, int) and isinstance(self.refresh_every, int)
                and self.start_step >= 0 and self.refresh_every >= 1):
            raise ValueError(f"LazyCFG needs start_step >= 0 and refresh_every >= 1, got {self.start_step}, "
                             f"{self.refresh_every}")

    def fresh(self, step: int) -> bool:
        return step < self.start_step or (step - self.start_step) % self.refresh_every == 0


@dataclasses.dataclass(frozen=True)
class FastSettings:
    """Which fast methods run (all off: the fast sampler's programs, the faithful arithmetic up to
    rounding). `mar_steps`: the fraction of the asked MAR steps to run (ceil, at least 1)."""

    mar_steps: float = 1.0
    disa: Optional[DiSA] = None
    lazy_cfg: Optional[LazyCFG] = None

    def __post_init__(self):
        if not (isinstance(self.mar_steps, (int, float)) and 0 < self.mar_steps <= 1):
            raise ValueError(f"mar_steps is a fraction in (0, 1], got {self.mar_steps!r}")

    def num_iter(self, asked: int) -> int:
        """MAR steps actually run for `asked` (the float product is rounded to 9 places first, so
        0.5 * 64 is 32 and not 33 through float error)."""
        return max(1, math.ceil(round(self.mar_steps * asked, 9)))

    def as_dict(self) -> dict:
        """Every setting, JSON-ready (image metadata); `from_dict` reads it back."""
        return {"mar_steps": self.mar_steps,
                "disa": dataclasses.asdict(self.disa) if self.disa else None,
                "lazy_cfg": dataclasses.asdict(self.lazy_cfg) if self.lazy_cfg else None}

    @classmethod
    def from_dict(cls, d: dict) -> "FastSettings":
        unknown = set(d) - {"mar_steps", "disa", "lazy_cfg"}
        if unknown:
            raise ValueError(f"unknown fast settings {sorted(unknown)}")
        return cls(mar_steps=d.get("mar_steps", 1.0),
                   disa=DiSA(**d["disa"]) if d.get("disa") else None,
                   lazy_cfg=LazyCFG(**d["lazy_cfg"]) if d.get("lazy_cfg") else None)


# The `fast` preset (`fast=True`, `--fast`): the best measured combination (README, Benchmark).
FAST = FastSettings(mar_steps=0.25, disa=DiSA(25, 5, "linear"), lazy_cfg=LazyCFG(5, 9))


def resolve(fast) -> Optional[FastSettings]:
    """`fast` as given to the samplers and the API: None / False (faithful), True (`FAST`), a
    `FastSettings` or its `as_dict()`."""
    if fast is None or fast is False:
        return None
    if fast is True:
        return FAST
    if isinstance(fast, FastSettings):
        return fast
    if isinstance(fast, dict):
        return FastSettings.from_dict(fast)
    raise TypeError(f"fast must be a bool, a FastSettings or a dict, got {type(fast).__name__}")


def describe(fast, num_iter: int) -> dict:
    """The image metadata of a call: `fast` (the mode, True or False) and, for the fast sampler,
    `fast_settings` (every setting, `FastSettings.as_dict()`) and `fast_steps` (the MAR steps run
    for `num_iter` asked). `FastSettings.from_dict(fast_settings)` reproduces the sampler."""
    settings = resolve(fast)
    if settings is None:
        return {"fast": False}
    return {"fast": True, "fast_settings": settings.as_dict(), "fast_steps": settings.num_iter(num_iter)}


# ----------------------------------------------------------------------------------------------
# The step plan (Python data, known before tracing)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """One MAR step of a fast call: its token counts, diffusion chain length and program
    ("plain", "fresh" or "lazy"; see the module docstring)."""

    step: Step
    chain_steps: int
    mode: str


def plan(settings: FastSettings, num_tokens: int, num_iter: int, diffusion_config: diffusion.DiffusionConfig,
         guided: bool) -> tuple[StepPlan, ...]:
    """The plan of a call asking for `num_iter` MAR steps over `num_tokens` tokens."""
    steps = mask_schedule(num_tokens, settings.num_iter(num_iter))
    if settings.disa is not None:
        chains = settings.disa.steps(len(steps))
    else:
        chains = (diffusion.sampling_schedule(diffusion_config).num_steps,) * len(steps)
    lazy = [guided and settings.lazy_cfg is not None and not settings.lazy_cfg.fresh(s.index) for s in steps]
    modes = ["lazy" if lazy[k] else "fresh" if k + 1 < len(steps) and lazy[k + 1] else "plain"
             for k in range(len(steps))]
    return tuple(StepPlan(s, t, m) for s, t, m in zip(steps, chains, modes))


@functools.cache
def _chain_tables(config: diffusion.DiffusionConfig, num_steps: Optional[int], max_steps: int
                  ) -> diffusion.DiffusionTables:
    """The sampling schedule respaced to `num_steps` (None: the configured respacing), every
    table zero-padded to `max_steps` entries."""
    schedule = diffusion.sampling_schedule(config, None if num_steps is None else str(num_steps))
    tables = schedule.tables()
    return diffusion.DiffusionTables(*(jnp.pad(a, (0, max_steps - a.shape[0])) for a in tables))


def _tables_for(config: diffusion.DiffusionConfig, settings: FastSettings, chain_steps: int, max_steps: int):
    return _chain_tables(config, chain_steps if settings.disa is not None else None, max_steps)


# ----------------------------------------------------------------------------------------------
# Programs


@dataclasses.dataclass(frozen=True)
class _CondPlan:
    image_shape: Grid
    visible_slots: int
    predicted_slots: int
    padded: bool
    mode: str  # "fresh" or "lazy" (guided calls only; "plain" steps run t2i._condition)


@dataclasses.dataclass(frozen=True)
class _ChainPlan:
    predicted_slots: int
    guided: bool
    static_steps: Optional[int] = None  # an unrolled chain of this many steps (cost analysis only)


def _decoder_prenorm(self: UniPic, x_enc_bkd, visible_bv, image_shape: Grid, x_con_bsd, query_bq):
    """`MAR.decode_at` up to the last block's output, before `decoder_norm`: (b, q, D) for the
    raster positions `query_bq`, or (b, buffer + m*n, D) for every slot when None."""
    mar = self.mar
    c = mar.config
    b = x_enc_bkd.shape[0]
    image_len = image_shape[0] * image_shape[1]
    x_bkd = mar.decoder_embed(x_enc_bkd)
    if x_con_bsd is None:
        canvas_bsd = jnp.broadcast_to(mar.mask_token.astype(x_bkd.dtype), (b, c.buffer_size + image_len, c.decoder_dim))
    else:
        canvas_bsd = mar.decoder_embed(x_con_bsd)
    kept_bk = mar._kept_positions(visible_bv)
    x_bsd = canvas_bsd.at[jnp.arange(b)[:, None], kept_bk].set(x_bkd, mode="drop")
    x_bsd = x_bsd + mar._pos_embed(mar.decoder_pos_embed_learned, image_shape)
    for blk in mar.decoder_blocks[:-1]:
        x_bsd = constrain(blk(x_bsd, None, True), ("batch", "length", "act_embed"))
    query = None if query_bq is None else c.buffer_size + jnp.minimum(query_bq, image_len - 1).astype(jnp.int32)
    return mar.decoder_blocks[-1](x_bsd, None, True, query)


def _decoder_out(self: UniPic, x_bqd, query_bq, image_shape: Grid):
    """The rest of `MAR.decode_at` for the rows at raster positions `query_bq`: decoder norm plus
    the diffusion position embedding."""
    mar = self.mar
    pos_1ld = mar._pos_embed(mar.diffusion_pos_embed_learned, image_shape)
    query = jnp.minimum(query_bq, image_shape[0] * image_shape[1] - 1).astype(jnp.int32)
    return mar.decoder_norm(x_bqd) + jnp.take(pos_1ld[0], query, axis=0)


def _cache_rows(cache, rows: int):
    return cache.replace(k=cache.k[:, :rows], v=cache.v[:, :rows], valid=cache.valid[:rows])


def _gather_slots(x_bsd, positions_bq, buffer: int, image_len: int):
    index = buffer + jnp.minimum(positions_bq, image_len - 1).astype(jnp.int32)
    return jnp.take_along_axis(x_bsd, index[:, :, None], axis=1)


@functools.partial(jax.jit, static_argnames=("model", "plan"))
def _condition(model: UniPic, plan: _CondPlan, params, tokens_blc, orders_bl, cache, x_con_bsd, diff_bsd, counts):
    """A guided step's conditions (2 * batch * predicted_slots, decoder_dim), cond rows then
    uncond rows as `t2i._condition`, and the CFG residual (batch, buffer + m*n, decoder_dim):
    computed ("fresh") or `diff_bsd` passed through ("lazy")."""
    TRACES[f"condition_{plan.mode}"] += 1
    variables = {"params": params}
    batch, num_tokens = orders_bl.shape
    buffer = model.config.buffer_size
    masked, mask_len = counts[0], counts[1]
    visible_bv = t2i._select(orders_bl, masked, num_tokens, plan.visible_slots)
    predicted_bp = t2i._select(orders_bl, mask_len, masked, plan.predicted_slots)
    if plan.mode == "lazy":
        x_enc, _ = model.apply(variables, _cache_rows(cache, batch), tokens_blc[:batch], visible_bv,
                               num_tokens - masked, plan.image_shape, padded=plan.padded, halves=1,
                               method=UniPic.mae_encoder_cached)
        x_con = None if x_con_bsd is None else x_con_bsd[:batch]
        cond_bpd = model.apply(variables, x_enc, visible_bv, plan.image_shape, x_con, predicted_bp,
                               method=_decoder_prenorm)
        uncond_bpd = cond_bpd + _gather_slots(diff_bsd, predicted_bp, buffer, num_tokens).astype(cond_bpd.dtype)
        x_bqd = jnp.concatenate([cond_bpd, uncond_bpd])
    else:
        visible2 = t2i._both_halves(visible_bv, True)
        x_enc, _ = model.apply(variables, cache, tokens_blc, visible2, num_tokens - masked, plan.image_shape,
                               padded=plan.padded, halves=2, method=UniPic.mae_encoder_cached)
        x_bsd = model.apply(variables, x_enc, visible2, plan.image_shape, x_con_bsd, None, method=_decoder_prenorm)
        diff_bsd = x_bsd[batch:] - x_bsd[:batch]
        x_bqd = _gather_slots(x_bsd, t2i._both_halves(predicted_bp, True), buffer, num_tokens)
    z_bpd = model.apply(variables, x_bqd, t2i._both_halves(predicted_bp, True), plan.image_shape,
                        method=_decoder_out)
    z_sel = jnp.concatenate([t2i._diffusion_rows(z, masked - mask_len) for z in jnp.split(z_bpd, 2)])
    return z_sel, diff_bsd


@functools.partial(jax.jit, static_argnames=("model", "plan"))
def _predict(model: UniPic, plan: _ChainPlan, params, tables, num_steps, tokens_blc, z_sel, orders_bl, counts,
             noise_init, step_noise, cfg, temperature):
    """A diffusion chain of `num_steps` (traced) steps on one step's predicted tokens -> the new
    tokens of every row (`t2i._predict` with `diffusion.sample_dynamic`)."""
    TRACES["predict"] += 1
    batch = orders_bl.shape[0]
    masked, mask_len = counts[0], counts[1]
    predicted_bp = t2i._select(orders_bl, mask_len, masked, plan.predicted_slots)
    sampled = diffusion.sample_dynamic(head_module(model), params["diffusion_head"], tables, num_steps, z_sel,
                                       noise_init, step_noise, temperature=temperature, cfg=cfg, guided=plan.guided,
                                       static_steps=plan.static_steps)
    cond_blc = t2i._scatter_rows(tokens_blc[:batch], predicted_bp, masked - mask_len,
                                 sampled[: batch * plan.predicted_slots])
    return t2i._both_halves(cond_blc, plan.guided)


# ----------------------------------------------------------------------------------------------
# Draws


@functools.partial(jax.jit, static_argnames=("batch", "num_tokens", "predicted", "chains", "token_dim", "guided"))
def _draws_from_key(key, batch: int, num_tokens: int, predicted: tuple[int, ...], chains: tuple[int, ...],
                    token_dim: int, guided: bool) -> t2i.Draws:
    TRACES["draws"] += 1
    key_orders, key_noise = jax.random.split(key)
    orders = jax.vmap(lambda b: jax.random.permutation(jax.random.fold_in(key_orders, b), num_tokens))(
        jnp.arange(batch))
    inits, steps = [], []
    for k, (count, chain) in enumerate(zip(predicted, chains)):
        rows = batch * count * (2 if guided else 1)
        init, noise = diffusion.draw_sample_noise(jax.random.fold_in(key_noise, k), rows, token_dim, chain,
                                                  guided=guided)
        inits.append(init)
        steps.append(noise)
    return t2i.Draws(orders=orders.astype(jnp.int32), noise_init=tuple(inits), step_noise=tuple(steps))


def draws_from_key(key: jax.Array, *, batch: int, num_tokens: int, steps: Sequence[StepPlan], token_dim: int,
                   guided: bool) -> t2i.Draws:
    """Fresh `Draws` for a fast plan from a `jax.random` key (as `t2i.draws_from_key`, step k's
    per-step noise of shape (chain_steps_k, rows, C))."""
    return _draws_from_key(key, batch, num_tokens, tuple(p.step.predicted for p in steps),
                           tuple(p.chain_steps for p in steps), token_dim, guided)


@functools.partial(jax.jit, static_argnames=("rows", "guided", "max_steps"))
def _pad_noise(noise_init, step_noise, rows: tuple[tuple[int, int], ...], guided: bool, max_steps: int):
    """Each step's noise padded from its real rows to its slot rows and its chain to `max_steps`."""
    TRACES["pad_noise"] += 1
    halves = 2 if guided else 1
    inits = tuple(t2i._pad_rows(x, r, s, 1, 0) for x, (r, s) in zip(noise_init, rows))
    steps = tuple(jnp.pad(t2i._pad_rows(x, r, s, halves, 1), ((0, max_steps - x.shape[0]), (0, 0), (0, 0)))
                  for x, (r, s) in zip(step_noise, rows))
    return inits, steps


# ----------------------------------------------------------------------------------------------
# The sampler


def sample(model: UniPic, params, prompt_embeds_bld, prompt_mask_bl, *, settings: FastSettings, image_shape: Grid,
           num_iter: int, cfg: float = 3.0, cfg_schedule: str = "constant", temperature: float = 1.0,
           key: Optional[jax.Array] = None, draws: Optional[t2i.Draws] = None, x_con_bsd=None,
           buckets: t2i.Buckets = t2i.DEFAULT_BUCKETS, prompt_bucket: int = 64,
           on_step: Optional[Callable[[int, jax.Array], None]] = None) -> t2i.Sample:
    """`t2i.sample_t2i` with the fast methods of `settings` (reached through its `fast` argument).

    `num_iter` is the asked MAR step count (`settings.num_iter(num_iter)` run). `draws`, when
    given, must fit `plan(...)`: one entry per MAR step run, step k's per-step noise of
    (chain_steps_k, rows, C). Returns a `Sample` without captures.
    """
    length = prompt_embeds_bld.shape[1]
    embeds_bld, mask_bl = pad_prompt(jnp.asarray(prompt_embeds_bld), prompt_mask_bl,
                                     bucket_length(length, prompt_bucket))
    guided = cfg != 1.0
    rows = embeds_bld.shape[0]
    if guided and rows % 2:
        raise ValueError(f"cfg={cfg} needs rows [cond x B ; uncond x B]; got {rows} rows")
    batch = rows // 2 if guided else rows
    m, n = image_shape
    num_tokens = m * n
    steps_plan = plan(settings, num_tokens, num_iter, model.config.diffusion, guided)
    steps = [p.step for p in steps_plan]
    scales = cfg_scales(cfg, cfg_schedule, tuple(steps), num_tokens)
    token_dim = model.config.mar.token_dim
    if (key is None) == (draws is None):
        raise ValueError("pass exactly one of `key` and `draws`")
    if draws is None:  # a key, or one key per equal group of images (`t2i.draws_per_key`)
        draws = t2i.draws_per_key(key, batch, guided, lambda k, b: draws_from_key(
            k, batch=b, num_tokens=num_tokens, steps=steps_plan, token_dim=token_dim, guided=guided))
    chains = [int(np.shape(x)[0]) for x in draws.step_noise]
    if (len(draws.noise_init) != len(steps) or tuple(np.shape(draws.orders)) != (batch, num_tokens)
            or chains != [p.chain_steps for p in steps_plan]):
        raise ValueError(f"draws hold orders {tuple(np.shape(draws.orders))} and chains {chains}; this call needs "
                         f"({batch}, {num_tokens}) and {[p.chain_steps for p in steps_plan]}")
    if x_con_bsd is not None:
        x_con_bsd = jnp.broadcast_to(x_con_bsd, (rows,) + tuple(x_con_bsd.shape[1:]))

    _, cache = t2i._prefill(model, params, embeds_bld, mask_bl)
    tokens = jnp.zeros((rows, num_tokens, token_dim), model.dtype)
    orders = jnp.asarray(draws.orders, jnp.int32)
    temperature = np.float32(temperature)
    slots = buckets.slots(steps)
    max_steps = max(p.chain_steps for p in steps_plan)
    noise_init, step_noise = _pad_noise(tuple(draws.noise_init), tuple(draws.step_noise),
                                        tuple((batch * s.predicted, batch * p) for s, (_, p) in zip(steps, slots)),
                                        guided, max_steps)
    diff = None
    for p, scale, (visible_slots, predicted_slots) in zip(steps_plan, scales, slots):
        step = p.step
        counts = np.array([step.masked, step.mask_len], np.int32)
        if p.mode == "plain":
            plain = t2i._ConditionPlan(tuple(image_shape), visible_slots, predicted_slots, buckets.pads_visible,
                                       guided, False)
            z, _ = t2i._condition(model, plain, params, tokens, orders, cache, x_con_bsd, counts)
        else:
            cond_plan = _CondPlan(tuple(image_shape), visible_slots, predicted_slots, buckets.pads_visible, p.mode)
            z, diff = _condition(model, cond_plan, params, tokens, orders, cache, x_con_bsd, diff, counts)
        tables = _tables_for(model.config.diffusion, settings, p.chain_steps, max_steps)
        tokens = _predict(model, _ChainPlan(predicted_slots, guided), params, tables, np.int32(p.chain_steps),
                          tokens, z, orders, counts, noise_init[step.index], step_noise[step.index],
                          np.float32(scale), temperature)
        if on_step is not None:
            on_step(step.index, tokens)
    images, tokens = t2i._decode(model, params, tokens, batch, tuple(image_shape))
    return t2i.Sample(images=images, tokens=tokens, orders=orders)


# ----------------------------------------------------------------------------------------------
# Cost


def _flops(lowered) -> float:
    cost = lowered.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    return float(cost.get("flops", 0.0))


def flops_per_image(model: UniPic, params, *, batch: int, prompt_len: int, image_shape: Grid, num_iter: int,
                    cfg: float = 3.0, fast=None, buckets: t2i.Buckets = t2i.DEFAULT_BUCKETS,
                    prompt_bucket: int = 64) -> dict[str, float]:
    """FLOPs of one call per image, from XLA's cost analysis of the programs the call runs.

    Every program a step runs is lowered (not compiled) on abstract inputs and its
    `cost_analysis()["flops"]` summed over the steps; `params` may be `jax.ShapeDtypeStruct`s, so
    nothing is allocated. The diffusion loops are lowered unrolled (XLA counts a loop body once),
    the same arithmetic as the programs run. Prompt embedding and the random draws are left out.
    Returns {"prefill", "condition", "diffusion", "decode", "total"}, each per image.
    """
    settings = resolve(fast)
    guided = cfg != 1.0
    rows = 2 * batch if guided else batch
    length = bucket_length(prompt_len, prompt_bucket)
    num_tokens = image_shape[0] * image_shape[1]
    config = model.config
    dtype = model.dtype
    sds = jax.ShapeDtypeStruct
    embeds = sds((rows, length, config.projectors.llm_dim), dtype)
    mask = sds((rows, length), jnp.bool_)
    _, cache = jax.eval_shape(functools.partial(t2i._prefill, model), params, embeds, mask)
    tokens = sds((rows, num_tokens, config.mar.token_dim), dtype)
    orders = sds((batch, num_tokens), jnp.int32)
    counts = sds((2,), jnp.int32)
    scalar = sds((), jnp.float32)
    out = dict(prefill=_flops(t2i._prefill.lower(model, params, embeds, mask)), condition=0.0, diffusion=0.0)
    memo: dict = {}

    def once(key, make):
        if key not in memo:
            memo[key] = _flops(make())
        return memo[key]

    if settings is None:
        steps = mask_schedule(num_tokens, num_iter)
        chain = diffusion.sampling_schedule(config.diffusion).tables()
        plans = [(s, "plain", chain.num_steps) for s in steps]
    else:
        plans = [(p.step, p.mode, p.chain_steps) for p in plan(settings, num_tokens, num_iter, config.diffusion, guided)]
    slots = buckets.slots([s for s, _, _ in plans])
    diff = sds((batch, config.buffer_size + num_tokens, config.mar.decoder_dim), dtype)
    for (step, mode, chain_steps), (visible_slots, predicted_slots) in zip(plans, slots):
        if mode == "plain":
            cplan = t2i._ConditionPlan(tuple(image_shape), visible_slots, predicted_slots, buckets.pads_visible,
                                       guided, False)
            make = lambda: t2i._condition.lower(model, cplan, params, tokens, orders, cache, None, counts)
        else:
            cplan = _CondPlan(tuple(image_shape), visible_slots, predicted_slots, buckets.pads_visible, mode)
            make = lambda: _condition.lower(model, cplan, params, tokens, orders, cache, None,
                                            diff if mode == "lazy" else None, counts)
        out["condition"] += once(("c", cplan), make)
        z = sds(((2 if guided else 1) * batch * predicted_slots, config.mar.decoder_dim), dtype)
        init = sds((batch * predicted_slots, config.mar.token_dim), jnp.float32)
        if settings is None:
            pplan = t2i._PredictPlan(predicted_slots, guided, False, unroll=True)
            noise = sds((chain_steps, rows * predicted_slots, config.mar.token_dim), jnp.float32)
            tables = diffusion.sampling_schedule(config.diffusion).tables()
            make = lambda: t2i._predict.lower(model, pplan, params, tables, tokens, z, orders, counts, init, noise,
                                              scalar, scalar)
            out["diffusion"] += once(("p", pplan), make)
        else:
            pplan = _ChainPlan(predicted_slots, guided, static_steps=chain_steps)
            noise = sds((chain_steps, rows * predicted_slots, config.mar.token_dim), jnp.float32)
            tables = _tables_for(config.diffusion, settings, chain_steps, chain_steps)
            make = lambda: _predict.lower(model, pplan, params, tables, sds((), jnp.int32), tokens, z, orders,
                                          counts, init, noise, scalar, scalar)
            out["diffusion"] += once(("f", pplan), make)
    out["decode"] = _flops(t2i._decode.lower(model, params, tokens, batch, tuple(image_shape)))
    out = {k: v / batch for k, v in out.items()}
    out["total"] = sum(out.values())
    return out
