"""The README's Quickstart, run verbatim as a newcomer would: every bash line of the section, in
order, in an empty folder, as separate processes (fresh JAX each time), offline.

Each command must exit 0 with no traceback, and the run must leave `checkpoints/tiny`, the images
it names and the exported release. Slow-ish (each command starts JAX and compiles), so one test.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_commands() -> list[str]:
    text = README.read_text()
    match = re.search(r"^(#+) [^\n]*Quickstart[^\n]*\n(.*?)(?=^\1 )", text, re.M | re.S)
    assert match, "README.md has no Quickstart section"
    blocks = re.findall(r"```bash\n(.*?)```", match.group(2), re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_quickstart_runs_verbatim(tmp_path):
    commands = quickstart_commands()
    assert commands and all(c.startswith("unipic-jax ") for c in commands), commands
    env = {**os.environ, "UNIPIC_JAX_CACHE": str(tmp_path / "xla-cache"), "JAX_PLATFORMS": "cpu"}
    env.pop("UNIPIC_FIXTURES", None)
    work = tmp_path / "clone"
    work.mkdir()
    cli = [sys.executable, "-m", "unipic_jax.cli"]
    for command in commands:
        argv = shlex.split(command)
        done = subprocess.run(cli + argv[1:], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (command, done.stdout, done.stderr[-3000:])
    assert (work / "checkpoints" / "tiny" / "config.json").is_file()
    for name in ("fox.png", "night.png", "square.jpg"):
        with Image.open(work / name) as img:
            assert img.format in ("PNG", "JPEG")
    assert (work / "exports" / "smoke" / "pytorch_model.bin").is_file()
    assert list((tmp_path / "xla-cache").iterdir()), "the compilation cache stayed empty"
