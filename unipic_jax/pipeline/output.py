"""What a pipeline call returns: images that carry their settings, and the output object.

`PipelineImage` is a `PIL.Image.Image` whose `settings` (prompt, seed, sizes, steps, guidance, the
model...) are also in its `info`, and whose `save()` writes them as metadata the way
`unipic_jax.images.save_image` does (PNG text chunks; a JSON object in the EXIF ImageDescription of
JPEG and WebP; `images.read_metadata` reads either back), unless the caller passes its own
`pnginfo` / `exif`. Images derived from it (`copy()`, `convert()`, `resize()`...) are plain PIL
images with a copy of `info`.

`ImagePipelineOutput` is the Hugging Face-shaped result of `UniPicPipeline.__call__`: `.images`
(PIL) and `.seeds` (the seed recorded with each image).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Optional

from PIL import Image

from unipic_jax import images as images_lib


class PipelineImage(Image.Image):
    """A PIL image carrying the settings it was made with (`settings`, also merged into `info`)."""

    settings: dict[str, Any]

    @classmethod
    def wrap(cls, image: Image.Image, settings: Mapping[str, Any]) -> "PipelineImage":
        """The pixels of `image` (shared, not copied) as a `PipelineImage` carrying `settings`."""
        out = cls()
        out.im = image.im
        out._mode = image.mode
        out._size = image.size
        out.info = {**image.info, **settings}
        out.settings = dict(settings)
        return out

    def save(self, fp, format: Optional[str] = None, **params) -> None:  # noqa: A002 (PIL's name)
        """`PIL.Image.Image.save`, adding the settings as metadata for PNG, JPEG and WebP (the format
        from `format` or the file name's suffix) unless `pnginfo` / `exif` is passed."""
        fmt = format
        if fmt is None and isinstance(fp, (str, os.PathLike)):
            Image.init()
            fmt = Image.EXTENSION.get(Path(fp).suffix.lower())
        if fmt is not None and "pnginfo" not in params and "exif" not in params:
            params = {**images_lib.metadata_options(fmt, self.settings), **params}
        super().save(fp, format=format, **params)


@dataclasses.dataclass
class ImagePipelineOutput:
    """`images`: one `PipelineImage` per image, prompt-major (`num_images_per_prompt` images of
    prompt 0, then of prompt 1...). `seeds`: the seed recorded with each image, aligned with
    `images` (see `UniPicPipeline.__call__` for what reproduces an image)."""

    images: list[PipelineImage]
    seeds: list[Optional[int]]

    def __getitem__(self, index):
        """`output[0]` is `images`, as diffusers' outputs index."""
        return (self.images, self.seeds)[index]
