"""Stochastic gradient Langevin dynamics as optax gradient transformations.

Given g = ∇U(θ), U the minibatch estimate of the negative log posterior of the whole data set,

    U(θ) = −log p(θ) − (N / n) Σ_{i ∈ batch} log p(x_i | θ),

the SGLD update (Welling & Teh, 2011) at step t is

    θ ← θ − η_t g + ξ,    ξ ~ N(0, 2 η_t T),

with η_t the step size and T the temperature (T = 1 samples the posterior, T → 0 is SGD).
In Welling & Teh's notation ε_t = 2 η_t: their θ ← θ + (ε_t / 2) ∇log p + N(0, ε_t).

The transforms return the update; apply it with ``optax.apply_updates``. A PRNG key is kept in
the state and split on every update, so the noise differs from step to step and the transform is
a pure function of its state; or the caller hands each update its own key
(``update(grads, state, params, key=k)``, an optax extra argument), as the sampler does. The
noise of a leaf is ``jax.random.normal`` of its subkey, with whatever key implementation the key
has. (A Threefry written out in array operations, fused by XLA with the update, draws the same
numbers; on a shared 2-core CPU it made the update 0.9-1.7x as fast and the sampler's steps
0.95-1.12x, not the 1.2x that would pay for it: ``bayesnoise bench --suite rng`` measures both.)

Example:
    >>> import jax, jax.numpy as jnp, optax, bayesnoise as bn
    >>> opt = bn.sgld(1e-3, temperature=1.0, key=0)
    >>> params = {"w": jnp.zeros(3)}
    >>> state = opt.init(params)
    >>> grads = jax.grad(lambda p: 0.5 * jnp.sum(p["w"] ** 2))(params)
    >>> updates, state = opt.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> int(state.count)
    1

References:
    Welling, M. & Teh, Y. W. (2011). Bayesian learning via stochastic gradient Langevin dynamics.
    ICML.
    Li, C., Chen, C., Carlson, D. & Carin, L. (2016). Preconditioned stochastic gradient Langevin
    dynamics for deep neural networks. AAAI.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from bayesnoise import _check
from bayesnoise._tree import PyTree

__all__ = [
    "SGLDState",
    "PSGLDState",
    "BAOABState",
    "sgld",
    "psgld",
    "baoab",
    "polynomial_schedule",
    "step_size",
]


class SGLDState(NamedTuple):
    count: jax.Array  # shape (), int32: the number of updates made so far
    key: jax.Array  # shape (), a typed PRNG key, split on every update


class PSGLDState(NamedTuple):
    count: jax.Array  # shape (), int32: the number of updates made so far
    key: jax.Array  # shape (), a typed PRNG key, split on every update
    nu: PyTree  # running average V of g ⊙ g, shaped like the params


class BAOABState(NamedTuple):
    count: jax.Array  # shape (), int32: the number of updates made so far
    key: jax.Array  # shape (), a typed PRNG key, split on every update
    momentum: PyTree  # p, shaped like the params, before this update's kick


def _as_key(key: int | jax.Array | None, seed: int | jax.Array | None = None) -> jax.Array:
    """A typed PRNG key from ``key`` (or its alias ``seed``): an int, a typed or raw uint32 key.

    Traced values are accepted (an int seed becomes a traced hyperparameter under
    ``optax.inject_hyperparams``). ``None`` for both gives the fixed default key
    ``jax.random.key(0)``.
    """
    if key is not None and seed is not None:
        raise ValueError(
            f"pass the PRNG key once: key={key!r} and its alias seed={seed!r} were both given."
        )
    name = "seed" if seed is not None else "key"
    value = seed if seed is not None else key
    if value is None:
        return jax.random.key(0)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if not -(2**63) <= int(value) < 2**63:
            raise ValueError(
                f"{name} must be an int seed in [-2**63, 2**63) or a PRNG key (jax.random.key), "
                f"got {value!r}."
            )
        return jax.random.key(int(value))
    given = value
    try:
        value = jnp.asarray(value)
    except TypeError:
        raise ValueError(
            f"{name} must be an int or a PRNG key (jax.random.key), got {value!r}."
        ) from None
    if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
        if value.shape != ():
            raise ValueError(
                f"{name} must be a single PRNG key, got a key array of shape {value.shape}."
            )
        return value
    if jnp.issubdtype(value.dtype, jnp.integer) and value.shape == () and value.dtype != bool:
        return jax.random.key(value)
    if value.dtype == jnp.uint32 and value.shape == (2,):
        return jax.random.wrap_key_data(value)
    shown = f"{given!r} " if np.size(given) <= 4 and _check.concrete(given) else ""
    raise ValueError(
        f"{name} must be an int or a PRNG key (jax.random.key), got {shown}({value.dtype} of "
        f"shape {value.shape})."
    )


def _step_key(state_key: jax.Array, key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(next state key, this update's noise key): the caller's ``key`` when given, else a split
    of the key kept in the state."""
    if key is None:
        new, sub = jax.random.split(state_key)
        return new, sub
    return state_key, _as_key(key)


def _check_preconditioner(
    preconditioner: PyTree | None, updates: PyTree, name: str = "preconditioner", allow_zero=False
) -> None:
    if preconditioner is None:
        return
    want = jax.tree.structure(updates)
    got = jax.tree.structure(preconditioner)
    if want != got:
        raise ValueError(
            f"the {name} must have the structure of the params: got {got}, expected {want}."
        )
    for m, g in zip(jax.tree.leaves(preconditioner), jax.tree.leaves(updates)):
        if jnp.shape(m) != jnp.shape(g) and jnp.ndim(m) != 0:
            raise ValueError(
                f"every {name} leaf needs its parameter's shape {jnp.shape(g)} (or a scalar), "
                f"got a leaf of shape {jnp.shape(m)}."
            )
        if _check.concrete(m):
            # numpy: a concrete array closed over inside a jit trace stays concrete there
            m = np.asarray(m)
            low = float(np.min(m)) if m.size else 1.0
            ok = (low >= 0 if allow_zero else low > 0) and bool(np.all(np.isfinite(m)))
            if not ok:
                bound = ">= 0" if allow_zero else "> 0"
                raise ValueError(
                    f"{name} entries must be finite and {bound}, got minimum {low} in a leaf of "
                    f"shape {jnp.shape(m)}."
                )


def _check_state(state: object, kind: type, fn: str) -> None:
    if not isinstance(state, kind):
        raise TypeError(
            f"{fn}: state must be a {kind.__name__} (from this transform's init), got "
            f"{type(state).__name__}: {state!r:.200}."
        )


def _check_updates(updates: PyTree, like: PyTree, like_name: str) -> None:
    """The updates (gradients) have the tree structure of ``like`` (static)."""
    want, got = jax.tree.structure(like), jax.tree.structure(updates)
    if want != got:
        raise ValueError(
            f"updates (the gradients) must have the tree structure of {like_name}: got {got}, "
            f"expected {want}."
        )


def _check_number(name: str, value: object, allowed: str, **bounds) -> None:
    """A real number within ``bounds`` (see :func:`bayesnoise._check.number`); the message says
    ``name must be allowed``. Traced values pass unchecked."""
    try:
        _check.number(name, value, **bounds)
    except (TypeError, ValueError) as e:
        shown = repr(value) if np.size(value) <= 4 else f"an array of shape {np.shape(value)}"
        raise type(e)(f"{name} must be {allowed}, got {shown}.") from None


def _check_learning_rate(learning_rate: float | optax.Schedule) -> None:
    if callable(learning_rate):
        return
    _check_number(
        "learning_rate",
        learning_rate,
        "a finite number > 0 (the step size η = ε/2) or a schedule t -> η_t",
        lo=0.0,
        lo_open=True,
    )


def _check_temperature(temperature: float) -> None:
    _check_number(
        "temperature",
        temperature,
        "a finite number >= 0 (1 samples the posterior, 0 is plain gradient descent)",
        lo=0.0,
    )


def _zeros_like(params: PyTree) -> PyTree:
    """A state tree of zeros shaped and typed like the params."""
    return jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.result_type(x)), params)


def _multipliers(preconditioner: PyTree | None, updates: PyTree) -> PyTree:
    """The preconditioner's tree, or scalar ones in the updates' dtypes (M = 1)."""
    if preconditioner is not None:
        return preconditioner
    return jax.tree.map(lambda g: jnp.ones((), jnp.result_type(g)), updates)


def _step_size(learning_rate: float | optax.Schedule, count: ArrayLike) -> jax.Array:
    if callable(learning_rate):
        return jnp.asarray(learning_rate(count))
    return jnp.asarray(learning_rate)


def step_size(learning_rate: float | optax.Schedule, count: ArrayLike) -> jax.Array:
    """η_t: ``learning_rate(count)`` for a schedule, else the constant ``learning_rate``.

    Raises:
        TypeError: a constant ``learning_rate`` that is not a real number.
        ValueError: a constant ``learning_rate`` that is not finite and > 0.
    """
    _check_learning_rate(learning_rate)
    return _step_size(learning_rate, count)


def _normal_like(key: jax.Array, tree: PyTree) -> PyTree:
    """Independent standard normals shaped and typed like every leaf of ``tree``.

    Leaf i gets ``jax.random.normal(jax.random.split(key, n)[i], leaf.shape, leaf.dtype)``.
    """
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noise = [jax.random.normal(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, noise)


def sgld(
    learning_rate: float | optax.Schedule,
    temperature: float = 1.0,
    key: int | jax.Array | None = None,
    *,
    preconditioner: PyTree | None = None,
    gradient_noise: PyTree | None = None,
    max_drift: float | None = None,
    seed: int | jax.Array | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Stochastic gradient Langevin dynamics (Welling & Teh, 2011).

    Given g = ∇U, U the minibatch estimate of the negative log posterior of the whole data set
    (the log-likelihood sum scaled by N/n), the update at step t is

        u_t = −η_t M g + sqrt(2 η_t T M) ξ_t,    ξ_t ~ N(0, I),

    so ``optax.apply_updates(params, u_t)`` is one Euler–Maruyama step of the (preconditioned)
    Langevin diffusion whose stationary law is ∝ exp(−U / T). η_t is ``learning_rate`` or, for a
    schedule, ``learning_rate(t)`` with t = 0, 1, ... the number of earlier updates. M is a fixed
    diagonal preconditioner (all ones by default); being constant, it needs no correction term.
    Welling & Teh's step ε_t is 2 η_t (see :func:`polynomial_schedule`).

    With ``gradient_noise`` B (the variance of the minibatch estimate of ∇U per weight), the
    update's own gradient noise, of variance η_t² M² B, is subtracted from the injected noise,
    as in stochastic gradient Fisher scoring (Ahn et al., 2012): the injected variance is
    max(2 η_t T M − η_t² M² B, 0), so the total stays 2 η_t T M where B is right. This assumes
    a minibatch drawn afresh at every step; under one permutation per epoch the noise of an
    epoch's batches sums to almost zero at fixed weights, and the subtraction cools the
    weights that relax over more steps than an epoch.

    With ``max_drift`` K, each weight's drift η_t M g is clipped to ±K sqrt(2 η_t T M), K
    standard deviations of its injected noise (a tamed Euler step, Hutzenthaler, Jentzen &
    Kloeden, 2012; Brosse et al., 2019): where the posterior is reached the clip almost never
    binds (for a Gaussian weight at step d it binds beyond sqrt(2/d)·K of its standard
    deviation), while a weight that meets far more curvature than its step was chosen for
    moves at most K noise deviations per step instead of running away.

    The noise key: ``update(grads, state, params, key=k)`` uses ``k`` for this update's noise
    (the sampler of :mod:`bayesnoise.sampling` hands every chain's step its own key this way);
    without ``key=``, the key kept in the state is split, as optax's noise transforms do. The
    state's key comes from the builder's ``key`` (``seed`` is an alias); ``key=None`` gives the
    fixed default ``jax.random.key(0)``, so two transforms built without a key draw the same
    noise.

    Works inside ``optax.chain`` (which forwards ``key=`` to it) and under
    ``optax.inject_hyperparams`` (the learning rate and temperature become state).

    Args:
        learning_rate: the step size η > 0, or an optax schedule t -> η_t.
        temperature: T >= 0; 1 samples the posterior, smaller values sharpen it (a "cold"
            posterior), 0 is gradient descent.
        key: an int or a PRNG key for the state's key (None: ``jax.random.key(0)``).
        preconditioner: a tree like the params of positive multipliers M (or None for M = 1),
            e.g. the diagonal Laplace variance (``bn.laplace.posterior(...).variance``).
        gradient_noise: a tree like the params of B >= 0, the variance of the stochastic
            gradient per weight (None: no correction).
        max_drift: K > 0, the largest drift per step in standard deviations of the injected
            noise (None: no clip).
        seed: alias of ``key``.

    Returns:
        An ``optax.GradientTransformationExtraArgs`` whose state is :class:`SGLDState`.

    Raises:
        ValueError: if a constant ``learning_rate`` is not finite and > 0, ``temperature`` is
            not finite and >= 0, ``max_drift`` is not finite and > 0, the key is not an int or a
            key, or the preconditioner or ``gradient_noise`` has the wrong structure or entries.
        TypeError: if ``learning_rate``, ``temperature`` or ``max_drift`` is not a real number
            (nor a schedule, for ``learning_rate``).

    Example:
        >>> import jax, jax.numpy as jnp, bayesnoise as bn
        >>> opt = bn.sgld(bn.polynomial_schedule(a=1e-2, b=1.0, gamma=0.55), key=0)
        >>> state = opt.init({"w": jnp.zeros(2)})
        >>> updates, state = opt.update({"w": jnp.ones(2)}, state, key=jax.random.key(1))
        >>> updates["w"].shape
        (2,)

    References:
        Welling, M. & Teh, Y. W. (2011). Bayesian learning via stochastic gradient Langevin
        dynamics. ICML.
        Ahn, S., Korattikara, A. & Welling, M. (2012). Bayesian posterior sampling via
        stochastic gradient Fisher scoring. ICML.
        Brosse, N., Durmus, A., Moulines, É. & Sabanis, S. (2019). The tamed unadjusted
        Langevin algorithm. Stochastic Processes and their Applications.
    """
    _check_learning_rate(learning_rate)
    _check_temperature(temperature)
    if max_drift is not None:
        _check_number(
            "max_drift",
            max_drift,
            "a finite number > 0 (K noise deviations per step) or None",
            lo=0.0,
            lo_open=True,
        )
    key0 = _as_key(key, seed)

    def init_fn(params: PyTree) -> SGLDState:
        _check_preconditioner(preconditioner, params)
        _check_preconditioner(gradient_noise, params, "gradient_noise", allow_zero=True)
        return SGLDState(count=jnp.zeros((), jnp.int32), key=key0)

    def update_fn(updates: PyTree, state: SGLDState, params: PyTree | None = None, **extra):
        del params
        _check_state(state, SGLDState, "sgld update")
        if preconditioner is not None:
            _check_updates(updates, preconditioner, "the preconditioner")
        if gradient_noise is not None:
            _check_updates(updates, gradient_noise, "gradient_noise")
        eta = _step_size(learning_rate, state.count)
        new_key, sub = _step_key(state.key, extra.get("key"))
        noise = _normal_like(sub, updates)
        scale = jnp.sqrt(2.0 * eta * temperature)
        if preconditioner is None and gradient_noise is None and max_drift is None:

            def one(g, z):
                return (-eta * g + scale * z).astype(jnp.result_type(g))

            new = jax.tree.map(one, updates, noise)
        else:
            m_tree = _multipliers(preconditioner, updates)
            b_tree = (
                jax.tree.map(lambda g: jnp.zeros((), jnp.result_type(g)), updates)
                if gradient_noise is None
                else gradient_noise
            )

            def one(g, z, m, b):
                var = jnp.maximum(2.0 * eta * temperature * m - (eta * m) ** 2 * b, 0.0)
                drift = -eta * m * g
                if max_drift is not None:
                    cap = max_drift * jnp.sqrt(2.0 * eta * temperature * m)
                    drift = jnp.clip(drift, -cap, cap)
                return (drift + jnp.sqrt(var) * z).astype(jnp.result_type(g))

            new = jax.tree.map(one, updates, noise, m_tree, b_tree)
        return new, SGLDState(count=optax.safe_increment(state.count), key=new_key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def psgld(
    learning_rate: float | optax.Schedule,
    decay: float = 0.99,
    eps: float = 1e-5,
    temperature: float = 1.0,
    key: int | jax.Array | None = None,
    *,
    seed: int | jax.Array | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Preconditioned SGLD with the RMSprop preconditioner (Li et al., 2016).

    With g = ∇U as in :func:`sgld`, every update first refreshes the running average and the
    diagonal preconditioner,

        V ← α V + (1 − α) g ⊙ g,    G = 1 / (λ + sqrt(V)),

    (V starts at 0), then returns

        u_t = −η_t G ⊙ g + sqrt(2 η_t T G) ⊙ ξ_t,    ξ_t ~ N(0, I).

    The correction term Γ_i = Σ_j ∂G_ij/∂θ_j of the exact preconditioned diffusion is omitted,
    as Li et al. do in their experiments: with α close to 1 the preconditioner changes slowly and
    Γ is small, at the price of a bias that vanishes with the step size.

    V averages the squares of the gradient the transform is given, ∇U, which sums the
    log-likelihood over the whole data set; Li et al. average the per-example mean gradient
    instead, so their V is smaller by N² and G larger by N. For the same behaviour, take η here
    N times Li et al.'s ε/2.

    Args:
        learning_rate: the step size η > 0, or an optax schedule t -> η_t.
        decay: α in [0, 1), the decay of the running average of squared gradients.
        eps: λ > 0, the damping added to sqrt(V).
        temperature: T >= 0, as in :func:`sgld`.
        key: an int or a PRNG key for the state's key, as in :func:`sgld` (``update`` takes a
            per-update ``key=`` too); None gives ``jax.random.key(0)``.
        seed: alias of ``key``.

    Returns:
        An ``optax.GradientTransformationExtraArgs`` whose state is :class:`PSGLDState`.

    Raises:
        ValueError: for a constant ``learning_rate`` that is not finite and > 0, ``decay``
            outside [0, 1), ``eps`` not finite and > 0, ``temperature`` not finite and >= 0, or
            a key that is not an int or a key.
        TypeError: if one of these is not a real number (nor a schedule, for
            ``learning_rate``).

    References:
        Li, C., Chen, C., Carlson, D. & Carin, L. (2016). Preconditioned stochastic gradient
        Langevin dynamics for deep neural networks. AAAI.
    """
    _check_learning_rate(learning_rate)
    _check_temperature(temperature)
    _check_number(
        "decay",
        decay,
        "a number in [0, 1) (α, the decay of the average of squared gradients)",
        lo=0.0,
        hi=1.0,
        hi_open=True,
    )
    _check_number(
        "eps",
        eps,
        "a finite number > 0 (λ, the damping of the preconditioner)",
        lo=0.0,
        lo_open=True,
    )
    key0 = _as_key(key, seed)

    def init_fn(params: PyTree) -> PSGLDState:
        nu = _zeros_like(params)
        return PSGLDState(count=jnp.zeros((), jnp.int32), key=key0, nu=nu)

    def update_fn(updates: PyTree, state: PSGLDState, params: PyTree | None = None, **extra):
        del params
        _check_state(state, PSGLDState, "psgld update")
        _check.same_tree("updates", updates, state.nu, "the state's params")
        eta = _step_size(learning_rate, state.count)
        new_key, sub = _step_key(state.key, extra.get("key"))
        noise = _normal_like(sub, updates)
        nu = jax.tree.map(lambda v, g: decay * v + (1.0 - decay) * g * g, state.nu, updates)

        def one(g, v, z):
            precond = 1.0 / (eps + jnp.sqrt(v))
            step = -eta * precond * g + jnp.sqrt(2.0 * eta * temperature * precond) * z
            return step.astype(jnp.result_type(g))

        new = jax.tree.map(one, updates, nu, noise)
        return new, PSGLDState(count=optax.safe_increment(state.count), key=new_key, nu=nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def baoab(
    learning_rate: float,
    friction: float = 1.0,
    temperature: float = 1.0,
    key: int | jax.Array | None = None,
    *,
    preconditioner: PyTree | None = None,
    seed: int | jax.Array | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Kinetic (underdamped) Langevin dynamics, BAOAB splitting (Leimkuhler & Matthews, 2013).

    The weights θ = θ_0 + s ⊙ z move in coordinates z scaled by s = sqrt(M), M a fixed diagonal
    preconditioner (all ones by default; the diagonal Laplace variance makes z about unit
    scale), with a momentum p of the same shape. The dynamics

        dz = p dt,    dp = −s ⊙ ∇U dt − γ p dt + sqrt(2 γ T) dW

    leave exp(−(U(θ) + ‖p‖² / 2) / T) invariant, so θ samples ∝ exp(−U / T). One BAOAB step of
    length h is a half kick (B), half a drift (A), the exact Ornstein–Uhlenbeck step of the
    momentum (O), the other half drift and a half kick at the new point. The closing half kick
    needs the gradient at the new point, which is the next update's ``g``: so every update merges
    the previous step's closing half kick with its own opening one, and takes one gradient,

        p ← p − k s ⊙ g   (k = h/2 at the first update, h after),
        p' = c p + sqrt(T (1 − c²)) ξ,    c = exp(−γ h),    ξ ~ N(0, I),
        u = s ⊙ (h/2) (p + p'),    p ← p'.

    The momentum starts at 0; the O step brings it to its stationary spread within a few 1/γ
    units of time. For a Gaussian target with the full gradient, the positions' stationary law is
    exact at any stable step (h · sqrt(λ_max) < 2, λ_max the largest eigenvalue of the scaled
    Hessian s ⊙ ∇²U ⊙ s); elsewhere the bias is O(h²). With a minibatch gradient the step adds
    the minibatch noise as in SGHMC without its correction: use it with the full data set
    (``batch_size`` >= N in :func:`bayesnoise.sampling.run`) or a small h.

    Compared with :func:`sgld` (the overdamped limit), a direction whose scaled curvature is 1/κ
    of the largest relaxes in about sqrt(κ) steps instead of κ.

    Args:
        learning_rate: the step h > 0 in the scaled coordinates (a constant; h · sqrt(λ_max)
            about 0.5 is a safe start).
        friction: γ > 0, in units of 1 / time (1/γ is about how long momentum persists).
        temperature: T >= 0, as in :func:`sgld`.
        key: an int or a PRNG key for the state's key, as in :func:`sgld` (``update`` takes a
            per-update ``key=`` too); None gives ``jax.random.key(0)``.
        preconditioner: a tree like the params of positive multipliers M (or None for M = 1),
            e.g. the diagonal Laplace variance (``bn.laplace.posterior(...).variance``).
            ``update`` takes a per-update ``preconditioner=`` too, which replaces it for that
            update: the momentum p is N(0, T) at equilibrium whatever M is, so every update
            keeps the target whichever M it takes, as long as M does not depend on θ itself
            (it may follow the order of exchanged units, :func:`bayesnoise.sampling.init`).
        seed: alias of ``key``.

    Returns:
        An ``optax.GradientTransformationExtraArgs`` whose state is :class:`BAOABState`.

    Raises:
        ValueError: if ``learning_rate`` is a schedule or not finite and > 0, ``friction`` is
            not finite and > 0, ``temperature`` is not finite and >= 0, the key is not an int or
            a key, or the preconditioner has the wrong structure or entries.
        TypeError: if one of these is not a real number.

    Example:
        >>> import jax, jax.numpy as jnp, optax, bayesnoise as bn
        >>> opt = bn.baoab(0.1, friction=1.0, key=0)
        >>> params = {"w": jnp.zeros(3)}
        >>> state = opt.init(params)
        >>> updates, state = opt.update({"w": jnp.ones(3)}, state, params)
        >>> int(state.count), updates["w"].shape
        (1, (3,))

    References:
        Leimkuhler, B. & Matthews, C. (2013). Rational construction of stochastic numerical
        methods for molecular sampling. Applied Mathematics Research eXpress.
        Chen, T., Fox, E. & Guestrin, C. (2014). Stochastic gradient Hamiltonian Monte Carlo.
        ICML.
    """
    if callable(learning_rate):
        raise ValueError(
            f"learning_rate must be a constant step h > 0 for baoab (its updates merge two "
            f"half kicks of the same h), got the schedule {learning_rate!r}."
        )
    _check_number(
        "learning_rate",
        learning_rate,
        "a finite number > 0 (the step h in the preconditioned coordinates)",
        lo=0.0,
        lo_open=True,
    )
    _check_number(
        "friction",
        friction,
        "a finite number > 0 (γ, in units of 1 / time)",
        lo=0.0,
        lo_open=True,
    )
    _check_temperature(temperature)
    key0 = _as_key(key, seed)

    def init_fn(params: PyTree) -> BAOABState:
        _check_preconditioner(preconditioner, params)
        momentum = _zeros_like(params)
        return BAOABState(count=jnp.zeros((), jnp.int32), key=key0, momentum=momentum)

    def update_fn(updates: PyTree, state: BAOABState, params: PyTree | None = None, **extra):
        del params
        _check_state(state, BAOABState, "baoab update")
        _check.same_tree("updates", updates, state.momentum, "the state's params")
        given = extra.get("preconditioner", preconditioner)
        if given is not preconditioner:  # this update's own multipliers
            _check_preconditioner(given, updates)
        elif given is not None:
            _check_updates(updates, given, "the preconditioner")
        h = jnp.asarray(learning_rate)
        kick = jnp.where(state.count == 0, 0.5 * h, h)
        c = jnp.exp(-friction * h)
        spread = jnp.sqrt(temperature * (1.0 - c * c))
        new_key, sub = _step_key(state.key, extra.get("key"))
        noise = _normal_like(sub, updates)
        m_tree = _multipliers(given, updates)

        def one(g, p, z, m):
            s = jnp.sqrt(m)
            p = p - kick * s * g
            p_new = c * p + spread * z
            step = s * (0.5 * h) * (p + p_new)
            return step.astype(jnp.result_type(g)), p_new.astype(jnp.result_type(g))

        out = jax.tree.map(one, updates, state.momentum, noise, m_tree)
        outer = jax.tree.structure(updates)
        new, momentum = jax.tree.transpose(outer, jax.tree.structure((0, 0)), out)
        return new, BAOABState(
            count=optax.safe_increment(state.count), key=new_key, momentum=momentum
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def polynomial_schedule(a: float, b: float, gamma: float) -> Callable[[ArrayLike], jax.Array]:
    """Welling & Teh's decaying step, returned as the step size η_t = ε_t / 2 of :func:`sgld`.

        ε_t = a (b + t)^(−γ),    η_t = ε_t / 2 = (a / 2) (b + t)^(−γ).

    With γ in (0.5, 1] the steps satisfy Σ ε_t = ∞ and Σ ε_t² < ∞, so SGLD with this schedule
    converges to the posterior. The returned function gives η_t (half of Welling & Teh's ε_t),
    so it is used directly as ``learning_rate`` of :func:`sgld`.

    Args:
        a: scale, > 0.
        b: offset, > 0 (ε_0 = a b^(−γ)).
        gamma: decay exponent γ in (0.5, 1].

    Returns:
        A schedule t -> η_t = a (b + t)^(−γ) / 2 (an ``optax.Schedule``).

    Raises:
        ValueError: if ``a`` or ``b`` is not finite and > 0, or ``gamma`` is not in (0.5, 1].
        TypeError: if one of them is not a real number.

    Example:
        >>> import bayesnoise as bn
        >>> schedule = bn.polynomial_schedule(a=0.02, b=1.0, gamma=1.0)
        >>> round(float(schedule(0)), 6), round(float(schedule(1)), 6)  # ε_t / 2
        (0.01, 0.005)

    References:
        Welling, M. & Teh, Y. W. (2011). Bayesian learning via stochastic gradient Langevin
        dynamics. ICML, section 3.
    """
    _check_number(
        "a", a, "a finite number > 0 (the scale of ε_t = a (b + t)^-γ)", lo=0.0, lo_open=True
    )
    _check_number(
        "b", b, "a finite number > 0 (the offset of ε_t = a (b + t)^-γ)", lo=0.0, lo_open=True
    )
    _check_number(
        "gamma",
        gamma,
        "a number in (0.5, 1] (the decay exponent of ε_t = a (b + t)^-γ), so that Σ ε_t = ∞ "
        "and Σ ε_t² < ∞",
        lo=0.5,
        hi=1.0,
        lo_open=True,
    )
    a, b, gamma = float(a), float(b), float(gamma)

    def schedule(count: ArrayLike) -> jax.Array:
        if isinstance(count, (str, bytes)) or count is None:
            raise TypeError(f"count (the step t) must be a number >= 0, got {count!r}.")
        t = jnp.asarray(count, jnp.result_type(float))
        return 0.5 * a * (b + t) ** (-gamma)

    return schedule
