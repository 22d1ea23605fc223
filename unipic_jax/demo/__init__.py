"""The web demo (`unipic-jax demo`): a Gradio chat that generates, edits and describes pictures.

`unipic_jax.demo.app` holds it; it needs the `demo` extra (`pip install -e ".[demo]"`). Nothing is
imported here, so that `import unipic_jax.demo` costs nothing without Gradio.
"""
