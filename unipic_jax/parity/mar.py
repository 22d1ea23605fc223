"""Parity rows for mar/: the MAR encoder/decoder and the diffusion head share one fixture."""

from unipic_jax.parity import diffloss, mar_encdec


def rows(fx):
    yield from mar_encdec.rows(fx)
    yield from diffloss.rows(fx)
