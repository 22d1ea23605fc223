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
    # Settings the model cannot run are refused before the model is loaded (the checks read only
    # the checkpoint's config.json), with the limit in the message.
    ("steps-over-tokens", ["generate", "--prompt", "a fox", "--size", "16", "--steps", "32"], "steps must be"),
    ("cfg-nan", ["generate", "--prompt", "a fox", *FAST, "--cfg", "nan"], "cfg (guidance scale) must be a finite"),
    ("cfg-inf", ["generate", "--prompt", "a fox", *FAST, "--cfg", "inf"], "finite number"),
    ("temperature-nan", ["generate", "--prompt", "a fox", *FAST, "--temperature", "nan"], "temperature must be"),
    ("batch-0", ["generate", "--prompt", "a fox", *FAST, "--batch", "0"], "batch must be an integer in [1, 64]"),
    ("seed-huge", ["generate", "--prompt", "a fox", *FAST, "--seed", str(2 ** 64)], "seed must be an integer"),
    ("seed-negative", ["edit", "--image", "{picture}", "--prompt", "x", *FAST, "--seed", "-1"], "seed must be"),
    ("edit-huge", ["edit", "--image", "{picture}", "--prompt", "blue", "--size", "100000"], "more than the model's"),
    ("caption-huge", ["caption", "--image", "{picture}", "--size", "100000"], "more than the model's context"),
    ("caption-top-p", ["caption", "--image", "{picture}", "--sample", "--top-p", "0"], "top_p must be"),
    ("gif", ["generate", "--prompt", "a fox", *FAST, "--out", "{out}/x.gif"], "unknown image type"),
    ("name-escapes", ["generate", "--prompts", "{escape}", *FAST], 'must be a plain file name'),
    ("name-absolute", ["generate", "--prompts", "{absolute}", *FAST], 'must be a plain file name'),
    ("name-empty", ["generate", "--prompts", "{blank}", *FAST], 'must be a plain file name'),
    ("name-twice", ["generate", "--prompts", "{twice}", *FAST], "two outputs would share"),
    ("seed-string", ["generate", "--prompts", "{seedstr}", *FAST], ":1: seed must be an integer"),
]


@pytest.mark.parametrize("name,argv,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, argv, match, ckpt, picture, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a fox"}\n{"prompt": ""}\n')
    files = dict(escape='{"prompt": "a", "name": "../../x"}', absolute=f'{{"prompt": "a", "name": "{tmp_path}/x"}}',
                 blank='{"prompt": "a", "name": ""}', twice='{"prompt": "a", "name": "a"}\n{"prompt": "b", "name": "A"}',
                 seedstr='{"prompt": "a", "seed": "7"}')
    for name, text in files.items():
        (tmp_path / f"{name}.jsonl").write_text(text + "\n")
    paths = dict(picture=picture, text=tmp_path / "notes.png", missing=tmp_path / "gone.png",
                 jsonl=tmp_path / "p.jsonl", out=tmp_path / "out", **{n: tmp_path / f"{n}.jsonl" for n in files})
    argv = [a.format(**paths) for a in argv]
    out = ["--out-dir" if "--prompts" in argv else "--out", str(tmp_path / "out" / "x.png")]
    if argv[0] == "caption" or "--out" in argv:
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


def test_outputs_are_never_silently_replaced(ckpt, tmp_path, capsys):
    """An existing --out is refused before any work (the file is untouched); --overwrite replaces it."""
    out = tmp_path / "fox.png"
    out.write_bytes(b"the user's picture")
    argv = ["generate", "--checkpoint", str(ckpt), "--prompt", "a fox", "--seed", "1", *FAST, "--out", str(out)]
    assert cli.main(argv) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"the user's picture"
    assert cli.main(argv + ["--overwrite"]) == 0
    with Image.open(out) as img:
        assert img.format == "PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox.png"]


def test_output_type_follows_the_suffix_and_seed_null_is_derived(ckpt, tmp_path, capsys):
    from unipic_jax import images

    jobs = tmp_path / "p.jsonl"
    jobs.write_text('{"prompt": "a fox", "seed": null, "name": "fox"}\n')
    assert cli.main(["generate", "--checkpoint", str(ckpt), "--prompts", str(jobs), "--seed", "5", *FAST,
                     "--format", "webp", "--out-dir", str(tmp_path / "d")]) == 0
    assert images.read_metadata(tmp_path / "d" / "fox.webp")["seed"] == "5"
    assert cli.main(["generate", "--checkpoint", str(ckpt), "--prompt", "a fox", "--seed", "2", *FAST,
                     "--out", str(tmp_path / "fox.jpg")]) == 0
    with Image.open(tmp_path / "fox.jpg") as img:
        assert img.format == "JPEG"
    assert images.read_metadata(tmp_path / "fox.jpg")["prompt"] == "a fox"


def test_a_file_made_while_sampling_is_kept(ckpt, tmp_path, monkeypatch, capsys):
    """Two processes on one --out: the one that finishes second writes NAME.1.EXT, nothing is lost."""
    from unipic_jax.api import UniPicPipeline

    out = tmp_path / "fox.png"
    call = UniPicPipeline.__call__  # what `generate` samples with

    def racing_call(self, *args, **kwargs):
        result = call(self, *args, **kwargs)
        out.write_bytes(b"the other process's picture")
        return result

    monkeypatch.setattr(UniPicPipeline, "__call__", racing_call)
    assert cli.main(["generate", "--checkpoint", str(ckpt), "--prompt", "a fox", *FAST, "--out", str(out)]) == 0
    assert "appeared while sampling" in capsys.readouterr().err
    assert out.read_bytes() == b"the other process's picture"
    with Image.open(tmp_path / "fox.1.png") as img:
        assert img.format == "PNG"


def test_damaged_tokenizer_and_config_are_one_line_errors(ckpt, tmp_path, capsys):
    broken = tmp_path / "ckpt"
    shutil.copytree(ckpt, broken)
    (broken / "tokenizer" / "tokenizer.json").write_text("{}")
    _bad(capsys, tmp_path, ["caption", "--checkpoint", str(broken), "--image", str(broken / "config.json")],
         "not an image file")  # the image is checked before the model is loaded
    picture = tmp_path / "in.png"
    Image.new("RGB", (int(SIZE), int(SIZE))).save(picture)
    _bad(capsys, tmp_path, ["caption", "--checkpoint", str(broken), "--image", str(picture), "--size", SIZE],
         "cannot load the tokenizer")
    doc = json.loads((broken / "config.json").read_text())
    del doc["config"]["qwen2"]["rms_eps"]
    (broken / "config.json").write_text(json.dumps(doc))
    _bad(capsys, tmp_path, ["caption", "--checkpoint", str(broken), "--image", str(picture), "--size", SIZE],
         "section 'qwen2': missing rms_eps")


def test_malformed_parity_fixture_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "meta.json").write_text("{}")
    assert cli.main(["parity", str(tmp_path), "--only", "vae"]) == 2
    err = capsys.readouterr().err
    assert "malformed fixture" in err and err.count("\n") == 1, err


def test_compile_cache_location(monkeypatch, tmp_path):
    from unipic_jax import compile_cache

    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.cache_dir() is None
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "c"))
    assert compile_cache.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(compile_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert compile_cache.cache_dir() == tmp_path / "x" / "unipic-jax" / "xla"


def test_libtpu_is_kept_quiet_on_hosts_without_tpu_chips(monkeypatch):
    import importlib.util
    import os
    import sys

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "libtpu" else None if "cuda" in name else real(name, *a))
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    assert not cli.quiet_libtpu("generate")  # JAX already imported (as in this test process): hands off
    monkeypatch.delitem(sys.modules, "jax")
    assert not cli.quiet_libtpu("compile")  # `compile` needs libtpu's compiler
    assert cli.quiet_libtpu("generate") and os.environ["JAX_PLATFORMS"] == "cpu"
