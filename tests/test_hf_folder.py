"""Hugging Face folders: a tiny SigLIP written by transformers' `save_pretrained` loads and runs as
the PyTorch model does; sharded, torch-pickle and broken folders; `save_hf_folder` round trips and
never leaves a half-written folder behind.

Bound: the forward check is one float32 pass, 1e-4 x max|ref| (as every SigLIP comparison).
"""

import json

import jax
import numpy as np
import pytest

from convert import CheckpointFileError, ConversionError
from convert.hf import load_hf_folder, save_hf_folder
from convert.siglip import siglip_from_hf_folder, siglip_params_to_torch
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
