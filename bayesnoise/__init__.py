"""bayesnoise: Bayesian weight noise for JAX and Flax.

Multiplicative noise on a layer's inputs is, with a Gaussian prior on the weights, a Gaussian
scale mixture prior (Nalisnick, Anandkumar & Smyth, 2015). ``import bayesnoise as bn``.
"""

from bayesnoise import data as data
from bayesnoise import distill as distill
from bayesnoise import em as em
from bayesnoise import gsm as gsm
from bayesnoise import inference as inference
from bayesnoise import io as io
from bayesnoise import laplace as laplace
from bayesnoise import moments as moments
from bayesnoise import nn as nn
from bayesnoise import noise as noise
from bayesnoise import penalties as penalties
from bayesnoise import prune as prune
from bayesnoise import sampling as sampling
from bayesnoise import train as train
from bayesnoise._tree import Where as Where
from bayesnoise.sgld import polynomial_schedule as polynomial_schedule
from bayesnoise.sgld import psgld as psgld
from bayesnoise.sgld import sgld as sgld

__version__ = "0.1.0"

# The application (the experiment pipeline and its config, the benchmarks) lives in subpackages
# loaded on first use of ``bn.pipeline`` / ``bn.bench``; ``bn.config`` is the pipeline's config.
_LAZY = {
    "pipeline": "bayesnoise.pipeline",
    "config": "bayesnoise.pipeline.config",
    "bench": "bayesnoise.bench",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(_LAZY[name])
    raise AttributeError(f"module 'bayesnoise' has no attribute {name!r}")
