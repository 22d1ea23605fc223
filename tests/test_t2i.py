"""The text-to-image / editing sampler: one MAR step against a recorded step, whole recorded calls
replayed, the bucketing (its grouping, and that padding changes nothing), one compile per shape,
key-driven sampling, cfg == 1 and the linear schedule. Sizes from unipic/meta.json.

Bounds: a step's encoder/LLM/decoder side is one forward pass from recorded inputs: FORWARD
(1e-4 x max|ref|). Anything after a diffusion chain (100 random-weight reverse steps that amplify
rounding, sampled values reach ~1e3) is a chain: CHAIN (1e-3 x max|ref|). Masks and orders exact.
The whole-call replays here run the most padded design (`Buckets(1, 1)`: one program of each kind,
every step padded to the largest count); test_parity runs the default.
"""

import itertools
import random

import jax
import numpy as np
import pytest

from unipic_jax.models import diffusion
from unipic_jax.parity import CHAIN, FORWARD, draws
from unipic_jax.parity import unipic as unipic_parity
from unipic_jax.sampling import t2i
from unipic_jax.sampling.schedule import mask_schedule

from conftest import fixture

FX = fixture("unipic")
CASE = FX.meta["cases"]["t2i"]
PADDED = t2i.Buckets(1, 1)


@pytest.fixture(scope="module")
def loaded():
    return unipic_parity.load(FX)


def _close(got, ref, rel, what):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    err, bound = np.max(np.abs(got - ref)), rel * np.max(np.abs(ref))
    assert err <= bound, f"{what}: max err {err:.3e} > {bound:.3e}"


def _recorded_draws(model, case):
    tensors, kwargs = FX.file(case), FX.meta["cases"][case]["kwargs"]
    m, n = kwargs["image_shape"]
    steps = mask_schedule(m * n, kwargs["num_iter"])
    batch = tensors["input_ids"].shape[0] // 2
    return steps, t2i.prepare_draws_from_fixture(
        draws(tensors, ""), batch=batch, steps=steps, guided=True,
        num_diffusion_steps=diffusion.sampling_schedule(model.config.diffusion).num_steps)


def test_one_step_against_recorded_step(loaded):
    """The middle step of the t2i case, fed the recorded tokens_in, orders and draws."""
    model, params = loaded
    tensors, kwargs = FX.file("t2i"), CASE["kwargs"]
    steps, recorded = _recorded_draws(model, "t2i")
    step = steps[len(steps) // 2]
    assert step.visible > 0 and step.predicted > 1
    s, image_shape = step.index, tuple(kwargs["image_shape"])
    rows = tensors["input_ids"].shape[0]
    ids, mask = t2i._pad_ids(tensors["input_ids"], tensors["attention_mask"], 64, model.config.tokens.eos)
    _, cache = t2i._prefill(model, params, t2i._embed(model, params, ids), mask)
    tokens = tensors[f"step{s}/tokens_in"].reshape(rows, -1, model.config.mar.token_dim)
    counts = np.array([step.masked, step.mask_len], np.int32)
    plan = t2i._ConditionPlan(image_shape, step.visible, step.predicted, False, True, True)
    z, seen = t2i._condition(model, plan, params, tokens, recorded.orders, cache, None, counts)
    np.testing.assert_array_equal(np.asarray(seen["mask_in"]), tensors[f"step{s}/mask_in"])
    for name in ("llm_last_hidden_state", "x_enc", "z_dec"):
        _close(seen[name], tensors[f"step{s}/{name}"], FORWARD, f"step {s} {name}")
    new, out = t2i._predict(model, t2i._PredictPlan(step.predicted, True, True), params,
                            t2i._tables(model.config.diffusion), tokens, z, recorded.orders, counts,
                            recorded.noise_init[s], recorded.step_noise[s], np.float32(kwargs["cfg"]),
                            np.float32(kwargs["temperature"]))
    _close(out["z_sel"], tensors[f"step{s}/z_sel"], FORWARD, f"step {s} z_sel")
    _close(out["sampled"], tensors[f"step{s}/sampled"], CHAIN, f"step {s} sampled")
    _close(np.asarray(new).reshape(tensors[f"step{s + 1}/tokens_in"].shape), tensors[f"step{s + 1}/tokens_in"],
           CHAIN, f"tokens after step {s}")


@pytest.mark.parametrize("case", ["t2i", "edit"])
def test_whole_call_replayed(loaded, case):
    out = unipic_parity.replay(FX, case, buckets=PADDED)
    tensors = FX.file(case)
    np.testing.assert_array_equal(np.asarray(out.orders), tensors["orders_returned"][: out.orders.shape[0]])
    for s, captured in enumerate(out.steps):
        np.testing.assert_array_equal(np.asarray(captured["mask_in"]), tensors[f"step{s}/mask_in"])
        for name in unipic_parity.STEP_OUTPUTS:
            _close(captured[name], tensors[f"step{s}/{name}"], CHAIN, f"{case} step {s} {name}")
    _close(out.prefix_hidden, tensors["prefix_last_hidden_state"], FORWARD, "prompt pass")
    _close(out.tokens, tensors["tokens_final"], CHAIN, "tokens_final")
    _close(unipic_parity.nchw(out.images), tensors["pred"], CHAIN, "pred")


def _brute_force_padding(sizes, runs):
    values = sorted(set(sizes))
    best = None
    for cuts in itertools.combinations(range(1, len(values)), min(runs, len(values)) - 1):
        bounds = [0, *cuts, len(values)]
        slot = {v: values[b - 1] for a, b in zip(bounds, bounds[1:]) for v in values[a:b]}
        waste = sum(slot[x] - x for x in sizes)
        best = waste if best is None else min(best, waste)
    return best


def test_grouping_pads_least():
    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.randint(0, 40) for _ in range(rng.randint(1, 9))]
        runs = rng.randint(1, 5)
        slots = t2i._group(sizes, runs)
        assert len(set(slots.values())) <= runs and all(slots[x] >= x for x in sizes)
        assert sum(slots[x] - x for x in sizes) == _brute_force_padding(sizes, runs), (sizes, runs)
    steps = mask_schedule(256, 16)
    assert t2i.EXACT.slots(steps) == [(s.visible, s.predicted) for s in steps]
    assert {len(set(col)) for col in zip(*t2i.Buckets(3, 4).slots(steps))} == {3, 4}


def _prompt(model, rows, length, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, model.config.tokens.image - 10, (rows, length))
    mask = np.ones((rows, length), bool)
    mask[rows // 2:, length // 2:] = False
    return ids, mask


def test_second_call_compiles_nothing(loaded):
    model, params = loaded
    kwargs = dict(image_shape=(3, 5), num_iter=3, cfg=2.0, buckets=t2i.Buckets(2, 1))  # used by no other test
    before = dict(t2i.TRACES)
    first = t2i.text_to_image(model, params, *_prompt(model, 2, 7, 0), key=jax.random.key(0), **kwargs)
    traced = {k: v - before.get(k, 0) for k, v in t2i.TRACES.items()}
    assert traced["condition"] == 2 and traced["predict"] == 1 and traced["decode"] == 1, traced
    # Another prompt (other ids and length, same bucket), another key: nothing traces again.
    after, seen = dict(t2i.TRACES), []
    second = t2i.text_to_image(model, params, *_prompt(model, 2, 11, 1), key=jax.random.key(1),
                               on_step=lambda k, tokens: seen.append((k, tokens.shape)), **kwargs)
    assert dict(t2i.TRACES) == after
    m, n = kwargs["image_shape"]
    assert seen == [(k, (2, m * n, model.config.mar.token_dim)) for k in range(kwargs["num_iter"])]
    assert not np.allclose(np.asarray(first.images), np.asarray(second.images))


KEY_RUN = dict(image_shape=(4, 4), num_iter=2, buckets=PADDED)  # shared by the key-driven tests


def test_key_sampling_is_deterministic_and_bucket_free(loaded):
    """One key gives one image; padding buckets change the programs, not the result."""
    model, params = loaded
    ids, mask = _prompt(model, 2, 9, 2)
    a = t2i.text_to_image(model, params, ids, mask, key=jax.random.key(5), temperature=0.9, **KEY_RUN)
    b = t2i.text_to_image(model, params, ids, mask, key=jax.random.key(5), temperature=0.9, **KEY_RUN)
    c = t2i.text_to_image(model, params, ids, mask, key=jax.random.key(6), temperature=0.9, **KEY_RUN)
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    assert not np.allclose(np.asarray(a.images), np.asarray(c.images))
    assert np.all(np.isfinite(np.asarray(a.images)))
    exact = t2i.text_to_image(model, params, ids, mask, key=jax.random.key(5), temperature=0.9,
                              **{**KEY_RUN, "buckets": t2i.EXACT})
    # The same draws through other shapes: float32 reduction order only, along a chain.
    _close(exact.tokens, a.tokens, CHAIN, "bucketed vs exact tokens")


def test_cfg_one_and_linear_schedule(loaded):
    """cfg == 1: only cond rows, no guidance; the linear schedule runs with its per-step scales."""
    model, params = loaded
    ids, mask = _prompt(model, 2, 6, 3)
    out = t2i.text_to_image(model, params, ids, mask, cfg=1.0, key=jax.random.key(0), **KEY_RUN)
    assert out.images.shape[0] == 2 and out.tokens.shape[0] == 2
    assert np.all(np.isfinite(np.asarray(out.images)))
    # Unguided draws: one x_T row per predicted token, no uncond half.
    num_tokens = KEY_RUN["image_shape"][0] * KEY_RUN["image_shape"][1]
    steps = mask_schedule(num_tokens, KEY_RUN["num_iter"])
    unguided = t2i.draws_from_key(jax.random.key(0), batch=2, num_tokens=num_tokens, steps=steps,
                                  token_dim=model.config.mar.token_dim, num_diffusion_steps=3, guided=False)
    assert [x.shape[1] for x in unguided.step_noise] == [2 * s.predicted for s in steps]
    constant = t2i.text_to_image(model, params, ids, mask, key=jax.random.key(0), **KEY_RUN)
    linear = t2i.text_to_image(model, params, ids, mask, cfg_schedule="linear", key=jax.random.key(0), **KEY_RUN)
    assert linear.images.shape[0] == 1 and np.all(np.isfinite(np.asarray(linear.images)))
    assert not np.allclose(np.asarray(linear.images), np.asarray(constant.images))  # the scales reached the head
    with pytest.raises(ValueError, match="cfg_schedule"):
        t2i.text_to_image(model, params, ids, mask, cfg_schedule="cosine", key=jax.random.key(0), **KEY_RUN)


def test_recorded_draws_are_checked(loaded):
    model, _ = loaded
    tensors = FX.file("t2i")
    steps, _ = _recorded_draws(model, "t2i")
    recorded = draws(tensors, "")
    T = diffusion.sampling_schedule(model.config.diffusion).num_steps
    with pytest.raises(ValueError, match="recorded draws"):
        t2i.prepare_draws_from_fixture(recorded[:-1], batch=1, steps=steps, num_diffusion_steps=T, guided=True)
    with pytest.raises(ValueError, match="not permutations"):
        t2i.prepare_draws_from_fixture([recorded[0] * 0] + recorded[1:], batch=1, steps=steps,
                                       num_diffusion_steps=T, guided=True)
