"""Real-data checks on MNIST: run with `make test-slow` (minutes on a CPU)."""

import os
from pathlib import Path

import pytest

from bayesnoise.pipeline.experiments import mnist_noise_run

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist.pkl.gz"
MNIST = os.environ.get("BAYESNOISE_MNIST") or (str(SHARED) if SHARED.exists() else None)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bernoulli", "gaussian", "beta"])
def test_mlp_under_noise_reaches_two_percent(kind):
    result = mnist_noise_run(kind, epochs=40, path=MNIST, progress=False)
    assert result["test_error_weight_scaling"] <= 0.020, result
    # Monte Carlo averaging with 16 draws stays close to weight scaling
    assert abs(result["mc_minus_weight_scaling"]) < 0.01, result
