"""What every benchmark layout shares: items, shards, per-image seeds, resuming, writing.

A benchmark module (geneval, dpg, gedit, imgedit) reads its input file into a list of `Item`s,
each naming every file it will write (`outputs`, the first one an image carrying the sampling
settings), and writes one item's images into its layout (`write`). The rest lives here:

* `prepare` checks everything before the model is loaded: the input, the out-dir, the seeds, the
  shard, and that finished items were made with the same settings (one-line ValueErrors);
* `execute` samples and writes the pending items of this shard under a progress bar.

Image j of item i has seed `base_seed + i * samples + j`, whatever the shard, so a run split over
processes makes the same pictures as one process. An item is finished when all of its outputs
exist; every file is written atomically (`images.save_image`), so a killed run leaves no partial
file, and the next run redoes exactly the items that are not finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from PIL import Image


@dataclasses.dataclass
class Item:
    """One prompt (or edit) of a benchmark."""

    index: int            # position in the input: seeds and shards follow it
    name: str             # what the benchmark calls it (folder, file stem or key)
    prompt: str           # text-to-image prompt or edit instruction
    outputs: list[Path]   # every file the item writes; outputs[0] is an image with the settings
    image: Optional[Path] = None  # the source image of an edit
    extra: dict = dataclasses.field(default_factory=dict)  # what a layout needs besides (a JSON line ...)

    def done(self) -> bool:
        return all(p.is_file() for p in self.outputs)


@dataclasses.dataclass
class Plan:
    """What `prepare` found: this shard's items and those of them still to make."""

    items: list[Item]     # this shard's items
    pending: list[Item]   # those not finished (all of them with redo)


# ----------------------------------------------------------------------------------------------
# Input checks shared by the readers


def plain_name(value, where: str, what: str = "name") -> str:
    """`value` as a plain file name (no folders, not hidden, not empty), else a ValueError."""
    if (not isinstance(value, str) or not value.strip() or value != value.strip() or value.startswith(".")
            or any(c in value for c in "/\\\0:") or len(value.encode()) > 200):
        raise ValueError(f"{where}: {what} must be a plain file name (no folders, not hidden, not empty), "
                         f"got {value!r}")
    return value


def text(value, where: str, what: str = "prompt") -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: want a non-empty {what!r} string")
    return value


def image_file(path: Path, where: str) -> Path:
    """`path` if it is an image Pillow recognises (its header only is read: cheap), else ValueError."""
    if not path.is_file():
        raise ValueError(f"{where}: no such image file {path}")
    try:
        with Image.open(path):
            pass
    except Exception as e:  # noqa: BLE001 -- Pillow raises many kinds for a file that is not an image
        raise ValueError(f"{where}: {path} is not an image file Pillow can read ({type(e).__name__})") from None
    return path


def jsonl_objects(path, want: str):
    """(where, object, the line stripped) for each non-blank line of a JSON-lines file, `where`
    being "PATH:LINE"; a line that is not JSON, or not a JSON object, is a ValueError naming it
    and `want`."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where}: not JSON ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: want {want}")
            yield where, record, line.strip()


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None


def parse_shard(spec: str) -> tuple[int, int]:
    """ "I/N" -> (I, N) with 0 <= I < N: process I of N takes the items whose index % N == I."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard wants I/N (process I of N, counted from 0), got {spec!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {spec}: want 0 <= I < N")
    return i, n


def check_samples(samples: int, benchmark: str, allowed: Optional[int] = None) -> int:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"--samples must be a positive integer, got {samples!r}")
    if allowed is not None and samples != allowed:
        raise ValueError(f"{benchmark}: its layout holds {allowed} image(s) per item, so --samples must be "
                         f"{allowed}, got {samples}")
    return samples


# ----------------------------------------------------------------------------------------------
# Before the model is loaded


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir}: is a file, not a folder")
    parent = out_dir.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out-dir {out_dir}: {parent} is not a writable folder")


def _check_unique(items: Sequence[Item]) -> None:
    seen: dict[str, Item] = {}
    for item in items:
        for path in item.outputs:
            key = os.path.normcase(os.path.abspath(path)).lower()  # as case-insensitive file systems compare
            if key in seen:
                raise ValueError(f"{path}: items {seen[key].name!r} and {item.name!r} would both write this file")
            seen[key] = item


def _as_text(value) -> str:
    """A metadata value as `images.save_image` stores it: strings as they are, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _check_resume(items: Sequence[Item], expected: dict[str, Any]) -> None:
    """Refuse to add to an out-dir whose finished items were made with other settings or from
    another input (a mixed run would score nothing in particular). The first finished item is
    compared."""
    from unipic_jax import images

    first = next((item for item in items if item.done()), None)
    if first is None:
        return
    try:
        stored = images.read_metadata(first.outputs[0])
    except OSError as e:
        raise ValueError(f"{first.outputs[0]}: cannot read it to compare settings ({e})") from None
    expected = {**expected, "prompt": first.prompt}
    differ = [f"{k}={stored.get(k, '(none)')} here, {_as_text(v)} asked" for k, v in expected.items()
              if stored.get(k) != _as_text(v)]
    if differ:
        raise ValueError(f"{first.outputs[0]} was made with other settings ({'; '.join(differ)}): resume with the "
                         f"same settings and input, or use another --out-dir")


def prepare(items: list[Item], out_dir: Path, *, shard: tuple[int, int], expected: dict[str, Any],
            redo: bool = False) -> Plan:
    """Check the items of a whole benchmark (from a module's `read`) before any work, and pick
    this shard's unfinished ones. `expected` holds this run's metadata that finished images must
    match (benchmark, base_seed, samples, the sampling settings, dtype); `redo` remakes finished
    items too (`--overwrite`)."""
    from unipic_jax.api import check_seed

    if not items:
        raise ValueError("the benchmark input holds no items")
    _check_out_dir(out_dir)
    _check_unique(items)
    last = expected["base_seed"] + len(items) * expected["samples"] - 1
    try:
        check_seed(last)
    except ValueError:
        raise ValueError(f"--seed {expected['base_seed']}: the last image's seed {last} (--seed + items x samples "
                         f"- 1) is out of range") from None
    if not redo:
        _check_resume(items, expected)
    index, count = shard
    mine = [item for item in items if item.index % count == index]
    return Plan(items=mine, pending=mine if redo else [item for item in mine if not item.done()])


# ----------------------------------------------------------------------------------------------
# Sampling and writing


def seeds(item: Item, base_seed: int, samples: int) -> list[int]:
    return [base_seed + item.index * samples + j for j in range(samples)]


def execute(plan: Plan, make: Callable[[Item, int], Image.Image], write: Callable[[Item, list], None], *,
            base_seed: int, samples: int, record: dict[str, Any], progress: bool = True,
            desc: str = "items") -> int:
    """Make and write every pending item: image j of an item comes from `make(item, seed_j)`, and
    `write(item, [(image, metadata), ...])` puts them in the layout, the metadata being the image's
    own `info` plus `record`, the item's index and name. Returns the number of items written."""
    from tqdm.auto import tqdm

    from convert.io import clean_leftovers

    done = len(plan.items) - len(plan.pending)
    with tqdm(total=len(plan.items), initial=done, desc=desc, unit="item", disable=not progress) as bar:
        for item in plan.pending:
            for path in item.outputs:  # temporaries of a killed earlier run of this item
                clean_leftovers(path)
            made = []
            for seed in seeds(item, base_seed, samples):
                image = make(item, seed)
                made.append((image, {**image.info, **record, "item": item.index, "key": item.name}))
            write(item, made)
            bar.update(1)
    return len(plan.pending)


def save(image, path: Path, metadata: dict) -> Path:
    """Write one output image (replacing what an unfinished earlier run of its item left)."""
    from unipic_jax import images

    path.parent.mkdir(parents=True, exist_ok=True)
    return images.save_image(image, path, metadata, overwrite=True)


def save_text(content: str, path: Path) -> Path:
    """Write a text file atomically."""
    from convert.io import write_file

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_file(path, lambda f: f.write(content.encode("utf-8")), overwrite=True)
