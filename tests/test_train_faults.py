"""Faults a user meets around training: damaged checkpoints, a resume after a kill (metrics logged
twice), bad `--set`s, missing data, TFDS datasets that are not prepared (never downloaded).

One Trainer (one compile) of the smoke stage at batch 3, 12 steps, a checkpoint every 4, serves
every test that trains; an uninterrupted run without checkpoints is the reference every resumed
run must reproduce bitwise.
"""

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from unipic_jax import cli
from unipic_jax.train import data, loop

SPEC = "smoke:batch=3"
OVERRIDES = ["total_steps=12", "checkpoint.every=4", "checkpoint.keep=3"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    cfg = loop.apply_overrides(loop.load_stage_config(SPEC), OVERRIDES)
    trainer = loop.Trainer(cfg)
    tokenizer = loop.load_tokenizer(cfg, root / "tok")
    sources = data.parse_data_spec(str(data.write_synthetic(root / "data", size=cfg.data.gen_resolution)))
    reference = trainer.run(root / "ref", sources, tokenizer=tokenizer, collect=True, progress=False,
                            checkpoints=False).history
    run = lambda workdir, **kw: trainer.run(workdir, sources, tokenizer=tokenizer, progress=False, **kw)
    return dict(root=root, trainer=trainer, run=run, reference=reference)


def logged_steps(workdir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def damage(step_dir: Path, how: str) -> None:
    if how == "truncate":  # every array file cut in half
        files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
        assert files
        for f in files:
            os.truncate(f, f.stat().st_size // 2)
    else:  # half-deleted: the state item gone
        shutil.rmtree(step_dir / "state")


def test_metrics_are_logged_once_after_a_kill(env):
    workdir = env["root"] / "kill"
    env["run"](workdir, stop_at=10)  # checkpoints 4 and 8, metrics of steps 1..10, then killed
    assert logged_steps(workdir) == list(range(1, 11))
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "lo')  # a line torn by the kill
    resumed = env["run"](workdir, collect=True)
    assert resumed.start_step == 8 and resumed.history == env["reference"][8:]
    assert logged_steps(workdir) == list(range(1, 13))  # every step once, in order
    assert not (workdir / "metrics.jsonl.tmp").exists()


def test_damaged_checkpoints_fall_back_to_an_intact_step(env, caplog):
    workdir, ckpt = env["root"] / "damaged", env["root"] / "damaged" / "checkpoints"
    env["run"](workdir, stop_at=10)
    damage(ckpt / "8", "truncate")
    with caplog.at_level("WARNING", logger="unipic_jax.train.loop"):
        resumed = env["run"](workdir, collect=True, stop_at=10)
    assert resumed.start_step == 4 and resumed.history == env["reference"][4:10]  # bitwise
    assert any("step 8" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    # Set aside, not deleted; step 8 was saved again (orbax would skip saves up to a step it holds).
    assert (ckpt / "damaged-8").is_dir() and (ckpt / "8").is_dir()
    assert logged_steps(workdir) == list(range(1, 11))

    damage(ckpt / "8", "half-delete")
    resumed = env["run"](workdir, collect=True)
    assert resumed.start_step == 4 and resumed.history == env["reference"][4:]
    assert (ckpt / "damaged-8-1").is_dir()
    assert sorted(p.name for p in ckpt.iterdir()) == ["12", "4", "8", "damaged-8", "damaged-8-1"]

    for step in ("4", "8", "12"):
        damage(ckpt / step, "truncate")
    with pytest.raises(ValueError) as raised:
        env["run"](workdir)
    message = str(raised.value)
    assert "\n" not in message and str(ckpt) in message and "no checkpoint restores" in message
    assert sorted(p.name for p in ckpt.iterdir()) == ["12", "4", "8", "damaged-8", "damaged-8-1"]  # nothing moved


def test_train_main_on_synthetic_data_and_resume(env, tmp_path, monkeypatch):
    trainer = env["trainer"]

    def same_trainer(config):  # the module's compiled trainer, for the very same config
        assert config.to_dict() == trainer.config.to_dict()
        return trainer

    monkeypatch.setattr(loop, "Trainer", same_trainer)
    workdir = tmp_path / "run"
    result = loop.train_main(SPEC, "synthetic", str(workdir), OVERRIDES, progress=False)
    assert result.start_step == 0 and int(result.state.step) == 12
    assert {p.name for p in (workdir / "data").iterdir()} >= {"t2i.jsonl", "edit.jsonl", "und.jsonl", "images"}

    def no_rewrite(*args, **kwargs):
        raise AssertionError("the synthetic data was written again")

    monkeypatch.setattr(data, "write_synthetic", no_rewrite)
    again = loop.train_main(SPEC, "synthetic", str(workdir), OVERRIDES, progress=False)  # resumes, reusing the data
    assert again.start_step == 12 and int(again.state.step) == 12


BAD_SETS = {
    "total_steps=abc": ["total_steps", "an int", "'abc'"],
    "checkpoint.every=0": ["checkpoint.every=0", ">= 1"],
    "checkpoint.keep=0": ["checkpoint.keep"],
    "log_every=-1": ["log_every"],
    "optim.lr=nan": ["optim.lr", "finite", "'nan'"],
    "optim.lr=1e999": ["optim.lr", "finite"],
    "optim.lr=-0.1": ["optim.lr"],
    "remat=everything": ["remat", "blocks"],
    "checkpoint.async_save=maybe": ["checkpoint.async_save", "bool"],
    "data.batch_size.t2i=-2": ["data.batch_size.t2i"],
    "optim.trainable=(1, 2)": ["optim.trainable", "strings"],
    "nope.x=1": ["nope"],
    "total_steps.x=1": ["total_steps"],
    "optim.nothing=1": ["optim.nothing"],
    "total_steps": ["key=value"],
}


@pytest.mark.parametrize("item", list(BAD_SETS))
def test_bad_sets_are_one_line_errors_before_any_work(item, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "Trainer", lambda *a, **k: pytest.fail("the trainer was built"))
    with pytest.raises(ValueError) as raised:
        loop.train_main("smoke", "synthetic", str(tmp_path / "w"), [item], progress=False)
    message = str(raised.value)
    assert "\n" not in message and all(part in message for part in BAD_SETS[item]), message
    assert not (tmp_path / "w").exists()


def test_sets_take_the_field_type_and_ranges_are_checked_together():
    cfg = loop.apply_overrides(loop.load_stage_config("smoke"), [
        "optim.lr=1", "checkpoint.async_save=false", "optim.trainable=mar,llm", "data.buckets.t2i=(32, 64)",
        "optim.ema_decay=None", "tokenizer=123"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.checkpoint.async_save is False
    assert cfg.optim.trainable == ("mar", "llm") and cfg.data.buckets.t2i == (32, 64)
    assert cfg.optim.ema_decay is None and cfg.tokenizer == "123"
    with pytest.raises(ValueError, match="no task to train"):
        loop.apply_overrides(loop.load_stage_config("smoke"),
                             ["data.batch_size.t2i=0", "data.batch_size.edit=0", "data.batch_size.und=0"])
    with pytest.raises(ValueError, match="steps='x'"):
        loop.load_stage_config("smoke:steps=x")
    for stage in ("pt", "align", "ct", "sft", "smoke"):
        loop.validate(loop.load_stage_config(stage))


def test_cli_reports_a_bad_set_on_one_line(tmp_path, capsys):
    code = cli.main(["train", "--config", "smoke", "--data", "synthetic", "--workdir", str(tmp_path / "w"),
                     "--set", "checkpoint.every=0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("unipic-jax: error:") and err.count("\n") == 1, err


def test_missing_data_folder_points_to_synthetic(tmp_path):
    for spec in (tmp_path / "nowhere", tmp_path):  # missing; present but without any task's JSONL
        with pytest.raises(data.DataError) as raised:
            data.parse_data_spec(str(spec))
        assert "--data synthetic" in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(data.DataError, match="no such file"):
        data.check_sources({"t2i": str(tmp_path / "t2i.jsonl")}, None)
    assert data.parse_data_spec("synthetic") == {t: "synthetic" for t in data.TASKS}


def test_synthetic_data_is_written_once_into_the_workdir(tmp_path, monkeypatch):
    cfg = loop.load_stage_config("smoke")
    sources = data.resolve_sources({"t2i": "synthetic", "und": "synthetic"}, tmp_path, cfg)
    assert sources == {"t2i": str(tmp_path / "data" / "t2i.jsonl"), "und": str(tmp_path / "data" / "und.jsonl")}
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temporary folder left behind
    monkeypatch.setattr(data, "write_synthetic", lambda *a, **k: pytest.fail("written again"))
    assert data.resolve_sources({"t2i": "synthetic"}, tmp_path, cfg)["t2i"] == sources["t2i"]
    (tmp_path / "other" / "data").mkdir(parents=True)
    (tmp_path / "other" / "data" / "mine.txt").write_text("user data")
    with pytest.raises(data.DataError, match="no synthetic dataset"):
        data.resolve_sources({"t2i": "synthetic"}, tmp_path / "other", cfg)


@pytest.fixture
def offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_tfds_dataset_not_prepared_fails_fast(tmp_path, offline, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    started = time.monotonic()
    with pytest.raises(data.DataError) as raised:
        data.open_source("tfds:mnist:train", str(tmp_path / "tfds"))
    message = str(raised.value)
    assert time.monotonic() - started < 20
    assert "\n" not in message and "not prepared" in message and str(tmp_path / "tfds") in message
    assert "download_and_prepare" in message
    with pytest.raises(data.DataError, match="tfds_data_dir"):
        data.open_source("tfds:mnist:train")  # never ~/tensorflow_datasets
    with pytest.raises(data.DataError) as raised:
        data.open_source("tfds:no_such_dataset_here", str(tmp_path))
    assert "\n" not in str(raised.value)

    # train_main checks before building anything; the default folder is <workdir>/tfds.
    monkeypatch.setattr(loop, "Trainer", lambda *a, **k: pytest.fail("the trainer was built"))
    with pytest.raises(data.DataError, match="not prepared") as raised:
        loop.train_main("smoke", "t2i=tfds:mnist", str(tmp_path / "w"),
                        ["data.batch_size.edit=0", "data.batch_size.und=0"], progress=False)
    assert str(tmp_path / "w" / "tfds") in str(raised.value)
