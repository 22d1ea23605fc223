"""Stage 1, pre-training (Table 1 "PT"): the MAR encoder/decoder and diffusion head on text-to-image
at 512 px; everything else frozen. LR 5e-5 constant after a 5 % warmup, no weight decay, EMA 0.9999,
global batch 4096.

Steps: the paper's 800 epochs over 130M samples would be 25M steps at batch 4096; the default is one
pass over 130M samples (31,738 steps). Set it with `steps=N`.
"""

from configs.stages import apply_arg, stage_config

RATIO = {"t2i": 1}


def get_config(arg: str = ""):
    c = stage_config(
        "pt", lr=5e-5, schedule="constant", weight_decay=0.0, warmup_ratio=0.05, ema_decay=0.9999,
        loss_weights={"t2i": 1.0, "edit": 0.0, "und": 0.0}, trainable=("mar", "diffusion_head"),
        gen_resolution=512, und_resolution=256, batch=4096, batch_ratio=RATIO, total_steps=31_738)
    return apply_arg(c, arg, RATIO)
