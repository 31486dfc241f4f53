"""The exact move along the directions a softmax ignores: the likelihood does not see it, the
prior alone sets its draw, and a chain that makes it keeps its target.

Checked against independent computations: the network's log-likelihood before and after a
shift, the closed-form Gaussian conditional along each line (mean and variance of the drawn
row means over many keys), and the posterior marginal of the output rows' means, which is the
prior's N(0, v / K) exactly because the likelihood ignores them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bayesnoise as bn
from bayesnoise import sampling

MLP = bn.nn.MLP(features=(6, 5, 3))
X = jax.random.normal(jax.random.key(0), (60, 4))
Y = jax.random.randint(jax.random.key(1), (60,), 0, 3)


def _params(seed=2):
    return MLP.init(jax.random.key(seed), X)


def _log_likelihood(p, x, y):
    logits = MLP.apply(p, x)
    return jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0]


def _hierarchy(params, scales_out=(0.2, 0.5, 1.0, 1.5, 3.0)):
    """Unequal scales on the output layer's rows (one per hidden unit of the last layer)."""
    h = bn.gsm.hierarchy(params, 1.0)
    scales = jax.tree.map(jnp.ones_like, h.scales)
    scales["params"]["Dense_2"]["kernel"] = jnp.asarray(scales_out, jnp.float32)
    return h.replace(scales=scales)


def test_class_shifts_finds_the_output_layer_and_the_likelihood_ignores_a_shift():
    params = _params()
    move = sampling.class_shifts(params)
    assert move.leaves == (("params/Dense_2/kernel", 1), ("params/Dense_2/bias", 0))
    shifted = move.shifted(params, 0.7)
    np.testing.assert_allclose(
        _log_likelihood(shifted, X, Y), _log_likelihood(params, X, Y), rtol=1e-5, atol=1e-5
    )
    # the logits do move: the shift is real, the softmax removes it
    assert not np.allclose(MLP.apply(shifted, X), MLP.apply(params, X), atol=0.1)


@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_the_draw_is_the_priors_gaussian_along_each_line(temperature):
    """From one fixed state, the shift of every row over many keys is N(m, T / P) with
    P = sum 1/v and m = -sum(x / v) / P: rows keep their deviations, and their means become
    N(0, T v / K) whatever they were."""
    params = _params()
    params["params"]["Dense_2"]["kernel"] = params["params"]["Dense_2"]["kernel"] + 2.0
    h = _hierarchy(params)
    log_prior = jax.tree_util.Partial(bn.gsm.full_log_prior, hierarchy=h)
    move = sampling.class_shifts(params)
    n = 20_000
    keys = jax.random.split(jax.random.key(3), n)
    moved, _, drawn = jax.vmap(lambda k: move(k, params, log_prior, temperature))(keys)
    assert int(drawn[0]) == 5 + 1  # the kernel's 5 rows and the bias
    w0 = np.asarray(params["params"]["Dense_2"]["kernel"], np.float64)
    w = np.asarray(moved["params"]["Dense_2"]["kernel"], np.float64)  # (n, 5, 3)
    # deviations from each row's mean are untouched
    np.testing.assert_allclose(
        w - w.mean(-1, keepdims=True), np.broadcast_to(w0 - w0.mean(-1, keepdims=True), w.shape),
        atol=1e-5,
    )  # fmt: skip
    v = np.asarray(bn.gsm.prior_variance(params, h)["params"]["Dense_2"]["kernel"])[:, 0]
    means = w.mean(-1)  # (n, 5)
    want_var = temperature * v / 3
    # mean ~ N(0, T v / K): its sample mean within 4 standard errors, its variance within 4%
    assert np.all(np.abs(means.mean(0)) < 4 * np.sqrt(want_var / n))
    np.testing.assert_allclose(means.var(0) / want_var, 1.0, atol=0.04)
    b = np.asarray(moved["params"]["Dense_2"]["bias"], np.float64)
    np.testing.assert_allclose(b.mean(-1).var() / (temperature / 3), 1.0, atol=0.04)


@pytest.mark.slow  # two chains of 8 x 1,500 steps (15 s): `make test-slow`
def test_a_chain_with_the_move_gives_the_output_rows_means_their_prior():
    """In the posterior, each output row's mean over the classes is N(0, v / K) exactly: the
    softmax ignores it, and under a Gaussian prior it is independent of the row's deviations.
    BAOAB with a small metric (a preconditioner fitted to strong data curvature), started at
    the same state with and without the move: with it, the row means have that variance;
    without it the widest row's mean barely leaves its start within the same steps."""
    params = _params()
    h = _hierarchy(params)
    log_prior = jax.tree_util.Partial(bn.gsm.full_log_prior, hierarchy=h)
    move = sampling.class_shifts(params)
    v = np.asarray(bn.gsm.prior_variance(params, h)["params"]["Dense_2"]["kernel"])[:, 0]

    def row_means(move):
        state = sampling.init(
            params,
            _log_likelihood,
            log_prior,
            len(X),
            transform=bn.baoab(0.05, preconditioner=jax.tree.map(lambda x: 0.02, params)),
            move=move,
        )

        def body(s, k):
            s, _ = sampling.step(k, s, (X, Y))
            return s, s.params["params"]["Dense_2"]["kernel"].mean(-1)

        def chain(key):
            return jax.lax.scan(body, state, jax.random.split(key, 1500))[1][300:]

        return np.asarray(jax.jit(jax.vmap(chain))(jax.random.split(jax.random.key(4), 8)))

    with_move = row_means(move).reshape(-1, 5)
    ratio = with_move.var(0) / (v / 3)
    # 8 chains x 1,200 states, nearly independent draws of the means: within 15%
    np.testing.assert_allclose(ratio, 1.0, atol=0.15)
    without = row_means(None).reshape(-1, 5)
    # the widest row (v = 9) relaxes over about v / 0.02 = 450 time units, 50 times the run
    assert (without.var(0) / (v / 3))[-1] < 0.5


def test_bad_class_shifts_are_clear_errors():
    params = _params()
    h = _hierarchy(params)
    log_prior = jax.tree_util.Partial(bn.gsm.full_log_prior, hierarchy=h)
    move = sampling.class_shifts(params)

    def squared_error(p, x, y):  # reads the logits directly, not through a softmax
        return -jnp.sum((MLP.apply(p, x) - jax.nn.one_hot(y, 3)) ** 2, axis=-1)

    with pytest.raises(ValueError) as err:
        sampling.run(
            jax.random.key(0), params, squared_error, log_prior, (X, Y),
            learning_rate=1e-3, num_samples=2, move=move,
        )  # fmt: skip
    assert "only through a softmax" in str(err.value)
    assert "changed the log-likelihood" in str(err.value)
    with pytest.raises(ValueError) as err:
        sampling.init(
            params, _log_likelihood, lambda p: bn.gsm.full_log_prior(p, h), len(X),
            transform=bn.sgld(1e-3), move=move,
        )  # fmt: skip
    assert "needs the GSM prior as jax.tree_util.Partial" in str(err.value)
    with pytest.raises(ValueError) as err:
        sampling.ClassShifts((("params/Dense_2/kernel", True),))
    assert "(leaf path, class axis)" in str(err.value)
    with pytest.raises(ValueError) as err:
        sampling.init(
            params, _log_likelihood, log_prior, len(X), transform=bn.sgld(1e-3),
            move=sampling.ClassShifts((("params/Dense_2/kernel", 3),)),
        )  # fmt: skip
    assert "axis 3 of 'params/Dense_2/kernel'" in str(err.value)
    with pytest.raises(TypeError) as err:
        bn.em.e_step(jax.random.key(0), params, h, _log_likelihood, (X, Y), class_shifts="yes")
    assert "class_shifts must be True or False, got 'yes'" in str(err.value)
    with pytest.raises(ValueError) as err:
        bn.em.e_step(
            jax.random.key(0), params, h, _log_likelihood, (X, Y), class_shifts=True, move=move
        )
    assert "not both" in str(err.value)


def test_the_config_takes_class_shifts_for_classification_only():
    cfg = bn.config.load_config({"sgld": {"class_shifts": True}})
    assert cfg.sgld.run_settings()["class_shifts"] is True
    assert "class_shifts" not in bn.config.load_config({}).sgld.run_settings()
    with pytest.raises(bn.config.ConfigError) as err:
        bn.config.load_config({"data": {"name": "diabetes"}, "sgld": {"class_shifts": True}})
    assert "sgld.class_shifts" in str(err.value) and "regression" in str(err.value)
