"""What the suites share: the registry, the timing helper, the machine and the MNIST data.

Package-internal names without a leading underscore; the suites import them from here, and
:mod:`bayesnoise.bench` re-exports the registry.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

SUITES: dict[str, Callable[..., dict[str, Any]]] = {}


def register(name: str) -> Callable:
    """A decorator adding ``fn`` to :data:`SUITES` under ``name``."""

    def deco(fn):
        SUITES[name] = fn
        return fn

    return deco


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """The median over ``repeats`` calls of the seconds ``fn()`` takes, to ``block_until_ready``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_info() -> dict[str, Any]:
    """The device, backend, device and CPU counts, architecture and JAX version."""
    return {
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.default_backend(),
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
    }


def mnist_train() -> tuple[jax.Array, jax.Array]:
    """MNIST's 50,000 training images (flat, in [0, 1]) and labels, on the device."""
    from bayesnoise import data

    ds = data.load_mnist()
    return jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
