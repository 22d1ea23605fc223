"""Text generation with the Qwen2 decoder: one jitted `lax.while_loop` over a static KV cache.

Image-to-text (reference-spec §10) splices image features into the prompt embeddings, so the loop
takes embeddings plus a key-validity mask, not token ids. The prompt is prefilled once; each step
chooses a token from the last logits, appends it with `Qwen2.decode` and stops when every row has
emitted `eos_id` (later slots hold `pad_id`) or after `max_new_tokens`.

Token choice follows Hugging Face `generate`: repetition penalty over the generated tokens
(the prompt is embeddings, so it has no ids to penalise), then greedy argmax, or sampling with
temperature -> top-k -> top-p from a `jax.random` key (one `fold_in(key, step)` per step, so a
key reproduces its ids). A prompt of any length up to a bucket shares one compiled loop:
`generate` right-pads it to `bucket_length(L, bucket)` and masks the padding, which leaves the
result unchanged (new tokens take positions after the valid ones, as in the reference).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from unipic_jax.models.qwen2 import KVCache, Qwen2, positions_from_mask

# Times each jitted loop was traced: tests use it to prove one compile per shape and setting.
TRACES: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class _Settings:
    """Everything static about one generation call (a change compiles a new loop)."""

    max_new_tokens: int
    eos_id: int
    pad_id: int
    sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    return_logits: bool
    stream: bool = False  # hand each step's tokens to the host as they are chosen (`on_token`)


@flax.struct.dataclass
class Generation:
    """`ids` (B, N) int32, `pad_id` after a row's EOS; `lengths` (B,) tokens up to and including
    EOS (N without one); `logits` (B, N, V) float32 raw logits each token was chosen from (before
    any penalty or warping; zeros for steps after every row stopped), or None."""

    ids: jax.Array
    lengths: jax.Array
    logits: jax.Array | None = None


def bucket_length(length: int, multiple: int = 128) -> int:
    """The prompt length a loop is compiled for: `length` rounded up to a multiple of `multiple`."""
    if length < 1 or multiple < 1:
        raise ValueError(f"need length >= 1 and multiple >= 1, got {length}, {multiple}")
    return -(-length // multiple) * multiple


def pad_prompt(embeds_bld: jax.Array, mask_bl: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
    """Right-pad prompt embeddings (zeros) and their mask (False) to `length` tokens."""
    extra = length - embeds_bld.shape[1]
    if extra < 0:
        raise ValueError(f"prompt of {embeds_bld.shape[1]} tokens is longer than {length}")
    embeds_bld = jnp.pad(embeds_bld, ((0, 0), (0, extra), (0, 0)))
    return embeds_bld, jnp.pad(jnp.asarray(mask_bl, bool), ((0, 0), (0, extra)))


def _penalise(logits_bv, seen_bv, penalty: float):
    """HF repetition penalty: seen tokens' logits divided by `penalty` if positive, else times it."""
    penalised = jnp.where(logits_bv < 0, logits_bv * penalty, logits_bv / penalty)
    return jnp.where(seen_bv, penalised, logits_bv)


def _warp(scores_bv, s: _Settings):
    """Temperature, then top-k, then top-p (nucleus), each removing tokens with -inf."""
    scores_bv = scores_bv / s.temperature
    if s.top_k:
        kth_b1 = jax.lax.top_k(scores_bv, min(s.top_k, scores_bv.shape[-1]))[0][:, -1:]
        scores_bv = jnp.where(scores_bv < kth_b1, -jnp.inf, scores_bv)
    if s.top_p < 1.0:
        # Ascending order: the tokens whose cumulative probability stays <= 1 - top_p form a prefix
        # (the most likely token is always kept); everything below the first kept value goes.
        sorted_bv = jnp.sort(scores_bv, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_bv, axis=-1), axis=-1)
        removed = (cumulative <= 1.0 - s.top_p).at[:, -1].set(False)
        cut_b1 = jnp.take_along_axis(sorted_bv, jnp.sum(removed, axis=-1, keepdims=True), axis=-1)
        scores_bv = jnp.where(scores_bv < cut_b1, -jnp.inf, scores_bv)
    return scores_bv


def _loop(model: Qwen2, s: _Settings, variables, cache: KVCache, first_logits_bv, rng, forced_ids_bn):
    """Choose, append and repeat from the logits after a prompt -> (Generation, final cache)."""
    b, n, vocab = first_logits_bv.shape[0], s.max_new_tokens, model.config.vocab_size
    state = dict(
        step=jnp.zeros((), jnp.int32), cache=cache, logits=first_logits_bv,
        ids=jnp.full((b, n), s.pad_id, jnp.int32), lengths=jnp.zeros((b,), jnp.int32),
        done=jnp.zeros((b,), bool),
        seen=jnp.zeros((b, vocab), bool) if s.repetition_penalty != 1.0 else None,
        record=jnp.zeros((b, n, vocab), jnp.float32) if s.return_logits else None,
    )

    def keep_going(st):
        return (st["step"] < n) & ~jnp.all(st["done"])

    def step(st):
        t, raw = st["step"], st["logits"]
        scores = raw if st["seen"] is None else _penalise(raw, st["seen"], s.repetition_penalty)
        if forced_ids_bn is not None:
            token = jax.lax.dynamic_index_in_dim(forced_ids_bn, t, axis=1, keepdims=False)
        elif s.sample:
            token = jax.random.categorical(jax.random.fold_in(rng, t), _warp(scores, s), axis=-1)
        else:
            token = jnp.argmax(scores, axis=-1)
        token = jnp.where(st["done"], s.pad_id, token.astype(jnp.int32))
        new = dict(st)
        new["ids"] = jax.lax.dynamic_update_index_in_dim(st["ids"], token, t, axis=1)
        new["lengths"] = st["lengths"] + (~st["done"]).astype(jnp.int32)
        new["done"] = st["done"] | (token == s.eos_id)
        if s.stream:  # the tokens leave the device as they are chosen; nothing else changes
            jax.debug.callback(_emit, t, token, st["done"])
        if st["seen"] is not None:
            new["seen"] = st["seen"].at[jnp.arange(b), token].set(True)
        if st["record"] is not None:
            new["record"] = jax.lax.dynamic_update_index_in_dim(st["record"], raw, t, axis=1)
        x_b1d = model.apply(variables, token[:, None], method=Qwen2.embed)
        out, new["cache"] = model.apply(variables, st["cache"], x_b1d, st["cache"].next_positions(1),
                                        return_logits=True, method=Qwen2.decode)
        new["logits"] = out.logits[:, 0]
        new["step"] = t + 1
        return new

    final = jax.lax.while_loop(keep_going, step, state)
    return Generation(ids=final["ids"], lengths=final["lengths"], logits=final["record"]), final["cache"]


def _last_logits(model: Qwen2, variables, hidden_btd, mask_bt):
    """Logits (B, V) at each row's last valid token."""
    last_b = jnp.max(jnp.where(mask_bt, jnp.arange(mask_bt.shape[1]), 0), axis=-1)
    h_last = jnp.take_along_axis(hidden_btd, last_b[:, None, None], axis=1)
    return model.apply(variables, h_last, method=Qwen2.logits)[:, 0]


@functools.partial(jax.jit, static_argnames=("model", "s"))
def _generate(model: Qwen2, s: _Settings, params, embeds_bld, mask_bl, rng, forced_ids_bn) -> Generation:
    TRACES["generate"] += 1
    variables = {"params": params}
    b, length, _ = embeds_bld.shape
    cache = KVCache.create(model.config, b, length + s.max_new_tokens, model.dtype)
    prompt, cache = model.apply(variables, cache, embeds_bld, positions_from_mask(mask_bl), mask_bl,
                                method=Qwen2.prefill)
    first = _last_logits(model, variables, prompt.last_hidden_state, mask_bl)
    return _loop(model, s, variables, cache, first, rng, forced_ids_bn)[0]


@functools.partial(jax.jit, static_argnames=("model",))
def _extend(model: Qwen2, params, cache: KVCache, embeds_bld, mask_bl):
    TRACES["extend"] += 1
    out, cache = model.apply({"params": params}, cache, embeds_bld, cache.next_positions(embeds_bld.shape[1]),
                             mask_bl, method=Qwen2.decode)
    return out.last_hidden_state, cache


def extend(model: Qwen2, params, cache: KVCache, embeds_bld, mask_bl) -> tuple[jax.Array, KVCache]:
    """Append new tokens (B, l, D), right padded with mask (B, l) 1 = valid, after a cache: only the
    new tokens are computed (each attends to the cache's valid slots and to the new valid tokens
    before it); they take the positions after each row's valid slots, and their valid ones join
    the cache. Returns (last hidden state (B, l, D), the cache). One compile per shape."""
    if cache.max_len - int(cache.length) < embeds_bld.shape[1]:
        raise ValueError(f"{embeds_bld.shape[1]} new tokens do not fit the cache's "
                         f"{cache.max_len - int(cache.length)} free slots")
    return _extend(model, params, cache, jnp.asarray(embeds_bld), jnp.asarray(mask_bl, bool))


@functools.partial(jax.jit, static_argnames=("model", "s"))
def _generate_after(model: Qwen2, s: _Settings, params, cache: KVCache, embeds_bld, mask_bl, rng):
    TRACES["generate_after"] += 1
    variables = {"params": params}
    out, cache = model.apply(variables, cache, embeds_bld, cache.next_positions(embeds_bld.shape[1]), mask_bl,
                             method=Qwen2.decode)
    first = _last_logits(model, variables, out.last_hidden_state, mask_bl)
    return _loop(model, s, variables, cache, first, rng, None)


def generate(model: Qwen2, params, prompt_embeds_bld: jax.Array, prompt_mask_bl: jax.Array | None = None, *,
             max_new_tokens: int, eos_id: int, pad_id: int, rng: jax.Array | None = None,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, forced_ids: jax.Array | None = None,
             return_logits: bool = False, bucket: int = 128, on_token=None) -> Generation:
    """Generate up to `max_new_tokens` tokens after prompt embeddings (B, L, D).

    `params`: the Qwen2 param tree. `prompt_mask_bl` (B, L), 1 = valid (None: all valid); padding
    may sit anywhere but the positions follow the reference rule (cumsum of the mask). Greedy
    without `rng`; with a key, sampled with `temperature`, `top_k` (0 = off) and `top_p` (1 = off).
    `repetition_penalty` (1 = off; Qwen2.5's generation_config uses 1.1) applies in both modes.
    `forced_ids` (B, N) teacher-forces the tokens (the logits are still those of the model), for
    parity against stored generations. One compile per (B, bucketed L, settings).

    `on_token(step, tokens_b, done_b)` (numpy arrays), when given, is called from the runtime as
    each step's tokens are chosen (`done_b`: the rows that had already stopped, whose token is
    `pad_id`); the loop is the same program but for that hand-off (its own compile), so the ids
    equal those of a call without it. One streaming call at a time runs (a lock).
    """
    settings = _settings(max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id, sample=rng is not None,
                         temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                         return_logits=return_logits)
    if on_token is not None:
        settings = dataclasses.replace(settings, stream=True)
    if forced_ids is not None and tuple(forced_ids.shape) != (prompt_embeds_bld.shape[0], max_new_tokens):
        raise ValueError(f"forced_ids has shape {tuple(forced_ids.shape)}, want (batch, max_new_tokens)")
    b, length, _ = prompt_embeds_bld.shape
    mask = jnp.ones((b, length), bool) if prompt_mask_bl is None else prompt_mask_bl
    embeds, mask = pad_prompt(jnp.asarray(prompt_embeds_bld), mask, bucket_length(length, bucket))
    forced = None if forced_ids is None else jnp.asarray(forced_ids, jnp.int32)
    if on_token is None:
        return _generate(model, settings, params, embeds, mask, rng, forced)
    with _STREAM_LOCK:
        _STREAM_SINK[0] = on_token
        try:
            return jax.block_until_ready(_generate(model, settings, params, embeds, mask, rng, forced))
        finally:
            jax.effects_barrier()  # every callback has run before the sink goes
            _STREAM_SINK[0] = None


# The receiver of a streaming loop's tokens: one at a time (the compiled loop calls `_emit`, a
# fixed function, so that every streaming call reuses it).
_STREAM_LOCK = threading.Lock()
_STREAM_SINK: list = [None]


def _emit(step, tokens_b, done_b) -> None:
    sink = _STREAM_SINK[0]
    if sink is not None:
        sink(int(step), np.asarray(tokens_b), np.asarray(done_b))


def generate_after(model: Qwen2, params, cache: KVCache, prompt_embeds_bld: jax.Array, prompt_mask_bl: jax.Array, *,
                   max_new_tokens: int, eos_id: int, pad_id: int, rng: jax.Array | None = None,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   repetition_penalty: float = 1.0) -> tuple[Generation, KVCache]:
    """`generate` continuing a conversation: the prompt (B, l, D), right padded with its mask, is
    appended after the valid slots of `cache` (as `extend`), then tokens are generated as
    `generate` does. Returns the generation and the cache holding the prompt and every generated
    token (for the next turn). The cache needs `l + max_new_tokens` free slots. Equals `generate`
    on the whole history at once (positions follow the valid slots; padded slots stay hidden).
    """
    settings = _settings(max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id, sample=rng is not None,
                         temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                         return_logits=False)
    free = cache.max_len - int(cache.length)
    if free < prompt_embeds_bld.shape[1] + max_new_tokens:
        raise ValueError(f"{prompt_embeds_bld.shape[1]} prompt and {max_new_tokens} new tokens do not fit the "
                         f"cache's {free} free slots")
    return _generate_after(model, settings, params, cache, jnp.asarray(prompt_embeds_bld),
                           jnp.asarray(prompt_mask_bl, bool), rng)


def _settings(*, max_new_tokens: int, eos_id: int, pad_id: int, sample: bool, temperature: float, top_k: int,
              top_p: float, repetition_penalty: float, return_logits: bool) -> _Settings:
    """The static settings of a call, checked (sampling knobs only count when sampling)."""
    if sample and not temperature > 0:
        raise ValueError(f"sampling needs temperature > 0, got {temperature}")
    if top_k < 0 or not 0 < top_p <= 1 or not repetition_penalty > 0:
        raise ValueError(f"invalid top_k={top_k}, top_p={top_p} or repetition_penalty={repetition_penalty}")
    return _Settings(max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id, sample=sample,
                     temperature=float(temperature) if sample else 1.0, top_k=top_k if sample else 0,
                     top_p=float(top_p) if sample else 1.0, repetition_penalty=float(repetition_penalty),
                     return_logits=return_logits)
