"""The parity contract: every fixture row the `unipic-jax parity` command prints must hold.

One test per fixture subfolder runs exactly what the CLI runs (same loader, same bounds: 1e-4 x
max|ref| for forward passes, 1e-3 x max|ref| for sampling chains, exact for integers; see
unipic_jax/parity/__init__.py for why), so a failure names the component and lists its rows.
"""

import pytest

from unipic_jax import parity

from conftest import FIXTURE_ROOT

SUPPORTED = ["vae", "mar", "qwen2", "siglip", "unipic"]


@pytest.mark.parametrize("component", SUPPORTED)
def test_component_rows_hold(component):
    results = parity.run(FIXTURE_ROOT, [component])
    rows = list(parity.iter_rows(results))
    assert rows, f"{component}: nothing compared"
    bad = [parity.format_row(r) for r in rows if not r.ok]
    assert not bad, "\n".join([parity.HEADER, *bad])


def test_cli_exit_status(tmp_path, capsys):
    from unipic_jax.cli import main

    # A root without the asked-for component is skipped, which fails when asked for with --only.
    assert main(["parity", str(tmp_path), "--only", "vae"]) == 1
    out = capsys.readouterr().out
    assert "skipped" in out
