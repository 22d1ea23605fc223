"""Multi-turn conversations with one model: describe, generate, edit and ask, each turn computing
only its new tokens.

    session = pipe.session()
    session.describe("photo.jpg")                  # text about the picture
    fox = session.generate("a red fox in the snow") # a PIL image
    night = session.edit("make it night")          # edits the last image of the conversation
    session.ask("What changed?")                   # text

The released code has no multi-turn format, so this one is ours, built from the released turns:
every user turn is the chat template's user message of the one-shot task (`prompts.py`), every
answer follows it as the assistant message and is closed by `<|im_end|>` and a newline. An image
answer (or an image a user turn shows) enters the conversation as its `<image>` placeholders
holding the MAR features of its tokens (`UniPic.extract_visual_feature`, the features editing and
captioning splice in). With guidance, the unconditional row of an image turn is the same history
followed by the task's guidance prompt ("Generate an image." / the source and "Repeat this image."):
guidance then moves away from a generic request in the same context. An edit turn shows its source
(the last image unless one is given) again in its user message, as the one-shot edit does, and
conditions the MAR decoder on it; so a session's first turn is the one-shot call (same tokens,
same draws; the numbers agree to the sampling bound, the cache's shapes being other).

The LLM keeps one KV cache of the conversation (`qwen2.KVCache`, one row). Each turn appends its
new tokens (the previous answer's tail, then the user message) with `text.extend`, or
`text.generate_after` for text answers, whose generated tokens join the cache as they are
produced; image turns sample with `t2i.sample_t2i(prompt_cache=...)` over two rows (conditional,
unconditional) that share the history. A turn therefore equals the one-shot call on the whole
history (`history()` gives its embeddings) at the float32 bounds, and `turns[i].new_tokens`
counts what it computed. The cache grows in blocks of `CACHE_BLOCK` slots (one compile per
block count); its padded slots stay invalid and take no position.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from unipic_jax import images, prompts
from unipic_jax.models.qwen2 import KVCache
from unipic_jax.models.unipic import UniPic, llm_module
from unipic_jax.sampling import caption as caption_lib
from unipic_jax.sampling import t2i, text

CACHE_BLOCK = 1024  # cache slots are allocated in multiples of this (one compile per multiple)
BLOCK_BUCKET = 64   # a turn's new tokens are padded to a multiple of this (one compile per length)


@dataclasses.dataclass
class Turn:
    """One finished turn: `kind` (describe, ask, generate, edit), the user's `text`, the answer
    (`reply`: a string or a PIL image), `new_tokens` the tokens the LLM computed for the prompt
    (the earlier answer's tail and this user message; per row) and `block` their padded length."""

    kind: str
    text: str
    reply: object
    new_tokens: int
    block: int


@dataclasses.dataclass
class _Segment:
    """Token ids (list) with the features of their `<image>` ids ((1, K, D) or None)."""

    ids: list[int]
    features: Optional[jax.Array] = None


@functools.partial(jax.jit, static_argnames=("model",))
def _token_features(model: UniPic, params, tokens_bmnc):
    """LLM-side MAR features (b, m*n + buffer, D) of latent tokens, as editing splices them."""
    return model.apply({"params": params}, tokens_bmnc, method=UniPic.extract_visual_feature)[1]


def _embed_block(model: UniPic, params, ids_bl, features_bkd):
    """Embeddings of ids (b, l) with the image features (or none) at the `<image>` ids."""
    if features_bkd is None:
        return t2i._embed(model, params, ids_bl)
    return caption_lib.prompt_embeddings(model, params, ids_bl, features_bkd)


def _grow(cache: KVCache, slots: int) -> KVCache:
    """The cache with `slots` slots (more than now), new ones empty and invalid."""
    extra = slots - cache.max_len
    pad = ((0, 0), (0, 0), (0, extra), (0, 0), (0, 0))
    return cache.replace(k=jnp.pad(cache.k, pad), v=jnp.pad(cache.v, pad),
                         valid=jnp.pad(cache.valid, ((0, 0), (0, extra))))


def _rows(cache: KVCache, rows: int) -> KVCache:
    """The one-row cache repeated to `rows` rows (`rows` 1: itself)."""
    if rows == 1:
        return cache
    return cache.replace(k=jnp.repeat(cache.k, rows, axis=1), v=jnp.repeat(cache.v, rows, axis=1),
                         valid=jnp.repeat(cache.valid, rows, axis=0))


def _first_row(cache: KVCache) -> KVCache:
    return cache.replace(k=cache.k[:, :1], v=cache.v[:, :1], valid=cache.valid[:1])


class Session:
    """A conversation with a `UniPicPipeline` (build it with `pipe.session()`); see the module
    docstring for the format. `size` is the default side, in pixels, of the images the turns
    make and read (a multiple of 16). `turns` lists the finished turns; `image` is the last
    image of the conversation (shown or made), which `describe` and `edit` use by default."""

    def __init__(self, pipe, *, size: int = 1024):
        from unipic_jax import api

        api.check_image_size(pipe.config, size)
        self.pipe = pipe
        self.size = size
        self.turns: list[Turn] = []
        self.image: Optional[Image.Image] = None
        self._cache: Optional[KVCache] = None
        self._pending: list[_Segment] = []   # the last answer's tail, not yet in the cache
        self._history: list[_Segment] = []   # everything in the cache, in order
        self.last_sample: Optional[t2i.Sample] = None  # the last image turn's sampler output

    # ------------------------------------------------------------------------------------------
    # The conversation's tokens

    @property
    def model(self) -> UniPic:
        return self.pipe.model

    @property
    def cached_tokens(self) -> int:
        """Valid tokens in the LLM cache (the conversation so far, without the pending tail)."""
        return 0 if self._cache is None else int(jnp.sum(self._cache.valid))

    def reset(self) -> None:
        """Forget the conversation (turns, images and the cache)."""
        self.__init__(self.pipe, size=self.size)

    def _text(self, s: str) -> _Segment:
        return _Segment(self.pipe.tokenizer.encode(s))

    def _image_segment(self, ids_text: str, features) -> _Segment:
        return _Segment(self.pipe.tokenizer.encode(ids_text), features)

    def _block(self, segments: list[_Segment]) -> tuple[list[int], Optional[jax.Array]]:
        ids = [i for s in segments for i in s.ids]
        feats = [s.features for s in segments if s.features is not None]
        return ids, (jnp.concatenate(feats, axis=1) if feats else None)

    def _embed_rows(self, rows: list[list[_Segment]]) -> tuple[jax.Array, np.ndarray, list[int]]:
        """Embeddings (rows, l, D) of each row's segments, right padded with EOS to a multiple of
        BLOCK_BUCKET, with the mask and each row's real length. Rows share their image features
        (every image-holding row holds the same images)."""
        built = [self._block(r) for r in rows]
        lengths = [len(ids) for ids, _ in built]
        ids_bl, mask_bl = prompts.batch_prompts([ids for ids, _ in built], self.pipe.tokenizer.eos_id, BLOCK_BUCKET)
        with_images = [f for _, f in built if f is not None]
        if with_images and len(with_images) != len(built):
            raise ValueError("every row of a turn must show the same images")
        features = with_images[0] if with_images else None
        return _embed_block(self.model, self.pipe.params, jnp.asarray(ids_bl), features), mask_bl, lengths

    def _room(self, rows: int, block: int, reserved: int, *, written: bool) -> KVCache:
        """The history cache in `rows` rows with room for `block` more tokens, plus `reserved`
        generated ones when they are `written` to it (text; image tokens are not); checks the
        conversation and the `reserved` tokens fit the context."""
        config = self.model.config
        context = config.qwen2.max_position_embeddings
        if self.cached_tokens + block + reserved > context:
            raise ValueError(f"the conversation would take {self.cached_tokens + block + reserved} positions but the "
                             f"context holds {context}; start a new session")
        if self._cache is None:
            self._cache = KVCache.create(config.qwen2, 1, CACHE_BLOCK, self.model.dtype)
        need = int(self._cache.length) + block + (reserved if written else 0)
        if need > self._cache.max_len:
            self._cache = _grow(self._cache, -(-need // CACHE_BLOCK) * CACHE_BLOCK)
        return _rows(self._cache, rows)

    def history(self, turn: list[_Segment] | None = None) -> tuple[jax.Array, int]:
        """Embeddings (1, H, D) of the whole conversation so far (cached and pending tokens, then
        `turn`'s segments), unpadded, with H: the one-shot prompt a turn must equal."""
        segments = self._history + self._pending + list(turn or [])
        ids, features = self._block(segments)
        return _embed_block(self.model, self.pipe.params, jnp.asarray([ids], jnp.int32), features), len(ids)

    def _commit(self, cache: KVCache, segments: list[_Segment], kind: str, user_text: str, reply,
                new_tokens: int, block: int, tail: list[_Segment]) -> None:
        self._cache = _first_row(cache)
        self._history += self._pending + segments
        self._pending = tail
        self.turns.append(Turn(kind, user_text, reply, new_tokens, block))

    # ------------------------------------------------------------------------------------------
    # Text answers

    def _text_turn(self, kind: str, user: _Segment, user_text: str, *, max_new_tokens: int,
                   repetition_penalty: Optional[float]) -> str:
        from unipic_jax import api

        api.check_caption(self.model.config, size=self.size, max_new_tokens=max_new_tokens)
        embeds, mask, (length,) = self._embed_rows([self._pending + [user]])
        cache = self._room(1, embeds.shape[1], max_new_tokens, written=True)
        tokens = self.model.config.tokens
        penalty = self.pipe.repetition_penalty if repetition_penalty is None else float(repetition_penalty)
        out, cache = text.generate_after(llm_module(self.model), self.pipe.params["llm"], cache, embeds, mask,
                                         max_new_tokens=max_new_tokens, eos_id=tokens.eos, pad_id=tokens.pad,
                                         repetition_penalty=penalty)
        n = int(np.asarray(out.lengths)[0])
        ids = [int(i) for i in np.asarray(out.ids)[0, :n]]
        answer = self.pipe.tokenizer.decode(ids, skip_special_tokens=True)
        closed = bool(ids) and ids[-1] == tokens.eos
        tail = ([] if closed else [_Segment([tokens.eos])]) + [self._text("\n")]
        self._commit(cache, [user, _Segment(ids)], kind, user_text, answer, length, int(embeds.shape[1]), tail)
        return answer

    def describe(self, image=None, question: str = prompts.CAPTION_TEXT, *, max_new_tokens: int = 1024,
                 repetition_penalty: Optional[float] = None) -> str:
        """Answer `question` about `image` (a PIL image or a file; default the conversation's last
        image), shown as the caption task shows it (padded to a square, `size` pixels, the
        released MAR path). Greedy, with the checkpoint's repetition penalty unless given."""
        from unipic_jax import api

        if image is None and self.image is None:
            raise ValueError("no image in the conversation yet: pass one")
        count = caption_lib.image_token_count(self.model.config, (self.size, self.size), "mar")
        user_text = prompts.caption_prompt(count, question)  # checks the question before any work
        picture = self.image if image is None else api._model_input_image(image)
        bf16 = jnp.dtype(self.model.dtype) == jnp.bfloat16
        pixels = images.to_model_input(images.expand_to_square(picture), self.size, bf16_ops=bf16)
        features = caption_lib.image_features(self.model, self.pipe.params, jnp.asarray(pixels), "mar")
        user = self._image_segment(user_text, features)
        answer = self._text_turn("describe", user, question, max_new_tokens=max_new_tokens,
                                 repetition_penalty=repetition_penalty)
        self.image = picture
        return answer

    def ask(self, question: str, *, max_new_tokens: int = 1024, repetition_penalty: Optional[float] = None) -> str:
        """Answer a text message in the context of the conversation."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("empty question: give some text")
        return self._text_turn("ask", self._text(prompts.chat(question)), question, max_new_tokens=max_new_tokens,
                               repetition_penalty=repetition_penalty)

    # ------------------------------------------------------------------------------------------
    # Image answers

    def _image_turn(self, kind: str, user_text: str, cond: _Segment, uncond: _Segment, *, size: int, steps: int,
                    cfg: float, cfg_schedule: str, temperature: float, seed: Optional[int], progress: bool,
                    x_con=None) -> Image.Image:
        from unipic_jax import api

        api.check_sampling(self.model.config, size=size, steps=steps, cfg=cfg, temperature=temperature,
                           cfg_schedule=cfg_schedule)
        seed = api.new_seed() if seed is None else api.check_seed(seed)
        guided = cfg != 1.0
        rows = [self._pending + [cond]] + ([self._pending + [uncond]] if guided else [])
        embeds, mask, lengths = self._embed_rows(rows)
        grid, image_tokens = self.pipe._grid(size)
        cache = self._room(len(rows), embeds.shape[1], image_tokens, written=False)
        _, cache = text.extend(llm_module(self.model), self.pipe.params["llm"], cache, embeds, mask)
        with api._progress(steps, progress, kind) as bar:
            out = t2i.sample_t2i(self.model, self.pipe.params, None, None, image_shape=grid, num_iter=steps,
                                 cfg=cfg, cfg_schedule=cfg_schedule, temperature=temperature,
                                 key=jax.random.key(seed), x_con_bsd=x_con, prompt_cache=cache, **api._step_hook(bar))
            pixels = np.asarray(out.images)
        settings = self.pipe._settings(kind, seed=seed, size=size, steps=steps, cfg=cfg, cfg_schedule=cfg_schedule,
                                       temperature=temperature, session_turn=len(self.turns))
        picture = self.pipe._to_pil(pixels, [{"prompt": user_text, **settings}])[0]
        features = _token_features(self.model, self.pipe.params, out.tokens[:1])
        count = features.shape[1]
        reply = self._image_segment(prompts.IMAGE_TOKEN * count + prompts.IM_END + "\n", features)
        self._commit(cache, [cond], kind, user_text, picture, lengths[0], int(embeds.shape[1]), [reply])
        self.image = picture
        self.last_sample = out
        return picture

    def generate(self, prompt: str, *, size: Optional[int] = None, steps: int = 32, cfg: float = 3.0,
                 cfg_schedule: str = "constant", temperature: float = 1.0, seed: Optional[int] = None,
                 progress: bool = True) -> Image.Image:
        """Make an image of `prompt` in the context of the conversation (text-to-image's user
        message; the image becomes the answer). Arguments as `UniPicPipeline.generate`."""
        size = self.size if size is None else size
        cond = self._text(prompts.t2i_prompt(prompt))
        uncond = self._text(prompts.t2i_cfg_prompt())
        return self._image_turn("generate", prompt, cond, uncond, size=size, steps=steps, cfg=cfg,
                                cfg_schedule=cfg_schedule, temperature=temperature, seed=seed, progress=progress)

    def edit(self, instruction: str, image=None, *, size: Optional[int] = None, steps: int = 32, cfg: float = 3.0,
             cfg_schedule: str = "constant", temperature: float = 1.0, seed: Optional[int] = None,
             progress: bool = True) -> Image.Image:
        """Edit `image` (default the conversation's last image) as `instruction` says: the source is
        prepared as the edit task prepares it (centre crop, `size` pixels) and shown in the user
        message. Arguments as `UniPicPipeline.edit`."""
        from unipic_jax import api

        if image is None and self.image is None:
            raise ValueError("no image in the conversation yet: pass one")
        size = self.size if size is None else size
        api.check_sampling(self.model.config, size=size, steps=steps, cfg=cfg, temperature=temperature,
                           cfg_schedule=cfg_schedule)  # before the source's features are computed
        seed = None if seed is None else api.check_seed(seed)
        _, count = self.pipe._grid(size)
        cond_text, uncond_text = prompts.edit_prompt(instruction, count), prompts.edit_cfg_prompt(count)
        picture = self.image if image is None else api._model_input_image(image)
        source = images.to_model_input(images.center_crop_square(picture), size)
        _, x_con, z_src = t2i._source_features(self.model, self.pipe.params, jnp.asarray(source))
        cond, uncond = self._image_segment(cond_text, z_src), self._image_segment(uncond_text, z_src)
        return self._image_turn("edit", instruction, cond, uncond, size=size, steps=steps, cfg=cfg,
                                cfg_schedule=cfg_schedule, temperature=temperature, seed=seed, progress=progress,
                                x_con=x_con)
