"""Training stage configs (reference-spec §11.5, paper Table 1), one file per stage.

`get_config(arg)` in pt.py, align.py, ct.py, sft.py and smoke.py returns a ConfigDict with

  stage, seed, total_steps, log_every, remat (gradient checkpointing, below), init_from (a
  unipic_jax.checkpoint directory: the previous stage's exported params), tokenizer (a Hugging
  Face folder; empty = a byte-level stand-in for tiny models), peak_flops (per device, 0 = by
  device kind), model (the configs/unipic_1p5b.py schema plus `dtype`, the compute dtype),
  loss_weights {t2i, edit, und} (the paper's G, E, U), optim {lr, schedule, warmup_ratio,
  warmup_start_factor, weight_decay, grad_clip, b1, b2, eps, trainable, frozen, ema_decay},
  data {gen_resolution, und_resolution, batch_size/max_length/buckets per task, answer_slots,
  cfg_drop_prob, edit_uncond_prob, edit_layout, seed, num_threads, workers,
  max_consecutive_corrupt, tfds_data_dir, fields}, checkpoint {every, keep, async_save}, lora
  {rank, alpha, modules, quantize} (rank 0: no LoRA; see unipic_jax/train/lora.py).

`arg` is "key=value,key=value" over a few shortcuts: steps (total_steps), batch (global batch,
split over the tasks by the stage's ratios), lr, seed, tokenizer, init_from, dtype.

remat: "none" keeps every activation for the backward pass; "components" rematerialises the MAR
encoder, the LLM, the MAR decoder and the diffusion head each as a whole; "blocks" (the default of
the real stages) rematerialises every transformer block / ResBlock inside every component on its own,
keeping only each block's input: the least activation memory, about one extra forward of compute.
The smoke stage uses "none".

Progressive resolution: each stage sets gen/und resolutions; the MAR keeps its position tables at
the native grid and resizes them on the fly (bilinear, as the reference), so moving between stages
only reuses the params (init_from).
"""

import math

import ml_collections

from configs import unipic_1p5b
from unipic_jax.quant import LORA_MODULES

# All stages except PT train these top-level modules. The VAE stays frozen; SigLIP2 and
# siglip2_proj never receive gradients in the reference (its AdamW skips them), so they are left
# out rather than given zero-gradient optimizer state.
ALL_BUT_VAE = ("mar", "diffusion_head", "llm", "proj_in", "proj_out")
# Never used by any loss: the reference's AdamW skips it (no gradient), so it must not decay here.
NO_GRADIENT = ("mar/class_emb",)


def parse_arg(arg: str) -> dict:
    """"a=1,b=x" -> {"a": "1", "b": "x"} (empty string -> {})."""
    out = {}
    for part in filter(None, (arg or "").split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"config argument {part!r}: want key=value")
        out[key.strip()] = value.strip()
    return out


def image_tokens(resolution: int, mar) -> int:
    """`<image>` ids of one image: latent tokens plus the MAR buffer."""
    side = resolution // (mar.vae_stride * mar.patch_size)
    return side * side + mar.buffer_size


def stage_config(stage: str, *, lr: float, schedule: str, weight_decay: float, warmup_ratio: float,
                 ema_decay, loss_weights: dict, trainable, gen_resolution: int, und_resolution: int,
                 batch: int, batch_ratio: dict, total_steps: int, model=None, text_length: int = 128,
                 answer_length: int = 128) -> ml_collections.ConfigDict:
    """The common schema, filled for one stage."""
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.seed = 0
    c.total_steps = total_steps
    c.log_every = 10
    c.remat = "blocks"
    c.init_from = ""
    c.tokenizer = ""
    c.peak_flops = 0.0
    c.model = model if model is not None else unipic_1p5b.get_config("bf16")
    c.loss_weights = dict(loss_weights)
    c.optim = dict(lr=lr, schedule=schedule, warmup_ratio=warmup_ratio, warmup_start_factor=1e-5,
                   weight_decay=weight_decay, grad_clip=1.0, b1=0.9, b2=0.95, eps=1e-15,
                   trainable=tuple(trainable), frozen=NO_GRADIENT, ema_decay=ema_decay)
    mar = c.model.mar
    gen, und = image_tokens(gen_resolution, mar), image_tokens(und_resolution, mar)
    batch_size = split_batch(batch, batch_ratio, loss_weights)
    c.data = dict(
        gen_resolution=gen_resolution, und_resolution=und_resolution, batch_size=batch_size,
        max_length=dict(t2i=text_length, edit=gen + text_length, und=und + text_length + answer_length),
        # Text length buckets of t2i (two compiled shapes); edit/und rows are mostly image tokens
        # and keep one shape each.
        buckets=dict(t2i=(text_length // 2, text_length), edit=(gen + text_length,),
                     und=(und + text_length + answer_length,)),
        answer_slots=answer_length, cfg_drop_prob=0.1, edit_uncond_prob=0.0, edit_layout="train",
        seed=0, num_threads=8, workers=0, max_consecutive_corrupt=100, tfds_data_dir="", fields={})
    c.checkpoint = dict(every=1000, keep=3, async_save=True)
    # LoRA (unipic_jax/train/lora.py): rank 0 = full training; alpha None = 2 x rank; modules a
    # module-path regex (default: the LLM's attention/MLP and MAR's blocks); quantize int8/int4 =
    # a quantized frozen base (QLoRA).
    c.lora = dict(rank=0, alpha=None, modules=LORA_MODULES, quantize="")
    return c


def split_batch(batch: int, ratio: dict, loss_weights: dict) -> dict:
    """Per-task batch sizes in proportion to `ratio` over the tasks with a loss weight > 0."""
    active = {t: r for t, r in ratio.items() if loss_weights.get(t, 0) > 0 and r > 0}
    total = sum(active.values())
    sizes = {t: int(math.floor(batch * r / total)) for t, r in active.items()}
    first = next(iter(active))
    sizes[first] += batch - sum(sizes.values())
    return {t: sizes.get(t, 0) for t in ("t2i", "edit", "und")}


def _number(key: str, text: str, kind):
    """`kind(text)`, or a ValueError naming the config argument."""
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"config argument {key}={text!r}: want {'an int' if kind is int else 'a number'}") from None


def apply_arg(c: ml_collections.ConfigDict, arg: str, batch_ratio: dict) -> ml_collections.ConfigDict:
    """Apply the `arg` shortcuts to a stage config (a bad number is a one-line ValueError naming it)."""
    for key, value in parse_arg(arg).items():
        if key == "steps":
            c.total_steps = _number(key, value, int)
        elif key == "batch":
            c.data.batch_size = split_batch(_number(key, value, int), batch_ratio, c.loss_weights)
        elif key == "lr":
            c.optim.lr = _number(key, value, float)
        elif key == "seed":
            c.seed = _number(key, value, int)
        elif key in ("tokenizer", "init_from"):
            c[key] = value
        elif key == "dtype":
            c.model.dtype = value
        else:
            raise ValueError(f"unknown config argument {key!r} (steps, batch, lr, seed, tokenizer, "
                             f"init_from, dtype)")
    return c
