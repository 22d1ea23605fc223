"""A release folder's own config files set the LLM and SigLIP2 sizes of its conversion, and a
release converted for the wrong sizes fails with a one-line error that says so.

The release here is the fixture UniPic in the official layout: pytorch_model.bin, kl16.ckpt, and the
two Hugging Face subfolders with config.json files as transformers writes them (4.x-style: the
SigLIP `vision_config` without its default fields, the Qwen2 one with `num_key_value_heads`).
"""


import numpy as np
import pytest

from configs import unipic_1p5b
from configs.fixture import get_config, read_meta
from convert import ConversionError
from convert.hf import save_hf_folder
from convert.io import save_state_dict
from convert.unipic import (load_release, load_release_with_config, release_config, unipic_params_from_torch,
                            unipic_params_to_torch)
from unipic_jax.models.unipic import UniPicConfig

from conftest import FIXTURE_ROOT, fixture

torch = pytest.importorskip("torch")

UNIPIC = FIXTURE_ROOT / "unipic"
NO_FILE = ("vae", "vae_scale", "mar", "diffusion", "tokens")  # sections the release has no config file for


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(release folder, the fixture's state dict)."""
    folder = tmp_path_factory.mktemp("release")
    weights = fixture("unipic").weights
    ref = read_meta(UNIPIC)["config"]
    save_state_dict({k: v for k, v in weights.items() if not k.startswith("vae.")}, folder / "pytorch_model.bin")
    torch.save({"model": {k[4:]: torch.from_numpy(v.copy()) for k, v in weights.items() if k.startswith("vae.")}},
               folder / "kl16.ckpt")
    llm = {k[4:]: v for k, v in weights.items() if k.startswith("llm.") and k != "llm.lm_head.weight"}
    save_hf_folder(folder / "Qwen2.5-1.5B-Instruct", {**ref["llm"], "model_type": "qwen2"}, llm)
    defaults = {"num_channels": 3, "patch_size": 16, "layer_norm_eps": 1e-6}
    assert all(ref["siglip"].get(k, v) == v for k, v in defaults.items())
    vision = {k: v for k, v in ref["siglip"].items() if k not in defaults}
    siglip = {k[8:]: v for k, v in weights.items() if k.startswith("siglip2.")}
    save_hf_folder(folder / "siglip2-so400m-patch16-512",
                   {"model_type": "siglip", "text_config": {}, "vision_config": vision}, siglip)
    return folder, weights


def _base():
    """The released config with the fixture's sizes where the release has no file (MAR, VAE, ...):
    the LLM and SigLIP2 sections keep the 1.5B sizes, which the release's files must replace."""
    base, fx = unipic_1p5b.get_config(), get_config(UNIPIC)
    for name in NO_FILE:
        base[name] = fx[name]
    base.projectors.mar_dim = fx.projectors.mar_dim
    return base


def test_release_files_set_llm_and_siglip_sizes(release):
    folder, weights = release
    base, fx = _base(), get_config(UNIPIC)
    before = base.to_dict()
    config, params = load_release_with_config(folder, base)
    assert base.to_dict() == before  # the caller's config is left alone
    assert config.qwen2.to_dict() == fx.qwen2.to_dict()
    assert config.siglip.to_dict() == fx.siglip.to_dict()
    assert config.projectors.to_dict() == fx.projectors.to_dict()
    for name in NO_FILE:
        assert config[name] == base[name], name
    want = unipic_params_to_torch(unipic_params_from_torch(weights, UniPicConfig.from_config(fx)),
                                  UniPicConfig.from_config(fx))
    got = unipic_params_to_torch(params, UniPicConfig.from_config(config))
    assert set(got) == set(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_release_without_config_files_keeps_the_base(release, tmp_path):
    folder = tmp_path / "bare"
    folder.mkdir()
    for name in ("pytorch_model.bin", "kl16.ckpt"):
        (folder / name).symlink_to(release[0] / name)
    base = _base()
    assert release_config(folder, base).to_dict() == base.to_dict()


def test_wrong_sizes_fail_in_one_line(release):
    """The fixture release converted for the 1.5B sizes (what a wrong --config gives)."""
    with pytest.raises(ConversionError) as e:
        load_release(release[0], UniPicConfig.from_config(unipic_1p5b.get_config()))
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 2000, msg[:3000]
    assert "other model sizes" in msg and f"{len(e.value.problems)} problem(s)" in msg
    assert len(e.value.problems) > 100
