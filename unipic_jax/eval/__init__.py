"""Images for the paper's benchmarks, written in the layouts their official scorers read.

    GenEval        geneval.py   OUT/00000/metadata.jsonl, OUT/00000/samples/0000.png ...
    DPG-Bench      dpg.py       OUT/STEM.png: a 2x2 grid of 4 samples, 2R x 2R
    GEdit-Bench    gedit.py     OUT/NAME/fullset/TASK/LANG/KEY.png (+ KEY_SRCIMG.png)
    ImgEdit-Bench  imgedit.py   OUT/KEY.png

Scoring stays with the benchmarks' own scripts (the README names the commands). `prepare`
reads and checks everything without the model; `run` samples the pending items with a loaded
`UniPicPipeline`. Per-image seeds, shards and resuming: `common`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from unipic_jax.eval import common, dpg, gedit, geneval, imgedit

BENCHMARKS = {"geneval": geneval, "dpg": dpg, "gedit": gedit, "imgedit": imgedit}


def prepare(benchmark: str, source, out_dir, *, settings: dict[str, Any], dtype: str, samples: Optional[int] = None,
            seed: int = 0, shard: tuple[int, int] = (0, 1), images=None, model_name: Optional[str] = None,
            redo: bool = False):
    """Read and check `benchmark`'s input `source` and the out-dir before the model is loaded.

    `settings` are the sampling arguments (size, steps, cfg, cfg_schedule, temperature);
    `samples` None takes the benchmark's default. Returns (module, plan, record): `record` is
    stored in every image (benchmark, base_seed, samples) and `plan.pending` are this shard's
    unfinished items. Raises ValueError (one line) for anything wrong."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}: want one of {', '.join(BENCHMARKS)}")
    module = BENCHMARKS[benchmark]
    source, out_dir = Path(source), Path(out_dir)
    if not source.exists():
        raise ValueError(f"{source}: no such file or folder")
    if benchmark != "imgedit" and images is not None:
        raise ValueError("--images goes with imgedit (the folder of its original images)")
    if benchmark != "gedit" and model_name is not None:
        raise ValueError("--model-name goes with gedit (the folder its scorer's --model_name names)")
    samples = module.DEFAULT_SAMPLES if samples is None else samples
    items = module.read(source, out_dir, samples=samples, images=None if images is None else Path(images),
                        model_name=model_name)
    record = {"benchmark": benchmark, "base_seed": seed, "samples": samples}
    plan = common.prepare(items, out_dir, shard=shard, expected={**record, **settings, "dtype": dtype}, redo=redo)
    return module, plan, record


def run(pipe, module, plan: common.Plan, record: dict[str, Any], settings: dict[str, Any], *,
        progress: bool = True, desc: str = "items") -> int:
    """Sample and write `plan.pending` with `pipe` (one call per image, each with its own seed);
    returns the number of items written."""
    from unipic_jax.images import load_image

    if module.TASK == "t2i":
        def make(item, seed):
            return pipe.generate(item.prompt, seed=seed, batch=1, progress=False, **settings)[0]
    else:
        def make(item, seed):
            return pipe.edit(load_image(item.image), item.prompt, seed=seed, progress=False, **settings)

    return common.execute(plan, make, module.write, base_seed=record["base_seed"], samples=record["samples"],
                          record=record, progress=progress, desc=desc)
