"""Benchmark one training step: compile time, step time, tokens/s, FLOPs and MFU.

    python bench/train_step.py --config smoke                       # tiny model, runs anywhere
    python bench/train_step.py --config ct:batch=4 --steps 5        # full size (an accelerator)
    python bench/train_step.py --config sft:batch=4 --shapes-only   # full-size FLOPs, nothing allocated

The step is the real `train_step` of `unipic_jax.train.loop` (all the stage's tasks, its trainable
set, optimiser and EMA) on a synthetic batch of the stage's shapes: random pixels, prompts of
`max_length` tokens holding the right number of `<image>` ids, answers on the last tokens. FLOPs
come from XLA's cost analysis of the compiled step (one device's share of an SPMD program; for
`--shapes-only`, of the lowered program before compilation: an estimate). MFU = FLOPs per step /
step time / peak FLOP/s per device; the peak is looked up by device kind (`loop.PEAK_FLOPS`) or given with --peak-flops.
Tokens/s counts what the LLM reads per step (`loop.tokens_per_step`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.stages import image_tokens  # noqa: E402
from unipic_jax.train import data as data_lib  # noqa: E402
from unipic_jax.train import loop  # noqa: E402


def synthetic_batch(config, seed: int = 0) -> dict:
    """One host batch of the stage's shapes (per-task batch sizes, max_length, resolutions)."""
    rng = np.random.default_rng(seed)
    d, tokens, mar = config.data, config.model.tokens, config.model.mar

    def pixels(n, res):
        return rng.uniform(-1, 1, (n, res, res, 3)).astype(np.float32)

    def ids(n, length, images=0):
        out = rng.integers(0, min(tokens.eos, tokens.image, tokens.pad) - 1, (n, length)).astype(np.int32)
        out[:, :images] = tokens.image
        return out

    batch = {}
    for task in data_lib.active_tasks(config):
        n, length = d.batch_size[task], d.max_length[task]
        mask = np.ones((n, length), bool)
        if task == "t2i":
            batch[task] = {"image": pixels(n, d.gen_resolution), "input_ids": ids(n, length), "attention_mask": mask}
        elif task == "edit":
            batch[task] = {"source": pixels(n, d.gen_resolution), "target": pixels(n, d.gen_resolution),
                           "input_ids": ids(n, length, image_tokens(d.gen_resolution, mar)), "attention_mask": mask}
        else:
            input_ids = ids(n, length, image_tokens(d.und_resolution, mar))
            labels = np.full_like(input_ids, -100)
            labels[:, -d.answer_slots:] = input_ids[:, -d.answer_slots:]
            batch[task] = {"image": pixels(n, d.und_resolution), "input_ids": input_ids,
                           "attention_mask": mask, "labels": labels}
    return batch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="smoke", help="stage NAME[:ARG] or FILE.py[:ARG] (default smoke)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 2 untimed ones)")
    p.add_argument("--peak-flops", type=float, default=0.0, help="peak FLOP/s per device (default: by device kind)")
    p.add_argument("--shapes-only", action="store_true", help="lower with abstract shapes, report FLOPs only")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)

    config = loop.apply_overrides(loop.load_stage_config(args.config), args.set)
    batch = synthetic_batch(config)
    step_tokens = loop.tokens_per_step(batch, loop.generated_tokens(config))
    result = {"config": args.config, "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
              "batch": {t: int(b["input_ids"].shape[0]) for t, b in batch.items()},
              "tokens_per_step": step_tokens}
    key = jax.random.key(0)
    if args.shapes_only:
        trainer = _abstract_trainer(config)
        start = time.perf_counter()
        lowered = jax.jit(trainer.train_step).lower(trainer.abstract_state(), batch, key)
        cost = lowered.cost_analysis()
        result.update(lower_s=time.perf_counter() - start, flops_per_step=float(cost.get("flops", 0.0)))
        _report(result, args.json)
        return 0

    trainer = loop.Trainer(config)
    state = trainer.init_state()
    device_batch = jax.device_put(batch)
    start = time.perf_counter()
    state, metrics, flops = trainer.step(state, device_batch, key)
    jax.block_until_ready(metrics)
    result["compile_and_first_step_s"] = time.perf_counter() - start
    state, metrics, _ = trainer.step(state, device_batch, jax.random.fold_in(key, 1))  # warm
    jax.block_until_ready(metrics)
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        state, metrics, _ = trainer.step(state, device_batch, jax.random.fold_in(key, i + 2))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    peak = loop.peak_flops_per_device(args.peak_flops)  # cost analysis counts one device's share
    result.update(step_s_median=step_s, step_s_min=min(times), steps_per_s=1 / step_s,
                  tokens_per_s=step_tokens / step_s, flops_per_step=flops, tflops_per_s=flops / step_s / 1e12,
                  mfu=(flops / step_s / peak) if peak else None, loss=float(metrics["loss"]))
    _report(result, args.json)
    return 0


def _abstract_trainer(config):
    """A Trainer whose initial params are shapes only (nothing allocated)."""
    from unipic_jax.models.unipic import UniPicConfig, param_shapes

    shapes = param_shapes(UniPicConfig.from_config(config.model))
    return loop.Trainer(config, params=shapes)


def _report(result: dict, path) -> None:
    for k, v in result.items():
        print(f"{k:>26}: {v:.4g}" if isinstance(v, float) else f"{k:>26}: {v}")
    if path:
        Path(path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
