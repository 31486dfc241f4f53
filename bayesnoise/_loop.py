"""The library's one long-loop helper: a compiled scan run in chunks, with a progress bar.

Training (:mod:`bayesnoise.train`) and sampling (:mod:`bayesnoise.sampling`) both run many
steps inside one compiled ``lax.scan``. For a progress bar the host must see the loop advance;
rather than call back from inside the compiled loop (which needs a host-side registry of open
bars), the scan is cut into equal chunks: ``run_chunk(carry, start, length)`` is compiled once
per chunk length and called from the host, which updates the bar between chunks. Without a
bar the whole loop is one chunk, so one compiled call does everything. No state lives outside
the call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

__all__ = ["chunk_lengths", "run_chunked", "shuffled_batches"]


def chunk_lengths(total: int, every: int | None, progress: bool) -> list[int]:
    """Chunk lengths that add up to ``total``: one chunk without a bar; else chunks of ``every``
    steps (default: the divisor of ``total`` nearest to total/100, so that one length compiles)
    and, if ``every`` does not divide ``total``, a shorter last chunk."""
    total = int(total)
    if total <= 0:
        return []
    if not progress:
        return [total]
    if every is None:
        target = max(1, total // 100)
        divisors = [d for d in range(target, min(total, 10 * target) + 1) if total % d == 0]
        every = divisors[0] if divisors else target
    every = min(int(every), total)
    lengths = [every] * (total // every)
    if total % every:
        lengths.append(total % every)
    return lengths


def run_chunked(
    run_chunk: Callable[[Any, jax.Array, int], tuple[Any, Any]],
    carry: Any,
    lengths: list[int],
    *,
    progress: bool,
    desc: str,
    unit: str,
    start: int = 0,
    after_chunk: Callable[[Any, int, bool], None] | None = None,
) -> tuple[Any, list[Any]]:
    """``carry, out = run_chunk(carry, start, length)`` for every chunk, in order.

    ``start`` (the index of the chunk's first step; the first chunk's is the argument
    ``start``, for a run that goes on from a checkpoint) goes in as a device scalar, so calls of
    the compiled chunk transfer nothing implicitly. With ``progress``, a tqdm bar advances after
    each chunk has finished on the device. ``after_chunk(carry, steps_done, is_last)``, if
    given, is called after every chunk has finished on the device (to save the carry).

    Returns:
        the final carry and the list of every chunk's output.
    """
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=start + sum(lengths), initial=start, desc=desc, unit=unit)
    outs = []
    try:
        for i, length in enumerate(lengths):
            carry, out = run_chunk(carry, jax.device_put(np.int32(start)), length)
            outs.append(out)
            start += length
            if after_chunk is not None or bar is not None:
                # Wait for the chunk on the device. Without this the host would queue every
                # chunk at once (dispatch is asynchronous), and a save gated on the time since
                # the last one would find nothing finished until the whole run was.
                jax.block_until_ready(carry)
            if after_chunk is not None:
                after_chunk(carry, start, i == len(lengths) - 1)
            if bar is not None:
                bar.update(length)
    finally:
        if bar is not None:
            bar.close()
    return carry, outs


def shuffled_batches(key: jax.Array, num_data: int, batch_size: int) -> jax.Array:
    """One epoch's minibatch indices, shape (num_data // batch_size, batch_size): a random
    permutation, the last incomplete batch dropped."""
    steps = num_data // batch_size
    perm = jax.random.permutation(key, num_data)[: steps * batch_size]
    return perm.reshape(steps, batch_size).astype(np.int32)
