"""Image files in and out: loading, squaring, resizing, model input, pixel conversion, PNG output.

Pre-processing follows the released scripts (reference-spec §9, §10): editing crops the centre
square (`center_crop_square`), image-to-text pads to a square with grey 127 (`expand_to_square`);
both resize with Pillow's bicubic filter and map 0..255 to [-1, 1]. Model inputs are NHWC.

Output conversion (§8.4) happens in bfloat16 in the reference: `to_uint8` repeats its rounding
exactly. `save_image` writes PNG, JPEG or WebP with the prompt and settings as metadata, atomically
and never over an existing file unless asked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

PAD_GREY = (127, 127, 127)
SIZE_MULTIPLE = 16  # the VAE downsamples by 16


class ImageError(ValueError):
    """An image file that is missing or unreadable, or a size the model cannot take."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file, fully decoded and converted to RGB (alpha dropped, as `convert('RGB')`)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot decode the image ({e})") from None


def center_crop_square(img: Image.Image) -> Image.Image:
    """The centred square of side min(W, H) (`crop2square`: left=(W-s)//2, top=(H-s)//2)."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


def expand_to_square(img: Image.Image, fill: tuple[int, int, int] = PAD_GREY) -> Image.Image:
    """Pad to a square of side max(W, H) with `fill`, content centred at offset (max-min)//2."""
    w, h = img.size
    if w == h:
        return img
    s = max(w, h)
    out = Image.new(img.mode, (s, s), fill)
    out.paste(img, ((s - w) // 2, (s - h) // 2))
    return out


def _height_width(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def resize(img: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """Resize to `size` x `size` (or to `(height, width)`) with bicubic filtering (Pillow's default
    for RGB, as the scripts)."""
    height, width = _height_width(size)
    return img.resize((width, height), Image.Resampling.BICUBIC)


def check_size(size: int, name: str = "image size") -> None:
    """Raise unless `size` is a positive multiple of 16 pixels (`name` says which side in the error)."""
    if size < SIZE_MULTIPLE or size % SIZE_MULTIPLE:
        raise ImageError(f"{name} {size} must be a positive multiple of {SIZE_MULTIPLE} pixels")


def fit_to_budget(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(height, width), multiples of 16, of about the aspect ratio of a `width` x `height` picture and
    at most `max_pixels` pixels: both sides scaled by sqrt(max_pixels / (width*height)) and rounded
    to the nearest multiple of 16, or rounded down when that overshoots the budget (at least 16;
    a side held at 16 shortens the other one to fit)."""
    if width < 1 or height < 1 or max_pixels < SIZE_MULTIPLE ** 2:
        raise ImageError(f"cannot fit a {width}x{height} picture into {max_pixels} pixels")
    scale = (max_pixels / (width * height)) ** 0.5
    sides = [height * scale / SIZE_MULTIPLE, width * scale / SIZE_MULTIPLE]
    h, w = (max(1, round(x)) * SIZE_MULTIPLE for x in sides)
    if h * w > max_pixels:
        h, w = (max(1, int(x)) * SIZE_MULTIPLE for x in sides)
    if h * w > max_pixels:  # a very thin picture: one side held at 16, the other shortened to fit
        longest = max_pixels // SIZE_MULTIPLE // SIZE_MULTIPLE * SIZE_MULTIPLE
        h, w = (h, min(w, longest)) if h == SIZE_MULTIPLE else (min(h, longest), w)
    return h, w


def to_model_input(img: Image.Image, size: int | tuple[int, int], *, bf16_ops: bool = False) -> np.ndarray:
    """Resize to `size` (or `(height, width)`) and map to [-1, 1]: a (1, height, width, 3) array.

    Default: float32 `x / 255 * 2 - 1`, as the editing script computes it (a bfloat16 model casts
    the result). `bf16_ops=True` reproduces the image-to-text script instead, which converts the
    uint8 pixels to bfloat16 first and rounds after each op; the result is then bfloat16.
    """
    for side in _height_width(size):
        check_size(side)
    pixels = np.asarray(resize(img.convert("RGB"), size), np.uint8)[None]
    if not bf16_ops:
        return pixels.astype(np.float32) / np.float32(255) * np.float32(2) - np.float32(1)
    bf16 = ml_dtypes.bfloat16
    x = pixels.astype(bf16)
    x = (x.astype(np.float32) / np.float32(255)).astype(bf16)
    x = (x.astype(np.float32) * np.float32(2)).astype(bf16)
    return (x.astype(np.float32) - np.float32(1)).astype(bf16)


def to_uint8(images_bhwc) -> np.ndarray:
    """Model output in about [-1, 1] -> uint8 pixels, rounded exactly as the reference scripts do.

    In bfloat16: `y = bf16(bf16(127.5 * x) + 128)`, clamped to [0, 255], then truncated to uint8
    (each bf16 op computes in float32 and rounds once; a float32 `x` is first rounded to bf16, the
    dtype the reference's decoder returns). Runs on the host with ml_dtypes: XLA may drop a
    float32 -> bf16 -> float32 round trip (excess precision), numpy never does.
    """
    bf16 = ml_dtypes.bfloat16
    x = np.asarray(images_bhwc).astype(bf16).astype(np.float32)
    y = (x * np.float32(127.5)).astype(bf16).astype(np.float32)
    y = (y + np.float32(128)).astype(bf16).astype(np.float32)
    return np.clip(y, 0, 255).astype(np.uint8)


def tile_grid(images_bhwc, rows: int, cols: int):
    """Tile `rows * cols` images into one (rows*H, cols*W, C) image, row-major
    (`'(gm gn) h w c -> (gm h) (gn w) c'`)."""
    b, h, w, c = images_bhwc.shape
    if b != rows * cols:
        raise ValueError(f"{b} images do not fill a {rows}x{cols} grid")
    grid = images_bhwc.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4)
    return grid.reshape(rows * h, cols * w, c)


# Output formats by file suffix. JPEG and WebP carry the settings as EXIF ImageDescription (a
# JSON object of the same strings a PNG holds as text chunks).
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_SAVE_OPTIONS = {"PNG": {}, "JPEG": {"quality": 95}, "WEBP": {"quality": 95}}
_EXIF_DESCRIPTION = 0x010E


def output_format(path: str | os.PathLike) -> str:
    """The Pillow format for an output file name (by suffix), or ImageError for any other."""
    fmt = OUTPUT_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ImageError(f"{path}: unknown image type; name the file .png, .jpg, .jpeg or .webp")
    return fmt


def _text(metadata: Mapping[str, object] | None) -> dict[str, str]:
    return {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in (metadata or {}).items()}


def save_image(image, path: str | os.PathLike, metadata: Mapping[str, object] | None = None, *,
               overwrite: bool = False) -> Path:
    """Write a uint8 (H, W, 3) image (or a PIL image) with `metadata`, in the format of the suffix.

    PNG keeps `metadata` as text chunks, JPEG (quality 95) and WebP (quality 95) as a JSON object in
    EXIF ImageDescription; `read_metadata` reads either back. String values are stored as they are,
    anything else as JSON. The file is written under a unique temporary name in the same folder and
    moved into place, so an error or a kill leaves no partial file. An existing file is an error
    (`FileExistsError`) unless `overwrite`.
    """
    from convert.io import write_file

    path = Path(path)
    fmt = output_format(path)
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    options = {**_SAVE_OPTIONS[fmt], **metadata_options(fmt, metadata)}
    return write_file(path, lambda f: img.save(f, format=fmt, **options), overwrite=overwrite)


def metadata_options(fmt: str, metadata: Mapping[str, object] | None) -> dict:
    """The Pillow `save` options that store `metadata` in a `fmt` file: `pnginfo` (text chunks) for
    PNG, `exif` (a JSON object in ImageDescription) for JPEG and WebP; {} for other formats or no
    metadata. The one place that knows how settings are written (`save_image`, and the
    settings-carrying images of `unipic_jax.pipeline`)."""
    text = _text(metadata)
    fmt = fmt.upper()
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
        return {"pnginfo": info}
    if text and fmt in ("JPEG", "WEBP"):
        exif = Image.Exif()
        exif[_EXIF_DESCRIPTION] = json.dumps(text, sort_keys=True)  # ASCII: json escapes the rest
        return {"exif": exif}
    return {}


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The settings `save_image` stored in `path` (PNG text chunks or the JPEG/WebP EXIF JSON)."""
    with Image.open(path) as img:
        if img.format == "PNG":
            return dict(img.text)
        description = img.getexif().get(_EXIF_DESCRIPTION)
    try:
        value = json.loads(description) if description else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
