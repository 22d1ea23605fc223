"""The `unipic-jax` command. Argument parsing only; the work lives in the library."""

from __future__ import annotations

import argparse
import sys


def _parity(args) -> int:
    from unipic_jax import parity

    only = [s for s in args.only.split(",") if s] if args.only else None
    print(parity.HEADER, flush=True)
    results = parity.run(args.fixture_root, only, on_row=lambda r: print(parity.format_row(r), flush=True))
    failed = [r for r in parity.iter_rows(results) if not r.ok]
    ok = parity.rows_ok(results, only)
    n = sum(1 for _ in parity.iter_rows(results))
    print(f"{n - len(failed)} passed, {len(failed)} failed")
    if failed:
        print("failing rows:")
        for r in failed:
            print("  " + parity.format_row(r))
    elif not ok:
        print("a component asked for with --only was skipped (or nothing was compared)")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unipic-jax", description="Skywork UniPic-1 in JAX/Flax.")
    sub = p.add_subparsers(dest="command", required=True)

    par = sub.add_parser("parity", help="replay the official PyTorch fixtures and compare outputs")
    par.add_argument("fixture_root", help="folder laid out like shared/fixtures (vae/, mar/, ...)")
    par.add_argument("--only", help="comma-separated components: vae,mar,qwen2,siglip,unipic")
    par.set_defaults(func=_parity)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        print(f"unipic-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
