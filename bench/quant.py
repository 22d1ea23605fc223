"""Deviation of weight-only int8/int4 from the unquantized model (`quant.deviation`), per setting.

    python bench/quant.py --config unipic_1p5b --dtype bf16 --quantize int8 int4
    python bench/quant.py --config tests/fixtures/unipic --dtype fp32 --quantize int8 int4

`--config` as in bench/sample.py: "unipic_1p5b" (the released sizes, random weights drawn as
bench/sample.py's `random_params` draws them: nothing is downloaded), a CPU-bench JSON, or a
fixture folder (its `weights.safetensors`, the official code's random init, when it has one). The
reference is the same model in the same dtype, unquantized; the figures are those of the README's
"Quantized inference" table: `logits` max |error| / max |logit| of the LLM on `--prompt-len`
random ids, `top1` the share of those positions whose greedy token is unchanged, `head` the
diffusion head's max relative error on conditions from MAR encoder -> LLM -> MAR decoder.
One line of JSON per setting, then the weight bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="'unipic_1p5b', a CPU-bench JSON or a fixture folder")
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"), help="compute and weight dtype")
    p.add_argument("--quantize", nargs="+", default=["int8", "int4"], choices=("int8", "int4"))
    p.add_argument("--prompt-len", type=int, default=16, help="random ids the logits are measured on")
    p.add_argument("--seed", type=int, default=1, help="key of the random inputs")
    args = p.parse_args(argv)
    if args.prompt_len < 1:
        p.error(f"--prompt-len must be >= 1, got {args.prompt_len}")

    import jax
    import jax.numpy as jnp

    from bench.sample import load_setup, random_params
    from unipic_jax import quant
    from unipic_jax.models.unipic import UniPic, UniPicConfig

    try:
        config, _, _ = load_setup(args.config, random_weights=True)
    except (ValueError, OSError) as e:
        print(f"quant.py: error: {e}", file=sys.stderr)
        return 2
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    unipic_config = UniPicConfig.from_config(config)
    model = UniPic(unipic_config, dtype)
    fixture_weights = Path(args.config) / "weights.safetensors"
    if fixture_weights.is_file():
        from safetensors.numpy import load_file

        from convert.unipic import unipic_params_from_torch

        params = unipic_params_from_torch(load_file(fixture_weights), unipic_config)
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)
    else:
        params = random_params(unipic_config, 0, dtype)
    for setting in args.quantize:
        start = time.perf_counter()
        d = quant.deviation(model, params, setting, key=jax.random.key(args.seed), prompt_len=args.prompt_len)
        print(json.dumps({"config": args.config, "dtype": args.dtype, "quantize": setting,
                          **{k: round(v, 4) for k, v in d.items()}, "seconds": round(time.perf_counter() - start, 1)}),
              flush=True)
    full = quant.tree_bytes(params)
    for setting in args.quantize:
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        q = quant.tree_bytes(quant.quantize_params(abstract, setting))
        print(f"weights {args.dtype}: {full / 2**30:.3f} GiB, {setting}: {q / 2**30:.3f} GiB ({100 * q / full:.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
