"""Two processes on 127.0.0.1 with 4 CPU devices each (`distributed.initialize`, gloo collectives)
run one train step (tests/mp_worker.py); it must give the loss and updated params of the same
step in one process on the same global batch.

The workers run as child processes under a deadline: a process whose peer never arrives is
aborted by JAX (SIGABRT after its initialisation timeout), which must not take pytest with it. On
timeout only these children are killed.

Each worker reads its own share of the data (the pipeline's `process_index::process_count`
split), so the global batch is process 0's rows then process 1's; the parent checks those rows
against its own per-process pipelines and runs the reference step on their concatenation.

Bound: 1e-5 x max|ref| per array (as tests/test_sharded_programs.py: the two programs differ
only in the order of float32 reductions, here across processes too); integers exact.
"""

import io
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import FIXTURE_ROOT
from jax.sharding import PartitionSpec as P

import mp_worker
from unipic_jax import distributed, sharding
from unipic_jax.parity import Fixture
from unipic_jax.parity import unipic as unipic_parity
from unipic_jax.train import data, loop

PROCESSES = 2
MESH = "fsdp=4,tensor=2"  # fsdp spans the two processes, tensor stays inside one
DEADLINE_S = 240
REL = 1e-5
REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, tokenizer: Path, data_dir: Path) -> list[tuple[subprocess.Popen, Path]]:
    port = _free_port()
    children = []
    for index in range(PROCESSES):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), UNIPIC_COORDINATOR=f"127.0.0.1:{port}",
                   UNIPIC_PROCESS_ID=str(index), UNIPIC_NUM_PROCESSES=str(PROCESSES))
        env.pop("XLA_FLAGS", None)
        log = out / f"p{index}.log"
        with open(log, "w") as f:
            child = subprocess.Popen([sys.executable, str(REPO / "tests" / "mp_worker.py"), str(out), str(tokenizer),
                                      str(data_dir), MESH], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        children.append((child, log))
    return children


def _wait(children, deadline: float) -> list[int]:
    codes = []
    try:
        for child, _ in children:
            codes.append(child.wait(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        for child, _ in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        pytest.fail(f"workers still running after {DEADLINE_S} s; killed. Logs:\n" + _logs(children))
    return codes


def _logs(children) -> str:
    return "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-30:]) for _, log in children)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Launch the workers; while they run, make the one-process reference: each process's rows as
    the pipeline makes them and the step on their concatenation."""
    root = tmp_path_factory.mktemp("multiprocess")
    cfg = mp_worker.stage_config(FIXTURE_ROOT / "unipic", root / "tokenizer", PROCESSES)
    cfg.tokenizer = ""
    tokenizer = loop.load_tokenizer(cfg, root)  # writes root/tokenizer for the workers
    data_dir = data.write_synthetic(root / "data", size=cfg.data.gen_resolution)
    start = time.monotonic()
    children = _launch(root, root / "tokenizer", data_dir)
    rows = []
    for index in range(PROCESSES):
        iterator = iter(data.make_dataset(cfg, tokenizer, data.parse_data_spec(str(data_dir)), process_index=index,
                                          process_count=PROCESSES))
        share = next(iterator)
        iterator.close()
        share["und"].pop("num_skipped")
        rows.append(share)
    batch = jax.tree.map(lambda *shares: np.concatenate(shares), *rows)
    _, params = unipic_parity.load(Fixture(FIXTURE_ROOT / "unipic"))
    trainer = loop.Trainer(cfg, params=params)
    state, metrics = jax.jit(trainer.train_step, donate_argnums=0)(
        trainer.init_state(), batch, jax.random.key(mp_worker.KEY_SEED))
    reference = {**{"metrics/" + k: v for k, v in jax.device_get(metrics).items()},
                 **{"params/" + k: v for k, v in mp_worker.flat(jax.device_get(state.params)).items()}}
    codes = _wait(children, start + DEADLINE_S)
    assert codes == [0] * PROCESSES, f"worker exit codes {codes}:\n" + _logs(children)
    return dict(root=root, rows=[mp_worker.flat(r) for r in rows], initial=mp_worker.flat(params), reference=reference)


def test_workers_read_their_own_rows(run):
    for index, want in enumerate(run["rows"]):
        got = np.load(run["root"] / f"batch_{index}.npz")
        assert sorted(got.files) == sorted(want)
        for name in got.files:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"process {index} {name}")
    a, b = (np.load(run["root"] / f"batch_{i}.npz")["und/input_ids"] for i in range(PROCESSES))
    assert not np.array_equal(a, b)  # the two shares differ


def test_two_process_step_matches_one_process(run):
    want, got = run["reference"], np.load(run["root"] / "result.npz")
    assert sorted(got.files) == sorted(want)
    for name in sorted(want):
        ref, value = np.asarray(want[name]), got[name]
        if not np.issubdtype(ref.dtype, np.floating):
            np.testing.assert_array_equal(value, ref, err_msg=name)
            continue
        err = np.max(np.abs(value.astype(np.float64) - ref), initial=0.0)
        assert err <= REL * np.max(np.abs(ref), initial=0.0), f"{name}: max err {err:.3e}"
    # The step trained something: the LLM moved, the frozen MAR did not.
    moved, kept = "llm/layers_0/mlp/gate_proj/kernel", "mar/encoder_blocks_0/attn/qkv/kernel"
    assert not np.allclose(got["params/" + moved], run["initial"][moved])
    np.testing.assert_array_equal(got["params/" + kept], run["initial"][kept])


# ----------------------------------------------------------------------------------------------
# The start-up wiring itself (no second process needed)


def test_cluster_from_flags_and_environment():
    env = {"UNIPIC_COORDINATOR": "10.0.0.1:1234", "UNIPIC_PROCESS_ID": "3", "UNIPIC_NUM_PROCESSES": "4"}
    assert distributed.resolve_cluster(environ={}) is None  # single process: nothing to initialise
    assert distributed.resolve_cluster(environ=env) == distributed.Cluster("10.0.0.1:1234", 3, 4)
    # A flag wins over its variable, value by value.
    assert distributed.resolve_cluster("127.0.0.1:99", 0, environ=env) == distributed.Cluster("127.0.0.1:99", 0, 4)
    assert distributed.resolve_cluster(environ={"JAX_COORDINATOR_ADDRESS": "h:1"}).auto  # JAX's own detection
    assert distributed.resolve_cluster("auto", environ={}).bind_address() is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(process_id=0, num_processes=2), "without a coordinator"),
    (dict(coordinator="10.0.0.1"), "HOST:PORT"),
    (dict(coordinator="h:1", process_id=2, num_processes=2), r"\[0, 2\)"),
    (dict(coordinator="h:1", num_processes=0), "at least 1"),
    (dict(coordinator="h:1", process_id="one"), "not an integer"),
])
def test_cluster_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        distributed.resolve_cluster(environ={}, **kwargs)


@pytest.mark.parametrize("address, bind", [("127.0.0.1:5000", "127.0.0.1:5000"), ("localhost:5000", "127.0.0.1:5000"),
                                           ("[::1]:5000", "[::1]:5000"), ("10.1.2.3:5000", None)])
def test_a_local_coordinator_binds_to_loopback_only(address, bind):
    assert distributed.Cluster(address, 0, 2).bind_address() == bind


def test_logging_from_process_zero_only():
    stream = io.StringIO()
    level = logging.getLogger().level
    handlers = [distributed.setup_logging(stream=stream, process_index=i) for i in (0, 1)]
    try:
        logger = logging.getLogger("unipic_jax.test")
        logger.info("info")
        logger.warning("warning")
    finally:
        for handler in handlers:
            logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(level)
    assert stream.getvalue().splitlines() == ["[p0] INFO unipic_jax.test: info",
                                              "[p0] WARNING unipic_jax.test: warning",
                                              "[p1] WARNING unipic_jax.test: warning"]


def test_global_batch_in_one_process():
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    host = {"t2i": {"image": np.arange(8 * 3, dtype=np.float32).reshape(8, 3)}}
    placed = distributed.global_batch(host, mesh)["t2i"]["image"]
    assert placed.sharding.spec == P(("fsdp", "data"), None)
    np.testing.assert_array_equal(np.asarray(placed), host["t2i"]["image"])
