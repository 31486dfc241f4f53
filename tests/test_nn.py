import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
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


# ---------------------------------------------------------------- learned noise


class SmallCNN(nn.Module):
    """Conv → ReLU → pool → Dense on 8x8 digits given as flat rows of 64 pixels."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], 8, 8, 1)
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


class NNXSmallCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.out = nnx.Linear(4 * 4 * 8, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv(x.reshape(x.shape[0], 8, 8, 1)))
        x = nnx.max_pool(x, (2, 2), (2, 2))
        return self.out(x.reshape(x.shape[0], -1))


def _draws(apply_fn, num, seed=0):
    """``apply_fn(key)`` for ``num`` keys, as float64: shape (num, ...)."""
    keys = jax.random.split(jax.random.key(seed), num)
    return np.asarray(jax.jit(jax.vmap(apply_fn))(keys), np.float64)


def _assert_gaussian_moments(draws, mean, var, z=5.0):
    """Sample mean and variance over axis 0 against the exact ones, within z standard errors
    (mean: √(var/n); variance of a Gaussian sample: var √(2/(n−1)))."""
    n = draws.shape[0]
    mean, var = np.broadcast_to(mean, draws.shape[1:]), np.broadcast_to(var, draws.shape[1:])
    assert np.all(np.abs(draws.mean(0) - mean) < z * np.sqrt(var / n))
    assert np.all(np.abs(draws.var(0, ddof=1) - var) < z * var * math.sqrt(2 / (n - 1)))


@pytest.mark.parametrize("per", ["row", "weight"])
def test_learned_noise_keeps_the_model_params_and_adds_its_own(per):
    model = SmallCNN()
    x = jax.random.uniform(jax.random.key(5), (5, 64))
    plain = model.init(jax.random.key(0), x)
    vd = bn.nn.learned_noise(model, per)
    variables = vd.init(jax.random.key(0), x)
    name = "log_alpha" if per == "row" else "log_sigma2"
    for layer, rows in (("Conv_0", 1), ("Dense_0", 128)):
        own = variables["params"][layer]
        assert set(own) == {"kernel", "bias", name}
        chex.assert_trees_all_equal(own["kernel"], plain["params"][layer]["kernel"])
        want = (rows,) if per == "row" else own["kernel"].shape
        assert own[name].shape == want
    chex.assert_trees_all_equal(bn.inference.mean_params(variables), plain)
    # the model's own apply ignores the noise leaves: it is the mean network
    mean = vd.apply(variables, x, deterministic=True)
    np.testing.assert_allclose(mean, model.apply(plain, x), rtol=1e-6)
    np.testing.assert_allclose(model.apply(variables, x), mean, rtol=1e-6)
    noisy = [vd.apply(variables, x, rngs={"noise": jax.random.key(k)}) for k in (1, 2)]
    assert not np.allclose(noisy[0], noisy[1]) and not np.allclose(noisy[0], mean)
    jitted = jax.jit(lambda v, k: vd.apply(v, x, rngs={"noise": k}))(variables, jax.random.key(1))
    np.testing.assert_allclose(jitted, noisy[0], rtol=1e-5, atol=1e-6)
    # every log α starts at init_log_alpha
    for layer in bn.nn.learned_layers(variables):
        np.testing.assert_allclose(layer.log_alpha, -4.0, atol=1e-5)


def test_row_noise_moments_per_unit_and_channel():
    width, n = 4, 20_000
    log_alpha = jnp.log(jnp.array([0.05, 0.3, 1.0, 2.0]))
    vd = bn.nn.learned_noise(Identity(width), "row")
    params = {"params": {"Dense_0": {"kernel": jnp.eye(width), "log_alpha": log_alpha}}}
    x = jnp.ones((n, width))
    xi = np.asarray(vd.apply(params, x, rngs={"noise": jax.random.key(0)}), np.float64)
    _assert_gaussian_moments(xi, 1.0, np.exp(np.asarray(log_alpha, np.float64)))
    corr = np.corrcoef(xi.T)[np.triu_indices(width, 1)]
    assert np.all(np.abs(corr) < 5 / math.sqrt(n))  # independent units

    class C(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(3, (1, 1), use_bias=False)(x)

    conv = bn.nn.learned_noise(C(), "row")
    params = {"params": {"Conv_0": {"kernel": jnp.eye(3).reshape(1, 1, 3, 3)}}}
    params["params"]["Conv_0"]["log_alpha"] = jnp.zeros(3)
    out = np.asarray(conv.apply(params, jnp.ones((4, 5, 5, 3)), rngs={"noise": jax.random.key(0)}))
    assert np.allclose(out, out[:, :1, :1, :])  # one ξ per example and channel
    assert np.unique(out[:, 0, 0, :]).size == 12


def _weight_noise_params(key, kernel_shape, out):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "kernel": jax.random.normal(k1, kernel_shape),
        "bias": jax.random.normal(k2, (out,)),
        "log_sigma2": jax.random.uniform(k3, kernel_shape, minval=-3.0, maxval=0.0),
    }


@pytest.mark.parametrize("layer", ["dense", "conv"])
def test_local_reparameterisation_matches_sampled_weights(layer):
    """The per-weight noise draws pre-activations, b ~ N(x θ + bias, x² σ²) per entry; sampling
    weights W ~ N(θ, σ²) and computing x W + bias gives the same marginals."""
    n = 20_000
    if layer == "dense":
        model = nn.Dense(3)
        x = jax.random.normal(jax.random.key(1), (2, 4))
        own = _weight_noise_params(jax.random.key(2), (4, 3), 3)
    else:
        model = nn.Conv(2, (2, 2), padding="VALID")
        x = jax.random.normal(jax.random.key(1), (1, 3, 3, 2))
        own = _weight_noise_params(jax.random.key(2), (2, 2, 2, 2), 2)
    vd = bn.nn.learned_noise(model, "weight")
    params = {"params": own}
    lrt = _draws(lambda k: vd.apply(params, x, rngs={"noise": k}), n)

    def sampled(key):
        w = own["kernel"] + jnp.exp(0.5 * own["log_sigma2"]) * jax.random.normal(
            key, own["kernel"].shape
        )
        return model.apply({"params": {"kernel": w, "bias": own["bias"]}}, x)

    mc = _draws(sampled, n, seed=1)
    mean = np.asarray(model.apply(params, x), np.float64)
    # x² σ², by the plain layer with kernel σ² and no bias
    no_bias = {"kernel": jnp.exp(own["log_sigma2"]), "bias": jnp.zeros_like(own["bias"])}
    var = np.asarray(model.apply({"params": no_bias}, x**2), np.float64)
    assert np.all(var > 1e-3)  # the noise is not negligible
    _assert_gaussian_moments(lrt, mean, var)
    _assert_gaussian_moments(mc, mean, var)
    # and the two samples agree with each other (difference of means: √(2 var / n))
    assert np.all(np.abs(lrt.mean(0) - mc.mean(0)) < 5 * np.sqrt(2 * var / n))


@pytest.mark.parametrize("per", ["row", "weight"])
def test_nnx_learned_noise_params_moments_and_switch(per):
    n = 20_000
    model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (2, 4))
    clean = np.asarray(model(x), np.float64)
    bn.nn.add_learned_noise(model, per, rngs=nnx.Rngs(noise=0), init_log_alpha=-1.0)
    _, params, _ = nnx.split(model, nnx.Param, ...)
    name = "log_alpha" if per == "row" else "log_sigma2"
    paths = {bn._tree.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert paths == {"layers/0/kernel", "layers/0/bias", f"layers/0/{name}"}
    (layer,) = bn.nn.learned_layers(params)
    assert layer.path == "layers/0/kernel" and layer.per == per
    np.testing.assert_allclose(layer.log_alpha, -1.0, atol=1e-5)
    draws = _draws(lambda k: bn.inference.nnx_sampler(model)(k, x), n)
    kernel = np.asarray(layer.kernel, np.float64)
    # Var[b_k] = Σ_j x_j² Var[w_jk] for both kinds (row: α θ², weight: σ² = α θ² at init)
    var = np.asarray(x, np.float64) ** 2 @ (math.exp(-1.0) * kernel**2)
    _assert_gaussian_moments(draws, clean, var)
    if per == "row":  # one ξ per input unit, shared by the outputs: correlated outputs
        corr = np.corrcoef(draws[:, 0, 0], draws[:, 0, 1])[0, 1]
        assert abs(corr) > 10 / math.sqrt(n)
    bn.nn.set_deterministic(model)
    np.testing.assert_allclose(model(x), clean, rtol=1e-5, atol=1e-6)


def _digits_error(train_and_predict):
    ds = bn.data.load_digits()
    predict = train_and_predict(jnp.asarray(ds.x_train), jnp.asarray(ds.y_train))
    return float(jnp.mean(jnp.argmax(predict(jnp.asarray(ds.x_test)), -1) != ds.y_test))


@pytest.mark.parametrize("per", ["row", "weight"])
def test_linen_cnn_with_learned_noise_learns_digits(per):
    vd = bn.nn.learned_noise(SmallCNN(), per)

    def train_and_predict(x, y):
        params = vd.init(jax.random.key(0), x[:1])
        apply = lambda p, xb, k: vd.apply(p, xb, rngs={"noise": k})
        loss_fn = bn.train.variational_loss(apply, len(x), warmup_steps=40)
        res = bn.train.fit(
            jax.random.key(1), params, loss_fn, optax.adam(1e-2), x, y, epochs=4, batch_size=64
        )
        assert float(res.history["nll"][-1]) < 0.5 * float(res.history["nll"][0])
        return lambda xt: vd.apply(res.params, xt, deterministic=True)

    assert _digits_error(train_and_predict) < 0.2  # chance: 0.9


def test_nnx_cnn_with_learned_noise_learns_digits():
    model = bn.nn.add_learned_noise(NNXSmallCNN(nnx.Rngs(0)), "weight", rngs=nnx.Rngs(noise=1))

    def train_and_predict(x, y):
        optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
        loss_fn = bn.train.variational_loss(
            lambda m, xb, _: m(xb),
            len(x),
            warmup_steps=40,
            kl_fn=lambda m: bn.penalties.learned_noise_kl(nnx.state(m, nnx.Param)),
        )

        @nnx.jit
        def train_step(model, optimizer, xb, yb, t):
            grad_fn = nnx.value_and_grad(lambda m: loss_fn(m, xb, yb, None, step=t), has_aux=True)
            (_, metrics), grads = grad_fn(model)
            optimizer.update(model, grads)
            return metrics["nll"]

        nll, t = [], 0
        for epoch in range(4):
            order = np.random.default_rng(epoch).permutation(len(x))
            for batch in order[: len(x) // 64 * 64].reshape(-1, 64):
                nll.append(float(train_step(model, optimizer, x[batch], y[batch], t)))
                t += 1
        assert np.mean(nll[-10:]) < 0.5 * np.mean(nll[:10])
        bn.nn.set_deterministic(model)
        return model

    before = [np.asarray(model.conv.log_sigma2[...]), np.asarray(model.out.log_sigma2[...])]
    assert _digits_error(train_and_predict) < 0.2
    after = [model.conv.log_sigma2[...], model.out.log_sigma2[...]]
    assert all(np.abs(np.asarray(a) - b).max() > 0.01 for a, b in zip(after, before))


def test_row_noise_grows_on_irrelevant_inputs():
    """Five inputs carry the signal, ten are pure noise: the learned α of every noise input
    ends above the α of every relevant one."""
    n, relevant, irrelevant = 400, 5, 10
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (n, relevant + irrelevant))
    y = x[:, :relevant] @ jnp.array([1.5, -1.0, 2.0, -0.8, 1.2]) + jax.random.normal(ky, (n,))
    vd = bn.nn.learned_noise(nn.Dense(1), "row")
    params = vd.init(jax.random.key(1), x[:1])
    loss_fn = bn.train.variational_loss(
        lambda p, xb, k: vd.apply(p, xb, rngs={"noise": k}), n, likelihood="gaussian"
    )
    res = bn.train.fit(
        jax.random.key(2), params, loss_fn, optax.adam(3e-2), x, y, epochs=150, batch_size=100
    )
    log_alpha = np.asarray(res.params["params"]["log_alpha"])
    assert log_alpha[relevant:].min() > log_alpha[:relevant].max() + 2.0, log_alpha


def test_learned_noise_bad_inputs():
    model = bn.nn.MLP((4, 2))
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="per must be 'row'.*or 'weight'.*got 'column'"):
        bn.nn.learned_noise(model, "column")
    for bad in (float("nan"), 13.0, -20.0, float("inf")):
        with pytest.raises(ValueError, match=rf"init_log_alpha must be .*\[-12.0, 12.0\].*{bad}"):
            bn.nn.learned_noise(model, "row", init_log_alpha=bad)
        with pytest.raises(ValueError, match="init_log_alpha must be"):
            bn.nn.add_learned_noise(
                nnx.Linear(3, 2, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(noise=0), init_log_alpha=bad
            )
    with pytest.raises(TypeError, match=r"cannot put learned noise on \['DenseGeneral'\]"):
        bn.nn.learned_noise(model, layers=(nn.Dense, nn.DenseGeneral))
    with pytest.raises(TypeError, match=r"cannot put learned noise on \['Einsum'\]"):
        bn.nn.add_learned_noise(
            nnx.Linear(3, 2, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(noise=0), layers=(nnx.Einsum,)
        )
    vd = bn.nn.learned_noise(model, "weight", where="Dense_7/")
    with pytest.raises(ValueError, match=r"selects no layer: where='Dense_7/'.*Dense_0/kernel"):
        vd.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"selects no layer.*layers/0"):
        bn.nn.add_learned_noise(
            nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0))), rngs=nnx.Rngs(noise=0), where="no"
        )
    vd = bn.nn.learned_noise(model, "row")
    variables = vd.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="needs an rng for 'noise'"):
        vd.apply(variables, x)
    with pytest.raises(ValueError, match="no stream 'noise'"):
        bn.nn.add_learned_noise(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(other=0))
    broken = {"params": {"Dense_0": {"kernel": jnp.ones((3, 4)), "log_alpha": jnp.ones(4)}}}
    with pytest.raises(ValueError, match=r"'params/Dense_0/log_alpha' has shape \(4,\).*\(3,\)"):
        bn.nn.learned_layers(broken)


def test_learned_noise_and_input_noise_do_not_stack_on_one_layer():
    model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    bn.nn.add_input_noise(model, bn.noise.Bernoulli(0.5), nnx.Rngs(noise=0))
    with pytest.raises(ValueError, match="selects no layer"):
        bn.nn.add_learned_noise(model, rngs=nnx.Rngs(noise=0))
