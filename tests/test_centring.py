"""Centred biases: the chains sample a shear θ' of the parameters in which each dense layer's
bias no longer moves against its unit's weights, and report everything in θ.

Checked against independent computations: the shear's matrix from an explicit Jacobian (its
inverse, its determinant and the prior precision it implies), the Gauss–Newton cross terms
from explicit per-example Jacobians of the logits, the exact Gaussian posterior of a linear
model with a bias and positive inputs, and the likelihood's gradient after a move.
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import bayesnoise as bn
from bayesnoise import sampling

MLP = bn.nn.MLP(features=(5, 3))
X = jax.random.uniform(jax.random.key(0), (40, 4))  # positive inputs, as pixels
Y = jax.random.randint(jax.random.key(1), (40,), 0, 3)
PARAMS = MLP.init(jax.random.key(2), X)


def _log_likelihood(p, x, y):
    logits = MLP.apply(p, x)
    return jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0]


def _prior(params, sigma0=1.0):
    return jax.tree_util.Partial(bn.gsm.full_log_prior, hierarchy=bn.gsm.hierarchy(params, sigma0))


def _flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def _matrix(fn, tree):
    """fn's Jacobian as a matrix over the flattened leaves."""
    _, unravel = jax.flatten_util.ravel_pytree(tree)
    return np.asarray(jax.jacfwd(lambda v: _flat(fn(unravel(v))))(_flat(tree)), np.float64)


def test_the_shear_is_invertible_with_unit_determinant_and_moves_the_priors_precision():
    c = sampling.centring(PARAMS, _log_likelihood, _prior(PARAMS), (X, Y))
    assert c.leaves == (
        ("params/Dense_0/kernel", "params/Dense_0/bias"),
        ("params/Dense_1/kernel", "params/Dense_1/bias"),
    )
    back = c.to_params(c.to_position(PARAMS))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(PARAMS)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    a = _matrix(c.to_params, PARAMS)
    assert np.linalg.slogdet(a) == pytest.approx((1.0, 0.0), abs=1e-6)
    np.testing.assert_allclose(a @ _matrix(c.to_position, PARAMS), np.eye(len(a)), atol=1e-5)
    # a factorised precision D in θ becomes diag(Aᵀ D A) in θ'
    d = jax.tree.map(lambda x: jnp.full_like(x, 1.0) + jnp.arange(x.size).reshape(x.shape), PARAMS)
    want = np.diag(a.T @ np.diag(np.asarray(_flat(d), np.float64)) @ a)
    np.testing.assert_allclose(_flat(c.pull_precision(d)), want, rtol=1e-5)
    # and the run's prior precision of the sheared prior is that diagonal
    prior = jax.tree_util.Partial(sampling._centred_log_prior, c, _prior(PARAMS, 0.7))
    got = _flat(sampling.prior_precision(c.to_position(PARAMS), prior))
    want = np.diag(a.T @ np.diag(np.full(len(a), 1 / 0.49)) @ a)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_the_centres_zero_the_laplace_precisions_bias_weight_terms():
    """c_dk = N G[W_dk, b_k] / (N G[b_k, b_k] + p_b), with G from explicit Jacobians of the
    logits and the softmax's Hessian; in θ' the precision's (W'_dk, b'_k) term vanishes."""
    sigma0 = 0.8
    c = sampling.centring(PARAMS, _log_likelihood, _prior(PARAMS, sigma0), (X, Y))
    flat, unravel = jax.flatten_util.ravel_pytree(PARAMS)
    jac = jax.jacfwd(lambda v: MLP.apply(unravel(v), X))(flat)  # (N, K, P)
    p = jax.nn.softmax(MLP.apply(PARAMS, X))
    lam = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p)  # (N, K, K)
    ggn = np.asarray(jnp.einsum("nkp,nkl,nlq->pq", jac, lam, jac), np.float64)
    precision = ggn + np.eye(len(flat)) / sigma0**2
    a = _matrix(c.to_params, PARAMS)
    sheared = a.T @ precision @ a
    index = {}
    offset = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(PARAMS)[0]:
        index[bn._tree.path_str(path)] = offset + np.arange(leaf.size).reshape(leaf.shape)
        offset += leaf.size
    for (kp, bp), centres in zip(c.leaves, c.centres):
        w, b = index[kp], index[bp]
        cross = precision[w, b[None, :]]  # (inputs, units): G[W_dk, b_k]
        want = cross / precision[b, b][None, :]
        np.testing.assert_allclose(centres, want, rtol=2e-3, atol=1e-5)
        # the terms the shear removes, relative to the largest one before it
        left = np.abs(sheared[w, b[None, :]]).max() / np.abs(cross).max()
        assert left < 1e-3, (kp, left)


def _linear_problem():
    n, d = 200, 5
    x = jax.random.uniform(jax.random.key(3), (n, d)) + 2.0
    w = jnp.array([[0.5], [-0.3], [0.2], [0.0], [0.1]])
    y = (x @ w)[:, 0] + 1.0 + 0.5 * jax.random.normal(jax.random.key(4), (n,))
    params = {"params": {"Dense_0": {"kernel": jnp.zeros((d, 1)), "bias": jnp.zeros(1)}}}

    def log_likelihood(p, xb, yb):
        layer = p["params"]["Dense_0"]
        return -0.5 * ((yb - (xb @ layer["kernel"] + layer["bias"])[:, 0]) / 0.5) ** 2

    # the leaves' order: the bias, then the kernel
    design = np.concatenate([np.ones((n, 1)), np.asarray(x, np.float64)], 1)
    precision = design.T @ design / 0.25 + np.eye(d + 1)
    cov = np.linalg.inv(precision)
    mean = cov @ (design.T @ np.asarray(y, np.float64) / 0.25)
    return params, log_likelihood, (x, y), mean, cov


def test_centred_chains_sample_the_exact_posterior_of_a_linear_model_with_a_bias():
    """Inputs near 2.5 couple the bias and the weights: the bias's posterior variance is 257
    times its variance given the weights. BAOAB with the automatic (diagonal) preconditioner
    mixes slowly along that direction without the shear (min ESS 4.4 here), and reaches the
    exact posterior with it in the same number of steps (min ESS 2,004)."""
    params, log_likelihood, data, mean, cov = _linear_problem()
    prior = _prior(params)
    c = sampling.centring(params, log_likelihood, prior, data)
    np.testing.assert_allclose(c.centres[0][:, 0], np.asarray(data[0]).mean(0), rtol=0.02)
    out = {}
    for name, shear in (("plain", None), ("centred", c)):
        r = sampling.run(
            jax.random.key(5), params, log_likelihood, prior, data,
            transform=bn.baoab, centring=shear, auto={"max_steps": 4000},
        )  # fmt: skip
        m, v = bn.moments.mean(r.moments), bn.moments.variance(r.moments)
        out[name] = (np.asarray(_flat(m), np.float64), np.asarray(_flat(v), np.float64), r)
    m, v, r = out["centred"]
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(m - mean) < 0.15 * sd), (m - mean) / sd
    np.testing.assert_allclose(v / np.diag(cov), 1.0, atol=0.15)
    assert r.converged and r.settings["centring"] == ["params/Dense_0/kernel"]
    # the chains' last states come back in θ: the bias there is the posterior's, not b'
    bias = np.asarray(r.params["params"]["Dense_0"]["bias"])
    assert np.all(np.abs(bias - mean[0]) < 5 * sd[0])
    assert r.ess.min() > 10 * out["plain"][2].ess.min()


def test_a_move_keeps_its_gradient_rule_in_the_sheared_coordinates():
    """After an exchange of hidden units (under equal scales the prior accepts every one), the
    wrapped move's permute gives the likelihood's gradient at the moved θ', computed afresh;
    the shear's centres differ between units, so θ' moves by more than a permutation."""
    c = sampling.centring(PARAMS, _log_likelihood, _prior(PARAMS), (X, Y))
    h = bn.gsm.hierarchy(PARAMS, 1.0)
    prior = jax.tree_util.Partial(bn.gsm.full_log_prior, hierarchy=h)
    sheared_prior = jax.tree_util.Partial(sampling._centred_log_prior, c, prior)
    move = sampling._Sheared(sampling.unit_swaps(PARAMS, hierarchy=h), c)
    position = c.to_position(PARAMS)
    moved, sources, accepted = move(jax.random.key(6), position, sheared_prior, 1.0)
    assert int(jnp.sum(accepted)) >= 1
    ll = lambda q: jnp.sum(_log_likelihood(c.to_params(q), X, Y))
    before, after = jax.grad(ll)(position), jax.grad(ll)(moved)
    assert not np.allclose(_flat(before), _flat(after), atol=1e-2)
    np.testing.assert_allclose(_flat(move.permute(before, sources)), _flat(after), atol=2e-4)
    np.testing.assert_allclose(ll(moved), ll(position), rtol=1e-5)
    # the move acted on θ: the moved state is the exchanged network
    np.testing.assert_allclose(
        MLP.apply(c.to_params(moved), X), MLP.apply(PARAMS, X), rtol=1e-5, atol=1e-5
    )


def test_e_step_with_centring_and_both_moves_reports_the_weights_in_their_own_coordinates():
    h = bn.gsm.hierarchy(PARAMS, 1.0)
    res = bn.em.e_step(
        jax.random.key(7), PARAMS, h, _log_likelihood, (X, Y),
        learning_rate=1e-4, num_samples=100, num_chains=4,
        unit_swaps=True, class_shifts=True, centring=True,
    )  # fmt: skip
    assert res.settings["centring"] == ["params/Dense_0/kernel", "params/Dense_1/kernel"]
    # the traced weights and the moments read the same coordinates (θ's, as the linear model's
    # exact posterior mean of its bias shows above): per chain, the trace's mean is the moments'
    names = list(res.trace_names)
    i = names.index("params/Dense_1/bias[0]")
    traced = np.asarray(res.trace)[:, :, i].mean(1)
    mean = jax.vmap(bn.moments.mean)(res.chain_moments)
    np.testing.assert_allclose(traced, mean["params"]["Dense_1"]["bias"][:, 0], atol=1e-4)
    variance = bn.moments.variance(res.moments)
    assert np.all(np.isfinite(_flat(variance)))
    # the class draw acts at every step: the output bias's mean over the K = 3 classes alone
    # has variance σ0² / K = 1/3 in the posterior
    assert float(np.mean(np.asarray(variance["params"]["Dense_1"]["bias"]))) > 0.2
    # the next E-step shears at other params: other centres, the same compiled code (the
    # centres enter it as data, as the prior's scales do)
    from bayesnoise import laplace

    compiled = (sampling._sample, sampling._init_carry, laplace._curvature_sum)
    sizes = [f._cache_size() for f in compiled]
    moved = jax.tree.map(lambda w: 1.1 * w, PARAMS)
    again = bn.em.e_step(
        jax.random.key(8), moved, h.replace(scales=jax.tree.map(lambda s: 0.9 * s, h.scales)),
        _log_likelihood, (X, Y), learning_rate=1e-4, num_samples=100, num_chains=4,
        unit_swaps=True, class_shifts=True, centring=True,
    )  # fmt: skip
    assert [f._cache_size() for f in compiled] == sizes
    assert not np.allclose(_flat(again.params), _flat(res.params))


def test_e_step_builds_the_output_layers_shear_at_the_start(monkeypatch):
    """``centring="output"`` hands the sampler the last layer's Centring at the given params."""
    seen = {}
    monkeypatch.setattr(sampling, "run", lambda *a, **kw: seen.update(kw) or "ran")
    h = bn.gsm.hierarchy(PARAMS, 1.0)
    args = (jax.random.key(7), PARAMS, h, _log_likelihood, (X, Y))
    assert bn.em.e_step(*args, centring="output") == "ran"
    want = sampling.centring(PARAMS, _log_likelihood, _prior(PARAMS), (X, Y), layers=[-1])
    assert (
        seen["centring"].leaves
        == want.leaves
        == (("params/Dense_1/kernel", "params/Dense_1/bias"),)
    )
    np.testing.assert_allclose(seen["centring"].centres[0], want.centres[0], rtol=1e-6)
    mine = sampling.Centring(want.leaves, want.centres)
    bn.em.e_step(*args, centring=mine)
    assert seen["centring"] is mine


def test_bad_centring_inputs_are_refused_with_the_value_and_what_is_allowed():
    prior = _prior(PARAMS)
    with pytest.raises(TypeError, match="centring must be None or a bn.sampling.Centring"):
        sampling.run(
            jax.random.key(0), PARAMS, _log_likelihood, prior, (X, Y),
            learning_rate=1e-4, num_samples=2, centring="yes",
        )  # fmt: skip
    wrong = sampling.Centring(
        (("params/Dense_0/kernel", "params/Dense_0/bias"),), (jnp.zeros((3, 3)),)
    )
    with pytest.raises(ValueError, match=r"centres \(3, 3\)"):
        sampling.run(
            jax.random.key(0), PARAMS, _log_likelihood, prior, (X, Y),
            learning_rate=1e-4, num_samples=2, centring=wrong,
        )  # fmt: skip
    missing = sampling.Centring((("params/Dense_9/kernel", "params/Dense_9/bias"),), (0.0,))
    with pytest.raises(ValueError, match="Dense_9"):
        missing._check_fits(PARAMS)
    with pytest.raises(ValueError, match="non-empty tuple of"):
        sampling.Centring((), ())
    with pytest.raises(ValueError, match="tuple of 1 arrays"):
        sampling.Centring((("a", "b"),), [jnp.zeros(2)])
    with pytest.raises(ValueError, match="dense layers with a bias"):
        sampling.centring({"w": jnp.zeros(3)}, lambda p, x, y: x[:, 0], prior, (X, Y))
    for layers in ([2], [], "0", [True]):
        with pytest.raises(ValueError, match=r"ints from -2 to 1; got"):
            sampling.centring(PARAMS, _log_likelihood, prior, (X, Y), layers=layers)
    with pytest.raises(TypeError, match="centring must be True .every dense layer., 'output'"):
        bn.em.e_step(
            jax.random.key(0), PARAMS, bn.gsm.hierarchy(PARAMS, 1.0), _log_likelihood, (X, Y),
            centring="yes",
        )  # fmt: skip


def test_the_config_passes_centring_to_the_e_step():
    cfg = bn.config.load_config({"sgld": {"centring": True}})
    assert cfg.sgld.run_settings()["centring"] is True
    assert "centring" not in bn.config.load_config({}).sgld.run_settings()
    assert (
        bn.config.load_config({"sgld": {"centring": "output"}}).sgld.run_settings()["centring"]
        == "output"
    )
    for bad in ("maybe", 1, None):
        with pytest.raises(bn.config.ConfigError, match="allowed: true, false or output"):
            bn.config.load_config({"sgld": {"centring": bad}})


def _module_log_likelihood(model, p, x, y):
    return jnp.take_along_axis(jax.nn.log_softmax(model.apply(p, x)), y[:, None], 1)[:, 0]


def test_a_partial_log_likelihood_holding_a_module_stays_static_with_and_without_the_shear():
    """Only the prior's Partial and the shear's own wrappers pass their arrays as data: a
    Partial log-likelihood may hold a Flax module, which jit cannot take as data."""
    ll = jax.tree_util.Partial(_module_log_likelihood, MLP)
    c = sampling.centring(PARAMS, ll, _prior(PARAMS), (X, Y), layers=[-1])
    for shear in (None, c):
        r = sampling.run(
            jax.random.key(9), PARAMS, ll, _prior(PARAMS), (X, Y), num_chains=2,
            transform=bn.baoab, centring=shear, auto={"max_steps": 40}, num_samples=4,
        )  # fmt: skip
        assert np.all(np.isfinite(_flat(bn.moments.mean(r.moments))))
