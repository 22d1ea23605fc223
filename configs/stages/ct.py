"""Stage 3, continued training (Table 1 "CT"): everything but the VAE trains (the LLM unfrozen).
LR 1e-5, cosine, 1 % warmup, weight decay 0.02, EMA 0.9999, U:G:E = 0.01:1:1; generation at 1024 px,
understanding at 512 px. Batch 4096 (PT's; not in the table) split 2:1:1 over t2i, edit, und.
Steps: 3 epochs of 130M samples.
"""

from configs.stages import ALL_BUT_VAE, apply_arg, stage_config

RATIO = {"t2i": 2, "edit": 1, "und": 1}


def get_config(arg: str = ""):
    c = stage_config(
        "ct", lr=1e-5, schedule="cosine", weight_decay=0.02, warmup_ratio=0.01, ema_decay=0.9999,
        loss_weights={"t2i": 1.0, "edit": 1.0, "und": 0.01}, trainable=ALL_BUT_VAE,
        gen_resolution=1024, und_resolution=512, batch=4096, batch_ratio=RATIO, total_steps=95_215)
    return apply_arg(c, arg, RATIO)
