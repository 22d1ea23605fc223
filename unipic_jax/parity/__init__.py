"""Cross-framework parity: replay the official PyTorch fixtures and compare, one row per output.

A fixture root is laid out like `tests/fixtures`: subfolders vae/, mar/, qwen2/, siglip/, unipic/,
each with a meta.json (sizes, cases, recorded random draws) and safetensors files. Each component
has a module here exposing `rows(fx: Fixture) -> Iterator[Row]`; it loads the weights through
`convert/`, feeds the stored inputs and draws, and yields one `Row` per compared output.

Bounds (the reference's own float32-vs-float64 spread is below 1e-5 of max|ref|, see the
fixtures' precision_summary.json):
  * forward passes: |jax - ref| <= 1e-4 * max|ref|   (FORWARD)
  * sampling chains: |jax - ref| <= 1e-3 * max|ref|  (CHAIN; random-weight chains amplify rounding)
  * integers: exact                                   (compare_exact)
Runs in float32 with `jax.default_matmul_precision("highest")`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

import jax
import numpy as np

FORWARD = 1e-4
CHAIN = 1e-3

# Fixture subfolder -> module implementing its rows.
COMPONENTS = {
    "vae": "unipic_jax.parity.vae",
    "mar": "unipic_jax.parity.mar",
    "qwen2": "unipic_jax.parity.qwen2",
    "siglip": "unipic_jax.parity.siglip",
    "unipic": "unipic_jax.parity.unipic",
}


@dataclasses.dataclass(frozen=True)
class Row:
    component: str
    output: str
    max_abs_err: float
    max_ref: float
    bound: float
    ok: bool
    note: str = ""


def compare(component: str, output: str, got, ref, rel: float) -> Row:
    """Float comparison: ok when max|got - ref| <= rel * max|ref| (and shapes agree)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    max_ref = float(np.max(np.abs(ref))) if ref.size else 0.0
    bound = rel * max_ref
    if got.shape != ref.shape:
        return Row(component, output, float("inf"), max_ref, bound, False,
                   f"shape {got.shape} != reference {ref.shape}")
    err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    ok = bool(np.isfinite(err) and err <= bound)
    return Row(component, output, err, max_ref, bound, ok)


def compare_exact(component: str, output: str, got, ref) -> Row:
    """Integer comparison: every element equal."""
    got, ref = np.asarray(got), np.asarray(ref)
    max_ref = float(np.max(np.abs(ref))) if ref.size else 0.0
    if got.shape != ref.shape:
        return Row(component, output, float("inf"), max_ref, 0.0, False,
                   f"shape {got.shape} != reference {ref.shape}")
    err = float(np.max(np.abs(got.astype(np.int64) - ref.astype(np.int64)))) if ref.size else 0.0
    return Row(component, output, err, max_ref, 0.0, err == 0)


class Fixture:
    """One fixture subfolder: its meta.json and lazily loaded safetensors files."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.name = self.folder.name
        self.meta = json.loads((self.folder / "meta.json").read_text())

    @functools.cache
    def file(self, stem: str) -> dict[str, np.ndarray]:
        """Tensors of `<stem>.safetensors` in this folder (e.g. 'io', 'weights', 't2i')."""
        from convert.io import load_state_dict

        return load_state_dict(self.folder / f"{stem}.safetensors")

    @property
    def weights(self) -> dict[str, np.ndarray]:
        return self.file("weights")

    @property
    def io(self) -> dict[str, np.ndarray]:
        return self.file("io")

    def config(self):
        from configs import fixture

        return fixture.get_config(self.folder)

    def __hash__(self):
        return hash(self.folder)

    def __eq__(self, other):
        return isinstance(other, Fixture) and other.folder == self.folder


def draws(tensors: dict[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    """The recorded random draws `<prefix>rng/0000, 0001, ...` in draw order."""
    keys = sorted(k for k in tensors if k.startswith(prefix + "rng/"))
    return [tensors[k] for k in keys]


@dataclasses.dataclass(frozen=True)
class Skipped:
    component: str
    reason: str


def run(root: str | Path, only: Iterable[str] | None = None,
        on_row: Callable[[Row | Skipped], None] | None = None) -> list[Row | Skipped]:
    """Replay every (or `only` the named) component under `root`; returns rows and skips."""
    root = Path(root)
    names = list(only) if only else list(COMPONENTS)
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown component(s) {unknown}; choose from {list(COMPONENTS)}")
    results: list[Row | Skipped] = []

    def emit(r):
        results.append(r)
        if on_row:
            on_row(r)

    with jax.default_matmul_precision("highest"):
        for name in names:
            folder = root / name
            if not (folder / "meta.json").is_file():
                emit(Skipped(name, f"no {name}/meta.json under {root}"))
                continue
            try:
                module = importlib.import_module(COMPONENTS[name])
            except ModuleNotFoundError as e:
                if e.name != COMPONENTS[name]:
                    raise
                emit(Skipped(name, "not yet supported"))
                continue
            try:
                for row in module.rows(Fixture(folder)):
                    emit(row)
            except (KeyError, IndexError, TypeError) as e:  # a meta.json or file lacking what it must hold
                raise ValueError(f"{folder}: malformed fixture ({type(e).__name__}: {e})") from None
    return results


def format_row(r: Row | Skipped) -> str:
    if isinstance(r, Skipped):
        return f"{r.component:<8} {'-':<44} {'skipped: ' + r.reason}"
    status = "ok" if r.ok else "FAIL"
    note = f"  ({r.note})" if r.note else ""
    return (f"{r.component:<8} {r.output:<44} {r.max_abs_err:>11.3e} {r.max_ref:>11.3e} "
            f"{r.bound:>11.3e}  {status}{note}")


HEADER = f"{'component':<8} {'output':<44} {'max_abs_err':>11} {'max|ref|':>11} {'bound':>11}  ok"


def rows_ok(results: list[Row | Skipped], asked: Iterable[str] | None) -> bool:
    """Every row holds, and no explicitly asked-for component was skipped."""
    asked = set(asked or ())
    for r in results:
        if isinstance(r, Skipped):
            if r.component in asked:
                return False
        elif not r.ok:
            return False
    return any(isinstance(r, Row) for r in results)


def iter_rows(results) -> Iterator[Row]:
    return (r for r in results if isinstance(r, Row))
