"""Training under noise: the compiled loop, its losses and its checks."""

import jax
import jax.numpy as jnp
import optax
import pytest

import bayesnoise as bn


def test_fit_on_digits_learns_under_noise():
    ds = bn.data.load_digits()
    model = bn.nn.MLP((64, 10))
    params = model.init(jax.random.key(0), jnp.ones((1, 64)))
    noise = bn.noise.Bernoulli(0.8)
    apply = bn.nn.noisy_apply(model, noise)
    loss_fn = bn.train.classification_loss(lambda p, x, k: apply(p, x, rngs={"noise": k}))
    xte, yte = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)

    def eval_fn(p):
        logits = model.apply(bn.inference.weight_scale(p, noise), xte)
        return {"test_error": jnp.mean(jnp.argmax(logits, -1) != yte)}

    res = bn.train.fit(
        jax.random.key(1),
        params,
        loss_fn,
        optax.adam(3e-3),
        jnp.asarray(ds.x_train),
        jnp.asarray(ds.y_train),
        epochs=15,
        batch_size=64,
        eval_fn=eval_fn,
    )
    h = res.history
    assert h["loss"].shape == (15,) and h["test_error"].shape == (15,)
    assert float(h["loss"][-1]) < 0.5 * float(h["loss"][0])
    assert float(h["test_error"][-1]) < 0.06


def test_fit_rejects_bad_sizes():
    x, y = jnp.ones((10, 2)), jnp.zeros(10, jnp.int32)
    loss_fn = bn.train.classification_loss(lambda p, x, k: x @ p)
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, 10\].*got 20"):
        bn.train.fit(
            jax.random.key(0),
            jnp.ones((2, 2)),
            loss_fn,
            optax.sgd(0.1),
            x,
            y,
            epochs=1,
            batch_size=20,
        )
    with pytest.raises(ValueError, match="epochs must be >= 1, got 0"):
        bn.train.fit(
            jax.random.key(0),
            jnp.ones((2, 2)),
            loss_fn,
            optax.sgd(0.1),
            x,
            y,
            epochs=0,
            batch_size=2,
        )
