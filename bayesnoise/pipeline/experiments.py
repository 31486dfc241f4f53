"""Reference experiments on real data, used by the slow tests and the benchmarks."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bayesnoise import data, inference, train
from bayesnoise import nn as bnn
from bayesnoise import noise as bnoise

__all__ = ["MNIST_NOISES", "mnist_noise_run"]

# Input layer and hidden layers get their own noise, as in Srivastava et al. (2014).
MNIST_NOISES = {
    "bernoulli": {"Dense_0/": bnoise.Bernoulli(0.8), "": bnoise.Bernoulli(0.5)},
    "gaussian": {"Dense_0/": bnoise.Gaussian(0.25), "": bnoise.Gaussian(1.0)},
    "beta": {"Dense_0/": bnoise.Beta(4.0, 1.0), "": bnoise.Beta(1.0, 1.0)},
}


def mnist_noise_run(
    kind: str = "bernoulli",
    *,
    epochs: int = 30,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    seed: int = 0,
    mc_samples: int = 16,
    path=None,
    progress: bool = True,
) -> dict:
    """Trains a 784-400-400-10 MLP on MNIST under noise and evaluates the inference rules.

    Returns:
        test errors by weight scaling, Monte Carlo and the geometric mean, and timings.
    """
    spec = MNIST_NOISES[kind]
    ds = data.load_mnist(path)
    model = bnn.MLP((400, 400, 10))
    key = jax.random.key(seed)
    init_key, fit_key, mc_key = jax.random.split(key, 3)
    params = model.init(init_key, jnp.ones((1, 784)))
    apply = bnn.noisy_apply(model, spec)
    loss_fn = train.classification_loss(lambda p, x, k: apply(p, x, rngs={"noise": k}))
    steps = epochs * (len(ds.x_train) // batch_size)
    opt = optax.adam(optax.cosine_decay_schedule(learning_rate, steps, alpha=0.01))
    xte, yte = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)

    def eval_fn(p):
        logits = model.apply(inference.weight_scale(p, spec), xte)
        return {"test_error": jnp.mean(jnp.argmax(logits, -1) != yte)}

    t0 = time.perf_counter()
    result = train.fit(
        fit_key,
        params,
        loss_fn,
        opt,
        jnp.asarray(ds.x_train),
        jnp.asarray(ds.y_train),
        epochs=epochs,
        batch_size=batch_size,
        eval_fn=eval_fn,
        progress=progress,
    )
    jax.block_until_ready(result.params)
    train_s = time.perf_counter() - t0
    p = result.params
    ws = float(eval_fn(p)["test_error"])
    noisy = lambda k, x: apply(p, x, rngs={"noise": k})
    probs_mc, probs_geo = [], []
    for chunk in np.array_split(np.arange(len(yte)), 10):
        xc = xte[chunk]
        probs_mc.append(inference.mc_predict(mc_key, noisy, xc, mc_samples))
        probs_geo.append(inference.geometric_predict(mc_key, noisy, xc, mc_samples))
    mc = float(jnp.mean(jnp.argmax(jnp.concatenate(probs_mc), -1) != yte))
    geo = float(jnp.mean(jnp.argmax(jnp.concatenate(probs_geo), -1) != yte))
    return {
        "noise": kind,
        "epochs": epochs,
        "test_error_weight_scaling": ws,
        "test_error_mc": mc,
        "test_error_geometric": geo,
        "mc_samples": mc_samples,
        "mc_minus_weight_scaling": mc - ws,
        "history_test_error": np.asarray(result.history["test_error"]).tolist(),
        "train_seconds": train_s,
    }
