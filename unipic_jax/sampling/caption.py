"""Image-to-text (scripts/image2text.py, spec §10): image features spliced into the prompt, then
greedy (or sampled) generation with `sampling/text.py`.

Two ways to turn an image into LLM tokens:
  * "mar" (the released path): VAE encode -> MAR encoder without a mask -> proj_in, buffer moved
    to the end: (S/16)^2 + buffer tokens for an S x S image;
  * "siglip": SigLIP2 `last_hidden_state` -> siglip2_proj: (S/patch)^2 tokens at the tower's own
    image size. The checkpoint holds these weights but the released code never runs them (spec
    §6), so this path has no reference output to match; it needs `projectors.siglip_dim` equal to
    the tower width.

The prompt must hold exactly `image_token_count(...)` `<image>` ids per image row
(`expand_image_tokens` turns each single `<image>` into that many). The released checkpoint's
Qwen2.5 `generation_config.json` asks for `repetition_penalty=1.1`; pass it to reproduce
`image2text.py` (the default here, 1.0, is plain greedy decoding).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unipic_jax.models.unipic import UniPic, UniPicConfig, llm_module, splice_image_features
from unipic_jax.sampling import text

PATHS = ("mar", "siglip")


def image_token_count(config: UniPicConfig, image_hw: tuple[int, int], path: str = "mar") -> int:
    """`<image>` ids one image of `image_hw` pixels takes in the prompt on `path`."""
    if path == "mar":
        f = config.vae.downsample_factor
        return (image_hw[0] // f) * (image_hw[1] // f) + config.buffer_size
    if path == "siglip":
        return config.siglip.num_patches
    raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def expand_image_tokens(ids: Sequence[int], image_id: int, count: int) -> list[int]:
    """Token ids with every single `image_id` replaced by `count` copies (the scripts' expansion)."""
    out: list[int] = []
    for i in ids:
        out.extend([image_id] * count if i == image_id else [i])
    return out


@functools.partial(jax.jit, static_argnames=("model", "path"))
def image_features(model: UniPic, params, images_bhwc, path: str = "mar"):
    """LLM-ready image tokens (b, K, llm_dim) of images (b, H, W, 3) in [-1, 1] (see the module
    docstring for the two paths)."""
    variables = {"params": params}
    if path == "mar":
        tokens = model.apply(variables, images_bhwc, method=UniPic.encode)
        return model.apply(variables, tokens, method=UniPic.extract_visual_feature)[1]
    if path == "siglip":
        config = model.config
        size = config.siglip.image_size
        if tuple(images_bhwc.shape[1:3]) != (size, size):
            raise ValueError(f"the SigLIP path takes {size}x{size} images, got {images_bhwc.shape[1:3]}")
        if config.projectors.siglip_dim != config.siglip.hidden_size:
            raise ValueError(f"siglip2_proj takes width {config.projectors.siglip_dim} but the tower gives "
                             f"{config.siglip.hidden_size}")
        return model.apply(variables, images_bhwc, method=UniPic.siglip_features)
    raise ValueError(f"path must be one of {PATHS}, got {path!r}")


@functools.partial(jax.jit, static_argnames=("model",))
def prompt_embeddings(model: UniPic, params, ids_bl, features_bkd):
    """Embeddings of prompt ids (b, L) with the image features (b or 1, K, D) at the `<image>` ids."""
    embeds = model.apply({"params": params}, ids_bl, method=UniPic.embed)
    return splice_image_features(embeds, ids_bl, model.config.tokens.image, features_bkd)


def caption(model: UniPic, params, images_bhwc, input_ids, attention_mask=None, *, path: str = "mar",
            max_new_tokens: int, eos_id: Optional[int] = None, pad_id: Optional[int] = None,
            repetition_penalty: float = 1.0, rng: Optional[jax.Array] = None, temperature: float = 1.0,
            top_k: int = 0, top_p: float = 1.0, forced_ids=None, return_logits: bool = False,
            bucket: int = 128, on_token=None) -> text.Generation:
    """Describe images: features on `path`, spliced at the `<image>` ids of `input_ids` (b, L), then
    `text.generate` (greedy without `rng`). `eos_id` / `pad_id` default to the config's tokens.

    `attention_mask` (b, L), 1 = valid, None = all valid (the script passes none). `on_token`
    streams the tokens as they are chosen (`text.generate`).
    """
    tokens = model.config.tokens
    ids = np.asarray(input_ids)
    count = image_token_count(model.config, tuple(np.shape(images_bhwc)[1:3]), path)
    per_row = np.sum(ids == tokens.image, axis=1)
    if not np.all(per_row == count):
        raise ValueError(f"rows hold {per_row.tolist()} <image> ids; the {path} path needs {count} per image "
                         f"(use expand_image_tokens)")
    features = image_features(model, params, jnp.asarray(images_bhwc), path)
    embeds = prompt_embeddings(model, params, jnp.asarray(ids, jnp.int32), features)
    return text.generate(llm_module(model), params["llm"], embeds, attention_mask,
                         max_new_tokens=max_new_tokens, eos_id=tokens.eos if eos_id is None else eos_id,
                         pad_id=tokens.pad if pad_id is None else pad_id, rng=rng, temperature=temperature,
                         top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                         forced_ids=forced_ids, return_logits=return_logits, bucket=bucket, on_token=on_token)
