"""LoRA training (`--set lora.rank=...`, unipic_jax/train/lora.py) on the tiny smoke stage: the
loss falls, only adapters change and carry optimizer state, a resume is bitwise, the merge
(`convert WORKDIR DST`) is base + A @ B * alpha / rank and generates, bad settings are one line.

One Trainer (one compiled step) serves every test: an uninterrupted 6-step run without
checkpoints is the reference; a second run stops after step 3 (its checkpoint) and resumes to 6.
"""

import jax
import numpy as np
import pytest
import qwix
from flax import traverse_util

from unipic_jax import checkpoint, cli, quant
from unipic_jax.train import data, loop, lora, runs

SPEC = "smoke:batch=3"
RANK, ALPHA = 4, 8.0
# lr 1e-2: a few steps must move the zero-initialised B visibly (smoke's 1e-3 is tuned for full training).
OVERRIDES = ["total_steps=6", "checkpoint.every=3", "checkpoint.keep=3", "optim.lr=0.01",
             f"lora.rank={RANK}", f"lora.alpha={ALPHA}"]


def bits(x):
    return np.asarray(x).view(np.uint32)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    cfg = loop.apply_overrides(loop.load_stage_config(SPEC), OVERRIDES)
    trainer = loop.Trainer(cfg)
    base_before = jax.tree.map(np.array, trainer.base)
    tokenizer = loop.load_tokenizer(cfg, root / "tok")
    sources = data.parse_data_spec(str(data.write_synthetic(root / "data", size=cfg.data.gen_resolution)))
    reference = trainer.run(root / "ref", sources, tokenizer=tokenizer, collect=True, progress=False,
                            checkpoints=False)
    run = lambda workdir, **kw: trainer.run(workdir, sources, tokenizer=tokenizer, progress=False, **kw)
    return dict(root=root, cfg=cfg, trainer=trainer, tokenizer=tokenizer, sources=sources, run=run,
                reference=reference, base_before=base_before)


def test_loss_falls_and_only_adapters_change(env):
    """Step 1's loss is the base model's loss on batch 0 (B = 0: the merged kernels are the base's
    bit for bit). Five AdamW steps on batches of the same synthetic distribution move the adapters
    down the loss's gradient, so the same batch 0 with the same key (same MAR masks, noise,
    dropout) must then have a lower loss."""
    trainer, cfg, ref = env["trainer"], env["cfg"], env["reference"]
    dataset = data.make_dataset(cfg, env["tokenizer"], data.resolve_sources(env["sources"], env["root"] / "ref", cfg))
    batch = next(iter(dataset))
    for b in batch.values():
        b.pop("num_skipped")
    key0 = jax.random.fold_in(jax.random.key(cfg.seed), 0)
    final = jax.tree.map(lambda x: x.copy(), ref.state)  # the step donates its state
    _, after, _ = trainer.step(final, trainer.batch_sharding(batch), key0)
    before = ref.history[0]["loss"]
    assert np.isfinite(before) and float(after["loss"]) < 0.97 * before, (before, float(after["loss"]))

    # The base (the step's never-donated argument) is bit-identical after the runs.
    for a, b in zip(jax.tree.leaves(env["base_before"]), jax.tree.leaves(trainer.base)):
        np.testing.assert_array_equal(bits(a), bits(b))
    # Every B moved off zero; A moved too (from step 2 on, once B is not zero).
    start = traverse_util.flatten_dict(trainer.initial_params, sep="/")
    end = traverse_util.flatten_dict(ref.state.params, sep="/")
    assert set(start) == set(end) and all(k.endswith(("/lora_a", "/lora_b")) for k in end)
    assert all(not np.all(np.asarray(start[k]) == 0) for k in start if k.endswith("lora_a"))
    assert all(np.all(np.asarray(start[k]) == 0) for k in start if k.endswith("lora_b"))
    assert all(not np.array_equal(start[k], end[k]) for k in start)


def test_state_is_adapters_only(env):
    trainer = env["trainer"]
    adapters = quant.lora_paths(trainer.initial_params)
    # Default modules: the LLM's q/k/v/o and gate/up/down, MAR's qkv/proj/fc1/fc2 per block.
    cfg = env["cfg"]
    want = 7 * cfg.model.qwen2.num_layers + 4 * (cfg.model.mar.encoder_depth + cfg.model.mar.decoder_depth)
    assert len(adapters) == want, adapters
    assert all(p.startswith(("llm/layers_", "mar/encoder_blocks_", "mar/decoder_blocks_")) for p in adapters)
    state = env["reference"].state
    n_adapter = len(jax.tree.leaves(state.params))
    assert n_adapter == 2 * want
    mu = state.opt_state.inner_states["train"].inner_state[1][0].mu
    assert len(jax.tree.leaves(mu)) == n_adapter and len(jax.tree.leaves(state.ema)) == n_adapter
    state_bytes = quant.tree_bytes((state.params, state.opt_state, state.ema))
    full = loop.Trainer(loop.apply_overrides(loop.load_stage_config(SPEC), ["lora.rank=0"]), params=trainer.base)
    shapes = jax.eval_shape(full.init_state)
    full_bytes = quant.tree_bytes((shapes.params, shapes.opt_state, shapes.ema))
    assert state_bytes < 0.25 * full_bytes, (state_bytes, full_bytes)  # tiny model: 64-wide, rank 4


def test_resume_is_bitwise_and_checkpoints_hold_adapters(env):
    workdir = env["root"] / "resumed"
    env["run"](workdir, stop_at=3)
    assert runs.run_steps(workdir)[-1] == 3
    record = lora.read_record(workdir)
    assert record["rank"] == RANK and record["alpha"] == ALPHA and record["base"] == {"init_from": "", "seed": 0}
    resumed = env["run"](workdir, collect=True)
    assert resumed.start_step == 3 and resumed.history == env["reference"].history[3:]
    for a, b in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(env["reference"].state.params)):
        np.testing.assert_array_equal(bits(a), bits(b))
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointHandler().metadata(workdir / "checkpoints" / "6" / "state").tree
    stored = traverse_util.flatten_dict(tree["params"], sep="/")
    assert all(k.endswith(("/lora_a", "/lora_b")) for k in stored)
    assert len(stored) == 2 * record["kernels"] == len(jax.tree.leaves(resumed.state.params))
    # Another setting or full training cannot resume this workdir.
    other = loop.Trainer(loop.apply_overrides(loop.load_stage_config(SPEC), OVERRIDES[:-1] + ["lora.alpha=4"]),
                         params=env["trainer"].base)
    with pytest.raises(ValueError, match="alpha=8.0") as raised:
        other.run(workdir, env["sources"], tokenizer=env["tokenizer"], progress=False)
    assert "\n" not in str(raised.value)
    env["resumed"] = resumed


def test_merge_is_base_plus_scaled_product_and_generates(env, tmp_path):
    if "resumed" in env:
        workdir, state = env["root"] / "resumed", env["resumed"].state
    else:  # under pytest-xdist the resume test may have run on the other worker: a run of its own
        workdir = env["root"] / "merge"
        state = env["run"](workdir, collect=True).state
    dst = tmp_path / "merged"
    assert cli.main(["convert", str(workdir), str(dst), "--weights", "params"]) == 0
    _, merged = checkpoint.load(dst)
    base = traverse_util.flatten_dict(env["base_before"], sep="/")
    adapters = traverse_util.flatten_dict(state.params, sep="/")
    flat = traverse_util.flatten_dict(merged, sep="/")
    scale = np.float32(ALPHA / RANK)
    adapted = quant.lora_paths(state.params)
    for path, value in flat.items():
        if path in adapted:
            a, b = np.asarray(adapters[path + "/lora_a"]), np.asarray(adapters[path + "/lora_b"])
            want = base[path] + (a.astype(np.float64) @ b) * scale
            np.testing.assert_allclose(value, want, rtol=0, atol=1e-6 * np.abs(want).max())
            assert not np.array_equal(value, base[path])
        else:
            np.testing.assert_array_equal(bits(value), bits(base[path]))
    # Exactly the function the train step uses (base + (A @ B) * alpha / rank, one merge).
    again = quant.lora_merge(env["base_before"], state.params, ALPHA / RANK)
    for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(merged)):
        np.testing.assert_array_equal(bits(x), bits(y))
    # A merge with B = 0 is the base bit for bit.
    zero_b = jax.tree_util.tree_map_with_path(
        lambda p, x: np.zeros_like(x) if jax.tree_util.keystr(p).endswith("'lora_b']") else x,
        state.params)
    for x, y in zip(jax.tree.leaves(quant.lora_merge(env["base_before"], zero_b, ALPHA / RANK)),
                    jax.tree.leaves(env["base_before"])):
        np.testing.assert_array_equal(bits(x), bits(y))

    from unipic_jax.api import UniPicPipeline

    pipe = UniPicPipeline.from_pretrained(dst, tokenizer=env["root"] / "tok" / "tokenizer")  # the stand-in
    size = env["cfg"].data.gen_resolution
    images = pipe.generate("a red square", size=size, steps=2, seed=0, progress=False)
    assert images[0].size == (size, size)


def test_qlora_trains_on_a_quantized_base(env):
    """QLoRA (`lora.quantize=int8`): the frozen base the step reads is quantized (the LLM's and
    MAR's kernels and the token table are QArrays), a step trains the adapters, and its
    loss (B = 0: the quantized base's own loss on batch 0, same key) is within 2 % of the float
    base's: int8 moves the tiny model's outputs by about 3 % of their range at most (README
    table), and a loss averages such errors over every token. A wrong scale or a dequantization
    never applied moves it by far more."""
    cfg = loop.apply_overrides(env["cfg"], ["lora.quantize=int8", "total_steps=1"])
    trainer = loop.Trainer(cfg, params=env["trainer"].base)
    flat = traverse_util.flatten_dict(trainer.base, sep="/", is_leaf=lambda _, x: isinstance(x, qwix.QArray))
    assert isinstance(flat["llm/embed_tokens/embedding"], qwix.QArray)
    assert isinstance(flat["mar/encoder_blocks_0/attn/qkv/kernel"], qwix.QArray)
    assert not isinstance(flat["diffusion_head/input_proj/kernel"], qwix.QArray)
    out = trainer.run(env["root"] / "qlora", env["sources"], tokenizer=env["tokenizer"], collect=True,
                      progress=False, checkpoints=False)
    losses = [h["loss"] for h in out.history]
    assert len(losses) == 1 and np.isfinite(losses[0])
    reference = env["reference"].history[0]["loss"]
    assert abs(losses[0] - reference) <= 0.02 * reference, (losses[0], reference)
    start = traverse_util.flatten_dict(trainer.initial_params, sep="/")
    end = traverse_util.flatten_dict(out.state.params, sep="/")
    assert all(not np.array_equal(start[k], end[k]) for k in start if k.endswith("lora_b"))


BAD = {
    "lora.rank=-1": "lora.rank=-1",
    "lora.rank=1.5": "lora.rank",
    "lora.alpha=0": "lora.alpha=0",
    "lora.alpha=nan": "lora.alpha",
    "lora.alpha=abc": "lora.alpha='abc'",
    "lora.modules=(": "not a regular expression",
    "lora.modules=vae/.*": "matches no Dense kernel the stage trains",
    "lora.quantize=int3": "lora.quantize='int3'",
    "lora.nothing=1": "lora.nothing",
}


@pytest.mark.parametrize("item", list(BAD))
def test_bad_lora_sets_are_one_line_errors(item, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "Trainer", lambda *a, **k: pytest.fail("the trainer was built"))
    sets = [item] if item.startswith("lora.rank") or item == "lora.nothing=1" else ["lora.rank=4", item]
    with pytest.raises(ValueError) as raised:
        loop.train_main("smoke", "synthetic", str(tmp_path / "w"), sets, progress=False)
    message = str(raised.value)
    assert "\n" not in message and BAD[item] in message, message
    assert not (tmp_path / "w").exists()


def test_cli_bad_lora_is_exit_2(tmp_path, capsys):
    code = cli.main(["train", "--config", "smoke", "--data", "synthetic", "--workdir", str(tmp_path / "w"),
                     "--set", "lora.rank=8", "--set", "lora.alpha=-1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("unipic-jax: error:") and err.count("\n") == 1 and "lora.alpha" in err, err
