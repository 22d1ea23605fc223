"""One place for sharding: the device mesh, the logical axes of every param, and the rules that map
logical axes onto mesh axes. No other module names a mesh axis.

Mesh axes, outer to inner (`MESH_AXES`):
  data    pure data parallelism: the batch is split, params are replicated;
  fsdp    ZeRO-3 style: the batch and the params (their "embed" dimension) are split;
  tensor  Megatron style: attention heads, MLP width and vocabulary are split.

Two ordered tables decide every placement:
  PARAM_AXES     param path pattern (in the UniPic tree) -> one logical name per dimension
                 (None: a dimension that is never split, e.g. kernel taps or a leading 1);
  DEFAULT_RULES  logical name -> mesh axes, candidates tried in order (None: kept whole by choice).

A Dense or Conv `bias` takes the output axis of its sibling `kernel`, so the table lists kernels,
embeddings, free tensors and norms. A param that matches no pattern is an error: every param has
logical names and nothing is replicated silently. A dimension takes the first candidate whose mesh
axes are not already used by an earlier dimension of the same array and whose size product
divides it; when none does, the dimension is kept whole and `resolve` reports it as a fallback.

Paths are "/"-joined keys of the UniPic param tree (`llm/layers_3/mlp/gate_proj/kernel`); a
component's own tree (a bare Qwen2 tree) is placed with `prefix="llm"`. Activations and the KV
cache use the same rules with the names batch, length, act_embed, act_heads, act_mlp, kv_heads,
layers, head_dim (`constrain`, `kv_cache_shardings`).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any
MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes, tried in order (see the module docstring).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # Batch rows over fsdp-major (fsdp, data), not (data, fsdp): with three axes > 1, XLA's SPMD
    # partitioner (jax 0.10.2) reorders batch blocks into (fsdp, data) order around some tensor-split
    # dots and never back, so activations pinned (data, fsdp)-major come out with rows swapped
    # (tests/test_sharded_programs.py). Which device holds which rows is otherwise free.
    ("batch", ("fsdp", "data")),
    ("batch", "data"),  # a global batch that data x fsdp does not divide
    ("batch", "fsdp"),
    ("embed", "fsdp"),  # the residual-stream width of a component
    ("vocab", "tensor"),  # token and class embedding rows, the untied LM head
    ("heads", "tensor"),  # query / attention-output heads x head_dim
    ("kv_heads", "tensor"),
    ("qkv", "tensor"),  # fused [q; k; v] projections (MAR blocks, the SigLIP pooling head)
    ("mlp", "tensor"),  # MLP hidden width, adaLN modulation outputs
    ("features", "tensor"),  # inputs of bridging projections (another component's width)
    ("conv_in", "fsdp"),  # VAE conv kernels: input channels like "embed", outputs like "mlp" (see
    ("conv_out", "tensor"),  # PARAM_AXES for why not the other way round)
    ("norm", None),  # norm scales and biases: small, kept whole
    ("length", None),  # sequence positions (activations, position tables, cache slots)
    ("layers", None),
    ("head_dim", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)

_I = r"\d+"  # a layer index in a path
# Path pattern (regex, full match; `{i}` is a layer index) -> logical name per dimension.
PARAM_AXES: tuple[tuple[str, tuple], ...] = (
    # Qwen2.5 (llm/)
    ("llm/embed_tokens/embedding", ("vocab", "embed")),
    ("llm/lm_head/kernel", ("embed", "vocab")),
    ("llm/layers_{i}/self_attn/q_proj/kernel", ("embed", "heads")),
    ("llm/layers_{i}/self_attn/[kv]_proj/kernel", ("embed", "kv_heads")),
    ("llm/layers_{i}/self_attn/o_proj/kernel", ("heads", "embed")),
    ("llm/layers_{i}/mlp/(gate|up)_proj/kernel", ("embed", "mlp")),
    ("llm/layers_{i}/mlp/down_proj/kernel", ("mlp", "embed")),
    # MAR encoder/decoder (mar/)
    ("mar/(encoder|decoder)_blocks_{i}/attn/qkv/kernel", ("embed", "qkv")),
    ("mar/(encoder|decoder)_blocks_{i}/attn/proj/kernel", ("heads", "embed")),
    ("mar/(encoder|decoder)_blocks_{i}/mlp/fc1/kernel", ("embed", "mlp")),
    ("mar/(encoder|decoder)_blocks_{i}/mlp/fc2/kernel", ("mlp", "embed")),
    ("mar/z_proj/kernel", (None, "embed")),
    ("mar/decoder_embed/kernel", ("features", "embed")),
    ("mar/(encoder|decoder|diffusion)_pos_embed_learned", (None, "length", "embed")),
    ("mar/fake_latent", (None, "embed")),
    ("mar/mask_token", (None, None, "embed")),
    ("mar/class_emb", ("vocab", "embed")),
    # Diffusion head (diffusion_head/)
    ("diffusion_head/time_embed/mlp_0/kernel", (None, "mlp")),  # sinusoidal features in
    ("diffusion_head/time_embed/mlp_2/kernel", ("mlp", "embed")),
    ("diffusion_head/cond_embed/kernel", ("features", "embed")),
    ("diffusion_head/input_proj/kernel", (None, "embed")),
    ("diffusion_head/res_blocks_{i}/mlp_0/kernel", ("embed", "mlp")),
    ("diffusion_head/res_blocks_{i}/mlp_2/kernel", ("mlp", "embed")),
    ("diffusion_head/(res_blocks_{i}|final_layer)/adaLN_modulation_1/kernel", ("embed", "mlp")),
    ("diffusion_head/final_layer/linear/kernel", ("embed", None)),
    # Projectors
    ("(proj_in|proj_out|siglip2_proj)/fc1/kernel", ("embed", "mlp")),
    ("(proj_in|proj_out|siglip2_proj)/fc2/kernel", ("mlp", "embed")),
    # SigLIP2 vision tower (siglip2/)
    ("siglip2/embeddings/patch_embedding/kernel", (None, None, None, "embed")),
    ("siglip2/embeddings/position_embedding/embedding", ("length", "embed")),
    ("siglip2/layers_{i}/self_attn/[qkv]_proj/kernel", ("embed", "heads")),
    ("siglip2/(layers_{i}/self_attn|head)/out_proj/kernel", ("heads", "embed")),
    ("siglip2/(layers_{i}|head)/mlp/fc1/kernel", ("embed", "mlp")),
    ("siglip2/(layers_{i}|head)/mlp/fc2/kernel", ("mlp", "embed")),
    ("siglip2/head/probe", (None, None, "embed")),
    ("siglip2/head/in_proj_kernel", ("embed", "qkv")),
    ("siglip2/head/in_proj_bias", ("qkv",)),
    # VAE convolutions, HWIO (vae/): split like a column-parallel Dense kernel, input channels over
    # fsdp and output channels over tensor. Not (tensor, fsdp): XLA's SPMD partitioner (jax 0.10.2,
    # Shardy and GSPMD alike) computes a dot or convolution wrongly when the activation is
    # P(("data", "fsdp"), ..., "tensor"), the kernel (..., "tensor", "fsdp") and the output
    # P(("data", "fsdp"), ..., "tensor") with data, fsdp and tensor all > 1: it permutes the
    # activation's batch blocks into (fsdp, data) order and never back, so rows come out swapped.
    # Nothing pins the VAE's activations and propagation picked exactly that layout in the encoder
    # on (2,2,2). With the kernel (fsdp, tensor) no activation placement tried hits it (the repro:
    # test_xla_partitions_row_parallel_matmul in tests/test_sharded_programs.py).
    # The row-parallel Dense kernels above, (heads | mlp, embed), have the (tensor, fsdp) layout
    # too: right only while their outputs' features stay off "tensor", as in the tested programs.
    ("vae/.*/kernel", (None, None, "conv_in", "conv_out")),
    # Norms of every component (LayerNorm, RMSNorm, GroupNorm)
    (".*/[^/]*(norm|_ln)[^/]*/(scale|bias)", ("norm",)),
)

_COMPILED = [(re.compile(p.replace("{i}", _I)), axes) for p, axes in PARAM_AXES]


class ShardingError(ValueError):
    """A param without logical axes, or logical axes that do not fit the param."""


# ----------------------------------------------------------------------------------------------
# Meshes


def parse_mesh_spec(spec: str | Mapping[str, int], num_devices: int | None = None) -> dict[str, int]:
    """"data=1,fsdp=4,tensor=2" (or a dict) -> {axis: size} over `MESH_AXES`, in mesh order.

    Omitted axes have size 1; one axis may be -1, filled so the sizes multiply to `num_devices`
    (required then). With `num_devices`, the sizes must multiply to it.
    """
    if isinstance(spec, str):
        sizes = {}
        for part in filter(None, (s.strip() for s in spec.split(","))):
            name, eq, value = part.partition("=")
            if not eq:
                raise ValueError(f"mesh spec {spec!r}: {part!r} is not axis=size")
            try:
                sizes[name.strip()] = int(value)
            except ValueError:
                raise ValueError(f"mesh spec {spec!r}: size {value!r} is not an integer") from None
    else:
        sizes = dict(spec)
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh spec {spec!r}: unknown axes {unknown} (axes: {', '.join(MESH_AXES)})")
    sizes = {a: sizes.get(a, 1) for a in MESH_AXES}
    auto = [a for a, n in sizes.items() if n == -1]
    if len(auto) > 1 or any(n < 1 for a, n in sizes.items() if a not in auto):
        raise ValueError(f"mesh spec {spec!r}: sizes must be >= 1, with at most one -1")
    known = math.prod(n for a, n in sizes.items() if a not in auto)
    if auto:
        if num_devices is None or num_devices % known:
            raise ValueError(f"mesh spec {spec!r}: cannot fill -1 from {num_devices} devices")
        sizes[auto[0]] = num_devices // known
    if num_devices is not None and math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh spec {spec!r}: sizes multiply to {math.prod(sizes.values())}, "
                         f"not the {num_devices} devices")
    return sizes


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A `Mesh` with axes `MESH_AXES` over `devices` (default `jax.devices()`).

    The device order comes from `mesh_utils.create_device_mesh(..., allow_split_physical_axes=True)`,
    which follows the physical topology on TPUs (and accepts compile-only topology devices).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    grid = mesh_utils.create_device_mesh(tuple(sizes.values()), devices, allow_split_physical_axes=True)
    return Mesh(grid, tuple(sizes))


def _axis_sizes(mesh) -> dict[str, int]:
    """{axis: size} of a Mesh, an AbstractMesh or a plain mapping."""
    return dict(mesh) if isinstance(mesh, Mapping) else dict(mesh.shape)


# ----------------------------------------------------------------------------------------------
# Logical axes -> mesh axes


class Fallback(NamedTuple):
    """Dimension `dim` (logical `name`, size `size`) kept whole: no candidate of the rules fit."""

    dim: int
    name: str
    size: int


class Resolved(NamedTuple):
    spec: PartitionSpec
    fallbacks: tuple[Fallback, ...]


def _candidates(rules, name: str) -> list[tuple[str, ...] | None]:
    found = [axes for logical, axes in rules if logical == name]
    if not found:
        raise ShardingError(f"logical axis {name!r} has no rule (add it to the rules, None to keep it whole)")
    return [None if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes)) for axes in found]


def resolve(logical: Sequence[str | None], shape: Sequence[int], mesh, rules=DEFAULT_RULES) -> Resolved:
    """The PartitionSpec of an array of `shape` with logical axes `logical` on `mesh` (a Mesh,
    AbstractMesh or {axis: size}), and the dimensions that fell back to being kept whole."""
    if len(logical) != len(shape):
        raise ShardingError(f"logical axes {tuple(logical)} do not fit shape {tuple(shape)}")
    sizes = _axis_sizes(mesh)
    used: set[str] = set()
    spec, fallbacks = [], []
    for dim, (name, size) in enumerate(zip(logical, shape)):
        choice = None
        if name is not None:
            candidates = _candidates(rules, name)
            for axes in candidates:
                if axes is None:
                    break
                if all(a in sizes and a not in used for a in axes) and size % math.prod(sizes[a] for a in axes) == 0:
                    choice = axes
                    break
            else:
                fallbacks.append(Fallback(dim, name, size))
        if choice:
            used.update(choice)
        spec.append(None if not choice else choice[0] if len(choice) == 1 else choice)
    return Resolved(PartitionSpec(*spec), tuple(fallbacks))


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _join(prefix: str, path: str) -> str:
    return f"{prefix.strip('/')}/{path}" if prefix else path


def param_logical_axes(path: str, ndim: int) -> tuple:
    """Logical axes of the param at UniPic path `path` (first matching PARAM_AXES pattern)."""
    for pattern, axes in _COMPILED:
        if pattern.fullmatch(path):
            if len(axes) != ndim:
                raise ShardingError(f"param {path!r}: pattern {pattern.pattern!r} names {len(axes)} axes, "
                                    f"the param has {ndim}")
            return axes
    raise ShardingError(f"param {path!r} matches no pattern of PARAM_AXES (give it logical axes)")


def logical_axes(params: PyTree, prefix: str = "") -> PyTree:
    """Tree like `params` (arrays or ShapeDtypeStructs) of PartitionSpecs of logical names.

    `prefix` is the tree's place in the UniPic tree ("llm" for a bare Qwen2 tree). Raises
    `ShardingError` naming every param without logical axes.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [_join(prefix, _path_str(p)) for p, _ in leaves]
    ndims = {path: len(leaf.shape) for path, (_, leaf) in zip(paths, leaves)}
    out, problems = [], []
    for path, (_, leaf) in zip(paths, leaves):
        try:
            head, _, name = path.rpartition("/")
            kernel = f"{head}/kernel" if head else "kernel"
            if name == "bias" and kernel in ndims:  # a bias lies along its kernel's output axis
                axes = (param_logical_axes(kernel, ndims[kernel])[-1],)
                if len(leaf.shape) != 1:
                    raise ShardingError(f"param {path!r}: a bias of rank {len(leaf.shape)}")
            else:
                axes = param_logical_axes(path, len(leaf.shape))
            out.append(PartitionSpec(*axes))
        except ShardingError as e:
            problems.append(str(e))
    if problems:
        raise ShardingError(f"{len(problems)} param(s) without usable logical axes: " + "; ".join(problems))
    return jax.tree_util.tree_unflatten(treedef, out)


def param_specs(abstract: PyTree, mesh, rules=DEFAULT_RULES, prefix: str = "") -> PyTree:
    """Tree of mesh PartitionSpecs for `abstract` (arrays or ShapeDtypeStructs) on `mesh` (a Mesh,
    AbstractMesh or {axis: size}: no devices needed)."""
    return jax.tree.map(lambda leaf, names: resolve(tuple(names), leaf.shape, mesh, rules).spec,
                        abstract, logical_axes(abstract, prefix))


def param_shardings(abstract: PyTree, mesh, rules=DEFAULT_RULES, prefix: str = "") -> PyTree:
    """Tree of `NamedSharding`s for the params `abstract` on `mesh` (a Mesh or an AbstractMesh)."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(abstract, mesh, rules, prefix))


def sharded_abstract(abstract: PyTree, mesh, rules=DEFAULT_RULES, prefix: str = "") -> PyTree:
    """`abstract` as ShapeDtypeStructs carrying their target shardings: the restore target for
    orbax and the argument of `jax.jit(...).lower(...)`."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        abstract, param_shardings(abstract, mesh, rules, prefix))


def init_sharded(init_fn: Callable[..., PyTree], abstract: PyTree, mesh, rules=DEFAULT_RULES,
                 prefix: str = "") -> Callable[..., PyTree]:
    """`jax.jit(init_fn, out_shardings=...)`: each param is created on its shards, never whole.

    `abstract` is `jax.eval_shape(init_fn, *args)`; call the result with the same `args`.
    """
    return jax.jit(init_fn, out_shardings=param_shardings(abstract, mesh, rules, prefix))


def unsplit_tensors(abstract: PyTree, mesh, *, over: Sequence[str] = ("fsdp", "tensor"), min_bytes: int = 0,
                    rules=DEFAULT_RULES, prefix: str = "") -> list[tuple[str, int, tuple[str, ...]]]:
    """Params of at least `min_bytes` that some axis of `over` (of size > 1) does not split:
    [(path, bytes, the axes left out)], largest first. Empty when every large param is split
    over every axis of `over`."""
    sizes = _axis_sizes(mesh)
    found = []
    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    specs = jax.tree.leaves(param_specs(abstract, mesh, rules, prefix))
    for (path, leaf), spec in zip(leaves, specs):
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        used = {a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)}
        missing = tuple(a for a in over if sizes.get(a, 1) > 1 and a not in used)
        if nbytes >= min_bytes and missing:
            found.append((_join(prefix, _path_str(path)), nbytes, missing))
    return sorted(found, key=lambda t: -t[1])


# ----------------------------------------------------------------------------------------------
# Activations, batches, the KV cache


def logical_sharding(mesh, logical: Sequence[str | None], shape: Sequence[int], rules=DEFAULT_RULES) -> NamedSharding:
    """NamedSharding of an array of `shape` with logical axes `logical` on `mesh`."""
    return NamedSharding(mesh, resolve(logical, shape, mesh, rules).spec)


def batch_sharding(mesh, shape: Sequence[int] | None = None, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of an input batch: the leading dimension over the "batch" rule, the rest whole.

    Without `shape` the first "batch" candidate is used (the global batch must divide it); with
    it, the first candidate that divides `shape[0]`.
    """
    if shape is None:
        first = next(axes for axes in _candidates(rules, "batch"))
        return NamedSharding(mesh, PartitionSpec(first))
    return logical_sharding(mesh, ("batch",) + (None,) * (len(shape) - 1), shape, rules)


def constrain(x: jax.Array, logical: Sequence[str | None], rules=DEFAULT_RULES) -> jax.Array:
    """`with_sharding_constraint` of activation `x` by logical axes (e.g. ("batch", "length",
    "act_embed")) inside a `jax.set_mesh(mesh)` context; outside any mesh, `x` unchanged."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, resolve(logical, x.shape, mesh, rules).spec)


KV_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


def kv_cache_shardings(cache, mesh, rules=DEFAULT_RULES):
    """The shardings of a `KVCache` (arrays or ShapeDtypeStructs) as a `KVCache` of NamedShardings:
    k/v (layers, B, S, kv_heads, head_dim) split over batch and, where it divides, KV heads over
    "tensor"; `valid` (B, S) over batch; `length` replicated."""
    kv = logical_sharding(mesh, KV_AXES, cache.k.shape, rules)
    return cache.replace(k=kv, v=kv,
                         valid=logical_sharding(mesh, ("batch", "length"), cache.valid.shape, rules),
                         length=NamedSharding(mesh, PartitionSpec()))
