"""Multiplicative noise in Flax models, linen and NNX.

Two ways in:

* a module that multiplies its input by noise, per example and per unit, the generalisation of
  ``nn.Dropout`` (:class:`MultiplicativeNoise` for linen, :class:`NNXMultiplicativeNoise` for NNX);
* a transform that puts noise on the inputs of every ``Dense`` / ``Conv`` of an existing model
  without editing its code, so that each layer computes h_l = f(h_{l-1} Λ_l W_l) (eq. 2 of
  Nalisnick et al., 2015): :func:`noisy_apply` (linen, by method interception) and
  :func:`add_input_noise` (NNX, a graph transform).

Conventions follow ``nn.Dropout``: the noise draws from an rng stream named by the user
(``"noise"`` by default), and ``deterministic=True`` switches it off. Unlike inverted dropout the
noise is not rescaled, so the deterministic pass multiplies by E[λ] instead: exactly the
weight-scaling inference rule (for Gaussian noise, E[λ] = 1 and it is the identity).

A Conv's noise has one λ per example and input channel, shared over the spatial positions, so
that it scales one row (the in-channel axis) of the kernel, as the GSM view has it. A Dense's
noise has one λ per example (and per leading position, for inputs with more axes) and unit.

Per-weight noise (DropConnect, Wan et al., 2013) is :func:`dropconnect`, a transform of the
parameters: one λ per weight, shared by the minibatch.

Learned noise (variational dropout and sparse variational dropout) adds parameters: the noise
variance α per input row or per weight, trained with the weights under a KL term
(:func:`learned_noise` for linen, :func:`add_learned_noise` for NNX; the parameters sit beside
each kernel as ``log_alpha`` or ``log_sigma2`` and :func:`learned_layers` reads them back).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bayesnoise import _check, _tree
from bayesnoise import noise as bnoise
from bayesnoise.noise import Noise, require_continuous

__all__ = [
    "MultiplicativeNoise",
    "NNXMultiplicativeNoise",
    "input_noise",
    "noisy_apply",
    "add_input_noise",
    "dropconnect",
    "set_deterministic",
    "learned_noise",
    "add_learned_noise",
    "learned_layers",
    "LearnedNoise",
    "LearnedLayer",
    "apply_noise",
    "NoiseSpec",
    "MLP",
]

NoiseSpec = bnoise.NoiseSpec


def _noise_shape(shape: tuple[int, ...], broadcast_dims) -> tuple[int, ...]:
    return tuple(1 if i in broadcast_dims else n for i, n in enumerate(shape))


def _check_dims_type(broadcast_dims: Any) -> tuple[int, ...]:
    """``broadcast_dims`` as a tuple of ints (a TypeError naming it otherwise)."""
    allowed = "a tuple of ints (axes of the input, negative ones counted from the end)"
    if isinstance(broadcast_dims, (int, np.integer)) and not isinstance(broadcast_dims, bool):
        raise TypeError(f"broadcast_dims must be {allowed}, got the int {broadcast_dims!r}.")
    try:
        dims = tuple(broadcast_dims)
    except TypeError:
        raise TypeError(f"broadcast_dims must be {allowed}, got {broadcast_dims!r}.") from None
    if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in dims):
        raise TypeError(f"broadcast_dims must be {allowed}, got {broadcast_dims!r}.")
    return dims


def _check_dims(broadcast_dims: Any, ndim: int) -> tuple[int, ...]:
    """``broadcast_dims`` as non-negative axes of an input of ``ndim`` axes."""
    dims = _check_dims_type(broadcast_dims)
    bad = [d for d in dims if not -ndim <= d < ndim]
    if bad:
        raise ValueError(
            f"broadcast_dims={tuple(broadcast_dims)!r} names axis {bad[0]}, but x has {ndim} "
            f"axes; allowed: axes in [{-ndim}, {ndim - 1}]."
        )
    return tuple(int(d) % ndim for d in dims)


def _as_input(x: Any) -> jax.Array:
    """``x`` as an array of numbers (a TypeError naming ``x`` otherwise)."""
    return _check.array("x", x, "an array of numbers")


def apply_noise(
    noise: Noise,
    key: jax.Array | None,
    x: jax.Array,
    broadcast_dims=(),
    *,
    deterministic: bool = False,
    reparameterized: bool = False,
) -> jax.Array:
    """x ⊙ λ with λ drawn from ``noise`` (shared along ``broadcast_dims``), or x E[λ].

    With ``reparameterized=True`` the draw is differentiable in the noise's parameters (the
    noise must be continuous).

    Raises:
        TypeError: ``noise`` is not a noise distribution, ``key`` is not a PRNG key (unless
            ``deterministic``), ``x`` is not an array of numbers, or ``broadcast_dims`` is not a
            tuple of ints.
        ValueError: an axis of ``broadcast_dims`` that ``x`` does not have.
    """
    bnoise.check_noise(noise)
    x = _as_input(x)
    if deterministic:
        return x * jnp.asarray(noise.scale_factor, x.dtype)
    _check.key("key", key)
    dims = _check_dims(broadcast_dims, x.ndim)
    draw = noise.rsample if reparameterized else noise.sample
    lam = draw(key, _noise_shape(x.shape, dims))
    return x * lam.astype(x.dtype)


class MultiplicativeNoise(nn.Module):
    """Multiplies its input by i.i.d. noise λ: the generalisation of ``nn.Dropout``.

    y = x ⊙ λ, λ ~ ``noise`` drawn afresh per example and unit (broadcast along
    ``broadcast_dims``); with ``deterministic=True``, y = x E[λ] (weight scaling).

    Attributes:
        noise: a :mod:`bayesnoise.noise` distribution.
        broadcast_dims: axes along which one draw is shared (e.g. spatial axes for conv maps).
        deterministic: if True, no noise is drawn; may also be passed at call time (which
            wins); unset in both places means False.
        rng_collection: the rng stream the noise draws from.
        reparameterized: draw λ by the reparameterisation trick, so gradients reach the noise's
            parameters (continuous noises only; a Bernoulli noise raises a ValueError).

    Example:
        >>> import jax, jax.numpy as jnp, bayesnoise as bn
        >>> layer = bn.nn.MultiplicativeNoise(bn.noise.Gaussian(0.5))
        >>> y = layer.apply({}, jnp.ones((2, 3)), rngs={"noise": jax.random.key(0)})
    """

    noise: Noise
    broadcast_dims: tuple[int, ...] = ()
    deterministic: bool | None = None
    rng_collection: str = "noise"
    reparameterized: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, deterministic: bool | None = None, rng: jax.Array | None = None
    ) -> jax.Array:
        """Args: x; deterministic (overrides the attribute); rng: an explicit key to draw with."""
        bnoise.check_noise(self.noise)
        if self.reparameterized:
            require_continuous(self.noise, "MultiplicativeNoise(reparameterized=True)")
        if deterministic is None:
            deterministic = bool(self.deterministic)  # unset anywhere: noise on
        if deterministic:
            return apply_noise(self.noise, None, x, deterministic=True)
        if rng is None and not self.has_rng(self.rng_collection):
            raise ValueError(
                f"MultiplicativeNoise needs an rng stream {self.rng_collection!r} when not "
                f"deterministic: pass rngs={{'{self.rng_collection}': key}} to apply, or "
                f"deterministic=True."
            )
        key = self.make_rng(self.rng_collection) if rng is None else rng
        return apply_noise(
            self.noise, key, x, self.broadcast_dims, reparameterized=self.reparameterized
        )


class NNXMultiplicativeNoise(nnx.Module):
    """The NNX form of :class:`MultiplicativeNoise` (same conventions as ``nnx.Dropout``).

    Args:
        noise: a :mod:`bayesnoise.noise` distribution.
        broadcast_dims: axes along which one draw is shared.
        deterministic: if True, multiply by E[λ] instead of drawing.
        rng_collection: the stream of ``rngs`` the noise draws from.
        rngs: an ``nnx.Rngs`` (kept) or None (then pass ``rngs`` at call time).
    """

    def __init__(
        self,
        noise: Noise,
        *,
        broadcast_dims: tuple[int, ...] = (),
        deterministic: bool = False,
        rng_collection: str = "noise",
        rngs: nnx.Rngs | None = None,
    ):
        bnoise.check_noise(noise)
        self.noise = noise
        self.broadcast_dims = _check_dims_type(broadcast_dims)
        self.deterministic = deterministic
        self.rng_collection = rng_collection
        self.rngs = _stream(rngs, rng_collection, "NNXMultiplicativeNoise") if rngs else None

    def __call__(
        self, x: jax.Array, *, deterministic: bool | None = None, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        det = self.deterministic if deterministic is None else deterministic
        if det:
            return apply_noise(self.noise, None, x, deterministic=True)
        stream = _stream(rngs, self.rng_collection, "NNXMultiplicativeNoise") if rngs else self.rngs
        if stream is None:
            raise ValueError(
                f"NNXMultiplicativeNoise needs rngs with a {self.rng_collection!r} stream when "
                f"not deterministic: pass rngs=nnx.Rngs({self.rng_collection}=seed) to the "
                f"constructor or the call, or deterministic=True."
            )
        return apply_noise(self.noise, stream(), x, self.broadcast_dims)


def _stream(rngs: nnx.Rngs, name: str, who: str):
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(
            f"{who}: rngs must be an nnx.Rngs with a {name!r} stream, e.g. "
            f"nnx.Rngs({name}=0); got {type(rngs).__name__}: {rngs!r:.80}."
        )
    try:
        return rngs[name]
    except (KeyError, AttributeError) as e:
        raise ValueError(
            f"{who}: the rngs given have no stream {name!r} (nor a 'default' one); create them "
            f"with nnx.Rngs({name}=seed)."
        ) from e


# ------------------------------------------------------------------------------------- linen


def _linen_kernel_path(module: nn.Module) -> str:
    return "/".join(("params",) + tuple(module.path) + ("kernel",))


def _conv_broadcast(x: jax.Array, module: Any) -> tuple[int, ...]:
    size = getattr(module, "kernel_size", None)
    if size is None:
        nspatial = x.ndim - 2
    else:
        nspatial = 1 if isinstance(size, int) else len(size)
    batched = x.ndim > nspatial + 1
    start = 1 if batched else 0
    return tuple(range(start, start + nspatial))


def _broadcast_dims(module: Any, x: jax.Array) -> tuple[int, ...]:
    """The axes one input-noise draw is shared along: a Conv's spatial axes, else none."""
    return _conv_broadcast(x, module) if isinstance(module, (nn.Conv, nnx.Conv)) else ()


@contextlib.contextmanager
def input_noise(
    noise: NoiseSpec,
    where: _tree.Where = None,
    *,
    rng_collection: str = "noise",
    deterministic: bool = False,
    layers: tuple[type, ...] = (nn.Dense, nn.Conv),
):
    """Within this context, every selected linen Dense / Conv multiplies its input by noise.

    Args:
        noise: a noise for every layer, or a mapping {regex on the kernel path: noise}; layers
            no pattern covers are left clean.
        where: which layers: None (all), a regex searched in the kernel path
            (``"params/Dense_0/kernel"``), or a callable on that path.
        rng_collection: the rng stream the noise draws from.
        deterministic: multiply by E[λ] instead of drawing (the weight-scaling rule).
        layers: the layer types that get noise.

    Raises:
        TypeError: ``where``, ``rng_collection`` or ``layers`` of the wrong type; at apply time,
            a key in ``rngs`` that is not a PRNG key.
        ValueError (at apply time): the noisy apply was given no rng for ``rng_collection``.
    """
    bnoise.check_spec(noise)
    matched: list[str] = []

    _tree.check_where(where)
    _check.collection(rng_collection)
    _check_linen_layers(layers, "input_noise")

    def selected(path: str) -> bool:
        return _tree.matches(where, path, None)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, layers) or not args:
            return next_fun(*args, **kwargs)
        path = _linen_kernel_path(module)
        chosen = selected(path)
        if chosen:
            candidates.append(path)
        layer_noise = bnoise.resolve(noise, path) if chosen else None
        if layer_noise is None:
            return next_fun(*args, **kwargs)
        matched.append(path)
        x = args[0]
        dims = _broadcast_dims(module, x)
        if deterministic:
            x = apply_noise(layer_noise, None, x, deterministic=True)
        else:
            if not module.has_rng(rng_collection):
                raise ValueError(
                    f"a noisy apply needs an rng for {rng_collection!r}: pass "
                    f"rngs={{'{rng_collection}': key}} to apply (or deterministic=True)."
                )
            x = apply_noise(layer_noise, module.make_rng(rng_collection), x, dims)
        return next_fun(x, *args[1:], **kwargs)

    candidates: list[str] = []  # every selected layer, noised or not
    with nn.intercept_methods(interceptor):
        yield matched
    if candidates:  # none: the caller says that ``where`` selects no layer
        bnoise.check_patterns(noise, candidates)


def noisy_apply(
    model: nn.Module,
    noise: NoiseSpec,
    where: _tree.Where = None,
    *,
    rng_collection: str = "noise",
    layers: tuple[type, ...] = (nn.Dense, nn.Conv),
) -> Callable[..., Any]:
    """``model.apply`` with noise on the inputs of every selected Dense / Conv.

    Returns ``apply(variables, *args, rngs=None, deterministic=False, **kwargs)``; the variables
    are the model's own (no new parameters). The first call checks that ``where`` selects at
    least one layer and raises a ValueError naming the layer paths otherwise.

    Raises:
        TypeError: ``model`` is not a linen Module; ``noise``, ``where``, ``rng_collection`` or
            ``layers`` of the wrong type; at apply time, ``variables`` that are not a dict, or
            ``rngs`` that are not a dict of PRNG keys.
        ValueError: an empty noise mapping; at apply time, no rng for ``rng_collection`` (unless
            ``deterministic``), a noise mapping key that matches no layer, or a ``where`` that
            selects none.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, bayesnoise as bn
        >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
        >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))
        >>> apply = bn.nn.noisy_apply(model, bn.noise.Bernoulli(0.8))
        >>> y = apply(params, jnp.ones((3, 4)), rngs={"noise": jax.random.key(1)})
    """
    _check_linen_model(model, "noisy_apply")
    bnoise.check_spec(noise)
    _tree.check_where(where)
    _check.collection(rng_collection)
    _check_linen_layers(layers, "noisy_apply")
    checked = []

    def apply(variables, *args, rngs=None, deterministic: bool = False, **kwargs):
        _check_variables(variables)
        _check_rngs(rngs)
        if not deterministic:
            _require_rng(rngs, rng_collection)
        with input_noise(
            noise,
            where,
            rng_collection=rng_collection,
            deterministic=deterministic,
            layers=layers,
        ) as matched:
            out = model.apply(variables, *args, rngs=rngs, **kwargs)
        if not checked:
            _check_matched(matched, where, variables)
            checked.append(True)
        return out

    return apply


def _check_rngs(rngs: Any) -> None:
    """``rngs`` is None or a mapping {stream name: PRNG key}, as ``model.apply`` takes."""
    if rngs is None:
        return
    if not isinstance(rngs, Mapping):
        raise TypeError(
            f"rngs must be a dict {{stream name: PRNG key}}, e.g. {{'noise': "
            f"jax.random.key(0)}}; got {type(rngs).__name__}: {rngs!r:.80}."
        )
    for name, value in rngs.items():
        _check.key(f"rngs[{name!r}]", value)


def _check_linen_model(model: Any, who: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{who}: model must be a flax.linen Module (e.g. bn.nn.MLP((8, 2))), got "
            f"{type(model).__name__}: {model!r:.80}."
        )


def _check_nnx_model(model: Any, who: str) -> None:
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"{who}: model must be an nnx.Module, got {type(model).__name__}: {model!r:.80}."
        )


def _check_variables(variables: Any) -> None:
    if not isinstance(variables, Mapping):
        raise TypeError(
            f"variables must be the model's variables dict (from model.init), got "
            f"{type(variables).__name__}: {variables!r:.80}."
        )


def _check_init_key(key: Any) -> None:
    """A PRNG key, or a dict {stream name: key}, as ``model.init`` takes."""
    if isinstance(key, Mapping):
        for name, value in key.items():
            _check.key(f"key[{name!r}]", value)
    else:
        _check.key("key", key)


def _check_linen_layers(layers: Any, who: str) -> None:
    """``layers`` is a non-empty tuple of linen module types."""
    _check_layer_bases(layers, who, nn.Module, "linen", "(nn.Dense, nn.Conv)")


def _check_layer_bases(layers: Any, who: str, base: type, kind: str, example: str) -> None:
    try:
        types = tuple(layers)
    except TypeError:
        types = None
    if not types or not all(isinstance(t, type) and issubclass(t, base) for t in types):
        raise TypeError(
            f"{who}: layers must be a non-empty tuple of {kind} layer types, e.g. {example}; "
            f"got {layers!r}."
        )


def _require_rng(rngs: Any, rng_collection: str) -> None:
    if rngs is None or rng_collection not in rngs:
        raise ValueError(
            f"a noisy apply needs an rng for {rng_collection!r}: pass "
            f"rngs={{'{rng_collection}': key}} (or deterministic=True); got rngs={rngs!r}."
        )


def _check_matched(matched: list[str], where: _tree.Where, variables: Any) -> None:
    if not matched:
        paths = [p for p, _ in _tree.row_axes(variables)]
        raise ValueError(
            f"noise selects no layer: where={where!r} matched none of the Dense/Conv "
            f"kernels; the model's leaves are {paths}."
        )


# --------------------------------------------------------------------------------------- NNX

_NOISY_CLASSES: dict[type, type] = {}


def _noisy_class(base: type) -> type:
    """A subclass of ``base`` whose call multiplies the input by noise (cached per base)."""
    if base in _NOISY_CLASSES:
        return _NOISY_CLASSES[base]

    def __call__(self, x, *args, **kwargs):
        noise_layer = self.input_noise
        if noise_layer.deterministic:
            x = apply_noise(noise_layer.noise, None, x, deterministic=True)
        else:
            x = apply_noise(noise_layer.noise, noise_layer.rngs(), x, _broadcast_dims(self, x))
        return base.__call__(self, x, *args, **kwargs)

    cls = type(f"Noisy{base.__name__}", (base,), {"__call__": __call__})
    _NOISY_CLASSES[base] = cls
    return cls


def _is_patched(module: nnx.Module) -> bool:
    """Whether a layer already carries noise of this module (input or learned)."""
    patched = set(_NOISY_CLASSES.values()) | set(_LEARNED_CLASSES.values())
    return type(module) in patched


def _nnx_layers(model: nnx.Module, layers: tuple[type, ...], where: _tree.Where):
    """(kernel path, layer) for every layer of ``layers`` without noise that ``where`` selects."""
    for path, module in list(nnx.iter_modules(model)):
        if not isinstance(module, layers) or _is_patched(module):
            continue
        kpath = "/".join(str(p) for p in path + ("kernel",))
        if _tree.matches(where, kpath, getattr(module, "kernel", None)):
            yield kpath, module


def _nnx_no_layer(model: nnx.Module, layers: tuple[type, ...], where: _tree.Where) -> ValueError:
    names = [
        "/".join(str(p) for p in path) or "(root)"
        for path, m in nnx.iter_modules(model)
        if isinstance(m, layers)
    ]
    return ValueError(
        f"noise selects no layer: where={where!r} matched none of the model's "
        f"{[t.__name__ for t in layers]} layers: {names}."
    )


def add_input_noise(
    model: nnx.Module,
    noise: NoiseSpec,
    rngs: nnx.Rngs,
    where: _tree.Where = None,
    *,
    rng_collection: str = "noise",
    layers: tuple[type, ...] = (nnx.Linear, nnx.Conv),
) -> nnx.Module:
    """Puts multiplicative noise on the inputs of every selected Linear / Conv of an NNX model.

    A graph transform: each selected layer becomes a subclass of its own class that draws λ from
    ``rngs`` and multiplies its input before the original computation. Parameter paths do not
    change, so :func:`bayesnoise.gsm.hierarchy` sees the same tree. The model is changed in place
    and returned. Switch the noise off with :func:`set_deterministic`.

    Args:
        model: an NNX module.
        noise: a noise, or a mapping {regex on the kernel path ("layers/0/kernel"): noise}.
        rngs: an ``nnx.Rngs`` with a ``rng_collection`` (or default) stream.
        where: which layers, by their kernel path: None (all), a regex, or a callable.

    Raises:
        ValueError: no layer is selected (the message lists the model's layer paths), or
            ``rngs`` has no ``rng_collection`` stream.
        TypeError: ``model`` is not an NNX module, ``rngs`` not an ``nnx.Rngs``, or ``noise``,
            ``where``, ``rng_collection`` or ``layers`` of the wrong type.
    """
    _check_nnx_model(model, "add_input_noise")
    bnoise.check_spec(noise)
    _tree.check_where(where)
    _check.collection(rng_collection)
    _check_nnx_layers(layers, "add_input_noise")
    stream_rngs = rngs
    _stream(rngs, rng_collection, "add_input_noise")
    found = []
    selected = list(_nnx_layers(model, layers, where))
    if selected:
        bnoise.check_patterns(noise, [kpath for kpath, _ in selected])
    for kpath, module in selected:
        layer_noise = bnoise.resolve(noise, kpath)
        if layer_noise is None:
            continue
        module.input_noise = NNXMultiplicativeNoise(
            layer_noise, rng_collection=rng_collection, rngs=stream_rngs
        )
        module.__class__ = _noisy_class(type(module))
        found.append(kpath)
    if not found:
        raise _nnx_no_layer(model, layers, where)
    return model


def _check_nnx_layers(layers: Any, who: str) -> None:
    """``layers`` is a non-empty tuple of NNX module types."""
    _check_layer_bases(layers, who, nnx.Module, "NNX", "(nnx.Linear, nnx.Conv)")


def set_deterministic(model: nnx.Module, deterministic: bool = True) -> nnx.Module:
    """Switches every noise of an NNX model on (False) or to the weight-scaling rule (True).

    This covers learned noise (:func:`add_learned_noise`) too: switched off, its layers compute
    the mean network.

    Raises:
        TypeError: ``model`` is not an NNX module, or ``deterministic`` not a bool.
    """
    _check_nnx_model(model, "set_deterministic")
    if not isinstance(deterministic, (bool, np.bool_)):
        raise TypeError(f"deterministic must be True or False, got {deterministic!r}.")
    for _, module in nnx.iter_modules(model):
        if isinstance(module, (NNXMultiplicativeNoise, _NoiseDraws)):
            module.deterministic = deterministic
    return model


# ----------------------------------------------------------------------------- learned noise

LOG_ALPHA = "log_alpha"  # the name of a layer's per-row noise parameter, log α, shape (rows,)
LOG_SIGMA2 = "log_sigma2"  # the name of a layer's per-weight noise parameter, log σ², kernel-shaped
INIT_LOG_ALPHA_RANGE = (-12.0, 12.0)  # allowed initial log α
_PER = ("row", "weight")
_TINY = 1e-8  # guards log θ² and √(variance) at zero


class LearnedNoise(NamedTuple):
    """A linen model with learned noise: a pair of pure functions, like ``model.init`` / ``apply``.

    ``init(key, *args, **kwargs)`` returns the variables: the model's own, at their own paths,
    plus the noise parameters beside each selected kernel. ``apply(variables, *args, rngs=None,
    deterministic=False, **kwargs)`` runs the model with noise drawn from ``rngs``, or the mean
    network when ``deterministic``.
    """

    init: Callable[..., Any]
    apply: Callable[..., Any]


class LearnedLayer(NamedTuple):
    """One layer's learned noise, read from a params tree by :func:`learned_layers`."""

    path: str  # the kernel's path, e.g. "params/Dense_0/kernel"
    per: str  # "row" or "weight"
    kernel: jax.Array  # θ, the variational mean of the weights
    log_alpha: jax.Array  # log α: shape (rows,) for "row", the kernel's shape for "weight"
    variance: jax.Array  # Var[w] per weight, the kernel's shape: α_j θ² (row) or σ² (weight)

    @property
    def weight_log_alpha(self) -> jax.Array:
        """log α per weight: a row's α broadcast over the row's weights."""
        return self.log_alpha if self.per == "weight" else _over_rows(self.log_alpha, self.kernel)


def _over_rows(row_values: jax.Array, kernel: jax.Array) -> jax.Array:
    """One value per kernel row (axis -2) broadcast to the kernel's shape."""
    rows = _tree.broadcast_rows(row_values, kernel.ndim, kernel.ndim - 2)
    return jnp.broadcast_to(rows, kernel.shape)


def _check_learned(per: Any, init_log_alpha: Any) -> None:
    if per not in _PER:
        raise ValueError(
            f"per must be 'row' (one noise variable per input unit and example) or 'weight' "
            f"(one per weight, sparse variational dropout); got {per!r}."
        )
    lo, hi = INIT_LOG_ALPHA_RANGE
    if isinstance(init_log_alpha, (bool, np.bool_, str, bytes)) or init_log_alpha is None:
        raise TypeError(
            f"init_log_alpha must be a finite number in [{lo}, {hi}]; got {init_log_alpha!r}."
        )
    try:
        value = float(init_log_alpha)
    except (TypeError, ValueError):
        raise TypeError(
            f"init_log_alpha must be a finite number in [{lo}, {hi}]; got {init_log_alpha!r}."
        ) from None
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ValueError(
            f"init_log_alpha must be a finite number in [{lo}, {hi}] (α = e^{lo:g} .. e^{hi:g}); "
            f"got {init_log_alpha!r}."
        )


def _check_layer_types(layers: Any, supported: tuple[type, ...], who: str) -> tuple[type, ...]:
    try:
        layers = tuple(layers)
    except TypeError:
        raise TypeError(
            f"{who}: layers must be a tuple of layer types, {[t.__name__ for t in supported]} "
            f"or their subclasses; got {layers!r}."
        ) from None
    bad = [t for t in layers if not (isinstance(t, type) and issubclass(t, supported))]
    if bad or not layers:
        names = [getattr(t, "__name__", repr(t)) for t in bad] or "an empty tuple"
        raise TypeError(
            f"{who} cannot put learned noise on {names}: it handles layers whose output is "
            f"linear in one kernel, {[t.__name__ for t in supported]} and their subclasses."
        )
    return layers


def _row_noise(key: jax.Array, x: jax.Array, log_alpha: jax.Array, dims) -> jax.Array:
    """x ⊙ ξ with ξ = 1 + √α ε, ε ~ N(0, 1) per example and input unit (shared along ``dims``)."""
    eps = jax.random.normal(key, _noise_shape(x.shape, dims), x.dtype)
    return x * (1 + jnp.exp(0.5 * log_alpha).astype(x.dtype) * eps)


def _local_reparam(key: jax.Array, mean: jax.Array, variance: jax.Array) -> jax.Array:
    """A draw of the pre-activations: mean + √variance ε, ε ~ N(0, 1) per output entry."""
    eps = jax.random.normal(key, mean.shape, mean.dtype)
    return mean + jnp.sqrt(variance + _TINY) * eps


def _init_log_sigma2(init_log_alpha: float):
    """log σ² = log α₀ + log θ², so that every weight starts at α = α₀."""
    return lambda _, kernel: init_log_alpha + jnp.log(kernel**2 + _TINY)


def learned_noise(
    model: nn.Module,
    per: str = "row",
    where: _tree.Where = None,
    *,
    init_log_alpha: float = -4.0,
    rng_collection: str = "noise",
    layers: tuple[type, ...] = (nn.Dense, nn.Conv),
) -> LearnedNoise:
    """Noise whose variance is trained with the weights, on every selected Dense / Conv.

    Variational dropout (Kingma, Salimans & Welling, 2015) and sparse variational dropout
    (Molchanov, Ashukha & Vetrov, 2017) on an unmodified linen model, by method interception.

    * ``per="row"``: Gaussian noise on the layer's inputs, h ↦ (h ⊙ ξ) W with ξ_j = 1 + √α_j ε,
      ε ~ N(0, 1), one ξ per input unit j and example (for a Conv: per input channel, shared
      over the positions), so that row j of the kernel is multiplied by ξ_j ~ N(1, α_j). The
      parameter is ``log_alpha``, shape (rows,), beside the kernel.
    * ``per="weight"``: each weight w ~ N(θ, σ²) with the additive reparameterisation: θ is the
      kernel, ``log_sigma2`` (kernel-shaped) is learned and α = σ² / θ². The pre-activations are
      drawn by the local reparameterisation trick, b = x θ + bias + √(x² σ²) ε with ε ~ N(0, 1)
      per example and output (for a Conv, x² convolved with σ², and ε per output position,
      the usual approximation that treats positions as independent).

    Layout: the noise parameter sits in the layer's own scope, e.g.
    ``params/Dense_0/log_alpha`` or ``params/Dense_0/log_sigma2`` beside
    ``params/Dense_0/kernel``; the model's own paths do not change, and ``model.apply`` ignores
    the extra leaves, so ``model.apply(variables, x)`` is the mean network.
    :func:`learned_layers` reads the noise back; :func:`bayesnoise.penalties.learned_noise_kl`
    gives its KL, :func:`bayesnoise.prune.log_alpha` its pruning scores.

    Inference: ``deterministic=True`` runs the mean network (E[ξ] = 1, E[w] = θ), i.e. the
    weight-scaling rule; for Monte Carlo, give ``lambda key, x: apply(variables, x,
    rngs={"noise": key})`` (or :func:`bayesnoise.inference.sampler`) to
    :func:`bayesnoise.inference.mc_predict`.

    Args:
        model: a linen module, unmodified.
        per: ``"row"`` or ``"weight"``.
        where: which layers, by kernel path (``"params/Dense_0/kernel"``): None (all of
            ``layers``), a regex, or a predicate.
        init_log_alpha: the initial log α of every row or weight, in [-12, 12]. The default,
            −4 (α ≈ 0.018, noise std ≈ 0.14), starts close to the plain network. For
            ``"weight"`` the initial log σ² is log α₀ + log(θ² + 1e-8).
        rng_collection: the rng stream the noise draws from.
        layers: the layer types that get noise: ``nn.Dense``, ``nn.Conv`` or subclasses.

    Returns:
        :class:`LearnedNoise` ``(init, apply)``. ``init(key, *args)`` runs without noise (no
        noise rng needed). ``apply(variables, *args, rngs=None, deterministic=False, **kwargs)``.

    Raises:
        ValueError: an unknown ``per``; ``init_log_alpha`` not finite or outside [-12, 12];
            no layer selected (at the first init or apply, naming the model's leaves); a
            noisy apply without an rng for ``rng_collection``.
        TypeError: ``model`` is not a linen Module; ``layers`` holds a type other than Dense /
            Conv; ``init_log_alpha`` is not a number; ``where`` or ``rng_collection`` of the
            wrong type; at init, a ``key`` that is not a PRNG key; at apply, ``variables`` that
            are not a dict or ``rngs`` that are not a dict of PRNG keys.

    Example:
        >>> import jax, jax.numpy as jnp, bayesnoise as bn
        >>> model = bn.nn.MLP((8, 2))
        >>> vd = bn.nn.learned_noise(model, per="weight")
        >>> variables = vd.init(jax.random.key(0), jnp.ones((1, 4)))
        >>> sorted(variables["params"]["Dense_0"])
        ['bias', 'kernel', 'log_sigma2']
        >>> y = vd.apply(variables, jnp.ones((3, 4)), rngs={"noise": jax.random.key(1)})
        >>> mean = model.apply(variables, jnp.ones((3, 4)))  # the mean network

    References:
        Kingma, Salimans & Welling (2015), "Variational Dropout and the Local
        Reparameterization Trick", NeurIPS.
        Molchanov, Ashukha & Vetrov (2017), "Variational Dropout Sparsifies Deep Neural
        Networks", ICML.
    """
    _check_linen_model(model, "learned_noise")
    _check_learned(per, init_log_alpha)
    _tree.check_where(where)
    _check.collection(rng_collection)
    layers = _check_layer_types(layers, (nn.Dense, nn.Conv), "learned_noise")
    init_log_alpha = float(init_log_alpha)

    def run(call, deterministic):
        matched: list[str] = []
        inner: list[bool] = []  # set while the variance pass runs its own copy of a layer

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if inner or context.method_name != "__call__" or not isinstance(module, layers):
                return next_fun(*args, **kwargs)
            path = _linen_kernel_path(module)
            if not args or not _tree.matches(where, path, None):
                return next_fun(*args, **kwargs)
            matched.append(path)
            key = None if deterministic else module.make_rng(rng_collection)
            x = args[0]
            if per == "row":
                shape, init = (x.shape[-1],), nn.initializers.constant(init_log_alpha)
                if key is None:  # the layer's own params first: the plain model's init keys
                    y = next_fun(*args, **kwargs)
                    module.param(LOG_ALPHA, init, shape, module.param_dtype)
                    return y
                log_alpha = module.param(LOG_ALPHA, init, shape, module.param_dtype)
                x = _row_noise(key, x, log_alpha, _broadcast_dims(module, x))
                return next_fun(x, *args[1:], **kwargs)
            y = next_fun(*args, **kwargs)
            kernel = nn.meta.unbox(module.get_variable("params", "kernel"))
            log_sigma2 = module.param(LOG_SIGMA2, _init_log_sigma2(init_log_alpha), kernel)
            if key is None:
                return y
            inner.append(True)
            try:
                variance = module.clone(parent=None, use_bias=False).apply(
                    {"params": {"kernel": jnp.exp(log_sigma2)}}, x * x, *args[1:], **kwargs
                )
            finally:
                inner.pop()
            return _local_reparam(key, y, variance)

        with nn.intercept_methods(interceptor):
            out = call()
        return out, matched

    checked = []

    def init(key, *args, **kwargs):
        _check_init_key(key)
        variables, matched = run(lambda: model.init(key, *args, **kwargs), True)
        _check_matched(matched, where, variables)
        return variables

    def apply(variables, *args, rngs=None, deterministic: bool = False, **kwargs):
        _check_variables(variables)
        _check_rngs(rngs)
        if not deterministic:
            _require_rng(rngs, rng_collection)
        call = lambda: model.apply(variables, *args, rngs=rngs, **kwargs)  # noqa: E731
        out, matched = run(call, deterministic)
        if not checked:
            _check_matched(matched, where, variables)
            checked.append(True)
        return out

    return LearnedNoise(init, apply)


class _NoiseDraws(nnx.Module):
    """The rng stream and the on/off switch of one layer's learned noise (NNX)."""

    def __init__(self, rngs: nnx.Rngs, rng_collection: str):
        self.rngs = _stream(rngs, rng_collection, "add_learned_noise")
        self.deterministic = False


_LEARNED_CLASSES: dict[tuple[type, str], type] = {}


def _learned_class(base: type, per: str) -> type:
    """A subclass of ``base`` with learned noise of kind ``per`` (cached per base and kind)."""
    if (base, per) in _LEARNED_CLASSES:
        return _LEARNED_CLASSES[(base, per)]

    def __call__(self, x, *args, **kwargs):
        draws = self.learned_noise
        key = None if draws.deterministic else draws.rngs()
        if per == "row":
            if key is not None:
                x = _row_noise(key, x, self.log_alpha[...], _broadcast_dims(self, x))
            return base.__call__(self, x, *args, **kwargs)
        y = base.__call__(self, x, *args, **kwargs)
        if key is None:
            return y
        # the layer is linear in its kernel: a copy with kernel σ² and a zero bias gives x² σ²
        copy = nnx.clone(self)
        copy.kernel[...] = jnp.exp(self.log_sigma2[...]).astype(copy.kernel[...].dtype)
        if copy.bias is not None:
            copy.bias[...] = jnp.zeros_like(copy.bias[...])
        variance = base.__call__(copy, x * x, *args, **kwargs)
        return _local_reparam(key, y, variance)

    cls = type(f"Learned{base.__name__}", (base,), {"__call__": __call__})
    _LEARNED_CLASSES[(base, per)] = cls
    return cls


def add_learned_noise(
    model: nnx.Module,
    per: str = "row",
    where: _tree.Where = None,
    *,
    rngs: nnx.Rngs,
    init_log_alpha: float = -4.0,
    rng_collection: str = "noise",
    layers: tuple[type, ...] = (nnx.Linear, nnx.Conv),
) -> nnx.Module:
    """Learned noise on every selected Linear / Conv of an NNX model: :func:`learned_noise`'s
    NNX form, a graph transform like :func:`add_input_noise`.

    Each selected layer becomes a subclass of its own class with a new ``nnx.Param`` beside its
    kernel: ``log_alpha`` (shape (in_features,)) for ``per="row"``, ``log_sigma2`` (the
    kernel's shape) for ``per="weight"``; the noise is the same as in :func:`learned_noise`.
    ``nnx.split(model)`` / ``nnx.state(model, nnx.Param)`` carry the new parameters, so an
    ``nnx.Optimizer`` or an optax loop trains them with the weights, and
    :func:`bayesnoise.penalties.learned_noise_kl` and :func:`bayesnoise.prune.log_alpha` read
    them from the state. :func:`set_deterministic` switches to the mean network. The model is
    changed in place and returned.

    Args:
        model: an NNX module.
        per: ``"row"`` or ``"weight"``.
        where: which layers, by kernel path (``"layers/0/kernel"``): None, a regex, a predicate.
        rngs: an ``nnx.Rngs`` with a ``rng_collection`` (or default) stream for the noise.
        init_log_alpha: the initial log α, in [-12, 12] (default −4).
        rng_collection: the stream of ``rngs`` the noise draws from.
        layers: ``nnx.Linear``, ``nnx.Conv`` or subclasses.

    Raises:
        ValueError: an unknown ``per``, a bad ``init_log_alpha``, ``rngs`` without the stream,
            or no layer selected (the message lists the model's layer paths).
        TypeError: ``model`` is not an NNX module, ``rngs`` not an ``nnx.Rngs``, ``layers``
            holds a type other than Linear / Conv, or ``init_log_alpha``, ``where`` or
            ``rng_collection`` of the wrong type.
    """
    _check_nnx_model(model, "add_learned_noise")
    _check_learned(per, init_log_alpha)
    _tree.check_where(where)
    _check.collection(rng_collection)
    layers = _check_layer_types(layers, (nnx.Linear, nnx.Conv), "add_learned_noise")
    _stream(rngs, rng_collection, "add_learned_noise")
    init_log_alpha = float(init_log_alpha)
    found = []
    for kpath, module in _nnx_layers(model, layers, where):
        kernel = module.kernel[...]
        if per == "row":
            module.log_alpha = nnx.Param(jnp.full((module.in_features,), init_log_alpha))
        else:
            module.log_sigma2 = nnx.Param(_init_log_sigma2(init_log_alpha)(None, kernel))
        module.learned_noise = _NoiseDraws(rngs, rng_collection)
        module.__class__ = _learned_class(type(module), per)
        found.append(kpath)
    if not found:
        raise _nnx_no_layer(model, layers, where)
    return model


def learned_layers(params: Any, *, require: bool = False) -> list[LearnedLayer]:
    """Every layer with learned noise in a params tree (linen variables or an NNX state).

    A layer is a ``log_alpha`` or ``log_sigma2`` leaf with a ``kernel`` leaf beside it (same
    parent path), as :func:`learned_noise` and :func:`add_learned_noise` lay them out. For row
    noise log α is the parameter itself and Var[w_jk] = α_j θ_jk²; for weight noise
    log α = log σ² − log(θ² + 1e-8) and Var[w] = σ².

    Args:
        params: any params tree.
        require: raise when there is no such layer, instead of returning an empty list.

    Returns:
        a list of :class:`LearnedLayer`, in flattening order.

    Raises:
        ValueError: a noise leaf without a kernel beside it, or of the wrong shape; with
            ``require``, no learned noise at all.
    """
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    leaves = {_tree.path_str(p): leaf for p, leaf in flat}
    if require and not any(name.rpartition("/")[2] in (LOG_ALPHA, LOG_SIGMA2) for name in leaves):
        raise ValueError(
            f"the params hold no learned noise (no 'log_alpha' or 'log_sigma2' leaf beside a "
            f"kernel; leaves: {list(leaves)[:8]}); build the model with bn.nn.learned_noise "
            f"or bn.nn.add_learned_noise."
        )
    out = []
    for name, leaf in leaves.items():
        parent, _, last = name.rpartition("/")
        if last not in (LOG_ALPHA, LOG_SIGMA2):
            continue
        kpath = f"{parent}/kernel" if parent else "kernel"
        kernel = leaves.get(kpath)
        if kernel is None or jnp.ndim(kernel) < 2:
            raise ValueError(
                f"the learned-noise leaf {name!r} has no kernel (of two or more axes) beside it "
                f"at {kpath!r}; the leaves are {list(leaves)[:8]}."
            )
        kernel, leaf = jnp.asarray(kernel), jnp.asarray(leaf)
        if last == LOG_ALPHA:
            want = (kernel.shape[-2],)
        else:
            want = kernel.shape
        if leaf.shape != want:
            raise ValueError(
                f"the learned-noise leaf {name!r} has shape {leaf.shape}, but its kernel "
                f"{kpath!r} of shape {kernel.shape} needs {want} (a grouped Conv's row noise "
                f"does not map onto its kernel rows)."
            )
        if last == LOG_ALPHA:
            variance = jnp.exp(_over_rows(leaf, kernel)) * kernel**2
            out.append(LearnedLayer(kpath, "row", kernel, leaf, variance))
        else:
            log_alpha = leaf - jnp.log(kernel**2 + _TINY)
            out.append(LearnedLayer(kpath, "weight", kernel, log_alpha, jnp.exp(leaf)))
    return out


# ----------------------------------------------------------------------------- DropConnect


def dropconnect(key: jax.Array, params: Any, noise: Noise, where: _tree.Where = None) -> Any:
    """Per-weight noise: every weight of a selected leaf multiplied by its own λ.

    The draw is shared by the whole minibatch (the usual implementation of DropConnect). Works
    on any params tree (linen variables, NNX state); leaves are chosen as in
    :func:`bayesnoise.gsm.hierarchy` (kernels by default). The old order
    ``dropconnect(params, key, ...)`` still works, with a DeprecationWarning.

    Raises:
        TypeError: ``key`` is not a PRNG key, ``noise`` is not a noise distribution, or
            ``where`` is not None, a regex or a predicate.
        ValueError: ``where`` selects no leaf of ``params`` (the message lists the leaves).
    """
    if _is_key(params) and not _is_key(key):
        import warnings

        warnings.warn(
            "bn.nn.dropconnect(params, key, ...) is deprecated: the key comes first, "
            "dropconnect(key, params, noise, where).",
            DeprecationWarning,
            stacklevel=2,
        )
        key, params = params, key
    _check.key("key", key)
    bnoise.check_noise(noise)
    _tree.check_where(where)
    axes = _tree.row_axes(params, where)
    if all(a is None for _, a in axes):
        raise ValueError(
            f"dropconnect selects no leaf: where={where!r} matched none of the leaves "
            f"{[p for p, _ in axes][:12]}; allowed: None (every kernel of two or more axes), a "
            f"regex found in one of these paths, or a predicate that selects one."
        )
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    out = [
        leaf if a is None else leaf * noise.sample(k, leaf.shape).astype(leaf.dtype)
        for leaf, (_, a), k in zip(leaves, axes, keys)
    ]
    return jax.tree.unflatten(treedef, out)


def _is_key(x: Any) -> bool:
    """A typed PRNG key, or a raw uint32 key of shape (2,)."""
    if not hasattr(x, "dtype"):
        return False
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return True
    return x.dtype == jnp.uint32 and tuple(x.shape) == (2,)


class MLP(nn.Module):
    """A plain multilayer perceptron: Dense → ReLU → … → Dense (logits), for the examples.

    Attributes:
        features: widths of the hidden layers and the output, e.g. (400, 400, 10).
        activation: the hidden layers' nonlinearity.
        dtype: the computation dtype (e.g. ``jnp.bfloat16`` for mixed precision); params stay
            float32 and the output is float32.

    Raises:
        TypeError: (at init or apply) ``features`` not a sequence of ints, a non-callable
            ``activation``, or an unknown ``dtype``.
        ValueError: (at init or apply) ``features`` empty or holding a width < 1, or an ``x``
            without a batch axis.
    """

    features: tuple[int, ...] = (400, 400, 10)
    activation: Callable[[jax.Array], jax.Array] = nn.relu
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _check_features(self.features)
        if not callable(self.activation):
            raise TypeError(f"MLP: activation must be a callable, got {self.activation!r}.")
        if self.dtype is not None:
            try:
                jnp.dtype(self.dtype)
            except TypeError:
                raise TypeError(
                    f"MLP: dtype must be None or a dtype such as jnp.bfloat16, got {self.dtype!r}."
                ) from None
        if jnp.ndim(x) < 1:
            raise ValueError(
                f"MLP: x must have a leading batch axis, got shape {jnp.shape(x)}; allowed: "
                f"(batch, ...) inputs."
            )
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.features):
            x = nn.Dense(width, dtype=self.dtype)(x)
            if i < len(self.features) - 1:
                x = self.activation(x)
        return x.astype(jnp.float32)


def _check_features(features: Any) -> None:
    """MLP widths: a non-empty sequence of ints >= 1."""
    allowed = "a non-empty tuple of ints >= 1 (the hidden widths, then the output size)"
    if isinstance(features, (str, bytes)) or not isinstance(features, Sequence):
        raise TypeError(f"MLP: features must be {allowed}, got {features!r}.")
    if not all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) for w in features):
        raise TypeError(f"MLP: features must be {allowed}, got {tuple(features)!r}.")
    if not features or any(w < 1 for w in features):
        raise ValueError(f"MLP: features must be {allowed}, got {tuple(features)!r}.")
