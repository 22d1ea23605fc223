"""GEdit-Bench (Step1X-Edit, Liu et al. 2025): edited images by task type and language.

Followed: stepfun-ai/Step1X-Edit, GEdit-Bench/EVAL.md, generate_image_example.py and
test_gedit_score.py. The scorer (`--model_name NAME --save_path OUT`) reads, for every record of
the `stepfun-ai/GEdit-Bench` dataset, both

    OUT/NAME/fullset/{task_type}/{instruction_language}/{key}.png         the edited image
    OUT/NAME/fullset/{task_type}/{instruction_language}/{key}_SRCIMG.png  the source image

and skips a record when either is missing; this writes both (the source as PNG).

Input, since nothing is downloaded here: a JSONL file, one object per dataset record with
"key", "task_type", "instruction_language", "instruction" and "image", the source image's path
(relative to the JSONL file's folder, or absolute); an optional "source_image" is written as
`_SRCIMG` instead of "image" (the example script edits `input_image_raw` and saves
`input_image` as `_SRCIMG`). The README shows how to export the dataset so.
"""

from __future__ import annotations

from pathlib import Path

from unipic_jax.eval import common

TASK = "edit"
DEFAULT_SAMPLES = 1
DEFAULT_MODEL_NAME = "unipic"


def read(source: Path, out_dir: Path, *, samples: int, model_name: str | None = None, **_) -> list[common.Item]:
    common.check_samples(samples, "gedit", allowed=1)
    root = out_dir / common.plain_name(model_name or DEFAULT_MODEL_NAME, "--model-name", "the model name") / "fullset"
    items = []
    for where, record, _ in common.jsonl_objects(
            source, "an object (key, task_type, instruction_language, instruction, image)"):
        key, task, language = (common.plain_name(record.get(k), where, k)
                               for k in ("key", "task_type", "instruction_language"))
        images = {}
        for field in ("image", "source_image"):
            value = record.get(field, record.get("image"))
            if not isinstance(value, str) or not value:
                raise ValueError(f'{where}: want an "image" path')
            images[field] = common.image_file(source.parent / value, where)
        folder = root / task / language
        items.append(common.Item(index=len(items), name=f"{task}/{language}/{key}",
                                 prompt=common.text(record.get("instruction"), where, "instruction"),
                                 outputs=[folder / f"{key}.png", folder / f"{key}_SRCIMG.png"],
                                 image=images["image"], extra={"source_image": images["source_image"]}))
    return items


def write(item: common.Item, made: list) -> None:
    from unipic_jax.images import load_image

    common.save(load_image(item.extra["source_image"]), item.outputs[1], {"role": "GEdit-Bench source image"})
    (image, metadata), = made
    common.save(image, item.outputs[0], metadata)
