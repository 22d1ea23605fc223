"""Multi-turn sessions (`unipic_jax.pipeline.session`) on the tiny fixture model (random weights).

What is checked, turn by turn (describe, generate, edit, ask): each turn equals the one-shot call on
the whole conversation so far (the same rows prefilled from scratch), the LLM computes only the
turn's new tokens, a session's first turn is the plain pipeline call, and a second session of the
same shapes compiles nothing. Bounds: integer token ids exactly; image tokens at the sampling-chain
bound 1e-3 x max|ref| (the cached and one-shot paths sum the same attention terms in another order,
float32 rounding that the chain then carries through its steps).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURE_ROOT, fixture_checkpoint
from PIL import Image

from configs.fixture import get_config
from unipic_jax import prompts
from unipic_jax.api import UniPicPipeline
from unipic_jax.models.unipic import llm_module
from unipic_jax.pipeline.session import BLOCK_BUCKET, Session
from unipic_jax.sampling import t2i, text

SIZE = get_config(FIXTURE_ROOT / "unipic").mar.img_size
STEPS = 2
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return UniPicPipeline.from_pretrained(fixture_checkpoint(tmp_path_factory.mktemp("session")))


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (SIZE + 16, SIZE, 3), dtype=np.uint8))


def _one_shot_text(session, rows):
    """Greedy ids of the conversation rows prefilled at once (`text.generate`, no cache reuse)."""
    embeds, mask, _ = session._embed_rows(rows)
    tokens = session.model.config.tokens
    out = text.generate(llm_module(session.model), session.pipe.params["llm"], embeds, mask,
                        max_new_tokens=NEW_TOKENS, eos_id=tokens.eos, pad_id=tokens.pad,
                        repetition_penalty=session.pipe.repetition_penalty)
    n = int(out.lengths[0])
    return session.pipe.tokenizer.decode(np.asarray(out.ids)[0, :n], skip_special_tokens=True)


def _one_shot_tokens(session, rows, seed, x_con=None):
    """Image tokens of the conversation rows prefilled at once (`t2i.sample_t2i` as a plain call)."""
    embeds, mask, _ = session._embed_rows(rows)
    side = SIZE // 16
    if x_con is not None:
        x_con = jnp.broadcast_to(x_con, (len(rows),) + x_con.shape[1:])
    out = t2i.sample_t2i(session.model, session.pipe.params, embeds, mask, image_shape=(side, side),
                         num_iter=STEPS, key=jax.random.key(seed), x_con_bsd=x_con, prompt_bucket=BLOCK_BUCKET)
    return np.asarray(out.tokens)


def _close(got, ref):
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-3 * float(np.abs(ref).max()))


def test_every_turn_equals_the_one_shot_call_on_its_history(pipe, picture):
    s = pipe.session(size=SIZE)
    # Turn 1: describe. The first turn is the plain caption call.
    assert s.describe(picture, max_new_tokens=NEW_TOKENS) == pipe.caption(picture, size=SIZE,
                                                                           max_new_tokens=NEW_TOKENS)
    count = prompts.image_token_count(SIZE, SIZE, pipe.config.mar)
    assert s.turns[0].new_tokens == len(pipe.tokenizer.encode(prompts.caption_prompt(count)))  # no history yet
    # Turn 2: generate, after the description.
    before = s._history + s._pending
    s.generate("a red fox", steps=STEPS, seed=5, progress=False)
    rows = [before + [s._text(prompts.t2i_prompt("a red fox"))], before + [s._text(prompts.t2i_cfg_prompt())]]
    _close(np.asarray(s.last_sample.tokens), _one_shot_tokens(s, rows, 5))
    # Turn 3: edit the generated image.
    before = s._history + s._pending
    source = s.image
    s.edit("make it night", steps=STEPS, seed=6, progress=False)
    from unipic_jax import images

    pixels = images.to_model_input(images.center_crop_square(source), SIZE)
    _, x_con, z_src = t2i._source_features(s.model, pipe.params, jnp.asarray(pixels))
    count = z_src.shape[1]
    rows = [before + [s._image_segment(prompts.edit_prompt("make it night", count), z_src)],
            before + [s._image_segment(prompts.edit_cfg_prompt(count), z_src)]]
    _close(np.asarray(s.last_sample.tokens), _one_shot_tokens(s, rows, 6, x_con))
    # Turn 4: a question about all of it.
    before = s._history + s._pending
    answer = s.ask("What changed?", max_new_tokens=NEW_TOKENS)
    assert answer == _one_shot_text(s, [before + [s._text(prompts.chat("What changed?"))]])
    assert [t.kind for t in s.turns] == ["describe", "generate", "edit", "ask"]


def test_each_turn_computes_only_its_new_tokens(pipe, picture):
    s = Session(pipe, size=SIZE)
    s.describe(picture, max_new_tokens=NEW_TOKENS)
    s.generate("a cat", steps=STEPS, seed=1, progress=False)
    cached = s.cached_tokens
    s.ask("Is it a cat?", max_new_tokens=NEW_TOKENS)
    turn = s.turns[-1]
    image_tokens = prompts.image_token_count(SIZE, SIZE, pipe.config.mar)
    # The image answer's placeholders and <|im_end|>\n, then the user message: nothing earlier.
    tail = len(pipe.tokenizer.encode(prompts.IMAGE_TOKEN * image_tokens + prompts.IM_END + "\n"))
    assert turn.new_tokens == tail + len(pipe.tokenizer.encode(prompts.chat("Is it a cat?")))
    assert turn.block == -(-turn.new_tokens // BLOCK_BUCKET) * BLOCK_BUCKET < cached + turn.new_tokens
    assert s.cached_tokens > cached + turn.new_tokens  # the answer's tokens joined the cache as generated


def test_first_image_turn_is_the_plain_generate_call(pipe):
    s = Session(pipe, size=SIZE)
    got = s.generate("a red fox", steps=STEPS, seed=2, progress=False)
    ref = pipe.generate("a red fox", size=SIZE, steps=STEPS, seed=2, progress=False)[0]
    diff = np.abs(np.asarray(got, np.int32) - np.asarray(ref, np.int32))
    assert diff.max() <= 1  # uint8 pixels of tokens equal at 1e-3: at most one rounding step apart
    assert got.info["seed"] == 2 and got.info["task"] == "generate"


def test_a_second_session_compiles_nothing(pipe, picture):
    def turns(s):
        s.describe(picture, max_new_tokens=NEW_TOKENS)
        s.generate("a fox", steps=STEPS, seed=0, progress=False)
        s.ask("Why?", max_new_tokens=NEW_TOKENS)

    turns(Session(pipe, size=SIZE))
    before = dict(text.TRACES), dict(t2i.TRACES)
    turns(Session(pipe, size=SIZE))
    assert (dict(text.TRACES), dict(t2i.TRACES)) == before


def test_refusals_are_one_line(pipe):
    s = Session(pipe, size=SIZE)
    with pytest.raises(ValueError, match="no image in the conversation"):
        s.edit("make it night")
    with pytest.raises(ValueError, match="no image in the conversation"):
        s.describe()
    with pytest.raises(ValueError, match="empty question"):
        s.ask("  ")
    with pytest.raises(ValueError, match="multiple of 16"):
        Session(pipe, size=40)
    context = pipe.config.qwen2.max_position_embeddings
    with pytest.raises(ValueError, match="start a new session"):  # history + turn + answer past the context
        s._room(1, BLOCK_BUCKET, context, written=True)
    assert s.turns == [] and s.cached_tokens == 0
