"""Static MAR step counts: they must equal the reference's, exactly (they are integers)."""

import json

import pytest

from unipic_jax.sampling.schedule import cfg_scales, mask_schedule

from conftest import FIXTURE_ROOT


@pytest.mark.parametrize("case", ["t2i", "t2i_resized", "edit"])
def test_counts_match_fixture(case):
    meta = json.loads((FIXTURE_ROOT / "unipic" / "meta.json").read_text())["cases"][case]
    m, n = meta["kwargs"]["image_shape"]
    steps = mask_schedule(m * n, meta["kwargs"]["num_iter"])
    want = meta["tokens_predicted_per_step"]
    assert [(s.masked, s.predicted) for s in steps] == [(w["masked_at_start"], w["predicted"]) for w in want]


def test_counts_at_full_size():
    # Spec §8.3 lists the 64x64 counts for 32 and 64 iterations (reference run).
    p32 = [5, 15, 25, 34, 44, 54, 63, 72, 82, 90, 99, 108, 116, 123, 132, 138, 146, 152,
           159, 164, 170, 175, 179, 184, 188, 190, 194, 196, 198, 200, 201, 200]
    assert [s.predicted for s in mask_schedule(4096, 32)] == p32
    steps = mask_schedule(4096, 64)
    assert sum(s.predicted for s in steps) == 4096
    assert [s.visible for s in steps[:6]] == [0, 2, 5, 12, 20, 31]


def test_every_token_predicted_once_even_when_steps_exceed_tokens():
    steps = mask_schedule(6, 10)
    assert sum(s.predicted for s in steps) == 6
    assert all(s.predicted >= 0 for s in steps)
    assert steps[-1].mask_len == 0


def test_cfg_schedules():
    steps = mask_schedule(16, 4)
    assert cfg_scales(3.0, "constant", steps, 16) == [3.0] * 4
    lin = cfg_scales(3.0, "linear", steps, 16)
    assert lin[0] == pytest.approx(1 + 2 * (16 - 14) / 16)
    assert lin[-1] == pytest.approx(1 + 2 * 15 / 16)
    with pytest.raises(ValueError, match="cfg_schedule"):
        cfg_scales(3.0, "cosine", steps, 16)
