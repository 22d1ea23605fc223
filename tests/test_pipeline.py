"""The Hugging Face-shaped call `UniPicPipeline.__call__` and its output type, any aspect ratio, and
the list / streaming forms of `edit` and `caption`, on the tiny fixture model (random weights).

One module-scoped pipeline; most calls share a 32x64-pixel grid (2x4 latent tokens) and 2 MAR
steps, so the programs compile a few times in all. Equalities between calls that run the same
programs are exact; a batched image against the same image sampled alone (other batch shapes, so
other programs) is held to one uint8 level, the rounding of the 1e-3 x max|ref| sampling bound.
"""

import jax
import numpy as np
import pytest
from conftest import fixture_checkpoint
from PIL import Image

from unipic_jax import images, prompts
from unipic_jax.api import UniPicPipeline
from unipic_jax.pipeline import ImagePipelineOutput, PipelineImage
from unipic_jax.sampling import t2i

H, W, STEPS = 32, 64, 2


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return UniPicPipeline.from_pretrained(fixture_checkpoint(tmp_path_factory.mktemp("pipeline")))


@pytest.fixture(scope="module")
def batched(pipe):
    """Two prompts, one seed each, in one call; with the trace counts it added."""
    before = dict(t2i.TRACES)
    out = pipe(["a red fox", "a cat"], height=H, width=W, num_inference_steps=STEPS, seed=[3, 4], progress=False)
    return out, {k: v - before.get(k, 0) for k, v in t2i.TRACES.items()}


@pytest.fixture(scope="module")
def single(pipe):
    """The second prompt of `batched` alone with its seed; the callback's calls."""
    calls = []

    def callback(p, step_index, timestep, kwargs):
        calls.append((p, step_index, timestep, tuple(kwargs["tokens"].shape)))
        return {}

    out = pipe("a cat", height=H, width=W, num_inference_steps=STEPS, seed=4, progress=False,
               callback_on_step_end=callback)
    return out, calls


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (40, 100, 3), dtype=np.uint8))  # 100 wide, 40 high


def test_list_of_prompts_is_one_batch_compiled_once(pipe, batched):
    out, traces = batched
    assert isinstance(out, ImagePipelineOutput) and out[0] is out.images
    assert [img.size for img in out.images] == [(W, H)] * 2  # PIL sizes are (width, height)
    assert all(isinstance(img, PipelineImage) and img.mode == "RGB" for img in out.images)
    assert out.seeds == [3, 4]
    assert [img.info["prompt"] for img in out.images] == ["a red fox", "a cat"]
    assert (out.images[1].info["seed"], out.images[1].info["height"], out.images[1].info["width"]) == (4, H, W)
    assert traces["prefill"] == 1 and traces["decode"] == 1  # one batch, not one per prompt
    before = dict(t2i.TRACES)
    pipe(["a dog", "a bird"], height=H, width=W, num_inference_steps=STEPS, seed=[5, 6], progress=False)
    assert dict(t2i.TRACES) == before  # another list of the same shape compiles nothing


def test_per_prompt_seed_reproduces_the_image_alone(batched, single):
    (out, _), (alone, _) = batched, single
    assert alone.seeds == [4] and len(alone.images) == 1
    a, b = np.asarray(out.images[1], np.int16), np.asarray(alone.images[0], np.int16)
    # Other batch shapes run other programs: equal to float32 rounding, so at most one uint8 level.
    assert np.max(np.abs(a - b)) <= 1
    assert not np.array_equal(np.asarray(out.images[0]), np.asarray(out.images[1]))


def test_callback_once_per_step(pipe, single):
    _, calls = single
    assert [c[1] for c in calls] == list(range(STEPS))
    assert all(c[0] is pipe for c in calls)
    assert calls[-1][2] == 0 and calls[0][2] > 0  # tokens still unknown after the step
    assert calls[0][3][:2] == (2, (H // 16) * (W // 16))  # cond and guidance rows, 2x4 tokens


def test_default_guidance_row_is_todays_and_negative_prompt_replaces_it(pipe, single):
    alone, _ = single
    # Today's generate: cond row then the released guidance row, one key for the call.
    ids, mask = pipe._batch([prompts.t2i_prompt("a cat"), prompts.t2i_cfg_prompt()], reserved=0, bucket=64)
    ref = t2i.text_to_image(pipe.model, pipe.params, ids, mask, image_shape=(H // 16, W // 16), num_iter=STEPS,
                            key=jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(alone.images[0]), images.to_uint8(np.asarray(ref.images))[0])
    _, ids, mask = pipe._t2i_rows(["a cat"], size=H, width=W, batch=1, guided=True, negative=["blurry"])
    rows = [pipe.tokenizer.decode(r[m]) for r, m in zip(ids, mask)]
    assert rows == [prompts.t2i_prompt("a cat"), prompts.chat("Generate an image: blurry")]
    negative = pipe("a cat", height=H, width=W, num_inference_steps=STEPS, seed=4, negative_prompt="blurry",
                    progress=False)
    assert negative.images[0].info["negative_prompt"] == "blurry"
    assert not np.array_equal(np.asarray(negative.images[0]), np.asarray(alone.images[0]))


def test_num_images_per_prompt(pipe):
    out = pipe("a cat", height=H, width=W, num_inference_steps=STEPS, seed=9, num_images_per_prompt=2,
               progress=False)
    assert len(out.images) == 2 and out.seeds == [9, 9]
    assert [img.info["index"] for img in out.images] == [0, 1]
    assert not np.array_equal(np.asarray(out.images[0]), np.asarray(out.images[1]))


def test_save_keeps_the_settings(batched, tmp_path):
    img = batched[0].images[0]
    img.save(tmp_path / "fox.png")
    meta = images.read_metadata(tmp_path / "fox.png")
    assert (meta["prompt"], meta["seed"], meta["width"], meta["task"]) == ("a red fox", "3", str(W), "text-to-image")
    img.save(tmp_path / "fox.jpg", quality=90)
    assert images.read_metadata(tmp_path / "fox.jpg")["prompt"] == "a red fox"
    from PIL import PngImagePlugin

    own = PngImagePlugin.PngInfo()
    own.add_text("mine", "yes")
    img.save(tmp_path / "own.png", pnginfo=own)  # the caller's pnginfo wins
    assert images.read_metadata(tmp_path / "own.png") == {"mine": "yes"}
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "fox.png")), np.asarray(img))


def test_edit_list_keeps_the_aspect_ratio(pipe, picture):
    assert images.fit_to_budget(100, 40, 32 * 32) == (16, 48)
    edited = pipe.edit([picture, picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], ["make it blue", "make it red"],
                       size=32, steps=STEPS, seed=[1, 2], keep_aspect=True, progress=False)
    assert [e.size for e in edited] == [(48, 16)] * 2
    assert [e.info["prompt"] for e in edited] == ["make it blue", "make it red"]
    assert edited[0].info["keep_aspect"] is True and edited[1].info["seed"] == 2


def test_caption_lists_and_streaming(pipe, picture):
    plain = pipe.caption(picture, size=32, max_new_tokens=4)
    both = pipe.caption([picture, picture], ["Describe the image in detail.", "What is it?"], size=32,
                        max_new_tokens=4)
    assert isinstance(both, list) and len(both) == 2 and both[0] == plain
    pieces = list(pipe.caption(picture, size=32, max_new_tokens=4, stream=True))
    assert pieces and "".join(pieces) == plain


def test_fit_to_budget():
    assert images.fit_to_budget(1024, 1024, 1024 * 1024) == (1024, 1024)
    assert images.fit_to_budget(1920, 1080, 1024 * 1024) == (768, 1360)
    h, w = images.fit_to_budget(1000, 10, 64 * 64)
    assert h == 16 and w % 16 == 0 and h * w <= 64 * 64


def test_bad_arguments_are_one_line_errors_before_work(pipe, picture):
    traces = dict(t2i.TRACES)
    call = dict(height=H, width=W, num_inference_steps=STEPS, progress=False)
    for bad, message in [
        (dict(height=40), "height 40 must be a positive multiple of 16"),
        (dict(width=0), "width must be an integer"),
        (dict(height=16 * 8192), "more than the model's context"),  # 8192 x 4 tokens: the whole context
        (dict(num_images_per_prompt=0), r"num_images_per_prompt must be an integer in \[1, 64\]"),
        (dict(seed=[1]), "1 seeds for 2 prompts"),
        (dict(seed=[1, -1]), "seed must be an integer"),
        (dict(negative_prompt=["a"]), "negative_prompt holds 1 entries for 2 prompts"),
        (dict(negative_prompt="x", guidance_scale=1.0), "negative_prompt needs guidance"),
        (dict(guidance_scale=float("nan")), "must be a finite number"),
        (dict(guidance_scale=-1.0), "must be a finite number"),
        (dict(guidance_schedule="cosine"), "guidance schedule must be one of"),
        (dict(callback_on_step_end=3), "callback_on_step_end must be callable"),
        (dict(seed=1, generator=jax.random.key(0)), "seed or generator"),
        (dict(generator=[jax.random.key(0)]), "generator holds 1 keys for 2 prompts"),
    ]:
        with pytest.raises(ValueError, match=message) as err:
            pipe(["a", "b"], **{**call, **bad})
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="empty negative prompt"):
        pipe("a", negative_prompt=" ", **call)
    with pytest.raises(ValueError, match="prompt must be a string"):
        pipe([], **call)
    with pytest.raises(ValueError, match="2 images and 3 prompts"):
        pipe.edit([picture] * 2, ["a", "b", "c"], size=32, steps=STEPS)
    with pytest.raises(ValueError, match="stream=True takes one image"):
        pipe.caption([picture] * 2, size=32, stream=True)
    assert dict(t2i.TRACES) == traces
