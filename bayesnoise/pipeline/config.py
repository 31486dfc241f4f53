"""Typed, validated experiment configs: YAML in, frozen pydantic models out.

A :class:`Config` has a section per stage of the pipeline, each a frozen model below that lists
its keys, their defaults (a small run on scikit-learn's bundled digits) and what they mean.
:func:`load_config` reads YAML (a file or a parsed mapping), applies ``dotted.key=value``
overrides and validates: an unknown key at any level, a value of the wrong type or out of range
raises a :class:`ConfigError` (a ``ValueError``) that names the dotted key, the value and what
is allowed. A null section takes its defaults, and ``load_config(cfg.to_dict()) == cfg``.
Floats may be written ``1e-3`` (text to YAML 1.1); integers must be written as integers. The
noise and the EM hyperprior are unions discriminated by ``kind``: a model per kind, with the
parameters and defaults of the :mod:`bayesnoise.noise` class the kind builds (for the learned
noise, of :func:`bayesnoise.nn.learned_noise` and :func:`bayesnoise.train.variational_loss`).

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
from bayesnoise import nn as bnn
from bayesnoise import noise as bnoise
from bayesnoise import train as btrain

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
    """An invalid config; ``str(error)`` is ``"<dotted key>: <detail>"``, a line per error.

    Attributes:
        key: the dotted key of the (first) bad entry, e.g. ``"train.batch_size"``.
        detail: what is wrong with it and what is allowed.
        more: the other errors found, each a ConfigError.
        exit_code: 2, the command line's exit status for a bad config.
    """

    exit_code = 2

    def __init__(self, key: str, detail: str, *more: ConfigError):
        self.key, self.detail, self.more = key, detail, more
        super().__init__("\n".join(f"{e.key}: {e.detail}" for e in (self, *more)))


class _MissingFile(ConfigError, FileNotFoundError):
    """A config file that does not exist."""


def _bad(key: str, got: str, allowed: str) -> ConfigError:
    return ConfigError(key, f"got {got}; allowed: {allowed}.")


def _fail(*_: Any) -> Any:
    raise ValueError("not allowed")  # the ConfigError says what is allowed, from the field


# Value types, and what is allowed said from a field's type, its bounds or its description.
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_number = lambda v: float(v) if isinstance(v, str) and _FLOAT.fullmatch(v.strip()) else v
_Float = Annotated[float, pydantic.BeforeValidator(_number)]  # also "1e-3"; strict: no bools
_AsTuple = pydantic.BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)
_check = lambda ok: pydantic.AfterValidator(lambda v: v if ok(v) else _fail())
_OPS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_WORDS = {bool: "true or false", int: "an int", float: "a number", str: "a string"}
DataName = Literal["digits", "breast_cancer", "diabetes", "mnist", "imdb", "msd"]  # data.LOADERS
PruneRule = Literal["snr", "spr", "magnitude"]
_distinct = lambda t: bool(t) and len(set(t)) == len(t)
_increasing = lambda t: bool(t) and 0 <= t[0] and t[-1] <= 1 and list(t) == sorted(set(t))
_removing = lambda t: _increasing(t) and t[0] > 0
_NAME = "a non-empty string of letters, digits, _, . and -, or null"


def _step_size(v: Any) -> Any:
    v = _number(v)
    if v is None or v == "auto":
        return v
    return float(v) if type(v) in (int, float) and 0 < v < float("inf") else _fail()


def _unwrap(tp: Any) -> tuple[Any, list, bool]:
    """``tp`` without Annotated and None (a union of kinds: their base), its metadata, nullable."""
    meta, nullable = [], False
    while True:
        origin, args = get_origin(tp), get_args(tp)
        if origin is Annotated:
            tp, meta = args[0], [*meta, *args[1:]]
        elif origin in (Union, types.UnionType) and type(None) in args:
            rest = tuple(a for a in args if a is not type(None))
            tp, nullable = rest[0] if len(rest) == 1 else Union[rest], True
        elif origin in (Union, types.UnionType) and _is_model(args[0], _Distribution):
            tp = args[0].__base__
        else:
            meta = [n for m in meta for n in (m.metadata if isinstance(m, FieldInfo) else [m])]
            return tp, meta, nullable


def _is_model(tp: Any, base: type = BaseModel) -> bool:
    return isinstance(tp, type) and issubclass(tp, base)


def _fields(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """The fields of a section; of a noise or hyperprior, those of every kind, kind first."""
    if not getattr(model, "_kinds", None):
        return model.model_fields
    fields = {n: f for m in model._kinds.values() for n, f in m.model_fields.items()}
    return dict(sorted(fields.items(), key=lambda f: f[0] not in ("kind", *_PARAMETERS)))


def _describe(tp: Any, info: FieldInfo | None = None) -> str:
    """What a value of the type ``tp`` (with the bounds of the field ``info``) may be."""
    if info is not None and info.description:
        return info.description
    tp, meta, nullable = _unwrap(tp)
    if get_origin(tp) is Literal:
        text = "one of " + ", ".join(map(str, get_args(tp)))
    elif get_origin(tp) is tuple:
        text = "a list of " + re.sub(r"^an? (\w+)", r"\1s", _describe(get_args(tp)[0]))
    elif _is_model(tp) or get_origin(tp) is dict:
        text = "a mapping" + (f" with the keys {', '.join(_fields(tp))}" if _is_model(tp) else "")
    else:
        text = _WORDS.get(tp, "a value")
    meta = [*meta, *(info.metadata if info else ())]
    bounds = [(k, getattr(m, k)) for m in meta for k in _OPS if getattr(m, k, None) is not None]
    if len(bounds) == 2:  # an interval
        (lo, x), (hi, y) = sorted(bounds, key=lambda b: b[0] in ("lt", "le"))
        text += f" in {'(['[lo == 'ge']}{x:g}, {y:g}{')]'[hi == 'le']}"
    elif bounds:
        text += f" {_OPS[bounds[0][0]]} {bounds[0][1]:g}"
    return text + (" or null" if nullable else "")


def _unknown_key(key: str, known: Iterable[str]) -> ConfigError:
    known, typed = list(known), key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(typed, known, n=1)
    close = close or [k for k in known if typed and k.startswith(typed)][:1]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(key, f"unknown key{hint}; known keys here: {', '.join(known)}.")


def _one_error(error: Mapping[str, Any], root: Any) -> ConfigError:
    """One of pydantic's errors as a ConfigError, found by walking its location from ``root``."""
    key, tp, info, owner = "", root, None, root
    for part in error["loc"]:
        tp = _unwrap(tp)[0]
        if part == "[key]":  # a key that is not a string
            tp, info = str, None
        elif _is_model(tp, _Distribution) and "kind" not in tp.model_fields:
            tp = tp._kinds[part]  # pydantic names the member of a discriminated union
        elif isinstance(part, int) and get_origin(tp) is tuple:
            key, tp, info = f"{key}[{part}]", get_args(tp)[0], None
        else:
            owner, info = tp, tp.model_fields.get(part) if _is_model(tp) else None
            tp, key = info.annotation if info else Any, f"{key}.{part}".lstrip(".")
    value, ctx = error.get("input"), error.get("ctx") or {}
    if isinstance(ctx.get("error"), ConfigError):  # from a validator of the section at `key`
        return ConfigError(f"{key}.{ctx['error'].key}".lstrip("."), ctx["error"].detail)
    if error["type"] in ("extra_forbidden", "invalid_key"):
        name = key.rsplit(".", 1)[-1]
        if name in _PARAMETERS and name in _fields(owner):  # a parameter of another kind
            takes = ", ".join(n for n in owner.model_fields if n in _PARAMETERS) or "no parameters"
            kind = owner.model_fields["kind"].default
            return _bad(key, f"{value!r}, but kind {kind} takes {takes}", "null (omit it)")
        return _unknown_key(key, _fields(owner))
    if error["type"].startswith("union_tag"):
        got = value.get("kind") if isinstance(value, Mapping) else value
        kinds = ", ".join(_unwrap(tp)[0]._kinds)
        return _bad(f"{key}.kind".lstrip("."), repr(got), f"one of {kinds}")
    return _bad(key, repr(value), _describe(tp, info))


class _SectionType(type(BaseModel)):
    def __call__(cls, raw: Any = None, /, **fields: Any) -> Any:
        """Validates a mapping or keyword arguments; a noise or hyperprior builds its kind."""
        union = cls.__dict__.get("_union")  # of a noise or hyperprior base class
        try:
            if union:
                return pydantic.TypeAdapter(union).validate_python(fields if raw is None else raw)
            return cls.model_validate(fields if raw is None else raw)
        except ValidationError as e:
            first, *more = [_one_error(error, union or cls) for error in e.errors()]
            raise ConfigError(first.key, first.detail, *more) from None


class _Section(BaseModel, metaclass=_SectionType):
    """A config section: frozen, strict, no unknown keys; null means all defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    def __setattr__(self, name: str, value: Any):
        raise dataclasses.FrozenInstanceError(f"cannot assign to {name!r}: configs are frozen")

    @model_validator(mode="before")
    @classmethod
    def _null_is_empty(cls, data: Any) -> Any:
        return {} if data is None else data

    def _derive(self, name: str, value: Any) -> None:
        if getattr(self, name) is None:  # a default that depends on other fields
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """The section as plain Python values (lists, dicts, numbers, strings, None)."""
        return self.model_dump(mode="json")


# Noise kinds and EM hyperpriors: a model per kind, with the parameters of its bayesnoise.noise
# class, and the union of the kinds, discriminated by `kind`.
_NOISES = (bnoise.Bernoulli, bnoise.Gaussian, bnoise.Beta, bnoise.Gamma, bnoise.LogNormal)
_DISTRIBUTIONS = {"none": None, **{c.__name__.lower(): c for c in _NOISES}}
_DISTRIBUTIONS["inverse_gamma"] = bnoise.InverseGammaScale  # a hyperprior only
_SIGNATURES = {k: inspect.signature(c).parameters for k, c in _DISTRIBUTIONS.items() if c}
_BOUNDS = {"keep": {"gt": 0, "le": 1}, "loc": {}}  # every other parameter: > 0
_PARAMETER_FIELDS = {  # per kind, its parameters as pydantic fields
    kind: {n: (_Float, Field(p.default, **_BOUNDS.get(n, {"gt": 0}))) for n, p in ps.items()}
    for kind, ps in _SIGNATURES.items()
}
# The learned noise: the parameters of bayesnoise.nn.learned_noise and of the KL term of
# bayesnoise.train.variational_loss, with their defaults; the KL's warm-up counted in epochs.
_LEARNED = {
    **inspect.signature(bnn.learned_noise).parameters,
    **inspect.signature(btrain.variational_loss).parameters,
}
_LOG_ALPHA_RANGE = dict(zip(("ge", "le"), bnn.INIT_LOG_ALPHA_RANGE))
_PARAMETER_FIELDS["learned"] = {
    "per": (Literal["row", "weight"], _LEARNED["per"].default),
    "init_log_alpha": (_Float, Field(_LEARNED["init_log_alpha"].default, **_LOG_ALPHA_RANGE)),
    "kl_weight": (_Float, Field(_LEARNED["kl_weight"].default, ge=0)),
    "warmup_epochs": (int, Field(0, ge=0)),
}
_PARAMETERS = tuple(dict.fromkeys(n for fields in _PARAMETER_FIELDS.values() for n in fields))
# The keys besides `kind` a kind takes: its parameters, and an input noise unless it is learned
# (a learned noise learns the input layer's noise too).
_TAKES = {k: (*_PARAMETER_FIELDS.get(k, ()), "input") for k in _DISTRIBUTIONS}
_TAKES["learned"] = tuple(_PARAMETER_FIELDS["learned"])


class _Distribution(_Section):
    """A noise or hyperprior; ``_kinds`` holds a model per kind, ``_union`` their union."""

    _kinds: ClassVar[dict[str, type[_Distribution]]] = {}
    _union: ClassVar[Any] = None

    def __getattr__(self, name: str) -> Any:
        return None if name in _PARAMETERS else super().__getattr__(name)  # of another kind

    def _build(self) -> bnoise.Noise | Callable | None:
        if self.kind == "learned":
            return functools.partial(
                bnn.learned_noise, per=self.per, init_log_alpha=self.init_log_alpha
            )
        cls, names = _DISTRIBUTIONS[self.kind], _SIGNATURES.get(self.kind, ())
        return cls(**{n: getattr(self, n) for n in names}) if cls else None


def _union_of_kinds(base: type[_Distribution], kinds: str, **fields: Any) -> Any:
    """The union of ``base``'s kinds, discriminated by ``kind``, the first the default."""
    base._kinds, kinds = {}, kinds.split()
    for kind in kinds:
        params, cls = _PARAMETER_FIELDS.get(kind, {}), _DISTRIBUTIONS.get(kind)
        name = (cls.__name__ if cls else kind.title()) + base.__name__[: -len("Config")]
        base._kinds[kind] = globals()[name] = pydantic.create_model(
            name, __base__=base, __module__=__name__, kind=(Literal[kind], kind), **params, **fields
        )

    def with_kind(value: Any) -> Any:  # the default kind; null parameters left out
        if value is None or isinstance(value, Mapping):
            value = {k: v for k, v in (value or {}).items() if not (v is None and k in _PARAMETERS)}
            return {"kind": kinds[0], **value}
        return value

    union = Union[tuple(base._kinds.values())]
    base._union = Annotated[union, Field(discriminator="kind"), pydantic.BeforeValidator(with_kind)]
    return base._union


class NoiseConfig(_Distribution):
    """Multiplicative noise λ on the inputs of every Dense layer.

    ``kind``: bernoulli (``keep``), gaussian (``alpha``, the variance), beta (``a``, ``b``),
    gamma (``concentration``, ``rate``), lognormal (``loc``, ``scale``) or none. Another kind's
    parameter reads None; overriding ``noise.kind`` drops them. ``input``: a noise for the input
    layer ``Dense_0`` (Srivastava et al., 2014), without ``input``; null: as the other layers.

    ``kind: learned``: variational dropout, the noise trained with the weights
    (:func:`bayesnoise.nn.learned_noise` on every layer, the input layer's included, so no
    ``input``): ``per`` row (one α per input unit) or weight (sparse variational dropout),
    ``init_log_alpha``, and the KL term of :func:`bayesnoise.train.variational_loss`, its
    weight ``kl_weight`` ramped in linearly over the first ``warmup_epochs`` epochs.
    """

    @model_validator(mode="after")
    def _input_noise(self):
        if self.input is not None and self.kind == "learned":
            got = f"an input noise of kind {self.input.kind}, but learned noise learns every "
            raise _bad("input", got + "layer's noise, the input layer's too", "null (omit it)")
        if self.input is not None and self.input.kind == "learned":
            fixed = ", ".join(k for k in self._kinds if k != "learned")
            got = "'learned'; a learned noise covers every layer, set noise.kind: learned instead"
            raise _bad("input.kind", got, f"one of {fixed}")
        if self.input is not None and self.input.input is not None:
            detail = "the input-layer noise cannot have an input noise of its own; allowed: null."
            raise ConfigError("input.input", detail)
        return self


class HyperpriorConfig(_Distribution):
    """A hyperprior on the noise scales (:func:`bayesnoise.em.m_step`): ``kind`` none; inverse_gamma
    on λ² (closed-form M-step); gamma, lognormal or beta on λ (numerical M-step)."""


_Noise = _union_of_kinds(
    NoiseConfig,
    "bernoulli gaussian beta gamma lognormal none learned",
    input=(Union["_Noise", None], None),
)
_Hyperprior = _union_of_kinds(HyperpriorConfig, "none inverse_gamma gamma lognormal beta")
for _model in NoiseConfig._kinds.values():
    _model.model_rebuild()


class DataConfig(_Section):
    """The data set, for :func:`bayesnoise.data.load`."""

    name: DataName = "digits"
    path: str | None = None  # for mnist, imdb, msd (null: their environment variable, the cache)
    options: dict[str, Any] = {}  # further loader keywords: test_fraction, seed, num_words, ...
    # the share of training examples held out to choose breakpoints and fractions on (null:
    # the data set's own validation split, MNIST's 10,000 images, else 0.1)
    validation_fraction: _Float | None = Field(None, gt=0, lt=1)

    @model_validator(mode="after")
    def _loader_takes(self):
        takes = bdata.loader_options(self.name)
        if self.path is not None and "path" not in takes:
            got = f"{self.path!r}, but {self.name} is bundled with scikit-learn, without a path"
            raise _bad("path", got, "null")
        for k, v in self.options.items():
            if k == "path" or k not in takes:
                raise _unknown_key(f"options.{k}", [o for o in takes if o != "path"])
            allowed = bdata.option_problem(self.name, k, v)
            if allowed is not None:
                raise _bad(f"options.{k}", repr(v), allowed)
        return self

    @property
    def task(self) -> str:
        """``"classification"`` or ``"regression"``."""
        return bdata.TASKS[self.name]

    def load(self) -> bdata.Dataset:
        """Loads the data set, ``bayesnoise.data.load(name, path=path, **options)``, with its
        validation split (:func:`bayesnoise.data.validation_split`, seeded by ``options.seed``)."""
        path = {} if self.path is None else {"path": self.path}
        ds = bdata.load(self.name, **self.options, **path)
        seed = int(self.options.get("seed", 0))
        return bdata.validation_split(ds, self.validation_fraction, seed=seed)


class ModelConfig(_Section):
    """A multilayer perceptron; the input and output widths come from the data."""

    hidden_sizes: Annotated[tuple[Annotated[int, Field(ge=1)], ...], _AsTuple] = (128, 128)
    activation: Literal["relu", "tanh", "sigmoid", "gelu", "elu", "softplus", "silu"] = "relu"
    # bfloat16: matmuls in bfloat16; params, gradients, SGLD noise and moments stay float32
    compute_dtype: Literal["float32", "bfloat16"] = "float32"

    @property
    def activation_fn(self) -> Callable:
        """The activation as a function of ``jax.nn``."""
        import jax

        return getattr(jax.nn, self.activation)


class TrainConfig(_Section):
    """Training under noise (:func:`bayesnoise.train.fit`)."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: _Float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "adamw", "sgd", "momentum", "rmsprop"] = "adam"  # momentum: 0.9
    schedule: Literal["constant", "cosine"] = "cosine"  # cosine: decay to 1% over the run
    seed: int = Field(0, ge=0)  # of the whole run: initialisation, noise, SGLD chains
    # runs of seeds seed, seed + 1, ...: each in OUT/seed_S, the figures over seeds in OUT
    seeds: int = Field(1, ge=1)


class PolynomialSchedule(_Section):
    """Welling & Teh's ε_t = a (b + t)^(−γ) (:func:`bayesnoise.sgld.polynomial_schedule`)."""

    a: _Float = Field(1e-4, gt=0)
    b: _Float = Field(1.0, gt=0)
    gamma: _Float = Field(0.55, gt=0.5, le=1)


class SGLDConfig(_Section):
    """Posterior sampling by SGLD from the trained network (:func:`bayesnoise.sampling.run`).

    ``step_size``: auto lets :func:`bayesnoise.sampling.auto_settings` choose a preconditioner,
    a stable step, burn-in, thinning and samples, in at most ``max_steps`` steps per chain (the
    ones given win; ``reference_max_steps`` for the noise-free network's chains, which only the
    mean-against-std plot reads); a number is the constant step η = ε / 2 of :func:`bayesnoise.sgld`; null
    takes ``polynomial``. Without auto, ``burnin``, ``samples``, ``thin`` default to 1000, 500, 4.
    ``method: baoab`` samples by kinetic Langevin (:func:`bayesnoise.baoab`); with auto, the
    preconditioner is the diagonal Laplace variance at the start and h = 0.5 / sqrt(λ_max)
    (:func:`bayesnoise.sampling.run`), best with ``batch_size: null`` (the whole training set;
    with a minibatch h is also held where its gradient noise is a quarter of the injected);
    the chains start at a mode (EM's, or without EM the mode under λ = 1 found in
    ``em.map_steps`` Adam steps from the trained network). ``friction`` is its γ (null: 1).
    ``unit_swaps: true`` adds an exact move before every step that exchanges hidden units of
    the MLP, accepted by the prior (:func:`bayesnoise.sampling.unit_swaps`); the chains' moments
    then average each hidden weight over the units exchanged into its place, so it needs
    ``prune.moments: laplace``, and the network at the posterior mean loses its meaning.
    ``class_shifts: true`` (classification only) adds before every step an exact draw of each
    output row's and the output bias's mean over the classes, which the softmax ignores and
    only the prior holds (:func:`bayesnoise.sampling.class_shifts`); the moments stay the
    posterior's. ``centring: true`` samples every dense layer's bias sheared against its unit's
    weights by the inputs' curvature-weighted mean (:func:`bayesnoise.sampling.centring`;
    ``output``: the last layer's only), so that the diagonal preconditioner no longer crosses
    the direction in which a bias and its weights compensate each other; the moments stay
    those of the weights as they are.
    """

    # psgld: RMSprop-preconditioned, a numeric step; baoab: kinetic Langevin (bn.baoab), with
    # step_size auto a Laplace preconditioner and h from the curvature (best with batch_size
    # null: a minibatch's noise bounds h too)
    method: Literal["sgld", "psgld", "baoab"] = "sgld"
    step_size: Annotated[Literal["auto"] | float | None, pydantic.PlainValidator(_step_size)] = (
        Field("auto", description="auto, a number > 0, or null")
    )
    polynomial: PolynomialSchedule | None = None
    temperature: _Float = Field(1.0, ge=0)  # 1: the posterior
    burnin: int | None = Field(None, ge=0)
    samples: int | None = Field(None, ge=1)  # per chain
    thin: int | None = Field(None, ge=1)
    chains: int = Field(4, ge=1)
    # null: the whole training set, the default with method baoab (64 otherwise)
    batch_size: int | None = Field(64, ge=1)
    max_steps: int = Field(20_000, ge=100)
    # with step_size auto, the noise-free network's chains (the stage sgld_reference, which only
    # the mean-against-std plot reads); null: max_steps
    reference_max_steps: int | None = Field(None, ge=100)
    friction: _Float | None = Field(None, gt=0)  # baoab's γ; null: 1
    # before every step, exact exchanges of hidden units accepted by the prior (an MLP's only;
    # bn.sampling.unit_swaps)
    unit_swaps: bool = False
    # before every step, an exact draw of the output layer's means over the classes, which the
    # softmax ignores (classification only; bn.sampling.class_shifts)
    class_shifts: bool = False
    # sample each dense layer's bias sheared against its unit's weights (bn.sampling.centring);
    # output: the last layer's only
    centring: Annotated[
        bool | Literal["output"],
        pydantic.PlainValidator(lambda v: v if isinstance(v, bool) or v == "output" else _fail()),
    ] = Field(False, description="true, false or output")
    rhat_threshold: _Float = Field(1.1, gt=0)  # the convergence criteria of the diagnostics
    ess_threshold: _Float = Field(100.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _baoab_full_batch(cls, data: Any) -> Any:
        # BAOAB's step assumes the full gradient unless a minibatch is asked for
        if isinstance(data, dict) and data.get("method") == "baoab" and "batch_size" not in data:
            return {**data, "batch_size": None}
        return data

    @model_validator(mode="after")
    def _one_step_rule(self):
        step, fixed = self.step_size, "a numeric step_size or a polynomial schedule"
        if step is None and self.polynomial is None:
            got, allowed = "null without a polynomial schedule", "auto, a number > 0, or null"
            raise _bad("step_size", got, f"{allowed} with sgld.polynomial set")
        if step is not None and self.polynomial is not None:
            got = f"{step!r} and a polynomial schedule too"
            raise _bad("step_size", got, "one of step_size and polynomial, the other null")
        if self.auto and self.method == "psgld":
            raise _bad("method", "psgld with step_size: auto", f"sgld, or psgld with {fixed}")
        if self.method == "baoab" and self.polynomial is not None:
            got = "baoab with a polynomial schedule"
            raise _bad("method", got, "baoab with step_size auto or a number, or sgld")
        if self.friction is not None and self.method != "baoab":
            got = f"{self.friction} with method {self.method}"
            raise _bad("friction", got, "null, or a number > 0 with method baoab")
        if self.reference_max_steps is not None and not self.auto:
            got = f"{self.reference_max_steps} with step_size {self.step_size!r}"
            raise _bad("reference_max_steps", got, "null, or a number >= 100 with step_size auto")
        if self.auto and self.temperature == 0:
            raise _bad("temperature", "0 with step_size: auto", f"a temperature > 0, or {fixed}")
        return self

    @property
    def auto(self) -> bool:
        """Whether the sampler chooses its own settings."""
        return self.step_size == "auto"

    def _lengths(self) -> list[int | None]:
        """burnin, samples, thin; null ones are 1000, 500, 4 unless auto derives them."""
        given = (self.burnin, self.samples, self.thin)
        return [d if v is None and not self.auto else v for v, d in zip(given, (1000, 500, 4))]

    @property
    def num_steps(self) -> int | None:
        """Steps per chain, ``burnin + samples * thin``; None when they are derived (auto)."""
        burnin, samples, thin = self._lengths()
        return None if None in (burnin, samples, thin) else burnin + samples * thin

    def learning_rate(self) -> Any:
        """The ``learning_rate`` of :func:`bayesnoise.sgld`: None (auto), a float or a schedule."""
        if self.polynomial is None:
            return None if self.auto else self.step_size
        from bayesnoise.sgld import polynomial_schedule

        return polynomial_schedule(self.polynomial.a, self.polynomial.b, self.polynomial.gamma)

    def run_settings(self, reference: bool = False) -> dict:
        """Keyword arguments of :func:`bayesnoise.em.e_step` for this section (those of
        :func:`bayesnoise.sampling.run`, ``unit_swaps``, ``class_shifts`` and ``centring``);
        ``reference``: for the noise-free network's chains (``reference_max_steps``)."""
        burnin, samples, thin = self._lengths()
        max_steps = self.max_steps
        if reference and self.reference_max_steps is not None:
            max_steps = self.reference_max_steps
        return {
            "learning_rate": self.learning_rate(),
            "temperature": self.temperature,
            "batch_size": self.batch_size,
            "num_burnin": burnin,
            "num_samples": samples,
            "thin": thin,
            "num_chains": self.chains,
            "rhat_threshold": self.rhat_threshold,
            "ess_threshold": self.ess_threshold,
            "auto": {"max_steps": max_steps} if self.auto else None,
            **({"unit_swaps": True} if self.unit_swaps else {}),
            **({"class_shifts": True} if self.class_shifts else {}),
            **({"centring": self.centring} if self.centring else {}),
        }


class EMConfig(_Section):
    """Type-II maximum likelihood of the noise scales by EM (:mod:`bayesnoise.em`)."""

    enabled: bool = False  # else the scales stay at 1
    iterations: int = Field(3, ge=1)  # an E-step, then an M-step; then the final E-step (`sgld`)
    sigma0: _Float = Field(1.0, gt=0)  # the weights' prior std, also SGLD's without EM
    hyperprior: _Hyperprior = Field(default_factory=HyperpriorConfig)
    # the iterations' E-step: laplace, the mode under the current scales and the diagonal Laplace
    # posterior there (MacKay's evidence framework); sgld, the chains of `sgld`
    method: Literal["laplace", "sgld"] = "laplace"
    # the M-step: mackay (MacKay's fixed point), em (the EM update), auto (mackay for laplace
    # with hyperprior none or inverse_gamma, else em)
    update: Literal["auto", "mackay", "em"] = "auto"
    min_scale: _Float = Field(1e-4, gt=0)  # the scales' floor; a row there is pruned
    map_steps: int = Field(3000, ge=1)  # Adam steps per mode (method laplace)
    map_learning_rate: _Float = Field(3e-3, gt=0)

    def fit_settings(self) -> dict:
        """Keyword arguments of :func:`bayesnoise.em.fit` for this section (EM enabled)."""
        return {
            "method": self.method,
            "update": None if self.update == "auto" else self.update,
            "min_scale": self.min_scale,
            "map_steps": self.map_steps,
            "map_learning_rate": self.map_learning_rate,
        }


class SoftTargetConfig(_Section):
    """The distilled baseline (:mod:`bayesnoise.distill`): a dense student as large as the pruned
    network, trained on the unpruned one's softened outputs; classification only."""

    enabled: bool = False
    temperature: _Float = Field(2.0, gt=0)
    alpha: _Float = Field(0.0, ge=0, le=1)  # the weight of the hard-label term
    epochs: int | None = Field(None, ge=1)  # null: train.epochs


class IterativeConfig(_Section):
    """Iterative pruning with retraining (Han et al., 2015; :func:`bayesnoise.prune.iterative`):
    at each of ``fractions`` in turn, the rule removes weights of the network the round before
    retrained (SNR and SPR read its weights as μ, with the posterior's σ) and the kept weights
    are retrained for ``epochs``; the fraction is chosen on the validation split."""

    enabled: bool = False
    fractions: Annotated[tuple[_Float, ...], _AsTuple, _check(_removing)] = Field(
        (0.5, 0.75, 0.875, 0.9, 0.925, 0.95, 0.96, 0.97, 0.98, 0.99),
        description="a non-empty, strictly increasing list of numbers in (0, 1]",
    )
    epochs: int = Field(3, ge=1)  # retraining per round
    learning_rate: _Float | None = Field(None, gt=0)  # null: train.learning_rate


class PruneConfig(_Section):
    """Pruning by posterior scores (:mod:`bayesnoise.prune`) at the explicit ``fractions`` or at
    i / n, i < n = ``num_fractions`` (one of them, the other null; neither: n = 50).

    ``moments`` the scores read: laplace, the diagonal Laplace posterior at the trained network
    (with EM by ``em.method: laplace``, at the mode under the learned scales) and the sampler's
    temperature; or sgld, the chains' moments, local
    only while the chains stay near the network.
    """

    rules: Annotated[tuple[PruneRule, ...], _AsTuple, _check(_distinct)] = Field(
        ("snr", "spr", "magnitude"),  # |μ|/σ, |μ| + σ, |μ|
        description="a non-empty list of distinct names from snr, spr, magnitude",
    )
    num_fractions: int | None = Field(None, ge=2)
    fractions: Annotated[tuple[_Float, ...], _AsTuple, _check(_increasing)] | None = Field(
        None, description="a non-empty, strictly increasing list of numbers in [0, 1], or null"
    )
    scope: Literal["global", "layer"] = "global"  # one ranking, or the fraction in every layer
    include_biases: bool = False
    soft_target: SoftTargetConfig = Field(default_factory=SoftTargetConfig)
    finetune_epochs: int = Field(0, ge=0)  # retrain the kept weights at 50, 75, 90, 95% pruned
    finetune_learning_rate: _Float | None = Field(None, gt=0)  # null: train.learning_rate
    iterative: IterativeConfig = Field(default_factory=IterativeConfig)
    moments: Literal["laplace", "sgld"] = "laplace"

    @model_validator(mode="after")
    def _one_grid(self):
        if self.num_fractions is not None and self.fractions is not None:
            got = f"{self.num_fractions!r} and explicit fractions too"
            raise _bad("num_fractions", got, "one of num_fractions and fractions, the other null")
        if self.fractions is None:
            self._derive("num_fractions", 50)
        return self

    def fraction_grid(self) -> tuple[float, ...]:
        """The fractions to evaluate, ascending: explicit, or i / n for i = 0, ..., n − 1."""
        n = self.num_fractions
        return self.fractions if self.fractions is not None else tuple(i / n for i in range(n))


class EvalConfig(_Section):
    """Evaluation and the breakpoint of a pruning curve (:func:`bayesnoise.prune.breakpoint`)."""

    metric: Literal["auto", "error", "rmse"] = "auto"  # auto: error or rmse by the task
    tolerance: _Float = Field(0.01, ge=0)  # of the breakpoint: a point of error, 1% of the RMSE
    relative: bool | None = None  # null: relative for rmse, absolute for error
    mc_samples: int = Field(16, ge=1)  # noise draws of Monte Carlo predictions
    # prune from chains that did not converge (R-hat, ESS) when the pruning scores or the EM
    # scales read them; false: the prune stage stops with what to change
    allow_unconverged: bool = False


class Config(_Section):
    """A whole experiment. Build it with :func:`load_config`."""

    # the run's name (null: data.name) and its output folder (null: runs/<name>)
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description=_NAME)
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
        self._derive("name", self.data.name)
        self._derive("out", f"runs/{self.name}")
        data = f"{self.data.name} is a {self.task} data set"
        if self.eval.metric not in ("auto", self.metric):
            raise _bad("eval.metric", f"{self.eval.metric!r}, but {data}", f"auto or {self.metric}")
        if self.prune.soft_target.enabled and self.task != "classification":
            got = f"true, but soft targets need a classification data set and {data}"
            raise _bad("prune.soft_target.enabled", got, "false")
        if self.sgld.unit_swaps and self.prune.moments == "sgld":
            # exchanged units average each hidden weight's moments over the units in its place
            got = "true with prune.moments: sgld (the chains' moments mix exchanged units)"
            raise _bad("sgld.unit_swaps", got, "false, or true with prune.moments: laplace")
        if self.sgld.class_shifts and self.task != "classification":
            got = f"true, but the move needs a softmax's logits and {data}"
            raise _bad("sgld.class_shifts", got, "false")
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
        return self.metric == "rmse" if self.eval.relative is None else self.eval.relative

    def to_yaml(self) -> str:
        """The config as run, as YAML text that :func:`load_config` reads back."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _read(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _MissingFile(str(path), "no such file; allowed: the path of a YAML file.") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:  # a directory, not text, not YAML
        what = "is not valid YAML" if isinstance(e, yaml.YAMLError) else "cannot be read"
        reason = getattr(e, "strerror", None) or e
        raise ConfigError(str(path), f"{what} ({reason}); allowed: a YAML mapping.") from None
    if raw is not None and not isinstance(raw, dict):
        raise _bad(str(path), repr(raw), _describe(Config))
    return raw or {}


def load_config(
    source: str | os.PathLike | Mapping[str, Any] | Config, overrides: Iterable[str] = ()
) -> Config:
    """Reads, overrides and validates a config.

    Args:
        source: a YAML file, a mapping as parsed from one (not modified), or a :class:`Config`.
        overrides: ``"dotted.key=value"`` strings, the value read as YAML (``train.epochs=3``,
            ``prune.rules=[snr,spr]``, ``sgld.polynomial=null``), missing sections created.
            Overriding a ``kind`` drops the old kind's parameters not overridden too (and, for
            ``noise.kind=learned``, the input noise unless ``noise.input`` is overridden too).

    Raises:
        ConfigError: an unknown key, a value of the wrong type or out of range, a bad override,
            or a file that cannot be read, is not YAML or not a mapping (the key is its path; a
            missing file's error is also a ``FileNotFoundError``).
    """
    if isinstance(source, Config):
        raw = source.to_dict()
    elif isinstance(source, Mapping):
        raw = copy.deepcopy(dict(source))
    elif isinstance(source, (str, os.PathLike)):
        raw = _read(Path(source))
    else:
        raise _bad("(top level)", repr(source), "a YAML file, a mapping or a Config")
    touched: dict[int, tuple[dict, set]] = {}  # the sections overridden, and their keys
    for text in overrides:
        key, eq, value = str(text).partition("=")
        key, node = key.strip(), raw
        if not isinstance(text, str) or not eq:
            raise _bad(key, repr(text), "key=value, e.g. train.epochs=3")
        try:
            value = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise _bad(key, f"{value!r}, which YAML cannot read", "a YAML value") from None
        *path, name = key.split(".")
        for part in path:
            node[part] = node[part] if isinstance(node.get(part), dict) else {}
            touched.setdefault(id(node), (node, set()))[1].add(part)  # set inside: kept
            node = node[part]
        node[name] = value
        touched.setdefault(id(node), (node, set()))[1].add(name)
    for node, keys in touched.values():
        kind = node.get("kind")
        if "kind" in keys and isinstance(kind, str) and kind in _TAKES:
            for name in {*_PARAMETERS, "input"} - keys - set(_TAKES[kind]):
                node.pop(name, None)
    return Config(raw)


def build_noise(
    noise: NoiseConfig | Config,
) -> bnoise.Noise | dict[str, bnoise.Noise] | Callable | None:
    """The noise of a config, in the form :func:`bayesnoise.nn.noisy_apply` takes: None for kind
    none; one :mod:`bayesnoise.noise` distribution for every layer; or, with an input noise,
    ``{"Dense_0/": input noise, "": hidden noise}`` (an input kind none is ``Bernoulli(1.0)``,
    a hidden kind none leaves ``""`` out). For kind learned: ``model ->
    bayesnoise.nn.learned_noise(model, per, init_log_alpha=...)``."""
    noise = noise.noise if isinstance(noise, Config) else noise
    hidden = noise._build()
    if noise.input is None:
        return hidden
    first = noise.input._build() or bnoise.Bernoulli(1.0)
    return {"Dense_0/": first} if hidden is None else {"Dense_0/": first, "": hidden}


def build_hyperprior(em: EMConfig | HyperpriorConfig | Config) -> bnoise.Noise | None:
    """The hyperprior for :func:`bayesnoise.em.m_step`, or None for kind none."""
    em = em.em if isinstance(em, Config) else em
    return (em.hyperprior if isinstance(em, EMConfig) else em)._build()
