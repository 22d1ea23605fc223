"""ml_collections configs: `unipic_1p5b` (the released sizes) and `fixture` (sizes read from a meta.json)."""
