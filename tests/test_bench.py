"""bench/sample.py: a smoke run on a tiny config file in the CPU-bench format (the fixture model's
sizes), checking its report and the last-line format scripts parse. Timings are not asserted."""

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import FIXTURE_ROOT

from configs.fixture import get_config, read_meta

ROOT = Path(__file__).resolve().parents[1]
UNIPIC = FIXTURE_ROOT / "unipic"
sys.path.insert(0, str(ROOT / "bench"))

import sample  # noqa: E402  (bench/sample.py)


def tiny_bench_doc() -> dict:
    """A CPU-bench JSON (shared/bench/cpu_bench.json's layout) with the fixture model's sizes."""
    ref = read_meta(UNIPIC)["config"]
    ids = ref["special_ids"]
    size = ref["mar"]["img_size"]
    return {
        "name": "tiny", "image": {"height": size, "width": size},
        "vae": {**ref["vae"], "vae_scale": ref["vae_scale"]},
        "mar": ref["mar"],
        "llm": {"config": {**ref["llm"], "bos_token_id": ids["bos"]}},
        "siglip2": {"build": False, "tiny_config": ref["siglip"]},
        "tokens": {"image_token_id": ids["image"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]},
        "sampling": {"batch_images": 1, "prompt_len": 6, "uncond_prompt_len": 3, "prompt_seed": 1, "num_iter": 2,
                     "cfg": 3.0, "cfg_schedule": "constant", "temperature": 1.0, "sample_seed": 0},
    }


def test_bench_config_builds_the_described_model():
    config = sample.bench_model_config(tiny_bench_doc())
    fixture = get_config(UNIPIC)
    for section in ("vae", "mar", "diffusion", "qwen2", "siglip", "tokens"):
        assert config[section].to_dict() == fixture[section].to_dict(), section
    assert config.vae_scale == fixture.vae_scale


def test_bench_prompts_follow_the_sampling_section():
    doc = tiny_bench_doc()
    tokens = sample.bench_model_config(doc).tokens
    ids, mask = sample.bench_prompts({**sample.DEFAULT_SAMPLING, **doc["sampling"]}, tokens, tokens.pad)
    assert ids.shape == (2, 6) and mask.sum(axis=1).tolist() == [6, 3]
    assert (ids[~mask] == tokens.eos).all() and (ids[mask] < tokens.pad).all()


def test_smoke_run(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_bench_doc()))
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "sample.py"), "--config", str(config),
                             "--threads", "1", "--repeats", "2", "--json", str(tmp_path / "out.json")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"seconds_per_image=\d+\.\d{3}", lines[-1]), lines[-1]
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["cpus"] == 1 and report["steps"] == 2 and len(report["repeats_s"]) == 2
    assert report["recompiled_in_repeats"] == 0 and report["programs_compiled"] >= report["sampler_traces"] > 0
    assert report["image_finite"] and report["peak_rss_bytes"] > 0


def test_bad_arguments_fail_cleanly(capsys):
    assert sample.main(["--config", "unipic_1p5b"]) == 2
    assert "--random-weights" in capsys.readouterr().err
