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
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bayesnoise import _check, _loop, penalties
from bayesnoise._tree import PyTree

__all__ = [
    "DivergenceError",
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
        labels: integer labels in [0, classes), shape (n,).

    Returns:
        shape (n,): the log-probability of each example's label.

    Raises:
        TypeError: labels that are not integers.
        ValueError: shapes other than (n, classes) and (n,); a label outside [0, classes)
            (checked where the labels are concrete, not under ``jit``).
    """
    logits, labels = _numbers("logits", logits), _numbers("labels", labels)
    _check_labels(labels, logits.shape, "labels")
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"logits must have shape (n, classes) and labels shape (n,); got logits of shape "
            f"{logits.shape} and labels of shape {labels.shape}."
        )
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=-1)[:, 0]


def classification_loss(apply_fn: Callable[..., jax.Array]) -> LossFn:
    """Softmax cross-entropy with integer labels. ``apply_fn(params, x, key)`` returns logits.

    Returns:
        ``loss_fn(params, x, y, key) -> (mean loss, {"accuracy": mean accuracy})``; the loss
        raises a TypeError on labels ``y`` that are not integers, and a ValueError on a
        concrete label outside [0, classes).
    """
    _check_callable("apply_fn", apply_fn)

    def loss_fn(params, x, y, key):
        logits = apply_fn(params, x, key)
        _check_labels(jnp.asarray(y), jnp.shape(logits), "y")
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}

    return loss_fn


def regression_loss(apply_fn: Callable[..., jax.Array]) -> LossFn:
    """Mean squared error; ``apply_fn(params, x, key)`` returns predictions (n,) or (n, 1)."""
    _check_callable("apply_fn", apply_fn)

    def loss_fn(params, x, y, key):
        pred = apply_fn(params, x, key)
        if jnp.size(pred) != jnp.size(y):
            raise ValueError(
                f"apply_fn's predictions must have y's shape {jnp.shape(y)} (or (n, 1) for y of "
                f"shape (n,)); got shape {jnp.shape(pred)}."
            )
        pred = pred.reshape(y.shape)
        mse = jnp.mean((pred - y) ** 2)
        return mse, {"rmse": jnp.sqrt(mse)}

    return loss_fn


LIKELIHOODS = ("categorical", "gaussian")


def _numbers(name: str, v: Any) -> jax.Array:
    """``v`` as a JAX array of numbers (a TypeError naming ``name`` otherwise)."""
    return _check.array(name, v, "an array of numbers")


def _check_callable(name: str, fn: Any) -> None:
    if not callable(fn):
        raise TypeError(f"{name} must be a callable, got {type(fn).__name__}: {fn!r:.80}.")


def _check_labels(labels: jax.Array, logits_shape: tuple[int, ...], name: str) -> None:
    """Integer class labels, each in [0, classes) where they are concrete."""
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        kind = {"f": "float", "b": "bool", "c": "complex"}.get(labels.dtype.kind, "non-integer")
        raise TypeError(
            f"{name} must be integer class labels in [0, classes), got {kind} labels (dtype "
            f"{labels.dtype.name}); cast whole-number labels with .astype(int)."
        )
    if not logits_shape or not _check.concrete(labels) or labels.size == 0:
        return
    classes = logits_shape[-1]
    values = np.asarray(labels)
    bad = (values < 0) | (values >= classes)
    if bad.any():
        first = values[bad].flat[0]
        raise ValueError(
            f"{name} must be class labels in [0, {classes}) for logits of {classes} classes; "
            f"got a label {first} ({int(bad.sum())} of {values.size} out of range)."
        )


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
        TypeError: a size or weight that is not a number (or a whole number, for the sizes),
            or an ``apply_fn`` / ``kl_fn`` that is not callable.

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
    _check_callable("apply_fn", apply_fn)
    if not _is_count(num_data, 1):
        error = TypeError if not _is_real(num_data) else ValueError
        raise error(f"num_data must be a positive int (the training set size); got {num_data!r}.")
    if not (_is_real(kl_weight) and math.isfinite(float(kl_weight)) and kl_weight >= 0):
        error = TypeError if not _is_real(kl_weight) else ValueError
        raise error(f"kl_weight must be a finite number >= 0; got {kl_weight!r}.")
    if not _is_count(warmup_steps, 0):
        error = TypeError if not _is_real(warmup_steps) else ValueError
        raise error(f"warmup_steps must be an int >= 0; got {warmup_steps!r}.")
    if kl_fn is not None:
        _check_callable("kl_fn", kl_fn)
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


def _is_real(v: Any) -> bool:
    """A real number (a Python or NumPy int or float, or a 0-d array of one), not a bool."""
    if isinstance(v, (bool, np.bool_, str, bytes)) or v is None:
        return False
    try:
        a = np.asarray(v)
    except Exception:  # an object NumPy cannot read
        return False
    return a.ndim == 0 and a.dtype.kind in "iuf"


def _is_count(v: Any, lo: int) -> bool:
    """A whole number >= lo (an int, or a float with no fractional part)."""
    return _is_real(v) and math.isfinite(float(v)) and float(v) == int(v) and int(v) >= lo


def _check_count(name: str, v: Any, lo: int) -> None:
    """An int >= lo (a float with no fractional part is taken too, as ``int(v)`` reads it)."""
    if not _check.concrete(v) or _is_count(v, lo):
        return
    error = ValueError if _is_real(v) else TypeError
    raise error(f"{name} must be an int >= {lo}, got {v!r}.")


def _check_optimizer(optimizer: Any) -> None:
    if not (
        callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))
    ):
        raise TypeError(
            f"optimizer must be an optax GradientTransformation (with init and update), e.g. "
            f"optax.adam(1e-3); got {type(optimizer).__name__}: {optimizer!r:.80}."
        )


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

    Raises:
        TypeError: ``loss_fn`` is not callable, or ``optimizer`` is not an optax transformation.
    """
    _check_callable("loss_fn", loss_fn)
    _check_optimizer(optimizer)
    takes_step = _takes_step(loss_fn)

    def checked_loss(*args, **kwargs):
        out = loss_fn(*args, **kwargs)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
            raise TypeError(
                f"loss_fn must be a function returning a pair (loss, metrics dict), e.g. "
                f"(loss, {{}}); it returned {type(out).__name__}: {out!r:.80}."
            )
        return out

    def step(params, opt_state, x, y, key, count=None):
        kwargs = {"step": count} if takes_step and count is not None else {}
        value_and_grad = jax.value_and_grad(checked_loss, has_aux=True)
        (loss, aux), grads = value_and_grad(params, x, y, key, **kwargs)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, **aux}

    return step


class FitResult(NamedTuple):
    params: PyTree  # the final params
    opt_state: Any  # the final optimizer state
    history: dict  # name -> array of shape (epochs,)


class DivergenceError(FloatingPointError):
    """Training diverged: the loss or the parameters became NaN or inf.

    Attributes:
        epoch: the first epoch (0-based) whose mean loss is not finite, or None if only the
            parameters are.
        result: the :class:`FitResult` as it ended (its history shows where the loss went).
    """

    def __init__(self, message: str, *, epoch: int | None, result: FitResult):
        super().__init__(message)
        self.epoch = epoch
        self.result = result


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

    Many seeds in one program: ``jax.vmap(lambda k: fit(k, init(k), ...).params)(keys)`` trains
    a network per key in one compiled loop (without ``progress``); under ``vmap`` or ``jit`` the
    final params are traced, so the check for NaN after the loop is the caller's.

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

    Raises:
        TypeError: ``key`` is not a PRNG key; ``epochs``, ``batch_size`` or ``initial_step`` is
            not an int; x or y is not an array of numbers; ``loss_fn`` or ``eval_fn`` is not
            callable; ``optimizer`` is not an optax transformation.
        ValueError: ``epochs`` < 1, ``batch_size`` outside [1, len(x)], ``initial_step`` < 0,
            x and y of different lengths, x or y or the initial params holding NaN or inf, or an
            ``opt_state`` whose structure is not that of ``optimizer.init(params)``.
        DivergenceError: the final params hold NaN or inf (checked once, after the loop).
    """
    _check.key("key", key)
    _check_callable("loss_fn", loss_fn)
    _check_optimizer(optimizer)
    if eval_fn is not None:
        _check_callable("eval_fn", eval_fn)
    x, y = _data_array("x", x), _data_array("y", y)
    n = int(x.shape[0])
    _check_count("epochs", epochs, 1)
    _check_count("batch_size", batch_size, 1)
    if not 1 <= int(batch_size) <= n:
        raise ValueError(
            f"batch_size must be in [1, {n}] (the number of examples), got {batch_size}."
        )
    if y.shape[0] != n:
        raise ValueError(
            f"x and y must have the same number of examples (their leading axis): x has {n} "
            f"but y has {y.shape[0]}."
        )
    _check_count("initial_step", initial_step, 0)
    _check_finite_data("x", x)
    _check_finite_data("y", y)
    if not jax.tree.leaves(params):
        raise ValueError(
            f"params must be a pytree holding the arrays to train, e.g. model.init(key, x); got "
            f"{params!r:.80}, which holds none."
        )
    _check_finite_params(params)
    if opt_state is None:
        opt_state = _init_state(params, optimizer=optimizer)
    else:
        like = jax.eval_shape(optimizer.init, params)
        _check.same_tree("opt_state", opt_state, like, "optimizer.init(params)")
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
    result = FitResult(params, opt_state, history)
    _check_diverged(result)
    return result


def _data_array(name: str, v: Any) -> jax.Array:
    """A training array with a leading example axis (lists and NumPy arrays are converted)."""
    v = _check.array(name, v, "an array of numbers with a leading example axis")
    if v.ndim < 1:
        raise ValueError(
            f"{name} must have a leading example axis, got shape {v.shape}; allowed: arrays "
            f"of shape (n, ...)."
        )
    return jnp.asarray(v)


@jax.jit
def _bad_rows(a: jax.Array) -> jax.Array:
    """Per example, whether any of its entries is NaN or inf."""
    return ~jnp.all(jnp.isfinite(a).reshape(a.shape[0], -1), axis=1)


def _check_finite_data(name: str, a: jax.Array) -> None:
    """Raises when a concrete float array holds NaN or inf, naming the first such example."""
    if not jnp.issubdtype(a.dtype, jnp.inexact) or not _check.concrete(a) or a.size == 0:
        return
    with jax.ensure_compile_time_eval():  # a concrete array closed over inside a jit trace
        if bool(jax.device_get(_all_finite(a))):
            return
        bad = np.flatnonzero(np.asarray(jax.device_get(_bad_rows(a))))
    raise ValueError(
        f"{name} holds NaN or inf in {bad.size} of {a.shape[0]} examples (the first at index "
        f"{int(bad[0])}); the training data must be finite: drop or impute those examples."
    )


def _check_finite_params(params: PyTree) -> None:
    """Raises when concrete initial params hold NaN or inf, naming the first such leaf."""
    _check.finite_leaves(
        params, "params (the initial state)", "Training cannot start there: check the init."
    )


_all_finite = jax.jit(_check.all_finite)


def _check_diverged(result: FitResult) -> None:
    """Raises :class:`DivergenceError` when the final params are not finite (one scalar read
    back after the compiled loop, none inside it). Traced params (``fit`` under ``jax.vmap`` or
    ``jax.jit``) are the caller's to check."""
    if not _check.concrete(result.params) or bool(jax.device_get(_all_finite(result.params))):
        return
    loss = np.asarray(jax.device_get(result.history.get("loss", np.zeros(0))))
    bad = np.flatnonzero(~np.isfinite(loss))
    epoch = int(bad[0]) if bad.size else None
    where = f"from epoch {epoch} on" if epoch is not None else "at the end"
    raise DivergenceError(
        f"training diverged: the parameters are NaN or inf {where} (mean loss per epoch: "
        f"{np.array2string(loss[:8], precision=4)}{' ...' if loss.size > 8 else ''}). Lower the "
        f"learning rate, or check the loss function; the error's .result holds the run.",
        epoch=epoch,
        result=result,
    )


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
