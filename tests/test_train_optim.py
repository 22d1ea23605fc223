"""Optimiser of the training stages: param groups, frozen params, schedule, AdamW step, EMA.

Everything here is exact arithmetic on small trees (no model run), so the checks are bitwise or
against float64 hand computations with float32-rounding bounds stated per test.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs.stages import smoke
from unipic_jax.models.unipic import UniPicConfig, param_shapes
from unipic_jax.train import optim


def optim_cfg(**kw):
    base = dict(lr=0.1, schedule="constant", warmup_ratio=0.0, warmup_start_factor=1e-5, weight_decay=0.02,
                grad_clip=1.0, b1=0.9, b2=0.95, eps=1e-15, trainable=("mar", "diffusion_head"), frozen=(),
                ema_decay=0.9)
    base.update(kw)
    return ml_collections.ConfigDict(base)


def small_tree():
    """A tree with the name patterns of the real one (values arbitrary, one exact -0.0)."""
    rng = np.random.default_rng(0)
    arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    return {
        "mar": {"fake_latent": arr(1, 4), "mask_token": arr(1, 1, 4), "encoder_pos_embed_learned": arr(1, 6, 4),
                "z_proj": {"kernel": arr(3, 4), "bias": arr(4)}, "z_proj_ln": {"scale": arr(4), "bias": arr(4)}},
        "diffusion_head": {"input_proj": {"kernel": arr(3, 5), "bias": arr(5)}},
        "llm": {"embed_tokens": {"embedding": arr(7, 4)}, "norm": {"scale": arr(4)}},
        "vae": {"conv_in": {"kernel": jnp.asarray(np.array([-0.0, 1.0, 2.0, -3.0], np.float32).reshape(1, 1, 1, 4)),
                            "bias": arr(4)}},
    }


def flat(tree):
    return {optim.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_decay_groups_follow_the_reference():
    # MAROptimWrapperConstructor: no decay for 1-D, *bias, anything in the diffusion head;
    # fake_latent, mask_token and the pos-embed tables are decayed.
    got = flat(optim.decay_mask(small_tree()))
    assert got["mar/fake_latent"] and got["mar/mask_token"] and got["mar/encoder_pos_embed_learned"]
    assert got["mar/z_proj/kernel"] and got["llm/embed_tokens/embedding"] and got["vae/conv_in/kernel"]
    assert not got["mar/z_proj/bias"] and not got["mar/z_proj_ln/scale"] and not got["llm/norm/scale"]
    assert not got["diffusion_head/input_proj/kernel"] and not got["diffusion_head/input_proj/bias"]


def test_decay_groups_on_the_real_tree():
    # On the UniPic tree every decayed leaf is >= 2-D, outside the head, not a bias.
    shapes = param_shapes(UniPicConfig.from_config(smoke.get_config().model))
    for name, decays in flat(optim.decay_mask(shapes)).items():
        leaf = flat(shapes)[name]
        expected = len(leaf.shape) >= 2 and not name.endswith("bias") and not name.startswith("diffusion_head/")
        assert decays == expected, name
    assert flat(optim.decay_mask(shapes))["mar/diffusion_pos_embed_learned"]


def test_trainable_mask_prefixes_and_typos():
    mask = flat(optim.trainable_mask(small_tree(), ("mar", "diffusion_head"), frozen=("mar/z_proj",)))
    assert mask["mar/fake_latent"] and mask["diffusion_head/input_proj/kernel"]
    assert not mask["mar/z_proj/kernel"] and mask["mar/z_proj_ln/scale"]  # "z_proj" does not cover "z_proj_ln"
    assert not mask["llm/norm/scale"] and not mask["vae/conv_in/kernel"]
    with pytest.raises(ValueError, match="no params under"):
        optim.trainable_mask(small_tree(), ("mra",))


def test_frozen_params_have_no_optimizer_state_and_stay_bitwise():
    params = small_tree()
    tx, trainable, _ = optim.make_optimizer(optim_cfg(), params, total_steps=10)
    state = tx.init(params)
    # Adam moments exist only for the trainable leaves: frozen leaves are MaskedNodes (no arrays).
    n_trainable = sum(jax.tree.leaves(trainable))
    moments = [x for x in jax.tree.leaves(state) if np.ndim(x) > 0]
    assert len(moments) == 2 * n_trainable
    assert sum(int(np.size(x)) for x in moments) == 2 * optim.count_params(params, trainable)
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        params_next = optim.apply_updates(params, updates, trainable)
        params = params_next
    start = flat(small_tree())
    for name, value in flat(params).items():
        same = np.array_equal(np.asarray(value).view(np.uint32), np.asarray(start[name]).view(np.uint32))
        assert same == (not flat(trainable)[name]), name  # frozen: bit-identical (-0.0 kept); trained: moved


def test_adamw_step_matches_the_torch_formula():
    # One step, float64 reference of torch AdamW after clip_grad_norm_(1.0):
    # g <- g * min(1, 1/|g|); m = (1-b1) g; v = (1-b2) g²; p <- p - lr (m̂/(sqrt(v̂)+eps) + wd p [decayed]).
    params = small_tree()
    cfg = optim_cfg()
    tx, trainable, _ = optim.make_optimizer(cfg, params, total_steps=10)
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = flat(optim.apply_updates(params, updates, trainable))
    train, decay = flat(trainable), flat(optim.decay_mask(params))
    g = {k: np.asarray(v, np.float64) for k, v in flat(grads).items() if train[k]}
    norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
    clip = min(1.0, cfg.grad_clip / norm)
    for name, p in flat(params).items():
        if not train[name]:
            continue
        gc = g[name] * clip
        m_hat = (1 - cfg.b1) * gc / (1 - cfg.b1)
        v_hat = (1 - cfg.b2) * gc * gc / (1 - cfg.b2)
        step = m_hat / (np.sqrt(v_hat) + cfg.eps) + (cfg.weight_decay * np.asarray(p, np.float64) if decay[name] else 0)
        want = np.asarray(p, np.float64) - cfg.lr * step
        # float32 Adam arithmetic: a few ulps of |p| + lr
        np.testing.assert_allclose(np.asarray(new[name]), want, rtol=0, atol=1e-6, err_msg=name)


def test_clip_uses_the_trainable_gradients_only():
    params = small_tree()
    _, trainable, _ = optim.make_optimizer(optim_cfg(), params, total_steps=10)
    grads = jax.tree.map(jnp.ones_like, params)
    want = math.sqrt(optim.count_params(params, trainable))
    assert float(optim.trainable_norm(grads, trainable)) == pytest.approx(want, rel=1e-6)


def test_schedule_warmup_then_constant_or_cosine():
    lr, total = 1e-3, 200
    sched = optim.lr_schedule(lr, total, warmup_ratio=0.05, kind="cosine")
    warm = 10
    # mmengine LinearLR(start_factor=1e-5) over 10 steps, then CosineAnnealingLR(eta_min=0).
    # optax interpolates in float32 from the far end, so the warmup values carry float32 rounding
    # of lr-sized terms (abs 1e-6 * lr).
    assert float(sched(0)) == pytest.approx(lr * 1e-5, abs=lr * 1e-6)
    assert float(sched(5)) == pytest.approx(lr * (1e-5 + (1 - 1e-5) * 0.5), abs=lr * 1e-6)
    assert float(sched(warm)) == pytest.approx(lr, rel=1e-6)
    mid = warm + (total - warm) // 2
    assert float(sched(mid)) == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=1e-5)
    assert float(sched(total)) == pytest.approx(0.0, abs=1e-12)
    const = optim.lr_schedule(lr, total, warmup_ratio=0.05, kind="constant")
    assert float(const(warm)) == float(const(total)) == pytest.approx(lr, rel=1e-7)
    assert float(optim.lr_schedule(lr, total, 0.0, "constant")(0)) == pytest.approx(lr, rel=1e-7)
    with pytest.raises(ValueError):
        optim.lr_schedule(lr, total, 0.0, "linear")


def test_ema_equals_the_hand_computed_value():
    # Three updates of ema <- r ema + (1 - r) p with r = 0.9 over known params, computed by hand
    # in float32 in the same operation order (1 - r taken in float64 and rounded once, as torch's
    # `add_(src, alpha=1 - rate)` does): bitwise equal. Frozen leaves keep no EMA.
    params = small_tree()
    trainable = optim.trainable_mask(params, ("mar",))
    ema = optim.ema_init(params, trainable)
    assert isinstance(ema["llm"]["norm"]["scale"], optax.MaskedNode)
    r = np.float32(0.9)
    steps = [jax.tree.map(lambda p, k=k: p + np.float32(k), params) for k in (1.0, 2.0, 4.0)]
    x0 = np.asarray(params["mar"]["fake_latent"])
    want = x0
    for k in (1.0, 2.0, 4.0):
        want = want * r + (x0 + np.float32(k)) * np.float32(1 - 0.9)
    for p in steps:
        ema = optim.ema_update(ema, p, 0.9)
    np.testing.assert_array_equal(np.asarray(ema["mar"]["fake_latent"]), want)
    # Closed form in float64: Σ (1-r) r^(n-i) k_i + r^3 x0, to float32 rounding.
    closed = 0.9 ** 3 * x0.astype(np.float64) + 0.1 * (0.81 * (x0 + 1) + 0.9 * (x0 + 2) + (x0 + 4))
    np.testing.assert_allclose(want, closed, rtol=1e-6, atol=1e-6)
    full = optim.ema_params(ema, steps[-1])
    assert full["llm"]["norm"]["scale"] is steps[-1]["llm"]["norm"]["scale"]
    np.testing.assert_array_equal(np.asarray(full["mar"]["fake_latent"]), want)
