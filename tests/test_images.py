"""Image loading, squaring, model input and the reference's output conversion.

Pixel arithmetic is compared exactly (integers, or bit-equal floats) with the same operations in
PyTorch as the reference scripts write them, over every uint8 value and over model outputs that
cover the clamped range and its rounding boundaries.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from unipic_jax import images
from unipic_jax.images import ImageError


def _pattern(w: int, h: int) -> Image.Image:
    """An RGB image whose every pixel is different (position-coded)."""
    y, x = np.mgrid[:h, :w]
    return Image.fromarray(np.stack([x % 256, y % 256, (x * 7 + y * 13) % 256], -1).astype(np.uint8))


def test_load_image_converts_to_rgb(tmp_path):
    rgba = np.zeros((6, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = images.load_image(tmp_path / "a.png")
    assert img.mode == "RGB" and img.size == (5, 6)
    assert np.asarray(img)[0, 0].tolist() == [200, 0, 0]  # alpha dropped, as convert('RGB')


def test_load_image_errors(tmp_path):
    with pytest.raises(ImageError, match="absent.png: no such image file"):
        images.load_image(tmp_path / "absent.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageError, match="text.png: not an image file"):
        images.load_image(tmp_path / "text.png")
    _pattern(64, 64).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png"):
        images.load_image(tmp_path / "cut.png")


@pytest.mark.parametrize("w,h", [(9, 4), (4, 9), (10, 7), (6, 6)])
def test_center_crop_square(w, h):
    img = _pattern(w, h)
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    got = np.asarray(images.center_crop_square(img))
    np.testing.assert_array_equal(got, np.asarray(img)[top:top + s, left:left + s])


@pytest.mark.parametrize("w,h", [(9, 4), (4, 9), (6, 3)])
def test_expand_to_square(w, h):
    img = _pattern(w, h)
    s = max(w, h)
    out = np.asarray(images.expand_to_square(img))
    left, top = (s - w) // 2, (s - h) // 2
    assert out.shape == (s, s, 3)
    np.testing.assert_array_equal(out[top:top + h, left:left + w], np.asarray(img))
    pad = np.ones((s, s), bool)
    pad[top:top + h, left:left + w] = False
    assert (out[pad] == 127).all()


def test_resize_is_pillows_default():
    img = _pattern(37, 37)
    np.testing.assert_array_equal(np.asarray(images.resize(img, 32)), np.asarray(img.resize((32, 32))))


def _all_values_image() -> Image.Image:
    values = np.arange(256 * 3, dtype=np.int64).reshape(16, 16, 3) % 256
    return Image.fromarray(values.astype(np.uint8))


def test_to_model_input_float32_matches_the_edit_script():
    img = _all_values_image()
    got = images.to_model_input(img, 16)  # 16 px: resize is the identity
    assert got.shape == (1, 16, 16, 3) and got.dtype == np.float32
    pixels = torch.from_numpy(np.array(img.resize((16, 16)))).float()
    ref = (pixels / 255 * 2 - 1).numpy()  # image_edit.py, float32
    np.testing.assert_array_equal(got[0], ref)


def test_to_model_input_bf16_matches_the_caption_script():
    img = _all_values_image()
    got = images.to_model_input(img, 16, bf16_ops=True)
    pixels = torch.from_numpy(np.array(img.resize((16, 16)))).to(torch.bfloat16)
    ref = (2 * (pixels / 255) - 1).float().numpy()  # image2text.py, every op in bf16
    np.testing.assert_array_equal(got[0].astype(np.float32), ref)


@pytest.mark.parametrize("size", [0, 8, 100])
def test_to_model_input_size_must_be_a_multiple_of_16(size):
    with pytest.raises(ImageError, match="multiple of 16"):
        images.to_model_input(_pattern(4, 4), size)


def _reference_to_uint8(x_bhwc: np.ndarray) -> np.ndarray:
    """§8.4 in PyTorch: bf16 output, `(127.5 * x + 128).clamp(0, 255).to(uint8)`."""
    x = torch.from_numpy(x_bhwc).to(torch.bfloat16)
    return torch.clamp(127.5 * x + 128, 0, 255).to(torch.uint8).numpy()


def test_to_uint8_matches_the_reference():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.1, 1.1, size=(2, 40, 40, 3)).astype(np.float32)
    # Values whose 127.5*x + 128 falls on or next to .5 boundaries and the clamp edges.
    edges = (np.arange(-2, 258, dtype=np.float32)[:, None] + np.array([0.0, 0.5, 0.49, 0.51], np.float32)) - 128
    x.reshape(-1)[: edges.size] = (edges / np.float32(127.5)).reshape(-1)
    got = images.to_uint8(x)
    ref = _reference_to_uint8(x)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, ref)
    # bf16 rounding matters: a plain float32 round-and-truncate would differ somewhere.
    naive = np.clip(127.5 * x + 128, 0, 255).astype(np.uint8)
    assert (naive != ref).any()


def test_to_uint8_takes_bf16_arrays():
    import jax.numpy as jnp

    x = jnp.linspace(-1.0, 1.0, 97, dtype=jnp.float32).astype(jnp.bfloat16).reshape(1, 97, 1, 1)
    np.testing.assert_array_equal(images.to_uint8(x), _reference_to_uint8(np.asarray(x, np.float32)))


def test_tile_grid_is_row_major():
    imgs = np.arange(6)[:, None, None, None] * np.ones((6, 2, 3, 1), np.uint8)
    grid = images.tile_grid(imgs, 2, 3)
    assert grid.shape == (4, 9, 1)
    np.testing.assert_array_equal(grid[::2, ::3, 0], [[0, 1, 2], [3, 4, 5]])
    with pytest.raises(ValueError, match="2x2"):
        images.tile_grid(imgs, 2, 2)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".jpeg", ".webp", ".PNG"])
def test_save_image_metadata_round_trip(tmp_path, suffix):
    pixels = np.asarray(_pattern(8, 5))
    meta = {"prompt": "a cat ü", "seed": 7, "settings": {"cfg": 3.0, "num_iter": 32}}
    path = images.save_image(pixels, tmp_path / f"out{suffix}", meta)
    with Image.open(path) as img:
        assert img.format == images.OUTPUT_FORMATS[suffix.lower()]  # the bytes follow the suffix
        if img.format == "PNG":  # lossless: the pixels come back exactly
            np.testing.assert_array_equal(np.asarray(img), pixels)
    assert images.read_metadata(path) == {"prompt": "a cat ü", "seed": "7",
                                          "settings": '{"cfg": 3.0, "num_iter": 32}'}
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"out{suffix}"]


@pytest.mark.parametrize("name", ["out.gif", "out", "out.png.txt"])
def test_save_image_refuses_unknown_types(tmp_path, name):
    with pytest.raises(images.ImageError, match=r"\.png, \.jpg"):
        images.save_image(np.zeros((4, 4, 3), np.uint8), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_save_image_never_replaces_a_file_unless_asked(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"the user's file")
    with pytest.raises(FileExistsError):
        images.save_image(np.zeros((4, 4, 3), np.uint8), target)
    assert target.read_bytes() == b"the user's file"
    images.save_image(np.zeros((4, 4, 3), np.uint8), target, overwrite=True)
    with Image.open(target) as img:
        assert img.size == (4, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_concurrent_saves_share_no_temporary(tmp_path):
    """Many threads saving different images to one folder, and several racing for one name:
    every distinct name is written, exactly one racer wins each contested name, nothing is left."""
    from concurrent.futures import ThreadPoolExecutor

    def save(i):
        try:
            images.save_image(np.full((4, 4, 3), i % 256, np.uint8), tmp_path / f"img{i % 40}.png")
            return True
        except FileExistsError:
            return False

    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(save, range(200)))
    assert sum(won) == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"img{i}.png" for i in range(40))


def test_save_image_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    target.write_bytes(b"previous")

    def failing_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        images.save_image(np.zeros((4, 4, 3), np.uint8), target, {"prompt": "x"}, overwrite=True)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
