"""Bad inputs to the core modules (noise, gsm, penalties, moments, sgld) raise clear errors:
a ValueError or TypeError naming the argument, showing the value and saying what is allowed.
Valid inputs, traced values included, still pass."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from bad_inputs import (
    bad_count,
    bad_key,
    bad_positive,
    bad_probability,
    clear_error,
    not_finite,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

import bayesnoise as bn

KEY = jax.random.key(0)
PARAMS = {"params": {"Dense_0": {"kernel": jnp.ones((5, 3)), "bias": jnp.zeros(3)}}}
H = bn.gsm.hierarchy(PARAMS)
X = jnp.ones((4, 3))
W = jnp.ones(3)
Y = jnp.ones(4)
INF, NAN = math.inf, math.nan

bad_variance = st.one_of(
    not_finite(), st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False)
)


def moments_of(values, shape=(3,)):
    state = bn.moments.init({"w": jnp.zeros(shape)})
    for v in values:
        state = bn.moments.update(state, {"w": jnp.full(shape, v)})
    return state


def with_scales(value):
    return H.replace(
        scales=jax.tree.map(
            lambda s: None if s is None else jnp.full_like(s, value),
            H.scales,
            is_leaf=lambda s: s is None,
        )
    )


# ------------------------------------------------------------------------------------ noise


@settings(max_examples=15, deadline=None)
@given(value=bad_positive())
def test_gaussian_rejects_a_bad_alpha(value):
    with clear_error("alpha", value) as err:
        bn.noise.Gaussian(alpha=value)
    assert err.type in (TypeError, ValueError) and "Gaussian: alpha must be" in str(err.value)


@settings(max_examples=15, deadline=None)
@given(value=bad_probability())
def test_bernoulli_rejects_a_bad_keep(value):
    with clear_error("keep", value) as err:
        bn.noise.Bernoulli(keep=value)
    assert err.type in (TypeError, ValueError) and "in (0, 1]" in str(err.value)


@pytest.mark.parametrize("value", ["0.5", None, True, np.array([0.5, 0.7])])
def test_bernoulli_rejects_a_keep_that_is_not_a_number(value):
    with clear_error("keep", value, kinds=TypeError) as err:
        bn.noise.Bernoulli(keep=value)
    assert err.type is TypeError and "Bernoulli: keep must be a finite number" in str(err.value)


@pytest.mark.parametrize("value", ["1", None, False])
def test_gaussian_rejects_an_alpha_that_is_not_a_number(value):
    with clear_error("alpha", value, kinds=TypeError) as err:
        bn.noise.Gaussian(alpha=value)
    assert err.type is TypeError and "Gaussian: alpha must be a finite number" in str(err.value)


def test_noise_parameters_must_fit_float32():
    with pytest.raises(ValueError, match=r"Gaussian: alpha must be a finite number.*1000\.\.\."):
        bn.noise.Gaussian(alpha=10**400)
    with clear_error("concentration", 1e300):
        bn.noise.Gamma(concentration=1e300)


@pytest.mark.parametrize(
    "make,argument,value",
    [
        (lambda: bn.noise.Gamma(1.0, rate=INF), "rate", INF),
        (lambda: bn.noise.Beta(a=INF, b=1.0), "a", INF),
        (lambda: bn.noise.LogNormal(loc=NAN), "loc", NAN),
        (lambda: bn.noise.LogNormal(loc=INF), "loc", INF),
        (lambda: bn.noise.LogNormal(loc="0"), "loc", "0"),
        (lambda: bn.noise.InverseGammaScale(a=1.0, b=-INF), "b", -INF),
    ],
)
def test_noise_parameters_must_be_finite(make, argument, value):
    with clear_error(argument, value) as err:
        make()
    assert err.type in (TypeError, ValueError) and "must be a finite number" in str(err.value)


NOISES = [
    bn.noise.Bernoulli(0.8),
    bn.noise.Gaussian(1.0),
    bn.noise.Beta(2.0, 1.0),
    bn.noise.Gamma(2.0, 2.0),
]


@pytest.mark.parametrize("noise", NOISES, ids=lambda n: type(n).__name__)
def test_sample_needs_a_key(noise):
    with clear_error("key", None, kinds=TypeError) as err:
        noise.sample()
    assert err.type is TypeError and "key must be a PRNG key" in str(err.value)


@settings(max_examples=15, deadline=None)
@given(key=bad_key(), noise=st.sampled_from(NOISES))
def test_sample_rejects_a_bad_key(key, noise):
    with clear_error("key", key, kinds=TypeError) as err:
        noise.sample(key, (3,))
    assert err.type is TypeError and "key must be a PRNG key" in str(err.value)


@pytest.mark.parametrize("noise", NOISES, ids=lambda n: type(n).__name__)
@pytest.mark.parametrize(
    "shape,kind", [((-1,), ValueError), ((2, -3), ValueError), ((2.5,), TypeError)]
)
def test_sample_rejects_a_bad_shape(noise, shape, kind):
    with clear_error("shape", shape, kinds=kind) as err:
        noise.sample(KEY, shape)
    assert err.type is kind and "shape must be a tuple of ints >= 0" in str(err.value)


def test_sample_takes_an_int_shape_as_one_axis():
    assert bn.noise.Bernoulli(0.8).sample(KEY, 3).shape == (3,)
    assert bn.noise.Gaussian(1.0).rsample(KEY, 2).shape == (2,)


def test_rsample_checks_its_key():
    with clear_error("key", None, kinds=TypeError) as err:
        bn.noise.Gaussian(1.0).rsample(None, (2,))
    assert err.type is TypeError and "key must be a PRNG key" in str(err.value)


@pytest.mark.parametrize("noise", [bn.noise.Gaussian(1.0), bn.noise.Beta(2.0, 3.0)])
def test_log_prob_rejects_text(noise):
    with clear_error("x", "abc", kinds=TypeError) as err:
        noise.log_prob("abc")
    assert err.type is TypeError and "x must be a real number" in str(err.value)


def test_traced_noise_parameters_pass():
    grad = jax.grad(lambda a: bn.noise.Gaussian(a).rsample(KEY, (3,)).sum())(0.5)
    assert np.isfinite(float(grad))
    draw = jax.jit(lambda k: bn.noise.Bernoulli(0.5).sample(k, (4,)))(KEY)
    assert draw.shape == (4,)


def test_bad_noise_specs():
    with clear_error("[bad", "[bad"):
        bn.noise.check_spec({"[bad": bn.noise.Bernoulli(0.5)})
    with clear_error("noise", "x", kinds=TypeError):
        bn.noise.resolve("x", "Dense_0/kernel")


# ------------------------------------------------------------------------------------ gsm


@settings(max_examples=15, deadline=None)
@given(value=bad_positive())
def test_hierarchy_rejects_a_bad_sigma0(value):
    with clear_error("sigma0", value) as err:
        bn.gsm.hierarchy(PARAMS, sigma0=value)
    assert err.type in (TypeError, ValueError) and "must be a finite number > 0" in str(err.value)


@pytest.mark.parametrize("value", ["1", np.ones(7)])
def test_hierarchy_rejects_a_sigma0_that_is_not_a_number(value):
    with clear_error("sigma0", value, kinds=TypeError) as err:
        bn.gsm.hierarchy(PARAMS, sigma0=value)
    assert err.type is TypeError and "sigma0 (the prior standard deviation" in str(err.value)


def test_where_that_matches_nothing_is_shown():
    with clear_error("where", "nomatch") as err:
        bn.gsm.hierarchy(PARAMS, where="nomatch")
    assert err.type is ValueError and "no leaf of the params tree is noised" in str(err.value)


@pytest.mark.parametrize("value", [0.0, -1.0, NAN])
@pytest.mark.parametrize("fn", [bn.gsm.log_prior, bn.gsm.full_log_prior])
def test_log_prior_rejects_scales_that_are_not_positive(fn, value):
    with clear_error("scales", value) as err:
        fn(PARAMS, with_scales(value))
    assert err.type is ValueError
    assert "finite and > 0" in str(err.value) and "params/Dense_0/kernel" in str(err.value)


def test_log_prior_checks_the_hierarchy():
    with clear_error("hierarchy", "x", kinds=TypeError):
        bn.gsm.log_prior(PARAMS, "x")
    with clear_error("sigma0", NAN):
        bn.gsm.full_log_prior(PARAMS, H.replace(sigma0=NAN))
    # traced scales pass (the check needs concrete values)
    assert np.isfinite(float(jax.jit(bn.gsm.log_prior)(PARAMS, H)))


def test_sample_prior_checks_the_noise_and_the_key():
    with clear_error("noise", "bernoulli", kinds=TypeError) as err:
        bn.gsm.sample_prior(KEY, PARAMS, "bernoulli")
    assert "bayesnoise.noise distribution" in str(err.value) and "got str" in str(err.value)
    # a good noise and key give a draw of the params' shapes
    v, lambdas = bn.gsm.sample_prior(KEY, PARAMS, bn.noise.Gaussian(1.0))
    assert v["params"]["Dense_0"]["kernel"].shape == (5, 3)


@settings(max_examples=15, deadline=None)
@given(key=bad_key())
def test_sample_prior_rejects_a_bad_key(key):
    with clear_error("key", key, kinds=TypeError) as err:
        bn.gsm.sample_prior(key, PARAMS, bn.noise.Gaussian(1.0))
    assert str(err.value).startswith("key must be a PRNG key")


# ------------------------------------------------------------------------------------ penalties


@settings(max_examples=15, deadline=None)
@given(value=bad_variance)
def test_penalties_reject_a_bad_noise_variance(value):
    with clear_error("noise", value):
        bn.penalties.linear_regression(W, X, value)
    with clear_error("noise", value):
        bn.penalties.approx_expected_logistic_loss(W, X, Y, value)


def test_penalties_reject_a_noise_that_is_not_one():
    with clear_error("noise", "gauss", kinds=TypeError) as err:
        bn.penalties.logistic_regression(W, X, "gauss")
    assert "bayesnoise.noise distribution or the noise variance" in str(err.value)
    with clear_error("noise", "inf") as err:  # an infinite variance
        bn.penalties.linear_regression(W, X, bn.noise.InverseGammaScale(0.8, 1.0))
    assert err.type is ValueError and "variance inf" in str(err.value)
    with clear_error("mean", NAN) as err:
        bn.penalties.expected_linear_loss(W, X, Y, 0.5, mean=NAN)
    assert err.type is ValueError and "must be a finite number" in str(err.value)


def test_penalties_check_shapes():
    with clear_error("w", "(7,)"):
        bn.penalties.expected_linear_loss(jnp.ones(7), X, Y, 0.5)
    with clear_error("x", "(3,)"):
        bn.penalties.linear_regression(W, jnp.ones(3), 0.5)
    with clear_error("y", "(4, 1)"):
        bn.penalties.expected_linear_loss(W, X, jnp.ones((4, 1)), 0.5)
    with clear_error("y", "(5,)"):
        bn.penalties.approx_expected_logistic_loss(W, X, jnp.ones(5), 0.5)
    with clear_error("b", "(3,)"):
        bn.penalties.logistic_regression(W, X, 0.5, b=jnp.ones(3))
    with clear_error("b", NAN):
        bn.penalties.logistic_regression(W, X, 0.5, b=NAN)


def test_kl_log_uniform_checks_log_alpha():
    with clear_error("log_alpha", "a", kinds=TypeError):
        bn.penalties.kl_log_uniform("a")
    with clear_error("log_alpha", "NaN"):
        bn.penalties.kl_log_uniform(jnp.array([0.0, jnp.nan]))
    np.testing.assert_array_equal(bn.penalties.kl_log_uniform(jnp.array([jnp.inf])), [0.0])


def test_ml2_penalties_check_the_hierarchy():
    with clear_error("hierarchy", "None", kinds=TypeError):
        bn.penalties.log_norm(PARAMS, None)


# ------------------------------------------------------------------------------------ moments


@pytest.mark.parametrize("fn", [bn.moments.mean, bn.moments.std, bn.moments.second_moment])
def test_summaries_of_no_samples_are_errors(fn):
    with clear_error("state", "no samples") as err:
        fn(moments_of([]))
    assert err.type is ValueError
    assert str(err.value).startswith(f"{fn.__name__}: the state holds no samples (count 0)")


def test_summaries_of_no_samples_pass_under_jit():
    # a traced count is not checked
    assert jax.jit(bn.moments.mean)(moments_of([]))["w"].shape == (3,)


def test_ddof_needs_more_samples():
    with clear_error("ddof", "1"):
        bn.moments.std(moments_of([2.0]), ddof=1)
    with clear_error("ddof", "5"):
        bn.moments.variance(moments_of([1.0, 2.0, 4.0]), ddof=5)
    assert float(bn.moments.variance(moments_of([1.0, 3.0]), ddof=1.0)["w"][0]) == 2.0


@settings(max_examples=15, deadline=None)
@given(ddof=st.one_of(bad_count(0), st.just("1")))
@example(ddof=-(2**63) - 1)  # beyond int64: NumPy reads it as an object
@example(ddof=-(10**400))  # beyond float64 too: compared as an int
def test_variance_rejects_a_bad_ddof(ddof):
    state = moments_of([1.0, 2.0])
    if isinstance(ddof, float) and math.isfinite(ddof) and ddof.is_integer():
        return  # a whole float counts as its int
    with clear_error("ddof", ddof) as err:
        bn.moments.variance(state, ddof=ddof)
    assert str(err.value).startswith("ddof must be an int >= 0")
    # a negative int is a bad value, anything else a bad type
    negative_int = isinstance(ddof, int) and not isinstance(ddof, bool) and ddof < 0
    assert err.type is (ValueError if negative_int else TypeError)


@pytest.mark.parametrize(
    "sample,value",
    [
        ({"w": jnp.ones(3), "v": jnp.ones(2)}, "'v'"),
        ({"w": jnp.ones(4)}, "(4,)"),
        ({"w": jnp.ones((2, 3))}, "(2, 3)"),
    ],
)
def test_update_needs_the_state_tree(sample, value):
    with clear_error("sample", value) as err:
        bn.moments.update(moments_of([]), sample)
    assert err.type is ValueError
    assert "tree structure of the state" in str(err.value) or "shapes of the state" in str(
        err.value
    )


def test_merge_needs_the_same_tree():
    a = moments_of([1.0, 2.0])
    with clear_error("b", "(4,)") as err:
        bn.moments.merge(a, moments_of([1.0], shape=(4,)))
    assert err.type is ValueError and "b must have the shapes of a" in str(err.value)
    b = bn.moments.update(bn.moments.init({"v": jnp.zeros(3)}), {"v": jnp.ones(3)})
    with clear_error("b", "'v'") as err:
        bn.moments.merge(a, b)
    assert err.type is ValueError and "b must have the tree structure of a" in str(err.value)
    with clear_error("b", "dict", kinds=TypeError) as err:
        bn.moments.merge(a, {"w": 1})
    assert "bn.moments.MomentsState" in str(err.value)


def test_state_must_be_a_moments_state():
    with clear_error("state", "dict", kinds=TypeError) as err:
        bn.moments.mean({"w": jnp.ones(3)})
    assert err.type is TypeError and "MomentsState" in str(err.value)
    with clear_error("params", "'abc'", kinds=TypeError) as err:
        bn.moments.init({"w": "abc"})
    assert err.type is TypeError and "'abc'" in str(err.value)


def test_update_checks_shapes_under_jit():
    with clear_error("sample", "(4,)") as err:
        jax.jit(bn.moments.update)(moments_of([]), {"w": jnp.ones(4)})
    assert err.type is ValueError and "(4,)" in str(err.value)


# ------------------------------------------------------------------------------------ sgld


@settings(max_examples=15, deadline=None)
@given(value=st.one_of(bad_positive(), st.just("0.1")))
def test_sgld_rejects_a_bad_learning_rate(value):
    with clear_error("learning_rate", value) as err:
        bn.sgld(value)
    assert err.type in (ValueError, TypeError) and "learning_rate" in str(err.value)
    with clear_error("learning_rate", value) as err:
        bn.psgld(value)
    assert err.type in (ValueError, TypeError) and "learning_rate" in str(err.value)


@settings(max_examples=15, deadline=None)
@given(value=st.one_of(not_finite(), st.floats(max_value=-1e-9, allow_nan=False)))
def test_sgld_rejects_a_bad_temperature(value):
    with clear_error("temperature", value) as err:
        bn.sgld(1e-3, temperature=value)
    assert err.type is ValueError and "temperature" in str(err.value)


@pytest.mark.parametrize("key", [1.5, "abc", 2**70, np.zeros(3, np.float32)])
def test_sgld_key_is_shown(key):
    with clear_error("key", key) as err:
        bn.sgld(1e-3, key=key)
    assert err.type in (ValueError, TypeError) and "key" in str(err.value)


@pytest.mark.parametrize(
    "build,argument,value",
    [
        (lambda: bn.psgld(1e-3, decay=INF), "decay", INF),
        (lambda: bn.psgld(1e-3, eps=NAN), "eps", NAN),
        (lambda: bn.sgld(1e-3, max_drift=INF), "max_drift", INF),
        (lambda: bn.polynomial_schedule(INF, 1.0, 0.6), "a", INF),
    ],
)
def test_sgld_settings_must_be_finite(build, argument, value):
    with clear_error(argument, value) as err:
        build()
    assert err.type is ValueError and argument in str(err.value)


def test_sgld_update_checks_its_state_and_gradients():
    params = {"w": jnp.zeros(3)}
    opt = bn.sgld(1e-3, key=0)
    with clear_error("state", "None", kinds=TypeError) as err:
        opt.update(params, None)
    assert err.type is TypeError and "None" in str(err.value)
    opt = bn.psgld(1e-3, key=0)
    state = opt.init(params)
    with clear_error("updates", "(4,)") as err:
        opt.update({"w": jnp.ones(4)}, state)
    assert err.type is ValueError and "(4,)" in str(err.value)
    with clear_error("updates", "'v'") as err:
        opt.update({"v": jnp.ones(3)}, state)
    assert err.type is ValueError and "'v'" in str(err.value)


def test_sgld_under_inject_hyperparams_still_works():
    opt = optax.inject_hyperparams(bn.sgld)(0.1, temperature=0.0)
    state = opt.init({"w": jnp.zeros(2)})
    updates, _ = jax.jit(opt.update)({"w": jnp.ones(2)}, state)
    np.testing.assert_allclose(updates["w"], [-0.1, -0.1], rtol=1e-6)
