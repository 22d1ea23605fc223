"""Shared test set-up: float32 at the highest matmul precision, 8 CPU devices, the fixture root.

The fixtures are copied from the official PyTorch reference runs (tests/fixtures); set
UNIPIC_FIXTURES to run the same tests on another fixture set (other sizes and seeds).
"""

import importlib.util
import os
from pathlib import Path

import jax
import pytest

# The persistent compilation cache (on by default for users) stays off in tests unless a test turns
# it on with a folder of its own: tests must not write into the home folder.
os.environ.setdefault("UNIPIC_JAX_CACHE", "off")

jax.config.update("jax_default_matmul_precision", "highest")
# Eight host devices so sharding tests can build real meshes in-process; computations that are not
# sharded explicitly still run on device 0. Must happen before the first backend use.
jax.config.update("jax_num_cpu_devices", 8)

FIXTURE_ROOT = Path(os.environ.get("UNIPIC_FIXTURES", Path(__file__).parent / "fixtures"))

# Tests that compile for TPU topologies need libtpu (`pip install "jax[tpu]==0.10.2"`; CI has none and
# skips them). libtpu admits one process per host and keeps its lock until the process exits, so with
# libtpu installed run them in one process: `python -m pytest -p no:xdist tests/test_aot.py
# tests/test_attention.py` (under `-n 2` the second worker to ask for it fails on the lock).
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu not installed (pip install "jax[tpu]==0.10.2")')


@pytest.fixture(scope="session")
def fixture_root() -> Path:
    return FIXTURE_ROOT


def fixture(name: str):
    """The parity `Fixture` for one subfolder (vae, mar, qwen2, siglip, unipic)."""
    from unipic_jax.parity import Fixture

    return Fixture(FIXTURE_ROOT / name)


def fixture_tokenizer(folder: Path) -> Path:
    """A byte-level tokenizer of the fixture UniPic's vocabulary and special ids, written to `folder`."""
    from configs.fixture import get_config, read_meta
    from unipic_jax import prompts

    unipic = FIXTURE_ROOT / "unipic"
    ids = read_meta(unipic)["config"]["special_ids"]
    return prompts.write_byte_tokenizer(folder, vocab_size=get_config(unipic).qwen2.vocab_size, eos_id=ids["eos"],
                                        pad_id=ids["pad"])


def fixture_checkpoint(root: Path, generation_config: str | None = None) -> Path:
    """A converted checkpoint of the fixture UniPic (random weights) under `root`, with
    `fixture_tokenizer` and `generation_config` (JSON text) in its tokenizer folder when given.
    Returns the checkpoint folder."""
    from safetensors.numpy import load_file

    from configs.fixture import get_config
    from convert.unipic import unipic_params_from_torch
    from unipic_jax import checkpoint
    from unipic_jax.models.unipic import UniPicConfig

    folder = FIXTURE_ROOT / "unipic"
    config = get_config(folder)
    tok = fixture_tokenizer(root / "tokenizer")
    if generation_config is not None:
        (tok / "generation_config.json").write_text(generation_config)
    params = unipic_params_from_torch(load_file(folder / "weights.safetensors"), UniPicConfig.from_config(config))
    return checkpoint.save(root / "ckpt", params, config, tokenizer_dir=tok)


def synthetic_batch(cfg, root):
    """One batch of the data pipeline for stage config `cfg`, from a synthetic dataset written under
    `root` (the skip counters dropped, so the batch holds arrays only)."""
    from unipic_jax.train import data, loop

    tokenizer = loop.load_tokenizer(cfg, root)
    sources = data.parse_data_spec(str(data.write_synthetic(root / "data", size=cfg.data.gen_resolution)))
    iterator = iter(data.make_dataset(cfg, tokenizer, sources))
    batch = next(iterator)
    iterator.close()
    for task_batch in batch.values():
        task_batch.pop("num_skipped")
    return batch


# The modules with the longest tests run first, longest first (`--durations`: the quickstart
# ~200 s, the whole-model parity rows ~180 s, the multi-process workers ~90 s, the export of a
# training run ~80 s), so that under pytest-xdist they start while the other worker has the rest
# to do, instead of one of them ending the run alone. Each module stays in one piece, in its own
# order (module fixtures are set up once per worker that runs it).
SLOW_MODULES = ("test_quickstart.py", "test_parity.py", "test_multiprocess.py", "test_export.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_MODULES)))  # stable: the rest keep their order
