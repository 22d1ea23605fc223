"""Parity rows for vae/: the KL-16 VAE forward against the reference AutoencoderKL.

One jitted pass encodes the stored images and decodes the posterior mode, capturing the
reference's debug intermediates on the way (flax `capture_intermediates`). Every row is a single
forward pass, so every bound is FORWARD (1e-4 x max|ref|). The fixture is NCHW; the model is
NHWC, so inputs and outputs are transposed here at the boundary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from convert.vae import vae_params_from_torch
from unipic_jax.models.vae import AutoencoderKL, VAEConfig
from unipic_jax.parity import FORWARD, compare

# Fixture name of each captured intermediate -> module path whose __call__ output it is,
# for the encode pass and the decode pass.
ENCODE_INTERMEDIATES = {
    "enc_mid_attn": ("encoder", "mid", "attn_1"),
    "enc_out": ("encoder",),
    "moments": ("quant_conv",),
}
DECODE_INTERMEDIATES = {
    "dec_in": ("post_quant_conv",),
    "dec_mid_out": ("decoder", "mid", "block_2"),
}
_CAPTURED = frozenset([*ENCODE_INTERMEDIATES.values(), *DECODE_INTERMEDIATES.values()])


def _capture(module, method_name: str) -> bool:
    return method_name == "__call__" and tuple(module.path) in _CAPTURED


def _take(state: dict, path: tuple[str, ...]):
    node = state["intermediates"]
    for name in path:
        node = node[name]
    return node["__call__"][0]


@functools.cache
def vae_forward(config: VAEConfig):
    """Jitted `(params, x_bhwc) -> {name: array}`: mean, logvar (clamped), std, mode, decoded
    (= decode(mode)) and the captured intermediates named in `*_INTERMEDIATES`, all NHWC."""
    model = AutoencoderKL(config)

    @jax.jit
    def forward(params, x_bhwc):
        variables = {"params": params}
        (mean, logvar), enc_state = model.apply(
            variables, x_bhwc, method="encode", capture_intermediates=_capture, mutable=["intermediates"])
        decoded, dec_state = model.apply(
            variables, mean, method="decode", capture_intermediates=_capture, mutable=["intermediates"])
        out = {"mean": mean, "logvar": logvar, "std": jnp.exp(0.5 * logvar), "mode": mean,
               "decoded": decoded}
        out.update({name: _take(enc_state, path) for name, path in ENCODE_INTERMEDIATES.items()})
        out.update({name: _take(dec_state, path) for name, path in DECODE_INTERMEDIATES.items()})
        return out

    return forward


def nhwc(x_nchw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x_nchw, (0, 2, 3, 1)))


def nchw(x_bhwc) -> np.ndarray:
    return np.transpose(np.asarray(x_bhwc), (0, 3, 1, 2))


OUTPUTS = ("moments", "mean", "logvar", "std", "mode", "decoded",
           "enc_out", "enc_mid_attn", "dec_in", "dec_mid_out")


def rows(fx):
    """One row per stored VAE output of vae/io.safetensors."""
    config = VAEConfig(**fx.config().vae)
    params = vae_params_from_torch(fx.weights, config)
    got = vae_forward(config)(params, nhwc(fx.io["x"]))
    for name in OUTPUTS:
        yield compare("vae", name, nchw(got[name]), fx.io[name], FORWARD)
