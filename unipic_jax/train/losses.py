"""Training losses of `SkyworkUnipicDev` (reference-spec §11.1), on the `UniPic` module.

* text-to-image: VAE-encode (no gradient), mask a random subset of the latent tokens (one
  truncated-normal rate per batch, >= `mask_ratio_min`; `num_masked = ceil(seq_len * rate)`, the
  first `num_masked` entries of a random order per row), run the cache-free bridge -- the LLM on
  `[embed(ids) ; z_enc]` with key mask `[text_mask ; 1]` and positions `cumsum(mask) - 1` --, the
  MAR decoder, and the diffusion loss on the masked tokens with the rows tiled
  `diffusion_batch_mul` times (§4.6).
* editing: the same on the target image, with the source image's full MAR encoding as the
  decoder canvas (`x_con`) and its LLM-order features spliced at the `<image>` ids; both source
  features get a 0.1 gradient scale.
* understanding: the source features spliced at the `<image>` ids (0.1 gradient scale), the LLM
  with the padding mask and positions 0..L-1, cross-entropy of the next token over the labels
  >= 0 (mean over every supervised token of the batch).

Static shapes: the number of masked tokens is random, so the MAR encoder always runs on
`visible_slots(seq_len, mask_ratio_min)` slots (the most visible tokens the mask-ratio law
allows); unused slots are hidden from the encoder's attention, sit after the buffer in the LLM
(causality hides them) and are dropped by the decoder. One compilation serves every mask.

Randomness comes from explicit keys: `key` for the draws (`GenDraws`: mask, diffusion timesteps
and noise, which can be given instead, e.g. replayed from the reference's recording) and
`dropout_key` for the MAR blocks' dropout (reference-spec §3.2: the reference trains in train mode).
Without a `dropout_key` the forward is the eval-mode one (parity). `total_loss`, what the train
step runs, derives both from its key.

Memory: `remat=True` rematerialises each component (MAR encoder, LLM, MAR decoder, diffusion head)
as a whole; per-block remat is a property of the model instead (`UniPic(..., remat=True)`).

Example (the parity row `unipic/t2i_train_forward`):

    model = UniPic(UniPicConfig.from_config(cfg))
    loss, aux = text2image_loss(model, params, {"image": nhwc, "input_ids": ids,
                                "attention_mask": mask},
                                draws=GenDraws(mask=fx_mask, t=rng0000, noise=rng0001))
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from unipic_jax.models import diffusion
from unipic_jax.models.qwen2 import positions_from_mask
from unipic_jax.models.unipic import UniPic, buffer_last, head_module, splice_image_features

GRAD_SCALE = 0.1  # the reference's `grad_scale` on visual features in editing and understanding
MASK_RATE_STD = 0.25  # truncnorm(loc=1, scale=0.25) of `random_masking`
TASKS = ("t2i", "edit", "und")


@flax.struct.dataclass
class GenDraws:
    """The random inputs of one generation loss.

    mask: (b, L) float, 1 = masked (predicted), the same count in every row;
    t: (N,) int timesteps and noise: (N, C) float32, N = b * L * diffusion_batch_mul rows
    (`[all tokens] * mul`, the reference's `randint` and `randn_like` draws).
    """

    mask: jax.Array
    t: jax.Array
    noise: jax.Array


# ----------------------------------------------------------------------------------------------
# Small pieces


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scale_grad(x, scale: float):
    """Identity forward; multiplies the incoming gradient by `scale` (the reference's grad_scale)."""
    return x


def _scale_grad_fwd(x, scale):
    return x, None


def _scale_grad_bwd(scale, _, g):
    return (jax.tree.map(lambda t: t * scale, g),)


scale_grad.defvjp(_scale_grad_fwd, _scale_grad_bwd)


def visible_slots(seq_len: int, mask_ratio_min: float) -> int:
    """Encoder slots for visible tokens: the most a mask rate >= mask_ratio_min can leave visible."""
    return seq_len - math.floor(seq_len * mask_ratio_min)


def draw_gen(key: jax.Array, batch: int, seq_len: int, token_dim: int, *, mask_ratio_min: float,
             diffusion_batch_mul: int, num_train_steps: int) -> GenDraws:
    """Fresh draws as the reference makes them: rate ~ truncnorm on [mask_ratio_min, 1] with
    density ∝ N(1, 0.25²), `num_masked = ceil(seq_len * rate)`, a uniform random order per row
    (masked = its first num_masked entries), t ~ U{0..steps-1} and ε ~ N(0, I) per tiled row."""
    k_rate, k_order, k_t, k_noise = jax.random.split(key, 4)
    lower = (mask_ratio_min - 1.0) / MASK_RATE_STD
    rate = 1.0 + MASK_RATE_STD * jax.random.truncated_normal(k_rate, lower, 0.0, (), jnp.float32)
    most_masked = seq_len - visible_slots(seq_len, mask_ratio_min)
    num_masked = jnp.clip(jnp.ceil(seq_len * rate).astype(jnp.int32), most_masked, seq_len)
    orders_bl = jax.vmap(lambda k: jax.random.permutation(k, seq_len))(jax.random.split(k_order, batch))
    rank_bl = jnp.argsort(orders_bl, axis=1)  # position p sits at rank[p] in its row's order
    mask_bl = (rank_bl < num_masked).astype(jnp.float32)
    rows = batch * seq_len * diffusion_batch_mul
    t = jax.random.randint(k_t, (rows,), 0, num_train_steps, jnp.int32)
    noise = jax.random.normal(k_noise, (rows, token_dim), jnp.float32)
    return GenDraws(mask=mask_bl, t=t, noise=noise)


def visible_positions(mask_bl, slots: int):
    """(b, slots) raster positions of the visible tokens, ascending, then `L` (padding) markers,
    and the visible count (traced scalar; the same in every row)."""
    seq_len = mask_bl.shape[1]
    if not isinstance(mask_bl, jax.core.Tracer):
        visible = np.sum(np.asarray(mask_bl) == 0, axis=1)
        if visible.min() != visible.max() or visible.max() > slots:
            raise ValueError(f"mask rows keep {visible.tolist()} tokens visible; the loss needs one count "
                             f"per batch, at most {slots}")
    num_visible = seq_len - jnp.sum(mask_bl[0] != 0).astype(jnp.int32)
    order_bl = jnp.argsort((mask_bl != 0).astype(jnp.int32), axis=1, stable=True)[:, :slots]
    slot = jnp.arange(slots)
    return jnp.where(slot < num_visible, order_bl, seq_len).astype(jnp.int32), num_visible


@functools.cache
def train_tables(config: diffusion.DiffusionConfig) -> diffusion.DiffusionTables:
    """The training diffusion's float32 tables (all num_train_steps steps), as host constants
    (cached, so they are built concretely even when first asked for inside a trace)."""
    with jax.ensure_compile_time_eval():
        return jax.tree.map(np.asarray, diffusion.train_schedule(config).tables())


def _maybe_remat(fn: Callable, remat: bool) -> Callable:
    return jax.checkpoint(fn) if remat else fn


def _rngs(dropout_key) -> dict:
    return {} if dropout_key is None else {"dropout": dropout_key}


def _split(dropout_key, num: int) -> list:
    """`num` independent dropout keys (one per MAR application), or Nones without a key."""
    return [None] * num if dropout_key is None else list(jax.random.split(dropout_key, num))


# ----------------------------------------------------------------------------------------------
# Model pieces (each a pure function of the params, so it can be rematerialised on its own)


def _encode(model: UniPic, params, images_bhwc):
    """Tokens (b, m, n, C) of images; the VAE is frozen and gets no gradient."""
    return jax.lax.stop_gradient(model.apply({"params": params}, images_bhwc, method=UniPic.encode))


def _tokens(model: UniPic, params, batch, name: str):
    """`batch[name + "_tokens"]` when the caller encoded the images already, else encode `batch[name]`."""
    if name + "_tokens" in batch:
        return batch[name + "_tokens"]
    return _encode(model, params, batch[name])


IMAGE_FIELDS = {"t2i": ("image",), "edit": ("source", "target"), "und": ("image",)}


def encode_images(model: UniPic, params, batch):
    """Add `<field>_tokens` to every task batch, with one VAE call per image size (fewer, larger
    convolutions and a smaller program than one call per field)."""
    groups: dict = {}
    for task, task_batch in batch.items():
        for field in IMAGE_FIELDS[task]:
            groups.setdefault(task_batch[field].shape[1:], []).append((task, field))
    out = {task: dict(task_batch) for task, task_batch in batch.items()}
    for members in groups.values():
        images = jnp.concatenate([batch[t][f] for t, f in members], axis=0)
        tokens = _encode(model, params, images)
        sizes = [batch[t][f].shape[0] for t, f in members]
        for (task, field), part in zip(members, jnp.split(tokens, np.cumsum(sizes)[:-1].tolist(), axis=0)):
            out[task][field + "_tokens"] = part
    return out


def _mar_encoder(model: UniPic, grid, params, tokens_blc, visible_bv, num_visible, dropout_key):
    def fn(m):
        x_enc = m.mar.encode_at(tokens_blc, visible_bv, grid, padded=True, deterministic=dropout_key is None)
        return x_enc, buffer_last(m.proj_in(x_enc), num_visible, m.config.buffer_size)

    return model.apply({"params": params}, method=fn, rngs=_rngs(dropout_key))


def _llm_hidden(model: UniPic, params, x_btd, mask_bt, positions_bt):
    return model.apply({"params": params}, x_btd, positions_bt, mask_bt,
                       method=lambda m, *a: m.llm(*a).last_hidden_state)


def _mar_decoder(model: UniPic, grid, params, x_enc, z_llm, visible_bv, num_visible, x_con, dropout_key):
    def fn(m):
        x_dec_in = m.bridge(x_enc, z_llm, num_visible)
        return m.mar.decode_at(x_dec_in, visible_bv, grid, x_con, deterministic=dropout_key is None), x_dec_in

    return model.apply({"params": params}, method=fn, rngs=_rngs(dropout_key))


def _prompt_embeds(model: UniPic, params, ids_bl, image_features=None):
    """embed(ids), with `image_features` (b, K, D) written at the `<image>` ids when given."""
    def fn(m):
        embeds = m.embed(ids_bl)
        if image_features is None:
            return embeds
        return splice_image_features(embeds, ids_bl, m.config.tokens.image, image_features)

    return model.apply({"params": params}, method=fn)


def _source_features(model: UniPic, params, tokens_bmnc, dropout_key=None):
    """Full (unmasked) MAR encoding of a source image: (x_enc MAR order, z_enc LLM order)."""
    return model.apply({"params": params}, tokens_bmnc, deterministic=dropout_key is None,
                       method=UniPic.extract_visual_feature, rngs=_rngs(dropout_key))


def generation_forward(model: UniPic, params, tokens_bmnc, prompt_embeds_btd, prompt_mask_bt, draws: GenDraws,
                       *, x_con=None, slots: Optional[int] = None, remat: bool = False, dropout_key=None):
    """The cache-free `forward_mae_encoder` then the MAR decoder, on masked tokens (MAR dropout on
    when a `dropout_key` is given).

    Returns (z (b, L, decoder_dim), x_dec_in (b, buffer + slots, mar_dim) = encoder output plus
    the LLM residual in MAR order: buffer, visible tokens, then padding slots).
    """
    b, m, n, c = tokens_bmnc.shape
    grid = (m, n)
    slots = visible_slots(m * n, model.config.mar.mask_ratio_min) if slots is None else slots
    visible_bv, num_visible = visible_positions(draws.mask, slots)
    tokens_blc = tokens_bmnc.reshape(b, m * n, c)
    key_enc, key_dec = _split(dropout_key, 2)
    x_enc, z_enc = _maybe_remat(functools.partial(_mar_encoder, model, grid), remat)(
        params, tokens_blc, visible_bv, num_visible, key_enc)
    length = z_enc.shape[1]
    x_btd = jnp.concatenate([prompt_embeds_btd.astype(z_enc.dtype), z_enc], axis=1)
    mask_bt = jnp.concatenate([jnp.asarray(prompt_mask_bt, bool), jnp.ones((b, length), bool)], axis=1)
    hidden = _maybe_remat(functools.partial(_llm_hidden, model), remat)(
        params, x_btd, mask_bt, positions_from_mask(mask_bt))
    return _maybe_remat(functools.partial(_mar_decoder, model, grid), remat)(
        params, x_enc, hidden[:, -length:], visible_bv, num_visible, x_con, key_dec)


def diffusion_loss(model: UniPic, params, z_bld, target_blc, draws: GenDraws, *, remat: bool = False):
    """`MAR.forward_loss`: Σ(loss · mask) / Σ mask over the rows tiled diffusion_batch_mul times."""
    head = head_module(model)
    tables = jax.tree.map(jnp.asarray, train_tables(model.config.diffusion))
    mul = model.config.mar.diffusion_batch_mul

    def fn(head_params, z, target, mask, t, noise):
        return diffusion.forward_loss(head, head_params, tables, z, target, mask, t, noise, mul)

    return _maybe_remat(fn, remat)(params["diffusion_head"], z_bld, target_blc, draws.mask, draws.t, draws.noise)


def _draws_for(model: UniPic, key, draws, batch: int, seq_len: int) -> GenDraws:
    if draws is not None:
        return draws
    if key is None:
        raise ValueError("give a key or the draws")
    c = model.config
    return draw_gen(key, batch, seq_len, c.mar.token_dim, mask_ratio_min=c.mar.mask_ratio_min,
                    diffusion_batch_mul=c.mar.diffusion_batch_mul, num_train_steps=c.diffusion.num_train_steps)


# ----------------------------------------------------------------------------------------------
# The three task losses


def text2image_loss(model: UniPic, params, batch: Mapping[str, jax.Array], key: Optional[jax.Array] = None,
                    draws: Optional[GenDraws] = None, *, slots: Optional[int] = None, remat: bool = False,
                    dropout_key: Optional[jax.Array] = None):
    """`SkyworkUnipicDev.text2image_loss`.

    batch: image (b, H, W, 3) in [-1, 1] (or image_tokens (b, m, n, C), see `encode_images`),
    input_ids (b, T), attention_mask (b, T) (1 = valid). `draws` replaces the draws from `key`;
    `dropout_key` turns the MAR dropout on.
    Returns (loss, aux) with aux = {gt_latents (b, L, C),
    z (b, L, decoder_dim), x_enc (b, buffer + slots, mar_dim), mask}.
    """
    tokens = _tokens(model, params, batch, "image")
    b, m, n, c = tokens.shape
    draws = _draws_for(model, key, draws, b, m * n)
    prompt = _prompt_embeds(model, params, batch["input_ids"])
    z, x_enc = generation_forward(model, params, tokens, prompt, batch["attention_mask"], draws,
                                  slots=slots, remat=remat, dropout_key=dropout_key)
    target = tokens.reshape(b, m * n, c)
    loss = diffusion_loss(model, params, z, target, draws, remat=remat)
    return loss, {"gt_latents": target, "z": z, "x_enc": x_enc, "mask": draws.mask}


def image_edit_loss(model: UniPic, params, batch: Mapping[str, jax.Array], key: Optional[jax.Array] = None,
                    draws: Optional[GenDraws] = None, *, slots: Optional[int] = None, remat: bool = False,
                    dropout_key: Optional[jax.Array] = None):
    """`SkyworkUnipicDev.image_edit_loss`.

    batch: source, target (b, H, W, 3) in [-1, 1]; input_ids (b, T) holding exactly
    buffer + m*n `<image>` ids per row; attention_mask (b, T). `dropout_key` turns the MAR
    dropout on. Returns (loss, aux).
    """
    source = _tokens(model, params, batch, "source")
    target_tokens = _tokens(model, params, batch, "target")
    b, m, n, c = target_tokens.shape
    draws = _draws_for(model, key, draws, b, m * n)
    key_source, key_target = _split(dropout_key, 2)
    x_con, z_src = _source_features(model, params, source, key_source)
    x_con, z_src = scale_grad(x_con, GRAD_SCALE), scale_grad(z_src, GRAD_SCALE)
    prompt = _prompt_embeds(model, params, batch["input_ids"], z_src)
    z, x_enc = generation_forward(model, params, target_tokens, prompt, batch["attention_mask"], draws,
                                  x_con=x_con, slots=slots, remat=remat, dropout_key=key_target)
    target = target_tokens.reshape(b, m * n, c)
    loss = diffusion_loss(model, params, z, target, draws, remat=remat)
    return loss, {"gt_latents": target, "z": z, "x_enc": x_enc, "mask": draws.mask}


def image2text_loss(model: UniPic, params, batch: Mapping[str, jax.Array], key: Optional[jax.Array] = None,
                    *, answer_slots: Optional[int] = None, remat: bool = False,
                    dropout_key: Optional[jax.Array] = None):
    """`SkyworkUnipicDev.image2text_loss`: next-token cross-entropy on the answer tokens.

    batch: image (b, H, W, 3); input_ids (b, T) with buffer + m*n `<image>` ids per row;
    attention_mask (b, T); labels (b, T), -100 where not supervised. Only the positions whose
    next label is >= 0 go through the LM head: at most `answer_slots` per row (default T - 1).
    `dropout_key` turns the MAR encoder's dropout on. Returns (loss, aux) with
    aux = {tokens: supervised token count, accuracy}.
    """
    del key  # no draws
    tokens = _tokens(model, params, batch, "image")
    _, z_img = _source_features(model, params, tokens, dropout_key)
    prompt = _prompt_embeds(model, params, batch["input_ids"], scale_grad(z_img, GRAD_SCALE))
    b, length = batch["input_ids"].shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    hidden = _maybe_remat(functools.partial(_llm_hidden, model), remat)(
        params, prompt, jnp.asarray(batch["attention_mask"], bool), positions)
    next_labels = batch["labels"][:, 1:]
    supervised = next_labels >= 0
    slots = length - 1 if answer_slots is None else min(answer_slots, length - 1)
    picked = jnp.argsort(~supervised, axis=1, stable=True)[:, :slots]  # supervised positions first
    valid = jnp.take_along_axis(supervised, picked, axis=1)
    labels = jnp.where(valid, jnp.take_along_axis(next_labels, picked, axis=1), 0)
    h = jnp.take_along_axis(hidden[:, :-1], picked[:, :, None], axis=1)
    logits = model.apply({"params": params}, h, method=lambda m, x: m.llm.logits(x))
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, labels[:, :, None], axis=-1)[..., 0]
    count = jnp.sum(valid)
    loss = jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(count, 1)
    correct = jnp.sum(jnp.where(valid, jnp.argmax(logits, axis=-1) == labels, False))
    return loss, {"tokens": count, "accuracy": correct / jnp.maximum(count, 1)}


LOSSES = {"t2i": text2image_loss, "edit": image_edit_loss, "und": image2text_loss}


def total_loss(model: UniPic, params, batch: Mapping[str, Mapping[str, jax.Array]], key: jax.Array,
               weights: Mapping[str, float], *, answer_slots: Optional[int] = None, remat: bool = False):
    """Σ_task weight · loss over the tasks present in `batch` ({task: task batch}), in training
    mode (MAR dropout on).

    Each task's draw and dropout keys are `split(fold_in(key, task index))`.
    Returns (loss, {"loss/<task>": ...}).
    """
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    for task, task_batch in encode_images(model, params, batch).items():
        draw_key, dropout_key = jax.random.split(jax.random.fold_in(key, TASKS.index(task)))
        kwargs = dict(remat=remat, dropout_key=dropout_key)
        if task == "und":
            loss, aux = image2text_loss(model, params, task_batch, draw_key, answer_slots=answer_slots, **kwargs)
            metrics["accuracy/und"] = aux["accuracy"]
        else:
            loss, _ = LOSSES[task](model, params, task_batch, draw_key, **kwargs)
        total = total + weights[task] * loss
        metrics[f"loss/{task}"] = loss
    metrics["loss"] = total
    return total, metrics
