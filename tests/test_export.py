"""Export to the official release layout, and reading weights out of a training run.

* The fixture UniPic exported and read back with `convert.unipic.load_release` is bitwise the same;
  transformers loads both Hugging Face subfolders to the same weights; a bfloat16 export replaces
  the float32 one and reads back as the bf16-rounded params.
* The full-size layout (from `jax.eval_shape`, nothing allocated) is the reference key table.
* A two-step smoke run read back with `read_run` (EMA and raw params, a damaged newest step).
* An existing folder that is not an export is never replaced.
"""

import json
import os
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

from configs import unipic_1p5b
from configs.stages import smoke
from conftest import FIXTURE_ROOT, fixture_checkpoint
from convert.core import flatten
from convert.export import MARKER, ExportError, export_release, is_export, release_layout
from convert.io import load_state_dict
from convert.qwen2 import qwen2_config_from_hf
from convert.siglip import siglip_config_from_hf
from convert.unipic import RELEASE_BIN, RELEASE_LLM_FOLDER, RELEASE_SIGLIP_FOLDER, RELEASE_VAE, load_release
from unipic_jax import checkpoint
from unipic_jax.checkpoint import CheckpointError
from unipic_jax.models.unipic import UniPicConfig, param_shapes
from unipic_jax.train import data, loop, optim, runs

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def fixture_model(tmp_path_factory):
    """(config, params, tokenizer folder) of the converted fixture UniPic."""
    ckpt = fixture_checkpoint(tmp_path_factory.mktemp("fixture"))
    config, params = checkpoint.load(ckpt)
    return UniPicConfig.from_config(config), params, checkpoint.tokenizer_dir(ckpt)


def _assert_same(got, want, cast=None):
    """Same tree, every leaf bitwise equal (after `cast` of `want`) with the same dtype."""
    got, want = flatten(got), flatten(want)
    assert got.keys() == want.keys()
    for k in want:
        w = np.asarray(want[k]) if cast is None else np.asarray(want[k]).astype(cast).astype(np.float32)
        assert np.asarray(got[k]).dtype == w.dtype and np.array_equal(np.asarray(got[k]), w), k


def _files(folder: Path) -> dict[str, bytes]:
    return {os.fspath(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_round_trip(fixture_model, tmp_path):
    config, params, tokenizer = fixture_model
    dst = export_release(params, config, tmp_path / "release", tokenizer_dir=tokenizer)
    assert is_export(dst)
    _assert_same(load_release(dst, config), params)

    binary = load_state_dict(dst / RELEASE_BIN)
    assert not any("vae." in k for k in binary) and "llm.lm_head.weight" in binary
    pickled = torch.load(dst / RELEASE_BIN, weights_only=True)  # the tied head shares the embedding's storage
    assert pickled["llm.lm_head.weight"].data_ptr() == pickled["llm.model.embed_tokens.weight"].data_ptr()
    assert torch.load(dst / RELEASE_VAE, weights_only=True).keys() == {"model"}
    llm = dst / RELEASE_LLM_FOLDER
    assert {p.name for p in tokenizer.iterdir()} <= {p.name for p in llm.iterdir()}
    hf_llm = json.loads((llm / "config.json").read_text())
    assert hf_llm["model_type"] == "qwen2" and hf_llm["architectures"] == ["Qwen2ForCausalLM"]
    assert qwen2_config_from_hf(hf_llm) == config.qwen2
    assert siglip_config_from_hf(json.loads((dst / RELEASE_SIGLIP_FOLDER / "config.json").read_text())) == config.siglip

    # transformers builds both subfolders as the official code does, to the exported weights.
    transformers = pytest.importorskip("transformers")
    qwen = transformers.Qwen2ForCausalLM.from_pretrained(llm, dtype=torch.float32)
    siglip = transformers.SiglipVisionModel.from_pretrained(dst / RELEASE_SIGLIP_FOLDER, dtype=torch.float32)
    for prefix, model in (("llm.", qwen), ("siglip2.", siglip)):
        ours = {k[len(prefix):]: v for k, v in binary.items() if k.startswith(prefix)}
        theirs = {k: v.numpy() for k, v in model.state_dict().items()}
        if prefix == "siglip2.":  # transformers 5 names SiglipVisionModel's keys without "vision_model."
            theirs = {(k if k.startswith("vision_model.") else "vision_model." + k): v for k, v in theirs.items()}
        assert theirs.keys() == ours.keys()
        assert all(np.array_equal(theirs[k], ours[k]) for k in ours)

    with pytest.raises(ExportError, match="already exists"):
        export_release(params, config, dst)
    base = {"transformers_version": "4.45.2", "torch_dtype": "float32", "hidden_size": config.qwen2.hidden_size}
    half = export_release(params, config, dst, dtype="bfloat16", overwrite=True, llm_config_json=base)
    assert load_state_dict(half / RELEASE_BIN)["llm.model.norm.weight"].dtype == ml_dtypes.bfloat16
    hf_llm = json.loads((half / RELEASE_LLM_FOLDER / "config.json").read_text())
    assert hf_llm["torch_dtype"] == "bfloat16" and hf_llm["transformers_version"] == "4.45.2"
    _assert_same(load_release(half, config), params, cast=ml_dtypes.bfloat16)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_export_full_scale_layout():
    """The release written for the 1.5B model holds exactly the reference table's keys and shapes."""
    table = json.loads((FIXTURE_ROOT / "full_scale_keys.json").read_text())["keys"]
    rows = {e["key"]: tuple(e["shape"]) for component in table.values() for e in component}
    config = UniPicConfig.from_config(unipic_1p5b.get_config())
    layout = release_layout(param_shapes(config), config)

    vae = {"vae." + k: s for k, s in layout[RELEASE_VAE].items()}
    assert not vae.keys() & layout[RELEASE_BIN].keys()
    assert {**layout[RELEASE_BIN], **vae} == rows
    under = lambda prefix: {k[len(prefix):]: s for k, s in rows.items() if k.startswith(prefix)}
    llm = under("llm.")
    del llm["lm_head.weight"]  # tied: Hugging Face files keep only the embedding
    assert layout[f"{RELEASE_LLM_FOLDER}/model.safetensors"] == llm
    assert layout[f"{RELEASE_SIGLIP_FOLDER}/model.safetensors"] == under("siglip2.")


def _damage(step_dir: Path) -> None:
    """Truncate every array file of a saved step to half its size."""
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_read_run_for_export(tmp_path, fixture_model):
    cfg = smoke.get_config("steps=2,batch=3")
    cfg.checkpoint.update(dict(every=1, keep=2))
    sources = data.parse_data_spec(str(data.write_synthetic(tmp_path / "data", size=cfg.data.gen_resolution)))
    workdir = tmp_path / "run"
    state = loop.Trainer(cfg).run(workdir, sources, progress=False).state
    assert runs.is_run(workdir) and not runs.is_run(tmp_path)
    assert runs.run_steps(workdir) == [1, 2]

    model_config, raw, tokenizer, step = runs.read_run(workdir, "params")
    assert step == 2 and tokenizer == workdir / "tokenizer"
    assert model_config.vae.ch_mult == tuple(cfg.model.vae.ch_mult)
    shapes = param_shapes(UniPicConfig.from_config(model_config))
    assert jax.tree.structure(raw) == jax.tree.structure(shapes)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), raw) == jax.tree.map(lambda s: (s.shape, s.dtype), shapes)
    _assert_same(raw, state.params)
    _, ema, _, _ = runs.read_run(workdir)
    _assert_same(ema, optim.ema_params(state.ema, state.params))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(raw)))
    _assert_same(ema["vae"], raw["vae"])  # frozen: no EMA kept

    # The run's EMA weights export and read back as they are.
    config = UniPicConfig.from_config(model_config)
    _assert_same(load_release(export_release(ema, config, tmp_path / "release", tokenizer_dir=tokenizer), config), ema)

    _, first, _, _ = runs.read_run(workdir, step=1)
    _damage(workdir / "checkpoints" / "2")
    with pytest.warns(UserWarning, match="step 2 is damaged"):
        _, fallback, _, step = runs.read_run(workdir)
    assert step == 1
    _assert_same(fallback, first)
    with pytest.raises(CheckpointError, match="damaged"):
        runs.read_run(workdir, step=2)
    with pytest.raises(CheckpointError, match="no step 7"):
        runs.read_run(workdir, step=7)
    with pytest.raises(CheckpointError, match="not a training run"):
        runs.read_run(tmp_path)


def test_export_refuses_a_foreign_folder(fixture_model, tmp_path):
    config, params, _ = fixture_model
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("keep me")
    (folder / "sub" / MARKER.replace(".json", ".txt")).write_bytes(b"\x00\x01")
    before = _files(folder)
    with pytest.raises(ExportError, match="not a folder export_release wrote"):
        export_release(params, config, folder, overwrite=True)
    (folder / MARKER).write_text('{"format": "something-else"}')
    with pytest.raises(ExportError, match="refusing"):
        export_release(params, config, folder, overwrite=True)
    (folder / MARKER).unlink()
    assert _files(folder) == before
    with pytest.raises(ExportError, match="hidden_size=7"):  # a base config.json of another model
        export_release(params, config, tmp_path / "new", llm_config_json={"hidden_size": 7})
    with pytest.raises(ExportError, match="do not match the config"):
        export_release({**params, "proj_in": {}}, config, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
