"""The ``rng`` suite: the cost of the SGLD noise, a hand-written Threefry against ``jax.random``.

JAX lowers its Threefry-2x32 on CPU to a rolled loop that writes the random bits to memory
before the Gaussian transform reads them. Written out in plain integer array operations
(:func:`_normal` below, the path :mod:`bayesnoise.sgld` took before) all twenty rounds fuse with
the transform and the update into one loop.
The suite times both inside a jitted SGLD-like update,

    θ ← θ − η g + sqrt(2 η) ξ,    ξ ~ N(0, I) drawn per leaf from a split of the key,

on the params of the MLP 784-400-400-10 (:class:`bayesnoise.nn.MLP`, 478,410 weights), for one
chain and for ``chains`` chains under ``jax.vmap``: the hand-written path against
``jax.random.normal`` with keys of each of JAX's implementations (``threefry2x32``, the default;
``rbg``; ``unsafe_rbg``), and :func:`bayesnoise.sgld.sgld`'s own update for reference. The
library would keep the hand-written path only if it beat the best of ``jax.random`` by the
``threshold`` (1.2x) at every size; the suite's ``"decision"`` says what this run finds.

Measured on a shared 2-core x86-64 CPU (jax 0.10.2; 11 runs of 40-100 interleaved repeats,
the machine busy with other work), the hand-written update's median was 0.99-1.68x as fast as
``threefry2x32``'s for one chain (1.21x over the runs) and 0.92-1.31x for four vmapped chains
(1.11x), so 1.2x at both sizes in only 3 of the 11 runs; the fastest repeats, the least
disturbed, gave 1.3-1.7x and 1.1-2.1x. ``rbg`` and ``unsafe_rbg`` took 4-7x as long as
``threefry2x32`` (XLA's RngBitGenerator on CPU). In the whole sampler (MNIST, batch 128, 1 and
4 chains, 2 runs) the hand-written draw changed the steps per second by 0.95-1.12x. So
:mod:`bayesnoise.sgld` draws with ``jax.random.normal``; on an idle machine or another backend,
run the suite again: its ``decision`` compares afresh.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bayesnoise._tree import PyTree
from bayesnoise.bench._common import register
from bayesnoise.nn import MLP
from bayesnoise.sgld import sgld

IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")

# What bayesnoise.sgld does, decided from this suite's runs (see the module docstring).
LIBRARY = (
    "bayesnoise.sgld draws with jax.random.normal: over 11 runs on a shared 2-core CPU the "
    "hand-written margin was 0.99-1.68x (1 chain) and 0.92-1.31x (4 chains), reaching 1.2x at "
    "both sizes in 3; whole sampler steps 0.95-1.12x"
)

# Threefry-2x32 with 20 rounds (Salmon et al., 2011), as JAX defines it: rotation constants of the
# even and odd groups of four rounds, and the key-schedule parity constant.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)
_LO32 = np.nextafter(np.float32(-1.0), np.float32(0.0))
_WIDTH32 = np.float32(1.0) - _LO32
_SQRT2_32 = np.float32(np.sqrt(2.0))


def _threefry2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array):
    """The Threefry-2x32 block function, unrolled into plain integer array operations."""
    ks = (k1, k2, k1 ^ k2 ^ _PARITY)
    x1 = x1 + ks[0]
    x2 = x2 + ks[1]
    for group in range(5):
        for r in _ROTATIONS[group % 2]:
            x1 = x1 + x2
            x2 = (x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r))
            x2 = x1 ^ x2
        x1 = x1 + ks[(group + 1) % 3]
        x2 = x2 + ks[(group + 2) % 3] + np.uint32(group + 1)
    return x1, x2


def _random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 bits equal to ``jax.random.bits(key, shape)`` for a threefry key.

    Element i (flat index) is t1 ^ t2 with (t1, t2) = Threefry(key, (i >> 32, i mod 2^32)),
    JAX's default ("partitionable") threefry layout.
    """
    data = jax.random.key_data(key)
    k1, k2 = data[..., 0], data[..., 1]
    full = shape if shape else (1,)
    lo = jnp.zeros(full, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(full))):
        lo = lo + jax.lax.broadcasted_iota(jnp.uint32, full, axis) * np.uint32(stride)
        stride *= full[axis]
    t1, t2 = _threefry2x32(k1, k2, jnp.zeros(full, jnp.uint32), lo)
    return (t1 ^ t2).reshape(shape)


def _normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """float32 standard normals equal to ``jax.random.normal(key, shape)`` for a threefry key:
    23 mantissa bits to a uniform u in (−1, 1), then sqrt(2) erfinv(u), as JAX does."""
    if math.prod(shape) >= 2**32:
        raise ValueError(f"the hand-written path counts in 32 bits; got shape {shape}.")
    bits = _random_bits(key, shape)
    mantissa = (bits >> np.uint32(9)) | np.uint32(0x3F800000)
    unit = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)
    u = jnp.maximum(_LO32, unit * _WIDTH32 + _LO32)
    return _SQRT2_32 * jax.lax.erf_inv(u)


def _handwritten_like(key: jax.Array, tree: PyTree) -> PyTree:
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [_normal(k, jnp.shape(x)) for k, x in zip(keys, leaves)])


def _jax_random_like(key: jax.Array, tree: PyTree) -> PyTree:
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noise = [jax.random.normal(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, noise)


def _update(normal_like: Callable, eta: float) -> Callable:
    scale = math.sqrt(2.0 * eta)

    def update(key, params, grads):
        noise = normal_like(key, params)
        return jax.tree.map(lambda p, g, z: p - eta * g + scale * z, params, grads, noise)

    return update


def _library_update(eta: float) -> Callable:
    opt = sgld(eta, temperature=1.0)

    def update(key, params, grads):
        updates, _ = opt.update(grads, opt.init(params), key=key)
        return optax.apply_updates(params, updates)

    return update


@register("rng")
def rng_suite(
    *,
    features: tuple[int, ...] = (400, 400, 10),
    num_inputs: int = 784,
    chains: int = 4,
    impls: tuple[str, ...] = IMPLS,
    repeats: int = 50,
    threshold: float = 1.2,
    learning_rate: float = 1e-4,
    seed: int = 0,
) -> dict[str, Any]:
    """Median milliseconds of a jitted SGLD-like update per way of drawing its noise.

    Figures (medians over ``repeats`` interleaved runs after a compiling warm-up run), for
    ``"1"`` chain and for ``str(chains)`` chains (one ``jax.vmap``):

    - ``update_ms[size][way]``: ``handwritten`` (the fused Threefry of this module, threefry
      key), ``threefry2x32``, ``rbg`` and ``unsafe_rbg`` (``jax.random.normal`` with a key of
      that implementation), and ``bn.sgld`` (the library's transform and ``apply_updates``);
    - ``fastest_update_ms``: the fastest run instead of the median (the least disturbed by
      other work on a shared machine);
    - ``handwritten_speedup[size][impl]``: time of ``jax.random.normal`` with ``impl`` over the
      hand-written path's (above 1: the hand-written path is faster);
    - ``decision``: ``margin[size]`` = best ``jax.random`` time / hand-written time, and
      ``keep_handwritten``: whether the smallest margin reaches ``threshold`` in this run, and
      ``library``: what :mod:`bayesnoise.sgld` does.

    Args:
        features: the MLP's layer widths; the params are those of ``MLP(features)`` on
            ``num_inputs`` inputs.
        num_inputs: the MLP's input width.
        chains: the chains of the vmapped update.
        impls: the key implementations to time ``jax.random.normal`` with.
        repeats: timed runs per figure.
        threshold: the margin the hand-written path needs at every size to be kept.
        learning_rate: η of the update (its value does not change the cost).
        seed: PRNG seed of the params, gradients and keys.

    Raises:
        ValueError: for an empty ``impls`` or a name not in :data:`IMPLS`.
    """
    unknown = set(impls) - set(IMPLS)
    if not impls or unknown:
        raise ValueError(
            f"impls must be a non-empty subset of {IMPLS}, got {tuple(impls)!r}"
            + (f" ({sorted(unknown)} unknown)." if unknown else ".")
        )
    model = MLP(features=tuple(features))

    @jax.jit
    def setup(key):  # one compilation for the params, the gradients and their stacks
        k_params, k_grads = jax.random.split(key)
        params = model.init(k_params, jnp.zeros((1, num_inputs)))
        grads = _jax_random_like(k_grads, params)
        stack = lambda x: jnp.broadcast_to(x, (chains, *x.shape))
        return params, grads, jax.tree.map(stack, params), jax.tree.map(stack, grads)

    params, grads, params_c, grads_c = setup(jax.random.key(seed))
    num_params = sum(int(np.size(w)) for w in jax.tree.leaves(params))
    sizes = {"1": (params, grads), str(chains): (params_c, grads_c)}
    ways = {
        "handwritten": (_update(_handwritten_like, learning_rate), "threefry2x32"),
        **{impl: (_update(_jax_random_like, learning_rate), impl) for impl in impls},
        "bn.sgld": (_library_update(learning_rate), "threefry2x32"),
    }

    calls: dict[tuple[str, str], Callable[[], Any]] = {}
    for size, (p, g) in sizes.items():
        for way, (update, impl) in ways.items():
            key = jax.random.key(seed + 1, impl=impl)
            if size == "1":
                fn, k = jax.jit(update), key
            else:
                fn, k = jax.jit(jax.vmap(update)), jax.random.split(key, chains)
            jax.block_until_ready(fn(k, p, g))  # compile and warm up
            calls[size, way] = lambda fn=fn, k=k, p=p, g=g: fn(k, p, g)

    # The check that the hand-written path draws jax.random.normal's own numbers.
    same = jax.jit(
        lambda k, t: jax.tree.map(jnp.array_equal, _handwritten_like(k, t), _jax_random_like(k, t))
    )(jax.random.key(seed + 1), params)

    times: dict[tuple[str, str], list[float]] = {c: [] for c in calls}
    for _ in range(repeats):  # interleaved, so that all see the same machine load
        for c, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[c].append(time.perf_counter() - start)
    ms = {c: 1e3 * statistics.median(t) for c, t in times.items()}

    update_ms = {size: {way: ms[size, way] for way in ways} for size in sizes}
    fastest_ms = {size: {way: 1e3 * min(times[size, way]) for way in ways} for size in sizes}
    speedup = {
        size: {impl: update_ms[size][impl] / update_ms[size]["handwritten"] for impl in impls}
        for size in sizes
    }
    best = {size: min(impls, key=lambda impl: update_ms[size][impl]) for size in sizes}
    margin = {size: speedup[size][best[size]] for size in sizes}
    keep = min(margin.values()) >= threshold
    return {
        "model": f"mlp {num_inputs}-{'-'.join(map(str, features))} (bayesnoise.nn.MLP)",
        "num_params": num_params,
        "update": "θ − η g + sqrt(2 η) ξ, jitted; vmapped over the chains",
        "chains": chains,
        "repeats": repeats,
        "handwritten_equals_jax_random_normal": all(bool(x) for x in jax.tree.leaves(same)),
        "update_ms": update_ms,
        "fastest_update_ms": fastest_ms,
        "handwritten_speedup": speedup,
        "decision": {
            "rule": f"keep the hand-written Threefry only if it beats the best jax.random "
            f"implementation by at least {threshold}x at every size",
            "best_jax_random": best,
            "margin": margin,
            "keep_handwritten": keep,
            "library": LIBRARY,
        },
    }
