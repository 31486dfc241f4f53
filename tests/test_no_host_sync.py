"""Hot loops neither talk to the host nor recompile."""

import jax
import jax.numpy as jnp
import optax

import bayesnoise as bn


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
    with jax.transfer_guard("disallow"):
        with jax.log_compiles(True):
            import logging

            records = []
            handler = logging.Handler()
            handler.emit = records.append
            logger = logging.getLogger("jax")
            logger.addHandler(handler)
            try:
                second = bn.train.fit(key, params, loss_fn, opt, x, y, epochs=2, batch_size=32)
                jax.block_until_ready(second.params)
            finally:
                logger.removeHandler(handler)
    compiles = [r for r in records if "Compiling" in r.getMessage()]
    assert compiles == [], [r.getMessage()[:120] for r in compiles]
    assert jnp.allclose(first.history["loss"], second.history["loss"])
