"""unipic-jax: a JAX/Flax port of Skywork UniPic-1 (1.5B unified autoregressive model)."""

__version__ = "0.1.0"
