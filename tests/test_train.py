"""Training under noise: the compiled loop, its losses and its checks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bayesnoise as bn


def test_fit_on_digits_learns_under_noise():
    ds = bn.data.load_digits()
    model = bn.nn.MLP((64, 10))
    params = model.init(jax.random.key(0), jnp.ones((1, 64)))
    noise = bn.noise.Bernoulli(0.8)
    apply = bn.nn.noisy_apply(model, noise)
    loss_fn = bn.train.classification_loss(lambda p, x, k: apply(p, x, rngs={"noise": k}))
    xte, yte = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)

    def eval_fn(p):
        logits = model.apply(bn.inference.weight_scale(p, noise), xte)
        return {"test_error": jnp.mean(jnp.argmax(logits, -1) != yte)}

    res = bn.train.fit(
        jax.random.key(1),
        params,
        loss_fn,
        optax.adam(3e-3),
        jnp.asarray(ds.x_train),
        jnp.asarray(ds.y_train),
        epochs=15,
        batch_size=64,
        eval_fn=eval_fn,
    )
    h = res.history
    assert h["loss"].shape == (15,) and h["test_error"].shape == (15,)
    assert float(h["loss"][-1]) < 0.5 * float(h["loss"][0])
    assert float(h["test_error"][-1]) < 0.06


@pytest.mark.parametrize(
    "epochs,batch_size,match",
    [
        (1, 20, r"batch_size must be in \[1, 10\].*got 20"),
        (0, 2, "epochs must be an int >= 1, got 0"),
    ],
)
def test_fit_rejects_bad_sizes(epochs, batch_size, match):
    x, y = jnp.ones((10, 2)), jnp.zeros(10, jnp.int32)
    loss_fn = bn.train.classification_loss(lambda p, x, k: x @ p)
    with pytest.raises(ValueError, match=match):
        bn.train.fit(
            jax.random.key(0),
            jnp.ones((2, 2)),
            loss_fn,
            optax.sgd(0.1),
            x,
            y,
            epochs=epochs,
            batch_size=batch_size,
        )


# ---------------------------------------------------------------- the variational loss


def _vd_problem(per="weight"):
    ds = bn.data.load_digits()
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    vd = bn.nn.learned_noise(bn.nn.MLP((32, 10)), per)
    params = vd.init(jax.random.key(0), x[:1])
    apply = lambda p, xb, k: vd.apply(p, xb, rngs={"noise": k})
    return vd, params, apply, x, y, (jnp.asarray(ds.x_test), jnp.asarray(ds.y_test))


def test_variational_loss_value_and_warmup():
    x = jax.random.normal(jax.random.key(0), (100, 6))
    y = jax.random.randint(jax.random.key(1), (100,), 0, 3)
    vd = bn.nn.learned_noise(bn.nn.MLP((8, 3)), "weight")
    params = vd.init(jax.random.key(2), x[:1])
    apply = lambda p, xb, k: vd.apply(p, xb, rngs={"noise": k})
    n = x.shape[0]
    loss_fn = bn.train.variational_loss(apply, n, kl_weight=0.5, warmup_steps=10)
    key = jax.random.key(3)
    xb, yb = x[:32], y[:32]
    nll = -jnp.mean(bn.train.categorical_log_likelihood(apply(params, xb, key), yb))
    kl = bn.penalties.learned_noise_kl(params)
    jitted = jax.jit(loss_fn)
    for step, ramp in ((0, 0.0), (4, 0.4), (10, 1.0), (25, 1.0)):
        loss, metrics = jitted(params, xb, yb, key, step=step)
        want = float(nll) + 0.5 * ramp * float(kl) / n
        assert float(loss) == pytest.approx(want, rel=1e-5)
        assert float(metrics["kl_scale"]) == pytest.approx(0.5 * ramp)
        assert float(metrics["nll"]) == pytest.approx(float(nll), rel=1e-6)
    no_warmup = bn.train.variational_loss(apply, n)
    loss, _ = no_warmup(params, xb, yb, key)  # no step needed
    assert float(loss) == pytest.approx(float(nll) + float(kl) / n, rel=1e-5)
    with pytest.raises(ValueError, match="warmup_steps=10 needs the step count"):
        loss_fn(params, xb, yb, key)


def test_variational_loss_in_fit_and_in_a_plain_optax_loop():
    vd, params, apply, x, y, (xte, yte) = _vd_problem()
    steps_per_epoch, warmup = x.shape[0] // 64, 30
    loss_fn = bn.train.variational_loss(apply, x.shape[0], warmup_steps=warmup)

    def error(p):
        return float(jnp.mean(jnp.argmax(vd.apply(p, xte, deterministic=True), -1) != yte))

    optimizer = optax.adam(1e-2)
    res = bn.train.fit(jax.random.key(1), params, loss_fn, optimizer, x, y, epochs=3, batch_size=64)
    # fit passes the step count: the epoch means of the warm-up ramp min(1, t / warmup)
    t = jnp.arange(3 * steps_per_epoch).reshape(3, steps_per_epoch)
    want = jnp.minimum(1.0, t / warmup).mean(1)
    assert jnp.allclose(res.history["kl_scale"], want, atol=1e-6)
    assert error(res.params) < 0.15
    # resumed, the warm-up continues from initial_step (and the run is not compiled again)
    more = bn.train.fit(
        jax.random.key(2),
        res.params,
        loss_fn,
        optimizer,
        x,
        y,
        epochs=3,
        batch_size=64,
        opt_state=res.opt_state,
        initial_step=3 * steps_per_epoch,
    )
    assert jnp.all(more.history["kl_scale"] == 1.0)
    # the same loss in a loop of one's own
    p, state = params, optimizer.init(params)

    @jax.jit
    def step(p, state, xb, yb, key, t):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, xb, yb, key, step=t)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    order = np.random.default_rng(0).permutation(x.shape[0])[: steps_per_epoch * 64]
    batches = np.concatenate([order.reshape(-1, 64)] * 3)
    keys = jax.random.split(jax.random.key(4), len(batches))
    for t, (idx, key) in enumerate(zip(batches, keys)):
        p, state, _ = step(p, state, x[idx], y[idx], key, t)
    assert error(p) < 0.15


def test_variational_loss_gaussian_and_custom_likelihoods():
    x = jax.random.normal(jax.random.key(0), (50, 3))
    y = x @ jnp.array([1.0, -2.0, 0.5])
    vd = bn.nn.learned_noise(bn.nn.MLP((1,)), "row")
    params = vd.init(jax.random.key(1), x[:1])
    apply = lambda p, xb, k: vd.apply(p, xb, deterministic=True)
    pred = apply(params, x, None)[:, 0]
    kl = float(bn.penalties.learned_noise_kl(params))
    loss, metrics = bn.train.variational_loss(apply, 50, likelihood="gaussian")(params, x, y, None)
    nll = 0.5 * jnp.mean((y - pred) ** 2) + 0.5 * jnp.log(2 * jnp.pi)
    assert float(loss) == pytest.approx(float(nll) + kl / 50, rel=1e-5)
    assert float(metrics["rmse"]) == pytest.approx(float(jnp.sqrt(jnp.mean((y - pred) ** 2))))
    laplace = lambda out, t: -jnp.abs(out[:, 0] - t)
    loss, metrics = bn.train.variational_loss(apply, 50, kl_weight=0.0, likelihood=laplace)(
        params, x, y, None
    )
    assert float(loss) == pytest.approx(float(jnp.mean(jnp.abs(pred - y))), rel=1e-5)
    assert set(metrics) == {"nll", "kl", "kl_scale"}


def test_variational_loss_rejects_bad_settings():
    apply = lambda p, x, k: x
    with pytest.raises(ValueError, match="kl_weight must be a finite number >= 0; got -0.5"):
        bn.train.variational_loss(apply, 10, kl_weight=-0.5)
    with pytest.raises(ValueError, match="num_data must be a positive int.*got 0"):
        bn.train.variational_loss(apply, 0)
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0; got -1"):
        bn.train.variational_loss(apply, 10, warmup_steps=-1)
    with pytest.raises(ValueError, match="likelihood must be one of.*got 'poisson'"):
        bn.train.variational_loss(apply, 10, likelihood="poisson")


def test_fit_under_vmap_trains_one_network_per_key_as_separate_fits_do():
    x = jax.random.normal(jax.random.key(0), (96, 5))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(jnp.int32)
    model = bn.nn.MLP((8, 2))
    loss = bn.train.classification_loss(lambda p, xb, k: model.apply(p, xb))
    opt = optax.adam(1e-2)

    def one(key):
        res = bn.train.fit(key, model.init(key, x[:1]), loss, opt, x, y, epochs=4, batch_size=16)
        return res.params, res.history["loss"]

    keys = jax.random.split(jax.random.key(1), 3)
    params, losses = jax.vmap(one)(keys)
    assert losses.shape == (3, 4)
    for i, key in enumerate(keys):  # the same as each key's own run
        alone, alone_loss = one(key)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(alone)):
            np.testing.assert_allclose(a[i], b, rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(losses[i], alone_loss, rtol=2e-4)
    assert not np.allclose(losses[0], losses[1])  # different keys, different runs
