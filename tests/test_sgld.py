"""SGLD transforms and the sampling driver, checked against exact posteriors and NUTS.

Tolerances come from Monte Carlo standard errors (se = sd / sqrt(ESS), ESS from numpyro's
estimator over all chains) or are stated with the bias they allow for.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bayesnoise.sgld import baoab, polynomial_schedule, psgld, sgld

# ---------------------------------------------------------------------------------------------
# The transforms.


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
@pytest.mark.parametrize("jit", [False, True])
def test_noise_is_jax_random_normal_of_the_leaf_subkeys(jit, impl):
    # η = 0.5 and T = 1 make the update the noise itself: u = −η·0 + sqrt(2 η T) ξ = ξ.
    key = jax.random.key(42, impl=impl)
    grads = {"a": jnp.zeros((400, 10)), "b": jnp.zeros((7,))}
    opt = sgld(0.5, temperature=1.0)
    update = jax.jit(opt.update) if jit else opt.update
    updates, _ = update(grads, opt.init(grads), key=key)
    leaves, treedef = jax.tree.flatten(grads)
    keys = jax.random.split(key, len(leaves))
    expected = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    for got, want in zip(jax.tree.leaves(updates), expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("jit", [False, True])
def test_sgld_update_has_mean_minus_eta_g_and_variance_2_eta_t(jit):
    n, eta, temperature = 200_000, 0.01, 0.5
    grads = {"a": jnp.linspace(-3.0, 3.0, n), "b": jnp.full((2, 5), 7.0)}
    opt = sgld(eta, temperature=temperature, seed=3)
    update = jax.jit(opt.update) if jit else opt.update
    state = opt.init(grads)
    u1, state = update(grads, state)
    u2, state = update(grads, state)
    assert int(state.count) == 2
    # Standardised noise z = (u + η g) / sqrt(2 η T) must be N(0, 1), fresh at every update.
    z1 = np.asarray((u1["a"] + eta * grads["a"]) / np.sqrt(2 * eta * temperature), np.float64)
    z2 = np.asarray((u2["a"] + eta * grads["a"]) / np.sqrt(2 * eta * temperature), np.float64)
    for z in (z1, z2):
        assert abs(z.mean()) < 5 / np.sqrt(n)
        assert abs(z.var() - 1.0) < 5 * np.sqrt(2 / n)
    assert abs(np.corrcoef(z1, z2)[0, 1]) < 5 / np.sqrt(n)
    assert np.asarray(u1["b"]).shape == (2, 5) and np.std(np.asarray(u1["b"])) > 0


def test_sgld_at_zero_temperature_is_gradient_descent_with_the_schedule():
    a, b, gamma = 0.2, 3.0, 0.6
    opt = sgld(polynomial_schedule(a, b, gamma), temperature=0.0)
    g = {"w": jnp.array([1.0, -2.0, 4.0])}
    state = opt.init(g)
    for t in range(4):
        u, state = opt.update(g, state)
        eta_t = 0.5 * a * (b + t) ** (-gamma)  # η_t = ε_t / 2
        np.testing.assert_allclose(u["w"], -eta_t * np.array([1.0, -2.0, 4.0]), rtol=1e-6)


def test_polynomial_schedule_values():
    schedule = polynomial_schedule(a=0.1, b=10.0, gamma=0.55)
    for t in [0, 1, 100, 10_000]:
        expected = 0.5 * 0.1 * (10.0 + t) ** -0.55
        np.testing.assert_allclose(float(schedule(t)), expected, rtol=1e-6)
    np.testing.assert_allclose(float(polynomial_schedule(0.02, 1.0, 1.0)(0)), 0.01, rtol=1e-7)


def test_psgld_preconditioned_update():
    n, eta, decay, eps, temperature = 100_000, 1e-3, 0.9, 1e-2, 0.5
    g1 = jnp.linspace(0.1, 10.0, n)
    g2 = jnp.linspace(-5.0, 5.0, n)
    opt = psgld(eta, decay=decay, eps=eps, temperature=temperature, seed=1)
    state = opt.init({"w": g1})
    v = np.zeros(n)
    for g in (g1, g2):
        u, state = opt.update({"w": g}, state)
        v = decay * v + (1 - decay) * np.asarray(g, np.float64) ** 2  # V first, then G
        precond = 1 / (eps + np.sqrt(v))
        np.testing.assert_allclose(state.nu["w"], v, rtol=1e-5)
        z = (np.asarray(u["w"], np.float64) + eta * precond * np.asarray(g)) / np.sqrt(
            2 * eta * temperature * precond
        )
        assert abs(z.mean()) < 5 / np.sqrt(n)
        assert abs(z.var() - 1.0) < 5 * np.sqrt(2 / n)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: sgld(0.0), "learning_rate.*0.0"),
        (lambda: sgld(-1e-3), "learning_rate.*-0.001"),
        (lambda: sgld(1e-3, temperature=-1.0), "temperature.*-1.0"),
        (lambda: sgld(1e-3, seed="x"), "seed"),
        (lambda: psgld(1e-3, decay=1.0), "decay.*1.0"),
        (lambda: psgld(1e-3, eps=0.0), "eps.*0.0"),
        (lambda: polynomial_schedule(0.1, 1.0, 0.5), r"gamma.*\(0.5, 1\].*0.5"),
        (lambda: polynomial_schedule(0.1, 1.0, 1.5), "gamma.*1.5"),
        (lambda: polynomial_schedule(0.0, 1.0, 0.6), "a .*0.0"),
        (lambda: polynomial_schedule(0.1, 0.0, 0.6), "b .*0.0"),
        (lambda: baoab(0.0), "learning_rate.*0.0"),
        (lambda: baoab(lambda t: 0.1), "constant step h.*schedule"),
        (lambda: baoab(0.1, friction=0.0), "friction.*0.0"),
        (lambda: baoab(0.1, friction=float("inf")), "friction.*inf"),
        (lambda: baoab(0.1, temperature=-1.0), "temperature.*-1.0"),
        (
            lambda: (
                baoab(0.1).init({"w": jnp.zeros(2)})
                and baoab(0.1, preconditioner={"v": jnp.ones(2)}).init({"w": jnp.zeros(2)})
            ),
            "preconditioner",
        ),
    ],
)
def test_transform_bad_inputs(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_optax_chain_compatibility():
    # The transform composes with optax like any other (here: clipping first).
    opt = optax.chain(optax.clip_by_global_norm(1.0), sgld(1e-3, temperature=0.0))
    state = opt.init({"w": jnp.zeros(2)})
    u, _ = opt.update({"w": jnp.array([30.0, 40.0])}, state)
    np.testing.assert_allclose(u["w"], [-0.6e-3, -0.8e-3], rtol=1e-5)


def test_baoab_update_is_the_merged_kick_drift_ou_drift_of_its_docstring():
    # at T = 0 the O step is a plain damping: every figure follows by hand
    h, gamma, m = 0.2, 0.7, np.array([4.0, 1.0])
    opt = baoab(h, friction=gamma, temperature=0.0, preconditioner={"w": jnp.asarray(m)})
    g = np.array([1.0, -2.0])
    state = opt.init({"w": jnp.zeros(2)})
    s, c, p = np.sqrt(m), np.exp(-gamma * h), np.zeros(2)
    for kick in (h / 2, h, h):  # the first update opens with half a kick
        p = p - kick * s * g
        p_new = c * p
        u, state = opt.update({"w": jnp.asarray(g)}, state)
        np.testing.assert_allclose(u["w"], s * (h / 2) * (p + p_new), rtol=1e-5)
        p = p_new
        np.testing.assert_allclose(state.momentum["w"], p, rtol=1e-5)
    assert int(state.count) == 3
    # T > 0: the momentum's noise is sqrt(T (1 − c²)) of the key's normal draws
    opt = baoab(h, friction=gamma, temperature=2.0)
    state = opt.init({"w": jnp.zeros(4000)})
    _, state = opt.update({"w": jnp.zeros(4000)}, state, key=jax.random.key(5))
    sd = float(np.std(np.asarray(state.momentum["w"])))
    assert abs(sd / np.sqrt(2.0 * (1 - np.exp(-2 * gamma * h))) - 1.0) < 0.05


def test_baoab_takes_a_preconditioner_for_one_update():
    # update(..., preconditioner=M2) steps as a transform built with M2, by hand at T = 0,
    # and the next update without it goes back to the transform's own M
    h, gamma = 0.2, 0.7
    m, m2 = np.array([4.0, 1.0]), np.array([0.25, 9.0])
    opt = baoab(h, friction=gamma, temperature=0.0, preconditioner={"w": jnp.asarray(m)})
    g = np.array([1.0, -2.0])
    state = opt.init({"w": jnp.zeros(2)})
    c, p = np.exp(-gamma * h), np.zeros(2)
    for kick, mult, extra in ((h / 2, m2, {"preconditioner": {"w": jnp.asarray(m2)}}),
                              (h, m, {})):  # fmt: skip
        s = np.sqrt(mult)
        p = p - kick * s * g
        p_new = c * p
        u, state = opt.update({"w": jnp.asarray(g)}, state, **extra)
        np.testing.assert_allclose(u["w"], s * (h / 2) * (p + p_new), rtol=1e-5)
        p = p_new
    with pytest.raises(ValueError, match="structure of the params"):
        opt.update({"w": jnp.asarray(g)}, state, preconditioner={"v": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"finite and > 0, got minimum -1\.0"):
        opt.update({"w": jnp.asarray(g)}, state, preconditioner={"w": -jnp.ones(2)})
