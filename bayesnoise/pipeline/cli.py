"""The ``bayesnoise`` command line."""

from __future__ import annotations

import argparse
import logging
import sys


def _run(args: argparse.Namespace) -> int:
    from bayesnoise import pipeline
    from bayesnoise.pipeline import config

    try:
        cfg = config.load_config(args.config, args.set or ())
    except (config.ConfigError, FileNotFoundError) as e:
        print(f"bayesnoise run: {e}", file=sys.stderr)
        return 2
    pipeline.run(cfg, args.out, resume=not args.no_resume, progress=not args.quiet)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from bayesnoise import bench

    bench.main(suite=args.suite, out=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayesnoise", description="Bayesian weight noise for JAX and Flax."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="the whole pipeline from a YAML config: train under noise, SGLD moments (and EM), "
        "pruning curves, plots and results.json",
    )
    run.add_argument("config", help="a YAML config, e.g. configs/digits.yaml")
    run.add_argument(
        "--out", default=None, help="output folder (default: the config's, or runs/NAME)"
    )
    run.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.epochs=5 (repeatable)",
    )
    run.add_argument("--no-resume", action="store_true", help="ignore finished stages' checkpoints")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=_run)
    bench = sub.add_parser("bench", help="run a benchmark suite and write its results as JSON")
    bench.add_argument(
        "--suite",
        default="sgld",
        choices=["sgld", "prune", "em", "pipeline", "rng"],
        help="the suite to run (default: %(default)s)",
    )
    bench.add_argument("--out", default=None, help="a JSON file for the results (default: none)")
    bench.set_defaults(func=_bench)
    return parser


def _show_log() -> logging.Handler:
    """The library reports through the "bayesnoise" logger; the command line shows its
    messages (stage progress, warnings, the results table) on stdout."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("bayesnoise")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = _show_log()
    try:
        return args.func(args)
    finally:
        logging.getLogger("bayesnoise").removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
