"""The three dropout inference rules: weight scaling, Monte Carlo, geometric mean."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bayesnoise as bn


@pytest.mark.parametrize("keep", [0.5, 0.7, 0.25])
def test_weight_scaling_is_the_geometric_mean_over_all_masks(keep):
    n, classes, batch = 8, 4, 5
    kw, kb, kx = jax.random.split(jax.random.key(0), 3)
    params = {
        "kernel": jax.random.normal(kw, (n, classes)),
        "bias": jax.random.normal(kb, (classes,)),
    }
    x = jax.random.normal(kx, (batch, n))
    scaled = bn.inference.weight_scale(params, bn.noise.Bernoulli(keep))
    got = np.asarray(jax.nn.softmax(x @ scaled["kernel"] + scaled["bias"]), np.float64)
    # independent: enumerate the 2^n masks in float64 with numpy
    W, b, X = (np.asarray(a, np.float64) for a in (params["kernel"], params["bias"], x))
    log_geo = np.zeros((batch, classes))
    total = 0.0
    for bits in itertools.product([0, 1], repeat=n):
        m = np.array(bits, np.float64)
        prob = keep ** m.sum() * (1 - keep) ** (n - m.sum())
        z = (X * m) @ W + b
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        log_geo += prob * logp
        total += prob
    assert total == pytest.approx(1.0)
    geo = np.exp(log_geo)
    geo /= geo.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, geo, atol=1e-5)
    # and it differs from the arithmetic (Monte Carlo) mean: the check has teeth
    assert (
        np.abs(got - np.asarray(jax.nn.softmax(x @ params["kernel"] + params["bias"]))).max() > 1e-3
    )


def test_weight_scale_leaves_biases_and_scales_rows():
    model = bn.nn.MLP((6, 3))
    params = model.init(jax.random.key(0), jnp.ones((1, 4)))
    scaled = bn.inference.weight_scale(params, bn.noise.Bernoulli(0.8))
    p, s = params["params"], scaled["params"]
    np.testing.assert_allclose(s["Dense_0"]["kernel"], 0.8 * p["Dense_0"]["kernel"], rtol=1e-6)
    np.testing.assert_array_equal(s["Dense_1"]["bias"], p["Dense_1"]["bias"])
    # the plain model with scaled params equals the noisy model's deterministic pass
    apply = bn.nn.noisy_apply(model, bn.noise.Bernoulli(0.8))
    x = jax.random.normal(jax.random.key(1), (5, 4))
    np.testing.assert_allclose(
        model.apply(scaled, x), apply(params, x, deterministic=True), rtol=1e-5, atol=1e-6
    )


def test_mc_predict_is_vmapped_loop_and_geometric_is_renormalised():
    model = bn.nn.MLP((16, 5))
    params = model.init(jax.random.key(0), jnp.ones((1, 6)))
    apply = bn.nn.noisy_apply(model, bn.noise.Bernoulli(0.7))
    noisy = lambda k, x: apply(params, x, rngs={"noise": k})
    x = jax.random.normal(jax.random.key(1), (9, 6))
    key, s = jax.random.key(2), 12
    mc = bn.inference.mc_predict(key, noisy, x, s)
    geo = bn.inference.geometric_predict(key, noisy, x, s)
    keys = jax.random.split(key, s)
    probs = np.stack([np.asarray(jax.nn.softmax(noisy(k, x))) for k in keys])
    np.testing.assert_allclose(mc, probs.mean(0), rtol=1e-5, atol=1e-6)
    g = np.exp(np.log(probs).mean(0))
    np.testing.assert_allclose(geo, g / g.sum(-1, keepdims=True), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(geo).sum(-1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="num_samples must be an int >= 1, got 0"):
        bn.inference.mc_predict(key, noisy, x, 0)


def test_weight_scale_with_a_noise_per_layer():
    model = bn.nn.MLP((6, 3))
    params = model.init(jax.random.key(0), jnp.ones((1, 4)))
    spec = {"Dense_0/": bn.noise.Bernoulli(0.8), "": bn.noise.Beta(1.0, 3.0)}
    scaled = bn.inference.weight_scale(params, spec)["params"]
    p = params["params"]
    np.testing.assert_allclose(scaled["Dense_0"]["kernel"], 0.8 * p["Dense_0"]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(
        scaled["Dense_1"]["kernel"], 0.25 * p["Dense_1"]["kernel"], rtol=1e-6
    )
    apply = bn.nn.noisy_apply(model, spec)
    x = jax.random.normal(jax.random.key(1), (5, 4))
    np.testing.assert_allclose(
        model.apply({"params": scaled}, x),
        apply(params, x, deterministic=True),
        rtol=1e-5,
        atol=1e-6,
    )
