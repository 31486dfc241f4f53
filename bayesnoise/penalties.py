"""Closed-form penalties that multiplicative noise induces.

Noise λ on the inputs, drawn per example and per input unit, with E[λ] = m and Var[λ] = s².

* Linear regression (the paper's eq. 4, with the ½ its first term lacks): for the loss
  ½ Σ_i (y_i − Σ_j x_ij λ_ij w_j)², the expectation over λ is exactly
  ½ Σ_i (y_i − m x_i·w)² + ½ s² Σ_j w_j² Σ_i x_ij².
* Logistic regression (eq. 5, a second-order approximation; Wager et al., 2013): with
  A(η) = log(1 + e^η) and η̃_i = Σ_j λ_ij x_ij w_j + b, E[A(η̃)] ≈ A(E η̃) + ½ A''(E η̃) Var η̃,
  so the penalty is ½ s² Σ_i p_i (1 − p_i) Σ_j x_ij² w_j², p_i = σ(m x_i·w + b).
* Type-II maximum likelihood (eq. 14): −log p(V | Λ̂) with Λ̂ the M-step's estimate from V itself,
  λ̂_j² = ‖v_j‖² / (σ0² d_j). Then Σ_k v_jk² / (2 σ0² λ̂_j²) = d_j / 2 and σ0 cancels:
  −log p(V | Λ̂) = Σ_j (d_j / 2) [1 + log(2π ‖v_j‖² / d_j)].
  Eq. 15 drops the constants: Σ_j (d_j / 2) log ‖v_j‖², a log group-norm penalty that pulls
  small rows to zero and leaves large rows nearly free ("sparse or robust").
  Eq. 16 writes it in the unidentifiable coordinates v_j = λ_j w_j:
  Σ_j d_j (log λ_j + log ‖w_j‖).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from bayesnoise import gsm
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
]


def _moments(noise: Noise | float, mean: float | None = None) -> tuple[float, float]:
    if isinstance(noise, Noise):
        return noise.mean, noise.variance
    if not isinstance(noise, jax.core.Tracer) and float(noise) < 0:
        raise ValueError(f"the noise variance must be >= 0, got {noise!r}.")
    return (1.0 if mean is None else mean), noise


def _row_energy(w: jax.Array) -> jax.Array:
    """Σ over output columns of w²: one value per input row."""
    w = jnp.asarray(w)
    return w**2 if w.ndim == 1 else jnp.sum(w**2, axis=tuple(range(1, w.ndim)))


def linear_regression(w: ArrayLike, x: ArrayLike, noise: Noise | float) -> jax.Array:
    """½ Var[λ] Σ_j ‖w_j‖² Σ_i x_ij²: the penalty noise adds to a squared loss (eq. 4).

    Args:
        w: weights (d,) or (d, k).
        x: inputs (n, d).
        noise: a noise distribution, or its variance.
    """
    _, s2 = _moments(noise)
    x = jnp.asarray(x)
    return 0.5 * s2 * jnp.sum(_row_energy(w) * jnp.sum(x**2, axis=0))


def expected_linear_loss(
    w: ArrayLike, x: ArrayLike, y: ArrayLike, noise: Noise | float, mean: float | None = None
) -> jax.Array:
    """E_λ[½ Σ_i ‖y_i − (λ_i ⊙ x_i) w‖²] in closed form: the clean loss at m·w plus eq. 4."""
    m, _ = _moments(noise, mean)
    resid = jnp.asarray(y) - m * (jnp.asarray(x) @ jnp.asarray(w))
    return 0.5 * jnp.sum(resid**2) + linear_regression(w, x, noise)


def logistic_regression(
    w: ArrayLike, x: ArrayLike, noise: Noise | float, b: ArrayLike = 0.0, mean: float | None = None
) -> jax.Array:
    """½ Var[λ] Σ_i p_i (1 − p_i) Σ_j x_ij² w_j²: the second-order penalty (eq. 5).

    Args:
        w: weights (d,).
        x: inputs (n, d).
        noise: a noise distribution, or its variance (then ``mean`` defaults to 1).
        b: bias (not noised).
    """
    m, s2 = _moments(noise, mean)
    x, w = jnp.asarray(x), jnp.asarray(w)
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
    """Σ_i [A(η_i) − y_i η_i] at η = m x·w + b, plus eq. 5: ≈ E_λ of the noisy logistic loss."""
    m, _ = _moments(noise, mean)
    eta = m * (jnp.asarray(x) @ jnp.asarray(w)) + b
    clean = jnp.sum(jax.nn.softplus(eta) - jnp.asarray(y) * eta)
    return clean + logistic_regression(w, x, noise, b, mean)


def ml2_neg_log_prior(v_params: PyTree, hierarchy: gsm.Hierarchy) -> jax.Array:
    """Eq. 14: −log p(V | Λ̂) = Σ_j (d_j / 2) [1 + log(2π ‖v_j‖² / d_j)] over noised rows.

    Λ̂ is the M-step estimate λ̂_j² = ‖v_j‖² / (σ0² d_j) computed from V itself; σ0 cancels.
    """
    total = jnp.zeros(())
    for energy, d in _rows(v_params, hierarchy):
        total = total + jnp.sum(0.5 * d * (1.0 + jnp.log(2 * math.pi * energy / d)))
    return total


def log_norm(v_params: PyTree, hierarchy: gsm.Hierarchy) -> jax.Array:
    """Eq. 15: Σ_j (d_j / 2) log ‖v_j‖², eq. 14 without its constants."""
    total = jnp.zeros(())
    for energy, d in _rows(v_params, hierarchy):
        total = total + jnp.sum(0.5 * d * jnp.log(energy))
    return total


def log_norm_unidentifiable(w_params: PyTree, hierarchy: gsm.Hierarchy) -> jax.Array:
    """Eq. 16: Σ_j d_j (log λ_j + log ‖w_j‖), eq. 15 with v_j = λ_j w_j (λ from the hierarchy)."""
    total = jnp.zeros(())
    lam = jax.tree.leaves(hierarchy.scales)
    for (energy, d), s in zip(_rows(w_params, hierarchy), lam):
        total = total + jnp.sum(d * (jnp.log(jnp.abs(s)) + 0.5 * jnp.log(energy)))
    return total


def _rows(params: PyTree, hierarchy: gsm.Hierarchy):
    """(‖row‖², d) for every noised leaf, in flattening order."""
    energies = jax.tree.leaves(gsm.row_sums(jax.tree.map(jnp.square, params), hierarchy))
    sizes = jax.tree.leaves(gsm.row_sizes(params, hierarchy))
    return list(zip(energies, sizes))
