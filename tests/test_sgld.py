"""SGLD transforms and the sampling driver, checked against exact posteriors and NUTS.

Tolerances come from Monte Carlo standard errors (se = sd / sqrt(ESS), ESS from numpyro's
estimator over all chains) or are stated with the bias they allow for.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpyro.diagnostics import effective_sample_size

from bayesnoise import moments, sampling
from bayesnoise.sgld import polynomial_schedule, psgld, sgld

# ---------------------------------------------------------------------------------------------
# Problems with known posteriors. Module-level functions, so the compiled runs are reused.

_rng = np.random.default_rng(0)
LIN_N, LIN_D, LIN_NOISE_VAR, LIN_PRIOR_VAR = 200, 3, 1.0, 1.0
LIN_X = _rng.normal(size=(LIN_N, LIN_D)).astype(np.float32)
LIN_Y = (LIN_X @ np.array([1.0, -2.0, 0.5]) + _rng.normal(size=LIN_N)).astype(np.float32)


def lin_exact():
    """Posterior N(μ, Σ): Σ = (XᵀX/s² + I/p²)⁻¹, μ = Σ Xᵀy/s², in float64."""
    x, y = LIN_X.astype(np.float64), LIN_Y.astype(np.float64)
    cov = np.linalg.inv(x.T @ x / LIN_NOISE_VAR + np.eye(LIN_D) / LIN_PRIOR_VAR)
    return cov @ x.T @ y / LIN_NOISE_VAR, cov


def lin_log_likelihood(p, xb, yb):
    return -0.5 * (yb - xb @ p["w"]) ** 2 / LIN_NOISE_VAR


def lin_log_prior(p):
    return -0.5 * jnp.sum(p["w"] ** 2) / LIN_PRIOR_VAR


LIN_PARAMS = {"w": jnp.zeros(LIN_D)}

_rng = np.random.default_rng(1)
LOG_N, LOG_D, LOG_PRIOR_SD = 100, 2, 2.0
LOG_X = _rng.normal(size=(LOG_N, LOG_D)).astype(np.float32)
_logits = LOG_X @ np.array([1.5, -1.0]) + 0.5
LOG_Y = (_rng.uniform(size=LOG_N) < 1 / (1 + np.exp(-_logits))).astype(np.float32)


def log_log_likelihood(p, xb, yb):
    z = xb @ p["w"] + p["b"]
    return yb * z - jax.nn.softplus(z)


def log_log_prior(p):
    return -0.5 * (jnp.sum(p["w"] ** 2) + p["b"] ** 2) / LOG_PRIOR_SD**2


def run_lin(key=0, **kwargs):
    settings = dict(learning_rate=1e-4, batch_size=50, num_burnin=100, num_samples=200)
    settings.update(kwargs)
    key = jax.random.key(key) if isinstance(key, int) else key
    return sampling.run(
        key, LIN_PARAMS, lin_log_likelihood, lin_log_prior, (LIN_X, LIN_Y), **settings
    )


# ---------------------------------------------------------------------------------------------
# The transforms.


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
@pytest.mark.parametrize("jit", [False, True])
def test_noise_is_jax_random_normal_of_the_leaf_subkeys(jit, impl):
    # η = 0.5 and T = 1 make the update the noise itself: u = −η·0 + sqrt(2 η T) ξ = ξ.
    key = jax.random.key(42, impl=impl)
    grads = {"a": jnp.zeros((400, 10)), "b": jnp.zeros((7,))}
    opt = sgld(0.5, temperature=1.0)
    update = jax.jit(opt.update) if jit else opt.update
    updates, _ = update(grads, opt.init(grads), key=key)
    leaves, treedef = jax.tree.flatten(grads)
    keys = jax.random.split(key, len(leaves))
    expected = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    for got, want in zip(jax.tree.leaves(updates), expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("jit", [False, True])
def test_sgld_update_has_mean_minus_eta_g_and_variance_2_eta_t(jit):
    n, eta, temperature = 200_000, 0.01, 0.5
    grads = {"a": jnp.linspace(-3.0, 3.0, n), "b": jnp.full((2, 5), 7.0)}
    opt = sgld(eta, temperature=temperature, seed=3)
    update = jax.jit(opt.update) if jit else opt.update
    state = opt.init(grads)
    u1, state = update(grads, state)
    u2, state = update(grads, state)
    assert int(state.count) == 2
    # Standardised noise z = (u + η g) / sqrt(2 η T) must be N(0, 1), fresh at every update.
    z1 = np.asarray((u1["a"] + eta * grads["a"]) / np.sqrt(2 * eta * temperature), np.float64)
    z2 = np.asarray((u2["a"] + eta * grads["a"]) / np.sqrt(2 * eta * temperature), np.float64)
    for z in (z1, z2):
        assert abs(z.mean()) < 5 / np.sqrt(n)
        assert abs(z.var() - 1.0) < 5 * np.sqrt(2 / n)
    assert abs(np.corrcoef(z1, z2)[0, 1]) < 5 / np.sqrt(n)
    assert np.asarray(u1["b"]).shape == (2, 5) and np.std(np.asarray(u1["b"])) > 0


def test_sgld_at_zero_temperature_is_gradient_descent_with_the_schedule():
    a, b, gamma = 0.2, 3.0, 0.6
    opt = sgld(polynomial_schedule(a, b, gamma), temperature=0.0)
    g = {"w": jnp.array([1.0, -2.0, 4.0])}
    state = opt.init(g)
    for t in range(4):
        u, state = opt.update(g, state)
        eta_t = 0.5 * a * (b + t) ** (-gamma)  # η_t = ε_t / 2
        np.testing.assert_allclose(u["w"], -eta_t * np.array([1.0, -2.0, 4.0]), rtol=1e-6)


def test_polynomial_schedule_values():
    schedule = polynomial_schedule(a=0.1, b=10.0, gamma=0.55)
    for t in [0, 1, 100, 10_000]:
        expected = 0.5 * 0.1 * (10.0 + t) ** -0.55
        np.testing.assert_allclose(float(schedule(t)), expected, rtol=1e-6)
    np.testing.assert_allclose(float(polynomial_schedule(0.02, 1.0, 1.0)(0)), 0.01, rtol=1e-7)


def test_psgld_preconditioned_update():
    n, eta, decay, eps, temperature = 100_000, 1e-3, 0.9, 1e-2, 0.5
    g1 = jnp.linspace(0.1, 10.0, n)
    g2 = jnp.linspace(-5.0, 5.0, n)
    opt = psgld(eta, decay=decay, eps=eps, temperature=temperature, seed=1)
    state = opt.init({"w": g1})
    v = np.zeros(n)
    for g in (g1, g2):
        u, state = opt.update({"w": g}, state)
        v = decay * v + (1 - decay) * np.asarray(g, np.float64) ** 2  # V first, then G
        precond = 1 / (eps + np.sqrt(v))
        np.testing.assert_allclose(state.nu["w"], v, rtol=1e-5)
        z = (np.asarray(u["w"], np.float64) + eta * precond * np.asarray(g)) / np.sqrt(
            2 * eta * temperature * precond
        )
        assert abs(z.mean()) < 5 / np.sqrt(n)
        assert abs(z.var() - 1.0) < 5 * np.sqrt(2 / n)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: sgld(0.0), "learning_rate.*0.0"),
        (lambda: sgld(-1e-3), "learning_rate.*-0.001"),
        (lambda: sgld(1e-3, temperature=-1.0), "temperature.*-1.0"),
        (lambda: sgld(1e-3, seed="x"), "seed"),
        (lambda: psgld(1e-3, decay=1.0), "decay.*1.0"),
        (lambda: psgld(1e-3, eps=0.0), "eps.*0.0"),
        (lambda: polynomial_schedule(0.1, 1.0, 0.5), r"gamma.*\(0.5, 1\].*0.5"),
        (lambda: polynomial_schedule(0.1, 1.0, 1.5), "gamma.*1.5"),
        (lambda: polynomial_schedule(0.0, 1.0, 0.6), "a .*0.0"),
        (lambda: polynomial_schedule(0.1, 0.0, 0.6), "b .*0.0"),
    ],
)
def test_transform_bad_inputs(build, match):
    with pytest.raises(ValueError, match=match):
        build()


# ---------------------------------------------------------------------------------------------
# The driver against exact posteriors and NUTS.


def test_linear_regression_matches_exact_posterior():
    mu, cov = lin_exact()
    result = run_lin(learning_rate=2e-4, num_burnin=1000, num_samples=10_000, num_chains=16)
    mean = np.asarray(moments.mean(result.moments)["w"], np.float64)
    var = np.asarray(moments.variance(result.moments)["w"], np.float64)
    sd = np.sqrt(np.diag(cov))
    rel_mean = np.abs(mean - mu) / np.abs(mu)
    rel_var = np.abs(var / np.diag(cov) - 1)
    print("relative error of the mean", rel_mean, "of the variance", rel_var, "ESS", result.ess)
    assert np.all(rel_mean < 0.05)
    assert np.all(rel_var < 0.15)
    # The tolerances are informative: at least 4 Monte Carlo standard errors wide, so a wrong
    # noise scale (variance off by 2x) or a missing N/n would fail.
    ess = result.ess[[result.trace_names.index(f"w[{i}]") for i in range(LIN_D)]]
    assert np.all(4 * sd / np.sqrt(ess) < 0.05 * np.abs(mu))
    assert np.all(4 * np.sqrt(2 / ess) < 0.15)
    assert np.all(result.rhat < 1.05)
    assert result.moments.count == 16 * 10_000


def test_temperature_scales_the_variance():
    _, cov = lin_exact()
    common = dict(learning_rate=1e-4, batch_size=None, num_burnin=1000, num_samples=10_000)
    hot = run_lin(key=5, temperature=1.0, num_chains=8, **common)
    cold = run_lin(key=5, temperature=0.25, num_chains=8, **common)
    var_hot = np.asarray(moments.variance(hot.moments)["w"], np.float64)
    var_cold = np.asarray(moments.variance(cold.moments)["w"], np.float64)
    ratio = var_cold / var_hot
    print("variance ratio T=0.25 / T=1:", ratio)
    # Same keys (common random numbers): for a Gaussian target the full-batch chains differ
    # only by the scale sqrt(T) of the noise once the start is forgotten, so the ratio is T up
    # to the burn-in transient; 3% allows for it.
    np.testing.assert_allclose(ratio, 0.25, rtol=0.03)
    # And against the exact tempered posterior, N(μ, T Σ), as in the T = 1 test.
    np.testing.assert_allclose(var_cold, 0.25 * np.diag(cov), rtol=0.15)


def _nuts_reference():
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import MCMC, NUTS

    def model(x, y):
        w = numpyro.sample("w", dist.Normal(0, LOG_PRIOR_SD).expand([LOG_D]).to_event(1))
        b = numpyro.sample("b", dist.Normal(0, LOG_PRIOR_SD))
        numpyro.sample("y", dist.Bernoulli(logits=x @ w + b), obs=y)

    mcmc = MCMC(
        NUTS(model),
        num_warmup=500,
        num_samples=2000,
        num_chains=2,
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(jax.random.key(0), LOG_X, LOG_Y)
    s = mcmc.get_samples(group_by_chain=True)
    # columns b, w[0], w[1]: the order of the sampler's trace
    return np.concatenate([np.asarray(s["b"])[..., None], np.asarray(s["w"])], -1).astype(
        np.float64
    )


def test_logistic_regression_matches_nuts():
    ref = _nuts_reference()
    ref_mean, ref_sd = ref.mean((0, 1)), ref.std((0, 1))
    ref_se = ref_sd / np.sqrt(effective_sample_size(ref))

    result = sampling.run(
        jax.random.key(1),
        {"w": jnp.zeros(LOG_D), "b": jnp.zeros(())},
        log_log_likelihood,
        log_log_prior,
        (LOG_X, LOG_Y),
        learning_rate=1e-3,
        batch_size=50,
        num_burnin=2000,
        num_samples=20_000,
        num_chains=8,
    )
    assert result.trace_names == ("b[]", "w[0]", "w[1]")
    mean = np.concatenate(
        [[float(moments.mean(result.moments)["b"])], np.asarray(moments.mean(result.moments)["w"])]
    )
    sd = np.sqrt(
        np.concatenate(
            [
                [float(moments.variance(result.moments)["b"])],
                np.asarray(moments.variance(result.moments)["w"]),
            ]
        )
    )
    se = sd / np.sqrt(result.ess)
    z = (mean - ref_mean) / np.sqrt(se**2 + ref_se**2)
    print("mean difference / sd", (mean - ref_mean) / ref_sd, "z", z)
    print("sd relative difference", sd / ref_sd - 1, "ESS", result.ess)
    # Means: within 4 combined standard errors plus 0.05 posterior sd for the O(η) bias of
    # SGLD. Standard deviations: within 4 combined relative standard errors (1/sqrt(2 ESS)
    # each) plus 5% for the bias.
    assert np.all(np.abs(mean - ref_mean) < 4 * np.sqrt(se**2 + ref_se**2) + 0.05 * ref_sd)
    sd_tol = 4 * np.sqrt(1 / (2 * result.ess) + 1 / (2 * effective_sample_size(ref))) + 0.05
    assert np.all(np.abs(sd / ref_sd - 1) < sd_tol)
    assert np.all(sd_tol < 0.2)  # informative: a variance off by 2x would fail


def test_moments_match_the_trace_with_burnin_and_thinning():
    result = run_lin(key=3, num_burnin=5, num_samples=7, thin=3, num_chains=2, num_traced=3)
    assert result.num_steps == 5 + 7 * 3
    assert result.trace.shape == (2, 7, 3)
    assert result.log_posterior.shape == (2, 7)
    assert np.all(np.isfinite(result.log_posterior))
    assert np.all(np.asarray(result.chain_moments.count) == 7)
    trace = np.asarray(result.trace, np.float64)  # all three weights are traced
    np.testing.assert_allclose(
        result.chain_moments.mean_dev["w"] + result.chain_moments.shift["w"],
        trace.mean(1),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(moments.mean(result.moments)["w"], trace.mean((0, 1)), atol=1e-6)
    np.testing.assert_allclose(
        moments.variance(result.moments)["w"], trace.reshape(-1, 3).var(0), rtol=1e-4
    )


# ---------------------------------------------------------------------------------------------
# Chains: vmap, sharding.


def test_vmapped_chains_equal_chains_run_one_by_one():
    keys = jax.random.split(jax.random.key(11), 3)
    together = run_lin(keys, num_burnin=20, num_samples=50)
    for c in range(3):
        alone = run_lin(keys[c : c + 1], num_burnin=20, num_samples=50)
        np.testing.assert_allclose(together.params["w"][c], alone.params["w"][0], rtol=1e-5)
        np.testing.assert_allclose(
            moments.mean(together.chain_moments)["w"][c],
            moments.mean(alone.chain_moments)["w"][0],
            rtol=1e-5,
        )
        np.testing.assert_allclose(
            moments.variance(together.chain_moments)["w"][c],
            moments.variance(alone.chain_moments)["w"][0],
            rtol=1e-4,
        )
    # chains differ from each other
    assert not np.allclose(together.params["w"][0], together.params["w"][1])


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (host) devices")
def test_sharded_chains_equal_unsharded():
    devices = jax.devices()[:4]
    plain = run_lin(7, num_chains=8)
    sharded = run_lin(7, num_chains=8, devices=devices)
    leaf = sharded.params["w"]
    assert len(leaf.sharding.device_set) == 4
    assert leaf.sharding.spec[0] == "chain"
    np.testing.assert_allclose(sharded.params["w"], plain.params["w"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        moments.mean(sharded.moments)["w"], moments.mean(plain.moments)["w"], rtol=1e-5
    )
    np.testing.assert_allclose(
        moments.variance(sharded.moments)["w"], moments.variance(plain.moments)["w"], rtol=1e-4
    )
    with pytest.raises(ValueError, match="6 chains.*4 devices"):
        run_lin(7, num_chains=6, devices=devices)


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (host) devices")
@pytest.mark.parametrize("chains,data", [(2, 2), (1, 4)])
def test_data_parallel_gradients_equal_unsharded(monkeypatch, chains, data):
    # Every minibatch split `data` ways: the same chains up to float reassociation of the sum,
    # and the compiled loop sums each chain's gradient across devices.
    compiled = []
    original = sampling._sample

    def recording(*args, **kwargs):
        compiled.append(original.lower(*args, **kwargs).compile().as_text())
        return original(*args, **kwargs)

    plain = run_lin(7, num_chains=4, batch_size=48)
    monkeypatch.setattr(sampling, "_sample", recording)
    mesh = sampling.make_mesh(chains=chains, data=data)
    split = run_lin(7, num_chains=4, batch_size=48, devices=mesh)
    np.testing.assert_allclose(split.params["w"], plain.params["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        moments.mean(split.moments)["w"], moments.mean(plain.moments)["w"], rtol=1e-5
    )
    np.testing.assert_allclose(
        moments.variance(split.moments)["w"], moments.variance(plain.moments)["w"], rtol=1e-4
    )
    reductions = [line for line in compiled[0].splitlines() if "all-reduce(" in line]
    # on each device: the gradient of its 4 / chains chains
    assert any(f"f32[{4 // chains},3]" in line for line in reductions), reductions
    with pytest.raises(ValueError, match="batch_size=50 .* 'data' axis"):
        run_lin(7, num_chains=4, batch_size=50, devices=sampling.make_mesh(chains=1, data=4))
    with pytest.raises(ValueError, match="needs 8 devices"):
        sampling.make_mesh(chains=2, data=4, devices=jax.devices()[:4])


# ---------------------------------------------------------------------------------------------
# Divergence.


def _quadratic_log_prior(p):
    return -0.5 * jnp.sum(p["w"] ** 2)


def _no_likelihood(p, x):
    return jnp.zeros(x.shape[0])


def test_divergence_names_the_step_and_the_step_size():
    # U = θ²/2 and η = 3 at T = 0: θ_{t+1} = −2 θ_t. The first non-finite U = θ²/2 (float32)
    # is found by an independent loop in numpy.
    theta, expected = np.ones(2, np.float32), None
    for t in range(1000):
        with np.errstate(over="ignore", invalid="ignore"):
            u = np.float32(0.5) * np.sum(theta**2)  # as _quadratic_log_prior computes it
        if not np.isfinite(u):
            expected = t
            break
        theta = theta - np.float32(3.0) * theta
    assert expected is not None
    with pytest.raises(sampling.DivergenceError) as info:
        sampling.run(
            jax.random.key(0),
            {"w": jnp.ones(2)},
            _no_likelihood,
            _quadratic_log_prior,
            (np.zeros((4, 1), np.float32),),
            learning_rate=3.0,
            temperature=0.0,
            num_burnin=10,
            num_samples=200,
        )
    err = info.value
    assert isinstance(err, FloatingPointError)
    assert f"step {expected} " in str(err) and f"sampling step {expected - 10}" in str(err)
    assert "η_t = 3" in str(err)
    assert err.step == expected and err.step_size == 3.0 and err.chain == 0
    # the state is frozen at its last finite value, and no NaN entered the moments
    assert np.all(np.isfinite(err.result.params["w"]))
    assert np.all(np.isfinite(moments.mean(err.result.moments)["w"]))
    assert float(err.result.moments.count) == expected - 10


def _nan_likelihood(p, x):
    return jnp.log(p["w"][0]) * jnp.ones(x.shape[0])  # NaN for w < 0


def test_divergence_at_the_first_step_with_a_schedule():
    schedule = polynomial_schedule(a=0.02, b=1.0, gamma=1.0)
    with pytest.raises(FloatingPointError, match=r"step 0 \(burn-in step 0.*η_t = 0.01"):
        sampling.run(
            jax.random.key(0),
            {"w": -jnp.ones(1)},
            _nan_likelihood,
            _quadratic_log_prior,
            (np.zeros((4, 1), np.float32),),
            learning_rate=schedule,
            num_burnin=3,
            num_samples=5,
            num_chains=2,
        )


# ---------------------------------------------------------------------------------------------
# Inputs, progress, transforms through the driver.


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=500), "batch_size=500 exceeds the 200 examples"),
        (dict(thin=0), "thin"),
        (dict(num_samples=0), "num_samples"),
        (dict(num_burnin=-1), "num_burnin"),
        (dict(key=jax.random.split(jax.random.key(0), 3), num_chains=2), "num_chains=2.*3 chain"),
        (dict(params_per_chain=True, num_chains=2), "leading axis of 2 chains"),
    ],
)
def test_run_bad_settings(kwargs, match):
    key = kwargs.pop("key", 0)
    with pytest.raises(ValueError, match=match):
        run_lin(key, **kwargs)


def test_run_bad_functions_and_data():
    key = jax.random.key(0)
    data = (LIN_X, LIN_Y)
    with pytest.raises(ValueError, match=r"one log-likelihood per example.*got shape \(\)"):
        sampling.run(
            key,
            LIN_PARAMS,
            lambda p, x, y: jnp.sum(lin_log_likelihood(p, x, y)),
            lin_log_prior,
            data,
            learning_rate=1e-4,
        )
    with pytest.raises(ValueError, match=r"log_prior.*scalar.*\(3,\)"):
        sampling.run(
            key, LIN_PARAMS, lin_log_likelihood, lambda p: p["w"], data, learning_rate=1e-4
        )
    with pytest.raises(ValueError, match="same leading axis"):
        sampling.run(
            key,
            LIN_PARAMS,
            lin_log_likelihood,
            lin_log_prior,
            (LIN_X, LIN_Y[:10]),
            learning_rate=1e-4,
        )
    with pytest.raises(ValueError, match="tuple of arrays"):
        sampling.run(key, LIN_PARAMS, lin_log_likelihood, lin_log_prior, LIN_X, learning_rate=1)
    with pytest.raises(ValueError, match="learning_rate.*0"):
        sampling.run(key, LIN_PARAMS, lin_log_likelihood, lin_log_prior, data, learning_rate=0.0)


def test_progress_bar_reports_every_step(capsys):
    run_lin(num_burnin=30, num_samples=20, progress=True, progress_every=10)
    err = capsys.readouterr().err
    assert "50/50" in err


def test_psgld_through_the_driver_finds_the_posterior_mean():
    mu, _ = lin_exact()
    result = run_lin(transform=psgld, learning_rate=3e-3, num_burnin=500, num_samples=2000)
    mean = np.asarray(moments.mean(result.moments)["w"], np.float64)
    np.testing.assert_allclose(mean, mu, rtol=0.05)
    assert isinstance(result.opt_state.nu, dict)


def test_optax_chain_compatibility():
    # The transform composes with optax like any other (here: clipping first).
    opt = optax.chain(optax.clip_by_global_norm(1.0), sgld(1e-3, temperature=0.0))
    state = opt.init({"w": jnp.zeros(2)})
    u, _ = opt.update({"w": jnp.array([30.0, 40.0])}, state)
    np.testing.assert_allclose(u["w"], [-0.6e-3, -0.8e-3], rtol=1e-5)
