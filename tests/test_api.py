"""The Python API (`unipic_jax.api.UniPicPipeline`) on the tiny fixture model (random weights).

What is checked: loading (a converted checkpoint, a release folder converted on the fly, missing
or unreadable sources), the prompt rows each task builds, the returned types and sizes, that a
repeated call compiles nothing, that a seed reproduces its image, and that bad input is refused
before anything is sampled. The numbers themselves are the sampler's business (test_t2i,
test_parity); here equality of two runs is exact because they run the same compiled programs.
"""

import warnings

import jax
import numpy as np
import pytest
import torch
from conftest import FIXTURE_ROOT, fixture_checkpoint, fixture_tokenizer
from PIL import Image
from safetensors.numpy import load_file

from configs.fixture import get_config, read_meta
from convert.hf import save_hf_folder
from convert.io import save_state_dict
from unipic_jax import api, checkpoint, prompts
from unipic_jax.api import UniPicPipeline
from unipic_jax.models.unipic import UniPicConfig
from unipic_jax.sampling import t2i, text

UNIPIC = FIXTURE_ROOT / "unipic"
CONFIG = get_config(UNIPIC)
SIZE = CONFIG.mar.img_size  # the fixture MAR's native size: the smallest grid the fixture was run at
STEPS = 2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return fixture_checkpoint(tmp_path_factory.mktemp("api"), generation_config='{"repetition_penalty": 1.1}')


@pytest.fixture(scope="module")
def pipe(ckpt):
    return UniPicPipeline.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def picture():
    """A non-square RGB picture (crop / pad paths differ)."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE + 24, 3), dtype=np.uint8))


def test_loads_checkpoint_and_generation_config(pipe, ckpt):
    assert pipe.config == UniPicConfig.from_config(CONFIG)
    assert pipe.repetition_penalty == 1.1  # from tokenizer/generation_config.json, as image2text.py
    assert pipe.tokenizer.image_id == CONFIG.tokens.image
    assert pipe.source == str(ckpt)


def test_bfloat16_restores_bf16_weights(ckpt, pipe):
    half = UniPicPipeline.from_pretrained(ckpt, dtype="bfloat16")
    assert half.model.dtype == jax.numpy.bfloat16
    assert {leaf.dtype for leaf in jax.tree.leaves(half.params)} == {jax.numpy.dtype("bfloat16")}
    kernel = half.params["mar"]["z_proj"]["kernel"]  # restored straight into bf16: the rounding of float32
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(pipe.params["mar"]["z_proj"]["kernel"]
                                                                 ).astype(kernel.dtype))


def test_t2i_rows_are_prompt_major_then_guidance(pipe):
    grid, ids, mask = pipe._t2i_rows(["a", "b"], size=SIZE, batch=2, guided=True)
    assert grid == (SIZE // 16, SIZE // 16)
    assert ids.shape[0] == 8 and ids.shape[1] % 64 == 0
    tok = pipe.tokenizer
    rows = [tok.decode(r[m]) for r, m in zip(ids, mask)]
    assert rows == [prompts.t2i_prompt("a")] * 2 + [prompts.t2i_prompt("b")] * 2 + [prompts.t2i_cfg_prompt()] * 4
    assert np.all(ids[~mask] == tok.eos_id)  # right padded with EOS, as the reference pads
    assert pipe._t2i_rows(["a"], size=SIZE, batch=1, guided=False)[1].shape[0] == 1


def test_generate_returns_images_and_compiles_once(pipe):
    first = pipe.generate("a red fox", size=SIZE, steps=STEPS, seed=0, progress=False)
    assert len(first) == 1 and first[0].size == (SIZE, SIZE) and first[0].mode == "RGB"
    info = first[0].info
    assert (info["prompt"], info["seed"], info["steps"], info["size"]) == ("a red fox", 0, STEPS, SIZE)
    traces = dict(t2i.TRACES)
    # Another prompt in the same length bucket and another seed: the same programs.
    other = pipe.generate("a blue bird", size=SIZE, steps=STEPS, seed=1, progress=False)
    again = pipe.generate("a red fox", size=SIZE, steps=STEPS, seed=0)
    assert dict(t2i.TRACES) == traces
    np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(first[0]))
    assert not np.array_equal(np.asarray(other[0]), np.asarray(first[0]))


def test_progress_bar_says_compiling_then_counts_mar_steps(pipe, monkeypatch):
    """The bar reads "compiling" until the first MAR step ends, then a fresh bar (its clock started
    after the compile, so the ETA leaves it out) counts every step."""
    bars, real = [], api._progress

    def spy(total, enabled, desc):
        bar = real(total, enabled, desc)
        bars.append((bar, bar.bar.desc))
        return bar

    monkeypatch.setattr(api, "_progress", spy)
    pipe.generate("a red fox", size=SIZE, steps=STEPS, seed=0)
    (bar, first_desc), = bars
    assert first_desc == "generate: compiling" and bar.bar.desc == "generate"
    assert (bar.bar.n, bar.bar.initial, bar.bar.total) == (STEPS, 1, STEPS)


def test_edit_returns_image_of_the_size(pipe, picture):
    edited = pipe.edit(picture, "make it blue", size=SIZE, steps=STEPS, seed=3, progress=False)
    assert isinstance(edited, Image.Image) and edited.size == (SIZE, SIZE)
    assert edited.info["task"] == "edit" and edited.info["prompt"] == "make it blue"


def test_caption_returns_text_and_compiles_once(pipe, picture):
    got = pipe.caption(picture, size=SIZE, max_new_tokens=4)
    assert isinstance(got, str) and got
    traces = dict(text.TRACES)
    assert pipe.caption(picture, size=SIZE, max_new_tokens=4) == got  # greedy: deterministic
    assert dict(text.TRACES) == traces
    sampled = pipe.caption(picture, size=SIZE, max_new_tokens=4, sample=True, seed=0)
    assert isinstance(sampled, str)


def test_bad_input_is_refused_before_sampling(pipe, tmp_path):
    traces = dict(t2i.TRACES)
    with pytest.raises(ValueError, match="multiple of 16"):
        pipe.generate("a fox", size=SIZE + 8, steps=STEPS)
    with pytest.raises(ValueError, match="empty prompt"):
        pipe.generate("  ", size=SIZE, steps=STEPS)
    with pytest.raises(ValueError, match="tokens but at most"):
        pipe.generate("a" * pipe.context, size=SIZE, steps=STEPS)
    tokens = (SIZE // 16) ** 2  # each MAR step predicts at least one of these
    with pytest.raises(ValueError, match=rf"steps must be an integer in \[1, {tokens}\]"):
        pipe.generate("a fox", size=SIZE, steps=tokens + 1)
    for bad in (dict(cfg=float("nan")), dict(cfg=float("inf")), dict(temperature=float("nan")), dict(batch=0),
                dict(seed=2 ** 32), dict(seed=-1), dict(seed=1.5)):
        with pytest.raises(ValueError, match="must be"):
            pipe.generate("a fox", size=SIZE, steps=STEPS, **bad)
    with pytest.raises(ValueError, match="more than the model's context"):
        pipe.generate("a fox", size=16 * 4096, steps=STEPS)
    with pytest.raises(ValueError, match="empty edit instruction"):
        pipe.edit(Image.new("RGB", (SIZE, SIZE)), "", size=SIZE, steps=STEPS)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="not an image file"):
        pipe.edit(tmp_path / "notes.png", "make it blue", size=SIZE, steps=STEPS)
    with pytest.raises(ValueError, match="siglip path takes"):
        pipe.caption(Image.new("RGB", (SIZE, SIZE)), size=CONFIG.siglip.image_size + 16, path="siglip")
    with pytest.raises(ValueError, match="more than the model's context"):
        pipe.caption(Image.new("RGB", (SIZE, SIZE)), size=100_000)
    with pytest.raises(ValueError, match="dtype must be one of"):
        UniPicPipeline.from_pretrained("unused", dtype="float16")
    assert dict(t2i.TRACES) == traces


def test_release_folder_is_converted_on_the_fly(pipe, tmp_path):
    weights = load_file(UNIPIC / "weights.safetensors")
    save_state_dict({k: v for k, v in weights.items() if not k.startswith("vae.")}, tmp_path / "pytorch_model.bin")
    torch.save({"model": {k[4:]: torch.from_numpy(v) for k, v in weights.items() if k.startswith("vae.")}},
               tmp_path / "kl16.ckpt")
    llm = tmp_path / "Qwen2.5-1.5B-Instruct"
    save_hf_folder(llm, read_meta(UNIPIC)["config"]["llm"],
                   {k[4:]: v for k, v in weights.items() if k.startswith("llm.") and "lm_head" not in k})
    fixture_tokenizer(llm)
    with pytest.warns(UserWarning, match="unipic-jax convert"):
        loaded = UniPicPipeline.from_pretrained(tmp_path, config=CONFIG)
    assert loaded.repetition_penalty == 1.0  # this folder has no generation_config.json
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(loaded.params), jax.tree.leaves(pipe.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_missing_unreadable_and_offline_sources(ckpt, tmp_path, monkeypatch):
    with pytest.raises(checkpoint.CheckpointError, match="no such folder"):
        UniPicPipeline.from_pretrained(tmp_path / "absent")
    with pytest.raises(checkpoint.CheckpointError, match="neither a unipic-jax checkpoint"):
        UniPicPipeline.from_pretrained(tmp_path)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(checkpoint.CheckpointError, match="downloading it from the Hugging Face Hub failed"):
        UniPicPipeline.from_pretrained("Skywork/Skywork-UniPic-1.5B")
    no_tokenizer = tmp_path / "bare"
    checkpoint.save(no_tokenizer, *reversed(checkpoint.load(ckpt)))
    with pytest.raises(checkpoint.CheckpointError, match="holds no tokenizer"):
        UniPicPipeline.from_pretrained(no_tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converted checkpoint loads without the conversion note
        assert UniPicPipeline.from_pretrained(no_tokenizer, tokenizer=checkpoint.tokenizer_dir(ckpt))
