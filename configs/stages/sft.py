"""Stage 4, supervised fine-tuning (Table 1 "SFT"): everything but the VAE trains on reward-filtered
data incl. editing. LR 5e-6, cosine, 1 % warmup, weight decay 0.02, EMA 0.995, U:G:E = 0.01:1:1;
1024 px generation, 512 px understanding; global batch 512 split 2:1:1 over t2i, edit, und.
Steps: 2 epochs of 3M samples at batch 512.
"""

from configs.stages import ALL_BUT_VAE, apply_arg, stage_config

RATIO = {"t2i": 2, "edit": 1, "und": 1}


def get_config(arg: str = ""):
    c = stage_config(
        "sft", lr=5e-6, schedule="cosine", weight_decay=0.02, warmup_ratio=0.01, ema_decay=0.995,
        loss_weights={"t2i": 1.0, "edit": 1.0, "und": 0.01}, trainable=ALL_BUT_VAE,
        gen_resolution=1024, und_resolution=512, batch=512, batch_ratio=RATIO, total_steps=11_719)
    return apply_arg(c, arg, RATIO)
