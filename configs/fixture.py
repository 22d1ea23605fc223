"""Configs built from a fixture folder's meta.json, so tests never hard-code sizes.

`get_config(path)` takes a fixture subfolder (vae/, mar/, qwen2/, siglip/, unipic/) or its
meta.json and returns a ConfigDict in the schema of `configs/unipic_1p5b.py`, holding the
sections that fixture describes. The translators below map the reference's constructor
arguments (MAR kwargs, HF config.json fields) onto that schema.
"""

import json
from pathlib import Path

import ml_collections

from configs import unipic_1p5b


def vae_section(ref: dict) -> dict:
    return dict(
        embed_dim=ref["embed_dim"], ch=ref.get("ch", 128), ch_mult=tuple(ref["ch_mult"]),
        num_res_blocks=ref.get("num_res_blocks", 2),
        attn_resolutions=tuple(ref.get("encoder_attn_resolutions", (16,))),
        resolution=ref.get("encoder_resolution_for_attn", 256), in_channels=3, out_ch=3,
        norm_groups=ref.get("groupnorm_groups", 32), norm_eps=ref.get("groupnorm_eps", 1e-6),
    )


def mar_section(ref: dict) -> dict:
    return dict(
        img_size=ref["img_size"], vae_stride=ref["vae_stride"], patch_size=ref["patch_size"],
        token_dim=ref["vae_embed_dim"] * ref["patch_size"] ** 2,
        encoder_dim=ref["encoder_embed_dim"], encoder_depth=ref["encoder_depth"],
        encoder_heads=ref["encoder_num_heads"], decoder_dim=ref["decoder_embed_dim"],
        decoder_depth=ref["decoder_depth"], decoder_heads=ref["decoder_num_heads"],
        mlp_ratio=ref["mlp_ratio"], buffer_size=ref["buffer_size"], class_num=ref["class_num"],
        ln_eps=1e-6, mask_ratio_min=ref["mask_ratio_min"],
        diffusion_batch_mul=ref["diffusion_batch_mul"],
        attn_dropout=ref.get("attn_dropout", 0.1), proj_dropout=ref.get("proj_dropout", 0.1),
    )


def diffusion_section(ref: dict) -> dict:
    """From MAR kwargs (the head lives inside the reference MAR)."""
    return dict(
        token_dim=ref["vae_embed_dim"] * ref["patch_size"] ** 2, cond_dim=ref["decoder_embed_dim"],
        width=ref["diffloss_w"], depth=ref["diffloss_d"], num_train_steps=1000,
        num_sampling_steps=str(ref["num_sampling_steps"]), max_beta=0.2,
    )


# transformers' `Qwen2Config` defaults (the same in 4.x and 5.x) for the fields a config.json may
# leave out. The sizes (vocab, widths, layer and head counts) are not here: transformers' values for
# them are those of a 7B model, so an omitted size is reported (convert/qwen2.py) rather than guessed.
QWEN2_HF_DEFAULTS = dict(num_key_value_heads=32, rms_norm_eps=1e-6, rope_theta=10000.0,
                         max_position_embeddings=32768, tie_word_embeddings=False)

# transformers' `SiglipVisionConfig` defaults: transformers 4.x leaves every field equal to these out
# of a `SiglipModel`'s nested `vision_config` (a patch-16 tower's config holds no patch_size).
SIGLIP_HF_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                          layer_norm_eps=1e-6)


def qwen2_section(hf: dict) -> dict:
    """The `qwen2` section from a Hugging Face Qwen2 config.json dict, read as transformers reads it:
    omitted fields take `QWEN2_HF_DEFAULTS`, `num_key_value_heads: null` means one KV head per
    attention head, `rope_theta` may sit in 5.x's `rope_parameters`."""
    rope_theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta")
    hf = {**QWEN2_HF_DEFAULTS, **hf}
    heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf["num_key_value_heads"] or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=float(rope_theta or QWEN2_HF_DEFAULTS["rope_theta"]),
        rms_eps=float(hf["rms_norm_eps"]), tie_embeddings=bool(hf["tie_word_embeddings"]),
        max_position_embeddings=int(hf["max_position_embeddings"]),
    )


def siglip_section(hf: dict, use_head: bool = True) -> dict:
    """The `siglip` section from a `SiglipVisionConfig` dict; omitted fields take
    `SIGLIP_HF_DEFAULTS`, as in transformers."""
    hf = {**SIGLIP_HF_DEFAULTS, **hf}
    return dict(
        hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        num_channels=hf["num_channels"], image_size=hf["image_size"],
        patch_size=hf["patch_size"], ln_eps=float(hf["layer_norm_eps"]), use_head=use_head,
    )


def read_meta(path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "meta.json"
    return json.loads(path.read_text())


def get_config(path) -> ml_collections.ConfigDict:
    """ConfigDict for the fixture at `path` (folder or meta.json)."""
    meta = read_meta(path)
    ref, kind = meta["config"], meta.get("fixture", Path(path).name)
    c = unipic_1p5b.get_config()
    c.name = f"fixture:{kind}"
    keep = set()
    if "mar" in ref:  # unipic/: a nested config of every part
        c.vae.update(vae_section(ref["vae"]))
        c.vae_scale = ref.get("vae_scale", c.vae_scale)
        c.mar.update(mar_section(ref["mar"]))
        c.diffusion.update(diffusion_section(ref["mar"]))
        c.qwen2.update(qwen2_section(ref["llm"]))
        c.siglip.update(siglip_section(ref["siglip"]))
        c.projectors.update(dict(mar_dim=ref["mar"]["encoder_embed_dim"], llm_dim=ref["llm"]["hidden_size"],
                                 siglip_dim=ref.get("siglip2_proj_in_features", 1152)))
        ids = ref["special_ids"]
        c.tokens.update(dict(image=ids["image"], eos=ids["eos"], pad=ids["pad"], bos=ids.get("bos", ids["pad"])))
        keep = {"vae", "vae_scale", "mar", "diffusion", "qwen2", "siglip", "projectors", "tokens"}
    elif "ch_mult" in ref:
        c.vae.update(vae_section(ref))
        keep = {"vae"}
    elif "img_size" in ref:
        c.mar.update(mar_section(ref))
        c.diffusion.update(diffusion_section(ref))
        keep = {"mar", "diffusion"}
    elif "rope_theta" in ref:
        c.qwen2.update(qwen2_section(ref))
        keep = {"qwen2"}
    elif "patch_size" in ref:
        c.siglip.update(siglip_section(ref, meta.get("vision_use_head", True)))
        keep = {"siglip"}
    for section in ("vae", "vae_scale", "mar", "diffusion", "qwen2", "siglip", "projectors", "tokens"):
        if section not in keep:
            del c[section]
    return c
