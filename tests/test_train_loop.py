"""The training loop on the tiny smoke stage and the synthetic coloured-shapes data (metrics in
metrics.jsonl and TensorBoard event files read back).

One Trainer (one compiled step) serves every test: an uninterrupted 50-step run is the reference;
a second run is killed in the middle of its step-20 save (the data item's write raises, leaving an
orbax temporary directory), resumed from step 10, stopped after step 25 without a final save,
and resumed again from step 20. On the CPU every resumed step must reproduce the reference's
metrics bitwise (same compiled program, same params restored bit for bit, same data order, same
per-step keys).
"""

import collections
import json
import struct
from pathlib import Path

import grain
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs.stages import smoke
from unipic_jax.train import data, loop

STEPS = 50  # the smoke config's total_steps


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    cfg = smoke.get_config()
    assert cfg.total_steps == STEPS and cfg.checkpoint.every == 10
    traces_before = loop.TRACES["train_step"]
    trainer = loop.Trainer(cfg)
    tokenizer = loop.load_tokenizer(cfg, root / "tok")
    sources = data.parse_data_spec(str(data.write_synthetic(root / "data", size=cfg.data.gen_resolution)))
    reference = trainer.run(root / "a", sources, tokenizer=tokenizer, collect=True, progress=False, checkpoints=False)
    return dict(root=root, cfg=cfg, trainer=trainer, tokenizer=tokenizer, sources=sources,
                reference=reference, traces_before=traces_before)


def test_every_task_loss_falls(env):
    history = env["reference"].history
    assert len(history) == STEPS
    for task in ("t2i", "edit", "und"):
        first = np.mean([h[f"loss/{task}"] for h in history[:10]])
        last = np.mean([h[f"loss/{task}"] for h in history[-10:]])
        assert last < 0.8 * first, (task, first, last)
    assert all(np.isfinite(h["grad_norm"]) and h["lr"] > 0 for h in history)
    logged = [json.loads(line) for line in (env["root"] / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))  # log_every = 1
    assert {"loss/t2i", "loss/edit", "loss/und", "grad_norm", "lr", "tokens_per_s", "steps_per_s"} <= set(logged[-1])


def _read_events(path: Path) -> list:
    """The Event protos of a TensorBoard event file: TFRecord framing (u64 length, u32 masked
    crc32c of it, payload, u32 masked crc32c of the payload), checksums verified."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    raw, events, at = path.read_bytes(), [], 0
    while at < len(raw):
        header = raw[at:at + 8]
        (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack("<I", raw[at + 8:at + 12])
        payload = raw[at + 12:at + 12 + length]
        (payload_crc,) = struct.unpack("<I", raw[at + 12 + length:at + 16 + length])
        assert header_crc == masked_crc32c(header) and payload_crc == masked_crc32c(payload)
        events.append(event_pb2.Event.FromString(payload))
        at += 16 + length
    return events


def test_tensorboard_scalars_read_back(env):
    files = list((env["root"] / "a" / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    scalars = collections.defaultdict(dict)
    for event in _read_events(files[0]):
        for value in event.summary.value:
            scalars[value.tag][event.step] = value.simple_value
    logged = [json.loads(line) for line in (env["root"] / "a" / "metrics.jsonl").read_text().splitlines()]
    for tag in ("loss", "loss/t2i", "loss/edit", "loss/und", "grad_norm", "lr"):
        assert scalars[tag] == {r["step"]: float(np.float32(r[tag])) for r in logged}, tag  # float32 in the proto


def test_frozen_params_are_bit_identical(env):
    trainer, final = env["trainer"], env["reference"].state
    start = trainer.initial_params
    for name in ("vae", "siglip2", "siglip2_proj"):  # not in the smoke stage's trainable set
        for a, b in zip(jax.tree.leaves(start[name]), jax.tree.leaves(final.params[name])):
            np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))
    # mar/class_emb is frozen inside a trainable module (it never gets a gradient in the reference)
    np.testing.assert_array_equal(np.asarray(start["mar"]["class_emb"]).view(np.uint32),
                                  np.asarray(final.params["mar"]["class_emb"]).view(np.uint32))
    rest = {k: v for k, v in start["mar"].items() if k != "class_emb"}
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(rest),
                                                       jax.tree.leaves({k: final.params["mar"][k] for k in rest}))]
    assert all(moved)
    assert final.ema is not None and int(final.step) == STEPS


def test_resume_after_a_crash_mid_save_is_bitwise(env, monkeypatch):
    trainer, sources, tok = env["trainer"], env["sources"], env["tokenizer"]
    want = env["reference"].history
    workdir = env["root"] / "b"
    seen = []
    original = grain.checkpoint.CheckpointHandler.save

    def crash_at_20(self, directory, item=None, args=None):
        if Path(directory).parent.name.startswith("20."):  # the temporary dir of step 20
            raise Crash("killed while saving step 20")
        return original(self, directory, item, args)

    monkeypatch.setattr(grain.checkpoint.CheckpointHandler, "save", crash_at_20)
    with pytest.raises(Crash):
        trainer.run(workdir, sources, tokenizer=tok, progress=False, hooks=[lambda step, m: seen.append(m)])
    monkeypatch.undo()
    assert seen == want[:20]
    left = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert "10" in left and "20" not in left and any(n.startswith("20.") for n in left), left  # half-written save

    first = trainer.run(workdir, sources, tokenizer=tok, collect=True, progress=False, stop_at=25)
    assert first.start_step == 10 and first.history == want[10:25]  # bitwise: exact float equality
    second = trainer.run(workdir, sources, tokenizer=tok, collect=True, progress=False, stop_at=30)
    assert second.start_step == 20 and second.history == want[20:30]
    for a, b in zip(jax.tree.leaves(second.state.params), jax.tree.leaves(trainer.init_state().params)):
        assert a.shape == b.shape


def test_one_compile_for_every_run(env):
    # Every batch has the same shapes (one bucket per task): one trace, one compiled program,
    # shared by the four runs of this module.
    assert loop.TRACES["train_step"] - env["traces_before"] == 1
    assert len(env["trainer"]._compiled) == 1


def test_command_line_config_helpers(tmp_path):
    cfg = loop.apply_overrides(loop.load_stage_config("smoke:steps=7,batch=6"), ["optim.lr=0.5", "remat=components"])
    assert cfg.total_steps == 7 and dict(cfg.data.batch_size) == {"t2i": 2, "edit": 2, "und": 2}
    assert cfg.optim.lr == 0.5 and cfg.remat == "components"
    for stage in ("pt", "align", "ct", "sft"):
        c = loop.load_stage_config(stage)
        assert c.optim.b2 == 0.95 and c.optim.eps == 1e-15 and c.optim.grad_clip == 1.0
    assert loop.load_stage_config("pt").optim.trainable == ("mar", "diffusion_head")
    with pytest.raises(ValueError):
        loop.apply_overrides(smoke.get_config(), ["optim.nothing=1"])
    with pytest.raises(ValueError):
        loop.load_stage_config("nostage")


def test_restore_into_target_shardings(env):
    # The resumed state can be read straight into a sharded layout: Adam moments and EMA follow
    # their params' shardings (kernels split over two devices here), scalars are replicated.
    trainer = env["trainer"]
    mesh = Mesh(np.array(jax.devices()[:2]), ("fsdp",))
    replicated = NamedSharding(mesh, P())

    def place(leaf):
        split = leaf.ndim >= 2 and leaf.shape[0] % 2 == 0
        return NamedSharding(mesh, P("fsdp") if split else P())

    # A run of its own (under pytest-xdist the other tests' runs may be on another worker).
    workdir = env["root"] / "sharded"
    trainer.run(workdir, env["sources"], tokenizer=env["tokenizer"], progress=False, stop_at=10)
    params = jax.tree.map(place, jax.eval_shape(lambda: trainer.initial_params))
    sharded = loop.Trainer(env["cfg"], params=trainer.initial_params,
                           state_sharding=trainer.state_shardings(params, replicated))
    manager = sharded.checkpoint_manager(workdir)
    step = manager.latest_step()
    state = sharded.restore(manager, step)
    manager.close()
    assert step == 10 and int(state.step) == 10
    kernel = state.params["mar"]["encoder_blocks_0"]["attn"]["qkv"]["kernel"]
    assert kernel.sharding.spec == P("fsdp") and len(kernel.sharding.device_set) == 2
    mu = state.opt_state.inner_states["train"].inner_state[1][0].mu["mar"]["encoder_blocks_0"]["attn"]["qkv"]["kernel"]
    assert mu.sharding == kernel.sharding
    assert state.ema["mar"]["encoder_blocks_0"]["attn"]["qkv"]["kernel"].sharding == kernel.sharding
