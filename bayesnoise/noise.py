"""Multiplicative noise distributions.

A noise distribution p(λ) scales the inputs of a layer: h_l = f(h_{l-1} Λ W), Λ = diag(λ). With a
Gaussian prior w ~ N(0, σ0²) on the weights, λw is a Gaussian scale mixture whose mixing variable
is λ (see :mod:`bayesnoise.gsm`).

Every distribution here is a small frozen dataclass around a ``numpyro.distributions`` object:
hashable (so it can be a Flax module attribute or a static argument of ``jax.jit``), with

* ``sample(key, shape)``: i.i.d. draws of λ, float32;
* ``mean`` = E[λ], ``variance`` = Var[λ], ``second_moment`` = E[λ²];
* ``rsample(key, shape)``: reparameterised draws (continuous noises only);
* ``log_prob(x)``: log density (continuous) or log mass (Bernoulli) of λ;
* ``continuous``: whether λ has a density;
* ``scale_factor``: the factor the weight-scaling inference rule folds into a noised row (E[λ]).

Example:
    >>> import jax, bayesnoise as bn
    >>> noise = bn.noise.Bernoulli(keep=0.8)
    >>> noise.mean, noise.variance
    (0.8, 0.16...)
    >>> noise.sample(jax.random.key(0), (3,)).shape
    (3,)
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from scipy import special

__all__ = [
    "Noise",
    "Bernoulli",
    "Gaussian",
    "Beta",
    "Gamma",
    "LogNormal",
    "InverseGammaScale",
    "require_continuous",
    "NoiseSpec",
    "check_noise",
    "check_spec",
    "resolve",
]


def _distributions():
    """numpyro.distributions, imported on first use (numpyro loads tqdm on import)."""
    import numpyro.distributions

    return numpyro.distributions


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_positive(cls: str, name: str, value: Any) -> None:
    if _is_concrete(value) and not np.all(np.asarray(value) > 0):
        raise ValueError(f"{cls}: {name} must be > 0, got {name}={value!r}.")


def require_continuous(noise: Noise, what: str) -> None:
    """Raises a ValueError unless ``noise`` has a density (is continuous)."""
    if not getattr(noise, "continuous", False):
        raise ValueError(
            f"{what} needs a continuous noise (Gaussian, Beta, Gamma, LogNormal or "
            f"InverseGammaScale), got {noise!r}, which is discrete."
        )


class Noise:
    """Base class of the noise distributions. Subclasses define ``dist`` and the moments, and
    name in ``_positive`` the parameters that must be > 0 (checked on construction)."""

    continuous: bool = True
    _positive: tuple[str, ...] = ()
    _numpyro: str | None = None  # the numpyro distribution taking the fields in order, if any

    def __post_init__(self):
        for name in self._positive:
            _check_positive(type(self).__name__, name, getattr(self, name))

    @property
    def dist(self) -> Any:
        """The numpyro distribution of λ."""
        if self._numpyro is None:
            raise NotImplementedError
        cls = getattr(_distributions(), self._numpyro)
        return cls(*(getattr(self, f.name) for f in dataclasses.fields(self)))

    def sample(self, key: jax.Array, shape: tuple[int, ...] = ()) -> jax.Array:
        """Draws λ of the given shape, i.i.d., as float32."""
        return jnp.asarray(self.dist.sample(key, tuple(shape)), jnp.float32)

    def rsample(self, key: jax.Array, shape: tuple[int, ...] = ()) -> jax.Array:
        """A reparameterised draw of λ: differentiable in the noise's parameters.

        Use it to learn a noise level by gradient (e.g. Gaussian α, as in variational dropout).

        Raises:
            ValueError: the noise is not continuous (Bernoulli draws have no such gradient).
        """
        require_continuous(self, "a reparameterised draw (rsample)")
        return jnp.asarray(self.dist.rsample(key, tuple(shape)), jnp.float32)

    def log_prob(self, x: ArrayLike) -> jax.Array:
        """Log density (or log mass, for a discrete noise) of λ at ``x``."""
        return self.dist.log_prob(jnp.asarray(x, jnp.float32))

    @property
    def mean(self) -> float:
        """E[λ]."""
        raise NotImplementedError

    @property
    def variance(self) -> float:
        """Var[λ]."""
        raise NotImplementedError

    @property
    def second_moment(self) -> float:
        """E[λ²] = Var[λ] + E[λ]²."""
        return self.variance + self.mean**2

    @property
    def scale_factor(self) -> float:
        """The factor by which the weight-scaling rule multiplies a noised row: E[λ]."""
        return self.mean


@dataclasses.dataclass(frozen=True)
class Bernoulli(Noise):
    """Dropout noise: λ = 1 with probability ``keep``, else 0.

    Mean ``keep``, variance ``keep (1 − keep)``. With a Gaussian prior on the weights, λw has the
    spike-and-slab marginal (1 − keep) δ_0 + keep N(0, σ0²).

    Args:
        keep: probability of keeping a unit, in (0, 1].

    Raises:
        ValueError: if ``keep`` is outside (0, 1].
    """

    keep: float = 0.5
    continuous = False

    def __post_init__(self):
        if _is_concrete(self.keep) and not (0.0 < float(self.keep) <= 1.0):
            raise ValueError(
                f"Bernoulli: keep must be in (0, 1] (the probability of keeping a unit), "
                f"got keep={self.keep!r}."
            )

    @property
    def dist(self):
        return _distributions().Bernoulli(probs=self.keep)

    def sample(self, key, shape=()):
        return jax.random.bernoulli(key, self.keep, tuple(shape)).astype(jnp.float32)

    @property
    def mean(self):
        return self.keep

    @property
    def variance(self):
        return self.keep * (1.0 - self.keep)


@dataclasses.dataclass(frozen=True)
class Gaussian(Noise):
    """Gaussian multiplicative noise λ ~ N(1, alpha) (Srivastava et al., 2014, section 10).

    ``alpha = (1 − p) / p`` matches the variance of inverted dropout with keep rate p.

    Args:
        alpha: the variance of λ, > 0.
    """

    alpha: float = 1.0
    _positive = ("alpha",)

    @property
    def dist(self):
        return _distributions().Normal(1.0, jnp.sqrt(self.alpha))

    @property
    def mean(self):
        return 1.0

    @property
    def variance(self):
        return self.alpha


@dataclasses.dataclass(frozen=True)
class Beta(Noise):
    """Beta noise λ ~ Beta(a, b) on (0, 1): mean a/(a+b), variance ab/((a+b)²(a+b+1)).

    Args:
        a: first concentration, > 0.
        b: second concentration, > 0.
    """

    a: float = 1.0
    b: float = 1.0
    _positive = ("a", "b")
    _numpyro = "Beta"

    def sample(self, key, shape=()):
        # Exact inverse-CDF draws when one concentration is 1 (far cheaper than gamma draws):
        # Beta(a, 1) has CDF x^a, Beta(1, b) has CDF 1 − (1 − x)^b.
        if _is_concrete(self.a) and _is_concrete(self.b):
            if float(self.b) == 1.0:
                u = jax.random.uniform(key, tuple(shape), jnp.float32)
                return u ** (1.0 / self.a)
            if float(self.a) == 1.0:
                u = jax.random.uniform(key, tuple(shape), jnp.float32)
                return 1.0 - u ** (1.0 / self.b)
        return super().sample(key, shape)

    def log_prob(self, x):
        # numpyro clips x into the support; be exact at and outside the boundary instead.
        x = jnp.asarray(x, jnp.float32)
        inside = (x > 0) & (x < 1)
        lp = self.dist.log_prob(jnp.where(inside, x, 0.5))
        return jnp.where(inside, lp, -jnp.inf)

    @property
    def mean(self):
        return self.a / (self.a + self.b)

    @property
    def variance(self):
        s = self.a + self.b
        return self.a * self.b / (s**2 * (s + 1.0))


@dataclasses.dataclass(frozen=True)
class Gamma(Noise):
    """Gamma noise λ ~ Gamma(concentration, rate): mean c/r, variance c/r².

    ``Gamma(c, c)`` has mean 1 and variance 1/c. Both parameters must be > 0: the
    concentration (shape) and the rate (inverse scale).
    """

    _numpyro = "Gamma"
    _positive = ("concentration", "rate")
    concentration: float = 1.0
    rate: float = 1.0

    @property
    def mean(self):
        return self.concentration / self.rate

    @property
    def variance(self):
        return self.concentration / self.rate**2


@dataclasses.dataclass(frozen=True)
class LogNormal(Noise):
    """Log-normal noise: log λ ~ N(loc, scale²). Mean exp(loc + scale²/2).

    ``LogNormal(-s²/2, s)`` has mean 1 and variance exp(s²) − 1.

    Args:
        loc: mean of log λ.
        scale: standard deviation of log λ, > 0.
    """

    loc: float = 0.0
    scale: float = 1.0
    _positive = ("scale",)
    _numpyro = "LogNormal"

    @property
    def mean(self):
        return math.exp(self.loc + self.scale**2 / 2)

    @property
    def variance(self):
        s2 = self.scale**2
        return (math.exp(s2) - 1.0) * math.exp(2 * self.loc + s2)


@dataclasses.dataclass(frozen=True)
class InverseGammaScale(Noise):
    """A scale whose square is inverse gamma: λ = √s, s ~ InverseGamma(a, b).

    With w ~ N(0, σ0²), λw is Student-t with 2a degrees of freedom and scale σ0 √(b/a).
    E[λ] = √b Γ(a − ½)/Γ(a) (finite for a > ½), E[λ²] = b/(a − 1) (finite for a > 1).

    Args:
        a: shape of the inverse gamma on λ², > 0.
        b: scale of the inverse gamma on λ², > 0.
    """

    a: float = 2.0
    b: float = 1.0
    _positive = ("a", "b")

    @property
    def dist(self):
        d = _distributions()
        return d.TransformedDistribution(
            d.InverseGamma(self.a, self.b), d.transforms.PowerTransform(0.5)
        )

    @property
    def mean(self):
        if self.a <= 0.5:
            return math.inf
        return math.sqrt(self.b) * math.exp(special.gammaln(self.a - 0.5) - special.gammaln(self.a))

    @property
    def second_moment(self):
        return math.inf if self.a <= 1 else self.b / (self.a - 1.0)

    @property
    def variance(self):
        return self.second_moment - self.mean**2

    @property
    def student_t(self) -> tuple[float, float]:
        """(degrees of freedom, scale / σ0) of the Student-t marginal of λw."""
        return 2.0 * self.a, math.sqrt(self.b / self.a)


# ------------------------------------------------------------------ noise for many layers

# A noise for every selected layer, or a mapping from a regular expression on the kernel's path
# (e.g. "Dense_0/kernel") to a noise: the first pattern found in the path wins.
NoiseSpec = Union[Noise, Mapping[str, Noise]]


def check_noise(noise: Any, what: str = "noise") -> None:
    """Raises a TypeError unless ``noise`` is a bayesnoise noise distribution."""
    if not isinstance(noise, Noise):
        raise TypeError(
            f"{what} must be a bayesnoise.noise distribution (Bernoulli, Gaussian, Beta, ...), "
            f"got {type(noise).__name__}: {noise!r}."
        )


def check_spec(spec: Any) -> None:
    """Raises unless ``spec`` is a noise or a non-empty mapping {path regex: noise}."""
    if isinstance(spec, Mapping):
        if not spec:
            raise ValueError("the noise mapping is empty: give at least one pattern -> noise.")
        for pattern, noise in spec.items():
            check_noise(noise, f"noise for pattern {pattern!r}")
    else:
        check_noise(spec)


def resolve(spec: NoiseSpec, path: str) -> Noise | None:
    """The noise a spec gives the kernel at ``path``, or None when the spec does not cover it."""
    if isinstance(spec, Noise):
        return spec
    for pattern, noise in spec.items():
        if re.search(pattern, path):
            return noise
    return None
