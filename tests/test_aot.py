"""AOT compilation for TPU topologies (`unipic_jax.aot`, `unipic-jax compile`).

Without libtpu: topology names, the abstract batch against the data pipeline, the programs
lowered on a CPU mesh (the same code path, no TPU compiler), and the command's message. With
libtpu (`pip install "jax[tpu]==0.10.2"`): one small compile of the tiny train step for a v5e
2x2 slice through the command, and an HBM overflow reported in one line.
"""


import jax
import numpy as np
import pytest
from conftest import FIXTURE_ROOT, HAS_LIBTPU, needs_libtpu
from jax.sharding import NamedSharding, PartitionSpec as P

from configs.stages import image_tokens, smoke
from unipic_jax import aot, cli, sharding
from unipic_jax.train import data, loop



@pytest.mark.parametrize("name, want", [
    ("v5e:16x16", ("v5e:16x16", "default", (2, 2, 1), (True, True, False))),
    ("v5e-256", ("v5e:16x16", "default", (2, 2, 1), (True, True, False))),
    ("v5litepod-128", ("v5e:8x16", "default", (2, 2, 1), (False, True, False))),
    ("v5e-16", ("v5e:4x4", "default", (2, 2, 1), (False, False, False))),
    ("v5:4x4x4", ("v5:4x4x4", "megacore", (2, 2, 1), (True, True, True))),
    ("v5p-128", ("v5:4x4x4", "megacore", (2, 2, 1), (True, True, True))),
    ("v5p-64", ("v5:2x4x4", "megacore", (2, 2, 1), (False, False, False))),
    ("v4-8", ("v4:2x2x1", "megacore", (2, 2, 1), (False, False, False))),
    ("v6e:16x16", ("v6e:16x16", "default", (2, 2, 1), (True, True, False))),
])
def test_topology_names(name, want):
    # MaxText's accelerator_to_spec_map holds the same values for these slices.
    spec = aot.parse_topology(name)
    assert (spec.name, spec.chip_config_name, spec.chips_per_host_bounds, spec.wrap) == want


@pytest.mark.parametrize("name", ["v5e-100", "v5e:4x4x4", "v5:4x4", "tpu9:2x2", "v5e", "v5p-7"])
def test_bad_topology_names_are_rejected(name):
    with pytest.raises(ValueError, match="topology"):
        aot.parse_topology(name)


def test_abstract_batch_is_what_the_pipeline_yields(tmp_path):
    cfg = smoke.get_config()
    tokenizer = loop.load_tokenizer(cfg, tmp_path)
    sources = data.parse_data_spec(str(data.write_synthetic(tmp_path / "data", size=cfg.data.gen_resolution)))
    iterator = iter(data.make_dataset(cfg, tokenizer, sources))
    batch = next(iterator)
    iterator.close()
    abstract = aot.abstract_batch(cfg)
    assert sorted(abstract) == sorted(batch)
    for task, fields in abstract.items():
        got = {k: (np.shape(v), np.asarray(v).dtype) for k, v in batch[task].items() if k != "num_skipped"}
        assert got == {k: (s.shape, np.dtype(s.dtype)) for k, s in fields.items()}, task


def test_set_resolution_recomputes_lengths():
    cfg = aot.stage_for_compile("sft", batch=256, resolution=512, und_resolution=256)
    d, mar = cfg.data, cfg.model.mar
    assert dict(d.batch_size) == {"t2i": 128, "edit": 64, "und": 64}
    assert d.max_length.edit == image_tokens(512, mar) + d.max_length.t2i and d.buckets.edit == (d.max_length.edit,)
    assert d.max_length.und == image_tokens(256, mar) + d.max_length.t2i + d.answer_slots


def test_programs_lower_on_a_cpu_mesh():
    # The AOT programs on abstract inputs, lowered (not compiled) for 8 host devices: the same
    # jit, shardings and donation the TPU compile gets.
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    cfg = smoke.get_config(f"fixture={FIXTURE_ROOT / 'unipic'}")
    program = aot.train_program(cfg, mesh)
    state = program.args[0]
    assert state.params["llm"]["layers_0"]["mlp"]["gate_proj"]["kernel"].sharding.spec == P("fsdp", "tensor")
    text = program.jitted.lower(*program.static, *program.args).as_text()
    assert "tf.aliasing_output" in text  # the donated state is aliased to the new state
    assert program.parts["params"] < sum(s.size * 4 for s in jax.tree.leaves(state.params))  # split
    assert program.notes == []  # 4 rows per task over data x fsdp = 4
    for p in aot.sampler_programs(cfg.model, mesh, batch=2, resolution=64, num_iter=4):
        p.jitted.lower(*p.static, *p.args)


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed")
def test_compile_without_libtpu_says_how_to_install(capsys):
    assert cli.main(["compile", "--topology", "v5e:2x2", "--train", "--stage", "smoke",
                     "--config", str(FIXTURE_ROOT / "unipic")]) == 2
    assert 'pip install "jax[tpu]==0.10.2"' in capsys.readouterr().err


@needs_libtpu
def test_compile_tiny_train_step_for_v5e(capsys):
    assert cli.main(["compile", "--topology", "v5e-4", "--train", "--stage", "smoke", "--mesh", "fsdp=2,tensor=2",
                     "--config", str(FIXTURE_ROOT / "unipic")]) == 0
    out = capsys.readouterr().out
    assert "topology v5e:2x2 x 1 slice(s): 4 TPU v5 lite devices" in out
    assert "train step (smoke): compiled in" in out and "per chip: total" in out
    assert "plan on the same mesh" in out


@needs_libtpu
def test_hbm_overflow_is_one_line():
    spec = aot.parse_topology("v5e:1x1")
    mesh = aot.topology_mesh(spec, "fsdp=1")
    huge = jax.ShapeDtypeStruct((8 << 30,), np.float32, sharding=NamedSharding(mesh, P()))  # 32 GiB
    program = aot.Program("too big", jax.jit(lambda x: x * 2), (huge,))
    with pytest.raises(aot.CompileOOM) as info:
        aot.compile_program(program)
    message = str(info.value)
    assert "\n" not in message and message.startswith("too big: does not fit in HBM")
