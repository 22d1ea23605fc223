"""The key-mapping machinery itself, on a toy table (component tables are tested beside their models)."""

import numpy as np
import pytest

from convert import ConversionError, KeyMap, Rule, flax_to_torch, load_state_dict, save_state_dict, torch_to_flax
from convert.io import CheckpointFileError
import ml_dtypes

KEYMAP = KeyMap(
    [
        Rule("blocks.{i}.fc.weight", "blocks_{i}/fc/kernel", "linear"),
        Rule("blocks.{i}.fc.bias", "blocks_{i}/fc/bias"),
        Rule("conv.weight", "conv/kernel", "conv"),
        Rule("emb.weight", "emb/embedding"),
    ],
    tied={"head.weight": "emb.weight"},
)


def _state_dict(rng):
    return {
        "blocks.0.fc.weight": rng.standard_normal((3, 2)).astype(np.float32),
        "blocks.0.fc.bias": rng.standard_normal((3,)).astype(np.float32),
        "blocks.1.fc.weight": rng.standard_normal((3, 2)).astype(np.float32),
        "blocks.1.fc.bias": rng.standard_normal((3,)).astype(np.float32),
        "conv.weight": rng.standard_normal((4, 3, 3, 1)).astype(np.float32),
        "emb.weight": rng.standard_normal((5, 2)).astype(np.float32),
    }



def test_layouts_and_round_trip():
    sd = _state_dict(np.random.default_rng(0))
    sd["head.weight"] = sd["emb.weight"]
    params = torch_to_flax(sd, KEYMAP)
    np.testing.assert_array_equal(params["blocks_1"]["fc"]["kernel"], sd["blocks.1.fc.weight"].T)
    assert params["conv"]["kernel"].shape == (3, 1, 3, 4)  # OIHW -> HWIO
    back = flax_to_torch(params, KEYMAP)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype
        np.testing.assert_array_equal(back[k], sd[k])


def test_all_problems_reported_at_once():
    sd = _state_dict(np.random.default_rng(0))
    target = torch_to_flax(sd, KEYMAP)
    bad = dict(sd)
    del bad["blocks.0.fc.bias"]                              # removed
    bad["blocks.1.fc.gain"] = bad.pop("blocks.1.fc.bias")    # renamed
    bad["emb.weight"] = bad["emb.weight"].reshape(2, 5)      # reshaped
    with pytest.raises(ConversionError) as e:
        torch_to_flax(bad, KEYMAP, target)
    msg = str(e.value)
    assert "'blocks_0/fc/bias'" in msg and "blocks.0.fc.bias" in msg
    assert "unmapped source key 'blocks.1.fc.gain'" in msg
    assert "shape mismatch for 'emb.weight'" in msg
    assert len(e.value.problems) == 4  # + the renamed key's now-missing target blocks_1/fc/bias


def _blocks(n, width, prefix="blocks"):
    return {f"{prefix}.{i}.fc.{name}": np.zeros(shape, np.float32)
            for i in range(n) for name, shape in (("weight", (width, 2)), ("bias", (width,)))}


def test_many_problems_make_one_line_with_their_likely_cause():
    target = torch_to_flax(_blocks(20, 3), KEYMAP)
    with pytest.raises(ConversionError) as e:
        torch_to_flax(_blocks(30, 4), KEYMAP, target)  # wider and deeper: sizes of another model
    msg = str(e.value)
    assert len(e.value.problems) == 60 and "\n" not in msg
    assert msg.startswith("60 problem(s) converting the checkpoint [shapes differ: the checkpoint was made for "
                          "other model sizes")
    assert msg.count("shape mismatch") == 5 and msg.endswith("; ... and 55 more")
    assert "blocks_29/fc/kernel" in "".join(e.value.problems)  # the full list is kept

    with pytest.raises(ConversionError) as e:
        torch_to_flax(_blocks(20, 3, prefix="model.blocks"), KEYMAP, target)  # another prefix
    assert "[keys no rule maps: the checkpoint is of another model, or its keys carry another prefix]" in str(e.value)
    assert "\n" not in str(e.value) and len(e.value.problems) == 80


def test_few_problems_are_all_shown_without_a_guess():
    target = torch_to_flax(_blocks(2, 3), KEYMAP)
    bad = _blocks(2, 3)
    bad["blocks.0.fc.bias"] = np.zeros(4, np.float32)
    with pytest.raises(ConversionError) as e:
        torch_to_flax(bad, KEYMAP, target)
    assert str(e.value) == ("1 problem(s) converting the checkpoint: shape mismatch for 'blocks.0.fc.bias' -> "
                            "'blocks_0/fc/bias': checkpoint gives (4,), model wants (3,)")


def test_tied_key_must_match():
    sd = _state_dict(np.random.default_rng(0))
    sd["head.weight"] = sd["emb.weight"] + 1
    with pytest.raises(ConversionError, match="tied key 'head.weight' differs"):
        torch_to_flax(sd, KEYMAP)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_io_round_trip_keeps_bf16(tmp_path, suffix):
    sd = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
          "b": np.linspace(-1, 1, 7).astype(ml_dtypes.bfloat16),
          "c": np.arange(4, dtype=np.int64)}
    path = tmp_path / f"w{suffix}"
    save_state_dict(sd, path)
    got = load_state_dict(path)
    assert set(got) == set(sd)
    for k in sd:
        assert got[k].dtype == sd[k].dtype
        np.testing.assert_array_equal(got[k], sd[k])
    assert not list(tmp_path.glob(".*partial"))


def test_truncated_and_missing_files(tmp_path):
    sd = {"a": np.zeros((64, 64), np.float32)}
    for suffix in (".safetensors", ".bin"):
        path = tmp_path / f"w{suffix}"
        save_state_dict(sd, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointFileError, match=str(path)):
            load_state_dict(path)
    with pytest.raises(CheckpointFileError, match="no such checkpoint file"):
        load_state_dict(tmp_path / "absent.bin")


def test_kl16_model_entry(tmp_path):
    import torch

    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "kl16.ckpt")
    got = load_state_dict(tmp_path / "kl16.ckpt")
    assert list(got) == ["w"]
