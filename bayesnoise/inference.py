"""The three dropout inference rules: weight scaling, Monte Carlo, geometric mean.

* Weight scaling: replace λ by E[λ], i.e. multiply every noised row by E[λ] and run the plain
  model once (:func:`weight_scale`).
* Monte Carlo: the arithmetic mean of the predictive distribution over S noise draws,
  p(y|x) ≈ (1/S) Σ_s softmax(f(x; λ_s)) (:func:`mc_predict`).
* Geometric mean: the renormalised geometric mean of the same S predictives,
  p(y|x) ∝ exp((1/S) Σ_s log softmax(f(x; λ_s))_y) (:func:`geometric_predict`).

For softmax regression the weight-scaled model equals the renormalised geometric mean over all
masks weighted by their probabilities, exactly (Srivastava et al., 2014; Baldi & Sadowski, 2013).

Learned noise (:func:`bayesnoise.nn.learned_noise`, :func:`bayesnoise.nn.add_learned_noise`)
has the same rules. Its noise has mean 1 per row (ξ ~ N(1, α)) and mean θ per weight, so the
weight-scaling rule is the mean network: the model at its own params (``apply(...,
deterministic=True)``, ``model.apply(variables, x)``, the params of :func:`mean_params`, or an
NNX model after ``bn.nn.set_deterministic``). Monte Carlo passes the noisy model to
:func:`mc_predict` as ``apply_fn(key, x)``: :func:`sampler` builds it from a linen apply,
:func:`nnx_sampler` from an NNX model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bayesnoise import _check, _tree, gsm
from bayesnoise import nn as bnn
from bayesnoise import noise as bnoise
from bayesnoise.noise import Noise

__all__ = [
    "weight_scale",
    "mc_predict",
    "geometric_predict",
    "mc_logits",
    "sampler",
    "nnx_sampler",
    "mean_params",
]


def weight_scale(params: Any, noise: Noise | Mapping[str, Noise], where: _tree.Where = None) -> Any:
    """Params with every noised row multiplied by E[λ] (biases untouched).

    The plain model with these params applies the weight-scaling rule: for a Dense layer,
    (h ⊙ E[λ]) W = h (diag(E[λ]) W).

    Args:
        params: any params tree (linen variables, NNX state).
        noise: the noise the model was trained with; its ``scale_factor`` (E[λ]) is folded in.
            Or a mapping {regex on the kernel path: noise}, as given to
            :func:`bayesnoise.nn.noisy_apply`: the first pattern found in a path wins, and
            leaves no pattern covers are left as they are.
        where: the noised leaves, as in :func:`bayesnoise.gsm.hierarchy`.

    Raises:
        TypeError: ``noise`` is not a noise or a mapping of them, or ``where`` is not None, a
            string or a callable.
        ValueError: ``where`` selects no leaf (the message shows it), or a key of the mapping
            matches no noised leaf.
    """
    bnoise.check_spec(noise)
    axes = _tree.row_axes(params, where)
    if where is not None and all(a is None for _, a in axes):
        raise _tree.nothing_chosen(where, "params", [p for p, _ in axes], "noised", "")
    h = gsm.hierarchy(params, where=where)
    leaves, treedef = jax.tree.flatten(h.scales, is_leaf=lambda x: x is None)
    bnoise.check_patterns(noise, [path for (path, _), s in zip(h.axes, leaves) if s is not None])
    factors = []
    for (path, _), s in zip(h.axes, leaves):
        layer_noise = None if s is None else bnoise.resolve(noise, path)
        factors.append(None if layer_noise is None else s * layer_noise.scale_factor)
    return gsm.to_identifiable(params, h.replace(scales=jax.tree.unflatten(treedef, factors)))


def _key_first(key, apply_fn, x, name):
    """(key, apply_fn, x), accepting the old order (apply_fn, x, key) with a warning."""
    if callable(key) and not callable(apply_fn):
        import warnings

        warnings.warn(
            f"bn.inference.{name}(apply_fn, x, key, ...) is deprecated: the key comes first, "
            f"{name}(key, apply_fn, x, ...).",
            DeprecationWarning,
            stacklevel=3,
        )
        return x, key, apply_fn
    if not callable(apply_fn):
        raise TypeError(
            f"{name}(key, apply_fn, x, ...): apply_fn must be a callable (key, x) -> logits, got "
            f"{type(apply_fn).__name__}."
        )
    return key, apply_fn, x


# apply_fn(key, x): the network's logits under one draw of the noise
ApplyFn = Callable[[jax.Array, jax.Array], jax.Array]


def mc_logits(key: jax.Array, apply_fn: ApplyFn, x: jax.Array, num_samples: int) -> jax.Array:
    """``apply_fn(key, x)`` for S keys at once (vmapped, one compile): shape (S, ...).

    Raises:
        TypeError: ``key`` is not a PRNG key, ``apply_fn`` is not callable, or ``num_samples``
            is not an int.
        ValueError: ``num_samples`` < 1.
    """
    key, apply_fn, x = _key_first(key, apply_fn, x, "mc_logits")
    return _draws(key, apply_fn, x, num_samples)


def _draws(key, apply_fn, x, num_samples):
    _check.key("key", key)
    _check.number("num_samples", num_samples, lo=1, integer=True)
    keys = jax.random.split(key, num_samples)
    return jax.vmap(lambda k: apply_fn(k, x))(keys)


def mc_predict(key: jax.Array, apply_fn: ApplyFn, x: jax.Array, num_samples: int = 32):
    """Monte Carlo rule: (1/S) Σ_s softmax(f(x; λ_s)). ``apply_fn(key, x)`` returns noisy logits.

    Returns:
        class probabilities, shape (..., classes).

    Raises:
        TypeError / ValueError: as :func:`mc_logits`.
    """
    logits = _draws(*_key_first(key, apply_fn, x, "mc_predict"), num_samples)
    return jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0)


def geometric_predict(key: jax.Array, apply_fn: ApplyFn, x: jax.Array, num_samples: int = 32):
    """Geometric-mean rule: softmax((1/S) Σ_s log softmax(f(x; λ_s))), renormalised.

    Raises:
        TypeError / ValueError: as :func:`mc_logits`.
    """
    logits = _draws(*_key_first(key, apply_fn, x, "geometric_predict"), num_samples)
    return jax.nn.softmax(jnp.mean(jax.nn.log_softmax(logits, axis=-1), axis=0), axis=-1)


def sampler(apply: Callable[..., Any], variables: Any, *, rng_collection: str = "noise", **kwargs):
    """``apply_fn(key, x) = apply(variables, x, rngs={rng_collection: key}, **kwargs)``.

    The noisy model as :func:`mc_predict`, :func:`geometric_predict` and :func:`mc_logits`
    take it, from a linen apply that draws from an rng stream: the ``apply`` of
    :func:`bayesnoise.nn.learned_noise` or :func:`bayesnoise.nn.noisy_apply`.

    Example:
        >>> import jax, jax.numpy as jnp, bayesnoise as bn
        >>> vd = bn.nn.learned_noise(bn.nn.MLP((8, 3)), per="weight")
        >>> variables = vd.init(jax.random.key(0), jnp.ones((1, 4)))
        >>> fn = bn.inference.sampler(vd.apply, variables)
        >>> bn.inference.mc_predict(jax.random.key(1), fn, jnp.ones((2, 4)), 16).shape
        (2, 3)

    Raises:
        TypeError: ``apply`` is not callable, or ``rng_collection`` is not a string.
    """
    if not callable(apply):
        raise TypeError(
            f"apply must be a callable apply(variables, x, rngs=...), such as model.apply; got "
            f"{apply!r}."
        )
    _check.collection(rng_collection)

    def apply_fn(key, x):
        return apply(variables, x, rngs={rng_collection: key}, **kwargs)

    return apply_fn


def nnx_sampler(model: Any, *, rng_collection: str = "noise"):
    """``apply_fn(key, x)``: an NNX model with noise, reseeded with ``key``, applied to ``x``.

    A pure function of its arguments (the model is split once, here: a snapshot of its
    current state; every call merges a copy and reseeds its ``rng_collection`` stream), so
    :func:`mc_predict` can vmap it over keys. The model itself is not changed; its noise must
    be switched on (not deterministic).

    Raises:
        TypeError: ``model`` is not an NNX module, or ``rng_collection`` is not a string.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"model must be an NNX module (flax.nnx.Module); got {type(model).__name__}. For a "
            f"linen model use bn.inference.sampler(model.apply, variables)."
        )
    _check.collection(rng_collection)
    graphdef, state = nnx.split(model)

    def apply_fn(key, x):
        copy = nnx.merge(graphdef, state, copy=True)  # fresh variables in this trace
        nnx.reseed(copy, **{rng_collection: key})
        return copy(x)

    return apply_fn


def mean_params(params: Any) -> Any:
    """The mean network's params: the model's own, without the learned-noise leaves.

    Drops every ``log_alpha`` / ``log_sigma2`` leaf that sits beside a ``kernel`` in a nested
    mapping (linen variables). ``model.apply`` gives the same output with or without them (it
    ignores extra leaves); this is for exporting or comparing the plain model's params.

    Raises:
        TypeError: ``params`` is not a mapping.
    """
    if not isinstance(params, Mapping):
        raise TypeError(
            f"mean_params takes nested mappings (linen variables), got {type(params).__name__}; "
            f"for an NNX model use bn.nn.set_deterministic(model) instead."
        )
    noise = (bnn.LOG_ALPHA, bnn.LOG_SIGMA2) if "kernel" in params else ()
    return {
        k: mean_params(v) if isinstance(v, Mapping) else v
        for k, v in params.items()
        if k not in noise
    }
