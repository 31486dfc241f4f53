"""Checkpoints of a chunked compiled loop, so that a long run that is stopped loses little.

Between chunks (:func:`bayesnoise._loop.run_chunked`) the loop's whole carry is written to a
file in a folder, named by a digest of everything that determines the run: its settings, its
start, its data and its keys. A run started again with the same inputs finds its file, reads
the carry back and goes on from the step it holds; a run with other inputs finds no file of
its digest and starts from the beginning. Functions enter the digest by module, name and the
numbers they close over, not by their code: after changing the code of a log-likelihood,
delete the folder.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from bayesnoise import io as _io

logger = logging.getLogger("bayesnoise")

_VERSION = "bayesnoise-loop-checkpoint-1"
_SCALARS = (type(None), bool, int, float, complex, str, bytes)


def _feed(h: Any, x: Any, depth: int = 0) -> None:
    """Feeds ``x`` into the hash ``h``: numbers and strings by value, arrays by dtype, shape
    and bytes, containers item by item, functions by name and closed-over values."""
    if depth > 8:
        h.update(b"<deep>")
        return
    if isinstance(x, _SCALARS):
        h.update(repr((type(x).__name__, x)).encode())
    elif isinstance(x, (np.ndarray, np.generic, jax.Array)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            h.update(str(jax.random.key_impl(x)).encode())
            x = jax.random.key_data(x)
        a = np.ascontiguousarray(jax.device_get(x))
        h.update(f"array {a.dtype} {a.shape}".encode())
        h.update(a.tobytes())
    elif isinstance(x, functools.partial):  # also jax.tree_util.Partial
        h.update(b"partial")
        _feed(h, x.func, depth + 1)
        _feed(h, x.args, depth + 1)
        _feed(h, dict(x.keywords), depth + 1)
    elif isinstance(x, (list, tuple)):
        h.update(f"{type(x).__name__} {len(x)}".encode())
        for item in x:
            _feed(h, item, depth + 1)
    elif isinstance(x, dict):
        h.update(f"dict {len(x)}".encode())
        for k in sorted(x, key=str):
            _feed(h, str(k), depth + 1)
            _feed(h, x[k], depth + 1)
    elif isinstance(x, Mesh):
        h.update(f"mesh {x.axis_names} {x.devices.shape}".encode())
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        h.update(type(x).__qualname__.encode())
        for f in dataclasses.fields(x):
            _feed(h, f.name, depth + 1)
            _feed(h, getattr(x, f.name), depth + 1)
    elif callable(x):
        fn = getattr(x, "__func__", x)  # a bound method: its function
        h.update(f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}".encode())
        if not getattr(fn, "__qualname__", None):
            h.update(type(x).__qualname__.encode())
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                _feed(h, cell.cell_contents, depth + 1)
            except ValueError:  # an empty cell
                h.update(b"<empty>")
        _feed(h, getattr(fn, "__defaults__", None), depth + 1)
    else:
        leaves, treedef = jax.tree.flatten(x)
        h.update(type(x).__qualname__.encode())
        if not (len(leaves) == 1 and leaves[0] is x):
            h.update(str(treedef.num_leaves).encode())
            _feed(h, leaves, depth + 1)


def digest(*parts: Any) -> str:
    """A hex digest of ``parts`` (see :func:`_feed` for what enters it)."""
    h = hashlib.sha256(_VERSION.encode())
    _feed(h, parts)
    return h.hexdigest()


class Checkpoint:
    """The file of one run in ``folder``: ``load`` reads its carry back, ``save`` writes it
    after a chunk when ``every`` seconds have passed since the last write (and after the
    last chunk)."""

    def __init__(self, folder: str | os.PathLike, key: str, every: float):
        self.folder = Path(folder)
        self.path = self.folder / f"{key[:32]}.msgpack"
        self.key = key
        self.every = float(every)
        self.last = time.monotonic()

    def load(self, carry: Any) -> tuple[Any, int]:
        """(carry, steps done): the saved carry where the file matches this run, else
        ``carry`` itself and 0. A file that cannot be read, or that holds another run's
        state, is ignored with a warning (and replaced at the next save)."""
        if not self.path.exists():
            return carry, 0
        template, treedef = jax.tree.flatten(carry)
        try:
            saved = _io.load(self.path)
            ok = isinstance(saved, dict) and saved.get("key") == self.key
            leaves = saved["leaves"] if ok else []
            ok = ok and len(leaves) == len(template)
            restored = []
            for like, got in zip(template, leaves) if ok else ():
                if jax.dtypes.issubdtype(like.dtype, jax.dtypes.prng_key):
                    got = jax.random.wrap_key_data(got, impl=jax.random.key_impl(like))
                if got.shape != like.shape or got.dtype != like.dtype:
                    ok = False
                    break
                restored.append(jax.device_put(got, like.sharding))
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("cannot read the checkpoint %s (%s): starting again", self.path, e)
            return carry, 0
        if not ok:
            logger.warning("%s holds another run's state: starting again", self.path)
            return carry, 0
        step = int(saved["step"])
        logger.info("resuming from %s at step %d", self.path, step)
        return jax.tree.unflatten(treedef, restored), step

    def save(self, carry: Any, step: int, last: bool) -> None:
        if not last and time.monotonic() - self.last < self.every:
            return
        leaves = [
            jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
            for x in jax.tree.leaves(carry)
        ]
        self.folder.mkdir(parents=True, exist_ok=True)
        _io.save(self.path, {"key": self.key, "step": int(step), "leaves": jax.device_get(leaves)})
        self.last = time.monotonic()
