"""KL-16 VAE: layer by layer against the reference, then the whole, then the weight mapping.

Order: single blocks (ResnetBlock, AttnBlock, Downsample, Upsample) against PyTorch functional ops
on the fixture weights; encoder / quant convs / decoder each fed the reference's stored input and
checked at the stored debug intermediates; the full encode and decode; UniPic's token wrappers;
then the key table (round trip, error report, full-size layout by shape only).

Bounds: every comparison is one float32 forward pass, so it uses the forward bound
1e-4 x max|ref| (the reference's own float32-vs-float64 spread is ~1e-6 to 4e-6 of max|ref| for
these tensors, precision_summary.json); weight round trips are exact.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import unipic_1p5b
from convert import ConversionError, torch_to_flax
from convert.core import flatten
from convert.vae import VAE_KEYMAP, vae_param_shapes, vae_params_from_torch, vae_params_to_torch
from unipic_jax.models.vae import (AttnBlock, AutoencoderKL, Decoder, Downsample, Encoder, ResnetBlock,
                                   Upsample, VAEConfig)
from unipic_jax.parity import FORWARD
from unipic_jax.parity.vae import nchw, nhwc, vae_forward

from conftest import FIXTURE_ROOT, fixture


@pytest.fixture(scope="module")
def vae():
    """(config, converted params, state dict, io tensors) of the vae/ fixture."""
    fx = fixture("vae")
    config = VAEConfig(**fx.config().vae)
    return config, vae_params_from_torch(fx.weights, config), fx.weights, fx.io


def assert_close(got, ref, name):
    """Forward bound: |got - ref| <= 1e-4 * max|ref| (see the module docstring)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != {ref.shape}"
    err, bound = np.max(np.abs(got - ref)), FORWARD * np.max(np.abs(ref))
    assert err <= bound, f"{name}: max|err| {err:.3e} > bound {bound:.3e}"


def captured(module, params, x, paths):
    """Apply `module` (jitted) and return (output, [__call__ outputs of the submodules at `paths`])."""

    def wanted(mdl, method_name):
        return method_name == "__call__" and tuple(mdl.path) in paths

    def run(params, x):
        out, state = module.apply({"params": params}, x, mutable=["intermediates"], capture_intermediates=wanted)
        taken = []
        for path in paths:
            node = state["intermediates"]
            for name in path:
                node = node[name]
            taken.append(node["__call__"][0])
        return out, taken

    return jax.jit(run)(params, x)


# --- single blocks against PyTorch functional ops (written from the spec, fixture weights) ---

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _t(a):
    return torch.from_numpy(np.asarray(a))


def _t_norm(x, sd, prefix, config):
    weight, bias = _t(sd[f"{prefix}.weight"]), _t(sd[f"{prefix}.bias"])
    return F.group_norm(x, config.norm_groups, weight, bias, config.norm_eps)


def _t_conv(x, sd, prefix, **kwargs):
    return F.conv2d(x, _t(sd[f"{prefix}.weight"]), _t(sd[f"{prefix}.bias"]), **kwargs)


def _t_resnet(x, sd, prefix, config):
    h = _t_conv(F.silu(_t_norm(x, sd, f"{prefix}.norm1", config)), sd, f"{prefix}.conv1", padding=1)
    h = _t_conv(F.silu(_t_norm(h, sd, f"{prefix}.norm2", config)), sd, f"{prefix}.conv2", padding=1)
    if f"{prefix}.nin_shortcut.weight" in sd:
        x = _t_conv(x, sd, f"{prefix}.nin_shortcut")
    return x + h


def _t_attn(x, sd, prefix, config):
    b, c, height, width = x.shape
    h = _t_norm(x, sd, f"{prefix}.norm", config)
    q, k, v = (_t_conv(h, sd, f"{prefix}.{n}").reshape(b, c, height * width) for n in ("q", "k", "v"))
    weights = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * c ** -0.5, dim=2)
    out = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, height, width)
    return x + _t_conv(out, sd, f"{prefix}.proj_out")


def _random_input(channels, height, width, seed=0):
    return np.random.default_rng(seed).standard_normal((2, channels, height, width)).astype(np.float32)


def _sub(params, path):
    for name in path.split("/"):
        params = params[name]
    return params


def test_resnet_block_plain(vae):
    config, params, sd, _ = vae
    c = sd["encoder.mid.block_1.conv1.weight"].shape[0]
    x = _random_input(c, 5, 4)
    got = ResnetBlock(config, c).apply({"params": _sub(params, "encoder/mid/block_1")}, nhwc(x))
    assert_close(nchw(got), _t_resnet(_t(x), sd, "encoder.mid.block_1", config), "mid.block_1")


def test_resnet_block_with_nin_shortcut(vae):
    config, params, sd, _ = vae
    keys = sorted(k for k in sd if k.startswith("encoder.down.") and k.endswith(".nin_shortcut.weight"))
    if not keys:
        pytest.skip("this fixture's ch_mult never changes width in the encoder")
    prefix = keys[0].removesuffix(".nin_shortcut.weight")  # encoder.down.{l}.block.{b}
    out_ch, in_ch = sd[f"{prefix}.nin_shortcut.weight"].shape[:2]
    x = _random_input(in_ch, 6, 4)
    _, _, level, _, block = prefix.split(".")
    block_params = _sub(params, f"encoder/down_{level}/block_{block}")
    got = ResnetBlock(config, out_ch).apply({"params": block_params}, nhwc(x))
    assert_close(nchw(got), _t_resnet(_t(x), sd, prefix, config), prefix)


def test_attn_block(vae):
    config, params, sd, _ = vae
    c = sd["encoder.mid.attn_1.q.weight"].shape[0]
    x = _random_input(c, 6, 5)
    got = AttnBlock(config).apply({"params": _sub(params, "encoder/mid/attn_1")}, nhwc(x))
    assert_close(nchw(got), _t_attn(_t(x), sd, "encoder.mid.attn_1", config), "mid.attn_1")


def test_downsample_pads_right_and_bottom(vae):
    _, params, sd, _ = vae
    x = _random_input(sd["encoder.down.0.downsample.conv.weight"].shape[1], 7, 6)
    got = Downsample().apply({"params": _sub(params, "encoder/down_0/downsample")}, nhwc(x))
    ref = _t_conv(F.pad(_t(x), (0, 1, 0, 1)), sd, "encoder.down.0.downsample.conv", stride=2)
    assert_close(nchw(got), ref, "down_0.downsample")


def test_upsample_nearest(vae):
    _, params, sd, _ = vae
    x = _random_input(sd["decoder.up.1.upsample.conv.weight"].shape[1], 3, 4)
    got = Upsample().apply({"params": _sub(params, "decoder/up_1/upsample")}, nhwc(x))
    doubled = F.interpolate(_t(x), scale_factor=2.0, mode="nearest")
    ref = _t_conv(doubled, sd, "decoder.up.1.upsample.conv", padding=1)
    assert_close(nchw(got), ref, "up_1.upsample")


# --- the stacks, each fed the reference's own stored input ---

def test_encoder_mid_attention_and_output(vae):
    config, params, _, io = vae
    out, (mid_attn,) = captured(Encoder(config), params["encoder"], nhwc(io["x"]), (("mid", "attn_1"),))
    assert_close(nchw(mid_attn), io["enc_mid_attn"], "encoder.mid.attn_1")
    assert_close(nchw(out), io["enc_out"], "encoder output")


def test_quant_convs(vae):
    config, params, _, io = vae
    model = AutoencoderKL(config)
    moments = model.apply({"params": params}, nhwc(io["enc_out"]), method=lambda m, h: m.quant_conv(h))
    assert_close(nchw(moments), io["moments"], "quant_conv")
    dec_in = model.apply({"params": params}, nhwc(io["mode"]), method=lambda m, z: m.post_quant_conv(z))
    assert_close(nchw(dec_in), io["dec_in"], "post_quant_conv")


def test_decoder_mid_output_and_output(vae):
    config, params, _, io = vae
    out, (mid_out,) = captured(Decoder(config), params["decoder"], nhwc(io["dec_in"]), (("mid", "block_2"),))
    assert_close(nchw(mid_out), io["dec_mid_out"], "decoder.mid.block_2")
    assert_close(nchw(out), io["decoded"], "decoder output")


# --- the whole VAE ---

def test_encode(vae):
    config, params, _, io = vae
    got = vae_forward(config)(params, nhwc(io["x"]))
    for name in ("mean", "logvar", "std", "mode"):
        assert_close(nchw(got[name]), io[name], name)


def test_decode(vae):
    config, params, _, io = vae
    decode = jax.jit(lambda p, z: AutoencoderKL(config).apply({"params": p}, z, method="decode"))
    assert_close(nchw(decode(params, nhwc(io["mode"]))), io["decoded"], "decode(mode)")


def test_logvar_is_clamped(vae):
    # The fixture's logvar stays far inside [-30, 20]; force both ends through quant_conv's bias.
    config, params, _, io = vae
    e = config.embed_dim
    push = np.where(np.arange(e) % 2 == 1, 1e4, -1e4).astype(np.float32)
    bias = np.concatenate([np.zeros(e, np.float32), push])
    params = {**params, "quant_conv": {**params["quant_conv"], "bias": bias}}
    _, logvar = AutoencoderKL(config).apply({"params": params}, nhwc(io["x"]), method="encode")
    np.testing.assert_array_equal(np.asarray(logvar)[..., 1::2], 20.0)
    np.testing.assert_array_equal(np.asarray(logvar)[..., 0::2], -30.0)


# --- UniPic's token wrappers (unipic/parts) ---

@pytest.fixture(scope="module")
def unipic_vae():
    fx = fixture("unipic")
    cfg = fx.config()
    config = VAEConfig(**cfg.vae)
    sd = {k.removeprefix("vae."): v for k, v in fx.weights.items() if k.startswith("vae.")}
    return config, cfg.vae_scale, vae_params_from_torch(sd, config), fx.file("parts")


def test_encode_tokens(unipic_vae):
    config, scale, params, parts = unipic_vae
    model = AutoencoderKL(config)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, scale, method="encode_tokens"))
    assert_close(encode(params, nhwc(parts["img"])), parts["encode"], "encode_tokens")


def test_decode_tokens(unipic_vae):
    config, scale, params, parts = unipic_vae
    model = AutoencoderKL(config)
    decode = jax.jit(lambda p, t: model.apply({"params": p}, t, scale, method="decode_tokens"))
    assert_close(nchw(decode(params, parts["toks"])), parts["decode"], "decode_tokens")


def test_encode_tokens_rejects_sizes_not_multiple_of_downsampling(vae):
    config, params, _, _ = vae
    f = config.downsample_factor
    x = jnp.zeros((1, f + 1, f, config.in_channels))
    with pytest.raises(ValueError, match=rf"{f + 1}x{f}.*multiples of {f}"):
        AutoencoderKL(config).apply({"params": params}, x, 1.0, method="encode_tokens")


def test_compute_dtype_keeps_params_float32(vae):
    config, _, _, io = vae
    model = AutoencoderKL(config, dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct(nhwc(io["x"]).shape, jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    assert jax.eval_shape(model.apply, variables, x).dtype == jnp.bfloat16


# --- the key table ---

def test_round_trip_is_bit_identical(vae):
    _, params, sd, _ = vae
    back = vae_params_to_torch(params)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_conversion_reports_every_problem_at_once(vae):
    config, _, sd, _ = vae
    bad = dict(sd)
    del bad["encoder.conv_in.bias"]                                           # removed
    bad["decoder.norm_output.weight"] = bad.pop("decoder.norm_out.weight")    # renamed
    bad["quant_conv.weight"] = bad["quant_conv.weight"][:, :-1]               # reshaped
    with pytest.raises(ConversionError) as e:
        vae_params_from_torch(bad, config)
    msg = str(e.value)
    assert "missing param 'encoder/conv_in/bias'" in msg and "'encoder.conv_in.bias'" in msg
    assert "unmapped source key 'decoder.norm_output.weight'" in msg
    assert "missing param 'decoder/norm_out/scale'" in msg
    assert "shape mismatch for 'quant_conv.weight'" in msg
    assert len(e.value.problems) == 4


def test_full_size_layout():
    """Every full-size `vae.*` checkpoint key lands on a param of the right shape and every param
    is filled; shapes only (jax.eval_shape, zero-stride numpy views), nothing allocated."""
    layout = json.loads((FIXTURE_ROOT / "full_scale_keys.json").read_text())
    entries = layout["keys"]["vae"]
    assert entries and all(e["key"].startswith("vae.") for e in entries)
    fake = {e["key"].removeprefix("vae."): np.broadcast_to(np.float32(0), e["shape"]) for e in entries}
    target = vae_param_shapes(VAEConfig(**unipic_1p5b.get_config().vae))
    mapped = flatten(torch_to_flax(fake, VAE_KEYMAP, target, what="full-size VAE layout"))
    want = flatten(target)
    assert set(mapped) == set(want)
    assert all(mapped[p].shape == want[p].shape for p in want)
    n_params = sum(int(np.prod(leaf.shape)) for leaf in want.values())
    assert n_params == layout["components"]["vae"]["num_unique_parameters"]
