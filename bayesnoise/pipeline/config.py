"""Typed, validated experiment configs: YAML in, frozen dataclasses out.

A config has a section per stage of the pipeline, each a frozen dataclass::

    name, out                      the run's name and output folder
    data    DataConfig             which data set, where, loader options
    model   ModelConfig            MLP hidden sizes and activation
    noise   NoiseConfig            multiplicative noise (and, optionally, input-layer noise)
    train   TrainConfig            training under noise
    sgld    SGLDConfig             posterior sampling: step size, temperature, chains
    em      EMConfig               type-II maximum likelihood of the noise scales
    prune   PruneConfig            pruning rules, fractions, scope, soft-target baseline
    eval    EvalConfig             metric, breakpoint tolerance, Monte Carlo samples

:func:`load_config` reads YAML (a file or an already parsed mapping), applies ``key=value``
overrides and validates everything: an unknown key at any level, a value of the wrong type or
out of range raises a :class:`ConfigError` (a ``ValueError``) whose message starts with the
dotted key (``train.batch_size: ...``) and says what is allowed. Omitted keys take the defaults
below, which describe a small run on scikit-learn's bundled digits. ``Config.to_dict()`` gives
the config as run, and ``load_config(cfg.to_dict()) == cfg``.

Numbers such as ``1e-3``, which YAML 1.1 (PyYAML) reads as strings, are accepted wherever a
float is expected. Integers must be written as integers.

Example:
    >>> from bayesnoise.pipeline.config import load_config
    >>> cfg = load_config({"train": {"epochs": 3}}, overrides=["noise.kind=gaussian"])
    >>> cfg.train.epochs, cfg.noise.kind, cfg.noise.alpha
    (3, 'gaussian', 1.0)
    >>> load_config({"train": {"epochs": 0}})
    Traceback (most recent call last):
    ...
    bayesnoise.pipeline.config.ConfigError: train.epochs: got 0; allowed: an int >= 1.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from bayesnoise import data as bdata
from bayesnoise import noise as bnoise

__all__ = [
    "ConfigError",
    "Config",
    "DataConfig",
    "ModelConfig",
    "NoiseConfig",
    "TrainConfig",
    "SGLDConfig",
    "PolynomialSchedule",
    "EMConfig",
    "HyperpriorConfig",
    "PruneConfig",
    "SoftTargetConfig",
    "EvalConfig",
    "load_config",
    "build_noise",
    "build_hyperprior",
]


class ConfigError(ValueError):
    """An invalid config. ``str(error)`` is ``"<dotted key>: <what is wrong and allowed>"``.

    Attributes:
        key: the dotted key of the bad entry, e.g. ``"train.batch_size"``.
        detail: what is wrong with it and what is allowed.
    """

    def __init__(self, key: str, detail: str):
        self.key = key
        self.detail = detail
        super().__init__(f"{key}: {detail}")

    def within(self, prefix: str) -> ConfigError:
        """The same error, its key under the section ``prefix``."""
        return ConfigError(f"{prefix}.{self.key}" if prefix else self.key, self.detail)


# ---------------------------------------------------------------------------------------------
# Field helpers: every field has a type (from its annotation) and optionally a range check.


def _field(default: Any = dataclasses.MISSING, allowed: str | None = None, check=None, **kw):
    """A dataclass field with a description of its allowed values and a range predicate."""
    return dataclasses.field(default=default, metadata={"allowed": allowed, "check": check}, **kw)


def _section(cls: type) -> Any:
    return dataclasses.field(default_factory=cls)


def _int(minimum: int, default: int | None) -> Any:
    return _field(default, f"an int >= {minimum}", lambda v: v >= minimum)


def _positive(default: float | None, what: str = "a number > 0") -> Any:
    return _field(default, what, lambda v: v > 0)


def _nonnegative(default: float | None, what: str = "a number >= 0") -> Any:
    return _field(default, what, lambda v: v >= 0)


_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is tuple:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with the keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    return {
        bool: "true or false",
        int: "an int",
        float: "a number",
        str: "a string",
        dict: "a mapping",
    }.get(tp, getattr(tp, "__name__", str(tp)))


def _type_error(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(key, f"got {value!r} ({type(value).__name__}); allowed: {allowed}.")


def _coerce(value: Any, tp: Any, key: str, allowed: str) -> Any:
    """``value`` checked against the type ``tp`` (lists become tuples, mappings dataclasses)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _type_error(key, value, allowed)
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key, allowed)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise ConfigError(key, f"got {value!r}; allowed: {', '.join(map(str, args))}.")
    if origin is tuple:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
            raise _type_error(key, value, allowed)
        element = args[0]
        element_allowed = _describe(element)
        return tuple(
            _coerce(v, element, f"{key}[{i}]", element_allowed) for i, v in enumerate(value)
        )
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:
            return tp()
        if isinstance(value, Mapping):
            try:
                return _from_mapping(tp, value)
            except ConfigError as e:
                raise e.within(key) from None
        raise _type_error(key, value, allowed)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            number = float(value)
        if number is not None and math.isfinite(number):
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict or origin is dict:
        if value is None:
            return {}
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            return dict(value)
    raise _type_error(key, value, allowed)


def _unknown_key(key: str, known: Iterable[str]) -> ConfigError:
    known = list(known)
    typed = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(typed, known, n=1)
    close = close or [k for k in known if typed and k.startswith(typed)][:1]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(key, f"unknown key{hint}; known keys here: {', '.join(known)}.")


def _from_mapping(cls: type, data: Mapping) -> Any:
    """``cls(**data)`` after checking the keys; errors carry keys relative to ``cls``."""
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            raise _unknown_key(str(k), names)
    return cls(**data)


def _plain(value: Any) -> Any:
    if isinstance(value, _Section):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class _Section:
    """Base of the config sections: checks and normalises every field on construction."""

    def __post_init__(self):
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            tp = hints[f.name]
            allowed = f.metadata.get("allowed") or _describe(tp)
            value = _coerce(getattr(self, f.name), tp, f.name, allowed)
            check = f.metadata.get("check")
            if check is not None and value is not None and not check(value):
                raise ConfigError(f.name, f"got {_plain(value)!r}; allowed: {allowed}.")
            object.__setattr__(self, f.name, value)
        self._validate()

    def _validate(self) -> None:
        """Checks that involve several fields; may fill in defaults that depend on others."""

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """The section as plain Python values (lists, dicts, numbers, strings, None)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


# ---------------------------------------------------------------------------------------------
# Distributions named in a config: noise kinds and EM hyperpriors.

# kind -> {parameter: default}; the constructor of every kind is in _DISTRIBUTIONS.
_PARAMETERS: dict[str, dict[str, float]] = {
    "none": {},
    "bernoulli": {"keep": 0.5},
    "gaussian": {"alpha": 1.0},
    "beta": {"a": 1.0, "b": 1.0},
    "gamma": {"concentration": 1.0, "rate": 1.0},
    "lognormal": {"loc": 0.0, "scale": 1.0},
    "inverse_gamma": {"a": 2.0, "b": 1.0},
}
_DISTRIBUTIONS: dict[str, Callable[..., bnoise.Noise]] = {
    "bernoulli": bnoise.Bernoulli,
    "gaussian": bnoise.Gaussian,
    "beta": bnoise.Beta,
    "gamma": bnoise.Gamma,
    "lognormal": bnoise.LogNormal,
    "inverse_gamma": bnoise.InverseGammaScale,
}
_PARAMETER_NAMES = ("keep", "alpha", "a", "b", "concentration", "rate", "loc", "scale")


def _check_distribution(section: _Section) -> None:
    """Fills in the kind's default parameters and rejects parameters of other kinds."""
    kind = section.kind
    takes = _PARAMETERS[kind]
    for f in dataclasses.fields(section):
        if f.name not in _PARAMETER_NAMES:
            continue
        value = getattr(section, f.name)
        if f.name in takes:
            if value is None:
                section._set(f.name, takes[f.name])
        elif value is not None:
            raise ConfigError(
                f.name,
                f"got {value!r}, but kind {kind} takes "
                f"{', '.join(takes) if takes else 'no parameters'}; allowed: null (omit it).",
            )


def _distribution_dict(section: _Section) -> dict[str, Any]:
    """``section.to_dict()`` without the parameters its kind does not take (all null)."""
    out = _Section.to_dict(section)
    return {k: v for k, v in out.items() if not (k in _PARAMETER_NAMES and v is None)}


def _distribution(section: Any) -> bnoise.Noise | None:
    if section.kind == "none":
        return None
    params = {name: getattr(section, name) for name in _PARAMETERS[section.kind]}
    return _DISTRIBUTIONS[section.kind](**params)


NoiseKind = Literal["bernoulli", "gaussian", "beta", "gamma", "lognormal", "none"]
HyperpriorKind = Literal["none", "inverse_gamma", "gamma", "lognormal", "beta"]


@dataclasses.dataclass(frozen=True)
class NoiseConfig(_Section):
    """Multiplicative noise λ on the inputs of every Dense layer.

    Only the parameters of ``kind`` may be set; omitted ones take the defaults of
    :mod:`bayesnoise.noise`: bernoulli ``keep`` 0.5; gaussian ``alpha`` 1 (the variance);
    beta ``a`` = ``b`` = 1; gamma ``concentration`` = ``rate`` = 1; lognormal ``loc`` 0,
    ``scale`` 1. An override of ``noise.kind`` drops the old kind's parameters.

    Attributes:
        kind: bernoulli, gaussian, beta, gamma, lognormal or none (no noise).
        keep, alpha, a, b, concentration, rate, loc, scale: the parameters of ``kind``.
        input: a separate noise for the input layer (``Dense_0``), as in Srivastava et al.
            (2014), itself a noise section without ``input`` (its kind none: no noise on the
            inputs); null: the input layer gets ``kind`` too.
    """

    kind: NoiseKind = "bernoulli"
    keep: float | None = _field(None, "a number in (0, 1] or null", lambda v: 0 < v <= 1)
    alpha: float | None = _positive(None, "a number > 0 or null")
    a: float | None = _positive(None, "a number > 0 or null")
    b: float | None = _positive(None, "a number > 0 or null")
    concentration: float | None = _positive(None, "a number > 0 or null")
    rate: float | None = _positive(None, "a number > 0 or null")
    loc: float | None = None
    scale: float | None = _positive(None, "a number > 0 or null")
    input: NoiseConfig | None = None

    def _validate(self):
        _check_distribution(self)
        if self.input is not None and self.input.input is not None:
            raise ConfigError(
                "input.input",
                "the input-layer noise cannot have an input noise of its own; allowed: null.",
            )

    def to_dict(self):
        return _distribution_dict(self)


@dataclasses.dataclass(frozen=True)
class HyperpriorConfig(_Section):
    """A hyperprior on the noise scales for the M-step (see :func:`bayesnoise.em.m_step`).

    Attributes:
        kind: none; inverse_gamma (on λ², closed-form M-step; defaults a 2, b 1); gamma,
            lognormal or beta (on λ, numerical M-step; defaults as for :class:`NoiseConfig`).
        a, b, concentration, rate, loc, scale: the parameters of ``kind``.
    """

    kind: HyperpriorKind = "none"
    a: float | None = _positive(None, "a number > 0 or null")
    b: float | None = _positive(None, "a number > 0 or null")
    concentration: float | None = _positive(None, "a number > 0 or null")
    rate: float | None = _positive(None, "a number > 0 or null")
    loc: float | None = None
    scale: float | None = _positive(None, "a number > 0 or null")

    def _validate(self):
        _check_distribution(self)

    def to_dict(self):
        return _distribution_dict(self)


# ---------------------------------------------------------------------------------------------
# Sections

# The names of bayesnoise.data.LOADERS.
DataName = Literal["digits", "breast_cancer", "diabetes", "mnist", "imdb", "msd"]


@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
    """The data set (see :func:`bayesnoise.data.load`).

    Attributes:
        name: digits, breast_cancer, diabetes, mnist, imdb or msd.
        path: the data's location for mnist, imdb and msd (null: their environment variable,
            or for mnist the cache); must be null for the bundled sets.
        options: further keyword arguments of the loader, e.g. ``test_fraction`` and ``seed``
            (bundled sets), ``num_words``, ``representation``, ``dense`` (imdb), ``num_train``
            (msd).
    """

    name: DataName = "digits"
    path: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def _validate(self):
        allowed = [o for o in bdata.loader_options(self.name) if o != "path"]
        if self.path is not None and "path" not in bdata.loader_options(self.name):
            raise ConfigError(
                "path",
                f"got {self.path!r}, but the {self.name} data set is bundled with scikit-learn "
                f"and takes no path; allowed: null.",
            )
        for k in self.options:
            if k not in allowed:
                raise _unknown_key(f"options.{k}", allowed)

    @property
    def task(self) -> str:
        """``"classification"`` or ``"regression"``."""
        return bdata.TASKS[self.name]

    def load(self) -> bdata.Dataset:
        """Loads the data set: ``bayesnoise.data.load(name, path=path, **options)``."""
        kwargs = dict(self.options)
        if self.path is not None:
            kwargs["path"] = self.path
        return bdata.load(self.name, **kwargs)


Activation = Literal["relu", "tanh", "sigmoid", "gelu", "elu", "softplus", "silu"]


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Section):
    """A multilayer perceptron; the input width and the output width come from the data.

    Attributes:
        hidden_sizes: widths of the hidden layers (an empty list: a linear model).
        activation: relu, tanh, sigmoid, gelu, elu, softplus or silu.
        compute_dtype: float32, or bfloat16 for mixed precision: matmuls in bfloat16 (worth it
            on GPUs and TPUs) while params, gradients, SGLD noise and moments stay float32.
    """

    hidden_sizes: tuple[int, ...] = _field(
        (128, 128), "a list of ints >= 1", lambda t: all(v >= 1 for v in t)
    )
    activation: Activation = "relu"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"

    @property
    def activation_fn(self) -> Callable:
        """The activation as a function of ``jax.nn``."""
        import jax

        return getattr(jax.nn, self.activation)


Optimizer = Literal["adam", "adamw", "sgd", "momentum", "rmsprop"]


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Section):
    """Training under noise (:func:`bayesnoise.train.fit`).

    Attributes:
        epochs: passes over the training set.
        batch_size: minibatch size.
        learning_rate: the optimizer's (initial) learning rate.
        optimizer: adam, adamw, sgd, momentum (SGD with momentum 0.9) or rmsprop.
        schedule: constant, or cosine (decay to 1% over the run).
        seed: the PRNG seed of the whole run (initialisation, noise, SGLD chains).
    """

    epochs: int = _int(1, 30)
    batch_size: int = _int(1, 64)
    learning_rate: float = _positive(1e-3)
    optimizer: Optimizer = "adam"
    schedule: Literal["constant", "cosine"] = "cosine"
    seed: int = _int(0, 0)


@dataclasses.dataclass(frozen=True)
class PolynomialSchedule(_Section):
    """Welling & Teh's ε_t = a (b + t)^(−γ); SGLD's step is η_t = ε_t / 2.

    See :func:`bayesnoise.sgld.polynomial_schedule`.
    """

    a: float = _positive(1e-4)
    b: float = _positive(1.0)
    gamma: float = _field(0.55, "a number in (0.5, 1]", lambda v: 0.5 < v <= 1)


@dataclasses.dataclass(frozen=True)
class SGLDConfig(_Section):
    """Posterior sampling by SGLD (:func:`bayesnoise.sampling.run`), started from the trained net.

    ``step_size: auto`` (the default) lets the sampler choose settings that converge
    (:func:`bayesnoise.sampling.auto_settings`: a diagonal Laplace preconditioner, a stable
    step, burn-in, thinning and samples from the relaxation time, at most ``max_steps`` steps
    per chain); ``burnin``, ``samples``, ``thin`` and ``batch_size`` given explicitly override
    the derived values. A number sets the constant step η instead, or ``polynomial`` a decaying
    one (with ``step_size: null``); then ``burnin``, ``samples`` and ``thin`` default to 1000,
    500 and 4.

    Attributes:
        method: sgld, or psgld (RMSprop-preconditioned; needs a numeric step size).
        step_size: auto, or the constant step η of :func:`bayesnoise.sgld` (η = ε / 2 in
            Welling & Teh's notation), or null with ``polynomial``.
        polynomial: a decaying step ε_t = a (b + t)^(−γ) instead.
        temperature: T >= 0; 1 samples the posterior (auto needs T > 0).
        burnin: steps before the first kept state (null: derived, or 1000).
        samples: states kept per chain (null: derived, or 500).
        thin: keep every ``thin``-th state (null: derived, or 4).
        chains: independent chains, run at once.
        batch_size: minibatch size; null for the whole training set (auto: min(N, 128)).
        max_steps: with auto, the most steps per chain.
        rhat_threshold, ess_threshold: the convergence criteria of the diagnostics.
    """

    method: Literal["sgld", "psgld"] = "sgld"
    step_size: Any = _field(
        "auto",
        "auto, a number > 0, or null",
        lambda v: (
            isinstance(v, str)
            or (
                isinstance(v, (int, float))
                and not isinstance(v, bool)
                and math.isfinite(v)
                and v > 0
            )
        ),
    )
    polynomial: PolynomialSchedule | None = None
    temperature: float = _nonnegative(1.0)
    burnin: int | None = _field(None, "an int >= 0 or null", lambda v: v >= 0)
    samples: int | None = _field(None, "an int >= 1 or null", lambda v: v >= 1)
    thin: int | None = _field(None, "an int >= 1 or null", lambda v: v >= 1)
    chains: int = _int(1, 4)
    batch_size: int | None = _field(64, "an int >= 1 or null", lambda v: v >= 1)
    max_steps: int = _int(100, 20_000)
    rhat_threshold: float = _positive(1.1)
    ess_threshold: float = _positive(100.0)

    def _validate(self):
        if isinstance(self.step_size, str) and self.step_size != "auto":
            text = self.step_size.strip()
            if _FLOAT_TEXT.match(text) and math.isfinite(float(text)) and float(text) > 0:
                self._set("step_size", float(text))
            else:
                raise ConfigError(
                    "step_size", f"got {self.step_size!r}; allowed: auto, a number > 0, or null."
                )
        if self.step_size is None and self.polynomial is None:
            raise ConfigError(
                "step_size",
                "got null without a polynomial schedule; allowed: auto, a number > 0, or null "
                "with sgld.polynomial set.",
            )
        if self.step_size is not None and self.polynomial is not None:
            raise ConfigError(
                "step_size",
                f"got {self.step_size!r} and a polynomial schedule too; allowed: one of "
                f"step_size and polynomial, the other null.",
            )
        if self.auto and self.method == "psgld":
            raise ConfigError(
                "method",
                "got psgld with step_size: auto; allowed: sgld with auto, or psgld with a "
                "numeric step_size or a polynomial schedule.",
            )
        if self.auto and self.temperature == 0:
            raise ConfigError(
                "temperature",
                "got 0 with step_size: auto; allowed: a temperature > 0 with auto, or a numeric "
                "step_size for T = 0.",
            )

    @property
    def auto(self) -> bool:
        """Whether the sampler chooses its own settings."""
        return self.step_size == "auto"

    @property
    def num_steps(self) -> int | None:
        """Steps per chain, ``burnin + samples * thin``; None when they are derived (auto)."""
        if self.auto and None in (self.burnin, self.samples, self.thin):
            return None
        burnin = 1000 if self.burnin is None else self.burnin
        samples = 500 if self.samples is None else self.samples
        return burnin + samples * (4 if self.thin is None else self.thin)

    def learning_rate(self) -> Any:
        """The ``learning_rate`` of :func:`bayesnoise.sgld`: None (auto), a float or a schedule."""
        if self.auto:
            return None
        if self.polynomial is None:
            return self.step_size
        from bayesnoise.sgld import polynomial_schedule

        p = self.polynomial
        return polynomial_schedule(p.a, p.b, p.gamma)

    def run_settings(self) -> dict:
        """Keyword arguments of :func:`bayesnoise.sampling.run` for this section."""
        fixed = not self.auto
        return {
            "learning_rate": self.learning_rate(),
            "temperature": self.temperature,
            "batch_size": self.batch_size,
            "num_burnin": 1000 if fixed and self.burnin is None else self.burnin,
            "num_samples": 500 if fixed and self.samples is None else self.samples,
            "thin": 4 if fixed and self.thin is None else self.thin,
            "num_chains": self.chains,
            "rhat_threshold": self.rhat_threshold,
            "ess_threshold": self.ess_threshold,
            "auto": {"max_steps": self.max_steps} if self.auto else None,
        }


@dataclasses.dataclass(frozen=True)
class EMConfig(_Section):
    """Learning the noise scales by EM (:mod:`bayesnoise.em`); its E-step runs :class:`SGLDConfig`.

    Attributes:
        enabled: whether to run EM after training (else the scales stay at 1).
        iterations: EM iterations (E-step then M-step).
        sigma0: σ0, the prior standard deviation of the weights, w ~ N(0, σ0²); also the
            prior of SGLD without EM.
        hyperprior: a hyperprior on the scales, default none.
    """

    enabled: bool = False
    iterations: int = _int(1, 3)
    sigma0: float = _positive(1.0)
    hyperprior: HyperpriorConfig = _section(HyperpriorConfig)


@dataclasses.dataclass(frozen=True)
class SoftTargetConfig(_Section):
    """The distilled small-network baseline (:mod:`bayesnoise.distill`).

    A dense student with as many weights as the pruned network, trained on the unpruned
    network's softened outputs.

    Attributes:
        enabled: whether to train the students (classification only).
        temperature: T > 0 of the soft targets.
        alpha: weight in [0, 1] of the hard-label term.
        epochs: training epochs of every student (null: ``train.epochs``).
    """

    enabled: bool = False
    temperature: float = _positive(2.0)
    alpha: float = _field(0.0, "a number in [0, 1]", lambda v: 0 <= v <= 1)
    epochs: int | None = _field(None, "an int >= 1 or null", lambda v: v >= 1)


PruneRule = Literal["snr", "spr", "magnitude"]
_DEFAULT_NUM_FRACTIONS = 50


@dataclasses.dataclass(frozen=True)
class PruneConfig(_Section):
    """Pruning by posterior scores (:mod:`bayesnoise.prune`).

    Set either ``num_fractions`` or ``fractions`` (and the other to null); with neither,
    ``num_fractions`` is 50.

    Attributes:
        rules: a non-empty subset of snr (|μ|/σ), spr (|μ| + σ) and magnitude (|μ|).
        num_fractions: n evenly spaced fractions i / n, i = 0, ..., n − 1 (0 is unpruned).
        fractions: explicit fractions in [0, 1], strictly increasing.
        scope: global (one ranking over all layers) or layer (the fraction in every layer).
        include_biases: also prune biases.
        soft_target: the distilled small-network baseline.
        finetune_epochs: after one-shot pruning at a few fractions (50, 75, 90, 95%), retrain
            the kept weights this many epochs with the mask held fixed; 0 turns it off.
        finetune_learning_rate: Adam's initial step size of that retraining, decayed to 0 by a
            cosine schedule (null: ``train.learning_rate``).
        moments: the moments the scores read. laplace (the default): the diagonal Laplace
            posterior at the trained network under the learned scales, at the sampler's
            temperature: mean the trained weights, variance T / (N·GGN + 1/(σ0²λ²)), the local
            posterior around the network being pruned. sgld: the chains' running moments, which
            describe the local posterior only while the chains stay near the trained network
            (small fixed steps); chains that mix leave it, and their mean is then no network.
    """

    rules: tuple[PruneRule, ...] = _field(
        ("snr", "spr", "magnitude"), "a non-empty list of distinct names from snr, spr, magnitude"
    )
    num_fractions: int | None = _field(None, "an int >= 2 or null", lambda v: v >= 2)
    fractions: tuple[float, ...] | None = _field(
        None,
        "a strictly increasing list of numbers in [0, 1], or null",
        lambda t: all(0 <= v <= 1 for v in t) and all(x < y for x, y in zip(t, t[1:])),
    )
    scope: Literal["global", "layer"] = "global"
    include_biases: bool = False
    soft_target: SoftTargetConfig = _section(SoftTargetConfig)
    finetune_epochs: int = _int(0, 0)
    finetune_learning_rate: float | None = _positive(None, "a number > 0 or null")
    moments: Literal["laplace", "sgld"] = "laplace"

    def _validate(self):
        if not self.rules or len(set(self.rules)) != len(self.rules):
            raise ConfigError(
                "rules",
                f"got {list(self.rules)!r}; allowed: a non-empty list of distinct names from "
                f"snr, spr, magnitude.",
            )
        if self.num_fractions is None and self.fractions is None:
            self._set("num_fractions", _DEFAULT_NUM_FRACTIONS)
        elif self.num_fractions is not None and self.fractions is not None:
            raise ConfigError(
                "num_fractions",
                f"got {self.num_fractions!r} and explicit fractions too; allowed: one of "
                f"num_fractions and fractions, the other null.",
            )
        elif self.fractions is not None and not self.fractions:
            raise ConfigError("fractions", "got []; allowed: at least one fraction, or null.")

    def fraction_grid(self) -> tuple[float, ...]:
        """The fractions to evaluate, ascending: explicit, or i / n for i = 0, ..., n − 1."""
        if self.fractions is not None:
            return self.fractions
        return tuple(i / self.num_fractions for i in range(self.num_fractions))


@dataclasses.dataclass(frozen=True)
class EvalConfig(_Section):
    """Evaluation and the breakpoint of a pruning curve (:func:`bayesnoise.prune.breakpoint`).

    Attributes:
        metric: auto (error for classification, rmse for regression), error or rmse.
        tolerance: the allowed increase of the metric over the unpruned one at the breakpoint;
            by default 0.01: one percentage point of error, or 1% of the RMSE.
        relative: whether ``tolerance`` is relative; null: relative for rmse, absolute for
            error.
        mc_samples: noise draws for Monte Carlo predictions.
    """

    metric: Literal["auto", "error", "rmse"] = "auto"
    tolerance: float = _nonnegative(0.01)
    relative: bool | None = None
    mc_samples: int = _int(1, 16)


_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclasses.dataclass(frozen=True)
class Config(_Section):
    """A whole experiment. Build it with :func:`load_config`.

    Attributes:
        name: the run's name (letters, digits, ``_``, ``.``, ``-``); null: the data set's name.
        out: the output folder; null: ``runs/<name>``.
        data, model, noise, train, sgld, em, prune, eval: the sections.
    """

    name: str | None = _field(
        None, "a non-empty string of letters, digits, _, . and -, or null", _NAME.match
    )
    out: str | None = None
    data: DataConfig = _section(DataConfig)
    model: ModelConfig = _section(ModelConfig)
    noise: NoiseConfig = _section(NoiseConfig)
    train: TrainConfig = _section(TrainConfig)
    sgld: SGLDConfig = _section(SGLDConfig)
    em: EMConfig = _section(EMConfig)
    prune: PruneConfig = _section(PruneConfig)
    eval: EvalConfig = _section(EvalConfig)

    def _validate(self):
        if self.name is None:
            self._set("name", self.data.name)
        if self.out is None:
            self._set("out", f"runs/{self.name}")
        task = self.data.task
        wanted = "error" if task == "classification" else "rmse"
        if self.eval.metric not in ("auto", wanted):
            raise ConfigError(
                "eval.metric",
                f"got {self.eval.metric!r}, but {self.data.name} is a {task} data set; "
                f"allowed: auto or {wanted}.",
            )
        if self.prune.soft_target.enabled and task != "classification":
            raise ConfigError(
                "prune.soft_target.enabled",
                f"got true, but soft targets need a classification data set and "
                f"{self.data.name} is a {task} one; allowed: false.",
            )

    @property
    def task(self) -> str:
        """``"classification"`` or ``"regression"``, from the data set."""
        return self.data.task

    @property
    def metric(self) -> str:
        """``"error"`` or ``"rmse"``: ``eval.metric`` with auto resolved."""
        return "error" if self.task == "classification" else "rmse"

    @property
    def relative_tolerance(self) -> bool:
        """Whether ``eval.tolerance`` is relative: ``eval.relative``, else true for rmse."""
        if self.eval.relative is not None:
            return self.eval.relative
        return self.metric == "rmse"

    def to_yaml(self) -> str:
        """The config as run, as YAML text that :func:`load_config` reads back."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Loading and overrides


def _field_types(cls: type) -> dict[str, Any]:
    return {f.name: _hints(cls)[f.name] for f in dataclasses.fields(cls)}


def _section_type(tp: Any) -> Any:
    """The dataclass (or ``dict``) a key path may descend into, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else None
    if dataclasses.is_dataclass(tp):
        return tp
    if tp is dict or typing.get_origin(tp) is dict:
        return dict
    return None


def _apply_overrides(raw: dict, overrides: Iterable[str]) -> None:
    """Sets every ``dotted.key=value`` in ``raw``, checking the key against the schema.

    Overriding the ``kind`` of a noise or hyperprior drops the parameters of its old kind
    that were not overridden too.
    """
    touched: dict[int, tuple[dict, set]] = {}
    for text in overrides:
        if not isinstance(text, str) or "=" not in text:
            raise ConfigError(
                str(text), "an override must be key=value, e.g. train.epochs=3; allowed: key=value."
            )
        key, _, value_text = text.partition("=")
        key = key.strip()
        try:
            value = yaml.safe_load(value_text) if value_text.strip() else None
        except yaml.YAMLError:
            raise ConfigError(
                key, f"cannot read the value {value_text!r} as YAML; allowed: a YAML value."
            ) from None
        parts = key.split(".")
        cls: Any = Config
        node = raw
        for i, part in enumerate(parts):
            dotted = ".".join(parts[: i + 1])
            if cls is not dict:
                types_ = _field_types(cls)
                if part not in types_:
                    raise _unknown_key(dotted, types_)
                sub = _section_type(types_[part])
            else:
                sub = dict
            if i == len(parts) - 1:
                node[part] = value
                touched.setdefault(id(node), (node, set()))[1].add(part)
                break
            if sub is None:
                raise ConfigError(
                    dotted,
                    f"is a value, not a section, so {key!r} does not exist; "
                    f"allowed: {dotted}=value.",
                )
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node, cls = node[part], sub
    for node, keys in touched.values():
        kind = node.get("kind")
        if "kind" in keys and isinstance(kind, str) and kind in _PARAMETERS:
            for name in _PARAMETER_NAMES:
                if name in node and name not in keys and name not in _PARAMETERS[kind]:
                    del node[name]


def load_config(
    source: str | os.PathLike | Mapping[str, Any] | Config, overrides: Iterable[str] = ()
) -> Config:
    """Reads, overrides and validates a config.

    Args:
        source: a YAML file, a mapping as parsed from one (not modified), or a :class:`Config`.
        overrides: ``"dotted.key=value"`` strings applied before validation, the value read as
            YAML (``train.epochs=3``, ``noise.kind=gaussian``, ``prune.rules=[snr,spr]``,
            ``sgld.polynomial=null``). Sections missing from ``source`` are created.

    Returns:
        The validated :class:`Config`, defaults filled in.

    Raises:
        ConfigError: an unknown key, a value of the wrong type or out of range, or a bad
            override; the message starts with the dotted key and says what is allowed.
        FileNotFoundError: ``source`` names a file that does not exist.

    Example:
        >>> cfg = load_config("configs/digits.yaml", overrides=["train.epochs=3"])  # doctest: +SKIP
    """
    if isinstance(source, Config):
        raw = source.to_dict()
    elif isinstance(source, Mapping):
        raw = copy.deepcopy(dict(source))
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        text = path.read_text(encoding="utf-8")
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(str(path), f"is not valid YAML: {e}") from None
        raw = {} if raw is None else raw
    else:
        raw = source
    if not isinstance(raw, Mapping):
        raise ConfigError(
            "(top level)",
            f"got {type(raw).__name__}; allowed: a mapping with the keys "
            f"{', '.join(f.name for f in dataclasses.fields(Config))}.",
        )
    raw = dict(raw)
    _apply_overrides(raw, overrides)
    return _from_mapping(Config, raw)


def build_noise(noise: NoiseConfig | Config) -> bnoise.Noise | dict[str, bnoise.Noise] | None:
    """The noise of a config, in the form :func:`bayesnoise.nn.noisy_apply` takes.

    Returns:
        None for kind none without an input noise; a :mod:`bayesnoise.noise` distribution when
        every layer gets the same noise; with an input noise, a mapping from kernel-path
        patterns to noises, ``{"Dense_0/": input noise, "": hidden noise}`` (the first match
        wins). An input noise of kind none is ``Bernoulli(1.0)`` (λ = 1, no noise); a hidden
        kind none leaves the pattern ``""`` out.
    """
    if isinstance(noise, Config):
        noise = noise.noise
    hidden = _distribution(noise)
    if noise.input is None:
        return hidden
    first = _distribution(noise.input) or bnoise.Bernoulli(1.0)
    return {"Dense_0/": first} if hidden is None else {"Dense_0/": first, "": hidden}


def build_hyperprior(em: EMConfig | HyperpriorConfig | Config) -> bnoise.Noise | None:
    """The hyperprior for :func:`bayesnoise.em.m_step`, or None for kind none."""
    if isinstance(em, Config):
        em = em.em
    if isinstance(em, EMConfig):
        em = em.hyperprior
    return _distribution(em)
