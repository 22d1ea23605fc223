"""notebooks/quickstart.ipynb runs top to bottom, so it cannot rot.

Its code cells are executed in order in one namespace with plain `exec` (the notebook uses no
IPython magics, so no Jupyter kernel is needed), from the notebooks/ folder as Jupyter would.
A cell that raises, or an `assert` in it that fails, fails the test and names the cell.
"""

import json
import shutil
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def _cells(kind):
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4
    return [(c["id"], "".join(c["source"]), c) for c in nb["cells"] if c["cell_type"] == kind]


def test_notebook_is_clean_and_says_the_weights_are_random():
    text = " ".join(src for _, src, _ in _cells("markdown"))
    assert "weights are random" in text and "noise" in text and "gibberish" in text
    for cell_id, _, cell in _cells("code"):
        assert cell["outputs"] == [] and cell["execution_count"] is None, f"{cell_id}: stored outputs"
    code = "\n".join(src for _, src, _ in _cells("code"))
    for step in ("from_pretrained", ".generate(", ".edit(", ".caption(", '"convert"', '"parity"'):
        assert step in code, f"the notebook no longer shows {step}"


def test_notebook_runs(monkeypatch, capsys):
    monkeypatch.chdir(NOTEBOOK.parent)
    namespace = {"__name__": "__quickstart__"}
    try:
        for cell_id, source, _ in _cells("code"):
            try:
                exec(compile(source, f"{NOTEBOOK.name}:{cell_id}", "exec"), namespace)
            except Exception as e:
                pytest.fail(f"{cell_id} raised {type(e).__name__}: {e}")
    finally:
        if "WORK" in namespace:
            shutil.rmtree(namespace["WORK"], ignore_errors=True)
    out = capsys.readouterr().out
    assert "passed, 0 failed" in out  # the parity cell printed its table
    assert namespace["images"][0].size == (namespace["SIZE"],) * 2
    assert namespace["edited"].size == (namespace["SIZE"],) * 2
    assert isinstance(namespace["answer"], str)
