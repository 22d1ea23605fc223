"""Parity rows for the DiffLoss part of mar/: the head, the schedules, the losses, the sampler.

Bounds: FORWARD (1e-4 x max|ref|) for the head and the losses, CHAIN (1e-3 x max|ref|) for the
sampled chains, exact for timestep maps. Schedule arrays are compared in float64, before the
float32 cast, with SCHEDULE_REL: the port evaluates the reference's own numpy formulas, so they
agree to float64 round-off (numpy's vectorised log/sqrt may differ by an ulp across CPUs).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Iterator

import jax
import numpy as np

from convert.diffusion import head_params_from_torch
from unipic_jax.models import diffusion
from unipic_jax.parity import CHAIN, FORWARD, Fixture, Row, compare, compare_exact, draws

COMPONENT = "mar"
SCHEDULE_REL = 1e-12


def setup(fx: Fixture):
    """(config, model, params) of the fixture's diffusion head."""
    config = diffusion.DiffusionConfig(**fx.config().diffusion)
    model = diffusion.SimpleMLPAdaLN(config)
    return config, model, head_params_from_torch(fx.weights, config)


def schedule_for(config: diffusion.DiffusionConfig, group: str) -> diffusion.Schedule:
    """The schedule a `schedules.safetensors` group describes: `train_<n>` or `gen_<respacing>`."""
    kind, _, spacing = group.partition("_")
    if kind == "train":
        if int(spacing) != config.num_train_steps:
            raise ValueError(f"schedule group {group!r} != num_train_steps {config.num_train_steps}")
        return diffusion.train_schedule(config)
    if kind == "gen":
        return diffusion.sampling_schedule(config, spacing)
    raise ValueError(f"unknown schedule group {group!r}")


def sample_cases(fx: Fixture) -> list[str]:
    """Names of the `DiffLoss.sample` cases (`<case>/out` with draws in meta.random_draws)."""
    cases = (k[: -len("/out")] for k in fx.io if k.startswith("sample_") and k.endswith("/out"))
    return sorted(c for c in cases if c in fx.meta["random_draws"])


def run_sample_case(fx: Fixture, case: str, model, params, config) -> tuple[np.ndarray, dict]:
    """Replay one recorded `DiffLoss.sample` call; returns (output, its meta entry)."""
    info = fx.meta["random_draws"][case]
    recorded = draws(fx.io, case + "/")
    cfg = float(info["cfg"])
    tables = diffusion.sampling_schedule(config, str(info["num_sampling_steps"])).tables()
    out = _jitted_sample(model, guided=cfg != 1.0)(
        params, tables, fx.io[f"{case}/z"], recorded[0], np.stack(recorded[1:]),
        temperature=float(info["temperature"]), cfg=cfg)
    return np.asarray(out), info


@functools.cache
def _jitted_sample(model, guided: bool):
    return jax.jit(functools.partial(diffusion.sample, model, guided=guided))


def rows(fx: Fixture) -> Iterator[Row]:
    io = fx.io
    config, model, params = setup(fx)
    variables = {"params": params}

    t = io["head/t"]
    yield compare(COMPONENT, "head/t_freq", diffusion.timestep_features(t), io["head/t_freq"], FORWARD)
    yield compare(COMPONENT, "head/t_emb", model.apply(variables, t, method=model.embed_time),
                  io["head/t_emb"], FORWARD)
    yield compare(COMPONENT, "head/out", model.apply(variables, io["head/x"], t, io["head/c"]),
                  io["head/out"], FORWARD)
    for key in sorted(k for k in io if re.fullmatch(r"head/out_cfg[0-9.]+", k)):
        scale = float(key[len("head/out_cfg"):])
        got = model.apply(variables, io["head/x"], t, io["head/c"], scale, method=model.forward_with_cfg)
        yield compare(COMPONENT, key, got, io[key], FORWARD)

    stored = fx.file("schedules")
    for group in sorted({k.split("/")[0] for k in stored}):
        schedule = schedule_for(config, group)
        for name in sorted(k.split("/", 1)[1] for k in stored if k.startswith(group + "/")):
            ref, got = stored[f"{group}/{name}"], getattr(schedule, name)
            if np.issubdtype(ref.dtype, np.integer):
                yield compare_exact(COMPONENT, f"schedules/{group}/{name}", got, ref)
            else:
                row = compare(COMPONENT, f"schedules/{group}/{name}", got, ref, SCHEDULE_REL)
                yield dataclasses.replace(row, note="float64")

    train_tables = diffusion.train_schedule(config).tables()
    losses = jax.jit(functools.partial(diffusion.training_losses, model))(
        params, train_tables, io["train_losses/x_start"], io["train_losses/t"],
        io["train_losses/noise"], io["train_losses/c"])
    for name in ("loss", "mse", "vb"):
        yield compare(COMPONENT, f"train_losses/{name}", losses[name], io[f"train_losses/{name}"], FORWARD)

    t_draw, noise_draw = draws(io, "forward_loss/")
    loss = diffusion.forward_loss(model, params, train_tables, io["forward_loss/z"],
                                  io["forward_loss/target"], io["forward_loss/mask"], t_draw, noise_draw,
                                  fx.config().mar.diffusion_batch_mul)
    yield compare(COMPONENT, "forward_loss/loss", loss, io["forward_loss/loss"], FORWARD)

    for case in sample_cases(fx):
        out, info = run_sample_case(fx, case, model, params, config)
        steps = str(info["num_sampling_steps"])
        kept = diffusion.sampling_schedule(config, steps).timestep_map
        yield compare_exact(COMPONENT, f"{case}/timestep_map", kept, np.asarray(info["timestep_map"]))
        yield compare(COMPONENT, f"{case}/out", out, io[f"{case}/out"], CHAIN)
