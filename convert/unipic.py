"""The whole UniPic state dict <-> the `UniPic` param tree, and the official release folder.

Key table: the component tables under UniPic's prefixes,

    vae.*                 -> vae/            (convert/vae.py)
    llm.*                 -> llm/            (convert/qwen2.py; llm.lm_head.weight is the tied alias)
    mar.diffloss.net.*    -> diffusion_head/ (convert/diffusion.py)
    mar.*                 -> mar/            (convert/mar.py)
    proj_in.*, proj_out.*, siglip2_proj.*   -> the three projectors (convert/projectors.py)
    siglip2.*             -> siglip2/        (convert/siglip.py)

`unipic_params_from_torch` checks every key against the param shapes of `UniPic(config)` and
raises one `ConversionError` listing every problem; `unipic_params_to_torch` is its exact inverse.

`load_release(folder)` reads the layout the released scripts expect (spec §14, §2.6):

    folder/pytorch_model.bin            llm.*, mar.*, proj_in.*, proj_out.*, siglip2*.*  (no vae.*:
                                        the training wrapper strips every key containing "vae.")
    folder/kl16.ckpt                    {"model": un-prefixed AutoencoderKL state dict}
    folder/Qwen2.5-1.5B-Instruct/       optional Hugging Face folder (base LLM weights)
    folder/siglip2-so400m-patch16-512/  optional Hugging Face folder (base SigLIP2 weights)

The `.bin` is UniPic's fine-tuned checkpoint, so it wins: where it and a subfolder both hold a
weight, the `.bin`'s is used; a subfolder only supplies keys the `.bin` lacks. This is what the
reference does: it builds the LLM and SigLIP2 from the subfolders, then loads the `.bin` over them
(`strict=False`).

The LLM and SigLIP2 sizes come from the subfolders' config.json files when the release has them
(`release_config`); the MAR, VAE and diffusion-head sizes have no config file in the release and
come from the given config (configs/unipic_1p5b.py by default).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import ml_collections
import ml_dtypes
import numpy as np

from convert.core import KeyMap, flax_to_torch, torch_to_flax
from convert.diffusion import HEAD_KEYMAP
from convert.hf import load_hf_folder
from convert.io import CheckpointFileError, load_state_dict
from convert.mar import MAR_KEYMAP
from convert.projectors import PROJECTOR_KEYMAP
from convert.qwen2 import qwen2_keymap, qwen2_section_from_hf
from convert.siglip import SIGLIP_KEYMAP, hf_vision_state_dict, siglip_section_from_hf
from convert.vae import VAE_KEYMAP
from unipic_jax.models.unipic import UniPicConfig, param_shapes

RELEASE_BIN = "pytorch_model.bin"
RELEASE_VAE = "kl16.ckpt"
RELEASE_LLM_FOLDER = "Qwen2.5-1.5B-Instruct"
RELEASE_SIGLIP_FOLDER = "siglip2-so400m-patch16-512"


def unipic_keymap(config: UniPicConfig) -> KeyMap:
    """The full key table (the LLM's tied or untied head follows `config.qwen2`)."""
    return (VAE_KEYMAP.prefixed("vae.", "vae/")
            + qwen2_keymap(config.qwen2).prefixed("llm.", "llm/")
            + HEAD_KEYMAP.prefixed("mar.diffloss.net.", "diffusion_head/")
            + MAR_KEYMAP.prefixed("mar.", "mar/")
            + PROJECTOR_KEYMAP.prefixed("proj_in.", "proj_in/")
            + PROJECTOR_KEYMAP.prefixed("proj_out.", "proj_out/")
            + PROJECTOR_KEYMAP.prefixed("siglip2_proj.", "siglip2_proj/")
            + SIGLIP_KEYMAP.prefixed("siglip2.", "siglip2/"))


def unipic_params_from_torch(state_dict: Mapping[str, np.ndarray], config: UniPicConfig, *,
                             what: str = "UniPic checkpoint") -> dict:
    """A whole `SkyworkUnipic` state dict (numpy arrays) -> `UniPic(config)` params.

    Arrays keep their dtype (lossless). Raises `ConversionError` listing every unmapped key, missing
    param and shape mismatch at once.
    """
    return torch_to_flax(state_dict, unipic_keymap(config), param_shapes(config), what=what)


def unipic_params_to_torch(params: Mapping, config: UniPicConfig) -> dict[str, np.ndarray]:
    """`UniPic` params -> the `SkyworkUnipic` state dict (PyTorch layouts, tied `llm.lm_head.weight`)."""
    return flax_to_torch(params, unipic_keymap(config), what="UniPic params")


def release_state_dict(folder: str | os.PathLike, tied: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """The whole UniPic state dict assembled from a release folder (see the module docstring).

    `tied` (alias -> canonical key, e.g. `unipic_keymap(config).tied`): a subfolder's alias is
    dropped when the `.bin` supplies its canonical key, so a fine-tuned embedding never meets a
    base-model copy of itself.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointFileError(f"{folder}: no such release folder")
    state_dict = dict(load_state_dict(folder / RELEASE_BIN))
    stray = sorted(k for k in state_dict if k.startswith("vae."))
    if stray:
        raise CheckpointFileError(f"{folder / RELEASE_BIN}: holds {len(stray)} vae.* key(s) (e.g. {stray[0]!r}); "
                                  f"the VAE must come from {RELEASE_VAE} alone")
    state_dict.update({"vae." + k: v for k, v in load_state_dict(folder / RELEASE_VAE).items()})
    base: dict[str, np.ndarray] = {}
    if (folder / RELEASE_LLM_FOLDER).is_dir():
        _, llm = load_hf_folder(folder / RELEASE_LLM_FOLDER)
        base.update({"llm." + k: v for k, v in llm.items()})
    if (folder / RELEASE_SIGLIP_FOLDER).is_dir():
        _, siglip = load_hf_folder(folder / RELEASE_SIGLIP_FOLDER)
        base.update({"siglip2." + k: v for k, v in hf_vision_state_dict(siglip).items()})
    for alias, canonical in (tied or {}).items():
        if canonical in state_dict and alias not in state_dict:
            base.pop(alias, None)
    return {**base, **state_dict}


def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating) or a.dtype == ml_dtypes.bfloat16


def _read_config(path: Path) -> dict | None:
    """A subfolder's config.json as a dict, or None when the release has no such file."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointFileError(f"{path}: not valid JSON ({e})") from None


def release_config(folder: str | os.PathLike, base_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`base_config` (configs/unipic_1p5b.py schema) with the `qwen2` and `siglip` sections replaced by
    what the release's own `Qwen2.5-1.5B-Instruct/config.json` and
    `siglip2-so400m-patch16-512/config.json` say, where the release holds them (`projectors.llm_dim`
    follows the LLM width). Every other section is kept: the release has no file for it. The
    base config is not modified."""
    folder = Path(folder)
    config = base_config.copy_and_resolve_references()
    llm = _read_config(folder / RELEASE_LLM_FOLDER / "config.json")
    if llm is not None:
        config.qwen2.update(qwen2_section_from_hf(llm))
        config.projectors.llm_dim = config.qwen2.hidden_size
    siglip = _read_config(folder / RELEASE_SIGLIP_FOLDER / "config.json")
    if siglip is not None:
        config.siglip.update(siglip_section_from_hf(siglip))
    return config


def load_release(folder: str | os.PathLike, config: UniPicConfig | None = None) -> dict:
    """UniPic params (float32) from an official release folder, converted for `config`; without
    one, for `release_config(folder, configs/unipic_1p5b.py)` (the released sizes, LLM and SigLIP2
    ones read from the release's files). Raises `ConversionError` on any problem."""
    if config is None:
        from configs import unipic_1p5b

        config = UniPicConfig.from_config(release_config(folder, unipic_1p5b.get_config()))
    state_dict = {k: v.astype(np.float32) if _is_float(v) else v
                  for k, v in release_state_dict(folder, unipic_keymap(config).tied).items()}
    return unipic_params_from_torch(state_dict, config, what=f"UniPic release {os.fspath(folder)}")


def load_release_with_config(folder: str | os.PathLike, config: ml_collections.ConfigDict
                             ) -> tuple[ml_collections.ConfigDict, dict]:
    """(the config the release was converted for, float32 params): `release_config(folder, config)`
    and the params `load_release` gives for it. Save the returned config beside the params: its
    LLM and SigLIP2 sizes are the release's, whatever `config` said."""
    config = release_config(folder, config)
    return config, load_release(folder, UniPicConfig.from_config(config))
