"""Training under noise: a pure optax step and a whole-run loop compiled into one ``lax.scan``.

The loop shuffles on device (a fresh permutation per epoch), scans over minibatches and epochs,
and returns the final params with a per-epoch history (mean loss and metrics of the noisy
training passes, plus whatever ``eval_fn`` reports, e.g. test error by the weight-scaling rule).
No host round trip happens inside the loop unless a progress bar is asked for, and then once per
epoch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bayesnoise import _loop
from bayesnoise._tree import PyTree

__all__ = [
    "categorical_log_likelihood",
    "classification_loss",
    "regression_loss",
    "make_step",
    "fit",
    "FitResult",
]

LossFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict]]


def categorical_log_likelihood(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example log p(y | logits) of a categorical likelihood: ``log_softmax(logits)[y]``.

    Args:
        logits: shape (n, classes).
        labels: integer labels, shape (n,).

    Returns:
        shape (n,): the log-probability of each example's label.
    """
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=-1)[:, 0]


def classification_loss(apply_fn: Callable[..., jax.Array]) -> LossFn:
    """Softmax cross-entropy with integer labels. ``apply_fn(params, x, key)`` returns logits.

    Returns:
        ``loss_fn(params, x, y, key) -> (mean loss, {"accuracy": mean accuracy})``.
    """

    def loss_fn(params, x, y, key):
        logits = apply_fn(params, x, key)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}

    return loss_fn


def regression_loss(apply_fn: Callable[..., jax.Array]) -> LossFn:
    """Mean squared error; ``apply_fn(params, x, key)`` returns predictions (n,) or (n, 1)."""

    def loss_fn(params, x, y, key):
        pred = apply_fn(params, x, key).reshape(y.shape)
        mse = jnp.mean((pred - y) ** 2)
        return mse, {"rmse": jnp.sqrt(mse)}

    return loss_fn


def make_step(loss_fn: LossFn, optimizer: optax.GradientTransformation):
    """A pure training step ``step(params, opt_state, x, y, key) -> (params, opt_state, metrics)``.

    ``metrics`` holds ``loss`` and the loss function's own metrics. Jit it yourself (or use
    :func:`fit`, which compiles the whole run).
    """

    def step(params, opt_state, x, y, key):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, **aux}

    return step


class FitResult(NamedTuple):
    params: PyTree  # the final params
    opt_state: Any  # the final optimizer state
    history: dict  # name -> array of shape (epochs,)


def fit(
    key: jax.Array,
    params: PyTree,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    x: jax.Array,
    y: jax.Array,
    *,
    epochs: int,
    batch_size: int,
    eval_fn: Callable[[PyTree], dict] | None = None,
    opt_state: Any = None,
    progress: bool = False,
) -> FitResult:
    """Trains for ``epochs`` passes over (x, y) in one compiled ``lax.scan``.

    The compiled run is cached on its functions and sizes: calling ``fit`` again with the same
    ``loss_fn``, ``optimizer`` and ``eval_fn`` objects and the same shapes does not recompile.

    Args:
        key: PRNG key; split into a shuffle key and one noise key per step.
        params: initial params.
        loss_fn: ``(params, x, y, key) -> (loss, metrics)``, e.g. :func:`classification_loss`.
        optimizer: any optax transformation.
        x, y: the training data (kept on device); the last incomplete batch of an epoch is
            dropped.
        epochs, batch_size: positive ints, batch_size ≤ len(x).
        eval_fn: jit-able ``params -> {name: scalar}`` evaluated after every epoch.
        opt_state: resume from this optimizer state (default: a fresh one).
        progress: show a progress bar, advanced once per epoch (the run is then compiled
            per epoch and called once per epoch from the host).

    Returns:
        :class:`FitResult` with the history of per-epoch means.
    """
    n = int(x.shape[0])
    if int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    if not 1 <= int(batch_size) <= n:
        raise ValueError(
            f"batch_size must be in [1, {n}] (the number of examples), got {batch_size}."
        )
    if y.shape[0] != n:
        raise ValueError(f"x has {n} examples but y has {y.shape[0]}.")
    x, y = jnp.asarray(x), jnp.asarray(y)
    if opt_state is None:
        opt_state = _init_state(params, optimizer=optimizer)

    def run_chunk(carry, start, length):
        params, opt_state = carry
        return _epochs(
            params,
            opt_state,
            x,
            y,
            key,
            start,
            epochs=int(epochs),
            length=length,
            loss_fn=loss_fn,
            optimizer=optimizer,
            eval_fn=eval_fn,
            batch_size=int(batch_size),
        )

    lengths = _loop.chunk_lengths(int(epochs), 1, bool(progress))
    (params, opt_state), records = _loop.run_chunked(
        run_chunk, (params, opt_state), lengths, progress=bool(progress), desc="train", unit="epoch"
    )
    history = (
        records[0] if len(records) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a), *records)
    )
    return FitResult(params, opt_state, history)


@functools.partial(jax.jit, static_argnames=("optimizer",))
def _init_state(params, *, optimizer):
    return optimizer.init(params)


@functools.partial(
    jax.jit,
    static_argnames=("epochs", "length", "loss_fn", "optimizer", "eval_fn", "batch_size"),
)
def _epochs(
    params, opt_state, x, y, key, start, *, epochs, length, loss_fn, optimizer, eval_fn, batch_size
):
    """Epochs start .. start + length of ``epochs`` in one scan, compiled once per (functions,
    sizes): epoch e always draws from the e-th of ``epochs`` keys split from ``key``."""
    epoch_keys = jax.lax.dynamic_slice_in_dim(jax.random.split(key, epochs), start, length)
    n = x.shape[0]
    steps = n // batch_size
    step = make_step(loss_fn, optimizer)

    def epoch_body(carry, epoch_key):
        params, opt_state = carry
        perm_key, step_key = jax.random.split(epoch_key)
        batches = _loop.shuffled_batches(perm_key, n, batch_size)

        def batch_body(c, inp):
            p, s = c
            idx, k = inp
            p, s, m = step(p, s, x[idx], y[idx], k)
            return (p, s), m

        (params, opt_state), metrics = jax.lax.scan(
            batch_body, (params, opt_state), (batches, jax.random.split(step_key, steps))
        )
        record = jax.tree.map(jnp.mean, metrics)
        if eval_fn is not None:
            record.update(eval_fn(params))
        return (params, opt_state), record

    return jax.lax.scan(epoch_body, (params, opt_state), epoch_keys)
