"""Soft-target distillation (Hinton, Vinyals & Dean, 2015): the small-network baseline for pruning.

A pruned network keeping K weights is compared with a dense student of the same depth and K
weights, trained on the teacher's softened outputs. :func:`student_sizes` sizes the student;
:func:`soft_target_loss` is its loss.

With student logits z, teacher logits t and temperature T, write q = softmax(z / T) and
p = softmax(t / T). The soft-target term is T² · KL(p ‖ q) per example, whose gradient with
respect to z is T · (q − p): the T² keeps its size comparable to the hard-label term as T
changes. KL(p ‖ q) and the cross-entropy −Σ p log q differ by the teacher's entropy, a
constant, so they share this gradient; KL is used so that the loss is 0 when the student
matches the teacher.

Example:
    >>> from bayesnoise import distill
    >>> distill.student_sizes((784, 400, 400, 10), 100_000)
    (784, 111, 111, 10)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.special import xlogy
from jax.typing import ArrayLike

from bayesnoise import _check

__all__ = ["student_sizes", "weight_count", "soft_target_loss"]


def _sizes(layer_sizes: Any, least: int) -> list[int]:
    """``layer_sizes`` as a list of at least ``least`` ints >= 1."""
    allowed = f"a sequence of at least {least} ints >= 1 (input, hidden..., output)"
    if isinstance(layer_sizes, (str, bytes)) or not isinstance(layer_sizes, Sequence):
        if not isinstance(layer_sizes, np.ndarray):
            raise TypeError(f"layer_sizes must be {allowed}, got {layer_sizes!r}.")
    reals = (int, float, np.integer, np.floating)
    if not all(isinstance(d, reals) and not isinstance(d, (bool, np.bool_)) for d in layer_sizes):
        raise TypeError(f"layer_sizes must be {allowed}, got {tuple(layer_sizes)!r}.")
    if not all(math.isfinite(d) and d == int(d) and d >= 1 for d in layer_sizes):
        raise ValueError(f"layer_sizes must be {allowed}, got {tuple(layer_sizes)!r}.")
    sizes = [int(d) for d in layer_sizes]
    if len(sizes) < least:
        what = "input, hidden..., output" if least == 3 else "input, then any hidden, output"
        raise ValueError(
            f"layer_sizes needs at least {least} sizes ({what}); got {tuple(sizes)!r}."
        )
    return sizes


def _logits(name: str, v: Any) -> jax.Array:
    return _check.array(name, v, "an array of logits, shape (..., classes)")


def weight_count(layer_sizes: Sequence[int], *, biases: bool = False) -> int:
    """The number of weights of a fully connected network: Σ_l d_{l−1} d_l (+ Σ_l d_l).

    Raises:
        TypeError: ``layer_sizes`` is not a sequence of ints.
        ValueError: fewer than two sizes (an input and an output), or a size < 1.
    """
    sizes = _sizes(layer_sizes, 2)
    count = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    return count + (sum(sizes[1:]) if biases else 0)


def student_sizes(
    layer_sizes: Sequence[int], num_weights: int, *, biases: bool = False
) -> tuple[int, ...]:
    """Layer sizes of a network as deep as ``layer_sizes`` with about ``num_weights`` weights.

    The student keeps the input size d_in, the output size d_out and the number H ≥ 1 of hidden
    layers, and gives every hidden layer the same width h, so its weight count is

        W(h) = d_in h + (H − 1) h² + h d_out            (+ H h + d_out with ``biases``)

    and h is the integer ≥ 1 minimising |W(h) − num_weights| (ties to the smaller h), from the
    positive root of W(h) = num_weights. By default biases do not count, matching
    :func:`bayesnoise.prune.mask`, which prunes kernels only.

    Args:
        layer_sizes: the teacher's sizes (d_in, d_1, ..., d_H, d_out); only d_in, d_out and H
            are used.
        num_weights: the weight budget, e.g. the kept weights of a pruned teacher.
        biases: whether biases count towards the budget.

    Returns:
        (d_in, h, ..., h, d_out), as long as ``layer_sizes``.

    Raises:
        TypeError: ``layer_sizes`` is not a sequence of ints, or ``num_weights`` not a number.
        ValueError: if ``layer_sizes`` has no hidden layer or a size < 1, or ``num_weights`` is
            not a finite number >= 1.
    """
    sizes = _sizes(layer_sizes, 3)
    _check.number("num_weights", num_weights, lo=1)
    d_in, d_out, hidden = sizes[0], sizes[-1], len(sizes) - 2
    a = hidden - 1
    b = d_in + d_out + (hidden if biases else 0)
    c = (d_out if biases else 0) - num_weights

    def count(h: int) -> int:
        return a * h * h + b * h + c + num_weights

    root = -c / b if a == 0 else (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    base = math.floor(root)
    candidates = sorted({max(1, h) for h in range(base - 1, base + 3)})
    h = min(candidates, key=lambda h: (abs(count(h) - num_weights), h))
    return (d_in,) + (h,) * hidden + (d_out,)


def soft_target_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    temperature: float = 2.0,
    alpha: float = 0.0,
) -> jax.Array:
    """Hinton's distillation loss, averaged over examples.

        L = (1 − α) · T² · mean_i KL(softmax(t_i / T) ‖ softmax(z_i / T))
            + α · mean_i CE(y_i, softmax(z_i))

    The hard-label term uses temperature 1. The teacher's logits are held fixed
    (``stop_gradient``). With α = 0 and B examples, ∂L/∂z_i = T · (softmax(z_i / T) −
    softmax(t_i / T)) / B.

    Args:
        student_logits: z, shape (..., classes).
        teacher_logits: t, the same shape.
        labels: y, integer classes of shape (...) or probabilities of shape (..., classes);
            needed when α > 0.
        temperature: T > 0.
        alpha: the weight α in [0, 1] of the hard-label term.

    Returns:
        The scalar loss.

    Raises:
        ValueError: on T ≤ 0 or not finite, α outside [0, 1] or not finite, α > 0 without
            labels, unequal shapes, labels of another shape, or (where the labels are concrete)
            an integer label outside [0, classes).
        TypeError: T or α not a number, logits that are not arrays of numbers, or labels of
            shape (...) (classes) that are not integers.

    References:
        Hinton, Vinyals & Dean (2015), Distilling the Knowledge in a Neural Network.
    """
    z = _logits("student_logits", student_logits)
    t = jax.lax.stop_gradient(_logits("teacher_logits", teacher_logits))
    if z.shape != t.shape or z.ndim < 1:
        raise ValueError(
            f"student and teacher logits must have equal shapes (..., classes); got {z.shape} "
            f"and {t.shape}."
        )
    _check.positive("temperature", temperature)
    _check.number("alpha", alpha, lo=0.0, hi=1.0)
    if labels is None and (isinstance(alpha, jax.core.Tracer) or alpha > 0):
        raise ValueError(f"alpha={alpha!r} weights a hard-label term, so labels are needed.")
    log_q = jax.nn.log_softmax(z / temperature, axis=-1)
    p = jax.nn.softmax(t / temperature, axis=-1)
    kl = jnp.sum(xlogy(p, p) - p * log_q, axis=-1)
    loss = (1 - alpha) * temperature**2 * jnp.mean(kl)
    if labels is None:
        return loss
    y = jnp.asarray(labels)
    if y.shape == z.shape:
        hard = optax.softmax_cross_entropy(z, y)
    elif y.shape == z.shape[:-1]:
        if not jnp.issubdtype(y.dtype, jnp.integer):
            raise TypeError(
                f"labels of shape {y.shape} are classes and must be integers in [0, "
                f"{z.shape[-1]}), got dtype {y.dtype.name}."
            )
        if _check.concrete(y) and y.size:
            values = np.asarray(y)
            bad = (values < 0) | (values >= z.shape[-1])
            if bad.any():
                raise ValueError(
                    f"labels must be classes in [0, {z.shape[-1]}) for logits of "
                    f"{z.shape[-1]} classes; got a label {values[bad].flat[0]} "
                    f"({int(bad.sum())} of {values.size} out of range)."
                )
        hard = optax.softmax_cross_entropy_with_integer_labels(z, y)
    else:
        raise ValueError(
            f"labels must have shape {z.shape[:-1]} (classes) or {z.shape} (probabilities); got "
            f"{y.shape}."
        )
    return loss + alpha * jnp.mean(hard)
