"""Sharding: the rule tables, meshes, init and restore straight into shardings, and the planner.

Eight host CPU devices (tests/conftest.py) give real meshes in-process. The tiny UniPic of the
fixture folder is created and restored on meshes; the full-size model only through `jax.eval_shape`.
Placement is integer arithmetic, so every check here is exact.
"""

import functools
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import FIXTURE_ROOT
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import fixture, unipic_1p5b
from unipic_jax import cli, plan, sharding
from unipic_jax.models.qwen2 import KVCache, Qwen2Config, init_params

GOLDEN = Path(__file__).parent / "golden" / "param_shardings_1p5b.txt"
GOLDEN_MESH = "data=1,fsdp=4,tensor=2"
MESHES = [(8, 1, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2)]
TINY = fixture.get_config(FIXTURE_ROOT / "unipic")


def _spec_text(shape):
    return ",".join(f"{a}={n}" for a, n in zip(sharding.MESH_AXES, shape))


def _split(spec, sizes) -> list[int]:
    """How many ways each dimension is split under `spec` on mesh `sizes`."""
    return [1 if e is None else math.prod(sizes[a] for a in ((e,) if isinstance(e, str) else e)) for e in spec]


@pytest.fixture(scope="module")
def full_abstract():
    return plan.abstract_params(unipic_1p5b.get_config())


@pytest.fixture(scope="module")
def tiny_abstract():
    return plan.abstract_params(TINY)


@pytest.fixture(scope="module")
def placed(tiny_abstract):
    """(abstract, on): the tiny model's param shapes without its VAE, and `on(mesh_spec)` ->
    (mesh, the params `init_sharded` made on it), cached so the orbax test reuses them.

    The init draws nothing per param (an iota plus one random offset): compiling 480 random draws,
    or the real UniPic init with every forward pass, takes minutes on two loaded cores. The VAE's
    300 small convs are left out for the same reason; its placement is in the golden file and the
    real Qwen2 init is exercised on its own below.
    """
    abstract = {k: v for k, v in tiny_abstract.items() if k != "vae"}
    leaves, treedef = jax.tree.flatten(abstract)

    def init(rng):
        offset = jax.random.uniform(rng, ())
        return treedef.unflatten([offset + i + jnp.arange(s.size, dtype=s.dtype).reshape(s.shape) / s.size
                                  for i, s in enumerate(leaves)])

    cache = {}

    def on(mesh_text):
        if mesh_text not in cache:
            mesh = sharding.make_mesh(mesh_text)
            cache[mesh_text] = (mesh, sharding.init_sharded(init, abstract, mesh)(jax.random.key(0)))
        return cache[mesh_text]

    return abstract, on


# ----------------------------------------------------------------------------------------------
# Rules


def test_resolve_takes_first_free_dividing_candidate():
    sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    assert sharding.resolve(("embed", "mlp"), (8, 16), sizes).spec == P("fsdp", "tensor")
    # The batch takes data and fsdp, so an activation's embed dimension (were it named "embed")
    # finds fsdp taken and stays whole.
    r = sharding.resolve(("batch", "embed"), (4, 8), sizes)
    assert r.spec == P(("fsdp", "data"), None) and r.fallbacks == (sharding.Fallback(1, "embed", 8),)
    # A batch of 2 does not divide data x fsdp = 4: the next candidate, data alone.
    assert sharding.resolve(("batch",), (2,), sizes).spec == P("data")
    # 3 divides nothing: kept whole and reported; "norm" is kept whole by choice (no fallback).
    r = sharding.resolve(("mlp", "norm"), (3, 8), sizes)
    assert r.spec == P(None, None) and [f.name for f in r.fallbacks] == ["mlp"]


def test_resolve_rejects_unknown_names_and_wrong_rank():
    with pytest.raises(sharding.ShardingError, match="no rule"):
        sharding.resolve(("embedding",), (8,), {"fsdp": 2})
    with pytest.raises(sharding.ShardingError, match="do not fit"):
        sharding.resolve(("embed",), (8, 8), {"fsdp": 2})


def test_every_full_size_param_has_logical_axes(full_abstract):
    names = sharding.logical_axes(full_abstract)
    assert jax.tree.structure(names) == jax.tree.structure(full_abstract)
    # A bias follows its kernel's output axis.
    assert names["llm"]["layers_0"]["self_attn"]["q_proj"]["bias"] == P("heads")
    assert names["mar"]["encoder_blocks_0"]["mlp"]["fc2"]["bias"] == P("embed")


def test_param_without_pattern_is_an_error(tiny_abstract):
    extra = dict(tiny_abstract, llm=dict(tiny_abstract["llm"], new_gate=jax.ShapeDtypeStruct((4, 4), jnp.float32)))
    with pytest.raises(sharding.ShardingError, match="llm/new_gate"):
        sharding.logical_axes(extra)


def test_component_tree_is_placed_with_its_prefix(tiny_abstract):
    llm = tiny_abstract["llm"]
    sizes = {"data": 1, "fsdp": 4, "tensor": 2}
    assert sharding.param_specs(llm, sizes, prefix="llm") == sharding.param_specs(tiny_abstract, sizes)["llm"]
    with pytest.raises(sharding.ShardingError):
        sharding.logical_axes(llm)  # without its prefix the paths match nothing


def test_golden_full_size_shardings(full_abstract):
    text = plan.sharding_table(full_abstract, GOLDEN_MESH)
    if os.environ.get("UNIPIC_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    want, got = GOLDEN.read_text().splitlines(), text.splitlines()
    changed = sorted(set(want) ^ set(got))
    assert not changed, "param shardings differ from the golden file:\n" + "\n".join(changed[:40])
    assert got == want  # same lines, same order


def test_large_params_are_split_over_every_model_axis(full_abstract):
    # 8 MiB: above every position table (at most 5.6 MiB, split over fsdp only) and below the
    # smallest weight matrix of a transformer block (MAR attn/proj 6.5 MiB is still split).
    min_bytes = 8 << 20
    sizes = sharding.parse_mesh_spec(GOLDEN_MESH)
    assert sharding.unsplit_tensors(full_abstract, sizes, min_bytes=min_bytes) == []
    no_mlp = tuple((name, None if name == "mlp" else axes) for name, axes in sharding.DEFAULT_RULES)
    flagged = sharding.unsplit_tensors(full_abstract, sizes, min_bytes=min_bytes, rules=no_mlp)
    assert ("llm/layers_0/mlp/gate_proj/kernel", 1536 * 8960 * 4, ("tensor",)) in flagged
    no_embed = tuple(r for r in sharding.DEFAULT_RULES if r[0] != "embed") + (("embed", None),)
    flagged = {path for path, _, _ in sharding.unsplit_tensors(full_abstract, sizes, min_bytes=min_bytes,
                                                               rules=no_embed)}
    assert "llm/embed_tokens/embedding" in flagged


# ----------------------------------------------------------------------------------------------
# Meshes


def test_make_mesh_fills_auto_axis_and_takes_device_lists():
    mesh = sharding.make_mesh("data=2,fsdp=-1,tensor=2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    four = jax.devices()[4:]
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2}, devices=four)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2}
    assert set(mesh.devices.flat) == set(four)


@pytest.mark.parametrize("spec, match", [("fsdp=3", "multiply"), ("fsdp=-1,tensor=-1", "at most one"),
                                         ("pipe=2", "unknown"), ("fsdp:2", "axis=size"), ("fsdp=-1,tensor=3", "-1")])
def test_mesh_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        sharding.parse_mesh_spec(spec, 8)


# ----------------------------------------------------------------------------------------------
# Init and restore into shardings (tiny model, 8 devices)


@pytest.mark.parametrize("mesh_shape", MESHES, ids=_spec_text)
def test_init_straight_into_shardings(mesh_shape, placed):
    abstract, on = placed
    mesh, params = on(_spec_text(mesh_shape))
    specs = sharding.param_specs(abstract, mesh)
    sizes = dict(mesh.shape)
    device0 = 0
    for array, spec in zip(jax.tree.leaves(params), jax.tree.leaves(specs)):
        assert array.sharding == NamedSharding(mesh, spec)
        want = tuple(n // k for n, k in zip(array.shape, _split(spec, sizes)))
        assert {s.data.shape for s in array.addressable_shards} == {want}
        device0 += math.prod(want) * array.dtype.itemsize
    # The planner, which sees no devices, predicts the same bytes per device.
    assert device0 == plan.plan(abstract, _spec_text(mesh_shape)).groups["params (float32)"][1]
    total = sum(a.nbytes for a in jax.tree.leaves(params))
    model_ways = sizes["fsdp"] * sizes["tensor"]
    embed = params["llm"]["embed_tokens"]["embedding"]
    if model_ways == 1:  # pure data parallelism: every device holds every param whole
        assert device0 == total
    else:
        # Really split: the embedding's shard is 1/(fsdp*tensor) of it, and device 0 holds far
        # less than the model (norms and odd-sized tensors stay whole, hence the 1.5 slack).
        assert math.prod(embed.addressable_shards[0].data.shape) * model_ways == math.prod(embed.shape)
        assert device0 * model_ways < 1.5 * total


def test_real_qwen2_init_into_shardings_matches_unsharded(tiny_abstract):
    # A component's own tree placed with its prefix. jax's partitionable threefry draws the same
    # numbers whatever the output sharding, so the values are exactly those of a plain init.
    config = Qwen2Config(**TINY.qwen2)
    init = functools.partial(init_params, config)
    abstract = jax.eval_shape(init, jax.random.key(3))
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    sharded = sharding.init_sharded(init, abstract, mesh, prefix="llm")(jax.random.key(3))
    assert jax.tree.map(lambda a: a.sharding.spec, sharded) == sharding.param_specs(tiny_abstract["llm"], mesh,
                                                                                  prefix="llm")
    gate = sharded["layers_0"]["mlp"]["gate_proj"]["kernel"]
    assert gate.addressable_shards[0].data.shape == (gate.shape[0] // 2, gate.shape[1] // 2)
    plain = jax.jit(init)(jax.random.key(3))
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_orbax_restores_into_target_shardings_not_the_saved_layout(placed, tmp_path):
    abstract, on = placed
    _, params = on("fsdp=8")
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "params", params)
    ckptr.wait_until_finished()
    target = sharding.sharded_abstract(abstract, sharding.make_mesh("data=2,fsdp=2,tensor=2"))
    restored = ckptr.restore(tmp_path / "params", target)
    for got, want, saved in zip(jax.tree.leaves(restored), jax.tree.leaves(target), jax.tree.leaves(params)):
        assert got.sharding == want.sharding and got.sharding.mesh != saved.sharding.mesh
        np.testing.assert_array_equal(np.asarray(got), np.asarray(saved))  # a copy: exact
    gate = restored["llm"]["layers_0"]["mlp"]["gate_proj"]["kernel"]
    assert gate.addressable_shards[0].data.shape == (gate.shape[0] // 2, gate.shape[1] // 2)


# ----------------------------------------------------------------------------------------------
# Activations, batches, the KV cache


def test_constrain_is_a_no_op_outside_a_mesh():
    x = jnp.ones((8, 4, 16))
    assert sharding.constrain(x, ("batch", "length", "act_embed")) is x


def test_constrain_places_activations_inside_a_mesh():
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    f = jax.jit(lambda x: sharding.constrain(x * 2, ("batch", "length", "act_mlp")))
    with jax.set_mesh(mesh):
        y = f(jnp.ones((8, 4, 16)))
    assert y.sharding.spec == P(("fsdp", "data"), None, "tensor")
    assert y.addressable_shards[0].data.shape == (2, 4, 8)


def test_batch_sharding():
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    assert sharding.batch_sharding(mesh).spec == P(("fsdp", "data"))
    assert sharding.batch_sharding(mesh, (2, 5)).spec == P("data", None)
    assert sharding.batch_sharding(mesh, (1, 5)).spec == P(None, None)


@pytest.mark.parametrize("mesh_shape, kv_split", [((2, 2, 2), 2), ((1, 1, 8), 1)], ids=["2-2-2", "1-1-8"])
def test_kv_cache_shardings(mesh_shape, kv_split):
    config = Qwen2Config(**TINY.qwen2)
    mesh = sharding.make_mesh(_spec_text(mesh_shape))
    abstract = jax.eval_shape(lambda: KVCache.create(config, batch=4, max_len=16))
    shardings = sharding.kv_cache_shardings(abstract, mesh)
    cache = jax.jit(lambda: KVCache.create(config, batch=4, max_len=16), out_shardings=shardings)()
    b_split = 4 if mesh_shape[0] * mesh_shape[1] == 4 else 1
    assert cache.k.addressable_shards[0].data.shape == (
        config.num_layers, 4 // b_split, 16, config.num_kv_heads // kv_split, config.head_dim)
    assert cache.valid.sharding.spec == shardings.valid.spec
    assert cache.length.sharding.is_fully_replicated


# ----------------------------------------------------------------------------------------------
# The planner


def test_plan_full_size(full_abstract):
    total = sum(math.prod(s.shape) * 4 for s in jax.tree.leaves(full_abstract))
    for mesh, at_least in [(GOLDEN_MESH, 7.9), ("fsdp=8", 7.9), ("fsdp=64", 60)]:
        p = plan.plan(full_abstract, mesh)
        got_total, device = p.groups["params (float32)"]
        assert got_total == total
        assert device * p.num_devices >= total
        # Only norms and a few odd-sized tensors stay whole; the rest divides exactly.
        assert total / device >= at_least, (mesh, total / device)


def test_plan_training_state(full_abstract):
    p = plan.plan(full_abstract, "fsdp=64", train=True)
    trainable = sum(math.prod(s.shape) for k, tree in full_abstract.items() if k not in plan.TRAIN_FROZEN
                    for s in jax.tree.leaves(tree))
    m, v, ema = (p.groups[f"{g} (float32)"] for g in ("adam m", "adam v", "ema"))
    assert m == v == ema and m[0] == 4 * trainable
    assert p.total[1] == sum(d for _, d in p.groups.values())


def test_plan_command(capsys):
    assert cli.main(["plan", "--config", str(FIXTURE_ROOT / "unipic"), "--mesh", "fsdp=4,tensor=2", "--train"]) == 0
    out = capsys.readouterr().out
    assert "mesh data=1 fsdp=4 tensor=2 (8 devices)" in out
    for line in ("params (float32)", "adam m (float32)", "ema (float32)", "largest fully replicated"):
        assert line in out
    assert cli.main(["plan", "--config", str(FIXTURE_ROOT / "unipic"), "--mesh", "fsdp=-1"]) == 2
