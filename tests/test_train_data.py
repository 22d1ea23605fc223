"""Training data: sources (JSONL, caption folder, TFDS), the reference preprocessing and templates,
CFG prompt dropping, fixed shapes and buckets, task mixing, process sharding, iterator state, and
corrupt records (skipped with a counted warning, never retried forever).

Token ids come from a byte-level stand-in tokenizer with the fixture's special ids, so every
expected id sequence is the tokenizer's own encoding of the reference's strings.
"""

import io
import json
import logging

import numpy as np
import pytest

from configs.stages import smoke
from unipic_jax import prompts
from unipic_jax.train import data

VOCAB, EOS, PAD = 512, 509, 510


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = prompts.write_byte_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=VOCAB, eos_id=EOS, pad_id=PAD)
    return prompts.Tokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return data.write_synthetic(tmp_path_factory.mktemp("data"), size=32, count=8)


def spec(task, tok, **kw):
    base = dict(resolution=32, max_length=96, image_id=tok.image_id, pad_id=tok.eos_id)
    if task != "t2i":
        base["image_tokens"] = 8
    if task == "und":
        base.update(answer_slots=16, max_length=112)
    base.update(kw)
    return data.TaskSpec(task, **base)


def first(ds):
    return next(iter(ds))


def test_t2i_prompt_image_and_padding(tokenizer, synthetic):
    source = data.JsonlSource(synthetic / "t2i.jsonl")
    record = source[0]
    out = data.Preprocess(spec("t2i", tokenizer), tokenizer).random_map(record, np.random.default_rng(0))
    caption = record["record"]["caption"]
    want = tokenizer.encode("<|im_start|>user\nGenerate an image: " + caption.strip() + "<|im_end|>\n<|im_start|>assistant\n")
    n = len(want)
    assert out["input_ids"][:n].tolist() == want
    assert (out["input_ids"][n:] == EOS).all() and out["attention_mask"].sum() == n and out["attention_mask"][:n].all()
    assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.float32
    assert -1.0 <= out["image"].min() and out["image"].max() <= 1.0
    dropped = data.Preprocess(spec("t2i", tokenizer, cfg_drop_prob=1.0), tokenizer).random_map(
        record, np.random.default_rng(0))
    want_drop = tokenizer.encode(prompts.chat("Generate an image."))
    assert dropped["input_ids"][: len(want_drop)].tolist() == want_drop


def test_cfg_drop_rate_and_determinism(tokenizer, synthetic):
    # p = 0.1 of the prompts become "Generate an image."; the draw is a function of (seed, index),
    # so two pipelines agree element by element.
    s = spec("t2i", tokenizer, cfg_drop_prob=0.1)
    uncond = tokenizer.encode(prompts.chat("Generate an image."))

    def drops(seed):
        ds = data.task_dataset(data.JsonlSource(synthetic / "t2i.jsonl"), s, tokenizer, 50, seed=seed)
        batch = next(iter(ds))
        return [row[: len(uncond)].tolist() == uncond and m.sum() == len(uncond)
                for row, m in zip(batch["input_ids"], batch["attention_mask"])]

    a = drops(3)
    assert a == drops(3)
    assert 1 <= sum(a) <= 12  # 50 draws at p=0.1: 5 expected, [1, 12] holds with prob > 0.999


def test_und_template_labels_and_image_tokens(tokenizer, synthetic):
    source = data.JsonlSource(synthetic / "und.jsonl")
    rec = source[1]["record"]
    s = spec("und", tokenizer)
    out = data.Preprocess(s, tokenizer).random_map(source[1], np.random.default_rng(0))
    head = tokenizer.encode("<|im_start|>user\n")
    prompt = head + [tokenizer.image_id] * 8 + tokenizer.encode("\n" + rec["question"] + "<|im_end|>\n<|im_start|>assistant\n")
    answer = tokenizer.encode(rec["answer"] + "<|im_end|>")
    sep = tokenizer.encode("\n")
    ids = prompt + answer + sep
    assert out["input_ids"][: len(ids)].tolist() == ids
    labels = out["labels"][: len(ids)].tolist()
    assert labels == [-100] * len(prompt) + answer + [-100] * len(sep)  # xtuner: input and SEP ignored
    assert (out["labels"][len(ids):] == -100).all()
    assert int((out["input_ids"] == tokenizer.image_id).sum()) == 8


def test_edit_layouts(tokenizer, synthetic):
    source = data.JsonlSource(synthetic / "edit.jsonl")
    rec = source[0]["record"]
    train = data.Preprocess(spec("edit", tokenizer), tokenizer).random_map(source[0], np.random.default_rng(0))
    want = [tokenizer.image_id] * 8 + tokenizer.encode(prompts.chat(rec["instruction"]))
    assert train["input_ids"][: len(want)].tolist() == want  # image ids before <|im_start|>, no "\n"
    assert train["source"].shape == train["target"].shape == (32, 32, 3)
    assert not np.array_equal(train["source"], train["target"])
    infer = data.Preprocess(spec("edit", tokenizer, edit_layout="inference"), tokenizer).random_map(
        source[0], np.random.default_rng(0))
    want = tokenizer.encode(prompts.edit_prompt(rec["instruction"], 8))
    assert infer["input_ids"][: len(want)].tolist() == want
    uncond = data.Preprocess(spec("edit", tokenizer, cfg_drop_prob=1.0), tokenizer).random_map(
        source[0], np.random.default_rng(0))
    want = [tokenizer.image_id] * 8 + tokenizer.encode(prompts.chat("Edit this image."))
    assert uncond["input_ids"][: len(want)].tolist() == want


def test_mixed_batches_shapes_and_iterator_state(tokenizer, synthetic):
    cfg = smoke.get_config()
    ds = data.make_dataset(cfg, tokenizer, data.parse_data_spec(str(synthetic)))
    it = iter(ds)
    batch = next(it)
    assert set(batch) == {"t2i", "edit", "und"}
    for task, b in batch.items():
        assert b["input_ids"].shape == (cfg.data.batch_size[task], cfg.data.max_length[task])
    assert batch["und"]["labels"].shape == batch["und"]["input_ids"].shape
    next(it)
    state = it.get_state()
    json.dumps(state)  # what the orbax handler writes
    want = [next(it) for _ in range(3)]
    again = iter(data.make_dataset(cfg, tokenizer, data.parse_data_spec(str(synthetic))))
    again.set_state(state)
    for w in want:
        got = next(again)
        for task in w:
            for k in w[task]:
                np.testing.assert_array_equal(got[task][k], w[task][k])


def test_epochs_reshuffle_and_process_shards(tokenizer, synthetic, tmp_path):
    records = [{"image": str(synthetic / "images/red_circle.png"), "caption": f"shape {i}"} for i in range(8)]
    (tmp_path / "t2i.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    source = data.JsonlSource(tmp_path / "t2i.jsonl")
    s = spec("t2i", tokenizer)

    def captions(batch):
        return [tokenizer.decode(r[m]).split("image: ")[1].split("<")[0] for r, m in
                zip(batch["input_ids"], batch["attention_mask"])]

    two_epochs = captions(next(iter(data.task_dataset(source, s, tokenizer, 16, seed=0))))
    assert sorted(two_epochs[:8]) == sorted(two_epochs[8:]) == sorted(r["caption"] for r in records)
    assert two_epochs[:8] != two_epochs[8:]  # every epoch reshuffled
    shards = [captions(next(iter(data.task_dataset(source, s, tokenizer, 8, seed=0, process_index=i,
                                                   process_count=2)))) for i in range(2)]
    assert [len(x) for x in shards] == [4, 4]  # global batch 8 over 2 processes
    assert set(shards[0]).isdisjoint(shards[1])
    assert set(shards[0]) == {f"shape {i}" for i in range(0, 8, 2)}  # process 0 reads records 0, 2, 4, 6


def test_corrupt_and_missing_records_are_skipped_with_a_count(tokenizer, synthetic, tmp_path, caplog):
    lines = (synthetic / "t2i.jsonl").read_text().splitlines()
    bad = [lines[0], "{not json", json.dumps({"image": "images/nowhere.png", "caption": "x"}), lines[1]]
    (tmp_path / "t2i.jsonl").write_text("\n".join(bad) + "\n")
    (tmp_path / "images").symlink_to(synthetic / "images")
    s = spec("t2i", tokenizer)
    with caplog.at_level(logging.WARNING, logger="unipic_jax.train.data"):
        batch = next(iter(data.task_dataset(data.JsonlSource(tmp_path / "t2i.jsonl"), s, tokenizer, 4, seed=0)))
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) >= 2 and "bad JSON" in " ".join(warnings) and "nowhere.png" in " ".join(warnings)
    assert "skipped so far" in warnings[-1]
    assert batch["num_skipped"].max() >= 2  # the running count travels with the batch
    (tmp_path / "all_bad.jsonl").write_text("{x\n{y\n")
    with pytest.raises(data.DataError, match="in a row"):
        next(iter(data.task_dataset(data.JsonlSource(tmp_path / "all_bad.jsonl"), s, tokenizer, 2, seed=0,
                                    max_consecutive_corrupt=5)))


def test_caption_folder_source(tokenizer, tmp_path):
    data.draw_shape("circle", "red", 24).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red circle\n")
    data.draw_shape("square", "blue", 24).save(tmp_path / "b.png")  # no caption file
    source = data.open_source(str(tmp_path))
    assert len(source) == 2
    assert source[0]["record"]["caption"] == "a red circle\n"
    assert isinstance(source[1], data.Corrupt) and "caption" in source[1].reason


def test_tfds_source_without_tensorflow(tokenizer, tmp_path):
    # A tiny TFDS dataset in ArrayRecord format, built and read offline (PNG bytes for the Image
    # feature: encoding arrays would need TensorFlow).
    tfds = pytest.importorskip("tensorflow_datasets")

    def png(shape, colour):
        buf = io.BytesIO()
        data.draw_shape(shape, colour, 24).save(buf, format="PNG")
        return buf.getvalue()

    class UnipicTinyShapes(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "img": tfds.features.Image(shape=(None, None, 3)), "text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, (shape, colour) in enumerate([("circle", "red"), ("square", "green"), ("triangle", "blue")]):
                yield i, {"img": png(shape, colour), "text": f"a {colour} {shape}"}

    UnipicTinyShapes(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    source = data.open_source("tfds:unipic_tiny_shapes:train", str(tmp_path))
    assert len(source) == 3
    s = spec("t2i", tokenizer, fields={"image": "img", "caption": "text"})
    batch = next(iter(data.task_dataset(source, s, tokenizer, 3, seed=0)))
    texts = {tokenizer.decode(r[m]) for r, m in zip(batch["input_ids"], batch["attention_mask"])}
    assert any("a green square" in t for t in texts)
    assert batch["image"].shape == (3, 32, 32, 3)


def test_buckets_and_data_spec(tokenizer, synthetic, tmp_path):
    batch = {"input_ids": np.zeros((2, 10), np.int32), "attention_mask": np.arange(10)[None] < np.array([[3], [6]]),
             "image": np.zeros((2, 4))}
    out = data.trim_to_bucket(batch, (4, 8, 10))
    assert out["input_ids"].shape == (2, 8) and out["image"].shape == (2, 4)
    assert data.parse_data_spec(str(synthetic)) == {t: str(synthetic / f"{t}.jsonl") for t in data.TASKS}
    assert data.parse_data_spec("t2i=a.jsonl,und=tfds:x:train") == {"t2i": "a.jsonl", "und": "tfds:x:train"}
    with pytest.raises(data.DataError):
        data.parse_data_spec("video=a.jsonl")
    with pytest.raises(data.DataError):
        data.open_source(str(tmp_path / "nothing.txt"))
