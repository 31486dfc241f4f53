"""Closed-form penalties that multiplicative noise induces.

Noise λ on the inputs, drawn per example and per input unit, with E[λ] = m and Var[λ] = s².

* Linear regression (the paper's eq. 4, with the ½ its first term lacks): for the loss
  ½ Σ_i (y_i − Σ_j x_ij λ_ij w_j)², the expectation over λ is exactly
  ½ Σ_i (y_i − m x_i·w)² + ½ s² Σ_j w_j² Σ_i x_ij².
* Logistic regression (eq. 5, a second-order approximation; Wager et al., 2013): with
  A(η) = log(1 + e^η) and η̃_i = Σ_j λ_ij x_ij w_j + b, E[A(η̃)] ≈ A(E η̃) + ½ A''(E η̃) Var η̃,
  so the penalty is ½ s² Σ_i p_i (1 − p_i) Σ_j x_ij² w_j², p_i = σ(m x_i·w + b).
* Type-II maximum likelihood (eqs. 14–16). Row j of a noised leaf holds d_j weights v_jk with
  prior v_jk | λ_j ~ N(0, σ0² λ_j²); under the posterior q they have means E[v_jk] and variances
  Var[v_jk]. The M-step without a hyperprior sets λ̂_j² = S_j / (σ0² d_j) with the expected
  squared row norm

      S_j = Σ_k E_q[v_jk²] = Σ_k (E[v_jk]² + Var[v_jk]).

  Eq. 14 is the prior's negative log density at these scales, averaged over q: the M-step's Q
  at its minimiser (no hyperprior) with Q's constants kept. Since Σ_k E[v_jk²] / (2 σ0² λ̂_j²) = d_j / 2, σ0
  cancels:

      E_q[−log p(V | Λ̂)] = Σ_j (d_j / 2) [1 + log(2π S_j / d_j)].

  Eq. 15 drops the terms that do not depend on V: Σ_j (d_j / 2) log S_j = Σ_j d_j log ‖v_j‖,
  with ‖v_j‖ = √S_j the root expected row norm. A log group-norm penalty: its gradient in a mean,
  d_j E[v_jk] / S_j, is strong for small rows and vanishes for large ones, so rows end up
  either near zero or large and scale-free ("sparse or robust"). Posterior variance counts
  like signal: a row whose weights are uncertain but large is as free as a row of large means.
  Eq. 16 is eq. 15 in the unidentifiable coordinates v_j = λ_j w_j, with λ fixed (so
  E[v²] = λ² E[w²]): Σ_j d_j (log |λ_j| + log ‖w_j‖).

  The paper's equations leave σ0 out; here it is kept (it cancels in eq. 14), and the
  expectations over the posterior that the M-step uses are written out. With
  ``variance=None`` the weights are taken as known (Var = 0), the plug-in form.
* Learned noise (variational dropout). A weight w ~ N(θ, α θ²) (or a row θ_j scaled by
  ξ_j ~ N(1, α_j)) under the scale-invariant log-uniform prior p(|w|) ∝ 1/|w| has
  −KL = ½ log α − E_{ε~N(1,α)} log|ε| + C, a function of α alone (C holds the prior's infinite
  normaliser). Molchanov et al.'s fit, with C chosen so that KL → 0 as α → ∞, is

      −KL ≈ k1 σ(k2 + k3 log α) − ½ log(1 + 1/α) − k1,
      k1 = 0.63576, k2 = 1.87320, k3 = 1.48695,

  within 0.01 of the exact value for every α (:func:`kl_log_uniform`;
  :func:`learned_noise_kl` sums it over a model).

References:
    Nalisnick, Anandkumar & Smyth (2015), "A Scale Mixture Perspective of Multiplicative Noise
    in Neural Networks", arXiv:1506.03208.
    Wager, Wang & Liang (2013), "Dropout Training as Adaptive Regularization", NeurIPS.
    Kingma, Salimans & Welling (2015), "Variational Dropout and the Local Reparameterization
    Trick", NeurIPS.
    Molchanov, Ashukha & Vetrov (2017), "Variational Dropout Sparsifies Deep Neural Networks",
    ICML.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from bayesnoise import _check, _tree, gsm
from bayesnoise import nn as bnn
from bayesnoise._tree import PyTree
from bayesnoise.noise import Noise

__all__ = [
    "linear_regression",
    "expected_linear_loss",
    "logistic_regression",
    "approx_expected_logistic_loss",
    "ml2_neg_log_prior",
    "log_norm",
    "log_norm_unidentifiable",
    "kl_log_uniform",
    "learned_noise_kl",
]

# Molchanov et al. (2017), eq. 14: the fit of −KL(α) to the log-uniform prior
K1, K2, K3 = 0.63576, 1.87320, 1.48695


def _moments(noise: Noise | float, mean: float | None = None) -> tuple[float, float]:
    """(E[λ], Var[λ]) of a noise, or of a variance given as a number (mean 1 unless given)."""
    if mean is not None:
        _check.number("mean (E[λ])", mean)
    if isinstance(noise, Noise):
        m, s2 = noise.mean, noise.variance
        if _check.concrete((m, s2)) and not (np.isfinite(m) and np.isfinite(s2)):
            raise ValueError(
                f"noise must have a finite mean and variance, got {noise!r} with mean {m} and "
                f"variance {s2}."
            )
        return m, s2
    if noise is None or isinstance(noise, (str, bytes, bool, np.bool_)):
        raise TypeError(
            f"noise must be a bayesnoise.noise distribution or the noise variance (a finite "
            f"number >= 0), got {noise!r}."
        )
    _check.number("noise (the noise variance)", noise, lo=0.0)
    return (1.0 if mean is None else mean), noise


def _array(name: str, value: ArrayLike) -> jax.Array:
    """``value`` as an array, after checking it holds real numbers."""
    return _check.array(name, value, "a real number or an array of them")


def _check_wx(w: jax.Array, x: jax.Array, max_w_ndim: int | None = None) -> None:
    """x (n, d), w (d,) or (d, k): static shape checks."""
    if x.ndim != 2:
        raise ValueError(f"x must have shape (n, d) (examples, inputs), got shape {x.shape}.")
    if w.ndim < 1 or (max_w_ndim is not None and w.ndim > max_w_ndim):
        allowed = "(d,) or (d, k)" if max_w_ndim == 2 else "(d, ...)"
        raise ValueError(f"w must have shape {allowed}, got shape {w.shape}.")
    if w.shape[0] != x.shape[1]:
        raise ValueError(
            f"w has shape {w.shape} and x has shape {x.shape}: w's first axis must have x's "
            f"{x.shape[1]} inputs (x (n, d), w (d,) or (d, k))."
        )


def _check_y(y: jax.Array, want: tuple[int, ...]) -> None:
    if y.shape != want:
        raise ValueError(
            f"y must have the shape {want} of x @ w (one target per example and output), got "
            f"shape {y.shape}."
        )


def _check_b(b: ArrayLike, want: tuple[int, ...]) -> jax.Array:
    """``b`` as an array: a finite number, or an array broadcasting to ``want``."""
    if np.ndim(b) == 0 and not isinstance(b, (str, bytes)) and b is not None:
        _check.number("b", b)
    b = _array("b", b)
    try:
        ok = np.broadcast_shapes(b.shape, want) == want
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"b must be a number or an array that broadcasts to the shape {want} of x @ w, got "
            f"shape {b.shape}."
        )
    return b


def _row_energy(w: jax.Array) -> jax.Array:
    """Σ over output columns of w²: one value per input row."""
    w = jnp.asarray(w)
    return w**2 if w.ndim == 1 else jnp.sum(w**2, axis=tuple(range(1, w.ndim)))


def linear_regression(w: ArrayLike, x: ArrayLike, noise: Noise | float) -> jax.Array:
    """½ Var[λ] Σ_j ‖w_j‖² Σ_i x_ij²: the penalty noise adds to a squared loss (eq. 4).

    Args:
        w: weights (d,) or (d, k).
        x: inputs (n, d).
        noise: a noise distribution, or its variance (a finite number >= 0).

    Raises:
        TypeError: ``noise`` is neither a noise nor a number, or ``w`` or ``x`` holds no numbers.
        ValueError: the variance is negative or not finite (or the noise's is infinite), or the
            shapes of ``w`` and ``x`` do not fit.
    """
    _, s2 = _moments(noise)
    w, x = _array("w", w), _array("x", x)
    _check_wx(w, x)
    return 0.5 * s2 * jnp.sum(_row_energy(w) * jnp.sum(x**2, axis=0))


def expected_linear_loss(
    w: ArrayLike, x: ArrayLike, y: ArrayLike, noise: Noise | float, mean: float | None = None
) -> jax.Array:
    """E_λ[½ Σ_i ‖y_i − (λ_i ⊙ x_i) w‖²] in closed form: the clean loss at m·w plus eq. 4.

    Args:
        w: weights (d,) or (d, k).
        x: inputs (n, d).
        y: targets, the shape of ``x @ w``: (n,) or (n, k).
        noise: a noise distribution, or its variance (a finite number >= 0).
        mean: E[λ] when ``noise`` is a variance (default 1), a finite number.

    Raises:
        TypeError, ValueError: as :func:`linear_regression`, or ``y`` has another shape than
            ``x @ w``, or ``mean`` is not a finite number.
    """
    m, _ = _moments(noise, mean)
    w, x, y = _array("w", w), _array("x", x), _array("y", y)
    _check_wx(w, x, max_w_ndim=2)
    _check_y(y, (x.shape[0],) + w.shape[1:])
    resid = y - m * (x @ w)
    return 0.5 * jnp.sum(resid**2) + linear_regression(w, x, noise)


def logistic_regression(
    w: ArrayLike, x: ArrayLike, noise: Noise | float, b: ArrayLike = 0.0, mean: float | None = None
) -> jax.Array:
    """½ Var[λ] Σ_i p_i (1 − p_i) Σ_j x_ij² w_j²: the second-order penalty (eq. 5).

    Args:
        w: weights (d,).
        x: inputs (n, d).
        noise: a noise distribution, or its variance, a finite number >= 0 (then ``mean``
            defaults to 1).
        b: bias (not noised): a finite number, or an array broadcasting to the shape of x @ w.
        mean: E[λ] when ``noise`` is a variance, a finite number.

    Raises:
        TypeError: ``noise`` is neither a noise nor a number, or an array holds no numbers.
        ValueError: the variance is negative or not finite (or the noise's is infinite), or the
            shapes of ``w``, ``x`` and ``b`` do not fit.
    """
    m, s2 = _moments(noise, mean)
    x, w = _array("x", x), _array("w", w)
    _check_wx(w, x, max_w_ndim=2)
    b = _check_b(b, (x.shape[0],) + w.shape[1:])
    p = jax.nn.sigmoid(m * (x @ w) + b)
    return 0.5 * s2 * jnp.sum(p * (1 - p) * ((x**2) @ (w**2)))


def approx_expected_logistic_loss(
    w: ArrayLike,
    x: ArrayLike,
    y: ArrayLike,
    noise: Noise | float,
    b: ArrayLike = 0.0,
    mean: float | None = None,
) -> jax.Array:
    """Σ_i [A(η_i) − y_i η_i] at η = m x·w + b, plus eq. 5: ≈ E_λ of the noisy logistic loss.

    Args:
        w, x, noise, b, mean: as in :func:`logistic_regression`.
        y: labels in {0, 1} (or probabilities), the shape of ``x @ w``.

    Raises:
        TypeError, ValueError: as :func:`logistic_regression`, or ``y`` has another shape than
            ``x @ w``.
    """
    m, _ = _moments(noise, mean)
    x, w, y = _array("x", x), _array("w", w), _array("y", y)
    _check_wx(w, x, max_w_ndim=2)
    _check_y(y, (x.shape[0],) + w.shape[1:])
    b = _check_b(b, y.shape)
    eta = m * (x @ w) + b
    clean = jnp.sum(jax.nn.softplus(eta) - y * eta)
    return clean + logistic_regression(w, x, noise, b, mean)


def ml2_neg_log_prior(
    v_params: PyTree, hierarchy: gsm.Hierarchy, variance: PyTree | None = None
) -> jax.Array:
    """Eq. 14: E_q[−log p(V | Λ̂)], the negative log GSM prior at the type-II ML scales.

    For every noised row j (d_j weights) the M-step without a hyperprior gives
    λ̂_j² = S_j / (σ0² d_j) with S_j = Σ_k (E[v_jk]² + Var[v_jk]). The expected negative log
    prior at these scales, over the posterior q of V, is

        Σ_j Σ_k E_q[−log N(v_jk; 0, σ0² λ̂_j²)]
            = Σ_j [(d_j / 2) log(2π σ0² λ̂_j²) + S_j / (2 σ0² λ̂_j²)]
            = Σ_j (d_j / 2) [1 + log(2π S_j / d_j)],

    which is the M-step's Q(Λ̂) = Σ_j [S_j / (2 σ0² λ̂_j²) + d_j log λ̂_j] plus the constant
    Σ_j (d_j / 2) log(2π σ0²) that Q leaves out; σ0 cancels. Leaves that are
    not noised contribute nothing. A row with S_j = 0 gives −∞ (the prior collapses onto it).

    Args:
        v_params: the posterior means E[v] of the identifiable weights (or a point estimate).
        hierarchy: the GSM hierarchy; its row axes choose the rows (its scales are not used:
            Λ̂ is computed here from the moments).
        variance: Var[v] per weight, a tree with the structure and shapes of ``v_params`` (e.g.
            ``bn.moments.variance(state)``); None means zero, i.e. V known exactly.

    Returns:
        a scalar.

    Raises:
        ValueError: ``variance`` does not match ``v_params`` in structure or shapes, or holds a
            negative or non-finite entry; or the hierarchy does not match ``v_params``.
        TypeError: ``hierarchy`` is not a :class:`bayesnoise.gsm.Hierarchy`.

    Example:
        >>> import jax.numpy as jnp, bayesnoise as bn
        >>> v = {"kernel": jnp.array([[3.0, 4.0]])}
        >>> h = bn.gsm.hierarchy(v)
        >>> round(float(bn.penalties.ml2_neg_log_prior(v, h)), 4)  # 1 + log(2π · 25 / 2)
        5.3636
        >>> var = {"kernel": jnp.array([[0.5, 0.5]])}  # S = 25 + 1
        >>> round(float(bn.penalties.ml2_neg_log_prior(v, h, var)), 4)  # 1 + log(2π · 26 / 2)
        5.4028
    """
    total = jnp.zeros(())
    for s, d in _rows(v_params, hierarchy, variance):
        total = total + jnp.sum(0.5 * d * (1.0 + jnp.log(2 * math.pi * s / d)))
    return total


def log_norm(
    v_params: PyTree, hierarchy: gsm.Hierarchy, variance: PyTree | None = None
) -> jax.Array:
    """Eq. 15: Σ_j (d_j / 2) log S_j = Σ_j d_j log ‖v_j‖, eq. 14 without its constants.

    S_j = Σ_k (E[v_jk]² + Var[v_jk]) is the expected squared norm of row j, ‖v_j‖ = √S_j. Eq. 14
    minus eq. 15 is Σ_j (d_j / 2) [1 + log(2π / d_j)], which depends on the shapes only, so both
    have the same gradient in the means and in the variances.

    Args:
        v_params: the posterior means E[v] of the identifiable weights (or a point estimate).
        hierarchy: the GSM hierarchy (its row axes are used).
        variance: Var[v] per weight, shaped like ``v_params``; None means zero.

    Returns:
        a scalar.

    Raises:
        ValueError: as :func:`ml2_neg_log_prior`.

    Example:
        >>> import jax.numpy as jnp, bayesnoise as bn
        >>> v = {"kernel": jnp.array([[3.0, 4.0]])}
        >>> round(float(bn.penalties.log_norm(v, bn.gsm.hierarchy(v))), 4)  # 2 log 5
        3.2189
    """
    total = jnp.zeros(())
    for s, d in _rows(v_params, hierarchy, variance):
        total = total + jnp.sum(0.5 * d * jnp.log(s))
    return total


def log_norm_unidentifiable(
    w_params: PyTree, hierarchy: gsm.Hierarchy, variance: PyTree | None = None
) -> jax.Array:
    """Eq. 16: Σ_j d_j (log |λ_j| + log ‖w_j‖), eq. 15 in the coordinates v_j = λ_j w_j.

    λ_j are the hierarchy's scales, held fixed, so E[v_jk²] = λ_j² (E[w_jk]² + Var[w_jk]) and
    ‖w_j‖² = Σ_k (E[w_jk]² + Var[w_jk]). It equals :func:`log_norm` at v = λ w with
    Var[v] = λ² Var[w].

    Args:
        w_params: the posterior means E[w] of the unidentifiable weights (or a point estimate).
        hierarchy: the GSM hierarchy; its scales are the λ_j.
        variance: Var[w] per weight, shaped like ``w_params``; None means zero.

    Returns:
        a scalar.

    Raises:
        ValueError: as :func:`ml2_neg_log_prior`.
    """
    total = jnp.zeros(())
    scales = jax.tree.leaves(hierarchy.scales)
    for (s, d), lam in zip(_rows(w_params, hierarchy, variance), scales, strict=True):
        total = total + jnp.sum(d * (jnp.log(jnp.abs(lam)) + 0.5 * jnp.log(s)))
    return total


def _second_moments(params: PyTree, variance: PyTree | None) -> PyTree:
    """x² + Var[x] per weight, after checking that ``variance`` fits ``params``."""
    if variance is None:
        return jax.tree.map(lambda x: jnp.square(jnp.asarray(x)), params)
    want, got = jax.tree.structure(params), jax.tree.structure(variance)
    if want != got:
        raise ValueError(
            f"the variance tree does not match the params tree: got {got}, expected {want}. "
            f"Pass Var per weight with the params' structure (e.g. bn.moments.variance(state)), "
            f"or None for zero variance."
        )
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    out = []
    for (path, x), var in zip(flat, jax.tree.leaves(variance), strict=True):
        name = _tree.path_str(path)
        x, var = jnp.asarray(x), jnp.asarray(var)
        if var.shape != x.shape:
            raise ValueError(
                f"the variance of leaf {name!r} has shape {var.shape}, but its weights have shape "
                f"{x.shape}; give one variance per weight."
            )
        if not isinstance(var, jax.core.Tracer):
            arr = np.asarray(var)
            bad = arr[~(np.isfinite(arr) & (arr >= 0))]
            if bad.size:
                raise ValueError(
                    f"the posterior variance must be finite and >= 0 for every weight; leaf "
                    f"{name!r} has {bad.size} entries that are not, e.g. {bad.flat[0]!r}."
                )
        out.append(jnp.square(x) + var)
    return jax.tree.unflatten(jax.tree.structure(params), out)


def _rows(params: PyTree, hierarchy: gsm.Hierarchy, variance: PyTree | None):
    """(S_j, d_j) per noised leaf, in flattening order: S_j = Σ_k (x_jk² + Var[x_jk])."""
    if not isinstance(hierarchy, gsm.Hierarchy):
        raise TypeError(
            f"hierarchy must be a bn.gsm.Hierarchy (from bn.gsm.hierarchy), got "
            f"{type(hierarchy).__name__}: {hierarchy!r:.200}."
        )
    second = _second_moments(params, variance)
    sums = jax.tree.leaves(gsm.row_sums(second, hierarchy))
    sizes = jax.tree.leaves(gsm.row_sizes(params, hierarchy))
    return list(zip(sums, sizes, strict=True))


def kl_log_uniform(log_alpha: ArrayLike) -> jax.Array:
    """KL(q ‖ log-uniform prior) per entry, as a function of log α (Molchanov et al., 2017).

    For q = N(θ, α θ²) and the log-uniform prior, up to the prior's infinite constant,

        KL ≈ k1 − k1 σ(k2 + k3 log α) + ½ log(1 + 1/α)
           = k1 σ(−k2 − k3 log α) + ½ softplus(−log α),

    k1 = 0.63576, k2 = 1.87320, k3 = 1.48695: within 0.01 of the exact α-dependent part for
    every α, and → 0 as α → ∞. The second form has no cancellation (k1 − k1 σ(·) is computed
    as k1 σ(−·)), so it keeps its relative precision as KL → 0, and it is finite, with a finite
    gradient, for any finite log α (checked over [-20, 20]); for α → 0 it grows like
    k1 − ½ log α.

    Args:
        log_alpha: log α, any shape (±∞ give the limits 0 and ∞).

    Returns:
        the KL of every entry, same shape (float).

    Raises:
        TypeError: ``log_alpha`` is not a number or an array of them.
        ValueError: ``log_alpha`` holds NaN (checked where concrete).

    Example:
        >>> import jax.numpy as jnp, bayesnoise as bn
        >>> [round(float(k), 4) for k in bn.penalties.kl_log_uniform(jnp.array([-4.0, 0.0, 8.0]))]
        [2.6342, 0.4312, 0.0002]
    """
    la = _array("log_alpha", log_alpha)
    if _check.concrete(la):
        with jax.ensure_compile_time_eval():  # la may be a constant closed over under jit
            n_nan = int(jnp.sum(jnp.isnan(la)))
        if n_nan:
            raise ValueError(
                f"log_alpha must be a number or an array of them, none NaN; got {n_nan} NaN "
                f"entries of {la.size}."
            )
    if not jnp.issubdtype(la.dtype, jnp.floating):
        la = la.astype(jnp.result_type(float))
    return K1 * jax.nn.sigmoid(-(K2 + K3 * la)) + 0.5 * jax.nn.softplus(-la)


def learned_noise_kl(params: PyTree) -> jax.Array:
    """The total KL of a learned-noise model to the log-uniform prior: Σ kl_log_uniform(log α).

    One term per weight for per-weight noise (log α = log σ² − log(θ² + 1e-8)), one term per
    row for row noise (the row's ξ ~ N(1, α_j) scales all its weights). The layers are found
    by :func:`bayesnoise.nn.learned_layers` (``log_alpha`` / ``log_sigma2`` leaves beside a
    ``kernel``), in linen variables or an NNX state.

    Args:
        params: the params of a model from :func:`bayesnoise.nn.learned_noise` or
            :func:`bayesnoise.nn.add_learned_noise`.

    Returns:
        a scalar.

    Raises:
        ValueError: ``params`` hold no learned noise (or a malformed noise leaf).
    """
    layers = bnn.learned_layers(params, require=True)
    return sum((jnp.sum(kl_log_uniform(layer.log_alpha)) for layer in layers), jnp.zeros(()))
