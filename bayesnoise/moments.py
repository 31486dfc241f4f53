"""Running posterior moments over pytrees (Welford), mergeable across chains.

Samples are never stored: the state holds a count, the running mean and the running sum of
squared deviations M2 per weight, so memory is O(params) per chain.

Update (Welford, 1962), for a new sample x after n − 1 samples:

    n ← n + 1,  δ = x − m,  m ← m + δ / n,  M2 ← M2 + δ (x − m),

applied to x − c with c the first sample (shifted data; the mean is c + m).
Merge (Chan, Golub & LeVeque, 1979) of (n_a, m_a, M2_a) and (n_b, m_b, M2_b):

    n = n_a + n_b,  δ = m_b − m_a,  m = m_a + δ n_b / n,  M2 = M2_a + M2_b + δ² n_a n_b / n.

Checks: the trees a state meets (samples, another state) must have its structure and leaf
shapes (checked on every call, from shapes only, so also under ``jit``); the summaries (mean,
variance, ...) need at least one sample, and ``variance`` more samples than ``ddof``, which is
checked where the count is concrete (outside ``jit``: one scalar read back).

Example:
    >>> import jax.numpy as jnp, bayesnoise as bn
    >>> state = bn.moments.init({"w": jnp.zeros(2)})
    >>> for x in (1.0, 2.0, 3.0):
    ...     state = bn.moments.update(state, {"w": jnp.full(2, x)})
    >>> bn.moments.mean(state)["w"], bn.moments.variance(state)["w"]
    (Array([2., 2.], dtype=float32), Array([0.6666667, 0.6666667], dtype=float32))
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bayesnoise import _check
from bayesnoise._tree import PyTree

__all__ = [
    "MomentsState",
    "init",
    "update",
    "merge",
    "merge_chains",
    "mean",
    "variance",
    "std",
    "second_moment",
]


class MomentsState(NamedTuple):
    count: jax.Array  # shape (), float32: the number of samples seen
    shift: PyTree  # the first sample, shaped like the params: moments are kept relative to it
    mean_dev: PyTree  # running mean of (sample − shift) per leaf
    m2: PyTree  # running sum of squared deviations from the mean per leaf


def _check_state(state: object, fn: str, name: str = "state") -> None:
    if not isinstance(state, MomentsState):
        raise TypeError(
            f"{fn}: {name} must be a bn.moments.MomentsState (from bn.moments.init), got "
            f"{type(state).__name__}: {state!r:.200}."
        )


def _check_count(state: MomentsState, fn: str, ddof: int = 0) -> None:
    """At least ``ddof + 1`` samples in every chain, where the count is concrete."""
    if not _check.concrete(state.count) or not _check.concrete(ddof):
        return
    count = np.asarray(jax.device_get(state.count))
    if count.size == 0:
        return
    low = int(count.min())
    if low > ddof:
        return
    held = "no samples (count 0)" if low == 0 else f"{low} sample{'s' if low > 1 else ''}"
    where = " in one of its chains" if count.ndim else ""
    if ddof == 0:
        raise ValueError(
            f"{fn}: the state holds {held}{where}; allowed: a state updated with at least one "
            f"sample (bn.moments.update)."
        )
    raise ValueError(
        f"{fn}: the state holds {held}{where}, but ddof={ddof} needs more samples than ddof; "
        f"allowed: ddof < count."
    )


def _check_leaves(params: PyTree) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        _check.array(f"params{jax.tree_util.keystr(path)}", leaf)


def init(params: PyTree) -> MomentsState:
    """An empty state shaped like ``params`` (whose values are ignored).

    Raises:
        TypeError: a leaf of ``params`` is not an array of real numbers.
    """
    _check_leaves(params)
    zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), _float_dtype(x)), params)
    return MomentsState(jnp.zeros((), jnp.float32), zeros, zeros, zeros)


def _float_dtype(x):
    dtype = jnp.result_type(x)
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.result_type(float)


def update(state: MomentsState, sample: PyTree) -> MomentsState:
    """Adds one sample (a tree shaped like the params) to the running moments.

    The first sample becomes the shift; later ones enter as x − shift, which float arithmetic
    computes exactly when x is near the shift, so a stream with a large mean and a small spread
    keeps its variance in float32.

    Raises:
        TypeError: ``state`` is not a :class:`MomentsState`.
        ValueError: ``sample`` differs from the state in tree structure or in a leaf's shape.
    """
    _check_state(state, "update")
    _check.same_tree("sample", sample, state.mean_dev, "the state")
    first = state.count == 0
    count = state.count + 1
    shift = jax.tree.map(lambda s, x: jnp.where(first, x.astype(s.dtype), s), state.shift, sample)
    dev = jax.tree.map(lambda x, s: x - s, sample, shift)
    delta = jax.tree.map(jnp.subtract, dev, state.mean_dev)
    new_mean = jax.tree.map(lambda m, d: m + d / count.astype(m.dtype), state.mean_dev, delta)
    m2 = jax.tree.map(lambda a, d, x, m: a + d * (x - m), state.m2, delta, dev, new_mean)
    return MomentsState(count, shift, new_mean, m2)


def merge(a: MomentsState, b: MomentsState) -> MomentsState:
    """Combines the moments of two disjoint streams, as if one had seen both.

    Raises:
        TypeError: ``a`` or ``b`` is not a :class:`MomentsState`.
        ValueError: the states differ in tree structure, in a leaf's shape, or in their chain
            axes.
    """
    _check_state(a, "merge", "a")
    _check_state(b, "merge", "b")
    _check.same_tree("b", b.mean_dev, a.mean_dev, "a")
    if np.shape(a.count) != np.shape(b.count):
        raise ValueError(
            f"merge: a and b must have the same chain axes: a.count has shape "
            f"{np.shape(a.count)}, b.count has shape {np.shape(b.count)}."
        )
    n = a.count + b.count
    safe = jnp.maximum(n, 1.0)
    wb = b.count / safe
    cross = a.count * b.count / safe
    shift = jax.tree.map(lambda sa, sb: jnp.where(a.count > 0, sa, sb), a.shift, b.shift)
    ma = jax.tree.map(lambda m, s, s0: m + (s - s0), a.mean_dev, a.shift, shift)
    mb = jax.tree.map(lambda m, s, s0: m + (s - s0), b.mean_dev, b.shift, shift)

    def mean_fn(xa, xb):
        return xa + (xb - xa) * wb.astype(xa.dtype)

    def m2_fn(qa, qb, xa, xb):
        d = xb - xa
        return qa + qb + d * d * cross.astype(d.dtype)

    return MomentsState(
        n, shift, jax.tree.map(mean_fn, ma, mb), jax.tree.map(m2_fn, a.m2, b.m2, ma, mb)
    )


def merge_chains(state: MomentsState) -> MomentsState:
    """Merges states stacked along a leading chain axis (the output of a vmapped run).

    The many-way form of :func:`merge`: the count-weighted grand mean, and M2 as the sum of the
    chains' M2 plus Σ_c n_c (m_c − m)², the between-chain part.

    Raises:
        TypeError: ``state`` is not a :class:`MomentsState`.
    """
    _check_state(state, "merge_chains")
    count = jnp.asarray(state.count)
    if count.ndim == 0:
        return state
    n = count.sum()
    safe = jnp.maximum(n, 1.0)

    def wsum(weights, x):
        # Σ_c weights_c x_c over the leading chain axis, as a contraction: XLA:CPU runs a
        # reduction over the major axis of a large array far slower than the same dot.
        return jnp.tensordot(weights.astype(x.dtype), x, axes=1)

    shift = jax.tree.map(lambda s: s[0], state.shift)
    rel = jax.tree.map(lambda m, s, s0: m + (s - s0), state.mean_dev, state.shift, shift)
    grand = jax.tree.map(lambda m: wsum(count / safe, m), rel)
    ones = jnp.ones_like(count)

    def m2_fn(q, m, g):
        return wsum(ones, q) + wsum(count, (m - g) ** 2)

    return MomentsState(n, shift, grand, jax.tree.map(m2_fn, state.m2, rel, grand))


def _mean(state: MomentsState) -> PyTree:
    return jax.tree.map(jnp.add, state.shift, state.mean_dev)


def _variance(state: MomentsState, ddof: int) -> PyTree:
    denom = jnp.maximum(state.count - ddof, 1.0)
    return jax.tree.map(lambda x: x / denom.astype(x.dtype), state.m2)


def _check_ddof(ddof: int) -> int:
    """An int >= 0 (a float with a whole value, such as 1.0, counts as that int)."""
    if isinstance(ddof, (float, np.floating)) and float(ddof).is_integer():
        ddof = int(ddof)
    _check.number("ddof", ddof, lo=0, integer=True)
    return ddof


def mean(state: MomentsState) -> PyTree:
    """The running mean.

    Raises:
        TypeError: ``state`` is not a :class:`MomentsState`.
        ValueError: the state holds no samples (checked where its count is concrete).
    """
    _check_state(state, "mean")
    _check_count(state, "mean")
    return _mean(state)


def variance(state: MomentsState, ddof: int = 0) -> PyTree:
    """M2 / (n − ddof): the population variance by default (ddof=0), unbiased with ddof=1.

    Args:
        state: the running moments.
        ddof: an int >= 0, below the number of samples n.

    Raises:
        TypeError: ``state`` is not a :class:`MomentsState`, or ``ddof`` is not an int.
        ValueError: ``ddof`` < 0, or the state holds no more than ``ddof`` samples (checked
            where its count is concrete).
    """
    _check_state(state, "variance")
    ddof = _check_ddof(ddof)
    _check_count(state, "variance", ddof)
    return _variance(state, ddof)


def std(state: MomentsState, ddof: int = 0) -> PyTree:
    """The square root of :func:`variance`.

    Raises:
        TypeError, ValueError: as :func:`variance`.
    """
    _check_state(state, "std")
    ddof = _check_ddof(ddof)
    _check_count(state, "std", ddof)
    return jax.tree.map(jnp.sqrt, _variance(state, ddof))


def second_moment(state: MomentsState) -> PyTree:
    """E[x²] = mean² + variance per weight, the input of the EM M-step.

    Raises:
        TypeError, ValueError: as :func:`mean`.
    """
    _check_state(state, "second_moment")
    _check_count(state, "second_moment")
    return jax.tree.map(lambda m, v: m * m + v, _mean(state), _variance(state, 0))
