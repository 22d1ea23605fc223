"""The memory planner: per-device bytes of params, optimizer state and EMA on a mesh, from shapes only.

The param tree comes from `jax.eval_shape` of the UniPic init; each param's sharding is
`sharding.param_specs` on a `jax.sharding.AbstractMesh` built from the mesh spec, and its
per-device bytes come from `NamedSharding(abstract_mesh, spec).shard_shape`. No device is used
and nothing is allocated, so a 256-device plan runs on a laptop.

Training state (`train=True`), per trainable param: the float32 master param, AdamW m and v
(float32, placed like the param) and an EMA copy (float32). Gradients and activations are
transient and not counted. The VAE is always frozen and SigLIP2 never receives a gradient
(reference-spec §1.4, §11.4), so `TRAIN_FROZEN` leaves them out of m, v and EMA.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from unipic_jax import sharding

PyTree = Any
TRAIN_FROZEN = ("vae", "siglip2")
GIB = 2 ** 30


def abstract_params(config) -> PyTree:
    """The full UniPic param tree of ConfigDict `config` as ShapeDtypeStructs (nothing allocated)."""
    from unipic_jax.models.unipic import UniPicConfig, param_shapes

    return param_shapes(UniPicConfig.from_config(config))


def abstract_mesh(mesh: str | Mapping[str, int]) -> AbstractMesh:
    """An AbstractMesh (no devices) from a mesh spec such as "data=1,fsdp=4,tensor=2"; the device
    count is the product of the sizes, so -1 is not accepted here."""
    sizes = sharding.parse_mesh_spec(mesh)
    if any(n == -1 for n in sizes.values()):
        raise ValueError(f"mesh {mesh!r}: a plan takes explicit sizes (no -1)")
    return AbstractMesh(tuple(sizes.values()), tuple(sizes))


class Placement(NamedTuple):
    """One param on the mesh: its spec, whole and per-device bytes, and the dimensions kept whole
    because no rule's mesh axes divided them."""

    path: str
    shape: tuple[int, ...]
    spec: PartitionSpec
    itemsize: int
    nbytes: int
    device_bytes: int
    fallbacks: tuple[sharding.Fallback, ...]

    @property
    def replicated(self) -> bool:
        return self.device_bytes == self.nbytes


@dataclasses.dataclass
class Plan:
    """`groups`: name -> (total bytes, per-device bytes); `placements`: every param."""

    mesh: dict[str, int]
    placements: list[Placement]
    groups: dict[str, tuple[int, int]]

    @property
    def num_devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def total(self) -> tuple[int, int]:
        return (sum(t for t, _ in self.groups.values()), sum(d for _, d in self.groups.values()))


def placements(abstract: PyTree, mesh: AbstractMesh, rules=sharding.DEFAULT_RULES) -> list[Placement]:
    """Every param of `abstract` (the UniPic tree) placed on `mesh`, in tree order."""
    names = jax.tree.leaves(sharding.logical_axes(abstract))
    out = []
    for (path, leaf), logical in zip(jax.tree_util.tree_flatten_with_path(abstract)[0], names):
        resolved = sharding.resolve(tuple(logical), leaf.shape, mesh, rules)
        itemsize = np.dtype(leaf.dtype).itemsize
        shard = NamedSharding(mesh, resolved.spec).shard_shape(leaf.shape)
        out.append(Placement(jax.tree_util.keystr(path, simple=True, separator="/"), tuple(leaf.shape),
                             resolved.spec, itemsize, math.prod(leaf.shape) * itemsize, math.prod(shard) * itemsize,
                             resolved.fallbacks))
    return out


def plan(abstract: PyTree, mesh: str | Mapping[str, int], *, train: bool = False,
         frozen: Sequence[str] = TRAIN_FROZEN, rules=sharding.DEFAULT_RULES) -> Plan:
    """Per-device bytes of the params `abstract` (and, with `train`, of AdamW m, v and the EMA over
    the params outside the `frozen` components, all float32) on mesh spec `mesh`."""
    amesh = abstract_mesh(mesh)
    placed = placements(abstract, amesh, rules)

    def group(items, itemsize=None):  # (total, per-device) bytes, stored as `itemsize` if given
        return (sum(p.nbytes // p.itemsize * (itemsize or p.itemsize) for p in items),
                sum(p.device_bytes // p.itemsize * (itemsize or p.itemsize) for p in items))

    dtypes = sorted({str(leaf.dtype) for leaf in jax.tree.leaves(abstract)})
    groups = {f"params ({', '.join(dtypes)})": group(placed)}
    if train:
        trainable = [p for p in placed if p.path.split("/")[0] not in frozen]
        for name in ("adam m", "adam v", "ema"):
            groups[f"{name} (float32)"] = group(trainable, 4)
    return Plan(dict(amesh.shape), placed, groups)


def _gib(n: int) -> str:
    return f"{n / GIB:9.3f} GiB"


def lora_state(abstract: PyTree, rank: int, alpha: float, modules: Optional[str] = None, *,
               frozen: Sequence[str] = TRAIN_FROZEN, quantize: Optional[str] = None, stage=None) -> str:
    """Report lines: the training state of full fine-tuning (float32 params, AdamW m and v, EMA of
    every param outside `frozen`) against LoRA (`quant.lora_rules`): the base weights frozen (in
    float32 as `train` keeps them, or `quantize`d: QLoRA, float32 scales) plus float32 adapters with their m, v and EMA. Whole model.
    With `stage` (a stage config), both use the stage's trainable set (`optim.trainable` minus
    `optim.frozen`, as `train` does) instead of `frozen`."""
    from unipic_jax import quant

    rules = quant.lora_rules(rank, alpha, modules or quant.LORA_MODULES)
    if stage is None:
        adapters = quant.lora_shapes(abstract, rules)
        trainable = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
                     if jax.tree_util.keystr(path[:1], simple=True) not in frozen]
    else:
        from unipic_jax.train import lora, optim

        adapters = lora.adapter_shapes(abstract, stage, lora.Settings(rank, alpha, modules or quant.LORA_MODULES))
        mask = optim.trainable_mask(abstract, tuple(stage.optim.trainable), tuple(stage.optim.get("frozen", ())))
        trainable = [x for x, t in zip(jax.tree.leaves(abstract), jax.tree.leaves(mask)) if t]
    full_state = 4 * sum(quant.leaf_bytes(jax.ShapeDtypeStruct(x.shape, np.float32)) for x in trainable)
    adapter_bytes = quant.tree_bytes(adapters)
    base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.float32), abstract)  # as `train` holds it
    base_bytes = quant.tree_bytes(quant.quantize_params(base, quantize))
    count = sum(int(np.prod(x.shape)) for pair in adapters.values() for x in pair)
    lines = [f"LoRA rank {rank}, alpha {alpha:g} on {len(adapters)} kernels ({modules or quant.LORA_MODULES}"
             f"{', trained by stage ' + stage.stage if stage is not None else ''}): {count:,} adapter params",
             f"{'full fine-tuning: params, m, v, ema (float32)':<52}{_gib(full_state):>16}",
             f"{'LoRA trainable: adapters, m, v, ema (float32)':<52}{_gib(4 * adapter_bytes):>16}"
             f"   {4 * adapter_bytes / full_state:.2%} of full",
             f"{'LoRA frozen base weights (' + (quantize or 'float32') + ')':<52}{_gib(base_bytes):>16}"]
    return "\n".join(lines)


def quantized_weights(abstract: PyTree, quantize: str, dtype=jax.numpy.bfloat16) -> str:
    """The inference weights' bytes (whole model, in `dtype`) against the same weights under
    `unipic_jax.quant.RULES[quantize]` (int values and scales), per component, as report lines."""
    from unipic_jax import quant

    full = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), abstract)
    quantized = quant.quantize_params(full, quantize)
    name = np.dtype(dtype).name
    lines = [f"weights for inference: {name} against --quantize {quantize} (weight-only; whole model, "
             f"int4 packed two to a byte)", f"{'component':<30}{name:>16}{quantize:>16}{'ratio':>9}"]
    for comp in full:
        a, b = quant.tree_bytes(full[comp]), quant.tree_bytes(quantized[comp])
        lines.append(f"{comp:<30}{_gib(a):>16}{_gib(b):>16}{b / a:>9.1%}")
    a, b = quant.tree_bytes(full), quant.tree_bytes(quantized)
    lines.append(f"{'total':<30}{_gib(a):>16}{_gib(b):>16}{b / a:>9.1%}   {b:,} B")
    return "\n".join(lines)


def format_spec(spec: PartitionSpec) -> str:
    """"fsdp, tensor" / "None, data+fsdp": one entry per dimension."""
    entries = [e if e is None or isinstance(e, str) else "+".join(e) for e in spec]
    return ", ".join(str(e) for e in entries) or "()"


def format_plan(p: Plan, *, top: int = 10, title: str = "") -> str:
    """The planner's report: per component, per group, then the largest replicated params and the
    dimensions the mesh could not split."""
    mesh = " ".join(f"{a}={n}" for a, n in p.mesh.items())
    lines = [f"plan{': ' + title if title else ''} on mesh {mesh} ({p.num_devices} devices)",
             "per-device bytes = NamedSharding(AbstractMesh, spec).shard_shape of each param; "
             "shapes from jax.eval_shape, nothing allocated", ""]
    by_component: dict[str, list[Placement]] = {}
    for pl in p.placements:
        by_component.setdefault(pl.path.split("/")[0], []).append(pl)
    lines.append(f"{'params by component':<30}{'count':>15}{'total':>16}{'per device':>16}")
    for name, items in by_component.items():
        count = sum(math.prod(i.shape) for i in items)
        lines.append(f"{name:<30}{count:>15,}{_gib(sum(i.nbytes for i in items)):>16}"
                     f"{_gib(sum(i.device_bytes for i in items)):>16}")
    lines += ["", f"{'group':<30}{'':>15}{'total':>16}{'per device':>16}"]
    for name, (total, device) in [*p.groups.items(), ("total", p.total)]:
        lines.append(f"{name:<30}{'':>15}{_gib(total):>16}{_gib(device):>16}   {device:,} B")
    replicated = sorted((pl for pl in p.placements if pl.replicated and p.num_devices > 1),
                        key=lambda pl: (-pl.nbytes, pl.path))
    lines += ["", f"largest fully replicated params ({len(replicated)} in all, "
                  f"{sum(pl.nbytes for pl in replicated) / 2**20:.2f} MiB on every device):"]
    lines += [f"  {pl.path:<60} {str(pl.shape):<20} {pl.nbytes / 2**20:9.3f} MiB  [{format_spec(pl.spec)}]"
              for pl in replicated[:top]]
    fell = sorted((pl for pl in p.placements if pl.fallbacks), key=lambda pl: (-pl.nbytes, pl.path))
    lines += ["", f"dimensions kept whole: no rule's mesh axes were free and divided them ({len(fell)} params):"]
    for pl in fell[:top]:
        why = ", ".join(f"dim {f.dim} {f.name}={f.size}" for f in pl.fallbacks)
        lines.append(f"  {pl.path:<60} {str(pl.shape):<20} {pl.nbytes / 2**20:9.3f} MiB  {why}")
    return "\n".join(lines)


# The repeated layers of the transformer stacks and the diffusion head (VAE paths stay exact).
_LISTS = re.compile(r"(?<=/)(layers|encoder_blocks|decoder_blocks|res_blocks)_\d+(?=/)")


def sharding_table(abstract: PyTree, mesh: str | Mapping[str, int], rules=sharding.DEFAULT_RULES) -> str:
    """Every param's PartitionSpec on `mesh`, one line per (path with layer indices as `*`, shape,
    spec) with its count: the golden-file format."""
    amesh = abstract_mesh(mesh)
    rows: dict[tuple[str, tuple, str], int] = {}
    for pl in placements(abstract, amesh, rules):
        key = (_LISTS.sub(r"\1_*", pl.path), pl.shape, format_spec(pl.spec))
        rows[key] = rows.get(key, 0) + 1
    mesh_text = ",".join(f"{a}={n}" for a, n in amesh.shape.items())
    header = [f"# param shardings on mesh {mesh_text}: path (layer indices as *), count, shape, spec",
              "# regenerate: UNIPIC_UPDATE_GOLDEN=1 python -m pytest tests/test_sharding.py"]
    body = [f"{path}\t{count}\t{shape}\t{spec}" for (path, shape, spec), count in sorted(rows.items())]
    return "\n".join(header + body) + "\n"
