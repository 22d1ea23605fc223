"""Reading the weights out of a training run's working directory.

A run (`unipic_jax.train.loop.Trainer.run`) leaves

    WORKDIR/config.json             the stage config (`to_json_best_effort`): "stage", "model", ...
    WORKDIR/checkpoints/<step>/     orbax CheckpointManager steps; item "state" holds the
                                    TrainState (step, params, opt_state, ema), item "data" the
                                    data iterator
    WORKDIR/tokenizer/              the byte-level stand-in tokenizer of tiny configs (if made)

    WORKDIR/lora.json               LoRA runs only: rank, alpha, modules and the base (train/lora.py);
                                    their "state" holds the adapters alone

`read_run` restores only the weights it returns (never the optimizer state), into targets derived
with `jax.eval_shape` from the run's model config, and skips a damaged newest step with a warning.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import jax
import ml_collections

from convert.core import flatten, unflatten
from unipic_jax import quant
from unipic_jax.checkpoint import CheckpointError, _first_line, _tuples
from unipic_jax.train import lora

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
STATE_ITEM = "state"
TOKENIZER_DIR = "tokenizer"
WEIGHTS = ("ema", "params")


class DamagedStepError(CheckpointError):
    """A checkpoint step whose files cannot be read (truncated, half-deleted)."""


def _read_config(root: Path) -> dict | None:
    try:
        doc = json.loads((root / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def is_run(path: str | os.PathLike) -> bool:
    """Whether `path` is a training working directory: config.json with a "stage", and checkpoints/."""
    root = Path(path)
    doc = _read_config(root)
    return doc is not None and "stage" in doc and (root / CHECKPOINTS_DIR).is_dir()


def run_steps(workdir: str | os.PathLike) -> list[int]:
    """The saved steps of a run, ascending. Orbax writes a step under a temporary name and renames
    it to the bare number when complete, so unfinished saves are not listed."""
    folder = Path(workdir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())


def _model_config(root: Path, doc: Mapping) -> ml_collections.ConfigDict:
    model = doc.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{root / CONFIG_FILE}: no 'model' section")
    return ml_collections.ConfigDict(_tuples(model))  # JSON lists back to the schema's tuples


def model_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The model config a run trained (its config.json's "model" section), without reading weights."""
    root = Path(workdir)
    doc = _read_config(root)
    if doc is None:
        raise CheckpointError(f"{root / CONFIG_FILE}: missing or not a JSON object")
    return _model_config(root, doc)


def _param_shapes(root: Path, model_config) -> dict:
    from unipic_jax.models.unipic import UniPicConfig, param_shapes

    try:
        return param_shapes(UniPicConfig.from_config(model_config))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{root / CONFIG_FILE}: unusable model config ({_first_line(e)})") from None


def _stored(tree: Any, name: str) -> dict[str, Any]:
    """The arrays stored under `name` of the state's metadata tree, by '/' path (leaves orbax
    did not store, such as the EMA's `optax.MaskedNode` for frozen params, read as None)."""
    sub = tree.get(name) if isinstance(tree, Mapping) else None
    if not isinstance(sub, Mapping):
        return {}
    return {k: v for k, v in flatten(sub).items() if v is not None}


def _restore_step(root: Path, step: int, shapes: Mapping, weights: str) -> dict:
    """The params (or EMA params: the EMA where kept, the frozen params as they are) of one step."""
    import orbax.checkpoint as ocp

    state_dir = root / CHECKPOINTS_DIR / str(step) / STATE_ITEM
    damaged = f"{state_dir}: cannot read the checkpoint, truncated or damaged?"
    handler = ocp.PyTreeCheckpointHandler()
    try:
        try:
            tree = handler.metadata(state_dir).tree
        except Exception as e:  # orbax/tensorstore raise many kinds for damaged files
            raise DamagedStepError(f"{damaged} ({_first_line(e, 160)})") from None
        params, ema = _stored(tree, "params"), _stored(tree, "ema")
        if not params:
            raise DamagedStepError(f"{damaged} (no params in its metadata)")
        if weights == "ema" and not ema:
            raise CheckpointError(f"{root}: the run keeps no EMA "
                                  f"(optim.ema_decay was 0); read weights='params' instead")
        want = flatten(shapes)
        problems = [f"param {k!r} is not in the checkpoint" for k in want if k not in params]
        problems += [f"param {k!r} has shape {tuple(params[k].shape)}, the config wants {tuple(want[k].shape)}"
                     for k in want if k in params and tuple(params[k].shape) != tuple(want[k].shape)]
        if problems:
            raise CheckpointError(f"{state_dir}: {len(problems)} param(s) do not match the run's config: "
                                  + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        source = {k: ("ema" if weights == "ema" and k in ema else "params") for k in want}
        target = {name: unflatten({k: jax.ShapeDtypeStruct(want[k].shape, want[k].dtype, sharding=device)
                                   for k in want if source[k] == name})
                  for name in set(source.values())}
        try:
            restored = handler.restore(state_dir, args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True))
        except Exception as e:  # a truncated array file surfaces as a tensorstore error
            raise DamagedStepError(f"{damaged} ({_first_line(e, 160)})") from None
    finally:
        handler.close()
    flat = {name: flatten(tree) for name, tree in restored.items()}
    return unflatten({k: flat[source[k]][k] for k in want})


def _tokenizer_dir(root: Path, doc: Mapping) -> Path | None:
    if (root / TOKENIZER_DIR).is_dir():
        return root / TOKENIZER_DIR
    named = doc.get("tokenizer") or ""
    if not named:
        return None
    if not Path(named).is_dir():
        warnings.warn(f"{root / CONFIG_FILE}: its tokenizer {named} is not a folder here; returning none")
        return None
    return Path(named)


def read_run(workdir: str | os.PathLike, weights: str = "ema", step: int | None = None
             ) -> tuple[ml_collections.ConfigDict, dict, Path | None, int]:
    """A run's weights -> (model config, params, tokenizer folder or None, step).

    `weights`: "ema" (default; the EMA of the trainable params, the frozen ones as they are) or
    "params" (the raw weights); of a LoRA run, the base merged with those adapters
    (`quant.lora_merge`: base + A @ B * alpha / rank). `step`: a saved step, else the newest intact one; a newest step
    that cannot be read is skipped with a warning naming it. The model config is config.json's
    "model" section (lists turned back into tuples); the params are restored onto the first device
    into shapes derived from it with `jax.eval_shape`. The tokenizer folder is WORKDIR/tokenizer,
    else the config's `tokenizer`. Every failure is a `CheckpointError` (a `ValueError`) naming
    the path.
    """
    root = Path(workdir).absolute()
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: choose 'ema' or 'params'")
    doc = _read_config(root)
    if not is_run(root) or doc is None:
        raise CheckpointError(f"{root}: not a training run (want {CONFIG_FILE} with a 'stage' and a "
                              f"{CHECKPOINTS_DIR}/ folder)")
    model_config = _model_config(root, doc)
    shapes = _param_shapes(root, model_config)
    record = lora.read_record(root)
    if record is not None:  # a LoRA run stores the adapters alone: restore them, merge onto the base
        settings = lora.Settings(int(record["rank"]), float(record["alpha"]), record["modules"],
                                 record.get("quantize") or "")
        stage = ml_collections.ConfigDict({"optim": _tuples(doc.get("optim") or {})})
        try:
            shapes = lora.adapter_tree_shapes(shapes, stage, settings)
        except (ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{root / CONFIG_FILE}: unusable LoRA settings ({_first_line(e)})") from None
    steps = run_steps(root)
    if not steps:
        raise CheckpointError(f"{root / CHECKPOINTS_DIR}: no saved step")
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"{root / CHECKPOINTS_DIR}: no step {step} (saved: "
                                  f"{', '.join(map(str, steps))})")
        candidates = [step]
    else:
        candidates = steps[::-1]
    failures = []
    for s in candidates:
        try:
            params = _restore_step(root, s, shapes, weights)
        except DamagedStepError as e:
            if step is not None:
                raise
            failures.append(str(e))
            warnings.warn(f"{root / CHECKPOINTS_DIR}: step {s} is damaged, falling back to an earlier "
                          f"step ({e})")
            continue
        if record is not None:
            base = lora.prepare_base(lora.read_base(record, model_config), settings)
            params = quant.dequantize_params(quant.lora_merge(base, params, settings.scale))
        return model_config, params, _tokenizer_dir(root, doc), s
    raise CheckpointError(f"{root / CHECKPOINTS_DIR}: no intact step ({'; '.join(failures)})")
