import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bayesnoise as bn

NOISES = [bn.noise.Bernoulli(0.7), bn.noise.Gaussian(0.5), bn.noise.Beta(2.0, 3.0)]


class Identity(nn.Module):
    """One Dense whose kernel is set to the identity: its output is the noisy input."""

    width: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.width, use_bias=False)(x)


def identity_params(width):
    return {"params": {"Dense_0": {"kernel": jnp.eye(width)}}}


# ---------------------------------------------------------------- geometric mean, enumerated


# ---------------------------------------------------------------- the injected noise


@pytest.mark.parametrize("noise", NOISES, ids=lambda n: type(n).__name__)
def test_transform_noise_moments_and_independence(noise):
    width, n = 6, 20_000
    apply = bn.nn.noisy_apply(Identity(width), noise)
    x = jnp.ones((n, width))
    lam1 = np.asarray(
        jax.jit(lambda k: apply(identity_params(width), x, rngs={"noise": k}))(jax.random.key(0)),
        np.float64,
    )
    lam2 = np.asarray(
        apply(identity_params(width), x, rngs={"noise": jax.random.key(1)}), np.float64
    )
    se = math.sqrt(noise.variance / n)
    assert np.all(np.abs(lam1.mean(0) - noise.mean) < 5 * se)
    assert np.all(np.abs(lam1.var(0) / noise.variance - 1) < 5 * math.sqrt(2.5 / n))
    tol = 5 / math.sqrt(n)
    corr_units = np.corrcoef(lam1.T)[np.triu_indices(width, 1)]
    corr_examples = np.corrcoef(lam1[:-1, 0], lam1[1:, 0])[0, 1]
    corr_steps = np.corrcoef(lam1[:, 0], lam2[:, 0])[0, 1]
    assert np.all(np.abs(corr_units) < tol)
    assert abs(corr_examples) < tol and abs(corr_steps) < tol


def test_conv_noise_is_per_channel_and_shared_over_positions():
    class C(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(3, (1, 1), use_bias=False)(x)

    params = {"params": {"Conv_0": {"kernel": jnp.eye(3).reshape(1, 1, 3, 3)}}}
    out = bn.nn.noisy_apply(C(), bn.noise.Gaussian(1.0))(
        params, jnp.ones((4, 5, 5, 3)), rngs={"noise": jax.random.key(0)}
    )
    out = np.asarray(out)
    assert np.allclose(out, out[:, :1, :1, :])  # one λ per example and channel
    assert np.unique(out[:, 0, 0, :]).size == 12


def test_transform_matches_the_hand_written_module_statistically_and_when_switched_off():
    class Hand(nn.Module):
        @nn.compact
        def __call__(self, x, deterministic=False):
            x = bn.nn.MultiplicativeNoise(bn.noise.Beta(2.0, 3.0))(x, deterministic)
            return nn.Dense(4, use_bias=False)(x)

    hand = Hand()
    params = hand.init(jax.random.key(0), jnp.ones((1, 4)), deterministic=True)
    params = {"params": {"Dense_0": {"kernel": jnp.eye(4)}}}
    x = jnp.ones((20_000, 4))
    a = np.asarray(hand.apply(params, x, rngs={"noise": jax.random.key(3)}))
    b = np.asarray(
        bn.nn.noisy_apply(Identity(4), bn.noise.Beta(2.0, 3.0))(
            params, x, rngs={"noise": jax.random.key(3)}
        )
    )
    for z in (a, b):
        assert abs(z.mean() - 0.4) < 5 * math.sqrt(0.04 / z.size)
    det_hand = hand.apply(params, x[:3], deterministic=True)
    det_tr = bn.nn.noisy_apply(Identity(4), bn.noise.Beta(2.0, 3.0))(
        params, x[:3], deterministic=True
    )
    np.testing.assert_allclose(det_hand, det_tr)
    np.testing.assert_allclose(det_hand, 0.4 * np.ones((3, 4)), rtol=1e-6)


def test_nnx_transform_equals_hand_written_module_for_the_same_key():
    noise = bn.noise.Gaussian(0.7)

    class Hand(nnx.Module):
        def __init__(self, rngs):
            self.n0 = bn.nn.NNXMultiplicativeNoise(noise, rngs=rngs)
            self.l0 = nnx.Linear(5, 8, rngs=nnx.Rngs(0))
            self.n1 = bn.nn.NNXMultiplicativeNoise(noise, rngs=rngs)
            self.l1 = nnx.Linear(8, 3, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.l1(self.n1(nnx.relu(self.l0(self.n0(x)))))

    class Plain(nnx.Module):
        def __init__(self):
            self.l0 = nnx.Linear(5, 8, rngs=nnx.Rngs(0))
            self.l1 = nnx.Linear(8, 3, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.l1(nnx.relu(self.l0(x)))

    x = jax.random.normal(jax.random.key(9), (7, 5))
    hand = Hand(nnx.Rngs(noise=42))
    plain = bn.nn.add_input_noise(Plain(), noise, nnx.Rngs(noise=42))
    for _ in range(2):  # same draws on consecutive calls too
        np.testing.assert_allclose(hand(x), plain(x), rtol=1e-6)
    clean = Plain()(x)
    assert np.abs(np.asarray(plain(x) - clean)).max() > 1e-3
    bn.nn.set_deterministic(plain)
    np.testing.assert_allclose(plain(x), clean, rtol=1e-6)  # E[λ] = 1
    # parameter paths are unchanged, so the GSM hierarchy sees the same tree
    h = bn.gsm.hierarchy(nnx.state(plain, nnx.Param))
    assert sorted(s.shape for s in jax.tree.leaves(h.scales)) == [(5,), (8,)]


def test_nnx_transform_under_jit_draws_fresh_noise():
    model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
    bn.nn.add_input_noise(model, bn.noise.Bernoulli(0.5), nnx.Rngs(noise=0))
    f = nnx.jit(lambda m, x: m(x))
    a, b = f(model, jnp.ones((3, 4))), f(model, jnp.ones((3, 4)))
    assert not np.allclose(a, b)


def test_noise_mapping_by_path():
    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(3, use_bias=False)(x)
            return nn.Dense(3, use_bias=False)(x)

    params = {"params": {"Dense_0": {"kernel": jnp.eye(3)}, "Dense_1": {"kernel": jnp.eye(3)}}}
    spec = {"Dense_0/": bn.noise.Bernoulli(1.0), "Dense_1/": bn.noise.Gaussian(0.5)}
    apply = bn.nn.noisy_apply(Two(), spec)
    det = apply(params, jnp.ones((2, 3)), deterministic=True)
    np.testing.assert_allclose(det, np.ones((2, 3)))
    only_first = bn.nn.noisy_apply(Two(), bn.noise.Bernoulli(0.5), where="Dense_0/")
    out = np.asarray(only_first(params, jnp.ones((500, 3)), rngs={"noise": jax.random.key(0)}))
    assert set(np.unique(out)) == {0.0, 1.0}


def test_dropconnect_per_weight():
    params = {"kernel": jnp.ones((300, 200)), "bias": jnp.ones(200)}
    out = bn.nn.dropconnect(jax.random.key(0), params, bn.noise.Bernoulli(0.6))
    k = np.asarray(out["kernel"])
    assert abs(k.mean() - 0.6) < 5 * math.sqrt(0.24 / k.size)
    assert np.abs(np.corrcoef(k[:, 0], k[:, 1])[0, 1]) < 5 / math.sqrt(300)  # not per row
    np.testing.assert_array_equal(out["bias"], params["bias"])


# ---------------------------------------------------------------- inference rules


# ---------------------------------------------------------------- training


# ---------------------------------------------------------------- reparameterised noise


def test_reparameterized_noise_gradient():
    # d/dα E[(x λ)²] = x² d/dα (1 + α) = x² for λ ~ N(1, α)
    def f(alpha):
        layer = bn.nn.MultiplicativeNoise(bn.noise.Gaussian(alpha), reparameterized=True)
        y = layer.apply({}, 2.0 * jnp.ones((50_000,)), rngs={"noise": jax.random.key(0)})
        return jnp.mean(y**2)

    assert float(jax.grad(f)(0.5)) == pytest.approx(4.0, rel=0.05)


# ---------------------------------------------------------------- bad input


def test_noise_on_a_missing_path():
    model = bn.nn.MLP((4, 2))
    params = model.init(jax.random.key(0), jnp.ones((1, 3)))
    apply = bn.nn.noisy_apply(model, bn.noise.Bernoulli(0.5), where="Dense_7/")
    with pytest.raises(ValueError, match=r"selects no layer: where='Dense_7/'.*Dense_0/kernel"):
        apply(params, jnp.ones((2, 3)), rngs={"noise": jax.random.key(0)})
    plain = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"selects no layer.*layers/0"):
        bn.nn.add_input_noise(plain, bn.noise.Bernoulli(0.5), nnx.Rngs(noise=0), where="nope")


def test_noisy_apply_without_rng():
    model = bn.nn.MLP((4, 2))
    params = model.init(jax.random.key(0), jnp.ones((1, 3)))
    apply = bn.nn.noisy_apply(model, bn.noise.Bernoulli(0.5))
    with pytest.raises(ValueError, match="needs an rng for 'noise'"):
        apply(params, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="needs an rng stream 'noise'"):
        bn.nn.MultiplicativeNoise(bn.noise.Gaussian(1.0)).apply({}, jnp.ones(3))
    with pytest.raises(ValueError, match="needs rngs with a 'noise' stream"):
        bn.nn.NNXMultiplicativeNoise(bn.noise.Gaussian(1.0))(jnp.ones(3))


def test_discrete_noise_where_continuous_is_required():
    with pytest.raises(ValueError, match=r"needs a continuous noise.*Bernoulli\(keep=0.5\)"):
        bn.noise.Bernoulli(0.5).rsample(jax.random.key(0), (3,))
    layer = bn.nn.MultiplicativeNoise(bn.noise.Bernoulli(0.5), reparameterized=True)
    with pytest.raises(ValueError, match="reparameterized=True.*continuous"):
        layer.apply({}, jnp.ones(3), rngs={"noise": jax.random.key(0)})


def test_not_a_noise():
    with pytest.raises(TypeError, match="must be a bayesnoise.noise distribution.*float"):
        bn.nn.noisy_apply(bn.nn.MLP((2,)), 0.5)


def test_mlp_mixed_precision_keeps_float32_params_and_output():
    model = bn.nn.MLP((32, 4), dtype=jnp.bfloat16)
    params = model.init(jax.random.key(0), jnp.ones((1, 8)))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    x = jax.random.normal(jax.random.key(1), (16, 8))
    out = model.apply(params, x)
    ref = bn.nn.MLP((32, 4)).apply(params, x)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, rtol=0.05, atol=0.05)  # bfloat16 has 8 mantissa bits
    assert np.abs(np.asarray(out - ref)).max() > 0  # the matmuls did run in bfloat16
    grads = jax.grad(lambda p: model.apply(p, x).sum())(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_old_argument_orders_warn_and_agree():
    params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    key, noise = jax.random.key(0), bn.noise.Bernoulli(0.5)
    with pytest.warns(DeprecationWarning, match="key comes first"):
        old = bn.nn.dropconnect(params, key, noise)
    new = bn.nn.dropconnect(key, params, noise)
    chex.assert_trees_all_equal(old, new)
    fn = lambda k, x: x + jax.random.normal(k, x.shape)
    x = jnp.zeros((4, 3))
    with pytest.warns(DeprecationWarning, match="key comes first"):
        old = bn.inference.mc_predict(fn, x, key, 8)
    np.testing.assert_allclose(old, bn.inference.mc_predict(key, fn, x, 8))


def test_one_where_everywhere():
    """A path regex, a one-argument and a two-argument predicate choose the same leaves in gsm,
    prune and nn."""
    model = bn.nn.MLP(features=(5, 3))
    params = model.init(jax.random.key(0), jnp.ones((1, 4)))
    k1 = "Dense_1/kernel"
    choices = (k1, lambda path: k1 in path, lambda path, leaf: k1 in path)
    for where in choices:
        h = bn.gsm.hierarchy(params, where=where)
        noised = [s is not None for s in jax.tree.leaves(h.scales, is_leaf=lambda s: s is None)]
        assert sum(noised) == 1
        scores = bn.prune.magnitude(params)
        m = bn.prune.mask(scores, 0.5, where=where)
        assert bool(jnp.all(m["params"]["Dense_0"]["kernel"]))
        assert not bool(jnp.all(m["params"]["Dense_1"]["kernel"]))
        with bn.nn.input_noise(bn.noise.Bernoulli(0.5), where=where) as matched:
            model.apply(params, jnp.ones((2, 4)), rngs={"noise": jax.random.key(1)})
        assert matched == ["params/Dense_1/kernel"]
    with pytest.raises(TypeError, match="where must be"):
        bn.gsm.hierarchy(params, where=3)
