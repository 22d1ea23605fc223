"""JAX's persistent compilation cache, on by default for the command line and `from_pretrained`.

Compiling the sampler is most of a short run's time (seconds for the tiny model, minutes at
1024 px); with the cache, a second run of the same shapes on the same machine loads the compiled
programs instead. The cache lives in `$UNIPIC_JAX_CACHE`, else `$XDG_CACHE_HOME/unipic-jax/xla`
(default `~/.cache/unipic-jax/xla`). `UNIPIC_JAX_CACHE=off` (or `0`, `none`, empty) turns it off;
a cache directory the user already gave JAX (`jax_compilation_cache_dir`) is left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "UNIPIC_JAX_CACHE"
_OFF = ("", "0", "off", "none", "false", "no")


def cache_dir() -> Path | None:
    """Where the cache goes, or None when it is turned off."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "unipic-jax" / "xla"


def enable() -> Path | None:
    """Turn the persistent cache on (see the module docstring); returns its folder, or None.
    Every compiled program is cached, however quick its compile was."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    folder = cache_dir()
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: run without the cache rather than fail
        return None
    jax.config.update("jax_compilation_cache_dir", os.fspath(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
