"""Prompt strings, the Qwen2.5 tokenizer with UniPic's `<image>` token, and prompt batching.

Every UniPic prompt is one user turn of the chat template without a system message
(reference-spec §5.3); `tokenizer.apply_chat_template` must not be used, since it would add
Qwen's default system prompt. The task wrappers follow the released scripts:

  text-to-image  "Generate an image: " + text          guidance prompt "Generate an image."  (§8.1)
  editing        "<image>"*N + "\\n" + text.strip()      guidance prompt "Repeat this image."  (§9)
  image-to-text  "<image>"*N + "\\n" + question          default "Describe the image in detail." (§10)

where N = (image tokens of the latent grid) + the MAR buffer (`image_token_count`). The
`<image>` placeholders are later replaced by image features, one per id.

`batch_prompts` right-pads token lists with the EOS id (as `prepare_text_conditions` does) to a
length rounded up to a bucket, so prompts of different lengths reuse one compiled program.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

INSTRUCTION = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
IMAGE_TOKEN = "<image>"
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

T2I_PREFIX = "Generate an image: "
T2I_CFG_TEXT = "Generate an image."
EDIT_CFG_TEXT = "Repeat this image."
CAPTION_TEXT = "Describe the image in detail."


def chat(user_text: str) -> str:
    """One user turn of the template, ending where the assistant's answer starts."""
    return INSTRUCTION.format(input=user_text)


def require_text(text: str, what: str) -> None:
    """Raise ValueError ("empty WHAT: give some text") unless `text` is a string with some text."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty {what}: give some text")


def t2i_prompt(text: str) -> str:
    """Text-to-image prompt as `scripts/text2image.py` builds it (no stripping, no period)."""
    require_text(text, "prompt")
    return chat(T2I_PREFIX + text)


def t2i_cfg_prompt() -> str:
    """The unconditional (guidance) prompt of text-to-image."""
    return chat(T2I_CFG_TEXT)


def t2i_negative_prompt(text: str) -> str:
    """A negative prompt in place of the guidance prompt: wrapped as the conditional prompt is
    ("Generate an image: " + text in the chat template), so guidance moves from `text` towards the
    prompt within the same task. Not in the released scripts (their guidance row is
    `t2i_cfg_prompt`)."""
    require_text(text, "negative prompt")
    return chat(T2I_PREFIX + text)


def image_token_count(height: int, width: int, mar_config) -> int:
    """`<image>` placeholders for a `height` x `width`-pixel image: latent tokens plus MAR buffer.

    `mar_config` is the config's `mar` section (vae_stride, patch_size, buffer_size); the
    released model at 1024 px gives 64*64 + 64 = 4160.
    """
    stride = mar_config.vae_stride * mar_config.patch_size
    if height % stride or width % stride:
        raise ValueError(f"image size {height}x{width} is not a multiple of {stride} pixels")
    return (height // stride) * (width // stride) + mar_config.buffer_size


def _with_image(num_image_tokens: int, text: str) -> str:
    if num_image_tokens < 1:
        raise ValueError(f"need at least one image token, got {num_image_tokens}")
    return chat(IMAGE_TOKEN * num_image_tokens + "\n" + text)


def edit_prompt(text: str, num_image_tokens: int) -> str:
    """Editing prompt as `scripts/image_edit.py` builds it: placeholders, newline, stripped text."""
    require_text(text, "edit instruction")
    return _with_image(num_image_tokens, text.strip())


def edit_cfg_prompt(num_image_tokens: int, text: str = EDIT_CFG_TEXT) -> str:
    """The unconditional (guidance) prompt of editing: the source image and "Repeat this image."."""
    require_text(text, "guidance prompt")
    return _with_image(num_image_tokens, text.strip())


def caption_prompt(num_image_tokens: int, question: str = CAPTION_TEXT) -> str:
    """Image-to-text prompt as `scripts/image2text.py` builds it (the question is not stripped)."""
    require_text(question, "question")
    return _with_image(num_image_tokens, question)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


class Tokenizer:
    """A Hugging Face Qwen2.5 tokenizer plus UniPic's `<image>` special token.

    `<image>` is added as the reference adds it (`add_tokens([...], special_tokens=True)`), so it
    gets the first free id: 151665 with the Qwen2.5 tokenizer. `eos_id` is `<|im_end|>` (151645),
    the id that ends a turn and pads prompt batches; `pad_id` is `<|endoftext|>` (151643).
    """

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        ids = {t: hf_tokenizer.convert_tokens_to_ids(t) for t in (IM_START, IM_END, ENDOFTEXT)}
        missing = [t for t, i in ids.items() if i is None or i == hf_tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"tokenizer lacks {', '.join(missing)}: not a Qwen2.5 chat tokenizer")
        self.hf.add_tokens([IMAGE_TOKEN], special_tokens=True)
        self.image_id = self.hf.convert_tokens_to_ids(IMAGE_TOKEN)
        self.eos_id, self.pad_id, self.im_start_id = ids[IM_END], ids[ENDOFTEXT], ids[IM_START]

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load the tokenizer files of a local folder (e.g. `checkpoint/Qwen2.5-1.5B-Instruct`)."""
        folder = Path(path)
        if not folder.is_dir():
            raise ValueError(f"{folder}: no such tokenizer folder")
        if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
            raise ValueError(f"{folder}: no tokenizer files (looked for {', '.join(_TOKENIZER_FILES)})")
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(os.fspath(folder), local_files_only=True)
            return cls(hf)
        except Exception as e:  # tokenizers and transformers raise many kinds for damaged files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{folder}: cannot load the tokenizer ({first[:200]})") from None

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special-token strings recognised, nothing prepended (no BOS).

        Qwen2.5 adds no BOS either way, so this equals the reference's
        `encode(text, add_special_tokens=True)`.
        """
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (the reference prints special tokens, e.g. a trailing `<|im_end|>`)."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def check_ids(self, tokens_config) -> None:
        """Raise if this tokenizer's ids disagree with the model config's `tokens` section."""
        got = {"image": self.image_id, "eos": self.eos_id, "pad": self.pad_id}
        bad = [f"{k} {got[k]} (config says {tokens_config[k]})" for k in got if got[k] != tokens_config[k]]
        if bad:
            raise ValueError("tokenizer does not match the model: ids " + ", ".join(bad))


def batch_prompts(id_lists: Sequence[Sequence[int]], pad_id: int, bucket: int = 128, *,
                  context: int | None = None, reserved: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token lists into `(ids (B, L) int32, mask (B, L) bool)`.

    L is the longest prompt rounded up to a multiple of `bucket` (capped at what fits), so
    different prompt lengths share a compiled program; `mask` marks the real tokens. Pad with the
    EOS id as the reference does (`Tokenizer.eos_id`). With `context` (the model's
    max_position_embeddings) a prompt may use at most `context - reserved` positions, `reserved`
    being what generation appends (image tokens plus buffer, or new text tokens).
    """
    if not id_lists:
        raise ValueError("no prompts to batch")
    if bucket < 1:
        raise ValueError(f"bucket must be >= 1, got {bucket}")
    lengths = [len(ids) for ids in id_lists]
    for i, n in enumerate(lengths):
        if n == 0:
            raise ValueError(f"prompt {i} is empty (0 tokens)")
    limit = None
    if context is not None:
        limit = context - reserved
        for i, n in enumerate(lengths):
            if n > limit:
                raise ValueError(f"prompt {i} has {n} tokens but at most {limit} fit "
                                 f"(context {context} minus {reserved} for generation)")
    length = -(-max(lengths) // bucket) * bucket
    if limit is not None:
        length = min(length, limit)
    ids = np.full((len(id_lists), length), pad_id, np.int32)
    mask = np.zeros((len(id_lists), length), bool)
    for row, (toks, n) in enumerate(zip(id_lists, lengths)):
        ids[row, :n] = np.asarray(toks, np.int32)
        mask[row, :n] = True
    return ids, mask


def write_byte_tokenizer(path: str | os.PathLike, *, vocab_size: int, eos_id: int, pad_id: int,
                         im_start_id: int | None = None) -> Path:
    """Write a stand-in Qwen-style tokenizer folder for tiny random-weight models (tests, smoke runs).

    Byte-level BPE without merges (one token per UTF-8 byte, ids 0..255, so any text round-trips),
    `<|im_end|>` at `eos_id`, `<|endoftext|>` at `pad_id`, `<|im_start|>` at `im_start_id`
    (default `eos_id - 1`) and unused fillers elsewhere, `vocab_size - 1` tokens in all: `<image>`
    then gets id `vocab_size - 1`, the last embedding row, as 151665 is for the real model.
    """
    from tokenizers import AddedToken, Tokenizer as RustTokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    im_start_id = eos_id - 1 if im_start_id is None else im_start_id
    specials = {im_start_id: IM_START, eos_id: IM_END, pad_id: ENDOFTEXT}
    size = vocab_size - 1
    if len(specials) != 3 or min(specials) < 256 or max(specials) >= size:
        raise ValueError(f"special ids {sorted(specials)} must be distinct and in [256, {size})")
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab.update({specials.get(i, f"<|unused_{i}|>"): i for i in range(256, size)})
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=[]))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    rust.decoder = decoders.ByteLevel()
    rust.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials.values()])
    fast = PreTrainedTokenizerFast(tokenizer_object=rust, eos_token=IM_END, pad_token=ENDOFTEXT)
    fast.save_pretrained(os.fspath(path))
    return Path(path)
