"""Bad inputs to the inference modules (sampling, laplace, em, prune, inference) raise clear
errors: a ValueError or TypeError naming the argument, showing the value and saying what is
allowed. Valid inputs, traced values included, still pass."""

import math

import bad_inputs as bad
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bayesnoise as bn

KEY = jax.random.key(0)
PARAMS = {"params": {"Dense_0": {"kernel": jnp.ones((5, 3)), "bias": jnp.zeros(3)}}}
H = bn.gsm.hierarchy(PARAMS)
X = jax.random.normal(jax.random.key(1), (8, 5))
Y = jnp.arange(8) % 3
DATA = (X, Y)
INF, NAN = math.inf, math.nan

bad_std = st.one_of(bad.not_finite(), st.floats(min_value=-1e6, max_value=-1e-3, allow_nan=False))
bad_fraction = st.one_of(
    bad.not_finite(),
    st.floats(max_value=-1e-3, min_value=-1e6, allow_nan=False),
    st.floats(min_value=1.001, max_value=1e6, allow_nan=False),
)


def log_likelihood(p, x, y):
    layer = p["params"]["Dense_0"]
    logits = x @ layer["kernel"] + layer["bias"]
    return jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]


def log_prior(p):
    return -0.5 * sum(jnp.sum(w**2) for w in jax.tree.leaves(p))


def run(**kwargs):
    settings_ = dict(learning_rate=1e-3, batch_size=4, num_burnin=1, num_samples=1)
    settings_.update(kwargs)
    key = settings_.pop("key", KEY)
    params = settings_.pop("params", PARAMS)
    data = settings_.pop("data", DATA)
    return bn.sampling.run(key, params, log_likelihood, log_prior, data, **settings_)


def with_value(tree, value):
    return jax.tree.map(lambda x: jnp.full_like(x, value), tree)


def apply_fn(key, x):
    return x @ PARAMS["params"]["Dense_0"]["kernel"] + jax.random.normal(key, (3,))


# ------------------------------------------------------------------------------- sampling


@settings(max_examples=15, deadline=None)
@given(value=bad.bad_key())
def test_run_rejects_a_bad_key(value):
    with bad.clear_error("key", value) as err:
        run(key=value)
    assert err.type in (TypeError, ValueError) and "PRNG key" in str(err.value)


def test_run_rejects_key_none():
    with bad.clear_error("key", None) as err:
        run(key=None)
    assert err.type is TypeError and "jax.random.key(0)" in str(err.value)
    # the same call with a key samples: one kept state per chain, finite
    res = run(key=KEY)
    assert int(res.moments.count) == 1 and np.all(np.isfinite(np.asarray(res.trace)))


@settings(max_examples=15, deadline=None)
@given(value=bad.bad_positive())
def test_run_rejects_a_bad_learning_rate(value):
    with bad.clear_error("learning_rate", value) as err:
        run(learning_rate=value)
    assert err.type in (TypeError, ValueError) and "> 0" in str(err.value)


@settings(max_examples=15, deadline=None)
@given(value=st.one_of(bad.not_finite(), st.floats(max_value=-1e-3, allow_infinity=False)))
def test_run_rejects_a_bad_temperature(value):
    with bad.clear_error("temperature", value) as err:
        run(temperature=value)
    assert err.type in (TypeError, ValueError) and ">= 0" in str(err.value)


@settings(max_examples=15, deadline=None)
@given(
    name=st.sampled_from(["num_chains", "num_samples", "thin", "batch_size"]),
    value=bad.bad_count(1),
)
def test_run_rejects_a_bad_count(name, value):
    with bad.clear_error(name, value) as err:
        run(**{name: value})
    assert err.type in (TypeError, ValueError) and f"{name} " in str(err.value)


@settings(max_examples=10, deadline=None)
@given(value=bad.bad_count(0))
def test_run_rejects_a_bad_burn_in(value):
    with bad.clear_error("num_burnin", value) as err:
        run(num_burnin=value)
    assert err.type in (TypeError, ValueError) and "int >= 0" in str(err.value)


def test_run_rejects_a_batch_larger_than_the_data():
    with bad.clear_error("batch_size", 100) as err:
        run(batch_size=100)
    assert err.type is ValueError and "8 examples" in str(err.value)
    # the whole data set as one batch is allowed
    res = run(batch_size=8)
    assert res.settings["learning_rate"] == 1e-3 and int(res.moments.count) == 1


@settings(max_examples=10, deadline=None)
@given(
    name=st.sampled_from(["rhat_threshold", "ess_threshold"]),
    value=bad.bad_positive(),
)
def test_run_rejects_a_bad_threshold(name, value):
    with bad.clear_error(name, value) as err:
        run(**{name: value})
    assert err.type in (TypeError, ValueError) and name in str(err.value)


@pytest.mark.parametrize("value", [NAN, INF])
def test_run_rejects_params_that_are_not_finite(value):
    params = jax.tree.map(lambda x: x.at[0].set(value), PARAMS)
    with bad.clear_error("params", value) as from_run:
        run(params=params)
    with bad.clear_error("params", value) as from_init:
        bn.sampling.init(params, log_likelihood, log_prior, 8, transform=bn.sgld(1e-3))
    # both name the leaf, in the same words
    assert from_run.type is from_init.type is ValueError
    assert "'params/Dense_0/bias'" in str(from_run.value)
    assert str(from_run.value) == str(from_init.value)


def test_run_at_a_start_whose_log_posterior_is_nan_says_so():
    with pytest.raises(bn.sampling.DivergenceError, match="already NaN or inf at the starting"):
        bn.sampling.run(
            KEY, PARAMS, log_likelihood, lambda p: jnp.nan * log_prior(p), DATA,
            learning_rate=1e-3, num_burnin=1, num_samples=1,
        )  # fmt: skip


def test_run_rejects_bad_functions_data_and_predictions():
    with bad.clear_error("log_likelihood", None):
        bn.sampling.run(KEY, PARAMS, None, log_prior, DATA, learning_rate=1e-3)
    with bad.clear_error("transform", None):
        run(transform=None)
    with bad.clear_error("data", None):
        run(data=None)
    with bad.clear_error("data", "(8, 5)"):
        run(data=(X, Y[:7]))
    with bad.clear_error("predict_inputs", "(3, 4)"):
        run(predict=lambda p, x: x, predict_inputs=jnp.ones((3, 4)))
    with bad.clear_error("predict", 3) as err:
        run(predict=3, predict_inputs=X)
    assert err.type is TypeError and "callable" in str(err.value)


@pytest.mark.parametrize(
    "auto, name, value",
    [
        ({"max_step": -1.0}, "max_step", -1.0),
        ({"max_steps": 0}, "max_steps", 0),
        ({"target_ess": NAN}, "target_ess", NAN),
        ({"bogus": 1}, "auto", "bogus"),
        (3, "auto", 3),
    ],
)
def test_run_rejects_bad_automatic_options(auto, name, value):
    with bad.clear_error(name, value) as err:
        run(learning_rate=None, auto=auto)
    assert err.type in (TypeError, ValueError) and name in str(err.value)


@settings(max_examples=10, deadline=None)
@given(value=bad.bad_key())
def test_step_and_auto_settings_reject_a_bad_key(value):
    state = bn.sampling.init(PARAMS, log_likelihood, log_prior, 8, transform=bn.sgld(1e-3))
    with bad.clear_error("key", value) as from_step:
        bn.sampling.step(value, state, DATA)
    with bad.clear_error("key", value) as from_auto:
        bn.sampling.auto_settings(value, PARAMS, log_likelihood, log_prior, DATA)
    assert from_step.type is from_auto.type and "key" in str(from_auto.value)


def test_step_rejects_a_bad_state_or_batch():
    state = bn.sampling.init(PARAMS, log_likelihood, log_prior, 8, transform=bn.sgld(1e-3))
    with bad.clear_error("state", "dict"):
        bn.sampling.step(KEY, {}, DATA)
    with bad.clear_error("batch", "(8, 5)"):
        bn.sampling.step(KEY, state, X)
    with bad.clear_error("batch", "(3,)") as err:
        bn.sampling.step(KEY, state, (X, Y[:3]))
    assert err.type is ValueError and "common leading axis" in str(err.value)


@settings(max_examples=10, deadline=None)
@given(
    name=st.sampled_from(["max_step", "noise_fraction", "target_ess", "step_scale"]),
    value=bad.bad_positive(),
)
def test_auto_settings_rejects_a_bad_setting(name, value):
    with bad.clear_error(name, value) as err:
        bn.sampling.auto_settings(KEY, PARAMS, log_likelihood, log_prior, DATA, **{name: value})
    assert err.type in (TypeError, ValueError) and name in str(err.value)


def test_a_traced_key_passes_step():
    state = bn.sampling.init(PARAMS, log_likelihood, log_prior, 8, transform=bn.sgld(1e-3))
    new, info = jax.jit(bn.sampling.step)(KEY, state, DATA)
    assert bool(info.finite) and int(new.count) == 1


# -------------------------------------------------------------------------------- laplace


@settings(max_examples=15, deadline=None)
@given(value=bad.bad_positive())
def test_posterior_rejects_a_bad_temperature(value):
    with bad.clear_error("temperature", value) as err:
        bn.laplace.posterior(PARAMS, H, log_likelihood, DATA, temperature=value)
    assert err.type in (TypeError, ValueError) and "temperature" in str(err.value)


def test_diag_ggn_rejects_bad_settings():
    with bad.clear_error("method", "bogus") as err:
        bn.laplace.diag_ggn(PARAMS, log_likelihood, DATA, method="bogus")
    assert err.type is ValueError and "'auto', 'exact', 'probe'" in str(err.value)
    with bad.clear_error("chunk_size", 0) as err:
        bn.laplace.diag_ggn(PARAMS, log_likelihood, DATA, chunk_size=0)
    assert err.type is ValueError and str(err.value).startswith("chunk_size must be")
    with bad.clear_error("num_classes", -1) as err:
        bn.laplace.diag_ggn(PARAMS, log_likelihood, DATA, num_classes=-1)
    assert err.type is ValueError and str(err.value).startswith("num_classes must be")
    with bad.clear_error("log_likelihood", None) as err:
        bn.laplace.diag_ggn(PARAMS, None, DATA)
    assert err.type is TypeError and "callable" in str(err.value)
    with bad.clear_error("hierarchy", "dict") as err:
        bn.laplace.posterior(PARAMS, {}, log_likelihood, DATA)
    assert err.type is TypeError and "bn.gsm.Hierarchy" in str(err.value)
    with bad.clear_error("bogus", "bogus") as err:
        bn.laplace.log_evidence(PARAMS, H, log_likelihood, DATA, bogus=1)
    assert err.type is TypeError and "unknown keyword arguments ['bogus']" in str(err.value)
    with bad.clear_error("prior_variance", "-1") as err:
        bn.laplace.posterior(
            PARAMS, None, log_likelihood, DATA, prior_variance=with_value(PARAMS, -1.0)
        )
    assert err.type is ValueError and "params/Dense_0/" in str(err.value)


@settings(max_examples=10, deadline=None)
@given(value=bad.bad_key())
def test_laplace_rejects_a_bad_key(value):
    if value is None:  # None is allowed: the probe then needs a key of its own
        return
    with bad.clear_error("key", value) as err:
        bn.laplace.diag_ggn(PARAMS, log_likelihood, DATA, key=value, method="probe")
    assert err.type is TypeError and str(err.value).startswith("key must be a PRNG key")
    with bad.clear_error("key", value) as err:
        bn.laplace.posterior(PARAMS, H, log_likelihood, DATA, key=value)
    assert err.type is TypeError and str(err.value).startswith("key must be a PRNG key")


# ------------------------------------------------------------------------------------- em


def test_m_step_rejects_second_moments_that_collapse_the_scales():
    with bad.clear_error("second_moments", 0):
        bn.em.m_step(with_value(PARAMS, 0.0), H)
    # a hyperprior keeps the scales > 0, so zero moments are fine there
    scales = bn.em.m_step(with_value(PARAMS, 0.0), H, bn.noise.InverseGammaScale(2.0, 1.0))
    assert np.all(np.asarray(scales["params"]["Dense_0"]["kernel"]) > 0)


def test_m_step_under_jit_is_not_checked():
    scales = jax.jit(bn.em.m_step)(with_value(PARAMS, 1.0), H)
    np.testing.assert_allclose(scales["params"]["Dense_0"]["kernel"], 1.0)


@settings(max_examples=15, deadline=None)
@given(name=st.sampled_from(["sigma0", "noise_var"]), value=bad.bad_positive())
def test_linear_em_rejects_a_bad_variance(name, value):
    with bad.clear_error(name, value) as err:
        bn.em.linear_em(X, X[:, 0], iterations=2, **{name: value})
    assert err.type in (TypeError, ValueError)
    assert str(err.value).startswith(f"{name} must be a finite number > 0")


@settings(max_examples=15, deadline=None)
@given(value=bad.bad_count(0))
def test_linear_em_rejects_bad_iterations(value):
    with bad.clear_error("iterations", value) as err:
        bn.em.linear_em(X, X[:, 0], iterations=value)
    assert err.type in (TypeError, ValueError)
    assert str(err.value).startswith("iterations must be an int >= 0")


def test_linear_em_rejects_bad_data():
    with bad.clear_error("x", "(8, 5)") as err:
        bn.em.linear_em(X, X[:7, 0], iterations=2)
    assert err.type is ValueError and "the same n" in str(err.value)
    with bad.clear_error("x", "(8, 5)") as err:
        bn.em.linear_em(X.at[0, 0].set(NAN), X[:, 0], iterations=2)
    assert err.type is ValueError and "finite" in str(err.value)
    with bad.clear_error("min_scale", -1.0) as err:
        bn.em.linear_em(X, X[:, 0], iterations=2, min_scale=-1.0)
    assert err.type is ValueError and str(err.value).startswith("min_scale must be")
    with bad.clear_error("prior_var", 0.0) as err:
        bn.em.linear_posterior(X, X[:, 0], 0.0, 1.0)
    assert err.type is ValueError and str(err.value).startswith("prior_var must be")


@settings(max_examples=10, deadline=None)
@given(value=bad.bad_key())
def test_fit_and_e_step_reject_a_bad_key(value):
    with bad.clear_error("key", value) as err:
        bn.em.fit(value, PARAMS, log_likelihood, DATA, iterations=1, learning_rate=1e-3)
    assert err.type is TypeError and str(err.value).startswith("key must be a PRNG key")
    with bad.clear_error("key", value) as err:
        bn.em.e_step(value, PARAMS, H, log_likelihood, DATA, learning_rate=1e-3)
    # a float array is read as an attempt at one key per chain: a ValueError about its shape
    assert err.type in (TypeError, ValueError)
    assert str(err.value).startswith("key must be a PRNG key")


def test_em_rejects_bad_states_and_trees():
    with bad.clear_error("iterations", -1) as err:
        bn.em.fit(KEY, PARAMS, log_likelihood, DATA, iterations=-1)
    assert err.type is ValueError and str(err.value).startswith("iterations must be")
    with bad.clear_error("sigma0", -1.0) as err:
        bn.em.init(PARAMS, sigma0=-1.0)
    assert err.type is ValueError and str(err.value).startswith("sigma0 (the prior standard")
    with bad.clear_error("v_params", "w") as err:
        bn.em.accumulate(bn.em.init(PARAMS), {"w": jnp.ones(2)})
    assert err.type is ValueError and "tree structure" in str(err.value)
    with bad.clear_error("state", "NoneType") as err:
        bn.em.em_step(None)
    assert err.type is TypeError and "EMState" in str(err.value)
    with bad.clear_error("hierarchy", "NoneType") as err:
        bn.em.m_step(with_value(PARAMS, 1.0), None)
    assert err.type is TypeError and "bn.gsm.Hierarchy" in str(err.value)


# ---------------------------------------------------------------------------------- prune


MEAN = {"w": jnp.ones((2, 2))}


@settings(max_examples=15, deadline=None)
@given(value=bad_std, score=st.sampled_from(["snr", "spr"]))
def test_scores_reject_a_bad_std(value, score):
    with bad.clear_error("std", value) as err:
        getattr(bn.prune, score)(MEAN, {"w": jnp.full((2, 2), value)})
    assert err.type is ValueError
    assert str(err.value).startswith("std (posterior standard deviations) must be")
    assert "leaf 'w' of shape (2, 2)" in str(err.value)


@settings(max_examples=10, deadline=None)
@given(value=bad.not_finite(), score=st.sampled_from(["snr", "spr", "magnitude"]))
def test_scores_reject_a_mean_that_is_not_finite(value, score):
    mean = {"w": jnp.full((2, 2), value)}
    with bad.clear_error("mean", value) as err:
        bn.prune.magnitude(mean) if score == "magnitude" else getattr(bn.prune, score)(mean, MEAN)
    assert err.type is ValueError
    assert str(err.value).startswith("mean (posterior means")
    assert "leaf 'w' of shape (2, 2) holds 4 NaN or infinite entries" in str(err.value)


def test_mask_rejects_nan_scores_but_not_under_jit():
    scores = {"kernel": jnp.array([[NAN, 1.0], [2.0, 3.0]])}
    with bad.clear_error("scores", "1 NaN"):
        bn.prune.mask(scores, 0.5)
    with bad.clear_error("scores", "1 NaN"):
        bn.prune.curve(lambda p: jnp.zeros(()), scores, scores, [0.5])
    keep = jax.jit(bn.prune.mask)(scores, 0.5)["kernel"]
    assert int(keep.sum()) == 2


@settings(max_examples=15, deadline=None)
@given(value=bad_fraction)
def test_mask_rejects_a_bad_fraction(value):
    with bad.clear_error("fraction", value) as err:
        bn.prune.mask(bn.prune.magnitude(PARAMS), value)
    assert err.type is ValueError
    assert str(err.value).startswith("fraction must be in [0, 1]")
    assert str(err.value).endswith(f"got {value!r}.")


def test_where_that_matches_nothing_is_shown():
    paths = "(params/Dense_0/bias, params/Dense_0/kernel)"
    with bad.clear_error("where", "nomatch") as err:
        bn.prune.mask(bn.prune.magnitude(PARAMS), 0.5, where="nomatch")
    assert err.type is ValueError and f"matches none of its leaf paths {paths}" in str(err.value)
    with bad.clear_error("where", "nomatch") as err:
        bn.prune.curve(
            lambda p: jnp.zeros(()), PARAMS, bn.prune.magnitude(PARAMS), [0.5], where="nomatch"
        )
    assert err.type is ValueError and f"matches none of its leaf paths {paths}" in str(err.value)
    with bad.clear_error("where", "[") as err:
        bn.prune.mask(bn.prune.magnitude(PARAMS), 0.5, where="[")
    assert err.type is ValueError
    assert str(err.value).startswith("where='[' is not a valid regular expression")
    with bad.clear_error("where", "3") as err:
        bn.prune.mask(bn.prune.magnitude(PARAMS), 0.5, where=3)
    assert err.type is TypeError and str(err.value).endswith("got int: 3.")


def test_mask_of_the_whole_fraction_is_legit():
    keep = bn.prune.mask(bn.prune.magnitude(PARAMS), 1.0)
    assert not np.any(keep["params"]["Dense_0"]["kernel"])


@settings(max_examples=15, deadline=None)
@given(value=bad_fraction)
def test_breakpoint_fraction_rejects_a_bad_fraction(value):
    with bad.clear_error("fractions", str([0.0, value])) as err:
        bn.prune.breakpoint_fraction([0.0, value], [0.1, 0.1], 0.1)
    assert err.type is ValueError
    assert str(err.value).startswith("fractions must be a finite number or an array of them")
    assert str(err.value).endswith(f"in [0, 1], got {[0.0, value]}.")


def test_breakpoint_fraction_and_curve_reject_bad_arrays():
    with bad.clear_error("fractions", "(0,)"):
        bn.prune.breakpoint_fraction([], [], 0.1)
    with bad.clear_error("tolerance", INF):
        bn.prune.breakpoint_fraction([0.0, 0.5], [0.1, 0.1], 0.1, tolerance=INF)
    with bad.clear_error("metric", None):
        bn.prune.breakpoint_fraction([0.0, 0.5], None, 0.1)
    with bad.clear_error("fractions", "[]"):
        bn.prune.curve(lambda p: jnp.zeros(()), PARAMS, bn.prune.magnitude(PARAMS), [])
    # NaN metrics fail the tolerance (documented), and unsorted fractions are sorted
    assert bn.prune.breakpoint_fraction([0.5, 0.0, 0.9], [0.1, 0.1, NAN], 0.1) == 0.5


def test_sparse_export_rejects_bad_masks_and_dtypes():
    params = {"kernel": jnp.ones((3, 3))}
    with bad.clear_error("mask", "(2, 2)") as err:
        bn.prune.to_sparse(params, {"kernel": jnp.ones((2, 2), bool)})
    assert err.type is ValueError
    assert "does not broadcast to the leaf's shape (3, 3)" in str(err.value)
    with bad.clear_error("index_dtype", "float32") as err:
        bn.prune.to_sparse(params, {"kernel": jnp.eye(3, dtype=bool)}, index_dtype=np.float32)
    assert err.type is TypeError and "must be None or an integer dtype" in str(err.value)
    big = {"kernel": jnp.ones((300, 3))}
    with bad.clear_error("index_dtype", "int8") as err:
        bn.prune.to_sparse(big, {"kernel": jnp.ones((300, 3), bool)}, index_dtype=np.int8)
    assert err.type is ValueError and "an integer dtype that reaches 299" in str(err.value)
    with bad.clear_error("kernel", "(3, 3)") as err:
        bn.prune.sparse_dense(jnp.ones((2, 4)), params["kernel"])
    assert err.type is ValueError
    assert "got x of shape (2, 4) and kernel of shape (3, 3)" in str(err.value)


# ------------------------------------------------------------------------------ inference


@pytest.mark.parametrize("noise", [None, "bernoulli"])
def test_weight_scale_rejects_a_bad_noise(noise):
    with bad.clear_error("noise", noise) as err:
        bn.inference.weight_scale(PARAMS, noise)
    assert err.type is TypeError
    assert str(err.value).startswith("noise must be a bayesnoise.noise distribution")
    assert str(err.value).endswith(f"got {type(noise).__name__}: {noise!r}.")


def test_weight_scale_shows_a_where_that_matches_nothing():
    with bad.clear_error("where", "nomatch") as err:
        bn.inference.weight_scale(PARAMS, bn.noise.Bernoulli(0.8), where="nomatch")
    assert err.type is ValueError
    assert str(err.value).startswith("no leaf of the params tree is noised: where='nomatch'")


@settings(max_examples=15, deadline=None)
@given(
    value=bad.bad_key(),
    rule=st.sampled_from(["mc_predict", "geometric_predict", "mc_logits"]),
)
def test_monte_carlo_rules_reject_a_bad_key(value, rule):
    with bad.clear_error("key", value) as err:
        getattr(bn.inference, rule)(value, apply_fn, X, 4)
    assert err.type is TypeError
    assert str(err.value).startswith("key must be a PRNG key, e.g. jax.random.key(0)")


@settings(max_examples=15, deadline=None)
@given(
    value=bad.bad_count(1),
    rule=st.sampled_from(["mc_predict", "geometric_predict", "mc_logits"]),
)
def test_monte_carlo_rules_reject_a_bad_number_of_samples(value, rule):
    with bad.clear_error("num_samples", value) as err:
        getattr(bn.inference, rule)(KEY, apply_fn, X, value)
    assert err.type in (TypeError, ValueError) and "an int >= 1" in str(err.value)


def test_samplers_reject_bad_arguments():
    with bad.clear_error("apply", None) as err:
        bn.inference.sampler(None, PARAMS)
    assert err.type is TypeError and "such as model.apply" in str(err.value)
    with bad.clear_error("rng_collection", 3) as err:
        bn.inference.sampler(lambda v, x, rngs: x, PARAMS, rng_collection=3)
    assert err.type is TypeError and "a non-empty str" in str(err.value)
    with bad.clear_error("model", "NoneType") as err:
        bn.inference.nnx_sampler(None)
    assert err.type is TypeError and "bn.inference.sampler(model.apply" in str(err.value)


def test_bad_probability_strategy_is_a_bad_fraction_too():
    # the shared strategy of bad probabilities: fractions above 1, negative or not finite
    @settings(max_examples=10, deadline=None)
    @given(value=bad.bad_probability().filter(lambda v: not 0 <= v <= 1))
    def check(value):
        with bad.clear_error("fraction", value) as err:
            bn.prune.mask(bn.prune.magnitude(PARAMS), value)
        assert err.type is ValueError and "must be in [0, 1]" in str(err.value)

    check()
