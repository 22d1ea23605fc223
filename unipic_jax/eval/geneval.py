"""GenEval (Ghosh et al. 2023): the layout its `evaluation/evaluate_images.py` reads.

Followed: djghosh13/geneval, README.md ("The generated format should be ...") and
generation/diffusers_generate.py. For line N (from 0) of `prompts/evaluation_metadata.jsonl`:

    OUT/{N:05d}/metadata.jsonl          that line (one JSON object; the evaluator json.load()s it)
    OUT/{N:05d}/samples/{j:04d}.png     sample j (the README's names; the evaluator takes any \\d+.png)

The optional `grid.png` is not written. Samples are written first and `metadata.jsonl` last, so
an item is finished when its metadata file and every sample exist.
"""

from __future__ import annotations

from pathlib import Path

from unipic_jax.eval import common

TASK = "t2i"
DEFAULT_SAMPLES = 4


def read(source: Path, out_dir: Path, *, samples: int, **_) -> list[common.Item]:
    """The non-blank lines of `evaluation_metadata.jsonl`, each an object with a "prompt"."""
    common.check_samples(samples, "geneval")
    items = []
    for where, record, line in common.jsonl_objects(source, 'an object with a "prompt" string'):
        folder = out_dir / f"{len(items):05d}"
        outputs = [folder / "samples" / f"{j:04d}.png" for j in range(samples)] + [folder / "metadata.jsonl"]
        prompt = common.text(record.get("prompt"), where)
        items.append(common.Item(index=len(items), name=folder.name, prompt=prompt, outputs=outputs,
                                 extra={"line": line}))
    return items


def write(item: common.Item, made: list) -> None:
    for (image, metadata), path in zip(made, item.outputs):
        common.save(image, path, metadata)
    common.save_text(item.extra["line"] + "\n", item.outputs[-1])
