"""Multiplicative noise as a Gaussian scale mixture (GSM) prior over a parameter pytree.

Layer l computes h_l = f(h_{l-1} Λ_l W_l), Λ_l = diag(λ_l). With w ~ N(0, σ0²), the product
v = λw has v | λ ~ N(0, σ0² λ²): a GSM whose mixing variable is the noise. The "unidentifiable"
form keeps (λ, w); the "identifiable", hierarchical form keeps (λ, v). All weights of one input
row share one λ, so a noised leaf gets one scale per input row: axis 0 of a Dense kernel
(in, out), the in-channel axis -2 of a Conv kernel (..., in, out), any axis chosen by ``where``.

Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, bayesnoise as bn
    >>> params = nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 5)))
    >>> h = bn.gsm.hierarchy(params, sigma0=1.0)
    >>> h.scales["params"]["kernel"].shape, h.scales["params"]["bias"]
    ((5,), None)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from bayesnoise import _check, _tree
from bayesnoise._tree import PyTree, Where
from bayesnoise.noise import Noise, check_noise

__all__ = [
    "Hierarchy",
    "hierarchy",
    "to_identifiable",
    "from_identifiable",
    "log_prior",
    "full_log_prior",
    "prior_variance",
    "sample_prior",
    "row_sizes",
    "row_sums",
]


@dataclasses.dataclass(frozen=True)
class Hierarchy:
    """A GSM hierarchy over a parameter pytree.

    Attributes:
        scales: same tree structure as the params; a vector λ (one entry per input row) for each
            noised leaf, ``None`` for the others.
        sigma0: standard deviation σ0 of the Gaussian prior on the unscaled weights w.
        axes: static; for every leaf of the params in flattening order, its path and the axis
            that indexes its rows (None when the leaf is not noised).
    """

    scales: PyTree
    sigma0: Any
    axes: tuple[tuple[str, int | None], ...] = ()

    def replace(self, **kwargs) -> Hierarchy:
        """A copy with fields replaced; new scales are checked here (where concrete), once,
        rather than on every evaluation of the prior.

        Raises:
            ValueError: a new scale is not finite and > 0, or a new ``sigma0`` is not a finite
                number > 0.
        """
        if "scales" in kwargs:
            _check_like_scales(kwargs["scales"], self.scales)
            _check_positive_scales(kwargs["scales"])
        if "sigma0" in kwargs:
            _check_sigma0(kwargs["sigma0"], "hierarchy.sigma0")
        return dataclasses.replace(self, **kwargs)


jax.tree_util.register_dataclass(Hierarchy, data_fields=["scales", "sigma0"], meta_fields=["axes"])


def _check_sigma0(sigma0: Any, what: str = "sigma0") -> None:
    """A finite number > 0 (a scalar: one prior standard deviation for every weight)."""
    _check.number(
        f"{what} (the prior standard deviation of the weights)", sigma0, lo=0.0, lo_open=True
    )


def _check_hierarchy(hierarchy: Any, fn: str) -> None:
    if not isinstance(hierarchy, Hierarchy):
        raise TypeError(
            f"{fn}: hierarchy must be a bn.gsm.Hierarchy (from bn.gsm.hierarchy), got "
            f"{type(hierarchy).__name__}: {hierarchy!r:.200}."
        )
    _check_sigma0(hierarchy.sigma0, "hierarchy.sigma0")


def _check_like_scales(new: PyTree, old: PyTree) -> None:
    """New scales must have the tree and the shapes of the old: one vector per noised leaf (or
    None, which leaves that leaf unscaled)."""

    def shapes(tree):
        leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is None)
        return treedef, [None if x is None else np.shape(x) for x in leaves]

    (t_new, s_new), (t_old, s_old) = shapes(new), shapes(old)
    # None for a noised leaf leaves it unscaled (e.g. a layer without noise): allowed
    if t_new != t_old or any(a is not None and a != b for a, b in zip(s_new, s_old)):
        raise ValueError(
            f"new scales must have the structure and shapes of hierarchy.scales (one vector per "
            f"noised leaf, None elsewhere): got {t_new} with shapes {s_new}, expected {t_old} "
            f"with shapes {s_old}."
        )


def _check_positive_scales(scales: PyTree) -> None:
    """Every concrete scale finite and > 0 (at a zero scale the prior's density is infinite)."""
    for path, s in jax.tree_util.tree_leaves_with_path(scales):
        if not _check.concrete(s):
            continue
        name = _tree.path_str(path)
        arr = np.asarray(s)
        bad = arr[~(np.isfinite(arr) & (arr > 0))]
        if bad.size:
            raise ValueError(
                f"hierarchy.scales must be finite and > 0 (the prior N(0, σ0² λ²) needs λ > 0); "
                f"the scales of leaf {name!r} hold {bad.size} that are not, e.g. "
                f"{float(bad.flat[0])!r}."
            )


def hierarchy(params: PyTree, sigma0: ArrayLike = 1.0, where: Where = None) -> Hierarchy:
    """Builds the GSM hierarchy of a parameter pytree, all scales one.

    Args:
        params: any pytree of arrays: a Flax linen variables dict, an NNX ``State``, a plain dict.
        sigma0: prior standard deviation of the weights, a finite number > 0.
        where: which leaves are noised. ``None``: every ``kernel`` leaf with at least two axes
            (rows on axis -2). A string: a regular expression searched in the leaf path
            (``"Dense_0/kernel"``). A callable ``(path, leaf) -> True | False | None | int``;
            an int names the row axis (use it for layouts other than Dense and Conv).

    Returns:
        A :class:`Hierarchy` with ``scales`` of the same tree structure as ``params``.

    Raises:
        ValueError: ``sigma0`` is not finite or not > 0, or ``where`` chooses no leaf.
        TypeError: ``sigma0`` is not a real number, or ``where`` is not None, a string or a
            callable.
    """
    _check_sigma0(sigma0)
    axes = tuple(_tree.row_axes(params, where))
    if all(a is None for _, a in axes):
        paths = ", ".join(p for p, _ in axes[:8]) or "(no leaves)"
        raise ValueError(
            f"no leaf of the params tree is noised with where={where!r} (leaves: {paths}); "
            f"allowed: a `where` that chooses at least one leaf. By default (where=None) only "
            f"'kernel' leaves with at least two axes are noised; pass `where` to choose leaves "
            f"by path."
        )
    leaves, treedef = jax.tree.flatten(params)
    scale_leaves = [
        None if a is None else jnp.ones((leaf.shape[a],), jnp.result_type(float))
        for leaf, (_, a) in zip(leaves, axes)
    ]
    scales = jax.tree.unflatten(treedef, scale_leaves)
    return Hierarchy(scales=scales, sigma0=sigma0, axes=axes)


def scaled_leaves(params: PyTree, scales: PyTree | Hierarchy):
    """(path, leaf, scale, axis) for every leaf, checking that scales fit their leaves."""
    if isinstance(scales, Hierarchy):
        axes = scales.axes
        scales = scales.scales
    else:
        axes = None
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    scale_leaves, scale_def = jax.tree.flatten(scales, is_leaf=lambda x: x is None)
    if len(scale_leaves) != len(flat):
        raise ValueError(
            f"the scales tree does not match the params tree: {len(scale_leaves)} scale entries "
            f"for {len(flat)} params leaves. Scales need the params' structure, with None for "
            f"leaves that are not noised (see bn.gsm.hierarchy)."
        )
    out = []
    for i, ((p, leaf), s) in enumerate(zip(flat, scale_leaves)):
        name = _tree.path_str(p)
        if s is None:
            out.append((name, leaf, None, None))
            continue
        if axes is not None:
            axis = axes[i][1]
        else:
            axis = _tree.rows_of(name, leaf)
            if axis is None:
                axis = _tree.fallback_axis(name, leaf)
        s = jnp.asarray(s)
        if axis is None or s.ndim != 1 or s.shape[0] != leaf.shape[axis]:
            rows = "none" if axis is None else f"{leaf.shape[axis]} (axis {axis})"
            raise ValueError(
                f"scales for leaf {name!r} have shape {tuple(s.shape)}, but that leaf has shape "
                f"{tuple(leaf.shape)} and its input rows number {rows}: a noised leaf needs a "
                f"vector with one scale per input row."
            )
        out.append((name, leaf, s, axis))
    return out, treedef


def _map_rows(fn, params: PyTree, scales: PyTree | Hierarchy) -> PyTree:
    triples, treedef = scaled_leaves(params, scales)
    new = [
        leaf if s is None else fn(leaf, _tree.broadcast_rows(s, leaf.ndim, a))
        for _, leaf, s, a in triples
    ]
    return jax.tree.unflatten(treedef, new)


def to_identifiable(w_params: PyTree, scales: PyTree | Hierarchy) -> PyTree:
    """v = λ_rows ⊙ w: every noised row multiplied by its scale; other leaves unchanged.

    Args:
        w_params: the unidentifiable weights w.
        scales: a scales tree (``hierarchy.scales``) or the :class:`Hierarchy` itself (which also
            carries row axes chosen by ``where``).
    """
    return _map_rows(lambda w, s: w * s, w_params, scales)


def from_identifiable(v_params: PyTree, scales: PyTree | Hierarchy) -> PyTree:
    """w = v / λ_rows, the inverse of :func:`to_identifiable` (rows with λ = 0 map to w = 0)."""

    def divide(v, s):
        safe = jnp.where(s == 0, 1.0, s)
        return jnp.where(s == 0, 0.0, v / safe)

    return _map_rows(divide, v_params, scales)


def log_prior(v_params: PyTree, hierarchy: Hierarchy) -> jax.Array:
    """Σ over noised leaves of log N(v; 0, σ0² λ_row²).

    Per weight: −½ log(2π σ0² λ²) − v² / (2 σ0² λ²).

    Raises:
        TypeError: ``hierarchy`` is not a :class:`Hierarchy`.
        ValueError: the scales do not fit ``v_params``, or ``hierarchy.sigma0`` is not a
            finite number > 0. (Scales are checked where they are set: :meth:`Hierarchy.replace`.)
    """
    _check_hierarchy(hierarchy, "log_prior")
    triples, _ = scaled_leaves(v_params, hierarchy)
    sigma0 = jnp.asarray(hierarchy.sigma0)
    total = jnp.zeros((), jnp.result_type(float))
    for _, v, s, a in triples:
        if s is None:
            continue
        var = (sigma0 * _tree.broadcast_rows(s, v.ndim, a)) ** 2
        total = total + jnp.sum(-0.5 * jnp.log(2 * math.pi * var) - v**2 / (2 * var))
    return total


def prior_variance(params: PyTree, hierarchy: Hierarchy) -> PyTree:
    """The prior variance of every parameter, a tree shaped like ``params``.

    σ0² λ_row² for the weights of noised leaves; σ0² for every other leaf (biases and leaves not
    noised), the proper prior N(0, σ0²) that :func:`full_log_prior` puts on them.

    Raises:
        TypeError: ``hierarchy`` is not a :class:`Hierarchy`.
        ValueError: the scales do not fit ``params``, or ``hierarchy.sigma0`` is not a finite
            number > 0.
    """
    _check_hierarchy(hierarchy, "prior_variance")
    triples, treedef = scaled_leaves(params, hierarchy)
    sigma0 = jnp.asarray(hierarchy.sigma0, jnp.result_type(float))
    out = []
    for _, leaf, s, a in triples:
        if s is None:
            out.append(jnp.full(jnp.shape(leaf), sigma0**2, jnp.result_type(float)))
        else:
            scale = sigma0 * _tree.broadcast_rows(s, jnp.ndim(leaf), a)
            out.append(jnp.broadcast_to(scale**2, jnp.shape(leaf)))
    return jax.tree.unflatten(treedef, out)


def full_log_prior(v_params: PyTree, hierarchy: Hierarchy) -> jax.Array:
    """A proper prior on every parameter: :func:`log_prior` plus N(0, σ0²) on the other leaves.

        log p(θ) = Σ_noised log N(v; 0, σ0² λ_row²) + Σ_other log N(b; 0, σ0²).

    The default prior of the E-step (:func:`bayesnoise.em.e_step`) and of the Laplace posterior:
    biases and leaves that are not noised get the unscaled weight prior, so the posterior is
    proper whatever the data.

    Raises:
        TypeError, ValueError: as :func:`log_prior`.
    """
    _check_hierarchy(hierarchy, "full_log_prior")
    triples, _ = scaled_leaves(v_params, hierarchy)
    sigma0 = jnp.asarray(hierarchy.sigma0)
    total = log_prior(v_params, hierarchy)
    for _, b, s, _ in triples:
        if s is None:
            b = jnp.asarray(b)
            total = total + jnp.sum(
                -0.5 * jnp.log(2 * math.pi * sigma0**2) - b**2 / (2 * sigma0**2)
            )
    return total


def row_sizes(params: PyTree, hierarchy: Hierarchy) -> PyTree:
    """d: the number of weights in each row, a tree like ``hierarchy.scales`` (int leaves)."""
    triples, treedef = scaled_leaves(params, hierarchy)
    return jax.tree.unflatten(
        treedef, [None if s is None else leaf.size // leaf.shape[a] for _, leaf, s, a in triples]
    )


def row_sums(values: PyTree, hierarchy: Hierarchy) -> PyTree:
    """Σ_k values_{jk}: the sum of a per-weight tree over each row, a tree like the scales."""
    triples, treedef = scaled_leaves(values, hierarchy)
    return jax.tree.unflatten(
        treedef, [None if s is None else _tree.sum_except(x, a) for _, x, s, a in triples]
    )


def sample_prior(
    key: jax.Array, params: PyTree, noise: Noise, sigma0: ArrayLike = 1.0, where: Where = None
) -> tuple[PyTree, PyTree]:
    """Draws from the marginal prior: λ from the noise per row, w ~ N(0, σ0²), v = λw.

    Args:
        key: a PRNG key.
        params: a tree giving the shapes (its values are ignored).
        noise: the distribution of λ (a :mod:`bayesnoise.noise` distribution).
        sigma0: prior standard deviation of w, a finite number > 0.
        where: which leaves are noised (see :func:`hierarchy`); other leaves are drawn from
            N(0, σ0²) without a scale.

    Returns:
        ``(v_params, lambdas)``: the draw of v and the scales tree of λ that produced it.

    Raises:
        TypeError: ``key`` is not a PRNG key, ``noise`` is not a noise distribution, or
            ``sigma0`` is not a real number.
        ValueError: as :func:`hierarchy`.
    """
    _check.key("key", key)
    check_noise(noise)
    h = hierarchy(params, sigma0, where)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, 2 * len(leaves))
    lam, v = [], []
    for i, (leaf, (_, axis)) in enumerate(zip(leaves, h.axes)):
        w = sigma0 * jax.random.normal(keys[2 * i], leaf.shape)
        if axis is None:
            lam.append(None)
            v.append(w)
            continue
        l_row = noise.sample(keys[2 * i + 1], (leaf.shape[axis],))
        lam.append(l_row)
        v.append(w * _tree.broadcast_rows(l_row, leaf.ndim, axis))
    return jax.tree.unflatten(treedef, v), jax.tree.unflatten(treedef, lam)
