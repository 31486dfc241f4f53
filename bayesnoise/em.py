"""Learning the noise scales by type-II maximum likelihood over the GSM hierarchy.

:func:`fit` by default follows MacKay's evidence framework: the mode under the current scales
(:func:`map_estimate`), the diagonal Laplace posterior there, and MacKay's fixed point
(:func:`mackay_update`), with the Laplace evidence recorded per iteration. The EM view below is
the alternative update and the one for SGLD moments.

E-step: posterior moments of the identifiable weights v under the current scales (SGLD moments,
an exact Gaussian posterior for linear models, or NUTS). M-step: maximise the expected complete
log-likelihood over the scales, i.e. minimise

    Q(λ) = Σ_j [ S_j / (2 σ0² λ_j²) + d_j log λ_j ] − Σ_j log p(λ_j),
    S_j = Σ_k E[v_jk²] = Σ_k (E[v_jk]² + Var[v_jk]),

with d_j the number of weights in row j. The paper's eqs. (12)–(13) drop σ0; here it stays.

* No hyperprior: λ_j² = S_j / (σ0² d_j).
* ``InverseGammaScale(a, b)`` (s = λ² ~ InverseGamma(a, b), Q written in s with the density of s):
  s_j = (S_j / (2σ0²) + b) / (d_j / 2 + a + 1).
* ``Gamma``, ``LogNormal``, ``Beta`` on λ: ∂Q/∂λ = 0 solved per scale numerically (vectorised:
  a grid in log λ brackets the global minimum, bisection on the derivative refines it).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bayesnoise import _check, _tree, gsm
from bayesnoise import moments as bmoments
from bayesnoise import noise as bnoise
from bayesnoise._tree import PyTree

logger = logging.getLogger(__name__)

__all__ = [
    "m_step",
    "q_value",
    "row_statistics",
    "EMState",
    "init",
    "accumulate",
    "em_step",
    "linear_posterior",
    "linear_em",
    "LinearEMResult",
    "numpyro_prior",
    "e_step",
    "fit",
    "FitResult",
    "mackay_update",
    "map_estimate",
    "pruned_rows",
]

_NUMERIC = (bnoise.Gamma, bnoise.LogNormal, bnoise.Beta)
_ALLOWED = "None, InverseGammaScale (on λ², closed form), Gamma, LogNormal or Beta (on λ)"


def _check_hyperprior(hyperprior: Any) -> None:
    if hyperprior is None or isinstance(hyperprior, (bnoise.InverseGammaScale, *_NUMERIC)):
        return
    raise ValueError(
        f"the M-step cannot handle the hyperprior {hyperprior!r}; allowed: {_ALLOWED}."
    )


def _check_hierarchy(hierarchy: Any, name: str = "hierarchy") -> None:
    if not isinstance(hierarchy, gsm.Hierarchy):
        raise TypeError(
            f"{name} must be a bn.gsm.Hierarchy (from bn.gsm.hierarchy(params)), got "
            f"{type(hierarchy).__name__}."
        )


def _check_callable(name: str, fn: Any, what: str, optional: bool = False) -> None:
    if (fn is not None or not optional) and not callable(fn):
        raise TypeError(f"{name} must be {'None or ' if optional else ''}{what}, got {fn!r}.")


def row_statistics(second_moments: PyTree, hierarchy: gsm.Hierarchy) -> tuple[PyTree, PyTree]:
    """(S, d): per noised row, S_j = Σ_k E[v_jk²] and d_j, trees like ``hierarchy.scales``.

    Raises:
        ValueError: the moments' structure does not match the hierarchy, or a second moment is
            negative (the message names the leaf).
        TypeError: ``hierarchy`` is not a :class:`bayesnoise.gsm.Hierarchy`.
    """
    _check_hierarchy(hierarchy)
    triples, _ = gsm.scaled_leaves(second_moments, hierarchy)
    for name, leaf, s, _ in triples:
        if s is None or isinstance(leaf, jax.core.Tracer):
            continue
        low = float(np.min(np.asarray(leaf))) if np.size(leaf) else 0.0
        if low < 0 or not np.isfinite(low):
            raise ValueError(
                f"second moments must be finite and >= 0 (they are E[v²]); leaf {name!r} has "
                f"minimum {low}. Pass mean² + variance, e.g. bn.moments.second_moment(state)."
            )
    return gsm.row_sums(second_moments, hierarchy), gsm.row_sizes(second_moments, hierarchy)


def _closed_or_numeric(S, d, sigma0, hyperprior):
    S = jnp.asarray(S)
    if hyperprior is None:
        return jnp.sqrt(S / (sigma0**2 * d))
    if isinstance(hyperprior, bnoise.InverseGammaScale):
        s = (S / (2 * sigma0**2) + hyperprior.b) / (d / 2 + hyperprior.a + 1)
        return jnp.sqrt(s)
    return _solve_numeric(S, d, sigma0, hyperprior)


def _q_rows_u(u, S, d, sigma0, hyperprior):
    """Q per row as a function of u = log λ, for hyperpriors on λ."""
    lam = jnp.exp(u)
    return S * jnp.exp(-2 * u) / (2 * sigma0**2) + d * u - hyperprior.log_prob(lam)


def _solve_numeric(S, d, sigma0, hyperprior, grid: int = 256, iters: int = 60):
    S = jnp.asarray(S, jnp.float32)
    # a bracket wide enough for every scale: around the no-hyperprior solution
    base = 0.5 * jnp.log(jnp.maximum(S, 1e-30) / (sigma0**2 * d))
    lo = jnp.minimum(base, 0.0) - 12.0
    hi = jnp.maximum(base, 0.0) + 12.0
    if isinstance(hyperprior, bnoise.Beta):
        hi = jnp.full_like(hi, math.log1p(-1e-6))
        lo = jnp.minimum(lo, hi - 1.0)
    ts = jnp.linspace(0.0, 1.0, grid)
    us = lo[..., None] + (hi - lo)[..., None] * ts  # (rows, grid)
    qs = _q_rows_u(us, S[..., None], d, sigma0, hyperprior)
    qs = jnp.where(jnp.isfinite(qs), qs, jnp.inf)
    i = jnp.argmin(qs, axis=-1)
    step = (hi - lo) / (grid - 1)
    a = jnp.maximum(lo, lo + (i - 1) * step)
    b = jnp.minimum(hi, lo + (i + 1) * step)
    dq = jax.vmap(jax.grad(lambda u, s: _q_rows_u(u, s, d, sigma0, hyperprior)))

    def dq_rows(u):
        return dq(u.ravel(), S.ravel()).reshape(u.shape)

    def body(_, ab):
        a, b = ab
        m = 0.5 * (a + b)
        g = dq_rows(m)
        return jnp.where(g > 0, a, m), jnp.where(g > 0, m, b)

    a, b = jax.lax.fori_loop(0, iters, body, (a, b))
    return jnp.exp(0.5 * (a + b))


def m_step(
    second_moments: PyTree, hierarchy: gsm.Hierarchy, hyperprior: bnoise.Noise | None = None
) -> PyTree:
    """New scales that minimise Q (same tree as ``hierarchy.scales``).

    Args:
        second_moments: the structure of the params, E[v²] per weight (e.g.
            ``bn.moments.second_moment(state)`` of the identifiable weights).
        hierarchy: the current GSM hierarchy (its row axes and σ0 are used).
        hyperprior: None; ``bn.noise.InverseGammaScale(a, b)`` (λ² ~ InverseGamma); or
            ``Gamma``, ``LogNormal``, ``Beta`` on λ (Beta: λ in (0, 1)).

    Returns:
        the scales tree: without a hyperprior λ_j = sqrt(Σ_k E[v_jk²] / (σ0² d_j)).

    Raises:
        ValueError: a hyperprior the solver cannot handle, negative second moments, a
            structure that does not match the hierarchy, or, without a hyperprior, a noised
            row whose second moments are all zero: its scale would be 0, a degenerate prior
            N(0, 0) (all-zero second moments usually mean no samples were accumulated). The
            check reads concrete moments only; under ``jit`` such a row gets the scale 0.
        TypeError: ``hierarchy`` is not a :class:`bayesnoise.gsm.Hierarchy`.

    Example:
        >>> import jax.numpy as jnp, bayesnoise as bn
        >>> params = {"kernel": jnp.array([[1.0, 1.0], [2.0, 0.0]])}
        >>> h = bn.gsm.hierarchy(params)
        >>> bn.em.m_step(jax.tree.map(jnp.square, params), h)["kernel"]
        Array([1.       , 1.4142135], dtype=float32)
    """
    _check_hyperprior(hyperprior)
    S, d = row_statistics(second_moments, hierarchy)
    if hyperprior is None:
        _check_rows(S)
    sigma0 = jnp.asarray(hierarchy.sigma0)
    return jax.tree.map(
        lambda s, n: _closed_or_numeric(s, n, sigma0, hyperprior),
        S,
        d,
    )


def _check_rows(S: PyTree) -> None:
    """Raises a ValueError naming the first noised leaf with a row whose S_j is 0 (concrete
    values only: one transfer for all leaves)."""
    flat = jax.tree_util.tree_flatten_with_path(S, is_leaf=lambda x: x is None)[0]
    named = [(_tree.path_str(p), s) for p, s in flat if s is not None]
    if not named or not _check.concrete([s for _, s in named]):
        return
    with jax.ensure_compile_time_eval():  # concrete scales closed over inside a jit trace
        zeros = jax.device_get([jnp.sum(jnp.asarray(s) == 0) for _, s in named])
    for (path, s), n_zero in zip(named, zeros):
        if n_zero:
            first = int(np.flatnonzero(np.asarray(s) == 0)[0])
            raise ValueError(
                f"second_moments of leaf {path!r} are all 0 in {int(n_zero)} of its "
                f"{np.size(s)} noised rows (row {first} first): without a hyperprior the "
                f"M-step would set their scales to 0, a degenerate prior N(0, 0). Second "
                f"moments must be > 0 somewhere in every noised row (E[v²] = mean² + variance "
                f"of posterior samples; all zeros usually mean that no sample was "
                f"accumulated), or pass a hyperprior such as bn.noise.InverseGammaScale(a, b), "
                f"which keeps every scale > 0."
            )


def q_value(
    second_moments: PyTree,
    hierarchy: gsm.Hierarchy,
    hyperprior: bnoise.Noise | None = None,
    scales: PyTree | None = None,
) -> jax.Array:
    """Q at ``scales`` (default: the hierarchy's), constants that do not depend on λ dropped.

    For ``InverseGammaScale`` the prior term is −log p(s) with s = λ² (the density of s), matching
    the closed-form M-step; for the others it is −log p(λ).

    Raises:
        ValueError: as :func:`m_step`; or ``scales`` not shaped like ``hierarchy.scales``, or
            (concrete) holding an entry that is not finite and > 0.
        TypeError: ``hierarchy`` is not a :class:`bayesnoise.gsm.Hierarchy`.
    """
    _check_hyperprior(hyperprior)
    S, d = row_statistics(second_moments, hierarchy)
    if scales is not None:
        _check.same_tree("scales", scales, hierarchy.scales, "hierarchy.scales")
        for path, lam in jax.tree_util.tree_flatten_with_path(scales)[0]:
            _check.number(
                f"scales{jax.tree_util.keystr(path)}", lam, lo=0.0, lo_open=True, array=True
            )
    scales = hierarchy.scales if scales is None else scales
    sigma0 = jnp.asarray(hierarchy.sigma0)
    total = jnp.zeros(())
    for s_j, d_j, lam in zip(jax.tree.leaves(S), jax.tree.leaves(d), jax.tree.leaves(scales)):
        q = s_j / (2 * sigma0**2 * lam**2) + d_j * jnp.log(lam)
        if isinstance(hyperprior, bnoise.InverseGammaScale):
            s = lam**2
            a, b = hyperprior.a, hyperprior.b
            q = q + (a + 1) * jnp.log(s) + b / s
        elif hyperprior is not None:
            q = q - hyperprior.log_prob(lam)
        total = total + jnp.sum(q)
    return total


# ------------------------------------------------- MacKay's update and the MAP under a prior


_FIT_METHODS = ("laplace", "sgld")
_UPDATES = ("mackay", "em")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(
            f"{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}."
        )


def _floored(scales: PyTree, min_scale: float) -> PyTree:
    return jax.tree.map(lambda s: jnp.maximum(s, min_scale), scales)


def _check_min_scale(min_scale: Any) -> None:
    _check.number("min_scale", min_scale, lo=0.0, lo_open=True)


def mackay_update(
    mean: PyTree,
    variance: PyTree,
    hierarchy: gsm.Hierarchy,
    hyperprior: bnoise.Noise | None = None,
    *,
    min_scale: float = 1e-4,
) -> PyTree:
    """MacKay's fixed point for the scales from a Gaussian posterior N(mean, variance) at a mode.

    Setting the derivative of the Laplace evidence in α_j = 1/(σ0² λ_j²) to zero gives
    (MacKay, 1992)

        σ0² λ_j² = Σ_k m_jk² / γ_j,     γ_j = Σ_k (1 − Var[v_jk] / (σ0² λ_j²)),

    γ_j the number of well-determined weights in row j (each term clipped to [0, 1]). Unlike the
    EM update (:func:`m_step`, λ_j² = Σ_k (m² + Var) / (σ0² d_j)), it does not stall when the
    posterior barely differs from the prior: a row whose weights the data do not determine
    (γ_j → 0) and whose mean the prior pulls to zero is driven to ``min_scale`` at once, which is
    what automatic relevance determination needs. With ``InverseGammaScale(a, b)`` on λ² the same
    fixed point with the hyperprior's density reads s_j = (Σ_k m² / (2σ0²) + b) / (γ_j / 2 + a + 1).
    Scales are floored at ``min_scale``; a row with γ_j = 0 gets ``min_scale``.

    Args:
        mean: the posterior mean (the mode), a tree like the params.
        variance: the posterior variance at temperature 1 (e.g. ``bn.laplace.posterior(...).variance``).
        hierarchy: the scales the posterior was computed under.
        hyperprior: None or ``bn.noise.InverseGammaScale(a, b)``.
        min_scale: the floor, > 0.

    Returns:
        the new scales, a tree like ``hierarchy.scales``.

    Raises:
        ValueError: a hyperprior other than None or ``InverseGammaScale``; ``min_scale`` not a
            finite number > 0; trees that do not match the hierarchy; a negative variance.
        TypeError: ``hierarchy`` is not a :class:`bayesnoise.gsm.Hierarchy`.
    """
    _check_hierarchy(hierarchy)
    if hyperprior is not None and not isinstance(hyperprior, bnoise.InverseGammaScale):
        raise ValueError(
            f"mackay_update handles hyperprior None or bn.noise.InverseGammaScale(a, b), got "
            f"{hyperprior!r}; use update='em' (bn.em.m_step) for Gamma, LogNormal or Beta."
        )
    _check_min_scale(min_scale)
    _check.same_tree("mean", mean, variance, "variance")
    squares, _ = row_statistics(jax.tree.map(jnp.square, mean), hierarchy)
    row_statistics(variance, hierarchy)  # checks the structure and the sign
    prior_var = gsm.prior_variance(variance, hierarchy)
    gamma = gsm.row_sums(
        jax.tree.map(lambda v, s: jnp.clip(1.0 - v / s, 0.0, 1.0), variance, prior_var),
        hierarchy,
    )
    sigma0 = jnp.asarray(hierarchy.sigma0)

    def one(m2, g):
        if hyperprior is None:  # γ = 0: no weight determined, the scale goes to the floor
            s = jnp.where(g > 0, m2 / (sigma0**2 * jnp.where(g > 0, g, 1.0)), 0.0)
        else:
            s = (m2 / (2 * sigma0**2) + hyperprior.b) / (g / 2 + hyperprior.a + 1)
        return jnp.maximum(jnp.sqrt(s), min_scale)

    return jax.tree.map(one, squares, gamma)


def pruned_rows(scales: PyTree, min_scale: float = 1e-4) -> PyTree:
    """True for every row whose scale is at the floor ``min_scale`` (EM has pruned it)."""
    _check_min_scale(min_scale)
    return jax.tree.map(lambda s: jnp.asarray(s) <= min_scale * (1 + 1e-5), scales)


@functools.partial(
    jax.jit,
    static_argnames=("log_likelihood", "extra_log_prior", "steps", "batch_size"),
)
def _map_run(
    params,
    hierarchy,
    arrays,
    key,
    learning_rate,
    *,
    log_likelihood,
    extra_log_prior,
    steps,
    batch_size,
):
    import optax

    n = arrays[0].shape[0]

    log_prior = _log_prior(hierarchy, extra_log_prior)

    def objective(v, batch):
        ll = jnp.sum(log_likelihood(v, *batch)) * (n / batch_size)
        return -(ll + log_prior(v)) / n

    opt = optax.adam(optax.cosine_decay_schedule(1.0, steps))

    def body(carry, k):
        p, s = carry
        if batch_size >= n:
            batch = arrays
        else:
            idx = jax.random.choice(k, n, (batch_size,), replace=False)
            batch = tuple(a[idx] for a in arrays)
        u, s = opt.update(jax.grad(objective)(p, batch), s, p)
        u = jax.tree.map(lambda x: learning_rate * x, u)
        return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(body, (params, opt.init(params)), jax.random.split(key, steps))
    return p


def map_estimate(
    key: jax.Array,
    params: PyTree,
    hierarchy: gsm.Hierarchy,
    log_likelihood: Callable[..., jax.Array],
    data: Any,
    *,
    steps: int = 1000,
    learning_rate: float = 3e-3,
    batch_size: int | None = None,
    extra_log_prior: Callable[[PyTree], jax.Array] | None = None,
) -> PyTree:
    """The mode of the log posterior under ``hierarchy``, from ``params`` (one compiled scan).

    Minimises −(1/N)[N/B Σ_batch log p(y | x, v) + log p(v)] with Adam and a cosine decay of the
    learning rate to zero, so the last steps settle on a mode rather than around it. The prior is
    :func:`bayesnoise.gsm.full_log_prior` (or ``gsm.log_prior + extra_log_prior``), the one the
    E-step samples. The mode is where :func:`bayesnoise.laplace.posterior` is centred.

    Args:
        key: PRNG key (minibatches).
        params: the start (warm starts make EM's iterations cheap).
        hierarchy: the GSM hierarchy of the prior.
        log_likelihood, data: as in :func:`e_step`.
        steps: optimiser steps (>= 1).
        learning_rate: Adam's initial learning rate (> 0).
        batch_size: examples per step; None: all of them up to 1024, else 1024.
        extra_log_prior: as in :func:`e_step`.

    Returns:
        the parameters at the (approximate) mode.

    Raises:
        ValueError / TypeError: a bad key, hierarchy, function, count or rate; non-finite
            parameters at the end (the message says to lower ``learning_rate``).
    """
    _check.key("key", key)
    _check_hierarchy(hierarchy)
    _check_callable("log_likelihood", log_likelihood, "a callable log_likelihood(params, *batch)")
    _check_callable("extra_log_prior", extra_log_prior, "a callable v -> scalar", optional=True)
    _check.number("steps", steps, lo=1, integer=True)
    _check.positive("learning_rate", learning_rate)
    arrays, n = _tree.data_tuple(data)
    if batch_size is None:
        batch_size = min(n, 1024)
    _check.number("batch_size", batch_size, lo=1, integer=True)
    batch_size = min(int(batch_size), n)

    out = _map_run(
        params,
        hierarchy,
        arrays,
        key,
        jnp.asarray(learning_rate, jnp.float32),
        log_likelihood=log_likelihood,
        extra_log_prior=extra_log_prior,
        steps=int(steps),
        batch_size=batch_size,
    )
    if _check.concrete(out) and not bool(_check.all_finite(out)):
        raise ValueError(
            f"map_estimate diverged: the parameters are not finite after {int(steps)} Adam steps "
            f"at learning_rate={learning_rate!r}; lower learning_rate."
        )
    return out


# ------------------------------------------------------------------------ EM from a user loop


class EMState(NamedTuple):
    hierarchy: gsm.Hierarchy  # the current scales and σ0
    moments: bmoments.MomentsState  # E-step accumulator of the identifiable weights v
    iteration: jax.Array  # shape (), int32: completed M-steps


def init(params: PyTree, sigma0: Any = 1.0, where: Any = None) -> EMState:
    """An EM state for ``params``: scales all one, an empty moments accumulator.

    Raises:
        ValueError / TypeError: as :func:`bayesnoise.gsm.hierarchy` (``sigma0`` not > 0,
            ``where`` choosing no leaf).
    """
    h = gsm.hierarchy(params, sigma0, where)
    return EMState(h, bmoments.init(params), jnp.zeros((), jnp.int32))


def accumulate(state: EMState, v_params: PyTree) -> EMState:
    """Adds one posterior sample of the identifiable weights v to the E-step moments.

    Raises:
        TypeError: ``state`` is not an :class:`EMState`.
        ValueError: ``v_params`` does not have the structure and shapes of the state's params.
    """
    _check_state(state)
    _check.same_tree("v_params", v_params, state.moments.shift, "the state's params")
    return state._replace(moments=bmoments.update(state.moments, v_params))


def _check_state(state: Any) -> None:
    if not isinstance(state, EMState):
        raise TypeError(
            f"state must be an EMState (from bn.em.init(params)), got {type(state).__name__}."
        )


def em_step(
    state: EMState,
    hyperprior: bnoise.Noise | None = None,
    *,
    update: str = "em",
    min_scale: float = 1e-4,
) -> EMState:
    """The M-step from the accumulated moments; the accumulator restarts empty.

    Call it from your own loop: run your sampler under ``state.hierarchy`` (e.g. with
    ``bn.gsm.full_log_prior(v, state.hierarchy)`` as the prior, and the step size and
    preconditioner of ``bn.sampling.auto_settings``), ``accumulate`` samples, then ``em_step``.

    Args:
        state: the EM state.
        hyperprior: as in :func:`m_step` (``update="mackay"``: None or ``InverseGammaScale``).
        update: ``"em"`` (:func:`m_step`, from E[v²]) or ``"mackay"`` (:func:`mackay_update`,
            from the samples' mean and variance).
        min_scale: the floor of the new scales (> 0).

    Raises:
        ValueError: nothing was accumulated, an unknown ``update``; or as :func:`m_step` and
            :func:`mackay_update`.
        TypeError: ``state`` is not an :class:`EMState`.
    """
    _check_state(state)
    _check_choice("update", update, _UPDATES)
    _check_min_scale(min_scale)
    count = state.moments.count
    if not isinstance(count, jax.core.Tracer) and float(count) == 0:
        raise ValueError("em_step needs posterior samples: call accumulate(state, v) first.")
    if update == "mackay":
        scales = mackay_update(
            bmoments.mean(state.moments),
            bmoments.variance(state.moments),
            state.hierarchy,
            hyperprior,
            min_scale=min_scale,
        )
    else:
        scales = _floored(
            m_step(bmoments.second_moment(state.moments), state.hierarchy, hyperprior), min_scale
        )
    h = state.hierarchy.replace(scales=scales)
    return EMState(h, bmoments.init(state.moments.mean_dev), state.iteration + 1)


# ----------------------------------------------------------------- SGLD E-step and the driver


def e_step(
    key: jax.Array,
    params: PyTree,
    hierarchy: gsm.Hierarchy,
    log_likelihood: Callable[..., jax.Array],
    data: Any,
    *,
    extra_log_prior: Callable[[PyTree], jax.Array] | None = None,
    unit_swaps: bool = False,
    class_shifts: bool = False,
    centring: Any = False,
    **sampling_kwargs,
):
    """SGLD under the current scales: posterior moments of v with prior N(0, σ0² λ²).

    A thin layer over :func:`bayesnoise.sampling.run`. The prior is proper in every parameter:
    ``bn.gsm.full_log_prior(v, hierarchy)``, the GSM prior N(0, σ0² λ_row²) on noised leaves and
    N(0, σ0²) on biases and other leaves. ``extra_log_prior(v)``, when given, replaces the
    latter: the log prior is then ``bn.gsm.log_prior(v, hierarchy) + extra_log_prior(v)``.

    Called without ``learning_rate`` (the default), the sampler chooses settings that converge
    (see :func:`bayesnoise.sampling.auto_settings`): a diagonal Laplace preconditioner, a stable
    step, burn-in and sampling lengths from the relaxation time, 4 chains. Explicit settings
    (``learning_rate``, ``num_burnin``, ``num_samples``, ``thin``, ``batch_size``,
    ``num_chains``) override. Warm start by passing the previous E-step's final chain states
    with ``params_per_chain=True``.

    With ``unit_swaps=True`` (for an MLP's params), every step of every chain is preceded by
    the exact move :func:`bayesnoise.sampling.unit_swaps` builds for these params and this
    hierarchy: exchanges of hidden units whose outgoing rows EM kept, accepted by the prior.
    The moments then average each hidden weight over the units that take its place (see
    :class:`bayesnoise.sampling.UnitSwaps`; ``auto={"swap_invariant": True}`` gives the
    exchanged units a preconditioner the exchanges leave unchanged; with ``transform=bn.baoab``
    each exchanged unit takes its own multipliers and momentum with it by default,
    ``auto={"carry_preconditioner": False}`` to keep them in their places).

    With ``class_shifts=True`` (for a classifier whose last dense layer gives a softmax's
    logits), every step is also preceded by an exact draw of each of that layer's rows (and its
    bias) along the class axis, the directions the softmax ignores and only the prior holds
    (:func:`bayesnoise.sampling.class_shifts`); the moments stay the posterior's.

    With ``centring=True`` (for an MLP's params; ``"output"`` for its last layer only, or a
    :class:`bayesnoise.sampling.Centring` of one's own) the chains sample every dense layer's bias
    sheared against its unit's weights by the inputs' curvature-weighted mean
    (:func:`bayesnoise.sampling.centring`, taken at the starting params), so that a diagonal
    preconditioner no longer crosses the direction in which a bias and its weights compensate
    each other. The moments are those of the weights as they are.

    Returns:
        the :class:`bayesnoise.sampling.SamplingResult`; its ``moments`` feed :func:`m_step`
        through ``bn.moments.second_moment``; ``converged``, ``rhat`` and ``ess`` say whether
        the chains mixed.

    Raises:
        TypeError: ``hierarchy`` is not a :class:`bayesnoise.gsm.Hierarchy`,
            ``extra_log_prior`` is not None or a callable, ``unit_swaps`` or
            ``class_shifts`` is not a bool, or ``centring`` is not True, False, ``"output"``
            or a :class:`bayesnoise.sampling.Centring`;
        ValueError: ``unit_swaps=True`` with params that are not an MLP's, ``class_shifts=True``
            with ``extra_log_prior`` or a log-likelihood that reads the last layer other than
            through a softmax, either with ``move=`` given too, ``centring=True`` for params
            without a dense layer with a bias; and as
            :func:`bayesnoise.sampling.run` (a ``key`` that is not a PRNG key, bad settings).
    """
    from bayesnoise import sampling

    _check_hierarchy(hierarchy)
    _check_callable("extra_log_prior", extra_log_prior, "a callable v -> scalar", optional=True)
    for name, flag in (("unit_swaps", unit_swaps), ("class_shifts", class_shifts)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}.")
    if not (isinstance(centring, (bool, sampling.Centring)) or centring == "output"):
        raise TypeError(
            f"centring must be True (every dense layer), 'output' (the last one), False or a "
            f"bn.sampling.Centring, got {centring!r}."
        )
    log_prior = _log_prior(hierarchy, extra_log_prior)
    one = params  # one chain's params, where the moves and the shear are built
    if sampling_kwargs.get("params_per_chain"):
        one = jax.tree.map(lambda x: x[0] if jnp.ndim(x) else x, params)
    if unit_swaps or class_shifts:
        if sampling_kwargs.get("move") is not None:
            raise ValueError(
                "give either move= or unit_swaps=True / class_shifts=True, not both: they build "
                "the move bn.sampling.unit_swaps(params, hierarchy=hierarchy) and "
                "bn.sampling.class_shifts(params)."
            )
        moves = (sampling.unit_swaps(one, hierarchy=hierarchy),) if unit_swaps else ()
        moves += (sampling.class_shifts(one),) if class_shifts else ()
        sampling_kwargs["move"] = moves
    if isinstance(centring, sampling.Centring):
        sampling_kwargs["centring"] = centring
    elif centring:
        layers = (-1,) if centring == "output" else None
        sampling_kwargs["centring"] = sampling.centring(
            one, log_likelihood, log_prior, data, layers=layers
        )
    return sampling.run(key, params, log_likelihood, log_prior, data, **sampling_kwargs)


def _log_prior(hierarchy: gsm.Hierarchy, extra_log_prior: Callable | None) -> Callable:
    """The prior the E-step samples and the mode maximises: ``full_log_prior``, or the GSM part
    plus ``extra_log_prior`` in place of the biases' N(0, σ0²)."""
    if extra_log_prior is None:  # the scales enter compiled code as data (a Partial's arguments)
        return jax.tree_util.Partial(gsm.full_log_prior, hierarchy=hierarchy)
    return lambda v: gsm.log_prior(v, hierarchy) + extra_log_prior(v)


class FitResult(NamedTuple):
    hierarchy: gsm.Hierarchy  # the learned scales
    moments: bmoments.MomentsState  # the final E-step's moments, under the learned scales
    params: PyTree  # the chains' final states, leaves (C, ...); the mode without sampling
    history: dict  # one entry per E-step in every list; see :func:`fit`
    result: Any = None  # the final E-step's bayesnoise.sampling.SamplingResult
    mode: PyTree = None  # method="laplace": the MAP under the learned scales
    laplace: Any = None  # method="laplace": the LaplacePosterior there (T = 1)
    pruned: PyTree = None  # per noised row: True where the learned scale is at min_scale


def fit(
    key: jax.Array,
    params: PyTree,
    log_likelihood: Callable[..., jax.Array],
    data: Any,
    *,
    iterations: int,
    sigma0: Any = 1.0,
    where: Any = None,
    hyperprior: bnoise.Noise | None = None,
    extra_log_prior: Callable[[PyTree], jax.Array] | None = None,
    method: str = "laplace",
    update: str | None = None,
    min_scale: float = 1e-4,
    map_steps: int = 3000,
    map_learning_rate: float = 3e-3,
    map_batch_size: int | None = None,
    final_sampling: bool = True,
    settings: Callable[[int], dict] | None = None,
    eval_fn: Callable[[PyTree], Any] | None = None,
    callback: Callable[[dict], None] | None = None,
    **sampling_kwargs,
) -> FitResult:
    """Type-II maximum likelihood of the scales: E-step, M-step, ..., and a final E-step.

    ``method="laplace"`` (the default) is MacKay's evidence framework: each E-step finds the mode
    under the current scales (:func:`map_estimate`, warm-started from the previous mode) and
    takes the diagonal Laplace posterior there (:func:`bayesnoise.laplace.posterior`), whose
    moments are deterministic and whose log evidence log p(D | λ) is recorded; the M-step is
    :func:`mackay_update` (``update="mackay"``) or the EM update :func:`m_step`
    (``update="em"``). After ``iterations`` M-steps, the mode under the learned scales is found
    again and, with ``final_sampling`` (the default), SGLD runs from it under the learned scales
    (:func:`e_step` with ``sampling_kwargs``): its moments and its posterior predictive
    (``predict=``) are the model under the learned prior.

    ``method="sgld"``: every E-step is :func:`e_step` (warm-started from the previous chains'
    final states; an explicit ``num_burnin`` is halved after the first), the M-step the EM update
    by default. Its moments are those of chains that may not have mixed (``converged`` in the
    history says), and no evidence is recorded.

    Scales never reach zero: every update is floored at ``min_scale``, and a row at the floor is
    reported as pruned (``FitResult.pruned``, ``history["pruned"]``). Only σ0·λ is identified;
    the library keeps σ0 fixed and learns λ.

    Args:
        key: PRNG key.
        params: initial v (e.g. a network trained under noise, weight-scaled).
        log_likelihood: per-example ``log_likelihood(params, *batch)``.
        data: tuple of arrays with a common leading axis.
        iterations: M-steps (>= 0).
        sigma0, where: as in :func:`bayesnoise.gsm.hierarchy`.
        hyperprior: None; ``InverseGammaScale`` (either update); ``Gamma``, ``LogNormal`` or
            ``Beta`` (the EM update only).
        extra_log_prior: replaces the bias part of the prior (see :func:`e_step`) in the modes
            and the sampling; the Laplace posterior and its evidence keep N(0, σ0²) there.
        method: ``"laplace"`` or ``"sgld"``, the E-step of the iterations.
        update: ``"mackay"`` or ``"em"``; None: ``"mackay"`` with ``method="laplace"`` and a
            hyperprior it handles, else ``"em"``.
        min_scale: the floor of the scales (> 0).
        map_steps, map_learning_rate, map_batch_size: :func:`map_estimate`'s ``steps``,
            ``learning_rate`` and ``batch_size`` for each mode (Laplace method).
        final_sampling: Laplace method: end with an SGLD E-step under the learned scales (else
            the returned moments are the final Laplace posterior's).
        settings: ``settings(i)`` returns sampler keyword arguments for E-step ``i``
            (0-based), overriding ``sampling_kwargs`` for that step (SGLD E-steps only).
        eval_fn: ``eval_fn(params)``, a scalar recorded per E-step (e.g. test error) at the mode
            (Laplace) or the posterior mean (SGLD).
        callback: called with each E-step's record (a dict, the entries listed below).
        **sampling_kwargs: learning_rate, batch_size, num_burnin, num_samples, thin,
            num_chains, transform, predict, predict_inputs, progress, ... of
            :func:`bayesnoise.sampling.run`.

    Returns:
        a :class:`FitResult`. ``history`` holds one entry per E-step in each list:
        ``iteration``; ``scales`` and ``scales_mean`` (the scales the E-step ran under, and
        their mean per leaf); ``pruned`` (how many rows of those scales are at ``min_scale``);
        ``log_evidence`` (the Laplace estimate; None for SGLD E-steps); ``q`` (Q at the scales
        of the EM update that followed; None otherwise); ``penalty_eq14`` (eq. 14 with the
        posterior variance); ``log_likelihood`` (the data log-likelihood at the mode or the
        posterior mean); ``converged`` (True for a Laplace E-step; the final record's is the
        final sampling's); and ``metric`` when ``eval_fn`` is given.

    Raises:
        TypeError: ``key`` is not a single PRNG key, or a function argument is not callable.
        ValueError: ``iterations`` is not an int >= 0, an unknown ``method`` or ``update``, a
            hyperprior the update cannot handle, ``min_scale`` not > 0; and as
            :func:`bayesnoise.gsm.hierarchy`, :func:`map_estimate` and
            :func:`bayesnoise.sampling.run`.
    """
    _check.key("key", key)
    _check.number("iterations", iterations, lo=0)
    if int(iterations) != iterations:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}.")
    if settings is not None and not callable(settings):
        raise TypeError(f"settings must be a callable i -> dict, got {settings!r}.")
    _check_callable("log_likelihood", log_likelihood, "a callable log_likelihood(params, *batch)")
    _check_callable("extra_log_prior", extra_log_prior, "a callable v -> scalar", optional=True)
    _check_callable("eval_fn", eval_fn, "a callable params -> scalar", optional=True)
    _check_callable("callback", callback, "a callable record -> None", optional=True)
    _check_hyperprior(hyperprior)
    _check_choice("method", method, _FIT_METHODS)
    if update is None:
        closed = hyperprior is None or isinstance(hyperprior, bnoise.InverseGammaScale)
        update = "mackay" if method == "laplace" and closed else "em"
    _check_choice("update", update, _UPDATES)
    if update == "mackay" and not (
        hyperprior is None or isinstance(hyperprior, bnoise.InverseGammaScale)
    ):
        raise ValueError(
            f"update='mackay' handles hyperprior None or InverseGammaScale, got {hyperprior!r}; "
            f"use update='em'."
        )
    _check_min_scale(min_scale)
    h = gsm.hierarchy(params, sigma0, where)
    if int(iterations) == 0:
        logger.warning(
            "em.fit with iterations=0 runs no M-step: the scales stay at 1 and the result is "
            "one E-step under that prior; pass iterations >= 1 to learn them."
        )
    if method == "laplace":
        return _fit_laplace(
            key, params, h, log_likelihood, data, int(iterations), hyperprior, extra_log_prior,
            update, float(min_scale), dict(steps=map_steps, learning_rate=map_learning_rate,
            batch_size=map_batch_size), bool(final_sampling), settings, eval_fn, callback,
            sampling_kwargs,
        )  # fmt: skip
    return _fit_sgld(
        key, params, h, log_likelihood, data, int(iterations), hyperprior, extra_log_prior,
        update, float(min_scale), settings, eval_fn, callback, sampling_kwargs,
    )  # fmt: skip


_HISTORY = (
    "iteration", "scales", "scales_mean", "pruned", "log_evidence", "q", "penalty_eq14",
    "log_likelihood", "converged",
)  # fmt: skip


def _record(it, h, mean, variance, log_likelihood, arrays, min_scale, eval_fn, **extra):
    from bayesnoise import penalties

    record = {
        "iteration": it,
        "scales": jax.device_get(h.scales),
        "scales_mean": [float(jnp.mean(s)) for s in jax.tree.leaves(h.scales)],
        "pruned": int(
            sum(int(jnp.sum(p)) for p in jax.tree.leaves(pruned_rows(h.scales, min_scale)))
        ),
        "log_evidence": None,
        "q": None,
        "penalty_eq14": float(penalties.ml2_neg_log_prior(mean, h, variance)),
        "log_likelihood": float(jnp.sum(log_likelihood(mean, *arrays))),
        "converged": True,
        **extra,
    }
    if eval_fn is not None:
        record["metric"] = float(eval_fn(mean))
    return record


def _new_scales(update, mean, variance, h, hyperprior, min_scale, record):
    if update == "mackay":
        return mackay_update(mean, variance, h, hyperprior, min_scale=min_scale)
    second = jax.tree.map(lambda m, v: m**2 + v, mean, variance)
    new = _floored(m_step(second, h, hyperprior), min_scale)
    record["q"] = float(q_value(second, h, hyperprior, new))
    return new


def _keep(history, record, callback):
    for k, v in record.items():
        history.setdefault(k, []).append(v)
    if callback is not None:
        callback(record)


def _fit_laplace(
    key, params, h, log_likelihood, data, iterations, hyperprior, extra_log_prior, update,
    min_scale, map_kwargs, final_sampling, settings, eval_fn, callback, sampling_kwargs,
):  # fmt: skip
    from bayesnoise import laplace

    arrays, _ = _tree.data_tuple(data)
    history: dict[str, list] = {k: [] for k in _HISTORY}
    theta = params
    for it in range(iterations + 1):
        theta = map_estimate(
            jax.random.fold_in(key, it), theta, h, log_likelihood, arrays,
            extra_log_prior=extra_log_prior, **map_kwargs,
        )  # fmt: skip
        lap = laplace.posterior(
            theta, h, log_likelihood, arrays, key=jax.random.fold_in(key, 100_000 + it)
        )
        record = _record(
            it, h, theta, lap.variance, log_likelihood, arrays, min_scale, eval_fn,
            log_evidence=float(lap.log_evidence),
        )  # fmt: skip
        if it < iterations:
            new = _new_scales(update, theta, lap.variance, h, hyperprior, min_scale, record)
        if it == iterations and final_sampling:
            kwargs = {**sampling_kwargs, **(settings(it) if settings is not None else {})}
            res = e_step(
                jax.random.fold_in(key, 200_000), theta, h, log_likelihood, arrays,
                extra_log_prior=extra_log_prior, **kwargs,
            )  # fmt: skip
            record["converged"] = bool(res.converged)
        _keep(history, record, callback)
        if it < iterations:
            h = h.replace(scales=new)
    pruned = pruned_rows(h.scales, min_scale)
    if final_sampling:
        return FitResult(h, res.moments, res.params, history, res, theta, lap, pruned)
    return FitResult(h, lap.moments, theta, history, None, theta, lap, pruned)


def _fit_sgld(
    key, params, h, log_likelihood, data, iterations, hyperprior, extra_log_prior, update,
    min_scale, settings, eval_fn, callback, sampling_kwargs,
):  # fmt: skip
    arrays, _ = _tree.data_tuple(data)
    history: dict[str, list] = {k: [] for k in _HISTORY}
    state, per_chain = params, False
    for it in range(iterations + 1):
        kwargs = dict(sampling_kwargs)
        if it > 0 and kwargs.get("num_burnin") is not None:
            kwargs["num_burnin"] = int(kwargs["num_burnin"]) // 2
        kwargs.update(settings(it) if settings is not None else {})
        res = e_step(
            jax.random.fold_in(key, it), state, h, log_likelihood, arrays,
            extra_log_prior=extra_log_prior, params_per_chain=per_chain, **kwargs,
        )  # fmt: skip
        state, per_chain = res.params, True
        mean, variance = bmoments.mean(res.moments), bmoments.variance(res.moments)
        record = _record(
            it, h, mean, variance, log_likelihood, arrays, min_scale, eval_fn,
            converged=bool(res.converged),
        )  # fmt: skip
        if it < iterations:
            new = _new_scales(update, mean, variance, h, hyperprior, min_scale, record)
        _keep(history, record, callback)
        if it < iterations:
            h = h.replace(scales=new)
    return FitResult(h, res.moments, state, history, res, pruned=pruned_rows(h.scales, min_scale))


# --------------------------------------------------------------- exact E-step: linear models


def linear_posterior(x, y, prior_var, noise_var):
    """The Gaussian posterior of v for y = x v + ε, ε ~ N(0, noise_var), v_j ~ N(0, prior_var_j).

    Returns:
        (mean (d,), covariance (d, d)): Σ = (xᵀx / σ² + diag(1 / prior_var))⁻¹, μ = Σ xᵀy / σ².

    Raises:
        ValueError: ``x`` not (n, d), ``y`` not (n,), ``prior_var`` not a scalar or (d,); or,
            for concrete values, entries that are not finite, ``prior_var`` or ``noise_var``
            not > 0.
    """
    x, y = _check_xy(x, y)
    if _check.concrete(prior_var):
        _check.number("prior_var", prior_var, lo=0.0, lo_open=True, array=True)
    if jnp.ndim(prior_var) not in (0, 1) or (
        jnp.ndim(prior_var) == 1 and jnp.shape(prior_var)[0] != x.shape[1]
    ):
        raise ValueError(
            f"prior_var must be a scalar or one variance per feature, shape ({x.shape[1]},); "
            f"got shape {jnp.shape(prior_var)}."
        )
    _check.number("noise_var", noise_var, lo=0.0, lo_open=True)
    precision = x.T @ x / noise_var + jnp.diag(1.0 / prior_var)
    chol = jnp.linalg.cholesky(precision)
    cov = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(x.shape[1], dtype=x.dtype))
    mean = cov @ (x.T @ y) / noise_var
    return mean, cov


class LinearEMResult(NamedTuple):
    scales: jax.Array  # (d,) learned λ
    noise_var: jax.Array  # () learned σ²
    mean: jax.Array  # (d,) posterior mean of v at the last E-step
    history: dict  # per iteration: "q", "log_evidence", "penalty_eq14"


def _check_xy(x: Any, y: Any) -> tuple[jax.Array, jax.Array]:
    """``x`` (n, d) and ``y`` (n,) as arrays, n >= 1, checked finite when concrete."""
    for name, value in (("x", x), ("y", y)):
        if value is None or isinstance(value, (str, bytes, bool)):
            raise TypeError(f"{name} must be an array of numbers, got {value!r}.")
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"x must have shape (n, d) and y shape (n,), with the same n >= 1 examples; got x "
            f"of shape {tuple(x.shape)} and y of shape {tuple(y.shape)}."
        )
    for name, value in (("x", x), ("y", y)):
        if _check.concrete(value):
            _check.number(name, value, array=True)
    return x, y


def linear_em(
    x,
    y,
    *,
    sigma0: float = 1.0,
    iterations: int = 500,
    noise_var: float | None = None,
    learn_noise: bool = True,
    min_scale: float = 1e-8,
) -> LinearEMResult:
    """EM for Bayesian linear regression with one scale per feature (exact E-step).

    E-step: :func:`linear_posterior`; M-step: λ_j² = E[v_j²] / σ0² (d_j = 1), and, when
    ``learn_noise``, σ² = (‖y − xμ‖² + tr(x Σ xᵀ)) / n. This is automatic relevance
    determination: irrelevant features' scales go to zero (floored at ``min_scale``).
    Compiled as one ``lax.scan``.

    Args:
        x: inputs, shape (n, d).
        y: targets, shape (n,).
        sigma0: σ0 > 0.
        iterations: EM iterations, an int >= 0.
        noise_var: the noise variance σ² > 0 (its starting value when ``learn_noise``);
            None starts from the variance of ``y``.
        learn_noise: whether the M-step also learns σ².
        min_scale: the floor of the scales, >= 0.

    Raises:
        ValueError: shapes other than x (n, d) and y (n,); non-finite data; ``sigma0`` or
            ``noise_var`` not finite and > 0; ``iterations`` not an int >= 0; ``min_scale``
            not finite and >= 0; or ``noise_var=None`` with a constant ``y`` (a start of σ² = 0).
        TypeError: a setting or an array of the wrong type.
    """
    x, y = _check_xy(x, y)
    _check.number("sigma0", sigma0, lo=0.0, lo_open=True)
    _check.number("iterations", iterations, lo=0, integer=True)
    _check.number("min_scale", min_scale, lo=0.0)
    if noise_var is not None:
        _check.number("noise_var", noise_var, lo=0.0, lo_open=True)
    x = x.astype(jnp.float32)
    y = y.astype(jnp.float32)
    n, d = x.shape
    s2 = jnp.var(y) if noise_var is None else jnp.asarray(noise_var, jnp.float32)
    if noise_var is None and _check.concrete(s2) and not float(s2) > 0:
        raise ValueError(
            f"noise_var=None starts σ² at the variance of y, which is {float(s2)}: y is "
            f"constant. Pass noise_var= (a number > 0) to start from."
        )

    def body(carry, _):
        lam, s2 = carry
        prior_var = (sigma0 * lam) ** 2
        precision = x.T @ x / s2 + jnp.diag(1.0 / prior_var)
        chol = jnp.linalg.cholesky(precision)
        cov = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(d, dtype=x.dtype))
        mean = cov @ (x.T @ y) / s2
        resid = y - x @ mean
        # log p(y | λ, σ²) from the posterior, with no n x n matrix:
        # −½ [n log 2πσ² + ‖y − xμ‖²/σ² + μᵀΛ⁻¹μ + log|Λ| − log|Σ|]
        log_evidence = -0.5 * (
            n * jnp.log(2 * jnp.pi * s2)
            + resid @ resid / s2
            + jnp.sum(mean**2 / prior_var)
            + jnp.sum(jnp.log(prior_var))
            + 2 * jnp.sum(jnp.log(jnp.diag(chol)))
        )
        second = mean**2 + jnp.diag(cov)
        new_lam = jnp.maximum(jnp.sqrt(second) / sigma0, min_scale)
        if learn_noise:
            s2 = (resid @ resid + jnp.sum((x @ cov) * x)) / n
        q = jnp.sum(second / (2 * sigma0**2 * new_lam**2) + jnp.log(new_lam))
        return (new_lam, s2), {"q": q, "log_evidence": log_evidence}

    (lam, s2), hist = jax.jit(lambda c: jax.lax.scan(body, c, None, length=iterations))(
        (jnp.ones(d), s2)
    )
    mean, _ = linear_posterior(x, y, (sigma0 * lam) ** 2, s2)
    return LinearEMResult(lam, s2, mean, hist)


# ------------------------------------------------------------------------- a numpyro prior


def numpyro_prior(hierarchy: gsm.Hierarchy) -> Callable[[str, Any], Any]:
    """A prior callable for ``numpyro.contrib.module.random_flax_module(..., prior=...)``.

    numpyro calls ``prior(name, shape)`` per parameter site (names like ``"Dense_0.kernel"``);
    noised leaves get N(0, σ0² λ_row²) with the row scales broadcast along the row axis, other
    leaves N(0, σ0²).

    Raises:
        TypeError: ``hierarchy`` is not a :class:`bayesnoise.gsm.Hierarchy`.
    """
    import numpyro.distributions as dist

    _check_hierarchy(hierarchy)

    scale_by_path = {}
    leaves = jax.tree.leaves(hierarchy.scales, is_leaf=lambda x: x is None)
    for (path, axis), s in zip(hierarchy.axes, leaves):
        key = path.split("/", 1)[1] if path.startswith("params/") else path
        scale_by_path[key.replace("/", ".")] = (axis, s)
    sigma0 = hierarchy.sigma0

    def prior(name, shape):
        axis, s = scale_by_path.get(name, (None, None))
        if s is None:
            return dist.Normal(0.0, sigma0 * jnp.ones(shape)).to_event(len(shape))
        bshape = [1] * len(shape)
        bshape[axis] = -1
        scale = sigma0 * jnp.broadcast_to(jnp.reshape(s, bshape), shape)
        return dist.Normal(0.0, scale).to_event(len(shape))

    return prior
