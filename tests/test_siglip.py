"""SigLIP2 vision tower: layer by layer against the reference fixture, live against transformers'
PyTorch `SiglipVisionModel`, the key table (round trip, error reporting, full-size layout).

Bounds: every comparison is one float32 forward pass, held to 1e-4 x max|ref| (the reference's own
float32-vs-float64 spread is ~1e-5 of max|ref|, precision_summary.json). Each layer is fed the
stored reference input, so a failure names the layer instead of drifting down the stack.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import unipic_1p5b
from convert import ConversionError, torch_to_flax
from convert.siglip import SIGLIP_KEYMAP, siglip_param_shapes, siglip_params_from_torch, siglip_params_to_torch
from unipic_jax.models.siglip import SiglipConfig, SiglipVisionModel
from unipic_jax.parity import FORWARD, compare
from unipic_jax.parity import siglip as siglip_parity

from conftest import FIXTURE_ROOT, fixture


@pytest.fixture(scope="module")
def fx():
    return fixture("siglip")


@pytest.fixture(scope="module")
def tower(fx):
    """(config, params, bound model) of the fixture's tower."""
    config = SiglipConfig(**fx.config().siglip)
    params = siglip_params_from_torch(fx.weights, config)
    return config, params, SiglipVisionModel(config).bind({"params": params})


def _hidden(io, i):
    return io[f"hidden_states/{i}"]


def _assert_close(name, got, ref):
    row = compare("siglip", name, got, ref, FORWARD)  # single forward: 1e-4 x max|ref|
    assert row.ok, f"{name}: max err {row.max_abs_err:.3e} > bound {row.bound:.3e} {row.note}"


def test_embeddings(fx, tower):
    _, _, model = tower
    pixels_bhwc = fx.io["pixel_values"].transpose(0, 2, 3, 1)
    _assert_close("hidden_states/0", model.embeddings(pixels_bhwc), _hidden(fx.io, 0))


def test_each_layer(fx, tower):
    config, _, model = tower
    assert len(model.layers) == config.num_layers == fx.meta["config"]["num_hidden_layers"]
    for i, layer in enumerate(model.layers):
        _assert_close(f"layer {i} -> hidden_states/{i + 1}", layer(_hidden(fx.io, i)), _hidden(fx.io, i + 1))


def test_post_layernorm(fx, tower):
    config, _, model = tower
    _assert_close("post_layernorm", model.post_layernorm(_hidden(fx.io, config.num_layers)),
                  fx.io["last_hidden_state"])


def test_pooling_head(fx, tower):
    _, _, model = tower
    _assert_close("pooler_output", model.head(fx.io["last_hidden_state"]), fx.io["pooler_output"])


def test_whole_tower_parity_rows(fx):
    rows = list(siglip_parity.rows(fx))
    n_hidden = sum(k.startswith("hidden_states/") for k in fx.io)
    assert len(rows) == 2 + n_hidden
    bad = [f"{r.output}: {r.max_abs_err:.3e} > {r.bound:.3e} {r.note}" for r in rows if not r.ok]
    assert not bad, bad


def test_other_input_size_is_rejected(fx, tower):
    config, params, _ = tower
    side = config.image_size + config.patch_size
    with pytest.raises(ValueError, match="no interpolation"):
        SiglipVisionModel(config).apply({"params": params}, jnp.zeros((1, side, side, config.num_channels)))


def test_against_transformers_live():
    """A tiny random HF tower, every parameter randomised (the default init zeroes biases and norm
    affines, which would hide them), against this port: 1e-4 x max|ref| (one float32 forward)."""
    torch = pytest.importorskip("torch")
    from transformers import SiglipVisionConfig
    from transformers import SiglipVisionModel as TorchSiglip

    from convert.siglip import hf_vision_state_dict, siglip_config_from_hf

    hf = SiglipVisionConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                            image_size=40, patch_size=8, layer_norm_eps=1e-6, attn_implementation="eager")
    torch.manual_seed(0)
    ref_model = TorchSiglip(hf).eval()
    with torch.no_grad():
        for p in ref_model.parameters():
            p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5 if p.ndim > 1 else 1 + 0.2 * torch.randn_like(p))
        pixels = torch.rand(2, 3, hf.image_size, hf.image_size) * 2 - 1
        ref = ref_model(pixel_values=pixels, output_hidden_states=True)
    state_dict = hf_vision_state_dict({k: v.numpy() for k, v in ref_model.state_dict().items()})

    config = siglip_config_from_hf(hf.to_dict())
    params = siglip_params_from_torch(state_dict, config)
    out = jax.jit(lambda p, x: SiglipVisionModel(config).apply({"params": p}, x, output_hidden_states=True))(
        params, pixels.numpy().transpose(0, 2, 3, 1))
    assert len(out.hidden_states) == len(ref.hidden_states) == hf.num_hidden_layers + 1
    for i, (got, want) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        _assert_close(f"live hidden_states/{i}", got, want.numpy())
    _assert_close("live last_hidden_state", out.last_hidden_state, ref.last_hidden_state.numpy())
    _assert_close("live pooler_output", out.pooler_output, ref.pooler_output.numpy())


def test_round_trip_is_bit_identical(fx, tower):
    _, params, _ = tower
    back = siglip_params_to_torch(params)
    assert set(back) == set(fx.weights)
    for key, value in fx.weights.items():
        assert back[key].dtype == value.dtype, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_errors_name_every_bad_key_at_once(fx, tower):
    config, _, _ = tower
    bad = dict(fx.weights)
    del bad["vision_model.post_layernorm.bias"]                                             # removed
    bad["vision_model.head.attention.in_proj_weight_renamed"] = bad.pop("vision_model.head.attention.in_proj_weight")
    bad["vision_model.embeddings.position_embedding.weight"] = (
        bad["vision_model.embeddings.position_embedding.weight"][:-1])                      # reshaped
    with pytest.raises(ConversionError) as e:
        siglip_params_from_torch(bad, config)
    msg = str(e.value)
    assert "'post_layernorm/bias'" in msg and "vision_model.post_layernorm.bias" in msg
    assert "unmapped source key 'vision_model.head.attention.in_proj_weight_renamed'" in msg
    assert "'head/in_proj_kernel'" in msg  # the renamed key's param is now missing
    assert "shape mismatch for 'vision_model.embeddings.position_embedding.weight'" in msg
    assert len(e.value.problems) == 4


def test_full_scale_layout():
    """Every `siglip2.*` key of the real checkpoint maps onto the full-size tower's params (shapes
    from jax.eval_shape, nothing allocated: zero-stride views stand in for the tensors)."""
    layout = json.loads((FIXTURE_ROOT / "full_scale_keys.json").read_text())
    entries = layout["keys"]["siglip2"]
    config = SiglipConfig(**unipic_1p5b.get_config().siglip)
    target = siglip_param_shapes(config)
    fake = {e["key"]: np.broadcast_to(np.float32(0), e["shape"]) for e in entries}
    params = torch_to_flax(fake, SIGLIP_KEYMAP.prefixed("siglip2.", ""), target)  # raises on any gap
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(target))
    assert len(jax.tree.leaves(params)) == len(jax.tree.leaves(target)) == len(entries)
    assert n_params == sum(e["numel"] for e in entries) == layout["components"]["siglip2"]["num_unique_parameters"]
