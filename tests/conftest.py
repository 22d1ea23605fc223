"""Shared test set-up: float32 at the highest matmul precision, and the fixture root.

The fixtures are copied from the official PyTorch reference runs (tests/fixtures); set
UNIPIC_FIXTURES to run the same tests on another fixture set (other sizes and seeds).
"""

import os
from pathlib import Path

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURE_ROOT = Path(os.environ.get("UNIPIC_FIXTURES", Path(__file__).parent / "fixtures"))


@pytest.fixture(scope="session")
def fixture_root() -> Path:
    return FIXTURE_ROOT


def fixture(name: str):
    """The parity `Fixture` for one subfolder (vae, mar, qwen2, siglip, unipic)."""
    from unipic_jax.parity import Fixture

    return Fixture(FIXTURE_ROOT / name)
