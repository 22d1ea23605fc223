"""unipic-jax: a JAX/Flax port of Skywork UniPic-1 (1.5B unified autoregressive model)."""

__version__ = "0.1.0"


def __getattr__(name):
    """`unipic_jax.UniPic` is the pipeline (`api.UniPicPipeline`), imported lazily so that
    importing the package does not start JAX."""
    if name in ("UniPic", "UniPicPipeline"):
        from unipic_jax.api import UniPicPipeline

        return UniPicPipeline
    raise AttributeError(f"module 'unipic_jax' has no attribute {name!r}")
