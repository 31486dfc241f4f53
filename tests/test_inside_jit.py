"""Public functions called inside ``jit`` with concrete arguments closed over.

Inside a jit trace every operation is traced, even one on a closed-over constant; the argument
checks must still run on such arguments (they are concrete) and the results must equal the
eager ones.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bayesnoise as bn

MEAN = {"Dense_0": {"kernel": jnp.array([[0.5, -1.0], [2.0, 0.1]]), "bias": jnp.array([0.3, -0.2])}}
STD = {"Dense_0": {"kernel": jnp.array([[0.1, 0.5], [1.0, 0.2]]), "bias": jnp.array([0.1, 0.1])}}


def both(fn):
    """(fn() eagerly, fn() inside jit)."""
    return fn(), jax.jit(fn)()


@pytest.mark.parametrize("rule", ["snr", "spr", "magnitude"])
def test_pruning_scores_and_masks_inside_jit(rule):
    def scores():
        if rule == "magnitude":
            return bn.prune.magnitude(MEAN)
        return getattr(bn.prune, rule)(MEAN, STD)

    eager, jitted = both(scores)
    jax.tree.map(np.testing.assert_allclose, jitted, eager)
    eager, jitted = both(lambda: bn.prune.mask(scores(), 0.5))
    jax.tree.map(np.testing.assert_array_equal, jitted, eager)
    bad = {"Dense_0": {"kernel": MEAN["Dense_0"]["kernel"].at[1, 0].set(jnp.nan)}}
    with pytest.raises(ValueError, match="must be finite") as err:
        jax.jit(lambda: bn.prune.snr(bad, {"Dense_0": {"kernel": STD["Dense_0"]["kernel"]}}))()
    assert "Dense_0/kernel" in str(err.value) and "1 NaN" in str(err.value)


def test_m_step_and_kl_inside_jit():
    h = bn.gsm.hierarchy(MEAN, 1.0)
    second = jax.tree.map(lambda m, s: m**2 + s**2, MEAN, STD)
    eager, jitted = both(lambda: bn.em.m_step(second, h))
    jax.tree.map(np.testing.assert_allclose, jitted, eager)
    la = jnp.array([-2.0, 0.0, 3.0])
    eager, jitted = both(lambda: bn.penalties.kl_log_uniform(la))
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    bad = la.at[1].set(jnp.nan)
    with pytest.raises(ValueError, match="1 NaN entries of 3") as err:
        jax.jit(lambda: bn.penalties.kl_log_uniform(bad))()
    assert "log_alpha" in str(err.value)


def test_fit_inside_jit_with_closed_over_data():
    import optax

    x = jax.random.normal(jax.random.key(0), (64, 5))
    y = (x[:, 0] > 0).astype(jnp.int32)
    model = bn.nn.MLP((8, 2))
    loss = bn.train.classification_loss(lambda p, xb, k: model.apply(p, xb))

    def one(key, x=x):
        res = bn.train.fit(
            key, model.init(key, x[:1]), loss, optax.adam(1e-2), x, y, epochs=2, batch_size=16
        )
        return res.history["loss"]

    key = jax.random.key(1)
    eager, jitted = one(key), jax.jit(one)(key)
    np.testing.assert_allclose(jitted, eager, rtol=2e-4)
    bad = x.at[3, 1].set(jnp.inf)
    with pytest.raises(ValueError, match="NaN or inf") as err:
        jax.jit(lambda k: one(k, bad))(key)
    assert "index 3" in str(err.value)
