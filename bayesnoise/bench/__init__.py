"""Benchmarks: a registry of suites, each a function returning a JSON-able dict.

``bayesnoise bench --suite sgld --out bench.json`` (or :func:`main`) runs one suite and writes
``{"<suite>": {...}, "device": ..., "platform": ..., "num_devices": ..., "cpu_count": ...,
"machine": ..., "jax": ..., "seconds": ...}``. Suites register themselves with :func:`register`;
:data:`SUITES` maps their names to the functions. One module per suite:

- :mod:`~bayesnoise.bench.sgld`: the sampler's steps per second for 1 to 64 chains, against
  BlackJAX's ``sgld``;
- :mod:`~bayesnoise.bench.prune`: a whole pruning curve in one call against a Python loop;
- :mod:`~bayesnoise.bench.em`: one EM iteration, and the default E-step;
- :mod:`~bayesnoise.bench.pipeline`: the experiment pipeline end to end, per stage;
- :mod:`~bayesnoise.bench.rng`: the SGLD noise draw, a hand-written Threefry against
  ``jax.random.normal`` with each of JAX's key implementations.

Every figure is a median over repeats after a warm-up call, timed to ``block_until_ready``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

# Importing the suite modules registers them.
from bayesnoise.bench import em, pipeline, prune, rng, sgld  # noqa: F401
from bayesnoise.bench._common import SUITES, machine_info, register

__all__ = ["SUITES", "register", "main"]


def main(suite: str = "sgld", out: str | os.PathLike | None = None, **kwargs) -> dict[str, Any]:
    """Runs one suite and returns (and with ``out``, writes as JSON) its results.

    Args:
        suite: a name in :data:`SUITES`.
        out: a file to write the JSON to; None prints it only.
        **kwargs: passed to the suite function.

    Returns:
        ``{suite: the suite's dict, **machine info, "seconds": the whole run's seconds}``.

    Raises:
        ValueError: for an unknown suite.
    """
    if suite not in SUITES:
        raise ValueError(f"unknown benchmark suite {suite!r}; known suites: {sorted(SUITES)}.")
    start = time.perf_counter()
    result = {suite: SUITES[suite](**kwargs), **machine_info(), "seconds": None}
    result["seconds"] = time.perf_counter() - start
    text = json.dumps(result, indent=2, default=float)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    print(text)
    return result
