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
import queue
import random
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

import unipic_jax
from unipic_jax import checkpoint, images, prompts, quant
from unipic_jax.models.unipic import UniPic, UniPicConfig, param_shapes
from unipic_jax.pipeline.output import ImagePipelineOutput, PipelineImage
from unipic_jax.sampling import caption as caption_lib
from unipic_jax.sampling import fast as fast_sampling
from unipic_jax.sampling import t2i
from unipic_jax.sampling.schedule import mask_schedule

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


def _check_image_tokens(config: UniPicConfig, count: int, size, reserved: int = 0) -> None:
    context = config.qwen2.max_position_embeddings
    if count + reserved >= context:
        raise ValueError(f"size {size}px needs {count} image tokens, more than the model's context of "
                         f"{context} tokens holds with a prompt; use a smaller size")


def check_image_size(config: UniPicConfig, size: int, width: Optional[int] = None) -> None:
    """Raise ValueError unless `size` is a positive multiple of 16 whose image tokens fit the context.
    With `width`, `size` is the height and the two sides are checked independently."""
    if width is None:
        _count("size", size)
        images.check_size(size)
        _check_image_tokens(config, prompts.image_token_count(size, size, config.mar), size)
        return
    _count("height", size)
    _count("width", width)
    images.check_size(size, "height")
    images.check_size(width, "width")
    _check_image_tokens(config, prompts.image_token_count(size, width, config.mar), f"{size}x{width}")


def check_sampling(config: UniPicConfig, *, size: int = DEFAULT_SIZE, steps: int = DEFAULT_STEPS,
                   cfg: float = 3.0, temperature: float = 1.0, batch: int = 1, height: Optional[int] = None,
                   width: Optional[int] = None, cfg_schedule: str = "constant", negative_prompt: bool = False,
                   callback: Optional[Callable] = None) -> None:
    """Raise ValueError (one line) for sampling settings the model cannot run, before any work:
    a size that is not a positive multiple of 16 or whose image tokens overflow the context, more
    MAR steps than image tokens, a guidance scale or temperature that is negative or not finite,
    a batch outside [1, MAX_BATCH], an unknown guidance schedule, a negative prompt without
    guidance (`negative_prompt`: one was given; it replaces the unguided rows, which cfg = 1
    drops), a step callback that is not callable. `height` / `width` (each defaulting to `size`)
    give a non-square image."""
    height, width = size if height is None else height, size if width is None else width
    check_image_size(config, height, None if height == width else width)  # square: the `size` wording
    stride = config.mar.vae_stride * config.mar.patch_size
    _count("steps", steps, 1, (height // stride) * (width // stride))  # each MAR step predicts >= 1 token
    _finite("cfg (guidance scale)", cfg, 0.0)
    _finite("temperature", temperature, 0.0)
    _count("batch", batch, 1, MAX_BATCH)
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"guidance schedule must be one of {', '.join(CFG_SCHEDULES)}, got {cfg_schedule!r}")
    if negative_prompt and cfg == 1.0:
        raise ValueError("negative_prompt needs guidance (a guidance scale other than 1): it replaces the "
                         "unguided rows")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback_on_step_end must be callable, got {callback!r:.60}")


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
    `quantize` names the weight-only quantization of `params` (None: none).
    """

    quantize: Optional[str] = None

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
                        tokenizer: str | os.PathLike | None = None,
                        quantize: Optional[str] = None) -> "UniPicPipeline":
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
        (a Qwen2.5 folder). `quantize` "int8" or "int4" quantizes the weights of the LLM's, MAR's
        and SigLIP2's blocks and the LLM's token table once, here (weight-only,
        `unipic_jax.quant`); None (the default) keeps the faithful path. Raises ValueError
        (`checkpoint.CheckpointError`, `ConversionError`) naming what is missing or damaged.
        """
        from unipic_jax import compile_cache
        from unipic_jax.train import runs

        compile_cache.enable()
        compute_dtype = parse_dtype(dtype)
        quant.check_quantize(quantize)
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
        pipe = cls(UniPic(unipic_config, compute_dtype), quant.quantize_params(params, quantize), tok,
                   repetition_penalty=_repetition_penalty(Path(tokenizer_folder)), source=os.fspath(path))
        pipe.quantize = quantize
        return pipe

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

    def _grid(self, size: int, width: Optional[int] = None) -> tuple[tuple[int, int], int]:
        """(latent grid, `<image>` ids per image: grid tokens + buffer) at `size` pixels square, or
        at `size` x `width` pixels (height x width)."""
        width = size if width is None else width
        check_image_size(self.config, size, None if width == size else width)
        count = prompts.image_token_count(size, width, self.config.mar)
        stride = self.config.mar.vae_stride * self.config.mar.patch_size
        return (size // stride, width // stride), count

    def _to_pil(self, images_bhwc, info: list[dict]) -> list[PipelineImage]:
        """uint8 pictures (the reference's rounding) as `PipelineImage`s carrying `info`."""
        pixels = images.to_uint8(np.asarray(images_bhwc, np.float32))
        return [PipelineImage.wrap(Image.fromarray(array), meta) for array, meta in zip(pixels, info)]

    def _settings(self, task: str, **values) -> dict[str, Any]:
        if self.quantize is not None:
            values = {**values, "quantize": self.quantize}
        return {"task": task, **values, "model": self.source, "dtype": jnp.dtype(self.model.dtype).name,
                "software": f"unipic-jax {unipic_jax.__version__}"}

    def _t2i_rows(self, texts: Sequence[str], *, size: int, batch: int, guided: bool, width: Optional[int] = None,
                  negative: Optional[Sequence[str]] = None):
        """(grid, ids, mask) of a text-to-image call: rows `[cond x B ; uncond x B]` (cond only
        without guidance), each prompt repeated `batch` times. The uncond rows hold the guidance
        prompt, or prompt i's `negative[i]` (`prompts.t2i_negative_prompt`)."""
        if not texts:
            raise ValueError("no prompt given")
        grid, image_tokens = self._grid(size, width)
        cond = [prompts.t2i_prompt(t) for t in texts for _ in range(batch)]
        if negative is None:
            uncond = [prompts.t2i_cfg_prompt()] * len(cond)
        else:
            uncond = [prompts.t2i_negative_prompt(negative[i // batch]) for i in range(len(cond))]
        rows = cond + uncond if guided else cond
        return (grid,) + self._batch(rows, reserved=image_tokens, bucket=PROMPT_BUCKET)

    def check_prompt(self, prompt: str, *, size: int = DEFAULT_SIZE, width: Optional[int] = None) -> None:
        """Raise ValueError if `generate(prompt, size=size)` (or `pipe(prompt, height=size,
        width=width)`) would refuse the prompt (empty, or too long for the context once the image
        tokens are added), without sampling anything."""
        self._t2i_rows([prompt], size=size, width=width, batch=1, guided=False)

    # ------------------------------------------------------------------------------------------
    # Tasks

    def __call__(self, prompt: str | Sequence[str], *, height: Optional[int] = None, width: Optional[int] = None,
                 num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = 3.0,
                 negative_prompt: str | Sequence[str] | None = None, num_images_per_prompt: int = 1,
                 seed: int | Sequence[int] | None = None, generator=None, guidance_schedule: str = "constant",
                 temperature: float = 1.0, callback_on_step_end: Optional[Callable] = None,
                 progress: bool = True, fast: bool = False) -> ImagePipelineOutput:
        """Text to image, as a Hugging Face pipeline is called: `pipe("a fox", height=768, width=1344)`.

        `prompt` a string or a list of strings: the whole list runs as one batch (one set of
        compiled programs per (height, width, steps, rows, prompt bucket)), `num_images_per_prompt`
        images per prompt, prompt-major. `height` and `width` (default 1024) are any multiples of
        16, independently: the latent grid is (height/16, width/16), the MAR position tables are
        resized to it bilinearly as PyTorch would. `num_inference_steps` MAR steps (32, as the
        released script), `guidance_scale` (3.0; 1.0 runs no unconditional rows) with
        `guidance_schedule` "constant" or "linear", `temperature` of the diffusion noise.

        `negative_prompt` (a string, or one per prompt) replaces the guidance prompt "Generate an
        image." of the unconditional rows by "Generate an image: <negative>" in the same chat
        template (`prompts.t2i_negative_prompt`); None keeps the released scripts' row.

        Randomness: `seed` an int seeds the whole call from `jax.random.key(seed)` (as `generate`
        always has); the images of a one-prompt call are then reproduced by the seed alone, those
        of a longer list by the same call. `seed` a list gives one seed per prompt: prompt i's
        images are those of a call with that prompt alone and `seed[i]`: its draws are exactly
        that call's (`t2i.draws_per_key`), and the numbers agree to the sampling bound (another
        batch shape runs another program), at most one uint8 level apart. `generator` a
        `jax.random` key, or one per prompt, instead of seeds (recorded seed None). None draws a fresh seed.

        `callback_on_step_end(pipe, step_index, timestep, callback_kwargs)` is called after each MAR
        step (diffusers' convention): `step_index` 0..steps-1, `timestep` the image tokens still
        unknown after the step (0 after the last), `callback_kwargs` {"tokens": the (rows, h*w/256,
        C) tokens, guidance rows after the conditional ones}. Its return value (a dict or None) is
        not used: a callback can neither change the tokens nor stop the loop early.

        Returns `ImagePipelineOutput`: `.images` (`PipelineImage`s whose `info` and `settings` hold
        the prompt, seed and settings, written as metadata by their `save()`) and `.seeds` (each
        image's seed). `fast=True`: the fast sampler (`sampling/fast.py`), as in `generate`.
        Bad settings raise a one-line ValueError before any work.
        """
        texts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r:.60}")
        count = _count("num_images_per_prompt", num_images_per_prompt, 1, MAX_BATCH)
        height = DEFAULT_SIZE if height is None else height
        width = DEFAULT_SIZE if width is None else width
        negatives = _per_prompt("negative_prompt", negative_prompt, len(texts))
        check_sampling(self.config, height=height, width=width, steps=num_inference_steps, cfg=guidance_scale,
                       temperature=temperature, batch=count, cfg_schedule=guidance_schedule,
                       negative_prompt=negatives is not None, callback=callback_on_step_end)
        guided = guidance_scale != 1.0
        key, seeds = _keys(seed, generator, len(texts))
        grid, ids, mask = self._t2i_rows(texts, size=height, width=width, batch=count, guided=guided,
                                         negative=negatives)
        with _progress(num_inference_steps, progress, "generate") as bar:
            out = t2i.text_to_image(self.model, self.params, ids, mask, prompt_bucket=PROMPT_BUCKET,
                                    image_shape=grid, num_iter=num_inference_steps, cfg=guidance_scale,
                                    cfg_schedule=guidance_schedule, temperature=temperature, key=key, fast=fast,
                                    **self._step_hooks(bar, callback_on_step_end, grid, num_inference_steps, fast))
            result = np.asarray(out.images)
        shape = dict(size=height) if height == width else {}
        info = []
        for i in range(len(texts) * count):
            settings = self._settings("text-to-image", seed=seeds[i // count], **shape, height=height, width=width,
                                      steps=num_inference_steps, cfg=guidance_scale, cfg_schedule=guidance_schedule,
                                      temperature=temperature, batch=count,
                                      **fast_sampling.describe(fast, num_inference_steps))
            negative = {} if negatives is None else {"negative_prompt": negatives[i // count]}
            info.append({"prompt": texts[i // count], **negative, **settings, "index": i % count})
        return ImagePipelineOutput(images=self._to_pil(result, info), seeds=[seeds[i // count] for i in range(len(info))])

    def _step_hooks(self, bar: Optional[_StepBar], callback: Optional[Callable], grid: tuple[int, int], steps: int,
                    fast) -> dict:
        """The sampler's `on_step` argument: advance the progress bar, call `callback_on_step_end`."""
        if callback is None:
            return _step_hook(bar)
        settings = fast_sampling.resolve(fast)
        run = steps if settings is None else settings.num_iter(steps)
        remaining = [s.mask_len for s in mask_schedule(grid[0] * grid[1], run)]
        progress = _step_hook(bar).get("on_step")

        def on_step(index: int, tokens) -> None:
            if progress is not None:
                progress(index, tokens)
            callback(self, index, remaining[index], {"tokens": tokens})

        return {"on_step": on_step}

    def generate(self, prompt: str | Sequence[str], *, size: int = DEFAULT_SIZE, steps: int = DEFAULT_STEPS,
                 cfg: float = 3.0, cfg_schedule: str = "constant", temperature: float = 1.0,
                 seed: Optional[int] = None, batch: int = 1, progress: bool = True,
                 fast: bool = False) -> list[Image.Image]:
        """Text to image: `batch` images for each prompt, prompt-major (`scripts/text2image.py`); a
        thin alias of `__call__` (`pipe(prompt, height=size, width=size, ...)`) returning its
        `.images`.

        `size` (pixels, a multiple of 16) sets the latent grid `size/16`; `steps` the MAR
        iterations; `cfg` the guidance scale (1.0: no unconditional rows), `cfg_schedule`
        "constant" or "linear"; `seed` a `jax.random` seed (None: a fresh one). Each image's
        `info` holds the prompt, seed and settings (`save_png` writes them as PNG text).
        `fast=True` samples with the fast preset (`sampling/fast.py`: fewer MAR and diffusion
        steps, cached guidance; other images than the faithful default), also recorded in `info`
        (a `fast.FastSettings`, or its `as_dict()` from an image's `fast_settings`, gives another
        combination).
        """
        return self(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=cfg,
                    guidance_schedule=cfg_schedule, temperature=temperature, seed=seed,
                    num_images_per_prompt=batch, progress=progress, fast=fast).images

    def edit(self, image: ImageInput | Sequence[ImageInput], prompt: str | Sequence[str], *, size: int = DEFAULT_SIZE,
             steps: int = DEFAULT_STEPS, cfg: float = 3.0, cfg_schedule: str = "constant", temperature: float = 1.0,
             seed: int | Sequence[int] | None = None, progress: bool = True, fast: bool = False,
             keep_aspect: bool = False, negative_prompt: str | Sequence[str] | None = None,
             callback_on_step_end: Optional[Callable] = None) -> PipelineImage | list[PipelineImage]:
        """Edit `image` (a PIL image or a file) as `prompt` says (`scripts/image_edit.py`).

        The source is centre-cropped to a square and resized to `size` (a multiple of 16), as the
        released script does. `keep_aspect=True` instead resizes the whole source to the multiples
        of 16 nearest its aspect ratio within `size`**2 pixels (`images.fit_to_budget`), so the
        edit has (about) the source's shape. The guidance prompt is "Repeat this image.";
        `negative_prompt` replaces that text (`prompts.edit_cfg_prompt`).

        A list of images and/or prompts (a single one is repeated) edits each pair and returns a
        list; pairs of the same shape run as one batch. `seed` an int seeds each batch from
        `jax.random.key(seed)`; a list gives one seed per pair, each edit then being that of a
        call with that pair alone. `callback_on_step_end` as in `__call__`. Other arguments as
        `generate`.
        """
        single = not isinstance(image, (list, tuple)) and isinstance(prompt, str)
        sources = list(image) if isinstance(image, (list, tuple)) else None
        texts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
        if texts is None or not texts or not all(isinstance(t, str) for t in texts) or sources == []:
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r:.60}")
        count = max(len(sources or [image]), len(texts))
        sources = sources or [image] * count
        texts = texts * count if len(texts) == 1 else texts
        if len(sources) != count or len(texts) != count:
            raise ValueError(f"{len(sources)} images and {len(texts)} prompts: give one of each, or lists of one length")
        negatives = _per_prompt("negative_prompt", negative_prompt, count)
        check_sampling(self.config, size=size, steps=steps, cfg=cfg, temperature=temperature, batch=count,
                       cfg_schedule=cfg_schedule, negative_prompt=negatives is not None,
                       callback=callback_on_step_end)
        for text in texts:
            prompts.edit_prompt(text, 1)  # empty instructions fail here, before any image is read
        keys, seeds = _keys(seed, None, count)
        pictures = [_model_input_image(src) for src in sources]
        if keep_aspect:
            shapes = [images.fit_to_budget(*pic.size, size * size) for pic in pictures]
            pixels = [images.to_model_input(pic, shape) for pic, shape in zip(pictures, shapes)]
        else:
            shapes = [(size, size)] * count
            pixels = [images.to_model_input(images.center_crop_square(pic), size) for pic in pictures]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, shape in enumerate(shapes):
            groups.setdefault(shape, []).append(i)
        if keep_aspect:  # the square case was checked above
            for height, width in groups:
                check_sampling(self.config, height=height, width=width, steps=steps, cfg=cfg,
                               temperature=temperature)
        results: list[Optional[PipelineImage]] = [None] * count
        for (height, width), members in groups.items():
            grid, image_tokens = self._grid(height, width)
            cond = [prompts.edit_prompt(texts[i], image_tokens) for i in members]
            uncond = [prompts.edit_cfg_prompt(image_tokens, *([] if negatives is None else [negatives[i]]))
                      for i in members]
            ids, mask = self._batch(cond + uncond if cfg != 1.0 else cond, reserved=image_tokens,
                                    bucket=PROMPT_BUCKET)
            key = [keys[i] for i in members] if isinstance(keys, list) else keys
            with _progress(steps, progress, "edit") as bar:
                out = t2i.edit(self.model, self.params, np.concatenate([pixels[i] for i in members]), ids, mask,
                               num_iter=steps, cfg=cfg, cfg_schedule=cfg_schedule, temperature=temperature, key=key,
                               prompt_bucket=PROMPT_BUCKET, fast=fast,
                               **self._step_hooks(bar, callback_on_step_end, grid, steps, fast))
                result = np.asarray(out.images)
            shape = {} if not keep_aspect else dict(keep_aspect=True, height=height, width=width)
            info = []
            for i in members:
                settings = self._settings("edit", seed=seeds[i], size=size, **shape, steps=steps, cfg=cfg,
                                          cfg_schedule=cfg_schedule, temperature=temperature,
                                          **fast_sampling.describe(fast, steps))
                negative = {} if negatives is None else {"negative_prompt": negatives[i]}
                info.append({"prompt": texts[i], **negative, **settings})
            for i, img in zip(members, self._to_pil(result, info)):
                results[i] = img
        return results[0] if single else results

    def caption(self, image: ImageInput | Sequence[ImageInput], prompt: str | Sequence[str] = prompts.CAPTION_TEXT, *,
                size: Optional[int] = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, path: str = "mar",
                sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                seed: Optional[int] = None, repetition_penalty: Optional[float] = None,
                stream: bool = False) -> str | list[str] | Iterator[str]:
        """Answer `prompt` about `image` (`scripts/image2text.py`): the text, special tokens removed.

        The image is padded to a square with grey 127 and resized to `size`: default 1024 on the
        released "mar" path (VAE -> MAR encoder -> proj_in), the tower's own size on the "siglip"
        path (SigLIP2 -> siglip2_proj; weights present but never run by the released code).
        Greedy by default; `sample=True` samples with `temperature`, `top_k`, `top_p` from `seed`.
        `repetition_penalty` None uses the checkpoint's generation_config.json (1.1 for the
        release, as `image2text.py` effectively runs).

        A list of images and/or questions (a single one is repeated) answers each pair in one batch
        and returns a list of texts. `stream=True` (one image and question) returns a generator of
        text pieces yielded as the tokens are produced; joined, they are the text the call without
        `stream` returns.
        """
        single = not isinstance(image, (list, tuple)) and isinstance(prompt, str)
        sources = list(image) if isinstance(image, (list, tuple)) else [image]
        questions = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
        if not questions or not all(isinstance(q, str) for q in questions) or not sources:
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r:.60}")
        rows = max(len(sources), len(questions))
        sources = sources * rows if len(sources) == 1 else sources
        questions = questions * rows if len(questions) == 1 else questions
        if len(sources) != rows or len(questions) != rows:
            raise ValueError(f"{len(sources)} images and {len(questions)} questions: give one of each, or lists of "
                             f"one length")
        _count("images", rows, 1, MAX_BATCH)
        if stream and not single:
            raise ValueError("stream=True takes one image and one question")
        size = check_caption(self.config, size=size, path=path, max_new_tokens=max_new_tokens, sample=sample,
                             temperature=temperature, top_k=top_k, top_p=top_p)
        count = caption_lib.image_token_count(self.config, (size, size), path)
        ids, mask = self._batch([prompts.caption_prompt(count, q) for q in questions], reserved=max_new_tokens,
                                bucket=CAPTION_BUCKET)
        bf16 = jnp.dtype(self.model.dtype) == jnp.bfloat16  # the script converts in the model's dtype
        pixels = np.concatenate([images.to_model_input(images.expand_to_square(_model_input_image(src)), size,
                                                       bf16_ops=bf16) for src in sources])
        rng = jax.random.key(new_seed() if seed is None else check_seed(seed)) if sample else None
        penalty = self.repetition_penalty if repetition_penalty is None else float(repetition_penalty)

        def run(on_token=None):
            return caption_lib.caption(self.model, self.params, pixels, ids, mask, path=path,
                                       max_new_tokens=max_new_tokens, repetition_penalty=penalty, rng=rng,
                                       temperature=temperature, top_k=top_k, top_p=top_p, bucket=CAPTION_BUCKET,
                                       on_token=on_token)

        if stream:
            return self._stream_text(run)
        out = run()
        texts = [self._decode(out, row) for row in range(rows)]
        return texts[0] if single else texts

    def _decode(self, out, row: int) -> str:
        length = int(np.asarray(out.lengths)[row])
        return self.tokenizer.decode(np.asarray(out.ids)[row, :length], skip_special_tokens=True)

    def _stream_text(self, run: Callable) -> Iterator[str]:
        """Run `run(on_token)` in a thread and yield the text of row 0 as its tokens arrive: each
        piece is what the decoded text grew by (held back while it ends in an incomplete UTF-8
        character), the last one completes the text of the finished generation."""
        arrived: queue.Queue = queue.Queue()
        result: dict = {}

        def on_token(step: int, tokens, done) -> None:
            arrived.put((step, None if done[0] else int(tokens[0])))

        def work() -> None:
            try:
                result["out"] = run(on_token)
            except BaseException as e:  # re-raised in the consumer
                result["error"] = e
            finally:
                arrived.put(None)

        thread = threading.Thread(target=work, name="unipic-caption-stream", daemon=True)
        thread.start()
        pending, ids, emitted, next_step = {}, [], "", 0
        while (item := arrived.get()) is not None:
            pending[item[0]] = item[1]
            while next_step in pending:  # callbacks may arrive out of order: take the steps in order
                token = pending.pop(next_step)
                next_step += 1
                if token is None:
                    continue
                ids.append(token)
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                if len(text) > len(emitted) and text.startswith(emitted) and not text.endswith("\ufffd"):
                    yield text[len(emitted):]
                    emitted = text
        thread.join()
        if "error" in result:
            raise result["error"]
        final = self._decode(result["out"], 0)
        if len(final) > len(emitted) and final.startswith(emitted):
            yield final[len(emitted):]

    # ------------------------------------------------------------------------------------------
    # Sessions

    def session(self, *, size: int = DEFAULT_SIZE):
        """A multi-turn conversation (`describe`, `generate`, `edit`, `ask`) that keeps the LLM's
        KV cache between turns, so each turn computes only its new tokens
        (`unipic_jax.pipeline.session.Session`; `size` is its images' side in pixels)."""
        from unipic_jax.pipeline.session import Session

        return Session(self, size=size)


CFG_SCHEDULES = ("constant", "linear")  # `schedule.cfg_scales`


def _per_prompt(name: str, value, count: int) -> Optional[list[str]]:
    """None, or `value` (a string, or a list of `count` strings) as one string per prompt."""
    if value is None:
        return None
    values = [value] * count if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if values is None or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{name} must be a string or a list of strings, got {value!r:.60}")
    if len(values) != count:
        raise ValueError(f"{name} holds {len(values)} entries for {count} prompts; give one, or one per prompt")
    return values


def _is_key(key) -> bool:
    if not isinstance(key, jax.Array):
        return False
    return jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or (key.dtype == jnp.uint32 and key.shape == (2,))


def _keys(seed, generator, count: int):
    """(key or list of keys for `t2i.draws_per_key`, the seed recorded for each of `count` prompts)."""
    if generator is not None:
        if seed is not None:
            raise ValueError("pass seed or generator, not both")
        keys = list(generator) if isinstance(generator, (list, tuple)) else generator
        if not all(_is_key(k) for k in (keys if isinstance(keys, list) else [keys])):
            raise ValueError("generator must be a jax.random key (jax.random.key(seed)) or a list of them")
        if isinstance(keys, list) and len(keys) != count:
            raise ValueError(f"generator holds {len(keys)} keys for {count} prompts; give one, or one per prompt")
        return keys, [None] * count
    if isinstance(seed, (list, tuple)):
        if len(seed) != count:
            raise ValueError(f"{len(seed)} seeds for {count} prompts; give one seed, or one per prompt")
        seeds = [check_seed(s) for s in seed]
        return [jax.random.key(s) for s in seeds], seeds
    seed = new_seed() if seed is None else check_seed(seed)
    return jax.random.key(seed), [seed] * count


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
