"""Text-to-image and image editing: `SkyworkUnipic.sample` (spec §8.3, §9) with static shapes.

One call:
  * prefill the right-padded prompt rows `[cond x B ; uncond x B]` (only cond rows when cfg == 1)
    into a KV cache (positions 0..L-1; the cache then admits only the valid prompt slots);
  * `num_iter` MAR steps. Step k keeps `masked_k` tokens unknown: the encoder sees the visible
    tokens `sort(order[:, masked_k:])`, the diffusion head predicts `sort(order[:, mask_len_k:
    masked_k])` (`sampling/schedule.py` gives these counts; they depend only on the grid and
    num_iter). Uncond rows reuse the cond rows' orders and, after each step, their tokens;
  * VAE-decode the cond rows only (the reference also decodes the uncond rows and drops them).

Work the reference does and this sampler skips, each giving the same numbers: the MAR encoder runs
on the cond rows only (the uncond rows have the same tokens and positions); the MAR decoder's last
block computes outputs for the predicted tokens only (every token is still a key); the diffusion
head embeds the condition once per MAR step and the timestep once per diffusion step instead of per
row and step, and computes the adaLN modulations of up to 512 rows x steps in one product
(`diffusion.sample`); the uncond VAE decode is dropped.

Each step runs two jitted programs: `_condition` (MAR encoder -> LLM on the prompt cache ->
proj_out residual -> MAR decoder; keyed by the visible-slot count) and `_predict` (gather the
predicted rows in the reference order -- cond rows then uncond rows, each image's tokens
ascending -- diffusion sampling, scatter back; keyed by the predicted-slot count). Counts are
traced inputs. `Buckets` caps how many slot counts a call uses: steps share a padded slot count,
padding slots are masked out of the MAR encoder attention, sit after the buffer in the LLM
(causality hides them) and after the real rows in the diffusion batch, and are discarded; they
change the programs, not the result. A run compiles one program per distinct slot count, and a
second run of the same (grid, num_iter, batch, prompt bucket) compiles nothing.

Randomness (`Draws`): the generation orders (B rows) and, per step, the diffusion head's initial
noise and per-step noise in the reference's shapes and order, either replayed from a recording
(`prepare_draws_from_fixture`) or drawn from a `jax.random` key (`draws_from_key`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Callable, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from unipic_jax.models import diffusion
from unipic_jax.models.qwen2 import KVCache
from unipic_jax.models.unipic import UniPic, head_module
from unipic_jax.sampling.caption import prompt_embeddings
from unipic_jax.sampling.schedule import Step, cfg_scales, mask_schedule
from unipic_jax.sampling.text import bucket_length, pad_prompt

Grid = tuple[int, int]

# Times each jitted program was traced: tests use it to prove one compile per shape.
TRACES: collections.Counter = collections.Counter()


def _group(sizes: Sequence[int], runs: Optional[int]) -> dict[int, int]:
    """Slot size for each size: the distinct sizes, ascending, split into at most `runs` runs,
    each padded to its largest size, choosing the runs that minimise the total padding
    sum(slot - size) over `sizes` (dynamic programming; None = no padding)."""
    values = sorted(set(sizes))
    if runs is None or runs >= len(values):
        return {v: v for v in values}
    counts = np.cumsum([0] + [sizes.count(v) for v in values])  # prefix sums: O(1) waste
    totals = np.cumsum([0] + [sizes.count(v) * v for v in values])

    def waste(i: int, j: int) -> int:  # values[i..j] padded to values[j]
        return int(values[j] * (counts[j + 1] - counts[i]) - (totals[j + 1] - totals[i]))

    @functools.cache
    def best(j: int, runs_left: int) -> tuple[int, int]:
        """(least padding of values[0..j] in at most `runs_left` runs, start of the last run)."""
        options = [(waste(0, j), 0)]
        if runs_left > 1:
            options += [(best(i - 1, runs_left - 1)[0] + waste(i, j), i) for i in range(1, j + 1)]
        return min(options)

    slots, j = {}, len(values) - 1
    while j >= 0:
        i = best(j, runs)[1]
        slots.update({v: values[j] for v in values[i:j + 1]})
        j, runs = i - 1, runs - 1
    return slots


@dataclasses.dataclass(frozen=True)
class Buckets:
    """How many step programs one call may compile: at most `visible` MAR-encoder/LLM shapes and
    at most `predicted` diffusion shapes (None: one per distinct count, nothing padded).

    The slot sizes follow from (grid, num_iter) alone: the per-step counts are grouped into that
    many runs, each padded to its largest count, with the least total padding (`_group`).
    """

    visible: Optional[int] = None
    predicted: Optional[int] = None

    def slots(self, steps: Sequence[Step]) -> list[tuple[int, int]]:
        """(visible slots, predicted slots per image) of every step."""
        visible = _group([s.visible for s in steps], self.visible)
        predicted = _group([s.predicted for s in steps], self.predicted)
        return [(visible[s.visible], predicted[s.predicted]) for s in steps]

    @property
    def pads_visible(self) -> bool:
        return self.visible is not None


EXACT = Buckets(None, None)
DEFAULT_BUCKETS = Buckets(visible=6, predicted=6)


@flax.struct.dataclass
class Draws:
    """Every random input of one sampling call, in the reference's shapes.

    orders: (B, m*n) int, each row a permutation (the generation order of image b).
    noise_init[k]: (B*P_k, C), x_T of step k's diffusion chain (both halves when guided).
    step_noise[k]: (T, 2*B*P_k, C) guided, (T, B*P_k, C) otherwise: the per-step noise in draw
        order (spaced step T-1 first; the last draw is multiplied by 0).
    """

    orders: jax.Array
    noise_init: tuple
    step_noise: tuple


@flax.struct.dataclass
class Sample:
    """images (B, 16m, 16n, 3) not clamped; tokens (rows, m, n, C) the final tokens of every row
    (the reference's `tokens_final`); orders (B, m*n). With `capture`: prefix_hidden (rows, L, D)
    the prompt pass and steps, one dict per MAR step (see `sample_t2i`)."""

    images: jax.Array
    tokens: jax.Array
    orders: jax.Array
    prefix_hidden: Optional[jax.Array] = None
    steps: Optional[tuple] = None


@dataclasses.dataclass(frozen=True)
class _ConditionPlan:
    image_shape: Grid
    visible_slots: int
    predicted_slots: int
    padded: bool
    guided: bool
    capture: bool


@dataclasses.dataclass(frozen=True)
class _PredictPlan:
    predicted_slots: int
    guided: bool
    capture: bool
    unroll: bool = False  # the diffusion loop unrolled: the same numbers, for XLA's cost analysis


# ----------------------------------------------------------------------------------------------
# Static-shape selection from the generation orders


def _select(orders_bl, start, stop, slots: int):
    """(B, slots): the raster positions `order[:, start:stop]` ascending, then the sentinel m*n
    (padding) in the slots beyond `stop - start`. `start`/`stop` may be traced."""
    num_tokens = orders_bl.shape[1]
    rank = jnp.arange(num_tokens)
    chosen = (rank >= start) & (rank < stop)
    return jnp.sort(jnp.where(chosen, orders_bl, num_tokens), axis=1)[:, :slots].astype(jnp.int32)


def _row_index(batch: int, slots: int, count):
    """Row j of a (batch*slots)-row block -> (image, slot); rows j >= batch*count are padding
    (image index `batch`, out of range)."""
    j = jnp.arange(batch * slots)
    image, slot = j // count, j % count
    return jnp.where(j < batch * count, image, batch), slot


def _diffusion_rows(z_bpd, count):
    """Rows (B*slots, D) from each image's predicted-token conditions z_bpd (B, slots, D): image
    b's first `count` slots, image after image; padding rows after the B*count real ones hold
    copies of real rows."""
    b, slots = z_bpd.shape[:2]
    image, slot = _row_index(b, slots, count)
    return z_bpd[jnp.minimum(image, b - 1), slot]


def _scatter_rows(tokens_blc, predicted_bp, count, rows_nc):
    """Inverse of `_diffusion_rows`: write the real rows back at their predicted tokens, drop the
    padding rows."""
    b, slots = predicted_bp.shape
    image, slot = _row_index(b, slots, count)
    position = predicted_bp[jnp.minimum(image, b - 1), slot]
    return tokens_blc.at[image, position].set(rows_nc.astype(tokens_blc.dtype), mode="drop")


def _both_halves(x, guided: bool):
    return jnp.concatenate([x, x]) if guided else x


# ----------------------------------------------------------------------------------------------
# The jitted programs


@functools.partial(jax.jit, static_argnames=("model",))
def _prefill(model: UniPic, params, embeds_bld, mask_bl):
    TRACES["prefill"] += 1
    b, length, _ = embeds_bld.shape
    cache = KVCache.create(model.config.qwen2, b, length, model.dtype)
    return model.apply({"params": params}, cache, embeds_bld, mask_bl, method=UniPic.prefill)


@functools.partial(jax.jit, static_argnames=("model", "plan"))
def _condition(model: UniPic, plan: _ConditionPlan, params, tokens_blc, orders_bl, cache, x_con_bsd, counts):
    """MAR encoder + LLM + residual + MAR decoder for one step -> the diffusion head's conditions
    (rows * predicted_slots, decoder_dim): the predicted tokens' rows in the reference order, cond
    rows then uncond rows (`_diffusion_rows` per half). The decoder's last block runs for the
    predicted tokens only; with `plan.capture` the whole decoder runs a second time for `z_dec`, so
    the parity checks of `z_sel` still go through the fast path."""
    TRACES["condition"] += 1
    variables = {"params": params}
    batch, num_tokens = orders_bl.shape
    masked, mask_len = counts[0], counts[1]
    visible_bv = _both_halves(_select(orders_bl, masked, num_tokens, plan.visible_slots), plan.guided)
    predicted_bp = _both_halves(_select(orders_bl, mask_len, masked, plan.predicted_slots), plan.guided)
    x_enc, hidden = model.apply(variables, cache, tokens_blc, visible_bv, num_tokens - masked, plan.image_shape,
                                padded=plan.padded, halves=2 if plan.guided else 1, method=UniPic.mae_encoder_cached)
    z_bpd = model.apply(variables, x_enc, visible_bv, plan.image_shape, x_con_bsd, predicted_bp,
                        method=UniPic.mae_decoder)
    z_sel = jnp.concatenate([_diffusion_rows(z, masked - mask_len) for z in jnp.split(z_bpd, 2 if plan.guided else 1)])
    if not plan.capture:
        return z_sel, None
    z_bld = model.apply(variables, x_enc, visible_bv, plan.image_shape, x_con_bsd, method=UniPic.mae_decoder)
    mask_in = jnp.ones(visible_bv.shape[:1] + (num_tokens,), jnp.float32)
    mask_in = mask_in.at[jnp.arange(visible_bv.shape[0])[:, None], visible_bv].set(0.0, mode="drop")
    return z_sel, dict(x_enc=x_enc, llm_last_hidden_state=hidden, z_dec=z_bld, mask_in=mask_in)


@functools.partial(jax.jit, static_argnames=("model", "plan"))
def _predict(model: UniPic, plan: _PredictPlan, params, tables, tokens_blc, z_sel, orders_bl, counts,
             noise_init, step_noise, cfg, temperature):
    """Diffusion sampling of one step's predicted tokens (conditions `z_sel` from `_condition`)
    -> the new tokens of every row."""
    TRACES["predict"] += 1
    batch = orders_bl.shape[0]
    masked, mask_len = counts[0], counts[1]
    predicted_bp = _select(orders_bl, mask_len, masked, plan.predicted_slots)
    sampled = diffusion.sample(head_module(model), params["diffusion_head"], tables, z_sel, noise_init,
                               step_noise, temperature=temperature, cfg=cfg, guided=plan.guided, unroll=plan.unroll)
    cond_blc = _scatter_rows(tokens_blc[:batch], predicted_bp, masked - mask_len, sampled[: batch * plan.predicted_slots])
    tokens_blc = _both_halves(cond_blc, plan.guided)
    return tokens_blc, (dict(z_sel=z_sel, sampled=sampled) if plan.capture else None)


@functools.partial(jax.jit, static_argnames=("model", "batch", "image_shape"))
def _decode(model: UniPic, params, tokens_blc, batch: int, image_shape: Grid):
    TRACES["decode"] += 1
    tokens_bmnc = tokens_blc.reshape(tokens_blc.shape[0], *image_shape, tokens_blc.shape[-1])
    return model.apply({"params": params}, tokens_bmnc[:batch], method=UniPic.decode), tokens_bmnc


@functools.cache
def _tables(config: diffusion.DiffusionConfig) -> diffusion.DiffusionTables:
    return diffusion.sampling_schedule(config).tables()


# ----------------------------------------------------------------------------------------------
# Draws


@functools.partial(jax.jit, static_argnames=("batch", "num_tokens", "predicted", "token_dim",
                                             "num_diffusion_steps", "guided"))
def _draws_from_key(key, batch: int, num_tokens: int, predicted: tuple[int, ...], token_dim: int,
                    num_diffusion_steps: int, guided: bool) -> Draws:
    TRACES["draws"] += 1
    key_orders, key_noise = jax.random.split(key)
    orders = jax.vmap(lambda b: jax.random.permutation(jax.random.fold_in(key_orders, b), num_tokens))(
        jnp.arange(batch))
    inits, steps = [], []
    for k, count in enumerate(predicted):
        rows = batch * count * (2 if guided else 1)
        init, noise = diffusion.draw_sample_noise(jax.random.fold_in(key_noise, k), rows, token_dim,
                                                  num_diffusion_steps, guided=guided)
        inits.append(init)
        steps.append(noise)
    return Draws(orders=orders.astype(jnp.int32), noise_init=tuple(inits), step_noise=tuple(steps))


def draws_from_key(key: jax.Array, *, batch: int, num_tokens: int, steps: Sequence[Step], token_dim: int,
                   num_diffusion_steps: int, guided: bool) -> Draws:
    """Fresh `Draws` from a `jax.random` key (one compiled program per setting). Image b's order
    comes from `fold_in(key, b)`; step k's noise from `fold_in(key, k)` at the step's exact shape,
    so the draws (and the result) do not depend on `Buckets`."""
    return _draws_from_key(key, batch, num_tokens, tuple(s.predicted for s in steps), token_dim,
                           num_diffusion_steps, guided)


@functools.partial(jax.jit, static_argnames=("guided",))
def concat_draws(parts: tuple[Draws, ...], guided: bool) -> Draws:
    """One `Draws` for the images of `parts` side by side (part 0's images first): orders and
    initial noise stacked image after image, each step's per-step noise per half (cond rows of
    every part, then their uncond rows, when guided)."""
    TRACES["concat_draws"] += 1
    halves = 2 if guided else 1

    def rows(xs, axis):
        split = [jnp.split(x, halves, axis=axis) for x in xs]
        return jnp.concatenate([p[h] for h in range(halves) for p in split], axis=axis)

    return Draws(orders=jnp.concatenate([p.orders for p in parts]),
                 noise_init=tuple(jnp.concatenate(xs) for xs in zip(*(p.noise_init for p in parts))),
                 step_noise=tuple(rows(xs, 1) for xs in zip(*(p.step_noise for p in parts))))


def draws_per_key(key, batch: int, guided: bool, make: Callable[[jax.Array, int], Draws]) -> Draws:
    """`make(key, batch)` for one key. For a sequence of G keys, the batch is G equal groups of
    images, group g's draws being exactly those `make(key_g, batch // G)` gives a call of that
    group alone (so each group's images can be reproduced without the others); `concat_draws`
    puts them side by side. The groups share one draws program (one shape)."""
    if not isinstance(key, (list, tuple)):
        return make(key, batch)
    if not key or batch % len(key):
        raise ValueError(f"{len(key)} keys cannot split a batch of {batch} images into equal groups")
    if len(key) == 1:
        return make(key[0], batch)
    return concat_draws(tuple(make(k, batch // len(key)) for k in key), guided)


def prepare_draws_from_fixture(recorded: Sequence[np.ndarray], *, batch: int, steps: Sequence[Step],
                               num_diffusion_steps: int, guided: bool) -> Draws:
    """`Draws` from the reference's recorded draws, in draw order (the fixtures' `rng/*`).

    The recording holds `rows` order shuffles (2*batch when guided: only the first `batch` are
    used, the uncond rows reuse them), then per MAR step one initial-noise draw and
    `num_diffusion_steps` per-step draws. Raises ValueError when the recording does not fit.
    """
    rows = 2 * batch if guided else batch
    per_step = 1 + num_diffusion_steps
    want = rows + per_step * len(steps)
    if len(recorded) != want:
        raise ValueError(f"{len(recorded)} recorded draws; {batch} image(s), guided={guided}, {len(steps)} "
                         f"steps of {num_diffusion_steps} diffusion steps need {want}")
    num_tokens = steps[0].masked
    orders = np.stack([np.asarray(r) for r in recorded[:batch]])
    if orders.shape != (batch, num_tokens) or not np.all(np.sort(orders, axis=1) == np.arange(num_tokens)):
        raise ValueError(f"the first {batch} draws are not permutations of {num_tokens} tokens")
    inits, noises = [], []
    for k, step in enumerate(steps):
        start = rows + k * per_step
        init, noise = np.asarray(recorded[start]), np.stack(recorded[start + 1: start + per_step])
        half = batch * step.predicted
        if init.shape[0] != half or noise.shape[1] != (2 * half if guided else half):
            raise ValueError(f"step {k}: draws of shapes {init.shape}, {noise.shape[1:]} do not fit "
                             f"{step.predicted} predicted token(s) per image")
        inits.append(init.astype(np.float32))
        noises.append(noise.astype(np.float32))
    return Draws(orders=orders.astype(np.int32), noise_init=tuple(inits), step_noise=tuple(noises))


def _pad_rows(x, real: int, slots: int, halves: int, axis: int):
    """Pad each of `halves` consecutive blocks of `real` rows (along `axis`) to `slots` rows."""
    if real == slots:
        return x
    parts = jnp.split(x, halves, axis=axis)
    pad = [(0, 0)] * parts[0].ndim
    pad[axis] = (0, slots - real)
    return jnp.concatenate([jnp.pad(p, pad) for p in parts], axis=axis)


@functools.partial(jax.jit, static_argnames=("rows", "guided"))
def _pad_noise(noise_init, step_noise, rows: tuple[tuple[int, int], ...], guided: bool):
    """Every step's noise padded from its real rows to its slot rows, `rows[k]` = (real, slots)
    per half: one program per call setting instead of a few eager ops per step."""
    TRACES["pad_noise"] += 1
    halves = 2 if guided else 1
    return (tuple(_pad_rows(x, r, s, 1, 0) for x, (r, s) in zip(noise_init, rows)),
            tuple(_pad_rows(x, r, s, halves, 1) for x, (r, s) in zip(step_noise, rows)))


# ----------------------------------------------------------------------------------------------
# Public entry points


def sample_t2i(model: UniPic, params, prompt_embeds_bld, prompt_mask_bl, *, image_shape: Grid, num_iter: int,
               cfg: float = 3.0, cfg_schedule: str = "constant", temperature: float = 1.0,
               key: Optional[jax.Array] = None, draws: Optional[Draws] = None, x_con_bsd=None,
               buckets: Buckets = DEFAULT_BUCKETS, prompt_bucket: int = 64, capture: bool = False,
               on_step: Optional[Callable[[int, jax.Array], None]] = None, fast=None,
               prompt_cache: Optional[KVCache] = None) -> Sample:
    """`SkyworkUnipic.sample` on prompt embeddings (the shared sampler of T2I and editing).

    prompt_embeds_bld (rows, L, D), prompt_mask_bl (rows, L) 1 = valid, right padded; rows are
    `[cond x B ; uncond x B]` when cfg != 1, else the B cond rows. `x_con_bsd` (rows or 1,
    buffer + m*n, mar_dim): the source-image MAR encoding for editing (None: mask tokens).
    Exactly one of `key` / `draws`; `key` may be a sequence of G keys splitting the B images into G
    equal groups, each drawn as a call of that group alone would draw it (`draws_per_key`).
    `buckets` sets the per-step padding (`EXACT`: none); `prompt_bucket` the multiple the prompt
    is padded to. With `capture`, the `Sample` also holds the prompt pass and, per step,
    `tokens_in` (rows, m, n, C), `mask_in` (rows, m*n, 1 = masked), `llm_last_hidden_state` (rows, V + buffer, D) in LLM order, `x_enc` (rows, buffer + V, mar_dim)
    after the residual, `z_dec` (rows, m*n, decoder_dim), `z_sel` / `sampled` (the diffusion rows,
    cond then uncond); the normal path computes none of these. `on_step(index, tokens)` is called
    after each MAR step with the (rows, m*n, C) tokens (a progress hook; it may block on them).

    `fast` (None / False: this faithful sampler) selects the fast sampler (`sampling/fast.py`):
    True for its `FAST` preset, or a `fast.FastSettings`; it does less work than the reference
    and so gives other images.

    `prompt_cache` (a `KVCache` of `rows` rows, e.g. a conversation's history and this turn
    appended by `text.extend`) replaces the prompt pass: pass None for the embeddings and mask.
    The image tokens then follow each row's valid cached slots, as after a one-shot prefill of
    the same tokens.
    """
    if prompt_cache is not None and (prompt_embeds_bld is not None or capture or fast not in (None, False)):
        raise ValueError("prompt_cache replaces the prompt embeddings; it works without capture and fast")
    if fast is not None and fast is not False:
        from unipic_jax.sampling import fast as fast_sampler

        if capture:
            raise ValueError("capture records the faithful sampler's steps; it cannot be used with `fast`")
        return fast_sampler.sample(model, params, prompt_embeds_bld, prompt_mask_bl,
                                   settings=fast_sampler.resolve(fast), image_shape=image_shape, num_iter=num_iter,
                                   cfg=cfg, cfg_schedule=cfg_schedule, temperature=temperature, key=key,
                                   draws=draws, x_con_bsd=x_con_bsd, buckets=buckets, prompt_bucket=prompt_bucket,
                                   on_step=on_step)
    if prompt_cache is None:
        length = prompt_embeds_bld.shape[1]
        embeds_bld, mask_bl = pad_prompt(jnp.asarray(prompt_embeds_bld), prompt_mask_bl,
                                         bucket_length(length, prompt_bucket))
        rows = embeds_bld.shape[0]
    else:
        rows = prompt_cache.valid.shape[0]
    guided = cfg != 1.0
    if guided and rows % 2:
        raise ValueError(f"cfg={cfg} needs rows [cond x B ; uncond x B]; got {rows} rows")
    batch = rows // 2 if guided else rows
    m, n = image_shape
    num_tokens = m * n
    steps = mask_schedule(num_tokens, num_iter)
    scales = cfg_scales(cfg, cfg_schedule, steps, num_tokens)
    tables = _tables(model.config.diffusion)
    token_dim = model.config.mar.token_dim
    if (key is None) == (draws is None):
        raise ValueError("pass exactly one of `key` and `draws`")
    if draws is None:
        draws = draws_per_key(key, batch, guided, lambda k, b: draws_from_key(
            k, batch=b, num_tokens=num_tokens, steps=steps, token_dim=token_dim,
            num_diffusion_steps=tables.num_steps, guided=guided))
    if len(draws.noise_init) != len(steps) or tuple(np.shape(draws.orders)) != (batch, num_tokens):
        raise ValueError(f"draws hold orders {tuple(np.shape(draws.orders))} and {len(draws.noise_init)} steps; "
                         f"this call needs ({batch}, {num_tokens}) and {len(steps)}")
    if x_con_bsd is not None:
        x_con_bsd = jnp.broadcast_to(x_con_bsd, (rows,) + tuple(x_con_bsd.shape[1:]))

    if prompt_cache is None:
        prefix_hidden, cache = _prefill(model, params, embeds_bld, mask_bl)
    else:
        prefix_hidden, cache = None, prompt_cache
    tokens = jnp.zeros((rows, num_tokens, token_dim), model.dtype)  # sampled rows are rounded when written
    orders = jnp.asarray(draws.orders, jnp.int32)
    temperature = np.float32(temperature)
    records = []
    slots = buckets.slots(steps)
    noise_init, step_noise = _pad_noise(tuple(draws.noise_init), tuple(draws.step_noise),
                                        tuple((batch * s.predicted, batch * p) for s, (_, p) in zip(steps, slots)), guided)
    for step, scale, (visible_slots, predicted_slots) in zip(steps, scales, slots):
        counts = np.array([step.masked, step.mask_len], np.int32)
        condition = _ConditionPlan(tuple(image_shape), visible_slots, predicted_slots, buckets.pads_visible, guided,
                                   capture)
        z, seen = _condition(model, condition, params, tokens, orders, cache, x_con_bsd, counts)
        new_tokens, sampled = _predict(model, _PredictPlan(predicted_slots, guided, capture), params, tables,
                                       tokens, z, orders, counts, noise_init[step.index], step_noise[step.index],
                                       np.float32(scale), temperature)
        if capture:
            records.append(_unpad_step(step, tokens, seen, sampled, batch, predicted_slots, guided,
                                       model.config.buffer_size, image_shape))
        tokens = new_tokens
        if on_step is not None:
            on_step(step.index, tokens)
    images, tokens = _decode(model, params, tokens, batch, tuple(image_shape))
    return Sample(images=images, tokens=tokens, orders=orders,
                  prefix_hidden=prefix_hidden[:, :length] if capture else None,
                  steps=tuple(records) if capture else None)


def _unpad_step(step: Step, tokens_in, seen: dict, sampled: dict, batch: int, predicted_slots: int, guided: bool,
                buffer: int, image_shape: Grid) -> dict:
    """One step's captures without padding slots (the reference's shapes)."""
    kept = buffer + step.visible
    real, slots = batch * step.predicted, batch * predicted_slots
    diffusion_rows = lambda x: jnp.concatenate([x[:real], x[slots: slots + real]]) if guided else x[:real]
    return dict(
        tokens_in=tokens_in.reshape(tokens_in.shape[0], *image_shape, -1),
        mask_in=seen["mask_in"],
        llm_last_hidden_state=seen["llm_last_hidden_state"][:, :kept],
        x_enc=seen["x_enc"][:, :kept],
        z_dec=seen["z_dec"],
        z_sel=diffusion_rows(sampled["z_sel"]),
        sampled=diffusion_rows(sampled["sampled"]),
    )


def _trim_prompt(out: Sample, length: int) -> Sample:
    """Drop the bucket padding from a captured prompt pass (the ids were padded before embedding)."""
    return out if out.prefix_hidden is None else out.replace(prefix_hidden=out.prefix_hidden[:, :length])


@functools.partial(jax.jit, static_argnames=("model",))
def _embed(model: UniPic, params, ids_bl):
    return model.apply({"params": params}, ids_bl, method=UniPic.embed)


def _pad_ids(ids_bl, mask_bl, bucket: int, pad_id: int):
    ids_bl, mask_bl = np.asarray(ids_bl), np.asarray(mask_bl, bool)
    extra = bucket_length(ids_bl.shape[1], bucket) - ids_bl.shape[1]
    return (np.pad(ids_bl, ((0, 0), (0, extra)), constant_values=pad_id).astype(np.int32),
            np.pad(mask_bl, ((0, 0), (0, extra))))


def text_to_image(model: UniPic, params, input_ids, attention_mask, *, prompt_bucket: int = 64, **kwargs) -> Sample:
    """`sample_t2i` on token ids (rows, L) right padded, with their mask (1 = valid). The ids are
    padded to the prompt bucket with the EOS id (as the reference pads) before embedding."""
    ids, mask = _pad_ids(input_ids, attention_mask, prompt_bucket, model.config.tokens.eos)
    out = sample_t2i(model, params, _embed(model, params, ids), mask, prompt_bucket=prompt_bucket, **kwargs)
    return _trim_prompt(out, np.shape(input_ids)[1])


@functools.partial(jax.jit, static_argnames=("model",))
def _source_features(model: UniPic, params, source_bhwc):
    variables = {"params": params}
    tokens = model.apply(variables, source_bhwc, method=UniPic.encode)
    x_con, z_src = model.apply(variables, tokens, method=UniPic.extract_visual_feature)
    return tokens, x_con, z_src


@flax.struct.dataclass
class EditInputs:
    """What editing feeds the sampler: source tokens (1 or B, m, n, C), x_con (rows, buffer + m*n,
    mar_dim), z_src (1 or B, m*n + buffer, D) in LLM order, prompt embeddings with z_src spliced
    in (rows, L', D) and their mask (rows, L'), L' the bucketed prompt length."""

    source_tokens: jax.Array
    x_con: jax.Array
    z_src: jax.Array
    embeds: jax.Array
    mask: jax.Array


def prepare_edit(model: UniPic, params, source_bhwc, input_ids, attention_mask, *, cfg: float,
                 prompt_bucket: int = 64) -> EditInputs:
    """Spec §9 steps 3-6: encode the source (1 image, or B for B rows per prompt), extract its MAR
    features and splice them at the `<image>` ids of every row (each row must hold m*n + buffer
    of them); x_con is repeated for every row."""
    rows = np.shape(input_ids)[0]
    guided = cfg != 1.0
    tokens, x_con, z_src = _source_features(model, params, jnp.asarray(source_bhwc))
    sources = tokens.shape[0]
    batch = rows // 2 if guided else rows
    if sources not in (1, batch):
        raise ValueError(f"{sources} source images for {batch} image(s) per prompt; pass 1 or {batch}")
    ids, mask = _pad_ids(input_ids, attention_mask, prompt_bucket, model.config.tokens.eos)
    if not np.all(np.sum(ids == model.config.tokens.image, axis=1) == z_src.shape[1]):
        raise ValueError(f"every prompt row must hold {z_src.shape[1]} <image> ids (m*n + buffer)")
    if sources > 1:  # row r of each half edits source r
        x_con, z_per_row = _both_halves(x_con, guided), _both_halves(z_src, guided)
    else:
        z_per_row = z_src
    return EditInputs(source_tokens=tokens, x_con=jnp.broadcast_to(x_con, (rows,) + x_con.shape[1:]), z_src=z_src,
                      embeds=prompt_embeddings(model, params, ids, z_per_row), mask=jnp.asarray(mask))


def edit(model: UniPic, params, source_bhwc, input_ids, attention_mask, *, num_iter: int, cfg: float = 3.0,
         prompt_bucket: int = 64, **kwargs) -> Sample:
    """Image editing (scripts/image_edit.py): `prepare_edit`, then `sample_t2i` with x_con at the
    source's latent grid. `source_bhwc` (1 or B, 16m, 16n, 3) in [-1, 1]; `input_ids` rows as in
    `sample_t2i`, each holding m*n + buffer `<image>` ids. Other arguments as `sample_t2i`."""
    inputs = prepare_edit(model, params, source_bhwc, input_ids, attention_mask, cfg=cfg, prompt_bucket=prompt_bucket)
    image_shape = tuple(inputs.source_tokens.shape[1:3])
    out = sample_t2i(model, params, inputs.embeds, inputs.mask, image_shape=image_shape, num_iter=num_iter,
                     cfg=cfg, x_con_bsd=inputs.x_con, prompt_bucket=prompt_bucket, **kwargs)
    return _trim_prompt(out, np.shape(input_ids)[1])
