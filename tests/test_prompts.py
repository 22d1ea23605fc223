"""Prompt strings, the tokenizer wrapper and prompt batching.

The template strings are compared character for character with the reference's (spec §5.3, §8.1,
§9, §10); token ids exactly. No download: the tokenizer is a byte-level stand-in written by
`write_byte_tokenizer` with the special ids of the tiny UniPic fixture, so `<image>` lands on the
fixture model's image id as 151665 does on the real one.
"""

import numpy as np
import pytest
from conftest import FIXTURE_ROOT

from configs.fixture import get_config, read_meta
from unipic_jax import prompts
from unipic_jax.prompts import Tokenizer, batch_prompts

META = read_meta(FIXTURE_ROOT / "unipic")
IDS = META["config"]["special_ids"]
CONFIG = get_config(FIXTURE_ROOT / "unipic")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = prompts.write_byte_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=CONFIG.qwen2.vocab_size,
                                          eos_id=IDS["eos"], pad_id=IDS["pad"])
    return Tokenizer.from_folder(folder)


def test_template_is_the_reference_one():
    assert prompts.INSTRUCTION == META["config"]["prompt_template"]["INSTRUCTION"]
    assert prompts.chat("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_t2i_prompts_exact():
    # scripts/text2image.py: prefix added, text neither stripped nor given a period.
    assert prompts.t2i_prompt(" a red fox ") == (
        "<|im_start|>user\nGenerate an image:  a red fox <|im_end|>\n<|im_start|>assistant\n")
    assert prompts.t2i_cfg_prompt() == "<|im_start|>user\nGenerate an image.<|im_end|>\n<|im_start|>assistant\n"


def test_edit_prompts_exact():
    assert prompts.edit_prompt("  make it red \n", 3) == (
        "<|im_start|>user\n<image><image><image>\nmake it red<|im_end|>\n<|im_start|>assistant\n")
    assert prompts.edit_cfg_prompt(2) == (
        "<|im_start|>user\n<image><image>\nRepeat this image.<|im_end|>\n<|im_start|>assistant\n")


def test_caption_prompt_exact():
    assert prompts.caption_prompt(2) == (
        "<|im_start|>user\n<image><image>\nDescribe the image in detail.<|im_end|>\n<|im_start|>assistant\n")
    # The question is not stripped (image2text.py).
    assert prompts.caption_prompt(1, " What? ") == (
        "<|im_start|>user\n<image>\n What? <|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("make", [prompts.t2i_prompt, lambda t: prompts.edit_prompt(t, 4),
                                  lambda t: prompts.caption_prompt(4, t)])
@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_prompt_is_an_error(make, text):
    with pytest.raises(ValueError, match="empty"):
        make(text)


def test_image_token_count_matches_the_fixture():
    # The edit case's prompt holds image_length placeholders for its grid (m*n + buffer).
    case = META["cases"]["edit"]
    m, n = case["kwargs"]["image_shape"]
    stride = CONFIG.mar.vae_stride * CONFIG.mar.patch_size
    assert prompts.image_token_count(m * stride, n * stride, CONFIG.mar) == case["image_length"]
    with pytest.raises(ValueError, match="multiple of"):
        prompts.image_token_count(m * stride + 1, n * stride, CONFIG.mar)


def test_tokenizer_special_ids(tokenizer):
    assert tokenizer.image_id == IDS["image"]
    assert (tokenizer.eos_id, tokenizer.pad_id) == (IDS["eos"], IDS["pad"])
    assert len(tokenizer) == CONFIG.qwen2.vocab_size
    tokenizer.check_ids(CONFIG.tokens)
    assert tokenizer.encode("<image>") == [IDS["image"]]


def test_tokenizer_ids_checked_against_the_config(tokenizer):
    tokens = CONFIG.tokens.copy_and_resolve_references()
    tokens.image = IDS["image"] - 1
    with pytest.raises(ValueError, match="image"):
        tokenizer.check_ids(tokens)


def test_encode_adds_no_bos_and_round_trips(tokenizer):
    text = prompts.t2i_prompt("héllo")
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.im_start_id  # nothing before <|im_start|>
    assert ids[-1] == tokenizer.encode("\n")[0]
    assert ids.count(tokenizer.eos_id) == 1
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode("ab") == tokenizer.encode("a") + tokenizer.encode("b")


def test_edit_prompt_tokens(tokenizer):
    n = 7
    ids = tokenizer.encode(prompts.edit_prompt("go", n))
    head = tokenizer.encode("<|im_start|>user\n")
    assert ids[:len(head)] == head
    assert ids[len(head):len(head) + n] == [tokenizer.image_id] * n
    assert ids.count(tokenizer.image_id) == n
    assert ids[len(head) + n] == tokenizer.encode("\n")[0]


def test_from_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no such tokenizer folder"):
        Tokenizer.from_folder(tmp_path / "absent")
    with pytest.raises(ValueError, match="no tokenizer files"):
        Tokenizer.from_folder(tmp_path)


def test_tokenizer_without_chat_tokens_is_rejected(tmp_path):
    from tokenizers import Tokenizer as RustTokenizer, models
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(tokenizer_object=RustTokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]")),
                                    unk_token="[UNK]")
    with pytest.raises(ValueError, match="not a Qwen2.5 chat tokenizer"):
        Tokenizer(plain)


def test_batch_prompts_right_pads_to_a_bucket():
    ids, mask = batch_prompts([[5, 6, 7], [8]], pad_id=IDS["eos"], bucket=4)
    assert ids.dtype == np.int32 and mask.dtype == bool
    np.testing.assert_array_equal(ids, [[5, 6, 7, IDS["eos"]], [8, IDS["eos"], IDS["eos"], IDS["eos"]]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 0, 0, 0]])
    # Lengths within one bucket share a shape; one token more opens the next bucket.
    assert batch_prompts([[1] * 4], 0, bucket=4)[0].shape == (1, 4)
    assert batch_prompts([[1] * 5], 0, bucket=4)[0].shape == (1, 8)


def test_batch_prompts_reproduces_the_fixture_batch():
    # The t2i fixture's prompts: right padded with the EOS id, mask from the valid lengths.
    from safetensors.numpy import load_file

    case = load_file(FIXTURE_ROOT / "unipic" / "t2i.safetensors")
    lengths = META["cases"]["t2i"]["valid_lengths"]
    rows = [row[:n].tolist() for row, n in zip(case["input_ids"], lengths)]
    ids, mask = batch_prompts(rows, IDS["eos"], bucket=1)
    np.testing.assert_array_equal(ids, case["input_ids"])
    np.testing.assert_array_equal(mask, case["attention_mask"].astype(bool))


def test_batch_prompts_context_limit():
    with pytest.raises(ValueError, match=r"prompt 1 has 9 tokens but at most 8 fit \(context 10 minus 2"):
        batch_prompts([[1] * 3, [1] * 9], 0, bucket=4, context=10, reserved=2)
    # The bucket never pushes the length past what fits.
    assert batch_prompts([[1] * 7], 0, bucket=4, context=10, reserved=2)[0].shape == (1, 8)
    assert batch_prompts([[1] * 5], 0, bucket=16, context=10, reserved=2)[0].shape == (1, 8)


def test_batch_prompts_rejects_empty():
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        batch_prompts([[1], []], 0)
    with pytest.raises(ValueError, match="no prompts"):
        batch_prompts([], 0)
