"""The Python API: load UniPic once, then generate, edit and describe images.

    from unipic_jax.api import UniPicPipeline

    pipe = UniPicPipeline.from_pretrained("checkpoints/unipic")      # made by `unipic-jax convert`
    image = pipe.generate("a red fox in the snow", seed=0)[0]         # PIL images
    edited = pipe.edit(image, "make it night", seed=0)                # a PIL image
    text = pipe.caption(image)                                        # a string

Every call follows the released scripts (reference-spec §8-§10): the chat template without a
system prompt and the guidance prompts of `unipic_jax.prompts`, centre crop for editing,
pad-to-square for captions, bicubic resizing, and the reference's bfloat16 rounding of the output
pixels (`images.to_uint8`). Prompts are padded to buckets of `PROMPT_BUCKET` tokens, so repeated
calls with the same size, steps, batch and cfg-on/off reuse the compiled programs.

Defaults are those of the released scripts: 1024 px, `num_iter` 32 (`text2image.py` and
`image_edit.py`; the paper's evaluation used 64), cfg 3.0 constant, temperature 1.0, greedy
captions of at most 1024 new tokens with the checkpoint's `generation_config.json` repetition
penalty (1.1 for the release). The scripts seed nothing; here `seed=None` draws a fresh seed,
which is recorded in each image's `info` so the image can be reproduced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

import unipic_jax
from unipic_jax import checkpoint, images, prompts
from unipic_jax.models.unipic import UniPic, UniPicConfig, param_shapes
from unipic_jax.sampling import caption as caption_lib
from unipic_jax.sampling import fast as fast_sampling
from unipic_jax.sampling import t2i

ImageInput = Union[Image.Image, str, os.PathLike]

PROMPT_BUCKET = 64      # prompt lengths are padded to a multiple of this (one program per bucket)
CAPTION_BUCKET = 128    # the same for image-to-text prompts
DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}
DEFAULT_SIZE = 1024
DEFAULT_STEPS = 32
DEFAULT_MAX_NEW_TOKENS = 1024
MAX_SEED = 2 ** 32 - 1  # jax.random.key folds larger seeds onto these (2**32 and 0 give one image)
MAX_BATCH = 64          # images per prompt in one call


def check_seed(seed) -> int:
    """`seed` as an int in [0, MAX_SEED], else ValueError (bools, floats and strings included)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    return int(seed)


def _finite(name: str, value, low: float, *, above: bool = False) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(x) or x < low or (above and x == low):
        raise ValueError(f"{name} must be a finite number {'>' if above else '>='} {low:g}, got {value!r}")
    return x


def _count(name: str, value, low: int = 1, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (
            high is not None and value > high):
        rule = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {rule}, got {value!r}")
    return int(value)


def _check_image_tokens(config: UniPicConfig, count: int, size: int, reserved: int = 0) -> None:
    context = config.qwen2.max_position_embeddings
    if count + reserved >= context:
        raise ValueError(f"size {size}px needs {count} image tokens, more than the model's context of "
                         f"{context} tokens holds with a prompt; use a smaller size")


def check_image_size(config: UniPicConfig, size: int) -> None:
    """Raise ValueError unless `size` is a positive multiple of 16 whose image tokens fit the context."""
    _count("size", size)
    images.check_size(size)
    _check_image_tokens(config, prompts.image_token_count(size, size, config.mar), size)


def check_sampling(config: UniPicConfig, *, size: int = DEFAULT_SIZE, steps: int = DEFAULT_STEPS,
                   cfg: float = 3.0, temperature: float = 1.0, batch: int = 1) -> None:
    """Raise ValueError (one line) for sampling settings the model cannot run, before any work:
    a size that is not a positive multiple of 16 or whose image tokens overflow the context, more
    MAR steps than image tokens, a guidance scale or temperature that is negative or not finite,
    a batch outside [1, MAX_BATCH]."""
    check_image_size(config, size)
    side = size // (config.mar.vae_stride * config.mar.patch_size)
    _count("steps", steps, 1, side * side)  # each MAR step predicts at least one of side*side tokens
    _finite("cfg (guidance scale)", cfg, 0.0)
    _finite("temperature", temperature, 0.0)
    _count("batch", batch, 1, MAX_BATCH)


def check_caption(config: UniPicConfig, *, size: Optional[int] = None, path: str = "mar",
                  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, sample: bool = False, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0) -> int:
    """Raise ValueError (one line) for caption settings the model cannot run, before any work;
    returns the image side the model will see."""
    if path not in caption_lib.PATHS:
        raise ValueError(f"path must be one of {', '.join(caption_lib.PATHS)}, got {path!r}")
    if path == "siglip":
        native = config.siglip.image_size
        if size not in (None, native):
            raise ValueError(f"the siglip path takes {native}px images, not {size}")
        size = native
    size = DEFAULT_SIZE if size is None else _count("size", size)
    images.check_size(size)
    max_new_tokens = _count("max_new_tokens", max_new_tokens)
    _check_image_tokens(config, caption_lib.image_token_count(config, (size, size), path), size, max_new_tokens)
    if sample:
        _finite("temperature", temperature, 0.0, above=True)
        _count("top_k", top_k, 0)
        if not 0.0 < _finite("top_p", top_p, 0.0, above=True) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    return size


def parse_dtype(dtype: str):
    """"float32"/"fp32" or "bfloat16"/"bf16" -> the jnp dtype (ValueError otherwise)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def new_seed() -> int:
    """A fresh random seed (what `seed=None` uses; it is recorded with the result)."""
    return random.SystemRandom().randrange(2 ** 31)


def _model_input_image(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return images.load_image(image)


class _StepBar:
    """Progress over MAR steps in two tqdm bars: "TASK: compiling" until the first step ends (the
    first call at a size compiles the sampler, cached afterwards), then "TASK" from step 1, so its
    rate and ETA are those of the steady steps. Plain tqdm create/update/close calls, which
    trackers such as Gradio's `track_tqdm` follow."""

    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm

        self._tqdm, self.total, self.desc, self.compiling = tqdm, total, desc, True
        self.bar = tqdm(total=total, desc=f"{desc}: compiling", unit="step", leave=False)

    def step(self) -> None:
        if self.compiling:
            self.compiling = False
            self.bar.close()
            self.bar = self._tqdm(total=self.total, initial=1, desc=self.desc, unit="step", leave=False)
        else:
            self.bar.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


def _progress(total: int, enabled: bool, desc: str):
    """A context manager giving a `_StepBar` over MAR steps, or None."""
    return _StepBar(total, desc) if enabled else contextlib.nullcontext()


def _step_hook(bar: Optional[_StepBar]) -> dict:
    """The sampler's `on_step` argument advancing `bar` as each MAR step finishes (none without a bar)."""
    if bar is None:
        return {}

    def on_step(index: int, tokens) -> None:
        jax.block_until_ready(tokens)  # dispatch is asynchronous: count finished steps
        bar.step()

    return {"on_step": on_step}


def peek_config(path: str | os.PathLike, config: ml_collections.ConfigDict | None = None) -> UniPicConfig:
    """The model config `from_pretrained(path, config=config)` would build, read without loading any
    weights (so that settings can be checked first): a checkpoint's or training workdir's stored
    config, else `config` or the released sizes. Raises ValueError for a damaged config."""
    from unipic_jax.train import runs

    folder = Path(path)
    if runs.is_run(folder):
        return UniPicConfig.from_config(runs.model_config(folder))
    if (folder / checkpoint.CONFIG_FILE).is_file() and not (folder / "pytorch_model.bin").exists():
        return UniPicConfig.from_config(checkpoint.read_config(folder))
    if config is None:
        from configs import unipic_1p5b

        config = unipic_1p5b.get_config()
    if (folder / "pytorch_model.bin").is_file():
        from convert.unipic import release_config

        config = release_config(folder, config)
    return UniPicConfig.from_config(config)


class UniPicPipeline:
    """UniPic-1 ready to sample: the linen model, its params, the tokenizer, and the task wrappers.

    Build it with `from_pretrained`. `model` is the `unipic_jax.models.unipic.UniPic` module,
    `params` its param tree, `tokenizer` a `prompts.Tokenizer` whose ids match the model config.
    """

    def __init__(self, model: UniPic, params, tokenizer: prompts.Tokenizer, *,
                 repetition_penalty: float = 1.0, source: str = ""):
        tokenizer.check_ids(dataclasses.asdict(model.config.tokens))
        self.model = model
        self.params = params
        self.tokenizer = tokenizer
        self.repetition_penalty = float(repetition_penalty)
        self.source = source

    @property
    def config(self) -> UniPicConfig:
        return self.model.config

    @property
    def context(self) -> int:
        """The LLM's context length (max_position_embeddings): prompt plus what is generated."""
        return self.config.qwen2.max_position_embeddings

    # ------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: str = "float32",
                        config: ml_collections.ConfigDict | None = None,
                        tokenizer: str | os.PathLike | None = None) -> "UniPicPipeline":
        """Load UniPic from `path`:

          * a checkpoint directory written by `unipic-jax convert` (config.json, params/,
            tokenizer/): the fast way;
          * a folder in the official release layout (pytorch_model.bin, kl16.ckpt,
            Qwen2.5-1.5B-Instruct/): converted in memory on every load (a warning suggests
            `unipic-jax convert`); `config` gives its sizes (default configs/unipic_1p5b.py);
          * a Hugging Face Hub id such as "Skywork/Skywork-UniPic-1.5B": downloaded (online only;
            offline it is a clear error) and converted as a release folder;
          * a training workdir of `unipic-jax train`: the EMA params of its newest intact step
            (`unipic-jax convert WORKDIR DIR` makes a checkpoint of them).

        `dtype` is "float32" (the parity setting) or "bfloat16": the reference's inference mode,
        bf16 weights (restored straight into bf16) and activations, the model keeping norm
        statistics and the diffusion state in float32. `tokenizer` overrides the tokenizer folder
        (a Qwen2.5 folder). Raises ValueError (`checkpoint.CheckpointError`, `ConversionError`)
        naming what is missing or damaged.
        """
        from unipic_jax import compile_cache
        from unipic_jax.train import runs

        compile_cache.enable()
        compute_dtype = parse_dtype(dtype)
        folder = Path(path)
        is_checkpoint = (folder / checkpoint.CONFIG_FILE).is_file() and not (folder / "pytorch_model.bin").exists()
        if runs.is_run(folder):
            stored, params, run_tokenizer, _ = runs.read_run(folder)
            params = _cast(params, compute_dtype)
            tokenizer_folder = tokenizer or run_tokenizer
        elif is_checkpoint:
            stored, params = checkpoint.load(
                folder, param_shapes=lambda c: _cast(param_shapes(UniPicConfig.from_config(c)), compute_dtype))
            tokenizer_folder = tokenizer or checkpoint.tokenizer_dir(folder)
        else:
            if folder.is_dir() and not (folder / "pytorch_model.bin").exists():
                raise checkpoint.CheckpointError(
                    f"{folder}: neither a unipic-jax checkpoint ({checkpoint.CONFIG_FILE} is missing) nor an "
                    f"official release folder (pytorch_model.bin is missing)")
            release = checkpoint.fetch_release(os.fspath(path))
            stored, params = cls._convert(release, config)
            params = _cast(params, compute_dtype)
            tokenizer_folder = tokenizer or checkpoint.find_tokenizer_dir(release)
        if tokenizer_folder is None:
            raise checkpoint.CheckpointError(f"{path}: holds no tokenizer; pass tokenizer= (the "
                                             f"Qwen2.5-1.5B-Instruct folder)")
        unipic_config = UniPicConfig.from_config(stored)
        tok = prompts.Tokenizer.from_folder(tokenizer_folder)
        return cls(UniPic(unipic_config, compute_dtype), params, tok,
                   repetition_penalty=_repetition_penalty(Path(tokenizer_folder)), source=os.fspath(path))

    @staticmethod
    def _convert(release: Path, config: ml_collections.ConfigDict | None):
        """(config, params) of a release folder; the LLM's and SigLIP2's sizes come from the
        release's own config.json files (`convert.unipic.release_config`)."""
        from convert.unipic import load_release_with_config

        if config is None:
            from configs import unipic_1p5b

            config = unipic_1p5b.get_config()
        warnings.warn(f"{release}: converting the official release in memory on every load; run "
                      f"`unipic-jax convert {release} DIR` once and load DIR instead", stacklevel=3)
        config, params = load_release_with_config(release, config)
        return config, jax.device_put(params, jax.devices()[0])

    # ------------------------------------------------------------------------------------------
    # Prompts

    def _batch(self, texts: Sequence[str], *, reserved: int, bucket: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokenise, check against the context and right-pad with EOS (as the reference pads)."""
        return prompts.batch_prompts([self.tokenizer.encode(t) for t in texts], self.tokenizer.eos_id,
                                     bucket, context=self.context, reserved=reserved)

    def _grid(self, size: int) -> tuple[tuple[int, int], int]:
        """(latent grid, `<image>` ids per image: grid tokens + buffer) at `size` pixels."""
        check_image_size(self.config, size)
        count = prompts.image_token_count(size, size, self.config.mar)
        side = size // (self.config.mar.vae_stride * self.config.mar.patch_size)
        return (side, side), count

    def _to_pil(self, images_bhwc, info: list[dict]) -> list[Image.Image]:
        pixels = images.to_uint8(np.asarray(images_bhwc, np.float32))
        out = []
        for array, meta in zip(pixels, info):
            img = Image.fromarray(array)
            img.info.update(meta)
            out.append(img)
        return out

    def _settings(self, task: str, **values) -> dict[str, Any]:
        return {"task": task, **values, "model": self.source, "dtype": jnp.dtype(self.model.dtype).name,
                "software": f"unipic-jax {unipic_jax.__version__}"}

    def _t2i_rows(self, texts: Sequence[str], *, size: int, batch: int, guided: bool):
        """(grid, ids, mask) of a text-to-image call: rows `[cond x B ; uncond x B]` (cond only
        without guidance), each prompt repeated `batch` times."""
        if not texts:
            raise ValueError("no prompt given")
        grid, image_tokens = self._grid(size)
        cond = [prompts.t2i_prompt(t) for t in texts for _ in range(batch)]
        rows = cond + [prompts.t2i_cfg_prompt()] * len(cond) if guided else cond
        return (grid,) + self._batch(rows, reserved=image_tokens, bucket=PROMPT_BUCKET)

    def check_prompt(self, prompt: str, *, size: int = DEFAULT_SIZE) -> None:
        """Raise ValueError if `generate(prompt, size=size)` would refuse the prompt (empty, or too
        long for the context once the image tokens are added), without sampling anything."""
        self._t2i_rows([prompt], size=size, batch=1, guided=False)

    # ------------------------------------------------------------------------------------------
    # Tasks

    def generate(self, prompt: str | Sequence[str], *, size: int = DEFAULT_SIZE, steps: int = DEFAULT_STEPS,
                 cfg: float = 3.0, cfg_schedule: str = "constant", temperature: float = 1.0,
                 seed: Optional[int] = None, batch: int = 1, progress: bool = True,
                 fast: bool = False) -> list[Image.Image]:
        """Text to image: `batch` images for each prompt, prompt-major (`scripts/text2image.py`).

        `size` (pixels, a multiple of 16) sets the latent grid `size/16`; `steps` the MAR
        iterations; `cfg` the guidance scale (1.0: no unconditional rows), `cfg_schedule`
        "constant" or "linear"; `seed` a `jax.random` seed (None: a fresh one). Each image's
        `info` holds the prompt, seed and settings (`save_png` writes them as PNG text).
        `fast=True` samples with the fast preset (`sampling/fast.py`: fewer MAR and diffusion
        steps, cached guidance; other images than the faithful default), also recorded in `info`
        (a `fast.FastSettings`, or its `as_dict()` from an image's `fast_settings`, gives another
        combination).
        """
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        check_sampling(self.config, size=size, steps=steps, cfg=cfg, temperature=temperature, batch=batch)
        seed = new_seed() if seed is None else check_seed(seed)
        grid, ids, mask = self._t2i_rows(texts, size=size, batch=batch, guided=cfg != 1.0)
        with _progress(steps, progress, "generate") as bar:
            out = t2i.text_to_image(self.model, self.params, ids, mask, prompt_bucket=PROMPT_BUCKET,
                                    image_shape=grid, num_iter=steps, cfg=cfg, cfg_schedule=cfg_schedule,
                                    temperature=temperature, key=jax.random.key(seed), fast=fast, **_step_hook(bar))
            result = np.asarray(out.images)
        settings = self._settings("text-to-image", seed=seed, size=size, steps=steps, cfg=cfg,
                                  cfg_schedule=cfg_schedule, temperature=temperature, batch=batch,
                                  **fast_sampling.describe(fast, steps))
        info = [{"prompt": texts[i // batch], **settings, "index": i % batch} for i in range(len(texts) * batch)]
        return self._to_pil(result, info)

    def edit(self, image: ImageInput, prompt: str, *, size: int = DEFAULT_SIZE, steps: int = DEFAULT_STEPS,
             cfg: float = 3.0, cfg_schedule: str = "constant", temperature: float = 1.0,
             seed: Optional[int] = None, progress: bool = True, fast: bool = False) -> Image.Image:
        """Edit `image` (a PIL image or a file) as `prompt` says (`scripts/image_edit.py`).

        The source is centre-cropped to a square and resized to `size` (a multiple of 16); the
        guidance prompt is "Repeat this image.". Other arguments as `generate`.
        """
        check_sampling(self.config, size=size, steps=steps, cfg=cfg, temperature=temperature)
        seed = new_seed() if seed is None else check_seed(seed)
        grid, image_tokens = self._grid(size)
        cond = prompts.edit_prompt(prompt, image_tokens)
        rows = [cond, prompts.edit_cfg_prompt(image_tokens)] if cfg != 1.0 else [cond]
        ids, mask = self._batch(rows, reserved=image_tokens, bucket=PROMPT_BUCKET)
        source = images.to_model_input(images.center_crop_square(_model_input_image(image)), size)
        with _progress(steps, progress, "edit") as bar:
            out = t2i.edit(self.model, self.params, source, ids, mask, num_iter=steps, cfg=cfg,
                           cfg_schedule=cfg_schedule, temperature=temperature, key=jax.random.key(seed),
                           prompt_bucket=PROMPT_BUCKET, fast=fast, **_step_hook(bar))
            result = np.asarray(out.images)
        settings = self._settings("edit", seed=seed, size=size, steps=steps, cfg=cfg, cfg_schedule=cfg_schedule,
                                  temperature=temperature, **fast_sampling.describe(fast, steps))
        return self._to_pil(result, [{"prompt": prompt, **settings}])[0]

    def caption(self, image: ImageInput, prompt: str = prompts.CAPTION_TEXT, *, size: Optional[int] = None,
                max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, path: str = "mar", sample: bool = False,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None,
                repetition_penalty: Optional[float] = None) -> str:
        """Answer `prompt` about `image` (`scripts/image2text.py`): the text, special tokens removed.

        The image is padded to a square with grey 127 and resized to `size`: default 1024 on the
        released "mar" path (VAE -> MAR encoder -> proj_in), the tower's own size on the "siglip"
        path (SigLIP2 -> siglip2_proj; weights present but never run by the released code).
        Greedy by default; `sample=True` samples with `temperature`, `top_k`, `top_p` from `seed`.
        `repetition_penalty` None uses the checkpoint's generation_config.json (1.1 for the
        release, as `image2text.py` effectively runs).
        """
        size = check_caption(self.config, size=size, path=path, max_new_tokens=max_new_tokens, sample=sample,
                             temperature=temperature, top_k=top_k, top_p=top_p)
        count = caption_lib.image_token_count(self.config, (size, size), path)
        ids, mask = self._batch([prompts.caption_prompt(count, prompt)], reserved=max_new_tokens,
                                bucket=CAPTION_BUCKET)
        bf16 = jnp.dtype(self.model.dtype) == jnp.bfloat16  # the script converts in the model's dtype
        pixels = images.to_model_input(images.expand_to_square(_model_input_image(image)), size, bf16_ops=bf16)
        rng = jax.random.key(new_seed() if seed is None else check_seed(seed)) if sample else None
        penalty = self.repetition_penalty if repetition_penalty is None else float(repetition_penalty)
        out = caption_lib.caption(self.model, self.params, pixels, ids, mask, path=path, max_new_tokens=max_new_tokens,
                                  repetition_penalty=penalty, rng=rng, temperature=temperature, top_k=top_k,
                                  top_p=top_p, bucket=CAPTION_BUCKET)
        length = int(np.asarray(out.lengths)[0])
        return self.tokenizer.decode(np.asarray(out.ids)[0, :length], skip_special_tokens=True)


def _cast(tree, dtype):
    """Floating leaves (arrays or ShapeDtypeStructs) in `dtype`; others as they are."""
    def cast(leaf):
        if not jnp.issubdtype(leaf.dtype, jnp.floating) or leaf.dtype == dtype:
            return leaf
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=leaf.sharding)
        return leaf.astype(dtype)

    return jax.tree.map(cast, tree)


def _repetition_penalty(tokenizer_folder: Path) -> float:
    """`repetition_penalty` of the tokenizer folder's generation_config.json (1.0 without one)."""
    file = tokenizer_folder / "generation_config.json"
    if not file.is_file():
        return 1.0
    try:
        return float(json.loads(file.read_text()).get("repetition_penalty", 1.0))
    except (ValueError, AttributeError):
        raise checkpoint.CheckpointError(f"{file}: not a valid generation config") from None


def save_images(imgs: Sequence[Image.Image], paths: Sequence[str | os.PathLike], *,
                overwrite: bool = False) -> list[Path]:
    """Write images (PNG, JPEG or WebP by suffix) carrying their `info` (prompt, seed, settings) as
    metadata. An existing file is a `FileExistsError` unless `overwrite`."""
    return [images.save_image(img, p, img.info, overwrite=overwrite) for img, p in zip(imgs, paths)]
