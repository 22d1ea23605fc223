"""Per-block gradient checkpointing (`config.remat = "blocks"`, `UniPic(..., remat=True)`).

* The param tree (names, shapes, dtypes) is the one without remat, at full size: the converter and
  the sharding tables key on those names.
* A train-step gradient (the smoke stage's loss on a text-to-image batch, MAR dropout on, so the
  recomputed blocks must redraw the same dropout masks) equals the one without remat. The task
  runs every trainable module (MAR encoder and decoder, LLM, projectors, diffusion head); one task
  keeps the two compiles short.
* The remat is really in the program: one remat call per block the losses run (MAR encoder and
  decoder blocks, LLM layers, diffusion-head ResBlocks) in the loss's jaxpr, and in the lowered
  gradient program the recomputed forward (more matmuls) behind optimisation barriers. The XLA CPU
  compiler drops those barriers and re-merges the recomputation (measured: identical temp bytes
  and FLOPs with and without remat on the CPU), so `memory_analysis()` can only show the saving
  on an accelerator; the lowered program is what every backend receives. (Measured with libtpu's
  AOT compile for a TPU v5e 2x2, bf16, the smoke model with 8 blocks per component, batch 96 at
  64 px: per-chip temporaries 410 MiB without remat, 397 MiB with "components", 304 MiB with
  "blocks", for 12 % more FLOPs.)
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import synthetic_batch

from configs import unipic_1p5b
from configs.stages import smoke
from unipic_jax.models.unipic import UniPic, UniPicConfig, param_shapes
from unipic_jax.train import losses, loop

# Remat changes only how XLA fuses and orders the same float32 operations (measured: at most
# 1.1e-6 of the largest gradient per module). A block recomputed with other dropout masks, or a missing
# block, changes gradients by O(1) of their scale.
REL = 1e-5


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Smoke-stage trainers without and with per-block remat (same params), one batch, one key."""
    cfg = smoke.get_config()
    plain = loop.Trainer(cfg)
    cfg_blocks = smoke.get_config()
    cfg_blocks.remat = "blocks"
    blocks = loop.Trainer(cfg_blocks, params=plain.initial_params)
    root = tmp_path_factory.mktemp("remat")
    batch = synthetic_batch(cfg, root)
    del batch["edit"]  # t2i and und run every kind of block; edit only adds compile time
    return dict(plain=plain, blocks=blocks, batch=batch, key=jax.random.key(7))


def _loss_fn(trainer, batch, key):
    """What the train step differentiates (`make_train_step`'s loss, frozen params included)."""
    return lambda p: losses.total_loss(trainer.model, p, batch, key, trainer.weights,
                                       answer_slots=trainer.config.data.answer_slots)


def test_remat_keeps_the_param_tree():
    config = UniPicConfig.from_config(unipic_1p5b.get_config())
    model = UniPic(config, remat=True)
    rematted = jax.eval_shape(lambda r: model.init(r, method=UniPic.init_all), jax.random.key(0))["params"]
    flat = lambda tree: {jax.tree_util.keystr(p): (x.shape, x.dtype)
                         for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    assert flat(rematted) == flat(param_shapes(config))


def test_stage_remat_modes():
    for stage in ("pt", "align", "ct", "sft"):
        assert loop.load_stage_config(stage).remat == "blocks"
    assert smoke.get_config().remat == "none"
    cfg = smoke.get_config()
    cfg.remat = "layers"
    with pytest.raises(ValueError, match="remat"):
        loop.Trainer(cfg)


def test_blocks_remat_gradient_equals_plain(case):
    plain, blocks, batch, key = case["plain"], case["blocks"], case["batch"], case["key"]
    assert blocks.model.remat and not plain.model.remat
    params = plain.initial_params

    batch = {"t2i": batch["t2i"]}

    def grads(trainer):
        return jax.jit(jax.value_and_grad(_loss_fn(trainer, batch, key), has_aux=True))(params)

    (loss, metrics), g = grads(plain)
    (loss_r, metrics_r), g_r = grads(blocks)
    for name in metrics:
        np.testing.assert_allclose(float(metrics_r[name]), float(metrics[name]), rtol=REL, err_msg=name)
    trainable = sorted(k for k in g if any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(g[k])))
    assert {"mar", "llm", "diffusion_head", "proj_in", "proj_out"} <= set(trainable), trainable
    for name in g:
        got, want = jax.tree.leaves(g_r[name]), jax.tree.leaves(g[name])
        err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(got, want))
        scale = max(float(jnp.max(jnp.abs(b))) for b in want)
        assert err <= REL * scale, (name, err, scale)


def _remat_primitive():
    return jax.make_jaxpr(jax.checkpoint(lambda x: x * 2.0))(1.0).eqns[0].primitive


def _count(jaxpr, counter):
    """Primitive counts of a jaxpr, nested jaxprs (jit, remat, custom_vjp, ...) included."""
    for eqn in jaxpr.eqns:
        counter[eqn.primitive] += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    _count(sub.jaxpr, counter)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    _count(sub, counter)
    return counter


def test_blocks_remat_is_in_the_program(case):
    plain, blocks, batch, key = case["plain"], case["blocks"], case["batch"], case["key"]
    params = plain.initial_params
    remat = _remat_primitive()
    c = plain.model_config
    mar_enc, mar_dec, llm, head = (c.mar.encoder_depth, c.mar.decoder_depth, c.qwen2.num_layers,
                                   c.diffusion.depth)
    want = (mar_enc + llm + mar_dec + head) + (mar_enc + llm)  # t2i, und (encoder and LLM)
    counts = {name: _count(jax.make_jaxpr(_loss_fn(t, batch, key))(params).jaxpr, collections.Counter())
              for name, t in (("plain", plain), ("blocks", blocks))}
    assert counts["plain"][remat] == 0
    assert counts["blocks"][remat] == want
    lowered = {name: jax.jit(jax.grad(lambda p: _loss_fn(t, batch, key)(p)[0])).lower(params).as_text()
               for name, t in (("plain", plain), ("blocks", blocks))}
    assert "optimization_barrier" not in lowered["plain"]
    assert lowered["blocks"].count("optimization_barrier") >= want
    assert lowered["blocks"].count("dot_general") > lowered["plain"].count("dot_general")
