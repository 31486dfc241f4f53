"""Hot loops neither talk to the host nor recompile."""

import contextlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bayesnoise as bn


@contextlib.contextmanager
def _guarded():
    """No implicit transfers allowed; yields the list of compilations that happened."""
    compiles = []
    handler = logging.Handler()
    handler.emit = lambda r: (
        compiles.append(r.getMessage()[:120]) if "Compiling" in r.getMessage() else None
    )
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.transfer_guard("disallow"), jax.log_compiles(True):
            yield compiles
    finally:
        logger.removeHandler(handler)


def _setup():
    model = bn.nn.MLP((16, 3))
    params = model.init(jax.random.key(0), jnp.ones((1, 5)))
    x = jax.random.normal(jax.random.key(1), (96, 5))
    y = jax.random.randint(jax.random.key(2), (96,), 0, 3)
    apply = bn.nn.noisy_apply(model, bn.noise.Bernoulli(0.8))
    loss_fn = bn.train.classification_loss(lambda p, xb, k: apply(p, xb, rngs={"noise": k}))
    return model, params, x, y, loss_fn


def test_training_loop_has_no_transfers_and_compiles_once():
    model, params, x, y, loss_fn = _setup()
    opt = optax.adam(1e-3)
    key = jax.random.key(3)
    first = bn.train.fit(key, params, loss_fn, opt, x, y, epochs=2, batch_size=32)
    with _guarded() as compiles:
        second = bn.train.fit(key, params, loss_fn, opt, x, y, epochs=2, batch_size=32)
        jax.block_until_ready(second.params)
    assert compiles == [], compiles
    assert jnp.allclose(first.history["loss"], second.history["loss"])


def _log_likelihood(p, xb, yb):
    logits = bn.nn.MLP((16, 3)).apply(p, xb)
    return -optax.softmax_cross_entropy_with_integer_labels(logits, yb)


def _log_prior(p):
    return -0.5 * sum(jnp.sum(w**2) for w in jax.tree.leaves(p))


def test_sampler_has_no_transfers_and_compiles_once():
    _, params, x, y, _ = _setup()
    settings = dict(
        learning_rate=1e-4,
        batch_size=32,
        num_burnin=30,
        num_samples=20,
        thin=2,
        num_chains=3,
        progress=True,
        progress_every=10,
    )
    first = bn.sampling.run(
        jax.random.key(4), params, _log_likelihood, _log_prior, (x, y), **settings
    )
    # new data values and a new key: the same compiled scan, and no implicit transfer anywhere
    x2, y2, key = x + 1.0, (y + 1) % 3, jax.random.key(5)
    with _guarded() as compiles:
        second = bn.sampling.run(
            key,
            params,
            _log_likelihood,
            _log_prior,
            (x2, y2),
            **settings,
        )
        jax.block_until_ready(second.moments)
    assert compiles == [], compiles
    assert second.num_steps == first.num_steps == 70
    assert np.all(np.isfinite(jax.device_get(second.log_posterior)))
    assert not np.allclose(
        jax.device_get(first.log_posterior), jax.device_get(second.log_posterior)
    )
