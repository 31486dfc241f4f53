"""Typed, validated experiment configs: YAML in, frozen pydantic models out.

A config has a section per stage of the pipeline, each a frozen model::

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

The noise and the EM hyperprior are unions discriminated by ``kind``: a model per kind, whose
parameters and their defaults are those of the :mod:`bayesnoise.noise` class the kind builds.

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
import inspect
import math
import os
import re
import types
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

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
    """An invalid config. ``str(error)`` is ``"<dotted key>: <what is wrong and allowed>"``, a
    line per error when there are several.

    Attributes:
        key: the dotted key of the (first) bad entry, e.g. ``"train.batch_size"``.
        detail: what is wrong with it and what is allowed.
        more: the other errors found, each a ConfigError.
    """

    def __init__(self, key: str, detail: str, *more: ConfigError):
        self.key, self.detail, self.more = key, detail, more
        super().__init__("\n".join(f"{e.key}: {e.detail}" for e in (self, *more)))

    def within(self, prefix: str) -> ConfigError:
        """The same error, its key under the section ``prefix``."""
        return ConfigError(f"{prefix}.{self.key}" if prefix else self.key, self.detail)


class _MissingFile(ConfigError, FileNotFoundError):
    """A config file that does not exist."""


# ---------------------------------------------------------------------------------------------
# Value types, and pydantic's errors as ConfigErrors naming the key, the value and what is allowed.

_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _number(value: Any) -> Any:
    return float(value) if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()) else value


def _check(predicate: Callable[[Any], bool]) -> pydantic.AfterValidator:
    def check(value):
        if not predicate(value):
            raise ValueError("not allowed")
        return value

    return pydantic.AfterValidator(check)


# A float field: also "1e-3" (YAML 1.1 text); strict, so no bools and no other text.
_Float = Annotated[float, pydantic.BeforeValidator(_number)]
_AsTuple = pydantic.BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)
_OPS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_WORDS = {
    bool: "true or false",
    int: "an int",
    float: "a number",
    str: "a string",
    dict: "a mapping",
}


def _unwrap(tp: Any) -> tuple[Any, list, bool]:
    """``tp`` without Annotated and None: the type, its metadata, whether null is allowed.

    A discriminated union of the kinds of a noise or hyperprior becomes its base class.
    """
    meta, nullable = [], False
    while True:
        origin, args = get_origin(tp), get_args(tp)
        if origin is Annotated:
            tp, meta = args[0], [*meta, *args[1:]]
        elif origin in (Union, types.UnionType) and type(None) in args:
            rest = tuple(a for a in args if a is not type(None))
            tp, nullable = rest[0] if len(rest) == 1 else Union[rest], True
        elif origin in (Union, types.UnionType) and all(_is_model(a, _Distribution) for a in args):
            tp = args[0].__base__
        else:
            meta = [n for m in meta for n in (m.metadata if isinstance(m, FieldInfo) else [m])]
            return tp, meta, nullable


def _is_model(tp: Any, base: type = BaseModel) -> bool:
    return isinstance(tp, type) and issubclass(tp, base)


def _fields(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """The fields of a section; of a noise or hyperprior, those of every kind, kind first."""
    kinds = getattr(model, "_kinds", None)
    if not kinds:
        return dict(model.model_fields)
    merged = {name: f for m in kinds.values() for name, f in m.model_fields.items()}
    return dict(sorted(merged.items(), key=lambda item: item[0] not in ("kind", *_PARAMETERS)))


def _describe(tp: Any, info: FieldInfo | None = None) -> str:
    """What a value of the type ``tp`` (with the bounds of the field ``info``) may be."""
    if info is not None and info.description:
        return info.description
    tp, meta, nullable = _unwrap(tp)
    if get_origin(tp) is Literal:
        text = "one of " + ", ".join(map(str, get_args(tp)))
    elif get_origin(tp) is tuple:
        text = "a list of " + re.sub(r"^an? (\w+)", r"\1s", _describe(get_args(tp)[0]))
    elif _is_model(tp):
        text = "a mapping with the keys " + ", ".join(_fields(tp))
    else:
        text = _WORDS.get(tp, "a value")
    meta = [*meta, *(info.metadata if info else ())]
    b = {k: getattr(m, k) for m in meta for k in _OPS if getattr(m, k, None) is not None}
    lo, hi = [k for k in ("gt", "ge") if k in b], [k for k in ("lt", "le") if k in b]
    if lo and hi:
        lo, hi = lo[0], hi[0]
        text += f" in {'(' if lo == 'gt' else '['}{b[lo]:g}, {b[hi]:g}{')' if hi == 'lt' else ']'}"
    else:
        text += "".join(f" {_OPS[k]} {v:g}" for k, v in b.items())
    return text + (" or null" if nullable else "")


def _unknown_key(key: str, known: Iterable[str]) -> ConfigError:
    known, typed = list(known), key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(typed, known, n=1)
    close = close or [k for k in known if typed and k.startswith(typed)][:1]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(key, f"unknown key{hint}; known keys here: {', '.join(known)}.")


def _one_error(error: Mapping[str, Any], root: type[BaseModel]) -> ConfigError:
    """One of pydantic's errors as a ConfigError, found by walking its location from ``root``."""
    key, tp, info, owner = "", root, None, root
    for part in error["loc"]:
        tp = _unwrap(tp)[0]
        if part == "[key]":  # a key that is not a string
            tp, info = str, None
            continue
        if _is_model(tp, _Distribution) and "kind" not in tp.model_fields:
            tp = tp._kinds[part]  # pydantic names the member of a discriminated union
            continue
        if isinstance(part, int) and get_origin(tp) is tuple:
            key, tp, info = f"{key}[{part}]", get_args(tp)[0], None
            continue
        owner, info = tp, tp.model_fields.get(part) if _is_model(tp) else None
        tp = info.annotation if info else Any
        key = f"{key}.{part}" if key else str(part)
    value, ctx = error.get("input"), error.get("ctx") or {}
    if isinstance(ctx.get("error"), ConfigError):
        return ctx["error"].within(key)
    if error["type"] in ("extra_forbidden", "invalid_key"):
        name = key.rsplit(".", 1)[-1]
        if name in _PARAMETERS and name in _fields(owner):
            takes = ", ".join(n for n in owner.model_fields if n in _PARAMETERS)
            return ConfigError(
                key,
                f"got {value!r}, but kind {owner.model_fields['kind'].default} takes "
                f"{takes or 'no parameters'}; allowed: null (omit it).",
            )
        return _unknown_key(key, _fields(owner))
    if error["type"].startswith("union_tag"):
        got = value.get("kind") if isinstance(value, Mapping) else value
        kinds = ", ".join(_unwrap(tp)[0]._kinds)
        return ConfigError(f"{key}.kind".lstrip("."), f"got {got!r}; allowed: one of {kinds}.")
    return ConfigError(key, f"got {value!r}; allowed: {_describe(tp, info)}.")


def _config_error(error: ValidationError, root: type[BaseModel]) -> ConfigError:
    first, *more = [_one_error(e, root) for e in error.errors()]
    return ConfigError(first.key, first.detail, *more)


class _SectionType(type(BaseModel)):
    def __call__(cls, **data: Any) -> Any:
        """Builds a section, raising ConfigError; a noise or hyperprior base builds its kind."""
        union = None if "kind" in cls.model_fields else getattr(cls, "_union", None)
        try:
            if union:
                return pydantic.TypeAdapter(union).validate_python(data)
            return super().__call__(**data)
        except ValidationError as e:
            raise _config_error(e, union or cls) from None


class _Section(BaseModel, metaclass=_SectionType):
    """Base of the config sections: frozen, strict, no unknown keys; null means all defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    def __setattr__(self, name: str, value: Any):
        raise dataclasses.FrozenInstanceError(f"cannot assign to {name!r}: configs are frozen")

    @model_validator(mode="before")
    @classmethod
    def _null_is_empty(cls, data: Any) -> Any:
        return {} if data is None else data

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # a default that depends on other fields

    def to_dict(self) -> dict[str, Any]:
        """The section as plain Python values (lists, dicts, numbers, strings, None)."""
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------
# Distributions named in a config: noise kinds and EM hyperpriors.

NoiseKind = Literal["bernoulli", "gaussian", "beta", "gamma", "lognormal", "none"]
HyperpriorKind = Literal["none", "inverse_gamma", "gamma", "lognormal", "beta"]
_DISTRIBUTIONS: dict[str, type[bnoise.Noise] | None] = {
    "none": None,
    "bernoulli": bnoise.Bernoulli,
    "gaussian": bnoise.Gaussian,
    "beta": bnoise.Beta,
    "gamma": bnoise.Gamma,
    "lognormal": bnoise.LogNormal,
    "inverse_gamma": bnoise.InverseGammaScale,
}
_SIGNATURES = {k: inspect.signature(c).parameters for k, c in _DISTRIBUTIONS.items() if c}
_PARAMETERS = tuple(dict.fromkeys(name for ps in _SIGNATURES.values() for name in ps))
_BOUNDS = {"keep": {"gt": 0, "le": 1}, "loc": {}}  # every other parameter: > 0


class _Distribution(_Section):
    """A noise or hyperprior: a model per kind (``_kinds``), built by calling the base class."""

    _kinds: ClassVar[dict[str, type[_Distribution]]] = {}
    _union: ClassVar[Any] = None

    def __getattr__(self, name: str) -> Any:
        return None if name in _PARAMETERS else super().__getattr__(name)  # of another kind


def _with_kind(default: str, value: Any) -> Any:
    """A mapping with its ``kind`` (by default ``default``) and without null parameters."""
    if value is None or isinstance(value, Mapping):
        value = {k: v for k, v in (value or {}).items() if not (v is None and k in _PARAMETERS)}
        return {"kind": default, **value}
    return value


def _union_of_kinds(base: type[_Distribution], kinds: tuple[str, ...], **fields: Any) -> Any:
    """The union of ``base``'s kinds, discriminated by ``kind``; defaults from bayesnoise.noise."""
    base._kinds = {}
    for kind in kinds:
        params = {
            name: (_Float, Field(p.default, **_BOUNDS.get(name, {"gt": 0})))
            for name, p in _SIGNATURES.get(kind, {}).items()
        }
        distribution = getattr(_DISTRIBUTIONS[kind], "__name__", "None")
        name = distribution + base.__name__.removesuffix("Config")
        model = pydantic.create_model(
            name, __base__=base, __module__=__name__, kind=(Literal[kind], kind), **params, **fields
        )
        base._kinds[kind] = globals()[name] = model
    default = pydantic.BeforeValidator(functools.partial(_with_kind, kinds[0]))
    base._union = Annotated[
        Union[tuple(base._kinds.values())], Field(discriminator="kind"), default
    ]
    return base._union


class NoiseConfig(_Distribution):
    """Multiplicative noise λ on the inputs of every Dense layer.

    A model per kind; ``NoiseConfig(kind=...)`` builds the one asked for. Only the parameters of
    ``kind`` may be set (reading another kind's gives None); omitted ones take the defaults of
    the :mod:`bayesnoise.noise` class of the kind: ``Bernoulli`` (``keep``), ``Gaussian``
    (``alpha``, the variance), ``Beta`` (``a``, ``b``), ``Gamma`` (``concentration``, ``rate``),
    ``LogNormal`` (``loc``, ``scale``). An override of ``noise.kind`` drops the old kind's
    parameters.

    Attributes:
        kind: bernoulli, gaussian, beta, gamma, lognormal or none (no noise).
        keep, alpha, a, b, concentration, rate, loc, scale: the parameters of ``kind``.
        input: a separate noise for the input layer (``Dense_0``), as in Srivastava et al.
            (2014), itself a noise section without ``input`` (its kind none: no noise on the
            inputs); null: the input layer gets ``kind`` too.
    """

    @model_validator(mode="after")
    def _input_has_no_input(self):
        if self.input is not None and self.input.input is not None:
            raise ConfigError(
                "input.input",
                "the input-layer noise cannot have an input noise of its own; allowed: null.",
            )
        return self


class HyperpriorConfig(_Distribution):
    """A hyperprior on the noise scales for the M-step (see :func:`bayesnoise.em.m_step`).

    A model per kind, like :class:`NoiseConfig`, with the defaults of :mod:`bayesnoise.noise`.

    Attributes:
        kind: none; inverse_gamma (on λ², closed-form M-step; ``InverseGammaScale``); gamma,
            lognormal or beta (on λ, numerical M-step; as for :class:`NoiseConfig`).
        a, b, concentration, rate, loc, scale: the parameters of ``kind``.
    """


_Noise = _union_of_kinds(NoiseConfig, get_args(NoiseKind), input=(Union["_Noise", None], None))
_Hyperprior = _union_of_kinds(HyperpriorConfig, get_args(HyperpriorKind))
for _model in NoiseConfig._kinds.values():
    _model.model_rebuild()


def _distribution(section: NoiseConfig | HyperpriorConfig) -> bnoise.Noise | None:
    cls = _DISTRIBUTIONS[section.kind]
    return cls(**{n: getattr(section, n) for n in _SIGNATURES[section.kind]}) if cls else None


# ---------------------------------------------------------------------------------------------
# Sections

# The names of bayesnoise.data.LOADERS.
DataName = Literal["digits", "breast_cancer", "diabetes", "mnist", "imdb", "msd"]


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
    options: dict[str, Any] = {}

    @model_validator(mode="after")
    def _loader_takes(self):
        takes = bdata.loader_options(self.name)
        if self.path is not None and "path" not in takes:
            raise ConfigError(
                "path",
                f"got {self.path!r}, but the {self.name} data set is bundled with scikit-learn "
                f"and takes no path; allowed: null.",
            )
        for k in self.options:
            if k == "path" or k not in takes:
                raise _unknown_key(f"options.{k}", [o for o in takes if o != "path"])
        return self

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


class ModelConfig(_Section):
    """A multilayer perceptron; the input width and the output width come from the data.

    Attributes:
        hidden_sizes: widths of the hidden layers (an empty list: a linear model).
        activation: relu, tanh, sigmoid, gelu, elu, softplus or silu.
        compute_dtype: float32, or bfloat16 for mixed precision: matmuls in bfloat16 (worth it
            on GPUs and TPUs) while params, gradients, SGLD noise and moments stay float32.
    """

    hidden_sizes: Annotated[tuple[Annotated[int, Field(ge=1)], ...], _AsTuple] = (128, 128)
    activation: Activation = "relu"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"

    @property
    def activation_fn(self) -> Callable:
        """The activation as a function of ``jax.nn``."""
        import jax

        return getattr(jax.nn, self.activation)


Optimizer = Literal["adam", "adamw", "sgd", "momentum", "rmsprop"]


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

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: _Float = Field(1e-3, gt=0)
    optimizer: Optimizer = "adam"
    schedule: Literal["constant", "cosine"] = "cosine"
    seed: int = Field(0, ge=0)


class PolynomialSchedule(_Section):
    """Welling & Teh's ε_t = a (b + t)^(−γ); SGLD's step is η_t = ε_t / 2.

    See :func:`bayesnoise.sgld.polynomial_schedule`.
    """

    a: _Float = Field(1e-4, gt=0)
    b: _Float = Field(1.0, gt=0)
    gamma: _Float = Field(0.55, gt=0.5, le=1)


def _step_size(value: Any) -> Any:
    value = _number(value)
    if value is None or value == "auto":
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isfinite(value) and value > 0:
            return float(value)
    raise ValueError("not allowed")


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
    step_size: Annotated[Literal["auto"] | float | None, pydantic.PlainValidator(_step_size)] = (
        Field("auto", description="auto, a number > 0, or null")
    )
    polynomial: PolynomialSchedule | None = None
    temperature: _Float = Field(1.0, ge=0)
    burnin: int | None = Field(None, ge=0)
    samples: int | None = Field(None, ge=1)
    thin: int | None = Field(None, ge=1)
    chains: int = Field(4, ge=1)
    batch_size: int | None = Field(64, ge=1)
    max_steps: int = Field(20_000, ge=100)
    rhat_threshold: _Float = Field(1.1, gt=0)
    ess_threshold: _Float = Field(100.0, gt=0)

    @model_validator(mode="after")
    def _one_step_rule(self):
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
        return self

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
    iterations: int = Field(3, ge=1)
    sigma0: _Float = Field(1.0, gt=0)
    hyperprior: _Hyperprior = Field(default_factory=HyperpriorConfig)


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
    temperature: _Float = Field(2.0, gt=0)
    alpha: _Float = Field(0.0, ge=0, le=1)
    epochs: int | None = Field(None, ge=1)


PruneRule = Literal["snr", "spr", "magnitude"]
_DEFAULT_NUM_FRACTIONS = 50


def _distinct(t: tuple[str, ...]) -> bool:
    return bool(t) and len(set(t)) == len(t)


def _increasing(t: tuple[float, ...]) -> bool:
    return bool(t) and 0 <= t[0] and t[-1] <= 1 and all(x < y for x, y in zip(t, t[1:]))


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

    rules: Annotated[tuple[PruneRule, ...], _AsTuple, _check(_distinct)] = Field(
        ("snr", "spr", "magnitude"),
        description="a non-empty list of distinct names from snr, spr, magnitude",
    )
    num_fractions: int | None = Field(None, ge=2)
    fractions: Annotated[tuple[_Float, ...], _AsTuple, _check(_increasing)] | None = Field(
        None, description="a non-empty, strictly increasing list of numbers in [0, 1], or null"
    )
    scope: Literal["global", "layer"] = "global"
    include_biases: bool = False
    soft_target: SoftTargetConfig = Field(default_factory=SoftTargetConfig)
    finetune_epochs: int = Field(0, ge=0)
    finetune_learning_rate: _Float | None = Field(None, gt=0)
    moments: Literal["laplace", "sgld"] = "laplace"

    @model_validator(mode="after")
    def _one_grid(self):
        if self.num_fractions is None and self.fractions is None:
            self._set("num_fractions", _DEFAULT_NUM_FRACTIONS)
        elif self.num_fractions is not None and self.fractions is not None:
            raise ConfigError(
                "num_fractions",
                f"got {self.num_fractions!r} and explicit fractions too; allowed: one of "
                f"num_fractions and fractions, the other null.",
            )
        return self

    def fraction_grid(self) -> tuple[float, ...]:
        """The fractions to evaluate, ascending: explicit, or i / n for i = 0, ..., n − 1."""
        if self.fractions is not None:
            return self.fractions
        return tuple(i / self.num_fractions for i in range(self.num_fractions))


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
    tolerance: _Float = Field(0.01, ge=0)
    relative: bool | None = None
    mc_samples: int = Field(16, ge=1)


class Config(_Section):
    """A whole experiment. Build it with :func:`load_config`.

    Attributes:
        name: the run's name (letters, digits, ``_``, ``.``, ``-``); null: the data set's name.
        out: the output folder; null: ``runs/<name>``.
        data, model, noise, train, sgld, em, prune, eval: the sections.
    """

    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="a non-empty string of letters, digits, _, . and -, or null",
    )
    out: str | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    noise: _Noise = Field(default_factory=NoiseConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sgld: SGLDConfig = Field(default_factory=SGLDConfig)
    em: EMConfig = Field(default_factory=EMConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _across_sections(self):
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
        return self

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


def _section_of(tp: Any) -> Any:
    """The section (a model, or dict for loader options) a dotted key may descend into."""
    tp = _unwrap(tp)[0]
    if tp is dict or get_origin(tp) is dict:
        return dict
    return tp if _is_model(tp) else None


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
        parts, section, node = key.split("."), Config, raw
        for i, part in enumerate(parts):
            dotted = ".".join(parts[: i + 1])
            fields = None if section is dict else _fields(section)
            if fields is not None and part not in fields:
                raise _unknown_key(dotted, fields)
            if i == len(parts) - 1:
                node[part] = value
                touched.setdefault(id(node), (node, set()))[1].add(part)
                break
            section = dict if fields is None else _section_of(fields[part].annotation)
            if section is None:
                raise ConfigError(
                    dotted,
                    f"is a value, not a section, so {key!r} does not exist; "
                    f"allowed: {dotted}=value.",
                )
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
    for node, keys in touched.values():
        kind = node.get("kind")
        if "kind" in keys and isinstance(kind, str) and kind in _DISTRIBUTIONS:
            for name in _PARAMETERS:
                if name in node and name not in keys and name not in _SIGNATURES.get(kind, {}):
                    del node[name]


def _read(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _MissingFile(str(path), "no such file; allowed: the path of a YAML file.") from None
    except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, not text
        reason = getattr(e, "strerror", None) or e
        raise ConfigError(str(path), f"cannot be read ({reason}); allowed: a YAML file.") from None
    except yaml.YAMLError as e:
        raise ConfigError(str(path), f"is not valid YAML ({e}); allowed: a YAML mapping.") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(
            str(path),
            f"got {raw!r}; allowed: a mapping with the keys {', '.join(_fields(Config))}.",
        )
    return raw or {}


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
            override; the message starts with the dotted key and says what is allowed. A file
            that cannot be read, is not YAML or not a mapping gives one whose key is the path;
            a missing file's is also a ``FileNotFoundError``.

    Example:
        >>> cfg = load_config("configs/digits.yaml", overrides=["train.epochs=3"])  # doctest: +SKIP
    """
    if isinstance(source, Config):
        raw = source.to_dict()
    elif isinstance(source, Mapping):
        raw = copy.deepcopy(dict(source))
    elif isinstance(source, (str, os.PathLike)):
        raw = _read(Path(source))
    else:
        raise ConfigError(
            "(top level)", f"got {source!r}; allowed: a YAML file, a mapping or a Config."
        )
    _apply_overrides(raw, overrides)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise _config_error(e, Config) from None


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
