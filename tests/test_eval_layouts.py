"""`unipic-jax eval-gen`: the benchmark layouts on the tiny fixture model (random weights).

Each layout's files and names exactly, the per-image seeds in the metadata, resuming (finished
items are not sampled again, the model is not even loaded when nothing is left), shards, and bad
input refused with a one-line error (exit 2) before the model is loaded. Size 64, 2 MAR steps.
"""

import json

import numpy as np
import pytest
from conftest import FIXTURE_ROOT, fixture_checkpoint
from PIL import Image

from configs.fixture import get_config
from unipic_jax import cli
from unipic_jax.api import UniPicPipeline

SIZE = get_config(FIXTURE_ROOT / "unipic").mar.img_size
FAST = ["--size", str(SIZE), "--steps", "2", "--no-progress"]
GENEVAL_LINES = ['{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a bench"}',
                 '{"tag": "colors", "prompt": "a photo of a red cat"}',
                 '{"tag": "counting", "prompt": "two dogs"}']


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return fixture_checkpoint(tmp_path_factory.mktemp("eval"))


@pytest.fixture(scope="module")
def loaded():
    """The command's pipeline, loaded once for the module (a load takes seconds)."""
    return {}


@pytest.fixture
def calls(monkeypatch, loaded):
    """Counts the images sampled (generate and edit calls) and the model loads; every load after
    the first returns the first one's pipeline."""
    count = {"generate": 0, "edit": 0, "load": 0}
    generate, edit, real_load = UniPicPipeline.generate, UniPicPipeline.edit, cli._pipeline

    def load(args):
        if "pipe" not in loaded:
            loaded["pipe"] = real_load(args)
        return loaded["pipe"]

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            count[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(UniPicPipeline, "generate", counted("generate", generate))
    monkeypatch.setattr(UniPicPipeline, "edit", counted("edit", edit))
    monkeypatch.setattr(cli, "_pipeline", counted("load", load))
    return count


def _picture(path, shape=(SIZE + 8, SIZE, 3), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _meta(path):
    with Image.open(path) as img:
        return dict(img.text)


def test_geneval_layout_shards_and_resume(ckpt, tmp_path, calls, capsys):
    metadata = tmp_path / "evaluation_metadata.jsonl"
    metadata.write_text("\n".join(GENEVAL_LINES) + "\n")
    out = tmp_path / "out"
    argv = ["eval-gen", "geneval", "--checkpoint", str(ckpt), "--metadata", str(metadata), "--out-dir", str(out),
            "--samples", "2", "--seed", "10", *FAST]

    assert cli.main(argv + ["--shard", "1/2"]) == 0  # the odd items only
    assert _files(out) == ["00001/metadata.jsonl", "00001/samples/0000.png", "00001/samples/0001.png"]
    assert calls["generate"] == 2
    assert (out / "00001" / "metadata.jsonl").read_text() == GENEVAL_LINES[1] + "\n"
    for j in range(2):
        meta = _meta(out / "00001" / "samples" / f"{j:04d}.png")
        assert (meta["seed"], meta["benchmark"], meta["item"], meta["prompt"]) == (str(10 + 2 + j), "geneval", "1",
                                                                                   "a photo of a red cat")
        with Image.open(out / "00001" / "samples" / f"{j:04d}.png") as img:
            assert img.size == (SIZE, SIZE)

    assert cli.main(argv + ["--shard", "0/2"]) == 0
    assert _files(out) == [f"{i:05d}/{f}" for i in range(3) for f in
                           ("metadata.jsonl", "samples/0000.png", "samples/0001.png")]
    assert calls["generate"] == 6
    assert json.loads((out / "00002" / "metadata.jsonl").read_text()) == json.loads(GENEVAL_LINES[2])
    assert _meta(out / "00002" / "samples" / "0001.png")["seed"] == str(10 + 2 * 2 + 1)

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    loads = calls["load"]
    assert cli.main(argv) == 0  # everything finished: nothing sampled, the model not even loaded
    assert (calls["generate"], calls["load"]) == (6, loads)
    assert "3 items, 3 finished already" in capsys.readouterr().out

    (out / "00000" / "samples" / "0001.png").unlink()  # an unfinished item is made again, alone
    assert cli.main(argv) == 0
    assert calls["generate"] == 8
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if "00000" not in p.parts)
    assert (out / "00000" / "samples" / "0001.png").is_file()

    capsys.readouterr()
    assert cli.main(argv[:-len(FAST)] + ["--size", str(SIZE), "--steps", "3"]) == 2  # other settings: refused
    err = capsys.readouterr().err
    assert "made with other settings (steps=2 here, 3 asked)" in err and err.count("\n") == 1, err
    metadata.write_text('{"prompt": "another prompt"}\n')  # another input: refused too
    assert cli.main(argv) == 2
    assert "prompt=a bench here, another prompt asked" in capsys.readouterr().err


def test_dpg_writes_one_2x2_grid_per_prompt_file(ckpt, tmp_path, calls):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "partiprompts7.txt").write_text("A red truck at dusk.\n")
    out = tmp_path / "out"
    assert cli.main(["eval-gen", "dpg", "--checkpoint", str(ckpt), "--prompts", str(prompts), "--out-dir", str(out),
                     *FAST]) == 0
    assert _files(out) == ["partiprompts7.png"]  # the scorer reads every file of the folder
    assert calls["generate"] == 4
    with Image.open(out / "partiprompts7.png") as img:
        assert img.size == (2 * SIZE, 2 * SIZE) and img.mode == "RGB"
        meta = dict(img.text)
    assert json.loads(meta["seeds"]) == [0, 1, 2, 3] and meta["benchmark"] == "dpg" and "seed" not in meta
    assert meta["prompt"] == "A red truck at dusk."  # the file's text, stripped


def test_gedit_layout(ckpt, tmp_path, calls):
    data = tmp_path / "gedit" / "gedit.jsonl"
    src = _picture(tmp_path / "gedit" / "images" / "a.png")
    _picture(tmp_path / "gedit" / "images" / "b.png", seed=1)
    records = [dict(key="k1", task_type="color_alter", instruction_language="en", instruction="make it blue",
                    image="images/a.png"),
               dict(key="k1", task_type="color_alter", instruction_language="cn", instruction="把它变成蓝色",
                    image="images/b.png")]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    out = tmp_path / "out"
    assert cli.main(["eval-gen", "gedit", "--checkpoint", str(ckpt), "--data", str(data), "--out-dir", str(out),
                     "--model-name", "unipic-jax", "--shard", "0/2", *FAST]) == 0
    assert _files(out) == [f"unipic-jax/fullset/color_alter/en/{f}" for f in ("k1.png", "k1_SRCIMG.png")]
    folder = out / "unipic-jax" / "fullset" / "color_alter" / "en"
    with Image.open(folder / "k1_SRCIMG.png") as copy, Image.open(src) as original:
        assert np.array_equal(np.asarray(copy.convert("RGB")), np.asarray(original.convert("RGB")))
    meta = _meta(folder / "k1.png")
    assert (meta["task"], meta["prompt"], meta["seed"], meta["benchmark"]) == ("edit", "make it blue", "0", "gedit")
    assert calls["edit"] == 1


def test_imgedit_layout(ckpt, tmp_path, calls):
    images = tmp_path / "Benchmark" / "singleturn"
    _picture(images / "animal" / "000342021.jpg")
    edits = tmp_path / "basic_edit.json"
    edits.write_text(json.dumps({"1082": {"id": "animal/000342021.jpg", "prompt": "Make the shell smooth.",
                                          "edit_type": "adjust"}}))
    out = tmp_path / "out"
    argv = ["eval-gen", "imgedit", "--checkpoint", str(ckpt), "--edits", str(edits), "--images", str(images),
            "--out-dir", str(out), "--seed", "3", *FAST]
    assert cli.main(argv) == 0
    assert _files(out) == ["1082.png"]
    meta = _meta(out / "1082.png")
    assert (meta["seed"], meta["key"], meta["benchmark"]) == ("3", "1082", "imgedit")
    assert cli.main(argv) == 0 and calls["edit"] == 1  # finished: skipped


BAD = [
    ("missing", ["geneval", "--metadata", "{tmp}/absent.jsonl"], "no such file or folder"),
    ("not-json", ["geneval", "--metadata", "{notjson}"], ":2: not JSON"),
    ("no-prompt", ["geneval", "--metadata", "{noprompt}"], "want a non-empty 'prompt'"),
    ("empty", ["geneval", "--metadata", "{blank}"], "holds no items"),
    ("shard", ["geneval", "--metadata", "{good}", "--shard", "2/2"], "want 0 <= I < N"),
    ("shard-form", ["geneval", "--metadata", "{good}", "--shard", "1"], "--shard wants I/N"),
    ("size", ["geneval", "--metadata", "{good}", "--size", "100"], "multiple of 16"),
    ("seed", ["geneval", "--metadata", "{good}", "--seed", str(2 ** 32 - 2)], "out of range"),
    ("out-file", ["geneval", "--metadata", "{good}", "--out-dir", "{good}"], "is a file, not a folder"),
    ("images-elsewhere", ["geneval", "--metadata", "{good}", "--images", "{tmp}"], "--images goes with imgedit"),
    ("dpg-file", ["dpg", "--prompts", "{good}"], "prompts folder"),
    ("dpg-samples", ["dpg", "--prompts", "{tmp}/prompts", "--samples", "2"], "--samples must be 4"),
    ("gedit-image", ["gedit", "--data", "{gedit_missing}"], "no such image file"),
    ("gedit-key", ["gedit", "--data", "{gedit_key}"], "key must be a plain file name"),
    ("imgedit-no-images", ["imgedit", "--edits", "{edits}"], "pass --images"),
    ("imgedit-not-image", ["imgedit", "--edits", "{edits}", "--images", "{tmp}"], "not an image file"),
    ("imgedit-samples", ["imgedit", "--edits", "{edits}", "--images", "{tmp}", "--samples", "2"],
     "--samples must be 1"),
]


@pytest.mark.parametrize("name,argv,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_before_loading(name, argv, match, ckpt, tmp_path, capsys, monkeypatch):
    def no_load(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "_pipeline", no_load)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "1.txt").write_text("a cat")
    (tmp_path / "x.jpg").write_text("not a picture")
    files = dict(good='{"prompt": "a cat"}', notjson='{"prompt": "a cat"}\n{prompt', noprompt='{"tag": "colors"}',
                 blank="\n", gedit_missing=json.dumps(dict(key="k", task_type="t", instruction_language="en",
                                                           instruction="x", image="gone.png")),
                 gedit_key=json.dumps(dict(key="../k", task_type="t", instruction_language="en", instruction="x",
                                           image="x.jpg")),
                 edits=json.dumps({"1": {"id": "x.jpg", "prompt": "x", "edit_type": "adjust"}}))
    for key, content in files.items():
        (tmp_path / f"{key}.json").write_text(content + "\n")
    argv = [a.format(tmp=tmp_path, **{k: tmp_path / f"{k}.json" for k in files}) for a in argv]
    out = [] if "--out-dir" in argv else ["--out-dir", str(tmp_path / "out")]
    assert cli.main(["eval-gen", argv[0], "--checkpoint", str(ckpt), *FAST, *out, *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unipic-jax: error:") and err.count("\n") == 1, err
    assert match in err, err
    assert not (tmp_path / "out").exists()
