"""DPG-Bench (ELLA, Hu et al. 2024): one 2x2 grid of four samples per prompt file.

Followed: TencentQQGYLab/ELLA, README.md ("generate 4 images per prompt and grid them to 2x2
format ... the generated image's filename is the same with the prompt's filename") and
dpg_bench/compute_dpg_bench.py, which looks each image up by `basename.split('.')[0]` and crops
the cells (0,0,R,R), (R,0,2R,R), (0,R,R,2R), (R,R,2R,2R) for `--resolution R`. So for the prompt
file `prompts/STEM.txt`:

    OUT/STEM.png    a 2R x 2R grid (R = --size), samples 0, 1 / 2, 3 row by row

The evaluator scores every file in OUT, so nothing else is written there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unipic_jax.eval import common

TASK = "t2i"
DEFAULT_SAMPLES = 4


def read(source: Path, out_dir: Path, *, samples: int, **_) -> list[common.Item]:
    """Every `*.txt` in the prompts folder, sorted by name; the prompt is the file's text."""
    common.check_samples(samples, "dpg", allowed=4)
    if not source.is_dir():
        raise ValueError(f"{source}: want the DPG-Bench prompts folder (one .txt file per prompt)")
    items = []
    for path in sorted(source.glob("*.txt")):
        if "." in path.stem:  # the evaluator keys images by the name up to the first dot
            raise ValueError(f"{path}: a dot in the name would not match the evaluator's key")
        prompt = common.text(path.read_text(encoding="utf-8").strip(), str(path))
        items.append(common.Item(index=len(items), name=path.stem, prompt=prompt,
                                 outputs=[out_dir / f"{path.stem}.png"]))
    return items


def write(item: common.Item, made: list) -> None:
    from unipic_jax.images import tile_grid

    grid = tile_grid(np.stack([np.asarray(image) for image, _ in made]), 2, 2)
    metadata = {k: v for k, v in made[0][1].items() if k not in ("seed", "index")}
    metadata["seeds"] = [m["seed"] for _, m in made]
    common.save(grid, item.outputs[0], metadata)
