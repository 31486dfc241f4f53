"""The ``em`` suite: one EM iteration on the MNIST MLP, and the default E-step."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bayesnoise.bench._common import median_time, mnist_train, register
from bayesnoise.nn import MLP


@register("em")
def em_suite(repeats: int = 5, estep_steps: int = 500, default: bool = True) -> dict[str, Any]:
    """One EM iteration on the MNIST MLP: an SGLD E-step of ``estep_steps`` steps (1 chain,
    batch 128) and the M-step, closed form and numerical (Gamma hyperprior); with ``default``,
    also :func:`bayesnoise.em.e_step` with its automatic settings (4 chains, adaptation
    included, timed once with its compilation, as a user meets it) and the rows of the
    always-zero pixels' variance over their prior variance."""
    from bayesnoise import em, gsm, moments, noise, sampling

    model = MLP()
    x, y = mnist_train()
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
    e_s = median_time(e_step, repeats)
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
        "m_step_closed_form_s": median_time(lambda: closed(second, h), repeats),
        "m_step_gamma_numeric_s": median_time(lambda: numeric(second, h), repeats),
        "num_scales": int(sum(s.size for s in jax.tree.leaves(h.scales))),
    }
