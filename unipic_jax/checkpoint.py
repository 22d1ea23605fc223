"""UniPic checkpoints: params stored with orbax, the model config beside them as JSON.

A checkpoint is a directory:

    config.json   {"format": "unipic-jax", "version": 1, "config": <the ConfigDict>}
    params/       the param tree (orbax `StandardCheckpointHandler`)
    tokenizer/    optional: the Qwen2.5 folder's tokenizer files and generation_config.json

`load(path)` rebuilds the config, derives the param shapes from the model (never from what was
saved) and restores straight into the requested shardings, so a 3B model is never first
materialised in its saved layout on one device. A stored tree that disagrees with the config is
reported param by param before anything is read.

`save` builds the directory under a temporary name beside the destination and renames it into
place once complete, so a failed or interrupted save never leaves a directory that looks like a
checkpoint. `export_safetensors` writes the PyTorch-layout state dict for the official code.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np

from convert.io import replaced_directory

FORMAT = "unipic-jax"
VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
# Files copied from a Hugging Face tokenizer folder (those present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")
# Files orbax writes when it finalises a save.
_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA")

PyTree = Any


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete, or does not match its config."""


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= limit else line[:limit] + " ..."


def _tuples(value):
    """JSON lists back to the tuples the config schema uses (ch_mult, attn_resolutions)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """The checkpoint's config.json text for `config`."""
    body = json.loads(config.to_json())
    return json.dumps({"format": FORMAT, "version": VERSION, "config": body}, indent=2, sort_keys=True) + "\n"


def config_from_json(text: str, where: str = "config.json") -> ml_collections.ConfigDict:
    """Parse config.json text written by `config_to_json`."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "config" not in doc:
        raise CheckpointError(f"{where}: not a {FORMAT} checkpoint config")
    if doc.get("version") != VERSION:
        raise CheckpointError(f"{where}: checkpoint format version {doc.get('version')} (this code reads {VERSION})")
    return ml_collections.ConfigDict(_tuples(doc["config"]))


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder this project wrote with `save` (its config.json says so)."""
    try:
        doc = json.loads((Path(path) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == FORMAT


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_destination(path: str | os.PathLike, *, overwrite: bool, sources=()) -> Path:
    """Raise unless a checkpoint may be written at `path`: nothing is there, or (with `overwrite`)
    a checkpoint this project wrote, which holds none of `sources` (folders or files the new
    checkpoint is made from). Never replaces any other folder."""
    dest = Path(path).absolute()
    for source in sources:
        if source is not None and Path(source).exists() and _inside(Path(source), dest):
            raise CheckpointError(f"{dest}: holds {source}, which the new checkpoint is made from; "
                                  f"write it somewhere else")
    if dest.exists() or dest.is_symlink():
        if not overwrite:
            raise CheckpointError(f"{dest}: already exists (pass --force / overwrite=True to replace a checkpoint)")
        if dest.is_symlink() or not is_checkpoint(dest):
            raise CheckpointError(f"{dest}: exists and is not a unipic-jax checkpoint; refusing to replace it "
                                  f"(only checkpoints this project wrote are replaced)")
    return dest


def save(path: str | os.PathLike, params: PyTree, config: ml_collections.ConfigDict, *,
         tokenizer_dir: str | os.PathLike | None = None, overwrite: bool = False, sources=()) -> Path:
    """Write `params` and `config` (plus the tokenizer files of `tokenizer_dir`) as a checkpoint.

    The directory appears only once complete. An existing checkpoint at `path` is an error
    unless `overwrite`, and is replaced only after the new one is fully written; anything at
    `path` that is not a checkpoint, or that holds one of `sources` or `tokenizer_dir`, is never
    replaced (`check_destination`).
    """
    import orbax.checkpoint as ocp

    dest = check_destination(path, overwrite=overwrite, sources=(*sources, tokenizer_dir))
    tokenizer_files = []
    if tokenizer_dir is not None:
        tokenizer_files = [Path(tokenizer_dir) / f for f in TOKENIZER_FILES if (Path(tokenizer_dir) / f).is_file()]
        if not tokenizer_files:
            raise CheckpointError(f"{tokenizer_dir}: no tokenizer files to copy")
    with replaced_directory(dest) as tmp:
        (tmp / CONFIG_FILE).write_text(config_to_json(config))
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            ckptr.save(tmp / PARAMS_DIR, args=ocp.args.StandardSave(params))
        if tokenizer_files:
            (tmp / TOKENIZER_DIR).mkdir()
            for f in tokenizer_files:
                shutil.copy2(f, tmp / TOKENIZER_DIR / f.name)
    return dest


def _check_dir(path: str | os.PathLike) -> Path:
    root = Path(path).absolute()
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such checkpoint directory")
    if not (root / CONFIG_FILE).is_file():
        raise CheckpointError(f"{root}: not a checkpoint ({CONFIG_FILE} is missing)")
    params = root / PARAMS_DIR
    missing = [m for m in _ORBAX_MARKERS if not (params / m).is_file()]
    if missing:
        raise CheckpointError(f"{params}: incomplete checkpoint (missing {', '.join(missing)})")
    return root


def read_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """The model config stored in checkpoint directory `path`."""
    root = _check_dir(path)
    return config_from_json((root / CONFIG_FILE).read_text(), os.fspath(root / CONFIG_FILE))


def tokenizer_dir(path: str | os.PathLike) -> Path | None:
    """The tokenizer folder saved inside checkpoint `path`, or None if it has none."""
    folder = Path(path) / TOKENIZER_DIR
    return folder if folder.is_dir() else None


def _flat(tree: PyTree) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p, simple=True, separator="/"): leaf for p, leaf in leaves}


def with_sharding(shapes: PyTree, sharding=None) -> PyTree:
    """ShapeDtypeStructs carrying shardings: `sharding` is None (the first device, for leaves
    without one), one `jax.sharding.Sharding` for every leaf, or a tree of them like `shapes`."""
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
        default = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])

        def attach(s):
            keep = s.sharding if sharding is None and getattr(s, "sharding", None) is not None else default
            return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=keep)

        return jax.tree.map(attach, shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, sharding)


def _mismatches(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    problems = [f"param {k!r} is not in the checkpoint" for k in sorted(wanted.keys() - stored.keys())]
    problems += [f"checkpoint param {k!r} is not in the model" for k in sorted(stored.keys() - wanted.keys())]
    for k in sorted(wanted.keys() & stored.keys()):
        if tuple(stored[k].shape) != tuple(wanted[k].shape):
            problems.append(f"param {k!r} has shape {tuple(stored[k].shape)} in the checkpoint, "
                            f"the config wants {tuple(wanted[k].shape)}")
    return problems


def restore(path: str | os.PathLike, target: PyTree) -> PyTree:
    """Restore the params of checkpoint `path` into `target`, a tree of `jax.ShapeDtypeStruct`s.

    Each array is read straight into its target's sharding (leaves without one go to the first
    device) and dtype. The stored tree must have the target's structure and shapes; every
    difference is reported at once, naming the params.
    """
    import orbax.checkpoint as ocp

    root = _check_dir(path)
    params_dir = root / PARAMS_DIR
    damaged = f"{params_dir}: cannot read the params, truncated or damaged?"
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        try:
            item = ckptr.metadata(params_dir).item_metadata
        except Exception as e:  # orbax/tensorstore raise many kinds for damaged files
            raise CheckpointError(f"{damaged} ({_first_line(e)})") from None
        if item is None:  # orbax logs the cause and returns no metadata
            raise CheckpointError(f"{damaged} (no readable array metadata)")
        problems = _mismatches(_flat(item.tree), _flat(target))
        if problems:
            shown = "; ".join(problems[:8]) + (f"; ... ({len(problems) - 8} more)" if len(problems) > 8 else "")
            raise CheckpointError(f"{root}: {len(problems)} param(s) do not match the config: {shown}")
        try:
            return ckptr.restore(params_dir, args=ocp.args.StandardRestore(with_sharding(target)))
        except Exception as e:  # a truncated array file surfaces as a tensorstore error
            raise CheckpointError(f"{damaged} ({_first_line(e)})") from None


def _unipic_param_shapes(config: ml_collections.ConfigDict) -> PyTree:
    from unipic_jax.models.unipic import UniPicConfig, param_shapes

    return param_shapes(UniPicConfig.from_config(config))


def load(path: str | os.PathLike, *, sharding=None,
         param_shapes: Callable[[ml_collections.ConfigDict], PyTree] | None = None
         ) -> tuple[ml_collections.ConfigDict, PyTree]:
    """Read checkpoint `path` -> (config, params), params placed by `sharding` (see `with_sharding`).

    The target shapes come from the stored config through `param_shapes(config)` (default: the
    UniPic model's `unipic_jax.models.unipic.param_shapes`), i.e. from the model, not the files.
    """
    config = read_config(path)
    shapes = (param_shapes or _unipic_param_shapes)(config)
    return config, restore(path, with_sharding(shapes, sharding))


def export_safetensors(params: PyTree, keymap_fn: Callable[[PyTree], Mapping[str, Any]],
                       path: str | os.PathLike, *, dtype=None) -> Path:
    """Write `keymap_fn(params)` (a PyTorch-layout state dict) to a .safetensors file, atomically.

    `dtype` (e.g. `ml_dtypes.bfloat16`) casts floating tensors; integers are kept.
    """
    from convert.io import save_state_dict

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: export writes .safetensors files")
    state_dict = {}
    for key, value in keymap_fn(params).items():
        array = np.asarray(value)
        if dtype is not None and jax.numpy.issubdtype(array.dtype, jax.numpy.floating):
            array = array.astype(dtype)
        state_dict[key] = array
    save_state_dict(state_dict, path)
    return path


def find_tokenizer_dir(release: str | os.PathLike) -> Path | None:
    """The tokenizer folder of an official release: `Qwen2.5-1.5B-Instruct/`, else the only
    subfolder holding tokenizer files, else None."""
    root = Path(release)
    preferred = root / "Qwen2.5-1.5B-Instruct"
    candidates = [preferred] if preferred.is_dir() else sorted(p for p in root.iterdir() if p.is_dir())
    found = [p for p in candidates if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()]
    return found[0] if len(found) == 1 else None


def fetch_release(source: str) -> Path:
    """A local release folder, or a Hugging Face Hub repo id downloaded (online only) to the cache."""
    local = Path(source)
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"{local}: not a folder (want the official release folder or a hub id)")
        return local
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise CheckpointError(f"{source}: no such folder, and not a Hugging Face Hub id (owner/name)")
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(source))
    except Exception as e:  # offline, unknown repo, network failure: all end the conversion
        raise CheckpointError(f"{source}: no such local folder, and downloading it from the Hugging Face Hub "
                              f"failed ({type(e).__name__}: {_first_line(e, 160)})") from None
