"""Training losses: the text-to-image loss against the reference's recorded training forward
(`unipic/t2i_train_forward`), the editing and understanding losses against plain compositions of
the UniPic methods, the mask-ratio law and the gradient scale.

Bounds: forward-pass parity is FORWARD (1e-4 x max|ref|, float32 at "highest" matmul precision;
the reference's own float32/float64 spread is ~1e-5). Port-vs-port comparisons (the static-slot
training path against the exact-count UniPic path) use the same bound: they differ only by
reduction order.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture
from scipy import stats

from convert.unipic import unipic_params_from_torch
from unipic_jax.models import diffusion
from unipic_jax.models.unipic import UniPic, UniPicConfig, head_module, splice_image_features
from unipic_jax.parity import FORWARD, compare, draws
from unipic_jax.train import losses


@pytest.fixture(scope="module")
def setup():
    fx = fixture("unipic")
    config = UniPicConfig.from_config(fx.config())
    return fx, UniPic(config), unipic_params_from_torch(fx.weights, config)


def nhwc(x):
    return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))


def test_t2i_train_forward_matches_the_reference(setup):
    fx, model, params = setup
    io = fx.file("t2i_train_forward")
    t, noise = draws(io, "")
    batch = {"image": nhwc(io["image"]), "input_ids": io["input_ids"], "attention_mask": io["attention_mask"]}
    recorded = losses.GenDraws(mask=jnp.asarray(io["mask"]), t=jnp.asarray(t), noise=jnp.asarray(noise))
    loss, aux = jax.jit(lambda p, b, d: losses.text2image_loss(model, p, b, draws=d))(params, batch, recorded)
    num_visible = io["mask"].shape[1] - int(io["mask"][0].sum())
    kept = model.config.buffer_size + num_visible  # the rest of x_enc are the unused static slots
    rows = [compare("train", "t2i_train_forward/gt_latents", aux["gt_latents"], io["gt_latents"], FORWARD),
            compare("train", "t2i_train_forward/x_enc", aux["x_enc"][:, :kept], io["x_enc"], FORWARD),
            compare("train", "t2i_train_forward/z", aux["z"], io["z"], FORWARD),
            compare("train", "t2i_train_forward/loss", loss, io["loss"], FORWARD)]
    for row in rows:
        assert row.ok, row


def test_mask_ratio_law():
    # One rate per batch from truncnorm(a=(0.7-1)/0.25, b=0, loc=1, scale=0.25); the first
    # ceil(L*rate) entries of a random order per row are masked.
    seq_len, batch = 64, 3

    def draw(key):
        d = losses.draw_gen(key, batch, seq_len, 16, mask_ratio_min=0.7, diffusion_batch_mul=4, num_train_steps=1000)
        return d.mask, d.t, d.noise

    masks, ts, noises = jax.jit(jax.vmap(draw))(jax.random.split(jax.random.key(0), 400))
    counts = np.asarray(masks.sum(axis=2))
    assert (counts == counts[:, :1]).all()  # every row of a batch masks the same number
    assert counts.min() >= math.ceil(0.7 * seq_len) and counts.max() <= seq_len
    assert not np.array_equal(np.asarray(masks[0, 0]), np.asarray(masks[0, 1]))  # rows have their own order
    rate_mean = stats.truncnorm((0.7 - 1) / 0.25, 0, loc=1, scale=0.25).mean()
    # mean of ceil(64 r)/64 over 400 batches: E[r] + ~0.5/64, std of the mean ~0.004
    assert abs(counts[:, 0].mean() / seq_len - (rate_mean + 0.5 / seq_len)) < 0.02
    assert ts.shape == (400, batch * seq_len * 4) and 0 <= int(ts.min()) and int(ts.max()) < 1000
    assert noises.shape == (400, batch * seq_len * 4, 16)
    assert losses.visible_slots(seq_len, 0.7) == seq_len - 44  # ceil(44.8) = 45 masked at least
    with pytest.raises(ValueError, match="one count"):  # an injected mask must keep one count per batch
        losses.visible_positions(np.array([[1, 0, 0, 0], [0, 1, 1, 0]], np.float32), 3)


def test_scale_grad_is_identity_forward_and_scales_backward():
    x = jnp.asarray([1.5, -2.25, 3.0e-3], jnp.float32)
    y, vjp = jax.vjp(lambda v: losses.scale_grad(v, 0.1), x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))  # bitwise identity
    np.testing.assert_allclose(np.asarray(vjp(jnp.ones(3))[0]), 0.1, rtol=1e-7)


def edit_batch(fx, model):
    io = fx.file("t2i_train_forward")
    image = nhwc(io["image"])
    b = image.shape[0]
    grid = model.config.mar.grid
    m = image.shape[1] // model.config.vae.downsample_factor
    image_ids = m * m + model.config.buffer_size
    text = io["input_ids"][:, :6]
    ids = np.concatenate([np.full((b, image_ids), model.config.tokens.image), text,
                          np.full((b, 3), model.config.tokens.eos)], axis=1)
    mask = np.ones_like(ids, bool)
    mask[1, -4:] = False  # a right-padded row
    del grid
    return {"source": image, "target": image[:, ::-1], "input_ids": ids, "attention_mask": mask}, io


def test_edit_loss_equals_the_exact_count_composition(setup):
    fx, model, params = setup
    batch, io = edit_batch(fx, model)
    t, noise = draws(io, "")
    d = losses.GenDraws(mask=jnp.asarray(io["mask"]), t=jnp.asarray(t), noise=jnp.asarray(noise))
    got, _ = jax.jit(lambda p, b, d: losses.image_edit_loss(model, p, b, draws=d))(params, batch, d)

    num_visible = io["mask"].shape[1] - int(io["mask"][0].sum())

    def reference(p, b, d):
        # SkyworkUnipicDev.image_edit_loss through the UniPic methods (no static slots).
        v = {"params": p}
        src = model.apply(v, b["source"], method=UniPic.encode)
        tgt = model.apply(v, b["target"], method=UniPic.encode)
        bsz, mm, nn_, c = tgt.shape
        x_con, z_src = model.apply(v, src, method=UniPic.extract_visual_feature)
        embeds = model.apply(v, b["input_ids"], method=UniPic.embed)
        embeds = splice_image_features(embeds, b["input_ids"], model.config.tokens.image, z_src)
        x_enc = model.apply(v, tgt.reshape(bsz, mm * nn_, c), d.mask, num_visible, (mm, nn_), embeds,
                            b["attention_mask"], method=UniPic.forward_mae_encoder)
        z = model.apply(v, x_enc, d.mask, (mm, nn_), x_con, method=lambda m, *a: m.mar.decode(*a))
        tables = diffusion.train_schedule(model.config.diffusion).tables()
        return diffusion.forward_loss(head_module(model), p["diffusion_head"], tables, z,
                                      tgt.reshape(bsz, mm * nn_, c), d.mask, d.t, d.noise,
                                      model.config.mar.diffusion_batch_mul)

    want = jax.jit(reference)(params, batch, d)
    assert compare("train", "edit_loss", got, want, FORWARD).ok, (float(got), float(want))


def test_und_loss_equals_full_vocabulary_cross_entropy(setup):
    fx, model, params = setup
    batch, _ = edit_batch(fx, model)
    ids = batch["input_ids"]
    labels = np.full_like(ids, -100)
    labels[:, -9:-3] = ids[:, -9:-3]  # the text tokens are the "answer"
    labels[1, -5:] = -100  # padded row: fewer supervised tokens
    und = {"image": batch["source"], "input_ids": ids, "attention_mask": batch["attention_mask"], "labels": labels}
    got, aux = jax.jit(lambda p, b: losses.image2text_loss(model, p, b, answer_slots=8))(params, und)

    def reference(p, b):
        v = {"params": p}
        _, z = model.apply(v, model.apply(v, b["image"], method=UniPic.encode), method=UniPic.extract_visual_feature)
        embeds = splice_image_features(model.apply(v, b["input_ids"], method=UniPic.embed), b["input_ids"],
                                       model.config.tokens.image, z)
        length = b["input_ids"].shape[1]
        positions = jnp.broadcast_to(jnp.arange(length), b["input_ids"].shape)
        out = model.apply(v, embeds, positions, b["attention_mask"], method=lambda m, *a: m.llm(*a, return_logits=True))
        logp = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)
        target = b["labels"][:, 1:]
        valid = target >= 0
        nll = -jnp.take_along_axis(logp, jnp.where(valid, target, 0)[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(valid, nll, 0)) / jnp.sum(valid)

    want = jax.jit(reference)(params, und)
    assert int(aux["tokens"]) == int((labels[:, 1:] >= 0).sum())
    assert compare("train", "und_loss", got, want, FORWARD).ok, (float(got), float(want))


def test_mar_dropout_only_with_a_dropout_key(setup):
    # The reference trains with the MAR blocks' dropout on (reference-spec §3.2; rates from the
    # config); without a dropout key a loss is the eval-mode forward the parity rows check. A
    # dropout mask moves a loss beyond the FORWARD bound, which rounding cannot (measured on the
    # fixture: 1.3 % for t2i, 0.24 % for und, whose MAR features enter with the LLM prompt).
    fx, model, params = setup
    batch, io = edit_batch(fx, model)
    t, noise = draws(io, "")
    d = losses.GenDraws(mask=jnp.asarray(io["mask"]), t=jnp.asarray(t), noise=jnp.asarray(noise))
    t2i = {"image": batch["source"], "input_ids": io["input_ids"], "attention_mask": io["attention_mask"]}
    labels = np.where(np.arange(batch["input_ids"].shape[1]) >= batch["input_ids"].shape[1] - 9,
                      batch["input_ids"], -100)
    und = {"image": batch["source"], "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
           "labels": labels}

    def both(p, key):
        keyed = (losses.text2image_loss(model, p, t2i, draws=d, dropout_key=key)[0],
                 losses.image2text_loss(model, p, und, dropout_key=key)[0])
        return keyed, (losses.text2image_loss(model, p, t2i, draws=d)[0], losses.image2text_loss(model, p, und)[0])

    fn = jax.jit(both)
    keyed, plain = fn(params, jax.random.key(1))
    again, _ = fn(params, jax.random.key(1))
    other, _ = fn(params, jax.random.key(2))
    assert compare("train", "dropout/t2i_eval", plain[0], io["loss"], FORWARD).ok
    for task, k, k_again, k_other, p in zip(("t2i", "und"), keyed, again, other, plain):
        assert float(k) == float(k_again), task  # a key fixes the masks
        assert abs(float(k) - float(p)) > FORWARD * abs(float(p)), (task, float(k), float(p))
        assert float(k) != float(k_other), task


def test_component_remat_keeps_loss_and_gradients(setup):
    # remat="components" wraps the MAR encoder / LLM / MAR decoder / head in jax.checkpoint: the
    # backward recomputes them, so values may differ by reduction order only (FORWARD bound).
    fx, model, params = setup
    batch, io = edit_batch(fx, model)
    t2i = {"image": batch["source"], "input_ids": io["input_ids"], "attention_mask": io["attention_mask"]}
    t, noise = draws(io, "")
    d = losses.GenDraws(mask=jnp.asarray(io["mask"]), t=jnp.asarray(t), noise=jnp.asarray(noise))

    def grads(remat):
        fn = lambda p: losses.text2image_loss(model, p, t2i, draws=d, remat=remat)[0]
        return jax.jit(jax.value_and_grad(fn))(params)

    (loss, g), (loss_r, g_r) = grads(False), grads(True)
    assert compare("train", "remat/loss", loss_r, loss, FORWARD).ok
    for name in ("mar", "llm", "proj_in", "proj_out", "diffusion_head"):
        got, want = jax.tree.leaves(g_r[name]), jax.tree.leaves(g[name])
        err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(got, want))
        scale = max(float(jnp.max(jnp.abs(b))) for b in want)
        assert scale > 0 and err <= FORWARD * scale, (name, err, scale)
