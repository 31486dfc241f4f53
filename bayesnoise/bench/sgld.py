"""The ``sgld`` suite: the sampler's steps per second, and against BlackJAX.

It times :func:`bayesnoise.sampling.run` on the MLP 784-400-400-10 (:class:`bayesnoise.nn.MLP`)
with batches of 128 MNIST images: steps per second for 1, 4, 16 and 64 chains (one vmapped,
compiled scan), with running moments updated every step and without, against BlackJAX's
``sgld`` kernel in a ``jax.lax.scan`` on the same model and data (plus a separate moments pass
over its thinned samples). Every figure is the median over repeats after a warm-up call, timed
to ``block_until_ready``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bayesnoise.bench._common import median_time, mnist_train, register
from bayesnoise.nn import MLP


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
    x, y = mnist_train()
    num_data = x.shape[0]
    model = MLP()
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
        "model": "mlp 784-400-400-10 (bayesnoise.nn.MLP), softmax likelihood, N(0, 1) prior",
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
        rates[str(c)] = steps[c] / median_time(call, repeats if c <= 4 else min(repeats, 3))

    one, one_no_moments = ours(1), ours(1, every_step=False)
    bj = _blackjax_one_chain(
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
        times["ours"].append(median_time(one, 1))
        times["ours_no_moments"].append(median_time(one_no_moments, 1))
        if bj is not None:
            times["blackjax"].append(median_time(bj["sample"], 1))
            times["blackjax_with_moments_pass"].append(median_time(blackjax_with_moments_pass, 1))
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


def _blackjax_one_chain(params, log_likelihood, log_prior, x, y, batch_size, lr, total, seed):
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
