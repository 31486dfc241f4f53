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
from scipy import stats

import bayesnoise as bn
from bayesnoise import sampling

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


def test_auto_settings_sample_the_exact_posterior():
    mean, cov = exact()
    res = sampling.run(jax.random.key(1), PARAMS, lin_ll, lin_lp, (X, Y), batch_size=50)
    assert res.settings["learning_rate"] > 0 and res.settings["num_samples"] >= 1
    assert res.converged, (res.rhat, res.ess)
    got_mean = np.asarray(bn.moments.mean(res.moments)["w"])
    got_var = np.asarray(bn.moments.variance(res.moments)["w"])
    se = np.sqrt(np.diag(cov) / np.min(res.ess))
    assert np.all(np.abs(got_mean - mean) < 5 * se + 0.02)
    np.testing.assert_allclose(got_var, np.diag(cov), rtol=0.3)


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


@pytest.mark.parametrize("seed", [0, 1])
def test_e_step_defaults_recover_the_prior_of_inputs_without_data(seed):
    params, ll, data = _dead_input_problem(seed)
    h = bn.gsm.hierarchy(params, sigma0=0.7)
    h = h.replace(scales=jax.tree.map(lambda s: 1.5 * s, h.scales))
    res = bn.em.e_step(jax.random.key(seed), params, h, ll, data, auto={"max_steps": 3000})
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
    assert res.trace.shape[-1] == len(res.trace_names) >= D
    with pytest.raises(ValueError, match="predict_inputs must hold examples"):
        run(num_samples=5, predict_inputs=jnp.ones((7, D + 1)))


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
