"""MAR encoder/decoder, layer by layer: one timm block, the position-table resize, the encoder and
decoder at every fixture grid and mask kind, compile counts, and the checkpoint mapping (round
trip, error report, full-size layout). Sizes come from mar/meta.json and the io keys."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs import unipic_1p5b
from convert.core import ConversionError, flatten, torch_to_flax
from convert.mar import (BLOCK_KEYMAP, MAR_KEYMAP, is_diffloss_key, mar_params_from_torch,
                         mar_params_to_torch)
from unipic_jax.models.mar import (Block, MARConfig, apply_encode, param_shapes, resize_pos_embed,
                                   visible_positions)
from unipic_jax.parity import format_row
from unipic_jax.parity import mar_encdec

from conftest import FIXTURE_ROOT, fixture

FX = fixture("mar")
GRIDS = mar_encdec.grids(FX.io)


def _config() -> MARConfig:
    return MARConfig(**FX.config().mar)


def _torch_block(sd: dict, x: np.ndarray, num_heads: int, eps: float) -> np.ndarray:
    """timm 0.9.12 `Block.forward` written with torch ops, in float64."""
    t = {k: torch.from_numpy(v).double() for k, v in sd.items()}
    x = torch.from_numpy(x).double()
    b, l, d = x.shape
    h = F.layer_norm(x, (d,), t["norm1.weight"], t["norm1.bias"], eps)
    qkv = F.linear(h, t["attn.qkv.weight"], t["attn.qkv.bias"])
    q, k, v = qkv.reshape(b, l, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4)
    attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, l, d)
    x = x + F.linear(attn, t["attn.proj.weight"], t["attn.proj.bias"])
    h = F.layer_norm(x, (d,), t["norm2.weight"], t["norm2.bias"], eps)
    h = F.linear(F.gelu(F.linear(h, t["mlp.fc1.weight"], t["mlp.fc1.bias"])),
                 t["mlp.fc2.weight"], t["mlp.fc2.bias"])
    return (x + h).numpy()


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_block_matches_timm(stack):
    config = _config()
    width, heads = getattr(config, f"{stack}_dim"), getattr(config, f"{stack}_heads")
    prefix = f"{stack}_blocks.0."
    sd = {k[len(prefix):]: v for k, v in FX.weights.items() if k.startswith(prefix)}
    block = Block(heads, config.mlp_ratio, config.ln_eps)
    length = config.buffer_size + config.seq_len
    x = np.random.default_rng(0).standard_normal((2, length, width)).astype(np.float32)
    target = jax.eval_shape(block.init, jax.random.key(0), x)["params"]
    params = torch_to_flax(sd, BLOCK_KEYMAP, target)
    got = np.asarray(block.apply({"params": params}, x))
    ref = _torch_block(sd, x, heads, config.ln_eps)
    # float32 against a float64 reference: a block's rounding is ~1e-6 of max|ref|; 1e-5 still
    # catches a tanh GELU (~1e-3) or a wrong q/k/v or head split (O(1)).
    assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref))


def _block_case(attn_dropout: float, proj_dropout: float):
    config = _config()
    block = Block(config.encoder_heads, config.mlp_ratio, config.ln_eps, attn_dropout=attn_dropout,
                  proj_dropout=proj_dropout)
    length = config.buffer_size + config.seq_len
    x = np.random.default_rng(1).standard_normal((2, length, config.encoder_dim)).astype(np.float32)
    return config, block, block.init(jax.random.key(0), x), x


def test_block_dropout_sites_follow_timm():
    # timm's Block(attn_drop, proj_drop): attention probabilities (b, heads, l, l) at attn_drop;
    # attn.proj's output, the MLP hidden after GELU and fc2's output at proj_drop.
    config, block, variables, x = _block_case(0.25, 0.5)
    b, length, d = x.shape
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dropout):
            seen.append((context.module.rate, args[0].shape))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        block.apply(variables, x, None, False, rngs={"dropout": jax.random.key(1)})
    assert sorted(seen) == sorted([(0.25, (b, config.encoder_heads, length, length)), (0.5, (b, length, d)),
                                   (0.5, (b, length, config.mlp_ratio * d)), (0.5, (b, length, d))])


def test_block_dropout_only_in_training():
    _, block, variables, x = _block_case(0.1, 0.1)
    _, plain, _, _ = _block_case(0.0, 0.0)
    want = plain.apply(variables, x)
    np.testing.assert_array_equal(block.apply(variables, x), want)  # eval (the default): no dropout
    train = lambda key: block.apply(variables, x, None, False, rngs={"dropout": key})
    np.testing.assert_array_equal(train(jax.random.key(1)), train(jax.random.key(1)))  # keyed, repeatable
    assert not np.allclose(train(jax.random.key(1)), want, atol=1e-3)
    assert not np.allclose(train(jax.random.key(1)), train(jax.random.key(2)), atol=1e-3)
    # proj_drop = 1 drops both residual branches (attn.proj and fc2 outputs): the block is the identity.
    _, dropped, _, _ = _block_case(0.0, 1.0)
    np.testing.assert_array_equal(dropped.apply(variables, x, None, False, rngs={"dropout": jax.random.key(1)}), x)


def test_dropout_rates_are_the_reference_values():
    # mar_huge(attn_dropout=0.1, proj_dropout=0.1) (reference-spec §3.1); the fixture records its own.
    full = MARConfig(**unipic_1p5b.get_config().mar)
    assert (full.attn_dropout, full.proj_dropout) == (0.1, 0.1)
    meta = FX.meta["config"]
    assert (_config().attn_dropout, _config().proj_dropout) == (meta["attn_dropout"], meta["proj_dropout"])


@pytest.mark.parametrize("src, dst, buffer", [
    ((4, 4), (8, 8), 3),      # up
    ((8, 8), (3, 5), 3),      # down (no antialiasing)
    ((4, 4), (3, 6), 2),      # mixed: rows shrink, columns grow
    ((5, 7), (9, 4), 0),      # odd sizes, no buffer (the diffusion table)
    ((32, 32), (64, 64), 1),  # the 1024-px path of the 512-px MAR
])
def test_resize_pos_embed_matches_torch_interpolate(src, dst, buffer):
    d = 8
    length = buffer + src[0] * src[1]
    table = np.random.default_rng(1).standard_normal((1, length, d)).astype(np.float32)
    got = np.asarray(resize_pos_embed(jnp.asarray(table), src, dst))
    image = torch.from_numpy(table[:, buffer:]).reshape(1, *src, d).permute(0, 3, 1, 2)
    resized = F.interpolate(image, size=dst, mode="bilinear", align_corners=False)
    ref_image = resized.permute(0, 2, 3, 1).reshape(1, dst[0] * dst[1], d).numpy()
    assert got.shape == (1, buffer + dst[0] * dst[1], d)
    np.testing.assert_array_equal(got[:, :buffer], table[:, :buffer])  # buffer rows untouched
    # Same float32 weights as torch's kernel, only the summation order differs (a few ulps).
    assert np.max(np.abs(got[:, buffer:] - ref_image)) <= 1e-6 * np.max(np.abs(ref_image))


@pytest.mark.parametrize("dst", [(2, 4), (4, 2), (3, 7), (6, 1), (9, 5)])
@pytest.mark.parametrize("name", ["encoder_pos_embed_learned", "decoder_pos_embed_learned",
                                  "diffusion_pos_embed_learned"])
def test_learned_tables_at_non_square_grids_match_torch(name, dst):
    """The fixture MAR's own tables (native 4x4 grid) at the non-square grids of any aspect ratio
    (height/16 x width/16), against `F.interpolate(bilinear, align_corners=False)` as the MAR's
    `forward_mae_encoder/decoder` call it. Bound: the project's forward-pass bound, 1e-4 x max|ref|
    in float32 (README "First run"): the resize is one step of the MAR forward, and any grid bug
    (transposed axes, swapped height/width, wrong source pixel) moves entries by O(max|ref|), far
    above it; the kernel itself agrees to a few float32 ulps (the test above)."""
    buffer = 0 if name.startswith("diffusion") else _config().buffer_size
    table = np.asarray(FX.weights[name], np.float32)
    src = _config().grid
    got = np.asarray(resize_pos_embed(jnp.asarray(table), src, dst))
    image = torch.from_numpy(table[:, buffer:]).reshape(1, *src, -1).permute(0, 3, 1, 2)
    ref = F.interpolate(image, size=dst, mode="bilinear", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(1, dst[0] * dst[1], -1).numpy()
    np.testing.assert_array_equal(got[:, :buffer], table[:, :buffer])
    err, bound = np.max(np.abs(got[:, buffer:] - ref)), 1e-4 * np.max(np.abs(ref))
    assert err <= bound, f"{name} at {dst}: max abs error {err:.3e} over the bound {bound:.3e}"


def test_resize_pos_embed_native_grid_is_identity():
    table = jnp.arange(2 * (3 + 16) * 4, dtype=jnp.float32).reshape(2, 19, 4)[:1]
    assert resize_pos_embed(table, (4, 4), (4, 4)) is table


@pytest.mark.parametrize("grid", GRIDS)
def test_visible_positions_are_raster_order_of_known_tokens(grid):
    for kind in mar_encdec.kinds(FX.io, grid):
        mask = FX.io[f"enc/{grid}/{kind}/mask"]
        count = mar_encdec.num_visible(mask)
        got = np.asarray(visible_positions(mask, count))
        ref = np.stack([np.flatnonzero(row == 0) for row in mask])
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, ref.reshape(mask.shape[0], count))


def _assert_rows_hold(rows):
    assert rows, "nothing compared"
    bad = [format_row(r) for r in rows if not r.ok]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("grid", GRIDS)
def test_encoder(grid):
    # Bound FORWARD = 1e-4 x max|ref| (mar_encdec): one float32 forward; the reference's own
    # float32-vs-float64 spread is below 1e-6 of max|ref| here (meta.json precision).
    _assert_rows_hold(list(mar_encdec.encoder_rows(FX, grid)))


@pytest.mark.parametrize("grid", GRIDS)
def test_decoder(grid):
    # Bound FORWARD, as for the encoder; fed the reference encoder output, so this isolates the decoder.
    rows = list(mar_encdec.decoder_rows(FX, grid))
    _assert_rows_hold(rows)
    assert any(r.output.endswith("/out_xcon") for r in rows)


def test_decoder_query_rows_equal_full_decode():
    """`decode_at(query_bq=...)` (the last block for the predicted rows only) against the full
    decode's rows at those positions; a padding entry (>= h*w) gives the last token's row."""
    # Bound FORWARD (1e-4 x max|ref|): the same float32 forward with a different product shape.
    model, params = mar_encdec.model_and_params(FX)
    c = model.config
    n, buffer, batch, visible, queries = c.seq_len, c.buffer_size, 2, c.seq_len // 2, 5
    rng = np.random.default_rng(4)
    orders = np.stack([rng.permutation(n) for _ in range(batch)])
    visible_bv = np.sort(orders[:, :visible], axis=1).astype(np.int32)
    query_bq = np.sort(orders[:, visible:visible + queries], axis=1).astype(np.int32)
    query_bq[1, -1] = n  # a padding slot
    x_enc = rng.standard_normal((batch, buffer + visible, c.encoder_dim)).astype(np.float32)
    decode = jax.jit(lambda p, q: model.apply({"params": p}, x_enc, visible_bv, c.grid, query_bq=q,
                                             method=model.decode_at))
    full = np.asarray(decode(params, None))
    got = np.asarray(decode(params, query_bq))
    want = np.take_along_axis(full, np.minimum(query_bq, n - 1)[:, :, None], axis=1)
    assert got.shape == (batch, queries, c.decoder_dim)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.max(np.abs(want)))


def test_encode_compiles_once_per_count_and_grid():
    model, params = mar_encdec.model_and_params(FX)
    config = model.config
    n = config.seq_len
    rng = np.random.default_rng(2)
    batch = 3  # a batch size no other test uses, so every (count, grid) below is new to the cache
    x = rng.standard_normal((batch, n, config.token_dim)).astype(np.float32)

    def encode(visible, image_shape):
        mask = np.ones((batch, n), np.float32)
        for row in mask:
            row[rng.permutation(n)[:visible]] = 0
        before = apply_encode._cache_size()
        out = np.asarray(apply_encode(model, params, x, mask, visible, image_shape))
        return out, apply_encode._cache_size() - before

    visible = n // 2
    first, compiled = encode(visible, config.grid)
    assert compiled == 1
    second, compiled = encode(visible, config.grid)  # new positions, same count: no retrace
    assert compiled == 0
    assert not np.allclose(first, second)  # the new mask was used, not a cached constant
    assert encode(visible - 1, config.grid)[1] == 1
    assert encode(visible, (1, n))[1] == 1
    assert encode(visible, (1, n))[1] == 0


def _mar_state_dict() -> dict:
    return {k: v for k, v in FX.weights.items() if not is_diffloss_key(k)}


def test_round_trip_is_bit_identical():
    sd = _mar_state_dict()
    back = mar_params_to_torch(mar_params_from_torch(FX.weights, _config()))
    assert sorted(back) == sorted(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_conversion_error_names_every_problem():
    sd = _mar_state_dict()
    del sd["encoder_norm.weight"]
    sd["decoder_embedding.bias"] = sd.pop("decoder_embed.bias")
    sd["mask_token"] = sd["mask_token"][0]
    with pytest.raises(ConversionError) as err:
        mar_params_from_torch(sd, _config())
    message = str(err.value)
    for name in ("'encoder_norm.weight'", "'decoder_embedding.bias'", "'decoder_embed.bias'",
                 "shape mismatch for 'mask_token'"):
        assert name in message


def test_full_scale_layout():
    section = unipic_1p5b.get_config().mar
    assert {f.name for f in dataclasses.fields(MARConfig)} == set(section.keys())
    config = MARConfig(**section)
    layout = json.loads((FIXTURE_ROOT / "full_scale_keys.json").read_text())["keys"]["mar"]
    # Zero-stride stand-ins: the mapping only transposes views, so nothing full-size is allocated.
    sd = {e["key"][len("mar."):]: np.broadcast_to(np.float32(0), e["shape"])
          for e in layout if not e["key"].startswith("mar.diffloss.")}
    target = param_shapes(config)
    params = torch_to_flax(sd, MAR_KEYMAP, target)  # raises on unmapped, missing or misshapen
    assert set(flatten(params)) == set(flatten(target))
    assert len(sd) == len(flatten(target))
