"""The training loop: train state, the pure train step, orbax checkpoints with the data iterator, resume.

    trainer = Trainer(config)                      # model, optimiser, jitted step (compiled once per shape)
    result = trainer.run(workdir, {"t2i": "data/t2i.jsonl", ...})

`make_train_step(...)` returns `train_step(state, batch, rng) -> (state, metrics)`, a pure function
(no Python state, no host calls) that can be wrapped in `jax.jit` with in/out shardings and
`donate_argnums=0`. One step: the weighted task losses (`losses.total_loss`, MAR dropout on) in the
model's compute dtype over float32 params, gradients of the trainable params only (frozen params
are `stop_gradient`-ed and never written), clip + AdamW, then the EMA.

Gradient checkpointing (`config.remat`): "none"; "components" rematerialises the MAR encoder, the
LLM, the MAR decoder and the diffusion head each as a whole (`losses`' `remat=True`: only their
inputs are kept, but a component's whole forward is live again during its backward); "blocks"
builds the model with `remat=True`, so every transformer block / ResBlock keeps only its input and
is recomputed in the backward pass (the least activation memory: what full-size runs use).

Checkpoints (`<workdir>/checkpoints/<step>/`, orbax `CheckpointManager`): item `state` (step,
params, optimizer state, EMA) and item `data` (the grain iterator state, JSON per process).
Saves are asynchronous (the arrays are copied to the host before `save` returns, so donation is
safe), every `checkpoint.every` steps and at the end, keeping the last `checkpoint.keep`. A
save interrupted half-way leaves only a temporary directory, which orbax ignores and removes;
`run` resumes from the latest complete step, restoring the arrays straight into the target
shardings (an abstract state from `jax.eval_shape`) and the data order exactly. A step whose
restore fails (truncated array files, a half-deleted folder) is skipped with a warning for the
next older one; once an older step restores, the damaged ones are moved to
`checkpoints/damaged-<step>` (see `Trainer.resume`). The random key of step s is
`fold_in(key(seed), s)`, so a resumed run draws what the uninterrupted one would have: on the CPU
every later loss is bitwise the same.

LoRA (`config.lora.rank` >= 1, train/lora.py): the state's params are the adapters alone (so are
its optimizer state, EMA and checkpoints); the frozen base is the step's fourth argument, and the
run records it in `<workdir>/lora.json` so that a resume and a merge read the same base.

Metrics go to the console (a tqdm bar), to `<workdir>/metrics.jsonl` (one JSON object per logged
step) and to TensorBoard event files in `<workdir>/tb/` (tensorboardX). A run resumed from step S
first drops the lines of steps after S from metrics.jsonl (logged before the kill, logged again
now) and hides TensorBoard's events after S (`purge_step`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from convert.io import write_file
from unipic_jax import quant
from unipic_jax.models.unipic import UniPic, UniPicConfig, param_shapes
from unipic_jax.train import data as data_lib
from unipic_jax.train import lora as lora_lib
from unipic_jax.train import losses, optim

log = logging.getLogger(__name__)
PyTree = Any

# Times a train step was traced (tests prove one compile per batch shape with it).
TRACES: collections.Counter = collections.Counter()

REMAT_MODES = ("none", "components", "blocks")  # config.remat; see the module docstring

# Dense bf16 peak FLOP/s per device by `device_kind` prefix (MFU denominators; config.peak_flops
# overrides). Sources: vendor datasheets (H100/H200 SXM dense bf16 989 TFLOP/s).
PEAK_FLOPS = {
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: step (int32), params (float32), optimizer state, EMA (or None)."""

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    ema: Optional[PyTree]


def init_train_params(config: UniPicConfig, seed: int) -> PyTree:
    """Random float32 params for a run from scratch (smoke runs, benches), made on the host.

    Shapes come from the model (`param_shapes`); values follow the reference's from-scratch
    rules by name: kernels xavier-uniform, biases 0, norm scales 1, every other table (embeddings,
    position tables, fake_latent, mask_token) N(0, 0.02). Real stages start from `init_from`.
    (Running the modules' own initialisers means compiling every module's forward, which takes
    tens of seconds even for the tiny model.)
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(config))
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(leaves))]
    values = []
    for (path, leaf), rng in zip(leaves, rngs):
        name, shape = optim.path_str(path), tuple(leaf.shape)
        if name.endswith("bias"):
            value = np.zeros(shape)
        elif name.endswith("scale"):
            value = np.ones(shape)
        elif name.endswith("kernel") and len(shape) >= 2:
            receptive = math.prod(shape[:-2])
            limit = math.sqrt(6.0 / (receptive * (shape[-2] + shape[-1])))
            value = rng.uniform(-limit, limit, shape)
        else:
            value = 0.02 * rng.standard_normal(shape)
        values.append(jnp.asarray(value, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, values)


def init_state(params: PyTree, tx: optax.GradientTransformation, trainable: PyTree,
               ema_decay: Optional[float]) -> TrainState:
    """Step 0: optimizer state for the trainable params only, EMA = a copy of them (if any)."""
    params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)  # the step donates the state
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema=optim.ema_init(params, trainable) if ema_decay else None)


def remat_mode(config) -> str:
    """The stage's `remat` ("none" when absent), checked against REMAT_MODES."""
    mode = config.get("remat", "none")
    if mode not in REMAT_MODES:
        raise ValueError(f"remat={mode!r}: choose one of {', '.join(REMAT_MODES)}")
    return mode


def make_train_step(model: UniPic, tx: optax.GradientTransformation, trainable: PyTree,
                    schedule: optax.Schedule, weights: Mapping[str, float], *,
                    ema_decay: Optional[float] = None, answer_slots: Optional[int] = None,
                    remat: bool = False) -> Callable:
    """`train_step(state, batch, rng) -> (state, metrics)` for `batch = {task: task batch}`.

    `rng` is the step's key: every draw and dropout mask comes from it. `remat` rematerialises
    whole components (per-block remat is `model.remat`). Metrics: loss, loss/<task>,
    accuracy/und, grad_norm (trainable, before clipping), lr.
    """
    weights = {t: float(w) for t, w in weights.items()}

    def train_step(state: TrainState, batch, rng):
        TRACES["train_step"] += 1
        def loss_fn(params):
            return losses.total_loss(model, optim.freeze(params, trainable), batch, rng, weights,
                                     answer_slots=answer_slots, remat=remat)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optim.apply_updates(state.params, updates, trainable)
        ema = None if state.ema is None else optim.ema_update(state.ema, params, ema_decay)
        metrics = {**metrics, "grad_norm": optim.trainable_norm(grads, trainable), "lr": schedule(state.step)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics

    return train_step


def tokens_per_step(batch: Mapping[str, Mapping[str, Any]], image_tokens: Mapping[str, int]) -> int:
    """Tokens the LLM reads in one step: text positions (image placeholders included) plus, for the
    generation tasks, the target's latent tokens."""
    total = 0
    for task, b in batch.items():
        n, length = np.shape(b["input_ids"])
        total += n * (length + image_tokens.get(task, 0))
    return total


def generated_tokens(config) -> dict[str, int]:
    """Latent tokens of the generated image per row, for the generation tasks (tokens/s)."""
    mar = config.model.mar
    side = config.data.gen_resolution // (mar.vae_stride * mar.patch_size)
    return {"t2i": side * side, "edit": side * side}


def peak_flops_per_device(override: float = 0.0) -> float:
    """`override`, else the table value for this backend's device kind (0.0 if unknown)."""
    if override:
        return float(override)
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), 0.0)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines of a metrics.jsonl file logged after `step` (and lines torn by a kill).

    The file is rewritten atomically (a temporary file, then `os.replace`), only if it changes.
    """
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    if keep == lines:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


class MetricsWriter:
    """Scalars to `<workdir>/metrics.jsonl` and to TensorBoard event files in `<workdir>/tb/`
    (process 0 only). `start_step`: the step the run starts from; what an earlier run logged
    after it is dropped (metrics.jsonl) or hidden (TensorBoard)."""

    def __init__(self, workdir: Path, enabled: bool = True, start_step: int = 0):
        from tensorboardX import SummaryWriter

        self.enabled = enabled and jax.process_index() == 0
        if not self.enabled:
            return
        workdir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(workdir / "metrics.jsonl", start_step)
        self.jsonl = open(workdir / "metrics.jsonl", "a")
        self.tb = SummaryWriter(str(workdir / "tb"), purge_step=start_step + 1)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


@dataclasses.dataclass
class RunResult:
    """What `Trainer.run` did: the final state, the step it started from (0 or the resumed step),
    and the per-step host metrics of the steps it ran (when `collect`)."""

    state: TrainState
    start_step: int
    history: list[dict]


def _host(tree) -> dict:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


class Trainer:
    """A stage's model, optimiser and jitted train step, reusable across runs (one compile per shape).

    `config` is a stage config (configs/stages). `params` (optional) are the initial params;
    otherwise `config.init_from` (a `unipic_jax.checkpoint` directory) or a random init from
    `config.seed`. `batch_sharding(batch) -> batch` places a host batch on the devices (default:
    `jax.device_put`); `state_sharding` is a tree of shardings for the state (default: one device).
    """

    def __init__(self, config, params: Optional[PyTree] = None, *, batch_sharding: Optional[Callable] = None,
                 state_sharding: Optional[PyTree] = None):
        self.config = config
        self.model_config = UniPicConfig.from_config(config.model)
        remat = remat_mode(config)
        self.model = UniPic(self.model_config, jnp.dtype(config.model.get("dtype", "float32")),
                            remat=remat == "blocks")
        if params is None:
            params = self._initial_params()
        # LoRA (train/lora.py): the state's params are the adapters; the frozen base is an extra,
        # never donated, argument of the step (`self.extra_args`).
        self.lora = lora_lib.settings(config)
        self.base, self.extra_args, optim_cfg = None, (), config.optim
        if self.lora is not None:
            if state_sharding is not None:
                raise ValueError("LoRA training runs on one device for now: leave out --mesh")
            self.base = lora_lib.prepare_base(params, self.lora)
            self.extra_args = (self.base,)
            params = lora_lib.init_adapters(params, config, self.lora)
            optim_cfg = lora_lib.optim_config(config.optim, params)
        self.tx, self.trainable, self.schedule = optim.make_optimizer(optim_cfg, params, config.total_steps)
        self.ema_decay = config.optim.get("ema_decay") or None
        self.initial_params = params
        self.weights = {t: float(config.loss_weights[t]) for t in data_lib.active_tasks(config)}
        if self.lora is None:
            self.train_step = make_train_step(
                self.model, self.tx, self.trainable, self.schedule, self.weights, ema_decay=self.ema_decay,
                answer_slots=config.data.answer_slots, remat=remat == "components")
        else:
            self.train_step = lora_lib.make_train_step(
                self.model, self.tx, self.schedule, self.weights, self.lora.scale, ema_decay=self.ema_decay,
                answer_slots=config.data.answer_slots, remat=remat == "components")
        self.batch_sharding = batch_sharding or jax.device_put
        self.state_sharding = state_sharding
        # With a state sharding the step keeps the state where it is (inputs carry theirs).
        out = (state_sharding, None) if state_sharding is not None else None
        self._jitted = jax.jit(self.train_step, out_shardings=out, donate_argnums=(0,))
        self._compiled: dict = {}  # batch shapes -> (compiled step, flops per step)

    def _initial_params(self) -> PyTree:
        init_from = self.config.get("init_from", "")
        if init_from:
            from unipic_jax import checkpoint

            _, params = checkpoint.load(init_from)
            return params
        return init_train_params(self.model_config, self.config.seed)

    def init_state(self) -> TrainState:
        """Step 0 (built directly in `state_sharding` when one is given)."""
        make = lambda p: init_state(p, self.tx, self.trainable, self.ema_decay)
        if self.state_sharding is not None:
            return jax.jit(make, out_shardings=self.state_sharding)(self.initial_params)
        return make(self.initial_params)

    def abstract_state(self) -> TrainState:
        """The state as ShapeDtypeStructs with their target shardings (for restoring)."""
        shapes = jax.eval_shape(lambda p: init_state(p, self.tx, self.trainable, self.ema_decay),
                                self.initial_params)
        if self.state_sharding is not None:
            return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                shapes, self.state_sharding)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)

    def state_shardings(self, param_shardings: PyTree, replicated) -> TrainState:
        """Shardings of the whole state from those of the params: Adam moments and EMA leaves take
        their param's sharding, every other leaf (step, counts) `replicated`. Pass the result as
        `state_sharding`."""
        abstract = jax.eval_shape(lambda p: init_state(p, self.tx, self.trainable, self.ema_decay),
                                  self.initial_params)
        by_path = {optim.path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(
            param_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]}

        def pick(path, leaf):
            name = optim.path_str(path)
            match = [p for p in by_path if name == p or name.endswith("/" + p)]
            return by_path[max(match, key=len)] if match and leaf.ndim else replicated

        opt = jax.tree_util.tree_map_with_path(pick, abstract.opt_state)
        ema = None if abstract.ema is None else jax.tree_util.tree_map_with_path(pick, abstract.ema)
        return TrainState(step=replicated, params=param_shardings, opt_state=opt, ema=ema)

    def checkpoint_manager(self, workdir):
        """The orbax CheckpointManager of `<workdir>/checkpoints` (items "state" and "data")."""
        import orbax.checkpoint as ocp

        c = self.config.checkpoint
        return ocp.CheckpointManager(
            (Path(workdir) / "checkpoints").absolute(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=c.keep, save_interval_steps=c.every, enable_async_checkpointing=c.async_save,
                cleanup_tmp_directories=True),
            item_names=("state", "data"))

    def restore(self, manager, step: int, iterator=None) -> TrainState:
        """The state saved at `step`, read straight into `abstract_state()`'s shardings; with
        `iterator` (a grain DatasetIterator) its position is restored too."""
        import grain
        import orbax.checkpoint as ocp

        items = {"state": ocp.args.StandardRestore(self.abstract_state())}
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(iterator)
        return manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def resume(self, manager, iterator=None) -> tuple[Optional[TrainState], int]:
        """(state, step) of the newest checkpoint that restores, or (None, 0) when there is none.

        Damage is found by trying: a step whose restore raises (truncated array files, a missing
        item, bad JSON) is logged and the next older step is tried. Once one restores, the newer
        damaged steps are moved to `checkpoints/damaged-<step>`: the manager would otherwise skip
        every later save up to the damaged step (orbax saves only steps after its latest), and
        moving keeps what may still be useful to the user, where deleting would not. When no
        step restores (a changed model config looks the same), nothing is moved and a one-line
        ValueError names the folder.
        """
        failed = []
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                state = self.restore(manager, step, iterator)
            except Exception as e:  # whatever the damage, try an older step
                log.warning("checkpoint step %d in %s is damaged (%s: %s); trying an older step", step,
                            manager.directory, type(e).__name__, _first_line(e))
                failed.append((step, e))
                continue
            if failed:
                _set_aside(Path(manager.directory), [s for s, _ in failed])
                manager.reload()
            return state, step
        if failed:
            step, e = failed[0]
            raise ValueError(
                f"{manager.directory}: no checkpoint restores (steps {', '.join(str(s) for s, _ in failed)}; "
                f"step {step}: {type(e).__name__}: {_first_line(e)}); move that folder away to start over")
        return None, 0

    def step(self, state: TrainState, batch, rng) -> tuple[TrainState, dict, float]:
        """One jitted step (compiled ahead of time per batch shape); returns its FLOPs too."""
        signature = tuple(sorted((t, k, np.shape(v)) for t, b in batch.items() for k, v in b.items()))
        if signature not in self._compiled:
            compiled = self._jitted.lower(state, batch, rng, *self.extra_args).compile()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            self._compiled[signature] = (compiled, float((cost or {}).get("flops", 0.0)))
        compiled, flops = self._compiled[signature]
        new_state, metrics = compiled(state, batch, rng, *self.extra_args)
        return new_state, metrics, flops

    def run(self, workdir, sources: Mapping[str, Any], *, tokenizer=None, stop_at: Optional[int] = None,
            collect: bool = False, progress: bool = True, checkpoints: bool = True,
            hooks: Sequence[Callable[[int, dict], None]] = ()) -> RunResult:
        """Train from the latest checkpoint in `workdir` (or from scratch) to `config.total_steps`.

        `sources[task]`: a source spec (see `data.open_source`) or a source object. `stop_at`
        ends the run after that step without a final save (what a kill after that step does;
        the regular interval saves still happen). `hooks` are called as `hook(step, host_metrics)`
        after every step, before its checkpoint save. `checkpoints=False` neither restores nor
        saves (a throw-away run, e.g. a reference for comparisons).
        """
        import grain
        import orbax.checkpoint as ocp

        cfg = self.config
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        lora_record = None if self.lora is None else lora_lib.record(
            cfg, self.lora, len(quant.lora_paths(self.initial_params)))
        if checkpoints:
            lora_lib.check_resume(workdir, lora_record)  # the same base and adapters, or a one-line error
        tokenizer = tokenizer or load_tokenizer(cfg, workdir)
        sources = data_lib.resolve_sources(sources, workdir, cfg)
        dataset = data_lib.make_dataset(cfg, tokenizer, sources, process_index=jax.process_index(),
                                        process_count=jax.process_count(),
                                        tfds_data_dir=data_lib.tfds_data_dir(cfg, workdir))
        iterator = iter(dataset)
        manager = self.checkpoint_manager(workdir) if checkpoints else None
        try:
            state, start = self.resume(manager, iterator) if manager else (None, 0)
        except BaseException:
            iterator.close()
            manager.close()
            raise
        if state is None:
            state = self.init_state()
            if lora_record is not None:  # before config.json: a run with a config is a run
                lora_lib.write_record(workdir, lora_record)
            text = cfg.to_json_best_effort(indent=2).encode()  # atomically: `runs.is_run` reads it
            write_file(workdir / "config.json", lambda f: f.write(text), overwrite=True)
        else:
            log.info("resumed from step %d", start)
        end = cfg.total_steps if stop_at is None else min(stop_at, cfg.total_steps)
        writer = MetricsWriter(workdir, start_step=start)
        key = jax.random.key(cfg.seed)
        # XLA's cost analysis of an SPMD program counts one device's share: per-device MFU.
        peak = peak_flops_per_device(cfg.get("peak_flops", 0.0))
        image_tokens = generated_tokens(cfg)
        history: list[dict] = []
        bar = _progress(start, end, progress)
        window = {"time": time.perf_counter(), "tokens": 0, "flops": 0.0, "steps": 0}
        try:
            for step in range(start, end):
                host_batch = next(iterator)
                skipped = {t: int(np.max(b.pop("num_skipped"))) for t, b in host_batch.items()}
                state, metrics, flops = self.step(state, self.batch_sharding(host_batch),
                                                  jax.random.fold_in(key, step))
                window["tokens"] += tokens_per_step(host_batch, image_tokens)
                window["flops"] += flops
                window["steps"] += 1
                done = step + 1
                logging_step = done % cfg.log_every == 0 or done == end
                host = None
                if collect or logging_step or hooks:
                    host = _host(metrics)
                    host["skipped"] = float(sum(skipped.values()))
                if collect:
                    history.append(host)
                if logging_step:
                    elapsed = time.perf_counter() - window["time"]
                    scalars = dict(host)
                    scalars["steps_per_s"] = window["steps"] / elapsed
                    scalars["tokens_per_s"] = window["tokens"] / elapsed
                    if peak:
                        scalars["mfu"] = window["flops"] / elapsed / peak
                    writer.write(done, scalars)
                    bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.2e}",
                                    tok_s=f"{scalars['tokens_per_s']:.0f}")
                    window = {"time": time.perf_counter(), "tokens": 0, "flops": 0.0, "steps": 0}
                bar.update(1)
                for hook in hooks:
                    hook(done, host)
                if manager:
                    manager.save(done, args=ocp.args.Composite(
                        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)),
                        force=done == cfg.total_steps)
        finally:
            bar.close()
            writer.close()
            iterator.close()
            if manager:
                manager.wait_until_finished()
                manager.close()
        return RunResult(state=state, start_step=start, history=history)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


def _set_aside(directory: Path, steps: Sequence[int]) -> None:
    """Move the folders of damaged checkpoint steps to `damaged-<step>[-n]` (process 0 renames,
    the others wait for it)."""
    if jax.process_index() == 0:
        for step in steps:
            target, n = directory / f"damaged-{step}", 1
            while target.exists():
                target, n = directory / f"damaged-{step}-{n}", n + 1
            os.replace(directory / str(step), target)
            log.warning("moved the damaged checkpoint step %d to %s", step, target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("unipic_jax set aside damaged checkpoints")


def _progress(start: int, end: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=end, initial=start, disable=not enabled or jax.process_index() != 0,
                dynamic_ncols=True, unit="step")


def load_tokenizer(config, workdir: Path):
    """The stage's tokenizer: `config.tokenizer` (a Hugging Face folder), or for tiny configs a
    byte-level stand-in written to `<workdir>/tokenizer` with the config's special ids."""
    from unipic_jax import prompts

    if config.get("tokenizer"):
        tok = prompts.Tokenizer.from_folder(config.tokenizer)
    else:
        tokens = config.model.tokens
        folder = workdir / "tokenizer"
        if not folder.is_dir():
            prompts.write_byte_tokenizer(folder, vocab_size=config.model.qwen2.vocab_size, eos_id=tokens.eos,
                                         pad_id=tokens.pad)
        tok = prompts.Tokenizer.from_folder(folder)
    tok.check_ids(config.model.tokens)
    return tok


# ----------------------------------------------------------------------------------------------
# Configs from the command line


def load_stage_config(spec: str):
    """A stage config from "NAME[:ARG]" (NAME in configs/stages: pt, align, ct, sft, smoke) or
    "PATH.py[:ARG]" (any file with `get_config(arg)`)."""
    import importlib
    import importlib.util

    name, _, arg = spec.partition(":")
    if name.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location("stage_config", name)
        if module_spec is None or not Path(name).is_file():
            raise ValueError(f"--config {name}: no such file")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(f"configs.stages.{name}")
        except ModuleNotFoundError:
            raise ValueError(f"--config {name}: not a stage (pt, align, ct, sft, smoke) or a .py file") from None
    return module.get_config(arg)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _parse_value(text: str):
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def _as_type(key: str, text: str, old, value):
    """`value` (parsed from `text`) as the type of the field's current value `old`, or a one-line
    ValueError naming the key, the wanted type and the value."""
    def wrong(want: str):
        return ValueError(f"--set {key}={text}: {key} takes {want}, not {text!r}")

    if old is None:  # an optional field (e.g. ema_decay=None): any literal
        return value
    if isinstance(old, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
        raise wrong("a bool (true or false)")
    if isinstance(old, int):
        if _is_int(value):
            return value
        raise wrong("an int")
    if isinstance(old, float):  # None: off (ema_decay); validate() rejects it where it is not allowed
        if _is_num(value) or value is None:
            return value if value is None else float(value)
        raise wrong("a finite float")
    if isinstance(old, str):
        return value if isinstance(value, str) else text
    if isinstance(old, tuple):
        if isinstance(value, str):  # a,b -> ("a", "b")
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        items = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if old and isinstance(old[0], str) and not all(isinstance(v, str) for v in items):
            raise wrong("a tuple of strings, e.g. a,b")
        if old and _is_int(old[0]) and not all(_is_int(v) for v in items):
            raise wrong("a tuple of ints, e.g. (1, 2)")
        return items
    if hasattr(old, "keys"):  # a section (ConfigDict) or a dict field
        if isinstance(value, dict):
            return value
        raise wrong("a dict, e.g. {'key': value}")
    return value


def apply_overrides(config, overrides: Iterable[str], *, check: bool = True):
    """`key.sub=value` assignments, then `validate(config)` (unless `check` is False).

    Values are parsed as Python literals (else kept as strings) and must fit the type of the
    field they replace: an int for an int, a finite number (or None) for a float, true/false for
    a bool, "a,b" or a literal tuple for a tuple. Every mistake is a one-line ValueError.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: want key=value")
        *parents, leaf = key.split(".")
        node = config
        for depth, part in enumerate(parents):
            section = ".".join(parents[:depth + 1])
            if part not in node:
                raise ValueError(f"--set {key}: no config section {section!r}")
            node = node[part]
            if not hasattr(node, "keys"):
                raise ValueError(f"--set {key}: {section} is a value, not a config section")
        if leaf not in node:
            raise ValueError(f"--set {key}: no such config field")
        try:
            node[leaf] = _as_type(key, text, node[leaf], _parse_value(text))
        except TypeError as e:  # what ConfigDict itself refuses
            raise ValueError(f"--set {item}: {e}") from None
    if check:
        validate(config)
    return config


_CHECKS = [  # (key, test, what the value must be)
    ("total_steps", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("log_every", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("seed", lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    ("remat", lambda v: v in REMAT_MODES, f"one of {', '.join(REMAT_MODES)}"),
    ("peak_flops", lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    ("model.dtype", lambda v: v in ("float32", "bfloat16", "float16"), "float32, bfloat16 or float16"),
    ("checkpoint.every", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("checkpoint.keep", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("optim.lr", lambda v: _is_num(v) and v >= 0, "a finite number >= 0"),
    ("optim.schedule", lambda v: v in ("constant", "cosine"), "constant or cosine"),
    ("optim.warmup_ratio", lambda v: _is_num(v) and 0 <= v <= 1, "in [0, 1]"),
    ("optim.warmup_start_factor", lambda v: _is_num(v) and 0 <= v <= 1, "in [0, 1]"),
    ("optim.weight_decay", lambda v: _is_num(v) and v >= 0, "a finite number >= 0"),
    ("optim.grad_clip", lambda v: _is_num(v) and v >= 0, "a finite number >= 0 (0: no clipping)"),
    ("optim.b1", lambda v: _is_num(v) and 0 <= v < 1, "in [0, 1)"),
    ("optim.b2", lambda v: _is_num(v) and 0 <= v < 1, "in [0, 1)"),
    ("optim.eps", lambda v: _is_num(v) and v >= 0, "a finite number >= 0"),
    ("optim.ema_decay", lambda v: v is None or _is_num(v) and 0 <= v < 1, "None or in [0, 1)"),
    ("data.gen_resolution", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("data.und_resolution", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("data.answer_slots", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("data.cfg_drop_prob", lambda v: _is_num(v) and 0 <= v <= 1, "in [0, 1]"),
    ("data.edit_uncond_prob", lambda v: _is_num(v) and 0 <= v <= 1, "in [0, 1]"),
    ("data.edit_layout", lambda v: v in ("train", "inference"), "train or inference"),
    ("data.seed", lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    ("data.num_threads", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("data.workers", lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    ("data.max_consecutive_corrupt", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
] + [check for t in data_lib.TASKS for check in (
    (f"data.batch_size.{t}", lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    (f"data.max_length.{t}", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    (f"loss_weights.{t}", lambda v: _is_num(v) and v >= 0, "a finite number >= 0"))]

_MISSING = object()
_OPTIONAL = ("remat", "peak_flops", "model.dtype", "optim.warmup_start_factor", "optim.ema_decay")  # read with .get
# The `lora` section is checked by `lora_lib.problems` (absent in configs older than it).


def _lookup(config, key: str):
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return _MISSING
        node = node[part]
    return node


def validate(config) -> None:
    """Check a stage config's values (ranges, choices, at least one task to train, image sides
    that fit the latent grid, the `lora` section: `lora_lib.problems`) before anything is built;
    one ValueError lists every problem."""
    problems = []
    for key, ok, want in _CHECKS:
        value = _lookup(config, key)
        if value is _MISSING:
            if key not in _OPTIONAL:
                problems.append(f"{key} is missing")
        elif not ok(value):
            problems.append(f"{key}={value!r} must be {want}")
    if not problems:
        if not data_lib.active_tasks(config):
            problems.append("no task to train: every task has a batch size or loss weight of 0")
        mar = config.model.mar
        stride = mar.vae_stride * mar.patch_size
        for key in ("data.gen_resolution", "data.und_resolution"):
            if _lookup(config, key) % stride:
                problems.append(f"{key}={_lookup(config, key)} must be a multiple of {stride} pixels")
    if not problems:
        problems += lora_lib.problems(config)
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems))


def train_main(config_spec: str, data_spec: str, workdir: str, overrides: Sequence[str] = (),
               progress: bool = True) -> RunResult:
    """What `unipic-jax train` runs: load the stage config, apply and check the `--set`s, check
    the data spec, then build the trainer and train in `workdir` (every config or data mistake is
    a one-line ValueError before anything is built or compiled)."""
    config = apply_overrides(load_stage_config(config_spec), overrides, check=False)
    validate(config)
    sources = data_lib.parse_data_spec(data_spec)
    data_lib.check_sources(sources, data_lib.tfds_data_dir(config, workdir))
    trainer = Trainer(config)
    if trainer.lora is not None:
        log.info("training %s with LoRA rank %d, alpha %g: %d adapter params on %d kernels, %d base params frozen",
                 config.stage, trainer.lora.rank, trainer.lora.alpha, optim.count_params(trainer.initial_params),
                 len(quant.lora_paths(trainer.initial_params)), optim.count_params(trainer.base))
    else:
        log.info("training %s: %d of %d params trainable", config.stage,
                 optim.count_params(trainer.initial_params, trainer.trainable),
                 optim.count_params(trainer.initial_params))
    return trainer.run(workdir, sources, progress=progress)
