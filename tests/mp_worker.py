"""One process of tests/test_multiprocess.py: a train step over two processes on 127.0.0.1.

    UNIPIC_COORDINATOR=127.0.0.1:PORT UNIPIC_PROCESS_ID=i UNIPIC_NUM_PROCESSES=n \\
        python tests/mp_worker.py OUT_DIR TOKENIZER_DIR DATA_DIR MESH

Each process has 4 CPU devices and joins the others through `distributed.initialize` (read from
the environment, gloo collectives). It builds the sharded trainer of `stage_config` on the global
mesh, reads its own share of the data (`make_dataset(process_index, process_count)`), makes the
global batch (`Trainer.batch_sharding`) and runs one `Trainer.step`. Process 0 writes the loss and
the updated params (gathered from every process) to OUT_DIR/result.npz; every process writes the
rows it read to OUT_DIR/batch_<i>.npz, for the parent's one-process reference.

A missing peer makes JAX abort the process (not raise): run it only as a child with a timeout.
"""

import sys
from pathlib import Path

LOCAL_DEVICES = 4
KEY_SEED = 3


def stage_config(fixture_dir, tokenizer_dir, process_count: int):
    """The smoke stage at the unipic fixture's sizes, understanding only, the LLM trainable: the
    smallest step that still moves sharded weights and their gradients across processes. Two rows
    per device. Adam's eps is raised for the reason given in tests/test_sharded_programs.py (the
    first step must be a smooth function of the gradient to compare two float programs)."""
    from configs.stages import smoke

    rows = 2 * LOCAL_DEVICES * process_count
    cfg = smoke.get_config(f"fixture={fixture_dir},batch={3 * rows},tokenizer={tokenizer_dir}")
    cfg.loss_weights.update(dict(t2i=0.0, edit=0.0))
    cfg.optim.trainable = ("llm",)
    cfg.optim.eps = 1e-4
    return cfg


def flat(tree) -> dict:
    import jax

    return {jax.tree_util.keystr(p, simple=True, separator="/"): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def main(out_dir: str, tokenizer_dir: str, data_dir: str, mesh_spec: str) -> None:
    import time

    import jax

    start = time.perf_counter()

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np

    from unipic_jax import distributed, sharding
    from unipic_jax.parity import Fixture
    from unipic_jax.parity import unipic as unipic_parity
    from unipic_jax.train import data, loop

    cluster = distributed.initialize(initialization_timeout=60, heartbeat_timeout=30, shutdown_timeout=30)
    assert cluster is not None and jax.process_count() == cluster.num_processes
    assert jax.local_device_count() == LOCAL_DEVICES
    out, index = Path(out_dir), jax.process_index()
    say = lambda what: print(f"[p{index}] {time.perf_counter() - start:6.1f}s {what}", flush=True)
    say(f"initialised: {jax.device_count()} devices in {jax.process_count()} processes")
    fixture_dir = Path(__file__).parent / "fixtures" / "unipic"
    cfg = stage_config(fixture_dir, tokenizer_dir, jax.process_count())
    _, params = unipic_parity.load(Fixture(fixture_dir))
    mesh = sharding.make_mesh(mesh_spec)
    trainer = distributed.sharded_trainer(cfg, mesh, params=params)
    tokenizer = loop.load_tokenizer(cfg, out)
    iterator = iter(data.make_dataset(cfg, tokenizer, data.parse_data_spec(data_dir), process_index=index,
                                      process_count=jax.process_count()))
    host_batch = next(iterator)
    iterator.close()
    for task_batch in host_batch.values():
        task_batch.pop("num_skipped")
    np.savez(out / f"batch_{index}.npz", **flat(host_batch))
    say("trainer and this process's rows ready")
    batch = trainer.batch_sharding(host_batch)
    with jax.set_mesh(mesh):  # as `distributed.train_main` runs the trainer
        state, metrics, _ = trainer.step(trainer.init_state(), batch, jax.random.key(KEY_SEED))
    params = distributed.gather(state.params)
    metrics = distributed.gather(metrics)
    if distributed.is_main_process():
        np.savez(out / "result.npz", **{"metrics/" + k: v for k, v in metrics.items()},
                 **{"params/" + k: v for k, v in flat(params).items()})
    say(f"step done, loss {float(metrics['loss']):.6f}")
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
