"""The orbax checkpoint store and the `convert` command, end to end on the tiny fixture model.

A tiny official-layout release is built from the fixture's `weights.safetensors` the way the real
one is laid out (pytorch_model.bin without `vae.*`, kl16.ckpt holding {"model": VAE state dict},
a Qwen2.5 folder with config, weights and tokenizer). `unipic-jax convert` turns it into a
checkpoint; loading it and exporting back must reproduce the fixture's state dict bit for bit
(every step is a copy or a transpose, so exact equality is the bound).
"""

import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import FIXTURE_ROOT
from safetensors.numpy import load_file

from configs.fixture import get_config, read_meta
from convert.hf import save_hf_folder
from convert.io import load_state_dict, save_state_dict
from convert.unipic import unipic_params_to_torch
from unipic_jax import checkpoint, cli
from unipic_jax.checkpoint import CheckpointError
from unipic_jax.models.unipic import UniPicConfig, param_shapes
from unipic_jax.prompts import Tokenizer, write_byte_tokenizer

UNIPIC = FIXTURE_ROOT / "unipic"
CONFIG = get_config(UNIPIC)
WEIGHTS = load_file(UNIPIC / "weights.safetensors")


def _entries(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    save_state_dict({k: v for k, v in WEIGHTS.items() if not k.startswith("vae.")}, root / "pytorch_model.bin")
    vae = {k[len("vae."):]: torch.from_numpy(v) for k, v in WEIGHTS.items() if k.startswith("vae.")}
    torch.save({"model": vae}, root / "kl16.ckpt")
    llm_folder = root / "Qwen2.5-1.5B-Instruct"
    llm = {k[len("llm."):]: v for k, v in WEIGHTS.items() if k.startswith("llm.") and "lm_head" not in k}
    save_hf_folder(llm_folder, read_meta(UNIPIC)["config"]["llm"], llm)
    ids = read_meta(UNIPIC)["config"]["special_ids"]
    write_byte_tokenizer(llm_folder, vocab_size=CONFIG.qwen2.vocab_size, eos_id=ids["eos"], pad_id=ids["pad"])
    (llm_folder / "generation_config.json").write_text('{"repetition_penalty": 1.1}')
    return root


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    dst = tmp_path_factory.mktemp("out") / "ckpt"
    assert cli.main(["convert", str(release), str(dst), "--config", str(UNIPIC)]) == 0
    return dst


def test_convert_writes_a_complete_checkpoint(converted):
    assert _entries(converted) == ["config.json", "params", "tokenizer"]
    assert _entries(converted.parent) == ["ckpt"]  # no temporary directory left beside it
    assert "generation_config.json" in _entries(converted / "tokenizer")
    tok = Tokenizer.from_folder(checkpoint.tokenizer_dir(converted))
    tok.check_ids(checkpoint.read_config(converted).tokens)


def test_load_restores_the_release_exactly(converted):
    config, params = checkpoint.load(converted)
    assert config.to_dict() == CONFIG.to_dict()  # tuples (ch_mult, ...) come back as tuples
    first = jax.devices()[0]
    for leaf in jax.tree.leaves(params):
        assert isinstance(leaf, jax.Array) and leaf.dtype == np.float32
        assert leaf.sharding.device_set == {first}
    # Convert -> save -> load -> export reproduces the reference state dict bit for bit.
    back = unipic_params_to_torch(jax.tree.map(np.asarray, params), UniPicConfig.from_config(config))
    assert sorted(back) == sorted(WEIGHTS)
    for key, value in WEIGHTS.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_convert_progress_output(release, tmp_path, capsys):
    assert cli.main(["convert", str(release), str(tmp_path / "c"), "--config", str(UNIPIC)]) == 0
    out = capsys.readouterr().out
    n = sum(v.size for k, v in WEIGHTS.items() if k != "llm.lm_head.weight")  # tied head counted once
    assert "reading and converting" in out and f"{n:,} parameters" in out and "done in" in out


def test_export_safetensors(converted, tmp_path):
    config, params = checkpoint.load(converted)
    unipic_config = UniPicConfig.from_config(config)
    path = checkpoint.export_safetensors(params, lambda p: unipic_params_to_torch(p, unipic_config),
                                         tmp_path / "unipic.safetensors")
    exported = load_state_dict(path)
    assert sorted(exported) == sorted(WEIGHTS)
    np.testing.assert_array_equal(exported["mar.z_proj.weight"], WEIGHTS["mar.z_proj.weight"])
    half = checkpoint.export_safetensors(params, lambda p: unipic_params_to_torch(p, unipic_config),
                                         tmp_path / "half.safetensors", dtype=ml_dtypes.bfloat16)
    got = load_state_dict(half)["llm.model.norm.weight"]
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got, WEIGHTS["llm.model.norm.weight"].astype(ml_dtypes.bfloat16))
    with pytest.raises(ValueError, match="safetensors"):
        checkpoint.export_safetensors(params, lambda p: {}, tmp_path / "x.bin")


def test_restore_into_target_dtype_and_sharding(converted):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shapes = param_shapes(UniPicConfig.from_config(CONFIG))
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jax.numpy.bfloat16), shapes)
    params = checkpoint.restore(converted, checkpoint.with_sharding(target, replicated))
    leaf = params["mar"]["z_proj"]["kernel"]
    assert leaf.dtype == jax.numpy.bfloat16 and leaf.sharding == replicated
    np.testing.assert_array_equal(np.asarray(leaf), WEIGHTS["mar.z_proj.weight"].T.astype(ml_dtypes.bfloat16))


def test_with_sharding_forms():
    shapes = {"a": jax.ShapeDtypeStruct((2,), np.float32), "b": jax.ShapeDtypeStruct((3,), np.float32)}
    first = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    assert all(s.sharding == first for s in jax.tree.leaves(checkpoint.with_sharding(shapes)))
    per_leaf = checkpoint.with_sharding(shapes, {"a": first, "b": first})
    assert per_leaf["b"].sharding == first and per_leaf["b"].shape == (3,)


def test_config_mismatch_names_the_param(converted, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(converted, bad)
    doc = json.loads((bad / "config.json").read_text())
    doc["config"]["qwen2"]["intermediate_size"] *= 2
    (bad / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"param 'llm/layers_0/mlp/down_proj/kernel' has shape"):
        checkpoint.load(bad)


def test_missing_and_incomplete_checkpoints(converted, tmp_path):
    with pytest.raises(CheckpointError, match="absent: no such checkpoint directory"):
        checkpoint.load(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        checkpoint.load(tmp_path / "empty")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(converted, unfinished)
    (unfinished / "params" / "_CHECKPOINT_METADATA").unlink()
    with pytest.raises(CheckpointError, match=r"unfinished/params: incomplete checkpoint"):
        checkpoint.load(unfinished)


def test_truncated_array_data_names_the_path(converted, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(converted, cut)
    data = [p for p in (cut / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data
    for p in data:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut/params: cannot read the params"):
        checkpoint.load(cut)


def test_existing_destination_needs_force(release, converted, capsys):
    before = (converted / "config.json").stat().st_mtime_ns
    assert cli.main(["convert", str(release), str(converted), "--config", str(UNIPIC)]) == 2
    assert "already exists (pass --force" in capsys.readouterr().err
    assert (converted / "config.json").stat().st_mtime_ns == before


def test_force_never_replaces_a_foreign_folder_or_the_source(release, converted, tmp_path, capsys):
    """`--force` replaces only a checkpoint this project wrote: not a folder of the user's, not the
    release being read, not a folder holding it. Each refusal happens before any conversion."""
    user = tmp_path / "thesis"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    holder = tmp_path / "holder"
    shutil.copytree(converted, holder)
    (holder / "inner").mkdir()
    cases = [(str(user), "is not a unipic-jax checkpoint"), (str(release), "holds"),
             (str(release.parent), "holds")]
    for dst, match in cases:
        assert cli.main(["convert", str(release), dst, "--config", str(UNIPIC), "--force"]) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, err
    assert (user / "thesis.tex").read_text() == "years of work" and _entries(user) == ["thesis.tex"]
    assert (release / "pytorch_model.bin").is_file() and (release / "kl16.ckpt").is_file()
    # a checkpoint holding the source is refused too (converting from a folder inside it)
    with pytest.raises(CheckpointError, match="holds"):
        checkpoint.check_destination(holder, overwrite=True, sources=[holder / "inner"])
    assert checkpoint.check_destination(holder, overwrite=True, sources=[release]) == holder.absolute()


def test_leftovers_of_a_killed_convert_are_removed(release, tmp_path, capsys):
    """A killed writer leaves `.NAME.PID.XXXX.partial`; the next write beside it removes those of
    dead processes and keeps a live writer's."""
    dead = 999_999_999  # above Linux's pid_max (4,194,304): no process has it
    stale = tmp_path / f".ckpt.{dead}.abcd.partial"
    stale.mkdir()
    (stale / "params").mkdir()
    live = tmp_path / f".ckpt.{os.getpid()}.efgh.partial"
    live.mkdir()
    assert cli.main(["convert", str(release), str(tmp_path / "ckpt"), "--config", str(UNIPIC)]) == 0
    assert _entries(tmp_path) == [live.name, "ckpt"]


def test_failed_convert_leaves_nothing(release, tmp_path, capsys):
    (release / "kl16.ckpt").rename(release / "kl16.moved")
    try:
        assert cli.main(["convert", str(release), str(tmp_path / "c"), "--config", str(UNIPIC)]) == 2
    finally:
        (release / "kl16.moved").rename(release / "kl16.ckpt")
    assert "kl16.ckpt" in capsys.readouterr().err
    assert _entries(tmp_path) == []


def test_failed_save_leaves_nothing_and_keeps_the_old_checkpoint(converted, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    def failing_save(self, directory, *args, **kwargs):
        directory.mkdir()
        (directory / "half_written").write_bytes(b"x")
        raise OSError("disk full")

    monkeypatch.setattr(ocp.Checkpointer, "save", failing_save)
    params = {"w": np.ones((2, 2), np.float32)}
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(tmp_path / "new", params, CONFIG)
    assert _entries(tmp_path) == []
    old = tmp_path / "old"
    shutil.copytree(converted, old)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(old, params, CONFIG, overwrite=True)
    assert _entries(tmp_path) == ["old"]
    assert checkpoint.read_config(old).to_dict() == CONFIG.to_dict()


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert cli.main(["convert", "Skywork/Skywork-UniPic-1.5B", str(tmp_path / "c"), "--config", str(UNIPIC)]) == 2
    err = capsys.readouterr().err.strip()
    assert "downloading it from the Hugging Face Hub failed" in err and "\n" not in err
    with pytest.raises(CheckpointError, match="not a Hugging Face Hub id"):
        checkpoint.fetch_release(str(tmp_path / "no" / "such" / "folder"))


def test_find_tokenizer_dir(release, tmp_path):
    assert checkpoint.find_tokenizer_dir(release) == release / "Qwen2.5-1.5B-Instruct"
    assert checkpoint.find_tokenizer_dir(tmp_path) is None


def test_full_size_config_round_trips():
    from configs import unipic_1p5b

    config = unipic_1p5b.get_config()
    back = checkpoint.config_from_json(checkpoint.config_to_json(config))
    assert back.to_dict() == config.to_dict()
    assert UniPicConfig.from_config(back) == UniPicConfig.from_config(config)
    with pytest.raises(CheckpointError, match="not a unipic-jax checkpoint config"):
        checkpoint.config_from_json('{"model_type": "qwen2"}')
