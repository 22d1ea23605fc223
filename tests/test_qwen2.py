"""Qwen2.5 decoder: fixture parity layer by layer, RoPE, the KV-cache calls, live comparison with
transformers' PyTorch Qwen2ForCausalLM, and the checkpoint mapping (round trip, errors, full-size
layout, Hugging Face folders).

Bounds: forward passes are compared at 1e-4 x max|ref| (float32 rounding of the reference itself is
below 1e-5 x max|ref|, fixtures precision_summary.json); gathers and transposes are exact.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from configs import unipic_1p5b
from convert.core import TRANSFORMS, ConversionError, flatten
from convert.qwen2 import (QWEN2_KEYMAP, qwen2_config_from_hf, qwen2_from_hf_folder, qwen2_param_shapes,
                           qwen2_params_from_torch, qwen2_params_to_torch)
from unipic_jax.models.qwen2 import (KVCache, Qwen2, Qwen2Config, Qwen2DecoderLayer, RMSNorm, apply_rope,
                                     positions_from_mask, rope_cos_sin, rope_inv_freq)
from unipic_jax.parity import FORWARD
from unipic_jax.parity import qwen2 as qwen2_parity

from conftest import FIXTURE_ROOT, fixture


def assert_close(got, ref, rel, what):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    err, bound = np.max(np.abs(got - ref)), rel * np.max(np.abs(ref))
    assert err <= bound, f"{what}: max|err| {err:.3e} > {bound:.3e} ({rel} x max|ref|)"


# ---------------------------------------------------------------------------------------------
# Tiny random Hugging Face models, weights drawn like the fixtures' (every parameter non-trivial).

def hf_qwen2(seed, *, vocab=256, hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, tied=True):
    """(torch Qwen2ForCausalLM in float32 eval mode with eager attention, our config, our params)."""
    cfg = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=tied, max_position_embeddings=32768, attn_implementation="eager")
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1 + 0.2 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise * 2 / hidden ** 0.5)
            elif p.ndim == 2:
                p.copy_(noise / p.shape[1] ** 0.5)
            else:
                p.copy_(0.1 * noise)
    config = qwen2_config_from_hf(cfg.to_dict())
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    return model, config, qwen2_params_from_torch(sd, config)


# ---------------------------------------------------------------------------------------------
# Fixture parity, layer by layer.

@pytest.fixture(scope="module")
def fx_model():
    fx = fixture("qwen2")
    model, variables = qwen2_parity.load(fx)
    return fx, model, variables


def _fixture_inputs(fx):
    ids, mask = fx.io["input_ids"], fx.io["attention_mask"]
    b, length = ids.shape
    return ids, mask, jnp.broadcast_to(jnp.arange(length), (b, length))


def test_embeddings_are_hidden_states_0(fx_model):
    fx, model, variables = fx_model
    ids, _, _ = _fixture_inputs(fx)
    x = model.apply(variables, ids, method=Qwen2.embed)
    # A row gather copies values: exact.
    np.testing.assert_array_equal(np.asarray(x), fx.io["padded/hidden_states/0"])


def test_each_layer_then_final_norm(fx_model):
    fx, model, variables = fx_model
    _, mask, positions = _fixture_inputs(fx)
    cfg = model.config
    states = [fx.io[f"padded/hidden_states/{i}"] for i in range(cfg.num_layers + 1)]
    cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta))
    b, length = mask.shape
    mask_bts = np.tril(np.ones((length, length), bool))[None] & mask.astype(bool)[:, None, :]
    for i in range(cfg.num_layers):
        layer_vars = {"params": variables["params"][f"layers_{i}"]}
        out, _ = Qwen2DecoderLayer(cfg).apply(layer_vars, jnp.asarray(states[i]), cos, sin, mask_bts)
        if i == cfg.num_layers - 1:  # HF replaces the last layer's output with the final-norm output
            out = RMSNorm(cfg.rms_eps).apply({"params": variables["params"]["norm"]}, out)
        # One block on the reference's own input: forward bound.
        assert_close(out, states[i + 1], FORWARD, f"layer {i}")


def test_logits_from_last_hidden_state(fx_model):
    fx, model, variables = fx_model
    logits = model.apply(variables, jnp.asarray(fx.io["padded/last_hidden_state"]), method=Qwen2.logits)
    # One matmul against the tied embedding: forward bound.
    assert_close(logits, fx.io["padded/logits"], FORWARD, "logits")


def test_fixture_rows_hold(fx_model):
    fx, _, _ = fx_model
    # Every padded/* and cache/* output, each at the forward bound (see unipic_jax/parity).
    rows = list(qwen2_parity.rows(fx))
    steps = {r.output.split("/")[1] for r in rows if r.output.startswith("cache/step")}
    assert steps, "no cache/step* rows found"
    bad = [f"{r.output}: {r.max_abs_err:.3e} > {r.bound:.3e}" for r in rows if not r.ok]
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------------------------------------
# RoPE.

def test_rope_matches_direct_rotation():
    rng = np.random.default_rng(0)
    head_dim, theta = 32, 1e6
    x = rng.standard_normal((2, 6, 3, head_dim)).astype(np.float32)
    positions = rng.integers(0, 1024, (2, 6))
    inv_freq = rope_inv_freq(head_dim, theta)
    got = apply_rope(jnp.asarray(x), *rope_cos_sin(jnp.asarray(positions), inv_freq))
    # Direct formula in float64: dims (j, j + head_dim/2) rotate by the angle position * inv_freq[j].
    angle = positions[..., None, None].astype(np.float64) * inv_freq.astype(np.float64)
    x1, x2 = x[..., :head_dim // 2].astype(np.float64), x[..., head_dim // 2:].astype(np.float64)
    want = np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1)
    # float32 angles at positions < 1024 err by ~1024 * 6e-8 rad: well inside the forward bound.
    assert_close(got, want, FORWARD, "rope")


def test_rope_inv_freq_matches_reference_buffer():
    info = fixture("unipic").meta["bf16"]["rope_inv_freq"]
    tiny = info["tiny"]
    # The float32 table and its bf16 rounding (what model.to(bfloat16) leaves in the reference): exact.
    np.testing.assert_array_equal(rope_inv_freq(tiny["head_dim"], tiny["rope_theta"]),
                                  np.float32(tiny["inv_freq_float32"]))
    np.testing.assert_array_equal(rope_inv_freq(tiny["head_dim"], tiny["rope_theta"], "bfloat16"),
                                  np.float32(tiny["inv_freq_after_cast"]))
    full = info["full_size"]
    exact = rope_inv_freq(full["head_dim"], full["rope_theta"])
    rounded = rope_inv_freq(full["head_dim"], full["rope_theta"], "bfloat16")
    assert int(np.sum(rounded != exact)) == full["num_values_changed"]
    np.testing.assert_allclose(np.max(np.abs(rounded - exact) / exact), full["max_rel_change"], rtol=1e-6)


def test_rope_inv_freq_dtype_knob_reaches_the_model(fx_model):
    fx, model, variables = fx_model
    x = jnp.asarray(fx.io["x_new2"])
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]) * 97, x.shape[:2])  # large angles
    rounded = Qwen2(Qwen2Config(**{**fx.config().qwen2, "rope_inv_freq_dtype": "bfloat16"}))
    a = model.apply(variables, x, positions).last_hidden_state
    b = rounded.apply(variables, x, positions).last_hidden_state
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3, "rounding inv_freq to bf16 changed nothing"


# ---------------------------------------------------------------------------------------------
# The cache calls.

def test_decode_equals_peek_and_appends(fx_model):
    fx, model, variables = fx_model
    run = jax.jit(model.apply, static_argnames=("method",))
    ids, mask, positions = _fixture_inputs(fx)
    x_prompt = run(variables, ids, method=Qwen2.embed)
    x1, x2 = jnp.asarray(fx.io["x_new"]), jnp.asarray(fx.io["x_new2"])
    b, length = ids.shape
    l1, l2 = x1.shape[1], x2.shape[1]
    cache = KVCache.create(model.config, b, length + l1 + l2)
    _, cache = run(variables, cache, x_prompt, positions, mask, method=Qwen2.prefill)
    assert int(cache.length) == length
    np.testing.assert_array_equal(cache.valid[:, :length], mask.astype(bool))

    pos1 = cache.next_positions(l1)
    np.testing.assert_array_equal(pos1, fx.io["cache/step1/position_ids"])  # the reference's rule
    peeked = run(variables, cache, x1, pos1, method=Qwen2.peek)
    decoded, cache1 = run(variables, cache, x1, pos1, method=Qwen2.decode)
    # Same attention, same operations: equal up to float32 rounding.
    assert_close(decoded.last_hidden_state, peeked.last_hidden_state, FORWARD, "decode vs peek")
    assert int(cache1.length) == length + l1
    assert bool(jnp.all(cache1.valid[:, length:length + l1])) and not bool(jnp.any(cache1.valid[:, length + l1:]))

    # Two decodes == one cache-free forward over [prompt ; x1 ; x2] with the reference's positions.
    second, _ = run(variables, cache1, x2, cache1.next_positions(l2), method=Qwen2.decode)
    full_mask = jnp.concatenate([jnp.asarray(mask, bool), jnp.ones((b, l1 + l2), bool)], axis=1)
    full = run(variables, jnp.concatenate([x_prompt, x1, x2], axis=1), positions_from_mask(full_mask),
                       full_mask)
    assert_close(second.last_hidden_state, full.last_hidden_state[:, -l2:], FORWARD, "decode vs forward")
    assert_close(decoded.last_hidden_state, full.last_hidden_state[:, length:length + l1], FORWARD,
                 "first decode vs forward")


# ---------------------------------------------------------------------------------------------
# Live comparison with transformers (PyTorch, eager attention, float32).

@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (6, 2)])
def test_matches_transformers_long_padded_batch(heads, kv_heads):
    hf, config, params = hf_qwen2(1 + kv_heads, hidden=48, heads=heads, kv_heads=kv_heads)
    valid = [576, 540, 513]  # RoPE bugs hide in short prompts: every row is longer than 512
    length = max(valid)
    rng = np.random.default_rng(kv_heads)
    ids = rng.integers(0, config.vocab_size, (len(valid), length))
    mask = (np.arange(length)[None] < np.array(valid)[:, None]).astype(np.int64)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
    model = Qwen2(config)
    positions = jnp.broadcast_to(jnp.arange(length), ids.shape)  # HF default with no position_ids
    x = model.apply({"params": params}, ids, method=Qwen2.embed)
    out = jax.jit(lambda p, x, m: model.apply({"params": p}, x, positions, m, return_hidden_states=True,
                                              return_logits=True))(params, x, mask)
    for i, (got, want) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True)):
        assert_close(got, want.numpy(), FORWARD, f"hidden_states/{i}")
    assert_close(out.logits, ref.logits.numpy(), FORWARD, "logits")


# ---------------------------------------------------------------------------------------------
# Checkpoint mapping.

def test_round_trip_is_bit_identical():
    hf, config, params = hf_qwen2(7)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    back = qwen2_params_to_torch(params, config)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert back[key].tobytes() == value.tobytes(), f"{key} changed in the round trip"
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_untied_head_round_trip():
    hf, config, params = hf_qwen2(8, tied=False)
    assert not config.tie_embeddings and "lm_head" in params
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    back = qwen2_params_to_torch(params, config)
    assert set(back) == set(sd) and all(back[k].tobytes() == sd[k].tobytes() for k in sd)


def test_every_problem_named_at_once():
    _, config, params = hf_qwen2(9)
    sd = qwen2_params_to_torch(params, config)
    del sd["model.norm.weight"]
    sd["model.layers.0.mlp.upproj.weight"] = sd.pop("model.layers.0.mlp.up_proj.weight")
    sd["model.layers.1.self_attn.k_proj.weight"] = sd["model.layers.1.self_attn.k_proj.weight"].T
    with pytest.raises(ConversionError) as err:
        qwen2_params_from_torch(sd, config)
    text = str(err.value)
    for name in ("model.norm.weight", "model.layers.0.mlp.upproj.weight", "model.layers.0.mlp.up_proj.weight",
                 "model.layers.1.self_attn.k_proj.weight"):
        assert name in text, f"{name} not named in:\n{text}"


def test_tied_alias_optional_but_checked():
    _, config, params = hf_qwen2(10)
    sd = qwen2_params_to_torch(params, config)
    without = {k: v for k, v in sd.items() if k != "lm_head.weight"}  # HF safetensors layout
    converted = qwen2_params_from_torch(without, config)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(converted), jax.tree.leaves(params)))
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    with pytest.raises(ConversionError, match="lm_head.weight"):
        qwen2_params_from_torch(sd, config)


def test_full_scale_layout():
    keys = json.loads((FIXTURE_ROOT / "full_scale_keys.json").read_text())["keys"]["llm"]
    config = Qwen2Config(**unipic_1p5b.get_config().qwen2)
    want = {path: leaf.shape for path, leaf in flatten(qwen2_param_shapes(config)).items()}
    filled = {}
    for entry in keys:
        key, shape = entry["key"].removeprefix("llm."), tuple(entry["shape"])
        if key in QWEN2_KEYMAP.tied:
            assert shape == tuple(next(e["shape"] for e in keys if e["key"] == "llm." + QWEN2_KEYMAP.tied[key]))
            continue
        hit = QWEN2_KEYMAP.to_flax(key)
        assert hit is not None, f"{key} has no rule"
        path, rule = hit
        # A zero-stride view gives the transformed shape without allocating anything.
        flax_shape = TRANSFORMS[rule.transform].to_flax(np.broadcast_to(np.float32(0), shape)).shape
        assert path in want, f"{key} -> {path}: no such param"
        assert flax_shape == want[path], f"{key} -> {path}: {flax_shape} != {want[path]}"
        filled[path] = key
    assert set(filled) == set(want), f"params no key fills: {sorted(set(want) - set(filled))}"


def test_hf_folder(tmp_path):
    hf, config, params = hf_qwen2(11)
    hf.save_pretrained(tmp_path / "qwen", safe_serialization=True)
    loaded_config, loaded = qwen2_from_hf_folder(tmp_path / "qwen")
    assert loaded_config == config
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)

    cfg_path = tmp_path / "qwen" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["intermediate_size"] += 1
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="intermediate_size"):
        qwen2_from_hf_folder(tmp_path / "qwen")
