"""The fast sampler (`sampling/fast.py`) on the tiny fixture model (random weights).

What is checked: the published schedules (DiSA's per-step diffusion step counts, LazyMAR's fresh
steps) against values worked out from their rules; that the faithful default is untouched (no
`fast`, `fast=None` and `fast=False` run the same programs and give identical arrays, and the
recorded-reference replays of test_t2i / test_parity stay as they are); that each switch's parts
compute what they claim (the dynamic-length diffusion chain equals the faithful chain, a lazy step
fed a residual from its own step equals the full guided step); one compile per configuration,
whatever the diffusion step counts; determinism per key and injectable draws; FLOPs from the
cost analysis; the API's `fast` flag and its metadata. Quality is not measurable here.
"""

import json

import jax
import numpy as np
import pytest

from unipic_jax.models import diffusion
from unipic_jax.models.unipic import head_module
from unipic_jax.parity import CHAIN, FORWARD
from unipic_jax.parity import unipic as unipic_parity
from unipic_jax.sampling import fast, t2i
from unipic_jax.sampling.schedule import mask_schedule

from conftest import fixture

FX = fixture("unipic")
DISA = fast.FastSettings(disa=fast.DiSA(50, 5, "linear"))
LAZY = fast.FastSettings(lazy_cfg=fast.LazyCFG(2, 3))
FEWER = fast.FastSettings(mar_steps=0.5)
ALL = fast.FastSettings(mar_steps=0.75, disa=fast.DiSA(25, 5, "cosine"), lazy_cfg=fast.LazyCFG(1, 2))


@pytest.fixture(scope="module")
def loaded():
    return unipic_parity.load(FX)


def _prompt(rows, length, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 400, (rows, length))
    mask = np.ones((rows, length), bool)
    mask[rows // 2:, length // 2:] = False
    return ids, mask


def _close(got, ref, rel, what):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    err, bound = np.max(np.abs(got - ref)), rel * np.max(np.abs(ref))
    assert err <= bound, f"{what}: max err {err:.3e} > {bound:.3e}"


# ----------------------------------------------------------------------------------------------
# Schedules


def test_disa_counts_follow_the_published_rule():
    # Harmon_DiSA diffloss.py:52-60: lower + int((last - s) / last * (upper - lower)), last = n - 1.
    assert fast.DiSA().steps(16) == (50, 47, 44, 41, 38, 35, 32, 29, 26, 23, 20, 17, 14, 11, 8, 5)
    assert fast.DiSA(25, 5).steps(8) == (25, 22, 19, 16, 13, 10, 7, 5)
    assert fast.DiSA(50, 5, "cosine").steps(8) == (50, 47, 41, 32, 22, 13, 7, 5)
    assert fast.DiSA(50, 5, "constant").steps(4) == (5, 5, 5, 5)
    assert fast.DiSA().steps(1) == (50,) and fast.DiSA().steps(2) == (50, 5)
    counts = fast.DiSA(100, 5).steps(64)
    assert counts[0] == 100 and counts[-1] == 5 and all(a >= b for a, b in zip(counts, counts[1:]))
    for bad in (dict(upper=4, lower=5), dict(lower=0), dict(strategy="exp")):
        with pytest.raises(ValueError):
            fast.DiSA(**bad)


def test_lazy_fresh_steps_and_plan():
    # LazyMAR mar_cache.py:222-224 with start_step 5, fresh_t 9 (:364-365).
    assert [s for s in range(40) if fast.LazyCFG().fresh(s)] == [0, 1, 2, 3, 4, 5, 14, 23, 32]
    config = diffusion.DiffusionConfig(16, 64, 64, 2, 1000, "100", 0.2)
    steps = fast.plan(fast.FastSettings(mar_steps=0.5, disa=fast.DiSA(), lazy_cfg=fast.LazyCFG()), 256, 32, config,
                      guided=True)
    assert [p.step for p in steps] == list(mask_schedule(256, 16))
    assert [p.chain_steps for p in steps] == list(fast.DiSA().steps(16))
    # Residual computed on fresh step 5 (followed by lazy 6) and 14 (followed by lazy 15).
    assert [p.mode[0] for p in steps] == list("pppppfllllllllfl")
    assert {p.mode for p in fast.plan(LAZY, 16, 6, config, guided=False)} == {"plain"}  # no guidance, no cache
    assert [p.chain_steps for p in fast.plan(LAZY, 16, 4, config, guided=True)] == [100] * 4
    assert fast.FastSettings(mar_steps=0.5).num_iter(64) == 32 and fast.FastSettings(mar_steps=0.1).num_iter(4) == 1


def test_settings_round_trip_and_resolve():
    for settings in (fast.FAST, DISA, LAZY, FEWER, ALL, fast.FastSettings()):
        assert fast.FastSettings.from_dict(settings.as_dict()) == settings
    assert fast.resolve(None) is None and fast.resolve(False) is None and fast.resolve(True) is fast.FAST
    assert fast.resolve(ALL.as_dict()) == ALL
    with pytest.raises(ValueError, match="unknown"):
        fast.FastSettings.from_dict({"disa": None, "typo": 1})
    with pytest.raises(ValueError, match="mar_steps"):
        fast.FastSettings(mar_steps=1.5)
    assert fast.describe(False, 32) == {"fast": False}
    assert fast.describe(True, 32) == {"fast": True, "fast_settings": fast.FAST.as_dict(),
                                       "fast_steps": fast.FAST.num_iter(32)}


# ----------------------------------------------------------------------------------------------
# The faithful default


def test_faithful_default_is_unchanged(loaded):
    """No `fast`, None and False: the faithful programs, identical arrays, nothing of fast.py runs."""
    model, params = loaded
    ids, mask = _prompt(2, 7, 0)
    kwargs = dict(image_shape=(4, 4), num_iter=3, key=jax.random.key(3))
    before = dict(fast.TRACES)
    plain = t2i.text_to_image(model, params, ids, mask, **kwargs)
    for off in (None, False):
        out = t2i.text_to_image(model, params, ids, mask, fast=off, **kwargs)
        for name in ("images", "tokens", "orders"):
            np.testing.assert_array_equal(np.asarray(getattr(out, name)), np.asarray(getattr(plain, name)))
    assert dict(fast.TRACES) == before
    with pytest.raises(ValueError, match="capture"):
        t2i.text_to_image(model, params, ids, mask, fast=True, capture=True, **kwargs)


def test_unrolled_faithful_chain_is_the_same_chain(loaded):
    """`unroll=True` (used for the cost analysis only) computes the faithful chain's numbers. On a
    chain respaced to 10 steps: unrolling the full 50 compiled for minutes, and the unrolled body
    is the same at any count."""
    model, params = loaded
    head, hp = head_module(model), params["diffusion_head"]
    tables = diffusion.sampling_schedule(model.config.diffusion, "10").tables()
    rng = np.random.default_rng(1)
    z = rng.standard_normal((6, model.config.mar.decoder_dim), np.float32)
    init = rng.standard_normal((3, 16), np.float32)
    noise = rng.standard_normal((tables.num_steps, 6, 16), np.float32)
    run = lambda unroll: jax.jit(lambda: diffusion.sample(head, hp, tables, z, init, noise, temperature=0.9, cfg=2.0,
                                                          guided=True, unroll=unroll))()
    _close(run(True), run(False), CHAIN, "unrolled chain")


# ----------------------------------------------------------------------------------------------
# The switches' parts


def test_dynamic_chain_equals_the_faithful_chain(loaded):
    """`sample_dynamic` over padded tables = `sample` over the schedule respaced to that count,
    for the longest count and a shorter one sharing the program."""
    model, params = loaded
    head, hp = head_module(model), params["diffusion_head"]
    rng = np.random.default_rng(2)
    z = rng.standard_normal((8, model.config.mar.decoder_dim), np.float32)
    init = rng.standard_normal((4, 16), np.float32)
    dynamic = jax.jit(lambda tables, count, noise: diffusion.sample_dynamic(
        head, hp, tables, count, z, init, noise, temperature=0.8, cfg=3.0, guided=True))
    for count in (50, 7):
        noise = rng.standard_normal((count, 8, 16), np.float32)
        ref = diffusion.sample(head, hp, diffusion.sampling_schedule(model.config.diffusion, str(count)).tables(),
                               z, init, noise, temperature=0.8, cfg=3.0, guided=True)
        padded = np.concatenate([noise, np.zeros((50 - count, 8, 16), np.float32)])
        got = dynamic(fast._chain_tables(model.config.diffusion, count, 50), np.int32(count), padded)
        _close(got, ref, CHAIN, f"{count}-step chain")
        static = diffusion.sample_dynamic(head, hp, fast._chain_tables(model.config.diffusion, count, 50), count, z,
                                          init, padded, temperature=0.8, cfg=3.0, guided=True, static_steps=count)
        _close(static, ref, CHAIN, f"{count}-step chain, unrolled")


def test_lazy_step_with_its_own_residual_is_the_guided_step(loaded):
    """A fresh step's conditions equal the faithful step's; a lazy step fed the residual of the
    same step (instead of an earlier one) gives them too: the cache only approximates in time."""
    model, params = loaded
    ids, mask = _prompt(2, 9, 4)
    ids, mask = t2i._pad_ids(ids, mask, 64, model.config.tokens.eos)
    _, cache = t2i._prefill(model, params, t2i._embed(model, params, ids), mask)
    steps = mask_schedule(16, 4)
    step = steps[2]
    rng = np.random.default_rng(5)
    tokens = np.repeat(rng.standard_normal((1, 16, 16), np.float32), 2, axis=0)
    orders = np.stack([rng.permutation(16)]).astype(np.int32)
    counts = np.array([step.masked, step.mask_len], np.int32)
    faithful, _ = t2i._condition(model, t2i._ConditionPlan((4, 4), step.visible, step.predicted, False, True, False),
                                 params, tokens, orders, cache, None, counts)
    fresh, diff = fast._condition(model, fast._CondPlan((4, 4), step.visible, step.predicted, False, "fresh"),
                                  params, tokens, orders, cache, None, None, counts)
    lazy, kept = fast._condition(model, fast._CondPlan((4, 4), step.visible, step.predicted, False, "lazy"),
                                 params, tokens, orders, cache, None, diff, counts)
    _close(fresh, faithful, FORWARD, "fresh conditions")
    _close(lazy, faithful, FORWARD, "lazy conditions, same-step residual")
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(diff))
    assert diff.shape == (1, model.config.buffer_size + 16, model.config.mar.decoder_dim)


# ----------------------------------------------------------------------------------------------
# Whole calls


@pytest.mark.parametrize("settings, grid", [(DISA, (3, 4)), (LAZY, (4, 3)), (FEWER, (2, 6)), (ALL, (6, 2))],
                         ids=["disa", "lazy", "fewer", "all"])
def test_each_switch_compiles_once_per_configuration(loaded, settings, grid):
    """A configuration traces each program once: diffusion programs one per predicted-slot count
    (not per diffusion step count), condition programs one per visible-slot count and mode; a
    second call (other prompt, other key) traces nothing. (A grid of its own per case, so that no
    case finds programs compiled by another.)"""
    model, params = loaded
    kwargs = dict(image_shape=grid, num_iter=6, cfg=2.5, fast=settings, buckets=t2i.Buckets(2, 2))
    before_fast = dict(fast.TRACES)
    t2i.text_to_image(model, params, *_prompt(2, 5, 6), key=jax.random.key(0), **kwargs)
    traced = {k: v - before_fast.get(k, 0) for k, v in fast.TRACES.items() if v != before_fast.get(k, 0)}
    steps = fast.plan(settings, 12, 6, model.config.diffusion, guided=True)
    slots = t2i.Buckets(2, 2).slots([p.step for p in steps])
    assert traced["predict"] == len({p for _, p in slots})
    assert traced["draws"] == 1 and traced["pad_noise"] == 1
    for mode in ("fresh", "lazy"):
        assert traced.get(f"condition_{mode}", 0) == len({v for (v, _), p in zip(slots, steps) if p.mode == mode})
    after_fast, after_t2i = dict(fast.TRACES), dict(t2i.TRACES)
    seen = []
    t2i.text_to_image(model, params, *_prompt(2, 8, 7), key=jax.random.key(1),
                      on_step=lambda k, tokens: seen.append(k), **kwargs)
    assert dict(fast.TRACES) == after_fast and dict(t2i.TRACES) == after_t2i
    assert seen == list(range(settings.num_iter(6)))
    if settings.disa is not None:  # several diffusion step counts, one program per slot count
        assert len({p.chain_steps for p in steps}) > traced["predict"]


def test_fast_is_deterministic_and_injectable(loaded):
    model, params = loaded
    ids, mask = _prompt(2, 9, 8)
    kwargs = dict(image_shape=(4, 4), num_iter=4, temperature=0.9, fast=ALL, buckets=t2i.Buckets(1, 1))
    a = t2i.text_to_image(model, params, ids, mask, key=jax.random.key(5), **kwargs)
    b = t2i.text_to_image(model, params, ids, mask, key=jax.random.key(5), **kwargs)
    c = t2i.text_to_image(model, params, ids, mask, key=jax.random.key(6), **kwargs)
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    assert not np.allclose(np.asarray(a.images), np.asarray(c.images))
    assert np.all(np.isfinite(np.asarray(a.images)))
    # The same orders as the faithful sampler for the key; the draws can be injected.
    faithful = t2i.text_to_image(model, params, ids, mask, image_shape=(4, 4), num_iter=4, key=jax.random.key(5))
    np.testing.assert_array_equal(np.asarray(a.orders), np.asarray(faithful.orders))
    steps = fast.plan(ALL, 16, 4, model.config.diffusion, guided=True)
    draws = fast.draws_from_key(jax.random.key(5), batch=1, num_tokens=16, steps=steps,
                                token_dim=model.config.mar.token_dim, guided=True)
    assert [x.shape[0] for x in draws.step_noise] == [p.chain_steps for p in steps]
    injected = t2i.text_to_image(model, params, ids, mask, draws=draws, **kwargs)
    np.testing.assert_array_equal(np.asarray(injected.images), np.asarray(a.images))
    short = draws.replace(step_noise=draws.step_noise[:-1] + (draws.step_noise[-1][:-1],))
    with pytest.raises(ValueError, match="chains"):
        t2i.text_to_image(model, params, ids, mask, draws=short, **kwargs)


def test_edit_and_unguided_calls(loaded):
    """Editing (the source's x_con on the canvas, cond rows only on lazy steps) and cfg == 1 (no
    unconditional rows: no cache) run every switch; a repeated edit gives the same image."""
    model, params = loaded
    rng = np.random.default_rng(10)
    source = rng.uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
    image_id = model.config.tokens.image
    row = [1, 2, 3] + [image_id] * (16 + model.config.buffer_size) + [4, 5]
    ids = np.array([row, row[:3] + row[3:-2] + [6, 7]])
    mask = np.ones(ids.shape, bool)
    settings = fast.FastSettings(disa=fast.DiSA(25, 5), lazy_cfg=fast.LazyCFG(1, 2))
    assert {p.mode for p in fast.plan(settings, 16, 4, model.config.diffusion, guided=True)} == {"plain", "fresh",
                                                                                                 "lazy"}
    kwargs = dict(num_iter=4, cfg=3.0, fast=settings, key=jax.random.key(4))
    a = t2i.edit(model, params, source, ids, mask, **kwargs)
    b = t2i.edit(model, params, source, ids, mask, **kwargs)
    assert a.images.shape == (1, 64, 64, 3) and np.all(np.isfinite(np.asarray(a.images)))
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    unguided = t2i.text_to_image(model, params, *_prompt(1, 5, 11), image_shape=(4, 4), num_iter=4, cfg=1.0,
                                 fast=ALL, key=jax.random.key(0))
    assert unguided.tokens.shape[0] == 1 and np.all(np.isfinite(np.asarray(unguided.images)))


def test_all_switches_off_is_the_faithful_arithmetic(loaded):
    """`FastSettings()` runs the fast programs with nothing skipped: the faithful result up to the
    chain's rounding (the modulations per step instead of per chunk), on the same key."""
    model, params = loaded
    ids, mask = _prompt(2, 6, 9)
    kwargs = dict(image_shape=(4, 4), num_iter=3, key=jax.random.key(2))
    off = t2i.text_to_image(model, params, ids, mask, fast=fast.FastSettings(), **kwargs)
    ref = t2i.text_to_image(model, params, ids, mask, **kwargs)
    _close(off.tokens, ref.tokens, CHAIN, "tokens")


def test_flops_fall_with_each_switch(loaded):
    model, params = loaded
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    kwargs = dict(batch=1, prompt_len=9, image_shape=(4, 4), num_iter=8, cfg=3.0)
    full = fast.flops_per_image(model, shapes, **kwargs)
    assert full["total"] == pytest.approx(sum(v for k, v in full.items() if k != "total"))
    disa = fast.flops_per_image(model, shapes, fast=DISA, **kwargs)
    lazy = fast.flops_per_image(model, shapes, fast=fast.FastSettings(lazy_cfg=fast.LazyCFG(1, 4)), **kwargs)
    assert disa["condition"] == full["condition"] and disa["diffusion"] < 0.5 * full["diffusion"]
    assert lazy["condition"] < full["condition"]
    # The faithful chain is counted in full: 100 steps cost about 100 / 50 times DiSA's first step count.
    one = fast.flops_per_image(model, shapes, **{**kwargs, "num_iter": 1})
    one_disa = fast.flops_per_image(model, shapes, fast=DISA, **{**kwargs, "num_iter": 1})
    assert one["diffusion"] / one_disa["diffusion"] == pytest.approx(2.0, rel=0.1)


# ----------------------------------------------------------------------------------------------
# API


def test_api_fast_flag_and_metadata(tmp_path):
    from conftest import fixture_checkpoint

    from unipic_jax import api, images

    pipe = api.UniPicPipeline.from_pretrained(fixture_checkpoint(tmp_path))
    size = pipe.config.mar.img_size
    faithful = pipe.generate("a fox", size=size, steps=4, seed=1, progress=False)[0]
    quick = pipe.generate("a fox", size=size, steps=4, seed=1, progress=False, fast=True)[0]
    again = pipe.generate("a fox", size=size, steps=4, seed=1, progress=False, fast=True)[0]
    assert faithful.info["fast"] is False and "fast_settings" not in faithful.info
    assert quick.info["fast"] is True and quick.info["fast_steps"] == fast.FAST.num_iter(4)
    assert fast.FastSettings.from_dict(quick.info["fast_settings"]) == fast.FAST
    np.testing.assert_array_equal(np.asarray(quick), np.asarray(again))
    path = images.save_image(quick, tmp_path / "fast.png", quick.info)
    stored = images.read_metadata(path)
    assert stored["fast"] == "true" and fast.FastSettings.from_dict(json.loads(stored["fast_settings"])) == fast.FAST
    edited = pipe.edit(faithful, "make it blue", size=size, steps=2, seed=0, progress=False, fast=True)
    assert edited.info["fast"] is True and edited.size == (size, size)
