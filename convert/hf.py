"""Hugging Face model folders: `config.json` plus weights, read and written as numpy state dicts.

A folder holds `config.json` and one of
  * `model.safetensors`;
  * sharded safetensors listed by `model.safetensors.index.json` (`weight_map`: key -> shard file);
  * `pytorch_model.bin` (a torch pickle, read through `convert.io.load_state_dict`).
Nothing here knows a model: the Qwen2.5 and SigLIP2 loaders both start from `load_hf_folder`.
Every failure is a `CheckpointFileError` that names the file at fault.

`save_hf_folder` writes the same layout (safetensors only). It builds the folder under a temporary
name beside the destination and renames it into place, so a failed write never leaves a folder
that looks complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from convert.io import CheckpointFileError, load_state_dict, replaced_directory, save_state_dict

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointFileError(f"{path}: not valid JSON ({e})") from None


def _load_sharded(folder: Path) -> dict[str, np.ndarray]:
    index_path = folder / SAFETENSORS_INDEX
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointFileError(f"{index_path}: no 'weight_map' entry listing the shards")
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(key)
    missing = sorted(s for s in by_shard if not (folder / s).is_file())
    if missing:
        raise CheckpointFileError(
            f"{folder}: shard file(s) named by {SAFETENSORS_INDEX} are missing: {', '.join(missing)}")
    state_dict: dict[str, np.ndarray] = {}
    for shard, keys in by_shard.items():
        tensors = load_state_dict(folder / shard)
        absent = sorted(k for k in keys if k not in tensors)
        if absent:
            shown = ", ".join(repr(k) for k in absent[:5]) + (" ..." if len(absent) > 5 else "")
            raise CheckpointFileError(
                f"{folder / shard}: {len(absent)} key(s) that {SAFETENSORS_INDEX} places in this "
                f"shard are not in it: {shown}")
        for k in keys:
            state_dict[k] = tensors[k]
    return state_dict


def load_hf_folder(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a Hugging Face model folder -> (config.json as a dict, {key: numpy array}).

    Weights come from `model.safetensors`, else the shards of `model.safetensors.index.json`, else
    `pytorch_model.bin`. Raises `CheckpointFileError` naming the missing or inconsistent file.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointFileError(f"{folder}: no such model folder")
    config_path = folder / CONFIG
    if not config_path.is_file():
        raise CheckpointFileError(f"{config_path}: missing (a Hugging Face folder needs its config.json)")
    config = _read_json(config_path)
    if (folder / SAFETENSORS).is_file():
        state_dict = load_state_dict(folder / SAFETENSORS)
    elif (folder / SAFETENSORS_INDEX).is_file():
        state_dict = _load_sharded(folder)
    elif (folder / TORCH_BIN).is_file():
        state_dict = load_state_dict(folder / TORCH_BIN)
    else:
        raise CheckpointFileError(
            f"{folder}: no weights file (looked for {SAFETENSORS}, {SAFETENSORS_INDEX}, {TORCH_BIN})")
    return config, state_dict


def _shards(state_dict: Mapping[str, np.ndarray], max_shard_bytes: int) -> list[list[str]]:
    """Greedy split of the sorted keys into groups of at most `max_shard_bytes` (a bigger tensor
    gets a shard of its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for key in sorted(state_dict):
        nbytes = np.asarray(state_dict[key]).nbytes
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    return groups


def save_hf_folder(path: str | os.PathLike, config: Mapping, state_dict: Mapping[str, np.ndarray],
                   max_shard_bytes: int | None = None) -> None:
    """Write `config.json` and safetensors weights as a Hugging Face folder at `path`.

    With `max_shard_bytes` set and the weights larger than that, they are split into
    `model-0000i-of-0000n.safetensors` shards listed by `model.safetensors.index.json`. The folder
    is written under a temporary name and renamed into place; an existing folder at `path` is
    replaced only once the new one is complete.
    """
    with replaced_directory(path) as tmp:
        (tmp / CONFIG).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        total = sum(np.asarray(v).nbytes for v in state_dict.values())
        if max_shard_bytes is None or total <= max_shard_bytes:
            save_state_dict(state_dict, tmp / SAFETENSORS)
        else:
            groups = _shards(state_dict, max_shard_bytes)
            weight_map = {}
            for i, keys in enumerate(groups, start=1):
                name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
                save_state_dict({k: state_dict[k] for k in keys}, tmp / name)
                weight_map.update({k: name for k in keys})
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
