"""Ahead-of-time compilation for TPU pods and GPUs on a CPU-only host: does a program fit, and what does it cost?

    unipic-jax compile --config unipic_1p5b --topology v5e:16x16 --train --stage sft --batch 256 \\
        --resolution 512 --mesh fsdp=64,tensor=4

builds the compile-only devices of a TPU topology (libtpu's compiler, no TPU attached), a mesh
over them, lowers the full-size program with `jax.jit(..., in_shardings, out_shardings, donate)`
on `jax.ShapeDtypeStruct`s that carry their shardings (nothing is allocated) and compiles it
with the real TPU compiler. It reports, per chip: argument + output - alias + temp bytes
(MaxText's "total memory"), XLA's peak estimate, FLOPs and the collectives in the optimised HLO.
An HBM overflow is the compiler's `RESOURCE_EXHAUSTED`, reported as `CompileOOM` (one line).

Programs: `--train` compiles the stage's train step (`distributed.sharded_train_step`: the
state donated, the batch split over the "batch" rule); otherwise the text-to-image sampler's two
heaviest step programs at the largest slot counts of its schedule (MAR encoder + LLM + MAR
decoder, and the diffusion head's reverse chain).

Topologies are libtpu names ("v5e:16x16", "v5:4x4x4", also "v5p:4x4x4", "v6e:16x16",
"v4:2x2x1") or slice names ("v5e-256", "v5litepod-256", "v6e-256", "v5p-128", "v4-8"; for v4 and
v5p the number counts TensorCores, two per chip). The topology needs MaxText's extra arguments
(`TopologySpec`): chip_config_name ("megacore" on v4/v5p: one device per chip), the 2x2 chips
per host, and the torus wrap-around of full-pod dimensions (without it the compiler plans
different collectives). `num_slices` > 1 adds data parallelism over DCN (a hybrid mesh: the
`data` axis spans the slices).

Needs libtpu (`pip install "jax[tpu]==0.10.2"`); without it every entry point raises
`AotUnavailable` with that instruction. The runtime backend stays the CPU. Caveat:
`cost_analysis()["flops"]` counts the body of a while loop (`lax.scan`, `fori_loop`) once, not
once per trip.

GPU targets are presets (`GPU_PRESETS`: "h100", "a100", "a6000", "gpu24"), with "xN" for N GPUs of
one host ("h100x8"): XLA's description of the card (a `GpuTargetConfigProto` from openxla/xla,
shipped in `unipic_jax/gpu_targets/`) gives compile-only CUDA devices to the CUDA PJRT plugin's
compiler (`pip install -e ".[gpu-aot]"`; no GPU or driver needed). That compiler does not refuse
a program larger than the card (it only logs warnings), so `compile_command` compares each total
with the card's memory itself and raises `CompileOOM` after the reports; its `cost_analysis()`
is empty here, so no FLOPs are reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from unipic_jax import distributed, quant, sharding
from unipic_jax.models import attention

PyTree = Any
GIB = 2 ** 30
INSTALL_HINT = 'TPU AOT compilation needs libtpu: pip install "jax[tpu]==0.10.2" (the "tpu" extra)'
GPU_INSTALL_HINT = ('GPU AOT compilation needs the CUDA plugin and cuDNN: pip install "jax-cuda12-plugin==0.10.2" '
                    '"nvidia-cudnn-cu12==9.28.0.42" (the "gpu-aot" extra)')
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


class AotUnavailable(RuntimeError):
    """libtpu (TPU) or the CUDA plugin (GPU) is not installed, so the target cannot be built."""


class CompileOOM(RuntimeError):
    """The program is too large for a chip's memory (one line): the TPU compiler's message, or the
    comparison `compile_command` makes for GPU targets."""


# ----------------------------------------------------------------------------------------------
# Topologies


@dataclasses.dataclass(frozen=True)
class TopologySpec:
    """The arguments of `topologies.get_topology_desc` for one TPU slice shape."""

    name: str  # libtpu's name, e.g. "v5e:16x16"
    chip_config_name: str  # "megacore" (v4, v5p: one device per chip) or "default"
    chips_per_host_bounds: tuple[int, int, int]
    wrap: tuple[bool, bool, bool]
    num_slices: int = 1
    platform = "tpu"
    device_memory = None  # the TPU compiler refuses programs that do not fit

    @property
    def chips_per_slice(self) -> int:
        return math.prod(int(d) for d in self.name.split(":")[1].split("x"))

    def describe(self, devices: Sequence) -> str:
        """The header line of `compile`'s output for `devices` of this topology."""
        return (f"topology {self.name} x {self.num_slices} slice(s): {len(devices)} {devices[0].device_kind} "
                f"devices (chip config {self.chip_config_name}, wrap {self.wrap})")


# Generation -> (libtpu prefix, number of dimensions, chip config, TensorCores per chip in slice names).
_GENERATIONS = {
    "v4": ("v4", 3, "megacore", 2),
    "v5p": ("v5", 3, "megacore", 2),
    "v5": ("v5", 3, "megacore", 2),
    "v5e": ("v5e", 2, "default", 1),
    "v5litepod": ("v5e", 2, "default", 1),
    "v6e": ("v6e", 2, "default", 1),
}
# Chips of a slice -> its shape, for slice names (the shapes Cloud TPU offers).
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
              256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
_FORMS = ("GEN:AxB for v5e/v6e (e.g. v5e:16x16), GEN:AxBxC for v4/v5p (e.g. v5:4x4x4), or a slice "
          "name such as v5e-256 or v5p-128")


def parse_topology(text: str, num_slices: int = 1) -> "TopologySpec | GpuTarget":
    """A `TopologySpec` from a libtpu topology name or a Cloud TPU slice name, or a `GpuTarget` from a
    GPU preset name ("h100", "h100x8"; `parse_gpu_target`); ValueError otherwise."""
    text = text.strip().lower()
    gpu = _GPU_NAME.fullmatch(text)
    if gpu and gpu.group(1) in GPU_PRESETS:
        return parse_gpu_target(text, num_slices)
    match = re.fullmatch(r"([a-z0-9]+)[:=_]([0-9]+(?:x[0-9]+)*)", text)
    if match:
        gen, dims = match.group(1), tuple(int(d) for d in match.group(2).split("x"))
    else:
        match = re.fullmatch(r"([a-z0-9]+)-([0-9]+)", text)
        if not match or match.group(1) not in _GENERATIONS:
            raise ValueError(f"topology {text!r}: want {_FORMS}")
        gen = match.group(1)
        _, ndim, _, cores = _GENERATIONS[gen]
        chips, rest = divmod(int(match.group(2)), cores)
        dims = (_SHAPES_2D if ndim == 2 else _SHAPES_3D).get(chips) if not rest else None
        if dims is None:
            raise ValueError(f"topology {text!r}: no standard {gen} slice of that size; give its shape as {_FORMS}")
    if gen not in _GENERATIONS:
        raise ValueError(f"topology {text!r}: generation {gen!r} is not one of {sorted(_GENERATIONS)} "
                         f"(GPU presets: {', '.join(GPU_PRESETS)}, with xN for N GPUs)")
    prefix, ndim, chip_config, _ = _GENERATIONS[gen]
    if len(dims) != ndim or min(dims) < 1:
        raise ValueError(f"topology {text!r}: {gen} slices have {ndim} dimensions; want {_FORMS}")
    if num_slices < 1:
        raise ValueError(f"num_slices {num_slices}: must be at least 1")
    bounds = (min(2, dims[0]), min(2, dims[1]), 1)
    if ndim == 2:  # a 16-chip dimension is a whole v5e/v6e pod side, closed into a ring
        wrap = (dims[0] == 16, dims[1] == 16, False)
    else:  # v4/v5p: whole 4x4x4 cubes are tori
        wrap = (all(d % 4 == 0 for d in dims),) * 3
    return TopologySpec(f"{prefix}:{'x'.join(map(str, dims))}", chip_config, bounds, wrap, num_slices)


def topology_devices(spec: "TopologySpec | GpuTarget") -> list:
    """The compile-only devices of `spec` (all slices). Raises `AotUnavailable` without libtpu (or,
    for a `GpuTarget`, without the CUDA plugin)."""
    from jax.experimental import topologies

    if isinstance(spec, GpuTarget):
        return gpu_devices(spec)
    if importlib.util.find_spec("libtpu") is None:
        raise AotUnavailable(INSTALL_HINT)
    try:
        topo = topologies.get_topology_desc(
            platform="tpu", topology_name=spec.name, chip_config_name=spec.chip_config_name,
            chips_per_host_bounds=spec.chips_per_host_bounds, num_slices=spec.num_slices, wrap=spec.wrap)
    except RuntimeError as e:
        if "TPU support not installed" in str(e):
            raise AotUnavailable(INSTALL_HINT) from None
        raise ValueError(f"topology {spec.name}: {_first_line(e)}") from None
    return list(topo.devices)


def topology_mesh(spec: TopologySpec, mesh_spec: str | Mapping[str, int], devices: Optional[Sequence] = None) -> Mesh:
    """A mesh with axes `sharding.MESH_AXES` over the topology's devices. With several slices the
    `data` axis is split as (slices x data per slice) over DCN and the rest stays inside a slice."""
    devices = topology_devices(spec) if devices is None else list(devices)
    if spec.num_slices == 1:
        return sharding.make_mesh(mesh_spec, devices=devices)
    from jax.experimental import mesh_utils

    sizes = sharding.parse_mesh_spec(mesh_spec, len(devices))
    if sizes["data"] % spec.num_slices:
        raise ValueError(f"mesh {mesh_spec!r}: data={sizes['data']} must be a multiple of the "
                         f"{spec.num_slices} slices (data parallelism spans the slices)")
    ici = (sizes["data"] // spec.num_slices, sizes["fsdp"], sizes["tensor"])
    grid = mesh_utils.create_hybrid_device_mesh(ici, (spec.num_slices, 1, 1), devices,
                                                allow_split_physical_axes=True)
    return Mesh(grid, sharding.MESH_AXES)


# ----------------------------------------------------------------------------------------------
# GPU targets

GPU_TARGETS_DIR = Path(__file__).parent / "gpu_targets"
# Preset -> (XLA target config under gpu_targets/, device memory in bytes replacing the file's or None).
GPU_PRESETS: dict[str, tuple[str, Optional[int]]] = {
    "h100": ("h100_sxm.txtpb", None),  # H100 SXM 80 GB, sm_90
    "a100": ("a100_sxm_80.txtpb", None),  # A100 SXM 80 GB, sm_80
    "a6000": ("a6000.txtpb", None),  # RTX A6000 48 GB, sm_86
    # 24 GB class: openxla/xla publishes no target config of a 24 GB card, so this is the A6000's
    # description (GA102, also the chip of the RTX 3090 24 GB; the RTX 4090 is a newer AD102) with
    # 24 GiB of device memory: only the memory size is changed, not the card's other figures.
    "gpu24": ("a6000.txtpb", 24 * GIB),
}
MAX_GPUS_PER_HOST = 8
_GPU_NAME = re.compile(r"([a-z0-9]+?)(?:x([0-9]+))?")  # "h100", "h100x8"
# Fields of newer openxla/xla target configs that jaxlib 0.10.2's GpuTargetConfigProto lacks: with
# any of them the whole text fails to parse ("Failed to parse GpuTargetConfigProto"), so they are
# dropped (they describe the interconnect and scheduling limits, not the memory).
_NEWER_GPU_FIELDS = ("device_interconnect_info", "collective_memory_granularity", "mem_clock_ghz",
                     "reserved_shared_memory_per_block", "max_blocks_per_multiprocessor")


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """`devices` GPUs of one host, all the card XLA's target config `config_file` describes."""

    name: str  # the preset, e.g. "h100"
    config_file: str  # under gpu_targets/
    devices: int = 1
    memory_bytes: Optional[int] = None  # replaces the config's device_memory_size
    num_slices: int = 1  # one host, no DCN
    platform = "cuda"

    def config_text(self) -> str:
        """The target config as jaxlib 0.10.2 parses it (newer fields dropped, memory replaced)."""
        text = (GPU_TARGETS_DIR / self.config_file).read_text()
        for field in _NEWER_GPU_FIELDS:
            text = re.sub(rf"^[ \t]*{field}\s*\{{[^}}]*\}}\s*\n", "", text, flags=re.M)
            text = re.sub(rf"^[ \t]*{field}\s*:.*\n", "", text, flags=re.M)
        if self.memory_bytes is not None:
            text = re.sub(r"device_memory_size: \d+", f"device_memory_size: {self.memory_bytes}", text)
        return text

    @functools.cached_property
    def device_memory(self) -> int:
        """Bytes of memory per GPU (the config's device_memory_size, or the preset's; read once)."""
        return int(re.search(r"device_memory_size: (\d+)", self.config_text()).group(1))

    def describe(self, devices: Sequence) -> str:
        """The header line of `compile`'s output for `devices` of this target."""
        return (f"GPU target {self.name}: {len(devices)} {devices[0].device_kind} device(s) with "
                f"{_gib(self.device_memory)} each (XLA target config {self.config_file}"
                + (", memory size set by the preset" if self.memory_bytes else "") + ")")


def parse_gpu_target(text: str, num_slices: int = 1) -> GpuTarget:
    """A `GpuTarget` from "PRESET" or "PRESETxN" (N GPUs of one host, 1 to 8); ValueError otherwise."""
    match = _GPU_NAME.fullmatch(text.strip().lower())
    if not match or match.group(1) not in GPU_PRESETS:
        raise ValueError(f"topology {text!r}: GPU presets are {', '.join(GPU_PRESETS)}, with xN for N GPUs")
    count = int(match.group(2) or 1)
    if not 1 <= count <= MAX_GPUS_PER_HOST:
        raise ValueError(f"topology {text!r}: 1 to {MAX_GPUS_PER_HOST} GPUs (one host)")
    if num_slices != 1:
        raise ValueError(f"num_slices {num_slices}: GPU presets are one host (slices are TPU's)")
    config_file, memory = GPU_PRESETS[match.group(1)]
    return GpuTarget(match.group(1), config_file, count, memory)


def gpu_devices(target: GpuTarget) -> list:
    """The compile-only CUDA devices of `target`. Raises `AotUnavailable` without the CUDA plugin
    and cuDNN (the sampler's attention lowers to cuDNN's kernel)."""
    from jax.experimental import topologies

    if importlib.util.find_spec("jax_cuda12_plugin") is None or importlib.util.find_spec("nvidia.cudnn") is None:
        raise AotUnavailable(GPU_INSTALL_HINT)
    # Without a CUDA driver the plugin refuses to start unless told to skip its version checks
    # (jax_plugins/xla_cuda12/__init__.py reads this when it starts; JAX_PLATFORMS=cpu skips them too).
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=target.config_text(),
                                            topology=f"1x1x{target.devices}")  # partitions x hosts x GPUs
    except NotImplementedError:  # the plugin failed to start with JAX's backends, before the variable was set
        raise AotUnavailable("the CUDA plugin did not start in this process: set JAX_PLATFORMS=cpu (or "
                             "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1) before JAX starts") from None
    return list(topo.devices)


# ----------------------------------------------------------------------------------------------
# Programs: a jitted function and its abstract arguments


@dataclasses.dataclass
class Program:
    """`jitted.lower(*static, *args)` compiles it (`static`: leading static arguments), traced
    with `mesh` as the abstract mesh (so `sharding.constrain` applies); `parts` names per-device
    argument bytes worth reporting, `notes` warnings about the placement."""

    name: str
    jitted: Callable
    args: tuple
    static: tuple = ()
    mesh: Optional[Mesh] = None
    parts: dict[str, int] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)


def _shard_bytes(tree: PyTree) -> int:
    """Bytes one device holds of the ShapeDtypeStructs in `tree` (each with a NamedSharding)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += quant.leaf_bytes(jax.ShapeDtypeStruct(shape, leaf.dtype))  # int4: half a byte
    return total


def _with(shapes: PyTree, shardings: PyTree) -> PyTree:
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def abstract_batch(config) -> dict:
    """The global batch of stage `config` as ShapeDtypeStructs, {task: {field: struct}}, at the
    longest length bucket: what the data pipeline (`train.data.make_dataset`) yields, less
    `num_skipped`."""
    from unipic_jax.train import data

    d = config.data
    out = {}
    for task in data.active_tasks(config):
        rows, length = d.batch_size[task], max(d.buckets[task])
        side = d.und_resolution if task == "und" else d.gen_resolution
        image = jax.ShapeDtypeStruct((rows, side, side, 3), np.float32)
        tokens = {"input_ids": jax.ShapeDtypeStruct((rows, length), np.int32),
                  "attention_mask": jax.ShapeDtypeStruct((rows, length), np.bool_)}
        if task == "t2i":
            out[task] = {"image": image, **tokens}
        elif task == "edit":
            out[task] = {"source": image, "target": image, **tokens}
        else:
            out[task] = {"image": image, **tokens, "labels": jax.ShapeDtypeStruct((rows, length), np.int32)}
    return out


def _unsplit_batch_notes(batch: PyTree, mesh: Mesh, rules) -> list[str]:
    """One note per task whose rows the data and fsdp axes cannot all split (those chips repeat work)."""
    sizes = dict(mesh.shape)
    want = {a for a in ("data", "fsdp") if sizes.get(a, 1) > 1}
    notes = []
    for task, fields in batch.items():
        leaf = next(iter(fields.values()))
        spec = sharding.batch_sharding(mesh, leaf.shape, rules).spec
        used = {a for e in spec if e for a in ((e,) if isinstance(e, str) else e)}
        if want - used:
            notes.append(f"{task}: {leaf.shape[0]} rows are not split over {sorted(want - used)} "
                         f"(make each task's batch a multiple of data x fsdp = "
                         f"{math.prod(sizes[a] for a in want)})")
    return notes


def train_program(config, mesh: Mesh, rules=sharding.DEFAULT_RULES) -> Program:
    """The train step of stage `config` on `mesh`, on abstract state and batch (nothing allocated)."""
    from unipic_jax.models.unipic import UniPicConfig, param_shapes
    from unipic_jax.train import loop

    trainer = loop.Trainer(config, params=param_shapes(UniPicConfig.from_config(config.model)))
    batch = abstract_batch(config)
    step = distributed.sharded_train_step(trainer, mesh, batch, rules)
    state = jax.eval_shape(lambda p: loop.init_state(p, trainer.tx, trainer.trainable, trainer.ema_decay),
                           trainer.initial_params)
    state = _with(state, step.state)
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=step.rng)
    parts = {"params": _shard_bytes(state.params), "optimizer state": _shard_bytes(state.opt_state),
             "ema": _shard_bytes(state.ema) if state.ema is not None else 0,
             "batch": _shard_bytes(_with(batch, step.batch))}
    return Program(f"train step ({config.stage})", step.jitted, (state, _with(batch, step.batch), rng), mesh=mesh,
                   parts=parts, notes=_unsplit_batch_notes(batch, mesh, rules))


def sampler_programs(model_config, mesh: Mesh, *, batch: int, resolution: int, num_iter: int = 32,
                     cfg: float = 3.0, prompt_length: int = 64, dtype: str = "bfloat16",
                     rules=sharding.DEFAULT_RULES, quantize: Optional[str] = None) -> list[Program]:
    """The text-to-image sampler's heaviest per-step programs (`sampling.t2i`) for `batch` images
    at `resolution` px: the conditioning pass (MAR encoder on the most visible tokens + LLM on the
    prompt cache + MAR decoder) and the diffusion head's chain on the most predicted tokens.
    Params float32 (as stored), placed by `param_shardings`; rows and the KV cache over the batch.
    `quantize` ("int8", "int4"): the weights as `from_pretrained(quantize=...)` holds them
    (`unipic_jax.quant`); the quantized kernels (values and scales) are replicated."""
    import jax.numpy as jnp

    from unipic_jax.models.qwen2 import KVCache
    from unipic_jax.models.unipic import UniPic, UniPicConfig, cast_params, param_shapes
    from unipic_jax.sampling import t2i
    from unipic_jax.sampling.schedule import mask_schedule

    config = UniPicConfig.from_config(model_config)
    model = UniPic(config, jnp.dtype(dtype))
    # The weights as `from_pretrained` holds them: cast to the compute dtype once at load.
    shapes = jax.eval_shape(lambda p: cast_params(p, model.dtype), param_shapes(config))
    params = sharding.sharded_abstract(shapes, mesh, rules)
    if quantize is not None:
        params = jax.tree.map(lambda x: x if getattr(x, "sharding", None) is not None else
                              jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=distributed.replicated(mesh)),
                              quant.quantize_params(params, quantize))
    side = resolution // (config.mar.vae_stride * config.mar.patch_size)
    grid, num_tokens = (side, side), side * side
    guided = cfg != 1.0
    rows = 2 * batch if guided else batch
    steps = mask_schedule(num_tokens, num_iter)
    slots = t2i.DEFAULT_BUCKETS.slots(steps)
    visible, predicted = max(v for v, _ in slots), max(p for _, p in slots)

    def rowwise(shape, dtype_):
        return jax.ShapeDtypeStruct(shape, dtype_, sharding=sharding.batch_sharding(mesh, shape, rules))

    def whole(shape, dtype_):
        return jax.ShapeDtypeStruct(shape, dtype_, sharding=distributed.replicated(mesh))

    cache = jax.eval_shape(lambda: KVCache.create(config.qwen2, rows, prompt_length, model.dtype))
    cache = _with(cache, sharding.kv_cache_shardings(cache, mesh, rules))
    token_dim = config.mar.token_dim
    tokens = rowwise((rows, num_tokens, token_dim), np.float32)
    orders = rowwise((batch, num_tokens), np.int32)
    counts = whole((2,), np.int32)
    condition = t2i._ConditionPlan(grid, visible, predicted, t2i.DEFAULT_BUCKETS.pads_visible, guided, False)
    tables = jax.tree.map(lambda x: whole(np.shape(x), np.asarray(x).dtype), t2i._tables(config.diffusion))
    halves = 2 if guided else 1
    chain = rowwise((tables.num_steps, halves * batch * predicted, token_dim), np.float32)
    z_sel = rowwise((rows * predicted, config.mar.decoder_dim), model.dtype)  # `_condition`'s output
    name = f"{batch} image(s) at {resolution} px, cfg {cfg:g}, {num_iter} steps"
    return [
        Program(f"sampler condition ({name}; {visible} visible slots)",
                t2i._condition, (params, tokens, orders, cache, None, counts), (model, condition), mesh,
                {"params": _shard_bytes(params), "kv cache": _shard_bytes(cache)}),
        Program(f"sampler diffusion chain ({name}; {predicted} predicted slots)",
                t2i._predict,
                (params, tables, tokens, z_sel, orders, counts, rowwise((batch * predicted, token_dim), np.float32),
                 chain, whole((), np.float32), whole((), np.float32)),
                (model, t2i._PredictPlan(predicted, guided, False)), mesh, {"params": _shard_bytes(params)}),
    ]


# ----------------------------------------------------------------------------------------------
# Compiling and reporting


@dataclasses.dataclass
class Report:
    """Per-device figures of one compiled program (bytes, FLOPs, counts)."""

    name: str
    compile_seconds: float
    argument: int
    output: int
    alias: int
    temp: int
    peak: Optional[int]
    generated_code: int
    flops: Optional[float]  # None: the compiler reports no cost analysis (GPU)
    bytes_accessed: Optional[float]
    collectives: dict[str, int]
    kernels: dict[str, int]
    parts: dict[str, int]
    notes: list[str]
    device_memory: Optional[int] = None  # GPU targets: the card's memory, which their compiler does not check

    @property
    def total(self) -> int:
        """argument + output - alias + temp: what the chip must hold (MaxText's total memory)."""
        return self.argument + self.output - self.alias + self.temp

    @property
    def fits(self) -> bool:
        """Whether `total` fits in `device_memory` (True when that is unknown: TPU compilers refuse)."""
        return self.device_memory is None or self.total <= self.device_memory


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _oom_message(e: BaseException) -> Optional[str]:
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    line = next((l for l in text.splitlines() if "RESOURCE_EXHAUSTED" in l or "memory" in l), text)
    return line.split("RESOURCE_EXHAUSTED:", 1)[-1].strip()


def count_collectives(hlo_text: str) -> dict[str, int]:
    """How many of each cross-device collective the optimised HLO holds (async starts counted once)."""
    counts = {}
    for op in COLLECTIVES:
        counts[op] = len(re.findall(rf"= \S+ {op}(?:-start)?\(", hlo_text))
    return counts


def count_kernels(lowered_text: str, compiled_text: str = "") -> dict[str, int]:
    """Custom kernels in a program, the attention kernels `models/attention.py` picked for the
    target: Pallas / Mosaic ones by kernel name in the lowered program, cuDNN's by custom call
    target in the compiled one (jax partitions them itself: unsharded, they appear only there)."""
    counts: dict[str, int] = {}
    names = re.findall(r'kernel_name\s*=\s*"([^"]+)"', lowered_text)
    names += re.findall(r'custom_call_target="(__cudnn\$\w+)"', compiled_text)
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return counts


def compile_program(program: Program, platform: Optional[str] = None) -> Report:
    """Lower and compile `program` for `platform` (default: its mesh's; compile-only CUDA devices
    say "gpu", so pass the spec's "cuda"); raises `CompileOOM` (one line) when the TPU compiler
    finds it too large."""
    start = time.perf_counter()
    try:
        mesh = program.mesh
        platform = platform or (mesh.devices.flat[0].platform if mesh else jax.default_backend())
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if mesh else contextlib.nullcontext(), \
                attention.target(platform):  # the target's attention kernel, not the host's
            lowered = program.jitted.lower(*program.static, *program.args)
        compiled = lowered.compile()
    except Exception as e:  # XlaRuntimeError / JaxRuntimeError, raised by libtpu's compiler
        message = _oom_message(e)
        if message is None:
            raise
        raise CompileOOM(f"{program.name}: does not fit in HBM: {message}") from None
    seconds = time.perf_counter() - start
    memory, hlo = compiled.memory_analysis(), compiled.as_text()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    return Report(
        name=program.name, compile_seconds=seconds, argument=memory.argument_size_in_bytes,
        output=memory.output_size_in_bytes, alias=memory.alias_size_in_bytes, temp=memory.temp_size_in_bytes,
        peak=getattr(memory, "peak_memory_in_bytes", None), generated_code=memory.generated_code_size_in_bytes,
        flops=float(cost.get("flops", 0.0)) if cost else None,
        bytes_accessed=float(cost.get("bytes accessed", 0.0)) if cost else None,
        collectives=count_collectives(hlo), kernels=count_kernels(lowered.as_text(), hlo),
        parts=dict(program.parts), notes=list(program.notes))


def _gib(n: float) -> str:
    return f"{n / GIB:.3f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.2f} MiB"


def format_report(r: Report) -> str:
    lines = [f"{r.name}: compiled in {r.compile_seconds:.1f} s",
             f"  per chip: total {_gib(r.total)} = argument {_gib(r.argument)} + output {_gib(r.output)} "
             f"- alias {_gib(r.alias)} + temp {_gib(r.temp)}"
             + (f"; XLA peak estimate {_gib(r.peak)}" if r.peak else "")]
    if r.parts:
        lines.append("  inputs per chip, whole (the program reads the parts it uses): "
                     + ", ".join(f"{k} {_gib(v)}" for k, v in r.parts.items()))
    if r.device_memory is not None:
        lines.append(f"  device memory {_gib(r.device_memory)}: {'fits' if r.fits else 'does not fit'} "
                     f"({100 * r.total / r.device_memory:.1f} % of it; the compiler does not check this)")
    if r.flops is None:
        lines.append("  flops: not reported (this compiler gives no cost analysis)")
    else:
        lines.append(f"  flops per chip {r.flops:.4g}, bytes accessed {r.bytes_accessed:.4g} "
                     f"(XLA counts a loop body once, not once per trip)")
    lines.append("  collectives: " + ", ".join(f"{k} {v}" for k, v in r.collectives.items()))
    if r.kernels:
        lines.append("  kernels: " + ", ".join(f"{k} x{v}" for k, v in r.kernels.items()))
    lines += [f"  note: {n}" for n in r.notes]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The `compile` command


def set_resolution(config, gen_resolution: Optional[int] = None, und_resolution: Optional[int] = None):
    """Stage `config` with other image sides: the edit and understanding rows (whose `<image>`
    ids grow with the side) get their maximum lengths and single length buckets recomputed."""
    from configs.stages import image_tokens

    d, mar = config.data, config.model.mar
    text, answer = d.max_length.t2i, d.answer_slots
    if gen_resolution:
        d.gen_resolution = int(gen_resolution)
        d.max_length.edit = image_tokens(d.gen_resolution, mar) + text
        d.buckets.edit = (d.max_length.edit,)
    if und_resolution:
        d.und_resolution = int(und_resolution)
        d.max_length.und = image_tokens(d.und_resolution, mar) + text + answer
        d.buckets.und = (d.max_length.und,)
    return config


def stage_for_compile(stage: str, model_config=None, *, batch: Optional[int] = None,
                      resolution: Optional[int] = None, und_resolution: Optional[int] = None,
                      dtype: Optional[str] = None):
    """Stage config "NAME[:ARG]" (configs/stages) with its model replaced by `model_config` (if
    given), the global `batch` split by the stage's task ratio, and other image sides."""
    from unipic_jax.train import loop

    name, _, arg = stage.partition(":")
    if batch:
        arg = ",".join(filter(None, [arg, f"batch={batch}"]))
    config = loop.load_stage_config(f"{name}:{arg}" if arg else name)
    if model_config is not None:
        config.model = model_config
    if dtype:
        config.model.dtype = dtype
    return set_resolution(config, resolution, und_resolution)


def compile_command(topology: str, *, model_config, mesh: str = "fsdp=-1", train: bool = False,
                    stage: str = "sft", batch: Optional[int] = None, resolution: Optional[int] = None,
                    und_resolution: Optional[int] = None, num_iter: int = 32, dtype: str = "bfloat16",
                    num_slices: int = 1, echo: Callable[[str], None] = print,
                    quantize: Optional[str] = None) -> list[Report]:
    """What `unipic-jax compile` runs: build the topology (TPU) or GPU target and the mesh, compile
    the train step (`train`) or the sampler's heaviest step programs, and `echo` each report. Raises
    `AotUnavailable`, `CompileOOM` (the first program that does not fit; for a GPU target after all
    the reports) or ValueError (bad names or sizes)."""
    if train and quantize:
        raise ValueError("--quantize compiles the sampler (weight-only inference), not --train")
    spec = parse_topology(topology, num_slices)
    devices = topology_devices(spec)
    grid = topology_mesh(spec, mesh, devices)
    sizes = " ".join(f"{a}={n}" for a, n in grid.shape.items())
    echo(f"{spec.describe(devices)}; mesh {sizes}")
    if train:
        config = stage_for_compile(stage, model_config, batch=batch, resolution=resolution,
                                   und_resolution=und_resolution, dtype=dtype)
        d = config.data
        echo(f"stage {config.stage}: global batch {dict(d.batch_size)}, generation {d.gen_resolution} px, "
             f"understanding {d.und_resolution} px, text lengths {dict(d.max_length)}, compute "
             f"{config.model.dtype}, remat {config.remat}")
        programs = [train_program(config, grid)]
    else:
        side = resolution or 1024
        echo(f"sampler: {batch or 1} image(s) at {side} px, {num_iter} MAR steps, compute {dtype}"
             + (f", {quantize} weights" if quantize else ""))
        programs = sampler_programs(model_config, grid, batch=batch or 1, resolution=side, num_iter=num_iter,
                                    dtype=dtype, quantize=quantize)
    reports = []
    for program in programs:
        report = dataclasses.replace(compile_program(program, spec.platform), device_memory=spec.device_memory)
        echo(format_report(report))
        reports.append(report)
    if train:
        echo(_plan_comparison(config, grid))
    too_big = next((r for r in reports if not r.fits), None)
    if too_big is not None:
        raise CompileOOM(f"{too_big.name}: does not fit in device memory: total {_gib(too_big.total)} > "
                         f"{_gib(too_big.device_memory)} of {devices[0].device_kind} ({spec.name})")
    return reports


def _plan_comparison(config, mesh: Mesh) -> str:
    """The planner's per-device figures for the same model and mesh (shapes only), to set beside
    the compiled program's arguments."""
    from unipic_jax import plan

    trainable = {t.split("/")[0] for t in config.optim.trainable}
    abstract = plan.abstract_params(config.model)
    frozen = tuple(k for k in abstract if k not in trainable)
    p = plan.plan(abstract, dict(mesh.shape), train=True, frozen=frozen)
    groups = ", ".join(f"{name} {_gib(device)}" for name, (_, device) in p.groups.items())
    return f"plan on the same mesh (shapes only; frozen: {', '.join(frozen)}): {groups}"
