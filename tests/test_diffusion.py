"""DiffLoss against the PyTorch reference fixtures (mar/): the head layer by layer, the schedules,
the training losses, the sampling chains, compile-once, and the `diffloss.net.*` key table.

Bounds (see unipic_jax/parity/__init__.py): single forwards and losses 1e-4 x max|ref| (float32
rounding; the reference's own float64-vs-float32 spread is ~1e-5), sampling chains 1e-3 x max|ref|
(random-weight chains amplify rounding up to ~1e3), schedules 1e-12 relative in float64 (the same
numpy formulas as the reference), integers exact.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import unipic_1p5b
from convert import ConversionError, torch_to_flax
from convert.diffusion import HEAD_KEYMAP, HEAD_PREFIX, head_params_from_torch, head_params_to_torch
from unipic_jax.models import diffusion
from unipic_jax.parity import CHAIN, FORWARD, draws
from unipic_jax.parity import diffloss as diffloss_parity

from conftest import FIXTURE_ROOT, fixture

FX = fixture("mar")
SCHEDULE_REL = diffloss_parity.SCHEDULE_REL


def assert_close(got, ref, rel, what):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    err, bound = np.max(np.abs(got - ref)), rel * np.max(np.abs(ref))
    assert err <= bound, f"{what}: max|err| {err:.3e} > {bound:.3e}"


@pytest.fixture(scope="module")
def head():
    config, model, params = diffloss_parity.setup(FX)
    return config, model, params


# ---------------------------------------------------------------------------------------------
# The head, layer by layer


def test_timestep_features():
    # FORWARD: float32 sinusoid; the frequencies may differ from torch's exp by 1 ulp, which at
    # t = 999 moves an argument by ~3e-5 (measured 3.1e-5 of max).
    got = diffusion.timestep_features(FX.io["head/t"])
    assert got.dtype == jnp.float32
    assert_close(got, FX.io["head/t_freq"], FORWARD, "t_freq")


def test_time_embedding(head):
    _, model, params = head
    got = model.apply({"params": params}, FX.io["head/t"], method=model.embed_time)
    assert_close(got, FX.io["head/t_emb"], FORWARD, "t_emb")  # FORWARD: one float32 MLP


def test_head_forward(head):
    _, model, params = head
    io = FX.io
    got = model.apply({"params": params}, io["head/x"], io["head/t"], io["head/c"])
    assert_close(got, io["head/out"], FORWARD, "head out")  # FORWARD: one float32 forward


def test_head_forward_with_cfg(head):
    _, model, params = head
    io = FX.io
    keys = [k for k in io if k.startswith("head/out_cfg")]
    assert keys
    for key in keys:
        scale = float(key[len("head/out_cfg"):])
        got = model.apply({"params": params}, io["head/x"], io["head/t"], io["head/c"], scale,
                          method=model.forward_with_cfg)
        assert_close(got, io[key], FORWARD, key)  # FORWARD: one forward + the guidance combination


# ---------------------------------------------------------------------------------------------
# Schedules


def _schedule_groups():
    stored = FX.file("schedules")
    return stored, sorted({k.split("/")[0] for k in stored})


def test_respacing_keeps_the_stored_steps(head):
    config = head[0]
    stored, groups = _schedule_groups()
    assert any(g.startswith("gen_") for g in groups) and any(g.startswith("train_") for g in groups)
    for group in groups:
        got = diffloss_parity.schedule_for(config, group).timestep_map
        np.testing.assert_array_equal(got, stored[f"{group}/timestep_map"], err_msg=group)


def test_schedule_arrays_match_float64_reference(head):
    config = head[0]
    stored, groups = _schedule_groups()
    for group in groups:
        schedule = diffloss_parity.schedule_for(config, group)
        names = [k.split("/", 1)[1] for k in stored
                 if k.startswith(group + "/") and not k.endswith("timestep_map")]
        assert "betas" in names and "posterior_log_variance_clipped" in names
        for name in names:
            assert_close(getattr(schedule, name), stored[f"{group}/{name}"], SCHEDULE_REL, f"{group}/{name}")


def test_tables_are_float32_casts_of_float64(head):
    schedule = diffusion.sampling_schedule(head[0])
    tables = schedule.tables()
    assert tables.num_steps == schedule.num_steps
    np.testing.assert_array_equal(tables.posterior_mean_coef1,
                                  schedule.posterior_mean_coef1.astype(np.float32))
    # log β is taken in float64, then cast (the reference gathers np.log(betas) then .float()).
    np.testing.assert_array_equal(tables.log_betas, np.log(schedule.betas).astype(np.float32))


def test_released_schedule_constants():
    # reference-spec §4.2/§4.4 at the released config: cosine betas capped at 0.2, 100 steps.
    config = diffusion.DiffusionConfig(**unipic_1p5b.get_config().diffusion)
    raw = diffusion.cosine_betas(config.num_train_steps, config.max_beta)
    assert np.count_nonzero(raw == 0.2) == 9 and np.all(raw[991:] == 0.2)
    np.testing.assert_allclose(raw[:4], [4.12842e-5, 4.61418e-5, 5.09995e-5, 5.58574e-5], rtol=1e-5)
    train = diffusion.train_schedule(config)  # a SpacedDiffusion keeping every step: betas re-derived
    np.testing.assert_allclose(train.betas, raw, rtol=1e-12)
    np.testing.assert_allclose(train.alphas_cumprod[-1], 2.6403e-5, rtol=1e-4)
    gen = diffusion.sampling_schedule(config)
    assert gen.num_steps == 100 and gen.timestep_map[:7].tolist() == [0, 10, 20, 30, 40, 50, 61]
    np.testing.assert_allclose(gen.betas[:3], [4.12842e-5, 6.79840e-4, 1.16552e-3], rtol=1e-5)
    np.testing.assert_allclose(gen.betas[-3:], [0.555376, 0.749939, 0.891282], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Training


def test_training_losses(head):
    config, model, params = head
    io = FX.io
    t = io["train_losses/t"]
    assert (t == 0).any(), "fixture must exercise the t = 0 decoder-NLL branch"
    tables = diffusion.train_schedule(config).tables()
    got = diffusion.training_losses(model, params, tables, io["train_losses/x_start"], t,
                                    io["train_losses/noise"], io["train_losses/c"])
    for name in ("loss", "mse", "vb"):  # FORWARD: one forward + closed forms
        assert_close(got[name], io[f"train_losses/{name}"], FORWARD, name)
    # The decoder-NLL rows on their own (their scale differs from the KL rows').
    zero = t == 0
    assert_close(np.asarray(got["vb"])[zero], io["train_losses/vb"][zero], FORWARD, "vb at t=0")


def test_forward_loss(head):
    config, model, params = head
    io = FX.io
    t, noise = draws(io, "forward_loss/")
    mul = FX.config().mar.diffusion_batch_mul
    assert t.shape[0] == io["forward_loss/mask"].size * mul
    tables = diffusion.train_schedule(config).tables()
    loss = diffusion.forward_loss(model, params, tables, io["forward_loss/z"], io["forward_loss/target"],
                                  io["forward_loss/mask"], t, noise, mul)
    assert_close(loss, io["forward_loss/loss"], FORWARD, "forward_loss")  # FORWARD: a masked mean of losses


# ---------------------------------------------------------------------------------------------
# Sampling


@pytest.mark.parametrize("case", diffloss_parity.sample_cases(FX))
def test_sample_chain(head, case):
    config, model, params = head
    got, _ = diffloss_parity.run_sample_case(FX, case, model, params, config)
    assert got.shape == FX.io[f"{case}/out"].shape  # both halves when guided
    assert_close(got, FX.io[f"{case}/out"], CHAIN, case)  # CHAIN: a whole reverse chain


def test_sample_cases_cover_cfg_and_no_cfg():
    cfgs = {FX.meta["random_draws"][c]["cfg"] != 1.0 for c in diffloss_parity.sample_cases(FX)}
    assert cfgs == {True, False}


def test_sampler_compiles_once_per_shape(head):
    config, model, params = head
    tables = diffusion.sampling_schedule(config, "10").tables()
    z = FX.io["sample_cfg_steps10/z"]
    traces = []

    @jax.jit
    def run(noise_init, step_noise, cfg):
        traces.append(1)  # runs only while tracing
        return diffusion.sample(model, params, tables, z, noise_init, step_noise,
                                temperature=0.9, cfg=cfg, guided=True)

    outs = []
    for seed, cfg in ((0, 3.0), (1, 2.5)):  # new noise and a new (traced) guidance scale
        noise_init, step_noise = diffusion.draw_sample_noise(
            jax.random.key(seed), z.shape[0], config.token_dim, tables.num_steps, guided=True)
        assert noise_init.shape == (z.shape[0] // 2, config.token_dim)
        assert step_noise.shape == (tables.num_steps, z.shape[0], config.token_dim)
        outs.append(np.asarray(run(noise_init, step_noise, jnp.float32(cfg))))
    assert len(traces) == 1
    assert not np.allclose(outs[0], outs[1])


# ---------------------------------------------------------------------------------------------
# Key table


def test_round_trip_is_bit_identical(head):
    config = head[0]
    src = {k: v for k, v in FX.weights.items() if k.startswith(HEAD_PREFIX)}
    back = head_params_to_torch(head_params_from_torch(FX.weights, config))
    assert set(back) == set(src)
    for key, value in src.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_conversion_reports_every_problem_at_once(head):
    config = head[0]
    bad = {k: v for k, v in FX.weights.items() if k.startswith(HEAD_PREFIX)}
    del bad[HEAD_PREFIX + "cond_embed.bias"]  # removed
    renamed = bad.pop(HEAD_PREFIX + "res_blocks.0.in_ln.weight")
    bad[HEAD_PREFIX + "res_blocks.0.in_ln.gain"] = renamed
    w = bad[HEAD_PREFIX + "input_proj.weight"]
    bad[HEAD_PREFIX + "input_proj.weight"] = w.reshape(w.shape[::-1])  # reshaped
    with pytest.raises(ConversionError) as e:
        head_params_from_torch(bad, config)
    msg = str(e.value)
    assert "missing param 'cond_embed/bias'" in msg and "'cond_embed.bias'" in msg
    assert "unmapped source key 'res_blocks.0.in_ln.gain'" in msg
    assert "missing param 'res_blocks_0/in_ln/scale'" in msg
    assert "shape mismatch for 'input_proj.weight'" in msg


def test_full_scale_layout():
    # Every mar.diffloss.net.* key of the released checkpoint maps onto the full-size head with the
    # right shape, and every param is filled; zero-stride arrays, shapes via jax.eval_shape only.
    layout = json.loads((FIXTURE_ROOT / "full_scale_keys.json").read_text())
    prefix = "mar." + HEAD_PREFIX
    keys = {e["key"][len(prefix):]: tuple(e["shape"])
            for e in layout["keys"]["mar"] if e["key"].startswith(prefix)}
    assert keys
    config = diffusion.DiffusionConfig(**unipic_1p5b.get_config().diffusion)
    target = diffusion.head_param_shapes(config)
    sd = {k: np.broadcast_to(np.zeros((), np.float32), shape) for k, shape in keys.items()}
    params = torch_to_flax(sd, HEAD_KEYMAP, target, what="full-size diffusion head")
    assert len(jax.tree_util.tree_leaves(params)) == len(keys) == len(jax.tree_util.tree_leaves(target))
    assert params["res_blocks_11"]["adaLN_modulation_1"]["kernel"].shape == (config.width, 3 * config.width)
