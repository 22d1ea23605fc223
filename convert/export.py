"""UniPic params -> the official release folder (the layout `convert.unipic.load_release` reads).

    dst/pytorch_model.bin                 torch pickle: every `SkyworkUnipic.state_dict()` key except
                                          vae.* (what the training wrapper saves), the tied
                                          `llm.lm_head.weight` included and sharing the embedding's
                                          storage, as torch's `state_dict()` has it
    dst/kl16.ckpt                         torch pickle {"model": un-prefixed AutoencoderKL state dict}
    dst/Qwen2.5-1.5B-Instruct/            Hugging Face Qwen2ForCausalLM folder: config.json,
                                          model.safetensors (llm.* un-prefixed, the tied head left
                                          out as Hugging Face does), the tokenizer files if given
    dst/siglip2-so400m-patch16-512/       Hugging Face SiglipVisionModel folder: config.json,
                                          preprocessor_config.json, model.safetensors
    dst/unipic_jax_export.json            marker: {"format": "unipic-jax-export", "version": 1}

The official code builds the LLM and SigLIP2 from the two subfolders (`from_pretrained`) and then
loads `pytorch_model.bin` over the whole model, so both subfolders must exist even though the `.bin`
holds their weights too (spec §14: the release ships them; the `.bin` holds siglip2.* per issue #22).

`release_layout(params_or_shapes, config)` gives every file's keys and PyTorch shapes without
writing (or allocating) anything, so the full-size layout can be checked from `jax.eval_shape`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Mapping

import jax
import ml_dtypes
import numpy as np

from convert.core import TRANSFORMS, ConversionError, flatten
from convert.hf import SAFETENSORS, save_hf_folder
from convert.io import replaced_directory, save_state_dict
from convert.qwen2 import qwen2_keymap
from convert.unipic import RELEASE_BIN, RELEASE_LLM_FOLDER, RELEASE_SIGLIP_FOLDER, RELEASE_VAE, unipic_keymap
from unipic_jax.models.unipic import UniPicConfig, param_shapes

MARKER = "unipic_jax_export.json"
FORMAT = "unipic-jax-export"
VERSION = 1
LLM_WEIGHTS = f"{RELEASE_LLM_FOLDER}/{SAFETENSORS}"
SIGLIP_WEIGHTS = f"{RELEASE_SIGLIP_FOLDER}/{SAFETENSORS}"
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


class ExportError(ValueError):
    """An export that cannot be written (destination, params or options at fault)."""


def _as_array(leaf) -> np.ndarray:
    """An array, or for a shape-only leaf (`jax.ShapeDtypeStruct`) a zero-stride view of its shape:
    transposes of it are free, so the full-size layout costs no memory."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return np.broadcast_to(np.zeros((), leaf.dtype), leaf.shape)
    return np.asarray(leaf)


def _state_dict(params: Mapping, config: UniPicConfig) -> dict[str, np.ndarray]:
    """The whole `SkyworkUnipic` state dict in PyTorch layouts (views, not copies); a tied alias
    is the very same array object as its canonical key."""
    keymap = unipic_keymap(config)
    out, problems = {}, []
    for path, leaf in flatten(params).items():
        hit = keymap.to_torch(path)
        if hit is None:
            problems.append(f"param {path!r} has no PyTorch key")
            continue
        key, rule = hit
        out[key] = TRANSFORMS[rule.transform].to_torch(_as_array(leaf))
    if problems:
        raise ConversionError(problems, "UniPic params")
    for alias, canonical in keymap.tied.items():
        if canonical in out:
            out[alias] = out[canonical]
    return out


def _release_files(params: Mapping, config: UniPicConfig) -> dict[str, dict[str, np.ndarray]]:
    """The state dict split into the release's weight files (relative path -> {key: array})."""
    state_dict = _state_dict(params, config)
    llm_tied = qwen2_keymap(config.qwen2).tied  # Hugging Face files leave the tied head out

    def under(prefix: str, drop=()) -> dict[str, np.ndarray]:
        return {k[len(prefix):]: v for k, v in state_dict.items()
                if k.startswith(prefix) and k[len(prefix):] not in drop}

    return {
        # The training wrapper drops every key containing "vae." (spec §2.6).
        RELEASE_BIN: {k: v for k, v in state_dict.items() if "vae." not in k},
        RELEASE_VAE: under("vae."),
        LLM_WEIGHTS: under("llm.", drop=llm_tied),
        SIGLIP_WEIGHTS: under("siglip2."),
    }


def release_layout(params_or_shapes: Mapping, config: UniPicConfig) -> dict[str, dict[str, tuple]]:
    """What `export_release` writes, without writing: {file (relative path): {key: PyTorch shape}}.

    Takes the params, or their `jax.ShapeDtypeStruct`s (e.g. `unipic_jax.models.unipic.param_shapes`),
    in which case nothing is allocated. kl16.ckpt's keys are those under its "model" entry.
    """
    return {name: {k: tuple(v.shape) for k, v in tensors.items()}
            for name, tensors in _release_files(params_or_shapes, config).items()}


def is_export(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder `export_release` wrote (its marker file says so)."""
    try:
        doc = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == FORMAT


def _check_destination(dst, overwrite: bool) -> Path:
    dest = Path(dst).absolute()
    if dest.exists() or dest.is_symlink():
        if not overwrite:
            raise ExportError(f"{dest}: already exists (pass overwrite=True to replace an earlier export)")
        if dest.is_symlink() or not dest.is_dir() or not is_export(dest):
            raise ExportError(f"{dest}: exists and is not a folder export_release wrote (no {MARKER}); "
                              f"refusing to replace it")
    return dest


def _check_params(params: Mapping, config: UniPicConfig) -> None:
    """The params must be arrays with exactly the tree and shapes of `UniPic(config)`."""
    flat = flatten(params)
    if any(isinstance(v, jax.ShapeDtypeStruct) for v in flat.values()):
        raise ExportError("params are shapes only (jax.ShapeDtypeStruct); release_layout takes those")
    have = {k: tuple(np.shape(v)) for k, v in flat.items()}
    want = {k: tuple(v.shape) for k, v in flatten(param_shapes(config)).items()}
    problems = [f"missing param {k!r}" for k in sorted(want.keys() - have.keys())]
    problems += [f"param {k!r} is not in the model" for k in sorted(have.keys() - want.keys())]
    problems += [f"param {k!r} has shape {have[k]}, the config wants {want[k]}"
                 for k in sorted(want.keys() & have.keys()) if have[k] != want[k]]
    if problems:
        raise ExportError(f"params do not match the config ({len(problems)} problem(s)): "
                          + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))


def _target_dtype(dtype) -> np.dtype | None:
    if dtype is None:
        return None
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _DTYPES:
        raise ExportError(f"dtype {dtype!r}: choose None (keep float32), 'float32' or 'bfloat16'")
    return _DTYPES[name]


def _cast(tensors: Mapping[str, np.ndarray], dtype: np.dtype | None) -> dict[str, np.ndarray]:
    """Floating tensors in `dtype`, contiguous and writable (torch wants both). Tensors that were
    one object stay one object, so torch stores a tied pair once."""
    done: dict[int, np.ndarray] = {}
    out = {}
    for key, a in tensors.items():
        if id(a) not in done:
            floating = np.issubdtype(a.dtype, np.floating) or a.dtype == ml_dtypes.bfloat16
            b = a.astype(dtype) if dtype is not None and floating and a.dtype != dtype else a
            done[id(a)] = np.require(b, requirements=["C_CONTIGUOUS", "WRITEABLE"])
        out[key] = done[id(a)]
    return out


def qwen2_hf_config(config: UniPicConfig, torch_dtype: str, base: Mapping | None = None) -> dict:
    """transformers' Qwen2 config.json for `config.qwen2`. Fields of `base` (e.g. the original
    Qwen2.5 config.json) are kept unless derived here; a `base` disagreeing on a size is an error."""
    q = config.qwen2
    derived = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": q.vocab_size, "hidden_size": q.hidden_size, "intermediate_size": q.intermediate_size,
        "num_hidden_layers": q.num_layers, "num_attention_heads": q.num_heads,
        "num_key_value_heads": q.num_kv_heads, "head_dim": q.head_dim, "hidden_act": "silu",
        "rms_norm_eps": q.rms_eps, "rope_theta": q.rope_theta, "max_position_embeddings": q.max_position_embeddings,
        "tie_word_embeddings": bool(q.tie_embeddings), "torch_dtype": torch_dtype,
        "bos_token_id": config.tokens.bos, "eos_token_id": config.tokens.eos,
    }
    base = dict(base or {})
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "tie_word_embeddings")
    clash = [f"{k}={base[k]} (the params have {derived[k]})" for k in sizes if k in base and base[k] != derived[k]]
    if clash:
        raise ExportError(f"llm_config_json disagrees with the model config: {', '.join(clash)}")
    base.setdefault("use_sliding_window", False)
    base.setdefault("attention_dropout", 0.0)
    return {**base, **derived}


def siglip_hf_config(config: UniPicConfig, torch_dtype: str) -> dict:
    """transformers' `SiglipVisionConfig` config.json for `config.siglip`."""
    s = config.siglip
    return {
        "architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
        "hidden_size": s.hidden_size, "intermediate_size": s.intermediate_size,
        "num_hidden_layers": s.num_layers, "num_attention_heads": s.num_heads, "num_channels": s.num_channels,
        "image_size": s.image_size, "patch_size": s.patch_size, "layer_norm_eps": s.ln_eps,
        "hidden_act": "gelu_pytorch_tanh", "attention_dropout": 0.0, "vision_use_head": bool(s.use_head),
        "torch_dtype": torch_dtype,
    }


def siglip_preprocessor_config(config: UniPicConfig) -> dict:
    """The fixed-resolution SigLIP2 image processor (spec §6: bilinear resize, [-1, 1])."""
    size = config.siglip.image_size
    return {"image_processor_type": "SiglipImageProcessor", "do_resize": True,
            "size": {"height": size, "width": size}, "resample": 2, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5]}


def _tokenizer_files(tokenizer_dir) -> list[Path]:
    from unipic_jax.checkpoint import TOKENIZER_FILES

    if tokenizer_dir is None:
        return []
    files = [Path(tokenizer_dir) / f for f in TOKENIZER_FILES if (Path(tokenizer_dir) / f).is_file()]
    if not files:
        raise ExportError(f"{tokenizer_dir}: no tokenizer files to copy (looked for {', '.join(TOKENIZER_FILES)})")
    return files


def _write_json(path: Path, doc: Mapping) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def export_release(params: Mapping, config: UniPicConfig, dst: str | os.PathLike, *,
                   tokenizer_dir: str | os.PathLike | None = None, dtype=None,
                   llm_config_json: Mapping | None = None, overwrite: bool = False) -> Path:
    """Write `params` of `UniPic(config)` as the official release folder `dst` (module docstring).

    `tokenizer_dir`: a Hugging Face tokenizer folder whose files (`checkpoint.TOKENIZER_FILES`)
    go into the Qwen2.5 subfolder (the official scripts load the tokenizer from there). `dtype`:
    None keeps the params' float32, "bfloat16" halves the size. `llm_config_json`: a Qwen2
    config.json to start from (sizes must agree; the fields derived from `config` win).

    The folder is built under a temporary name and renamed into place once complete. An existing
    `dst` is an `ExportError` unless `overwrite`, and even then only a folder this function wrote
    (its marker file) is replaced. Returns the absolute path of `dst`.
    """
    dest = _check_destination(dst, overwrite)
    target = _target_dtype(dtype)
    tokenizer_files = _tokenizer_files(tokenizer_dir)
    params = jax.device_get(params)
    _check_params(params, config)
    files = _release_files(params, config)
    torch_dtype = (target or np.dtype(files[LLM_WEIGHTS]["model.embed_tokens.weight"].dtype)).name
    llm_config = qwen2_hf_config(config, torch_dtype, llm_config_json)
    with replaced_directory(dest) as tmp:
        save_state_dict(_cast(files[RELEASE_BIN], target), tmp / RELEASE_BIN)
        save_state_dict(_cast(files[RELEASE_VAE], target), tmp / RELEASE_VAE, wrap="model")
        save_hf_folder(tmp / RELEASE_LLM_FOLDER, llm_config, _cast(files[LLM_WEIGHTS], target))
        for f in tokenizer_files:
            shutil.copy2(f, tmp / RELEASE_LLM_FOLDER / f.name)
        save_hf_folder(tmp / RELEASE_SIGLIP_FOLDER, siglip_hf_config(config, torch_dtype),
                       _cast(files[SIGLIP_WEIGHTS], target))
        _write_json(tmp / RELEASE_SIGLIP_FOLDER / "preprocessor_config.json", siglip_preprocessor_config(config))
        _write_json(tmp / MARKER, {"format": FORMAT, "version": VERSION, "dtype": torch_dtype})
    return dest
