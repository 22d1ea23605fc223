"""Hugging Face folders: a tiny SigLIP written by transformers' `save_pretrained` loads and runs as
the PyTorch model does; sharded, torch-pickle and broken folders; `save_hf_folder` round trips and
never leaves a half-written folder behind. Config files that leave fields to transformers' defaults
(as transformers itself writes them, or with `null`s) read as transformers reads them.

Bound: the forward checks are one float32 pass, 1e-4 x max|ref| (as every SigLIP and Qwen2
comparison).
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert import CheckpointFileError, ConversionError
from convert.hf import load_hf_folder, save_hf_folder
from convert.qwen2 import qwen2_config_from_hf, qwen2_from_hf_folder, qwen2_params_to_torch
from convert.siglip import siglip_config_from_hf, siglip_from_hf_folder, siglip_params_to_torch
from unipic_jax.models.qwen2 import Qwen2
from unipic_jax.models.siglip import SiglipVisionModel
from unipic_jax.parity import FORWARD, compare

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_tower():
    """A tiny random `SiglipVisionModel` with every parameter randomised."""
    config = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, attn_implementation="eager")
    torch.manual_seed(1)
    model = transformers.SiglipVisionModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5 if p.ndim > 1 else 1 + 0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def saved(hf_tower, tmp_path_factory):
    folder = tmp_path_factory.mktemp("siglip") / "tiny"
    hf_tower.save_pretrained(folder)
    return folder


def test_save_pretrained_folder_loads_and_matches(hf_tower, saved):
    assert (saved / "model.safetensors").is_file()
    config, params = siglip_from_hf_folder(saved)
    hf = hf_tower.config
    assert (config.hidden_size, config.num_layers, config.image_size, config.use_head) == (
        hf.hidden_size, hf.num_hidden_layers, hf.image_size, True)
    # Every tensor came across unchanged (transformers 5 saves without the `vision_model.` level).
    back = siglip_params_to_torch(params)
    for key, value in hf_tower.state_dict().items():
        np.testing.assert_array_equal(back["vision_model." + key], value.numpy(), err_msg=key)
    pixels = torch.rand(2, 3, hf.image_size, hf.image_size) * 2 - 1
    with torch.no_grad():
        ref = hf_tower(pixel_values=pixels)
    out = jax.jit(lambda p, x: SiglipVisionModel(config).apply({"params": p}, x))(
        params, pixels.numpy().transpose(0, 2, 3, 1))
    for name, got, want in [("last_hidden_state", out.last_hidden_state, ref.last_hidden_state),
                            ("pooler_output", out.pooler_output, ref.pooler_output)]:
        row = compare("siglip", name, got, want.numpy(), FORWARD)  # one float32 forward: 1e-4 x max|ref|
        assert row.ok, f"{name}: {row.max_abs_err:.3e} > {row.bound:.3e}"


def test_config_that_disagrees_with_weights_names_the_key(saved, tmp_path):
    folder = tmp_path / "wrong"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(saved / "model.safetensors")
    hf = json.loads((saved / "config.json").read_text())
    hf["intermediate_size"] += 8
    (folder / "config.json").write_text(json.dumps(hf))
    fc1 = r"vision_model\.encoder\.layers\.0\.mlp\.fc1\.weight"
    with pytest.raises(ConversionError, match=f"shape mismatch for '{fc1}'"):
        siglip_from_hf_folder(folder)


def test_sharded_folder_and_missing_shard(hf_tower, saved, tmp_path):
    _, state_dict = load_hf_folder(saved)
    folder = tmp_path / "sharded"
    save_hf_folder(folder, json.loads((saved / "config.json").read_text()), state_dict, max_shard_bytes=20_000)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (folder / "model.safetensors").exists()
    _, loaded = load_hf_folder(folder)
    assert set(loaded) == set(state_dict)
    for key in state_dict:
        np.testing.assert_array_equal(loaded[key], state_dict[key], err_msg=key)

    shards[1].unlink()
    with pytest.raises(CheckpointFileError, match=shards[1].name):
        load_hf_folder(folder)


def test_index_key_absent_from_its_shard(tmp_path):
    state_dict = {f"w{i}": np.full((64,), i, np.float32) for i in range(4)}
    save_hf_folder(tmp_path / "m", {}, state_dict, max_shard_bytes=256)
    index_path = tmp_path / "m" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"]["w0"]
    index["weight_map"]["ghost"] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointFileError, match=rf"{shard}.*'ghost'"):
        load_hf_folder(tmp_path / "m")


def test_torch_pickle_folder(hf_tower, saved, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((saved / "config.json").read_text())
    torch.save(hf_tower.state_dict(), folder / "pytorch_model.bin")
    _, params = siglip_from_hf_folder(folder)
    _, from_safetensors = siglip_from_hf_folder(saved)
    jax.tree.map(np.testing.assert_array_equal, params, from_safetensors)


def test_missing_config_and_missing_weights_are_named(saved, tmp_path):
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").symlink_to(saved / "model.safetensors")
    with pytest.raises(CheckpointFileError, match="config.json"):
        load_hf_folder(no_config)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    with pytest.raises(CheckpointFileError, match="no weights file"):
        load_hf_folder(no_weights)


def test_failed_save_leaves_previous_folder_intact(tmp_path):
    dest = tmp_path / "m"
    save_hf_folder(dest, {"version": 1}, {"w": np.ones(3, np.float32)})
    unstorable = {"a": np.ones(3, np.float32), "z": np.ones(3, np.complex64)}  # fails midway
    with pytest.raises(ValueError, match="cannot be stored"):
        save_hf_folder(dest, {"version": 2}, unstorable, max_shard_bytes=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left over
    config, state_dict = load_hf_folder(dest)
    assert config == {"version": 1} and list(state_dict) == ["w"]


# ---------------------------------------------------------------------------------------------
# Fields left to transformers' defaults.

def _randomise(model, seed):
    """Every parameter non-trivial: norms near 1, matrices scaled by fan-in, vectors small."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1 + 0.2 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / np.prod(p.shape[1:]) ** 0.5)
            else:
                p.copy_(0.1 * noise)
    return model


def _rewrite_config(folder, edit):
    """Apply `edit(config_dict) -> config_dict` to folder/config.json."""
    path = folder / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


SIGLIP_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_channels", "image_size", "patch_size", "layer_norm_eps")


@pytest.mark.parametrize("hf", [{}, {"hidden_size": 32, "num_attention_heads": 4}, {"image_size": 64}])
def test_siglip_config_defaults_are_transformers(hf):
    ours = siglip_config_from_hf(hf)
    theirs = transformers.SiglipVisionConfig(**hf)
    assert dataclasses.astuple(ours)[:8] == tuple(getattr(theirs, f) for f in SIGLIP_FIELDS)
    nested = siglip_config_from_hf({"model_type": "siglip", "vision_config": hf, "text_config": {}})
    assert nested == ours


def test_siglip_vision_config_without_default_fields(tmp_path):
    """A `SiglipModel` config.json whose `vision_config` holds only the non-default fields (as
    transformers 4.x writes it) loads, with the weights unchanged."""
    config = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                                             num_attention_heads=4)  # 224 px, patch 16: the defaults
    tower = _randomise(transformers.SiglipVisionModel(config).eval(), 3)
    tower.save_pretrained(tmp_path / "siglip")
    vision = {k: getattr(config, k) for k in SIGLIP_FIELDS[:4]}
    _rewrite_config(tmp_path / "siglip", lambda hf: {"model_type": "siglip", "text_config": {},
                                                     "vision_config": {**vision, "model_type": "siglip_vision_model"}})
    loaded, params = siglip_from_hf_folder(tmp_path / "siglip")
    assert (loaded.image_size, loaded.patch_size, loaded.num_channels, loaded.ln_eps) == (224, 16, 3, 1e-6)
    back = siglip_params_to_torch(params)
    state_dict = tower.state_dict()
    assert len(back) == len(state_dict)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(back["vision_model." + key.removeprefix("vision_model.")], value.numpy(),
                                      err_msg=key)


# 64 heads: an omitted num_key_value_heads (transformers' 32) and a null one (= heads) differ.
QWEN2_SIZES = dict(vocab_size=128, hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=64)


@pytest.mark.parametrize("hf", [
    {},
    {"num_key_value_heads": None},
    {"num_key_value_heads": 2, "rope_theta": 1e6, "rms_norm_eps": 1e-5, "tie_word_embeddings": True},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "max_position_embeddings": 4096},
])
def test_qwen2_config_defaults_are_transformers(hf):
    ours = qwen2_config_from_hf({**QWEN2_SIZES, **hf})
    theirs = transformers.Qwen2Config(**QWEN2_SIZES, **hf)
    rope = getattr(theirs, "rope_parameters", None) or {"rope_theta": theirs.rope_theta}
    assert (ours.num_kv_heads, ours.rms_eps, ours.rope_theta, ours.tie_embeddings, ours.max_position_embeddings) == (
        theirs.num_key_value_heads, theirs.rms_norm_eps, rope["rope_theta"], theirs.tie_word_embeddings,
        theirs.max_position_embeddings)


def test_qwen2_config_missing_size_or_unusable_default_is_named():
    with pytest.raises(ConversionError, match="missing 'hidden_size'"):
        qwen2_config_from_hf({k: v for k, v in QWEN2_SIZES.items() if k != "hidden_size"})
    with pytest.raises(ConversionError, match="no 'num_key_value_heads', so 32 .* num_attention_heads=12"):
        qwen2_config_from_hf({**QWEN2_SIZES, "num_attention_heads": 12})


def _logits(config, params, ids):
    model = Qwen2(config)
    x = model.apply({"params": params}, ids, method=Qwen2.embed)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return model.apply({"params": params}, x, positions, np.ones(ids.shape, bool), return_logits=True).logits


@pytest.mark.parametrize("case", ["null_kv_heads", "defaults_left_out"])
def test_qwen2_folder_with_transformers_defaults(tmp_path, case):
    """config.json with `num_key_value_heads: null`, or without any field that has a default (an
    untied head, rope_theta 1e4, rms eps 1e-6, 32 KV heads): the same config, weights and logits as
    transformers' own model loaded from the folder."""
    if case == "null_kv_heads":
        sizes = dict(QWEN2_SIZES, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, rope_theta=1e6,
                     tie_word_embeddings=True)
        edit = lambda hf: {**hf, "num_key_value_heads": None}  # noqa: E731
    else:
        sizes = dict(QWEN2_SIZES, num_attention_heads=32)  # transformers' defaults otherwise
        dropped = ("num_key_value_heads", "rope_theta", "rope_parameters", "rope_scaling", "rms_norm_eps",
                   "tie_word_embeddings", "max_position_embeddings", "head_dim")
        edit = lambda hf: {k: v for k, v in hf.items() if k not in dropped}  # noqa: E731
    model = _randomise(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**sizes)), 5)
    model.save_pretrained(tmp_path / "qwen")
    _rewrite_config(tmp_path / "qwen", edit)

    config, params = qwen2_from_hf_folder(tmp_path / "qwen")
    ref = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "qwen", dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    hf = ref.config
    assert (config.num_kv_heads, config.tie_embeddings, config.rms_eps) == (
        hf.num_key_value_heads, hf.tie_word_embeddings, hf.rms_norm_eps)
    assert config.num_kv_heads == (4 if case == "null_kv_heads" else 32)
    assert config.tie_embeddings == (case == "null_kv_heads")
    back = qwen2_params_to_torch(params, config)
    written = model.state_dict()
    assert set(back) == set(written)
    for key, value in written.items():
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
    ids = np.random.default_rng(0).integers(0, sizes["vocab_size"], (2, 24))
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids)).logits.numpy()
    row = compare("qwen2", "logits", _logits(config, params, ids), want, FORWARD)
    assert row.ok, f"logits: {row.max_abs_err:.3e} > {row.bound:.3e}"
