"""Reading and writing PyTorch-layout state dicts as numpy arrays.

Formats: `.safetensors` (read and written here without torch, bfloat16 included through
ml_dtypes), and torch pickles `.bin` / `.pt` / `.pth` / `.ckpt` (read with
`torch.load(weights_only=True)`; kl16.ckpt keeps its weights under a top-level "model" entry).
Writes go to a temporary file that is renamed into place, so a failed write leaves no
half-finished file behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Mapping

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
        raise CheckpointFileError(f"{path}: reading torch checkpoints needs PyTorch: pip install "
                                  f"'unipic-jax[convert]' (the CPU build, torch==2.13.0)") from None
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


def _write_torch(tensors: Mapping[str, np.ndarray], f, wrap: str | None = None) -> None:
    """A torch pickle of `tensors` (inside `{wrap: ...}` when given). Keys holding the same numpy
    object (a tied weight and its alias) share one storage, as torch's own state dicts do."""
    import torch

    made: dict[int, torch.Tensor] = {}

    def to_torch(a):
        if id(a) not in made:
            c = np.ascontiguousarray(a)
            made[id(a)] = (torch.from_numpy(c.view(np.int16)).view(torch.bfloat16) if c.dtype == ml_dtypes.bfloat16
                           else torch.from_numpy(c))
        return made[id(a)]

    state_dict = {k: to_torch(v) for k, v in tensors.items()}
    torch.save({wrap: state_dict} if wrap else state_dict, f)


def save_state_dict(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, *, overwrite: bool = True,
                    wrap: str | None = None) -> None:
    """Write a state dict atomically; the suffix picks safetensors or a torch pickle (`wrap`, for
    torch pickles only, nests it as `{wrap: state_dict}`, the layout of kl16.ckpt)."""
    path = Path(path)
    if path.suffix == ".safetensors" and wrap is None:
        write_file(path, lambda f: _write_safetensors(tensors, f), overwrite=overwrite)
    elif path.suffix in TORCH_SUFFIXES:
        write_file(path, lambda f: _write_torch(tensors, f, wrap), overwrite=overwrite)
    else:
        raise ValueError(f"{path}: unknown checkpoint suffix" + (" for a wrapped state dict" if wrap else ""))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _temp_prefix(dest: Path) -> str:
    """Temporary names carry the writer's pid, so leftovers of a killed writer can be told from
    the work of a live one: `.NAME.PID.XXXX.partial`."""
    return f".{dest.name}.{os.getpid()}."


def clean_leftovers(dest: str | os.PathLike) -> list[Path]:
    """Remove the temporaries a killed writer of `dest` left beside it (`.NAME.PID.*.partial` of a
    process that no longer runs) and return what was removed. Only names this module makes are
    touched, and never those of a live process."""
    dest = Path(dest).absolute()
    removed = []
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.(\d+)\.[^/]*\.partial$")
    if not dest.parent.is_dir():
        return removed
    for entry in dest.parent.iterdir():
        match = pattern.match(entry.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished file `tmp` to `path`: replace what is there when `overwrite`, else only
    if nothing is there (FileExistsError otherwise, atomically: two writers never both win)."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if `path` exists, whoever made it in the meantime
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: reserve the name, then fill it
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        os.replace(tmp, path)
    else:
        tmp.unlink()


def write_file(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, overwrite: bool = False) -> Path:
    """Write a file through `write(f)` under a unique temporary name beside `path`, then move it
    into place: a failure or a kill never leaves a half-written `path`, and concurrent writers
    never share a temporary. Without `overwrite` an existing `path` is a `FileExistsError` (also
    when another process creates it while this one writes)."""
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(errno.EEXIST, "already exists", os.fspath(path))
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".partial", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the result is an ordinary file
        _publish(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def replaced_directory(path: str | os.PathLike):
    """Yields an empty temporary folder beside `path`; when the block ends without an error, it
    takes the place of `path` (an existing folder there is replaced only then, and put back if
    the final rename fails). On an error nothing at `path` changes and the temporary is removed;
    temporaries left by a killed earlier writer are removed first (`clean_leftovers`)."""
    dest = Path(path).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(dest)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest), suffix=".partial", dir=dest.parent))
    old = None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
        yield tmp
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest), suffix=".old.partial", dir=dest.parent))
            os.replace(dest, old)  # renaming a folder onto an empty one replaces it
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        if old is not None and old.exists():
            if dest.exists():
                shutil.rmtree(old)
            else:
                os.replace(old, dest)  # the rename failed: put the previous folder back
