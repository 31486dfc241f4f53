"""A small end-to-end example on scikit-learn's bundled digits (no download needed)."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import bayesnoise as bn


def _mlp_init(key, sizes):
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"Dense_{i}"] = {
            "kernel": jax.random.normal(sub, (a, b)) * jnp.sqrt(2.0 / a),
            "bias": jnp.zeros(b),
        }
    return params


def _mlp_apply(params, x, noise=None, key=None):
    n = len(params)
    for i in range(n):
        layer = params[f"Dense_{i}"]
        if noise is not None:
            key, sub = jax.random.split(key)
            x = x * noise.sample(sub, x.shape)  # λ per example and input unit
        x = x @ layer["kernel"] + layer["bias"]
        if i < n - 1:
            x = jax.nn.relu(x)
    return x


def main(out: str = "runs/demo", epochs: int = 30, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    noise = bn.noise.Bernoulli(keep=0.8)
    key = jax.random.key(seed)
    params = _mlp_init(key, [64, 128, 10])
    opt = optax.adam(3e-3)

    def loss_fn(p, xb, yb, k):
        logits = _mlp_apply(p, xb, noise, k)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def step(p, s, xb, yb, k):
        loss, g = jax.value_and_grad(loss_fn)(p, xb, yb, k)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    state = opt.init(params)
    moments = bn.moments.init(params)
    xtr_j, ytr_j = jnp.asarray(xtr), jnp.asarray(ytr)
    n, batch = len(xtr), 64
    for epoch in range(epochs):
        key, perm_key = jax.random.split(key)
        perm = jax.random.permutation(perm_key, n)
        for i in range(n // batch):
            idx = perm[i * batch : (i + 1) * batch]
            key, sub = jax.random.split(key)
            params, state, loss = step(params, state, xtr_j[idx], ytr_j[idx], sub)
            if epoch >= epochs - 5:  # moments of the last iterates, never stored
                moments = bn.moments.update(moments, params)

    # weight-scaling rule: fold E[λ] into every noised row
    h = bn.gsm.hierarchy(params)
    scaled = bn.gsm.to_identifiable(
        params, jax.tree.map(lambda s: s * noise.scale_factor, h.scales)
    )
    err = float(jnp.mean(jnp.argmax(_mlp_apply(scaled, jnp.asarray(xte)), -1) != yte))
    mean, std = bn.moments.mean(moments), bn.moments.std(moments)
    k0 = np.asarray(mean["Dense_0"]["kernel"])
    summary = {
        "dataset": "digits",
        "noise": repr(noise),
        "test_error": err,
        "log_prior": float(bn.gsm.log_prior(params, h)),
        "eq14_penalty": float(bn.penalties.ml2_neg_log_prior(params, h)),
        "mean_abs_weight": float(np.abs(k0).mean()),
        "mean_iterate_std": float(np.asarray(std["Dense_0"]["kernel"]).mean()),
        "seconds": time.perf_counter() - t0,
    }
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    for k, v in summary.items():
        print(f"{k:>18}: {v}")
    print(f"results written to {path}")
    return summary
