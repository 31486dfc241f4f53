import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, stats

import bayesnoise as bn


def regression_data(key, n=40, d=5, k=None):
    kx, kw, ky = jax.random.split(key, 3)
    x = jax.random.normal(kx, (n, d))
    w = jax.random.normal(kw, (d,) if k is None else (d, k))
    y = x @ w + 0.3 * jax.random.normal(ky, (n,) if k is None else (n, k))
    return x, w * 0.8, y


@pytest.mark.parametrize(
    "noise",
    [bn.noise.Gaussian(0.4), bn.noise.Bernoulli(0.6), bn.noise.Beta(3.0, 2.0)],
    ids=["gaussian", "bernoulli", "beta"],
)
@pytest.mark.parametrize("k", [None, 3])
def test_linear_penalty_equals_monte_carlo(noise, k):
    x, w, y = regression_data(jax.random.key(0), k=k)
    n_mc = 40_000

    def noisy_loss(key):
        lam = noise.sample(key, x.shape)  # one λ per example and input unit
        return 0.5 * jnp.sum((y - (lam * x) @ w) ** 2)

    losses = np.asarray(jax.vmap(noisy_loss)(jax.random.split(jax.random.key(1), n_mc)), np.float64)
    closed = float(bn.penalties.expected_linear_loss(w, x, y, noise))
    se = losses.std() / math.sqrt(n_mc)
    assert abs(losses.mean() - closed) < 3 * se
    # the penalty is not negligible at this noise level: without it the check fails
    clean = 0.5 * float(jnp.sum((y - noise.mean * (x @ w)) ** 2))
    assert abs(losses.mean() - clean) > 10 * se


def test_linear_penalty_formula_with_variance():
    x, w, _ = regression_data(jax.random.key(2))
    want = 0.5 * 0.3 * float(np.sum(np.asarray(w) ** 2 * np.sum(np.asarray(x) ** 2, axis=0)))
    assert float(bn.penalties.linear_regression(w, x, 0.3)) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="variance must be >= 0, got -0.1"):
        bn.penalties.linear_regression(w, x, -0.1)


def _exact_logistic(w, x, y, s2, b):
    """E over Gaussian λ of the logistic loss: η̃_i ~ N(η_i, s² Σ_j x_ij² w_j²) exactly,
    integrated by Gauss–Hermite quadrature."""
    x, w, y = (np.asarray(a, np.float64) for a in (x, w, y))
    eta = x @ w + b
    sd = np.sqrt(s2 * (x**2) @ (w**2))
    nodes, weights = np.polynomial.hermite_e.hermegauss(120)
    weights = weights / weights.sum()
    e = eta[:, None] + sd[:, None] * nodes[None, :]
    softplus = np.logaddexp(0.0, e)
    return float(np.sum((softplus * weights).sum(1) - y * eta))


def logistic_data():
    x, w, _ = regression_data(jax.random.key(4), n=60, d=4)
    p = jax.nn.sigmoid(x @ w)
    y = jax.random.bernoulli(jax.random.key(5), p).astype(jnp.float32)
    return x, w, y


def test_quadrature_reference_agrees_with_monte_carlo():
    x, w, y = logistic_data()
    noise = bn.noise.Gaussian(0.5)
    n_mc = 40_000

    def noisy(key):
        lam = noise.sample(key, x.shape)
        eta = (lam * x) @ w + 0.2
        return jnp.sum(jax.nn.softplus(eta) - y * eta)

    losses = np.asarray(jax.vmap(noisy)(jax.random.split(jax.random.key(6), n_mc)), np.float64)
    exact = _exact_logistic(w, x, y, 0.5, 0.2)
    assert abs(losses.mean() - exact) < 3 * losses.std() / math.sqrt(n_mc)


def test_logistic_approximation_error_shrinks_with_variance():
    x, w, y = logistic_data()
    errors, rel = [], []
    for s2 in (0.8, 0.2, 0.05, 0.0125):
        approx = float(bn.penalties.approx_expected_logistic_loss(w, x, y, s2, b=0.2))
        exact = _exact_logistic(w, x, y, s2, 0.2)
        clean = float(bn.penalties.approx_expected_logistic_loss(w, x, y, 0.0, b=0.2))
        errors.append(abs(approx - exact))
        rel.append(abs(approx - exact) / (exact - clean))
    assert all(a > b for a, b in zip(errors, errors[1:]))
    # the error is higher order: relative to the true penalty it vanishes too
    assert rel[-1] < 0.02 and rel[-1] < rel[0] / 8


def test_logistic_penalty_formula():
    x, w, _ = logistic_data()
    p = np.asarray(jax.nn.sigmoid(x @ w + 0.1), np.float64)
    want = 0.5 * 0.3 * np.sum(p * (1 - p) * (np.asarray(x) ** 2 @ np.asarray(w) ** 2))
    got = float(bn.penalties.logistic_regression(w, x, bn.noise.Gaussian(0.3), b=0.1))
    assert got == pytest.approx(want, rel=1e-5)


def _tree_and_hierarchy(sigma0):
    params = {
        "a": {"kernel": jax.random.normal(jax.random.key(0), (6, 4)), "bias": jnp.ones(4)},
        "b": {"kernel": 0.1 * jax.random.normal(jax.random.key(1), (4, 3))},
    }
    return params, bn.gsm.hierarchy(params, sigma0=sigma0)


@pytest.mark.parametrize("sigma0", [0.5, 1.0, 3.0])
def test_eq14_is_neg_log_prior_at_ml2_scales(sigma0):
    v, h = _tree_and_hierarchy(sigma0)
    want = 0.0
    for name in ("a", "b"):
        k = np.asarray(v[name]["kernel"], np.float64)
        d = k.shape[1]
        lam = np.sqrt((k**2).sum(1) / (sigma0**2 * d))  # the M-step, from V itself
        want -= stats.norm.logpdf(k, 0, sigma0 * lam[:, None]).sum()
    got = float(bn.penalties.ml2_neg_log_prior(v, h))
    assert got == pytest.approx(want, rel=1e-5)


def test_eq14_scales_minimise_the_neg_log_prior():
    v, h = _tree_and_hierarchy(1.0)
    k = np.asarray(v["a"]["kernel"], np.float64)[0]
    res = optimize.minimize_scalar(
        lambda log_lam: -stats.norm.logpdf(k, 0, np.exp(log_lam)).sum(),
        bounds=(-8, 4),
        method="bounded",
        options={"xatol": 1e-10},
    )
    one_row = {"kernel": jnp.asarray(k[None, :])}
    got = float(bn.penalties.ml2_neg_log_prior(one_row, bn.gsm.hierarchy(one_row)))
    assert got == pytest.approx(res.fun, rel=1e-6)


def test_eq15_and_eq16_drop_only_constants():
    v, h = _tree_and_hierarchy(1.0)
    const = sum(0.5 * d * (1 + math.log(2 * math.pi / d)) * rows for rows, d in ((6, 4), (4, 3)))
    eq14 = float(bn.penalties.ml2_neg_log_prior(v, h))
    eq15 = float(bn.penalties.log_norm(v, h))
    assert eq14 - eq15 == pytest.approx(const, rel=1e-5)
    lam = jax.tree.map(lambda s: jnp.linspace(0.5, 2.0, s.shape[0]), h.scales)
    h2 = h.replace(scales=lam)
    w = bn.gsm.from_identifiable(v, h2)
    eq16 = float(bn.penalties.log_norm_unidentifiable(w, h2))
    assert eq16 == pytest.approx(eq15, rel=1e-5)
    # and its gradient in v matches eq. 14's
    g14 = jax.grad(bn.penalties.ml2_neg_log_prior)(v, h)
    g15 = jax.grad(bn.penalties.log_norm)(v, h)
    np.testing.assert_allclose(g14["a"]["kernel"], g15["a"]["kernel"], rtol=1e-5)
