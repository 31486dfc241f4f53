"""A small end-to-end example on scikit-learn's bundled digits (no download needed).

Trains an MLP under Bernoulli noise with the Flax transform, compares the three dropout
inference rules, builds the GSM hierarchy of the trained weights, and collects running moments
of the last iterates.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import optax

import bayesnoise as bn


def main(out: str = "runs/demo", epochs: int = 30, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    ds = bn.data.load_digits(seed=seed)
    model = bn.nn.MLP((128, 128, 10))
    noise = bn.noise.Bernoulli(keep=0.8)
    key = jax.random.key(seed)
    init_key, fit_key, tail_key, mc_key = jax.random.split(key, 4)
    params = model.init(init_key, jnp.ones((1, 64)))
    apply = bn.nn.noisy_apply(model, noise)
    loss_fn = bn.train.classification_loss(lambda p, x, k: apply(p, x, rngs={"noise": k}))
    xtr, ytr = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    xte, yte = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)

    def eval_fn(p):
        logits = model.apply(bn.inference.weight_scale(p, noise), xte)
        return {"test_error": jnp.mean(jnp.argmax(logits, -1) != yte)}

    opt = optax.adam(3e-3)
    res = bn.train.fit(
        fit_key,
        params,
        loss_fn,
        opt,
        xtr,
        ytr,
        epochs=epochs,
        batch_size=64,
        eval_fn=eval_fn,
        progress=True,
    )

    # running moments of the iterates of a few more epochs at a small step (never stored)
    step = jax.jit(bn.train.make_step(loss_fn, optax.sgd(1e-3)))
    p, s = res.params, optax.sgd(1e-3).init(res.params)
    moments = bn.moments.init(p)
    for i, k in enumerate(jax.random.split(tail_key, 100)):
        idx = jax.random.choice(k, len(xtr), (64,), replace=False)
        p, s, _ = step(p, s, xtr[idx], ytr[idx], jax.random.fold_in(k, i))
        moments = bn.moments.update(moments, p)

    noisy = lambda k, x: apply(res.params, x, rngs={"noise": k})
    err = lambda probs: float(jnp.mean(jnp.argmax(probs, -1) != yte))
    h = bn.gsm.hierarchy(res.params)
    summary = {
        "dataset": "digits",
        "model": "MLP 64-128-128-10",
        "noise": repr(noise),
        "test_error_weight_scaling": float(eval_fn(res.params)["test_error"]),
        "test_error_mc32": err(bn.inference.mc_predict(noisy, xte, mc_key, 32)),
        "test_error_geometric32": err(bn.inference.geometric_predict(noisy, xte, mc_key, 32)),
        "log_prior": float(bn.gsm.log_prior(res.params, h)),
        "eq14_penalty": float(bn.penalties.ml2_neg_log_prior(res.params, h)),
        "mean_posterior_std_layer0": float(
            jnp.mean(bn.moments.std(moments)["params"]["Dense_0"]["kernel"])
        ),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    for k, v in summary.items():
        print(f"{k:>28}: {v}")
    print(f"results written to {path}")
    return summary
