"""Pruning from posterior moments: scores, keep-masks, whole pruning curves, sparse export.

A score says how much a weight is worth keeping; smaller scores are removed first. With the
posterior mean μ and standard deviation σ of every weight (see :mod:`bayesnoise.moments`):

* signal-to-noise, SNR = |μ| / σ (Graves, 2011; Blundell et al., 2015);
* signal-plus-robustness, SPR = |μ| + σ;
* magnitude = |μ|;
* for learned noise (variational dropout), −log α (:func:`log_alpha`), with α the learned
  noise variance of a weight or of its row: an SNR rule, since α = σ² / μ², and the threshold
  rule log α < 3 (:func:`log_alpha_threshold`); :func:`learned_moments` gives μ and σ of
  such a network for the other scores.

A keep-mask for a pruning fraction f keeps the round((1 − f) · n) highest-scoring weights among
the n prunable ones: across all prunable leaves (``scope="global"``) or within each leaf
(``scope="layer"``). Prunable are, by default, the ``kernel`` leaves with at least two axes;
biases and normalisation scales are kept whole unless chosen with ``where`` or
``include_biases``. Ranks are computed once; a mask is then ``rank >= k(f)``, so masks build on
device, under ``jit`` and ``vmap``, with f a traced value. :func:`curve` evaluates a model at
many fractions in one compiled, vmapped call.

Example:
    >>> import jax.numpy as jnp, bayesnoise as bn
    >>> mean = {"kernel": jnp.array([[0.1, -2.0], [0.5, 1.0]]), "bias": jnp.zeros(2)}
    >>> std = {"kernel": jnp.full((2, 2), 0.5), "bias": jnp.ones(2)}
    >>> keep = bn.prune.mask(bn.prune.snr(mean, std), 0.5)
    >>> keep["kernel"], keep["bias"]
    (Array([[False,  True],
           [False,  True]], dtype=bool), Array([ True,  True], dtype=bool))
    >>> bn.prune.apply(mean, keep)["kernel"]
    Array([[ 0., -2.],
           [ 0.,  1.]], dtype=float32)
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import sparse as jsparse
from jax.typing import ArrayLike

from bayesnoise import _check, _tree
from bayesnoise import nn as bnn
from bayesnoise._tree import PyTree, Where

__all__ = [
    "snr",
    "spr",
    "magnitude",
    "log_alpha",
    "learned_moments",
    "log_alpha_threshold",
    "ThresholdMask",
    "mask",
    "apply",
    "sparsity",
    "curve",
    "breakpoint_fraction",
    "breakpoint",
    "masked_updates",
    "IterativeResult",
    "iterative",
    "to_sparse",
    "from_sparse",
    "sparse_dense",
    "stored_bytes",
]

SCOPES = ("global", "layer")


# ---------------------------------------------------------------------------------------------
# Scores


def snr(mean: PyTree, std: PyTree) -> PyTree:
    """Signal-to-noise ratio |μ| / σ per weight.

    A weight with σ = 0 is certain: its score is +inf when μ ≠ 0 (never removed before an
    uncertain weight) and 0 when μ = 0 as well (an exact zero, removed first).

    Args:
        mean: posterior means μ, any pytree of arrays.
        std: posterior standard deviations σ ≥ 0, the same tree as ``mean``.

    Returns:
        A tree like ``mean`` with |μ| / σ in every leaf.

    Raises:
        ValueError: the trees differ in structure or shapes; or, for concrete values, ``mean``
            or ``std`` holds a NaN or infinite entry, or ``std`` a negative one.
    """
    _check_same_tree(mean, std, "mean", "std")
    _check_values(mean, "mean", "posterior means")
    _check_values(std, "std", "posterior standard deviations", nonnegative=True)

    def leaf(m, s):
        a = jnp.abs(m)
        safe = jnp.where(s == 0, 1, s)
        return jnp.where(s == 0, jnp.where(a == 0, 0.0, jnp.inf).astype(a.dtype), a / safe)

    return jax.tree.map(leaf, mean, std)


def spr(mean: PyTree, std: PyTree) -> PyTree:
    """Signal plus robustness |μ| + σ per weight.

    Args:
        mean: posterior means μ, any pytree of arrays.
        std: posterior standard deviations σ ≥ 0, the same tree as ``mean``.

    Returns:
        A tree like ``mean`` with |μ| + σ in every leaf.

    Raises:
        ValueError: as :func:`snr`.
    """
    _check_same_tree(mean, std, "mean", "std")
    _check_values(mean, "mean", "posterior means")
    _check_values(std, "std", "posterior standard deviations", nonnegative=True)
    return jax.tree.map(lambda m, s: jnp.abs(m) + s, mean, std)


def magnitude(mean: PyTree) -> PyTree:
    """Magnitude |μ| per weight (the classic baseline; ``mean`` may be point estimates).

    Raises:
        ValueError: a concrete ``mean`` holds NaN or infinite entries.
    """
    _check_values(mean, "mean", "posterior means or point estimates")
    return jax.tree.map(jnp.abs, mean)


def _check_values(tree: PyTree, name: str, meaning: str, nonnegative: bool = False) -> None:
    """Raises a ValueError naming the first leaf of a concrete ``tree`` with a NaN or infinite
    entry (or, with ``nonnegative``, a negative one); one small transfer for all leaves."""
    flat = [
        (_tree.path_str(p), jnp.asarray(x))
        for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)[0]
        if x is not None
    ]
    if not flat or not _check.concrete([x for _, x in flat]):
        return

    def stats(x):
        bad = ~jnp.isfinite(x)
        first = jnp.ravel(x)[jnp.argmax(jnp.ravel(bad))] if x.size else jnp.zeros(())
        low = jnp.min(jnp.where(bad, jnp.inf, x)) if x.size else jnp.zeros(())
        return jnp.sum(bad), first, jnp.sum(x < 0), low

    with jax.ensure_compile_time_eval():  # concrete leaves closed over inside a jit trace
        found = jax.device_get([stats(x) for _, x in flat])
    for (leaf, x), (n_bad, first, n_neg, low) in zip(flat, found):
        if n_bad:
            raise ValueError(
                f"{name} ({meaning}) must be finite: leaf {leaf!r} of shape {tuple(x.shape)} "
                f"holds {n_bad} NaN or infinite entries (such as {first})."
            )
        if nonnegative and n_neg:
            raise ValueError(
                f"{name} ({meaning}) must be >= 0: leaf {leaf!r} of shape {tuple(x.shape)} "
                f"holds {n_neg} negative entries (the smallest {low})."
            )


def _kernel_tree(params: PyTree, values: dict[str, Any], fill: Callable[[Any], Any]) -> PyTree:
    """A tree like ``params``: ``values[path]`` at the given paths, ``fill(leaf)`` elsewhere."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for path, leaf in flat:
        name = _tree.path_str(path)
        out.append(values[name] if name in values else fill(leaf))
    return jax.tree.unflatten(treedef, out)


def log_alpha(params: PyTree) -> PyTree:
    """Scores −log α per kernel weight of a learned-noise network (higher = kept longer).

    α is the learned noise variance (:func:`bayesnoise.nn.learned_noise`): per weight,
    log α = log σ² − log(θ² + 1e-8); per row, the row's log α shared by its weights. Since
    α = σ² / θ², −log α = 2 log(|θ| / σ) ranks like SNR. The tree has the structure of
    ``params`` (so :func:`mask` and :func:`curve` take it with the same params) and ``None``
    at every leaf that is not a kernel with learned noise: those are not prunable by this rule
    and are kept whole.

    Args:
        params: linen variables or an NNX state with learned noise.

    Returns:
        a tree like ``params``: −log α (kernel-shaped) at noised kernels, None elsewhere.

    Raises:
        ValueError: the params hold no learned noise.

    Example:
        >>> import jax, jax.numpy as jnp, bayesnoise as bn
        >>> model = bn.nn.MLP((8, 2))
        >>> vd = bn.nn.learned_noise(model, per="row")
        >>> params = vd.init(jax.random.key(0), jnp.ones((1, 4)))
        >>> scores = bn.prune.log_alpha(params)
        >>> scores["params"]["Dense_0"]["kernel"].shape, scores["params"]["Dense_0"]["bias"]
        ((4, 8), None)
        >>> keep = bn.prune.mask(scores, 0.5)
    """
    layers = bnn.learned_layers(params, require=True)
    scores = {layer.path: -layer.weight_log_alpha for layer in layers}
    return _kernel_tree(params, scores, lambda _: None)


def learned_moments(params: PyTree) -> tuple[PyTree, PyTree]:
    """The variational mean μ and standard deviation σ of every weight of a learned-noise net.

    Per weight, w ~ N(θ, σ²): μ = θ, σ = exp(½ log σ²). Per row, w_jk = ξ_j θ_jk with
    ξ_j ~ N(1, α_j): μ = θ, σ = √α_j |θ_jk|. Other leaves (biases, the noise parameters
    themselves, kernels without noise) are point estimates: μ the leaf, σ = 0. Feed the pair
    to :func:`snr`, :func:`spr` or :func:`magnitude`; the scores then have the structure of
    ``params``, ready for :func:`mask` and :func:`curve` (which prune kernels only by default).

    Args:
        params: linen variables or an NNX state with learned noise.

    Returns:
        ``(mean, std)``, two trees like ``params``.

    Raises:
        ValueError: the params hold no learned noise.
    """
    layers = bnn.learned_layers(params, require=True)
    std = {layer.path: jnp.sqrt(layer.variance) for layer in layers}
    mean = jax.tree.map(jnp.asarray, params)
    return mean, _kernel_tree(params, std, jnp.zeros_like)


class ThresholdMask(NamedTuple):
    mask: PyTree  # like params: booleans (True = keep) at noised kernels, None elsewhere
    fraction_removed: jax.Array  # shape (): the share of noised kernel weights removed


def log_alpha_threshold(params: PyTree, threshold: float = 3.0) -> ThresholdMask:
    """The sparse variational dropout rule: keep a weight iff log α < ``threshold``.

    log α > 3 means α > e³ ≈ 20: noise with a standard deviation over 4.5 times the weight's
    mean, so SNR = 1/√α < 0.22 (Molchanov et al., 2017). A row's α decides for all its weights.
    Use the mask with :func:`apply` (leaves without noise are kept whole). The pruned network
    is meant to be run as the mean network; a per-weight noisy apply still adds the pruned
    weights' variance σ².

    Args:
        params: linen variables or an NNX state with learned noise.
        threshold: weights whose log α is at or above it are removed; default 3.

    Returns:
        :class:`ThresholdMask` ``(mask, fraction_removed)``; the fraction counts the weights
        of the noised kernels.

    Raises:
        ValueError: the params hold no learned noise, or ``threshold`` is NaN.
        TypeError: ``threshold`` is not a number.
    """
    if not isinstance(threshold, jax.core.Tracer):
        _check.number("threshold", threshold, finite=False)  # ±inf: keep all / none
    layers = bnn.learned_layers(params, require=True)
    keep = {layer.path: layer.weight_log_alpha < threshold for layer in layers}
    removed = sum(jnp.sum(~k) for k in keep.values())
    total = sum(k.size for k in keep.values())
    return ThresholdMask(_kernel_tree(params, keep, lambda _: None), removed / total)


# ---------------------------------------------------------------------------------------------
# Masks


class _Ranking(NamedTuple):
    """Ranks of the prunable weights, computed once; masks for any fraction follow from them."""

    treedef: Any  # static: the scores' tree structure, with None as a leaf
    leaves: tuple  # per leaf: int32 ranks (prunable), the leaf's shape (kept whole) or None
    groups: tuple  # static: per leaf, the index of its group (None when not prunable)
    sizes: tuple  # static: per group, the number n of prunable weights in it


def _is_none(x: Any) -> bool:
    return x is None


def _prunable(name: str, leaf: Any, where: Where, include_biases: bool) -> bool:
    is_bias = include_biases and name.rsplit("/", 1)[-1] == "bias"
    if where is None:
        return _tree.rows_of(name, leaf) is not None or is_bias
    if isinstance(where, str):
        return re.search(where, name) is not None or is_bias
    _tree.check_where(where)
    choice = _tree.call_where(where, name, leaf)
    return (choice is not None and choice is not False) or is_bias


def _chosen(flat: list, where: Where, include_biases: bool, batched: bool = False) -> list[bool]:
    """Whether each (path, leaf) of a flattened scores tree is prunable (``batched``: leaves
    carry a leading seed axis, and are chosen from their per-seed shapes)."""
    _tree.check_where(where)
    out = []
    for path, leaf in flat:
        if leaf is not None and batched:
            leaf = jax.ShapeDtypeStruct(jnp.shape(leaf)[1:], jnp.result_type(leaf))
        name = _tree.path_str(path)
        out.append(leaf is not None and _prunable(name, leaf, where, include_biases))
    return out


def _check_chosen(flat: list, chosen: list[bool], where: Where) -> None:
    if not any(chosen):
        raise _tree.nothing_chosen(
            where,
            "scores",
            [_tree.path_str(p) for p, _ in flat],
            "prunable",
            "By default only 'kernel' leaves with at least two axes are; pass `where` (a "
            "regular expression on the path or a predicate) or include_biases=True to choose "
            "more.",
        )


def _check_scores(flat: list, chosen: list[bool]) -> None:
    """Raises a ValueError naming the first prunable leaf that holds a NaN score (concrete
    scores only; one small transfer for all leaves)."""
    leaves = [(_tree.path_str(p), x) for (p, x), c in zip(flat, chosen) if c]
    if not leaves or not _check.concrete([x for _, x in leaves]):
        return
    with jax.ensure_compile_time_eval():  # concrete leaves closed over inside a jit trace
        nans = np.asarray(jax.device_get([jnp.sum(jnp.isnan(jnp.asarray(x))) for _, x in leaves]))
    if nans.any():
        i = int(np.flatnonzero(nans)[0])
        name, x = leaves[i]
        raise ValueError(
            f"scores must not be NaN: leaf {name!r} of shape {jnp.shape(x)} holds {nans[i]} NaN "
            f"scores. Allowed: numbers (+inf is kept longest); a NaN score usually comes from "
            f"NaN posterior moments (check the mean and std given to snr or spr)."
        )


def _check_scope(scope: Any) -> None:
    if scope not in SCOPES:
        raise ValueError(
            f"scope must be one of {SCOPES}: 'global' ranks all prunable weights together, "
            f"'layer' ranks each leaf on its own; got {scope!r}."
        )


def _check_fraction(fraction: Any, name: str = "fraction") -> None:
    if isinstance(fraction, jax.core.Tracer):
        return
    f = np.asarray(fraction)
    if not np.issubdtype(f.dtype, np.number) or not np.all((f >= 0) & (f <= 1)):
        raise ValueError(
            f"{name} must be in [0, 1] (the share of prunable weights removed); got {fraction!r}."
        )


def _ranking(scores: PyTree, scope: str, where: Where, include_biases: bool) -> _Ranking:
    """Ranks every prunable weight: rank 0 is removed first.

    The order is a stable argsort of the scores, so among equal scores the weight that comes
    first in flattening order (leaf order of ``jax.tree.flatten``, then row-major within a
    leaf) is removed first.
    """
    _check_scope(scope)
    flat, treedef = jax.tree_util.tree_flatten_with_path(scores, is_leaf=_is_none)
    chosen = _chosen(flat, where, include_biases)
    _check_chosen(flat, chosen, where)
    prunable = [jnp.asarray(leaf) for (_, leaf), c in zip(flat, chosen) if c]
    _check_scores(flat, chosen)
    dtype = jnp.result_type(*prunable)
    if scope == "global":
        values = jnp.concatenate([s.astype(dtype).ravel() for s in prunable])
        ranked_flat = _ranks(values)
        offsets = np.cumsum([0] + [s.size for s in prunable])
        ranked = [
            ranked_flat[a:b].reshape(s.shape) for a, b, s in zip(offsets, offsets[1:], prunable)
        ]
        sizes = (int(offsets[-1]),)
    else:
        ranked = [_ranks(s.ravel()).reshape(s.shape) for s in prunable]
        sizes = tuple(int(s.size) for s in prunable)
    leaves, groups, i = [], [], 0
    for (_, leaf), c in zip(flat, chosen):
        if c:
            leaves.append(ranked[i])
            groups.append(0 if scope == "global" else i)
            i += 1
        else:
            leaves.append(None if leaf is None else tuple(jnp.shape(leaf)))
            groups.append(None)
    return _Ranking(treedef, tuple(leaves), tuple(groups), sizes)


def _ranks(values: jax.Array) -> jax.Array:
    """The position of every entry in a stable ascending sort (0 = smallest)."""
    n = values.shape[0]
    order = jnp.argsort(values, stable=True)
    return jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))


def _num_kept(fraction: ArrayLike, n: int) -> jax.Array:
    """round((1 − f) · n), half to even, in the default float dtype, f clipped to [0, 1]."""
    f = jnp.clip(jnp.asarray(fraction, jnp.result_type(float)), 0, 1)
    return jnp.round((1 - f) * n).astype(jnp.int32)


def _mask_from_ranking(ranking: _Ranking, fraction: ArrayLike) -> PyTree:
    removed = [n - _num_kept(fraction, n) for n in ranking.sizes]
    out = []
    for leaf, g in zip(ranking.leaves, ranking.groups):
        if g is not None:
            out.append(leaf >= removed[g])
        elif leaf is None:
            out.append(None)
        else:
            out.append(jnp.ones(leaf, bool))
    return jax.tree.unflatten(ranking.treedef, out)


def mask(
    scores: PyTree,
    fraction: ArrayLike,
    scope: str = "global",
    *,
    where: Where = None,
    include_biases: bool = False,
) -> PyTree:
    """Boolean keep-masks that remove the lowest-scoring share ``fraction`` of the weights.

    Among the n prunable weights of a scope (all prunable leaves together for ``"global"``,
    each prunable leaf for ``"layer"``), the mask keeps exactly

        kept = round((1 − f) · n)    (half to even, computed in the default float dtype)

    weights: those of rank ≥ n − kept in a stable ascending sort of the scores. So a kept
    weight never scores lower than a removed one, and ties are broken deterministically: among
    equal scores, the weight first in flattening order (leaves in ``jax.tree.flatten`` order,
    row-major within a leaf) is removed first. Concrete scores must not be NaN; under ``jit``
    they are not checked, and NaN scores sort last (kept longest).

    The function is jit- and vmap-able with ``fraction`` traced (then clipped to [0, 1]).

    Args:
        scores: a pytree of score arrays (:func:`snr`, :func:`spr`, :func:`magnitude`), smaller
            = removed first; ``None`` leaves stay ``None``.
        fraction: the share f in [0, 1] of prunable weights to remove.
        scope: ``"global"`` or ``"layer"``.
        where: which leaves are prunable. ``None``: ``kernel`` leaves with at least two axes.
            A string: a regular expression searched in the leaf path (``"Dense_0/kernel"``).
            A callable ``(path, leaf)`` returning a truthy value (True or an axis) to prune.
        include_biases: also prune leaves named ``bias``.

    Returns:
        A tree like ``scores`` of boolean arrays, True = keep; leaves that are not prunable are
        all True.

    Raises:
        ValueError: if a concrete ``fraction`` lies outside [0, 1], ``scope`` is unknown, no
            leaf is prunable (the message shows ``where``), or a concrete prunable score is NaN.
        TypeError: ``where`` is not None, a string or a callable.

    Example:
        >>> import jax, jax.numpy as jnp, bayesnoise as bn
        >>> scores = {"a": {"kernel": jnp.array([[3.0, 1.0], [2.0, 1.0]])}}
        >>> jax.jit(bn.prune.mask)(scores, 0.5)["a"]["kernel"]
        Array([[ True, False],
               [ True, False]], dtype=bool)
    """
    _check_fraction(fraction)
    return _mask_from_ranking(_ranking(scores, scope, where, include_biases), fraction)


def _check_same_tree(a: PyTree, b: PyTree, a_name: str, b_name: str, shapes: bool = True) -> None:
    """Raises a ValueError naming the first path or shape where two trees differ."""
    fa = jax.tree_util.tree_flatten_with_path(a, is_leaf=_is_none)[0]
    fb = jax.tree_util.tree_flatten_with_path(b, is_leaf=_is_none)[0]
    pa = [_tree.path_str(p) for p, _ in fa]
    pb = [_tree.path_str(p) for p, _ in fb]
    if pa != pb:
        only_a = [p for p in pa if p not in set(pb)]
        only_b = [p for p in pb if p not in set(pa)]
        raise ValueError(
            f"the {b_name} tree does not match the {a_name} tree: {len(pb)} leaves against "
            f"{len(pa)}; only in {a_name}: {only_a[:5]}, only in {b_name}: {only_b[:5]}. "
            f"{b_name.capitalize()} need the structure of {a_name}."
        )
    if not shapes:
        return
    for name, (_, x), (_, y) in zip(pa, fa, fb):
        if x is None or y is None:
            continue
        if jnp.shape(x) != jnp.shape(y):
            raise ValueError(
                f"leaf {name!r} has shape {jnp.shape(y)} in {b_name} but {jnp.shape(x)} in "
                f"{a_name}; they must be equal."
            )


def apply(params: PyTree, mask: PyTree) -> PyTree:
    """Pruned params: w ⊙ m, every weight whose mask entry is False set to exactly 0.

    Args:
        params: any pytree of arrays.
        mask: boolean keep-masks keyed by the same paths as ``params``; a mask leaf may have a
            shape that broadcasts to its parameter's (a row mask, say). A ``None`` entry, or a
            path missing from ``mask``, keeps that leaf whole.

    Returns:
        A tree like ``params``.

    Raises:
        ValueError: if ``mask`` has a path that ``params`` lacks, or a mask leaf's shape does
            not broadcast to its parameter's.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    by_path = {
        _tree.path_str(p): m
        for p, m in jax.tree_util.tree_flatten_with_path(mask, is_leaf=_is_none)[0]
    }
    names = [_tree.path_str(p) for p, _ in flat]
    extra = sorted(set(by_path) - set(names))
    if extra:
        raise ValueError(
            f"the mask tree does not match the params tree: mask paths {extra[:5]} are not in "
            f"params (params paths: {names[:8]}). A mask needs the params' paths."
        )
    out = []
    for name, (_, w) in zip(names, flat):
        m = by_path.get(name)
        if m is None:
            out.append(w)
            continue
        w = jnp.asarray(w)
        m = jnp.asarray(m)
        try:
            ok = jnp.broadcast_shapes(m.shape, w.shape) == w.shape
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"the mask of leaf {name!r} has shape {m.shape}, which does not broadcast to the "
                f"leaf's shape {w.shape}: a mask leaf must have its parameter's shape, or one "
                f"that broadcasts to it (such as a row mask), or be None."
            )
        out.append(jnp.where(m, w, jnp.zeros((), w.dtype)))
    return jax.tree.unflatten(treedef, out)


def sparsity(tree: PyTree) -> dict[str, dict[str, float]]:
    """Accounting of kept and removed weights, per leaf and in total (on the host).

    For a mask (boolean leaves) an entry counts True as kept; for params (any other dtype) it
    counts nonzeros as kept. ``None`` leaves are skipped.

    Args:
        tree: a keep-mask tree (:func:`mask`) or a params tree (:func:`apply`'s output).

    Returns:
        ``{path: {"kept": int, "total": int, "removed_fraction": float}}`` with one entry per
        leaf, keyed by its readable path (``"params/Dense_0/kernel"``), plus the entry
        ``"total"`` summed over all leaves. ``removed_fraction = 1 − kept / total``.
    """
    out: dict[str, dict[str, float]] = {}
    kept_all, total_all = 0, 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)[0]:
        if leaf is None:
            continue
        x = np.asarray(leaf)
        kept = int(np.count_nonzero(x))
        total = int(x.size)
        out[_tree.path_str(path)] = _account(kept, total)
        kept_all += kept
        total_all += total
    out["total"] = _account(kept_all, total_all)
    return out


def _account(kept: int, total: int) -> dict[str, float]:
    return {
        "kept": kept,
        "total": total,
        "removed_fraction": 1.0 - kept / total if total else 0.0,
    }


# ---------------------------------------------------------------------------------------------
# Curves


def curve(
    eval_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    scores: PyTree,
    fractions: ArrayLike,
    scope: str = "global",
    *,
    where: Where = None,
    include_biases: bool = False,
    batched: bool = False,
    chunk_size: int | None = None,
) -> jax.Array:
    """``eval_fn(apply(params, mask(scores, f)))`` at every fraction f, in one compiled call.

    The scores are ranked once; the masks are built on device inside a ``jax.vmap`` over the
    fractions (``rank >= k(f)``), so there is no Python loop and no sort per fraction. The
    whole evaluation is one ``jax.jit`` computation, cached on ``eval_fn`` (by hash and
    equality; an unhashable callable compiles anew on every call): pass the same function
    object to reuse the compilation, and pass data through a closure.

    Memory: the vmap holds one pruned copy of the params and of ``eval_fn``'s intermediates
    per fraction (100 fractions of a 784-400-400-10 MLP: 100 × 0.48M weights, 190 MB, plus
    100 × the activations). ``chunk_size`` bounds that: the fractions are then evaluated
    ``chunk_size`` at a time (``jax.lax.map`` with ``batch_size``), still in one compiled call.

    Args:
        eval_fn: params -> metric (a scalar, or any pytree of arrays), traceable by JAX.
        params: the params to prune (posterior means, typically).
        scores: scores with the structure and shapes of ``params``.
        fractions: a 1-D array of fractions in [0, 1].
        scope: ``"global"`` or ``"layer"`` (see :func:`mask`).
        where: which leaves are prunable (see :func:`mask`).
        include_biases: also prune leaves named ``bias``.
        batched: ``params`` and ``scores`` carry a leading axis (seeds or chains), evaluated
            at once for error bars; leaves are chosen from their per-seed shapes.
        chunk_size: evaluate this many fractions at a time; ``None`` vmaps over all.

    Returns:
        An array of shape ``(len(fractions),)``, or ``(n_seeds, len(fractions))`` when
        ``batched`` (with trailing axes if ``eval_fn`` returns arrays).

    Raises:
        ValueError: on fractions outside [0, 1], not 1-D or empty, an unknown ``scope``, scores
            that do not match the params, NaN scores, no prunable leaf, unequal leading axes
            when ``batched``, or a bad ``chunk_size``.
        TypeError: ``eval_fn`` is not callable, or ``where`` is not None, a string or a
            callable.

    Example:
        >>> import jax.numpy as jnp, bayesnoise as bn
        >>> params = {"kernel": jnp.array([[1.0, -2.0], [3.0, 0.5]])}
        >>> count = lambda p: jnp.count_nonzero(p["kernel"])
        >>> bn.prune.curve(count, params, bn.prune.magnitude(params), jnp.array([0, 0.5, 1]))
        Array([4, 2, 0], dtype=int32)
    """
    if not callable(eval_fn):
        raise TypeError(f"eval_fn must be a callable params -> metric, got {eval_fn!r}.")
    _check_scope(scope)
    _tree.check_where(where)
    _check_same_tree(params, scores, "params", "scores")
    fractions = fractions if isinstance(fractions, jax.core.Tracer) else jnp.asarray(fractions)
    if fractions.ndim != 1:
        raise ValueError(f"fractions must be a 1-D array; got shape {fractions.shape}.")
    if fractions.shape[0] == 0:
        raise ValueError("fractions must hold at least one fraction; got an empty array [].")
    _check_fraction(fractions, "every fraction")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or a positive int; got {chunk_size!r}.")
    if batched:
        sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(params)}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(
                f"batched=True needs a common leading (seed) axis on every leaf of params and "
                f"scores; got leading sizes {sorted(sizes, key=str)}."
            )
    # the checks _ranking makes outside jit: some leaf prunable, no NaN score
    flat = jax.tree_util.tree_flatten_with_path(scores, is_leaf=_is_none)[0]
    chosen = _chosen(flat, where, include_biases, batched=bool(batched))
    _check_chosen(flat, chosen, where)
    _check_scores(flat, chosen)
    try:
        hash(eval_fn)
    except TypeError:  # jit needs a hashable static argument: compare by identity instead
        eval_fn = _ByIdentity(eval_fn)
    return _curve(eval_fn, params, scores, fractions, scope, where, include_biases, batched,
                  chunk_size)  # fmt: skip


class _ByIdentity:
    """Wraps an unhashable callable so that it can be a static argument of jit."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7, 8))
def _curve(eval_fn, params, scores, fractions, scope, where, include_biases, batched, chunk_size):
    def one(p, s):
        ranking = _ranking(s, scope, where, include_biases)

        def at(f):
            return eval_fn(apply(p, _mask_from_ranking(ranking, f)))

        if chunk_size is None:
            return jax.vmap(at)(fractions)
        return jax.lax.map(at, fractions, batch_size=chunk_size)

    return jax.vmap(one)(params, scores) if batched else one(params, scores)


def breakpoint_fraction(
    fractions: ArrayLike,
    metric: ArrayLike,
    unpruned: float,
    tolerance: float = 0.01,
    relative: bool = False,
) -> float:
    """The largest fraction up to which the curve stays within tolerance of the unpruned model.

    With the fractions in ascending order, a point is within tolerance when::

        metric ≤ unpruned + tolerance              (absolute: +0.01 = one percentage point of
                                                    an error rate in [0, 1])
        metric ≤ unpruned · (1 + tolerance)        (relative: +1% RMSE)

    up to float rounding (a relative slack of 1e-6). The breakpoint is the last fraction of the
    longest prefix of points within tolerance: the curve before its first failure, so a noisy
    recovery after a failure does not count. Lower metrics are better (error, RMSE); NaN fails.

    Args:
        fractions: 1-D fractions (sorted here; ties keep their order).
        metric: the metric at every fraction, the same length.
        unpruned: the metric of the unpruned model.
        tolerance: the allowed increase, ≥ 0; default 0.01.
        relative: whether ``tolerance`` is relative to ``unpruned``.

    Returns:
        The breakpoint, a float; 0.0 when the smallest fraction already fails.

    Raises:
        ValueError: on arrays of different lengths, not 1-D or empty, fractions outside
            [0, 1] (or NaN), or a tolerance that is negative or not finite.
        TypeError: an argument that is not a number (or an array of them).

    Example:
        >>> import bayesnoise as bn
        >>> bn.prune.breakpoint_fraction([0.0, 0.5, 0.8, 0.9], [0.02, 0.025, 0.04, 0.028], 0.02)
        0.5
    """
    _check.number("fractions", fractions, lo=0.0, hi=1.0, array=True)
    _check.number("tolerance", tolerance, lo=0.0)
    # NaN is a metric value (it fails the tolerance): only the types are checked
    if not _is_real(metric):
        raise TypeError(f"metric must be a 1-D array of numbers, got {metric!r}.")
    if not _is_real(unpruned) or np.ndim(unpruned) != 0:
        raise TypeError(
            f"unpruned must be a number (the unpruned model's metric), got {unpruned!r}."
        )
    f = np.asarray(fractions, np.float64)
    m = np.asarray(metric, np.float64)
    if f.ndim != 1 or f.shape != m.shape or f.size == 0:
        raise ValueError(
            f"fractions and metric must be 1-D of equal length >= 1; got shapes {f.shape} and "
            f"{m.shape}."
        )
    unpruned = float(unpruned)
    limit = unpruned * (1 + tolerance) if relative else unpruned + tolerance
    order = np.argsort(f, kind="stable")
    f, m = f[order], m[order]
    slack = 1e-6 * max(abs(limit), abs(unpruned), np.finfo(np.float32).tiny)
    ok = m <= limit + slack  # NaN compares False
    failed = np.flatnonzero(~ok)
    last = len(f) if failed.size == 0 else int(failed[0])
    return float(f[last - 1]) if last > 0 else 0.0


def _is_real(value: Any) -> bool:
    """Whether ``value`` is a real number or an array of them (NaN included; no bools)."""
    if value is None or isinstance(value, (bool, np.bool_, str, bytes)):
        return False
    try:
        return np.asarray(value).dtype.kind in "iuf"
    except Exception:  # an object NumPy cannot read as an array
        return False


# ---------------------------------------------------------------------------------------------
# Fine-tuning with a fixed mask


class _NonzeroMaskState(NamedTuple):
    """The state of ``masked_updates("nonzero")``: the keep-mask read from the params at init."""

    keep: PyTree  # bool per weight of every leaf with two or more axes; None elsewhere


def masked_updates(mask: PyTree | str) -> optax.GradientTransformation:
    """An optax transform that zeroes the updates of pruned weights: u ← u ⊙ m.

    Chain it last, after the optimizer (and after any weight decay), so pruned weights that
    start at zero stay exactly zero while the kept ones are fine-tuned:

        optax.chain(optax.adam(1e-3), bn.prune.masked_updates(mask))

    Unlike ``optax.masked``, which leaves the updates outside its mask untouched, this sets
    them to zero. Start from ``apply(params, mask)``.

    With ``mask="nonzero"`` the mask is read from the params at ``init``: in every leaf of two or
    more axes (the kernels) the weights that are exactly zero stay zero, and other leaves update
    freely. The mask then lives in the transform's state, so one transform (and one compiled
    training loop) serves every mask, e.g. the rounds of :func:`iterative`; start from
    ``apply(params, mask)`` as before.

    Args:
        mask: keep-masks as for :func:`apply` (``None`` or a missing path: update freely), or
            ``"nonzero"``.

    Returns:
        An ``optax.GradientTransformation``: with an empty state, or for ``"nonzero"`` one that
        holds the mask.

    Raises:
        ValueError: ``mask`` is a string other than ``"nonzero"``; at ``init``, a mask that does
            not fit the params.
    """
    if isinstance(mask, str):
        if mask != "nonzero":
            raise ValueError(
                f"mask must be a tree of keep-masks (as for bn.prune.apply) or the string "
                f"'nonzero', got {mask!r}."
            )

        def init_nonzero(params):
            keep = jax.tree.map(lambda p: p != 0 if jnp.ndim(p) >= 2 else None, params)
            return _NonzeroMaskState(keep)

        def update_nonzero(updates, state, params=None):
            del params
            return apply(updates, state.keep), state

        return optax.GradientTransformation(init_nonzero, update_nonzero)

    def init_fn(params):
        apply(params, mask)  # checks that the mask fits
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return apply(updates, mask), state

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# Sparse export


class IterativeResult(NamedTuple):
    """The rounds of :func:`iterative`, one entry per fraction."""

    fractions: tuple[float, ...]  # the share removed after each round, ascending
    params: list  # the retrained network of every round (pruned weights exactly zero)
    masks: list  # its keep-mask (each round's kept weights a subset of the round before's)
    history: list[dict]  # eval_fn of every round's retrained network ({} without one)


def iterative(
    key: jax.Array,
    params: PyTree,
    score_fn: Callable[[PyTree], PyTree],
    fractions: Any,
    retrain: Callable[[jax.Array, PyTree, PyTree], PyTree],
    *,
    scope: str = "global",
    where: Where = None,
    include_biases: bool = False,
    eval_fn: Callable[[PyTree], dict] | None = None,
) -> IterativeResult:
    """Iterative pruning with retraining (Han et al., 2015): prune, retrain, prune further, ...

    Round i scores the current network, ``score_fn(params_i)``, removes the lowest-scoring
    weights until the share ``fractions[i]`` of the prunable weights is gone (weights removed in
    an earlier round stay removed: their score counts as −inf), and retrains the kept weights
    with ``retrain(key_i, pruned, mask)``, which must keep the removed weights at zero (e.g.
    ``optax.chain(opt, masked_updates(mask))`` from :func:`apply`'s output). Each round so starts
    from the weights the last one retrained, and a weight that became small in retraining is
    removed next. Scores of a posterior (:func:`snr`, :func:`spr`) read the retrained weights
    as μ with the σ given, e.g. ``lambda p: snr(p, std)``.

    Args:
        key: PRNG key; round i gets ``jax.random.fold_in(key, i)``.
        params: the trained network.
        score_fn: params -> a score tree (:func:`magnitude`, or a closure over σ).
        fractions: strictly increasing shares in (0, 1], the share removed after each round.
        retrain: ``(key, params, mask) -> params``, the retraining of the kept weights.
        scope, where, include_biases: as in :func:`mask`.
        eval_fn: params -> a dict of figures recorded after each round (e.g. validation and
            test error).

    Returns:
        An :class:`IterativeResult`.

    Raises:
        ValueError: ``fractions`` empty, not strictly increasing or outside (0, 1]; and as
            :func:`mask`.
        TypeError: ``score_fn``, ``retrain`` or ``eval_fn`` is not callable; ``key`` is not a
            PRNG key.

    Example:
        >>> import jax, jax.numpy as jnp, bayesnoise as bn
        >>> w = {"kernel": jnp.arange(1.0, 9.0).reshape(2, 4)}
        >>> res = bn.prune.iterative(jax.random.key(0), w, bn.prune.magnitude, [0.5, 0.75],
        ...                          lambda k, p, m: p)
        >>> res.params[-1]["kernel"]
        Array([[0., 0., 0., 0.],
               [0., 0., 7., 8.]], dtype=float32)

    References:
        Han, S., Pool, J., Tran, J. & Dally, W. (2015). Learning both weights and connections
        for efficient neural networks. NeurIPS.
    """
    _check.key("key", key)
    _check.function("score_fn", score_fn, "params -> scores (a tree like params)")
    _check.function("retrain", retrain, "(key, params, mask) -> params")
    if eval_fn is not None:
        _check.function("eval_fn", eval_fn, "params -> a dict of figures")
    f = np.asarray(fractions, np.float64).ravel() if _is_real(fractions) else None
    if f is None or f.size == 0 or not np.all((f > 0) & (f <= 1)) or np.any(np.diff(f) <= 0):
        raise ValueError(
            f"fractions must be a non-empty, strictly increasing list of shares in (0, 1], got "
            f"{fractions!r}."
        )
    _check_scope(scope)
    out = IterativeResult(tuple(float(x) for x in f), [], [], [])
    current, keep = params, None
    for i, fraction in enumerate(out.fractions):
        scores = score_fn(current)
        if keep is not None:  # removed weights stay removed
            scores = jax.tree.map(
                lambda s, k: s if s is None or k is None else jnp.where(k, s, -jnp.inf),
                scores,
                keep,
                is_leaf=_is_none,
            )
        keep = mask(scores, fraction, scope, where=where, include_biases=include_biases)
        current = retrain(jax.random.fold_in(key, i), apply(current, keep), keep)
        out.params.append(current)
        out.masks.append(keep)
        out.history.append({} if eval_fn is None else dict(eval_fn(current)))
    return out


def to_sparse(
    params: PyTree, mask: PyTree, *, index_dtype: Any = None, always: bool = False
) -> PyTree:
    """Pruned params with masked kernels stored as BCOO arrays where that takes fewer bytes.

    A masked leaf of two or more axes becomes ``jax.experimental.sparse.BCOO`` holding the kept
    weights only (``data``) and their coordinates (``indices``, one row of ``ndim`` integers
    per kept weight). Per kept weight that costs itemsize + ndim · index itemsize bytes (8 for
    a float32 matrix with int16 indices), against itemsize per weight dense, so by default a
    leaf is stored sparse only where that is smaller: for a float32 matrix with int16 indices,
    once more than half of its weights are removed; from there its size shrinks linearly with
    the fraction removed. Other masked leaves are pruned densely; leaves without a mask are
    kept as they are.

    Runs on the host (the number of kept weights sets the shapes); not jit-able.

    Args:
        params: the params.
        mask: keep-masks (:func:`mask`).
        index_dtype: the integer dtype of the indices; by default the smallest of int8, int16,
            int32 that holds every coordinate.
        always: store every masked leaf of two or more axes as BCOO, even where the dense
            array is smaller.

    Returns:
        A tree like ``params`` whose pruned kernels are BCOO arrays. Use :func:`sparse_dense`
        for x @ W with such a kernel, :func:`from_sparse` to get dense params back, and
        :func:`stored_bytes` for the size.

    Raises:
        ValueError: the mask does not fit the params (see :func:`apply`), or ``index_dtype``
            cannot hold every coordinate of a leaf stored sparse.
        TypeError: ``index_dtype`` is not an integer dtype.
    """
    if index_dtype is not None:
        try:
            kind = np.dtype(index_dtype).kind
        except TypeError:
            kind = None
        if kind not in ("i", "u"):
            raise TypeError(
                f"index_dtype must be None or an integer dtype such as np.int16, got "
                f"{index_dtype!r}."
            )
    pruned = apply(params, mask)
    by_path = {
        _tree.path_str(p): m
        for p, m in jax.tree_util.tree_flatten_with_path(mask, is_leaf=_is_none)[0]
    }
    flat, treedef = jax.tree_util.tree_flatten_with_path(pruned)
    out = []
    for path, w in flat:
        m = by_path.get(_tree.path_str(path))
        if m is None or jnp.ndim(w) < 2:
            out.append(w)
            continue
        w = np.asarray(w)
        keep = np.broadcast_to(np.asarray(m, bool), w.shape)
        dtype = np.dtype(index_dtype or _smallest_int(max(w.shape)))
        if max(w.shape) - 1 > np.iinfo(dtype).max:
            raise ValueError(
                f"index_dtype={dtype.name} cannot hold the coordinates of leaf "
                f"{_tree.path_str(path)!r} of shape {w.shape}: it must be an integer dtype "
                f"that reaches {max(w.shape) - 1} (None chooses the smallest that does)."
            )
        kept = int(keep.sum())
        if not always and kept * (w.itemsize + w.ndim * dtype.itemsize) >= w.nbytes:
            out.append(jnp.asarray(w))
            continue
        indices = np.argwhere(keep).astype(dtype)
        out.append(jsparse.BCOO((jnp.asarray(w[keep]), jnp.asarray(indices)), shape=w.shape))
    return jax.tree.unflatten(treedef, out)


def _smallest_int(size: int) -> Any:
    for dtype in (np.int8, np.int16, np.int32):
        if size - 1 <= np.iinfo(dtype).max:
            return dtype
    return np.int64


def _is_sparse(x: Any) -> bool:
    return isinstance(x, jsparse.JAXSparse)


def from_sparse(tree: PyTree) -> PyTree:
    """Dense arrays again: every BCOO leaf of ``tree`` replaced by its ``todense()``."""
    return jax.tree.map(lambda x: x.todense() if _is_sparse(x) else x, tree, is_leaf=_is_sparse)


def sparse_dense(x: ArrayLike, kernel: jax.Array | jsparse.BCOO) -> jax.Array:
    """x @ W for a dense or BCOO kernel W of shape (in, out): a Dense layer without its bias.

    For a BCOO kernel this is a sparse-dense product, computed as (Wᵀ xᵀ)ᵀ, whose cost scales
    with the number of kept weights. Works under jit.

    Args:
        x: inputs of shape (..., in).
        kernel: a dense array or a BCOO matrix of shape (in, out).

    Returns:
        An array of shape (..., out).

    Raises:
        ValueError: ``kernel`` is not 2-D, or ``x``'s last axis is not its first.
    """
    x = jnp.asarray(x)
    if jnp.ndim(kernel) != 2 or x.ndim < 1 or x.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"sparse_dense(x, kernel): kernel must have shape (in, out) and x shape (..., in); "
            f"got x of shape {tuple(x.shape)} and kernel of shape "
            f"{tuple(jnp.shape(kernel))}."
        )
    if not _is_sparse(kernel):
        return x @ kernel
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    return (kernel.T @ flat.T).T.reshape(lead + (kernel.shape[-1],))


def stored_bytes(tree: PyTree) -> int:
    """Bytes needed to store ``tree``: nbytes of dense leaves, data + indices of BCOO leaves."""
    total = 0
    for leaf in jax.tree.leaves(tree, is_leaf=_is_sparse):
        if _is_sparse(leaf):
            total += int(leaf.data.nbytes) + int(leaf.indices.nbytes)
        else:
            total += int(np.asarray(leaf).nbytes)
    return total


def breakpoint(*args, **kwargs) -> float:  # noqa: A001
    """Deprecated alias of :func:`breakpoint_fraction` (the name shadowed a builtin)."""
    import warnings

    warnings.warn(
        "bn.prune.breakpoint is renamed bn.prune.breakpoint_fraction; the old name goes in the "
        "next release.",
        DeprecationWarning,
        stacklevel=2,
    )
    return breakpoint_fraction(*args, **kwargs)
