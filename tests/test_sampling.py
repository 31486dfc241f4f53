"""The sampler's building blocks, its automatic settings, diagnostics and model average.

Checked where the answer is known: an exact Gaussian posterior, and inputs that are zero in
every example, whose first-layer rows keep their prior N(0, σ0²λ²) as posterior.
"""

import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from numpyro.diagnostics import effective_sample_size
from scipy import stats

import bayesnoise as bn
from bayesnoise import moments, sampling
from bayesnoise.sgld import polynomial_schedule, psgld

_rng = np.random.default_rng(0)
N, D = 200, 3
X = _rng.normal(size=(N, D)).astype(np.float32)
Y = (X @ np.array([1.0, -2.0, 0.5]) + _rng.normal(size=N)).astype(np.float32)
PARAMS = {"w": jnp.zeros(D)}


def lin_ll(p, xb, yb):
    return -0.5 * (yb - xb @ p["w"]) ** 2


def lin_lp(p):
    return -0.5 * jnp.sum(p["w"] ** 2)


def exact():
    x, y = X.astype(np.float64), Y.astype(np.float64)
    cov = np.linalg.inv(x.T @ x + np.eye(D))
    return cov @ x.T @ y, cov


def assert_tempered_exact(res, temperature):
    """Means within 0.1 sd, variances within 12% of the exact posterior at T, R-hat < 1.05."""
    mean, cov = exact()
    got_mean = np.asarray(moments.mean(res.moments)["w"])
    got_var = np.asarray(moments.variance(res.moments)["w"])
    sd = np.sqrt(temperature * np.diag(cov))
    assert np.all(np.abs(got_mean - mean) < 0.1 * sd), (got_mean, mean)
    np.testing.assert_allclose(got_var / (temperature * np.diag(cov)), 1.0, atol=0.12)
    assert res.converged and np.max(res.rhat) < 1.05


def test_run_is_init_and_step_in_a_loop():
    chain_keys = jax.random.split(jax.random.key(3), 1)
    res = sampling.run(
        chain_keys, PARAMS, lin_ll, lin_lp, (X, Y), learning_rate=1e-3, num_burnin=5, num_samples=1
    )
    step_key = jax.random.split(chain_keys[0], 2)[0]
    state = sampling.init(PARAMS, lin_ll, lin_lp, N, transform=bn.sgld(1e-3))
    step = jax.jit(sampling.step)
    for t in range(6):
        state, info = step(jax.random.fold_in(step_key, t), state, (X, Y))
        assert bool(info.finite)
    np.testing.assert_allclose(res.params["w"][0], state.params["w"], rtol=1e-5, atol=1e-6)
    assert int(state.count) == 6
    # under vmap: chains driven with their own keys move apart
    states = jax.vmap(lambda p: sampling.init(p, lin_ll, lin_lp, N, transform=bn.sgld(1e-3)))(
        {"w": jnp.zeros((2, D))}
    )
    keys = jax.random.split(jax.random.key(0), 2)
    states, _ = jax.vmap(sampling.step, in_axes=(0, 0, None))(keys, states, (X, Y))
    assert not np.allclose(states.params["w"][0], states.params["w"][1])


def test_chains_built_inside_jit_from_a_closed_over_start():
    # BlackJAX's pattern: one jitted function builds the chains from a start it closes over
    # (inside jit, operations on such a constant are traced: the start's check must still run)
    keys = jax.random.split(jax.random.key(5), 3)

    def chains(start, keys):
        def one(key):
            state = sampling.init(start, lin_ll, lin_lp, N, transform=bn.sgld(1e-3))

            def body(state, t):
                return sampling.step(jax.random.fold_in(key, t), state, (X, Y))[0], None

            return jax.lax.scan(body, state, jnp.arange(4))[0].params["w"]

        return jax.vmap(one)(keys)

    start = {"w": jnp.ones(D)}
    got = jax.jit(lambda k: chains(start, k))(keys)
    np.testing.assert_allclose(got, chains(start, keys), rtol=1e-6)
    assert not np.allclose(got[0], got[1])
    bad = {"w": jnp.array([1.0, np.nan, 0.0])}
    with pytest.raises(ValueError, match="must be finite") as err:
        jax.jit(lambda k: chains(bad, k))(keys)
    assert "'w'" in str(err.value) and "1 NaN or infinite" in str(err.value)


def test_step_freezes_a_chain_at_a_non_finite_gradient():
    state = sampling.init(
        {"w": -jnp.ones(1)},
        lambda p, x: jnp.log(p["w"][0]) * jnp.ones(x.shape[0]),
        lambda p: jnp.zeros(()),
        4,
        transform=bn.sgld(0.1),
    )
    new, info = sampling.step(jax.random.key(0), state, (jnp.zeros((4, 1)),))
    assert not bool(info.finite) and float(new.params["w"][0]) == -1.0


def test_an_infinite_gradient_freezes_a_chain_unless_the_drift_clip_bounds_the_move():
    # U = −N·sqrt(w) at w = 0: finite, with an infinite gradient
    def start(transform):
        return sampling.init(
            {"w": jnp.zeros(1)},
            lambda p, x: jnp.sqrt(p["w"][0]) * jnp.ones(x.shape[0]),
            lambda p: jnp.zeros(()),
            4,
            transform=transform,
        )

    batch = (jnp.zeros((4, 1)),)
    frozen, info = sampling.step(jax.random.key(0), start(bn.sgld(0.1)), batch)
    assert not bool(info.finite) and float(frozen.params["w"][0]) == 0.0
    moved, info = sampling.step(jax.random.key(0), start(bn.sgld(0.1, max_drift=3.0)), batch)
    # the drift is clipped at 3 noise deviations, sqrt(2 · 0.1) each; the noise adds one draw
    opt, zero = bn.sgld(0.1), {"w": jnp.zeros(1)}
    noise = float(opt.update(zero, opt.init(zero), key=jax.random.key(0))[0]["w"][0])
    assert bool(info.finite)
    np.testing.assert_allclose(float(moved.params["w"][0]), 3.0 * np.sqrt(0.2) + noise, rtol=1e-5)


@pytest.mark.parametrize("temperature, h_scale", [(1.0, 0.5), (0.25, 0.5), (1.0, 1.5)])
def test_baoab_with_full_gradients_samples_the_exact_gaussian_posterior(temperature, h_scale):
    # BAOAB's positions are exact for a Gaussian target at any stable step (h·sqrt(λ) < 2),
    # where an Euler step of the same size would not be
    _, cov = exact()
    var = temperature * np.diag(cov)
    s = np.sqrt(var)
    lam = np.linalg.eigvalsh(s[:, None] * np.linalg.inv(cov) * s[None, :])[-1]
    h = h_scale / np.sqrt(lam)
    res = sampling.run(
        jax.random.key(2),
        PARAMS,
        lin_ll,
        lin_lp,
        (X, Y),
        learning_rate=float(h),
        transform=functools.partial(bn.baoab, preconditioner={"w": jnp.asarray(var, jnp.float32)}),
        temperature=temperature,
        batch_size=N,
        num_burnin=200,
        num_samples=2000,
        num_chains=4,
    )
    assert_tempered_exact(res, temperature)


@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_baoab_with_automatic_settings_samples_the_exact_gaussian_posterior(temperature):
    # no learning rate: the Laplace preconditioner, h = 0.5 / sqrt(λ_max) and the whole batch
    _, cov = exact()
    res = sampling.run(
        jax.random.key(5),
        PARAMS,
        lin_ll,
        lin_lp,
        (X, Y),
        transform=bn.baoab,
        temperature=temperature,
        auto={"max_steps": 4000},
    )
    s = res.settings
    # the Laplace variance of a linear model is T / diag(precision); λ_max of the scaled
    # precision follows from the exact Hessian
    var = temperature / np.diag(np.linalg.inv(cov))
    np.testing.assert_allclose(np.asarray(s["preconditioner"]["w"]), var, rtol=1e-4)
    scaled = np.sqrt(var)[:, None] * np.linalg.inv(cov) * np.sqrt(var)[None, :] / temperature
    np.testing.assert_allclose(s["curvature_max"], np.linalg.eigvalsh(scaled)[-1], rtol=0.03)
    np.testing.assert_allclose(s["learning_rate"], 0.5 / np.sqrt(s["curvature_max"]), rtol=1e-6)
    assert (s["method"], s["batch_size"], s["num_burnin"]) == ("baoab", N, 400)
    assert s["num_samples"] * s["thin"] <= 3600 and s["num_samples"] == 1000
    assert_tempered_exact(res, temperature)


@pytest.mark.parametrize(
    "batch_size, friction, temperature", [(10, 1.0, 1.0), (50, 1.0, 1.0), (10, 5.0, 0.5)]
)
def test_baoab_with_automatic_settings_bounds_the_step_by_the_minibatch_noise(
    batch_size, friction, temperature, caplog
):
    # 20 and 4 minibatches per epoch: h is the step at which the kick's gradient noise is a
    # quarter of the O step's injected noise, below the stability bound
    _, cov = exact()
    with caplog.at_level(logging.WARNING, logger="bayesnoise"):
        res = sampling.run(
            jax.random.key(1), PARAMS, lin_ll, lin_lp, (X, Y),
            transform=functools.partial(bn.baoab, friction=friction), temperature=temperature,
            batch_size=batch_size, auto={"max_steps": 40_000},
        )  # fmt: skip
    s = res.settings
    assert (s["batch_size"], s["step_limit"]) == (batch_size, "noise")
    # M B / T for a linear model: the Laplace variance at T = 1 times (N² / n)(1 − n / N) mean(x²)
    var = 1.0 / np.diag(np.linalg.inv(cov))
    r = np.max(var * N**2 / batch_size * (1 - batch_size / N) * np.mean(X.astype(float) ** 2, 0))
    np.testing.assert_allclose(s["gradient_noise_max"], r, rtol=1e-3)
    h = s["learning_rate"]
    np.testing.assert_allclose(h * h * r / -np.expm1(-2 * friction * h), 0.25, rtol=1e-4)
    stable = 0.5 / np.sqrt(s["curvature_max"])
    assert h < stable
    held = [m for m in caplog.messages if "holds the step" in m]
    assert len(held) == int(h < 0.5 * stable) and all(str(batch_size) in m for m in held)
    assert_tempered_exact(res, temperature)


def test_baoab_with_automatic_settings_keeps_a_given_preconditioner_and_friction():
    given = {"w": jnp.full((D,), 0.01)}
    transform = functools.partial(bn.baoab, preconditioner=given, friction=2.0)
    res = sampling.run(
        jax.random.key(6), PARAMS, lin_ll, lin_lp, (X, Y), transform=transform,
        num_chains=2, auto={"max_steps": 200, "step_fraction": 0.25},
    )  # fmt: skip
    s = res.settings
    assert s["preconditioner"] is given and s["friction"] == 2.0
    lam = sampling.max_curvature(jax.random.key(0), PARAMS, lin_ll, lin_lp, (X, Y), given)
    np.testing.assert_allclose(s["learning_rate"], 0.25 / np.sqrt(lam), rtol=0.03)


@pytest.mark.parametrize("batch_size", [None, 50])
def test_baoab_with_automatic_settings_reads_preconditioner_none_as_not_given(batch_size):
    transform = functools.partial(bn.baoab, preconditioner=None)
    res = sampling.run(
        jax.random.key(6), PARAMS, lin_ll, lin_lp, (X, Y), transform=transform,
        batch_size=batch_size, num_chains=2, auto={"max_steps": 200},
    )  # fmt: skip
    laplace_var = 1.0 / np.diag(np.linalg.inv(exact()[1]))
    np.testing.assert_allclose(
        np.asarray(res.settings["preconditioner"]["w"]), laplace_var, rtol=1e-4
    )


def test_automatic_settings_reject_options_of_the_other_sampler():
    run = functools.partial(sampling.run, jax.random.key(0), PARAMS, lin_ll, lin_lp, (X, Y))
    with pytest.raises(ValueError) as err:
        run(transform=bn.baoab, auto={"target_ess": 100})
    assert "['target_ess']" in str(err.value) and "bn.baoab" in str(err.value)
    allowed = "allowed: max_steps, hessian_examples, max_retries, step_fraction, noise_fraction"
    assert allowed in str(err.value)
    with pytest.raises(ValueError) as err:
        run(auto={"step_fraction": 0.5})
    assert "['step_fraction']" in str(err.value) and "bn.sgld" in str(err.value)
    assert "noise_fraction" in str(err.value) and "step_fraction," not in str(err.value)
    with pytest.raises(ValueError) as err:
        run(transform=bn.baoab, auto={"step_fraction": 2.0})
    assert "must be < 2" in str(err.value) and "2.0" in str(err.value)
    with pytest.raises(ValueError) as err:
        run(transform=bn.baoab, temperature=0.0)
    assert "temperature must be a finite number > 0" in str(err.value)
    with pytest.raises(ValueError) as err:
        sampling.run(
            jax.random.key(0), PARAMS, lin_ll, lambda p: jnp.zeros(()), (X, Y), transform=bn.baoab
        )
    assert "the prior is not proper in leaf" in str(err.value)
    nan_ll = lambda p, x, y: jnp.log(p["w"][0]) * jnp.ones(x.shape[0])  # noqa: E731
    with pytest.raises(ValueError) as err:
        sampling.run(
            jax.random.key(0), {"w": -jnp.ones(D)}, nan_ll, lin_lp, (X, Y), transform=bn.baoab
        )
    assert "the log posterior at the starting params must be finite, got nan" in str(err.value)


def test_max_curvature_against_the_eigenvalues_of_the_exact_hessian():
    _, cov = exact()
    hessian = np.linalg.inv(cov)
    for m in (np.ones(D), np.diag(cov), np.array([1.0, 0.1, 10.0])):
        want = np.linalg.eigvalsh(np.sqrt(m)[:, None] * hessian * np.sqrt(m)[None, :])[-1]
        pre = {"w": jnp.asarray(m, jnp.float32)}
        for t in (1.0, 0.25):
            got = sampling.max_curvature(
                jax.random.key(0), PARAMS, lin_ll, lin_lp, (X, Y), pre, temperature=t, num_iters=60
            )
            assert abs(got / (want / t) - 1.0) < 0.03, (m, t, got, want / t)
    bad = [
        (dict(num_examples=0), "num_examples.*>= 1, got 0"),
        (dict(num_iters=0), "num_iters.*>= 1, got 0"),
        (dict(temperature=0.0), "temperature.*> 0, got 0.0"),
        (dict(preconditioner={"v": jnp.ones(D)}), "preconditioner must have the tree structure"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match) as err:
            sampling.max_curvature(jax.random.key(0), PARAMS, lin_ll, lin_lp, (X, Y), **kwargs)
        assert type(err.value) is ValueError


def test_sgld_key_seed_alias_default_and_extra_argument():
    grads, params = {"w": jnp.ones(3)}, {"w": jnp.zeros(3)}

    def first(opt, **extra):
        return opt.update(grads, opt.init(params), params, **extra)[0]["w"]

    np.testing.assert_array_equal(first(bn.sgld(0.1, key=5)), first(bn.sgld(0.1, seed=5)))
    np.testing.assert_array_equal(first(bn.sgld(0.1)), first(bn.sgld(0.1, key=0)))
    assert not np.allclose(first(bn.sgld(0.1, key=1)), first(bn.sgld(0.1, key=2)))
    # a key handed to update wins over the state's key
    k = jax.random.key(9)
    np.testing.assert_array_equal(first(bn.sgld(0.1, key=1), key=k), first(bn.sgld(0.1), key=k))
    # inside optax.chain, which forwards the extra argument
    chained = optax.chain(optax.scale(1.0), bn.sgld(0.1, key=1))
    np.testing.assert_array_equal(first(chained, key=k), first(bn.sgld(0.1), key=k))
    with pytest.raises(ValueError, match="key=1 and its alias seed=2"):
        bn.sgld(0.1, key=1, seed=2)


@pytest.mark.parametrize("kwargs", [{}, {"key": 3}, {"seed": 3}])
def test_sgld_under_inject_hyperparams(kwargs):
    opt = optax.inject_hyperparams(bn.sgld)(0.1, temperature=0.0, **kwargs)
    params = {"w": jnp.zeros(3)}
    state = opt.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.5)
    updates, state = jax.jit(opt.update)({"w": jnp.ones(3)}, state, params)
    np.testing.assert_allclose(updates["w"], -0.5 * np.ones(3), rtol=1e-6)  # T = 0: −η g


def test_preconditioned_sgld_update_moments():
    # u = −η M g + N(0, 2ηTM − η²M²B): mean and variance against the formula
    m, b, eta = jnp.array([0.5, 2.0]), jnp.array([0.0, 0.3]), 0.1
    opt = bn.sgld(eta, preconditioner={"w": m}, gradient_noise={"w": b})
    g = {"w": jnp.ones(2)}
    state = opt.init(g)
    keys = jax.random.split(jax.random.key(0), 20_000)
    u = jax.vmap(lambda k: opt.update(g, state, key=k)[0]["w"])(keys)
    var = 2 * eta * m - (eta * m) ** 2 * b
    se_mean = np.sqrt(var / len(keys))
    assert np.all(np.abs(np.asarray(u.mean(0) + eta * m)) < 5 * se_mean)
    np.testing.assert_allclose(u.var(0), var, rtol=0.05)
    # the drift clip: a huge gradient moves a weight at most K noise deviations
    clipped = bn.sgld(eta, preconditioner={"w": m}, max_drift=3.0, temperature=1.0)
    u = clipped.update({"w": jnp.array([1e6, -1e6])}, clipped.init(g), key=jax.random.key(1))[0]
    cap = 3.0 * np.sqrt(2 * eta * np.asarray(m))
    assert np.all(np.abs(np.asarray(u["w"])) <= cap + 6 * np.sqrt(2 * eta * np.asarray(m)))
    assert np.all(np.abs(np.asarray(u["w"])) >= cap - 6 * np.sqrt(2 * eta * np.asarray(m)))
    with pytest.raises(ValueError, match="max_drift"):
        bn.sgld(eta, max_drift=0.0)
    with pytest.raises(ValueError, match="preconditioner must have the structure"):
        bn.sgld(eta, preconditioner={"v": m}).init(g)
    with pytest.raises(ValueError, match="finite and > 0"):
        bn.sgld(eta, preconditioner={"w": -m}).init(g)


@pytest.mark.parametrize("batch_size", [10, 50])
def test_auto_settings_sample_the_exact_posterior(batch_size):
    # 20 and 4 minibatches per epoch: over an epoch's permutation the minibatch noise sums to
    # zero, so subtracting an estimate made for independent batches would cool the chains
    # (it gave 0.78-0.80 and 0.90-0.93 of the exact variance here)
    mean, cov = exact()
    res = sampling.run(
        jax.random.key(1), PARAMS, lin_ll, lin_lp, (X, Y), batch_size=batch_size,
        auto={"target_ess": 1600, "max_steps": 40_000},
    )  # fmt: skip
    s = res.settings
    assert s["learning_rate"] > 0 and s["num_samples"] >= 1 and s["batch_size"] == batch_size
    assert s["gradient_noise_subtracted"] is False
    assert res.converged, (res.rhat, res.ess)
    got_mean = np.asarray(bn.moments.mean(res.moments)["w"])
    got_var = np.asarray(bn.moments.variance(res.moments)["w"])
    se = np.sqrt(np.diag(cov) / np.min(res.ess))
    assert np.all(np.abs(got_mean - mean) < 5 * se + 0.02)
    # the Euler step d = η M / variance keeps a unit-curvature Gaussian's variance at
    # 1 / (1 − d/2) of the exact one; the pooled ratio has a standard error of about 2%, and
    # the noise that does not cancel within an epoch heats it by about 3% at 20 batches per
    # epoch (over 26 keys: mean 1.042, sd 0.016)
    d = s["learning_rate"] * np.asarray(s["preconditioner"]["w"]) / np.diag(cov)
    ratio = np.mean(got_var / np.diag(cov) * (1 - d / 2))
    assert 0.93 < ratio < 1.10, (ratio, got_var / np.diag(cov))


@pytest.mark.parametrize("batch_size, subtracted", [(10, False), (50, False), (128, True)])
def test_auto_settings_subtract_the_minibatch_noise_only_where_every_step_draws_a_fresh_batch(
    batch_size, subtracted, monkeypatch
):
    # N = 200 < 2n at n = 128: one batch per epoch, so consecutive batches are independent draws
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["gnoise"])
        return run_fixed(*args, **kwargs)

    run_fixed = sampling._run_fixed
    monkeypatch.setattr(sampling, "_run_fixed", spy)
    res = sampling.run(
        jax.random.key(2), PARAMS, lin_ll, lin_lp, (X, Y), batch_size=batch_size,
        auto={"max_steps": 2000},
    )  # fmt: skip
    assert res.settings["gradient_noise_subtracted"] is subtracted
    auto = sampling.auto_settings(
        jax.random.key(0), PARAMS, lin_ll, lin_lp, (X, Y), batch_size=batch_size
    )
    # B = (N² / n)(1 − n / N) mean(x²) per weight for a linear model
    want = N**2 / batch_size * (1 - batch_size / N) * np.mean(X.astype(float) ** 2, 0)
    np.testing.assert_allclose(np.asarray(auto.gradient_noise["w"]), want, rtol=1e-4)
    assert seen
    for g in seen:  # the estimate where it is subtracted, else none
        if subtracted:
            np.testing.assert_allclose(np.asarray(g["w"]), want, rtol=1e-4)
        else:
            assert g is None


def _dead_input_problem(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    x[:, [1, 4]] = 0.0  # two inputs that are zero in every example
    y = (x @ rng.normal(size=6) > 0).astype(np.int32)
    model = bn.nn.MLP((8, 2))
    params = model.init(jax.random.key(seed), x[:1])

    def ll(p, xb, yb):
        logits = model.apply(p, xb)
        return jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], -1)[:, 0]

    return params, ll, (jnp.asarray(x), jnp.asarray(y))


@pytest.mark.parametrize("seed, transform", [(0, bn.sgld), (1, bn.sgld), (0, bn.baoab)])
def test_e_step_defaults_recover_the_prior_of_inputs_without_data(seed, transform):
    params, ll, data = _dead_input_problem(seed)
    h = bn.gsm.hierarchy(params, sigma0=0.7)
    h = h.replace(scales=jax.tree.map(lambda s: 1.5 * s, h.scales))
    res = bn.em.e_step(
        jax.random.key(seed), params, h, ll, data, transform=transform, auto={"max_steps": 3000}
    )
    prior_var = (0.7 * 1.5) ** 2
    var = bn.moments.variance(res.moments)["params"]["Dense_0"]["kernel"][jnp.array([1, 4])]
    mean = bn.moments.mean(res.moments)["params"]["Dense_0"]["kernel"][jnp.array([1, 4])]
    assert abs(float(jnp.mean(var)) / prior_var - 1) < 0.2
    assert float(jnp.mean(jnp.abs(mean))) / np.sqrt(prior_var) < 0.3
    # biases get the proper prior N(0, σ0²): their variance stays finite and positive
    assert np.all(np.isfinite(bn.moments.variance(res.moments)["params"]["Dense_0"]["bias"]))


def test_full_log_prior_and_prior_variance_against_scipy():
    params, _, _ = _dead_input_problem(0)
    h = bn.gsm.hierarchy(params, sigma0=0.5)
    scales = jax.tree.map(lambda s: jnp.linspace(0.5, 2.0, s.shape[0]), h.scales)
    h = h.replace(scales=scales)
    var = bn.gsm.prior_variance(params, h)
    expected = sum(
        stats.norm.logpdf(np.asarray(p), scale=np.sqrt(np.asarray(v))).sum()
        for p, v in zip(jax.tree.leaves(params), jax.tree.leaves(var))
    )
    np.testing.assert_allclose(float(bn.gsm.full_log_prior(params, h)), expected, rtol=1e-5)
    kernel_var = np.asarray(var["params"]["Dense_0"]["kernel"])
    np.testing.assert_allclose(kernel_var[:, 0], (0.5 * np.linspace(0.5, 2.0, 6)) ** 2, rtol=1e-6)
    np.testing.assert_allclose(var["params"]["Dense_0"]["bias"], 0.25)


def test_model_average_and_diagnostics(caplog):
    x_new = jnp.asarray(_rng.normal(size=(7, D)).astype(np.float32))
    run = functools.partial(
        sampling.run,
        jax.random.key(4),
        PARAMS,
        lin_ll,
        lin_lp,
        (X, Y),
        learning_rate=1e-4,
        predict=lambda p, x: x @ p["w"],
    )
    with caplog.at_level(logging.WARNING, logger="bayesnoise"):
        res = run(batch_size=50, num_burnin=10, num_samples=30, num_chains=2, predict_inputs=x_new)
    # the average of a linear predictor over kept states is the predictor at the mean
    mean = bn.moments.mean(res.moments)["w"]
    np.testing.assert_allclose(res.predictive, x_new @ mean, rtol=1e-4, atol=1e-5)
    assert not res.converged and "have not converged" in caplog.text
    assert "let the sampler choose its settings" in caplog.text
    # automatic settings: the advice names the budget instead
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bayesnoise"):
        res = sampling.run(
            jax.random.key(4), PARAMS, lin_ll, lin_lp, (X, Y), transform=bn.baoab,
            num_chains=2, ess_threshold=1e9, auto={"max_steps": 300},
        )  # fmt: skip
    assert not res.converged
    assert "raise auto['max_steps'] (this run took 300 steps per chain)" in caplog.text
    assert res.trace.shape[-1] == len(res.trace_names) >= D
    with pytest.raises(ValueError, match="predict_inputs must hold examples"):
        run(num_samples=5, predict_inputs=jnp.ones((7, D + 1)))


def test_function_space_diagnostics_from_the_traced_predictive():
    from numpyro.diagnostics import split_gelman_rubin

    x_new = jnp.asarray(_rng.normal(size=(40, D)).astype(np.float32))

    def softmax_of(z):  # three classes, each probability a different function of z
        return jax.nn.softmax(jnp.stack([z, -z, 0.5 * z**2], axis=-1))

    def three_class(p, x):  # K = 3 outputs: per input, the one of largest mean is traced
        return softmax_of(x @ p["w"])

    for predict, width in ((lambda p, x: (x @ p["w"])[:, None], 1), (three_class, 3)):
        res = sampling.run(
            jax.random.key(7), PARAMS, lin_ll, lin_lp, (X, Y), transform=bn.baoab,
            auto={"max_steps": 3000}, predict=predict, predict_inputs=x_new,
        )  # fmt: skip
        tr = np.asarray(res.predictive_trace, np.float64)
        # the first 32 held-out inputs at every kept state, from the traced weights
        assert tr.shape == res.trace.shape[:2] + (32, width)
        assert res.trace_names == ("w[0]", "w[1]", "w[2]")
        z = np.einsum("csd,md->csm", np.asarray(res.trace, np.float64), np.asarray(x_new[:32]))
        want = z[..., None] if width == 1 else np.asarray(softmax_of(z), np.float64)
        np.testing.assert_allclose(tr, want, rtol=1e-4, atol=1e-5)
        top = np.argmax(want.mean(axis=(0, 1)), axis=-1)  # each input's output of largest mean
        chosen = np.take_along_axis(want, top[None, None, :, None], axis=-1)[..., 0]
        if width == 3:  # another choice of output gives other figures
            assert len(set(top.tolist())) > 1
            other = np.take_along_axis(want, (top[None, None, :, None] + 1) % 3, axis=-1)[..., 0]
            assert not np.allclose(split_gelman_rubin(other), split_gelman_rubin(chosen), rtol=1e-3)
        np.testing.assert_allclose(res.predictive_rhat, split_gelman_rubin(chosen), rtol=1e-3)
        np.testing.assert_allclose(res.predictive_ess, effective_sample_size(chosen), rtol=1e-3)
        # the chains sample the exact posterior: its predictions have converged
        assert res.converged and np.max(res.predictive_rhat) < 1.05
        assert res.settings["predictive_rhat_max"] == pytest.approx(np.max(res.predictive_rhat))
        assert res.settings["predictive_ess_min"] == pytest.approx(np.min(res.predictive_ess))
    # without predict there is nothing to trace
    res = sampling.run(jax.random.key(7), PARAMS, lin_ll, lin_lp, (X, Y), learning_rate=1e-4)
    assert res.predictive_trace is None and res.predictive_rhat is None
    # one number per input; outputs too wide to trace (1,024 values per state at most); a scalar
    for predict, m in (
        (lambda p, x: x @ p["w"], 32),
        (lambda p, x: jnp.repeat((x @ p["w"])[:, None], 100, axis=1), 10),
        (lambda p, x: jnp.repeat((x @ p["w"])[:, None], 2000, axis=1), None),
        (lambda p, x: jnp.sum(x @ p["w"]), None),
    ):
        res = sampling.run(
            jax.random.key(7), PARAMS, lin_ll, lin_lp, (X, Y), learning_rate=1e-4,
            num_samples=20, predict=predict, predict_inputs=x_new,
        )  # fmt: skip
        assert res.predictive is not None
        if m is None:
            assert res.predictive_trace is None and res.predictive_rhat is None
        else:
            assert res.predictive_trace.shape[2] == m and res.predictive_rhat.shape == (m,)


def test_traced_weights_cover_every_leaf():
    params = {"a": jnp.zeros((50, 40)), "b": jnp.zeros(3), "c": jnp.zeros(())}
    spec, names = sampling._trace_spec(params, 64)
    assert {i for i, _ in spec} == {0, 1, 2} and len(names) >= 64


def test_auto_settings_bad_inputs():
    data = (X, Y)
    with pytest.raises(ValueError, match="not proper in leaf"):
        sampling.run(
            jax.random.key(0),
            {"w": jnp.zeros(D), "b": jnp.zeros(())},
            lambda p, x, y: lin_ll(p, x, y) + 0 * p["b"],
            lin_lp,
            data,
        )
    bad = {"w": jnp.array([1.0, jnp.nan, 0.0])}
    with pytest.raises(ValueError, match="finite and >= 0"):
        sampling.auto_settings(jax.random.key(0), PARAMS, lin_ll, lin_lp, data, curvature=bad)
    with pytest.raises(ValueError, match="tree like the params"):
        sampling.auto_settings(
            jax.random.key(0), PARAMS, lin_ll, lin_lp, data, curvature={"v": jnp.ones(D)}
        )
    with pytest.raises(ValueError, match="pass learning_rate= explicitly for the transform"):
        sampling.run(jax.random.key(0), PARAMS, lin_ll, lin_lp, data, transform=bn.psgld)


def test_nnx_model_through_the_e_step():
    model = nnx.Sequential(
        nnx.Linear(6, 5, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(5, 2, rngs=nnx.Rngs(1))
    )
    graph, state = nnx.split(model)
    _, _, data = _dead_input_problem(0)

    def ll(s, xb, yb):
        logits = nnx.merge(graph, s)(xb)
        return jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], -1)[:, 0]

    h = bn.gsm.hierarchy(state)
    res = bn.em.e_step(jax.random.key(0), state, h, ll, data, auto={"max_steps": 600})
    mean = bn.moments.mean(res.moments)
    assert jax.tree.structure(mean) == jax.tree.structure(state)
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(mean))
    lap = bn.laplace.posterior(state, h, ll, data)
    assert jax.tree.structure(lap.variance) == jax.tree.structure(state)


def test_prior_precision_of_the_gsm_prior():
    params, _, _ = _dead_input_problem(0)
    h = bn.gsm.hierarchy(params, sigma0=0.5)
    prec = sampling.prior_precision(params, functools.partial(bn.gsm.full_log_prior, hierarchy=h))
    var = bn.gsm.prior_variance(params, h)
    for p, v in zip(jax.tree.leaves(prec), jax.tree.leaves(var)):
        np.testing.assert_allclose(p, 1.0 / v, rtol=1e-5)


def test_linen_dense_params_unused():
    # keeps flax.linen imported for readers comparing with the NNX test
    assert nn.Dense(2) is not None


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


def _run_away(start, **kw):
    """U = θ²/2 with no data, η = 3 at T = 0 (θ_{t+1} = −2 θ_t): 2 burn-in steps, 200 kept."""
    return sampling.run(
        jax.random.key(0), start, _no_likelihood, _quadratic_log_prior,
        (np.zeros((4, 1), np.float32),), learning_rate=3.0, temperature=0.0, num_burnin=2,
        num_samples=200, **kw,
    )  # fmt: skip


def test_divergence_names_the_step_and_the_step_size():
    # U = θ²/2 and η = 3 at T = 0: θ_{t+1} = −2 θ_t. The chain has run away at the first step
    # whose U is not finite or exceeds U at the start by 20 nats per parameter (here 40, with
    # no data to add minibatch noise), found by an independent loop in numpy.
    theta, expected = np.ones(2, np.float32), None
    u0 = np.float32(0.5) * np.sum(theta**2)
    for t in range(1000):
        with np.errstate(over="ignore", invalid="ignore"):
            u = np.float32(0.5) * np.sum(theta**2)  # as _quadratic_log_prior computes it
        if not np.isfinite(u) or u > u0 + 40.0:
            expected = t
            break
        theta = theta - np.float32(3.0) * theta
    assert expected is not None
    with pytest.raises(sampling.DivergenceError) as info:
        _run_away({"w": jnp.ones(2)})
    err = info.value
    assert isinstance(err, FloatingPointError) and "fell below" in str(err)
    assert f"step {expected} " in str(err) and f"sampling step {expected - 2}" in str(err)
    assert "η_t = 3" in str(err)
    assert err.step == expected and err.step_size == 3.0 and err.chain == 0
    # the state is frozen at its last finite value, and no NaN entered the moments
    assert np.all(np.isfinite(err.result.params["w"]))
    assert np.all(np.isfinite(moments.mean(err.result.moments)["w"]))
    assert float(err.result.moments.count) == expected - 2


def test_the_loop_ends_at_the_first_divergence_of_any_chain():
    # chain 0 runs away as in the test above; chain 1 starts at the mode θ = 0, where T = 0 keeps
    # it for ever: it stops with chain 0, having kept its states up to that step (chain 0 those
    # before it) instead of all 200
    start = {"w": jnp.stack([jnp.ones(2), jnp.zeros(2)])}
    with pytest.raises(sampling.DivergenceError) as info:
        _run_away(start, num_chains=2, params_per_chain=True)
    err = info.value
    assert err.chain == 0 and "1 of 2 chains diverged at that step" in str(err)
    counts = np.asarray(err.result.chain_moments.count)
    np.testing.assert_array_equal(counts, [err.step - 2, err.step - 1])
    np.testing.assert_array_equal(np.asarray(err.result.params["w"][1]), [0.0, 0.0])


def _scaled_log_prior(p, scale):
    return -0.5 * jnp.sum((p["w"] / scale) ** 2)


def test_runs_that_differ_in_lengths_and_prior_values_share_one_compiled_loop():
    # the numbers of steps and the arguments of a Partial log prior enter the loop as data
    prior = lambda s: jax.tree_util.Partial(_scaled_log_prior, scale=jnp.float32(s))
    kw = dict(learning_rate=1e-3, batch_size=20, num_chains=2)
    sampling.run(
        jax.random.key(0), PARAMS, lin_ll, prior(1.0), (X, Y), num_burnin=10, num_samples=20,
        thin=2, **kw,
    )  # fmt: skip
    compiled = sampling._sample._cache_size()
    res = sampling.run(
        jax.random.key(1), PARAMS, lin_ll, prior(0.5), (X, Y), num_burnin=30, num_samples=25,
        thin=3, **kw,
    )  # fmt: skip
    assert sampling._sample._cache_size() == compiled
    assert res.num_steps == 30 + 25 * 3 and res.trace.shape[:2] == (2, 25)
    np.testing.assert_array_equal(np.asarray(res.chain_moments.count), [25, 25])
    # the same chains as with the prior's value compiled in
    closed = sampling.run(
        jax.random.key(1), PARAMS, lin_ll, lambda p: _scaled_log_prior(p, 0.5), (X, Y),
        num_burnin=30, num_samples=25, thin=3, **kw,
    )  # fmt: skip
    np.testing.assert_allclose(
        moments.mean(res.moments)["w"], moments.mean(closed.moments)["w"], rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(res.trace), np.asarray(closed.trace), rtol=1e-4, atol=1e-6
    )


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
