"""The one place that picks an attention kernel by platform: the MAR encoder and decoder and the
SigLIP tower (`attend`), and the LLM's grouped-query attention (`attend_gqa`).

  cpu   "reference": `layers.scaled_dot_product_attention`, the reference's arithmetic (torch's
        CPU flash kernel in bf16, softmax then product in float32): the parity path, unchanged.
  gpu   "fused": `jax.nn.dot_product_attention`. On CUDA, cuDNN's flash-attention kernel
        (`implementation="cudnn"`, the score matrix never held whole) where jax 0.10.2's cuDNN
        path takes the inputs: bf16 or fp16, a head dim that is a multiple of 8 and at most 128,
        and with a mask even query and key lengths (`_cudnn_applies`); XLA's attention otherwise
        (jax's default, `implementation=None`, always takes XLA's path and holds the scores).
  tpu   "pallas": the Pallas TPU flash-attention kernel
        (`jax.experimental.pallas.ops.tpu.flash_attention`): blocks of 128 queries and keys, the
        score matrix never held whole (at 1024 px the encoder attends over 4,160 tokens: 16 heads
        x 4160^2 float32 scores are 1.1 GB per row otherwise). Lengths are padded to a multiple
        of 128 with keys hidden by segment ids.

The fused kernels compute the same softmax(q k^T / sqrt(h)) v in another order and rounding (bf16
included), so they give other last bits than the reference path; on CPU, where parity is checked,
the reference path runs unless `use("fused")` asks otherwise. Attention dropout (training) always
takes the reference path: neither kernel applies dropout to the attention weights.

The LLM (`attend_gqa`, Qwen2's 12 query heads over 2 KV heads) takes the same choice by platform:
"reference" is Qwen2's own arithmetic (transformers' eager attention, the parity path), "fused"
hands `jax.nn.dot_product_attention` the K/V heads as they are (it reads GQA itself), and "pallas"
is the Pallas TPU splash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`),
whose mask is static: the LLM's mask is given as structure (`CausalKeyMask`: cache validity, causal
among the new tokens, new-token validity), never as a dense (B, T, S) array, so the kernel gets a
causal mask offset by the cache length plus segment ids that hide invalid slots. Splash rather
than flash attention: flash's causal mask has no offset (`col_ids <= row_ids`, jax 0.10.2
`pallas/ops/tpu/flash_attention.py` l. 432) while the new tokens follow the cache, and it wants as
many K/V heads as query heads (l. 160: K/V repeated six times); splash takes both (`CausalMask`'s
`offset`, `splash_attention_mask.py` l. 321; q heads a multiple of K/V heads). At 1024 px the UniPic
sampler attends 4,160 image tokens to [64 cache slots ; themselves]: 2 rows x 12 heads x 4160 x
4224 float32 scores are 1.7 GB otherwise. Fewer than 128 new tokens (text decoding) take the
fused path on TPU: their scores are small and a 128-query block would be mostly padding.

The platform is the default backend's, or the one set by `target(platform)` while a program is
lowered for other devices (`unipic-jax compile` for a TPU or GPU target on a CPU host).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp

from unipic_jax.models.layers import einsum, round_to, scalar_mul, scaled_dot_product_attention

KERNELS = ("reference", "fused", "pallas")
BY_PLATFORM = {"cpu": "reference", "gpu": "fused", "cuda": "fused", "rocm": "fused", "tpu": "pallas"}
PALLAS_BLOCK = 128  # the Pallas kernel's query and key block (its default BlockSizes)

_platform: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("attention_platform", default=None)
_kernel: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("attention_kernel", default=None)


@contextlib.contextmanager
def target(platform: str):
    """Trace for `platform` ("cpu", "cuda", "gpu", "tpu") whatever the default backend is; cuDNN's
    kernel needs "cuda" ("gpu" is also ROCm's name)."""
    token = _platform.set(platform)
    try:
        yield
    finally:
        _platform.reset(token)


@contextlib.contextmanager
def use(kernel: str):
    """Trace with `kernel` (one of KERNELS) instead of the platform's choice."""
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel must be one of {KERNELS}, got {kernel!r}")
    token = _kernel.set(kernel)
    try:
        yield
    finally:
        _kernel.reset(token)


def kernel() -> str:
    """The kernel programs traced now will use."""
    chosen = _kernel.get()
    if chosen is not None:
        return chosen
    return BY_PLATFORM.get(_platform_name(), "reference")


def _platform_name() -> str:
    return _platform.get() or jax.default_backend()


def attend(q_bnqh, k_bnkh, v_bnkh, key_mask_bk=None, dropout: Optional[Callable] = None,
           reference: Optional[Callable[[], jax.Array]] = None):
    """softmax(q k^T / sqrt(h)) v for (b, n, q, h) queries and (b, n, k, h) keys and values.

    `key_mask_bk` (b, k) bool hides keys (None: all visible). `dropout` acts on the attention
    weights (None: none); it forces the reference path. `reference`: the caller's own arithmetic
    for the reference path, called with no arguments, returning (b, n, q, h) (SigLIP: transformers'
    eager attention); by default `layers.scaled_dot_product_attention` (MAR: torch's SDPA).
    """
    if reference is not None and dropout is not None:
        raise ValueError("attend: `reference` computes the whole attention, it cannot take `dropout`")
    chosen = "reference" if dropout is not None else kernel()
    if chosen == "reference" and reference is not None:
        return reference()
    if chosen == "reference":
        return scaled_dot_product_attention(q_bnqh, k_bnkh, v_bnkh, key_mask_bk,
                                            dropout if dropout is not None else (lambda w: w))
    if chosen == "fused":
        mask = None if key_mask_bk is None else key_mask_bk[:, None, None, :]
        out_bqnh = _fused(*(jnp.swapaxes(x, 1, 2) for x in (q_bnqh, k_bnkh, v_bnkh)), mask)
        return jnp.swapaxes(out_bqnh, 1, 2)
    return _pallas(q_bnqh, k_bnkh, v_bnkh, key_mask_bk)


def _fused(q_btnh, k_bsnh, v_bsnh, mask_b1ts=None, scale=None):
    """`jax.nn.dot_product_attention` on (B, T, N, H) queries and (B, S, K, H) keys and values
    with a bool mask broadcastable to (B, 1, T, S): cuDNN's kernel where `_cudnn_applies`, else XLA's."""
    if not _cudnn_applies(q_btnh, k_bsnh, mask_b1ts):
        return jax.nn.dot_product_attention(q_btnh, k_bsnh, v_bsnh, mask=mask_b1ts, scale=scale)
    if mask_b1ts is not None:
        # jax's cuDNN path turns the mask into an additive bias that must span (T, S) whole
        # (jax 0.10.2 `_src/cudnn/fused_attention_stablehlo.py`, `check_layout`).
        b, t, _, _ = q_btnh.shape
        mask_b1ts = jnp.broadcast_to(mask_b1ts, (b, 1, t, k_bsnh.shape[1]))
    return jax.nn.dot_product_attention(q_btnh, k_bsnh, v_bsnh, mask=mask_b1ts, scale=scale,
                                        implementation="cudnn")


def _cudnn_applies(q_btnh, k_bsnh, mask_b1ts) -> bool:
    """Whether jax 0.10.2's cuDNN attention takes these inputs (`_src/cudnn/fused_attention_stablehlo.py`):
    a CUDA target, bf16 or fp16 (`check_layout`), a head dim that is a multiple of 8 and at most 128
    (`check_is_flash_attention`: 256 on Hopper, but it reads the capability of the default backend,
    so 128 when compiling on a CPU host), and with a mask (a bias to cuDNN) even lengths, which its
    backward pass needs."""
    if not _on_cuda() or q_btnh.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    head_dim, t, s = q_btnh.shape[-1], q_btnh.shape[1], k_bsnh.shape[1]
    if head_dim % 8 or head_dim > 128:
        return False
    return mask_b1ts is None or (t % 2 == 0 and s % 2 == 0)


def _on_cuda() -> bool:
    """Whether programs are traced for CUDA: `target("cuda")`, or a default "gpu" backend (ROCm's
    name too) whose platform version names CUDA, the test jax's cuDNN path makes itself."""
    name = _platform_name()
    if name != "gpu" or _platform.get() is not None:
        return name == "cuda"
    return "cuda" in jax.devices()[0].client.platform_version.lower()


def _pad_to_block(x, axis: int):
    """`x` zero-padded along `axis` to a multiple of PALLAS_BLOCK."""
    extra = -x.shape[axis] % PALLAS_BLOCK
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _pallas(q_bnqh, k_bnkh, v_bnkh, key_mask_bk):
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

    b, _, q_len, head_dim = q_bnqh.shape
    k_len = k_bnkh.shape[2]
    visible_bk = jnp.ones((b, k_len), bool) if key_mask_bk is None else key_mask_bk.astype(bool)
    # Padded keys get segment 0, every query segment 1: queries see the visible keys only.
    segments = tpu_flash.SegmentIds(q=jnp.ones((b, q_len + -q_len % PALLAS_BLOCK), jnp.int32),
                                    kv=_pad_to_block(visible_bk.astype(jnp.int32), 1))
    q, k, v = (_pad_to_block(x, 2) for x in (q_bnqh, k_bnkh, v_bnkh))
    with _mosaic_precision(q.dtype):
        out = tpu_flash.flash_attention(q, k, v, segment_ids=segments, sm_scale=head_dim ** -0.5)
    return out[:, :, :q_len]


def _mosaic_precision(dtype):
    """The Pallas kernels' products take the default matmul precision: under "highest" (the
    tests' float32 setting) Mosaic refuses bf16 operands ("Bad lhs type"), so bf16 runs at
    "default" (bf16 products, float32 sums: what the kernels do anyway)."""
    if dtype == jnp.bfloat16:
        return jax.default_matmul_precision("default")
    return contextlib.nullcontext()


@flax.struct.dataclass
class CausalKeyMask:
    """The keys a causal LM's new tokens see, as structure rather than a dense (B, T, S) mask.

    Keys are [P past slots ; T new tokens]: new token i sees past slot s where `past_valid_bs[b, s]`
    and new token j <= i where `new_valid_bt[b, j]`. None: no past (P = 0), or every new token
    valid. This is all the LLM ever asks (prompt, cache peek, decode), and it is what a TPU kernel
    can take without a dense mask: a static causal mask offset by P, and segment ids.
    """

    past_valid_bs: Optional[jax.Array] = None
    new_valid_bt: Optional[jax.Array] = None

    def dense(self, batch: int, t: int) -> jax.Array:
        """The (B, T, P + T) bool mask: [past validity ; causal & new validity]."""
        new_bts = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (batch, t, t))
        if self.new_valid_bt is not None:
            new_bts = new_bts & self.new_valid_bt.astype(bool)[:, None, :]
        if self.past_valid_bs is None:
            return new_bts
        past_bs = self.past_valid_bs.astype(bool)
        past_bts = jnp.broadcast_to(past_bs[:, None, :], (batch, t, past_bs.shape[1]))
        return jnp.concatenate([past_bts, new_bts], axis=-1)


def attend_gqa(q_btnh, k_bskh, v_bskh, mask, dtype):
    """Grouped-query attention: query head n reads K/V head n // (N / K); returns (B, T, N, H).

    `mask`: a `CausalKeyMask` (keys = [past ; new], S = P + T), or a dense (B, T, S) bool array
    (tests and callers with masks of other shapes: the reference and fused paths only; on TPU it
    takes the fused path). `dtype` is the compute dtype the softmax's output rounds to on the
    reference path.
    """
    chosen = kernel()
    structured = isinstance(mask, CausalKeyMask)
    if chosen == "pallas" and (not structured or q_btnh.shape[1] < PALLAS_BLOCK):
        chosen = "fused"
    if chosen == "pallas":
        return _splash_gqa(q_btnh, k_bskh, v_bskh, mask)
    mask_bts = mask.dense(q_btnh.shape[0], q_btnh.shape[1]) if structured else mask
    if chosen == "fused":
        return _fused(q_btnh, k_bskh, v_bskh, jnp.asarray(mask_bts, bool)[:, None], scale=q_btnh.shape[-1] ** -0.5)
    return _gqa_reference(q_btnh, k_bskh, v_bskh, mask_bts, dtype)


def _gqa_reference(q_btnh, k_bskh, v_bskh, mask_bts, dtype):
    """transformers' eager attention: the product rounds, the scaled scores round again, the
    softmax in float32 rounds to `dtype`. K/V are never repeated."""
    b, t, n, h = q_btnh.shape
    kv_heads = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = scalar_mul(einsum("btkgd,bskd->bkgts", q_btkgh, k_bskh), h ** -0.5)
    scores = jnp.where(mask_bts[:, None, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = round_to(jax.nn.softmax(scores, axis=-1), dtype)
    return einsum("bkgts,bskd->btkgd", probs, v_bskh).reshape(b, t, n, h)


def _splash_gqa(q_btnh, k_bskh, v_bskh, mask: CausalKeyMask):
    """The splash kernel, one batch row at a time (vmap): its mask is static (a causal mask offset
    by the P past slots, on lengths padded to 128), and segment ids give every query segment 1 and
    every key its validity (0 = hidden: invalid cache slots, padded new tokens, the padding).
    Off TPU (`use("pallas")` on CPU, in tests) the kernel runs in Pallas' interpreter."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, t, n, h = q_btnh.shape
    s = k_bskh.shape[1]
    past = s - t
    past_valid_bs = jnp.ones((b, past), bool) if mask.past_valid_bs is None else mask.past_valid_bs.astype(bool)
    new_valid_bt = jnp.ones((b, t), bool) if mask.new_valid_bt is None else mask.new_valid_bt.astype(bool)
    key_segments_bs = _pad_to_block(jnp.concatenate([past_valid_bs, new_valid_bt], axis=1).astype(jnp.int32), 1)
    t_pad, s_pad = t + -t % PALLAS_BLOCK, key_segments_bs.shape[1]
    segments = splash.SegmentIds(q=jnp.ones((b, t_pad), jnp.int32), kv=key_segments_bs)
    causal = splash.MultiHeadMask([splash.CausalMask((t_pad, s_pad), offset=past) for _ in range(n)])
    kernel_ = splash.make_splash_mha_single_device(causal, interpret=_platform_name() != "tpu")
    # The kernel does not scale: q is scaled first, in its dtype.
    q_bnth = _pad_to_block(jnp.swapaxes(q_btnh * jnp.asarray(h ** -0.5, q_btnh.dtype), 1, 2), 2)
    k_bksh, v_bksh = (_pad_to_block(jnp.swapaxes(x, 1, 2), 2) for x in (k_bskh, v_bskh))
    with _mosaic_precision(q_bnth.dtype):
        out_bnth = jax.vmap(kernel_)(q_bnth, k_bksh, v_bksh, segments)
    return jnp.swapaxes(out_bnth[:, :, :t], 1, 2)
