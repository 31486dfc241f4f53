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
from collections.abc import Iterable, Mapping
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from scipy import special

from bayesnoise import _check

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
    "check_patterns",
    "resolve",
]


def _distributions():
    """numpyro.distributions, imported on first use (numpyro loads tqdm on import)."""
    import numpyro.distributions

    return numpyro.distributions


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_param(cls: str, name: str, value: Any, **bounds: Any) -> None:
    """Checks one parameter of a noise: a finite real number (a scalar) within ``bounds`` (the
    keywords of :func:`bayesnoise._check.number`); a traced value passes unchecked."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 1e308:
        digits = str(abs(value))
        raise ValueError(
            f"{cls}: {name} must be a finite number, got an int too large for a float "
            f"({'-' if value < 0 else ''}{digits[:4]}... with {len(digits)} digits)."
        )
    try:
        _check.number(name, value, **bounds)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{cls}: {e}") from None
    if _check.concrete(value) and abs(float(value)) > _FLOAT32_MAX:
        raise ValueError(
            f"{cls}: {name} must be a finite number of float32 range (|{name}| <= 3.4e38: the "
            f"draws are float32), got {value!r}."
        )


def _check_positive(cls: str, name: str, value: Any) -> None:
    _check_param(cls, name, value, lo=0.0, lo_open=True)


def _draw_args(key: Any, shape: Any) -> tuple[int, ...]:
    """Checks the key and shape of a draw; returns the shape as a tuple."""
    _check.key("key", key)
    return _check.shape("shape", shape)


def _check_x(x: Any) -> None:
    """Checks the argument of ``log_prob``: real numbers (or bools), any shape."""
    if not _check.concrete(x):
        return
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        if x is None or isinstance(x, (str, bytes)):
            dtype = np.dtype(object)
        else:
            try:
                dtype = np.asarray(x).dtype
            except Exception:  # an object NumPy cannot read as an array
                dtype = np.dtype(object)
    if np.dtype(dtype).kind not in "biuf":
        raise TypeError(
            f"x must be a real number or an array of them (the values of λ), got {x!r}."
        )


def require_continuous(noise: Noise, what: str) -> None:
    """Raises a ValueError unless ``noise`` has a density (is continuous)."""
    if not getattr(noise, "continuous", False):
        raise ValueError(
            f"{what} needs a continuous noise (Gaussian, Beta, Gamma, LogNormal or "
            f"InverseGammaScale), got {noise!r}, which is discrete."
        )


class Noise:
    """Base class of the noise distributions. Subclasses define ``dist`` and the moments, and
    name in ``_positive`` the parameters that must be finite numbers > 0 and in ``_finite`` those
    that must be finite numbers (checked on construction)."""

    continuous: bool = True
    _positive: tuple[str, ...] = ()
    _finite: tuple[str, ...] = ()
    _numpyro: str | None = None  # the numpyro distribution taking the fields in order, if any

    def __post_init__(self):
        for name in self._finite:
            _check_param(type(self).__name__, name, getattr(self, name))
        for name in self._positive:
            _check_positive(type(self).__name__, name, getattr(self, name))

    @property
    def dist(self) -> Any:
        """The numpyro distribution of λ."""
        if self._numpyro is None:
            raise NotImplementedError
        cls = getattr(_distributions(), self._numpyro)
        return cls(*(getattr(self, f.name) for f in dataclasses.fields(self)))

    def sample(self, key: jax.Array | None = None, shape: tuple[int, ...] | int = ()) -> jax.Array:
        """Draws λ of the given shape, i.i.d., as float32.

        Args:
            key: a PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``); required.
            shape: the shape of the draw, a tuple of ints >= 0 (an int n means ``(n,)``).

        Raises:
            TypeError: ``key`` is missing or not a single PRNG key, or ``shape`` is not a tuple
                of ints.
            ValueError: a dimension of ``shape`` is negative.
        """
        shape = _draw_args(key, shape)
        return jnp.asarray(self.dist.sample(key, shape), jnp.float32)

    def rsample(self, key: jax.Array | None = None, shape: tuple[int, ...] | int = ()) -> jax.Array:
        """A reparameterised draw of λ: differentiable in the noise's parameters.

        Use it to learn a noise level by gradient (e.g. Gaussian α, as in variational dropout).
        ``key`` and ``shape`` are as in :meth:`sample`.

        Raises:
            ValueError: the noise is not continuous (Bernoulli draws have no such gradient), or
                a dimension of ``shape`` is negative.
            TypeError: as :meth:`sample`.
        """
        require_continuous(self, "a reparameterised draw (rsample)")
        shape = _draw_args(key, shape)
        return jnp.asarray(self.dist.rsample(key, shape), jnp.float32)

    def log_prob(self, x: ArrayLike) -> jax.Array:
        """Log density (or log mass, for a discrete noise) of λ at ``x``.

        Raises:
            TypeError: ``x`` is not a real number or an array of them (its values are not
                checked).
        """
        _check_x(x)
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
        keep: probability of keeping a unit, a number in (0, 1].

    Raises:
        ValueError: if ``keep`` is NaN or outside (0, 1].
        TypeError: if ``keep`` is not a real number (a string, None, a bool, an array).
    """

    keep: float = 0.5
    continuous = False

    def __post_init__(self):
        _check_param("Bernoulli", "keep", self.keep, lo=0.0, hi=1.0, lo_open=True)

    @property
    def dist(self):
        return _distributions().Bernoulli(probs=self.keep)

    def sample(self, key=None, shape=()):
        shape = _draw_args(key, shape)
        return jax.random.bernoulli(key, self.keep, shape).astype(jnp.float32)

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
        alpha: the variance of λ, a finite number > 0.

    Raises:
        ValueError: ``alpha`` is not finite or not > 0.
        TypeError: ``alpha`` is not a real number.
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
        a: first concentration, a finite number > 0.
        b: second concentration, a finite number > 0.

    Raises:
        ValueError: ``a`` or ``b`` is not finite or not > 0.
        TypeError: ``a`` or ``b`` is not a real number.
    """

    a: float = 1.0
    b: float = 1.0
    _positive = ("a", "b")
    _numpyro = "Beta"

    def sample(self, key=None, shape=()):
        # Exact inverse-CDF draws when one concentration is 1 (far cheaper than gamma draws):
        # Beta(a, 1) has CDF x^a, Beta(1, b) has CDF 1 − (1 − x)^b.
        shape = _draw_args(key, shape)
        if _check.concrete(self.a) and _check.concrete(self.b):
            if float(self.b) == 1.0:
                u = jax.random.uniform(key, shape, jnp.float32)
                return u ** (1.0 / self.a)
            if float(self.a) == 1.0:
                u = jax.random.uniform(key, shape, jnp.float32)
                return 1.0 - u ** (1.0 / self.b)
        return super().sample(key, shape)

    def log_prob(self, x):
        # numpyro clips x into the support; be exact at and outside the boundary instead.
        _check_x(x)
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

    ``Gamma(c, c)`` has mean 1 and variance 1/c.

    Args:
        concentration: the shape, a finite number > 0.
        rate: the inverse scale, a finite number > 0.

    Raises:
        ValueError: a parameter is not finite or not > 0.
        TypeError: a parameter is not a real number.
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
        loc: mean of log λ, a finite number.
        scale: standard deviation of log λ, a finite number > 0.

    Raises:
        ValueError: ``loc`` is not finite, or ``scale`` is not finite or not > 0.
        TypeError: a parameter is not a real number.
    """

    loc: float = 0.0
    scale: float = 1.0
    _positive = ("scale",)
    _finite = ("loc",)
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
        a: shape of the inverse gamma on λ², a finite number > 0.
        b: scale of the inverse gamma on λ², a finite number > 0.

    Raises:
        ValueError: ``a`` or ``b`` is not finite or not > 0.
        TypeError: ``a`` or ``b`` is not a real number.
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
    """Raises unless ``spec`` is a noise or a non-empty mapping {path regex: noise}.

    Raises:
        TypeError: not a noise, a key that is not a string, or a value that is not a noise.
        ValueError: an empty mapping, or a key that is not a valid regular expression.
    """
    if isinstance(spec, Mapping):
        if not spec:
            raise ValueError(
                "the noise mapping is empty; allowed: a noise, or a mapping with at least one "
                "pattern -> noise."
            )
        for pattern, noise in spec.items():
            if not isinstance(pattern, str):
                raise TypeError(
                    f"the noise mapping's key {pattern!r} must be a string (a regex searched in "
                    f"the kernel paths), got a {type(pattern).__name__}."
                )
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(
                    f"the noise mapping's key {pattern!r} is not a valid regular expression "
                    f"({e}); allowed: a regex searched in the kernel paths."
                ) from None
            check_noise(noise, f"noise for pattern {pattern!r}")
    else:
        check_noise(spec)


def check_patterns(spec: NoiseSpec, paths: Iterable[str]) -> None:
    """Raises when a key of a noise mapping matches none of ``paths`` (the kernel paths of the
    layers that can be noised): a pattern that matches no layer is a mistake, not a no-op.

    Raises:
        ValueError: naming the key and the paths it could have matched.
    """
    if not isinstance(spec, Mapping):
        return
    paths = list(paths)
    for pattern in spec:
        if not any(re.search(pattern, p) for p in paths):
            shown = ", ".join(paths[:12]) + (" ..." if len(paths) > 12 else "")
            raise ValueError(
                f"the noise mapping's key {pattern!r} matches no layer; allowed: a regex found in "
                f"one of the kernel paths: {shown or 'none (no layer can be noised)'}."
            )


def resolve(spec: NoiseSpec, path: str) -> Noise | None:
    """The noise a spec gives the kernel at ``path``, or None when the spec does not cover it.

    Raises:
        TypeError, ValueError: ``spec`` is not a noise or a mapping {path regex: noise} (see
            :func:`check_spec`), or ``path`` is not a string.
    """
    if isinstance(spec, Noise):
        return spec
    if not isinstance(spec, Mapping):
        check_spec(spec)
    if not isinstance(path, str):
        raise TypeError(f"path must be a string such as 'Dense_0/kernel', got {path!r}.")
    for pattern, noise in spec.items():
        if re.search(pattern, path):
            return noise
    return None
