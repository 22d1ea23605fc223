"""The UniPic composition, piece by piece: its config, the VAE/MAR parts, the buffer reorder, the
MAR <-> LLM bridge (cached, cache-free and padded), the prompt splice, image-to-text on both
feature paths, the training forward, and the whole-model key table (round trip, error report,
release folder, full-size layout). Sizes come from unipic/meta.json.

Bounds: FORWARD (1e-4 x max|ref|) for single forward passes, as everywhere (the reference's own
float32-vs-float64 spread is ~1e-6 of max|ref|, meta.json precision); same-model comparisons that
only reorder float32 reductions use 1e-5 x max.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import unipic_1p5b
from convert.core import TRANSFORMS, ConversionError, flatten
from convert.hf import save_hf_folder
from convert.io import CheckpointFileError
from convert.unipic import load_release, unipic_keymap, unipic_params_from_torch, unipic_params_to_torch
from unipic_jax.models.qwen2 import KVCache
from unipic_jax.models.projectors import MLPProjector
from unipic_jax.models.unipic import (UniPic, UniPicConfig, buffer_first, buffer_last, param_shapes,
                                      splice_image_features)
from unipic_jax.parity import FORWARD, format_row
from unipic_jax.parity import unipic as unipic_parity
from unipic_jax.sampling import caption

from conftest import FIXTURE_ROOT, fixture

FX = fixture("unipic")
REORDER = 1e-5  # same model, same math, only the float32 reduction order differs


@pytest.fixture(scope="module")
def loaded():
    return unipic_parity.load(FX)


def _close(got, ref, rel, what):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    err, bound = np.max(np.abs(got - ref)), rel * np.max(np.abs(ref))
    assert err <= bound, f"{what}: max err {err:.3e} > {bound:.3e}"


def _apply(loaded, method, *arrays):
    """`model.apply(..., method=method)` jitted: arrays traced; sizes go in through `method`'s closure."""
    model, params = loaded
    return jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=method))(params, *arrays)


def _rows_hold(rows):
    rows = list(rows)
    assert rows, "nothing compared"
    bad = [format_row(r) for r in rows if not r.ok]
    assert not bad, "\n".join(bad)
    return rows


# ---------------------------------------------------------------------------------------------
# Config


def test_config_takes_every_section():
    config = UniPicConfig.from_config(unipic_1p5b.get_config())
    assert {f.name for f in dataclasses.fields(UniPicConfig)} == {
        "vae", "vae_scale", "mar", "diffusion", "qwen2", "siglip", "projectors", "tokens"}
    assert config.buffer_size == 64 and config.tokens.image == 151665


def test_inconsistent_config_names_both_sides():
    cfg = unipic_1p5b.get_config()
    cfg.projectors.llm_dim = 1024
    cfg.diffusion.cond_dim = 7
    with pytest.raises(ValueError) as e:
        UniPicConfig.from_config(cfg)
    assert "projectors.llm_dim=1024 but qwen2.hidden_size=1536" in str(e.value)
    assert "diffusion.cond_dim=7 but mar.decoder_dim=1280" in str(e.value)


# ---------------------------------------------------------------------------------------------
# The parts (one forward each; bound FORWARD)


def test_parts_rows_hold():
    names = {r.output for r in _rows_hold(unipic_parity.part_rows(FX))}
    assert names == {"parts/encode", "parts/extract_x_enc", "parts/extract_z_enc", "parts/decode",
                     "parts/siglip2_proj"}


def test_buffer_reorder():
    buffer, visible, padding = 3, 5, 2
    x = jnp.arange(buffer + visible + padding, dtype=jnp.float32)[None, :, None]
    llm = buffer_last(x, visible, buffer)
    want = np.concatenate([np.arange(buffer, buffer + visible), np.arange(buffer),
                           np.arange(buffer + visible, buffer + visible + padding)])
    np.testing.assert_array_equal(np.asarray(llm)[0, :, 0], want)
    np.testing.assert_array_equal(np.asarray(buffer_first(llm, visible, buffer)), np.asarray(x))
    traced = jax.jit(buffer_last, static_argnums=2)(x, jnp.int32(visible), buffer)
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(llm))


def test_extract_visual_feature_with_a_mask(loaded):
    model, params = loaded
    tokens = FX.file("parts")["encode"]
    b, m, n, _ = tokens.shape
    visible = m * n // 2
    mask = np.ones((b, m * n), np.float32)
    for row in range(b):
        mask[row, np.random.default_rng(row).permutation(m * n)[:visible]] = 0
    x_enc, z_enc = _apply(loaded, lambda mod, t, k: mod.extract_visual_feature(t, k, visible), tokens, mask)
    buffer = model.config.buffer_size
    assert x_enc.shape[1] == z_enc.shape[1] == buffer + visible
    projected = _apply(loaded, lambda mod, x: mod.proj_in(x), x_enc)
    # LLM order: the visible image tokens, then the buffer (a pure reorder: exact).
    np.testing.assert_array_equal(np.asarray(z_enc[:, :visible]), np.asarray(projected[:, buffer:]))
    np.testing.assert_array_equal(np.asarray(z_enc[:, visible:]), np.asarray(projected[:, :buffer]))


def test_bridge_against_recorded_step(loaded):
    """x_enc of a recorded t2i step = MAR encoder(tokens_in, mask_in) + proj_out(recorded LLM
    output moved back to MAR order). One forward from recorded inputs: FORWARD."""
    model, params = loaded
    t2i_io = FX.file("t2i")
    step = len(FX.meta["cases"]["t2i"]["tokens_predicted_per_step"]) - 1  # most tokens visible
    tokens, mask = t2i_io[f"step{step}/tokens_in"], t2i_io[f"step{step}/mask_in"]
    b, m, n, c = tokens.shape
    visible = int(np.sum(mask[0] == 0))
    assert visible > 0
    raw = _apply(loaded, lambda mod, x, k: mod.mar.encode(x, k, visible, (m, n)), tokens.reshape(b, m * n, c), mask)
    got = _apply(loaded, lambda mod, x, h: mod.bridge(x, h, visible), raw, t2i_io[f"step{step}/llm_last_hidden_state"])
    _close(got, t2i_io[f"step{step}/x_enc"], FORWARD, "bridge")


def _prompt(config, rows, length, valid):
    rng = np.random.default_rng(3)
    embeds = rng.standard_normal((rows, length, config.projectors.llm_dim)).astype(np.float32)
    mask = np.arange(length)[None] < np.asarray(valid)[:, None]
    return embeds, mask


def test_cached_encoder_equals_cache_free_path(loaded):
    """The sampler's prefill + peek gives what the training path's single forward over
    `[prompt ; z_enc]` (positions cumsum - 1 past right padding) gives."""
    config = loaded[0].config
    tokens = FX.file("t2i")["step2/tokens_in"]
    mask = FX.file("t2i")["step2/mask_in"]
    b, m, n, c = tokens.shape
    visible = int(np.sum(mask[0] == 0))
    embeds, prompt_mask = _prompt(config, b, 9, [9, 4])
    tokens_blc = tokens.reshape(b, m * n, c)
    want = _apply(loaded, lambda mod, *a: mod.forward_mae_encoder(a[0], a[1], visible, (m, n), *a[2:]),
                  tokens_blc, mask, embeds, prompt_mask)
    _, cache = _apply(loaded, UniPic.prefill, KVCache.create(config.qwen2, b, 16), embeds, prompt_mask)
    positions = np.stack([np.flatnonzero(row == 0) for row in mask])
    got, _ = _apply(loaded, lambda mod, *a: mod.mae_encoder_cached(*a, visible, (m, n)), cache, tokens_blc, positions)
    _close(got, want, REORDER, "cached vs cache-free encoder")


def test_padded_encoder_and_decoder_equal_exact(loaded):
    """Padding slots (sentinel positions m*n) are masked out of the encoder attention, sit after
    the buffer in the LLM and are dropped by the decoder: the real outputs do not change."""
    config = loaded[0].config
    tokens = FX.file("t2i")["step2/tokens_in"]
    mask = FX.file("t2i")["step2/mask_in"]
    b, m, n, c = tokens.shape
    tokens_blc = tokens.reshape(b, m * n, c)
    visible = int(np.sum(mask[0] == 0))
    positions = np.stack([np.flatnonzero(row == 0) for row in mask]).astype(np.int32)
    padded = np.concatenate([positions, np.full((b, 3), m * n, np.int32)], axis=1)
    embeds, prompt_mask = _prompt(config, b, 9, [9, 4])
    _, cache = _apply(loaded, UniPic.prefill, KVCache.create(config.qwen2, b, 16), embeds, prompt_mask)
    # The padded call takes the real count traced, as the sampler does.
    exact, exact_hidden = _apply(loaded, lambda mod, *a: mod.mae_encoder_cached(*a, visible, (m, n)),
                                 cache, tokens_blc, positions)
    pad, pad_hidden = _apply(loaded, lambda mod, *a: mod.mae_encoder_cached(*a, (m, n), padded=True),
                             cache, tokens_blc, padded, jnp.int32(visible))
    kept = config.buffer_size + visible
    _close(pad[:, :kept], exact, REORDER, "padded encoder")
    _close(pad_hidden[:, :kept], exact_hidden, REORDER, "padded LLM")
    decode = lambda x, p: _apply(loaded, lambda mod, *a: mod.mae_decoder(*a, (m, n)), x, p)
    _close(decode(pad, padded), decode(exact, positions), REORDER, "decoder fed padded slots")


def test_splice_image_features():
    ids = np.array([[5, 9, 9, 6, 0], [9, 7, 9, 0, 0]])
    embeds = np.zeros((2, 5, 2), np.float32)
    features = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    out = np.asarray(splice_image_features(embeds, ids, 9, features))
    np.testing.assert_array_equal(out[0, 1:3], features[0])
    np.testing.assert_array_equal(out[1, [0, 2]], features[1])
    assert not out[0, [0, 3, 4]].any() and not out[1, [1, 3, 4]].any()
    with pytest.raises(ValueError, match=r"rows hold \[2, 1\] <image> tokens"):
        splice_image_features(embeds, np.array([[9, 9, 0, 0, 0], [9, 0, 0, 0, 0]]), 9, features)


# ---------------------------------------------------------------------------------------------
# Image-to-text and the training forward (forward passes; bound FORWARD, ids exact)


def test_image_to_text_rows_hold():
    names = {r.output for r in _rows_hold(unipic_parity.i2t_rows(FX))}
    assert {"i2t/generated_ids", "i2t/step_logits", "i2t/prompt_logits", "i2t/z_enc"} <= names


def test_caption_rejects_a_wrong_image_token_count(loaded):
    model, params = loaded
    ids = FX.file("i2t")["input_ids"].copy()
    ids[0, np.flatnonzero(ids[0] == model.config.tokens.image)[0]] = 0  # one <image> id fewer
    with pytest.raises(ValueError, match="the mar path needs"):
        caption.caption(model, params, np.zeros((1, 128, 128, 3), np.float32), ids, max_new_tokens=2)


def test_siglip_caption_path(loaded):
    """SigLIP2 -> siglip2_proj features spliced at the <image> ids. The fixture's siglip2_proj takes
    1152 wide inputs next to a narrower tower (as in the reference, nothing composes them), so
    this config gives siglip2_proj the tower's width and a fresh siglip2_proj."""
    _, fixture_params = loaded
    cfg = FX.config()
    cfg.projectors.siglip_dim = cfg.siglip.hidden_size
    config = UniPicConfig.from_config(cfg)
    model = UniPic(config)
    proj = MLPProjector(config.projectors.llm_dim, config.projectors.llm_dim).init(
        jax.random.key(1), jnp.zeros((1, config.projectors.siglip_dim)))["params"]
    params = {**fixture_params, "siglip2_proj": proj}
    size = config.siglip.image_size
    pixels = np.random.default_rng(0).uniform(-1, 1, (1, size, size, 3)).astype(np.float32)
    count = caption.image_token_count(config, (size, size), "siglip")
    assert count == config.siglip.num_patches
    ids = np.array([caption.expand_image_tokens([3, config.tokens.image, 4], config.tokens.image, count)])
    assert ids.shape[1] == count + 2
    features = caption.image_features(model, params, pixels, "siglip")
    hidden = _apply((model, params), lambda m, x: m.siglip2(x).last_hidden_state, pixels)
    want = _apply((model, params), lambda m, x: m.siglip2_proj(x), hidden)
    _close(features, want, REORDER, "siglip features")
    meta = FX.meta["cases"]["i2t"]  # the i2t settings: the compiled generation loop is shared
    out = caption.caption(model, params, pixels, ids, path="siglip", max_new_tokens=meta["max_new_tokens"],
                          eos_id=meta["eos_token_id"], pad_id=meta["pad_token_id"], return_logits=True)
    assert out.ids.shape == (1, meta["max_new_tokens"]) and np.all(np.isfinite(np.asarray(out.logits)))


def test_training_forward_rows_hold():
    names = {r.output for r in _rows_hold(unipic_parity.train_forward_rows(FX))}
    assert names == {f"t2i_train_forward/{k}" for k in ("gt_latents", "x_enc", "z", "loss")}


# ---------------------------------------------------------------------------------------------
# The key table


def test_round_trip_is_bit_identical(loaded):
    model, params = loaded
    back = unipic_params_to_torch(params, model.config)
    assert sorted(back) == sorted(FX.weights)
    for key, value in FX.weights.items():
        assert back[key].dtype == value.dtype, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    assert set(params) == {"vae", "mar", "diffusion_head", "llm", "proj_in", "proj_out", "siglip2", "siglip2_proj"}


def test_conversion_names_every_problem_at_once(loaded):
    model, _ = loaded
    bad = dict(FX.weights)
    del bad["vae.encoder.conv_in.bias"]
    del bad["mar.diffloss.net.input_proj.bias"]
    bad["siglip2_proj.0.weight"] = bad["siglip2_proj.0.weight"][:, :-1]
    bad["llm.lm_head.weight"] = bad["llm.lm_head.weight"] + 1
    bad["proj_mid.0.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ConversionError) as e:
        unipic_params_from_torch(bad, model.config)
    msg = str(e.value)
    assert "missing param 'vae/encoder/conv_in/bias'" in msg
    assert "missing param 'diffusion_head/input_proj/bias'" in msg
    assert "shape mismatch for 'siglip2_proj.0.weight'" in msg
    assert "tied key 'llm.lm_head.weight' differs" in msg
    assert "unmapped source key 'proj_mid.0.weight'" in msg
    assert len(e.value.problems) == 5


def _release(folder, state_dict):
    """A release folder in the official layout from a whole UniPic state dict."""
    folder.mkdir(parents=True)
    torch.save({k: torch.from_numpy(v.copy()).to(torch.bfloat16) for k, v in state_dict.items()
                if not k.startswith("vae.")}, folder / "pytorch_model.bin")
    torch.save({"model": {k[4:]: torch.from_numpy(v.copy()) for k, v in state_dict.items() if k.startswith("vae.")}},
               folder / "kl16.ckpt")
    return folder


def test_release_folder(tmp_path, loaded):
    """pytorch_model.bin (bf16, no vae.*) + kl16.ckpt load to float32 params; the .bin wins over a
    base-model subfolder; a subfolder supplies a component the .bin lacks."""
    model, params = loaded
    sd = FX.weights
    folder = _release(tmp_path / "a", sd)
    base_llm = {k[4:]: v + 1 for k, v in sd.items() if k.startswith("llm.") and k != "llm.lm_head.weight"}
    save_hf_folder(folder / "Qwen2.5-1.5B-Instruct", {"model_type": "qwen2"}, base_llm)
    got = load_release(folder, model.config)
    assert all(leaf.dtype == np.float32 for leaf in flatten(got).values())
    want = {k: (v.astype(np.float32) if k.startswith("vae.")
                else torch.from_numpy(v.copy()).to(torch.bfloat16).float().numpy()) for k, v in sd.items()}
    back = unipic_params_to_torch(got, model.config)
    for key in sd:
        np.testing.assert_array_equal(back[key], want[key], err_msg=key)  # the .bin's LLM, not base + 1

    without_llm = {k: v for k, v in sd.items() if not k.startswith("llm.")}
    folder2 = _release(tmp_path / "b", without_llm)
    save_hf_folder(folder2 / "Qwen2.5-1.5B-Instruct", {"model_type": "qwen2"}, base_llm)
    back = unipic_params_to_torch(load_release(folder2, model.config), model.config)
    np.testing.assert_array_equal(back["llm.model.norm.weight"], base_llm["model.norm.weight"])

    torch.save({"vae.quant_conv.bias": torch.zeros(2)}, folder2 / "pytorch_model.bin")
    with pytest.raises(CheckpointFileError, match="vae"):
        load_release(folder2, model.config)


def test_full_scale_layout():
    """Every key of the full-size checkpoint maps to a param of the full-size UniPic with the
    right shape, and every param is filled (jax.eval_shape and zero-stride views: no allocation)."""
    layout = json.loads((FIXTURE_ROOT / "full_scale_keys.json").read_text())
    config = UniPicConfig.from_config(unipic_1p5b.get_config())
    keymap = unipic_keymap(config)
    want = {path: leaf.shape for path, leaf in flatten(param_shapes(config)).items()}
    entries = [e for component in layout["keys"].values() for e in component]
    filled = {}
    for entry in entries:
        key, shape = entry["key"], tuple(entry["shape"])
        if key in keymap.tied:
            continue
        hit = keymap.to_flax(key)
        assert hit is not None, f"{key} has no rule"
        path, rule = hit
        flax_shape = TRANSFORMS[rule.transform].to_flax(np.broadcast_to(np.float32(0), shape)).shape
        assert want.get(path) == flax_shape, f"{key} -> {path}: {flax_shape} != {want.get(path)}"
        assert path not in filled, f"{key} and {filled.get(path)} both fill {path}"
        filled[path] = key
    assert set(filled) == set(want), f"params no key fills: {sorted(set(want) - set(filled))[:5]}"
    assert sum(int(np.prod(s)) for s in want.values()) == layout["total_unique_parameters"]
