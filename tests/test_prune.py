import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bayesnoise as bn
from bayesnoise import prune


def mlp_params(key, sizes=(6, 5, 4, 3)):
    layers = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, k1, k2 = jax.random.split(key, 3)
        layers[f"Dense_{i}"] = {
            "kernel": jax.random.normal(k1, (a, b)),
            "bias": jax.random.normal(k2, (b,)),
        }
    return {"params": layers}


def mlp_apply(params, x):
    layers = params["params"]
    for i in range(len(layers)):
        layer = layers[f"Dense_{i}"]
        x = prune.sparse_dense(x, layer["kernel"]) + layer["bias"]
        if i < len(layers) - 1:
            x = jax.nn.relu(x)
    return x


def random_like(key, tree, low=0.0, high=1.0):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    new = [jax.random.uniform(k, x.shape, minval=low, maxval=high) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, new)


def kernels(tree):
    return {k: v["kernel"] for k, v in tree["params"].items()}


# --- scores -----------------------------------------------------------------------------------


def test_scores_exact():
    mean = random_like(jax.random.key(0), mlp_params(jax.random.key(9)), -2.0, 2.0)
    std = random_like(jax.random.key(1), mean, 0.1, 1.0)
    scores = jax.jit(lambda m, s: (prune.snr(m, s), prune.spr(m, s), prune.magnitude(m)))
    refs = [lambda m, s: np.abs(m) / s, lambda m, s: np.abs(m) + s, lambda m, s: np.abs(m)]
    for f, ref in zip(scores(mean, std), refs):
        for got, m, s in zip(jax.tree.leaves(f), jax.tree.leaves(mean), jax.tree.leaves(std)):
            m64, s64 = np.asarray(m, np.float64), np.asarray(s, np.float64)
            np.testing.assert_allclose(got, ref(m64, s64), rtol=1e-6)
    assert jax.tree.structure(prune.snr(mean, std)) == jax.tree.structure(mean)


def test_snr_zero_std():
    got = prune.snr({"w": jnp.array([2.0, -1.0, 0.0, 1.0])}, {"w": jnp.array([0.0, 0.0, 0.0, 2])})
    np.testing.assert_array_equal(got["w"], [np.inf, np.inf, 0.0, 0.5])


def test_scores_mismatched_trees_raise():
    with pytest.raises(ValueError, match="std"):
        prune.snr({"a": jnp.ones(2)}, {"b": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"\(3,\)"):
        prune.spr({"a": jnp.ones(2)}, {"a": jnp.ones(3)})


# --- masks ------------------------------------------------------------------------------------


def expected_kept(fraction, n):
    """round((1 − f) n), half to even, in float32 as the library computes it."""
    return int(np.round((np.float32(1) - np.float32(fraction)) * np.float32(n)))


def reference_mask(scores, fraction):
    """Keep-mask of a flat score vector by numpy's stable argsort."""
    n = scores.size
    removed = n - expected_kept(fraction, n)
    keep = np.ones(n, bool)
    keep[np.argsort(scores, kind="stable")[:removed]] = False
    return keep


@st.composite
def score_trees(draw):
    num = draw(st.integers(1, 4))
    tree = {}
    for i in range(num):
        shape = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
        # few distinct values, so that ties are common
        values = draw(st.lists(st.integers(0, 5), min_size=shape[0] * shape[1], max_size=36))
        kernel = np.asarray(values[: shape[0] * shape[1]], np.float32).reshape(shape)
        tree[f"Dense_{i}"] = {"kernel": kernel, "bias": np.full(shape[1], -1.0, np.float32)}
    return tree


@settings(max_examples=40, deadline=None)
@given(
    tree=score_trees(),
    fraction=st.floats(0, 1).map(lambda f: float(np.float32(f))),
    scope=st.sampled_from(["global", "layer"]),
)
def test_mask_property(tree, fraction, scope):
    keep = prune.mask(tree, fraction, scope)
    assert jax.tree.structure(keep) == jax.tree.structure(tree)
    names = sorted(tree)
    # biases are never pruned by default, even though their scores are the lowest
    for name in names:
        assert keep[name]["bias"].dtype == bool and bool(keep[name]["bias"].all())
    groups = [names] if scope == "global" else [[name] for name in names]
    for group in groups:
        s = np.concatenate([tree[g]["kernel"].ravel() for g in group])
        k = np.concatenate([np.asarray(keep[g]["kernel"]).ravel() for g in group])
        assert k.sum() == expected_kept(fraction, s.size)
        assert abs(int(k.sum()) - (1 - fraction) * s.size) <= 0.5 + 1e-4 * s.size
        if k.any() and (~k).any():
            assert s[k].min() >= s[~k].max()
        np.testing.assert_array_equal(k, reference_mask(s, fraction))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_mask_jit_and_vmap_traced_fraction(scope):
    scores = prune.magnitude(mlp_params(jax.random.key(0)))
    fractions = jnp.linspace(0, 1, 7)
    jitted = jax.jit(prune.mask, static_argnums=2)
    stacked = jax.vmap(lambda f: prune.mask(scores, f, scope))(fractions)
    for i, f in enumerate(np.asarray(fractions)):
        eager = prune.mask(scores, float(f), scope)
        check_trees_equal(eager, jitted(scores, f, scope))
        check_trees_equal(eager, jax.tree.map(lambda x, i=i: x[i], stacked))


def check_trees_equal(a, b):
    chex.assert_trees_all_equal_structs(a, b)
    chex.assert_trees_all_equal(a, b)


def test_ties_are_deterministic():
    scores = {"a": {"kernel": jnp.ones((2, 3))}, "b": {"kernel": jnp.ones((3, 1))}}
    keep = prune.mask(scores, 0.5)
    # 9 weights, keep round(4.5) = 4: the first 5 in flattening order go
    np.testing.assert_array_equal(keep["a"]["kernel"], [[False] * 3, [False, False, True]])
    np.testing.assert_array_equal(keep["b"]["kernel"], [[True], [True], [True]])
    check_trees_equal(keep, jax.jit(prune.mask)(scores, 0.5))
    check_trees_equal(keep, prune.mask(scores, 0.5))


def test_mask_extremes_and_layer_scope():
    scores = prune.magnitude(mlp_params(jax.random.key(0)))
    assert all(bool(x.all()) for x in jax.tree.leaves(prune.mask(scores, 0.0)))
    none = prune.mask(scores, 1.0)
    assert not any(bool(x.any()) for x in jax.tree.leaves(kernels(none)))
    layer = prune.mask(scores, 0.5, "layer")
    for k, s in zip(jax.tree.leaves(kernels(layer)), jax.tree.leaves(kernels(scores))):
        assert int(k.sum()) == expected_kept(0.5, s.size)


def test_biases_selected_on_request():
    params = mlp_params(jax.random.key(0))
    scores = prune.magnitude(params)
    with_b = prune.mask(scores, 0.6, include_biases=True)
    counts = prune.sparsity(with_b)
    n = sum(x.size for x in jax.tree.leaves(params))
    assert counts["total"]["kept"] == expected_kept(0.6, n)
    only_first = prune.mask(scores, 1.0, where="Dense_0/kernel")
    assert not bool(only_first["params"]["Dense_0"]["kernel"].any())
    assert bool(only_first["params"]["Dense_1"]["kernel"].all())
    by_fn = prune.mask(scores, 1.0, where=lambda path, leaf: path.endswith("bias"))
    assert not bool(by_fn["params"]["Dense_2"]["bias"].any())
    assert bool(by_fn["params"]["Dense_2"]["kernel"].all())


# --- apply and sparsity -----------------------------------------------------------------------


def test_apply_and_sparsity():
    params = mlp_params(jax.random.key(0))
    keep = prune.mask(prune.magnitude(params), 0.75)
    pruned = prune.apply(params, keep)
    for w, k, p in zip(jax.tree.leaves(params), jax.tree.leaves(keep), jax.tree.leaves(pruned)):
        np.testing.assert_array_equal(p, np.where(k, w, 0.0))
    counts = prune.sparsity(keep)
    n = sum(w.size for w in jax.tree.leaves(kernels(params)))
    n_bias = sum(w.size for w in jax.tree.leaves(params)) - n
    assert counts["total"]["kept"] == expected_kept(0.75, n) + n_bias
    assert counts["params/Dense_0/bias"] == {"kept": 5, "total": 5, "removed_fraction": 0.0}
    assert prune.sparsity(pruned)["params/Dense_1/kernel"] == counts["params/Dense_1/kernel"]
    # None and missing entries keep the leaf; a row mask broadcasts
    partial = {"params": {"Dense_0": {"kernel": jnp.array([[True], [False]] * 3), "bias": None}}}
    out = prune.apply(params, partial)
    np.testing.assert_array_equal(out["params"]["Dense_0"]["kernel"][1], 0.0)
    np.testing.assert_array_equal(
        out["params"]["Dense_0"]["kernel"][0], params["params"]["Dense_0"]["kernel"][0]
    )
    check_trees_equal(out["params"]["Dense_1"], params["params"]["Dense_1"])


# --- curves -----------------------------------------------------------------------------------


def data(n=64):
    x = jax.random.normal(jax.random.key(5), (n, 6))
    y = jax.random.randint(jax.random.key(6), (n,), 0, 3)
    return x, y


def make_eval():
    x, y = data()

    def eval_fn(p):
        logits = mlp_apply(p, x)
        err = jnp.mean(jnp.argmax(logits, -1) != y)
        return jnp.stack([err, jnp.mean(logits**2)])

    return eval_fn


EVAL = make_eval()


@pytest.mark.parametrize("scope,chunk_size", [("global", None), ("layer", None), ("global", 4)])
def test_curve_equals_python_loop(scope, chunk_size):
    params = mlp_params(jax.random.key(0))
    std = random_like(jax.random.key(1), params, 0.1, 1.0)
    scores = prune.snr(params, std)
    fractions = jnp.linspace(0, 1, 11)
    got = prune.curve(EVAL, params, scores, fractions, scope, chunk_size=chunk_size)
    assert got.shape == (11, 2)
    loop = np.stack(
        [EVAL(prune.apply(params, prune.mask(scores, float(f), scope))) for f in fractions]
    )
    np.testing.assert_array_equal(got[:, 0], loop[:, 0])
    np.testing.assert_allclose(got[:, 1], loop[:, 1], rtol=1e-5)
    # the curve really changes with the fraction: the last point predicts from biases only
    assert not np.allclose(loop[0], loop[-1])


def test_curve_batched_equals_per_seed():
    keys = jax.random.split(jax.random.key(0), 3)
    params = jax.tree.map(lambda *xs: jnp.stack(xs), *[mlp_params(k) for k in keys])
    scores = prune.spr(params, random_like(jax.random.key(1), params, 0.1, 1.0))
    fractions = jnp.array([0.0, 0.3, 0.6, 0.9])
    got = prune.curve(EVAL, params, scores, fractions, batched=True)
    assert got.shape == (3, 4, 2)
    for i in range(3):
        p_i, s_i = jax.tree.map(lambda x, i=i: x[i], (params, scores))
        np.testing.assert_allclose(got[i], prune.curve(EVAL, p_i, s_i, fractions), rtol=1e-6)
    # biases (2-D once stacked) are chosen from per-seed shapes, so they stay unpruned
    bias = prune.curve(bias_sum, params, scores, fractions, batched=True)
    expected = params["params"]["Dense_0"]["bias"].sum(-1)[:, None]
    np.testing.assert_allclose(bias, np.broadcast_to(expected, (3, 4)), rtol=1e-6)


def bias_sum(p):
    return p["params"]["Dense_0"]["bias"].sum()


class UnhashableEval:
    __hash__ = None

    def __call__(self, p):
        return EVAL(p)


def test_curve_unhashable_eval_fn():
    params = mlp_params(jax.random.key(0))
    scores = prune.magnitude(params)
    fractions = jnp.array([0.0, 0.5])
    np.testing.assert_allclose(
        prune.curve(UnhashableEval(), params, scores, fractions),
        prune.curve(EVAL, params, scores, fractions),
        rtol=1e-6,
    )


def test_curve_under_outer_jit():
    params = mlp_params(jax.random.key(0))
    scores = prune.magnitude(params)
    fractions = jnp.linspace(0, 1, 5)
    outer = jax.jit(lambda p, s, f: prune.curve(EVAL, p, s, f))(params, scores, fractions)
    np.testing.assert_allclose(outer, prune.curve(EVAL, params, scores, fractions), rtol=1e-6)


# --- breakpoint -------------------------------------------------------------------------------


def test_breakpoint_hand_made_curves():
    f = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    err = [0.020, 0.021, 0.030, 0.031, 0.025, 0.5]
    assert prune.breakpoint_fraction(f, err, 0.02) == 0.4  # 0.030 ≤ 0.02 + 0.01 (inclusive)
    assert prune.breakpoint_fraction(f, err, 0.02, tolerance=0.005) == 0.2
    # the prefix before the first failure: the recovery at 0.8 does not count
    assert prune.breakpoint_fraction(f, err, 0.02, tolerance=0.0105) == 0.4
    # unsorted input gives the same answer
    assert prune.breakpoint_fraction(f[::-1], err[::-1], 0.02) == 0.4
    assert prune.breakpoint_fraction(f, [0.5] * 6, 0.02) == 0.0
    assert prune.breakpoint_fraction(f, [0.02] * 6, 0.02) == 1.0
    assert prune.breakpoint_fraction(f, [0.02, 0.02, np.nan, 0.02, 0.02, 0.02], 0.02) == 0.2
    # relative: +1% of an RMSE of 2.0 allows 2.02
    rmse = np.float32([2.0, 2.01, 2.02, 2.03, 2.0, 2.0])
    assert prune.breakpoint_fraction(f, rmse, 2.0, relative=True) == 0.4
    assert prune.breakpoint_fraction(f, rmse, 2.0, tolerance=0.02, relative=True) == 1.0


# --- fine-tuning ------------------------------------------------------------------------------


def test_masked_updates_keep_pruned_weights_zero():
    x, y = data()
    params = mlp_params(jax.random.key(0))
    keep = prune.mask(prune.magnitude(params), 0.7)
    pruned = prune.apply(params, keep)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(mlp_apply(p, x), y).mean()

    def finetune(opt, p, steps=5):
        @jax.jit
        def step(p, state):
            updates, state = opt.update(jax.grad(loss)(p), state, p)
            return optax.apply_updates(p, updates), state

        state = opt.init(p)
        for _ in range(steps):
            p, state = step(p, state)
        return p

    tuned = finetune(optax.chain(optax.adam(1e-2), prune.masked_updates(keep)), pruned)
    free = finetune(optax.adam(1e-2), pruned)
    grads = jax.grad(loss)(pruned)
    for t, k, p, g in zip(*map(jax.tree.leaves, (tuned, keep, pruned, grads))):
        t, k, p, g = map(np.asarray, (t, k, p, g))
        np.testing.assert_array_equal(t[~k], 0.0)
        # kept weights with a gradient are fine-tuned
        assert np.all(t[k & (g != 0)] != p[k & (g != 0)])
    # without the mask, Adam moves pruned weights off zero
    assert any(
        np.any(np.asarray(f)[~np.asarray(k)] != 0)
        for f, k in zip(*map(jax.tree.leaves, (free, keep)))
    )
    assert float(loss(tuned)) < float(loss(pruned))
    with pytest.raises(ValueError, match="nope"):
        prune.masked_updates({"nope": jnp.ones(2, bool)}).init(params)
    # "nonzero": the mask read from the pruned start's zeros into the state, so that one
    # transform serves every mask; the same steps as the explicit mask's
    nonzero = optax.chain(optax.adam(1e-2), prune.masked_updates("nonzero"))
    chex.assert_trees_all_equal(finetune(nonzero, pruned), tuned)
    keep2 = prune.mask(prune.magnitude(params), 0.3)
    pruned2 = prune.apply(params, keep2)
    tuned2 = finetune(optax.chain(optax.adam(1e-2), prune.masked_updates(keep2)), pruned2)
    chex.assert_trees_all_equal(finetune(nonzero, pruned2), tuned2)
    assert sum(int(np.sum(np.asarray(t) == 0)) for t in jax.tree.leaves(tuned2)) < sum(
        int(np.sum(np.asarray(t) == 0)) for t in jax.tree.leaves(tuned)
    )
    with pytest.raises(ValueError, match="'nonzero', got 'zeros'"):
        prune.masked_updates("zeros")


# --- sparse export ----------------------------------------------------------------------------


def test_sparse_export_matches_dense_and_shrinks():
    params = mlp_params(jax.random.key(0), sizes=(40, 30, 20, 3))
    scores = prune.magnitude(params)
    x = jax.random.normal(jax.random.key(2), (16, 40))
    dense_bytes = prune.stored_bytes(params)
    sizes, forced = [], []
    for fraction in [0.0, 0.3, 0.6, 0.8, 0.95]:
        keep = prune.mask(scores, fraction)
        sparse = prune.to_sparse(params, keep, always=True)
        kernel = sparse["params"]["Dense_1"]["kernel"]
        assert kernel.nse == int(keep["params"]["Dense_1"]["kernel"].sum())
        assert kernel.indices.dtype == np.int8  # coordinates < 128
        forced.append(prune.stored_bytes(sparse))
        sizes.append(prune.stored_bytes(prune.to_sparse(params, keep)))
    # predictions at the last fraction, eagerly and under jit
    dense = prune.apply(params, keep)
    np.testing.assert_allclose(mlp_apply(sparse, x), mlp_apply(dense, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        jax.jit(mlp_apply)(sparse, x), mlp_apply(dense, x), rtol=1e-5, atol=1e-5
    )
    check_trees_equal(prune.from_sparse(sparse), dense)
    # COO: 4 bytes of data + 2 one-byte coordinates per kept weight; biases stay dense
    n_kernels = sum(w.size for w in jax.tree.leaves(kernels(params)))
    assert forced[0] == dense_bytes + 2 * n_kernels
    assert all(a > b for a, b in zip(forced, forced[1:]))
    # by default a leaf goes sparse only where that is smaller: never above dense, then shrinking
    assert sizes[0] == sizes[1] == dense_bytes
    assert all(a >= b for a, b in zip(sizes, sizes[1:])) and sizes[2] < dense_bytes
    assert sizes[-1] < dense_bytes / 5


# --- bad inputs -------------------------------------------------------------------------------


def test_bad_inputs_name_the_value():
    params = mlp_params(jax.random.key(0))
    scores = prune.magnitude(params)
    with pytest.raises(ValueError, match=r"\[0, 1\].*1\.5"):
        prune.mask(scores, 1.5)
    with pytest.raises(ValueError, match=r"-0\.1"):
        prune.mask(scores, -0.1)
    with pytest.raises(ValueError, match="'foo'"):
        prune.mask(scores, 0.5, "foo")
    with pytest.raises(ValueError, match="'foo'"):
        prune.curve(EVAL, params, scores, jnp.array([0.5]), "foo")
    with pytest.raises(ValueError, match=r"1\.5"):
        prune.curve(EVAL, params, scores, jnp.array([0.5, 1.5]))
    bad = {"params": {**scores["params"], "Dense_9": {"kernel": jnp.ones((2, 2))}}}
    with pytest.raises(ValueError, match="Dense_9"):
        prune.curve(EVAL, params, bad, jnp.array([0.5]))
    with pytest.raises(ValueError, match="Dense_9"):
        prune.apply(params, prune.mask(bad, 0.5))
    with pytest.raises(ValueError, match=r"\(6, 5\)"):
        prune.apply(params, {"params": {"Dense_0": {"kernel": jnp.ones((5, 6), bool)}}})
    with pytest.raises(ValueError, match="prunable"):
        prune.mask({"bias": jnp.ones(3)}, 0.5)
    with pytest.raises(ValueError, match="chunk_size"):
        prune.curve(EVAL, params, scores, jnp.array([0.5]), chunk_size=0)
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
        prune.breakpoint_fraction([0, 0.5, 1], [0.1, 0.2], 0.1)


# --- soft targets -----------------------------------------------------------------------------


def test_breakpoint_old_name_warns_and_agrees():
    f, err = [0.0, 0.5, 0.9], [0.02, 0.025, 0.05]
    with pytest.warns(DeprecationWarning, match="breakpoint_fraction"):
        old = prune.breakpoint(f, err, 0.02)
    assert old == prune.breakpoint_fraction(f, err, 0.02) == 0.5


# ---------------------------------------------------------------------------------------------
# Learned noise: log α scores, the threshold rule, variational moments


def _learned_params(per):
    import bayesnoise as bn

    vd = bn.nn.learned_noise(bn.nn.MLP((5, 3)), per)
    params = vd.init(jax.random.key(0), jnp.ones((1, 4)))
    # distinct log α per row / per weight, spread over [-6, 6], so that every score is known
    for i, name in enumerate(("Dense_0", "Dense_1")):
        layer = params["params"][name]
        shape = layer["kernel"].shape[:1] if per == "row" else layer["kernel"].shape
        size = int(np.prod(shape))
        spread = jax.random.permutation(jax.random.key(10 + i), jnp.linspace(-6, 6, size))
        log_alpha = spread.reshape(shape)
        if per == "row":
            layer["log_alpha"] = log_alpha
        else:
            layer["log_sigma2"] = log_alpha + jnp.log(layer["kernel"] ** 2 + 1e-8)
    return vd, params


def _weight_log_alpha(params, name, per):
    layer = params["params"][name]
    if per == "row":
        return jnp.broadcast_to(layer["log_alpha"][:, None], layer["kernel"].shape)
    return layer["log_sigma2"] - jnp.log(layer["kernel"] ** 2 + 1e-8)


@pytest.mark.parametrize("per", ["row", "weight"])
def test_log_alpha_scores_masks_and_curves(per):
    vd, params = _learned_params(per)
    scores = prune.log_alpha(params)
    for name in ("Dense_0", "Dense_1"):
        got = scores["params"][name]
        np.testing.assert_allclose(got["kernel"], -_weight_log_alpha(params, name, per), rtol=1e-5)
        assert got["bias"] is None and got["log_alpha" if per == "row" else "log_sigma2"] is None
    keep = prune.mask(scores, 0.4)
    names = ("Dense_0", "Dense_1")
    la = np.concatenate([np.ravel(_weight_log_alpha(params, n, per)) for n in names])
    kept = np.concatenate([np.ravel(keep["params"][n]["kernel"]) for n in names])
    assert kept.sum() == round(0.6 * 35) and la[kept].max() <= la[~kept].min()
    assert keep["params"]["Dense_0"]["bias"] is None  # not prunable: kept whole by apply
    x = jax.random.normal(jax.random.key(3), (7, 4))
    count = lambda p: sum(
        jnp.count_nonzero(p["params"][n]["kernel"]) for n in ("Dense_0", "Dense_1")
    )
    np.testing.assert_array_equal(
        prune.curve(count, params, scores, jnp.array([0.0, 0.4, 1.0])), [35, 21, 0]
    )
    mean_out = lambda p: vd.apply(p, x, deterministic=True).sum()
    assert prune.curve(mean_out, params, scores, jnp.array([0.0, 0.5])).shape == (2,)


@pytest.mark.parametrize("per", ["row", "weight"])
def test_learned_moments_give_the_variational_mean_and_std(per):
    _, params = _learned_params(per)
    mean, std = prune.learned_moments(params)
    chex.assert_trees_all_equal(mean, params)
    for name in ("Dense_0", "Dense_1"):
        layer = params["params"][name]
        if per == "row":
            want = jnp.sqrt(jnp.exp(layer["log_alpha"]))[:, None] * jnp.abs(layer["kernel"])
        else:
            want = jnp.exp(0.5 * layer["log_sigma2"])
        np.testing.assert_allclose(std["params"][name]["kernel"], want, rtol=1e-5)
        assert not np.any(std["params"][name]["bias"])
    # SNR = |θ| / σ = α^(-1/2) (with α = σ² / θ² exactly): 2 log SNR = −log α
    snr = prune.snr(mean, std)
    for name in ("Dense_0", "Dense_1"):
        layer = params["params"][name]
        if per == "row":
            want = -jnp.broadcast_to(layer["log_alpha"][:, None], layer["kernel"].shape)
        else:
            want = jnp.log(layer["kernel"] ** 2) - layer["log_sigma2"]
        np.testing.assert_allclose(
            2 * np.log(snr["params"][name]["kernel"]), want, rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("per", ["row", "weight"])
def test_log_alpha_threshold_rule(per):
    _, params = _learned_params(per)
    keep, removed = prune.log_alpha_threshold(params)
    total, dropped = 0, 0
    for name in ("Dense_0", "Dense_1"):
        want = np.asarray(_weight_log_alpha(params, name, per)) < 3.0
        np.testing.assert_array_equal(keep["params"][name]["kernel"], want)
        assert keep["params"][name]["bias"] is None
        total, dropped = total + want.size, dropped + (~want).sum()
    assert 0 < dropped < total
    assert float(removed) == pytest.approx(dropped / total)
    pruned = prune.apply(params, keep)
    np.testing.assert_array_equal(
        pruned["params"]["Dense_0"]["bias"], params["params"]["Dense_0"]["bias"]
    )
    assert int(jnp.sum(pruned["params"]["Dense_1"]["kernel"] == 0)) == int(
        (~np.asarray(keep["params"]["Dense_1"]["kernel"])).sum()
    )
    _, none_removed = jax.jit(prune.log_alpha_threshold)(params, 100.0)
    assert float(none_removed) == 0.0


def test_learned_noise_scores_bad_inputs():
    plain = mlp_params(jax.random.key(0))
    for fn in (prune.log_alpha, prune.learned_moments, prune.log_alpha_threshold):
        with pytest.raises(ValueError, match="hold no learned noise.*params/Dense_0"):
            fn(plain)
    _, params = _learned_params("row")
    with pytest.raises(ValueError, match="threshold must be a number"):
        prune.log_alpha_threshold(params, float("nan"))


def test_iterative_pruning_matches_one_shot_magnitude_when_retraining_changes_nothing():
    w = {
        "a": {"kernel": jax.random.normal(jax.random.key(0), (6, 5))},
        "b": {"kernel": jax.random.normal(jax.random.key(1), (5, 4)), "bias": jnp.ones(4)},
    }
    fractions = [0.3, 0.6, 0.9]
    seen = []

    def retrain(key, params, mask):
        seen.append((params, mask))
        return params

    res = prune.iterative(jax.random.key(2), w, prune.magnitude, fractions, retrain)
    flat = np.abs(np.concatenate([np.ravel(w["a"]["kernel"]), np.ravel(w["b"]["kernel"])]))
    order = np.argsort(flat, kind="stable")
    for i, f in enumerate(fractions):
        kept = np.concatenate(
            [np.ravel(res.masks[i]["a"]["kernel"]), np.ravel(res.masks[i]["b"]["kernel"])]
        )
        expected = np.zeros(flat.size, bool)
        expected[order[flat.size - round((1 - f) * flat.size) :]] = True
        np.testing.assert_array_equal(kept, expected)
        # retrain got the pruned network: removed weights exactly zero, biases whole
        params, mask = seen[i]
        assert np.all(np.asarray(params["a"]["kernel"])[~np.asarray(mask["a"]["kernel"])] == 0)
        np.testing.assert_array_equal(params["b"]["bias"], w["b"]["bias"])
    assert res.fractions == (0.3, 0.6, 0.9) and res.history == [{}, {}, {}]


def test_iterative_pruning_takes_scores_with_unprunable_none_leaves():
    # a learned noise's log alpha scores: None at the biases and at the noise leaves
    vd = bn.nn.learned_noise(bn.nn.MLP((6, 3)), per="weight")
    variables = vd.init(jax.random.key(0), jnp.ones((1, 5)))
    scores = prune.log_alpha(variables)
    res = prune.iterative(
        jax.random.key(1), variables, lambda p: scores, [0.5, 0.8], lambda k, p, m: p
    )
    flat = np.concatenate([np.ravel(scores["params"][k]["kernel"]) for k in ("Dense_0", "Dense_1")])
    kept = np.concatenate(
        [np.ravel(res.masks[-1]["params"][k]["kernel"]) for k in ("Dense_0", "Dense_1")]
    )
    assert kept.size == 48 and (~kept).sum() == round(0.8 * 48)
    assert flat[~kept].max() <= flat[kept].min()  # the lowest -log alpha removed
    assert res.masks[-1]["params"]["Dense_0"]["bias"] is None
    np.testing.assert_array_equal(
        res.params[-1]["params"]["Dense_0"]["bias"], variables["params"]["Dense_0"]["bias"]
    )


def test_iterative_pruning_keeps_removed_weights_removed_and_rescores_the_retrained_net():
    w = {"kernel": jnp.arange(1.0, 13.0).reshape(3, 4)}
    std = {"kernel": jnp.full((3, 4), 100.0)}  # SPR of a zeroed weight is still 100

    def retrain(key, params, mask):  # retraining shrinks the largest kept weight to 0.5
        k = params["kernel"]
        return {"kernel": jnp.where(k == k.max(), 0.5, k)}

    res = prune.iterative(
        jax.random.key(0),
        w,
        lambda p: prune.spr(p, std),
        [0.25, 0.5],
        retrain,
        eval_fn=lambda p: {"sum": float(jnp.sum(p["kernel"]))},
    )
    m1, m2 = (np.asarray(m["kernel"]) for m in res.masks)
    assert m1.sum() == 9 and m2.sum() == 6
    assert not np.any(m2 & ~m1)  # nested: nothing removed comes back
    # round 1 removes 1, 2, 3; the retrained 12 -> 0.5 is now the smallest kept and goes next
    assert not m1.ravel()[:3].any() and m1.ravel()[11]
    assert not m2.ravel()[11] and m2.ravel()[5:11].sum() == 6
    assert res.history[0]["sum"] == pytest.approx(float(np.sum(np.arange(4.0, 12.0))) + 0.5)
    kernel = np.asarray(res.params[-1]["kernel"])
    assert np.all(kernel[~m2] == 0)


def test_iterative_pruning_rejects_bad_schedules():
    w = {"kernel": jnp.ones((2, 2))}
    same = lambda k, p, m: p
    for bad in ([], [0.0, 0.5], [0.5, 0.5], [0.7, 0.5], [0.5, 1.2], "0.5"):
        with pytest.raises(ValueError, match="strictly increasing list of shares in") as e:
            prune.iterative(jax.random.key(0), w, prune.magnitude, bad, same)
        assert repr(bad) in str(e.value)
    with pytest.raises(TypeError, match=r"retrain must be a callable \(key, params, mask\)"):
        prune.iterative(jax.random.key(0), w, prune.magnitude, [0.5], None)
    with pytest.raises(TypeError, match="score_fn must be a callable"):
        prune.iterative(jax.random.key(0), w, "magnitude", [0.5], same)
    ok = prune.iterative(jax.random.key(0), w, prune.magnitude, [0.5, 1.0], same)
    assert int(np.sum(ok.masks[-1]["kernel"])) == 0
