"""Benchmarks: a registry of suites, each a function returning a JSON-able dict.

``bayesnoise bench --suite sgld --out bench.json`` (or :func:`main`) runs one suite and writes
``{"<suite>": {...}, "device": ..., "jax": ...}``. Suites register themselves with
:func:`register`; :data:`SUITES` maps their names to the functions.

The ``sgld`` suite times :func:`bayesnoise.sampling.run` on an MLP 784-400-400-10 with batches of
128 MNIST images: steps per second for 1, 4, 16 and 64 chains (one vmapped, compiled scan),
with running moments updated every step and without, against BlackJAX's ``sgld`` kernel in a
``jax.lax.scan`` on the same model and data (plus a separate moments pass over its thinned
samples). Every figure is the median over repeats after a warm-up call, timed to
``block_until_ready``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["SUITES", "register", "main"]

SUITES: dict[str, Callable[..., dict[str, Any]]] = {}


def register(name: str) -> Callable:
    """A decorator adding ``fn`` to :data:`SUITES` under ``name``."""

    def deco(fn):
        SUITES[name] = fn
        return fn

    return deco


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _mlp():
    import flax.linen as nn

    class MLP(nn.Module):
        """784-400-400-10 with ReLU."""

        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(400)(x))
            x = nn.relu(nn.Dense(400)(x))
            return nn.Dense(10)(x)

    return MLP()


def _mnist_train() -> tuple[jax.Array, jax.Array]:
    from bayesnoise import data

    ds = data.load_mnist()
    return jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)


@register("sgld")
def sgld_suite(
    *,
    chains: tuple[int, ...] = (1, 4, 16, 64),
    steps: dict[int, int] | None = None,
    repeats: int = 5,
    batch_size: int = 128,
    learning_rate: float = 1e-6,
    seed: int = 0,
) -> dict[str, Any]:
    """SGLD steps per second for several chain counts, and against BlackJAX (1 chain).

    Figures (medians over ``repeats`` timed runs after a compiling warm-up run):

    - ``steps_per_s[C]``: :func:`bayesnoise.sampling.run` with C chains and the running moments
      updated at every step (no thinning: their largest cost); a step advances all C chains.
      Each run includes its first-epoch shuffle of the 50,000 examples per chain.
    - ``steps_per_s_no_moments_1``: one chain, the moments updated once (a burn-in run);
      ``moments_overhead_1 = 1 − steps_per_s["1"] / steps_per_s_no_moments_1``.
    - ``blackjax_steps_per_s``: ``blackjax.sgld`` in a ``jax.lax.scan`` on the same model and
      data, minibatches drawn with replacement on the device, nothing kept but the last state.
    - ``blackjax_with_moments_pass_steps_per_s``: BlackJAX keeping every state, then a separate
      pass of :func:`bayesnoise.moments.update` over them (the same moments as ours).
    - ``ratio_vs_blackjax``: ours with moments / BlackJAX with the moments pass (1 chain), and
      ``ratio_vs_blackjax_sampler_only``: ours without moments / BlackJAX alone.

    The one-chain runs are timed interleaved, so that all see the same machine load.

    Args:
        chains: the chain counts to time.
        steps: SGLD steps per timed run for each chain count.
        repeats: timed runs per figure (at most 3 for more than 4 chains).
        batch_size: examples per minibatch.
        learning_rate: the SGLD step size η (its value does not change the cost).
        seed: PRNG seed.
    """
    from bayesnoise import moments, sampling

    steps = {1: 200, 4: 60, 16: 24, 64: 8, **(steps or {})}
    x, y = _mnist_train()
    num_data = x.shape[0]
    model = _mlp()
    params = model.init(jax.random.key(seed), x[:1])
    num_params = sum(int(np.size(w)) for w in jax.tree.leaves(params))

    def log_likelihood(p, xb, yb):
        return -optax.softmax_cross_entropy_with_integer_labels(model.apply(p, xb), yb)

    def log_prior(p):
        return -0.5 * sum(jnp.sum(w * w) for w in jax.tree.leaves(p))

    def ours(num_chains: int, every_step: bool = True) -> Callable[[], Any]:
        # every_step: moments updated at every step; else only at the last (a burn-in run).
        total = steps[num_chains]
        burnin, samples = (0, total) if every_step else (total - 1, 1)

        def call():
            return sampling.run(
                jax.random.key(seed),
                params,
                log_likelihood,
                log_prior,
                (x, y),
                learning_rate=learning_rate,
                batch_size=batch_size,
                num_burnin=burnin,
                num_samples=samples,
                num_chains=num_chains,
            ).moments

        jax.block_until_ready(call())  # compile and warm up
        return call

    out: dict[str, Any] = {
        "model": "mlp 784-400-400-10 (flax.linen), softmax likelihood, N(0, 1) prior",
        "num_params": num_params,
        "dataset": "mnist",
        "num_data": int(num_data),
        "batch_size": batch_size,
        "repeats": repeats,
        "steps": {str(c): steps[c] for c in chains},
    }
    rates: dict[str, float] = {}
    for c in chains:
        if c == 1:
            continue  # timed below, interleaved with BlackJAX
        call = ours(c)
        rates[str(c)] = steps[c] / _median_time(call, repeats if c <= 4 else min(repeats, 3))

    one, one_no_moments = ours(1), ours(1, every_step=False)
    bj = _blackjax_1chain(
        params, log_likelihood, log_prior, x, y, batch_size, learning_rate, steps[1], seed
    )
    times: dict[str, list[float]] = {"ours": [], "ours_no_moments": []}
    if bj is not None:
        times.update(blackjax=[], blackjax_with_moments_pass=[])
        update = jax.jit(
            lambda s, xs: jax.lax.scan(lambda a, p: (moments.update(a, p), None), s, xs)[0]
        )
        init = moments.init(params)
        jax.block_until_ready(update(init, bj["sample_all"]()))

        def blackjax_with_moments_pass():
            return update(init, bj["sample_all"]())

    for _ in range(repeats):  # interleaved, so that all see the same machine load
        times["ours"].append(_median_time(one, 1))
        times["ours_no_moments"].append(_median_time(one_no_moments, 1))
        if bj is not None:
            times["blackjax"].append(_median_time(bj["sample"], 1))
            times["blackjax_with_moments_pass"].append(_median_time(blackjax_with_moments_pass, 1))
    rate = {k: steps[1] / statistics.median(v) for k, v in times.items()}
    rates["1"] = rate["ours"]
    out["steps_per_s"] = {str(c): rates[str(c)] for c in chains}
    out["chain_steps_per_s"] = {str(c): c * rates[str(c)] for c in chains}
    out["steps_per_s_no_moments_1"] = rate["ours_no_moments"]
    out["moments_overhead_1"] = 1.0 - rate["ours"] / rate["ours_no_moments"]
    if bj is None:
        out["blackjax"] = "not installed (pip install 'bayesnoise[bench]')"
        return out
    out["blackjax_version"] = bj["version"]
    out["blackjax_steps_per_s"] = rate["blackjax"]
    out["blackjax_with_moments_pass_steps_per_s"] = rate["blackjax_with_moments_pass"]
    out["ratio_vs_blackjax"] = rate["ours"] / rate["blackjax_with_moments_pass"]
    out["ratio_vs_blackjax_sampler_only"] = rate["ours_no_moments"] / rate["blackjax"]
    return out


def _blackjax_1chain(params, log_likelihood, log_prior, x, y, batch_size, lr, total, seed):
    """BlackJAX's SGLD on the same model, batches drawn on the device inside a lax.scan."""
    try:
        import blackjax
    except ImportError:
        return None
    num_data = x.shape[0]

    def one_example(p, example):
        xi, yi = example
        return log_likelihood(p, xi[None], yi[None])[0]

    grad_fn = blackjax.sgmcmc.gradients.grad_estimator(log_prior, one_example, num_data)
    kernel = blackjax.sgld(grad_fn)

    def step(position, key):
        k_batch, k_step = jax.random.split(key)
        idx = jax.random.randint(k_batch, (batch_size,), 0, num_data)
        return kernel.step(k_step, position, (x[idx], y[idx]), lr), None

    @jax.jit
    def sample(position, key):
        return jax.lax.scan(step, position, jax.random.split(key, total))[0]

    @jax.jit
    def sample_all(position, key):
        def keep(position, key):
            position, _ = step(position, key)
            return position, position

        return jax.lax.scan(keep, position, jax.random.split(key, total))[1]

    key = jax.random.key(seed + 1)
    jax.block_until_ready(sample(params, key))
    return {
        "sample": lambda: sample(params, key),
        "sample_all": lambda: sample_all(params, key),
        "version": getattr(blackjax, "__version__", "unknown"),
    }


def main(suite: str = "sgld", out: str | os.PathLike | None = None, **kwargs) -> dict[str, Any]:
    """Runs one suite and returns (and with ``out``, writes as JSON) its results.

    Args:
        suite: a name in :data:`SUITES`.
        out: a file to write the JSON to; None prints it only.
        **kwargs: passed to the suite function.

    Raises:
        ValueError: for an unknown suite.
    """
    if suite not in SUITES:
        raise ValueError(f"unknown benchmark suite {suite!r}; known suites: {sorted(SUITES)}.")
    start = time.perf_counter()
    result = {
        suite: SUITES[suite](**kwargs),
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.default_backend(),
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "seconds": None,
    }
    result["seconds"] = time.perf_counter() - start
    text = json.dumps(result, indent=2, default=float)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    print(text)
    return result


@register("prune")
def prune_suite(num_fractions: int = 100, repeats: int = 3) -> dict[str, Any]:
    """The pruning curve over ``num_fractions`` fractions against a Python loop over them,
    on a random 784-400-400-10 MLP evaluated on 10,000 and on 1,000 inputs."""
    from bayesnoise._bench_prune import bench_prune_curve

    return {
        f"inputs_{n}": bench_prune_curve(num_fractions, repeats, batch_size=n)
        for n in (10_000, 1_000)
    }


@register("em")
def em_suite(repeats: int = 5, estep_steps: int = 500, default: bool = True) -> dict[str, Any]:
    """One EM iteration on the MNIST MLP: an SGLD E-step of ``estep_steps`` steps (1 chain,
    batch 128) and the M-step, closed form and numerical (Gamma hyperprior); with ``default``,
    also :func:`bayesnoise.em.e_step` with its automatic settings (4 chains, adaptation
    included, timed once with its compilation, as a user meets it) and the rows of the
    always-zero pixels' variance over their prior variance."""
    from bayesnoise import em, gsm, moments, noise, sampling

    model = _mlp()
    x, y = _mnist_train()
    params = model.init(jax.random.key(0), x[:1])
    h = gsm.hierarchy(params)

    def log_lik(p, xb, yb):
        logits = model.apply(p, xb)
        return jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=-1)[:, 0]

    def log_prior(p):
        return gsm.log_prior(p, h)

    def e_step():
        return sampling.run(
            jax.random.key(1),
            params,
            log_lik,
            log_prior,
            (x, y),
            learning_rate=2e-8,
            batch_size=128,
            num_burnin=0,
            num_samples=estep_steps,
        ).moments.m2

    e_step()
    e_s = _median_time(e_step, repeats)
    second = moments.second_moment(moments.update(moments.init(params), params))
    closed = jax.jit(lambda s, h: em.m_step(s, h))
    numeric = jax.jit(lambda s, h: em.m_step(s, h, noise.Gamma(2.0, 2.0)))
    closed(second, h), numeric(second, h)
    out: dict[str, Any] = {}
    if default:
        t0 = time.perf_counter()
        res = em.e_step(jax.random.key(2), params, h, log_lik, (x, y))
        jax.block_until_ready(res.moments)
        out["default_e_step_s"] = time.perf_counter() - t0
        out["default_e_step_steps"] = int(res.num_steps)
        dead = np.where(np.all(np.asarray(x) == 0, axis=0))[0]
        var = moments.variance(res.moments)["params"]["Dense_0"]["kernel"]
        out["default_e_step_dead_pixel_variance_over_prior"] = float(jnp.mean(var[dead]))
        out["default_e_step_rhat_max"] = float(np.nanmax(res.rhat))
        out["default_e_step_ess_min"] = float(np.nanmin(res.ess))
    return {
        **out,
        "e_step_s": e_s,
        "e_step_steps": estep_steps,
        "m_step_closed_form_s": _median_time(lambda: closed(second, h), repeats),
        "m_step_gamma_numeric_s": _median_time(lambda: numeric(second, h), repeats),
        "num_scales": int(sum(s.size for s in jax.tree.leaves(h.scales))),
    }


@register("pipeline")
def pipeline_suite(config: str | None = None) -> dict[str, Any]:
    """The whole pipeline end to end (``$BAYESNOISE_BENCH_CONFIG`` or configs/mnist.yaml),
    fresh, into a temporary folder: seconds per stage."""
    import tempfile

    from bayesnoise import pipeline
    from bayesnoise.pipeline import config as bconfig

    path = config or os.environ.get("BAYESNOISE_BENCH_CONFIG")
    if path is None:
        path = Path(__file__).resolve().parents[1] / "configs" / "mnist.yaml"
    cfg = bconfig.load_config(path)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        res = pipeline.run(cfg, out, resume=False, progress=False)
        total = time.perf_counter() - start
    return {
        "config": str(path),
        "seconds": total,
        "stages": res["timings"],
        "unpruned": res["unpruned"],
        "breakpoints": res["breakpoints"],
    }
