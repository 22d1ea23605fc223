"""Beside `unipic_jax.api.UniPicPipeline` and its Hugging Face-shaped call (`pipe(prompt,
height=..., width=...)`): the call's output type (`output.py`) and multi-turn sessions
(`session.py`)."""

from unipic_jax.pipeline.output import ImagePipelineOutput, PipelineImage

__all__ = ["ImagePipelineOutput", "PipelineImage"]
