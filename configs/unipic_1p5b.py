"""UniPic-1 1.5B at its released sizes (reference-spec §1-§7).

Every model config in the package uses this schema; `configs/fixture.py` fills the same fields from
a fixture's meta.json. Usage: `get_config()` or `get_config("bf16")` for the inference dtype.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "unipic_1p5b"
    c.dtype = "bfloat16" if arg == "bf16" else "float32"  # compute dtype; params stay float32

    # KL-16 VAE (LDM AutoencoderKL). Attention sits at the encoder levels whose nominal
    # resolution `resolution // 2**level` is listed in attn_resolutions (level 4 of 5 here).
    c.vae = ml_collections.ConfigDict(dict(
        embed_dim=16, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
        attn_resolutions=(16,), resolution=256, in_channels=3, out_ch=3,
        norm_groups=32, norm_eps=1e-6,
    ))
    c.vae_scale = 0.2325  # latent std normaliser: tokens = mode * vae_scale

    # MAR-Huge encoder/decoder (timm blocks, pre-LN eps 1e-6, erf GELU, qkv bias). The dropouts act
    # in training only: attn_dropout on the attention probabilities, proj_dropout after attn.proj,
    # the MLP's GELU and fc2 (timm's attn_drop / proj_drop).
    c.mar = ml_collections.ConfigDict(dict(
        img_size=512, vae_stride=16, patch_size=1, token_dim=16,
        encoder_dim=1280, encoder_depth=20, encoder_heads=16,
        decoder_dim=1280, decoder_depth=20, decoder_heads=16,
        mlp_ratio=4, buffer_size=64, class_num=1000, ln_eps=1e-6,
        mask_ratio_min=0.7, diffusion_batch_mul=4, attn_dropout=0.1, proj_dropout=0.1,
    ))

    # DiffLoss: SimpleMLPAdaLN head + Gaussian diffusion (cosine betas capped at 0.2).
    c.diffusion = ml_collections.ConfigDict(dict(
        token_dim=16, cond_dim=1280, width=1536, depth=12,
        num_train_steps=1000, num_sampling_steps="100", max_beta=0.2,
    ))

    # Qwen2.5-1.5B-Instruct decoder.
    c.qwen2 = ml_collections.ConfigDict(dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
        num_heads=12, num_kv_heads=2, head_dim=128, rope_theta=1e6, rms_eps=1e-6,
        tie_embeddings=True, max_position_embeddings=32768,
    ))

    # SigLIP2 so400m/16 at 512 px (vision tower only).
    c.siglip = ml_collections.ConfigDict(dict(
        hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16,
        num_channels=3, image_size=512, patch_size=16, ln_eps=1e-6, use_head=True,
    ))

    # Linear-SiLU-Linear projectors; siglip_dim is hard-coded to 1152 in the reference.
    c.projectors = ml_collections.ConfigDict(dict(mar_dim=1280, llm_dim=1536, siglip_dim=1152))

    # Token ids of the real Qwen2.5 tokenizer (<image> is added by UniPic).
    c.tokens = ml_collections.ConfigDict(dict(image=151665, eos=151645, pad=151643, bos=151643))
    return c
