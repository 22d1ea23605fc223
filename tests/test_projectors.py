"""The three Linear-SiLU-Linear projectors: `siglip2_proj` against the reference fixture, the key
table (bit-identical round trip of all three) and the full-size layout.

Bound: `sig_in -> siglip2_proj` is one float32 forward pass, held to 1e-4 x max|ref| (the
reference's own float32-vs-float64 spread is ~1e-5 of max|ref|, precision_summary.json).
"""

import json

import jax
import numpy as np
import pytest

from configs import unipic_1p5b
from convert import torch_to_flax
from convert.projectors import (PROJECTOR_KEYMAP, PROJECTOR_PREFIXES, projector_dims, projector_param_shapes,
                                projector_params_from_torch, projector_params_to_torch)
from unipic_jax.models.projectors import MLPProjector
from unipic_jax.parity import FORWARD, compare

from conftest import FIXTURE_ROOT, fixture


@pytest.fixture(scope="module")
def fx():
    return fixture("unipic")


def test_siglip2_proj_matches_reference(fx):
    dims = projector_dims(fx.config().projectors)["siglip2_proj."]
    params = projector_params_from_torch(fx.weights, *dims, prefix="siglip2_proj.")
    parts = fx.file("parts")
    assert parts["sig_in"].shape[-1] == dims[0]
    got = MLPProjector(dims[1], dims[2]).apply({"params": params}, parts["sig_in"])
    row = compare("unipic", "siglip2_proj", got, parts["siglip2_proj"], FORWARD)
    assert row.ok, f"siglip2_proj: max err {row.max_abs_err:.3e} > bound {row.bound:.3e} {row.note}"


@pytest.mark.parametrize("prefix", PROJECTOR_PREFIXES)
def test_round_trip_is_bit_identical(fx, prefix):
    dims = projector_dims(fx.config().projectors)[prefix]
    params = projector_params_from_torch(fx.weights, *dims, prefix=prefix)
    back = projector_params_to_torch(params, prefix=prefix)
    source = {k: v for k, v in fx.weights.items() if k.startswith(prefix)}
    assert set(back) == set(source) and len(source) == 4
    for key, value in source.items():
        assert back[key].dtype == value.dtype, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_wrong_width_names_the_key(fx):
    mar_dim, llm_dim, _ = projector_dims(fx.config().projectors)["proj_in."]
    with pytest.raises(ValueError, match=r"shape mismatch for 'proj_in\.0\.weight'"):
        projector_params_from_torch(fx.weights, mar_dim + 1, llm_dim, llm_dim, prefix="proj_in.")


@pytest.mark.parametrize("prefix", PROJECTOR_PREFIXES)
def test_full_scale_layout(prefix):
    """The real checkpoint's keys of each projector map onto `MLPProjector` params at the real
    sizes (config section `projectors`); zero-stride views stand in for the tensors."""
    entries = json.loads((FIXTURE_ROOT / "full_scale_keys.json").read_text())["keys"][prefix.rstrip(".")]
    dims = projector_dims(unipic_1p5b.get_config().projectors)[prefix]
    target = projector_param_shapes(*dims)
    fake = {e["key"]: np.broadcast_to(np.float32(0), e["shape"]) for e in entries}
    params = torch_to_flax(fake, PROJECTOR_KEYMAP.prefixed(prefix, ""), target)  # raises on any gap
    assert len(jax.tree.leaves(params)) == len(jax.tree.leaves(target)) == len(entries) == 4
