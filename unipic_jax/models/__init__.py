"""Pure flax.linen modules, one file per component. No I/O, no sampling loops."""
