"""ImgEdit-Bench (Ye et al. 2025), basic suite: one edited image per key.

Followed: PKU-YuanGroup/ImgEdit, Benchmark/Basic/basic_bench_readme.md and basic_bench.py, which
reads `RESULT/{key}.png` for every key of `basic_edit.json` (older releases: `singleturn.json`;
the UGE suite's `UGE_edit.json` has the same form) and the source `ORIGIN_ROOT/{id}`:

    {"1082": {"id": "animal/000342021.jpg", "prompt": "Change ...", "edit_type": "adjust"}, ...}
    ->  OUT/1082.png
"""

from __future__ import annotations

from pathlib import Path

from unipic_jax.eval import common

TASK = "edit"
DEFAULT_SAMPLES = 1


def read(source: Path, out_dir: Path, *, samples: int, images: Path | None = None, **_) -> list[common.Item]:
    """The edits of the JSON file, in its order; sources are `images / id`."""
    common.check_samples(samples, "imgedit", allowed=1)
    if images is None:
        raise ValueError("imgedit: pass --images, the folder of the benchmark's original images")
    if not images.is_dir():
        raise ValueError(f"--images {images}: no such folder")
    edits = common.read_json(source)
    if not isinstance(edits, dict):
        raise ValueError(f'{source}: want an object {{key: {{"id": IMAGE, "prompt": TEXT, ...}}}}')
    items = []
    for key, edit in edits.items():
        where = f"{source}: {key!r}"
        common.plain_name(key, where, "the key")
        if not isinstance(edit, dict) or not isinstance(edit.get("id"), str):
            raise ValueError(f'{where}: want an object with an "id" (image path) and a "prompt"')
        items.append(common.Item(index=len(items), name=key, prompt=common.text(edit.get("prompt"), where),
                                 outputs=[out_dir / f"{key}.png"],
                                 image=common.image_file(images / edit["id"], where)))
    return items


def write(item: common.Item, made: list) -> None:
    (image, metadata), = made
    common.save(image, item.outputs[0], metadata)
