"""Saving and loading pytrees: one msgpack file per tree, written atomically.

A tree is written with Flax's msgpack encoding (``flax.serialization.msgpack_serialize``):
arrays as (shape, dtype, bytes), Python scalars, strings and ``None`` as msgpack's own types.
Flax msgpack rather than Orbax because a checkpoint here is one small tree: a single file, no
dependency beyond Flax, no async or multi-host machinery, and a file that any msgpack reader
(``flax.serialization.msgpack_restore``) turns into plain dicts and arrays without this library's
classes. Loading never runs code from the file, unlike ``pickle``.

The file holds the tree's state dict, named as ``flax.serialization.to_state_dict`` names it:
dicts by their keys, NamedTuples and dataclasses by their field names (any other JAX pytree node
by its key path entries), so a tree of dicts and NamedTuples is written byte for byte as
``flax.serialization.to_bytes`` writes it, and read back by ``from_bytes``. The walk over the
tree is done here rather than by ``to_state_dict`` / ``from_state_dict``, for two reasons. Flax
has no handler for a dataclass registered only with JAX (``bn.gsm.Hierarchy``): it would pass
the object itself to msgpack, and hand back the raw dict when restoring. And Flax turns a list
or tuple into a dict keyed ``"0"``, ``"1"``, ...; here they are kept as
``{"__list__": {"0": ..., ...}}`` (``"__tuple__"`` for a tuple), so that a value made of dicts,
lists, floats, strings and ``None`` reads back as the same types. A dict whose only key is one
of these tags is escaped as ``{"__dict__": dict}``.

Every write (:func:`save`, :func:`write_bytes`, :func:`write_text`) goes to a temporary file in
the target's folder, is flushed to disk, then renamed over the target (``os.replace``), so a
reader sees the old file or the new one, never half of one.

Example:
    >>> import os, tempfile, jax.numpy as jnp, bayesnoise as bn
    >>> path = os.path.join(tempfile.mkdtemp(), "moments.msgpack")
    >>> state = bn.moments.init({"w": jnp.zeros(2)})
    >>> bn.io.save(path, state)
    >>> bn.io.load(path)["count"]
    array(0., dtype=float32)
    >>> type(bn.io.load(path, like=state)).__name__
    'MomentsState'
"""

from __future__ import annotations

import codecs
import os
import secrets
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

from bayesnoise._tree import PyTree

__all__ = ["save", "load", "write_bytes", "write_text"]

_LIST, _TUPLE, _DICT = "__list__", "__tuple__", "__dict__"
_TAGS = (_LIST, _TUPLE, _DICT)
_SCALARS = (type(None), bool, int, float, complex, str, bytes)


def save(path: str | os.PathLike, tree: PyTree) -> None:
    """Writes a pytree to ``path`` as msgpack, atomically.

    Args:
        path: the file to write; its folder must exist. An existing file is replaced.
        tree: dicts (keys are written as ``str(key)``), lists, tuples, NamedTuples, dataclasses
            registered as pytrees (``bn.gsm.Hierarchy``, ``flax.struct`` dataclasses), with
            leaves that are NumPy or JAX arrays, NumPy scalars, ``None``, or Python bools, ints,
            floats, complex numbers, strings and bytes.

    Raises:
        TypeError: if ``path`` is not a path, or a leaf is none of those (the message names its
            path in the tree): a function, an object array, a traced value, or an array of typed
            PRNG keys (save ``jax.random.key_data(key)`` instead).
        ValueError: if two keys of a dict have the same ``str``, an int does not fit in 64
            bits, or ``path`` is empty.
        FileNotFoundError, NotADirectoryError: the folder of ``path`` does not exist or is a
            file.
    """
    _check_path(path)
    write_bytes(path, serialization.msgpack_serialize(_encode(tree, ()), in_place=True))


def load(path: str | os.PathLike, like: PyTree | None = None) -> Any:
    """Reads a pytree written by :func:`save`.

    Args:
        path: the file.
        like: a template. ``None``: the tree comes back as plain dicts, lists, tuples, arrays
            and scalars (a NamedTuple or dataclass as a dict of its fields). Otherwise a pytree
            of the saved structure (e.g. ``bn.moments.init(params)``, ``bn.gsm.hierarchy(params)``,
            a Flax variables dict, or ``jax.eval_shape`` of one): the result has its structure,
            its node types and static fields, and the file's leaves (NumPy arrays and scalars).
            Entries of the file that ``like`` lacks are ignored, as in
            ``flax.serialization.from_state_dict``; a list position or field named in ``like``
            may also be keyed ``"0"``, ``"1"``, ..., so files written by
            ``flax.serialization.to_bytes`` load as well.

    Returns:
        The tree.

    Raises:
        FileNotFoundError: if there is no file at ``path``.
        IsADirectoryError: if ``path`` is a folder.
        TypeError: if ``path`` is not a path.
        ValueError: if the file is not a msgpack pytree (truncated, corrupt), or does not match
            ``like`` (a missing entry, another list length, another array shape); the message
            names the file and the place in the tree.
    """
    _check_path(path)
    file = Path(path)
    if file.is_dir():
        raise IsADirectoryError(
            f"{os.fspath(path)} is a folder; allowed: the path of a file written by bn.io.save."
        )
    if not file.exists():
        raise FileNotFoundError(
            f"no file at {os.fspath(path)}; allowed: the path of a file written by bn.io.save."
        )
    data = file.read_bytes()
    try:
        state = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack's and NumPy's errors, MemoryError on a bogus length
        raise ValueError(
            f"{os.fspath(path)} is not a readable msgpack pytree (truncated or corrupt?): "
            f"{type(e).__name__}: {e}"
        ) from e
    tree = _decode(state, (), path)
    return tree if like is None else _restore(like, tree, (), path)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically: a temporary file beside it, fsync, rename.

    If writing fails midway, the target is left as it was and the temporary file is removed.

    Raises:
        TypeError: ``path`` is not a path, or ``data`` is not bytes-like.
        ValueError: ``path`` is empty.
        FileNotFoundError, NotADirectoryError: the folder of ``path`` does not exist or is a
            file.
    """
    _check_path(path)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"data must be bytes (or a bytearray or memoryview), got {type(data).__name__}"
            f"{'; use write_text for a str' if isinstance(data, str) else ''}."
        )
    path = Path(path)
    folder = path.parent
    _check_folder(path, folder)
    if path.is_dir():
        raise IsADirectoryError(
            f"cannot write {os.fspath(path)}: it is a folder; allowed: the path of a file (new, "
            f"or one to replace)."
        )
    # A fresh name per process and call, created with O_EXCL and the usual 0o666 & ~umask mode,
    # so the replaced file keeps the permissions a plain open() would have given it.
    tmp = folder / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(folder)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Writes ``text`` to ``path`` atomically (see :func:`write_bytes`).

    Raises:
        TypeError: ``text`` is not a str, or ``encoding`` not a str.
        ValueError: an unknown ``encoding``, or ``text`` it cannot encode.
        FileNotFoundError, NotADirectoryError: as :func:`write_bytes`.
    """
    if not isinstance(text, str):
        hint = "; use write_bytes for bytes" if isinstance(text, (bytes, bytearray)) else ""
        raise TypeError(f"text must be a str, got {type(text).__name__}: {text!r:.80}{hint}.")
    if not isinstance(encoding, str):
        raise TypeError(f"encoding must be a str such as 'utf-8', got {encoding!r}.")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(
            f"encoding must be a codec Python knows, such as 'utf-8'; got {encoding!r}."
        ) from None
    try:
        data = text.encode(encoding)
    except UnicodeEncodeError as e:
        raise ValueError(
            f"text cannot be written as {encoding!r} ({e.reason} at position {e.start}); "
            f"allowed: text that encoding can represent, or encoding='utf-8'."
        ) from None
    write_bytes(path, data)


def _check_path(path: Any) -> None:
    """A file path: a non-empty str or os.PathLike."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"path must be a str or os.PathLike file path, got {type(path).__name__}: {path!r:.80}."
        )
    if os.fspath(path) == "":
        raise ValueError("path must be a non-empty file path, got ''.")


def _check_folder(path: Path, folder: Path) -> None:
    """The folder a file is written into exists (naming what is wrong otherwise)."""
    if folder.is_dir():
        return
    above = folder
    while not above.exists() and above != above.parent:
        above = above.parent
    if above.exists() and not above.is_dir():
        raise NotADirectoryError(
            f"cannot write {os.fspath(path)}: {os.fspath(above)} is a file, not a folder; "
            f"allowed: a path in an existing folder."
        )
    raise FileNotFoundError(
        f"cannot write {os.fspath(path)}: the folder {os.fspath(folder)} does not exist; "
        f"allowed: a path in an existing folder (create it first)."
    )


def _fsync_folder(folder: Path) -> None:
    """Makes the rename itself durable, where the platform allows opening a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _where(path: tuple) -> str:
    return "".join(f"[{k!r}]" for k in path) or "the root"


_ALLOWED_LEAVES = (
    "allowed leaves: arrays, NumPy scalars, None, or Python bools, ints, floats, complex "
    "numbers, str or bytes"
)


def _encode(x: Any, path: tuple) -> Any:
    """The msgpack-ready state of ``x``: dicts with str keys, tagged lists, array leaves."""
    if isinstance(x, int) and not isinstance(x, bool) and not -(2**63) <= x < 2**64:
        raise ValueError(
            f"cannot save the int {x} at {_where(path)} of tree: ints must be in 64 bits "
            f"(in [-2**63, 2**64)); save it as a str or a float."
        )
    if isinstance(x, _SCALARS) or (isinstance(x, np.generic) and x.dtype.kind != "O"):
        return x
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            f"cannot save the traced value at {_where(path)} of tree (a {type(x).__name__}, as "
            f"under jit or grad): save concrete arrays, outside transformed functions."
        )
    if isinstance(x, (np.ndarray, jax.Array)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            raise TypeError(
                f"cannot save the PRNG key array at {_where(path)} of tree: save "
                f"jax.random.key_data(key) and rebuild it with jax.random.wrap_key_data."
            )
        if x.dtype.kind == "O":
            raise TypeError(
                f"cannot save the object array at {_where(path)} of tree: {_ALLOWED_LEAVES} "
                f"(arrays of numbers, bools or fixed-width strings)."
            )
        return np.asarray(x)
    if type(x) in (list, tuple):
        items = {str(i): _encode(v, (*path, i)) for i, v in enumerate(x)}
        return {_LIST if type(x) is list else _TUPLE: items}
    if isinstance(x, dict):
        keys = [str(k) for k in x]
        if len(set(keys)) != len(keys):
            raise ValueError(
                f"the keys of the dict at {_where(path)} of tree have the same str: {keys}; "
                f"they must differ, as they are written as strings."
            )
        out = {str(k): _encode(v, (*path, k)) for k, v in x.items()}
        return {_DICT: out} if len(out) == 1 and keys[0] in _TAGS else out
    children, _ = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
    if len(children) == 1 and children[0][0] == ():
        raise TypeError(
            f"cannot save the {type(x).__qualname__} at {_where(path)} of tree: {_ALLOWED_LEAVES}."
        )
    out = {}
    for (key,), child in children:
        name = _key_name(key)
        out[name] = _encode(child, (*path, name))
    return out


def _key_name(key: Any) -> str:
    """The state dict key of one JAX key path entry (a dict key, a field, a position)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _decode(x: Any, path: tuple, file: Any) -> Any:
    """Undoes the list, tuple and dict tags of :func:`_encode`."""
    if not isinstance(x, dict):
        return x
    if len(x) == 1:
        (tag, inner), *_ = x.items()
        if tag in _TAGS:
            if not isinstance(inner, dict):
                raise ValueError(
                    f"{os.fspath(file)}: the {tag} entry at {_where(path)} is not a dict."
                )
            if tag == _DICT:
                return {k: _decode(v, (*path, k), file) for k, v in inner.items()}
            if sorted(inner) != sorted(str(i) for i in range(len(inner))):
                raise ValueError(
                    f"{os.fspath(file)}: the {tag} entry at {_where(path)} has keys "
                    f"{sorted(inner)[:8]}, not 0 ... {len(inner) - 1}."
                )
            items = [_decode(inner[str(i)], (*path, i), file) for i in range(len(inner))]
            return items if tag == _LIST else tuple(items)
    return {k: _decode(v, (*path, k), file) for k, v in x.items()}


_LIKE_ALLOWED = "`like` must have the saved tree's structure and shapes, or be None"


def _restore(like: Any, state: Any, path: tuple, file: Any) -> Any:
    """``state`` (decoded) in the structure of the template ``like``."""
    if like is None:
        if state is not None:
            raise ValueError(
                f"{os.fspath(file)}: `like` has None at {_where(path)} where the file has a "
                f"{type(state).__name__}; {_LIKE_ALLOWED}."
            )
        return None
    children, treedef = jax.tree_util.tree_flatten_with_path(like, is_leaf=lambda y: y is not like)
    if len(children) == 1 and children[0][0] == ():  # a leaf
        if isinstance(state, (dict, list, tuple)):
            raise ValueError(
                f"{os.fspath(file)}: `like` has a leaf ({type(like).__name__}) at {_where(path)} "
                f"where the file has a {type(state).__name__}; {_LIKE_ALLOWED}."
            )
        want, got = np.shape(like), np.shape(state)
        if hasattr(like, "shape") and want != got:
            raise ValueError(
                f"{os.fspath(file)}: the array at {_where(path)} has shape {got}, `like` has "
                f"{want}; {_LIKE_ALLOWED}."
            )
        return state
    if isinstance(like, (list, tuple)) and isinstance(state, (list, tuple)):
        if len(state) != len(like):
            raise ValueError(
                f"{os.fspath(file)}: the sequence at {_where(path)} has {len(state)} entries, "
                f"`like` has {len(like)}; {_LIKE_ALLOWED}."
            )
        state = {str(i): v for i, v in enumerate(state)}
    if not isinstance(state, dict):
        raise ValueError(
            f"{os.fspath(file)}: `like` has a {type(like).__name__} at {_where(path)} where the "
            f"file has a {type(state).__name__}; {_LIKE_ALLOWED}."
        )
    leaves = []
    for (key,), child in children:
        name = _key_name(key)
        if name not in state:
            raise ValueError(
                f"{os.fspath(file)}: no entry {name!r} at {_where(path)} (the file has "
                f"{sorted(state)[:8]}), but `like` has one; {_LIKE_ALLOWED}."
            )
        leaves.append(_restore(child, state[name], (*path, name), file))
    return jax.tree_util.tree_unflatten(treedef, leaves)
