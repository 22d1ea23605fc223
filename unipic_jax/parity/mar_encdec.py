"""Parity rows for the MAR encoder and decoder (mar/io.safetensors `enc/*` and `dec/*`).

Grids and mask kinds are discovered from the io keys (`enc/{h}x{w}/x`, `enc/{h}x{w}/{kind}/mask`),
so other fixture sets with other grids run unchanged. Each decoder row feeds the *reference*
encoder output, so a decoder failure is not an encoder failure seen twice. Every row is a single
forward pass: bound FORWARD (1e-4 x max|ref|).
"""

from __future__ import annotations

import functools
from typing import Iterator

import numpy as np

from convert.mar import mar_params_from_torch
from unipic_jax.models.mar import MAR, MARConfig, apply_decode, apply_encode
from unipic_jax.parity import FORWARD, Row, compare


def grids(io: dict) -> list[str]:
    """Grid names ('8x8', '3x6', ...) present in the io file, smallest first."""
    names = {k.split("/")[1] for k in io if k.startswith("enc/") and k.endswith("/x")}
    return sorted(names, key=lambda g: (grid_shape(g)[0] * grid_shape(g)[1], g))


def grid_shape(name: str) -> tuple[int, int]:
    h, w = name.split("x")
    return int(h), int(w)


def kinds(io: dict, grid: str) -> list[str]:
    """Mask kinds ('all', 'none', 'partial', ...) stored for one grid."""
    prefix = f"enc/{grid}/"
    return sorted(k[len(prefix):-len("/mask")] for k in io
                  if k.startswith(prefix) and k.endswith("/mask"))


def num_visible(mask_bl: np.ndarray) -> int:
    """Visible (mask == 0) tokens per row, as a Python int; every row must agree."""
    counts = np.sum(np.asarray(mask_bl) == 0, axis=1)
    if not np.all(counts == counts[0]):
        raise ValueError(f"mask rows keep different token counts {counts.tolist()}")
    return int(counts[0])


@functools.cache
def model_and_params(fx) -> tuple[MAR, dict]:
    """`MAR` of the fixture's config and its params converted from the fixture weights."""
    config = MARConfig(**fx.config().mar)
    return MAR(config), mar_params_from_torch(fx.weights, config)


def encoder_rows(fx, grid: str) -> Iterator[Row]:
    """`enc/{grid}/{kind}/out` for every kind, plus `out_shape_none` (image_shape=None) if stored."""
    model, params = model_and_params(fx)
    io, shape = fx.io, grid_shape(grid)
    for kind in kinds(io, grid):
        base = f"enc/{grid}/{kind}"
        mask = io[f"{base}/mask"]
        for output, image_shape in (("out", shape), ("out_shape_none", None)):
            if f"{base}/{output}" in io:
                got = apply_encode(model, params, io[f"enc/{grid}/x"], mask, num_visible(mask),
                                   image_shape)
                yield compare("mar", f"{base}/{output}", got, io[f"{base}/{output}"], FORWARD)


def decoder_rows(fx, grid: str) -> Iterator[Row]:
    """`dec/{grid}/{kind}/out`, `out_xcon` (x_con = `dec/{grid}/x_con`) and `out_shape_none`,
    each decoding the stored reference encoder output of the same case."""
    model, params = model_and_params(fx)
    io, shape = fx.io, grid_shape(grid)
    for kind in kinds(io, grid):
        base = f"dec/{grid}/{kind}"
        mask = io[f"enc/{grid}/{kind}/mask"]
        for output in ("out", "out_xcon", "out_shape_none"):
            if f"{base}/{output}" not in io:
                continue
            native_call = output == "out_shape_none"
            x_enc = io[f"enc/{grid}/{kind}/{'out_shape_none' if native_call else 'out'}"]
            x_con = io[f"dec/{grid}/x_con"] if output == "out_xcon" else None
            got = apply_decode(model, params, x_enc, mask, None if native_call else shape, x_con)
            yield compare("mar", f"{base}/{output}", got, io[f"{base}/{output}"], FORWARD)


def rows(fx) -> Iterator[Row]:
    """Every encoder and decoder row of mar/io.safetensors, grid by grid."""
    for grid in grids(fx.io):
        yield from encoder_rows(fx, grid)
        yield from decoder_rows(fx, grid)
