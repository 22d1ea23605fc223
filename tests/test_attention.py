"""The attention kernel choice (`unipic_jax.models.attention`): one block, then the MAR stack and
the SigLIP tower; the LLM's grouped-query attention (`attend_gqa`) alone, then a tiny Qwen2's
cache peek.

On CPU the reference path runs (the parity path, bit for bit the function it always was); the
fused kernel (`jax.nn.dot_product_attention`, GPU's choice) computes the same float32 attention
in another order, so it is held to the forward bound 1e-4 x max|ref| (the measured gap is ~1e-7).
The Pallas TPU kernel only compiles for TPU devices: with libtpu installed it is lowered for a
v5e chip and must appear in the program (CI has no libtpu and skips those tests). The LLM's
splash kernel also runs on CPU in Pallas' interpreter (`use("pallas")` off TPU): same float32
bound, measured gap ~1e-6 x max|ref|.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURE_ROOT, needs_libtpu

from configs.fixture import get_config
from unipic_jax.models import attention
from unipic_jax.models.layers import scaled_dot_product_attention
from unipic_jax.models.mar import MAR, MARConfig, param_shapes
from unipic_jax.models.qwen2 import KVCache, Qwen2, Qwen2Config, init_params



def _qkv(seed=0, b=2, n=4, length=37, h=16):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((b, n, length, h)), jnp.float32) for _ in range(3))
    return q, k, v, jnp.asarray(rng.random((b, length)) > 0.3)


def _close(got, ref):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-4 * float(np.abs(ref).max()))


def test_cpu_takes_the_reference_path_bit_for_bit():
    q, k, v, mask = _qkv()
    assert attention.kernel() == "reference"
    np.testing.assert_array_equal(attention.attend(q, k, v, mask), scaled_dot_product_attention(q, k, v, mask))


@pytest.mark.parametrize("masked", [False, True])
def test_fused_kernel_matches_the_reference(masked):
    q, k, v, mask = _qkv(1)
    mask = mask if masked else None
    with attention.use("fused"):
        assert attention.kernel() == "fused"
        got = attention.attend(q, k, v, mask)
    _close(got, scaled_dot_product_attention(q, k, v, mask))


def test_platforms_and_overrides():
    with attention.target("tpu"):
        assert attention.kernel() == "pallas"
        with attention.use("reference"):
            assert attention.kernel() == "reference"
    with attention.target("gpu"):
        assert attention.kernel() == "fused"
        # Dropout on the weights exists only on the reference path: it is taken whatever the platform.
        q, k, v, mask = _qkv(2)
        halve = lambda w: w * 0.5
        np.testing.assert_array_equal(attention.attend(q, k, v, mask, halve),
                                      scaled_dot_product_attention(q, k, v, mask, halve))
    with pytest.raises(ValueError, match="attention kernel must be one of"):
        with attention.use("flash"):
            pass


def test_mar_encoder_and_decoder_with_the_fused_kernel():
    config = MARConfig(**get_config(FIXTURE_ROOT / "unipic").mar)
    model = MAR(config)
    shapes = param_shapes(config)
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.05, s.dtype), shapes)
    tokens = jnp.asarray(rng.standard_normal((2, config.seq_len, config.token_dim)), jnp.float32)
    mask = np.zeros((2, config.seq_len), np.float32)
    mask[:, : config.seq_len // 2] = 1.0  # half masked: the decoder fills mask tokens

    def run():  # a fresh function per kernel: jit caches do not see the kernel choice
        return jax.jit(lambda p, x, m: model.apply({"params": p}, x, m, config.seq_len // 2))(params, tokens, mask)

    ref = run()
    with attention.use("fused"):
        got = run()
    _close(got, ref)


@needs_libtpu
def test_pallas_kernel_compiles_for_a_tpu_chip():
    from jax.sharding import SingleDeviceSharding

    from unipic_jax import aot

    device = aot.topology_devices(aot.parse_topology("v5e:1x1"))[0]
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=SingleDeviceSharding(device))
    # 300 tokens: not a multiple of the 128-token blocks, so the padding and key hiding are compiled too.
    args = [spec((2, 4, 300, 80), jnp.bfloat16) for _ in range(3)] + [spec((2, 300), jnp.bool_)]
    with attention.target("tpu"):
        lowered = jax.jit(attention.attend).lower(*args)
    assert aot.count_kernels(lowered.as_text()) == {"_flash_attention_kernel": 1}  # what `compile` reports
    assert lowered.compile().memory_analysis() is not None


def test_siglip_tower_with_the_fused_kernel():
    """The fixture SigLIP tower: its reference path is its own arithmetic (bit for bit, the
    transposes around it are exact), the fused kernel is held to the forward bound 1e-4 x max|ref|
    on the last hidden state (float32 attention in another order, every layer)."""
    from unipic_jax.models.siglip import SiglipConfig, SiglipVisionModel

    config = SiglipConfig(**get_config(FIXTURE_ROOT / "unipic").siglip)
    model = SiglipVisionModel(config)
    side = config.image_size
    pixels = jnp.asarray(np.random.default_rng(9).uniform(-1, 1, (2, side, side, 3)), jnp.float32)
    params = model.init(jax.random.PRNGKey(0), pixels)["params"]

    def run():  # a fresh function per kernel: jit caches do not see the kernel choice
        return jax.jit(lambda p, x: model.apply({"params": p}, x).last_hidden_state)(params, pixels)

    ref = run()
    with attention.use("fused"):
        got = run()
    _close(got, ref)
    with pytest.raises(ValueError, match="cannot take `dropout`"):
        q, k, v, _ = _qkv()
        attention.attend(q, k, v, dropout=lambda w: w, reference=lambda: q)


# The LLM's attention: 4 query heads over 2 KV heads, head_dim 128 (Qwen2.5's), keys = [cache ; new].
def _gqa(seed, b=2, t=150, past=40, n=4, kv=2, h=128):
    """150 new tokens: more than one 128-query block and not a multiple of it (the padding runs)."""
    rng = np.random.default_rng(seed)
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    masks = {
        "prompt": attention.CausalKeyMask(new_valid_bt=jnp.asarray(np.arange(t) < np.array([t, t - 37])[:b, None])),
        "peek": attention.CausalKeyMask(jnp.asarray(rng.random((b, past)) > 0.3)),
        "decode": attention.CausalKeyMask(jnp.asarray(rng.random((b, past)) > 0.3),
                                          jnp.asarray(rng.random((b, t)) > 0.1)),
    }
    return draw(b, t, n, h), draw, masks


def _numpy_mask(mask, b, t):
    """The mask Qwen2 built before `CausalKeyMask`, in numpy: [past validity ; causal & new validity]."""
    new = np.broadcast_to(np.tril(np.ones((t, t), bool)), (b, t, t))
    if mask.new_valid_bt is not None:
        new = new & np.asarray(mask.new_valid_bt)[:, None, :]
    if mask.past_valid_bs is None:
        return new
    past = np.broadcast_to(np.asarray(mask.past_valid_bs)[:, None, :], (b, t, mask.past_valid_bs.shape[1]))
    return np.concatenate([past, new], axis=-1)


@pytest.mark.parametrize("case", ["prompt", "peek", "decode"])
def test_gqa_reference_path_and_dense_masks(case):
    """Exact: the structured mask is the dense one Qwen2 built, and on CPU a structured mask runs
    the same arithmetic as a dense one (booleans and the same ops in the same order)."""
    q, draw, masks = _gqa(4)
    mask = masks[case]
    b, t = q.shape[:2]
    s = t + (0 if mask.past_valid_bs is None else mask.past_valid_bs.shape[1])
    k, v = draw(b, s, 2, 128), draw(b, s, 2, 128)
    dense = _numpy_mask(mask, b, t)
    np.testing.assert_array_equal(mask.dense(b, t), dense)
    np.testing.assert_array_equal(attention.attend_gqa(q, k, v, mask, jnp.float32),
                                  attention.attend_gqa(q, k, v, dense, jnp.float32))


@pytest.mark.parametrize("kernel", ["fused", "pallas"])
@pytest.mark.parametrize("case", ["prompt", "peek", "decode"])
def test_gqa_kernels_match_the_reference(kernel, case):
    """Forward bound 1e-4 x max|ref| (float32): the kernels sum and normalise in another order.
    Rows of padded new tokens are compared too: they see valid keys, so they are defined."""
    q, draw, masks = _gqa(5)
    mask = masks[case]
    b, t = q.shape[:2]
    s = t + (0 if mask.past_valid_bs is None else mask.past_valid_bs.shape[1])
    k, v = draw(b, s, 2, 128), draw(b, s, 2, 128)
    ref = attention.attend_gqa(q, k, v, mask, jnp.float32)
    with attention.use(kernel):
        got = attention.attend_gqa(q, k, v, mask, jnp.float32)
    _close(got, ref)


@pytest.mark.parametrize("kernel", ["fused", "pallas"])
def test_gqa_kernel_gradients_match_the_reference(kernel):
    """Training differentiates through the kernels (splash's own backward kernels on TPU). Bound
    1e-4 x max|ref| per gradient, float32: the backward sums in another order too (measured 1e-6)."""
    q, draw, masks = _gqa(8, b=1, t=130, past=20)
    k, v = draw(1, 150, 2, 128), draw(1, 150, 2, 128)
    loss = lambda q, k, v: jnp.sum(jnp.sin(attention.attend_gqa(q, k, v, masks["decode"], jnp.float32)))
    ref = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    with attention.use(kernel):
        got = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, ref):
        _close(g, r)


def test_qwen2_cache_peek_with_the_kernels():
    """A 2-layer Qwen2 prefills a 40-token prompt into 64 cache slots (row 2 right-padded by 15,
    24 slots never written), then peeks 140 new tokens after it: the UniPic sampler's LLM call.
    Forward bound 1e-4 x max|ref| on the last hidden state (two layers of float32 attention in
    another order; measured 5e-7)."""
    config = Qwen2Config(vocab_size=64, hidden_size=256, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=128, rope_theta=10000.0, rms_eps=1e-6, tie_embeddings=True,
                         max_position_embeddings=4096)
    model = Qwen2(config)
    params = init_params(config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(6)
    prompt = jnp.asarray(rng.standard_normal((2, 40, 256)), jnp.float32)
    prompt_mask = jnp.asarray(np.arange(40) < [[40], [25]])
    new = jnp.asarray(rng.standard_normal((2, 140, 256)), jnp.float32)

    def run():  # a fresh function per kernel: jit caches do not see the kernel choice
        def f(p, x, m, y):
            cache = KVCache.create(config, 2, 64)
            positions = jnp.maximum(jnp.cumsum(m.astype(jnp.int32), -1) - 1, 0)
            _, cache = model.apply({"params": p}, cache, x, positions, m, method=Qwen2.prefill)
            return model.apply({"params": p}, cache, y, cache.next_positions(y.shape[1]),
                               method=Qwen2.peek).last_hidden_state
        return jax.jit(f)(params, prompt, prompt_mask, new)

    ref = run()
    for kernel in ("fused", "pallas"):
        with attention.use(kernel):
            _close(run(), ref)


def test_gqa_pallas_falls_back_where_splash_does_not_fit():
    """Fewer than 128 new tokens (text decoding) and dense masks take the fused path on TPU."""
    with attention.target("tpu"):
        q, draw, masks = _gqa(7, t=3)
        k, v = draw(2, 43, 2, 128), draw(2, 43, 2, 128)
        lowered = jax.jit(lambda *a: attention.attend_gqa(*a, masks["decode"], jnp.float32)).lower(q, k, v)
    assert "tpu_custom_call" not in lowered.as_text()


@needs_libtpu
def test_pallas_kernel_compiles_for_siglip_heads_on_a_tpu_chip():
    """SigLIP2 so400m/16 at 512 px: 16 heads of 72 (not a multiple of the 128 lanes), 1024 tokens."""
    from jax.sharding import SingleDeviceSharding

    from unipic_jax import aot

    device = aot.topology_devices(aot.parse_topology("v5e:1x1"))[0]
    spec = jax.ShapeDtypeStruct((1, 16, 1024, 72), jnp.bfloat16, sharding=SingleDeviceSharding(device))
    with attention.target("tpu"):
        lowered = jax.jit(attention.attend).lower(spec, spec, spec)
    assert "tpu_custom_call" in lowered.as_text()
    assert lowered.compile().memory_analysis() is not None


@needs_libtpu
def test_splash_kernel_compiles_for_a_tpu_chip():
    """Qwen2.5-1.5B's heads (12 over 2, head_dim 128) in bf16 over [64 cache slots ; 300 new tokens]
    (300: not a multiple of the 128 blocks, so padding and segment ids are compiled too)."""
    from jax.sharding import SingleDeviceSharding

    from unipic_jax import aot

    device = aot.topology_devices(aot.parse_topology("v5e:1x1"))[0]
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=SingleDeviceSharding(device))
    args = [spec((2, 300, 12, 128), jnp.bfloat16), spec((2, 364, 2, 128), jnp.bfloat16),
            spec((2, 364, 2, 128), jnp.bfloat16), spec((2, 64), jnp.bool_), spec((2, 300), jnp.bool_)]
    f = lambda q, k, v, past, new: attention.attend_gqa(q, k, v, attention.CausalKeyMask(past, new), jnp.bfloat16)
    with attention.target("tpu"):
        lowered = jax.jit(f).lower(*args)
    assert "tpu_custom_call" in lowered.as_text()
    assert lowered.compile().memory_analysis() is not None
