"""Private pytree helpers: leaf paths as strings, and which axis of a leaf indexes input rows."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any, Union

import jax

PyTree = Any
# `Where` chooses leaves or layers, the same way everywhere (bn.gsm, bn.prune, bn.inference,
# bn.nn). None: the default rule (kernels with at least two axes). A string: a regular
# expression searched in the path ("params/Dense_0/kernel"). A predicate `where(path)` or
# `where(path, leaf)` returning True (chosen, default axis), False/None (not chosen) or, where
# rows are chosen, an int (that axis indexes the rows). In `bn.nn`, which chooses layers before
# their parameters exist, a two-argument predicate gets leaf=None.
Where = Union[None, str, Callable[[str], Any], Callable[[str, Any], bool | int | None]]


def call_where(where: Callable, path: str, leaf: Any) -> Any:
    """``where(path, leaf)``, or ``where(path)`` for a one-argument predicate."""
    try:
        params = inspect.signature(where).parameters.values()
    except (TypeError, ValueError):
        return where(path, leaf)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
    if len(positional) == 1 and not varargs:
        return where(path)
    return where(path, leaf)


def matches(where: Where, path: str, leaf: Any) -> bool:
    """Whether ``where`` chooses ``path``: None chooses everything offered."""
    if where is None:
        return True
    check_where(where)
    if isinstance(where, str):
        return re.search(where, path) is not None
    choice = call_where(where, path, leaf)
    return choice is not None and choice is not False


def check_where(where: Any) -> None:
    """Checks ``where`` is None, a valid regular expression or a callable.

    Raises:
        TypeError: anything else.
        ValueError: a string that is not a regular expression.
    """
    if where is not None and not isinstance(where, str) and not callable(where):
        raise TypeError(
            f"where must be None, a regular expression string, or a predicate where(path) or "
            f"where(path, leaf); got {type(where).__name__}: {where!r}."
        )
    if isinstance(where, str):
        try:
            re.compile(where)
        except re.error as err:
            raise ValueError(
                f"where={where!r} is not a valid regular expression ({err}); it must be a "
                f"regular expression searched in the leaf paths, such as 'Dense_0/kernel'."
            ) from None


def nothing_chosen(where: Where, tree_name: str, paths: list[str], chosen: str, hint: str):
    """The ValueError for a ``where`` that chooses no leaf of a tree, showing ``where``.

    Args:
        where: the value given (None: the default rule).
        tree_name: the tree searched, e.g. "params".
        paths: every leaf path of that tree.
        chosen: what a chosen leaf is, e.g. "noised" or "prunable".
        hint: what to do, for the default rule (``where=None``).
    """
    shown = ", ".join(paths[:8]) or "(no leaves)"
    if len(paths) > 8:
        shown += f", ... ({len(paths)} leaves)"
    if where is None:
        return ValueError(f"no leaf of the {tree_name} tree is {chosen} (leaves: {shown}). {hint}")
    what = "regular expression" if isinstance(where, str) else "predicate"
    return ValueError(
        f"no leaf of the {tree_name} tree is {chosen}: where={where!r} matches none of its leaf "
        f"paths ({shown}). where must be a {what} that chooses at least one leaf: a regular "
        f"expression found in a path (such as 'Dense_0/kernel'), or a predicate returning True "
        f"(or a row axis) for some leaf."
    )


def path_str(path: tuple) -> str:
    """A readable path such as ``params/Dense_0/kernel`` (an NNX trailing ``.value`` dropped)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name == "value":
                continue
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def rows_of(path: str, leaf: Any) -> int | None:
    """The axis of ``leaf`` that indexes input units, or None when the leaf is not noised.

    A Dense kernel (in, out) has its rows on axis 0; a Conv kernel (..., in, out) on axis -2.
    Biases, scales of normalisation layers and embeddings are not noised.
    """
    name = path.rsplit("/", 1)[-1]
    if name == "kernel" and getattr(leaf, "ndim", 0) >= 2:
        return leaf.ndim - 2
    return None


def row_axes(params: PyTree, where: Where = None) -> list[tuple[str, int | None]]:
    """(path, row axis or None) for every leaf of ``params``, in flattening order."""
    check_where(where)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    out = []
    for p, leaf in leaves:
        name = path_str(p)
        out.append((name, _choose(name, leaf, where)))
    return out


def _choose(name: str, leaf: Any, where: Where) -> int | None:
    if where is None:
        return rows_of(name, leaf)
    if isinstance(where, str):
        if re.search(where, name) is None:
            return None
        axis = rows_of(name, leaf)
        if axis is None:
            axis = fallback_axis(name, leaf)
        return axis
    check_where(where)
    choice = call_where(where, name, leaf)
    if choice is None or choice is False:
        return None
    if choice is True:
        axis = rows_of(name, leaf)
        return fallback_axis(name, leaf) if axis is None else axis
    if isinstance(choice, int):
        ndim = getattr(leaf, "ndim", 0)
        if not -ndim <= choice < ndim:
            raise ValueError(
                f"where chose axis {choice} for leaf {name!r} of shape {tuple(leaf.shape)}; "
                f"allowed axes are {-ndim}..{ndim - 1}."
            )
        return choice % ndim
    raise TypeError(
        f"where({name!r}, leaf) returned {choice!r}; it must return True, False, None or an "
        f"axis (int)."
    )


def fallback_axis(name: str, leaf: Any) -> int:
    ndim = getattr(leaf, "ndim", 0)
    if ndim >= 2:
        return ndim - 2
    if ndim == 1:
        return 0
    raise ValueError(
        f"leaf {name!r} is a scalar and has no input rows to noise; select it with an explicit "
        f"axis or leave it out of `where`."
    )


def broadcast_rows(vec: jax.Array, leaf_ndim: int, axis: int) -> jax.Array:
    """Reshapes a per-row vector so it broadcasts against a leaf along ``axis``."""
    shape = [1] * leaf_ndim
    shape[axis] = -1
    return vec.reshape(shape)


def sum_except(x: jax.Array, axis: int) -> jax.Array:
    """Sums ``x`` over all axes but ``axis``: one value per row."""
    axes = tuple(i for i in range(x.ndim) if i != axis)
    return x.sum(axis=axes)


def data_tuple(data: Any) -> tuple[tuple[Any, ...], int]:
    """The data as a tuple of arrays with a common leading axis of N > 0 examples, and N.

    Raises:
        ValueError: a bare array instead of a tuple, no arrays, mismatched or missing leading
            axes, or no examples.
        TypeError: not a tuple (or list), or an entry that is not an array of numbers.
    """
    import jax.numpy as jnp
    import numpy as np

    if isinstance(data, (jax.Array, np.ndarray)):
        raise ValueError(
            "data must be a tuple of arrays such as (x, y), unpacked into log_likelihood(params, "
            "*batch); wrap a single array as (x,)."
        )
    if not isinstance(data, Sequence) or isinstance(data, (str, bytes)):
        raise TypeError(
            f"data must be a tuple of arrays such as (x, y), unpacked into log_likelihood("
            f"params, *batch); got {type(data).__name__}: {data!r}."[:300]
        )
    arrays = []
    for i, a in enumerate(data):
        try:
            a = jnp.asarray(a)
        except TypeError:
            a = None
        if a is None or not (jnp.issubdtype(a.dtype, jnp.number) or a.dtype == jnp.bool_):
            raise TypeError(
                f"data must be a tuple of arrays of numbers; data[{i}] is "
                f"{type(data[i]).__name__}: {data[i]!r}."[:300]
            )
        arrays.append(a)
    arrays = tuple(arrays)
    if not arrays:
        raise ValueError(
            f"data is empty: it must be a tuple of arrays such as (x, y); got {data!r}."
        )
    sizes = [a.shape[0] if a.ndim else None for a in arrays]
    shapes = [tuple(a.shape) for a in arrays]
    if None in sizes or len(set(sizes)) != 1:
        raise ValueError(
            f"every array in data must have the same leading axis of examples; got shapes {shapes}."
        )
    if sizes[0] == 0:
        raise ValueError(f"data must hold at least one example; got shapes {shapes}.")
    return arrays, int(sizes[0])


def split_fn(fn: Any, partial: bool = True) -> tuple[Any, list]:
    """(static part, data part) of a function that enters compiled code.

    A ``jax.tree_util.Partial`` (where ``partial``), or an object whose class sets
    ``arrays_are_data`` (a pytree whose leaves are all arrays), or a tuple of such objects,
    splits into its structure and its leaves: the leaves then cross the ``jit`` boundary as
    data, so one compilation serves every value of them (EM's changing prior scales, a shear's
    centres). Any other callable is static whole and returned with no leaves."""
    if (
        (partial and isinstance(fn, jax.tree_util.Partial))
        or getattr(type(fn), "arrays_are_data", False)
        or (
            isinstance(fn, tuple)
            and fn
            and all(getattr(type(f), "arrays_are_data", False) for f in fn)
        )
    ):
        leaves, treedef = jax.tree.flatten(fn)
        return treedef, leaves
    return fn, []


def join_fn(static: Any, leaves: list) -> Any:
    """The function :func:`split_fn` split."""
    if isinstance(static, jax.tree_util.PyTreeDef):
        return jax.tree.unflatten(static, leaves)
    return static
