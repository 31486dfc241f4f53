"""Argument checks shared by the public functions (package-internal).

Every check runs on concrete values only: under ``jit`` a traced value passes unchecked (the
library checks where values are concrete, outside its compiled loops, and never transfers to
the host inside them). Each error names the argument, the value given and what is allowed.
"""

from __future__ import annotations

import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bayesnoise._tree import path_str

__all__ = [
    "concrete",
    "number",
    "positive",
    "key",
    "shape",
    "same_tree",
    "array",
    "function",
    "collection",
    "all_finite",
]


def concrete(x: Any) -> bool:
    """Whether ``x`` holds no tracer (so its value can be checked). A concrete value may still be
    a constant closed over inside a jit trace, where every operation is traced: compute a check
    on it under ``jax.ensure_compile_time_eval()`` (or with numpy)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(x))


def _show(value: Any) -> str:
    if isinstance(value, (np.ndarray, jax.Array)) and np.size(value) > 4:
        return f"an array of shape {np.shape(value)}"
    return repr(value)


def number(
    name: str,
    value: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    finite: bool = True,
    array: bool = False,
    integer: bool = False,
) -> None:
    """Checks a real number (or, with ``array``, every element of an array of them) is finite
    and within [lo, hi] (open ends with ``lo_open`` / ``hi_open``).

    Raises:
        TypeError: not a real number (a bool, a string, None, a complex number, an array where
            a scalar is wanted).
        ValueError: NaN, infinite, or out of range.
    """
    allowed = _allowed(lo, hi, lo_open, hi_open, finite, integer, array)
    if not concrete(value):
        return
    if isinstance(value, (bool, np.bool_, str, bytes)) or value is None:
        raise TypeError(f"{name} must be {allowed}, got {_show(value)}.")
    # a Python int of any size, compared exactly (NumPy holds one beyond int64 as an object,
    # and float() fails beyond 1e308); anything else as an array of float64
    if isinstance(value, int):
        a, bad = value, False
    else:
        a = _real_array(name, value, allowed, array, integer)
        if a is None:  # an empty array
            return
        bad = np.isnan(a) | (finite & np.isinf(a))
    if lo is not None:
        bad |= (operator.le if lo_open else operator.lt)(a, lo)
    if hi is not None:
        bad |= (operator.ge if hi_open else operator.gt)(a, hi)
    if np.any(bad):
        raise ValueError(f"{name} must be {allowed}, got {_show(value)}.")


def _real_array(name: str, value: Any, allowed: str, array: bool, integer: bool):
    """``value`` as a float64 array (None when empty), or TypeError naming it."""
    try:
        a = np.asarray(value)
    except Exception:  # an object NumPy cannot read as an array
        raise TypeError(f"{name} must be {allowed}, got {_show(value)}.") from None
    kinds = "iu" if integer else "iuf"
    if a.dtype.kind not in kinds or (not array and a.ndim != 0):
        raise TypeError(f"{name} must be {allowed}, got {_show(value)}.")
    return None if a.size == 0 else a.astype(np.float64)


def _allowed(lo, hi, lo_open, hi_open, finite, integer, array) -> str:
    what = "an int" if integer else "a finite number" if finite else "a number"
    if array:
        what = f"{what} or an array of them" if not integer else "ints"
    if lo is not None and hi is not None:
        return f"{what} in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{what} {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{what} {'<' if hi_open else '<='} {hi:g}"
    return what


def positive(name: str, value: Any, *, array: bool = False) -> None:
    """A finite number > 0 (every element, with ``array``)."""
    number(name, value, lo=0.0, lo_open=True, array=array)


def key(name: str, value: Any) -> None:
    """Checks a PRNG key: a typed key (``jax.random.key``) or a raw uint32 key
    (``jax.random.PRNGKey``), a single one.

    Raises:
        TypeError: anything else (None, an int seed, a float array), with how to make one.
    """
    how = "a PRNG key, e.g. jax.random.key(0)"
    if value is None or isinstance(value, (int, float, np.integer, np.floating, str)):
        raise TypeError(f"{name} must be {how}, got {_show(value)}.")
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        raise TypeError(f"{name} must be {how}, got a {type(value).__name__}.")
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if np.ndim(value) != 0:
            raise TypeError(
                f"{name} must be a single PRNG key, got an array of shape {value.shape}."
            )
        return
    if dtype != np.uint32 or np.shape(value)[-1:] != (2,) or np.ndim(value) != 1:
        raise TypeError(
            f"{name} must be {how} (or a raw uint32[2] key from jax.random.PRNGKey), got an "
            f"array of dtype {dtype} and shape {np.shape(value)}."
        )


def shape(name: str, value: Any) -> tuple[int, ...]:
    """A shape: a tuple (or list, or one int) of ints >= 0; returned as a tuple.

    Raises:
        TypeError / ValueError: naming the shape and what is allowed.
    """
    allowed = "a tuple of ints >= 0"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{name} must be {allowed}, got {_show(value)}.")
    if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in value):
        raise TypeError(f"{name} must be {allowed}, got {value!r}.")
    if any(d < 0 for d in value):
        raise ValueError(f"{name} must be {allowed}, got {tuple(value)!r}.")
    return tuple(int(d) for d in value)


def same_tree(name: str, tree: Any, like: Any, like_name: str) -> None:
    """Checks ``tree`` has the structure and leaf shapes of ``like``.

    Raises:
        ValueError: naming both and the first difference.
    """
    t_def, l_def = jax.tree.structure(tree), jax.tree.structure(like)
    if t_def != l_def:
        raise ValueError(
            f"{name} must have the tree structure of {like_name}: got {t_def}, expected {l_def}."
        )
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(like)):
        if np.shape(a) != np.shape(b):
            where = jax.tree_util.keystr(path)
            raise ValueError(
                f"{name}{where} has shape {np.shape(a)}, but {like_name}{where} has "
                f"{np.shape(b)}: {name} must have the shapes of {like_name}."
            )


def array(name: str, value: Any, what: str = "an array of real numbers") -> jax.Array:
    """``value`` as a JAX array, after checking that it holds real numbers (or bools); lists
    and NumPy arrays are converted, traced values pass.

    Raises:
        TypeError: None, a string, or anything whose elements are not real numbers, naming
            ``name`` and ``what`` is allowed.
    """
    if isinstance(value, jax.core.Tracer):
        return value
    dtype = getattr(value, "dtype", None)
    if dtype is None and not isinstance(value, (str, bytes)) and value is not None:
        try:
            dtype = np.asarray(value).dtype
        except Exception:  # an object NumPy cannot read as an array
            dtype = None
    try:
        kind = np.dtype(dtype).kind if dtype is not None else "O"
    except TypeError:  # a dtype NumPy does not know, such as a PRNG key's
        kind = "O"
    if kind not in "biuf":
        got = f"an array of dtype {dtype}" if dtype is not None and kind != "O" else None
        if got is None:
            got = f"{type(value).__name__}: {value!r:.80}"
        raise TypeError(f"{name} must be {what}, got {got}.")
    return jnp.asarray(value)


LOG_LIKELIHOOD = "log_likelihood(params, *batch) -> per-example log-likelihoods of shape (n,)"


def function(name: str, value: Any, signature: str) -> None:
    """Checks ``value`` is callable; the TypeError shows ``signature``, what is allowed."""
    if not callable(value):
        raise TypeError(f"{name} must be a callable {signature}, got {value!r:.120}.")


def collection(rng_collection: Any) -> None:
    """Checks ``rng_collection`` names an rng stream (a non-empty str)."""
    if not isinstance(rng_collection, str) or not rng_collection:
        raise TypeError(
            f"rng_collection must be a non-empty str naming an rng stream, e.g. 'noise'; got "
            f"{rng_collection!r}."
        )


def all_finite(tree: Any) -> jax.Array:
    """Whether every entry of every leaf is finite: a boolean scalar, traceable (one fused
    reduction per leaf)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


@jax.jit
def _nonfinite_per_leaf(tree: Any) -> list:
    """(non-finite entries, first non-finite entry) per leaf, in one compiled call."""

    def one(x):
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.inexact) or x.size == 0:
            return jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)
        bad = ~jnp.isfinite(x)
        return jnp.sum(bad, dtype=jnp.int32), jnp.ravel(x)[jnp.argmax(jnp.ravel(bad))]

    return [one(x) for x in jax.tree.leaves(tree)]


def finite_leaves(tree: Any, name: str, advice: str) -> None:
    """Raises a ValueError naming the first leaf of a concrete ``tree`` that holds NaN or inf
    (its path, shape, count and one such entry), followed by ``advice``; one explicit transfer
    of two numbers per leaf. Leaves that are not floats are skipped; traced trees pass."""
    if not concrete(tree):
        return
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not flat:
        return
    with jax.ensure_compile_time_eval():  # concrete leaves closed over inside a jit trace
        stats = jax.device_get(_nonfinite_per_leaf(tree))
    for (path, leaf), (bad, first) in zip(flat, stats):
        if bad:
            raise ValueError(
                f"{name} must be finite: leaf {path_str(path)!r} of shape "
                f"{tuple(np.shape(leaf))} holds {int(bad)} NaN or infinite entries (such as "
                f"{first}). {advice}"
            )
