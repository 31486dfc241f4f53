"""The ``bayesnoise`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _run(args: argparse.Namespace) -> int:
    from bayesnoise import pipeline
    from bayesnoise.pipeline import config

    overrides = list(args.set or ())
    if args.seeds is not None:
        if args.seeds < 1:
            from bayesnoise.pipeline.runfolder import UsageError

            raise UsageError(
                f"--seeds: got {args.seeds}; allowed: an int >= 1 (the number of seeds, "
                f"train.seed, train.seed + 1, ...)."
            )
        overrides.append(f"train.seeds={args.seeds}")
    cfg = config.load_config(args.config, overrides)
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
    run.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="K",
        help="run K seeds (train.seed, train.seed + 1, ...) and report mean ± sd over them "
        "(sets train.seeds)",
    )
    run.add_argument("--no-resume", action="store_true", help="ignore finished stages' checkpoints")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    run.set_defaults(func=_run)
    bench = sub.add_parser("bench", help="run a benchmark suite and write its results as JSON")
    bench.add_argument(
        "--suite",
        default="sgld",
        choices=["sgld", "prune", "em", "pipeline", "rng"],
        help="the suite to run (default: %(default)s)",
    )
    bench.add_argument("--out", default=None, help="a JSON file for the results (default: none)")
    bench.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
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
    """The command line. A user error is one line on stderr and an exit status: 2 for a bad
    config or argument, 1 for a failed run (divergence, unreadable data, unconverged chains
    before pruning, a run folder in use), 130 for Ctrl-C. ``--debug`` shows the traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = _show_log()
    prog = f"{parser.prog} {args.command}"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(
            f"\n{prog}: interrupted. Finished stages are saved: rerunning the same command "
            f"resumes from them.",
            file=sys.stderr,
        )
        return 130
    except Exception as e:
        if args.debug:
            raise
        from bayesnoise.pipeline.runfolder import RunError

        # ConfigError and UsageError carry 2, RunError 1; anything else is a failed run
        code = getattr(e, "exit_code", 1)
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        hint = ""
        if code != 2 and not isinstance(e, RunError):
            message = f"{type(e).__name__}: {message}"
            hint = " (--debug shows the traceback)"
        print(f"{prog}: {message}{hint}", file=sys.stderr)
        return code
    finally:
        logging.getLogger("bayesnoise").removeHandler(handler)


def entry() -> None:
    """The ``bayesnoise`` console script: :func:`main`, then exit with its status.

    After Ctrl-C the process leaves with ``os._exit`` once its output is flushed: the
    interpreter's normal shutdown can crash while XLA's threads are still busy with the
    computation that was interrupted, turning status 130 into a segmentation fault.
    """
    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
