"""The `generate`, `edit` and `caption` commands on the tiny fixture model (random weights).

Bad input must end with a one-line error on stderr, exit status 2 and no output file; a good run
writes a PNG whose text metadata holds the prompt, seed and settings. Runs use the fixture MAR's
native size and 2 MAR steps (the same programs as test_api, so a whole-suite run compiles them once).
"""

import json
import shutil

import numpy as np
import pytest
from conftest import FIXTURE_ROOT, fixture_checkpoint
from PIL import Image

from configs.fixture import get_config
from unipic_jax import cli

UNIPIC = FIXTURE_ROOT / "unipic"
CONFIG = get_config(UNIPIC)
SIZE = str(CONFIG.mar.img_size)
FAST = ["--size", SIZE, "--steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return fixture_checkpoint(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def truncated(ckpt, tmp_path_factory):
    cut = tmp_path_factory.mktemp("cut") / "ckpt"
    shutil.copytree(ckpt, cut)
    data = [p for p in (cut / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data
    for p in data:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return cut


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "in.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (int(SIZE) + 10, int(SIZE), 3), dtype=np.uint8)).save(path)
    return path


def _bad(capsys, tmp_path, argv, match):
    """Exit 2, one line naming the problem, nothing written under tmp_path/out."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("unipic-jax: error:") and err.count("\n") == 1, err
    assert match in err, err
    assert list(out.iterdir()) == []


BAD = [
    ("size", ["generate", "--prompt", "a fox", "--size", "100"], "image size 100 must be a positive multiple of 16"),
    ("empty", ["generate", "--prompt", "   "], "empty prompt"),
    ("long", ["generate", "--prompt", "a" * CONFIG.qwen2.max_position_embeddings, *FAST], "tokens but at most"),
    ("empty-edit", ["edit", "--image", "{picture}", "--prompt", "", *FAST], "empty prompt"),
    ("edit-size", ["edit", "--image", "{picture}", "--prompt", "blue", "--size", "72"], "multiple of 16"),
    ("not-image", ["edit", "--image", "{text}", "--prompt", "blue", *FAST], "not an image file"),
    ("no-image", ["caption", "--image", "{missing}"], "no such image file"),
    ("caption-size", ["caption", "--image", "{picture}", "--size", "30"], "multiple of 16"),
    ("jsonl", ["generate", "--prompts", "{jsonl}", *FAST], ":2: empty prompt"),
]


@pytest.mark.parametrize("name,argv,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, argv, match, ckpt, picture, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a fox"}\n{"prompt": ""}\n')
    paths = dict(picture=picture, text=tmp_path / "notes.png", missing=tmp_path / "gone.png",
                 jsonl=tmp_path / "p.jsonl")
    argv = [a.format(**paths) for a in argv]
    out = ["--out-dir" if "--prompts" in argv else "--out", str(tmp_path / "out" / "x.png")]
    if argv[0] == "caption":
        out = []
    _bad(capsys, tmp_path, argv + ["--checkpoint", str(ckpt)] + out, match)


@pytest.mark.parametrize("kind", ["missing", "truncated"])
def test_bad_checkpoint(kind, truncated, tmp_path, capsys):
    path = tmp_path / "absent" if kind == "missing" else truncated
    match = "no such folder" if kind == "missing" else "cannot read the params, truncated or damaged?"
    _bad(capsys, tmp_path, ["generate", "--checkpoint", str(path), "--prompt", "a fox", *FAST,
                            "--out", str(tmp_path / "out" / "x.png")], match)


def test_generate_writes_png_with_metadata(ckpt, tmp_path, capsys):
    out = tmp_path / "fox.png"
    assert cli.main(["generate", "--checkpoint", str(ckpt), "--prompt", "a red fox", "--seed", "7", *FAST,
                     "--out", str(out)]) == 0
    assert "seed 7" in capsys.readouterr().out
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (int(SIZE), int(SIZE))
        text = dict(img.text)
    assert text["prompt"] == "a red fox" and text["task"] == "text-to-image"
    assert (json.loads(text["seed"]), json.loads(text["steps"]), json.loads(text["cfg"])) == (7, 2, 3.0)
    assert text["model"] == str(ckpt) and text["cfg_schedule"] == "constant"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox.png"]  # no temporary file left


def test_generate_from_jsonl(ckpt, tmp_path, capsys):
    jobs = tmp_path / "prompts.jsonl"
    jobs.write_text('{"prompt": "a fox", "seed": 3, "name": "fox"}\n\n{"prompt": "a bird"}\n')
    assert cli.main(["generate", "--checkpoint", str(ckpt), "--prompts", str(jobs), "--seed", "10", *FAST,
                     "--out-dir", str(tmp_path / "dir")]) == 0
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["00001.png", "fox.png"]
    with Image.open(tmp_path / "dir" / "fox.png") as a, Image.open(tmp_path / "dir" / "00001.png") as b:
        assert (a.text["prompt"], a.text["seed"]) == ("a fox", "3")
        assert (b.text["prompt"], b.text["seed"]) == ("a bird", "11")  # --seed + line index


def test_edit_and_caption(ckpt, picture, tmp_path, capsys):
    out = tmp_path / "edited.png"
    assert cli.main(["edit", "--checkpoint", str(ckpt), "--image", str(picture), "--prompt", "make it blue",
                     *FAST, "--out", str(out)]) == 0
    with Image.open(out) as img:
        assert img.size == (int(SIZE), int(SIZE)) and img.text["task"] == "edit"
    capsys.readouterr()
    assert cli.main(["caption", "--checkpoint", str(ckpt), "--image", str(out), "--size", SIZE,
                     "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
