import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, optimize, stats

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
    n_mc = 10_000  # the penalty is still 80-700 standard errors from the noise-free loss

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
    with pytest.raises(
        ValueError, match=r"noise \(the noise variance\) must be a finite number >= 0, got -0.1"
    ):
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


def _posterior_variance(seed=7):
    """A non-zero Var[v] per weight, of the order of the squared means of each leaf."""
    rng = np.random.default_rng(seed)
    return {
        "a": {
            "kernel": jnp.asarray(rng.uniform(0.2, 1.0, (6, 4)), jnp.float32),
            "bias": jnp.asarray(rng.uniform(0.1, 0.5, 4), jnp.float32),
        },
        "b": {"kernel": jnp.asarray(rng.uniform(0.002, 0.02, (4, 3)), jnp.float32)},
    }


def _kernels(tree):
    return [np.asarray(tree[name]["kernel"], np.float64) for name in ("a", "b")]


def _ml2_scales(mean, var, sigma0):
    """The M-step without a hyperprior, in numpy: λ̂_j² = Σ_k (μ_jk² + s²_jk) / (σ0² d)."""
    return np.sqrt((mean**2 + var).sum(1) / (sigma0**2 * mean.shape[1]))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("sigma0", [0.5, 1.0, 3.0])
def test_eq14_equals_monte_carlo_over_the_posterior(sigma0, jit):
    mean, h = _tree_and_hierarchy(sigma0)
    var = _posterior_variance()
    f = jax.jit(bn.penalties.ml2_neg_log_prior) if jit else bn.penalties.ml2_neg_log_prior
    got = float(f(mean, h, var))

    rng = np.random.default_rng(0)
    n_mc = 20_000
    draws = np.zeros(n_mc)
    exact = 0.0
    for mu, s2 in zip(_kernels(mean), _kernels(var)):
        lam = _ml2_scales(mu, s2, sigma0)[:, None]
        v = mu + np.sqrt(s2) * rng.standard_normal((n_mc, *mu.shape))
        draws -= stats.norm.logpdf(v, 0.0, sigma0 * lam).sum(axis=(1, 2))
        # the same expectation in closed form, weight by weight
        exact += (-stats.norm.logpdf(mu, 0.0, sigma0 * lam) + s2 / (2 * sigma0**2 * lam**2)).sum()
    se = draws.std() / math.sqrt(n_mc)
    assert abs(draws.mean() - got) < 4 * se
    assert got == pytest.approx(exact, rel=1e-5)
    # the posterior variance matters: dropping it (the plug-in form) misses by far
    plug_in = float(bn.penalties.ml2_neg_log_prior(mean, h))
    assert abs(draws.mean() - plug_in) > 50 * se


@pytest.mark.parametrize("sigma0", [0.5, 1.0, 3.0])
def test_eq14_without_variance_is_neg_log_prior_at_ml2_scales(sigma0):
    v, h = _tree_and_hierarchy(sigma0)
    want = 0.0
    for k in _kernels(v):
        lam = _ml2_scales(k, 0.0, sigma0)  # the M-step, from V itself
        want -= stats.norm.logpdf(k, 0, sigma0 * lam[:, None]).sum()
    zeros = jax.tree.map(jnp.zeros_like, v)
    assert float(bn.penalties.ml2_neg_log_prior(v, h)) == pytest.approx(want, rel=1e-5)
    assert float(bn.penalties.ml2_neg_log_prior(v, h, zeros)) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("sigma0", [0.5, 2.0])
def test_eq14_scales_minimise_the_expected_neg_log_prior(sigma0):
    mean, _ = _tree_and_hierarchy(sigma0)
    mu = np.asarray(mean["a"]["kernel"], np.float64)[0]
    s2 = np.asarray(_posterior_variance()["a"]["kernel"], np.float64)[0]

    def expected(log_lam):  # E_q[−log p(v | λ)] for one row, as a function of λ
        sd = sigma0 * np.exp(log_lam)
        return (-stats.norm.logpdf(mu, 0, sd) + s2 / (2 * sd**2)).sum()

    res = optimize.minimize_scalar(
        expected, bounds=(-8, 4), method="bounded", options={"xatol": 1e-10}
    )
    one_row = {"kernel": jnp.asarray(mu[None, :], jnp.float32)}
    one_var = {"kernel": jnp.asarray(s2[None, :], jnp.float32)}
    h = bn.gsm.hierarchy(one_row, sigma0=sigma0)
    got = float(bn.penalties.ml2_neg_log_prior(one_row, h, one_var))
    assert got == pytest.approx(res.fun, rel=1e-6)
    assert np.exp(res.x) == pytest.approx(_ml2_scales(mu[None], s2[None], sigma0)[0], rel=1e-4)


def test_eq15_is_eq14_without_constants():
    _, h = _tree_and_hierarchy(1.0)
    const = sum(0.5 * d * (1 + math.log(2 * math.pi / d)) * rows for rows, d in ((6, 4), (4, 3)))
    rng = np.random.default_rng(3)
    shapes = _tree_and_hierarchy(1.0)[0]
    for trial in range(4):
        scale = 1.0 + trial
        mean = jax.tree.map(
            lambda x, scale=scale: jnp.asarray(rng.normal(0, scale, x.shape), jnp.float32),
            shapes,
        )
        var = _posterior_variance(seed=trial) if trial else None
        eq14 = float(bn.penalties.ml2_neg_log_prior(mean, h, var))
        eq15 = float(bn.penalties.log_norm(mean, h, var))
        # the difference depends on the shapes only, not on V nor its variance
        assert eq14 - eq15 == pytest.approx(const, abs=2e-4)
        s2 = _kernels(var) if var is not None else [0.0, 0.0]
        want = sum(
            0.5 * mu.shape[1] * np.log((mu**2 + v2).sum(1)).sum()
            for mu, v2 in zip(_kernels(mean), s2)
        )
        assert eq15 == pytest.approx(want, rel=1e-5)
    # hence the same gradient, in the means and in the variances
    mean, var = _tree_and_hierarchy(1.0)[0], _posterior_variance()
    g14 = jax.grad(bn.penalties.ml2_neg_log_prior, argnums=(0, 2))(mean, h, var)
    g15 = jax.grad(bn.penalties.log_norm, argnums=(0, 2))(mean, h, var)
    chex.assert_trees_all_close(g14, g15, rtol=1e-5, atol=1e-7)
    # d eq15 / d Var[v_jk] = d_j / (2 S_j): variance counts like squared signal
    mu, s2 = _kernels(mean)[0], _kernels(var)[0]
    want = np.broadcast_to(0.5 * 4 / (mu**2 + s2).sum(1, keepdims=True), mu.shape)
    np.testing.assert_allclose(g15[1]["a"]["kernel"], want, rtol=1e-5)


def test_eq16_is_eq15_at_v_equals_lambda_w():
    w, h = _tree_and_hierarchy(1.0)
    lam = jax.tree.map(lambda s: jnp.linspace(0.5, 2.0, s.shape[0]), h.scales)
    h2 = h.replace(scales=lam)
    var_w = _posterior_variance(seed=11)
    # v = λ w and Var[v] = λ² Var[w], row by row, in numpy
    v, var_v, want = {}, {}, 0.0
    for name in ("a", "b"):
        k = np.asarray(w[name]["kernel"], np.float64)
        s2 = np.asarray(var_w[name]["kernel"], np.float64)
        row = np.asarray(lam[name]["kernel"], np.float64)[:, None]
        v[name] = {"kernel": jnp.asarray(row * k, jnp.float32)}
        var_v[name] = {"kernel": jnp.asarray(row**2 * s2, jnp.float32)}
        want += (k.shape[1] * (np.log(row[:, 0]) + 0.5 * np.log((k**2 + s2).sum(1)))).sum()
    v["a"]["bias"], var_v["a"]["bias"] = w["a"]["bias"], var_w["a"]["bias"]
    eq15 = float(bn.penalties.log_norm(v, h2, var_v))
    eq16 = float(bn.penalties.log_norm_unidentifiable(w, h2, var_w))
    assert eq16 == pytest.approx(eq15, rel=1e-5)
    assert eq16 == pytest.approx(want, rel=1e-5)
    # without the variance the two sides differ: it is not ignored
    assert abs(float(bn.penalties.log_norm_unidentifiable(w, h2)) - eq16) > 1.0


def test_variance_of_leaves_not_noised_is_ignored():
    mean, h = _tree_and_hierarchy(1.0)
    var = _posterior_variance()
    other = jax.tree.map(lambda x: x, var)
    other["a"]["bias"] = 100.0 * other["a"]["bias"]
    for f in (bn.penalties.ml2_neg_log_prior, bn.penalties.log_norm):
        assert float(f(mean, h, var)) == float(f(mean, h, other))


def test_bad_variance_is_rejected():
    mean, h = _tree_and_hierarchy(1.0)
    var = _posterior_variance()
    negative = jax.tree.map(lambda x: x, var)
    negative["b"]["kernel"] = negative["b"]["kernel"].at[1, 2].set(-0.25)
    with pytest.raises(ValueError, match=r"finite and >= 0.*'b/kernel'.*-0\.25"):
        bn.penalties.ml2_neg_log_prior(mean, h, negative)
    not_finite = jax.tree.map(lambda x: x, var)
    not_finite["a"]["kernel"] = not_finite["a"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"finite and >= 0.*'a/kernel'.*nan"):
        bn.penalties.log_norm(mean, h, not_finite)
    with pytest.raises(ValueError, match="variance tree does not match the params tree"):
        bn.penalties.log_norm(mean, h, {"a": var["a"]})
    wrong_shape = jax.tree.map(lambda x: x, var)
    wrong_shape["a"]["kernel"] = var["a"]["kernel"][:, :2]
    with pytest.raises(ValueError, match=r"'a/kernel' has shape \(6, 2\).*\(6, 4\)"):
        bn.penalties.log_norm_unidentifiable(mean, h, wrong_shape)


# ---------------------------------------------------------------- KL to the log-uniform prior


def _exact_neg_kl(log_alpha):
    """½ log α − E_{ε~N(1,α)} log|ε|, the α-dependent part of −KL(N(θ, αθ²) ‖ log-uniform),
    by quadrature. With ε = √α (z + m), m = α^(-1/2), z ~ N(0, 1), it is −E log|z + m|
    = −∫_0^∞ log t [φ(t − m) + φ(t + m)] dt, integrated piecewise around the peak at t = m
    (the log singularity at t = 0 is integrable, at an endpoint)."""
    m = math.exp(-0.5 * log_alpha)

    def f(t):
        return math.log(t) * (stats.norm.pdf(t - m) + stats.norm.pdf(t + m))

    cuts = sorted({0.0, max(m - 40.0, 0.0), m, m + 40.0})
    parts = [
        integrate.quad(f, a, b, epsabs=1e-12, epsrel=1e-10, limit=200)
        for a, b in zip(cuts, cuts[1:])
    ]
    return -sum(value for value, _ in parts)


def test_kl_log_uniform_matches_numerical_integration():
    """Molchanov et al.'s fit is within 0.01 of the exact KL over log α in [-20, 20]; the
    constant k1 is the one that makes KL → 0 as α → ∞, (γ + log 2)/2."""
    grid = np.linspace(-20.0, 20.0, 41)
    exact = np.array([_exact_neg_kl(la) for la in grid]) - 0.63576  # C = −k1
    approx = -np.asarray(bn.penalties.kl_log_uniform(jnp.asarray(grid)), np.float64)
    assert np.abs(approx - exact).max() < 0.01
    assert abs((np.euler_gamma + math.log(2)) / 2 - 0.63576) < 1e-3
    # the exact −KL really varies by ~10 nats over the grid: the check is not vacuous
    assert exact.max() - exact.min() > 9.0


@pytest.mark.parametrize("jit", [False, True])
def test_kl_log_uniform_is_stable_and_decreasing(jit):
    kl = jax.jit(bn.penalties.kl_log_uniform) if jit else bn.penalties.kl_log_uniform
    grid = jnp.linspace(-20.0, 20.0, 401)
    values = np.asarray(kl(grid))
    grads = np.asarray(jax.vmap(jax.grad(kl))(grid))
    assert np.all(np.isfinite(values)) and np.all(np.isfinite(grads))
    assert np.all(np.diff(values) < 0) and np.all(grads < 0)
    assert values[-1] == pytest.approx(0.0, abs=1e-8)  # KL → 0 as α → ∞
    assert values[0] == pytest.approx(0.63576 + 10.0, abs=1e-4)  # ≈ k1 − ½ log α for α → 0
    # the formula with the logs written out, where it is well conditioned
    mid = np.linspace(-5.0, 5.0, 11)
    direct = (
        0.63576 - 0.63576 / (1 + np.exp(-(1.87320 + 1.48695 * mid))) + 0.5 * np.log1p(np.exp(-mid))
    )
    np.testing.assert_allclose(np.asarray(kl(jnp.asarray(mid))), direct, rtol=1e-5)


@pytest.mark.parametrize("per", ["row", "weight"])
def test_learned_noise_kl_has_one_term_per_weight_or_row(per):
    model = bn.nn.MLP((5, 3))
    vd = bn.nn.learned_noise(model, per, init_log_alpha=-2.0)
    params = vd.init(jax.random.key(0), jnp.ones((1, 4)))
    terms = (4 + 5) if per == "row" else (4 * 5 + 5 * 3)
    one = float(bn.penalties.kl_log_uniform(-2.0))
    assert float(bn.penalties.learned_noise_kl(params)) == pytest.approx(terms * one, rel=1e-5)
    # from the raw leaves: log α = log σ² − log θ² per weight, the parameter per row
    layer = params["params"]["Dense_1"]
    if per == "weight":
        layer["log_sigma2"] = layer["log_sigma2"].at[0, 0].add(1.0)
        want = (terms - 1) * one + float(bn.penalties.kl_log_uniform(-1.0))
    else:
        layer["log_alpha"] = layer["log_alpha"].at[0].add(1.0)
        want = (terms - 1) * one + float(bn.penalties.kl_log_uniform(-1.0))
    got = float(jax.jit(bn.penalties.learned_noise_kl)(params))
    assert got == pytest.approx(want, rel=1e-5)
    grads = jax.grad(bn.penalties.learned_noise_kl)(params)
    name = "log_alpha" if per == "row" else "log_sigma2"
    assert float(jnp.abs(grads["params"]["Dense_0"][name]).min()) > 0


def test_learned_noise_kl_without_learned_noise():
    params = bn.nn.MLP((5, 3)).init(jax.random.key(0), jnp.ones((1, 4)))
    with pytest.raises(ValueError, match="hold no learned noise.*params/Dense_0/kernel"):
        bn.penalties.learned_noise_kl(params)
