"""Parity rows for unipic/: the composed model, its samplers and its training forward.

Cases (each a safetensors file of the fixture, sizes and kwargs from meta.json):
  * parts: encode, extract_visual_feature (fed the reference `encode`), decode, siglip2_proj.
    Single forward passes: FORWARD.
  * t2i, t2i_resized, edit: the whole `sample` call replayed with the recorded draws through the
    default (bucketed) sampler. Every per-step capture and the final tokens and image are sampling
    chains: CHAIN; masks and orders exact; the prompt pass (and editing's source features and
    spliced prompt) FORWARD. Padded prompt positions of the prompt pass are compared too: the
    port runs the prefill without a padding mask, as the reference does.
  * i2t: image -> features -> spliced prompt -> greedy generation. Ids exact; every logit a single
    forward (the prompt pass, each cached step, each teacher-forced step): FORWARD.
  * t2i_train_forward: encode, the cache-free LLM path, the decoder and the diffusion loss, each
    a forward pass fed our own previous output: FORWARD.
The bfloat16 twins (`*_bf16`) are compared by `parity/bf16.py` at their meta.json bounds.
"""

from __future__ import annotations

import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from convert.unipic import unipic_params_from_torch
from unipic_jax.models import diffusion
from unipic_jax.models.unipic import UniPic, UniPicConfig, head_module, llm_module
from unipic_jax.parity import bf16
from unipic_jax.parity import CHAIN, FORWARD, Fixture, Row, compare, compare_exact, draws
from unipic_jax.sampling import caption, t2i
from unipic_jax.sampling.schedule import mask_schedule

NAME = "unipic"
SAMPLE_CASES = ("t2i", "t2i_resized", "edit")
STEP_OUTPUTS = ("tokens_in", "llm_last_hidden_state", "x_enc", "z_dec", "z_sel", "sampled")


@functools.cache
def load(fx: Fixture) -> tuple[UniPic, dict]:
    """The float32 model and its params from the fixture's weights."""
    config = UniPicConfig.from_config(fx.config())
    return UniPic(config), unipic_params_from_torch(fx.weights, config)


def nhwc(x_nchw) -> np.ndarray:
    return np.transpose(np.asarray(x_nchw), (0, 2, 3, 1))


def nchw(x_nhwc) -> np.ndarray:
    return np.transpose(np.asarray(x_nhwc), (0, 3, 1, 2))


def _apply(model: UniPic, params, method, *args, **kwargs):
    return jax.jit(functools.partial(model.apply, method=method, **kwargs))({"params": params}, *args)


def part_rows(fx: Fixture) -> Iterator[Row]:
    model, params = load(fx)
    io = fx.file("parts")
    yield compare(NAME, "parts/encode", _apply(model, params, UniPic.encode, nhwc(io["img"])), io["encode"], FORWARD)
    x_enc, z_enc = _apply(model, params, UniPic.extract_visual_feature, io["encode"])
    yield compare(NAME, "parts/extract_x_enc", x_enc, io["extract_x_enc"], FORWARD)
    yield compare(NAME, "parts/extract_z_enc", z_enc, io["extract_z_enc"], FORWARD)
    yield compare(NAME, "parts/decode", nchw(_apply(model, params, UniPic.decode, io["toks"])), io["decode"], FORWARD)
    proj = _apply(model, params, lambda m, x: m.siglip2_proj(x), io["sig_in"])
    yield compare(NAME, "parts/siglip2_proj", proj, io["siglip2_proj"], FORWARD)


def replay(fx: Fixture, case: str, buckets: t2i.Buckets = t2i.DEFAULT_BUCKETS) -> t2i.Sample:
    """Run one sampling case (t2i, t2i_resized or edit) with its recorded draws, capturing."""
    model, params = load(fx)
    tensors = fx.file(case)
    kwargs = fx.meta["cases"][case]["kwargs"]
    image_shape = tuple(kwargs["image_shape"])
    cfg = float(kwargs["cfg"])
    guided = cfg != 1.0
    rows = tensors["input_ids"].shape[0]
    batch = rows // 2 if guided else rows
    steps = mask_schedule(image_shape[0] * image_shape[1], kwargs["num_iter"])
    recorded = t2i.prepare_draws_from_fixture(
        draws(tensors, ""), batch=batch, steps=steps, guided=guided,
        num_diffusion_steps=diffusion.sampling_schedule(model.config.diffusion).num_steps)
    common = dict(num_iter=kwargs["num_iter"], cfg=cfg, cfg_schedule=kwargs["cfg_schedule"],
                  temperature=float(kwargs["temperature"]), draws=recorded, buckets=buckets, capture=True)
    if "src" in tensors:
        return t2i.edit(model, params, nhwc(tensors["src"]), tensors["input_ids"], tensors["attention_mask"],
                        **common)
    return t2i.text_to_image(model, params, tensors["input_ids"], tensors["attention_mask"],
                             image_shape=image_shape, **common)


def sample_rows(fx: Fixture, case: str) -> Iterator[Row]:
    tensors = fx.file(case)
    if "src" in tensors:
        yield from _edit_input_rows(fx, case)
    out = replay(fx, case)
    batch = out.orders.shape[0]
    yield compare(NAME, f"{case}/prefix_last_hidden_state", out.prefix_hidden, tensors["prefix_last_hidden_state"],
                  FORWARD)
    yield compare_exact(NAME, f"{case}/orders", out.orders, tensors["orders_returned"][:batch])
    for s, captured in enumerate(out.steps):
        yield compare_exact(NAME, f"{case}/step{s}/mask_in", captured["mask_in"], tensors[f"step{s}/mask_in"])
        for name in STEP_OUTPUTS:
            yield compare(NAME, f"{case}/step{s}/{name}", captured[name], tensors[f"step{s}/{name}"], CHAIN)
    yield compare(NAME, f"{case}/tokens_final", out.tokens, tensors["tokens_final"], CHAIN)
    yield compare(NAME, f"{case}/pred", nchw(out.images), tensors["pred"], CHAIN)


def _edit_input_rows(fx: Fixture, case: str) -> Iterator[Row]:
    """Editing's source side: source tokens, x_con, z_src and the spliced prompt (forward passes)."""
    model, params = load(fx)
    tensors = fx.file(case)
    cfg = float(fx.meta["cases"][case]["kwargs"]["cfg"])
    inputs = t2i.prepare_edit(model, params, nhwc(tensors["src"]), tensors["input_ids"], tensors["attention_mask"],
                              cfg=cfg)
    length = tensors["input_ids"].shape[1]
    yield compare(NAME, f"{case}/src_tokens", inputs.source_tokens, tensors["src_tokens"], FORWARD)
    yield compare(NAME, f"{case}/x_con", inputs.x_con[:1], tensors["x_con"], FORWARD)
    yield compare(NAME, f"{case}/z_enc", inputs.z_src, tensors["z_enc"], FORWARD)
    yield compare(NAME, f"{case}/inputs_embeds", inputs.embeds[:, :length], tensors["inputs_embeds"], FORWARD)


def i2t_rows(fx: Fixture) -> Iterator[Row]:
    model, params = load(fx)
    tensors, meta = fx.file("i2t"), fx.meta["cases"]["i2t"]
    image, ids = jnp.asarray(nhwc(tensors["image"])), tensors["input_ids"]
    features = caption.image_features(model, params, image)
    embeds = caption.prompt_embeddings(model, params, jnp.asarray(ids, jnp.int32), features)
    yield compare(NAME, "i2t/z_enc", features, tensors["z_enc"], FORWARD)
    yield compare(NAME, "i2t/inputs_embeds", embeds, tensors["inputs_embeds"], FORWARD)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    prompt = jax.jit(functools.partial(llm_module(model).apply, return_logits=True))(
        {"params": params["llm"]}, embeds, positions)
    yield compare(NAME, "i2t/prompt_logits", prompt.logits, tensors["prompt_logits"], FORWARD)
    settings = dict(max_new_tokens=meta["max_new_tokens"], eos_id=meta["eos_token_id"], pad_id=meta["pad_token_id"],
                    return_logits=True)
    free = caption.caption(model, params, image, ids, **settings)
    yield compare_exact(NAME, "i2t/generated_ids", free.ids, tensors["generated_ids"])
    yield compare(NAME, "i2t/first_step_logits", free.logits[:, 0], tensors["first_step_logits"], FORWARD)
    forced = caption.caption(model, params, image, ids, forced_ids=tensors["generated_ids"], **settings)
    yield compare(NAME, "i2t/step_logits", forced.logits, tensors["step_logits"], FORWARD)


@functools.partial(jax.jit, static_argnames=("model", "num_visible", "image_shape", "diffusion_batch_mul"))
def _train_forward(model: UniPic, params, tables, image_bhwc, mask_bl, ids_bt, text_mask_bt, t, noise,
                   num_visible: int, image_shape: tuple[int, int], diffusion_batch_mul: int):
    variables = {"params": params}
    tokens = model.apply(variables, image_bhwc, method=UniPic.encode)
    gt_blc = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])
    embeds = model.apply(variables, ids_bt, method=UniPic.embed)
    x_enc = model.apply(variables, gt_blc, mask_bl, num_visible, image_shape, embeds, text_mask_bt,
                        method=UniPic.forward_mae_encoder)
    z = model.apply(variables, x_enc, mask_bl, image_shape, method=lambda m, *a: m.mar.decode(*a))
    loss = diffusion.forward_loss(head_module(model), params["diffusion_head"], tables, z, gt_blc, mask_bl, t,
                                  noise, diffusion_batch_mul)
    return dict(gt_latents=gt_blc, x_enc=x_enc, z=z, loss=loss)


def train_forward_rows(fx: Fixture) -> Iterator[Row]:
    model, params = load(fx)
    tensors = fx.file("t2i_train_forward")
    mask = tensors["mask"]
    visible = np.sum(mask == 0, axis=1)
    if not np.all(visible == visible[0]):
        raise ValueError(f"t2i_train_forward mask rows keep {visible.tolist()} tokens; the reference needs one count")
    image = nhwc(tensors["image"])
    f = model.config.vae.downsample_factor
    t, noise = draws(tensors, "")
    got = _train_forward(model, params, diffusion.train_schedule(model.config.diffusion).tables(), image, mask,
                         tensors["input_ids"], tensors["attention_mask"], t, noise, int(visible[0]),
                         (image.shape[1] // f, image.shape[2] // f), model.config.mar.diffusion_batch_mul)
    for name in ("gt_latents", "x_enc", "z", "loss"):
        yield compare(NAME, f"t2i_train_forward/{name}", got[name], tensors[name], FORWARD)


def rows(fx: Fixture) -> Iterator[Row]:
    """Every case of unipic/: the float32 cases here, then the bf16 twins (parity/bf16.py)."""
    yield from part_rows(fx)
    for case in SAMPLE_CASES:
        yield from sample_rows(fx, case)
    yield from i2t_rows(fx)
    yield from train_forward_rows(fx)
    yield from bf16.rows(fx)
