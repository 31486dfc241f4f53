import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, stats

import bayesnoise as bn


def second_moments_tree(key):
    k1, k2, k3 = jax.random.split(key, 3)
    # rows of very different energy, including a nearly empty one
    a = jax.random.gamma(k1, 2.0, (5, 4)) * jnp.array([1e-4, 0.01, 1.0, 10.0, 100.0])[:, None]
    b = jax.random.gamma(k2, 2.0, (3, 2)) * 0.3
    return {"a": {"kernel": a, "bias": jax.random.uniform(k3, (4,))}, "b": {"kernel": b}}


HYPERPRIORS = [
    None,
    bn.noise.InverseGammaScale(2.0, 0.5),
    bn.noise.Gamma(3.0, 2.0),
    bn.noise.LogNormal(-0.5, 0.8),
    bn.noise.Beta(2.0, 1.5),
]


def _scipy_neg_log_hyper(hp, lam):
    """−log p(λ) (or −log p(s), s = λ², for the inverse gamma), from scipy."""
    if hp is None:
        return 0.0
    if isinstance(hp, bn.noise.InverseGammaScale):
        return -stats.invgamma(hp.a, scale=hp.b).logpdf(lam**2)
    if isinstance(hp, bn.noise.Gamma):
        return -stats.gamma(hp.concentration, scale=1 / hp.rate).logpdf(lam)
    if isinstance(hp, bn.noise.LogNormal):
        return -stats.lognorm(hp.scale, scale=math.exp(hp.loc)).logpdf(lam)
    return -stats.beta(hp.a, hp.b).logpdf(lam)


@pytest.mark.parametrize("sigma0", [0.5, 2.0])
@pytest.mark.parametrize("hp", HYPERPRIORS, ids=lambda h: type(h).__name__)
def test_m_step_is_the_argmin_of_q(hp, sigma0):
    sm = second_moments_tree(jax.random.key(0))
    h = bn.gsm.hierarchy(sm, sigma0=sigma0)
    got = jax.jit(lambda sm, h: bn.em.m_step(sm, h, hp))(sm, h)
    for name in ("a", "b"):
        rows = np.asarray(sm[name]["kernel"], np.float64)
        d = rows.shape[1]
        for j, S in enumerate(rows.sum(1)):

            def q(u, S=S, d=d):
                lam = np.exp(u)
                return S / (2 * sigma0**2 * lam**2) + d * u + _scipy_neg_log_hyper(hp, lam)

            hi = math.log(1 - 1e-9) if isinstance(hp, bn.noise.Beta) else 10.0
            grid = np.linspace(-15, hi, 4000)
            u0 = grid[np.argmin(q(grid))]
            res = optimize.minimize_scalar(
                q,
                bounds=(max(u0 - 0.02, -15), min(u0 + 0.02, hi)),
                method="bounded",
                options={"xatol": 1e-12},
            )
            want = math.exp(res.x)
            lam = float(got[name]["kernel"][j])
            assert lam == pytest.approx(want, rel=1e-4), (name, j, S)
            assert q(math.log(lam)) <= res.fun + 1e-6 * abs(res.fun) + 1e-9
    assert got["a"]["bias"] is None


def test_closed_forms():
    sm = second_moments_tree(jax.random.key(1))
    h = bn.gsm.hierarchy(sm, sigma0=1.5)
    S = np.asarray(sm["a"]["kernel"], np.float64).sum(1)
    plain = bn.em.m_step(sm, h)
    np.testing.assert_allclose(plain["a"]["kernel"], np.sqrt(S / (1.5**2 * 4)), rtol=1e-5)
    ig = bn.em.m_step(sm, h, bn.noise.InverseGammaScale(3.0, 0.2))
    s = (S / (2 * 1.5**2) + 0.2) / (4 / 2 + 3.0 + 1)
    np.testing.assert_allclose(ig["a"]["kernel"], np.sqrt(s), rtol=1e-5)


def test_q_value_decreases_at_the_m_step():
    sm = second_moments_tree(jax.random.key(2))
    h = bn.gsm.hierarchy(sm)
    for hp in HYPERPRIORS:
        new = bn.em.m_step(sm, h, hp)
        start = (
            h.scales
            if not isinstance(hp, bn.noise.Beta)
            else jax.tree.map(lambda s: 0.5 * s, h.scales)
        )
        assert float(bn.em.q_value(sm, h, hp, new)) < float(bn.em.q_value(sm, h, hp, start))


def test_em_state_from_a_user_loop():
    params = {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)}
    state = bn.em.init(params, sigma0=1.0)
    samples = [
        jax.tree.map(
            lambda x, i=i: (
                x + i * jnp.arange(12.0).reshape(3, 4)[: x.shape[0]] if x.ndim == 2 else x
            ),
            params,
        )
        for i in range(5)
    ]
    for v in samples:
        state = bn.em.accumulate(state, v)
    new = bn.em.em_step(state)
    stack = np.stack([np.asarray(v["kernel"]) for v in samples])
    want = np.sqrt((stack**2).mean(0).sum(1) / 4)
    np.testing.assert_allclose(new.hierarchy.scales["kernel"], want, rtol=1e-5)
    assert int(new.iteration) == 1 and float(new.moments.count) == 0
    with pytest.raises(ValueError, match="needs posterior samples"):
        bn.em.em_step(new)


def test_linear_em_matches_ard_regression():
    from sklearn.linear_model import ARDRegression

    rng = np.random.default_rng(0)
    n, d = 300, 10
    x = rng.normal(size=(n, d))
    w = np.zeros(d)
    w[[0, 3, 7]] = [2.0, -1.5, 0.8]
    y = x @ w + 0.5 * rng.normal(size=n)
    ard = ARDRegression(fit_intercept=False, max_iter=3000, tol=1e-8, threshold_lambda=1e8)
    ard.fit(x, y)
    res = bn.em.linear_em(x, y, iterations=1000)
    lam = np.asarray(res.scales, np.float64)
    precision = 1.0 / lam**2
    relevant = np.array([0, 3, 7])
    irrelevant = np.setdiff1d(np.arange(d), relevant)
    # same relevance pattern: irrelevant scales go to zero, relevant ones stay
    assert np.all(lam[relevant] > 0.5)
    assert np.all(lam[irrelevant] < 0.1)
    assert np.all(ard.lambda_[irrelevant] > 50)
    # precisions agree within 10% where finite (relevant features)
    np.testing.assert_allclose(precision[relevant], ard.lambda_[relevant], rtol=0.10)
    assert float(res.noise_var) == pytest.approx(1.0 / ard.alpha_, rel=0.10)
    np.testing.assert_allclose(res.mean[relevant], ard.coef_[relevant], rtol=0.02)
    # EM never decreases the evidence
    ev = np.asarray(res.history["log_evidence"])
    assert np.all(np.diff(ev) > -1e-4 * np.abs(ev[:-1]))
    # the evidence formula agrees with a direct n x n computation at the learned values
    cov_y = float(res.noise_var) * np.eye(n) + (x * lam**2) @ x.T
    direct = stats.multivariate_normal(np.zeros(n), cov_y).logpdf(y)
    assert direct == pytest.approx(float(ev[-1]), rel=1e-3)


def test_linear_posterior_matches_numpy():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(20, 3)), rng.normal(size=20)
    pv = np.array([0.5, 2.0, 1.0])
    mean, cov = bn.em.linear_posterior(x, y, pv, 0.3)
    prec = x.T @ x / 0.3 + np.diag(1 / pv)
    np.testing.assert_allclose(cov, np.linalg.inv(prec), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(mean, np.linalg.solve(prec, x.T @ y / 0.3), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- bad input


def test_negative_variances_are_rejected():
    sm = {"kernel": jnp.array([[1.0, -0.5], [1.0, 1.0]])}
    with pytest.raises(ValueError, match=r"leaf 'kernel' has minimum -0.5"):
        bn.em.m_step(sm, bn.gsm.hierarchy(sm))


def test_structure_mismatch_is_rejected():
    h = bn.gsm.hierarchy({"kernel": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match="does not match the params tree"):
        bn.em.m_step({"kernel": jnp.ones((2, 2)), "extra": jnp.ones(3)}, h)
    with pytest.raises(ValueError, match=r"'kernel' have shape \(2,\)"):
        bn.em.m_step({"kernel": jnp.ones((3, 2))}, h)


def test_unsupported_hyperprior():
    h = bn.gsm.hierarchy({"kernel": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match=r"cannot handle the hyperprior Bernoulli.*allowed"):
        bn.em.m_step({"kernel": jnp.ones((2, 2))}, h, bn.noise.Bernoulli(0.5))


def test_numpyro_prior_makes_nuts_an_exact_e_step():
    import flax.linen as nn
    import numpyro
    import numpyro.distributions as dist
    from numpyro.contrib.module import random_flax_module
    from numpyro.infer import MCMC, NUTS

    rng = np.random.default_rng(3)
    n, d = 40, 3
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ np.array([1.0, -0.5, 0.0]) + 0.3 * rng.normal(size=n)).astype(np.float32)
    module = nn.Dense(1, use_bias=False)
    params = module.init(jax.random.key(0), jnp.ones((1, d)))
    h = bn.gsm.hierarchy(params, sigma0=1.0)
    h = h.replace(scales={"params": {"kernel": jnp.array([2.0, 0.5, 0.1])}})

    def model(x, y):
        net = random_flax_module("net", module, input_shape=(1, d), prior=bn.em.numpyro_prior(h))
        numpyro.sample("y", dist.Normal(net(x)[:, 0], 0.3), obs=y)

    mcmc = MCMC(NUTS(model), num_warmup=400, num_samples=2000, progress_bar=False)
    mcmc.run(jax.random.key(1), x, y)
    draws = np.asarray(mcmc.get_samples()["net/kernel"])[:, :, 0]
    mean, cov = bn.em.linear_posterior(x, y, np.array([2.0, 0.5, 0.1]) ** 2, 0.3**2)
    sd = np.sqrt(np.diag(np.asarray(cov)))
    # 2000 draws with ESS of several hundred: within 5 standard errors of the exact posterior
    assert np.all(np.abs(draws.mean(0) - np.asarray(mean)) < 5 * sd / np.sqrt(300))
    np.testing.assert_allclose(draws.std(0), sd, rtol=0.15)


def test_em_fit_in_a_network_keeps_robust_rows_and_shrinks_irrelevant_ones():
    import optax

    rng = np.random.default_rng(0)
    n = 256
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = (np.tanh(1.5 * x[:, 0]) - x[:, 1] + 0.1 * rng.normal(size=n)).astype(np.float32)
    model = bn.nn.MLP((16, 1))
    params = model.init(jax.random.key(0), jnp.ones((1, 6)))
    loss_fn = bn.train.regression_loss(lambda p, xb, k: model.apply(p, xb))
    fitted = bn.train.fit(
        jax.random.key(1),
        params,
        loss_fn,
        optax.adam(1e-2),
        jnp.asarray(x),
        jnp.asarray(y),
        epochs=150,
        batch_size=64,
    ).params

    def log_lik(p, xb, yb):
        return -0.5 * ((model.apply(p, xb)[:, 0] - yb) / 0.1) ** 2

    res = bn.em.fit(
        jax.random.key(2),
        fitted,
        log_lik,
        (jnp.asarray(x), jnp.asarray(y)),
        iterations=3,
        method="sgld",
        learning_rate=1e-5,
        batch_size=64,
        num_burnin=500,
        num_samples=200,
        num_chains=2,
    )
    lam0 = np.asarray(res.hierarchy.scales["params"]["Dense_0"]["kernel"])
    assert lam0[:2].min() > lam0[2:].max()  # relevant inputs keep the largest scales
    assert len(res.history["q"]) == 4 and res.history["q"][-1] is None
    assert np.all(np.isfinite(res.history["penalty_eq14"]))
    assert np.all(np.isfinite(res.history["q"][:-1]))
    # sparse or robust: the M-step's scales rank rows like |μ| + σ (robust rows with a large
    # posterior spread keep large scales), not like the signal-to-noise ratio |μ| / σ. The
    # returned moments are the final E-step's, under the learned scales: the next M-step's input.
    from scipy.stats import spearmanr

    next_scales = bn.em.m_step(bn.moments.second_moment(res.moments), res.hierarchy)

    std = bn.moments.std(res.moments)["params"]
    mean = bn.moments.mean(res.moments)["params"]
    for layer in ("Dense_0", "Dense_1"):
        row_sd = np.sqrt((np.asarray(std[layer]["kernel"]) ** 2).mean(1))
        row_mu = np.sqrt((np.asarray(mean[layer]["kernel"]) ** 2).mean(1))
        lam = np.asarray(next_scales["params"][layer]["kernel"])
        with_spr = spearmanr(row_mu + row_sd, lam).correlation
        with_snr = spearmanr(row_mu / row_sd, lam).correlation
        assert with_spr > 0.9 and with_spr >= with_snr, (layer, with_spr, with_snr)
    # and the rows of irrelevant inputs are pulled toward zero in the posterior mean too
    energy = (np.asarray(mean["Dense_0"]["kernel"]) ** 2).sum(1)
    assert energy[2:].max() < energy[:2].min()


def test_em_fit_ends_with_an_e_step_under_the_learned_scales():
    """One driver: per-E-step settings, a callback per record, and final moments that are the
    posterior's under the returned hierarchy (a linear-Gaussian model, whose posterior under any
    scales is known in closed form)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    y = (x @ np.array([1.5, -1.0, 0.0]) + 0.5 * rng.normal(size=200)).astype(np.float32)
    params = {"kernel": jnp.zeros((3, 1))}

    def log_lik(p, xb, yb):
        return -0.5 * ((xb @ p["kernel"])[:, 0] - yb) ** 2 / 0.25

    seen, burnins = [], []

    def settings(i):
        burnins.append(i)
        return {"num_samples": 400 + 100 * i}

    res = bn.em.fit(
        jax.random.key(0),
        params,
        log_lik,
        (jnp.asarray(x), jnp.asarray(y)),
        iterations=2,
        method="sgld",
        settings=settings,
        eval_fn=lambda p: jnp.sum(p["kernel"] ** 2),
        callback=seen.append,
        learning_rate=2e-4,
        num_burnin=400,
        num_chains=4,
        progress=False,
    )
    assert burnins == [0, 1, 2] and [r["iteration"] for r in seen] == [0, 1, 2]
    assert res.history["q"][-1] is None and all(q is not None for q in res.history["q"][:-1])
    assert len(res.history["metric"]) == 3
    # the last E-step ran under the returned scales, and its moments are that posterior's
    last = np.asarray(res.history["scales"][-1]["kernel"])
    np.testing.assert_allclose(last, np.asarray(res.hierarchy.scales["kernel"]))
    prior_var = np.asarray(res.hierarchy.sigma0) ** 2 * last**2
    cov = np.linalg.inv(x.T @ x / 0.25 + np.diag(1.0 / prior_var))
    mu = cov @ (x.T @ y / 0.25)
    mean = np.asarray(bn.moments.mean(res.moments)["kernel"])[:, 0]
    np.testing.assert_allclose(mean, mu, atol=4 * np.sqrt(np.diag(cov)).max())
    # the irrelevant third input's scale shrinks below the others
    assert last[2] < min(last[0], last[1])


def test_em_fit_zero_iterations_is_one_e_step_and_bad_iterations_are_rejected(caplog):
    params = {"kernel": jnp.zeros((2, 1))}
    data = (jnp.ones((16, 2)), jnp.ones(16))
    log_lik = lambda p, xb, yb: -0.5 * ((xb @ p["kernel"])[:, 0] - yb) ** 2
    kw = dict(
        method="sgld",
        learning_rate=1e-3,
        num_burnin=10,
        num_samples=20,
        num_chains=2,
        progress=False,
    )
    with caplog.at_level(logging.WARNING, logger="bayesnoise"):
        res = bn.em.fit(jax.random.key(0), params, log_lik, data, iterations=0, **kw)
    assert "iterations=0 runs no M-step" in caplog.text
    assert res.history["iteration"] == [0] and res.history["q"] == [None]
    np.testing.assert_allclose(np.asarray(res.hierarchy.scales["kernel"]), 1.0)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises((ValueError, TypeError), match="iterations"):
            bn.em.fit(jax.random.key(0), params, log_lik, data, iterations=bad, **kw)


# ------------------------------------------------- the evidence framework: MAP, Laplace, MacKay


def _linear_evidence(x, y, prior_var, noise_var):
    """log N(y; 0, X diag(prior_var) Xᵀ + noise_var I): the exact evidence of a linear model."""
    cov = (x * prior_var) @ x.T + noise_var * np.eye(len(y))
    sign, logdet = np.linalg.slogdet(cov)
    return -0.5 * (y @ np.linalg.solve(cov, y) + logdet + len(y) * np.log(2 * np.pi))


def test_mackay_update_maximises_the_exact_evidence_of_a_linear_model():
    """Iterated with the exact posterior of a linear-Gaussian model, MacKay's update converges to
    the scales that maximise the closed-form evidence (found here by scipy), and irrelevant
    inputs go to the floor."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(3)
    n, w = 60, np.array([1.5, -0.8, 0.4, 0.0, 0.0])
    x = rng.normal(size=(n, 5))
    y = x @ w + 0.5 * rng.normal(size=n)
    params = {"kernel": jnp.zeros((5, 1))}
    h = bn.gsm.hierarchy(params)
    for _ in range(300):
        prior_var = np.asarray(h.scales["kernel"], np.float64) ** 2
        mean, cov = bn.em.linear_posterior(x, y, prior_var, 0.25)
        mean = {"kernel": jnp.asarray(mean, jnp.float32)[:, None]}
        var = {"kernel": jnp.asarray(np.diag(np.asarray(cov)), jnp.float32)[:, None]}
        h = h.replace(scales=bn.em.mackay_update(mean, var, h, min_scale=1e-6))
    lam = np.asarray(h.scales["kernel"], np.float64)

    def neg(u):  # the negative exact evidence over log λ
        return -_linear_evidence(x, y, np.exp(2 * u), 0.25)

    bounds = [(np.log(1e-6), 3.0)] * 5
    best = minimize(neg, np.zeros(5), method="L-BFGS-B", bounds=bounds, options={"ftol": 1e-14})
    # MacKay's scales are at least as good as scipy's optimum, and the relevant ones agree
    assert neg(np.log(lam)) <= best.fun + 1e-6
    np.testing.assert_allclose(lam[:3], np.exp(best.x[:3]), rtol=5e-3)
    np.testing.assert_allclose(lam[3:], np.exp(best.x[3:]), atol=1e-2)
    assert lam[3:].max() < lam[:3].min() / 4
    assert lam.min() == pytest.approx(1e-6)  # one noise input is switched off: at the floor


def test_map_estimate_finds_the_exact_mode_of_a_linear_model():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -1.0, 0.0]) + 0.1).astype(np.float32)
    params = {"kernel": jnp.zeros((3, 1))}
    h = bn.gsm.hierarchy(params).replace(scales={"kernel": jnp.array([1.0, 0.5, 0.1])})
    ll = lambda p, xb, yb: -0.5 * ((xb @ p["kernel"])[:, 0] - yb) ** 2 / 0.01  # noqa: E731
    mode = bn.em.map_estimate(
        jax.random.key(1), params, h, ll, (jnp.asarray(x), jnp.asarray(y)), learning_rate=0.05
    )
    prior_prec = np.diag(1.0 / np.array([1.0, 0.5, 0.1]) ** 2)
    exact = np.linalg.solve(x.T @ x / 0.01 + prior_prec, x.T @ y / 0.01)
    np.testing.assert_allclose(np.asarray(mode["kernel"])[:, 0], exact, rtol=1e-3, atol=1e-4)
    # minibatches: still the mode (the learning rate decays to zero)
    mode = bn.em.map_estimate(
        jax.random.key(1), params, h, ll, (jnp.asarray(x), jnp.asarray(y)),
        learning_rate=0.05, batch_size=32, steps=3000,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(mode["kernel"])[:, 0], exact, rtol=2e-2, atol=2e-3)


def _ard_task(seed: int):
    """Three relevant inputs (a saturating, a linear and a quadratic effect) and five columns of
    pure noise; a 8-16-1 tanh network."""
    rng = np.random.default_rng(seed)
    n = 300
    x = rng.normal(size=(n, 8)).astype(np.float32)
    f = np.tanh(1.5 * x[:, 0]) - x[:, 1] + 0.5 * x[:, 2] ** 2
    y = (f + 0.1 * rng.normal(size=n)).astype(np.float32)
    model = bn.nn.MLP((16, 1), activation=jnp.tanh)
    params = model.init(jax.random.key(seed), jnp.ones((1, 8)))

    def log_lik(p, xb, yb):
        return -0.5 * ((model.apply(p, xb)[:, 0] - yb) / 0.1) ** 2

    return params, log_lik, (jnp.asarray(x), jnp.asarray(y))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_em_fit_defaults_find_the_irrelevant_inputs_of_a_network(seed):
    """ARD on a network: with its defaults (MAP, diagonal Laplace, MacKay's update) EM shrinks
    every noise column's row below every relevant input's, prunes them at the floor, and the
    Laplace evidence rises across iterations."""
    params, log_lik, data = _ard_task(seed)
    res = bn.em.fit(
        jax.random.key(seed), params, log_lik, data, iterations=10, final_sampling=False
    )
    lam = np.asarray(res.hierarchy.scales["params"]["Dense_0"]["kernel"])
    assert lam[3:].max() < lam[:3].min() / 5, lam
    pruned = np.asarray(res.pruned["params"]["Dense_0"]["kernel"])
    assert not pruned[:3].any() and pruned[3:].any()
    assert np.all(lam >= 1e-4)  # floored, never zero
    evidence = np.asarray(res.history["log_evidence"])
    assert len(evidence) == 11 and np.all(np.isfinite(evidence))
    # rises: by hundreds of nats over the run; a step may dip by noise in the mode only
    assert evidence[-1] > evidence[0] + 100
    assert np.all(np.diff(evidence) > -0.01 * np.abs(evidence[1:]))
    assert res.history["pruned"][-1] == int(sum(np.sum(p) for p in jax.tree.leaves(res.pruned)))
    # the moments are the final Laplace posterior's, at the mode under the learned scales
    np.testing.assert_allclose(
        np.asarray(bn.moments.mean(res.moments)["params"]["Dense_0"]["kernel"]),
        np.asarray(res.mode["params"]["Dense_0"]["kernel"]),
        rtol=1e-6,
    )


def test_em_fit_laplace_ends_with_sampling_under_the_learned_scales():
    params, log_lik, data = _ard_task(0)
    res = bn.em.fit(
        jax.random.key(0), params, log_lik, data, iterations=2, map_steps=500,
        num_chains=2, auto={"max_steps": 600}, progress=False,
    )  # fmt: skip
    assert res.result is not None and res.result.num_steps <= 600
    assert jax.tree.leaves(res.params)[0].shape[0] == 2  # the chains' final states
    assert res.history["converged"][-1] == bool(res.result.converged)
    assert res.history["log_evidence"][0] is not None and len(res.history["q"]) == 3


def test_em_fit_rejects_bad_choices_with_clear_errors():
    params, log_lik, data = _ard_task(0)
    key = jax.random.key(0)
    cases = [
        (dict(method="nuts"), "method must be one of 'laplace', 'sgld', got 'nuts'"),
        (dict(update="fast"), "update must be one of 'mackay', 'em', got 'fast'"),
        (dict(min_scale=0.0), "min_scale"),
        (dict(min_scale=float("nan")), "min_scale"),
        (dict(update="mackay", hyperprior=bn.noise.Gamma(2.0, 1.0)), "update='em'"),
        (dict(map_steps=0), "steps"),
        (dict(map_learning_rate=-1.0), "learning_rate"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            bn.em.fit(key, params, log_lik, data, iterations=1, final_sampling=False, **kwargs)
    h = bn.gsm.hierarchy(params)
    var = jax.tree.map(jnp.ones_like, params)
    with pytest.raises(ValueError, match="update='em'"):
        bn.em.mackay_update(params, var, h, bn.noise.LogNormal(0.0, 1.0))
    with pytest.raises(ValueError, match="second moments must be finite and >= 0"):
        bn.em.mackay_update(params, jax.tree.map(lambda v: -v, var), h)
    with pytest.raises(ValueError, match="does not have|structure|shape"):
        bn.em.mackay_update(params, {"kernel": jnp.ones(3)}, h)
    # a hyperprior the EM update handles: fine, and no scale at zero
    res = bn.em.fit(
        key, params, log_lik, data, iterations=2, final_sampling=False,
        hyperprior=bn.noise.Gamma(2.0, 1.0), map_steps=300,
    )  # fmt: skip
    assert all(np.all(np.asarray(s) >= 1e-4) for s in jax.tree.leaves(res.hierarchy.scales))


@pytest.mark.slow  # 20-25 s of sampling: `make test-slow`
def test_em_from_a_user_loop_with_the_sampler_step_finds_the_irrelevant_inputs():
    """The README's loop: the sampler's own step, its automatic step size and preconditioner
    (bn.sampling.auto_settings) under each iteration's prior, samples accumulated into the EM
    state, MacKay's update from their mean and variance."""
    params, log_lik, data = _ard_task(1)
    n = len(data[0])
    params = bn.em.map_estimate(jax.random.key(0), params, bn.gsm.hierarchy(params), log_lik, data)
    state = bn.em.init(params)
    key = jax.random.key(1)
    step = jax.jit(bn.sampling.step)
    for it in range(6):
        k = jax.random.fold_in(key, it)
        prior = functools.partial(bn.gsm.full_log_prior, hierarchy=state.hierarchy)
        auto = bn.sampling.auto_settings(k, params, log_lik, prior, data)
        sgld = bn.sgld(
            auto.learning_rate,
            preconditioner=auto.preconditioner,
            gradient_noise=auto.gradient_noise,
        )
        chain = bn.sampling.init(params, log_lik, prior, num_data=n, transform=sgld)
        for t in range(900):
            k_step, k_batch = jax.random.split(jax.random.fold_in(k, t))
            idx = jax.random.choice(k_batch, n, (auto.batch_size,), replace=False)
            chain, _ = step(k_step, chain, (data[0][idx], data[1][idx]))
            if t >= 300:
                state = bn.em.accumulate(state, chain.params)
        params = chain.params
        state = bn.em.em_step(state, update="mackay")
    lam = np.asarray(state.hierarchy.scales["params"]["Dense_0"]["kernel"])
    assert int(state.iteration) == 6 and float(state.moments.count) == 0
    assert lam[3:].max() < lam[:3].min() / 2, lam


def _row_zero_second_moments(d=4):
    """Second moments of a (3, d) kernel whose row 0 the data never reached (S_0 = 0)."""
    second = {"kernel": jnp.stack([jnp.zeros(d), jnp.full(d, 0.5), jnp.full(d, 2.0)])}
    return second, bn.gsm.hierarchy(second)


@pytest.mark.parametrize(
    "hyperprior, expected",
    [
        # InverseGamma on λ² (b > 0): s = b / (d/2 + a + 1), never zero
        (bn.noise.InverseGammaScale(2.0, 1.0), math.sqrt(1.0 / (2 + 2 + 1))),
        # LogNormal(μ, σ) on λ: log λ = μ − σ²(d + 1), positive but small for a wide row
        (bn.noise.LogNormal(0.0, 0.5), math.exp(-0.25 * 5)),
        # Gamma(k, r) on λ with k > d + 1: λ = (k − 1 − d) / r
        (bn.noise.Gamma(8.0, 2.0), 1.5),
        # Beta(a, b) on λ with a > d + 1: λ = (a − d − 1) / (a + b − d − 2)
        (bn.noise.Beta(8.0, 2.0), 0.75),
        # Gamma and Beta whose first shape is at most d + 1 do not stop the collapse
        (bn.noise.Gamma(2.0, 1.0), 0.0),
        (bn.noise.Beta(2.0, 2.0), 0.0),
    ],
    ids=["inverse_gamma", "lognormal", "gamma_k>d+1", "beta_a>d+1", "gamma_small", "beta_small"],
)
def test_which_hyperpriors_stop_an_empty_row_from_collapsing(hyperprior, expected):
    """A row with S = 0 (no data, mean zero): Q = d log λ − log p(λ) alone decides its scale."""
    second, h = _row_zero_second_moments()
    lam = float(bn.em.m_step(second, h, hyperprior)["kernel"][0])
    if expected == 0.0:
        assert lam < 1e-8  # collapsed: only the floor of bn.em.fit keeps it > 0
    else:
        assert lam == pytest.approx(expected, rel=1e-3)


def test_inverse_gamma_closed_form_uses_the_density_of_lambda_squared():
    """The closed form minimises Q in s = λ² with the density of s; maximising over λ with the
    density of λ (a Jacobian 2λ more) gives d/2 + a + 1/2 in the denominator instead."""
    a, b, sigma0, d, S = 2.0, 0.5, 1.5, 4, 3.0
    second = {"kernel": jnp.full((1, d), S / d)}
    h = bn.gsm.hierarchy(second, sigma0)
    closed = float(bn.em.m_step(second, h, bn.noise.InverseGammaScale(a, b))["kernel"][0]) ** 2
    prior_s = stats.invgamma(a, scale=b)

    def q_in_s(s):
        return S / (2 * sigma0**2 * s) + d / 2 * np.log(s) - prior_s.logpdf(s)

    def q_in_lam(lam):
        return (
            S / (2 * sigma0**2 * lam**2)
            + d * np.log(lam)
            - (prior_s.logpdf(lam**2) + np.log(2 * lam))
        )

    in_s = optimize.minimize_scalar(q_in_s, bounds=(1e-4, 50), method="bounded").x
    in_lam = optimize.minimize_scalar(q_in_lam, bounds=(1e-2, 8), method="bounded").x ** 2
    assert closed == pytest.approx(in_s, rel=1e-4)
    assert closed == pytest.approx((S / (2 * sigma0**2) + b) / (d / 2 + a + 1), rel=1e-6)
    assert in_lam == pytest.approx((S / (2 * sigma0**2) + b) / (d / 2 + a + 0.5), rel=1e-4)
    assert in_lam > closed * 1.05  # the two conventions differ
