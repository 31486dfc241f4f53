"""Training under noise: a pure optax step and a whole-run loop compiled into one ``lax.scan``.

The loop shuffles on device (a fresh permutation per epoch), scans over minibatches and epochs,
and returns the final params with a per-epoch history (mean loss and metrics of the noisy
training passes, plus whatever ``eval_fn`` reports, e.g. test error by the weight-scaling rule).
No host round trip happens inside the loop unless a progress bar is asked for, and then once per
epoch.

For learned noise (variational dropout), :func:`variational_loss` adds the KL to the
log-uniform prior, scaled per example and warmed up over the first steps; a loss function that
takes a ``step`` argument gets the step count from :func:`fit` and :func:`make_step`.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bayesnoise import _loop, penalties
from bayesnoise._tree import PyTree

__all__ = [
    "categorical_log_likelihood",
    "classification_loss",
    "regression_loss",
    "variational_loss",
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


LIKELIHOODS = ("categorical", "gaussian")


def _gaussian_log_likelihood(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example log N(y; f(x), 1), summed over any output axes."""
    outputs = outputs.reshape(targets.shape)
    ll = -0.5 * (targets - outputs) ** 2 - 0.5 * math.log(2 * math.pi)
    return ll.reshape(ll.shape[0], -1).sum(-1)


def variational_loss(
    apply_fn: Callable[..., jax.Array],
    num_data: int,
    *,
    kl_weight: float = 1.0,
    warmup_steps: int = 0,
    likelihood: str | Callable[[jax.Array, jax.Array], jax.Array] = "categorical",
    kl_fn: Callable[[PyTree], jax.Array] | None = None,
) -> Callable[..., tuple[jax.Array, dict]]:
    """The negative ELBO per example for learned noise (variational dropout), with a warm-up.

    With a minibatch of n examples of a training set of N, at step t,

        loss = (1/n) Σ_i −log p(y_i | f(x_i; noise)) + β w(t) KL(params) / N,
        w(t) = min(1, t / warmup_steps)   (w = 1 when warmup_steps = 0),

    with β = 1 and w = 1 an unbiased minibatch estimate of the negative ELBO divided by N: the
    noise in ``apply_fn`` samples the variational posterior, and KL defaults to
    :func:`bayesnoise.penalties.learned_noise_kl`. The warm-up (annealing) ramps the KL in
    linearly over the first ``warmup_steps`` optimizer steps.

    The step: the returned ``loss_fn(params, x, y, key, step=None)`` takes the number of
    optimizer steps taken so far as ``step`` (an int or an int scalar array; traced is fine).
    :func:`fit` and :func:`make_step` pass it, because the loss declares a ``step``
    parameter; in a loop of your own, pass it yourself. Without a warm-up ``step`` may be left
    out.

    Args:
        apply_fn: ``apply_fn(params, x, key)`` returns the noisy model's outputs (logits for
            ``"categorical"``, predictions for ``"gaussian"``).
        num_data: N, the size of the training set, > 0.
        kl_weight: β ≥ 0 (β < 1 is the "tempered" or down-weighted KL).
        warmup_steps: the length of the linear warm-up, ≥ 0.
        likelihood: ``"categorical"`` (softmax, integer labels), ``"gaussian"`` (unit
            variance; outputs reshaped to the targets' shape), or a callable
            ``(outputs, y) -> per-example log-likelihood``, shape (n,).
        kl_fn: params -> KL, instead of :func:`bayesnoise.penalties.learned_noise_kl`.

    Returns:
        ``loss_fn(params, x, y, key, step=None) -> (loss, metrics)``; the metrics are ``nll``
        (mean per example), ``kl`` (the total KL) and ``kl_scale`` (β w(t)), plus
        ``accuracy`` (categorical) or ``rmse`` (gaussian).

    Raises:
        ValueError: ``num_data`` < 1, ``kl_weight`` < 0 or not finite, ``warmup_steps`` < 0,
            an unknown ``likelihood``; at call time, a warm-up without ``step``.

    Example:
        >>> import jax, jax.numpy as jnp, optax, bayesnoise as bn
        >>> model = bn.nn.MLP((16, 3))
        >>> vd = bn.nn.learned_noise(model, per="weight")
        >>> params = vd.init(jax.random.key(0), jnp.ones((1, 4)))
        >>> loss_fn = bn.train.variational_loss(
        ...     lambda p, x, k: vd.apply(p, x, rngs={"noise": k}), num_data=90, warmup_steps=10
        ... )
        >>> x, y = jnp.ones((90, 4)), jnp.zeros(90, jnp.int32)
        >>> res = bn.train.fit(
        ...     jax.random.key(1), params, loss_fn, optax.adam(1e-2), x, y, epochs=2, batch_size=30
        ... )
        >>> sorted(res.history)
        ['accuracy', 'kl', 'kl_scale', 'loss', 'nll']
    """
    if int(num_data) != num_data or num_data < 1:
        raise ValueError(
            f"num_data must be a positive int (the training set size); got {num_data!r}."
        )
    if not (math.isfinite(float(kl_weight)) and kl_weight >= 0):
        raise ValueError(f"kl_weight must be a finite number >= 0; got {kl_weight!r}.")
    if int(warmup_steps) != warmup_steps or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0; got {warmup_steps!r}.")
    if callable(likelihood):
        log_lik = likelihood
    elif likelihood == "categorical":
        log_lik = categorical_log_likelihood
    elif likelihood == "gaussian":
        log_lik = _gaussian_log_likelihood
    else:
        raise ValueError(
            f"likelihood must be one of {LIKELIHOODS} or a callable (outputs, y) -> per-example "
            f"log-likelihood; got {likelihood!r}."
        )
    kl_fn = penalties.learned_noise_kl if kl_fn is None else kl_fn
    num_data, warmup_steps, kl_weight = int(num_data), int(warmup_steps), float(kl_weight)

    def loss_fn(params, x, y, key, step=None):
        if warmup_steps and step is None:
            raise ValueError(
                f"warmup_steps={warmup_steps} needs the step count: call "
                f"loss_fn(params, x, y, key, step=t) (bn.train.fit and make_step pass it)."
            )
        ramp = 1.0 if not warmup_steps else jnp.minimum(1.0, jnp.asarray(step) / warmup_steps)
        outputs = apply_fn(params, x, key)
        nll = -jnp.mean(log_lik(outputs, y))
        kl = kl_fn(params)
        scale = kl_weight * jnp.asarray(ramp, jnp.result_type(float))
        metrics = {"nll": nll, "kl": kl, "kl_scale": scale}
        if likelihood == "categorical":
            metrics["accuracy"] = jnp.mean(jnp.argmax(outputs, -1) == y)
        elif likelihood == "gaussian":
            metrics["rmse"] = jnp.sqrt(jnp.mean((outputs.reshape(y.shape) - y) ** 2))
        return nll + scale * kl / num_data, metrics

    return loss_fn


def _takes_step(loss_fn: Callable) -> bool:
    """Whether ``loss_fn`` declares a parameter named ``step``."""
    try:
        return "step" in inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):
        return False


def make_step(loss_fn: LossFn, optimizer: optax.GradientTransformation):
    """A pure training step ``step(params, opt_state, x, y, key, count=None) -> (params,
    opt_state, metrics)``.

    ``metrics`` holds ``loss`` and the loss function's own metrics. When ``loss_fn`` declares a
    parameter named ``step`` (as :func:`variational_loss` does) and ``count`` is given, the
    loss is called with ``step=count``, the number of steps taken before this one. Jit it
    yourself (or use :func:`fit`, which compiles the whole run).
    """
    takes_step = _takes_step(loss_fn)

    def step(params, opt_state, x, y, key, count=None):
        kwargs = {"step": count} if takes_step and count is not None else {}
        value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, aux), grads = value_and_grad(params, x, y, key, **kwargs)
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
    initial_step: int = 0,
) -> FitResult:
    """Trains for ``epochs`` passes over (x, y) in one compiled ``lax.scan``.

    The compiled run is cached on its functions and sizes: calling ``fit`` again with the same
    ``loss_fn``, ``optimizer`` and ``eval_fn`` objects and the same shapes does not recompile.

    Args:
        key: PRNG key; split into a shuffle key and one noise key per step.
        params: initial params.
        loss_fn: ``(params, x, y, key) -> (loss, metrics)``, e.g. :func:`classification_loss`;
            one that declares a ``step`` parameter (:func:`variational_loss`) is called with
            ``step=`` the number of steps taken before this one, counted from
            ``initial_step``.
        optimizer: any optax transformation.
        x, y: the training data (kept on device); the last incomplete batch of an epoch is
            dropped.
        epochs, batch_size: positive ints, batch_size ≤ len(x).
        eval_fn: jit-able ``params -> {name: scalar}`` evaluated after every epoch.
        opt_state: resume from this optimizer state (default: a fresh one).
        progress: show a progress bar, advanced once per epoch (the run is then compiled
            per epoch and called once per epoch from the host).
        initial_step: the step count of the first step, for a ``loss_fn`` that takes
            ``step`` (see :func:`make_step`): step t of this run is ``initial_step + t``.
            When resuming from ``opt_state``, pass the number of steps already taken so that a
            warm-up continues where it stopped.

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
    first_step = jax.device_put(np.int32(initial_step))

    def run_chunk(carry, start, length):
        params, opt_state = carry
        return _epochs(
            params,
            opt_state,
            x,
            y,
            key,
            start,
            first_step,
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
    params,
    opt_state,
    x,
    y,
    key,
    start,
    first_step,
    *,
    epochs,
    length,
    loss_fn,
    optimizer,
    eval_fn,
    batch_size,
):
    """Epochs start .. start + length of ``epochs`` in one scan, compiled once per (functions,
    sizes): epoch e always draws from the e-th of ``epochs`` keys split from ``key``, and its
    j-th step has the count first_step + e · steps + j."""
    epoch_keys = jax.lax.dynamic_slice_in_dim(jax.random.split(key, epochs), start, length)
    n = x.shape[0]
    steps = n // batch_size
    step = make_step(loss_fn, optimizer)

    def epoch_body(carry, inp):
        params, opt_state = carry
        epoch_key, epoch = inp
        perm_key, step_key = jax.random.split(epoch_key)
        batches = _loop.shuffled_batches(perm_key, n, batch_size)
        counts = first_step + epoch * steps + jnp.arange(steps, dtype=jnp.int32)

        def batch_body(c, inp):
            p, s = c
            idx, k, t = inp
            p, s, m = step(p, s, x[idx], y[idx], k, t)
            return (p, s), m

        (params, opt_state), metrics = jax.lax.scan(
            batch_body, (params, opt_state), (batches, jax.random.split(step_key, steps), counts)
        )
        record = jax.tree.map(jnp.mean, metrics)
        if eval_fn is not None:
            record.update(eval_fn(params))
        return (params, opt_state), record

    epochs_run = start + jnp.arange(length, dtype=jnp.int32)
    return jax.lax.scan(epoch_body, (params, opt_state), (epoch_keys, epochs_run))
