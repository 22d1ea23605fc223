"""Matrix products that accumulate in float32 and return the operands' dtype.

Under the bf16 policy a bf16 x bf16 product must sum in float32 and round once to bf16, as the
reference's bf16 `nn.Linear` and `matmul` do. XLA's CPU backend only hands a bf16 product to its
fast bf16 kernels (AVX512-BF16) when the product is asked for in float32
(`preferred_element_type`); asked for in bf16, it converts both operands to float32 first and
runs the float32 kernel, about half as fast. Asking for float32 and rounding after gives the same
numbers either way, and on TPU/GPU it is what XLA does anyway. In float32 these are plain products.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp
from jax import lax


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` summed in float32 (at least), returned in the operands' common dtype."""
    out_dtype = jnp.result_type(lhs, rhs)
    accumulate = jnp.promote_types(out_dtype, preferred_element_type or jnp.float32)
    out = lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=accumulate)
    return out.astype(out_dtype)


def einsum(spec: str, a, b):
    """Two-operand `jnp.einsum` summed in float32, returned in the operands' common dtype."""
    out_dtype = jnp.result_type(a, b)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.promote_types(out_dtype, jnp.float32)).astype(out_dtype)


# `nn.Dense` with the float32-accumulating product (same params, same names).
Dense = functools.partial(nn.Dense, dot_general=dot_general)
