"""Soft-target students: sizes by weight count, and the distillation loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax, softmax

from bayesnoise import distill


@pytest.mark.parametrize("sizes", [(784, 400, 400, 10), (10, 7, 3), (50, 8, 8, 8, 2)])
@pytest.mark.parametrize("budget", [1, 500, 12_345, 300_000])
@pytest.mark.parametrize("biases", [False, True])
def test_student_sizes_brute_force(sizes, budget, biases):
    got = distill.student_sizes(sizes, budget, biases=biases)
    assert len(got) == len(sizes) and got[0] == sizes[0] and got[-1] == sizes[-1]
    assert len(set(got[1:-1])) == 1

    def count(h):
        return distill.weight_count(
            (sizes[0],) + (h,) * (len(sizes) - 2) + (sizes[-1],), biases=biases
        )

    best = min(range(1, min(budget, 30_000) + 2), key=lambda h: (abs(count(h) - budget), h))
    assert got[1] == best


def test_weight_count():
    assert distill.weight_count((784, 400, 400, 10)) == 784 * 400 + 400 * 400 + 4000
    assert distill.weight_count((3, 2), biases=True) == 8


def numpy_loss(z, t, y, temperature, alpha):
    p = softmax(t / temperature, -1)
    kl = np.sum(p * (np.log(p) - log_softmax(z / temperature, -1)), -1)
    hard = -log_softmax(z, -1)[np.arange(len(y)), y]
    return (1 - alpha) * temperature**2 * kl.mean() + alpha * hard.mean()


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.0), (3.0, 0.0), (4.0, 0.3), (2.0, 1.0)])
def test_soft_target_loss_matches_numpy(temperature, alpha):
    z = np.asarray(jax.random.normal(jax.random.key(0), (8, 5)), np.float64) * 3
    t = np.asarray(jax.random.normal(jax.random.key(1), (8, 5)), np.float64) * 3
    y = np.arange(8) % 5
    got = distill.soft_target_loss(z, t, y, temperature=temperature, alpha=alpha)
    np.testing.assert_allclose(got, numpy_loss(z, t, y, temperature, alpha), rtol=1e-5)
    onehot = np.eye(5)[y]
    np.testing.assert_allclose(
        distill.soft_target_loss(z, t, onehot, temperature=temperature, alpha=alpha), got, rtol=1e-5
    )
    assert abs(float(distill.soft_target_loss(t, t, temperature=temperature))) < 1e-5


def test_soft_target_gradient():
    z = jax.random.normal(jax.random.key(0), (6, 4)) * 2
    t = jax.random.normal(jax.random.key(1), (6, 4)) * 2
    temperature = 3.0
    gz, gt = jax.grad(distill.soft_target_loss, argnums=(0, 1))(z, t, temperature=temperature)
    z64, t64 = np.asarray(z, np.float64), np.asarray(t, np.float64)
    expected = (softmax(z64 / temperature, -1) - softmax(t64 / temperature, -1)) * temperature
    np.testing.assert_allclose(gz, expected / 6, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(gt, 0.0)  # the teacher is held fixed


def test_soft_target_bad_inputs():
    z = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="labels"):
        distill.soft_target_loss(z, z, alpha=0.5)
    with pytest.raises(ValueError, match="-1"):
        distill.soft_target_loss(z, z, temperature=-1.0)
    with pytest.raises(ValueError, match="1.5"):
        distill.soft_target_loss(z, z, jnp.zeros(2, int), alpha=1.5)
    with pytest.raises(ValueError, match=r"\(7,\)"):
        distill.student_sizes((7,), 100)
