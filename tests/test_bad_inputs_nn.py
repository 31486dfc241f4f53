"""Bad inputs to bn.nn, bn.train, bn.distill, bn.data and bn.io raise clear errors: the
argument, the value given and what is allowed."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from bad_inputs import bad_count, bad_key, bad_positive, clear_error, not_a_number, not_finite
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import bayesnoise as bn

# the shared value strategies draw floats near the float64 limits; showing them as float32
# overflows harmlessly
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

KEY = jax.random.key(0)
X = jax.random.normal(jax.random.key(1), (12, 5))
Y = jnp.arange(12) % 3
MODEL = bn.nn.MLP((8, 3))
PARAMS = MODEL.init(KEY, X[:1])
NOISE = bn.noise.Bernoulli(0.8)
APPLY = bn.nn.noisy_apply(MODEL, NOISE)
LOSS = bn.train.classification_loss(lambda p, x, k: MODEL.apply(p, x))
OPT = optax.sgd(0.1)


def fit(**changes):
    args = dict(key=KEY, params=PARAMS, loss_fn=LOSS, optimizer=OPT, x=X, y=Y)
    kwargs = dict(epochs=1, batch_size=4)
    for name, value in changes.items():
        (args if name in args else kwargs)[name] = value
    return bn.train.fit(*args.values(), **kwargs)


# ---------------------------------------------------------------------------------------- nn


@settings(max_examples=15, deadline=None)
@given(key=bad_key())
def test_apply_noise_and_dropconnect_reject_a_bad_key(key):
    with clear_error("key", key) as noise_error:
        bn.nn.apply_noise(NOISE, key, X)
    with clear_error("key", key) as dropconnect_error:
        bn.nn.dropconnect(key, PARAMS, NOISE)
    assert noise_error.type is TypeError and dropconnect_error.type is TypeError
    # the same calls with a key draw: some inputs kept (scaled by nothing), some dropped
    kept = np.asarray(bn.nn.apply_noise(NOISE, KEY, X)) != 0
    assert kept.shape == X.shape and 0 < kept.mean() < 1


def test_apply_noise_checks_broadcast_dims_and_x():
    with clear_error("broadcast_dims", "(5,)"):
        bn.nn.apply_noise(NOISE, KEY, X, broadcast_dims=(5,))
    with clear_error("broadcast_dims", "-3"):
        bn.nn.apply_noise(NOISE, KEY, X, broadcast_dims=(-3,))
    with clear_error("broadcast_dims", 1):
        bn.nn.apply_noise(NOISE, KEY, X, 1)
    with clear_error("broadcast_dims", "1.5"):
        bn.nn.apply_noise(NOISE, KEY, X, (1.5,))
    with clear_error("x", "'abc'"):
        bn.nn.apply_noise(NOISE, KEY, "abc")
    with clear_error("noise", None):
        bn.nn.apply_noise(None, KEY, X)
    # the valid forms keep working: negative axes, and no key when deterministic
    assert bn.nn.apply_noise(NOISE, KEY, X, (-1,)).shape == X.shape
    np.testing.assert_allclose(bn.nn.apply_noise(NOISE, None, X, deterministic=True), 0.8 * X)


def test_noisy_apply_rejects_bad_rngs_and_variables():
    errors = []
    with clear_error("rngs['noise']", None) as e:
        APPLY(PARAMS, X[:2], rngs={"noise": None})
    errors.append(e)
    with clear_error("rngs", "PRNGKeyArray") as e:
        APPLY(PARAMS, X[:2], rngs=KEY)
    errors.append(e)
    with clear_error("variables", None) as e:
        APPLY(None, X[:2], rngs={"noise": KEY})
    errors.append(e)
    with clear_error("model", None) as e:
        bn.nn.noisy_apply(None, NOISE)
    errors.append(e)
    with clear_error("rng_collection", 3) as e:
        bn.nn.noisy_apply(MODEL, NOISE, rng_collection=3)
    errors.append(e)
    with clear_error("layers", "int") as e:
        bn.nn.noisy_apply(MODEL, NOISE, layers=(int,))
    errors.append(e)
    assert [e.type for e in errors] == [TypeError] * 6
    assert APPLY(PARAMS, X[:2], rngs={"noise": KEY}).shape == (2, 3)  # the valid call


def test_dropconnect_names_where_when_it_selects_nothing():
    with clear_error("where", "'nomatch'") as e:
        bn.nn.dropconnect(KEY, PARAMS, NOISE, where="nomatch")
    assert e.type is ValueError and "Dense_0" in str(e.value)  # the leaves it could have chosen
    dropped = bn.nn.dropconnect(KEY, PARAMS, NOISE, where="Dense_0")
    np.testing.assert_array_equal(
        dropped["params"]["Dense_1"]["kernel"], PARAMS["params"]["Dense_1"]["kernel"]
    )


@pytest.mark.parametrize(
    "features,shown",
    [((), "()"), ((8, 0, 3), "(8, 0, 3)"), ((-4, 3), "(-4, 3)"), (10, "10"), ((2.5,), "2.5")],
)
def test_mlp_rejects_bad_features(features, shown):
    with clear_error("features", shown) as e:
        bn.nn.MLP(features).init(KEY, X[:1])
    # a tuple with a size out of range is a ValueError; anything else a TypeError
    tuple_of_ints = isinstance(features, tuple) and all(isinstance(f, int) for f in features)
    assert e.type is (ValueError if tuple_of_ints else TypeError)


def test_mlp_rejects_a_bad_activation_dtype_or_input():
    with clear_error("activation", None) as activation:
        bn.nn.MLP((3,), activation=None).init(KEY, X[:1])
    with clear_error("dtype", "'foo'") as dtype:
        bn.nn.MLP((3,), dtype="foo").init(KEY, X[:1])
    with clear_error("x", "()") as scalar:
        bn.nn.MLP((3,)).init(KEY, jnp.ones(()))
    assert (activation.type, dtype.type, scalar.type) == (TypeError, TypeError, ValueError)


def test_learned_noise_and_nnx_transforms_reject_bad_arguments():
    with clear_error("init_log_alpha", "'a'") as e:
        bn.nn.learned_noise(MODEL, init_log_alpha="a")
    assert e.type is TypeError
    with clear_error("model", None):
        bn.nn.learned_noise(None)
    vd = bn.nn.learned_noise(MODEL)
    with clear_error("key", None):
        vd.init(None, X[:1])
    with clear_error("rngs['noise']", None):
        vd.apply(vd.init(KEY, X[:1]), X[:2], rngs={"noise": None})
    linear = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    with clear_error("rngs", None):
        bn.nn.add_input_noise(linear, NOISE, None)
    with clear_error("rngs", None):
        bn.nn.add_learned_noise(linear, rngs=None)
    with clear_error("model", None):
        bn.nn.add_input_noise(None, NOISE, nnx.Rngs(noise=0))
    with clear_error("model", None):
        bn.nn.set_deterministic(None)
    with clear_error("rngs", 3):
        bn.nn.NNXMultiplicativeNoise(NOISE, rngs=3)
    with clear_error("broadcast_dims", 5):
        bn.nn.NNXMultiplicativeNoise(NOISE, broadcast_dims=5)
    # the valid forms: a learned noise's init gives log α at its default beside each kernel
    alphas = [a for a in jax.tree.leaves(vd.init(KEY, X[:1])) if np.all(np.asarray(a) == -4.0)]
    assert alphas


# ------------------------------------------------------------------------------------- train


@pytest.mark.parametrize(
    "argument, values",
    [
        ("key", bad_key()),
        ("epochs", bad_count(1)),
        ("batch_size", bad_count(1)),
        ("initial_step", bad_count(0)),
    ],
)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_fit_rejects_bad_arguments(argument, values, data):
    value = data.draw(values)
    with clear_error(argument, value) as e:
        fit(**{argument: value})
    # what is allowed, in the words of the argument's kind
    assert ("a PRNG key" if argument == "key" else "must be an int") in str(e.value)


def test_fit_rejects_a_string_epochs_and_mismatched_data():
    with clear_error("epochs", "'2'") as epochs:
        fit(epochs="2")
    with clear_error("y", "11") as y:
        fit(y=Y[:11])
    with clear_error("x", None) as none:
        fit(x=None)
    with clear_error("x", "()") as scalar:
        fit(x=jnp.ones(()))
    assert [e.type for e in (epochs, y, none, scalar)] == [
        TypeError,
        ValueError,
        TypeError,
        ValueError,
    ]
    assert "12" in str(y.value)  # the length x has, which y must match


def test_fit_takes_a_list_as_x():
    res = fit(x=np.asarray(X).tolist())
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(res.params))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_fit_rejects_non_finite_data_and_params_before_training(bad):
    with clear_error("x", "index 3") as x:
        fit(x=X.at[3, 1].set(bad))
    regression = bn.train.regression_loss(lambda p, x, k: MODEL.apply(p, x)[:, 0])
    with clear_error("y", "index 5") as y:
        fit(loss_fn=regression, y=jnp.ones(12).at[5].set(bad))
    params = jax.tree.map(lambda leaf: leaf.at[(0,) * leaf.ndim].set(bad), PARAMS)
    with clear_error("params", "params/Dense_0") as p:
        fit(params=params)
    assert [e.type for e in (x, y, p)] == [ValueError] * 3
    assert "1 of 12 examples" in str(x.value) and "1 of 12 examples" in str(y.value)
    assert "must be finite" in str(p.value)
    # the same call with finite data trains
    assert np.isfinite(fit(loss_fn=regression, y=jnp.ones(12)).history["loss"][-1])


def test_fit_rejects_float_labels_for_a_classification_loss():
    with clear_error("y", "float") as e:
        fit(y=Y.astype(jnp.float32) + 0.5)
    assert e.type is TypeError and ".astype(int)" in str(e.value)  # says how to mend it


def test_fit_rejects_bad_functions_and_states():
    with clear_error("loss_fn", None) as loss_none:
        fit(loss_fn=None)
    with clear_error("optimizer", "'adam'") as optimizer:
        fit(optimizer="adam")
    with clear_error("eval_fn", 5) as eval_fn:
        fit(eval_fn=5)
    with clear_error("params", None) as params:
        fit(params=None)
    with clear_error("opt_state", "PyTreeDef({})") as opt_state:
        fit(opt_state={})
    with clear_error("loss_fn", "0.0") as loss_value:
        fit(loss_fn=lambda p, x, y, k: 0.0)
    errors = (loss_none, optimizer, eval_fn, params, opt_state, loss_value)
    assert [e.type for e in errors] == [
        TypeError,
        TypeError,
        TypeError,
        ValueError,
        ValueError,
        TypeError,
    ]
    assert "optax.adam(1e-3)" in str(optimizer.value)  # an example of what is allowed
    assert "optimizer.init(params)" in str(opt_state.value)


def test_categorical_log_likelihood_rejects_bad_labels():
    logits = jnp.zeros((2, 3))
    with clear_error("labels", 7):
        bn.train.categorical_log_likelihood(logits, jnp.array([0, 7]))
    with clear_error("labels", -1):
        bn.train.categorical_log_likelihood(logits, jnp.array([0, -1]))
    with clear_error("labels", "float"):
        bn.train.categorical_log_likelihood(logits, jnp.array([0.0, 1.0]))
    with clear_error("labels", "(3,)"):
        bn.train.categorical_log_likelihood(logits, jnp.array([0, 1, 2]))
    with clear_error("logits", None):
        bn.train.categorical_log_likelihood(None, jnp.array([0, 1]))
    # under jit the labels are not read: the value is computed as before
    out = jax.jit(bn.train.categorical_log_likelihood)(logits, jnp.array([0, 2]))
    np.testing.assert_allclose(out, -np.log(3.0) * np.ones(2), rtol=1e-6)


def test_losses_reject_bad_functions_and_shapes():
    with clear_error("apply_fn", None):
        bn.train.classification_loss(None)
    with clear_error("apply_fn", None):
        bn.train.regression_loss(None)
    regression = bn.train.regression_loss(lambda p, x, k: MODEL.apply(p, x))
    with clear_error("apply_fn", "(12, 3)") as shape:
        regression(PARAMS, X, jnp.ones(12), KEY)
    with clear_error("y", 5) as labels:
        LOSS(PARAMS, X, Y + 5, KEY)
    with clear_error("loss_fn", None):
        bn.train.make_step(None, OPT)
    with clear_error("optimizer", None):
        bn.train.make_step(LOSS, None)
    assert "y's shape (12,)" in str(shape.value)
    assert "12 of 12 out of range" in str(labels.value)
    # the valid calls: a finite loss for labels in range
    loss, _ = LOSS(PARAMS, X, Y, KEY)
    assert np.isfinite(float(loss))


@settings(max_examples=15, deadline=None)
@given(value=st.one_of(not_a_number(), not_finite(), st.floats(max_value=0.5)))
def test_variational_loss_rejects_a_bad_num_data(value):
    with clear_error("num_data", value) as e:
        bn.train.variational_loss(lambda p, x, k: x, value)
    assert "the training set size" in str(e.value)


@settings(max_examples=15, deadline=None)
@given(value=st.one_of(not_a_number(), not_finite(), st.floats(max_value=-1e-9)))
def test_variational_loss_rejects_a_bad_kl_weight(value):
    with clear_error("kl_weight", value) as e:
        bn.train.variational_loss(lambda p, x, k: x, 10, kl_weight=value)
    assert ">= 0" in str(e.value)


@settings(max_examples=15, deadline=None)
@given(value=bad_count(0))
def test_variational_loss_rejects_bad_warmup_steps(value):
    with clear_error("warmup_steps", value) as e:
        bn.train.variational_loss(lambda p, x, k: x, 10, warmup_steps=value)
    assert "an int >= 0" in str(e.value)


# ----------------------------------------------------------------------------------- distill


@pytest.mark.parametrize(
    "sizes,shown", [([], "()"), ([5], "(5,)"), ([3, 2.5], "2.5"), ([3, -2], "-2"), (None, "None")]
)
def test_weight_count_rejects_bad_sizes(sizes, shown):
    with clear_error("layer_sizes", shown) as e:
        bn.distill.weight_count(sizes)
    assert "at least 2" in str(e.value)
    assert bn.distill.weight_count([3, 4, 2]) == 3 * 4 + 4 * 2  # the valid call: kernel weights


@settings(max_examples=15, deadline=None)
@given(value=st.one_of(not_a_number(), not_finite(), st.floats(max_value=0.99)))
def test_student_sizes_rejects_a_bad_budget(value):
    with clear_error("num_weights", value) as e:
        bn.distill.student_sizes([64, 32, 10], value)
    assert isinstance(e.value, (ValueError, TypeError))
    # the valid call: W(h) = 74 h is nearest 1000 at h = 14 (1036 against 962 at h = 13)
    sizes = bn.distill.student_sizes([64, 32, 10], 1000)
    assert sizes == (64, 14, 10) and bn.distill.weight_count(sizes) == 1036


@settings(max_examples=15, deadline=None)
@given(value=st.one_of(bad_positive(), not_a_number()))
def test_soft_target_loss_rejects_a_bad_temperature(value):
    z = jnp.zeros((2, 3))
    with clear_error("temperature", value) as e:
        bn.distill.soft_target_loss(z, z, temperature=value)
    assert isinstance(e.value, (ValueError, TypeError))
    # the valid call: T² KL(softmax(t / T) ‖ softmax(z / T)), zero for equal logits
    assert float(bn.distill.soft_target_loss(z, z, temperature=2.0)) == pytest.approx(0, abs=1e-7)
    t = jnp.array([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    p, q = jax.nn.softmax(t / 2.0), jax.nn.softmax(z / 2.0)
    kl = float(jnp.mean(jnp.sum(p * (jnp.log(p) - jnp.log(q)), -1)))
    assert float(bn.distill.soft_target_loss(z, t, temperature=2.0)) == pytest.approx(
        4 * kl, rel=1e-5
    )


@settings(max_examples=15, deadline=None)
@given(
    value=st.one_of(
        not_finite(),
        not_a_number(),
        st.floats(max_value=-1e-9),
        st.floats(min_value=1.0, exclude_min=True, allow_infinity=False),
    )
)
def test_soft_target_loss_rejects_a_bad_alpha(value):
    z = jnp.zeros((2, 3))
    with clear_error("alpha", value) as e:
        bn.distill.soft_target_loss(z, z, jnp.array([0, 1]), alpha=value)
    assert isinstance(e.value, (ValueError, TypeError))
    valid = bn.distill.soft_target_loss(z, z, jnp.array([0, 1]), alpha=0.5)
    assert np.isfinite(float(valid)) and float(valid) > 0


def test_soft_target_loss_rejects_bad_labels_and_logits():
    z = jnp.zeros((2, 3))
    with clear_error("labels", 5):
        bn.distill.soft_target_loss(z, z, jnp.array([0, 5]), alpha=0.5)
    with clear_error("labels", "float32"):
        bn.distill.soft_target_loss(z, z, jnp.array([0.0, 1.0]), alpha=0.5)
    with clear_error("student_logits", None) as e:
        bn.distill.soft_target_loss(None, z)
    assert isinstance(e.value, TypeError | ValueError)
    # labels in range: the hard-label term of uniform logits is log 3 as well
    loss = bn.distill.soft_target_loss(z, z, jnp.array([0, 2]), alpha=1.0)
    assert float(loss) == pytest.approx(np.log(3), rel=1e-5)


# -------------------------------------------------------------------------------------- data


def test_load_mnist_names_a_folder_given_as_path(tmp_path):
    with clear_error("path", str(tmp_path), kinds=(FileNotFoundError,)) as e:
        bn.data.load_mnist(path=tmp_path)
    assert type(e.value) is FileNotFoundError and "folder" in str(e.value)


def test_data_rejects_a_bad_name_or_text():
    with clear_error("data set", "[]"):
        bn.data.load([])
    with clear_error("text", None) as e:
        bn.data.tokenize(None)
    assert isinstance(e.value, (TypeError, ValueError))
    assert bn.data.load("digits").x_train.shape[1] == 64  # a valid name loads


# ---------------------------------------------------------------------------------------- io


def test_save_names_a_file_in_the_way(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with clear_error("path", str(blocker), kinds=(NotADirectoryError,)):
        bn.io.save(blocker / "x.msgpack", {"w": jnp.ones(2)})
    with clear_error("path", str(tmp_path / "no"), kinds=(FileNotFoundError,)):
        bn.io.save(tmp_path / "no" / "x.msgpack", {"w": jnp.ones(2)})
    with clear_error("path", str(tmp_path), kinds=(IsADirectoryError,)):
        bn.io.save(tmp_path, {"w": jnp.ones(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@settings(max_examples=15, deadline=None)
@given(path=st.one_of(st.none(), st.integers(), st.just(b"x.msgpack"), st.just("")))
def test_save_and_load_reject_a_path_that_is_not_one(path):
    with clear_error("path", path) as saving:
        bn.io.save(path, {"w": 1})
    with clear_error("path", path) as loading:
        bn.io.load(path)
    assert isinstance(saving.value, (TypeError, ValueError))
    assert isinstance(loading.value, (TypeError, ValueError))


def test_save_names_the_tree_and_the_place_of_a_bad_leaf(tmp_path):
    path = tmp_path / "t.msgpack"
    with clear_error("tree", "['f']"):
        bn.io.save(path, {"f": lambda v: v})
    with clear_error("tree", "2**63"):
        bn.io.save(path, {"n": 2**70})
    with clear_error("tree", "object array"):
        bn.io.save(path, {"a": np.array([object()], dtype=object)})
    assert list(tmp_path.iterdir()) == []


def test_load_names_a_missing_file_and_a_template_that_does_not_fit(tmp_path):
    with clear_error("path", str(tmp_path / "nope.msgpack"), kinds=(FileNotFoundError,)):
        bn.io.load(tmp_path / "nope.msgpack")
    with clear_error("path", str(tmp_path), kinds=(IsADirectoryError,)):
        bn.io.load(tmp_path)
    path = tmp_path / "ok.msgpack"
    bn.io.save(path, {"w": jnp.ones(2)})
    with clear_error("like", "'v'"):
        bn.io.load(path, like={"v": jnp.ones(3)})
    with clear_error("like", "int") as e:
        bn.io.load(path, like=5)
    assert isinstance(e.value, (TypeError, ValueError))
    np.testing.assert_array_equal(bn.io.load(path, like={"w": jnp.zeros(2)})["w"], np.ones(2))


def test_write_text_and_bytes_reject_the_wrong_type(tmp_path):
    path = tmp_path / "t.txt"
    with clear_error("text", b"abc"):
        bn.io.write_text(path, b"abc")
    with clear_error("encoding", "'nope'"):
        bn.io.write_text(path, "x", encoding="nope")
    with clear_error("text", "'ascii'"):
        bn.io.write_text(path, "é", encoding="ascii")
    with clear_error("data", "str"):
        bn.io.write_bytes(path, "abc")
    assert not os.path.exists(path)
