"""Posterior moments by SGLD for any model: many chains, one compiled scan, no stored samples.

:func:`run` draws minibatches on the device (a fresh permutation of the data every epoch and
chain), estimates the gradient of the negative log posterior of the whole data set,

    U(θ) = −log p(θ) − (N / n) Σ_{i ∈ batch} log p(y_i | x_i, θ),

applies an SGLD transform (:func:`bayesnoise.sgld` by default; see its update equation), and
after ``num_burnin`` steps adds every ``thin``-th state to running moments
(:mod:`bayesnoise.moments`, Welford). All steps of all chains run inside one ``jax.lax.scan``
under one ``jax.jit``; chains are a ``jax.vmap`` axis, optionally sharded across devices.
Memory is O(params × chains): only the moments, the current state and a small trace of a few
weights (for split R-hat and effective sample size) are kept.

Example:
    >>> import jax, jax.numpy as jnp, bayesnoise as bn
    >>> x = jax.random.normal(jax.random.key(0), (100, 2))
    >>> y = x @ jnp.array([1.0, -1.0]) + 0.1 * jax.random.normal(jax.random.key(1), (100,))
    >>> def log_likelihood(p, xb, yb):
    ...     return -0.5 * ((yb - xb @ p["w"]) / 0.1) ** 2
    >>> def log_prior(p):
    ...     return -0.5 * jnp.sum(p["w"] ** 2)
    >>> result = bn.sampling.run(
    ...     jax.random.key(2), {"w": jnp.zeros(2)}, log_likelihood, log_prior, (x, y),
    ...     learning_rate=1e-5, batch_size=20, num_burnin=500, num_samples=200, num_chains=2)
    >>> bn.moments.mean(result.moments)["w"].round(1)
    Array([ 1., -1.], dtype=float32)
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bayesnoise import _tree
from bayesnoise import moments as _moments
from bayesnoise._tree import PyTree
from bayesnoise.sgld import sgld as _sgld
from bayesnoise.sgld import step_size as _step_size

__all__ = ["SamplingResult", "DivergenceError", "make_mesh", "run"]


class SamplingResult(NamedTuple):
    """What :func:`run` returns; arrays with a leading chain axis have ``C = num_chains``."""

    moments: _moments.MomentsState  # merged over chains: use bn.moments.mean / variance
    chain_moments: _moments.MomentsState  # per chain, every leaf with a leading (C,) axis
    params: PyTree  # the last state of every chain, leaves (C, ...)
    opt_state: PyTree  # the transform's last state, leaves (C, ...)
    log_posterior: jax.Array  # (C, num_samples): −U at the kept states, a minibatch estimate
    trace: jax.Array  # (C, num_samples, k): a few weights at the kept states
    trace_names: tuple[str, ...]  # (k,): "path[index]" of the traced weights
    rhat: np.ndarray  # (k,): split R-hat of the traced weights (numpyro.diagnostics)
    ess: np.ndarray  # (k,): effective sample size of the traced weights, all chains together
    num_steps: int  # num_burnin + num_samples * thin


class DivergenceError(FloatingPointError):
    """A chain's log posterior, gradient or parameters became NaN or inf.

    Attributes:
        step: the first bad step (0-based, counting burn-in).
        step_size: η_t at that step.
        chain: the chain in which it happened first.
        result: the :class:`SamplingResult` with every chain frozen at its last finite state.
    """

    def __init__(self, message: str, *, step: int, step_size: float, chain: int, result: Any):
        super().__init__(message)
        self.step = step
        self.step_size = step_size
        self.chain = chain
        self.result = result


class _Carry(NamedTuple):
    params: PyTree  # (C, ...) current state θ_t
    opt_state: PyTree  # (C, ...) transform state
    moments: _moments.MomentsState  # (C, ...) running moments
    data_key: jax.Array  # (C,) key of the per-epoch permutations
    perm: jax.Array  # (C, N) int32: this epoch's order of the examples ((C, 0) for full batches)
    bad_step: jax.Array  # (C,) int32: first non-finite step, −1 while finite
    log_post: jax.Array  # (C, S) thinned −U
    trace: jax.Array  # (C, S, k) thinned traced weights


# Progress bars of running calls, keyed by an id passed into the compiled scan (the compiled
# function stays the same from call to call; the callback looks its bar up here).
_BARS: dict[int, Any] = {}
_BAR_IDS = itertools.count()


def _tick(bar_id, done) -> None:
    bar = _BARS.get(int(bar_id))
    if bar is not None:
        bar.update(int(done) - bar.n)


@functools.lru_cache(maxsize=64)
def _transform(transform: Callable, learning_rate, temperature) -> optax.GradientTransformation:
    # Cached so that equal settings give the same transform object, and so the same compiled scan.
    return transform(learning_rate, temperature=temperature)


def _make_transform(transform, learning_rate, temperature):
    try:
        return _transform(transform, learning_rate, temperature)
    except TypeError:  # unhashable settings: build afresh (and compile afresh)
        return transform(learning_rate, temperature=temperature)


def _all_finite(tree: PyTree) -> jax.Array:
    """Whether every entry of every leaf is finite (one fused reduction per leaf)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def _reseed(opt_state: PyTree, key: jax.Array) -> PyTree:
    """Replaces every typed PRNG key in a transform state by one derived from ``key``."""
    leaves, treedef = jax.tree.flatten(opt_state)
    new = [
        jax.random.fold_in(key, i)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
        else x
        for i, x in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, new)


def _trace_spec(params: PyTree, k: int) -> tuple[tuple[tuple[int, tuple[int, ...]], ...], tuple]:
    """k weights evenly spaced over the flattened params: ((leaf, flat indices), ...), names."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    sizes = [int(np.size(x)) for _, x in flat]
    total = sum(sizes)
    k = min(k, total)
    if k == 0:
        return (), ()
    picks = np.unique(np.linspace(0, total - 1, k).round().astype(int))
    offsets = np.cumsum([0] + sizes)
    spec, names = [], []
    for i, (path, leaf) in enumerate(flat):
        mine = picks[(picks >= offsets[i]) & (picks < offsets[i + 1])] - offsets[i]
        if mine.size:
            spec.append((i, tuple(int(j) for j in mine)))
            shape = np.shape(leaf)
            for j in mine:
                index = ",".join(str(int(a)) for a in np.unravel_index(j, shape)) if shape else ""
                names.append(f"{_tree.path_str(path)}[{index}]")
    return tuple(spec), tuple(names)


def _traced(params: PyTree, spec) -> jax.Array:
    leaves = jax.tree.leaves(params)
    parts = [jnp.ravel(leaves[i])[jnp.asarray(idx)].astype(jnp.float32) for i, idx in spec]
    return jnp.concatenate(parts) if parts else jnp.zeros((0,), jnp.float32)


@functools.partial(
    jax.jit,
    static_argnames=(
        "log_likelihood",
        "log_prior",
        "optimizer",
        "batch_size",
        "num_burnin",
        "num_samples",
        "thin",
        "trace_spec",
        "mesh",
        "progress_every",
        "params_per_chain",
    ),
)
def _sample(
    chain_keys,
    params,
    data,
    bar_id,
    *,
    log_likelihood,
    log_prior,
    optimizer,
    batch_size,
    num_burnin,
    num_samples,
    thin,
    trace_spec,
    mesh,
    progress_every,
    params_per_chain,
):
    num_chains = chain_keys.shape[0]
    num_data = jax.tree.leaves(data)[0].shape[0]
    full_batch = batch_size >= num_data
    steps_per_epoch = 1 if full_batch else num_data // batch_size
    scale = num_data / batch_size
    total = num_burnin + num_samples * thin

    # Chains split over the mesh's "chain" axis, every minibatch over its "data" axis; the
    # gradient's sum over the batch then becomes a cross-device reduction.
    chain_axis = "chain" if mesh is not None and "chain" in mesh.axis_names else None
    data_axis = "data" if mesh is not None and "data" in mesh.axis_names else None

    def constrain(tree, *spec):
        if mesh is None:
            return tree
        sharding = NamedSharding(mesh, P(*spec))
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)

    # Per-chain start: params, transform state with its own keys, empty moments, buffers.
    if not params_per_chain:
        params = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_chains,) + jnp.shape(x)), params)
    keys = jax.vmap(lambda k: jax.random.split(k, 2))(chain_keys)
    opt_key, data_key = keys[:, 0], keys[:, 1]
    opt_state = jax.vmap(lambda p, k: _reseed(optimizer.init(p), k))(params, opt_key)
    moments = jax.vmap(_moments.init)(params)
    num_traced = sum(len(idx) for _, idx in trace_spec)
    carry = _Carry(
        params=params,
        opt_state=opt_state,
        moments=moments,
        data_key=data_key,
        perm=jnp.zeros((num_chains, 0 if full_batch else num_data), jnp.int32),
        bad_step=jnp.full((num_chains,), -1, jnp.int32),
        log_post=jnp.zeros((num_chains, num_samples), jnp.float32),
        trace=jnp.zeros((num_chains, num_samples, num_traced), jnp.float32),
    )
    carry = constrain(carry, chain_axis)

    def potential(p, batch):
        # U(θ): minus the log prior minus the minibatch log-likelihood scaled to N examples.
        ll = log_likelihood(p, *batch)
        return -(log_prior(p) + scale * jnp.sum(ll))

    def shuffle(data_key, epoch):
        return jax.random.permutation(jax.random.fold_in(data_key, epoch), num_data).astype(
            jnp.int32
        )

    def minibatches(t, perm):
        # This step's minibatch of every chain, leaves (C, n, ...); or the whole data set.
        if full_batch:
            return constrain(data, data_axis)
        start = (t % steps_per_epoch) * batch_size
        idx = jax.lax.dynamic_slice_in_dim(perm, start, batch_size, axis=1)
        batch = jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data)
        return constrain(batch, chain_axis, data_axis)

    def gradient(params, batch, alive):
        # (−U(θ_t), ∇U(θ_t), whether both are finite) on this step's minibatch.
        u, grads = jax.value_and_grad(potential)(params, batch)
        ok = alive & jnp.isfinite(u) & _all_finite(grads)
        return -u, grads, ok

    def update(params, opt_state, grads, ok):
        # θ_{t+1}; a chain whose gradient was not finite keeps its state (it is frozen).
        updates, new_opt = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        new_params = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_params, params)
        new_opt = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_opt, opt_state)
        return new_params, new_opt

    def record(t, params, log_post, ok, moments, buf_lp, buf_tr):
        # The kept sample is θ_t, the state at which step t took its gradient, so that the
        # recorded −U belongs to it. It enters the moments only when it is finite.
        s = (t - num_burnin) // thin

        def one(m, p, lp, ok, buf_lp, buf_tr):
            ok = ok & _all_finite(p)
            m_new = _moments.update(m, p)
            m = jax.tree.map(lambda a, b: jnp.where(ok, a, b), m_new, m)
            buf_lp = buf_lp.at[s].set(jnp.where(ok, lp, jnp.nan).astype(jnp.float32))
            buf_tr = buf_tr.at[s].set(_traced(p, trace_spec))
            return m, buf_lp, buf_tr, ok

        return jax.vmap(one)(moments, params, log_post, ok, buf_lp, buf_tr)

    def body(c: _Carry, t):
        if not full_batch:  # a fresh permutation of the examples at the start of every epoch
            perm = jax.lax.cond(
                t % steps_per_epoch == 0,
                lambda: jax.vmap(shuffle, in_axes=(0, None))(c.data_key, t // steps_per_epoch),
                lambda: c.perm,
            )
            c = c._replace(perm=perm)
        alive = c.bad_step < 0
        batch = minibatches(t, c.perm)
        log_post, grads, ok = jax.vmap(gradient, in_axes=(0, None if full_batch else 0, 0))(
            c.params, batch, alive
        )
        if num_samples > 0:
            is_sample = (t >= num_burnin) & ((t - num_burnin) % thin == thin - 1)
            moments, buf_lp, buf_tr, ok = jax.lax.cond(
                is_sample,
                lambda args: record(t, c.params, log_post, *args),
                lambda args: (args[1], args[2], args[3], args[0]),
                (ok, c.moments, c.log_post, c.trace),
            )
            c = c._replace(moments=moments, log_post=buf_lp, trace=buf_tr)
        bad_step = jnp.where(alive & ~ok, t, c.bad_step)
        params, opt_state = jax.vmap(update)(c.params, c.opt_state, grads, ok)
        c = c._replace(params=params, opt_state=opt_state, bad_step=bad_step)
        if progress_every > 0:
            done = t + 1
            jax.lax.cond(
                (done % progress_every == 0) | (done == total),
                lambda: jax.debug.callback(_tick, bar_id, done),
                lambda: None,
            )
        return constrain(c, chain_axis), None

    carry, _ = jax.lax.scan(body, carry, jnp.arange(total, dtype=jnp.int32))
    merged = _moments.merge_chains(carry.moments)
    return carry, merged


def _check_positive_int(name: str, value: Any, minimum: int, meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} ({meaning}) must be an int >= {minimum}, got {value!r}.")
    return int(value)


def _chain_keys(key: Any, num_chains: int | None) -> jax.Array:
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.dtype == jnp.uint32 and key.shape[-1:] == (2,):
            key = jax.random.wrap_key_data(key)
        else:
            raise ValueError(
                f"key must be a PRNG key (jax.random.key) or an array of keys, one per chain; "
                f"got {key.dtype} of shape {key.shape}."
            )
    if key.ndim == 0:
        n = (
            1
            if num_chains is None
            else _check_positive_int("num_chains", num_chains, 1, "the number of chains")
        )
        return jax.random.split(key, n)
    if key.ndim != 1:
        raise ValueError(f"key must be one key or a vector of keys, got key shape {key.shape}.")
    if num_chains is not None and num_chains != key.shape[0]:
        raise ValueError(
            f"num_chains={num_chains!r} but {key.shape[0]} chain keys were given: pass one key "
            f"(split into num_chains chains) or exactly one key per chain."
        )
    return key


def make_mesh(chains: int = 1, data: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A device mesh for :func:`run`: chains split ``chains`` ways, minibatches ``data`` ways.

    ``chains * data`` devices are used (the first ones of ``devices``, by default
    ``jax.devices()``, which spans all hosts after ``jax.distributed.initialize()``). On a
    ``(chains, data)`` mesh every chain's gradient is the sum of ``data`` partial sums over
    slices of its minibatch, one per device.

    Example:
        >>> mesh = bn.sampling.make_mesh(chains=2, data=2)  # doctest: +SKIP
        >>> bn.sampling.run(key, params, ll, lp, (x, y), ..., num_chains=4, devices=mesh)
    """
    chains = _check_positive_int("chains", chains, 1, "ways to split the chains")
    data = _check_positive_int("data", data, 1, "ways to split every minibatch")
    devices = list(jax.devices() if devices is None else devices)
    if chains * data > len(devices):
        raise ValueError(
            f"a mesh of chains={chains} x data={data} needs {chains * data} devices, but "
            f"{len(devices)} are available: use at most {len(devices)} in all."
        )
    return Mesh(np.array(devices[: chains * data]).reshape(chains, data), ("chain", "data"))


_AXES = {("chain",), ("data",), ("chain", "data")}


def _mesh(devices, num_chains: int, batch_size: int) -> Mesh | None:
    if devices is None:
        return None
    if isinstance(devices, Mesh):
        mesh = devices
        if tuple(mesh.axis_names) not in _AXES:
            raise ValueError(
                f"the mesh must have the axes ('chain',), ('data',) or ('chain', 'data'), got "
                f"axes {mesh.axis_names}; bn.sampling.make_mesh builds one."
            )
    else:
        devices = list(devices)
        if not devices:
            raise ValueError("devices is empty: pass None (no sharding) or at least one device.")
        mesh = Mesh(np.array(devices), ("chain",))
    shape = dict(mesh.shape)
    if num_chains % shape.get("chain", 1):
        raise ValueError(
            f"num_chains={num_chains} chains cannot be split evenly over {shape['chain']} devices "
            f"of the mesh's 'chain' axis: use a multiple of {shape['chain']} chains."
        )
    if batch_size % shape.get("data", 1):
        raise ValueError(
            f"batch_size={batch_size} cannot be split evenly over {shape['data']} devices of the "
            f"mesh's 'data' axis: use a multiple of {shape['data']} examples per minibatch."
        )
    return mesh


def run(
    key: jax.Array,
    params: PyTree,
    log_likelihood: Callable[..., jax.Array],
    log_prior: Callable[[PyTree], jax.Array],
    data: Sequence[Any],
    *,
    learning_rate: float | optax.Schedule,
    temperature: float = 1.0,
    transform: Callable[..., optax.GradientTransformation] = _sgld,
    batch_size: int | None = None,
    num_burnin: int = 0,
    num_samples: int = 1000,
    thin: int = 1,
    num_chains: int | None = None,
    params_per_chain: bool = False,
    num_traced: int = 8,
    devices: Sequence[jax.Device] | Mesh | None = None,
    progress: bool = False,
    progress_every: int | None = None,
) -> SamplingResult:
    """Runs SGLD chains and returns running posterior moments (no samples are stored).

    Every step t of every chain takes a minibatch B_t of n examples (a fresh permutation of the N
    examples per epoch and chain; the last incomplete batch of an epoch is skipped), computes
    g = ∇U(θ_t) with U(θ) = −log p(θ) − (N / n) Σ_{i ∈ B_t} log p(y_i | x_i, θ), and applies
    ``transform(learning_rate, temperature=temperature)``; for :func:`bayesnoise.sgld`,
    θ_{t+1} = θ_t − η_t g + N(0, 2 η_t T). After ``num_burnin`` steps, every ``thin``-th state
    θ_t (t = num_burnin + thin − 1, num_burnin + 2 thin − 1, ...) enters the chain's running
    moments; the chains' moments are then merged (:func:`bayesnoise.moments.merge_chains`).

    ``log_likelihood``, ``log_prior`` and the transform are static arguments of the compiled
    scan: calling again with the same function objects and settings (a float learning rate and
    temperature build an equal, cached transform) reuses it; new closures compile anew. A NaN or
    inf in a chain's U, gradient or state freezes that chain (its moments take no more states)
    and raises :class:`DivergenceError` after the scan: no host synchronisation in the loop.

    Args:
        key: a PRNG key, split into ``num_chains`` chains; or a vector of keys, one per chain
            (so chains can be rerun one at a time with ``key[c:c+1]``).
        params: the initial state, shared by all chains; with ``params_per_chain=True``, every
            leaf has a leading chain axis instead.
        log_likelihood: ``log_likelihood(params, *batch)`` -> per-example log-likelihoods of
            shape (n,), for ``batch`` the minibatch of every array in ``data``.
        log_prior: ``log_prior(params)`` -> scalar log prior density (for instance
            ``functools.partial(bn.gsm.log_prior, hierarchy=h)``).
        data: a tuple of arrays with a common leading axis of N examples, e.g. ``(x, y)``.
        learning_rate: the step size η (> 0) or an optax schedule t -> η_t
            (e.g. :func:`bayesnoise.polynomial_schedule`).
        temperature: T >= 0; 1 samples the posterior.
        transform: builds the update rule, called as ``transform(learning_rate,
            temperature=temperature)``: :func:`bayesnoise.sgld` (default),
            :func:`bayesnoise.psgld` or any compatible optax transform. Typed PRNG keys in its
            state are replaced by keys derived from each chain's key.
        batch_size: n, the minibatch size; None for the whole data set (no shuffling).
        num_burnin: steps before the first kept state.
        num_samples: states kept per chain (> 0).
        thin: keep every ``thin``-th state after burn-in.
        num_chains: the number of chains when ``key`` is a single key (default 1).
        params_per_chain: whether ``params`` already has a leading chain axis.
        num_traced: how many weights (evenly spaced over the flattened params) to trace for
            split R-hat and effective sample size.
        devices: devices to shard the chains over (a list); or a ``Mesh`` with the axes
            ``"chain"`` and/or ``"data"`` (see :func:`make_mesh`): chains split over
            ``"chain"``, every minibatch over ``"data"`` (data-parallel gradients).
            ``num_chains`` must be a multiple of the chain axis' size, ``batch_size`` of the
            data axis' size. None: no sharding.
        progress: show a tqdm progress bar, updated from the device every ``progress_every``
            steps (default: about 100 updates per run).

    Returns:
        A :class:`SamplingResult`: merged and per-chain moments, the final states, the thinned
        log-posterior estimates and weight traces, split R-hat and ESS of the traced weights.

    Raises:
        ValueError: for an invalid setting (named in the message), or when ``log_likelihood``
            or ``log_prior`` return the wrong shape.
        DivergenceError: (a ``FloatingPointError``) when a chain's log posterior, gradient or
            parameters become NaN or inf; the message names the step and the step size, and the
            error's ``result`` holds every chain frozen at its last finite state.

    References:
        Welling, M. & Teh, Y. W. (2011). Bayesian learning via stochastic gradient Langevin
        dynamics. ICML.
        Vehtari, A., Gelman, A., Simpson, D., Carpenter, B. & Bürkner, P.-C. (2021).
        Rank-normalization, folding, and localization: an improved R-hat for assessing
        convergence of MCMC. Bayesian Analysis (split R-hat and ESS).
    """
    chain_keys = _chain_keys(key, num_chains)
    n_chains = chain_keys.shape[0]
    num_burnin = _check_positive_int("num_burnin", num_burnin, 0, "steps before sampling")
    num_samples = _check_positive_int("num_samples", num_samples, 1, "states kept per chain")
    thin = _check_positive_int("thin", thin, 1, "keep every thin-th state")
    num_traced = _check_positive_int("num_traced", num_traced, 0, "weights traced")
    if not callable(log_likelihood) or not callable(log_prior):
        raise ValueError("log_likelihood and log_prior must be callables.")

    if isinstance(data, (jax.Array, np.ndarray)):
        raise ValueError(
            "data must be a tuple of arrays such as (x, y), unpacked into log_likelihood(params, "
            "*batch); wrap a single array as (x,)."
        )
    data = tuple(jnp.asarray(a) for a in data)
    if not data:
        raise ValueError("data is empty: pass a tuple of arrays such as (x, y).")
    num_data = data[0].shape[0] if data[0].ndim else 0
    for a in data:
        if a.ndim == 0 or a.shape[0] != num_data:
            shapes = [tuple(b.shape) for b in data]
            raise ValueError(
                f"every array in data needs the same leading axis of examples; got shapes {shapes}."
            )
    if num_data == 0:
        raise ValueError("data holds no examples.")
    if batch_size is None:
        batch_size = num_data
    batch_size = _check_positive_int("batch_size", batch_size, 1, "examples per minibatch")
    if batch_size > num_data:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {num_data} examples in data; use at most "
            f"{num_data}, or None for the whole data set."
        )

    if params_per_chain:
        for leaf in jax.tree.leaves(params):
            if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != n_chains:
                raise ValueError(
                    f"params_per_chain=True needs a leading axis of {n_chains} chains on every "
                    f"leaf, got a leaf of shape {jnp.shape(leaf)}."
                )
        one_params = jax.tree.map(lambda x: x[0], params)
    else:
        one_params = params
    if not jax.tree.leaves(one_params):
        raise ValueError("params has no array leaves to sample.")

    # Shapes of the user's functions, checked once before compiling the whole run.
    batch = tuple(jax.ShapeDtypeStruct((batch_size,) + a.shape[1:], a.dtype) for a in data)
    ll_shape = jax.eval_shape(log_likelihood, one_params, *batch).shape
    if ll_shape != (batch_size,):
        raise ValueError(
            f"log_likelihood(params, *batch) must return one log-likelihood per example, shape "
            f"({batch_size},) for a batch of {batch_size}; got shape {ll_shape}. Return the "
            f"per-example values, not their sum or mean (the sampler scales them by N/n)."
        )
    lp_shape = jax.eval_shape(log_prior, one_params).shape
    if lp_shape != ():
        raise ValueError(f"log_prior(params) must return a scalar, got shape {lp_shape}.")

    optimizer = _make_transform(transform, learning_rate, temperature)
    total = num_burnin + num_samples * thin
    trace_spec, trace_names = _trace_spec(one_params, num_traced)

    mesh = _mesh(devices, n_chains, batch_size)
    if mesh is not None:
        by_chain = NamedSharding(mesh, P("chain" if "chain" in mesh.axis_names else None))
        replicated = NamedSharding(mesh, P())
        chain_keys = jax.device_put(chain_keys, by_chain)
        params = jax.device_put(params, by_chain if params_per_chain else replicated)
        data = jax.device_put(data, replicated)

    if progress:
        every = progress_every or max(1, total // 100)
        every = _check_positive_int("progress_every", every, 1, "steps between bar updates")
        from tqdm.auto import tqdm

        bar_id = next(_BAR_IDS)
        _BARS[bar_id] = tqdm(total=total, desc="sgld", unit="step")
    else:
        every, bar_id = 0, -1
    try:
        carry, merged = _sample(
            chain_keys,
            params,
            data,
            jax.device_put(np.int32(bar_id)),
            log_likelihood=log_likelihood,
            log_prior=log_prior,
            optimizer=optimizer,
            batch_size=batch_size,
            num_burnin=num_burnin,
            num_samples=num_samples,
            thin=thin,
            trace_spec=trace_spec,
            mesh=mesh,
            progress_every=every,
            params_per_chain=bool(params_per_chain),
        )
        jax.block_until_ready(carry)
        if progress:
            jax.effects_barrier()
    finally:
        if progress:
            _BARS.pop(bar_id).close()

    # Explicit transfers only (the run works under jax.transfer_guard("disallow")).
    trace = np.asarray(jax.device_get(carry.trace), np.float64)
    rhat, ess = _diagnostics(trace)
    result = SamplingResult(
        moments=merged,
        chain_moments=carry.moments,
        params=carry.params,
        opt_state=carry.opt_state,
        log_posterior=carry.log_post,
        trace=carry.trace,
        trace_names=trace_names,
        rhat=rhat,
        ess=ess,
        num_steps=total,
    )
    bad = jax.device_get(carry.bad_step)
    if (bad >= 0).any():
        steps = np.where(bad >= 0, bad, np.iinfo(np.int32).max)
        chain = int(np.argmin(steps))
        step = int(steps[chain])
        eta = float(_step_size(learning_rate, step))
        phase = (
            f"burn-in step {step}" if step < num_burnin else f"sampling step {step - num_burnin}"
        )
        lr_text = "a schedule" if callable(learning_rate) else repr(learning_rate)
        raise DivergenceError(
            f"SGLD diverged at step {step} ({phase}, chain {chain}) with step size η_t = {eta:g}: "
            f"the log posterior, its gradient or the parameters became NaN or inf. Lower the "
            f"learning rate (now {lr_text}), or check log_likelihood and log_prior at the last "
            f"finite state (the error's .result.params). "
            f"{int((bad >= 0).sum())} of {n_chains} chains diverged.",
            step=step,
            step_size=eta,
            chain=chain,
            result=result,
        )
    return result


def _diagnostics(trace: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split R-hat and ESS per traced weight from a (chains, draws, k) trace."""
    from numpyro.diagnostics import effective_sample_size, split_gelman_rubin

    k = trace.shape[-1]
    if trace.shape[1] < 4 or k == 0:
        nan = np.full((k,), np.nan)
        return nan, nan
    with np.errstate(divide="ignore", invalid="ignore"):
        rhat = np.asarray(split_gelman_rubin(trace), np.float64)
        ess = np.asarray(effective_sample_size(trace), np.float64)
    return rhat, ess
