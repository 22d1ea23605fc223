"""Text generation: greedy ids equal transformers' `generate`, EOS stopping, one compile per bucket,
reproducible sampling, the HF logits processors, and the image-to-text fixture (unipic/i2t).

Bounds: ids and lengths are integers, compared exactly; per-step logits are single forward passes
through the cache, compared at 1e-4 x max|ref| (FORWARD).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from convert.qwen2 import qwen2_params_from_torch
from unipic_jax.models.qwen2 import Qwen2, Qwen2Config
from unipic_jax.parity import FORWARD
from unipic_jax.sampling import text

from conftest import fixture
from test_qwen2 import assert_close, hf_qwen2

VALID = [23, 17]  # prompt lengths of the two rows


@pytest.fixture(scope="module")
def tiny():
    """A tiny random HF model, ours, and a right-padded batch of prompt embeddings."""
    hf, config, params = hf_qwen2(21, vocab=128, hidden=48, heads=4, kv_heads=2)
    rng = np.random.default_rng(5)
    length = max(VALID)
    embeds = (rng.standard_normal((len(VALID), length, config.hidden_size)) * 0.5).astype(np.float32)
    mask = np.arange(length)[None] < np.array(VALID)[:, None]
    embeds[~mask] = 0.0
    return hf, Qwen2(config), params, embeds, mask


def hf_generate(hf, embeds, mask, **kwargs):
    """transformers' generate on the same prompts, left-padded (its supported layout; the new
    tokens get the same positions as our right-padded rows)."""
    b, length, d = embeds.shape
    left = np.zeros_like(embeds)
    left_mask = np.zeros(mask.shape, np.int64)
    for row, n in enumerate(mask.sum(1)):
        left[row, length - n:] = embeds[row, :n]
        left_mask[row, length - n:] = 1
    with torch.no_grad():
        out = hf.generate(inputs_embeds=torch.from_numpy(left), attention_mask=torch.from_numpy(left_mask),
                          do_sample=False, return_dict_in_generate=True, output_logits=True, **kwargs)
    return out.sequences.numpy(), np.stack([l.numpy() for l in out.logits], axis=1)


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty` with `inputs_embeds`")  # the intended case
@pytest.mark.parametrize("penalty", [1.0, 1.1])
def test_greedy_matches_hf_generate(tiny, penalty):
    hf, model, params, embeds, mask = tiny
    n = 12
    want_ids, want_logits = hf_generate(hf, embeds, mask, max_new_tokens=n, eos_token_id=None, pad_token_id=0,
                                        repetition_penalty=penalty)
    got = text.generate(model, params, embeds, mask, max_new_tokens=n, eos_id=-1, pad_id=0,
                        repetition_penalty=penalty, return_logits=True)
    np.testing.assert_array_equal(np.asarray(got.ids), want_ids)
    np.testing.assert_array_equal(np.asarray(got.lengths), [n, n])
    for t in range(n):
        assert_close(got.logits[:, t], want_logits[:, t], FORWARD, f"step {t} logits")


def test_eos_stops_rows(tiny):
    hf, model, params, embeds, mask = tiny
    n = 10
    free = text.generate(model, params, embeds, mask, max_new_tokens=n, eos_id=-1, pad_id=0)
    # Pick as EOS a token row 0 emits at step 3 and that no row emits earlier.
    ids = np.asarray(free.ids)
    eos = int(ids[0, 3])
    assert eos not in ids[:, :3], "pick another step: the token appears earlier"
    want_ids, _ = hf_generate(hf, embeds, mask, max_new_tokens=n, eos_token_id=eos, pad_token_id=0)
    got = text.generate(model, params, embeds, mask, max_new_tokens=n, eos_id=eos, pad_id=0, return_logits=True)
    got_ids = np.asarray(got.ids)
    stop = want_ids.shape[1]  # HF stops once every row is done
    np.testing.assert_array_equal(got_ids[:, :stop], want_ids)
    assert np.all(got_ids[:, stop:] == 0), "slots after the stop must hold pad_id"
    np.testing.assert_array_equal(got_ids[0, :4], ids[0, :4])
    assert int(got.lengths[0]) == 4 and np.all(got_ids[0, 4:] == 0)
    for row in range(len(VALID)):
        hit = np.flatnonzero(got_ids[row] == eos)
        assert int(got.lengths[row]) == (hit[0] + 1 if hit.size else n)
    # Row 0 alone stops at step 3: the loop exits there, recording no logits after it.
    alone = text.generate(model, params, embeds[:1], mask[:1], max_new_tokens=n, eos_id=eos, pad_id=0,
                          return_logits=True)
    np.testing.assert_array_equal(np.asarray(alone.ids), got_ids[:1])
    assert np.any(np.asarray(alone.logits)[:, 3]) and not np.any(np.asarray(alone.logits)[:, 4:])


def test_one_compile_per_bucket(tiny):
    _, model, params, embeds, mask = tiny
    n = 7  # a max_new_tokens no other test uses, so the first call below must trace
    kwargs = dict(max_new_tokens=n, eos_id=-1, pad_id=0, bucket=32, return_logits=True)
    before = text.TRACES["generate"]
    a = text.generate(model, params, embeds, mask, **kwargs)
    assert text.TRACES["generate"] == before + 1
    # Another prompt length in the same bucket (32): no new trace.
    b = text.generate(model, params, embeds[:, :20], mask[:, :20], **kwargs)
    assert text.TRACES["generate"] == before + 1
    # Bucketing pads the prompt and masks the padding: the result does not depend on the bucket.
    exact = text.generate(model, params, embeds, mask, **{**kwargs, "bucket": 1})
    assert text.TRACES["generate"] == before + 2
    np.testing.assert_array_equal(np.asarray(a.ids), np.asarray(exact.ids))
    assert_close(a.logits, exact.logits, FORWARD, "bucketed vs exact-length logits")
    assert b.ids.shape == a.ids.shape


def test_sampling_reproducible_from_a_key(tiny):
    _, model, params, embeds, mask = tiny
    kwargs = dict(max_new_tokens=16, eos_id=-1, pad_id=0, temperature=2.0, top_k=50, top_p=0.95)
    a = text.generate(model, params, embeds, mask, rng=jax.random.key(1), **kwargs)
    b = text.generate(model, params, embeds, mask, rng=jax.random.key(1), **kwargs)
    c = text.generate(model, params, embeds, mask, rng=jax.random.key(2), **kwargs)
    np.testing.assert_array_equal(np.asarray(a.ids), np.asarray(b.ids))
    assert not np.array_equal(np.asarray(a.ids), np.asarray(c.ids)), "two keys gave the same 32 tokens"
    # top_k = 1 leaves only the argmax: sampling reduces to greedy.
    greedy = text.generate(model, params, embeds, mask, max_new_tokens=16, eos_id=-1, pad_id=0)
    top1 = text.generate(model, params, embeds, mask, rng=jax.random.key(3), **{**kwargs, "top_k": 1})
    np.testing.assert_array_equal(np.asarray(top1.ids), np.asarray(greedy.ids))


@pytest.mark.parametrize("top_k,top_p", [(0, 0.7), (5, 1.0), (20, 0.5)])
def test_warpers_match_hf(top_k, top_p):
    scores = np.random.default_rng(top_k).standard_normal((3, 64)).astype(np.float32) * 3
    settings = text._Settings(max_new_tokens=1, eos_id=0, pad_id=0, sample=True, temperature=0.7, top_k=top_k,
                              top_p=top_p, repetition_penalty=1.0, return_logits=False)
    got = np.asarray(text._warp(jnp.asarray(scores), settings))
    want = torch.from_numpy(scores)
    processors = [transformers.TemperatureLogitsWarper(0.7)]
    if top_k:
        processors.append(transformers.TopKLogitsWarper(top_k))
    if top_p < 1:
        processors.append(transformers.TopPLogitsWarper(top_p))
    for proc in processors:
        want = proc(None, want)
    want = want.numpy()
    # Same tokens removed (exact), the kept ones scaled alike (a division: float32 rounding).
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6)


def test_repetition_penalty_matches_hf():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((2, 32)).astype(np.float32)
    seen_ids = rng.integers(0, 32, (2, 6))
    seen = np.zeros((2, 32), bool)
    np.put_along_axis(seen, seen_ids, True, axis=1)
    want = transformers.RepetitionPenaltyLogitsProcessor(1.1)(torch.from_numpy(seen_ids), torch.from_numpy(scores))
    got = text._penalise(jnp.asarray(scores), jnp.asarray(seen), 1.1)
    # One multiply or divide per element on both sides: equal to float32 rounding.
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-6)


def test_image_to_text_fixture():
    fx = fixture("unipic")
    cfg = fx.config()
    config = Qwen2Config(**cfg.qwen2)
    params = qwen2_params_from_torch({k[4:]: v for k, v in fx.weights.items() if k.startswith("llm.")}, config)
    case, meta = fx.file("i2t"), fx.meta["cases"]["i2t"]
    n = meta["max_new_tokens"]
    kwargs = dict(max_new_tokens=n, eos_id=meta["eos_token_id"], pad_id=meta["pad_token_id"], return_logits=True)
    got = text.generate(Qwen2(config), params, case["inputs_embeds"], **kwargs)
    np.testing.assert_array_equal(np.asarray(got.ids), case["generated_ids"])
    # Each step is one forward through the cache: forward bound, step by step.
    for t in range(n):
        assert_close(got.logits[:, t], case["step_logits"][:, t], FORWARD, f"i2t step {t} logits")
    forced = text.generate(Qwen2(config), params, case["inputs_embeds"], forced_ids=case["generated_ids"], **kwargs)
    assert_close(forced.logits, case["step_logits"], FORWARD, "teacher-forced i2t logits")
