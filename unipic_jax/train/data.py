"""Training data with grain: sources, the reference preprocessing, fixed shapes, task mixing.

Three tasks, each with its own record schema (reference-spec §11.3):

  t2i   {"image", "caption"}                    text-to-image
  edit  {"source", "target", "instruction"}     editing triplets
  und   {"image", "question", "answer"}         image question answering (understanding)

Sources: a JSONL file of such records (image fields are paths relative to the file's folder), a
folder of image files with same-stem `.txt` captions (t2i), a TFDS dataset read with
`tfds.data_source` ("tfds:NAME:SPLIT", field names mapped by `fields`; it must be prepared in the
array_record format under `data.tfds_data_dir`, default `<workdir>/tfds`: nothing is downloaded),
or "synthetic" (the coloured shapes of `write_synthetic`, written once into `<workdir>/data`).
Image fields may hold a path, encoded bytes or a uint8 HWC array.

Per task the pipeline is

    source -> this process's shard (process_index::process_count) -> shuffle + repeat (reshuffled
    every epoch) -> preprocess (random_map: per-element RNG from the seed and the index) ->
    to_iter_dataset (threads) -> skip corrupt records (counted, bounded) -> batch -> length bucket

and the task streams are zipped into one dict per step, `{task: batch}`, whose iterator state
(a JSON dict, saved with every checkpoint) restores the exact data order.

Preprocessing follows the reference datasets: t2i centre-crops, resizes (bicubic) and maps to
[-1, 1]; the prompt is "Generate an image: {caption.strip()}" in the chat template, replaced by
"Generate an image." with probability `cfg_drop_prob` (0.1). Editing stretches both images to the
square (the reference default) and puts `<image>` x N *before* the chat template (the training
layout, `edit_layout="train"`; "inference" uses the scripts' layout), with "Edit this image." as
the unconditional instruction (probability `edit_uncond_prob`, default 0). Understanding
centre-crops and supervises the answer plus `<|im_end|>` after the prompt
"<image>\\n{question}"; the prompt and the trailing separator "\\n" are ignored (-100).
Token ids are padded on the right with the EOS id (the reference collate) to `max_length`, then
each batch is trimmed to the smallest of `buckets` that holds its longest row (a few compiled
shapes instead of one per batch).

A record that cannot be read or decoded becomes a `Corrupt` marker; the skip stage drops it with
a warning that counts the skips so far, reports the running count in every element
(`num_skipped`) and raises `DataError` after `max_consecutive_corrupt` bad records in a row, so a
broken source fails instead of retrying forever.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import grain
import numpy as np
from PIL import Image

from unipic_jax import images, prompts

log = logging.getLogger(__name__)

TASKS = ("t2i", "edit", "und")
IGNORE = -100
EDIT_UNCOND_TEXT = "Edit this image."
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

DEFAULT_FIELDS = {
    "t2i": {"image": "image", "caption": "caption"},
    "edit": {"source": "source", "target": "target", "instruction": "instruction"},
    "und": {"image": "image", "question": "question", "answer": "answer"},
}


class DataError(ValueError):
    """A data source that cannot produce batches (too many corrupt records in a row, bad spec)."""


@dataclasses.dataclass(frozen=True)
class Corrupt:
    """A record that could not be read; dropped (and counted) by the skip stage."""

    what: str
    reason: str


# ----------------------------------------------------------------------------------------------
# Sources


class JsonlSource:
    """Random access to the records of a JSONL file (one JSON object per non-empty line).

    Returns `{"record": <parsed dict>, "root": <the file's folder>}`; a line that does not parse
    becomes a `Corrupt` marker.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such JSONL file")
        offsets, pos = [], 0
        with open(self.path, "rb") as f:
            for line in f:
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
        if not offsets:
            raise DataError(f"{self.path}: no records")
        self.offsets = np.asarray(offsets, np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int):
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[index]))
            line = f.readline()
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            return Corrupt(f"{self.path.name} record {index}", f"bad JSON: {e}")
        return {"record": record, "root": str(self.path.parent)}

    def __repr__(self):
        return f"JsonlSource({self.path})"


class CaptionFolderSource:
    """Image files of a folder (sorted), each captioned by the `.txt` file of the same stem (t2i)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{self.folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        self.names = [p.name for p in files]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int):
        image = self.folder / self.names[index]
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            return Corrupt(f"{image.name}", f"missing caption file {caption.name}")
        return {"record": {"image": image.name, "caption": caption.read_text()}, "root": str(self.folder)}

    def __repr__(self):
        return f"CaptionFolderSource({self.folder})"


class TfdsSource:
    """A TFDS split read with `tfds.data_source` (ArrayRecord; decoding needs no TensorFlow).

    The dataset must already be prepared under `data_dir` (in the array_record format): training
    never downloads. Anything else is a one-line `DataError` that says how to prepare it.
    """

    def __init__(self, name: str, split: str = "train", data_dir: Optional[str] = None):
        self.name, self.split = name, split
        builder = tfds_builder(name, data_dir)
        try:
            self.source = builder.as_data_source(split=split)
        except Exception as e:  # an unknown split, a TFRecord-only preparation, ...
            raise DataError(f"tfds:{name}:{split} under {data_dir}: {_first_line(e)}") from None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            record = self.source[index]
        except Exception as e:  # a damaged ArrayRecord chunk or undecodable feature
            return Corrupt(f"{self.name}[{self.split}] record {index}", f"{type(e).__name__}: {e}")
        return {"record": record, "root": ""}

    def __repr__(self):
        return f"TfdsSource({self.name}, {self.split})"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def tfds_builder(name: str, data_dir: Optional[str]):
    """The TFDS builder of `name` ("NAME[/CONFIG][:VERSION]") prepared under `data_dir`; a
    `DataError` (one line, with the command that prepares it) when there is none. Never downloads."""
    if not data_dir:
        raise DataError(f"tfds:{name}: no TFDS data folder; set one with --set data.tfds_data_dir=DIR")
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError lists every registered name: keep the first line
        raise DataError(f"tfds:{name}: {_first_line(e)}") from None
    if not builder.is_prepared():
        raise DataError(
            f"tfds:{name} is not prepared under {data_dir} (training never downloads); prepare it first: "
            f"tfds.builder({name!r}, data_dir={str(data_dir)!r}, file_format='array_record').download_and_prepare() "
            f"in Python, or `tfds build {name} --data_dir={data_dir} --file_format=array_record`")
    return builder


def tfds_data_dir(config, workdir: str | os.PathLike) -> str:
    """Where TFDS sources are read from: `data.tfds_data_dir`, else `<workdir>/tfds`."""
    return str(config.data.get("tfds_data_dir") or Path(workdir) / "tfds")


def open_source(spec: str, data_dir: Optional[str] = None):
    """A source from a spec: "tfds:NAME[:SPLIT]" (prepared under `data_dir`), a .jsonl file, or a
    folder of captioned images."""
    if spec.startswith("tfds:"):
        name, _, split = spec[len("tfds:"):].partition(":")
        return TfdsSource(name, split or "train", data_dir)
    path = Path(spec)
    if path.is_dir():
        return CaptionFolderSource(path)
    if path.suffix == ".jsonl":
        return JsonlSource(path)
    raise DataError(f"data source {spec!r}: want tfds:NAME[:SPLIT], a .jsonl file or an image folder")


SYNTHETIC = "synthetic"  # `--data synthetic`: the coloured-shapes data, written into <workdir>/data


def parse_data_spec(spec: str) -> dict[str, str]:
    """`--data`: "synthetic" (generated coloured shapes, see `resolve_sources`), a folder holding
    t2i.jsonl / edit.jsonl / und.jsonl (any of them), or "task=source,task=source" with sources
    as `open_source` takes them (or "synthetic")."""
    if spec == SYNTHETIC:
        return {t: SYNTHETIC for t in TASKS}
    if "=" not in spec:
        folder = Path(spec)
        hint = f"(or give task=source pairs; for a try-out on generated data use `--data {SYNTHETIC}`)"
        if not folder.is_dir():
            raise DataError(f"--data {spec}: no such folder {hint}")
        found = {t: str(folder / f"{t}.jsonl") for t in TASKS if (folder / f"{t}.jsonl").is_file()}
        if not found:
            raise DataError(f"--data {spec}: the folder holds no t2i.jsonl, edit.jsonl or und.jsonl {hint}")
        return found
    out = {}
    for part in spec.split(","):
        task, _, source = part.partition("=")
        if task not in TASKS or not source:
            raise DataError(f"--data entry {part!r}: want task=source with task in {TASKS}")
        out[task] = source
    return out


def ensure_synthetic(folder: str | os.PathLike, size: int) -> Path:
    """`write_synthetic(folder, size)` unless `folder` already holds it (a resumed run reuses it).

    Written to a temporary sibling and renamed into place, so a kill never leaves half a dataset
    and processes sharing the folder all end up reading the same files.
    """
    folder = Path(folder)
    if all((folder / f"{t}.jsonl").is_file() for t in TASKS):
        return folder
    if folder.exists() and any(folder.iterdir()):
        raise DataError(f"{folder} exists but holds no synthetic dataset; remove it or use another --workdir")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    write_synthetic(tmp, size=size)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process renamed its copy first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "t2i.jsonl").is_file():
            raise
    log.info("synthetic data (%d px) in %s", size, folder)
    return folder


def resolve_sources(sources: Mapping[str, Any], workdir: str | os.PathLike, config) -> dict[str, Any]:
    """`sources` with every "synthetic" spec replaced by the task's JSONL in `<workdir>/data`
    (written at the stage's `gen_resolution` the first time)."""
    if SYNTHETIC not in [s for s in sources.values() if isinstance(s, str)]:
        return dict(sources)
    folder = ensure_synthetic(Path(workdir) / "data", config.data.gen_resolution)
    return {t: str(folder / f"{t}.jsonl") if s == SYNTHETIC else s for t, s in sources.items()}


def check_sources(sources: Mapping[str, Any], data_dir: Optional[str]) -> None:
    """Cheap checks before a model is built: every file or folder named exists, and every TFDS
    dataset is prepared under `data_dir` (one-line `DataError` otherwise)."""
    for task, spec in sources.items():
        if not isinstance(spec, str) or spec == SYNTHETIC:
            continue
        if spec.startswith("tfds:"):
            tfds_builder(spec[len("tfds:"):].partition(":")[0], data_dir)
        elif not Path(spec).exists():
            raise DataError(f"--data {task}={spec}: no such file or folder")


# ----------------------------------------------------------------------------------------------
# Preprocessing


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Everything the preprocessing of one task needs (picklable, for worker processes)."""

    task: str
    resolution: int  # square image side in pixels
    max_length: int  # token ids per row after padding
    image_tokens: int = 0  # `<image>` ids per image (latent tokens + MAR buffer); edit/und
    image_id: int = 0
    pad_id: int = 0  # the reference collate pads with EOS
    cfg_drop_prob: float = 0.0  # t2i: "Generate an image."; edit: "Edit this image."
    answer_slots: int = 0  # und: most supervised tokens per row (static shape of the CE)
    edit_layout: str = "train"
    fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
    buckets: tuple[int, ...] = ()


def _field(record: Mapping, name: str):
    """record[name]; "a/b" reaches into nested dicts."""
    value = record
    for part in name.split("/"):
        value = value[part]
    return value


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return _text(value.item())
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {type(value).__name__}")
    return value


def _image(value, root: str) -> Image.Image:
    """An RGB PIL image from a path (relative to `root`), encoded bytes or a uint8 array."""
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3:
        return Image.fromarray(value).convert("RGB")
    if isinstance(value, (bytes, np.bytes_)):
        with Image.open(io.BytesIO(bytes(value))) as img:
            img.load()
            return img.convert("RGB")
    return images.load_image(Path(root) / _text(value))


def _pixels(img: Image.Image, size: int, crop: bool) -> np.ndarray:
    """(size, size, 3) float32 in [-1, 1]: centre crop (or stretch) then bicubic resize."""
    return images.to_model_input(images.center_crop_square(img) if crop else img, size)[0]


def _pad(ids: Sequence[int], length: int, value: int) -> np.ndarray:
    out = np.full((length,), value, np.int32)
    out[: len(ids)] = ids
    return out


class Preprocess(grain.transforms.RandomMap):
    """One raw record -> a fixed-shape example dict (or a `Corrupt` marker)."""

    def __init__(self, spec: TaskSpec, tokenizer: prompts.Tokenizer):
        self.spec = spec
        self.tokenizer = tokenizer
        self.fields = {**DEFAULT_FIELDS[spec.task], **dict(spec.fields)}

    def random_map(self, element, rng: np.random.Generator):
        if isinstance(element, Corrupt):
            return element
        record, root = element["record"], element["root"]
        try:
            return getattr(self, f"_{self.spec.task}")(record, root, rng)
        except (OSError, ValueError, KeyError, TypeError, SyntaxError, Image.DecompressionBombError) as e:
            return Corrupt(f"{self.spec.task} record", f"{type(e).__name__}: {e}")

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def _t2i(self, record, root, rng):
        s = self.spec
        caption = _text(_field(record, self.fields["caption"]))
        pixels = _pixels(_image(_field(record, self.fields["image"]), root), s.resolution, crop=True)
        dropped = rng.random() < s.cfg_drop_prob
        text = prompts.T2I_CFG_TEXT if dropped else prompts.T2I_PREFIX + caption.strip()
        ids = self._ids(prompts.chat(text))[: s.max_length]
        return {"image": pixels, "input_ids": _pad(ids, s.max_length, s.pad_id),
                "attention_mask": np.arange(s.max_length) < len(ids)}

    def _edit(self, record, root, rng):
        s = self.spec
        f = self.fields
        source = _pixels(_image(_field(record, f["source"]), root), s.resolution, crop=False)
        target = _pixels(_image(_field(record, f["target"]), root), s.resolution, crop=False)
        text = _text(_field(record, f["instruction"]))
        if rng.random() < s.cfg_drop_prob:
            text = EDIT_UNCOND_TEXT
        image_ids = [s.image_id] * s.image_tokens
        if s.edit_layout == "train":  # the reference's ImageEditJSONLDataset: images before the template
            ids = image_ids + self._ids(prompts.chat(text.replace(prompts.IMAGE_TOKEN, "")))
        elif s.edit_layout == "inference":  # scripts/image_edit.py
            ids = self._ids(prompts.chat(prompts.IMAGE_TOKEN + "\n" + text.strip()))
            at = ids.index(s.image_id)
            ids = ids[:at] + image_ids + ids[at + 1:]
        else:
            raise ValueError(f"edit_layout {s.edit_layout!r}: choose 'train' or 'inference'")
        if len(ids) > s.max_length:
            raise ValueError(f"edit prompt of {len(ids)} tokens exceeds max_length {s.max_length}")
        return {"source": source, "target": target, "input_ids": _pad(ids, s.max_length, s.pad_id),
                "attention_mask": np.arange(s.max_length) < len(ids)}

    def _und(self, record, root, rng):
        s = self.spec
        f = self.fields
        pixels = _pixels(_image(_field(record, f["image"]), root), s.resolution, crop=True)
        question = _text(_field(record, f["question"]))
        answer = _text(_field(record, f["answer"]))
        prompt = self._ids(prompts.chat(prompts.IMAGE_TOKEN + "\n" + question))
        at = prompt.index(s.image_id)
        prompt = prompt[:at] + [s.image_id] * s.image_tokens + prompt[at + 1:]
        out = self._ids(answer + prompts.IM_END)[: s.answer_slots]
        sep = self._ids("\n")
        room = s.max_length - len(prompt)
        if room < 1:
            raise ValueError(f"understanding prompt of {len(prompt)} tokens leaves no room in "
                             f"max_length {s.max_length}")
        ids = (prompt + out + sep)[: s.max_length]
        labels = ([IGNORE] * len(prompt) + out + [IGNORE] * len(sep))[: s.max_length]
        return {"image": pixels, "input_ids": _pad(ids, s.max_length, s.pad_id),
                "attention_mask": np.arange(s.max_length) < len(ids),
                "labels": _pad(labels, s.max_length, IGNORE)}


# ----------------------------------------------------------------------------------------------
# Skipping corrupt records, bucketing


class SkipCorrupt(grain.IterDataset):
    """Drops `Corrupt` markers with a counted warning; adds the running count as `num_skipped`.

    The count is part of the iterator state (restored with a checkpoint). More than
    `max_consecutive` corrupt records in a row raise `DataError`.
    """

    def __init__(self, parent: grain.IterDataset, what: str, max_consecutive: int = 100):
        super().__init__(parent)
        self.what, self.max_consecutive = what, max_consecutive

    def __iter__(self):
        return _SkipCorruptIterator(self._parent.__iter__(), self.what, self.max_consecutive)


class _SkipCorruptIterator(grain.DatasetIterator):
    def __init__(self, parent, what: str, max_consecutive: int):
        super().__init__(parent)
        self.what, self.max_consecutive = what, max_consecutive
        self.skipped = 0

    def __next__(self):
        run = 0
        while True:
            element = next(self._parent)
            if not isinstance(element, Corrupt):
                return {**element, "num_skipped": np.int64(self.skipped)}
            self.skipped += 1
            run += 1
            log.warning("%s data: skipped %s (%s); %d skipped so far", self.what, element.what,
                        element.reason, self.skipped)
            if run >= self.max_consecutive:
                raise DataError(f"{self.what} data: {run} corrupt records in a row (last: "
                                f"{element.what}: {element.reason}); giving up")

    def get_state(self):
        return {"parent": self._parent.get_state(), "skipped": self.skipped}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self.skipped = int(state["skipped"])


def trim_to_bucket(batch: dict, buckets: Sequence[int]) -> dict:
    """Cut the token arrays of a batch to the smallest bucket holding its longest row."""
    if not buckets:
        return batch
    longest = int(np.max(np.sum(batch["attention_mask"], axis=1)))
    length = min((b for b in buckets if b >= longest), default=batch["input_ids"].shape[1])
    return {k: (v[:, :length] if k in ("input_ids", "attention_mask", "labels") else v)
            for k, v in batch.items()}


class _TrimToBucket(grain.transforms.Map):
    def __init__(self, buckets: Sequence[int]):
        self.buckets = tuple(buckets)

    def map(self, batch):
        return trim_to_bucket(batch, self.buckets)


# ----------------------------------------------------------------------------------------------
# Pipelines


def task_dataset(source, spec: TaskSpec, tokenizer: prompts.Tokenizer, batch_size: int, *, seed: int,
                 process_index: int = 0, process_count: int = 1, num_threads: int = 2,
                 workers: int = 0, max_consecutive_corrupt: int = 100) -> grain.IterDataset:
    """The infinite batch stream of one task for this process (`batch_size` is the global batch)."""
    if batch_size % process_count:
        raise DataError(f"{spec.task}: global batch {batch_size} is not divisible by {process_count} processes")
    if process_count > 1 and len(spec.buckets) > 1:
        raise DataError("length buckets need one shape on every process; use a single bucket")
    ds = grain.MapDataset.source(source)
    if process_count > 1:
        ds = ds[process_index::process_count]
    ds = ds.shuffle(seed=seed).repeat()
    ds = ds.random_map(Preprocess(spec, tokenizer), seed=seed + 1)
    # One batch of preprocessed elements ahead (a 1024-px image is 12 MB as float32).
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=batch_size // process_count))
    it = SkipCorrupt(it, spec.task, max_consecutive_corrupt)
    it = it.batch(batch_size // process_count, drop_remainder=True)
    it = it.map(_TrimToBucket(spec.buckets))
    if workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return it


class _AsDict(grain.transforms.Map):
    def __init__(self, tasks: Sequence[str]):
        self.tasks = tuple(tasks)

    def map(self, element):
        return dict(zip(self.tasks, element))


def mixed_dataset(task_datasets: Mapping[str, grain.IterDataset]) -> grain.IterDataset:
    """One element per training step: `{task: batch}` with one batch of every task given.

    The mixing ratio is the ratio of the per-task batch sizes; the loss weights scale the tasks.
    """
    tasks = list(task_datasets)
    zipped = grain.experimental.ZipIterDataset([task_datasets[t] for t in tasks])
    return zipped.map(_AsDict(tasks))


def task_specs(config, tokenizer: prompts.Tokenizer) -> dict[str, TaskSpec]:
    """TaskSpecs of the tasks a stage config trains (batch size > 0 and loss weight > 0)."""
    d, mar = config.data, config.model.mar
    gen_tokens = prompts.image_token_count(d.gen_resolution, d.gen_resolution, mar)
    und_tokens = prompts.image_token_count(d.und_resolution, d.und_resolution, mar)
    common = dict(image_id=tokenizer.image_id, pad_id=tokenizer.eos_id)
    fields = d.get("fields", {})
    specs = {
        "t2i": TaskSpec("t2i", d.gen_resolution, d.max_length.t2i, cfg_drop_prob=d.cfg_drop_prob,
                        fields=dict(fields.get("t2i", {})), buckets=tuple(d.buckets.t2i), **common),
        "edit": TaskSpec("edit", d.gen_resolution, d.max_length.edit, image_tokens=gen_tokens,
                         cfg_drop_prob=d.edit_uncond_prob, edit_layout=d.edit_layout,
                         fields=dict(fields.get("edit", {})), buckets=tuple(d.buckets.edit), **common),
        "und": TaskSpec("und", d.und_resolution, d.max_length.und, image_tokens=und_tokens,
                        answer_slots=d.answer_slots, fields=dict(fields.get("und", {})),
                        buckets=tuple(d.buckets.und), **common),
    }
    return {t: specs[t] for t in active_tasks(config)}


def active_tasks(config) -> list[str]:
    """Tasks with a positive batch size and loss weight, in TASKS order."""
    return [t for t in TASKS if config.data.batch_size[t] > 0 and config.loss_weights[t] > 0]


def make_dataset(config, tokenizer: prompts.Tokenizer, sources: Mapping[str, Any], *,
                 process_index: int = 0, process_count: int = 1,
                 tfds_data_dir: Optional[str] = None) -> grain.IterDataset:
    """The mixed per-step stream of a stage config. `sources[task]`: a spec string or a source.

    TFDS specs are read from `data.tfds_data_dir`, else `tfds_data_dir` (the trainer passes
    `<workdir>/tfds`).
    """
    specs = task_specs(config, tokenizer)
    missing = [t for t in specs if t not in sources]
    if missing:
        raise DataError(f"the stage trains {list(specs)} but no data was given for {missing}")
    d = config.data
    streams = {}
    for i, (task, spec) in enumerate(specs.items()):
        src = sources[task]
        src = open_source(src, d.get("tfds_data_dir") or tfds_data_dir) if isinstance(src, str) else src
        streams[task] = task_dataset(src, spec, tokenizer, d.batch_size[task], seed=d.seed + 1000 * i,
                                     process_index=process_index, process_count=process_count,
                                     num_threads=d.num_threads, workers=d.workers,
                                     max_consecutive_corrupt=d.max_consecutive_corrupt)
    return mixed_dataset(streams)


# ----------------------------------------------------------------------------------------------
# A synthetic dataset: coloured shapes


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(shape: str, colour: str, size: int, background=(255, 255, 255)) -> Image.Image:
    """A `size` x `size` image of one filled shape in the middle."""
    from PIL import ImageDraw

    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    lo, hi = size // 5, size - size // 5
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([lo, lo, hi, hi], fill=fill)
    elif shape == "square":
        draw.rectangle([lo, lo, hi, hi], fill=fill)
    else:
        draw.polygon([(size // 2, lo), (hi, hi), (lo, hi)], fill=fill)
    return img


def write_synthetic(folder: str | os.PathLike, size: int = 32, seed: int = 0, count: int = 12) -> Path:
    """Write coloured-shape data: `count` records in each of t2i.jsonl, edit.jsonl, und.jsonl.

    t2i: "a red circle"; edit: "make it blue" (same shape, new colour); und: "What colour is the
    shape?" -> "red." / "What shape is this?" -> "A circle.". Images are PNGs under images/.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    for shape in SHAPES:
        for colour in names:
            draw_shape(shape, colour, size).save(folder / "images" / f"{colour}_{shape}.png")
    t2i, edit, und = [], [], []
    for i in range(count):
        shape, colour = SHAPES[rng.integers(len(SHAPES))], names[rng.integers(len(names))]
        other = names[(names.index(colour) + 1 + rng.integers(len(names) - 1)) % len(names)]
        image = f"images/{colour}_{shape}.png"
        t2i.append({"image": image, "caption": f"a {colour} {shape}"})
        edit.append({"source": image, "target": f"images/{other}_{shape}.png", "instruction": f"make it {other}"})
        if i % 2:
            und.append({"image": image, "question": "What colour is the shape?", "answer": f"{colour}."})
        else:
            und.append({"image": image, "question": "What shape is this?", "answer": f"A {shape}."})
    for name, rows in (("t2i", t2i), ("edit", edit), ("und", und)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
