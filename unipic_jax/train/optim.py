"""The optimiser of a training stage (reference-spec §11.4, paper Table 1): param groups, schedule, EMA.

* Trainable set: a stage trains the params under some top-level prefixes (`optim.trainable`,
  e.g. ("mar", "diffusion_head") in PT); every other param is frozen. Frozen params carry **no
  optimizer state** (`optax.multi_transform`: their Adam moments are `optax.MaskedNode`s) and
  are never written, so they stay bit-identical.
* Weight-decay groups as the reference's `MAROptimWrapperConstructor`: no decay for 1-D params,
  for names ending in `bias` and for everything in the diffusion head; decay for the rest
  (`fake_latent`, `mask_token` and the position tables included).
* AdamW (b1 0.9, b2 0.95, eps 1e-15 per the paper) after global-norm clipping of the trainable
  gradients (1.0); learning rate: linear warmup from `warmup_start_factor * lr` over
  `round(warmup_ratio * total_steps)` steps, then constant or cosine to 0 (mmengine's
  LinearLR + CosineAnnealingLR).
* EMA `ema <- decay * ema + (1 - decay) * param` per step, over the trainable params only.

Param paths are "/"-joined keys (`mar/encoder_blocks_0/attn/qkv/kernel`).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

PyTree = Any
TRAIN, FROZEN = "train", "frozen"
NO_DECAY_PREFIXES = ("diffusion_head",)  # the reference skips decay for any name with "diffloss"


def path_str(path) -> str:
    """A tree path as "/"-joined key names."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _under(path: str, prefixes: Sequence[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def trainable_mask(params: PyTree, trainable: Sequence[str], frozen: Sequence[str] = ()) -> PyTree:
    """Bool tree: True for params under a `trainable` prefix and under no `frozen` prefix.

    Prefixes are "/"-joined paths ("mar", "mar/decoder_blocks_0"). An unknown prefix is an
    error, so a typo cannot silently freeze a whole stage.
    """
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    unknown = [p for p in (*trainable, *frozen) if not any(_under(q, [p]) for q in paths)]
    if unknown:
        raise ValueError(f"no params under {unknown}; top-level names are "
                         f"{sorted({q.split('/')[0] for q in paths})}")
    return jax.tree_util.tree_map_with_path(
        lambda p, _: _under(path_str(p), trainable) and not _under(path_str(p), frozen), params)


def decay_mask(params: PyTree, no_decay_prefixes: Sequence[str] = NO_DECAY_PREFIXES) -> PyTree:
    """Bool tree: True where weight decay applies (ndim >= 2, not a bias, not in the head)."""
    def decays(path, leaf):
        name = path_str(path)
        return (jnp.ndim(leaf) >= 2 and not name.endswith("bias")
                and not _under(name, no_decay_prefixes))

    return jax.tree_util.tree_map_with_path(decays, params)


def lr_schedule(lr: float, total_steps: int, warmup_ratio: float, kind: str,
                warmup_start_factor: float = 1e-5) -> optax.Schedule:
    """Learning rate per step: linear warmup over round(warmup_ratio * total_steps) steps from
    `warmup_start_factor * lr` to `lr`, then "constant" or "cosine" (to 0 at `total_steps`)."""
    if kind not in ("constant", "cosine"):
        raise ValueError(f"schedule {kind!r}: choose 'constant' or 'cosine'")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup = int(round(warmup_ratio * total_steps))
    if kind == "constant":
        main = optax.constant_schedule(lr)
    else:
        main = optax.cosine_decay_schedule(lr, decay_steps=max(total_steps - warmup, 1), alpha=0.0)
    if warmup == 0:
        return main
    ramp = optax.linear_schedule(lr * warmup_start_factor, lr, transition_steps=warmup)
    return optax.join_schedules([ramp, main], boundaries=[warmup])


def labels(trainable: PyTree) -> PyTree:
    """`multi_transform` labels from a trainable mask."""
    return jax.tree.map(lambda t: TRAIN if t else FROZEN, trainable)


def make_optimizer(optim_cfg, params: PyTree, total_steps: int) -> tuple[optax.GradientTransformation, PyTree, optax.Schedule]:
    """(transformation, trainable mask, lr schedule) for a stage's `optim` config section.

    Fields: lr, schedule, warmup_ratio, warmup_start_factor, weight_decay, grad_clip, b1, b2,
    eps, trainable, frozen. The transformation clips the trainable gradients by their global
    norm, then AdamW with decay on `decay_mask` leaves; frozen leaves get `set_to_zero` and
    no state.
    """
    trainable = trainable_mask(params, tuple(optim_cfg.trainable), tuple(optim_cfg.get("frozen", ())))
    schedule = lr_schedule(optim_cfg.lr, total_steps, optim_cfg.warmup_ratio, optim_cfg.schedule,
                           optim_cfg.get("warmup_start_factor", 1e-5))
    adamw = optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                        weight_decay=optim_cfg.weight_decay, mask=decay_mask)
    inner = optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), adamw) if optim_cfg.grad_clip else adamw
    tx = optax.multi_transform({TRAIN: inner, FROZEN: optax.set_to_zero()}, labels(trainable))
    return tx, trainable, schedule


def apply_updates(params: PyTree, updates: PyTree, trainable: PyTree) -> PyTree:
    """params + updates on trainable leaves; frozen leaves are returned untouched (bitwise)."""
    return jax.tree.map(lambda p, u, t: (p + u.astype(p.dtype)) if t else p, params, updates, trainable)


def trainable_norm(grads: PyTree, trainable: PyTree) -> jax.Array:
    """Global L2 norm of the trainable gradients (what the clip sees)."""
    return optax.tree.norm(jax.tree.map(lambda g, t: g if t else None, grads, trainable))


def freeze(params: PyTree, trainable: PyTree) -> PyTree:
    """`stop_gradient` on frozen leaves, so no backward pass is built for them."""
    return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)


# ----------------------------------------------------------------------------------------------
# EMA


def ema_init(params: PyTree, trainable: PyTree) -> PyTree:
    """A copy of the trainable params; frozen leaves are `optax.MaskedNode()` (nothing stored)."""
    return jax.tree.map(lambda p, t: jnp.array(p, copy=True) if t else optax.MaskedNode(), params, trainable)


def ema_update(ema: PyTree, params: PyTree, decay: float) -> PyTree:
    """`decay * ema + (1 - decay) * param` on the stored leaves (MAR's `update_ema`)."""
    def update(e, p):
        if isinstance(e, optax.MaskedNode):
            return e
        return e * decay + p * (1.0 - decay)

    return jax.tree.map(update, ema, params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def ema_params(ema: Optional[PyTree], params: PyTree) -> PyTree:
    """The full param tree with the EMA values where the EMA is kept (frozen params as they are)."""
    if ema is None:
        return params
    return jax.tree.map(lambda e, p: p if isinstance(e, optax.MaskedNode) else e, ema, params,
                        is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def count_params(params: PyTree, mask: Optional[PyTree] = None) -> int:
    """Number of parameters (of the masked-in leaves when `mask` is given)."""
    leaves = jax.tree.leaves(params if mask is None else jax.tree.map(lambda p, m: p if m else None, params, mask))
    return sum(int(jnp.size(x)) for x in leaves)

