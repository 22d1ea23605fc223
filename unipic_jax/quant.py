"""Weight-only quantization (int8, int4) over module paths, with qwix, in one table.

    RULES[setting] -> qwix.QuantizationRule rows; the first row whose `module_path` regex
    fullmatches a module's path (its param path without "/kernel" or "/embedding") decides it.

Two kinds of 2-D params are ever quantized (absmax, symmetric):
  * `kernel`s of `layers.Dense`/`layers.linear`, (in, out): a scale per output channel, int4 also
    per tile of `tile_size` input rows. The LLM's and MAR's transformer blocks and SigLIP2's
    encoder.
  * the LLM's token table `embedding` (`layers.Embed`), (vocab, dim): a scale per row (token),
    int4 also per tile of `tile_size` columns. In Qwen2.5-1.5B it is tied to the output head and
    holds 151936 x 1536 values (0.43 GiB in bf16, 15 % of the model): left in bf16 it keeps int8
    above 55 % and int4 above 35 % of the bf16 bytes. A row's scale serves both uses: a lookup
    dequantizes whole rows, and the logits contract over the tiled columns.
Norms, biases, MAR's and SigLIP2's learned tables, the projectors, the diffusion head and the VAE
stay in the compute dtype (the issue's default; the head's error feeds every denoising step, so it
is left alone). Quantization is post-training (PTQ), once at load: `quantize_params` replaces each
chosen param by a `qwix.QArray` (int values and scales), which `layers.linear` and `layers.Embed`
use through qwix (`qwix.dot_general`, `qwix.dequantize`). Unquantized params take exactly the
faithful path: `quantize=None` changes nothing.

Why not `qwix.quantize_model` (qwix's interception of `dot_general` inside a wrapped linen
method): our samplers apply many methods by function (`model.apply(..., method=UniPic.encode)`,
and the LLM and the diffusion head as stand-alone modules), which bypass the methods qwix
wraps on its subclass; and qwix 0.1.8's `PtqProvider.dot_general` drops `preferred_element_type`
and `precision` when it quantizes (qwix/_src/providers/ptq.py, the `return
self._dot_general_fn(lhs, rhs, dimension_numbers, out_sharding=...)` of `dot_general`), so a bf16
product would no longer be summed in float32 (layers.py's rule). The rule rows are
`qwix.QuantizationRule`s all the same, and the numerics (`qwix.quantize`, `qwix.dot_general`) are
qwix's.
"""

from __future__ import annotations

import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import traverse_util

QUANTIZE_CHOICES = ("int8", "int4")

# The LLM's token table (and so its tied head), transformer blocks of the LLM and MAR (attention
# and MLP), MAR's token/decoder embeddings (Dense layers), and SigLIP2's encoder layers (off the
# released path: only `caption --path siglip` uses it). Not: projectors, the diffusion head, the
# VAE, SigLIP2's patch embedding, position table and MAP head, MAR's learned tables.
_QUANTIZED_MODULES = r"llm/embed_tokens|llm/layers_\d+/.*|mar/.*|siglip2/layers_\d+/.*"

# int4 tiles: 64 values along the contracted axis share a scale (absmax over 64 values instead of
# a whole column; measured on Gaussian weights: max |error| of a product 0.13 -> 0.09 of max |out|,
# see README).
INT4_TILE = 64

# Per param name: (the axis with a scale per index, the contracted axis the int4 tiles run along).
_AXES = {"kernel": (1, 0), "embedding": (0, 1)}

RULES: dict[str, tuple[qwix.QuantizationRule, ...]] = {
    "int8": (qwix.QuantizationRule(module_path=_QUANTIZED_MODULES, weight_qtype="int8"),),
    "int4": (qwix.QuantizationRule(module_path=_QUANTIZED_MODULES, weight_qtype="int4", tile_size=INT4_TILE),),
}


def check_quantize(quantize: Optional[str]) -> Optional[str]:
    """`None` or one of QUANTIZE_CHOICES, else a one-line ValueError."""
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)} (or none), got {quantize!r}")
    return quantize


def rule_for(path: str, quantize: str) -> Optional[qwix.QuantizationRule]:
    """The rule deciding the param at `path` ("llm/layers_0/mlp/up_proj/kernel"), or None: only
    2-D Dense kernels and Embed tables are candidates, matched by their module path."""
    module, _, name = path.rpartition("/")
    if name not in _AXES:
        return None
    for rule in RULES[check_quantize(quantize)]:
        if re.fullmatch(rule.module_path, module):
            return rule
    return None


def _how(name: str, shape, rule: qwix.QuantizationRule) -> tuple[int, Optional[int], Optional[int]]:
    """(scale axis, tile axis, tile) for the param `name` ("kernel" (in, out): a scale per output
    channel; "embedding" (vocab, dim): a scale per row), with a rule's tile size along the other
    axis (None when the tile does not divide it into several)."""
    channel, contracted = _AXES[name]
    tile = int(rule.tile_size) if rule.tile_size else None
    if tile is None or shape[contracted] % tile or shape[contracted] <= tile:
        return channel, None, None
    return channel, contracted, tile


def quantized_paths(params, quantize: str) -> list[str]:
    """The param paths `quantize_params` replaces (sorted)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return sorted(p for p, v in flat.items() if np.ndim(v) == 2 and rule_for(p, quantize) is not None)


def quantize_params(params, quantize: Optional[str]):
    """Params with every kernel chosen by RULES[quantize] replaced by a `qwix.QArray` (its scales
    in the kernel's dtype); the other leaves are the same objects. `quantize=None` returns `params`
    itself. Works on arrays (one jitted quantization per kernel shape) or on ShapeDtypeStructs
    (abstractly, for `plan`)."""
    if check_quantize(quantize) is None:
        return params
    flat = traverse_util.flatten_dict(params, sep="/")
    out = {}
    for path, leaf in flat.items():
        rule = rule_for(path, quantize) if np.ndim(leaf) == 2 else None
        if rule is None:
            out[path] = leaf
            continue
        quantizer = _quantizer(rule.weight_qtype, *_how(path.rpartition("/")[2], leaf.shape, rule))
        out[path] = jax.eval_shape(quantizer, leaf) if isinstance(leaf, jax.ShapeDtypeStruct) else quantizer(leaf)
    return traverse_util.unflatten_dict(out, sep="/")


_JITTED: dict = {}


def _quantizer(qtype: str, channel: int, contracted: Optional[int], tile: Optional[int]):
    """`qwix.quantize` of a 2-D param, jitted once per setting (then once per shape)."""
    key = (qtype, channel, contracted, tile)
    if key not in _JITTED:
        tiled = None if tile is None else {contracted: tile}
        _JITTED[key] = jax.jit(lambda w: qwix.quantize(w, qtype, channelwise_axes=(channel,), tiled_axes=tiled))
    return _JITTED[key]


def leaf_bytes(leaf) -> int:
    """Bytes of one array or ShapeDtypeStruct in memory (int4 counted as half a byte, as packed)."""
    dtype = jnp.dtype(leaf.dtype)
    bits = 4 if dtype.name in ("int4", "uint4") else dtype.itemsize * 8
    return int(np.prod(leaf.shape, dtype=np.int64)) * bits // 8


def tree_bytes(tree) -> int:
    """Bytes of every leaf of a param tree (QArrays: values and scales)."""
    return sum(leaf_bytes(x) for x in jax.tree_util.tree_leaves(tree))


def is_quantized(params) -> bool:
    """True when some leaf of `params` is a `qwix.QArray`."""
    return any(isinstance(x, qwix.QArray)
               for x in jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, qwix.QArray)))


def relative_error(ref, out) -> float:
    """max |out - ref| / max |ref| (float32): the deviation measure of tests and the README."""
    ref, out = np.asarray(ref, np.float32), np.asarray(out, np.float32)
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))


# ---------------------------------------------------------------------------------------------
# LoRA: which Dense kernels get adapters (qwix.LoraRule rows; rank and alpha from the stage config)

# The LLM's attention and MLP and MAR's encoder/decoder blocks (attention qkv/proj, MLP fc1/fc2).
LORA_MODULES = r"llm/layers_\d+/(self_attn|mlp)/.*|mar/(encoder|decoder)_blocks_\d+/(attn|mlp)/.*"


def lora_rules(rank: int, alpha: float, modules: str = LORA_MODULES) -> tuple[qwix.LoraRule, ...]:
    """The adapter table: one `qwix.LoraRule` over `modules` (a module-path regex, fullmatched)."""
    if int(rank) < 1 or not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"lora: rank must be >= 1 and alpha > 0, got rank={rank!r} alpha={alpha!r}")
    try:
        re.compile(modules)
    except re.error as e:
        raise ValueError(f"lora: modules {modules!r} is not a regular expression ({e})") from None
    return (qwix.LoraRule(module_path=modules, rank=int(rank), alpha=float(alpha)),)


def lora_shapes(abstract, rules: tuple[qwix.LoraRule, ...]) -> dict[str, tuple[jax.ShapeDtypeStruct, ...]]:
    """Adapter shapes per adapted kernel path: (a (in, rank), b (rank, out)), float32, for every
    2-D `kernel` whose module path a rule fullmatches (the first rule that does decides)."""
    out = {}
    for path, leaf in traverse_util.flatten_dict(abstract, sep="/").items():
        module, _, name = path.rpartition("/")
        if name != "kernel" or len(leaf.shape) != 2:
            continue
        rule = next((r for r in rules if re.fullmatch(r.module_path, module)), None)
        if rule is not None:
            fan_in, fan_out = leaf.shape
            out[path] = (jax.ShapeDtypeStruct((fan_in, rule.rank), jnp.float32),
                         jax.ShapeDtypeStruct((rule.rank, fan_out), jnp.float32))
    return out


# LoRA is applied by params, not inside the modules: the effective kernel of an adapted Dense is
# `base + (a @ b) * alpha / rank` (`lora_merge`), a pure function of (base, adapters) evaluated
# inside the train step's loss, so gradients, optimizer state and checkpoints exist for the
# adapters alone, the model code is untouched, and merging into a normal checkpoint is the very
# same function applied once. (qwix's `LoraProvider` adds `x @ a @ b * alpha / rank` inside the
# intercepted `dot_general`, which our functionally applied methods bypass, see the top of this
# file.) From qwix we take the rule rows and its conventions (qwix 0.1.8,
# qwix/_src/providers/lora.py: `LoraRule.lora_a_initializer = he_uniform()` and
# `lora_b_initializer = zeros` (lines 78-82), the delta scaled by `rule.alpha / rule.rank`
# (line 317)), so a fresh adapter changes nothing: B = 0.
LORA_A, LORA_B = "lora_a", "lora_b"


def lora_init(shapes: dict[str, tuple[jax.ShapeDtypeStruct, ...]], rules: tuple[qwix.LoraRule, ...],
              key: jax.Array) -> dict:
    """Fresh adapters for `lora_shapes(...)`: a nested dict mirroring the params, each adapted
    kernel's path holding {"lora_a": (in, rank), "lora_b": (rank, out)}; A from the rule's
    `lora_a_initializer` (qwix: he_uniform) with a key folded from `key` by the kernel's index in
    sorted path order, B from `lora_b_initializer` (zeros)."""
    flat = {}
    for i, path in enumerate(sorted(shapes)):
        module = path.rpartition("/")[0]
        rule = next(r for r in rules if re.fullmatch(r.module_path, module))
        a, b = shapes[path]
        flat[f"{path}/{LORA_A}"] = rule.lora_a_initializer(jax.random.fold_in(key, i), a.shape, a.dtype)
        flat[f"{path}/{LORA_B}"] = rule.lora_b_initializer(jax.random.fold_in(key, i), b.shape, b.dtype)
    return traverse_util.unflatten_dict(flat, sep="/")


def lora_paths(adapters) -> list[str]:
    """The kernel paths an adapter tree adapts ("llm/layers_0/mlp/up_proj/kernel"), sorted."""
    flat = traverse_util.flatten_dict(adapters, sep="/")
    return sorted({p.rpartition("/")[0] for p in flat})


def lora_merge(base, adapters, scale: float):
    """The params a LoRA model computes with: every adapted kernel `base + (a @ b) * scale`
    (`scale` = alpha / rank; float32 product, the sum cast to the kernel's dtype; a quantized base
    kernel (`qwix.QArray`, QLoRA) is dequantized first), every other leaf `base`'s own (a QArray
    stays one: the layers take it as it is, so a QLoRA step holds no float copy of the kernels it
    does not adapt; `dequantize_params` makes a normal checkpoint of the result). Pure: used
    inside the train step and, once, to merge. With B = 0 every adapted kernel is `base` bit for
    bit (unless it holds -0.0)."""
    flat = traverse_util.flatten_dict(base, sep="/", is_leaf=lambda _, x: isinstance(x, qwix.QArray))
    ads = traverse_util.flatten_dict(adapters, sep="/")
    out = {}
    for path, leaf in flat.items():
        if f"{path}/{LORA_A}" in ads:
            if isinstance(leaf, qwix.QArray):
                leaf = qwix.dequantize(leaf)
            a, b = ads[f"{path}/{LORA_A}"], ads[f"{path}/{LORA_B}"]
            delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) * jnp.float32(scale)
            leaf = (leaf.astype(jnp.float32) + delta).astype(leaf.dtype)
        out[path] = leaf
    missing = sorted({p.rpartition("/")[0] for p in ads} - set(flat))
    if missing:
        raise ValueError(f"lora: {len(missing)} adapter(s) have no base kernel, e.g. {missing[0]}")
    return traverse_util.unflatten_dict(out, sep="/")


def dequantize_params(params):
    """`params` with every `qwix.QArray` leaf dequantized (to its scales' dtype); the other leaves
    are the same objects."""
    return jax.tree.map(lambda x: qwix.dequantize(x) if isinstance(x, qwix.QArray) else x, params,
                        is_leaf=lambda x: isinstance(x, qwix.QArray))


def deviation(model, params, quantize: str, *, key: jax.Array, grid: tuple[int, int] = (4, 4),
              prompt_len: int = 16) -> dict[str, float]:
    """Deviation of `quantize` from `params` (the reference: same dtype, unquantized) on random
    inputs drawn from `key`, for `model` (a `UniPic`):

      logits       max relative error (`relative_error`) of the LLM's logits on random ids;
      top1         fraction of those positions whose argmax (the greedy token) is unchanged;
      head         max relative error of the diffusion head's output (its ε and variance) on
                   conditions from the MAR encoder -> LLM -> MAR decoder of random tokens.
    """
    from unipic_jax.models.qwen2 import Qwen2
    from unipic_jax.models.unipic import head_module, llm_module
    from unipic_jax.train import losses

    qparams = quantize_params(params, quantize)
    cfg = model.config
    k_ids, k_tok, k_draw, k_x = jax.random.split(key, 4)
    ids = jax.random.randint(k_ids, (1, prompt_len), 0, cfg.qwen2.vocab_size, jnp.int32)
    positions = jnp.arange(prompt_len, dtype=jnp.int32)[None]
    llm = llm_module(model)

    @jax.jit
    def logits(p):
        return llm.apply({"params": p["llm"]}, ids, positions, return_logits=True, method=Qwen2.forward_tokens).logits

    m, n = grid
    tokens = jax.random.normal(k_tok, (1, m, n, cfg.mar.token_dim), jnp.float32).astype(model.dtype)
    draws = losses.draw_gen(k_draw, 1, m * n, cfg.mar.token_dim, mask_ratio_min=cfg.mar.mask_ratio_min,
                            diffusion_batch_mul=1, num_train_steps=cfg.diffusion.num_train_steps)
    head = head_module(model)

    @jax.jit
    def head_out(p):
        embeds = model.apply({"params": p}, ids, method=type(model).embed)
        z, _ = losses.generation_forward(model, p, tokens, embeds, jnp.ones(ids.shape, bool), draws)
        z = z.reshape(-1, z.shape[-1])
        x = jax.random.normal(k_x, (z.shape[0], cfg.mar.token_dim), jnp.float32).astype(model.dtype)
        t = jnp.full((z.shape[0],), cfg.diffusion.num_train_steps // 2, jnp.int32)
        return head.apply({"params": p["diffusion_head"]}, x, t, z)

    ref_logits, q_logits = logits(params), logits(qparams)
    return {
        "logits": relative_error(ref_logits, q_logits),
        "top1": float(np.mean(np.argmax(np.asarray(ref_logits), -1) == np.argmax(np.asarray(q_logits), -1))),
        "head": relative_error(head_out(params), head_out(qparams)),
    }
