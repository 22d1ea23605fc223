"""Running on many devices and many hosts: process start-up, host-0 logging, global batches and the
sharded train step.

Multi-host (one Python process per host, JAX's multi-controller runtime):

    distributed.initialize(coordinator="10.0.0.1:1234", process_id=i, num_processes=n)

takes its three values from arguments, else from `UNIPIC_COORDINATOR`, `UNIPIC_PROCESS_ID`,
`UNIPIC_NUM_PROCESSES`; `coordinator="auto"` (or only `JAX_COORDINATOR_ADDRESS` set) hands
everything to JAX's own detection (Cloud TPU, SLURM, Open MPI, Kubernetes). With none of these it is
a single-process run and nothing is initialised. A coordinator on this machine (127.0.0.1,
localhost, ::1) is bound to the loopback interface only, not to every interface (JAX's default).
It must run before any JAX computation, and a missing peer makes JAX abort the process after
`initialization_timeout` seconds (it does not raise).

Sharded programs. `train_state_shardings` places the train state like its params
(`sharding.param_shardings`: Adam moments and EMA follow their param, counters replicated);
`batch_shardings` splits every batch array over the "batch" rule; `sharded_train_step` is the
train step under `jax.jit` with those in/out shardings and the state donated. The same jitted
object runs on real arrays (tests, training) and lowers on `jax.ShapeDtypeStruct`s for a TPU
topology (`unipic_jax.aot`). `sharded_trainer` builds a `Trainer` whose params, state and
batches live on a mesh; with several processes each host feeds only its own rows
(`global_batch`: the data pipeline's per-process shard becomes this host's block of the global
batch).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unipic_jax import sharding

PyTree = Any
ENV_COORDINATOR = "UNIPIC_COORDINATOR"
ENV_PROCESS_ID = "UNIPIC_PROCESS_ID"
ENV_NUM_PROCESSES = "UNIPIC_NUM_PROCESSES"
AUTO = "auto"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Process start-up


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where this process sits: the coordinator "host:port" (or "auto": JAX detects everything),
    this process's id and the process count (None: left to JAX's detection)."""

    coordinator: str
    process_id: Optional[int] = None
    num_processes: Optional[int] = None

    @property
    def auto(self) -> bool:
        return self.coordinator == AUTO

    def bind_address(self) -> Optional[str]:
        """"127.0.0.1:port" (or "[::1]:port") for a coordinator on this machine, else None (JAX
        binds every interface)."""
        if self.auto:
            return None
        host, port = split_address(self.coordinator)
        if host not in LOCAL_HOSTS:
            return None
        return f"[::1]:{port}" if host == "::1" else f"127.0.0.1:{port}"


def split_address(address: str) -> tuple[str, int]:
    """"host:port" / "[v6]:port" -> (host, port); raises ValueError naming the problem."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator {address!r}: want HOST:PORT (e.g. 10.0.0.1:1234), or 'auto'")
    return host, int(port)


def _int(value, what: str) -> Optional[int]:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {value!r} is not an integer") from None


def resolve_cluster(coordinator: Optional[str] = None, process_id=None, num_processes=None,
                    environ: Optional[Mapping[str, str]] = None) -> Optional[Cluster]:
    """The cluster of this process from arguments, else the UNIPIC_* variables, else
    `JAX_COORDINATOR_ADDRESS` (JAX's own: then "auto"); None for a single-process run.

    Each value is taken separately (an argument wins over its variable). A process id or count
    without a coordinator, an id outside [0, count) or a count below 1 is a ValueError.
    """
    env = os.environ if environ is None else environ
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    process_id = _int(process_id if process_id is not None else env.get(ENV_PROCESS_ID), "process id")
    num_processes = _int(num_processes if num_processes is not None else env.get(ENV_NUM_PROCESSES),
                         "process count")
    if coordinator is None:
        if process_id is not None or num_processes is not None:
            raise ValueError(f"a process id or count was given without a coordinator (--coordinator or "
                             f"{ENV_COORDINATOR}: HOST:PORT of process 0, or 'auto')")
        return Cluster(AUTO) if env.get("JAX_COORDINATOR_ADDRESS") else None
    if coordinator != AUTO:
        split_address(coordinator)
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"process count {num_processes}: must be at least 1")
    if process_id is not None and (process_id < 0 or (num_processes is not None and process_id >= num_processes)):
        raise ValueError(f"process id {process_id}: must be in [0, {num_processes})")
    return Cluster(coordinator, process_id, num_processes)


def initialize(coordinator: Optional[str] = None, process_id=None, num_processes=None, *,
               initialization_timeout: int = 300, heartbeat_timeout: int = 100, shutdown_timeout: int = 300,
               environ: Optional[Mapping[str, str]] = None) -> Optional[Cluster]:
    """`jax.distributed.initialize` from arguments or the environment (`resolve_cluster`).

    Returns the cluster, or None (and does nothing) for a single-process run. Call it before any
    JAX computation. On the CPU backend the cross-process collectives are gloo's.
    """
    cluster = resolve_cluster(coordinator, process_id, num_processes, environ)
    if cluster is None:
        return None
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=None if cluster.auto else cluster.coordinator,
        num_processes=cluster.num_processes, process_id=cluster.process_id,
        coordinator_bind_address=cluster.bind_address(), initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout, shutdown_timeout_seconds=shutdown_timeout)
    log.info("process %d of %d: %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return cluster


# ----------------------------------------------------------------------------------------------
# Host-0 logging


def is_main_process() -> bool:
    """True on process 0 (the one that logs, writes metrics and reports)."""
    return jax.process_index() == 0


class _MainOrWarning(logging.Filter):
    """Keeps every record on process 0 and warnings and errors elsewhere; stamps the index."""

    def __init__(self, process_index: int):
        super().__init__()
        self.process_index = process_index

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_index = self.process_index
        return record.levelno >= logging.WARNING or self.process_index == 0


def setup_logging(level: int = logging.INFO, stream=None, process_index: Optional[int] = None) -> logging.Handler:
    """Log to `stream` (stderr): records below WARNING from process 0 only, warnings and errors
    from every process, each line prefixed with its process index. Call it after `initialize`
    (the index is read once, here: `process_index` overrides it). Returns the handler."""
    index = jax.process_index() if process_index is None else process_index
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_MainOrWarning(index))
    handler.setFormatter(logging.Formatter("[p%(process_index)s] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    return handler


# ----------------------------------------------------------------------------------------------
# Global arrays from per-process data


def replicated(mesh: Mesh) -> NamedSharding:
    """The whole array on every device of `mesh` (scalars, counters, keys, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def global_shape(local_shape, process_count: Optional[int] = None) -> tuple[int, ...]:
    """The global shape of a batch array of which each process holds `local_shape` (rows split)."""
    count = jax.process_count() if process_count is None else process_count
    return (local_shape[0] * count, *local_shape[1:])


def batch_shardings(mesh: Mesh, batch: PyTree, rules=sharding.DEFAULT_RULES) -> PyTree:
    """A NamedSharding per array of `batch` (global shapes): rows over the "batch" rule."""
    return jax.tree.map(lambda x: sharding.batch_sharding(mesh, np.shape(x), rules), batch)


def global_batch(host_batch: PyTree, mesh: Mesh, rules=sharding.DEFAULT_RULES) -> PyTree:
    """This process's rows (`host_batch`, numpy, each array `global rows / process count` long) as
    global arrays split over the "batch" rule. With one process it is a sharded `device_put`.

    Process p's rows land where the mesh puts process p's devices; on meshes from `make_mesh`
    (process-major device order, the batch on the outer axes) that is rows [p*n, (p+1)*n).
    """
    def place(x):
        x = np.asarray(x)
        shape = global_shape(x.shape)
        return jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, shape, rules), x, shape)

    return jax.tree.map(place, host_batch)


def place(host_tree: PyTree, shardings: PyTree) -> PyTree:
    """Host arrays (whole, the same on every process) -> global arrays with `shardings`; each
    process copies only the shards its devices hold."""
    def put(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

    return jax.tree.map(put, host_tree, shardings)


def gather(tree: PyTree) -> PyTree:
    """Every array of `tree` whole on this host as numpy (a collective: call it on every process)."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


# ----------------------------------------------------------------------------------------------
# The sharded train step


class ShardedStep(NamedTuple):
    """`jitted(state, batch, rng) -> (state, metrics)` with its input shardings."""

    jitted: Callable
    state: PyTree
    batch: PyTree
    rng: NamedSharding


def train_state_shardings(trainer, mesh: Mesh, rules=sharding.DEFAULT_RULES):
    """The `TrainState` of shardings for `trainer` (a `unipic_jax.train.loop.Trainer`) on `mesh`:
    params by `sharding.param_shardings`, Adam moments and EMA like their param, the rest replicated."""
    params = jax.eval_shape(lambda p: p, trainer.initial_params)
    return trainer.state_shardings(sharding.param_shardings(params, mesh, rules), replicated(mesh))


def sharded_train_step(trainer, mesh: Mesh, batch: PyTree, rules=sharding.DEFAULT_RULES,
                       state: Optional[PyTree] = None) -> ShardedStep:
    """`trainer.train_step` under `jax.jit` on `mesh`: in/out shardings for the state (donated),
    the batch (`batch`: arrays or ShapeDtypeStructs of the global shapes) and the key (replicated);
    metrics come back replicated. `state` overrides `train_state_shardings`. The step is traced
    with `mesh` as the abstract mesh, so activation constraints (`sharding.constrain`) apply."""
    state = train_state_shardings(trainer, mesh, rules) if state is None else state
    batch = batch_shardings(mesh, batch, rules)
    rng = replicated(mesh)

    def train_step(state, batch, rng):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # activates `sharding.constrain`
            return trainer.train_step(state, batch, rng)

    jitted = jax.jit(train_step, in_shardings=(state, batch, rng), out_shardings=(state, rng), donate_argnums=(0,))
    return ShardedStep(jitted, state, batch, rng)


def sharded_trainer(config, mesh: Mesh, params: Optional[PyTree] = None, rules=sharding.DEFAULT_RULES):
    """A `Trainer` for stage `config` whose params, state and batches live on `mesh`.

    Params: `params` (host arrays), else the checkpoint `config.init_from` restored straight into
    the target shardings, else the random init of `config.seed` copied shard by shard. Batches
    from the data pipeline (this process's rows) become global arrays (`global_batch`).
    """
    from unipic_jax import checkpoint
    from unipic_jax.models.unipic import UniPicConfig, param_shapes
    from unipic_jax.train import loop

    shapes = param_shapes(UniPicConfig.from_config(config.model))
    param_sh = sharding.param_shardings(shapes, mesh, rules)
    if params is not None:
        params = place(params, param_sh)
    elif config.get("init_from", ""):
        _, params = checkpoint.load(config.init_from, sharding=param_sh)
    else:
        params = place(loop.init_train_params(UniPicConfig.from_config(config.model), config.seed), param_sh)
    plain = loop.Trainer(config, params=params)  # the optimiser, to derive the state's shardings
    state_sh = plain.state_shardings(param_sh, replicated(mesh))
    return loop.Trainer(config, params=params, batch_sharding=lambda b: global_batch(b, mesh, rules),
                        state_sharding=state_sh)


def train_main(config_spec: str, data_spec: str, workdir: str, overrides=(), *, mesh: str = "fsdp=-1",
               progress: bool = True):
    """What `unipic-jax train --mesh ...` (or a multi-process `train`) runs: the stage config with
    its `--set`s, a `sharded_trainer` on a mesh over every device of every process, and
    `Trainer.run` (each process reads its own share of the data; process 0 logs)."""
    from unipic_jax.train import data as data_lib
    from unipic_jax.train import loop, optim

    config = loop.apply_overrides(loop.load_stage_config(config_spec), overrides)
    sources = data_lib.parse_data_spec(data_spec)
    grid = sharding.make_mesh(mesh)
    trainer = sharded_trainer(config, grid)
    log.info("training %s on mesh %s (%d processes): %d of %d params trainable", config.stage,
             dict(grid.shape), jax.process_count(), optim.count_params(trainer.initial_params, trainer.trainable),
             optim.count_params(trainer.initial_params))
    with jax.set_mesh(grid):  # the step is traced with the mesh: activation constraints apply
        return trainer.run(workdir, sources, progress=progress)
