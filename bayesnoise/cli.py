"""The ``bayesnoise`` command line."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from bayesnoise import demo

    demo.main(out=args.out, epochs=args.epochs, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayesnoise", description="Bayesian weight noise for JAX and Flax."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a small end-to-end run on scikit-learn's bundled digits")
    demo.add_argument(
        "--out", default="runs/demo", help="folder for the results (default: %(default)s)"
    )
    demo.add_argument(
        "--epochs", type=int, default=30, help="training epochs (default: %(default)s)"
    )
    demo.add_argument("--seed", type=int, default=0, help="PRNG seed (default: %(default)s)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
