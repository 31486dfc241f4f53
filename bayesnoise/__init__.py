"""bayesnoise: Bayesian weight noise for JAX and Flax.

Multiplicative noise on a layer's inputs is, with a Gaussian prior on the weights, a Gaussian
scale mixture prior (Nalisnick, Anandkumar & Smyth, 2015). ``import bayesnoise as bn``.
"""

from bayesnoise._tree import Where as Where
from bayesnoise.sgld import baoab as baoab
from bayesnoise.sgld import polynomial_schedule as polynomial_schedule
from bayesnoise.sgld import psgld as psgld
from bayesnoise.sgld import sgld as sgld

__version__ = "0.1.0"

# Every module is loaded on first use (``bn.gsm``, ``bn.nn``, ...), so ``import bayesnoise`` loads
# jax and optax only: Flax imports pyyaml and numpyro imports tqdm when they load. The application
# (the experiment pipeline and its config, the benchmarks) lives in subpackages; ``bn.config`` is
# the pipeline's config.
_CORE = (
    "data",
    "distill",
    "em",
    "gsm",
    "inference",
    "io",
    "laplace",
    "moments",
    "nn",
    "noise",
    "penalties",
    "prune",
    "sampling",
    "train",
)
_LAZY = {
    **{name: f"bayesnoise.{name}" for name in _CORE},
    "pipeline": "bayesnoise.pipeline",
    "config": "bayesnoise.pipeline.config",
    "bench": "bayesnoise.bench",
}
__all__ = [*_CORE, "Where", "baoab", "polynomial_schedule", "psgld", "sgld"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(_LAZY[name])
    raise AttributeError(f"module 'bayesnoise' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
