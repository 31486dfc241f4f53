"""The ``prune`` suite: a whole pruning curve in one vmapped call against a Python loop.

Both sides evaluate the error rate of the 784-400-400-10 ReLU MLP (:class:`bayesnoise.nn.MLP`,
random params, random inputs of MNIST size) after pruning it at every fraction. The loop builds
each mask with :func:`bayesnoise.prune.mask` and calls a jitted evaluation per fraction;
:func:`bayesnoise.prune.curve` ranks the scores once and evaluates all fractions in one compiled
computation. Timings are medians over ``repeats`` runs after a warm-up run, each ending in
``block_until_ready``.

What the curve saves is the per-fraction work outside the model: a sort of all the scores for
every mask (XLA's CPU sort takes about 0.19 s for the 0.48M weights on 2 cores) and a dispatch
per fraction. The forward passes themselves cost the same on both sides (the curve takes about
1.05-1.15 times its 100 forward passes), so the speedup is large when they are cheap (fewer
inputs, or an accelerator) and falls as they dominate: on 2 CPU cores about 3-3.5x with
10,000 inputs (0.09 s per forward pass), 5x with 5,000 and 16x with 1,000.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bayesnoise import prune
from bayesnoise.bench._common import median_time, register
from bayesnoise.nn import MLP

NUM_INPUTS, NUM_CLASSES = 784, 10


@register("prune")
def prune_suite(num_fractions: int = 100, repeats: int = 3) -> dict[str, Any]:
    """The pruning curve over ``num_fractions`` fractions against a Python loop over them,
    on a random 784-400-400-10 MLP evaluated on 10,000 and on 1,000 inputs."""
    return {
        f"inputs_{n}": prune_curve(num_fractions, repeats, batch_size=n) for n in (10_000, 1_000)
    }


def prune_curve(
    num_fractions: int = 100,
    repeats: int = 5,
    *,
    batch_size: int = 10_000,
    chunk_size: int | None = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Times :func:`bayesnoise.prune.curve` against a Python loop over the same fractions.

    Args:
        num_fractions: fractions evenly spaced in [0, 1].
        repeats: timed runs per side; the median is reported.
        batch_size: inputs evaluated at every fraction.
        chunk_size: passed to :func:`~bayesnoise.prune.curve` (fractions evaluated at a time).
        seed: seeds params, scores and data.

    Returns:
        ``{"curve_s", "loop_s", "speedup", "forward_s", "curve_over_forwards",
        "num_fractions", "batch_size", "chunk_size", "max_abs_diff"}``: median seconds per
        whole curve, loop / curve, the seconds of one unpruned evaluation and the curve's time
        over ``num_fractions`` of them (1: the curve costs no more than its forward passes),
        and the largest difference between the two curves (0 when they agree).
    """
    k_params, k_std, k_x, k_y = jax.random.split(jax.random.key(seed), 4)
    model = MLP()
    params = model.init(k_params, jnp.zeros((1, NUM_INPUTS)))
    leaves, treedef = jax.tree.flatten(params)
    std = jax.tree.unflatten(
        treedef,
        [
            0.05 * jax.random.uniform(k, p.shape, minval=0.5, maxval=1.5)
            for p, k in zip(leaves, jax.random.split(k_std, len(leaves)))
        ],
    )
    scores = prune.spr(params, std)
    x = jax.random.uniform(k_x, (batch_size, NUM_INPUTS))
    y = jax.random.randint(k_y, (batch_size,), 0, NUM_CLASSES)
    fractions = jnp.linspace(0.0, 1.0, num_fractions)

    def error(p):
        return jnp.mean(jnp.argmax(model.apply(p, x), axis=-1) != y)

    error_jit = jax.jit(error)

    def run_curve():
        return prune.curve(error, params, scores, fractions, chunk_size=chunk_size)

    def run_loop():
        values = []
        for f in np.asarray(fractions):
            values.append(error_jit(prune.apply(params, prune.mask(scores, f))))
        return jnp.stack(values)

    jax.block_until_ready(run_curve())  # warm-up: compilation and caches
    jax.block_until_ready(run_loop())
    curve_s = median_time(run_curve, repeats)
    loop_s = median_time(run_loop, repeats)
    jax.block_until_ready(error_jit(params))
    forward_s = median_time(lambda: error_jit(params), repeats)
    diff = float(jnp.max(jnp.abs(run_curve() - run_loop())))
    return {
        "curve_s": curve_s,
        "loop_s": loop_s,
        "speedup": loop_s / curve_s,
        "forward_s": forward_s,
        "curve_over_forwards": curve_s / (num_fractions * forward_s),
        "num_fractions": num_fractions,
        "batch_size": batch_size,
        "chunk_size": chunk_size,
        "max_abs_diff": diff,
    }
