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
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from bayesnoise import _tree
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
    "apply_noise",
    "NoiseSpec",
    "MLP",
]

NoiseSpec = bnoise.NoiseSpec


def _noise_shape(shape: tuple[int, ...], broadcast_dims) -> tuple[int, ...]:
    return tuple(1 if i in broadcast_dims else n for i, n in enumerate(shape))


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
    """
    if deterministic:
        return x * jnp.asarray(noise.scale_factor, x.dtype)
    dims = tuple(d % x.ndim for d in broadcast_dims)
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
        self.broadcast_dims = tuple(broadcast_dims)
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


def _conv_broadcast(x: jax.Array, module: nn.Module) -> tuple[int, ...]:
    nspatial = len(module.kernel_size) if hasattr(module, "kernel_size") else x.ndim - 2
    batched = x.ndim > nspatial + 1
    start = 1 if batched else 0
    return tuple(range(start, start + nspatial))


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
        ValueError (at apply time): the noisy apply was given no rng for ``rng_collection``.
    """
    bnoise.check_spec(noise)
    matched: list[str] = []

    _tree.check_where(where)

    def selected(path: str) -> bool:
        return _tree.matches(where, path, None)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, layers) or not args:
            return next_fun(*args, **kwargs)
        path = _linen_kernel_path(module)
        layer_noise = bnoise.resolve(noise, path) if selected(path) else None
        if layer_noise is None:
            return next_fun(*args, **kwargs)
        matched.append(path)
        x = args[0]
        dims = _conv_broadcast(x, module) if isinstance(module, nn.Conv) else ()
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

    with nn.intercept_methods(interceptor):
        yield matched


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

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, bayesnoise as bn
        >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
        >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))
        >>> apply = bn.nn.noisy_apply(model, bn.noise.Bernoulli(0.8))
        >>> y = apply(params, jnp.ones((3, 4)), rngs={"noise": jax.random.key(1)})
    """
    bnoise.check_spec(noise)
    checked = []

    def apply(variables, *args, rngs=None, deterministic: bool = False, **kwargs):
        if not deterministic and (rngs is None or rng_collection not in rngs):
            raise ValueError(
                f"a noisy apply needs an rng for {rng_collection!r}: pass "
                f"rngs={{'{rng_collection}': key}} (or deterministic=True); got rngs={rngs!r}."
            )
        with input_noise(
            noise,
            where,
            rng_collection=rng_collection,
            deterministic=deterministic,
            layers=layers,
        ) as matched:
            out = model.apply(variables, *args, rngs=rngs, **kwargs)
        if not checked:
            if not matched:
                paths = [p for p, _ in _tree.row_axes(variables)]
                raise ValueError(
                    f"noise selects no layer: where={where!r} matched none of the Dense/Conv "
                    f"kernels; the model's leaves are {paths}."
                )
            checked.append(True)
        return out

    return apply


# --------------------------------------------------------------------------------------- NNX

_NOISY_CLASSES: dict[type, type] = {}


def _noisy_class(base: type) -> type:
    """A subclass of ``base`` whose call multiplies the input by noise (cached per base)."""
    if base in _NOISY_CLASSES:
        return _NOISY_CLASSES[base]

    def __call__(self, x, *args, **kwargs):
        noise_layer = self.input_noise
        dims = self._noise_broadcast(x)
        if noise_layer.deterministic:
            x = apply_noise(noise_layer.noise, None, x, deterministic=True)
        else:
            x = apply_noise(noise_layer.noise, noise_layer.rngs(), x, dims)
        return base.__call__(self, x, *args, **kwargs)

    def _noise_broadcast(self, x):
        if isinstance(self, nnx.Conv):
            nspatial = len(self.kernel_size)
            start = 1 if x.ndim > nspatial + 1 else 0
            return tuple(range(start, start + nspatial))
        return ()

    cls = type(
        f"Noisy{base.__name__}",
        (base,),
        {"__call__": __call__, "_noise_broadcast": _noise_broadcast},
    )
    _NOISY_CLASSES[base] = cls
    return cls


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
        ValueError: no layer is selected (the message lists the model's layer paths).
    """
    bnoise.check_spec(noise)
    stream_rngs = rngs
    _stream(rngs, rng_collection, "add_input_noise")
    found = []
    for path, module in list(nnx.iter_modules(model)):
        if not isinstance(module, layers) or type(module).__name__.startswith("Noisy"):
            continue
        kpath = "/".join(str(p) for p in path + ("kernel",))
        if not _tree.matches(where, kpath, getattr(module, "kernel", None)):
            continue
        layer_noise = bnoise.resolve(noise, kpath)
        if layer_noise is None:
            continue
        module.input_noise = NNXMultiplicativeNoise(
            layer_noise, rng_collection=rng_collection, rngs=stream_rngs
        )
        module.__class__ = _noisy_class(type(module))
        found.append(kpath)
    if not found:
        names = [
            "/".join(str(p) for p in path) or "(root)"
            for path, m in nnx.iter_modules(model)
            if isinstance(m, layers)
        ]
        raise ValueError(
            f"noise selects no layer: where={where!r} matched none of the model's "
            f"{[t.__name__ for t in layers]} layers: {names}."
        )
    return model


def set_deterministic(model: nnx.Module, deterministic: bool = True) -> nnx.Module:
    """Switches every noise of an NNX model on (False) or to the weight-scaling rule (True)."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, NNXMultiplicativeNoise):
            module.deterministic = deterministic
    return model


# ----------------------------------------------------------------------------- DropConnect


def dropconnect(key: jax.Array, params: Any, noise: Noise, where: _tree.Where = None) -> Any:
    """Per-weight noise: every weight of a selected leaf multiplied by its own λ.

    The draw is shared by the whole minibatch (the usual implementation of DropConnect). Works
    on any params tree (linen variables, NNX state); leaves are chosen as in
    :func:`bayesnoise.gsm.hierarchy` (kernels by default). The old order
    ``dropconnect(params, key, ...)`` still works, with a DeprecationWarning.
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
    bnoise.check_noise(noise)
    axes = _tree.row_axes(params, where)
    if all(a is None for _, a in axes):
        raise ValueError(
            f"dropconnect selects no leaf (leaves: {[p for p, _ in axes]}); pass `where`."
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
    """

    features: tuple[int, ...] = (400, 400, 10)
    activation: Callable[[jax.Array], jax.Array] = nn.relu
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.features):
            x = nn.Dense(width, dtype=self.dtype)(x)
            if i < len(self.features) - 1:
                x = self.activation(x)
        return x.astype(jnp.float32)
