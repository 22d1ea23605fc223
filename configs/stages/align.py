"""Stage 2, alignment (Table 1 "Alignment"): only the projectors (proj_in, proj_out) train; the LLM,
the MAR and the VAE are frozen. LR 1e-5, cosine, 5 % warmup, weight decay 0.02, no EMA; generation
at 1024 px, understanding at 512 px.

Table 1 gives no loss weights for this stage; the default uses CT's generation and understanding
weights (G 1, U 0.01) without editing. The batch (not in the table) defaults to PT's 4096, split 3:1
between text-to-image and understanding. Steps: 3 epochs of 130M samples at batch 4096.
"""

from configs.stages import apply_arg, stage_config

RATIO = {"t2i": 3, "und": 1}


def get_config(arg: str = ""):
    c = stage_config(
        "align", lr=1e-5, schedule="cosine", weight_decay=0.02, warmup_ratio=0.05, ema_decay=None,
        loss_weights={"t2i": 1.0, "edit": 0.0, "und": 0.01}, trainable=("proj_in", "proj_out"),
        gen_resolution=1024, und_resolution=512, batch=4096, batch_ratio=RATIO, total_steps=95_215)
    return apply_arg(c, arg, RATIO)
