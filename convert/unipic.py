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
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np

from convert.core import KeyMap, flax_to_torch, torch_to_flax
from convert.diffusion import HEAD_KEYMAP
from convert.hf import load_hf_folder
from convert.io import CheckpointFileError, load_state_dict
from convert.mar import MAR_KEYMAP
from convert.projectors import PROJECTOR_KEYMAP
from convert.qwen2 import qwen2_keymap
from convert.siglip import SIGLIP_KEYMAP, hf_vision_state_dict
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


def load_release(folder: str | os.PathLike, config: UniPicConfig | None = None) -> dict:
    """UniPic params (float32) from an official release folder; `config` defaults to the released
    sizes (configs/unipic_1p5b.py). Raises `ConversionError` naming every problem at once."""
    if config is None:
        from configs import unipic_1p5b

        config = UniPicConfig.from_config(unipic_1p5b.get_config())
    state_dict = {k: v.astype(np.float32) if _is_float(v) else v
                  for k, v in release_state_dict(folder, unipic_keymap(config).tied).items()}
    return unipic_params_from_torch(state_dict, config, what=f"UniPic release {os.fspath(folder)}")
