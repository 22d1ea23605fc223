"""A tiny stage for smoke runs, tests and benches: every task, every module but the VAE trainable.

The model has the sizes of the `unipic/` test fixture (a 64-wide, 2-layer everything, 4 buffer
tokens, 512-id vocabulary), 32-px images (a 2x2 latent grid) and float32 compute, so a step runs in
well under a second on a CPU. `arg` takes the shortcuts of configs/stages (steps, batch, lr, seed,
tokenizer, init_from, dtype) plus `fixture=PATH` to take the model sizes from a fixture folder's
meta.json and `res=N` for the image side.
"""

import ml_collections

from configs import unipic_1p5b
from configs.stages import ALL_BUT_VAE, apply_arg, parse_arg, stage_config

RATIO = {"t2i": 1, "edit": 1, "und": 1}


def tiny_model() -> ml_collections.ConfigDict:
    """The configs/unipic_1p5b.py schema at the unipic fixture's sizes."""
    c = unipic_1p5b.get_config()
    c.name = "tiny"
    c.vae.update(dict(embed_dim=16, ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=2))
    c.mar.update(dict(img_size=64, encoder_dim=64, encoder_depth=2, encoder_heads=4, decoder_dim=64,
                      decoder_depth=2, decoder_heads=4, buffer_size=4, class_num=10))
    c.diffusion.update(dict(cond_dim=64, width=64, depth=2))
    c.qwen2.update(dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16))
    c.siglip.update(dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, image_size=64))
    c.projectors.update(dict(mar_dim=64, llm_dim=64))
    c.tokens.update(dict(image=511, eos=509, pad=510, bos=507))
    return c


def get_config(arg: str = ""):
    extra = parse_arg(arg)
    fixture, res = extra.pop("fixture", ""), int(extra.pop("res", 32))
    if fixture:
        from configs.fixture import get_config as fixture_config

        model = fixture_config(fixture)
        model.dtype = "float32"
    else:
        model = tiny_model()
    c = stage_config(
        "smoke", lr=1e-3, schedule="constant", weight_decay=0.02, warmup_ratio=0.0, ema_decay=0.9,
        loss_weights={"t2i": 1.0, "edit": 1.0, "und": 1.0}, trainable=ALL_BUT_VAE,
        gen_resolution=res, und_resolution=res, batch=12, batch_ratio=RATIO, total_steps=50,
        model=model, text_length=64, answer_length=16)
    c.remat = "none"
    c.log_every = 1
    for task in ("t2i", "edit", "und"):
        c.data.buckets[task] = (c.data.max_length[task],)
    c.data.num_threads = 2
    c.checkpoint.update(dict(every=10, keep=2))
    return apply_arg(c, ",".join(f"{k}={v}" for k, v in extra.items()), RATIO)
