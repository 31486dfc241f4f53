"""The exact move that exchanges an MLP's hidden units: the likelihood does not see it, the
prior decides it, and a chain that makes it keeps its target.

Checked against independent computations: the network's outputs before and after, the prior
moments of rows with unequal scales after many moves, the gradient at the moved state by
autodiff, and the always-zero inputs' prior under BAOAB with the move.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bayesnoise as bn
from bayesnoise import moments, sampling

MLP = bn.nn.MLP(features=(6, 5, 3))
X = jax.random.normal(jax.random.key(0), (40, 4))
Y = jax.random.randint(jax.random.key(1), (40,), 0, 3)


def _params(seed=2):
    return MLP.init(jax.random.key(seed), X)


def _log_likelihood(p, x, y):
    logits = MLP.apply(p, x)
    return jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0]


def _hierarchy(params, scales_out=(0.2, 0.5, 1.0, 1.5, 2.0, 3.0)):
    h = bn.gsm.hierarchy(params, 1.0)
    scales = jax.tree.map(jnp.ones_like, h.scales)
    scales["params"]["Dense_1"]["kernel"] = jnp.asarray(scales_out, jnp.float32)
    return h.replace(scales=scales)


def test_unit_swaps_finds_the_layers_and_the_kept_units():
    params = _params()
    move = sampling.unit_swaps(params)
    assert move.layers == (
        (("params/Dense_0/kernel", 1), ("params/Dense_0/bias", 0), ("params/Dense_1/kernel", 0)),
        (("params/Dense_1/kernel", 1), ("params/Dense_1/bias", 0), ("params/Dense_2/kernel", 0)),
    )
    assert move.candidates == (tuple(range(6)), tuple(range(5)))
    h = _hierarchy(params, (1e-4, 0.5, 1e-4, 1.5, 2.0, 3.0))
    kept = sampling.unit_swaps(params, hierarchy=h)
    assert kept.candidates == ((1, 3, 4, 5), tuple(range(5)))


def test_a_swap_leaves_the_network_unchanged_and_permute_follows_it():
    params = _params()
    move = sampling.unit_swaps(params, max_pairs=3)
    # a flat prior accepts every proposed pair
    new, sources, accepted = move(jax.random.key(3), params, lambda p: jnp.zeros(()))
    assert accepted.tolist() == [3, 2]
    assert sorted(np.asarray(sources[0]).tolist()) == list(range(6))
    assert np.any(np.asarray(sources[0]) != np.arange(6))
    k0 = np.asarray(params["params"]["Dense_0"]["kernel"])
    np.testing.assert_array_equal(
        np.asarray(new["params"]["Dense_0"]["kernel"]), k0[:, np.asarray(sources[0])]
    )
    np.testing.assert_allclose(MLP.apply(new, X), MLP.apply(params, X), rtol=1e-5, atol=1e-5)
    assert not np.allclose(
        np.asarray(new["params"]["Dense_1"]["kernel"]),
        np.asarray(params["params"]["Dense_1"]["kernel"]),
    )
    # permute moves any tree shaped like the params as the move moved them
    np.testing.assert_array_equal(
        np.asarray(jax.tree.leaves(move.permute(params, sources))[0]),
        np.asarray(jax.tree.leaves(new)[0]),
    )


@pytest.mark.parametrize("partial", [functools.partial, jax.tree_util.Partial])
def test_the_move_keeps_a_prior_whose_units_differ(partial):
    """Draws from a GSM prior whose hidden units have unequal outgoing scales stay draws from it
    after the move: each row keeps its prior variance. Accepting every swap would mix the rows'
    variances, which this test would see. (A ``jax.tree_util.Partial`` of the GSM prior takes
    the move's factorised path, any other prior the general one.)"""
    params = _params()
    h = _hierarchy(params)
    log_prior = partial(bn.gsm.full_log_prior, hierarchy=h)
    var = bn.gsm.prior_variance(params, h)
    move = sampling.unit_swaps(params, max_pairs=3)
    n = 10_000
    leaves, treedef = jax.tree.flatten(var)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    draws = jax.tree.unflatten(
        treedef,
        [jnp.sqrt(v) * jax.random.normal(k, (n,) + v.shape) for k, v in zip(keys, leaves)],
    )

    def many(key, p):
        def body(p, k):
            p, _, acc = move(k, p, log_prior)
            return p, acc

        return jax.lax.scan(body, p, jax.random.split(key, 5))

    moved, acc = jax.jit(jax.vmap(many))(jax.random.split(jax.random.key(5), n), draws)
    rate = float(np.asarray(acc)[:, :, 0].mean() / 3)
    assert 0.05 < rate < 0.95  # swaps happen, and some are refused
    rows = np.asarray(moved["params"]["Dense_1"]["kernel"])  # (n, 6, 5)
    got = (rows**2).mean(axis=(0, 2))
    want = np.asarray(var["params"]["Dense_1"]["kernel"])[:, 0]
    # the mean of 5 n squares of N(0, v) has relative sd sqrt(2 / (5 n)) = 0.0063
    np.testing.assert_allclose(got / want, 1.0, atol=0.03)
    # every swap accepted would give each row the average variance
    assert got[0] / want[0] < 1.1 and got[-1] / want[-1] > 0.9


def test_the_factorised_path_decides_as_the_whole_prior_does():
    # the GSM prior as a jax.tree_util.Partial: the move reads only the exchanged slices; as a
    # plain function: it evaluates the whole prior at every proposed pair. Same key, same moves.
    params = _params()
    h = _hierarchy(params, (0.3, 0.5, 1.0, 1.2, 2.0, 0.8))
    var = bn.gsm.prior_variance(params, h)
    leaves, treedef = jax.tree.flatten(var)
    keys = jax.random.split(jax.random.key(8), len(leaves))
    move = sampling.unit_swaps(params, max_pairs=3)
    fast = jax.tree_util.Partial(bn.gsm.full_log_prior, hierarchy=h)
    assert sampling._factorised_variances(fast, params) is not None

    def whole(p):
        return bn.gsm.full_log_prior(p, h)

    assert sampling._factorised_variances(whole, params) is None
    accepted = 0
    for t in range(20):
        draw = jax.tree.unflatten(
            treedef,
            [jnp.sqrt(v) * jax.random.normal(jax.random.fold_in(k, t), v.shape)
             for k, v in zip(keys, leaves)],
        )  # fmt: skip
        a, src_a, acc_a = move(jax.random.key(t), draw, fast)
        b, src_b, acc_b = move(jax.random.key(t), draw, whole)
        assert acc_a.tolist() == acc_b.tolist()
        for x, y in zip(src_a, src_b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        accepted += int(np.sum(acc_a))
    assert 0 < accepted < 20 * 5  # some exchanges accepted, some refused


@pytest.mark.parametrize("transform", [bn.sgld, bn.baoab])
def test_a_step_with_the_move_takes_the_gradient_at_the_moved_state(transform):
    params = _params()
    h = _hierarchy(params)
    log_prior = functools.partial(bn.gsm.full_log_prior, hierarchy=h)
    move = sampling.unit_swaps(params, max_pairs=3)
    tx = transform(1e-3)
    state = sampling.init(params, _log_likelihood, log_prior, len(X), transform=tx, move=move)
    batch = (X, Y)
    if transform is bn.baoab:
        state, _ = sampling.step(jax.random.key(6), state, batch)
    key = jax.random.key(7)
    grads = jax.grad(state.kernel.potential)(state.params, batch)
    moved, g = sampling._moved(key, state, grads)
    moved = moved.params
    want, _, _ = move(jax.random.fold_in(key, sampling._MOVE_SALT), state.params, log_prior)
    for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(state.params))
    )
    at_new = jax.grad(state.kernel.potential)(moved, batch)
    if transform is bn.baoab:  # half of the closing kick at the old state, half at the new
        at_new = jax.tree.map(lambda a, b: 0.5 * (a + b), grads, at_new)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(at_new)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-4)


def test_baoab_with_the_move_keeps_the_prior_of_always_zero_inputs():
    """Inputs that are zero in every example leave their first-layer rows at the prior, with
    swaps between hidden units accepted by unequal outgoing scales."""
    x = np.asarray(X).copy()
    x[:, :2] = 0.0
    data = (jnp.asarray(x), Y)
    params = _params()
    h = _hierarchy(params)
    log_prior = jax.tree_util.Partial(bn.gsm.full_log_prior, hierarchy=h)
    result = sampling.run(
        jax.random.key(8),
        params,
        _log_likelihood,
        log_prior,
        data,
        transform=bn.baoab,
        learning_rate=0.1,
        num_burnin=500,
        num_samples=600,
        thin=3,
        num_chains=4,
        move=sampling.unit_swaps(params, max_pairs=3),
    )
    var = np.asarray(moments.variance(result.moments)["params"]["Dense_0"]["kernel"])[:2]
    mean = np.asarray(moments.mean(result.moments)["params"]["Dense_0"]["kernel"])[:2]
    assert abs(var.mean() - 1.0) < 0.2
    assert np.abs(mean).mean() < 0.3


def test_bad_moves_are_clear_errors():
    params = _params()
    with pytest.raises(ValueError) as err:
        sampling.UnitSwaps(((("params/Dense_0/kernel", 1),),), ((0, 0),))
    assert "distinct unit indices" in str(err.value)
    with pytest.raises(ValueError) as err:
        sampling.UnitSwaps((), ())
    assert "non-empty tuple" in str(err.value)
    with pytest.raises(ValueError) as err:
        sampling.UnitSwaps(((("params/Dense_0/kernel", 1),),), ((0, 1),), max_pairs=0)
    assert "max_pairs must be an int >= 1, got 0" in str(err.value)
    with pytest.raises(ValueError) as err:
        sampling.unit_swaps({"w": jnp.zeros(3)})
    assert "at least two dense layers" in str(err.value)
    run = functools.partial(
        sampling.run, jax.random.key(0), params, _log_likelihood, lambda p: jnp.zeros(()), (X, Y)
    )
    bad = sampling.UnitSwaps(((("params/Dense_9/kernel", 1),),), ((0, 1),))
    with pytest.raises(ValueError) as err:
        run(learning_rate=1e-3, num_samples=2, move=bad)
    assert "no leaf 'params/Dense_9/kernel'" in str(err.value)
    with pytest.raises(TypeError) as err:
        run(auto={"swap_invariant": "yes"})
    assert "auto['swap_invariant'] must be True or False, got 'yes'" in str(err.value)
    with pytest.raises(TypeError) as err:
        run(transform=bn.baoab, auto={"carry_preconditioner": 1})
    assert "auto['carry_preconditioner'] must be True or False, got 1" in str(err.value)
    with pytest.raises(ValueError) as err:
        run(transform=bn.baoab, auto={"carry_preconditioner": True, "swap_invariant": True})
    assert "choose one, not both" in str(err.value)
    start = functools.partial(sampling.init, params, _log_likelihood, lambda p: jnp.zeros(()), 40)
    ones = jax.tree.map(jnp.ones_like, params)
    with pytest.raises(ValueError) as err:
        start(transform=bn.sgld(1e-3), preconditioner=ones)
    assert "needs a bn.baoab transform" in str(err.value)
    with pytest.raises(ValueError) as err:
        start(transform=bn.baoab(1e-3), preconditioner={"w": jnp.ones(3)})
    assert "structure of the params" in str(err.value)
    with pytest.raises(ValueError) as err:
        start(transform=bn.baoab(1e-3), preconditioner=jax.tree.map(lambda a: a * jnp.nan, ones))
    assert "must be finite and > 0, got minimum nan" in str(err.value)
    with pytest.raises(TypeError) as err:
        sampling.init(
            params,
            _log_likelihood,
            lambda p: jnp.zeros(()),
            40,
            transform=bn.sgld(1e-3),
            move="swap",
        )
    assert "move must be None, a bn.sampling.UnitSwaps" in str(err.value)
    assert "'swap'" in str(err.value)
    with pytest.raises(TypeError) as err:
        sampling.unit_swaps(params, hierarchy="h")
    assert "hierarchy must be None or a bn.gsm.Hierarchy, got str" in str(err.value)
    with pytest.raises(ValueError) as err:
        sampling.UnitSwaps(((("params/Dense_0/kernel", True),),), ((0, 1),))
    assert "(leaf path, unit axis)" in str(err.value)


def test_e_step_with_unit_swaps_runs_the_move_of_its_hierarchy():
    params = _params()
    h = _hierarchy(params, (1e-4, 0.5, 1e-4, 1.5, 2.0, 3.0))
    # the rows EM switched off start at their prior's scale
    kernel = params["params"]["Dense_1"]["kernel"]
    params["params"]["Dense_1"]["kernel"] = kernel.at[jnp.array([0, 2])].multiply(1e-4)
    log_prior = jax.tree_util.Partial(bn.gsm.full_log_prior, hierarchy=h)
    settings = dict(learning_rate=1e-9, num_samples=20, num_chains=2, batch_size=20)
    key = jax.random.key(9)
    got = bn.em.e_step(key, params, h, _log_likelihood, (X, Y), unit_swaps=True, **settings)
    move = sampling.unit_swaps(params, hierarchy=h)
    assert move.candidates[0] == (1, 3, 4, 5)
    want = sampling.run(key, params, _log_likelihood, log_prior, (X, Y), move=move, **settings)
    mean = functools.partial(jax.tree.map, np.asarray)
    for a, b in zip(
        jax.tree.leaves(mean(moments.mean(got.moments))),
        jax.tree.leaves(mean(moments.mean(want.moments))),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError) as err:
        bn.em.e_step(key, params, h, _log_likelihood, (X, Y), unit_swaps="yes", **settings)
    assert "unit_swaps must be True or False, got 'yes'" in str(err.value)
    with pytest.raises(ValueError) as err:
        bn.em.e_step(
            key, params, h, _log_likelihood, (X, Y), unit_swaps=True, move=move, **settings
        )
    assert "either move= or unit_swaps=True" in str(err.value)


def test_the_config_refuses_unit_swaps_with_pruning_from_the_chains_moments():
    cfg = bn.config.load_config({"sgld": {"unit_swaps": True}})
    assert cfg.sgld.run_settings()["unit_swaps"] is True
    assert "unit_swaps" not in bn.config.load_config({}).sgld.run_settings()
    with pytest.raises(bn.config.ConfigError) as err:
        bn.config.load_config({"sgld": {"unit_swaps": True}, "prune": {"moments": "sgld"}})
    assert "sgld.unit_swaps" in str(err.value) and "prune.moments: laplace" in str(err.value)


def test_the_move_follows_bn_baoab_inside_a_chain_of_transforms():
    params = _params()
    h = _hierarchy(params)
    log_prior = functools.partial(bn.gsm.full_log_prior, hierarchy=h)
    move = sampling.unit_swaps(params, max_pairs=3)
    tx = optax.chain(optax.identity(), bn.baoab(1e-3))
    state = sampling.init(params, _log_likelihood, log_prior, len(X), transform=tx, move=move)
    state, _ = sampling.step(jax.random.key(6), state, (X, Y))
    grads = jax.grad(state.kernel.potential)(state.params, (X, Y))
    moved, g = sampling._moved(jax.random.key(7), state, grads)
    at_new = jax.grad(state.kernel.potential)(moved.params, (X, Y))
    half = jax.tree.map(lambda a, b: 0.5 * (a + b), grads, at_new)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(half)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-4)


@pytest.mark.slow  # a sampling run (9 s): `make test-slow`
def test_a_warning_when_the_weights_converge_with_exchanges_and_the_predictions_do_not(caplog):
    params = _params()
    result = sampling.run(
        jax.random.key(10),
        params,
        _log_likelihood,
        lambda p: -0.5 * sum(jnp.sum(a**2) for a in jax.tree.leaves(p)),
        (X, Y),
        learning_rate=1e-4,
        num_samples=2,
        num_chains=4,
        batch_size=20,
        predict=lambda p, x: jax.nn.softmax(MLP.apply(p, x)),
        predict_inputs=X[:8],
        move=sampling.unit_swaps(params),
    )
    rng = np.random.default_rng(0)
    # 200 kept states per chain: weights drawn independently (mixed); predictions whose chains
    # sit at different values
    c, _, k = np.shape(result.trace)
    mixed = rng.normal(size=(c, 200, k)).astype(np.float32)
    _, _, m, w = np.shape(result.predictive_trace)
    stuck = np.arange(4)[:, None, None, None] + 0.01 * rng.normal(size=(c, 200, m, w))
    ready = result._replace(trace=jnp.asarray(mixed), predictive_trace=jnp.asarray(stuck))
    with caplog.at_level("WARNING", logger="bayesnoise"):
        out = sampling._finish(ready, {}, 1.1, 100.0, move=True)
    assert out.converged
    assert out.settings["predictive_rhat_max"] > 1.1
    assert "predictions on held-out inputs did not" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="bayesnoise"):
        sampling._finish(ready, {}, 1.1, 100.0, move=False)
    assert "did not" not in caplog.text


def _exchanged(tree, move, layer, j, k):
    """``tree`` with units j and k of ``layer`` exchanged in every leaf that holds them."""
    leaves, treedef, index = sampling._leaf_index(tree)
    leaves = list(leaves)
    for path, axis in move.layers[layer]:
        i = index[path]
        x = np.asarray(leaves[i]).copy()
        a, b = np.take(x, j, axis=axis).copy(), np.take(x, k, axis=axis).copy()
        sl = [slice(None)] * x.ndim
        sl[axis] = j
        x[tuple(sl)] = b
        sl[axis] = k
        x[tuple(sl)] = a
        leaves[i] = jnp.asarray(x)
    return jax.tree.unflatten(treedef, leaves)


def test_the_preconditioner_the_exchanges_leave_unchanged():
    """Each candidate unit's slices become their elementwise minimum over the layer's
    candidates (numpy), the other units keep theirs, and an exchange leaves the tree as it is;
    the preconditioned Hessian's largest eigenvalue (dense, on the tiny network) is then the
    same at an exchanged state and at most that under each unit's own multipliers."""
    params = _params()
    h = _hierarchy(params, (1e-4, 0.5, 1e-4, 1.5, 2.0, 3.0))
    move = sampling.unit_swaps(params, hierarchy=h)
    keys = iter(jax.random.split(jax.random.key(5), 16))
    own = jax.tree.map(lambda a: jnp.exp(jax.random.normal(next(keys), a.shape)), params)
    got = move.invariant(own)
    # numpy, layer after layer (a leaf between two layers holds the units of both)
    leaves, _, index = sampling._leaf_index(own)
    want = [np.asarray(a).copy() for a in leaves]
    for layer, cand in zip(move.layers, move.candidates):
        for path, axis in layer:
            x = np.moveaxis(want[index[path]], axis, 0).copy()
            x[list(cand)] = x[list(cand)].min(axis=0)
            want[index[path]] = np.moveaxis(x, 0, axis)
    for a, b, c in zip(jax.tree.leaves(got), want, leaves):
        np.testing.assert_array_equal(np.asarray(a), b)
        assert np.all(np.asarray(a) <= np.asarray(c))
    for layer, cand in enumerate(move.candidates):
        j, k = cand[0], cand[-1]
        swapped = _exchanged(got, move, layer, j, k)
        for a, b in zip(jax.tree.leaves(swapped), jax.tree.leaves(got)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    log_prior = jax.tree_util.Partial(bn.gsm.full_log_prior, hierarchy=h)
    flat, unravel = jax.flatten_util.ravel_pytree(params)

    @jax.jit
    def top(v, m):
        def u(v):
            q = unravel(v)
            return -(jnp.sum(_log_likelihood(q, X, Y)) + log_prior(q))

        s = jnp.sqrt(m)
        return jnp.linalg.eigvalsh(s[:, None] * jax.hessian(u)(v) * s[None, :])[-1]

    def largest(p, m):
        ravel = lambda t: jax.flatten_util.ravel_pytree(t)[0]
        return float(top(ravel(p), ravel(m)))

    base_inv, base_own = largest(params, got), largest(params, own)
    assert base_inv <= base_own * (1 + 1e-5)
    for layer, cand in enumerate(move.candidates):
        moved = _exchanged(params, move, layer, cand[0], cand[1])
        np.testing.assert_allclose(largest(moved, got), base_inv, rtol=1e-4)


@pytest.mark.slow  # four sampling runs with automatic settings: `make test-slow`
def test_the_automatic_settings_take_the_invariant_preconditioner_when_asked():
    """With ``auto["swap_invariant"]`` BAOAB's automatic preconditioner with the move is the one
    without it made invariant (the same curvature at the start), and SGLD's is left unchanged
    by the exchanges; by default the move leaves the preconditioner as it is."""
    params = _params()
    h = _hierarchy(params, (1e-4, 0.5, 1e-4, 1.5, 2.0, 3.0))
    log_prior = jax.tree_util.Partial(bn.gsm.full_log_prior, hierarchy=h)
    move = sampling.unit_swaps(params, hierarchy=h)
    key, data = jax.random.key(11), (X, Y)
    common = dict(num_chains=2, num_traced=4)
    plain, asked = {"max_steps": 40}, {"max_steps": 40, "swap_invariant": True}
    leaves = lambda t: [np.asarray(a) for a in jax.tree.leaves(t)]

    def baoab(**kw):
        return sampling.run(
            key, params, _log_likelihood, log_prior, data, transform=bn.baoab, **common, **kw
        ).settings["preconditioner"]

    own = baoab(auto=plain)
    for a, c in zip(leaves(baoab(auto=plain, move=move)), leaves(own)):
        np.testing.assert_allclose(a, c, rtol=1e-5)
    got = baoab(auto=asked, move=move)
    for a, b, c in zip(leaves(got), leaves(move.invariant(own)), leaves(own)):
        np.testing.assert_allclose(a, b, rtol=1e-5)
        assert np.all(a <= c * (1 + 1e-6))
    assert any(not np.allclose(a, c) for a, c in zip(leaves(got), leaves(own)))
    sgld = sampling.run(
        key, params, _log_likelihood, log_prior, data, move=move, auto=asked, **common
    )
    m = sgld.settings["preconditioner"]
    for a, b in zip(leaves(m), leaves(move.invariant(m))):
        np.testing.assert_array_equal(a, b)


def _carrying(params, h, own, log_likelihood=_log_likelihood, step=1e-3, fixed=None):
    log_prior = jax.tree_util.Partial(bn.gsm.full_log_prior, hierarchy=h)
    move = sampling.unit_swaps(params, max_pairs=3)
    state = sampling.init(
        params,
        log_likelihood,
        log_prior,
        len(X),
        transform=bn.baoab(step, preconditioner=own),
        move=move,
        preconditioner=own,
        prior_precision=fixed,
    )
    return state, move, log_prior


def test_a_carried_preconditioner_moves_with_the_units():
    """An exchange moves the carried multipliers, the momentum and the old gradient's half kick
    exactly as it moves the units' weights (numpy's exchange of the same pairs), and the step
    hands the moved multipliers to bn.baoab: the update is the one of a transform built with
    them."""
    params = _params()
    h = _hierarchy(params, (1.0, 1.0, 1.0, 1.0, 1.0, 1.0))  # every exchange accepted
    keys = iter(jax.random.split(jax.random.key(12), 16))
    own = jax.tree.map(lambda a: jnp.exp(jax.random.normal(next(keys), a.shape)), params)
    state, move, log_prior = _carrying(params, h, own)
    batch = (X, Y)
    state, _ = sampling.step(jax.random.key(6), state, batch)  # a momentum that is not zero
    key = jax.random.key(7)
    grads = jax.grad(state.kernel.potential)(state.params, batch)
    moved, g = sampling._moved(key, state, grads)
    _, sources, accepted = move(
        jax.random.fold_in(key, sampling._MOVE_SALT), state.params, log_prior
    )
    assert int(np.sum(accepted)) > 0
    momentum = state.opt_state.momentum

    def exchanged(tree):  # numpy: unit i after the move is unit sources[layer][i] before it
        leaves, treedef, index = sampling._leaf_index(tree)
        leaves = [np.asarray(a) for a in leaves]
        for layer, src in zip(move.layers, sources):
            for path, axis in layer:
                leaves[index[path]] = np.take(leaves[index[path]], np.asarray(src), axis=axis)
        return jax.tree.unflatten(treedef, leaves)

    for got, want in (
        (moved.preconditioner, exchanged(state.preconditioner)),
        (moved.opt_state.momentum, exchanged(momentum)),
        (moved.params, exchanged(state.params)),
    ):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), b)
    at_new = jax.grad(state.kernel.potential)(moved.params, batch)
    half = jax.tree.map(lambda a, b: 0.5 * (a + b), exchanged(grads), at_new)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(half)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-4)
    # the step: bn.baoab built with the moved multipliers, from the moved momentum
    new, _ = sampling.step(key, state, batch)
    tx = bn.baoab(1e-3, preconditioner=moved.preconditioner)
    updates, _ = tx.update(g, moved.opt_state, moved.params, key=key)
    want = optax.apply_updates(moved.params, updates)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(new.preconditioner), jax.tree.leaves(moved.preconditioner)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_baoab_carrying_its_preconditioner_through_exchanges_keeps_the_target():
    """With no data the posterior is the GSM prior, whose hidden units have unequal outgoing
    scales: BAOAB with the exchanges and multipliers M = T / (c + P) whose own part c differs
    from weight to weight and travels with the units (P, the prior precision, stays in place)
    gives every outgoing row its own prior variance (a Gaussian target: BAOAB's positions are
    exact at any stable step, here h sqrt(λ_max) <= 1 in every arrangement). Exchanges happen,
    and the multipliers end up moved and still of that form."""
    params = _params()
    h = _hierarchy(params)
    keys = iter(jax.random.split(jax.random.key(13), 16))
    var = bn.gsm.prior_variance(params, h)
    prec = jax.tree.map(lambda v, a: jnp.broadcast_to(1.0 / v, a.shape), var, params)
    own = jax.tree.map(lambda q: q * jnp.exp(2.0 * jax.random.normal(next(keys), q.shape)), prec)
    m0 = jax.tree.map(lambda c, q: 1.0 / (c + q), own, prec)
    no_data = lambda p, x, y: jnp.zeros(x.shape[0])
    state, move, _ = _carrying(params, h, m0, no_data, step=1.0, fixed=prec)
    steps, chains = 3000, 64

    def chain(key):
        def body(s, k):
            s, _ = sampling.step(k, s, (X, Y))
            return s, s.params["params"]["Dense_1"]["kernel"]

        s, rows = jax.lax.scan(body, state, jax.random.split(key, steps))
        return rows[steps // 4 :], s.preconditioner

    rows, carried = jax.jit(jax.vmap(chain))(jax.random.split(jax.random.key(14), chains))
    got = np.asarray(jnp.mean(jnp.square(rows), axis=(0, 1, 3)))  # per outgoing row
    want = np.asarray(var["params"]["Dense_1"]["kernel"])[:, 0]
    np.testing.assert_allclose(got / want, 1.0, atol=0.1)
    # the multipliers went with the units: each weight's own part is one of the start's, moved
    start = np.asarray(m0["params"]["Dense_1"]["kernel"])
    end = np.asarray(carried["params"]["Dense_1"]["kernel"])
    assert np.mean(~np.isclose(end, start[None], rtol=1e-5)) > 0.5
    q = np.asarray(prec["params"]["Dense_1"]["kernel"])
    c0 = np.sort((1.0 / start - q).ravel())
    for c in 1.0 / end - q[None]:  # per chain: a rearrangement of the start's own parts
        np.testing.assert_allclose(np.sort(c.ravel()), c0, rtol=1e-3, atol=1e-4)


@pytest.mark.slow  # four short sampling runs with automatic settings: `make test-slow`
def test_baoab_automatic_settings_carry_the_preconditioner_with_a_move_by_default():
    """By default BAOAB's automatic settings with a move let the chains carry the
    preconditioner: the same chains as when asked for, others than with the multipliers kept
    in place; without a move, or with the invariant preconditioner, nothing is carried."""
    params = _params()
    h = _hierarchy(params, (0.3, 0.5, 1.0, 1.5, 2.0, 3.0))
    log_prior = jax.tree_util.Partial(bn.gsm.full_log_prior, hierarchy=h)
    move = sampling.unit_swaps(params, hierarchy=h)

    def run(move=move, **auto):
        return sampling.run(
            jax.random.key(11), params, _log_likelihood, log_prior, (X, Y), transform=bn.baoab,
            num_chains=2, num_traced=4, move=move, auto={"max_steps": 60, **auto},
        )  # fmt: skip

    default, asked, kept = run(), run(carry_preconditioner=True), run(carry_preconditioner=False)
    assert default.settings["carry_preconditioner"] and not kept.settings["carry_preconditioner"]
    for a, b in zip(jax.tree.leaves(default.params), jax.tree.leaves(asked.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(
        not np.allclose(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(default.params), jax.tree.leaves(kept.params))
    )
    assert not run(move=None).settings["carry_preconditioner"]
    assert not run(swap_invariant=True).settings["carry_preconditioner"]
