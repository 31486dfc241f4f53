"""The ``pipeline`` suite: the experiment pipeline end to end, fresh, seconds per stage.

By default it runs :data:`DIGITS`, a small config on scikit-learn's bundled 8x8 digits (no
download, a minute or two on a laptop CPU) built here in code, so that the suite runs the same
from a source tree and from an installed package. Any other config can be given as a YAML file
(``config=`` or ``$BAYESNOISE_BENCH_CONFIG``) or a mapping.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from bayesnoise.bench._common import register

# configs/digits.yaml with fewer epochs, steps, chains and fractions: every stage runs, briefly.
DIGITS: dict[str, Any] = {
    "name": "digits-bench",
    "data": {"name": "digits", "options": {"test_fraction": 0.3, "seed": 0}},
    "model": {"hidden_sizes": [128, 128], "activation": "relu"},
    "noise": {"kind": "bernoulli", "keep": 0.7, "input": {"kind": "bernoulli", "keep": 0.9}},
    "train": {"epochs": 10, "batch_size": 64, "learning_rate": 3.0e-3, "seed": 0},
    "sgld": {"step_size": "auto", "chains": 2, "batch_size": 128, "max_steps": 2000},
    "em": {"enabled": True, "iterations": 1},
    "prune": {"rules": ["snr", "spr", "magnitude"], "num_fractions": 20, "moments": "laplace"},
    "eval": {"tolerance": 0.01, "mc_samples": 4, "allow_unconverged": True},
}


@register("pipeline")
def pipeline_suite(config: str | os.PathLike | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The whole pipeline end to end, fresh, into a temporary folder: seconds per stage.

    Args:
        config: a YAML file or a mapping for :func:`bayesnoise.pipeline.config.load_config`;
            None: ``$BAYESNOISE_BENCH_CONFIG`` when set, else :data:`DIGITS`.

    Returns:
        ``{"config", "seconds", "stages", "unpruned", "breakpoints"}``: the config's file or
        name, the total seconds, the seconds of every stage, the unpruned metric and the
        fractions removed within the tolerance per pruning rule.
    """
    from bayesnoise import pipeline
    from bayesnoise.pipeline import config as bconfig

    source = config or os.environ.get("BAYESNOISE_BENCH_CONFIG") or DIGITS
    cfg = bconfig.load_config(source)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        res = pipeline.run(cfg, out, resume=False, progress=False)
        total = time.perf_counter() - start
    return {
        "config": cfg.name if isinstance(source, Mapping) else str(source),
        "seconds": total,
        "stages": res["timings"],
        "unpruned": res["unpruned"],
        "breakpoints": res["breakpoints"],
    }
