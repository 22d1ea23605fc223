"""Reading and writing PyTorch-layout state dicts as numpy arrays.

Formats: `.safetensors` (read and written here without torch, bfloat16 included through
ml_dtypes), and torch pickles `.bin` / `.pt` / `.pth` / `.ckpt` (read with
`torch.load(weights_only=True)`; kl16.ckpt keeps its weights under a top-level "model" entry).
Writes go to a temporary file that is renamed into place, so a failed write leaves no
half-finished file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class CheckpointFileError(ValueError):
    """A checkpoint file that is missing, truncated or not a state dict."""


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointFileError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointFileError(f"{path}: header length {n} exceeds the file size {size}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointFileError(f"{path}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    out = {}
    for key, info in header.items():
        start, end = info["data_offsets"]
        if end > data.size:
            raise CheckpointFileError(f"{path}: tensor {key!r} runs past the end of the file (truncated?)")
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointFileError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        out[key] = np.frombuffer(data[start:end], dtype=dtype).reshape(info["shape"]).copy()
    return out


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointFileError(f"{path}: reading torch checkpoints needs PyTorch (pip install torch)") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for truncated or foreign files
        raise CheckpointFileError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]  # kl16.ckpt layout
    if not isinstance(obj, Mapping):
        raise CheckpointFileError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[k] = _torch_to_numpy(v)
    return out


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a state dict (.safetensors or a torch pickle) into {key: numpy array}."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointFileError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    raise CheckpointFileError(f"{path}: unknown checkpoint suffix (want .safetensors or {', '.join(TORCH_SUFFIXES)})")


def _write_safetensors(tensors: Mapping[str, np.ndarray], f) -> None:
    header, offset, arrays = {}, 0, []
    for key in sorted(tensors):
        a = np.ascontiguousarray(tensors[key])
        name = _ST_NAMES.get(a.dtype)
        if name is None:
            raise ValueError(f"tensor {key!r}: dtype {a.dtype} cannot be stored in safetensors")
        header[key] = {"dtype": name, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for a in arrays:
        f.write(a.tobytes())


def _write_torch(tensors: Mapping[str, np.ndarray], f) -> None:
    import torch

    def to_torch(a):
        a = np.ascontiguousarray(a)
        if a.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)

    torch.save({k: to_torch(v) for k, v in tensors.items()}, f)


def save_state_dict(tensors: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write a state dict atomically; the suffix picks safetensors or a torch pickle."""
    path = Path(path)
    if path.suffix == ".safetensors":
        writer = _write_safetensors
    elif path.suffix in TORCH_SUFFIXES:
        writer = _write_torch
    else:
        raise ValueError(f"{path}: unknown checkpoint suffix")
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as f:
            writer(tensors, f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def replaced_directory(path: str | os.PathLike):
    """Yields an empty temporary folder beside `path`; when the block ends without an error, it
    takes the place of `path` (an existing folder there is replaced only then, and put back if
    the final rename fails). On an error nothing at `path` changes and the temporary is removed."""
    dest = Path(path).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    old = None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(dest, old)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        if old is not None and old.exists():
            if dest.exists():
                shutil.rmtree(old)
            else:
                os.replace(old, dest)  # the rename failed: put the previous folder back
