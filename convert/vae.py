"""Key table of the KL-16 VAE: PyTorch `AutoencoderKL` state dict <-> `unipic_jax.models.vae` params.

The source is the un-prefixed state dict of kl16.ckpt (`encoder.*`, `decoder.*`, `quant_conv.*`,
`post_quant_conv.*`); inside UniPic the same table sits under `vae.` (`VAE_KEYMAP.prefixed("vae.",
"vae/")`). Module names match one to one, so each rule only swaps `.{i}.` indices for `_{i}` and
PyTorch parameter names for Flax ones (conv weight -> kernel, GroupNorm weight -> scale).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from convert.core import KeyMap, Rule, flax_to_torch, torch_to_flax
from unipic_jax.models.vae import AutoencoderKL, VAEConfig


def _conv(torch_prefix: str, flax_prefix: str) -> list[Rule]:
    return [Rule(f"{torch_prefix}.weight", f"{flax_prefix}/kernel", "conv"),
            Rule(f"{torch_prefix}.bias", f"{flax_prefix}/bias")]


def _norm(torch_prefix: str, flax_prefix: str) -> list[Rule]:
    return [Rule(f"{torch_prefix}.weight", f"{flax_prefix}/scale"),
            Rule(f"{torch_prefix}.bias", f"{flax_prefix}/bias")]


def _resnet(t: str, f: str) -> list[Rule]:
    return (_norm(f"{t}.norm1", f"{f}/norm1") + _conv(f"{t}.conv1", f"{f}/conv1")
            + _norm(f"{t}.norm2", f"{f}/norm2") + _conv(f"{t}.conv2", f"{f}/conv2")
            + _conv(f"{t}.nin_shortcut", f"{f}/nin_shortcut"))


def _attn(t: str, f: str) -> list[Rule]:
    rules = _norm(f"{t}.norm", f"{f}/norm")
    for name in ("q", "k", "v", "proj_out"):
        rules += _conv(f"{t}.{name}", f"{f}/{name}")
    return rules


def _coder(part: str) -> list[Rule]:
    """Rules shared by `encoder` and `decoder`: conv_in, mid, norm_out, conv_out."""
    return (_conv(f"{part}.conv_in", f"{part}/conv_in")
            + _resnet(f"{part}.mid.block_{{m}}", f"{part}/mid/block_{{m}}")
            + _attn(f"{part}.mid.attn_1", f"{part}/mid/attn_1")
            + _norm(f"{part}.norm_out", f"{part}/norm_out")
            + _conv(f"{part}.conv_out", f"{part}/conv_out"))


VAE_KEYMAP = KeyMap(
    _coder("encoder")
    + _resnet("encoder.down.{l}.block.{b}", "encoder/down_{l}/block_{b}")
    + _attn("encoder.down.{l}.attn.{b}", "encoder/down_{l}/attn_{b}")
    + _conv("encoder.down.{l}.downsample.conv", "encoder/down_{l}/downsample/conv")
    + _coder("decoder")
    + _resnet("decoder.up.{l}.block.{b}", "decoder/up_{l}/block_{b}")
    + _conv("decoder.up.{l}.upsample.conv", "decoder/up_{l}/upsample/conv")
    + _conv("quant_conv", "quant_conv")
    + _conv("post_quant_conv", "post_quant_conv")
)


def vae_param_shapes(config: VAEConfig) -> dict:
    """The VAE's param tree as `jax.ShapeDtypeStruct`s (nothing allocated)."""
    f = config.downsample_factor
    x = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
    return jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), x)["params"]


def vae_params_from_torch(state_dict, config: VAEConfig) -> dict:
    """kl16.ckpt-layout state dict (numpy arrays) -> VAE params for `VAEConfig` `config`.

    Raises `convert.ConversionError` listing every unmapped key, missing param and shape mismatch.
    """
    return torch_to_flax(state_dict, VAE_KEYMAP, vae_param_shapes(config), what="VAE checkpoint")


def vae_params_to_torch(params) -> dict:
    """VAE params -> kl16.ckpt-layout state dict of numpy arrays (exact inverse of the import)."""
    return flax_to_torch(params, VAE_KEYMAP, what="VAE params")
