import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import bayesnoise as bn


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(7)(x))
        x = nn.LayerNorm()(x)
        return nn.Dense(3)(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(6, (3, 3))(x)
        return nn.Dense(2)(x.reshape(x.shape[0], -1))


def mlp_params():
    return MLP().init(jax.random.key(0), jnp.ones((1, 5)))


def random_scales(h, key):
    leaves, treedef = jax.tree.flatten(h.scales, is_leaf=lambda x: x is None)
    keys = jax.random.split(key, len(leaves))
    new = [
        None if s is None else jax.random.uniform(k, s.shape, minval=0.2, maxval=3.0)
        for k, s in zip(keys, leaves)
    ]
    return jax.tree.unflatten(treedef, new)


def test_hierarchy_linen_mlp():
    params = mlp_params()
    h = bn.gsm.hierarchy(params, sigma0=0.5)
    s = h.scales["params"]
    assert s["Dense_0"]["kernel"].shape == (5,)
    assert s["Dense_1"]["kernel"].shape == (7,)
    assert s["Dense_0"]["bias"] is None and s["Dense_1"]["bias"] is None
    assert s["LayerNorm_0"]["scale"] is None and s["LayerNorm_0"]["bias"] is None
    assert float(s["Dense_0"]["kernel"].sum()) == 5.0
    assert h.sigma0 == 0.5
    # a hierarchy is a pytree: it goes through jit and tree.map
    doubled = jax.jit(lambda h: jax.tree.map(lambda x: 2 * x, h))(h)
    assert (
        float(doubled.sigma0) == 1.0
        and float(doubled.scales["params"]["Dense_1"]["kernel"][0]) == 2.0
    )


def test_hierarchy_conv_in_channel_axis():
    params = CNN().init(jax.random.key(0), jnp.ones((1, 8, 8, 4)))
    h = bn.gsm.hierarchy(params)
    assert h.scales["params"]["Conv_0"]["kernel"].shape == (4,)  # kernel (3, 3, 4, 6)
    lam = jnp.arange(1.0, 5.0)
    scales = jax.tree.map(lambda x: x, h.scales)
    scales["params"]["Conv_0"]["kernel"] = lam
    v = bn.gsm.to_identifiable(params, scales)
    k = params["params"]["Conv_0"]["kernel"]
    np.testing.assert_allclose(v["params"]["Conv_0"]["kernel"], k * lam[None, None, :, None])


def test_hierarchy_nnx_state():
    model = nnx.Sequential(nnx.Linear(5, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    state = nnx.state(model, nnx.Param)
    h = bn.gsm.hierarchy(state)
    leaves = [x for x in jax.tree.leaves(h.scales)]
    assert sorted(x.shape for x in leaves) == [(4,), (5,)]
    v = bn.gsm.to_identifiable(state, h)
    assert jax.tree.structure(v) == jax.tree.structure(state)


def test_where_regex_and_explicit_axis():
    params = mlp_params()
    h = bn.gsm.hierarchy(params, where="Dense_1/kernel")
    assert h.scales["params"]["Dense_0"]["kernel"] is None
    assert h.scales["params"]["Dense_1"]["kernel"].shape == (7,)
    # an explicit axis: noise the output columns of Dense_0 instead of its rows
    h2 = bn.gsm.hierarchy(params, where=lambda p, x: 1 if p.endswith("Dense_0/kernel") else None)
    assert h2.scales["params"]["Dense_0"]["kernel"].shape == (7,)
    lam = jnp.linspace(0.5, 2.0, 7)
    h2 = h2.replace(scales=jax.tree.map(lambda s: lam, h2.scales))
    v = bn.gsm.to_identifiable(params, h2)
    k = params["params"]["Dense_0"]["kernel"]
    np.testing.assert_allclose(v["params"]["Dense_0"]["kernel"], k * lam[None, :], rtol=1e-6)


def test_round_trip_is_exact():
    params = mlp_params()
    h = bn.gsm.hierarchy(params)
    scales = random_scales(h, jax.random.key(3))
    v = bn.gsm.to_identifiable(params, scales)
    k = params["params"]["Dense_0"]["kernel"]
    np.testing.assert_allclose(
        v["params"]["Dense_0"]["kernel"],
        k * scales["params"]["Dense_0"]["kernel"][:, None],
        rtol=1e-6,
    )
    assert v["params"]["Dense_0"]["bias"] is params["params"]["Dense_0"]["bias"]
    back = bn.gsm.from_identifiable(v, scales)
    chex.assert_trees_all_close(back, params, rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 5),
    scale=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(rows, cols, scale, seed):
    w = {"kernel": jax.random.normal(jax.random.key(seed), (rows, cols))}
    lam = scale * jax.random.uniform(jax.random.key(seed + 1), (rows,), minval=0.1, maxval=1.0)
    back = bn.gsm.from_identifiable(bn.gsm.to_identifiable(w, {"kernel": lam}), {"kernel": lam})
    np.testing.assert_allclose(back["kernel"], w["kernel"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sigma0", [0.3, 1.0, 2.5])
def test_log_prior_matches_scipy(sigma0):
    params = mlp_params()
    h = bn.gsm.hierarchy(params, sigma0=sigma0)
    h = h.replace(scales=random_scales(h, jax.random.key(7)))
    got = float(jax.jit(bn.gsm.log_prior)(params, h))
    want = 0.0
    for name in ("Dense_0", "Dense_1"):
        k = np.asarray(params["params"][name]["kernel"], np.float64)
        lam = np.asarray(h.scales["params"][name]["kernel"], np.float64)
        want += stats.norm.logpdf(k, 0.0, sigma0 * lam[:, None]).sum()
    assert got == pytest.approx(want, rel=1e-5)


def test_bernoulli_marginal_is_spike_and_slab():
    keep, sigma0, n = 0.7, 1.5, 40_000
    params = {"kernel": jnp.zeros((n, 1))}  # one weight per row: independent λ per weight
    v, lam = bn.gsm.sample_prior(jax.random.key(0), params, bn.noise.Bernoulli(keep), sigma0)
    v = np.asarray(v["kernel"]).ravel()
    zero = np.mean(v == 0.0)
    assert abs(zero - (1 - keep)) < 5 * math.sqrt(keep * (1 - keep) / n)
    slab = v[v != 0.0]
    crit = 1.95 / math.sqrt(slab.size)  # 0.1% level
    assert stats.kstest(slab, stats.norm(0, sigma0).cdf).statistic < crit
    # the check has power: a slab of the wrong width is rejected
    assert stats.kstest(slab, stats.norm(0, 1.15 * sigma0).cdf).statistic > crit


def test_inverse_gamma_marginal_is_student_t():
    a, b, sigma0, n = 2.5, 1.5, 0.8, 40_000
    noise = bn.noise.InverseGammaScale(a, b)
    params = {"kernel": jnp.zeros((n, 1))}
    v, _ = bn.gsm.sample_prior(jax.random.key(1), params, noise, sigma0)
    v = np.asarray(v["kernel"], np.float64).ravel()
    df, unit_scale = noise.student_t
    assert df == 2 * a and unit_scale == pytest.approx(math.sqrt(b / a))
    crit = 1.95 / math.sqrt(n)
    assert stats.kstest(v, stats.t(df, scale=sigma0 * unit_scale).cdf).statistic < crit
    assert stats.kstest(v, stats.t(df, scale=1.1 * sigma0 * unit_scale).cdf).statistic > crit
    assert stats.kstest(v, stats.t(2 * df, scale=sigma0 * unit_scale).cdf).statistic > crit


def test_rows_share_one_scale():
    params = {"kernel": jnp.zeros((500, 20))}
    v, lam = bn.gsm.sample_prior(jax.random.key(2), params, bn.noise.Bernoulli(0.5))
    v = np.asarray(v["kernel"])
    dropped = np.asarray(lam["kernel"]) == 0
    assert np.all(v[dropped] == 0) and np.all(v[~dropped] != 0)


def test_row_sizes_and_sums():
    params = CNN().init(jax.random.key(0), jnp.ones((1, 4, 4, 3)))
    h = bn.gsm.hierarchy(params)
    sizes = bn.gsm.row_sizes(params, h)
    assert sizes["params"]["Conv_0"]["kernel"] == 3 * 3 * 6
    assert sizes["params"]["Dense_0"]["kernel"] == 2
    sq = jax.tree.map(jnp.square, params)
    sums = bn.gsm.row_sums(sq, h)
    k = np.asarray(params["params"]["Conv_0"]["kernel"])
    np.testing.assert_allclose(
        sums["params"]["Conv_0"]["kernel"], (k**2).sum(axis=(0, 1, 3)), rtol=1e-6
    )


# ---------------------------------------------------------------- bad input


def test_nothing_to_noise():
    with pytest.raises(ValueError, match="no leaf of the params tree is noised.*bias"):
        bn.gsm.hierarchy({"bias": jnp.zeros(3)})
    with pytest.raises(ValueError, match="no leaf"):
        bn.gsm.hierarchy(mlp_params(), where="does_not_exist")


@pytest.mark.parametrize("sigma0", [0.0, -1.0])
def test_bad_sigma0(sigma0):
    with pytest.raises(ValueError, match=f"sigma0.*must be a finite number > 0, got {sigma0}"):
        bn.gsm.hierarchy(mlp_params(), sigma0=sigma0)


def test_scales_of_wrong_shape_name_the_leaf():
    params = mlp_params()
    h = bn.gsm.hierarchy(params)
    bad = jax.tree.map(lambda x: x, h.scales)
    bad["params"]["Dense_1"]["kernel"] = jnp.ones(4)
    with pytest.raises(ValueError, match=r"'params/Dense_1/kernel' have shape \(4,\).*\(7, 3\)"):
        bn.gsm.to_identifiable(params, bad)
    with pytest.raises(ValueError, match="does not match the params tree"):
        bn.gsm.to_identifiable(params, {"params": {}})


def test_bad_where():
    with pytest.raises(TypeError, match="where must be"):
        bn.gsm.hierarchy(mlp_params(), where=3)
    with pytest.raises(ValueError, match="axis 5.*allowed axes"):
        bn.gsm.hierarchy(mlp_params(), where=lambda p, x: 5 if p.endswith("kernel") else None)


def test_new_scales_of_the_wrong_tree_are_rejected():
    params = {"a": {"kernel": jnp.ones((3, 2))}, "b": {"kernel": jnp.ones((4, 2))}}
    h = bn.gsm.hierarchy(params)
    for bad in (
        {"a": {"kernel": jnp.ones(3)}},  # a leaf missing
        {"a": {"kernel": jnp.ones(4)}, "b": {"kernel": jnp.ones(4)}},  # a wrong length
        jnp.ones(7),  # not a tree
    ):
        with pytest.raises(ValueError, match="structure and shapes of hierarchy.scales"):
            h.replace(scales=bad)
    ok = h.replace(scales={"a": {"kernel": jnp.full(3, 0.5)}, "b": {"kernel": jnp.ones(4)}})
    assert float(ok.scales["a"]["kernel"][0]) == 0.5
