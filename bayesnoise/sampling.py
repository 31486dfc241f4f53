"""Posterior moments by SGLD for any model: building blocks, and many chains in one compiled loop.

The sampler comes in BlackJAX's shape: :func:`init` builds a chain's state, :func:`step` takes
one key-first, pure step on a minibatch, and :func:`run` is built from them (chains a
``jax.vmap`` axis, all steps one ``jax.lax.while_loop`` under one ``jax.jit``). A step estimates
the negative log posterior of the whole data set from a minibatch of n of the N examples,

    U(θ) = −log p(θ) − (N / n) Σ_{i ∈ batch} log p(y_i | x_i, θ),

and applies an SGLD transform (:func:`bayesnoise.sgld` by default), handing it the step's own
key. :func:`run` adds every ``thin``-th state after ``num_burnin`` steps to running moments
(:mod:`bayesnoise.moments`, Welford) and, when asked, to a Bayesian model average of the
predictive distribution on held-out inputs: no sample is stored. Memory is O(params × chains).

Without a learning rate, :func:`run` chooses settings that converge (:func:`auto_settings`): a
fixed diagonal preconditioner, the diagonal Laplace variance T / (N·diag GGN + prior precision),
so every weight relaxes at a comparable rate; a step size below the stability limit of the
preconditioned Hessian; a smaller step where the data dominates, so that the minibatch gradient
noise stays a small part of the injected noise (where every step draws a fresh minibatch, its
estimate is also subtracted from the injected noise, as in stochastic gradient Fisher scoring);
and numbers of steps from the resulting
relaxation time. After the loop, split R-hat and the effective sample size of (by default 64)
traced weights spread over every leaf say whether the chains converged, and a ``logging``
warning says when they did not.

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

    The building blocks, driven from a loop of one's own:

    >>> state = bn.sampling.init({"w": jnp.zeros(2)}, log_likelihood, log_prior, num_data=100,
    ...                          transform=bn.sgld(1e-5))
    >>> for t in range(3):
    ...     state, info = bn.sampling.step(jax.random.key(t), state, (x[:20], y[:20]))
    >>> int(state.count), bool(info.finite)
    (3, True)

References:
    Welling, M. & Teh, Y. W. (2011). Bayesian learning via stochastic gradient Langevin
    dynamics. ICML.
    Ahn, S., Korattikara, A. & Welling, M. (2012). Bayesian posterior sampling via stochastic
    gradient Fisher scoring. ICML.
    Vehtari, A., Gelman, A., Simpson, D., Carpenter, B. & Bürkner, P.-C. (2021).
    Rank-normalization, folding, and localization: an improved R-hat for assessing
    convergence of MCMC. Bayesian Analysis.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bayesnoise import _check, _loop, _resume, _tree
from bayesnoise import gsm as _gsm
from bayesnoise import moments as _moments
from bayesnoise._tree import PyTree
from bayesnoise.sgld import BAOABState as _BAOABState
from bayesnoise.sgld import _check_preconditioner
from bayesnoise.sgld import baoab as _baoab
from bayesnoise.sgld import sgld as _sgld
from bayesnoise.sgld import step_size as _step_size

__all__ = [
    "Kernel",
    "SamplerState",
    "StepInfo",
    "UnitSwaps",
    "ClassShifts",
    "AutoSettings",
    "SamplingResult",
    "DivergenceError",
    "init",
    "step",
    "auto_settings",
    "prior_precision",
    "max_curvature",
    "make_mesh",
    "run",
    "unit_swaps",
    "class_shifts",
    "Centring",
    "centring",
]

logger = logging.getLogger("bayesnoise")


# ------------------------------------------------------------------------ the building blocks


@dataclasses.dataclass(frozen=True)
class Kernel:
    """The static settings of a chain: what :func:`step` needs besides the key and the batch.

    Attributes:
        log_likelihood: ``log_likelihood(params, *batch)`` -> per-example values, shape (n,).
        log_prior: ``log_prior(params)`` -> scalar.
        num_data: N, the number of examples the minibatch log-likelihood is scaled to.
        transform: the optax transform that turns ∇U into the update (e.g. ``bn.sgld(η)``);
            it is given each step's key as the extra argument ``key=``.
        move: None, or a tuple of exact moves made in turn before every step
            (:class:`UnitSwaps`, :class:`ClassShifts`).
        temperature: T of the tempered posterior exp(−U / T) the move keeps (that of the
            transform).
    """

    log_likelihood: Callable[..., jax.Array]
    log_prior: Callable[[PyTree], jax.Array]
    num_data: int
    transform: optax.GradientTransformation
    move: Any = None
    temperature: float = 1.0

    def potential(self, params: PyTree, batch: tuple) -> jax.Array:
        """U(θ) on ``batch``: −log p(θ) − (N / n) Σ_batch log p(y | x, θ)."""
        ll = self.log_likelihood(params, *batch)
        n = jax.tree.leaves(batch)[0].shape[0]
        return -(self.log_prior(params) + (self.num_data / n) * jnp.sum(ll))


@dataclasses.dataclass(frozen=True)
class SamplerState:
    """One chain: its position, its transform's state and its step count (a pytree whose
    ``kernel`` is static, so the state passes through ``jit``, ``vmap`` and ``scan``)."""

    params: PyTree  # θ_t
    opt_state: PyTree  # the transform's state
    count: jax.Array  # shape (), int32: steps taken
    kernel: Kernel  # static settings
    # bn.baoab's multipliers M, carried by the chain (moved with the units by an exchange);
    # None: the transform's own
    preconditioner: PyTree = None
    # the prior precision P by position, where M = T / (c + P) splits into a unit's own
    # curvature c, which an exchange moves, and P, which stays (None: M moves whole)
    prior_precision: PyTree = None

    def replace(self, **kwargs) -> SamplerState:
        return dataclasses.replace(self, **kwargs)


jax.tree_util.register_dataclass(
    SamplerState,
    data_fields=["params", "opt_state", "count", "preconditioner", "prior_precision"],
    meta_fields=["kernel"],
)


class StepInfo(NamedTuple):
    log_posterior: jax.Array  # shape (): −U(θ_t) on the step's batch, at the state before it
    finite: jax.Array  # shape (), bool: U, ∇U and θ_{t+1} finite (else the state is unchanged)


def init(
    params: PyTree,
    log_likelihood: Callable[..., jax.Array],
    log_prior: Callable[[PyTree], jax.Array],
    num_data: int,
    *,
    transform: optax.GradientTransformation,
    move: UnitSwaps | ClassShifts | tuple | None = None,
    temperature: float = 1.0,
    preconditioner: PyTree | None = None,
    prior_precision: PyTree | None = None,
) -> SamplerState:
    """A chain's state at ``params``.

    Args:
        params: the initial position θ_0 (any pytree of float arrays).
        log_likelihood: ``log_likelihood(params, *batch)`` -> per-example log-likelihoods (n,).
        log_prior: ``log_prior(params)`` -> scalar log prior density.
        num_data: N, the size of the whole data set (the minibatch sum is scaled by N / n).
        transform: an optax transform, e.g. ``bn.sgld(1e-5)`` or ``bn.psgld(...)``.
        move: None, a :class:`UnitSwaps` (from :func:`unit_swaps`): an exact Metropolis move
            that exchanges hidden units, a :class:`ClassShifts` (from :func:`class_shifts`):
            an exact draw along the directions a softmax ignores, or a tuple of them, made in
            turn before every step.
        temperature: T >= 0, the transform's own temperature (the move accepts by
            exp(Δ log p / T)); only read with a move, which is exact only when the two agree.
        preconditioner: None, or multipliers M > 0 shaped like ``params`` that the chain
            carries for a :func:`bayesnoise.baoab` transform: every step hands them to it
            (``update(..., preconditioner=M)``), and a :class:`UnitSwaps` exchange moves them,
            and the momentum, with the units, so each unit keeps the step sized for its own
            curvature wherever it goes. Exact: BAOAB's momentum is N(0, T) whatever M is, so
            the exchange of (θ, p, M) together keeps the target, and the move accepts by the
            prior's ratio as before.
        prior_precision: None, or with ``preconditioner`` and a move, the prior precision P
            of every weight in its place (> 0, shaped like ``params``), for multipliers of the
            form M = T / (c + P): an exchange then moves each weight's own curvature
            c = T / M − P with its unit and leaves P in place, so a unit that lands where the
            prior is tighter gets a shorter step there (the automatic settings' form; a whole
            M carried into such a place can exceed the step's stability bound).

    Returns:
        A :class:`SamplerState` for :func:`step`.

    Raises:
        ValueError: ``num_data`` is not an int >= 1, ``transform`` is not an optax transform,
            ``temperature`` is not finite and >= 0, concrete ``params`` hold a NaN or
            infinite entry, a move's leaves are not in ``params``, or a
            :class:`ClassShifts` meets a prior other than the GSM's.
        TypeError: ``log_likelihood`` or ``log_prior`` is not callable, ``temperature`` is not
            a real number (or, with a move, is traced), or ``move`` is not None, a move or a
            tuple of moves.
    """
    num_data = _check_positive_int("num_data", num_data, 1, "the number of examples N")
    _check_callables(log_likelihood, log_prior)
    _check_start(params)
    if not hasattr(transform, "init") or not hasattr(transform, "update"):
        raise ValueError(
            f"transform must be an optax GradientTransformation (such as bn.sgld(1e-5)), got "
            f"{transform!r}."
        )
    if _check.concrete(temperature):
        _check.number("temperature", temperature, lo=0.0)
    if move is not None:
        _check_move(move)
        move = _move_list(move)
        _check_moves_fit(move, params, log_prior)
        if not _check.concrete(temperature):
            raise TypeError(
                "temperature must be a concrete number with a move (it is a static setting of "
                "the chain's kernel), got a traced value."
            )
        temperature = float(temperature)
    kernel = Kernel(
        log_likelihood,
        log_prior,
        num_data,
        optax.with_extra_args_support(transform),
        move,
        temperature if move is not None else 1.0,
    )
    opt_state = kernel.transform.init(params)
    if preconditioner is not None:
        _check_carried(preconditioner, params, opt_state)
    if prior_precision is not None:
        if preconditioner is None or move is None:
            raise ValueError(
                "prior_precision= splits a carried preconditioner between the units and their "
                "places: it needs preconditioner= and a move."
            )
        _check_preconditioner(prior_precision, params, "prior_precision")
    return SamplerState(
        params,
        opt_state,
        jnp.zeros((), jnp.int32),
        kernel,
        preconditioner=preconditioner,
        prior_precision=prior_precision,
    )


def _baoab_states(opt_state: PyTree) -> list:
    """bn.baoab's states inside ``opt_state`` (also inside optax.chain or inject_hyperparams)."""
    leaves = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, _BAOABState))
    return [x for x in leaves if isinstance(x, _BAOABState)]


def _check_carried(preconditioner: PyTree, params: PyTree, opt_state: PyTree) -> None:
    """The multipliers a chain carries fit ``params`` and a bn.baoab transform takes them."""
    _check_preconditioner(preconditioner, params)
    if not _baoab_states(opt_state):
        raise ValueError(
            "preconditioner= in the chain's state needs a bn.baoab transform, which takes it "
            "at every update; pass the multipliers to the transform itself "
            "(e.g. bn.sgld(..., preconditioner=M)) for any other."
        )


def _check_start(params: PyTree, name: str = "params") -> None:
    """Raises a ValueError naming the first leaf of concrete ``params`` that is not finite."""
    _check.finite_leaves(
        params,
        f"{name} (the starting state)",
        "A chain cannot start there; a smaller step size does not help.",
    )


def _check_callables(log_likelihood: Any, log_prior: Any) -> None:
    _check.function("log_likelihood", log_likelihood, _check.LOG_LIKELIHOOD)
    _check.function("log_prior", log_prior, "log_prior(params) -> scalar")


def step(key: jax.Array, state: SamplerState, batch: tuple) -> tuple[SamplerState, StepInfo]:
    """One SGLD step on ``batch``: θ_{t+1} from g = ∇U(θ_t) and the transform, with ``key``.

    Pure and key-first, as BlackJAX's kernels: the key is handed to the transform as the extra
    argument ``key=`` (so every chain driven with its own keys has its own noise), never stored.
    A non-finite U or new state leaves the state unchanged and sets ``info.finite = False``:
    the chain freezes instead of spreading NaN. A NaN gradient always makes the new state NaN;
    an infinite one makes it infinite, unless a drift clip (``max_drift``) bounds the move.
    With a ``move`` in the chain's kernel (:func:`init`), the move comes first, with a key
    folded from ``key``; the step then takes the gradient at the moved state (with
    :func:`bayesnoise.baoab`, half of it and half of the gradient before the move, which closes
    the last step's pending half kick where that step ended).

    Args:
        key: a PRNG key for this step's noise.
        state: from :func:`init` or an earlier step.
        batch: a tuple of arrays with a common leading axis of n examples.

    Returns:
        ``(new_state, info)``: the next state and a :class:`StepInfo`.

    Raises:
        TypeError: ``key`` is not a PRNG key, ``state`` not a :class:`SamplerState`, or
            ``batch`` not a tuple of arrays.
        ValueError: the arrays of ``batch`` differ in their leading axis.
    """
    if _check.concrete(key):
        _check.key("key", key)
    if not isinstance(state, SamplerState):
        raise TypeError(
            f"state must be a SamplerState (from bn.sampling.init), got {type(state).__name__}."
        )
    if not isinstance(batch, Sequence) or isinstance(batch, (str, bytes)):
        raise TypeError(
            f"batch must be a tuple of arrays with a common leading axis, such as (x, y); got "
            f"{type(batch).__name__}{' of shape ' + str(np.shape(batch)) if hasattr(batch, 'shape') else ''}."
        )
    batch = tuple(batch)
    sizes = [jnp.shape(a)[0] if jnp.ndim(a) else None for a in jax.tree.leaves(batch)]
    if not sizes or None in sizes or len(set(sizes)) != 1 or sizes[0] == 0:
        raise ValueError(
            f"batch must be a tuple of arrays with a common leading axis of n >= 1 examples; got "
            f"shapes {[tuple(jnp.shape(a)) for a in jax.tree.leaves(batch)]}."
        )
    proposed, u, ok = _propose(key, state, batch)
    return _accept(ok, proposed, state), StepInfo(log_posterior=-u, finite=ok)


def _propose(key: jax.Array, state: SamplerState, batch: tuple):
    """(the state one step on, U at the old state, whether U and the new state are finite),
    nothing rejected yet: the compiled loop adds its own tests and selects once."""
    kernel = state.kernel
    u, grads = jax.value_and_grad(kernel.potential)(state.params, batch)
    moved = state
    if kernel.move is not None:
        moved, grads = _moved(key, state, grads)
    extra = {} if moved.preconditioner is None else {"preconditioner": moved.preconditioner}
    updates, new_opt = kernel.transform.update(
        grads, moved.opt_state, moved.params, key=key, **extra
    )
    new_params = optax.apply_updates(moved.params, updates)
    # a non-finite gradient reaches the new state (θ − η·NaN, or a clipped drift of NaN), so
    # one reduction over the new state covers both
    ok = jnp.isfinite(u) & _check.all_finite(new_params)
    proposed = moved.replace(params=new_params, opt_state=new_opt, count=state.count + 1)
    return proposed, u, ok


def _accept(ok: jax.Array, proposed: SamplerState, state: SamplerState) -> SamplerState:
    """``proposed`` where ``ok``, else ``state`` unchanged (count included)."""
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), proposed, state)


# ------------------------------------------------------------------- an exact move: unit swaps

# folded into a step's key for its move, so the transform's noise is the same with and without
_MOVE_SALT = 0x6D6F7665


def _path_axis_pairs(x: Any) -> bool:
    """Whether ``x`` is a non-empty tuple of (leaf path, axis) pairs: (str, int)."""
    return (
        isinstance(x, tuple)
        and bool(x)
        and all(
            isinstance(e, tuple)
            and len(e) == 2
            and isinstance(e[0], str)
            and isinstance(e[1], int)
            and not isinstance(e[1], bool)
            for e in x
        )
    )


def _leaf_index(tree: PyTree) -> tuple[list, Any, dict[str, int]]:
    """(leaves, treedef, {leaf path: index of the leaf})."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [x for _, x in flat], treedef, {_tree.path_str(p): i for i, (p, _) in enumerate(flat)}


def _leaf_at(index: dict[str, int], path: str, who: str) -> int:
    """The index of the leaf at ``path``; a ValueError naming the leaves there are if none."""
    if path not in index:
        raise ValueError(
            f"{who}: no leaf {path!r} in the params; their leaves are {sorted(index)}."
        )
    return index[path]


@dataclasses.dataclass(frozen=True)
class UnitSwaps:
    """An exact Metropolis move that exchanges hidden units of a network.

    Exchanging two hidden units of a layer (their incoming weights and bias, and their outgoing
    weights) leaves the likelihood of an MLP unchanged. Under a prior that treats the two units
    alike it leaves the posterior unchanged too; under the GSM prior with its own scale for every
    unit's outgoing row it does not, and the move accepts the exchange with probability
    min(1, exp((log p(θ') − log p(θ)) / T)), which the prior alone decides. Each call proposes
    up to ``max_pairs`` disjoint random pairs per layer among that layer's ``candidates`` and
    decides each pair in turn: a Metropolis–Hastings move with a symmetric proposal, so the
    chain's target is kept exactly. Build it with :func:`unit_swaps`. With the GSM prior passed
    as ``jax.tree_util.Partial(bn.gsm.full_log_prior, hierarchy=h)`` (as
    :func:`bayesnoise.em.e_step` does) the prior ratio of a pair is read from the two exchanged
    slices of each leaf alone; any other prior is evaluated whole at every proposed pair.

    The move jumps between configurations that gradient steps cross only slowly: on the digits
    network under EM's scales, units that trade roles (README, "Exchanging hidden units").
    The chains' moments then describe the posterior with its exchanges: a hidden weight's mean
    averages over the units that take its place, so the network at the posterior mean, and
    pruning scores read from the chains' moments, lose their meaning, while the model average
    and the function-space diagnostics keep theirs. Where the prior treats all units alike
    (every outgoing scale equal) every exchange is accepted, and the weights' R-hat and ESS then
    say how well the chains mix over the exchanges, not whether their networks mixed: read the
    predictions' R-hat and ESS (``result.predictive_rhat``) beside them. With
    ``auto={"swap_invariant": True}`` the automatic settings of :func:`run` pass their
    preconditioner through :meth:`invariant`, so that a step sized for the state before an
    exchange stays stable after it. By default the automatic settings of :func:`bayesnoise.baoab`
    let every chain carry its preconditioner instead (``auto={"carry_preconditioner": False}``
    switches it off), and an exchanged unit takes its own multipliers and momentum to its new
    place (:func:`init`'s ``preconditioner=``).

    Attributes:
        layers: per hidden layer, ``((leaf path, unit axis), ...)``: every leaf that holds the
            layer's units and the axis that indexes them, e.g.
            ``(("params/Dense_0/kernel", 1), ("params/Dense_0/bias", 0),
            ("params/Dense_1/kernel", 0))``.
        candidates: per hidden layer, the units that may be paired (at least 2 for any move).
        max_pairs: the most pairs proposed per layer and call (>= 1).
    """

    layers: tuple[tuple[tuple[str, int], ...], ...]
    candidates: tuple[tuple[int, ...], ...]
    max_pairs: int = 8

    def __post_init__(self):
        if not isinstance(self.layers, tuple) or not self.layers:
            raise ValueError(
                f"layers must be a non-empty tuple with one ((leaf path, unit axis), ...) per "
                f"hidden layer, got {self.layers!r}."
            )
        for layer in self.layers:
            if not _path_axis_pairs(layer):
                raise ValueError(
                    f"every layer must be a non-empty tuple of (leaf path, unit axis) pairs, "
                    f"such as (('params/Dense_0/kernel', 1), ('params/Dense_1/kernel', 0)); "
                    f"got {layer!r}."
                )
        if not isinstance(self.candidates, tuple) or len(self.candidates) != len(self.layers):
            raise ValueError(
                f"candidates must be a tuple with one tuple of unit indices per layer "
                f"({len(self.layers)}), got {self.candidates!r}."
            )
        for c in self.candidates:
            if (
                not isinstance(c, tuple)
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in c)
                or len(set(c)) != len(c)
            ):
                raise ValueError(
                    f"every layer's candidates must be a tuple of distinct unit indices >= 0, "
                    f"got {c!r}."
                )
        if isinstance(self.max_pairs, bool) or not isinstance(self.max_pairs, int):
            raise TypeError(f"max_pairs must be an int >= 1, got {self.max_pairs!r}.")
        if self.max_pairs < 1:
            raise ValueError(f"max_pairs must be an int >= 1, got {self.max_pairs}.")

    def _leaves(self, tree: PyTree):
        """(leaves, treedef, per layer [(leaf index, axis)], per layer number of units)."""
        leaves, treedef, index = _leaf_index(tree)
        where, sizes = [], []
        for layer, cand in zip(self.layers, self.candidates):
            spots = []
            for path, axis in layer:
                shape = jnp.shape(leaves[_leaf_at(index, path, "UnitSwaps")])
                if not -len(shape) <= axis < len(shape):
                    raise ValueError(
                        f"UnitSwaps: axis {axis} of {path!r} is out of range for its shape {shape}; "
                        f"allowed: {-len(shape)} to {len(shape) - 1}."
                    )
                spots.append((index[path], axis % len(shape)))
            n = {jnp.shape(leaves[i])[a] for i, a in spots}
            if len(n) != 1:
                got = [(p, jnp.shape(leaves[i])[a]) for (p, _), (i, a) in zip(layer, spots)]
                raise ValueError(
                    f"UnitSwaps: the leaves of one layer must hold the same number of units "
                    f"along their axes, got {got}."
                )
            (n,) = n
            if cand and max(cand) >= n:
                raise ValueError(
                    f"UnitSwaps: candidate unit {max(cand)} does not exist in a layer of {n} units; "
                    f"allowed: 0 to {n - 1}."
                )
            where.append(spots)
            sizes.append(n)
        return leaves, treedef, where, sizes

    def __call__(
        self,
        key: jax.Array,
        params: PyTree,
        log_prior: Callable[[PyTree], jax.Array],
        temperature: float = 1.0,
    ) -> tuple[PyTree, tuple[jax.Array, ...], jax.Array]:
        """One move: ``(new params, per layer the source of each unit, swaps accepted per
        layer)``. Unit i of a layer after the move is unit ``sources[layer][i]`` before it."""
        leaves, treedef, where, sizes = self._leaves(params)
        leaves = list(leaves)
        variances = _factorised_variances(log_prior, params)
        lp = log_prior(params) if variances is None else jnp.zeros(())
        sources, accepted = [], []
        for li, (spots, n, cand) in enumerate(zip(where, sizes, self.candidates)):
            src = jnp.arange(n)
            m = min(self.max_pairs, len(cand) // 2)
            if m == 0:
                sources.append(src)
                accepted.append(jnp.zeros((), jnp.int32))
                continue
            k_pairs, k_accept = jax.random.split(jax.random.fold_in(key, li))
            order = jnp.asarray(cand)[jax.random.permutation(k_pairs, len(cand))[: 2 * m]]
            log_u = jnp.log(jax.random.uniform(k_accept, (m,)))
            mine = [i for i, _ in spots]
            axes = [a for _, a in spots]
            var = None if variances is None else [variances[i] for i in mine]

            def pair(i, carry, order=order, log_u=log_u, mine=mine, axes=axes, var=var):
                values, lp, src, count = carry
                j, k = order[2 * i], order[2 * i + 1]
                if var is None:  # any prior: evaluate it at the exchanged params
                    trial = list(leaves)
                    for i_leaf, v, a in zip(mine, values, axes):
                        trial[i_leaf] = _exchange(v, a, j, k, True)
                    lp_new = log_prior(jax.tree.unflatten(treedef, trial))
                else:  # a factorised Gaussian prior: only the exchanged slices change
                    lp_new = lp + sum(
                        _exchange_log_ratio(v, s2, a, j, k) for v, s2, a in zip(values, var, axes)
                    )
                ok = jnp.isfinite(lp_new) & (log_u[i] * temperature < lp_new - lp)
                values = [_exchange(v, a, j, k, ok) for v, a in zip(values, axes)]
                src = _exchange(src, 0, j, k, ok)
                return values, jnp.where(ok, lp_new, lp), src, count + ok.astype(jnp.int32)

            # the leaves the pairs change travel through the loop; the others stay closed over
            values, lp, src, count = jax.lax.fori_loop(
                0, m, pair, ([leaves[i] for i in mine], lp, src, jnp.zeros((), jnp.int32))
            )
            for i_leaf, v in zip(mine, values):
                leaves[i_leaf] = v
            sources.append(src)
            accepted.append(count)
        return jax.tree.unflatten(treedef, leaves), tuple(sources), jnp.stack(accepted)

    def invariant(self, tree: PyTree) -> PyTree:
        """``tree`` (shaped like the params, e.g. a diagonal preconditioner) with the slices of
        each layer's candidate units replaced by their elementwise minimum over those units: a
        tree every exchange the move can make leaves unchanged.

        With ``auto={"swap_invariant": True}`` the automatic settings of :func:`run` pass
        their preconditioner through this. A preconditioner sized to each unit's own curvature
        no longer fits once the move has exchanged a unit of high curvature into the place of
        one of low curvature, and the preconditioned curvature there can exceed the λ_max the
        step was chosen for (on MNIST's EM posterior two chains diverged within 900 steps).
        With the minimum, the preconditioned Hessian at an exchanged state is the one at the
        state before it with its units permuted, whose largest eigenvalue is at most that under
        the unit's own preconditioner (M only shrinks). The price is shorter steps for every
        unit but the one of highest curvature: on MNIST the output weights' multipliers fall by
        a median factor of about 100, and on digits the chains no longer converge in 80,000
        steps (README, "Centring the biases"), so it is not the default."""
        leaves, treedef, where, _ = self._leaves(tree)
        leaves = list(leaves)
        for spots, cand in zip(where, self.candidates):
            if len(cand) < 2:
                continue
            idx = jnp.asarray(cand)
            for i, a in spots:
                low = jnp.min(jnp.take(leaves[i], idx, axis=a), axis=a, keepdims=True)
                shape = list(jnp.shape(leaves[i]))
                shape[a] = len(cand)
                leaves[i] = leaves[i].at[_slice(a, idx)].set(jnp.broadcast_to(low, shape))
        return jax.tree.unflatten(treedef, leaves)

    def permute(self, tree: PyTree, sources: tuple[jax.Array, ...]) -> PyTree:
        """``tree`` (shaped like the params, e.g. a gradient) with its units moved as the move
        moved the params' (``sources`` from the call)."""
        leaves, treedef, where, _ = self._leaves(tree)
        leaves = list(leaves)
        for spots, src in zip(where, sources):
            for i, a in spots:
                leaves[i] = jnp.take(leaves[i], src, axis=a)
        return jax.tree.unflatten(treedef, leaves)


def _slice(axis: int, i: Any) -> tuple:
    return (slice(None),) * axis + (i,)


def _exchange(x: jax.Array, axis: int, j: jax.Array, k: jax.Array, ok: Any) -> jax.Array:
    """``x`` with its slices j and k along ``axis`` exchanged where ``ok`` (only those two
    slices are written)."""
    xj, xk = x[_slice(axis, j)], x[_slice(axis, k)]
    return (
        x.at[_slice(axis, j)]
        .set(jnp.where(ok, xk, xj))
        .at[_slice(axis, k)]
        .set(jnp.where(ok, xj, xk))
    )


def _exchange_log_ratio(x, variance, axis, j, k) -> jax.Array:
    """log N(x'; 0, variance) − log N(x; 0, variance) for x' = ``x`` with its slices j and k
    along ``axis`` exchanged: only those slices enter (the normalisers cancel)."""
    xj, xk = x[_slice(axis, j)], x[_slice(axis, k)]
    vj, vk = variance[_slice(axis, j)], variance[_slice(axis, k)]
    xj2, xk2 = jnp.square(xj), jnp.square(xk)
    return -0.5 * jnp.sum(xk2 / vj + xj2 / vk - xj2 / vj - xk2 / vk)


def _factorised_variances(log_prior: Any, params: PyTree) -> list | None:
    """The prior variance of every leaf of ``params`` where ``log_prior`` is the GSM's
    factorised Gaussian prior, ``jax.tree_util.Partial(bn.gsm.full_log_prior, hierarchy=h)``
    (as :func:`bayesnoise.em.e_step` builds it); None for any other prior."""
    if not (
        isinstance(log_prior, jax.tree_util.Partial)
        and log_prior.func is _gsm.full_log_prior
        and not log_prior.args
        and set(log_prior.keywords) == {"hierarchy"}
    ):
        return None
    variance = _gsm.prior_variance(params, log_prior.keywords["hierarchy"])
    return [
        jnp.broadcast_to(v, jnp.shape(x))
        for v, x in zip(jax.tree.leaves(variance), jax.tree.leaves(params))
    ]


def unit_swaps(
    params: PyTree,
    *,
    hierarchy: Any = None,
    min_scale: float = 1e-4,
    max_pairs: int = 8,
) -> UnitSwaps:
    """The :class:`UnitSwaps` move for an MLP's params: a chain of dense layers (leaves named
    ``kernel`` of shape (in, out) and ``bias`` of shape (out,) under parents numbered in order,
    such as Flax's ``Dense_0``, ``Dense_1``, ... or an NNX list's ``layers/0``, ...) with an
    elementwise activation between them, as :class:`bayesnoise.nn.MLP`.

    Hidden layer l's units are the columns of kernel l, the entries of bias l and the rows of
    kernel l + 1. With ``hierarchy`` (a :class:`bayesnoise.gsm.Hierarchy`), only units whose
    outgoing row holds a scale above the floor (:func:`bayesnoise.em.pruned_rows` with
    ``min_scale``) are paired: a unit EM switched off cannot take a kept unit's role.

    Example:
        >>> import jax, jax.numpy as jnp, bayesnoise as bn
        >>> params = {"params": {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)},
        ...                      "Dense_1": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}}
        >>> move = bn.sampling.unit_swaps(params)
        >>> move.layers[0]
        (('params/Dense_0/kernel', 1), ('params/Dense_0/bias', 0), ('params/Dense_1/kernel', 0))

    Raises:
        ValueError: the params hold fewer than two dense layers, or consecutive layers' sizes
            do not chain.
        TypeError: ``hierarchy`` is not None or a :class:`bayesnoise.gsm.Hierarchy`.
    """
    from bayesnoise import em, gsm

    dense = _dense_layers(params)
    if len(dense) < 2:
        raise ValueError(
            f"unit_swaps needs an MLP's params: at least two dense layers (a 2-D 'kernel' leaf "
            f"under numbered parents such as Dense_0, Dense_1); found the dense layers "
            f"{[layer['kernel'][0] for layer in dense]}."
        )
    scales = None
    if hierarchy is not None:
        if not isinstance(hierarchy, gsm.Hierarchy):
            raise TypeError(
                f"hierarchy must be None or a bn.gsm.Hierarchy, got {type(hierarchy).__name__}."
            )
        pruned = em.pruned_rows(hierarchy.scales, min_scale)
        # the rows of an outgoing kernel are its units where its scales index axis 0
        row_axis = dict(hierarchy.axes)
        scales = {
            _tree.path_str(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(
                pruned, is_leaf=lambda x: x is None
            )[0]
            if row_axis.get(_tree.path_str(path), 0) == 0
        }
    spec, candidates = [], []
    for a, b in zip(dense[:-1], dense[1:]):
        k_in, shape_in = a["kernel"]
        k_out, shape_out = b["kernel"]
        if shape_in[1] != shape_out[0]:
            raise ValueError(
                f"unit_swaps: {k_in} has {shape_in[1]} outputs but {k_out} has {shape_out[0]} "
                f"inputs; the dense layers do not form a chain."
            )
        layer = [(k_in, 1)]
        if "bias" in a:
            layer.append((a["bias"][0], 0))
        layer.append((k_out, 0))
        units = range(shape_in[1])
        if scales is not None and scales.get(k_out) is not None:
            off = np.asarray(scales[k_out]).reshape(-1)
            units = [i for i in units if not off[i]]
        spec.append(tuple(layer))
        candidates.append(tuple(int(i) for i in units))
    return UnitSwaps(tuple(spec), tuple(candidates), max_pairs)


# ---------------------------------------------------------- an exact move: softmax class shifts


@dataclasses.dataclass(frozen=True)
class ClassShifts:
    """An exact Gibbs move along the directions a softmax ignores.

    Adding the same number to every class's logit leaves a softmax unchanged. So adding c to
    every entry of one row of the last layer's kernel (one input's weights into all K classes),
    or to every entry of its bias, leaves a categorical likelihood unchanged for every c: along
    such a line only the prior acts. Under a factorised Gaussian prior with variances v_k on
    the line's K entries x_k, the tempered posterior along it, exp(log p(x + c) / T), is
    Gaussian in c with precision P = Σ v_k⁻¹ and mean −Σ (x_k / v_k) / P. The move draws c from
    it for every such line at once: a Gibbs step along a fixed direction, so the chain's target
    is kept exactly, and the line's component, which a gradient step under a preconditioner
    fitted to the data's curvature crosses only slowly (it is held by the prior alone), is
    drawn afresh at every step. Unlike :class:`UnitSwaps` it leaves the weights' meaning
    alone: the chains' moments stay the posterior's, the posterior mean included.

    The move needs the GSM prior as ``jax.tree_util.Partial(bn.gsm.full_log_prior,
    hierarchy=h)`` (as :func:`bayesnoise.em.e_step` passes it), and a likelihood that reads
    the layer's outputs only through a softmax: :func:`run` checks that the log-likelihood
    stays put under a shift of each leaf and raises otherwise. Build it with
    :func:`class_shifts`.

    Attributes:
        leaves: ``((leaf path, class axis), ...)``: the leaves whose entries along the class
            axis can shift together, e.g. ``(("params/Dense_2/kernel", 1),
            ("params/Dense_2/bias", 0))``; every slice across that axis is its own line.
    """

    leaves: tuple[tuple[str, int], ...]

    def __post_init__(self):
        if not _path_axis_pairs(self.leaves):
            raise ValueError(
                f"leaves must be a non-empty tuple of (leaf path, class axis) pairs, such as "
                f"(('params/Dense_2/kernel', 1), ('params/Dense_2/bias', 0)); got "
                f"{self.leaves!r}."
            )

    def _spots(self, tree: PyTree):
        """(leaves, treedef, [(leaf index, axis)])."""
        leaves, treedef, index = _leaf_index(tree)
        spots = []
        for path, axis in self.leaves:
            shape = jnp.shape(leaves[_leaf_at(index, path, "ClassShifts")])
            if not -len(shape) <= axis < len(shape) or shape[axis] < 2:
                raise ValueError(
                    f"ClassShifts: axis {axis} of {path!r} (shape {shape}) must be an axis of "
                    f"at least 2 classes; allowed: {-len(shape)} to {len(shape) - 1}."
                )
            spots.append((index[path], axis % len(shape)))
        return leaves, treedef, spots

    def shifted(self, params: PyTree, amount: float | jax.Array) -> PyTree:
        """``params`` with ``amount`` added to every entry of the move's leaves (a direction the
        likelihood must ignore)."""
        leaves, treedef, spots = self._spots(params)
        leaves = list(leaves)
        for i, _ in spots:
            leaves[i] = leaves[i] + amount
        return jax.tree.unflatten(treedef, leaves)

    def __call__(
        self,
        key: jax.Array,
        params: PyTree,
        log_prior: Callable[[PyTree], jax.Array],
        temperature: float = 1.0,
    ) -> tuple[PyTree, tuple, jax.Array]:
        """One move: ``(new params, (), lines drawn)``; nothing is permuted."""
        variances = _factorised_variances(log_prior, params)
        if variances is None:
            raise ValueError(
                f"ClassShifts draws from the prior along each line and needs the GSM prior as "
                f"jax.tree_util.Partial(bn.gsm.full_log_prior, hierarchy=h); got {log_prior!r}."
            )
        leaves, treedef, spots = self._spots(params)
        leaves = list(leaves)
        drawn = 0
        for n, (i, axis) in enumerate(spots):
            x, v = leaves[i], variances[i]
            precision = jnp.sum(1.0 / v, axis=axis, keepdims=True)
            mean = -jnp.sum(x / v, axis=axis, keepdims=True) / precision
            z = jax.random.normal(jax.random.fold_in(key, n), mean.shape, x.dtype)
            leaves[i] = x + (mean + jnp.sqrt(temperature / precision) * z).astype(x.dtype)
            drawn += mean.size
        return jax.tree.unflatten(treedef, leaves), (), jnp.asarray(drawn, jnp.int32)

    def permute(self, tree: PyTree, sources: tuple) -> PyTree:
        """``tree`` unchanged: a shift moves no unit (the likelihood's gradient is the same
        along the whole line)."""
        return tree


def class_shifts(params: PyTree) -> ClassShifts:
    """The :class:`ClassShifts` move for a classifier whose last dense layer (the highest
    numbered parent with a 2-D ``kernel``, such as Flax's ``Dense_2`` or an NNX list's
    ``layers/2``) gives the logits of a softmax: every row of its kernel and its bias shift
    along the class axis.

    Example:
        >>> import jax.numpy as jnp, bayesnoise as bn
        >>> params = {"params": {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)},
        ...                      "Dense_1": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}}
        >>> bn.sampling.class_shifts(params).leaves
        (('params/Dense_1/kernel', 1), ('params/Dense_1/bias', 0))

    Raises:
        ValueError: the params hold no dense layer, or its output has fewer than 2 classes.
    """
    layers = _dense_layers(params)
    if not layers:
        raise ValueError(
            "class_shifts needs a dense output layer: a 2-D 'kernel' leaf under a numbered "
            "parent such as Dense_2; found none."
        )
    last = layers[-1]
    leaves = [(last["kernel"][0], 1)]
    if "bias" in last:
        leaves.append((last["bias"][0], 0))
    move = ClassShifts(tuple(leaves))
    move._spots(params)
    return move


def _dense_layers(params: PyTree) -> list[dict[str, tuple]]:
    """The dense layers of an MLP's params in order: per layer ``{"kernel": (path, shape),
    "bias": (path, shape)}`` (bias where it has one), parents ordered by their trailing number."""
    import re

    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    layers: dict[str, dict[str, tuple]] = {}
    for path, leaf in flat:
        name = _tree.path_str(path)
        parent, _, last = name.rpartition("/")
        if last in ("kernel", "bias"):
            layers.setdefault(parent, {})[last] = (name, jnp.shape(leaf))

    def order(parent):
        m = re.search(r"^(.*?)_?(\d+)$", parent)
        return (m.group(1), int(m.group(2))) if m else (parent, -1)

    return [
        layers[p]
        for p in sorted(layers, key=order)
        if len(layers[p].get("kernel", ("", ()))[1]) == 2
    ]


# ---------------------------------------------------- a reparametrisation: centred biases


@dataclasses.dataclass(frozen=True, eq=False)
class Centring:
    """A shear of the parameters that decouples each dense layer's bias from its unit's weights.

    The chains sample θ' instead of θ, where θ' equals θ except in the biases:
    b'_k = b_k + Σ_d c_dk W_dk for every listed layer (kernel W of shape (inputs, units)),
    so that θ = A θ' with A a shear of determinant 1: the target exp(log p(A θ') / T) is the
    posterior in the new coordinates, with no Jacobian, and every state is mapped back before
    it enters the moments, the traced weights and the predictive. Only the sampler's path
    changes, not what it samples.

    Why: a unit whose inputs a_d are mostly positive (a ReLU layer's, or pixels) sees its bias
    and its weights through a_d W_dk + b_k, so the data pin down that sum and leave the bias
    free to move against the weights along the inputs' mean. A diagonal preconditioner steps
    along such a direction only slowly. With c_dk the inputs' mean weighted by the curvature
    (what :func:`centring` computes), the new bias b' is that sum's value at the mean input,
    which the data see directly, and the Laplace precision has no bias–weight term left
    within a unit.

    Build it with :func:`centring`; pass it to :func:`run` (``centring=``) or
    :func:`bayesnoise.em.e_step` (``centring=True``). In a loop of one's own, start
    :func:`init` at ``to_position(params)`` with the log-likelihood and log prior composed
    with ``to_params``, and map every state back with ``to_params``.

    Attributes:
        leaves: ``((kernel path, bias path), ...)``, e.g.
            ``(("params/Dense_2/kernel", "params/Dense_2/bias"),)``.
        centres: one array per pair, shaped like its kernel: c_dk.
    """

    leaves: tuple[tuple[str, str], ...]
    centres: tuple[jax.Array, ...]
    arrays_are_data = True  # compiled code takes the centres as data (_tree.split_fn)

    def __post_init__(self):
        if not (
            isinstance(self.leaves, tuple)
            and self.leaves
            and all(
                isinstance(e, tuple) and len(e) == 2 and all(isinstance(s, str) for s in e)
                for e in self.leaves
            )
        ):
            raise ValueError(
                f"leaves must be a non-empty tuple of (kernel path, bias path) pairs, such as "
                f"(('params/Dense_2/kernel', 'params/Dense_2/bias'),); got {self.leaves!r}."
            )
        if not isinstance(self.centres, tuple) or len(self.centres) != len(self.leaves):
            raise ValueError(
                f"centres must be a tuple of {len(self.leaves)} arrays, one per (kernel, bias) "
                f"pair; got {type(self.centres).__name__} of length "
                f"{len(self.centres) if hasattr(self.centres, '__len__') else '?'}."
            )

    def _check_fits(self, params: PyTree) -> None:
        """Raises a ValueError where a pair's leaves are not in ``params`` or do not fit."""
        leaves, _, index = _leaf_index(params)
        for (kp, bp), c in zip(self.leaves, self.centres):
            w = leaves[_leaf_at(index, kp, "Centring")]
            b = leaves[_leaf_at(index, bp, "Centring")]
            if (
                jnp.ndim(w) != 2
                or jnp.shape(b) != jnp.shape(w)[-1:]
                or jnp.shape(c) != jnp.shape(w)
            ):
                raise ValueError(
                    f"Centring: {kp!r} must be a kernel of shape (inputs, units) with a bias "
                    f"{bp!r} of shape (units,) and centres of the kernel's shape; got kernel "
                    f"{jnp.shape(w)}, bias {jnp.shape(b)}, centres {jnp.shape(c)}."
                )
            if not bool(jnp.all(jnp.isfinite(c))):
                raise ValueError(f"Centring: the centres of {kp!r} must be finite.")

    def _shear(self, tree: PyTree, sign: float) -> PyTree:
        leaves, treedef, index = _leaf_index(tree)
        leaves = list(leaves)
        for (kp, bp), c in zip(self.leaves, self.centres):
            w, i = leaves[index[kp]], index[bp]
            # a leading chain axis, where there is one, broadcasts against c
            shift = jnp.sum(jnp.asarray(c, w.dtype) * w, axis=-2)
            leaves[i] = leaves[i] + (sign * shift).astype(leaves[i].dtype)
        return jax.tree.unflatten(treedef, leaves)

    def to_params(self, position: PyTree) -> PyTree:
        """θ = A θ' (b = b' − Σ_d c_dk W_dk), also for leaves with a leading chain axis."""
        return self._shear(position, -1.0)

    def to_position(self, params: PyTree) -> PyTree:
        """θ' = A⁻¹ θ (b' = b + Σ_d c_dk W_dk)."""
        return self._shear(params, 1.0)

    def pull_precision(self, precision: PyTree) -> PyTree:
        """The diagonal of Aᵀ D A, for D = diag(``precision``) in θ's coordinates: what a
        factorised prior's precision becomes in θ' (W_dk: D_W + c_dk² D_b; b': D_b)."""
        leaves, treedef, index = _leaf_index(precision)
        leaves = list(leaves)
        for (kp, bp), c in zip(self.leaves, self.centres):
            i = index[kp]
            leaves[i] = leaves[i] + jnp.square(c) * leaves[index[bp]][..., None, :]
        return jax.tree.unflatten(treedef, leaves)


jax.tree_util.register_dataclass(Centring, data_fields=["centres"], meta_fields=["leaves"])


def _centred_log_prior(centring: Centring, log_prior: Callable, position: PyTree) -> jax.Array:
    """log p(A θ'): the prior in the sheared coordinates (det A = 1)."""
    return log_prior(centring.to_params(position))


def _centred_parts(log_prior: Any) -> tuple[Centring, Any] | None:
    """(centring, the prior in θ) where ``log_prior`` is :func:`_centred_log_prior`'s Partial."""
    if isinstance(log_prior, jax.tree_util.Partial) and log_prior.func is _centred_log_prior:
        return log_prior.args[0], log_prior.args[1]
    return None


@dataclasses.dataclass(frozen=True, eq=False)
class _CentredLikelihood:
    """``log_likelihood(A θ', *batch)``: the likelihood in a :class:`Centring`'s θ'."""

    log_likelihood: Callable[..., jax.Array]
    centring: Centring
    arrays_are_data = True

    def __call__(self, position: PyTree, *batch) -> jax.Array:
        return self.log_likelihood(self.centring.to_params(position), *batch)


jax.tree_util.register_dataclass(
    _CentredLikelihood, data_fields=["centring"], meta_fields=["log_likelihood"]
)


def _transpose(linear: Callable[[PyTree], PyTree], tree: PyTree) -> PyTree:
    """Lᵀ v for a linear map L of pytrees (a vector-Jacobian product at 0)."""
    return jax.vjp(linear, jax.tree.map(jnp.zeros_like, tree))[1](tree)[0]


@dataclasses.dataclass(frozen=True, eq=False)
class _Sheared:
    """A move of θ made on a chain that samples θ' = A⁻¹ θ: θ' -> θ, the move, θ -> θ'. A
    linear bijection with a constant Jacobian keeps an exact move exact."""

    move: Any
    centring: Centring
    arrays_are_data = True

    def __call__(self, key, position, log_prior, temperature=1.0):
        parts = _centred_parts(log_prior)
        inner = parts[1] if parts is not None else log_prior
        params, sources, count = self.move(
            key, self.centring.to_params(position), inner, temperature
        )
        return self.centring.to_position(params), sources, count

    def invariant(self, tree: PyTree) -> PyTree:
        """The inner move's :meth:`UnitSwaps.invariant` (``tree`` unchanged for a move without
        one): the shear keeps each unit's leaves in their places."""
        inner = getattr(self.move, "invariant", None)
        return tree if inner is None else inner(tree)

    def permute(self, tree: PyTree, sources: tuple) -> PyTree:
        """The likelihood's gradient in θ' (Aᵀ g) after the move: A⁻ᵀ, the move's own
        permutation of g, then Aᵀ."""
        g = _transpose(self.centring.to_position, tree)
        return _transpose(self.centring.to_params, self.move.permute(g, sources))


jax.tree_util.register_dataclass(_Sheared, data_fields=["centring"], meta_fields=["move"])


def centring(
    params: PyTree,
    log_likelihood: Callable[..., jax.Array],
    log_prior: Callable[[PyTree], jax.Array],
    data: Sequence[Any],
    *,
    layers: Sequence[int] | None = None,
    key: jax.Array | None = None,
) -> Centring:
    """The :class:`Centring` of every dense layer of an MLP's ``params`` (each numbered parent
    with a 2-D ``kernel`` and a ``bias``), its centres from the Laplace precision at ``params``.

    For unit k of a layer, c_dk = N G[W_dk, b_k] / (N G[b_k, b_k] + p_b), with G the
    per-example Gauss–Newton matrix (:func:`bayesnoise.laplace.diag_ggn`'s) and p_b the bias's
    prior precision. For a softmax output layer this is the mean of input d weighted by each
    example's p_k (1 − p_k). Under this shear the Laplace precision has no term between a bias
    and its unit's weights. The cross terms come from two diagonal GGNs with the same key:
    the second in coordinates where W_dk moves b_k with it, whose diagonal is
    G[W, W] + 2 G[W, b] + G[b, b].

    Args:
        params: the point (e.g. the mode) where the curvature is taken.
        log_likelihood, data: as in :func:`run`.
        log_prior: the prior in θ, independent across weights (for the GSM,
            ``jax.tree_util.Partial(bn.gsm.full_log_prior, hierarchy=h)``).
        layers: which of those dense layers, by their place (0 the first, -1 the last);
            None for all of them.
        key: for the GGN's probe on large problems (:func:`bayesnoise.laplace.diag_ggn`).

    Raises:
        ValueError: the params hold no dense layer with a bias, ``layers`` names one they do
            not have, or the curvature is not finite.
    """
    from bayesnoise import laplace

    pairs = tuple(
        (layer["kernel"][0], layer["bias"][0])
        for layer in _dense_layers(params)
        if "bias" in layer and layer["bias"][1] == layer["kernel"][1][-1:]
    )
    if not pairs:
        raise ValueError(
            "centring needs dense layers with a bias: 2-D 'kernel' leaves with a 'bias' under "
            "numbered parents such as Dense_0; found none."
        )
    if layers is not None:
        n = len(pairs)
        if (
            isinstance(layers, (str, bytes))
            or not isinstance(layers, Sequence)
            or not layers
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
            or not all(-n <= i < n for i in layers)
        ):
            raise ValueError(
                f"layers must be None or a non-empty sequence of places among the {n} dense "
                f"layers with a bias ({[kp for kp, _ in pairs]}): ints from {-n} to {n - 1}; "
                f"got {layers!r}."
            )
        pairs = tuple(pairs[i] for i in sorted({i % n for i in layers}))
    leaves, _, index = _leaf_index(params)
    kernels = [leaves[index[kp]] for kp, _ in pairs]
    moving = Centring(pairs, tuple(-jnp.ones_like(w) for w in kernels))  # b = b'' + Σ_d W_dk
    if key is None:
        key = jax.random.key(0)
    g = laplace.diag_ggn(params, log_likelihood, data, key=key)
    g2 = laplace.diag_ggn(
        moving.to_position(params), _CentredLikelihood(log_likelihood, moving), data, key=key
    )
    prec = prior_precision(params, log_prior)
    num_data = _tree.data_tuple(data)[1]
    gl, g2l, pl = (_leaf_index(t)[0] for t in (g, g2, prec))
    centres = []
    for kp, bp in pairs:
        i, j = index[kp], index[bp]
        cross = 0.5 * (g2l[i] - gl[i] - gl[j][None, :])
        c = num_data * cross / (num_data * gl[j][None, :] + pl[j][None, :])
        centres.append(c.astype(leaves[i].dtype))
    return Centring(pairs, tuple(centres))


_MOVES = (UnitSwaps, ClassShifts, _Sheared)


def _move_list(move: Any) -> tuple:
    """``move`` as a tuple of moves (None: none)."""
    if move is None:
        return ()
    return tuple(move) if isinstance(move, (tuple, list)) else (move,)


def _check_move(move: Any) -> None:
    moves = _move_list(move)
    if not moves or not all(isinstance(m, _MOVES) for m in moves):
        raise TypeError(
            f"move must be None, a bn.sampling.UnitSwaps (from bn.sampling.unit_swaps), a "
            f"bn.sampling.ClassShifts (from bn.sampling.class_shifts) or a tuple of them, got "
            f"{move!r} of type {type(move).__name__}."
        )


def _check_moves_fit(moves: tuple, params: PyTree, log_prior: Any) -> None:
    """Raises a ValueError where a move's leaves or axes are not in ``params``, or where a
    :class:`ClassShifts` meets a prior other than the GSM's."""
    for m in moves:
        if isinstance(m, _Sheared):  # checked in θ's coordinates before it was wrapped
            continue
        if isinstance(m, UnitSwaps):
            m._leaves(params)
        else:
            m._spots(params)
            if _factorised_variances(log_prior, params) is None:
                raise ValueError(
                    f"a ClassShifts move draws each line's shift from the prior and needs the "
                    f"GSM prior as jax.tree_util.Partial(bn.gsm.full_log_prior, hierarchy=h) "
                    f"(as bn.em.e_step passes it); got log_prior={log_prior!r}."
                )


# a shift of the logits' leaves may change a softmax log-likelihood by no more than this (per
# example, relative to 1 + its size): float32 rounding, not a likelihood that reads the shift
_SHIFT_TOLERANCE = 1e-3


def _check_shift_invariance(move: ClassShifts, params, log_likelihood, data) -> None:
    """Raises a ValueError where shifting ``move``'s leaves changes the log-likelihood of the
    first (at most 64) examples: the likelihood does not read those leaves through a softmax."""
    batch = tuple(jnp.asarray(a[:64]) for a in data)
    before = np.asarray(log_likelihood(params, *batch), np.float64)
    after = np.asarray(log_likelihood(move.shifted(params, 0.5), *batch), np.float64)
    change = np.abs(after - before) / (1.0 + np.abs(before))
    if not np.all(np.isfinite(change)) or np.max(change) > _SHIFT_TOLERANCE:
        raise ValueError(
            f"ClassShifts needs a log-likelihood that reads {[p for p, _ in move.leaves]} only "
            f"through a softmax over their class axis, but adding 0.5 to them changed the "
            f"log-likelihood of the first {len(before)} examples by up to "
            f"{np.nanmax(np.abs(after - before)):.3g} (allowed: rounding, "
            f"{_SHIFT_TOLERANCE:g} relative). Use it only with a categorical likelihood on "
            f"the layer's logits."
        )


def _swap_invariant(tree: PyTree, move: Any) -> PyTree:
    """``tree`` passed through every move's ``invariant`` (:meth:`UnitSwaps.invariant`)."""
    for m in _move_list(move):
        fn = getattr(m, "invariant", None)
        tree = tree if fn is None else fn(tree)
    return tree


def _moved(key: jax.Array, state: SamplerState, grads: PyTree) -> tuple[SamplerState, PyTree]:
    """The state's move before a step: (the moved state, the gradient the transform takes).

    ∇U = −∇log p(θ) − (N / n) ∇Σ log p(y | x, θ): the likelihood's part follows the units,
    the prior's is taken at the new state. :func:`bayesnoise.baoab` merges the closing half
    kick of the last step (at the old state) with the opening one of this step (at the new
    state), so it takes half of each gradient, which places the move between two whole steps.
    Where the chain carries its multipliers (``state.preconditioner``), they, the momentum and
    the closing half kick (s ⊙ g at the old state) go with the units.
    """
    kernel = state.kernel
    grad_prior = jax.grad(kernel.log_prior)
    likelihood_part = jax.tree.map(jnp.add, grads, grad_prior(state.params))
    params, move_key = state.params, jax.random.fold_in(key, _MOVE_SALT)
    carried = state.preconditioner is not None
    precond, old, fixed = state.preconditioner, grads, state.prior_precision
    temperature = kernel.temperature
    inner = _baoab_states(state.opt_state)  # also inside optax.chain or inject_hyperparams
    momenta = [x.momentum for x in inner]
    for i, move in enumerate(_move_list(kernel.move)):
        # the first move keeps the key it had alone
        k = move_key if i == 0 else jax.random.fold_in(move_key, i)
        params, sources, _ = move(k, params, kernel.log_prior, kernel.temperature)
        likelihood_part = move.permute(likelihood_part, sources)
        if carried:
            old = _carry(move, old, sources)
            momenta = [_carry(move, p, sources) for p in momenta]
            if fixed is None:
                precond = _carry(move, precond, sources)
            else:  # the unit's own curvature c = T / M − P moves; P stays in its place
                own = jax.tree.map(lambda m, q: temperature / m - q, precond, fixed)
                moved = _carry(move, own, sources)
                precond = jax.tree.map(
                    lambda m, c, c2, q: jnp.where(
                        c2 == c, m, temperature / (jnp.maximum(c2, 0.0) + q)
                    ),
                    precond,
                    own,
                    moved,
                    fixed,
                )
    new = jax.tree.map(jnp.subtract, likelihood_part, grad_prior(params))
    opt_state = state.opt_state
    if inner:  # bn.baoab's merged kicks
        first = inner[0].count == 0  # no closing half kick is pending yet
        new = jax.tree.map(lambda a, b: jnp.where(first, b, 0.5 * (a + b)), old, new)
        if carried:
            it = iter(momenta)
            opt_state = jax.tree.map(
                lambda x: x._replace(momentum=next(it)) if isinstance(x, _BAOABState) else x,
                opt_state,
                is_leaf=lambda x: isinstance(x, _BAOABState),
            )
    return state.replace(params=params, opt_state=opt_state, preconditioner=precond), new


def _carry(move: Any, tree: PyTree, sources: tuple) -> PyTree:
    """``tree``, a quantity each weight carries (its multiplier, its momentum), with its
    entries moved where the move moved the weights: the plain permutation of the units, also
    in a shear's coordinates, where it keeps a weight's own entry with it."""
    inner = move.move if isinstance(move, _Sheared) else move
    return inner.permute(tree, sources)


# ------------------------------------------------------------------- settings that converge


class AutoSettings(NamedTuple):
    """What :func:`auto_settings` chose, and the figures it chose them from."""

    learning_rate: float  # η: the step in units of the preconditioned curvature
    preconditioner: PyTree  # M per weight: T / (N·diag GGN + prior precision), rescaled per weight
    gradient_noise: PyTree  # B per weight: the estimated variance of the minibatch ∇U
    batch_size: int  # n
    num_burnin: int  # steps before the first kept state
    num_samples: int  # kept states per chain
    thin: int  # keep every thin-th state
    relaxation_steps: float  # 1 / (the smallest per-weight step): the slowest weight's time scale
    curvature_max: float  # λ_max of the preconditioned Hessian of U / T (power iteration)
    data_fraction: float  # max over weights of N·GGN / (N·GGN + prior precision)


def prior_precision(params: PyTree, log_prior: Callable[[PyTree], jax.Array]) -> PyTree:
    """−∂²log p(θ)/∂θ_k² per weight, as −H·1 (exact for priors independent across weights).

    Raises:
        TypeError: ``log_prior`` is not callable.
    """
    if not callable(log_prior):
        raise TypeError(
            f"log_prior must be a callable log_prior(params) -> scalar, got {log_prior!r}."
        )
    parts = _centred_parts(log_prior)
    if parts is not None:  # the prior of a Centring's θ': the diagonal of Aᵀ D A
        shear, inner = parts
        return shear.pull_precision(prior_precision(shear.to_params(params), inner))
    ones = jax.tree.map(jnp.ones_like, params)
    _, hv = jax.jvp(jax.grad(log_prior), (params,), (ones,))
    return jax.tree.map(jnp.negative, hv)


def _norm(tree: PyTree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(tree)))


@functools.partial(jax.jit, static_argnames=("log_likelihood", "log_prior", "num_iters"))
def _power_iterate(
    key,
    params,
    sqrt_m,
    sub,
    scale,
    inv_t,
    ll_args,
    prior_args,
    *,
    log_likelihood,
    log_prior,
    num_iters,
):
    """Power iteration for λ_max of M^½ ∇²U M^½, U = −(log p(θ) + scale Σ_sub log p(y|x, θ)) / T."""
    log_likelihood = _join_fn(log_likelihood, ll_args)
    log_prior = _join_fn(log_prior, prior_args)

    def potential(p):
        return -(log_prior(p) + scale * jnp.sum(log_likelihood(p, *sub))) * inv_t

    def hvp(v):
        mv = jax.tree.map(jnp.multiply, sqrt_m, v)
        _, hv = jax.jvp(jax.grad(potential), (params,), (mv,))
        return jax.tree.map(jnp.multiply, sqrt_m, hv)

    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    v = [jax.random.normal(k, jnp.shape(x), jnp.float32) for k, x in zip(keys, leaves)]
    v = jax.tree.unflatten(treedef, v)

    def body(_, carry):
        v, _ = carry
        v = jax.tree.map(lambda x: x / _norm(v), v)
        w = hvp(v)
        lam = sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(w)))
        return w, lam

    return jax.lax.fori_loop(0, num_iters, body, (v, jnp.zeros((), jnp.float32)))[1]


def _power_max(
    key, positions, sqrt_m, sub, scale, inv_t, *, log_likelihood, log_prior, num_iters=15
) -> float:
    """The largest |eigenvalue| of M^½ ∇²U M^½ over ``positions`` (one compiled iteration for
    the same functions and shapes)."""
    log_likelihood, ll_args = _split_fn(log_likelihood, partial=False)
    log_prior, prior_args = _split_fn(log_prior)
    return max(
        abs(
            float(
                _power_iterate(
                    jax.random.fold_in(key, i),
                    p,
                    sqrt_m,
                    sub,
                    jnp.float32(scale),
                    jnp.float32(inv_t),
                    ll_args,
                    prior_args,
                    log_likelihood=log_likelihood,
                    log_prior=log_prior,
                    num_iters=num_iters,
                )
            )
        )
        for i, p in enumerate(positions)
    )


def max_curvature(
    key: jax.Array,
    params: PyTree,
    log_likelihood: Callable[..., jax.Array],
    log_prior: Callable[[PyTree], jax.Array],
    data: tuple,
    preconditioner: PyTree | None = None,
    *,
    temperature: float = 1.0,
    num_examples: int | None = None,
    num_iters: int = 30,
) -> float:
    """λ_max of M^½ ∇²U M^½ at ``params``: the largest curvature of U / T in the coordinates a
    diagonal preconditioner M scales (power iteration on Hessian-vector products).

    U is the negative log posterior of the whole data set, estimated on the first
    ``num_examples`` examples (all by default) scaled by N / n. Steps are chosen from it: an
    Euler step of :func:`bayesnoise.sgld` is stable for η λ_max < 2, a step of
    :func:`bayesnoise.baoab` for h sqrt(λ_max) < 2 (h = 0.5 / sqrt(λ_max) is a safe start).

    Args:
        key: a PRNG key for the starting vector.
        params: where the curvature is taken.
        log_likelihood: ``log_likelihood(params, *batch)`` -> per-example values (n,).
        log_prior: ``log_prior(params)`` -> scalar.
        data: a tuple of arrays with a common leading axis of N examples.
        preconditioner: a tree like the params of M > 0 (None: M = 1), e.g. the diagonal
            Laplace variance ``bn.laplace.posterior(...).variance``.
        temperature: T > 0.
        num_examples: n, how many examples (from the first) the Hessian is taken on.
        num_iters: power iterations (30 give two to three digits on the networks here).

    Returns:
        λ_max as a float.

    Raises:
        ValueError: ``num_examples`` or ``num_iters`` is not an int >= 1, ``temperature`` is not
            finite and > 0, the data is not a tuple of arrays of one length, or the
            preconditioner does not have the params' structure and shapes.
    """
    _check.key("key", key)
    _check_callables(log_likelihood, log_prior)
    _check_positive_int("num_iters", num_iters, 1, "power iterations")
    _check.number("temperature", temperature, lo=0.0, lo_open=True)
    data, num_data = _tree.data_tuple(data)
    n = num_data if num_examples is None else num_examples
    n = min(_check_positive_int("num_examples", n, 1, "examples the Hessian is taken on"), num_data)
    if preconditioner is None:
        sqrt_m = jax.tree.map(jnp.ones_like, params)
    else:
        _check.same_tree("preconditioner", preconditioner, params, "params")
        sqrt_m = jax.tree.map(jnp.sqrt, preconditioner)
    sub = tuple(a[:n] for a in data)
    return _power_max(
        key,
        [params],
        sqrt_m,
        sub,
        num_data / n,
        1.0 / float(temperature),
        log_likelihood=log_likelihood,
        log_prior=log_prior,
        num_iters=num_iters,
    )


def _auto_temperature(temperature: Any) -> float:
    """T as a float, after checking that it is finite and > 0 (automatic settings need it)."""
    _check.number("temperature", temperature, finite=False)
    if not float(temperature) > 0 or not math.isfinite(float(temperature)):
        raise ValueError(
            f"temperature must be a finite number > 0 for automatic settings (T = 0 is "
            f"optimisation), got {temperature!r}; pass learning_rate= explicitly for T = 0."
        )
    return float(temperature)


def _proper_precision(params: PyTree, log_prior: Callable, curvature: PyTree) -> PyTree:
    """The prior precision per weight, after checking that it is > 0 everywhere and that the
    curvature (the per-example diagonal GGN) is a finite tree >= 0 like the params."""
    prec = prior_precision(params, log_prior)
    flat, _ = jax.tree_util.tree_flatten_with_path(prec)
    for path, leaf in flat:
        low = float(jnp.min(leaf)) if jnp.size(leaf) else 1.0
        if not (low > 0 and np.isfinite(low)):
            raise ValueError(
                f"the prior is not proper in leaf {_tree.path_str(path)!r} (smallest prior "
                f"precision {low:g}): automatic settings need a Gaussian-like prior on every "
                f"parameter, e.g. bn.gsm.full_log_prior (biases N(0, σ0²)); or pass "
                f"learning_rate= explicitly."
            )
    if jax.tree.structure(curvature) != jax.tree.structure(params) or any(
        jnp.shape(c) != jnp.shape(p)
        for c, p in zip(jax.tree.leaves(curvature), jax.tree.leaves(params))
    ):
        raise ValueError(
            "the curvature must be a tree like the params (the per-example diagonal GGN), got "
            f"structure {jax.tree.structure(curvature)} for params {jax.tree.structure(params)}."
        )
    for c in jax.tree.leaves(curvature):
        if not bool(jnp.all(jnp.isfinite(c))) or float(jnp.min(c)) < 0:
            raise ValueError(
                f"the curvature (diagonal GGN) must be finite and >= 0; found a leaf with minimum "
                f"{float(jnp.min(c))} and {int(jnp.sum(~jnp.isfinite(c)))} non-finite entries. "
                f"Check log_likelihood at these params, or pass learning_rate= explicitly."
            )
    return prec


def _minibatch_noise(curvature: PyTree, num_data: int, batch_size: int) -> PyTree:
    """B per weight, the variance of the minibatch estimate of ∇U over n of N examples drawn
    without replacement: (N² / n)(1 − n / N) times the per-example diag GGN."""
    factor = num_data**2 / batch_size * (1.0 - batch_size / num_data)
    return jax.tree.map(lambda f: factor * f, curvature)


def auto_settings(
    key: jax.Array,
    params: PyTree,
    log_likelihood: Callable[..., jax.Array],
    log_prior: Callable[[PyTree], jax.Array],
    data: tuple,
    *,
    temperature: float = 1.0,
    batch_size: int | None = None,
    num_chains: int = 4,
    curvature: PyTree | None = None,
    positions: Sequence[PyTree] | None = None,
    max_step: float = 0.1,
    noise_fraction: float = 0.25,
    target_ess: float = 400.0,
    max_steps: int = 3000,
    min_samples: int = 200,
    hessian_examples: int = 512,
    step_scale: float = 1.0,
) -> AutoSettings:
    """Sampler settings that converge, derived from the curvature at ``params``.

    With h_k = N·diag GGN_k + p_k (``bn.laplace.diag_ggn`` per example, p_k the prior precision
    −∂²log p/∂θ_k²) the base preconditioner is the diagonal Laplace variance T / h_k, under which
    a Gaussian posterior that the diagonal describes has unit curvature in every weight. Each
    weight then gets its own step d_k = min(``max_step``, c / ρ_k), ρ_k = N·GGN_k / h_k the part
    of its precision that comes from the data:

    * weights the data barely touch (ρ_k → 0, e.g. the rows of inputs that are zero in every
      example, whose posterior is their prior) relax in 1 / ``max_step`` steps; the Euler
      step's bias on their variance, 1 / (1 − d/2) − 1, is at most 2.6% at 0.1;
    * c is the largest value for which λ_max of D^½ M^½ ∇²(U/T) M^½ D^½ (on up to
      ``hessian_examples`` examples, by power iteration) is at most 1, so the step is stable
      along the coupled directions a diagonal cannot see, and at most 2 ε n / (N (1 − n/N)),
      ε = ``noise_fraction``: the minibatch gradient, of variance about
      B_k = (N² / n)(1 − n/N)·GGN_k per weight, then adds at most a fraction ε to the injected
      noise. For minibatches drawn independently at every step, :func:`bayesnoise.sgld`
      subtracts this estimate (``gradient_noise=B``), as stochastic gradient Fisher scoring
      does. :func:`run` draws them as one permutation per epoch, over which the minibatch
      noise sums to almost zero at fixed weights (exactly when n divides N): weights that
      relax over more steps than an epoch hardly feel it, and subtracting B would cool them
      (0.78-0.80 of the exact variance of a linear model at 20 batches per epoch). So :func:`run` subtracts B only when an epoch is
      one batch (N < 2n; ``settings["gradient_noise_subtracted"]``), and otherwise relies on
      the bound ε alone.

    The transform gets ``learning_rate = max_step`` and the preconditioner T d_k / (h_k
    max_step). Steps: the slowest weight relaxes in τ = 1 / min_k d_k steps and its integrated
    autocorrelation time is about 2τ; burn-in is 5τ (at least 200), thinning τ / 2, and the kept
    states per chain give about ``target_ess`` effective samples over ``num_chains`` chains, all
    within ``max_steps`` steps per chain (burn-in at most half of them, at least
    ``min_samples`` kept states: the fast weights' moments need many states even when the
    slowest weight cannot mix within the budget, which the diagnostics then report).

    Args:
        key: PRNG key (GGN probes and the power iteration).
        params: where the curvature is taken (the trained network, or a chain's state).
        log_likelihood, log_prior, data: as in :func:`run`; the prior must be proper in every
            weight (for the GSM, ``bn.gsm.full_log_prior``).
        temperature: T > 0.
        batch_size: n (None: min(N, 128)).
        num_chains: chains that share the ESS target.
        curvature: a precomputed per-example diag GGN (a tree like ``params``), e.g. the
            elementwise maximum of the GGN at every chain's state.
        positions: the states at which the stability limit is checked (default: ``params``);
            the largest λ_max over them counts.
        max_step, noise_fraction, target_ess, max_steps, hessian_examples: as above.
        min_samples: the fewest kept states per chain the thinning leaves room for.
        step_scale: a factor (<= 1) on the steps of every weight with some curvature; the
            driver lowers it after a divergence.

    Returns:
        An :class:`AutoSettings`.

    Raises:
        ValueError: a prior that is not proper in some weight, a non-finite curvature, a
            curvature tree of the wrong structure, or a setting out of range (named in the
            message).
        TypeError: ``key`` is not a PRNG key, or a setting has the wrong type.
    """
    from bayesnoise import laplace

    _check.key("key", key)
    _check_callables(log_likelihood, log_prior)
    _auto_temperature(temperature)
    data, num_data = _tree.data_tuple(data)
    if batch_size is not None:
        _check_positive_int("batch_size", batch_size, 1, "examples per minibatch")
        if batch_size > num_data:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {num_data} examples in data; use at most "
                f"{num_data}, or None."
            )
    _check_positive_int("num_chains", num_chains, 1, "the number of chains")
    _check_positive_int("max_steps", max_steps, 1, "the most steps per chain")
    _check_positive_int("min_samples", min_samples, 1, "the fewest kept states per chain")
    _check_positive_int("hessian_examples", hessian_examples, 1, "examples of the Hessian")
    for name, value in (
        ("max_step", max_step),
        ("noise_fraction", noise_fraction),
        ("target_ess", target_ess),
        ("step_scale", step_scale),
    ):
        _check.number(name, value, lo=0.0, lo_open=True)
    if positions is not None:
        positions = list(positions)
        if not positions:
            raise ValueError("positions must be None or a non-empty list of params trees, got [].")
        for i, p in enumerate(positions):
            _check.same_tree(f"positions[{i}]", p, params, "params")
    T = float(temperature)
    n = min(num_data, 128) if batch_size is None else int(batch_size)
    k_ggn, k_pow, k_sub = jax.random.split(key, 3)

    if curvature is None:
        curvature = laplace.diag_ggn(params, log_likelihood, data, key=k_ggn)
    prec = _proper_precision(params, log_prior, curvature)
    h = jax.tree.map(lambda f, p: num_data * f + p, curvature, prec)
    precond = jax.tree.map(lambda hk: T / hk, h)
    rho = jax.tree.map(lambda f, hk: num_data * f / hk, curvature, h)

    # Stability: λ_max of M^½ ∇²(U/T) M^½ on a subsample of the data.
    m = min(num_data, int(hessian_examples))
    idx = jax.random.choice(k_sub, num_data, (m,), replace=False) if m < num_data else None
    sub = tuple(a if idx is None else jnp.take(a, idx, axis=0) for a in data)

    positions = [params] if positions is None else positions

    # Per-weight steps d_k = min(max_step, c / ρ_k): weights the data barely touch (ρ_k → 0,
    # such as the rows of inputs that are always zero) take the largest step, those it dominates
    # a step c / ρ_k, with c the largest value for which the preconditioned, stepped Hessian
    # D^½ M^½ ∇²(U/T) M^½ D^½ has λ_max <= 1 (power iteration) and the minibatch noise stays a
    # fraction ε of the injected noise.
    frac = 1.0 - n / num_data
    c = 2 * noise_fraction * n / (num_data * frac) if frac > 0 else 1.0
    c = min(c, 1.0)

    def steps(c):
        return jax.tree.map(lambda r: jnp.minimum(max_step, c / jnp.maximum(r, 1e-30)), rho)

    lam_max = float("inf")
    for i in range(4):
        d = steps(c)
        sqrt_md = jax.tree.map(lambda mk, dk: jnp.sqrt(mk * dk), precond, d)
        lam_max = _power_max(
            jax.random.fold_in(k_pow, i),
            positions,
            sqrt_md,
            sub,
            num_data / m,
            1.0 / T,
            log_likelihood=log_likelihood,
            log_prior=log_prior,
        )
        if not math.isfinite(lam_max):  # a Hessian-vector product overflowed: a smaller step
            c, lam_max = 0.01 * c, float("inf")
            continue
        if lam_max <= 1.0:
            break
        c = 0.9 * c / lam_max
    else:
        d = steps(c)
    # after a divergence: smaller steps for every weight the data has touched (weights with no
    # curvature anywhere, such as the rows of inputs that are always zero, are decoupled)
    d = jax.tree.map(lambda dk, f: jnp.where(f > 0, dk * step_scale, dk), d, curvature)
    eta = float(max_step)
    precond = jax.tree.map(lambda mk, dk: mk * dk / eta, precond, d)
    noise = _minibatch_noise(curvature, num_data, n)
    slowest = min(float(jnp.min(dk)) for dk in jax.tree.leaves(d))
    tau = 1.0 / max(slowest, 1e-12)
    rho_max = max(float(jnp.max(r)) for r in jax.tree.leaves(rho))

    # burn-in 5τ within half the budget; then at least min_samples kept states per chain,
    # thinned by up to τ/2 where the budget allows
    num_burnin = int(min(max(200, math.ceil(5 * tau)), max_steps // 2))
    room = max(1, max_steps - num_burnin)
    thin = max(1, min(int(tau // 2), room // min_samples))
    want = math.ceil(target_ess * 2 * tau / (num_chains * thin))
    num_samples = int(max(1, min(want, room // thin)))
    return AutoSettings(
        learning_rate=eta,
        preconditioner=precond,
        gradient_noise=noise,
        batch_size=n,
        num_burnin=num_burnin,
        num_samples=num_samples,
        thin=thin,
        relaxation_steps=tau,
        curvature_max=lam_max,
        data_fraction=rho_max,
    )


# ----------------------------------------------------------------- the many-chain driver


class SamplingResult(NamedTuple):
    """What :func:`run` returns; arrays with a leading chain axis have ``C = num_chains``."""

    moments: _moments.MomentsState  # merged over chains: use bn.moments.mean / variance
    chain_moments: _moments.MomentsState  # per chain, every leaf with a leading (C,) axis
    params: PyTree  # the last state of every chain, leaves (C, ...)
    opt_state: PyTree  # the transform's last state, leaves (C, ...)
    log_posterior: jax.Array  # (C, num_samples): −U at the kept states, a minibatch estimate
    trace: jax.Array  # (C, num_samples, k): the traced weights at the kept states
    trace_names: tuple[str, ...]  # (k,): "path[index]" of the traced weights
    rhat: np.ndarray  # (k,): split R-hat of the traced weights (numpyro.diagnostics)
    ess: np.ndarray  # (k,): effective sample size of the traced weights, all chains together
    num_steps: int  # num_burnin + num_samples * thin (after any pilot phase)
    converged: bool  # max R-hat <= rhat_threshold and min ESS >= ess_threshold
    predictive: jax.Array | None  # (M, ...) mean of predict(θ, inputs) over kept states, or None
    settings: dict  # the settings used: learning_rate, batch_size, num_burnin, ... (and auto's)
    # (C, num_samples, m, K): predict's outputs on the first m <= 32 held-out inputs at the kept
    # states (K = the size of one input's output; m·K <= 1,024), or None without predict
    predictive_trace: jax.Array | None = None
    # (m,): split R-hat and ESS of each of those inputs' output of the largest mean (the
    # predicted class's probability), convergence in function space; None without predict
    predictive_rhat: np.ndarray | None = None
    predictive_ess: np.ndarray | None = None


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
    state: SamplerState  # (C, ...) the chains
    moments: _moments.MomentsState  # (C, ...) running moments
    step_key: jax.Array  # (C,) keys of the steps' noise (folded with t)
    data_key: jax.Array  # (C,) keys of the per-epoch permutations
    perm: jax.Array  # (C, N) int32: this epoch's order of the examples ((C, 0) for full batches)
    bad_step: jax.Array  # (C,) int32: first non-finite step, −1 while finite
    log_post: jax.Array  # (C, S) thinned −U
    trace: jax.Array  # (C, S, k) thinned traced weights
    pred_sum: Any  # (C, M, ...) sum of the predictive over kept states, or () without one
    pred_trace: Any  # (C, S, m, K) predict's outputs on the first m held-out inputs, or ()


# the drift clip of the automatic settings, in noise standard deviations per step
_MAX_DRIFT = 3.0
# the held-out inputs whose predictive outputs are traced for function-space diagnostics, and
# the most values traced per kept state (wider outputs trace fewer inputs, or none)
_PREDICTIVE_TRACED = 32
_PREDICTIVE_TRACED_VALUES = 1024
# with a checkpoint and no progress bar, the fewest steps between two chances to save
_SAVE_CHUNK = 1000


def _build_transform(transform, learning_rate, temperature, precond, gnoise):
    if precond is None:
        return transform(learning_rate, temperature=temperature)
    if _is_baoab(transform):  # bn.baoab's automatic settings: a preconditioner only
        return transform(learning_rate, temperature=temperature, preconditioner=precond)
    # bn.sgld's: the gradient noise to subtract (None: none) and the drift clip
    return transform(
        learning_rate,
        temperature=temperature,
        preconditioner=precond,
        gradient_noise=gnoise,
        max_drift=_MAX_DRIFT,
    )


def _trace_spec(params: PyTree, k: int) -> tuple[tuple[tuple[int, tuple[int, ...]], ...], tuple]:
    """About k weights over every leaf: each leaf gets at least one (two where it has them),
    the rest in proportion to its size, evenly spaced inside it: ((leaf, indices), ...), names."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    sizes = [int(np.size(x)) for _, x in flat]
    total = sum(sizes)
    if k == 0 or total == 0:
        return (), ()
    spec, names = [], []
    for i, (path, leaf) in enumerate(flat):
        if sizes[i] == 0:
            continue
        share = max(min(2, sizes[i]), int(round(k * sizes[i] / total)))
        mine = np.unique(np.linspace(0, sizes[i] - 1, min(share, sizes[i])).round().astype(int))
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


_merge_chains = jax.jit(_moments.merge_chains)


class _Arrays(NamedTuple):
    """A chain's state without its static kernel, as it crosses a jit boundary."""

    params: PyTree
    opt_state: PyTree
    count: jax.Array
    preconditioner: PyTree = None  # the carried multipliers (None: the transform's own)
    prior_precision: PyTree = None  # their prior part, which stays in place


@dataclasses.dataclass(frozen=True)
class _Static:
    """The settings the compiled loop is specialised to (hashable: a jit static argument)."""

    # the callables, or the structures of those whose arrays are data (_split_fn)
    log_likelihood: Any
    log_prior: Any
    transform: Any
    learning_rate: Any
    temperature: float
    batch_size: int
    capacity: int  # room for kept states per chain (num_samples rounded up to a power of 2)
    trace_spec: tuple
    mesh: Any
    predict: Any
    move: Any = None
    view: Any = None  # a Centring: its to_params maps kept states to θ's coordinates
    # every chain carries the preconditioner (init's preconditioner=), which then comes as
    # (M, P or None), P the prior precision that stays in place (init's prior_precision=)
    carry: bool = False


@functools.partial(jax.jit, static_argnames=("n",))
def _first_rows(buffer: jax.Array, *, n: int) -> jax.Array:
    return buffer[:, :n]


def _head(buffer: jax.Array, n: int) -> jax.Array:
    """The first ``n`` kept states of a (chains, capacity, ...) buffer, on the device."""
    return buffer if buffer.shape[1] == n else _first_rows(buffer, n=n)


# (static part, data part) of a function that enters compiled code, and back: a Partial log
# prior's or a shear's arrays cross the jit boundary as data, so one compilation serves every
# value of them
_split_fn = _tree.split_fn
_join_fn = _tree.join_fn
_FNS = ("log_likelihood", "log_prior", "move", "view")  # _Static's fields split so


def _functions(s: _Static, fn_args: tuple) -> tuple:
    """(log_likelihood, log_prior, move, view) of the compiled loop: ``s``'s static parts joined
    with their arrays ``fn_args``, one list per name in ``_FNS``."""
    return tuple(_join_fn(getattr(s, name), a) for name, a in zip(_FNS, fn_args))


def _capacity(num_samples: int) -> int:
    """Buffer rows for ``num_samples`` kept states: the next power of two (0 for none), so that
    runs whose numbers of samples differ a little share one compiled loop."""
    return 0 if num_samples <= 0 else 1 << (int(num_samples) - 1).bit_length()


def _axes(mesh):
    """The mesh axes chains and minibatches are split over (None where the mesh has none)."""
    chain_axis = "chain" if mesh is not None and "chain" in mesh.axis_names else None
    data_axis = "data" if mesh is not None and "data" in mesh.axis_names else None

    def constrain(tree, *spec):
        if mesh is None:
            return tree
        sharding = NamedSharding(mesh, P(*spec))
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)

    return chain_axis, data_axis, constrain


def _init_from(s: _Static, precond, gnoise, fn_args, num_data: int):
    """``init`` of one chain with the compiled loop's settings: params -> SamplerState."""
    # a carried preconditioner comes as (M, prior precision P or None)
    precond, fixed = precond if s.carry else (precond, None)
    optimizer = _build_transform(s.transform, s.learning_rate, s.temperature, precond, gnoise)
    log_likelihood, log_prior, move, _ = _functions(s, fn_args)
    return functools.partial(
        init,
        log_likelihood=log_likelihood,
        log_prior=log_prior,
        num_data=num_data,
        transform=optimizer,
        move=move,
        temperature=s.temperature,
        preconditioner=precond if s.carry else None,
        prior_precision=fixed,
    )


@functools.partial(jax.jit, static_argnames=("static", "num_data", "params_per_chain"))
def _init_carry(
    chain_keys,
    params,
    precond,
    gnoise,
    predict_inputs,
    fn_args,
    *,
    static,
    num_data,
    params_per_chain,
):
    """Every chain's state before its first step: sampler state, empty moments and buffers."""
    s = static
    batch_size, num_samples, predict, mesh = s.batch_size, s.capacity, s.predict, s.mesh
    num_chains = chain_keys.shape[0]
    full_batch = batch_size >= num_data
    chain_axis, _, constrain = _axes(mesh)
    if not params_per_chain:
        params = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_chains,) + jnp.shape(x)), params)
    states = jax.vmap(_init_from(s, precond, gnoise, fn_args, num_data))(params)
    keys = jax.vmap(lambda k: jax.random.split(k, 2))(chain_keys)
    num_traced = sum(len(idx) for _, idx in s.trace_spec)
    if predict is not None:
        shape = jax.eval_shape(predict, jax.tree.map(lambda x: x[0], params), predict_inputs)
        pred_sum = jnp.zeros((num_chains,) + shape.shape, jnp.float32)
        width = int(np.prod(shape.shape[1:], dtype=int))
        m = 0 if not shape.shape or width == 0 else shape.shape[0]
        m = min(m, _PREDICTIVE_TRACED, _PREDICTIVE_TRACED_VALUES // max(width, 1))
        pred_trace = jnp.zeros((num_chains, num_samples, m, width), jnp.float32) if m else ()
    else:
        pred_sum = pred_trace = ()
    steps_per_epoch = 1 if full_batch else num_data // batch_size
    carry = _Carry(
        state=_Arrays(
            states.params,
            states.opt_state,
            states.count,
            states.preconditioner,
            states.prior_precision,
        ),
        moments=jax.vmap(_moments.init)(params),
        step_key=keys[:, 0],
        data_key=keys[:, 1],
        perm=jnp.zeros((num_chains, 0 if full_batch else steps_per_epoch, batch_size), jnp.int32),
        bad_step=jnp.full((num_chains,), -1, jnp.int32),
        log_post=jnp.zeros((num_chains, num_samples), jnp.float32),
        trace=jnp.zeros((num_chains, num_samples, num_traced), jnp.float32),
        pred_sum=pred_sum,
        pred_trace=pred_trace,
    )
    return constrain(carry, chain_axis)


@functools.partial(jax.jit, static_argnames=("static",))
def _sample(
    carry,
    start,
    length,
    num_burnin,
    thin,
    data,
    precond,
    gnoise,
    predict_inputs,
    floor,
    fn_args,
    *,
    static,
):
    """Steps start .. start + length of every chain, in one loop, up to the first divergence of
    any chain. The numbers of steps are data: one compilation serves every length, burn-in and
    thinning (and every value of the arrays in ``fn_args``: a ``Partial`` log prior's, a
    shear's centres)."""
    s = static
    batch_size, capacity = s.batch_size, s.capacity
    trace_spec, mesh, predict = s.trace_spec, s.mesh, s.predict
    num_data = jax.tree.leaves(data)[0].shape[0]
    full_batch = batch_size >= num_data
    steps_per_epoch = 1 if full_batch else num_data // batch_size
    chain_axis, data_axis, constrain = _axes(mesh)
    # the chains' states cross the jit boundary as arrays; the kernel is rebuilt here
    one = jax.tree.map(lambda x: x[0], carry.state.params)
    kernel = _init_from(s, precond, gnoise, fn_args, num_data)(one).kernel
    view = _functions(s, fn_args)[3]
    p, o, n, m, q = carry.state
    carry = carry._replace(state=SamplerState(p, o, n, kernel, preconditioner=m, prior_precision=q))

    def shuffle(data_key, epoch):
        return _loop.shuffled_batches(jax.random.fold_in(data_key, epoch), num_data, batch_size)

    def minibatches(t, perm):
        # This step's minibatch of every chain, leaves (C, n, ...); or the whole data set.
        if full_batch:
            return constrain(data, data_axis)
        idx = perm[:, t % steps_per_epoch]
        batch = jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data)
        return constrain(batch, chain_axis, data_axis)

    def record(t, params, log_post, ok, moments, buf_lp, buf_tr, pred, pred_tr):
        # The kept sample is θ_t, the state at which step t took its gradient, so that the
        # recorded −U belongs to it. It enters the moments only when that step was accepted (θ_t
        # itself is finite: a chain only ever moves to a finite state).
        s = (t - num_burnin) // thin

        def one(m, p, lp, ok, buf_lp, buf_tr, pred, pred_tr):
            if view is not None:
                p = view.to_params(p)
            m_new = _moments.update(m, p)
            m = jax.tree.map(lambda a, b: jnp.where(ok, a, b), m_new, m)
            buf_lp = buf_lp.at[s].set(jnp.where(ok, lp, jnp.nan).astype(jnp.float32))
            buf_tr = buf_tr.at[s].set(_traced(p, trace_spec))
            if predict is not None:
                out = predict(p, predict_inputs).astype(jnp.float32)
                pred = pred + jnp.where(ok, out, 0.0)
                if not isinstance(pred_tr, tuple):  # () where nothing is traced
                    first = out[: pred_tr.shape[1]]
                    pred_tr = pred_tr.at[s].set(first.reshape(pred_tr.shape[1:]))
            return m, buf_lp, buf_tr, pred, pred_tr, ok

        return jax.vmap(one)(moments, params, log_post, ok, buf_lp, buf_tr, pred, pred_tr)

    def body(t, c: _Carry, burnin_only=False):
        if not full_batch:  # a fresh permutation of the examples at the start of every epoch
            perm = jax.lax.cond(
                t % steps_per_epoch == 0,
                lambda: jax.vmap(shuffle, in_axes=(0, None))(c.data_key, t // steps_per_epoch),
                lambda: c.perm,
            )
            c = c._replace(perm=perm)
        alive = c.bad_step < 0
        batch = minibatches(t, c.perm)
        keys_t = jax.vmap(jax.random.fold_in, in_axes=(0, None))(c.step_key, t)
        proposed, u, finite = jax.vmap(_propose, in_axes=(0, 0, None if full_batch else 0))(
            keys_t, c.state, batch
        )
        # a runaway chain: its log posterior fell below the floor (see _runaway_floor)
        ok = alive & finite & (-u >= floor)
        if capacity > 0 and not burnin_only:
            is_sample = (t >= num_burnin) & ((t - num_burnin) % thin == thin - 1)
            moments, buf_lp, buf_tr, pred, pred_tr, ok = jax.lax.cond(
                is_sample,
                lambda args: record(t, c.state.params, -u, *args),
                lambda args: (*args[1:], args[0]),
                (ok, c.moments, c.log_post, c.trace, c.pred_sum, c.pred_trace),
            )
            c = c._replace(
                moments=moments, log_post=buf_lp, trace=buf_tr, pred_sum=pred, pred_trace=pred_tr
            )
        bad_step = jnp.where(alive & ~ok, t, c.bad_step)
        c = c._replace(state=jax.vmap(_accept)(ok, proposed, c.state), bad_step=bad_step)
        return constrain(c, chain_axis)

    # The loops end early once a chain has diverged: the run stops there with an error, so the
    # other chains' further steps would be lost work.
    def steps_until(stop, burnin_only):
        def going(tc):
            return (tc[0] < stop) & jnp.all(tc[1].bad_step < 0)

        return lambda tc: jax.lax.while_loop(
            going, lambda tc: (tc[0] + 1, body(*tc, burnin_only=burnin_only)), tc
        )

    # The burn-in runs in a loop of its own whose carry leaves out the moments and buffers, and
    # whose steps carry no conditional over them (XLA copies a conditional's operands).
    carry = constrain(carry, chain_axis)
    kept = {
        f: getattr(carry, f) for f in ("moments", "log_post", "trace", "pred_sum", "pred_trace")
    }
    end = start + length
    t, light = steps_until(jnp.minimum(num_burnin, end), True)(
        (start, carry._replace(**dict.fromkeys(kept)))
    )
    _, carry = steps_until(end, False)((t, light._replace(**kept)))
    s = carry.state
    return carry._replace(
        state=_Arrays(s.params, s.opt_state, s.count, s.preconditioner, s.prior_precision)
    ), None


def _check_positive_int(name: str, value: Any, minimum: int, meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} ({meaning}) must be an int >= {minimum}, got {value!r}.")
    return int(value)


def _chain_keys(key: Any, num_chains: int | None) -> jax.Array:
    if not hasattr(key, "dtype") or isinstance(key, (np.integer, np.floating, np.bool_)):
        raise TypeError(
            f"key must be a PRNG key such as jax.random.key(0), or a vector of keys (one per "
            f"chain); got {key!r}."
        )
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
    learning_rate: float | optax.Schedule | None = None,
    temperature: float = 1.0,
    transform: Callable[..., optax.GradientTransformation] = _sgld,
    batch_size: int | None = None,
    num_burnin: int | None = None,
    num_samples: int | None = None,
    thin: int | None = None,
    num_chains: int | None = None,
    params_per_chain: bool = False,
    num_traced: int = 64,
    devices: Sequence[jax.Device] | Mesh | None = None,
    progress: bool = False,
    progress_every: int | None = None,
    predict: Callable[[PyTree, jax.Array], jax.Array] | None = None,
    predict_inputs: Any = None,
    rhat_threshold: float = 1.1,
    ess_threshold: float = 100.0,
    auto: dict | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = 60.0,
    move: UnitSwaps | ClassShifts | tuple | None = None,
    centring: Centring | None = None,
) -> SamplingResult:
    """Runs SGLD chains and returns running posterior moments (no samples are stored).

    Built from :func:`init` and :func:`step`: every step t of every chain takes a minibatch B_t
    of n examples (a fresh permutation of the N examples per epoch and chain; the last
    incomplete batch of an epoch is skipped), computes g = ∇U(θ_t) with
    U(θ) = −log p(θ) − (N / n) Σ_{i ∈ B_t} log p(y_i | x_i, θ), and applies the transform with
    the chain's own key for that step; for :func:`bayesnoise.sgld`,
    θ_{t+1} = θ_t − η_t M g + N(0, 2 η_t T M). After ``num_burnin`` steps, every ``thin``-th
    state θ_t (t = num_burnin + thin − 1, num_burnin + 2 thin − 1, ...) enters the chain's
    running moments and, with ``predict``, a running sum of ``predict(θ_t, predict_inputs)``:
    ``result.predictive`` is their mean over all kept states of all chains, the Bayesian model
    average (for a classifier, pass a ``predict`` that returns probabilities). The outputs on
    the first 32 held-out inputs are kept at every kept state too (``result.predictive_trace``),
    and each input's output of the largest mean (a classifier's predicted class probability)
    gets its split R-hat and ESS (``result.predictive_rhat``, ``predictive_ess``; the worst in
    ``settings``): convergence in function space, which the weights' symmetries do not touch.
    ``converged`` reads the traced weights only.

    Without ``learning_rate`` (the default), the settings come from :func:`auto_settings`: a
    pilot run of the preconditioned sampler from ``params``, the curvature taken again where
    the pilot ended (the elementwise maximum of both, since a network that fits its data
    perfectly has almost no curvature at its mode), then burn-in and sampling with the step,
    preconditioner and numbers of steps derived from it; ``num_chains`` defaults to 4 there.
    The prior must then be proper in every weight. ``batch_size``, ``num_burnin``,
    ``num_samples`` and ``thin`` given explicitly override the derived values; ``auto`` passes
    options to :func:`auto_settings` (``noise_fraction``, ``max_step``, ``target_ess``,
    ``max_steps``) and ``swap_invariant``: with a :class:`UnitSwaps` move, True passes the
    preconditioner through :meth:`UnitSwaps.invariant` (False by default). With an explicit
    ``learning_rate`` nothing is derived: ``num_burnin`` defaults to 0, ``num_samples`` to
    1000, ``thin`` to 1 and ``num_chains`` to 1.

    With ``transform=bn.baoab`` (or a ``functools.partial`` of it) and no ``learning_rate``,
    kinetic Langevin gets its own automatic settings: the diagonal Laplace variance
    T / (N diag GGN + prior precision) at ``params`` as the preconditioner (unless the partial
    names one), h = ``step_fraction`` / sqrt(λ_max) with λ_max from :func:`max_curvature`
    (``step_fraction`` 0.5 by default; BAOAB is stable below 2), the whole data set as the batch
    unless ``batch_size`` is given, and of ``max_steps`` (20,000 by default) steps per chain a
    tenth as burn-in and 1,000 kept states over the rest. With a minibatch of n < N examples,
    h is also at most the step at which the kick's gradient noise, of variance
    B = (N² / n)(1 − n / N) diag GGN per weight, adds ``noise_fraction`` (0.25 by default) of
    the momentum noise that the O step injects, at the weight of the largest M B / T (about
    h = 2 ε γ n / (N − n) where the data dominate); ``settings["step_limit"]`` says which bound
    holds.
    After a divergence the curvature at the other chains' states joins the estimate, the step
    fraction halves (and the step with it) and the run starts again (``max_retries``, 3 by
    default). ``settings`` then holds ``method="baoab"``, the step, the step fraction, the
    friction, λ_max, the largest M B / T and the preconditioner. Its ``auto`` options are
    ``max_steps``, ``step_fraction``, ``noise_fraction``, ``hessian_examples``,
    ``max_retries``, ``swap_invariant`` and ``carry_preconditioner``: with a move, every chain
    carries the preconditioner (:func:`init`'s ``preconditioner=`` and ``prior_precision=``),
    so that an exchanged unit takes its own multipliers, and its momentum, to its new place
    (True by default, False with ``swap_invariant``; on MNIST's EM posterior it turned a run
    that diverged within 900 steps into one whose 71 traced weights all converged in 40,000,
    README, "Centring the biases").

    ``log_likelihood``, ``log_prior`` and the transform are static arguments of the compiled
    loop: calling again with the same function objects and settings reuses it, whatever the
    numbers of steps (they enter as data; the buffers of kept states are sized to the next
    power of two). A log prior given as a ``jax.tree_util.Partial`` enters with its arguments
    as data, so one compilation serves every value of them (``bn.em.e_step`` passes its prior
    this way: EM's iterations and other seeds reuse the loop). A NaN or inf in a chain's U,
    gradient or state freezes that chain, ends the loop at that step and raises
    :class:`DivergenceError` after it: no host synchronisation in the loop.

    With ``checkpoint`` (a folder), a long run can be stopped and started again: every
    compiled run of the chains (with automatic settings, the pilot windows and the main run)
    saves its whole state (chains, moments, kept states, predictive sums, keys) to a file in
    that folder after a stretch of steps, at most every ``checkpoint_every`` seconds and at its
    end. The file is named by a digest of the run's settings, start, data, keys and prior
    arguments; a call with the same inputs reads it back and goes on from the saved step, to
    the same result as a run that was never stopped. Functions enter the digest by name and the
    numbers they close over, not by their code: after changing one, delete the folder. The
    files stay after the run (a finished run's file returns its result at once); delete the
    folder when the result is saved.

    Diagnostics come after the loop: split R-hat and ESS of ``num_traced`` weights spread over
    every leaf; ``result.converged`` is max R-hat <= ``rhat_threshold`` and min ESS >=
    ``ess_threshold``, and a ``logging`` warning (logger ``"bayesnoise"``) names the worst
    weights when it is False.

    Args:
        key: a PRNG key, split into ``num_chains`` chains; or a vector of keys, one per chain.
        params: the initial state, shared by all chains; with ``params_per_chain=True``, every
            leaf has a leading chain axis instead.
        log_likelihood: ``log_likelihood(params, *batch)`` -> per-example log-likelihoods of
            shape (n,), for ``batch`` the minibatch of every array in ``data``.
        log_prior: ``log_prior(params)`` -> scalar log prior density (for the GSM,
            ``functools.partial(bn.gsm.full_log_prior, hierarchy=h)``).
        data: a tuple of arrays with a common leading axis of N examples, e.g. ``(x, y)``.
        learning_rate: the step size η (> 0) or an optax schedule; None for automatic settings.
        temperature: T >= 0; 1 samples the posterior (automatic settings need T > 0).
        transform: builds the update rule, ``transform(learning_rate, temperature=T)``:
            :func:`bayesnoise.sgld` (default), :func:`bayesnoise.psgld` (which needs an explicit
            learning rate), :func:`bayesnoise.baoab` (kinetic Langevin: an explicit step, best
            with the whole data set as the batch; ``functools.partial(bn.baoab,
            preconditioner=var)`` to scale it, h from :func:`max_curvature`) or any compatible
            optax transform.
        batch_size: n, the minibatch size; None for the whole data set (automatic settings:
            min(N, 128)).
        num_burnin, num_samples, thin: steps before the first kept state, kept states per
            chain, keep every thin-th state.
        num_chains: the number of chains when ``key`` is a single key.
        params_per_chain: whether ``params`` already has a leading chain axis.
        num_traced: about how many weights to trace (at least one per leaf).
        devices: devices to shard the chains over, or a ``Mesh`` with the axes ``"chain"``
            and/or ``"data"`` (see :func:`make_mesh`).
        progress: show a tqdm progress bar.
        predict: ``predict(params, inputs)`` -> an array (e.g. class probabilities (M, K)),
            averaged over the kept states of all chains into ``result.predictive``.
        predict_inputs: the inputs handed to ``predict`` (e.g. held-out x).
        rhat_threshold, ess_threshold: the convergence criteria.
        auto: options for :func:`auto_settings` (with :func:`bayesnoise.baoab`: those above).
        checkpoint: None, or a folder (created if missing) for the run's checkpoints.
        checkpoint_every: the least number of seconds between two saves of a run (>= 0; its
            last step is always saved). A save can come every ``progress_every`` steps, or
            without it every max(1,000, a hundredth of the run) steps.
        move: None, a :class:`UnitSwaps` (from :func:`unit_swaps`): exact exchanges of an
            MLP's hidden units, accepted by the prior; a :class:`ClassShifts` (from
            :func:`class_shifts`): exact draws along the directions a softmax ignores (the
            log-likelihood is checked to ignore them on the first 64 examples); or a tuple of
            them, made in turn before every step of every chain.
        centring: None, or a :class:`Centring` (from :func:`centring`): the chains sample
            its sheared coordinates θ' (automatic settings, preconditioner and step included),
            while the moments, traced weights, predictive and ``result.params`` are in θ's
            (``result.opt_state`` stays in θ'). Moves act on θ.

    Returns:
        A :class:`SamplingResult`.

    Raises:
        ValueError: for an invalid setting (named in the message), when ``log_likelihood``,
            ``log_prior`` or ``predict`` return the wrong shape, or when automatic settings
            meet an improper prior or a non-finite curvature.
        DivergenceError: (a ``FloatingPointError``) when a chain's log posterior, gradient or
            parameters become NaN or inf; the message names the step and the step size, and the
            error's ``result`` holds every chain at its state when the first one diverged (that
            one at its last finite state).
    """
    is_auto = learning_rate is None
    if is_auto and num_chains is None and (not hasattr(key, "ndim") or jnp.ndim(key) == 0):
        num_chains = 4
    chain_keys = _chain_keys(key, num_chains)
    n_chains = chain_keys.shape[0]
    _check_callables(log_likelihood, log_prior)
    if not is_auto and not callable(learning_rate):
        _check.number("learning_rate", learning_rate, lo=0.0, lo_open=True)
    _check.number("temperature", temperature, lo=0.0)
    if not callable(transform):
        raise TypeError(
            f"transform must be a callable transform(learning_rate, temperature=T) returning an "
            f"optax transform, such as bn.sgld; got {transform!r}."
        )
    if auto is not None:
        _check_auto_options(auto, baoab=_is_baoab(transform))
    data, num_data = _tree.data_tuple(data)
    if batch_size is not None:
        batch_size = _check_positive_int("batch_size", batch_size, 1, "examples per minibatch")
        if batch_size > num_data:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {num_data} examples in data; use at most "
                f"{num_data}, or None for the whole data set."
            )
    for name, value, low, meaning in (
        ("num_burnin", num_burnin, 0, "steps before sampling"),
        ("num_samples", num_samples, 1, "states kept per chain"),
        ("thin", thin, 1, "keep every thin-th state"),
    ):
        if value is not None:
            _check_positive_int(name, value, low, meaning)
    num_traced = _check_positive_int("num_traced", num_traced, 0, "weights traced")
    if checkpoint is not None:
        if not isinstance(checkpoint, (str, os.PathLike)) or not os.fspath(checkpoint):
            raise TypeError(
                f"checkpoint must be None or the path of a folder (a str or os.PathLike), got "
                f"{checkpoint!r}."
            )
        if os.path.exists(checkpoint) and not os.path.isdir(checkpoint):
            raise ValueError(
                f"checkpoint={os.fspath(checkpoint)!r} is a file; allowed: None, or the path of "
                f"a folder (created if missing) for the run's checkpoints."
            )
    _check.number("checkpoint_every", checkpoint_every, lo=0.0)
    if move is not None:
        _check_move(move)
    for name, value in (("rhat_threshold", rhat_threshold), ("ess_threshold", ess_threshold)):
        _check.number(name, value, lo=0.0, lo_open=True)

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
    _check_start(params)
    if move is not None:
        move = _move_list(move)
        _check_moves_fit(move, one_params, log_prior)

    # Shapes of the user's functions, checked once before compiling the whole run.
    n_check = batch_size or (min(num_data, 128) if is_auto else num_data)
    batch = tuple(jax.ShapeDtypeStruct((n_check,) + a.shape[1:], a.dtype) for a in data)
    ll_shape = jax.eval_shape(log_likelihood, one_params, *batch).shape
    if ll_shape != (n_check,):
        raise ValueError(
            f"log_likelihood(params, *batch) must return one log-likelihood per example, shape "
            f"({n_check},) for a batch of {n_check}; got shape {ll_shape}. Return the "
            f"per-example values, not their sum or mean (the sampler scales them by N/n)."
        )
    lp_shape = jax.eval_shape(log_prior, one_params).shape
    if lp_shape != ():
        raise ValueError(f"log_prior(params) must return a scalar, got shape {lp_shape}.")
    if predict is not None:
        if not callable(predict):
            raise TypeError(
                f"predict must be None or a callable predict(params, inputs), got {predict!r}."
            )
        if predict_inputs is None:
            raise ValueError(
                "predict_inputs must be the held-out inputs to average predict over, got None."
            )
        predict_inputs = jnp.asarray(predict_inputs)
        want = data[0].shape[1:]
        if predict_inputs.ndim == 0 or predict_inputs.shape[1:] != want:
            raise ValueError(
                f"predict_inputs must hold examples shaped like the training inputs: it must "
                f"have shape (M,) + {tuple(want)}; got shape {tuple(predict_inputs.shape)}."
            )
        jax.eval_shape(predict, one_params, predict_inputs)
    for m in move or ():
        if isinstance(m, ClassShifts):
            _check_shift_invariance(m, one_params, log_likelihood, data)
    swaps = any(isinstance(m, UnitSwaps) for m in move or ())
    if centring is not None:
        if not isinstance(centring, Centring):
            raise TypeError(
                f"centring must be None or a bn.sampling.Centring (from bn.sampling.centring), "
                f"got {centring!r} of type {type(centring).__name__}."
            )
        centring._check_fits(one_params)
        # the chains move in θ' = A⁻¹ θ; the functions they call read θ = A θ'
        params, one_params = centring.to_position(params), centring.to_position(one_params)
        log_likelihood = _CentredLikelihood(log_likelihood, centring)
        log_prior = jax.tree_util.Partial(_centred_log_prior, centring, log_prior)
        if move is not None:
            move = tuple(_Sheared(m, centring) for m in move)

    common = dict(
        log_likelihood=log_likelihood,
        log_prior=log_prior,
        transform=transform,
        temperature=temperature,
        devices=devices,
        progress=progress,
        progress_every=progress_every,
        predict=predict,
        predict_inputs=predict_inputs,
        # the data enter every compiled run's checkpoint key by their digest, hashed once here
        checkpoint=None
        if checkpoint is None
        else (os.fspath(checkpoint), _resume.digest(data, predict_inputs)),
        checkpoint_every=float(checkpoint_every),
        move=move,
        view=centring,
    )
    trace_spec, trace_names = _trace_spec(one_params, num_traced)
    try:
        if not is_auto:
            floor, _ = _runaway_floor(
                params,
                params_per_chain,
                log_likelihood,
                log_prior,
                data,
                batch_size or num_data,
                temperature,
            )
            result = _run_fixed(
                chain_keys,
                params,
                data,
                floor=floor,
                learning_rate=learning_rate,
                batch_size=batch_size or num_data,
                num_burnin=0 if num_burnin is None else num_burnin,
                num_samples=1000 if num_samples is None else num_samples,
                thin=1 if thin is None else thin,
                params_per_chain=bool(params_per_chain),
                trace_spec=trace_spec,
                trace_names=trace_names,
                precond=None,
                gnoise=None,
                **common,
            )
            settings = {"learning_rate": "schedule" if callable(learning_rate) else learning_rate}
        else:
            if _is_baoab(transform):
                driver = _run_baoab_auto
            elif transform is not _sgld:
                raise ValueError(
                    f"automatic settings drive bn.sgld or bn.baoab with a preconditioner; pass "
                    f"learning_rate= explicitly for the transform "
                    f"{getattr(transform, '__name__', transform)!r}."
                )
            else:
                driver = _run_auto
            result, settings = driver(
                chain_keys,
                params,
                one_params,
                data,
                batch_size=batch_size,
                num_burnin=num_burnin,
                num_samples=num_samples,
                thin=thin,
                params_per_chain=bool(params_per_chain),
                trace_spec=trace_spec,
                trace_names=trace_names,
                options=dict(auto or {}),
                **common,
            )
    except DivergenceError as err:  # the chains' last states in θ's coordinates
        if centring is not None and err.result is not None:
            err.result = err.result._replace(params=centring.to_params(err.result.params))
        raise
    if centring is not None:
        result = result._replace(params=centring.to_params(result.params))
        settings = dict(settings, centring=[kp for kp, _ in centring.leaves])
    return _finish(result, settings, rhat_threshold, ess_threshold, is_auto, swaps)


@functools.partial(jax.jit, static_argnames=("log_likelihood", "log_prior", "n", "per_chain"))
def _start_log_posterior(
    params, data, ll_args, prior_args, *, log_likelihood, log_prior, n, per_chain
):
    """(−U at ``params`` on the first n examples scaled to the whole data set, the standard
    deviation of the per-example log-likelihoods there), each of shape (C,) (C = 1 unless
    ``per_chain``, where params has a leading chain axis)."""
    num_data = data[0].shape[0]
    head = tuple(a[:n] for a in data)
    log_likelihood = _join_fn(log_likelihood, ll_args)
    log_prior = _join_fn(log_prior, prior_args)

    def one(p):
        ll = log_likelihood(p, *head)
        return log_prior(p) + (num_data / n) * jnp.sum(ll), jnp.std(ll)

    if per_chain:
        return jax.vmap(one)(params)
    lp, sd = one(params)
    return lp[None], sd[None]


def _runaway_floor(
    params, per_chain, log_likelihood, log_prior, data, batch_size, temperature
) -> tuple[float, np.ndarray]:
    """The log posterior below which a chain has run away, and −U at every chain's start.

    A chain whose minibatch log posterior falls more than 20 nats per parameter (plus 20
    standard deviations of its minibatch estimate) below the start's has run away: a divergence
    that stays finite, treated as one. −inf where the start itself is not finite."""
    num_data = int(data[0].shape[0])
    one = jax.tree.map(lambda a: a[0], params) if per_chain else params
    num_params = sum(int(np.size(a)) for a in jax.tree.leaves(one))
    n_floor = min(num_data, 1024)
    log_likelihood, ll_args = _split_fn(log_likelihood, partial=False)
    log_prior, prior_args = _split_fn(log_prior)
    lp, sd = jax.device_get(
        _start_log_posterior(
            params,
            data,
            ll_args,
            prior_args,
            log_likelihood=log_likelihood,
            log_prior=log_prior,
            n=n_floor,
            per_chain=bool(per_chain),
        )
    )
    lp, sd = np.asarray(lp, np.float64), np.asarray(sd, np.float64)
    if not np.all(np.isfinite(lp)):
        return -np.inf, lp
    n_batch = min(num_data, batch_size or 128)
    noise_sd = num_data * float(np.max(sd)) / math.sqrt(n_batch)
    t = max(float(temperature), 1.0)
    return float(np.min(lp)) - 20.0 * num_params * t - 20.0 * noise_sd, lp


# the options of run(auto=...) for bn.sgld (auto_settings' own, and the driver's) and bn.baoab
_AUTO_OPTIONS = (
    "max_step",
    "noise_fraction",
    "target_ess",
    "max_steps",
    "min_samples",
    "hessian_examples",
    "adapt_windows",
    "max_retries",
    "swap_invariant",
)
_BAOAB_OPTIONS = (
    "max_steps",
    "hessian_examples",
    "max_retries",
    "step_fraction",
    "noise_fraction",
    "swap_invariant",
    "carry_preconditioner",
)


def _check_auto_options(auto: Any, baoab: bool = False) -> None:
    """Checks the options of ``run(auto=...)`` for the sampler's automatic settings (those of
    :func:`bayesnoise.baoab` when ``baoab``) before anything is computed."""
    if not isinstance(auto, dict):
        raise TypeError(f"auto must be None or a dict of auto_settings options, got {auto!r}.")
    allowed = _BAOAB_OPTIONS if baoab else _AUTO_OPTIONS
    unknown = sorted(set(auto) - set(allowed), key=str)
    if unknown:
        sampler = "bn.baoab" if baoab else "bn.sgld"
        raise ValueError(
            f"auto has options {unknown} that the automatic settings of {sampler} do not use; "
            f"allowed: {', '.join(allowed)}."
        )
    for name in ("max_step", "noise_fraction", "target_ess"):
        if name in auto:
            _check.number(f"auto['{name}']", auto[name], lo=0.0, lo_open=True)
    for name in ("swap_invariant", "carry_preconditioner"):
        if name in auto and not isinstance(auto[name], bool):
            raise TypeError(f"auto['{name}'] must be True or False, got {auto[name]!r}.")
    if auto.get("swap_invariant") and auto.get("carry_preconditioner"):
        raise ValueError(
            "auto['swap_invariant'] and auto['carry_preconditioner'] are two answers to one "
            "question (which multipliers an exchanged unit steps with); choose one, not both."
        )
    if "step_fraction" in auto:
        _check.number("auto['step_fraction']", auto["step_fraction"], lo=0.0, lo_open=True)
        if not float(auto["step_fraction"]) < 2:
            raise ValueError(
                f"auto['step_fraction'] must be < 2 (h sqrt(λ_max) = 2 is BAOAB's stability "
                f"limit), got {auto['step_fraction']!r}."
            )
    for name, low, meaning in (
        ("max_steps", 1, "the most steps per chain"),
        ("min_samples", 1, "the fewest kept states per chain"),
        ("hessian_examples", 1, "examples of the Hessian"),
        ("adapt_windows", 0, "adaptation windows"),
        ("max_retries", 0, "restarts after a divergence"),
    ):
        if name in auto:
            _check_positive_int(f"auto['{name}']", auto[name], low, meaning)


def _ggn_max(positions, log_likelihood, data, next_key, curvature=None):
    """The elementwise maximum of ``curvature`` and the diagonal GGN at every position where it
    is finite (states at the edge of a divergence are skipped); None if there is none."""
    from bayesnoise import laplace

    for p in positions:
        try:
            found = laplace.diag_ggn(p, log_likelihood, data, key=next_key())
        except ValueError:
            continue
        curvature = found if curvature is None else jax.tree.map(jnp.maximum, curvature, found)
    return curvature


def _start_curvature(curvature):
    if curvature is None:
        raise ValueError(
            "the curvature (diagonal GGN) at the start is not finite: check log_likelihood at "
            "these params, or pass learning_rate= explicitly."
        )
    return curvature


def _finite_start(params, per_chain, log_likelihood, log_prior, data, batch_size, temperature):
    """The runaway floor of :func:`_runaway_floor`, after checking that the log posterior at
    every chain's start is finite (automatic settings take the curvature there)."""
    floor, start_lp = _runaway_floor(
        params, per_chain, log_likelihood, log_prior, data, batch_size, temperature
    )
    n_floor = min(int(data[0].shape[0]), 1024)
    for c, lp in enumerate(start_lp):
        if not math.isfinite(lp):
            raise ValueError(
                f"the log posterior at the starting params{'' if len(start_lp) == 1 else f' of chain {c}'} "
                f"must be finite, got {lp} (log_prior(params) + N/n × the sum of "
                f"log_likelihood over the first {n_floor} examples): check log_likelihood, "
                f"log_prior and the data there."
            )
    return floor


def _run_auto(chain_keys, params, one_params, data, *, options, **kw):
    """Adaptation windows, then burn-in and sampling with the last settings.

    Each window runs the preconditioned sampler with the current settings, then takes the
    curvature again at every chain's state (the elementwise maximum with every earlier
    estimate) and derives the settings anew. When a chain diverges, the curvature at the
    chains' last finite states joins the estimate, the steps of every weight the data touches
    shrink fourfold, and the window (or the sampling run) starts again from where it started.
    """

    n_chains = chain_keys.shape[0]
    temperature = kw["temperature"]
    log_likelihood, log_prior = kw["log_likelihood"], kw["log_prior"]
    batch_size = kw.pop("batch_size")
    overrides = {k: kw.pop(k) for k in ("num_burnin", "num_samples", "thin")}
    params_per_chain = kw.pop("params_per_chain")
    num_windows = int(options.pop("adapt_windows", 4))
    max_retries = int(options.pop("max_retries", 6))
    invariant = bool(options.pop("swap_invariant", False))
    base = jax.random.fold_in(chain_keys[0], 1_000_003)
    calls = itertools.count()

    def chain_positions(state):
        return [jax.tree.map(lambda x, c=c: x[c], state) for c in range(n_chains)]

    def derive(positions, curvature, scale):
        settings = auto_settings(
            jax.random.fold_in(base, next(calls)),
            positions[0],
            log_likelihood,
            log_prior,
            data,
            temperature=temperature,
            batch_size=batch_size,
            num_chains=n_chains,
            curvature=curvature,
            positions=positions,
            step_scale=scale,
            **options,
        )
        if not invariant:
            return settings
        # smaller multipliers only lower the preconditioned curvature: the step stays stable
        return settings._replace(
            preconditioner=_swap_invariant(settings.preconditioner, kw["move"])
        )

    def curvature_at(positions, curvature=None):
        return _ggn_max(
            positions,
            log_likelihood,
            data,
            lambda: jax.random.fold_in(base, next(calls)),
            curvature,
        )

    floor = _finite_start(
        params, params_per_chain, log_likelihood, log_prior, data, batch_size, temperature
    )

    # The estimated minibatch noise B is subtracted only where every step draws a fresh batch
    # (N < 2n: one batch per epoch). Over an epoch's permutation the minibatch noise sums to
    # almost zero at fixed weights (exactly when n divides N; the last incomplete batch is
    # skipped), so weights that relax over more steps than an epoch hardly feel it, and
    # subtracting an estimate made for independent batches would cool them.
    num_data = int(data[0].shape[0])

    def fresh_batches(settings):  # a minibatch drawn afresh at every step: N // n == 1
        return settings.batch_size < num_data and num_data // settings.batch_size == 1

    def attempt(settings, state, per_chain, salt, **run):
        noise = settings.gradient_noise if fresh_batches(settings) else None
        return _run_fixed(
            jax.vmap(lambda k: jax.random.fold_in(k, salt))(chain_keys),
            state,
            data,
            learning_rate=settings.learning_rate,
            batch_size=settings.batch_size,
            params_per_chain=per_chain,
            precond=settings.preconditioner,
            gnoise=noise,
            floor=floor,
            **run,
        )

    positions = chain_positions(params) if params_per_chain else [one_params]
    curvature = _start_curvature(curvature_at(positions))
    scale, state, per_chain, adapted, retries = 1.0, params, params_per_chain, 0, 0
    settings = derive(positions, curvature, scale)

    def diverged(err, where):
        nonlocal curvature, scale, settings, retries
        retries += 1
        if retries > max_retries:
            raise err
        curvature = curvature_at(chain_positions(err.result.params), curvature)
        scale /= 4.0
        settings = derive(positions, curvature, scale)
        logger.info(
            "%s diverged at step %d: starting it again with the curvature where the chains "
            "stopped and steps %g times the derived ones",
            where,
            err.step,
            scale,
        )

    window_length = max(25, settings.num_burnin // num_windows)
    w = 0
    while w < num_windows:
        # windows that share the burn-in (one compiled loop for all of them)
        length = window_length
        try:
            out = attempt(
                settings,
                state,
                per_chain,
                2 + w + 100 * retries,
                num_burnin=length,
                num_samples=0,
                thin=1,
                **{**kw, "trace_spec": (), "trace_names": (), "progress": False},
            )
        except DivergenceError as err:
            diverged(err, f"adaptation window {w}")
            continue
        state, per_chain, adapted = out.params, True, adapted + length
        positions = chain_positions(state)
        curvature = curvature_at(positions, curvature)
        settings = derive(positions, curvature, scale)
        w += 1

    burnin = overrides["num_burnin"]
    burnin = max(0, settings.num_burnin - adapted) if burnin is None else burnin
    while True:
        thin = settings.thin if overrides["thin"] is None else overrides["thin"]
        samples = (
            settings.num_samples if overrides["num_samples"] is None else overrides["num_samples"]
        )
        try:
            result = attempt(
                settings,
                state,
                per_chain,
                1 + 100 * retries,
                num_burnin=burnin,
                num_samples=samples,
                thin=thin,
                **kw,
            )
            break
        except DivergenceError as err:
            diverged(err, "sampling")
    info = {
        "learning_rate": settings.learning_rate,
        "batch_size": settings.batch_size,
        "adaptation_steps": adapted,
        "num_burnin": burnin,
        "num_samples": samples,
        "thin": thin,
        "step_scale": scale,
        "gradient_noise_subtracted": fresh_batches(settings),
        "relaxation_steps": settings.relaxation_steps,
        "curvature_max": settings.curvature_max,
        "data_fraction": settings.data_fraction,
        "preconditioner": settings.preconditioner,
    }
    return result._replace(num_steps=adapted + result.num_steps), info


def _is_baoab(transform) -> bool:
    """Whether ``transform`` is :func:`bayesnoise.baoab`, or a ``functools.partial`` of it."""
    while isinstance(transform, functools.partial):
        transform = transform.func
    return transform is _baoab


def _baoab_noise_step(noise: float, friction: float, noise_fraction: float) -> float:
    """The largest BAOAB step h at which a minibatch's gradient noise stays at most
    ``noise_fraction`` ε of the momentum noise that the O step injects.

    A kick of h with a gradient of variance B adds h² M B to the momentum's variance, which the
    A steps move the weights with before the O step damps it; the O step injects
    T (1 − exp(−2 γ h)). With ``noise`` r the largest M B / T over the weights, h is the root of
    h² r = ε (1 − exp(−2 γ h)), whose left side over the right grows with h: about 2 ε γ / r
    for small h. Where the data dominate a weight, r is about (N − n) / n under the Laplace
    preconditioner, so h is about 2 ε γ n / (N − n). ``inf`` where r is 0 (no bound).
    """
    r, g, eps = float(noise), float(friction), float(noise_fraction)
    if not (math.isfinite(r) and r >= 0):
        raise ValueError(
            f"the largest minibatch noise M B / T must be finite and >= 0, got {r}: check "
            f"log_likelihood and the curvature at the start, or pass learning_rate= explicitly."
        )
    if r == 0:
        return math.inf

    def share(h):
        return h * h * r / -math.expm1(-2 * g * h)

    lo, hi = 0.0, 2 * eps * g / r
    while share(hi) <= eps:
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if share(mid) <= eps else (lo, mid)
    return lo


def _run_baoab_auto(chain_keys, params, one_params, data, *, options, **kw):
    """Kinetic Langevin (:func:`bayesnoise.baoab`) with settings derived at the start.

    The preconditioner is the diagonal Laplace variance T / (N diag GGN + prior precision) at
    ``one_params`` (unless the transform is a partial that names one); h = ``step_fraction`` /
    sqrt(λ_max), λ_max from :func:`max_curvature` there (on ``hessian_examples`` examples, all
    by default), or less where a minibatch's gradient noise would pass ``noise_fraction`` of
    the injected noise (:func:`_baoab_noise_step`); the batch is the whole data set unless
    ``batch_size`` says otherwise; of
    ``max_steps`` steps per chain a tenth is burn-in and the rest gives 1,000 kept states
    (fewer when the budget is short), thinned evenly. After a divergence, the diagonal GGN at
    the other chains' states joins the curvature (the elementwise maximum), the
    preconditioner and λ_max (the largest over the start and those states) are taken again, the
    step fraction halves, and the run starts again from the start, at most ``max_retries``
    times.
    """
    temperature = _auto_temperature(kw["temperature"])
    log_likelihood, log_prior = kw["log_likelihood"], kw["log_prior"]
    num_data = int(data[0].shape[0])
    batch_size = kw.pop("batch_size") or num_data
    lengths = {k: kw.pop(k) for k in ("num_burnin", "num_samples", "thin")}
    params_per_chain = kw.pop("params_per_chain")
    max_steps = int(options.get("max_steps", 20_000))
    fraction = fraction0 = float(options.get("step_fraction", 0.5))
    noise_fraction = float(options.get("noise_fraction", 0.25))
    max_retries = int(options.get("max_retries", 3))
    examples = options.get("hessian_examples")
    invariant = bool(options.get("swap_invariant", False))
    # with a move, each unit takes its own multipliers along unless the invariant ones are asked
    carry = bool(options.get("carry_preconditioner", not invariant)) and kw["move"] is not None
    base = jax.random.fold_in(chain_keys[0], 1_000_033)

    transform = kw.pop("transform")
    given = transform.keywords if isinstance(transform, functools.partial) else {}
    friction = float(given.get("friction", 1.0))
    minibatch = batch_size < num_data
    floor = _finite_start(
        params, params_per_chain, log_likelihood, log_prior, data, batch_size, temperature
    )
    calls = itertools.count()

    def curvature_at(positions, curvature=None):
        return _ggn_max(
            positions,
            log_likelihood,
            data,
            lambda: jax.random.fold_in(base, next(calls)),
            curvature,
        )

    fixed = None  # the prior precision, which a carried preconditioner leaves in place

    def derive(positions, curvature):
        # the preconditioner from the curvature, and the largest λ_max over the positions
        nonlocal fixed
        precond = given.get("preconditioner")
        if precond is None:
            prec = fixed = _proper_precision(one_params, log_prior, curvature)
            precond = jax.tree.map(lambda f, p: temperature / (num_data * f + p), curvature, prec)
            if invariant:
                precond = _swap_invariant(precond, kw["move"])
        lams = [
            max_curvature(
                jax.random.fold_in(base, next(calls)),
                p,
                log_likelihood,
                log_prior,
                data,
                precond,
                temperature=temperature,
                num_examples=None if examples is None else min(num_data, int(examples)),
            )
            for p in positions
        ]
        lam = max((v for v in lams if math.isfinite(v)), default=float("nan"))
        if not (math.isfinite(lam) and lam > 0):
            raise ValueError(
                f"the largest preconditioned curvature must be finite and > 0, got {lams}: "
                f"check log_likelihood and log_prior at the start, or pass learning_rate= "
                f"explicitly."
            )
        # a minibatch's gradient noise, B = (N² / n)(1 − n / N) diag GGN per weight: its
        # largest M B / T bounds the step (_baoab_noise_step)
        noise = 0.0
        if minibatch:
            b = _minibatch_noise(curvature, num_data, batch_size)
            noise = max(
                float(jnp.max(m * bk)) / temperature
                for m, bk in zip(jax.tree.leaves(precond), jax.tree.leaves(b))
            )
        return precond, lam, noise

    positions = [one_params]
    curvature = None
    if minibatch or given.get("preconditioner") is None:
        curvature = _start_curvature(curvature_at(positions))
    precond, lam, noise = derive(positions, curvature)
    burnin = lengths["num_burnin"]
    burnin = max(1, max_steps // 10) if burnin is None else burnin
    room = max(1, max_steps - burnin)
    samples = lengths["num_samples"]
    samples = min(1000, room) if samples is None else samples
    thin = lengths["thin"]
    thin = max(1, room // samples) if thin is None else thin
    for retry in range(max_retries + 1):
        stable = fraction / math.sqrt(lam)
        quiet = _baoab_noise_step(noise, friction, noise_fraction) * fraction / fraction0
        step = min(stable, quiet)
        try:
            result = _run_fixed(
                jax.vmap(lambda k, r=retry: jax.random.fold_in(k, 1 + 100 * r))(chain_keys),
                params,
                data,
                learning_rate=step,
                batch_size=batch_size,
                params_per_chain=params_per_chain,
                # enters the compiled loop as data
                precond=(precond, fixed) if carry else precond,
                gnoise=None,
                floor=floor,
                num_burnin=burnin,
                num_samples=samples,
                thin=thin,
                transform=transform,
                carry=carry,
                **kw,
            )
            break
        except DivergenceError as err:
            if retry == max_retries:
                raise
            # the curvature where the other chains stopped joins the estimate (the diverged
            # chain's last finite state is at the edge of the divergence, where the curvature
            # says little about the typical set), and the step halves
            last = err.result.params
            kept = [c for c in range(len(chain_keys)) if c != err.chain] or [err.chain]
            states = [jax.tree.map(lambda x, c=c: x[c], last) for c in kept]
            positions += states
            if curvature is not None:
                curvature = curvature_at(states, curvature)
            precond, lam, noise = derive(positions, curvature)
            fraction /= 2.0
            logger.info(
                "bn.baoab diverged at step %d: starting again with the curvature where the "
                "other chains stopped (λ_max %.4g) and h sqrt(λ_max) = %g",
                err.step,
                lam,
                fraction,
            )
    if quiet < 0.5 * stable:
        logger.warning(
            "bn.baoab: the gradient noise of minibatches of %d examples holds the step at "
            "h = %.3g, %.3g times below the stability bound; a larger batch_size (or the whole "
            "data set) allows a larger step",
            batch_size,
            quiet,
            stable / quiet,
        )
    info = {
        "method": "baoab",
        "learning_rate": step,
        "step_fraction": fraction,
        "friction": friction,
        "batch_size": batch_size,
        # the step's binding limit: the stability bound fraction / sqrt(λ_max), or the
        # minibatch noise (noise_fraction of the injected noise, at the largest M B / T)
        "step_limit": "stability" if stable <= quiet else "noise",
        "gradient_noise_max": noise,
        "num_burnin": burnin,
        "num_samples": samples,
        "thin": thin,
        "curvature_max": lam,
        "carry_preconditioner": carry,
        "preconditioner": precond,
    }
    return result, info


def _run_fixed(
    chain_keys,
    params,
    data,
    *,
    params_per_chain,
    trace_names,
    precond,
    gnoise,
    devices,
    progress,
    progress_every,
    predict_inputs,
    floor=-np.inf,
    checkpoint=None,
    checkpoint_every=60.0,
    **settings,
):
    """One compiled run of the chains; ``settings`` are the fields of :class:`_Static` but the
    mesh (log_likelihood, log_prior, transform, learning_rate, ..., predict). With a
    ``checkpoint`` = (folder, digest of the data and held-out inputs) the carry is saved there
    between chunks and a run with the same inputs goes on from its file."""
    n_chains = chain_keys.shape[0]
    mesh = _mesh(devices, n_chains, settings["batch_size"])
    num_burnin, num_samples, thin = (settings.pop(k) for k in ("num_burnin", "num_samples", "thin"))
    given = {name: settings[name] for name in _FNS}  # with their arrays, for the checkpoint's key
    # a Partial log prior's arrays are data; a user's other callables stay static whole (their
    # arguments may be objects jit cannot take as data, such as a Flax module)
    split = {name: _split_fn(settings.pop(name), name == "log_prior") for name in _FNS}
    fn_args = tuple(split[name][1] for name in _FNS)
    static = _Static(
        mesh=mesh,
        capacity=_capacity(num_samples),
        **{name: split[name][0] for name in _FNS},
        **settings,
    )
    total = num_burnin + num_samples * thin
    saver = None
    if checkpoint is not None:
        folder, data_digest = checkpoint
        key = _resume.digest(
            dataclasses.replace(static, **given),
            (chain_keys, params, params_per_chain, data_digest, precond, gnoise),
            (float(floor), num_burnin, num_samples, thin),
        )
        saver = _resume.Checkpoint(folder, key, checkpoint_every)
    if mesh is not None:
        by_chain = NamedSharding(mesh, P("chain" if "chain" in mesh.axis_names else None))
        replicated = NamedSharding(mesh, P())
        chain_keys = jax.device_put(chain_keys, by_chain)
        params = jax.device_put(params, by_chain if params_per_chain else replicated)
        data = jax.device_put(data, replicated)
        if precond is not None:
            precond, gnoise = jax.device_put((precond, gnoise), replicated)

    if progress_every is not None:
        _check_positive_int("progress_every", progress_every, 1, "steps between bar updates")
    carry = _init_carry(
        chain_keys,
        params,
        precond,
        gnoise,
        predict_inputs,
        fn_args,
        static=static,
        num_data=int(jax.tree.leaves(data)[0].shape[0]),
        params_per_chain=params_per_chain,
    )
    floor_on_device, burnin_on_device, thin_on_device = jax.device_put(
        (np.float32(floor), np.int32(num_burnin), np.int32(thin))
    )

    def run_chunk(carry, start, length):
        return _sample(
            carry,
            start,
            jax.device_put(np.int32(length)),
            burnin_on_device,
            thin_on_device,
            data,
            precond,
            gnoise,
            predict_inputs,
            floor_on_device,
            fn_args,
            static=static,
        )

    done = 0
    if saver is not None:
        carry, done = saver.load(carry)
    # with a checkpoint, chunks (as for a bar) between which the carry can be saved; without a
    # bar, of at least _SAVE_CHUNK steps (a short run is one chunk, saved at its end)
    every = progress_every
    if every is None and saver is not None and not progress:
        every = max(_SAVE_CHUNK, -(-(total - done) // 100))
    chunked = bool(progress) or saver is not None
    lengths = _loop.chunk_lengths(total - done, every, chunked)
    carry, _ = _loop.run_chunked(
        run_chunk,
        carry,
        lengths,
        progress=bool(progress),
        desc="sgld",
        unit="step",
        start=done,
        after_chunk=None if saver is None else saver.save,
    )
    merged = _merge_chains(carry.moments)

    predictive = None
    if static.predict is not None and num_samples > 0:
        kept = jnp.maximum(jnp.sum(carry.moments.count), 1.0)
        predictive = jnp.sum(carry.pred_sum, axis=0) / kept
    result = SamplingResult(
        moments=merged,
        chain_moments=carry.moments,
        params=carry.state.params,
        opt_state=carry.state.opt_state,
        log_posterior=_head(carry.log_post, num_samples),
        trace=_head(carry.trace, num_samples),
        trace_names=trace_names,
        rhat=np.zeros((0,)),
        ess=np.zeros((0,)),
        num_steps=total,
        converged=False,
        predictive=predictive,
        settings={},
        predictive_trace=(
            None
            if predictive is None or isinstance(carry.pred_trace, tuple)
            else _head(carry.pred_trace, num_samples)
        ),
    )
    # Explicit transfers only (the run works under jax.transfer_guard("disallow")).
    bad = jax.device_get(carry.bad_step)
    if (bad >= 0).any():
        steps = np.where(bad >= 0, bad, np.iinfo(np.int32).max)
        chain = int(np.argmin(steps))
        step_t = int(steps[chain])
        eta = float(_step_size(static.learning_rate, step_t))
        phase = (
            f"burn-in step {step_t}"
            if step_t < num_burnin
            else f"sampling step {step_t - num_burnin}"
        )
        lr_text = "a schedule" if callable(static.learning_rate) else repr(static.learning_rate)
        advice = (
            f"Lower the learning rate (now {lr_text}), or check log_likelihood and log_prior at "
            f"the last finite state (the error's .result.params)."
        )
        if step_t == 0 and not _first_step_finite(
            chain_keys[chain],
            params,
            chain if params_per_chain else None,
            data,
            static,
            fn_args,
        ):
            advice = (
                "The log posterior or its gradient is already NaN or inf at the starting params, "
                "on the first minibatch, before any step: a smaller learning rate does not help. "
                "log_likelihood and log_prior must be finite at the starting params: check them, "
                "and the data, there."
            )
        raise DivergenceError(
            f"SGLD diverged at step {step_t} ({phase}, chain {chain}) with step size "
            f"η_t = {eta:g}: the log posterior, its gradient or the parameters became NaN or inf"
            f"{'' if not np.isfinite(floor) else ', or the log posterior fell below ' + format(floor, '.4g')}. "
            f"{advice} {int((bad >= 0).sum())} of {n_chains} chains diverged at that step (the "
            f"run stops at the first divergence).",
            step=step_t,
            step_size=eta,
            chain=chain,
            result=result,
        )
    return result


def _first_step_finite(chain_key, params, chain, data, static, fn_args) -> bool:
    """Whether U and ∇U at a chain's starting params are finite on its first minibatch (the
    one its step 0 took); read once, after a divergence at step 0."""
    try:
        num_data = int(data[0].shape[0])
        if static.batch_size < num_data:
            perm = _loop.shuffled_batches(
                jax.random.fold_in(jax.random.split(chain_key, 2)[1], 0),
                num_data,
                static.batch_size,
            )
            batch = tuple(jnp.take(a, perm[0], axis=0) for a in data)
        else:
            batch = tuple(data)
        start = params if chain is None else jax.tree.map(lambda x: x[chain], params)
        log_likelihood, log_prior, _, _ = _functions(static, fn_args)
        kernel = Kernel(log_likelihood, log_prior, num_data, None)
        u, grads = jax.value_and_grad(kernel.potential)(start, batch)
        return bool(jax.device_get(jnp.isfinite(u) & _check.all_finite(grads)))
    except Exception:  # the diagnosis must never hide the divergence itself
        return True


def _finish(
    result: SamplingResult, settings: dict, rhat_threshold, ess_threshold, auto=False, move=False
):
    if auto:
        advice = (
            f"raise auto['max_steps'] (this run took {result.num_steps} steps per chain) or "
            f"use more chains"
        )
    else:
        advice = (
            "run longer, use more chains, or let the sampler choose its settings (no learning_rate)"
        )
    trace = np.asarray(jax.device_get(result.trace), np.float64)
    rhat, ess = _diagnostics(trace)
    finite = np.isfinite(rhat) & np.isfinite(ess)
    converged = bool(
        rhat.size
        and finite.all()
        and np.max(rhat) <= rhat_threshold
        and np.min(ess) >= ess_threshold
    )
    if rhat.size and not converged:
        worst = int(np.nanargmax(np.where(finite, rhat, np.inf)))
        low = int(np.nanargmin(np.where(finite, ess, -np.inf)))
        logger.warning(
            "the chains have not converged: max split R-hat %.3g (threshold %.3g, at %s), min "
            "ESS %.3g (threshold %.3g, at %s) over %d traced weights; %s.",
            rhat[worst],
            rhat_threshold,
            result.trace_names[worst],
            ess[low],
            ess_threshold,
            result.trace_names[low],
            rhat.size,
            advice,
        )
    settings = dict(settings)
    settings.update(
        rhat_max=float(np.max(rhat[finite])) if finite.any() else float("nan"),
        ess_min=float(np.min(ess[finite])) if finite.any() else float("nan"),
        rhat_threshold=float(rhat_threshold),
        ess_threshold=float(ess_threshold),
    )
    p_rhat = p_ess = None
    if result.predictive_trace is not None:
        p_rhat, p_ess = _predictive_diagnostics(np.asarray(jax.device_get(result.predictive_trace)))
        ok = np.isfinite(p_rhat) & np.isfinite(p_ess)
        settings.update(
            predictive_rhat_max=float(np.max(p_rhat[ok])) if ok.any() else float("nan"),
            predictive_ess_min=float(np.min(p_ess[ok])) if ok.any() else float("nan"),
        )
        mixed = settings["predictive_rhat_max"] <= rhat_threshold
        mixed = mixed and settings["predictive_ess_min"] >= ess_threshold
        if move and converged and not mixed:
            logger.warning(
                "the traced weights converged with exchanges of units, but the predictions on "
                "held-out inputs did not: max R-hat %.3g, min ESS %.3g (thresholds %.3g, %.3g). "
                "Exchanges mix which unit holds which role, not the networks; %s.",
                settings["predictive_rhat_max"],
                settings["predictive_ess_min"],
                rhat_threshold,
                ess_threshold,
                advice,
            )
    return result._replace(
        rhat=rhat,
        ess=ess,
        converged=converged,
        settings=settings,
        predictive_rhat=p_rhat,
        predictive_ess=p_ess,
    )


def _predictive_diagnostics(trace: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split R-hat and ESS of each traced held-out input's output of the largest mean over all
    kept states (for class probabilities: the predicted class's), from a (C, S, m, K) trace.
    Outputs that do not vary over the kept states give NaN."""
    trace = trace.astype(np.float64)
    top = np.argmax(trace.mean(axis=(0, 1)), axis=-1)  # (m,)
    chosen = np.take_along_axis(trace, top[None, None, :, None], axis=-1)[..., 0]
    return _diagnostics(chosen)


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
