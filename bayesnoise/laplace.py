"""The diagonal Laplace approximation with a generalised Gauss-Newton (GGN) curvature.

At a mode θ* of the log posterior log p(D | θ) + log p(θ), the Laplace approximation replaces the
posterior by a Gaussian whose precision is the negative Hessian there (MacKay, 1992). Here the
Hessian of the negative log-likelihood is replaced by the GGN, which is positive semi-definite
everywhere, and only its diagonal is kept (Ritter et al., 2018; Daxberger et al., 2021):

    H = N · diag GGN + 1 / prior_var,       Var[θ_k] ≈ T / H_kk,       E[θ_k] ≈ θ*_k,

with diag GGN = (1/N) Σ_i diag(J_iᵀ Λ_i J_i), J_i the Jacobian of the network's outputs for
example i, Λ_i = −∂²log p(y_i | f)/∂f² the Hessian of the negative log-likelihood in those
outputs, prior_var = σ0² λ_row² (``bayesnoise.gsm.prior_variance``) and T the temperature. The
same H gives the Laplace estimate of the evidence (MacKay, 1992),

    log p(D | λ) ≈ Σ_i log p(y_i | x_i, θ*) + log p(θ*) + (P/2) log 2π − ½ Σ_k log H_kk,

used by EM to check that the evidence increases.

Only a per-example log-likelihood ``log_likelihood(params, *batch) -> (n,)`` is given, not the
network's outputs, so the GGN is computed from identities that need the log-likelihood alone:

* Integer labels (the last array of ``data``): the likelihood is categorical and the GGN is the
  Fisher information (Martens, 2020), an expectation over labels drawn from the model,

      GGN_i = Σ_k p_ik g_ik g_ikᵀ,   g_ik = ∇_θ log p(y = k | x_i, θ),   p_ik = p(y = k | x_i, θ),

  found by calling ``log_likelihood`` with every label replaced by k. For softmax cross-entropy
  (a canonical link) GGN and Fisher coincide exactly; for another discrete likelihood this is
  its Fisher, still positive semi-definite.
* Floating targets: the likelihood is taken to be Gaussian in y with independent outputs of
  any fixed variances σ_o², log p = −(y_o − f_o)² / (2σ_o²) + const. Then
  ∂²ℓ/∂θ∂y_o = J_o / σ_o² and ∂²ℓ/∂y_o² = −1/σ_o², so

      diag GGN_i = Σ_o (∂²ℓ_i/∂θ∂y_o)² · (−1 / (∂²ℓ_i/∂y_o²)) = Σ_o J_o² / σ_o²,

  with ∂ℓ/∂y from ``jax.grad`` in y and ∂²ℓ/∂y² from a Hessian-vector product with a vector of
  ones (exact when the outputs are independent). This is exact for Gaussian likelihoods; any
  other continuous likelihood gets this Gaussian-form approximation, and items where
  ∂²ℓ/∂y_o² ≥ 0 (not log-concave there) are left out.

Either way the diagonal is a sum of squared per-item gradients, Σ_items a_item², the items being
(example, class) pairs with a = √p_ik g_ik, or (example, output) pairs with
a = σ_o ∂²ℓ/∂θ∂y_o. Two estimators, over chunks of examples in one compiled ``lax.scan``:

* ``"exact"``: per-item gradients, vmapped over a chunk; memory chunk × items × params.
* ``"probe"``: per chunk c, Rademacher signs ε_item = ±1 and one backward pass for
  ∇_θ Σ_{item ∈ c} ε_item · weight_item · ℓ_item; its square has expectation Σ_{item ∈ c} a²,
  so the sum over chunks is unbiased. Its variance per weight is 2 Σ_c [(Σ_{item ∈ c} a²)² −
  Σ_{item ∈ c} a⁴]: about 2/C relative, C the number of chunks in which the weight's gradient
  is not zero (a weight that few examples touch, such as a rarely lit input pixel, is estimated
  less well). The model's forward and backward passes do not depend on the label, so the loop
  over classes costs about one forward and one backward pass per chunk.

Example:
    >>> import jax, jax.numpy as jnp, bayesnoise as bn
    >>> x = jax.random.normal(jax.random.key(0), (20, 3))
    >>> y = jnp.arange(20) % 2
    >>> params = {"kernel": jnp.zeros((3, 2))}
    >>> def log_likelihood(p, xb, yb):
    ...     logp = jax.nn.log_softmax(xb @ p["kernel"])
    ...     return jnp.take_along_axis(logp, yb[:, None], axis=1)[:, 0]
    >>> h = bn.gsm.hierarchy(params)
    >>> post = bn.laplace.posterior(params, h, log_likelihood, (x, y))
    >>> post.variance["kernel"].shape
    (3, 2)

References:
    MacKay, D. J. C. (1992). A practical Bayesian framework for backpropagation networks.
    Neural Computation 4(3).
    Martens, J. (2020). New insights and perspectives on the natural gradient method. JMLR 21.
    Ritter, H., Botev, A. & Barber, D. (2018). A scalable Laplace approximation for neural
    networks. ICLR.
    Daxberger, E., Kristiadi, A., Immer, A., Eschenhagen, R., Bauer, M. & Hennig, P. (2021).
    Laplace Redux: effortless Bayesian deep learning. NeurIPS.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from bayesnoise import _check, _tree, gsm
from bayesnoise import moments as bmoments
from bayesnoise._tree import PyTree, path_str

__all__ = ["LaplacePosterior", "diag_ggn", "empirical_fisher", "posterior", "log_evidence"]

logger = logging.getLogger(__name__)

# "auto" computes per-item gradients exactly while N · items per example · params stays below
# this many floats of work; beyond it, the probe.
_EXACT_WORK = 2e9
# Floats of per-item gradients the exact method holds at once (128 MiB in float32), in chunks
# of at most _EXACT_CHUNK examples (smaller chunks stay in cache: a small MLP's curvature takes
# 40% less time in chunks of 16 than of 128).
_EXACT_MEMORY = 2**25
_EXACT_CHUNK = 16
# The probe aims at this many chunks (relative sd √(2/C) ≈ 3%), with at most _PROBE_CHUNK
# examples each: its cost is one pass per example plus O(params) per chunk.
_PROBE_CHUNKS = 2048
_PROBE_CHUNK = 64
# Examples per chunk when summing the log-likelihood for the evidence.
_EVAL_CHUNK = 1024

_METHODS = ("auto", "exact", "probe")


class LaplacePosterior(NamedTuple):
    """The diagonal Laplace posterior; every tree is shaped like the params.

    Attributes:
        moments: a :class:`bayesnoise.moments.MomentsState` in the E-step's form (count 1,
            shift the mode, mean_dev zeros, m2 the variance), so ``bn.moments.mean``,
            ``variance``, ``std`` and ``second_moment`` work on it.
        mean: the mode θ*.
        variance: T / precision.
        precision: N · diag GGN + 1 / prior_var.
        log_evidence: the Laplace estimate of log p(D | λ), a scalar (at T = 1).
        ggn: the diagonal GGN, averaged over the N examples.
    """

    moments: bmoments.MomentsState
    mean: PyTree
    variance: PyTree
    precision: PyTree
    log_evidence: jax.Array
    ggn: PyTree


# ----------------------------------------------------------------------------- checks


def _check_method(method: Any) -> None:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}; got {method!r}.")


def _check_chunk_size(chunk_size: Any) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(
            f"chunk_size must be None (chosen for you) or an int >= 1; got {chunk_size!r}."
        )


def _check_temperature(temperature: Any) -> None:
    _check.number("temperature", temperature, finite=False, array=True)
    if _check.concrete(temperature) and not np.all(
        (np.asarray(temperature) > 0) & np.isfinite(temperature)
    ):
        raise ValueError(
            f"temperature must be finite and > 0 (1 is the posterior, < 1 a cold one); got "
            f"{temperature!r}."
        )


def _check_common(log_likelihood: Any, key: Any) -> None:
    _check.function("log_likelihood", log_likelihood, _check.LOG_LIKELIHOOD)
    if key is not None and _check.concrete(key):
        _check.key("key", key)


def _is_discrete(y: jax.Array) -> bool:
    return jnp.issubdtype(y.dtype, jnp.integer) or y.dtype == jnp.bool_


def _check_labels(y: jax.Array, num_classes: Any) -> int:
    """The number of classes, checking that the labels are class indices below it."""
    if y.ndim > 1 and math.prod(y.shape[1:]) != 1:
        raise ValueError(
            f"integer targets of shape {tuple(y.shape)}: the categorical GGN needs one label per "
            f"example (shape (n,)); for several labels per example sum them in a likelihood over "
            f"floating targets or use empirical_fisher."
        )
    if num_classes is not None and (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, (int, np.integer))
        or num_classes < 1
    ):
        raise ValueError(f"num_classes must be an int >= 1 or None; got {num_classes!r}.")
    if not _check.concrete(y):
        if num_classes is None:
            raise ValueError(
                "the labels are traced (diag_ggn called under jit), so num_classes cannot be read "
                "from them: pass num_classes."
            )
        return int(num_classes)
    labels = np.asarray(y).reshape(-1).astype(np.int64)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        raise ValueError(
            f"labels must be class indices >= 0; got label {lo} at example "
            f"{int(np.argmin(labels))}."
        )
    if num_classes is None:
        return hi + 1
    if int(num_classes) <= hi:
        raise ValueError(
            f"num_classes={num_classes} but the data hold label {hi}: labels must be in "
            f"[0, num_classes)."
        )
    return int(num_classes)


def _check_like(tree: PyTree, params: PyTree, name: str, meaning: str) -> PyTree:
    """``tree`` with array leaves, checked to have the structure and leaf shapes of params."""
    got, want = jax.tree.structure(tree), jax.tree.structure(params)
    if got != want:
        raise ValueError(
            f"{name} ({meaning}) must have the tree structure of the params; got\n  {got}\n"
            f"for params\n  {want}."
        )
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree)]
    for (path, p), x in zip(flat, leaves):
        if x.shape != jnp.shape(p):
            raise ValueError(
                f"{name} ({meaning}) leaf {path_str(path)!r} has shape {tuple(x.shape)}, but "
                f"that params leaf has shape {tuple(jnp.shape(p))}: every leaf needs the shape "
                f"of its parameter."
            )
    return jax.tree.unflatten(treedef, leaves)


def _check_values(tree: PyTree, name: str, meaning: str, *, allow_zero: bool = True) -> None:
    """Every entry finite and >= 0 (or > 0), naming the first leaf that is not."""
    if not _check.concrete(tree):
        return
    bound = ">= 0" if allow_zero else "> 0"
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        x = np.asarray(x)
        bad_finite = int(np.size(x) - np.isfinite(x).sum())
        if bad_finite:
            hint = (
                "check log_likelihood and the params there"
                if name.startswith("the ")
                else "check the tree passed"
            )
            raise ValueError(
                f"{name} ({meaning}) is not finite: leaf {path_str(path)!r} holds "
                f"{bad_finite} NaN or infinite entries of {x.size}; it must be finite and "
                f"{bound} ({hint})."
            )
        bad = int((x < 0).sum() if allow_zero else (x <= 0).sum())
        if bad:
            raise ValueError(
                f"{name} ({meaning}) must be {bound}: leaf {path_str(path)!r} holds {bad} "
                f"entries that are not (smallest {x.min():.4g})."
            )


def _check_output(log_likelihood: Callable, params: PyTree, arrays: tuple) -> None:
    n = min(2, arrays[0].shape[0])
    probe = tuple(jax.ShapeDtypeStruct((n,) + a.shape[1:], a.dtype) for a in arrays)
    out = jax.eval_shape(log_likelihood, params, *probe)
    if getattr(out, "shape", None) != (n,):
        raise ValueError(
            f"log_likelihood(params, *batch) must return per-example log-likelihoods of shape "
            f"(n,); for a batch of {n} it returned {getattr(out, 'shape', type(out).__name__)}."
        )


# ------------------------------------------------------------------- per-chunk curvature


def _square(tree: PyTree) -> PyTree:
    return jax.tree.map(jnp.square, tree)


def _masked_sum(mask: jax.Array, tree: PyTree) -> PyTree:
    """Σ_i mask_i x_i over the leading (example) axis of every leaf."""
    return jax.tree.map(lambda x: jnp.tensordot(mask.astype(x.dtype), x, axes=1), tree)


def _class_log_likelihood(log_likelihood, params, batch, num_classes) -> jax.Array:
    """ℓ(θ, x_i, k) for every class k, shape (K, n): the model's pass does not depend on k."""
    *inputs, y = batch
    return jax.vmap(lambda k: log_likelihood(params, *inputs, jnp.full_like(y, k)))(
        jnp.arange(num_classes)
    )


def _target_grad(log_likelihood, params, batch) -> jax.Array:
    """∂ℓ_i/∂y_i, shaped like the targets."""
    *inputs, y = batch
    return jax.grad(lambda t: jnp.sum(log_likelihood(params, *inputs, t)))(y)


def _target_weights(log_likelihood, params, batch, mask) -> tuple[jax.Array, jax.Array]:
    """w² = −1/(∂²ℓ/∂y_o²) per (example, output), 0 where ℓ is not concave; and that count."""
    *inputs, y = batch
    curv = jax.jvp(
        lambda t: _target_grad(log_likelihood, params, (*inputs, t)), (y,), (jnp.ones_like(y),)
    )[1]
    curv = jax.lax.stop_gradient(curv)
    m = mask.reshape(mask.shape + (1,) * (y.ndim - 1)).astype(curv.dtype)
    concave = curv < 0
    w2 = jnp.where(concave, -1.0 / jnp.where(concave, curv, -1.0), 0.0) * m
    return w2, jnp.sum(jnp.where(concave, 0.0, m))


def _per_example(fn, batch):
    """vmaps ``fn(*batch_of_one)`` over the examples of a chunk."""
    return jax.vmap(lambda *ex: fn(tuple(a[None] for a in ex)))(*batch)


def _chunk_categorical(log_likelihood, num_classes, method, params, batch, mask, key):
    if method == "probe":

        def signed(p):
            ll = _class_log_likelihood(log_likelihood, p, batch, num_classes)  # (K, c)
            fixed = jax.lax.stop_gradient(ll)
            weight = jnp.exp(0.5 * fixed) * mask
            eps = jax.random.rademacher(key, ll.shape, ll.dtype)
            return jnp.sum(eps * weight * ll), jnp.sum(jnp.exp(fixed) * mask)

        grad, mass = jax.grad(signed, has_aux=True)(params)
        return _square(grad), mass

    def one(example):
        u = lambda p: _class_log_likelihood(log_likelihood, p, example, num_classes)[:, 0]
        ll, vjp = jax.vjp(u, params)
        (jac,) = jax.vmap(vjp)(jnp.eye(num_classes, dtype=ll.dtype))  # leaves (K, ...)
        prob = jnp.exp(ll)
        return jax.tree.map(lambda j: jnp.tensordot(prob, j * j, axes=1), jac), jnp.sum(prob)

    contrib, mass = _per_example(one, batch)
    return _masked_sum(mask, contrib), jnp.sum(mass * mask)


def _chunk_gaussian(log_likelihood, method, params, batch, mask, key):
    w2, dropped = _target_weights(log_likelihood, params, batch, mask)
    if method == "probe":
        *inputs, y = batch
        eps = jax.random.rademacher(key, y.shape, y.dtype)
        tangent = eps * jnp.sqrt(w2)

        def signed(p):
            f = lambda t: jnp.sum(log_likelihood(p, *inputs, t))
            return jax.jvp(f, (y,), (tangent,))[1]

        return _square(jax.grad(signed)(params)), dropped

    def one(example, weight2):
        u = lambda p: _target_grad(log_likelihood, p, example).reshape(-1)
        g, vjp = jax.vjp(u, params)
        (jac,) = jax.vmap(vjp)(jnp.eye(g.shape[0], dtype=g.dtype))  # leaves (O, ...)
        return jax.tree.map(lambda j: jnp.tensordot(weight2.reshape(-1), j * j, axes=1), jac)

    contrib = jax.vmap(lambda *ex: one(tuple(a[None] for a in ex[:-1]), ex[-1]))(*batch, w2)
    return jax.tree.map(lambda x: x.sum(0), contrib), dropped


def _chunk_empirical(log_likelihood, method, params, batch, mask, key):
    if method == "probe":
        eps = jax.random.rademacher(key, mask.shape, jnp.result_type(float)) * mask

        def signed(p):
            ll = log_likelihood(p, *batch)
            return jnp.sum(eps.astype(ll.dtype) * ll)

        return _square(jax.grad(signed)(params)), jnp.zeros(())

    grads = _per_example(lambda ex: jax.grad(lambda p: log_likelihood(p, *ex)[0])(params), batch)
    return _masked_sum(mask, _square(grads)), jnp.zeros(())


def _chunked(arrays: tuple, chunk_size: int) -> tuple[tuple, jax.Array]:
    """Arrays reshaped to (chunks, chunk_size, ...), the last chunk padded with copies of the
    first examples, and the mask that is False on the padding."""
    n = arrays[0].shape[0]
    num_chunks = -(-n // chunk_size)
    pad = num_chunks * chunk_size - n

    def split(a):
        if pad:
            a = jnp.concatenate([a, a[:pad]])
        return a.reshape((num_chunks, chunk_size) + a.shape[1:])

    mask = (jnp.arange(num_chunks * chunk_size) < n).reshape(num_chunks, chunk_size)
    return tuple(split(a) for a in arrays), mask


@functools.partial(
    jax.jit, static_argnames=("log_likelihood", "kind", "method", "chunk_size", "num_classes")
)
def _curvature_sum(
    params, data, key, ll_args, *, log_likelihood, kind, method, chunk_size, num_classes
):
    """Σ_i over all examples of the per-example diagonal, and a diagnostic sum (see callers).
    ``log_likelihood`` is static, or the structure of one whose arrays are ``ll_args``
    (:func:`bayesnoise._tree.split_fn`)."""
    log_likelihood = _tree.join_fn(log_likelihood, ll_args)
    chunks, mask = _chunked(data, chunk_size)
    keys = None if key is None else jax.random.split(key, mask.shape[0])
    if kind == "categorical":
        chunk_fn = functools.partial(_chunk_categorical, log_likelihood, num_classes, method)
    elif kind == "gaussian":
        chunk_fn = functools.partial(_chunk_gaussian, log_likelihood, method)
    else:
        chunk_fn = functools.partial(_chunk_empirical, log_likelihood, method)

    def body(carry, xs):
        total, diagnostic = carry
        batch, m, k = xs
        contrib, d = chunk_fn(params, batch, m, k)
        total = jax.tree.map(lambda t, c: t + c.astype(t.dtype), total, contrib)
        return (total, diagnostic + d), None

    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.result_type(p, float)), params)
    (total, diagnostic), _ = jax.lax.scan(body, (zeros, jnp.zeros(())), (chunks, mask, keys))
    return total, diagnostic


def _curvature(params, log_likelihood, data, kind, key, num_classes, chunk_size, method):
    """Shared driver of :func:`diag_ggn` and :func:`empirical_fisher`."""
    _check_common(log_likelihood, key)
    _check_method(method)
    _check_chunk_size(chunk_size)
    arrays, n = _tree.data_tuple(data)
    _check_output(log_likelihood, params, arrays)
    y = arrays[-1]
    if kind == "ggn":
        if _is_discrete(y):
            kind, items = "categorical", _check_labels(y, num_classes)
        elif jnp.issubdtype(y.dtype, jnp.floating):
            kind, items = "gaussian", max(1, math.prod(y.shape[1:]))
        else:
            raise ValueError(
                f"the targets (last array of data) have dtype {y.dtype}: integer labels give the "
                f"categorical GGN, floating targets the Gaussian one."
            )
    else:
        items = 1
    num_params = sum(int(np.size(p)) for p in jax.tree.leaves(params))
    if method == "auto":
        method = "exact" if n * items * num_params <= _EXACT_WORK else "probe"
        if method == "probe" and key is None:
            key = jax.random.key(0)
            logger.info(
                "diag_ggn: %d examples x %d items x %d params is too much for exact per-item "
                "gradients; using the probe with a fixed key (pass key= to choose it).",
                n,
                items,
                num_params,
            )
    if method == "probe" and key is None:
        raise ValueError(
            "method='probe' draws random signs: pass key= (a PRNG key), or method='exact'."
        )
    if chunk_size is None:
        if method == "exact":
            chunk_size = min(_EXACT_CHUNK, _EXACT_MEMORY // max(1, items * num_params))
        else:
            chunk_size = min(_PROBE_CHUNK, -(-n // _PROBE_CHUNKS))
    chunk_size = int(max(1, min(chunk_size, n)))
    ll_static, ll_args = _tree.split_fn(log_likelihood, partial=False)
    total, diagnostic = _curvature_sum(
        params,
        arrays,
        key if method == "probe" else None,
        ll_args,
        log_likelihood=ll_static,
        kind=kind,
        method=method,
        chunk_size=chunk_size,
        num_classes=items if kind == "categorical" else None,
    )
    result = jax.tree.map(lambda t: t / n, total)
    if _check.concrete((result, diagnostic)):
        _check_values(result, "the diagonal curvature", f"computed with method={method!r}")
        if kind == "categorical":
            mass = float(diagnostic) / n
            if abs(mass - 1.0) > 1e-3:
                logger.warning(
                    "diag_ggn: the log-likelihood's probabilities of the %d classes sum to %.4f "
                    "on average, not 1: num_classes is too small (a class absent from the data?) "
                    "or the likelihood is not normalised; the result is not the Fisher.",
                    items,
                    mass,
                )
        elif kind == "gaussian" and float(diagnostic) > 0:
            logger.warning(
                "diag_ggn: %d (example, output) items have d²ℓ/dy² >= 0 (the likelihood is not "
                "log-concave in y there) and were left out of the GGN.",
                int(diagnostic),
            )
    return result


# -------------------------------------------------------------------------- public API


def diag_ggn(
    params: PyTree,
    log_likelihood: Callable[..., jax.Array],
    data: Sequence[ArrayLike],
    *,
    key: jax.Array | None = None,
    num_classes: int | None = None,
    chunk_size: int | None = None,
    method: str = "auto",
) -> PyTree:
    """The diagonal of the GGN averaged over the data: (1/N) Σ_i diag(J_iᵀ Λ_i J_i).

    N · diag_ggn is the data's contribution to the Laplace precision. Integer targets (the last
    array of ``data``) give the categorical Fisher Σ_k p_ik g_ik², exact for softmax
    cross-entropy; floating targets the Gaussian form Σ_o (∂²ℓ/∂θ∂y_o)² / (−∂²ℓ/∂y_o²), exact
    for a Gaussian likelihood of any fixed variances (see the module docstring).

    Args:
        params: the parameters, any pytree of float arrays (a linen dict, an NNX ``State``).
        log_likelihood: ``log_likelihood(params, *batch)`` returning per-example
            log-likelihoods of shape (n,). For integer targets it must accept any label in
            [0, num_classes) in place of the observed one.
        data: a tuple of arrays with a common leading axis of N examples, e.g. ``(x, y)``.
        key: PRNG key for the probe's random signs (needed by ``method="probe"``; ``"auto"``
            uses a fixed key when it picks the probe and none is given).
        num_classes: for integer targets, the number of classes K; default max label + 1.
        chunk_size: examples per chunk. Default: for the exact method 16, or fewer where the
            per-item gradients would pass 128 MiB; for the probe ⌈N / 2048⌉ up to 64 (about 2048
            chunks, relative sd ≈ 3%).
        method: ``"exact"`` (per-item gradients, memory chunk × items × params), ``"probe"``
            (Rademacher signs, one backward pass per chunk, unbiased, relative sd about
            √(2 / number of chunks)), or ``"auto"``: exact while N · items · params ≤ 2e9,
            else the probe.

    Returns:
        A tree shaped like ``params``: the per-example average of the GGN's diagonal.

    Raises:
        ValueError: for data of mismatched leading axes, negative labels, a bad ``method`` or
            ``chunk_size``, the probe without a key, or a non-finite result.
        TypeError: ``log_likelihood`` is not callable, ``key`` is not None or a PRNG key, or
            ``data`` is not a tuple of arrays.
    """
    return _curvature(params, log_likelihood, data, "ggn", key, num_classes, chunk_size, method)


def empirical_fisher(
    params: PyTree,
    log_likelihood: Callable[..., jax.Array],
    data: Sequence[ArrayLike],
    *,
    method: str = "auto",
    key: jax.Array | None = None,
    chunk_size: int | None = None,
) -> PyTree:
    """The diagonal empirical Fisher (1/N) Σ_i g_i², g_i = ∇_θ log p(y_i | x_i, θ).

    At the observed targets rather than in expectation over the model's, so it is not the GGN
    (Kunstner, Balles & Hennig, 2019); the same chunked machinery as :func:`diag_ggn`, with one
    item per example.

    Args:
        params, log_likelihood, data, key, chunk_size, method: as in :func:`diag_ggn`.

    Returns:
        A tree shaped like ``params``.

    Raises:
        ValueError / TypeError: as :func:`diag_ggn`.
    """
    return _curvature(params, log_likelihood, data, "empirical", key, None, chunk_size, method)


@functools.partial(jax.jit, static_argnames=("log_likelihood", "chunk_size"))
def _total_log_likelihood(params, data, *, log_likelihood, chunk_size):
    chunks, mask = _chunked(data, chunk_size)

    def body(total, xs):
        batch, m = xs
        ll = log_likelihood(params, *batch)
        return total + jnp.sum(jnp.where(m, ll, 0.0)), None

    return jax.lax.scan(body, jnp.zeros(()), (chunks, mask))[0]


def _prior_variance(params: PyTree, hierarchy: gsm.Hierarchy | None, prior_variance: Any):
    if prior_variance is None:
        if hierarchy is None:
            raise ValueError("pass a hierarchy (bn.gsm.hierarchy) or a prior_variance tree.")
        return gsm.prior_variance(params, hierarchy)
    meaning = "the prior variance of every parameter"
    prior_variance = _check_like(prior_variance, params, "prior_variance", meaning)
    _check_values(prior_variance, "prior_variance", meaning)
    return prior_variance


def _evidence(params, ggn, prior_var, total_ll, n) -> jax.Array:
    """Σ ℓ + log p(θ*) + (P/2) log 2π − ½ Σ log H, summed per weight in the stable form
    −θ²/(2s) − ½ log1p(s N g) (s the prior variance; a weight with s = 0 adds 0 at θ = 0)."""

    def term(theta, g, s):
        theta = jnp.asarray(theta, jnp.result_type(theta, float))
        safe = jnp.where(s > 0, s, 1.0)
        t = -(theta**2) / (2 * safe) - 0.5 * jnp.log1p(safe * n * g)
        t = jnp.where(s > 0, t, jnp.where(theta == 0, 0.0, -jnp.inf))
        return jnp.sum(t)

    terms = jax.tree.leaves(jax.tree.map(term, params, ggn, prior_var))
    return total_ll + sum(terms, jnp.zeros(()))


_DIAG_GGN_KWARGS = ("num_classes", "chunk_size", "method")


def _setup(params, hierarchy, log_likelihood, data, ggn, prior_variance, key, diag_ggn_kwargs):
    _check_common(log_likelihood, key)
    unknown = sorted(set(diag_ggn_kwargs) - set(_DIAG_GGN_KWARGS))
    if unknown:
        raise TypeError(
            f"unknown keyword arguments {unknown}; allowed: those of diag_ggn, "
            f"{', '.join(_DIAG_GGN_KWARGS)}."
        )
    if hierarchy is not None and not isinstance(hierarchy, gsm.Hierarchy):
        raise TypeError(
            f"hierarchy must be None or a bn.gsm.Hierarchy (from bn.gsm.hierarchy(params)), got "
            f"{type(hierarchy).__name__}."
        )
    arrays, n = _tree.data_tuple(data)
    prior_var = _prior_variance(params, hierarchy, prior_variance)
    if ggn is None:
        ggn = diag_ggn(params, log_likelihood, arrays, key=key, **diag_ggn_kwargs)
    else:
        meaning = "a diagonal GGN shaped like the params, as diag_ggn returns"
        ggn = _check_like(ggn, params, "ggn", meaning)
        _check_values(ggn, "ggn", meaning)
    _check_output(log_likelihood, params, arrays)
    total_ll = _total_log_likelihood(
        params, arrays, log_likelihood=log_likelihood, chunk_size=min(n, _EVAL_CHUNK)
    )
    return n, prior_var, ggn, _evidence(params, ggn, prior_var, total_ll, n)


def posterior(
    params: PyTree,
    hierarchy: gsm.Hierarchy | None,
    log_likelihood: Callable[..., jax.Array],
    data: Sequence[ArrayLike],
    temperature: ArrayLike = 1.0,
    *,
    ggn: PyTree | None = None,
    prior_variance: PyTree | None = None,
    key: jax.Array | None = None,
    **diag_ggn_kwargs: Any,
) -> LaplacePosterior:
    """The diagonal Laplace posterior at the mode ``params`` under the GSM prior.

        precision = N · diag GGN + 1 / prior_var,   variance = T / precision,   mean = θ*,

    prior_var = σ0² λ_row² for noised weights and σ0² for the other leaves
    (:func:`bayesnoise.gsm.prior_variance`). The approximation is centred on ``params``: pass a
    mode of the log posterior (e.g. a network trained with the prior's weight decay); the GGN
    there is the curvature whatever the point, but the Gaussian only approximates the posterior
    around a mode.

    Args:
        params: the mode θ*, any pytree (a linen dict, an NNX ``State``).
        hierarchy: the GSM hierarchy giving the prior variances (may be None when
            ``prior_variance`` is given).
        log_likelihood: per-example ``log_likelihood(params, *batch) -> (n,)``.
        data: a tuple of arrays with a common leading axis of N examples.
        temperature: T > 0; the variance scales by T (the evidence is that of T = 1).
        ggn: a precomputed :func:`diag_ggn` (a tree like params); computed when None.
        prior_variance: a tree like params replacing ``gsm.prior_variance(params, hierarchy)``.
        key: PRNG key for :func:`diag_ggn`'s probe.
        **diag_ggn_kwargs: ``num_classes``, ``chunk_size``, ``method`` of :func:`diag_ggn`.

    Returns:
        A :class:`LaplacePosterior`.

    Raises:
        ValueError: if ``temperature`` is not finite and > 0, ``ggn`` or ``prior_variance``
            does not have the params' structure and shapes, the curvature is not finite or
            negative, or the data are malformed (see :func:`diag_ggn`).
        TypeError: ``hierarchy`` is not None or a :class:`bayesnoise.gsm.Hierarchy`,
            ``temperature`` is not a number, an unknown keyword argument, and as
            :func:`diag_ggn`.
    """
    _check_temperature(temperature)
    n, prior_var, ggn, evidence = _setup(
        params, hierarchy, log_likelihood, data, ggn, prior_variance, key, diag_ggn_kwargs
    )
    precision = jax.tree.map(lambda g, s: n * g + 1.0 / s, ggn, prior_var)
    variance = jax.tree.map(lambda h: jnp.asarray(temperature, h.dtype) / h, precision)
    mean = jax.tree.map(lambda p, v: jnp.asarray(p, v.dtype), params, variance)
    moments = bmoments.MomentsState(
        count=jnp.ones((), jnp.float32),
        shift=mean,
        mean_dev=jax.tree.map(jnp.zeros_like, mean),
        m2=variance,
    )
    return LaplacePosterior(moments, mean, variance, precision, evidence, ggn)


def log_evidence(
    params: PyTree,
    hierarchy: gsm.Hierarchy | None,
    log_likelihood: Callable[..., jax.Array],
    data: Sequence[ArrayLike],
    *,
    ggn: PyTree | None = None,
    prior_variance: PyTree | None = None,
    key: jax.Array | None = None,
    **diag_ggn_kwargs: Any,
) -> jax.Array:
    """The Laplace estimate of the evidence log p(D | λ) with the diagonal precision H.

        log p(D | λ) ≈ Σ_i log p(y_i | x_i, θ*) + log p(θ*) + (P/2) log 2π − ½ Σ_k log H_kk,

    H = N · diag GGN + 1 / prior_var, log p(θ*) = :func:`bayesnoise.gsm.full_log_prior` (or the
    Gaussian N(0, prior_variance) when that tree is given), P the number of parameters. It is
    exact for a linear-Gaussian model whose precision is diagonal, evaluated at the mode.

    Args:
        params, hierarchy, log_likelihood, data, ggn, prior_variance, key, ``**diag_ggn_kwargs``:
            as in :func:`posterior`.

    Returns:
        A scalar.

    Raises:
        ValueError / TypeError: as :func:`posterior`.
    """
    return _setup(
        params, hierarchy, log_likelihood, data, ggn, prior_variance, key, diag_ggn_kwargs
    )[3]
