"""The bf16 rounding rule, in one place: every op rounds where torch's bf16 CPU kernels round.

The reference runs bf16 inference by casting the whole model (`model.to(torch.bfloat16)`, spec
§1.3): every op takes bf16 tensors and returns a bf16 tensor, and torch's CPU kernels compute a
bf16 op in float32 (its "opmath" type) and round the result to bf16 once. So, per op of the
reference: compute in float32, round once; what the reference writes as several ops rounds after
each. The ops (reference -> torch 2.13 CPU -> here):

  nn.Linear / F.linear                 float32 sums, bias added in float32, one rounding -> `Dense`,
                                       `linear` (on a non-contiguous input torch adds the bias after
                                       rounding: the SigLIP MAP head, written out there)
  matmul / bmm                         float32 sums, one rounding -> `einsum`
  nn.Conv2d                            float32 sums, bias added in float32, one rounding -> `Conv`
  F.silu, F.gelu, torch.sigmoid        float32, one rounding -> `silu`, `gelu`, `sigmoid`
  tensor * c, tensor / c (c a Python   float32 with c itself (not c rounded to bf16), one rounding
  float)                               -> `scalar_mul`, `scalar_div`
  +, -, * of tensors (or a Python      float32, one rounding -> `add`, `sub`, `mul`
  number)
  softmax of a bf16 tensor             float32, one rounding -> `softmax`
  LayerNorm, GroupNorm, HF RMSNorm     statistics and affine in float32, one rounding -> `LayerNorm`
                                       (torch's affine order: `(x * rstd - rstd * mean) * w + b`;
                                       GroupNorm and RMSNorm in their modules, via `round_to`)
  F.scaled_dot_product_attention       the CPU flash kernel: scores, exp (its own `fexp_u20`) and
  (timm)                               row sums in float32, the unnormalised weights rounded for the
                                       product with v, one rounding at the end
                                       -> `scaled_dot_product_attention`

Compositions round once per reference op: the Qwen2 MLP's `silu(gate) * up` rounds silu's output,
then the product; LDM's swish `x * torch.sigmoid(x)` is two ops (unlike `F.silu`); the diffusion
head's `x * (1 + scale) + shift` rounds three times; eager attention (Qwen2, SigLIP, the VAE)
rounds the product q k^T, then its scaling, then the softmax's output.

Every rounding goes through `round_to`, and the modules' bf16 arithmetic through these helpers
rather than bare `+ - *` or `.astype`: XLA may drop a float32 -> bf16 -> float32 pair of
conversions and carry the float32 value on (its excess-precision simplification, its YNNPACK
fusions), which skips a rounding torch makes; `lax.reduce_precision` is never dropped.

In float32 every helper is the plain float32 op (no rounding; the same operations as before), so
the float32 path does not depend on the rule. Where torch orders an op's float32 arithmetic
differently from the float32 path, the module branches on `rounds(dtype)`. Bit agreement with
torch, op by op, is measured in tests/test_bf16_ops.py; what remains is float32 last-bit
differences (sums in another order, other exp/erf/rsqrt implementations) that move a bf16
rounding now and then.

Speed: XLA's CPU backend only hands a bf16 product to its fast bf16 kernels (AVX512-BF16) when the
product is asked for in float32 (`preferred_element_type`); asked for in bf16, it converts both
operands to float32 first and runs the float32 kernel, about half as fast. Every product here asks
for float32 and rounds after, which is also the rule above.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax.linen import normalization
from jax import lax

Dtype = Any


def _opmath(dtype) -> jnp.dtype:
    """The dtype an op computes in: float32 for bf16 (torch's opmath type), else the dtype itself."""
    return jnp.promote_types(dtype, jnp.float32)


def rounds(dtype) -> bool:
    """True for dtypes narrower than float32 (bf16): where the rule rounds. A module branches on
    it only where torch orders an op differently from the float32 path, which must not change."""
    return jnp.dtype(dtype).itemsize < 4


def round_to(x, dtype):
    """`x` rounded to `dtype` (to nearest even): the one rounding of a torch op's result. For bf16
    by `lax.reduce_precision` first, which XLA keeps where it may drop a bare conversion (see the
    module docstring)."""
    dtype = jnp.dtype(dtype)
    if rounds(dtype) and jnp.dtype(x.dtype).itemsize > dtype.itemsize:
        info = jnp.finfo(dtype)
        x = lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    return x.astype(dtype)


# ---------------------------------------------------------------------------------------------
# Products


def einsum(spec: str, a, b):
    """Two-operand `jnp.einsum` summed in float32, rounded once to the operands' common dtype
    (torch's bf16 matmul/bmm)."""
    out_dtype = jnp.result_type(a, b)
    return round_to(jnp.einsum(spec, a, b, preferred_element_type=_opmath(out_dtype)), out_dtype)


def linear(x, kernel, bias=None, *, dtype: Dtype | None = None, precision=None, fused: bool = True):
    """`F.linear` with a (in, out) kernel: x @ kernel summed in float32, the bias added in float32,
    rounded once to `dtype` (default: the operands' common dtype).

    `fused=False`: torch's `F.linear` on a non-contiguous input (a permuted view) is a matmul,
    rounded, then an in-place bias add, rounded again (no difference in float32).

    A `qwix.QArray` kernel (weight-only int8/int4, made by `unipic_jax.quant`) is multiplied by
    `qwix.dot_general` (dequantized to the compute dtype, summed in float32); the rest is as above.
    A plain array takes exactly the unquantized path."""
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    if isinstance(kernel, qwix.QArray):
        x, bias = nn.dtypes.promote_dtype(x, bias, dtype=dtype if dtype is not None else
                                          jnp.result_type(x, kernel.scale))
        y = qwix.dot_general(x, kernel, dims, precision=precision, preferred_element_type=_opmath(x.dtype))
    else:
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=dtype)
        y = lax.dot_general(x, kernel, dims, precision=precision, preferred_element_type=_opmath(x.dtype))
    acc = _opmath(x.dtype)
    if bias is None:
        return round_to(y, x.dtype)
    bias = jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    if not fused:
        return add(round_to(y, x.dtype), bias)
    return round_to(y + bias.astype(acc), x.dtype)


class Dense(nn.Dense):
    """`nn.Dense` (same attributes but `dot_general`, which `linear` replaces; params `kernel`
    (in, out) and `bias`): torch's bf16 `nn.Linear` adds the bias before its one rounding (after
    it with `fused=False`, for what is a non-contiguous view in the reference)."""

    @nn.compact
    def __call__(self, inputs, *, fused: bool = True):
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        return linear(inputs, kernel, bias, dtype=self.dtype, precision=self.precision, fused=fused)


class Embed(nn.Embed):
    """`nn.Embed` (same attributes and param `embedding` (vocab, dim)) whose table may also be a
    `qwix.QArray` (weight-only int8/int4 per row, made by `unipic_jax.quant`): a lookup gathers
    the rows' int values and scales and dequantizes them to `dtype`; `attend` (the tied head's
    logits) multiplies by `qwix.dot_general`, summed in float32 and rounded once as `linear`. A
    plain table is `nn.Embed`'s own path, unchanged."""

    def __call__(self, inputs):
        if not isinstance(self.embedding, qwix.QArray):
            return super().__call__(inputs)
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        return qwix.dequantize(self.embedding[inputs]).astype(self.dtype)

    def attend(self, query):
        if not isinstance(self.embedding, qwix.QArray):
            return super().attend(query)
        query = query.astype(self.dtype)
        dims = (((query.ndim - 1,), (1,)), ((), ()))
        return round_to(qwix.dot_general(query, self.embedding, dims, preferred_element_type=_opmath(query.dtype)),
                        query.dtype)


def _conv_float32(lhs, rhs, *args, **kwargs):
    """`lax.conv_general_dilated` summed and returned in float32 (at least)."""
    kwargs["preferred_element_type"] = _opmath(jnp.result_type(lhs, rhs))
    return lax.conv_general_dilated(lhs, rhs, *args, **kwargs)


class Conv(nn.Conv):
    """`nn.Conv` (same attributes and params) that sums in float32, adds the bias in float32 and
    rounds once to `dtype` (default: the input's), as torch's bf16 `nn.Conv2d` (oneDNN) does."""

    conv_general_dilated: Callable = _conv_float32

    def __call__(self, inputs):
        dtype = self.dtype if self.dtype is not None else inputs.dtype
        return round_to(super().__call__(inputs), dtype)


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` (same attributes and params): float32 statistics, one rounding to `dtype`.

    When `dtype` rounds (bf16), the affine part is torch's CPU kernel's: `rstd = 1 / sqrt(var +
    eps)`, then `(x * rstd + (-rstd * mean)) * scale + bias` in float32 (pytorch/pytorch
    aten/src/ATen/native/cpu/layer_norm_kernel.cpp, LayerNormKernelImplInternal: `scale =
    rstd_val`, `bias = -rstd_val * mean_val`). Flax's `(x - mean) * (rsqrt(var + eps) * scale) +
    bias` differs from it in the last float32 bits, which moved a bf16 rounding often enough to
    break the bf16 sampling chain's bit agreement (tests/test_bf16.py). float32 keeps flax's form.
    """

    @nn.compact
    def __call__(self, x, *, mask=None):
        dtype = self.dtype if self.dtype is not None else x.dtype
        acc = _opmath(dtype)
        mean, var = normalization._compute_stats(
            x, self.reduction_axes, acc, self.axis_name, self.axis_index_groups,
            use_fast_variance=self.use_fast_variance, mask=mask, force_float32_reductions=self.force_float32_reductions)
        if not rounds(dtype):
            y = normalization._normalize(
                self, x, mean, var, self.reduction_axes, self.feature_axes, acc, self.param_dtype, self.epsilon,
                self.use_bias, self.use_scale, self.bias_init, self.scale_init, self.force_float32_reductions)
            return round_to(y, dtype)
        reduced = normalization._canonicalize_axes(x.ndim, self.reduction_axes)
        mean, var = jnp.expand_dims(mean, reduced), jnp.expand_dims(var, reduced)
        # torch divides by a correctly rounded sqrt; XLA would rewrite 1 / sqrt into its rsqrt,
        # which is not correctly rounded on the CPU (differs in the last bit for ~half the rows).
        rstd = 1.0 / lax.optimization_barrier(jnp.sqrt(var + self.epsilon))
        y = x.astype(acc) * rstd + (-rstd * mean)
        features = normalization._canonicalize_axes(x.ndim, self.feature_axes)
        param_shape = tuple(x.shape[a] for a in features)
        broadcast = tuple(x.shape[a] if a in features else 1 for a in range(x.ndim))
        if self.use_scale:
            y = y * self.param("scale", self.scale_init, param_shape, self.param_dtype).reshape(broadcast).astype(acc)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, param_shape, self.param_dtype).reshape(broadcast).astype(acc)
        return round_to(y, dtype)


# ---------------------------------------------------------------------------------------------
# Elementwise


def silu(x):
    """`F.silu`: x * sigmoid(x) in float32, one rounding."""
    return round_to(jax.nn.silu(x.astype(_opmath(x.dtype))), x.dtype)


def sigmoid(x):
    """`torch.sigmoid`: float32, one rounding."""
    return round_to(jax.nn.sigmoid(x.astype(_opmath(x.dtype))), x.dtype)


def gelu(x, approximate: bool):
    """`F.gelu` (exact erf form, or `approximate='tanh'`): float32, one rounding.

    bf16 exact form: torch's formula `x/2 (1 + erf(x/sqrt 2))` (jax.nn.gelu's erfc form is more
    accurate). Below x = -3 the sum cancels and the last bits of each side's float32 erf or tanh
    decide the tiny result, so there the two agree on about two outputs in three (100 % above).
    """
    v = x.astype(_opmath(x.dtype))
    if approximate or not rounds(x.dtype):
        return round_to(jax.nn.gelu(v, approximate=approximate), x.dtype)
    return round_to(v * 0.5 * (1 + lax.erf(v * np.float32(math.sqrt(0.5)))), x.dtype)


def _elementwise(op, a, b):
    """`op(a, b)` on tensors or a tensor and a Python number: float32, one rounding."""
    dtype = jnp.result_type(a, b)
    return round_to(op(jnp.asarray(a).astype(_opmath(dtype)), jnp.asarray(b).astype(_opmath(dtype))), dtype)


def add(a, b):
    """`a + b`, one rounding. The bf16 ops of the models go through `add`, `sub`, `mul` rather
    than bare `+ - *`, whose rounding XLA may drop (`round_to`)."""
    return _elementwise(jnp.add, a, b)


def sub(a, b):
    """`a - b`, one rounding (see `add`)."""
    return _elementwise(jnp.subtract, a, b)


def mul(a, b):
    """`a * b`, one rounding (see `add`)."""
    return _elementwise(jnp.multiply, a, b)


def scalar_mul(x, c):
    """`x * c` for a Python (or float32) scalar c: torch multiplies by c itself in float32 and
    rounds once; a bare bf16 `x * c` in JAX would round c to bf16 first."""
    return round_to(x.astype(_opmath(x.dtype)) * c, x.dtype)


def scalar_div(x, c):
    """`x / c` for a Python (or float32) scalar c, as `scalar_mul`."""
    return round_to(x.astype(_opmath(x.dtype)) / c, x.dtype)


def softmax(x, axis: int = -1):
    """`F.softmax` of a bf16 tensor: float32, one rounding."""
    return round_to(jax.nn.softmax(x.astype(_opmath(x.dtype)), axis=axis), x.dtype)


# ---------------------------------------------------------------------------------------------
# Fused attention


# torch's CPU flash kernel (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp, torch 2.13) takes
# exp over whole vectors of keys with `Vectorized<float>::fexp_u20` and over the keys left over with
# std::exp. The reference ran torch's AVX512 kernels: vectors of 16 floats.
_LANES = 16
_LOG2E, _LN_FLT_MIN, _LN_FLT_MAX = np.array([0x3FB8AA3B, 0xC2AEAC50, 0x42B17218], np.uint32).view(np.float32)
_FEXP_POLY = tuple(np.float32(c) for c in (-0.079204240219773236, -0.22433836478672356, 0.30354260500649682,
                                           0.00010703434948458272))


@jax.custom_jvp
def _fexp_u20(x):
    """torch's `fexp_u20` (Malossi et al.): 2^(x log2 e) built in the float's bits, 2^frac from a
    degree-3 polynomial; relative error about 1e-5. Its fused multiply-adds are written a * b + c,
    which XLA:CPU contracts into the same FMAs (tests/test_bf16_ops.py checks the result). Its
    derivative is taken as exp's (the value itself), for bf16 training."""
    t = x * _LOG2E
    frac = t - jnp.floor(t)
    poly = _FEXP_POLY[0]
    for c in _FEXP_POLY[1:]:
        poly = frac * poly + c
    bits = (np.float32(2 ** 23) * (t - poly) + np.float32(2 ** 23 * 127)).astype(jnp.int32)
    bits = jnp.where(x < _LN_FLT_MIN, 0, jnp.where(x > _LN_FLT_MAX, 0x7F800000, bits))
    return lax.bitcast_convert_type(bits, jnp.float32)


@_fexp_u20.defjvp
def _fexp_u20_jvp(primals, tangents):
    y = _fexp_u20(primals[0])
    return y, y * tangents[0]


def _flash_exp(s, num_keys):
    """exp(s) for scores minus their running max (-inf for hidden keys), as torch's flash kernel
    takes it in a key block holding `num_keys` (b,) keys: `_fexp_u20` on the first multiple of 16
    keys, exp on the rest."""
    whole = (jnp.clip(num_keys, 0, s.shape[-1]) // _LANES * _LANES)[:, None, None, None]
    return jnp.where(jnp.arange(s.shape[-1]) < whole, _fexp_u20(s), jnp.exp(s))


_KV_BLOCK = 512  # the flash kernel's key block (kv_split_size)


def scaled_dot_product_attention(q_bnqh, k_bnkh, v_bnkh, key_mask_bk=None,
                                 dropout: Callable = lambda w: w):
    """`F.scaled_dot_product_attention(q, k, v)` (scale head_dim^-0.5, no mask), (b, n, q, h).

    `key_mask_bk` (b, k) bool hides keys: padding slots after the valid ones (the reference has
    none, its rows are as long as their valid keys). `dropout` acts on the attention weights.

    bf16 follows torch's CPU flash kernel, block by block of 512 keys: s = q k^T summed and scaled
    in float32; the running row max m; e = exp(s - m) taken as the kernel takes it (`_flash_exp`);
    the row sum of e in float32; e rounded to bf16 for the product with v (summed in float32);
    earlier blocks' sum and product rescaled by exp(m_old - m); at the end times 1/sum and one
    rounding. Nothing is normalised or rounded before the products.

    float32: softmax(q·scale k^T) v, the weights normalised before the product.
    """
    dtype = jnp.result_type(q_bnqh, k_bnkh, v_bnkh)
    scale = q_bnqh.shape[-1] ** -0.5
    if not rounds(dtype):
        logits = einsum("bnqh,bnkh->bnqk", q_bnqh * scale, k_bnkh).astype(jnp.float32)
        if key_mask_bk is not None:
            logits = jnp.where(key_mask_bk[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        weights = dropout(jax.nn.softmax(logits, axis=-1).astype(dtype))
        return einsum("bnqk,bnkh->bnqh", weights, v_bnkh)
    acc = _opmath(dtype)
    b, k = k_bnkh.shape[0], k_bnkh.shape[2]
    logits = jnp.einsum("bnqh,bnkh->bnqk", q_bnqh, k_bnkh, preferred_element_type=acc) * np.float32(scale)
    num_keys = jnp.full((b,), k, jnp.int32)
    if key_mask_bk is not None:
        logits = jnp.where(key_mask_bk[:, None, None, :], logits, -jnp.inf)
        num_keys = jnp.sum(key_mask_bk, axis=-1, dtype=jnp.int32)
    row_max = jnp.full(logits.shape[:-1] + (1,), -jnp.inf, acc)
    total = out = None
    for start in range(0, k, _KV_BLOCK):
        s = logits[..., start:start + _KV_BLOCK]
        new_max = jnp.maximum(row_max, jnp.max(s, axis=-1, keepdims=True))
        e = _flash_exp(s - new_max, num_keys - start)
        pv = jnp.einsum("bnqk,bnkh->bnqh", dropout(round_to(e, dtype)), v_bnkh[:, :, start:start + _KV_BLOCK],
                        preferred_element_type=acc)
        if out is None:
            total, out = jnp.sum(e, axis=-1, keepdims=True), pv
        else:
            rescale = jnp.exp(row_max - new_max)
            total, out = jnp.sum(e, axis=-1, keepdims=True) + rescale * total, out * rescale + pv
        row_max = new_max
    return round_to(out * (1 / total), dtype)
