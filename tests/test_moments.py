import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bayesnoise as bn


def stream(key, n, shape=(3, 2), loc=0.0, scale=1.0):
    return loc + scale * jax.random.normal(key, (n,) + shape)


def run(xs):
    def body(state, x):
        return bn.moments.update(state, {"w": x}), None

    state, _ = jax.lax.scan(body, bn.moments.init({"w": xs[0]}), xs)
    return state


@pytest.mark.parametrize("jit", [False, True])
def test_matches_numpy(jit):
    xs = stream(jax.random.key(0), 500, loc=2.0, scale=3.0)
    f = jax.jit(run) if jit else run
    state = f(xs)
    ref = np.asarray(xs, np.float64)
    assert float(state.count) == 500
    np.testing.assert_allclose(bn.moments.mean(state)["w"], ref.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.moments.variance(state)["w"], ref.var(0), rtol=1e-4)
    np.testing.assert_allclose(
        bn.moments.variance(state, ddof=1)["w"], ref.var(0, ddof=1), rtol=1e-4
    )
    np.testing.assert_allclose(bn.moments.std(state)["w"], ref.std(0), rtol=1e-4)
    np.testing.assert_allclose(bn.moments.second_moment(state)["w"], (ref**2).mean(0), rtol=1e-4)


def test_python_loop_update():
    xs = [
        {"a": jnp.array([float(i), -2.0 * i]), "b": {"c": jnp.array(i**2, jnp.float32)}}
        for i in range(7)
    ]
    state = bn.moments.init(xs[0])
    for x in xs:
        state = bn.moments.update(state, x)
    np.testing.assert_allclose(bn.moments.mean(state)["a"], [3.0, -6.0])
    np.testing.assert_allclose(
        bn.moments.variance(state)["b"]["c"], np.var([i**2 for i in range(7)]), rtol=1e-5
    )


def test_vmap_chains_and_merge():
    chains, n = 8, 300
    xs = stream(jax.random.key(1), chains * n).reshape(chains, n, 3, 2)
    xs = xs + jnp.arange(chains, dtype=jnp.float32)[:, None, None, None]  # chains differ
    state = jax.jit(jax.vmap(run))(xs)
    assert state.count.shape == (chains,)
    ref = np.asarray(xs, np.float64)
    np.testing.assert_allclose(bn.moments.mean(state)["w"], ref.mean(1), rtol=1e-5, atol=1e-5)
    merged = bn.moments.merge_chains(state)
    flat = ref.reshape(chains * n, 3, 2)
    assert float(merged.count) == chains * n
    np.testing.assert_allclose(bn.moments.mean(merged)["w"], flat.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.moments.variance(merged)["w"], flat.var(0), rtol=1e-4)


@settings(max_examples=30, deadline=None)
@given(na=st.integers(0, 40), nb=st.integers(0, 40), seed=st.integers(0, 1000))
def test_merge_equals_one_stream(na, nb, seed):
    xs = stream(jax.random.key(seed), na + nb, shape=(2,), loc=5.0)
    a = b = bn.moments.init({"w": jnp.zeros(2)})
    for x in xs[:na]:
        a = bn.moments.update(a, {"w": x})
    for x in xs[na:]:
        b = bn.moments.update(b, {"w": x})
    m = bn.moments.merge(a, b)
    assert float(m.count) == na + nb
    if na + nb == 0:
        assert np.all(np.asarray(m.mean_dev["w"]) == 0)
        with pytest.raises(ValueError, match="no samples"):
            bn.moments.mean(m)
        return
    ref = np.asarray(xs, np.float64)
    np.testing.assert_allclose(bn.moments.mean(m)["w"], ref.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.moments.variance(m)["w"], ref.var(0), rtol=1e-4, atol=1e-5)


def test_float32_large_mean_small_spread():
    n = 20_000
    xs = (1e3 + 1e-2 * jax.random.normal(jax.random.key(3), (n, 4))).astype(jnp.float32)
    assert xs.dtype == jnp.float32
    state = jax.jit(run)(xs)
    ref = np.asarray(xs, np.float64).var(0)
    got = np.asarray(bn.moments.variance(state)["w"])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0.01)
    # the naive sum-of-squares formula fails on the same stream in float32
    naive = jnp.mean(xs**2, axis=0) - jnp.mean(xs, axis=0) ** 2
    assert np.all(np.abs(np.asarray(naive) - ref) / ref > 0.5)
