import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree
from scipy import stats

import bayesnoise as bn
from bayesnoise import laplace

N, D_IN, HIDDEN, K = 20, 3, 4, 3


def _mlp_params(key, d_out=K):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "l1": {
            "kernel": jax.random.normal(k1, (D_IN, HIDDEN)),
            "bias": 0.3 * jax.random.normal(k2, (HIDDEN,)),
        },
        "l2": {
            "kernel": jax.random.normal(k3, (HIDDEN, d_out)),
            "bias": 0.3 * jax.random.normal(k4, (d_out,)),
        },
    }


def _forward(p, x):
    h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    return h @ p["l2"]["kernel"] + p["l2"]["bias"]


def _categorical(p, x, y):
    logp = jax.nn.log_softmax(_forward(p, x))
    return jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]


NOISE_VAR = jnp.array([0.3, 2.5])  # s² per output, both ≠ 1


def _gaussian(p, x, y):
    r = y - _forward(p, x)
    return jnp.sum(-0.5 * jnp.log(2 * math.pi * NOISE_VAR) - r**2 / (2 * NOISE_VAR), axis=1)


def _classification_data():
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (N, D_IN))
    y = jax.random.randint(ky, (N,), 0, K)
    return x, y.at[0].set(K - 1)  # every class up to K - 1 present: num_classes defaults to K


def _regression_data():
    kx, ky = jax.random.split(jax.random.key(2))
    return jax.random.normal(kx, (N, D_IN)), jax.random.normal(ky, (N, 2))


def _explicit_categorical_ggn(params, x):
    """diag(Jᵀ (diag p − p pᵀ) J) averaged over examples, J from jax.jacobian of the logits."""
    flat, unravel = ravel_pytree(params)
    logits = lambda th: _forward(unravel(th), x)
    jac = jax.jacobian(logits)(flat)  # (n, K, P)
    p = jax.nn.softmax(logits(flat))
    h = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p)
    return np.asarray(jnp.einsum("nkp,nkl,nlp->p", jac, h, jac)) / x.shape[0]


def _explicit_gaussian_ggn(params, x):
    """diag(Jᵀ diag(1/s²) J) averaged over examples."""
    flat, unravel = ravel_pytree(params)
    jac = jax.jacobian(lambda th: _forward(unravel(th), x))(flat)  # (n, O, P)
    return np.asarray(jnp.einsum("nop,o->p", jac**2, 1 / NOISE_VAR)) / x.shape[0]


def _flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def _assert_unbiased(samples, exact, z=5.0):
    """Every coordinate's mean over independent draws within z standard errors of exact."""
    samples = np.asarray(samples, np.float64)
    se = samples.std(0, ddof=1) / math.sqrt(samples.shape[0])
    err = np.abs(samples.mean(0) - exact)
    assert np.all(err <= z * se + 1e-6 * np.abs(exact).max()), (err / (se + 1e-30)).max()


# ------------------------------------------------------------------------ curvature


@pytest.mark.parametrize("chunk_size", [None, 1, 6, N])
def test_diag_ggn_exact_matches_explicit_jacobian(chunk_size):
    params = _mlp_params(jax.random.key(0))
    x, y = _classification_data()
    ggn = laplace.diag_ggn(params, _categorical, (x, y), method="exact", chunk_size=chunk_size)
    assert jax.tree.structure(ggn) == jax.tree.structure(params)
    np.testing.assert_allclose(
        _flat(ggn), _explicit_categorical_ggn(params, x), rtol=1e-5, atol=1e-9
    )


def test_diag_ggn_under_jit_and_auto():
    params = _mlp_params(jax.random.key(0))
    x, y = _classification_data()
    jitted = jax.jit(lambda p: laplace.diag_ggn(p, _categorical, (x, y), num_classes=K))(params)
    auto = laplace.diag_ggn(params, _categorical, (x, y))  # tiny: "auto" is exact, needs no key
    ref = _explicit_categorical_ggn(params, x)
    np.testing.assert_allclose(_flat(jitted), ref, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(_flat(auto), ref, rtol=1e-5, atol=1e-9)


def test_diag_ggn_probe_is_unbiased():
    params = _mlp_params(jax.random.key(0))
    x, y = _classification_data()
    keys = jax.random.split(jax.random.key(3), 400)
    draw = lambda k: laplace.diag_ggn(
        params, _categorical, (x, y), key=k, method="probe", chunk_size=6
    )
    samples = jax.vmap(lambda k: ravel_pytree(draw(k))[0])(keys)
    ref = _explicit_categorical_ggn(params, x)
    assert np.all(np.asarray(samples) >= 0)
    _assert_unbiased(samples, ref)
    # a single draw is not the exact value: the signs are random
    assert np.abs(np.asarray(samples[0]) - ref).max() > 1e-3 * ref.max()


def test_diag_ggn_gaussian_matches_jtj_over_noise_variance():
    params = _mlp_params(jax.random.key(4), d_out=2)
    data = _regression_data()
    ref = _explicit_gaussian_ggn(params, data[0])
    exact = laplace.diag_ggn(params, _gaussian, data, method="exact", chunk_size=7)
    np.testing.assert_allclose(_flat(exact), ref, rtol=1e-5, atol=1e-9)
    keys = jax.random.split(jax.random.key(5), 400)
    draw = lambda k: laplace.diag_ggn(params, _gaussian, data, key=k, method="probe", chunk_size=7)
    _assert_unbiased(jax.vmap(lambda k: ravel_pytree(draw(k))[0])(keys), ref)


def test_empirical_fisher_matches_per_example_gradients():
    params = _mlp_params(jax.random.key(0))
    x, y = _classification_data()
    flat, unravel = ravel_pytree(params)
    grads = jax.jacobian(lambda th: _categorical(unravel(th), x, y))(flat)  # (n, P)
    ref = np.asarray(jnp.mean(grads**2, axis=0))
    exact = laplace.empirical_fisher(params, _categorical, (x, y), method="exact", chunk_size=6)
    np.testing.assert_allclose(_flat(exact), ref, rtol=1e-5, atol=1e-9)
    keys = jax.random.split(jax.random.key(6), 400)
    draw = lambda k: laplace.empirical_fisher(
        params, _categorical, (x, y), key=k, method="probe", chunk_size=5
    )
    _assert_unbiased(jax.vmap(lambda k: ravel_pytree(draw(k))[0])(keys), ref)


def test_missing_class_mass_is_reported(caplog):
    params = _mlp_params(jax.random.key(0))
    x, _ = _classification_data()
    y = jnp.arange(N) % 2  # the model has 3 classes, the data only 2: default num_classes = 2
    with caplog.at_level(logging.WARNING, logger="bayesnoise.laplace"):
        laplace.diag_ggn(params, _categorical, (x, y), method="exact")
    assert "sum to" in caplog.text


# ----------------------------------------------------------- linear regression: exact


def _linear_problem(orthogonal):
    n, d, noise_var, sigma0 = 30, 4, 0.5, 0.7
    kx, ky = jax.random.split(jax.random.key(7))
    x = np.asarray(jax.random.normal(kx, (n, d)), np.float64)
    if orthogonal:
        q, _ = np.linalg.qr(x)
        x = q * np.array([3.0, 1.5, 0.8, 0.2])  # XᵀX = diag(9, 2.25, 0.64, 0.04)
    y = x @ np.array([1.0, -2.0, 0.5, 0.0]) + np.sqrt(noise_var) * np.asarray(
        jax.random.normal(ky, (n,)), np.float64
    )
    lam = np.array([1.0, 2.0, 0.5, 0.1])
    params = {"kernel": jnp.zeros((d, 1))}
    h = bn.gsm.hierarchy(params, sigma0=sigma0)
    h = h.replace(scales={"kernel": jnp.asarray(lam, jnp.float32)})
    prior_var = sigma0**2 * lam**2  # independent of bn.gsm.prior_variance

    def log_likelihood(p, xb, yb):
        r = yb - (xb @ p["kernel"])[:, 0]
        return -0.5 * jnp.log(2 * math.pi * noise_var) - r**2 / (2 * noise_var)

    precision = x.T @ x / noise_var + np.diag(1 / prior_var)
    mode = np.linalg.solve(precision, x.T @ y / noise_var)
    data = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    return dict(
        x=x, y=y, noise_var=noise_var, prior_var=prior_var, h=h, ll=log_likelihood,
        precision=precision, mode={"kernel": jnp.asarray(mode[:, None], jnp.float32)}, data=data,
    )  # fmt: skip


def test_linear_regression_variance_is_inverse_diagonal_precision():
    lp = _linear_problem(orthogonal=False)
    post = laplace.posterior(lp["mode"], lp["h"], lp["ll"], lp["data"], method="exact")
    want = 1 / np.diag(lp["precision"])
    np.testing.assert_allclose(np.asarray(post.variance["kernel"])[:, 0], want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(post.precision["kernel"])[:, 0], 1 / want, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(post.ggn["kernel"])[:, 0] * lp["x"].shape[0],
        np.diag(lp["x"].T @ lp["x"]) / lp["noise_var"],
        rtol=1e-5,
    )


@pytest.mark.parametrize("jit", [False, True])
def test_log_evidence_is_exact_for_orthogonal_linear_regression(jit):
    lp = _linear_problem(orthogonal=True)
    x, y = lp["x"], lp["y"]
    cov = lp["noise_var"] * np.eye(len(y)) + x @ np.diag(lp["prior_var"]) @ x.T
    exact = stats.multivariate_normal(np.zeros(len(y)), cov).logpdf(y)
    fn = lambda m: laplace.log_evidence(m, lp["h"], lp["ll"], lp["data"], method="exact")
    got = float((jax.jit(fn) if jit else fn)(lp["mode"]))
    assert abs(got - exact) < 1e-4 * abs(exact) + 1e-4, (got, exact)
    post = laplace.posterior(lp["mode"], lp["h"], lp["ll"], lp["data"], method="exact")
    assert abs(float(post.log_evidence) - got) < 1e-4
    # the same evidence from an explicit prior-variance tree and no hierarchy
    pv = {"kernel": jnp.asarray(lp["prior_var"][:, None], jnp.float32)}
    other = laplace.log_evidence(lp["mode"], None, lp["ll"], lp["data"], prior_variance=pv)
    assert abs(float(other) - exact) < 1e-4 * abs(exact) + 1e-4
    # away from the mode the Laplace estimate is lower: it is not the evidence there
    off = {"kernel": lp["mode"]["kernel"] + 0.5}
    assert float(laplace.log_evidence(off, lp["h"], lp["ll"], lp["data"])) < exact - 1e-3


def test_log_evidence_matches_its_formula_with_full_log_prior():
    params = _mlp_params(jax.random.key(0))
    x, y = _classification_data()
    h = bn.gsm.hierarchy(params, sigma0=0.8)
    h = h.replace(scales=jax.tree.map(lambda s: None if s is None else 1.5 * s, h.scales))
    post = laplace.posterior(params, h, _categorical, (x, y), method="exact")
    ggn = _explicit_categorical_ggn(params, x)
    flat_pv = _flat(bn.gsm.prior_variance(params, h)).astype(np.float64)
    h_kk = N * ggn + 1 / flat_pv
    want = (
        float(jnp.sum(_categorical(params, x, y)))
        + float(bn.gsm.full_log_prior(params, h))
        + 0.5 * len(h_kk) * math.log(2 * math.pi)
        - 0.5 * np.sum(np.log(h_kk))
    )
    assert abs(float(post.log_evidence) - want) < 1e-4 * abs(want)


# ------------------------------------------------------------------- the posterior


def test_temperature_scales_variance_and_moments_form():
    params = _mlp_params(jax.random.key(0))
    x, y = _classification_data()
    h = bn.gsm.hierarchy(params)
    cold = laplace.posterior(params, h, _categorical, (x, y), 0.25, method="exact")
    warm = laplace.posterior(params, h, _categorical, (x, y), 1.0, ggn=cold.ggn)
    np.testing.assert_allclose(_flat(cold.variance), 0.25 * _flat(warm.variance), rtol=1e-6)
    np.testing.assert_allclose(_flat(cold.precision), _flat(warm.precision), rtol=1e-6)
    assert float(cold.log_evidence) == pytest.approx(float(warm.log_evidence), rel=1e-6)
    # the precision is N·GGN + 1/prior variance, the prior variance here σ0² = 1 everywhere
    np.testing.assert_allclose(
        _flat(warm.precision), N * _explicit_categorical_ggn(params, x) + 1.0, rtol=1e-5
    )
    # moments in the E-step's form
    m = warm.moments
    assert isinstance(m, bn.moments.MomentsState) and float(m.count) == 1.0
    np.testing.assert_array_equal(_flat(bn.moments.mean(m)), _flat(params))
    np.testing.assert_allclose(_flat(bn.moments.variance(m)), _flat(warm.variance), rtol=1e-6)
    np.testing.assert_allclose(
        _flat(bn.moments.second_moment(m)), _flat(params) ** 2 + _flat(warm.variance), rtol=1e-5
    )
    np.testing.assert_array_equal(_flat(warm.mean), _flat(params))


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(D_IN, HIDDEN, rngs=rngs)
        self.l2 = nnx.Linear(HIDDEN, K, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def test_nnx_model_matches_linen_style_function():
    graphdef, state, rest = nnx.split(_Net(nnx.Rngs(0)), nnx.Param, ...)
    x, y = _classification_data()

    def nnx_log_likelihood(p, xb, yb):
        logp = jax.nn.log_softmax(nnx.merge(graphdef, p, rest)(xb))
        return jnp.take_along_axis(logp, yb[:, None], axis=1)[:, 0]

    h = bn.gsm.hierarchy(state, sigma0=0.9)
    post = laplace.posterior(state, h, nnx_log_likelihood, (x, y), method="exact")
    assert jax.tree.structure(post.variance) == jax.tree.structure(state)
    for v, s in zip(jax.tree.leaves(post.variance), jax.tree.leaves(state)):
        assert v.shape == s.shape and bool(jnp.all(jnp.isfinite(v)) and jnp.all(v > 0))
    assert np.isfinite(float(post.log_evidence))

    pure = nnx.to_pure_dict(state)  # the same weights as a plain dict for a linen-style function
    h_pure = bn.gsm.hierarchy(pure, sigma0=0.9)
    ref = laplace.posterior(pure, h_pure, _categorical, (x, y), method="exact")
    np.testing.assert_allclose(
        _flat(nnx.to_pure_dict(post.variance)), _flat(ref.variance), rtol=1e-5
    )
    np.testing.assert_allclose(_flat(nnx.to_pure_dict(post.ggn)), _flat(ref.ggn), rtol=1e-5)
    assert float(post.log_evidence) == pytest.approx(float(ref.log_evidence), rel=1e-5)
    np.testing.assert_allclose(
        _flat(nnx.to_pure_dict(post.ggn)), _explicit_categorical_ggn(pure, x), rtol=1e-5
    )


# ---------------------------------------------------------------------------- errors


def _setup():
    params = _mlp_params(jax.random.key(0))
    x, y = _classification_data()
    return params, (x, y), bn.gsm.hierarchy(params)


def test_non_finite_curvature_is_an_error():
    params, data, h = _setup()
    bad = jax.tree.map(lambda p: p, params)
    bad["l1"]["kernel"] = bad["l1"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="not finite"):
        laplace.diag_ggn(bad, _categorical, data, method="exact")
    ggn = laplace.diag_ggn(params, _categorical, data)
    ggn["l2"]["bias"] = ggn["l2"]["bias"].at[1].set(jnp.inf)
    with pytest.raises(ValueError, match=r"not finite.*l2/bias"):
        laplace.posterior(params, h, _categorical, data, ggn=ggn)
    ggn["l2"]["bias"] = -jnp.ones(K)
    with pytest.raises(ValueError, match=">= 0"):
        laplace.posterior(params, h, _categorical, data, ggn=ggn)


def test_wrong_structure_or_shape_is_an_error():
    params, data, h = _setup()
    ggn = laplace.diag_ggn(params, _categorical, data)
    missing = {"l1": ggn["l1"]}
    with pytest.raises(ValueError, match="tree structure"):
        laplace.posterior(params, h, _categorical, data, ggn=missing)
    wrong_shape = jax.tree.map(lambda g: g, ggn)
    wrong_shape["l1"]["kernel"] = jnp.ones((HIDDEN, D_IN))
    with pytest.raises(ValueError, match=r"l1/kernel.*shape \(4, 3\)"):
        laplace.posterior(params, h, _categorical, data, ggn=wrong_shape)
    with pytest.raises(ValueError, match="prior_variance"):
        laplace.log_evidence(params, h, _categorical, data, prior_variance={"l1": ggn["l1"]})


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_non_positive_temperature_is_an_error(temperature):
    params, data, h = _setup()
    with pytest.raises(ValueError, match="temperature"):
        laplace.posterior(params, h, _categorical, data, temperature)


def test_bad_data_labels_and_options_are_errors():
    params, (x, y), h = _setup()
    with pytest.raises(ValueError, match="leading"):
        laplace.diag_ggn(params, _categorical, (x, y[:-1]))
    with pytest.raises(ValueError, match="label -1"):
        laplace.diag_ggn(params, _categorical, (x, y.at[3].set(-1)))
    with pytest.raises(ValueError, match="num_classes"):
        laplace.diag_ggn(params, _categorical, (x, y), num_classes=2)
    with pytest.raises(ValueError, match="key"):
        laplace.diag_ggn(params, _categorical, (x, y), method="probe")
    with pytest.raises(ValueError, match="key"):
        laplace.empirical_fisher(params, _categorical, (x, y), method="probe")
    with pytest.raises(ValueError, match="method"):
        laplace.diag_ggn(params, _categorical, (x, y), method="kfac")
    with pytest.raises(ValueError, match="chunk_size"):
        laplace.diag_ggn(params, _categorical, (x, y), chunk_size=0)
    summed = lambda p, xb, yb: jnp.sum(_categorical(p, xb, yb))
    with pytest.raises(ValueError, match=r"shape\s+\(n,\)"):
        laplace.diag_ggn(params, summed, (x, y))
