"""LoRA training of any stage: frozen base params, trainable adapters, adapter-only checkpoints.

A stage config's `lora` section (`--set lora.rank=16 --set lora.alpha=32 --set lora.modules=REGEX
--set lora.quantize=int8`) turns it on (rank 0, the default, is full training, unchanged):

* adapters (`quant.lora_init`: A he-uniform, B zero, as qwix's LoRA provider) on every 2-D Dense
  kernel whose module path `lora.modules` fullmatches (default `quant.LORA_MODULES`: the LLM's
  attention and MLP, MAR's encoder/decoder blocks) AND that the stage trains (`optim.trainable`
  minus `optim.frozen`); every base param is frozen, `lora.quantize` (int8/int4) keeps the base
  quantized (QLoRA, `quant.RULES`);
* the train step's loss reads `quant.lora_merge(base, adapters, alpha / rank)` and differentiates
  with respect to the adapters only, so the TrainState (params, AdamW state, EMA) is the adapters'
  alone and so are the checkpoints; the base is an extra, never donated, argument of the step;
* the base is what the stage starts from (`init_from`, else the random init of `seed`); the
  run records it in `WORKDIR/lora.json` (with rank, alpha, modules) and a resume or a merge
  re-reads that same base (a resume whose config names another base is refused);
* `unipic-jax convert WORKDIR DST` (and `export`) merge: base + A @ B * alpha / rank, a normal
  checkpoint (`runs.read_run`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import jax
import ml_collections
import optax

from unipic_jax import quant
from unipic_jax.train import losses, optim

PyTree = Any
RECORD_FILE = "lora.json"
QUANTIZE = ("",) + quant.QUANTIZE_CHOICES


def defaults() -> dict:
    """The `lora` section of every stage config: off (rank 0)."""
    return dict(rank=0, alpha=None, modules=quant.LORA_MODULES, quantize="")


@dataclasses.dataclass(frozen=True)
class Settings:
    """A run's LoRA: rank, alpha (scale alpha / rank), the module regex, the base's quantization."""

    rank: int
    alpha: float
    modules: str
    quantize: str = ""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def rules(self):
        return quant.lora_rules(self.rank, self.alpha, self.modules)


def settings(config) -> Optional[Settings]:
    """The LoRA settings of a stage config (or of a run's config.json as a ConfigDict), None when
    off (no `lora` section, or rank 0). alpha None means 2 x rank (as `plan --lora`)."""
    section = config.get("lora") if hasattr(config, "get") else None
    if not section or not section.get("rank"):
        return None
    rank = int(section["rank"])
    alpha = section.get("alpha")
    return Settings(rank, float(2 * rank if alpha is None else alpha), section.get("modules") or quant.LORA_MODULES,
                    section.get("quantize") or "")


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def problems(config) -> list[str]:
    """What is wrong with a stage config's `lora` section (empty when fine or absent): rank an int
    >= 0, alpha None or a finite number > 0, quantize '', int8 or int4, modules a regular
    expression fullmatching at least one Dense kernel the stage trains."""
    section = config.get("lora")
    if section is None:
        return []
    rank, alpha = section.get("rank"), section.get("alpha")
    modules, qz = section.get("modules"), section.get("quantize")
    out = []
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 0):
        out.append(f"lora.rank={rank!r} must be an int >= 1 (0: no LoRA)")
    if not (alpha is None or _is_num(alpha) and alpha > 0):
        out.append(f"lora.alpha={alpha!r} must be a finite number > 0 (or None: 2 x rank)")
    if qz not in QUANTIZE:
        out.append(f"lora.quantize={qz!r} must be int8, int4 or empty (an unquantized base)")
    if not isinstance(modules, str):
        out.append(f"lora.modules={modules!r} must be a regular expression")
    else:
        try:
            re.compile(modules)
        except re.error as e:
            out.append(f"lora.modules={modules!r} is not a regular expression ({e})")
    if out or not rank:
        return out
    try:
        shapes = adapter_shapes(abstract_params(config), config, settings(config))
    except ValueError as e:  # e.g. an unknown optim.trainable prefix: validate's other checks say so
        return [str(e)]
    if not shapes:
        out.append(f"lora.modules={modules!r} matches no Dense kernel the stage trains "
                   f"(optim.trainable={tuple(config.optim.trainable)})")
    return out


def abstract_params(config) -> PyTree:
    """The model's params as ShapeDtypeStructs (nothing allocated) for a stage config."""
    from unipic_jax.models.unipic import UniPicConfig, param_shapes

    return param_shapes(UniPicConfig.from_config(config.model))


def adapter_shapes(abstract: PyTree, config, s: Settings) -> dict:
    """`quant.lora_shapes` of the kernels the rules pick, restricted to the params the stage
    trains (`optim.trainable` minus `optim.frozen`): {kernel path: (a, b) ShapeDtypeStructs}."""
    mask = optim.trainable_mask(abstract, tuple(config.optim.trainable), tuple(config.optim.get("frozen", ())))
    trained = {optim.path_str(p) for p, t in jax.tree_util.tree_flatten_with_path(mask)[0] if t}
    return {k: v for k, v in quant.lora_shapes(abstract, s.rules).items() if k in trained}


def adapter_tree_shapes(abstract: PyTree, config, s: Settings) -> dict:
    """The adapters' nested tree ({... kernel: {lora_a, lora_b}}) as ShapeDtypeStructs."""
    from flax import traverse_util

    flat = {}
    for path, (a, b) in adapter_shapes(abstract, config, s).items():
        flat[f"{path}/{quant.LORA_A}"], flat[f"{path}/{quant.LORA_B}"] = a, b
    return traverse_util.unflatten_dict(flat, sep="/")


def init_adapters(base: PyTree, config, s: Settings) -> PyTree:
    """Fresh adapters for the stage (B = 0: the model starts as the base), from `config.seed`."""
    abstract = jax.eval_shape(lambda p: p, base)
    shapes = adapter_shapes(abstract, config, s)
    if not shapes:
        raise ValueError(f"lora.modules={s.modules!r} matches no Dense kernel the stage trains")
    key = jax.random.fold_in(jax.random.key(config.seed), 0x10A)
    return quant.lora_init(shapes, s.rules, key)


def prepare_base(params: PyTree, s: Settings) -> PyTree:
    """The frozen base as the step reads it: `params`, or quantized by `quant.RULES` (QLoRA)."""
    return quant.quantize_params(params, s.quantize) if s.quantize else params


def optim_config(optim_cfg, adapters: PyTree):
    """The stage's optimiser section for the adapter tree: every adapter trains (the stage's
    lr, schedule, decay, clipping, EMA as they are)."""
    cfg = ml_collections.ConfigDict(optim_cfg.to_dict())
    cfg.trainable = tuple(adapters)
    cfg.frozen = ()
    return cfg


def make_train_step(model, tx, schedule, weights: Mapping[str, float], scale: float, *,
                    ema_decay: Optional[float] = None, answer_slots: Optional[int] = None,
                    remat: bool = False) -> Callable:
    """`train_step(state, batch, rng, base) -> (state, metrics)` with `state.params` the adapters:
    the loss of `quant.lora_merge(base, adapters, scale)`, gradients of the adapters only, clip +
    AdamW on them, EMA of them (the loop's `TrainState` and metrics)."""
    from unipic_jax.train.loop import TRACES, TrainState

    def train_step(state, batch, rng, base):
        TRACES["train_step"] += 1

        def loss_fn(adapters):
            params = quant.lora_merge(jax.lax.stop_gradient(base), adapters, scale)
            return losses.total_loss(model, params, batch, rng, weights, answer_slots=answer_slots, remat=remat)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: p + u.astype(p.dtype), state.params, updates)
        ema = None if state.ema is None else optim.ema_update(state.ema, params, ema_decay)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics

    return train_step


# ----------------------------------------------------------------------------------------------
# The record of a run's base, and reading that base again


def record(config, s: Settings, kernels: int) -> dict:
    """What `WORKDIR/lora.json` holds: the settings, the number of adapted kernels and the base
    (an absolute `init_from` checkpoint path, else the random init of `seed`)."""
    init_from = config.get("init_from", "") or ""
    base = {"init_from": os.path.abspath(init_from)} if init_from else {"init_from": "", "seed": int(config.seed)}
    return {"rank": s.rank, "alpha": s.alpha, "scale": s.scale, "modules": s.modules, "quantize": s.quantize,
            "kernels": kernels, "base": base}


def read_record(workdir) -> Optional[dict]:
    """The run's `lora.json`, or None when it has none (a full-training run)."""
    path = Path(workdir) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("base"), dict):
        raise ValueError(f"{path}: not a LoRA record (want rank, alpha, modules, base)")
    return doc


def check_resume(workdir, want: Optional[dict]) -> None:
    """Refuse (one-line ValueError) to resume `workdir` with another LoRA setting or base than the
    one it recorded, or a LoRA run as full training and vice versa (`want`: this run's
    `record(...)`, None for full training)."""
    have = read_record(workdir)
    if have is None and want is None:
        return
    steps = Path(workdir) / "checkpoints"
    if have is None:
        if steps.is_dir() and any(p.name.isdigit() for p in steps.iterdir()):
            raise ValueError(f"{workdir}: holds a full-training run; LoRA (lora.rank >= 1) needs a new workdir")
        return
    if want is None:
        raise ValueError(f"{workdir}: holds a LoRA run (rank {have['rank']}); resume it with the same "
                         f"--set lora.rank={have['rank']} ... or use a new workdir")
    keys = ("rank", "alpha", "modules", "quantize", "base")
    diff = [k for k in keys if have.get(k) != want.get(k)]
    if diff:
        raise ValueError(f"{workdir}: its LoRA run was started with " + ", ".join(f"{k}={have.get(k)!r}" for k in diff)
                         + "; this config has " + ", ".join(f"{k}={want.get(k)!r}" for k in diff))


def write_record(workdir, doc: dict) -> None:
    """Write `WORKDIR/lora.json` atomically."""
    from convert.io import write_file

    text = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    write_file(Path(workdir) / RECORD_FILE, lambda f: f.write(text), overwrite=True)


def read_base(doc: dict, model_config) -> PyTree:
    """The base params a LoRA run recorded (`doc`: its lora.json): the `init_from` checkpoint, or
    the random init of its seed for `model_config` (a ConfigDict), as float32 host-made arrays."""
    base = doc["base"]
    if base.get("init_from"):
        from unipic_jax import checkpoint

        if not Path(base["init_from"]).is_dir():
            raise ValueError(f"the LoRA run's base checkpoint {base['init_from']} is gone; put it back to merge")
        return checkpoint.load(base["init_from"])[1]
    from unipic_jax.models.unipic import UniPicConfig
    from unipic_jax.train.loop import init_train_params

    return init_train_params(UniPicConfig.from_config(model_config), int(base["seed"]))
